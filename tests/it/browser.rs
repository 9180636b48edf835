//! The dashboard in real headless Chromium, driven over WebDriver (the W3C
//! protocol spoken by chromedriver, as plain JSON over HTTP): the jobs list
//! shows a job made by a real delivery, and its page shows the live log
//! growing. Screenshots go to `target/tmp/` (`CARGO_TARGET_TMPDIR`).
//!
//! `.ci/run` installs Debian's `chromium` and `chromium-driver`; elsewhere the
//! test installs them itself when it runs as root with apt.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::harness::{fixture, Baton, Workdir, WAIT};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "browser-secret";

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ensure_chromium() {
    let have = |bin: &str| {
        Command::new("sh").arg("-c").arg(format!("command -v {bin}")).output().is_ok_and(|o| o.status.success())
    };
    if have("chromedriver") && have("chromium") {
        return;
    }
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root && have("apt-get"), "install Debian's chromium and chromium-driver to run the dashboard test");
    for args in [&["update", "-qq"][..], &["install", "-y", "-qq", "chromium", "chromium-driver"][..]] {
        let ok = Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status();
        assert!(ok.is_ok_and(|s| s.success()), "apt-get {args:?} failed");
    }
}

impl Driver {
    async fn start() -> Driver {
        ensure_chromium();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let start = Instant::now();
        while http.get(format!("{url}/status")).send().await.is_err() {
            assert!(start.elapsed() < WAIT, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        // Flags as this machine needs them: no sandbox as root, and nothing
        // that phones out (the network is closed).
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let answer: Value = http.post(format!("{url}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let session =
            answer["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {answer}")).to_string();
        Driver { child, url, http, session, _profile: profile }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.url, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let answer: Value = req.send().await.unwrap().json().await.unwrap();
        answer["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    /// The text of the first element matching `css`, or "" when none does.
    async fn text(&self, css: &str) -> String {
        let found =
            self.call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        let Some(id) = found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str) else {
            return String::new();
        };
        self.call(reqwest::Method::GET, &format!("/element/{id}/text"), None).await.as_str().unwrap_or("").to_string()
    }

    async fn click(&self, css: &str) {
        let found =
            self.call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css }))).await;
        let id = found.as_object().and_then(|o| o.values().next()).and_then(Value::as_str).expect("element to click");
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await;
    }

    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let shot = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot.as_str().unwrap_or("")).expect("PNG");
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, png).unwrap();
        path
    }

    async fn wait_for_text(&self, css: &str, what: &str) -> String {
        let start = Instant::now();
        loop {
            let text = self.text(css).await;
            if text.contains(what) {
                return text;
            }
            assert!(start.elapsed() < WAIT, "`{what}` never appeared in {css}: {text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A daemon whose `investigate` trigger runs `agent` on opened issues; the
/// agent may use the workdir's shared folder (for its gate file).
fn start(w: &Workdir, agent: &std::path::Path) -> Baton {
    Scenario::new()
        .github(GitHub::secret(SECRET))
        .agent("script", Agent::script(agent).read_write(&[w.shared()]))
        .trigger(
            "investigate",
            Trigger::on(&["issues.opened"])
                .agent("script")
                .workspace("none")
                .prompt("Investigate #{{ issue.number }}")
                .output("none"),
        )
        .write(w);
    Baton::start(w.path(), &[])
}

#[tokio::test]
async fn the_dashboard_lists_a_delivered_job_and_follows_its_log_live() {
    let w = Workdir::new();
    let gate = w.shared().join("finish");
    let agent = w.script(
        "agent.sh",
        &format!(
            "#!/bin/sh\nfor i in 1 2 3; do echo \"step $i of the investigation\"; sleep 0.3; done\n\
             while [ ! -f {} ]; do sleep 0.1; done\necho 'step 4: done'\necho 'The README has a typo on line 3.'\n",
            gate.display()
        ),
    );
    let baton = start(&w, &agent);
    let (status, body) = baton.deliver(SECRET, "issues", "browser-1", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["jobs"][0].as_str().unwrap().to_string();

    let driver = Driver::start().await;
    driver.go(&format!("{}/", baton.url)).await;
    let table = driver.wait_for_text("table", &id).await;
    assert!(table.contains("investigate") && table.contains("Codertocat/Hello-World"), "{table}");
    let jobs_png = driver.screenshot("dashboard-jobs.png").await;

    driver.go(&format!("{}/jobs/{id}", baton.url)).await;
    let early = driver.wait_for_text("#log", "step 1 of the investigation").await;
    assert!(!early.contains("step 4"), "{early}");
    assert_eq!(baton.job(&id).await["state"], "running");
    driver.wait_for_text("#log", "step 3 of the investigation").await;
    std::fs::write(&gate, "").unwrap();
    let grown = driver.wait_for_text("#log", "step 4: done").await;
    assert!(grown.len() > early.len(), "the log grew in place");
    // At the end the page reloads with the result.
    driver.wait_for_text("body", "The README has a typo on line 3.").await;
    let job_png = driver.screenshot("dashboard-job.png").await;
    assert!(
        std::fs::metadata(&jobs_png).unwrap().len() > 10_000 && std::fs::metadata(&job_png).unwrap().len() > 10_000
    );
}

/// The job page's own Cancel and Retry buttons work in a browser: they are
/// same-origin requests, which the cross-site guard lets through.
#[tokio::test]
async fn the_job_pages_cancel_and_retry_buttons_work() {
    let w = Workdir::new();
    let gate = w.shared().join("finish");
    let agent = w.script(
        "agent.sh",
        &format!("#!/bin/sh\necho started\nwhile [ ! -f {} ]; do sleep 0.1; done\necho finished\n", gate.display()),
    );
    let baton = start(&w, &agent);
    let (status, body) =
        baton.deliver(SECRET, "issues", "browser-buttons", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["jobs"][0].as_str().unwrap().to_string();
    let driver = Driver::start().await;
    driver.go(&format!("{}/jobs/{id}", baton.url)).await;
    driver.wait_for_text("#log", "started").await;
    driver.click("#cancel").await;
    driver.wait_for_text("#state", "cancelled").await;
    assert_eq!(baton.job(&id).await["state"], "cancelled");
    std::fs::write(&gate, "").unwrap();
    driver.click("#retry").await;
    driver.wait_for_text("body", "finished").await;
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    assert_eq!(driver.text("#action-error").await, "", "no button was refused");
}
