//! redb under the embedded store: one file (`baton.redb`), each table a
//! redb table of bytes, each write one redb transaction committed without
//! an fsync, and the group commit's sync an empty durable commit, which
//! makes every commit before it durable at once. The writer thread's batch
//! is itself the durable commit: one commit per batch, not two. Job
//! numbers are counted in memory and stored with the write that uses them.
//!
//! redb is a copy-on-write B-tree: pages freed by deletes are reused, so
//! the file stays near what it holds under churn (issue 31). Every page
//! carries a checksum, and the file is checked when it opens, so a damaged
//! one is refused, never trusted, unless baton closed it cleanly and it is
//! as baton left it (see `Seal`): the check reads the whole file, which at
//! a million jobs is seconds of every restart.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::engine::{walk, Engine, Visit, Writes, T};
use crate::store::commit::{Durability, GroupCommit};
use crate::store::StoreError;

/// The database file, in the store's folder.
pub(crate) const FILE: &str = "baton.redb";

/// Numbers handed out so far (`next_ids`), in the engine's own table.
const META: TableDefinition<&str, u64> = TableDefinition::new("baton_meta");
const SEQ: &str = "seq";

/// A table opened for reading.
type ReadTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

fn table(t: T) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(t.name())
}

pub(crate) struct RedbEngine {
    /// Taken only by `drop`, to close the database and seal its file.
    db: Option<Arc<redb::Database>>,
    file: PathBuf,
    commit: Arc<GroupCommit>,
    /// The next number `next_ids` hands out, and the highest stored.
    next: Mutex<u64>,
    stored: AtomicU64,
    /// `baton.redb.lock`, held from before the seal is read until after it
    /// is written (see `hold`). Declared last: dropped after `drop` seals.
    _lock: std::fs::File,
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    StoreError::Database(Box::new(e))
}

impl RedbEngine {
    /// Opens (or creates) `path/baton.redb`.
    pub fn open(path: &Path, durability: Durability) -> Result<RedbEngine, StoreError> {
        std::fs::create_dir_all(path)
            .map_err(|e| StoreError::Open { path: path.to_path_buf(), reason: Box::new(e) })?;
        RedbEngine::open_file(&path.join(FILE), durability)
    }

    pub fn open_file(file: &Path, durability: Durability) -> Result<RedbEngine, StoreError> {
        let open_err =
            |reason: Box<dyn std::error::Error + Send + Sync>| StoreError::Open { path: file.to_path_buf(), reason };
        let file = file.to_path_buf();
        // Every page's checksum is read at open, so a file changed behind
        // redb's back is refused rather than trusted; unless baton closed
        // it and nothing has changed it since.
        let lock = hold(&file).map_err(|e| open_err(Box::new(e)))?;
        let existed = file.exists();
        let check = !Seal::intact(&file).map_err(|e| open_err(Box::new(e)))?;
        let started = std::time::Instant::now();
        let db = redb::Builder::new()
            .set_cache_size(32 << 20)
            .set_check_integrity_on_open(check)
            .create(&file)
            .map_err(|e| open_err(Box::new(e)))?;
        if check && existed {
            tracing::info!(
                file = %file.display(),
                took_ms = started.elapsed().as_millis() as u64,
                "Checked every page of the store's file: baton did not close it cleanly, or it changed since."
            );
        }
        // Every table exists from the start, so a read never meets a
        // missing one.
        let w = db.begin_write().map_err(|e| open_err(Box::new(e)))?;
        for t in T::ALL {
            w.open_table(table(t)).map_err(|e| open_err(Box::new(e)))?;
        }
        let meta = w.open_table(META).map_err(|e| open_err(Box::new(e)))?;
        let next = meta.get(SEQ).map_err(|e| open_err(Box::new(e)))?.map(|v| v.value()).unwrap_or(0);
        drop(meta);
        w.commit().map_err(|e| open_err(Box::new(e)))?;
        let db = Arc::new(db);
        // Weak: the database closes with the engine, not with the last
        // holder of its group commit.
        let syncing = Arc::downgrade(&db);
        let commit = GroupCommit::new(durability, move || {
            // Closed: its close made everything durable.
            let Some(syncing) = syncing.upgrade() else { return Ok(()) };
            // A durable commit makes the commits before it durable too.
            let mut w = syncing.begin_write().map_err(std::io::Error::other)?;
            w.set_durability(redb::Durability::Immediate).map_err(std::io::Error::other)?;
            w.commit().map_err(std::io::Error::other)
        });
        Ok(RedbEngine { db: Some(db), file, commit, next: Mutex::new(next), stored: AtomicU64::new(next), _lock: lock })
    }

    fn db(&self) -> Result<&redb::Database, StoreError> {
        self.db.as_deref().ok_or(StoreError::Database("the store is closing".into()))
    }

    /// Forgets that `file` was closed cleanly, and its lock file (it was
    /// moved away).
    pub fn unseal(file: &Path) {
        let _ = std::fs::remove_file(Seal::path(file));
        let _ = std::fs::remove_file(lock_path(file));
    }

    /// Numbers from now on start at `floor` or above (a store copied in
    /// carries its numbers on).
    pub fn set_floor(&self, floor: u64) -> Result<(), StoreError> {
        {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next = (*next).max(floor);
        }
        self.write_as(redb::Durability::Immediate, &mut |_| Ok(()))
    }

    /// Runs `f` in a write transaction committed with `durability`; the
    /// numbers `next_ids` has handed out are stored with it.
    fn write_as(
        &self,
        durability: redb::Durability,
        f: &mut dyn FnMut(&mut dyn Writes) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db()?.begin_write().map_err(db_err)?;
        txn.set_durability(durability).map_err(db_err)?;
        // Read once the transaction is begun: write transactions take turns,
        // so what each stores never goes back.
        let next = *self.next.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = {
            let mut w = RedbWrites { txn: &txn, tables: (0..T::ALL.len()).map(|_| None).collect() };
            f(&mut w)
        };
        let outcome = outcome.and_then(|()| {
            if next > self.stored.load(Ordering::Acquire) {
                txn.open_table(META).map_err(db_err)?.insert(SEQ, next).map_err(db_err)?;
            }
            Ok(())
        });
        match outcome {
            Ok(()) => {
                txn.commit().map_err(db_err)?;
                self.stored.fetch_max(next, Ordering::AcqRel);
                self.commit.wrote();
                Ok(())
            }
            Err(e) => {
                txn.abort().map_err(db_err)?;
                Err(e)
            }
        }
    }

    fn read(&self, t: T) -> Result<ReadTable, StoreError> {
        let r = self.db()?.begin_read().map_err(db_err)?;
        r.open_table(table(t)).map_err(db_err)
    }
}

impl Engine for RedbEngine {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read(t)?.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    fn get_many(&self, keys: &[(T, &[u8])]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        // Opening a read transaction and its tables costs more than a get.
        let r = self.db()?.begin_read().map_err(db_err)?;
        let mut open: Vec<(T, ReadTable)> = Vec::new();
        let mut out = Vec::with_capacity(keys.len());
        for &(t, key) in keys {
            let i = match open.iter().position(|(o, _)| *o == t) {
                Some(i) => i,
                None => {
                    open.push((t, r.open_table(table(t)).map_err(db_err)?));
                    open.len() - 1
                }
            };
            out.push(open[i].1.get(key).map_err(db_err)?.map(|v| v.value().to_vec()));
        }
        Ok(out)
    }

    fn scan(&self, t: T, lo: Bound<&[u8]>, hi: Bound<&[u8]>, rev: bool, visit: Visit) -> Result<(), StoreError> {
        let table = self.read(t)?;
        let range = table.range((lo, hi)).map_err(db_err)?;
        let each = |item: Result<Pair, redb::StorageError>| {
            let (k, v) = item.map_err(db_err)?;
            visit(k.value(), v.value())
        };
        walk(range, rev, each)
    }

    fn len(&self, t: T) -> Result<usize, StoreError> {
        Ok(self.read(t)?.len().map_err(db_err)? as usize)
    }

    fn write(&self, f: &mut dyn FnMut(&mut dyn Writes) -> Result<(), StoreError>) -> Result<(), StoreError> {
        // Durable at the next group commit, with every write before it.
        self.write_as(redb::Durability::None, f)
    }

    fn write_durably(&self, f: &mut dyn FnMut(&mut dyn Writes) -> Result<(), StoreError>) -> Result<bool, StoreError> {
        // One commit that is durable, not a commit and then an empty one.
        let durable = self.commit.durable_commit();
        self.write_as(if durable { redb::Durability::Immediate } else { redb::Durability::None }, f)?;
        Ok(durable)
    }

    fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError> {
        // Stored with the next write, which is the one that uses them.
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let first = *next;
        *next += n as u64;
        Ok((first..*next).collect())
    }

    fn commit(&self) -> &Arc<GroupCommit> {
        &self.commit
    }

    fn size_on_disk(&self) -> u64 {
        std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0)
    }
}

/// Locks `file` for one process: redb's own lock on the file is let go at
/// its close, before the seal is written, so a second process opening in
/// between would find no seal, write, and then have its writes sealed by
/// the first. This lock spans both.
fn hold(file: &Path) -> std::io::Result<std::fs::File> {
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(lock_path(file))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(std::io::Error::other("locked: another process has the store open, or is closing it"))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

fn lock_path(file: &Path) -> PathBuf {
    let mut path = file.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

/// Beside the store's file once baton has closed it cleanly: the file's
/// device, inode, size and change time then. An open that finds them
/// unchanged trusts the file without reading it all; anything that wrote
/// to it, replaced or truncated it since (a restore, a copy, a stray
/// `dd`) has moved its change time, which no user-space call can set back,
/// so it is checked. A crash leaves no seal: it is removed at open, before
/// the first write, and redb checks a file it did not close itself anyway.
struct Seal;

impl Seal {
    fn path(file: &Path) -> PathBuf {
        let mut p = file.as_os_str().to_owned();
        p.push(".closed");
        PathBuf::from(p)
    }

    fn identity(m: &std::fs::Metadata) -> String {
        use std::os::unix::fs::MetadataExt;
        format!("{} {} {} {}.{:09}", m.dev(), m.ino(), m.len(), m.ctime(), m.ctime_nsec())
    }

    /// Whether `file` is as a clean close left it; the seal is gone after.
    fn intact(file: &Path) -> std::io::Result<bool> {
        let seal = Seal::path(file);
        let sealed = std::fs::read_to_string(&seal).ok();
        match std::fs::remove_file(&seal) {
            // Gone for good before redb writes: a power cut must not bring
            // it back beside a file that changed.
            Ok(()) => std::fs::File::open(seal.parent().unwrap_or(Path::new(".")))?.sync_all()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // A seal that stays would vouch for a file baton goes on to
            // write: refuse to open rather than check once and trust later.
            Err(e) => return Err(e),
        }
        let Some(sealed) = sealed else { return Ok(false) };
        Ok(std::fs::metadata(file).is_ok_and(|m| Seal::identity(&m) == sealed))
    }

    /// Writes the seal for the file as it is now (on an error, a seal may
    /// be left for the caller to remove). A filesystem stamps
    /// change times from a coarse clock (a few milliseconds a tick), so a
    /// write in the same tick as redb's last would leave the same time: the
    /// seal is only kept once the clock, read off the seal's own change
    /// time, has moved past the file's.
    fn write(file: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let seal = Seal::path(file);
        let ctime = |m: &std::fs::Metadata| (m.ctime(), m.ctime_nsec());
        for _ in 0..200 {
            let before = std::fs::metadata(file)?;
            let identity = Seal::identity(&before);
            std::fs::write(&seal, &identity)?;
            if ctime(&std::fs::metadata(&seal)?) > ctime(&before)
                && Seal::identity(&std::fs::metadata(file)?) == identity
            {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(std::io::Error::other("the filesystem's clock did not move past the file's change time"))
    }
}

impl Drop for RedbEngine {
    /// Closes the database and, when its close succeeded, seals the file.
    /// Not while a panic unwinds, nor while anything else holds the
    /// database (a flush in flight closes it when done): then no seal, and
    /// the next open checks.
    fn drop(&mut self) {
        let Some(db) = self.db.take().and_then(Arc::into_inner) else { return };
        if std::thread::panicking() {
            return;
        }
        if let Err(e) = db.close() {
            tracing::error!(file = %self.file.display(), error = %e, "Closing the store's file failed; the next start checks it.");
            return;
        }
        if let Err(e) = Seal::write(&self.file) {
            tracing::debug!(error = %e, "The store's file was left without a seal; the next open checks it.");
            let _ = std::fs::remove_file(Seal::path(&self.file));
        }
    }
}

/// A key and its value, as a range yields them.
type Pair<'a> = (redb::AccessGuard<'a, &'static [u8]>, redb::AccessGuard<'a, &'static [u8]>);

type Table<'txn> = redb::Table<'txn, &'static [u8], &'static [u8]>;

/// The tables of one write transaction, each opened once when first used.
struct RedbWrites<'txn> {
    txn: &'txn redb::WriteTransaction,
    tables: Vec<Option<Table<'txn>>>,
}

impl<'txn> RedbWrites<'txn> {
    fn table(&mut self, t: T) -> Result<&mut Table<'txn>, StoreError> {
        let slot = &mut self.tables[t as usize];
        if slot.is_none() {
            *slot = Some(self.txn.open_table(table(t)).map_err(db_err)?);
        }
        // (Filled just above when it was empty.)
        slot.as_mut().ok_or_else(|| StoreError::Database(format!("table {} did not open", t.name()).into()))
    }
}

impl Writes for RedbWrites<'_> {
    fn get(&mut self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.table(t)?.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    fn insert(&mut self, t: T, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        Ok(self.table(t)?.insert(key, value).map_err(db_err)?.is_some())
    }

    fn remove(&mut self, t: T, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.table(t)?.remove(key).map_err(db_err)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A number is stored with the write that uses it, so a store opened
    /// again never hands out a number a stored record holds; one handed
    /// out that no write stored may be given again.
    #[test]
    fn numbers_are_stored_with_the_write_that_uses_them() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let open = || RedbEngine::open(dir.path(), Durability::Fsync).unwrap_or_else(|e| panic!("{e}"));
        {
            let e = open();
            assert_eq!(e.next_ids(3).ok(), Some(vec![0, 1, 2]));
            e.write_durably(&mut |w| w.insert(T::Jobs, b"j2", b"{}").map(drop)).unwrap_or_else(|e| panic!("{e}"));
            assert!(e.commit().flushes.load(std::sync::atomic::Ordering::Relaxed) > 0, "one durable commit");
            assert_eq!(e.next_ids(2).ok(), Some(vec![3, 4]));
        }
        let e = open();
        assert_eq!(e.next_ids(1).ok(), Some(vec![3]));
        e.set_floor(10).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.next_ids(1).ok(), Some(vec![10]));
        drop(e);
        assert_eq!(open().next_ids(1).ok(), Some(vec![10]), "the floor is stored at once");
    }

    /// `get_many` answers in the order asked, across tables, with what is
    /// missing as `None`, as one `get` after another would.
    #[test]
    fn get_many_reads_like_gets_in_order() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let e = RedbEngine::open(dir.path(), Durability::Fsync).unwrap_or_else(|e| panic!("{e}"));
        e.write(&mut |w| {
            w.insert(T::Jobs, b"a", b"1")?;
            w.insert(T::Deliveries, b"a", b"2")?;
            w.insert(T::Jobs, b"c", b"3").map(drop)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let keys: [(T, &[u8]); 5] =
            [(T::Jobs, b"c"), (T::Deliveries, b"a"), (T::Jobs, b"b"), (T::Groups, b"a"), (T::Jobs, b"a")];
        let many = e.get_many(&keys).unwrap_or_else(|e| panic!("{e}"));
        let one: Vec<_> = keys.iter().map(|&(t, k)| e.get(t, k).unwrap_or_else(|e| panic!("{e}"))).collect();
        assert_eq!(many, one);
        assert_eq!(many, vec![Some(b"3".to_vec()), Some(b"2".to_vec()), None, None, Some(b"1".to_vec())]);
    }
}
