//! The sandbox's second and third rounds (issues 25 and 33), tested as an
//! attacker would: each test is an agent script that tries one way out,
//! and a check from outside that it failed while the job itself still ran
//! and reported.

use std::path::{Path, PathBuf};

use crate::fake_github::FakeGitHub;
use crate::harness::{
    bare_repo, eventually, eventually_or, fixture_json, git, processes_with_arg, unique_sleep, Baton, Workdir, BIN,
};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "escape-webhook-secret-0123456789";
const REPO: &str = "Codertocat/Hello-World";

/// A daemon built up for one attack: agents (scripts, where `@SHARED@` is a
/// folder they share with the test), triggers, and extra keys for
/// `[storage]` and `[sandbox]`.
struct Attack {
    w: Workdir,
    scenario: Scenario,
    /// Whether the daemon publishes (to a fake GitHub), with a token.
    publishes: bool,
}

impl Attack {
    /// The repository has a tracked `docs/` folder besides its README.
    fn new() -> Attack {
        Attack::with_files(&[("README.md", "hello\n"), ("docs/guide.md", "the guide\n")])
    }

    /// The repository holds `files`.
    fn with_files(files: &[(&str, &str)]) -> Attack {
        let w = Workdir::new();
        bare_repo(&w.path().join("remote"), REPO, "master", files);
        let scenario = Scenario::new().github(GitHub::secret(SECRET).repos(&w.path().join("remote")));
        Attack { w, scenario, publishes: false }
    }

    fn shared(&self) -> &Path {
        self.w.shared()
    }

    /// Agent `name` runs `body` (a script), with `keys` in its definition.
    fn agent(mut self, name: &str, body: &str, keys: &str) -> Attack {
        let body = body.replace("@SHARED@", &self.shared().display().to_string());
        let script = self.w.script(&format!("{name}.sh"), &body);
        let agent = Agent::script(&script).set("timeout", "2m").read_write(&[self.shared()]).raw(keys);
        self.scenario = self.scenario.agent(name, agent);
        self
    }

    /// Trigger `name` runs `agent` on `on` in a default-branch workspace.
    fn trigger(self, name: &str, on: &str, agent: &str, output: &str) -> Attack {
        self.w.trigger(name, &work(on, agent, output).toml());
        self
    }

    fn storage(mut self, toml: &str) -> Attack {
        self.scenario = self.scenario.raw(&format!("[storage]\n{toml}"));
        self
    }

    fn sandbox(mut self, toml: &str) -> Attack {
        self.scenario = self.scenario.raw(&format!("[sandbox]\n{toml}"));
        self
    }

    /// Publishes to `fake`, with a token.
    fn publish_to(mut self, fake: &FakeGitHub) -> Attack {
        self.scenario = self.scenario.github(GitHub::secret(SECRET).api(fake).token("env:GITHUB_TOKEN"));
        self.publishes = true;
        self
    }

    fn write_config(&self) {
        self.w.config(&self.scenario.toml());
    }

    fn start(&self) -> Baton {
        self.write_config();
        // A token only where the test publishes (to its fake GitHub).
        let token = [("GITHUB_TOKEN", "ghs_escapeTestToken000000000000000")];
        Baton::start(self.w.path(), if self.publishes { &token } else { &[] })
    }

    fn storage_dir(&self) -> PathBuf {
        self.w.path().join(".baton")
    }

    /// The job's log as it is on disk.
    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.storage_dir().join("jobs").join(id).join("log")).unwrap_or_default()
    }
}

/// Runs `agent` on `on` in a default-branch workspace, once.
fn work(on: &str, agent: &str, output: &str) -> Trigger {
    Trigger::on(&[on]).agent(agent).workspace("default-branch").prompt("work").job("attempts", 1).output(output)
}

/// Opens issue #1 (a delivery of its own); returns the job.
async fn open_issue(baton: &Baton, delivery: &str) -> String {
    deliver(baton, "issues", "issues/opened.payload.json", delivery).await
}

async fn deliver(baton: &Baton, event: &str, fixture: &str, delivery: &str) -> String {
    let body = fixture_json(fixture).to_string();
    let (status, answer) = baton.deliver(SECRET, event, delivery, body.as_bytes()).await;
    assert_eq!(status, 202, "{answer}");
    answer["jobs"][0].as_str().expect("a job").to_string()
}

/// The syscall numbers the attacks need, by architecture (`$PTRACE` …).
const SYSCALLS: &str = r#"case $(uname -m) in
  aarch64) PTRACE=117; KEYCTL=219; ADD_KEY=217; IO_URING_SETUP=425 ;;
  *) PTRACE=101; KEYCTL=250; ADD_KEY=248; IO_URING_SETUP=425 ;;
esac"#;

#[tokio::test]
async fn an_agent_cannot_write_host_kernel_settings() {
    let a = Attack::new()
        .agent(
            "script",
            "#!/bin/sh\n\
             for f in /proc/sys/vm/stat_interval /proc/sys/kernel/core_pattern /proc/sysrq-trigger; do\n\
               if printf '%s\\n' '|/workspace/x.sh' > $f 2>/dev/null; then echo \"WROTE $f\"; else echo \"refused $f\"; fi\n\
             done\necho 'the job ran'\n",
            "",
        )
        .trigger("work", "issues.opened", "script", "none");
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let before = (read("/proc/sys/vm/stat_interval"), read("/proc/sys/kernel/core_pattern"));
    let baton = a.start();
    let id = open_issue(&baton, "sysctl").await;
    let job = baton.finished(&id).await;
    let log = a.log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("the job ran") && !log.contains("WROTE"), "{log}");
    assert_eq!((read("/proc/sys/vm/stat_interval"), read("/proc/sys/kernel/core_pattern")), before);
}

#[tokio::test]
async fn ptrace_of_pid_1_the_init_and_the_agents_parent_fails_and_the_init_ignores_signals() {
    let body = format!(
        r#"#!/bin/bash
{SYSCALLS}
attach() {{ perl -e 'my $r = syscall($ARGV[0], 16, $ARGV[1], 0, 0); print $r == 0 ? "ATTACHED $ARGV[1]\n" : "ptrace $ARGV[1]: $!\n"' $PTRACE $1; }}
attach 1
echo "init: $(tr '\0' ' ' < /proc/1/cmdline)"
bash -c "$(declare -f attach); PTRACE=$PTRACE; attach \$PPID"
if [ -x /usr/bin/gdb ]; then gdb -p 1 -batch -ex 'call (int)prctl(1,0,0,0,0)' 2>&1 | tail -1; fi
kill -STOP 1; kill -KILL 1
echo "init state: $(cut -d' ' -f3 /proc/1/stat)"
echo 'the job ran'
"#
    );
    let a = Attack::new().agent("script", &body, "").trigger("work", "issues.opened", "script", "none");
    let baton = a.start();
    let id = open_issue(&baton, "ptrace").await;
    let job = baton.finished(&id).await;
    let log = a.log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("init: /run/baton/init sandbox-init"), "pid 1 is baton's init: {log}");
    assert!(!log.contains("ATTACHED"), "{log}");
    let refused = log.lines().filter(|l| l.starts_with("ptrace ") && l.ends_with(": Operation not permitted")).count();
    assert_eq!(refused, 2, "pid 1 and the agent's parent: {log}");
    assert!(log.contains("init state: S") || log.contains("init state: R"), "the init neither stopped nor died: {log}");
    assert!(log.contains("[baton] the sandbox refused ptrace"), "named in the job's log: {log}");
    assert!(log.contains("the job ran"), "{log}");
}

/// In cgroup mode and in rlimit mode: an agent that tries the `gdb` prctl
/// trick and leaves a `setsid` child is gone, child and all, once the
/// daemon is killed.
#[tokio::test]
async fn nothing_an_agent_starts_outlives_a_killed_daemon() {
    for caps in ["auto", "rlimits"] {
        let marker = unique_sleep();
        let body = format!(
            "#!/bin/sh\n\
             if [ -x /usr/bin/gdb ]; then gdb -p 1 -batch -ex 'call (int)prctl(1,0,0,0,0)' >/dev/null 2>&1; fi\n\
             setsid sh -c 'while :; do date >> /workspace/survivor; sleep {marker}; done' </dev/null >/dev/null 2>&1 &\n\
             touch @SHARED@/ready\nsleep {marker}\n"
        );
        let a = Attack::new()
            .agent("script", &body, "")
            .trigger("work", "issues.opened", "script", "none")
            .sandbox(&format!("caps = \"{caps}\""));
        let mut baton = a.start();
        open_issue(&baton, "survivor").await;
        eventually("the agent to start its child", || a.shared().join("ready").exists()).await;
        // `ready` comes before either `sleep` has been exec'd: wait for both,
        // the agent's and its setsid child's, so the kill finds them running.
        eventually(&format!("caps = {caps}: the agent and its child to sleep"), || {
            processes_with_arg(&marker).len() >= 2
        })
        .await;
        baton.kill9();
        eventually("nothing of the sandbox to be left", || processes_with_arg(&marker).is_empty()).await;
    }
}

/// One pooled workspace: `plant` runs in it on an opened issue, then `look`
/// on a labelled one, in the same slot reset between them. Both succeed;
/// returns the attack and what `look` printed.
async fn plant_then_look(a: Attack, plant: &str, look: &str) -> (Attack, String) {
    let a = a
        .agent("planter", plant, "")
        .agent("looker", look, "")
        .trigger("plant", "issues.opened", "planter", "none")
        .trigger("look", "issues.labeled", "looker", "none")
        .storage("worktree_pool = 1");
    let baton = a.start();
    let first = open_issue(&baton, "plant-1").await;
    assert_eq!(baton.finished(&first).await["state"], "succeeded", "{}", a.log(&first));
    let second = deliver(&baton, "issues", "issues/labeled.payload.json", "look-1").await;
    let job = baton.finished(&second).await;
    let log = a.log(&second);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("(a recycled worktree, reset)"), "the same slot: {log}");
    (a, log)
}

#[tokio::test]
async fn a_recycled_workspace_keeps_no_nested_git_fifo_or_mode_of_the_job_before() {
    let plant = r#"#!/bin/sh
mkdir -p docs/.git/objects docs/.git/refs
echo 'ref: refs/heads/master' > docs/.git/HEAD
printf '[core]\n\trepositoryformatversion = 0\n\tfsmonitor = "touch @SHARED@/pwned; false"\n' > docs/.git/config
mkfifo docs/trap.fifo
chmod 777 . docs; chmod 4777 README.md
echo planted
"#;
    let look = r#"#!/bin/sh
echo "nested: $(find . -mindepth 2 -name .git | tr '\n' ' ')"
echo "fifos: $(find . -type p | tr '\n' ' ')"
echo "modes: $(stat -c '%a' . docs README.md | tr '\n' ' ')"
(cd docs && git status --short >/dev/null 2>&1)
echo looked
"#;
    let (a, log) = plant_then_look(Attack::new(), plant, look).await;
    let line = |key: &str| log.lines().find(|l| l.starts_with(key)).unwrap_or_default().trim().to_string();
    assert_eq!(line("nested:"), "nested:", "{log}");
    assert_eq!(line("fifos:"), "fifos:", "{log}");
    assert_eq!(line("modes:"), "modes: 755 755 644", "{log}");
    assert!(!a.shared().join("pwned").exists(), "the planted fsmonitor ran in the next job");
}

/// An agent swaps a tracked folder of many files for a symlink to a folder
/// outside its workspace. The next job's reset, which checks the tree out
/// as baton (root, when baton runs as root) with parallel workers, must
/// write the folder back in the workspace, never through the link.
#[tokio::test]
async fn a_tracked_folder_swapped_for_a_symlink_is_checked_out_in_place_not_through_it() {
    let names: Vec<String> = (0..150).map(|n| format!("docs/f{n:03}.md")).collect();
    let mut files: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "tracked\n")).collect();
    files.push(("README.md", "hello\n"));
    let plant = r#"#!/bin/sh
mkdir -p @SHARED@/outside
rm -rf docs && ln -s @SHARED@/outside docs
echo planted
"#;
    let look = r#"#!/bin/sh
[ -L docs ] && echo "docs: a link" || echo "docs: $(ls docs | wc -l) files"
echo looked
"#;
    let (a, log) = plant_then_look(Attack::with_files(&files), plant, look).await;
    assert!(log.contains("docs: 150 files"), "{log}");
    let outside: Vec<_> =
        std::fs::read_dir(a.shared().join("outside")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(
        outside.is_empty(),
        "the reset wrote through the link: {:?}",
        outside.iter().map(|e| e.file_name()).collect::<Vec<_>>()
    );
}

/// 1.5 GB into `/tmp` under `max_memory = "512M"`, with a cgroup and with
/// rlimits: `/tmp` never holds more than the cap.
#[tokio::test]
async fn tmp_holds_no_more_than_max_memory_in_either_cap_mode() {
    for caps in ["auto", "rlimits"] {
        let body = "#!/bin/sh\ndd if=/dev/zero of=/tmp/fill bs=1M count=1536 2>&1 | tail -1\n\
                    echo \"held $(stat -c %s /tmp/fill)\"\nsleep 1\necho done\n";
        let a = Attack::new()
            .agent("script", body, "max_memory = \"512M\"")
            .trigger("work", "issues.opened", "script", "none")
            .sandbox(&format!("caps = \"{caps}\""));
        let baton = a.start();
        let id = open_issue(&baton, "tmp-fill").await;
        let job = baton.finished(&id).await;
        let log = a.log(&id);
        let held: u64 = log.lines().find_map(|l| l.strip_prefix("held ")?.trim().parse().ok()).unwrap_or(0);
        assert!(held <= 512 << 20, "caps = {caps}: /tmp held {held} bytes: {job}\n{log}");
        if job["state"] == "failed" {
            assert_eq!(job["history"][0]["outcome"], "limit", "caps = {caps}: {job}\n{log}");
            assert!(job["error"].as_str().unwrap_or_default().contains("max_memory"), "{job}");
        } else {
            assert!(log.contains("No space left on device"), "caps = {caps}: {log}");
        }
    }
}

#[tokio::test]
async fn a_run_past_max_disk_fails_naming_max_disk() {
    let a = Attack::new()
        .agent(
            "script",
            "#!/bin/sh\ndd if=/dev/zero of=big bs=1M count=100 2>/dev/null\necho wrote\n",
            "max_disk = \"64M\"",
        )
        .trigger("work", "issues.opened", "script", "none");
    let baton = a.start();
    let id = open_issue(&baton, "disk").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed", "{job}\n{}", a.log(&id));
    assert_eq!(job["history"][0]["outcome"], "limit", "{job}");
    assert!(job["error"].as_str().unwrap_or_default().contains("max_disk = 64 MiB"), "{job}");
}

#[tokio::test]
async fn a_run_past_max_files_fails_naming_max_files() {
    let a = Attack::new()
        .agent(
            "script",
            "#!/bin/sh\nmkdir many && cd many && perl -e 'for (1..300000) { open my $f, \">\", \"f$_\" or die \"$!\" }'\n\
             echo made\n",
            "max_files = 100000",
        )
        .trigger("work", "issues.opened", "script", "none");
    let baton = a.start();
    let id = open_issue(&baton, "files").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed", "{job}\n{}", a.log(&id));
    assert_eq!(job["history"][0]["outcome"], "limit", "{job}");
    assert!(job["error"].as_str().unwrap_or_default().contains("max_files = 100000"), "{job}");
}

#[tokio::test]
async fn mountinfo_names_no_host_path_of_the_storage_folder() {
    let a = Attack::new().agent("script", "#!/bin/sh\ncat /proc/self/mountinfo\necho \"cwd=$PWD\"\n", "").trigger(
        "work",
        "issues.opened",
        "script",
        "none",
    );
    let baton = a.start();
    let id = open_issue(&baton, "mountinfo").await;
    let job = baton.finished(&id).await;
    let log = a.log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("cwd=/workspace") && log.contains(" /workspace "), "{log}");
    let storage = a.storage_dir().display().to_string();
    let agent_output = log.split("running agent").nth(1).unwrap_or_default();
    assert!(!agent_output.contains(&storage), "mountinfo names the storage folder {storage}:\n{agent_output}");
    assert!(!agent_output.contains(&id), "mountinfo names the job:\n{agent_output}");
}

/// `socket(AF_VSOCK)` (and other families) and io_uring fail with the
/// filter's errno, with and without a network.
#[tokio::test]
async fn other_socket_families_and_io_uring_fail_networked_or_not() {
    let body = format!(
        r#"#!/bin/bash
{SYSCALLS}
perl -e 'for my $f (40, 17, 31, 38) {{ if (socket(my $s, $f, 2, 0)) {{ print "OPENED family $f\n" }} else {{ print "family $f: $!\n" }} }}'
perl -e 'my $r = syscall($ARGV[0], 8, 0); print "io_uring_setup: ", ($r >= 0 ? "OPENED" : "$!"), "\n"' $IO_URING_SETUP
perl -e 'use Socket; socket(my $s, AF_INET, SOCK_STREAM, 0) or die; print "inet ok\n"'
"#
    );
    for network in ["[]", "[\"127.0.0.1:9\"]"] {
        let a = Attack::new().agent("script", &body, &format!("network = {network}")).trigger(
            "work",
            "issues.opened",
            "script",
            "none",
        );
        let baton = a.start();
        let id = open_issue(&baton, "families").await;
        let job = baton.finished(&id).await;
        let log = a.log(&id);
        assert_eq!(job["state"], "succeeded", "network = {network}: {job}\n{log}");
        assert!(!log.contains("OPENED"), "network = {network}: {log}");
        assert_eq!(log.matches("Address family not supported by protocol").count(), 4, "{log}");
        assert!(log.contains("io_uring_setup: Operation not permitted"), "{log}");
        assert!(log.contains("inet ok"), "ordinary sockets still work: {log}");
        assert!(log.contains("[baton] the sandbox refused socket(AF_VSOCK)"), "{log}");
        assert!(log.contains("[baton] the sandbox refused io_uring_setup"), "{log}");
    }
}

/// The daemon's session keyring holds a canary; the agent sees nothing of
/// it, and what one job tries to add is not there for the next.
#[tokio::test]
async fn the_daemons_keyring_is_out_of_view_and_a_jobs_key_does_not_outlive_it() {
    const CANARY: &str = "CANARY-KEY-4c1f9e0d-never-seen-by-agents";
    let body = format!(
        r#"#!/bin/bash
{SYSCALLS}
echo "keys: $(cat /proc/keys 2>&1 | tr '\n' ' ')"
# (perl's syscall wants its string arguments in variables)
perl -e 'my ($t, $d) = ("user", "baton-canary"); my $r = syscall($ARGV[0], 10, -3, $t, $d, 0); print "search: ", ($r >= 0 ? "FOUND $r" : "$!"), "\n"' $KEYCTL
perl -e 'my ($t, $d, $v) = ("user", "left-by-job", "x"); my $r = syscall($ARGV[0], $t, $d, $v, 1, -3); print "add: ", ($r >= 0 ? "ADDED $r" : "$!"), "\n"' $ADD_KEY
perl -e 'my ($t, $d) = ("user", "left-by-job"); my $r = syscall($ARGV[0], 10, -3, $t, $d, 0); print "left: ", ($r >= 0 ? "FOUND $r" : "$!"), "\n"' $KEYCTL
echo 'the job ran'
"#
    );
    // The daemon starts in a session keyring of its own holding the canary.
    let wrapper = format!(
        r#"{SYSCALLS}
perl -e 'my ($s, $t, $d, $v) = ("baton-test", "user", "baton-canary", $ARGV[2]);
         syscall($ARGV[0], 1, $s) >= 0 or die "join: $!";
         syscall($ARGV[1], $t, $d, $v, length $v, -3) >= 0 or die "add: $!"' $KEYCTL $ADD_KEY {CANARY}
exec "$@""#
    );
    let probe = std::process::Command::new("bash")
        .args(["-c", &wrapper, "wrapper", "cat", "/proc/keys"])
        .output()
        .expect("bash");
    assert!(String::from_utf8_lossy(&probe.stdout).contains("baton-canary"), "the wrapper holds the canary: {probe:?}");

    let a = Attack::new().agent("script", &body, "").trigger("work", "issues.opened", "script", "none");
    a.write_config();
    let baton = Baton::start_under(a.w.path(), &[], &["bash", "-c", &wrapper, "wrapper"]);
    for delivery in ["keys-1", "keys-2"] {
        let id = open_issue(&baton, delivery).await;
        let job = baton.finished(&id).await;
        let log = a.log(&id);
        assert_eq!(job["state"], "succeeded", "{job}\n{log}");
        assert!(log.contains("the job ran"), "{log}");
        assert!(!log.contains(CANARY) && !log.contains("baton-canary") && !log.contains("FOUND"), "{log}");
        assert!(!log.contains("ADDED"), "{log}");
        assert!(
            log.contains("search: Operation not permitted") && log.contains("add: Operation not permitted"),
            "{log}"
        );
        assert!(log.contains("[baton] the sandbox refused keyctl"), "{log}");
    }
}

/// A fake GitHub and a trigger whose agent's change becomes a pull request.
async fn publishing(body: &str, extra_storage: &str) -> (FakeGitHub, Attack) {
    let fake = FakeGitHub::start().await;
    let a = Attack::new()
        .agent("script", body, "")
        .trigger("work", "issues.opened", "script", "pull_request")
        .storage(&format!("worktree_pool = 1\n{extra_storage}"))
        .publish_to(&fake);
    (fake, a)
}

#[tokio::test]
async fn a_fifo_behind_a_gitdir_file_never_hangs_publishing_and_the_slot_is_reused() {
    let body = "#!/bin/sh\nif [ -e @SHARED@/once ]; then echo second > SECOND.md; echo second; exit 0; fi\n\
                touch @SHARED@/once\nmkdir -p hang/g && printf 'gitdir: g\\n' > hang/.git && mkfifo hang/g/HEAD\n\
                echo change > CHANGED.md\necho first\n";
    let (fake, a) = publishing(body, "").await;
    let baton = a.start();
    let first = open_issue(&baton, "fifo-1").await;
    let job = baton.finished(&first).await;
    let log = a.log(&first);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(job["branch"].is_string(), "{job}");
    assert!(log.contains("removed from the workspace before staging: hang/.git"), "{log}");
    assert!(log.contains("hang/g/HEAD (a FIFO)"), "{log}");
    let second = open_issue(&baton, "fifo-2").await;
    let job = baton.finished(&second).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", a.log(&second));
    assert!(a.log(&second).contains("(a recycled worktree, reset)"));
    eventually("two pull requests", || fake.posts("/repos/Codertocat/Hello-World/pulls").len() == 2).await;
}

/// Staging 800 MB of random bytes (under the trigger's `max_push_bytes`)
/// keeps git compressing for many seconds: a cancel while it runs ends the
/// job at once, and so does `storage.git_timeout`.
#[tokio::test]
async fn a_cancel_reaches_publishing_and_git_has_a_bounded_time() {
    let body = "#!/bin/sh\nhead -c 800000000 /dev/urandom > slow.bin\necho done\n";
    let trigger =
        &work("issues.opened", "script", "pull_request").set("output.max_push_bytes", 2_000_000_000i64).toml();
    let (_fake, a) = publishing(body, "").await;
    a.w.trigger("work", trigger);
    let baton = a.start();
    let id = open_issue(&baton, "slow-1").await;
    eventually("the agent to end and staging to start", || a.log(&id).contains("agent exited with status 0")).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let started = std::time::Instant::now();
    let (status, _) = baton.post(&format!("/api/jobs/{id}/cancel")).await;
    assert!(status < 300, "{status}");
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "cancelled", "{job}\n{}", a.log(&id));
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "the cancel took {:?}", started.elapsed());

    let (_fake, a) = publishing(body, "git_timeout = \"3s\"").await;
    a.w.trigger("work", trigger);
    let baton = a.start();
    let id = open_issue(&baton, "slow-2").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed", "{job}\n{}", a.log(&id));
    assert!(job["error"].as_str().unwrap_or_default().contains("timed out after 3s"), "{job}");
}

#[tokio::test]
async fn a_gitdir_file_naming_a_host_repository_pushes_no_gitlink() {
    // A repository the sandbox cannot see, whose commit must not leave.
    let host = tempfile::tempdir().unwrap();
    git(host.path(), &["init", "--quiet"]);
    std::fs::write(host.path().join("secret.txt"), "host secret\n").unwrap();
    git(host.path(), &["add", "."]);
    git(host.path(), &["-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "--quiet", "-m", "host"]);
    let host_head = git(host.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let body = format!(
        "#!/bin/sh\nmkdir leak && printf 'gitdir: {}/.git\\n' > leak/.git && echo x > leak/file\n\
         echo change > CHANGED.md\necho done\n",
        host.path().display()
    );
    let (fake, a) = publishing(&body, "").await;
    let baton = a.start();
    let id = open_issue(&baton, "gitlink").await;
    let job = baton.finished(&id).await;
    let log = a.log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("leak/.git (a nested repository's .git)"), "{log}");
    let branch = job["branch"].as_str().expect("a branch").to_string();
    let remote = a.w.path().join("remote/Codertocat/Hello-World.git");
    let tree = git(&remote, &["ls-tree", "-r", &branch]);
    assert!(!tree.contains("160000") && !tree.contains(&host_head), "{tree}");
    assert!(tree.contains("CHANGED.md") && tree.contains("leak/file"), "{tree}");
    eventually("the pull request", || fake.posts("/repos/Codertocat/Hello-World/pulls").len() == 1).await;
}

/// Removes a file it planted in the host's `/etc`.
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn etc_shows_only_what_tools_need() {
    // Readable by anyone on the host: only the allowlist keeps it out.
    let planted = Planted(PathBuf::from(format!("/etc/baton-escape-test-{}.conf", std::process::id())));
    std::fs::write(&planted.0, "PLANTED-IN-ETC\n").expect("tests run as root: they plant a file in /etc");
    let body = format!(
        "#!/bin/sh\ncat {} 2>&1\nls /etc/security 2>&1\ngrep '^agent:' /etc/passwd\n\
         test -r /etc/resolv.conf && echo resolv-ok\n\
         test -r /etc/ssl/certs/ca-certificates.crt && echo ca-ok\necho 'the job ran'\n",
        planted.0.display()
    );
    let a = Attack::new().agent("script", &body, "").trigger("work", "issues.opened", "script", "none");
    let baton = a.start();
    let id = open_issue(&baton, "etc").await;
    let job = baton.finished(&id).await;
    let log = a.log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(!log.contains("PLANTED-IN-ETC") && log.contains("No such file or directory"), "{log}");
    assert!(!log.contains("opasswd") && !log.contains("limits.conf"), "/etc/security is not shown: {log}");
    assert!(log.contains(":/home/agent:/bin/sh"), "the generated passwd: {log}");
    if Path::new("/etc/resolv.conf").exists() {
        assert!(log.contains("resolv-ok"), "{log}");
    }
    if Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        assert!(log.contains("ca-ok"), "{log}");
    }
}

#[test]
fn check_says_which_uid_agents_run_as() {
    let w = Workdir::new();
    w.config("[server]\nlisten = \"127.0.0.1:0\"\n");
    let out = std::process::Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } == 0 {
        assert!(text.contains("ok: agents run sandboxed as uid 65534"), "{text}");
    } else {
        assert!(text.contains("the daemon's own"), "{text}");
    }
    w.config("[server]\nlisten = \"127.0.0.1:0\"\n[sandbox]\nuser = \"root\"\n");
    let out = std::process::Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains("baton.toml:4:8: sandbox.user: `root` is root"), "{text}");
    }
}

#[tokio::test]
async fn below_min_free_webhooks_are_still_acknowledged_and_no_agent_starts() {
    let a = Attack::new()
        .agent("script", "#!/bin/sh\necho ran\n", "")
        .trigger("work", "issues.opened", "script", "none")
        .storage("min_free = \"1000000T\"");
    let mut baton = a.start();
    let id = open_issue(&baton, "low-1").await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(baton.job(&id).await["state"], "queued", "no agent starts below min_free");
    let (_, metrics) = baton.get("/metrics").await;
    assert!(metrics.as_str().unwrap_or_default().contains("baton_agents_paused 1\n"), "{metrics}");
    let (_, page) = baton.get("/").await;
    assert!(page.as_str().unwrap_or_default().contains("below storage.min_free"), "the dashboard says why");
    baton.kill9();
    // With room again, the acknowledged job runs.
    let config = std::fs::read_to_string(a.w.path().join("baton.toml")).unwrap().replace("1000000T", "0");
    std::fs::write(a.w.path().join("baton.toml"), config).unwrap();
    let baton = Baton::start(a.w.path(), &[]);
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
}

/// A tmpfs mounted at a test's folder, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(status.success(), "tests run as root: they mount a small disk for the storage folder");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// On a storage folder's disk that runs short: the run filling it is
/// stopped, naming `storage.min_free`; once it is full, a webhook the store
/// cannot write is answered 503, and every one answered 202 is there after
/// a restart.
#[tokio::test]
async fn a_disk_running_short_stops_the_run_filling_it_and_never_acknowledges_what_it_cannot_keep() {
    let body =
        "#!/bin/sh\nfor i in $(seq 40); do dd if=/dev/zero of=fill.$i bs=1M count=8 2>/dev/null; sleep 0.2; done\n\
                echo wrote\n";
    let a = Attack::new()
        .agent("script", body, "")
        .trigger("work", "issues.opened", "script", "none")
        .storage("path = \"store\"\nmin_free = \"128M\"");
    let disk = Tmpfs::mount(&a.w.path().join("store"), "384M");
    let mut baton = a.start();
    let id = open_issue(&baton, "filler").await;
    let job = baton.finished(&id).await;
    assert_eq!(
        job["state"],
        "failed",
        "{job}\n{}",
        std::fs::read_to_string(disk.0.join("jobs").join(&id).join("log")).unwrap_or_default()
    );
    assert_eq!(job["history"][0]["outcome"], "limit", "{job}");
    assert!(job["error"].as_str().unwrap_or_default().contains("storage.min_free"), "{job}");

    // Fill the disk to the last byte.
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(disk.0.join("ballast")).unwrap();
        let chunk = vec![1u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let small = [1u8; 512];
        while f.write_all(&small).is_ok() {}
    }
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for n in 0..400 {
        let delivery = format!("full-{n}");
        let body = fixture_json("issues/opened.payload.json").to_string();
        let (status, answer) = baton.deliver(SECRET, "issues", &delivery, body.as_bytes()).await;
        match status {
            202 => acknowledged.push(delivery),
            503 => refused += 1,
            other => panic!("a full disk is answered 202 or 503, not {other}: {answer}"),
        }
        if refused >= 3 {
            break;
        }
    }
    assert!(refused >= 3, "a full disk refuses what it cannot keep ({} acknowledged)", acknowledged.len());
    baton.kill9();
    std::fs::remove_file(disk.0.join("ballast")).unwrap();
    let baton = Baton::start(a.w.path(), &[]);
    for delivery in &acknowledged {
        let (_, jobs) = baton.get(&format!("/api/jobs?delivery={delivery}")).await;
        assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(1), "{delivery} was acknowledged and lost");
    }
}

/// Folders 22,000 deep in the workspace, `HOME` and the io folder: a
/// recursive walk would overflow the daemon's stack. The job ends, the
/// daemon lives, and nothing of the tree is left.
#[tokio::test]
async fn a_tree_deeper_than_any_stack_neither_kills_the_daemon_nor_survives_the_job() {
    let body = "#!/bin/sh\n\
                for d in /workspace/deep $HOME/deep /run/baton/io/deep; do\n\
                  perl -e 'mkdir $ARGV[0] or die; chdir $ARGV[0]; for (1..22000) { mkdir \"a\" or die \"$!\"; chdir \"a\" or die }' $d\n\
                done\necho deep\n";
    let a = Attack::new()
        .agent("script", body, "")
        .trigger("work", "issues.opened", "script", "none")
        .storage("worktree_pool = 1");
    let baton = a.start();
    let first = open_issue(&baton, "deep-1").await;
    let job = baton.finished(&first).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", a.log(&first));
    let second = open_issue(&baton, "deep-2").await;
    let job = baton.finished(&second).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", a.log(&second));
    let (status, _) = baton.get("/healthz").await;
    assert_eq!(status, 200, "the daemon lives");
    // The slot was reset, or (git cannot clean that deep) made anew.
    let pool = a.storage_dir().join("pool/Codertocat/Hello-World");
    for slot in std::fs::read_dir(&pool).unwrap().flatten() {
        assert!(!slot.path().join("work/deep").exists(), "the tree outlived its job");
    }
    assert!(!a.storage_dir().join("jobs").join(&first).join("io").exists(), "the io folder went with its attempt");
}

/// Space no walk of the folders finds: a file behind 18 names of 250
/// characters (longer than any path a system call takes), one held open
/// after it was unlinked, and one in the io folder.
#[tokio::test]
async fn disk_the_agent_hides_from_a_walk_still_counts_against_max_disk() {
    for (what, body) in [
        (
            "deep",
            "#!/bin/sh\nperl -e 'my $n = \"d\" x 250; for (1..18) { mkdir $n or die; chdir $n or die } \
             open my $f, \">\", \"big\" or die; print $f \"x\" x (1 << 20) for 1..100; close $f'\necho wrote\n",
        ),
        (
            "unlinked",
            "#!/bin/sh\nperl -e 'open my $f, \">\", \"big\" or die; print $f \"x\" x (1 << 20) for 1..100; \
             unlink \"big\"; sleep 4'\necho wrote\n",
        ),
        ("io", "#!/bin/sh\ndd if=/dev/zero of=/run/baton/io/big bs=1M count=100 2>/dev/null\necho wrote\n"),
    ] {
        let a = Attack::new().agent("script", body, "max_disk = \"64M\"").trigger(
            "work",
            "issues.opened",
            "script",
            "none",
        );
        let baton = a.start();
        let id = open_issue(&baton, what).await;
        let job = baton.finished(&id).await;
        assert_eq!(job["state"], "failed", "{what}: {job}\n{}", a.log(&id));
        assert_eq!(job["history"][0]["outcome"], "limit", "{what}: {job}");
        assert!(job["error"].as_str().unwrap_or_default().contains("max_disk = 64 MiB"), "{what}: {job}");
    }
}

/// A change over `max_push_bytes` is refused before baton's git reads it:
/// nothing of it lands in the slot's repository, which keeps nothing of
/// its own between jobs.
#[tokio::test]
async fn a_change_too_large_to_push_is_never_read_into_batons_repository() {
    let body = "#!/bin/sh\nhead -c 40000000 /dev/urandom > big.bin\necho wrote\n";
    let (_fake, a) = publishing(body, "").await;
    a.w.trigger(
        "work",
        &work("issues.opened", "script", "pull_request").set("output.max_push_bytes", 1_000_000).toml(),
    );
    let baton = a.start();
    for delivery in ["big-1", "big-2"] {
        let id = open_issue(&baton, delivery).await;
        let job = baton.finished(&id).await;
        assert_eq!(job["state"], "failed", "{job}\n{}", a.log(&id));
        assert!(job["error"].as_str().unwrap_or_default().contains("max_push_bytes"), "{job}");
    }
    let pool = a.storage_dir().join("pool/Codertocat/Hello-World");
    for slot in std::fs::read_dir(&pool).unwrap().flatten() {
        let held = dir_size(&slot.path().join("git/objects"));
        assert!(held < 1_000_000, "the slot's repository holds {held} bytes");
    }
}

/// An agent allowed everywhere (`network = ["*"]`) still reaches neither
/// baton's own API on loopback nor the host's other addresses.
#[tokio::test]
async fn a_wildcard_allowlist_does_not_reach_the_host_or_batons_api() {
    let a = Attack::new()
        .agent(
            "script",
            "#!/bin/sh\necho \"api: $(curl -sS -m 10 http://127.0.0.1:@PORT@/api/jobs 2>&1 | head -c 300)\"\n\
             echo \"tunnel: $(curl -sS -m 10 --proxytunnel http://127.0.0.1:@PORT@/healthz 2>&1 | head -c 300)\"\n\
             echo \"localhost: $(curl -sS -m 10 http://localhost:@PORT@/healthz 2>&1 | head -c 300)\"\n",
            "network = [\"*\"]",
        )
        .trigger("work", "issues.opened", "script", "none");
    // The port is known once the daemon listens: the script reads it from
    // the shared folder.
    let script = a.w.path().join("script.sh");
    let body = std::fs::read_to_string(&script).unwrap().replace("@PORT@", "$(cat @SHARED@/port)");
    let body = body.replace("@SHARED@", &a.shared().display().to_string());
    a.w.script("script.sh", &body);
    let baton = a.start();
    let port = baton.url.rsplit(':').next().unwrap().to_string();
    std::fs::write(a.shared().join("port"), &port).unwrap();
    let id = open_issue(&baton, "wildcard").await;
    let job = baton.finished(&id).await;
    let log = a.log(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(!log.contains("\"jobs\"") && !log.contains("\"ok\""), "baton's API answered: {log}");
    assert_eq!(log.matches("an address of this host or its network").count(), 2, "{log}");
    assert!(log.contains("tunnel: curl: (56) CONNECT tunnel failed, response 403"), "{log}");
}

/// Thousands of connections held open to the run's proxy take no more
/// than the run's share of the daemon's descriptors, and the daemon keeps
/// answering.
#[tokio::test]
async fn holding_the_proxy_open_does_not_starve_the_daemon() {
    // Non-blocking: a full accept queue fails a connect instead of holding it.
    let body = "#!/bin/sh\nperl -e 'use Socket; use Fcntl; $SIG{PIPE} = \"IGNORE\"; my @s; for (1..2000) { socket(my $s, PF_UNIX, SOCK_STREAM, 0) or last; \
                fcntl($s, F_SETFL, O_NONBLOCK); \
                connect($s, pack_sockaddr_un(\"/run/baton/proxy.sock\")) or next; send($s, \"x\", 0); push @s, $s } \
                open my $f, \">\", \"@SHARED@/held\"; print $f scalar(@s); close $f; sleep 30'\n";
    let a = Attack::new().agent("script", body, "network = [\"127.0.0.1:9\"]").trigger(
        "work",
        "issues.opened",
        "script",
        "none",
    );
    let baton = a.start();
    let id = open_issue(&baton, "fds").await;
    eventually_or("the agent to hold its connections", || a.shared().join("held").exists(), || a.log(&id)).await;
    let fds = std::fs::read_dir(format!("/proc/{}/fd", baton.pid())).unwrap().count();
    assert!(fds < 1000, "the daemon holds {fds} descriptors");
    let (status, _) = baton.get("/healthz").await;
    assert_eq!(status, 200);
    let (status, _) = baton.post(&format!("/api/jobs/{id}/cancel")).await;
    assert!(status < 300);
    assert_eq!(baton.finished(&id).await["state"], "cancelled");
}

/// The bytes the files under `dir` take (links not followed).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}
