//! The engine: takes queued jobs from the store and runs them, phase by
//! phase — prepare (workspace), run (agent), verify — recording every state
//! change, then hands results to the publisher through the store's outbox.
//!
//! This file holds the `Engine` and its wiring. What changes together lives
//! together: `dispatch.rs` (claims, leases and the reaper, recovery, log
//! shipping, drain and cancel), `attempt.rs` (one job's attempts: prepare,
//! run, verify, the hand-off to publishing), `push.rs` (what leaves with an
//! agent's change), `chain.rs` (a job's end sent back through the rules).
//!
//! The dispatcher is the only task that claims jobs, so a job is claimed once.
//! A job's attempts run on one worker; a failed attempt is retried with
//! backoff while attempts are left, with verification feedback in its prompt.
//! The engine never talks to GitHub and never imports the publisher: what a
//! job's start and end put in the outbox is planned by a `PlanOutbox` the
//! daemon gives it, and stored with the job's state.

pub mod agent;
mod attempt;
mod chain;
pub(crate) mod cli_setup;
mod dispatch;
mod push;
mod setup;
pub mod space;
pub mod team;
pub mod usage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::domain::{NoOutbox, PlanOutbox};
use crate::rules::{JobSpec, RuleSet, SharedRules};
use crate::store::{Job, Store, StoreError};
use crate::workspace::Workspaces;
use dispatch::RunningJob;

/// Runs jobs.
pub struct Engine {
    store: Store,
    /// For the events of jobs that end (chaining).
    rules: SharedRules,
    config: Arc<Config>,
    workspaces: Workspaces,
    /// Woken by ingress (new jobs) and by the API (retry).
    wake: Arc<Notify>,
    /// Woken when a publication is written to the outbox.
    publish_wake: Arc<Notify>,
    /// What a job's start and end put in the outbox: the publisher's
    /// planner, given by the daemon (`with_outbox`); nothing by default.
    outbox: Arc<dyn PlanOutbox>,
    /// GitLab's API, for the logs of a failed pipeline's jobs.
    gitlab: Option<Arc<crate::forge::gitlab::api::Client>>,
    /// Running jobs by id.
    running: Mutex<HashMap<String, RunningJob>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Scrubs secrets from results and errors before anyone sees them.
    redactor: crate::redact::Redactor,
    /// Set when the daemon stops: a job stopped now is left `running`, to be
    /// resumed at the next start, rather than recorded as cancelled.
    stopping: std::sync::atomic::AtomicBool,
    /// Running jobs cancelled by a newer job of their group: id → that job.
    superseded: Mutex<HashMap<String, String>>,
    /// How long a claimed job stays claimed without its worker renewing.
    lease: Duration,
    /// Confines every agent and verify run; `None` only when the config
    /// turned it off.
    sandbox: Option<Arc<crate::sandbox::Sandbox>>,
    /// The storage folder's free-space floor.
    space: Arc<space::Space>,
    /// The tokens of runs that may hand subtasks to baton (`[job] delegate`).
    grants: team::Grants,
    /// Where baton's API listens: what a team's `/mcp` is forwarded to.
    api_addr: Option<std::net::SocketAddr>,
}

impl Engine {
    /// The configuration it runs jobs by.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn new(
        store: Store,
        rules: SharedRules,
        config: Arc<Config>,
        wake: Arc<Notify>,
        publish_wake: Arc<Notify>,
        credentials: Option<Arc<crate::forge::github::auth::Credentials>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Engine {
        let redactor = crate::redact::Redactor::new(config.secrets());
        Engine {
            outbox: Arc::new(NoOutbox),
            lease: config.limits.job_lease,
            metrics,
            redactor,
            rules,
            workspaces: Workspaces::new(
                &config.storage.path,
                vec![crate::workspace::Remote {
                    forge: crate::forge::Forge::GITHUB,
                    git_url: config.github.git_url.clone(),
                    credentials: credentials.map(crate::workspace::GitCredentials::GitHub),
                }],
                config.storage.worktree_pool,
                config.storage.git_timeout,
            ),
            store,
            space: space::Space::new(config.storage.path.clone(), config.storage.min_free, wake.clone()),
            config,
            wake,
            publish_wake,
            gitlab: None,
            running: Mutex::new(HashMap::new()),
            superseded: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            sandbox: None,
            grants: team::Grants::default(),
            api_addr: None,
        }
    }

    /// Serves `[gitlab]`'s repositories too, when it is configured, and
    /// reads failed CI jobs' logs for repairs through `api`.
    pub fn with_gitlab_from(
        mut self,
        gitlab: Option<&crate::config::GitLabSettings>,
        api: Option<Arc<crate::forge::gitlab::api::Client>>,
    ) -> Engine {
        self.gitlab = api;
        if let Some(g) = gitlab {
            self.workspaces.add_remote(crate::workspace::Remote {
                forge: crate::forge::Forge::GITLAB,
                git_url: g.git_url.clone(),
                credentials: Some(crate::workspace::GitCredentials::Token(g.token.clone())),
            });
        }
        self
    }

    /// Plans what each job's start and end put in the outbox (the
    /// publisher's planner); without it nothing is planned.
    /// What a job's end puts in the outbox, as this engine plans it.
    pub(crate) fn outbox(&self) -> Arc<dyn PlanOutbox> {
        self.outbox.clone()
    }

    pub(crate) fn with_outbox(mut self, outbox: Arc<dyn PlanOutbox>) -> Engine {
        self.outbox = outbox;
        self
    }

    /// The address baton's API listens on, which the agents of a team reach
    /// its `/mcp` through.
    pub(crate) fn with_api_addr(mut self, addr: std::net::SocketAddr) -> Engine {
        self.api_addr = Some(addr);
        self
    }

    /// The storage folder's free-space floor (its loop is the daemon's to run).
    pub fn space(&self) -> &Arc<space::Space> {
        &self.space
    }

    /// The live tokens of team runs, which the API checks callers against.
    pub(crate) fn grants(&self) -> &team::Grants {
        &self.grants
    }

    /// Runs every agent and verify command in `sandbox`; without it (the
    /// config turned it off, or a test of something else) they run
    /// unconfined, with a warning in every job's log.
    pub(crate) fn with_sandbox(mut self, sandbox: Option<Arc<crate::sandbox::Sandbox>>) -> Engine {
        if let Some(s) = &sandbox {
            self.workspaces.confine(s.owner());
        }
        self.sandbox = sandbox;
        self
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        job_dir(&self.config.storage.path, id)
    }

    /// Garbage-collects the mirrors fetched into since the last call.
    pub(crate) async fn gc_mirrors(&self) {
        self.workspaces.gc().await;
    }

    /// `text` with every secret baton knows of replaced.
    pub fn redact(&self, text: &str) -> String {
        self.redactor.redact(text)
    }

    /// Adds a line of baton's own to a job's log.
    pub(crate) async fn note(&self, id: &str, line: &str) {
        self.log_line(id, line).await
    }

    async fn log_line(&self, id: &str, line: &str) {
        let path = self.job_dir(id).join("log");
        let text = format!("[baton] {line}\n");
        // Open, write and close in one trip to the blocking pool, not three.
        let _ = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            std::fs::OpenOptions::new().create(true).append(true).open(&path)?.write_all(text.as_bytes())
        })
        .await;
    }
}

/// Runs jobs to their end in this process, publishing nothing (`simulate
/// --run`). `config.storage.path` should be a scratch folder.
pub async fn run_locally(
    config: Config,
    specs: Vec<JobSpec>,
    sandbox: Option<Arc<crate::sandbox::Sandbox>>,
) -> Result<Vec<Job>, StoreError> {
    let store = Store::open(&config.storage.path)?;
    let rules = SharedRules::new(RuleSet::empty(&config), Vec::new());
    let engine = Engine::new(
        store.clone(),
        rules,
        Arc::new(config),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        None,
        Arc::default(),
    )
    .with_sandbox(sandbox);
    let mut out = Vec::new();
    for spec in specs {
        let now = Utc::now();
        let mut job = Job::new(crate::store::job_id("simulated", &spec.trigger), 0, "simulated".into(), spec, now);
        job.start_attempt(now);
        let id = job.id.clone();
        engine.execute(job, CancellationToken::new(), &std::sync::atomic::AtomicU64::new(0)).await;
        out.extend(store.job(&id).await?);
    }
    Ok(out)
}

pub fn job_dir(storage: &std::path::Path, id: &str) -> PathBuf {
    storage.join("jobs").join(id)
}
