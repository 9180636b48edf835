//! The first process inside a sandbox (`baton sandbox-init`, hidden): it
//! sets the rlimits that stand in for cgroups where baton has none, bridges
//! `127.0.0.1:PORT` in the sandbox's empty network namespace to the run's
//! egress proxy socket, then runs the agent and exits as it did.
//!
//! It stays small on purpose: one thread (its threads count against the
//! run's process cap), no logging (its stderr is the agent's).

use std::ffi::OsString;
use std::path::PathBuf;

/// What the daemon tells the init.
#[derive(Debug, Clone)]
pub struct InitArgs {
    /// The proxy's Unix socket, as mounted in the sandbox.
    pub proxy: Option<PathBuf>,
    /// Where the bridge listens on the sandbox's loopback.
    pub port: u16,
    /// The process cap, when no cgroup enforces it: RLIMIT_NPROC (which
    /// Linux does not apply to root), and the init's own count.
    pub max_processes: Option<u64>,
    /// The memory cap, when no cgroup enforces it: the init's own sum of the
    /// sandbox's resident memory, with RLIMIT_DATA as a looser backstop.
    pub max_data: Option<u64>,
    pub argv: Vec<OsString>,
}

/// Runs the agent; returns the exit code for the init to exit with.
pub fn run(args: InitArgs) -> i32 {
    let limit = |resource, value: u64| {
        let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: setrlimit with a valid struct; no memory is shared.
        unsafe { libc::setrlimit(resource, &lim) };
    };
    if let Some(n) = args.max_processes {
        limit(libc::RLIMIT_NPROC, n);
    }
    if let Some(n) = args.max_data {
        // The backstop a single process cannot pass; the exact cap is the
        // init's count across the tree (`caps`).
        limit(libc::RLIMIT_DATA, n.saturating_mul(2).max(n.saturating_add(1 << 30)));
    }
    let hit = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    if args.max_processes.is_some() || args.max_data.is_some() {
        let (hit, procs, mem) = (hit.clone(), args.max_processes, args.max_data);
        let _ = std::thread::Builder::new().name("caps".into()).spawn(move || caps(procs, mem, &hit));
    }
    let Some((program, rest)) = args.argv.split_first() else {
        eprintln!("baton sandbox-init: no command");
        return 127;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton sandbox-init: {e}");
            return 127;
        }
    };
    runtime.block_on(async move {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(rest);
        let mut watch = None;
        if let Some(socket) = &args.proxy {
            match tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await {
                Ok(listener) => {
                    tokio::spawn(bridge(listener, socket.clone()));
                }
                Err(e) => eprintln!("baton sandbox-init: cannot listen for the egress proxy: {e}"),
            }
            // Direct connections are watched (and reported to the proxy)
            // where seccomp allows; without it they still fail, uncounted.
            if super::watch::supported() {
                if let Ok((ours, theirs)) = std::os::unix::net::UnixStream::pair() {
                    let filter = super::watch::filter();
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
                    // SAFETY: `install` makes only async-signal-safe calls on
                    // memory prepared before the fork. A failure is ignored:
                    // the agent runs, unwatched.
                    unsafe {
                        cmd.pre_exec(move || {
                            let _ = super::watch::install(&filter, fd);
                            Ok(())
                        });
                    }
                    watch = Some((ours, theirs, socket.clone()));
                }
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
                eprintln!("baton sandbox-init: cannot run {}: {e}", program.to_string_lossy());
                return code;
            }
        };
        if let Some((ours, theirs, socket)) = watch {
            // Ours is the only end left once the child has exec'd: the
            // listener arrives, or end of file when the filter was refused.
            drop(theirs);
            if let Ok(listener) = super::watch::receive_fd(&std::os::fd::OwnedFd::from(ours)) {
                let bridge = std::net::SocketAddr::from(([127, 0, 0, 1], args.port));
                let _ = std::thread::Builder::new()
                    .name("watch".into())
                    .spawn(move || super::watch::serve(listener, bridge, |dest| report_direct(&socket, dest)));
            }
        }
        let code = match child.wait().await {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt as _;
                status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
            }
            Err(_) => 1,
        };
        match hit.load(std::sync::atomic::Ordering::SeqCst) {
            0 => code,
            why => why,
        }
    })
}

/// The init's exit code when the run hit its memory cap (rlimit mode).
pub const EXIT_MEMORY: i32 = 240;
/// The init's exit code when the run hit its process cap (rlimit mode).
pub const EXIT_PROCESSES: i32 = 241;

/// Where no cgroup caps the run: counts its threads and resident memory
/// every few milliseconds (this /proc is the sandbox's own: every process
/// in it is the run's). At the process cap the run is marked (the kernel
/// refuses the fork, except for root); past it, and past the memory cap,
/// everything but the init is killed, as a cgroup's OOM killer would.
fn caps(max_processes: Option<u64>, max_memory: Option<u64>, hit: &std::sync::atomic::AtomicI32) {
    // SAFETY: sysconf with a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let me = std::process::id().to_string();
    loop {
        let (mut threads, mut resident) = (0u64, 0u64);
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            threads += status.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok()).unwrap_or(1);
            if pid != me {
                let statm = std::fs::read_to_string(entry.path().join("statm")).unwrap_or_default();
                resident += statm.split_whitespace().nth(1).and_then(|r| r.parse::<u64>().ok()).unwrap_or(0) * page;
            }
        }
        let over = |cap: Option<u64>, n: u64| cap.is_some_and(|c| n > c);
        if max_processes.is_some_and(|c| threads >= c) {
            hit.store(EXIT_PROCESSES, std::sync::atomic::Ordering::SeqCst);
        }
        let mut kill = over(max_processes, threads);
        if over(max_memory, resident) {
            hit.store(EXIT_MEMORY, std::sync::atomic::Ordering::SeqCst);
            kill = true;
        }
        if kill {
            // SAFETY: kill(2) of every process this one may signal: in this
            // PID namespace, all but itself and its pid 1.
            unsafe { libc::kill(-1, libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
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
async fn bridge(listener: tokio::net::TcpListener, socket: PathBuf) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else { continue };
        let socket = socket.clone();
        tokio::spawn(async move {
            if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            }
        });
    }
}
