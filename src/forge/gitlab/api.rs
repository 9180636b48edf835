//! The GitLab REST API v4 calls baton publishes with, on reqwest.
//!
//! No retries here, as for GitHub: the outbox retries with backoff and,
//! before re-sending a create whose answer was lost, looks for its marker
//! (`find_note`, `find_commit_comment`) or relies on GitLab's own
//! idempotence (a commit status by name and sha, one open merge request per
//! source branch, an emoji awarded once).
//!
//! Projects are named by their full path (`group/sub/project`), sent as
//! GitLab's `:id` with every `/` encoded. `api_url` includes `/api/v4`, so
//! a self-managed GitLab under a path prefix (`https://host/gitlab/api/v4`)
//! needs nothing special.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::forge::{ApiError, Created};

mod hooks;
mod review;

pub use hooks::{HookEvent, ListError};

/// Pages of a listing read when looking for a marker (100 items each).
const MAX_FIND_PAGES: u32 = 20;
/// Pages of an MR's diffs read (100 files each): GitLab's own limit on a
/// diff shown is 3,000 files.
const MAX_DIFF_PAGES: u32 = 30;
/// Pages of a pipeline's failed jobs read (100 each).
const MAX_JOB_PAGES: u32 = 10;
/// Longest GitLab error text carried into a message.
const MAX_MESSAGE: usize = 500;
/// GitLab's limit on a commit status's description.
const MAX_STATUS_DESCRIPTION: usize = 255;

/// A GitLab user: who baton posts as.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct User {
    pub id: u64,
    #[serde(default)]
    pub username: String,
}

/// What a note is on. GitLab numbers both by their project-scoped `iid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noteable {
    MergeRequest(u64),
    Issue(u64),
}

impl Noteable {
    /// The route segment below `/projects/:id`.
    fn route(self) -> String {
        match self {
            Noteable::MergeRequest(iid) => format!("merge_requests/{iid}"),
            Noteable::Issue(iid) => format!("issues/{iid}"),
        }
    }
}

/// A merge request's diff version: the three commits an inline comment's
/// position names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Version {
    pub id: u64,
    #[serde(default)]
    pub base_commit_sha: String,
    #[serde(default)]
    pub start_commit_sha: String,
    #[serde(default)]
    pub head_commit_sha: String,
}

/// One changed file of a merge request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileDiff {
    #[serde(default)]
    pub old_path: String,
    #[serde(default)]
    pub new_path: String,
    /// The unified diff's hunks (`@@ … @@` onwards); empty for a binary file
    /// or one too large for GitLab to show.
    #[serde(default)]
    pub diff: String,
    #[serde(default)]
    pub new_file: bool,
    #[serde(default)]
    pub deleted_file: bool,
    #[serde(default)]
    pub renamed_file: bool,
}

/// Which side of the diff an inline comment is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The new file: added or unchanged lines.
    New,
    /// The old file: removed lines.
    Old,
}

/// An inline comment of a review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineNote {
    /// The file's path after the change.
    pub path: String,
    /// Its path before, when it was renamed.
    pub old_path: Option<String>,
    /// The (last) line commented on, on `side`.
    pub line: u64,
    /// The first line, when the comment spans several (same side).
    pub start_line: Option<u64>,
    pub side: Side,
    pub body: String,
}

/// A review to publish at once.
#[derive(Debug, Clone, Copy)]
pub struct Review<'a> {
    pub version: &'a Version,
    /// The review's summary note; it carries `marker`.
    pub summary: &'a str,
    pub marker: &'a str,
    pub comments: &'a [InlineNote],
}

/// A commit status's state, as GitLab names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusState {
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
}

/// A commit status to set.
#[derive(Debug, Clone, Copy)]
pub struct Status<'a> {
    pub state: StatusState,
    /// The status's name: GitLab keeps one status per name and sha.
    pub name: &'a str,
    /// Cut to GitLab's 255 characters.
    pub description: &'a str,
    pub target_url: Option<&'a str>,
}

/// A job of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobInfo {
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub stage: String,
    #[serde(default)]
    pub web_url: String,
}

/// A string, or a number GitLab sent where it usually sends a string.
fn stringish<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    })
}

// What baton sends. Each body is a struct so what a call can send is
// written down once, and checked by the compiler.

#[derive(Serialize)]
struct NoteBody<'a> {
    body: &'a str,
}

#[derive(Serialize)]
struct EmojiBody<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct CommitCommentBody<'a> {
    note: &'a str,
}

#[derive(Serialize)]
struct NewMergeRequest<'a> {
    source_branch: &'a str,
    target_branch: &'a str,
    title: &'a str,
    description: &'a str,
    remove_source_branch: bool,
}

#[derive(Serialize)]
struct StatusBody<'a> {
    state: StatusState,
    name: &'a str,
    description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_url: Option<&'a str>,
}

// What GitLab answers, read leniently: only what baton uses, defaulted
// where GitLab may leave it out.

#[derive(Debug, Default, Deserialize)]
struct Author {
    #[serde(default)]
    id: u64,
    #[serde(default)]
    username: String,
}

impl Author {
    /// Whether `me` wrote it: by id when GitLab gave one, else by name.
    fn is(&self, me: &User) -> bool {
        if self.id != 0 && me.id != 0 {
            return self.id == me.id;
        }
        !self.username.is_empty() && self.username.eq_ignore_ascii_case(&me.username)
    }
}

#[derive(Debug, Deserialize)]
struct Note {
    id: u64,
    #[serde(default)]
    body: String,
    #[serde(default)]
    author: Author,
}

#[derive(Debug, Deserialize)]
struct CommitComment {
    #[serde(default)]
    note: String,
    #[serde(default)]
    author: Author,
}

#[derive(Debug, Deserialize)]
struct Member {
    #[serde(default)]
    access_level: u32,
}

#[derive(Debug, Deserialize)]
struct Emoji {
    #[serde(default)]
    id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct MergeRequest {
    iid: u64,
    #[serde(default)]
    web_url: Option<String>,
}

impl MergeRequest {
    /// An MR is known by its `iid` (`!N`) in its project: that is its id.
    fn created(self) -> Created {
        Created { id: Some(self.iid), url: self.web_url }
    }
}

#[derive(Debug, Deserialize)]
struct CommitStatus {
    #[serde(default)]
    id: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct Approvals {
    #[serde(default)]
    approved_by: Vec<Approver>,
}

#[derive(Debug, Default, Deserialize)]
struct Approver {
    #[serde(default)]
    user: Author,
}

/// An answer whose status has not been judged yet.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// An authenticated client for one GitLab (gitlab.com, self-managed, or a fake).
pub struct Client {
    /// The API base, `…/api/v4`, without a trailing slash.
    base: String,
    token: Secret,
    /// `Err` when reqwest could not build a client (its TLS roots); every
    /// call then fails with this text.
    http: Result<reqwest::Client, String>,
    /// Asked of GitLab the first time it is needed, then kept: it does not
    /// change while the token does not.
    identity: tokio::sync::OnceCell<User>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).field("token", &self.token).finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(api_url: &str, token: Secret) -> Client {
        let http = reqwest::Client::builder()
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            // A redirect would carry the token to wherever it points, and a
            // redirected POST turns into a GET: a moved API is a
            // configuration error, reported as such.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot make an HTTP client for GitLab: {e}"));
        Client { base: api_url.trim_end_matches('/').to_string(), token, http, identity: tokio::sync::OnceCell::new() }
    }

    /// Who baton posts as (`GET /user`), asked once then kept.
    pub async fn identity(&self) -> Result<&User, ApiError> {
        self.identity
            .get_or_try_init(|| async {
                let user: User = self.get("/user").await?;
                if user.id == 0 || user.username.is_empty() {
                    return Err(ApiError::before_sending("GitLab did not say which user baton posts as".into()));
                }
                tracing::info!(username = %user.username, "Publishing as this GitLab user.");
                Ok(user)
            })
            .await
            .map_err(|e: ApiError| ApiError {
                message: format!("cannot tell which user baton posts as: {}", e.message),
                ..e
            })
    }

    /// The access level of a user in a project, inherited membership
    /// included (`GET /projects/:id/members/all/:user_id`); `None` when
    /// the user is no member.
    pub async fn member_access(&self, project: &str, user_id: u64) -> Result<Option<u32>, ApiError> {
        let reply =
            self.send(self.request(Method::GET, &format!("/projects/{}/members/all/{user_id}", enc(project)))?).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let member: Member = self.parse(reply)?;
        Ok(Some(member.access_level))
    }

    /// Posts a note on a merge request or issue.
    pub async fn create_note(&self, project: &str, on: Noteable, body: &str) -> Result<Created, ApiError> {
        let route = format!("/projects/{}/{}/notes", enc(project), on.route());
        let note: Note = self.write(Method::POST, &route, &NoteBody { body }).await?;
        Ok(Created { id: Some(note.id), url: None })
    }

    /// Replaces a note's body.
    pub async fn edit_note(&self, project: &str, on: Noteable, note_id: u64, body: &str) -> Result<Created, ApiError> {
        let route = format!("/projects/{}/{}/notes/{note_id}", enc(project), on.route());
        let note: Note = self.write(Method::PUT, &route, &NoteBody { body }).await?;
        Ok(Created { id: Some(note.id), url: None })
    }

    /// The newest note on `on` written by `identity()` whose body contains
    /// `marker`. Anyone can write a marker (job ids can be guessed), so a
    /// note by another user is never taken for baton's. Listed newest
    /// first, so what baton just made is on the first page.
    pub async fn find_note(&self, project: &str, on: Noteable, marker: &str) -> Result<Option<Created>, ApiError> {
        let me = self.identity().await?.clone();
        let route = format!("/projects/{}/{}/notes?sort=desc&order_by=created_at", enc(project), on.route());
        for page in 1..=MAX_FIND_PAGES {
            let (notes, more) = self.page::<Note>(&route, page).await?;
            if let Some(n) = notes.iter().find(|n| n.author.is(&me) && n.body.contains(marker)) {
                return Ok(Some(Created { id: Some(n.id), url: None }));
            }
            if !more {
                break;
            }
        }
        Ok(None)
    }

    /// Awards emoji `name` (`eyes`) on the issue or MR itself, or on one of
    /// its notes. One already awarded by baton counts as done: GitLab
    /// answers it 404 "Award Emoji Name has already been taken" (or 409 in
    /// some versions).
    pub async fn award_emoji(
        &self,
        project: &str,
        on: Noteable,
        note: Option<u64>,
        name: &str,
    ) -> Result<Created, ApiError> {
        let route = match note {
            Some(note) => format!("/projects/{}/{}/notes/{note}/award_emoji", enc(project), on.route()),
            None => format!("/projects/{}/{}/award_emoji", enc(project), on.route()),
        };
        let reply = self.send(self.request(Method::POST, &route)?.json(&EmojiBody { name })).await?;
        let already = match reply.status.as_u16() {
            409 => true,
            404 => gitlab_message(&reply.body).contains("already been taken"),
            _ => false,
        };
        if already {
            return Ok(Created::default());
        }
        let emoji: Emoji = self.parse(reply)?;
        Ok(Created { id: emoji.id, url: None })
    }

    /// Comments on a commit. GitLab's answer names no id.
    pub async fn commit_comment(&self, project: &str, sha: &str, body: &str) -> Result<Created, ApiError> {
        let route = format!("/projects/{}/repository/commits/{}/comments", enc(project), enc(sha));
        let _: CommitComment = self.write(Method::POST, &route, &CommitCommentBody { note: body }).await?;
        Ok(Created::default())
    }

    /// Whether baton already commented `marker` on the commit. GitLab lists
    /// commit comments oldest first, with no sort, so every page is read
    /// (up to a bound).
    pub async fn find_commit_comment(
        &self,
        project: &str,
        sha: &str,
        marker: &str,
    ) -> Result<Option<Created>, ApiError> {
        let me = self.identity().await?.clone();
        let route = format!("/projects/{}/repository/commits/{}/comments", enc(project), enc(sha));
        let mut found = None;
        for page in 1..=MAX_FIND_PAGES {
            let (comments, more) = self.page::<CommitComment>(&route, page).await?;
            if comments.iter().any(|c| c.author.is(&me) && c.note.contains(marker)) {
                found = Some(Created::default());
            }
            if !more {
                break;
            }
        }
        Ok(found)
    }

    /// A reply in an MR discussion.
    pub async fn reply(&self, project: &str, iid: u64, discussion: &str, body: &str) -> Result<Created, ApiError> {
        let route = format!("/projects/{}/merge_requests/{iid}/discussions/{}/notes", enc(project), enc(discussion));
        let note: Note = self.write(Method::POST, &route, &NoteBody { body }).await?;
        Ok(Created { id: Some(note.id), url: None })
    }

    /// Opens an MR. GitLab allows one open MR per source branch and answers
    /// a second 409: that MR, already open (an earlier try's, whose answer
    /// was lost), is returned. This is the exactly-once rule for MRs.
    pub async fn create_merge_request(
        &self,
        project: &str,
        source: &str,
        target: &str,
        title: &str,
        description: &str,
    ) -> Result<Created, ApiError> {
        let route = format!("/projects/{}/merge_requests", enc(project));
        let body = NewMergeRequest {
            source_branch: source,
            target_branch: target,
            title,
            description,
            remove_source_branch: false,
        };
        let reply = self.send(self.request(Method::POST, &route)?.json(&body)).await?;
        if reply.status != StatusCode::CONFLICT {
            let mr: MergeRequest = self.parse(reply)?;
            return Ok(mr.created());
        }
        let conflict = self.classify(&reply);
        let open: Vec<MergeRequest> = self.get(&format!("{route}?source_branch={}&state=opened", enc(source))).await?;
        open.into_iter().next().map(MergeRequest::created).ok_or(conflict)
    }

    /// Sets a commit status. GitLab keeps one per name and sha (and ref),
    /// so setting it again is safe.
    pub async fn set_status(&self, project: &str, sha: &str, status: &Status<'_>) -> Result<Created, ApiError> {
        let route = format!("/projects/{}/statuses/{}", enc(project), enc(sha));
        let body = StatusBody {
            state: status.state,
            name: status.name,
            description: status.description.chars().take(MAX_STATUS_DESCRIPTION).collect(),
            target_url: status.target_url,
        };
        let made: CommitStatus = self.write(Method::POST, &route, &body).await?;
        Ok(Created { id: made.id, url: None })
    }

    /// The failed jobs of a pipeline.
    pub async fn failed_jobs(&self, project: &str, pipeline: u64) -> Result<Vec<JobInfo>, ApiError> {
        let route = format!("/projects/{}/pipelines/{pipeline}/jobs?scope[]=failed", enc(project));
        let mut jobs = Vec::new();
        for page in 1..=MAX_JOB_PAGES {
            let (list, more) = self.page::<JobInfo>(&route, page).await?;
            jobs.extend(list);
            if !more {
                break;
            }
        }
        Ok(jobs)
    }

    /// The last `max_bytes` of a job's log, cut on a character boundary
    /// (invalid UTF-8 replaced). Read as it streams, so a log of gigabytes
    /// costs only twice `max_bytes` of memory.
    pub async fn job_trace_tail(&self, project: &str, job: u64, max_bytes: usize) -> Result<String, ApiError> {
        let route = format!("/projects/{}/jobs/{job}/trace", enc(project));
        let mut response = self.request(Method::GET, &route)?.send().await.map_err(transport)?;
        if !response.status().is_success() {
            let reply = Reply {
                status: response.status(),
                headers: response.headers().clone(),
                body: response.bytes().await.map(|b| b.to_vec()).unwrap_or_default(),
            };
            return Err(self.classify(&reply));
        }
        let mut tail: Vec<u8> = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            tail.extend_from_slice(&chunk);
            if tail.len() > max_bytes.saturating_mul(2).max(64 * 1024) {
                tail.drain(..tail.len() - max_bytes);
            }
        }
        Ok(tail_on_char_boundary(&tail, max_bytes))
    }

    // The plumbing.

    fn request(&self, method: Method, route: &str) -> Result<reqwest::RequestBuilder, ApiError> {
        let http = self.http.as_ref().map_err(|e| ApiError::fatal(e.clone()))?;
        let mut token = HeaderValue::from_str(self.token.expose())
            .map_err(|_| ApiError::fatal("the GitLab token is not a valid header value".into()))?;
        token.set_sensitive(true);
        Ok(http.request(method, format!("{}{route}", self.base)).header("PRIVATE-TOKEN", token))
    }

    /// Sends a request; any answer that arrived is `Ok`, its status unjudged.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Reply, ApiError> {
        let response = request.send().await.map_err(transport)?;
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response.bytes().await.map_err(transport)?.to_vec();
        Ok(Reply { status, headers, body })
    }

    /// The reply if it is a success, else its error.
    fn check(&self, reply: Reply) -> Result<Reply, ApiError> {
        match reply.status.is_success() {
            true => Ok(reply),
            false => Err(self.classify(&reply)),
        }
    }

    /// A success's JSON. One that does not parse means the request went
    /// through and its answer is unknown.
    fn parse<T: DeserializeOwned>(&self, reply: Reply) -> Result<T, ApiError> {
        let reply = self.check(reply)?;
        let body: &[u8] = if reply.body.iter().all(u8::is_ascii_whitespace) { b"null" } else { &reply.body };
        serde_json::from_slice(body).map_err(|e| {
            ApiError::answer_lost(format!("GitLab answered {} with JSON baton cannot read: {e}", reply.status.as_u16()))
        })
    }

    async fn get<T: DeserializeOwned>(&self, route: &str) -> Result<T, ApiError> {
        let reply = self.send(self.request(Method::GET, route)?).await?;
        self.parse(reply)
    }

    async fn write<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        route: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let reply = self.send(self.request(method, route)?.json(body)).await?;
        self.parse(reply)
    }

    /// Page `page` (100 items) of a listing, and whether another may follow
    /// (GitLab's `X-Next-Page`, else a full page).
    async fn page<T: DeserializeOwned>(&self, route: &str, page: u32) -> Result<(Vec<T>, bool), ApiError> {
        let join = if route.contains('?') { '&' } else { '?' };
        let reply = self.send(self.request(Method::GET, &format!("{route}{join}per_page=100&page={page}"))?).await?;
        let next = reply.headers.get("x-next-page").and_then(|v| v.to_str().ok()).map(|v| !v.trim().is_empty());
        let items: Vec<T> = self.parse(reply)?;
        let more = next.unwrap_or(items.len() >= 100) && !items.is_empty();
        Ok((items, more))
    }

    /// The error an unsuccessful answer means for the outbox.
    fn classify(&self, reply: &Reply) -> ApiError {
        classify(reply.status, &reply.headers, &reply.body, self.token.expose())
    }
}

/// How an unsuccessful answer is retried: a 5xx may have been applied and is
/// worth another try; a rate limit (429, or 403 with `RateLimit-Remaining:
/// 0`) is retried when GitLab says; any other 4xx is a refusal, final.
fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8], token: &str) -> ApiError {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
    let rate_limited = status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::FORBIDDEN && number("ratelimit-remaining") == Some(0));
    let retry_after = number("retry-after").map(Duration::from_secs).or_else(|| {
        number("ratelimit-reset").map(|reset| {
            let now = chrono::Utc::now().timestamp().max(0) as u64;
            Duration::from_secs(reset.saturating_sub(now).max(1))
        })
    });
    let mut said = gitlab_message(body);
    if !token.is_empty() {
        said = said.replace(token, "***");
    }
    let message = match said.is_empty() {
        true => format!("GitLab answered {}", status.as_u16()),
        false => format!("GitLab answered {}: {said}", status.as_u16()),
    };
    ApiError {
        message,
        retryable: status.is_server_error() || rate_limited,
        retry_after: if rate_limited { retry_after } else { None },
        maybe_applied: status.is_server_error(),
    }
}

/// A reqwest failure: refused before the request left (no connection) is
/// safe to retry; anything later may have reached GitLab.
fn transport(e: reqwest::Error) -> ApiError {
    if e.is_builder() {
        return ApiError::fatal(format!("cannot make the GitLab request: {e}"));
    }
    if e.is_connect() {
        return ApiError::before_sending(format!("cannot reach GitLab: {e}"));
    }
    ApiError::answer_lost(format!("GitLab request failed: {e}"))
}

/// GitLab's words in an error answer: its `message` (a string, a list, or
/// an object of field → problems, as Rails validations give) or `error`,
/// else the body's text, bounded.
fn gitlab_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let said = match (&v["message"], &v["error"]) {
                (m, _) if !m.is_null() => m,
                (_, e) if !e.is_null() => e,
                _ => &v,
            };
            let mut out = render(said);
            if let Some(description) = v["error_description"].as_str() {
                out = format!("{out}: {description}");
            }
            out
        }
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    };
    cut(&text, MAX_MESSAGE)
}

/// A JSON value as a person reads it: `a; b` for a list, `field: problem`
/// for an object.
fn render(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items.iter().map(render).collect::<Vec<_>>().join("; "),
        serde_json::Value::Object(fields) => {
            fields.iter().map(|(k, v)| format!("{k}: {}", render(v))).collect::<Vec<_>>().join("; ")
        }
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// At most `max` characters of `s`, with `…` when cut.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// A path segment or query value as GitLab's `:id` wants it: everything but
/// RFC 3986's unreserved characters percent-encoded (`group/sub/project`
/// → `group%2Fsub%2Fproject`).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The last `max_bytes` of `bytes`, starting on a UTF-8 character boundary,
/// invalid sequences replaced.
fn tail_on_char_boundary(bytes: &[u8], max_bytes: usize) -> String {
    let mut start = bytes.len().saturating_sub(max_bytes);
    // A continuation byte (0b10xx_xxxx) is inside a character: skip to the
    // next start (at most 3 bytes on).
    let limit = (start + 3).min(bytes.len());
    while start < limit && bytes[start] & 0xC0 == 0x80 {
        start += 1;
    }
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_paths_are_encoded_whole() {
        assert_eq!(enc("group/sub/project"), "group%2Fsub%2Fproject");
        assert_eq!(enc("a b+c.d_e~f-g"), "a%20b%2Bc.d_e~f-g");
        assert_eq!(enc("é"), "%C3%A9");
    }

    #[test]
    fn gitlab_messages_are_rendered_readably() {
        assert_eq!(gitlab_message(br#"{"message":"404 Not found"}"#), "404 Not found");
        assert_eq!(gitlab_message(br#"{"message":["a","b"]}"#), "a; b");
        assert_eq!(gitlab_message(br#"{"message":{"title":["can't be blank"]}}"#), "title: can't be blank");
        assert_eq!(
            gitlab_message(br#"{"error":"invalid_token","error_description":"expired"}"#),
            "invalid_token: expired"
        );
        assert_eq!(gitlab_message(b"<html>Bad Gateway</html>"), "<html>Bad Gateway</html>");
        assert!(gitlab_message(&vec![b'x'; 5000]).chars().count() <= MAX_MESSAGE + 1);
    }

    #[test]
    fn classification() {
        let mut headers = HeaderMap::new();
        let e = classify(StatusCode::BAD_GATEWAY, &headers, b"", "tok");
        assert!(e.retryable && e.maybe_applied && e.retry_after.is_none());
        let e = classify(StatusCode::NOT_FOUND, &headers, br#"{"message":"tok leaked"}"#, "tok");
        assert!(!e.retryable && !e.maybe_applied);
        assert!(!e.message.contains("tok "), "{}", e.message);
        headers.insert("retry-after", HeaderValue::from_static("7"));
        let e = classify(StatusCode::TOO_MANY_REQUESTS, &headers, b"", "tok");
        assert!(e.retryable && !e.maybe_applied);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-remaining", HeaderValue::from_static("0"));
        let reset = (chrono::Utc::now().timestamp() + 30).to_string();
        headers.insert("ratelimit-reset", HeaderValue::from_str(&reset).unwrap());
        let e = classify(StatusCode::FORBIDDEN, &headers, b"", "tok");
        assert!(e.retryable && e.retry_after.is_some_and(|d| d.as_secs() >= 28 && d.as_secs() <= 30));
        let e = classify(StatusCode::FORBIDDEN, &HeaderMap::new(), b"", "tok");
        assert!(!e.retryable);
    }

    #[test]
    fn a_trace_tail_starts_on_a_character() {
        let s = "aé€😀b".as_bytes();
        assert_eq!(tail_on_char_boundary(s, 100), "aé€😀b");
        assert_eq!(tail_on_char_boundary(s, 5), "😀b");
        assert_eq!(tail_on_char_boundary(s, 4), "b");
        assert_eq!(tail_on_char_boundary(s, 0), "");
    }
}
