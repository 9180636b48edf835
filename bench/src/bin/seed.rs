//! Fills a store with finished jobs, as a long-running daemon would have
//! them, for the restart and scaling benchmarks. A store that already holds
//! jobs gets more, up to COUNT in all.
//!
//! usage: seed STORAGE_PATH COUNT
//!        seed postgres://… SCHEMA COUNT   (the jobs the store API makes;
//!                                         bench/run copies them in SQL)

use baton::rules::{JobSpec, OutputKind, Workspace};
use baton::store::{Delivery, Durability, JobState};

fn spec(i: usize) -> JobSpec {
    JobSpec {
        trigger: "investigate".into(),
        event: "issues.opened".into(),
        repo: Some("acme/app".into()),
        subject: Some(i as u64),
        agent: "codex".into(),
        prompt: format!("Investigate issue #{i}: something broke in the parser again."),
        workspace: Workspace::DefaultBranch { branch: "main".into() },
        max_attempts: 1,
        output: OutputKind::Comment,
        default_branch: Some("main".into()),
        ..JobSpec::default()
    }
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    // Seeding, not serving: no fsync per record; one flush at the end.
    let (store, rest) = baton_bench::open_store(&a, Durability::Os, "seed").await;
    let count: usize = rest[0].parse().expect("count");
    let from = store.job_count().await.expect("count");
    // Many deliveries in flight, so the store's batch writer fills batches.
    let mut tasks: tokio::task::JoinSet<Result<_, baton::store::StoreError>> = tokio::task::JoinSet::new();
    for i in from..count.max(from) {
        if tasks.len() >= 256 {
            if let Some(r) = tasks.join_next().await {
                r.expect("task").expect("accept");
            }
        }
        let store = store.clone();
        tasks.spawn(async move {
            let delivery = Delivery::new(format!("seed-{i}"), "github", "issues.opened");
            store.accept(delivery, vec![spec(i)]).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task").expect("accept");
    }
    // A stopped daemon's running job still counts against its limits.
    let limits = baton::store::Limits { per_replica: 1000, per_repo: 1000, ..Default::default() };
    // As many ends as jobs added: a queue that was there before (the
    // scaling benchmark's backlog) stays as long.
    for _ in from..count.max(from) {
        let Some(mut job) = store.claim_next(&limits, std::time::Duration::from_secs(60)).await.expect("claim") else {
            break;
        };
        let now = chrono::Utc::now();
        job.end_attempt(baton::store::Outcome::Exit, Some(0), None, now);
        job.end(JobState::Succeeded, Some("The parser fails on empty input; see src/parse.rs:42.".into()), None, now);
        store.finish(&job, &[]).await.expect("finish");
        // A daemon sends each end through the rules (chaining) as it
        // happens; only a crash leaves ends pending for the next start.
        store.end_handled(&job.id).await.expect("end handled");
    }
    store.flush().await.expect("flush");
    let total = store.job_count().await.expect("count");
    store.close().await.expect("close");
    if !a[0].starts_with("postgres://") {
        // Written without fsync: made durable by a store that does.
        // The store's writer thread lets go of the database's lock just
        // after the last handle goes.
        drop(store);
        baton_bench::open_retrying(std::path::Path::new(&a[0]), Durability::Fsync).await.flush().await.expect("flush");
    }
    println!("{total}");
}
