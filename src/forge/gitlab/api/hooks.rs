//! A project hook's log of deliveries, and asking GitLab to send one
//! again: what catch-up after downtime reads.

use super::*;

/// One delivery of a project hook, as GitLab logged it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HookEvent {
    pub id: u64,
    #[serde(default)]
    pub url: String,
    /// The hook's event (`merge_request_hooks`, `note_hooks`, …).
    #[serde(default)]
    pub trigger: String,
    /// The HTTP status the receiver answered, or GitLab's words for a
    /// failure to reach it (`internal error`); a string in GitLab's log.
    #[serde(default, deserialize_with = "stringish")]
    pub response_status: String,
    #[serde(default)]
    pub execution_duration: f64,
    #[serde(default)]
    pub request_data: serde_json::Value,
    /// The headers GitLab sent with the delivery (`Idempotency-Key`,
    /// `X-Gitlab-Event-UUID`, …), as it logged them.
    #[serde(default, deserialize_with = "string_map")]
    pub request_headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub created_at: Option<String>,
}

impl HookEvent {
    /// A request header's value, its name matched in any case.
    pub fn request_header(&self, name: &str) -> Option<&str> {
        self.request_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
}

/// Listing a hook's events failed; `denied` when GitLab refused the token
/// (401, or a 403 that is no rate limit): reading a hook's events takes
/// the Maintainer role and the `api` scope.
#[derive(Debug)]
pub struct ListError {
    pub denied: bool,
    pub error: ApiError,
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error.message)
    }
}

impl From<ApiError> for ListError {
    fn from(error: ApiError) -> ListError {
        ListError { denied: false, error }
    }
}

/// An object of names to strings, leniently: a value that is no string is
/// written as JSON, anything but an object is empty.
fn string_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::collections::BTreeMap<String, String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Object(fields) => fields
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => Default::default(),
    })
}

impl Client {
    /// A page (20, GitLab's most; newest first) of a project hook's recent
    /// deliveries (GitLab keeps a week), and whether another may follow.
    pub async fn hook_events(&self, project: &str, hook: u64, page: u32) -> Result<(Vec<HookEvent>, bool), ListError> {
        let route = format!("/projects/{}/hooks/{hook}/events?per_page=20&page={}", enc(project), page.max(1));
        let reply = self.send(self.request(Method::GET, &route)?).await?;
        if matches!(reply.status.as_u16(), 401 | 403) {
            let error = self.classify(&reply);
            if !error.retryable {
                return Err(ListError { denied: true, error });
            }
        }
        let next = reply.headers.get("x-next-page").and_then(|v| v.to_str().ok()).map(|v| !v.trim().is_empty());
        let events: Vec<HookEvent> = self.parse(reply)?;
        let more = next.unwrap_or(events.len() >= 20) && !events.is_empty();
        Ok((events, more))
    }

    /// Asks GitLab to deliver a hook event again.
    pub async fn resend_hook_event(&self, project: &str, hook: u64, event: u64) -> Result<(), ApiError> {
        let route = format!("/projects/{}/hooks/{hook}/events/{event}/resend", enc(project));
        let reply = self.send(self.request(Method::POST, &route)?).await?;
        self.check(reply).map(|_| ())
    }
}
