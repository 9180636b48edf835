//! Environment caches: what a setup phase produced, kept on this replica's
//! disk under `<storage>/caches/KEY/` and keyed by (repository,
//! environment, setup commands, the repository's setup script, the
//! contents of the key files).
//!
//! - **One writer.** Each key has a lock file, held with `flock` while the
//!   cache is filled, copied or removed, so two jobs (or two daemons on one
//!   disk, or `baton cache clear`) never write one cache at once: the
//!   second waits for the first to fill it, then uses it.
//! - **Complete or absent.** A cache counts only once its `meta.json` is
//!   written, after the setup succeeded and its files were checked; a
//!   setup that died half-way leaves nothing another job would use.
//! - **Runs use a copy.** The agent and `verify` work on a copy made for
//!   the attempt, so nothing an agent writes reaches the next job's cache
//!   (a cache is what a setup made, never what an agent planted).
//! - **Bounded.** Caches unused for `storage.cache_retention` go, and past
//!   `storage.cache_max` bytes the least recently used go first.

use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// The folder under the storage folder that holds the caches.
pub const FOLDER: &str = "caches";

const META: &str = "meta.json";
const DATA: &str = "data";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {key}: {source}")]
    Io { key: String, source: std::io::Error },
    #[error("copying cache {key} failed: {why}")]
    Copy { key: String, why: String },
}

/// What is known of one cache (its `meta.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub key: String,
    pub repo: String,
    pub environment: String,
    /// The cache paths, as the sandbox sees them, in `data/0`, `data/1`…
    pub paths: Vec<PathBuf>,
    /// Seconds since the epoch.
    pub created: u64,
    pub last_used: u64,
    pub bytes: u64,
}

/// What a key is made of.
pub struct KeyParts<'a> {
    pub repo: &'a str,
    /// Where the workspace's code came from (`branch` or `pull-request`):
    /// a setup run on a pull request's head runs its code, so what it
    /// fills never serves a job on a branch.
    pub scope: &'a str,
    pub environment: &'a str,
    pub setup: &'a [String],
    pub paths: &'a [PathBuf],
    /// The repository's own setup script, when it runs.
    pub repo_script: Option<&'a str>,
    /// Each key file and its contents (`None`: absent).
    pub files: &'a [(String, Option<Vec<u8>>)],
}

impl KeyParts<'_> {
    /// 32 hex digits of SHA-256 over every part, each length-prefixed so no
    /// two different inputs run together into one.
    pub fn key(&self) -> String {
        let mut h = sha2::Sha256::new();
        let mut part = |tag: &str, bytes: &[u8]| {
            h.update(tag.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        part("repo", self.repo.as_bytes());
        part("scope", self.scope.as_bytes());
        part("env", self.environment.as_bytes());
        for c in self.setup {
            part("setup", c.as_bytes());
        }
        for p in self.paths {
            part("path", p.as_os_str().as_encoded_bytes());
        }
        if let Some(s) = self.repo_script {
            part("script", s.as_bytes());
        }
        for (name, contents) in self.files {
            part("file", name.as_bytes());
            match contents {
                Some(c) => part("contents", c),
                None => part("absent", b""),
            }
        }
        hex::encode(&h.finalize()[..16])
    }
}

/// The caches of one storage folder.
#[derive(Debug, Clone)]
pub struct Caches {
    root: PathBuf,
}

/// A cache's lock, held: the holder alone reads or writes the cache.
#[derive(Debug)]
pub struct Held {
    _lock: std::fs::File,
    dir: PathBuf,
    key: String,
}

/// `KEY.lock`, beside the cache's folder.
fn lock_path(root: &Path, key: &str) -> PathBuf {
    root.join(format!("{key}.lock"))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Caches {
    pub fn new(storage: &Path) -> Caches {
        Caches { root: storage.join(FOLDER) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock_file(&self, key: &str) -> Result<std::fs::File, CacheError> {
        let io = |source| CacheError::Io { key: key.to_string(), source };
        std::fs::create_dir_all(&self.root).map_err(io)?;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(lock_path(&self.root, key))
            .map_err(io)
    }

    /// The lock of `key` if nobody holds it.
    pub fn try_lock(&self, key: &str) -> Result<Option<Held>, CacheError> {
        use std::os::unix::fs::MetadataExt as _;
        let path = lock_path(&self.root, key);
        // A removed cache takes its lock file along; whoever opened that
        // file before it went holds a lock nobody else can see, so it
        // counts only while it is still the file at the path.
        for _ in 0..3 {
            let file = self.lock_file(key)?;
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                return Ok(None);
            }
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            };
            if same {
                return Ok(Some(Held { _lock: file, dir: self.root.join(key), key: key.to_string() }));
            }
        }
        Ok(None)
    }

    /// The lock of `key`, waiting for whoever holds it (a job filling it)
    /// until `stop` resolves (then `None`).
    pub async fn lock(
        &self,
        key: &str,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Option<Held>, CacheError> {
        tokio::pin!(stop);
        loop {
            if let Some(held) = self.try_lock(key)? {
                return Ok(Some(held));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = &mut stop => return Ok(None),
            }
        }
    }

    /// Every complete cache.
    pub fn list(&self) -> Vec<Meta> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut out: Vec<Meta> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| read_meta(&e.path()))
            .collect();
        out.sort_by(|a, b| (&a.repo, &a.environment, b.last_used).cmp(&(&b.repo, &b.environment, a.last_used)));
        out
    }

    /// Removes the caches `pick` chooses, skipping any in use; returns the
    /// keys removed.
    pub fn remove_where(&self, pick: impl Fn(&Meta) -> bool) -> Vec<String> {
        let mut removed = Vec::new();
        for meta in self.list().into_iter().filter(|m| pick(m)) {
            if let Ok(Some(held)) = self.try_lock(&meta.key) {
                if held.remove().is_ok() {
                    removed.push(meta.key);
                }
            }
        }
        removed
    }

    /// Applies `retention` and `max` bytes (least recently used first), and
    /// removes what no complete cache owns (a fill cut short). Returns the
    /// keys removed.
    pub fn evict(&self, retention: Duration, max: u64) -> Vec<String> {
        let cutoff = now().saturating_sub(retention.as_secs());
        let mut removed = self.remove_where(|m| m.last_used < cutoff);
        let mut caches = self.list();
        caches.sort_by_key(|m| m.last_used);
        let mut total: u64 = caches.iter().map(|m| m.bytes).sum();
        for m in caches {
            if total <= max {
                break;
            }
            if let Ok(Some(held)) = self.try_lock(&m.key) {
                if held.remove().is_ok() {
                    total = total.saturating_sub(m.bytes);
                    removed.push(m.key);
                }
            }
        }
        // Folders without a meta.json: fills that died; nobody holds them.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let path = e.path();
                let Some(key) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
                if e.file_type().is_ok_and(|t| t.is_dir()) && read_meta(&path).is_none() {
                    if let Ok(Some(held)) = self.try_lock(&key) {
                        let _ = held.remove();
                    }
                }
            }
        }
        removed
    }
}

fn read_meta(dir: &Path) -> Option<Meta> {
    let text = std::fs::read(dir.join(META)).ok()?;
    serde_json::from_slice(&text).ok()
}

impl Held {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The cache, when it is complete.
    pub fn meta(&self) -> Option<Meta> {
        read_meta(&self.dir)
    }

    /// The folder holding every cache path's data.
    pub fn data_root(&self) -> PathBuf {
        self.dir.join(DATA)
    }

    /// Where cache path `i` lives on the host.
    pub fn data(&self, i: usize) -> PathBuf {
        self.dir.join(DATA).join(i.to_string())
    }

    fn io(&self) -> impl Fn(std::io::Error) -> CacheError + '_ {
        move |source| CacheError::Io { key: self.key.clone(), source }
    }

    /// Empties the cache and makes `count` empty data folders, owned by
    /// `owner` when given, for a setup to fill.
    pub fn begin_fill(&self, count: usize, owner: Option<(u32, u32)>) -> Result<(), CacheError> {
        crate::tree::remove(&self.dir).map_err(self.io())?;
        for i in 0..count {
            let d = self.data(i);
            std::fs::create_dir_all(&d).map_err(self.io())?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&d, Some(uid), Some(gid)).map_err(self.io())?;
            }
        }
        Ok(())
    }

    /// Marks the cache complete (its `meta.json`, written last).
    pub fn finish_fill(&self, repo: &str, environment: &str, paths: &[PathBuf]) -> Result<Meta, CacheError> {
        let t = now();
        let meta = Meta {
            key: self.key.clone(),
            repo: repo.to_string(),
            environment: environment.to_string(),
            paths: paths.to_vec(),
            created: t,
            last_used: t,
            bytes: size_of(&self.dir.join(DATA)),
        };
        self.write_meta(&meta)?;
        Ok(meta)
    }

    /// Notes a use (for least-recently-used eviction).
    pub fn touch(&self, meta: &Meta) -> Result<(), CacheError> {
        self.write_meta(&Meta { last_used: now(), ..meta.clone() })
    }

    fn write_meta(&self, meta: &Meta) -> Result<(), CacheError> {
        let tmp = self.dir.join(format!("{META}.tmp"));
        let text = serde_json::to_vec_pretty(meta)
            .map_err(|e| CacheError::Io { key: self.key.clone(), source: std::io::Error::other(e) })?;
        let mut f = std::fs::File::create(&tmp).map_err(self.io())?;
        f.write_all(&text).and_then(|()| f.sync_all()).map_err(self.io())?;
        std::fs::rename(&tmp, self.dir.join(META)).map_err(self.io())
    }

    /// A copy of the data for one attempt, at `dest/0`, `dest/1`…: the
    /// attempt's to change, never the cache's (copy-on-write where the file
    /// system can).
    pub fn copy_to(&self, dest: &Path) -> Result<(), CacheError> {
        crate::tree::remove(dest).map_err(self.io())?;
        let out = std::process::Command::new("cp")
            .args(["-a", "--reflink=auto", "--"])
            .arg(self.dir.join(DATA))
            .arg(dest)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| CacheError::Copy { key: self.key.clone(), why: e.to_string() })?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(CacheError::Copy { key: self.key.clone(), why });
        }
        Ok(())
    }

    /// Removes the cache and its lock file (a waiter holding the old file
    /// open sees it is gone and opens a new one).
    pub fn remove(self) -> Result<(), CacheError> {
        crate::tree::remove(&self.dir).map_err(self.io())?;
        let lock = self.dir.parent().map(|root| lock_path(root, &self.key)).unwrap_or_default();
        match std::fs::remove_file(&lock) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io()(e)),
            _ => Ok(()),
        }
    }
}

/// `1.5 GiB`, `20 MiB`, `300 B`.
pub fn human(bytes: u64) -> String {
    let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    match units.iter().find(|(size, _)| bytes >= *size) {
        Some((size, unit)) => format!("{:.1} {unit}", bytes as f64 / *size as f64),
        None => format!("{bytes} B"),
    }
}

/// Bytes of the regular files under `dir` (links not followed).
pub fn size_of(dir: &Path) -> u64 {
    let mut total = 0u64;
    let _ = crate::tree::walk(dir, |e| {
        if e.kind() == libc::S_IFREG {
            total = total.saturating_add(e.stat.st_size as u64);
        }
        Ok(crate::tree::Next::Enter)
    });
    total
}

/// The first file under `dir` (relative path) holding one of `needles`,
/// and which: how a setup's secret is caught before an agent could read
/// it. Links are not followed; `skip` names top-level entries left out.
pub fn find_any(dir: &Path, needles: &[&[u8]], skip: &[&str]) -> Option<(PathBuf, usize)> {
    let needles: Vec<&[u8]> = needles.iter().copied().filter(|n| !n.is_empty()).collect();
    if needles.is_empty() {
        return None;
    }
    let overlap = needles.iter().map(|n| n.len()).max().unwrap_or(0);
    let mut found = None;
    let _ = crate::tree::walk(dir, |e| {
        if e.parents_empty() && skip.iter().any(|s| e.name.to_bytes() == s.as_bytes()) {
            return Ok(crate::tree::Next::Skip);
        }
        if e.kind() != libc::S_IFREG {
            return Ok(crate::tree::Next::Enter);
        }
        if let Some(i) = file_holds(&e.proc_path(), &needles, overlap) {
            found = Some((e.path(), i));
            return Ok(crate::tree::Next::Stop);
        }
        Ok(crate::tree::Next::Enter)
    });
    found
}

/// Which needle the file holds, read in blocks that overlap by the longest
/// needle so none is missed across a block's edge.
fn file_holds(path: &std::ffi::CStr, needles: &[&[u8]], overlap: usize) -> Option<usize> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(std::ffi::OsStr::from_bytes(path.to_bytes()))
        .ok()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut kept = 0usize;
    loop {
        let n = f.read(&mut buf[kept..]).ok()?;
        if n == 0 {
            return None;
        }
        let window = &buf[..kept + n];
        if let Some(i) = needles.iter().position(|needle| window.windows(needle.len()).any(|w| w == *needle)) {
            return Some(i);
        }
        kept = overlap.min(window.len());
        let start = window.len() - kept;
        buf.copy_within(start..start + kept, 0);
        if kept + 1 >= buf.len() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(files: &'a [(String, Option<Vec<u8>>)], setup: &'a [String]) -> KeyParts<'a> {
        KeyParts { repo: "o/r", scope: "branch", environment: "rust", setup, paths: &[], repo_script: None, files }
    }

    #[test]
    fn the_key_follows_the_key_files_and_the_setup() {
        let setup = vec!["cargo fetch".to_string()];
        let a = [("Cargo.lock".to_string(), Some(b"v1".to_vec()))];
        let b = [("Cargo.lock".to_string(), Some(b"v2".to_vec()))];
        let absent = [("Cargo.lock".to_string(), None)];
        assert_eq!(parts(&a, &setup).key(), parts(&a, &setup).key());
        assert_ne!(parts(&a, &setup).key(), parts(&b, &setup).key());
        assert_ne!(parts(&a, &setup).key(), parts(&absent, &setup).key());
        assert_ne!(parts(&a, &setup).key(), parts(&a, &["npm ci".to_string()]).key());
        let from_pr = KeyParts { scope: "pull-request", ..parts(&a, &setup) };
        assert_ne!(parts(&a, &setup).key(), from_pr.key(), "a pull request's cache never serves a branch");
    }

    #[test]
    fn a_needle_across_a_block_edge_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = vec![b'x'; (1 << 20) - 3];
        text.extend_from_slice(b"SECRET-VALUE");
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), &text).unwrap();
        std::fs::write(dir.path().join("clean"), b"nothing").unwrap();
        let found = find_any(dir.path(), &[b"other", b"SECRET-VALUE"], &[]);
        assert_eq!(found, Some((PathBuf::from("a/b/f"), 1)));
        assert_eq!(find_any(dir.path(), &[b"SECRET-VALUE"], &["a"]), None);
    }

    /// A complete cache of `bytes` bytes last used at `used` (seconds).
    fn cache_at(caches: &Caches, key: &str, bytes: usize, used: u64) {
        let held = caches.try_lock(key).unwrap().unwrap();
        held.begin_fill(1, None).unwrap();
        std::fs::write(held.data(0).join("f"), vec![b'x'; bytes]).unwrap();
        let meta = held.finish_fill("o/r", "rust", &[PathBuf::from("/workspace/target")]).unwrap();
        held.write_meta(&Meta { last_used: used, ..meta }).unwrap();
    }

    #[test]
    fn eviction_keeps_the_total_under_cache_max_least_recently_used_first_and_drops_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let caches = Caches::new(dir.path());
        let t = now();
        cache_at(&caches, "old", 5, t - 300);
        cache_at(&caches, "mid", 5, t - 200);
        cache_at(&caches, "new", 5, t - 100);
        // A fill that died half-way: no meta.json.
        std::fs::create_dir_all(caches.root().join("dead/data/0")).unwrap();
        let year = Duration::from_secs(365 * 86400);
        assert_eq!(caches.evict(year, 10), vec!["old".to_string()]);
        assert!(!caches.root().join("dead").exists(), "the unfinished fill is removed");
        let left: Vec<String> = caches.list().into_iter().map(|m| m.key).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(caches.evict(Duration::from_secs(150), u64::MAX), vec!["mid".to_string()]);
        assert_eq!(caches.list()[0].key, "new");
    }

    #[test]
    fn a_busy_cache_is_not_locked_twice_and_eviction_skips_it() {
        let dir = tempfile::tempdir().unwrap();
        let caches = Caches::new(dir.path());
        let held = caches.try_lock("k1").unwrap().unwrap();
        assert!(caches.try_lock("k1").unwrap().is_none());
        held.begin_fill(1, None).unwrap();
        std::fs::write(held.data(0).join("f"), b"12345").unwrap();
        let meta = held.finish_fill("o/r", "rust", &[PathBuf::from("/workspace/target")]).unwrap();
        assert_eq!(meta.bytes, 5);
        assert!(caches.evict(Duration::ZERO, 0).is_empty(), "in use: kept");
        drop(held);
        assert_eq!(caches.list().len(), 1);
        assert_eq!(caches.evict(Duration::from_secs(3600), 0), vec!["k1".to_string()]);
        assert!(caches.list().is_empty());
        assert!(!caches.root().join("k1.lock").exists(), "an evicted cache's lock file is left behind");
    }

    /// A lock taken on a removed cache's old lock file (opened before the
    /// removal) does not keep a new holder out.
    #[test]
    fn a_lock_on_a_removed_caches_old_file_counts_for_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let caches = Caches::new(dir.path());
        let held = caches.try_lock("k").unwrap().unwrap();
        let stale = std::fs::File::open(caches.root().join("k.lock")).unwrap();
        held.remove().unwrap();
        // SAFETY: flock on a descriptor the test owns.
        assert_eq!(unsafe { libc::flock(stale.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        let fresh = caches.try_lock("k").unwrap();
        assert!(fresh.is_some(), "the old file's lock kept the key busy");
        assert!(caches.try_lock("k").unwrap().is_none(), "two holders of one key");
    }
}
