//! What an agent leaves in a work tree that git itself would not clean, or
//! would trip over, removed by baton without following a link:
//!
//! - a nested `.git` (a folder, or a file with a `gitdir:` line): git never
//!   lists it, so `git clean` keeps it, and the next job's `git status` in
//!   that folder would run its `core.fsmonitor`; baton's own `git add`
//!   would open whatever repository it names and stage a gitlink to it;
//! - FIFOs, sockets and devices: reading a FIFO blocks baton's git forever.
//!
//! `sweep` runs before anything is staged and when a workspace is
//! released; `normalize` then resets what is kept: modes as git writes
//! them, no extended attributes (ACLs are stored as attributes too).

use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use crate::tree::{self, Next};

/// What `sweep` removed, relative to the root: `(path, what it was)`.
pub(crate) type Removed = Vec<(String, &'static str)>;

/// Whether `name` is one git would take for a repository's folder.
fn is_git_dir_name(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().eq_ignore_ascii_case(b".git")
}

/// Removes every nested `.git` and every FIFO, socket and device under
/// `root` (its own `.git` stays: that is the agent's repository, which the
/// daemon never reads). Any depth, no link followed (`tree`).
pub(crate) fn sweep(root: &Path) -> std::io::Result<Removed> {
    let mut removed = Removed::new();
    tree::walk(root, |e| {
        let rel = || e.path().to_string_lossy().into_owned();
        let nested = !e.parents_empty() && is_git_dir_name(std::ffi::OsStr::from_bytes(e.name.to_bytes()));
        let what = match e.kind() {
            _ if nested => "a nested repository's .git",
            libc::S_IFIFO => "a FIFO",
            libc::S_IFSOCK => "a socket",
            libc::S_IFBLK | libc::S_IFCHR => "a device",
            _ => return Ok(Next::Enter),
        };
        tree::remove_entry(e)?;
        removed.push((rel(), what));
        Ok(Next::Skip)
    })?;
    removed.sort();
    Ok(removed)
}

/// Resets everything under `root`, and `root` itself, to what a checkout
/// makes: folders `0755`, files `0644` or `0755` (git keeps only the
/// executable bit), no setuid, setgid or sticky bits, and no extended
/// attributes. Links are left as they are.
pub fn normalize(root: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let meta = std::fs::symlink_metadata(root)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        if meta.permissions().mode() & 0o7777 != 0o755 {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    strip_xattrs(&c)?;
    tree::walk(root, |e| {
        if e.kind() == libc::S_IFLNK {
            return Ok(Next::Skip);
        }
        let mode = e.stat.st_mode & 0o7777;
        let wanted = if e.is_dir() || mode & 0o111 != 0 { 0o755 } else { 0o644 };
        // SAFETY: fchmodat of a name in a folder the walk holds open (it
        // is no link: those were skipped above).
        if mode != wanted && unsafe { libc::fchmodat(e.dir, e.name.as_ptr(), wanted, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        strip_xattrs(&e.proc_path())?;
        Ok(Next::Enter)
    })
}

/// Removes every extended attribute of `path` (not following a link).
fn strip_xattrs(c: &std::ffi::CStr) -> std::io::Result<()> {
    let mut names = vec![0u8; 4096];
    // SAFETY: llistxattr writes at most `names.len()` bytes into `names`.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            // A file system without attributes has none to strip.
            Some(libc::ENOTSUP) => Ok(()),
            // More names than the buffer holds: more than any tool sets.
            _ => Err(std::io::Error::last_os_error()),
        };
    }
    for name in names[..n as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::ffi::CString::new(name) else { continue };
        // SAFETY: both strings are NUL-terminated and ours.
        if unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) } != 0 {
            let e = std::io::Error::last_os_error();
            // `security.*` labels the host's policy sets are not the agent's.
            if !name.as_bytes().starts_with(b"security.") {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// A list of what `sweep` removed, for the job's log.
pub fn describe(removed: &Removed) -> String {
    let shown: Vec<String> = removed.iter().take(20).map(|(p, what)| format!("{p} ({what})")).collect();
    let more = removed.len().saturating_sub(shown.len());
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn nested_repositories_fifos_and_sockets_go_and_links_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join(".git/objects")).unwrap();
        std::fs::create_dir_all(r.join("docs/.git/hooks")).unwrap();
        std::fs::write(r.join("docs/.git/config"), "[core]\n\tfsmonitor = touch /tmp/x\n").unwrap();
        std::fs::create_dir_all(r.join("hang")).unwrap();
        std::fs::write(r.join("hang/.git"), "gitdir: g\n").unwrap();
        std::fs::create_dir_all(r.join("hang/g")).unwrap();
        let fifo = std::ffi::CString::new(r.join("hang/g/HEAD").as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let _sock = std::os::unix::net::UnixListener::bind(r.join("sock")).unwrap();
        std::fs::create_dir_all(outside.path().join(".git")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("elsewhere")).unwrap();
        std::fs::write(r.join("README.md"), "kept").unwrap();

        let removed = sweep(r).unwrap();
        let paths: Vec<&str> = removed.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["docs/.git", "hang/.git", "hang/g/HEAD", "sock"], "{removed:?}");
        assert!(r.join(".git/objects").is_dir(), "the agent's own repository stays");
        assert!(outside.path().join(".git").is_dir(), "a link's target is never touched");
        assert!(r.join("README.md").is_file());
        assert!(describe(&removed).contains("hang/g/HEAD (a FIFO)"));
    }

    #[test]
    fn modes_and_attributes_are_reset() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/script"), "").unwrap();
        std::fs::write(r.join("d/plain"), "").unwrap();
        std::fs::set_permissions(r, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(r.join("d"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::set_permissions(r.join("d/script"), std::fs::Permissions::from_mode(0o4777)).unwrap();
        std::fs::set_permissions(r.join("d/plain"), std::fs::Permissions::from_mode(0o666)).unwrap();
        let c = std::ffi::CString::new(r.join("d/plain").as_os_str().as_encoded_bytes()).unwrap();
        let set = unsafe { libc::lsetxattr(c.as_ptr(), c"user.planted".as_ptr(), b"x".as_ptr().cast(), 1, 0) };
        normalize(r).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(r), 0o755);
        assert_eq!(mode(&r.join("d")), 0o755);
        assert_eq!(mode(&r.join("d/script")), 0o755);
        assert_eq!(mode(&r.join("d/plain")), 0o644);
        if set == 0 {
            let mut buf = [0u8; 64];
            let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            assert_eq!(n, 0, "attributes left");
        }
    }
}
