//! Agents that work on the pull request itself. `[output] kind = "push"`:
//! the agent's change lands on the pull request's own branch as a
//! fast-forward of the head the job ran at, never forced; the CI repair
//! loop built on it, bounded per pull request; fixes asked for in review
//! threads; and reviews that cover only what changed since the last one. A local
//! bare repository is the origin (with GitHub's `refs/pull/N/head`), the
//! fake GitHub takes the comments.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::fake_github::FakeGitHub;
use crate::harness::{bare_repo, eventually, fixture_json, git, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "push-secret";
const TOKEN: &str = "ghp_pushTestToken0123456789abcdefghijklm";
const PR: &str = "Codertocat/Hello-World#2";

/// The origin: `master` with two files, and pull request #2 from branch
/// `changes` one commit ahead. Returns the bare repository and the PR head.
fn origin(w: &Workdir) -> (PathBuf, String) {
    let root = w.path().join("remote");
    bare_repo(&root, "Codertocat/Hello-World", "master", &[("README.md", "hello\n"), ("fix.txt", "start\n")]);
    let bare = root.join("Codertocat/Hello-World.git");
    let head = advance(&bare, "master", "changes", "feature.txt", "feature\n");
    (bare, head)
}

/// Commits `file` = `content` on top of `from` and pushes it to `branch`,
/// moving `refs/pull/2/head` with it as GitHub does; returns the commit.
fn advance(bare: &Path, from: &str, branch: &str, file: &str, content: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "--quiet", "--branch", from, bare.to_str().unwrap(), "."]);
    std::fs::write(work.path().join(file), content).unwrap();
    git(work.path(), &["add", "."]);
    git(work.path(), &["commit", "--quiet", "-m", &format!("edit {file}")]);
    git(work.path(), &["push", "--quiet", "origin", &format!("HEAD:refs/heads/{branch}")]);
    let sha = git(work.path(), &["rev-parse", "HEAD"]);
    git(bare, &["update-ref", "refs/pull/2/head", &sha]);
    sha
}

/// GitHub moves `refs/pull/2/head` when the branch is pushed to.
fn follow_branch(bare: &Path) -> String {
    let sha = git(bare, &["rev-parse", "refs/heads/changes"]);
    git(bare, &["update-ref", "refs/pull/2/head", &sha]);
    sha
}

/// The `work` trigger: on `on`, agent `script` at the pull request's head.
fn job(on: &str, prompt: &str) -> Trigger {
    Trigger::on(&[on]).agent("script").workspace("pr-head").prompt(prompt)
}

/// `job`, pushing what the agent changes, titled after the result.
fn push(on: &str) -> Trigger {
    job(on, "fix it").output("push").set("output.title", "Fix: {{ result }}")
}

/// A daemon whose `work` trigger is `trigger`, with the `agent` script.
fn daemon(fake: &FakeGitHub, w: &Workdir, agent: &str, trigger: Trigger) -> Baton {
    let script = w.script("agent.sh", agent);
    Scenario::new()
        .github(GitHub::secret(SECRET).api(fake).repos(&w.path().join("remote")).token("env:GITHUB_TOKEN"))
        .agent("script", Agent::script(&script).read_write(&[w.shared()]))
        .trigger("work", trigger)
        .write(w);
    Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)])
}

/// Pull request #2 as an event of `action` at `head`.
fn pull_request(action: &str, head: &str, updated_at: &str) -> Vec<u8> {
    let mut p = fixture_json("pull_request/opened.payload.json");
    p["action"] = json!(action);
    p["pull_request"]["head"]["sha"] = json!(head);
    p["pull_request"]["updated_at"] = json!(updated_at);
    serde_json::to_vec(&p).unwrap()
}

/// A check on pull request #2 that failed at `head` (`run` tells runs apart).
fn check_failed(head: &str, run: u64) -> Vec<u8> {
    let mut p = fixture_json("check_run/completed.payload.json");
    p["check_run"]["id"] = json!(run);
    p["check_run"]["conclusion"] = json!("failure");
    p["check_run"]["head_sha"] = json!(head);
    p["check_run"]["check_suite"]["head_sha"] = json!(head);
    p["check_run"]["check_suite"]["conclusion"] = json!("failure");
    p["check_run"]["pull_requests"][0]["head"]["sha"] = json!(head);
    serde_json::to_vec(&p).unwrap()
}

async fn deliver(baton: &Baton, event: &str, delivery: &str, body: &[u8]) -> Option<String> {
    let (status, answer) = baton.deliver(SECRET, event, delivery, body).await;
    assert_eq!(status, 202, "{answer}");
    answer["jobs"][0].as_str().map(str::to_string)
}

fn log_of(bare: &Path, range: &str, format: &str) -> String {
    git(bare, &["log", &format!("--format={format}"), range])
}

/// A push on a pull request's own event lands as one bot commit on top of
/// the head the job ran at; its message is the redacted title template; the
/// status comment names the commit; the agent's own `.git` is not what is
/// pushed.
#[tokio::test]
async fn a_push_lands_one_bot_commit_on_the_pull_requests_branch_and_the_status_comment_names_it() {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let (bare, head) = origin(&w);
    let leaked = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    let agent = format!("#!/bin/sh\ncat > /dev/null\necho fixed >> fix.txt\necho 'the typo (token {leaked})'\n");
    let baton = daemon(&fake, &w, &agent, push("pull_request.opened"));
    let id = deliver(&baton, "pull_request", "push-1", &pull_request("opened", &head, "2026-01-01T00:00:00Z"))
        .await
        .expect("a job");
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let pushed = git(&bare, &["rev-parse", "refs/heads/changes"]);
    assert_eq!(job["commit"], pushed.as_str(), "{job}");
    assert_eq!(git(&bare, &["rev-parse", &format!("{pushed}^")]), head, "a fast-forward of the head it ran at");
    assert_eq!(
        log_of(&bare, &format!("{head}..{pushed}"), "%an <%ae>"),
        "baton[bot] <baton[bot]@users.noreply.github.com>"
    );
    let message = log_of(&bare, &format!("{head}..{pushed}"), "%B");
    assert!(message.starts_with("Fix: the typo (token ") && !message.contains(leaked), "{message}");
    assert_eq!(git(&bare, &["show", &format!("{pushed}:fix.txt")]), "start\nfixed");
    eventually("the status comment to name the commit", || {
        fake.comments(PR).iter().any(|c| c.body.contains(&format!("Pushed {pushed} to `changes`.")))
    })
    .await;
    assert!(fake.posts("/repos/Codertocat/Hello-World/pulls").is_empty(), "no new pull request");
}

/// `/fix` on a pull request, in a trigger whose output is `push`, updates
/// that pull request: its head and branch come from what baton noted of
/// the PR's own events.
#[tokio::test]
async fn slash_fix_on_a_pull_request_pushes_to_it() {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let (bare, head) = origin(&w);
    let agent = "#!/bin/sh\ncat > /dev/null\necho fixed >> fix.txt\necho 'Fixed.'\n";
    let baton = daemon(&fake, &w, agent, push("issue_comment.created").filter("command", "/fix"));
    // The trigger ignores the PR's own event; baton notes its head.
    assert_eq!(
        deliver(&baton, "pull_request", "fix-pr", &pull_request("opened", &head, "2026-01-01T00:00:00Z")).await,
        None
    );
    let mut comment = fixture_json("issue_comment/created.payload.json");
    comment["issue"]["number"] = json!(2);
    comment["issue"]["pull_request"] = json!({ "url": "https://api.github.com/repos/Codertocat/Hello-World/pulls/2" });
    comment["comment"]["body"] = json!("/fix the typo please");
    let id = deliver(&baton, "issue_comment", "fix-1", &serde_json::to_vec(&comment).unwrap()).await.expect("a job");
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let pushed = git(&bare, &["rev-parse", "refs/heads/changes"]);
    assert_eq!(git(&bare, &["rev-parse", &format!("{pushed}^")]), head);
    assert_eq!(job["commit"], pushed.as_str());
}

/// An agent that says it started, waits for the test to say go (after
/// moving the branch), then changes `file`.
fn waiting_agent(shared: &Path, file: &str) -> String {
    let s = shared.display();
    format!(
        "#!/bin/sh\ncat > /dev/null\ntouch {s}/started\nwhile [ ! -f {s}/go ]; do sleep 0.05; done\n\
         echo agent >> {file}\necho 'Agent change.'\n"
    )
}

/// Runs a push job whose branch someone else moves (changing `their_file`)
/// while the agent works (changing `our_file`); returns the job, the head
/// it ran at, the head someone else pushed, and the folder with the origin.
async fn moved_while_working(on_moved: &str, our_file: &str, their_file: &str) -> (Value, String, String, Workdir) {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let (bare, head) = origin(&w);
    let trigger = push("pull_request.opened")
        .job("verify", vec!["sh", "-c", "grep -q agent fix.txt || grep -q agent feature.txt"])
        .set("output.on_moved", on_moved);
    let agent = waiting_agent(w.shared(), our_file);
    let baton = daemon(&fake, &w, &agent, trigger);
    let id = deliver(&baton, "pull_request", "moved-1", &pull_request("opened", &head, "2026-01-01T00:00:00Z"))
        .await
        .expect("a job");
    eventually("the agent to start", || w.shared().join("started").exists()).await;
    let theirs = advance(&bare, "changes", "changes", their_file, "theirs\n");
    std::fs::write(w.shared().join("go"), "").unwrap();
    let job = baton.finished(&id).await;
    (job, head, theirs, w)
}

fn bare_of(w: &Workdir) -> PathBuf {
    w.path().join("remote/Codertocat/Hello-World.git")
}

/// A branch that moved while the agent worked is never overwritten: the
/// job fails naming both heads (on_moved = "fail", the default).
#[tokio::test]
async fn a_branch_that_moved_is_not_overwritten_and_the_job_names_both_heads() {
    let (job, head, theirs, w) = moved_while_working("fail", "fix.txt", "other.txt").await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains(&format!("the branch moved from {head} to {theirs}")), "{error}");
    assert!(error.contains("nothing was pushed"), "{error}");
    assert_eq!(git(&bare_of(&w), &["rev-parse", "refs/heads/changes"]), theirs);
}

/// With on_moved = "rebase" the change is replayed onto the new head and
/// verified again before it is pushed; a change that no longer applies
/// pushes nothing.
#[tokio::test]
async fn on_moved_rebase_replays_the_change_onto_the_new_head_or_pushes_nothing() {
    let (job, _, theirs, w) = moved_while_working("rebase", "fix.txt", "other.txt").await;
    let bare = bare_of(&w);
    assert_eq!(job["state"], "succeeded", "{job}");
    let pushed = git(&bare, &["rev-parse", "refs/heads/changes"]);
    assert_eq!(git(&bare, &["rev-parse", &format!("{pushed}^")]), theirs, "on top of the new head");
    assert_eq!(git(&bare, &["show", &format!("{pushed}:other.txt")]), "theirs");
    assert_eq!(git(&bare, &["show", &format!("{pushed}:fix.txt")]), "start\nagent");
    assert_eq!(job["commit"], pushed.as_str());

    // Both sides change the same line: nothing applies, nothing is pushed.
    let (job, _, theirs, w) = moved_while_working("rebase", "feature.txt", "feature.txt").await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("does not apply"), "{job}");
    assert_eq!(git(&bare_of(&w), &["rev-parse", "refs/heads/changes"]), theirs);
}

/// The CI repair loop, end to end: a check fails on a pull request, the
/// agent fixes it and baton pushes; the new head's check fails again, twice.
/// With `max_repairs_per_pr = 2` the third repair is refused with one
/// comment, and a later failure is refused without another. A failure seen
/// on a head the branch has since left pushes nothing.
#[tokio::test]
async fn the_ci_repair_loop_pushes_fixes_until_its_bound_then_says_so_once() {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let (bare, head) = origin(&w);
    let agent = "#!/bin/sh\ncat > /dev/null\necho repaired >> fix.txt\necho 'Repaired the test.'\n";
    let trigger = push("check_run.completed")
        .job("max_repairs_per_pr", 2)
        .job("concurrency", "repair-{{ repository.full_name }}")
        .job("on_conflict", "queue")
        .filter("conclusions", vec!["failure"]);
    let baton = daemon(&fake, &w, agent, trigger);

    let first = deliver(&baton, "check_run", "ci-1", &check_failed(&head, 1)).await.expect("a repair");
    assert_eq!(baton.finished(&first).await["state"], "succeeded");
    let h1 = follow_branch(&bare);
    assert_eq!(git(&bare, &["rev-parse", &format!("{h1}^")]), head);

    // A failure reported late for the head baton already replaced: the
    // branch is not where that failure was, so nothing is pushed.
    let stale = deliver(&baton, "check_run", "ci-stale", &check_failed(&head, 9)).await.expect("a job");
    let job = baton.finished(&stale).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("moved"), "{job}");
    assert_eq!(git(&bare, &["rev-parse", "refs/heads/changes"]), h1);

    let second = deliver(&baton, "check_run", "ci-2", &check_failed(&h1, 2)).await.expect("a repair");
    assert_eq!(baton.finished(&second).await["state"], "succeeded");
    let h2 = follow_branch(&bare);
    assert_eq!(git(&bare, &["rev-parse", &format!("{h2}^")]), h1);

    let third = deliver(&baton, "check_run", "ci-3", &check_failed(&h2, 3)).await.expect("a job");
    let job = baton.finished(&third).await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("pushed 2 repairs") && error.contains("max_repairs_per_pr = 2"), "{error}");
    assert_eq!(git(&bare, &["rev-parse", "refs/heads/changes"]), h2, "nothing more was pushed");
    eventually("the comment saying baton stops", || {
        fake.comments(PR).iter().any(|c| c.body.contains("it stops repairing it here"))
    })
    .await;

    let fourth = deliver(&baton, "check_run", "ci-4", &check_failed(&h2, 4)).await.expect("a job");
    assert_eq!(baton.finished(&fourth).await["state"], "failed");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let stops = fake.comments(PR).iter().filter(|c| c.body.contains("it stops repairing it here")).count();
    assert_eq!(stops, 1, "said once");
    assert_eq!(
        git(&bare, &["log", "--format=%an", "master..changes"]).lines().filter(|a| a.contains("baton")).count(),
        2
    );
}

/// The repairs' count starts again when a person pushes to the pull
/// request's branch, and only then: the head events of baton's own pushes
/// (even one arriving after a person's) leave it alone.
#[tokio::test]
async fn a_persons_push_restarts_the_repair_count_and_batons_own_pushes_do_not() {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let (bare, head) = origin(&w);
    let agent = "#!/bin/sh\ncat > /dev/null\necho repaired >> fix.txt\necho 'Repaired the test.'\n";
    let trigger = push("check_run.completed").job("max_repairs_per_pr", 1).filter("conclusions", vec!["failure"]);
    let baton = daemon(&fake, &w, agent, trigger);
    let synchronize = |delivery: &'static str, sha: String, at: &'static str| {
        let baton = &baton;
        async move { deliver(baton, "pull_request", delivery, &pull_request("synchronize", &sha, at)).await }
    };

    let first = deliver(&baton, "check_run", "rc-1", &check_failed(&head, 1)).await.expect("a repair");
    assert_eq!(baton.finished(&first).await["state"], "succeeded");
    let h1 = follow_branch(&bare);
    // GitHub tells of baton's own push: the count stands, the next is refused.
    synchronize("sync-1", h1.clone(), "2026-01-01T00:01:00Z").await;
    let refused = deliver(&baton, "check_run", "rc-2", &check_failed(&h1, 2)).await.expect("a job");
    let job = baton.finished(&refused).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("pushed 1 repairs"), "{job}");

    // A person pushes: the count starts again, and so does repairing.
    let theirs = advance(&bare, "changes", "changes", "theirs.txt", "a person's change\n");
    synchronize("sync-2", theirs.clone(), "2026-01-01T00:02:00Z").await;
    let again = deliver(&baton, "check_run", "rc-3", &check_failed(&theirs, 3)).await.expect("a repair");
    assert_eq!(baton.finished(&again).await["state"], "succeeded", "repaired again after a person's push");
    let h3 = follow_branch(&bare);
    assert_eq!(git(&bare, &["rev-parse", &format!("{h3}^")]), theirs);
    synchronize("sync-3", h3.clone(), "2026-01-01T00:03:00Z").await;
    let refused = deliver(&baton, "check_run", "rc-4", &check_failed(&h3, 4)).await.expect("a job");
    let job = baton.finished(&refused).await;
    assert_eq!(job["state"], "failed", "baton's own push counted again: {job}");
    assert!(job["error"].as_str().unwrap().contains("pushed 1 repairs"), "{job}");
}

/// A review comment on pull request #2: comment `id`, by `login`
/// (`association`), replying to `reply_to` when given.
fn review_comment(id: u64, reply_to: Option<u64>, login: &str, association: &str, body: &str, head: &str) -> Vec<u8> {
    let mut p = fixture_json("pull_request_review_comment/created.payload.json");
    p["comment"]["id"] = json!(id);
    p["comment"]["body"] = json!(body);
    p["comment"]["user"]["login"] = json!(login);
    p["comment"]["author_association"] = json!(association);
    if let Some(root) = reply_to {
        p["comment"]["in_reply_to_id"] = json!(root);
    }
    p["sender"]["login"] = json!(login);
    p["sender"]["type"] = json!(if login.ends_with("[bot]") { "Bot" } else { "User" });
    p["pull_request"]["head"]["sha"] = json!(head);
    serde_json::to_vec(&p).unwrap()
}

/// `/fix` in a reply to a review comment runs a job whose prompt carries
/// the thread (path, line, diff hunk, the conversation, baton's own comment
/// included); with `kind = "push"` the fix lands on the pull request and
/// baton answers in the thread naming the commit.
#[tokio::test]
async fn a_fix_asked_in_a_review_thread_lands_on_the_pr_and_is_answered_there() {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let (bare, head) = origin(&w);
    // The agent's answer is its prompt, to show what it was given.
    let agent = "#!/bin/sh\np=$(cat)\necho fixed >> fix.txt\nprintf 'Fixed.\\n%s\\n' \"$p\"\n";
    let prompt = "at {{ thread.path }}:{{ thread.line }}\n{{ thread.diff_hunk }}\n\
                  {% for c in thread.comments %}{{ c.author }} said {{ c.body }}\n{% endfor %}";
    let on = "pull_request_review_comment.created";
    let trigger = job(on, prompt).output("push").set("output.title", "Fix: {{ result }}").filter("command", "/fix");
    let baton = daemon(&fake, &w, agent, trigger);
    // baton's own inline comment starts the thread: noted, never a job.
    let own = review_comment(100, None, "baton[bot]", "NONE", "Off by one here.", &head);
    assert_eq!(deliver(&baton, "pull_request_review_comment", "rc-1", &own).await, None);
    let ask = review_comment(101, Some(100), "Codertocat", "OWNER", "/fix use <= instead", &head);
    let id = deliver(&baton, "pull_request_review_comment", "rc-2", &ask).await.expect("a job");
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let pushed = git(&bare, &["rev-parse", "refs/heads/changes"]);
    assert_eq!(git(&bare, &["rev-parse", &format!("{pushed}^")]), head);
    eventually("the reply in the thread", || !fake.replies(PR, 100).is_empty()).await;
    let reply = &fake.replies(PR, 100)[0].body;
    assert!(reply.contains(&format!("Pushed {pushed} to `changes`.")), "{reply}");
    assert!(reply.contains("at README.md:265\n@@ -1 +1 @@"), "{reply}");
    assert!(reply.contains("baton[bot] said Off by one here.\nCodertocat said /fix use <= instead"), "{reply}");
    // The reaction went to the review comment, and no comment repeats the result.
    assert!(!fake.posts("/repos/Codertocat/Hello-World/pulls/comments/101/reactions").is_empty());
    assert!(fake.comments(PR).iter().all(|c| !c.body.contains("Fixed.")), "answered in the thread only");
}

/// An incremental review: the second review of a pull request is asked
/// about `last..head` (`{{ review.since }}`, `{{ review.diff }}`), does not
/// repeat a finding on lines that read the same, and says what it covered;
/// a finding on a line that changed is posted again.
#[tokio::test]
async fn a_re_review_covers_what_changed_since_and_repeats_no_finding() {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let (bare, head) = origin(&w);
    let files = |text: &str| vec![json!({ "filename": "feature.txt", "patch": format!("@@ -0,0 +1 @@\n+{text}") })];
    fake.set_pr_files(PR, files("feature"));
    let answer = json!({
        "summary": "Two things.",
        "comments": [
            { "path": "feature.txt", "line": 1, "body": "Name it better." },
            { "path": "README.md", "line": 1, "body": "Typo." }
        ]
    });
    let prompts = w.shared().join("prompts");
    let agent = format!("#!/bin/sh\n{{ cat; echo; echo ---; }} >> {}\ncat <<'EOF'\n{answer}\nEOF\n", prompts.display());
    let prompt = "since={{ review.since }}\n{{ review.diff }}";
    let on = "pull_request";
    let baton = daemon(&fake, &w, &agent, job(on, prompt).output("review"));
    let review = |n: usize| fake.review_posts().get(n).cloned();

    let first = deliver(&baton, "pull_request", "rr-1", &pull_request("opened", &head, "2026-01-01T00:00:00Z"))
        .await
        .expect("a review");
    assert_eq!(baton.finished(&first).await["state"], "succeeded");
    eventually("the first review", || review(0).is_some()).await;
    let r = review(0).unwrap();
    assert_eq!(r["comments"].as_array().map(Vec::len), Some(1), "{r}");
    assert!(r["body"].as_str().unwrap().contains("`README.md:1`: Typo."), "{r}");
    eventually("the status to say what was reviewed", || {
        fake.comments(PR).iter().any(|c| c.body.contains(&format!("reviewed {}, the whole pull request", &head[..7])))
    })
    .await;

    // A push adds a line elsewhere: the re-review is asked about it alone.
    let h1 = advance(&bare, "changes", "changes", "other.txt", "added later\n");
    let second = deliver(&baton, "pull_request", "rr-2", &pull_request("synchronize", &h1, "2026-01-01T00:01:00Z"))
        .await
        .expect("a review");
    assert_eq!(baton.finished(&second).await["state"], "succeeded");
    let asked = std::fs::read_to_string(&prompts).unwrap();
    let asked = asked.split("\n---\n").nth(1).unwrap_or_default().to_string();
    assert!(asked.starts_with(&format!("since={head}\n")), "{asked}");
    assert!(asked.contains("+added later") && !asked.contains("+feature"), "only what changed since: {asked}");
    assert!(asked.contains(&format!("reviewed up to {head} before")), "{asked}");
    eventually("the second review", || review(1).is_some()).await;
    let r = review(1).unwrap();
    assert!(r["comments"].is_null(), "nothing repeated inline: {r}");
    let body = r["body"].as_str().unwrap();
    assert!(!body.contains("Typo.") && body.contains("2 findings from an earlier review still apply"), "{body}");
    eventually("the status to say the range", || {
        fake.comments(PR).iter().any(|c| c.body.contains(&format!("reviewed {}..{}", &head[..7], &h1[..7])))
    })
    .await;

    // The line the finding was on now reads differently: it is said again.
    fake.set_pr_files(PR, files("feature, renamed"));
    let h2 = advance(&bare, "changes", "changes", "other.txt", "added again\n");
    let third = deliver(&baton, "pull_request", "rr-3", &pull_request("synchronize", &h2, "2026-01-01T00:02:00Z"))
        .await
        .expect("a review");
    assert_eq!(baton.finished(&third).await["state"], "succeeded");
    eventually("the third review", || review(2).is_some()).await;
    let r = review(2).unwrap();
    assert_eq!(r["comments"][0]["body"], "Name it better.", "{r}");
}

/// The attacks of issue 14, against a push. An agent that commits a
/// workflow itself pushes nothing, and the job says why. An agent that
/// plants `pre-push`, `pre-commit` and `post-commit` hooks in its own
/// `.git` gets its allowed change pushed and none of its hooks run.
#[tokio::test]
async fn an_agent_cannot_push_a_workflow_or_get_its_hooks_run_through_a_push() {
    let sneaky = "mkdir -p .github/workflows\nprintf 'on: push\\n' > .github/workflows/x.yml\n\
                  git add -A && git -c user.name=a -c user.email=a@b commit -qm sneaky\n";
    for (attack, pushed) in [(sneaky, false), ("", true)] {
        let fake = FakeGitHub::start().await;
        let w = Workdir::new();
        let (bare, head) = origin(&w);
        let ran = w.shared().join("hook-ran");
        let agent = format!(
            "#!/bin/sh\ncat > /dev/null\n{attack}\
             for h in pre-push post-commit pre-commit; do printf '#!/bin/sh\\ntouch {ran}\\n' > .git/hooks/$h; \
             chmod +x .git/hooks/$h; done\necho fixed >> fix.txt\necho done\n",
            ran = ran.display()
        );
        let baton = daemon(&fake, &w, &agent, push("pull_request.opened"));
        let id = deliver(&baton, "pull_request", "hostile-1", &pull_request("opened", &head, "2026-01-01T00:00:00Z"))
            .await
            .expect("a job");
        let job = baton.finished(&id).await;
        let now = git(&bare, &["rev-parse", "refs/heads/changes"]);
        if pushed {
            assert_eq!(job["state"], "succeeded", "{job}");
            assert_eq!(git(&bare, &["rev-parse", &format!("{now}^")]), head);
        } else {
            assert_eq!(job["state"], "failed", "{job}");
            assert!(job["error"].as_str().unwrap().contains("allow_workflow_changes"), "{job}");
            assert_eq!(now, head, "nothing was pushed");
        }
        assert!(!ran.exists(), "no hook of the agent's ran");
    }
}

/// A pull request from a fork whose author lets maintainers edit: the push
/// goes to the fork's branch, over HTTP with the base repository's token;
/// when GitHub refuses it all the same (the author changed their mind, or
/// the fork belongs to an organization), the job fails with GitHub's own
/// words and nothing moves.
#[tokio::test]
async fn a_push_to_a_fork_uses_the_base_credentials_and_a_refusal_is_reported_as_github_says() {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let (bare, head) = origin(&w);
    let root = w.path().join("remote");
    let fork = root.join("stranger/Hello-World.git");
    std::fs::create_dir_all(fork.parent().unwrap()).unwrap();
    git(&root, &["clone", "--quiet", "--bare", bare.to_str().unwrap(), fork.to_str().unwrap()]);
    fake.serve_git(&root);
    let script = w.script("agent.sh", "#!/bin/sh\ncat > /dev/null\necho fixed >> fix.txt\necho 'Fixed.'\n");
    Scenario::new()
        .github(GitHub::secret(SECRET).api(&fake).set("git_url", format!("{}/git", fake.url)).token("env:GITHUB_TOKEN"))
        .agent("script", Agent::script(&script))
        .trigger("work", push("pull_request.opened").filter("allow_forks", true))
        .write(&w);
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    let from_fork = |delivery_head: &str| {
        let mut p: Value =
            serde_json::from_slice(&pull_request("opened", delivery_head, "2026-01-01T00:00:00Z")).unwrap();
        p["pull_request"]["head"]["repo"]["id"] = json!(999_999);
        p["pull_request"]["head"]["repo"]["full_name"] = json!("stranger/Hello-World");
        p["pull_request"]["maintainer_can_modify"] = json!(true);
        serde_json::to_vec(&p).unwrap()
    };

    let id = deliver(&baton, "pull_request", "fork-1", &from_fork(&head)).await.expect("a job");
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let pushed = git(&fork, &["rev-parse", "refs/heads/changes"]);
    assert_eq!(git(&fork, &["rev-parse", &format!("{pushed}^")]), head, "on the fork's branch, from its head");
    assert_eq!(git(&bare, &["rev-parse", "refs/heads/changes"]), head, "the base repository is untouched");
    let pushes = fake.requests_to("POST", "/git/stranger/Hello-World.git/git-receive-pack");
    assert_eq!(pushes.len(), 1, "one push, over HTTP");
    let auth = pushes[0].headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let basic = auth.strip_prefix("Basic ").map(|b| {
        use base64::Engine as _;
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap_or_default()).unwrap_or_default()
    });
    assert!(basic.is_some_and(|b| b.ends_with(&format!(":{TOKEN}"))), "the base repository's token: {auth:?}");

    // The same, but GitHub refuses the push. (GitHub moves the base's
    // `refs/pull/2/head` with the fork's branch.)
    git(&bare, &["fetch", "--quiet", fork.to_str().unwrap(), "+refs/heads/changes:refs/pull/2/head"]);
    fake.refuse_pushes("stranger/Hello-World");
    let id = deliver(&baton, "pull_request", "fork-2", &from_fork(&pushed)).await.expect("a job");
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("Permission to stranger/Hello-World.git denied to"), "{error}");
    assert!(error.contains("403") && error.contains("of the fork stranger/Hello-World"), "{error}");
    assert!(error.contains("\"Allow edits from maintainers\""), "says what to check: {error}");
    assert_eq!(git(&fork, &["rev-parse", "refs/heads/changes"]), pushed, "nothing moved");
}
