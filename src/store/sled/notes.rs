//! What sled keeps of a pull request between jobs: its head and the notes
//! (`Store::note`), each stamped with its last use in the `used` tree, and
//! pruned once unused for the retention.

use chrono::Utc;
use sled::transaction::Transactional;

use super::{flatten, SledStore};
use crate::domain::subject_key;
use crate::store::{PrHead, StoreError};

/// The `used` tree's key of a note (`b'n'`) or a head (`b'h'`).
fn used_key(kind: u8, key: &str) -> Vec<u8> {
    [&[kind, 0x1f][..], key.as_bytes()].concat()
}

fn millis(at: chrono::DateTime<Utc>) -> [u8; 8] {
    (at.timestamp_millis().max(0) as u64).to_be_bytes()
}

impl SledStore {
    pub(crate) fn set_head(
        &self,
        repo: &str,
        number: u64,
        head: &PrHead,
        updated_at: &str,
    ) -> Result<Option<String>, StoreError> {
        let value = crate::store::encode_head(head, updated_at);
        let key = subject_key(repo, number);
        let newer = |old: Option<&[u8]>| {
            old.is_none_or(|o| crate::store::decode_head(&String::from_utf8_lossy(o)).1.as_str() <= updated_at)
        };
        let old = self.heads.fetch_and_update(key.as_bytes(), |old| {
            Some(if newer(old) { value.as_bytes().to_vec() } else { old.unwrap_or_default().to_vec() })
        })?;
        self.touch(b'h', &key);
        let from =
            old.filter(|o| newer(Some(o))).map(|o| crate::store::decode_head(&String::from_utf8_lossy(&o)).0.sha);
        Ok(from.filter(|sha| *sha != head.sha))
    }

    pub(crate) fn pr_head(&self, repo: &str, number: u64) -> Result<Option<PrHead>, StoreError> {
        let key = subject_key(repo, number);
        let head = self.heads.get(key.as_bytes())?.map(|v| crate::store::decode_head(&String::from_utf8_lossy(&v)).0);
        if head.is_some() {
            self.touch(b'h', &key);
        }
        Ok(head)
    }

    pub(crate) fn note(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let value = self.notes.get(key.as_bytes())?.and_then(|v| serde_json::from_slice(&v).ok());
        if value.is_some() {
            self.touch(b'n', key);
        }
        Ok(value)
    }

    pub(crate) async fn set_note(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        self.notes.insert(key.as_bytes(), serde_json::to_vec(value).unwrap_or_default())?;
        self.touch(b'n', key);
        self.flush().await
    }

    pub(crate) async fn forget_notes(&self, keys: &[String]) -> Result<(), StoreError> {
        for key in keys {
            self.notes.remove(key.as_bytes())?;
            self.used.remove(used_key(b'n', key))?;
        }
        self.flush().await
    }

    pub(crate) async fn count_up(&self, key: &str) -> Result<u64, StoreError> {
        let count = |v: Option<&[u8]>| v.and_then(|v| serde_json::from_slice::<u64>(v).ok()).unwrap_or(0);
        let new = self
            .notes
            .update_and_fetch(key.as_bytes(), |old| Some(serde_json::to_vec(&(count(old) + 1)).unwrap_or_default()))?;
        self.touch(b'n', key);
        self.flush().await?;
        Ok(count(new.as_deref()))
    }

    /// Marks a note or head as used now. Not flushed of its own: losing a
    /// touch to a crash only lets the record go a little sooner.
    fn touch(&self, kind: u8, key: &str) {
        if let Err(e) = self.used.insert(used_key(kind, key), &millis(Utc::now())) {
            tracing::warn!(error = %e, "Could not note when a note was used.");
        }
    }

    /// Forgets the notes and heads nobody wrote or read since `cutoff`
    /// (one found without a time, from before times were kept, starts its
    /// count now). They are few (one or two per pull request), so a walk
    /// over them is the index.
    pub(crate) async fn prune_notes(&self, cutoff: chrono::DateTime<Utc>) -> Result<usize, StoreError> {
        let cutoff = millis(cutoff);
        let now = millis(Utc::now());
        let mut gone = 0;
        for (kind, tree) in [(b'n', &self.notes), (b'h', &self.heads)] {
            let mut doomed = Vec::new();
            for key in tree.iter().keys() {
                let key = key?;
                let used = used_key(kind, &String::from_utf8_lossy(&key));
                match self.used.get(&used)? {
                    Some(at) if at.as_ref() < cutoff.as_slice() => doomed.push((key, used)),
                    Some(_) => {}
                    None => {
                        self.used.insert(used, &now)?;
                    }
                }
            }
            for chunk in doomed.chunks(500) {
                let result = (tree, &self.used).transaction(|(tree, used)| {
                    for (key, used_at) in chunk {
                        tree.remove(key)?;
                        used.remove(used_at.as_slice())?;
                    }
                    Ok(())
                });
                flatten(result)?;
                tokio::task::yield_now().await;
            }
            gone += doomed.len();
        }
        if gone > 0 {
            self.flush().await?;
        }
        Ok(gone)
    }
}
