//! Webhook ingress: `POST /webhooks/github`.
//!
//! Checks run cheapest-and-safest first: body size, then the signature (so
//! nothing about an unsigned request is parsed), then headers, then JSON.
//! A 2xx is sent only after the delivery and all its jobs are on disk.

pub mod signature;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::json;
use tokio::sync::Notify;

use crate::config::Secret;
use crate::event::github;
use crate::rules::SharedRules;
use crate::store::{Accepted, Delivery, Store};

/// What the webhook routes need.
#[derive(Clone)]
pub struct Ingress {
    pub store: Store,
    pub rules: SharedRules,
    pub secret: Secret,
    pub max_body_bytes: usize,
    /// Woken when new jobs are queued.
    pub wake: Arc<Notify>,
}

pub fn router(state: Ingress) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/webhooks/github", post(github_webhook))
        // axum's own default is 2 MB; GitHub sends up to 25 MB.
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    answer(status, json!({ "error": message.into() }))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Delivery ids and event names become store keys and log fields: keep them
/// short and printable.
fn valid_token(s: &str) -> bool {
    s.len() <= 200 && s.chars().all(|c| c.is_ascii_graphic())
}

async fn github_webhook(
    State(s): State<Ingress>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return error(r.status(), r.body_text()),
    };
    let sig = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    if let Err(e) = signature::verify(s.secret.expose().as_bytes(), &body, sig) {
        tracing::warn!(error = %e, "Webhook rejected: bad signature.");
        return error(
            StatusCode::UNAUTHORIZED,
            format!("X-Hub-Signature-256: {e}"),
        );
    }
    let Some(event_name) = header(&headers, "x-github-event") else {
        return error(StatusCode::BAD_REQUEST, "missing X-GitHub-Event header");
    };
    let Some(delivery_id) = header(&headers, "x-github-delivery") else {
        return error(StatusCode::BAD_REQUEST, "missing X-GitHub-Delivery header");
    };
    if !valid_token(event_name) || !valid_token(delivery_id) {
        return error(
            StatusCode::BAD_REQUEST,
            "X-GitHub-Event and X-GitHub-Delivery must be short printable ASCII",
        );
    }
    let event = match github::normalize(event_name, delivery_id, &body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if event_name == "ping" {
        tracing::info!(delivery = %delivery_id, "Ping received.");
        return answer(
            StatusCode::OK,
            json!({ "ok": true, "delivery": delivery_id }),
        );
    }

    let specs = s.rules.current().match_event(&event);
    let delivery = Delivery {
        id: delivery_id.to_string(),
        source: "github".into(),
        event: event.kind.clone(),
        received_at: Utc::now(),
        jobs: Vec::new(),
    };
    match s.store.accept(delivery, &body, specs).await {
        Ok(Accepted::Duplicate) => {
            tracing::info!(delivery = %delivery_id, "Duplicate delivery ignored.");
            answer(
                StatusCode::OK,
                json!({ "duplicate": true, "delivery": delivery_id }),
            )
        }
        Ok(Accepted::New(jobs)) => {
            tracing::info!(delivery = %delivery_id, event = %event.kind, jobs = jobs.len(), "Delivery accepted.");
            if !jobs.is_empty() {
                s.wake.notify_one();
            }
            answer(
                StatusCode::ACCEPTED,
                json!({ "delivery": delivery_id, "jobs": jobs }),
            )
        }
        Err(e) => {
            // Not stored, so not acknowledged: GitHub shows the failure and
            // the delivery can be redelivered.
            tracing::error!(delivery = %delivery_id, error = %e, "Delivery could not be stored.");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "delivery could not be stored; retry later",
            )
        }
    }
}
