//! The GitHub REST calls baton publishes with, on octocrab.
//!
//! Built without octocrab's retry layer: it re-sends a POST at once on a 5xx,
//! which can post a comment twice. The outbox retries instead, with backoff,
//! and looks for its marker before re-sending a create whose answer was lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use octocrab::Octocrab;
use serde_json::{json, Value};

use super::auth::Credentials;
use crate::forge::{ApiError, Created};

/// Pages of a listing read when looking for a marker (100 items each).
const MAX_FIND_PAGES: u32 = 50;
/// Where baton looks for its marker before re-sending a create.
#[derive(Debug, Clone, Copy)]
pub enum Listing<'a> {
    IssueComments(u64),
    CommitComments(&'a str),
    Reviews(u64),
    ReviewComments(u64),
}

/// A check run to create.
pub(crate) struct CheckRun<'a> {
    pub sha: &'a str,
    pub name: &'a str,
    /// The job id, by which baton finds its run again.
    pub external_id: &'a str,
    /// `None`: in progress.
    pub conclusion: Option<&'a str>,
    pub summary: &'a str,
}

fn created(v: &Value) -> Created {
    Created { id: v["id"].as_u64(), url: v["html_url"].as_str().map(str::to_string) }
}

/// Who baton is on GitHub: the author of everything it posts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    /// The token's user, or the App's bot (`{slug}[bot]`).
    login: String,
    /// The App's id, which its check runs carry; `None` for a token, which
    /// cannot make check runs.
    app_id: Option<u64>,
}

/// Called with `X-RateLimit-Remaining` after each answer. A callback, not
/// `metrics::Metrics`, because `forge` sits below the modules metrics needs.
pub(crate) type RateLimitObserver = Arc<dyn Fn(u64) + Send + Sync>;

/// An authenticated client for one GitHub (or GitHub Enterprise, or a fake).
pub struct Client {
    api_url: String,
    credentials: Arc<Credentials>,
    /// One client per token: installation tokens rotate.
    clients: Mutex<HashMap<String, Octocrab>>,
    /// Told the rate limit left after every answer (the daemon feeds `/metrics`).
    rate_limit: Option<RateLimitObserver>,
    /// Asked of GitHub the first time a lost answer is looked for, then
    /// kept: it does not change while the credentials do not.
    identity: tokio::sync::OnceCell<Identity>,
}

impl Client {
    pub fn new(api_url: &str, credentials: Arc<Credentials>, rate_limit: Option<RateLimitObserver>) -> Client {
        Client {
            api_url: api_url.to_string(),
            credentials,
            clients: Mutex::new(HashMap::new()),
            rate_limit,
            identity: tokio::sync::OnceCell::new(),
        }
    }

    /// Who baton posts as: the token's login (`GET /user`), or in App mode
    /// the App's bot (`GET /app` with the App's JWT: `{slug}[bot]`).
    async fn identity(&self, inst: Option<u64>, repo: &str) -> Result<&Identity, ApiError> {
        self.identity
            .get_or_try_init(|| async {
                let found = match self.credentials.app_client() {
                    Some(app) => {
                        let v: Value = app.get("/app", None::<&()>).await.map_err(classify)?;
                        let slug = v["slug"].as_str().filter(|s| !s.is_empty());
                        slug.map(|slug| Identity { login: format!("{slug}[bot]"), app_id: v["id"].as_u64() })
                    }
                    None => {
                        let v = self.get((inst, repo), "/user").await?;
                        let login = v["login"].as_str().filter(|l| !l.is_empty());
                        login.map(|login| Identity { login: login.to_string(), app_id: None })
                    }
                };
                let found = found
                    .ok_or_else(|| ApiError::before_sending("GitHub did not say which login baton posts as".into()))?;
                tracing::info!(login = %found.login, "Publishing as this GitHub login.");
                Ok(found)
            })
            .await
            .map_err(|e: ApiError| ApiError {
                message: format!("cannot tell which login baton posts as: {}", e.message),
                ..e
            })
    }

    async fn client(&self, installation: Option<u64>, repo: &str) -> Result<Octocrab, ApiError> {
        let token =
            self.credentials.token(installation, repo).await.map_err(|e| ApiError::before_sending(e.to_string()))?;
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(token.expose()) {
            return Ok(c.clone());
        }
        let client = super::auth::token_client(&self.api_url, &token).map_err(|e| ApiError::fatal(e.to_string()))?;
        // Old installation tokens expire; their clients go with them.
        if clients.len() > 32 {
            clients.clear();
        }
        clients.insert(token.expose().to_string(), client.clone());
        Ok(client)
    }

    async fn post(&self, at: (Option<u64>, &str), route: &str, body: Value) -> Result<Value, ApiError> {
        self.call(at, axum::http::Method::POST, route, Some(body)).await
    }

    async fn patch(&self, at: (Option<u64>, &str), route: &str, body: Value) -> Result<Value, ApiError> {
        self.call(at, axum::http::Method::PATCH, route, Some(body)).await
    }

    async fn get(&self, at: (Option<u64>, &str), route: &str) -> Result<Value, ApiError> {
        self.call(at, axum::http::Method::GET, route, None).await
    }

    /// One request, raw so the rate-limit headers can be read off every answer.
    async fn call(
        &self,
        at: (Option<u64>, &str),
        method: axum::http::Method,
        route: &str,
        body: Option<Value>,
    ) -> Result<Value, ApiError> {
        let crab = self.client(at.0, at.1).await?;
        let sent = match method {
            axum::http::Method::POST => crab._post(route, body.as_ref()).await,
            axum::http::Method::PATCH => crab._patch(route, body.as_ref()).await,
            _ => crab._get(route).await,
        };
        let response = sent.map_err(classify)?;
        let remaining = response
            .headers()
            .get("x-ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let (Some(remaining), Some(observe)) = (remaining, &self.rate_limit) {
            observe(remaining);
        }
        let response = octocrab::map_github_error(response).await.map_err(classify)?;
        let text = crab.body_to_string(response).await.map_err(classify)?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|_| ApiError::answer_lost("GitHub's answer was not JSON".into()))
    }

    /// The newest item of `listing` that baton's own login wrote and whose
    /// body carries `marker`. Anyone can write a marker (job ids can be
    /// guessed), so an item by another login is never taken for baton's.
    pub async fn find(
        &self,
        inst: Option<u64>,
        repo: &str,
        listing: Listing<'_>,
        marker: &str,
    ) -> Result<Option<Created>, ApiError> {
        let route = match listing {
            Listing::IssueComments(n) => format!("/repos/{repo}/issues/{n}/comments?per_page=100"),
            Listing::CommitComments(sha) => format!("/repos/{repo}/commits/{sha}/comments?per_page=100"),
            Listing::Reviews(n) => format!("/repos/{repo}/pulls/{n}/reviews?per_page=100"),
            Listing::ReviewComments(n) => format!("/repos/{repo}/pulls/{n}/comments?per_page=100"),
        };
        let me = self.identity(inst, repo).await?.login.clone();
        // GitHub lists oldest first: on a busy issue what baton just made is
        // on a later page, so every page is read (up to a bound).
        for page in 1..=MAX_FIND_PAGES {
            let list = self.get((inst, repo), &format!("{route}&page={page}")).await?;
            if let Some(found) = find_marked(&list, marker, &me) {
                return Ok(Some(found));
            }
            if list.as_array().is_none_or(|items| items.len() < 100) {
                break;
            }
        }
        Ok(None)
    }

    /// Posts a comment on an issue or pull request.
    pub(crate) async fn create_comment(
        &self,
        inst: Option<u64>,
        repo: &str,
        number: u64,
        body: &str,
    ) -> Result<Created, ApiError> {
        let v = self
            .post((inst, repo), &format!("/repos/{repo}/issues/{number}/comments"), json!({ "body": body }))
            .await?;
        Ok(created(&v))
    }

    /// Replaces a comment's body.
    pub(crate) async fn edit_comment(
        &self,
        inst: Option<u64>,
        repo: &str,
        id: u64,
        body: &str,
    ) -> Result<Created, ApiError> {
        let v =
            self.patch((inst, repo), &format!("/repos/{repo}/issues/comments/{id}"), json!({ "body": body })).await?;
        Ok(created(&v))
    }

    /// Posts a comment on a commit.
    pub(crate) async fn commit_comment(
        &self,
        inst: Option<u64>,
        repo: &str,
        sha: &str,
        body: &str,
    ) -> Result<Created, ApiError> {
        let v =
            self.post((inst, repo), &format!("/repos/{repo}/commits/{sha}/comments"), json!({ "body": body })).await?;
        Ok(created(&v))
    }

    /// 👀 on a comment, or on the issue or PR itself. GitHub answers a
    /// repeated reaction with the existing one, so this is idempotent.
    pub(crate) async fn react(
        &self,
        inst: Option<u64>,
        repo: &str,
        number: u64,
        comment: Option<u64>,
        review: bool,
    ) -> Result<Created, ApiError> {
        let route = match comment {
            Some(id) if review => format!("/repos/{repo}/pulls/comments/{id}/reactions"),
            Some(id) => format!("/repos/{repo}/issues/comments/{id}/reactions"),
            None => format!("/repos/{repo}/issues/{number}/reactions"),
        };
        let v = self.post((inst, repo), &route, json!({ "content": "eyes" })).await?;
        Ok(Created { id: v["id"].as_u64(), url: None })
    }

    /// A reply in a review thread, to its first comment.
    pub async fn reply(
        &self,
        inst: Option<u64>,
        repo: &str,
        number: u64,
        comment: u64,
        body: &str,
    ) -> Result<Created, ApiError> {
        let route = format!("/repos/{repo}/pulls/{number}/comments/{comment}/replies");
        let v = self.post((inst, repo), &route, json!({ "body": body })).await?;
        Ok(created(&v))
    }

    /// A pull request review with event `COMMENT`.
    pub async fn review(&self, inst: Option<u64>, repo: &str, number: u64, body: &str) -> Result<Created, ApiError> {
        self.review_with(inst, repo, number, body, "COMMENT", &[]).await
    }

    /// Posts a review with its event and inline comments (each `path`,
    /// `line`, `side`, and optionally `start_line`/`start_side`, `body`).
    pub(crate) async fn review_with(
        &self,
        inst: Option<u64>,
        repo: &str,
        number: u64,
        body: &str,
        event: &str,
        comments: &[Value],
    ) -> Result<Created, ApiError> {
        let mut request = json!({ "body": body, "event": event });
        if !comments.is_empty() {
            request["comments"] = Value::Array(comments.to_vec());
        }
        let v = self.post((inst, repo), &format!("/repos/{repo}/pulls/{number}/reviews"), request).await?;
        Ok(created(&v))
    }

    /// The pull request's changed files, each with its `patch` (every page).
    pub async fn pr_files(&self, inst: Option<u64>, repo: &str, number: u64) -> Result<Vec<Value>, ApiError> {
        let mut files = Vec::new();
        // GitHub lists at most 3,000 files, 100 a page.
        for page in 1..=30 {
            let list =
                self.get((inst, repo), &format!("/repos/{repo}/pulls/{number}/files?per_page=100&page={page}")).await?;
            let items = list.as_array().cloned().unwrap_or_default();
            let last = items.len() < 100;
            files.extend(items);
            if last {
                break;
            }
        }
        Ok(files)
    }

    /// Opens a pull request; one already open for the branch (a re-run
    /// pushed to it again) counts as done.
    pub async fn pull_request(
        &self,
        inst: Option<u64>,
        repo: &str,
        title: &str,
        head: &str,
        base: &str,
        body: &str,
    ) -> Result<Created, ApiError> {
        let sent = self
            .post(
                (inst, repo),
                &format!("/repos/{repo}/pulls"),
                json!({ "title": title, "head": head, "base": base, "body": body }),
            )
            .await;
        match sent {
            Ok(v) => Ok(created(&v)),
            Err(e) if e.message.starts_with("GitHub answered 422") && e.message.contains("already exists") => {
                Ok(Created::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a check run: in progress, or completed with its conclusion.
    pub(crate) async fn create_check_run(
        &self,
        inst: Option<u64>,
        repo: &str,
        run: &CheckRun<'_>,
    ) -> Result<Created, ApiError> {
        let mut body = json!({
            "name": run.name, "head_sha": run.sha, "external_id": run.external_id,
            "output": { "title": run.name, "summary": run.summary },
        });
        match run.conclusion {
            None => body["status"] = json!("in_progress"),
            Some(c) => {
                body["status"] = json!("completed");
                body["conclusion"] = json!(c);
            }
        }
        let v = self.post((inst, repo), &format!("/repos/{repo}/check-runs"), body).await?;
        Ok(created(&v))
    }

    /// Completes a check run made earlier.
    pub(crate) async fn complete_check_run(
        &self,
        inst: Option<u64>,
        repo: &str,
        id: u64,
        name: &str,
        conclusion: &str,
        summary: &str,
    ) -> Result<Created, ApiError> {
        let body = json!({
            "status": "completed", "conclusion": conclusion,
            "output": { "title": name, "summary": summary },
        });
        let v = self.patch((inst, repo), &format!("/repos/{repo}/check-runs/{id}"), body).await?;
        Ok(created(&v))
    }

    /// The check run this job made on `sha`, found by its external id
    /// among the runs of baton's own App (another App can name a run alike).
    pub(crate) async fn find_check_run(
        &self,
        inst: Option<u64>,
        repo: &str,
        sha: &str,
        name: &str,
        external_id: &str,
    ) -> Result<Option<Created>, ApiError> {
        let name: String = name
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        // Only an App makes check runs: with a token, none found is baton's.
        let Some(app_id) = self.identity(inst, repo).await?.app_id else { return Ok(None) };
        let list = self.get((inst, repo), &format!("/repos/{repo}/commits/{sha}/check-runs?check_name={name}")).await?;
        Ok(list["check_runs"]
            .as_array()
            .and_then(|runs| runs.iter().find(|r| r["external_id"] == external_id && r["app"]["id"] == app_id))
            .map(created))
    }
}

/// The newest item of a listing that `login` wrote and whose body carries
/// `marker`.
fn find_marked(list: &Value, marker: &str, login: &str) -> Option<Created> {
    let mine = |c: &&Value| c["user"]["login"].as_str().is_some_and(|l| l.eq_ignore_ascii_case(login));
    let marked = |c: &&Value| c["body"].as_str().is_some_and(|b| b.contains(marker));
    list.as_array()?.iter().rev().filter(mine).find(marked).map(created)
}

fn classify(e: octocrab::Error) -> ApiError {
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
            ApiError {
                message: format!("GitHub answered {}: {}", status.as_u16(), source.message),
                retryable: status.is_server_error() || rate_limited,
                retry_after: if rate_limited { retry_after } else { None },
                maybe_applied: status.is_server_error(),
            }
        }
        // A JSON answer that does not parse means the request went through.
        octocrab::Error::Serde { .. } | octocrab::Error::Json { .. } => {
            ApiError::answer_lost("GitHub's answer could not be read".into())
        }
        other => ApiError::answer_lost(format!("GitHub request failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (items as `login:body`, marker) → the id of the item found.
    fn check(items: &[&str], marker: &str, expect: Option<u64>) {
        let list: Vec<Value> = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let (login, body) = item.split_once(':').unwrap_or(("", item));
                json!({ "id": i, "user": { "login": login }, "body": body })
            })
            .collect();
        let found = find_marked(&Value::Array(list), marker, "baton[bot]").and_then(|c| c.id);
        assert_eq!(found, expect, "{items:?}");
    }

    #[test]
    fn only_batons_own_items_are_found_by_their_marker() {
        let m = "<!-- baton:job=j1 -->";
        check(&["baton[bot]:a <!-- baton:job=j1 -->"], m, Some(0));
        check(&["mallory:a <!-- baton:job=j1 -->"], m, None);
        check(&["baton[bot]:<!-- baton:job=j1 -->", "mallory:<!-- baton:job=j1 -->"], m, Some(0));
        check(&["BATON[bot]:<!-- baton:job=j1 -->", "baton[bot]:<!-- baton:job=j2 -->"], m, Some(0));
        check(&[":<!-- baton:job=j1 -->"], m, None);
    }
}
