//! File trees an agent wrote, walked and removed whatever their shape.
//!
//! An agent controls the tree: a recursive walk overflows the daemon's stack
//! on a deep one (20,000 levels of `a/a/a…` did), a walk by path strings
//! fails on a path longer than `PATH_MAX`, and any walk that follows a link
//! leaves the tree. So these walk by descriptor: each level is opened
//! relative to the one above with `O_NOFOLLOW`, only one directory is open
//! at a time (going back up by `..`, checked against the device and inode
//! recorded on the way down), and the work is a loop, never a recursion.
//!
//! A tree that changes under a walk (a running agent's) is walked as it is
//! found: a level that moved ends the walk early, never outside the root.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// One entry met by `walk`.
pub struct Entry<'a> {
    /// The folder holding it, open.
    pub dir: RawFd,
    pub name: &'a CStr,
    /// `lstat` of it: a link is a link.
    pub stat: &'a libc::stat,
    /// The folders between the root and it.
    parents: &'a [CString],
}

impl Entry<'_> {
    pub fn is_dir(&self) -> bool {
        self.stat.st_mode & libc::S_IFMT == libc::S_IFDIR
    }

    /// Whether it is directly in the root.
    pub(crate) fn parents_empty(&self) -> bool {
        self.parents.is_empty()
    }

    pub fn kind(&self) -> libc::mode_t {
        self.stat.st_mode & libc::S_IFMT
    }

    /// Its path relative to the root (for messages: it may be longer than
    /// any system call would take).
    pub fn path(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt as _;
        let mut p = PathBuf::new();
        for part in self.parents.iter().map(|c| c.as_c_str()).chain(std::iter::once(self.name)) {
            p.push(std::ffi::OsStr::from_bytes(part.to_bytes()));
        }
        p
    }

    /// A path to it that any call resolves however deep it is: its folder's
    /// descriptor, then its name.
    pub(crate) fn proc_path(&self) -> CString {
        let mut bytes = format!("/proc/self/fd/{}/", self.dir).into_bytes();
        bytes.extend_from_slice(self.name.to_bytes());
        CString::new(bytes).unwrap_or_default()
    }
}

/// What `walk` does after visiting an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go on; a folder is entered.
    Enter,
    /// Go on, but not into this folder (or the entry is gone).
    Skip,
    /// End the walk here.
    Stop,
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Opens `name` in `dir` as a folder, never through a link.
fn open_dir_at(dir: RawFd, name: &CStr) -> std::io::Result<OwnedFd> {
    // SAFETY: openat with a NUL-terminated name; the descriptor is owned once.
    let fd = unsafe {
        libc::openat(dir, name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: `fd` is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> std::io::Result<libc::stat> {
    // SAFETY: fstat into a zeroed struct we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(last_error());
        }
        Ok(st)
    }
}

/// The names in the folder `fd` (not `.` or `..`), read in one pass.
fn names(fd: RawFd) -> std::io::Result<Vec<CString>> {
    // fdopendir takes the descriptor it is given: hand it a duplicate.
    // SAFETY: dup/fdopendir/readdir/closedir on descriptors we own; each
    // name is copied out before the next readdir.
    unsafe {
        let dup = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
        if dup < 0 {
            return Err(last_error());
        }
        let stream = libc::fdopendir(dup);
        if stream.is_null() {
            let e = last_error();
            libc::close(dup);
            return Err(e);
        }
        libc::rewinddir(stream);
        let mut out = Vec::new();
        loop {
            *libc::__errno_location() = 0;
            let ent = libc::readdir(stream);
            if ent.is_null() {
                let errno = *libc::__errno_location();
                libc::closedir(stream);
                if errno != 0 {
                    return Err(std::io::Error::from_raw_os_error(errno));
                }
                return Ok(out);
            }
            let name = CStr::from_ptr((*ent).d_name.as_ptr());
            if name.to_bytes() != b"." && name.to_bytes() != b".." {
                out.push(name.to_owned());
            }
        }
    }
}

fn lstat_at(dir: RawFd, name: &CStr) -> std::io::Result<libc::stat> {
    // SAFETY: fstatat into a zeroed struct we own, not following a link.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(last_error());
        }
        Ok(st)
    }
}

/// One level of the walk: the folder's name in its parent, its identity,
/// and the sub-folders still to enter.
struct Level {
    name: Option<CString>,
    id: (u64, u64),
    pending: Vec<CString>,
}

/// Visits every entry under `root` (not `root` itself), folders before
/// their contents. `visit` may remove or change the entry it is given.
pub fn walk(root: &Path, mut visit: impl FnMut(&Entry) -> std::io::Result<Next>) -> std::io::Result<()> {
    let mut fd = open_dir_at(libc::AT_FDCWD, &cstr(root)?)?;
    let top = fstat(fd.as_raw_fd())?;
    let mut names_so_far: Vec<CString> = Vec::new();
    let mut stack: Vec<Level> = Vec::new();
    let mut current = Level { name: None, id: (top.st_dev, top.st_ino), pending: Vec::new() };
    let mut stopped = false;
    // Visits the entries of the open folder; the sub-folders to enter are
    // kept on its level.
    let mut read_level = |fd: &OwnedFd, level: &mut Level, parents: &[CString], stopped: &mut bool| {
        for name in names(fd.as_raw_fd())? {
            let Ok(stat) = lstat_at(fd.as_raw_fd(), &name) else { continue };
            let entry = Entry { dir: fd.as_raw_fd(), name: &name, stat: &stat, parents };
            match visit(&entry)? {
                Next::Enter if entry.is_dir() => level.pending.push(name),
                Next::Enter | Next::Skip => {}
                Next::Stop => {
                    *stopped = true;
                    return Ok::<(), std::io::Error>(());
                }
            }
        }
        level.pending.reverse();
        Ok(())
    };
    read_level(&fd, &mut current, &names_so_far, &mut stopped)?;
    while !stopped {
        if let Some(sub) = current.pending.pop() {
            let Ok(child) = open_dir_at(fd.as_raw_fd(), &sub) else { continue };
            let st = fstat(child.as_raw_fd())?;
            stack.push(std::mem::replace(
                &mut current,
                Level { name: Some(sub.clone()), id: (st.st_dev, st.st_ino), pending: Vec::new() },
            ));
            names_so_far.push(sub);
            fd = child;
            read_level(&fd, &mut current, &names_so_far, &mut stopped)?;
            continue;
        }
        let Some(parent) = stack.pop() else { break };
        let up = open_dir_at(fd.as_raw_fd(), c"..")?;
        let st = fstat(up.as_raw_fd())?;
        if (st.st_dev, st.st_ino) != parent.id {
            // The folder moved while it was walked: never go elsewhere.
            break;
        }
        fd = up;
        names_so_far.pop();
        current = parent;
    }
    Ok(())
}

/// Removes `entry` (a folder with everything in it, or anything else).
pub(crate) fn remove_entry(entry: &Entry) -> std::io::Result<()> {
    if entry.is_dir() {
        let dir = open_dir_at(entry.dir, entry.name)?;
        empty(dir)?;
        // SAFETY: unlinkat of a name in a folder we hold open.
        if unsafe { libc::unlinkat(entry.dir, entry.name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(last_error());
        }
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { libc::unlinkat(entry.dir, entry.name.as_ptr(), 0) } != 0 {
        return Err(last_error());
    }
    Ok(())
}

/// Removes everything in the open folder `top`, however deep.
fn empty(top: OwnedFd) -> std::io::Result<()> {
    let first = fstat(top.as_raw_fd())?;
    let mut fd = top;
    // Each level: its name in its parent, its identity, and the folders in
    // it still to empty.
    let mut stack: Vec<Level> = Vec::new();
    let mut current = Level { name: None, id: (first.st_dev, first.st_ino), pending: clear(&fd)? };
    loop {
        if let Some(sub) = current.pending.pop() {
            match open_dir_at(fd.as_raw_fd(), &sub) {
                Ok(child) => {
                    let st = fstat(child.as_raw_fd())?;
                    let pending = clear(&child)?;
                    stack.push(std::mem::replace(
                        &mut current,
                        Level { name: Some(sub), id: (st.st_dev, st.st_ino), pending },
                    ));
                    fd = child;
                }
                // Not a folder any more: remove it as what it is.
                Err(_) => {
                    // SAFETY: unlinkat of a name in a folder we hold open.
                    unsafe { libc::unlinkat(fd.as_raw_fd(), sub.as_ptr(), 0) };
                }
            }
            continue;
        }
        let (Some(name), Some(parent)) = (current.name.take(), stack.pop()) else { return Ok(()) };
        let up = open_dir_at(fd.as_raw_fd(), c"..")?;
        let st = fstat(up.as_raw_fd())?;
        if (st.st_dev, st.st_ino) != parent.id {
            return Err(std::io::Error::other("a folder moved while it was removed"));
        }
        fd = up;
        // SAFETY: unlinkat of a name in the folder we hold open.
        if unsafe { libc::unlinkat(fd.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(last_error());
        }
        current = parent;
    }
}

/// Removes every entry of the open folder but its sub-folders; returns those.
fn clear(fd: &OwnedFd) -> std::io::Result<Vec<CString>> {
    let mut dirs = Vec::new();
    for name in names(fd.as_raw_fd())? {
        // SAFETY: unlinkat of a name in a folder we hold open.
        if unsafe { libc::unlinkat(fd.as_raw_fd(), name.as_ptr(), 0) } == 0 {
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EISDIR) => dirs.push(name),
            Some(libc::ENOENT) => {}
            _ => return Err(last_error()),
        }
    }
    Ok(dirs)
}

/// Removes `path` and everything in it (a link is removed, never followed);
/// a path already gone is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => return std::fs::remove_file(path),
        Ok(_) => {}
    }
    empty(open_dir_at(libc::AT_FDCWD, &cstr(path)?)?)?;
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes everything in the folder `path`, keeping the folder.
pub(crate) fn remove_contents(path: &Path) -> std::io::Result<()> {
    empty(open_dir_at(libc::AT_FDCWD, &cstr(path)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `depth` folders one in another under `root`, made by descriptor (the
    /// path is far longer than PATH_MAX).
    fn deep(root: &Path, depth: usize, name_len: usize) {
        let name = CString::new("d".repeat(name_len)).unwrap();
        let mut fd = open_dir_at(libc::AT_FDCWD, &cstr(root).unwrap()).unwrap();
        for _ in 0..depth {
            assert_eq!(unsafe { libc::mkdirat(fd.as_raw_fd(), name.as_ptr(), 0o755) }, 0);
            fd = open_dir_at(fd.as_raw_fd(), &name).unwrap();
        }
        let file = c"leaf";
        let f = unsafe { libc::openat(fd.as_raw_fd(), file.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644) };
        assert!(f >= 0);
        unsafe { libc::close(f) };
    }

    #[test]
    fn a_tree_deeper_than_any_stack_and_longer_than_path_max_is_walked_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        std::fs::create_dir(&root).unwrap();
        // Far deeper than a recursive walk survives on a worker's stack.
        deep(&root, 22_000, 1);
        let mut n = 0;
        walk(&root, |_| {
            n += 1;
            Ok(Next::Enter)
        })
        .unwrap();
        assert_eq!(n, 22_001);
        remove(&root).unwrap();
        assert!(!root.exists());

        std::fs::create_dir(&root).unwrap();
        deep(&root, 40, 250);
        let mut leaf = None;
        walk(&root, |e| {
            if e.name == c"leaf" {
                leaf = Some(e.path());
            }
            Ok(Next::Enter)
        })
        .unwrap();
        assert!(leaf.unwrap().as_os_str().len() > 10_000);
        remove_contents(&root).unwrap();
        assert!(root.is_dir() && std::fs::read_dir(&root).unwrap().next().is_none());
    }

    #[test]
    fn links_are_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "x").unwrap();
        let root = dir.path().join("t");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("a/link")).unwrap();
        let mut seen = Vec::new();
        walk(&root, |e| {
            seen.push(e.path());
            Ok(Next::Enter)
        })
        .unwrap();
        assert_eq!(seen, [PathBuf::from("a"), PathBuf::from("a/link")]);
        remove(&root).unwrap();
        assert!(outside.path().join("keep").exists());
        assert!(remove(&root).is_ok(), "already gone");
    }
}
