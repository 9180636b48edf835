//! How baton's own git runs (hardened, bounded in time, cancellable), and
//! the file-system steps around it that must not follow an agent's links.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;

use super::{WorkspaceError, NETWORK_TIMEOUT};

/// How baton runs git: bounded in time, and stopped when the job it
/// works for is cancelled.
#[derive(Debug, Clone)]
pub(super) struct Git {
    /// The longest a command on a work tree or repository may take; one
    /// that talks to a remote gets at least `NETWORK_TIMEOUT`.
    pub(super) timeout: Duration,
    pub(super) cancel: Option<CancellationToken>,
}

impl Git {
    /// The same, stopped when `cancel` fires.
    pub(super) fn until(&self, cancel: &CancellationToken) -> Git {
        Git { timeout: self.timeout, cancel: Some(cancel.clone()) }
    }

    /// Runs git on the repository `git_dir` (with `work_tree`, if any); with
    /// a token, authenticates HTTP(S) through an environment-provided header
    /// so the token appears in no argv or file.
    ///
    /// Nothing but baton's own files configures it: the environment is
    /// cleared (PATH and git's trace variables pass), system and global
    /// config are off, and hooks and fsmonitor are disabled, so nothing an
    /// agent wrote can make git run a program. Its stdin is closed.
    pub(super) async fn run(
        &self,
        git_dir: &Path,
        work_tree: Option<&Path>,
        args: &[&str],
        token: Option<&Secret>,
    ) -> Result<String, WorkspaceError> {
        let mut cmd = hardened_git();
        cmd.env("GIT_DIR", git_dir);
        match work_tree {
            Some(tree) => {
                cmd.env("GIT_WORK_TREE", tree).current_dir(tree);
            }
            None => {
                cmd.current_dir(git_dir);
            }
        }
        cmd.args(args);
        if let Some(token) = token {
            // `token` is the whole `user:token` pair (see `Workspaces::token`).
            let basic = base64::engine::general_purpose::STANDARD.encode(token.expose());
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", format!("Authorization: Basic {basic}"));
        }
        self.output(cmd, args).await
    }

    pub(super) async fn output(&self, mut cmd: Command, args: &[&str]) -> Result<String, WorkspaceError> {
        let command = args.iter().find(|a| !a.starts_with('-') && !a.contains('=')).copied().unwrap_or("").to_string();
        let limit = match command.as_str() {
            "fetch" | "push" | "ls-remote" | "clone" => self.timeout.max(NETWORK_TIMEOUT),
            _ => self.timeout,
        };
        let cancelled = async {
            match &self.cancel {
                Some(c) => c.cancelled().await,
                None => std::future::pending().await,
            }
        };
        // `kill_on_drop`: a command given up on here is killed, not left.
        let out = tokio::select! {
            out = tokio::time::timeout(limit, cmd.output()) => match out {
                Ok(out) => out?,
                Err(_) => {
                    let message = format!("timed out after {}", crate::config::format_duration(limit));
                    return Err(WorkspaceError::Git { command, message });
                }
            },
            _ = cancelled => return Err(WorkspaceError::Cancelled(command)),
        };
        if !out.status.success() {
            return Err(WorkspaceError::Git { command, message: stderr_message(&out.stderr) });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// What a failed git command said: its whole stderr (the `fatal:` line
/// naming the cause often comes before advice that ends the output), blank
/// lines dropped, and bounded: the start and the end of a long one.
fn stderr_message(stderr: &[u8]) -> String {
    const KEEP: usize = 2000;
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
    let message = lines.join("\n");
    if message.is_empty() {
        return "no output".into();
    }
    if message.len() <= 2 * KEEP {
        return message;
    }
    let head = message.char_indices().take_while(|(i, _)| *i < KEEP).map(|(_, c)| c).collect::<String>();
    let mut tail_start = message.len() - KEEP;
    while !message.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!("{head}\n[… {} bytes left out …]\n{}", tail_start - head.len(), &message[tail_start..])
}

/// The size of `paths` in `tree` as they are now (deleted ones: 0). Links
/// count as themselves, never as what they point at.
pub(super) fn sizes(tree: &Path, paths: &[String]) -> u64 {
    paths.iter().filter_map(|p| std::fs::symlink_metadata(tree.join(p)).ok()).map(|m| m.len()).sum()
}

/// Paths whose staged entry is a gitlink (mode 160000) where the base had
/// none, from `git diff --cached --raw -z`.
pub(super) fn new_gitlinks(raw: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fields = raw.split('\0');
    while let (Some(meta), Some(path)) = (fields.next(), fields.next()) {
        let mut modes = meta.trim_start_matches(':').split(' ');
        let (old, new) = (modes.next().unwrap_or(""), modes.next().unwrap_or(""));
        if new == "160000" && old != "160000" {
            out.push(path.to_string());
        }
    }
    out
}

/// `-c user.name=… -c user.email=…` for commits made as `author`.
pub(super) fn identity(author: &str) -> [String; 4] {
    ["-c".into(), format!("user.name={author}"), "-c".into(), format!("user.email={author}@users.noreply.github.com")]
}

/// `git init --bare` of a new repository at `path`.
pub(super) async fn init_bare(git: &Git, path: &Path) -> Result<(), WorkspaceError> {
    let mut cmd = hardened_git();
    let args = ["init", "--bare", "--quiet"];
    cmd.args(args).arg(path);
    git.output(cmd, &args).await.map(|_| ())
}

/// git with nothing but what baton gives it (see `git`).
pub(super) fn hardened_git() -> Command {
    let mut cmd = Command::new("git");
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        if k == "PATH" || k.to_str().is_some_and(|k| k.starts_with("GIT_TRACE")) {
            cmd.env(k, v);
        }
    }
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .args(["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "protocol.ext.allow=never"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Makes `git_dir` read its objects from the mirror's as well.
pub(super) async fn borrow_objects(git_dir: &Path, mirror: &Path) -> std::io::Result<()> {
    let info = git_dir.join("objects/info");
    tokio::fs::create_dir_all(&info).await?;
    tokio::fs::write(info.join("alternates"), format!("{}\n", mirror.join("objects").display())).await
}

/// Records in the mirror that `slot` has `commit` checked out, so the
/// mirror's gc keeps it.
pub(super) async fn keep(mirror: &Path, slot: &Path, commit: &str) -> Result<(), WorkspaceError> {
    let Some(name) = slot.file_name() else { return Ok(()) };
    let dir = mirror.join("refs/baton/keep");
    tokio::fs::create_dir_all(&dir).await?;
    tokio::fs::write(dir.join(name), format!("{commit}\n")).await?;
    Ok(())
}

/// The agent's own repository in its workspace: HEAD at `commit`, objects
/// borrowed from the mirror's (`objects`, as the agent sees them), and a
/// copy of baton's index (so `git status` starts clean without re-hashing
/// the tree). Written as plain files: no process, a few milliseconds.
pub(super) async fn agent_repository(
    git_dir: &Path,
    agent_git: &Path,
    objects: &Path,
    commit: &str,
) -> std::io::Result<()> {
    let (git_dir, agent_git, objects, commit) =
        (git_dir.to_path_buf(), agent_git.to_path_buf(), objects.to_path_buf(), commit.to_string());
    blocking(move || {
        for dir in ["objects/info", "objects/pack", "refs/heads", "refs/tags"] {
            std::fs::create_dir_all(agent_git.join(dir))?;
        }
        std::fs::write(agent_git.join("HEAD"), format!("{commit}\n"))?;
        std::fs::write(
            agent_git.join("config"),
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n",
        )?;
        std::fs::write(agent_git.join("objects/info/alternates"), format!("{}\n", objects.display()))?;
        std::fs::copy(git_dir.join("index"), agent_git.join("index"))?;
        Ok(())
    })
    .await
}

/// A folder, and not a link to one.
pub(super) fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir())
}

/// Removes a folder and everything in it, however deep (an agent made
/// it); one already gone is fine.
pub(super) fn remove_tree(path: &Path) -> std::io::Result<()> {
    crate::tree::remove(path)
}

/// Removes the objects a slot's repository holds itself (loose and
/// packed), keeping `objects/info` (its alternates: the mirror's objects),
/// and the references that named them (a replay's fetched head, the head
/// before the reset).
pub(super) fn drop_own_objects(repo: &Path) -> std::io::Result<()> {
    crate::tree::remove(&repo.join("refs/baton"))?;
    crate::tree::remove(&repo.join("ORIG_HEAD"))?;
    for entry in std::fs::read_dir(repo.join("objects"))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "info" {
            continue;
        }
        if name == "pack" {
            crate::tree::remove_contents(&entry.path())?;
        } else {
            crate::tree::remove(&entry.path())?;
        }
    }
    Ok(())
}

/// Empties a job's folder for the next job, or fails if it cannot be
/// trusted to be what baton made: the agent may have replaced it with a
/// link, changed its mode, or left something that will not go.
pub(super) fn empty_out(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(std::io::Error::other("not a folder any more"));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    // A link is removed, never its target.
    crate::tree::remove_contents(dir)?;
    match std::fs::read_dir(dir)?.next() {
        None => Ok(()),
        Some(_) => Err(std::io::Error::other("not empty after cleaning")),
    }
}

/// Runs file-system work on the blocking pool, as one unit (each trip is a
/// thread handoff, which shows at a few hundred jobs a second).
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_command_keeps_the_whole_of_what_git_said() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-repository");
        let git = Git { timeout: std::time::Duration::from_secs(30), cancel: None };
        let mut cmd = hardened_git();
        let args = ["ls-remote", "--heads"];
        cmd.args(args).arg(&missing).current_dir(dir.path());
        let err = git.output(cmd, &args).await.unwrap_err().to_string();
        // The cause is git's first line; its advice is the last.
        assert!(err.starts_with("git ls-remote failed: fatal: "), "{err}");
        assert!(err.contains("does not appear to be a git repository"), "{err}");
        assert!(err.contains("and the repository exists."), "{err}");
        assert!(!err.contains("\n\n"), "blank lines are dropped: {err}");
    }

    #[test]
    fn a_long_stderr_keeps_its_start_and_its_end() {
        let long = format!("fatal: the cause\n{}\nthe last line\n", "x".repeat(10_000));
        let message = stderr_message(long.as_bytes());
        assert!(message.starts_with("fatal: the cause\n"), "{message}");
        assert!(message.ends_with("\nthe last line"), "{message}");
        assert!(message.len() < 4200, "{}", message.len());
        assert!(message.contains("bytes left out"), "{message}");
        assert_eq!(stderr_message(b"\n  \n"), "no output");
    }
}
