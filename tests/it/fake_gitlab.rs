//! A fake GitLab REST API v4: records every request, keeps what baton makes
//! (notes, draft notes and what publishing them made, emoji, commit
//! comments, merge requests, commit statuses, approvals) so baton can list
//! and edit it, answers what a test sets (members, MR versions and diffs,
//! pipelines' jobs and their logs, hook events), and can inject faults: a
//! 502 on every Nth write after applying it (GitLab's answer lost), writes
//! dropped with a 502 before they apply, and 429s.
//!
//! Every request is checked against `SPEC`, the endpoints baton calls with
//! the parameters GitLab documents for them (see
//! `tests/fixtures/gitlab/API.md` for each row's source). An unknown
//! endpoint or parameter, a missing required one, or a value of the wrong
//! type or outside its enum is a violation: recorded, and answered 400 as
//! GitLab answers a missing required parameter.
//!
//! Everything the token writes is by `baton-bot` (id 99); a test can plant
//! notes, drafts and comments by others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use baton::forge::gitlab::api::Noteable;
use serde_json::{json, Map, Value};

/// The token's user.
pub const BOT: &str = "baton-bot";
pub const BOT_ID: u64 = 99;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The path as sent, still percent-encoded.
    pub raw_path: String,
    /// The path below `…/api/v4`, each segment decoded (`/projects/group/sub/p/notes`
    /// for `/api/v4/projects/group%2Fsub%2Fp/notes`).
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    /// The JSON body, or a form body as an object of its fields.
    pub body: Value,
    /// The status the fake answered.
    pub status: u16,
}

/// Faults to inject into writes (POST, PUT, DELETE).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every Nth write is applied and then answered 502.
    pub fail_every_nth_write: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub id: u64,
    /// `project!iid` for an MR, `project#iid` for an issue.
    pub on: String,
    pub body: String,
    pub author: String,
    /// The discussion a note starts or replies in.
    pub discussion_id: String,
    /// A diff note's position as published.
    pub position: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub id: u64,
    /// `project!iid`.
    pub on: String,
    pub author: String,
    pub note: String,
    pub position: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeRequest {
    pub project: String,
    pub iid: u64,
    pub source_branch: String,
    pub target_branch: String,
    pub title: String,
    pub description: String,
    pub state: String,
    pub web_url: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Emoji {
    /// `project!iid` or `project#iid`, then `/note_id` for one on a note.
    pub on: String,
    pub name: String,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommitComment {
    pub project: String,
    pub sha: String,
    pub note: String,
    pub author: String,
}

#[derive(Default)]
struct State {
    token: String,
    next_id: u64,
    writes: usize,
    dropped_writes: usize,
    /// The next requests answered 429 with this `Retry-After`.
    rate_limited: (usize, u64),
    faults: Faults,
    violations: Vec<String>,
    notes: Vec<Note>,
    drafts: Vec<Draft>,
    emoji: Vec<Emoji>,
    commit_comments: Vec<CommitComment>,
    mrs: Vec<MergeRequest>,
    statuses: Vec<Value>,
    /// `project!iid` → who approved.
    approvals: HashMap<String, Vec<String>>,
    members: HashMap<(String, u64), u32>,
    versions: HashMap<String, Vec<Value>>,
    diffs: HashMap<String, Vec<Value>>,
    jobs: HashMap<(String, u64), Vec<Value>>,
    traces: HashMap<(String, u64), Vec<u8>>,
    hook_events: HashMap<(String, u64), Vec<Value>>,
    resent: Vec<(String, u64, u64)>,
}

#[derive(Clone)]
pub struct FakeGitLab {
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    state: Arc<Mutex<State>>,
    /// The server's root; the API is below any prefix ending in `/api/v4`.
    pub url: String,
}

/// The key of what a note is on.
pub fn on_key(project: &str, on: Noteable) -> String {
    match on {
        Noteable::MergeRequest(iid) => format!("{project}!{iid}"),
        Noteable::Issue(iid) => format!("{project}#{iid}"),
    }
}

/// Another user's id, stable by name.
fn user_id(name: &str) -> u64 {
    if name == BOT {
        return BOT_ID;
    }
    1000 + name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)) % 100_000
}

impl FakeGitLab {
    pub async fn start(token: &str) -> FakeGitLab {
        FakeGitLab::start_with(token, Faults::default()).await
    }

    pub async fn start_with(token: &str, faults: Faults) -> FakeGitLab {
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let state = Arc::new(Mutex::new(State { token: token.to_string(), faults, next_id: 100, ..State::default() }));
        let (sink, st) = (requests.clone(), state.clone());
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (sink, st) = (sink.clone(), st.clone());
            async move {
                let raw_path = uri.path().to_string();
                let query = parse_form(uri.query().unwrap_or(""));
                let form = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
                let body: Value = if form {
                    let fields = parse_form(&String::from_utf8_lossy(&body));
                    Value::Object(fields.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
                } else {
                    serde_json::from_slice(&body).unwrap_or(Value::Null)
                };
                let segments: Vec<String> = api_segments(&raw_path);
                let (response, path) = {
                    let mut st = st.lock().unwrap();
                    let response = handle(&mut st, &method, &segments, &query, &headers, &body);
                    (response, format!("/{}", segments.join("/")))
                };
                sink.lock().unwrap().push(Recorded {
                    method: method.to_string(),
                    raw_path,
                    path,
                    query,
                    headers,
                    body,
                    status: response.status().as_u16(),
                });
                response
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGitLab { requests, state, url }
    }

    /// `…/api/v4` of this fake.
    pub fn api_url(&self) -> String {
        format!("{}/api/v4", self.url)
    }

    pub fn requests_to(&self, method: &str, path_prefix: &str) -> Vec<Recorded> {
        let list = self.requests.lock().unwrap();
        list.iter().filter(|r| r.method == method && r.path.starts_with(path_prefix)).cloned().collect()
    }

    /// Every request that broke `SPEC`, described.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    pub fn notes(&self, project: &str, on: Noteable) -> Vec<Note> {
        let key = on_key(project, on);
        self.state.lock().unwrap().notes.iter().filter(|n| n.on == key).cloned().collect()
    }

    /// Adds a note by `author`; returns its id.
    pub fn add_note_by(&self, project: &str, on: Noteable, author: &str, body: &str) -> u64 {
        let mut st = self.state.lock().unwrap();
        let id = st.id();
        let note = Note {
            id,
            on: on_key(project, on),
            body: body.to_string(),
            author: author.to_string(),
            discussion_id: discussion_id(id),
            position: None,
        };
        st.notes.push(note);
        id
    }

    /// Adds a draft note by `author` on an MR, as a crashed try leaves it.
    pub fn add_draft_by(&self, project: &str, iid: u64, author: &str, note: &str) -> u64 {
        let mut st = self.state.lock().unwrap();
        let id = st.id();
        let on = on_key(project, Noteable::MergeRequest(iid));
        st.drafts.push(Draft { id, on, author: author.to_string(), note: note.to_string(), position: None });
        id
    }

    pub fn drafts(&self, project: &str, iid: u64) -> Vec<Draft> {
        let key = on_key(project, Noteable::MergeRequest(iid));
        self.state.lock().unwrap().drafts.iter().filter(|d| d.on == key).cloned().collect()
    }

    /// What publishing drafts made on an MR: its notes with their positions.
    pub fn published_discussions(&self, project: &str, iid: u64) -> Vec<Note> {
        self.notes(project, Noteable::MergeRequest(iid))
    }

    pub fn emoji(&self) -> Vec<Emoji> {
        self.state.lock().unwrap().emoji.clone()
    }

    pub fn commit_comments(&self, project: &str, sha: &str) -> Vec<CommitComment> {
        let st = self.state.lock().unwrap();
        st.commit_comments.iter().filter(|c| c.project == project && c.sha == sha).cloned().collect()
    }

    pub fn add_commit_comment_by(&self, project: &str, sha: &str, author: &str, note: &str) {
        let c = CommitComment {
            project: project.to_string(),
            sha: sha.to_string(),
            note: note.to_string(),
            author: author.to_string(),
        };
        self.state.lock().unwrap().commit_comments.push(c);
    }

    pub fn merge_requests(&self, project: &str) -> Vec<MergeRequest> {
        self.state.lock().unwrap().mrs.iter().filter(|m| m.project == project).cloned().collect()
    }

    /// The commit statuses set, as posted, with `project` and `sha` added.
    pub fn statuses(&self, project: &str) -> Vec<Value> {
        self.state.lock().unwrap().statuses.iter().filter(|s| s["project"] == project).cloned().collect()
    }

    /// Who approved `project!iid`.
    pub fn approvals(&self, project: &str, iid: u64) -> Vec<String> {
        let key = on_key(project, Noteable::MergeRequest(iid));
        self.state.lock().unwrap().approvals.get(&key).cloned().unwrap_or_default()
    }

    pub fn set_member(&self, project: &str, user_id: u64, access_level: u32) {
        self.state.lock().unwrap().members.insert((project.to_string(), user_id), access_level);
    }

    /// What `GET …/merge_requests/:iid/versions` lists (newest first).
    pub fn set_versions(&self, project: &str, iid: u64, versions: Vec<Value>) {
        self.state.lock().unwrap().versions.insert(on_key(project, Noteable::MergeRequest(iid)), versions);
    }

    /// What `GET …/merge_requests/:iid/diffs` lists.
    pub fn set_diffs(&self, project: &str, iid: u64, diffs: Vec<Value>) {
        self.state.lock().unwrap().diffs.insert(on_key(project, Noteable::MergeRequest(iid)), diffs);
    }

    /// A pipeline's jobs (each with `id`, `name`, `stage`, `status`, `web_url`).
    pub fn set_jobs(&self, project: &str, pipeline: u64, jobs: Vec<Value>) {
        self.state.lock().unwrap().jobs.insert((project.to_string(), pipeline), jobs);
    }

    pub fn set_trace(&self, project: &str, job: u64, log: &[u8]) {
        self.state.lock().unwrap().traces.insert((project.to_string(), job), log.to_vec());
    }

    pub fn set_hook_events(&self, project: &str, hook: u64, events: Vec<Value>) {
        self.state.lock().unwrap().hook_events.insert((project.to_string(), hook), events);
    }

    /// The hook events resent: (project, hook, event).
    pub fn resent(&self) -> Vec<(String, u64, u64)> {
        self.state.lock().unwrap().resent.clone()
    }

    /// The next `n` writes are answered 502 and not applied.
    pub fn drop_writes(&self, n: usize) {
        self.state.lock().unwrap().dropped_writes = n;
    }

    /// The next `n` requests are answered 429 with `Retry-After: secs`.
    pub fn rate_limit(&self, n: usize, secs: u64) {
        self.state.lock().unwrap().rate_limited = (n, secs);
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut st = self.state.lock().unwrap();
        st.faults = faults;
        st.writes = 0;
    }
}

impl State {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// A discussion's id: 40 hex digits, as GitLab's.
fn discussion_id(note: u64) -> String {
    format!("{note:0>40x}")
}

/// The path's segments below `/api/v4`, each percent-decoded (so an encoded
/// project path is one segment).
fn api_segments(raw: &str) -> Vec<String> {
    let below = match raw.find("/api/v4/") {
        Some(at) => &raw[at + "/api/v4/".len()..],
        None => return vec!["<not below /api/v4>".to_string(), raw.to_string()],
    };
    below.split('/').map(|s| decode(s, false)).collect()
}

fn decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let hex = |i: usize| bytes.get(i).and_then(|b| (*b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if plus_is_space && bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k, true), decode(v, true))
        })
        .collect()
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn not_found(what: &str) -> Response {
    answer(StatusCode::NOT_FOUND, json!({ "message": format!("404 {what} Not Found") }))
}

/// The request's token: `PRIVATE-TOKEN`, or `Authorization: Bearer`.
fn token(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers.get("private-token").and_then(|v| v.to_str().ok()) {
        return Some(t.to_string());
    }
    let value = headers.get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

// --- The published description of each endpoint baton calls. ---

#[derive(Debug, Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
    Float,
    /// An integer within these bounds (inclusive).
    IntIn(i64, i64),
    /// One of these strings.
    Enum(&'static [&'static str]),
    /// An object; its fields are listed as `name[field]` rows.
    Hash,
}

#[derive(Debug, Clone, Copy)]
enum Need {
    Optional,
    Required,
    /// Required when the named parameter, or any `name[…]` field of it,
    /// is sent.
    With(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct Param(&'static str, Kind, Need);

#[derive(Debug)]
struct Endpoint {
    method: &'static str,
    /// Segments below `/api/v4`; `:name` is a path parameter, integer when
    /// its name ends in `id` other than `:id` and `:discussion_id`.
    path: &'static str,
    params: &'static [Param],
    source: &'static str,
}

use Kind::*;
use Need::*;

const PAGINATION: [Param; 2] = [Param("page", Int, Optional), Param("per_page", Int, Optional)];
const NOTE_CREATE_MR: &[Param] = &[
    Param("body", Str, Required),
    Param("created_at", Str, Optional),
    Param("internal", Bool, Optional),
    Param("merge_request_diff_head_sha", Str, Optional),
];
const NOTE_CREATE_ISSUE: &[Param] = &[
    Param("body", Str, Required),
    Param("confidential", Bool, Optional),
    Param("internal", Bool, Optional),
    Param("created_at", Str, Optional),
];
const NOTE_LIST: &[Param] = &[
    Param("sort", Enum(&["asc", "desc"]), Optional),
    Param("order_by", Enum(&["created_at", "updated_at"]), Optional),
    PAGINATION[0],
    PAGINATION[1],
];
const NOTE_EDIT_MR: &[Param] = &[Param("body", Str, Required), Param("confidential", Bool, Optional)];
const NOTE_EDIT_ISSUE: &[Param] = &[Param("body", Str, Optional), Param("confidential", Bool, Optional)];
const EMOJI: &[Param] = &[Param("name", Str, Required)];
const POSITION: &[Param] = &[
    Param("note", Str, Required),
    Param("commit_id", Str, Optional),
    Param("in_reply_to_discussion_id", Str, Optional),
    Param("resolve_discussion", Bool, Optional),
    Param("position", Hash, Optional),
    Param("position[base_sha]", Str, With("position")),
    Param("position[head_sha]", Str, With("position")),
    Param("position[start_sha]", Str, With("position")),
    Param("position[position_type]", Enum(&["text", "image", "file"]), With("position")),
    Param("position[new_path]", Str, Optional),
    Param("position[old_path]", Str, Optional),
    Param("position[new_line]", Int, Optional),
    Param("position[old_line]", Int, Optional),
    Param("position[line_range]", Hash, Optional),
    Param("position[line_range][start]", Hash, Optional),
    Param("position[line_range][end]", Hash, Optional),
    Param("position[line_range][start][line_code]", Str, Optional),
    Param("position[line_range][start][type]", Str, Optional),
    // The OpenAPI text types the line numbers of a range as strings; the
    // handler (`lib/api/draft_notes.rb`) declares them Integer, and Grape
    // coerces either way. `Int` takes a number or a numeric string.
    Param("position[line_range][start][old_line]", Int, Optional),
    Param("position[line_range][start][new_line]", Int, Optional),
    Param("position[line_range][end][line_code]", Str, Optional),
    Param("position[line_range][end][type]", Str, Optional),
    Param("position[line_range][end][old_line]", Int, Optional),
    Param("position[line_range][end][new_line]", Int, Optional),
    Param("position[width]", Int, Optional),
    Param("position[height]", Int, Optional),
    Param("position[x]", Int, Optional),
    Param("position[y]", Int, Optional),
];
const MR_STATES: &[&str] = &["opened", "closed", "locked", "merged", "all"];
const JOB_SCOPES: &[&str] = &[
    "created",
    "waiting_for_resource",
    "preparing",
    "waiting_for_callback",
    "pending",
    "running",
    "success",
    "failed",
    "canceling",
    "canceled",
    "skipped",
    "manual",
    "scheduled",
];
/// A hook event's `status` filter: an HTTP status code, or a class of them.
#[rustfmt::skip]
const HOOK_STATUSES: &[&str] = &[
    "100", "101", "102", "103", "200", "201", "202", "203", "204", "205", "206", "207", "208", "226", "300", "301",
    "302", "303", "304", "305", "306", "307", "308", "400", "401", "402", "403", "404", "405", "406", "407", "408",
    "409", "410", "411", "412", "413", "414", "415", "416", "417", "421", "422", "423", "424", "425", "426", "428",
    "429", "431", "451", "500", "501", "502", "503", "504", "505", "506", "507", "508", "509", "510", "511",
    "successful", "client_failure", "server_failure",
];

/// Where a row comes from, in `gitlabhq/gitlabhq`: GitLab's OpenAPI
/// description where it covers the endpoint, else the markdown page.
/// `tests/fixtures/gitlab/API.md` names the commit read and what was
/// checked.
const OPENAPI: &str = "doc/api/openapi/openapi_v2.yaml";
const NOTES: &str = "doc/api/notes.md";
const EMOJI_DOC: &str = "doc/api/emoji_reactions.md";
const DISCUSSIONS: &str = "doc/api/discussions.md";

/// The endpoints baton calls, with GitLab's documented parameters.
static SPEC: &[Endpoint] = &[
    Endpoint { method: "GET", path: "user", params: &[], source: OPENAPI },
    Endpoint { method: "GET", path: "projects/:id/members/all/:user_id", params: &[], source: OPENAPI },
    Endpoint {
        method: "POST",
        path: "projects/:id/merge_requests/:merge_request_iid/notes",
        params: NOTE_CREATE_MR,
        source: NOTES,
    },
    Endpoint { method: "POST", path: "projects/:id/issues/:issue_iid/notes", params: NOTE_CREATE_ISSUE, source: NOTES },
    Endpoint {
        method: "GET",
        path: "projects/:id/merge_requests/:merge_request_iid/notes",
        params: NOTE_LIST,
        source: NOTES,
    },
    Endpoint { method: "GET", path: "projects/:id/issues/:issue_iid/notes", params: NOTE_LIST, source: NOTES },
    Endpoint {
        method: "PUT",
        path: "projects/:id/merge_requests/:merge_request_iid/notes/:note_id",
        params: NOTE_EDIT_MR,
        source: NOTES,
    },
    Endpoint {
        method: "PUT",
        path: "projects/:id/issues/:issue_iid/notes/:note_id",
        params: NOTE_EDIT_ISSUE,
        source: NOTES,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/merge_requests/:merge_request_iid/award_emoji",
        params: EMOJI,
        source: EMOJI_DOC,
    },
    Endpoint { method: "POST", path: "projects/:id/issues/:issue_iid/award_emoji", params: EMOJI, source: EMOJI_DOC },
    Endpoint {
        method: "POST",
        path: "projects/:id/merge_requests/:merge_request_iid/notes/:note_id/award_emoji",
        params: EMOJI,
        source: EMOJI_DOC,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/issues/:issue_iid/notes/:note_id/award_emoji",
        params: EMOJI,
        source: EMOJI_DOC,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/repository/commits/:sha/comments",
        params: &[
            Param("note", Str, Required),
            Param("path", Str, Optional),
            Param("line", Int, With("path")),
            Param("line_type", Enum(&["new", "old"]), With("path")),
        ],
        source: OPENAPI,
    },
    Endpoint {
        method: "GET",
        path: "projects/:id/repository/commits/:sha/comments",
        params: &PAGINATION,
        source: OPENAPI,
    },
    Endpoint {
        method: "GET",
        path: "projects/:id/merge_requests/:merge_request_iid/versions",
        params: &PAGINATION,
        source: OPENAPI,
    },
    Endpoint {
        method: "GET",
        path: "projects/:id/merge_requests/:merge_request_iid/diffs",
        params: &[PAGINATION[0], PAGINATION[1], Param("unidiff", Bool, Optional)],
        source: OPENAPI,
    },
    Endpoint {
        method: "GET",
        path: "projects/:id/merge_requests/:merge_request_iid/draft_notes",
        params: &[],
        source: OPENAPI,
    },
    Endpoint {
        method: "DELETE",
        path: "projects/:id/merge_requests/:merge_request_iid/draft_notes/:draft_note_id",
        params: &[],
        source: OPENAPI,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/merge_requests/:merge_request_iid/draft_notes",
        params: POSITION,
        source: OPENAPI,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/merge_requests/:merge_request_iid/draft_notes/bulk_publish",
        params: &[],
        source: OPENAPI,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/merge_requests/:merge_request_iid/approve",
        params: &[Param("sha", Str, Optional), Param("approval_password", Str, Optional)],
        source: OPENAPI,
    },
    Endpoint {
        method: "GET",
        path: "projects/:id/merge_requests/:merge_request_iid/approvals",
        params: &[],
        source: OPENAPI,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/merge_requests/:merge_request_iid/discussions/:discussion_id/notes",
        params: &[Param("body", Str, Required), Param("created_at", Str, Optional)],
        source: DISCUSSIONS,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/merge_requests",
        params: &[
            Param("source_branch", Str, Required),
            Param("target_branch", Str, Required),
            Param("title", Str, Required),
            Param("description", Str, Optional),
            Param("target_project_id", Int, Optional),
            Param("assignee_id", Int, Optional),
            // Lists: a JSON array (`name[]`), or a comma-separated string.
            Param("assignee_ids", Str, Optional),
            Param("assignee_ids[]", Int, Optional),
            Param("reviewer_ids", Str, Optional),
            Param("reviewer_ids[]", Int, Optional),
            Param("labels", Str, Optional),
            Param("labels[]", Str, Optional),
            Param("add_labels", Str, Optional),
            Param("add_labels[]", Str, Optional),
            Param("remove_labels", Str, Optional),
            Param("remove_labels[]", Str, Optional),
            Param("milestone_id", Int, Optional),
            Param("remove_source_branch", Bool, Optional),
            Param("allow_collaboration", Bool, Optional),
            Param("allow_maintainer_to_push", Bool, Optional),
            Param("squash", Bool, Optional),
            Param("approvals_before_merge", Int, Optional),
        ],
        source: OPENAPI,
    },
    Endpoint {
        method: "GET",
        path: "projects/:id/merge_requests",
        params: &[
            Param("state", Enum(MR_STATES), Optional),
            Param("source_branch", Str, Optional),
            Param("target_branch", Str, Optional),
            Param(
                "order_by",
                Enum(&[
                    "created_at",
                    "label_priority",
                    "milestone_due",
                    "popularity",
                    "priority",
                    "title",
                    "updated_at",
                    "merged_at",
                ]),
                Optional,
            ),
            Param("sort", Enum(&["asc", "desc"]), Optional),
            PAGINATION[0],
            PAGINATION[1],
        ],
        source: OPENAPI,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/statuses/:sha",
        params: &[
            Param("state", Enum(&["pending", "running", "success", "failed", "canceled", "skipped"]), Required),
            Param("ref", Str, Optional),
            Param("target_url", Str, Optional),
            Param("description", Str, Optional),
            Param("name", Str, Optional),
            Param("context", Str, Optional),
            Param("coverage", Float, Optional),
            Param("pipeline_id", Int, Optional),
        ],
        source: OPENAPI,
    },
    Endpoint {
        method: "GET",
        path: "projects/:id/pipelines/:pipeline_id/jobs",
        params: &[
            Param("scope", Enum(JOB_SCOPES), Optional),
            Param("scope[]", Enum(JOB_SCOPES), Optional),
            Param("include_retried", Bool, Optional),
            PAGINATION[0],
            PAGINATION[1],
        ],
        source: OPENAPI,
    },
    Endpoint { method: "GET", path: "projects/:id/jobs/:job_id/trace", params: &[], source: OPENAPI },
    Endpoint {
        method: "GET",
        path: "projects/:id/hooks/:hook_id/events",
        params: &[
            Param("status", Enum(HOOK_STATUSES), Optional),
            Param("status[]", Enum(HOOK_STATUSES), Optional),
            Param("page", Int, Optional),
            Param("per_page", IntIn(1, 20), Optional),
        ],
        source: OPENAPI,
    },
    Endpoint {
        method: "POST",
        path: "projects/:id/hooks/:hook_id/events/:hook_event_id/resend",
        params: &[],
        source: OPENAPI,
    },
];

/// The SPEC row a request is for, and its path parameters.
fn endpoint(method: &str, segments: &[String]) -> Option<(&'static Endpoint, HashMap<&'static str, String>)> {
    'rows: for row in SPEC.iter().filter(|r| r.method == method) {
        let template: Vec<&str> = row.path.split('/').collect();
        if template.len() != segments.len() {
            continue;
        }
        let mut params = HashMap::new();
        for (t, s) in template.iter().zip(segments) {
            match t.strip_prefix(':') {
                Some(name) => {
                    params.insert(name, s.clone());
                }
                None if t == s => {}
                None => continue 'rows,
            }
        }
        return Some((row, params));
    }
    None
}

/// A JSON body as GitLab's parameter names: `a[b][c]` for nested fields,
/// `a[]` for each item of a list.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(fields) => {
            if !prefix.is_empty() {
                out.push((prefix.to_string(), Value::Object(Map::new())));
            }
            for (k, v) in fields {
                let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}[{k}]") };
                flatten(&name, v, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                flatten(&format!("{prefix}[]"), item, out);
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

/// Whether `v` (JSON, or a string from a query or form) is of `kind`.
fn fits(kind: Kind, v: &Value) -> bool {
    let s = v.as_str();
    match kind {
        Str => v.is_string(),
        Int => v.is_u64() || v.is_i64() || s.is_some_and(|s| s.parse::<i64>().is_ok()),
        Float => v.is_number() || s.is_some_and(|s| s.parse::<f64>().is_ok()),
        IntIn(lo, hi) => {
            v.as_i64().or_else(|| s.and_then(|s| s.parse::<i64>().ok())).is_some_and(|n| lo <= n && n <= hi)
        }
        Bool => v.is_boolean() || s.is_some_and(|s| s == "true" || s == "false"),
        Enum(values) => s.is_some_and(|s| values.contains(&s)),
        Hash => v.is_object(),
    }
}

/// What is wrong with a request, by the SPEC row it is for.
fn check(row: &Endpoint, path_params: &HashMap<&str, String>, query: &[(String, String)], body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, value) in path_params {
        let integer = name.ends_with("id") && *name != "id" && *name != "discussion_id";
        if integer && value.parse::<u64>().is_err() {
            problems.push(format!("path parameter {name} is not an integer: {value:?}"));
        }
        if value.is_empty() {
            problems.push(format!("path parameter {name} is empty"));
        }
    }
    let mut sent: Vec<(String, Value)> = query.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    match body {
        Value::Null => {}
        Value::Object(_) => flatten("", body, &mut sent),
        other => problems.push(format!("the body is not an object: {other}")),
    }
    for (name, value) in &sent {
        match row.params.iter().find(|p| p.0 == name) {
            None => problems.push(format!("unknown parameter {name}")),
            Some(p) if !fits(p.1, value) => problems.push(format!("{name} is not a valid {:?}: {value}", p.1)),
            Some(_) => {}
        }
    }
    for p in row.params {
        let needed = match p.2 {
            Optional => false,
            Required => true,
            With(other) => sent.iter().any(|(k, _)| k == other || k.starts_with(&format!("{other}["))),
        };
        if needed && !sent.iter().any(|(k, _)| k == p.0) {
            problems.push(format!("{} is missing", p.0));
        }
    }
    problems
}

fn handle(
    st: &mut State,
    method: &Method,
    segments: &[String],
    query: &[(String, String)],
    headers: &HeaderMap,
    body: &Value,
) -> Response {
    if token(headers).as_deref() != Some(st.token.as_str()) {
        return answer(StatusCode::UNAUTHORIZED, json!({ "message": "401 Unauthorized" }));
    }
    let Some((row, path_params)) = endpoint(method.as_str(), segments) else {
        let what = format!("{method} /{}: no such endpoint in SPEC", segments.join("/"));
        st.violations.push(what.clone());
        return answer(StatusCode::BAD_REQUEST, json!({ "error": what }));
    };
    let problems = check(row, &path_params, query, body);
    if !problems.is_empty() {
        let what = format!("{method} {} ({}): {}", row.path, row.source, problems.join("; "));
        st.violations.push(what.clone());
        return answer(StatusCode::BAD_REQUEST, json!({ "error": problems.join(", ") }));
    }
    if st.rate_limited.0 > 0 {
        st.rate_limited.0 -= 1;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", st.rate_limited.1.to_string())],
            axum::Json(json!({ "message": "Retry later" })),
        )
            .into_response();
    }
    let write = *method != Method::GET;
    let mut lost_answer = false;
    if write {
        st.writes += 1;
        if st.dropped_writes > 0 {
            st.dropped_writes -= 1;
            return answer(StatusCode::BAD_GATEWAY, json!({ "message": "502 Bad Gateway" }));
        }
        lost_answer = st.faults.fail_every_nth_write.is_some_and(|n| st.writes.is_multiple_of(n));
    }
    let response = route(st, method.as_str(), row.path, &path_params, query, body);
    if lost_answer {
        return answer(StatusCode::BAD_GATEWAY, json!({ "message": "502 Bad Gateway" }));
    }
    response
}

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A page of `items`, with GitLab's pagination headers.
fn paged(items: Vec<Value>, query: &[(String, String)]) -> Response {
    let per_page = param(query, "per_page").and_then(|v| v.parse().ok()).unwrap_or(20usize).clamp(1, 100);
    let page = param(query, "page").and_then(|v| v.parse().ok()).unwrap_or(1usize).max(1);
    let total = items.len();
    let list: Vec<Value> = items.into_iter().skip((page - 1) * per_page).take(per_page).collect();
    let next = if page * per_page < total { (page + 1).to_string() } else { String::new() };
    (
        StatusCode::OK,
        [("x-next-page", next), ("x-page", page.to_string()), ("x-total", total.to_string())],
        axum::Json(Value::Array(list)),
    )
        .into_response()
}

fn note_json(n: &Note) -> Value {
    json!({
        "id": n.id, "body": n.body, "type": if n.position.is_some() { json!("DiffNote") } else { Value::Null },
        "author": { "id": user_id(&n.author), "username": n.author }, "system": false,
        "position": n.position,
    })
}

fn mr_json(m: &MergeRequest) -> Value {
    json!({
        "id": m.iid + 5000, "iid": m.iid, "title": m.title, "description": m.description, "state": m.state,
        "source_branch": m.source_branch, "target_branch": m.target_branch, "web_url": m.web_url,
    })
}

fn route(
    st: &mut State,
    method: &str,
    template: &str,
    p: &HashMap<&str, String>,
    query: &[(String, String)],
    body: &Value,
) -> Response {
    let project = p.get("id").cloned().unwrap_or_default();
    let int = |name: &str| p.get(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let on = match (p.get("merge_request_iid"), p.get("issue_iid")) {
        (Some(_), _) => Some(on_key(&project, Noteable::MergeRequest(int("merge_request_iid")))),
        (_, Some(_)) => Some(on_key(&project, Noteable::Issue(int("issue_iid")))),
        _ => None,
    };
    let on = on.unwrap_or_default();
    let text = |name: &str| body[name].as_str().unwrap_or_default().to_string();
    let tail = template.rsplit('/').next().unwrap_or("");
    match (method, template) {
        ("GET", "user") => answer(StatusCode::OK, json!({ "id": BOT_ID, "username": BOT, "name": "Baton" })),
        ("GET", "projects/:id/members/all/:user_id") => match st.members.get(&(project, int("user_id"))) {
            Some(level) => answer(
                StatusCode::OK,
                json!({ "id": int("user_id"), "username": "someone", "access_level": level, "state": "active" }),
            ),
            None => not_found(""),
        },
        ("POST", _) if tail == "notes" && !template.contains("discussions") => {
            let id = st.id();
            let note = Note {
                id,
                on,
                body: text("body"),
                author: BOT.into(),
                discussion_id: discussion_id(id),
                position: None,
            };
            let out = note_json(&note);
            st.notes.push(note);
            answer(StatusCode::CREATED, out)
        }
        ("GET", _) if tail == "notes" => {
            let mut list: Vec<&Note> = st.notes.iter().filter(|n| n.on == on).collect();
            // GitLab lists newest first unless asked otherwise.
            if param(query, "sort") != Some("asc") {
                list.reverse();
            }
            paged(list.into_iter().map(note_json).collect(), query)
        }
        ("PUT", _) if template.ends_with("notes/:note_id") => {
            let id = int("note_id");
            match st.notes.iter_mut().find(|n| n.id == id && n.on == on) {
                Some(n) if n.author == BOT => {
                    n.body = text("body");
                    answer(StatusCode::OK, note_json(n))
                }
                Some(_) => answer(StatusCode::FORBIDDEN, json!({ "message": "403 Forbidden" })),
                None => not_found("Note"),
            }
        }
        ("POST", _) if tail == "award_emoji" => {
            let target = match p.get("note_id") {
                Some(note) => {
                    if !st.notes.iter().any(|n| n.on == on && n.id.to_string() == *note) {
                        return not_found("Note");
                    }
                    format!("{on}/{note}")
                }
                None => on,
            };
            let name = text("name");
            if st.emoji.iter().any(|e| e.on == target && e.name == name && e.user == BOT) {
                // As GitLab: the validation error, answered 404.
                return answer(
                    StatusCode::NOT_FOUND,
                    json!({ "message": "404 Award Emoji Name has already been taken" }),
                );
            }
            let id = st.id();
            st.emoji.push(Emoji { on: target, name: name.clone(), user: BOT.into() });
            answer(StatusCode::CREATED, json!({ "id": id, "name": name, "user": { "id": BOT_ID, "username": BOT } }))
        }
        ("POST", "projects/:id/repository/commits/:sha/comments") => {
            let c = CommitComment { project, sha: p["sha"].clone(), note: text("note"), author: BOT.into() };
            let out = json!({ "note": c.note, "path": null, "line": null, "line_type": null,
                "author": { "id": BOT_ID, "username": BOT } });
            st.commit_comments.push(c);
            answer(StatusCode::CREATED, out)
        }
        ("GET", "projects/:id/repository/commits/:sha/comments") => {
            let list = st
                .commit_comments
                .iter()
                .filter(|c| c.project == project && c.sha == p["sha"])
                .map(|c| json!({ "note": c.note, "author": { "id": user_id(&c.author), "username": c.author } }))
                .collect();
            paged(list, query)
        }
        ("GET", _) if tail == "versions" => {
            answer(StatusCode::OK, Value::Array(st.versions.get(&on).cloned().unwrap_or_default()))
        }
        ("GET", _) if tail == "diffs" => paged(st.diffs.get(&on).cloned().unwrap_or_default(), query),
        ("GET", _) if tail == "draft_notes" => {
            // Drafts are shown to their author only.
            let list = st
                .drafts
                .iter()
                .filter(|d| d.on == on && d.author == BOT)
                .map(|d| json!({ "id": d.id, "author_id": user_id(&d.author), "note": d.note, "position": d.position }))
                .collect();
            answer(StatusCode::OK, Value::Array(list))
        }
        ("DELETE", _) if tail == ":draft_note_id" => {
            let id = int("draft_note_id");
            let before = st.drafts.len();
            st.drafts.retain(|d| !(d.id == id && d.on == on && d.author == BOT));
            match st.drafts.len() < before {
                true => StatusCode::NO_CONTENT.into_response(),
                false => not_found("Draft Note"),
            }
        }
        ("POST", _) if tail == "draft_notes" => {
            let id = st.id();
            let position = body.get("position").cloned();
            let draft = Draft { id, on, author: BOT.into(), note: text("note"), position: position.clone() };
            st.drafts.push(draft);
            answer(
                StatusCode::CREATED,
                json!({ "id": id, "author_id": BOT_ID, "note": text("note"), "position": position }),
            )
        }
        ("POST", _) if tail == "bulk_publish" => {
            let mine: Vec<Draft> = st.drafts.iter().filter(|d| d.on == on && d.author == BOT).cloned().collect();
            st.drafts.retain(|d| !(d.on == on && d.author == BOT));
            for d in mine {
                let id = st.id();
                st.notes.push(Note {
                    id,
                    on: on.clone(),
                    body: d.note,
                    author: BOT.into(),
                    discussion_id: discussion_id(id),
                    position: d.position,
                });
            }
            StatusCode::NO_CONTENT.into_response()
        }
        ("POST", _) if tail == "approve" => {
            let approvers = st.approvals.entry(on).or_default();
            if approvers.iter().any(|a| a == BOT) {
                // As GitLab: approving twice is refused so.
                return answer(StatusCode::UNAUTHORIZED, json!({ "message": "401 Unauthorized" }));
            }
            approvers.push(BOT.into());
            answer(StatusCode::CREATED, json!({ "approved": true }))
        }
        ("GET", _) if tail == "approvals" => {
            let by: Vec<Value> = st
                .approvals
                .get(&on)
                .into_iter()
                .flatten()
                .map(|u| json!({ "user": { "id": user_id(u), "username": u } }))
                .collect();
            answer(StatusCode::OK, json!({ "approved": !by.is_empty(), "approved_by": by }))
        }
        ("POST", "projects/:id/merge_requests/:merge_request_iid/discussions/:discussion_id/notes") => {
            let discussion = p["discussion_id"].clone();
            if !st.notes.iter().any(|n| n.on == on && n.discussion_id == discussion) {
                return not_found("Discussion");
            }
            let id = st.id();
            let note =
                Note { id, on, body: text("body"), author: BOT.into(), discussion_id: discussion, position: None };
            let out = note_json(&note);
            st.notes.push(note);
            answer(StatusCode::CREATED, out)
        }
        ("POST", "projects/:id/merge_requests") => {
            let source = text("source_branch");
            if let Some(open) =
                st.mrs.iter().find(|m| m.project == project && m.source_branch == source && m.state == "opened")
            {
                let said = format!("Another open merge request already exists for this source branch: !{}", open.iid);
                return answer(StatusCode::CONFLICT, json!({ "message": [said] }));
            }
            let iid = st.mrs.iter().filter(|m| m.project == project).count() as u64 + 1;
            let mr = MergeRequest {
                web_url: format!("https://gitlab.example/{project}/-/merge_requests/{iid}"),
                project,
                iid,
                source_branch: source,
                target_branch: text("target_branch"),
                title: text("title"),
                description: text("description"),
                state: "opened".into(),
            };
            let out = mr_json(&mr);
            st.mrs.push(mr);
            answer(StatusCode::CREATED, out)
        }
        ("GET", "projects/:id/merge_requests") => {
            let state = param(query, "state").unwrap_or("all");
            let source = param(query, "source_branch");
            let list = st
                .mrs
                .iter()
                .rev()
                .filter(|m| m.project == project)
                .filter(|m| state == "all" || m.state == state)
                .filter(|m| source.is_none_or(|s| m.source_branch == s))
                .map(mr_json)
                .collect();
            paged(list, query)
        }
        ("POST", "projects/:id/statuses/:sha") => {
            let id = st.id();
            let mut status = body.clone();
            status["id"] = json!(id);
            status["project"] = json!(project);
            status["sha"] = json!(p["sha"]);
            // One status per name and sha: a new state replaces the old.
            let name = body["name"].clone();
            st.statuses.retain(|s| !(s["project"] == project && s["sha"] == p["sha"] && s["name"] == name));
            st.statuses.push(status);
            answer(StatusCode::CREATED, json!({ "id": id, "status": body["state"], "name": name, "sha": p["sha"] }))
        }
        ("GET", "projects/:id/pipelines/:pipeline_id/jobs") => {
            let scopes: Vec<&str> =
                query.iter().filter(|(k, _)| k == "scope" || k == "scope[]").map(|(_, v)| v.as_str()).collect();
            let jobs = st.jobs.get(&(project, int("pipeline_id"))).cloned().unwrap_or_default();
            let list = jobs
                .into_iter()
                .filter(|j| scopes.is_empty() || j["status"].as_str().is_some_and(|s| scopes.contains(&s)))
                .collect();
            paged(list, query)
        }
        ("GET", "projects/:id/jobs/:job_id/trace") => match st.traces.get(&(project, int("job_id"))) {
            Some(log) => (StatusCode::OK, [("content-type", "text/plain")], log.clone()).into_response(),
            None => not_found("Job"),
        },
        ("GET", "projects/:id/hooks/:hook_id/events") => {
            paged(st.hook_events.get(&(project, int("hook_id"))).cloned().unwrap_or_default(), query)
        }
        ("POST", "projects/:id/hooks/:hook_id/events/:hook_event_id/resend") => {
            let (hook, event) = (int("hook_id"), int("hook_event_id"));
            let known = st
                .hook_events
                .get(&(project.clone(), hook))
                .is_some_and(|events| events.iter().any(|e| e["id"] == event));
            if !known {
                return not_found("Hook event");
            }
            st.resent.push((project, hook, event));
            answer(StatusCode::CREATED, json!({ "response_status": 200 }))
        }
        _ => not_found(""),
    }
}
