//! The job API: cursor pagination and the live log as Server-Sent Events.

use serde_json::Value;

use crate::harness::{fixture, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "api-secret";

fn daemon(agent: &str) -> (Workdir, Baton) {
    daemon_with(agent, std::convert::identity)
}

/// `server` adds to the scenario (its `[server]`, in these tests).
fn daemon_with(agent: &str, server: impl FnOnce(Scenario) -> Scenario) -> (Workdir, Baton) {
    let w = Workdir::new();
    let script = w.script("agent.sh", agent);
    server(Scenario::new())
        .github(GitHub::secret(SECRET))
        .agent("script", Agent::script(&script))
        .trigger("work", Trigger::on(&["issues.opened"]).agent("script").workspace("none").prompt("x").output("none"))
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    (w, baton)
}

async fn deliver(baton: &Baton, delivery: &str) -> String {
    let (status, body) = baton.deliver(SECRET, "issues", delivery, &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{body}");
    body["jobs"][0].as_str().unwrap().to_string()
}

#[tokio::test]
async fn job_listings_page_with_a_cursor() {
    let (_w, baton) = daemon("#!/bin/sh\necho ok\n");
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(deliver(&baton, &format!("page-{n}")).await);
    }
    ids.reverse(); // the listing is newest first
    let mut seen = Vec::new();
    let client = baton.client();
    let mut query = baton::api::wire::JobsQuery { limit: Some(2), ..Default::default() };
    let mut pages = 0;
    loop {
        let page = client.jobs(&query).await.expect("a page");
        pages += 1;
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        match page.next {
            Some(next) => query.cursor = Some(next),
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);
    query.cursor = Some("nope".into());
    let refused = client.jobs(&query).await.expect_err("a cursor no page gave");
    assert_eq!(refused.status(), Some(400), "{refused}");
}

#[tokio::test]
async fn the_log_streams_live_as_server_sent_events() {
    let (w, baton) = daemon("#!/bin/sh\necho first line\nsleep 1\necho second line\nsleep 0.3\necho third line\n");
    let _ = w;
    let id = deliver(&baton, "sse-1").await;
    let resp = reqwest::Client::new()
        .get(format!("{}/api/jobs/{id}/log", baton.url))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut resp = resp;
    let mut text = String::new();
    let mut live = false;
    let deadline = std::time::Instant::now() + crate::harness::WAIT;
    while !text.contains("event: end") {
        assert!(std::time::Instant::now() < deadline, "stream did not end: {text}");
        let Some(chunk) = resp.chunk().await.unwrap() else { break };
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.contains("data: first line") && !text.contains("second line") {
            // The first line arrived while the agent still ran.
            live |= baton.job(&id).await["state"] == "running";
        }
    }
    assert!(live, "the log was not followed live: {text}");
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let first = data.iter().position(|l| *l == "first line").expect("first");
    let second = data.iter().position(|l| *l == "second line").expect("second");
    let third = data.iter().position(|l| *l == "third line").expect("third");
    assert!(first < second && second < third, "{data:?}");
    assert!(text.ends_with("event: end\ndata: succeeded\n\n"), "{text}");
}

#[tokio::test]
async fn with_an_api_token_every_api_route_wants_it_and_health_stays_open() {
    let (_w, baton) = daemon_with("#!/bin/sh\necho ok\n", |s| s.set("server.api_token", "s3cret-api-token"));
    let http = reqwest::Client::new();
    for path in ["/api/jobs", "/api/triggers", "/api/jobs/nope/log", "/"] {
        let bare = http.get(format!("{}{path}", baton.url)).send().await.unwrap();
        assert_eq!(bare.status(), 401, "{path} without the token");
        let wrong = http.get(format!("{}{path}", baton.url)).bearer_auth("nope").send().await.unwrap();
        assert_eq!(wrong.status(), 401, "{path} with a wrong token");
    }
    let ok = http.get(format!("{}/api/jobs", baton.url)).bearer_auth("s3cret-api-token").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    for path in ["/healthz", "/readyz"] {
        assert_eq!(baton.get(path).await.0, 200, "{path}");
    }
    assert!(!baton.log_text().contains("s3cret-api-token"));
}

#[tokio::test]
async fn every_log_line_about_a_delivery_or_job_carries_its_id() {
    let (_w, baton) = daemon("#!/bin/sh\necho ok\n");
    let id = deliver(&baton, "logged-1").await;
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    crate::harness::eventually("the job's end in the log", || baton.log_text().contains("Job finished.")).await;
    let lines: Vec<Value> = baton.log_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let about =
        |what: &'static str| lines.iter().filter(move |l| l["message"].as_str().is_some_and(|m| m.contains(what)));
    let accepted: Vec<&Value> = about("Delivery accepted").collect();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0]["delivery"], "logged-1");
    for message in ["Job started", "Job finished"] {
        let found: Vec<&Value> = about(message).collect();
        assert!(!found.is_empty(), "{message}");
        for line in found {
            assert_eq!(line["span"]["job"], id.as_str(), "{line}");
        }
    }
}

#[test]
fn version_prints_the_crate_version() {
    let out = std::process::Command::new(crate::harness::BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("baton {}", env!("CARGO_PKG_VERSION")));
}

/// DNS rebinding and cross-site requests: a daemon on loopback is reachable
/// from any page its user opens, so the API and dashboard answer only to
/// their own names, and nothing changes state for another site.
#[tokio::test]
async fn other_sites_can_neither_read_nor_change_anything() {
    let (_w, baton) = daemon("#!/bin/sh\necho ok\n");
    let id = deliver(&baton, "site-1").await;
    baton.finished(&id).await;
    let http = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, headers: &[(&str, &str)]| {
        let mut req = http.request(method, format!("{}{path}", baton.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    use reqwest::Method;
    // Rebinding: the browser sends the attacker's name as Host.
    for path in ["/api/jobs", "/", &format!("/jobs/{id}")] {
        assert_eq!(send(Method::GET, path, &[("host", "attacker.example")]).await, 421, "{path}");
    }
    assert_eq!(send(Method::GET, "/api/jobs", &[("host", "localhost:8787")]).await, 200);
    // Cross-site posts (a form or a no-cors fetch).
    let retry = format!("/api/jobs/{id}/retry");
    let foreign = [("origin", "http://evil.example"), ("content-type", "text/plain")];
    assert_eq!(send(Method::POST, &retry, &foreign).await, 403);
    assert_eq!(send(Method::POST, &retry, &[("sec-fetch-site", "cross-site")]).await, 403);
    assert_eq!(send(Method::POST, &retry, &[("origin", "null")]).await, 403);
    assert_eq!(baton.job(&id).await["attempts"], 1, "nothing ran again");
    // The same site, and clients that send no Origin, still can.
    let own = baton.url.clone();
    assert_eq!(send(Method::POST, &retry, &[("origin", own.as_str()), ("sec-fetch-site", "same-origin")]).await, 202);
    baton.finished(&id).await;
    assert_eq!(send(Method::POST, &retry, &[]).await, 202);
    // Webhooks are signed, not same-site: they are not affected.
    let (status, _) = baton.deliver(SECRET, "issues", "site-2", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202);
}

/// Live log streams count against `server.max_streams`; one more is told to
/// come back later, and a closed stream frees its place. A huge `limit` is
/// served a page at a time.
#[tokio::test]
async fn live_streams_are_capped_and_listings_are_paged() {
    let (w, baton) = daemon_with("#!/bin/sh\necho working\nsleep 30\n", |s| s.set("server.max_streams", 2));
    let _ = &w;
    let id = deliver(&baton, "streams-1").await;
    let http = reqwest::Client::new();
    let open = || http.get(format!("{}/api/jobs/{id}/log", baton.url)).header("accept", "text/event-stream").send();
    let first = open().await.unwrap();
    let second = open().await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let third = open().await.unwrap();
    assert_eq!(third.status().as_u16(), 503);
    assert!(third.headers().contains_key("retry-after"));
    // The plain log is not a stream: it is always served.
    let (status, _) = baton.get(&format!("/api/jobs/{id}/log")).await;
    assert_eq!(status, 200);
    drop(first);
    crate::harness::eventually_async("a freed stream slot", || async {
        open().await.map(|r| r.status().as_u16() == 200).unwrap_or(false)
    })
    .await;
    drop(second);
    let (status, page) = baton.get("/api/jobs?limit=100000").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    let (_, cancelled) = baton.post(&format!("/api/jobs/{id}/cancel")).await;
    assert!(cancelled["id"].is_string());
}

/// `storage.job_retention` prunes finished jobs and their folders in the
/// background; a job still running is never pruned.
#[tokio::test]
async fn finished_jobs_are_pruned_after_their_retention_and_running_ones_never() {
    // The slow job runs until the test lets it go.
    let w = Workdir::new();
    let gate = w.shared().join("go");
    let agent = format!(
        "#!/bin/sh\nif [ \"$(cat)\" = slow ]; then while [ ! -e {} ]; do sleep 0.1; done; fi\necho done\n",
        gate.display()
    );
    let script = w.script("agent.sh", &agent);
    Scenario::new()
        .set("storage.job_retention", "2s")
        .github(GitHub::secret(SECRET))
        .agent("script", Agent::script(&script).read_write(&[w.shared()]))
        .trigger(
            "work",
            Trigger::on(&["issues.opened"])
                .agent("script")
                .workspace("none")
                .prompt("{% if issue.number == 2 %}slow{% else %}quick{% endif %}")
                .output("none"),
        )
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let quick = deliver(&baton, "retention-1").await;
    assert_eq!(baton.finished(&quick).await["state"], "succeeded");
    let mut slow_issue = crate::harness::fixture_json("issues/opened.payload.json");
    slow_issue["issue"]["number"] = 2.into();
    let (_, answer) = baton.deliver(SECRET, "issues", "retention-2", slow_issue.to_string().as_bytes()).await;
    let slow = answer["jobs"][0].as_str().unwrap().to_string();
    let folder = w.path().join(".baton/jobs").join(&quick);
    assert!(folder.exists());
    crate::harness::eventually_async("the finished job to be pruned", || async {
        baton.get(&format!("/api/jobs/{quick}")).await.0 == 404
    })
    .await;
    // The record goes first, then the folder.
    crate::harness::eventually("its folder to go with it", || !folder.exists()).await;
    assert_eq!(baton.job(&slow).await["state"], "running", "a running job is never pruned");
    assert!(baton.log_text().contains("Pruned finished jobs past their retention."));
    std::fs::write(&gate, "").unwrap();
}
