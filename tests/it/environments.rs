//! Environments (`[environments.NAME]`): a setup phase with its own
//! network and secrets, cached by lockfile, before an agent that has
//! neither. A loopback "registry" stands for the package registry; it
//! counts its hits and wants the setup's token.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::harness::{bare_repo, fixture, git, Baton, Workdir, BIN};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "environments-webhook-secret-0123456789";
const TOKEN: &str = "ghp_EnvironmentsTestToken0123456789abcdef";
/// The registry's token: only the setup may see it.
const REGISTRY_TOKEN: &str = "registry-token-Zq8v3LmN1xR5tY7wK2";

/// A model key the agent is given (`[agents.NAME] env`).
const MODEL_KEY: &str = "model-key-Hq2wE9rT4yU6iO8p";

/// A loopback registry: `GET /dep` answers `text` to a request carrying
/// the token, 401 to any other; every request counts.
async fn registry(text: &'static str) -> (u16, Arc<Mutex<usize>>) {
    let hits = Arc::new(Mutex::new(0usize));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let counter = counter.clone();
        async move {
            *counter.lock().unwrap() += 1;
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if auth == format!("Bearer {REGISTRY_TOKEN}") {
                (axum::http::StatusCode::OK, text)
            } else {
                (axum::http::StatusCode::UNAUTHORIZED, "no token")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, hits)
}

struct Scene {
    w: Workdir,
    origin: PathBuf,
}

impl Scene {
    /// A daemon whose `script` agent runs `agent`, with `environments`
    /// (TOML) and the `work` trigger (`issues.opened`, default branch).
    fn new(environments: &str, agent: &str, trigger: Trigger, files: &[(&str, &str)]) -> Scene {
        let w = Workdir::new();
        let script = w.script("agent.sh", agent);
        let repos = w.path().join("remote");
        bare_repo(&repos, "Codertocat/Hello-World", "master", files);
        Scenario::new()
            .github(GitHub::secret(SECRET).repos(&repos).token("env:GITHUB_TOKEN"))
            // A model API it may reach: the proxy is there, and refuses the rest.
            .agent("script", Agent::script(&script).set("timeout", "60s").set("network", vec!["api.example.com:443"]))
            .raw(environments)
            .trigger("work", trigger)
            .write(&w);
        let origin = repos.join("Codertocat/Hello-World.git");
        Scene { w, origin }
    }

    fn start(&self) -> Baton {
        Baton::start(
            self.w.path(),
            &[("GITHUB_TOKEN", TOKEN), ("REGISTRY_TOKEN", REGISTRY_TOKEN), ("MODEL_KEY", MODEL_KEY)],
        )
    }

    /// The job's log as it is on disk (the API's copy is redacted).
    fn raw_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.w.path().join(".baton/jobs").join(id).join("log")).unwrap_or_default()
    }

    /// Commits `files` on master in the origin.
    fn commit(&self, files: &[(&str, &str)]) {
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &["clone", "--quiet", self.origin.to_str().unwrap(), "."]);
        for (name, text) in files {
            let path = work.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        git(work.path(), &["add", "."]);
        git(work.path(), &["commit", "--quiet", "-m", "change"]);
        git(work.path(), &["push", "--quiet", "origin", "HEAD:master"]);
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(self.w.path().join("baton.toml"))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "baton {args:?}: {text}");
        text
    }
}

/// The `work` trigger: an issue opened, on the default branch.
fn work() -> Trigger {
    Trigger::on(&["issues.opened"]).agent("script").workspace("default-branch").prompt("work").output("none")
}

async fn open_issue(baton: &Baton, delivery: &str) -> String {
    let body = crate::harness::unique_body(&fixture("issues/opened.payload.json"), delivery);
    let (status, body) = baton.deliver(SECRET, "issues", delivery, &body).await;
    assert_eq!(status, 202, "{body}");
    body["jobs"][0].as_str().expect("a job").to_string()
}

/// The environment the registry tests use: `~/.deps` cached, keyed by
/// `deps.lock`; the setup fetches with the token.
fn deps_environment(port: u16, extra: &str) -> String {
    format!(
        r#"
[environments.deps]
setup = ["mkdir -p ~/.deps", "curl -sSf -m 10 -H \"Authorization: Bearer $REGISTRY_TOKEN\" http://127.0.0.1:{port}/dep -o ~/.deps/dep.txt", "echo fetched the dependency"]
setup_network = ["127.0.0.1:{port}"]
setup_env = {{ REGISTRY_TOKEN = "env:REGISTRY_TOKEN" }}
cache = ["~/.deps"]
cache_key = ["deps.lock"]
{extra}
"#
    )
}

#[tokio::test]
async fn the_setup_fills_the_cache_from_its_registry_and_the_agent_uses_it_offline() {
    let (port, hits) = registry("dependency-contents-v1").await;
    let agent = format!(
        r#"#!/bin/sh
echo "dep: $(cat ~/.deps/dep.txt)"
echo "registry: $(curl -sS -m 5 http://127.0.0.1:{port}/dep 2>&1 | head -c 200)"
echo "overwrote" > ~/.deps/dep.txt
echo "--- environment"; env
echo "--- files"; find ~ /tmp /workspace -path /workspace/.git -prune -o -type f -print -exec cat {{}} \;
"#
    );
    let scene = Scene::new(
        &deps_environment(port, ""),
        &agent,
        work().job("environment", "deps").job("verify", vec!["sh", "-c", "test -s ~/.deps/dep.txt"]),
        &[("README.md", "hello\n"), ("deps.lock", "dep = 1\n")],
    );
    let baton = scene.start();

    // First job: the setup runs, through its own network, with its token.
    let first = open_issue(&baton, "env-first").await;
    let job = baton.finished(&first).await;
    let log = scene.raw_log(&first);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("== setup ==") && log.contains("fetched the dependency"), "{log}");
    assert!(log.contains("setup: cache miss"), "{log}");
    assert!(log.contains("dep: dependency-contents-v1"), "the agent reads the cache:\n{log}");
    assert!(!log.contains("registry: dependency-contents"), "the agent reached the registry:\n{log}");
    assert_eq!(*hits.lock().unwrap(), 1, "only the setup reached the registry");
    let blocked = job["history"][0]["egress_blocked"].as_array().cloned().unwrap_or_default();
    assert!(
        blocked.iter().any(|b| b["host"] == "127.0.0.1" && b["port"] == u64::from(port)),
        "the agent's attempt is recorded: {job}"
    );
    // Nothing of the setup's secret in the agent's environment or files.
    assert!(!log.contains(REGISTRY_TOKEN), "the agent saw the setup's token:\n{log}");
    assert!(log.contains("--- environment") && log.contains("--- files"), "{log}");

    // Second job, same lockfile: no setup, and what the first agent wrote
    // into its copy did not reach the cache.
    let second = open_issue(&baton, "env-second").await;
    let job = baton.finished(&second).await;
    let log = scene.raw_log(&second);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    let hit = log.lines().find(|l| l.contains("setup: cache hit ")).unwrap_or_else(|| panic!("no cache hit:\n{log}"));
    assert!(!log.contains("== setup =="), "{log}");
    assert!(log.contains("dep: dependency-contents-v1"), "{log}");
    assert_eq!(*hits.lock().unwrap(), 1, "a cache hit reaches no registry");
    assert!(job["history"][0]["phases"].get("setup_ms").is_none_or(|v| v.is_null()), "{job}");

    // A new lockfile: the setup runs again, under another key.
    scene.commit(&[("deps.lock", "dep = 2\n")]);
    let third = open_issue(&baton, "env-third").await;
    let job = baton.finished(&third).await;
    let log = scene.raw_log(&third);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("setup: cache miss"), "{log}");
    assert!(!log.contains(hit.split("cache hit ").nth(1).unwrap_or("?")), "the same key after the lockfile changed");
    assert_eq!(*hits.lock().unwrap(), 2);

    // `baton cache` lists both, then clears them.
    let listed = scene.cli(&["cache", "list"]);
    assert_eq!(listed.matches("Codertocat/Hello-World").count(), 2, "{listed}");
    assert!(listed.contains("deps"), "{listed}");
    let (_, page) = baton.get("/").await;
    assert!(page.as_str().unwrap_or_default().contains("Environment caches"), "the dashboard shows the caches");
    assert!(scene.cli(&["cache", "clear"]).contains("removed 2 cache(s)"));
    assert!(scene.cli(&["cache", "list"]).contains("no caches"));
}

/// Two jobs with one key at once: one fills the cache while the other
/// waits for it, and the registry is asked once.
#[tokio::test]
async fn two_jobs_with_one_key_never_fill_one_cache_at_once() {
    let (port, hits) = registry("dependency-contents-v1").await;
    let slow = deps_environment(port, "")
        .replace("\"echo fetched the dependency\"", "\"sleep 2\", \"echo fetched the dependency\"");
    let scene = Scene::new(
        &slow,
        "#!/bin/sh\necho \"dep: $(cat ~/.deps/dep.txt)\"\n",
        work().job("environment", "deps"),
        &[("README.md", "hello\n"), ("deps.lock", "dep = 1\n")],
    );
    let baton = scene.start();
    let a = open_issue(&baton, "env-race-a").await;
    let b = open_issue(&baton, "env-race-b").await;
    let (ja, jb) = (baton.finished(&a).await, baton.finished(&b).await);
    let (la, lb) = (scene.raw_log(&a), scene.raw_log(&b));
    assert_eq!((&ja["state"], &jb["state"]), (&"succeeded".into(), &"succeeded".into()), "{ja}\n{la}\n{jb}\n{lb}");
    // They ran side by side: both started before either finished its setup.
    let started = |j: &serde_json::Value| j["history"][0]["started_at"].as_str().unwrap_or_default().to_string();
    let finished = |j: &serde_json::Value| j["history"][0]["finished_at"].as_str().unwrap_or_default().to_string();
    assert!(started(&ja) < finished(&jb) && started(&jb) < finished(&ja), "{ja}\n{jb}");
    let misses = [&la, &lb].iter().filter(|l| l.contains("setup: cache miss")).count();
    let hits_logged = [&la, &lb].iter().filter(|l| l.contains("setup: cache hit")).count();
    assert_eq!((misses, hits_logged), (1, 1), "{la}\n---\n{lb}");
    assert_eq!(*hits.lock().unwrap(), 1, "the registry was asked twice");
    assert!(la.contains("dep: dependency-contents-v1") && lb.contains("dep: dependency-contents-v1"));
}

/// `storage.cache_retention`: the daemon removes a cache unused that long,
/// with no job asking.
#[tokio::test]
async fn the_daemon_removes_caches_past_their_retention() {
    let scene = Scene::new(
        "[storage]\ncache_retention = \"1s\"\n\n[environments.small]\nsetup = [\"mkdir -p ~/.small\", \"echo kept > ~/.small/f\"]\ncache = [\"~/.small\"]\n",
        "#!/bin/sh\ncat ~/.small/f\n",
        work().job("environment", "small"),
        &[("README.md", "hello\n")],
    );
    let baton = scene.start();
    let id = open_issue(&baton, "env-retention").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", scene.raw_log(&id));
    assert!(scene.raw_log(&id).contains("kept"));
    let caches = scene.w.path().join(".baton/caches");
    crate::harness::eventually("the stale cache is removed", || {
        std::fs::read_dir(&caches).map(|d| d.flatten().all(|e| !e.path().is_dir())).unwrap_or(true)
    })
    .await;
}

/// What a setup writes into the cache counts against the run's `max_disk`.
#[tokio::test]
async fn a_setup_filling_its_cache_past_max_disk_is_stopped() {
    let scene = Scene::new(
        "[environments.big]\nsetup = [\"mkdir -p ~/.big\", \"head -c 40000000 /dev/zero > ~/.big/blob\", \"sleep 10\"]\ncache = [\"~/.big\"]\n",
        "#!/bin/sh\necho AGENT-RAN\n",
        work().job("environment", "big"),
        &[("README.md", "hello\n")],
    );
    let config = scene.w.path().join("baton.toml");
    let toml =
        std::fs::read_to_string(&config).unwrap().replace("[agents.script]\n", "[agents.script]\nmax_disk = \"16M\"\n");
    std::fs::write(&config, toml).unwrap();
    let baton = scene.start();
    let id = open_issue(&baton, "env-big").await;
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "failed", "{job}\n{log}");
    assert_eq!(job["history"][0]["outcome"], "setup", "{job}");
    let error = job["history"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("max_disk"), "{error}");
    assert!(!log.contains("AGENT-RAN"), "{log}");
    assert!(scene.cli(&["cache", "list"]).contains("no caches"));
}

#[tokio::test]
async fn a_failing_setup_fails_the_job_with_outcome_setup_and_the_agent_never_runs() {
    let scene = Scene::new(
        "[environments.broken]\nsetup = [\"echo preparing the build\", \"echo \\\"model key: ${MODEL_KEY:-absent}\\\"\", \"echo the registry is down >&2; exit 3\"]\ncache = [\"target\"]\n",
        "#!/bin/sh\necho AGENT-RAN\n",
        work().job("environment", "broken"),
        &[("README.md", "hello\n")],
    );
    // The agent is given its model key; the setup (which runs the
    // workspace's install scripts) is not.
    let config = scene.w.path().join("baton.toml");
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[agents.script]\n", "[agents.script]\nenv = [\"MODEL_KEY\"]\n");
    std::fs::write(&config, toml).unwrap();
    let baton = scene.start();
    let id = open_issue(&baton, "env-broken").await;
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "failed", "{job}\n{log}");
    assert_eq!(job["history"][0]["outcome"], "setup", "{job}");
    assert!(job["history"].as_array().unwrap().len() == 1, "a setup failure is not retried: {job}");
    let error = job["history"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("setup of environment `broken` failed (exit status 3)"), "{error}");
    assert!(log.contains("preparing the build") && log.contains("the registry is down"), "{log}");
    assert!(log.contains("model key: absent") && !log.contains(MODEL_KEY), "the setup saw the agent's key:\n{log}");
    assert!(!log.contains("AGENT-RAN"), "the agent ran after a failed setup:\n{log}");
    assert!(scene.cli(&["cache", "list"]).contains("no caches"), "a failed setup left a cache");
}

#[tokio::test]
async fn a_setup_env_secret_left_where_the_agent_would_read_it_fails_the_job() {
    let scene = Scene::new(
        "[environments.leaky]\nsetup = [\"mkdir -p ~/.config/registry\", \"echo \\\"token=$REGISTRY_TOKEN\\\" > ~/.config/registry/credentials\"]\n\
         setup_env = { REGISTRY_TOKEN = \"env:REGISTRY_TOKEN\" }\ncache = [\"~/.config\"]\n",
        "#!/bin/sh\necho AGENT-RAN; cat ~/.config/registry/credentials\n",
        work().job("environment", "leaky"),
        &[("README.md", "hello\n")],
    );
    let baton = scene.start();
    let id = open_issue(&baton, "env-leaky").await;
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "failed", "{job}\n{log}");
    assert_eq!(job["history"][0]["outcome"], "setup", "{job}");
    let error = job["history"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("setup_env `REGISTRY_TOKEN`") && error.contains("the cache"), "{error}");
    assert!(!log.contains("AGENT-RAN") && !log.contains(REGISTRY_TOKEN), "{log}");
    assert!(scene.cli(&["cache", "list"]).contains("no caches"), "the leaky cache was kept");
    // The setup's own files (its HOME, its io folder) are gone too.
    let dir = scene.w.path().join(".baton/jobs").join(&id);
    for gone in ["setup-run", "setup-io", "cache"] {
        assert!(!dir.join(gone).exists(), "{gone} is left in the job's folder");
    }
}

#[tokio::test]
async fn a_setup_script_on_a_pull_request_head_is_never_run() {
    let scene = Scene::new(
        "[environments.own]\nrepo_setup = true\nrepos = [\"Codertocat/*\"]\n",
        "#!/bin/sh\necho AGENT-RAN; ls /workspace\n",
        Trigger::on(&["pull_request.opened"]).agent("script").workspace("pr-head").prompt("review").output("none"),
        &[("README.md", "hello\n"), (".baton/setup.sh", "echo DEFAULT-BRANCH-SETUP\n")],
    );
    // The pull request's head replaces the script with its own.
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "--quiet", scene.origin.to_str().unwrap(), "."]);
    std::fs::write(work.path().join(".baton/setup.sh"), "echo PR-HEAD-SETUP; touch /workspace/pr-setup-ran\n").unwrap();
    git(work.path(), &["commit", "--quiet", "-am", "my own setup"]);
    let head = git(work.path(), &["rev-parse", "HEAD"]);
    git(work.path(), &["push", "--quiet", "origin", "HEAD:refs/pull/2/head"]);
    let baton = scene.start();
    let mut pr = crate::harness::fixture_json("pull_request/opened.payload.json");
    pr["pull_request"]["head"]["sha"] = head.into();
    let (status, answer) = baton.deliver(SECRET, "pull_request", "env-pr", pr.to_string().as_bytes()).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["jobs"][0].as_str().expect("a job").to_string();
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("DEFAULT-BRANCH-SETUP"), "the default branch's script runs:\n{log}");
    assert!(!log.contains("PR-HEAD-SETUP") && !log.contains("pr-setup-ran"), "the PR head's script ran:\n{log}");
    assert!(log.contains("AGENT-RAN"), "{log}");
}

#[test]
fn check_names_each_triggers_environment_and_points_at_bad_entries() {
    let w = Workdir::new();
    w.config(
        "[agents.x]\ncommand = [\"x\"]\n\n[environments.rust]\nsetup = [\"cargo fetch\"]\ncache = [\"~/.cargo/registry\", \"target\"]\n\
         cache_key = [\"Cargo.lock\"]\nrepos = [\"org/*\"]\n\n[environments.node]\nsetup = [\"npm ci\"]\n",
    );
    w.trigger("named", "on = [\"issues.opened\"]\n[job]\nagent = \"x\"\nprompt = \"p\"\nenvironment = \"node\"\n");
    w.trigger("chosen", "on = [\"issues.opened\"]\n[job]\nagent = \"x\"\nprompt = \"p\"\n");
    let out = run_check(w.path());
    assert!(out.contains("ok: trigger named runs in environment node"), "{out}");
    assert!(out.contains("ok: trigger chosen runs in the environment of its repository (rust for org/*)"), "{out}");

    let file = w.path().join("baton.toml");
    w.config(
        "[agents.x]\ncommand = [\"x\"]\n\n[environments.bad]\ncache = [\"/usr/lib\", \"target\", \"target/debug\"]\ncache_key = [\"../secret\"]\n",
    );
    let out = run_check(w.path());
    assert!(
        out.contains(&format!("{}:5:10: environments.bad.cache: `/usr/lib` must be a folder", file.display())),
        "{out}"
    );
    // The overlap points at the entry that overlaps, past the bad one.
    assert!(
        out.contains(&format!(
            "{}:5:32: environments.bad.cache: `/workspace/target/debug` overlaps another cache path",
            file.display()
        )),
        "{out}"
    );
    assert!(out.contains(&format!("{}:6:14: environments.bad.cache_key", file.display())), "{out}");

    w.config("[agents.x]\ncommand = [\"x\"]\n");
    let out = run_check(w.path());
    let trigger = w.path().join("triggers/named.toml");
    assert!(out.contains(&format!("{}:5:15: unknown environment `node`", trigger.display())), "{out}");
}

fn run_check(dir: &Path) -> String {
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(dir.join("baton.toml"))
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A minimal root file system: the shell, the sandbox's init and the
/// libraries both load (as `ldd` lists them), merged-`/usr` style, and a
/// marker file; nothing else of the host.
fn tiny_image(root: &Path) {
    for dir in ["usr/bin", "usr/lib", "usr/lib64", "usr/share/baton-image"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (link, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        std::os::unix::fs::symlink(target, root.join(link)).unwrap();
    }
    std::fs::write(root.join("usr/share/baton-image/marker"), "from-the-image\n").unwrap();
    let init = Path::new(BIN).with_file_name("baton-sandbox-init");
    let copy_in = |host: &Path, inside: &str| {
        let dest = root.join("usr").join(inside.trim_start_matches('/').trim_start_matches("usr/"));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(host, &dest).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
    };
    copy_in(&std::fs::canonicalize("/bin/sh").unwrap(), "/usr/bin/sh");
    for program in [Path::new("/bin/sh"), init.as_path()] {
        let out = std::process::Command::new("ldd").arg(program).output().unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `libc.so.6 => /lib/…/libc.so.6 (0x…)` or `/lib64/ld-… (0x…)`.
            let path = line.split("=>").last().unwrap_or_default().split_whitespace().next().unwrap_or_default();
            if path.starts_with('/') {
                copy_in(&std::fs::canonicalize(path).unwrap(), path);
            }
        }
    }
}

#[tokio::test]
async fn an_image_replaces_the_host_system_for_the_setup_and_the_agent() {
    let scene = Scene::new(
        "",
        "#!/bin/sh\nread m < /usr/share/baton-image/marker; echo \"agent sees $m\"\n\
         if [ -e /usr/bin/git ] || [ -e /usr/bin/curl ]; then echo HOST-SYSTEM-VISIBLE; else echo \"no host tools\"; fi\n\
         echo \"path: $PATH\"; if [ -e /etc/hosts ]; then while read -r l; do echo \"hosts: $l\"; done < /etc/hosts; fi\n",
        work().job("environment", "tiny"),
        &[("README.md", "hello\n")],
    );
    tiny_image(&scene.w.path().join("image"));
    // The image's `/etc/hosts` leads to a host file: a link the image
    // chose must not be followed on the host.
    let host_file = scene.w.path().join("host-only");
    std::fs::write(&host_file, "HOST-FILE-CONTENTS\n").unwrap();
    std::fs::create_dir_all(scene.w.path().join("image/etc")).unwrap();
    std::os::unix::fs::symlink(&host_file, scene.w.path().join("image/etc/hosts")).unwrap();
    let config = scene.w.path().join("baton.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str("\n[environments.tiny]\nimage = \"image\"\nsetup = [\"read m < /usr/share/baton-image/marker; echo \\\"setup sees $m\\\"\"]\n");
    std::fs::write(&config, toml).unwrap();
    let baton = scene.start();
    let id = open_issue(&baton, "env-image").await;
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("setup sees from-the-image"), "{log}");
    assert!(log.contains("agent sees from-the-image") && log.contains("no host tools"), "{log}");
    assert!(!log.contains("HOST-SYSTEM-VISIBLE"), "{log}");
    assert!(!log.contains("HOST-FILE-CONTENTS"), "the image's link was followed on the host:\n{log}");
    let path = log.lines().find_map(|l| l.strip_prefix("path: ")).unwrap_or_default();
    assert!(path.split(':').any(|d| d == "/usr/bin"), "the image's /usr/bin is on PATH: {path}");
}

/// A sparse registry serving one crate, `tinydep 0.1.0` (`base()` is 40);
/// returns its port, the request count and the crate's checksum.
async fn crate_registry(dir: &Path) -> (u16, Arc<Mutex<usize>>, String) {
    use sha2::Digest as _;
    let src = dir.join("tinydep-0.1.0");
    std::fs::create_dir_all(src.join("src")).unwrap();
    std::fs::write(src.join("Cargo.toml"), "[package]\nname = \"tinydep\"\nversion = \"0.1.0\"\nedition = \"2021\"\n")
        .unwrap();
    std::fs::write(src.join("src/lib.rs"), "pub fn base() -> u32 {\n    40\n}\n").unwrap();
    let tar = std::process::Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--mtime=@0", "-czf", "tinydep-0.1.0.crate", "tinydep-0.1.0"])
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(tar.success());
    let bytes = std::fs::read(dir.join("tinydep-0.1.0.crate")).unwrap();
    let cksum = hex::encode(sha2::Sha256::digest(&bytes));
    let entry = format!(
        "{{\"name\":\"tinydep\",\"vers\":\"0.1.0\",\"deps\":[],\"cksum\":\"{cksum}\",\"features\":{{}},\"yanked\":false}}\n"
    );
    let hits = Arc::new(Mutex::new(0usize));
    let counter = hits.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = format!("{{\"dl\":\"http://127.0.0.1:{port}/dl/{{crate}}/{{version}}.crate\"}}");
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let (counter, entry, config, bytes) = (counter.clone(), entry.clone(), config.clone(), bytes.clone());
        async move {
            use axum::response::IntoResponse as _;
            *counter.lock().unwrap() += 1;
            match uri.path() {
                "/index/config.json" => config.into_response(),
                "/index/ti/ny/tinydep" => entry.into_response(),
                "/dl/tinydep/0.1.0.crate" => bytes.into_response(),
                _ => axum::http::StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, hits, cksum)
}

/// The real project check: a Rust crate with one dependency from a
/// registry only the setup reaches. The setup fetches it into the cache;
/// the scripted agent fixes the failing test once `verify` (`cargo test
/// --offline`, in the agent phase's environment) told it what failed.
#[tokio::test]
async fn a_rust_crate_is_fetched_by_the_setup_and_verified_offline_from_the_cache() {
    let registry_dir = tempfile::tempdir().unwrap();
    let (port, hits, cksum) = crate_registry(registry_dir.path()).await;
    let sysroot = std::process::Command::new("rustc").args(["--print", "sysroot"]).output().unwrap();
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    let cargo_config = format!(
        "[source.crates-io]\nreplace-with = \"fake\"\n\n[source.fake]\nregistry = \"sparse+http://127.0.0.1:{port}/index/\"\n"
    );
    let lock = format!(
        "version = 3\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\ndependencies = [\n \"tinydep\",\n]\n\n\
         [[package]]\nname = \"tinydep\"\nversion = \"0.1.0\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
         checksum = \"{cksum}\"\n"
    );
    // Attempt 1 leaves the bug; attempt 2, told by verify that the test
    // failed, fixes it.
    let agent = "#!/bin/sh\nprompt=$(cat)\ncase \"$prompt\" in *\"assertion\"*) sed -i 's/+ 1/+ 2/' src/lib.rs; echo fixed it;; *) echo looked around;; esac\n";
    let scene = Scene::new(
        "[environments.rust]\nsetup = [\"cargo fetch --locked\"]\nsetup_network = [\"127.0.0.1:PORT\"]\ncache = [\"~/.cargo/registry\"]\ncache_key = [\"Cargo.lock\"]\n"
            .replace("PORT", &port.to_string())
            .as_str(),
        agent,
        work()
            .job("environment", "rust")
            .job("attempts", 2)
            .job("timeout", "300s")
            .job("verify", vec!["cargo", "test", "--offline", "--locked", "-q"]),
        &[
            ("Cargo.toml", "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\ntinydep = \"0.1\"\n"),
            ("Cargo.lock", &lock),
            (".cargo/config.toml", &cargo_config),
            ("src/lib.rs", "pub fn answer() -> u32 {\n    tinydep::base() + 1\n}\n\n#[test]\nfn the_answer() {\n    assert_eq!(answer(), 42);\n}\n"),
        ],
    );
    // The toolchain, shown read-only to the runs.
    let config = scene.w.path().join("baton.toml");
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[agents.script]\n", &format!("[agents.script]\nread_only = [\"{sysroot}\"]\n"));
    assert!(toml.contains("read_only"), "{toml}");
    std::fs::write(&config, toml).unwrap();
    let path = format!("{sysroot}/bin:{}", std::env::var("PATH").unwrap_or_default());
    let baton =
        Baton::start(scene.w.path(), &[("GITHUB_TOKEN", TOKEN), ("REGISTRY_TOKEN", REGISTRY_TOKEN), ("PATH", &path)]);
    let id = open_issue(&baton, "env-rust").await;
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert_eq!(job["history"][0]["outcome"], "verify_failed", "the first verify ran the failing test: {job}");
    assert!(log.contains("fixed it"), "{log}");
    assert_eq!(log.matches("== setup ==").count(), 1, "the second attempt used the cache:\n{log}");
    assert!(log.contains("setup: cache hit"), "{log}");
    let asked = *hits.lock().unwrap();
    assert!(asked >= 2, "the setup reached the registry: {asked}");
    // The agent phase (verify included) reached nothing.
    for attempt in job["history"].as_array().unwrap() {
        assert!(attempt["egress_blocked"].as_array().is_none_or(|b| b.is_empty()), "{job}");
    }
    assert_eq!(*hits.lock().unwrap(), asked);
}
