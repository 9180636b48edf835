//! The store: deliveries, jobs, the queue and the publication outbox, behind
//! one seam with two backends — an embedded database (sled), the default; PostgreSQL, for
//! several replicas. Only this module touches a database, and nothing
//! outside it knows which one is in use.
//!
//! The store holds no policy. Each change is a domain policy's plan
//! (`crate::domain`), computed from the records it reads and applied in one
//! transaction, made durable before the caller is told it happened: a
//! delivery and all its jobs are written together, so a 2xx can never stand
//! for half of them.

mod commit;
mod embedded;
mod ops;
mod postgres;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::domain::Admission;
pub use crate::domain::{job_id, Accepted, Admitted, Delivery, Job, JobState, Limits, Outcome};
pub use crate::domain::{
    Approval, Attempt, Held, Phases, Publication, PublicationState, PublicationSummary, Purpose, QueueEntry, Skipped,
    Target, Usage,
};
use crate::rules::JobSpec;
pub use commit::Durability;
pub use postgres::schema;

/// What went wrong in the store, with the path when it is about opening it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // Not `source`: the message already says why, and a source would have
    // it said twice wherever the error's chain is printed.
    #[error("cannot open store at {path}: {reason}")]
    Open { path: PathBuf, reason: Box<dyn std::error::Error + Send + Sync> },
    /// The database failed a read or a write, in its own words.
    #[error("store error: {0}")]
    Database(Box<dyn std::error::Error + Send + Sync>),
    /// The database is failing or out of reach for now: try again later.
    #[error("database: {0}")]
    Unavailable(String),
    /// Another transaction got in the way; the same one run again may pass.
    #[error("database: {0}")]
    Conflict(String),
    #[error("cannot reach the database at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("corrupt record in tree {tree}, key {key}: {source}")]
    Corrupt { tree: &'static str, key: String, source: serde_json::Error },
    #[error("flushing the store to disk failed")]
    Flush,
    #[error("the store is closed")]
    Closed,
    /// One failure shared by every delivery of a batch (see `writer`).
    #[error("{0}")]
    Batch(String),
    #[error("job {0} not found")]
    NoSuchJob(String),
    #[error("job {0} is no longer this replica's: another took it back")]
    LeaseLost(String),
    #[error("job {id} is {state}, not {expected}")]
    WrongState { id: String, state: JobState, expected: &'static str },
}

impl StoreError {
    /// The same failure again, for the next one who must hear of it.
    fn again(&self) -> StoreError {
        match self {
            StoreError::Flush => StoreError::Flush,
            StoreError::Closed => StoreError::Closed,
            other => StoreError::Batch(other.to_string()),
        }
    }

    /// Whether the transaction failed only because another got in its way.
    fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }

    /// Whether the database is unreachable or failing (a 503, not a 500).
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_)
                | StoreError::Conflict(_)
                | StoreError::Unreachable { .. }
                | StoreError::Flush
                | StoreError::Closed
                | StoreError::Batch(_)
        )
    }
}

/// Which database, from `[storage]`.
#[derive(Debug, Clone)]
pub enum Location {
    Sled { path: PathBuf, durability: Durability },
    Redb { path: PathBuf, durability: Durability },
    Postgres { url: String, schema: Option<String>, replica: String },
}

#[derive(Clone)]
enum Backend {
    Embedded(embedded::EmbeddedStore),
    Postgres(postgres::PgStore),
}

/// The store, whichever backend holds it.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
    /// The local folder (jobs' logs and workspaces live beside the database
    /// for sled; on PostgreSQL they are this replica's own).
    path: PathBuf,
}

/// Runs the same call on whichever backend is in use; embedded reads are
/// synchronous, so its arm takes the `.await` only where it has one.
macro_rules! on {
    ($self:ident, $b:ident => $sled:expr, $pg:expr) => {
        match &*$self.backend {
            Backend::Embedded($b) => $sled,
            Backend::Postgres($b) => $pg,
        }
    };
}

/// Runs the same code on whichever backend is in use.
macro_rules! each {
    ($self:ident, $b:ident => $body:expr) => {
        match &*$self.backend {
            Backend::Embedded($b) => $body,
            Backend::Postgres($b) => $body,
        }
    };
}

impl Location {
    /// Where `[storage]` says the store is.
    pub fn of(config: &crate::config::Config) -> Location {
        let s = &config.storage;
        match (s.backend, &s.url) {
            (crate::config::Backend::Postgres, Some(url)) => Location::Postgres {
                url: url.expose().to_string(),
                schema: s.schema.clone(),
                replica: s.replica.clone(),
            },
            (crate::config::Backend::Sled, _) => Location::Sled { path: s.path.clone(), durability: s.durability },
            _ => Location::Redb { path: s.path.clone(), durability: s.durability },
        }
    }
}

impl Store {
    /// Opens (or creates) an embedded store in `path`: the one there, or a
    /// new redb one (see `config::Backend::found_in`).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, Durability::Fsync)
    }

    pub fn open_with(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        let sled = crate::config::Backend::found_in(path) == crate::config::Backend::Sled;
        let store = if sled {
            embedded::EmbeddedStore::open_sled(path, durability)?
        } else {
            embedded::EmbeddedStore::open_redb(path, durability)?
        };
        Ok(Store { backend: Arc::new(Backend::Embedded(store)), path: path.to_path_buf() })
    }

    /// `baton migrate --from sled`: copies the sled store in `path` into a
    /// redb store there (see `EmbeddedStore::migrate_from_sled`).
    pub fn migrate_from_sled(path: &Path) -> Result<Vec<TableSize>, StoreError> {
        embedded::EmbeddedStore::migrate_from_sled(path)
    }

    /// Opens the store `[storage]` names; `path` is the local folder. On
    /// PostgreSQL the schema is brought up to date first (under a lock, so
    /// replicas starting together migrate once).
    pub async fn connect(location: &Location, path: &Path) -> Result<Store, StoreError> {
        match location {
            Location::Sled { path, durability } => {
                let store = embedded::EmbeddedStore::open_sled(path, *durability)?;
                Ok(Store { backend: Arc::new(Backend::Embedded(store)), path: path.clone() })
            }
            Location::Redb { path, durability } => {
                let store = embedded::EmbeddedStore::open_redb(path, *durability)?;
                Ok(Store { backend: Arc::new(Backend::Embedded(store)), path: path.clone() })
            }
            Location::Postgres { url, schema, replica } => {
                let pg = postgres::PgStore::connect(url, schema.as_deref(), replica).await?;
                Ok(Store { backend: Arc::new(Backend::Postgres(pg)), path: path.to_path_buf() })
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wakes `queue` when another replica queues or frees a job, and
    /// `outbox` when one writes a publication (a no-op on sled, where every
    /// writer is in this process and wakes them itself).
    pub fn listen(
        &self,
        queue: Arc<tokio::sync::Notify>,
        outbox: Arc<tokio::sync::Notify>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        on!(self, b => { let _ = (queue, outbox, stop, b); None }, Some(b.listen(queue, outbox, stop)))
    }

    /// At shutdown: makes every write durable and stops the store's own
    /// tasks (PostgreSQL's batch writers), waiting for them.
    pub async fn close(&self) -> Result<(), StoreError> {
        on!(self, b => b.flush().await, { b.close().await; Ok(()) })
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        on!(self, b => b.flush().await, { let _ = b; Ok(()) })
    }

    /// Stores a delivery with the jobs its event created, atomically and
    /// durably (batched with concurrent deliveries). A delivery id seen
    /// before writes nothing and answers `Duplicate`.
    ///
    /// The payload itself is not kept: each job carries what it needs (its
    /// rendered prompt and workspace).
    pub async fn accept(&self, delivery: Delivery, specs: Vec<JobSpec>) -> Result<Accepted, StoreError> {
        self.accept_with(delivery, specs, Vec::new(), None).await
    }

    /// `accept`, also holding `pending` jobs (from people the trigger does
    /// not trust) until someone trusted approves them on their issue or PR.
    pub async fn accept_with(
        &self,
        delivery: Delivery,
        specs: Vec<JobSpec>,
        pending: Vec<JobSpec>,
        subject_text: Option<String>,
    ) -> Result<Accepted, StoreError> {
        let now = Utc::now();
        let mut jobs: Vec<Job> = Vec::with_capacity(specs.len());
        for spec in specs {
            let id = job_id(&delivery.id, &spec.trigger);
            if jobs.iter().any(|j| j.id == id) {
                continue;
            }
            // The backend numbers the jobs (`seq`) as it stores them.
            jobs.push(Job::new(id, 0, delivery.id.clone(), spec, now));
        }
        let held = pending
            .into_iter()
            .filter_map(|spec| {
                let key = crate::domain::subject_key(spec.repo.as_deref()?, spec.subject?);
                let text = subject_text.clone();
                Some((key, Held { delivery: delivery.id.clone(), held_at: now, spec, text }))
            })
            .collect();
        let admission = Admission { delivery, jobs, held, now };
        each!(self, b => b.admit(admission).await)
    }

    /// Forgets deliveries received before `cutoff` (their ids count as new
    /// again), in small batches so ingress never waits on a long prune.
    /// Jobs stay; a redelivery cannot double them, since job ids derive from
    /// the delivery id. Returns how many were pruned.
    pub async fn prune_deliveries(&self, cutoff: chrono::DateTime<Utc>) -> Result<usize, StoreError> {
        each!(self, b => b.prune_deliveries(cutoff).await)
    }

    /// Forgets finished jobs that ended before `cutoff`, oldest first, at most
    /// `max` of them: their record, index entry and outbox entries. Never a
    /// queued or running job, nor one whose end has not gone through the
    /// rules or whose publications are still pending. Returns the ids
    /// forgotten, so their folders can go too.
    pub(crate) async fn prune_jobs(
        &self,
        cutoff: chrono::DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        each!(self, b => b.prune_jobs(cutoff, max).await)
    }

    /// Records that baton asked GitHub to redeliver `guid`; `false` when it
    /// (or another replica) had already asked: catch-up asks once.
    pub(crate) async fn note_redelivery(&self, guid: &str) -> Result<bool, StoreError> {
        each!(self, b => b.note_redelivery(guid).await)
    }

    pub async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        on!(self, b => b.delivery(id), b.delivery(id).await)
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        on!(self, b => b.job(id), b.job(id).await)
    }

    /// Jobs newest first, filtered.
    pub async fn list_jobs(&self, q: &JobQuery) -> Result<Vec<Job>, StoreError> {
        on!(self, b => b.list_jobs(q), b.list_jobs(q).await)
    }

    /// Queued jobs in queue order.
    pub async fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        on!(self, b => b.queued(), b.queued().await)
    }

    /// How many jobs are queued (a count, not a read of the queue).
    pub async fn queue_len(&self) -> Result<usize, StoreError> {
        on!(self, b => Ok(b.queue_len()), b.queue_len().await)
    }

    /// Claims the next queued job `limits` allow, in priority and arrival
    /// order: it leaves the queue and becomes `running` with a new attempt
    /// and a lease, and takes its concurrency group, in one transaction.
    /// The limits are checked against every replica's running jobs.
    pub async fn claim_next(&self, limits: &Limits, lease: Duration) -> Result<Option<Job>, StoreError> {
        each!(self, b => ops::claim_next(b, limits, lease).await)
    }

    /// Jobs running here that must be cancelled (a newer job of their group,
    /// or a cancel asked on another replica), with who asked; each once.
    pub(crate) async fn take_cancels(&self) -> Result<Vec<(String, String)>, StoreError> {
        on!(self, b => b.take_cancels(), b.take_cancels().await)
    }

    /// Asks whichever replica runs `id` to cancel it.
    pub(crate) async fn request_cancel(&self, id: &str, by: &str) -> Result<(), StoreError> {
        each!(self, b => b.request_cancel(id, by).await)
    }

    /// Writes a job record as it is now (progress inside a state).
    pub(crate) async fn save(&self, job: &Job) -> Result<(), StoreError> {
        each!(self, b => ops::save(b, job).await)
    }

    /// Stores a job that has ended (or goes back to the queue for another
    /// attempt), with its publications, atomically and durably. Only the
    /// replica holding the job's lease may: `LeaseLost` otherwise.
    pub async fn finish(&self, job: &Job, publications: &[Publication]) -> Result<(), StoreError> {
        each!(self, b => ops::finish(b, job, publications, true).await)
    }

    /// Writes a running job with the publications of its start, durably.
    pub(crate) async fn start_publications(&self, job: &Job, publications: &[Publication]) -> Result<(), StoreError> {
        each!(self, b => ops::start_publications(b, job, publications).await)
    }

    /// Cancels a queued job at once; `None` when it is not queued (a
    /// running job is its worker's to stop).
    pub async fn cancel_queued(&self, id: &str, reason: &str) -> Result<Option<Job>, StoreError> {
        let Some(job) = self.job(id).await? else {
            return Err(StoreError::NoSuchJob(id.to_string()));
        };
        let group = job.spec.concurrency.as_deref();
        each!(self, b => ops::cancel_queued(b, id, group, reason).await)
    }

    /// Puts a finished job back in the queue for a fresh run.
    pub async fn retry(&self, id: &str) -> Result<Job, StoreError> {
        let Some(mut job) = self.job(id).await? else {
            return Err(StoreError::NoSuchJob(id.to_string()));
        };
        if !job.state.is_final() {
            return Err(StoreError::WrongState { id: id.to_string(), state: job.state, expected: "finished" });
        }
        job.requeue_fresh();
        // A finished job holds no lease.
        each!(self, b => ops::finish(b, &job, &[], false).await)?;
        Ok(job)
    }

    /// Extends a running job's lease; `false` when this replica no longer
    /// holds it (the job ended, or another replica took it back).
    pub async fn renew_lease(&self, id: &str, lease: Duration) -> Result<bool, StoreError> {
        on!(self, b => b.renew_lease(id, lease), b.renew_lease(id, lease).await)
    }

    /// Running jobs whose lease ran out (their worker stopped renewing, or
    /// their replica died), each handed to one replica only.
    pub async fn expired_leases(&self, lease: Duration) -> Result<Vec<String>, StoreError> {
        on!(self, b => { let _ = lease; b.expired_leases() }, b.take_expired(lease).await)
    }

    /// Jobs this replica left `running` when it stopped.
    pub async fn running(&self) -> Result<Vec<Job>, StoreError> {
        on!(self, b => b.running(), b.running().await)
    }

    /// Whether job `job`'s publication for `purpose` is still in the outbox.
    pub(crate) async fn publication_pending(&self, job: &str, purpose: Purpose) -> Result<bool, StoreError> {
        on!(self, b => b.publication_pending(job, purpose), b.publication_pending(job, purpose).await)
    }

    /// Publications not yet delivered that this replica may send now: on
    /// PostgreSQL each is leased to one replica at a time.
    pub async fn outbox(&self) -> Result<Vec<Publication>, StoreError> {
        on!(self, b => b.outbox(), b.outbox().await)
    }

    /// Records a publication attempt; a final one leaves the outbox and its
    /// outcome is written onto the job, in one transaction. `created` counts
    /// a new comment or pull request against the job's caps.
    pub(crate) async fn update_publication(&self, p: &Publication, created: bool) -> Result<(), StoreError> {
        each!(self, b => ops::update_publication(b, p, created).await)
    }

    /// Jobs whose end still has to go back through the rules.
    pub async fn pending_ends(&self) -> Result<Vec<String>, StoreError> {
        on!(self, b => b.pending_ends(), b.pending_ends().await)
    }

    /// A job's end went through the rules (and what it started is stored).
    pub async fn end_handled(&self, id: &str) -> Result<(), StoreError> {
        on!(self, b => b.end_handled(id), b.end_handled(id).await)
    }

    /// Notes a pull request's head as of `updated_at` (GitHub's RFC 3339
    /// time, which orders as text): only ever forward, so an older event
    /// arriving late cannot move the head back to a replaced commit.
    /// Returns the commit the head moved from, when it moved to another.
    pub async fn set_head(
        &self,
        repo: &str,
        number: u64,
        head: &PrHead,
        updated_at: &str,
    ) -> Result<Option<String>, StoreError> {
        on!(self, b => b.set_head(repo, number, head, updated_at), b.set_head(repo, number, head, updated_at).await)
    }

    /// The head noted for a pull request.
    pub async fn head(&self, repo: &str, number: u64) -> Result<Option<String>, StoreError> {
        Ok(self.pr_head(repo, number).await?.map(|h| h.sha))
    }

    /// The head noted for a pull request, and whether it lives in the
    /// repository or a fork (when the event said).
    pub async fn pr_head(&self, repo: &str, number: u64) -> Result<Option<PrHead>, StoreError> {
        on!(self, b => b.pr_head(repo, number), b.pr_head(repo, number).await)
    }

    /// Counts `usd` an attempt of a `spec` job spent, against the rolling
    /// day's budgets (all agents', its trigger's, its repository's).
    pub async fn record_spend(&self, spec: &JobSpec, usd: f64) -> Result<(), StoreError> {
        let now = Utc::now();
        each!(self, b => ops::record_spend(b, spec, usd, now).await)
    }

    /// What baton remembers under `key` between jobs (see `Note`).
    pub async fn note(&self, key: &Note) -> Result<Option<serde_json::Value>, StoreError> {
        let key = key.to_string();
        on!(self, b => b.note(&key), b.note(&key).await)
    }

    /// Remembers `value` under `key`, durably.
    pub async fn set_note(&self, key: &Note, value: &serde_json::Value) -> Result<(), StoreError> {
        let key = key.to_string();
        each!(self, b => b.set_note(&key, value).await)
    }

    /// Forgets what is noted under `keys`, durably.
    pub async fn forget_notes(&self, keys: &[Note]) -> Result<(), StoreError> {
        let keys: Vec<String> = keys.iter().map(Note::to_string).collect();
        each!(self, b => b.forget_notes(&keys).await)
    }

    /// Forgets the notes and pull request heads not written or read since
    /// `cutoff` (`job_retention` ago): what baton remembers of a pull
    /// request lives as long as the jobs about it would. Returns how many.
    pub async fn prune_notes(&self, cutoff: chrono::DateTime<Utc>) -> Result<usize, StoreError> {
        each!(self, b => b.prune_notes(cutoff).await)
    }

    /// Slow housekeeping the backend keeps out of its open, run in the
    /// background by the daemon (on sled: measuring how much of its files
    /// is dead, for the next open to compact them).
    pub async fn upkeep(&self) -> Result<(), StoreError> {
        on!(self, b => b.upkeep().await, { let _ = b; Ok(()) })
    }

    /// Adds one to the count under `key` and returns the new count, durably
    /// and atomically (two replicas counting at once count two).
    pub async fn count_up(&self, key: &Note) -> Result<u64, StoreError> {
        let key = key.to_string();
        each!(self, b => b.count_up(&key).await)
    }

    /// Jobs held on an issue or PR for approval.
    pub async fn pending(&self, repo: &str, number: u64) -> Result<Vec<Held>, StoreError> {
        on!(self, b => b.pending(repo, number), b.pending(repo, number).await)
    }

    /// A trusted person approved what waits on this issue or PR (see
    /// `domain::approval::approve`). Returns the new job ids.
    pub async fn approve(
        &self,
        repo: &str,
        number: u64,
        approval: &Approval,
        may_approve: impl Fn(&Held) -> bool + Send + Sync,
    ) -> Result<Vec<String>, StoreError> {
        let subject = crate::domain::subject_key(repo, number);
        let head = self.pr_head(repo, number).await?.map(|h| h.sha);
        each!(self, b => ops::approve(b, &subject, head.as_deref(), approval, &may_approve).await)
    }

    /// Every issue or pull request with jobs held for approval, and them.
    pub async fn held_all(&self) -> Result<Vec<(String, Vec<Held>)>, StoreError> {
        on!(self, b => b.held_all(), b.held_all().await)
    }

    /// Expires the jobs held since before `cutoff` (`limits.held_for`,
    /// spelled `held_for`, ago): each subject where some expired gets one
    /// cancelled job saying so, which `outbox` posts as a comment there.
    /// Returns those jobs' ids.
    pub async fn expire_held(
        &self,
        cutoff: chrono::DateTime<Utc>,
        held_for: &str,
        outbox: &dyn crate::domain::PlanOutbox,
    ) -> Result<Vec<String>, StoreError> {
        let mut told = Vec::new();
        for (subject, held) in self.held_all().await? {
            if held.iter().any(|h| h.held_at < cutoff) {
                if let Some(id) = each!(self, b => ops::expire_held(b, &subject, cutoff, held_for, outbox).await)? {
                    told.push(id);
                }
            }
        }
        Ok(told)
    }

    /// Records a running agent's process, as this replica's.
    pub(crate) async fn note_agent<T: serde::Serialize>(&self, job: &str, process: &T) -> Result<(), StoreError> {
        let value = serde_json::to_value(process).unwrap_or_default();
        on!(self, b => b.note_agent(job, &value), b.note_agent(job, &value).await)
    }

    pub(crate) async fn forget_agent(&self, job: &str) -> Result<(), StoreError> {
        on!(self, b => b.forget_agent(job), b.forget_agent(job).await)
    }

    /// Agents this replica recorded as running, by job.
    pub async fn agents<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        let raw = on!(self, b => b.agents()?, b.agents().await?);
        Ok(raw.into_iter().filter_map(|(job, v)| Some((job, serde_json::from_value(v).ok()?))).collect())
    }

    /// When a schedule trigger last fired.
    pub(crate) async fn schedule_last(&self, trigger: &str) -> Result<Option<chrono::DateTime<Utc>>, StoreError> {
        on!(self, b => b.schedule_last(trigger), b.schedule_last(trigger).await)
    }

    pub async fn set_schedule_last(&self, trigger: &str, at: chrono::DateTime<Utc>) -> Result<(), StoreError> {
        each!(self, b => b.set_schedule_last(trigger, at).await)
    }

    /// Whether job logs should be shipped here (`append_log`): a database
    /// that several replicas share serves each job's log to all of them.
    pub(crate) fn ships_logs(&self) -> bool {
        matches!(*self.backend, Backend::Postgres(_))
    }

    /// Appends a chunk of a job's log at `offset`, for the API of other
    /// replicas (a no-op on sled: the log file is the only copy needed).
    pub(crate) async fn append_log(&self, job: &str, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        on!(self, b => { let _ = (job, offset, bytes, b); Ok(()) }, b.append_log(job, offset, bytes).await)
    }

    /// A job's log from `offset`, as another replica shipped it; `None`
    /// when the store keeps no logs (sled) or has none for the job.
    pub(crate) async fn read_log(&self, job: &str, offset: u64) -> Result<Option<Vec<u8>>, StoreError> {
        on!(self, b => { let _ = (job, offset, b); Ok(None) }, b.read_log(job, offset).await)
    }

    /// Bytes the database takes on disk (sled; 0 for PostgreSQL, whose
    /// size is the database server's to report).
    pub fn size_on_disk(&self) -> u64 {
        on!(self, b => b.size_on_disk(), { let _ = b; 0 })
    }

    /// Disk flushes done since the store was opened (embedded).
    pub fn flushes(&self) -> u64 {
        on!(self, b => b.flushes(), { let _ = b; 0 })
    }

    /// With `durability = "os"`: engine writes the background flush has not
    /// yet made durable (embedded; 0 otherwise).
    pub fn unflushed_writes(&self) -> u64 {
        on!(self, b => b.unflushed(), { let _ = b; 0 })
    }

    /// Every table (sled: tree) with its records and their bytes: a full
    /// scan, for soak tests and tools, never a hot path. On PostgreSQL the
    /// bytes are the table's size on disk, indexes and TOAST included.
    pub async fn census(&self) -> Result<Vec<TableSize>, StoreError> {
        on!(self, b => b.census(), b.census().await)
    }

    /// Counts every job: a full scan, for tests and tools, not hot paths.
    pub async fn job_count(&self) -> Result<usize, StoreError> {
        on!(self, b => Ok(b.job_count()), b.job_count().await)
    }
}

/// One table of the store, as `Store::census` counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSize {
    pub name: String,
    pub records: u64,
    pub bytes: u64,
}

/// What baton remembers about a pull request between its jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// How many repairs (`push` answering a failed check) baton pushed.
    Repairs { repo: String, number: u64 },
    /// Whether baton already said it stopped repairing.
    RepairsStopped { repo: String, number: u64 },
    /// The last commit baton pushed to the pull request's branch: a head
    /// that moves to any other commit was moved by a person.
    Pushed { repo: String, number: u64 },
    /// What a review trigger last reviewed: the head and its findings.
    Reviewed { repo: String, number: u64, trigger: String },
    /// The comments of a review thread baton has seen, by its first comment.
    Thread { repo: String, root: u64 },
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::Repairs { repo, number } => write!(f, "repairs\u{1f}{}", crate::domain::subject_key(repo, *number)),
            Note::RepairsStopped { repo, number } => {
                write!(f, "repairs-stopped\u{1f}{}", crate::domain::subject_key(repo, *number))
            }
            Note::Pushed { repo, number } => write!(f, "pushed\u{1f}{}", crate::domain::subject_key(repo, *number)),
            Note::Thread { repo, root } => write!(f, "thread\u{1f}{repo}\u{1f}{root}"),
            Note::Reviewed { repo, number, trigger } => {
                write!(f, "reviewed\u{1f}{}\u{1f}{trigger}", crate::domain::subject_key(repo, *number))
            }
        }
    }
}

/// A pull request's head as its last event showed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrHead {
    pub sha: String,
    /// In the repository itself (`true`) or a fork (`false`).
    pub in_repo: Option<bool>,
    /// The head branch, and the repository it lives in (`owner/name`).
    pub branch: Option<String>,
    pub repo: Option<String>,
    /// Whether a fork's author lets maintainers push to the branch.
    pub maintainer_can_modify: Option<bool>,
}

/// A noted head as stored, a field per line: `sha`, `updated_at`,
/// `repo|fork|`, branch, head repository, `edit|noedit|` (a head noted by
/// an older version has fewer lines, down to the sha alone).
fn encode_head(head: &PrHead, updated_at: &str) -> String {
    let flag = |v: Option<bool>, yes: &'static str, no: &'static str| match v {
        Some(true) => yes,
        Some(false) => no,
        None => "",
    };
    format!(
        "{}\n{updated_at}\n{}\n{}\n{}\n{}",
        head.sha,
        flag(head.in_repo, "repo", "fork"),
        head.branch.as_deref().unwrap_or_default(),
        head.repo.as_deref().unwrap_or_default(),
        flag(head.maintainer_can_modify, "edit", "noedit"),
    )
}

/// The head and the `updated_at` it was noted at.
fn decode_head(text: &str) -> (PrHead, String) {
    let mut parts = text.split('\n');
    let mut next = || parts.next().unwrap_or_default().to_string();
    let sha = next();
    let updated_at = next();
    let flag = |v: String, yes: &str, no: &str| match v.as_str() {
        x if x == yes => Some(true),
        x if x == no => Some(false),
        _ => None,
    };
    let in_repo = flag(next(), "repo", "fork");
    let some = |v: String| Some(v).filter(|v| !v.is_empty());
    let branch = some(next());
    let repo = some(next());
    let maintainer_can_modify = flag(next(), "edit", "noedit");
    (PrHead { sha, in_repo, branch, repo, maintainer_can_modify }, updated_at)
}

/// Filters for listing jobs.
#[derive(Debug, Default, Clone)]
pub struct JobQuery {
    pub delivery: Option<String>,
    pub state: Option<JobState>,
    pub trigger: Option<String>,
    pub repo: Option<String>,
    /// Only the children of this job (`[job] delegate`).
    pub parent: Option<String>,
    pub limit: usize,
    /// Only jobs created before this one (its `seq`): the page after it.
    pub before: Option<u64>,
}

impl JobQuery {
    fn matches(&self, j: &Job) -> bool {
        self.state.is_none_or(|s| j.state == s)
            && self.trigger.as_ref().is_none_or(|t| &j.trigger == t)
            && self.repo.as_ref().is_none_or(|r| j.repo.as_ref() == Some(r))
            && self.parent.as_ref().is_none_or(|p| j.parent.as_ref() == Some(p))
    }

    /// A delivery's jobs as a page: newest first, filtered, cut.
    fn finish(&self, mut jobs: Vec<Job>) -> Vec<Job> {
        jobs.sort_by_key(|j| std::cmp::Reverse(j.seq));
        jobs.retain(|j| self.matches(j) && self.before.is_none_or(|b| j.seq < b));
        jobs.truncate(self.limit);
        jobs
    }
}

/// Catch-up of missed webhook deliveries asks the store what it holds.
impl crate::forge::Deliveries for Store {
    async fn holds(&self, delivery: &str) -> Result<bool, String> {
        Ok(self.delivery(delivery).await.map_err(|e| e.to_string())?.is_some())
    }

    async fn note_redelivery(&self, delivery: &str) -> Result<bool, String> {
        Store::note_redelivery(self, delivery).await.map_err(|e| e.to_string())
    }
}
