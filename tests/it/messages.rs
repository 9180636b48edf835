//! The errors a user meets, pinned word for word: each names what was
//! wrong, where, and what to do. `baton check` on a config with one mistake
//! each; a webhook with a bad signature; a job whose repository git cannot
//! read. (The API's answers are pinned in `api_jobs`.)

use std::process::Command;

use crate::fake_github::FakeGitHub;
use crate::harness::{fixture, Baton, Workdir, BIN};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

/// `baton check`'s first error line for `toml`, the folder's path cut.
fn check(toml: &str) -> String {
    let w = Workdir::new();
    std::fs::write(w.path().join("baton.toml"), toml).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .current_dir(w.path())
        .env_remove("GITHUB_TOKEN")
        .env_remove("BATON_TEST_UNSET_VAR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{toml}: {}", String::from_utf8_lossy(&out.stdout));
    let text = String::from_utf8_lossy(&out.stdout).replace(&format!("{}/", w.path().display()), "");
    text.lines().find(|l| l.starts_with("baton.toml:")).unwrap_or_default().to_string()
}

#[test]
fn config_errors_say_what_where_and_what_to_do() {
    for (toml, said) in [
        ("[server]\nlisten = \"nowhere\"\n", "baton.toml:2:10: invalid listen address `nowhere`: expected IP:PORT, e.g. 127.0.0.1:8787"),
        (
            "[server]\nlisten = \"0.0.0.0:8787\"\n",
            "baton.toml:2:10: listening on 0.0.0.0:8787 (not loopback) needs an API token: set server.api_token, e.g. api_token = \"env:BATON_API_TOKEN\"",
        ),
        ("[server]\nmax_streams = 0\n", "baton.toml:2:15: server.max_streams must be at least 1"),
        ("[server]\nmax_mcp_sessions = 0\n", "baton.toml:2:20: server.max_mcp_sessions must be at least 1"),
        ("[server]\nmax_body_bytes = 0\n", "baton.toml:2:18: server.max_body_bytes must be more than zero"),
        ("[limits]\nmax_parallel_jobs = 0\n", "baton.toml:2:21: limits.max_parallel_jobs must be at least 1"),
        (
            "[limits]\nheld_for = \"soon\"\n",
            "baton.toml:2:12: invalid duration `soon`: expected a number and a unit, e.g. 30s, 15m, 2h or 14d",
        ),
        ("[limits]\njob_lease = \"5w\"\n", "baton.toml:2:13: invalid duration `5w`: unknown unit `w` (use s, m, h or d)"),
        ("[limits]\ndaily_budget_usd = -1\n", "baton.toml:2:20: limits.daily_budget_usd must be a positive amount of US dollars"),
        ("[github]\napi_url = \"ftp://x\"\n", "baton.toml:2:11: invalid URL `ftp://x`: expected http://, https:// or file://"),
        (
            "[github]\ntoken = \"env:BATON_TEST_UNSET_VAR\"\n",
            "baton.toml:2:9: environment variable BATON_TEST_UNSET_VAR is not set: set it where baton starts, or put the value in a file and write `file:PATH`",
        ),
        (
            "[storage]\nbackend = \"postgres\"\n",
            "baton.toml:2:11: storage.backend = \"postgres\" needs storage.url, e.g. url = \"env:DATABASE_URL\"",
        ),
        (
            "[storage]\nmin_free = \"lots\"\n",
            "baton.toml:2:12: storage.min_free: invalid size `lots`: expected e.g. 4G, 512M or a number of bytes",
        ),
        (
            "[gitlab]\nurl = \"https://gitlab.example.com\"\n",
            "baton.toml:1:1: [gitlab] needs `token`: a project, group or personal access token with the `api` and `write_repository` scopes, e.g. token = \"env:GITLAB_TOKEN\"",
        ),
        (
            "[sandbox]\nuser = \"no-such-user-xyz\"\n",
            "baton.toml:2:8: sandbox.user: no user `no-such-user-xyz` on this host (give an existing account or a numeric uid)",
        ),
        (
            "[limits]\nmax_paralel_jobs = 3\n",
            "baton.toml:2:1: unknown key `max_paralel_jobs` (did you mean `max_parallel_jobs`?)",
        ),
    ] {
        assert_eq!(check(toml), said, "for:\n{toml}");
    }
}

/// A webhook whose signature is wrong or missing: 401, saying which header
/// and what to check.
#[tokio::test]
async fn a_bad_webhook_signature_says_what_to_check() {
    let w = Workdir::new();
    Scenario::new().github(GitHub::secret("the-right-secret")).write(&w);
    let baton = Baton::start(w.path(), &[]);
    let body = fixture("issues/opened.payload.json");
    let (status, answer) = baton.deliver("a-wrong-secret", "issues", "sig-1", &body).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(
        answer["error"],
        "X-Hub-Signature-256: signature does not match: the webhook's secret and the one baton.toml names differ, or the body was changed on the way"
    );
    let (status, answer) =
        baton.post_webhook(&[("x-github-event", "issues"), ("x-github-delivery", "sig-2")], &body).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(
        answer["error"],
        "X-Hub-Signature-256: missing signature header: give the webhook a secret, the one baton.toml names"
    );
}

/// A job whose repository git cannot read fails with all git said: the
/// `fatal:` line naming the cause, not only the advice after it.
#[tokio::test]
async fn a_failed_fetch_keeps_the_cause_git_gave() {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let nowhere = w.path().join("no-repositories-here");
    Scenario::new()
        .github(
            GitHub::secret("fetch-secret").api(&fake).repos(&nowhere).token("ghp_fetchTestToken0123456789abcdefghijk"),
        )
        .agent("noop", Agent::command(&["true"]))
        .trigger(
            "look",
            Trigger::on(&["issues.opened"]).agent("noop").workspace("default-branch").prompt("x").output("none"),
        )
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let (status, answer) =
        baton.deliver("fetch-secret", "issues", "fetch-1", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["jobs"][0].as_str().expect("a job").to_string();
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    let repo = nowhere.join("Codertocat/Hello-World.git");
    assert!(error.contains(&format!("fatal: '{}' does not appear to be a git repository", repo.display())), "{error}");
    assert!(error.contains("and the repository exists."), "{error}");
}
