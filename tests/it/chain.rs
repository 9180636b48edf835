//! Chaining: a job's end is an event (`job.succeeded` / `job.failed`) that
//! triggers can take over, up to a depth limit that says so in the job.

use serde_json::Value;

use crate::harness::{eventually_async, fixture, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "chain-secret";

#[tokio::test]
async fn investigate_then_fix_then_a_loop_stopped_by_the_depth_limit() {
    let w = Workdir::new();
    let job = |on: &str, prompt: &str| Trigger::on(&[on]).agent("echo").workspace("none").prompt(prompt).output("none");
    Scenario::new()
        .github(GitHub::secret(SECRET))
        .agent("echo", Agent::command(&["sh", "-c", "head -c 40"]))
        .trigger("investigate", job("issues.opened", "found: #{{ issue.number }}"))
        .trigger("fix", job("job.succeeded", "fix {{ result }}").filter("triggers", vec!["investigate"]))
        .trigger("again", job("job.succeeded", "again {{ job.id }}").filter("triggers", vec!["fix", "again"]))
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let (status, answer) = baton.deliver(SECRET, "issues", "chain-1", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");

    let jobs = || async {
        let (_, v) = baton.get("/api/jobs?limit=100").await;
        v["jobs"].as_array().cloned().unwrap_or_default()
    };
    eventually_async("the chain to stop at the limit", || async {
        jobs().await.iter().any(|j| j["trigger"] == "again" && j["state"] == "failed")
    })
    .await;
    let all: Vec<Value> = jobs().await;
    let by = |t: &str| all.iter().filter(|j| j["trigger"] == t).cloned().collect::<Vec<_>>();
    assert_eq!(by("investigate").len(), 1);
    let fix = &by("fix")[0];
    assert_eq!(fix["state"], "succeeded");
    assert_eq!(fix["spec"]["prompt"], "fix found: #1");
    assert_eq!(fix["event"], "job.succeeded");
    assert_eq!(fix["repo"], "Codertocat/Hello-World");
    assert_eq!(fix["subject"], 1);
    let again = by("again");
    assert_eq!(again.len(), 3, "depth 2 and 3 run, depth 4 is stopped: {again:?}");
    let failed: Vec<_> = again.iter().filter(|j| j["state"] == "failed").collect();
    assert_eq!(failed.len(), 1);
    let error = failed[0]["error"].as_str().unwrap();
    assert!(error.contains("chain depth limit reached") && error.contains("max_chain_depth is 3"), "{error}");
    // Nothing more comes after the stop.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(jobs().await.len(), all.len());
}

#[tokio::test]
async fn rate_limits_and_cooldowns_skip_matches_with_a_reason() {
    let w = Workdir::new();
    let trigger = Trigger::on(&["issues.opened"]).agent("noop").workspace("none").prompt("x").output("none");
    Scenario::new()
        .github(GitHub::secret(SECRET))
        .agent("noop", Agent::command(&["true"]))
        .trigger("hourly", trigger.clone().job("max_runs_per_hour", 2))
        .trigger("calm", trigger.job("cooldown", "1h"))
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let body = fixture("issues/opened.payload.json");
    let mut answers = Vec::new();
    for i in 0..3 {
        let (status, answer) = baton.deliver(SECRET, "issues", &format!("burst-{i}"), &body).await;
        assert_eq!(status, 202, "{answer}");
        answers.push(answer);
    }
    let count = |a: &Value| a["jobs"].as_array().unwrap().len();
    let reasons = |a: &Value| {
        a["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| format!("{}: {}", s["trigger"], s["reason"]))
            .collect::<Vec<_>>()
    };
    assert_eq!(count(&answers[0]), 2, "{}", answers[0]);
    assert_eq!(count(&answers[1]), 1, "{}", answers[1]);
    assert!(
        reasons(&answers[1])[0].contains("\"calm\": \"cooldown: #1 ran less than 3600s ago"),
        "{:?}",
        reasons(&answers[1])
    );
    assert_eq!(count(&answers[2]), 0, "{}", answers[2]);
    let third = reasons(&answers[2]).join("\n");
    assert!(
        third.contains("\"hourly\": \"max_runs_per_hour: 2 runs in the last hour for Codertocat/Hello-World\""),
        "{third}"
    );
    assert!(third.contains("\"calm\": \"cooldown"), "{third}");
    // Another issue is another subject: the cooldown does not hold it back.
    let mut other: Value = serde_json::from_slice(&body).unwrap();
    other["issue"]["number"] = serde_json::json!(2);
    let (_, answer) = baton.deliver(SECRET, "issues", "other-1", other.to_string().as_bytes()).await;
    assert_eq!(answer["jobs"].as_array().unwrap().len(), 1, "{answer}");
}

#[tokio::test]
async fn a_job_end_lost_to_a_crash_goes_through_the_rules_at_the_next_start() {
    use std::sync::Arc;

    use baton::config::Config;
    use baton::engine::Engine;
    use baton::rules::{RuleSet, SharedRules};
    use baton::store::{Delivery, JobState, Store};

    let triggers = tempfile::tempdir().unwrap();
    std::fs::write(
        triggers.path().join("investigate.toml"),
        "on = [\"issues.opened\"]\n[job]\nagent = \"codex\"\nprompt = \"x\"\n",
    )
    .unwrap();
    std::fs::write(
        triggers.path().join("fix.toml"),
        "on = [\"job.succeeded\"]\n[filter]\ntriggers = [\"investigate\"]\n[job]\nagent = \"codex\"\nprompt = \"fix {{ result }}\"\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let config =
        Config::from_source(None, &format!("[storage]\npath = \"{}\"\n", data.path().display()), data.path()).unwrap();
    let (set, errors) = RuleSet::load(triggers.path(), &config);
    assert!(errors.is_empty(), "{errors:?}");
    let rules = SharedRules::new(set, Vec::new());

    // A job ends, and the daemon dies before its end goes through the rules.
    let store = crate::harness::open_store(data.path()).await;
    let event = baton::forge::github::normalize("issues", "d1", &crate::harness::fixture("issues/opened.payload.json"))
        .unwrap();
    store.accept(Delivery::new("d1", "github", "issues.opened"), rules.current().match_event(&event)).await.unwrap();
    let limits = baton::store::Limits { per_replica: 1, per_repo: 1, ..Default::default() };
    let mut job = store.claim_next(&limits, std::time::Duration::from_secs(60)).await.unwrap().unwrap();
    job.end(JobState::Succeeded, Some("the cause".into()), None, chrono::Utc::now());
    store.finish(&job, &[]).await.unwrap();
    assert_eq!(store.pending_ends().await.unwrap(), vec![job.id.clone()]);
    drop(store);

    let store = crate::harness::reopen_store(data.path()).await;
    let engine = |store: &Store| {
        Engine::new(
            store.clone(),
            rules.clone(),
            Arc::new(config.clone()),
            Arc::default(),
            Arc::default(),
            None,
            Arc::default(),
        )
    };
    engine(&store).recover().await.unwrap();
    assert!(store.pending_ends().await.unwrap().is_empty());
    let mut queued = Vec::new();
    for e in store.queued().await.unwrap() {
        queued.push(store.job(&e.id).await.unwrap().unwrap());
    }
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].trigger, "fix");
    assert_eq!(queued[0].spec.prompt, "fix the cause");
    // A second pass starts nothing new.
    engine(&store).recover().await.unwrap();
    assert_eq!(store.queued().await.unwrap().len(), 1);
}
