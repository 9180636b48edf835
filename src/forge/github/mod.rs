//! GitHub as a forge: its webhook headers and payloads (`event.rs`), its
//! credentials — a token or an App's installation tokens — (`auth.rs`), its
//! REST calls for every output (`api.rs`) and the App's redelivery of missed
//! webhooks (`catchup.rs`). Nothing GitHub-specific lives outside this folder.

pub mod api;
pub mod auth;
pub(crate) mod catchup;
pub mod event;

pub use api::Client;

use axum::http::HeaderMap;

use super::{signature, Capabilities, Rejected, Verified};

/// GitHub (or GitHub Enterprise, or a fake of it), as a `forge::Forge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GitHub;

const SIGNATURE: &str = "x-hub-signature-256";
const EVENT: &str = "x-github-event";
const DELIVERY: &str = "x-github-delivery";

impl GitHub {
    pub fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    /// `X-Hub-Signature-256` first (nothing about an unsigned request is
    /// read), then `X-GitHub-Event` and `X-GitHub-Delivery`.
    pub fn verify(&self, secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<Verified, Rejected> {
        let sig = headers.get(SIGNATURE).map(|v| v.as_bytes());
        signature::verify(secret, body, sig)
            .map_err(|e| Rejected::Unauthorized(format!("X-Hub-Signature-256: {e}")))?;
        let event =
            header(headers, EVENT).ok_or_else(|| Rejected::BadRequest("missing X-GitHub-Event header".into()))?;
        let delivery =
            header(headers, DELIVERY).ok_or_else(|| Rejected::BadRequest("missing X-GitHub-Delivery header".into()))?;
        if !signature::valid_token(event) || !signature::valid_token(delivery) {
            return Err(Rejected::BadRequest(
                "X-GitHub-Event and X-GitHub-Delivery must be short printable ASCII".into(),
            ));
        }
        Ok(Verified { event: event.to_string(), delivery: delivery.to_string() })
    }

    pub fn delivery_headers(
        &self,
        secret: &[u8],
        event: &str,
        delivery: &str,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
        vec![(EVENT, event.to_string()), (DELIVERY, delivery.to_string()), (SIGNATURE, signature::sign(secret, body))]
    }

    /// `refs/pull/N/head`: GitHub keeps every pull request's head there, in
    /// the base repository, also for forks.
    pub(crate) fn change_head_ref(&self, number: u64) -> String {
        format!("refs/pull/{number}/head")
    }

    /// `{git_url}/{owner}/{name}.git`.
    pub(crate) fn clone_url(&self, git_url: &str, repo: &str) -> String {
        format!("{}/{repo}.git", git_url.trim_end_matches('/'))
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}
pub use event::{normalize, KNOWN_EVENTS};
