//! GitLab catch-up: a hook's failed deliveries that the store does not
//! hold are resent, once, from the fake GitLab's event list; a token that
//! may not read the list turns catch-up off.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use baton::config::{Secret, WatchedProject};
use baton::forge::gitlab::api::Client;
use baton::forge::gitlab::catchup::{catch_up, Failure};
use serde_json::{json, Value};

use crate::fake_gitlab::FakeGitLab;
use crate::harness::{eventually, Baton, Workdir};

const TOKEN: &str = "glpat-catchUpToken000001";
const SECRET: &str = "gitlab-hook-secret-token-for-catch-up";
const PROJECT: &str = "group/sub/app";
const HOOK: u64 = 7;

/// What the store would say, over sets.
#[derive(Default)]
struct Held {
    held: HashSet<String>,
    asked: Mutex<HashSet<String>>,
}

impl baton::forge::Deliveries for Held {
    async fn holds(&self, delivery: &str) -> Result<bool, String> {
        Ok(self.held.contains(delivery))
    }

    async fn note_redelivery(&self, delivery: &str) -> Result<bool, String> {
        Ok(self.asked.lock().unwrap().insert(delivery.to_string()))
    }
}

/// A logged delivery, as GitLab lists it (newest first).
fn hook_event(id: u64, key: &str, status: Value, hours_ago: i64) -> Value {
    let at = (chrono::Utc::now() - chrono::Duration::hours(hours_ago)).to_rfc3339();
    json!({
        "id": id, "url": "https://baton.example.com/webhooks/gitlab", "trigger": "note_hooks",
        "request_headers": { "Content-Type": "application/json", "X-Gitlab-Event": "Note Hook",
            "X-Gitlab-Event-UUID": format!("uuid-{key}"), "Idempotency-Key": key },
        "request_data": "{\"object_kind\":\"note\"}",
        "response_headers": {}, "response_body": "", "response_status": status,
        "execution_duration": 0.1, "created_at": at,
    })
}

fn watched() -> WatchedProject {
    WatchedProject { path: PROJECT.into(), hook_id: HOOK }
}

fn resent(fake: &FakeGitLab) -> Vec<u64> {
    fake.resent().into_iter().map(|(_, _, event)| event).collect()
}

#[tokio::test]
async fn missed_deliveries_are_resent_once_oldest_first() {
    let fake = FakeGitLab::start(TOKEN).await;
    // Three pages: the third, past the window, is not read.
    let mut events = vec![
        hook_event(500, "lost-2", json!("internal error"), 1),
        hook_event(499, "held", json!("internal error"), 1),
        hook_event(498, "fine", json!(202), 2),
        hook_event(497, "lost-1", json!("502"), 3),
        hook_event(496, "lost-1", json!("internal error"), 4),
    ];
    // 20 a page (GitLab's most): the second page ends 10 events past the window.
    events.extend((0..25).map(|i| hook_event(400 - i, &format!("ok-{i}"), json!(200), 5)));
    events.extend((0..150).map(|i| hook_event(200 - i, &format!("old-{i}"), json!("500"), 24 * 4)));
    fake.set_hook_events(PROJECT, HOOK, events);
    let client = Client::new(&fake.api_url(), Secret::new(TOKEN));
    let store = Held { held: ["gitlab:held".to_string()].into(), ..Held::default() };

    assert_eq!(catch_up(&client, &watched(), &store).await, Ok(2));
    assert_eq!(resent(&fake), [497, 500], "each missed delivery once, by its latest attempt, oldest first");
    let listed = fake.requests_to("GET", &format!("/projects/{PROJECT}/hooks/{HOOK}/events"));
    assert_eq!(listed.len(), 2, "the second page ends in events past the window");
    // A second pass asks for nothing again.
    assert_eq!(catch_up(&client, &watched(), &store).await, Ok(0));
    assert_eq!(resent(&fake).len(), 2);
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn a_rate_limited_call_is_tried_again_after_the_wait() {
    let fake = FakeGitLab::start(TOKEN).await;
    fake.set_hook_events(PROJECT, HOOK, vec![hook_event(10, "lost", json!("internal error"), 1)]);
    let client = Client::new(&fake.api_url(), Secret::new(TOKEN));
    // GitLab limits resends to 5 a minute; here the listing is limited.
    fake.rate_limit(1, 1);
    assert_eq!(catch_up(&client, &watched(), &Held::default()).await, Ok(1));
    assert_eq!(resent(&fake), [10]);
}

#[tokio::test]
async fn a_token_that_cannot_read_the_events_turns_catch_up_off() {
    let fake = FakeGitLab::start(TOKEN).await;
    fake.set_hook_events(PROJECT, HOOK, vec![hook_event(10, "lost", json!("internal error"), 1)]);
    let client = Client::new(&fake.api_url(), Secret::new("glpat-notTheRightToken01"));
    match catch_up(&client, &watched(), &Held::default()).await {
        Err(Failure::Denied(why)) => assert!(why.contains("Maintainer") && why.contains("api scope"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(fake.resent().is_empty());
}

fn config(fake: &FakeGitLab) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[gitlab]\napi_url = \"{}\"\ntoken = \"{TOKEN}\"\n\
         webhook_secret = \"{SECRET}\"\nhook_id = {HOOK}\nprojects = [\"{PROJECT}\"]\n",
        fake.api_url()
    )
}

// The fake serves on the test's runtime while `Baton::start` blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_resends_what_it_missed_and_never_what_it_stored() {
    let fake = FakeGitLab::start(TOKEN).await;
    let w = Workdir::new();
    w.config(&config(&fake));
    let listings = || fake.requests_to("GET", &format!("/projects/{PROJECT}/hooks/{HOOK}/events")).len();
    // One delivery reached baton before.
    let mut baton = Baton::start(w.path(), &[]);
    eventually("the first catch-up", || listings() >= 1).await;
    let answer = reqwest::Client::new()
        .post(format!("{}/webhooks/gitlab", baton.url))
        .header("content-type", "application/json")
        .header("x-gitlab-token", SECRET)
        .header("x-gitlab-event", "Note Hook")
        .header("idempotency-key", "stored-key")
        .body(std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gitlab/note/issue.json")).unwrap())
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.text().await.unwrap());
    baton.kill9();

    fake.set_hook_events(
        PROJECT,
        HOOK,
        vec![
            hook_event(3, "lost-key", json!("internal error"), 1),
            hook_event(2, "stored-key", json!("internal error"), 1),
            hook_event(1, "fine-key", json!(200), 1),
        ],
    );
    let mut baton = Baton::start(w.path(), &[]);
    eventually("the resend, said", || baton.log_text().contains("Asked GitLab to resend a missed webhook.")).await;
    baton.kill9();
    // A second start asks for nothing again.
    let before = listings();
    let baton = Baton::start(w.path(), &[]);
    eventually("the third start's catch-up", || listings() > before).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(resent(&fake), [3]);
    assert_eq!(fake.violations(), Vec::<String>::new());
    drop(baton);
}

// The fake serves on the test's runtime while `Baton::start` blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_says_once_that_the_token_cannot_read_hook_events() {
    let fake = FakeGitLab::start("glpat-someOtherToken0001").await;
    let w = Workdir::new();
    w.config(&config(&fake));
    let baton = Baton::start(w.path(), &[]);
    let said = || baton.log_text().matches("GitLab catch-up is off for this project").count();
    eventually("the warning", || said() == 1).await;
    assert!(baton.log_text().contains("Maintainer role and the api scope"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(said(), 1);
    assert_eq!(fake.requests_to("GET", &format!("/projects/{PROJECT}/hooks/{HOOK}/events")).len(), 1);
}
