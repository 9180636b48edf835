//! Webhook ingress: `POST /webhooks/github` and `POST /webhooks/{source}`.
//!
//! Checks run cheapest-and-safest first: the in-flight cap, body size and
//! read time, then the signature (so nothing about an unsigned request is
//! parsed), then headers, then JSON. A 2xx is sent only after the delivery
//! and all its jobs are on disk.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{Notify, Semaphore};

use crate::config::{Secret, Source};
use crate::event::{generic, Event};
use crate::forge::{signature, Forge, Rejected};
use crate::rules::SharedRules;
use crate::store::{Accepted, Delivery, Store};

/// What the webhook routes need.
#[derive(Clone)]
pub struct Ingress {
    pub store: Store,
    pub rules: SharedRules,
    pub secret: Secret,
    pub sources: Arc<BTreeMap<String, Source>>,
    pub max_body_bytes: usize,
    /// Time a client has to send the whole body.
    pub read_timeout: Duration,
    /// Requests in flight; none left means 503.
    pub in_flight: Arc<Semaphore>,
    /// Unverified body bytes held at once, in KiB; a request reserves its
    /// declared length before its body is read, and none left means 503.
    pub buffered: Arc<Semaphore>,
    /// Woken when new jobs are queued.
    pub wake: Arc<Notify>,
    /// Whether a body seen under another delivery id is a replay.
    pub reject_replays: bool,
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub fn router(state: Ingress) -> Router {
    Router::new()
        .route("/webhooks/github", post(github_webhook))
        .route("/webhooks/{source}", post(generic_webhook))
        .route_layer(middleware::from_fn_with_state(state.clone(), shed_load))
        .with_state(state)
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    answer(status, json!({ "error": message.into() }))
}

/// Beyond the in-flight cap a request is turned away at once rather than
/// queued: a sender told to come back later loses nothing, a sender left
/// waiting may time out after its delivery was stored.
async fn shed_load(State(s): State<Ingress>, req: Request, next: Next) -> Response {
    let Ok(_permit) = s.in_flight.clone().try_acquire_owned() else {
        tracing::warn!("Too many requests in flight; answering 503.");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(json!({ "error": "too many requests in flight; retry shortly" })),
        )
            .into_response();
    };
    next.run(req).await
}

/// Converts the bytes a request may buffer into budget permits (KiB).
pub fn buffer_permits(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// A body read within the size, time and buffer limits, with its share of
/// the buffer budget: drop `reserved` once the signature is checked.
struct Unverified {
    body: Bytes,
    reserved: tokio::sync::OwnedSemaphorePermit,
}

/// Reads the body within the size and time limits, once the buffer budget
/// has room for its declared length (the most it may be, when undeclared):
/// strangers' unsigned bodies cannot make baton hold more than the budget.
async fn read_body(s: &Ingress, headers: &HeaderMap, body: Body) -> Result<Unverified, Response> {
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("body is larger than {} bytes", s.max_body_bytes));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.max_body_bytes as u64) {
        drain(body).await;
        return Err(too_large());
    }
    let want = declared.map(|n| n as usize).unwrap_or(s.max_body_bytes);
    let permits = u32::try_from(buffer_permits(want).max(1)).unwrap_or(u32::MAX);
    let Ok(reserved) = s.buffered.clone().try_acquire_many_owned(permits) else {
        tracing::warn!(bytes = want, "Unverified bodies fill the buffer budget; answering 503.");
        drain(body).await;
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(json!({ "error": "too many webhook bodies are being received; retry shortly" })),
        )
            .into_response());
    };
    match tokio::time::timeout(s.read_timeout, collect(body, want.min(s.max_body_bytes))).await {
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, "the body did not arrive in time")),
        Ok(Err(Collect::TooLarge)) => Err(too_large()),
        Ok(Err(Collect::Broken)) => Err(error(StatusCode::BAD_REQUEST, "the body could not be read")),
        Ok(Ok(body)) => Ok(Unverified { body, reserved }),
    }
}

enum Collect {
    TooLarge,
    Broken,
}

/// The body in one buffer of at most `limit` bytes, sized up front: each
/// frame is copied in once, never gathered and copied again, so a body
/// costs its size and no more (what the buffer budget counts).
async fn collect(mut body: Body, limit: usize) -> Result<Bytes, Collect> {
    let mut buf = bytes::BytesMut::with_capacity(limit.min(1 << 20));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Collect::Broken)?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > limit {
                return Err(Collect::TooLarge);
            }
            if buf.capacity() - buf.len() < data.len() {
                buf.reserve(limit - buf.len());
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}

/// Reads and drops what a client is still sending, within bounds, so that
/// it reads our answer rather than a reset (hyper does no lingering close).
async fn drain(body: Body) {
    use http_body_util::BodyExt as _;
    const DRAIN_BYTES: usize = 1024 * 1024;
    const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
    let mut body = body;
    let mut seen = 0;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

async fn github_webhook(State(s): State<Ingress>, headers: HeaderMap, body: Body) -> Response {
    let Unverified { body, reserved } = match read_body(&s, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let forge = Forge::GITHUB;
    let verified = match forge.verify(s.secret.expose().as_bytes(), &headers, &body) {
        Ok(v) => v,
        Err(e @ Rejected::Unauthorized(_)) => {
            tracing::warn!(error = %e, "Webhook rejected: bad signature.");
            return error(StatusCode::UNAUTHORIZED, e.to_string());
        }
        Err(e @ Rejected::BadRequest(_)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    drop(reserved);
    let event = match forge.normalize(&verified, &body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let (event_name, delivery_id) = (verified.event.as_str(), verified.delivery.as_str());
    if forge.is_ping(&verified) {
        tracing::info!(delivery = %delivery_id, "Ping received.");
        return answer(StatusCode::OK, json!({ "ok": true, "delivery": delivery_id }));
    }
    admit(&s, event, Some((event_name, &body))).await
}

async fn generic_webhook(
    State(s): State<Ingress>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(source) = s.sources.get(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no source `{name}` is configured"));
    };
    let Unverified { body, reserved } = match read_body(&s, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let sig = headers.get(source.signature_header.as_str()).map(|v| v.as_bytes());
    if let Err(e) = signature::verify(source.secret.expose().as_bytes(), &body, sig) {
        tracing::warn!(source = %name, error = %e, "Webhook rejected: bad signature.");
        return error(StatusCode::UNAUTHORIZED, format!("{}: {e}", source.signature_header));
    }
    drop(reserved);
    let delivery_id = match &source.delivery_header {
        Some(h) => match header(&headers, h) {
            Some(id) if signature::valid_token(id) => id.to_string(),
            Some(_) => return error(StatusCode::BAD_REQUEST, format!("{h} must be short printable ASCII")),
            None => return error(StatusCode::BAD_REQUEST, format!("missing {h} header")),
        },
        None => generic::body_delivery_id(&body),
    };
    // Kept apart from GitHub's ids, which are not under the source's control.
    let delivery_id = format!("{name}:{delivery_id}");
    match generic::normalize(source, &delivery_id, &body) {
        Ok(event) => admit(&s, event, None).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Matches a verified event, stores it with its jobs, and answers.
/// `signed`, the event name and body as received, fingerprints a GitHub
/// delivery, so the same body under a new delivery id is a replay. Generic
/// sources' bodies may legitimately repeat (`{"env": "prod"}`): a source
/// without a delivery header is deduplicated by its body already.
async fn admit(s: &Ingress, mut event: Event, signed: Option<(&str, &[u8])>) -> Response {
    pin_comment_to_head(s, &mut event).await;
    note_thread(s, &mut event).await;
    let rules = s.rules.current();
    recall_reviews(s, &rules, &mut event).await;
    let matches = rules.evaluate(&event);
    let mut delivery = Delivery::new(&event.delivery, &event.source, &event.kind);
    if let (true, Some((name, body))) = (s.reject_replays, signed) {
        delivery = delivery.with_body(name, body);
    }
    let id = event.delivery.as_str();
    let held = matches.pending.len();
    let subject_text = if matches.pending.is_empty() { None } else { event.subject_text() };
    match s.store.accept_with(delivery, matches.jobs, matches.pending, subject_text).await {
        Ok(Accepted::Duplicate) => {
            s.metrics.delivery(&event.kind, "duplicate");
            tracing::info!(delivery = %id, "Duplicate delivery ignored.");
            answer(StatusCode::OK, json!({ "duplicate": true, "delivery": id }))
        }
        Ok(Accepted::Replay { of }) => {
            s.metrics.delivery(&event.kind, "replay");
            tracing::warn!(delivery = %id, first = %of, "A body already delivered came again under a new delivery id; ignored as a replay.");
            answer(StatusCode::OK, json!({ "duplicate": true, "replay": true, "replay_of": of, "delivery": id }))
        }
        Ok(Accepted::New(admitted)) => {
            s.metrics.delivery(&event.kind, "accepted");
            // Only a new delivery moves a pull request's head (a redelivery
            // of an old event must not), and only forward.
            if let (Some(repo), Some(n), Some(sha), "pull_request") =
                (event.repo_name(), event.subject, event.head_sha.as_deref(), event.name.as_str())
            {
                let updated_at = event.payload["pull_request"]["updated_at"].as_str().unwrap_or_default();
                let head = crate::store::PrHead {
                    sha: sha.to_string(),
                    in_repo: event.head_in_repo,
                    branch: event.branch.clone(),
                    repo: event.head_repo.clone(),
                    maintainer_can_modify: event.maintainer_can_modify,
                };
                if let Err(e) = s.store.set_head(repo, n, &head, updated_at).await {
                    tracing::warn!(delivery = %id, error = %e, "Could not note the pull request's head.");
                }
            }
            let mut jobs = admitted.jobs;
            match approve(s, &rules, &event).await {
                Ok(approved) => jobs.extend(approved),
                Err(e) => tracing::error!(delivery = %id, error = %e, "Approving held jobs failed."),
            }
            tracing::info!(delivery = %id, event = %event.kind, jobs = jobs.len(), held, skipped = admitted.skipped.len(), "Delivery accepted.");
            if !jobs.is_empty() {
                s.wake.notify_one();
            }
            let skipped: Vec<_> =
                admitted.skipped.iter().map(|k| json!({ "trigger": k.trigger, "reason": k.reason })).collect();
            answer(StatusCode::ACCEPTED, json!({ "delivery": id, "jobs": jobs, "skipped": skipped, "held": held }))
        }
        Err(e) => {
            // Not stored, so not acknowledged: the sender sees the failure
            // and the delivery can be sent again.
            s.metrics.delivery(&event.kind, "failed");
            tracing::error!(delivery = %id, error = %e, "Delivery could not be stored.");
            error(StatusCode::SERVICE_UNAVAILABLE, "delivery could not be stored; retry later")
        }
    }
}

/// A comment on a pull request says nothing of the PR's head: what baton
/// noted from the PR's own events fills it in before the rules look, so
/// `allow_forks` applies to comments too and a `pr-head` job is pinned to
/// the commit the commenter saw (not whatever the branch holds when the job
/// runs). Nothing noted: the event stays as it came.
async fn pin_comment_to_head(s: &Ingress, event: &mut Event) {
    if event.comment.is_none() || !event.subject_is_pull_request || event.head_sha.is_some() {
        return;
    }
    let (Some(repo), Some(n)) = (event.repo_name(), event.subject) else { return };
    match s.store.pr_head(repo, n).await {
        Ok(Some(head)) => {
            event.head_sha = Some(head.sha);
            event.head_in_repo = head.in_repo;
            event.branch = head.branch;
            event.head_repo = head.repo;
            event.maintainer_can_modify = head.maintainer_can_modify;
            event.head_pinned = true;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(delivery = %event.delivery, error = %e, "Could not read the pull request's head."),
    }
}

/// For an event on a pull request: the head each review trigger listening
/// for it reviewed last, so an incremental review covers what changed since.
async fn recall_reviews(s: &Ingress, rules: &crate::rules::RuleSet, event: &mut Event) {
    let (Some(repo), Some(number), true) = (event.repo_name(), event.subject, event.subject_is_pull_request) else {
        return;
    };
    let repo = repo.to_string();
    let listening = rules.triggers().iter().filter(|t| {
        t.output == crate::rules::OutputKind::Review && t.on.iter().any(|k| k == &event.kind || k == &event.name)
    });
    for t in listening {
        let note = crate::store::Note::Reviewed { repo: repo.clone(), number, trigger: t.name.clone() };
        match s.store.note(&note).await {
            Ok(Some(v)) => {
                if let Some(head) = v["head"].as_str() {
                    event.reviewed.insert(t.name.clone(), head.to_string());
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(delivery = %event.delivery, error = %e, "Could not read what was reviewed before.")
            }
        }
    }
}

/// Comments a review thread keeps, at most (the newest), and the
/// characters kept of each.
const THREAD_COMMENTS: usize = 50;
const THREAD_COMMENT_CHARS: usize = 4000;

/// A review comment's payload names its place in the diff but not the
/// conversation it answers: baton notes every review comment it is sent
/// (its own included, before the rules drop those) by thread, and a new one
/// carries what came before it. Noted before it is stored, by comment id, so
/// a delivery sent again adds nothing twice.
async fn note_thread(s: &Ingress, event: &mut Event) {
    let (Some(thread), Some(repo)) = (event.thread.as_mut(), event.repository.as_ref()) else { return };
    if event.action.as_deref() != Some("created") {
        return;
    }
    let key = crate::store::Note::Thread { repo: repo.full_name.clone(), root: thread.root };
    let mut seen: Vec<crate::event::ThreadComment> = match s.store.note(&key).await {
        Ok(v) => v.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
        Err(e) => {
            tracing::warn!(delivery = %event.delivery, error = %e, "Could not read the review thread.");
            return;
        }
    };
    for c in std::mem::take(&mut thread.comments) {
        if !seen.iter().any(|s| s.id == c.id) {
            let body = c.body.chars().take(THREAD_COMMENT_CHARS).collect();
            seen.push(crate::event::ThreadComment { body, ..c });
        }
    }
    let skip = seen.len().saturating_sub(THREAD_COMMENTS);
    seen.drain(..skip);
    if let Err(e) = s.store.set_note(&key, &serde_json::to_value(&seen).unwrap_or_default()).await {
        tracing::warn!(delivery = %event.delivery, error = %e, "Could not note the review comment.");
    }
    thread.comments = seen;
}

/// `/baton approve` on an issue or PR, by someone a held job's trigger
/// trusts, releases the jobs held there (for a PR: at its current head).
async fn approve(
    s: &Ingress,
    rules: &crate::rules::RuleSet,
    event: &Event,
) -> Result<Vec<String>, crate::store::StoreError> {
    let (Some(comment), Some(repo), Some(n)) = (&event.comment, event.repo_name(), event.subject) else {
        return Ok(Vec::new());
    };
    if event.kind != "issue_comment.created" {
        return Ok(Vec::new());
    }
    let Some(command) = crate::rules::command::parse(APPROVE, &comment.body) else { return Ok(Vec::new()) };
    let edited_ok = command.argv.iter().any(|a| a == "--edited");
    let current_text = event.subject_text();
    // Never baton's own words (an injected agent's result could start with
    // the command), never a bot's.
    let bot_login = rules.bot_login();
    let by_bot = event.sender.as_ref().is_some_and(|a| a.is_bot() || a.login == bot_login)
        || comment.author.as_deref().is_some_and(|a| a == bot_login || a.ends_with("[bot]"));
    if by_bot || comment.body.contains(crate::event::MARKER_PREFIX) {
        tracing::info!(delivery = %event.delivery, "An approval by a bot or carrying baton's marker was ignored.");
        return Ok(Vec::new());
    }
    let Some(assoc) = event.association.as_deref() else { return Ok(Vec::new()) };
    let approver = crate::store::Approval {
        by: comment.author.clone().or_else(|| event.sender.as_ref().map(|s| s.login.clone())).unwrap_or_default(),
        at: chrono::Utc::now(),
    };
    let approved = s
        .store
        .approve(repo, n, &approver, |p| {
            let trusted = rules.get(&p.spec.trigger).is_some_and(|t| t.filter.authors.iter().any(|a| a == assoc));
            let unchanged = p.approvable(current_text.as_deref(), edited_ok);
            if trusted && !unchanged {
                tracing::warn!(
                    delivery = %event.delivery, trigger = %p.spec.trigger,
                    "A held job stays held: its issue or pull request was edited since; `/baton approve --edited` releases it."
                );
            }
            trusted && unchanged
        })
        .await?;
    if !approved.is_empty() {
        tracing::info!(delivery = %event.delivery, jobs = approved.len(), approver = comment.author.as_deref().unwrap_or(""), "Held jobs approved.");
    }
    Ok(approved)
}

/// The comment that releases held jobs.
const APPROVE: &str = "/baton approve";
