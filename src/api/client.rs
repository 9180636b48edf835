//! The one typed client of `/api`, used by `baton jobs`, `baton mcp`, the
//! daemon's own `/mcp` and the tests: each route is a method taking and
//! returning [`wire`](super::wire) types.
//!
//! It speaks HTTP to a daemon (`reqwest`, already baton's client), or calls
//! the daemon's routes in-process for `/mcp`, as the caller `/mcp` let in:
//! both go through the same routes, so whatever the API checks holds for
//! both. It never decides anything itself: a refusal is the API's, returned
//! as [`ClientError::Api`] with its status and words. The API token is a
//! [`Secret`]: no error or `Debug` output shows it.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::wire::{CreateChild, CreateJob, ErrorBody, Job, JobList, JobsQuery, TriggerList};
use crate::config::Secret;
use crate::engine::team::Caller;

/// The largest answer read from an in-process call (a long job's log).
const MAX_LOCAL_ANSWER: usize = 64 * 1024 * 1024;

/// Why a call gave no answer of the kind asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached, or its answer not read.
    #[error("cannot reach baton at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The API refused: its status and reason (and the field a 400 names).
    #[error("{status}: {message}")]
    Api { status: u16, message: String, field: Option<String> },
    /// A 2xx answer that is not the wire type of its route.
    #[error("the daemon's answer to {route} is not what baton's API sends: {source}")]
    Answer {
        route: String,
        #[source]
        source: serde_json::Error,
    },
    /// The in-process routes could not be called.
    #[error("calling the API in-process: {0}")]
    Local(String),
}

impl ClientError {
    /// The API's status, when it answered with a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A job as `POST /api/jobs` answered: made now (201), or found again
/// under the same `Idempotency-Key` (200).
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    pub job: Job,
    pub new: bool,
}

/// A client of one daemon's `/api`.
#[derive(Clone)]
pub struct Client {
    transport: Transport,
}

#[derive(Clone)]
enum Transport {
    Http {
        base: String,
        token: Option<Secret>,
        http: reqwest::Client,
    },
    /// The daemon's own routes (see `api::inner_routes`), answering as `caller`.
    Local {
        routes: axum::Router,
        caller: Caller,
        web_url: String,
    },
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // By hand: only the address and whether a token is set, never the token.
        match &self.transport {
            Transport::Http { base, token, .. } => {
                f.debug_struct("Client").field("url", base).field("token", &token.as_ref().map(|_| "***")).finish()
            }
            Transport::Local { web_url, caller, .. } => {
                f.debug_struct("Client").field("local", web_url).field("team", &caller.is_team()).finish()
            }
        }
    }
}

impl Client {
    /// A client of the daemon at `url` (e.g. `http://127.0.0.1:8787`),
    /// sending `token` as its bearer token.
    pub fn new(url: &str, token: Option<Secret>) -> Client {
        Client::with_http(url, token, reqwest::Client::new())
    }

    /// [`Client::new`] over a `reqwest` client of the caller's making
    /// (a timeout, for tests).
    pub fn with_http(url: &str, token: Option<Secret>, http: reqwest::Client) -> Client {
        Client { transport: Transport::Http { base: url.trim_end_matches('/').to_string(), token, http } }
    }

    /// A client of the routes of this very daemon, answering as `caller`
    /// (whom `/mcp`'s guard let in); `web_url` is where people reach it.
    pub fn local(routes: axum::Router, caller: Caller, web_url: &str) -> Client {
        Client { transport: Transport::Local { routes, caller, web_url: web_url.trim_end_matches('/').to_string() } }
    }

    /// Whether this client calls as a team job's agent (whose requests
    /// are children of its job).
    pub(crate) fn is_team(&self) -> bool {
        matches!(&self.transport, Transport::Local { caller, .. } if caller.is_team())
    }

    /// The dashboard's page of job `id`.
    pub(crate) fn job_url(&self, id: &str) -> String {
        let base = match &self.transport {
            Transport::Http { base, .. } => base,
            Transport::Local { web_url, .. } => web_url,
        };
        format!("{base}/jobs/{id}")
    }

    /// `GET /api/jobs`: a page of jobs, newest first.
    pub async fn jobs(&self, query: &JobsQuery) -> Result<JobList, ClientError> {
        let query = serde_json::to_value(query).map_err(|e| ClientError::Local(e.to_string()))?;
        let mut path = String::from("/api/jobs");
        let pairs = query.as_object().into_iter().flatten();
        for (i, (k, v)) in pairs.enumerate() {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(&format!("{k}={}", encode_query(&v)));
        }
        self.typed("GET", &path, None, &[]).await
    }

    /// `GET /api/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<Job, ClientError> {
        self.typed("GET", &format!("/api/jobs/{}", segment(id)), None, &[]).await
    }

    /// `GET /api/jobs/{id}/log`: the log as it is now (the agent's raw
    /// output, redacted by the daemon).
    pub async fn log(&self, id: &str) -> Result<Vec<u8>, ClientError> {
        let route = format!("/api/jobs/{}/log", segment(id));
        let (status, bytes) = self.send("GET", &route, None, &[]).await?;
        refusal(status, &bytes)?;
        Ok(bytes)
    }

    /// Job `id`'s log handed to `sink` as it grows, polled `every` so
    /// often, until the job has ended and its last lines are in; the job
    /// as it ended.
    pub async fn follow_log(
        &self,
        id: &str,
        every: Duration,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<Job, ClientError> {
        let mut printed = 0usize;
        let mut give = |text: &[u8]| -> Result<(), ClientError> {
            if let Some(new) = text.get(printed..).filter(|n| !n.is_empty()) {
                sink(new).map_err(|e| ClientError::Local(format!("writing the log: {e}")))?;
                printed = text.len();
            }
            Ok(())
        };
        loop {
            give(&self.log(id).await?)?;
            let job = self.job(id).await?;
            if job.state.is_final() {
                // What the log gained between the last read and the end.
                give(&self.log(id).await?)?;
                return Ok(job);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// `POST /api/jobs` as the API token's holder; the same
    /// `idempotency_key` again finds the same job.
    pub async fn create(&self, req: &CreateJob, idempotency_key: Option<&str>) -> Result<Created, ClientError> {
        self.create_any(req, idempotency_key).await
    }

    /// `POST /api/jobs` as a team job's agent: a child of its job.
    pub(crate) async fn create_child(
        &self,
        req: &CreateChild,
        idempotency_key: Option<&str>,
    ) -> Result<Created, ClientError> {
        self.create_any(req, idempotency_key).await
    }

    async fn create_any(&self, req: &impl Serialize, key: Option<&str>) -> Result<Created, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Local(e.to_string()))?;
        let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
        let (status, bytes) = self.send("POST", "/api/jobs", Some(body), &headers).await?;
        refusal(status, &bytes)?;
        let job = decode("/api/jobs", &bytes)?;
        Ok(Created { job, new: status == 201 })
    }

    /// `POST /api/jobs/{id}/cancel`: the job, cancelled.
    pub async fn cancel(&self, id: &str) -> Result<Job, ClientError> {
        self.typed("POST", &format!("/api/jobs/{}/cancel", segment(id)), None, &[]).await
    }

    /// `POST /api/jobs/{id}/retry`: the job, queued again.
    pub async fn retry(&self, id: &str) -> Result<Job, ClientError> {
        self.typed("POST", &format!("/api/jobs/{}/retry", segment(id)), None, &[]).await
    }

    /// `GET /api/triggers`.
    pub async fn triggers(&self) -> Result<TriggerList, ClientError> {
        self.typed("GET", "/api/triggers", None, &[]).await
    }

    /// A call whose 2xx answer is a `T`.
    async fn typed<T: DeserializeOwned>(
        &self,
        method: &str,
        route: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.send(method, route, body, headers).await?;
        refusal(status, &bytes)?;
        decode(route, &bytes)
    }

    /// One request: the answer's status and body.
    async fn send(
        &self,
        method: &str,
        route: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Vec<u8>), ClientError> {
        match &self.transport {
            Transport::Http { base, token, http } => {
                let unreachable = |source| ClientError::Unreachable { url: base.clone(), source };
                let method =
                    reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Local(e.to_string()))?;
                let mut req = http.request(method, format!("{base}{route}"));
                if let Some(t) = token {
                    req = req.bearer_auth(t.expose());
                }
                if let Some(b) = body {
                    req = req.header("content-type", "application/json").body(b);
                }
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                let resp = req.send().await.map_err(unreachable)?;
                let status = resp.status().as_u16();
                Ok((status, resp.bytes().await.map_err(unreachable)?.to_vec()))
            }
            Transport::Local { routes, caller, .. } => {
                use tower::ServiceExt as _;
                let local = |e: &dyn std::fmt::Display| ClientError::Local(e.to_string());
                let mut req = axum::http::Request::builder()
                    .extension(caller.clone())
                    .method(method)
                    .uri(route)
                    .header("content-type", "application/json");
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                let req = req.body(axum::body::Body::from(body.unwrap_or_default())).map_err(|e| local(&e))?;
                let resp = routes.clone().oneshot(req).await.map_err(|e| local(&e))?;
                let status = resp.status().as_u16();
                let bytes = axum::body::to_bytes(resp.into_body(), MAX_LOCAL_ANSWER).await.map_err(|e| local(&e))?;
                Ok((status, bytes.to_vec()))
            }
        }
    }
}

/// A non-2xx answer as the API's refusal, in its own words.
fn refusal(status: u16, bytes: &[u8]) -> Result<(), ClientError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let (message, field) = match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(e) => (e.error, e.field),
        // Not the API's own JSON (a proxy's page, say): its text.
        Err(_) => (String::from_utf8_lossy(bytes).trim().to_string(), None),
    };
    Err(ClientError::Api { status, message, field })
}

fn decode<T: DeserializeOwned>(route: &str, bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|source| ClientError::Answer { route: route.to_string(), source })
}

/// A job id as a path segment: ids are hex, so anything else is dropped
/// rather than allowed to reach another route.
fn segment(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect()
}

/// A query value, percent-encoded but for the characters that never need it.
fn encode_query(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_never_shows() {
        let client = Client::new("http://127.0.0.1:1/", Some(Secret::new("s3cret-token")));
        let shown = format!("{client:?}");
        assert!(!shown.contains("s3cret") && shown.contains("***") && shown.contains("127.0.0.1:1"), "{shown}");
        assert_eq!(client.job_url("j1"), "http://127.0.0.1:1/jobs/j1");
    }

    #[tokio::test]
    async fn an_unreachable_daemon_is_named_without_the_token() {
        // Port 1 on loopback: nothing listens, the connection is refused.
        let client = Client::new("http://127.0.0.1:1", Some(Secret::new("s3cret-token")));
        let err = client.job("abc").await.unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(matches!(err, ClientError::Unreachable { .. }), "{shown}");
        assert!(shown.contains("127.0.0.1:1") && !shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn refusals_keep_the_apis_words() {
        let err = refusal(400, br#"{"error": "colour: unknown field", "field": "colour"}"#).unwrap_err();
        assert_eq!(err.to_string(), "400: colour: unknown field");
        assert!(matches!(&err, ClientError::Api { field: Some(f), .. } if f == "colour"));
        assert_eq!(refusal(502, b"Bad Gateway\n").unwrap_err().to_string(), "502: Bad Gateway");
        assert!(refusal(201, b"{}").is_ok());
        assert_eq!(segment("ab/../c d"), "abcd");
        assert_eq!(encode_query("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
