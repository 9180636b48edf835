//! What leaves a workspace: the agent's change staged, checked, committed
//! and pushed through baton's own repository for the slot, and the diff
//! since an earlier commit. Nothing here reads the agent's `.git`.

use std::path::Path;

use super::*;

impl Workspaces {
    /// Stages everything in the workspace's files, through baton's own
    /// repository (never the agent's `.git`): the paths that differ from
    /// the prepared commit, and the lines added, for checks before anything
    /// leaves the machine. `None` when nothing differs.
    ///
    /// Before anything is staged, every nested `.git` and every FIFO,
    /// socket and device is removed from the work tree (see `sweep`), and a
    /// gitlink the base commit did not have is never staged: baton's git
    /// reads only the tree it prepared.
    ///
    /// A change larger than `max_bytes` is not staged at all (nor diffed):
    /// it is reported with its paths and size, for the caller to refuse.
    pub async fn stage(
        &self,
        prepared: &Prepared,
        max_bytes: u64,
        cancel: &CancellationToken,
    ) -> Result<Staging, WorkspaceError> {
        let (Some(git_dir), Some(base)) = (&prepared.git_dir, &prepared.commit) else {
            return Ok(Staging { changes: None, removed: Vec::new() });
        };
        let work = prepared.path.clone();
        let mut removed = blocking(move || super::sweep::sweep(&work)).await?;
        let git = self.git.until(cancel);
        let tree = Some(prepared.path.as_path());
        // Sized before anything is read into baton's repository (or its
        // memory): what an agent writes can be as large as its disk cap.
        let status = git
            .run(git_dir, tree, &["status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames"], None)
            .await?;
        let paths: Vec<String> = status.split('\0').filter(|e| e.len() > 3).map(|e| e[3..].to_string()).collect();
        let bytes = sizes(&prepared.path, &paths);
        if bytes > max_bytes {
            return Ok(Staging { changes: Some(Staged { paths, added: String::new(), bytes }), removed });
        }
        git.run(git_dir, tree, &["add", "--all"], None).await?;
        let raw = git.run(git_dir, tree, &["diff", "--cached", "--raw", "-z", "--no-renames", base], None).await?;
        for path in new_gitlinks(&raw) {
            git.run(git_dir, tree, &["rm", "--cached", "--quiet", "-r", "--", &path], None).await?;
            removed.push((path, "a gitlink the base commit did not have (not staged)"));
        }
        let changes = self.changes(&git, git_dir, tree, &[base, "--cached"], max_bytes).await?;
        Ok(Staging { changes, removed })
    }

    /// What `git diff ARGS` shows, as paths, added lines and sizes; the
    /// added lines only when the files add up to at most `max_bytes`.
    pub(super) async fn changes(
        &self,
        git: &Git,
        git_dir: &Path,
        tree: Option<&Path>,
        args: &[&str],
        max_bytes: u64,
    ) -> Result<Option<Staged>, WorkspaceError> {
        let with = |flags: &[&'static str]| [flags, args].concat();
        let names = git.run(git_dir, tree, &with(&["diff", "--no-renames", "--name-only", "-z"]), None).await?;
        let paths: Vec<String> = names.split('\0').filter(|p| !p.is_empty()).map(str::to_string).collect();
        if paths.is_empty() {
            return Ok(None);
        }
        let bytes = tree.map(|t| sizes(t, &paths)).unwrap_or(0);
        if bytes > max_bytes {
            return Ok(Some(Staged { paths, added: String::new(), bytes }));
        }
        let diff = git.run(git_dir, tree, &with(&["diff", "--no-color", "--no-ext-diff", "--unified=0"]), None).await?;
        let added = diff
            .lines()
            .filter(|l| l.starts_with('+') && !l.starts_with("+++"))
            .map(|l| &l[1..])
            .collect::<Vec<_>>()
            .join("\n");
        Ok(Some(Staged { paths, added, bytes }))
    }

    /// Commits what `stage` staged as `author`, on top of the prepared
    /// commit; returns the commit.
    pub async fn commit(
        &self,
        prepared: &Prepared,
        message: &str,
        author: &str,
        cancel: &CancellationToken,
    ) -> Result<String, WorkspaceError> {
        let git_dir = prepared.git_dir.as_deref().ok_or(WorkspaceError::NoRepository)?;
        let git = self.git.until(cancel);
        let tree = Some(prepared.path.as_path());
        let id = identity(author);
        let mut args: Vec<&str> = id.iter().map(String::as_str).collect();
        args.extend(["commit", "--quiet", "--no-verify", "-m", message]);
        git.run(git_dir, tree, &args, None).await?;
        Ok(git.run(git_dir, None, &["rev-parse", "HEAD"], None).await?.trim().to_string())
    }

    /// Pushes `commit` to `to`'s branch. `Over::Anything`
    /// replaces whatever the branch holds: only for baton's own branches.
    /// `Over::Only(from)` moves someone else's branch from `from` and only
    /// from there: git checks the branch still holds `from` and moves it in
    /// one step on the remote side (so `commit`, a descendant of `from`,
    /// lands as a fast-forward or not at all); a branch that moved on is
    /// `BranchMoved`, naming where it is now.
    pub async fn push(
        &self,
        prepared: &Prepared,
        to: &Branch<'_>,
        commit: &str,
        over: Over<'_>,
        cancel: &CancellationToken,
    ) -> Result<(), WorkspaceError> {
        let git_dir = prepared.git_dir.as_deref().ok_or(WorkspaceError::NoRepository)?;
        let git = self.git.until(cancel);
        let token = self.token(prepared.forge, to.access, to.token_repo).await?;
        let url = self.url(prepared.forge, to.repo)?;
        let remote = format!("refs/heads/{}", to.branch);
        let how = match over {
            Over::Anything => "--force".to_string(),
            Over::Only(from) => format!("--force-with-lease={remote}:{from}"),
        };
        let pushed = git
            .run(git_dir, None, &["push", "--quiet", &how, &url, &format!("{commit}:{remote}")], token.as_ref())
            .await;
        let (e, from) = match (pushed, over) {
            (Ok(_), _) => return Ok(()),
            (Err(e), Over::Anything) => return Err(e),
            (Err(e), Over::Only(from)) => (e, from),
        };
        let listed = git.run(git_dir, None, &["ls-remote", &url, &remote], token.as_ref()).await?;
        let now = listed.split_whitespace().next().unwrap_or("").to_string();
        if now == from {
            return Err(e);
        }
        Err(WorkspaceError::BranchMoved {
            from: from.to_string(),
            to: if now.is_empty() { "nowhere (deleted)".into() } else { now },
        })
    }

    /// Replays `change.commit` (a child of `change.base`) onto `to`'s
    /// branch as it is now, `change.onto`, with a three-way merge made in
    /// baton's repository; the result is checked out in the workspace.
    /// Returns the new commit and its changes against `onto`, or `None` when
    /// the change does not apply cleanly.
    pub async fn replay(
        &self,
        prepared: &Prepared,
        to: &Branch<'_>,
        change: Replay<'_>,
        max_bytes: u64,
        cancel: &CancellationToken,
    ) -> Result<Option<(String, Option<Staged>)>, WorkspaceError> {
        let Replay { base, commit, onto } = change;
        let git_dir = prepared.git_dir.as_deref().ok_or(WorkspaceError::NoRepository)?;
        let git = self.git.until(cancel);
        let token = self.token(prepared.forge, to.access, to.token_repo).await?;
        let url = self.url(prepared.forge, to.repo)?;
        let moved = "refs/baton/moved";
        git.run(
            git_dir,
            None,
            &["fetch", "--no-tags", "--quiet", &url, &format!("+refs/heads/{}:{moved}", to.branch)],
            token.as_ref(),
        )
        .await?;
        let fetched = git.run(git_dir, None, &["rev-parse", "--verify", &format!("{moved}^{{commit}}")], None).await?;
        if fetched.trim() != onto {
            return Err(WorkspaceError::BranchMoved { from: onto.to_string(), to: fetched.trim().to_string() });
        }
        let merged = git
            .run(
                git_dir,
                None,
                &["merge-tree", "--write-tree", "--no-messages", &format!("--merge-base={base}"), onto, commit],
                None,
            )
            .await;
        // merge-tree exits 1 on a conflict: the change does not apply.
        let Ok(merged) = merged else { return Ok(None) };
        let tree = merged.lines().next().unwrap_or_default().trim().to_string();
        let message = git.run(git_dir, None, &["log", "-1", "--format=%B", commit], None).await?;
        let author = git.run(git_dir, None, &["log", "-1", "--format=%an", commit], None).await?;
        let id = identity(author.trim());
        let mut args: Vec<&str> = id.iter().map(String::as_str).collect();
        args.extend(["commit-tree", &tree, "-p", onto, "-m", message.trim_end()]);
        let new = git.run(git_dir, None, &args, None).await?.trim().to_string();
        let work = Some(prepared.path.as_path());
        git.run(git_dir, work, &["reset", "--quiet", "--hard", &new], None).await?;
        git.run(git_dir, work, &["clean", "--quiet", "-ffdx"], None).await?;
        let changes = self.changes(&git, git_dir, work, &[onto, &new], max_bytes).await?;
        Ok(Some((new, changes)))
    }

    /// `git diff since..commit` of a prepared repository workspace (the
    /// commit `since` fetched when the mirror lacks it), at most `cap` bytes.
    pub(crate) async fn diff_since(
        &self,
        prepared: &Prepared,
        access: Option<u64>,
        since: &str,
        cap: usize,
    ) -> Result<String, WorkspaceError> {
        let (Some(mirror), Some(commit), Some(key), Some(repo)) =
            (&prepared.mirror, &prepared.commit, &prepared.repo, &prepared.path_on_forge)
        else {
            return Err(WorkspaceError::NoRepository);
        };
        let token = self.token(prepared.forge, access, repo).await?;
        let url = self.url(prepared.forge, repo)?;
        {
            let lock = self.lock_for(key);
            let _guard = lock.lock().await;
            self.ensure_commit(mirror, &url, since, None, token.as_ref()).await?;
        }
        let mut diff =
            self.git.run(mirror, None, &["diff", "--no-color", "--no-ext-diff", since, commit], None).await?;
        if diff.len() > cap {
            let mut cut = cap;
            while !diff.is_char_boundary(cut) {
                cut -= 1;
            }
            diff.truncate(cut);
            diff.push_str("\n… (cut: the diff is longer; the workspace has the whole history)\n");
        }
        Ok(diff)
    }
}
