//! The sandbox's init (`baton-sandbox-init`, a small binary of its own so it
//! starts in a millisecond, or `baton sandbox-init`): pid 1 of the run's pid
//! namespace. It prepares the agent's process, runs it, supervises it, and
//! exits as it did; when it exits the kernel kills everything left in the
//! namespace, so nothing the agent started outlives its run.
//!
//! Being pid 1 puts it out of the agent's reach: the kernel delivers no
//! signal from inside a pid namespace to its init unless the init handles
//! it (this one handles none, so `kill -STOP 1` does nothing), it is not
//! dumpable, and the agent's seccomp filter refuses `ptrace`.
//!
//! What it does, in order:
//! - joins a fresh anonymous session keyring, so the daemon's keys are out
//!   of view and whatever a job might add dies with it;
//! - in rlimit mode (no cgroup), sets the rlimits and counts the tree's
//!   threads and memory, tmpfs pages included, killing it past a cap;
//! - bridges `127.0.0.1:PORT` in the empty network namespace to the run's
//!   egress proxy socket;
//! - starts the agent with the seccomp filter (`seccomp`) installed between
//!   fork and exec, takes the filter's listener, and answers it (`watch`);
//! - reaps every process that ends (orphans are reparented to it) until the
//!   agent itself has.
//!
//! It stays small: a handful of threads (they count against the process
//! cap), and no logging but one line per refused kind of call on stderr,
//! which is the agent's (the job's log).

use std::ffi::OsString;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// What the daemon tells the init.
#[derive(Debug, Clone)]
pub struct InitArgs {
    /// The proxy's Unix socket, as mounted in the sandbox.
    pub proxy: Option<PathBuf>,
    /// Where the bridge listens on the sandbox's loopback.
    pub port: u16,
    /// The process cap, when no cgroup enforces it: RLIMIT_NPROC, and the
    /// init's own count.
    pub max_processes: Option<u64>,
    /// The memory cap, when no cgroup enforces it: the init's own sum of the
    /// sandbox's resident memory and its tmpfs pages, with RLIMIT_DATA as a
    /// looser backstop.
    pub max_data: Option<u64>,
    /// The sandbox's tmpfs mounts, counted against `max_data`.
    pub tmpfs: Vec<PathBuf>,
    /// Where a cap hit is reported to the daemon (rlimit mode).
    pub report: Option<i32>,
    pub argv: Vec<OsString>,
}

/// The init's exit code when the run hit its memory cap (rlimit mode).
pub(crate) const EXIT_MEMORY: i32 = 240;
/// The init's exit code when the run hit its process cap (rlimit mode).
pub(crate) const EXIT_PROCESSES: i32 = 241;
/// What the init writes to its report pipe when the run hit a cap.
pub(crate) const REPORT_MEMORY: u8 = b'm';
pub(crate) const REPORT_PROCESSES: u8 = b'p';

/// The init's exit code when the agent could not be started confined.
pub(crate) const EXIT_SETUP: i32 = 125;

impl InitArgs {
    /// The init's own command line (`baton-sandbox-init`, whose only
    /// caller is baton): `[sandbox-init] [--proxy P] [--port N]
    /// [--max-processes N] [--max-data N] [--tmpfs P]... [--report-fd N]
    /// -- ARGV...`.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<InitArgs, String> {
        let mut out = InitArgs {
            proxy: None,
            port: super::PROXY_PORT,
            max_processes: None,
            max_data: None,
            tmpfs: Vec::new(),
            report: None,
            argv: Vec::new(),
        };
        let mut args = args.into_iter();
        let number = |v: Option<OsString>, flag: &str| -> Result<u64, String> {
            v.and_then(|v| v.into_string().ok())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{flag} needs a number"))
        };
        while let Some(arg) = args.next() {
            match arg.to_str() {
                Some("sandbox-init") => {}
                Some("--proxy") => out.proxy = args.next().map(PathBuf::from),
                Some("--port") => out.port = number(args.next(), "--port")? as u16,
                Some("--max-processes") => out.max_processes = Some(number(args.next(), "--max-processes")?),
                Some("--max-data") => out.max_data = Some(number(args.next(), "--max-data")?),
                Some("--tmpfs") => out.tmpfs.extend(args.next().map(PathBuf::from)),
                Some("--report-fd") => out.report = Some(number(args.next(), "--report-fd")? as i32),
                Some("--") => {
                    out.argv = args.collect();
                    break;
                }
                _ => return Err(format!("unexpected argument {}", arg.to_string_lossy())),
            }
        }
        if out.argv.is_empty() {
            return Err("no command after --".into());
        }
        Ok(out)
    }
}

/// Runs the agent; returns the exit code for the init to exit with.
pub fn run(args: InitArgs) -> i32 {
    // SAFETY: prctl and keyctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        // KEYCTL_JOIN_SESSION_KEYRING with no name: a new anonymous keyring.
        libc::syscall(libc::SYS_keyctl, 1, std::ptr::null::<libc::c_char>());
    }
    let limit = |resource, value: u64| {
        let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit with a valid struct; no memory is shared.
        unsafe { libc::setrlimit(resource, &lim) };
    };
    if let Some(n) = args.max_processes {
        // One above the cap: the kernel stops the tree one past it, where
        // the count below sees it past the cap, kills it and says why.
        limit(libc::RLIMIT_NPROC, n.saturating_add(1));
    }
    if let Some(n) = args.max_data {
        // The backstop a single process cannot pass; the exact cap is the
        // init's count across the tree (`caps`).
        limit(libc::RLIMIT_DATA, n.saturating_mul(2).max(n.saturating_add(1 << 30)));
    }
    if let Some(fd) = args.report {
        // The agent never inherits it.
        // SAFETY: fcntl on a descriptor the daemon passed us.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let hit = Arc::new(AtomicI32::new(0));
    let caps = (args.max_processes.is_some() || args.max_data.is_some()).then(|| Caps {
        max_processes: args.max_processes,
        max_memory: args.max_data,
        tmpfs: args.tmpfs.clone(),
        hit: hit.clone(),
        report: args.report,
    });
    if let Some(caps) = caps.clone() {
        let _ = std::thread::Builder::new().name("caps".into()).spawn(move || caps.watch());
    }
    let Some((program, rest)) = args.argv.split_first() else {
        eprintln!("baton sandbox-init: no command");
        return 127;
    };
    let bridge_at = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
    if let Some(socket) = &args.proxy {
        // Bound before the agent starts, so its first request finds it.
        match std::net::TcpListener::bind(bridge_at) {
            Ok(listener) => {
                let socket = socket.clone();
                let _ = std::thread::Builder::new().name("bridge".into()).spawn(move || bridge(listener, socket));
            }
            Err(e) => eprintln!("baton sandbox-init: cannot listen for the egress proxy: {e}"),
        }
    }
    let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("baton sandbox-init: {e}");
            return EXIT_SETUP;
        }
    };
    let filter = super::seccomp::filter(args.proxy.is_some());
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    // SAFETY: `install` makes only async-signal-safe calls on memory
    // prepared before the fork. A filter that cannot be installed fails the
    // spawn: the agent never runs unfiltered.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(move || super::seccomp::install(&filter, fd));
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
            eprintln!("baton sandbox-init: cannot run {}: {e}", program.to_string_lossy());
            return code;
        }
    };
    // Ours is the only end left once the child has exec'd.
    drop(theirs);
    if let Ok(listener) = super::watch::receive_fd(&std::os::fd::OwnedFd::from(ours)) {
        let (socket, bridge) = (args.proxy.clone(), args.proxy.as_ref().map(|_| bridge_at));
        let _ = std::thread::Builder::new().name("watch".into()).spawn(move || {
            super::watch::serve(
                listener,
                bridge,
                |dest| {
                    if let Some(socket) = &socket {
                        report_direct(socket, dest)
                    }
                },
                |what| {
                    // One write(2), under PIPE_BUF, so the agent's own output
                    // (the same pipe) never lands inside the line.
                    let line = format!("[baton] the sandbox refused {what}\n");
                    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                },
            )
        });
    }
    let code = reap_until(child.id() as libc::pid_t);
    // A run that hit a cap and ended before the watch looked (a fork
    // refused at once, say) is still caught: what it left is still here.
    if let Some(caps) = &caps {
        caps.measure();
    }
    match hit.load(Ordering::SeqCst) {
        0 => code,
        why => why,
    }
}

/// Reaps every child (orphans come to pid 1) until `agent` has ended;
/// returns its exit code, or 128 + the signal that ended it.
fn reap_until(agent: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid into a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                _ => return 1,
            }
        }
        if pid == agent {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            return 128 + libc::WTERMSIG(status);
        }
    }
}

/// Where no cgroup caps the run: counts its threads and its memory (the
/// resident pages of every process, and the pages its tmpfs mounts hold)
/// every few milliseconds. This /proc is the sandbox's own: every process
/// in it is the run's. At the process cap the run is marked (the kernel
/// refuses the fork); past it, and past the memory cap, everything but the
/// init is killed, as a cgroup's OOM killer would.
#[derive(Clone)]
struct Caps {
    max_processes: Option<u64>,
    max_memory: Option<u64>,
    tmpfs: Vec<PathBuf>,
    /// The exit code of the cap hit, once one is.
    hit: Arc<AtomicI32>,
    report: Option<i32>,
}

impl Caps {
    fn watch(&self) {
        loop {
            if self.measure() {
                // SAFETY: kill(2) of every process this one may signal: in
                // this PID namespace, all but itself (pid 1).
                unsafe { libc::kill(-1, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Counts once, marking a cap hit; whether the run is past a cap.
    fn measure(&self) -> bool {
        // SAFETY: sysconf with a constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let me = std::process::id().to_string();
        let (mut threads, mut memory) = (0u64, 0u64);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            threads += status.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok()).unwrap_or(1);
            if pid != me {
                let statm = std::fs::read_to_string(entry.path().join("statm")).unwrap_or_default();
                memory += statm.split_whitespace().nth(1).and_then(|r| r.parse::<u64>().ok()).unwrap_or(0) * page;
            }
        }
        memory += self.tmpfs.iter().map(|p| super::usage::fs_used(p).map(|u| u.bytes).unwrap_or(0)).sum::<u64>();
        let over = |cap: Option<u64>, n: u64| cap.is_some_and(|c| n > c);
        if self.max_processes.is_some_and(|c| threads >= c) {
            self.mark(EXIT_PROCESSES, REPORT_PROCESSES);
        }
        let mut past = over(self.max_processes, threads);
        if over(self.max_memory, memory) {
            self.mark(EXIT_MEMORY, REPORT_MEMORY);
            past = true;
        }
        past
    }

    /// Records a cap hit, telling the daemon the first time.
    fn mark(&self, code: i32, report: u8) {
        if self.hit.swap(code, Ordering::SeqCst) != code {
            if let Some(fd) = self.report {
                // SAFETY: write of one byte from a local to the report pipe.
                unsafe { libc::write(fd, [report].as_ptr().cast(), 1) };
            }
        }
    }
}

/// Tells the run's proxy of a connection made around it (see `watch`), and
/// waits (briefly) until it has counted it.
fn report_direct(socket: &std::path::Path, dest: std::net::SocketAddr) {
    use std::io::{Read as _, Write as _};
    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) {
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        if write!(s, "{} {dest} HTTP/1.1\r\n\r\n", super::egress::DIRECT_METHOD).is_ok() {
            let _ = s.read(&mut [0u8; 1]);
        }
    }
}

/// Every connection to the loopback port becomes one to the proxy socket.
fn bridge(listener: std::net::TcpListener, socket: PathBuf) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return };
    runtime.block_on(async move {
        let _ = listener.set_nonblocking(true);
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { continue };
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_reads_what_the_daemon_passes() {
        let args = |s: &str| s.split(' ').map(OsString::from).collect::<Vec<_>>();
        let a = InitArgs::parse(args(
            "sandbox-init --port 3128 --proxy /run/baton/proxy.sock --max-processes 32 \
             --max-data 1024 --tmpfs /tmp --tmpfs /dev/shm --report-fd 9 -- /bin/echo hi --port",
        ))
        .unwrap();
        assert_eq!((a.port, a.max_processes, a.max_data, a.report), (3128, Some(32), Some(1024), Some(9)));
        assert_eq!(a.tmpfs.len(), 2);
        assert_eq!(a.argv, args("/bin/echo hi --port"));
        assert!(InitArgs::parse(args("--port x -- a")).is_err());
        assert!(InitArgs::parse(args("--port 1")).is_err());
    }
}
