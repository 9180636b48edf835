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

use std::path::{Path, PathBuf};

/// What `sweep` removed, relative to the root: `(path, what it was)`.
pub type Removed = Vec<(String, &'static str)>;

/// Whether `name` is one git would take for a repository's folder.
fn is_git_dir_name(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().eq_ignore_ascii_case(b".git")
}

/// Removes every nested `.git` and every FIFO, socket and device under
/// `root` (its own `.git` stays: that is the agent's repository, which the
/// daemon never reads).
pub fn sweep(root: &Path) -> std::io::Result<Removed> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut removed = Removed::new();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            // `file_type` comes from the folder listing: links are not followed.
            let kind = entry.file_type()?;
            let rel = || path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
            if dir != root && is_git_dir_name(&entry.file_name()) {
                if kind.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
                removed.push((rel(), "a nested repository's .git"));
            } else if kind.is_fifo() || kind.is_socket() || kind.is_block_device() || kind.is_char_device() {
                std::fs::remove_file(&path)?;
                let what = if kind.is_fifo() {
                    "a FIFO"
                } else if kind.is_socket() {
                    "a socket"
                } else {
                    "a device"
                };
                removed.push((rel(), what));
            } else if kind.is_dir() {
                stack.push(path);
            }
        }
    }
    removed.sort();
    Ok(removed)
}

/// Resets everything under `root`, and `root` itself, to what a checkout
/// makes: folders `0755`, files `0644` or `0755` (git keeps only the
/// executable bit), no setuid, setgid or sticky bits, and no extended
/// attributes. Links are left as they are.
pub fn normalize(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    reset(root, &std::fs::symlink_metadata(root)?)?;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.file_type().is_symlink() {
                continue;
            }
            reset(&entry.path(), &meta)?;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    fn reset(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = match (meta.is_dir(), mode & 0o111 != 0) {
            (true, _) | (false, true) => 0o755,
            (false, false) => 0o644,
        };
        if mode != wanted {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted))?;
        }
        strip_xattrs(path)
    }
    Ok(())
}

/// Removes every extended attribute of `path` (not following a link).
fn strip_xattrs(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
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
