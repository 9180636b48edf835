//! One job's attempts: prepare the workspace, run the agent, verify, and
//! hand the result to publishing (pushing the change where the output says,
//! then storing the job's end with what the outbox planner makes of it).
//! Retries with backoff, the prompt (conventions, review diff, feedback),
//! team tokens, and the wording of every failure. Whether a run's end fails
//! the attempt, and whether to retry, is `domain::outcome`'s to decide.

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::agent::{self, Ending, Invocation};
use super::push::Pushed;
use super::{cli_setup, team, usage, Engine};
use crate::config::{format_duration, AgentDef, PromptMode, ResultMode};
use crate::domain::outcome::{self, RunEnd, Stop, Verdict};
use crate::rules::{JobSpec, OutputKind};
use crate::store::{Job, JobState, Outcome, Phases};
use crate::workspace;

/// How much of a failed verification's output the next prompt carries.
const FEEDBACK_BYTES: usize = 4000;

/// What an attempt reports besides how it ended.
#[derive(Default)]
pub(super) struct Report {
    pub(super) phases: Phases,
    pub(super) egress_blocked: Vec<crate::sandbox::egress::Blocked>,
    pub(super) usage: Option<crate::store::Usage>,
    /// The job's environment as the agent phase sees it (caches, image).
    pub(super) env: super::setup::Ready,
}

/// How one attempt ended.
pub(super) enum AttemptEnd {
    /// The result, and what was pushed with the agent's changes, if anything.
    Succeeded(String, Option<Pushed>),
    Cancelled,
    Failed {
        outcome: Outcome,
        exit_code: Option<i32>,
        error: String,
        /// Whether another attempt could help.
        retry: bool,
        /// Verification output for the next attempt's prompt.
        feedback: Option<String>,
    },
}

/// A repair's prompt carries at most this many failed jobs' logs, and
/// this much of the end of each.
const MAX_CI_LOGS: usize = 5;
const CI_LOG_TAIL: usize = 8 * 1024;

/// The most of `{{ review.diff }}` a prompt carries.
const REVIEW_DIFF_CAP: usize = 200 * 1024;

impl Engine {
    /// Runs a claimed job's attempts until one succeeds, it runs out of
    /// them, or it is cancelled; then stores its end. A job stopped by the
    /// daemon's shutdown is left `running`, to resume at the next start.
    #[tracing::instrument(skip_all, fields(job = %job.id, trigger = %job.trigger))]
    pub(super) async fn execute(
        &self,
        mut job: Job,
        cancel: CancellationToken,
        shipped: &std::sync::atomic::AtomicU64,
    ) {
        tracing::info!(attempt = job.attempts, "Job started.");
        if let Some((why, first)) = self.repair_refused(&job).await {
            self.log_line(&job.id, &why).await;
            let now = Utc::now();
            job.end_attempt(Outcome::ChainLimit, None, Some(why.clone()), now);
            job.end(JobState::Failed, None, Some(why), now);
            // Said once on the pull request; later refusals are quiet.
            let publications = if first { self.outbox.at_end(&job) } else { Vec::new() };
            return self.finish(job, shipped, publications).await;
        }
        let started = self.outbox.at_start(&job);
        if !started.is_empty() {
            job.progress.started = true;
            match self.store.start_publications(&job, &started).await {
                Ok(()) => self.publish_wake.notify_one(),
                Err(e) => tracing::error!(error = %e, "Could not record the job's start publications."),
            }
        }
        let mut feedback: Option<String> = None;
        loop {
            let mut report = Report::default();
            let end = self.attempt(&job, feedback.as_deref(), &cancel, &mut report).await;
            job.record_phases(report.phases);
            job.record_usage(report.usage.take());
            if !report.egress_blocked.is_empty() {
                let n = report.egress_blocked.iter().map(|b| b.count).sum();
                self.metrics.egress_blocked(&job.spec.agent, n);
                job.record_egress(report.egress_blocked);
            }
            let now = Utc::now();
            match end {
                AttemptEnd::Succeeded(result, pushed) => {
                    if let Some(p) = pushed {
                        job.branch = Some(p.branch);
                        job.commit = Some(p.commit);
                    }
                    job.end_attempt(Outcome::Exit, Some(0), None, now);
                    job.end(JobState::Succeeded, Some(result), None, now);
                }
                AttemptEnd::Cancelled if self.stopping.load(std::sync::atomic::Ordering::SeqCst) => {
                    // The daemon is stopping: the job stays `running` in the
                    // store and the next start requeues it as interrupted.
                    tracing::info!("Job stopped by shutdown; it resumes at the next start.");
                    return;
                }
                AttemptEnd::Cancelled => {
                    job.end_attempt(Outcome::Cancelled, None, None, now);
                    let by = self.superseded.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.id);
                    let why = match &by {
                        Some(by) => format!("cancelled: superseded by job {by}"),
                        None => "cancelled".into(),
                    };
                    job.displaced_by = by;
                    job.end(JobState::Cancelled, None, Some(why), now);
                }
                AttemptEnd::Failed { outcome, exit_code, error, retry, feedback: fb } => {
                    job.end_attempt(outcome, exit_code, Some(error.clone()), now);
                    if retry && job.attempts_left() {
                        let base = job.spec.backoff_secs.map(Duration::from_secs).unwrap_or(DEFAULT_BACKOFF);
                        let wait = backoff(base, job.counted_attempts());
                        tracing::warn!(error = %error, retry_in = %format_duration(wait), "Attempt failed; retrying.");
                        self.log_line(
                            &job.id,
                            &format!("attempt {} failed: {error}; retrying in {}", job.attempts, format_duration(wait)),
                        )
                        .await;
                        if let Err(e) = self.store.save(&job).await {
                            tracing::error!(error = %e, "Could not record the failed attempt.");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = cancel.cancelled() => {
                                job.end(JobState::Cancelled, None, Some("cancelled".into()), Utc::now());
                                break;
                            }
                        }
                        feedback = fb;
                        job.start_attempt(Utc::now());
                        if let Err(e) = self.store.save(&job).await {
                            tracing::error!(error = %e, "Could not record the new attempt.");
                        }
                        continue;
                    }
                    job.end(JobState::Failed, None, Some(error), now);
                }
            }
            break;
        }
        // What an agent says goes to the API and to GitHub: never with a secret in it.
        job.result = job.result.as_deref().map(|r| self.redactor.redact(r));
        job.error = job.error.as_deref().map(|e| self.redactor.redact(e));
        for a in &mut job.history {
            a.error = a.error.as_deref().map(|e| self.redactor.redact(e));
        }
        let publications = self.outbox.at_end(&job);
        self.finish(job, shipped, publications).await
    }

    /// Stores a job's end with what it publishes, and sends the end through
    /// the rules.
    async fn finish(
        &self,
        job: Job,
        shipped: &std::sync::atomic::AtomicU64,
        publications: Vec<crate::domain::Publication>,
    ) {
        // The whole log is in a shared store before the job reads as ended
        // there: a follower on another replica then misses no line.
        self.ship_log_once(&job.id, shipped).await;
        match self.store.finish(&job, &publications).await {
            Ok(()) => {
                tracing::info!(state = %job.state, error = job.error.as_deref().unwrap_or(""), "Job finished.");
                let seconds = job
                    .started_at
                    .zip(job.finished_at)
                    .map(|(a, b)| (b - a).num_milliseconds().max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                self.metrics.job_finished(&job.trigger, job.state.as_str(), seconds);
                if !publications.is_empty() {
                    self.publish_wake.notify_one();
                }
                self.emit_end(&job).await;
                if !job.spec.delegate.is_empty() {
                    self.cancel_children(&job).await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "Could not store the job's end; it will rerun after a restart.")
            }
        }
    }

    /// One attempt: prepare, run, verify.
    async fn attempt(
        &self,
        job: &Job,
        feedback: Option<&str>,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> AttemptEnd {
        let phases = &mut report.phases;
        let spec = &job.spec;
        let limit = self.config.limits.max_chain_depth;
        if spec.chain_depth > limit {
            let why = format!(
                "chain depth limit reached: this job was started by {} job ends in a row, and limits.max_chain_depth is {limit}",
                spec.chain_depth
            );
            return failed(Outcome::ChainLimit, None, why, false);
        }
        let Some(agent) = self.config.agents.get(&spec.agent) else {
            return failed(
                Outcome::SpawnFailed,
                None,
                format!("agent `{}` is not defined in the configuration", spec.agent),
                false,
            );
        };
        let dir = self.job_dir(&job.id);
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return failed(Outcome::PrepareFailed, None, format!("cannot create {}: {e}", dir.display()), true);
        }
        if self.sandbox.is_none() {
            self.log_line(&job.id, UNSANDBOXED_WARNING).await;
        }
        self.log_line(&job.id, &format!("attempt {}: preparing workspace", job.attempts)).await;
        let started = std::time::Instant::now();
        let prepared = tokio::select! {
            p = self.workspaces.prepare(&job.id, spec.forge, spec.repo.as_deref(), spec.access, &spec.workspace) => p,
            _ = cancel.cancelled() => return AttemptEnd::Cancelled,
        };
        phases.prepare_ms = Some(started.elapsed().as_millis() as u64);
        let prepared = match prepared {
            Ok(p) => p,
            // Another attempt would find the head moved all the same.
            Err(e @ workspace::WorkspaceError::HeadMoved { .. }) => {
                return failed(Outcome::PrepareFailed, None, format!("preparing the workspace failed: {e}"), false)
            }
            Err(e) => {
                return failed(Outcome::PrepareFailed, None, format!("preparing the workspace failed: {e}"), true)
            }
        };
        if let Some(commit) = &prepared.commit {
            let how = if prepared.recycled { " (a recycled worktree, reset)" } else { "" };
            self.log_line(&job.id, &format!("workspace at {commit}{how}")).await;
        }
        let mut skills: Vec<(String, String)> = spec.skills.clone();
        if let (Some(repo), Some(default)) = (spec.repo.as_deref(), spec.default_branch.as_deref()) {
            skills.extend(self.workspaces.conventions(&prepared, repo, spec.access, default).await);
        }
        let mut prompt = prompt_for(spec, &skills, feedback);
        if prompt.contains(crate::rules::REVIEW_DIFF) {
            let diff = match &spec.review_since {
                Some(since) => match self.workspaces.diff_since(&prepared, spec.access, since, REVIEW_DIFF_CAP).await {
                    Ok(diff) => diff,
                    Err(e) => format!("(the changes since {since} could not be read here: {e})"),
                },
                None => String::new(),
            };
            prompt = prompt.replace(crate::rules::REVIEW_DIFF, &diff);
        }
        if let Some(logs) = self.failed_ci_logs(spec).await {
            prompt.push_str(&logs);
        }
        let end = match self.environment(job, agent, &prepared, cancel, report).await {
            Ok(ready) => {
                report.env = ready;
                self.run_in(job, agent, &prepared, &prompt, cancel, report).await
            }
            Err(end) => end,
        };
        report.env = Default::default();
        self.workspaces.release(prepared).await;
        // The runs' io folders were the agents' to write: what they hold is
        // read by now, and a job's folder keeps only baton's own files (the
        // cache's copy was the attempt's alone).
        let io = [dir.join("io"), dir.join("verify-io"), dir.join("cache")];
        let _ = tokio::task::spawn_blocking(move || io.iter().try_for_each(|d| crate::tree::remove(d))).await;
        end
    }

    /// For a repair of a failed GitLab pipeline: the tail of each failed
    /// job's log, redacted, as a section of the prompt (what the agent would
    /// open first). Nothing when GitLab cannot say; the job still runs.
    async fn failed_ci_logs(&self, spec: &crate::rules::JobSpec) -> Option<String> {
        let (Some(gl), Some(run), Some(repo)) = (&self.gitlab, spec.ci_run, spec.repo.as_deref()) else { return None };
        if !matches!(spec.forge, crate::forge::Forge::GitLab(_)) || !spec.is_repair() {
            return None;
        }
        let jobs = match gl.failed_jobs(repo, run).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, pipeline = run, "Could not list the pipeline's failed jobs.");
                return None;
            }
        };
        let mut out = format!("\n\n## Failed jobs of pipeline {run} (the end of each log)\n");
        for job in jobs.iter().take(MAX_CI_LOGS) {
            let tail = match gl.job_trace_tail(repo, job.id, CI_LOG_TAIL).await {
                Ok(t) => self.redactor.redact(&t),
                Err(e) => format!("(the log could not be read: {e})"),
            };
            let fence = "`".repeat(tail.split(|c| c != '`').map(str::len).max().unwrap_or(0).max(2) + 1);
            out.push_str(&format!("\n### {} (stage {})\n{fence}\n{}\n{fence}\n", job.name, job.stage, tail.trim_end()));
        }
        Some(out)
    }

    /// How a team run's agent reaches baton's `/mcp`: through its sandbox's
    /// proxy, which forwards to the API, or straight to the API unconfined.
    fn team_access(&self, token: &str, api: std::net::SocketAddr) -> cli_setup::TeamAccess {
        let mut api = api;
        if api.ip().is_unspecified() {
            let loopback: std::net::IpAddr = match api {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            api.set_ip(loopback);
        }
        let (url, upstream) = match self.sandbox {
            Some(_) => (format!("http://127.0.0.1:{}/mcp", crate::sandbox::PROXY_PORT), Some(api)),
            None => (format!("http://{api}/mcp"), None),
        };
        cli_setup::TeamAccess { url, token: token.to_string(), upstream }
    }

    /// The sandbox for one run of `job` (`kind`: agent or verify), showing
    /// the mirror's `objects` read-only; `None` when the sandbox is off.
    pub(super) fn confinement(
        &self,
        job: &Job,
        kind: &str,
        objects: Option<&PathBuf>,
        env: &super::setup::Ready,
    ) -> Option<agent::Confinement<'_>> {
        let sandbox = self.sandbox.as_deref()?;
        Some(agent::Confinement {
            sandbox,
            name: format!("{}-{}-{kind}", job.id, job.attempts),
            run_dir: self.job_dir(&job.id).join(format!("{kind}-run")),
            objects: objects.cloned(),
            space: Some(self.space.clone()),
            caches: env.caches.clone(),
            image: env.image.clone(),
        })
    }

    async fn run_in(
        &self,
        job: &Job,
        agent: &AgentDef,
        prepared: &workspace::Prepared,
        prompt: &str,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> AttemptEnd {
        let phases = &mut report.phases;
        let spec = &job.spec;
        let workdir = prepared.path.as_path();
        let objects = prepared.objects.as_ref();
        let dir = self.job_dir(&job.id);
        let log = dir.join("log");
        let timeout = spec.timeout_secs.map(Duration::from_secs).unwrap_or(agent.timeout);
        let store = self.store.clone();
        let job_id = job.id.clone();
        let note = move |pgid: i32| {
            let (store, job_id) = (store.clone(), job_id.clone());
            tokio::spawn(async move {
                if let Err(e) = store.note_agent(&job_id, &agent::ProcessIdentity::of(pgid)).await {
                    tracing::warn!(error = %e, "Could not record the agent's process group.");
                }
                store.flush().await
            });
        };
        let io = dir.join("io");
        let budget =
            spec.budget_usd.map(|usd| agent::Budget { usd, prices: std::sync::Arc::new(self.config.prices.clone()) });
        // A team run's token lives as long as this run.
        let pass = (!spec.delegate.is_empty()).then(|| self.grants.mint(team::Grant::of(job)));
        let access = match (&pass, self.api_addr) {
            (None, _) => None,
            (Some(pass), Some(addr)) => pass.token().map(|token| self.team_access(token, addr)),
            (Some(_), None) => None,
        };
        if pass.is_some() && access.is_none() {
            let why = "this job may delegate, but baton has no token or API address to give its agent";
            return failed(Outcome::SpawnFailed, None, why.into(), false);
        }
        let sandboxed = self.sandbox.is_some();
        // The CLI is told where its files are as it sees them.
        let visible_io = if sandboxed { PathBuf::from(crate::sandbox::IO_PATH) } else { io.clone() };
        let setup = cli_setup::setup(agent, &spec.mcp, &self.config.mcp, &visible_io, sandboxed, access.as_ref());
        let setup = match setup {
            Ok(mut setup) => {
                // A server's arguments never show the agent baton's own files.
                let hidden = self.config.hidden_paths();
                for s in setup.iter_mut() {
                    s.expose.retain(|p| !hidden.iter().any(|h| p.starts_with(h)));
                }
                setup
            }
            Err(e) => return failed(Outcome::SpawnFailed, None, e.to_string(), false),
        };
        let inv = Invocation {
            agent,
            prompt,
            workdir,
            job_dir: &io,
            log: &log,
            timeout,
            output_cap: agent::DEFAULT_OUTPUT_CAP,
            cancel,
            on_spawn: Some(&note),
            confine: self.confinement(job, "agent", objects, &report.env),
            budget: budget.as_ref(),
            setup: setup.as_ref(),
        };
        self.log_line(&job.id, &format!("running agent `{}`", agent.name)).await;
        let started = std::time::Instant::now();
        let run = inv.run().await;
        phases.run_ms = Some(started.elapsed().as_millis() as u64);
        let _ = self.store.forget_agent(&job.id).await;
        let run = match run {
            Ok(r) => r,
            Err(e) => return failed(Outcome::SpawnFailed, None, e.to_string(), false),
        };
        report.egress_blocked.extend(run.egress_blocked.iter().cloned());
        if let Some(used) = inv.usage(&run).await {
            let used = usage::priced_by(used, agent.model.as_deref(), &self.config.prices);
            self.metrics.usage(&job.trigger, &agent.name, &used);
            if let Some(usd) = used.cost_usd.filter(|c| *c > 0.0) {
                if let Err(e) = self.store.record_spend(spec, usd).await {
                    tracing::error!(error = %e, "Could not count what the run spent against the daily budgets.");
                }
            }
            report.usage = Some(used);
        }
        let spent = report.usage.as_ref().and_then(|u| u.cost_usd);
        let end = run.end(budget.as_ref().map(|b| b.usd), spent);
        match outcome::agent_run(&end) {
            Verdict::Passed => {}
            Verdict::Cancelled => return AttemptEnd::Cancelled,
            Verdict::Failed { outcome, exit_code, retry } => {
                let why = self.agent_failure(agent, &run, outcome, budget.as_ref(), spent);
                return failed(outcome, exit_code, why, retry);
            }
        }
        let result = match inv.result(&run).await {
            Ok(r) => r,
            Err(e) => return failed(Outcome::Exit, Some(0), format!("agent `{}` succeeded but {e}", agent.name), true),
        };
        if let Err(end) = self.verify(job, agent, workdir, objects, cancel, report).await {
            return end;
        }
        match spec.output {
            OutputKind::PullRequest if self.workspaces.publishes(spec.forge) => {
                self.push_changes(job, prepared, result, cancel).await
            }
            OutputKind::Push if self.workspaces.publishes(spec.forge) => {
                self.push_to_pull_request(job, agent, prepared, result, cancel, report).await
            }
            _ => AttemptEnd::Succeeded(result, None),
        }
    }

    /// Runs the trigger's `verify` command in the workspace, sandboxed like
    /// the agent; `Err` is how the attempt ends when it fails.
    pub(super) async fn verify(
        &self,
        job: &Job,
        agent: &AgentDef,
        workdir: &std::path::Path,
        objects: Option<&PathBuf>,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> Result<(), AttemptEnd> {
        let Some(verify) = &job.spec.verify else { return Ok(()) };
        let dir = self.job_dir(&job.id);
        let log = dir.join("log");
        let timeout = job.spec.timeout_secs.map(Duration::from_secs).unwrap_or(agent.timeout);
        self.log_line(&job.id, &format!("verifying with `{}`", verify.join(" "))).await;
        let check = AgentDef {
            name: "verify".into(),
            command: verify.clone(),
            prompt: PromptMode::Stdin,
            result: ResultMode::Stdout,
            env: agent.env.clone(),
            vars: Default::default(),
            timeout,
            install: None,
            max_parallel: None,
            sandbox: agent.sandbox.clone(),
            usage: crate::config::UsageFormat::None,
            model: None,
            cli: None,
        };
        let v = Invocation {
            agent: &check,
            prompt: "",
            workdir,
            job_dir: &dir.join("verify-io"),
            log: &log,
            timeout,
            output_cap: agent::DEFAULT_OUTPUT_CAP,
            cancel,
            on_spawn: None,
            confine: self.confinement(job, "verify", objects, &report.env),
            budget: None,
            setup: None,
        };
        let started = std::time::Instant::now();
        let ran = v.run().await;
        report.phases.verify_ms = Some(started.elapsed().as_millis() as u64);
        let end = match &ran {
            Ok(r) => {
                report.egress_blocked.extend(r.egress_blocked.iter().cloned());
                r.end(None, None)
            }
            Err(_) => RunEnd::of(Stop::NotStarted),
        };
        let (outcome, exit_code, retry) = match outcome::verify_run(&end) {
            Verdict::Passed => return Ok(()),
            Verdict::Cancelled => return Err(AttemptEnd::Cancelled),
            Verdict::Failed { outcome, exit_code, retry } => (outcome, exit_code, retry),
        };
        let (error, feedback) = match &ran {
            Err(e) => (format!("verify could not run: {e}"), None),
            Ok(r) => match (outcome, r.limit) {
                (Outcome::Limit, Some(hit)) => {
                    (limit_message("verify", hit, &agent.sandbox, self.config.storage.min_free), None)
                }
                _ => {
                    let why = match &r.ending {
                        Ending::TimedOut(d) => format!("timeout after {}", format_duration(*d)),
                        Ending::Exited(code) => format!("exit {}", agent::describe_exit(*code)),
                        Ending::Cancelled => "cancelled".into(),
                        Ending::OverBudget => "over budget".into(),
                        Ending::Limit(hit) => format!("stopped at {}", hit.key()),
                    };
                    let error = format!("verification `{}` failed ({why})", verify.join(" "));
                    (error, Some(tail(&r.output_tail, FEEDBACK_BYTES)))
                }
            },
        };
        Err(AttemptEnd::Failed { outcome, exit_code, error, retry, feedback })
    }

    /// What a failed agent run's error says, for the `outcome` it ended
    /// with (`domain::outcome` decided it).
    fn agent_failure(
        &self,
        agent: &AgentDef,
        run: &agent::RunOutput,
        outcome: Outcome,
        budget: Option<&agent::Budget>,
        spent: Option<f64>,
    ) -> String {
        let hit = match run.ending {
            Ending::Limit(hit) => run.limit.or(Some(hit)),
            _ => run.limit,
        };
        match (outcome, hit, &run.ending) {
            (Outcome::Limit, Some(hit), _) => {
                limit_message(&agent.name, hit, &agent.sandbox, self.config.storage.min_free)
            }
            (Outcome::Budget, _, _) => match budget {
                Some(b) => {
                    let spent = spent.map(crate::domain::dollars).unwrap_or_else(|| "an unknown amount".into());
                    format!("budget of {} reached after {spent}", crate::domain::dollars(b.usd))
                }
                None => "the run's budget is spent".into(),
            },
            (_, _, Ending::TimedOut(d)) => format!("timeout after {}", format_duration(*d)),
            (_, _, ending) => {
                let code = match ending {
                    Ending::Exited(code) => *code,
                    _ => None,
                };
                format!("agent `{}` exited with {}; see the job log", agent.name, agent::describe_exit(code))
            }
        }
    }
}

/// What the agent is asked: the trigger's prompt, the conventions, and after
/// a failed verification, its output.
fn prompt_for(spec: &JobSpec, skills: &[(String, String)], feedback: Option<&str>) -> String {
    let base = with_skills(&spec.prompt, skills);
    match feedback {
        Some(fb) => format!(
            "{base}\n\n## Your previous attempt failed verification\n\nThe check `{}` failed with this output:\n\n```\n{fb}\n```\n\nFix the cause and try again.\n",
            spec.verify.as_ref().map(|v| v.join(" ")).unwrap_or_default()
        ),
        None => base,
    }
}

/// Convention files added to every prompt, in all.
const SKILLS_CAP: usize = 32 * 1024;

/// The prompt with convention files under a heading, capped in size.
fn with_skills(prompt: &str, skills: &[(String, String)]) -> String {
    if skills.is_empty() {
        return prompt.to_string();
    }
    let mut out = format!("{}\n\n## Conventions to follow\n", prompt.trim_end());
    let mut left = SKILLS_CAP;
    for (name, text) in skills {
        let text = text.trim();
        if text.len() > left {
            let mut cut = left;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push_str(&format!(
                "\n### {name}\n\n{}\n\n(cut: conventions are limited to {SKILLS_CAP} bytes)\n",
                &text[..cut]
            ));
            break;
        }
        left -= text.len();
        out.push_str(&format!("\n### {name}\n\n{text}\n"));
    }
    out
}

/// Workflows and composite actions: what a push must not change unless the
/// trigger allows it.
pub(super) fn is_workflow_path(path: &str) -> bool {
    // The folders themselves too: a change that turns `.github` or one of
    // them into a link would put other files where workflows are read.
    matches!(path, ".github" | ".github/workflows" | ".github/actions")
        || path.starts_with(".github/workflows/")
        || path.starts_with(".github/actions/")
}

/// Logged on every job while `[sandbox] enabled = false`.
const UNSANDBOXED_WARNING: &str = "WARNING: the sandbox is off ([sandbox] enabled = false): this agent runs with \
     the daemon's own authority and can read its keys, its store and other jobs";

/// Why a run that hit a sandbox cap failed.
fn limit_message(who: &str, hit: crate::sandbox::LimitHit, profile: &crate::sandbox::Profile, min_free: u64) -> String {
    use crate::sandbox::LimitHit;
    match hit {
        LimitHit::Memory => {
            format!("`{who}` reached its memory limit (max_memory = {} MiB) and was stopped", profile.max_memory >> 20)
        }
        LimitHit::Processes => format!(
            "`{who}` reached its process limit (max_processes = {}): it could not start more processes",
            profile.max_processes
        ),
        LimitHit::Disk => format!(
            "`{who}` wrote more than its disk limit (max_disk = {}) to its workspace, HOME and /tmp, and was stopped",
            human_size(profile.max_disk)
        ),
        LimitHit::Files => format!(
            "`{who}` made more files than its limit (max_files = {}) in its workspace, HOME and /tmp, and was stopped",
            profile.max_files
        ),
        LimitHit::MinFree => format!(
            "`{who}` was stopped: the storage folder's disk fell below storage.min_free ({}) and this run was \
             growing fastest",
            human_size(min_free)
        ),
    }
}

/// `20 GiB`, `512 MiB`, `1000 bytes`.
fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

pub(super) fn failed(outcome: Outcome, exit_code: Option<i32>, error: String, retry: bool) -> AttemptEnd {
    AttemptEnd::Failed { outcome, exit_code, error, retry, feedback: None }
}

/// `base`, then doubling, capped at 10 minutes.
fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(600))
}

/// The wait before a job's second attempt; each further one doubles it.
const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);

fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflows_and_actions_are_what_needs_consent() {
        for path in [".github/workflows/ci.yml", ".github/actions/setup/action.yml"] {
            assert!(is_workflow_path(path), "{path}");
        }
        // A link replacing one of the folders counts as a change to it.
        for path in [".github", ".github/workflows", ".github/actions"] {
            assert!(is_workflow_path(path), "{path}");
        }
        for path in [".github/CODEOWNERS", "docs/.github/workflows/x.yml", ".githubx"] {
            assert!(!is_workflow_path(path), "{path}");
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(DEFAULT_BACKOFF, 1), Duration::from_secs(10));
        assert_eq!(backoff(DEFAULT_BACKOFF, 2), Duration::from_secs(20));
        assert_eq!(backoff(DEFAULT_BACKOFF, 30), Duration::from_secs(600));
        assert_eq!(backoff(Duration::from_secs(1), 3), Duration::from_secs(4));
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail("ééé", 3), "…é");
    }
}
