//! The engine: takes queued jobs from the store and runs them, phase by
//! phase — prepare (workspace), run (agent), verify — recording every state
//! change, then hands results to the publisher through the store's outbox.
//!
//! The dispatcher is the only task that claims jobs, so a job is claimed once.
//! A job's attempts run on one worker; a failed attempt is retried with
//! backoff while attempts are left, with verification feedback in its prompt.
//! The engine never talks to GitHub: publishing is the outbox's job.

pub mod agent;
pub mod cli_setup;
mod push;
pub mod space;
pub mod sweep;
pub mod team;
pub mod usage;
pub mod workspace;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{format_duration, AgentDef, Config, PromptMode, ResultMode};
use crate::domain::Limits;
use crate::rules::{JobSpec, OutputKind, RuleSet, SharedRules};
use crate::store::{Accepted, Delivery, Job, JobState, Outcome, Phases, Store, StoreError};
use agent::{Ending, Invocation};
use push::Pushed;
use workspace::Workspaces;

/// How often a running job's new log lines go to a shared store.
const LOG_SHIP_EVERY: Duration = Duration::from_millis(500);

/// Who asked for a cancel made through the store (the API, on a replica
/// other than the one running the job).
const CANCEL_ASKED: &str = "api";

/// How much of a failed verification's output the next prompt carries.
const FEEDBACK_BYTES: usize = 4000;

/// Runs jobs.
pub struct Engine {
    store: Store,
    /// For the events of jobs that end (chaining).
    rules: SharedRules,
    config: Arc<Config>,
    workspaces: Workspaces,
    /// Woken by ingress (new jobs) and by the API (retry).
    wake: Arc<Notify>,
    /// Woken when a publication is written to the outbox.
    publish_wake: Arc<Notify>,
    /// What a job's start and end put on GitHub.
    planner: crate::publish::plan::Planner,
    /// Running jobs by id.
    running: Mutex<HashMap<String, RunningJob>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Scrubs secrets from results and errors before anyone sees them.
    redactor: crate::publish::redact::Redactor,
    /// Set when the daemon stops: a job stopped now is left `running`, to be
    /// resumed at the next start, rather than recorded as cancelled.
    stopping: std::sync::atomic::AtomicBool,
    /// Running jobs cancelled by a newer job of their group: id → that job.
    superseded: Mutex<HashMap<String, String>>,
    /// How long a claimed job stays claimed without its worker renewing.
    lease: Duration,
    /// Confines every agent and verify run; `None` only when the config
    /// turned it off.
    sandbox: Option<Arc<crate::sandbox::Sandbox>>,
    /// The storage folder's free-space floor.
    space: Arc<space::Space>,
    /// The tokens of runs that may hand subtasks to baton (`[job] delegate`).
    grants: team::Grants,
    /// Where baton's API listens: what a team's `/mcp` is forwarded to.
    api_addr: Option<std::net::SocketAddr>,
}

/// What an attempt reports besides how it ended.
#[derive(Default)]
struct Report {
    phases: Phases,
    egress_blocked: Vec<crate::sandbox::egress::Blocked>,
    usage: Option<crate::store::Usage>,
}

/// What the dispatcher knows of a running job.
struct RunningJob {
    cancel: CancellationToken,
    /// Its worker, for the lease reaper to abort.
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How one attempt ended.
enum AttemptEnd {
    /// The result, and what was pushed with the agent's changes, if anything.
    Succeeded(String, Option<Pushed>),
    Cancelled,
    Failed {
        outcome: Outcome,
        exit_code: Option<i32>,
        error: String,
        /// Whether another attempt could help.
        retry: bool,
        /// Verification output for the next attempt's prompt.
        feedback: Option<String>,
    },
}

/// The most of `{{ review.diff }}` a prompt carries.
const REVIEW_DIFF_CAP: usize = 200 * 1024;

impl Engine {
    /// The configuration it runs jobs by.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn new(
        store: Store,
        rules: SharedRules,
        config: Arc<Config>,
        wake: Arc<Notify>,
        publish_wake: Arc<Notify>,
        credentials: Option<Arc<crate::forge::github::auth::Credentials>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Engine {
        let publishing = credentials.is_some();
        // One redactor, built once: the engine scrubs results with it, the
        // planner everything it puts in the outbox.
        let redactor = crate::publish::redact::Redactor::new(config.secrets());
        Engine {
            planner: crate::publish::plan::Planner {
                publishing,
                public_url: config.server.public_url.clone(),
                redactor: redactor.clone(),
                web_url: config.github.git_url.clone(),
            },
            lease: config.limits.job_lease,
            metrics,
            redactor,
            rules,
            workspaces: Workspaces::new(
                &config.storage.path,
                &config.github.git_url,
                credentials,
                config.storage.worktree_pool,
                config.storage.git_timeout,
            ),
            store,
            space: space::Space::new(config.storage.path.clone(), config.storage.min_free, wake.clone()),
            config,
            wake,
            publish_wake,
            running: Mutex::new(HashMap::new()),
            superseded: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            sandbox: None,
            grants: team::Grants::default(),
            api_addr: None,
        }
    }

    /// The address baton's API listens on, which the agents of a team reach
    /// its `/mcp` through.
    pub fn with_api_addr(mut self, addr: std::net::SocketAddr) -> Engine {
        self.api_addr = Some(addr);
        self
    }

    /// The storage folder's free-space floor (its loop is the daemon's to run).
    pub fn space(&self) -> &Arc<space::Space> {
        &self.space
    }

    /// The live tokens of team runs, which the API checks callers against.
    pub fn grants(&self) -> &team::Grants {
        &self.grants
    }

    /// Runs every agent and verify command in `sandbox`; without it (the
    /// config turned it off, or a test of something else) they run
    /// unconfined, with a warning in every job's log.
    pub fn with_sandbox(mut self, sandbox: Option<Arc<crate::sandbox::Sandbox>>) -> Engine {
        if let Some(s) = &sandbox {
            self.workspaces.confine(s.owner());
        }
        self.sandbox = sandbox;
        self
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningJob>> {
        match self.running.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        job_dir(&self.config.storage.path, id)
    }

    /// Garbage-collects the mirrors fetched into since the last call.
    pub async fn gc_mirrors(&self) {
        self.workspaces.gc().await;
    }

    /// Jobs running now.
    pub fn running_count(&self) -> usize {
        self.running().len()
    }

    /// `text` with every secret baton knows of replaced.
    pub fn redact(&self, text: &str) -> String {
        self.redactor.redact(text)
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
        let publications = self.planner.at_end(&job);
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
    async fn ship_log_once(&self, id: &str, shipped: &std::sync::atomic::AtomicU64) {
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
    pub async fn drain(&self, grace: Duration) {
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

    #[tracing::instrument(skip_all, fields(job = %job.id, trigger = %job.trigger))]
    async fn execute(&self, mut job: Job, cancel: CancellationToken, shipped: &std::sync::atomic::AtomicU64) {
        tracing::info!(attempt = job.attempts, "Job started.");
        if let Some((why, first)) = self.repair_refused(&job).await {
            self.log_line(&job.id, &why).await;
            let now = Utc::now();
            job.end_attempt(Outcome::ChainLimit, None, Some(why.clone()), now);
            job.end(JobState::Failed, None, Some(why), now);
            // Said once on the pull request; later refusals are quiet.
            let publications = if first { self.planner.at_end(&job) } else { Vec::new() };
            return self.finish(job, shipped, publications).await;
        }
        let started = self.planner.at_start(&job);
        if !started.is_empty() {
            job.progress.started = true;
            match self.store.start_publications(&job, &started).await {
                Ok(()) => self.publish_wake.notify_one(),
                Err(e) => tracing::error!(error = %e, "Could not record the job's start publications."),
            }
        }
        let mut feedback: Option<String> = None;
        loop {
            let mut report = Report::default();
            let end = self.attempt(&job, feedback.as_deref(), &cancel, &mut report).await;
            job.record_phases(report.phases);
            job.record_usage(report.usage.take());
            if !report.egress_blocked.is_empty() {
                let n = report.egress_blocked.iter().map(|b| b.count).sum();
                self.metrics.egress_blocked(&job.spec.agent, n);
                job.record_egress(report.egress_blocked);
            }
            let now = Utc::now();
            match end {
                AttemptEnd::Succeeded(result, pushed) => {
                    if let Some(p) = pushed {
                        job.branch = Some(p.branch);
                        job.commit = Some(p.commit);
                    }
                    job.end_attempt(Outcome::Exit, Some(0), None, now);
                    job.end(JobState::Succeeded, Some(result), None, now);
                }
                AttemptEnd::Cancelled if self.stopping.load(std::sync::atomic::Ordering::SeqCst) => {
                    // The daemon is stopping: the job stays `running` in the
                    // store and the next start requeues it as interrupted.
                    tracing::info!("Job stopped by shutdown; it resumes at the next start.");
                    return;
                }
                AttemptEnd::Cancelled => {
                    job.end_attempt(Outcome::Cancelled, None, None, now);
                    let by = self.superseded.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.id);
                    let why = match &by {
                        Some(by) => format!("cancelled: superseded by job {by}"),
                        None => "cancelled".into(),
                    };
                    job.displaced_by = by;
                    job.end(JobState::Cancelled, None, Some(why), now);
                }
                AttemptEnd::Failed { outcome, exit_code, error, retry, feedback: fb } => {
                    job.end_attempt(outcome, exit_code, Some(error.clone()), now);
                    if retry && job.attempts_left() {
                        let base = job.spec.backoff_secs.map(Duration::from_secs).unwrap_or(DEFAULT_BACKOFF);
                        let wait = backoff(base, job.counted_attempts());
                        tracing::warn!(error = %error, retry_in = %format_duration(wait), "Attempt failed; retrying.");
                        self.log_line(
                            &job.id,
                            &format!("attempt {} failed: {error}; retrying in {}", job.attempts, format_duration(wait)),
                        )
                        .await;
                        if let Err(e) = self.store.save(&job).await {
                            tracing::error!(error = %e, "Could not record the failed attempt.");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = cancel.cancelled() => {
                                job.end(JobState::Cancelled, None, Some("cancelled".into()), Utc::now());
                                break;
                            }
                        }
                        feedback = fb;
                        job.start_attempt(Utc::now());
                        if let Err(e) = self.store.save(&job).await {
                            tracing::error!(error = %e, "Could not record the new attempt.");
                        }
                        continue;
                    }
                    job.end(JobState::Failed, None, Some(error), now);
                }
            }
            break;
        }
        // What an agent says goes to the API and to GitHub: never with a secret in it.
        job.result = job.result.as_deref().map(|r| self.redactor.redact(r));
        job.error = job.error.as_deref().map(|e| self.redactor.redact(e));
        for a in &mut job.history {
            a.error = a.error.as_deref().map(|e| self.redactor.redact(e));
        }
        let publications = self.planner.at_end(&job);
        self.finish(job, shipped, publications).await
    }

    /// Stores a job's end with what it publishes, and sends the end through
    /// the rules.
    async fn finish(
        &self,
        job: Job,
        shipped: &std::sync::atomic::AtomicU64,
        publications: Vec<crate::domain::Publication>,
    ) {
        // The whole log is in a shared store before the job reads as ended
        // there: a follower on another replica then misses no line.
        self.ship_log_once(&job.id, shipped).await;
        match self.store.finish(&job, &publications).await {
            Ok(()) => {
                tracing::info!(state = %job.state, error = job.error.as_deref().unwrap_or(""), "Job finished.");
                let seconds = job
                    .started_at
                    .zip(job.finished_at)
                    .map(|(a, b)| (b - a).num_milliseconds().max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                self.metrics.job_finished(&job.trigger, job.state.as_str(), seconds);
                if !publications.is_empty() {
                    self.publish_wake.notify_one();
                }
                self.emit_end(&job).await;
                if !job.spec.delegate.is_empty() {
                    self.cancel_children(&job).await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "Could not store the job's end; it will rerun after a restart.")
            }
        }
    }

    /// Cancels what is left of a team job's children once it has ended:
    /// nobody is there to read their results.
    async fn cancel_children(&self, job: &Job) {
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

    /// Sends a job's end back through the rules as `job.succeeded` or
    /// `job.failed`; the jobs it starts are stored like any delivery's.
    async fn emit_end(&self, job: &Job) {
        let Some(event) = crate::domain::chain::job_event(job) else { return };
        let specs = self.rules.current().match_event(&event);
        if !specs.is_empty() {
            let delivery = Delivery::new(&event.delivery, &event.source, &event.kind);
            match self.store.accept(delivery, specs).await {
                Ok(Accepted::New(admitted)) => {
                    tracing::info!(delivery = %event.delivery, event = %event.kind, jobs = admitted.jobs.len(), "Job end started jobs.");
                    self.wake.notify_one();
                }
                Ok(Accepted::Duplicate | Accepted::Replay { .. }) => {}
                Err(e) => {
                    // Left pending: the next start sends it through again.
                    tracing::error!(delivery = %event.delivery, error = %e, "Could not store the jobs a job end started.");
                    return;
                }
            }
        }
        if let Err(e) = self.store.end_handled(&job.id).await {
            tracing::warn!(job = %job.id, error = %e, "Could not clear the job's pending end.");
        }
    }

    /// One attempt: prepare, run, verify.
    async fn attempt(
        &self,
        job: &Job,
        feedback: Option<&str>,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> AttemptEnd {
        let phases = &mut report.phases;
        let spec = &job.spec;
        let limit = self.config.limits.max_chain_depth;
        if spec.chain_depth > limit {
            let why = format!(
                "chain depth limit reached: this job was started by {} job ends in a row, and limits.max_chain_depth is {limit}",
                spec.chain_depth
            );
            return failed(Outcome::ChainLimit, None, why, false);
        }
        let Some(agent) = self.config.agents.get(&spec.agent) else {
            return failed(
                Outcome::SpawnFailed,
                None,
                format!("agent `{}` is not defined in the configuration", spec.agent),
                false,
            );
        };
        let dir = self.job_dir(&job.id);
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return failed(Outcome::PrepareFailed, None, format!("cannot create {}: {e}", dir.display()), true);
        }
        if self.sandbox.is_none() {
            self.log_line(&job.id, UNSANDBOXED_WARNING).await;
        }
        self.log_line(&job.id, &format!("attempt {}: preparing workspace", job.attempts)).await;
        let started = std::time::Instant::now();
        let prepared = tokio::select! {
            p = self.workspaces.prepare(&job.id, spec.repo.as_deref(), spec.access, &spec.workspace) => p,
            _ = cancel.cancelled() => return AttemptEnd::Cancelled,
        };
        phases.prepare_ms = Some(started.elapsed().as_millis() as u64);
        let prepared = match prepared {
            Ok(p) => p,
            // Another attempt would find the head moved all the same.
            Err(e @ workspace::WorkspaceError::HeadMoved { .. }) => {
                return failed(Outcome::PrepareFailed, None, format!("preparing the workspace failed: {e}"), false)
            }
            Err(e) => {
                return failed(Outcome::PrepareFailed, None, format!("preparing the workspace failed: {e}"), true)
            }
        };
        if let Some(commit) = &prepared.commit {
            let how = if prepared.recycled { " (a recycled worktree, reset)" } else { "" };
            self.log_line(&job.id, &format!("workspace at {commit}{how}")).await;
        }
        let mut skills: Vec<(String, String)> = spec.skills.clone();
        if let (Some(repo), Some(default)) = (spec.repo.as_deref(), spec.default_branch.as_deref()) {
            skills.extend(self.workspaces.conventions(&prepared, repo, spec.access, default).await);
        }
        let mut prompt = prompt_for(spec, &skills, feedback);
        if prompt.contains(crate::rules::REVIEW_DIFF) {
            let diff = match &spec.review_since {
                Some(since) => match self.workspaces.diff_since(&prepared, spec.access, since, REVIEW_DIFF_CAP).await {
                    Ok(diff) => diff,
                    Err(e) => format!("(the changes since {since} could not be read here: {e})"),
                },
                None => String::new(),
            };
            prompt = prompt.replace(crate::rules::REVIEW_DIFF, &diff);
        }
        let end = self.run_in(job, agent, &prepared, &prompt, cancel, report).await;
        self.workspaces.release(prepared).await;
        // The runs' io folders were the agents' to write: what they hold is
        // read by now, and a job's folder keeps only baton's own files.
        let io = [dir.join("io"), dir.join("verify-io")];
        let _ = tokio::task::spawn_blocking(move || io.iter().try_for_each(|d| crate::tree::remove(d))).await;
        end
    }

    /// How a team run's agent reaches baton's `/mcp`: through its sandbox's
    /// proxy, which forwards to the API, or straight to the API unconfined.
    fn team_access(&self, token: &str, api: std::net::SocketAddr) -> cli_setup::TeamAccess {
        let mut api = api;
        if api.ip().is_unspecified() {
            let loopback: std::net::IpAddr = match api {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            api.set_ip(loopback);
        }
        let (url, upstream) = match self.sandbox {
            Some(_) => (format!("http://127.0.0.1:{}/mcp", crate::sandbox::PROXY_PORT), Some(api)),
            None => (format!("http://{api}/mcp"), None),
        };
        cli_setup::TeamAccess { url, token: token.to_string(), upstream }
    }

    /// The sandbox for one run of `job` (`kind`: agent or verify), showing
    /// the mirror's `objects` read-only; `None` when the sandbox is off.
    fn confinement(&self, job: &Job, kind: &str, objects: Option<&PathBuf>) -> Option<agent::Confinement<'_>> {
        let sandbox = self.sandbox.as_deref()?;
        Some(agent::Confinement {
            sandbox,
            name: format!("{}-{}-{kind}", job.id, job.attempts),
            run_dir: self.job_dir(&job.id).join(format!("{kind}-run")),
            objects: objects.cloned(),
            space: Some(self.space.clone()),
        })
    }

    async fn run_in(
        &self,
        job: &Job,
        agent: &AgentDef,
        prepared: &workspace::Prepared,
        prompt: &str,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> AttemptEnd {
        let phases = &mut report.phases;
        let spec = &job.spec;
        let workdir = prepared.path.as_path();
        let objects = prepared.objects.as_ref();
        let dir = self.job_dir(&job.id);
        let log = dir.join("log");
        let timeout = spec.timeout_secs.map(Duration::from_secs).unwrap_or(agent.timeout);
        let store = self.store.clone();
        let job_id = job.id.clone();
        let note = move |pgid: i32| {
            let (store, job_id) = (store.clone(), job_id.clone());
            tokio::spawn(async move {
                if let Err(e) = store.note_agent(&job_id, &agent::ProcessIdentity::of(pgid)).await {
                    tracing::warn!(error = %e, "Could not record the agent's process group.");
                }
                store.flush().await
            });
        };
        let io = dir.join("io");
        let budget =
            spec.budget_usd.map(|usd| agent::Budget { usd, prices: std::sync::Arc::new(self.config.prices.clone()) });
        // A team run's token lives as long as this run.
        let pass = (!spec.delegate.is_empty()).then(|| self.grants.mint(team::Grant::of(job)));
        let access = match (&pass, self.api_addr) {
            (None, _) => None,
            (Some(pass), Some(addr)) => pass.token().map(|token| self.team_access(token, addr)),
            (Some(_), None) => None,
        };
        if pass.is_some() && access.is_none() {
            let why = "this job may delegate, but baton has no token or API address to give its agent";
            return failed(Outcome::SpawnFailed, None, why.into(), false);
        }
        let sandboxed = self.sandbox.is_some();
        // The CLI is told where its files are as it sees them.
        let visible_io = if sandboxed { PathBuf::from(crate::sandbox::IO_PATH) } else { io.clone() };
        let setup = cli_setup::setup(agent, &spec.mcp, &self.config.mcp, &visible_io, sandboxed, access.as_ref());
        let setup = match setup {
            Ok(mut setup) => {
                // A server's arguments never show the agent baton's own files.
                let hidden = self.config.hidden_paths();
                for s in setup.iter_mut() {
                    s.expose.retain(|p| !hidden.iter().any(|h| p.starts_with(h)));
                }
                setup
            }
            Err(e) => return failed(Outcome::SpawnFailed, None, e.to_string(), false),
        };
        let inv = Invocation {
            agent,
            prompt,
            workdir,
            job_dir: &io,
            log: &log,
            timeout,
            output_cap: agent::DEFAULT_OUTPUT_CAP,
            cancel,
            on_spawn: Some(&note),
            confine: self.confinement(job, "agent", objects),
            budget: budget.as_ref(),
            setup: setup.as_ref(),
        };
        self.log_line(&job.id, &format!("running agent `{}`", agent.name)).await;
        let started = std::time::Instant::now();
        let run = inv.run().await;
        phases.run_ms = Some(started.elapsed().as_millis() as u64);
        let _ = self.store.forget_agent(&job.id).await;
        let run = match run {
            Ok(r) => r,
            Err(e) => return failed(Outcome::SpawnFailed, None, e.to_string(), false),
        };
        report.egress_blocked.extend(run.egress_blocked.iter().cloned());
        if let Some(used) = inv.usage(&run).await {
            let used = usage::priced_by(used, agent.model.as_deref(), &self.config.prices);
            self.metrics.usage(&job.trigger, &agent.name, &used);
            if let Some(usd) = used.cost_usd.filter(|c| *c > 0.0) {
                if let Err(e) = self.store.record_spend(spec, usd).await {
                    tracing::error!(error = %e, "Could not count what the run spent against the daily budgets.");
                }
            }
            report.usage = Some(used);
        }
        if let Some(hit) = run.limit {
            return failed(
                Outcome::Limit,
                run_code(&run),
                limit_message(&agent.name, hit, &agent.sandbox, self.config.storage.min_free),
                false,
            );
        }
        // Stopped by baton past its budget, or by the CLI's own cap.
        let spent = report.usage.as_ref().and_then(|u| u.cost_usd);
        if let Some(b) = &budget {
            if run.ending == Ending::OverBudget
                || (spent.is_some_and(|s| s >= b.usd) && run.ending != Ending::Exited(Some(0)))
            {
                let spent = spent.map(crate::domain::dollars).unwrap_or_else(|| "an unknown amount".into());
                let why = format!("budget of {} reached after {spent}", crate::domain::dollars(b.usd));
                return failed(Outcome::Budget, run_code(&run), why, false);
            }
        }
        match run.ending {
            Ending::Cancelled => return AttemptEnd::Cancelled,
            // Only a run with a budget is watched (handled above).
            Ending::OverBudget => return failed(Outcome::Budget, None, "the run's budget is spent".into(), false),
            // Recorded as the run's limit (handled above).
            Ending::Limit(hit) => {
                let why = limit_message(&agent.name, hit, &agent.sandbox, self.config.storage.min_free);
                return failed(Outcome::Limit, None, why, false);
            }
            Ending::TimedOut(d) => {
                return failed(Outcome::Timeout, None, format!("timeout after {}", format_duration(d)), true)
            }
            Ending::Exited(Some(0)) => {}
            Ending::Exited(code) => {
                return failed(
                    Outcome::Exit,
                    code,
                    format!("agent `{}` exited with {}; see the job log", agent.name, agent::describe_exit(code)),
                    true,
                )
            }
        }
        let result = match inv.result(&run).await {
            Ok(r) => r,
            Err(e) => return failed(Outcome::Exit, Some(0), format!("agent `{}` succeeded but {e}", agent.name), true),
        };
        if let Err(end) = self.verify(job, agent, workdir, objects, cancel, report).await {
            return end;
        }
        match spec.output {
            OutputKind::PullRequest if self.planner.publishing => {
                self.push_changes(job, prepared, result, cancel).await
            }
            OutputKind::Push if self.planner.publishing => {
                self.push_to_pull_request(job, agent, prepared, result, cancel, report).await
            }
            _ => AttemptEnd::Succeeded(result, None),
        }
    }

    /// Runs the trigger's `verify` command in the workspace, sandboxed like
    /// the agent; `Err` is how the attempt ends when it fails.
    async fn verify(
        &self,
        job: &Job,
        agent: &AgentDef,
        workdir: &std::path::Path,
        objects: Option<&PathBuf>,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> Result<(), AttemptEnd> {
        let Some(verify) = &job.spec.verify else { return Ok(()) };
        let dir = self.job_dir(&job.id);
        let log = dir.join("log");
        let timeout = job.spec.timeout_secs.map(Duration::from_secs).unwrap_or(agent.timeout);
        self.log_line(&job.id, &format!("verifying with `{}`", verify.join(" "))).await;
        let check = AgentDef {
            name: "verify".into(),
            command: verify.clone(),
            prompt: PromptMode::Stdin,
            result: ResultMode::Stdout,
            env: agent.env.clone(),
            vars: Default::default(),
            timeout,
            install: None,
            max_parallel: None,
            sandbox: agent.sandbox.clone(),
            usage: crate::config::UsageFormat::None,
            model: None,
            cli: None,
        };
        let v = Invocation {
            agent: &check,
            prompt: "",
            workdir,
            job_dir: &dir.join("verify-io"),
            log: &log,
            timeout,
            output_cap: agent::DEFAULT_OUTPUT_CAP,
            cancel,
            on_spawn: None,
            confine: self.confinement(job, "verify", objects),
            budget: None,
            setup: None,
        };
        let started = std::time::Instant::now();
        let outcome = v.run().await;
        report.phases.verify_ms = Some(started.elapsed().as_millis() as u64);
        if let Ok(r) = &outcome {
            report.egress_blocked.extend(r.egress_blocked.iter().cloned());
            if let Some(hit) = r.limit {
                return Err(failed(
                    Outcome::Limit,
                    run_code(r),
                    limit_message("verify", hit, &agent.sandbox, self.config.storage.min_free),
                    false,
                ));
            }
        }
        match outcome {
            Err(e) => Err(failed(Outcome::VerifyFailed, None, format!("verify could not run: {e}"), false)),
            Ok(r) => match r.ending {
                Ending::Cancelled => Err(AttemptEnd::Cancelled),
                Ending::Exited(Some(0)) => Ok(()),
                ending => {
                    let why = match ending {
                        Ending::TimedOut(d) => format!("timeout after {}", format_duration(d)),
                        Ending::Exited(code) => format!("exit {}", agent::describe_exit(code)),
                        Ending::Cancelled => "cancelled".into(),
                        Ending::OverBudget => "over budget".into(),
                        Ending::Limit(hit) => format!("stopped at {}", hit.key()),
                    };
                    Err(AttemptEnd::Failed {
                        outcome: Outcome::VerifyFailed,
                        exit_code: Some(0),
                        error: format!("verification `{}` failed ({why})", verify.join(" ")),
                        retry: true,
                        feedback: Some(tail(&r.output_tail, FEEDBACK_BYTES)),
                    })
                }
            },
        }
    }

    /// Adds a line of baton's own to a job's log.
    pub async fn note(&self, id: &str, line: &str) {
        self.log_line(id, line).await
    }

    async fn log_line(&self, id: &str, line: &str) {
        let path = self.job_dir(id).join("log");
        let text = format!("[baton] {line}\n");
        // Open, write and close in one trip to the blocking pool, not three.
        let _ = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            std::fs::OpenOptions::new().create(true).append(true).open(&path)?.write_all(text.as_bytes())
        })
        .await;
    }
}

/// Runs jobs to their end in this process, publishing nothing (`simulate
/// --run`). `config.storage.path` should be a scratch folder.
pub async fn run_locally(
    config: Config,
    specs: Vec<JobSpec>,
    sandbox: Option<Arc<crate::sandbox::Sandbox>>,
) -> Result<Vec<Job>, StoreError> {
    let store = Store::open(&config.storage.path)?;
    let rules = SharedRules::new(RuleSet::empty(&config), Vec::new());
    let engine = Engine::new(
        store.clone(),
        rules,
        Arc::new(config),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        None,
        Arc::default(),
    )
    .with_sandbox(sandbox);
    let mut out = Vec::new();
    for spec in specs {
        let now = Utc::now();
        let mut job = Job::new(crate::store::job_id("simulated", &spec.trigger), 0, "simulated".into(), spec, now);
        job.start_attempt(now);
        let id = job.id.clone();
        engine.execute(job, CancellationToken::new(), &std::sync::atomic::AtomicU64::new(0)).await;
        out.extend(store.job(&id).await?);
    }
    Ok(out)
}

/// What the agent is asked: the trigger's prompt, the conventions, and after
/// a failed verification, its output.
fn prompt_for(spec: &JobSpec, skills: &[(String, String)], feedback: Option<&str>) -> String {
    let base = with_skills(&spec.prompt, skills);
    match feedback {
        Some(fb) => format!(
            "{base}\n\n## Your previous attempt failed verification\n\nThe check `{}` failed with this output:\n\n```\n{fb}\n```\n\nFix the cause and try again.\n",
            spec.verify.as_ref().map(|v| v.join(" ")).unwrap_or_default()
        ),
        None => base,
    }
}

/// Convention files added to every prompt, in all.
const SKILLS_CAP: usize = 32 * 1024;

/// The prompt with convention files under a heading, capped in size.
fn with_skills(prompt: &str, skills: &[(String, String)]) -> String {
    if skills.is_empty() {
        return prompt.to_string();
    }
    let mut out = format!("{}\n\n## Conventions to follow\n", prompt.trim_end());
    let mut left = SKILLS_CAP;
    for (name, text) in skills {
        let text = text.trim();
        if text.len() > left {
            let mut cut = left;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push_str(&format!(
                "\n### {name}\n\n{}\n\n(cut: conventions are limited to {SKILLS_CAP} bytes)\n",
                &text[..cut]
            ));
            break;
        }
        left -= text.len();
        out.push_str(&format!("\n### {name}\n\n{text}\n"));
    }
    out
}

pub fn job_dir(storage: &std::path::Path, id: &str) -> PathBuf {
    storage.join("jobs").join(id)
}

/// Workflows and composite actions: what a push must not change unless the
/// trigger allows it.
fn is_workflow_path(path: &str) -> bool {
    // The folders themselves too: a change that turns `.github` or one of
    // them into a link would put other files where workflows are read.
    matches!(path, ".github" | ".github/workflows" | ".github/actions")
        || path.starts_with(".github/workflows/")
        || path.starts_with(".github/actions/")
}

/// Logged on every job while `[sandbox] enabled = false`.
const UNSANDBOXED_WARNING: &str = "WARNING: the sandbox is off ([sandbox] enabled = false): this agent runs with \
     the daemon's own authority and can read its keys, its store and other jobs";

fn run_code(run: &agent::Run) -> Option<i32> {
    match run.ending {
        Ending::Exited(code) => code,
        _ => None,
    }
}

/// Why a run that hit a sandbox cap failed.
fn limit_message(who: &str, hit: crate::sandbox::LimitHit, profile: &crate::sandbox::Profile, min_free: u64) -> String {
    use crate::sandbox::LimitHit;
    match hit {
        LimitHit::Memory => {
            format!("`{who}` reached its memory limit (max_memory = {} MiB) and was stopped", profile.max_memory >> 20)
        }
        LimitHit::Processes => format!(
            "`{who}` reached its process limit (max_processes = {}): it could not start more processes",
            profile.max_processes
        ),
        LimitHit::Disk => format!(
            "`{who}` wrote more than its disk limit (max_disk = {}) to its workspace, HOME and /tmp, and was stopped",
            human_size(profile.max_disk)
        ),
        LimitHit::Files => format!(
            "`{who}` made more files than its limit (max_files = {}) in its workspace, HOME and /tmp, and was stopped",
            profile.max_files
        ),
        LimitHit::MinFree => format!(
            "`{who}` was stopped: the storage folder's disk fell below storage.min_free ({}) and this run was \
             growing fastest",
            human_size(min_free)
        ),
    }
}

/// `20 GiB`, `512 MiB`, `1000 bytes`.
fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

fn failed(outcome: Outcome, exit_code: Option<i32>, error: String, retry: bool) -> AttemptEnd {
    AttemptEnd::Failed { outcome, exit_code, error, retry, feedback: None }
}

/// `base`, then doubling, capped at 10 minutes.
fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(600))
}

/// The wait before a job's second attempt; each further one doubles it.
const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);

fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflows_and_actions_are_what_needs_consent() {
        for path in [".github/workflows/ci.yml", ".github/actions/setup/action.yml"] {
            assert!(is_workflow_path(path), "{path}");
        }
        // A link replacing one of the folders counts as a change to it.
        for path in [".github", ".github/workflows", ".github/actions"] {
            assert!(is_workflow_path(path), "{path}");
        }
        for path in [".github/CODEOWNERS", "docs/.github/workflows/x.yml", ".githubx"] {
            assert!(!is_workflow_path(path), "{path}");
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(DEFAULT_BACKOFF, 1), Duration::from_secs(10));
        assert_eq!(backoff(DEFAULT_BACKOFF, 2), Duration::from_secs(20));
        assert_eq!(backoff(DEFAULT_BACKOFF, 30), Duration::from_secs(600));
        assert_eq!(backoff(Duration::from_secs(1), 3), Duration::from_secs(4));
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail("ééé", 3), "…é");
    }
}
