//! GitLab end to end: the real daemon behind `POST /webhooks/gitlab`, a
//! local bare repository with GitLab's `refs/merge-requests/N/head` as the
//! origin (a project in a subgroup), and the recording fake GitLab, which
//! checks every request against GitLab's documented parameters. The fake
//! answers on the test's runtime while `Baton::start` blocks its thread
//! (the daemon asks GitLab who its token is as it starts), so each test
//! runs on more than one thread.

use std::path::{Path, PathBuf};

use baton::forge::gitlab::api::Noteable;
use baton::forge::{Forge, WebhookKeys};
use serde_json::{json, Value};

use crate::fake_github::FakeGitHub;
use crate::fake_gitlab::{FakeGitLab, Faults, BOT};
use crate::harness::{bare_repo, eventually, git, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const HOOK_TOKEN: &str = "gitlab-hook-secret-token-0123";
const TOKEN: &str = "glpat-e2eTokenThatMustNotLeak0123";
const PROJECT: &str = "acme/platform/api";
const PROJECT_ID: u64 = 42;
const MR: u64 = 1;
/// Who opens things: a Developer unless a test says otherwise.
const AUTHOR: (u64, &str) = (1, "root");

/// A GitLab fixture (`tests/fixtures/gitlab/…`, GitLab's documented
/// examples), moved into `PROJECT`.
fn fixture(rel: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gitlab").join(rel);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("JSON");
    v["project"]["path_with_namespace"] = json!(PROJECT);
    v["project"]["id"] = json!(PROJECT_ID);
    v["project"]["default_branch"] = json!("master");
    v
}

fn by(mut v: Value, (id, username): (u64, &str)) -> Value {
    v["user"] = json!({ "id": id, "username": username, "name": username });
    if v["object_attributes"].is_object() && v["object_kind"] != "pipeline" {
        v["object_attributes"]["author_id"] = json!(id);
    }
    v
}

/// Merge request !1 from `feature` at `head`, opened by `who`.
fn mr_opened(head: &str, who: (u64, &str)) -> Value {
    let mut v = by(fixture("merge_request/open.json"), who);
    let a = &mut v["object_attributes"];
    a["iid"] = json!(MR);
    a["source_branch"] = json!("feature");
    a["target_branch"] = json!("master");
    a["source_project_id"] = json!(PROJECT_ID);
    a["target_project_id"] = json!(PROJECT_ID);
    a["last_commit"]["id"] = json!(head);
    a["source"]["path_with_namespace"] = json!(PROJECT);
    v
}

/// A note saying `text` on issue #17 (`mr` is `None`), or on MR !1 at `mr`.
fn note(text: &str, mr: Option<&str>, who: (u64, &str)) -> Value {
    let mut v = match mr {
        None => fixture("note/issue.json"),
        Some(head) => {
            let mut v = fixture("note/merge_request.json");
            let m = &mut v["merge_request"];
            m["iid"] = json!(MR);
            m["source_branch"] = json!("feature");
            m["target_branch"] = json!("master");
            m["source_project_id"] = json!(PROJECT_ID);
            m["target_project_id"] = json!(PROJECT_ID);
            m["last_commit"]["id"] = json!(head);
            v
        }
    };
    v["object_attributes"]["note"] = json!(text);
    by(v, who)
}

/// Pipeline `id` of MR !1 at `head`, failed.
fn pipeline_failed(id: u64, head: &str) -> Value {
    let mut v = fixture("pipeline/success.json");
    v["object_attributes"]["id"] = json!(id);
    v["object_attributes"]["status"] = json!("failed");
    v["object_attributes"]["sha"] = json!(head);
    v["object_attributes"]["ref"] = json!("feature");
    let m = &mut v["merge_request"];
    m["iid"] = json!(MR);
    m["source_branch"] = json!("feature");
    m["target_branch"] = json!("master");
    m["source_project_id"] = json!(PROJECT_ID);
    m["target_project_id"] = json!(PROJECT_ID);
    v
}

/// The origin: `master`, and MR !1 from `feature` one commit ahead, at
/// `refs/merge-requests/1/head` as GitLab keeps it. Returns the bare
/// repository and the MR's head.
fn origin(w: &Workdir) -> (PathBuf, String) {
    let root = w.path().join("remote");
    bare_repo(&root, PROJECT, "master", &[("README.md", "hello\n"), ("fix.txt", "start\n")]);
    let bare = root.join(format!("{PROJECT}.git"));
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "--quiet", "--branch", "master", bare.to_str().unwrap(), "."]);
    std::fs::write(work.path().join("feature.txt"), "fetaure one\nline two\n").unwrap();
    git(work.path(), &["add", "."]);
    git(work.path(), &["commit", "--quiet", "-m", "add feature"]);
    git(work.path(), &["push", "--quiet", "origin", "HEAD:refs/heads/feature"]);
    let head = follow_branch(&bare);
    (bare, head)
}

/// GitLab moves `refs/merge-requests/1/head` when the branch is pushed to.
fn follow_branch(bare: &Path) -> String {
    let sha = git(bare, &["rev-parse", "refs/heads/feature"]);
    git(bare, &["update-ref", "refs/merge-requests/1/head", &sha]);
    sha
}

/// A daemon serving GitLab (the fake's API, `w`'s origin) with `trigger`
/// as `work`, running `agent` (a shell script).
fn scenario(fake: &FakeGitLab, w: &Workdir, agent: &str, trigger: Trigger) -> Scenario {
    let script = w.script("agent.sh", agent);
    Scenario::new()
        .raw(&format!(
            "[gitlab]\nurl = \"https://gitlab.example.com\"\napi_url = \"{}\"\ngit_url = \"file://{}\"\n\
             token = \"env:GITLAB_TOKEN\"\nwebhook_secret = \"{HOOK_TOKEN}\"\n",
            fake.api_url(),
            w.path().join("remote").display()
        ))
        .agent("script", Agent::script(&script).read_write(&[w.shared()]))
        .trigger("work", trigger)
}

fn start(s: &Scenario, w: &Workdir) -> Baton {
    s.write(w);
    Baton::start(w.path(), &[("GITLAB_TOKEN", TOKEN)])
}

/// Sends `body` as GitLab would: `X-Gitlab-Token`, `X-Gitlab-Event` and
/// an `Idempotency-Key`, and with `signing` a Standard Webhooks signature.
async fn send(baton: &Baton, keys: WebhookKeys<'_>, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    let headers = Forge::GITLAB.delivery_headers(keys, event, delivery, body);
    post(baton, &headers.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>(), body).await
}

async fn post(baton: &Baton, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    baton.post_webhook_to("/webhooks/gitlab", headers, body).await
}

const KEYS: WebhookKeys<'static> = WebhookKeys { secret: HOOK_TOKEN.as_bytes(), signing: None };

/// Delivers `payload` as `event`; returns the jobs it started.
async fn deliver(baton: &Baton, event: &str, delivery: &str, payload: &Value) -> Vec<String> {
    let (status, body) = send(baton, KEYS, event, delivery, &serde_json::to_vec(payload).unwrap()).await;
    assert_eq!(status, 202, "{body}");
    body["jobs"]
        .as_array()
        .map(|j| j.iter().filter_map(|j| j.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn assert_no_violations(fake: &FakeGitLab) {
    assert_eq!(fake.violations(), Vec::<String>::new(), "requests outside GitLab's documented parameters");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fix_note_on_an_issue_opens_a_merge_request() {
    let fake = FakeGitLab::start(TOKEN).await;
    fake.set_member(PROJECT, AUTHOR.0, 30);
    let w = Workdir::new();
    let (bare, _) = origin(&w);
    let fix = Trigger::on(&["note.issue"])
        .agent("script")
        .workspace("default-branch")
        .filter("command", "/fix")
        .prompt("Fix #{{ subject.number }}: {{ subject.title }}")
        .output("pull_request");
    let baton = start(&scenario(&fake, &w, "#!/bin/sh\necho fixed >> fix.txt\necho \"I fixed it. token=${GITLAB_TOKEN:-unset} $(git config --get http.extraHeader)\"\n", fix), &w);

    // The note is on GitLab before its webhook arrives.
    let mut asked = note("/fix please", None, AUTHOR);
    asked["object_attributes"]["id"] = json!(fake.add_note_by(PROJECT, Noteable::Issue(17), AUTHOR.1, "/fix please"));
    let jobs = deliver(&baton, "note", "fix-1", &asked).await;
    assert_eq!(jobs.len(), 1);
    let job = baton.finished(&jobs[0]).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let branch = job["branch"].as_str().expect("a branch was pushed").to_string();
    assert_eq!(git(&bare, &["show", &format!("{branch}:fix.txt")]), "start\nfixed");

    eventually("the merge request", || !fake.merge_requests(PROJECT).is_empty()).await;
    let mrs = fake.merge_requests(PROJECT);
    assert_eq!(mrs.len(), 1, "{mrs:?}");
    assert_eq!((mrs[0].source_branch.as_str(), mrs[0].target_branch.as_str()), (branch.as_str(), "master"));
    assert!(mrs[0].description.contains("I fixed it.") && mrs[0].description.contains(&jobs[0]), "{mrs:?}");
    // The agent saw neither the token nor git's credentials.
    assert!(mrs[0].description.contains("token=unset") && !mrs[0].description.contains("Authorization"), "{mrs:?}");
    // 👀 on the note that asked, by baton's token user.
    let eyes = fake.emoji();
    assert!(eyes.iter().any(|e| e.name == "eyes" && e.on.starts_with(&format!("{PROJECT}#17/"))), "{eyes:?}");
    assert_no_violations(&fake);
    assert!(!baton.log_text().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_opened_merge_request_gets_one_review_of_inline_notes_with_a_suggestion() {
    let fake = FakeGitLab::start(TOKEN).await;
    fake.set_member(PROJECT, AUTHOR.0, 30);
    let w = Workdir::new();
    let (_, head) = origin(&w);
    fake.set_versions(
        PROJECT,
        MR,
        vec![json!({ "id": 7, "head_commit_sha": head, "base_commit_sha": "b0", "start_commit_sha": "s0", "state": "collected" })],
    );
    fake.set_diffs(
        PROJECT,
        MR,
        vec![json!({ "old_path": "feature.txt", "new_path": "feature.txt", "new_file": true, "renamed_file": false,
                     "deleted_file": false, "diff": "@@ -0,0 +1,2 @@\n+fetaure one\n+line two\n" })],
    );
    let review = r#"#!/bin/sh
cat > /dev/null
cat <<'EOF'
{"summary": "One typo.", "comments": [
  {"path": "feature.txt", "line": 1, "body": "Typo.", "suggestion": "feature one\n"},
  {"path": "README.md", "line": 40, "body": "Not in this diff."}
]}
EOF
"#;
    let t = Trigger::on(&["merge_request.open"]).agent("script").workspace("pr-head").prompt("review").output("review");
    let baton = start(&scenario(&fake, &w, review, t), &w);

    let jobs = deliver(&baton, "merge_request", "mr-open-1", &mr_opened(&head, AUTHOR)).await;
    let job = baton.finished(&jobs[0]).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let marker = format!("<!-- baton:review={} -->", jobs[0]);
    let on = Noteable::MergeRequest(MR);
    eventually("the review", || fake.notes(PROJECT, on).iter().any(|n| n.body.contains(&marker))).await;
    let inline = fake.published_discussions(PROJECT, MR);
    let diff_notes: Vec<_> = inline.iter().filter(|n| n.position.is_some()).collect();
    assert_eq!(diff_notes.len(), 1, "{inline:?}");
    let position = diff_notes[0].position.as_ref().unwrap();
    assert_eq!(position["new_line"], 1, "{position}");
    assert_eq!(position["head_sha"], head.as_str(), "{position}");
    assert!(diff_notes[0].body.contains("```suggestion:-0+0\nfeature one\n```"), "{}", diff_notes[0].body);
    let summary: Vec<_> = fake.notes(PROJECT, on).into_iter().filter(|n| n.body.contains(&marker)).collect();
    assert_eq!(summary.len(), 1, "one summary: {summary:?}");
    assert!(summary[0].body.contains("README.md:40") && summary[0].author == BOT, "{summary:?}");
    assert!(fake.drafts(PROJECT, MR).is_empty(), "every draft was published");
    assert!(fake.approvals(PROJECT, MR).is_empty(), "no approval without allow_approve");
    assert_no_violations(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_pipeline_is_repaired_by_pushes_to_the_branch_and_the_third_repair_is_refused() {
    let fake = FakeGitLab::start(TOKEN).await;
    let w = Workdir::new();
    let (bare, mut head) = origin(&w);
    let seen = w.shared().join("prompt.txt");
    let agent = format!("#!/bin/sh\ncat > {}\necho repaired >> fix.txt\necho 'Repaired.'\n", seen.display());
    let t = Trigger::on(&["pipeline.failed"])
        .agent("script")
        .workspace("pr-head")
        .prompt("The pipeline failed; fix it.")
        .output("push")
        .job("max_repairs_per_pr", 2);
    let baton = start(&scenario(&fake, &w, &agent, t), &w);
    for (n, pipeline) in [(1, 501u64), (2, 502), (3, 503)] {
        let failed = json!({ "id": pipeline * 10, "name": "unit", "stage": "test", "status": "failed" });
        fake.set_jobs(PROJECT, pipeline, vec![failed]);
        fake.set_trace(PROJECT, pipeline * 10, format!("compiling\nerror: assertion failed in run {n}\n").as_bytes());
        let jobs =
            deliver(&baton, "pipeline", &format!("pipeline-{pipeline}"), &pipeline_failed(pipeline, &head)).await;
        assert_eq!(jobs.len(), 1, "pipeline {pipeline}");
        let job = baton.finished(&jobs[0]).await;
        if n < 3 {
            assert_eq!(job["state"], "succeeded", "{job}");
            let prompt = std::fs::read_to_string(&seen).unwrap();
            assert!(prompt.contains(&format!("error: assertion failed in run {n}")), "the log tail: {prompt}");
            let now = follow_branch(&bare);
            assert_ne!(now, head, "repair {n} pushed to the MR's branch");
            assert_eq!(git(&bare, &["log", "-1", "--format=%P", &now]), head, "a fast-forward of the head it ran at");
            head = now;
        } else {
            assert_eq!(job["state"], "failed", "{job}");
            let error = job["error"].as_str().unwrap_or_default();
            assert!(error.contains("pushed 2 repairs") && error.contains("max_repairs_per_pr = 2"), "{error}");
            assert_eq!(follow_branch(&bare), head, "nothing pushed");
        }
    }
    assert_no_violations(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outsiders_merge_request_waits_for_a_maintainers_approve_note() {
    let fake = FakeGitLab::start(TOKEN).await;
    let (outsider, reporter, maintainer) = ((5, "stranger"), (6, "reporter"), (7, "lead"));
    fake.set_member(PROJECT, reporter.0, 20);
    fake.set_member(PROJECT, maintainer.0, 40);
    let w = Workdir::new();
    let (_, head) = origin(&w);
    let t = Trigger::on(&["merge_request.open"]).agent("script").workspace("pr-head").prompt("look").output("comment");
    let baton = start(&scenario(&fake, &w, "#!/bin/sh\necho looked\n", t), &w);

    let opened = serde_json::to_vec(&mr_opened(&head, outsider)).unwrap();
    let (status, body) = send(&baton, KEYS, "merge_request", "mr-out-1", &opened).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!((body["jobs"].as_array().map(Vec::len), body["held"].as_u64()), (Some(0), Some(1)), "{body}");

    // A Reporter is an outsider too: their approval releases nothing.
    assert!(deliver(&baton, "note", "approve-1", &note("/baton approve", Some(&head), reporter)).await.is_empty());
    let jobs = deliver(&baton, "note", "approve-2", &note("/baton approve", Some(&head), maintainer)).await;
    assert_eq!(jobs.len(), 1, "the Maintainer's approval released the held job");
    let job = baton.finished(&jobs[0]).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let marker = format!("<!-- baton:job={} -->", jobs[0]);
    let on = Noteable::MergeRequest(MR);
    eventually("the result note", || fake.notes(PROJECT, on).iter().any(|n| n.body.contains(&marker))).await;
    // Each person's standing was asked of GitLab once, then kept.
    let asked = fake.requests_to("GET", &format!("/projects/{PROJECT}/members/all/"));
    assert_eq!(asked.len(), 3, "{:?}", asked.iter().map(|r| &r.path).collect::<Vec<_>>());
    assert_no_violations(&fake);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_is_refused_and_a_signed_hook_refuses_replays_and_unsigned_bodies() {
    use base64::Engine as _;
    let fake = FakeGitLab::start(TOKEN).await;
    fake.set_member(PROJECT, AUTHOR.0, 30);
    let w = Workdir::new();
    origin(&w);
    let signing =
        format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(b"signing-key-0123456789abcdef"));
    let t = Trigger::on(&["issue.open"]).agent("script").workspace("none").prompt("look").output("none");
    let s = scenario(&fake, &w, "#!/bin/sh\necho ok\n", t).set("gitlab.signing_token", signing.as_str());
    let baton = start(&s, &w);
    let body = serde_json::to_vec(&by(fixture("issue/open.json"), AUTHOR)).unwrap();
    let signed = WebhookKeys { secret: HOOK_TOKEN.as_bytes(), signing: Some(signing.as_bytes()) };

    let wrong = WebhookKeys { secret: b"not-the-hook-token", signing: Some(signing.as_bytes()) };
    let (status, answer) = send(&baton, wrong, "issue", "i-1", &body).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = send(&baton, KEYS, "issue", "i-2", &body).await;
    assert_eq!(status, 401, "an unsigned body: {answer}");

    let headers = Forge::GITLAB.delivery_headers(signed, "issue", "i-3", &body);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, answer) = post(&baton, &headers, &body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"].as_array().map(Vec::len), Some(1), "{answer}");
    // The same signed request again: stored once.
    let (status, answer) = post(&baton, &headers, &body).await;
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)), "{answer}");
    // Signed ten minutes ago: outside the window, refused whatever its id.
    let old = chrono::Utc::now().timestamp() - 600;
    let sig = baton::forge::gitlab::sign(signing.as_bytes(), "i-4", old, &body);
    let old = old.to_string();
    let stale = [
        ("x-gitlab-token", HOOK_TOKEN),
        ("x-gitlab-event", "Issue Hook"),
        ("idempotency-key", "i-4"),
        ("webhook-id", "i-4"),
        ("webhook-timestamp", old.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    let (status, answer) = post(&baton, &stale, &body).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer["error"].as_str().unwrap_or_default().contains("window"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trigger_reviews_on_github_and_gitlab_in_one_daemon() {
    let gitlab = FakeGitLab::start(TOKEN).await;
    let github = FakeGitHub::start().await;
    gitlab.set_member(PROJECT, AUTHOR.0, 30);
    let w = Workdir::new();
    let (_, head) = origin(&w);
    let t = Trigger::on(&["pull_request.opened", "merge_request.open"])
        .agent("script")
        .workspace("none")
        .prompt("review {{ subject.kind }} {{ subject.number }} on {{ repository.full_name }}")
        .output("review");
    let secret = "both-forges-github-secret";
    let s = scenario(&gitlab, &w, "#!/bin/sh\necho 'Reviewed.'\n", t)
        .github(GitHub::secret(secret).api(&github).repos(&w.path().join("remote")).token("env:GITHUB_TOKEN"));
    s.write(&w);
    let baton = Baton::start(w.path(), &[("GITLAB_TOKEN", TOKEN), ("GITHUB_TOKEN", "ghp_bothForgesToken0123456789")]);

    let gl = deliver(&baton, "merge_request", "both-1", &mr_opened(&head, AUTHOR)).await;
    let pr = crate::harness::fixture("pull_request/opened.payload.json");
    let (status, body) = baton.deliver(secret, "pull_request", "both-2", &pr).await;
    assert_eq!(status, 202, "{body}");
    let gh: Vec<String> = body["jobs"].as_array().unwrap().iter().map(|j| j.as_str().unwrap().to_string()).collect();
    assert_eq!((gl.len(), gh.len()), (1, 1));
    for id in [&gl[0], &gh[0]] {
        assert_eq!(baton.finished(id).await["state"], "succeeded");
    }
    let gl_job = baton.job(&gl[0]).await;
    assert_eq!(gl_job["forge"], "gitlab", "{gl_job}");
    assert_eq!(baton.job(&gh[0]).await["forge"], "github");
    // The dashboard says which forge, and names a merge request `!N`.
    let (status, page) = baton.get(&format!("/jobs/{}", gl[0])).await;
    let page = page.as_str().unwrap_or_default().to_string();
    assert_eq!(status, 200);
    assert!(
        page.contains(r#"<span id="forge">gitlab</span>"#) && page.contains("acme&#x2f;platform&#x2f;api !1"),
        "{page}"
    );
    let marker = format!("<!-- baton:job={} -->", gl[0]);
    let on = Noteable::MergeRequest(MR);
    eventually("the GitLab review", || gitlab.notes(PROJECT, on).iter().any(|n| n.body.contains(&marker))).await;
    eventually("the GitHub review", || !github.review_posts().is_empty()).await;
    assert!(github.review_posts()[0]["body"].as_str().unwrap().contains(&gh[0]));
    assert_no_violations(&gitlab);
}

#[tokio::test(flavor = "multi_thread")]
async fn notes_land_exactly_once_when_gitlab_answers_502_after_applying() {
    let fake = FakeGitLab::start_with(TOKEN, Faults { fail_every_nth_write: Some(2) }).await;
    fake.set_member(PROJECT, AUTHOR.0, 30);
    let w = Workdir::new();
    origin(&w);
    let t =
        Trigger::on(&["issue.open"]).agent("script").workspace("none").prompt("{{ event.delivery }}").output("comment");
    let baton = start(&scenario(&fake, &w, "#!/bin/sh\necho \"result of $(cat)\"\n", t), &w);
    let mut ids = Vec::new();
    let mut iid = 0;
    for n in 0..3 {
        let mut issue = by(fixture("issue/open.json"), AUTHOR);
        iid = issue["object_attributes"]["iid"].as_u64().unwrap();
        issue["test_run"] = json!(n); // GitLab never sends one body twice
        let jobs = deliver(&baton, "issue", &format!("flaky-{n}"), &issue).await;
        ids.push(jobs[0].clone());
    }
    for id in &ids {
        assert_eq!(baton.finished(id).await["state"], "succeeded");
    }
    let on = Noteable::Issue(iid);
    let marker = |id: &str| format!("<!-- baton:job={id} -->");
    let all_final = || {
        let notes = fake.notes(PROJECT, on);
        ids.iter().all(|id| notes.iter().any(|n| n.body.contains(&marker(id)) && n.body.starts_with("result of")))
    };
    eventually("every status note edited to its result", all_final).await;
    let notes = fake.notes(PROJECT, on);
    assert_eq!(notes.len(), ids.len(), "exactly one note per job: {notes:#?}");
    for (n, id) in ids.iter().enumerate() {
        let mine: Vec<_> = notes.iter().filter(|c| c.body.contains(&format!("job={id}"))).collect();
        assert_eq!(mine.len(), 1, "{id}: {notes:#?}");
        assert!(mine[0].body.starts_with(&format!("result of gitlab:flaky-{n}")), "{}", mine[0].body);
        assert_eq!(mine[0].author, BOT);
    }
    let looked = fake.requests_to("GET", &format!("/projects/{PROJECT}/issues/{iid}/notes"));
    assert!(!looked.is_empty(), "a lost answer was looked for by its marker");
    assert_no_violations(&fake);
}

/// `baton simulate --forge gitlab` explains a GitLab payload, and `baton
/// deliver --forge gitlab` sends one as GitLab would (signed, when the hook
/// signs), which the daemon takes.
#[tokio::test(flavor = "multi_thread")]
async fn simulate_and_deliver_speak_gitlab() {
    use base64::Engine as _;
    let fake = FakeGitLab::start(TOKEN).await;
    fake.set_member(PROJECT, AUTHOR.0, 30);
    let w = Workdir::new();
    origin(&w);
    let signing = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(b"cli-signing-key-0123456789"));
    let t =
        Trigger::on(&["merge_request.open"]).agent("script").workspace("none").prompt("look at !{{ subject.number }}");
    let s = scenario(&fake, &w, "#!/bin/sh\necho ok\n", t.output("none")).set("gitlab.signing_token", signing.as_str());
    let baton = start(&s, &w);
    let payload = w.path().join("mr.json");
    std::fs::write(&payload, serde_json::to_vec(&mr_opened("abc123", AUTHOR)).unwrap()).unwrap();

    let simulated = std::process::Command::new(crate::harness::BIN)
        .args(["simulate", "--forge", "gitlab", "--event", "merge_request", "--payload"])
        .arg(&payload)
        .current_dir(w.path())
        .env("GITLAB_TOKEN", TOKEN)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&simulated.stdout);
    let errors = String::from_utf8_lossy(&simulated.stderr);
    assert!(shown.contains("event: merge_request.open") && shown.contains("look at !1"), "{shown}{errors}");

    let url = format!("{}/webhooks/gitlab", baton.url);
    let deliver = |signed: bool| {
        let mut cmd = std::process::Command::new(crate::harness::BIN);
        cmd.args(["deliver", "--forge", "gitlab", "--url", &url, "--secret", HOOK_TOKEN, "--event", "merge_request"])
            .arg(&payload)
            .env_remove("BATON_SIGNING_TOKEN");
        if signed {
            cmd.env("BATON_SIGNING_TOKEN", &signing);
        }
        let out = cmd.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let (ok, answer) = deliver(false);
    assert!(!ok && answer.starts_with("401"), "an unsigned delivery to a signing hook: {answer}");
    let (ok, answer) = deliver(true);
    assert!(ok && answer.starts_with("202"), "{answer}");
}

/// A push to the MR (`merge_request.update`) is reviewed again for what
/// changed since: the finding already posted on a line that reads the same
/// is not repeated, the new one is.
#[tokio::test(flavor = "multi_thread")]
async fn a_re_review_after_a_push_repeats_no_finding() {
    let fake = FakeGitLab::start(TOKEN).await;
    fake.set_member(PROJECT, AUTHOR.0, 30);
    let w = Workdir::new();
    let (bare, first) = origin(&w);
    let set_mr = |head: &str, diff: &str| {
        let v = json!({ "id": 7, "head_commit_sha": head, "base_commit_sha": "b0", "start_commit_sha": "s0" });
        fake.set_versions(PROJECT, MR, vec![v]);
        let file = json!({ "old_path": "feature.txt", "new_path": "feature.txt", "new_file": true,
                           "renamed_file": false, "deleted_file": false, "diff": diff });
        fake.set_diffs(PROJECT, MR, vec![file]);
    };
    set_mr(&first, "@@ -0,0 +1,2 @@\n+fetaure one\n+line two\n");
    let agent = r#"#!/bin/sh
cat > /dev/null
echo '{"summary": "Review.", "comments": [{"path": "feature.txt", "line": 1, "body": "Typo."}, {"path": "feature.txt", "line": 3, "body": "Third line."}]}'
"#;
    let t = Trigger::on(&["merge_request.open", "merge_request.update"])
        .agent("script")
        .workspace("pr-head")
        .prompt("review")
        .output("review");
    let baton = start(&scenario(&fake, &w, agent, t), &w);
    let jobs = deliver(&baton, "merge_request", "rr-1", &mr_opened(&first, AUTHOR)).await;
    assert_eq!(baton.finished(&jobs[0]).await["state"], "succeeded");
    let on = Noteable::MergeRequest(MR);
    let reviewed = |id: &str| {
        let marker = format!("<!-- baton:review={id} -->");
        fake.notes(PROJECT, on).into_iter().any(|n| n.body.contains(&marker))
    };
    eventually("the first review", || reviewed(&jobs[0])).await;
    let inline = |fake: &FakeGitLab| {
        fake.published_discussions(PROJECT, MR).into_iter().filter(|n| n.position.is_some()).count()
    };
    assert_eq!(inline(&fake), 1, "line 3 is not in the first diff");

    // A third line is pushed.
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "--quiet", "--branch", "feature", bare.to_str().unwrap(), "."]);
    std::fs::write(work.path().join("feature.txt"), "fetaure one\nline two\nline three\n").unwrap();
    git(work.path(), &["commit", "--quiet", "-am", "third line"]);
    git(work.path(), &["push", "--quiet", "origin", "HEAD:refs/heads/feature"]);
    let second = follow_branch(&bare);
    set_mr(&second, "@@ -0,0 +1,3 @@\n+fetaure one\n+line two\n+line three\n");
    let mut update = mr_opened(&second, AUTHOR);
    update["object_attributes"]["action"] = json!("update");
    update["object_attributes"]["updated_at"] = json!("2030-01-01 00:00:00 UTC");
    let jobs2 = deliver(&baton, "merge_request", "rr-2", &update).await;
    assert_eq!(baton.finished(&jobs2[0]).await["state"], "succeeded");
    eventually("the second review", || reviewed(&jobs2[0])).await;
    assert_eq!(inline(&fake), 2, "only the new finding went inline again");
    let marker = format!("<!-- baton:review={} -->", jobs2[0]);
    let summary = fake.notes(PROJECT, on).into_iter().find(|n| n.body.contains(&marker)).unwrap();
    assert!(summary.body.contains("1 finding from an earlier review still apply"), "{}", summary.body);
    assert_no_violations(&fake);
}
