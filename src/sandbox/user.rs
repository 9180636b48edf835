//! Who agents run as. A daemon running as root never gives an agent its own
//! uid: the kernel lets uid 0 write host-wide settings (`/proc/sys`, and
//! through `core_pattern` run a program as real root) even without
//! capabilities, and a user namespace maps the agent straight onto it. So
//! agents run as `[sandbox] user` (default `nobody`), and the workspace,
//! `HOME` and io folder are handed to that uid for the run. A daemon running
//! as anyone else runs its agents as itself: it has nothing more to lose.

/// The uid and gid every sandboxed process of this daemon runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub(crate) gid: u32,
    /// The account's name on this host, when it has one.
    pub name: Option<String>,
    /// Whether this differs from the daemon's own uid (the daemon is root
    /// and switches to it before starting bubblewrap).
    pub(crate) switched: bool,
}

/// The account agents run as by default.
pub(crate) const DEFAULT_USER: &str = "nobody";

/// The uid of `nobody` on Linux systems that have no such entry.
const OVERFLOW_ID: u32 = 65534;

impl RunAs {
    /// Resolves `[sandbox] user` (a name or a numeric uid) for a daemon
    /// running with effective uid `euid`.
    pub(crate) fn resolve(user: Option<&str>, euid: u32) -> Result<RunAs, String> {
        if euid != 0 {
            // SAFETY: getegid has no failure mode and touches no memory.
            let gid = unsafe { libc::getegid() };
            return Ok(RunAs { uid: euid, gid, name: lookup_uid(euid).map(|(n, _)| n), switched: false });
        }
        let wanted = user.unwrap_or(DEFAULT_USER).trim();
        let (uid, gid, name) = match wanted.parse::<u32>() {
            Ok(uid) => match lookup_uid(uid) {
                Some((name, gid)) => (uid, gid, Some(name)),
                None => (uid, uid, None),
            },
            Err(_) => match lookup_name(wanted) {
                Some((uid, gid)) => (uid, gid, Some(wanted.to_string())),
                // A minimal image may have no `nobody` entry; its ids are
                // the kernel's overflow ids all the same.
                None if wanted == DEFAULT_USER => (OVERFLOW_ID, OVERFLOW_ID, None),
                None => {
                    return Err(format!(
                        "sandbox.user: no user `{wanted}` on this host (give an existing account or a numeric uid)"
                    ))
                }
            },
        };
        if uid == 0 || gid == 0 {
            return Err(format!(
                "sandbox.user: `{wanted}` is root (uid {uid}, gid {gid}); agents must never run as host root"
            ));
        }
        Ok(RunAs { uid, gid, name, switched: true })
    }

    /// The daemon's own effective uid.
    pub(crate) fn daemon_euid() -> u32 {
        // SAFETY: geteuid has no failure mode and touches no memory.
        unsafe { libc::geteuid() }
    }

    /// `uid 65534 (nobody)`, for `baton check` and the start-up log.
    pub fn describe(&self) -> String {
        let name = self.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        let how = if self.switched { "" } else { ", the daemon's own" };
        format!("uid {}{name}, gid {}{how}", self.uid, self.gid)
    }
}

fn lookup_name(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: getpwnam_r writes into `pw` and `buf`, both ours and sized as
    // declared; `result` points at `pw` or is null.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut result);
        (rc == 0 && !result.is_null()).then_some((pw.pw_uid, pw.pw_gid))
    }
}

fn lookup_uid(uid: u32) -> Option<(String, u32)> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: as in `lookup_name`; `pw_name` points into `buf` and is read
    // before `buf` goes.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut result);
        if rc != 0 || result.is_null() || pw.pw_name.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr(pw.pw_name).to_string_lossy().into_owned();
        Some((name, pw.pw_gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_daemons_run_agents_as_someone_else_and_never_as_root() {
        let nobody = RunAs::resolve(None, 0).unwrap();
        assert!(nobody.switched && nobody.uid != 0 && nobody.gid != 0);
        assert_eq!(RunAs::resolve(Some("4242"), 0).unwrap().uid, 4242);
        assert!(RunAs::resolve(Some("0"), 0).unwrap_err().contains("never run as host root"));
        assert!(RunAs::resolve(Some("root"), 0).unwrap_err().contains("never run as host root"));
        assert!(RunAs::resolve(Some("no-such-user-here"), 0).unwrap_err().contains("no user"));
    }

    #[test]
    fn other_daemons_run_agents_as_themselves() {
        let me = RunAs::resolve(Some("nobody"), 1000).unwrap();
        assert_eq!((me.uid, me.switched), (1000, false));
    }
}
