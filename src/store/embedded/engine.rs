//! What the embedded store asks of a database engine: ordered byte maps
//! (tables) read one key at a time or scanned in either direction, written
//! atomically, and made durable by a group commit. Each engine gives it in
//! its own module; the store above knows none of them.

use std::ops::Bound;
use std::sync::Arc;

use crate::store::commit::GroupCommit;
use crate::store::StoreError;

/// The store's tables. Their names are sled's tree names, so a store
/// written before this seam opens as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum T {
    Deliveries,
    /// received-at millis (u64 BE) ++ delivery id → (): retention order.
    DeliveryTimes,
    Jobs,
    /// creation sequence (u64 BE) → job id: newest-first listing.
    JobIndex,
    /// `100 - priority` (u8) ++ sequence (u64 BE) → `id\nagent\nrepo`, for
    /// queued jobs only: highest priority first, FIFO within one.
    Queue,
    /// The same entries by repository (see `by_repo_key`), so dispatch can
    /// pass over a repository at its limit without reading its whole line.
    QueueByRepo,
    /// Trigger runs, for rate limits and cooldowns.
    Throttle,
    /// `owner/name#N` → jobs held for approval on that issue or PR.
    Approvals,
    /// concurrency group → `GroupState`.
    Groups,
    /// running job id → the job that cancels it (or `api`).
    Cancels,
    /// job id (its result) or `job id/purpose` → `Publication` not yet
    /// delivered.
    Outbox,
    /// job id → lease deadline (Unix ms, u64 BE), for jobs in state
    /// `running`: what a restart must recover, and what a worker renews.
    Running,
    /// job id → (): jobs whose end has not yet gone back through the rules.
    Ends,
    /// parent job id ++ `\0` ++ creation sequence (u64 BE) → child job id.
    Children,
    /// trigger name → last fire time (RFC 3339) of a schedule trigger.
    Schedules,
    /// `owner/name#N` → the pull request's current head (see `encode_head`).
    Heads,
    /// key → what baton remembers of a pull request (see `Store::note`).
    Notes,
    /// job id → the process group of its running agent, for start-up cleanup.
    Agents,
    /// GitHub delivery guid → when baton asked GitHub to redeliver it.
    Redeliveries,
    /// `n␟key` (a note) or `h␟subject` (a head) → when it was last written
    /// or read (ms since the epoch, big-endian), for `prune_notes`.
    Used,
}

impl T {
    pub const ALL: [T; 20] = [
        T::Deliveries,
        T::DeliveryTimes,
        T::Jobs,
        T::JobIndex,
        T::Queue,
        T::QueueByRepo,
        T::Throttle,
        T::Approvals,
        T::Groups,
        T::Cancels,
        T::Outbox,
        T::Running,
        T::Ends,
        T::Children,
        T::Schedules,
        T::Heads,
        T::Notes,
        T::Agents,
        T::Redeliveries,
        T::Used,
    ];

    pub fn name(self) -> &'static str {
        match self {
            T::Deliveries => "deliveries",
            T::DeliveryTimes => "delivery_times",
            T::Jobs => "jobs",
            T::JobIndex => "job_index",
            T::Queue => "queue",
            T::QueueByRepo => "queue_by_repo",
            T::Throttle => "throttle",
            T::Approvals => "approvals",
            T::Groups => "groups",
            T::Cancels => "cancels",
            T::Outbox => "outbox",
            T::Running => "running",
            T::Ends => "ends",
            T::Children => "children",
            T::Schedules => "schedules",
            T::Heads => "heads",
            T::Notes => "notes",
            T::Agents => "agents",
            T::Redeliveries => "redeliveries",
            T::Used => "used",
        }
    }
}

/// A key and its value, as read.
pub(crate) type Entry = (Vec<u8>, Vec<u8>);

/// Called on each entry of a scan; `Ok(false)` stops it.
pub(crate) type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError>;

/// A database engine under the embedded store.
pub(crate) trait Engine: Send + Sync + 'static {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The values at `keys`, in their order, read from one state of the
    /// database: an engine whose every read opens a transaction opens one.
    fn get_many(&self, keys: &[(T, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|&(t, k)| self.get(t, k)).collect()
    }

    /// Visits the entries of `t` between `lo` and `hi` in key order (or
    /// reversed), until `visit` says stop.
    fn scan(&self, t: T, lo: Bound<&[u8]>, hi: Bound<&[u8]>, rev: bool, visit: Visit) -> Result<(), StoreError>;

    fn len(&self, t: T) -> Result<usize, StoreError>;

    /// Runs `f` and applies its writes as one atomic change, durable after
    /// the next group commit. An engine may run `f` again (a conflict).
    fn write(&self, f: &mut dyn FnMut(&mut dyn Writes) -> Result<(), StoreError>) -> Result<(), StoreError>;

    /// `write`, its commit also making every write so far durable where the
    /// engine can (redb); whether it did (if not, the caller flushes, after
    /// letting go of what it holds).
    fn write_durably(&self, f: &mut dyn FnMut(&mut dyn Writes) -> Result<(), StoreError>) -> Result<bool, StoreError> {
        self.write(f)?;
        Ok(false)
    }

    /// `n` new numbers, ascending, none held by a stored record (one handed
    /// out that no write stored may be given again after a restart).
    fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError>;

    /// What makes writes durable, shared by every writer.
    fn commit(&self) -> &Arc<GroupCommit>;

    fn size_on_disk(&self) -> u64;

    /// Slow housekeeping that must not hold up an open, done in the
    /// background while the daemon runs (sled measures how much of its
    /// files is dead, for its next open to compact).
    fn upkeep(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The writes (and reads of them) inside `Engine::write`.
pub(crate) trait Writes {
    fn get(&mut self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Whether a value was replaced.
    fn insert(&mut self, t: T, key: &[u8], value: &[u8]) -> Result<bool, StoreError>;
    /// Whether a value was there.
    fn remove(&mut self, t: T, key: &[u8]) -> Result<bool, StoreError>;
}

/// The first key after every key that starts with `prefix` (none when the
/// prefix is all `0xff`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Feeds `items` to `each`, in order or reversed, until it says stop: an
/// engine's `scan` over its own range iterator.
pub(crate) fn walk<I: DoubleEndedIterator>(
    items: I,
    rev: bool,
    mut each: impl FnMut(I::Item) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let items: Box<dyn Iterator<Item = I::Item> + '_> = if rev { Box::new(items.rev()) } else { Box::new(items) };
    for item in items {
        if !each(item)? {
            break;
        }
    }
    Ok(())
}

/// Ways to read and write an engine that every caller shares.
pub(crate) trait EngineExt {
    /// Visits the entries whose key starts with `prefix`.
    fn scan_prefix(&self, t: T, prefix: &[u8], rev: bool, visit: Visit) -> Result<(), StoreError>;
    /// Every key and value of `t` from `lo` on, up to `limit` of them.
    fn entries(&self, t: T, lo: Bound<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError>;
    /// `write`, returning what `f` returns.
    fn write_with<R>(&self, f: impl FnMut(&mut dyn Writes) -> Result<R, StoreError>) -> Result<R, StoreError>;
    /// `write_durably`, returning what `f` returns and whether it is durable.
    fn write_durably_with<R>(
        &self,
        f: impl FnMut(&mut dyn Writes) -> Result<R, StoreError>,
    ) -> Result<(R, bool), StoreError>;
}

impl<E: Engine + ?Sized> EngineExt for E {
    fn scan_prefix(&self, t: T, prefix: &[u8], rev: bool, visit: Visit) -> Result<(), StoreError> {
        let end = prefix_end(prefix);
        let hi = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        self.scan(t, Bound::Included(prefix), hi, rev, visit)
    }

    fn entries(&self, t: T, lo: Bound<&[u8]>, limit: usize) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.scan(t, lo, Bound::Unbounded, false, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    fn write_with<R>(&self, f: impl FnMut(&mut dyn Writes) -> Result<R, StoreError>) -> Result<R, StoreError> {
        returning(|g| self.write(g), f).map(|(out, ())| out)
    }

    fn write_durably_with<R>(
        &self,
        f: impl FnMut(&mut dyn Writes) -> Result<R, StoreError>,
    ) -> Result<(R, bool), StoreError> {
        returning(|g| self.write_durably(g), f)
    }
}

type WriteFn<'a> = dyn FnMut(&mut dyn Writes) -> Result<(), StoreError> + 'a;

/// Runs `write` with `f`: what `f` returned on its last run, and what
/// `write` did.
fn returning<R, D>(
    write: impl FnOnce(&mut WriteFn<'_>) -> Result<D, StoreError>,
    mut f: impl FnMut(&mut dyn Writes) -> Result<R, StoreError>,
) -> Result<(R, D), StoreError> {
    let mut out = None;
    let done = write(&mut |w| {
        out = Some(f(w)?);
        Ok(())
    })?;
    // A write that succeeded ran `f` to its end at least once.
    let out = out.ok_or_else(|| StoreError::Database("an engine's write returned without running it".into()))?;
    Ok((out, done))
}
