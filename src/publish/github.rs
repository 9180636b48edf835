//! The GitHub REST client for publishing, on octocrab.
//!
//! Built without octocrab's retry layer: it re-sends a POST at once on a 5xx,
//! which can post a comment twice. The outbox retries instead, with backoff.

use std::time::Duration;

use octocrab::Octocrab;
use serde_json::{json, Value};

use crate::config::Secret;

/// A failed GitHub call, classified for the outbox.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct GitHubError {
    pub message: String,
    /// Whether trying again later can succeed (5xx, timeouts, rate limits).
    pub retryable: bool,
    /// When GitHub said to come back (rate limits).
    pub retry_after: Option<Duration>,
}

/// An authenticated client for one GitHub (or GitHub Enterprise, or a fake).
#[derive(Clone)]
pub struct GitHub {
    crab: Octocrab,
}

impl GitHub {
    pub fn new(api_url: &str, token: &Secret) -> Result<GitHub, GitHubError> {
        let crab = Octocrab::builder()
            .base_uri(api_url)
            .map_err(|e| GitHubError {
                message: format!("invalid github.api_url `{api_url}`: {e}"),
                retryable: false,
                retry_after: None,
            })?
            .personal_token(token.expose().to_string())
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| GitHubError {
                message: format!("cannot build the GitHub client: {e}"),
                retryable: false,
                retry_after: None,
            })?;
        Ok(GitHub { crab })
    }

    /// Posts a comment on an issue or pull request; returns its URL.
    pub async fn issue_comment(&self, repo: &str, number: u64, body: &str) -> Result<Option<String>, GitHubError> {
        self.post(&format!("/repos/{repo}/issues/{number}/comments"), json!({ "body": body })).await
    }

    /// Posts a comment on a commit; returns its URL.
    pub async fn commit_comment(&self, repo: &str, sha: &str, body: &str) -> Result<Option<String>, GitHubError> {
        self.post(&format!("/repos/{repo}/commits/{sha}/comments"), json!({ "body": body })).await
    }

    /// Opens a pull request; one already open for the branch (a re-run
    /// pushed to it again) counts as done.
    pub async fn pull_request(
        &self,
        repo: &str,
        title: &str,
        head: &str,
        base: &str,
        body: &str,
    ) -> Result<Option<String>, GitHubError> {
        let sent = self
            .post(&format!("/repos/{repo}/pulls"), json!({ "title": title, "head": head, "base": base, "body": body }))
            .await;
        match sent {
            Err(e) if e.message.starts_with("GitHub answered 422") && e.message.contains("already exists") => Ok(None),
            other => other,
        }
    }

    async fn post(&self, route: &str, body: Value) -> Result<Option<String>, GitHubError> {
        let answer: Value = self.crab.post(route, Some(&body)).await.map_err(classify)?;
        Ok(answer.get("html_url").and_then(Value::as_str).map(str::to_string))
    }
}

fn classify(e: octocrab::Error) -> GitHubError {
    match e {
        octocrab::Error::GitHub { source, .. } => {
            let status = source.status_code;
            let header = |name: &str| {
                source
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            let rate_limited =
                status.as_u16() == 429 || (status.as_u16() == 403 && header("x-ratelimit-remaining") == Some(0));
            let retry_after = header("retry-after").map(Duration::from_secs).or_else(|| {
                source.rate_limit_reset.or(header("x-ratelimit-reset")).map(|reset| {
                    let now = chrono::Utc::now().timestamp().max(0) as u64;
                    Duration::from_secs(reset.saturating_sub(now).max(1))
                })
            });
            GitHubError {
                message: format!("GitHub answered {}: {}", status.as_u16(), source.message),
                retryable: status.is_server_error() || rate_limited,
                retry_after: if rate_limited { retry_after } else { None },
            }
        }
        other => GitHubError { message: format!("GitHub request failed: {other}"), retryable: true, retry_after: None },
    }
}
