//! Webhook ingress over real HTTP: every bad input gets its status code, the
//! daemon keeps serving, duplicates and untrusted senders start nothing.

use serde_json::{json, Value};

use crate::harness::{fixture, fixture_json, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "ingress-secret";

/// Agent `noop` (`true`), and `on-issue` running it on an opened issue
/// with `prompt`.
fn on_issue(prompt: &str) -> Scenario {
    Scenario::new().github(GitHub::secret(SECRET)).agent("noop", Agent::command(&["true"])).trigger(
        "on-issue",
        Trigger::on(&["issues.opened"]).agent("noop").workspace("none").prompt(prompt).output("none"),
    )
}

fn daemon() -> (Workdir, Baton) {
    let w = Workdir::new();
    on_issue("about {{ issue.title }}").set("server.max_body_bytes", 65536).write(&w);
    let baton = Baton::start(w.path(), &[]);
    (w, baton)
}

async fn accepted_jobs(baton: &Baton, delivery: &str, body: &[u8]) -> Vec<Value> {
    let (status, answer) = baton.deliver(SECRET, "issues", delivery, body).await;
    assert_eq!(status, 202, "{answer}");
    answer["jobs"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_the_daemon_keeps_serving() {
    let (_w, baton) = daemon();
    let body = fixture("issues/opened.payload.json");
    let sig = baton::forge::signature::sign(SECRET.as_bytes(), &body);
    let ev = ("x-github-event", "issues");
    let id = ("x-github-delivery", "bad-1");

    // 413: over max_body_bytes, even when correctly signed.
    let big = vec![b' '; 70_000];
    let big_sig = baton::forge::signature::sign(SECRET.as_bytes(), &big);
    let (status, _) = baton.post_webhook(&[ev, id, ("x-hub-signature-256", &big_sig)], &big).await;
    assert_eq!(status, 413);
    // 401: missing, wrong, malformed signature.
    let (status, _) = baton.post_webhook(&[ev, id], &body).await;
    assert_eq!(status, 401);
    let wrong = baton::forge::signature::sign(b"not the secret", &body);
    let (status, _) = baton.post_webhook(&[ev, id, ("x-hub-signature-256", &wrong)], &body).await;
    assert_eq!(status, 401);
    let (status, _) = baton.post_webhook(&[ev, id, ("x-hub-signature-256", "sha256=xyz")], &body).await;
    assert_eq!(status, 401);
    // 400: a header missing.
    let (status, answer) = baton.post_webhook(&[id, ("x-hub-signature-256", &sig)], &body).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("X-GitHub-Event"));
    let (status, answer) = baton.post_webhook(&[ev, ("x-hub-signature-256", &sig)], &body).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("X-GitHub-Delivery"));
    // 400: not JSON, or JSON that is not an object.
    for junk in [&b"{not json"[..], b"[1,2]", b""] {
        let (status, _) = baton.deliver(SECRET, "issues", "junk", junk).await;
        assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(junk));
    }
    // ping: 200, not stored.
    let (status, _) = baton.deliver(SECRET, "ping", "ping-1", &fixture("ping/payload.json")).await;
    assert_eq!(status, 200);
    let (_, list) = baton.get("/api/jobs?delivery=ping-1").await;
    assert_eq!(list["jobs"], json!([]));

    // Nothing above was stored, and the daemon still serves.
    let (_, list) = baton.get("/api/jobs").await;
    assert_eq!(list["jobs"], json!([]));
    let (status, _) = baton.get("/healthz").await;
    assert_eq!(status, 200);
    let (status, ready) = baton.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(accepted_jobs(&baton, "good-1", &body).await.len(), 1);
}

#[tokio::test]
async fn a_redelivered_id_is_a_duplicate_and_starts_no_job() {
    let (_w, baton) = daemon();
    let body = fixture("issues/opened.payload.json");
    let first = accepted_jobs(&baton, "dup-1", &body).await;
    assert_eq!(first.len(), 1);
    let (status, answer) = baton.deliver(SECRET, "issues", "dup-1", &body).await;
    assert_eq!(status, 200);
    assert_eq!(answer["duplicate"], true);
    let (_, list) = baton.get("/api/jobs?delivery=dup-1").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(list["jobs"][0]["id"], first[0]);
}

#[tokio::test]
async fn untrusted_authors_and_bots_start_no_job() {
    let (_w, baton) = daemon();
    let mut outsider = fixture_json("issues/opened.payload.json");
    outsider["issue"]["author_association"] = json!("NONE");
    assert!(accepted_jobs(&baton, "none-1", outsider.to_string().as_bytes()).await.is_empty());

    let mut bot = fixture_json("issues/opened.payload.json");
    bot["sender"]["type"] = json!("Bot");
    bot["sender"]["login"] = json!("dependabot[bot]");
    assert!(accepted_jobs(&baton, "bot-1", bot.to_string().as_bytes()).await.is_empty());

    let mut itself = fixture_json("issues/opened.payload.json");
    itself["sender"]["login"] = json!("baton[bot]");
    itself["sender"]["type"] = json!("User");
    assert!(accepted_jobs(&baton, "self-1", itself.to_string().as_bytes()).await.is_empty());

    // The same event from the owner does start one.
    assert_eq!(accepted_jobs(&baton, "owner-1", &fixture("issues/opened.payload.json")).await.len(), 1);
}

#[tokio::test]
async fn job_api_filters_and_limits() {
    let (_w, baton) = daemon();
    let body = fixture("issues/opened.payload.json");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(accepted_jobs(&baton, &format!("list-{i}"), &body).await[0].clone());
    }
    let (_, list) = baton.get("/api/jobs?limit=3").await;
    let got: Vec<Value> = list["jobs"].as_array().unwrap().iter().map(|j| j["id"].clone()).collect();
    assert_eq!(got, vec![ids[4].clone(), ids[3].clone(), ids[2].clone()], "newest first");
    let (_, list) = baton.get("/api/jobs?trigger=on-issue&delivery=list-1").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    let (_, list) = baton.get("/api/jobs?trigger=other").await;
    assert_eq!(list["jobs"], json!([]));
    let (status, _) = baton.get("/api/jobs?limit=0").await;
    assert_eq!(status, 400);
    let (status, _) = baton.get("/api/jobs?state=sleeping").await;
    assert_eq!(status, 400);
    let (status, _) = baton.get("/api/jobs?limit=10000").await;
    assert_eq!(status, 200);
    let (status, _) = baton.get("/api/jobs/nope").await;
    assert_eq!(status, 404);
    for id in &ids {
        let job = baton.finished(id.as_str().unwrap()).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let (_, list) = baton.get("/api/jobs?state=succeeded").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn an_unknown_event_type_is_stored_and_answered_202_with_no_jobs() {
    let (_w, baton) = daemon();
    let body = br#"{"action":"created","repository":{"full_name":"a/b"},"sender":{"login":"x","type":"User"}}"#;
    let (status, answer) = baton.deliver(SECRET, "sponsorship", "unknown-1", body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], json!([]));
    // Stored: sending it again is a duplicate.
    let (status, answer) = baton.deliver(SECRET, "sponsorship", "unknown-1", body).await;
    assert_eq!((status, answer["duplicate"].clone()), (200, json!(true)));
}

/// An event no trigger listens for, and the door does not act on, is
/// stored by its name without its payload being parsed: even a body that
/// is not JSON is taken (it is signed). One that something reads is
/// parsed, and refused when it cannot be.
#[tokio::test]
async fn an_event_kind_nothing_reads_is_stored_without_being_parsed() {
    let (_w, baton) = daemon();
    let junk = b"{not json";
    let (status, answer) = baton.deliver(SECRET, "star", "unread-1", junk).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], json!([]));
    let (status, answer) = baton.deliver(SECRET, "star", "unread-1", junk).await;
    assert_eq!((status, answer["duplicate"].clone()), (200, json!(true)), "stored: {answer}");
    // A trigger listens for `issues`; the door acts on pull requests and
    // comments whatever the triggers say.
    for read in ["issues", "pull_request", "issue_comment", "pull_request_review_comment"] {
        let (status, answer) = baton.deliver(SECRET, read, &format!("read-{read}"), junk).await;
        assert_eq!(status, 400, "{read}: {answer}");
    }
    let metrics = reqwest::get(format!("{}/metrics", baton.url)).await.unwrap().text().await.unwrap();
    let line = r#"baton_deliveries_total{event="star",outcome="accepted"} 1"#;
    assert!(metrics.contains(line), "counted by its name: {metrics}");
}

#[tokio::test]
async fn generic_sources_verify_their_own_header_and_name_their_kind() {
    let w = Workdir::new();
    let job = |on: &str| Trigger::on(&[on]).agent("noop").workspace("none").prompt("{{ build.id }}").output("none");
    Scenario::new()
        .github(GitHub::secret("gh"))
        .agent("noop", Agent::command(&["true"]))
        .raw(
            r#"
[sources.ci]
secret = "ci-secret"
signature_header = "X-CI-Signature"
action_field = "build.status"
[sources.deploy]
secret = "deploy-secret"
delivery_header = "X-Deploy-Id"
"#,
        )
        .trigger("ci-failed", job("ci.failed"))
        .trigger("deployed", job("deploy"))
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let http = reqwest::Client::new();
    let send = |source: &str, headers: Vec<(&str, String)>, body: &'static [u8]| {
        let mut req = http.post(format!("{}/webhooks/{source}", baton.url)).body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let failed: &[u8] = br#"{"build": {"id": 42, "status": "failed"}, "repository": "acme/app"}"#;
    let sig = baton::forge::signature::sign(b"ci-secret", failed);
    let (status, answer) = send("ci", vec![("X-CI-Signature", sig.clone())], failed).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"].as_array().unwrap().len(), 1);
    let id = answer["jobs"][0].as_str().unwrap().to_string();
    let job = baton.finished(&id).await;
    assert_eq!(job["event"], "ci.failed");
    assert_eq!(job["repo"], "acme/app");
    assert_eq!(job["spec"]["prompt"], "42");
    // No delivery header: the id is a hash of the body, so a resend is a duplicate.
    let (status, answer) = send("ci", vec![("X-CI-Signature", sig)], failed).await;
    assert_eq!((status, answer["duplicate"].clone()), (200, json!(true)));
    // A passing build is kind ci.passed: no trigger listens.
    let passed: &[u8] = br#"{"build": {"id": 43, "status": "passed"}}"#;
    let (status, answer) =
        send("ci", vec![("X-CI-Signature", baton::forge::signature::sign(b"ci-secret", passed))], passed).await;
    assert_eq!((status, answer["jobs"].clone()), (202, json!([])));
    // Wrong secret, GitHub's header instead of the source's, unknown source.
    let wrong = baton::forge::signature::sign(b"gh", failed);
    assert_eq!(send("ci", vec![("X-CI-Signature", wrong.clone())], failed).await.0, 401);
    assert_eq!(send("ci", vec![("X-Hub-Signature-256", wrong)], failed).await.0, 401);
    assert_eq!(send("nosuch", vec![], failed).await.0, 404);
    // A source with a delivery header uses it, and requires it.
    let body: &[u8] = br#"{"env": "prod"}"#;
    let sig = baton::forge::signature::sign(b"deploy-secret", body);
    let (status, _) = send("deploy", vec![("X-Signature-256", sig.clone())], body).await;
    assert_eq!(status, 400);
    let (status, answer) =
        send("deploy", vec![("X-Signature-256", sig.clone()), ("X-Deploy-Id", "7".into())], body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["delivery"], "deploy:7");
    let (status, answer) = send("deploy", vec![("X-Signature-256", sig), ("X-Deploy-Id", "8".into())], body).await;
    assert_eq!((status, answer["jobs"].as_array().unwrap().len()), (202, 1), "a new id with the same body is new");
}

/// Opens a raw connection and sends `text` (no more).
async fn raw(baton: &Baton, text: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = baton.url.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(text.as_bytes()).await.unwrap();
    stream
}

/// Reads until the server closes or answers; returns what it sent.
async fn read_reply(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), stream.read(&mut buf))
        .await
        .expect("the server answers or closes in time")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `server` adds to `[server]`.
fn slow_daemon(server: impl FnOnce(Scenario) -> Scenario) -> (Workdir, Baton) {
    let w = Workdir::new();
    server(Scenario::new().set("server.read_timeout", "1s")).github(GitHub::secret(SECRET)).write(&w);
    let baton = Baton::start(w.path(), &[]);
    (w, baton)
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let (_w, baton) = slow_daemon(std::convert::identity);
    // Headers that never finish: the connection is closed.
    let mut stream = raw(&baton, "POST /webhooks/github HTTP/1.1\r\nHost: x\r\n").await;
    let reply = read_reply(&mut stream).await;
    assert!(reply.is_empty() || reply.contains("408"), "{reply:?}");
    // A body that never finishes: 408.
    let mut stream = raw(
        &baton,
        "POST /webhooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nX-GitHub-Event: issues\r\n\r\n{\"a\":",
    )
    .await;
    let reply = read_reply(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    // And the daemon still serves.
    assert_eq!(baton.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn requests_beyond_the_in_flight_cap_get_503_with_retry_after() {
    let (_w, baton) = slow_daemon(|s| s.set("server.max_in_flight", 1));
    // Holds the only slot while its body trickles in.
    let mut held = raw(&baton, "POST /webhooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/webhooks/github", baton.url))
        .header("x-github-event", "issues")
        .header("x-github-delivery", "shed-1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    // Once the slot is free again, requests are served.
    let _ = read_reply(&mut held).await;
    drop(held);
    let body = fixture("issues/opened.payload.json");
    let mut status = 0;
    for _ in 0..100 {
        status = baton.deliver(SECRET, "issues", "shed-2", &body).await.0;
        if status != 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 202);
}

#[tokio::test]
async fn delivery_ids_are_forgotten_after_the_retention() {
    let w = Workdir::new();
    on_issue("x").set("storage.delivery_retention", "2s").write(&w);
    let baton = Baton::start(w.path(), &[]);
    let body = fixture("issues/opened.payload.json");
    let first = accepted_jobs(&baton, "kept-1", &body).await;
    let start = std::time::Instant::now();
    loop {
        let (status, answer) = baton.deliver(SECRET, "issues", "kept-1", &body).await;
        if status == 202 {
            // Forgotten as a delivery, but its job is not doubled.
            assert_eq!(answer["jobs"], json!(first));
            break;
        }
        assert_eq!(answer["duplicate"], true);
        assert!(start.elapsed() < crate::harness::WAIT, "the delivery id was never pruned");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (_, list) = baton.get("/api/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn metrics_count_deliveries_jobs_and_the_queue() {
    let (_w, baton) = daemon();
    let body = fixture("issues/opened.payload.json");
    let id = accepted_jobs(&baton, "m-1", &body).await[0].as_str().unwrap().to_string();
    let _ = baton.deliver(SECRET, "issues", "m-1", &body).await;
    baton.finished(&id).await;
    // A worker lets go of its job a moment after the job's end is stored.
    let metrics = || async { reqwest::get(format!("{}/metrics", baton.url)).await.unwrap().text().await.unwrap() };
    let start = std::time::Instant::now();
    while !metrics().await.contains("baton_jobs_running 0") {
        assert!(start.elapsed() < crate::harness::WAIT, "the job never stopped counting as running");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = metrics().await;
    for line in [
        "baton_deliveries_total{event=\"issues.opened\",outcome=\"accepted\"} 1",
        "baton_deliveries_total{event=\"issues.opened\",outcome=\"duplicate\"} 1",
        "baton_jobs_finished_total{trigger=\"on-issue\",state=\"succeeded\"} 1",
        "baton_job_duration_seconds_count{trigger=\"on-issue\"} 1",
        "baton_queue_depth 0",
        "baton_jobs_running 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(text.contains("baton_store_size_bytes "));
}

#[tokio::test]
async fn the_dashboard_lists_jobs_and_shows_one_escaped() {
    let (_w, baton) = daemon();
    let mut p = fixture_json("issues/opened.payload.json");
    p["issue"]["title"] = json!("<script>alert(1)</script>");
    let id = accepted_jobs(&baton, "dash-1", p.to_string().as_bytes()).await[0].as_str().unwrap().to_string();
    baton.finished(&id).await;
    let page = |path: String| async move {
        let resp = reqwest::get(path).await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    let (status, html) = page(format!("{}/", baton.url)).await;
    assert_eq!(status, 200);
    assert!(html.contains(&id) && html.contains("on-issue") && html.contains("succeeded"), "{html}");
    let (status, html) = page(format!("{}/?state=failed", baton.url)).await;
    assert_eq!(status, 200);
    assert!(!html.contains(&id));
    let (status, html) = page(format!("{}/jobs/{id}", baton.url)).await;
    assert_eq!(status, 200);
    assert!(html.contains("Attempts") && html.contains(&format!("/api/jobs/{id}/log")), "{html}");
    assert!(
        html.contains("about &lt;script&gt;alert(1)&lt;&#x2f;script&gt;")
            || html.contains("about &lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(!html.contains("<script>alert(1)"), "the title is escaped");
    assert_eq!(page(format!("{}/jobs/nope", baton.url)).await.0, 404);
}

/// Strangers' unsigned bodies are bounded by `server.max_buffered_bytes`
/// (64 MiB by default), not by the number of requests: 50 concurrent 25 MB
/// unsigned posts keep the daemon's memory under 150 MB, the ones over the
/// budget are turned away with 503 and Retry-After before their body is
/// read, and signed deliveries sent at the same time still get in.
#[tokio::test]
async fn unsigned_floods_cannot_make_baton_hold_more_than_its_buffer_budget() {
    let w = Workdir::new();
    on_issue("x").write(&w);
    let baton = Baton::start(w.path(), &[]);
    let pid = baton.pid();
    let rss_kb = move || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kb(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        })
    };
    let big = bytes::Bytes::from(vec![b'x'; 25 * 1024 * 1024]);
    let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60)).build().unwrap();
    let floods: Vec<_> = (0..50)
        .map(|n| {
            let req = http
                .post(format!("{}/webhooks/github", baton.url))
                .header("x-github-event", "issues")
                .header("x-github-delivery", format!("flood-{n}"))
                .header("x-hub-signature-256", "sha256=00")
                .body(big.clone());
            tokio::spawn(async move {
                match req.send().await {
                    Ok(r) => Some((r.status().as_u16(), r.headers().contains_key("retry-after"))),
                    Err(_) => None, // cut off mid-upload after the 503
                }
            })
        })
        .collect();
    // Signed deliveries, meanwhile.
    let body = fixture("issues/opened.payload.json");
    let mut signed = 0;
    for n in 0..5 {
        let (status, answer) = baton.deliver(SECRET, "issues", &format!("during-flood-{n}"), &body).await;
        assert!(status == 202 || status == 503, "{status}: {answer}");
        if status == 202 {
            signed += 1;
        }
    }
    let mut answers = Vec::new();
    for f in floods {
        answers.push(f.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_mb = peak.load(std::sync::atomic::Ordering::Relaxed) / 1024;
    assert!(peak_mb < 150, "the daemon held {peak_mb} MB");
    assert!(signed >= 4, "signed deliveries got in during the flood: {signed} of 5");
    let refused = answers.iter().flatten().filter(|(s, retry)| *s == 503 && *retry).count();
    let unsigned = answers.iter().flatten().filter(|(s, _)| *s == 401).count();
    assert!(refused > 0, "some were turned away: {answers:?}");
    assert!(unsigned + refused + answers.iter().filter(|a| a.is_none()).count() == 50, "{answers:?}");
    // And the daemon goes on.
    let (status, _) = baton.deliver(SECRET, "issues", "after-flood", &body).await;
    assert_eq!(status, 202);
}

/// A captured signed body sent again under a new delivery id is a replay:
/// answered as a duplicate that says so, and it starts nothing.
#[tokio::test]
async fn a_replayed_body_under_a_new_delivery_id_starts_nothing() {
    let (_w, baton) = daemon();
    let body = fixture("issues/opened.payload.json");
    let sig = baton::forge::signature::sign(SECRET.as_bytes(), &body);
    let send = |id: &'static str| {
        let (body, sig) = (body.clone(), sig.clone());
        let baton = &baton;
        async move {
            baton
                .post_webhook(
                    &[("x-github-event", "issues"), ("x-github-delivery", id), ("x-hub-signature-256", &sig)],
                    &body,
                )
                .await
        }
    };
    let (status, first) = send("original").await;
    assert_eq!(status, 202, "{first}");
    let (status, replay) = send("replayed").await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!((replay["duplicate"].clone(), replay["replay_of"].clone()), (json!(true), json!("original")));
    let (_, list) = baton.get("/api/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1, "the replay started no job");
    // The same body under another event name is another event.
    let (status, other) = baton
        .post_webhook(
            &[("x-github-event", "issue_comment"), ("x-github-delivery", "other"), ("x-hub-signature-256", &sig)],
            &body,
        )
        .await;
    assert_eq!(status, 202, "{other}");
}
