//! Job workspaces: one bare mirror per repository under the storage folder,
//! and per job a self-contained checkout at the commit its workspace names.
//!
//! A checkout is a slot, `pool/<owner>/<name>/<slot>/`, holding `work/` (the
//! files the agent works on) and `git/`, baton's own repository for them:
//! objects borrowed read-only from the mirror (alternates), its own index,
//! HEAD and config. The agent gets a separate `work/.git`, made fresh for
//! each job, borrowing the same objects. So nothing an agent writes (hooks,
//! config, refs, attributes' drivers) is ever read by a git command of the
//! daemon: baton stages, commits and pushes through `git/`, from the files
//! the agent left, and only ever pushes one commit of its own on top of the
//! commit it prepared.
//!
//! `git` runs as a binary with a cleared environment, no system or global
//! config, and hooks and fsmonitor off. Fetches of one repository are
//! serialized by a per-repository lock. Credentials reach git through
//! `GIT_CONFIG_*` environment variables (an `http.extraHeader`), never
//! through URLs, remotes or files.
//!
//! Checking out a large tree dominates preparing a job, so a finished job's
//! slot goes back to a small pool (`storage.worktree_pool` across all
//! repositories, least recently used out first) and the next job on that
//! repository resets it to its own commit: `checkout --detach --force` then
//! `clean -ffdx`, which rewrites only what differs. A slot is cleaned when it
//! is pooled too, so the pool holds no build output. The mirror keeps a ref
//! per slot (`refs/baton/keep/…`), so its gc never drops a commit a slot has
//! checked out.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::forge::github::auth::Credentials;
use crate::forge::Forge;

/// Where one forge's repositories are fetched from and pushed to, and the
/// credentials git uses there.
pub struct Remote {
    pub forge: Forge,
    /// `{git_url}/{repo}.git` is a repository's clone URL.
    pub git_url: String,
    pub credentials: Option<GitCredentials>,
}

/// What git authenticates with on a forge.
#[derive(Clone)]
pub enum GitCredentials {
    /// A GitHub token or App.
    GitHub(Arc<Credentials>),
    /// A GitLab access token.
    Token(Secret),
}
use crate::rules::Workspace;

/// The least a git command that talks to a remote may take.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("the job names no repository, and its workspace needs one: use workspace = \"none\", or start it from an event (or a request's `repo`) that names one")]
    NoRepository,
    #[error("invalid repository name `{0}`: expected owner/name")]
    BadRepository(String),
    #[error("git {command} failed: {message}")]
    Git { command: String, message: String },
    #[error("cannot run git: {0}")]
    Io(#[from] std::io::Error),
    #[error("commit {0} is not in the repository after fetching it: was it force-pushed away, or is it from a fork baton cannot see?")]
    MissingCommit(String),
    #[error(
        "the pull request's head moved from {pinned} to {now} since the job was asked for; \
         nothing ran (ask again to run on the new head)"
    )]
    HeadMoved { pinned: String, now: String },
    #[error("the branch moved from {from} to {to}")]
    BranchMoved { from: String, to: String },
    #[error(transparent)]
    Auth(#[from] crate::forge::github::auth::AuthError),
    #[error("{0} is not configured (no [{1}] in baton.toml): baton cannot fetch from it")]
    NoForge(&'static str, &'static str),
    #[error("cancelled while git {0} ran")]
    Cancelled(String),
}

/// The branch a change is pushed to: `repo` may be a fork, while the token
/// is the one for `token_repo`, the repository the job is about.
#[derive(Debug, Clone, Copy)]
pub struct Branch<'a> {
    pub repo: &'a str,
    pub branch: &'a str,
    pub access: Option<u64>,
    pub(crate) token_repo: &'a str,
}

/// A commit made on `base`, to be replayed onto `onto`, where its branch
/// moved meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct Replay<'a> {
    pub base: &'a str,
    pub commit: &'a str,
    pub onto: &'a str,
}

/// What a push may replace on the remote branch.
#[derive(Debug, Clone, Copy)]
pub enum Over<'a> {
    /// Whatever it holds (baton's own branches).
    Anything,
    /// Only this commit (someone's pull request branch).
    Only(&'a str),
}

/// What an agent changed, staged: the paths, and the lines it added.
#[derive(Debug)]
pub struct Staged {
    pub paths: Vec<String>,
    pub added: String,
    /// The size of the changed files as they are now (deleted ones: 0).
    pub bytes: u64,
}

/// What staging found: the change (`None` when nothing differs), and what
/// baton removed from the work tree or the index before it could be staged.
#[derive(Debug)]
pub struct Staging {
    pub changes: Option<Staged>,
    pub removed: sweep::Removed,
}

/// A prepared workspace; hand it back to `release`.
#[derive(Debug)]
pub struct Prepared {
    /// The files the agent works on.
    pub path: PathBuf,
    /// baton's repository for them (`None` for `workspace = "none"`).
    git_dir: Option<PathBuf>,
    /// The mirror the worktree belongs to, when there is one.
    pub mirror: Option<PathBuf>,
    /// The commit checked out.
    pub commit: Option<String>,
    /// The object store the workspace's repository borrows from (shown
    /// read-only to a sandboxed agent, so its git works).
    pub objects: Option<PathBuf>,
    /// The repository, for worktrees that may go back to the pool.
    repo: Option<String>,
    /// Its forge, and its name there (`repo` is the pool's key for it).
    forge: Forge,
    path_on_forge: Option<String>,
    /// Whether this is a pooled worktree reset for this job.
    pub recycled: bool,
}

/// An idle slot in the pool.
#[derive(Debug)]
struct Idle {
    repo: String,
    /// The slot folder (holding `work/` and `git/`).
    path: PathBuf,
    mirror: PathBuf,
}

/// Emptied `workspace = "none"` folders kept for reuse, at most.
const MAX_EMPTY: usize = 64;

/// Mirrors and worktrees under one storage folder.
pub struct Workspaces {
    mirrors: PathBuf,
    /// Folders of `workspace = "none"` jobs; gone at each start.
    worktrees: PathBuf,
    /// Emptied `workspace = "none"` folders, ready for the next such job:
    /// creating and deleting one per job made inode allocation (ext4 skips
    /// recently deleted inodes) the largest cost of a short job.
    empty: Mutex<Vec<PathBuf>>,
    /// Every repository worktree, at `pool/<owner>/<name>/<job that made it>`.
    pool_dir: PathBuf,
    /// One per forge served; the first is the default (GitHub's).
    remotes: Vec<Remote>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Idle worktrees, least recently used first.
    idle: Mutex<VecDeque<Idle>>,
    pool_cap: usize,
    /// Repositories fetched into since their mirror's last gc.
    fetched: Mutex<BTreeSet<String>>,
    git: Git,
    /// Who the work tree belongs to while an agent runs (a root daemon's
    /// agents run as another uid).
    owner: Option<(u32, u32)>,
    /// Where the agent's repository finds the mirror's objects: the path
    /// the sandbox shows them at, or (unconfined) their own.
    agent_objects: Option<PathBuf>,
}

impl Workspaces {
    pub fn new(storage: &Path, remotes: Vec<Remote>, pool_cap: usize, git_timeout: Duration) -> Workspaces {
        Workspaces {
            mirrors: storage.join("mirrors"),
            worktrees: storage.join("worktrees"),
            empty: Mutex::new(Vec::new()),
            pool_dir: storage.join("pool"),
            remotes: remotes
                .into_iter()
                .map(|r| Remote { git_url: r.git_url.trim_end_matches('/').to_string(), ..r })
                .collect(),
            locks: Mutex::new(HashMap::new()),
            idle: Mutex::new(VecDeque::new()),
            pool_cap,
            fetched: Mutex::new(BTreeSet::new()),
            git: Git { timeout: git_timeout, cancel: None },
            owner: None,
            agent_objects: None,
        }
    }

    /// Serves another forge's repositories too.
    pub fn add_remote(&mut self, remote: Remote) {
        self.remotes.retain(|r| r.forge != remote.forge);
        self.remotes.push(Remote { git_url: remote.git_url.trim_end_matches('/').to_string(), ..remote });
    }

    /// Whether changes on `forge` can leave the machine: only with
    /// credentials to push with.
    pub(crate) fn publishes(&self, forge: Forge) -> bool {
        self.remotes.iter().any(|r| r.forge == forge && r.credentials.is_some())
    }

    /// Workspaces for sandboxed agents: handed to `owner` (when the agent's
    /// uid is not the daemon's) and borrowing objects where the sandbox
    /// shows them.
    pub fn confine(&mut self, owner: Option<(u32, u32)>) {
        self.owner = owner;
        self.agent_objects = Some(PathBuf::from(crate::sandbox::OBJECTS_PATH));
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        locked(&self.idle)
    }

    /// At start-up: worktrees a previous daemon left become the idle pool
    /// (each is reset before any job sees it); those over the cap go.
    pub(crate) async fn load_pool(&self) {
        let mut found = Vec::new();
        for (owner, repo_dirs) in list_dirs(&self.pool_dir).await {
            for (name, slots) in list_dirs(&repo_dirs).await {
                let mirror = self.mirrors.join(&owner).join(format!("{name}.git"));
                for (_, path) in list_dirs(&slots).await {
                    let modified = tokio::fs::metadata(&path).await.and_then(|m| m.modified()).ok();
                    found.push((modified, Idle { repo: format!("{owner}/{name}"), path, mirror: mirror.clone() }));
                }
                // Worktrees of a version before slots were self-contained.
                let _ = self.git.run(&mirror, None, &["worktree", "prune"], None).await;
            }
        }
        found.sort_by_key(|(modified, _)| *modified);
        let mut evicted = Vec::new();
        {
            let mut idle = self.idle();
            for (_, slot) in found {
                let whole = slot.path.join("git/HEAD").is_file() && is_real_dir(&slot.path.join("work"));
                if whole && valid_key(&slot.repo) && slot.mirror.join("HEAD").exists() {
                    idle.push_back(slot);
                } else {
                    evicted.push(slot);
                }
            }
            while idle.len() > self.pool_cap {
                evicted.extend(idle.pop_front());
            }
        }
        for slot in evicted {
            self.discard(&slot.path, Some(&slot.mirror)).await;
        }
    }

    fn lock_for(&self, repo: &str) -> Arc<tokio::sync::Mutex<()>> {
        locked(&self.locks).entry(repo.to_string()).or_default().clone()
    }

    /// Makes the job's workspace: an empty folder, or a worktree at the
    /// commit `ws` names (fetched into the repository's mirror first).
    pub(crate) async fn prepare(
        &self,
        job_id: &str,
        forge: Forge,
        repo: Option<&str>,
        access: Option<u64>,
        ws: &Workspace,
    ) -> Result<Prepared, WorkspaceError> {
        if let Workspace::None = ws {
            // `<job>/work`: the job's folder holds the overlay's work folder
            // beside it (see `sandbox::stage`), and names nothing inside.
            let folder = self.worktrees.join(job_id);
            let path = folder.join("work");
            let (dir, reused, owner) = (folder.clone(), locked(&self.empty).pop(), self.owner);
            let recycled = blocking(move || {
                // A leftover from an interrupted run of this same job.
                remove_tree(&dir)?;
                // An emptied folder takes the job's name: a rename, not a
                // new inode.
                let reused = reused.is_some_and(|old| {
                    let ok = std::fs::rename(&old, &dir).is_ok() && is_real_dir(&dir.join("work"));
                    if !ok {
                        let _ = remove_tree(&old);
                        let _ = remove_tree(&dir);
                    }
                    ok
                });
                if !reused {
                    std::fs::create_dir_all(dir.join("work"))?;
                }
                crate::sandbox::hand_over(&dir.join("work"), owner)?;
                Ok(reused)
            })
            .await?;
            return Ok(Prepared {
                path,
                git_dir: None,
                mirror: None,
                commit: None,
                objects: None,
                repo: None,
                forge,
                path_on_forge: None,
                recycled,
            });
        }
        let on_forge = repo.ok_or(WorkspaceError::NoRepository)?;
        let key = repo_key(forge, on_forge)?;
        let repo = key.as_str();
        let (owner, name) = key.split_once('/').ok_or_else(|| WorkspaceError::BadRepository(key.clone()))?;
        let mirror = self.mirrors.join(owner).join(format!("{name}.git"));
        let url = self.url(forge, on_forge)?;
        let token = self.token(forge, access, on_forge).await?;

        let lock = self.lock_for(repo);
        let _guard = lock.lock().await;
        self.ensure_mirror(&mirror).await?;
        locked(&self.fetched).insert(repo.to_string());
        let commit = match ws {
            // Handled above; kept total rather than asserted.
            Workspace::None => return Err(WorkspaceError::NoRepository),
            // `HEAD` (schedules, which have no payload to name the branch)
            // is whatever the remote's HEAD points at: its default branch.
            Workspace::DefaultBranch { branch } if branch == "HEAD" => {
                let local = "refs/baton/remote-head";
                self.fetch(&mirror, &url, &format!("+HEAD:{local}"), token.as_ref()).await?;
                self.resolve(&mirror, local).await?
            }
            Workspace::DefaultBranch { branch } => {
                let local = format!("refs/heads/{branch}");
                self.fetch(&mirror, &url, &format!("+{local}:{local}"), token.as_ref()).await?;
                self.resolve(&mirror, &local).await?
            }
            Workspace::PrHead { number, sha, base, pinned } => {
                let local = forge.change_head_ref(*number);
                self.fetch(&mirror, &url, &format!("+{local}:{local}"), token.as_ref()).await?;
                if let (true, Some(sha)) = (*pinned, sha) {
                    let now = self.resolve(&mirror, &local).await?;
                    if !now.starts_with(sha.as_str()) {
                        return Err(WorkspaceError::HeadMoved { pinned: sha.clone(), now });
                    }
                }
                if let Some(base) = base {
                    let base = format!("refs/heads/{base}");
                    // Best effort: the diff base helps, its absence must not fail the job.
                    let _ = self.fetch(&mirror, &url, &format!("+{base}:{base}"), token.as_ref()).await;
                }
                match sha {
                    Some(sha) => self.ensure_commit(&mirror, &url, sha, None, token.as_ref()).await?,
                    None => self.resolve(&mirror, &local).await?,
                }
            }
            Workspace::HeadSha { sha, branch } => {
                self.ensure_commit(&mirror, &url, sha, branch.as_deref(), token.as_ref()).await?
            }
        };
        let recycled = {
            let mut idle = self.idle();
            let newest = idle.iter().rposition(|i| i.repo == repo);
            newest.and_then(|at| idle.remove(at))
        };
        if let Some(slot) = recycled {
            match self.reset(&slot.path, &mirror, &commit).await {
                Ok(()) => return Ok(self.prepared(slot.path, mirror, commit, (forge, on_forge, repo), true)),
                Err(e) => {
                    tracing::warn!(path = %slot.path.display(), error = %e, "A pooled workspace could not be reset; making a new one.");
                    self.discard(&slot.path, Some(&mirror)).await;
                }
            }
        }
        // Unique per attempt: an earlier attempt's slot may be idle in the pool.
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let slot = self.pool_dir.join(owner).join(name).join(format!("{job_id}-{stamp:x}"));
        tokio::fs::create_dir_all(slot.join("work")).await?;
        let git_dir = slot.join("git");
        let made = async {
            init_bare(&self.git, &git_dir).await?;
            borrow_objects(&git_dir, &mirror).await?;
            self.reset(&slot, &mirror, &commit).await
        };
        if let Err(e) = made.await {
            self.discard(&slot, Some(&mirror)).await;
            return Err(e);
        }
        Ok(self.prepared(slot, mirror, commit, (forge, on_forge, repo), false))
    }

    fn prepared(
        &self,
        slot: PathBuf,
        mirror: PathBuf,
        commit: String,
        (forge, on_forge, repo): (Forge, &str, &str),
        recycled: bool,
    ) -> Prepared {
        Prepared {
            path: slot.join("work"),
            git_dir: Some(slot.join("git")),
            objects: Some(mirror.join("objects")),
            mirror: Some(mirror),
            commit: Some(commit),
            repo: Some(repo.to_string()),
            forge,
            path_on_forge: Some(on_forge.to_string()),
            recycled,
        }
    }

    /// Garbage-collects the mirror of every repository fetched into since
    /// the last call, each under its repository's lock (never beside a
    /// fetch). Pooled worktrees' commits are kept: git counts linked
    /// worktrees' HEADs as reachable.
    pub async fn gc(&self) {
        let repos = std::mem::take(&mut *locked(&self.fetched));
        for repo in repos {
            let Ok((owner, name)) = split_repo(&repo) else { continue };
            let mirror = self.mirrors.join(owner).join(format!("{name}.git"));
            let lock = self.lock_for(&repo);
            let _guard = lock.lock().await;
            let started = std::time::Instant::now();
            match self.git.run(&mirror, None, &["gc", "--quiet"], None).await {
                Ok(_) => {
                    tracing::info!(repo = %repo, ms = started.elapsed().as_millis() as u64, "Mirror garbage-collected.")
                }
                Err(e) => {
                    tracing::warn!(repo = %repo, error = %e, "Mirror gc failed; will retry after the next fetch.")
                }
            }
        }
    }

    /// Puts a slot at `commit` with nothing of its last job left: tracked
    /// files as committed, no untracked or ignored file, and a fresh
    /// `work/.git` for the agent; then hands the tree to the agent's uid.
    /// The agent's old `.git` goes first, unread.
    async fn reset(&self, slot: &Path, mirror: &Path, commit: &str) -> Result<(), WorkspaceError> {
        let work = slot.join("work");
        let git_dir = slot.join("git");
        if !is_real_dir(&work) {
            return Err(WorkspaceError::Io(std::io::Error::other("the workspace folder was replaced")));
        }
        let agent_git = work.join(".git");
        self.remove_dir(&agent_git).await;
        let tree = Some(work.as_path());
        // Parallel workers (one per core) write a fresh tree of thousands of
        // files 2-3× faster than one (5.0-5.9 s against 1.7-2.0 s for 10,000
        // files on two cores); a reset touching few files stays serial.
        let checkout = ["-c", "checkout.workers=0", "checkout", "--quiet", "--detach", "--force", commit];
        self.git.run(&git_dir, tree, &checkout, None).await?;
        self.git.run(&git_dir, tree, &["clean", "-ffdxq"], None).await?;
        keep(mirror, slot, commit).await?;
        let objects = self.agent_objects.clone().unwrap_or_else(|| mirror.join("objects"));
        agent_repository(&git_dir, &agent_git, &objects, commit).await?;
        self.hand_over(&work).await?;
        Ok(())
    }

    /// Gives the work tree to the agent's uid, when that is not baton's.
    async fn hand_over(&self, work: &Path) -> std::io::Result<()> {
        let (work, owner) = (work.to_path_buf(), self.owner);
        if owner.is_none() {
            return Ok(());
        }
        blocking(move || crate::sandbox::hand_over(&work, owner)).await
    }

    /// Gives the work tree to the agent's uid again, after baton's own git
    /// rewrote files in it (a replay onto a moved branch).
    pub(crate) async fn hand_back(&self, prepared: &Prepared) -> std::io::Result<()> {
        self.hand_over(&prepared.path).await
    }

    /// Removes a slot and its keep-ref in the mirror.
    async fn discard(&self, slot: &Path, mirror: Option<&Path>) {
        self.remove_dir(slot).await;
        if let (Some(mirror), Some(name)) = (mirror, slot.file_name()) {
            let _ = tokio::fs::remove_file(mirror.join("refs/baton/keep").join(name)).await;
        }
    }

    /// The repository's own convention files — `AGENTS.md`, `CLAUDE.md` and
    /// `.baton/skills/*.md` — as they are on the default branch, never on the
    /// commit under work: a pull request must not rewrite its own reviewer's
    /// instructions. `(path, text)` pairs, in that order.
    pub(crate) async fn conventions(
        &self,
        prepared: &Prepared,
        repo: &str,
        access: Option<u64>,
        default_branch: &str,
    ) -> Vec<(String, String)> {
        let Some(mirror) = &prepared.mirror else { return Vec::new() };
        let Some(rev) = self.default_rev(prepared, repo, access, default_branch).await else { return Vec::new() };
        let mut paths = vec!["AGENTS.md".to_string(), "CLAUDE.md".to_string()];
        if let Ok(listing) =
            self.git.run(mirror, None, &["ls-tree", "--name-only", &format!("{rev}:.baton/skills")], None).await
        {
            let mut skills: Vec<String> =
                listing.lines().filter(|l| l.ends_with(".md")).map(|l| format!(".baton/skills/{l}")).collect();
            skills.sort();
            paths.extend(skills);
        }
        let mut out = Vec::new();
        for path in paths {
            if let Ok(text) = self.git.run(mirror, None, &["show", &format!("{rev}:{path}")], None).await {
                out.push((path, text));
            }
        }
        out
    }

    /// The default branch's head in the mirror (fetched when missing), the
    /// only revision baton reads its own instructions from: a pull
    /// request's head never chooses what baton runs.
    async fn default_rev(
        &self,
        prepared: &Prepared,
        repo: &str,
        access: Option<u64>,
        default_branch: &str,
    ) -> Option<String> {
        let mirror = prepared.mirror.as_ref()?;
        let forge = prepared.forge;
        let local = format!("refs/heads/{default_branch}");
        let rev = if default_branch == "HEAD" { "refs/baton/remote-head".to_string() } else { local.clone() };
        if default_branch != "HEAD" && !self.has_commit(mirror, &rev).await {
            let url = self.url(forge, repo).ok()?;
            let token = self.token(forge, access, repo).await.ok()?;
            let key = prepared.repo.as_ref()?;
            let lock = self.lock_for(key);
            let _guard = lock.lock().await;
            self.fetch(mirror, &url, &format!("+{local}:{local}"), token.as_ref()).await.ok()?;
        }
        Some(rev)
    }

    /// A file of the repository as its default branch has it (`None`:
    /// absent or unreadable).
    pub(crate) async fn default_branch_file(
        &self,
        prepared: &Prepared,
        repo: &str,
        access: Option<u64>,
        default_branch: &str,
        path: &str,
    ) -> Option<String> {
        let mirror = prepared.mirror.as_ref()?;
        let rev = self.default_rev(prepared, repo, access, default_branch).await?;
        self.git.run(mirror, None, &["show", &format!("{rev}:{path}")], None).await.ok()
    }

    /// Gives a workspace back: a repository slot is cleaned and pooled
    /// (evicting the least recently used one over the cap); anything else,
    /// or one that does not clean, is removed.
    pub async fn release(&self, prepared: Prepared) {
        let (Some(mirror), Some(repo), Some(git_dir)) = (prepared.mirror, prepared.repo, prepared.git_dir) else {
            let folder = prepared.path.parent().map(Path::to_path_buf).unwrap_or_else(|| prepared.path.clone());
            if folder.parent() == Some(self.worktrees.as_path()) && locked(&self.empty).len() < MAX_EMPTY {
                let work = prepared.path.clone();
                if blocking(move || empty_out(&work)).await.is_ok() {
                    let mut empty = locked(&self.empty);
                    if empty.len() < MAX_EMPTY {
                        empty.push(folder);
                        return;
                    }
                }
            }
            self.remove_dir(&folder).await;
            return;
        };
        let slot = prepared.path.parent().map(Path::to_path_buf).unwrap_or_else(|| prepared.path.clone());
        let work = prepared.path.clone();
        // What git would keep or trip over goes first (no link followed),
        // then what git lists; what stays gets the modes a checkout gives.
        let swept = is_real_dir(&work) && blocking(move || sweep::sweep(&work).map(|_| ())).await.is_ok();
        self.remove_dir(&prepared.path.join(".git")).await;
        let tree = Some(prepared.path.as_path());
        // What was staged for publishing goes back to untracked (and then
        // out with `clean`), and the objects staging wrote go: the slot's
        // repository holds nothing of its own between jobs (the commit it
        // is at lives in the mirror).
        let unstaged = match &prepared.commit {
            Some(base) => self.git.run(&git_dir, tree, &["reset", "--quiet", base], None).await.is_ok(),
            None => true,
        };
        let clean = swept
            && unstaged
            && is_real_dir(&prepared.path)
            && self.git.run(&git_dir, tree, &["clean", "-ffdxq"], None).await.is_ok()
            && {
                let (work, repo) = (prepared.path.clone(), git_dir.clone());
                blocking(move || {
                    sweep::normalize(&work)?;
                    drop_own_objects(&repo)
                })
                .await
                .is_ok()
            };
        if self.pool_cap == 0 || !clean {
            self.discard(&slot, Some(&mirror)).await;
            return;
        }
        // The index written at checkout is older than nothing in the tree
        // ("racily clean"), so the next checkout would re-hash every file:
        // refreshing it now, off the next job's clock, saves that (0.5 s for
        // 80 MB). It exits 1 when files changed; the reset takes care of them.
        let _ = self.git.run(&git_dir, tree, &["update-index", "-q", "--refresh"], None).await;
        let evicted = {
            let mut idle = self.idle();
            idle.push_back(Idle { repo, path: slot, mirror });
            let mut evicted = Vec::new();
            while idle.len() > self.pool_cap {
                evicted.extend(idle.pop_front());
            }
            evicted
        };
        for slot in evicted {
            self.discard(&slot.path, Some(&slot.mirror)).await;
        }
    }
}

mod change;
mod git;
mod mirror;
pub(crate) mod sweep;

use git::*;

/// A guard even on a mutex a panicking thread poisoned: the state behind
/// these locks is valid after any partial update.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `(name, path)` of the folders in `dir`.
async fn list_dirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return out };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if entry.file_type().await.is_ok_and(|t| t.is_dir()) {
            out.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
        }
    }
    out
}

fn split_repo(repo: &str) -> Result<(&str, &str), WorkspaceError> {
    crate::event::split_repo_name(repo).ok_or_else(|| WorkspaceError::BadRepository(repo.to_string()))
}

/// The folder a GitLab project's mirror and slots live under.
const GITLAB_FOLDER: &str = "@gitlab";

/// What a repository's mirror and pool slots are named by, always two
/// levels as their folders are: `owner/name` on GitHub;
/// `@gitlab/group~sub~project` on GitLab (`~` is not allowed in a GitLab
/// path, `@` not in a GitHub owner, so no two repositories share one).
fn repo_key(forge: Forge, repo: &str) -> Result<String, WorkspaceError> {
    let bad = || WorkspaceError::BadRepository(repo.to_string());
    match forge {
        Forge::GitHub(_) => split_repo(repo).map(|_| repo.to_string()),
        Forge::GitLab(_) => {
            crate::event::split_project_path(repo).ok_or_else(bad)?;
            Ok(format!("{GITLAB_FOLDER}/{}", repo.replace('/', "~")))
        }
    }
}

/// Whether a pool slot's key names a repository (see `repo_key`).
fn valid_key(key: &str) -> bool {
    match key.strip_prefix(GITLAB_FOLDER).and_then(|k| k.strip_prefix('/')) {
        Some(path) => crate::event::split_project_path(&path.replace('~', "/")).is_some(),
        None => split_repo(key).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gitlinks_the_base_lacked_are_new() {
        let z = "\0";
        let raw = format!(
            ":000000 160000 0000 abcd A{z}vendor/lib{z}:100644 100644 aaaa bbbb M{z}README.md{z}\
             :160000 160000 1111 2222 M{z}kept{z}:100644 160000 3333 4444 T{z}was-a-file{z}"
        );
        assert_eq!(new_gitlinks(&raw), ["vendor/lib", "was-a-file"]);
        assert!(new_gitlinks("").is_empty());
    }

    #[test]
    fn repository_names_cannot_escape_the_mirror_folder() {
        assert!(split_repo("acme/widgets").is_ok());
        assert!(split_repo("Codertocat/Hello-World").is_ok());
        for bad in ["../x", "a/..", "a/b/c", "a", "/b", "a/b c"] {
            assert!(split_repo(bad).is_err(), "{bad}");
        }
    }
}
