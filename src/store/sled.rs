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

use super::commit::{self, Durability};
use super::{writer, JobQuery, PrHead, StoreError};
use crate::domain::admission::{self, Admission, AdmitView};
use crate::domain::approval::{self, Pending};
use crate::domain::dispatch::{self, Claim, Limits, Load, QueueEntry};
use crate::domain::{
    subject_key, Accepted, Approval, Delivery, GroupState, Job, JobState, Plan, Publication, PublicationState, Purpose,
    Write,
};

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
}

impl Tables {
    fn all(&self) -> [&Tree; 13] {
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
        ]
    }

    /// Runs `f` in one transaction over every table.
    fn transaction<R>(&self, f: impl Fn(&Tx) -> Result<R, TxError>) -> Result<R, StoreError> {
        let all = self.all();
        let result = all[..].transaction(|trees: &Vec<TransactionalTree>| f(&Tx { trees }).map_err(Into::into));
        flatten(result)
    }
}

/// The tables inside one transaction.
struct Tx<'a> {
    trees: &'a [TransactionalTree],
}

type TxError = sled::transaction::UnabortableTransactionError;

impl Tx<'_> {
    fn t(&self, t: T) -> &TransactionalTree {
        // `Tables::all` lists every `T`, in order.
        &self.trees[t as usize]
    }

    fn get<V: DeserializeOwned>(&self, t: T, key: &[u8]) -> Result<Option<V>, TxError> {
        Ok(self.t(t).get(key)?.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Applies a plan's writes in order.
    fn apply(&self, plan: &Plan, lease: Duration) -> Result<(), TxError> {
        for w in plan {
            match w {
                Write::Delivery(d) => {
                    let key = d.id.as_bytes();
                    let millis = (d.received_at.timestamp_millis().max(0) as u64).to_be_bytes();
                    self.t(T::Deliveries).insert(key, encode(d))?;
                    self.t(T::DeliveryTimes).insert([&millis[..], key].concat(), &[])?;
                    if let Some(f) = &d.fingerprint {
                        // Kept beside the delivery id, and forgotten with it.
                        let body = body_key(f);
                        self.t(T::Deliveries).insert(body.as_slice(), key)?;
                        self.t(T::DeliveryTimes).insert([&millis[..], &body].concat(), &[])?;
                    }
                }
                Write::Job { job, new } => {
                    self.t(T::Jobs).insert(job.id.as_bytes(), encode(job))?;
                    if *new {
                        self.t(T::JobIndex).insert(&job.seq.to_be_bytes(), job.id.as_bytes())?;
                    }
                }
                Write::Enqueue(e) => {
                    let (key, value) = (queue_key(e), queue_value(e));
                    self.t(T::QueueByRepo).insert(by_repo_key(e.repo.as_deref(), &key), value.as_slice())?;
                    self.t(T::Queue).insert(&key, value)?;
                }
                Write::Dequeue(e) => {
                    let key = queue_key(e);
                    self.t(T::QueueByRepo).remove(by_repo_key(e.repo.as_deref(), &key))?;
                    self.t(T::Queue).remove(&key)?;
                }
                Write::Group { name, state } => {
                    if state.running.is_none() && state.waiting.is_empty() {
                        self.t(T::Groups).remove(name.as_bytes())?;
                    } else {
                        self.t(T::Groups).insert(name.as_bytes(), encode(state))?;
                    }
                }
                Write::Throttle { key, runs } => {
                    self.t(T::Throttle).insert(key.as_bytes(), encode(runs))?;
                }
                Write::Cancel { job, by } => {
                    self.t(T::Cancels).insert(job.as_bytes(), by.as_bytes())?;
                }
                Write::Held { subject, list } => {
                    if list.is_empty() {
                        self.t(T::Approvals).remove(subject.as_bytes())?;
                    } else {
                        self.t(T::Approvals).insert(subject.as_bytes(), encode(list))?;
                    }
                }
                Write::Lease(id) => {
                    self.t(T::Running).insert(id.as_bytes(), &lease_deadline(lease))?;
                }
                Write::Unlease(id) => {
                    self.t(T::Running).remove(id.as_bytes())?;
                }
                Write::End(id) => {
                    self.t(T::Ends).insert(id.as_bytes(), &[])?;
                }
                Write::Outbox(p) => {
                    self.t(T::Outbox).insert(outbox_key_of(&p.job, p.purpose), encode(p))?;
                }
                Write::Unbox { job, purpose } => {
                    self.t(T::Outbox).remove(outbox_key_of(job, *purpose))?;
                }
            }
        }
        Ok(())
    }

    /// Loads what admitting `batch` reads.
    fn admit_view(&self, batch: &[Admission]) -> Result<AdmitView, TxError> {
        let wanted = AdmitView::wanted(batch);
        let mut view = AdmitView::default();
        for id in &wanted.deliveries {
            if self.t(T::Deliveries).get(id.as_bytes())?.is_some() {
                view.deliveries.insert(id.clone());
            }
        }
        for f in &wanted.bodies {
            if let Some(first) = self.t(T::Deliveries).get(body_key(f))? {
                view.bodies.insert(f.clone(), String::from_utf8_lossy(&first).into_owned());
            }
        }
        for g in &wanted.groups {
            if let Some(st) = self.get::<GroupState>(T::Groups, g.as_bytes())? {
                view.groups.insert(g.clone(), st);
            }
        }
        for id in wanted.jobs.iter().chain(&view.waiting()) {
            if let Some(job) = self.get::<Job>(T::Jobs, id.as_bytes())? {
                view.jobs.insert(id.clone(), job);
            }
        }
        for key in &wanted.throttles {
            if let Some(v) = self.t(T::Throttle).get(key.as_bytes())? {
                view.throttles.insert(key.clone(), decode_runs(&v));
            }
        }
        for s in &wanted.subjects {
            if let Some(list) = self.get::<Vec<Pending>>(T::Approvals, s.as_bytes())? {
                view.held.insert(s.clone(), list);
            }
        }
        Ok(view)
    }
}

/// Throttle runs as stored: a list of Unix millis (older stores kept a
/// cooldown's last run as one number).
fn decode_runs(v: &[u8]) -> Vec<i64> {
    serde_json::from_slice::<Vec<i64>>(v)
        .or_else(|_| serde_json::from_slice::<i64>(v).map(|t| vec![t]))
        .unwrap_or_default()
}

/// The sled database.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    commit: std::sync::Arc<commit::GroupCommit>,
    /// Stores deliveries in batches (see `writer`).
    writer: std::sync::Arc<writer::Writer<Admission>>,
    t: Tables,
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
}

impl SledStore {
    pub fn open(path: &Path, durability: Durability) -> Result<SledStore, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_path_buf(), source: Box::new(source) };
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
        };
        // sled keeps its log in `db/db`; group commit fsyncs it (see `commit`).
        let data_file = std::fs::File::open(path.join("db").join("db")).map_err(|e| open_err(sled::Error::Io(e)))?;
        let commit = commit::GroupCommit::new(db.clone(), data_file, durability);
        let tables = t.clone();
        let writer = writer::Writer::start(commit.clone(), move |batch: &[Admission]| {
            tables.transaction(|tx| {
                let mut view = tx.admit_view(batch)?;
                let mut answers = Vec::with_capacity(batch.len());
                for a in batch {
                    let (accepted, plan) = admission::admit(&mut view, a);
                    tx.apply(&plan, Duration::ZERO)?;
                    answers.push(accepted);
                }
                Ok(answers)
            })
        })
        .map_err(|e| open_err(sled::Error::Io(e)))?;
        // Stores from before the index have a queue without it.
        if t.queue_by_repo.is_empty() && !t.queue.is_empty() {
            for item in t.queue.iter() {
                let (k, v) = item.map_err(open_err)?;
                let entry = queue_entry(&k, &v);
                t.queue_by_repo.insert(by_repo_key(entry.repo.as_deref(), &k), v).map_err(open_err)?;
            }
        }
        Ok(SledStore {
            commit,
            writer: std::sync::Arc::new(writer),
            schedules: tree("schedules")?,
            heads: tree("heads")?,
            notes: tree("notes")?,
            agents: tree("agents")?,
            redeliveries: tree("redeliveries")?,
            t,
            db,
        })
    }

    /// Makes every write so far durable (shared with concurrent writers:
    /// see `commit`).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.commit.durable().await
    }

    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    pub async fn admit(&self, admission: Admission) -> Result<Accepted, StoreError> {
        self.writer.submit(admission).await
    }

    pub async fn prune_deliveries(&self, cutoff: chrono::DateTime<Utc>) -> Result<usize, StoreError> {
        let end = (cutoff.timestamp_millis().max(0) as u64).to_be_bytes();
        let mut total = 0;
        loop {
            let batch =
                self.t.delivery_times.range(..end.as_slice()).keys().take(500).collect::<Result<Vec<_>, _>>()?;
            if batch.is_empty() {
                break;
            }
            let result = (&self.t.delivery_times, &self.t.deliveries).transaction(|(times, deliveries)| {
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

    pub async fn prune_jobs(&self, cutoff: chrono::DateTime<Utc>, max: usize) -> Result<Vec<String>, StoreError> {
        let mut doomed: Vec<(Vec<u8>, String)> = Vec::new();
        for item in self.t.job_index.iter() {
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
            if !finished_before || self.t.ends.contains_key(id.as_bytes())? {
                continue;
            }
            let pending = self.t.outbox.scan_prefix(id.as_bytes()).values().any(|v| {
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
        let result = (&self.t.jobs, &self.t.job_index, &self.t.outbox).transaction(|(jobs, index, outbox)| {
            for (seq, id) in &doomed {
                index.remove(seq.as_slice())?;
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

    pub async fn note_redelivery(&self, guid: &str) -> Result<bool, StoreError> {
        let now = Utc::now().to_rfc3339();
        let fresh =
            self.redeliveries.compare_and_swap(guid.as_bytes(), None as Option<&[u8]>, Some(now.as_bytes()))?.is_ok();
        self.flush().await?;
        Ok(fresh)
    }

    pub fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        match self.t.deliveries.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode("deliveries", id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        match self.t.jobs.get(id.as_bytes())? {
            Some(bytes) => Ok(Some(decode("jobs", id.as_bytes(), &bytes)?)),
            None => Ok(None),
        }
    }

    pub fn list_jobs(&self, q: &JobQuery) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        if let Some(delivery) = &q.delivery {
            if let Some(d) = self.delivery(delivery)? {
                for id in d.jobs {
                    out.extend(self.job(&id)?);
                }
            }
            return Ok(q.finish(out));
        }
        let entries = match q.before {
            Some(seq) => self.t.job_index.range(..seq.to_be_bytes().as_slice()),
            None => self.t.job_index.iter(),
        };
        for entry in entries.rev() {
            let (_, id) = entry?;
            let Some(bytes) = self.t.jobs.get(&id)? else {
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

    pub fn queue_len(&self) -> usize {
        self.t.queue.len()
    }

    pub fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.t.queue.iter().map(|entry| entry.map(|(k, v)| queue_entry(&k, &v)).map_err(Into::into)).collect()
    }

    /// What runs now (every running job is this replica's).
    fn load(&self) -> Result<Load, StoreError> {
        let mut load = Load::default();
        for entry in self.t.running.iter() {
            let (id, _) = entry?;
            if let Some(job) = self.job(&String::from_utf8_lossy(&id))? {
                load.add(&QueueEntry::of(&job), true);
            }
        }
        Ok(load)
    }

    /// The queued job to run next within `limits`: the first in queue order
    /// among the first admissible entry of each repository's line, passing
    /// over whole repositories at their limit without reading them.
    fn next_queued(
        &self,
        limits: &Limits,
        load: &Load,
        passed: &HashSet<String>,
    ) -> Result<Option<QueueEntry>, StoreError> {
        let mut best: Option<QueueEntry> = None;
        let mut from: Vec<u8> = Vec::new();
        while let Some(first) = self.t.queue_by_repo.range(from.as_slice()..).next() {
            let (k, _) = first?;
            // repository ++ 0 ++ 9-byte queue key
            let Some(repo_len) = k.len().checked_sub(10) else {
                from = k.to_vec();
                from.push(0);
                continue;
            };
            let repo = (repo_len > 0).then(|| String::from_utf8_lossy(&k[..repo_len]).into_owned());
            if !load.repo_full(limits, repo.as_deref()) {
                for item in self.t.queue_by_repo.scan_prefix(&k[..=repo_len]) {
                    let (k, v) = item?;
                    let entry = queue_entry(&k[repo_len + 1..], &v);
                    if !passed.contains(&entry.id) && load.admits(limits, &entry) {
                        if best.as_ref().is_none_or(|b| entry.order() < b.order()) {
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

    pub async fn claim_next(&self, limits: &Limits, lease: Duration) -> Result<Option<Job>, StoreError> {
        let load = self.load()?;
        if !load.has_room(limits) {
            return Ok(None);
        }
        // Entries whose group is busy, passed over this time.
        let mut passed = HashSet::new();
        while let Some(entry) = self.next_queued(limits, &load, &passed)? {
            let claimed = self.t.transaction(|tx| {
                let job = tx.get::<Job>(T::Jobs, entry.id.as_bytes())?;
                let group = match job.as_ref().and_then(|j| j.spec.concurrency.as_ref()) {
                    Some(g) => tx.get::<GroupState>(T::Groups, g.as_bytes())?,
                    None => None,
                };
                Ok(match dispatch::claim(&entry, job.as_ref(), group.as_ref(), Utc::now()) {
                    Claim::Run(job, plan) => {
                        tx.apply(&plan, lease)?;
                        Some(Some(*job))
                    }
                    Claim::Stale(plan) => {
                        tx.apply(&plan, lease)?;
                        None
                    }
                    Claim::Wait => Some(None),
                })
            })?;
            match claimed {
                Some(Some(job)) => {
                    self.flush().await?;
                    return Ok(Some(job));
                }
                Some(None) | None => {
                    passed.insert(entry.id);
                }
            }
        }
        Ok(None)
    }

    pub fn take_cancels(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.t.cancels.iter() {
            let (k, v) = entry?;
            self.t.cancels.remove(&k)?;
            out.push((String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    pub async fn request_cancel(&self, id: &str, by: &str) -> Result<(), StoreError> {
        self.t.cancels.insert(id.as_bytes(), by.as_bytes())?;
        Ok(())
    }

    pub async fn save(&self, job: &Job) -> Result<(), StoreError> {
        self.t.transaction(|tx| {
            let stored = tx.get::<Job>(T::Jobs, job.id.as_bytes())?;
            tx.apply(
                &vec![Write::Job { job: Box::new(dispatch::merged(job, stored.as_ref())), new: false }],
                Duration::ZERO,
            )
        })?;
        self.flush().await
    }

    pub async fn record_spend(
        &self,
        spec: &crate::rules::JobSpec,
        usd: f64,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        self.t.transaction(|tx| {
            let mut stored = std::collections::HashMap::new();
            for b in admission::budget_keys(spec) {
                if let Some(runs) = tx.get::<Vec<i64>>(T::Throttle, b.key.as_bytes())? {
                    stored.insert(b.key, runs);
                }
            }
            tx.apply(&admission::spend(&stored, spec, usd, now), Duration::ZERO)
        })?;
        self.flush().await
    }

    pub async fn finish(&self, job: &Job, publications: &[Publication]) -> Result<(), StoreError> {
        self.t.transaction(|tx| {
            let stored = tx.get::<Job>(T::Jobs, job.id.as_bytes())?;
            let group = match &job.spec.concurrency {
                Some(g) => tx.get::<GroupState>(T::Groups, g.as_bytes())?,
                None => None,
            };
            tx.apply(&dispatch::finish(job, stored.as_ref(), group.as_ref(), publications), Duration::ZERO)
        })?;
        self.flush().await
    }

    pub async fn start_publications(&self, job: &Job, publications: &[Publication]) -> Result<(), StoreError> {
        self.t.transaction(|tx| {
            let stored = tx.get::<Job>(T::Jobs, job.id.as_bytes())?;
            let mut plan = vec![Write::Job { job: Box::new(dispatch::merged(job, stored.as_ref())), new: false }];
            plan.extend(publications.iter().map(|p| Write::Outbox(Box::new(p.clone()))));
            tx.apply(&plan, Duration::ZERO)
        })?;
        self.flush().await
    }

    pub async fn cancel_queued(&self, id: &str, reason: &str) -> Result<Option<Job>, StoreError> {
        let job = self.t.transaction(|tx| {
            let Some(job) = tx.get::<Job>(T::Jobs, id.as_bytes())?.filter(|j| j.state == JobState::Queued) else {
                return Ok(None);
            };
            let group = match &job.spec.concurrency {
                Some(g) => tx.get::<GroupState>(T::Groups, g.as_bytes())?,
                None => None,
            };
            let (job, plan) = dispatch::cancel(&job, group.as_ref(), reason, Utc::now());
            tx.apply(&plan, Duration::ZERO)?;
            Ok(Some(job))
        })?;
        if job.is_some() {
            self.flush().await?;
        }
        Ok(job)
    }

    pub fn renew_lease(&self, id: &str, lease: Duration) -> Result<bool, StoreError> {
        let deadline = lease_deadline(lease);
        let old = self.t.running.fetch_and_update(id.as_bytes(), |old| old.map(|_| deadline.to_vec()))?;
        Ok(old.is_some())
    }

    pub fn expired_leases(&self) -> Result<Vec<String>, StoreError> {
        let now = lease_deadline(Duration::ZERO);
        let mut out = Vec::new();
        for entry in self.t.running.iter() {
            let (id, deadline) = entry?;
            if deadline.as_ref() < now.as_slice() {
                out.push(String::from_utf8_lossy(&id).into_owned());
            }
        }
        Ok(out)
    }

    pub fn running(&self) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::new();
        for entry in self.t.running.iter() {
            let (id, _) = entry?;
            if let Some(bytes) = self.t.jobs.get(&id)? {
                let job: Job = decode("jobs", &id, &bytes)?;
                if job.state == JobState::Running {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }

    pub fn publication_pending(&self, job: &str, purpose: Purpose) -> Result<bool, StoreError> {
        Ok(self.t.outbox.contains_key(outbox_key_of(job, purpose))?)
    }

    pub fn outbox(&self) -> Result<Vec<Publication>, StoreError> {
        let mut out = Vec::new();
        for entry in self.t.outbox.iter() {
            let (k, v) = entry?;
            out.push(decode("outbox", &k, &v)?);
        }
        Ok(out)
    }

    pub async fn update_publication(&self, p: &Publication, created: bool) -> Result<(), StoreError> {
        self.t.transaction(|tx| {
            let job = tx.get::<Job>(T::Jobs, p.job.as_bytes())?;
            tx.apply(&dispatch::publication_update(job.as_ref(), p, created, Utc::now()), Duration::ZERO)
        })?;
        self.flush().await
    }

    pub fn pending_ends(&self) -> Result<Vec<String>, StoreError> {
        self.t.ends.iter().keys().map(|k| Ok(String::from_utf8_lossy(&k?).into_owned())).collect()
    }

    pub fn end_handled(&self, id: &str) -> Result<(), StoreError> {
        self.t.ends.remove(id.as_bytes())?;
        Ok(())
    }

    pub fn set_head(&self, repo: &str, number: u64, head: &PrHead, updated_at: &str) -> Result<(), StoreError> {
        let value = super::encode_head(head, updated_at);
        let key = subject_key(repo, number);
        self.heads.fetch_and_update(key.as_bytes(), |old| {
            let newer = old.is_none_or(|o| super::decode_head(&String::from_utf8_lossy(o)).1.as_str() <= updated_at);
            Some(if newer { value.as_bytes().to_vec() } else { old.unwrap_or_default().to_vec() })
        })?;
        Ok(())
    }

    pub fn pr_head(&self, repo: &str, number: u64) -> Result<Option<PrHead>, StoreError> {
        let key = subject_key(repo, number);
        Ok(self.heads.get(key.as_bytes())?.map(|v| super::decode_head(&String::from_utf8_lossy(&v)).0))
    }

    pub fn note(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        Ok(self.notes.get(key.as_bytes())?.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    pub async fn set_note(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        self.notes.insert(key.as_bytes(), serde_json::to_vec(value).unwrap_or_default())?;
        self.flush().await
    }

    pub async fn count_up(&self, key: &str) -> Result<u64, StoreError> {
        let count = |v: Option<&[u8]>| v.and_then(|v| serde_json::from_slice::<u64>(v).ok()).unwrap_or(0);
        let new = self
            .notes
            .update_and_fetch(key.as_bytes(), |old| Some(serde_json::to_vec(&(count(old) + 1)).unwrap_or_default()))?;
        self.flush().await?;
        Ok(count(new.as_deref()))
    }

    pub fn pending(&self, repo: &str, number: u64) -> Result<Vec<Pending>, StoreError> {
        let key = subject_key(repo, number);
        match self.t.approvals.get(key.as_bytes())? {
            Some(v) => decode("approvals", key.as_bytes(), &v),
            None => Ok(Vec::new()),
        }
    }

    pub async fn approve(
        &self,
        repo: &str,
        number: u64,
        approval: &Approval,
        may_approve: impl Fn(&Pending) -> bool,
    ) -> Result<Vec<String>, StoreError> {
        let subject = subject_key(repo, number);
        let head = self.pr_head(repo, number)?.map(|h| h.sha);
        let held = self.pending(repo, number)?;
        let seqs: Vec<u64> = held.iter().map(|_| self.db.generate_id()).collect::<Result<_, _>>()?;
        let now = Utc::now();
        let started = self.t.transaction(|tx| {
            let held = tx.get::<Vec<Pending>>(T::Approvals, subject.as_bytes())?.unwrap_or_default();
            let mut exists = HashSet::new();
            for p in &held {
                let id = crate::domain::job_id(&p.delivery, &p.spec.trigger);
                if tx.t(T::Jobs).get(id.as_bytes())?.is_some() {
                    exists.insert(id);
                }
            }
            let mut next = seqs.iter().copied();
            let (started, plan) = approval::approve(
                &subject,
                &held,
                head.as_deref(),
                approval,
                &may_approve,
                |id| exists.contains(id),
                || next.next().unwrap_or(0),
                now,
            );
            tx.apply(&plan, Duration::ZERO)?;
            Ok(started)
        })?;
        self.flush().await?;
        Ok(started)
    }

    pub fn note_agent(&self, job: &str, process: &serde_json::Value) -> Result<(), StoreError> {
        self.agents.insert(job.as_bytes(), encode(process))?;
        Ok(())
    }

    pub fn forget_agent(&self, job: &str) -> Result<(), StoreError> {
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

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub fn flushes(&self) -> u64 {
        self.commit.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn job_count(&self) -> usize {
        self.t.jobs.len()
    }

    #[cfg(test)]
    fn clear_repo_index(&self) {
        self.t.queue_by_repo.clear().ok();
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
        let next = store.claim_next(&limits, Duration::from_secs(60)).await.ok().flatten().map(|j| j.repo);
        assert_eq!(next, Some(Some("o/r0".to_string())));
        assert_eq!(store.t.queue_by_repo.len(), 2);
    }
}
