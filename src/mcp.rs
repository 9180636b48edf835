//! baton as a Model Context Protocol server: tools with which an agent
//! session (Claude Code, Codex, any MCP client) hands work to baton and
//! follows it.
//!
//! The tools speak only baton's HTTP API, through a [`Daemon`]: over HTTP
//! for `baton mcp` (stdio, beside a running daemon), or in-process for the
//! daemon's own `/mcp` (streamable HTTP). So both are one server, and
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

use crate::engine::team::Caller;

/// The longest `wait_job` blocks, whatever it is asked.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Jobs one `delegate` call may start.
const MAX_FAN_OUT: usize = 16;
const POLL: Duration = Duration::from_millis(500);

/// How the tools reach the API.
#[derive(Clone)]
pub enum Daemon {
    /// A daemon at `url`, with the API token if one is set.
    Http { url: String, token: Option<String>, http: reqwest::Client },
    /// The daemon's own routes, called in-process (its `/mcp`, which already
    /// checked the caller's token).
    Local { routes: axum::Router, web_url: String },
}

impl Daemon {
    pub fn http(url: &str, token: Option<String>) -> Daemon {
        Daemon::Http { url: url.trim_end_matches('/').to_string(), token, http: reqwest::Client::new() }
    }

    /// The dashboard's address for job `id`.
    fn job_url(&self, id: &str) -> String {
        let base = match self {
            Daemon::Http { url, .. } => url,
            Daemon::Local { web_url, .. } => web_url,
        };
        format!("{}/jobs/{id}", base.trim_end_matches('/'))
    }

    /// One API call: its status and its body (JSON, or the text as a string).
    async fn call(
        &self,
        caller: Option<&Caller>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let (status, bytes) = match self {
            Daemon::Http { url, token, http } => {
                let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
                let mut req = http.request(method, format!("{url}{path}"));
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                if let Some(b) = body {
                    req = req.json(b);
                }
                let resp = req.send().await.map_err(|e| format!("cannot reach baton at {url}: {e}"))?;
                let status = resp.status().as_u16();
                (status, resp.bytes().await.map_err(|e| e.to_string())?.to_vec())
            }
            Daemon::Local { routes, .. } => {
                use tower::ServiceExt as _;
                // `/mcp` let the request in with the caller it found; the
                // routes answer as that caller.
                let caller = caller.ok_or("the request reached /mcp without a caller")?;
                let req = axum::http::Request::builder()
                    .extension(caller.clone())
                    .method(method)
                    .uri(path)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(body.map(|b| b.to_string()).unwrap_or_default()))
                    .map_err(|e| e.to_string())?;
                let resp = routes.clone().oneshot(req).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let bytes =
                    axum::body::to_bytes(resp.into_body(), 64 * 1024 * 1024).await.map_err(|e| e.to_string())?;
                (status, bytes.to_vec())
            }
        };
        let value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok((status, value))
    }

    /// A call whose non-2xx answer is an error naming the API's reason.
    async fn ok(
        &self,
        caller: Option<&Caller>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let (status, v) = self.call(caller, method, path, body).await?;
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let reason = v.get("error").and_then(Value::as_str).map(str::to_string).unwrap_or_else(|| v.to_string());
        Err(format!("{status}: {reason}"))
    }
}

/// The server: the tools (`#[tool_router]` below) and the daemon they call.
#[derive(Clone)]
pub struct BatonMcp {
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
pub struct ListJobs {
    /// queued | running | succeeded | failed | cancelled | skipped.
    pub state: Option<String>,
    pub trigger: Option<String>,
    /// Only the children of this job (those it delegated).
    pub parent: Option<String>,
    /// At most this many, newest first (default 20).
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct JobId {
    /// The job's id.
    pub id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct JobLog {
    pub id: String,
    /// Return the log from this byte offset (a previous call's `next_offset`).
    pub offset: Option<u64>,
    /// Without `offset`: the last this many bytes (default 4000).
    pub tail: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WaitJob {
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
pub struct RunTrigger {
    /// A trigger with `on = ["api"]`.
    pub trigger: String,
    pub inputs: Option<Map<String, Value>>,
    pub repo: Option<String>,
    pub subject: Option<u64>,
}

fn ended(job: &Value) -> bool {
    matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

fn answer(v: Value) -> Result<CallToolResult, ErrorData> {
    let text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string());
    Ok(CallToolResult::success(vec![ContentBlock::text(text)]))
}

fn refuse(reason: impl Into<String>) -> Result<CallToolResult, ErrorData> {
    Ok(CallToolResult::error(vec![ContentBlock::text(reason.into())]))
}

/// What a caller needs of a job: no spec, no internals.
fn summary(job: &Value) -> Value {
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
        let caller = caller(&ctx);
        let mut base = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                base.insert(k.into(), v);
            }
        };
        put("trigger", d.trigger.map(Value::from));
        put("inputs", d.inputs.map(Value::from));
        put("agent", d.agent.map(Value::from));
        put("repo", d.repo.map(Value::from));
        put("workspace", d.workspace.map(Value::from));
        put("ref", d.git_ref.map(Value::from));
        put("output", d.output.map(Value::from));
        put("subject", d.subject.map(Value::from));
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
            let mut body = base.clone();
            if let Some(p) = prompt {
                body.insert("prompt".into(), p.into());
            }
            // A team's fan-out shares what its budget leaves equally.
            if caller.is_some_and(Caller::is_team) && count > 1 {
                body.insert("share".into(), (count - i).into());
            }
            match self.daemon.ok(caller, "POST", "/api/jobs", Some(&Value::Object(body))).await {
                Ok(job) => {
                    let id = job["id"].as_str().unwrap_or_default().to_string();
                    jobs.push(json!({ "id": id, "state": job["state"], "url": self.daemon.job_url(&id) }));
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
        let mut path = format!("/api/jobs?limit={}", q.limit.unwrap_or(20).clamp(1, 500));
        for (k, v) in [("state", q.state), ("trigger", q.trigger), ("parent", q.parent)] {
            if let Some(v) = v {
                path.push_str(&format!(
                    "&{k}={}",
                    v.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "")
                ));
            }
        }
        match self.daemon.ok(caller(&ctx), "GET", &path, None).await {
            Ok(v) => answer(json!({ "jobs": v["jobs"].as_array().map(|j| j.iter().map(summary).collect::<Vec<_>>()) })),
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
        let text = match self.daemon.ok(caller(&ctx), "GET", &format!("/api/jobs/{}/log", encode(&l.id)), None).await {
            Ok(Value::String(t)) => t,
            Ok(other) => other.to_string(),
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
                    Ok(job) if ended(&job) => {
                        if let Some(token) = &progress {
                            let mut p = ProgressNotificationParam::new(token.clone(), (done.len() + 1) as f64);
                            p.total = Some(total as f64);
                            p.message = Some(format!("job {id} {}", job["state"].as_str().unwrap_or("")));
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
        match self.daemon.ok(caller(&ctx), "POST", &format!("/api/jobs/{}/cancel", encode(&j.id)), None).await {
            Ok(job) => answer(summary(&job)),
            Err(e) => refuse(e),
        }
    }

    #[tool(description = "The daemon's triggers: name, description, the events they start on and the agent; \
        those with `api` in `on` can be run with `run_trigger`.")]
    async fn list_triggers(&self, ctx: RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
        match self.daemon.ok(caller(&ctx), "GET", "/api/triggers", None).await {
            Ok(v) => answer(json!({ "triggers": v["triggers"] })),
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
        let mut body = json!({ "trigger": r.trigger, "inputs": r.inputs.unwrap_or_default() });
        if let Some(repo) = r.repo {
            body["repo"] = repo.into();
        }
        if let Some(s) = r.subject {
            body["subject"] = s.into();
        }
        match self.daemon.ok(caller(&ctx), "POST", "/api/jobs", Some(&body)).await {
            Ok(job) => {
                let id = job["id"].as_str().unwrap_or_default().to_string();
                answer(json!({ "id": id, "state": job["state"], "url": self.daemon.job_url(&id) }))
            }
            Err(e) => refuse(e),
        }
    }
}

impl BatonMcp {
    async fn job(&self, caller: Option<&Caller>, id: &str) -> Result<Value, String> {
        self.daemon.ok(caller, "GET", &format!("/api/jobs/{}", encode(id)), None).await
    }
}

/// Who called `/mcp`, as its guard found (none over stdio: there the
/// daemon's HTTP API checks the token itself).
fn caller(ctx: &RequestContext<RoleServer>) -> Option<&Caller> {
    ctx.extensions.get::<axum::http::request::Parts>().and_then(|p| p.extensions.get::<Caller>())
}

/// A job id as a path segment (ids are hex; anything else cannot match).
fn encode(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect()
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

/// The daemon's `/mcp`: the server over streamable HTTP, calling `routes`.
pub fn http_service(
    routes: axum::Router,
    web_url: String,
    stop: tokio_util::sync::CancellationToken,
) -> rmcp::transport::StreamableHttpService<
    BatonMcp,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    let daemon = Daemon::Local { routes, web_url };
    let mut config = rmcp::transport::StreamableHttpServerConfig::default().disable_allowed_hosts();
    // The API's own guard checks the Host and the origin first.
    config.cancellation_token = stop;
    // No SSE priming events (here and in the sessions, below): their empty
    // `data:` breaks Gemini CLI 0.61's MCP client (a `JSON.parse` of
    // nothing), and with no event store nothing could be resumed from them.
    config.sse_retry = None;
    let mut sessions = rmcp::transport::streamable_http_server::session::local::LocalSessionManager::default();
    sessions.session_config.sse_retry = None;
    rmcp::transport::StreamableHttpService::new(move || Ok(BatonMcp::new(daemon.clone())), sessions.into(), config)
}
