//! Starting and driving a real `baton serve` process in a scratch folder.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_baton");

/// Everything a test waits for is bounded by this.
pub const WAIT: Duration = Duration::from_secs(60);

/// The database the tests of this binary run on: `BATON_TEST_BACKEND`
/// (`redb`, `sled` or `postgres`), else the binary's own default
/// (`tests/it` runs on redb, the default; `tests/sled` and `tests/pg` run
/// the storage tests again on the others).
pub fn backend() -> String {
    std::env::var("BATON_TEST_BACKEND").unwrap_or_else(|_| crate::DEFAULT_BACKEND.to_string())
}

pub fn postgres() -> bool {
    backend() == "postgres"
}

/// The test database: `BATON_TEST_DATABASE_URL`, or the project machine's.
pub fn database_url() -> String {
    std::env::var("BATON_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Each test's own schema, named after its folder: tests run in parallel on
/// one database without seeing each other, and a reopened store (or a
/// restarted daemon) finds its tables again.
pub fn schema_for(dir: &Path) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(dir.to_string_lossy().as_bytes());
    format!("t_{}", hex::encode(&hash[..8]))
}

/// `toml` with its `[storage]` pointed at the test backend: sled, or this
/// test's PostgreSQL schema, named after `dir` (redb is the default).
pub fn with_backend(toml: &str, dir: &Path) -> String {
    let ours = match backend().as_str() {
        "postgres" => vec![
            "backend = \"postgres\"".to_string(),
            format!("url = \"{}\"", database_url()),
            format!("schema = \"{}\"", schema_for(dir)),
        ],
        "sled" => vec!["backend = \"sled\"".to_string()],
        _ => return toml.to_string(),
    };
    // A config read back and written again loses what was put in before.
    let toml: String = toml
        .lines()
        .filter(|l| !ours.iter().any(|o| l.trim_start_matches("storage.") == o))
        .map(|l| format!("{l}\n"))
        .collect();
    match toml.find("[storage]\n") {
        Some(at) => {
            let at = at + "[storage]\n".len();
            let keys: String = ours.iter().map(|k| format!("{k}\n")).collect();
            format!("{}{keys}{}", &toml[..at], &toml[at..])
        }
        // Dotted keys at the top: whatever the test appends later stays
        // in the table it meant.
        None => {
            let keys: String = ours.iter().map(|k| format!("storage.{k}\n")).collect();
            format!("{keys}{toml}")
        }
    }
}

/// Drops a test's schema (best effort: a leftover only takes space).
pub fn drop_schema(dir: &Path) {
    if postgres() {
        let _ = Command::new("psql")
            .args([&database_url(), "-q", "-c", &format!("DROP SCHEMA IF EXISTS {} CASCADE", schema_for(dir))])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub fn fixture(rel: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/github").join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

pub fn fixture_json(rel: &str) -> Value {
    serde_json::from_slice(&fixture(rel)).expect("fixture is JSON")
}

/// A folder a test shares with its agents through `read_write`: open to
/// everyone, since agents run as another uid (`nobody` under a root daemon).
pub fn open_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    dir
}

/// A scratch folder holding `baton.toml` and `triggers/`.
pub struct Workdir {
    pub dir: tempfile::TempDir,
    /// Outside the config folder (which the sandbox hides): files a test
    /// shares with its agents, given to them with `read_write`.
    shared: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Workdir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("triggers")).expect("triggers dir");
        // Agents run as another uid (`nobody` under a root daemon): the
        // folder a test shares with them is open to everyone.
        Workdir { dir, shared: open_dir() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A folder the test and its agents share (an agent's `read_write`).
    pub fn shared(&self) -> &Path {
        self.shared.path()
    }

    pub fn config(&self, toml: &str) -> &Self {
        std::fs::write(self.path().join("baton.toml"), with_backend(toml, self.path())).expect("write config");
        self
    }

    pub fn trigger(&self, name: &str, toml: &str) -> &Self {
        std::fs::write(self.path().join("triggers").join(format!("{name}.toml")), toml).expect("write trigger");
        self
    }

    /// An executable script in the folder; returns its path.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path().join(name);
        std::fs::write(&path, body).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        drop_schema(self.path());
    }
}

/// A running daemon.
pub struct Baton {
    child: Child,
    pub url: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    http: reqwest::Client,
    /// Sent as a bearer token with every API call (`server.api_token`).
    token: Option<String>,
}

impl Baton {
    /// Starts `baton serve` in `dir` (its `baton.toml` must listen on
    /// 127.0.0.1:0) and waits until it serves.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Baton {
        Baton::start_under(dir, env, &[])
    }

    /// `start`, run by `wrapper` (a command that runs the one after it,
    /// such as `strace -o FILE`).
    pub fn start_under(dir: &Path, env: &[(&str, &str)], wrapper: &[&str]) -> Baton {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["--log-format", "json", "serve"])
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env_remove("GITHUB_TOKEN")
            .env_remove("GITHUB_WEBHOOK_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn baton");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["message"] == "baton is serving." {
                        let _ = tx.send(v["listen"].as_str().unwrap_or_default().to_string());
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(WAIT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("baton did not start; log:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        Baton {
            child,
            url: format!("http://{addr}"),
            logs,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            token: None,
        }
    }

    /// This daemon's API calls carry `token` from now on.
    pub fn with_token(mut self, token: &str) -> Baton {
        self.token = Some(token.to_string());
        self
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// The typed API client, with this daemon's token (if any).
    pub fn client(&self) -> baton::api::client::Client {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let token = self.token.as_deref().map(baton::config::Secret::new);
        baton::api::client::Client::with_http(&self.url, token, http)
    }

    /// POSTs `body` as JSON with `headers`.
    pub async fn post_json(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
        let mut req = self.request(reqwest::Method::POST, path).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("POST");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the daemon to exit by itself; its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("baton did not exit; log:\n{}", self.log_text());
    }

    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a delivery signed with `secret`; returns status and JSON body.
    ///
    /// Tests reuse fixtures under many delivery ids, where GitHub never
    /// sends one body twice: a JSON object body gets a field naming the
    /// delivery, so it is not taken for a replay. `post_webhook` sends bytes
    /// as they are.
    pub async fn deliver(&self, secret: &str, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
        let unique = unique_body(body, delivery);
        let body = unique.as_slice();
        let sig = baton::forge::signature::sign(secret.as_bytes(), body);
        self.post_webhook(
            &[("x-github-event", event), ("x-github-delivery", delivery), ("x-hub-signature-256", &sig)],
            body,
        )
        .await
    }

    pub async fn post_webhook(&self, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
        self.post_webhook_to("/webhooks/github", headers, body).await
    }

    /// `body` as it is, with `headers`, to the webhook route `path`.
    pub async fn post_webhook_to(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.url)).body(body.to_vec());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("webhook request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.request(reqwest::Method::GET, path).send().await.expect("GET");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn post(&self, path: &str) -> (u16, Value) {
        let resp = self.request(reqwest::Method::POST, path).send().await.expect("POST");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn job(&self, id: &str) -> Value {
        let (status, job) = self.get(&format!("/api/jobs/{id}")).await;
        assert_eq!(status, 200, "GET job {id}: {job}");
        job
    }

    /// Waits until the job reaches a final state; returns it.
    pub async fn finished(&self, id: &str) -> Value {
        let start = Instant::now();
        loop {
            let job = self.job(id).await;
            if matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return job;
            }
            assert!(start.elapsed() < WAIT, "job {id} did not finish: {job}\nlog:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JSON object `body` with a field naming `delivery`, so each delivery of
/// a reused fixture is a body of its own (as GitHub's always are) rather
/// than a replay; any other body as it is.
pub fn unique_body(body: &[u8], delivery: &str) -> Vec<u8> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut map)) => {
            map.insert("baton_test_delivery".into(), Value::String(delivery.to_string()));
            serde_json::to_vec(&map).unwrap_or_else(|_| body.to_vec())
        }
        _ => body.to_vec(),
    }
}

/// Waits for `cond` to hold, polling; panics with `what` after `WAIT`.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut cond: F) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Like [`eventually`], saying what `context` shows when time runs out.
#[allow(dead_code)] // tests/pg shares this file and does not use it
pub async fn eventually_or<F: FnMut() -> bool, C: Fn() -> String>(what: &str, mut cond: F, context: C) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}:\n{}", context());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs git, panicking with its output on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=master"])
        .args(args)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare repository at `{root}/{owner}/{name}.git` whose `branch` has one
/// commit with `files`; returns the commit's sha.
pub fn bare_repo(root: &Path, full_name: &str, branch: &str, files: &[(&str, &str)]) -> String {
    let bare = root.join(format!("{full_name}.git"));
    std::fs::create_dir_all(&bare).unwrap();
    git(&bare, &["init", "--bare", "--quiet"]);
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "--quiet", "-b", branch]);
    for (name, content) in files {
        let path = work.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    git(work.path(), &["add", "."]);
    git(work.path(), &["commit", "--quiet", "-m", "initial"]);
    let sha = git(work.path(), &["rev-parse", "HEAD"]);
    git(work.path(), &["push", "--quiet", bare.to_str().unwrap(), &format!("HEAD:refs/heads/{branch}")]);
    sha
}

/// Whether `pid` is a live process (a zombie waiting to be reaped is dead).
pub fn process_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Like `eventually`, for conditions that need to await.
pub async fn eventually_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `sleep` argument no other process has: 300 seconds and a unique
/// fraction, so a test can find the process from outside the sandbox's PID
/// namespace (see `processes_with_arg`).
pub fn unique_sleep() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("300.{:05}{:04}", std::process::id() % 100_000, n)
}

/// Live processes one of whose arguments is exactly `arg`.
pub fn processes_with_arg(arg: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) && process_running(pid) {
            out.push(pid);
        }
    }
    out
}

/// Opens the store in `path` on the test backend: redb or sled there, or
/// the PostgreSQL schema named after `path`. A store just dropped lets go
/// of its file lock a moment after the last handle goes (bounded wait).
pub async fn open_store(path: &std::path::Path) -> baton::store::Store {
    let start = std::time::Instant::now();
    loop {
        let (path_buf, durability) = (path.to_path_buf(), baton::store::Durability::Fsync);
        let location = match backend().as_str() {
            "postgres" => baton::store::Location::Postgres {
                url: database_url(),
                schema: Some(schema_for(path)),
                replica: "test".into(),
            },
            "sled" => baton::store::Location::Sled { path: path_buf, durability },
            _ => baton::store::Location::Redb { path: path_buf, durability },
        };
        let opened = baton::store::Store::connect(&location, path).await;
        match opened {
            Ok(store) => return store,
            Err(e) if start.elapsed() < WAIT && !postgres() => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("opening the store: {e}"),
        }
    }
}

/// `open_store`, for a store just dropped.
pub async fn reopen_store(path: &std::path::Path) -> baton::store::Store {
    open_store(path).await
}
