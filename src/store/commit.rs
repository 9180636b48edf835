//! Group commit: many writers, one fsync.
//!
//! The embedded engines commit to memory (or to the OS) and make a write
//! durable only when asked: sled's `flush` does not even fsync on Linux (it
//! writes with `sync_file_range`, which flushes neither the file's size nor
//! the drive's cache), so its engine ends each flush with `fdatasync` on
//! sled's data file; redb's durable commit fsyncs. Each engine hands its
//! way to sync here.
//!
//! A writer commits its transaction in memory, takes a ticket (a number
//! handed out in order) and waits until a flush that started after its ticket
//! was taken has finished. One flusher task runs flushes back to back: while
//! one is on disk, new writers pile up for the next one, so a slow disk never
//! stops requests from being accepted into the next batch, and N concurrent
//! deliveries cost about one fsync instead of N.
//!
//! With `durability = "os"` no one waits, and a background flush makes what
//! was written durable about once a second (see `GroupCommit::wrote`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once, Weak};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::StoreError;
pub use crate::config::Durability;

#[derive(Debug, Clone, Copy, Default)]
struct Flushed {
    /// Every ticket up to this one is on disk.
    done: u64,
    /// Tickets up to this one were in a flush that failed.
    failed: u64,
}

/// What makes every write so far durable, blocking until it is.
type SyncFn = Box<dyn Fn() -> std::io::Result<()> + Send + Sync>;

pub(crate) struct GroupCommit {
    sync: SyncFn,
    mode: Durability,
    tickets: AtomicU64,
    /// Shared with the flusher, which holds no strong reference while it
    /// waits: dropping the store ends the flusher and releases the database.
    kick: Arc<Notify>,
    flushed: watch::Sender<Flushed>,
    started: Once,
    /// `Os` mode: writes so far, and how many of them a background flush
    /// has made durable.
    writes: AtomicU64,
    written_back: AtomicU64,
    /// `Os` mode: where the background flush runs (the runtime the store
    /// was opened in; none for a one-shot command, whose close persists).
    runtime: Option<tokio::runtime::Handle>,
    trickling: Once,
    /// Flushes done so far (for metrics and tests).
    pub flushes: AtomicU64,
}

/// How often `Os` mode makes what was written durable, with no one waiting.
const TRICKLE: Duration = Duration::from_secs(1);

impl GroupCommit {
    /// `sync` makes every write so far durable.
    pub fn new(mode: Durability, sync: impl Fn() -> std::io::Result<()> + Send + Sync + 'static) -> Arc<GroupCommit> {
        Arc::new(GroupCommit {
            sync: Box::new(sync),
            mode,
            tickets: AtomicU64::new(0),
            kick: Arc::new(Notify::new()),
            flushed: watch::Sender::new(Flushed::default()),
            started: Once::new(),
            writes: AtomicU64::new(0),
            written_back: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::try_current().ok(),
            trickling: Once::new(),
            flushes: AtomicU64::new(0),
        })
    }

    /// An engine wrote. With `Os` durability no caller waits for the disk,
    /// but an engine that only makes writes durable when asked (redb keeps
    /// non-durable commits in its file's shadow, holding every page they
    /// free until a durable one) must still be asked: about once a second,
    /// as an operating system writes back, so a crash loses about that much
    /// and the file and memory stay bounded.
    pub(crate) fn wrote(self: &Arc<Self>) {
        if self.mode != Durability::Os {
            return;
        }
        self.writes.fetch_add(1, Ordering::AcqRel);
        self.trickling.call_once(|| {
            if let Some(runtime) = &self.runtime {
                runtime.spawn(trickle(Arc::downgrade(self)));
            }
        });
    }

    /// Returns once everything written before this call is on disk.
    pub async fn durable(self: &Arc<Self>) -> Result<(), StoreError> {
        if self.mode == Durability::Os {
            return Ok(());
        }
        self.started.call_once(|| {
            tokio::spawn(flusher(Arc::downgrade(self), self.kick.clone()));
        });
        let mut rx = self.flushed.subscribe();
        // Taken after the caller's write: any flush that starts later covers it.
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        self.kick.notify_one();
        loop {
            let f = *rx.borrow_and_update();
            if f.done >= ticket {
                return Ok(());
            }
            if f.failed >= ticket {
                return Err(StoreError::Flush);
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Flush);
            }
        }
    }

    /// `Os` mode: writes not yet made durable by the background flush.
    pub(crate) fn unflushed(&self) -> u64 {
        // `written_back` first: read second, it could pass `writes`.
        let back = self.written_back.load(Ordering::Acquire);
        self.writes.load(Ordering::Acquire).saturating_sub(back)
    }

    /// Whether a write that is to be durable by its own commit should be
    /// (not in `Os` mode); if so it counts as one of the flushes.
    pub(crate) fn durable_commit(&self) -> bool {
        if self.mode == Durability::Os {
            return false;
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Flushes now, on this thread, for a caller that batches its own
    /// writes (the store's writer thread).
    pub(crate) fn flush_blocking(&self) -> Result<(), StoreError> {
        if self.mode == Durability::Os {
            return Ok(());
        }
        self.sync_now()
    }

    /// Makes every write so far durable, whatever the mode.
    fn sync_now(&self) -> Result<(), StoreError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        (self.sync)().map_err(|e| {
            tracing::error!(error = %e, "Flushing the store failed.");
            StoreError::Flush
        })
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.kick.notify_one();
    }
}

async fn flusher(weak: Weak<GroupCommit>, kick: Arc<Notify>) {
    loop {
        let Some(this) = weak.upgrade() else { return };
        let target = this.tickets.load(Ordering::SeqCst);
        let seen = {
            let f = *this.flushed.borrow();
            f.done.max(f.failed)
        };
        if target <= seen {
            drop(this);
            kick.notified().await;
            continue;
        }
        let flushing = this.clone();
        // It blocks on the disk: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || flushing.flush_blocking()).await;
        this.flushed.send_modify(|f| match result {
            Ok(Ok(())) => f.done = target,
            _ => f.failed = target,
        });
    }
}

/// `Os` mode's background flush (see `GroupCommit::wrote`). Holds no strong
/// reference while it sleeps, so dropping the store ends it.
async fn trickle(weak: Weak<GroupCommit>) {
    loop {
        tokio::time::sleep(TRICKLE).await;
        let Some(this) = weak.upgrade() else { return };
        // Read before the flush starts: every write counted is covered by it.
        let writes = this.writes.load(Ordering::Acquire);
        if writes == this.written_back.load(Ordering::Acquire) {
            continue;
        }
        let flushing = this.clone();
        drop(this);
        // A failure is logged by `sync_now`; the next round tries again.
        let _ = tokio::task::spawn_blocking(move || {
            if flushing.sync_now().is_ok() {
                flushing.written_back.store(writes, Ordering::Release);
            }
        })
        .await;
    }
}
