//! What differs between code hosts ("forges"): verifying a webhook and naming
//! its delivery, normalizing its payload into an `Event`, credentials, clone
//! URLs and change-request refs, the REST calls each output needs, catch-up
//! of missed deliveries, and which outputs the forge offers at all.
//!
//! GitHub (`github/`) and GitLab (`gitlab/`) are the forges. The seam is a closed enum
//! (`Forge`), as bors and Atlantis do, rather than a trait object as
//! Renovate's `Platform` is: there will be a handful of forges, all in this
//! crate, so a `match` shows every forge's answer side by side, the compiler
//! names each place a new forge must fill, and nothing pays for dynamic
//! dispatch or `async` trait objects. Everything forge-neutral (the `Event`,
//! rules, the store, the outbox) stays outside; this module imports only
//! `config` and `event`, so the rules and the records can name its types.

pub mod github;
pub mod gitlab;
pub mod signature;

use std::future::Future;

use crate::event::{Event, NormalizeError};

/// A code host baton serves. Closed: each forge is a variant, and every
/// forge-specific answer is a `match` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    GitHub(github::GitHub),
    GitLab(gitlab::GitLab),
}

impl Forge {
    /// The forge `[github]` configures.
    pub const GITHUB: Forge = Forge::GitHub(github::GitHub);
    /// The forge `[gitlab]` configures.
    pub const GITLAB: Forge = Forge::GitLab(gitlab::GitLab);
    /// Every forge, for listings (`baton check`).
    pub const ALL: [Forge; 2] = [Forge::GITHUB, Forge::GITLAB];

    /// The forge an event's source names (`github`, `gitlab`), if any.
    pub fn of_source(source: &str) -> Option<Forge> {
        match source {
            "github" => Some(Forge::GITHUB),
            "gitlab" => Some(Forge::GITLAB),
            _ => None,
        }
    }

    /// Its name in diagnostics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Forge::GitHub(_) => "GitHub",
            Forge::GitLab(_) => "GitLab",
        }
    }

    /// Its events' source, and its name in `[filter] forge` and records.
    pub fn source(&self) -> &'static str {
        match self {
            Forge::GitHub(_) => "github",
            Forge::GitLab(_) => "gitlab",
        }
    }

    /// The event kinds (before the dot) this forge sends that baton reads.
    pub fn known_events(&self) -> &'static [&'static str] {
        match self {
            Forge::GitHub(_) => github::KNOWN_EVENTS,
            Forge::GitLab(_) => gitlab::KNOWN_EVENTS,
        }
    }

    /// Which outputs this forge offers.
    pub fn capabilities(&self) -> Capabilities {
        match self {
            Forge::GitHub(g) => g.capabilities(),
            Forge::GitLab(g) => g.capabilities(),
        }
    }

    /// Checks a webhook request's signature and headers, and reads its event
    /// name and delivery id (the dedupe key). The body is not parsed yet.
    pub fn verify(
        &self,
        keys: WebhookKeys<'_>,
        headers: &axum::http::HeaderMap,
        body: &[u8],
    ) -> Result<Verified, Rejected> {
        match self {
            Forge::GitHub(g) => g.verify(keys.secret, headers, body),
            Forge::GitLab(g) => g.verify(keys, headers, body),
        }
    }

    /// A verified delivery's payload as baton's `Event`.
    pub fn normalize(&self, verified: &Verified, body: &[u8]) -> Result<Event, NormalizeError> {
        match self {
            Forge::GitHub(_) => github::normalize(&verified.event, &verified.delivery, body),
            Forge::GitLab(_) => gitlab::normalize(&verified.event, &verified.delivery, body),
        }
    }

    /// Whether a verified delivery only tests the hook (answered, not stored).
    /// GitLab's "Test" button sends a real event, so it has none.
    pub(crate) fn is_ping(&self, verified: &Verified) -> bool {
        match self {
            Forge::GitHub(_) => verified.event == "ping",
            Forge::GitLab(_) => false,
        }
    }

    /// The request headers that make `body` a signed delivery of `event`, for
    /// `baton deliver` and tests.
    pub fn delivery_headers(
        &self,
        keys: WebhookKeys<'_>,
        event: &str,
        delivery: &str,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
        match self {
            Forge::GitHub(g) => g.delivery_headers(keys.secret, event, delivery, body),
            Forge::GitLab(g) => g.delivery_headers(keys, event, delivery, body),
        }
    }

    /// The git ref a change request's head can be fetched from (it works for
    /// changes from forks, whose branches live elsewhere).
    pub(crate) fn change_head_ref(&self, number: u64) -> String {
        match self {
            Forge::GitHub(g) => g.change_head_ref(number),
            Forge::GitLab(g) => g.change_head_ref(number),
        }
    }

    /// The clone URL of `repo` (`owner/name`, or GitLab's `group/sub/project`)
    /// below `git_url`.
    pub(crate) fn clone_url(&self, git_url: &str, repo: &str) -> String {
        match self {
            Forge::GitHub(g) => g.clone_url(git_url, repo),
            Forge::GitLab(g) => g.clone_url(git_url, repo),
        }
    }

    /// The user name git authenticates as over HTTPS with the forge's token.
    pub(crate) fn git_user(&self) -> &'static str {
        match self {
            Forge::GitHub(_) => "x-access-token",
            Forge::GitLab(_) => "oauth2",
        }
    }
}

impl Default for Forge {
    /// GitHub: what records written before there was a choice were about.
    fn default() -> Forge {
        Forge::GITHUB
    }
}

impl serde::Serialize for Forge {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.source())
    }
}

impl<'de> serde::Deserialize<'de> for Forge {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Forge, D::Error> {
        let name = String::deserialize(d)?;
        Forge::of_source(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown forge `{name}`; expected `github` or `gitlab`")))
    }
}

/// The keys a webhook is checked with: GitHub's HMAC secret or GitLab's
/// secret token, and GitLab's optional signing token.
#[derive(Clone, Copy)]
pub struct WebhookKeys<'a> {
    pub secret: &'a [u8],
    pub signing: Option<&'a [u8]>,
}

/// A failed call to a forge's API, classified for the outbox.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub message: String,
    /// Whether trying again later can succeed (5xx, timeouts, rate limits).
    pub(crate) retryable: bool,
    /// When the forge said to come back (rate limits).
    pub(crate) retry_after: Option<std::time::Duration>,
    /// Whether the request may have taken effect although it failed (a 5xx
    /// or a lost connection, as opposed to a refusal).
    pub(crate) maybe_applied: bool,
}

impl ApiError {
    /// Cannot succeed by trying again.
    pub(crate) fn fatal(message: String) -> ApiError {
        ApiError { message, retryable: false, retry_after: None, maybe_applied: false }
    }

    /// Failed before anything reached the forge; worth another try.
    pub(crate) fn before_sending(message: String) -> ApiError {
        ApiError { message, retryable: true, retry_after: None, maybe_applied: false }
    }

    /// The request went out and its answer was lost: it may have taken effect.
    pub(crate) fn answer_lost(message: String) -> ApiError {
        ApiError { message, retryable: true, retry_after: None, maybe_applied: true }
    }

    /// Whether trying again later can succeed.
    pub fn retryable(&self) -> bool {
        self.retryable
    }

    /// When the forge said to come back.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// Whether the request may have taken effect although it failed.
    pub fn maybe_applied(&self) -> bool {
        self.maybe_applied
    }
}

/// Something a forge made (a comment, a review, a change request): its id
/// and page.
#[derive(Debug, Clone, Default)]
pub struct Created {
    pub id: Option<u64>,
    pub url: Option<String>,
}

/// A request whose signature and headers checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The forge's event name (what `on` lists before the dot).
    pub event: String,
    /// The forge's delivery id: the dedupe key.
    pub delivery: String,
}

/// Why a webhook request was refused, and the answer it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Missing or wrong signature: 401.
    #[error("{0}")]
    Unauthorized(String),
    /// Missing or malformed headers: 400.
    #[error("{0}")]
    BadRequest(String),
}

/// What a forge can publish. `baton check` reports a trigger whose output
/// needs something its forge lacks, at the output's `path:line:col`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Comments on issues and change requests, edited in place.
    pub comments: bool,
    /// Reviews, with inline comments on the diff.
    pub reviews: bool,
    /// Check runs shown with a commit.
    pub check_runs: bool,
    /// Opening change requests.
    pub(crate) change_requests: bool,
    /// Pushing to a change request's own branch.
    pub push: bool,
}

impl Capabilities {
    /// Everything: what GitHub offers.
    pub(crate) const ALL: Capabilities =
        Capabilities { comments: true, reviews: true, check_runs: true, change_requests: true, push: true };
}

/// What catch-up asks of the store: whether a delivery is already held, and
/// a once-only note that its redelivery was asked for. A trait because the
/// store sits above `forge` in the module graph (its records name forge
/// types); the store implements it.
pub trait Deliveries {
    /// Whether a delivery with this id is stored.
    fn holds(&self, delivery: &str) -> impl Future<Output = Result<bool, String>> + Send;
    /// Notes that a redelivery was asked for; `false` when one already was
    /// (on any replica), so each delivery is asked for once.
    fn note_redelivery(&self, delivery: &str) -> impl Future<Output = Result<bool, String>> + Send;
}
