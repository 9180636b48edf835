//! How much disk a run takes: the bytes and entries under its workspace,
//! `HOME` and io folder (a walk that never follows a link or leaves the
//! file system), what its `/tmp` tmpfs holds (one `statvfs`, read through
//! the sandbox init's root), and the files its processes hold open that no
//! folder lists any more (unlinked, `O_TMPFILE`). A run's `max_disk` and
//! `max_files` bound what it adds; the daemon samples while it runs, and
//! once more at its end. In rlimit mode it also adds the memfds no count of
//! resident pages sees.

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
    pub(crate) fn beyond(self, base: Usage) -> Usage {
        Usage { bytes: self.bytes.saturating_sub(base.bytes), files: self.files.saturating_sub(base.files) }
    }
}

/// The used space and inodes of the file system at `path`.
pub(crate) fn fs_used(path: &Path) -> std::io::Result<Usage> {
    let s = statvfs(path)?;
    Ok(Usage { bytes: (s.f_blocks.saturating_sub(s.f_bfree)) * s.f_frsize, files: s.f_files.saturating_sub(s.f_ffree) })
}

/// The space left to unprivileged writers on the file system at `path`.
pub(crate) fn fs_free(path: &Path) -> std::io::Result<u64> {
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
/// systems mounted inside are not entered; a tree of any depth is walked
/// (`tree`).
pub fn tree(root: &Path, stop_at: u64) -> Usage {
    use std::os::unix::fs::MetadataExt as _;
    let mut usage = Usage::default();
    let Ok(dev) = std::fs::symlink_metadata(root).map(|m| m.dev()) else { return usage };
    let _ = crate::tree::walk(root, |e| {
        usage.files += 1;
        usage.bytes += e.stat.st_blocks as u64 * 512;
        if usage.files >= stop_at {
            return Ok(crate::tree::Next::Stop);
        }
        Ok(if e.stat.st_dev == dev { crate::tree::Next::Enter } else { crate::tree::Next::Skip })
    });
    usage
}

/// What one run may add, and where it writes.
#[derive(Debug, Clone)]
pub(crate) struct Meter {
    /// Folders on disk: the workspace, `HOME`, the io folder and the
    /// environment's cache folders.
    pub(crate) trees: Vec<PathBuf>,
    /// pid 1 of the run's sandbox, as the host sees it: its namespace's
    /// processes hold files no walk finds (unlinked, `O_TMPFILE`, memfds),
    /// and its root shows the sandbox's `/tmp`.
    pub init: Option<i32>,
    /// What the folders held when the run started.
    pub base: Usage,
    pub(crate) max_bytes: u64,
    pub max_files: u64,
    /// The memory cap, where no cgroup keeps it (rlimit mode): the init
    /// counts resident pages and tmpfs, this adds what it cannot see.
    pub max_memory: Option<u64>,
}

/// A cap a run passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Disk,
    Files,
    Memory,
}

/// One reading of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sample {
    /// Its folders, its `/tmp`, and files its processes hold but no folder
    /// lists.
    pub disk: Usage,
    /// Resident pages, tmpfs, and memfds (rlimit mode only; else 0).
    pub memory: u64,
}

impl Meter {
    /// What the run's folders and processes hold now.
    pub(crate) fn sample(&self) -> Sample {
        let stop = self.base.files.saturating_add(self.max_files).saturating_add(1);
        let mut disk = Usage::default();
        for t in &self.trees {
            disk = disk + tree(t, stop.saturating_sub(disk.files));
        }
        let mut memory = 0;
        if let Some(init) = self.init {
            let root = PathBuf::from(format!("/proc/{init}/root"));
            let tmp = fs_used(&root.join("tmp")).unwrap_or_default();
            disk = disk + tmp;
            let held = held(init, &[root.join("tmp"), root.join("dev/shm")]);
            disk.bytes += held.unlinked;
            if self.max_memory.is_some() {
                let shm = fs_used(&root.join("dev/shm")).unwrap_or_default();
                memory = held.resident + held.memfd + tmp.bytes + shm.bytes;
            }
        }
        Sample { disk, memory }
    }

    /// Which cap `now` passes, if any.
    pub fn over(&self, now: Sample) -> Option<Over> {
        let added = now.disk.beyond(self.base);
        if added.bytes > self.max_bytes {
            Some(Over::Disk)
        } else if added.files > self.max_files {
            Some(Over::Files)
        } else if self.max_memory.is_some_and(|m| now.memory > m) {
            Some(Over::Memory)
        } else {
            None
        }
    }
}

/// What a sandbox's processes hold beyond their folders.
#[derive(Debug, Default)]
struct Held {
    /// Files with no name left (unlinked, `O_TMPFILE`) off the tmpfs mounts.
    unlinked: u64,
    memfd: u64,
    resident: u64,
}

/// Reads every process in the pid namespace of `init`: the files its
/// descriptors and mappings hold that no folder lists (each counted once),
/// and its resident memory. `counted`: file systems already measured whole.
fn held(init: i32, counted: &[PathBuf]) -> Held {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = Held::default();
    let Ok(ns) = std::fs::read_link(format!("/proc/{init}/ns/pid")) else { return out };
    let skip: Vec<u64> = counted.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.dev()).collect();
    // SAFETY: sysconf with a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let mut seen = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&ns) {
            continue;
        }
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
        out.resident += statm.split_whitespace().nth(1).and_then(|r| r.parse::<u64>().ok()).unwrap_or(0) * page;
        for kind in ["fd", "map_files"] {
            for held in std::fs::read_dir(format!("/proc/{pid}/{kind}")).into_iter().flatten().flatten() {
                // The magic link leads to the file itself, wherever it is.
                let Ok(meta) = std::fs::metadata(held.path()) else { continue };
                if !meta.is_file() || meta.nlink() != 0 || skip.contains(&meta.dev()) {
                    continue;
                }
                if !seen.insert((meta.dev(), meta.ino())) {
                    continue;
                }
                let bytes = meta.blocks() * 512;
                let memfd = std::fs::read_link(held.path()).is_ok_and(|t| t.starts_with("/memfd:"));
                if memfd {
                    out.memfd += bytes;
                } else {
                    out.unlinked += bytes;
                }
            }
        }
    }
    out
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
    fn files_a_process_holds_without_a_name_are_counted() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let mut f = std::fs::File::create(dir.path().join("gone")).unwrap();
        f.write_all(&vec![1u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        std::fs::remove_file(dir.path().join("gone")).unwrap();
        let held = held(std::process::id() as i32, &[]);
        assert!(held.unlinked >= 1 << 20, "{held:?}");
        drop(f);
    }

    #[test]
    fn a_meter_counts_only_what_the_run_added() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("checkout"), vec![1u8; 8192]).unwrap();
        let base = tree(dir.path(), u64::MAX);
        let meter = Meter {
            trees: vec![dir.path().into()],
            init: None,
            base,
            max_bytes: 1 << 20,
            max_files: 3,
            max_memory: None,
        };
        assert_eq!(meter.over(meter.sample()), None);
        for i in 0..4 {
            std::fs::write(dir.path().join(format!("n{i}")), "").unwrap();
        }
        assert_eq!(meter.over(meter.sample()), Some(Over::Files));
        std::fs::write(dir.path().join("blob"), vec![1u8; 2 << 20]).unwrap();
        assert_eq!(meter.over(meter.sample()), Some(Over::Disk));
    }
}
