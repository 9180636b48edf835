//! Webhook ingress: `POST /webhooks/github`, `POST /webhooks/gitlab` and
//! `POST /webhooks/{source}`.
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

use crate::admit::{Door, Origin, Received};
use crate::config::{Secret, SourceSettings};
use crate::event::{generic, Event, Payload};
use crate::forge::{signature, Forge, Rejected, WebhookKeys};
use crate::rules::{RuleSet, SharedRules};
use crate::store::{Accepted, Store};

/// What the webhook routes need.
#[derive(Clone)]
pub struct Ingress {
    pub store: Store,
    pub rules: SharedRules,
    pub secret: Secret,
    /// `[gitlab]`'s hook, when configured.
    pub gitlab: Option<GitLabHook>,
    pub sources: Arc<BTreeMap<String, SourceSettings>>,
    pub max_body_bytes: usize,
    /// Time a client has to send the whole body.
    pub read_timeout: Duration,
    /// Requests in flight; none left means 503.
    pub(crate) in_flight: Arc<Semaphore>,
    /// Unverified body bytes held at once, in KiB; a request reserves its
    /// declared length before its body is read, and none left means 503.
    pub(crate) buffered: Arc<Semaphore>,
    /// Woken when new jobs are queued.
    pub(crate) wake: Arc<Notify>,
    /// Whether a body seen under another delivery id is a replay.
    pub(crate) reject_replays: bool,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// What `POST /webhooks/gitlab` checks deliveries with, and who it asks
/// for a member's standing.
#[derive(Clone)]
pub struct GitLabHook {
    pub token: Secret,
    pub signing: Option<Secret>,
    pub members: Arc<crate::forge::gitlab::trust::Members>,
}

pub fn router(state: Ingress) -> Router {
    Router::new()
        .route("/webhooks/github", post(github_webhook))
        .route("/webhooks/gitlab", post(gitlab_webhook))
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
pub(crate) fn buffer_permits(bytes: usize) -> usize {
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
    let keys = WebhookKeys { secret: s.secret.expose().as_bytes(), signing: None };
    forge_webhook(&s, Forge::GITHUB, keys, headers, body).await
}

async fn gitlab_webhook(State(s): State<Ingress>, headers: HeaderMap, body: Body) -> Response {
    let Some(hook) = &s.gitlab else {
        drain(body).await;
        return error(StatusCode::NOT_FOUND, "GitLab is not configured: add [gitlab] to baton.toml");
    };
    let keys = WebhookKeys {
        secret: hook.token.expose().as_bytes(),
        signing: hook.signing.as_ref().map(|k| k.expose().as_bytes()),
    };
    forge_webhook(&s, Forge::GITLAB, keys, headers, body).await
}

/// A forge's delivery: read, verified, normalized, its author's standing
/// asked where the payload has none, then admitted.
async fn forge_webhook(s: &Ingress, forge: Forge, keys: WebhookKeys<'_>, headers: HeaderMap, body: Body) -> Response {
    let Unverified { body, reserved } = match read_body(s, &headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let verified = match forge.verify(keys, &headers, &body) {
        Ok(v) => v,
        Err(e @ Rejected::Unauthorized(_)) => {
            tracing::warn!(error = %e, "Webhook rejected: bad signature.");
            return error(StatusCode::UNAUTHORIZED, e.to_string());
        }
        Err(e @ Rejected::BadRequest(_)) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    drop(reserved);
    let (event_name, delivery_id) = (verified.event.as_str(), verified.delivery.as_str());
    if forge.is_ping(&verified) {
        tracing::info!(delivery = %delivery_id, "Ping received.");
        return answer(StatusCode::OK, json!({ "ok": true, "delivery": delivery_id }));
    }
    // One rule set decides both whether the payload is read and what it
    // matches.
    let rules = s.rules.current();
    if !crate::admit::reads(&rules, event_name) {
        // Stored by its name alone: what the payload says would be read
        // only to be thrown away.
        let event = Event::new(forge.source(), event_name, None, delivery_id, Payload::default());
        return admit(s, rules, event, Origin::Unread { signed: (event_name, &body) }).await;
    }
    let mut event = match forge.normalize(&verified, &body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let (Forge::GitLab(_), Some(hook)) = (forge, &s.gitlab) {
        // GitLab's payloads carry no standing: it is the member's access level.
        let author = crate::forge::gitlab::event::author_id(&event);
        if let (Some(user), Some(repo)) = (author, event.repo_name()) {
            event.association = Some(hook.members.standing(repo, user).await.to_string());
        }
    }
    admit(s, rules, event, Origin::Webhook { signed: Some((event_name, &body)) }).await
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
        Ok(event) => admit(&s, s.rules.current(), event, Origin::Webhook { signed: None }).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Admits a verified event through the front door and answers. A forge's
/// delivery is `signed`: its event name and body as received fingerprint it,
/// so the same body under a new delivery id is a replay. Generic sources'
/// bodies may legitimately repeat (`{"env": "prod"}`): a source without a
/// delivery header is deduplicated by its body already.
async fn admit(s: &Ingress, rules: Arc<RuleSet>, event: Event, origin: Origin<'_>) -> Response {
    let door = Door { store: &s.store, rules: &s.rules, wake: Some(&s.wake), reject_replays: s.reject_replays };
    let (id, kind) = (event.delivery.clone(), event.kind.clone());
    match door.admit_under(rules, event, origin).await {
        Ok(Some(Received { accepted: Accepted::Duplicate, .. })) => {
            s.metrics.delivery(&kind, "duplicate");
            tracing::info!(delivery = %id, "Duplicate delivery ignored.");
            answer(StatusCode::OK, json!({ "duplicate": true, "delivery": id }))
        }
        Ok(Some(Received { accepted: Accepted::Replay { of }, .. })) => {
            s.metrics.delivery(&kind, "replay");
            tracing::warn!(delivery = %id, first = %of, "A body already delivered came again under a new delivery id; ignored as a replay.");
            answer(StatusCode::OK, json!({ "duplicate": true, "replay": true, "replay_of": of, "delivery": id }))
        }
        Ok(Some(Received { accepted: Accepted::New(admitted), held })) => {
            s.metrics.delivery(&kind, "accepted");
            tracing::info!(delivery = %id, event = %kind, jobs = admitted.jobs.len(), held, skipped = admitted.skipped.len(), "Delivery accepted.");
            let skipped: Vec<_> =
                admitted.skipped.iter().map(|k| json!({ "trigger": k.trigger, "reason": k.reason })).collect();
            answer(
                StatusCode::ACCEPTED,
                json!({ "delivery": id, "jobs": admitted.jobs, "skipped": skipped, "held": held }),
            )
        }
        // A webhook is always stored, matched or not.
        Ok(None) => answer(StatusCode::ACCEPTED, json!({ "delivery": id, "jobs": [], "skipped": [], "held": 0 })),
        Err(e) => {
            // Not stored, so not acknowledged: the sender sees the failure
            // and the delivery can be sent again.
            s.metrics.delivery(&kind, "failed");
            tracing::error!(delivery = %id, error = %e, "Delivery could not be stored.");
            error(StatusCode::SERVICE_UNAVAILABLE, "delivery could not be stored; retry later")
        }
    }
}
