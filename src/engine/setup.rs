//! A job's environment (`[environments.NAME]`): the setup phase before the
//! agent, and the cache it fills.
//!
//! - The setup runs sandboxed like the agent, but with the environment's
//!   own hosts (`setup_network`), secrets (`setup_env`) and timeout; its
//!   output goes in the job's log under its own heading. A failure ends the
//!   attempt with outcome `setup` before the agent runs.
//! - A cache is filled once per key (`crate::cache`): a hit skips the setup.
//!   Before a filled cache counts, it and the workspace are searched for
//!   every `setup_env` value; one found fails the job and the cache is
//!   dropped, so a secret never reaches the agent through a file.
//! - The agent and `verify` get a copy of the cache made for the attempt,
//!   read-write at the cache paths, and the environment's image.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::agent::{self, Invocation};
use super::attempt::{failed, AttemptEnd, Report};
use super::Engine;
use crate::cache::{Caches, KeyParts};
use crate::config::{AgentDef, Environment, PromptMode, ResultMode};
use crate::domain::Outcome;
use crate::store::Job;
use crate::workspace;

/// Key files larger than this count by their first bytes only.
const MAX_KEY_FILE: u64 = 64 << 20;

/// What the agent phase is given of its environment.
#[derive(Debug, Default, Clone)]
pub(super) struct Ready {
    /// The attempt's copy of each cache path: (host folder, path inside).
    pub(super) caches: Vec<(PathBuf, PathBuf)>,
    pub(super) image: Option<PathBuf>,
}

impl Engine {
    /// Runs the job's environment's setup (or finds its cache) and returns
    /// what the agent phase sees; `Err` ends the attempt.
    pub(super) async fn environment(
        &self,
        job: &Job,
        agent: &AgentDef,
        prepared: &workspace::Prepared,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> Result<Ready, AttemptEnd> {
        let spec = &job.spec;
        let Some(env) = self.config.environment_for(spec.environment.as_deref(), spec.repo.as_deref()) else {
            return Ok(Ready::default());
        };
        let repo = spec.repo.as_deref().unwrap_or("-");
        let repo_script = match (env.repo_setup, spec.repo.as_deref()) {
            (true, Some(repo)) => {
                let default = spec.default_branch.as_deref().unwrap_or("HEAD");
                self.workspaces
                    .default_branch_file(prepared, repo, spec.access, default, crate::config::REPO_SETUP)
                    .await
            }
            _ => None,
        };
        self.log_line(&job.id, &format!("== environment `{}` ==", env.name)).await;
        let image = env.image.clone();
        let sandboxed = self.sandbox.is_some();
        if env.cache.is_empty() || !sandboxed {
            if !env.cache.is_empty() {
                self.log_line(&job.id, "setup: no cache without the sandbox ([sandbox] enabled = false)").await;
            }
            if env.has_setup() {
                self.setup(job, agent, env, prepared, repo_script.as_deref(), &[], cancel, report).await?;
                self.check_secrets(job, env, prepared, None).await?;
            }
            return Ok(Ready { caches: Vec::new(), image });
        }

        let files = key_files(&prepared.path, &env.cache_key).await;
        let scope = cache_scope(&spec.workspace);
        let key = KeyParts {
            repo,
            scope: &scope,
            environment: &env.name,
            setup: &env.setup,
            paths: &env.cache,
            repo_script: repo_script.as_deref(),
            files: &files,
        }
        .key();
        let caches = Caches::new(&self.config.storage.path);
        let held = match caches.lock(&key, cancel.cancelled()).await {
            Ok(Some(held)) => held,
            Ok(None) => return Err(AttemptEnd::Cancelled),
            Err(e) => return Err(failed(Outcome::Setup, None, format!("setup: {e}"), false)),
        };
        match held.meta() {
            Some(meta) => {
                self.log_line(&job.id, &format!("setup: cache hit {key}")).await;
                if let Err(e) = held.touch(&meta) {
                    tracing::warn!(error = %e, "Could not note the cache's use.");
                }
            }
            None => {
                self.log_line(&job.id, &format!("setup: cache miss {key}; running the setup")).await;
                let owner = self.sandbox.as_ref().and_then(|s| s.owner());
                if let Err(e) = held.begin_fill(env.cache.len(), owner) {
                    return Err(failed(Outcome::Setup, None, format!("setup: {e}"), false));
                }
                let mounts: Vec<(PathBuf, PathBuf)> =
                    env.cache.iter().enumerate().map(|(i, inside)| (held.data(i), inside.clone())).collect();
                let ran = self.setup(job, agent, env, prepared, repo_script.as_deref(), &mounts, cancel, report).await;
                let checked = match ran {
                    Ok(()) => self.check_secrets(job, env, prepared, Some(&held.data_root())).await,
                    Err(end) => Err(end),
                };
                if let Err(end) = checked {
                    let _ = tokio::task::spawn_blocking(move || held.remove()).await;
                    return Err(end);
                }
                if let Err(e) = held.finish_fill(repo, &env.name, &env.cache) {
                    return Err(failed(Outcome::Setup, None, format!("setup: {e}"), false));
                }
                self.log_line(&job.id, &format!("setup: cached as {key}")).await;
            }
        }
        let copy = self.job_dir(&job.id).join("cache");
        let copied = {
            let copy = copy.clone();
            tokio::task::spawn_blocking(move || held.copy_to(&copy)).await
        };
        match copied {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(failed(Outcome::Setup, None, format!("setup: {e}"), true)),
            Err(e) => return Err(failed(Outcome::Setup, None, format!("setup: {e}"), true)),
        }
        let (retention, max) = (self.config.storage.cache_retention, self.config.storage.cache_max);
        tokio::task::spawn_blocking(move || {
            for key in caches.evict(retention, max) {
                tracing::info!(key = %key, "Removed an environment cache (unused too long, or over storage.cache_max).");
            }
        });
        Ok(Ready {
            caches: env
                .cache
                .iter()
                .enumerate()
                .map(|(i, inside)| (copy.join(i.to_string()), inside.clone()))
                .collect(),
            image,
        })
    }

    /// The setup itself: the environment's commands, then the repository's
    /// script, in one shell that stops at the first failure.
    #[allow(clippy::too_many_arguments)]
    async fn setup(
        &self,
        job: &Job,
        agent: &AgentDef,
        env: &Environment,
        prepared: &workspace::Prepared,
        repo_script: Option<&str>,
        mounts: &[(PathBuf, PathBuf)],
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> Result<(), AttemptEnd> {
        let dir = self.job_dir(&job.id);
        let mut script = String::from("set -e\n");
        for command in &env.setup {
            script.push_str(command);
            script.push('\n');
        }
        let mut files = Vec::new();
        if let Some(text) = repo_script {
            script.push_str("sh \"$(dirname \"$0\")/repo-setup.sh\"\n");
            files.push(("repo-setup.sh".to_string(), text.to_string()));
            self.log_line(&job.id, &format!("setup: running {} from the default branch", crate::config::REPO_SETUP))
                .await;
        }
        let mut profile = agent.sandbox.clone();
        profile.network = env.setup_network.clone();
        profile.read_write.clear();
        let def = AgentDef {
            name: "setup".into(),
            command: vec!["/bin/sh".into(), "-e".into(), "{{ prompt_file }}".into()],
            prompt: PromptMode::File,
            result: ResultMode::Stdout,
            // Not the agent's names: a preset passes its model key, which
            // the workspace's install scripts have no business seeing. The
            // setup's own secrets come below.
            env: Vec::new(),
            vars: Default::default(),
            timeout: env.setup_timeout,
            install: None,
            max_parallel: None,
            sandbox: profile,
            usage: crate::config::UsageFormat::None,
            model: None,
            cli: None,
        };
        let extra = super::cli_setup::Setup {
            env: env.setup_env.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect(),
            files,
            ..Default::default()
        };
        let shown = Ready { caches: mounts.to_vec(), image: env.image.clone() };
        let confine = self.confinement(job, "setup", prepared.objects.as_ref(), &shown);
        let inv = Invocation {
            agent: &def,
            prompt: &script,
            workdir: &prepared.path,
            job_dir: &dir.join("setup-io"),
            log: &dir.join("log"),
            timeout: env.setup_timeout,
            output_cap: agent::DEFAULT_OUTPUT_CAP,
            cancel,
            on_spawn: None,
            confine,
            budget: None,
            setup: Some(&extra),
        };
        self.log_line(&job.id, "== setup ==").await;
        let started = std::time::Instant::now();
        let ran = inv.run().await;
        report.phases.setup_ms = Some(started.elapsed().as_millis() as u64);
        // Its io folder and HOME may hold what its secrets wrote (a
        // registry's credentials file): gone before the agent starts.
        let leftovers = [dir.join("setup-io"), dir.join("setup-run")];
        let _ = tokio::task::spawn_blocking(move || leftovers.iter().try_for_each(|d| crate::tree::remove(d))).await;
        let run = match ran {
            Ok(run) => run,
            Err(e) => return Err(failed(Outcome::Setup, None, format!("setup could not run: {e}"), false)),
        };
        report.egress_blocked.extend(run.egress_blocked.iter().cloned());
        let why = match &run.ending {
            agent::Ending::Exited(Some(0)) => {
                self.log_line(&job.id, "== setup done ==").await;
                return Ok(());
            }
            agent::Ending::Cancelled => return Err(AttemptEnd::Cancelled),
            agent::Ending::Exited(code) => format!("exit {}", agent::describe_exit(*code)),
            agent::Ending::TimedOut(d) => format!("timeout after {}", crate::config::format_duration(*d)),
            agent::Ending::Limit(hit) => format!("stopped at its {} cap", hit.key()),
            agent::Ending::OverBudget => "over budget".into(),
        };
        let error =
            format!("setup of environment `{}` failed ({why}); the agent did not run; see the job log", env.name);
        let code = match run.ending {
            agent::Ending::Exited(code) => code,
            _ => None,
        };
        Err(failed(Outcome::Setup, code, error, false))
    }

    /// Fails the job when a `setup_env` value is in the cache or the
    /// workspace (where the agent would read it).
    async fn check_secrets(
        &self,
        job: &Job,
        env: &Environment,
        prepared: &workspace::Prepared,
        cache: Option<&std::path::Path>,
    ) -> Result<(), AttemptEnd> {
        if env.setup_env.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = env.setup_env.keys().cloned().collect();
        let values: Vec<Vec<u8>> = env.setup_env.values().map(|v| v.expose().as_bytes().to_vec()).collect();
        let places: Vec<(PathBuf, &'static str)> = cache
            .map(|c| (c.to_path_buf(), "the cache"))
            .into_iter()
            .chain([(prepared.path.clone(), "the workspace")])
            .collect();
        let found = tokio::task::spawn_blocking(move || {
            let needles: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            places
                .iter()
                .find_map(|(dir, what)| crate::cache::find_any(dir, &needles, &[]).map(|(path, i)| (*what, path, i)))
        })
        .await
        .ok()
        .flatten();
        match found {
            None => Ok(()),
            Some((what, path, i)) => {
                let name = names.get(i).map(String::as_str).unwrap_or("?");
                let error = format!(
                    "setup left the value of setup_env `{name}` in {what} ({}); the agent did not run and the cache was dropped",
                    path.display()
                );
                self.log_line(&job.id, &format!("setup: {error}")).await;
                Err(failed(Outcome::Setup, None, error, false))
            }
        }
    }
}

/// Whose code a cache may be filled by. Only the default branch's is
/// trusted to fill a cache other jobs share; a pull request's head fills
/// its own (a hostile one poisons nothing but itself), and a bare commit
/// (a check's or a delegated child's head) one per commit.
fn cache_scope(workspace: &crate::rules::Workspace) -> String {
    use crate::rules::Workspace;
    match workspace {
        Workspace::None => "empty".into(),
        Workspace::DefaultBranch { .. } => "default-branch".into(),
        Workspace::PrHead { number, .. } => format!("pull-request-{number}"),
        Workspace::HeadSha { sha, .. } => format!("commit-{sha}"),
    }
}

/// The key files' contents as the workspace has them; one that is a link,
/// or leads outside the workspace, counts as absent.
async fn key_files(root: &std::path::Path, names: &[String]) -> Vec<(String, Option<Vec<u8>>)> {
    let root = root.to_path_buf();
    let names = names.to_vec();
    tokio::task::spawn_blocking(move || {
        names
            .into_iter()
            .map(|name| {
                let contents = read_inside(&root, &name);
                (name, contents)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

fn read_inside(root: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let root = root.canonicalize().ok()?;
    let path = root.join(name);
    let parent = path.parent()?.canonicalize().ok()?;
    if !parent.starts_with(&root) {
        return None;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(parent.join(path.file_name()?))
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut out = Vec::new();
    file.take(MAX_KEY_FILE).read_to_end(&mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::cache_scope;
    use crate::rules::Workspace;

    /// Only the default branch's code fills a cache other jobs share: a
    /// pull request's, a check's or a delegated child's head fills its own.
    #[test]
    fn only_the_default_branch_shares_its_cache_scope() {
        let branch = cache_scope(&Workspace::DefaultBranch { branch: "main".into() });
        let pr = |number| cache_scope(&Workspace::PrHead { number, sha: None, base: None, pinned: false });
        let commit = |sha: &str| cache_scope(&Workspace::HeadSha { sha: sha.into(), branch: Some("main".into()) });
        assert_eq!(branch, cache_scope(&Workspace::DefaultBranch { branch: "main".into() }));
        assert_eq!(pr(7), pr(7));
        let scopes = [branch, pr(7), pr(8), commit("aaaa"), commit("bbbb"), cache_scope(&Workspace::None)];
        for (i, a) in scopes.iter().enumerate() {
            for b in &scopes[i + 1..] {
                assert_ne!(a, b, "two kinds of code share a cache scope");
            }
        }
    }
}
