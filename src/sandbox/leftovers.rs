//! Sandboxes a dead daemon left behind. Each running sandbox has a record in
//! the storage folder naming its init's host pid (pid 1 of its namespace:
//! killing it kills the whole namespace), with the pid's start time and the
//! boot it belongs to, so a pid reused since is never killed. A starting
//! daemon kills what its predecessors recorded before any job runs again.
//!
//! This is the last of three nets: a sandbox dies with the daemon anyway
//! (parent-death signals from bubblewrap down to the init, which the agent
//! cannot clear: no `ptrace`, a non-dumpable pid 1), and where there is a
//! cgroup, the starting daemon empties leftover groups too (`cgroup`).

use std::path::{Path, PathBuf};

/// Where the records live.
#[derive(Debug, Clone)]
pub(crate) struct Records {
    dir: PathBuf,
}

/// Who a process is, across pid reuse: its start time (clock ticks after
/// boot) and the boot it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub pid: i32,
    pub(crate) start_ticks: Option<u64>,
    pub(crate) boot_id: Option<String>,
}

/// Clock ticks after boot at which `pid` started.
pub(crate) fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized name; starttime is field 22 (index 19 here).
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// This boot's id.
pub(crate) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

impl Identity {
    pub fn of(pid: i32) -> Identity {
        Identity { pid, start_ticks: start_ticks(pid), boot_id: boot_id() }
    }

    /// Whether `pid` is still the process recorded: same boot, same start.
    pub(crate) fn is_alive(&self) -> bool {
        self.pid > 1
            && self.boot_id.is_some()
            && self.boot_id == boot_id()
            && self.start_ticks.is_some()
            && start_ticks(self.pid) == self.start_ticks
    }

    fn line(&self) -> String {
        format!("{} {} {}\n", self.pid, self.start_ticks.unwrap_or(0), self.boot_id.as_deref().unwrap_or("-"))
    }

    fn parse(text: &str) -> Option<Identity> {
        let mut parts = text.split_whitespace();
        let pid = parts.next()?.parse().ok()?;
        let start_ticks = parts.next()?.parse().ok().filter(|t| *t > 0);
        let boot_id = parts.next().filter(|b| *b != "-").map(str::to_string);
        Some(Identity { pid, start_ticks, boot_id })
    }
}

impl Records {
    pub fn new(dir: PathBuf) -> Records {
        Records { dir }
    }

    fn path(&self, run: &str) -> PathBuf {
        self.dir.join(format!("{}-{run}", std::process::id()))
    }

    /// Notes that run `run`'s sandbox init is `pid`.
    pub(crate) fn note(&self, run: &str, init: &Identity) {
        let _ = std::fs::create_dir_all(&self.dir);
        if let Err(e) = std::fs::write(self.path(run), init.line()) {
            tracing::warn!(error = %e, "Could not record a sandbox's init; a daemon crash could leave it running.");
        }
    }

    /// Forgets run `run` (it ended).
    pub(crate) fn forget(&self, run: &str) {
        let _ = std::fs::remove_file(self.path(run));
    }

    /// Kills the sandboxes that daemons no longer alive recorded, and
    /// removes their records; returns how many were still running.
    pub(crate) fn kill_leftovers(&self) -> usize {
        let mut killed = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            // Another daemon on the same folder would be refused its store;
            // still, a live owner's sandboxes are its own to end.
            if owner.is_some_and(|o| o != std::process::id() && Path::new(&format!("/proc/{o}")).exists()) {
                continue;
            }
            let recorded = std::fs::read_to_string(entry.path()).ok().and_then(|t| Identity::parse(&t));
            if let Some(init) = recorded.filter(Identity::is_alive) {
                // SAFETY: kill(2) of a pid whose start time matches the record.
                if unsafe { libc::kill(init.pid, libc::SIGKILL) } == 0 {
                    killed += 1;
                    tracing::warn!(pid = init.pid, run = %name, "Killed a sandbox a previous daemon left running.");
                }
            }
            let _ = std::fs::remove_file(entry.path());
        }
        killed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_stale_one_is_not_alive() {
        let me = Identity::of(std::process::id() as i32);
        assert!(me.is_alive());
        assert_eq!(Identity::parse(&me.line()), Some(me.clone()));
        let reused = Identity { start_ticks: me.start_ticks.map(|t| t + 1), ..me.clone() };
        assert!(!reused.is_alive(), "a pid that started at another time is someone else");
        assert!(Identity::parse("garbage").is_none());
    }

    #[test]
    fn leftovers_of_a_dead_daemon_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        // A daemon pid that cannot exist.
        std::fs::write(dir.path().join("4194304-job-1-agent"), Identity::of(pid).line()).unwrap();
        let records = Records::new(dir.path().to_path_buf());
        assert_eq!(records.kill_leftovers(), 1);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}
