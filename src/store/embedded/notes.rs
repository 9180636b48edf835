//! What the embedded store keeps of a pull request between jobs: its head
//! and the notes (`Store::note`), each stamped with its last use in the
//! `used` table, and pruned once unused for the retention.

use std::ops::Bound;

use chrono::Utc;

use super::engine::{EngineExt, T};
use super::EmbeddedStore;
use crate::domain::subject_key;
use crate::store::{PrHead, StoreError};

/// The `used` table's key of a note (`b'n'`) or a head (`b'h'`).
fn used_key(kind: u8, key: &str) -> Vec<u8> {
    [&[kind, 0x1f][..], key.as_bytes()].concat()
}

fn millis(at: chrono::DateTime<Utc>) -> [u8; 8] {
    (at.timestamp_millis().max(0) as u64).to_be_bytes()
}

fn count(v: Option<&[u8]>) -> u64 {
    v.and_then(|v| serde_json::from_slice::<u64>(v).ok()).unwrap_or(0)
}

impl EmbeddedStore {
    pub(crate) fn set_head(
        &self,
        repo: &str,
        number: u64,
        head: &PrHead,
        updated_at: &str,
    ) -> Result<Option<String>, StoreError> {
        let value = crate::store::encode_head(head, updated_at);
        let key = subject_key(repo, number);
        let now = millis(Utc::now());
        let moved_from = self.e().write_with(|w| {
            let old = w.get(T::Heads, key.as_bytes())?.map(|o| crate::store::decode_head(&String::from_utf8_lossy(&o)));
            let newer = old.as_ref().is_none_or(|(_, at)| at.as_str() <= updated_at);
            if newer {
                w.insert(T::Heads, key.as_bytes(), value.as_bytes())?;
            }
            w.insert(T::Used, &used_key(b'h', &key), &now)?;
            Ok(old.filter(|_| newer).map(|(old, _)| old.sha))
        })?;
        Ok(moved_from.filter(|sha| *sha != head.sha))
    }

    pub(crate) fn pr_head(&self, repo: &str, number: u64) -> Result<Option<PrHead>, StoreError> {
        let key = subject_key(repo, number);
        let head =
            self.e().get(T::Heads, key.as_bytes())?.map(|v| crate::store::decode_head(&String::from_utf8_lossy(&v)).0);
        if head.is_some() {
            self.touch(b'h', &key);
        }
        Ok(head)
    }

    pub(crate) fn note(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let value = self.e().get(T::Notes, key.as_bytes())?.and_then(|v| serde_json::from_slice(&v).ok());
        if value.is_some() {
            self.touch(b'n', key);
        }
        Ok(value)
    }

    pub(crate) async fn set_note(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        let now = millis(Utc::now());
        self.e().write(&mut |w| {
            w.insert(T::Notes, key.as_bytes(), &bytes)?;
            w.insert(T::Used, &used_key(b'n', key), &now).map(drop)
        })?;
        self.flush().await
    }

    pub(crate) async fn forget_notes(&self, keys: &[String]) -> Result<(), StoreError> {
        self.e().write(&mut |w| {
            for key in keys {
                w.remove(T::Notes, key.as_bytes())?;
                w.remove(T::Used, &used_key(b'n', key))?;
            }
            Ok(())
        })?;
        self.flush().await
    }

    pub(crate) async fn count_up(&self, key: &str) -> Result<u64, StoreError> {
        let now = millis(Utc::now());
        let new = self.e().write_with(|w| {
            let new = count(w.get(T::Notes, key.as_bytes())?.as_deref()) + 1;
            w.insert(T::Notes, key.as_bytes(), &serde_json::to_vec(&new).unwrap_or_default())?;
            w.insert(T::Used, &used_key(b'n', key), &now)?;
            Ok(new)
        })?;
        self.flush().await?;
        Ok(new)
    }

    /// Marks a note or head as used now. Not flushed of its own: losing a
    /// touch to a crash only lets the record go a little sooner.
    fn touch(&self, kind: u8, key: &str) {
        let now = millis(Utc::now());
        if let Err(e) = self.e().write(&mut |w| w.insert(T::Used, &used_key(kind, key), &now).map(drop)) {
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
        for (kind, t) in [(b'n', T::Notes), (b'h', T::Heads)] {
            let (mut doomed, mut untimed) = (Vec::new(), Vec::new());
            self.e().scan(t, Bound::Unbounded, Bound::Unbounded, false, &mut |key, _| {
                let used = used_key(kind, &String::from_utf8_lossy(key));
                match self.e().get(T::Used, &used)? {
                    Some(at) if at.as_slice() < cutoff.as_slice() => doomed.push((key.to_vec(), used)),
                    Some(_) => {}
                    None => untimed.push(used),
                }
                Ok(true)
            })?;
            self.e().write(&mut |w| {
                for used in &untimed {
                    w.insert(T::Used, used, &now)?;
                }
                Ok(())
            })?;
            for chunk in doomed.chunks(500) {
                self.e().write(&mut |w| {
                    for (key, used) in chunk {
                        w.remove(t, key)?;
                        w.remove(T::Used, used)?;
                    }
                    Ok(())
                })?;
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
