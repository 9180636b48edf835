//! Publishing against a fake GitHub that loses answers and rate-limits:
//! exactly one comment per job, status comments that always end edited,
//! reviews, check runs as a GitHub App, pull request templates and the
//! checks a change must pass before it is pushed.

use std::convert::identity;
use std::time::Duration;

use crate::fake_github::{App, FakeGitHub, Faults};
use crate::harness::{bare_repo, eventually, fixture, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "publish-secret";
const TOKEN: &str = "ghp_publishTestToken0123456789abcdefghij";

/// A daemon with one `work` trigger whose agent `script` is `agent_body`,
/// publishing to `fake`; `github` adds to its `[github]`.
fn setup(fake: &FakeGitHub, agent_body: &str, trigger: Trigger, github: impl FnOnce(GitHub) -> GitHub) -> Workdir {
    let w = Workdir::new();
    scenario(&w, fake, agent_body, trigger, github).write(&w);
    w
}

fn scenario(
    w: &Workdir,
    fake: &FakeGitHub,
    agent_body: &str,
    trigger: Trigger,
    github: impl FnOnce(GitHub) -> GitHub,
) -> Scenario {
    let repos = w.path().join("remote");
    bare_repo(&repos, "Codertocat/Hello-World", "master", &[("README.md", "hello")]);
    let agent = w.script("agent.sh", agent_body);
    Scenario::new()
        .set("server.public_url", "https://baton.example")
        .github(github(GitHub::secret(SECRET).api(fake).repos(&repos)))
        .agent("script", Agent::script(&agent))
        .trigger("work", trigger)
}

/// The `work` trigger's start: `on`, run by agent `script`.
fn work(on: &str) -> Trigger {
    Trigger::on(&[on]).agent("script")
}

/// The token most tests publish with.
fn with_token(github: GitHub) -> GitHub {
    github.token("env:GITHUB_TOKEN")
}

async fn deliver(baton: &Baton, event: &str, fixture_path: &str, delivery: &str) -> String {
    let (status, body) = baton.deliver(SECRET, event, delivery, &fixture(fixture_path)).await;
    assert_eq!(status, 202, "{body}");
    body["jobs"][0].as_str().expect("a job").to_string()
}

fn marker(id: &str) -> String {
    format!("<!-- baton:job={id} -->")
}

#[tokio::test]
async fn with_lost_answers_and_rate_limits_each_job_lands_exactly_one_comment_edited_to_its_result() {
    // The first write is rate-limited; after that every third write is
    // applied but its answer lost (502).
    let faults = Faults { fail_every_nth_write: Some(3), rate_limited_writes: 1 };
    let fake = FakeGitHub::start_with(faults, None).await;
    let w = setup(
        &fake,
        "#!/bin/sh\necho \"result of $(cat)\"\n",
        work("issues.opened").workspace("none").prompt("{{ event.delivery }}").output("comment"),
        with_token,
    );
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(deliver(&baton, "issues", "issues/opened.payload.json", &format!("faulty-{n}")).await);
    }
    for id in &ids {
        assert_eq!(baton.finished(id).await["state"], "succeeded");
    }
    let all_final = || {
        let comments = fake.comments("Codertocat/Hello-World#1");
        ids.iter().all(|id| comments.iter().any(|c| c.body.contains(&marker(id))))
    };
    eventually("every status comment to end edited with its result", all_final).await;
    let comments = fake.comments("Codertocat/Hello-World#1");
    assert_eq!(comments.len(), ids.len(), "exactly one comment per job: {comments:#?}");
    for (n, id) in ids.iter().enumerate() {
        let mine: Vec<_> = comments.iter().filter(|c| c.body.contains(&format!("job={id}"))).collect();
        assert_eq!(mine.len(), 1, "{id}: {comments:#?}");
        assert!(mine[0].body.starts_with(&format!("result of faulty-{n}")), "{}", mine[0].body);
    }
    // The rate limit GitHub reports is a gauge.
    let metrics = reqwest::get(format!("{}/metrics", baton.url)).await.unwrap().text().await.unwrap();
    let gauge = metrics.lines().find(|l| l.starts_with("baton_github_rate_limit_remaining ")).unwrap_or_default();
    let left: i64 = gauge.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(-1);
    assert!((4000..5000).contains(&left), "{gauge}");
    // The faults really happened.
    let statuses: Vec<u16> = fake.requests.lock().unwrap().iter().map(|r| r.status).collect();
    assert!(statuses.contains(&502) && statuses.contains(&403), "{statuses:?}");
}

/// On an issue with hundreds of comments, what baton made is on a later
/// page of GitHub's listing (oldest first): a lost answer is still found
/// there, never posted again.
#[tokio::test]
async fn a_lost_answer_on_a_busy_issue_is_found_on_a_later_page() {
    let faults = Faults { fail_every_nth_write: Some(2), rate_limited_writes: 0 };
    let fake = FakeGitHub::start_with(faults, None).await;
    fake.add_comments("Codertocat/Hello-World#1", 250);
    let w = setup(
        &fake,
        "#!/bin/sh\necho \"result of $(cat)\"\n",
        work("issues.opened").workspace("none").prompt("{{ event.delivery }}").output("comment"),
        with_token,
    );
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "busy-1").await;
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    let done = || fake.comments("Codertocat/Hello-World#1").iter().any(|c| c.body.starts_with("result of busy-1"));
    eventually("the status comment edited to the result", done).await;
    let mine: Vec<_> = fake
        .comments("Codertocat/Hello-World#1")
        .into_iter()
        .filter(|c| c.body.contains(&format!("job={id}")))
        .collect();
    assert_eq!(mine.len(), 1, "{mine:#?}");
    let statuses: Vec<u16> = fake.requests.lock().unwrap().iter().map(|r| r.status).collect();
    assert!(statuses.contains(&502), "an answer was lost: {statuses:?}");
}

#[tokio::test]
async fn a_cancelled_job_leaves_its_status_comment_saying_so() {
    let fake = FakeGitHub::start().await;
    let w = setup(&fake, "#!/bin/sh\nsleep 300\n", work("issues.opened").workspace("none").prompt("x"), with_token);
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "cancel-1").await;
    eventually("the status comment", || {
        fake.comments("Codertocat/Hello-World#1").iter().any(|c| c.body.contains("baton is working on it"))
    })
    .await;
    let status = fake.comments("Codertocat/Hello-World#1")[0].body.clone();
    assert!(status.contains(&format!("https://baton.example/jobs/{id}")), "links to the dashboard: {status}");
    let (code, answer) = baton.post(&format!("/api/jobs/{id}/cancel")).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(baton.finished(&id).await["state"], "cancelled");
    eventually("the status comment to say cancelled", || {
        fake.comments("Codertocat/Hello-World#1").iter().any(|c| c.body.contains("was cancelled"))
    })
    .await;
    assert_eq!(fake.comments("Codertocat/Hello-World#1").len(), 1);
}

#[tokio::test]
async fn review_output_posts_a_comment_review_and_closes_the_status_comment() {
    let fake = FakeGitHub::start().await;
    let w = setup(
        &fake,
        "#!/bin/sh\necho 'Looks good; one nit in README.'\n",
        work("pull_request.opened").workspace("none").prompt("review").output("review"),
        with_token,
    );
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "pull_request", "pull_request/opened.payload.json", "review-1").await;
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    eventually("the review", || !fake.reviews("Codertocat/Hello-World#2").is_empty()).await;
    let review = &fake.requests_to("POST", "/repos/Codertocat/Hello-World/pulls/2/reviews")[0].body;
    assert_eq!(review["event"], "COMMENT");
    let body = review["body"].as_str().unwrap();
    assert!(body.starts_with("Looks good; one nit in README.") && body.contains(&marker(&id)), "{body}");
    eventually("the status comment to close", || {
        fake.comments("Codertocat/Hello-World#2")
            .iter()
            .any(|c| c.body.contains("Done: the review is posted (reviewed ec26c3e, the whole pull request)."))
    })
    .await;
}

/// The pull request the review tests look at: one file, one hunk.
fn review_fixture(fake: &FakeGitHub) {
    let patch = "@@ -1,3 +1,4 @@\n fn a() {\n-    old();\n+    new();\n+    more();\n }";
    fake.set_pr_files(
        "Codertocat/Hello-World#2",
        vec![serde_json::json!({ "filename": "src/lib.rs", "patch": patch })],
    );
}

/// A review trigger whose agent answers `answer`; `allow_approve` as given.
fn review_daemon(fake: &FakeGitHub, answer: &str, allow_approve: bool) -> (Workdir, Baton) {
    let agent = format!("#!/bin/sh\ncat > /dev/null\ncat <<'EOF'\n{answer}\nEOF\n");
    let trigger = work("pull_request.opened")
        .workspace("none")
        .prompt("review")
        .output("review")
        .set("output.allow_approve", allow_approve);
    let w = setup(fake, &agent, trigger, with_token);
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    (w, baton)
}

/// A review answered as JSON lands as one review: findings on diff lines
/// inline (a suggestion as a suggestion block, a removed line on the left),
/// a finding elsewhere in the summary, never dropped; `APPROVE` only with
/// `allow_approve`. The prompt asked for the format.
#[tokio::test]
async fn a_json_review_lands_line_by_line_and_approves_only_when_allowed() {
    let answer = serde_json::json!({
        "summary": "One bug, one question, one typo.",
        "event": "APPROVE",
        "comments": [
            { "path": "src/lib.rs", "line": 3, "start_line": 2, "body": "Called twice.", "suggestion": "    new();" },
            { "path": "src/lib.rs", "line": 2, "side": "LEFT", "body": "Why remove old()?" },
            { "path": "README.md", "line": 40, "body": "Typo in the intro." }
        ]
    })
    .to_string();
    for allow in [false, true] {
        let fake = FakeGitHub::start().await;
        review_fixture(&fake);
        let (_w, baton) = review_daemon(&fake, &answer, allow);
        let id = deliver(&baton, "pull_request", "pull_request/opened.payload.json", &format!("jr-{allow}")).await;
        assert_eq!(baton.finished(&id).await["state"], "succeeded");
        eventually("the review", || !fake.review_posts().is_empty()).await;
        let review = &fake.review_posts()[0];
        assert_eq!(review["event"], if allow { "APPROVE" } else { "COMMENT" }, "{review}");
        let comments = review["comments"].as_array().unwrap();
        assert_eq!(comments.len(), 2, "{review}");
        assert_eq!(comments[0]["path"], "src/lib.rs");
        assert_eq!((comments[0]["start_line"].as_u64(), comments[0]["line"].as_u64()), (Some(2), Some(3)));
        assert_eq!(comments[0]["body"], "Called twice.\n\n```suggestion\n    new();\n```");
        assert_eq!((comments[1]["side"].as_str(), comments[1]["line"].as_u64()), (Some("LEFT"), Some(2)));
        let body = review["body"].as_str().unwrap();
        assert!(body.starts_with("One bug, one question, one typo."), "{body}");
        assert!(body.contains("`README.md:40`: Typo in the intro.") && body.contains(&marker(&id)), "{body}");
        let job = baton.job(&id).await;
        assert!(job["spec"]["prompt"].as_str().unwrap().contains("## Answer format"), "{job}");
    }
}

/// An answer that is not valid review JSON is the review's body, as it is.
#[tokio::test]
async fn a_review_that_is_not_valid_json_is_posted_as_it_is() {
    let fake = FakeGitHub::start().await;
    review_fixture(&fake);
    let broken = r#"{"summary": "cut short", "comments": [{"path": "src/lib.rs""#;
    let (_w, baton) = review_daemon(&fake, broken, false);
    let id = deliver(&baton, "pull_request", "pull_request/opened.payload.json", "broken-review").await;
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    eventually("the review", || !fake.review_posts().is_empty()).await;
    let review = &fake.review_posts()[0];
    assert!(review["comments"].is_null(), "{review}");
    assert!(review["body"].as_str().unwrap().starts_with(broken), "{review}");
}

/// An RSA key pair for the App: (private PEM, public PEM).
pub fn app_keys() -> (String, String) {
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey, LineEnding};
    let mut rng = rsa::rand_core::OsRng;
    let private = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key");
    let public = rsa::RsaPublicKey::from(&private);
    (private.to_pkcs1_pem(LineEnding::LF).expect("PEM").to_string(), public.to_pkcs1_pem(LineEnding::LF).expect("PEM"))
}

#[tokio::test]
async fn as_a_github_app_a_check_run_goes_from_in_progress_to_its_conclusion() {
    let (private_pem, public_pem) = app_keys();
    let app = App { app_id: 4242, public_pem, installation: 1, token: "ghs_installationTokenFromTheFake01".into() };
    let fake = FakeGitHub::start_with(Faults::default(), Some(app.clone())).await;
    let scratch = tempfile::tempdir().unwrap();
    let key_file = scratch.path().join("app.pem");
    std::fs::write(&key_file, &private_pem).unwrap();
    let w = setup(
        &fake,
        "#!/bin/sh\necho 'All checks of the agent passed.'\n",
        work("pull_request.opened").workspace("none").prompt("check").output("check_run"),
        |g| g.set("app_id", 4242).set("private_key", format!("file:{}", key_file.display())),
    );
    let baton = Baton::start(w.path(), &[]);
    let id = deliver(&baton, "pull_request", "pull_request/opened.payload.json", "app-1").await;
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    let done = || fake.check_runs().iter().any(|r| r["status"] == "completed");
    let seen = || {
        let list = fake.requests.lock().unwrap();
        list.iter().map(|r| format!("{} {} {} {}", r.method, r.path, r.status, r.body)).collect::<Vec<_>>().join("\n")
    };
    for _ in 0..200 {
        if done() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(done(), "requests:\n{}\nlog:\n{}", seen(), baton.log_text());

    // The JWT bought an installation token, and the writes used it (the
    // fake answers 401 to anything else).
    let tokens = fake.requests_to("POST", "/app/installations/1/access_tokens");
    assert_eq!(tokens.len(), 1, "one token, cached for the later calls");
    assert_eq!(tokens[0].status, 201, "the fake accepted the App's JWT");
    let created = fake.requests_to("POST", "/repos/Codertocat/Hello-World/check-runs");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].body["status"], "in_progress");
    assert_eq!(created[0].body["head_sha"], "ec26c3e57ca3a959ca5aad62de7213c562f8c821");
    let auth = created[0].headers.get("authorization").unwrap().to_str().unwrap();
    assert!(auth.ends_with(&app.token), "{auth}");
    let runs = fake.check_runs();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["conclusion"], "success");
    assert!(runs[0]["output"]["summary"].as_str().unwrap().starts_with("All checks of the agent passed."));
    assert!(!baton.log_text().contains(&app.token), "the installation token never reaches the log");
}

#[tokio::test]
async fn check_run_output_without_an_app_is_a_trigger_error() {
    let fake = FakeGitHub::start().await;
    let w = setup(&fake, "#!/bin/sh\ntrue\n", work("pull_request.opened").prompt("x").output("check_run"), |g| {
        g.token("x")
    });
    let out = std::process::Command::new(crate::harness::BIN).args(["check"]).current_dir(w.path()).output().unwrap();
    let err = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("work.toml:") && err.contains("needs a GitHub App"), "{err}");
}

/// A pull_request trigger over a script agent; `output` adds to it.
fn pr_setup(fake: &FakeGitHub, agent_body: &str, output: impl FnOnce(Trigger) -> Trigger) -> Workdir {
    let trigger = work("issues.opened").workspace("default-branch").prompt("fix").output("pull_request");
    setup(fake, agent_body, output(trigger), with_token)
}

#[tokio::test]
async fn pull_request_title_and_body_come_from_the_triggers_templates() {
    let fake = FakeGitHub::start().await;
    let w = pr_setup(&fake, "#!/bin/sh\nmkdir -p src && echo fixed > src/lib.txt\necho 'Fixed the spelling.'\n", |t| {
        t.set("output.title", "Fix #{{ subject }}: {{ result }}")
            .set("output.body", "{{ result }}\n\nCloses #{{ subject }} (job {{ job.id }})")
            .set("output.allowed_paths", vec!["src/**"])
    });
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "tmpl-1").await;
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    eventually("the pull request", || !fake.posts("/repos/Codertocat/Hello-World/pulls").is_empty()).await;
    let pr = &fake.posts("/repos/Codertocat/Hello-World/pulls")[0].body;
    assert_eq!(pr["title"], "Fix #1: Fixed the spelling.");
    let body = pr["body"].as_str().unwrap();
    assert!(body.starts_with(&format!("Fixed the spelling.\n\nCloses #1 (job {id})")), "{body}");
    assert!(body.contains(&marker(&id)));
    eventually("the status comment to close", || {
        fake.comments("Codertocat/Hello-World#1")
            .iter()
            .any(|c| c.body.contains("Done: the changes are in a pull request"))
    })
    .await;
}

#[tokio::test]
async fn a_change_outside_allowed_paths_is_never_pushed() {
    let fake = FakeGitHub::start().await;
    let w = pr_setup(&fake, "#!/bin/sh\necho changed >> README.md\necho done\n", |t| {
        t.set("output.allowed_paths", vec!["src/**"])
    });
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "paths-1").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed");
    assert!(job["error"].as_str().unwrap().contains("outside output.allowed_paths (README.md)"), "{job}");
    let bare = w.path().join("remote/Codertocat/Hello-World.git");
    assert_eq!(crate::harness::git(&bare, &["branch", "--list", "baton/*"]), "");
    assert!(fake.posts("/repos/Codertocat/Hello-World/pulls").is_empty());
}

#[tokio::test]
async fn a_change_carrying_a_secret_is_never_pushed() {
    let fake = FakeGitHub::start().await;
    let w = pr_setup(
        &fake,
        "#!/bin/sh\necho 'TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123456789' > .env\necho done\n",
        identity,
    );
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "secret-1").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed");
    assert!(job["error"].as_str().unwrap().contains("looks like a secret"), "{job}");
    let bare = w.path().join("remote/Codertocat/Hello-World.git");
    assert_eq!(crate::harness::git(&bare, &["branch", "--list", "baton/*"]), "");
}

#[tokio::test]
async fn the_per_job_comment_cap_holds() {
    let fake = FakeGitHub::start().await;
    // A cap of one comment: the status comment uses it, so the result has
    // to go into that comment, by edit — and a job without progress whose
    // cap is zero posts nothing and says why.
    let w = setup(
        &fake,
        "#!/bin/sh\necho result\n",
        work("issues.opened").workspace("none").prompt("x").set("output.progress", false).set("output.max_comments", 0),
        with_token,
    );
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "cap-1").await;
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    let start = std::time::Instant::now();
    let job = loop {
        let job = baton.job(&id).await;
        if job["publication"]["state"] == "failed" {
            break job;
        }
        assert!(start.elapsed() < crate::harness::WAIT, "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(job["publication"]["error"].as_str().unwrap().contains("cap of 0 comments"), "{job}");
    assert!(fake.comments("Codertocat/Hello-World#1").is_empty());
}

#[tokio::test]
async fn catch_up_asks_github_to_redeliver_failed_deliveries_it_never_stored_once() {
    let (private_pem, public_pem) = app_keys();
    let app = App { app_id: 7, public_pem, installation: 1, token: "ghs_catchUpInstallationToken00001".into() };
    let fake = FakeGitHub::start_with(Faults::default(), Some(app)).await;
    let scratch = tempfile::tempdir().unwrap();
    let key_file = scratch.path().join("app.pem");
    std::fs::write(&key_file, &private_pem).unwrap();
    let w =
        setup(&fake, "#!/bin/sh\necho ok\n", work("issues.opened").workspace("none").prompt("x").output("none"), |g| {
            g.set("app_id", 7).set("private_key", format!("file:{}", key_file.display()))
        });
    // One delivery reached baton before.
    let mut baton = Baton::start(w.path(), &[]);
    deliver(&baton, "issues", "issues/opened.payload.json", "known-guid").await;
    baton.kill9();

    let ago = |h: i64| (chrono::Utc::now() - chrono::Duration::hours(h)).to_rfc3339();
    let delivery = |id: u64, guid: &str, code: u64, at: String| serde_json::json!({ "id": id, "guid": guid, "status_code": code, "delivered_at": at, "event": "issues", "action": "opened" });
    fake.set_hook_deliveries(vec![
        delivery(1, "lost-guid", 502, ago(1)),
        delivery(2, "known-guid", 0, ago(1)),
        delivery(3, "fine-guid", 202, ago(1)),
        delivery(4, "ancient-guid", 500, ago(24 * 4)),
    ]);
    let attempts = || fake.requests_to("POST", "/app/hook/deliveries/");
    let mut baton = Baton::start(w.path(), &[]);
    eventually("the redelivery request", || !attempts().is_empty()).await;
    baton.kill9();
    // A second start asks for nothing again.
    let baton = Baton::start(w.path(), &[]);
    eventually("the second start's catch-up", || fake.requests_to("GET", "/app/hook/deliveries").len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paths: Vec<String> = attempts().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/app/hook/deliveries/1/attempts"]);
    drop(baton);
}

#[tokio::test]
async fn a_job_interrupted_by_a_daemon_crash_still_ends_its_one_status_comment() {
    let fake = FakeGitHub::start().await;
    let state = crate::harness::open_dir();
    let go = state.path().join("go");
    let w = Workdir::new();
    let agent =
        format!("#!/bin/sh\nwhile [ ! -f {} ]; do sleep 0.1; done\necho 'finished after the restart'\n", go.display());
    scenario(&w, &fake, &agent, work("issues.opened").workspace("none").prompt("x"), with_token)
        // The agent's gate is outside what the sandbox shows by default.
        .set("agents.script.read_write", vec![state.path().display().to_string()])
        .write(&w);
    let mut baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "crash-status-1").await;
    eventually("the status comment", || !fake.comments("Codertocat/Hello-World#1").is_empty()).await;
    baton.kill9();
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    std::fs::write(&go, "").unwrap();
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    eventually("the status comment to carry the result", || {
        fake.comments("Codertocat/Hello-World#1").iter().any(|c| c.body.starts_with("finished after the restart"))
    })
    .await;
    assert_eq!(fake.comments("Codertocat/Hello-World#1").len(), 1, "the rerun posted no second status comment");
}

/// What is pushed is checked as a whole against the commit baton prepared,
/// whatever the agent committed itself: its own commits of a workflow and a
/// token, followed by an allowed edit, push nothing.
#[tokio::test]
async fn an_agents_own_commits_are_checked_like_its_files_and_workflows_need_consent() {
    let pr = work("issues.opened").workspace("default-branch").prompt("x").output("pull_request");
    for (trigger, expect) in [
        (pr.clone().set("output.allowed_paths", vec!["docs/**"]), "outside output.allowed_paths"),
        (pr.clone(), "allow_workflow_changes"),
        (pr.clone().set("output.allow_workflow_changes", true), ""),
    ] {
        let fake = FakeGitHub::start().await;
        let agent = "#!/bin/sh\nmkdir -p .github/workflows docs\n\
                     printf 'on: push\\njobs: {}\\n' > .github/workflows/evil.yml\n\
                     git add -A && git -c user.name=a -c user.email=a@b commit -qm sneaky\n\
                     echo 'better docs' > docs/index.md\necho done\n";
        let w = setup(&fake, agent, trigger, with_token);
        let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
        let id = deliver(&baton, "issues", "issues/opened.payload.json", "sneaky-1").await;
        let job = baton.finished(&id).await;
        let origin = w.path().join("remote/Codertocat/Hello-World.git");
        let branches = crate::harness::git(&origin, &["branch", "--list", "baton/*"]);
        if expect.is_empty() {
            assert_eq!(job["state"], "succeeded", "{job}");
            assert!(!branches.is_empty(), "pushed with consent");
        } else {
            assert_eq!(job["state"], "failed", "{job}");
            assert!(job["error"].as_str().unwrap().contains(expect), "{job}");
            assert_eq!(branches, "", "nothing was pushed");
        }
    }
}

/// Everything baton writes to GitHub is redacted: the pull request's title
/// and body, and the commit message it pushes, even when a template puts
/// the raw result, or the issue's own text, there.
#[tokio::test]
async fn titles_bodies_and_commit_messages_carry_no_secret() {
    let fake = FakeGitHub::start().await;
    let leaked = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    let agent = format!("#!/bin/sh\ncat > /dev/null\necho change >> README.md\necho 'token {leaked} found'\n");
    let w = setup(
        &fake,
        &agent,
        work("issues.opened")
            .workspace("default-branch")
            .prompt("x")
            .output("pull_request")
            .set("output.title", "{{ result }}")
            .set("output.body", "{{ result }} / {{ job.spec.prompt }}"),
        with_token,
    );
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "title-leak").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let branch = job["branch"].as_str().unwrap();
    let origin = w.path().join("remote/Codertocat/Hello-World.git");
    let message = crate::harness::git(&origin, &["log", "-1", "--format=%B", branch]);
    assert!(!message.contains(leaked) && message.contains("[redacted]"), "{message}");
    eventually("the pull request", || !fake.posts("/repos/Codertocat/Hello-World/pulls").is_empty()).await;
    let pr = &fake.posts("/repos/Codertocat/Hello-World/pulls")[0].body;
    assert!(!pr.to_string().contains(leaked), "{pr}");
    assert!(pr["title"].as_str().unwrap().contains("[redacted]"), "{pr}");
}

/// A change bigger than `output.max_push_bytes` is not pushed.
#[tokio::test]
async fn a_change_over_max_push_bytes_is_never_pushed() {
    let fake = FakeGitHub::start().await;
    let w = setup(
        &fake,
        "#!/bin/sh\nhead -c 5000 /dev/zero | tr '\\0' x > big.txt\necho done\n",
        work("issues.opened")
            .workspace("default-branch")
            .prompt("x")
            .output("pull_request")
            .set("output.max_push_bytes", 1000),
        with_token,
    );
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "too-big").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("5000 bytes, over output.max_push_bytes (1000)"), "{job}");
    let origin = w.path().join("remote/Codertocat/Hello-World.git");
    assert_eq!(crate::harness::git(&origin, &["branch", "--list", "baton/*"]), "");
}

/// A workflow slipped in through a link: `.github` made a link to a folder
/// holding `workflows/evil.yml` is a workflow change like any other.
#[tokio::test]
async fn a_workflow_folder_replaced_by_a_link_needs_consent_too() {
    let fake = FakeGitHub::start().await;
    let agent = "#!/bin/sh\nmkdir -p docs/workflows\nprintf 'on: push\\njobs: {}\\n' > docs/workflows/evil.yml\n\
                 ln -s docs .github\necho done\n";
    let w = setup(
        &fake,
        agent,
        work("issues.opened").workspace("default-branch").prompt("x").output("pull_request"),
        with_token,
    );
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "link-workflow").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("allow_workflow_changes"), "{job}");
    let origin = w.path().join("remote/Codertocat/Hello-World.git");
    assert_eq!(crate::harness::git(&origin, &["branch", "--list", "baton/*"]), "");
}

/// A push the remote refuses fails the job, visibly, and opens no pull
/// request (here a branch `baton` in the origin leaves no room for
/// `baton/…` branches).
#[tokio::test]
async fn a_refused_push_fails_the_job_and_opens_nothing() {
    let fake = FakeGitHub::start().await;
    let w = pr_setup(&fake, "#!/bin/sh\nmkdir -p src && echo fixed > src/lib.txt\necho done\n", identity);
    let bare = w.path().join("remote/Codertocat/Hello-World.git");
    crate::harness::git(&bare, &["branch", "baton", "master"]);
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let id = deliver(&baton, "issues", "issues/opened.payload.json", "refused-1").await;
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().starts_with("pushing the branch failed: git push failed"), "{job}");
    assert!(fake.posts("/repos/Codertocat/Hello-World/pulls").is_empty());
}
