//! How much disk a run takes: the bytes and entries under its workspace and
//! `HOME` (a walk that never follows a link or leaves the file system), and
//! what its `/tmp` tmpfs holds (one `statvfs`, read through the sandbox
//! init's root). A run's `max_disk` and `max_files` bound what it adds to
//! the three; the daemon samples while it runs, and once more at its end.

use std::path::{Path, PathBuf};

/// Bytes and entries (inodes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub files: u64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage { bytes: self.bytes + o.bytes, files: self.files + o.files }
    }
}

impl Usage {
    /// What `self` holds beyond `base`.
    pub fn beyond(self, base: Usage) -> Usage {
        Usage { bytes: self.bytes.saturating_sub(base.bytes), files: self.files.saturating_sub(base.files) }
    }
}

/// The used space and inodes of the file system at `path`.
pub fn fs_used(path: &Path) -> std::io::Result<Usage> {
    let s = statvfs(path)?;
    Ok(Usage { bytes: (s.f_blocks.saturating_sub(s.f_bfree)) * s.f_frsize, files: s.f_files.saturating_sub(s.f_ffree) })
}

/// The space left to unprivileged writers on the file system at `path`.
pub fn fs_free(path: &Path) -> std::io::Result<u64> {
    let s = statvfs(path)?;
    Ok(s.f_bavail * s.f_frsize)
}

fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// The space (allocated blocks) and entries under `root`, `root` excluded;
/// stops counting once `stop_at` entries are seen (the caller only needs to
/// know a cap was passed). Links are counted as themselves; other file
/// systems mounted inside are not entered.
pub fn tree(root: &Path, stop_at: u64) -> Usage {
    use std::os::unix::fs::MetadataExt as _;
    let mut usage = Usage::default();
    let Ok(dev) = std::fs::symlink_metadata(root).map(|m| m.dev()) else { return usage };
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            // `DirEntry::metadata` is an lstat: a link is never followed.
            let Ok(meta) = entry.metadata() else { continue };
            usage.files += 1;
            usage.bytes += meta.blocks() * 512;
            if meta.is_dir() && meta.dev() == dev {
                stack.push(entry.path());
            }
            if usage.files >= stop_at {
                return usage;
            }
        }
    }
    usage
}

/// What one run may add, and where it writes.
#[derive(Debug, Clone)]
pub struct Meter {
    /// Folders on disk: the workspace and `HOME`.
    pub trees: Vec<PathBuf>,
    /// The sandbox's `/tmp`, seen from outside (through its init's root).
    pub tmp: Option<PathBuf>,
    /// What they held when the run started.
    pub base: Usage,
    pub max_bytes: u64,
    pub max_files: u64,
}

/// The cap a run passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Disk,
    Files,
}

impl Meter {
    /// What the run's folders hold now.
    pub fn sample(&self) -> Usage {
        let stop = self.base.files.saturating_add(self.max_files).saturating_add(1);
        let mut now = Usage::default();
        for t in &self.trees {
            now = now + tree(t, stop.saturating_sub(now.files));
        }
        if let Some(tmp) = &self.tmp {
            now = now + fs_used(tmp).unwrap_or_default();
        }
        now
    }

    /// Which cap `now` passes, if any.
    pub fn over(&self, now: Usage) -> Option<Over> {
        let added = now.beyond(self.base);
        if added.bytes > self.max_bytes {
            Some(Over::Disk)
        } else if added.files > self.max_files {
            Some(Over::Files)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_counts_entries_and_space_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        let big = tempfile::tempdir().unwrap();
        std::fs::write(big.path().join("outside"), vec![7u8; 1 << 20]).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), vec![1u8; 64 << 10]).unwrap();
        std::os::unix::fs::symlink(big.path(), dir.path().join("link")).unwrap();
        let u = tree(dir.path(), u64::MAX);
        assert_eq!(u.files, 3);
        assert!(u.bytes >= 64 << 10 && u.bytes < 1 << 20, "{u:?}");
        assert_eq!(tree(dir.path(), 1).files, 1, "stops at the cap");
    }

    #[test]
    fn a_meter_counts_only_what_the_run_added() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkout"), vec![1u8; 8192]).unwrap();
        let base = tree(dir.path(), u64::MAX);
        let meter = Meter { trees: vec![dir.path().into()], tmp: None, base, max_bytes: 1 << 20, max_files: 3 };
        assert_eq!(meter.over(meter.sample()), None);
        for i in 0..4 {
            std::fs::write(dir.path().join(format!("n{i}")), "").unwrap();
        }
        assert_eq!(meter.over(meter.sample()), Some(Over::Files));
        std::fs::write(dir.path().join("blob"), vec![1u8; 2 << 20]).unwrap();
        assert_eq!(meter.over(meter.sample()), Some(Over::Disk));
    }
}
