//! Control groups for sandboxed runs: a memory and a process cap the kernel
//! enforces on the whole tree, and counters that say afterwards whether a
//! run hit them (so the attempt fails with that reason, not a bare exit
//! status).
//!
//! cgroup v2 is used when baton may create groups below its own (a
//! delegated subtree, e.g. systemd's `Delegate=yes`): baton moves itself into
//! a `daemon` leaf so its group can hand the memory and pids controllers to
//! per-run children. cgroup v1 is used when its memory and pids hierarchies
//! are writable (and its freezer, to stop a tree before killing it).
//! Otherwise there is no group, and the sandbox's init falls back to rlimits
//! (see `init`).
//!
//! Ending a run kills its whole group: `cgroup.kill` on v2; on v1 the group
//! is frozen, every pid in it killed, and thawed, so nothing forks away
//! between the reading of the list and the kill. A starting daemon does the
//! same to the groups of dead daemons before it removes them.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use super::LimitHit;

/// Which hierarchy runs get their groups in.
#[derive(Debug, Clone)]
pub(crate) enum Cgroups {
    V2 { parent: PathBuf },
    V1 { memory: Option<PathBuf>, pids: Option<PathBuf>, freezer: Option<PathBuf> },
    Unavailable,
}

impl Cgroups {
    /// Finds where baton may make groups; `Unavailable` when nowhere.
    pub(crate) fn detect() -> Cgroups {
        let Ok(own) = std::fs::read_to_string("/proc/self/cgroup") else { return Cgroups::Unavailable };
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else { return Cgroups::Unavailable };
            let own_dir = root.join(path.trim_start_matches('/'));
            return match delegate_v2(&own_dir) {
                Ok(()) => Cgroups::V2 { parent: own_dir },
                Err(e) => {
                    tracing::debug!(error = %e, "cgroup v2 is not delegated to baton.");
                    Cgroups::Unavailable
                }
            };
        }
        let v1 = |controller: &str| {
            let path = own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                names.split(',').any(|n| n == controller).then(|| path.to_string())
            })?;
            let dir = root.join(controller).join(path.trim_start_matches('/'));
            // Can we make a group here?
            let probe = dir.join(format!("baton-probe-{}", std::process::id()));
            std::fs::create_dir(&probe).ok()?;
            let _ = std::fs::remove_dir(&probe);
            Some(dir)
        };
        match (v1("memory"), v1("pids")) {
            (None, None) => Cgroups::Unavailable,
            (memory, pids) => Cgroups::V1 { memory, pids, freezer: v1("freezer") },
        }
    }

    /// Kills what is left in the run groups of daemons no longer running,
    /// then removes the groups.
    pub(crate) fn remove_leftovers(&self) {
        let parents: Vec<&PathBuf> = match self {
            Cgroups::V2 { parent } => vec![parent],
            Cgroups::V1 { memory, pids, freezer } => memory.iter().chain(pids.iter()).chain(freezer.iter()).collect(),
            Cgroups::Unavailable => Vec::new(),
        };
        let mut groups: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
        for parent in parents {
            for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix("baton-run-") else { continue };
                // A live daemon's group may be empty for a moment (made,
                // its child not yet in): only a dead daemon's go.
                let owner = rest.split('-').next().unwrap_or_default();
                if owner.parse::<u32>().is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
                    continue;
                }
                groups.entry(name).or_default().push(entry.path());
            }
        }
        for (name, dirs) in groups {
            let group = Cgroup { dirs, v2: matches!(self, Cgroups::V2 { .. }) };
            if group.pids().next().is_some() {
                tracing::warn!(group = %name, "Killing what a previous daemon's run left in its cgroup.");
            }
            group.remove();
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Cgroups::V2 { .. } => "cgroup v2",
            Cgroups::V1 { .. } => "cgroup v1",
            Cgroups::Unavailable => "rlimits (no writable cgroup)",
        }
    }

    /// A group for one run, with its caps set; `None` without cgroups.
    pub fn create(&self, name: &str, max_memory: u64, max_processes: u64) -> std::io::Result<Option<Cgroup>> {
        // The daemon's pid keeps two daemons on one machine (whose job ids
        // may agree) out of each other's groups: removing a group kills
        // everything in it.
        let name = format!("baton-run-{}-{name}", std::process::id());
        let group = match self {
            Cgroups::Unavailable => return Ok(None),
            Cgroups::V2 { parent } => {
                let dir = parent.join(&name);
                make_dir(&dir)?;
                let group = Cgroup { dirs: vec![dir.clone()], v2: true };
                write(&dir.join("memory.max"), &max_memory.to_string())?;
                // Swap would let a run outgrow its cap unseen.
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(&dir.join("pids.max"), &max_processes.to_string())?;
                group
            }
            Cgroups::V1 { memory, pids, freezer } => {
                let mut dirs = Vec::new();
                if let Some(m) = memory {
                    let dir = m.join(&name);
                    make_dir(&dir)?;
                    write(&dir.join("memory.limit_in_bytes"), &max_memory.to_string())?;
                    let _ = write(&dir.join("memory.memsw.limit_in_bytes"), &max_memory.to_string());
                    dirs.push(dir);
                }
                if let Some(p) = pids {
                    let dir = p.join(&name);
                    make_dir(&dir)?;
                    write(&dir.join("pids.max"), &max_processes.to_string())?;
                    dirs.push(dir);
                }
                if let Some(f) = freezer {
                    let dir = f.join(&name);
                    make_dir(&dir)?;
                    dirs.push(dir);
                }
                Cgroup { dirs, v2: false }
            }
        };
        Ok(Some(group))
    }
}

/// Enables memory and pids for children of `own`, moving baton itself into
/// a `daemon` leaf first (a v2 group with processes cannot hand out
/// controllers).
fn delegate_v2(own: &Path) -> std::io::Result<()> {
    let wanted = "+memory +pids";
    let control = own.join("cgroup.subtree_control");
    if write(&control, wanted).is_ok() {
        return Ok(());
    }
    let leaf = own.join("baton-daemon");
    make_dir(&leaf)?;
    write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
    write(&control, wanted)
}

fn make_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
}

/// One run's group (one directory per v1 hierarchy).
#[derive(Debug)]
pub(crate) struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl Cgroup {
    /// `cgroup.procs` of each directory, for the child to join between fork
    /// and exec (so nothing it starts is ever outside the group).
    pub(crate) fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes()).ok())
            .collect()
    }

    /// Which cap the run ran into, if any.
    pub(crate) fn limit_hit(&self) -> Option<LimitHit> {
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        let field = |text: &str, key: &str| {
            text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<u64>().ok())).unwrap_or(0)
        };
        for dir in &self.dirs {
            let memory = if self.v2 { read(dir, "memory.events") } else { read(dir, "memory.oom_control") };
            if field(&memory, "oom_kill ") > 0 || field(&memory, "oom ") > 0 || field(&memory, "under_oom ") > 0 {
                return Some(LimitHit::Memory);
            }
            if field(&read(dir, "pids.events"), "max ") > 0 {
                return Some(LimitHit::Processes);
            }
        }
        None
    }

    /// The pids in the group (any of its hierarchies).
    fn pids(&self) -> impl Iterator<Item = i32> + '_ {
        self.dirs.iter().flat_map(|dir| {
            std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|p| p.trim().parse::<i32>().ok())
                .collect::<Vec<_>>()
        })
    }

    /// The v1 freezer folder of the group, if it has one.
    fn freezer(&self) -> Option<&PathBuf> {
        self.dirs.iter().find(|d| d.join("freezer.state").exists())
    }

    /// Kills every process still in the group: `cgroup.kill` on v2; on v1
    /// frozen first, so no process forks a child the kill would miss.
    pub(crate) fn kill_all(&self) {
        if self.v2 && write(&self.dirs[0].join("cgroup.kill"), "1").is_ok() {
            return;
        }
        let freezer = self.freezer();
        if let Some(f) = freezer {
            if write(&f.join("freezer.state"), "FROZEN").is_ok() {
                for _ in 0..100 {
                    if std::fs::read_to_string(f.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN") {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        }
        for _ in 0..50 {
            let mut any = false;
            for pid in self.pids() {
                any = true;
                // SAFETY: kill(2) on a pid read from the group; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if let Some(f) = freezer {
                // A frozen process dies of SIGKILL only once thawed.
                let _ = write(&f.join("freezer.state"), "THAWED");
            }
            if !any {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Kills what is left and removes the group.
    pub fn remove(self) {
        self.kill_all();
        for dir in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // Busy until the last killed process is reaped.
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        }
    }
}
