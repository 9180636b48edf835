//! The HTTP API for people and scripts: health, readiness and jobs.
//!
//! Reads come straight from the store; cancel goes through the engine (a
//! running job's agent must be stopped), retry through the store and a wake.
//! With `server.api_token` set, every `/api` route wants it as a bearer token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tokio::sync::Notify;

use crate::config::Secret;
pub use crate::engine::team::Caller;
use crate::engine::Engine;
use crate::store::{JobQuery, JobState, Store, StoreError};

pub mod client;
mod create;
mod dashboard;
mod origin;
pub mod wire;

pub(crate) use origin::Hosts;

/// The most jobs one page returns: a larger `limit` gets this many and a
/// `next` cursor, so no request builds an unbounded answer in memory.
pub(crate) const MAX_LIMIT: usize = 10_000;

#[derive(Clone)]
pub struct Api {
    pub store: Store,
    pub engine: Arc<Engine>,
    pub token: Option<Secret>,
    pub(crate) wake: Arc<Notify>,
    pub ready: Arc<AtomicBool>,
    pub rules: crate::rules::SharedRules,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The names this daemon answers to (DNS rebinding and CSRF guard).
    pub(crate) hosts: Arc<Hosts>,
    /// Live log streams at once (`server.max_streams`); none left: 503.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Where the dashboard is reached (`server.public_url`, else the listen
    /// address), for the links `/mcp` answers with.
    pub(crate) web_url: String,
    /// Cancelled at shutdown: ends `/mcp`'s open sessions.
    pub stop: tokio_util::sync::CancellationToken,
}

/// The API's routes without their guards, for `/mcp`'s tools to call
/// in-process: the caller's token was checked at `/mcp` already.
pub(crate) fn inner_routes(state: Api) -> Router {
    routes().with_state(state)
}

/// Every route, guarded, with `mcp` served at `/mcp` behind the same
/// guards. The daemon builds `mcp` (over [`inner_routes`]): the MCP server
/// is a client of this API, so the API does not know it.
pub fn router<M>(state: Api, mcp: M) -> Router
where
    M: tower::Service<Request, Error = std::convert::Infallible> + Clone + Send + Sync + 'static,
    M::Response: IntoResponse + 'static,
    M::Future: Send + 'static,
{
    let api = routes()
        .route_service("/mcp", mcp)
        .route_layer(middleware::from_fn_with_state(state.clone(), mcp_needs_token))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route_layer(middleware::from_fn_with_state(state.hosts.clone(), origin::same_site));
    Router::new()
        .route("/healthz", get(|| async { Json(wire::Health { ok: true }) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(state)
}

/// The API's own routes, without their guards.
fn routes() -> Router<Api> {
    Router::new()
        .route("/api/jobs", get(list_jobs).post(create::create_job))
        .route("/api/jobs/{id}", get(show_job))
        .route("/api/jobs/{id}/log", get(job_log))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/jobs/{id}/retry", post(retry_job))
        .route("/api/triggers", get(list_triggers))
        .route("/", get(dashboard::jobs_page))
        .route("/jobs/{id}", get(dashboard::job_page))
}

/// `/mcp` hands out agents' work: like `POST /api/jobs`, it is served only
/// behind an API token (or a team job's).
async fn mcp_needs_token(State(s): State<Api>, req: Request, next: Next) -> Response {
    let team = req.extensions().get::<Caller>().is_some_and(Caller::is_team);
    if s.token.is_none() && !team && req.uri().path() == "/mcp" {
        return error(StatusCode::FORBIDDEN, "/mcp needs server.api_token");
    }
    next.run(req).await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(wire::ErrorBody::new(message))).into_response()
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::NoSuchJob(id) => error(StatusCode::NOT_FOUND, format!("job {id} not found")),
        StoreError::WrongState { .. } => error(StatusCode::CONFLICT, e.to_string()),
        other if other.is_unavailable() => {
            tracing::error!(error = %other, "Store unavailable in the API.");
            error(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable; retry shortly")
        }
        other => {
            tracing::error!(error = %other, "Store error in the API.");
            error(StatusCode::INTERNAL_SERVER_ERROR, "store error; see the daemon log")
        }
    }
}

async fn require_token(State(s): State<Api>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let team = given.and_then(|g| s.engine.grants().find(g));
    let caller = match (&s.token, team) {
        (_, Some(grant)) => Caller::Team(grant),
        (Some(token), None) if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.expose().as_bytes())) => {
            Caller::Operator
        }
        (Some(_), None) => {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(wire::ErrorBody::new("missing or wrong bearer token")),
            )
                .into_response();
        }
        (None, None) => Caller::Operator,
    };
    if caller.is_team() && req.uri().path() != "/mcp" {
        return error(StatusCode::FORBIDDEN, "a job's token reaches only /mcp");
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(s): State<Api>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        Json(wire::Ready { ready: true }).into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State(s): State<Api>) -> Response {
    let queued = s.store.queue_len().await.unwrap_or(0);
    let bytes = s.store.size_on_disk();
    let text = s.metrics.render(queued, s.engine.running_count(), bytes, s.engine.space().gauge());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn list_jobs(
    State(s): State<Api>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if n >= 1 => n.min(MAX_LIMIT),
        Some(_) => return error(StatusCode::BAD_REQUEST, "limit must be a positive number"),
    };
    let state = match q.get("state").map(|s| JobState::parse(s)) {
        None => None,
        Some(Some(st)) => Some(st),
        Some(None) => {
            return error(StatusCode::BAD_REQUEST, "state must be one of queued, running, succeeded, failed, cancelled")
        }
    };
    let before = match q.get("cursor").map(|c| c.parse::<u64>()) {
        None => None,
        Some(Ok(seq)) => Some(seq),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "cursor must be the `next` of an earlier page"),
    };
    let query = JobQuery {
        delivery: q.get("delivery").cloned(),
        state,
        trigger: q.get("trigger").cloned(),
        repo: q.get("repo").cloned(),
        // A team's agent sees its own job's children, and nothing else.
        parent: match &caller {
            Caller::Team(grant) => Some(grant.job.clone()),
            Caller::Operator => q.get("parent").cloned(),
        },
        limit,
        before,
    };
    match s.store.list_jobs(&query).await {
        Ok(jobs) => {
            // A full page may have more behind it: `next` resumes after its last job.
            let next = (jobs.len() == limit).then(|| jobs.last().map(|j| j.seq.to_string())).flatten();
            let mut answer = wire::JobList { jobs, next, skipped: None };
            // One delivery's page also says what it matched but skipped
            // (rate limits, cooldowns, budgets), and why.
            if let Some(id) = &query.delivery {
                match s.store.delivery(id).await {
                    Ok(d) => answer.skipped = Some(d.map(|d| d.skipped).unwrap_or_default()),
                    Err(e) => return store_error(e),
                }
            }
            Json(answer).into_response()
        }
        Err(e) => store_error(e),
    }
}

/// Job `id`, if it exists and `caller` may see it; else the answer to give
/// (a job the caller may not see is not found, as one that does not exist).
async fn visible_job(s: &Api, caller: &Caller, id: &str) -> Result<crate::store::Job, Response> {
    match s.store.job(id).await {
        Ok(Some(job)) if caller.reaches(&job) => Ok(job),
        Ok(_) => Err(error(StatusCode::NOT_FOUND, format!("job {id} not found"))),
        Err(e) => Err(store_error(e)),
    }
}

async fn show_job(State(s): State<Api>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Response {
    match visible_job(&s, &caller, &id).await {
        Ok(job) => Json(job).into_response(),
        Err(answer) => answer,
    }
}

async fn job_log(
    State(s): State<Api>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(answer) = visible_job(&s, &caller, &id).await {
        return answer;
    }
    let wants_events =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    if wants_events {
        return log_events(s, id);
    }
    let path = s.engine.job_dir(&id).join("log");
    let text = log_from(&s, &id, &path, 0, false).await;
    // The log is the agent's raw output; what leaves the daemon is scrubbed.
    let text = s.engine.redact(&String::from_utf8_lossy(&text));
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// How often a followed log is checked for new lines.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The job's log as Server-Sent Events: what is there, then each new line as
/// it is written (one `data:` per line), and `event: end` with the job's
/// final state once it has ended and every line has been sent.
fn log_events(s: Api, id: String) -> Response {
    struct Follow {
        s: Api,
        id: String,
        path: std::path::PathBuf,
        offset: u64,
        done: bool,
        /// The stream's place under `server.max_streams`, given back when it ends.
        _slot: tokio::sync::OwnedSemaphorePermit,
    }
    let Ok(slot) = s.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(wire::ErrorBody::new("too many live log streams; retry shortly or read the log without following")),
        )
            .into_response();
    };
    let path = s.engine.job_dir(&id).join("log");
    let start = Follow { s, id, path, offset: 0, done: false, _slot: slot };
    let stream = futures_util::stream::unfold(start, |mut f| async move {
        if f.done {
            return None;
        }
        loop {
            let state = f.s.store.job(&f.id).await.ok().flatten().map(|j| j.state);
            let ended = state.is_none_or(|st| st.is_final());
            // Whole lines while the job runs; everything once it has ended.
            let text = log_from(&f.s, &f.id, &f.path, f.offset, !ended).await;
            if !text.is_empty() {
                f.offset += text.len() as u64;
                let text = f.s.engine.redact(&String::from_utf8_lossy(&text));
                let mut event = String::new();
                for line in text.trim_end_matches('\n').split('\n') {
                    event.push_str("data: ");
                    event.push_str(line.trim_end_matches('\r'));
                    event.push('\n');
                }
                event.push('\n');
                return Some((Ok::<_, std::convert::Infallible>(event), f));
            }
            if ended {
                f.done = true;
                let state = state.map_or("gone", |st| st.as_str());
                return Some((Ok(format!("event: end\ndata: {state}\n\n")), f));
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "log stream failed"))
}

/// A job's log from `offset`: this replica's file when it ran the job here,
/// else what the replica that runs it shipped to the store.
async fn log_from(s: &Api, id: &str, path: &std::path::Path, offset: u64, whole_lines: bool) -> Vec<u8> {
    if tokio::fs::try_exists(path).await.unwrap_or(false) {
        return read_from(path, offset, whole_lines).await;
    }
    let mut buf = s.store.read_log(id, offset).await.ok().flatten().unwrap_or_default();
    if whole_lines {
        let end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        buf.truncate(end);
    }
    buf
}

/// The bytes of `path` from `offset`: up to the last newline when
/// `whole_lines`, else all of them.
async fn read_from(path: &std::path::Path, offset: u64, whole_lines: bool) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut file) = tokio::fs::File::open(path).await else { return Vec::new() };
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if file.read_to_end(&mut buf).await.is_err() {
        return Vec::new();
    }
    if whole_lines {
        let end = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        buf.truncate(end);
    }
    buf
}

async fn cancel_job(State(s): State<Api>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Response {
    // A team's agent may cancel only its own children; the operator's
    // cancel reads nothing more than it did.
    if caller.is_team() {
        if let Err(answer) = visible_job(&s, &caller, &id).await {
            return answer;
        }
    }
    match s.engine.cancel(&id).await {
        Ok(Some(job)) => Json(job).into_response(),
        Ok(None) => match s.store.job(&id).await {
            Ok(Some(job)) => error(StatusCode::CONFLICT, format!("job {id} is {}, not queued or running", job.state)),
            Ok(None) => error(StatusCode::NOT_FOUND, format!("job {id} not found")),
            Err(e) => store_error(e),
        },
        Err(e) => store_error(e),
    }
}

async fn retry_job(State(s): State<Api>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> Response {
    if caller.is_team() {
        return error(StatusCode::FORBIDDEN, "a job's agent delegates anew rather than retrying");
    }
    match s.store.retry(&id).await {
        Ok(job) => {
            s.wake.notify_one();
            (StatusCode::ACCEPTED, Json(job)).into_response()
        }
        Err(e) => store_error(e),
    }
}

/// Every trigger in force with its file, and every file that failed to load.
async fn list_triggers(State(s): State<Api>, Extension(caller): Extension<Caller>) -> Response {
    if caller.is_team() {
        return error(StatusCode::FORBIDDEN, "a job's agent starts only children of its own job");
    }
    let rules = s.rules.current();
    let triggers = rules
        .triggers()
        .iter()
        .map(|t| wire::TriggerInfo {
            name: t.name.clone(),
            file: t.file.display().to_string(),
            description: t.description.clone(),
            on: t.on.clone(),
            agent: t.job.agent.clone(),
        })
        .collect();
    let errors = s
        .rules
        .errors()
        .iter()
        .map(|d| wire::TriggerError {
            file: d.path.display().to_string(),
            line: d.line,
            col: d.col,
            message: d.message.clone(),
            error: d.to_string(),
        })
        .collect();
    Json(wire::TriggerList { triggers, errors }).into_response()
}
