//! Job workspaces: one bare mirror per repository under the storage folder,
//! and a detached `git worktree` per job at the commit its workspace names.
//!
//! `git` runs as a binary. Fetches of one repository are serialized by a
//! per-repository lock, so two jobs never fetch into one mirror at once.
//! Credentials reach git through `GIT_CONFIG_*` environment variables
//! (an `http.extraHeader`), never through URLs, remotes or files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::process::Command;

use crate::config::Secret;
use crate::rules::Workspace;

/// A git operation may not take longer than this.
const GIT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("job has no repository")]
    NoRepository,
    #[error("invalid repository name `{0}`")]
    BadRepository(String),
    #[error("git {command} failed: {message}")]
    Git { command: String, message: String },
    #[error("cannot run git: {0}")]
    Io(#[from] std::io::Error),
    #[error("commit {0} not found after fetching")]
    MissingCommit(String),
}

/// A prepared workspace; hand it back to `release`.
#[derive(Debug)]
pub struct Prepared {
    pub path: PathBuf,
    /// The mirror the worktree belongs to, when there is one.
    pub mirror: Option<PathBuf>,
    /// The commit checked out.
    pub commit: Option<String>,
}

/// Mirrors and worktrees under one storage folder.
pub struct Workspaces {
    mirrors: PathBuf,
    worktrees: PathBuf,
    git_url: String,
    token: Option<Secret>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Workspaces {
    pub fn new(storage: &Path, git_url: &str, token: Option<Secret>) -> Workspaces {
        Workspaces {
            mirrors: storage.join("mirrors"),
            worktrees: storage.join("worktrees"),
            git_url: git_url.trim_end_matches('/').to_string(),
            token,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock_for(&self, repo: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.locks.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        locks.entry(repo.to_string()).or_default().clone()
    }

    pub fn worktree_path(&self, job_id: &str) -> PathBuf {
        self.worktrees.join(job_id)
    }

    /// Makes the job's workspace: an empty folder, or a worktree at the
    /// commit `ws` names (fetched into the repository's mirror first).
    pub async fn prepare(&self, job_id: &str, repo: Option<&str>, ws: &Workspace) -> Result<Prepared, WorkspaceError> {
        let path = self.worktree_path(job_id);
        // A leftover from an interrupted run of this same job.
        self.remove_dir(&path).await;
        if let Workspace::None = ws {
            tokio::fs::create_dir_all(&path).await?;
            return Ok(Prepared { path, mirror: None, commit: None });
        }
        let repo = repo.ok_or(WorkspaceError::NoRepository)?;
        let (owner, name) = split_repo(repo)?;
        let mirror = self.mirrors.join(owner).join(format!("{name}.git"));
        let url = format!("{}/{owner}/{name}.git", self.git_url);

        let lock = self.lock_for(repo);
        let _guard = lock.lock().await;
        self.ensure_mirror(&mirror).await?;
        let commit = match ws {
            // Handled above; kept total rather than asserted.
            Workspace::None => return Err(WorkspaceError::NoRepository),
            // `HEAD` (schedules, which have no payload to name the branch)
            // is whatever the remote's HEAD points at: its default branch.
            Workspace::DefaultBranch { branch } if branch == "HEAD" => {
                let local = "refs/baton/remote-head";
                self.fetch(&mirror, &url, &format!("+HEAD:{local}")).await?;
                self.resolve(&mirror, local).await?
            }
            Workspace::DefaultBranch { branch } => {
                let local = format!("refs/heads/{branch}");
                self.fetch(&mirror, &url, &format!("+{local}:{local}")).await?;
                self.resolve(&mirror, &local).await?
            }
            Workspace::PrHead { number, sha, base } => {
                let local = format!("refs/pull/{number}/head");
                self.fetch(&mirror, &url, &format!("+{local}:{local}")).await?;
                if let Some(base) = base {
                    let base = format!("refs/heads/{base}");
                    // Best effort: the diff base helps, its absence must not fail the job.
                    let _ = self.fetch(&mirror, &url, &format!("+{base}:{base}")).await;
                }
                match sha {
                    Some(sha) => self.ensure_commit(&mirror, &url, sha, None).await?,
                    None => self.resolve(&mirror, &local).await?,
                }
            }
            Workspace::HeadSha { sha, branch } => self.ensure_commit(&mirror, &url, sha, branch.as_deref()).await?,
        };
        tokio::fs::create_dir_all(&self.worktrees).await?;
        let path_str = path.display().to_string();
        git(&mirror, &["worktree", "add", "--detach", "--force", &path_str, &commit], None).await?;
        Ok(Prepared { path, mirror: Some(mirror), commit: Some(commit) })
    }

    /// The repository's own convention files — `AGENTS.md`, `CLAUDE.md` and
    /// `.baton/skills/*.md` — as they are on the default branch, never on the
    /// commit under work: a pull request must not rewrite its own reviewer's
    /// instructions. `(path, text)` pairs, in that order.
    pub async fn conventions(&self, prepared: &Prepared, repo: &str, default_branch: &str) -> Vec<(String, String)> {
        let Some(mirror) = &prepared.mirror else { return Vec::new() };
        let Ok((owner, name)) = split_repo(repo) else { return Vec::new() };
        let local = format!("refs/heads/{default_branch}");
        let rev = if default_branch == "HEAD" { "refs/baton/remote-head".to_string() } else { local.clone() };
        if default_branch != "HEAD" && !self.has_commit(mirror, &rev).await {
            let url = format!("{}/{owner}/{name}.git", self.git_url);
            let lock = self.lock_for(repo);
            let _guard = lock.lock().await;
            if self.fetch(mirror, &url, &format!("+{local}:{local}")).await.is_err() {
                return Vec::new();
            }
        }
        let mut paths = vec!["AGENTS.md".to_string(), "CLAUDE.md".to_string()];
        if let Ok(listing) = git(mirror, &["ls-tree", "--name-only", &format!("{rev}:.baton/skills")], None).await {
            let mut skills: Vec<String> =
                listing.lines().filter(|l| l.ends_with(".md")).map(|l| format!(".baton/skills/{l}")).collect();
            skills.sort();
            paths.extend(skills);
        }
        let mut out = Vec::new();
        for path in paths {
            if let Ok(text) = git(mirror, &["show", &format!("{rev}:{path}")], None).await {
                out.push((path, text));
            }
        }
        out
    }

    /// Removes a workspace.
    pub async fn release(&self, prepared: &Prepared) {
        if let Some(mirror) = &prepared.mirror {
            let path = prepared.path.display().to_string();
            let _ = git(mirror, &["worktree", "remove", "--force", "--force", &path], None).await;
        }
        self.remove_dir(&prepared.path).await;
        if let Some(mirror) = &prepared.mirror {
            let _ = git(mirror, &["worktree", "prune"], None).await;
        }
    }

    /// Commits everything the agent changed in `worktree` as `author` and
    /// force-pushes it to `branch` of the repository. `Ok(None)` when the
    /// agent changed nothing.
    pub async fn commit_and_push(
        &self,
        worktree: &Path,
        repo: &str,
        branch: &str,
        message: &str,
        author: &str,
    ) -> Result<Option<String>, WorkspaceError> {
        let (owner, name) = split_repo(repo)?;
        git(worktree, &["add", "--all"], None).await?;
        if git(worktree, &["status", "--porcelain"], None).await?.trim().is_empty() {
            return Ok(None);
        }
        let email = format!("{author}@users.noreply.github.com");
        git(
            worktree,
            &[
                "-c",
                &format!("user.name={author}"),
                "-c",
                &format!("user.email={email}"),
                "commit",
                "--quiet",
                "--no-verify",
                "-m",
                message,
            ],
            None,
        )
        .await?;
        let sha = git(worktree, &["rev-parse", "HEAD"], None).await?.trim().to_string();
        let url = format!("{}/{owner}/{name}.git", self.git_url);
        git(worktree, &["push", "--quiet", "--force", &url, &format!("HEAD:refs/heads/{branch}")], self.token.as_ref())
            .await?;
        Ok(Some(sha))
    }

    async fn remove_dir(&self, path: &Path) {
        if tokio::fs::metadata(path).await.is_ok() {
            let _ = tokio::fs::remove_dir_all(path).await;
        }
    }

    async fn ensure_mirror(&self, mirror: &Path) -> Result<(), WorkspaceError> {
        if mirror.join("HEAD").exists() {
            return Ok(());
        }
        let parent = mirror.parent().unwrap_or(&self.mirrors);
        tokio::fs::create_dir_all(parent).await?;
        // Initialized beside its final name and renamed, so a crash never
        // leaves a half-made mirror that looks whole.
        let tmp = parent.join(format!(".init-{}", std::process::id()));
        self.remove_dir(&tmp).await;
        let tmp_str = tmp.display().to_string();
        git(parent, &["init", "--bare", "--quiet", &tmp_str], None).await?;
        tokio::fs::rename(&tmp, mirror).await?;
        Ok(())
    }

    async fn fetch(&self, mirror: &Path, url: &str, refspec: &str) -> Result<(), WorkspaceError> {
        git(mirror, &["fetch", "--no-tags", "--quiet", url, refspec], self.token.as_ref()).await?;
        Ok(())
    }

    async fn resolve(&self, mirror: &Path, rev: &str) -> Result<String, WorkspaceError> {
        let out = git(mirror, &["rev-parse", "--verify", &format!("{rev}^{{commit}}")], None).await?;
        Ok(out.trim().to_string())
    }

    async fn has_commit(&self, mirror: &Path, sha: &str) -> bool {
        git(mirror, &["cat-file", "-e", &format!("{sha}^{{commit}}")], None).await.is_ok()
    }

    /// Makes sure `sha` is in the mirror: already there, fetched by id
    /// (GitHub serves any reachable commit), or fetched with its branch.
    async fn ensure_commit(
        &self,
        mirror: &Path,
        url: &str,
        sha: &str,
        branch: Option<&str>,
    ) -> Result<String, WorkspaceError> {
        if !sha.chars().all(|c| c.is_ascii_hexdigit()) || sha.len() < 7 {
            return Err(WorkspaceError::MissingCommit(sha.to_string()));
        }
        if self.has_commit(mirror, sha).await {
            return Ok(sha.to_string());
        }
        let by_id = self.fetch(mirror, url, sha).await;
        if by_id.is_err() {
            if let Some(branch) = branch {
                let local = format!("refs/heads/{branch}");
                self.fetch(mirror, url, &format!("+{local}:{local}")).await?;
            }
        }
        if self.has_commit(mirror, sha).await {
            Ok(sha.to_string())
        } else {
            by_id?;
            Err(WorkspaceError::MissingCommit(sha.to_string()))
        }
    }
}

fn split_repo(repo: &str) -> Result<(&str, &str), WorkspaceError> {
    let ok = |s: &str| {
        !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo.split_once('/') {
        Some((o, n)) if ok(o) && ok(n) => Ok((o, n)),
        _ => Err(WorkspaceError::BadRepository(repo.to_string())),
    }
}

/// Runs git in `dir`; with a token, authenticates HTTP(S) through an
/// environment-provided header so the token appears in no argv or file.
async fn git(dir: &Path, args: &[&str], token: Option<&Secret>) -> Result<String, WorkspaceError> {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(token) = token {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{}", token.expose()));
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", format!("Authorization: Basic {basic}"));
    }
    let command = args.first().copied().unwrap_or("").to_string();
    let out = match tokio::time::timeout(GIT_TIMEOUT, cmd.output()).await {
        Ok(out) => out?,
        Err(_) => return Err(WorkspaceError::Git { command, message: "timed out".into() }),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_string();
        return Err(WorkspaceError::Git { command, message });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_cannot_escape_the_mirror_folder() {
        assert!(split_repo("acme/widgets").is_ok());
        assert!(split_repo("Codertocat/Hello-World").is_ok());
        for bad in ["../x", "a/..", "a/b/c", "a", "/b", "a/b c"] {
            assert!(split_repo(bad).is_err(), "{bad}");
        }
    }
}
