//! The agent sandbox: every agent and `verify` command runs under
//! bubblewrap, seeing only its workspace (read-write, at `/workspace`), the
//! system folders (read-only), an allowlist of `/etc` (`etc`), its own
//! `HOME` and `/tmp`, and the paths its agent definition adds. Nothing of
//! baton is visible: not the storage folder, the config, the trigger folder
//! or key files, and not their paths either (`stage`).
//!
//! - **Who**: never host root. A root daemon runs agents as `[sandbox]
//!   user` (`user`), in a user namespace that uid owns.
//! - **Processes**: new PID, IPC, UTS, user, cgroup and network namespaces;
//!   no capabilities; baton's own init as pid 1 (`init`), out of the
//!   agent's reach; one seccomp filter (`seccomp`) on everything the agent
//!   runs. The init dies with the daemon, and the whole namespace with it;
//!   ending a run kills the init from outside, and the cgroup besides.
//! - **Kernel settings**: `/proc/sys` is read-only and the host-wide files
//!   of `/proc` that matter are masked, whoever the agent is.
//! - **Network**: an empty network namespace. Its only way out is the
//!   run's egress proxy (`egress`), reached through a Unix socket that the
//!   init bridges to `127.0.0.1:3128`, which `HTTP_PROXY`/`HTTPS_PROXY`
//!   point at.
//! - **Resources**: a cgroup per run caps memory and processes where baton
//!   may create one (`cgroup`); else the init counts and sets rlimits. Every
//!   tmpfs has a size (and, for a root daemon, an inode cap); the daemon
//!   meters what a run adds to disk (`usage`).
//!
//! bubblewrap rather than Landlock: Landlock cannot hide paths (only deny
//! access), has no PID isolation before ABI 6 and no network namespace, and
//! its TCP rules need ABI 4; bubblewrap gives the same view on every kernel
//! baton supports and is what Flatpak and Claude Code use.

pub mod cgroup;
pub mod egress;
pub mod etc;
pub mod init;
mod jail;
pub(crate) mod leftovers;
pub mod seccomp;
pub mod stage;
pub mod usage;
pub mod user;
mod view;
pub mod watch;

use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub(crate) use jail::Jail;
use view::View;

use cgroup::{Cgroup, Cgroups};
use egress::{Blocked, HostRule, Refusals};
pub use user::RunAs;

/// The port the egress proxy appears on inside every sandbox.
pub const PROXY_PORT: u16 = 3128;

/// Where things appear inside every sandbox: fixed, so nothing the agent
/// sees names a path of the host.
pub(crate) const WORKSPACE_PATH: &str = "/workspace";
pub(crate) const HOME_PATH: &str = "/home/agent";
pub(crate) const IO_PATH: &str = "/run/baton/io";
pub(crate) const OBJECTS_PATH: &str = "/run/baton/objects";
const INIT_PATH: &str = "/run/baton/init";
const SOCKET_PATH: &str = "/run/baton/proxy.sock";

/// Default caps of a run, when the agent definition gives none.
pub(crate) const DEFAULT_MAX_MEMORY: u64 = 4 << 30;
pub(crate) const DEFAULT_MAX_PROCESSES: u64 = 1024;
pub(crate) const DEFAULT_MAX_DISK: u64 = 20 << 30;
pub(crate) const DEFAULT_MAX_FILES: u64 = 1_000_000;

/// `/dev/shm`: shared memory segments, counted as memory; rarely large.
const SHM_INODES: u64 = 16_384;

/// System folders shown read-only (a link, as with merged `/usr`, is
/// recreated as the same link). `/etc` is an allowlist (`etc`).
const SYSTEM: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// Files of `/proc` that reach the whole host, masked with an empty file:
/// the kernel's trigger for SysRq, its memory and symbols, timers and
/// scheduler state (host-wide side channels), and the keys list.
const PROC_MASKED: &[&str] = &[
    "/proc/sysrq-trigger",
    "/proc/kcore",
    "/proc/kallsyms",
    "/proc/keys",
    "/proc/key-users",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
];

/// Secrets of the system itself, masked wherever a shown folder holds them.
const SYSTEM_SECRETS: &[&str] = &["/etc/ssl/private"];

/// The cap a run ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Memory,
    Processes,
    /// What it added to its workspace, `HOME` and `/tmp` passed `max_disk`.
    Disk,
    /// The entries it added there passed `max_files`.
    Files,
    /// The storage folder's free space fell below `storage.min_free`, and
    /// this run grew fastest.
    MinFree,
}

impl LimitHit {
    /// The setting that sets the cap.
    pub fn key(self) -> &'static str {
        match self {
            LimitHit::Memory => "max_memory",
            LimitHit::Processes => "max_processes",
            LimitHit::Disk => "max_disk",
            LimitHit::Files => "max_files",
            LimitHit::MinFree => "storage.min_free",
        }
    }
}

/// What one agent definition's sandbox allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Hosts reachable through the egress proxy; empty: no network.
    pub network: Vec<HostRule>,
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    pub max_memory: u64,
    pub max_processes: u64,
    /// What a run may add to its workspace, `HOME` and `/tmp`.
    pub max_disk: u64,
    /// Entries a run may add there.
    pub max_files: u64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            network: Vec::new(),
            read_only: Vec::new(),
            read_write: Vec::new(),
            max_memory: DEFAULT_MAX_MEMORY,
            max_processes: DEFAULT_MAX_PROCESSES,
            max_disk: DEFAULT_MAX_DISK,
            max_files: DEFAULT_MAX_FILES,
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
        "bubblewrap cannot create a sandbox on this machine as {who}: {why}. It needs unprivileged user namespaces \
         (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ an AppArmor profile for bwrap), \
         or a container that allows them"
    )]
    Broken { who: String, why: String },
    #[error("the agent sandbox needs an x86_64 or aarch64 machine (its seccomp filter is written for those)")]
    Architecture,
    #[error("cannot set up the sandbox: {0}")]
    Setup(#[from] std::io::Error),
}

/// Whether `path` is inside the system folders every sandbox shows.
pub(crate) fn is_system_path(path: &Path) -> bool {
    SYSTEM.iter().any(|root| path.starts_with(root))
}

/// bubblewrap on PATH (or `None`).
pub fn find_bwrap() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("bwrap")).find(|p| is_executable(p))
}

/// A file anyone may run (what `PATH` lookup accepts).
pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes sure bubblewrap is there and can build a sandbox here, as the uid
/// agents run as.
pub fn preflight(run_as: &RunAs) -> Result<PathBuf, SandboxError> {
    if !seccomp::supported() {
        return Err(SandboxError::Architecture);
    }
    let bwrap = find_bwrap().ok_or(SandboxError::Missing)?;
    let mut cmd = std::process::Command::new(&bwrap);
    cmd.args(["--unshare-all", "--die-with-parent", "--as-pid-1", "--ro-bind", "/", "/", "--proc", "/proc"])
        .args(["--", "/bin/sh", "-c", "exit 0"])
        .env_clear()
        .stdin(std::process::Stdio::null());
    if run_as.switched {
        let (uid, gid) = (run_as.uid, run_as.gid);
        // SAFETY: setgroups/setresgid/setresuid between fork and exec:
        // async-signal-safe, on integers.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(gid, gid, gid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let broken = |why: String| SandboxError::Broken { who: run_as.describe(), why };
    let out = cmd.output().map_err(|e| broken(e.to_string()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(broken(if why.is_empty() { format!("exit {}", out.status) } else { why }));
    }
    Ok(bwrap)
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

/// What a `Sandbox` is made with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// baton's paths (storage, config, triggers, key files), masked
    /// wherever a shown folder holds them.
    pub hidden: Vec<PathBuf>,
    pub caps: CapsBy,
    pub run_as: RunAs,
    /// Where running sandboxes are recorded (in the storage folder).
    pub records: PathBuf,
}

/// Builds sandboxes for runs.
#[derive(Debug)]
pub struct Sandbox {
    bwrap: PathBuf,
    /// The baton binary, shown as each sandbox's init.
    init: PathBuf,
    cgroups: Cgroups,
    hidden: Vec<PathBuf>,
    run_as: RunAs,
    records: leftovers::Records,
    /// A root daemon's stage and socket folders.
    runtime: Option<Runtime>,
}

#[derive(Debug)]
struct Runtime {
    stage: PathBuf,
    sockets: PathBuf,
}

/// `/run`, where it can be written, else the temporary folder.
fn runtime_base() -> PathBuf {
    let run = Path::new("/run");
    match std::fs::metadata(run) {
        Ok(m) if m.is_dir() && !m.permissions().readonly() => run.to_path_buf(),
        _ => std::env::temp_dir(),
    }
}

/// `dir`, made if missing, owned by baton and with `mode`.
fn made_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

impl Sandbox {
    /// Checks bubblewrap, kills what dead daemons left running, and finds
    /// where runs' cgroups go.
    pub fn new(settings: Settings) -> Result<Sandbox, SandboxError> {
        let bwrap = preflight(&settings.run_as)?;
        // The small init beside baton's binary, else baton itself.
        let exe = std::env::current_exe()?;
        let init = Some(exe.with_file_name("baton-sandbox-init")).filter(|p| is_executable(p)).unwrap_or(exe);
        // A root daemon stages each run on an empty host folder, and keeps
        // the proxies' sockets where their paths name nothing of baton's.
        let runtime = match settings.run_as.switched {
            true => {
                let base = runtime_base();
                let stage = base.join(stage::STAGE_NAME);
                let sockets = base.join("baton-proxy");
                made_dir(&stage, 0o755)?;
                made_dir(&sockets, 0o700)?;
                Some(Runtime { stage, sockets })
            }
            false => None,
        };
        let records = leftovers::Records::new(settings.records);
        records.kill_leftovers();
        let cgroups = match settings.caps {
            CapsBy::Auto => Cgroups::detect(),
            CapsBy::Rlimits => Cgroups::Unavailable,
        };
        cgroups.remove_leftovers();
        tracing::info!(
            bwrap = %bwrap.display(),
            limits = cgroups.describe(),
            user = %settings.run_as.describe(),
            "Agents run sandboxed."
        );
        let mut hidden: Vec<PathBuf> = settings.hidden.into_iter().filter(|p| p.exists()).collect();
        hidden.extend(SYSTEM_SECRETS.iter().map(PathBuf::from).filter(|p| p.exists()));
        hidden.sort();
        hidden.dedup();
        Ok(Sandbox { bwrap, init, cgroups, hidden, run_as: settings.run_as, records, runtime })
    }

    /// Whether runs get a cgroup (else the init's rlimits).
    pub fn limits(&self) -> &'static str {
        self.cgroups.describe()
    }

    /// Who agents run as.
    pub fn run_as(&self) -> &RunAs {
        &self.run_as
    }

    /// The uid and gid files handed to agents must belong to, when that is
    /// not the daemon's own.
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.run_as.switched.then_some((self.run_as.uid, self.run_as.gid))
    }

    /// Sets up one run: its cgroup, its egress proxy, its `HOME`, and the
    /// bubblewrap command line that runs `argv` inside.
    pub(crate) fn jail(&self, run: &Run<'_>, argv: &[String]) -> Result<Jail, SandboxError> {
        let home = home_dir(run.run_dir);
        remove_tree(run.run_dir)?;
        std::fs::create_dir_all(&home)?;
        let owner = self.owner();
        // The folders the agent writes are its own for the run.
        for dir in [&home, &run.io_dir.to_path_buf()] {
            hand_over(dir, owner)?;
        }
        let stop = CancellationToken::new();
        let refusals = Refusals::default();
        let socket = match &self.runtime {
            Some(r) => r.sockets.join(format!("{:016x}.sock", random_u64())),
            None => socket_path(run.run_dir),
        };
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
            hand_over(&socket, owner)?;
        }
        let cgroup = match self.cgroups.create(run.name, run.profile.max_memory, run.profile.max_processes) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "Could not make the run's cgroup; its caps are rlimits.");
                None
            }
        };
        let rlimits = cgroup.is_none();

        let mut v =
            View::new(self.runtime.as_ref().zip(owner).map(|(r, (uid, gid))| stage::Plan::new(&r.stage, uid, gid)));
        v.push(["--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1", "--cap-drop", "ALL"]);
        v.push(["--hostname", "baton-sandbox"]);
        let mut roots: Vec<PathBuf> = Vec::new();
        // The image's system folders: not host paths (nothing of the host's
        // to mask under them), but the agent's PATH may name them.
        let mut image_dirs: Vec<PathBuf> = Vec::new();
        // The system folders and `/etc` come from the image when there is
        // one (each shown at its own path inside), else from the host.
        let system_root = run.image.unwrap_or(Path::new("/"));
        for dir in SYSTEM {
            let path = Path::new(dir);
            let source = system_root.join(&dir[1..]);
            match std::fs::symlink_metadata(&source) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(&source) {
                        v.push([OsString::from("--symlink"), target.into_os_string(), path.into()]);
                        roots.push(path.to_path_buf());
                    }
                }
                Ok(m) if m.is_dir() && run.image.is_some() => {
                    v.read_only_dir(&source, path);
                    image_dirs.push(path.to_path_buf());
                }
                Ok(m) if m.is_dir() => {
                    v.system("--ro-bind", path);
                    roots.push(path.to_path_buf());
                }
                _ => {}
            }
        }
        let shown: Vec<PathBuf> = etc::ALLOWED
            .iter()
            .map(|(e, _)| system_root.join(&e[1..]))
            .filter(|p| match std::fs::symlink_metadata(p) {
                // An image's link would be followed on the host when it is
                // bound (`/etc/hosts -> /root/.ssh/id_rsa`): only its own
                // files and folders count.
                Ok(m) if run.image.is_some() => m.is_file() || m.is_dir(),
                Ok(_) => p.exists(),
                Err(_) => false,
            })
            .collect();
        if run.image.is_none() {
            roots.extend(shown.iter().cloned());
        }
        let texts = vec![
            ("passwd".to_string(), etc::passwd(self.run_as.uid, self.run_as.gid, HOME_PATH)),
            ("group".to_string(), etc::group(self.run_as.gid)),
        ];
        v.etc(shown, texts)?;
        v.push(["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys"]);
        for masked in PROC_MASKED {
            if Path::new(masked).exists() {
                v.push(["--ro-bind", "/dev/null", masked]);
            }
        }
        v.push(["--dev", "/dev"]);
        let tmp_size = run.profile.max_memory.min(run.profile.max_disk);
        v.tmpfs(Path::new("/dev/shm"), run.profile.max_memory / 2, SHM_INODES);
        v.push(["--remount-ro", "/dev"]);
        v.tmpfs(Path::new("/tmp"), tmp_size, run.profile.max_files);
        for p in &run.profile.read_only {
            v.path(p, false);
            roots.push(p.clone());
        }
        for p in &run.profile.read_write {
            v.path(p, true);
            roots.push(p.clone());
        }
        // The program and what its CLI is given (an MCP server's folder):
        // masked below like the definition's paths.
        for p in &run.expose {
            v.path(p, false);
            roots.push(p.clone());
        }
        // baton's own files and the system's secrets, wherever a bind above
        // would show them.
        for hidden in &self.hidden {
            if !roots.iter().any(|r| hidden.starts_with(r)) {
                continue;
            }
            if hidden.is_dir() {
                v.push([OsString::from("--size"), "4096".into(), "--tmpfs".into(), hidden.into()]);
            } else {
                v.push([OsString::from("--ro-bind"), "/dev/null".into(), hidden.into()]);
            }
        }
        v.upper(&home, Path::new(HOME_PATH))?;
        v.upper(run.io_dir, Path::new(IO_PATH))?;
        v.upper(run.workdir, Path::new(WORKSPACE_PATH))?;
        for (host, inside) in run.caches {
            v.bind_dir(host, inside);
        }
        if let Some(objects) = run.objects {
            v.read_only_dir(objects, Path::new(OBJECTS_PATH));
        }
        v.file(&self.init, Path::new(INIT_PATH), true);
        if networked {
            v.file(&socket, Path::new(SOCKET_PATH), false);
        }
        v.push(["--chdir", WORKSPACE_PATH, "--remount-ro", "/"]);
        let (info_read, info_write) = pipe()?;
        v.push([OsString::from("--info-fd"), info_write.as_raw_fd().to_string().into()]);
        v.keep.push(info_write);
        // The sandbox waits, set up but before its init runs, until baton
        // has recorded its pid and put it in its cgroup (so nothing it
        // starts is ever outside); the move overlaps bubblewrap's setup.
        let (block_read, block_write) = pipe()?;
        v.push([OsString::from("--block-fd"), block_read.as_raw_fd().to_string().into()]);
        v.keep.push(block_read);
        v.push(["--", INIT_PATH, "sandbox-init", "--port"]);
        v.push([PROXY_PORT.to_string()]);
        if networked {
            v.push(["--proxy", SOCKET_PATH]);
        }
        // In rlimit mode the init tells which cap a run hit through a pipe of
        // its own (an exit code is the agent's to fake).
        let mut report = None;
        if rlimits {
            v.push([OsString::from("--max-processes"), run.profile.max_processes.to_string().into()]);
            v.push([OsString::from("--max-data"), run.profile.max_memory.to_string().into()]);
            v.push(["--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]);
            let (read, write) = pipe()?;
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            v.push([OsString::from("--report-fd"), write.as_raw_fd().to_string().into()]);
            v.keep.push(write);
            report = Some(read);
        }
        v.push(["--"]);
        v.push(argv.iter().map(OsString::from));

        // The daemon's PATH, less the folders the sandbox does not show
        // (they would only tell the agent where things are on the host).
        let path = std::env::var_os("PATH").unwrap_or_default();
        let visible: Vec<PathBuf> = std::env::split_paths(&path)
            .filter(|d| roots.iter().chain(&image_dirs).any(|r| d.starts_with(r)))
            .collect();
        let path = match std::env::join_paths(&visible) {
            Ok(p) if !visible.is_empty() => p.to_string_lossy().into_owned(),
            _ => "/usr/local/bin:/usr/bin:/bin".to_string(),
        };
        let mut env = vec![
            ("PATH".to_string(), path),
            ("HOME".to_string(), HOME_PATH.to_string()),
            ("TMPDIR".to_string(), "/tmp".to_string()),
            ("USER".to_string(), "agent".to_string()),
            ("LOGNAME".to_string(), "agent".to_string()),
        ];
        if networked {
            let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
            for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
                env.push((name.to_string(), proxy.clone()));
            }
        }
        let meter = usage::Meter {
            // An environment's cache folders count too: what a setup fills,
            // and what a run adds to its copy.
            trees: [run.workdir.to_path_buf(), home.clone(), run.io_dir.to_path_buf()]
                .into_iter()
                .chain(run.caches.iter().map(|(host, _)| host.clone()))
                .collect(),
            init: None,
            base: usage::Usage::default(),
            max_bytes: run.profile.max_disk,
            max_files: run.profile.max_files,
            max_memory: rlimits.then_some(run.profile.max_memory),
        };
        Ok(Jail {
            program: self.bwrap.clone(),
            args: v.args,
            stage: v.stage.map(Arc::new),
            env,
            cgroup,
            refusals,
            stop,
            run_dir: run.run_dir.into(),
            socket: networked.then_some(socket),
            name: run.name.to_string(),
            records: self.records.clone(),
            info: Some(info_read),
            block: Some(block_write),
            keep: v.keep,
            report,
            init: None,
            meter,
        })
    }
}

/// The agent's `HOME`, on baton's side.
fn home_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("home")
}

/// The proxy socket: in the run's folder, or (Unix socket paths are short)
/// under the system's temporary folder when that path would be too long.
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
    crate::tree::remove(p)
}

/// Gives `path` and everything under it to `owner` (links themselves,
/// never their targets); nothing when `owner` is `None`.
pub(crate) fn hand_over(path: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    let Some((uid, gid)) = owner else { return Ok(()) };
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    if !meta.is_dir() {
        return Ok(());
    }
    crate::tree::walk(path, |e| {
        if e.stat.st_uid != uid || e.stat.st_gid != gid {
            // SAFETY: fchownat of a name in a folder the walk holds open,
            // not following a link.
            let r = unsafe { libc::fchownat(e.dir, e.name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(crate::tree::Next::Enter)
    })
}

/// A random number, for names no one can guess ahead.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_ne_bytes(b)
}

/// A pipe whose ends close on exec (the child clears its end's flag).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two ints; each is then owned exactly once.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd as _;
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// What a run's sandbox is made of.
pub struct Run<'a> {
    /// Unique among runs at one time (names the cgroup).
    pub name: &'a str,
    pub profile: &'a Profile,
    pub workdir: &'a Path,
    /// Prompt and result files (read-write).
    pub(crate) io_dir: &'a Path,
    /// baton's folder for this run: the agent's `HOME`, the proxy socket.
    pub(crate) run_dir: &'a Path,
    /// The object store the workspace's repository borrows from, shown
    /// read-only at `OBJECTS_PATH`.
    pub objects: Option<&'a Path>,
    /// Shown read-only at the same path: the program, MCP servers.
    pub(crate) expose: Vec<PathBuf>,
    /// A team run: baton's API, which the proxy forwards `/mcp` to.
    pub baton: Option<std::net::SocketAddr>,
    /// An environment's cache folders: (host folder, path inside), shown
    /// read-write over the workspace and `HOME`.
    pub caches: &'a [(PathBuf, PathBuf)],
    /// A read-only root in place of the host's system folders and `/etc`.
    pub image: Option<&'a Path>,
}

/// Parses a cap for an agent (`max_memory`, `max_disk`): as `parse_bytes`,
/// at least 16M.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)?;
    if bytes < 16 << 20 {
        return Err(format!("size `{s}` is too small: an agent needs at least 16M"));
    }
    Ok(bytes)
}

/// Parses a size: bytes, or a number with K, M, G or T (powers of 1024).
pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
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
    n.checked_shl(shift).filter(|b| b >> shift == n).ok_or(format!("size `{s}` is too large"))
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

    /// A folder an MCP server is given (or the program's) that holds
    /// baton's own files shows them masked, as a definition's paths do.
    #[test]
    fn what_an_exposed_folder_holds_of_batons_is_masked() {
        let outer = tempfile::tempdir().unwrap();
        let conf = outer.path().join("conf");
        std::fs::create_dir_all(conf.join("triggers")).unwrap();
        std::fs::write(conf.join("baton.toml"), "webhook_secret = \"x\"").unwrap();
        let state = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(Settings {
            hidden: vec![conf.clone()],
            caps: CapsBy::Rlimits,
            run_as: RunAs::resolve(None, RunAs::daemon_euid()).unwrap(),
            records: state.path().join("records"),
        })
        .unwrap();
        let (work, io) = (state.path().join("work"), state.path().join("io"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&io).unwrap();
        let run = Run {
            name: "t",
            profile: &Profile::default(),
            workdir: &work,
            io_dir: &io,
            run_dir: &state.path().join("run"),
            objects: None,
            expose: vec![outer.path().to_path_buf()],
            baton: None,
            caches: &[],
            image: None,
        };
        let jail = sandbox.jail(&run, &["true".to_string()]).unwrap();
        let args: Vec<String> = jail.args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let at = |what: &[&str]| args.windows(what.len()).position(|w| w == what);
        let shown = args.iter().position(|a| *a == outer.path().display().to_string()).expect("the folder is shown");
        let masked = at(&["--tmpfs", &conf.display().to_string()]).expect("baton's folder in it is masked");
        assert!(masked > shown, "the mask comes after the folder's bind: {args:?}");
        jail.close();
    }

    #[test]
    fn long_run_folders_get_a_short_socket() {
        assert!(socket_path(Path::new("/var/lib/baton/jobs/x")).starts_with("/var/lib/baton"));
        let long = PathBuf::from(format!("/{}", "d".repeat(120)));
        assert!(socket_path(&long).as_os_str().len() < 100);
    }
}
