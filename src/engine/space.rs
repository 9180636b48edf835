//! The storage folder's free space, kept above `storage.min_free`. The store
//! lives on that disk: once it is full every webhook is refused, so agents
//! yield first.
//!
//! - Below the floor no new agent starts: the dispatcher claims nothing and
//!   queued jobs wait (`/metrics` and the dashboard say why), and ingress
//!   goes on acknowledging what it can still write durably.
//! - The running run that grows fastest is stopped (outcome `limit`, naming
//!   `storage.min_free`), one per check, until the disk holds its floor
//!   again: the run that fills the disk is the one that has to go.
//!
//! Runs report their growth through a `Tracker` as their disk use is
//! sampled (`sandbox::usage`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the free space is read while nothing asks.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// What one run has added, and how fast.
#[derive(Debug)]
struct Growth {
    bytes: u64,
    at: Instant,
    /// Bytes per second between its last two samples.
    rate: f64,
    stop: CancellationToken,
}

/// The free-space floor of one storage folder.
#[derive(Debug)]
pub struct Space {
    path: PathBuf,
    min_free: u64,
    low: AtomicBool,
    free: AtomicU64,
    runs: Mutex<HashMap<String, Growth>>,
    /// The dispatcher's wake, rung when the disk has room again.
    wake: Arc<Notify>,
}

/// A run's handle: it reports growth, and learns when it must stop.
#[derive(Debug)]
pub(crate) struct Tracker {
    space: Arc<Space>,
    name: String,
    stop: CancellationToken,
}

impl Tracker {
    /// The run has added `bytes` to disk since it started.
    pub fn update(&self, bytes: u64) {
        let mut runs = self.space.runs();
        if let Some(g) = runs.get_mut(&self.name) {
            let now = Instant::now();
            let secs = now.duration_since(g.at).as_secs_f64().max(0.001);
            g.rate = bytes.saturating_sub(g.bytes) as f64 / secs;
            g.bytes = bytes;
            g.at = now;
        }
    }

    /// Returns once the run must stop for the disk's sake.
    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.space.runs().remove(&self.name);
    }
}

impl Space {
    pub fn new(path: PathBuf, min_free: u64, wake: Arc<Notify>) -> Arc<Space> {
        Arc::new(Space {
            path,
            min_free,
            low: AtomicBool::new(false),
            free: AtomicU64::new(u64::MAX),
            runs: Mutex::new(HashMap::new()),
            wake,
        })
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Growth>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts following run `name`.
    pub(crate) fn track(self: &Arc<Self>, name: &str) -> Tracker {
        let stop = CancellationToken::new();
        let growth = Growth { bytes: 0, at: Instant::now(), rate: 0.0, stop: stop.clone() };
        self.runs().insert(name.to_string(), growth);
        Tracker { space: Arc::clone(self), name: name.to_string(), stop }
    }

    /// Reads the free space now; whether it is below the floor.
    pub fn check(&self) -> bool {
        let free = crate::sandbox::usage::fs_free(&self.path).unwrap_or(u64::MAX);
        self.free.store(free, Ordering::Relaxed);
        let low = free < self.min_free;
        let was = self.low.swap(low, Ordering::Relaxed);
        if low && !was {
            tracing::error!(
                free,
                min_free = self.min_free,
                path = %self.path.display(),
                "The storage folder's disk is below storage.min_free: no new agent starts until there is room."
            );
        } else if was && !low {
            tracing::info!(free, "The storage folder's disk has room again; agents start again.");
            self.wake.notify_one();
        }
        low
    }

    /// The disk as last read, for `/metrics`.
    pub fn gauge(&self) -> crate::metrics::Space {
        let free = self.free.load(Ordering::Relaxed);
        crate::metrics::Space { free: if free == u64::MAX { 0 } else { free }, low: self.low.load(Ordering::Relaxed) }
    }

    /// Why no agent starts, while the disk is below its floor.
    pub(crate) fn why_paused(&self) -> Option<String> {
        let (free, min) = self.shortage()?;
        Some(format!(
            "No new agent starts: the storage folder's disk has {} free, below storage.min_free ({}). Queued jobs \
             wait until there is room.",
            mib(free),
            mib(min)
        ))
    }

    /// `(free, min_free)` while the disk is below its floor.
    pub(crate) fn shortage(&self) -> Option<(u64, u64)> {
        self.low.load(Ordering::Relaxed).then(|| (self.free.load(Ordering::Relaxed), self.min_free))
    }

    /// Stops the run growing fastest (of those that hold what they added,
    /// the largest when none grows now), if any run added anything at all:
    /// a disk filled by something else is no run's to pay for.
    fn stop_fastest(&self) {
        let runs = self.runs();
        let fastest = runs.iter().filter(|(_, g)| g.bytes > 0 && !g.stop.is_cancelled()).max_by(|a, b| {
            let key = |g: &Growth| (g.rate, g.bytes);
            key(a.1).partial_cmp(&key(b.1)).unwrap_or(std::cmp::Ordering::Equal)
        });
        if let Some((name, g)) = fastest {
            tracing::warn!(run = %name, bytes_per_second = g.rate as u64, "Stopping the run that fills the disk.");
            g.stop.cancel();
        }
    }

    /// Checks every few seconds until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if self.check() {
                self.stop_fastest();
            }
            tokio::select! {
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// `1234 MiB`.
fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_floor_the_fastest_growing_run_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path().into(), u64::MAX, Arc::new(Notify::new()));
        let (slow, fast, idle) = (space.track("slow"), space.track("fast"), space.track("idle"));
        slow.update(10);
        fast.update(10 << 20);
        assert!(space.check());
        assert!(space.shortage().is_some());
        space.stop_fastest();
        assert!(fast.stop.is_cancelled() && !slow.stop.is_cancelled() && !idle.stop.is_cancelled());
        space.stop_fastest();
        assert!(slow.stop.is_cancelled() && !idle.stop.is_cancelled(), "a run that added nothing stays");
        // One that holds what it added, growing no more, is next.
        let (held, other) = (space.track("held"), space.track("other"));
        held.update(5 << 20);
        held.update(5 << 20);
        other.update(1 << 20);
        other.update(1 << 20);
        space.stop_fastest();
        assert!(held.stop.is_cancelled() && !other.stop.is_cancelled());
        drop(fast);
        assert_eq!(space.runs().len(), 4);
    }

    #[test]
    fn above_the_floor_nothing_waits() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path().into(), 0, Arc::new(Notify::new()));
        assert!(!space.check());
        assert_eq!(space.shortage(), None);
    }
}
