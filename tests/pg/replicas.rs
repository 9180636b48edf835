//! Several replicas on one PostgreSQL database: what a single daemon
//! guarantees must hold across them, and across a replica that dies.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton::rules::{JobSpec, OutputKind};
use baton::store::{job_id, Accepted, Delivery, JobQuery, JobState, Location, Outcome, Store};

use crate::fake_github::FakeGitHub;
use crate::harness::{database_url, fixture, unique_body, Baton};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "replicas-webhook-secret-0123456789";

/// Bounds the waits of these (longer) tests.
const LONG_WAIT: Duration = Duration::from_secs(240);

/// A fresh schema for one test's replicas.
fn fresh_schema() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).unwrap();
    format!("r_{}", hex::encode(bytes))
}

/// The store as a replica named `replica` sees it.
async fn store_on(schema: &str, replica: &str, url: &str) -> Store {
    let location =
        Location::Postgres { url: url.to_string(), schema: Some(schema.to_string()), replica: replica.into() };
    Store::connect(&location, Path::new("/nonexistent")).await.unwrap_or_else(|e| panic!("{e}"))
}

/// One replica's folder and config: its own storage folder, the shared
/// database schema, an agent that records each run it finishes.
struct Replica {
    dir: tempfile::TempDir,
    name: String,
}

impl Replica {
    /// `scenario` (agent `rec` and trigger `work`) as replica `name`.
    fn new(name: &str, schema: &str, db: &str, scenario: &Scenario) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        scenario
            .clone()
            .set("storage.path", dir.path().join("data").display().to_string())
            .set("storage.backend", "postgres")
            .set("storage.url", db)
            .set("storage.schema", schema)
            .set("storage.replica", name)
            .set("sandbox.enabled", false)
            .write_to(dir.path());
        Replica { dir, name: name.to_string() }
    }

    fn start(&self) -> Baton {
        Baton::start(self.dir.path(), &[])
    }
}

/// A script that reads its prompt, waits `sleep`, and appends
/// `<prompt> <tag>` to `log` (a run that reached its end).
fn recorder(dir: &Path, log: &Path, sleep: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("agent.sh");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nd=$(cat)\nsleep {sleep}\necho \"$d\" >> {}\necho \"done $d\"\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Agent `rec` runs `command` on every opened issue, prompted with the
/// delivery.
fn rec(command: &Path, output: &str) -> Scenario {
    let work = Trigger::on(&["issues.opened"])
        .agent("rec")
        .workspace("none")
        .prompt("{{ baton_test_delivery }}")
        .output(output);
    Scenario::new().github(GitHub::secret(SECRET)).agent("rec", Agent::script(command)).trigger("work", work)
}

/// Signs and posts one `issues.opened` delivery to `url`.
async fn send(http: &reqwest::Client, url: &str, delivery: &str) -> Result<u16, String> {
    let body = unique_body(&fixture("issues/opened.payload.json"), delivery);
    let sig = baton::forge::signature::sign(SECRET.as_bytes(), &body);
    let response = http
        .post(format!("{url}/webhooks/github"))
        .header("x-github-event", "issues")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", sig)
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.status().as_u16())
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// Three replicas, one database; 16 clients send 3,000 deliveries spread
/// over the three, and one replica is killed (`kill -9`) mid-flood, with
/// jobs running, and started again after its lease. Every delivery answered
/// 2xx has exactly one job; every job ends, once; every result lands on the
/// fake GitHub exactly once; the dead replica's jobs are finished by the
/// others once its lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_survive_a_kill_under_a_flood() {
    let (schema, db) = (fresh_schema(), database_url());
    let github = FakeGitHub::start().await;
    let shared = tempfile::tempdir().unwrap();
    let runs = shared.path().join("runs");
    let agent = recorder(shared.path(), &runs, "0.1");
    let scenario = rec(&agent, "comment")
        .set("limits.max_parallel_jobs", 4)
        .set("limits.max_parallel_per_repo", 100)
        .set("limits.job_lease", "3s")
        .github(GitHub::secret(SECRET).token("test-token").api(&github));
    let replicas: Vec<Replica> =
        (0..3).map(|n| Replica::new(&format!("replica-{n}"), &schema, &db, &scenario)).collect();
    let mut daemons: Vec<Option<Baton>> = replicas.iter().map(|r| Some(r.start())).collect();
    let urls: Arc<Mutex<Vec<Option<String>>>> =
        Arc::new(Mutex::new(daemons.iter().map(|d| d.as_ref().map(|b| b.url.clone())).collect()));

    const TOTAL: usize = 3000;
    let next = Arc::new(AtomicUsize::new(0));
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (next, accepted, refused, urls) = (next.clone(), accepted.clone(), refused.clone(), urls.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= TOTAL {
                    return;
                }
                let url = {
                    let urls = urls.lock().unwrap();
                    // Spread over the three; a replica that is down is passed over.
                    (0..3).map(|k| (i + k) % 3).find_map(|k| urls[k].clone())
                };
                let delivery = format!("flood-{i}");
                match send(&http, &url.unwrap_or_default(), &delivery).await {
                    Ok(s) if (200..300).contains(&s) => accepted.lock().unwrap().push(delivery),
                    _ => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }

    // Mid-flood, with jobs running on it, replica 1 dies.
    let start = Instant::now();
    while next.load(Ordering::SeqCst) < TOTAL / 3 {
        assert!(start.elapsed() < LONG_WAIT, "the flood stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let watcher = store_on(&schema, "observer", &db).await;
    let victim = "replica-1";
    let running_on_victim = async || {
        let rows =
            watcher.list_jobs(&JobQuery { state: Some(JobState::Running), limit: 10_000, ..JobQuery::default() }).await;
        rows.map(|r| r.len()).unwrap_or(0)
    };
    let deadline = Instant::now() + LONG_WAIT;
    while running_on_victim().await == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    urls.lock().unwrap()[1] = None;
    let mut dead = daemons[1].take().unwrap();
    dead.kill9();
    let killed_at = chrono::Utc::now();
    drop(dead);

    // It stays down past its lease, so the others must take its jobs back:
    // at least twice the lease, and on a slow machine until they have.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let taken_back = async || {
        let rows = watcher.list_jobs(&JobQuery { limit: 10_000, ..JobQuery::default() }).await.unwrap_or_default();
        rows.iter().any(|j| {
            j.finished_at.is_some()
                && j.history.iter().any(|a| a.error.as_deref().is_some_and(|e| e.contains("lease expired")))
        })
    };
    let deadline = Instant::now() + LONG_WAIT;
    while !taken_back().await && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let restarted_at = chrono::Utc::now();
    let back = replicas[1].start();
    urls.lock().unwrap()[1] = Some(back.url.clone());
    daemons[1] = Some(back);
    for c in clients {
        c.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > TOTAL * 9 / 10, "{} of {TOTAL} accepted", accepted.len());

    // Every acknowledged delivery has exactly one job, and every job ends.
    let deadline = Instant::now() + LONG_WAIT;
    let jobs = loop {
        let jobs = watcher.list_jobs(&JobQuery { limit: 100_000, ..JobQuery::default() }).await.unwrap();
        if jobs.len() >= accepted.len() && jobs.iter().all(|j| j.state.is_final()) {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not all end: {} of {}",
            jobs.iter().filter(|j| j.state.is_final()).count(),
            jobs.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let by_id: HashMap<&str, &baton::store::Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    for d in &accepted {
        let delivery =
            watcher.delivery(d).await.unwrap().unwrap_or_else(|| panic!("delivery {d} acknowledged, not stored"));
        assert_eq!(delivery.jobs, vec![job_id(d, "work")], "delivery {d}");
        let job = by_id.get(job_id(d, "work").as_str()).unwrap_or_else(|| panic!("no job for {d}"));
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    }
    // A delivery whose answer was lost in the kill may be stored without
    // its 2xx; never a job without a delivery.
    assert!(jobs.len() <= accepted.len() + refused.load(Ordering::SeqCst), "{} jobs", jobs.len());

    // Each job's run reached its end once — twice only for a job whose first
    // run the kill cut short (its agent may have finished just before).
    let mut ends: HashMap<String, usize> = HashMap::new();
    for line in lines(&runs) {
        *ends.entry(line).or_default() += 1;
    }
    let mut taken_back = 0;
    for job in &jobs {
        let n = ends.get(&job.delivery).copied().unwrap_or(0);
        let interrupted = job.history.iter().any(|a| a.outcome == Some(Outcome::Interrupted));
        if interrupted {
            assert!((1..=2).contains(&n), "{} ended {n} times: {job:?}", job.delivery);
            let by_lease = job.history.iter().any(|a| a.error.as_deref().is_some_and(|e| e.contains("lease expired")));
            if by_lease && job.finished_at.is_some_and(|t| t > killed_at && t < restarted_at) {
                taken_back += 1;
            }
        } else {
            assert_eq!(n, 1, "{} ended {n} times: {job:?}", job.delivery);
        }
    }
    assert!(taken_back >= 1, "the dead replica's jobs were finished by the others after its lease");

    // Each result lands on GitHub exactly once.
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        let comments = github.comments("Codertocat/Hello-World#1");
        let mut seen: HashMap<String, usize> = HashMap::new();
        for c in &comments {
            for job in &jobs {
                if c.body.contains(&format!("job={}", job.id)) {
                    *seen.entry(job.id.clone()).or_default() += 1;
                }
            }
            if let Some((id, _)) = seen.iter().find(|(_, n)| **n > 1) {
                let job = jobs.iter().find(|j| &j.id == id);
                let posts: Vec<_> = github
                    .requests_to("POST", "/repos/Codertocat/Hello-World/issues/1/comments")
                    .into_iter()
                    .filter(|r| r.body.to_string().contains(id.as_str()))
                    .map(|r| r.status)
                    .collect();
                panic!("job {id}'s result was posted twice (answers {posts:?}): {job:?}");
            }
        }
        if seen.len() == jobs.len() {
            break;
        }
        assert!(Instant::now() < deadline, "{} of {} results published", seen.len(), jobs.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = victim;
    drop(daemons);
    drop_schema(&schema);
}

/// A job queued through a full replica starts on an idle one, woken by the
/// database (not by a poll: the idle replica's own tick is 20 s away); its
/// log is served by the replica that did not run it; a cancel asked of one
/// replica stops a job running on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_wakes_an_idle_replica_and_logs_and_cancels_cross_replicas() {
    let (schema, db) = (fresh_schema(), database_url());
    let shared = tempfile::tempdir().unwrap();
    let release = shared.path().join("release");
    use std::os::unix::fs::PermissionsExt;
    let agent = shared.path().join("agent.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\nd=$(cat)\necho \"working on $d\"\ncase \"$d\" in block*) while [ ! -e {r} ]; do sleep 0.05; done;; esac\necho \"done $d\"\n",
            r = release.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let scenario = rec(&agent, "none").set("limits.max_parallel_jobs", 1).set("limits.max_parallel_per_repo", 100);
    let (a, b) = (Replica::new("a", &schema, &db, &scenario), Replica::new("b", &schema, &db, &scenario));
    let da = a.start();
    let http = reqwest::Client::new();
    assert_eq!(send(&http, &da.url, "block-1").await, Ok(202));
    let blocker = job_id("block-1", "work");
    let deadline = Instant::now() + LONG_WAIT;
    while da.job(&blocker).await["state"] != "running" {
        assert!(Instant::now() < deadline, "the blocking job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B starts idle; A is full. Work sent to A must run on B.
    let db_ = b.start();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&http, &da.url, "quick-1").await, Ok(202));
    let quick = job_id("quick-1", "work");
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let job = db_.job(&quick).await;
        if job["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "the idle replica was not woken: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(da.job(&blocker).await["state"], "running", "A was full all along");
    // A serves the log of a job B ran, plain and as a stream.
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        let text = reqwest::get(format!("{}/api/jobs/{quick}/log", da.url)).await.unwrap().text().await.unwrap();
        if text.contains("working on quick-1") && text.contains("done quick-1") {
            break;
        }
        assert!(Instant::now() < deadline, "A never served B's log: {text:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = reqwest::Client::new()
        .get(format!("{}/api/jobs/{quick}/log", da.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        events.contains("data: working on quick-1") && events.ends_with("event: end\ndata: succeeded\n\n"),
        "{events}"
    );
    // A cancel asked of B stops the job A runs.
    let (status, answer) = db_.post(&format!("/api/jobs/{blocker}/cancel")).await;
    assert_eq!(status, 200, "{answer}");
    let job = da.finished(&blocker).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    drop((da, db_));
    drop_schema(&schema);
}

/// Limits that span replicas hold when they claim at the same moment:
/// one job per repository, however many replicas race for its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_racing_to_claim_keep_the_limits() {
    let (schema, db) = (fresh_schema(), database_url());
    let stores =
        [store_on(&schema, "x", &db).await, store_on(&schema, "y", &db).await, store_on(&schema, "z", &db).await];
    let spec = |n: usize| baton::rules::JobSpec {
        trigger: format!("t{n}"),
        agent: "a".into(),
        repo: Some("one/repo".into()),
        max_attempts: 1,
        ..Default::default()
    };
    // More than one claim's look at the queue: each replica sees a
    // different part of the line.
    let mut accepts = Vec::new();
    for n in 0..300 {
        let (store, spec) = (stores[0].clone(), spec(n));
        let d = baton::store::Delivery::new(format!("race-{n}"), "github", "issues.opened");
        accepts.push(tokio::spawn(async move { store.accept(d, vec![spec]).await.unwrap() }));
    }
    for a in accepts {
        a.await.unwrap();
    }
    for round in 0..10 {
        let limits = baton::store::Limits { per_replica: 10, per_repo: 1, ..Default::default() };
        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        let mut claims = Vec::new();
        for store in &stores {
            let (store, limits, barrier) = (store.clone(), limits.clone(), barrier.clone());
            claims.push(tokio::spawn(async move {
                barrier.wait().await;
                store.claim_next(&limits, Duration::from_secs(60)).await.unwrap()
            }));
        }
        let mut claimed = Vec::new();
        for (n, c) in claims.into_iter().enumerate() {
            claimed.extend(c.await.unwrap().map(|job| (n, job)));
        }
        assert_eq!(claimed.len(), 1, "round {round}: one job of the repository at a time, across replicas");
        let (by, mut job) = claimed.remove(0);
        job.end(JobState::Succeeded, None, None, chrono::Utc::now());
        stores[by].finish(&job, &[]).await.unwrap();
    }
    drop_schema(&schema);
}

/// GitHub sends one delivery to several replicas at once (a redelivery
/// behind a load balancer): it is stored once, with one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_delivery_at_three_replicas_at_once_is_stored_once() {
    let (schema, db) = (fresh_schema(), database_url());
    let stores =
        [store_on(&schema, "x", &db).await, store_on(&schema, "y", &db).await, store_on(&schema, "z", &db).await];
    let spec = baton::rules::JobSpec { trigger: "t".into(), agent: "a".into(), max_attempts: 1, ..Default::default() };
    let mut answers = Vec::new();
    for n in 0..50 {
        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        for store in &stores {
            let (store, spec, barrier) = (store.clone(), spec.clone(), barrier.clone());
            answers.push(tokio::spawn(async move {
                barrier.wait().await;
                let d = baton::store::Delivery::new(format!("same-{n}"), "github", "issues.opened");
                store.accept(d, vec![spec]).await.unwrap()
            }));
        }
    }
    let mut new = 0;
    for a in answers {
        match a.await.unwrap() {
            baton::store::Accepted::New(_) => new += 1,
            baton::store::Accepted::Duplicate => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(new, 50, "each delivery is new exactly once");
    assert_eq!(stores[1].job_count().await.unwrap(), 50);
    drop_schema(&schema);
}

/// A replica cut off for longer than its lease finds the job taken back:
/// its renewal fails (so it stops the run) and it cannot store an end over
/// what the replica that took the job does.
#[tokio::test]
async fn a_replica_that_lost_its_lease_writes_nothing_more() {
    let (schema, db) = (fresh_schema(), database_url());
    let (x, y) = (store_on(&schema, "x", &db).await, store_on(&schema, "y", &db).await);
    let spec = baton::rules::JobSpec { trigger: "t".into(), agent: "a".into(), max_attempts: 2, ..Default::default() };
    x.accept(baton::store::Delivery::new("lost-1", "github", "issues.opened"), vec![spec]).await.unwrap();
    let limits = baton::store::Limits { per_replica: 1, per_repo: 1, ..Default::default() };
    let job = x.claim_next(&limits, Duration::from_millis(300)).await.unwrap().unwrap();
    assert!(x.renew_lease(&job.id, Duration::from_millis(300)).await.unwrap(), "x holds it");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(y.expired_leases(Duration::from_secs(60)).await.unwrap(), vec![job.id.clone()], "y takes it back");
    assert!(y.expired_leases(Duration::from_secs(60)).await.unwrap().is_empty(), "once");
    assert!(!x.renew_lease(&job.id, Duration::from_secs(60)).await.unwrap(), "x learns it lost the lease");
    let mut done = job.clone();
    done.end(JobState::Succeeded, Some("x's result".into()), None, chrono::Utc::now());
    let err = x.finish(&done, &[]).await.expect_err("x may not store an end");
    assert!(matches!(err, baton::store::StoreError::LeaseLost(_)), "{err}");
    // y puts it back as interrupted; it stays queued, not x's success.
    let back = baton::domain::dispatch::interrupt(&job, "lease expired", chrono::Utc::now());
    y.finish(&back, &[]).await.unwrap();
    assert_eq!(x.job(&job.id).await.unwrap().unwrap().state, JobState::Queued);
    drop_schema(&schema);
}

/// Two replicas share one concurrency group: its jobs never overlap, though
/// half are sent to each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_run_two_jobs_of_one_group_at_once() {
    let (schema, db) = (fresh_schema(), database_url());
    let shared = tempfile::tempdir().unwrap();
    let log = shared.path().join("log");
    use std::os::unix::fs::PermissionsExt;
    let agent = shared.path().join("agent.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\nd=$(cat)\necho \"start $d\" >> {l}\nsleep 0.3\necho \"end $d\" >> {l}\necho ok\n",
            l = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let one_at_a_time = Trigger::on(&["issues.opened"])
        .agent("rec")
        .workspace("none")
        .prompt("{{ baton_test_delivery }}")
        .job("concurrency", "one-at-a-time")
        .job("on_conflict", "queue")
        .output("none");
    let scenario = rec(&agent, "none")
        .set("limits.max_parallel_jobs", 4)
        .set("limits.max_parallel_per_repo", 100)
        .trigger("work", one_at_a_time);
    let a = Replica::new("a", &schema, &db, &scenario);
    let b = Replica::new("b", &schema, &db, &scenario);
    let (da, db_) = (a.start(), b.start());
    let http = reqwest::Client::new();
    let n = 12;
    let mut sends = Vec::new();
    for i in 0..n {
        let url = if i % 2 == 0 { da.url.clone() } else { db_.url.clone() };
        let http = http.clone();
        sends.push(tokio::spawn(async move { send(&http, &url, &format!("group-{i}")).await }));
    }
    for s in sends {
        assert_eq!(s.await.unwrap(), Ok(202));
    }
    let deadline = Instant::now() + LONG_WAIT;
    while lines(&log).iter().filter(|l| l.starts_with("end")).count() < n {
        assert!(Instant::now() < deadline, "group jobs did not all run: {:?}", lines(&log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // start x, end x, start y, end y, …: never two starts in a row.
    let log = lines(&log);
    for pair in log.chunks(2) {
        let (start, end) = (&pair[0], &pair[1]);
        assert_eq!(start.strip_prefix("start "), end.strip_prefix("end "), "overlap in {log:?}");
    }
    let _ = (a.name.clone(), b.name.clone());
    drop((da, db_));
    drop_schema(&schema);
}

/// A schedule configured on three replicas fires once per slot: each runs
/// the scheduler at the same moment, on its own connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_on_three_replicas_fires_once_per_slot() {
    let (schema, db) = (fresh_schema(), database_url());
    let triggers = tempfile::tempdir().unwrap();
    let hourly = Trigger::on(&["schedule"])
        .set("schedule", "0 * * * *")
        .filter("repos", vec!["acme/app", "acme/lib"])
        .agent("codex")
        .prompt("chores");
    std::fs::write(triggers.path().join("hourly.toml"), hourly.toml()).unwrap();
    let config = baton::config::Config::from_source(None, "", Path::new("/")).unwrap();
    let (set, errors) = baton::rules::RuleSet::load(triggers.path(), &config);
    assert!(errors.is_empty(), "{errors:?}");
    let rules = baton::rules::SharedRules::new(set, Vec::new());
    let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
    let mut stores = Vec::new();
    for n in 0..3 {
        stores.push(store_on(&schema, &format!("s{n}"), &db).await);
    }
    let mut fired_total = 0;
    for (first_sight, slot_time) in [("2026-11-24T00:30:00Z", "2026-11-24T01:00:01Z"), ("", "2026-11-24T02:00:02Z")] {
        if !first_sight.is_empty() {
            baton::schedule::tick(&stores[0], &rules, at(first_sight)).await.unwrap();
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        let mut ticks = Vec::new();
        for store in &stores {
            let (store, rules, barrier) = (store.clone(), rules.clone(), barrier.clone());
            let now = at(slot_time);
            ticks.push(tokio::spawn(async move {
                barrier.wait().await;
                baton::schedule::tick(&store, &rules, now).await.unwrap()
            }));
        }
        let mut fired = Vec::new();
        for t in ticks {
            fired.extend(t.await.unwrap());
        }
        let unique: HashSet<&String> = fired.iter().collect();
        assert_eq!(fired.len(), 2, "one delivery per repository and slot, across replicas: {fired:?}");
        assert_eq!(unique.len(), 2);
        fired_total += fired.len();
    }
    assert_eq!(stores[0].job_count().await.unwrap(), fired_total);
    drop_schema(&schema);
}

/// The database restarts mid-flood: while it is down deliveries get 503,
/// never a 2xx that is then lost; service resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_mid_flood_loses_nothing_acknowledged() {
    let pg = PrivateCluster::start();
    let (schema, db) = (fresh_schema(), pg.url());
    let scenario = Scenario::new()
        .github(GitHub::secret(SECRET))
        .agent("rec", Agent::command(&["true"]))
        .trigger("work", Trigger::on(&["issues.opened"]).agent("rec").workspace("none").prompt("x").output("none"));
    let r = Replica::new("solo", &schema, &db, &scenario);
    let daemon = r.start();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut accepted = Vec::new();
    let mut unavailable = 0;
    let mut other = Vec::new();
    let mut i = 0;
    let mut send_some =
        async |count: usize, accepted: &mut Vec<String>, unavailable: &mut usize, other: &mut Vec<String>| {
            for _ in 0..count {
                let d = format!("dbr-{i}");
                i += 1;
                match send(&http, &daemon.url, &d).await {
                    Ok(202) => accepted.push(d),
                    Ok(503) => *unavailable += 1,
                    o => other.push(format!("{d}: {o:?}")),
                }
            }
        };
    send_some(50, &mut accepted, &mut unavailable, &mut other).await;
    pg.stop();
    send_some(5, &mut accepted, &mut unavailable, &mut other).await;
    assert!(unavailable >= 5, "deliveries while the database is down get 503 ({unavailable})");
    pg.start_again();
    // Service resumes by itself: the pool reconnects.
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        let before = accepted.len();
        send_some(1, &mut accepted, &mut unavailable, &mut other).await;
        if accepted.len() > before {
            break;
        }
        assert!(Instant::now() < deadline, "service did not resume");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    send_some(50, &mut accepted, &mut unavailable, &mut other).await;
    assert!(other.is_empty(), "only 202 or 503: {other:?}");
    let store = store_on(&schema, "observer", &db).await;
    for d in &accepted {
        let delivery = store.delivery(d).await.unwrap().unwrap_or_else(|| panic!("{d} acknowledged but lost"));
        assert_eq!(delivery.jobs, vec![job_id(d, "work")]);
    }
    drop(daemon);
}

/// Two replicas hold a job each on one pull request nothing is held on
/// yet, at once. A session of the test's own locks the `held` table
/// against writes (reads still go through), so both replicas' admissions
/// are under way, waiting on it, before either can write; then lets go.
/// Both jobs must be held after: the second list written is the first's
/// plus its own, never its own alone (a subject's row is created, then
/// locked, before it is read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_holding_jobs_on_one_new_pull_request_keep_both() {
    use std::io::{BufRead as _, Write as _};

    let (schema, db) = (fresh_schema(), database_url());
    let (a, b) = (store_on(&schema, "a", &db).await, store_on(&schema, "b", &db).await);
    let mut gate = std::process::Command::new("psql")
        .args([&db, "-qtAX", "-v", "ON_ERROR_STOP=1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_gate = gate.stdin.take().unwrap();
    let mut from_gate = std::io::BufReader::new(gate.stdout.take().unwrap());
    writeln!(to_gate, "BEGIN; LOCK TABLE {schema}.held IN SHARE ROW EXCLUSIVE MODE; SELECT pg_backend_pid();").unwrap();
    let mut pid = String::new();
    from_gate.read_line(&mut pid).unwrap();
    let pid: i32 = pid.trim().parse().unwrap_or_else(|e| panic!("the gate's pid {pid:?}: {e}"));

    let waiting = |n: usize| {
        let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE {pid} = ANY(pg_blocking_pids(pid))");
        let deadline = Instant::now() + LONG_WAIT;
        loop {
            let out = std::process::Command::new("psql").args([&db, "-qtAX", "-c", &sql]).output().unwrap();
            let now: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
            if now >= n {
                return;
            }
            assert!(Instant::now() < deadline, "{n} admissions waiting on the gate (now {now})");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let hold = |store: &Store, delivery: &str| {
        let (store, delivery) = (store.clone(), delivery.to_string());
        let spec = JobSpec {
            trigger: "review".into(),
            event: "pull_request.opened".into(),
            repo: Some("o/r".into()),
            subject: Some(7),
            agent: "noop".into(),
            prompt: "p".into(),
            max_attempts: 1,
            output: OutputKind::None,
            ..JobSpec::default()
        };
        tokio::spawn(async move {
            let d = Delivery::new(delivery, "github", "pull_request.opened");
            store.accept_with(d, Vec::new(), vec![spec], None).await
        })
    };
    let first = hold(&a, "held-a");
    tokio::task::block_in_place(|| waiting(1));
    let second = hold(&b, "held-b");
    tokio::task::block_in_place(|| waiting(2));
    writeln!(to_gate, "COMMIT;").unwrap();
    drop(to_gate);
    for t in [first, second] {
        assert!(matches!(t.await.unwrap(), Ok(Accepted::New(_))));
    }
    let _ = gate.wait();

    let held = a.held_all().await.unwrap();
    let on: Vec<(String, Vec<String>)> =
        held.into_iter().map(|(s, list)| (s, list.into_iter().map(|h| h.delivery).collect())).collect();
    let mut deliveries: Vec<String> = on.iter().flat_map(|(_, d)| d.clone()).collect();
    deliveries.sort();
    assert_eq!(deliveries, ["held-a", "held-b"], "both held, on one subject: {on:?}");
    assert_eq!(on.len(), 1, "{on:?}");
    drop((a, b));
    drop_schema(&schema);
}

/// Drops a test's schema (best effort).
pub(crate) fn drop_schema(schema: &str) {
    let _ = std::process::Command::new("psql")
        .args([&database_url(), "-q", "-c", &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// A PostgreSQL server of the test's own (the machine's binaries, run as
/// the `postgres` user), so the test can stop and start it.
struct PrivateCluster {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .expect("PostgreSQL's server binaries under /usr/lib/postgresql (Debian's postgresql package)");
        let dir = tempfile::Builder::new().prefix("baton-pg").tempdir_in("/tmp").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let status = std::process::Command::new("chown").args(["postgres:postgres"]).arg(dir.path()).status().unwrap();
        assert!(status.success(), "chown the cluster folder to postgres (run the tests as root)");
        let c = PrivateCluster { dir, port, bin };
        c.as_postgres(&[c.bin.join("initdb").to_str().unwrap(), "-A", "trust", "-U", "postgres", "-D", &c.data()]);
        c.start_again();
        c
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn as_postgres(&self, args: &[&str]) {
        let out = std::process::Command::new("runuser").args(["-u", "postgres", "--"]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn start_again(&self) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        let log = self.dir.path().join("log").display().to_string();
        self.as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            &self.data(),
            "-o",
            &opts,
            "-l",
            &log,
            "-w",
            "start",
        ]);
    }

    fn stop(&self) {
        self.as_postgres(&[self.bin.join("pg_ctl").to_str().unwrap(), "-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}
