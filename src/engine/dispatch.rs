//! Dispatch: the one task that claims queued jobs within the limits, the
//! leases that keep a claim alive while its worker runs (renewed by the
//! worker, reaped when they lapse), recovery at start, the shipping of a
//! running job's log to a shared store, and the bookkeeping of drain and
//! cancel. What a claimed job then does is `attempt.rs`'s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{agent, Engine};
use crate::domain::Limits;
use crate::store::{Job, JobState, StoreError};

/// How often a running job's new log lines go to a shared store.
const LOG_SHIP_EVERY: Duration = Duration::from_millis(500);

/// Who asked for a cancel made through the store (the API, on a replica
/// other than the one running the job).
const CANCEL_ASKED: &str = "api";

/// What the dispatcher knows of a running job.
pub(super) struct RunningJob {
    cancel: CancellationToken,
    /// Its worker, for the lease reaper to abort.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Engine {
    /// The running jobs; a worker that panicked holding the lock leaves the
    /// map as it was, which is still right.
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningJob>> {
        match self.running.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Jobs running now.
    pub(crate) fn running_count(&self) -> usize {
        self.running().len()
    }

    /// Puts back what a previous daemon left half done: jobs it was running
    /// are requeued (their attempt recorded as interrupted) or failed when
    /// out of attempts, and its worktrees are removed. Call before `run`.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        // Agents a dead daemon left running go first: a requeued job must
        // never run beside its old self.
        for (job, process) in self.store.agents::<agent::ProcessIdentity>().await? {
            if process.kill_leftover() {
                tracing::warn!(job = %job, pgid = process.pgid, "Killed an agent left running by a previous daemon.");
            }
            self.store.forget_agent(&job).await?;
        }
        let stale = self.store.running().await?;
        for job in stale.iter().cloned() {
            self.put_back(job, "daemon restarted").await?;
        }
        // Ends that a crash kept from going through the rules (their
        // delivery ids make a second pass harmless).
        for id in self.store.pending_ends().await? {
            match self.store.job(&id).await? {
                Some(job) => self.emit_end(&job).await,
                None => self.store.end_handled(&id).await?,
            }
        }
        let worktrees = self.config.storage.path.join("worktrees");
        if worktrees.exists() {
            let _ = tokio::task::spawn_blocking(move || crate::tree::remove(&worktrees)).await;
        }
        self.workspaces.load_pool().await;
        Ok(stale.len())
    }

    /// Ends a running job's attempt as interrupted (`why`) and requeues it,
    /// or fails it once interruptions or attempts run out.
    async fn put_back(&self, job: Job, why: &str) -> Result<(), StoreError> {
        let job = crate::domain::dispatch::interrupt(&job, why, Utc::now());
        let publications = self.outbox.at_end(&job);
        tracing::warn!(job = %job.id, state = %job.state, why, "Interrupted job put back.");
        self.store.finish(&job, &publications).await
    }

    /// Sets how long a claimed job's lease lasts without renewal (the
    /// worker renews it every third of that). For tests; 60 s by default.
    pub fn set_lease(&mut self, lease: Duration) {
        self.lease = lease;
    }

    /// Keeps a job's lease alive while its worker lives; never returns.
    /// Returns only when the lease was lost: another replica took the job
    /// back (this one was cut off for longer than the lease).
    async fn renew_lease(&self, id: &str) {
        let mut every = tokio::time::interval(self.lease / 3);
        every.tick().await;
        loop {
            every.tick().await;
            match self.store.renew_lease(id, self.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(job = %id, "This replica lost the job's lease to another; stopping its run here.");
                    return;
                }
                Err(e) => tracing::warn!(job = %id, error = %e, "Renewing a job's lease failed; will retry."),
            }
        }
    }

    /// Ships a running job's log to the store in batches, for the API of
    /// every replica; never returns.
    async fn ship_log(&self, id: &str, shipped: &std::sync::atomic::AtomicU64) {
        if !self.store.ships_logs() {
            return std::future::pending().await;
        }
        let mut every = tokio::time::interval(LOG_SHIP_EVERY);
        loop {
            every.tick().await;
            self.ship_log_once(id, shipped).await;
        }
    }

    /// Ships what the job's log gained since `shipped`.
    pub(super) async fn ship_log_once(&self, id: &str, shipped: &std::sync::atomic::AtomicU64) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        if !self.store.ships_logs() {
            return;
        }
        let from = shipped.load(Ordering::Acquire);
        let Ok(mut file) = tokio::fs::File::open(self.job_dir(id).join("log")).await else { return };
        let mut buf = Vec::new();
        if file.seek(std::io::SeekFrom::Start(from)).await.is_err() || file.read_to_end(&mut buf).await.is_err() {
            return;
        }
        if buf.is_empty() {
            return;
        }
        match self.store.append_log(id, from, &buf).await {
            Ok(()) => shipped.store(from + buf.len() as u64, Ordering::Release),
            Err(e) => tracing::warn!(job = %id, error = %e, "Shipping the job's log failed; will retry."),
        }
    }

    /// Kills the recorded agent of job `id`, if it still runs.
    async fn kill_agent(&self, id: &str) {
        match self.store.agents::<agent::ProcessIdentity>().await {
            Ok(agents) => {
                for (job, process) in agents {
                    if job == id {
                        process.kill_leftover();
                        let _ = self.store.forget_agent(&job).await;
                    }
                }
            }
            Err(e) => tracing::warn!(job = %id, error = %e, "Could not read the agent to stop."),
        }
    }

    /// Takes back jobs whose lease ran out: their worker died (a panic) or
    /// hangs. The worker is aborted and its agent's group killed before the
    /// job is requeued, so the job never runs twice at once.
    async fn reap_expired_leases(&self) -> Result<(), StoreError> {
        for id in self.store.expired_leases(self.lease).await? {
            let worker = self.running().remove(&id);
            if let Some(worker) = worker {
                worker.cancel.cancel();
                if let Some(task) = worker.task {
                    task.abort();
                    let _ = task.await;
                }
            }
            self.kill_agent(&id).await;
            if let Some(job) = self.store.job(&id).await?.filter(|j| j.state == JobState::Running) {
                tracing::warn!(job = %id, "A job's lease expired: its worker stopped renewing it.");
                self.put_back(job, "lease expired: its worker stopped").await?;
            }
        }
        Ok(())
    }

    /// The dispatcher: claims queued jobs within the limits until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
        let mut reap = tokio::time::interval(self.lease / 3);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(e) = self.dispatch(&done_tx).await {
                tracing::error!(error = %e, "Dispatching jobs failed; retrying shortly.");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                Some(id) = done_rx.recv() => {
                    self.running().remove(&id);
                }
                _ = reap.tick() => {
                    if let Err(e) = self.reap_expired_leases().await {
                        tracing::error!(error = %e, "Checking job leases failed; retrying shortly.");
                    }
                }
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// The limits a claim keeps, from the config.
    fn limits(&self) -> Limits {
        let limits = &self.config.limits;
        Limits {
            per_replica: limits.max_parallel_jobs,
            per_repo: limits.max_parallel_per_repo,
            per_agent: self
                .config
                .agents
                .iter()
                .filter_map(|(name, a)| Some((name.clone(), a.max_parallel?)))
                .collect(),
        }
    }

    async fn dispatch(self: &Arc<Self>, done: &mpsc::UnboundedSender<String>) -> Result<(), StoreError> {
        for (id, by) in self.store.take_cancels().await? {
            let token = self.running().get(&id).map(|r| r.cancel.clone());
            if let Some(token) = token {
                if by != CANCEL_ASKED {
                    tracing::info!(job = %id, by = %by, "Cancelling a job superseded in its concurrency group.");
                    self.superseded.lock().unwrap_or_else(|p| p.into_inner()).insert(id, by);
                }
                token.cancel();
            }
        }
        let limits = self.limits();
        // A disk short of space takes no new agent; the jobs wait queued.
        if self.space.check() {
            return Ok(());
        }
        // Only while a slot is free: a long queue costs nothing when every
        // worker is busy.
        while self.running_count() < limits.per_replica {
            let Some(job) = self.store.claim_next(&limits, self.lease).await? else { break };
            let cancel = CancellationToken::new();
            let entry = RunningJob { cancel: cancel.clone(), task: None };
            let id = job.id.clone();
            // Registered before the task starts, so a job that ends at once
            // finds itself there to remove.
            let mut running = self.running();
            running.insert(id.clone(), entry);
            let engine = Arc::clone(self);
            let done = done.clone();
            let task = tokio::spawn(async move {
                let id = job.id.clone();
                let shipped = std::sync::atomic::AtomicU64::new(0);
                tokio::select! {
                    _ = engine.execute(job, cancel, &shipped) => {}
                    _ = engine.renew_lease(&id) => {
                        // The job is another replica's now: its run here
                        // stops, agent and all, and stores nothing.
                        engine.kill_agent(&id).await;
                    }
                    _ = engine.ship_log(&id, &shipped) => {}
                }
                // Also here, not only in the dispatcher: while the daemon
                // drains, the dispatcher no longer runs.
                engine.running().remove(&id);
                let _ = done.send(id);
            });
            if let Some(entry) = running.get_mut(&id) {
                entry.task = Some(task);
            }
            drop(running);
        }
        Ok(())
    }

    /// Waits up to `grace` for running jobs to finish, then stops the rest,
    /// leaving them `running` in the store so the next start resumes them.
    pub(crate) async fn drain(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.running_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.running_count() == 0 {
            return;
        }
        tracing::warn!(jobs = self.running_count(), "Stopping jobs still running; they resume at the next start.");
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        for r in self.running().values() {
            r.cancel.cancel();
        }
        // Agents get their SIGTERM-then-SIGKILL; wait for that, bounded.
        let deadline = tokio::time::Instant::now() + agent::KILL_GRACE + Duration::from_secs(2);
        while self.running_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Cancels a job: a queued one at once, a running one by stopping its agent.
    pub async fn cancel(&self, id: &str) -> Result<Option<Job>, StoreError> {
        if let Some(job) = self.store.cancel_queued(id, "cancelled").await? {
            return Ok(Some(job));
        }
        let token = self.running().get(id).map(|r| r.cancel.clone());
        // A worker stays registered for a moment after its job's end is
        // stored: that job is no longer running, whatever the map says.
        let job = self.store.job(id).await?;
        if job.as_ref().is_none_or(|j| j.state != JobState::Running) {
            return Ok(None);
        }
        match token {
            Some(token) => token.cancel(),
            // Another replica runs it: that replica stops it.
            None => self.store.request_cancel(id, CANCEL_ASKED).await?,
        }
        Ok(job)
    }

    /// Cancels what is left of a team job's children once it has ended:
    /// nobody is there to read their results.
    pub(super) async fn cancel_children(&self, job: &Job) {
        let query = crate::store::JobQuery { parent: Some(job.id.clone()), limit: 10_000, ..Default::default() };
        let children = match self.store.list_jobs(&query).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "Could not list the job's children to cancel them.");
                return;
            }
        };
        for child in children.iter().filter(|c| !c.state.is_final()) {
            tracing::info!(child = %child.id, "Cancelling a child of a job that ended.");
            self.log_line(&child.id, &format!("cancelled: its parent job {} ended ({})", job.id, job.state)).await;
            if let Err(e) = self.cancel(&child.id).await {
                tracing::error!(child = %child.id, error = %e, "Could not cancel a child of a job that ended.");
            }
        }
    }
}
