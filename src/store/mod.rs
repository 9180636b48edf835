//! The embedded store (sled): deliveries, jobs, the job queue and the
//! publication outbox. Only this module touches the database.
//!
//! Every change that must survive a crash is one sled transaction followed by
//! a flush before the caller is told it happened: a delivery and all its jobs
//! are written together, so a 2xx can never stand for half of them.

mod commit;
mod records;
mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::Tree;

use crate::rules::{JobSpec, OnConflict};
pub use commit::Durability;
pub use records::{
    Approval, Attempt, Delivery, Job, JobState, Outcome, Phases, Progress, Publication, PublicationState,
    PublicationSummary, Purpose, Skipped, Target,
};

/// What went wrong in the store, with the path when it is about opening it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
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
}

/// The outcome of storing a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored, with the jobs it created and the matches it skipped.
    New(Admitted),
    /// A delivery with this id was stored before; nothing was written.
    Duplicate,
    /// The same event and body came before under another delivery id
    /// (within the delivery retention): a replay; nothing was written.
    Replay { of: String },
}

/// Jobs waiting in one concurrency group with `on_conflict = "queue"`, at most.
const MAX_GROUP_QUEUE: usize = 50;

/// Who holds a concurrency group, and who waits for it.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct GroupState {
    running: Option<String>,
    /// (job id, queue sequence), in order.
    waiting: Vec<(String, u64)>,
}

type TxTree = sled::transaction::TransactionalTree;
type TxError = sled::transaction::UnabortableTransactionError;

fn group_state(groups: &TxTree, group: &str) -> Result<GroupState, TxError> {
    Ok(groups.get(group.as_bytes())?.and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default())
}

/// A new job joins its concurrency group under its trigger's `on_conflict`.
/// Returns the job as dropped (cancelled) when the policy turns it away;
/// waiting jobs it replaces are cancelled, and a running one it supersedes is
/// marked for the engine to cancel.
fn join_group(
    groups: &TxTree,
    jobs: &TxTree,
    queue: QueueTx<'_>,
    cancels: &TxTree,
    group: &str,
    job: &Job,
    now: chrono::DateTime<Utc>,
) -> Result<Option<Job>, TxError> {
    let mut st = group_state(groups, group)?;
    let busy = st.running.clone().or_else(|| st.waiting.first().map(|(w, _)| w.clone()));
    let drop_with = |why: String| {
        let mut dropped = job.clone();
        dropped.end(JobState::Cancelled, None, Some(why), now);
        dropped.displaced_by = busy.clone();
        dropped
    };
    match job.spec.on_conflict {
        OnConflict::Skip if busy.is_some() => {
            let holder = busy.clone().unwrap_or_default();
            return Ok(Some(drop_with(format!(
                "dropped: concurrency group `{group}` is busy with job {holder} (on_conflict = skip)"
            ))));
        }
        OnConflict::Queue if st.waiting.len() >= MAX_GROUP_QUEUE => {
            return Ok(Some(drop_with(format!(
                "dropped: {MAX_GROUP_QUEUE} jobs already wait in concurrency group `{group}`"
            ))));
        }
        OnConflict::ReplacePending | OnConflict::CancelInProgress => {
            for (waiting, _seq) in std::mem::take(&mut st.waiting) {
                if let Some(bytes) = jobs.get(waiting.as_bytes())? {
                    if let Ok(mut old) = serde_json::from_slice::<Job>(&bytes) {
                        if old.state == JobState::Queued {
                            old.end(JobState::Cancelled, None, Some(format!("replaced by job {}", job.id)), now);
                            old.displaced_by = Some(job.id.clone());
                            jobs.insert(waiting.as_bytes(), encode(&old))?;
                            queue.remove(&queue_key(&old), old.repo.as_deref())?;
                        }
                    }
                }
            }
            if job.spec.on_conflict == OnConflict::CancelInProgress {
                if let Some(running) = &st.running {
                    cancels.insert(running.as_bytes(), job.id.as_bytes())?;
                }
            }
        }
        _ => {}
    }
    st.waiting.push((job.id.clone(), job.seq));
    groups.insert(group.as_bytes(), encode(&st))?;
    Ok(None)
}

/// A delivery and its jobs, ready for the writer thread.
struct Admission {
    delivery: Delivery,
    /// `delivery_times` key: received-at millis ++ delivery id.
    time_key: Vec<u8>,
    jobs: Vec<Job>,
    /// `jobs`, encoded outside the transaction (which may run again).
    encoded: Vec<Vec<u8>>,
    held: Vec<(Vec<u8>, Pending)>,
    now: chrono::DateTime<Utc>,
}

/// The trees admitting a delivery writes.
#[derive(Clone)]
struct AdmitTrees {
    deliveries: Tree,
    delivery_times: Tree,
    jobs: Tree,
    job_index: Tree,
    queue: Tree,
    queue_by_repo: Tree,
    throttle: Tree,
    approvals: Tree,
    groups: Tree,
    cancels: Tree,
}

impl AdmitTrees {
    /// Admits a batch in one transaction, in order: each delivery sees the
    /// ones before it (a duplicate within the batch is a duplicate).
    fn apply(&self, batch: &[Admission]) -> Result<Vec<Accepted>, StoreError> {
        let trees = (
            &self.deliveries,
            &self.delivery_times,
            &self.jobs,
            &self.job_index,
            &self.queue,
            &self.queue_by_repo,
            &self.throttle,
            &self.approvals,
            &self.groups,
            &self.cancels,
        );
        flatten(trees.transaction(|t| batch.iter().map(|a| Ok(admit(t, a)?)).collect::<TxResult<Vec<_>>>()))
    }
}

type AdmitTx = (TxTree, TxTree, TxTree, TxTree, TxTree, TxTree, TxTree, TxTree, TxTree, TxTree);

/// One delivery's writes, inside the batch's transaction.
fn admit(t: &AdmitTx, a: &Admission) -> Result<Accepted, TxError> {
    let (deliveries, times, job_tree, index, queue, by_repo, throttle, approvals, groups, cancels) = t;
    let queue = QueueTx { queue, by_repo };
    let (key, now) = (a.delivery.id.as_bytes(), a.now);
    if deliveries.get(key)?.is_some() {
        return Ok(Accepted::Duplicate);
    }
    let body_key = a.delivery.fingerprint.as_deref().map(body_key);
    if let Some(body_key) = &body_key {
        if let Some(first) = deliveries.get(body_key.as_slice())? {
            return Ok(Accepted::Replay { of: String::from_utf8_lossy(&first).into_owned() });
        }
    }
    for (subject, p) in &a.held {
        let mut list: Vec<Pending> =
            approvals.get(subject)?.and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default();
        list.retain(|old| !(old.delivery == p.delivery && old.spec.trigger == p.spec.trigger));
        list.push(p.clone());
        // An outsider cannot grow this without bound.
        if list.len() > MAX_PENDING {
            list.drain(..list.len() - MAX_PENDING);
        }
        approvals.insert(subject.as_slice(), encode(&list))?;
    }
    let mut record = a.delivery.clone();
    for (job, bytes) in a.jobs.iter().zip(&a.encoded) {
        if let Some(reason) = throttled(throttle, &job.spec, now)? {
            record.skipped.push(Skipped { trigger: job.trigger.clone(), reason });
            continue;
        }
        record.jobs.push(job.id.clone());
        // A job id already present (its delivery was pruned and is now
        // redelivered) is never doubled.
        if job_tree.get(job.id.as_bytes())?.is_some() {
            continue;
        }
        index.insert(&seq_key(job.seq), job.id.as_bytes())?;
        if let Some(group) = &job.spec.concurrency {
            if let Some(dropped) = join_group(groups, job_tree, queue, cancels, group, job, now)? {
                job_tree.insert(job.id.as_bytes(), encode(&dropped))?;
                continue;
            }
        }
        job_tree.insert(job.id.as_bytes(), bytes.as_slice())?;
        queue.push(job)?;
    }
    deliveries.insert(key, encode(&record))?;
    times.insert(a.time_key.as_slice(), &[])?;
    if let Some(body_key) = body_key {
        // Kept beside the delivery id, and forgotten with it (same time key).
        deliveries.insert(body_key.as_slice(), key)?;
        let mut time_key = a.time_key.get(..8).unwrap_or_default().to_vec();
        time_key.extend_from_slice(&body_key);
        times.insert(time_key, &[])?;
    }
    Ok(Accepted::New(Admitted { jobs: record.jobs, skipped: record.skipped }))
}

/// A pull request's head as its last event showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrHead {
    pub sha: String,
    /// In the repository itself (`true`) or a fork (`false`).
    pub in_repo: Option<bool>,
}

/// A noted head as stored: `sha \n updated_at \n repo|fork|` (a head
/// noted by an older version is the sha alone).
fn encode_head(head: &PrHead, updated_at: &str) -> String {
    let fork = match head.in_repo {
        Some(true) => "repo",
        Some(false) => "fork",
        None => "",
    };
    format!("{}\n{updated_at}\n{fork}", head.sha)
}

/// The head and the `updated_at` it was noted at.
fn decode_head(value: &[u8]) -> (PrHead, String) {
    let text = String::from_utf8_lossy(value);
    let mut parts = text.split('\n');
    let sha = parts.next().unwrap_or_default().to_string();
    let updated_at = parts.next().unwrap_or_default().to_string();
    let in_repo = match parts.next() {
        Some("repo") => Some(true),
        Some("fork") => Some(false),
        _ => None,
    };
    (PrHead { sha, in_repo }, updated_at)
}

/// Where a body fingerprint is kept in `deliveries`: apart from any
/// delivery id (those are printable ASCII, never a zero byte).
fn body_key(fingerprint: &str) -> Vec<u8> {
    let mut k = b"\0body:".to_vec();
    k.extend_from_slice(fingerprint.as_bytes());
    k
}

/// Held jobs per issue or PR, at most (oldest go first).
const MAX_PENDING: usize = 20;

fn subject_key(repo: &str, number: u64) -> Vec<u8> {
    format!("{repo}#{number}").into_bytes()
}

/// A job held until a trusted person approves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub delivery: String,
    pub held_at: chrono::DateTime<Utc>,
    pub spec: JobSpec,
    /// A hash of the issue's or PR's title and body when the match was
    /// held: its prompt was rendered from that text.
    #[serde(default)]
    pub text: Option<String>,
}

impl Pending {
    /// Whether an approval may release this held job: not when the issue's
    /// or PR's text (`current`) differs from what the prompt was made of,
    /// unless the approver said `--edited` after reading it.
    pub fn approvable(&self, current: Option<&str>, edited_ok: bool) -> bool {
        match (&self.text, current) {
            (Some(then), Some(now)) => then == now || edited_ok,
            _ => true,
        }
    }
}

/// What a stored delivery started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Admitted {
    pub jobs: Vec<String>,
    /// Matches held back by a trigger's rate limit or cooldown.
    pub skipped: Vec<Skipped>,
}

/// Applies a trigger's `max_runs_per_hour` (per repository) and `cooldown`
/// (per subject), recording the run when it may go ahead; `Some(reason)`
/// when it may not.
fn throttled(
    tree: &sled::transaction::TransactionalTree,
    spec: &JobSpec,
    now: chrono::DateTime<Utc>,
) -> Result<Option<String>, sled::transaction::UnabortableTransactionError> {
    let repo = spec.repo.as_deref().unwrap_or("");
    let now_ms = now.timestamp_millis();
    let mut writes: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    if let Some(max) = spec.max_runs_per_hour {
        let key = format!("rate\0{}\0{repo}", spec.trigger).into_bytes();
        let mut runs: Vec<i64> = tree.get(&key)?.and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default();
        runs.retain(|t| now_ms - t < 3_600_000);
        if runs.len() >= max as usize {
            return Ok(Some(format!("max_runs_per_hour: {max} runs in the last hour for {repo}")));
        }
        runs.push(now_ms);
        writes.push((key, encode(&runs)));
    }
    if let (Some(cooldown), Some(subject)) = (spec.cooldown_secs, spec.subject) {
        let key = format!("cool\0{}\0{repo}\0{subject}", spec.trigger).into_bytes();
        let last: Option<i64> = tree.get(&key)?.and_then(|v| serde_json::from_slice(&v).ok());
        if let Some(last) = last.filter(|last| now_ms - last < cooldown as i64 * 1000) {
            let left = (cooldown as i64 * 1000 - (now_ms - last)) / 1000 + 1;
            return Ok(Some(format!("cooldown: #{subject} ran less than {cooldown}s ago ({left}s left)")));
        }
        writes.push((key, encode(&now_ms)));
    }
    for (k, v) in writes {
        tree.insert(k, v)?;
    }
    Ok(None)
}

/// The sled database and its trees.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    commit: std::sync::Arc<commit::GroupCommit>,
    /// Stores deliveries in batches (see `writer`).
    writer: std::sync::Arc<writer::Writer<Admission>>,
    path: PathBuf,
    deliveries: Tree,
    /// received-at millis (u64 BE) ++ delivery id → (): retention order.
    delivery_times: Tree,
    jobs: Tree,
    /// creation sequence (u64 BE) → job id: newest-first listing.
    job_index: Tree,
    /// `100 - priority` (u8) ++ sequence (u64 BE) → `id\nagent\nrepo`, for
    /// queued jobs only: highest priority first, FIFO within one.
    queue: Tree,
    /// The same entries by repository (see `by_repo_key`), so dispatch can
    /// pass over a repository at its limit without reading its whole line.
    queue_by_repo: Tree,
    /// job id (its result) or `job id/purpose` → `Publication` not yet
    /// delivered to GitHub.
    outbox: Tree,
    /// job id → lease deadline (Unix ms, u64 BE), for jobs in state
    /// `running`: what a restart must recover, and what a worker renews.
    running: Tree,
    /// trigger name → last fire time (RFC 3339) of a schedule trigger.
    schedules: Tree,
    /// `owner/name#N` → jobs held for approval on that issue or PR.
    approvals: Tree,
    /// `owner/name#N` → the pull request's current head sha.
    heads: Tree,
    /// job id → the process group of its running agent, for start-up cleanup.
    agents: Tree,
    /// concurrency group → `GroupState`.
    groups: Tree,
    /// job id → (): jobs whose end has not yet gone back through the rules
    /// (chaining); written with the end, cleared once it has.
    ends: Tree,
    /// running job id → why it must be cancelled (cancel-in-progress).
    cancels: Tree,
    /// GitHub delivery guid → when baton asked GitHub to redeliver it.
    redeliveries: Tree,
}

/// The id of the job `trigger` creates for `delivery`: the same pair always
/// gives the same id, so reprocessing a delivery cannot double a job.
pub fn job_id(delivery: &str, trigger: &str) -> String {
    let mut h = Sha256::new();
    h.update(delivery.as_bytes());
    h.update([0]);
    h.update(trigger.as_bytes());
    hex::encode(&h.finalize()[..8])
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// `job` as the engine has it, with what the publisher wrote on the stored
/// record since (the status comment, the check run, what was created, the
/// publication's outcome): the two write one record, and neither may undo
/// the other.
fn with_publisher_fields(jobs: &TxTree, job: &Job) -> Result<Job, TxError> {
    let mut merged = job.clone();
    if let Some(stored) = jobs.get(job.id.as_bytes())?.and_then(|b| serde_json::from_slice::<Job>(&b).ok()) {
        let (p, s) = (&mut merged.progress, &stored.progress);
        p.started |= s.started;
        p.status_comment = p.status_comment.or(s.status_comment);
        p.check_run = p.check_run.or(s.check_run);
        p.comments = p.comments.max(s.comments);
        p.pull_requests = p.pull_requests.max(s.pull_requests);
        if merged.publication.is_none() {
            merged.publication = stored.publication;
        }
    }
    Ok(merged)
}

/// A job's result publication is keyed by the job id (as it always was);
/// the others by `job/purpose`, so a job has at most one of each.
fn outbox_key(p: &Publication) -> Vec<u8> {
    outbox_key_of(&p.job, p.purpose)
}

fn outbox_key_of(job: &str, purpose: Purpose) -> Vec<u8> {
    match purpose {
        Purpose::Final => job.as_bytes().to_vec(),
        other => format!("{job}/{}", other.as_str()).into_bytes(),
    }
}

/// `now + lease` in Unix milliseconds, big-endian: byte order is time order.
fn lease_deadline(lease: Duration) -> [u8; 8] {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from((now + lease).as_millis()).unwrap_or(u64::MAX).to_be_bytes()
}

/// Queue keys sort by priority, highest first, then by sequence: one
/// priority byte (`100 - priority`, so 0 is the highest) and the sequence.
fn queue_key(job: &Job) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = (100 - i16::from(job.spec.priority).clamp(-100, 100)) as u8;
    key[1..].copy_from_slice(&job.seq.to_be_bytes());
    key
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn flatten<T>(r: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Records are plain data structs; serializing them cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

/// A queued job, as the dispatcher sees it without loading the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// The queue key: priority, then sequence.
    key: Vec<u8>,
    pub seq: u64,
    pub id: String,
    pub agent: String,
    pub repo: Option<String>,
}

/// Queue values carry the agent and repository, so the dispatcher's limits
/// need no job read: `id \n agent \n repo`.
fn queue_value(job: &Job) -> Vec<u8> {
    format!("{}\n{}\n{}", job.id, job.spec.agent, job.repo.as_deref().unwrap_or("")).into_bytes()
}

/// The queue and its per-repository index (`queue_by_repo`), which are
/// always written together.
#[derive(Clone, Copy)]
struct QueueTx<'a> {
    queue: &'a TxTree,
    by_repo: &'a TxTree,
}

impl QueueTx<'_> {
    fn push(&self, job: &Job) -> Result<(), TxError> {
        let (key, value) = (queue_key(job), queue_value(job));
        self.by_repo.insert(by_repo_key(job.repo.as_deref(), &key), value.as_slice())?;
        self.queue.insert(&key, value)?;
        Ok(())
    }

    /// Takes an entry out; whether it was there.
    fn remove(&self, key: &[u8], repo: Option<&str>) -> Result<bool, TxError> {
        self.by_repo.remove(by_repo_key(repo, key))?;
        Ok(self.queue.remove(key)?.is_some())
    }
}

/// `queue_by_repo` keys: the repository (empty for none), a zero byte, and
/// the queue key, so each repository's line is in queue order.
fn by_repo_key(repo: Option<&str>, key: &[u8]) -> Vec<u8> {
    let mut k = repo.unwrap_or("").as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// A queue entry from its key and value (`id \n agent \n repo`).
fn queue_entry(key: &[u8], value: &[u8]) -> QueueEntry {
    let seq = key.get(1..).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
    let text = String::from_utf8_lossy(value);
    let mut parts = text.splitn(3, '\n');
    let id = parts.next().unwrap_or_default().to_string();
    let agent = parts.next().unwrap_or_default().to_string();
    let repo = parts.next().filter(|r| !r.is_empty()).map(str::to_string);
    QueueEntry { key: key.to_vec(), seq, id, agent, repo }
}

/// Filters for listing jobs.
#[derive(Debug, Default, Clone)]
pub struct JobQuery {
    pub delivery: Option<String>,
    pub state: Option<JobState>,
    pub trigger: Option<String>,
    pub repo: Option<String>,
    pub limit: usize,
    /// Only jobs created before this one (its `seq`): the page after it.
    pub before: Option<u64>,
}

impl Store {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, Durability::Fsync)
    }

    pub fn open_with(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_path_buf(), source };
        std::fs::create_dir_all(path).map_err(|e| open_err(sled::Error::Io(e)))?;
        let db = sled::Config::new()
            .path(path.join("db"))
            .cache_capacity(32 * 1024 * 1024)
            // baton flushes explicitly before it acknowledges anything; the
            // background flusher only bounds what a crash could lose of the
            // rest (log lines of state that is rebuilt anyway).
            .flush_every_ms(Some(1000))
            .open()
            .map_err(open_err)?;
        let tree = |name: &str| db.open_tree(name).map_err(open_err);
        let admit = AdmitTrees {
            deliveries: tree("deliveries")?,
            delivery_times: tree("delivery_times")?,
            jobs: tree("jobs")?,
            job_index: tree("job_index")?,
            queue: tree("queue")?,
            queue_by_repo: tree("queue_by_repo")?,
            throttle: tree("throttle")?,
            approvals: tree("approvals")?,
            groups: tree("groups")?,
            cancels: tree("cancels")?,
        };
        // sled keeps its log in `db/db`; group commit fsyncs it (see `commit`).
        let data_file = std::fs::File::open(path.join("db").join("db")).map_err(|e| open_err(sled::Error::Io(e)))?;
        let commit = commit::GroupCommit::new(db.clone(), data_file, durability);
        let trees = admit.clone();
        let writer = writer::Writer::start(commit.clone(), move |batch: &[Admission]| trees.apply(batch))
            .map_err(|e| open_err(sled::Error::Io(e)))?;
        // The rate-limit and cooldown state (`throttle`) is the writer's alone.
        let AdmitTrees {
            deliveries,
            delivery_times,
            jobs,
            job_index,
            queue,
            queue_by_repo,
            approvals,
            groups,
            cancels,
            ..
        } = admit;
        // Stores from before the index have a queue without it.
        if queue_by_repo.is_empty() && !queue.is_empty() {
            for item in queue.iter() {
                let (k, v) = item.map_err(open_err)?;
                let entry = queue_entry(&k, &v);
                queue_by_repo.insert(by_repo_key(entry.repo.as_deref(), &k), v).map_err(open_err)?;
            }
        }
        Ok(Store {
            commit,
            writer: std::sync::Arc::new(writer),
            deliveries,
            delivery_times,
            jobs,
            job_index,
            queue,
            queue_by_repo,
            outbox: tree("outbox")?,
            running: tree("running")?,
            schedules: tree("schedules")?,
            approvals,
            heads: tree("heads")?,
            agents: tree("agents")?,
            groups,
            ends: tree("ends")?,
            cancels,
            redeliveries: tree("redeliveries")?,
            path: path.to_path_buf(),
            db,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes every write so far durable (shared with concurrent writers:
    /// see `commit`).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.commit.durable().await
    }

    /// Stores a delivery with the jobs its event created, atomically, and
    /// flushes to disk before returning (batched with concurrent deliveries
    /// by the writer thread). A delivery id seen before writes nothing and
    /// answers `Duplicate`.
    ///
    /// The payload itself is not kept: each job carries what it needs (its
    /// rendered prompt and workspace), and storing 10–30 KB bodies cost a
    /// third of ingest throughput in sled (bench/RESULTS.md).
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
        let mut jobs = Vec::with_capacity(specs.len());
        for spec in specs {
            let id = job_id(&delivery.id, &spec.trigger);
            if jobs.iter().any(|j: &Job| j.id == id) {
                continue;
            }
            jobs.push(Job::new(id, self.db.generate_id()?, delivery.id.clone(), spec, now));
        }
        let mut time_key = (delivery.received_at.timestamp_millis().max(0) as u64).to_be_bytes().to_vec();
        time_key.extend_from_slice(delivery.id.as_bytes());
        let encoded: Vec<Vec<u8>> = jobs.iter().map(encode).collect();
        let held: Vec<(Vec<u8>, Pending)> = pending
            .into_iter()
            .filter_map(|spec| {
                let key = subject_key(spec.repo.as_deref()?, spec.subject?);
                let text = subject_text.clone();
                Some((key, Pending { delivery: delivery.id.clone(), held_at: now, spec, text }))
            })
            .collect();
        self.writer.submit(Admission { delivery, time_key, jobs, encoded, held, now }).await
    }

    /// Forgets deliveries received before `cutoff` (their ids count as new
    /// again), in small batches so ingress never waits on a long prune.
    /// Jobs stay; a redelivery cannot double them, since job ids derive from
    /// the delivery id. Returns how many were pruned.
    pub async fn prune_deliveries(&self, cutoff: chrono::DateTime<Utc>) -> Result<usize, StoreError> {
        let end = (cutoff.timestamp_millis().max(0) as u64).to_be_bytes();
        let mut total = 0;
        loop {
            let batch = self.delivery_times.range(..end.as_slice()).keys().take(500).collect::<Result<Vec<_>, _>>()?;
            if batch.is_empty() {
                break;
            }
            let result = (&self.delivery_times, &self.deliveries).transaction(|(times, deliveries)| {
                for key in &batch {
                    times.remove(key)?;
                    deliveries.remove(key.get(8..).unwrap_or_default())?;
                }
                Ok(())
            });
            flatten(result)?;
            total += batch.len();
            tokio::task::yield_now().await;
        }
        if total > 0 {
            self.flush().await?;
        }
        Ok(total)
    }

    /// Forgets finished jobs that ended before `cutoff`, oldest first, at most
    /// `max` of them: their record, index entry and outbox entries. Never a
    /// queued or running job, nor one whose end has not gone through the
    /// rules or whose publications are still pending. Returns the ids
    /// forgotten, so their folders can go too.
    pub async fn prune_jobs(&self, cutoff: chrono::DateTime<Utc>, max: usize) -> Result<Vec<String>, StoreError> {
        let mut doomed: Vec<(Vec<u8>, String)> = Vec::new();
        for item in self.job_index.iter() {
            let (seq, id) = item?;
            let id = String::from_utf8_lossy(&id).into_owned();
            let Some(job) = self.job(&id)? else {
                doomed.push((seq.to_vec(), id)); // an index entry left by a crash
                continue;
            };
            // Jobs are indexed in creation order: none created after the
            // cutoff can have finished before it.
            if job.created_at >= cutoff || doomed.len() >= max {
                break;
            }
            let finished_before = job.state.is_final() && job.finished_at.is_some_and(|t| t < cutoff);
            if !finished_before || self.ends.contains_key(id.as_bytes())? {
                continue;
            }
            let pending = self.outbox.scan_prefix(id.as_bytes()).values().any(|v| {
                v.ok()
                    .and_then(|v| serde_json::from_slice::<Publication>(&v).ok())
                    .is_some_and(|p| p.job == id && p.state == PublicationState::Pending)
            });
            if !pending {
                doomed.push((seq.to_vec(), id));
            }
        }
        if doomed.is_empty() {
            return Ok(Vec::new());
        }
        let result = (&self.jobs, &self.job_index, &self.outbox).transaction(|(jobs, index, outbox)| {
            for (seq, id) in &doomed {
                index.remove(seq.as_slice())?;
                jobs.remove(id.as_bytes())?;
                outbox.remove(id.as_bytes())?;
                for purpose in Purpose::ALL {
                    outbox.remove(outbox_key_of(id, purpose))?;
                }
            }
            Ok(())
        });
        flatten(result)?;
        self.flush().await?;
        Ok(doomed.into_iter().map(|(_, id)| id).collect())
    }

    /// Records that baton asked GitHub to redeliver `guid`; `false` when it
    /// had already asked (catch-up asks once per delivery).
    pub async fn note_redelivery(&self, guid: &str) -> Result<bool, StoreError> {
        let now = Utc::now().to_rfc3339();
        let fresh =
            self.redeliveries.compare_and_swap(guid.as_bytes(), None as Option<&[u8]>, Some(now.as_bytes()))?.is_ok();
        self.flush().await?;
        Ok(fresh)
    }

    pub fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        match self.deliveries.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode("deliveries", id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        match self.jobs.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode("jobs", id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    /// Jobs newest first, filtered.
    pub fn list_jobs(&self, q: &JobQuery) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        if let Some(delivery) = &q.delivery {
            if let Some(d) = self.delivery(delivery)? {
                for id in d.jobs {
                    if let Some(job) = self.job(&id)? {
                        out.push(job);
                    }
                }
            }
            out.sort_by_key(|j| std::cmp::Reverse(j.seq));
            out.retain(|j| q.matches(j) && q.before.is_none_or(|b| j.seq < b));
            out.truncate(q.limit);
            return Ok(out);
        }
        let entries = match q.before {
            Some(seq) => self.job_index.range(..seq_key(seq).as_slice()),
            None => self.job_index.iter(),
        };
        for entry in entries.rev() {
            let (_, id) = entry?;
            let Some(bytes) = self.jobs.get(&id)? else {
                continue;
            };
            let job: Job = decode("jobs", &id, &bytes)?;
            if q.matches(&job) {
                out.push(job);
                if out.len() >= q.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Queued jobs in order, read lazily: (sequence, job id, repository).
    pub fn queued(&self) -> impl Iterator<Item = Result<QueueEntry, StoreError>> + '_ {
        self.queue.iter().map(|entry| {
            let (k, v) = entry?;
            Ok(queue_entry(&k, &v))
        })
    }

    /// The queued job to run next: the first in queue order among the first
    /// `eligible` entry of each repository's line, passing over whole
    /// repositories that are `full` (at their limit) without reading them.
    /// Dispatch costs a look per repository, not a read of the whole queue.
    pub fn next_queued(
        &self,
        full: impl Fn(Option<&str>) -> bool,
        eligible: impl Fn(&QueueEntry) -> bool,
    ) -> Result<Option<QueueEntry>, StoreError> {
        let mut best: Option<QueueEntry> = None;
        let mut from: Vec<u8> = Vec::new();
        while let Some(first) = self.queue_by_repo.range(from.as_slice()..).next() {
            let (k, _) = first?;
            // repository ++ 0 ++ 9-byte queue key
            let Some(repo_len) = k.len().checked_sub(10) else {
                from = k.to_vec();
                from.push(0);
                continue;
            };
            let repo = (repo_len > 0).then(|| String::from_utf8_lossy(&k[..repo_len]).into_owned());
            if !full(repo.as_deref()) {
                for item in self.queue_by_repo.scan_prefix(&k[..=repo_len]) {
                    let (k, v) = item?;
                    let entry = queue_entry(&k[repo_len + 1..], &v);
                    if eligible(&entry) {
                        if best.as_ref().is_none_or(|b| entry.key < b.key) {
                            best = Some(entry);
                        }
                        break;
                    }
                }
            }
            // The next repository's line starts after every key of this one.
            from = k[..repo_len].to_vec();
            from.push(1);
        }
        Ok(best)
    }

    /// Takes a queued job: it leaves the queue and becomes `running` with a
    /// new attempt, in one transaction, flushed.
    pub async fn claim(&self, entry: &QueueEntry, lease: Duration) -> Result<Option<Job>, StoreError> {
        let deadline = lease_deadline(lease);
        let (key, id, repo) = (entry.key.as_slice(), entry.id.as_str(), entry.repo.as_deref());
        let trees = (&self.queue, &self.queue_by_repo, &self.jobs, &self.running, &self.groups);
        let result = trees.transaction(|(queue, by_repo, jobs, running, groups)| {
            let queue = QueueTx { queue, by_repo };
            let Some(bytes) = jobs.get(id.as_bytes())? else {
                return Ok(None);
            };
            let mut job: Job = match decode("jobs", id.as_bytes(), &bytes) {
                Ok(j) => j,
                Err(e) => return abort(e),
            };
            if job.state != JobState::Queued {
                queue.remove(key, repo)?;
                return Ok(None);
            }
            if let Some(group) = &job.spec.concurrency {
                let mut st = group_state(groups, group)?;
                if st.running.as_ref().is_some_and(|r| r != id) {
                    return Ok(None); // waits, still queued, for its group
                }
                st.running = Some(id.to_string());
                st.waiting.retain(|(w, _)| w != id);
                groups.insert(group.as_bytes(), encode(&st))?;
            }
            if !queue.remove(key, repo)? {
                return Ok(None);
            }
            job.start_attempt(Utc::now());
            jobs.insert(id.as_bytes(), encode(&job))?;
            running.insert(id.as_bytes(), &deadline)?;
            Ok(Some(job))
        });
        let job = flatten(result)?;
        self.flush().await?;
        Ok(job)
    }

    /// Running jobs that a newer job of their concurrency group cancels, with
    /// that job's id; each is handed out once.
    pub fn take_cancels(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.cancels.iter() {
            let (k, v) = entry?;
            self.cancels.remove(&k)?;
            out.push((String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    /// Writes a job record as it is now (progress inside a state).
    pub async fn save(&self, job: &Job) -> Result<(), StoreError> {
        let result = self.jobs.transaction(|jobs| {
            jobs.insert(job.id.as_bytes(), encode(&with_publisher_fields(jobs, job)?))?;
            Ok(())
        });
        flatten(result)?;
        self.flush().await
    }

    /// Stores a job that has ended (or goes back to the queue for another
    /// attempt), with its publication if any, atomically and durably.
    pub async fn finish(&self, job: &Job, publications: &[Publication]) -> Result<(), StoreError> {
        let requeue = job.state == JobState::Queued;
        let ended = matches!(job.state, JobState::Succeeded | JobState::Failed);
        let trees =
            (&self.jobs, &self.queue, &self.queue_by_repo, &self.outbox, &self.running, &self.groups, &self.ends);
        let result = trees.transaction(|(jobs, queue, by_repo, outbox, running, groups, ends)| {
            jobs.insert(job.id.as_bytes(), encode(&with_publisher_fields(jobs, job)?))?;
            if ended {
                ends.insert(job.id.as_bytes(), &[])?;
            }
            if job.state != JobState::Running {
                running.remove(job.id.as_bytes())?;
            }
            if requeue {
                QueueTx { queue, by_repo }.push(job)?;
            }
            if let Some(group) = &job.spec.concurrency {
                let mut st = group_state(groups, group)?;
                if st.running.as_deref() == Some(job.id.as_str()) {
                    st.running = None;
                }
                if requeue && !st.waiting.iter().any(|(w, _)| w == &job.id) {
                    // Back to the front: it was first in line before.
                    st.waiting.insert(0, (job.id.clone(), job.seq));
                }
                groups.insert(group.as_bytes(), encode(&st))?;
            }
            for p in publications {
                outbox.insert(outbox_key(p), encode(p))?;
            }
            Ok(())
        });
        flatten(result)?;
        self.flush().await
    }

    /// Writes a running job with the publications of its start, durably.
    pub async fn start_publications(&self, job: &Job, publications: &[Publication]) -> Result<(), StoreError> {
        let result = (&self.jobs, &self.outbox).transaction(|(jobs, outbox)| {
            jobs.insert(job.id.as_bytes(), encode(&with_publisher_fields(jobs, job)?))?;
            for p in publications {
                outbox.insert(outbox_key(p), encode(p))?;
            }
            Ok(())
        });
        flatten(result)?;
        self.flush().await
    }

    /// Cancels a queued job at once; a running job is the engine's to stop.
    pub async fn cancel_queued(&self, id: &str, reason: &str) -> Result<Option<Job>, StoreError> {
        let Some(job) = self.job(id)? else {
            return Err(StoreError::NoSuchJob(id.to_string()));
        };
        if job.state != JobState::Queued {
            return Ok(None);
        }
        let trees = (&self.queue, &self.queue_by_repo, &self.jobs, &self.groups);
        let result = trees.transaction(|(queue, by_repo, jobs, groups)| {
            // The dispatcher may have claimed it since it was read.
            let queue = QueueTx { queue, by_repo };
            if !queue.remove(&queue_key(&job), job.repo.as_deref())? {
                return Ok(None);
            }
            if let Some(group) = &job.spec.concurrency {
                let mut st = group_state(groups, group)?;
                st.waiting.retain(|(w, _)| w != id);
                groups.insert(group.as_bytes(), encode(&st))?;
            }
            let mut j = job.clone();
            j.end(JobState::Cancelled, None, Some(reason.to_string()), Utc::now());
            jobs.insert(id.as_bytes(), encode(&j))?;
            Ok(Some(j))
        });
        let job = flatten(result)?;
        self.flush().await?;
        Ok(job)
    }

    /// Puts a finished job back in the queue for a fresh run.
    pub async fn retry(&self, id: &str) -> Result<Job, StoreError> {
        let Some(mut job) = self.job(id)? else {
            return Err(StoreError::NoSuchJob(id.to_string()));
        };
        if !job.state.is_final() {
            return Err(StoreError::WrongState { id: id.to_string(), state: job.state, expected: "finished" });
        }
        job.requeue_fresh();
        self.finish(&job, &[]).await?;
        Ok(job)
    }

    /// Extends a running job's lease; a job no longer running is left alone.
    /// Not flushed: after a restart every running job is recovered anyway.
    pub fn renew_lease(&self, id: &str, lease: Duration) -> Result<(), StoreError> {
        let deadline = lease_deadline(lease);
        self.running.fetch_and_update(id.as_bytes(), |old| old.map(|_| deadline.to_vec()))?;
        Ok(())
    }

    /// Running jobs whose lease ran out: their worker stopped renewing.
    pub fn expired_leases(&self) -> Result<Vec<String>, StoreError> {
        let now = lease_deadline(Duration::ZERO);
        let mut out = Vec::new();
        for entry in self.running.iter() {
            let (id, deadline) = entry?;
            if deadline.as_ref() < now.as_slice() {
                out.push(String::from_utf8_lossy(&id).into_owned());
            }
        }
        Ok(out)
    }

    /// Jobs a previous daemon left `running` (read through the running
    /// index, so start-up does not scan every job ever run).
    pub fn running(&self) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        for entry in self.running.iter() {
            let (id, _) = entry?;
            if let Some(bytes) = self.jobs.get(&id)? {
                let job: Job = decode("jobs", &id, &bytes)?;
                if job.state == JobState::Running {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }

    /// Whether job `job`'s publication for `purpose` is still in the outbox.
    pub fn publication_pending(&self, job: &str, purpose: Purpose) -> Result<bool, StoreError> {
        Ok(self.outbox.contains_key(outbox_key_of(job, purpose))?)
    }

    /// Publications not yet delivered.
    pub fn outbox(&self) -> Result<Vec<Publication>, StoreError> {
        let mut out = Vec::new();
        for entry in self.outbox.iter() {
            let (k, v) = entry?;
            out.push(decode("outbox", &k, &v)?);
        }
        Ok(out)
    }

    /// Records a publication attempt; a final one leaves the outbox and its
    /// outcome is written onto the job, in one transaction.
    /// `created` counts a new comment or pull request against the job's caps.
    pub async fn update_publication(&self, p: &Publication, created: bool) -> Result<(), StoreError> {
        let key = outbox_key(p);
        let result = (&self.outbox, &self.jobs).transaction(|(outbox, jobs)| {
            if p.state == PublicationState::Pending {
                outbox.insert(key.as_slice(), encode(p))?;
            } else {
                outbox.remove(key.as_slice())?;
            }
            if let Some(bytes) = jobs.get(p.job.as_bytes())? {
                let mut job: Job = match decode("jobs", p.job.as_bytes(), &bytes) {
                    Ok(j) => j,
                    Err(e) => return abort(e),
                };
                if p.purpose == Purpose::Final {
                    job.publication = Some(p.summary());
                    if let (PublicationState::Published, Some(ended)) = (p.state, job.finished_at) {
                        let ms = (Utc::now() - ended).num_milliseconds().max(0) as u64;
                        if let Some(last) = job.history.last_mut() {
                            last.phases.publish_ms = Some(ms);
                        }
                    }
                }
                if p.state == PublicationState::Published {
                    match p.purpose {
                        Purpose::Status => job.progress.status_comment = p.remote_id,
                        Purpose::CheckStart => job.progress.check_run = p.remote_id,
                        _ => {}
                    }
                }
                if created {
                    match p.target {
                        Target::PullRequest { .. } => job.progress.pull_requests += 1,
                        Target::IssueComment { .. }
                        | Target::CommitComment { .. }
                        | Target::StatusComment { .. }
                        | Target::EditStatus { .. }
                        | Target::Review { .. } => job.progress.comments += 1,
                        Target::Reaction { .. } | Target::CheckRun { .. } => {}
                    }
                }
                jobs.insert(p.job.as_bytes(), encode(&job))?;
            }
            Ok(())
        });
        flatten(result)?;
        self.flush().await
    }

    /// Jobs whose end still has to go back through the rules.
    pub fn pending_ends(&self) -> Result<Vec<String>, StoreError> {
        self.ends.iter().keys().map(|k| Ok(String::from_utf8_lossy(&k?).into_owned())).collect()
    }

    /// A job's end went through the rules (and what it started is stored).
    pub fn end_handled(&self, id: &str) -> Result<(), StoreError> {
        self.ends.remove(id.as_bytes())?;
        Ok(())
    }

    /// Remembers a pull request's current head (from its own events), which
    /// an approval must match.
    /// Notes a pull request's head as of `updated_at` (GitHub's RFC 3339
    /// time, which orders as text): only ever forward, so an older event
    /// arriving late cannot move the head back to a replaced commit.
    pub fn set_head(&self, repo: &str, number: u64, head: &PrHead, updated_at: &str) -> Result<(), StoreError> {
        let value = encode_head(head, updated_at);
        let key = subject_key(repo, number);
        self.heads.fetch_and_update(&key, |old| {
            let newer = old.is_none_or(|o| decode_head(o).1.as_str() <= updated_at);
            Some(if newer { value.as_bytes().to_vec() } else { old.unwrap_or_default().to_vec() })
        })?;
        Ok(())
    }

    /// The head noted for a pull request.
    pub fn head(&self, repo: &str, number: u64) -> Result<Option<String>, StoreError> {
        Ok(self.pr_head(repo, number)?.map(|h| h.sha))
    }

    /// The head noted for a pull request, and whether it lives in the
    /// repository or a fork (when the event said).
    pub fn pr_head(&self, repo: &str, number: u64) -> Result<Option<PrHead>, StoreError> {
        Ok(self.heads.get(subject_key(repo, number))?.map(|v| decode_head(&v).0))
    }

    /// Jobs held on an issue or PR for approval.
    pub fn pending(&self, repo: &str, number: u64) -> Result<Vec<Pending>, StoreError> {
        let key = subject_key(repo, number);
        match self.approvals.get(&key)? {
            Some(v) => decode("approvals", &key, &v),
            None => Ok(Vec::new()),
        }
    }

    /// A trusted person approved what waits on this issue or PR: every held
    /// job `may_approve` accepts becomes a queued job — for a PR, only those
    /// held at its current head (a later push needs a new approval, and
    /// holds for an older head are dropped). Returns the new job ids.
    pub async fn approve(
        &self,
        repo: &str,
        number: u64,
        approval: &Approval,
        may_approve: impl Fn(&Pending) -> bool,
    ) -> Result<Vec<String>, StoreError> {
        let key = subject_key(repo, number);
        let head = self.head(repo, number)?;
        let held = self.pending(repo, number)?;
        let seqs: Vec<u64> = held.iter().map(|_| self.db.generate_id()).collect::<Result<_, _>>()?;
        let now = Utc::now();
        let result = (&self.approvals, &self.jobs, &self.job_index, &self.queue, &self.queue_by_repo).transaction(
            |(approvals, jobs, index, queue, by_repo)| {
                let mut keep = Vec::new();
                let mut started = Vec::new();
                for (p, seq) in held.iter().zip(&seqs) {
                    let at_head =
                        !p.spec.subject_is_pull_request || p.spec.head_sha.is_none() || p.spec.head_sha == head;
                    if !at_head {
                        continue; // held for an older head: gone with the push
                    }
                    if !may_approve(p) {
                        keep.push(p.clone());
                        continue;
                    }
                    let id = job_id(&p.delivery, &p.spec.trigger);
                    if jobs.get(id.as_bytes())?.is_none() {
                        let mut job = Job::new(id.clone(), *seq, p.delivery.clone(), p.spec.clone(), now);
                        job.approved = Some(approval.clone());
                        jobs.insert(id.as_bytes(), encode(&job))?;
                        index.insert(&seq_key(*seq), id.as_bytes())?;
                        QueueTx { queue, by_repo }.push(&job)?;
                        started.push(id);
                    }
                }
                if keep.is_empty() {
                    approvals.remove(key.as_slice())?;
                } else {
                    approvals.insert(key.as_slice(), encode(&keep))?;
                }
                Ok(started)
            },
        );
        let started = flatten(result)?;
        self.flush().await?;
        Ok(started)
    }

    /// Records a running agent's process (made durable by the next flush,
    /// and by sled's own within a second).
    pub fn note_agent<T: serde::Serialize>(&self, job: &str, process: &T) -> Result<(), StoreError> {
        self.agents.insert(job.as_bytes(), encode(process))?;
        Ok(())
    }

    pub fn forget_agent(&self, job: &str) -> Result<(), StoreError> {
        self.agents.remove(job.as_bytes())?;
        Ok(())
    }

    /// Agents recorded as running, by job.
    pub fn agents<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.agents.iter() {
            let (k, v) = entry?;
            out.push((String::from_utf8_lossy(&k).into_owned(), decode("agents", &k, &v)?));
        }
        Ok(out)
    }

    /// When a schedule trigger last fired.
    pub fn schedule_last(&self, trigger: &str) -> Result<Option<chrono::DateTime<Utc>>, StoreError> {
        match self.schedules.get(trigger.as_bytes())? {
            Some(v) => Ok(Some(decode("schedules", trigger.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub async fn set_schedule_last(&self, trigger: &str, at: chrono::DateTime<Utc>) -> Result<(), StoreError> {
        self.schedules.insert(trigger.as_bytes(), encode(&at))?;
        self.flush().await
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Disk flushes done since the store was opened.
    pub fn flushes(&self) -> u64 {
        self.commit.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts every job: a full scan, for tests and tools, not hot paths.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }
}

impl JobQuery {
    fn matches(&self, j: &Job) -> bool {
        self.state.is_none_or(|s| j.state == s)
            && self.trigger.as_ref().is_none_or(|t| &j.trigger == t)
            && self.repo.as_ref().is_none_or(|r| j.repo.as_ref() == Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_approval_releases_a_held_job_only_for_the_text_it_was_held_with() {
        let held = |text: Option<&str>| Pending {
            delivery: "d".into(),
            held_at: Utc::now(),
            spec: JobSpec::default(),
            text: text.map(str::to_string),
        };
        // (text when held, text now, `--edited`) → released?
        let check = |then: Option<&str>, now: Option<&str>, edited: bool, expect: bool| {
            assert_eq!(held(then).approvable(now, edited), expect, "{then:?} → {now:?}, --edited {edited}");
        };
        check(Some("a"), Some("a"), false, true);
        check(Some("a"), Some("b"), false, false);
        check(Some("a"), Some("b"), true, true);
        check(None, Some("b"), false, true); // held before texts were kept
        check(Some("a"), None, false, true); // the approval shows no text
    }

    /// A store written before `queue_by_repo` existed gets the index built
    /// when it opens, so its queued jobs still run.
    #[tokio::test]
    async fn the_repository_index_is_built_for_a_store_without_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        {
            let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            for n in 0..3 {
                let spec = JobSpec {
                    trigger: format!("t{n}"),
                    agent: "a".into(),
                    repo: Some(format!("o/r{n}")),
                    ..JobSpec::default()
                };
                store.accept(Delivery::new(format!("d{n}"), "github", "issues.opened"), vec![spec]).await.ok();
            }
            store.queue_by_repo.clear().ok();
            store.flush().await.ok();
        }
        let store = Store::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let next = store.next_queued(|_| false, |_| true).ok().flatten().map(|e| e.repo);
        assert_eq!(next, Some(Some("o/r0".to_string())));
        assert_eq!(store.queue_by_repo.len(), 3);
    }
}
