//! `kill -9` in the middle of a flood of deliveries: every delivery that was
//! answered 2xx has exactly its job after a restart, none missing, none
//! doubled, and the store opens cleanly each time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::harness::{fixture, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "crash-secret";
const CLIENTS: usize = 16;

/// Trigger `name` runs `true` on every opened issue.
fn noop(name: &str) -> Scenario {
    Scenario::new()
        .github(GitHub::secret(SECRET))
        .agent("noop", Agent::command(&["true"]))
        .trigger(name, Trigger::on(&["issues.opened"]).agent("noop").workspace("none").prompt("x").output("none"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_flood_loses_nothing_acknowledged() {
    let w = Workdir::new();
    noop("flood").set("limits.max_parallel_jobs", 1).write(&w);
    let body = Arc::new(fixture("issues/opened.payload.json"));
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));

    // Three kill points: after this many more acknowledgements each time.
    for (round, kill_after) in [400usize, 700, 1000].into_iter().enumerate() {
        let baton = Baton::start(w.path(), &[]);
        let pid = baton.pid() as i32;
        let url = baton.url.clone();
        let round_acks = Arc::new(AtomicUsize::new(0));
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let (url, body, acked, next, round_acks) =
                (url.clone(), body.clone(), acked.clone(), next.clone(), round_acks.clone());
            clients.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                loop {
                    let id = format!("flood-{}", next.fetch_add(1, Ordering::SeqCst));
                    let body = crate::harness::unique_body(&body, &id);
                    let sig = baton::forge::signature::sign(SECRET.as_bytes(), &body);
                    let sent = http
                        .post(format!("{url}/webhooks/github"))
                        .header("x-github-event", "issues")
                        .header("x-github-delivery", &id)
                        .header("x-hub-signature-256", &sig)
                        .body(body)
                        .send()
                        .await;
                    let Ok(resp) = sent else { return };
                    if resp.status().as_u16() != 202 {
                        return;
                    }
                    let Ok(answer) = resp.json::<serde_json::Value>().await else { return };
                    let job = answer["jobs"][0].as_str().unwrap_or_default().to_string();
                    acked.lock().unwrap().insert(id, job);
                    round_acks.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        crate::harness::eventually("enough acknowledgements", || round_acks.load(Ordering::SeqCst) >= kill_after).await;
        // SAFETY: sending SIGKILL to the child we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        for c in clients {
            let _ = c.await;
        }
        let mut baton = baton;
        baton.kill9(); // reaps it
        assert!(round_acks.load(Ordering::SeqCst) >= kill_after, "round {round}");
    }

    let baton = Baton::start(w.path(), &[]);
    let (status, list) = baton.get("/api/jobs?limit=100000").await;
    assert_eq!(status, 200);
    let mut per_delivery: HashMap<String, Vec<String>> = HashMap::new();
    for job in list["jobs"].as_array().unwrap() {
        per_delivery
            .entry(job["delivery"].as_str().unwrap().to_string())
            .or_default()
            .push(job["id"].as_str().unwrap().to_string());
    }
    let acked = acked.lock().unwrap();
    assert!(acked.len() >= 2100, "a few thousand deliveries were acknowledged: {}", acked.len());
    for (delivery, job) in acked.iter() {
        let jobs = per_delivery.get(delivery).unwrap_or_else(|| panic!("acknowledged delivery {delivery} lost"));
        assert_eq!(jobs, &vec![job.clone()], "delivery {delivery}");
    }
    let ids: HashSet<&String> = per_delivery.values().flatten().collect();
    assert_eq!(ids.len(), per_delivery.values().map(Vec::len).sum::<usize>(), "no job is listed twice");
    assert!(per_delivery.values().all(|jobs| jobs.len() == 1), "no delivery has two jobs");
}

#[tokio::test]
async fn kill_9_while_two_jobs_run_then_both_complete_exactly_once() {
    let w = Workdir::new();
    let state = crate::harness::open_dir();
    let s = state.path().display();
    // Each run records its job (its prompt is the job's delivery id);
    // before the restart, runs hang as a long job would.
    let agent = w.script(
        "agent.sh",
        &format!(
            "#!/bin/sh\nid=$(cat)\necho \"$id\" >> {s}/started\n\
             while [ ! -f {s}/restarted ]; do sleep 0.1; done\necho \"$id\" >> {s}/completed\necho \"done $id\"\n"
        ),
    );
    Scenario::new()
        .github(GitHub::secret(SECRET))
        .agent("slow", Agent::script(&agent).read_write(&[state.path()]))
        .trigger(
            "work",
            Trigger::on(&["issues.opened"])
                .agent("slow")
                .workspace("none")
                .prompt("{{ event.delivery }}")
                .output("none"),
        )
        .write(&w);
    let body = fixture("issues/opened.payload.json");
    let mut baton = Baton::start(w.path(), &[]);
    let mut ids = Vec::new();
    for delivery in ["two-1", "two-2"] {
        let (status, answer) = baton.deliver(SECRET, "issues", delivery, &body).await;
        assert_eq!(status, 202, "{answer}");
        ids.push(answer["jobs"][0].as_str().unwrap().to_string());
    }
    let lines = |name: &str| -> Vec<String> {
        std::fs::read_to_string(state.path().join(name)).unwrap_or_default().lines().map(str::to_string).collect()
    };
    crate::harness::eventually("both jobs to run", || lines("started").len() == 2).await;
    baton.kill9();

    // The agents outlive the kill; the next start kills them before it
    // serves, and only then may runs finish.
    let baton = Baton::start(w.path(), &[]);
    std::fs::write(state.path().join("restarted"), "").unwrap();
    for id in &ids {
        let job = baton.finished(id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["result"], format!("done {}", job["delivery"].as_str().unwrap_or_default()));
        let outcomes: Vec<&str> =
            job["history"].as_array().unwrap().iter().filter_map(|a| a["outcome"].as_str()).collect();
        assert_eq!(outcomes, ["interrupted", "exit"], "{job}");
    }
    let mut completed = lines("completed");
    completed.sort();
    let expected = ["two-1", "two-2"];
    assert_eq!(completed, expected, "each job completed exactly once");
    let mut started = lines("started");
    started.sort();
    assert_eq!(started.len(), 4, "one interrupted run and one rerun each: {started:?}");
}

/// A delivery is answered 202 only once the store's file is synced. Seen
/// from outside, with strace: an `fdatasync` of the file came before it —
/// redb's `.baton/baton.redb` (its commits are made durable in groups), or
/// sled's `.baton/db/db` (sled's own flush writes with `sync_file_range`, no
/// metadata, no drive cache, and leaves the fsync to a thread that runs once
/// a second, so baton `fdatasync`s the file itself; sled's calls are `fsync`).
#[tokio::test]
async fn an_acknowledged_delivery_is_fdatasynced_not_only_flushed() {
    if crate::harness::postgres() {
        return; // PostgreSQL's commit is durable on the server's side
    }
    let file = if crate::harness::backend() == "sled" { "/.baton/db/db>" } else { "/.baton/baton.redb>" };
    assert!(
        std::process::Command::new("strace").arg("-V").output().is_ok(),
        "this test needs strace (apt-get install strace; .ci/run installs it)"
    );
    let w = Workdir::new();
    noop("one").write(&w);
    let trace = w.path().join("trace.txt");
    let trace_arg = trace.display().to_string();
    let wrapper = ["strace", "-f", "-y", "-e", "trace=fdatasync", "-o", trace_arg.as_str()];
    let baton = Baton::start_under(w.path(), &[], &wrapper);
    // Killing strace alone (as dropping `baton` does) could leave baton
    // running, detached: it goes first, even when an assertion fails.
    struct KillTraced(u32);
    impl Drop for KillTraced {
        fn drop(&mut self) {
            let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.0)).unwrap_or_default();
            for pid in children.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: signalling a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _traced = KillTraced(baton.pid());
    let syncs = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("fdatasync(") && l.contains(file) && l.contains("= 0"))
            .count()
    };
    let before = syncs();
    let (status, body) = baton.deliver(SECRET, "issues", "durable-1", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{body}");
    // strace writes its line as the call returns; the file may lag a little.
    crate::harness::eventually("an fdatasync of the store's data file", || syncs() > before).await;
}
