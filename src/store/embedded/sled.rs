//! sled under the embedded store: each table a sled tree, each write one
//! sled transaction over them, and sled's file fsynced by the group commit
//! (sled's own flush does not; see `commit`).

use std::cell::RefCell;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use super::engine::{walk, Engine, Visit, Writes, T};
use crate::store::commit::{Durability, GroupCommit};
use crate::store::StoreError;

mod compact;

pub(crate) struct SledEngine {
    db: sled::Db,
    /// One per table, in `T::ALL`'s order.
    trees: Vec<sled::Tree>,
    /// Added to sled's `generate_id`: where numbers go on after a
    /// compaction copied the database (see `compact`).
    seq_base: u64,
    commit: Arc<GroupCommit>,
}

impl SledEngine {
    pub fn open(path: &Path, durability: Durability) -> Result<SledEngine, StoreError> {
        let open_err = |source| StoreError::Open { path: path.to_path_buf(), reason: Box::new(source) };
        std::fs::create_dir_all(path).map_err(|e| open_err(sled::Error::Io(e)))?;
        let (db, seq_base, compacted) = compact::open(path, compact::MIN_DISK)?;
        if let Some(c) = compacted {
            tracing::info!(
                before = c.before,
                after = c.after,
                live = c.live,
                "Compacted the store: sled's files held mostly deleted records."
            );
        }
        let trees = T::ALL.iter().map(|t| db.open_tree(t.name())).collect::<Result<Vec<_>, _>>().map_err(open_err)?;
        // sled keeps its log in `db/db`; group commit fsyncs it (see `commit`).
        let file = std::fs::File::open(path.join("db").join("db")).map_err(|e| open_err(sled::Error::Io(e)))?;
        let flushing = db.clone();
        let commit = GroupCommit::new(durability, move || {
            flushing.flush().map_err(std::io::Error::other)?;
            file.sync_data()
        });
        Ok(SledEngine { db, trees, seq_base, commit })
    }

    fn tree(&self, t: T) -> &sled::Tree {
        // `trees` holds every `T`, in `T::ALL`'s order, which is theirs.
        &self.trees[t as usize]
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        StoreError::Database(Box::new(e))
    }
}

impl Engine for SledEngine {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(t).get(key)?.map(|v| v.to_vec()))
    }

    fn scan(&self, t: T, lo: Bound<&[u8]>, hi: Bound<&[u8]>, rev: bool, visit: Visit) -> Result<(), StoreError> {
        let range = self.tree(t).range::<&[u8], _>((lo, hi));
        let each = |item: sled::Result<(sled::IVec, sled::IVec)>| -> Result<bool, StoreError> {
            let (k, v) = item?;
            visit(&k, &v)
        };
        walk(range, rev, each)
    }

    fn len(&self, t: T) -> Result<usize, StoreError> {
        Ok(self.tree(t).len())
    }

    fn write(&self, f: &mut dyn FnMut(&mut dyn Writes) -> Result<(), StoreError>) -> Result<(), StoreError> {
        // sled wants a `Fn` it may call again on a conflict.
        let f = RefCell::new(f);
        let result = self.trees.as_slice().transaction(|trees: &Vec<TransactionalTree>| {
            let mut w = SledWrites { trees, failed: None };
            let outcome = (f.borrow_mut())(&mut w);
            match (outcome, w.failed) {
                (Ok(()), _) => Ok(()),
                // sled's own failure: a conflict is retried by sled.
                (Err(_), Some(e)) => Err(e.into()),
                (Err(e), None) => Err(ConflictableTransactionError::Abort(e)),
            }
        });
        result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        })
    }

    fn next_ids(&self, n: usize) -> Result<Vec<u64>, StoreError> {
        (0..n).map(|_| Ok(self.seq_base + self.db.generate_id()?)).collect()
    }

    fn commit(&self) -> &Arc<GroupCommit> {
        &self.commit
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn upkeep(&self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Some(m) = compact::measure(&self.db, compact::MIN_DISK, now)? {
            tracing::info!(disk = m.disk, live = m.live, "Measured what sled's files hold.");
        }
        Ok(())
    }
}

/// The trees inside one sled transaction.
struct SledWrites<'a> {
    trees: &'a [TransactionalTree],
    /// sled's own failure, handed back to sled (which retries a conflict).
    failed: Option<UnabortableTransactionError>,
}

impl SledWrites<'_> {
    fn fail(&mut self, e: UnabortableTransactionError) -> StoreError {
        let said = StoreError::Conflict(e.to_string());
        self.failed = Some(e);
        said
    }
}

impl Writes for SledWrites<'_> {
    fn get(&mut self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.trees[t as usize].get(key) {
            Ok(v) => Ok(v.map(|v| v.to_vec())),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn insert(&mut self, t: T, key: &[u8], value: &[u8]) -> Result<bool, StoreError> {
        match self.trees[t as usize].insert(key, value) {
            Ok(old) => Ok(old.is_some()),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn remove(&mut self, t: T, key: &[u8]) -> Result<bool, StoreError> {
        match self.trees[t as usize].remove(key) {
            Ok(old) => Ok(old.is_some()),
            Err(e) => Err(self.fail(e)),
        }
    }
}
