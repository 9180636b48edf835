//! Notifications (issue 17, item 4): a job's end told to `[notify.NAME]`
//! targets through the outbox — a signed JSON webhook and a Slack message —
//! checked by local receivers that verify the signature and inject faults.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;

use crate::harness::{eventually, fixture, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "notify-webhook-secret";
const SIGNING_KEY: &str = "notify-signing-key-0123456789";
const SLACK_TOKEN: &str = "XoXoSlackHookToken0123456789";

/// A receiver that records every request and answers the first `failures`
/// with 503 (`Retry-After: 0`).
#[derive(Clone)]
struct Receiver {
    url: String,
    seen: Arc<Mutex<Vec<(HeaderMap, String, u16)>>>,
}

impl Receiver {
    async fn start(failures: usize) -> Receiver {
        let seen: Arc<Mutex<Vec<(HeaderMap, String, u16)>>> = Arc::default();
        let sink = seen.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let mut seen = sink.lock().unwrap();
                let status = if seen.len() < failures { 503 } else { 200 };
                seen.push((headers, body, status));
                match status {
                    503 => (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")], "busy").into_response(),
                    _ => (StatusCode::OK, "ok").into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { url, seen }
    }

    /// The requests answered 200: (headers, body).
    fn taken(&self) -> Vec<(HeaderMap, Value)> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(_, _, status)| *status == 200)
            .map(|(h, b, _)| (h.clone(), serde_json::from_str(b).unwrap_or(Value::Null)))
            .collect()
    }

    fn tries(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A daemon without GitHub credentials (so only notifications leave) whose
/// `work` trigger's agent prints `answer` and exits with `code`; the
/// trigger notifies `notify` (on `notify_on`, if given).
fn daemon(
    dir: &Workdir,
    (hook, slack): (&Receiver, &Receiver),
    (notify, notify_on): (&[&str], Option<&[&str]>),
    answer: &str,
    code: i32,
) -> Baton {
    let agent = dir.script("agent.sh", &format!("#!/bin/sh\ncat > /dev/null\nprintf '{answer}'\nexit {code}\n"));
    let mut trigger = Trigger::on(&["issues.opened"])
        .agent("script")
        .workspace("none")
        .prompt("x")
        .output("none")
        .set("output.notify", notify.to_vec());
    if let Some(on) = notify_on {
        trigger = trigger.set("output.notify_on", on.to_vec());
    }
    Scenario::new()
        .set("server.public_url", "https://baton.example")
        .github(GitHub::secret(SECRET).set("git_url", "https://github.example"))
        .agent("script", Agent::script(&agent))
        .set("notify.team.kind", "webhook")
        .set("notify.team.url", format!("{}/baton", hook.url))
        .set("notify.team.secret", "env:NOTIFY_SECRET")
        .set("notify.chat.kind", "slack")
        .set("notify.chat.url", "env:SLACK_URL")
        .trigger("work", trigger)
        .write(dir);
    let slack_url = format!("{}/services/T000/B000/{SLACK_TOKEN}", slack.url);
    Baton::start(dir.path(), &[("NOTIFY_SECRET", SIGNING_KEY), ("SLACK_URL", slack_url.as_str())])
}

async fn run(baton: &Baton, delivery: &str) -> Value {
    let (status, body) = baton.deliver(SECRET, "issues", delivery, &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{body}");
    baton.finished(body["jobs"][0].as_str().expect("a job")).await
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// A job's end reaches both targets once each, though the webhook refuses
/// twice first: the webhook gets baton's JSON signed with its key, Slack a
/// Block Kit message with the trigger, the subject link, the state, the
/// result and the dashboard link. The Slack URL (a secret) is never logged.
#[tokio::test]
async fn a_jobs_end_reaches_a_signed_webhook_and_slack_once_each_through_faults() {
    let (hook, slack) = (Receiver::start(2).await, Receiver::start(0).await);
    let w = Workdir::new();
    let baton = daemon(&w, (&hook, &slack), (&["team", "chat"], None), "Fixed it.\\nSecond line.", 0);
    let job = run(&baton, "notify-1").await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let id = job["id"].as_str().unwrap();
    eventually("both targets to take the notification", || hook.taken().len() == 1 && slack.taken().len() == 1).await;
    assert_eq!(hook.tries(), 3, "two refusals, then one delivery");

    let (headers, body) = &hook.taken()[0];
    let raw = hook.seen.lock().unwrap()[2].1.clone();
    let signature = baton::publish::notify::signature(SIGNING_KEY.as_bytes(), raw.as_bytes());
    assert_eq!(header(headers, "x-baton-signature-256"), signature);
    assert_eq!(header(headers, "x-baton-delivery"), format!("{id}/notify/team"));
    assert_eq!(header(headers, "x-baton-event"), "job.succeeded");
    assert_eq!(body["event"], "job.succeeded");
    assert_eq!(body["job"]["trigger"], "work");
    assert_eq!(body["result"], "Fixed it.\nSecond line.");
    assert_eq!(body["subject_url"], "https://github.example/Codertocat/Hello-World/issues/1");
    assert_eq!(body["dashboard_url"], format!("https://baton.example/jobs/{id}"));

    let (_, message) = &slack.taken()[0];
    let blocks = message["blocks"].as_array().expect("Block Kit blocks");
    assert_eq!(
        blocks[0]["text"]["text"],
        "✅ *work* succeeded on <https://github.example/Codertocat/Hello-World/issues/1|Codertocat/Hello-World#1>"
    );
    assert_eq!(blocks[1]["text"]["text"], "```Fixed it.\nSecond line.```");
    assert_eq!(blocks[2]["elements"][0]["text"], format!("<https://baton.example/jobs/{id}|job {id}>"));

    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!((hook.tries(), slack.tries()), (3, 1), "nothing was sent twice");
    assert!(!baton.log_text().contains(SLACK_TOKEN), "the Slack URL is a secret");
}

/// `notify_on` says which ends are told: a success is not, a failure is.
#[tokio::test]
async fn notify_on_picks_the_ends_that_are_told() {
    let (hook, slack) = (Receiver::start(0).await, Receiver::start(0).await);
    let notify: (&[&str], _) = (&["team"], Some(&["failed"][..]));
    let w = Workdir::new();
    let baton = daemon(&w, (&hook, &slack), notify, "fine", 0);
    assert_eq!(run(&baton, "ok-1").await["state"], "succeeded");
    drop(baton);
    let w2 = Workdir::new();
    let baton = daemon(&w2, (&hook, &slack), notify, "broken", 3);
    let job = run(&baton, "bad-1").await;
    assert_eq!(job["state"], "failed");
    eventually("the failure to be told", || !hook.taken().is_empty()).await;
    let told: Vec<Value> = hook.taken().into_iter().map(|(_, b)| b).collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0]["event"], "job.failed");
    assert!(told[0]["job"]["error"].as_str().unwrap().contains("exited with status 3"), "{told:?}");
    assert_eq!(slack.tries(), 0);
}

/// Bad notify settings are `path:line:col` errors: a webhook without a key
/// to sign with, and a trigger naming a target that does not exist.
#[test]
fn notify_settings_are_checked_where_they_are_written() {
    let base = Path::new("/");
    let unsigned = "[notify.team]\nkind = \"webhook\"\nurl = \"https://hooks.example/x\"\n";
    let errors = baton::config::Config::from_source(Some(Path::new("baton.toml")), unsigned, base).unwrap_err();
    let text = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    assert!(text.contains("baton.toml:1:1") && text.contains("give `secret`"), "{text}");

    let config = baton::config::Config::from_source(None, &format!("{unsigned}secret = \"k\"\n"), base).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trigger = "on = [\"issues.opened\"]\n[job]\nagent = \"codex\"\nprompt = \"x\"\n[output]\nnotify = [\"teem\"]\n";
    std::fs::write(dir.path().join("t.toml"), trigger).unwrap();
    let (_, errors) = baton::rules::RuleSet::load(dir.path(), &config);
    let text = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    assert!(
        text.contains("t.toml:6:") && text.contains("unknown notify target `teem` (did you mean `team`?)"),
        "{text}"
    );
}
