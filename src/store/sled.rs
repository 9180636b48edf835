//! The embedded backend (sled): the store's tables as sled trees, and plans
//! applied in one sled transaction, flushed before the caller hears of it.
//!
//! One replica only: sled is a single process's database. A delivery and all
//! its jobs are written together, so a 2xx can never stand for half of them.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{TransactionError, Transactional, TransactionalTree};
use sled::Tree;

mod compact;
mod notes;
mod tx;

use super::commit::{self, Durability};
use super::ops;
use super::{writer, JobQuery, StoreError};
use crate::domain::admission::{Admission, AdmitView};
use crate::domain::approval::Held;
use crate::domain::dispatch::{Limits, Load, QueueEntry};
use crate::domain::{
    subject_key, Accepted, Delivery, GroupState, Job, JobState, Plan, Publication, PublicationState, Purpose, Write,
};
use tx::{block_on, Core, TxError, Writes};

/// The trees plans write, in one transaction: their index in `Tables::all`.
#[derive(Clone, Copy)]
enum T {
    Deliveries,
    DeliveryTimes,
    Jobs,
    JobIndex,
    Queue,
    QueueByRepo,
    Throttle,
    Approvals,
    Groups,
    Cancels,
    Outbox,
    Running,
    Ends,
    Children,
}

/// The trees of one database.
#[derive(Clone)]
struct Tables {
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
    /// Trigger runs, for rate limits and cooldowns.
    throttle: Tree,
    /// `owner/name#N` → jobs held for approval on that issue or PR.
    approvals: Tree,
    /// concurrency group → `GroupState`.
    groups: Tree,
    /// running job id → the job that cancels it (or `api`).
    cancels: Tree,
    /// job id (its result) or `job id/purpose` → `Publication` not yet
    /// delivered to GitHub.
    outbox: Tree,
    /// job id → lease deadline (Unix ms, u64 BE), for jobs in state
    /// `running`: what a restart must recover, and what a worker renews.
    running: Tree,
    /// job id → (): jobs whose end has not yet gone back through the rules.
    ends: Tree,
    /// parent job id ++ `\0` ++ creation sequence (u64 BE) → child job id:
    /// a job's children without a walk over every job.
    children: Tree,
}

impl Tables {
    fn all(&self) -> [&Tree; 14] {
        [
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
            &self.outbox,
            &self.running,
            &self.ends,
            &self.children,
        ]
    }

    /// Runs `f` in one sled transaction over every table.
    fn transaction<R>(&self, f: impl Fn(&Writes) -> Result<R, TxError>) -> Result<R, StoreError> {
        let all = self.all();
        let result = all[..].transaction(|trees: &Vec<TransactionalTree>| f(&Writes { trees }).map_err(Into::into));
        flatten(result)
    }

    fn get<V: DeserializeOwned>(&self, t: T, key: &[u8]) -> Result<Option<V>, StoreError> {
        Ok(self.tree(t).get(key)?.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn tree(&self, t: T) -> &Tree {
        // `all` lists every `T`, in order.
        self.all()[t as usize]
    }
}

/// Throttle runs as stored: a list of Unix millis (older stores kept a
/// cooldown's last run as one number).
fn decode_runs(v: &[u8]) -> Vec<i64> {
    serde_json::from_slice::<Vec<i64>>(v)
        .or_else(|_| serde_json::from_slice::<i64>(v).map(|t| vec![t]))
        .unwrap_or_default()
}

/// Marks a children's index that holds every job (see `SledStore::open`);
/// sorts after every parent id, which are printable.
const CHILDREN_BUILT: &[u8] = b"\xff built";

/// A child's key in the children's index.
fn child_key(parent: &str, seq: u64) -> Vec<u8> {
    [parent.as_bytes(), &[0], &seq.to_be_bytes()].concat()
}

/// The sled database.
#[derive(Clone)]
pub(crate) struct SledStore {
    core: Core,
    /// Stores deliveries in batches (see `writer`).
    writer: std::sync::Arc<writer::Writer<Admission>>,
    /// trigger name → last fire time (RFC 3339) of a schedule trigger.
    schedules: Tree,
    /// `owner/name#N` → the pull request's current head (see `encode_head`).
    heads: Tree,
    /// key → what baton remembers of a pull request (see `Store::note`).
    notes: Tree,
    /// job id → the process group of its running agent, for start-up cleanup.
    agents: Tree,
    /// GitHub delivery guid → when baton asked GitHub to redeliver it.
    redeliveries: Tree,
    /// `n␟key` (a note) or `h␟subject` (a head) → when it was last written
    /// or read (ms since the epoch, big-endian), for `prune_notes`.
    used: Tree,
}

impl SledStore {
    pub fn open(path: &Path, durability: Durability) -> Result<SledStore, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_path_buf(), source: Box::new(source) };
        std::fs::create_dir_all(path).map_err(|e| open_err(sled::Error::Io(e)))?;
        let (db, seq_base, compacted) = compact::open(path, compact::MIN_DISK)?;
        if let Some(c) = compacted {
            tracing::info!(
                before = c.before,
                after = c.after,
                live = c.live,
                "Compacted the store: sled's files held mostly deleted records."
            );
        }
        let tree = |name: &str| db.open_tree(name).map_err(open_err);
        let t = Tables {
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
            outbox: tree("outbox")?,
            running: tree("running")?,
            ends: tree("ends")?,
            children: tree("children")?,
        };
        // sled keeps its log in `db/db`; group commit fsyncs it (see `commit`).
        let data_file = std::fs::File::open(path.join("db").join("db")).map_err(|e| open_err(sled::Error::Io(e)))?;
        let commit = commit::GroupCommit::new(db.clone(), data_file, durability);
        let queued = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(t.queue.len() as i64));
        let core = Core {
            t: t.clone(),
            db: db.clone(),
            seq_base,
            lock: std::sync::Arc::default(),
            commit: commit.clone(),
            queued,
        };
        let admitting = core.clone();
        let writer =
            writer::Writer::start(commit, move |batch: &mut [Admission]| block_on(ops::admit_batch(&admitting, batch)))
                .map_err(|e| open_err(sled::Error::Io(e)))?;
        // Stores from before the index have a queue without it.
        if t.queue_by_repo.is_empty() && !t.queue.is_empty() {
            for item in t.queue.iter() {
                let (k, v) = item.map_err(open_err)?;
                let entry = queue_entry(&k, &v);
                t.queue_by_repo.insert(by_repo_key(entry.repo.as_deref(), &k), v).map_err(open_err)?;
            }
        }
        // Stores from before the children's index: filled once, marked done.
        if !t.children.contains_key(CHILDREN_BUILT).map_err(open_err)? {
            for item in t.jobs.iter() {
                let (id, bytes) = item.map_err(open_err)?;
                if let Ok(job) = serde_json::from_slice::<Job>(&bytes) {
                    if let Some(parent) = &job.parent {
                        t.children.insert(child_key(parent, job.seq), id).map_err(open_err)?;
                    }
                }
            }
            t.children.insert(CHILDREN_BUILT, &[]).map_err(open_err)?;
        }
        Ok(SledStore {
            core,
            writer: std::sync::Arc::new(writer),
            schedules: tree("schedules")?,
            heads: tree("heads")?,
            notes: tree("notes")?,
            agents: tree("agents")?,
            redeliveries: tree("redeliveries")?,
            used: tree("used")?,
        })
    }

    /// Makes every write so far durable (shared with concurrent writers:
    /// see `commit`).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.core.commit.durable().await
    }

    pub async fn admit(&self, admission: Admission) -> Result<Accepted, StoreError> {
        self.writer.submit(admission).await
    }

    pub async fn prune_deliveries(&self, cutoff: chrono::DateTime<Utc>) -> Result<usize, StoreError> {
        let end = (cutoff.timestamp_millis().max(0) as u64).to_be_bytes();
        let mut total = 0;
        loop {
            let batch =
                self.core.t.delivery_times.range(..end.as_slice()).keys().take(500).collect::<Result<Vec<_>, _>>()?;
            if batch.is_empty() {
                break;
            }
            let result = (&self.core.t.delivery_times, &self.core.t.deliveries).transaction(|(times, deliveries)| {
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
        // What baton asked GitHub to redeliver is worth remembering only as
        // long as the deliveries themselves.
        let mut forgotten = 0;
        for item in self.redeliveries.iter() {
            let (guid, asked) = item?;
            let old = chrono::DateTime::parse_from_rfc3339(&String::from_utf8_lossy(&asked))
                .map_or(true, |at| at.timestamp_millis() < cutoff.timestamp_millis());
            if old {
                self.redeliveries.remove(guid)?;
                forgotten += 1;
            }
        }
        if total + forgotten > 0 {
            self.flush().await?;
        }
        Ok(total)
    }

    pub(crate) async fn prune_jobs(
        &self,
        cutoff: chrono::DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut doomed: Vec<(Vec<u8>, String)> = Vec::new();
        let mut parents: std::collections::HashMap<String, String> = Default::default();
        for item in self.core.t.job_index.iter() {
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
            if !finished_before || self.core.t.ends.contains_key(id.as_bytes())? {
                continue;
            }
            let pending = self.core.t.outbox.scan_prefix(id.as_bytes()).values().any(|v| {
                v.ok()
                    .and_then(|v| serde_json::from_slice::<Publication>(&v).ok())
                    .is_some_and(|p| p.job == id && p.state == PublicationState::Pending)
            });
            if !pending {
                if let Some(parent) = job.parent {
                    parents.insert(id.clone(), parent);
                }
                doomed.push((seq.to_vec(), id));
            }
        }
        if doomed.is_empty() {
            return Ok(Vec::new());
        }
        let t = &self.core.t;
        let result = (&t.jobs, &t.job_index, &t.outbox, &t.children).transaction(|(jobs, index, outbox, children)| {
            for (seq, id) in &doomed {
                index.remove(seq.as_slice())?;
                if let Some(parent) = parents.get(id) {
                    let s = seq.as_slice().try_into().map(u64::from_be_bytes).unwrap_or_default();
                    children.remove(child_key(parent, s))?;
                }
                jobs.remove(id.as_bytes())?;
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

    pub(crate) async fn note_redelivery(&self, guid: &str) -> Result<bool, StoreError> {
        let now = Utc::now().to_rfc3339();
        let fresh =
            self.redeliveries.compare_and_swap(guid.as_bytes(), None as Option<&[u8]>, Some(now.as_bytes()))?.is_ok();
        self.flush().await?;
        Ok(fresh)
    }

    pub fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        match self.core.t.deliveries.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode("deliveries", id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        match self.core.t.jobs.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode("jobs", id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn list_jobs(&self, q: &JobQuery) -> Result<Vec<Job>, StoreError> {
        if let Some(parent) = &q.parent {
            // Its children, newest first, from the index.
            let prefix = child_key(parent, 0);
            let prefix = &prefix[..prefix.len() - 8];
            let ids = self.core.t.children.scan_prefix(prefix).rev().filter(|entry| {
                // An error is kept, to be said by the reader.
                let Ok((key, _)) = entry else { return true };
                let seq = key.get(prefix.len()..).and_then(|s| <[u8; 8]>::try_from(s).ok()).map(u64::from_be_bytes);
                q.before.is_none_or(|before| seq.is_some_and(|s| s < before))
            });
            return self.newest_matching(q, ids);
        }
        if let Some(delivery) = &q.delivery {
            let mut out = Vec::new();
            if let Some(d) = self.delivery(delivery)? {
                for id in d.jobs {
                    out.extend(self.job(&id)?);
                }
            }
            return Ok(q.finish(out));
        }
        let entries = match q.before {
            Some(seq) => self.core.t.job_index.range(..seq.to_be_bytes().as_slice()),
            None => self.core.t.job_index.iter(),
        };
        self.newest_matching(q, entries.rev())
    }

    /// The jobs an index's entries (key → job id) name that `q` matches, up
    /// to its limit, in the entries' order.
    fn newest_matching(
        &self,
        q: &JobQuery,
        entries: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    ) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        for entry in entries {
            let (_, id) = entry?;
            let Some(bytes) = self.core.t.jobs.get(&id)? else {
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

    pub(crate) fn queue_len(&self) -> usize {
        self.core.queued.load(std::sync::atomic::Ordering::Relaxed).max(0) as usize
    }

    pub fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.core.t.queue.iter().map(|entry| entry.map(|(k, v)| queue_entry(&k, &v)).map_err(Into::into)).collect()
    }

    pub(crate) fn take_cancels(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.core.t.cancels.iter() {
            let (k, v) = entry?;
            self.core.t.cancels.remove(&k)?;
            out.push((String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    pub(crate) async fn request_cancel(&self, id: &str, by: &str) -> Result<(), StoreError> {
        self.core.t.cancels.insert(id.as_bytes(), by.as_bytes())?;
        Ok(())
    }

    pub fn renew_lease(&self, id: &str, lease: Duration) -> Result<bool, StoreError> {
        let deadline = lease_deadline(lease);
        let old = self.core.t.running.fetch_and_update(id.as_bytes(), |old| old.map(|_| deadline.to_vec()))?;
        Ok(old.is_some())
    }

    pub fn expired_leases(&self) -> Result<Vec<String>, StoreError> {
        let now = lease_deadline(Duration::ZERO);
        let mut out = Vec::new();
        for entry in self.core.t.running.iter() {
            let (id, deadline) = entry?;
            if deadline.as_ref() < now.as_slice() {
                out.push(String::from_utf8_lossy(&id).into_owned());
            }
        }
        Ok(out)
    }

    pub fn running(&self) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        for entry in self.core.t.running.iter() {
            let (id, _) = entry?;
            if let Some(bytes) = self.core.t.jobs.get(&id)? {
                let job: Job = decode("jobs", &id, &bytes)?;
                if job.state == JobState::Running {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn publication_pending(&self, job: &str, purpose: Purpose) -> Result<bool, StoreError> {
        Ok(self.core.t.outbox.contains_key(outbox_key_of(job, purpose))?)
    }

    pub fn outbox(&self) -> Result<Vec<Publication>, StoreError> {
        let mut out = Vec::new();
        for entry in self.core.t.outbox.iter() {
            let (k, v) = entry?;
            out.push(decode("outbox", &k, &v)?);
        }
        Ok(out)
    }

    pub fn pending_ends(&self) -> Result<Vec<String>, StoreError> {
        self.core.t.ends.iter().keys().map(|k| Ok(String::from_utf8_lossy(&k?).into_owned())).collect()
    }

    pub fn end_handled(&self, id: &str) -> Result<(), StoreError> {
        self.core.t.ends.remove(id.as_bytes())?;
        Ok(())
    }

    pub fn pending(&self, repo: &str, number: u64) -> Result<Vec<Held>, StoreError> {
        let key = subject_key(repo, number);
        match self.core.t.approvals.get(key.as_bytes())? {
            Some(v) => decode("approvals", key.as_bytes(), &v),
            None => Ok(Vec::new()),
        }
    }

    pub fn held_all(&self) -> Result<Vec<(String, Vec<Held>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.core.t.approvals.iter() {
            let (k, v) = item?;
            let list: Vec<Held> = decode("approvals", &k, &v)?;
            if !list.is_empty() {
                out.push((String::from_utf8_lossy(&k).into_owned(), list));
            }
        }
        Ok(out)
    }

    pub(crate) fn note_agent(&self, job: &str, process: &serde_json::Value) -> Result<(), StoreError> {
        self.agents.insert(job.as_bytes(), encode(process))?;
        Ok(())
    }

    pub(crate) fn forget_agent(&self, job: &str) -> Result<(), StoreError> {
        self.agents.remove(job.as_bytes())?;
        Ok(())
    }

    pub fn agents(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.agents.iter() {
            let (k, v) = entry?;
            out.push((String::from_utf8_lossy(&k).into_owned(), decode("agents", &k, &v)?));
        }
        Ok(out)
    }

    pub(crate) fn schedule_last(&self, trigger: &str) -> Result<Option<chrono::DateTime<Utc>>, StoreError> {
        match self.schedules.get(trigger.as_bytes())? {
            Some(v) => Ok(Some(decode("schedules", trigger.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub async fn set_schedule_last(&self, trigger: &str, at: chrono::DateTime<Utc>) -> Result<(), StoreError> {
        self.schedules.insert(trigger.as_bytes(), encode(&at))?;
        self.flush().await
    }

    pub(crate) fn size_on_disk(&self) -> u64 {
        self.core.db.size_on_disk().unwrap_or(0)
    }

    pub fn flushes(&self) -> u64 {
        self.core.commit.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn census(&self) -> Result<Vec<super::TableSize>, StoreError> {
        let mut out = Vec::new();
        for name in self.core.db.tree_names() {
            let tree = self.core.db.open_tree(&name)?;
            let (mut records, mut bytes) = (0, 0);
            for item in tree.iter() {
                let (k, v) = item?;
                records += 1;
                bytes += (k.len() + v.len()) as u64;
            }
            let name = String::from_utf8_lossy(&name).into_owned();
            out.push(super::TableSize { name, records, bytes });
        }
        Ok(out)
    }

    pub fn job_count(&self) -> usize {
        self.core.t.jobs.len()
    }

    #[cfg(test)]
    fn clear_repo_index(&self) {
        self.core.t.queue_by_repo.clear().ok();
    }
}

/// Where a body fingerprint is kept in `deliveries`: apart from any
/// delivery id (those are printable ASCII, never a zero byte).
fn body_key(fingerprint: &str) -> Vec<u8> {
    let mut k = b"\0body:".to_vec();
    k.extend_from_slice(fingerprint.as_bytes());
    k
}

/// A job's result publication is keyed by the job id (as it always was);
/// the others by `job/purpose`, so a job has at most one of each.
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
fn queue_key(e: &QueueEntry) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = (100 - i16::from(e.priority).clamp(-100, 100)) as u8;
    key[1..].copy_from_slice(&e.seq.to_be_bytes());
    key
}

/// Queue values carry the agent and repository, so the dispatcher's limits
/// need no job read: `id \n agent \n repo`.
fn queue_value(e: &QueueEntry) -> Vec<u8> {
    format!("{}\n{}\n{}", e.id, e.agent, e.repo.as_deref().unwrap_or("")).into_bytes()
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
    let priority = key.first().map(|b| (100 - i16::from(*b)) as i8).unwrap_or(0);
    let seq = key.get(1..).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
    let text = String::from_utf8_lossy(value);
    let mut parts = text.splitn(3, '\n');
    let id = parts.next().unwrap_or_default().to_string();
    let agent = parts.next().unwrap_or_default().to_string();
    let repo = parts.next().filter(|r| !r.is_empty()).map(str::to_string);
    QueueEntry { priority, seq, id, agent, repo }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        StoreError::Database(Box::new(e))
    }
}

fn flatten<T>(r: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::JobSpec;

    /// A store written before `queue_by_repo` existed gets the index built
    /// when it opens, so its queued jobs still run.
    #[tokio::test]
    async fn the_repository_index_is_built_for_a_store_without_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        {
            let store = SledStore::open(dir.path(), Durability::Fsync).unwrap_or_else(|e| panic!("{e}"));
            for n in 0..3 {
                let spec = JobSpec {
                    trigger: format!("t{n}"),
                    agent: "a".into(),
                    repo: Some(format!("o/r{n}")),
                    ..JobSpec::default()
                };
                let delivery = Delivery::new(format!("d{n}"), "github", "issues.opened");
                let job = Job::new(format!("j{n}"), n, delivery.id.clone(), spec, Utc::now());
                store.admit(Admission { delivery, jobs: vec![job], held: Vec::new(), now: Utc::now() }).await.ok();
            }
            store.clear_repo_index();
            store.flush().await.ok();
        }
        // The first store's background threads let go of sled's file lock
        // a moment after it is dropped.
        let mut tries = 0;
        let store = loop {
            match SledStore::open(dir.path(), Durability::Fsync) {
                Ok(store) => break store,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let limits = Limits { per_replica: 1, per_repo: 1, ..Limits::default() };
        let next = ops::claim_next(&store, &limits, Duration::from_secs(60)).await.ok().flatten().map(|j| j.repo);
        assert_eq!(next, Some(Some("o/r0".to_string())));
        assert_eq!(store.core.t.queue_by_repo.len(), 2);
    }
}
