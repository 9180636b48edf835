//! The agent sandbox: every agent and `verify` command runs under
//! bubblewrap, seeing only its workspace (read-write), the system folders
//! (read-only, secrets masked), its own `HOME` and `/tmp`, and the paths its
//! agent definition adds. Nothing of baton is visible: not the storage
//! folder, the config, the trigger folder or key files.
//!
//! - **Processes**: new PID, IPC, UTS, user and cgroup namespaces; no
//!   capabilities; it dies with its parent, so ending the run's process
//!   group (timeout, cancel) ends everything in it.
//! - **Network**: an empty network namespace. Its only way out is the
//!   run's egress proxy (`egress`), reached through a Unix socket that the
//!   sandbox's init (`init`) bridges to `127.0.0.1:3128`, which
//!   `HTTP_PROXY`/`HTTPS_PROXY` point at.
//! - **Resources**: a cgroup per run caps memory and processes where baton
//!   may create one (`cgroup`); else the init sets rlimits.
//!
//! bubblewrap rather than Landlock: Landlock cannot hide paths (only deny
//! access), has no PID isolation before ABI 6 and no network namespace, and
//! its TCP rules need ABI 4; bubblewrap gives the same view on every kernel
//! baton supports and is what Flatpak and Claude Code use.

pub mod cgroup;
pub mod egress;
pub mod init;
pub mod watch;

use std::ffi::{CString, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use cgroup::{Cgroup, Cgroups, LimitHit};
use egress::{Blocked, HostRule, Refusals};

/// The port the egress proxy appears on inside every sandbox.
pub const PROXY_PORT: u16 = 3128;

/// Where things baton puts into a sandbox appear inside it.
const INIT_PATH: &str = "/run/baton/init";
const SOCKET_PATH: &str = "/run/baton/proxy.sock";
pub const HOME_PATH: &str = "/home/agent";

/// Default caps of a run, when the agent definition gives none.
pub const DEFAULT_MAX_MEMORY: u64 = 4 << 30;
pub const DEFAULT_MAX_PROCESSES: u64 = 1024;

/// System folders shown read-only (a link, as with merged `/usr`, is
/// recreated as the same link).
const SYSTEM: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"];

/// Secrets of the system itself, masked inside `/etc`.
const SYSTEM_SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/sudoers",
    "/etc/sudoers.d",
];

/// What one agent definition's sandbox allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Hosts reachable through the egress proxy; empty: no network.
    pub network: Vec<HostRule>,
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    pub max_memory: u64,
    pub max_processes: u64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            network: Vec::new(),
            read_only: Vec::new(),
            read_write: Vec::new(),
            max_memory: DEFAULT_MAX_MEMORY,
            max_processes: DEFAULT_MAX_PROCESSES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "the agent sandbox needs bubblewrap, which is not installed: install the package `bubblewrap` \
         (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap), or set \
         `[sandbox] enabled = false` to run agents unconfined (unsafe)"
    )]
    Missing,
    #[error(
        "bubblewrap cannot create a sandbox on this machine: {0}. It needs unprivileged user namespaces \
         (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ an AppArmor profile for bwrap), \
         or a container that allows them"
    )]
    Broken(String),
    #[error("cannot set up the sandbox: {0}")]
    Setup(#[from] std::io::Error),
}

/// Whether `path` is inside the system folders every sandbox shows.
pub fn is_system_path(path: &Path) -> bool {
    SYSTEM.iter().any(|root| path.starts_with(root))
}

/// bubblewrap on PATH (or `None`).
pub fn find_bwrap() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("bwrap")).find(|p| is_executable(p))
}

/// A file anyone may run (what `PATH` lookup accepts).
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes sure bubblewrap is there and can build a sandbox here.
pub fn preflight() -> Result<PathBuf, SandboxError> {
    let bwrap = find_bwrap().ok_or(SandboxError::Missing)?;
    let out = std::process::Command::new(&bwrap)
        .args(["--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/", "/", "--proc", "/proc"])
        .args(["--", "/bin/sh", "-c", "exit 0"])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| SandboxError::Broken(e.to_string()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(SandboxError::Broken(if why.is_empty() { format!("exit {}", out.status) } else { why }));
    }
    Ok(bwrap)
}

/// Builds sandboxes for runs.
#[derive(Debug)]
pub struct Sandbox {
    bwrap: PathBuf,
    /// The baton binary, mounted as each sandbox's init.
    init: PathBuf,
    cgroups: Cgroups,
    /// baton's own paths, masked wherever a bind would show them.
    hidden: Vec<PathBuf>,
}

/// How a run's memory and process caps are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapsBy {
    /// A cgroup where baton may make one, else rlimits.
    #[default]
    Auto,
    /// rlimits and the init's own count, even where cgroups would do.
    Rlimits,
}

impl Sandbox {
    /// Checks bubblewrap and finds where runs' cgroups go. `hidden` are
    /// baton's paths (storage, config, triggers, key files).
    pub fn new(hidden: Vec<PathBuf>, caps: CapsBy) -> Result<Sandbox, SandboxError> {
        let bwrap = preflight()?;
        let init = std::env::current_exe()?;
        let cgroups = match caps {
            CapsBy::Auto => Cgroups::detect(),
            CapsBy::Rlimits => Cgroups::Unavailable,
        };
        cgroups.remove_leftovers();
        tracing::info!(bwrap = %bwrap.display(), limits = cgroups.describe(), "Agents run sandboxed.");
        let mut hidden: Vec<PathBuf> = hidden.into_iter().filter(|p| p.exists()).collect();
        hidden.extend(SYSTEM_SECRETS.iter().map(PathBuf::from).filter(|p| p.exists()));
        hidden.sort();
        hidden.dedup();
        Ok(Sandbox { bwrap, init, cgroups, hidden })
    }

    /// Whether runs get a cgroup (else the init's rlimits).
    pub fn limits(&self) -> &'static str {
        self.cgroups.describe()
    }

    /// Sets up one run: its cgroup, its egress proxy, its `HOME`, and the
    /// bubblewrap command line that runs `argv` inside.
    pub fn jail(&self, run: &Run<'_>, argv: &[String]) -> Result<Jail, SandboxError> {
        let home = home_dir(run.run_dir);
        remove_tree(run.run_dir)?;
        std::fs::create_dir_all(&home)?;
        let stop = CancellationToken::new();
        let refusals = Refusals::default();
        let socket = socket_path(run.run_dir);
        // A team run reaches baton's `/mcp` through the proxy too.
        let networked = !run.profile.network.is_empty() || run.baton.is_some();
        if networked {
            if let Some(dir) = socket.parent() {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
            let _ = std::fs::remove_file(&socket);
            let rules = Arc::new(run.profile.network.clone());
            egress::serve(&socket, rules, run.baton, refusals.clone(), stop.clone())?;
        }
        let cgroup = match self.cgroups.create(run.name, run.profile.max_memory, run.profile.max_processes) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Could not make the run's cgroup; its caps are rlimits.");
                None
            }
        };

        let mut a = Args::default();
        a.push(["--die-with-parent", "--new-session", "--unshare-all", "--cap-drop", "ALL"]);
        a.push(["--hostname", "baton-sandbox"]);
        let mut roots: Vec<PathBuf> = Vec::new();
        for dir in SYSTEM {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(path) {
                        a.push([OsString::from("--symlink"), target.into_os_string(), path.into()]);
                    }
                }
                Ok(m) if m.is_dir() => {
                    a.bind("--ro-bind", path, path);
                    roots.push(path.to_path_buf());
                }
                _ => {}
            }
        }
        a.push(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run", "--tmpfs", "/home"]);
        for p in &run.profile.read_only {
            a.bind("--ro-bind-try", p, p);
            roots.push(p.clone());
        }
        for p in &run.profile.read_write {
            a.bind("--bind-try", p, p);
            roots.push(p.clone());
        }
        // baton's own files and the system's secrets, wherever a bind above
        // would show them; what the run needs of the storage folder is bound
        // again on top, below.
        for hidden in &self.hidden {
            if !roots.iter().any(|r| hidden.starts_with(r)) {
                continue;
            }
            if hidden.is_dir() {
                a.bind("--tmpfs", hidden, Path::new(""));
            } else {
                a.bind("--ro-bind", Path::new("/dev/null"), hidden);
            }
        }
        for p in &run.expose {
            a.bind("--ro-bind", p, p);
        }
        a.bind("--bind", &home, Path::new(HOME_PATH));
        a.bind("--bind", run.io_dir, run.io_dir);
        a.bind("--bind", run.workdir, run.workdir);
        a.bind("--chdir", run.workdir, Path::new(""));
        // The init is there for the proxy bridge and the rlimits; a run
        // that needs neither starts its agent directly (a few ms less).
        if networked || cgroup.is_none() {
            a.bind("--ro-bind", &self.init, Path::new(INIT_PATH));
            if networked {
                a.bind("--ro-bind", &socket, Path::new(SOCKET_PATH));
            }
            a.push(["--", INIT_PATH, "sandbox-init", "--port"]);
            a.push([PROXY_PORT.to_string()]);
            if networked {
                a.push(["--proxy", SOCKET_PATH]);
            }
            if cgroup.is_none() {
                a.push([OsString::from("--max-processes"), run.profile.max_processes.to_string().into()]);
                a.push([OsString::from("--max-data"), run.profile.max_memory.to_string().into()]);
            }
        }
        a.push(["--"]);
        a.push(argv.iter().map(OsString::from));

        let mut env = vec![("HOME".to_string(), HOME_PATH.to_string()), ("TMPDIR".to_string(), "/tmp".to_string())];
        if networked {
            let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
            for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
                env.push((name.to_string(), proxy.clone()));
            }
        }
        let rlimits = cgroup.is_none();
        Ok(Jail {
            program: self.bwrap.clone(),
            args: a.0,
            env,
            cgroup,
            rlimits,
            refusals,
            stop,
            run_dir: run.run_dir.into(),
        })
    }
}

/// The proxy socket: in the run's folder, or (Unix socket paths are short)
/// under the system's temporary folder when that path would be too long.
fn home_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("home")
}

fn socket_path(run_dir: &Path) -> PathBuf {
    let path = run_dir.join("proxy.sock");
    if path.as_os_str().len() < 100 {
        return path;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&path, &mut h);
    let n = std::hash::Hasher::finish(&h);
    std::env::temp_dir().join(format!("baton-{}", std::process::id())).join(format!("{n:016x}.sock"))
}

fn remove_tree(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push<I: IntoIterator<Item = S>, S: Into<OsString>>(&mut self, items: I) {
        self.0.extend(items.into_iter().map(Into::into));
    }

    /// `flag src [dest]` (no dest when it is empty).
    fn bind(&mut self, flag: &str, src: &Path, dest: &Path) {
        self.0.push(flag.into());
        self.0.push(src.into());
        if !dest.as_os_str().is_empty() {
            self.0.push(dest.into());
        }
    }
}

/// What a run's sandbox is made of.
pub struct Run<'a> {
    /// Unique among runs at one time (names the cgroup).
    pub name: &'a str,
    pub profile: &'a Profile,
    pub workdir: &'a Path,
    /// Prompt and result files (read-write).
    pub io_dir: &'a Path,
    /// baton's folder for this run: the agent's `HOME`, the proxy socket.
    pub run_dir: &'a Path,
    /// Shown read-only at the same path: the program, the mirror's objects.
    pub expose: Vec<PathBuf>,
    /// A team run: baton's API, which the proxy forwards `/mcp` to.
    pub baton: Option<std::net::SocketAddr>,
}

/// One run's sandbox; `close` it when the run has ended.
pub struct Jail {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Variables set for the agent on top of its own.
    pub env: Vec<(String, String)>,
    cgroup: Option<Cgroup>,
    /// Caps enforced by the init (its exit code says which was hit).
    rlimits: bool,
    refusals: Refusals,
    stop: CancellationToken,
    run_dir: PathBuf,
}

impl Jail {
    /// baton's side of the agent's `HOME`.
    pub fn home(&self) -> PathBuf {
        home_dir(&self.run_dir)
    }

    /// The cap a run in rlimit mode hit, from its exit code.
    pub fn limit_from_exit(&self, code: Option<i32>) -> Option<LimitHit> {
        match code {
            Some(init::EXIT_MEMORY) if self.rlimits => Some(LimitHit::Memory),
            Some(init::EXIT_PROCESSES) if self.rlimits => Some(LimitHit::Processes),
            _ => None,
        }
    }

    /// The `cgroup.procs` files the child writes itself into before exec.
    pub fn cgroup_files(&self) -> Vec<CString> {
        self.cgroup.as_ref().map(Cgroup::procs_files).unwrap_or_default()
    }

    /// Ends everything left in the run, stops its proxy and removes its
    /// folder; what it ran into and the destinations refused.
    pub fn close(self) -> (Option<LimitHit>, Vec<Blocked>) {
        self.stop.cancel();
        let hit = self.cgroup.as_ref().and_then(Cgroup::limit_hit);
        let socket = socket_path(&self.run_dir);
        let _ = std::fs::remove_file(&socket);
        let _ = remove_tree(&self.run_dir);
        if let Some(c) = self.cgroup {
            // The kernel may hold an emptied group busy for a moment after
            // its last process is reaped; the job need not wait for that.
            let _ = std::thread::Builder::new().name("baton-cgroup".into()).spawn(move || c.remove());
        }
        (hit, self.refusals.list())
    }
}

/// Joins the cgroups named by `files`; runs in the child between fork and
/// exec, so only async-signal-safe calls.
pub fn join_cgroups(files: &[CString]) -> std::io::Result<()> {
    for f in files {
        // SAFETY: open/write/close on a NUL-terminated path we own; all
        // async-signal-safe.
        unsafe {
            let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Parses `max_memory`: bytes, or a number with K, M, G or T (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, ""),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size `{s}`: expected e.g. 4G, 512M or a number of bytes"))?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("invalid size `{s}`: unknown unit `{unit}` (use K, M, G or T)")),
    };
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or(format!("size `{s}` is too large"))?;
    if bytes < 16 << 20 {
        return Err(format!("size `{s}` is too small: an agent needs at least 16M"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_people_write_them() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("100000000"), Ok(100_000_000));
        assert!(parse_size("4X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("1K").unwrap_err().contains("too small"));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn long_run_folders_get_a_short_socket() {
        assert!(socket_path(Path::new("/var/lib/baton/jobs/x")).starts_with("/var/lib/baton"));
        let long = PathBuf::from(format!("/{}", "d".repeat(120)));
        assert!(socket_path(&long).as_os_str().len() < 100);
    }
}
