//! `POST /api/jobs` and `baton jobs run`: jobs asked for directly, through
//! an `on = ["api"]` trigger or free-form, with the same queue, workspace,
//! sandbox and outbox as a webhook's.

use baton::api::client::{Client, ClientError};
use baton::api::wire::{CreateJob, JobState};
use baton::config::Secret;
use serde_json::json;

use crate::fake_github::FakeGitHub;
use crate::harness::{bare_repo, eventually, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

pub(crate) const TOKEN: &str = "api-jobs-token-0123456789";

/// A daemon with an API token, a script agent that prints its prompt and
/// the worktree's README, a repository `o/r` to work on, and an `on =
/// ["api"]` trigger; with `adhoc`, `[api]` lets free-form jobs run agent
/// `script`.
pub(crate) fn daemon(fake: &FakeGitHub, adhoc: bool) -> (Workdir, Baton) {
    let w = Workdir::new();
    let repos = w.path().join("remote");
    // `master`: the bare repository's HEAD, which a job with no `ref` works on.
    bare_repo(&repos, "o/r", "master", &[("README.md", "the readme of o/r")]);
    let script =
        w.script("agent.sh", "#!/bin/sh\necho \"prompt: $(cat)\"\ncat README.md 2>/dev/null || echo \"no worktree\"\n");
    let mut scenario = Scenario::new()
        .set("server.api_token", TOKEN)
        .github(GitHub::secret("api-jobs-webhook-secret").api(fake).repos(&repos).token("ghs_apijobs"))
        .agent("script", Agent::script(&script))
        .agent("other", Agent::script(&script))
        .trigger(
            "summarize",
            Trigger::on(&["api"])
                .agent("script")
                .workspace("default-branch")
                .prompt("Summarize {{ inputs.what }} in {{ repository.full_name }}")
                .output("none"),
        )
        .trigger("on-issues", Trigger::on(&["issues.opened"]).agent("script").workspace("none").prompt("x"));
    if adhoc {
        scenario = scenario.set("api.allow_adhoc", true).set("api.agents", vec!["script"]);
    }
    scenario.write(&w);
    let baton = Baton::start(w.path(), &[]).with_token(TOKEN);
    (w, baton)
}

/// An `on = ["api"]` trigger with inputs: 201 with the job, which runs in a
/// worktree of the repository and renders the inputs into its prompt.
#[tokio::test]
async fn a_trigger_with_on_api_runs_with_its_inputs() {
    let fake = FakeGitHub::start().await;
    let (_w, baton) = daemon(&fake, false);
    let req = CreateJob {
        trigger: Some("summarize".into()),
        repo: Some("o/r".into()),
        inputs: json!({"what": "the docs"}).as_object().cloned(),
        ..CreateJob::default()
    };
    let created = baton.client().create(&req, None).await.expect("created");
    let job = created.job;
    assert!(created.new, "201: {job:?}");
    assert_eq!((job.trigger.as_str(), job.repo.as_deref()), ("summarize", Some("o/r")), "{job:?}");
    let done = baton.finished(&job.id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let result = done["result"].as_str().unwrap_or_default();
    assert!(result.contains("prompt: Summarize the docs in o/r"), "{result}");
    assert!(result.contains("the readme of o/r"), "ran in a worktree of the repository: {result}");
}

/// The same `Idempotency-Key` twice: one job, and the second answer is it.
#[tokio::test]
async fn an_idempotency_key_gives_one_job_for_two_requests() {
    let fake = FakeGitHub::start().await;
    let (_w, baton) = daemon(&fake, false);
    let client = baton.client();
    let req = CreateJob {
        trigger: Some("summarize".into()),
        repo: Some("o/r".into()),
        inputs: json!({"what": "x"}).as_object().cloned(),
        ..CreateJob::default()
    };
    let a = client.create(&req, Some("retry-me-1")).await.expect("first");
    let b = client.create(&req, Some("retry-me-1")).await.expect("second");
    assert_eq!((a.new, b.new), (true, false), "201 then 200: {a:?}\n{b:?}");
    assert_eq!(a.job.id, b.job.id);
    let c = client.create(&req, Some("retry-me-2")).await.expect("third");
    assert!(c.new, "{c:?}");
    assert_ne!(a.job.id, c.job.id, "another key is another job");
    let query = baton::api::wire::JobsQuery { trigger: Some("summarize".into()), ..Default::default() };
    let listed = client.jobs(&query).await.expect("listed");
    assert_eq!(listed.jobs.len(), 2, "{listed:?}");
}

/// A free-form job needs `[api] allow_adhoc` and an agent of `[api]
/// agents`; its output goes through the outbox like a trigger's.
#[tokio::test]
async fn a_free_form_job_runs_its_prompt_and_comments_its_result() {
    let fake = FakeGitHub::start().await;
    let (_w, off) = daemon(&fake, false);
    let req = CreateJob {
        agent: Some("script".into()),
        repo: Some("o/r".into()),
        prompt: Some("Look at {{ this }}".into()),
        subject: Some(7),
        output: json!({"kind": "comment", "progress": false}).as_object().cloned(),
        ..CreateJob::default()
    };
    let refused = off.client().create(&req, None).await.expect_err("free-form jobs are off by default");
    assert_eq!(refused.status(), Some(403), "{refused}");
    assert!(refused.to_string().contains("[api] allow_adhoc = true"), "{refused}");

    let (_w, baton) = daemon(&fake, true);
    let created = baton.client().create(&req, None).await.expect("created");
    assert!(created.new, "{created:?}");
    let done = baton.finished(&created.job.id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // The prompt is the request's text, never a template.
    assert!(done["result"].as_str().unwrap_or_default().contains("prompt: Look at {{ this }}"), "{done}");
    eventually("the comment", || fake.comments("o/r#7").iter().any(|c| c.body.contains("the readme of o/r"))).await;
}

/// Every bad field is a 400 naming it; nothing is created.
#[tokio::test]
async fn bad_fields_answer_400_naming_the_field() {
    let fake = FakeGitHub::start().await;
    let (_w, baton) = daemon(&fake, true);
    for (body, field, says) in [
        (json!({"trigger": "summarize", "colour": "red"}), "colour", "unknown field"),
        (json!({"trigger": "nope"}), "trigger", "no trigger `nope`"),
        (json!({"trigger": "on-issues"}), "trigger", "needs on = [\"api\"]"),
        (json!({"trigger": "summarize", "prompt": "x"}), "prompt", "comes from the trigger"),
        (json!({"trigger": "summarize", "repo": "not a repo"}), "repo", "owner/name"),
        (json!({"trigger": "summarize", "inputs": [1]}), "inputs", "must be an object"),
        (json!({"trigger": "summarize", "subject": "seven"}), "subject", "issue or PR number"),
        (json!({"agent": "other", "prompt": "x"}), "agent", "not one of [api] agents"),
        (json!({"agent": "script"}), "prompt", "is required"),
        (json!({"agent": "script", "prompt": "x", "workspace": "everywhere"}), "workspace", "unknown variant"),
        (json!({"agent": "script", "prompt": "x", "output": {"kind": "fax"}}), "output.kind", "unknown variant"),
        (
            json!({"agent": "script", "prompt": "x", "output": {"kind": "none", "colour": 1}}),
            "output.colour",
            "unknown key `colour`",
        ),
        (
            json!({"agent": "script", "prompt": "x", "output": {"kind": "comment", "title": null}}),
            "output.title",
            "null",
        ),
        (json!(["not", "an", "object"]), "body", "JSON object"),
    ] {
        let (status, answer) = baton.post_json("/api/jobs", &[], &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
        assert!(answer["error"].as_str().unwrap_or_default().contains(says), "{body}: {answer}");
    }
    // A trigger whose workspace needs a repository says so, as the field
    // to add, in these words.
    let (status, answer) = baton.post_json("/api/jobs", &[], &json!({"trigger": "summarize"})).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["field"], "repo", "{answer}");
    assert_eq!(answer["error"], "`repo` is required for workspace `default-branch`", "{answer}");
    let (_, listed) = baton.get("/api/jobs").await;
    assert_eq!(listed["jobs"], json!([]), "nothing was created");
}

/// Creating jobs wants the API token, and a daemon with no token creates
/// none: anyone who reached its port could start agents.
#[tokio::test]
async fn creating_a_job_needs_the_api_token() {
    let fake = FakeGitHub::start().await;
    let (_w, baton) = daemon(&fake, false);
    let req = CreateJob { trigger: Some("summarize".into()), repo: Some("o/r".into()), ..CreateJob::default() };
    for token in [None, Some(Secret::new("not-the-token-7f3a"))] {
        let shown = format!("{token:?}");
        let refused = Client::new(&baton.url, token).create(&req, None).await.expect_err("refused");
        assert!(matches!(refused, ClientError::Api { status: 401, .. }), "{shown}: {refused}");
        assert!(!format!("{refused} {refused:?}").contains("7f3a"), "the token never shows: {refused}");
    }
    let listed = baton.client().jobs(&Default::default()).await.expect("listed");
    assert!(listed.jobs.is_empty(), "nothing was created: {listed:?}");

    let open = Workdir::new();
    open.config("[server]\nlisten = \"127.0.0.1:0\"\n");
    open.trigger("t", "on = [\"api\"]\n[job]\nagent = \"codex\"\nworkspace = \"none\"\nprompt = \"x\"\n");
    let open = Baton::start(open.path(), &[]);
    let req = CreateJob { trigger: Some("t".into()), ..CreateJob::default() };
    let refused = open.client().create(&req, None).await.expect_err("no token, no jobs");
    assert_eq!(refused.status(), Some(403), "{refused}");
    assert!(refused.to_string().contains("server.api_token"), "{refused}");
}

/// `baton jobs run --follow`: the job's log, then its result; the exit code
/// says whether it succeeded.
#[tokio::test]
async fn baton_jobs_run_follows_a_job_to_its_result() {
    let fake = FakeGitHub::start().await;
    let (_w, baton) = daemon(&fake, true);
    let url = baton.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["jobs", "run", "--repo", "o/r", "--agent", "script", "--prompt", "from the shell", "--follow"])
            .env("BATON_URL", &url)
            .env("BATON_API_TOKEN", TOKEN)
            .output()
            .expect("run baton")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("prompt: from the shell") && stdout.contains("the readme of o/r"), "{stdout}");
    assert!(stderr.contains(" succeeded"), "{stderr}");
    let id = stderr.lines().next().and_then(|l| l.strip_prefix("job ")).unwrap_or_default().to_string();
    let job = baton.client().job(&id).await.expect("the job");
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
}
