//! The GitLab API client against the fake GitLab: every call round-trips
//! within GitLab's documented parameters, projects with subgroups and
//! self-managed path prefixes work, and failures are classified so the
//! outbox can publish exactly once.

use std::future::Future;
use std::time::Duration;

use baton::config::Secret;
use baton::forge::gitlab::api::{Client, InlineNote, Noteable, Review, Side, Status, StatusState};
use baton::forge::ApiError;
use serde_json::json;

use crate::fake_gitlab::{on_key, FakeGitLab, Faults, BOT, BOT_ID};

const TOKEN: &str = "glpat-test-token-0123456789";
const PROJECT: &str = "group/sub/proj";
const ENCODED: &str = "group%2Fsub%2Fproj";

/// Every test is over in seconds; a hang fails it.
async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.expect("the test took over 30 s")
}

fn client(fake: &FakeGitLab) -> Client {
    Client::new(&fake.api_url(), Secret::new(TOKEN))
}

/// (retryable, maybe_applied, retry_after): how the outbox will treat it.
fn class(e: &ApiError) -> (bool, bool, Option<Duration>) {
    (e.retryable(), e.maybe_applied(), e.retry_after())
}

fn marker(id: &str) -> String {
    format!("<!-- baton:job={id} -->")
}

const DIFF: &str = "@@ -1,4 +1,5 @@\n a\n-b\n+B\n+C\n c\n d\n";

fn set_mr(fake: &FakeGitLab, iid: u64) {
    fake.set_versions(
        PROJECT,
        iid,
        vec![
            json!({ "id": 12, "head_commit_sha": "h2", "base_commit_sha": "b2", "start_commit_sha": "s2", "state": "collected" }),
            json!({ "id": 11, "head_commit_sha": "h1", "base_commit_sha": "b1", "start_commit_sha": "s1" }),
        ],
    );
    fake.set_diffs(
        PROJECT,
        iid,
        vec![
            json!({ "old_path": "src/a.rs", "new_path": "src/a.rs", "diff": DIFF, "new_file": false, "deleted_file": false, "renamed_file": false }),
            json!({ "old_path": "old.rs", "new_path": "new.rs", "diff": "", "renamed_file": true }),
        ],
    );
}

fn comment(line: u64, start: Option<u64>, side: Side, body: &str) -> InlineNote {
    InlineNote { path: "src/a.rs".into(), old_path: None, line, start_line: start, side, body: body.into() }
}

#[tokio::test]
async fn every_call_round_trips_within_gitlabs_documented_parameters() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let gl = client(&fake);
        let mr = Noteable::MergeRequest(1);
        let issue = Noteable::Issue(2);

        let me = gl.identity().await.unwrap();
        assert_eq!((me.id, me.username.as_str()), (BOT_ID, BOT));

        fake.set_member(PROJECT, 5, 30);
        assert_eq!(gl.member_access(PROJECT, 5).await.unwrap(), Some(30));
        assert_eq!(gl.member_access(PROJECT, 6).await.unwrap(), None);

        let on_mr = gl.create_note(PROJECT, mr, &format!("working {}", marker("j1"))).await.unwrap();
        let on_issue = gl.create_note(PROJECT, issue, "hello").await.unwrap();
        assert!(on_mr.id.is_some() && on_issue.id.is_some());
        let edited = gl.edit_note(PROJECT, mr, on_mr.id.unwrap(), &format!("done {}", marker("j1"))).await.unwrap();
        assert_eq!(edited.id, on_mr.id);
        assert_eq!(fake.notes(PROJECT, mr)[0].body, format!("done {}", marker("j1")));
        assert_eq!(gl.find_note(PROJECT, mr, &marker("j1")).await.unwrap().and_then(|c| c.id), on_mr.id);
        assert!(gl.find_note(PROJECT, issue, &marker("j1")).await.unwrap().is_none());

        gl.award_emoji(PROJECT, issue, None, "eyes").await.unwrap();
        gl.award_emoji(PROJECT, mr, on_mr.id, "eyes").await.unwrap();
        // Awarded already: done, not an error.
        gl.award_emoji(PROJECT, issue, None, "eyes").await.unwrap();
        assert_eq!(fake.emoji().len(), 2);

        // Someone else's comment with baton's marker is not baton's.
        fake.add_commit_comment_by(PROJECT, "abc123", "mallory", &marker("j3"));
        gl.commit_comment(PROJECT, "abc123", &format!("a commit {}", marker("j2"))).await.unwrap();
        assert!(gl.find_commit_comment(PROJECT, "abc123", &marker("j2")).await.unwrap().is_some());
        assert!(gl.find_commit_comment(PROJECT, "abc123", &marker("j3")).await.unwrap().is_none());
        assert_eq!(fake.commit_comments(PROJECT, "abc123").len(), 2);

        set_mr(&fake, 1);
        let version = gl.mr_version(PROJECT, 1).await.unwrap();
        assert_eq!((version.id, version.head_commit_sha.as_str()), (12, "h2"));
        let diffs = gl.mr_diffs(PROJECT, 1).await.unwrap();
        assert_eq!(diffs.len(), 2);
        assert!(diffs[1].renamed_file && diffs[1].old_path == "old.rs");

        let comments = [comment(3, None, Side::New, "on C"), comment(4, Some(2), Side::New, "on B..c")];
        let review = Review { version: &version, summary: &format!("summary {}", marker("r1")), marker: &marker("r1"), comments: &comments };
        let summary = gl.publish_review(PROJECT, 1, &review).await.unwrap();
        assert!(summary.id.is_some());

        gl.approve(PROJECT, 1).await.unwrap();
        // Approved already: GitLab refuses, baton is among the approvers.
        gl.approve(PROJECT, 1).await.unwrap();
        assert_eq!(fake.approvals(PROJECT, 1), vec![BOT.to_string()]);

        let discussion = fake.notes(PROJECT, mr).iter().find(|n| n.position.is_some()).unwrap().discussion_id.clone();
        let reply = gl.reply(PROJECT, 1, &discussion, "a reply").await.unwrap();
        assert!(reply.id.is_some());

        let opened = gl.create_merge_request(PROJECT, "baton/fix-1", "main", "Fix", "It is fixed.").await.unwrap();
        assert_eq!(opened.id, Some(1));
        assert_eq!(opened.url.as_deref(), Some("https://gitlab.example/group/sub/proj/-/merge_requests/1"));
        let sent = &fake.requests_to("POST", &format!("/projects/{PROJECT}/merge_requests"))
            .into_iter()
            .find(|r| r.path.ends_with("/merge_requests"))
            .unwrap()
            .body;
        assert_eq!(sent["remove_source_branch"], false);
        assert_eq!((sent["source_branch"].as_str(), sent["target_branch"].as_str()), (Some("baton/fix-1"), Some("main")));

        let long = "é".repeat(300);
        let status = Status { state: StatusState::Running, name: "baton/review", description: &long, target_url: Some("https://baton.example/jobs/1") };
        gl.set_status(PROJECT, "abc123", &status).await.unwrap();
        let status = Status { state: StatusState::Success, target_url: None, ..status };
        gl.set_status(PROJECT, "abc123", &status).await.unwrap();
        let statuses = fake.statuses(PROJECT);
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0]["state"], "success");
        assert_eq!(statuses[0]["description"].as_str().unwrap().chars().count(), 255);

        fake.set_jobs(
            PROJECT,
            77,
            vec![
                json!({ "id": 1, "name": "build", "stage": "build", "status": "success", "web_url": "https://x/1" }),
                json!({ "id": 2, "name": "test", "stage": "test", "status": "failed", "web_url": "https://x/2" }),
            ],
        );
        let failed = gl.failed_jobs(PROJECT, 77).await.unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].id, failed[0].name.as_str(), failed[0].stage.as_str()), (2, "test", "test"));
        fake.set_trace(PROJECT, 2, b"line 1\nline 2\nerror: it broke\n");
        assert_eq!(gl.job_trace_tail(PROJECT, 2, 16).await.unwrap(), "error: it broke\n");

        fake.set_hook_events(
            PROJECT,
            3,
            vec![json!({ "id": 40, "url": "https://baton.example/hooks/gitlab", "trigger": "note_hooks",
                "response_status": "internal error", "execution_duration": 0.5, "request_data": { "object_kind": "note" } })],
        );
        let (events, more) = gl.hook_events(PROJECT, 3, 1).await.unwrap();
        assert!(!more);
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].id, events[0].response_status.as_str()), (40, "internal error"));
        gl.resend_hook_event(PROJECT, 3, 40).await.unwrap();
        assert_eq!(fake.resent(), vec![(PROJECT.to_string(), 3, 40)]);

        assert_eq!(fake.violations(), Vec::<String>::new());
        let requests = fake.requests.lock().unwrap().clone();
        for r in requests.iter().filter(|r| r.path.starts_with("/projects/")) {
            assert!(r.raw_path.starts_with(&format!("/api/v4/projects/{ENCODED}/")), "{}", r.raw_path);
            assert_eq!(r.headers.get("private-token").unwrap(), TOKEN);
            assert!(r.headers.get("user-agent").unwrap().to_str().unwrap().starts_with("baton/"));
        }
        // `/user` is asked once.
        assert_eq!(fake.requests_to("GET", "/user").len(), 1);
    })
    .await
}

#[tokio::test]
async fn a_review_places_each_comment_on_its_diff_line() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let gl = client(&fake);
        set_mr(&fake, 4);
        let version = gl.mr_version(PROJECT, 4).await.unwrap();
        let comments = [
            comment(3, None, Side::New, "added"),
            comment(4, None, Side::New, "unchanged"),
            comment(2, None, Side::Old, "removed"),
            comment(4, Some(2), Side::New, "a range"),
            InlineNote {
                path: "new.rs".into(),
                old_path: Some("old.rs".into()),
                line: 1,
                start_line: None,
                side: Side::New,
                body: "renamed".into(),
            },
        ];
        let review = Review {
            version: &version,
            summary: &format!("s {}", marker("r4")),
            marker: &marker("r4"),
            comments: &comments,
        };
        gl.publish_review(PROJECT, 4, &review).await.unwrap();
        assert_eq!(fake.violations(), Vec::<String>::new());
        let published = fake.published_discussions(PROJECT, 4);
        let at = |body: &str| published.iter().find(|n| n.body == body).unwrap().position.clone().unwrap();
        let p = at("added");
        assert_eq!(
            (p["position_type"].as_str(), p["base_sha"].as_str(), p["start_sha"].as_str(), p["head_sha"].as_str()),
            (Some("text"), Some("b2"), Some("s2"), Some("h2"))
        );
        assert_eq!((p["old_line"].as_u64(), p["new_line"].as_u64()), (None, Some(3)));
        let p = at("unchanged");
        assert_eq!((p["old_line"].as_u64(), p["new_line"].as_u64()), (Some(3), Some(4)));
        let p = at("removed");
        assert_eq!((p["old_line"].as_u64(), p["new_line"].as_u64()), (Some(2), None));
        let p = at("a range");
        assert_eq!(p["line_range"]["start"]["type"], "new");
        assert_eq!(p["line_range"]["start"]["new_line"], 2);
        assert_eq!(p["line_range"]["end"]["type"], "old");
        assert_eq!(
            (p["line_range"]["end"]["old_line"].as_u64(), p["line_range"]["end"]["new_line"].as_u64()),
            (Some(3), Some(4))
        );
        // sha1("src/a.rs") and the line's two numbers.
        let code = p["line_range"]["start"]["line_code"].as_str().unwrap();
        assert!(code.len() == 40 + "_3_2".len() && code.ends_with("_3_2"), "{code}");
        let p = at("renamed");
        assert_eq!((p["old_path"].as_str(), p["new_path"].as_str()), (Some("old.rs"), Some("new.rs")));
        let summary = published.iter().find(|n| n.body.contains(&marker("r4"))).unwrap();
        assert!(summary.position.is_none());
    })
    .await
}

#[tokio::test]
async fn a_self_managed_gitlab_under_a_path_prefix_works() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let gl = Client::new(&format!("{}/gitlab/api/v4/", fake.url), Secret::new(TOKEN));
        gl.create_note(PROJECT, Noteable::Issue(1), "hi").await.unwrap();
        assert!(gl.find_note(PROJECT, Noteable::Issue(1), "hi").await.unwrap().is_some());
        let posts = fake.requests_to("POST", "/projects/");
        assert_eq!(posts.len(), 1);
        assert_eq!(posts[0].raw_path, format!("/gitlab/api/v4/projects/{ENCODED}/issues/1/notes"));
        assert_eq!(posts[0].path, format!("/projects/{PROJECT}/issues/1/notes"));
        assert_eq!(fake.violations(), Vec::<String>::new());
    })
    .await
}

#[tokio::test]
async fn a_lost_answer_may_have_applied_and_the_marker_finds_what_it_made() {
    bounded(async {
        let fake = FakeGitLab::start_with(TOKEN, Faults { fail_every_nth_write: Some(1) }).await;
        let gl = client(&fake);
        let mr = Noteable::MergeRequest(3);
        fake.add_note_by(PROJECT, mr, "mallory", &format!("fake {}", marker("j9")));
        let e = gl.create_note(PROJECT, mr, &format!("result {}", marker("j9"))).await.unwrap_err();
        assert_eq!(class(&e), (true, true, None), "{e:?}");
        fake.set_faults(Faults::default());
        let notes = fake.notes(PROJECT, mr);
        assert_eq!(notes.len(), 2);
        // Baton's own, not mallory's note with the same marker.
        let found = gl.find_note(PROJECT, mr, &marker("j9")).await.unwrap().expect("the note made");
        assert_eq!(found.id, Some(notes[1].id));
        assert_eq!(notes[1].author, BOT);

        // A 502 before GitLab did anything: retryable, and nothing made.
        fake.drop_writes(1);
        let e = gl.create_note(PROJECT, Noteable::Issue(8), "x").await.unwrap_err();
        assert!(class(&e).0, "{e:?}");
        assert!(fake.notes(PROJECT, Noteable::Issue(8)).is_empty());
        assert_eq!(fake.violations(), Vec::<String>::new());
    })
    .await
}

#[tokio::test]
async fn a_second_merge_request_for_a_branch_is_the_first() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let gl = client(&fake);
        gl.create_merge_request(PROJECT, "other", "main", "Other", "").await.unwrap();
        let first = gl.create_merge_request(PROJECT, "baton/x", "main", "X", "first").await.unwrap();
        let again = gl.create_merge_request(PROJECT, "baton/x", "main", "X", "again").await.unwrap();
        assert_eq!(first.id, Some(2));
        assert_eq!((again.id, again.url.clone()), (first.id, first.url.clone()));
        assert_eq!(fake.merge_requests(PROJECT).len(), 2);
        let conflicts: Vec<_> =
            fake.requests_to("POST", "/projects/").into_iter().filter(|r| r.status == 409).collect();
        assert_eq!(conflicts.len(), 1);
        let list = fake.requests_to("GET", &format!("/projects/{PROJECT}/merge_requests"));
        assert_eq!(list.len(), 1);
        assert!(list[0].query.contains(&("source_branch".into(), "baton/x".into())), "{:?}", list[0].query);
        assert_eq!(fake.violations(), Vec::<String>::new());
    })
    .await
}

#[tokio::test]
async fn a_rate_limit_says_when_to_come_back() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let gl = client(&fake);
        fake.rate_limit(1, 7);
        let e = gl
            .set_status(
                PROJECT,
                "abc",
                &Status { state: StatusState::Pending, name: "n", description: "d", target_url: None },
            )
            .await
            .unwrap_err();
        assert_eq!(class(&e), (true, false, Some(Duration::from_secs(7))), "{e:?}");
        assert!(fake.statuses(PROJECT).is_empty());
    })
    .await
}

#[tokio::test]
async fn a_wrong_token_is_fatal_and_never_shown() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let wrong = "glpat-wrong-token-9876543210";
        let gl = Client::new(&fake.api_url(), Secret::new(wrong));
        let e = gl.create_note(PROJECT, Noteable::Issue(1), "x").await.unwrap_err();
        assert_eq!(class(&e), (false, false, None), "{e:?}");
        assert!(e.message.contains("401"), "{}", e.message);
        let e = gl.identity().await.unwrap_err();
        for shown in [e.message.clone(), format!("{e:?}"), format!("{gl:?}")] {
            assert!(!shown.contains(wrong) && !shown.contains(TOKEN), "{shown}");
        }
    })
    .await
}

#[tokio::test]
async fn a_review_after_a_crashed_try_publishes_only_its_own_comments_once() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let gl = client(&fake);
        set_mr(&fake, 6);
        // A crashed try left two drafts of baton's; someone else has one
        // of their own (GitLab shows it to no one else).
        fake.add_draft_by(PROJECT, 6, BOT, "stale 1");
        fake.add_draft_by(PROJECT, 6, BOT, &format!("stale summary {}", marker("r6")));
        fake.add_draft_by(PROJECT, 6, "alice", "alice's pending thought");
        let version = gl.mr_version(PROJECT, 6).await.unwrap();
        let comments = [comment(3, None, Side::New, "fresh 1"), comment(4, None, Side::New, "fresh 2")];
        let review = Review {
            version: &version,
            summary: &format!("summary {}", marker("r6")),
            marker: &marker("r6"),
            comments: &comments,
        };
        let made = gl.publish_review(PROJECT, 6, &review).await.unwrap();

        let published = fake.published_discussions(PROJECT, 6);
        let bodies: Vec<&str> = published.iter().map(|n| n.body.as_str()).collect();
        assert_eq!(bodies, ["fresh 1", "fresh 2", &format!("summary {}", marker("r6"))]);
        assert_eq!(made.id, Some(published[2].id));
        let left: Vec<String> = fake.drafts(PROJECT, 6).into_iter().map(|d| d.author).collect();
        assert_eq!(left, ["alice"]);
        assert_eq!(
            fake.requests_to("POST", &format!("/projects/{PROJECT}/merge_requests/6/draft_notes/bulk_publish")).len(),
            1
        );
        assert_eq!(fake.violations(), Vec::<String>::new());
        assert_eq!(on_key(PROJECT, Noteable::MergeRequest(6)), "group/sub/proj!6");
    })
    .await
}

#[tokio::test]
async fn a_job_log_tail_starts_on_a_character() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let gl = client(&fake);
        // 'é' is two bytes, '😀' four: the last 5 bytes start inside 'é',
        // so the tail starts after it.
        let log = "start\n".repeat(50_000) + "fin é😀";
        fake.set_trace(PROJECT, 9, log.as_bytes());
        assert_eq!(gl.job_trace_tail(PROJECT, 9, 5).await.unwrap(), "😀");
        assert_eq!(gl.job_trace_tail(PROJECT, 9, 6).await.unwrap(), "é😀");
        assert_eq!(gl.job_trace_tail(PROJECT, 9, 7).await.unwrap(), " é😀");
        assert_eq!(gl.job_trace_tail(PROJECT, 9, 1 << 30).await.unwrap(), log);
        let e = gl.job_trace_tail(PROJECT, 10, 100).await.unwrap_err();
        assert_eq!(class(&e), (false, false, None), "{e:?}");
        assert_eq!(fake.violations(), Vec::<String>::new());
    })
    .await
}

#[tokio::test]
async fn an_unreachable_gitlab_was_not_sent_anything() {
    bounded(async {
        // A port nothing listens on: bound, then closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let gl = Client::new(&format!("http://127.0.0.1:{port}/api/v4"), Secret::new(TOKEN));
        let e = gl.create_note(PROJECT, Noteable::Issue(1), "x").await.unwrap_err();
        assert_eq!(class(&e), (true, false, None), "{e:?}");
        assert!(!e.message.contains(TOKEN));
    })
    .await
}

#[tokio::test]
async fn the_fake_refuses_what_gitlab_does_not_document() {
    bounded(async {
        let fake = FakeGitLab::start(TOKEN).await;
        let http = reqwest::Client::new();
        let send = |method: reqwest::Method, path: &str, body: serde_json::Value| {
            http.request(method, format!("{}{path}", fake.api_url())).header("PRIVATE-TOKEN", TOKEN).json(&body).send()
        };
        let notes = format!("/projects/{ENCODED}/issues/1/notes");
        let cases = [
            (reqwest::Method::POST, notes.clone(), json!({ "body": "x", "bogus": 1 }), "unknown parameter bogus"),
            (reqwest::Method::POST, notes.clone(), json!({ "note": "x" }), "body is missing"),
            (
                reqwest::Method::POST,
                format!("/projects/{ENCODED}/statuses/abc"),
                json!({ "state": "error" }),
                "state is not",
            ),
            (
                reqwest::Method::POST,
                format!("/projects/{ENCODED}/issues/x/notes"),
                json!({ "body": "x" }),
                "issue_iid is not an integer",
            ),
            (reqwest::Method::PATCH, notes.clone(), json!({ "body": "x" }), "no such endpoint"),
            // An unencoded project path is another endpoint.
            (
                reqwest::Method::POST,
                format!("/projects/{PROJECT}/issues/1/notes"),
                json!({ "body": "x" }),
                "no such endpoint",
            ),
        ];
        for (i, (method, path, body, expect)) in cases.into_iter().enumerate() {
            let answer = send(method, &path, body).await.unwrap();
            assert_eq!(answer.status().as_u16(), 400, "{path}");
            let violations = fake.violations();
            assert_eq!(violations.len(), i + 1);
            assert!(violations[i].contains(expect), "{}", violations[i]);
        }
        let unauthorized = http.get(format!("{}/user", fake.api_url())).send().await.unwrap();
        assert_eq!(unauthorized.status().as_u16(), 401);
        let bearer = http.get(format!("{}/user", fake.api_url())).bearer_auth(TOKEN).send().await.unwrap();
        assert_eq!(bearer.status().as_u16(), 200);
    })
    .await
}
