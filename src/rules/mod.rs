//! Trigger rules: loading the trigger folder, matching an `Event` against it,
//! and rendering each match into a `JobSpec`.
//!
//! Matching does no IO: everything a rule needs (globs, templates, the `if`
//! expression) is compiled when the folder is loaded, and triggers are indexed
//! by event kind so an event visits only the triggers that listen for it.
//! Trigger rules come only from baton's own folder, never from a repository.

pub mod command;
mod context;
pub mod cron;
mod reload;
pub mod template;
pub mod trigger;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use minijinja::{context, Environment, Value};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::diag::Diagnostic;
use crate::event::Event;
use crate::forge::Forge;
use context::base_context;
pub use reload::SharedRules;
pub use reload::{fingerprint, Fingerprint, Reload};
pub use trigger::{Mentions, OnConflict, OutputOptions, WorkspaceKind};
pub use trigger::{OutputKind, Trigger};

/// What the prompt of a `review` trigger asks for: the JSON baton turns into
/// one review with inline comments (see `publish::review`).
pub(crate) const REVIEW_ANSWER_FORMAT: &str = "\n\n## Answer format\n\n\
Answer with one JSON object and nothing else:\n\
{\"summary\": \"what you found, in a few sentences\", \"event\": \"COMMENT\" or \"REQUEST_CHANGES\" or \"APPROVE\", \
\"comments\": [{\"path\": \"the file, as in the diff\", \"line\": N, \"side\": \"RIGHT\" (new code) or \"LEFT\" (removed code), \
\"start_line\": M (optional: a range M..N), \"body\": \"the finding\", \"suggestion\": \"replacement text for those lines (optional)\"}]}\n\
Comment only on lines the pull request changes or shows around its changes.";

/// What a job needs to run, fixed when its event matched: later edits of the
/// trigger folder do not change a job that is already queued.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JobSpec {
    pub trigger: String,
    pub event: String,
    /// The forge `repo` is on (GitHub for records from before GitLab).
    #[serde(default, skip_serializing_if = "is_github")]
    pub forge: Forge,
    pub repo: Option<String>,
    pub subject: Option<u64>,
    #[serde(default)]
    pub subject_is_pull_request: bool,
    /// The event's `access` (see `Event`).
    #[serde(rename = "installation")]
    pub access: Option<u64>,
    pub head_sha: Option<String>,
    pub agent: String,
    pub prompt: String,
    pub workspace: Workspace,
    /// Overrides the agent's own timeout.
    pub timeout_secs: Option<u64>,
    pub max_attempts: u32,
    pub verify: Option<Vec<String>>,
    pub output: OutputKind,
    #[serde(default)]
    pub output_options: OutputOptions,
    /// The comment that triggered the job, for the 👀 reaction.
    #[serde(default)]
    pub comment_id: Option<u64>,
    /// The repository's default branch, when the event named it.
    #[serde(default)]
    pub default_branch: Option<String>,
    /// 0 for a job started by an outside event; a job started by another
    /// job's end is one deeper than that job.
    #[serde(default)]
    pub chain_depth: u32,
    /// Jobs of this trigger per repository and hour, at most.
    #[serde(default)]
    pub max_runs_per_hour: Option<u32>,
    /// Higher runs first (-100 to 100).
    #[serde(default)]
    pub priority: i8,
    /// Time between two jobs of this trigger on one issue or PR, at least.
    #[serde(default)]
    pub cooldown_secs: Option<u64>,
    /// The wait before a second attempt (doubling after).
    #[serde(default)]
    pub backoff_secs: Option<u64>,
    /// The concurrency group: at most one of its jobs runs at a time.
    #[serde(default)]
    pub concurrency: Option<String>,
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// The trigger's `skills` files: (name, text), read from baton's folder.
    #[serde(default)]
    pub skills: Vec<(String, String)>,
    /// `push` output: the pull request branch the change goes to.
    #[serde(default)]
    pub push: Option<PushTarget>,
    /// `push` answering a failed check: baton's pushes per PR, at most.
    #[serde(default)]
    pub max_repairs_per_pr: u32,
    /// For a job asked for in a review thread: the thread's first comment,
    /// which the result answers.
    #[serde(default)]
    pub reply_to: Option<u64>,
    /// `review` output: the head this trigger reviewed last on the pull
    /// request, when this review covers only what changed since.
    #[serde(default)]
    pub review_since: Option<String>,
    /// `review` output: a full review (`/review full`, or `incremental =
    /// false`), which repeats findings said before.
    #[serde(default)]
    pub review_full: bool,
    /// What one run may spend, in US dollars (`[job] budget_usd`).
    #[serde(default)]
    pub budget_usd: Option<f64>,
    /// What may be spent in a rolling day, past which a match is skipped.
    #[serde(default)]
    pub daily_budgets: DailyBudgets,
    /// `[mcp.NAME]` servers the agent is given (`[job] mcp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp: Vec<String>,
    /// Agents the job may hand subtasks to (`[job] delegate`): its children,
    /// started through baton's `/mcp` with a token scoped to this job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delegate: Vec<String>,
    /// `[environments.NAME]` the trigger named; when `None`, one may still
    /// be chosen by the repository when the job runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The job that started this one through `delegate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The login of the event's author (`Event::author`): the one person
    /// the agent's text may still mention (`[output] mentions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// The CI run a check event reported (`Event::ci_run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_run: Option<u64>,
}

/// Caps on spending over a rolling day (US dollars), fixed at match time:
/// all agents (`[limits] daily_budget_usd`), this trigger's jobs (`[job]
/// daily_budget_usd`), this repository's (`[limits]
/// daily_budget_per_repo_usd`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct DailyBudgets {
    pub all: Option<f64>,
    pub trigger: Option<f64>,
    pub repo: Option<f64>,
}

fn is_github(forge: &Forge) -> bool {
    *forge == Forge::GITHUB
}

/// The forge an event's repository is on: its source's, or for a job's
/// end, its job's.
pub(crate) fn forge_of(event: &Event) -> Forge {
    Forge::of_source(&event.source)
        .or_else(|| event.parent.as_ref().and_then(|p| Forge::of_source(&p.forge)))
        .unwrap_or_default()
}

/// Stands for `{{ review.diff }}` in a rendered prompt until the engine,
/// which has the repository, puts the diff there.
pub(crate) const REVIEW_DIFF: &str = "\u{1}baton:review.diff\u{1}";

impl JobSpec {
    /// Whether this job pushes a fix for a failed check, workflow or
    /// status: a repair, bounded per pull request, that never rebases (its
    /// failure belongs to the head it was seen on).
    pub(crate) fn is_repair(&self) -> bool {
        self.output == OutputKind::Push
            && CHECK_EVENTS.iter().any(|e| self.event == *e || self.event.starts_with(&format!("{e}.")))
    }
}

/// Where a `push` output commits: a pull request's head branch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PushTarget {
    /// The repository the branch lives in (`owner/name`): a fork's, for a
    /// pull request from a fork.
    pub repo: String,
    pub branch: String,
}

/// The commit a job's worktree is made from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Workspace {
    #[default]
    None,
    DefaultBranch {
        branch: String,
    },
    /// `base` is fetched too, so the agent can diff against it.
    PrHead {
        number: u64,
        sha: Option<String>,
        base: Option<String>,
        /// The job must run at `sha` and no other commit: if the pull
        /// request's head has moved by the time it runs, it fails.
        #[serde(default)]
        pinned: bool,
    },
    HeadSha {
        sha: String,
        branch: Option<String>,
    },
}

/// What an event starts.
#[derive(Debug, Default, Clone)]
pub struct Matches {
    pub jobs: Vec<JobSpec>,
    /// Matches from people `authors` does not trust, on an issue or PR.
    pub pending: Vec<JobSpec>,
}

/// One trigger's answer to one event.
#[derive(Debug, Clone)]
pub enum Verdict {
    Matched(Box<JobSpec>),
    /// Everything matched but the person: the job waits for a trusted
    /// person's `/baton approve` on the issue or pull request.
    Held {
        spec: Box<JobSpec>,
        reason: String,
    },
    /// The first filter that said no, and why.
    Rejected {
        filter: &'static str,
        reason: String,
    },
}

/// The loaded trigger folder.
pub struct RuleSet {
    triggers: Vec<Trigger>,
    /// Event kind (`issues.opened`) or bare event name (`issues`) → triggers.
    by_kind: HashMap<String, Vec<usize>>,
    /// The event names some trigger listens for (`issues` of `issues.opened`).
    names: HashSet<String>,
    env: Environment<'static>,
    bot_login: String,
    /// Who baton posts as on GitLab (`gitlab.bot_username`, or asked of
    /// GitLab at start).
    gitlab_bot: Option<String>,
    /// The configuration's caps on a rolling day's spending.
    daily_budgets: DailyBudgets,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet").field("triggers", &self.triggers.len()).finish()
    }
}

impl RuleSet {
    /// An empty set (no trigger folder).
    pub fn empty(config: &Config) -> RuleSet {
        RuleSet::from_triggers(Vec::new(), template::environment(), config)
    }

    /// Loads every `*.toml` in `dir`. Files that fail are reported and left
    /// out; the others load. A missing folder is an empty set.
    pub fn load(dir: &Path, config: &Config) -> (RuleSet, Vec<Diagnostic>) {
        let mut env = template::environment();
        let mut triggers = Vec::new();
        let mut errors = Vec::new();
        let mut files: Vec<_> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                errors.push(Diagnostic::file(dir, format!("cannot read trigger folder: {e}")));
                Vec::new()
            }
        };
        files.sort();
        for path in files {
            let source = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(Diagnostic::file(&path, format!("cannot read trigger: {e}")));
                    continue;
                }
            };
            match trigger::compile(&path, &source, config, &mut env) {
                Ok(t) => triggers.push(t),
                Err(mut errs) => errors.append(&mut errs),
            }
        }
        (RuleSet::from_triggers(triggers, env, config), errors)
    }

    /// A set of the one trigger in `source`, read as if from file `name`
    /// (an ad-hoc job's, made up from an API request).
    pub fn one(name: &Path, source: &str, config: &Config) -> Result<RuleSet, Vec<Diagnostic>> {
        let mut env = template::environment();
        let t = trigger::compile(name, source, config, &mut env)?;
        Ok(RuleSet::from_triggers(vec![t], env, config))
    }

    /// Trigger `name`'s verdict alone on `event`; `None` if there is no
    /// such trigger.
    pub(crate) fn judge_one(&self, name: &str, event: &Event) -> Option<Verdict> {
        let t = self.get(name)?;
        Some(self.judge(t, event, &base_context(event)))
    }

    fn from_triggers(triggers: Vec<Trigger>, env: Environment<'static>, config: &Config) -> RuleSet {
        let mut by_kind: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, t) in triggers.iter().enumerate() {
            for kind in &t.on {
                let list = by_kind.entry(kind.clone()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        let names = by_kind.keys().map(|k| k.split('.').next().unwrap_or(k).to_string()).collect();
        let daily_budgets = DailyBudgets {
            all: config.limits.daily_budget_usd,
            trigger: None,
            repo: config.limits.daily_budget_per_repo_usd,
        };
        let gitlab_bot = config.gitlab.as_ref().and_then(|g| g.bot_username.clone());
        RuleSet { triggers, by_kind, names, env, bot_login: config.github.bot_login.clone(), gitlab_bot, daily_budgets }
    }

    pub fn triggers(&self) -> &[Trigger] {
        &self.triggers
    }

    /// Whether some trigger listens for events named `name`, whatever
    /// their action.
    pub fn listens_for(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The login events from baton itself carry.
    pub fn bot_login(&self) -> &str {
        &self.bot_login
    }

    /// Who baton posts as on the forge `event` came from.
    pub(crate) fn bot_login_for(&self, event: &Event) -> &str {
        match (forge_of(event), &self.gitlab_bot) {
            (Forge::GitLab(_), Some(bot)) => bot,
            _ => &self.bot_login,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Trigger> {
        self.triggers.iter().find(|t| t.name == name)
    }

    /// Jobs this event starts, one per matching trigger, in trigger order.
    pub fn match_event(&self, event: &Event) -> Vec<JobSpec> {
        self.evaluate(event).jobs
    }

    /// Jobs this event starts, and jobs that wait for an approval.
    pub fn evaluate(&self, event: &Event) -> Matches {
        let mut out = Matches::default();
        let mut candidates: Vec<usize> = Vec::new();
        for key in [event.kind.as_str(), event.name.as_str()] {
            if let Some(list) = self.by_kind.get(key) {
                candidates.extend(list);
            }
        }
        if candidates.is_empty() {
            return out;
        }
        candidates.sort_unstable();
        candidates.dedup();
        let ctx = base_context(event);
        for i in candidates {
            match self.judge(&self.triggers[i], event, &ctx) {
                Verdict::Matched(spec) => out.jobs.push(*spec),
                Verdict::Held { spec, .. } => out.pending.push(*spec),
                Verdict::Rejected { .. } => {}
            }
        }
        out
    }

    /// Every trigger's verdict on this event, for `simulate`.
    pub fn explain(&self, event: &Event) -> Vec<(&Trigger, Verdict)> {
        let ctx = base_context(event);
        self.triggers.iter().map(|t| (t, self.judge(t, event, &ctx))).collect()
    }

    fn judge(&self, t: &Trigger, event: &Event, ctx: &Value) -> Verdict {
        let reject = |filter: &'static str, reason: String| Verdict::Rejected { filter, reason };
        let f = &t.filter;

        if !t.on.iter().any(|k| k == &event.kind || k == &event.name) {
            return reject("on", format!("listens for [{}], event is {}", t.on.join(", "), event.kind));
        }
        if let Some(sender) = &event.sender {
            if sender.login == self.bot_login || self.gitlab_bot.as_deref() == Some(sender.login.as_str()) {
                return reject("bot", format!("sent by baton itself ({})", sender.login));
            }
            if sender.is_bot() && !f.allow_bots.contains(&sender.login) {
                return reject("allow_bots", format!("sender {} is a bot", sender.login));
            }
        }
        if event.comment.as_ref().is_some_and(|c| c.body.contains(crate::event::MARKER_PREFIX)) {
            return reject("bot", "the comment was posted by baton".into());
        }
        // baton's own pull requests (a failing check on one, say) would
        // otherwise start the job that made them, again and again.
        if !f.own_branches && event.branch.as_deref().is_some_and(|b| b.starts_with(BATON_BRANCH_PREFIX)) {
            return reject(
                "own_branches",
                format!(
                    "branch {} is baton's own (set filter.own_branches = true to match)",
                    event.branch.as_deref().unwrap_or("")
                ),
            );
        }
        if let Some(want) = f.forge {
            let forge = forge_of(event);
            if forge != want || Forge::of_source(&event.source).is_none() && event.source != "baton" {
                return reject(
                    "forge",
                    format!("wanted an event from {}, event is from {}", want.name(), event.source),
                );
            }
        }
        if !f.triggers.is_empty() {
            let parent = event.parent.as_ref().map(|p| p.trigger.as_str()).unwrap_or("");
            if !f.triggers.iter().any(|t| t == parent) {
                return reject(
                    "triggers",
                    format!("wanted a job of [{}], event is {}", f.triggers.join(", "), none_if_empty(parent)),
                );
            }
        }
        if !f.repos.is_empty() {
            let repo = event.repo_name().unwrap_or("");
            if !f.repos.iter().any(|p| p.matches(repo)) {
                return reject(
                    "repos",
                    format!("wanted {}, event is from {}", patterns(&f.repos), none_if_empty(repo)),
                );
            }
        }
        if !f.branches.is_empty() {
            let branch = event.base_branch.as_deref().or(event.branch.as_deref()).unwrap_or("");
            if !f.branches.iter().any(|p| p.matches(branch)) {
                return reject(
                    "branches",
                    format!("wanted {}, event is on {}", patterns(&f.branches), none_if_empty(branch)),
                );
            }
        }
        if !f.labels.is_empty() && !f.labels.iter().any(|l| event.labels.contains(l)) {
            return reject(
                "labels",
                format!("wanted any of [{}], has [{}]", f.labels.join(", "), event.labels.join(", ")),
            );
        }
        if let Some(l) = f.exclude_labels.iter().find(|l| event.labels.contains(l)) {
            return reject("exclude_labels", format!("has excluded label {l}"));
        }
        if event.draft == Some(true) && !f.draft {
            return reject("draft", "pull request is a draft (set filter.draft = true to match drafts)".into());
        }
        if !f.conclusions.is_empty() {
            let c = event.conclusion.as_deref().unwrap_or("");
            if !f.conclusions.iter().any(|w| w == c) {
                return reject(
                    "conclusions",
                    format!("wanted any of [{}], conclusion is {}", f.conclusions.join(", "), none_if_empty(c)),
                );
            }
        }
        let mut slash = None;
        if let Some(cmd) = &f.command {
            let Some(comment) = &event.comment else {
                return reject("command", format!("wanted a comment starting with {cmd}, event has no comment"));
            };
            if comment.edited {
                return reject("command", "an edited comment does not run its command again".into());
            }
            match command::parse(cmd, &comment.body) {
                Some(c) => slash = Some(c),
                None => return reject("command", format!("comment does not start with {cmd}")),
            }
        }
        let mut approval = None;
        if let Some(reason) = untrusted(f, event, t.job.workspace) {
            // An outsider's issue or PR can still run once someone trusted
            // approves it there; anything else is simply rejected.
            let approvable =
                Forge::of_source(&event.source).is_some() && event.subject.is_some() && f.command.is_none();
            if !approvable {
                return reject("authors", reason);
            }
            approval = Some(reason);
        }

        let ctx = match &slash {
            Some(c) => context! { command => Value::from_serialize(c), ..ctx.clone() },
            None => ctx.clone(),
        };
        if f.has_condition {
            let rendered = self.env.get_template(&t.condition_name()).and_then(|tmpl| tmpl.render(&ctx));
            match rendered {
                Ok(s) if s == "1" => {}
                Ok(_) => {
                    return reject("if", format!("`{}` is false", f.condition_source.as_deref().unwrap_or("")));
                }
                Err(e) => return reject("if", format!("`if` failed to evaluate: {e}")),
            }
        }

        let push = match t.output {
            OutputKind::Push => match push_target(f, event) {
                Ok(target) => Some(target),
                Err(reason) => return reject("output", reason),
            },
            _ => None,
        };
        let workspace = match workspace_for(t.job.workspace, event, t.job.latest_head) {
            // A push's change is replayed onto a moved branch only when the
            // trigger asks (and never for a repair): otherwise it must run
            // on the head it was matched at.
            Ok(Workspace::PrHead { number, sha, base, .. })
                if push.is_some()
                    && (t.output_options.on_moved == trigger::OnMoved::Fail
                        || CHECK_EVENTS.contains(&event.name.as_str())) =>
            {
                Workspace::PrHead { number, pinned: sha.is_some(), sha, base }
            }
            Ok(w) => w,
            Err(reason) => return reject("workspace", reason),
        };
        // A review covers what changed since this trigger's last review of
        // the pull request, unless asked for in full.
        let review_full = t.output == OutputKind::Review
            && (!t.output_options.incremental
                || slash.as_ref().is_some_and(|c| c.args.split_whitespace().next() == Some("full")));
        let review_since = match (t.output, review_full) {
            (OutputKind::Review, false) => {
                event.reviewed.get(&t.name).filter(|since| event.head_sha.as_ref() != Some(*since)).cloned()
            }
            _ => None,
        };
        let ctx = match t.output {
            OutputKind::Review => context! {
                review => context! {
                    since => review_since,
                    head => event.head_sha,
                    full => review_full,
                    diff => review_since.as_ref().map(|_| REVIEW_DIFF),
                },
                ..ctx
            },
            _ => ctx,
        };
        let prompt = match self.env.get_template(&t.template_name()).and_then(|tmpl| tmpl.render(&ctx)) {
            // A review is asked for in the format baton posts line by line.
            Ok(p) if t.output == OutputKind::Review => {
                let since = match (&review_since, &event.head_sha) {
                    (Some(since), Some(head)) => format!(
                        "\n\nThis pull request was reviewed up to {since} before: review what changed since \
                         ({since}..{head}). Findings already posted on lines that did not change are not repeated."
                    ),
                    _ => String::new(),
                };
                format!("{p}{since}{REVIEW_ANSWER_FORMAT}")
            }
            Ok(p) => p,
            Err(e) => return reject("prompt", format!("prompt failed to render: {e}")),
        };
        let concurrency = if t.job.has_concurrency {
            match self.env.get_template(&trigger::concurrency_name(&t.name)).and_then(|tmpl| tmpl.render(&ctx)) {
                Ok(g) if !g.trim().is_empty() => Some(g.trim().to_string()),
                Ok(_) => None,
                Err(e) => return reject("concurrency", format!("concurrency failed to render: {e}")),
            }
        } else {
            None
        };
        let spec = Box::new(JobSpec {
            trigger: t.name.clone(),
            event: event.kind.clone(),
            forge: forge_of(event),
            repo: event.repo_name().map(str::to_string),
            subject: event.subject,
            subject_is_pull_request: event.subject_is_pull_request,
            access: event.access,
            head_sha: event.head_sha.clone(),
            agent: t.job.agent.clone(),
            prompt,
            workspace,
            timeout_secs: t.job.timeout.map(|d| d.as_secs()),
            max_attempts: t.job.attempts,
            verify: t.job.verify.clone(),
            output: t.output,
            output_options: t.output_options.clone(),
            comment_id: event.comment.as_ref().and_then(|c| c.id),
            default_branch: event.repository.as_ref().and_then(|r| r.default_branch.clone()),
            chain_depth: event.parent.as_ref().map_or(0, |p| p.depth + 1),
            max_runs_per_hour: t.job.max_runs_per_hour,
            priority: t.job.priority,
            cooldown_secs: t.job.cooldown.map(|d| d.as_secs()),
            backoff_secs: t.job.backoff.map(|d| d.as_secs()),
            concurrency,
            on_conflict: t.job.on_conflict,
            skills: t.job.skills.clone(),
            push,
            max_repairs_per_pr: t.job.max_repairs_per_pr,
            reply_to: event.thread.as_ref().map(|t| t.root),
            review_since,
            review_full,
            budget_usd: t.job.budget_usd,
            daily_budgets: DailyBudgets { trigger: t.job.daily_budget_usd, ..self.daily_budgets },
            mcp: t.job.mcp.clone(),
            delegate: t.job.delegate.clone(),
            environment: t.job.environment.clone(),
            parent: None,
            author: event.author.clone(),
            ci_run: event.ci_run,
        });
        match approval {
            Some(reason) => Verdict::Held { spec, reason },
            None => Verdict::Matched(spec),
        }
    }
}

/// Who may trigger: people by their association with the repository; events
/// without one (checks, workflows, statuses) by where their head commit lives.
fn untrusted(f: &trigger::Filter, event: &Event, workspace: WorkspaceKind) -> Option<String> {
    // A job's end: the job itself was admitted by these rules already.
    if event.source == "baton" {
        return None;
    }
    if let Some(assoc) = &event.association {
        if !f.authors.iter().any(|a| a == assoc) {
            return Some(format!("author association {assoc} is not one of [{}]", f.authors.join(", ")));
        }
    }
    if f.allow_forks {
        return None;
    }
    let about_head =
        event.subject_is_pull_request || event.association.is_none() && CHECK_EVENTS.contains(&event.name.as_str());
    if !about_head {
        return None;
    }
    match event.head_in_repo {
        Some(true) => None,
        Some(false) => Some("head commit is from a fork (set filter.allow_forks = true to allow)".into()),
        // A comment on a pull request does not say where its head lives, and
        // baton had not seen the PR's own events (ingress fills it in when it
        // has). The commenter, checked above, asked for the job; but running
        // the head's code needs to know it is not a stranger's.
        None if event.association.is_some() && workspace != WorkspaceKind::PrHead => None,
        None if event.association.is_some() => Some(
            "cannot tell whether the pull request's head is from a fork: baton has not seen this pull request's \
             own events (it notes them when the PR opens or is pushed to); set filter.allow_forks = true to allow"
                .into(),
        ),
        None => {
            Some("cannot tell whether the head commit is from a fork (set filter.allow_forks = true to allow)".into())
        }
    }
}

/// The branch a `push` output commits to: the pull request's head branch,
/// in this repository, or in a fork only when the trigger allows forks and
/// the fork lets maintainers push.
fn push_target(f: &trigger::Filter, event: &Event) -> Result<PushTarget, String> {
    if !event.subject_is_pull_request {
        return Err("kind = \"push\" commits to a pull request: the event is not about one".into());
    }
    let Some(branch) = event.branch.clone() else {
        return Err("kind = \"push\": baton does not know the pull request's head branch (it notes it from the \
                    PR's own events)"
            .into());
    };
    let base = event.repo_name().unwrap_or_default();
    match event.head_in_repo {
        Some(true) => Ok(PushTarget { repo: base.to_string(), branch }),
        Some(false) if !f.allow_forks => {
            Err("kind = \"push\": the pull request is from a fork (set filter.allow_forks = true to push there)".into())
        }
        Some(false) if event.maintainer_can_modify != Some(true) => {
            Err("kind = \"push\": the fork's author does not allow edits from maintainers".into())
        }
        Some(false) => match event.head_repo.clone() {
            Some(repo) => Ok(PushTarget { repo, branch }),
            None => Err("kind = \"push\": the fork's repository is gone".into()),
        },
        None => Err("kind = \"push\": cannot tell whether the pull request's head is from a fork".into()),
    }
}

/// Branches baton pushes (`pull_request` output) start with this.
pub(crate) const BATON_BRANCH_PREFIX: &str = "baton/";

/// Events that carry no author association, only a head commit.
/// GitHub's checks, workflows and statuses; GitLab's pipelines and jobs (`build`).
const CHECK_EVENTS: &[&str] =
    &["check_run", "check_suite", "workflow_run", "workflow_job", "status", "pipeline", "build"];

fn workspace_for(kind: WorkspaceKind, event: &Event, latest_head: bool) -> Result<Workspace, String> {
    match kind {
        WorkspaceKind::None => Ok(Workspace::None),
        WorkspaceKind::DefaultBranch => {
            let branch = event
                .repository
                .as_ref()
                .and_then(|r| r.default_branch.clone())
                .ok_or("workspace default-branch: event names no repository default branch")?;
            Ok(Workspace::DefaultBranch { branch })
        }
        WorkspaceKind::PrHead => match (event.subject, event.subject_is_pull_request) {
            (Some(number), true) => {
                // Only what baton noted for a comment is unpinned by
                // `latest_head`: a PR's own event names the commit it is about.
                let unpin = latest_head && event.head_pinned;
                Ok(Workspace::PrHead {
                    number,
                    sha: if unpin { None } else { event.head_sha.clone() },
                    base: event.base_branch.clone(),
                    pinned: event.head_pinned && !unpin,
                })
            }
            _ => Err("workspace pr-head: event is not about a pull request".into()),
        },
        WorkspaceKind::HeadSha => match &event.head_sha {
            Some(sha) => Ok(Workspace::HeadSha { sha: sha.clone(), branch: event.branch.clone() }),
            None => Err("workspace head-sha: event has no head sha".into()),
        },
    }
}

fn patterns(p: &[glob::Pattern]) -> String {
    format!("[{}]", p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", "))
}

fn none_if_empty(s: &str) -> &str {
    if s.is_empty() {
        "(none)"
    } else {
        s
    }
}
