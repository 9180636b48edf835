//! The sandbox's view as a bubblewrap command line: system folders, `/etc`,
//! baton's folders at their fixed paths and each tmpfs with its caps, built
//! by binds, or, for a root daemon, staged once in a private mount
//! namespace (`stage`) so no host path of baton's is named.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::*;

/// The bubblewrap command line being built, and (for a root daemon) the
/// staging that makes baton's folders reachable to it.
pub(super) struct View {
    pub(super) args: Vec<OsString>,
    pub(super) stage: Option<stage::Plan>,
    /// Descriptors bubblewrap is to inherit.
    pub(super) keep: Vec<OwnedFd>,
}

impl View {
    pub(super) fn new(stage: Option<stage::Plan>) -> View {
        View { args: Vec::new(), stage, keep: Vec::new() }
    }

    /// `/etc`: the allowlisted `files` and the generated `texts`. Staged, it
    /// is one folder of read-only binds made by the root child (bubblewrap
    /// binds it once); else bubblewrap binds each file and copies each text
    /// in from a pipe (a bind would name a folder of baton's).
    pub(super) fn etc(&mut self, files: Vec<PathBuf>, texts: Vec<(String, String)>) -> std::io::Result<()> {
        match &mut self.stage {
            Some(s) => {
                let source = s.add(stage::Item::Folder { files, texts });
                self.push([OsString::from("--bind"), source.into(), "/etc".into()]);
            }
            None => {
                for path in &files {
                    let Some(name) = path.file_name() else { continue };
                    let inside = Path::new("/etc").join(name);
                    self.push([OsString::from("--ro-bind"), path.into(), inside.into()]);
                }
                for (name, text) in &texts {
                    self.data(text, &Path::new("/etc").join(name))?;
                }
            }
        }
        Ok(())
    }

    /// A read-only file at `inside` holding `text`, which bubblewrap reads
    /// from a pipe (a small text: it fits the pipe's buffer).
    pub(super) fn data(&mut self, text: &str, inside: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let (read, write) = pipe()?;
        std::fs::File::from(write).write_all(text.as_bytes())?;
        self.push([OsString::from("--ro-bind-data"), read.as_raw_fd().to_string().into(), inside.into()]);
        self.keep.push(read);
        Ok(())
    }

    pub(super) fn push<I: IntoIterator<Item = S>, S: Into<OsString>>(&mut self, items: I) {
        self.args.extend(items.into_iter().map(Into::into));
    }

    /// A system path, readable by anyone: shown as it is.
    pub(super) fn system(&mut self, flag: &str, path: &Path) {
        self.push([OsString::from(flag), path.into(), path.into()]);
    }

    /// `host` shown at the same path (the agent's program, a definition's
    /// `read_only`/`read_write`); skipped when it does not exist.
    pub(super) fn path(&mut self, host: &Path, writable: bool) {
        let Ok(meta) = std::fs::metadata(host) else { return };
        let source = match &mut self.stage {
            Some(s) => s.add(stage::Item::Bind { src: host.to_path_buf(), dir: meta.is_dir() }),
            None => host.to_path_buf(),
        };
        let flag = if writable { "--bind" } else { "--ro-bind" };
        self.push([OsString::from(flag), source.into(), host.into()]);
    }

    /// A single file of baton's shown at `inside`; `whole_dir`: shown
    /// through a read-only overlay of its folder (the baton binary: a
    /// bind would name its path).
    pub(super) fn file(&mut self, host: &Path, inside: &Path, whole_dir: bool) {
        let source = match (&mut self.stage, host.parent(), host.file_name()) {
            (Some(s), Some(dir), Some(name)) if whole_dir => {
                s.add(stage::Item::ReadOnly { dir: dir.to_path_buf() }).join(name)
            }
            (Some(s), _, _) => s.add(stage::Item::Bind { src: host.to_path_buf(), dir: false }),
            (None, _, _) => host.to_path_buf(),
        };
        self.push([OsString::from("--ro-bind"), source.into(), inside.into()]);
    }

    /// A folder of baton's the agent writes, shown at `inside`.
    pub(super) fn upper(&mut self, host: &Path, inside: &Path) -> std::io::Result<()> {
        let source = match &mut self.stage {
            Some(s) => {
                std::fs::create_dir_all(stage::work_dir_for(host))?;
                s.add(stage::Item::Upper { upper: host.to_path_buf() })
            }
            None => host.to_path_buf(),
        };
        self.push([OsString::from("--bind"), source.into(), inside.into()]);
        Ok(())
    }

    /// A folder of baton's shown read-write at `inside` (an environment's
    /// cache, over the workspace or `HOME`).
    pub(super) fn bind_dir(&mut self, host: &Path, inside: &Path) {
        let source = match &mut self.stage {
            Some(s) => s.add(stage::Item::Bind { src: host.to_path_buf(), dir: true }),
            None => host.to_path_buf(),
        };
        self.push([OsString::from("--bind"), source.into(), inside.into()]);
    }

    /// A folder of baton's shown read-only at `inside`.
    pub(super) fn read_only_dir(&mut self, host: &Path, inside: &Path) {
        let source = match &mut self.stage {
            Some(s) => s.add(stage::Item::ReadOnly { dir: host.to_path_buf() }),
            None => host.to_path_buf(),
        };
        self.push([OsString::from("--ro-bind"), source.into(), inside.into()]);
    }

    /// A tmpfs at `inside` of at most `size` bytes (and, staged, `inodes`
    /// entries: bubblewrap cannot set that).
    pub(super) fn tmpfs(&mut self, inside: &Path, size: u64, inodes: u64) {
        match &mut self.stage {
            Some(s) => {
                let source = s.add(stage::Item::Tmpfs { size, inodes });
                self.push([OsString::from("--bind"), source.into(), inside.into()]);
            }
            None => {
                self.push([OsString::from("--size"), size.to_string().into()]);
                self.push([OsString::from("--tmpfs"), inside.into()]);
            }
        }
    }
}
