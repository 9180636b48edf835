//! sled's transaction for the store's sequences (see `store::ops`), and
//! the writes of one plan inside a sled transaction.

use super::*;

/// The tables inside one sled transaction.
pub(super) struct Writes<'a> {
    pub(super) trees: &'a [TransactionalTree],
}

pub(super) type TxError = sled::transaction::UnabortableTransactionError;

impl Writes<'_> {
    fn t(&self, t: T) -> &TransactionalTree {
        // `Tables::all` lists every `T`, in order.
        &self.trees[t as usize]
    }

    /// Applies a plan's writes in order. Returns by how much the queue grew
    /// (or shrank): what it wrote, not what it asked for.
    pub(super) fn apply(&self, plan: &Plan, lease: Duration) -> Result<i64, TxError> {
        let mut queued = 0;
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
                        if let Some(parent) = &job.parent {
                            self.t(T::Children).insert(child_key(parent, job.seq), job.id.as_bytes())?;
                        }
                    }
                }
                Write::Enqueue(e) => {
                    let (key, value) = (queue_key(e), queue_value(e));
                    self.t(T::QueueByRepo).insert(by_repo_key(e.repo.as_deref(), &key), value.as_slice())?;
                    if self.t(T::Queue).insert(&key, value)?.is_none() {
                        queued += 1;
                    }
                }
                Write::Dequeue(e) => {
                    let key = queue_key(e);
                    self.t(T::QueueByRepo).remove(by_repo_key(e.repo.as_deref(), &key))?;
                    if self.t(T::Queue).remove(&key)?.is_some() {
                        queued -= 1;
                    }
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
        Ok(queued)
    }
}

/// What transactions need: the tables, and the one lock that lets a single
/// transaction run at a time. Reads are plain reads under the lock, and the
/// writes are kept until `commit` writes them in one sled transaction: sled
/// has no transaction that can wait on anything outside it.
#[derive(Clone)]
pub(in crate::store) struct Core {
    pub(super) t: Tables,
    pub(super) db: sled::Db,
    /// Added to sled's `generate_id`: where numbers go on after a
    /// compaction copied the database (see `compact`).
    pub(super) seq_base: u64,
    pub(super) lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    pub(super) commit: std::sync::Arc<commit::GroupCommit>,
    /// The queue's length, counted at open and kept by every commit (sled
    /// counts a tree by walking it).
    pub(super) queued: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

/// One transaction (see `Core`).
pub(in crate::store) struct SledTx {
    core: Core,
    _one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
    writes: Vec<(Plan, Duration)>,
}

impl ops::Backend for Core {
    type Tx<'a> = SledTx;

    async fn begin(&self, _claim: bool) -> Result<SledTx, StoreError> {
        let guard = self.lock.clone().lock_owned().await;
        Ok(SledTx { core: self.clone(), _one_at_a_time: guard, writes: Vec::new() })
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.commit.durable().await
    }
}

impl ops::Backend for SledStore {
    type Tx<'a> = SledTx;

    async fn begin(&self, claim: bool) -> Result<SledTx, StoreError> {
        self.core.begin(claim).await
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.core.durable().await
    }
}

impl ops::Tx for SledTx {
    async fn job(&mut self, id: &str) -> Result<Option<Job>, StoreError> {
        self.core.t.get(T::Jobs, id.as_bytes())
    }

    async fn existing(&mut self, ids: &[String]) -> Result<HashSet<String>, StoreError> {
        let mut out = HashSet::new();
        for id in ids {
            if self.core.t.jobs.contains_key(id.as_bytes())? {
                out.insert(id.clone());
            }
        }
        Ok(out)
    }

    async fn group(&mut self, name: &str) -> Result<Option<GroupState>, StoreError> {
        self.core.t.get(T::Groups, name.as_bytes())
    }

    async fn throttles(&mut self, keys: &[String]) -> Result<std::collections::HashMap<String, Vec<i64>>, StoreError> {
        let mut out = std::collections::HashMap::new();
        for key in keys {
            if let Some(v) = self.core.t.throttle.get(key.as_bytes())? {
                out.insert(key.clone(), decode_runs(&v));
            }
        }
        Ok(out)
    }

    async fn held(&mut self, subject: &str) -> Result<Vec<Held>, StoreError> {
        Ok(self.core.t.get(T::Approvals, subject.as_bytes())?.unwrap_or_default())
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
        (0..n).map(|_| Ok(self.core.seq_base + self.core.db.generate_id()?)).collect()
    }

    async fn admit_view(&mut self, batch: &[Admission]) -> Result<AdmitView, StoreError> {
        self.read_admit_view(batch)
    }

    async fn load(&mut self) -> Result<Load, StoreError> {
        let mut load = Load::default();
        for entry in self.core.t.running.iter() {
            let (id, _) = entry?;
            if let Some(job) = self.core.t.get::<Job>(T::Jobs, &id)? {
                load.add(&QueueEntry::of(&job), true);
            }
        }
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
        let by_repo = &self.core.t.queue_by_repo;
        let mut best: Option<QueueEntry> = None;
        let mut from: Vec<u8> = Vec::new();
        while let Some(first) = by_repo.range(from.as_slice()..).next() {
            let (k, _) = first?;
            // repository ++ 0 ++ 9-byte queue key
            let Some(repo_len) = k.len().checked_sub(10) else {
                from = k.to_vec();
                from.push(0);
                continue;
            };
            let repo = (repo_len > 0).then(|| String::from_utf8_lossy(&k[..repo_len]).into_owned());
            if !load.repo_full(limits, repo.as_deref()) {
                for item in by_repo.scan_prefix(&k[..=repo_len]) {
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

    async fn apply(&mut self, plan: Plan, lease: Duration) -> Result<(), StoreError> {
        self.writes.push((plan, lease));
        Ok(())
    }

    async fn commit(self) -> Result<(), StoreError> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let grew = self.core.t.transaction(|w| {
            let mut grew = 0;
            for (plan, lease) in &self.writes {
                grew += w.apply(plan, *lease)?;
            }
            Ok(grew)
        })?;
        self.core.queued.fetch_add(grew, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl SledTx {
    /// Loads what admitting `batch` reads.
    fn read_admit_view(&self, batch: &[Admission]) -> Result<AdmitView, StoreError> {
        let wanted = AdmitView::wanted(batch);
        let mut view = AdmitView::default();
        for id in &wanted.deliveries {
            if self.core.t.tree(T::Deliveries).get(id.as_bytes())?.is_some() {
                view.deliveries.insert(id.clone());
            }
        }
        for f in &wanted.bodies {
            if let Some(first) = self.core.t.tree(T::Deliveries).get(body_key(f))? {
                view.bodies.insert(f.clone(), String::from_utf8_lossy(&first).into_owned());
            }
        }
        for g in &wanted.groups {
            if let Some(st) = self.core.t.get::<GroupState>(T::Groups, g.as_bytes())? {
                view.groups.insert(g.clone(), st);
            }
        }
        for id in wanted.jobs.iter().chain(&view.waiting()) {
            if let Some(job) = self.core.t.get::<Job>(T::Jobs, id.as_bytes())? {
                view.jobs.insert(id.clone(), job);
            }
        }
        for key in &wanted.throttles {
            if let Some(v) = self.core.t.tree(T::Throttle).get(key.as_bytes())? {
                view.throttles.insert(key.clone(), decode_runs(&v));
            }
        }
        for s in &wanted.subjects {
            if let Some(list) = self.core.t.get::<Vec<Held>>(T::Approvals, s.as_bytes())? {
                view.held.insert(s.clone(), list);
            }
        }
        Ok(view)
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
