//! A daemon left running: rounds of pull request work (reviews, which
//! leave notes, and a CI repair each round, which pushes) under a short
//! retention. Once the retention has passed, every table, the job folders
//! and the disk stay flat from round to round.
//!
//! The quick form runs in CI; the full one (20,000 jobs) is
//! `cargo test --test it soak -- --ignored --nocapture` (or `--test pg` for
//! PostgreSQL). Each prints a row per round. The plain form is the churn
//! issue 31 found sled growing under: rounds of 10,000 jobs that run
//! `/bin/true`, pruned 20 s after they end, and no notes.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::fake_github::FakeGitHub;
use crate::harness::{bare_repo, fixture, fixture_json, git, postgres, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "soak-secret";
const TOKEN: &str = "ghp_soakTestToken0123456789abcdefghijklmn";
/// What each round delivers.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// Pull requests to review (which leaves notes) and one CI repair
    /// (which pushes), pruned 5 s after.
    PullRequests,
    /// Issues whose jobs only run `/bin/true`, pruned 20 s after (or
    /// `BATON_SOAK_RETENTION` seconds).
    Plain,
}

impl Shape {
    /// Jobs, their notes and deliveries are pruned this long after.
    fn retention(self) -> u64 {
        let env = std::env::var("BATON_SOAK_RETENTION").ok().and_then(|s| s.parse().ok());
        match self {
            Shape::PullRequests => 5,
            Shape::Plain => env.unwrap_or(20),
        }
    }
}

/// What one round left behind, measured once the retention has passed.
#[derive(Debug)]
struct Round {
    tables: Vec<baton::store::TableSize>,
    disk: u64,
    live: u64,
    rss_kb: u64,
    job_folders: usize,
}

#[tokio::test]
async fn stored_data_stays_flat_over_rounds_of_pull_request_work() {
    soak(Shape::PullRequests, 3, 60).await;
}

/// The full soak: 20,000 jobs.
#[tokio::test]
#[ignore = "takes tens of minutes: the full soak"]
async fn stored_data_stays_flat_over_20000_jobs() {
    soak(Shape::PullRequests, sized("BATON_SOAK_ROUNDS", 10), sized("BATON_SOAK_JOBS", 2_000)).await;
}

/// Issue 31's churn: 5 rounds of 10,000 plain jobs, 20 s retention.
#[tokio::test]
#[ignore = "takes tens of minutes: the churn soak"]
async fn stored_data_stays_flat_over_rounds_of_plain_jobs() {
    soak(Shape::Plain, sized("BATON_SOAK_ROUNDS", 5), sized("BATON_SOAK_JOBS", 10_000)).await;
}

fn sized(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|n| n.parse().ok()).unwrap_or(default)
}

async fn soak(shape: Shape, rounds: usize, per_round: usize) {
    let fake = FakeGitHub::start().await;
    let w = Workdir::new();
    let root = w.path().join("remote");
    bare_repo(&root, "Codertocat/Hello-World", "master", &[("README.md", "hello\n"), ("fix.txt", "start\n")]);
    let bare = root.join("Codertocat/Hello-World.git");
    let review = w.script("review.sh", "#!/bin/sh\ncat > /dev/null\necho 'Looks fine.'\n");
    let repair = w.script("repair.sh", "#!/bin/sh\ncat > /dev/null\necho repaired >> fix.txt\necho 'Repaired.'\n");
    let retention = format!("{}s", shape.retention());
    Scenario::new()
        .github(GitHub::secret(SECRET).api(&fake).repos(&root).token("env:GITHUB_TOKEN"))
        .set("storage.job_retention", retention.as_str())
        .set("storage.delivery_retention", retention.as_str())
        .set("limits.max_parallel_jobs", 4)
        .agent("true", Agent::command(&["/bin/true"]))
        .trigger("chore", Trigger::on(&["issues.opened"]).agent("true").workspace("none").prompt("p").output("none"))
        .agent("review", Agent::script(&review))
        .agent("repair", Agent::script(&repair))
        .trigger(
            "review",
            Trigger::on(&["pull_request.opened"]).agent("review").workspace("none").prompt("r").output("review"),
        )
        .trigger(
            "repair",
            Trigger::on(&["check_run.completed"])
                .agent("repair")
                .workspace("pr-head")
                .prompt("fix it")
                .output("push")
                .set("output.title", "Repair")
                .filter("conclusions", vec!["failure"]),
        )
        .write(&w);
    let env = [("GITHUB_TOKEN", TOKEN)];
    let mut measured: Vec<Round> = Vec::new();
    eprintln!(
        "round  jobs    disk KB    live KB  RSS KB  job folders  tables (records; PostgreSQL only while it runs)"
    );
    // One daemon for every round, as an operator leaves it running.
    let baton = Baton::start(w.path(), &env);
    for round in 0..rounds {
        if shape == Shape::Plain {
            let issue = fixture("issues/opened.payload.json");
            for i in 0..per_round {
                let (status, answer) = baton.deliver(SECRET, "issues", &format!("is-{round}-{i}"), &issue).await;
                assert_eq!(status, 202, "{answer}");
            }
            idle(&baton).await;
            let r = measure(&w, &baton, shape).await;
            eprintln!("{}", r.row(round, (round + 1) * per_round));
            measured.push(r);
            continue;
        }
        // Each round works on pull requests of its own: the last round's
        // notes are stale by the next and must go.
        for i in 0..per_round {
            let number = (round * per_round + i + 10) as u64;
            let body = pull_request(number, &format!("{:040x}", number));
            let (status, answer) = baton.deliver(SECRET, "pull_request", &format!("pr-{round}-{i}"), &body).await;
            assert_eq!(status, 202, "{answer}");
        }
        let number = 100_000 + round as u64;
        let head = pull_request_branch(&bare, number);
        let (status, answer) =
            baton.deliver(SECRET, "check_run", &format!("ci-{round}"), &check_failed(number, &head)).await;
        assert_eq!(status, 202, "{answer}");
        assert!(answer["jobs"][0].is_string(), "a repair job: {answer}");
        // (Behind the round's reviews in the queue.)
        idle(&baton).await;
        // Published, all of it: a job whose publication waits is kept.
        let reviews = (round + 1) * per_round;
        let start = std::time::Instant::now();
        while review_posts(&fake) < reviews {
            assert!(
                start.elapsed() < Duration::from_secs(1800),
                "{} of {reviews} reviews published",
                review_posts(&fake)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The repair landed (its job may be pruned already).
        let pushed = git(&bare, &["rev-parse", &format!("refs/heads/pr-{number}")]);
        assert_eq!(git(&bare, &["rev-parse", &format!("{pushed}^")]), head, "a repair on top of the failed head");
        let r = measure(&w, &baton, shape).await;
        eprintln!("{}", r.row(round, (round + 1) * (per_round + 1)));
        measured.push(r);
    }
    drop(baton);
    // Once the retention has passed, every table holds next to nothing,
    // however many rounds went through it.
    let left = census(w.path()).await;
    eprintln!("after the last round: {left:?}");
    for t in &left {
        assert!(t.records <= 10, "table {} holds {} records after {rounds} rounds: {left:?}", t.name, t.records);
    }
    let (first, last) = (&measured[0], &measured[measured.len() - 1]);
    for t in &last.tables {
        let before = first.tables.iter().find(|f| f.name == t.name).map_or(0, |f| f.records);
        assert!(
            t.records <= before + before / 2 + 10,
            "table {} grew from {before} to {} records over {rounds} rounds: {measured:#?}",
            t.name,
            t.records
        );
    }
    assert!(last.job_folders <= first.job_folders + first.job_folders / 2 + 5, "job folders grew: {measured:#?}");
    // (Stores allocate in steps of a few MB: a small store is let grow by
    // one such step.)
    assert!(
        last.disk <= first.disk + (first.disk / 2).max(4 << 20),
        "the store's disk grew from {} KB to {} KB over {rounds} rounds: {measured:#?}",
        first.disk / 1024,
        last.disk / 1024
    );
}

/// What a round left, once the retention and the prune after it passed.
async fn measure(w: &Workdir, baton: &Baton, shape: Shape) -> Round {
    tokio::time::sleep(Duration::from_secs(shape.retention() + 3)).await;
    let storage = w.path().join(".baton");
    let job_folders = std::fs::read_dir(storage.join("jobs")).map(|d| d.count()).unwrap_or(0);
    // An embedded store's tables are read once it stops (it is one process's).
    let tables = if postgres() { census(w.path()).await } else { Vec::new() };
    let live: u64 = tables.iter().map(|t| t.bytes).sum();
    // An embedded store's files: redb's one, or sled's folder.
    let embedded = dir_size(&storage.join("db")) + std::fs::metadata(storage.join("baton.redb")).map_or(0, |m| m.len());
    let disk = if postgres() { live } else { embedded };
    Round { tables, disk, live, rss_kb: rss_kb(baton.pid()), job_folders }
}

impl Round {
    fn row(&self, round: usize, jobs: usize) -> String {
        let shown: Vec<String> =
            self.tables.iter().filter(|t| t.records > 0).map(|t| format!("{}={}", t.name, t.records)).collect();
        format!(
            "{:>5}  {:>6}  {:>9}  {:>9}  {:>6}  {:>11}  {}",
            round + 1,
            jobs,
            self.disk / 1024,
            self.live / 1024,
            self.rss_kb,
            self.job_folders,
            shown.join(" ")
        )
    }
}

/// Every table of the store in `dir` (the daemon stopped). On PostgreSQL
/// after a `VACUUM` of them, as autovacuum would have run by then on a
/// server that has it on (the test machine's has it off).
async fn census(dir: &Path) -> Vec<baton::store::TableSize> {
    let storage = dir.join(".baton");
    let store = crate::harness::open_store(if postgres() { dir } else { &storage }).await;
    let tables = store.census().await.expect("census");
    if !postgres() {
        return tables;
    }
    let schema = crate::harness::schema_for(dir);
    let names: Vec<String> = tables.iter().map(|t| format!("{schema}.{}", t.name)).collect();
    let vacuum = format!("VACUUM {}", names.join(", "));
    let out = std::process::Command::new("psql")
        .args([&crate::harness::database_url(), "-q", "-c", &vacuum])
        .output()
        .expect("psql");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    store.census().await.expect("census")
}

/// Pull request `number` opened at `head` (reviewed, so it leaves notes).
fn pull_request(number: u64, head: &str) -> Vec<u8> {
    let mut p = fixture_json("pull_request/opened.payload.json");
    p["number"] = json!(number);
    p["pull_request"]["number"] = json!(number);
    p["pull_request"]["head"]["sha"] = json!(head);
    serde_json::to_vec(&p).unwrap()
}

/// A branch and `refs/pull/NUMBER/head` for pull request `number`, one
/// commit on master; returns the commit.
fn pull_request_branch(bare: &Path, number: u64) -> String {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "--quiet", "--branch", "master", bare.to_str().unwrap(), "."]);
    std::fs::write(work.path().join("change.txt"), format!("change {number}\n")).unwrap();
    git(work.path(), &["add", "."]);
    git(work.path(), &["commit", "--quiet", "-m", "change"]);
    git(work.path(), &["push", "--quiet", "origin", &format!("HEAD:refs/heads/pr-{number}")]);
    let sha = git(work.path(), &["rev-parse", "HEAD"]);
    git(bare, &["update-ref", &format!("refs/pull/{number}/head"), &sha]);
    sha
}

/// A failed check on pull request `number` at `head`.
fn check_failed(number: u64, head: &str) -> Vec<u8> {
    let mut p = fixture_json("check_run/completed.payload.json");
    p["check_run"]["id"] = json!(number);
    p["check_run"]["conclusion"] = json!("failure");
    p["check_run"]["head_sha"] = json!(head);
    p["check_run"]["check_suite"]["head_sha"] = json!(head);
    p["check_run"]["check_suite"]["conclusion"] = json!("failure");
    p["check_run"]["check_suite"]["head_branch"] = json!(format!("pr-{number}"));
    p["check_run"]["pull_requests"][0]["number"] = json!(number);
    p["check_run"]["pull_requests"][0]["head"]["sha"] = json!(head);
    p["check_run"]["pull_requests"][0]["head"]["ref"] = json!(format!("pr-{number}"));
    serde_json::to_vec(&p).unwrap()
}

/// Waits until no job is queued or running.
async fn idle(baton: &Baton) {
    let start = std::time::Instant::now();
    loop {
        let (_, queued) = baton.get("/api/jobs?state=queued&limit=1").await;
        let (_, running) = baton.get("/api/jobs?state=running&limit=1").await;
        let empty = |v: &serde_json::Value| v["jobs"].as_array().is_some_and(|a| a.is_empty());
        if empty(&queued) && empty(&running) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(3600), "the jobs never finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reviews the fake GitHub was sent.
fn review_posts(fake: &FakeGitHub) -> usize {
    fake.requests_to("POST", "/repos/Codertocat/Hello-World/pulls/")
        .iter()
        .filter(|r| r.path.ends_with("/reviews"))
        .count()
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
