//! The embedded store's transaction for the store's sequences (see
//! `store::ops`), and the writes of one plan inside an engine's write.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::time::Duration;

use super::engine::{EngineExt, Writes, T};
use super::*;
use crate::domain::admission::AdmitView;
use crate::domain::dispatch::{Limits, Load};
use crate::domain::{GroupState, Plan, Write};

/// Throttle runs as stored: a list of Unix millis (older stores kept a
/// cooldown's last run as one number).
fn decode_runs(v: &[u8]) -> Vec<i64> {
    serde_json::from_slice::<Vec<i64>>(v)
        .or_else(|_| serde_json::from_slice::<i64>(v).map(|t| vec![t]))
        .unwrap_or_default()
}

/// Applies a plan's writes in order. Returns by how much the queue grew
/// (or shrank): what it wrote, not what it asked for.
fn apply(w: &mut dyn Writes, plan: &Plan, lease: Duration) -> Result<i64, StoreError> {
    let mut queued = 0;
    for write in plan {
        match write {
            Write::Delivery(d) => {
                let key = d.id.as_bytes();
                let millis = (d.received_at.timestamp_millis().max(0) as u64).to_be_bytes();
                w.insert(T::Deliveries, key, &encode(d))?;
                w.insert(T::DeliveryTimes, &[&millis[..], key].concat(), &[])?;
                if let Some(f) = &d.fingerprint {
                    // Kept beside the delivery id, and forgotten with it.
                    let body = body_key(f);
                    w.insert(T::Deliveries, &body, key)?;
                    w.insert(T::DeliveryTimes, &[&millis[..], &body].concat(), &[])?;
                }
            }
            Write::Job { job, new } => {
                w.insert(T::Jobs, job.id.as_bytes(), &encode(job))?;
                if *new {
                    w.insert(T::JobIndex, &job.seq.to_be_bytes(), job.id.as_bytes())?;
                    if let Some(parent) = &job.parent {
                        w.insert(T::Children, &child_key(parent, job.seq), job.id.as_bytes())?;
                    }
                }
            }
            Write::Enqueue(e) => {
                let (key, value) = (queue_key(e), queue_value(e));
                w.insert(T::QueueByRepo, &by_repo_key(e.repo.as_deref(), &key), &value)?;
                if !w.insert(T::Queue, &key, &value)? {
                    queued += 1;
                }
            }
            Write::Dequeue(e) => {
                let key = queue_key(e);
                w.remove(T::QueueByRepo, &by_repo_key(e.repo.as_deref(), &key))?;
                if w.remove(T::Queue, &key)? {
                    queued -= 1;
                }
            }
            Write::Group { name, state } => {
                if state.running.is_none() && state.waiting.is_empty() {
                    w.remove(T::Groups, name.as_bytes())?;
                } else {
                    w.insert(T::Groups, name.as_bytes(), &encode(state))?;
                }
            }
            Write::Throttle { key, runs } => {
                w.insert(T::Throttle, key.as_bytes(), &encode(runs))?;
            }
            Write::Cancel { job, by } => {
                w.insert(T::Cancels, job.as_bytes(), by.as_bytes())?;
            }
            Write::Held { subject, list } => {
                if list.is_empty() {
                    w.remove(T::Approvals, subject.as_bytes())?;
                } else {
                    w.insert(T::Approvals, subject.as_bytes(), &encode(list))?;
                }
            }
            Write::Lease(id) => {
                w.insert(T::Running, id.as_bytes(), &lease_deadline(lease))?;
            }
            Write::Unlease(id) => {
                w.remove(T::Running, id.as_bytes())?;
            }
            Write::End(id) => {
                w.insert(T::Ends, id.as_bytes(), &[])?;
            }
            Write::Outbox(p) => {
                w.insert(T::Outbox, &outbox_key_of(&p.job, p.purpose), &encode(p))?;
            }
            Write::Unbox { job, purpose } => {
                w.remove(T::Outbox, &outbox_key_of(job, *purpose))?;
            }
        }
    }
    Ok(queued)
}

/// One transaction: reads are plain reads under `Core::lock`, and the
/// writes are kept until `commit` writes them as one atomic change (an
/// engine's write cannot wait on anything outside it).
pub(in crate::store) struct EmbeddedTx {
    core: Core,
    _one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    writes: Vec<(Plan, Duration)>,
}

/// A record as the sequences read it: one that no longer decodes is passed
/// over as absent, so it cannot stop every claim and admission.
fn decoded<V: DeserializeOwned>(bytes: Option<Vec<u8>>) -> Option<V> {
    bytes.and_then(|b| serde_json::from_slice(&b).ok())
}

impl EmbeddedTx {
    fn get<V: DeserializeOwned>(&self, t: T, key: &[u8]) -> Result<Option<V>, StoreError> {
        Ok(decoded(self.core.e.get(t, key)?))
    }

    /// Loads what admitting `batch` reads.
    fn read_admit_view(&self, batch: &[Admission]) -> Result<AdmitView, StoreError> {
        let wanted = AdmitView::wanted(batch);
        let bodies: Vec<Vec<u8>> = wanted.bodies.iter().map(|f| body_key(f)).collect();
        let keys: Vec<(T, &[u8])> = (wanted.deliveries.iter().map(|id| (T::Deliveries, id.as_bytes())))
            .chain(bodies.iter().map(|b| (T::Deliveries, b.as_slice())))
            .chain(wanted.groups.iter().map(|g| (T::Groups, g.as_bytes())))
            .chain(wanted.jobs.iter().map(|id| (T::Jobs, id.as_bytes())))
            .chain(wanted.throttles.iter().map(|k| (T::Throttle, k.as_bytes())))
            .chain(wanted.subjects.iter().map(|s| (T::Approvals, s.as_bytes())))
            .collect();
        let mut values = self.core.e.get_many(&keys)?.into_iter();
        let mut view = AdmitView::default();
        for (id, v) in wanted.deliveries.iter().zip(values.by_ref()) {
            if v.is_some() {
                view.deliveries.insert(id.clone());
            }
        }
        for (f, v) in wanted.bodies.iter().zip(values.by_ref()) {
            if let Some(first) = v {
                view.bodies.insert(f.clone(), String::from_utf8_lossy(&first).into_owned());
            }
        }
        for (g, v) in wanted.groups.iter().zip(values.by_ref()) {
            if let Some(st) = decoded::<GroupState>(v) {
                view.groups.insert(g.clone(), st);
            }
        }
        for (id, v) in wanted.jobs.iter().zip(values.by_ref()) {
            if let Some(job) = decoded::<Job>(v) {
                view.jobs.insert(id.clone(), job);
            }
        }
        for (key, v) in wanted.throttles.iter().zip(values.by_ref()) {
            if let Some(v) = v {
                view.throttles.insert(key.clone(), decode_runs(&v));
            }
        }
        for (s, v) in wanted.subjects.iter().zip(values.by_ref()) {
            if let Some(list) = decoded::<Vec<Held>>(v) {
                view.held.insert(s.clone(), list);
            }
        }
        // The jobs waiting in the batch's groups, known only now.
        let waiting: Vec<String> = view.waiting().into_iter().filter(|id| !wanted.jobs.contains(id)).collect();
        let keys: Vec<(T, &[u8])> = waiting.iter().map(|id| (T::Jobs, id.as_bytes())).collect();
        for (id, v) in waiting.iter().zip(self.core.e.get_many(&keys)?) {
            if let Some(job) = decoded::<Job>(v) {
                view.jobs.insert(id.clone(), job);
            }
        }
        Ok(view)
    }
}

impl ops::Backend for Core {
    type Tx<'a> = EmbeddedTx;

    async fn begin(&self, _claim: bool) -> Result<EmbeddedTx, StoreError> {
        let guard = self.lock.clone().lock_owned().await;
        Ok(EmbeddedTx { core: self.clone(), _one_at_a_time: guard, writes: Vec::new() })
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.e.commit().durable().await
    }
}

impl ops::Backend for EmbeddedStore {
    type Tx<'a> = EmbeddedTx;

    async fn begin(&self, claim: bool) -> Result<EmbeddedTx, StoreError> {
        self.core.begin(claim).await
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.core.durable().await
    }
}

impl ops::Tx for EmbeddedTx {
    async fn job(&mut self, id: &str) -> Result<Option<Job>, StoreError> {
        self.get(T::Jobs, id.as_bytes())
    }

    async fn existing(&mut self, ids: &[String]) -> Result<HashSet<String>, StoreError> {
        let mut out = HashSet::new();
        for id in ids {
            if self.core.e.get(T::Jobs, id.as_bytes())?.is_some() {
                out.insert(id.clone());
            }
        }
        Ok(out)
    }

    async fn group(&mut self, name: &str) -> Result<Option<GroupState>, StoreError> {
        self.get(T::Groups, name.as_bytes())
    }

    async fn throttles(&mut self, keys: &[String]) -> Result<HashMap<String, Vec<i64>>, StoreError> {
        let mut out = HashMap::new();
        for key in keys {
            if let Some(v) = self.core.e.get(T::Throttle, key.as_bytes())? {
                out.insert(key.clone(), decode_runs(&v));
            }
        }
        Ok(out)
    }

    async fn held(&mut self, subject: &str) -> Result<Vec<Held>, StoreError> {
        Ok(self.get(T::Approvals, subject.as_bytes())?.unwrap_or_default())
    }

    async fn queued(&mut self, id: &str) -> Result<bool, StoreError> {
        // A job is in the queue exactly while its record says `queued`.
        Ok(self.job(id).await?.is_some_and(|j| j.state == JobState::Queued))
    }

    async fn holds_lease(&mut self, _id: &str) -> Result<bool, StoreError> {
        // One replica: no other can have taken a job back.
        Ok(true)
    }

    async fn numbers(&mut self, n: usize) -> Result<Vec<u64>, StoreError> {
        self.core.e.next_ids(n)
    }

    async fn admit_view(&mut self, batch: &[Admission]) -> Result<(AdmitView, Vec<u64>), StoreError> {
        let count = crate::domain::admission::jobs_in(batch);
        Ok((self.read_admit_view(batch)?, self.core.e.next_ids(count)?))
    }

    async fn load(&mut self) -> Result<Load, StoreError> {
        let mut load = Load::default();
        self.core.e.scan(T::Running, Bound::Unbounded, Bound::Unbounded, false, &mut |id, _| {
            if let Some(job) = self.get::<Job>(T::Jobs, id)? {
                load.add(&QueueEntry::of(&job), true);
            }
            Ok(true)
        })?;
        Ok(load)
    }

    /// The first in queue order among the first admissible entry of each
    /// repository's line, passing over whole repositories at their limit
    /// without reading them.
    async fn next_queued(
        &mut self,
        limits: &Limits,
        load: &Load,
        passed: &HashSet<String>,
    ) -> Result<Option<QueueEntry>, StoreError> {
        let e = &self.core.e;
        let mut best: Option<QueueEntry> = None;
        let mut from: Vec<u8> = Vec::new();
        while let Some((k, _)) = e.entries(T::QueueByRepo, Bound::Included(&from), 1)?.pop() {
            // repository ++ 0 ++ 9-byte queue key
            let Some(repo_len) = k.len().checked_sub(10) else {
                from = k;
                from.push(0);
                continue;
            };
            let repo = (repo_len > 0).then(|| String::from_utf8_lossy(&k[..repo_len]).into_owned());
            if !load.repo_full(limits, repo.as_deref()) {
                e.scan_prefix(T::QueueByRepo, &k[..=repo_len], false, &mut |k, v| {
                    let entry = queue_entry(&k[repo_len + 1..], v);
                    if passed.contains(&entry.id) || !load.admits(limits, &entry) {
                        return Ok(true);
                    }
                    if best.as_ref().is_none_or(|b| entry.order() < b.order()) {
                        best = Some(entry);
                    }
                    Ok(false)
                })?;
            }
            // The next repository's line starts after every key of this one.
            from = k[..repo_len].to_vec();
            from.push(1);
        }
        Ok(best)
    }

    async fn apply(&mut self, plan: Plan, lease: Duration) -> Result<(), StoreError> {
        self.writes.push((plan, lease));
        Ok(())
    }

    async fn commit(self) -> Result<(), StoreError> {
        let EmbeddedTx { core, _one_at_a_time: one_at_a_time, writes } = self;
        let mut durable = false;
        if writes.iter().any(|(plan, _)| !plan.is_empty()) {
            let write = |w: &mut dyn Writes| {
                let mut grew = 0;
                for (plan, lease) in &writes {
                    grew += apply(w, plan, *lease)?;
                }
                Ok(grew)
            };
            let grew = if core.durable_writes {
                let (grew, done) = core.e.write_durably_with(write)?;
                durable = done;
                grew
            } else {
                core.e.write_with(write)?
            };
            core.queued.fetch_add(grew, Ordering::Relaxed);
        }
        drop(one_at_a_time);
        // The writer's callers hear of its batch as this returns: all they
        // are told of must be durable, a duplicate's first delivery too.
        if core.durable_writes && !durable {
            core.e.commit().flush_blocking()?;
        }
        Ok(())
    }
}

/// Runs `f` to its end on this thread: the batch writer's thread, where a
/// transaction may wait for the one before it to let go.
pub(super) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
