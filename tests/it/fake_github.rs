//! A fake GitHub REST API: records every request, keeps the comments,
//! reviews and check runs it is sent (so baton can list and edit them), and
//! can inject faults — a 502 on every Nth write (after applying it, as a
//! GitHub whose answer is lost), and rate-limit 403s on the first writes.
//! As a GitHub App host it checks RS256 JWTs against a public key from the
//! test and hands out an installation token that writes must then carry.
//! Everything baton posts is written by one login (`GET /user`, or the
//! App's bot `GET /app` names), and a test can plant comments by others.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    /// The status the fake answered.
    pub status: u16,
}

/// Faults to inject into writes (POST and PATCH outside `/app`).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every Nth write is applied and then answered 502.
    pub fail_every_nth_write: Option<usize>,
    /// The first N writes are answered 403 with `X-RateLimit-Remaining: 0`
    /// and a reset one second ahead, and not applied.
    pub rate_limited_writes: usize,
}

/// The App the fake plays host to.
#[derive(Debug, Clone)]
pub struct App {
    pub app_id: u64,
    pub public_pem: String,
    pub installation: u64,
    pub token: String,
}

#[derive(Debug, Clone)]
pub struct Comment {
    pub id: u64,
    /// `owner/name#number`, or `owner/name@sha` for commit comments.
    pub on: String,
    pub body: String,
    /// Who wrote it (`user.login` in listings).
    pub user: String,
}

/// The login a token writes as (`GET /user`).
pub const TOKEN_LOGIN: &str = "baton-test";
/// The App's slug (`GET /app`); its writes are by `baton-test-app[bot]`.
pub const APP_SLUG: &str = "baton-test-app";

#[derive(Default)]
struct State {
    next_id: u64,
    writes: usize,
    /// The next writes answered 502 without being applied.
    dropped_writes: usize,
    faults: Faults,
    app: Option<App>,
    comments: Vec<Comment>,
    reviews: Vec<Comment>,
    /// Each review as posted: its event and inline comments.
    review_posts: Vec<Value>,
    /// Replies in review threads; `on` is `owner/name#N/ROOT`.
    replies: Vec<Comment>,
    /// `owner/name#N` → the pull request's changed files (`filename`, `patch`).
    pr_files: std::collections::HashMap<String, Vec<Value>>,
    check_runs: Vec<Value>,
    hook_deliveries: Vec<Value>,
    /// Where `/git/owner/name.git` is served from (`git http-backend`).
    git_root: Option<std::path::PathBuf>,
    /// Repositories whose pushes are refused as GitHub refuses a push to a
    /// fork whose author does not let maintainers edit.
    push_refused: Vec<String>,
}

#[derive(Clone, Default)]
pub struct FakeGitHub {
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    state: Arc<Mutex<State>>,
    pub url: String,
}

impl FakeGitHub {
    pub async fn start() -> FakeGitHub {
        FakeGitHub::start_with(Faults::default(), None).await
    }

    pub async fn start_with(faults: Faults, app: Option<App>) -> FakeGitHub {
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let state = Arc::new(Mutex::new(State { faults, app, next_id: 1000, ..State::default() }));
        let (sink, st) = (requests.clone(), state.clone());
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let (sink, st) = (sink.clone(), st.clone());
            async move {
                if let Some(repo_path) = uri.path().strip_prefix("/git/") {
                    let (root, refused) = {
                        let st = st.lock().unwrap();
                        (st.git_root.clone(), st.push_refused.clone())
                    };
                    let response = serve_git(root, &refused, &method, repo_path, uri.query(), &headers, body).await;
                    let (path, status) = (uri.path().to_string(), response.status().as_u16());
                    sink.lock().unwrap().push(Recorded {
                        method: method.to_string(),
                        path,
                        headers,
                        body: Value::Null,
                        status,
                    });
                    return response;
                }
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let path = uri.path().to_string();
                let query = uri.query().unwrap_or("").to_string();
                let response = handle(&mut st.lock().unwrap(), &method, &path, &query, &headers, &body);
                sink.lock().unwrap().push(Recorded {
                    method: method.to_string(),
                    path,
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
        FakeGitHub { requests, state, url }
    }

    /// Serves the bare repositories under `root` over git's smart HTTP at
    /// `{url}/git/owner/name.git` (the `github.git_url` to give baton).
    pub fn serve_git(&self, root: &std::path::Path) {
        self.state.lock().unwrap().git_root = Some(root.to_path_buf());
    }

    /// Refuses pushes to `owner/name` the way GitHub does when a fork's
    /// author does not allow edits from maintainers: 403, "Permission to …
    /// denied to …".
    pub fn refuse_pushes(&self, repo: &str) {
        self.state.lock().unwrap().push_refused.push(repo.to_string());
    }

    pub fn posts(&self, path: &str) -> Vec<Recorded> {
        self.requests.lock().unwrap().iter().filter(|r| r.method == "POST" && r.path == path).cloned().collect()
    }

    pub fn requests_to(&self, method: &str, path_prefix: &str) -> Vec<Recorded> {
        let list = self.requests.lock().unwrap();
        list.iter().filter(|r| r.method == method && r.path.starts_with(path_prefix)).cloned().collect()
    }

    /// The comments on `owner/name#number` as they stand now.
    pub fn comments(&self, on: &str) -> Vec<Comment> {
        self.state.lock().unwrap().comments.iter().filter(|c| c.on == on).cloned().collect()
    }

    /// Adds `n` comments by others on `owner/name#number` (a busy issue).
    pub fn add_comments(&self, on: &str, n: usize) {
        for _ in 0..n {
            let id = self.state.lock().unwrap().next_id + 1;
            self.add_comment_by(on, "someone-else", &format!("a comment by someone else ({id})"));
        }
    }

    /// Adds a comment by `login` on `owner/name#number`; returns its id.
    pub fn add_comment_by(&self, on: &str, login: &str, body: &str) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.next_id += 1;
        let id = st.next_id;
        st.comments.push(Comment { id, on: on.to_string(), body: body.to_string(), user: login.to_string() });
        id
    }

    /// The next `n` writes are answered 502 and not applied: a gateway
    /// failed before GitHub did anything, and baton cannot tell.
    // tests/pg shares this fake but not the tests that drop writes.
    #[allow(dead_code)]
    pub fn drop_writes(&self, n: usize) {
        self.state.lock().unwrap().dropped_writes = n;
    }

    /// Sets a pull request's changed files, as `GET …/pulls/N/files` lists them.
    pub fn set_pr_files(&self, on: &str, files: Vec<Value>) {
        self.state.lock().unwrap().pr_files.insert(on.to_string(), files);
    }

    /// The reviews accepted, as posted (`event`, `body`, `comments`).
    pub fn review_posts(&self) -> Vec<Value> {
        self.state.lock().unwrap().review_posts.clone()
    }

    /// Replies in the review thread that starts at comment `root` of `on`.
    pub fn replies(&self, on: &str, root: u64) -> Vec<Comment> {
        let on = format!("{on}/{root}");
        self.state.lock().unwrap().replies.iter().filter(|c| c.on == on).cloned().collect()
    }

    pub fn reviews(&self, on: &str) -> Vec<Comment> {
        self.state.lock().unwrap().reviews.iter().filter(|c| c.on == on).cloned().collect()
    }

    /// Adds a check run as another App might make it (`id` is set here).
    // tests/pg shares this fake but not the tests that plant runs.
    #[allow(dead_code)]
    pub fn add_check_run(&self, mut run: Value) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.next_id += 1;
        run["id"] = json!(st.next_id);
        st.check_runs.push(run);
        st.next_id
    }

    pub fn check_runs(&self) -> Vec<Value> {
        self.state.lock().unwrap().check_runs.clone()
    }

    /// What `GET /app/hook/deliveries` lists.
    pub fn set_hook_deliveries(&self, list: Vec<Value>) {
        self.state.lock().unwrap().hook_deliveries = list;
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn not_found() -> Response {
    answer(StatusCode::NOT_FOUND, json!({ "message": "Not Found" }))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (_, token) = value.split_once(' ')?;
    Some(token.trim().to_string())
}

/// Whether the request carries a JWT signed by the App's key, issued by it.
fn valid_jwt(app: &App, headers: &HeaderMap) -> bool {
    let Some(token) = bearer(headers) else { return false };
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(app.public_pem.as_bytes()) else { return false };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    // GitHub's `iss` is the App id as a number, which jsonwebtoken's own
    // issuer check does not read: it is compared below.
    validation.set_required_spec_claims(&["exp", "iat"]);
    match jsonwebtoken::decode::<Value>(&token, &key, &validation) {
        Ok(data) => data.claims["iss"].as_u64() == Some(app.app_id),
        Err(e) => {
            eprintln!("fake GitHub: JWT rejected: {e:?}");
            false
        }
    }
}

fn handle(st: &mut State, method: &Method, path: &str, query: &str, headers: &HeaderMap, body: &Value) -> Response {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let is_app_route = parts.first() == Some(&"app") || (parts.len() == 4 && parts[3] == "installation");
    if let Some(app) = st.app.clone() {
        if is_app_route {
            if !valid_jwt(&app, headers) {
                return answer(StatusCode::UNAUTHORIZED, json!({ "message": "A JSON web token could not be decoded" }));
            }
        } else if bearer(headers).as_deref() != Some(app.token.as_str()) {
            return answer(StatusCode::UNAUTHORIZED, json!({ "message": "Bad credentials" }));
        }
    }
    let write = (*method == Method::POST || *method == Method::PATCH) && !is_app_route;
    let mut lost_answer = false;
    if write {
        st.writes += 1;
        if st.writes <= st.faults.rate_limited_writes {
            let reset = chrono::Utc::now().timestamp() + 1;
            return (
                StatusCode::FORBIDDEN,
                [("x-ratelimit-remaining", "0".to_string()), ("x-ratelimit-reset", reset.to_string())],
                axum::Json(json!({ "message": "API rate limit exceeded" })),
            )
                .into_response();
        }
        lost_answer = st.faults.fail_every_nth_write.is_some_and(|n| st.writes.is_multiple_of(n));
        if st.dropped_writes > 0 {
            st.dropped_writes -= 1;
            return answer(StatusCode::BAD_GATEWAY, json!({ "message": "Server Error" }));
        }
    }
    let mut response = route(st, method, &parts, query, body);
    if lost_answer {
        return answer(StatusCode::BAD_GATEWAY, json!({ "message": "Server Error" }));
    }
    // GitHub counts down its rate limit on every answer.
    let left = 5000usize.saturating_sub(st.writes);
    if let Ok(v) = left.to_string().parse() {
        response.headers_mut().insert("x-ratelimit-remaining", v);
    }
    response
}

/// A listed comment, as GitHub lists it.
fn listed(c: &Comment) -> Value {
    json!({ "id": c.id, "body": c.body, "user": { "login": c.user }, "html_url": format!("https://github.example/c/{}", c.id) })
}

fn route(st: &mut State, method: &Method, parts: &[&str], query: &str, body: &Value) -> Response {
    st.next_id += 1;
    let id = st.next_id;
    let text = body["body"].as_str().unwrap_or_default().to_string();
    // Whoever holds the token or the App's installation token writes as baton.
    let user = match &st.app {
        Some(_) => format!("{APP_SLUG}[bot]"),
        None => TOKEN_LOGIN.to_string(),
    };
    match (method.as_str(), parts) {
        ("GET", ["user"]) => match &st.app {
            // As GitHub: an installation token is no user.
            Some(_) => answer(StatusCode::FORBIDDEN, json!({ "message": "Resource not accessible by integration" })),
            None => answer(StatusCode::OK, json!({ "login": TOKEN_LOGIN, "type": "User" })),
        },
        ("GET", ["app"]) => match &st.app {
            Some(app) => answer(StatusCode::OK, json!({ "id": app.app_id, "slug": APP_SLUG })),
            None => not_found(),
        },
        ("POST", ["app", "installations", inst, "access_tokens"]) => match &st.app {
            Some(app) if inst.parse::<u64>().ok() == Some(app.installation) => answer(
                StatusCode::CREATED,
                json!({ "token": app.token, "expires_at": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339() }),
            ),
            _ => not_found(),
        },
        ("GET", ["repos", _, _, "installation"]) => match &st.app {
            Some(app) => answer(StatusCode::OK, json!({ "id": app.installation })),
            None => not_found(),
        },
        ("GET", ["app", "hook", "deliveries"]) => answer(StatusCode::OK, Value::Array(st.hook_deliveries.clone())),
        ("POST", ["app", "hook", "deliveries", _, "attempts"]) => answer(StatusCode::ACCEPTED, json!({})),
        ("POST", ["repos", o, r, "issues", n, "comments"]) => {
            let c = Comment { id, on: format!("{o}/{r}#{n}"), body: text, user };
            st.comments.push(c);
            answer(
                StatusCode::CREATED,
                json!({ "id": id, "html_url": format!("https://github.example/{o}/{r}/issues/{n}#issuecomment-{id}") }),
            )
        }
        ("GET", ["repos", o, r, "issues", n, "comments"]) => {
            // Oldest first, a page at a time, as GitHub lists them.
            let param = |name: &str, default: usize| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                    .unwrap_or(default)
            };
            let (per_page, page) = (param("per_page", 30).clamp(1, 100), param("page", 1).max(1));
            let on = format!("{o}/{r}#{n}");
            let list: Vec<Value> = st
                .comments
                .iter()
                .filter(|c| c.on == on)
                .skip((page - 1) * per_page)
                .take(per_page)
                .map(listed)
                .collect();
            answer(StatusCode::OK, Value::Array(list))
        }
        ("PATCH", ["repos", _, _, "issues", "comments", cid]) => {
            let cid: u64 = cid.parse().unwrap_or(0);
            match st.comments.iter_mut().find(|c| c.id == cid) {
                Some(c) => {
                    c.body = text;
                    answer(StatusCode::OK, json!({ "id": cid, "html_url": format!("https://github.example/c/{cid}") }))
                }
                None => not_found(),
            }
        }
        ("POST", ["repos", _, _, "issues", .., "reactions"]) => {
            answer(StatusCode::CREATED, json!({ "id": id, "content": body["content"] }))
        }
        ("POST", ["repos", o, r, "pulls", n, "reviews"]) => {
            let on = format!("{o}/{r}#{n}");
            // As GitHub: an inline comment must be on a line of the diff, and
            // a suggestion block must be closed.
            let files = st.pr_files.get(&on).cloned().unwrap_or_default();
            for c in body["comments"].as_array().into_iter().flatten() {
                let (path, side) = (c["path"].as_str().unwrap_or(""), c["side"].as_str().unwrap_or("RIGHT"));
                let patch = files.iter().find(|f| f["filename"] == path).and_then(|f| f["patch"].as_str());
                let shown = patch.map(|p| diff_lines(p, side == "LEFT")).unwrap_or_default();
                let lines = [c["line"].as_u64(), c["start_line"].as_u64()];
                if lines.iter().flatten().any(|l| !shown.contains(l)) {
                    return answer(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({ "message": "Unprocessable Entity", "errors": ["Line could not be resolved"] }),
                    );
                }
                let text = c["body"].as_str().unwrap_or("");
                if text.contains("suggestion\n") && !suggestion_closed(text) {
                    return answer(StatusCode::UNPROCESSABLE_ENTITY, json!({ "message": "unclosed suggestion block" }));
                }
            }
            st.review_posts.push(body.clone());
            st.reviews.push(Comment { id, on, body: text, user });
            answer(StatusCode::OK, json!({ "id": id, "html_url": format!("https://github.example/review/{id}") }))
        }
        ("POST", ["repos", o, r, "pulls", n, "comments", root, "replies"]) => {
            st.replies.push(Comment { id, on: format!("{o}/{r}#{n}/{root}"), body: text, user });
            answer(StatusCode::CREATED, json!({ "id": id, "html_url": format!("https://github.example/reply/{id}") }))
        }
        ("GET", ["repos", o, r, "pulls", n, "comments"]) => {
            let on = format!("{o}/{r}#{n}/");
            let list: Vec<Value> = st.replies.iter().filter(|c| c.on.starts_with(&on)).map(listed).collect();
            answer(StatusCode::OK, Value::Array(list))
        }
        ("GET", ["repos", o, r, "pulls", n, "files"]) => {
            let files = st.pr_files.get(&format!("{o}/{r}#{n}")).cloned().unwrap_or_default();
            answer(StatusCode::OK, Value::Array(files))
        }
        ("GET", ["repos", o, r, "pulls", n, "reviews"]) => {
            let on = format!("{o}/{r}#{n}");
            let list: Vec<Value> = st.reviews.iter().filter(|c| c.on == on).map(listed).collect();
            answer(StatusCode::OK, Value::Array(list))
        }
        ("POST", ["repos", o, r, "commits", sha, "comments"]) => {
            st.comments.push(Comment { id, on: format!("{o}/{r}@{sha}"), body: text, user });
            answer(
                StatusCode::CREATED,
                json!({ "id": id, "html_url": format!("https://github.example/commit-comment/{id}") }),
            )
        }
        ("GET", ["repos", o, r, "commits", sha, "comments"]) => {
            let on = format!("{o}/{r}@{sha}");
            let list: Vec<Value> = st.comments.iter().filter(|c| c.on == on).map(listed).collect();
            answer(StatusCode::OK, Value::Array(list))
        }
        ("POST", ["repos", o, r, "check-runs"]) => {
            let mut run = body.clone();
            run["id"] = json!(id);
            run["repo"] = json!(format!("{o}/{r}"));
            if let Some(app) = &st.app {
                run["app"] = json!({ "id": app.app_id, "slug": APP_SLUG });
            }
            st.check_runs.push(run);
            answer(StatusCode::CREATED, json!({ "id": id, "html_url": format!("https://github.example/runs/{id}") }))
        }
        ("PATCH", ["repos", _, _, "check-runs", rid]) => {
            let rid: u64 = rid.parse().unwrap_or(0);
            match st.check_runs.iter_mut().find(|c| c["id"] == rid) {
                Some(run) => {
                    for (k, v) in body.as_object().into_iter().flatten() {
                        run[k] = v.clone();
                    }
                    answer(
                        StatusCode::OK,
                        json!({ "id": rid, "html_url": format!("https://github.example/runs/{rid}") }),
                    )
                }
                None => not_found(),
            }
        }
        ("GET", ["repos", o, r, "commits", sha, "check-runs"]) => {
            let name = query.split('&').find_map(|kv| kv.strip_prefix("check_name=")).unwrap_or("").replace("%2F", "/");
            let repo = format!("{o}/{r}");
            let runs: Vec<Value> = st
                .check_runs
                .iter()
                .filter(|c| c["repo"] == repo && c["head_sha"] == *sha && (name.is_empty() || c["name"] == name))
                .cloned()
                .collect();
            answer(StatusCode::OK, json!({ "total_count": runs.len(), "check_runs": runs }))
        }
        ("POST", _) => {
            answer(StatusCode::CREATED, json!({ "id": id, "html_url": format!("https://github.example/comment/{id}") }))
        }
        ("GET", _) => answer(StatusCode::OK, json!({})),
        _ => not_found(),
    }
}

/// The new-file (or, `left`, old-file) line numbers a unified diff shows.
fn diff_lines(patch: &str, left: bool) -> Vec<u64> {
    let mut out = Vec::new();
    let (mut old, mut new) = (0, 0);
    for line in patch.split('\n') {
        if line.starts_with("@@") {
            let nums: Vec<u64> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            // @@ -a[,b] +c[,d] @@: the first number is old's start; new's is
            // the first after the '+'.
            old = nums.first().copied().unwrap_or(0);
            let plus = line.find('+').unwrap_or(0);
            new = line[plus..]
                .split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            continue;
        }
        let (shows_old, shows_new) = match line.as_bytes().first() {
            Some(b'+') => (false, true),
            Some(b'-') => (true, false),
            Some(b'\\') => continue,
            _ => (true, true),
        };
        if shows_old {
            if left {
                out.push(old);
            }
            old += 1;
        }
        if shows_new {
            if !left {
                out.push(new);
            }
            new += 1;
        }
    }
    out
}

/// Whether every ```` ```suggestion ```` fence in `text` is closed by a
/// fence of the same length.
fn suggestion_closed(text: &str) -> bool {
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(fence) = line.strip_suffix("suggestion").filter(|f| !f.is_empty() && f.chars().all(|c| c == '`')) {
            if !lines.by_ref().any(|l| l == fence) {
                return false;
            }
        }
    }
    true
}

/// One smart-HTTP request, answered by `git http-backend` (a CGI) from
/// `root`; a push to a repository in `refused` is answered 403 first.
async fn serve_git(
    root: Option<std::path::PathBuf>,
    refused: &[String],
    method: &Method,
    repo_path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let Some(root) = root else { return (StatusCode::NOT_FOUND, "no git served").into_response() };
    let repo = repo_path.split(".git/").next().unwrap_or_default();
    let pushing =
        query.is_some_and(|q| q.contains("service=git-receive-pack")) || repo_path.ends_with("/git-receive-pack");
    if pushing && refused.iter().any(|r| r == repo) {
        let who = if headers.contains_key("authorization") { TOKEN_LOGIN } else { "anonymous" };
        return (StatusCode::FORBIDDEN, format!("Permission to {repo}.git denied to {who}.\n")).into_response();
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{repo_path}"))
        .env("QUERY_STRING", query.unwrap_or(""))
        .env("REQUEST_METHOD", method.as_str())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        // Pushes need someone to be; GitHub's token says who.
        .env("REMOTE_USER", TOKEN_LOGIN)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    let writing = tokio::spawn(async move {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stdin, &body).await;
    });
    let out = child.wait_with_output().await.expect("git http-backend output");
    let _ = writing.await;
    // CGI: headers, a blank line, the body.
    let split = out.stdout.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    let split = split.or_else(|| out.stdout.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((end, gap)) = split else {
        return (StatusCode::INTERNAL_SERVER_ERROR, String::from_utf8_lossy(&out.stderr).into_owned()).into_response();
    };
    let mut response = Response::builder();
    let mut status = StatusCode::OK;
    for line in String::from_utf8_lossy(&out.stdout[..end]).lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value.split(' ').next().and_then(|c| c.parse().ok()).unwrap_or(StatusCode::OK);
        } else {
            response = response.header(name, value);
        }
    }
    response.status(status).body(axum::body::Body::from(out.stdout[end + gap..].to_vec())).unwrap()
}
