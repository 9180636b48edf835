//! Reading a trigger file: the file model, checked by serde, and its
//! compilation into a `Trigger` (globs parsed, templates and the `if`
//! expression compiled, the agent checked against the configuration).

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::*;
use crate::config::{Config, HumanDuration};
use crate::diag::Diagnostic;
use crate::forge::{Capabilities, Forge};

/// GitHub's associations, then GitLab's roles (`forge::gitlab::trust`).
const ASSOCIATIONS: &[&str] = &[
    "OWNER",
    "MEMBER",
    "COLLABORATOR",
    "CONTRIBUTOR",
    "FIRST_TIME_CONTRIBUTOR",
    "FIRST_TIMER",
    "MANNEQUIN",
    "NONE",
    "MAINTAINER",
    "DEVELOPER",
    "REPORTER",
    "PLANNER",
    "GUEST",
    "MINIMAL_ACCESS",
];

/// Every forge's event names, GitHub's first.
fn known_events() -> impl Iterator<Item = &'static str> {
    Forge::ALL.into_iter().flat_map(|f| f.known_events().iter().copied())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerFile {
    description: Option<String>,
    on: Spanned<Vec<Spanned<String>>>,
    schedule: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    #[serde(default)]
    filter: FilterFile,
    job: Spanned<JobFile>,
    #[serde(default)]
    output: OutputFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterFile {
    repos: Option<Vec<Spanned<String>>>,
    branches: Option<Vec<Spanned<String>>>,
    labels: Option<Vec<String>>,
    exclude_labels: Option<Vec<String>>,
    authors: Option<Vec<Spanned<String>>>,
    conclusions: Option<Vec<String>>,
    command: Option<Spanned<String>>,
    #[serde(rename = "if")]
    condition: Option<Spanned<String>>,
    draft: Option<bool>,
    allow_forks: Option<bool>,
    allow_bots: Option<Vec<Spanned<String>>>,
    triggers: Option<Vec<String>>,
    own_branches: Option<bool>,
    forge: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    agent: Spanned<String>,
    #[serde(default)]
    workspace: WorkspaceKind,
    prompt: Option<Spanned<String>>,
    prompt_file: Option<Spanned<String>>,
    timeout: Option<HumanDuration>,
    attempts: Option<Spanned<u32>>,
    verify: Option<Spanned<Vec<String>>>,
    max_runs_per_hour: Option<u32>,
    priority: Option<Spanned<i64>>,
    latest_head: Option<bool>,
    cooldown: Option<HumanDuration>,
    backoff: Option<HumanDuration>,
    concurrency: Option<Spanned<String>>,
    on_conflict: Option<OnConflict>,
    cancel_in_progress: Option<Spanned<bool>>,
    skills: Option<Vec<Spanned<String>>>,
    max_repairs_per_pr: Option<Spanned<u32>>,
    budget_usd: Option<Spanned<f64>>,
    daily_budget_usd: Option<Spanned<f64>>,
    mcp: Option<Vec<Spanned<String>>>,
    delegate: Option<Vec<Spanned<String>>>,
    environment: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputFile {
    kind: Option<Spanned<OutputKind>>,
    progress: Option<bool>,
    title: Option<Spanned<String>>,
    body: Option<Spanned<String>>,
    allowed_paths: Option<Vec<Spanned<String>>>,
    max_comments: Option<u32>,
    max_pull_requests: Option<u32>,
    allow_workflow_changes: Option<bool>,
    max_push_bytes: Option<u64>,
    allow_approve: Option<bool>,
    on_moved: Option<Spanned<OnMoved>>,
    incremental: Option<Spanned<bool>>,
    notify: Option<Vec<Spanned<String>>>,
    notify_on: Option<Vec<Spanned<String>>>,
    mentions: Option<Mentions>,
}

/// Whether `entry` (an element of `on`) names an event baton can deliver:
/// a GitHub event, a job event, or a configured generic source.
fn known_event(entry: &str, config: &Config) -> bool {
    let name = entry.split_once('.').map(|(n, _)| n).unwrap_or(entry);
    known_events().any(|k| k == name)
        || entry == "job.succeeded"
        || entry == "job.failed"
        || entry == "api"
        || config.sources.contains_key(name)
}

/// A GitLab event with an action GitLab never sends (`merge_request.opened`,
/// GitHub's word, for GitLab's `merge_request.open`): it would never match.
fn unknown_gitlab_action(entry: &str) -> Option<String> {
    let (name, action) = entry.split_once('.')?;
    let (_, actions) = crate::forge::gitlab::event::KNOWN_ACTIONS.iter().find(|(n, _)| *n == name)?;
    if actions.contains(&action) {
        return None;
    }
    let hint =
        crate::diag::suggest(action, actions).map(|s| format!(" (did you mean `{name}.{s}`?)")).unwrap_or_default();
    Some(format!("unknown action `{action}` for GitLab's `{name}` event{hint}; expected one of {}", actions.join(", ")))
}

/// Parses and compiles one trigger file for the forge `[github]` configures.
/// Templates are added to `env`.
pub(crate) fn compile(
    path: &Path,
    source: &str,
    config: &Config,
    env: &mut minijinja::Environment<'static>,
) -> Result<Trigger, Vec<Diagnostic>> {
    let forge = Forge::GITHUB;
    compile_for(path, source, config, env, forge.name(), forge.capabilities())
}

/// The capability of `forge` an output needs, when it lacks it.
fn unavailable(output: OutputKind, forge: &Capabilities) -> Option<&'static str> {
    let (offered, what) = match output {
        OutputKind::Comment => (forge.comments, "comments"),
        OutputKind::PullRequest => (forge.change_requests, "change requests"),
        OutputKind::Push => (forge.push, "pushes to a change request's branch"),
        OutputKind::Review => (forge.reviews, "reviews"),
        OutputKind::CheckRun => (forge.check_runs, "check runs"),
        OutputKind::None => (true, ""),
    };
    (!offered).then_some(what)
}

/// `compile`, for a forge named `forge_name` that offers `offered`: an output
/// it lacks is an error at the output's `kind`.
pub(crate) fn compile_for(
    path: &Path,
    source: &str,
    config: &Config,
    env: &mut minijinja::Environment<'static>,
    forge_name: &str,
    offered: Capabilities,
) -> Result<Trigger, Vec<Diagnostic>> {
    let file: TriggerFile = toml::from_str(source).map_err(|e| vec![Diagnostic::from_toml(path, source, &e)])?;
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("trigger").to_string();
    let mut errors = Vec::new();
    let at = |span: std::ops::Range<usize>, msg: String| Diagnostic::at(path, source, Some(span), msg);

    if file.on.get_ref().is_empty() {
        errors.push(at(file.on.span(), "`on` lists no events".into()));
    }
    for entry in file.on.get_ref() {
        let e = entry.get_ref();
        if e == "schedule" {
            if file.on.get_ref().len() > 1 {
                errors.push(at(
                    entry.span(),
                    "a schedule trigger listens to nothing else: use on = [\"schedule\"]".into(),
                ));
            }
        } else if let Some(msg) = unknown_gitlab_action(e) {
            errors.push(at(entry.span(), msg));
        } else if !known_event(e, config) {
            let names: Vec<&str> = known_events().chain(["job.succeeded", "job.failed", "api"]).collect();
            let hint = crate::diag::suggest(e.split('.').next().unwrap_or(e), &names)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            errors.push(at(entry.span(), format!("unknown event `{e}`{hint}")));
        }
    }

    let is_schedule = file.on.get_ref().iter().any(|e| e.get_ref() == "schedule");
    let mut schedule = None;
    let mut schedule_repos = Vec::new();
    match (&file.schedule, is_schedule) {
        (Some(expr), true) => {
            match crate::rules::cron::Schedule::parse(
                expr.get_ref(),
                file.timezone.as_ref().map(|t| t.get_ref().as_str()),
            ) {
                Ok(s) => schedule = Some(s),
                Err(msg) => {
                    let span = match &file.timezone {
                        Some(tz) if msg.contains("timezone") => tz.span(),
                        _ => expr.span(),
                    };
                    errors.push(at(span, msg));
                }
            }
            let repos = file.filter.repos.as_deref().unwrap_or_default();
            if repos.is_empty() {
                errors
                    .push(at(expr.span(), "a schedule needs filter.repos naming the repositories it runs for".into()));
            }
            for r in repos {
                let name = r.get_ref();
                if name.contains(['*', '?', '[']) || name.split('/').count() != 2 {
                    errors.push(at(r.span(), format!("a schedule's repos must be exact owner/name, not `{name}`")));
                } else {
                    schedule_repos.push(name.clone());
                }
            }
        }
        (Some(expr), false) => errors.push(at(expr.span(), "`schedule` needs on = [\"schedule\"]".into())),
        (None, true) => errors
            .push(at(file.on.span(), "on = [\"schedule\"] needs a `schedule`, e.g. schedule = \"0 3 * * 1-5\"".into())),
        (None, false) => {}
    }
    if let (Some(tz), None) = (&file.timezone, &file.schedule) {
        errors.push(at(tz.span(), "`timezone` applies only to a `schedule`".into()));
    }

    let globs = |list: &Option<Vec<Spanned<String>>>, errors: &mut Vec<Diagnostic>| -> Vec<glob::Pattern> {
        let mut out = Vec::new();
        for g in list.iter().flatten() {
            match glob::Pattern::new(g.get_ref()) {
                Ok(p) => out.push(p),
                Err(e) => errors.push(at(g.span(), format!("invalid glob `{}`: {e}", g.get_ref()))),
            }
        }
        out
    };
    let f = &file.filter;
    let repos = globs(&f.repos, &mut errors);
    let branches = globs(&f.branches, &mut errors);

    let authors = match &f.authors {
        None => DEFAULT_AUTHORS.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            for a in list {
                if !ASSOCIATIONS.contains(&a.get_ref().as_str()) {
                    errors.push(at(
                        a.span(),
                        format!(
                            "unknown author association `{}`; expected one of {}",
                            a.get_ref(),
                            ASSOCIATIONS.join(", ")
                        ),
                    ));
                }
            }
            list.iter().map(|a| a.get_ref().clone()).collect()
        }
    };

    let command = match &f.command {
        Some(c) if !c.get_ref().starts_with('/') || c.get_ref().split_whitespace().count() != 1 => {
            errors.push(at(c.span(), format!("command `{}` must be one word starting with `/`", c.get_ref())));
            None
        }
        other => other.as_ref().map(|c| c.get_ref().clone()),
    };

    let allow_bots: Vec<String> = f.allow_bots.iter().flatten().map(|b| b.get_ref().clone()).collect();
    for b in f.allow_bots.iter().flatten() {
        if b.get_ref() == &config.github.bot_login {
            errors.push(at(b.span(), format!("`{}` is baton's own login and can never trigger jobs", b.get_ref())));
        }
    }

    if let Some(cond) = &f.condition {
        let wrapped = format!("{{% if {} %}}1{{% endif %}}", cond.get_ref());
        let ok = env
            .compile_expression(cond.get_ref())
            .map(drop)
            .and_then(|_| env.add_template_owned(condition_name(&name), wrapped));
        if let Err(e) = ok {
            errors.push(at(cond.span(), format!("invalid `if` expression: {}", template_error(&e))));
        }
    }

    let job = file.job.get_ref();
    if !config.agents.contains_key(job.agent.get_ref()) {
        let names: Vec<&str> = config.agents.keys().map(String::as_str).collect();
        errors.push(at(
            job.agent.span(),
            format!("unknown agent `{}`; defined agents: {}", job.agent.get_ref(), names.join(", ")),
        ));
    }
    if let Some(name) = &job.environment {
        if !config.environments.contains_key(name.get_ref()) {
            let names: Vec<&str> = config.environments.keys().map(String::as_str).collect();
            let known = if names.is_empty() { "none is defined".to_string() } else { names.join(", ") };
            errors.push(at(name.span(), format!("unknown environment `{}`; [environments]: {known}", name.get_ref())));
        }
    }
    for name in job.mcp.iter().flatten() {
        if !config.mcp.contains_key(name.get_ref()) {
            let names: Vec<&str> = config.mcp.keys().map(String::as_str).collect();
            let known = if names.is_empty() { "none is defined".to_string() } else { names.join(", ") };
            errors.push(at(name.span(), format!("unknown MCP server `{}`; [mcp] servers: {known}", name.get_ref())));
        }
    }
    if let (Some(first), Some(agent)) = (job.mcp.iter().flatten().next(), config.agents.get(job.agent.get_ref())) {
        use crate::config::Preset;
        if !matches!(agent.cli, Some(Preset::Claude | Preset::Codex | Preset::Gemini)) {
            errors.push(at(
                first.span(),
                format!(
                    "agent `{}` is not one of the codex, claude and gemini CLIs, so baton cannot give it MCP servers",
                    agent.name
                ),
            ));
        }
    }
    for name in job.delegate.iter().flatten() {
        if !config.agents.contains_key(name.get_ref()) {
            let names: Vec<&str> = config.agents.keys().map(String::as_str).collect();
            errors.push(at(
                name.span(),
                format!("`delegate` names unknown agent `{}`; defined agents: {}", name.get_ref(), names.join(", ")),
            ));
        }
    }
    // The parent holds its slot while its children run: with no room for
    // one more beside it, a child would wait for the parent, and it for them.
    if let Some(first) = job.delegate.iter().flatten().next() {
        let limits = &config.limits;
        let own = config.agents.get(job.agent.get_ref()).and_then(|a| a.max_parallel);
        let same_agent = job.delegate.iter().flatten().any(|d| d.get_ref() == job.agent.get_ref());
        if limits.max_parallel_jobs < 2
            || limits.max_parallel_per_repo < 2
            || (same_agent && own.is_some_and(|n| n < 2))
        {
            errors.push(at(
                first.span(),
                format!(
                    "a job that delegates runs beside its children, but limits allow one job at a time \
                     (max_parallel_jobs = {}, max_parallel_per_repo = {}{}): raise them to 2 or more",
                    limits.max_parallel_jobs,
                    limits.max_parallel_per_repo,
                    own.filter(|_| same_agent).map(|n| format!(", agent max_parallel = {n}")).unwrap_or_default()
                ),
            ));
        }
    }
    let prompt = match (&job.prompt, &job.prompt_file) {
        (Some(_), Some(pf)) => {
            errors.push(at(pf.span(), "give either `prompt` or `prompt_file`, not both".into()));
            None
        }
        (Some(p), None) => Some((p.get_ref().clone(), p.span())),
        (None, Some(pf)) => {
            let base = path.parent().unwrap_or(Path::new("."));
            let full = base.join(pf.get_ref());
            match std::fs::read_to_string(&full) {
                Ok(text) => Some((text, pf.span())),
                Err(e) => {
                    errors.push(at(pf.span(), format!("cannot read prompt file {}: {e}", full.display())));
                    None
                }
            }
        }
        (None, None) => {
            errors.push(at(file.job.span(), "[job] needs a `prompt` or a `prompt_file`".into()));
            None
        }
    };
    if let Some((text, span)) = prompt {
        if let Err(e) = env.add_template_owned(template_name(&name), text) {
            errors.push(at(span, format!("invalid prompt template: {}", template_error(&e))));
        }
    }
    let attempts = match &job.attempts {
        Some(a) if *a.get_ref() == 0 || *a.get_ref() > 10 => {
            errors.push(at(a.span(), "attempts must be between 1 and 10".into()));
            1
        }
        Some(a) => *a.get_ref(),
        None => 1,
    };
    let out = &file.output;
    let output = out.kind.as_ref().map(|k| *k.get_ref()).unwrap_or_default();
    if let (Some(kind), Some(what)) = (&out.kind, unavailable(output, &offered)) {
        errors.push(at(kind.span(), format!("{forge_name} offers no {what}: this output is not available there")));
    }
    if let Some(kind) = &out.kind {
        if output == OutputKind::CheckRun && config.github.app_id.is_none() {
            errors.push(at(
                kind.span(),
                "kind = \"check_run\" needs a GitHub App (github.app_id): GitHub lets only Apps create check runs"
                    .into(),
            ));
        }
    }
    if let Some(kind) = &out.kind {
        if output == OutputKind::Push && file.job.get_ref().workspace != WorkspaceKind::PrHead {
            errors.push(at(
                kind.span(),
                "kind = \"push\" commits onto the pull request's head: it needs [job] workspace = \"pr-head\"".into(),
            ));
        }
    }
    if let (Some(m), false) = (&out.on_moved, output == OutputKind::Push) {
        errors.push(at(m.span(), "`on_moved` applies only to kind = \"push\"".into()));
    }
    if let (Some(i), false) = (&out.incremental, output == OutputKind::Review) {
        errors.push(at(i.span(), "`incremental` applies only to kind = \"review\"".into()));
    }
    for n in out.notify.iter().flatten() {
        if !config.notify.contains_key(n.get_ref()) {
            let names: Vec<&str> = config.notify.keys().map(String::as_str).collect();
            let hint = crate::diag::suggest(n.get_ref(), &names)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            errors.push(at(
                n.span(),
                format!(
                    "unknown notify target `{}`{hint}: define it as [notify.{}] in baton.toml",
                    n.get_ref(),
                    n.get_ref()
                ),
            ));
        }
    }
    for e in out.notify_on.iter().flatten() {
        if !NOTIFY_ON.contains(&e.get_ref().as_str()) {
            errors.push(at(
                e.span(),
                format!("unknown job end `{}`; expected one of {}", e.get_ref(), NOTIFY_ON.join(", ")),
            ));
        }
    }
    if let (Some(list), None) = (&out.notify_on, &out.notify) {
        if let Some(first) = list.first() {
            errors.push(at(first.span(), "`notify_on` needs `notify` naming where to send".into()));
        }
    }
    let budget = file.job.get_ref().budget_usd.as_ref();
    let daily = file.job.get_ref().daily_budget_usd.as_ref();
    for (key, b) in [("budget_usd", budget), ("daily_budget_usd", daily)] {
        if let Some(b) = b.filter(|b| !(b.get_ref().is_finite() && *b.get_ref() > 0.0)) {
            errors.push(at(b.span(), format!("{key} must be a positive amount of US dollars")));
        }
    }
    let repairs = file.job.get_ref().max_repairs_per_pr.as_ref();
    if let (Some(r), false) = (repairs, output == OutputKind::Push) {
        errors.push(at(r.span(), "`max_repairs_per_pr` counts pushes: it needs [output] kind = \"push\"".into()));
    }
    for template in [&out.title, &out.body].into_iter().flatten() {
        if let Err(e) = minijinja::Environment::new().template_from_str(template.get_ref()) {
            errors.push(at(template.span(), format!("invalid template: {}", template_error(&e))));
        }
    }
    for g in out.allowed_paths.iter().flatten() {
        if let Err(e) = glob::Pattern::new(g.get_ref()) {
            errors.push(at(g.span(), format!("invalid glob: {e}")));
        }
    }
    let output_options = OutputOptions {
        progress: out.progress.unwrap_or(matches!(
            output,
            OutputKind::Comment | OutputKind::Review | OutputKind::PullRequest | OutputKind::Push
        )),
        title: out.title.as_ref().map(|t| t.get_ref().clone()),
        body: out.body.as_ref().map(|t| t.get_ref().clone()),
        allowed_paths: out.allowed_paths.iter().flatten().map(|g| g.get_ref().clone()).collect(),
        max_comments: out.max_comments.unwrap_or(3),
        max_pull_requests: out.max_pull_requests.unwrap_or(1),
        allow_workflow_changes: out.allow_workflow_changes.unwrap_or(false),
        max_push_bytes: out.max_push_bytes.unwrap_or(DEFAULT_MAX_PUSH_BYTES),
        allow_approve: out.allow_approve.unwrap_or(false),
        on_moved: out.on_moved.as_ref().map(|m| *m.get_ref()).unwrap_or_default(),
        incremental: out.incremental.as_ref().is_none_or(|i| *i.get_ref()),
        notify: out.notify.iter().flatten().map(|n| n.get_ref().clone()).collect(),
        notify_on: match &out.notify_on {
            Some(list) => list.iter().map(|e| e.get_ref().clone()).collect(),
            None => NOTIFY_ON.iter().map(|e| e.to_string()).collect(),
        },
        mentions: out.mentions.unwrap_or_default(),
    };
    let priority = match &job.priority {
        Some(p) if !(-100..=100).contains(p.get_ref()) => {
            errors.push(at(p.span(), "priority must be between -100 and 100".into()));
            0
        }
        Some(p) => *p.get_ref() as i8,
        None => 0,
    };
    let mut skills = Vec::new();
    for f in job.skills.iter().flatten() {
        let full = path.parent().unwrap_or(Path::new(".")).join(f.get_ref());
        match std::fs::read_to_string(&full) {
            Ok(text) => skills.push((f.get_ref().clone(), text)),
            Err(e) => errors.push(at(f.span(), format!("cannot read skill file {}: {e}", full.display()))),
        }
    }
    if let Some(c) = &job.concurrency {
        if let Err(e) = env.add_template_owned(concurrency_name(&name), c.get_ref().clone()) {
            errors.push(at(c.span(), format!("invalid concurrency template: {}", template_error(&e))));
        }
    }
    let on_conflict = match (&job.cancel_in_progress, job.on_conflict) {
        (Some(c), Some(p)) if *c.get_ref() && p != OnConflict::CancelInProgress => {
            errors.push(at(c.span(), "cancel_in_progress = true contradicts on_conflict".into()));
            p
        }
        (Some(c), None) if *c.get_ref() => OnConflict::CancelInProgress,
        (_, p) => p.unwrap_or_default(),
    };
    if let Some(v) = &job.verify {
        if v.get_ref().is_empty() {
            errors.push(at(v.span(), "verify must name a command".into()));
        }
    }

    let only_forge = f.forge.as_ref().and_then(|name| {
        let forge = Forge::of_source(name.get_ref());
        if forge.is_none() {
            errors.push(at(name.span(), format!("unknown forge `{}`; expected `github` or `gitlab`", name.get_ref())));
        }
        forge
    });

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Trigger {
        name,
        file: path.to_path_buf(),
        description: file.description,
        on: file.on.into_inner().into_iter().map(Spanned::into_inner).collect(),
        filter: Filter {
            repos,
            branches,
            labels: f.labels.clone().unwrap_or_default(),
            exclude_labels: f.exclude_labels.clone().unwrap_or_default(),
            authors,
            conclusions: f.conclusions.clone().unwrap_or_default(),
            command,
            has_condition: f.condition.is_some(),
            condition_source: f.condition.as_ref().map(|c| c.get_ref().clone()),
            draft: f.draft.unwrap_or(false),
            allow_forks: f.allow_forks.unwrap_or(false),
            allow_bots,
            triggers: f.triggers.clone().unwrap_or_default(),
            forge: only_forge,
            own_branches: f.own_branches.unwrap_or(false),
        },
        job: JobTemplate {
            agent: job.agent.get_ref().clone(),
            workspace: job.workspace,
            timeout: job.timeout.map(|t| t.0),
            attempts,
            verify: job.verify.as_ref().map(|v| v.get_ref().clone()),
            max_runs_per_hour: job.max_runs_per_hour,
            priority,
            latest_head: job.latest_head.unwrap_or(false),
            cooldown: job.cooldown.map(|c| c.0),
            backoff: job.backoff.map(|b| b.0),
            has_concurrency: job.concurrency.is_some(),
            on_conflict,
            skills,
            max_repairs_per_pr: repairs.map(|r| *r.get_ref()).unwrap_or(DEFAULT_MAX_REPAIRS),
            budget_usd: budget.map(|b| *b.get_ref()),
            daily_budget_usd: daily.map(|b| *b.get_ref()),
            mcp: job.mcp.iter().flatten().map(|n| n.get_ref().clone()).collect(),
            delegate: job.delegate.iter().flatten().map(|n| n.get_ref().clone()).collect(),
            environment: job.environment.as_ref().map(|e| e.get_ref().clone()),
        },
        output,
        output_options,
        schedule,
        schedule_repos,
    })
}

/// minijinja's message without its "(in template …)" suffix, which would
/// name baton's internal template names.
fn template_error(e: &minijinja::Error) -> String {
    let mut msg = e.detail().map(str::to_string).unwrap_or_else(|| e.kind().to_string());
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK: &str = "on = [\"pull_request.opened\"]\n\n[job]\nagent = \"codex\"\nprompt = \"look\"\n\n[output]\nkind = \"check_run\"\n";

    fn config() -> Config {
        let toml = "[github]\napp_id = 1\nprivate_key = \"k\"\n";
        Config::from_source(None, toml, Path::new(".")).unwrap_or_else(|e| panic!("{e:?}"))
    }

    #[test]
    fn an_output_the_forge_lacks_is_an_error_at_its_kind() {
        let mut env = crate::rules::template::environment();
        let no_checks = Capabilities { check_runs: false, ..Capabilities::ALL };
        let errors = compile_for(Path::new("triggers/t.toml"), CHECK, &config(), &mut env, "Forgejo", no_checks)
            .err()
            .unwrap_or_default();
        let shown: Vec<String> = errors.iter().map(|d| d.to_string()).collect();
        assert_eq!(shown, ["triggers/t.toml:8:8: Forgejo offers no check runs: this output is not available there"]);
    }

    /// Each message for an `on` or `[filter] forge` that can never match.
    fn errors_of(src: &str) -> Vec<String> {
        let mut env = crate::rules::template::environment();
        let errors = compile(Path::new("triggers/t.toml"), src, &config(), &mut env).err().unwrap_or_default();
        errors.iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn gitlab_kinds_are_known_and_githubs_words_for_them_are_not() {
        let ok = "on = [\"merge_request.open\", \"note.merge_request\", \"pipeline.failed\", \"build.failed\", \
                  \"issue.open\", \"pull_request.opened\"]\n[filter]\nforge = \"gitlab\"\n\
                  [job]\nagent = \"codex\"\nprompt = \"x\"\n";
        assert_eq!(errors_of(ok), Vec::<String>::new());
        let github_word = "on = [\"merge_request.opened\"]\n[job]\nagent = \"codex\"\nprompt = \"x\"\n";
        let shown = errors_of(github_word);
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(shown[0].starts_with("triggers/t.toml:1:7: unknown action `opened` for GitLab's `merge_request` event (did you mean `merge_request.open`?)"), "{shown:?}");
        let forge = "on = [\"issue.open\"]\n[filter]\nforge = \"gitea\"\n[job]\nagent = \"codex\"\nprompt = \"x\"\n";
        assert_eq!(errors_of(forge), ["triggers/t.toml:3:9: unknown forge `gitea`; expected `github` or `gitlab`"]);
    }

    #[test]
    fn github_offers_every_output() {
        let mut env = crate::rules::template::environment();
        let compiled = compile(Path::new("triggers/t.toml"), CHECK, &config(), &mut env);
        assert!(compiled.is_ok(), "{:?}", compiled.err());
        for kind in [
            OutputKind::Comment,
            OutputKind::PullRequest,
            OutputKind::Push,
            OutputKind::Review,
            OutputKind::CheckRun,
            OutputKind::None,
        ] {
            assert_eq!(unavailable(kind, &Forge::GITHUB.capabilities()), None, "{kind:?}");
        }
    }
}
