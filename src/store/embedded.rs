//! The embedded store: the store's tables as ordered byte maps in one local
//! database, each plan applied as one atomic write and durable before the
//! caller hears of it (by a group commit, or for the writer thread's
//! batches, on redb, by their own commit). The engine under it (redb,
//! the default, or sled) is behind `engine::Engine`; nothing here knows
//! which one it is.
//!
//! One replica only: an embedded database is a single process's. A
//! delivery and all its jobs are written together, so a 2xx can never stand
//! for half of them.

use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) mod engine;
mod notes;
pub(crate) mod redb;
pub(crate) mod sled;
mod tx;

use super::commit::Durability;
use super::{ops, writer, JobQuery, StoreError};
use crate::domain::admission::Admission;
use crate::domain::approval::Held;
use crate::domain::dispatch::QueueEntry;
use crate::domain::{subject_key, Accepted, Delivery, Job, JobState, Publication, PublicationState, Purpose};
use engine::{Engine, EngineExt, T};
use tx::block_on;

/// Marks a children's index that holds every job (see `EmbeddedStore::open`);
/// sorts after every parent id, which are printable.
const CHILDREN_BUILT: &[u8] = b"\xff built";

/// A child's key in the children's index.
fn child_key(parent: &str, seq: u64) -> Vec<u8> {
    [parent.as_bytes(), &[0], &seq.to_be_bytes()].concat()
}

/// What the store's transactions share: the engine, the one lock that lets
/// a single transaction run at a time, and the queue's length.
#[derive(Clone)]
pub(in crate::store) struct Core {
    pub(super) e: Arc<dyn Engine>,
    pub(super) lock: Arc<tokio::sync::Mutex<()>>,
    /// The queue's length, counted at open and kept by every commit (an
    /// engine may count a table by walking it).
    pub(super) queued: Arc<AtomicI64>,
    /// Whether a commit makes itself durable (the writer thread's: its
    /// callers are answered as soon as it returns).
    pub(super) durable_writes: bool,
}

/// The embedded database.
#[derive(Clone)]
pub(crate) struct EmbeddedStore {
    core: Core,
    /// Stores deliveries in batches (see `writer`).
    writer: Arc<writer::Writer<Admission>>,
}

impl EmbeddedStore {
    /// Opens (or creates) a sled store in `path`.
    pub fn open_sled(path: &Path, durability: Durability) -> Result<EmbeddedStore, StoreError> {
        let engine = sled::SledEngine::open(path, durability)?;
        tracing::warn!(
            path = %path.display(),
            "This store is sled: it keeps working, but sled has had no release since 2021 and does not \
             detect a damaged file. `baton migrate --from sled`, with the daemon stopped, copies it into \
             redb, the default."
        );
        EmbeddedStore::open(Arc::new(engine))
    }

    /// Opens (or creates) a redb store in `path`.
    pub fn open_redb(path: &Path, durability: Durability) -> Result<EmbeddedStore, StoreError> {
        let engine = redb::RedbEngine::open(path, durability)?;
        EmbeddedStore::open(Arc::new(engine))
    }

    /// Copies the sled store in `path` (`path/db/`) into a new redb store
    /// there, record by record, with its numbers carried on; then moves
    /// the sled files to `path/db.migrated`. Returns what each table held.
    /// The copy is made under another name and renamed once durable, so a
    /// crash leaves the sled store as it was.
    pub fn migrate_from_sled(path: &Path) -> Result<Vec<super::TableSize>, StoreError> {
        let target = path.join(redb::FILE);
        let refuse = |why: String| StoreError::Open { path: target.clone(), reason: why.into() };
        if target.exists() {
            return Err(refuse("a redb store is there already; nothing was copied".into()));
        }
        if !path.join("db").join("db").exists() {
            return Err(refuse(format!("there is no sled store in {} to copy", path.join("db").display())));
        }
        let partial = path.join(format!("{}.partial", redb::FILE));
        let _ = std::fs::remove_file(&partial);
        let mut copied = Vec::new();
        {
            let from = sled::SledEngine::open(path, Durability::Fsync)?;
            let to = redb::RedbEngine::open_file(&partial, Durability::Fsync)?;
            for t in T::ALL {
                let (mut records, mut bytes) = (0, 0);
                let mut lo: Option<Vec<u8>> = None;
                loop {
                    let from_key = lo.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
                    let chunk = from.entries(t, from_key, 1000)?;
                    let Some((last, _)) = chunk.last() else { break };
                    lo = Some(last.clone());
                    to.write(&mut |w| {
                        for (k, v) in &chunk {
                            w.insert(t, k, v)?;
                        }
                        Ok(())
                    })?;
                    records += chunk.len() as u64;
                    bytes += chunk.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
                }
                copied.push(super::TableSize { name: t.name().to_string(), records, bytes });
            }
            // sled's next number is past every one it gave.
            to.set_floor(from.next_ids(1)?.first().copied().unwrap_or(0))?;
            to.commit().flush_blocking()?;
        }
        let io = |e: std::io::Error| StoreError::Open { path: path.to_path_buf(), reason: Box::new(e) };
        // Each rename durable before the next: never a folder with neither
        // store in it, which would open as a new, empty one.
        let sync = || std::fs::File::open(path).and_then(|d| d.sync_all()).map_err(io);
        std::fs::rename(&partial, &target).map_err(io)?;
        sync()?;
        // The copy's seal names the file it was; the first open checks it.
        redb::RedbEngine::unseal(&partial);
        std::fs::rename(path.join("db"), path.join("db.migrated")).map_err(io)?;
        sync()?;
        Ok(copied)
    }

    fn open(e: Arc<dyn Engine>) -> Result<EmbeddedStore, StoreError> {
        // Stores from before the index have a queue without it.
        let empty = |t| e.entries(t, Bound::Unbounded, 1).map(|first| first.is_empty());
        if empty(T::QueueByRepo)? && !empty(T::Queue)? {
            let queue = e.entries(T::Queue, Bound::Unbounded, usize::MAX)?;
            e.write(&mut |w| {
                for (k, v) in &queue {
                    let entry = queue_entry(k, v);
                    w.insert(T::QueueByRepo, &by_repo_key(entry.repo.as_deref(), k), v)?;
                }
                Ok(())
            })?;
        }
        // Stores from before the children's index: filled once, marked done.
        if e.get(T::Children, CHILDREN_BUILT)?.is_none() {
            let mut children = Vec::new();
            e.scan(T::Jobs, Bound::Unbounded, Bound::Unbounded, false, &mut |id, bytes| {
                if let Ok(job) = serde_json::from_slice::<Job>(bytes) {
                    if let Some(parent) = &job.parent {
                        children.push((child_key(parent, job.seq), id.to_vec()));
                    }
                }
                Ok(true)
            })?;
            e.write(&mut |w| {
                for (k, id) in &children {
                    w.insert(T::Children, k, id)?;
                }
                w.insert(T::Children, CHILDREN_BUILT, &[])?;
                Ok(())
            })?;
        }
        let queued = Arc::new(AtomicI64::new(e.len(T::Queue)? as i64));
        let core = Core { e: e.clone(), lock: Arc::default(), queued, durable_writes: false };
        let admitting = Core { durable_writes: true, ..core.clone() };
        let writer =
            writer::Writer::start(move |batch: &mut [Admission]| block_on(ops::admit_batch(&admitting, batch)))
                .map_err(|e| StoreError::Database(Box::new(e)))?;
        Ok(EmbeddedStore { core, writer: Arc::new(writer) })
    }

    fn e(&self) -> &dyn Engine {
        &*self.core.e
    }

    fn get<V: DeserializeOwned>(&self, t: T, key: &[u8]) -> Result<Option<V>, StoreError> {
        match self.e().get(t, key)? {
            Some(bytes) => Ok(Some(decode(t, key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Every entry of `t`, decoded, with its key as text.
    fn all<V: DeserializeOwned>(&self, t: T) -> Result<Vec<(String, V)>, StoreError> {
        let mut out = Vec::new();
        self.e().scan(t, Bound::Unbounded, Bound::Unbounded, false, &mut |k, v| {
            out.push((String::from_utf8_lossy(k).into_owned(), decode(t, k, v)?));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every key of `t`, as text.
    fn keys(&self, t: T) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        self.e().scan(t, Bound::Unbounded, Bound::Unbounded, false, &mut |k, _| {
            out.push(String::from_utf8_lossy(k).into_owned());
            Ok(true)
        })?;
        Ok(out)
    }

    /// Makes every write so far durable (shared with concurrent writers:
    /// see `commit`).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.e().commit().durable().await
    }

    pub async fn admit(&self, admission: Admission) -> Result<Accepted, StoreError> {
        self.writer.submit(admission).await
    }

    pub async fn prune_deliveries(&self, cutoff: chrono::DateTime<Utc>) -> Result<usize, StoreError> {
        let end = (cutoff.timestamp_millis().max(0) as u64).to_be_bytes();
        let mut total = 0;
        loop {
            let mut batch = Vec::new();
            self.e().scan(T::DeliveryTimes, Bound::Unbounded, Bound::Excluded(&end), false, &mut |k, _| {
                batch.push(k.to_vec());
                Ok(batch.len() < 500)
            })?;
            if batch.is_empty() {
                break;
            }
            self.e().write(&mut |w| {
                for key in &batch {
                    w.remove(T::DeliveryTimes, key)?;
                    w.remove(T::Deliveries, key.get(8..).unwrap_or_default())?;
                }
                Ok(())
            })?;
            total += batch.len();
            tokio::task::yield_now().await;
        }
        // What baton asked GitHub to redeliver is worth remembering only as
        // long as the deliveries themselves.
        let mut old = Vec::new();
        self.e().scan(T::Redeliveries, Bound::Unbounded, Bound::Unbounded, false, &mut |guid, asked| {
            let stale = chrono::DateTime::parse_from_rfc3339(&String::from_utf8_lossy(asked))
                .map_or(true, |at| at.timestamp_millis() < cutoff.timestamp_millis());
            if stale {
                old.push(guid.to_vec());
            }
            Ok(true)
        })?;
        self.remove_all(T::Redeliveries, &old)?;
        if total + old.len() > 0 {
            self.flush().await?;
        }
        Ok(total)
    }

    fn remove_all(&self, t: T, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        for chunk in keys.chunks(500) {
            self.e().write(&mut |w| {
                for k in chunk {
                    w.remove(t, k)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    pub(crate) async fn prune_jobs(
        &self,
        cutoff: chrono::DateTime<Utc>,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut doomed: Vec<(Vec<u8>, String)> = Vec::new();
        let mut parents: std::collections::HashMap<String, String> = Default::default();
        self.e().scan(T::JobIndex, Bound::Unbounded, Bound::Unbounded, false, &mut |seq, id| {
            let id = String::from_utf8_lossy(id).into_owned();
            let Some(job) = self.job(&id)? else {
                doomed.push((seq.to_vec(), id)); // an index entry left by a crash
                return Ok(true);
            };
            // Jobs are indexed in creation order: none created after the
            // cutoff can have finished before it.
            if job.created_at >= cutoff || doomed.len() >= max {
                return Ok(false);
            }
            let finished_before = job.state.is_final() && job.finished_at.is_some_and(|t| t < cutoff);
            if !finished_before || self.e().get(T::Ends, id.as_bytes())?.is_some() {
                return Ok(true);
            }
            let mut pending = false;
            self.e().scan_prefix(T::Outbox, id.as_bytes(), false, &mut |_, v| {
                pending = serde_json::from_slice::<Publication>(v)
                    .is_ok_and(|p| p.job == id && p.state == PublicationState::Pending);
                Ok(!pending)
            })?;
            if !pending {
                if let Some(parent) = job.parent {
                    parents.insert(id.clone(), parent);
                }
                doomed.push((seq.to_vec(), id));
            }
            Ok(true)
        })?;
        if doomed.is_empty() {
            return Ok(Vec::new());
        }
        self.e().write(&mut |w| {
            for (seq, id) in &doomed {
                w.remove(T::JobIndex, seq)?;
                if let Some(parent) = parents.get(id) {
                    let s = seq.as_slice().try_into().map(u64::from_be_bytes).unwrap_or_default();
                    w.remove(T::Children, &child_key(parent, s))?;
                }
                w.remove(T::Jobs, id.as_bytes())?;
                for purpose in Purpose::ALL {
                    w.remove(T::Outbox, &outbox_key_of(id, purpose))?;
                }
            }
            Ok(())
        })?;
        self.flush().await?;
        Ok(doomed.into_iter().map(|(_, id)| id).collect())
    }

    pub(crate) async fn note_redelivery(&self, guid: &str) -> Result<bool, StoreError> {
        let now = Utc::now().to_rfc3339();
        let fresh = self.e().write_with(|w| {
            let fresh = w.get(T::Redeliveries, guid.as_bytes())?.is_none();
            if fresh {
                w.insert(T::Redeliveries, guid.as_bytes(), now.as_bytes())?;
            }
            Ok(fresh)
        })?;
        self.flush().await?;
        Ok(fresh)
    }

    pub fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        self.get(T::Deliveries, id.as_bytes())
    }

    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.get(T::Jobs, id.as_bytes())
    }

    pub fn list_jobs(&self, q: &JobQuery) -> Result<Vec<Job>, StoreError> {
        if let Some(parent) = &q.parent {
            // Its children, newest first, from the index.
            let prefix = child_key(parent, 0);
            let prefix = &prefix[..prefix.len() - 8];
            let hi = match q.before {
                Some(before) => Some(child_key(parent, before)),
                None => engine::prefix_end(prefix),
            };
            let hi = hi.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            return self.newest_matching(q, T::Children, Bound::Included(prefix), hi);
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
        let before = q.before.map(u64::to_be_bytes);
        let hi = before.as_ref().map_or(Bound::Unbounded, |b| Bound::Excluded(b.as_slice()));
        self.newest_matching(q, T::JobIndex, Bound::Unbounded, hi)
    }

    /// The jobs an index's entries (key → job id) in `lo..hi` name that `q`
    /// matches, newest first, up to its limit.
    fn newest_matching(
        &self,
        q: &JobQuery,
        index: T,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
    ) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        self.e().scan(index, lo, hi, true, &mut |_, id| {
            if let Some(job) = self.get::<Job>(T::Jobs, id)? {
                if q.matches(&job) {
                    out.push(job);
                }
            }
            Ok(out.len() < q.limit)
        })?;
        Ok(out)
    }

    pub(crate) fn queue_len(&self) -> usize {
        self.core.queued.load(Ordering::Relaxed).max(0) as usize
    }

    pub fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        let mut out = Vec::new();
        self.e().scan(T::Queue, Bound::Unbounded, Bound::Unbounded, false, &mut |k, v| {
            out.push(queue_entry(k, v));
            Ok(true)
        })?;
        Ok(out)
    }

    pub(crate) fn take_cancels(&self) -> Result<Vec<(String, String)>, StoreError> {
        let all = self.e().entries(T::Cancels, Bound::Unbounded, usize::MAX)?;
        let keys: Vec<Vec<u8>> = all.iter().map(|(k, _)| k.clone()).collect();
        self.remove_all(T::Cancels, &keys)?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok(all.iter().map(|(k, v)| (text(k), text(v))).collect())
    }

    pub(crate) async fn request_cancel(&self, id: &str, by: &str) -> Result<(), StoreError> {
        self.e().write(&mut |w| w.insert(T::Cancels, id.as_bytes(), by.as_bytes()).map(drop))
    }

    pub fn renew_lease(&self, id: &str, lease: Duration) -> Result<bool, StoreError> {
        let deadline = lease_deadline(lease);
        self.e().write_with(|w| {
            let held = w.get(T::Running, id.as_bytes())?.is_some();
            if held {
                w.insert(T::Running, id.as_bytes(), &deadline)?;
            }
            Ok(held)
        })
    }

    pub fn expired_leases(&self) -> Result<Vec<String>, StoreError> {
        let now = lease_deadline(Duration::ZERO);
        let mut out = Vec::new();
        self.e().scan(T::Running, Bound::Unbounded, Bound::Unbounded, false, &mut |id, deadline| {
            if deadline < now.as_slice() {
                out.push(String::from_utf8_lossy(id).into_owned());
            }
            Ok(true)
        })?;
        Ok(out)
    }

    pub fn running(&self) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        for id in self.keys(T::Running)? {
            if let Some(job) = self.job(&id)? {
                if job.state == JobState::Running {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn publication_pending(&self, job: &str, purpose: Purpose) -> Result<bool, StoreError> {
        Ok(self.e().get(T::Outbox, &outbox_key_of(job, purpose))?.is_some())
    }

    pub fn outbox(&self) -> Result<Vec<Publication>, StoreError> {
        Ok(self.all(T::Outbox)?.into_iter().map(|(_, p)| p).collect())
    }

    pub fn pending_ends(&self) -> Result<Vec<String>, StoreError> {
        self.keys(T::Ends)
    }

    pub fn end_handled(&self, id: &str) -> Result<(), StoreError> {
        self.e().write(&mut |w| w.remove(T::Ends, id.as_bytes()).map(drop))
    }

    pub fn pending(&self, repo: &str, number: u64) -> Result<Vec<Held>, StoreError> {
        let key = subject_key(repo, number);
        Ok(self.get(T::Approvals, key.as_bytes())?.unwrap_or_default())
    }

    pub fn held_all(&self) -> Result<Vec<(String, Vec<Held>)>, StoreError> {
        Ok(self.all::<Vec<Held>>(T::Approvals)?.into_iter().filter(|(_, list)| !list.is_empty()).collect())
    }

    pub(crate) fn note_agent(&self, job: &str, process: &serde_json::Value) -> Result<(), StoreError> {
        self.e().write(&mut |w| w.insert(T::Agents, job.as_bytes(), &encode(process)).map(drop))
    }

    pub(crate) fn forget_agent(&self, job: &str) -> Result<(), StoreError> {
        self.e().write(&mut |w| w.remove(T::Agents, job.as_bytes()).map(drop))
    }

    pub fn agents(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        self.all(T::Agents)
    }

    pub(crate) fn schedule_last(&self, trigger: &str) -> Result<Option<chrono::DateTime<Utc>>, StoreError> {
        self.get(T::Schedules, trigger.as_bytes())
    }

    pub async fn set_schedule_last(&self, trigger: &str, at: chrono::DateTime<Utc>) -> Result<(), StoreError> {
        self.e().write(&mut |w| w.insert(T::Schedules, trigger.as_bytes(), &encode(&at)).map(drop))?;
        self.flush().await
    }

    pub(crate) fn size_on_disk(&self) -> u64 {
        self.e().size_on_disk()
    }

    pub(crate) async fn upkeep(&self) -> Result<(), StoreError> {
        let e = self.core.e.clone();
        tokio::task::spawn_blocking(move || e.upkeep()).await.map_err(|e| StoreError::Database(Box::new(e)))?
    }

    pub fn flushes(&self) -> u64 {
        self.e().commit().flushes.load(Ordering::Relaxed)
    }

    pub fn unflushed(&self) -> u64 {
        self.e().commit().unflushed()
    }

    pub fn census(&self) -> Result<Vec<super::TableSize>, StoreError> {
        let mut out = Vec::new();
        for t in T::ALL {
            let (mut records, mut bytes) = (0, 0);
            self.e().scan(t, Bound::Unbounded, Bound::Unbounded, false, &mut |k, v| {
                records += 1;
                bytes += (k.len() + v.len()) as u64;
                Ok(true)
            })?;
            out.push(super::TableSize { name: t.name().to_string(), records, bytes });
        }
        Ok(out)
    }

    pub fn job_count(&self) -> usize {
        self.e().len(T::Jobs).unwrap_or(0)
    }

    #[cfg(test)]
    fn clear_repo_index(&self) {
        let all = self.e().entries(T::QueueByRepo, Bound::Unbounded, usize::MAX).unwrap_or_default();
        let keys: Vec<Vec<u8>> = all.into_iter().map(|(k, _)| k).collect();
        self.remove_all(T::QueueByRepo, &keys).ok();
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

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Records are plain data structs; serializing them cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<V: DeserializeOwned>(t: T, key: &[u8], bytes: &[u8]) -> Result<V, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        tree: t.name(),
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::engine::{Visit, Writes};
    use super::*;
    use crate::domain::dispatch::Limits;
    use crate::rules::JobSpec;
    use crate::store::commit::GroupCommit;

    /// A store written before `queue_by_repo` existed gets the index built
    /// when it opens, so its queued jobs still run.
    #[tokio::test]
    async fn the_repository_index_is_built_for_a_store_without_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        {
            let store = EmbeddedStore::open_sled(dir.path(), Durability::Fsync).unwrap_or_else(|e| panic!("{e}"));
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
            match EmbeddedStore::open_sled(dir.path(), Durability::Fsync) {
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
        assert_eq!(store.e().len(T::QueueByRepo).ok(), Some(2));
    }

    /// An engine that counts what it is asked to read: entries a scan
    /// visits, and tables counted whole.
    struct Counting {
        inner: redb::RedbEngine,
        visited: std::sync::atomic::AtomicUsize,
        counted: std::sync::atomic::AtomicUsize,
    }

    impl Counting {
        /// Entries visited and tables counted since the last call.
        fn take(&self) -> (usize, usize) {
            (self.visited.swap(0, Ordering::Relaxed), self.counted.swap(0, Ordering::Relaxed))
        }
    }

    impl Engine for Counting {
        fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(t, key)
        }
        fn scan(&self, t: T, lo: Bound<&[u8]>, hi: Bound<&[u8]>, rev: bool, visit: Visit) -> Result<(), StoreError> {
            self.inner.scan(t, lo, hi, rev, &mut |k, v| {
                self.visited.fetch_add(1, Ordering::Relaxed);
                visit(k, v)
            })
        }
        fn len(&self, t: T) -> Result<usize, StoreError> {
            self.counted.fetch_add(1, Ordering::Relaxed);
            self.inner.len(t)
        }
        fn write(&self, f: &mut dyn FnMut(&mut dyn Writes) -> Result<(), StoreError>) -> Result<(), StoreError> {
            self.inner.write(f)
        }
        fn write_durably(
            &self,
            f: &mut dyn FnMut(&mut dyn Writes) -> Result<(), StoreError>,
        ) -> Result<bool, StoreError> {
            self.inner.write_durably(f)
        }
        fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError> {
            self.inner.next_ids(n)
        }
        fn commit(&self) -> &Arc<GroupCommit> {
            self.inner.commit()
        }
        fn size_on_disk(&self) -> u64 {
            self.inner.size_on_disk()
        }
    }

    /// A store on a counting redb engine, holding `others` jobs with no
    /// parent and then two children of job `p`.
    async fn store_with_children(dir: &Path, others: u64) -> (EmbeddedStore, Arc<Counting>) {
        let inner = redb::RedbEngine::open(dir, Durability::Fsync).unwrap_or_else(|e| panic!("{e}"));
        let counting = Arc::new(Counting { inner, visited: Default::default(), counted: Default::default() });
        let store = EmbeddedStore::open(counting.clone()).unwrap_or_else(|e| panic!("{e}"));
        for n in 0..others + 2 {
            let spec =
                JobSpec { trigger: "t".into(), agent: "a".into(), repo: Some("o/r".into()), ..JobSpec::default() };
            let delivery = Delivery::new(format!("d{n}"), "github", "issues.opened");
            let mut job = Job::new(format!("j{n}"), n, delivery.id.clone(), spec, Utc::now());
            if n >= others {
                job.parent = Some("p".into());
            }
            let admitted =
                store.admit(Admission { delivery, jobs: vec![job], held: Vec::new(), now: Utc::now() }).await;
            assert!(matches!(admitted, Ok(Accepted::New(_))), "{admitted:?}");
        }
        (store, counting)
    }

    /// A job's children are read from their index: listing them visits
    /// them, not every job stored (issue 29's scan by `parent`).
    #[tokio::test]
    async fn a_jobs_children_are_listed_without_visiting_other_jobs() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (store, counting) = store_with_children(dir.path(), 300).await;
        counting.take();
        let q = JobQuery { parent: Some("p".into()), limit: 50, ..JobQuery::default() };
        let children: Vec<String> =
            store.list_jobs(&q).unwrap_or_else(|e| panic!("{e}")).into_iter().map(|j| j.id).collect();
        assert_eq!(children, ["j301", "j300"]);
        assert_eq!(counting.take(), (2, 0), "(entries visited, tables counted) to list two children among 302 jobs");
    }

    /// What `/metrics` reads of the store (the queue's depth, the size on
    /// disk) costs no walk of a table, however many jobs wait.
    #[tokio::test]
    async fn the_queue_depth_and_size_are_read_without_walking_a_table() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (store, counting) = store_with_children(dir.path(), 300).await;
        counting.take();
        assert_eq!(store.queue_len(), 302);
        assert!(store.size_on_disk() > 0);
        assert_eq!(counting.take(), (0, 0), "(entries visited, tables counted) for /metrics");
    }
}
