//! `POST /api/jobs`: a job asked for directly — by a person, a script or an
//! agent session — rather than by a webhook.
//!
//! The request becomes an `api` event judged by the rules like any other:
//! either a trigger with `on = ["api"]`, or a trigger made up from the
//! request's own fields (`[api] allow_adhoc`). From there it is stored,
//! queued, limited, sandboxed and published as every job is. The
//! `Idempotency-Key` header names the event, so the store's dedupe of
//! deliveries makes a retried request find the job the first one made.

use std::path::Path;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::wire::{self, BadField, CreateChild, CreateJob, ErrorBody};
use super::{error, store_error, Api};
use crate::admit::{Door, Origin, Received};
use crate::engine::team::{self, Caller, Grant};
use crate::event::{Event, ParentJob, Repository};
use crate::rules::{RuleSet, Verdict, WorkspaceKind};
use crate::store::Accepted;

/// The event kind and source of a job asked for through the API.
pub(crate) const API_EVENT: &str = "api";

/// The name of a job made up from a request's own fields.
pub(crate) const ADHOC_TRIGGER: &str = "api";

/// Why a request made no job.
#[derive(Debug)]
enum Refusal {
    /// 400, naming the field at fault.
    Bad(BadField),
    /// 403: this daemon, or this caller, creates no such job.
    Forbidden(String),
    /// The store could not answer.
    Store(crate::store::StoreError),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Bad(bad) => (StatusCode::BAD_REQUEST, Json(ErrorBody::from(bad))).into_response(),
            Refusal::Forbidden(why) => error(StatusCode::FORBIDDEN, why),
            Refusal::Store(e) => store_error(e),
        }
    }
}

fn bad(field: &str, message: impl std::fmt::Display) -> Refusal {
    Refusal::Bad(BadField::new(field, message))
}

impl From<BadField> for Refusal {
    fn from(bad: BadField) -> Refusal {
        Refusal::Bad(bad)
    }
}

pub(super) async fn create_job(
    State(s): State<Api>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match create(&s, &caller, &headers, &body).await {
        Ok(r) => r,
        Err(refusal) => refusal.into_response(),
    }
}

async fn create(s: &Api, caller: &Caller, headers: &HeaderMap, body: &[u8]) -> Result<Response, Refusal> {
    // Without a token, anyone who can reach the port could start agents.
    if s.token.is_none() && matches!(caller, Caller::Operator) {
        return Err(Refusal::Forbidden("creating jobs through the API needs server.api_token".into()));
    }
    // Kept as an object until the caller is known: which type it must be
    // depends on who asks.
    let body = wire::object(body)?;
    // A team's keys are its own: another job's key never finds this one's.
    let scope = match caller {
        Caller::Operator => API_EVENT.to_string(),
        Caller::Team(grant) => format!("{API_EVENT}:{}", grant.job),
    };
    let delivery = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => format!("{scope}:{}", random_id()),
        Some(Ok(key)) if !key.is_empty() && key.len() <= 200 => format!("{scope}:key:{key}"),
        Some(_) => return Err(bad("Idempotency-Key", "must be 1 to 200 visible ASCII characters")),
    };
    if let Caller::Team(grant) = caller {
        if body.contains_key("trigger") {
            return Err(Refusal::Forbidden(wire::CHILD_NO_TRIGGER.into()));
        }
        return child(s, grant, wire::from_object(body)?, &delivery).await;
    }
    // A job's own field given (even as `null`) beside a trigger is refused:
    // the trigger decides it, and silence would hide the mistake.
    let given: Vec<&'static str> =
        ["agent", "workspace", "ref", "prompt", "output"].into_iter().filter(|f| body.contains_key(*f)).collect();
    let req: CreateJob = wire::from_object(body)?;
    let event = event_of(&req, &delivery)?;
    let (rules, name): (std::sync::Arc<RuleSet>, String) = match req.trigger.clone() {
        Some(name) => {
            if let Some(field) = given.first() {
                return Err(bad(field, "comes from the trigger; give either `trigger` or the job's own fields"));
            }
            let rules = s.rules.current();
            match rules.get(&name) {
                None => return Err(bad("trigger", format!("no trigger `{name}`"))),
                Some(t) if !t.on.iter().any(|k| k == API_EVENT) => {
                    return Err(bad(
                        "trigger",
                        format!("`{name}` is not started through the API (it needs on = [\"api\"])"),
                    ));
                }
                Some(t) => needs(t.job.workspace, &req)?,
            }
            (rules, name)
        }
        None => (std::sync::Arc::new(adhoc(s, &req)?), ADHOC_TRIGGER.to_string()),
    };
    let spec = judge(&rules, &name, &event)?;
    admit(s, event, &name, spec).await
}

/// What a trigger's workspace needs the request to name: the repository
/// (and, for `head-sha`, the commit). Said before matching, as the field to
/// add, rather than as the event the request became.
fn needs(workspace: WorkspaceKind, req: &CreateJob) -> Result<(), Refusal> {
    let kind = match workspace {
        WorkspaceKind::None => return Ok(()),
        WorkspaceKind::DefaultBranch => "default-branch",
        WorkspaceKind::PrHead => "pr-head",
        WorkspaceKind::HeadSha => "head-sha",
    };
    if req.repo.is_none() {
        return Err(bad("repo", format!("`repo` is required for workspace `{kind}`")));
    }
    if workspace == WorkspaceKind::HeadSha && req.git_ref.is_none() {
        return Err(bad("ref", "`ref` is required for workspace `head-sha` (the commit to check out)"));
    }
    Ok(())
}

/// The job `rules`' trigger `name` makes of `event`, or why it makes none.
fn judge(rules: &RuleSet, name: &str, event: &Event) -> Result<crate::rules::JobSpec, Refusal> {
    match rules.judge_one(name, event) {
        Some(Verdict::Matched(spec)) => Ok(*spec),
        Some(Verdict::Rejected { filter, reason }) => {
            Err(bad("trigger", format!("`{name}` does not take this request ({filter}: {reason})")))
        }
        Some(Verdict::Held { reason, .. }) => Err(bad("trigger", reason)),
        None => Err(bad("trigger", format!("no trigger `{name}`"))),
    }
}

/// Admits the job as a delivery of its own, or finds the one an earlier
/// request with the same key made.
async fn admit(s: &Api, event: Event, name: &str, spec: crate::rules::JobSpec) -> Result<Response, Refusal> {
    let id = crate::domain::job_id(&event.delivery, name);
    let door = Door { store: &s.store, rules: &s.rules, wake: Some(&s.wake), reject_replays: false };
    match door.admit(event, Origin::Api { spec: Box::new(spec) }).await {
        Ok(Some(Received { accepted: Accepted::New(admitted), .. })) => {
            if let Some(skip) = admitted.skipped.first() {
                let answer = ErrorBody {
                    skipped: Some(skip.reason.clone()),
                    ..ErrorBody::new(format!("not started: {}", skip.reason))
                };
                return Ok((StatusCode::TOO_MANY_REQUESTS, Json(answer)).into_response());
            }
            tracing::info!(job = %id, trigger = %name, "Job created through the API.");
            Ok(found(s, &id, StatusCode::CREATED).await)
        }
        // The same Idempotency-Key again: the job the first request made.
        Ok(_) => Ok(found(s, &id, StatusCode::OK).await),
        Err(e) => Ok(store_error(e)),
    }
}

/// A child of the job `grant` belongs to: one of its agents, on its
/// repository (at its commit unless told otherwise), one level deeper, with
/// what is left of its budget, and its result kept on the job for the
/// parent to read.
async fn child(s: &Api, grant: &Grant, req: CreateChild, delivery: &str) -> Result<Response, Refusal> {
    let config = s.engine.config();
    let agent = req.agent.as_deref().ok_or_else(|| bad("agent", "is required"))?;
    if !grant.agents.iter().any(|a| a == agent) {
        return Err(bad(
            "agent",
            format!("`{agent}` is not one this job may delegate to: [{}]", grant.agents.join(", ")),
        ));
    }
    let prompt = req.prompt.clone().ok_or_else(|| bad("prompt", "is required"))?;
    if req.repo.as_deref().is_some_and(|r| Some(r) != grant.repo.as_deref()) {
        return Err(bad("repo", "a child works on its parent's repository"));
    }
    team::child_depth(grant, config.limits.max_chain_depth).map_err(|e| Refusal::Forbidden(e.to_string()))?;
    let share = req.share.unwrap_or(1);
    let committed = committed(s, &grant.job).await?;
    let budget = team::child_budget(grant, committed, share).map_err(|e| Refusal::Forbidden(e.to_string()))?;

    let git_ref = req.git_ref.clone().or_else(|| grant.head_sha.clone());
    let default = match (&grant.repo, &git_ref) {
        (None, _) => "none",
        (Some(_), Some(_)) => "head-sha",
        (Some(_), None) => "default-branch",
    };
    let workspace = req.workspace.as_deref().unwrap_or(default);
    // Children may hand work on, with the same agents, until the depth limit.
    let mut extra = vec![("delegate", toml_inline(&json!(grant.agents)).unwrap_or_default())];
    if let Some(usd) = budget {
        extra.push(("budget_usd", format!("{usd}")));
    }
    let rules = compile(config, agent, workspace, &Map::new(), &extra)?;

    let own = CreateJob { prompt: Some(prompt), repo: grant.repo.clone(), ..CreateJob::default() };
    let mut event = event_of(&own, delivery)?;
    if let Some(repo) = event.repository.as_mut() {
        repo.default_branch = grant.default_branch.clone().or(Some("HEAD".into()));
    }
    event.access = grant.access;
    event.head_sha = git_ref;
    event.parent = Some(ParentJob {
        id: grant.job.clone(),
        trigger: grant.trigger.clone(),
        depth: grant.depth,
        forge: String::new(),
    });
    let mut spec = judge(&rules, ADHOC_TRIGGER, &event)?;
    spec.parent = Some(grant.job.clone());
    let answer = admit(s, event, ADHOC_TRIGGER, spec).await?;
    if answer.status() == StatusCode::CREATED {
        let id = crate::domain::job_id(delivery, ADHOC_TRIGGER);
        s.engine.note(&grant.job, &format!("delegated job {id} to agent `{agent}`")).await;
    }
    Ok(answer)
}

/// What the job `parent`'s finished attempts and its ended children spent,
/// and what its unfinished children were given to spend.
async fn committed(s: &Api, parent: &str) -> Result<f64, Refusal> {
    let cost = |j: &crate::store::Job| j.usage.as_ref().and_then(|u| u.cost_usd).unwrap_or(0.0);
    let own = s.store.job(parent).await.map_err(Refusal::Store)?.as_ref().map_or(0.0, cost);
    let query =
        crate::store::JobQuery { parent: Some(parent.to_string()), limit: crate::api::MAX_LIMIT, ..Default::default() };
    let children = s.store.list_jobs(&query).await.map_err(Refusal::Store)?;
    let given = |j: &crate::store::Job| {
        if j.state.is_final() {
            cost(j)
        } else {
            j.spec.budget_usd.unwrap_or(0.0).max(cost(j))
        }
    };
    Ok(own + children.iter().map(given).sum::<f64>())
}

async fn found(s: &Api, id: &str, status: StatusCode) -> Response {
    match s.store.job(id).await {
        Ok(Some(job)) => (status, Json(job)).into_response(),
        Ok(None) => error(StatusCode::CONFLICT, "this Idempotency-Key was used by a request that made no job"),
        Err(e) => store_error(e),
    }
}

fn random_id() -> String {
    let mut bytes = [0u8; 12];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy: the clock still tells requests apart.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return format!("t{}", nanos.as_nanos());
    }
    hex::encode(bytes)
}

/// The `api` event of a request: its repository, subject and inputs.
fn event_of(req: &CreateJob, delivery: &str) -> Result<Event, Refusal> {
    let repo = req.repo.as_deref();
    if repo.is_some_and(|r| crate::event::split_repo_name(r).is_none()) {
        return Err(bad("repo", "must be owner/name"));
    }
    let git_ref = req.git_ref.as_deref();
    let inputs = req.inputs.clone().unwrap_or_default();
    let prompt = req.prompt.as_deref().unwrap_or_default();
    let payload = json!({
        "inputs": inputs,
        "api": { "prompt": prompt },
        "repository": repo.map(|r| json!({ "full_name": r })),
    });
    let mut event = Event::new(API_EVENT, API_EVENT, None, delivery, crate::event::Payload::from_value(payload));
    // No request names the default branch: `HEAD` is the remote's own.
    event.repository = repo.map(|r| Repository {
        full_name: r.to_string(),
        default_branch: Some(git_ref.unwrap_or("HEAD").to_string()),
        id: None,
    });
    event.head_sha = git_ref.map(str::to_string);
    event.subject = req.subject;
    Ok(event)
}

/// The trigger a free-form request describes, compiled like a file: a
/// mistake is reported under the request field it came from.
fn adhoc(s: &Api, req: &CreateJob) -> Result<RuleSet, Refusal> {
    let config = s.engine.config();
    if !config.api.allow_adhoc {
        return Err(Refusal::Forbidden(
            "a job without `trigger` needs [api] allow_adhoc = true (and the agent in [api] agents)".into(),
        ));
    }
    let agent = req.agent.as_deref().ok_or_else(|| bad("agent", "is required without `trigger`"))?;
    if !config.api.agents.iter().any(|a| a == agent) {
        return Err(bad("agent", format!("`{agent}` is not one of [api] agents: [{}]", config.api.agents.join(", "))));
    }
    req.prompt.as_deref().ok_or_else(|| bad("prompt", "is required without `trigger`"))?;
    let default = if req.repo.is_some() { "default-branch" } else { "none" };
    let workspace = req.workspace.as_deref().unwrap_or(default);
    compile(config, agent, workspace, &req.output.clone().unwrap_or_default(), &[])
}

/// A trigger on `api` events running `agent` in `workspace` on the event's
/// prompt, with `output` and further `[job]` lines (`extra`, written as
/// TOML already): compiled like a file, each error mapped to the request
/// field on its line.
fn compile(
    config: &crate::config::Config,
    agent: &str,
    workspace: &str,
    output: &Map<String, Value>,
    extra: &[(&str, String)],
) -> Result<RuleSet, Refusal> {
    let quote = |s: &str| Value::String(s.to_string()).to_string();
    // (line of the source, the request field it holds)
    let mut fields: Vec<&str> = vec!["on", "[job]", "agent", "workspace", "prompt"];
    let mut source = format!(
        "on = [\"{API_EVENT}\"]\n[job]\nagent = {}\nworkspace = {}\nprompt = \"{{{{ api.prompt }}}}\"\n",
        quote(agent),
        quote(workspace)
    );
    for (key, value) in extra {
        source.push_str(&format!("{key} = {value}\n"));
        fields.push("body");
    }
    source.push_str("[output]\n");
    fields.push("output");
    if !output.contains_key("kind") {
        source.push_str("kind = \"none\"\n");
        fields.push("output.kind");
    }
    let keys: Vec<String> = output.keys().map(|k| format!("output.{k}")).collect();
    for ((key, value), field) in output.iter().zip(&keys) {
        let value = toml_inline(value).ok_or_else(|| bad(field, "must not be null"))?;
        source.push_str(&format!("{} = {value}\n", quote(key)));
        fields.push(field);
    }
    RuleSet::one(Path::new(ADHOC_TRIGGER), &source, config).map_err(|errors| {
        let e = &errors[0];
        let field = e.line.checked_sub(1).and_then(|i| fields.get(i)).copied().unwrap_or("body");
        bad(field, &e.message)
    })
}

/// A JSON value written as TOML (JSON's strings, numbers, booleans and
/// arrays are TOML already); `None` for a null, which TOML lacks.
fn toml_inline(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Array(items) => {
            Some(format!("[{}]", items.iter().map(toml_inline).collect::<Option<Vec<_>>>()?.join(", ")))
        }
        Value::Object(map) => {
            let pairs: Option<Vec<String>> =
                map.iter().map(|(k, v)| Some(format!("{} = {}", Value::String(k.clone()), toml_inline(v)?))).collect();
            Some(format!("{{ {} }}", pairs?.join(", ")))
        }
        scalar => Some(scalar.to_string()),
    }
}
