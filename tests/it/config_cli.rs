//! Configuration and the command line: built-in defaults that serve,
//! `path:line:col` errors at start, `baton check`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::harness::{fixture, Baton, Workdir, BIN};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

#[tokio::test]
async fn built_in_defaults_serve_with_a_generated_secret_and_publishing_off() {
    // Every built-in default (127.0.0.1:8787, ./.baton, ./triggers, no
    // secret, no token); the file only adds an agent that exists here.
    let w = Workdir::new();
    w.trigger("echo", "on = [\"issues.opened\"]\n[job]\nagent = \"shell\"\nworkspace = \"none\"\nprompt = \"hi\"\n");
    let baton = {
        std::fs::write(w.path().join("baton.toml"), "[agents.shell]\ncommand = [\"sh\", \"-c\", \"echo answer\"]\n")
            .unwrap();
        Baton::start(w.path(), &[])
    };
    assert_eq!(baton.url, "http://127.0.0.1:8787");
    let secret_file = w.path().join(".baton/webhook-secret");
    let secret = std::fs::read_to_string(&secret_file).expect("secret generated under storage.path");
    assert_eq!(secret.trim().len(), 64);
    assert_eq!(std::fs::metadata(&secret_file).unwrap().permissions().mode() & 0o777, 0o600);
    let log = baton.log_text();
    assert!(log.contains("webhook-secret") && log.contains("Secret"), "startup says where the secret is: {log}");
    assert!(log.contains("Publishing is off"), "{log}");
    assert!(!log.contains(secret.trim()), "the secret itself is never logged");

    let (status, answer) = baton.deliver(secret.trim(), "issues", "d-1", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["jobs"][0].as_str().unwrap().to_string();
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["result"], "answer");
    assert!(job["publication"].is_null(), "publishing is off without credentials");
}

#[test]
fn a_bad_config_stops_start_up_with_path_line_col() {
    let w = Workdir::new();
    w.config("[server]\nlisten = \"127.0.0.1:0\"\n\n[limits]\nmax_paralel_jobs = 3\n");
    let out = Command::new(BIN).args(["serve", "--config", "baton.toml"]).current_dir(w.path()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:5:1: unknown key `max_paralel_jobs` (did you mean `max_parallel_jobs`?)",
        w.path().join("baton.toml").display()
    );
    assert!(stderr.contains(&expected), "{stderr}");

    w.config("[agents.x]\ncommand = [\"x\"]\ntimeout = \"soon\"\n[server]\nlisten = \"127.0.0.1:0\"\n");
    let out = Command::new(BIN).args(["serve"]).current_dir(w.path()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("baton.toml:3:11: invalid duration `soon`"), "{stderr}");
}

#[test]
fn check_prints_every_error_and_exits_1() {
    let w = Workdir::new();
    w.config("[server]\nlisten = \"127.0.0.1:0\"\n");
    w.trigger("good", "on = [\"issues.opened\"]\n[job]\nagent = \"codex\"\nprompt = \"ok\"\n");
    w.trigger(
        "typo",
        "on = [\"issues.opened\"]\n[filter]\nlables = [\"bug\"]\n[job]\nagent = \"codex\"\nprompt = \"x\"\n",
    );
    w.trigger("agent", "on = [\"isues.opened\"]\n[job]\nagent = \"nobody\"\nprompt = \"{{ unclosed\"\n");
    let out = Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let t = |name: &str| w.path().join("triggers").join(name).display().to_string();
    for expected in [
        format!("{}:3:1: unknown key `lables` (did you mean `labels`?)", t("typo.toml")),
        format!("{}:1:7: unknown event `isues.opened` (did you mean `issues`?)", t("agent.toml")),
        format!("{}:3:9: unknown agent `nobody`", t("agent.toml")),
        format!("{}:4:10: invalid prompt template", t("agent.toml")),
    ] {
        assert!(stdout.contains(&expected), "missing {expected:?} in:\n{stdout}");
    }

    std::fs::remove_file(w.path().join("triggers/typo.toml")).unwrap();
    std::fs::remove_file(w.path().join("triggers/agent.toml")).unwrap();
    let out = Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_example_triggers_pass_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let w = Workdir::new();
    w.config(&format!("triggers = \"{root}/triggers\"\n"));
    let out = Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn an_unopenable_store_is_a_clear_error_naming_its_path() {
    let w = Workdir::new();
    w.config("[server]\nlisten = \"127.0.0.1:0\"\n");
    std::fs::create_dir_all(w.path().join(".baton")).unwrap();
    // What is there is no database: the default's file holds text.
    std::fs::write(w.path().join(".baton/baton.redb"), "not a database").unwrap();
    let out = Command::new(BIN).arg("serve").current_dir(w.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot open store at {}", w.path().join(".baton").display())), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn simulate_explains_every_trigger_and_runs_matches_locally() {
    let w = Workdir::new();
    w.config("[agents.echo]\ncommand = [\"sh\", \"-c\", \"cat; echo ' (ran)'\"]\n");
    let job = "[job]\nagent = \"echo\"\nworkspace = \"none\"\nprompt = \"Look at #{{ issue.number }}\"\n";
    w.trigger("bugs", &format!("on = [\"issues.opened\"]\n[filter]\nlabels = [\"bug\"]\n{job}"));
    w.trigger("questions", &format!("on = [\"issues.opened\"]\n[filter]\nlabels = [\"question\"]\n{job}"));
    w.trigger("pulls", &format!("on = [\"pull_request.opened\"]\n{job}"));
    let payload =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/github/issues/opened.payload.json");
    let out = Command::new(BIN)
        .args(["simulate", "--event", "issues", "--payload"])
        .arg(&payload)
        .current_dir(w.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("event: issues.opened"), "{stdout}");
    assert!(stdout.contains("✓ bugs matches"), "{stdout}");
    assert!(stdout.contains("Look at #1"), "{stdout}");
    assert!(stdout.contains("✗ questions: labels: wanted any of [question], has [bug]"), "{stdout}");
    assert!(stdout.contains("✗ pulls: on: listens for [pull_request.opened], event is issues.opened"), "{stdout}");

    let out = Command::new(BIN)
        .args(["simulate", "--run", "--event", "issues", "--payload"])
        .arg(&payload)
        .current_dir(w.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("== bugs (succeeded) ==\nLook at #1 (ran)"), "{stdout}");
}

#[test]
fn check_reports_bad_schedules_where_they_are() {
    let w = Workdir::new();
    w.trigger("cron", "on = [\"schedule\"]\nschedule = \"0 9 * *\"\n[filter]\nrepos = [\"a/b\"]\n[job]\nagent = \"codex\"\nprompt = \"x\"\n");
    w.trigger("tz", "on = [\"schedule\"]\nschedule = \"0 9 * * 1-5\"\ntimezone = \"Mars/Olympus\"\n[filter]\nrepos = [\"a/*\"]\n[job]\nagent = \"codex\"\nprompt = \"x\"\n");
    w.trigger("bare", "on = [\"issues.opened\"]\nschedule = \"0 9 * * *\"\n[job]\nagent = \"codex\"\nprompt = \"x\"\n");
    let out = Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let t = |name: &str| w.path().join("triggers").join(name).display().to_string();
    for expected in [
        format!("{}:2:12: invalid schedule `0 9 * *`: expected 5 fields", t("cron.toml")),
        format!("{}:3:12: unknown timezone `Mars/Olympus`", t("tz.toml")),
        format!("{}:5:10: a schedule's repos must be exact owner/name, not `a/*`", t("tz.toml")),
        format!("{}:2:12: `schedule` needs on = [\"schedule\"]", t("bare.toml")),
    ] {
        assert!(stdout.contains(&expected), "missing {expected:?} in:\n{stdout}");
    }
}

#[tokio::test]
async fn the_jobs_cli_lists_shows_and_prints_logs_of_a_running_daemon() {
    let w = Workdir::new();
    Scenario::new()
        .github(GitHub::secret("cli-secret"))
        .agent("echo", Agent::command(&["sh", "-c", "echo hello from the agent"]))
        .trigger("greet", Trigger::on(&["issues.opened"]).agent("echo").workspace("none").prompt("x").output("none"))
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    // `baton deliver` signs and sends, as GitHub would.
    let payload =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/github/issues/opened.payload.json");
    let url = format!("{}/webhooks/github", baton.url);
    let out = Command::new(BIN)
        .args(["deliver", "--url", &url, "--secret", "cli-secret", "--event", "issues"])
        .arg(&payload)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.starts_with("202 "), "{stdout}");
    let answer: serde_json::Value = serde_json::from_str(stdout.trim_start_matches("202 ")).unwrap();
    let id = answer["jobs"][0].as_str().unwrap().to_string();
    baton.finished(&id).await;

    let jobs = |args: &[&str]| {
        let out = Command::new(BIN).arg("jobs").args(args).env("BATON_URL", &baton.url).output().unwrap();
        assert!(out.status.success(), "{:?}: {}", args, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let list = jobs(&["list"]);
    assert!(
        list.starts_with("ID") && list.contains(&id) && list.contains("succeeded") && list.contains("greet"),
        "{list}"
    );
    let show = jobs(&["show", &id]);
    assert!(show.contains("\"result\": \"hello from the agent\""), "{show}");
    let logs = jobs(&["logs", &id, "--follow"]);
    assert!(logs.contains("hello from the agent") && logs.contains("agent exited with status 0"), "{logs}");
    let out = Command::new(BIN).args(["jobs", "cancel", &id]).env("BATON_URL", &baton.url).output().unwrap();
    assert!(!out.status.success(), "a finished job cannot be cancelled");
    assert!(String::from_utf8_lossy(&out.stderr).contains("409"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `backend = "postgres"` without a URL is a config error where it is; an
/// unreachable database is named by `baton check` (without its password);
/// `baton migrate --print` shows the schema.
#[test]
fn postgres_storage_is_checked_before_it_is_used() {
    let w = tempfile::tempdir().unwrap();
    std::fs::write(w.path().join("baton.toml"), "[storage]\nbackend = \"postgres\"\n").unwrap();
    let out = Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("baton.toml:2:11: storage.backend = \"postgres\" needs storage.url"), "{text}");

    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        w.path().join("baton.toml"),
        "[storage]\nbackend = \"postgres\"\nurl = \"env:BATON_TEST_DB\"\n[sandbox]\nenabled = false\n",
    )
    .unwrap();
    let url = format!("postgres://baton:hunter2-secret@127.0.0.1:{port}/baton");
    let out = Command::new(BIN).arg("check").env("BATON_TEST_DB", &url).current_dir(w.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("cannot reach the database at postgres://baton@127.0.0.1:{port}/baton")), "{text}");
    assert!(!text.contains("hunter2"), "the password never prints: {text}");

    let out = Command::new(BIN).args(["migrate", "--print"]).output().unwrap();
    let schema = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for table in ["deliveries", "jobs", "queue", "running", "outbox", "job_logs"] {
        assert!(schema.contains(&format!("CREATE TABLE {table}")), "{table} in {schema}");
    }
}

#[test]
fn check_says_where_gitlab_is_and_whether_catch_up_is_on() {
    let w = Workdir::new();
    let gitlab = "[gitlab]\nurl = \"https://gitlab.example.com/gitlab\"\ntoken = \"glpat-check\"\n\
                  webhook_secret = \"a-long-enough-secret-for-the-check\"\n";
    w.config(gitlab);
    let out = Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .contains("ok: GitLab at https://gitlab.example.com/gitlab (API https://gitlab.example.com/gitlab/api/v4)"),
        "{stdout}"
    );
    assert!(stdout.contains("note: GitLab catch-up is off: set gitlab.hook_id"), "{stdout}");
    assert!(stdout.contains("(Maintainer, api scope)"), "{stdout}");

    w.config(&format!("{gitlab}hook_id = 12\nprojects = [\"group/sub/app\", \"group/lib\"]\n"));
    let out = Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("ok: GitLab catch-up watches 2 project(s) through hook 12\n"), "{stdout}");
    assert!(!stdout.contains("catch-up is off"), "{stdout}");

    // A project with no hook to read is an error at its entry.
    w.config(&format!("{gitlab}projects = [\"group/app\"]\n"));
    let out = Command::new(BIN).arg("check").current_dir(w.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // Line 5, unless the tests' storage settings come first.
    let at = ":13: gitlab.projects: `group/app` needs the id of its webhook: set gitlab.hook_id";
    assert!(stdout.contains(&format!("{}:", w.path().join("baton.toml").display())), "{stdout}");
    assert!(stdout.contains(at), "{stdout}");
}
