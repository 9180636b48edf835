//! Claim latency: claims up to N queued jobs one at a time, as a
//! dispatcher does, and finishes each. Prints "p50_us p99_us claimed".
//!
//! usage: claims STORAGE_PATH N
//!        claims postgres://… SCHEMA N

use std::time::Instant;

use baton::store::{Durability, JobState};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (store, rest) = baton_bench::open_store(&a, Durability::Fsync, "claims").await;
    let n: usize = rest[0].parse().expect("n");
    // A stopped daemon's running job still counts against its limits.
    let limits = baton::store::Limits { per_replica: 1000, per_repo: 1000, ..Default::default() };
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let Some(mut job) = store.claim_next(&limits, std::time::Duration::from_secs(60)).await.expect("claim") else {
            break;
        };
        took.push(t0.elapsed().as_micros() as u64);
        let now = chrono::Utc::now();
        job.end_attempt(baton::store::Outcome::Exit, Some(0), None, now);
        job.end(JobState::Succeeded, None, None, now);
        store.finish(&job, &[]).await.expect("finish");
        store.end_handled(&job.id).await.expect("end handled");
    }
    store.close().await.expect("close");
    took.sort_unstable();
    let at = |q: f64| took.get(((took.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    println!("{} {} {}", at(0.5), at(0.99), took.len());
}
