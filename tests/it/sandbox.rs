//! The agent sandbox, tested as an attacker would: each test is an agent
//! script that tries an attack, and a check from outside that it failed
//! while the job itself still ran and reported.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::fake_github::FakeGitHub;
use crate::harness::{bare_repo, eventually, fixture, Baton, Workdir, BIN};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};
use std::convert::identity;

const SECRET: &str = "sandbox-webhook-secret-0123456789";
const TOKEN: &str = "ghp_SandboxTestToken0123456789abcdefABCDEF";
const KEY: &str = "KEYFILE-CONTENTS-never-seen-by-agents-4711";

/// A daemon with a GitHub token, a webhook secret read from a key file and a
/// `repo` workspace from `remote/`, whose `script` agent runs `body`; the
/// `work` trigger publishes as `output`. `agent` and `github` add to theirs.
struct Scene {
    w: Workdir,
    /// What was written, for tests that change it before they start.
    scenario: Scenario,
}

impl Scene {
    fn new(
        body: &str,
        agent: impl FnOnce(Agent) -> Agent,
        output: &str,
        github: impl FnOnce(GitHub) -> GitHub,
    ) -> Scene {
        let w = Workdir::new();
        let script = w.script("agent.sh", body);
        std::fs::write(w.path().join("hook.secret"), format!("{SECRET}\n")).unwrap();
        std::fs::write(w.path().join("app.key"), KEY).unwrap();
        let repos = w.path().join("remote");
        bare_repo(&repos, "Codertocat/Hello-World", "master", &[("README.md", "hello\n")]);
        let scenario = Scenario::new()
            .github(github(GitHub::secret("file:hook.secret").repos(&repos).token("env:GITHUB_TOKEN")))
            .set("sources.ci.secret", "file:app.key")
            .agent("script", agent(Agent::script(&script).set("timeout", "60s")))
            .trigger(
                "work",
                Trigger::on(&["issues.opened"])
                    .agent("script")
                    .workspace("default-branch")
                    .prompt("work")
                    .output(output),
            );
        scenario.write(&w);
        Scene { w, scenario }
    }

    fn start(&self) -> Baton {
        Baton::start(self.w.path(), &[("GITHUB_TOKEN", TOKEN)])
    }

    fn storage(&self) -> PathBuf {
        self.w.path().join(".baton")
    }

    /// The job's log as it is on disk (the API's copy is redacted).
    fn raw_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.storage().join("jobs").join(id).join("log")).unwrap_or_default()
    }
}

async fn open_issue(baton: &Baton, delivery: &str) -> String {
    let (status, body) = baton.deliver(SECRET, "issues", delivery, &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{body}");
    body["jobs"][0].as_str().expect("a job").to_string()
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [TOKEN, SECRET, KEY] {
        assert!(!text.contains(secret), "{what} holds a secret ({secret}):\n{text}");
    }
}

#[tokio::test]
async fn an_agent_cannot_read_the_daemons_environment_memory_files_or_keys() {
    // Filled in once the daemon's pid is known: the script reads it from a file.
    let scene = Scene::new(
        r#"#!/bin/sh
echo "== parent environ"; tr '\0' '\n' < /proc/$PPID/environ
for pid in $(ls /proc | grep -E '^[0-9]+$'); do
  echo "== /proc/$pid"; tr '\0' '\n' < /proc/$pid/environ 2>&1 | head -50
  dd if=/proc/$pid/mem bs=1 count=16 skip=4194304 2>&1 | head -2
done
echo "== daemon by pid"; cat "/proc/$(cat /run/daemon-pid 2>/dev/null || echo 1)/environ" 2>&1
echo "== find"; find / -xdev \( -name webhook-secret -o -name hook.secret -o -name app.key -o -name baton.toml -o -name 'db' \) 2>/dev/null
echo "== by path"
for f in @DIR@/hook.secret @DIR@/app.key @DIR@/baton.toml @DIR@/.baton/webhook-secret /etc/shadow; do cat "$f" 2>&1; done
ls @DIR@/.baton 2>&1
# /usr holds packages only (baton writes nothing there); grepping it took 20 s.
echo "== grep"; grep -rsl -e ghp_ -e KEYFILE / --exclude-dir=proc --exclude-dir=sys --exclude-dir=usr 2>/dev/null | head
echo "== fds"; ls /proc/self/fd | tr '\n' ' '; echo
echo "the job ran"
"#,
        identity,
        "none",
        identity,
    );
    let dir = scene.w.path().display().to_string();
    let body = std::fs::read_to_string(scene.w.path().join("agent.sh")).unwrap().replace("@DIR@", &dir);
    scene.w.script("agent.sh", &body);
    let baton = scene.start();
    let id = open_issue(&baton, "sandbox-secrets").await;
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("the job ran"), "{log}");
    assert_no_secret("the agent's output", &log);
    assert_no_secret("the job", &job.to_string());
    assert!(log.contains("== find"), "{log}");
    let found = log.split("== find").nth(1).unwrap().split("== by path").next().unwrap();
    assert!(found.trim().is_empty(), "the agent found baton's files: {found}");
    // Only stdin, stdout and stderr (and the fd `ls` reads the folder with).
    let fds = log.split("== fds").nth(1).unwrap().lines().nth(1).unwrap_or_default().to_string();
    let fds: Vec<&str> = fds.split_whitespace().collect();
    assert!(fds.iter().all(|f| ["0", "1", "2", "3"].contains(f)), "inherited descriptors: {fds:?}");

    // From outside too: the daemon's environment no longer holds the token
    // it read, and the kernel refuses to dump it.
    let environ = std::fs::read(format!("/proc/{}/environ", baton.pid())).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&environ).contains(TOKEN), "the token is still in the daemon's environment");
    let owner = std::fs::metadata(format!("/proc/{}/environ", baton.pid())).map(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.uid()
    });
    assert_eq!(owner.ok(), Some(0), "a non-dumpable process's /proc files belong to root");
}

#[tokio::test]
async fn an_agent_cannot_write_triggers_other_workspaces_the_mirror_or_the_store() {
    // Issue 1's job holds its workspace until told to go; issue 2's job
    // attacks everything of baton's it can name, that workspace included.
    // Writes that "succeed" inside land in the sandbox's own scratch
    // folders: only what is on the host counts.
    let scene = Scene::new(
        r#"#!/bin/sh
n=$(cat)
if [ "$n" = 1 ]; then touch @SHARED@/started; while [ ! -e @SHARED@/go ]; do sleep 0.05; done; echo first; exit 0; fi
S=@DIR@/.baton
printf 'on = ["issues.opened"]
[filter]
authors = ["NONE"]
[job]
agent = "script"
prompt = "x"
' > @DIR@/triggers/evil.toml
for d in $S/pool/*/*/*/work; do echo pwned > $d/PWNED; done
echo '#!/bin/sh' > $S/mirrors/Codertocat/Hello-World.git/hooks/post-checkout
echo '[core]' >> $S/mirrors/Codertocat/Hello-World.git/config
echo 0000000000000000000000000000000000000000 > $S/mirrors/Codertocat/Hello-World.git/refs/heads/evil
echo x > $S/db/evil
rm -rf $S/jobs
echo mine > MINE && echo "own workspace ok"
"#,
        identity,
        "none",
        identity,
    );
    let w = &scene.w;
    let body = std::fs::read_to_string(w.path().join("agent.sh"))
        .unwrap()
        .replace("@DIR@", &w.path().display().to_string())
        .replace("@SHARED@", &w.shared().display().to_string());
    w.script("agent.sh", &body);
    scene
        .scenario
        .clone()
        .set("agents.script.read_write", vec![w.shared().display().to_string()])
        .trigger(
            "work",
            Trigger::on(&["issues.opened"])
                .agent("script")
                .workspace("default-branch")
                .prompt("{{ issue.number }}")
                .output("none"),
        )
        .write(w);
    let baton = scene.start();
    let first = open_issue(&baton, "sandbox-write-1").await;
    eventually("the first job to hold its workspace", || w.shared().join("started").exists()).await;
    let mut second = crate::harness::fixture_json("issues/opened.payload.json");
    second["issue"]["number"] = 2.into();
    let (_, answer) = baton.deliver(SECRET, "issues", "sandbox-write-2", second.to_string().as_bytes()).await;
    let id = answer["jobs"][0].as_str().unwrap().to_string();
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("own workspace ok"), "{log}");

    let storage = scene.storage();
    let mirror = storage.join("mirrors/Codertocat/Hello-World.git");
    assert!(!w.path().join("triggers/evil.toml").exists(), "a trigger was planted");
    assert!(!mirror.join("refs/heads/evil").exists(), "a ref was planted in the mirror");
    assert!(!mirror.join("hooks/post-checkout").exists(), "a hook was planted in the mirror");
    assert!(!std::fs::read_to_string(mirror.join("config")).unwrap().ends_with("[core]\n"));
    assert!(!storage.join("db/evil").exists(), "the store's folder was written");
    assert!(storage.join("jobs").join(&first).exists(), "the store's job folders are intact");
    let pwned: Vec<_> = std::fs::read_dir(storage.join("pool/Codertocat/Hello-World"))
        .unwrap()
        .flatten()
        .map(|slot| slot.path().join("work/PWNED"))
        .filter(|p| p.exists())
        .collect();
    // The first job's workspace is still out; the second's own was cleaned
    // when it was released.
    assert!(pwned.is_empty(), "another job's workspace was written: {pwned:?}");
    std::fs::write(w.shared().join("go"), "").unwrap();
    assert_eq!(baton.finished(&first).await["state"], "succeeded");
}

#[tokio::test]
async fn hooks_and_config_an_agent_plants_never_run_in_the_daemon() {
    let fake = FakeGitHub::start().await;
    let marks = tempfile::tempdir().unwrap();
    let m = marks.path().display().to_string();
    let scene = Scene::new(
        &format!(
            r#"#!/bin/sh
cat > /dev/null
gitdir=$(git rev-parse --git-common-dir)
for h in post-checkout pre-push reference-transaction pre-commit post-commit pre-auto-gc post-index-change; do
  printf '#!/bin/sh\ntouch {m}/ran-%s\n' "$h" > "$gitdir/hooks/$h"; chmod +x "$gitdir/hooks/$h"
done
printf '#!/bin/sh\ntouch {m}/ran-fsmonitor\n' > /tmp/fsmon; chmod +x /tmp/fsmon
git config core.fsmonitor "$PWD/.fsmon"; cp /tmp/fsmon .fsmon
git config core.hooksPath "$gitdir/hooks"
echo '* filter=evil' > .gitattributes
git config filter.evil.clean "touch {m}/ran-filter; cat"
echo "change $(date +%s%N)" > CHANGED.md
echo "planted"
"#
        ),
        identity,
        "pull_request",
        |g| g.api(&fake),
    );
    let baton = scene.start();
    for delivery in ["sandbox-hooks-1", "sandbox-hooks-2"] {
        let id = open_issue(&baton, delivery).await;
        let job = baton.finished(&id).await;
        assert_eq!(job["state"], "succeeded", "{job}\n{}", scene.raw_log(&id));
        assert!(job["branch"].is_string(), "the change was pushed: {job}");
    }
    let ran: Vec<String> = std::fs::read_dir(marks.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(ran.is_empty(), "planted hooks or config ran in the daemon: {ran:?}");
    eventually("two pull requests", || fake.posts("/repos/Codertocat/Hello-World/pulls").len() == 2).await;
}

#[tokio::test]
async fn a_result_file_swapped_for_a_link_is_not_followed() {
    let outside = tempfile::tempdir().unwrap();
    let secret_file = outside.path().join("secret.txt");
    std::fs::write(&secret_file, "TOP-SECRET-CONTENTS").unwrap();
    // Both with the sandbox (where the target is not even visible) and
    // without it (where only O_NOFOLLOW stands between them).
    for sandboxed in [true, false] {
        let w = Workdir::new();
        let agent = w.script("agent.sh", &format!("#!/bin/sh\nln -sf {} \"$1\"\necho linked\n", secret_file.display()));
        let mut scenario = Scenario::new()
            .github(GitHub::secret(SECRET))
            .agent("script", Agent::command(&[&agent.display().to_string(), "{{ result_file }}"]).result("file"))
            .trigger(
                "work",
                Trigger::on(&["issues.opened"]).agent("script").workspace("none").prompt("x").job("attempts", 1),
            );
        if !sandboxed {
            scenario = scenario.set("sandbox.enabled", false);
        }
        scenario.write(&w);
        let baton = Baton::start(w.path(), &[]);
        let id = open_issue(&baton, "sandbox-link").await;
        let job = baton.finished(&id).await;
        assert!(!job.to_string().contains("TOP-SECRET"), "{job}");
        assert_eq!(job["state"], "failed", "{job}");
        assert!(job["error"].as_str().unwrap().contains("symbolic link"), "{job}");
    }
}

/// A loopback HTTP server that answers `text` and counts its requests.
async fn http_server(text: &'static str) -> (u16, Arc<Mutex<usize>>) {
    let hits = Arc::new(Mutex::new(0usize));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            *counter.lock().unwrap() += 1;
            text
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, hits)
}

#[tokio::test]
async fn egress_goes_only_to_allowed_hosts_through_the_proxy_and_refusals_are_recorded() {
    let (allowed, allowed_hits) = http_server("hello from the allowed host").await;
    let (denied, denied_hits) = http_server("you should not see this").await;
    let scene = Scene::new(
        &format!(
            r#"#!/bin/sh
echo "plain: $(curl -sS -m 10 http://127.0.0.1:{allowed}/ 2>&1)"
echo "tunnel: $(curl -sS -m 10 --proxytunnel http://127.0.0.1:{allowed}/ 2>&1)"
echo "denied: $(curl -sS -m 10 http://127.0.0.1:{denied}/ 2>&1)"
echo "denied again: $(curl -sS -m 10 --proxytunnel http://127.0.0.1:{denied}/ 2>&1)"
if curl -sS -m 5 --noproxy '*' http://127.0.0.1:{allowed}/ >/dev/null 2>&1; then echo "DIRECT CONNECTED"; else echo "direct refused"; fi
if (exec 3<>/dev/tcp/1.1.1.1/443) 2>/dev/null; then echo "RAW CONNECTED"; else echo "raw refused"; fi
"#
        ),
        |a| a.set("network", vec![format!("127.0.0.1:{allowed}")]),
        "none",
        identity,
    );
    // /dev/tcp needs bash.
    let body = std::fs::read_to_string(scene.w.path().join("agent.sh")).unwrap().replace("#!/bin/sh", "#!/bin/bash");
    scene.w.script("agent.sh", &body);
    let baton = scene.start();
    let id = open_issue(&baton, "sandbox-egress").await;
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("plain: hello from the allowed host"), "{log}");
    assert!(log.contains("tunnel: hello from the allowed host"), "{log}");
    assert!(log.contains("direct refused") && log.contains("raw refused"), "{log}");
    assert!(!log.contains("you should not see this"), "{log}");
    assert_eq!(*denied_hits.lock().unwrap(), 0, "the denied server was reached");
    assert_eq!(*allowed_hits.lock().unwrap(), 2);
    // Refused by the proxy (twice), and the two made around it: seen by
    // the sandbox's seccomp watch, though the empty namespace stopped them.
    let mut blocked: Vec<(String, u64, u64)> = job["history"][0]["egress_blocked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["host"].as_str().unwrap().to_string(), b["port"].as_u64().unwrap(), b["count"].as_u64().unwrap()))
        .collect();
    blocked.sort();
    let mut expected = vec![
        ("127.0.0.1".to_string(), denied as u64, 2),
        ("127.0.0.1".into(), allowed as u64, 1),
        ("1.1.1.1".into(), 443, 1),
    ];
    expected.sort();
    assert_eq!(blocked, expected, "{job}");
    let (_, metrics) = baton.get("/metrics").await;
    assert!(metrics.as_str().unwrap().contains("baton_egress_blocked_total{agent=\"script\"} 4"), "{metrics}");
    let (_, page) = baton.get(&format!("/jobs/{id}")).await;
    assert!(page.as_str().unwrap().contains(&format!("127.0.0.1:{denied} ×2")), "the dashboard shows the refusal");
}

/// With a cgroup (this machine's), and with the rlimits and the init's own
/// count that stand in where baton may make none.
#[tokio::test]
async fn a_run_past_its_process_or_memory_cap_fails_with_that_reason() {
    for caps in ["auto", "rlimits"] {
        caps_hit(caps).await;
    }
}

async fn caps_hit(caps: &str) {
    for (keys, body, reason) in [
        (
            "max_processes = 32",
            "#!/bin/sh\nfor i in $(seq 100); do sleep 5 & done\nwait\necho survived\n",
            "process limit (max_processes = 32)",
        ),
        (
            "max_memory = \"64M\"",
            "#!/bin/sh\nperl -e '$x = \"x\" x (400*1024*1024); sleep 5; print length $x'\necho survived\n",
            "memory limit (max_memory = 64 MiB)",
        ),
    ] {
        let scene = Scene::new(body, |a| a.raw(keys), "none", identity);
        scene.w.config(&scene.scenario.clone().set("sandbox.caps", caps).toml());
        let baton = scene.start();
        let id = open_issue(&baton, "sandbox-limits").await;
        let job = baton.finished(&id).await;
        assert_eq!(job["state"], "failed", "caps = {caps}: {job}\n{}", scene.raw_log(&id));
        assert!(job["error"].as_str().unwrap().contains(reason), "caps = {caps}: {job}");
        assert_eq!(job["history"][0]["outcome"], "limit", "{job}");
    }
}

#[tokio::test]
async fn without_the_sandbox_baton_warns_at_start_and_on_every_job() {
    let w = Workdir::new();
    Scenario::new()
        .set("sandbox.enabled", false)
        .github(GitHub::secret(SECRET))
        .agent("noop", Agent::command(&["true"]))
        .trigger("work", Trigger::on(&["issues.opened"]).agent("noop").workspace("none").prompt("x"))
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    assert!(baton.log_text().contains("THE AGENT SANDBOX IS OFF"), "{}", baton.log_text());
    let id = open_issue(&baton, "sandbox-off").await;
    baton.finished(&id).await;
    let log = std::fs::read_to_string(w.path().join(".baton/jobs").join(&id).join("log")).unwrap();
    assert!(log.contains("WARNING: the sandbox is off"), "{log}");
}

#[test]
fn check_names_the_missing_package_and_points_at_bad_network_entries() {
    let w = Workdir::new();
    w.config("[agents.x]\ncommand = [\"x\"]\nnetwork = [\"api.example.com\", \"bad host:99\"]\n");
    let out = std::process::Command::new(BIN).args(["check"]).current_dir(w.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let file = w.path().join("baton.toml");
    assert!(
        stdout.contains(&format!("{}:3:31: agents.x.network: invalid network entry `bad host:99`", file.display())),
        "{stdout}"
    );

    // No bubblewrap on PATH: both check and serve say what to install.
    let empty = tempfile::tempdir().unwrap();
    w.config("[server]\nlisten = \"127.0.0.1:0\"\n");
    for cmd in [&["check"][..], &["serve"][..]] {
        let out =
            std::process::Command::new(BIN).args(cmd).current_dir(w.path()).env("PATH", empty.path()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {text}");
        assert!(text.contains("install the package `bubblewrap`"), "{cmd:?}: {text}");
    }
}

/// The sandbox's view, listed by an agent: what it must and must not see.
#[tokio::test]
async fn the_agent_sees_its_workspace_home_and_tmp_and_git_works() {
    let scene = Scene::new(
        "#!/bin/sh\necho \"home=$HOME\"\ntouch $HOME/h /tmp/t && echo writable\ngit log --oneline | wc -l\n\
         git status --porcelain | wc -l\necho edit >> README.md && git diff --stat | tail -1\n",
        identity,
        "none",
        identity,
    );
    let baton = scene.start();
    let id = open_issue(&baton, "sandbox-view").await;
    let job = baton.finished(&id).await;
    let log = scene.raw_log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("home=/home/agent") && log.contains("writable"), "{log}");
    assert!(log.contains("1 file changed, 1 insertion(+)"), "the agent's git works on its workspace: {log}");
}
