//! The store's sequences, written once for every backend: each opens a
//! transaction, reads the records a domain policy needs, applies the plan
//! the policy returns, commits, and makes it durable before anyone hears of
//! it. A backend supplies only the transaction (`Backend`, `Tx`): how a
//! record is read and held, how the queue is scanned, how a plan is written.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;

use super::StoreError;
use crate::domain::admission::{self, Admission, AdmitView};
use crate::domain::approval::{self, Held};
use crate::domain::dispatch::{self, Claim, Limits, Load, QueueEntry};
use crate::domain::{Accepted, Approval, GroupState, Job, JobState, Plan, Publication, Write};

/// A database the sequences run on.
pub(super) trait Backend: Sync {
    type Tx<'a>: Tx + Send
    where
        Self: 'a;

    /// Opens a transaction. A `claim` one is also the only claim under way,
    /// across replicas, so the limits that span them hold.
    async fn begin(&self, claim: bool) -> Result<Self::Tx<'_>, StoreError>;

    /// Makes what was committed durable (sled commits to memory first; a
    /// PostgreSQL commit is durable already).
    async fn durable(&self) -> Result<(), StoreError>;
}

/// One transaction. What it reads stays as read until it ends (PostgreSQL
/// locks the rows; sled lets one transaction run at a time), and it reads
/// the database as it was before its own writes: every sequence reads what
/// it needs before it writes. Dropped without `commit`, it writes nothing;
/// except that on PostgreSQL a plan `apply` writes as one statement before
/// anything locked a row is written, and committed, then and there: such a
/// plan must be the sequence's last act (the backend refuses anything after
/// it), as admission's is.
pub(super) trait Tx {
    async fn job(&mut self, id: &str) -> Result<Option<Job>, StoreError>;
    /// Which of `ids` name a stored job.
    async fn existing(&mut self, ids: &[String]) -> Result<HashSet<String>, StoreError>;
    async fn group(&mut self, name: &str) -> Result<Option<GroupState>, StoreError>;
    /// Trigger runs, cooldowns and spending by key (those stored).
    async fn throttles(&mut self, keys: &[String]) -> Result<HashMap<String, Vec<i64>>, StoreError>;
    /// The jobs held for approval on a subject (`owner/name#N`).
    async fn held(&mut self, subject: &str) -> Result<Vec<Held>, StoreError>;
    /// Whether `id` waits in the queue.
    async fn queued(&mut self, id: &str) -> Result<bool, StoreError>;
    /// Whether this replica holds `id`'s lease (another may have taken the
    /// job back after this one went quiet).
    async fn holds_lease(&mut self, id: &str) -> Result<bool, StoreError>;
    /// `n` new job numbers (`Job::seq`), ascending.
    async fn numbers(&mut self, n: usize) -> Result<Vec<u64>, StoreError>;
    /// What admitting `batch` reads (see `AdmitView::wanted`), and a new
    /// number for each of its jobs, ascending (as `numbers`).
    async fn admit_view(&mut self, batch: &[Admission]) -> Result<(AdmitView, Vec<u64>), StoreError>;
    /// What runs now, on every replica.
    async fn load(&mut self) -> Result<Load, StoreError>;
    /// The first queued entry, in queue order, that `limits` admit beside
    /// `load`, passing over `passed`.
    async fn next_queued(
        &mut self,
        limits: &Limits,
        load: &Load,
        passed: &HashSet<String>,
    ) -> Result<Option<QueueEntry>, StoreError>;
    /// Writes a plan; `lease` is how long a `Write::Lease` holds.
    async fn apply(&mut self, plan: Plan, lease: Duration) -> Result<(), StoreError>;
    async fn commit(self) -> Result<(), StoreError>;
}

/// Runs a sequence again while it fails only because another transaction
/// got in its way (PostgreSQL: serialization, deadlock, a unique key taken
/// meanwhile).
macro_rules! retrying {
    ($body:expr) => {{
        let mut tries = 0;
        loop {
            match $body {
                Err(e) if StoreError::is_conflict(&e) && tries < 8 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(5 * tries)).await;
                }
                other => break other,
            }
        }
    }};
}
pub(super) use retrying;

/// Admits a batch of deliveries in one transaction, numbering their new
/// jobs in place. Durable once committed: PostgreSQL's commits are, and the
/// embedded store's writer commits durably (see `writer`).
pub(super) async fn admit_batch<B: Backend>(b: &B, batch: &mut [Admission]) -> Result<Vec<Accepted>, StoreError> {
    let mut tx = b.begin(false).await?;
    let (mut view, numbers) = tx.admit_view(batch).await?;
    let mut numbers = numbers.into_iter();
    for job in batch.iter_mut().flat_map(|a| a.jobs.iter_mut()) {
        job.seq = numbers.next().unwrap_or(0);
    }
    let mut plan = Plan::new();
    let mut answers = Vec::with_capacity(batch.len());
    for a in batch.iter() {
        let (accepted, writes) = admission::admit(&mut view, a);
        plan.extend(writes);
        answers.push(accepted);
    }
    tx.apply(plan, Duration::ZERO).await?;
    tx.commit().await?;
    Ok(answers)
}

/// Claims the next queued job `limits` allow (see `Store::claim_next`).
pub(super) async fn claim_next<B: Backend>(b: &B, limits: &Limits, lease: Duration) -> Result<Option<Job>, StoreError> {
    let claimed = retrying!(try_claim(b, limits, lease).await)?;
    if claimed.is_some() {
        b.durable().await?;
    }
    Ok(claimed)
}

async fn try_claim<B: Backend>(b: &B, limits: &Limits, lease: Duration) -> Result<Option<Job>, StoreError> {
    let mut tx = b.begin(true).await?;
    let load = tx.load().await?;
    if !load.has_room(limits) {
        return Ok(None);
    }
    // Entries passed over this time: their group is busy, or they were stale.
    let mut passed = HashSet::new();
    while let Some(entry) = tx.next_queued(limits, &load, &passed).await? {
        let job = tx.job(&entry.id).await?;
        let group = match job.as_ref().and_then(|j| j.spec.concurrency.as_deref()) {
            Some(g) => tx.group(g).await?,
            None => None,
        };
        match dispatch::claim(&entry, job.as_ref(), group.as_ref(), Utc::now()) {
            Claim::Run(job, plan) => {
                tx.apply(plan, lease).await?;
                tx.commit().await?;
                return Ok(Some(*job));
            }
            Claim::Stale(plan) => tx.apply(plan, lease).await?,
            Claim::Wait => {}
        }
        passed.insert(entry.id);
    }
    tx.commit().await?;
    Ok(None)
}

/// Writes a job record as it is now, merged with what others wrote of it.
pub(super) async fn save<B: Backend>(b: &B, job: &Job) -> Result<(), StoreError> {
    retrying!(
        async {
            let mut tx = b.begin(false).await?;
            let stored = tx.job(&job.id).await?;
            let plan = vec![Write::Job { job: Box::new(dispatch::merged(job, stored.as_ref())), new: false }];
            tx.apply(plan, Duration::ZERO).await?;
            tx.commit().await
        }
        .await
    )?;
    b.durable().await
}

/// Stores a job that ended (or goes back to the queue) with its
/// publications. A `leased` job's end is written only by the replica that
/// holds its lease: a worker cut off long enough for another replica to take
/// the job back must not write over what that one does.
pub(super) async fn finish<B: Backend>(
    b: &B,
    job: &Job,
    publications: &[Publication],
    leased: bool,
) -> Result<(), StoreError> {
    retrying!(
        async {
            let mut tx = b.begin(false).await?;
            if leased && !tx.holds_lease(&job.id).await? {
                return Err(StoreError::LeaseLost(job.id.clone()));
            }
            let group = match &job.spec.concurrency {
                Some(g) => tx.group(g).await?,
                None => None,
            };
            let stored = tx.job(&job.id).await?;
            tx.apply(dispatch::finish(job, stored.as_ref(), group.as_ref(), publications), Duration::ZERO).await?;
            tx.commit().await
        }
        .await
    )?;
    b.durable().await
}

/// Writes a running job with the publications of its start.
pub(super) async fn start_publications<B: Backend>(
    b: &B,
    job: &Job,
    publications: &[Publication],
) -> Result<(), StoreError> {
    retrying!(
        async {
            let mut tx = b.begin(false).await?;
            let stored = tx.job(&job.id).await?;
            let mut plan = vec![Write::Job { job: Box::new(dispatch::merged(job, stored.as_ref())), new: false }];
            plan.extend(publications.iter().map(|p| Write::Outbox(Box::new(p.clone()))));
            tx.apply(plan, Duration::ZERO).await?;
            tx.commit().await
        }
        .await
    )?;
    b.durable().await
}

/// Cancels job `id` if it is still queued (a claim may have taken it since
/// the caller looked); `group` is its concurrency group, read first so that
/// groups are always held before jobs.
pub(super) async fn cancel_queued<B: Backend>(
    b: &B,
    id: &str,
    group: Option<&str>,
    reason: &str,
) -> Result<Option<Job>, StoreError> {
    let cancelled = retrying!(
        async {
            let mut tx = b.begin(false).await?;
            let group = match group {
                Some(g) => tx.group(g).await?,
                None => None,
            };
            let queued = tx.queued(id).await?;
            let Some(job) = tx.job(id).await?.filter(|j| queued && j.state == JobState::Queued) else {
                return Ok(None);
            };
            let (job, plan) = dispatch::cancel(&job, group.as_ref(), reason, Utc::now());
            tx.apply(plan, Duration::ZERO).await?;
            tx.commit().await?;
            Ok(Some(job))
        }
        .await
    )?;
    if cancelled.is_some() {
        b.durable().await?;
    }
    Ok(cancelled)
}

/// Records a publication's progress (and its job's, when it ends one).
pub(super) async fn update_publication<B: Backend>(b: &B, p: &Publication, created: bool) -> Result<(), StoreError> {
    retrying!(
        async {
            let mut tx = b.begin(false).await?;
            let job = tx.job(&p.job).await?;
            tx.apply(dispatch::publication_update(job.as_ref(), p, created, Utc::now()), Duration::ZERO).await?;
            tx.commit().await
        }
        .await
    )?;
    b.durable().await
}

/// Adds what a job spent to its trigger's and agent's daily budgets.
pub(super) async fn record_spend<B: Backend>(
    b: &B,
    spec: &crate::rules::JobSpec,
    usd: f64,
    now: chrono::DateTime<Utc>,
) -> Result<(), StoreError> {
    let keys: Vec<String> = admission::budget_keys(spec).into_iter().map(|k| k.key).collect();
    retrying!(
        async {
            let mut tx = b.begin(false).await?;
            let stored = tx.throttles(&keys).await?;
            tx.apply(admission::spend(&stored, spec, usd, now), Duration::ZERO).await?;
            tx.commit().await
        }
        .await
    )?;
    b.durable().await
}

/// Expires the holds on `subject` older than `cutoff` (see
/// `approval::expire`): the job that tells the subject, with what its end
/// puts in the outbox, is written with them.
pub(super) async fn expire_held<B: Backend>(
    b: &B,
    subject: &str,
    cutoff: chrono::DateTime<Utc>,
    held_for: &str,
    outbox: &dyn crate::domain::PlanOutbox,
) -> Result<Option<String>, StoreError> {
    let told = retrying!(
        async {
            let mut tx = b.begin(false).await?;
            let held = tx.held(subject).await?;
            let ids: Vec<String> = held.iter().map(|p| crate::domain::job_id(&p.delivery, &p.spec.trigger)).collect();
            let exists = tx.existing(&ids).await?;
            let seq = tx.numbers(1).await?.first().copied().unwrap_or(0);
            let now = Utc::now();
            let (mut plan, job) =
                approval::expire(subject, &held, cutoff, held_for, |id| exists.contains(id), seq, now);
            if plan.is_empty() {
                return Ok(None);
            }
            if let Some(job) = &job {
                plan.extend(outbox.at_end(job).into_iter().map(|p| Write::Outbox(Box::new(p))));
            }
            tx.apply(plan, Duration::ZERO).await?;
            tx.commit().await?;
            Ok(job.map(|j| j.id))
        }
        .await
    )?;
    b.durable().await?;
    Ok(told)
}

/// Releases the jobs held on `subject` that `approval` covers (see
/// `approval::approve`); `head` is the pull request's head now, if known.
pub(super) async fn approve<B: Backend>(
    b: &B,
    subject: &str,
    head: Option<&str>,
    approval: &Approval,
    may_approve: &(dyn Fn(&Held) -> bool + Sync),
) -> Result<Vec<String>, StoreError> {
    let started = retrying!(
        async {
            let mut tx = b.begin(false).await?;
            let held = tx.held(subject).await?;
            let ids: Vec<String> = held.iter().map(|p| crate::domain::job_id(&p.delivery, &p.spec.trigger)).collect();
            let exists = tx.existing(&ids).await?;
            let mut numbers = tx.numbers(held.len()).await?.into_iter();
            let (started, plan) = approval::approve(
                subject,
                &held,
                head,
                approval,
                may_approve,
                |id| exists.contains(id),
                || numbers.next().unwrap_or(0),
                Utc::now(),
            );
            tx.apply(plan, Duration::ZERO).await?;
            tx.commit().await?;
            Ok(started)
        }
        .await
    )?;
    b.durable().await?;
    Ok(started)
}
