//! Concurrency groups with real, sleeping agents: replace-pending, skip and
//! cancel-in-progress, each recorded with the job that displaced it.

use serde_json::{json, Value};

use crate::harness::{eventually, fixture_json, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "groups-secret";

fn pr(action: &str, sha: &str) -> Vec<u8> {
    let mut p = fixture_json("pull_request/opened.payload.json");
    p["action"] = json!(action);
    p["pull_request"]["head"]["sha"] = json!(sha);
    p.to_string().into_bytes()
}

/// Agent `a` on every head of a pull request, prompted with the head.
fn on_heads() -> Trigger {
    Trigger::on(&["pull_request.opened", "pull_request.synchronize"])
        .agent("a")
        .workspace("none")
        .prompt("{{ pull_request.head.sha }}")
        .output("none")
}

/// A daemon whose agent records each head it starts on and blocks on heads
/// aaaa and bbbb until `release` exists.
fn daemon(triggers: Vec<(&str, Trigger)>) -> (Workdir, Baton, std::path::PathBuf, std::path::PathBuf) {
    let w = Workdir::new();
    let started = w.shared().join("started");
    let release = w.shared().join("release");
    let agent = w.script(
        "agent.sh",
        &format!(
            "#!/bin/sh\nsha=$(cat)\necho \"$sha\" >> {s}\ncase \"$sha\" in aaaa*|bbbb*) while [ ! -e {r} ]; do sleep 0.05; done;; esac\necho \"done $sha\"\n",
            s = started.display(),
            r = release.display()
        ),
    );
    let mut scenario = Scenario::new()
        .set("limits.max_parallel_jobs", 4)
        .set("limits.max_parallel_per_repo", 4)
        .github(GitHub::secret(SECRET))
        .agent("a", Agent::script(&agent).read_write(&[w.shared()]));
    for (name, trigger) in triggers {
        scenario = scenario.trigger(name, trigger);
    }
    scenario.write(&w);
    let baton = Baton::start(w.path(), &[]);
    (w, baton, started, release)
}

async fn send(baton: &Baton, id: &str, action: &str, sha: &str) -> Vec<String> {
    let (status, answer) = baton.deliver(SECRET, "pull_request", id, &pr(action, sha)).await;
    assert_eq!(status, 202, "{answer}");
    answer["jobs"].as_array().unwrap().iter().map(|j| j.as_str().unwrap().to_string()).collect()
}

fn started_with(path: &std::path::Path, sha: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.lines().any(|l| l == sha))
}

#[tokio::test]
async fn replace_pending_and_skip() {
    let (_w, baton, started, release) = daemon(vec![
        ("review", on_heads().job("concurrency", "review-{{ pull_request.number }}")),
        ("lint", on_heads().job("concurrency", "lint-{{ pull_request.number }}").job("on_conflict", "skip")),
    ]);
    let a = send(&baton, "d-a", "opened", "aaaa").await; // [review, lint] in trigger-file order
    eventually("both jobs of the first head to run", || {
        std::fs::read_to_string(&started).is_ok_and(|s| s.lines().filter(|l| *l == "aaaa").count() == 2)
    })
    .await;
    let b = send(&baton, "d-b", "synchronize", "bbbb").await;
    let c = send(&baton, "d-c", "synchronize", "cccc").await;
    let job = |id: &String| {
        let baton = &baton;
        let id = id.clone();
        async move { baton.job(&id).await }
    };
    let (lint_a, review_a) = (a[0].clone(), a[1].clone());
    let (lint_b, review_b) = (b[0].clone(), b[1].clone());
    let (lint_c, review_c) = (c[0].clone(), c[1].clone());
    assert_eq!(job(&review_a).await["trigger"], "review");

    // replace-pending: B waited, C replaced it.
    let rb: Value = job(&review_b).await;
    assert_eq!(rb["state"], "cancelled", "{rb}");
    assert_eq!(rb["error"], format!("replaced by job {review_c}"));
    assert_eq!(rb["displaced_by"], review_c.as_str());
    assert_eq!(job(&review_c).await["state"], "queued", "C waits while A runs");
    // skip: B and C were dropped while A ran.
    for dropped in [&lint_b, &lint_c] {
        let j = job(dropped).await;
        assert_eq!(j["state"], "cancelled", "{j}");
        assert!(j["error"].as_str().unwrap().starts_with("dropped: concurrency group `lint-2` is busy"), "{j}");
        assert_eq!(j["displaced_by"], lint_a.as_str());
    }

    std::fs::write(&release, "").unwrap();
    assert_eq!(baton.finished(&review_a).await["state"], "succeeded");
    let rc = baton.finished(&review_c).await;
    assert_eq!((rc["state"].clone(), rc["result"].clone()), (json!("succeeded"), json!("done cccc")));
    assert!(!started_with(&started, "bbbb"), "the replaced job never ran");
}

#[tokio::test]
async fn cancel_in_progress_stops_the_review_of_the_old_head() {
    let (_w, baton, started, _release) = daemon(vec![(
        "ci",
        on_heads().job("concurrency", "ci-{{ pull_request.number }}").job("cancel_in_progress", true),
    )]);
    let a = send(&baton, "d-a", "opened", "aaaa").await;
    eventually("the first head's job to run", || started_with(&started, "aaaa")).await;
    let c = send(&baton, "d-c", "synchronize", "cccc").await;
    let old = baton.finished(&a[0]).await;
    assert_eq!(old["state"], "cancelled", "{old}");
    assert_eq!(old["error"], format!("cancelled: superseded by job {}", c[0]));
    assert_eq!(old["displaced_by"], c[0].as_str());
    let new = baton.finished(&c[0]).await;
    assert_eq!(new["result"], "done cccc");
}

/// Two jobs on one repository, under `[limits]` `max_parallel_jobs` and
/// `max_parallel_per_repo` and the agent's own `max_parallel`: the second
/// must wait until the first is done.
async fn the_second_job_waits(max_parallel_jobs: u32, max_parallel_per_repo: u32, agent_max_parallel: Option<u32>) {
    let w = Workdir::new();
    let started = w.shared().join("started");
    let release = w.shared().join("release");
    let agent = w.script(
        "agent.sh",
        &format!(
            "#!/bin/sh\necho x >> {}\nwhile [ ! -e {} ]; do sleep 0.05; done\necho done\n",
            started.display(),
            release.display()
        ),
    );
    let mut agent = Agent::script(&agent).read_write(&[w.shared()]);
    if let Some(n) = agent_max_parallel {
        agent = agent.set("max_parallel", n);
    }
    Scenario::new()
        .set("limits.max_parallel_jobs", max_parallel_jobs)
        .set("limits.max_parallel_per_repo", max_parallel_per_repo)
        .github(GitHub::secret(SECRET))
        .agent("a", agent)
        .trigger("t", on_heads().prompt("x"))
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let first = send(&baton, "m-1", "opened", "1111").await;
    let second = send(&baton, "m-2", "synchronize", "2222").await;
    eventually("one job to start", || std::fs::read_to_string(&started).is_ok()).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::read_to_string(&started).unwrap().lines().count(),
        1,
        "the second waits (max_parallel_jobs = {max_parallel_jobs}, max_parallel_per_repo = \
         {max_parallel_per_repo}, the agent's max_parallel = {agent_max_parallel:?})"
    );
    assert_eq!(baton.job(&second[0]).await["state"], "queued");
    std::fs::write(&release, "").unwrap();
    assert_eq!(baton.finished(&first[0]).await["state"], "succeeded");
    assert_eq!(baton.finished(&second[0]).await["state"], "succeeded");
}

#[tokio::test]
async fn an_agent_runs_at_most_its_max_parallel_jobs() {
    the_second_job_waits(4, 4, Some(1)).await;
}

#[tokio::test]
async fn a_repository_runs_at_most_max_parallel_per_repo_jobs() {
    the_second_job_waits(4, 1, None).await;
}

#[tokio::test]
async fn the_daemon_runs_at_most_max_parallel_jobs() {
    the_second_job_waits(1, 4, None).await;
}
