//! baton as a Model Context Protocol server: tools with which an agent
//! session (Claude Code, Codex, any MCP client) hands work to baton and
//! follows it.
//!
//! The tools speak only baton's HTTP API, through its typed client
//! ([`Client`], chosen per call by a [`Daemon`]): over HTTP for `baton mcp`
//! (stdio, beside a running daemon), or in-process for the daemon's own
//! `/mcp` (streamable HTTP). So both are one server, and
//! whatever the API checks (token, fields, limits) holds for both. A failed
//! call comes back as a tool error with the API's reason, never as a crash
//! of the server.

use std::time::Duration;

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::client::{Client, ClientError};
use crate::api::wire::{self, CreateChild, CreateJob, Job, JobsQuery};
use crate::config::Secret;
use crate::engine::team::Caller;

/// The longest `wait_job` blocks, whatever it is asked.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Jobs one `delegate` call may start.
const MAX_FAN_OUT: usize = 16;
const POLL: Duration = Duration::from_millis(500);

/// How the tools reach the API: one [`Client`], over HTTP or in-process.
#[derive(Clone)]
pub(crate) enum Daemon {
    /// A daemon reached over HTTP (`baton mcp`).
    Http(Client),
    /// The daemon's own routes, called in-process (its `/mcp`, which already
    /// checked the caller's token): each request answers as its caller.
    Local { routes: axum::Router, web_url: String },
}

impl Daemon {
    pub fn http(url: &str, token: Option<String>) -> Daemon {
        Daemon::Http(Client::new(url, token.map(Secret::new)))
    }

    /// The client for one tool call by `caller` (none over stdio: there the
    /// daemon's HTTP API checks the token itself).
    fn client(&self, caller: Option<&Caller>) -> Result<Client, String> {
        match self {
            Daemon::Http(client) => Ok(client.clone()),
            // `/mcp` let the request in with the caller it found; the
            // routes answer as that caller.
            Daemon::Local { routes, web_url } => caller
                .map(|c| Client::local(routes.clone(), c.clone(), web_url))
                .ok_or_else(|| "the request reached /mcp without a caller".to_string()),
        }
    }
}

/// The server: the tools (`#[tool_router]` below) and the daemon they call.
#[derive(Clone)]
pub(crate) struct BatonMcp {
    daemon: Daemon,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct Delegate {
    /// A trigger with `on = ["api"]` to run (then `inputs`), instead of the
    /// free-form fields.
    pub trigger: Option<String>,
    /// The trigger's inputs (`{{ inputs.KEY }}` in its templates).
    pub inputs: Option<Map<String, Value>>,
    /// Free-form: the agent to run (one of the daemon's `[api] agents`).
    pub agent: Option<String>,
    /// The repository, `owner/name`.
    pub repo: Option<String>,
    /// none | default-branch | head-sha | pr-head.
    pub workspace: Option<String>,
    /// The branch (default-branch) or commit (head-sha).
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// Free-form: the task.
    pub prompt: Option<String>,
    /// Where the result goes, as a trigger's [output] (default: stays on the job).
    pub output: Option<Map<String, Value>>,
    /// The issue or pull request the job is about.
    pub subject: Option<u64>,
    /// Start this many identical jobs (parallel attempts at one task).
    pub count: Option<u32>,
    /// Start one job per prompt, in parallel (instead of `prompt`).
    pub prompts: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct ListJobs {
    /// queued | running | succeeded | failed | cancelled | skipped.
    pub state: Option<String>,
    pub trigger: Option<String>,
    /// Only the children of this job (those it delegated).
    pub parent: Option<String>,
    /// At most this many, newest first (default 20).
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct JobId {
    /// The job's id.
    pub id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct JobLog {
    pub id: String,
    /// Return the log from this byte offset (a previous call's `next_offset`).
    pub(crate) offset: Option<u64>,
    /// Without `offset`: the last this many bytes (default 4000).
    pub tail: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct WaitJob {
    /// One job to wait for…
    pub id: Option<String>,
    /// …or several.
    pub ids: Option<Vec<String>>,
    /// Seconds to wait at most (default 60, at most 600).
    pub timeout: Option<u64>,
    /// Return as soon as one of them ends, rather than all.
    pub first: Option<bool>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct RunTrigger {
    /// A trigger with `on = ["api"]`.
    pub trigger: String,
    pub inputs: Option<Map<String, Value>>,
    pub repo: Option<String>,
    pub subject: Option<u64>,
}

fn answer(v: Value) -> Result<CallToolResult, ErrorData> {
    let text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string());
    Ok(CallToolResult::success(vec![ContentBlock::text(text)]))
}

fn refuse(reason: impl Into<String>) -> Result<CallToolResult, ErrorData> {
    Ok(CallToolResult::error(vec![ContentBlock::text(reason.into())]))
}

/// What a caller needs of a job: no spec, no internals.
fn summary(job: &Job) -> Value {
    let job = serde_json::to_value(job).unwrap_or_default();
    json!({
        "id": job["id"], "state": job["state"], "trigger": job["trigger"], "repo": job["repo"], "parent": job["parent"],
        "subject": job["subject"], "attempts": job["attempts"], "error": job["error"],
        "result": job["result"], "usage": job["usage"], "branch": job["branch"],
        "created_at": job["created_at"], "finished_at": job["finished_at"],
        "history": job["history"].as_array().map(|h| h.iter().map(|a| json!({
            "number": a["number"], "outcome": a["outcome"], "error": a["error"], "usage": a["usage"],
        })).collect::<Vec<_>>()),
    })
}

#[tool_router]
impl BatonMcp {
    pub fn new(daemon: Daemon) -> BatonMcp {
        BatonMcp { daemon }
    }

    #[tool(description = "Hand a task to baton: it runs an agent unattended in an isolated git worktree of the \
        repository, in baton's sandbox, and keeps the result. Give `trigger` (+ `inputs`) to run a trigger made \
        for the API, or the free-form fields (`agent`, `repo`, `prompt`, optional `workspace`, `ref`, `output`, \
        `subject`). `count` starts that many identical jobs; `prompts` one job per prompt. Returns each job's id \
        and dashboard URL at once; follow them with `wait_job`.")]
    async fn delegate(
        &self,
        Parameters(d): Parameters<Delegate>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let client = match self.daemon.client(caller(&ctx)) {
            Ok(c) => c,
            Err(e) => return refuse(e),
        };
        // A team's agent asks for children of its own job, which take fewer
        // fields: the rest are refused here in the words the API used.
        if client.is_team() {
            if d.trigger.is_some() {
                return refuse(format!("403: {}", wire::CHILD_NO_TRIGGER));
            }
            let given =
                [("inputs", d.inputs.is_some()), ("output", d.output.is_some()), ("subject", d.subject.is_some())];
            if let Some((field, _)) = given.iter().find(|(_, given)| *given) {
                return refuse(format!(
                    "400: {field}: a child job takes only agent, prompt, workspace, ref, repo and share"
                ));
            }
        }
        let base = CreateJob {
            trigger: d.trigger,
            inputs: d.inputs,
            agent: d.agent,
            repo: d.repo,
            workspace: d.workspace,
            git_ref: d.git_ref,
            prompt: None,
            output: d.output,
            subject: d.subject,
        };
        let prompts: Vec<Option<String>> = match (d.prompts, d.count) {
            (Some(_), Some(_)) => return refuse("give `count` or `prompts`, not both"),
            (Some(list), None) => list.into_iter().map(Some).collect(),
            (None, count) => vec![d.prompt.clone(); count.unwrap_or(1) as usize],
        };
        if prompts.is_empty() || prompts.len() > MAX_FAN_OUT {
            return refuse(format!("start 1 to {MAX_FAN_OUT} jobs at once"));
        }
        let mut jobs = Vec::new();
        let count = prompts.len();
        for (i, prompt) in prompts.into_iter().enumerate() {
            let req = CreateJob { prompt, ..base.clone() };
            let created = if client.is_team() {
                let child = CreateChild {
                    agent: req.agent,
                    prompt: req.prompt,
                    workspace: req.workspace,
                    git_ref: req.git_ref,
                    repo: req.repo,
                    // A team's fan-out shares what its budget leaves equally.
                    share: (count > 1).then(|| u32::try_from(count - i).unwrap_or(1)),
                };
                client.create_child(&child, None).await
            } else {
                client.create(&req, None).await
            };
            match created.map_err(|e| e.to_string()) {
                Ok(c) => {
                    let id = c.job.id;
                    jobs.push(json!({ "id": id, "state": c.job.state, "url": client.job_url(&id) }));
                }
                // Those already started keep running; the caller learns which.
                Err(e) if jobs.is_empty() => return refuse(e),
                Err(e) => return answer(json!({ "jobs": jobs, "error": e })),
            }
        }
        answer(json!({ "jobs": jobs }))
    }

    #[tool(description = "List baton's jobs, newest first: id, state, trigger, repository, subject.")]
    async fn list_jobs(
        &self,
        Parameters(q): Parameters<ListJobs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let query = JobsQuery {
            state: q.state,
            trigger: q.trigger,
            parent: q.parent,
            limit: Some(q.limit.unwrap_or(20).clamp(1, 500) as usize),
            ..JobsQuery::default()
        };
        match self.client(&ctx).map(|c| async move { c.jobs(&query).await }) {
            Ok(call) => match call.await {
                Ok(list) => answer(json!({ "jobs": list.jobs.iter().map(summary).collect::<Vec<_>>() })),
                Err(e) => refuse(e.to_string()),
            },
            Err(e) => refuse(e),
        }
    }

    #[tool(description = "One job: its state, result (when it ended), error, model usage and attempts.")]
    async fn get_job(
        &self,
        Parameters(j): Parameters<JobId>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        match self.job(caller(&ctx), &j.id).await {
            Ok(job) => answer(summary(&job)),
            Err(e) => refuse(e),
        }
    }

    #[tool(description = "A job's log (the agent's output): its tail, or everything from `offset` on; \
        `next_offset` continues it.")]
    async fn job_log(
        &self,
        Parameters(l): Parameters<JobLog>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let log = match self.client(&ctx) {
            Ok(c) => c.log(&l.id).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let text = match log {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => return refuse(e),
        };
        let len = text.len() as u64;
        let from = match l.offset {
            Some(o) => o.min(len),
            None => len.saturating_sub(l.tail.unwrap_or(4000)),
        };
        let mut from = usize::try_from(from).unwrap_or(0);
        while !text.is_char_boundary(from) {
            from += 1;
        }
        answer(json!({ "text": &text[from..], "offset": from, "next_offset": len }))
    }

    #[tool(description = "Block until jobs end (all of them, or the first with `first`), up to `timeout` \
        seconds; reports progress as each ends. Returns the ended jobs with their results, and the ids still \
        running.")]
    async fn wait_job(
        &self,
        Parameters(w): Parameters<WaitJob>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut pending: Vec<String> = w.id.into_iter().chain(w.ids.into_iter().flatten()).collect();
        pending.dedup();
        if pending.is_empty() {
            return refuse("give `id` or `ids`");
        }
        let total = pending.len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(w.timeout.unwrap_or(60)).min(MAX_WAIT);
        let progress = ctx.meta.get_progress_token();
        let mut done: Vec<Value> = Vec::new();
        loop {
            let mut still = Vec::new();
            for id in pending {
                match self.job(caller(&ctx), &id).await {
                    Ok(job) if job.state.is_final() => {
                        if let Some(token) = &progress {
                            let mut p = ProgressNotificationParam::new(token.clone(), (done.len() + 1) as f64);
                            p.total = Some(total as f64);
                            p.message = Some(format!("job {id} {}", job.state));
                            let _ = ctx.peer.notify_progress(p).await;
                        }
                        done.push(summary(&job));
                    }
                    Ok(_) => still.push(id),
                    Err(e) => return refuse(e),
                }
            }
            pending = still;
            let enough = pending.is_empty() || (w.first.unwrap_or(false) && !done.is_empty());
            if enough || tokio::time::Instant::now() >= deadline {
                return answer(json!({ "ended": done, "pending": pending, "timed_out": !enough }));
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = ctx.ct.cancelled() => return refuse("cancelled"),
            }
        }
    }

    #[tool(description = "Cancel a queued or running job (its agent is stopped).")]
    async fn cancel_job(
        &self,
        Parameters(j): Parameters<JobId>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let cancelled = match self.client(&ctx) {
            Ok(c) => c.cancel(&j.id).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match cancelled {
            Ok(job) => answer(summary(&job)),
            Err(e) => refuse(e),
        }
    }

    #[tool(description = "The daemon's triggers: name, description, the events they start on and the agent; \
        those with `api` in `on` can be run with `run_trigger`.")]
    async fn list_triggers(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
        let listed = match self.client(&ctx) {
            Ok(c) => c.triggers().await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match listed {
            Ok(list) => answer(json!({ "triggers": list.triggers })),
            Err(e) => refuse(e),
        }
    }

    #[tool(description = "Run a trigger made for the API (`on = [\"api\"]`) with its inputs; returns the job's \
        id and dashboard URL.")]
    async fn run_trigger(
        &self,
        Parameters(r): Parameters<RunTrigger>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let req = CreateJob {
            trigger: Some(r.trigger),
            inputs: Some(r.inputs.unwrap_or_default()),
            repo: r.repo,
            subject: r.subject,
            ..CreateJob::default()
        };
        let client = match self.client(&ctx) {
            Ok(c) => c,
            Err(e) => return refuse(e),
        };
        match client.create(&req, None).await {
            Ok(c) => {
                let id = c.job.id;
                answer(json!({ "id": id, "state": c.job.state, "url": client.job_url(&id) }))
            }
            Err(e) => refuse(e.to_string()),
        }
    }
}

impl BatonMcp {
    /// The API client for the caller of this tool call.
    fn client(&self, ctx: &RequestContext<RoleServer>) -> Result<Client, String> {
        self.daemon.client(caller(ctx))
    }

    async fn job(&self, caller: Option<&Caller>, id: &str) -> Result<Job, String> {
        let client = self.daemon.client(caller)?;
        client.job(id).await.map_err(|e: ClientError| e.to_string())
    }
}

/// Who called `/mcp`, as its guard found (none over stdio: there the
/// daemon's HTTP API checks the token itself).
fn caller(ctx: &RequestContext<RoleServer>) -> Option<&Caller> {
    ctx.extensions.get::<axum::http::request::Parts>().and_then(|p| p.extensions.get::<Caller>())
}

#[tool_handler]
impl ServerHandler for BatonMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("baton", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "baton runs coding agents unattended in isolated worktrees. Hand it tasks with `delegate` \
                 (several at once with `count` or `prompts`), then `wait_job` for their results.",
            )
    }
}

/// `baton mcp`: the server over stdio, for a daemon at `url`.
pub async fn serve_stdio(url: &str, token: Option<String>) -> anyhow::Result<()> {
    use rmcp::ServiceExt as _;
    let server = BatonMcp::new(Daemon::http(url, token)).serve(rmcp::transport::stdio()).await?;
    server.waiting().await?;
    Ok(())
}

/// How many `/mcp` sessions may be open, and how long an unused one lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub max: usize,
    pub idle: Duration,
}

type Sessions = rmcp::transport::streamable_http_server::session::local::LocalSessionManager;

/// The daemon's `/mcp`: the server over streamable HTTP, calling `routes`,
/// with at most `limits.max` sessions, each closed after `limits.idle`
/// unused.
pub(crate) fn http_service(
    routes: axum::Router,
    web_url: String,
    stop: tokio_util::sync::CancellationToken,
    limits: SessionLimits,
) -> Capped {
    let daemon = Daemon::Local { routes, web_url };
    let mut config = rmcp::transport::StreamableHttpServerConfig::default().disable_allowed_hosts();
    // The API's own guard checks the Host and the origin first.
    config.cancellation_token = stop;
    // No SSE priming events (here and in the sessions, below): their empty
    // `data:` breaks Gemini CLI 0.61's MCP client (a `JSON.parse` of
    // nothing), and with no event store nothing could be resumed from them.
    config.sse_retry = None;
    let mut sessions = Sessions::default();
    sessions.session_config.sse_retry = None;
    sessions.session_config.keep_alive = Some(limits.idle);
    let sessions = std::sync::Arc::new(sessions);
    let inner = rmcp::transport::StreamableHttpService::new(
        move || Ok(BatonMcp::new(daemon.clone())),
        sessions.clone(),
        config,
    );
    Capped { inner, sessions, max: limits.max }
}

/// `/mcp` with its sessions capped: a request that would open one more
/// (no `Mcp-Session-Id`) while `max` are open is answered 503, and the
/// sessions already open go on.
#[derive(Clone)]
pub(crate) struct Capped {
    inner: rmcp::transport::StreamableHttpService<BatonMcp, Sessions>,
    sessions: std::sync::Arc<Sessions>,
    max: usize,
}

impl tower::Service<axum::extract::Request> for Capped {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        use axum::response::IntoResponse as _;
        let opens = !req.headers().contains_key("mcp-session-id") && req.method() == axum::http::Method::POST;
        let (sessions, max) = (self.sessions.clone(), self.max);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            if opens && sessions.sessions.read().await.len() >= max {
                let why = format!(
                    "{max} MCP sessions are open, the most server.max_mcp_sessions allows; close one \
                     (DELETE /mcp with its Mcp-Session-Id) or wait for an unused one to close"
                );
                let body = axum::Json(wire::ErrorBody::new(why));
                let busy = (axum::http::StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "60")], body);
                return Ok(busy.into_response());
            }
            let answer = tower::ServiceExt::oneshot(&mut inner, req).await;
            Ok(match answer {
                Ok(response) => response.into_response(),
                Err(never) => match never {},
            })
        })
    }
}
