//! The daemon's own protection of the secrets it holds, applied once at
//! start, after the config is loaded and before any thread exists:
//!
//! - its soft limit on open descriptors is raised to the hard one;
//! - it becomes non-dumpable, so no process of the same user can read its
//!   `/proc/PID/environ`, `mem` or `fd`, or attach to it;
//! - descriptors it inherited are marked close-on-exec, so no agent gets one;
//! - the secret variables it has read are erased from its environment,
//!   including the original strings `/proc/PID/environ` shows (unsetenv
//!   alone only drops the pointer; the bytes stay on the stack).
//!
//! What git needs is passed per call; agents get only the variables their
//! definition names.

use std::ffi::CStr;

/// The variables baton reads secrets from when the config names none.
pub(crate) const IMPLICIT_SECRET_VARS: &[&str] = &["GITHUB_TOKEN", "GITHUB_WEBHOOK_SECRET", "BATON_API_TOKEN"];

/// Makes the process non-dumpable. Returns whether it took.
pub(crate) fn non_dumpable() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 }
}

/// Erases `names` from the environment, value bytes included.
///
/// Must run while the process has one thread: the environment is not
/// synchronized against other threads' `getenv`.
pub(crate) fn scrub_env(names: &[String]) {
    for name in names {
        if name.is_empty() || name.contains('=') || std::env::var_os(name).is_none() {
            continue;
        }
        let prefix = format!("{name}=");
        // SAFETY: single-threaded (see above). `environ` is a NULL-terminated
        // array of NUL-terminated strings; each string's bytes after `=` are
        // overwritten in place, within its own length, before unsetenv
        // removes the entry.
        unsafe {
            extern "C" {
                static mut environ: *mut *mut libc::c_char;
            }
            let mut p = environ;
            while !p.is_null() && !(*p).is_null() {
                let entry = CStr::from_ptr(*p);
                let bytes = entry.to_bytes();
                if bytes.starts_with(prefix.as_bytes()) {
                    let value = (*p).add(prefix.len());
                    std::ptr::write_bytes(value, 0, bytes.len() - prefix.len());
                }
                p = p.add(1);
            }
            std::env::remove_var(name);
        }
    }
}

/// Marks every descriptor above stderr close-on-exec, so no child inherits
/// one: those baton opens are already, but not those it inherited from
/// whatever started it. Async-signal-safe (also run between fork and exec).
pub(crate) fn cloexec_from_3() -> std::io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range(2) with integer arguments; it only sets flags.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raises the soft limit on open descriptors to the hard one: every
/// connection, sandbox and git child takes some, and the default soft limit
/// (often 1024) is a quota a busy daemon (or a hostile agent's proxy
/// connections) reaches first.
pub(crate) fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit with a struct we own.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// All of it, for `baton serve`: `secret_vars` are the variables the config's
/// `env:` references named.
pub fn protect(secret_vars: &[String]) {
    raise_open_files();
    if let Err(e) = cloexec_from_3() {
        tracing::warn!(error = %e, "Could not mark inherited descriptors close-on-exec (Linux 5.11+ has close_range).");
    }
    if !non_dumpable() {
        tracing::warn!("Could not make the daemon non-dumpable; other processes of its user may read its memory.");
    }
    let mut names: Vec<String> = IMPLICIT_SECRET_VARS.iter().map(|s| s.to_string()).collect();
    names.extend(secret_vars.iter().cloned());
    scrub_env(&names);
}
