//! Fills a store with COUNT finished jobs, as a long-running daemon would
//! have them, for the restart benchmark.
//!
//! usage: seed STORAGE_PATH COUNT

use baton::rules::{JobSpec, OutputKind, Workspace};
use baton::store::{Delivery, Durability, JobState, Store};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let path = std::path::PathBuf::from(&a[0]);
    let count: usize = a[1].parse().expect("count");
    // Seeding, not serving: no fsync per record; one flush at the end.
    let store = Store::open_with(&path, Durability::Os).expect("open store");
    for i in 0..count {
        let spec = JobSpec {
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
        };
        let delivery = Delivery::new(format!("seed-{i}"), "github", "issues.opened");
        store.accept(delivery, vec![spec]).await.expect("accept");
    }
    let limits = baton::store::Limits { per_replica: 1, per_repo: 1, ..Default::default() };
    while let Some(mut job) = store.claim_next(&limits, std::time::Duration::from_secs(60)).await.expect("claim") {
        let now = chrono::Utc::now();
        job.end_attempt(baton::store::Outcome::Exit, Some(0), None, now);
        job.end(JobState::Succeeded, Some("The parser fails on empty input; see src/parse.rs:42.".into()), None, now);
        store.finish(&job, &[]).await.expect("finish");
        // A daemon sends each end through the rules (chaining) as it
        // happens; only a crash leaves ends pending for the next start.
        store.end_handled(&job.id).await.expect("end handled");
    }
    drop(store);
    let store = Store::open(&path).expect("reopen");
    store.flush().await.expect("flush");
    println!("{}", store.job_count().await.expect("count"));
}
