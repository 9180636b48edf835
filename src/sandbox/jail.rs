//! One run's sandbox from bubblewrap's start to its close: the command, the
//! cgroup joined while bubblewrap waits, the init's recorded identity, the
//! disk meter, and what the run hit or was refused.

use std::ffi::OsString;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::*;

/// One run's sandbox; `close` it when the run has ended.
pub(crate) struct Jail {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub(super) stage: Option<Arc<stage::Plan>>,
    /// Variables set for the agent on top of its own.
    pub env: Vec<(String, String)>,
    pub(super) cgroup: Option<Cgroup>,
    /// Caps enforced by the init, which reports a hit on this pipe.
    pub(super) report: Option<OwnedFd>,
    pub(super) refusals: Refusals,
    pub(super) stop: CancellationToken,
    pub(super) run_dir: PathBuf,
    /// The proxy's socket, when the run has one.
    pub(super) socket: Option<PathBuf>,
    pub(super) name: String,
    pub(super) records: leftovers::Records,
    /// bubblewrap's `--info-fd` pipe, until the sandbox has started.
    pub(super) info: Option<OwnedFd>,
    /// bubblewrap's `--block-fd` pipe: written once the sandbox may run.
    pub(super) block: Option<OwnedFd>,
    /// Descriptors bubblewrap inherits (the other end of `info`, the data
    /// it copies in); closed here once it has started.
    pub(super) keep: Vec<OwnedFd>,
    /// pid 1 of the sandbox, as the host sees it.
    pub(super) init: Option<leftovers::Identity>,
    pub(super) meter: usage::Meter,
}

impl Jail {
    /// baton's side of the agent's `HOME`.
    pub fn home(&self) -> PathBuf {
        home_dir(&self.run_dir)
    }

    /// How the run's disk use is metered (its base not yet known).
    pub(crate) fn meter(&self) -> &usage::Meter {
        &self.meter
    }

    /// Who files handed to the agent must belong to.
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.stage.as_ref().map(|s| s.owner())
    }

    /// The cap a run in rlimit mode hit, as its init reported it.
    pub(crate) fn limit_reported(&self) -> Option<LimitHit> {
        let fd = self.report.as_ref()?.as_raw_fd();
        let mut buf = [0u8; 16];
        // SAFETY: a non-blocking read into a buffer we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let got = &buf[..n.max(0) as usize];
        if got.contains(&init::REPORT_MEMORY) {
            Some(LimitHit::Memory)
        } else if got.contains(&init::REPORT_PROCESSES) {
            Some(LimitHit::Processes)
        } else {
            None
        }
    }

    /// The command that starts the sandbox. Between fork and exec the
    /// child marks every inherited descriptor close-on-exec but those
    /// bubblewrap is given, and (root daemon) stages the run's folders and
    /// becomes the agent's uid. The run waits for `started`.
    pub fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args);
        let keep: Vec<i32> = self.keep.iter().map(|fd| fd.as_raw_fd()).collect();
        let stage = self.stage.clone();
        // SAFETY: the closure only makes async-signal-safe calls (close_range,
        // fcntl, open, write, close, unshare, mount, mkdir, chdir, set*id) on
        // memory prepared before the fork. Only here: a pre_exec makes std
        // fork rather than posix_spawn.
        unsafe {
            cmd.pre_exec(move || {
                let _ = crate::harden::cloexec_from_3();
                for fd in &keep {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                match &stage {
                    Some(s) => s.run(),
                    None => Ok(()),
                }
            });
        }
        cmd
    }

    /// Once the command is spawned: learns the sandbox's pid 1 from
    /// bubblewrap, records it (so that a daemon that dies now can have it
    /// killed by the next), puts it in the run's cgroup, and lets it run.
    /// Returns how the run's disk use is metered.
    pub async fn started(&mut self, base: usage::Usage) -> Result<usage::Meter, SandboxError> {
        self.keep.clear();
        let (Some(read), Some(block)) = (self.info.take(), self.block.take()) else {
            return Ok(self.meter.clone());
        };
        let files = self.cgroup.as_ref().map(Cgroup::procs_files).unwrap_or_default();
        let (records, name) = (self.records.clone(), self.name.clone());
        let started = tokio::task::spawn_blocking(move || {
            let pid = child_pid(read).ok_or_else(|| std::io::Error::other("bubblewrap named no sandbox"))?;
            let init = leftovers::Identity::of(pid);
            records.note(&name, &init);
            let joined = files
                .iter()
                .try_for_each(|f| std::fs::write(std::ffi::OsStr::from_bytes(f.as_bytes()), pid.to_string()));
            if let Err(e) = joined {
                // SAFETY: kill(2) of the sandbox just started, not yet running.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return Err(e);
            }
            std::fs::File::from(block).write_all(b"1")?;
            Ok::<_, std::io::Error>(init)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))?;
        self.meter.init = Some(started.pid);
        self.init = Some(started);
        self.meter.base = base;
        Ok(self.meter.clone())
    }

    /// Ends everything left in the run, stops its proxy and removes its
    /// folder; what it ran into and the destinations refused.
    pub fn close(self) -> (Option<LimitHit>, Vec<Blocked>) {
        self.stop.cancel();
        if let Some(init) = self.init.as_ref().filter(|i| i.is_alive()) {
            // pid 1 of the namespace: the kernel takes everything in it along.
            // SAFETY: kill(2) of a pid whose start time was just checked.
            unsafe { libc::kill(init.pid, libc::SIGKILL) };
        }
        self.records.forget(&self.name);
        let hit = self.cgroup.as_ref().and_then(Cgroup::limit_hit);
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
        let _ = remove_tree(&self.run_dir);
        if let Some(c) = self.cgroup {
            // The kernel may hold an emptied group busy for a moment after
            // its last process is reaped; the job need not wait for that.
            let _ = std::thread::Builder::new().name("baton-cgroup".into()).spawn(move || c.remove());
        }
        (hit, self.refusals.list())
    }
}

/// The `child-pid` bubblewrap writes to its info pipe: read until the
/// object is whole (not to the pipe's end: the sandbox holds a copy of the
/// pipe until its setup is done, and the sandbox waits for us).
pub(super) fn child_pid(read: OwnedFd) -> Option<i32> {
    use std::io::Read as _;
    let mut file = std::fs::File::from(read);
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    while text.len() < 64 * 1024 {
        let n = file.read(&mut buf).ok().filter(|n| *n > 0)?;
        text.extend_from_slice(&buf[..n]);
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&text) {
            return value.get("child-pid")?.as_i64().and_then(|p| i32::try_from(p).ok());
        }
    }
    None
}
