//! The trigger file model (`triggers/NAME.toml`) and its compilation into a
//! `Trigger`: globs parsed, templates and the `if` expression compiled, the
//! agent checked against the configuration. Every problem is a diagnostic at
//! its `path:line:col`.

mod compile;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) use compile::compile;

/// Where the agent works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkspaceKind {
    /// An empty folder.
    None,
    /// The repository's default branch head.
    #[default]
    DefaultBranch,
    /// A pull request's head commit (the forge's change-request head ref, which works for forks).
    PrHead,
    /// The head sha of a check, workflow, status or push.
    HeadSha,
}

/// What a newer job does when its concurrency group is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnConflict {
    /// At most one waits: a newer waiting job replaces an older waiting one.
    #[default]
    ReplacePending,
    /// All wait, in order (up to a cap).
    Queue,
    /// The newer job cancels the running one (and replaces any waiting one).
    CancelInProgress,
    /// The newer job is dropped while one runs or waits.
    Skip,
}

/// Where the result goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// A comment on the subject, or a commit comment on the head sha.
    #[default]
    Comment,
    /// baton commits the agent's changes, pushes a branch and opens a PR.
    PullRequest,
    /// baton commits the agent's changes onto the pull request's own head
    /// branch: a fast-forward of the head the job was matched at.
    Push,
    /// A pull request review (event `COMMENT`) with the result as its body.
    Review,
    /// A check run on the head commit: in progress at start, completed with
    /// the result as its summary (GitHub App only).
    CheckRun,
    /// Kept on the job only.
    None,
}

/// What a `push` output does when the pull request's branch moved on
/// while the agent worked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMoved {
    /// Push nothing; the job fails naming both heads.
    #[default]
    Fail,
    /// Replay the change onto the new head, check and verify it again, and
    /// push that (once).
    Rebase,
}

/// What becomes of `@name` and `@org/team` in the agent's text
/// (`[output] mentions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mentions {
    /// They notify no one: `@` is followed by a zero-width space (the
    /// event's author still is mentioned). An agent that read a stranger's
    /// issue must not page a whole organization in baton's name.
    #[default]
    Defuse,
    /// Posted as the agent wrote them.
    Keep,
}

/// Pushes of a `push` output answering a failed check, per pull request,
/// at most (`job.max_repairs_per_pr`).
pub(crate) const DEFAULT_MAX_REPAIRS: u32 = 3;

/// What a `pull_request` output pushes, at most, by default (GitHub refuses
/// files over 100 MB anyway).
pub(crate) const DEFAULT_MAX_PUSH_BYTES: u64 = 50 << 20;

/// How a trigger's result is published, beyond where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OutputOptions {
    /// A 👀 reaction and a status comment at start, edited in place at the end.
    pub progress: bool,
    /// minijinja templates for the pull request's title and body.
    pub title: Option<String>,
    pub body: Option<String>,
    /// Globs; a change outside them fails the job and nothing is pushed.
    pub allowed_paths: Vec<String>,
    /// New comments (status and result) one job may post, at most.
    pub max_comments: u32,
    /// Pull requests one job may open, at most.
    pub(crate) max_pull_requests: u32,
    /// A change whose changed files add up to more than this is not pushed.
    pub max_push_bytes: u64,
    /// Whether a change may touch `.github/workflows/**` or
    /// `.github/actions/**` (a workflow pushed with a token that may write
    /// workflows runs with the repository's secrets).
    pub allow_workflow_changes: bool,
    /// Whether a review's `APPROVE` is posted as an approval (otherwise it
    /// is a comment).
    pub allow_approve: bool,
    /// `push`: what to do when the branch moved on.
    pub on_moved: OnMoved,
    /// `review`: review what changed since this trigger's last review of
    /// the pull request, and never repeat a finding (default true).
    pub incremental: bool,
    /// `[notify.NAME]` targets told of the job's end.
    #[serde(default)]
    pub notify: Vec<String>,
    /// The ends they are told of (`succeeded`, `failed`, `cancelled`).
    #[serde(default)]
    pub notify_on: Vec<String>,
    /// `@` mentions in the agent's text: defused unless `keep`.
    #[serde(default)]
    pub mentions: Mentions,
}

/// The ends a notification can be about; `notify_on` defaults to all.
pub(crate) const NOTIFY_ON: &[&str] = &["succeeded", "failed", "cancelled"];

impl Default for OutputOptions {
    /// What a job stored before these options existed gets.
    fn default() -> Self {
        OutputOptions {
            progress: false,
            title: None,
            body: None,
            allowed_paths: Vec::new(),
            max_comments: 3,
            max_pull_requests: 1,
            max_push_bytes: DEFAULT_MAX_PUSH_BYTES,
            allow_workflow_changes: false,
            allow_approve: false,
            on_moved: OnMoved::Fail,
            incremental: true,
            notify: Vec::new(),
            notify_on: Vec::new(),
            mentions: Mentions::Defuse,
        }
    }
}

/// The authors' standings (GitHub's association values) trusted by default.
/// On GitLab, the roles from Developer up (`forge::gitlab::trust`).
pub(crate) const DEFAULT_AUTHORS: &[&str] = &["OWNER", "MEMBER", "COLLABORATOR", "MAINTAINER", "DEVELOPER"];

/// A compiled trigger. Its prompt and `if` templates live in the rule set's
/// template environment under `template_name()` and `condition_name()`.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub name: String,
    pub file: std::path::PathBuf,
    pub description: Option<String>,
    pub on: Vec<String>,
    pub filter: Filter,
    pub job: JobTemplate,
    pub output: OutputKind,
    pub output_options: OutputOptions,
    /// For `on = ["schedule"]`: when, and for which repositories.
    pub schedule: Option<crate::rules::cron::Schedule>,
    pub(crate) schedule_repos: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub repos: Vec<glob::Pattern>,
    pub branches: Vec<glob::Pattern>,
    pub labels: Vec<String>,
    pub exclude_labels: Vec<String>,
    pub authors: Vec<String>,
    pub conclusions: Vec<String>,
    pub command: Option<String>,
    pub(crate) has_condition: bool,
    pub(crate) condition_source: Option<String>,
    pub draft: bool,
    pub allow_forks: bool,
    pub allow_bots: Vec<String>,
    /// For `job.succeeded` / `job.failed`: the triggers whose jobs count.
    pub triggers: Vec<String>,
    /// Whether events on baton's own `baton/…` branches may match.
    pub own_branches: bool,
    /// Only events from this forge (`[filter] forge`).
    pub forge: Option<crate::forge::Forge>,
}

#[derive(Debug, Clone)]
pub struct JobTemplate {
    pub agent: String,
    pub workspace: WorkspaceKind,
    pub timeout: Option<Duration>,
    pub attempts: u32,
    pub verify: Option<Vec<String>>,
    pub max_runs_per_hour: Option<u32>,
    /// Higher runs first; first in, first out within a priority.
    pub priority: i8,
    /// A comment's `pr-head` job runs whatever the PR's head is when it
    /// starts, rather than the commit baton had noted (and failing if moved).
    pub latest_head: bool,
    pub cooldown: Option<Duration>,
    pub backoff: Option<Duration>,
    pub(crate) has_concurrency: bool,
    pub on_conflict: OnConflict,
    /// Convention files: (path as written, text).
    pub skills: Vec<(String, String)>,
    /// `push` answering a failed check: baton's pushes per PR, at most.
    pub max_repairs_per_pr: u32,
    /// What one run may spend, in US dollars.
    pub budget_usd: Option<f64>,
    /// What this trigger's jobs may spend in a rolling day.
    pub daily_budget_usd: Option<f64>,
    /// `[mcp.NAME]` servers its agent is given.
    pub mcp: Vec<String>,
    /// Agents its job may hand subtasks to through baton's `/mcp`.
    pub delegate: Vec<String>,
    /// `[environments.NAME]` its job runs in (else one chosen by repository).
    pub environment: Option<String>,
}

impl Trigger {
    pub(crate) fn template_name(&self) -> String {
        template_name(&self.name)
    }

    pub(crate) fn condition_name(&self) -> String {
        condition_name(&self.name)
    }
}

pub(crate) fn template_name(trigger: &str) -> String {
    format!("{trigger}.prompt")
}

pub(crate) fn concurrency_name(trigger: &str) -> String {
    format!("{trigger}.concurrency")
}

pub(crate) fn condition_name(trigger: &str) -> String {
    format!("{trigger}.if")
}
