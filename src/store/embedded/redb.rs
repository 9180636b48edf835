//! redb under the embedded store: one file (`baton.redb`), each table a
//! redb table of bytes, each write one redb transaction committed without
//! an fsync, and the group commit's sync an empty durable commit, which
//! makes every commit before it durable at once.
//!
//! redb is a copy-on-write B-tree: pages freed by deletes are reused, so
//! the file stays near what it holds under churn (issue 31). Every page
//! carries a checksum, and the file is checked when it opens, so a damaged
//! one is refused, never trusted.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::engine::{walk, Engine, Visit, Writes, T};
use crate::store::commit::{Durability, GroupCommit};
use crate::store::StoreError;

/// The database file, in the store's folder.
pub(crate) const FILE: &str = "baton.redb";

/// Numbers handed out so far (`next_ids`), in the engine's own table.
const META: TableDefinition<&str, u64> = TableDefinition::new("baton_meta");
const SEQ: &str = "seq";

fn table(t: T) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(t.name())
}

pub(crate) struct RedbEngine {
    db: Arc<redb::Database>,
    file: PathBuf,
    commit: Arc<GroupCommit>,
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    StoreError::Database(Box::new(e))
}

impl RedbEngine {
    /// Opens (or creates) `path/baton.redb`.
    pub fn open(path: &Path, durability: Durability) -> Result<RedbEngine, StoreError> {
        std::fs::create_dir_all(path)
            .map_err(|e| StoreError::Open { path: path.to_path_buf(), source: Box::new(e) })?;
        RedbEngine::open_file(&path.join(FILE), durability)
    }

    pub fn open_file(file: &Path, durability: Durability) -> Result<RedbEngine, StoreError> {
        let open_err =
            |source: Box<dyn std::error::Error + Send + Sync>| StoreError::Open { path: file.to_path_buf(), source };
        let file = file.to_path_buf();
        let db = redb::Builder::new()
            .set_cache_size(32 << 20)
            // Every page's checksum is read at open: a file changed behind
            // redb's back is refused rather than trusted.
            .set_check_integrity_on_open(true)
            .create(&file)
            .map_err(|e| open_err(Box::new(e)))?;
        // Every table exists from the start, so a read never meets a
        // missing one.
        let w = db.begin_write().map_err(|e| open_err(Box::new(e)))?;
        for t in T::ALL {
            w.open_table(table(t)).map_err(|e| open_err(Box::new(e)))?;
        }
        w.open_table(META).map_err(|e| open_err(Box::new(e)))?;
        w.commit().map_err(|e| open_err(Box::new(e)))?;
        let db = Arc::new(db);
        let syncing = db.clone();
        let commit = GroupCommit::new(durability, move || {
            // A durable commit makes the commits before it durable too.
            let mut w = syncing.begin_write().map_err(std::io::Error::other)?;
            w.set_durability(redb::Durability::Immediate).map_err(std::io::Error::other)?;
            w.commit().map_err(std::io::Error::other)
        });
        Ok(RedbEngine { db, file, commit })
    }

    /// Numbers from now on start at `floor` or above (a store copied in
    /// carries its numbers on).
    pub fn set_floor(&self, floor: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let next = meta.get(SEQ).map_err(db_err)?.map(|v| v.value()).unwrap_or(0);
            meta.insert(SEQ, next.max(floor)).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    fn read(&self, t: T) -> Result<redb::ReadOnlyTable<&'static [u8], &'static [u8]>, StoreError> {
        let r = self.db.begin_read().map_err(db_err)?;
        r.open_table(table(t)).map_err(db_err)
    }
}

impl Engine for RedbEngine {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read(t)?.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
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
        let mut txn = self.db.begin_write().map_err(db_err)?;
        // Durable at the next group commit, with every write before it.
        txn.set_durability(redb::Durability::None).map_err(db_err)?;
        let outcome = {
            let mut w = RedbWrites { txn: &txn, tables: (0..T::ALL.len()).map(|_| None).collect() };
            f(&mut w)
        };
        match outcome {
            Ok(()) => {
                txn.commit().map_err(db_err)?;
                self.commit.wrote();
                Ok(())
            }
            Err(e) => {
                txn.abort().map_err(db_err)?;
                Err(e)
            }
        }
    }

    fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError> {
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(redb::Durability::None).map_err(db_err)?;
        let first = {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let first = meta.get(SEQ).map_err(db_err)?.map(|v| v.value()).unwrap_or(0);
            meta.insert(SEQ, first + n as u64).map_err(db_err)?;
            first
        };
        txn.commit().map_err(db_err)?;
        self.commit.wrote();
        Ok((first..first + n as u64).collect())
    }

    fn commit(&self) -> &Arc<GroupCommit> {
        &self.commit
    }

    fn size_on_disk(&self) -> u64 {
        std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0)
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
