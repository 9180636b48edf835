//! Sends COUNT signed deliveries (unique ids) with CONCURRENCY clients and
//! waits until that many jobs have succeeded; prints `seconds jobs_per_second`.
//!
//! usage: flood URL[,URL…] SECRET PAYLOAD COUNT CONCURRENCY [wait-jobs]
//! (several URLs: replicas of one daemon, sent to in turn)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let urls: Arc<Vec<String>> = Arc::new(a[0].split(',').map(str::to_string).collect());
    let (secret, payload) = (a[1].clone(), std::fs::read(&a[2]).expect("payload"));
    let count: usize = a[3].parse().expect("count");
    let concurrency: usize = a[4].parse().expect("concurrency");
    let wait_jobs = a.get(5).is_some_and(|w| w == "wait-jobs");
    let payload = Arc::new(payload);
    let secret = Arc::new(secret);
    let next = Arc::new(AtomicUsize::new(0));
    let run = format!("{}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (urls, secret, payload, next, run) =
            (urls.clone(), secret.clone(), payload.clone(), next.clone(), run.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= count {
                    return;
                }
                // Every body differs, as GitHub's do: baton turns away a
                // signed body sent again under a new delivery id (a replay).
                let body = unique_body(&payload, &format!("{run}-{i}"));
                let sig = baton::forge::signature::sign(secret.as_bytes(), &body);
                let url = &urls[i % urls.len()];
                let resp = http
                    .post(format!("{url}/webhooks/github"))
                    .header("x-github-event", "issues")
                    .header("x-github-delivery", format!("flood-{run}-{i}"))
                    .header("x-hub-signature-256", &sig)
                    .body(body)
                    .send()
                    .await
                    .expect("send");
                assert!(resp.status().is_success(), "status {}", resp.status());
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    if wait_jobs {
        // Counted off /metrics: listing the jobs themselves would have the
        // client load the server it measures (decoding every job per poll).
        let http = reqwest::Client::new();
        loop {
            let mut done = 0;
            for url in urls.iter() {
                done += succeeded(&http, url).await;
            }
            if done >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{secs:.3} {:.1}", count as f64 / secs);
}

/// `payload` (a JSON object) with a first field naming `nonce`.
fn unique_body(payload: &[u8], nonce: &str) -> Vec<u8> {
    let at = payload.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
    let mut body = payload[..at].to_vec();
    body.extend_from_slice(format!("\"bench_nonce\":\"{nonce}\",").as_bytes());
    body.extend_from_slice(&payload[at..]);
    body
}

/// Jobs finished successfully, from baton's `baton_jobs_finished_total`.
async fn succeeded(http: &reqwest::Client, url: &str) -> usize {
    let text = http.get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with("baton_jobs_finished_total{") && l.contains("state=\"succeeded\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}
