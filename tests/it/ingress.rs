//! Webhook ingress over real HTTP: every bad input gets its status code, the
//! daemon keeps serving, duplicates and untrusted senders start nothing.

use serde_json::{json, Value};

use crate::harness::{fixture, fixture_json, Baton, Workdir};

const SECRET: &str = "ingress-secret";

fn daemon() -> (Workdir, Baton) {
    let w = Workdir::new();
    w.config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 65536\n[github]\nwebhook_secret = \"{SECRET}\"\n[agents.noop]\ncommand = [\"true\"]\n"
    ));
    w.trigger(
        "on-issue",
        "on = [\"issues.opened\"]\n[job]\nagent = \"noop\"\nworkspace = \"none\"\nprompt = \"x\"\n[output]\nkind = \"none\"\n",
    );
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
    let sig = baton::ingress::signature::sign(SECRET.as_bytes(), &body);
    let ev = ("x-github-event", "issues");
    let id = ("x-github-delivery", "bad-1");

    // 413: over max_body_bytes, even when correctly signed.
    let big = vec![b' '; 70_000];
    let big_sig = baton::ingress::signature::sign(SECRET.as_bytes(), &big);
    let (status, _) = baton.post_webhook(&[ev, id, ("x-hub-signature-256", &big_sig)], &big).await;
    assert_eq!(status, 413);
    // 401: missing, wrong, malformed signature.
    let (status, _) = baton.post_webhook(&[ev, id], &body).await;
    assert_eq!(status, 401);
    let wrong = baton::ingress::signature::sign(b"not the secret", &body);
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
