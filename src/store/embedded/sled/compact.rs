//! Opening sled's files, compacted first when they have grown far past
//! what they hold. sled does not give back the space of deleted records
//! while it runs (issue 31: 74 MB more per 10,000 pruned jobs), so at open
//! a database whose files are both large and mostly dead is copied record
//! by record into a fresh one that takes its place.
//!
//! Knowing how much is dead takes a walk over every record, seconds at a
//! million jobs: done at open, it made a restart grow with the store
//! (issue 29). So the walk is done while the daemon runs (`measure`, in
//! the background, again once the files have doubled or daily), and its
//! verdict is kept in the database for the next open to act on.
//!
//! The swap survives a crash at any step: the copy is marked complete
//! before anything is renamed, and `recover` finishes or undoes a swap it
//! finds half done.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::StoreError;

/// Files smaller than this are never compacted: sled's normal overhead.
pub(super) const MIN_DISK: u64 = 64 << 20;

/// Files this many times larger than their live records are compacted
/// (sled keeps about 4× of what it holds in a steady state).
const MAX_AMPLIFICATION: u64 = 6;

/// Where the counter of `generate_id` continues after a copy (sled has no
/// way to set the counter of a fresh database).
const SEQ_BASE: &[u8] = b"seq_base";

/// The last measure of the files against what they hold: size on disk,
/// live bytes and when (Unix seconds; u64 BE each). A copy starts without
/// one.
const MEASURED: &[u8] = b"measured";

/// The files are measured again once they are this many times the size
/// they were at the last measure,
const REMEASURE_GROWTH: u64 = 2;
/// or this long after it: sled's files stop growing in a steady state,
/// while what they hold may shrink (a shorter `job_retention`).
const REMEASURE_AFTER: u64 = 24 * 3600;

/// The tree of this store's own bookkeeping.
pub(super) const META: &str = "baton_meta";

/// What a compaction did, for the log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Compacted {
    pub before: u64,
    pub after: u64,
    pub live: u64,
}

pub(super) fn config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(32 * 1024 * 1024)
        // baton flushes explicitly before it acknowledges anything; the
        // background flusher only bounds what a crash could lose of the
        // rest (log lines of state that is rebuilt anyway).
        .flush_every_ms(Some(1000))
}

/// Opens `dir/db`, compacting it first when its files are over `min_disk`
/// and the last measure (see `measure`) found them more than
/// `MAX_AMPLIFICATION` times its live records. Returns the database, the
/// base its `generate_id` continues from, and what a compaction did. Reads
/// no record of the store's own.
pub(super) fn open(dir: &Path, min_disk: u64) -> Result<(sled::Db, u64, Option<Compacted>), StoreError> {
    let open_err = |source| StoreError::Open { path: dir.to_path_buf(), reason: Box::new(source) };
    recover(dir).map_err(|e| open_err(sled::Error::Io(e)))?;
    let path = dir.join("db");
    let db = config(&path).open().map_err(open_err)?;
    let before = db.size_on_disk().map_err(open_err)?;
    let dead = |m: Measure| m.disk > m.live.saturating_mul(MAX_AMPLIFICATION);
    let live = match measured(&db).map_err(open_err)? {
        Some(m) if before > min_disk && dead(m) => m.live,
        _ => {
            let base = seq_base(&db).map_err(open_err)?;
            return Ok((db, base, None));
        }
    };
    tracing::info!(disk = before, live, "Compacting the store: sled's files are far larger than what they hold.");
    let fresh = dir.join("db.compact");
    copy(&db, &fresh).map_err(open_err)?;
    drop(db);
    wait_unlocked(&path).map_err(|e| open_err(sled::Error::Io(e)))?;
    swap(dir).map_err(|e| open_err(sled::Error::Io(e)))?;
    let db = config(&path).open().map_err(open_err)?;
    let after = db.size_on_disk().map_err(open_err)?;
    let base = seq_base(&db).map_err(open_err)?;
    Ok((db, base, Some(Compacted { before, after, live })))
}

/// The files' size against what they hold, and when that was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Measure {
    pub disk: u64,
    pub live: u64,
    /// Unix seconds.
    pub at: u64,
}

fn measured(db: &sled::Db) -> sled::Result<Option<Measure>> {
    let v = db.open_tree(META)?.get(MEASURED)?;
    let number = |v: &[u8], i: usize| v.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
    Ok(v.and_then(|v| Some(Measure { disk: number(&v, 0)?, live: number(&v, 1)?, at: number(&v, 2)? })))
}

/// Measures how much of the files over `min_disk` is live, for the next
/// open to compact if little is; a walk over every record, so done only
/// when unmeasured, grown `REMEASURE_GROWTH` times or `REMEASURE_AFTER`
/// older since (`now` in Unix seconds). What it measured, if it did.
pub(super) fn measure(db: &sled::Db, min_disk: u64, now: u64) -> sled::Result<Option<Measure>> {
    let disk = db.size_on_disk()?;
    let due = match measured(db)? {
        Some(m) => disk >= m.disk.saturating_mul(REMEASURE_GROWTH) || now >= m.at.saturating_add(REMEASURE_AFTER),
        None => true,
    };
    if disk <= min_disk || !due {
        return Ok(None);
    }
    let m = Measure { disk, live: live_bytes(db)?, at: now };
    let bytes = [m.disk, m.live, m.at].map(u64::to_be_bytes).concat();
    db.open_tree(META)?.insert(MEASURED, bytes)?;
    Ok(Some(m))
}

/// What every tree holds: keys and values, in bytes.
fn live_bytes(db: &sled::Db) -> sled::Result<u64> {
    let mut live = 0;
    for name in db.tree_names() {
        for item in db.open_tree(&name)?.iter() {
            let (k, v) = item?;
            live += (k.len() + v.len()) as u64;
        }
    }
    Ok(live)
}

/// Where `generate_id` continues from in `db`.
fn seq_base(db: &sled::Db) -> sled::Result<u64> {
    let meta = db.open_tree(META)?;
    Ok(meta.get(SEQ_BASE)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(0))
}

/// Copies every tree of `db` into a fresh database at `to`, with the id
/// counter's base carried on, flushes it and marks it complete.
fn copy(db: &sled::Db, to: &Path) -> sled::Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    let fresh = config(to).open()?;
    for name in db.tree_names() {
        if name.as_ref() == b"__sled__default" {
            continue; // every database has its own
        }
        let tree = fresh.open_tree(&name)?;
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in db.open_tree(&name)?.iter() {
            let (k, v) = item?;
            batch.insert(k, v);
            n += 1;
            if n % 1000 == 0 {
                tree.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        tree.apply_batch(batch)?;
    }
    // Past every number the old database gave (its counter is ahead of them).
    let next = seq_base(db)? + db.generate_id()? + 1;
    {
        let meta = fresh.open_tree(META)?;
        meta.insert(SEQ_BASE, &next.to_be_bytes())?;
        // The old files' measure is not the copy's.
        meta.remove(MEASURED)?;
    }
    fresh.flush()?;
    drop(fresh);
    // sled's flush does not fsync (see `commit`): every file of the copy is
    // synced before it is marked complete, and the old one goes.
    wait_unlocked(to)?;
    sync_files(to)?;
    std::fs::File::create(to.join("COMPLETE"))?.sync_all()?;
    sync_dir(to)?;
    Ok(())
}

/// fsyncs every file and folder under `dir`.
fn sync_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_files(&entry.path())?;
        } else {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// `db` → `db.old`, `db.compact` → `db`, `db.old` removed; each step
/// durable before the next.
fn swap(dir: &Path) -> std::io::Result<()> {
    let (db, old, fresh) = paths(dir);
    std::fs::rename(&db, &old)?;
    sync_dir(dir)?;
    std::fs::rename(&fresh, &db)?;
    sync_dir(dir)?;
    std::fs::remove_file(db.join("COMPLETE"))?;
    std::fs::remove_dir_all(&old)?;
    sync_dir(dir)
}

/// Finishes or undoes a swap a crash interrupted.
fn recover(dir: &Path) -> std::io::Result<()> {
    let (db, old, fresh) = paths(dir);
    if old.exists() {
        if !db.exists() {
            if fresh.join("COMPLETE").exists() {
                std::fs::rename(&fresh, &db)?;
            } else {
                std::fs::rename(&old, &db)?;
            }
            sync_dir(dir)?;
        }
        // `db` is the complete copy now: the old files are done with.
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
    }
    let _ = std::fs::remove_file(db.join("COMPLETE"));
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh)?; // a copy a crash cut short
    }
    Ok(())
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (dir.join("db"), dir.join("db.old"), dir.join("db.compact"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Waits until no sled instance holds the database at `path` (its threads
/// let go of the file lock a moment after the last handle is dropped).
fn wait_unlocked(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path.join("db"))?;
    for _ in 0..200 {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above; the lock is let go at once.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(std::io::Error::other(format!("{} is still held by another sled instance after 10 s", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Fills `dir/db` with `n` records of 4 KiB in a tree, then deletes all
    /// but every hundredth; returns the ids it generated.
    fn churn(dir: &Path, n: usize) -> u64 {
        let (db, _, _) = ok(open(dir, u64::MAX));
        let t = ok(db.open_tree("jobs"));
        let mut last = 0;
        for i in 0..n {
            last = ok(db.generate_id());
            ok(t.insert(format!("job-{i:06}"), vec![b'x'; 4096]));
        }
        for i in (0..n).filter(|i| i % 100 != 0) {
            ok(t.remove(format!("job-{i:06}")));
        }
        ok(db.flush());
        drop(t);
        drop(db);
        ok(wait_unlocked(&dir.join("db")));
        last
    }

    const NOW: u64 = 1_800_000_000;

    /// Measures `dir/db` as the running daemon's upkeep does, at `now`.
    fn measure_at(dir: &Path, min_disk: u64, now: u64) -> Option<Measure> {
        let (db, _, _) = ok(open(dir, u64::MAX));
        let m = ok(measure(&db, min_disk, now));
        ok(db.flush());
        drop(db);
        ok(wait_unlocked(&dir.join("db")));
        m
    }

    #[test]
    fn a_mostly_dead_database_is_copied_small_with_every_record_and_its_numbers_going_on() {
        let dir = ok(tempfile::tempdir());
        let last = churn(dir.path(), 5000);
        let m = measure_at(dir.path(), 1 << 20, NOW).unwrap_or_else(|| panic!("not measured"));
        assert!(m.disk > m.live * MAX_AMPLIFICATION, "{m:?}");
        let (db, base, compacted) = ok(open(dir.path(), 1 << 20));
        let c = compacted.unwrap_or_else(|| panic!("not compacted"));
        assert!(c.after * 4 < c.before, "{c:?}");
        let t = ok(db.open_tree("jobs"));
        assert_eq!(t.len(), 50);
        assert!(ok(t.get("job-004900")).is_some_and(|v| v.len() == 4096));
        assert!(base + ok(db.generate_id()) > last, "numbers go on past {last}");
        assert!(!dir.path().join("db.old").exists() && !dir.path().join("db.compact").exists());
        // The copy does not carry the old files' measure.
        assert_eq!(ok(measured(&db)), None);
        drop(t);
        drop(db);
        ok(wait_unlocked(&dir.path().join("db")));
        // Once small, it is left as it is.
        let (_, base_again, compacted) = ok(open(dir.path(), 1 << 20));
        assert_eq!((base_again, compacted), (base, None));
    }

    /// Issue 29: a restart does not walk the store to learn how much of it
    /// is dead; a database nobody measured opens as it is, however dead.
    #[test]
    fn an_open_reads_no_record_and_acts_on_the_last_measure_only() {
        let dir = ok(tempfile::tempdir());
        churn(dir.path(), 5000);
        let (db, _, compacted) = ok(open(dir.path(), 1 << 20));
        assert_eq!(compacted, None, "compacted without a measure: the open walked the records");
        drop(db);
        ok(wait_unlocked(&dir.path().join("db")));
        // Measured once; not again until the files have doubled or a day
        // has passed.
        assert!(measure_at(dir.path(), 1 << 20, NOW).is_some());
        assert_eq!(measure_at(dir.path(), 1 << 20, NOW + 3600), None);
        assert!(measure_at(dir.path(), 1 << 20, NOW + REMEASURE_AFTER).is_some());
        assert!(ok(open(dir.path(), 1 << 20)).2.is_some());
    }

    #[test]
    fn a_database_below_the_floor_or_mostly_live_is_left_alone() {
        let dir = ok(tempfile::tempdir());
        churn(dir.path(), 2000);
        assert_eq!(measure_at(dir.path(), u64::MAX, NOW), None, "below the floor: not even measured");
        assert!(ok(open(dir.path(), u64::MAX)).2.is_none());
        let dir = ok(tempfile::tempdir());
        {
            let (db, _, _) = ok(open(dir.path(), u64::MAX));
            let t = ok(db.open_tree("jobs"));
            for i in 0..2000 {
                ok(t.insert(format!("job-{i:06}"), vec![b'x'; 4096]));
            }
            ok(db.flush());
        }
        ok(wait_unlocked(&dir.path().join("db")));
        assert!(measure_at(dir.path(), 1 << 20, NOW).is_some());
        assert!(ok(open(dir.path(), 1 << 20)).2.is_none());
    }

    /// A crash between the swap's renames leaves the old files or the
    /// complete copy as `db`, never neither and never a half copy.
    #[test]
    fn a_swap_cut_short_by_a_crash_is_finished_or_undone() {
        let dir = ok(tempfile::tempdir());
        churn(dir.path(), 3000);
        let (db, old, fresh) = paths(dir.path());
        // Cut after the copy was complete and `db` moved aside.
        {
            let (d, _, _) = ok(open(dir.path(), u64::MAX));
            ok(copy(&d, &fresh));
        }
        ok(wait_unlocked(&db));
        ok(std::fs::rename(&db, &old));
        let (d, _, compacted) = ok(open(dir.path(), u64::MAX));
        assert!(compacted.is_none() && !old.exists() && !fresh.exists());
        assert_eq!(ok(ok(d.open_tree("jobs")).get("job-002900")).map(|v| v.len()), Some(4096));
        drop(d);
        ok(wait_unlocked(&db));
        // Cut while copying: the old files stay.
        ok(std::fs::create_dir_all(&fresh));
        ok(std::fs::rename(&db, &old));
        let (d, _, _) = ok(open(dir.path(), u64::MAX));
        assert_eq!(ok(d.open_tree("jobs")).len(), 30);
        assert!(!old.exists() && !fresh.exists());
    }
}
