//! GitLab (gitlab.com or self-managed) as a forge: its webhook headers,
//! secret token and Standard Webhooks signature (here), its payloads
//! (`event.rs`), who is trusted by access level (`trust.rs`), its REST API
//! v4 for every output (`api.rs`) and the resending of missed deliveries
//! from a hook's event list (`catchup.rs`). Nothing GitLab-specific lives
//! outside this folder.

pub mod api;
pub mod catchup;
pub mod event;
pub mod trust;

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{signature, Capabilities, Rejected, Verified};

/// GitLab, as a `forge::Forge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GitLab;

const TOKEN: &str = "x-gitlab-token";
const EVENT: &str = "x-gitlab-event";
const IDEMPOTENCY: &str = "idempotency-key";
const EVENT_UUID: &str = "x-gitlab-event-uuid";
/// Standard Webhooks (<https://www.standardwebhooks.com>), which GitLab
/// sends when the hook has a signing token.
const SW_ID: &str = "webhook-id";
const SW_TIMESTAMP: &str = "webhook-timestamp";
const SW_SIGNATURE: &str = "webhook-signature";
/// How far a signed delivery's timestamp may be from now, either way.
const SIGNATURE_WINDOW_SECS: i64 = 5 * 60;

/// Delivery ids are kept apart from GitHub's and generic sources'.
pub(crate) const DELIVERY_PREFIX: &str = "gitlab:";

/// A GitLab hook's keys: `secret` is its secret token (sent back as
/// `X-Gitlab-Token`), `signing` its signing token (`whsec_…`): when set,
/// deliveries must be signed.
pub type HookKeys<'a> = super::WebhookKeys<'a>;

impl GitLab {
    /// Every output, as on GitHub: check runs become commit statuses.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    /// `X-Gitlab-Token` (constant time), then the signature when the hook
    /// signs, then the event and the delivery id.
    pub fn verify(&self, keys: HookKeys<'_>, headers: &HeaderMap, body: &[u8]) -> Result<Verified, Rejected> {
        let sent = headers.get(TOKEN).map(|v| v.as_bytes()).unwrap_or_default();
        if keys.secret.is_empty() || !constant_time_eq(sent, keys.secret) {
            let why = if sent.is_empty() {
                "missing: set the webhook's \"Secret token\" to gitlab.webhook_secret"
            } else {
                "does not match the hook's secret token: the webhook's \"Secret token\" and gitlab.webhook_secret differ"
            };
            return Err(Rejected::Unauthorized(format!("X-Gitlab-Token {why}")));
        }
        if let Some(signing) = keys.signing {
            verify_signed(signing, headers, body, chrono::Utc::now().timestamp())?;
        }
        let event =
            header(headers, EVENT).ok_or_else(|| Rejected::BadRequest("missing X-Gitlab-Event header".into()))?;
        let id = header(headers, IDEMPOTENCY)
            .or_else(|| header(headers, EVENT_UUID))
            .or_else(|| header(headers, SW_ID))
            .ok_or_else(|| Rejected::BadRequest("missing Idempotency-Key and X-Gitlab-Event-UUID headers".into()))?;
        if !signature::valid_token(id) || event.len() > 64 {
            return Err(Rejected::BadRequest(
                "X-Gitlab-Event and the delivery id must be short printable ASCII".into(),
            ));
        }
        Ok(Verified { event: event_name(event), delivery: format!("{DELIVERY_PREFIX}{id}") })
    }

    /// What GitLab would send: the secret token, the event header, an
    /// idempotency key, and a Standard Webhooks signature when signing.
    pub fn delivery_headers(
        &self,
        keys: HookKeys<'_>,
        event: &str,
        delivery: &str,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
        let token = String::from_utf8_lossy(keys.secret).into_owned();
        let mut out = vec![(TOKEN, token), (EVENT, hook_header(event)), (IDEMPOTENCY, delivery.to_string())];
        if let Some(signing) = keys.signing {
            let now = chrono::Utc::now().timestamp();
            out.push((SW_ID, delivery.to_string()));
            out.push((SW_TIMESTAMP, now.to_string()));
            out.push((SW_SIGNATURE, sign(signing, delivery, now, body)));
        }
        out
    }

    /// `refs/merge-requests/N/head`: GitLab keeps every merge request's
    /// head there, in the target project, also for forks.
    pub(crate) fn change_head_ref(&self, number: u64) -> String {
        format!("refs/merge-requests/{number}/head")
    }

    /// `{git_url}/{group/sub/project}.git`.
    pub(crate) fn clone_url(&self, git_url: &str, path: &str) -> String {
        format!("{}/{path}.git", git_url.trim_end_matches('/'))
    }
}

/// `Merge Request Hook` → `merge_request`: the kind triggers name. A Job
/// Hook is a `build`, as its payload's `object_kind` says: `job.*` is baton's
/// own event for a job that ended.
pub(crate) fn event_name(header: &str) -> String {
    let name = header.trim().trim_end_matches(" Hook").trim_end_matches(" hook");
    let name = name.strip_prefix("Confidential ").unwrap_or(name);
    match name.to_ascii_lowercase().replace(' ', "_") {
        job if job == "job" => "build".to_string(),
        other => other,
    }
}

/// `merge_request` → `Merge Request Hook`.
pub(crate) fn hook_header(event: &str) -> String {
    if event == "build" {
        return "Job Hook".to_string();
    }
    let words: Vec<String> = event
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect();
    format!("{} Hook", words.join(" "))
}

/// The Standard Webhooks key: the signing token's base64 after `whsec_`.
fn signing_key(token: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let token = token.strip_prefix(b"whsec_").unwrap_or(token);
    base64::engine::general_purpose::STANDARD.decode(token).unwrap_or_else(|_| token.to_vec())
}

/// `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`.
pub fn sign(token: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine as _;
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&signing_key(token)) else { return String::new() };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// A signed delivery: its id, a timestamp within the window of `now`, and
/// one of the `v1` signatures matching (several are allowed while a key
/// rotates). An unsigned body is refused: a hook that signs always signs.
fn verify_signed(token: &[u8], headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), Rejected> {
    let unauthorized = |m: &str| Err(Rejected::Unauthorized(m.to_string()));
    let (Some(id), Some(ts), Some(sigs)) =
        (header(headers, SW_ID), header(headers, SW_TIMESTAMP), header(headers, SW_SIGNATURE))
    else {
        return unauthorized("unsigned delivery: gitlab.signing_token is set, so webhook-id, webhook-timestamp and webhook-signature are required");
    };
    let Ok(ts) = ts.parse::<i64>() else { return unauthorized("webhook-timestamp is not a number") };
    if (now - ts).abs() > SIGNATURE_WINDOW_SECS {
        return unauthorized("webhook-timestamp is outside the 5-minute window (a replay, or a clock far off)");
    }
    let expected = sign(token, id, ts, body);
    if sigs.split_whitespace().any(|s| constant_time_eq(s.as_bytes(), expected.as_bytes())) {
        Ok(())
    } else {
        unauthorized("webhook-signature does not match")
    }
}

/// Equal bytes, compared without an early exit: the time taken says
/// nothing about how much of a guess was right (only its length shows).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

pub use event::{normalize, KNOWN_EVENTS};

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hook_headers_name_the_kinds_triggers_use() {
        assert_eq!(event_name("Merge Request Hook"), "merge_request");
        assert_eq!(event_name("Confidential Note Hook"), "note");
        assert_eq!(event_name("Job Hook"), "build");
        assert_eq!(hook_header("build"), "Job Hook");
        assert_eq!(hook_header("merge_request"), "Merge Request Hook");
        assert_eq!(event_name(&hook_header("pipeline")), "pipeline");
    }

    #[test]
    fn the_secret_token_is_checked_and_the_delivery_named() {
        let keys = HookKeys { secret: b"s3cret-token-of-the-hook", signing: None };
        let h = headers(&GitLab.delivery_headers(keys, "note", "abc-1", b"{}"));
        let v = GitLab.verify(keys, &h, b"{}").unwrap();
        assert_eq!((v.event.as_str(), v.delivery.as_str()), ("note", "gitlab:abc-1"));
        let wrong = HookKeys { secret: b"s3cret-token-of-the-hook!", signing: None };
        assert!(matches!(GitLab.verify(wrong, &h, b"{}"), Err(Rejected::Unauthorized(_))));
        let mut none = h.clone();
        none.remove(TOKEN);
        assert!(matches!(GitLab.verify(keys, &none, b"{}"), Err(Rejected::Unauthorized(_))));
    }

    #[test]
    fn a_signing_hook_refuses_unsigned_stale_and_altered_bodies() {
        use base64::Engine as _;
        let signing = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(b"0123456789abcdef0123"));
        let keys = HookKeys { secret: b"tok", signing: Some(signing.as_bytes()) };
        let h = headers(&GitLab.delivery_headers(keys, "issue", "id-1", b"{\"a\":1}"));
        assert!(GitLab.verify(keys, &h, b"{\"a\":1}").is_ok());
        assert!(GitLab.verify(keys, &h, b"{\"a\":2}").is_err(), "altered body");
        let unsigned = headers(&GitLab.delivery_headers(HookKeys { signing: None, ..keys }, "issue", "id-1", b"{}"));
        assert!(GitLab.verify(keys, &unsigned, b"{}").is_err(), "unsigned body");
        // The same signed request, ten minutes later: a replay.
        let now = chrono::Utc::now().timestamp();
        assert!(verify_signed(signing.as_bytes(), &h, b"{\"a\":1}", now + 600).is_err());
        assert!(verify_signed(signing.as_bytes(), &h, b"{\"a\":1}", now + 60).is_ok());
    }
}
