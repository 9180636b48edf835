//! What a root daemon does for a run between fork and exec, before it
//! becomes the agent's uid and starts bubblewrap: in a mount namespace of
//! the run's own, it stages everything of baton's the sandbox shows under
//! one fixed folder (`/run/baton-sandbox`), and only then drops to the
//! agent's uid.
//!
//! Why a stage:
//! - bubblewrap, running as the agent's uid, resolves every source path
//!   with that uid's rights, and baton's storage folder is not (and should
//!   not be) open to it; the stage is, and only in this namespace.
//! - A bind mount names its source folder in `/proc/self/mountinfo`. A
//!   read-write overlay whose upper layer is the real folder, mounted from
//!   relative paths, names nothing of the host: the workspace, `HOME` and
//!   io folder show as `upperdir=work`, and the mirror's objects and the
//!   init as read-only overlays of `.`. (Where the storage folder's file
//!   system cannot be an overlay's upper layer, the step falls back to a
//!   bind: the run works, its mountinfo names the folder.)
//! - `/tmp` and `/dev/shm` are tmpfs mounted here with `size=` and
//!   `nr_inodes=`, which bubblewrap cannot set.
//!
//! The namespace is private, so nothing of it reaches the host, and it goes
//! away with the run's last process. Everything in `run` is one system call
//! on memory prepared before the fork: no allocation, no lock.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The folder the stage is mounted on, in each run's own mount namespace,
/// under the host's runtime folder (`/run`). On the host it stays empty.
pub(crate) const STAGE_NAME: &str = "baton-sandbox";

/// An empty folder on the stage: the second lower layer of read-only
/// overlays (the kernel wants two when there is no upper one).
const EMPTY: &str = ".empty";

/// One thing put on the stage.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// `src` bound as it is (a folder or a file).
    Bind { src: PathBuf, dir: bool },
    /// A read-write overlay over `upper`, with its work folder beside it
    /// (`.NAME-w`, which the caller makes).
    Upper { upper: PathBuf },
    /// A read-only overlay of the folder `dir`.
    ReadOnly { dir: PathBuf },
    /// A fresh tmpfs.
    Tmpfs { size: u64, inodes: u64 },
    /// A folder (`/etc`) of `files` shown read-only, and `texts` written
    /// (name, text): one mount for bubblewrap instead of one per entry.
    Folder { files: Vec<PathBuf>, texts: Vec<(String, String)> },
}

/// The work folder an overlay over `upper` needs beside it.
pub(crate) fn work_dir_for(upper: &Path) -> PathBuf {
    let name = upper.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    upper.with_file_name(format!(".{name}-w"))
}

/// One system call of the staging.
#[derive(Debug)]
enum Step {
    MkDir(CString),
    MkFile(CString),
    /// A file with this text.
    Write(CString, Vec<u8>),
    Chdir(CString),
    Mount {
        src: CString,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// The overlay, or else the bind (see the module's header).
    MountOr {
        overlay: Box<Step>,
        bind: Box<Step>,
    },
}

/// The staging of one run.
#[derive(Debug)]
pub(crate) struct Plan {
    root: PathBuf,
    stage: CString,
    empty: CString,
    steps: Vec<Step>,
    uid: u32,
    gid: u32,
    items: usize,
}

fn c(p: impl AsRef<std::ffi::OsStr>) -> CString {
    // Paths never hold NUL (the kernel could not name them otherwise).
    CString::new(p.as_ref().as_encoded_bytes()).unwrap_or_default()
}

impl Plan {
    /// Staging on `stage` for a run whose processes run as `uid`/`gid`.
    pub fn new(stage: &Path, uid: u32, gid: u32) -> Plan {
        Plan {
            root: stage.to_path_buf(),
            stage: c(stage),
            empty: c(stage.join(EMPTY)),
            steps: Vec::new(),
            uid,
            gid,
            items: 0,
        }
    }

    /// The uid and gid the run becomes.
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// Puts `item` on the stage; returns where bubblewrap finds it.
    pub fn add(&mut self, item: Item) -> PathBuf {
        let at = self.root.join(self.items.to_string());
        let empty = self.root.join(EMPTY).display().to_string();
        self.items += 1;
        let target = c(&at);
        let bind = |src: &Path, target: &CString| Step::Mount {
            src: c(src),
            target: target.clone(),
            fstype: None,
            flags: libc::MS_BIND | libc::MS_REC,
            data: None,
        };
        match item {
            Item::Bind { src, dir } => {
                self.steps.push(if dir { Step::MkDir(target.clone()) } else { Step::MkFile(target.clone()) });
                self.steps.push(bind(&src, &target));
            }
            Item::Upper { upper } => {
                self.steps.push(Step::MkDir(target.clone()));
                let parent = upper.parent().unwrap_or(Path::new("/"));
                let name = upper.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                self.steps.push(Step::Chdir(c(parent)));
                let data = format!("lowerdir={empty},upperdir={name},workdir=.{name}-w");
                self.steps.push(Step::MountOr {
                    overlay: Box::new(Step::Mount {
                        src: c("overlay"),
                        target: target.clone(),
                        fstype: Some(c("overlay")),
                        flags: libc::MS_NOSUID | libc::MS_NODEV,
                        data: Some(c(data)),
                    }),
                    bind: Box::new(bind(&upper, &target)),
                });
            }
            Item::ReadOnly { dir } => {
                self.steps.push(Step::MkDir(target.clone()));
                self.steps.push(Step::Chdir(c(&dir)));
                self.steps.push(Step::MountOr {
                    overlay: Box::new(Step::Mount {
                        src: c("overlay"),
                        target: target.clone(),
                        fstype: Some(c("overlay")),
                        flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                        data: Some(c(format!("lowerdir=.:{empty}"))),
                    }),
                    bind: Box::new(bind(&dir, &target)),
                });
            }
            Item::Folder { files, texts } => {
                self.steps.push(Step::MkDir(target.clone()));
                for src in files {
                    let Some(name) = src.file_name() else { continue };
                    let dst = c(at.join(name));
                    // A link shows what it leads to, as bubblewrap's binds do.
                    self.steps.push(if src.is_dir() { Step::MkDir(dst.clone()) } else { Step::MkFile(dst.clone()) });
                    self.steps.push(bind(&src, &dst));
                    self.steps.push(Step::Mount {
                        src: c("none"),
                        target: dst,
                        fstype: None,
                        flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                        data: None,
                    });
                }
                for (name, text) in texts {
                    self.steps.push(Step::Write(c(at.join(name)), text.into_bytes()));
                }
            }
            Item::Tmpfs { size, inodes } => {
                self.steps.push(Step::MkDir(target.clone()));
                self.steps.push(Step::Mount {
                    src: c("tmpfs"),
                    target: target.clone(),
                    fstype: Some(c("tmpfs")),
                    flags: libc::MS_NOSUID | libc::MS_NODEV,
                    data: Some(c(format!("size={size},nr_inodes={inodes},mode=1777"))),
                });
            }
        }
        at
    }

    /// Runs the staging, then becomes the agent's uid.
    ///
    /// # Safety
    /// Only in a freshly forked child, before exec: async-signal-safe calls
    /// on memory prepared before the fork.
    pub unsafe fn run(&self) -> std::io::Result<()> {
        let fail = || Err(std::io::Error::last_os_error());
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return fail();
        }
        // Private: nothing mounted below propagates back to the host.
        let root = c"/".as_ptr();
        let none = std::ptr::null();
        if libc::mount(none, root, none, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
            return fail();
        }
        let tmpfs = c"tmpfs".as_ptr();
        let opts = c"size=1m,nr_inodes=4096,mode=0755".as_ptr();
        if libc::mount(tmpfs, self.stage.as_ptr(), tmpfs, libc::MS_NOSUID | libc::MS_NODEV, opts.cast()) != 0 {
            return fail();
        }
        if libc::mkdir(self.empty.as_ptr(), 0o755) != 0 {
            return fail();
        }
        for step in &self.steps {
            if step_ok(step) {
                continue;
            }
            match step {
                Step::MountOr { bind, .. } if step_ok(bind) => {}
                _ => return fail(),
            }
        }
        // The stage itself is baton's: nothing of the agent's is written to it.
        let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        if libc::mount(c"none".as_ptr(), self.stage.as_ptr(), std::ptr::null(), ro, std::ptr::null()) != 0 {
            return fail();
        }
        if libc::chdir(root) != 0 {
            return fail();
        }
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(self.gid, self.gid, self.gid) != 0
            || libc::setresuid(self.uid, self.uid, self.uid) != 0
        {
            return fail();
        }
        Ok(())
    }
}

/// One step; whether it took. Async-signal-safe.
unsafe fn step_ok(step: &Step) -> bool {
    let opt = |s: &Option<CString>| s.as_ref().map(|c| c.as_ptr()).unwrap_or(std::ptr::null());
    match step {
        Step::MkDir(p) => libc::mkdir(p.as_ptr(), 0o755) == 0,
        Step::MkFile(p) => {
            let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
            fd >= 0 && libc::close(fd) == 0
        }
        Step::Write(p, text) => {
            let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
            fd >= 0 && libc::write(fd, text.as_ptr().cast(), text.len()) == text.len() as isize && libc::close(fd) == 0
        }
        Step::Chdir(p) => libc::chdir(p.as_ptr()) == 0,
        Step::Mount { src, target, fstype, flags, data } => {
            libc::mount(src.as_ptr(), target.as_ptr(), opt(fstype), *flags, opt(data).cast()) == 0
        }
        Step::MountOr { overlay, .. } => step_ok(overlay),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_name_no_host_path() {
        let mut plan = Plan::new(Path::new("/run/baton-sandbox"), 65534, 65534);
        let at = plan.add(Item::Upper { upper: "/var/lib/baton/pool/acme/w/3/work".into() });
        assert_eq!(at, Path::new("/run/baton-sandbox/0"));
        let ro = plan.add(Item::ReadOnly { dir: "/var/lib/baton/mirrors/acme/w.git/objects".into() });
        assert_eq!(ro, Path::new("/run/baton-sandbox/1"));
        let text = format!("{:?}", plan.steps);
        let options: Vec<&str> = text.split("data: Some(").skip(1).collect();
        assert_eq!(options.len(), 2, "{text}");
        for o in options {
            assert!(!o.split(')').next().unwrap().contains("/var/lib/baton"), "{o}");
        }
        assert!(text.contains("upperdir=work,workdir=.work-w"), "{text}");
        assert_eq!(work_dir_for(Path::new("/s/pool/1/work")), Path::new("/s/pool/1/.work-w"));
    }
}
