//! baton's own MCP server at `/mcp` (streamable HTTP), driven by a raw MCP
//! client: JSON-RPC over POST, answers as JSON or Server-Sent Events.

use serde_json::{json, Value};

use crate::api_jobs::{daemon, TOKEN};
use crate::fake_github::FakeGitHub;
use crate::harness::{Baton, Workdir};

/// A minimal MCP client of one session.
struct Client {
    url: String,
    token: Option<String>,
    session: Option<String>,
    http: reqwest::Client,
    next_id: u64,
}

impl Client {
    async fn connect(baton: &Baton, token: Option<&str>) -> Client {
        let mut c = Client {
            url: format!("{}/mcp", baton.url),
            token: token.map(str::to_string),
            session: None,
            http: reqwest::Client::new(),
            next_id: 1,
        };
        let (status, init, session) = c
            .send(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "baton-test", "version": "1"}}}))
            .await;
        assert_eq!(status, 200, "{init}");
        assert_eq!(init["result"]["serverInfo"]["name"], "baton", "{init}");
        c.session = session;
        let (status, _, _) = c.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
        assert!(status == 202 || status == 200, "initialized: {status}");
        c
    }

    /// POSTs one message; returns the status, the answer to it (the last
    /// JSON-RPC message with an `id`, from JSON or SSE), and the session id.
    async fn send(&self, msg: Value) -> (u16, Value, Option<String>) {
        let (status, text, session) = self.post(msg).await;
        let answer = serde_json::from_str::<Value>(&text).ok().unwrap_or_else(|| {
            messages(&text).into_iter().rev().find(|m| m.get("id").is_some()).unwrap_or(Value::String(text.clone()))
        });
        (status, answer, session)
    }

    /// POSTs one message; returns the status, the body as sent, and the
    /// session id.
    async fn post(&self, msg: Value) -> (u16, String, Option<String>) {
        let mut req = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18")
            .json(&msg);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        let resp = req.send().await.expect("POST /mcp");
        let status = resp.status().as_u16();
        let session = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        (status, resp.text().await.unwrap_or_default(), session)
    }

    /// Calls `tool`; returns whether it was an error and its text.
    async fn call(&mut self, tool: &str, args: Value) -> (bool, String) {
        self.next_id += 1;
        let (status, answer, _) = self
            .send(json!({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call",
                         "params": {"name": tool, "arguments": args}}))
            .await;
        assert_eq!(status, 200, "{tool}: {answer}");
        let result = &answer["result"];
        let text = result["content"][0]["text"].as_str().unwrap_or_default().to_string();
        (result["isError"] == true, text)
    }
}

/// The JSON-RPC messages of an SSE body, in order.
fn messages(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .collect()
}

/// `wait_job` with a progress token: a progress notification as each job
/// ends (1 of 2, 2 of 2), on the call's own stream, before its answer.
#[tokio::test]
async fn wait_job_reports_progress_as_each_job_ends() {
    let fake = FakeGitHub::start().await;
    let (_w, baton) = daemon(&fake, true);
    let mut c = Client::connect(&baton, Some(TOKEN)).await;
    let (error, text) = c.call("delegate", json!({"agent": "script", "repo": "o/r", "prompts": ["a", "b"]})).await;
    assert!(!error, "{text}");
    let ids: Vec<Value> = serde_json::from_str::<Value>(&text).unwrap()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].clone())
        .collect();
    let (status, body, _) = c
        .post(json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
            "name": "wait_job", "arguments": {"ids": ids, "timeout": 60}, "_meta": {"progressToken": "waiting"}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let all = messages(&body);
    let progress: Vec<(f64, f64)> = all
        .iter()
        .filter(|m| m["method"] == "notifications/progress" && m["params"]["progressToken"] == "waiting")
        .map(|m| (m["params"]["progress"].as_f64().unwrap(), m["params"]["total"].as_f64().unwrap()))
        .collect();
    assert_eq!(progress, [(1.0, 2.0), (2.0, 2.0)], "{body}");
    assert_eq!(all.last().map(|m| m["id"].clone()), Some(json!(9)), "the answer comes last: {body}");
}

/// The whole cycle over `/mcp`: the tools are listed with schemas, `delegate`
/// starts a job that runs in a worktree, `wait_job` returns its result; a
/// fan-out starts one job per prompt and waits for all; a bad call is a tool
/// error with the reason.
#[tokio::test]
async fn a_raw_client_delegates_and_waits_over_mcp() {
    let fake = FakeGitHub::start().await;
    let (_w, baton) = daemon(&fake, true);
    let mut c = Client::connect(&baton, Some(TOKEN)).await;

    let (_, tools, _) = c.send(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).await;
    let listed = tools["result"]["tools"].as_array().expect("tools");
    let mut names: Vec<&str> = listed.iter().filter_map(|t| t["name"].as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["cancel_job", "delegate", "get_job", "job_log", "list_jobs", "list_triggers", "run_trigger", "wait_job"]
    );
    assert!(listed.iter().all(|t| t["inputSchema"]["type"] == "object" && t["description"].is_string()));

    let (error, text) = c.call("delegate", json!({"agent": "script", "repo": "o/r", "prompt": "count"})).await;
    assert!(!error, "{text}");
    let started: Value = serde_json::from_str(&text).unwrap();
    let id = started["jobs"][0]["id"].as_str().expect("a job id").to_string();
    assert!(started["jobs"][0]["url"].as_str().unwrap().ends_with(&format!("/jobs/{id}")), "{started}");
    let (error, text) = c.call("wait_job", json!({"id": id, "timeout": 60})).await;
    assert!(!error, "{text}");
    let waited: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(waited["ended"][0]["state"], "succeeded", "{waited}");
    assert!(waited["ended"][0]["result"].as_str().unwrap().contains("the readme of o/r"), "{waited}");

    // Fan-out: one job per prompt, all waited for.
    let (error, text) =
        c.call("delegate", json!({"agent": "script", "repo": "o/r", "prompts": ["first", "second"]})).await;
    assert!(!error, "{text}");
    let ids: Vec<String> = serde_json::from_str::<Value>(&text).unwrap()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let (_, text) = c.call("wait_job", json!({"ids": ids, "timeout": 60})).await;
    let waited: Value = serde_json::from_str(&text).unwrap();
    let results: Vec<&str> = waited["ended"].as_array().unwrap().iter().filter_map(|j| j["result"].as_str()).collect();
    assert_eq!(results.len(), 2, "{waited}");
    assert!(
        results.iter().any(|r| r.contains("prompt: first")) && results.iter().any(|r| r.contains("prompt: second"))
    );

    let (_, text) = c.call("job_log", json!({"id": id})).await;
    assert!(text.contains("the readme of o/r"), "{text}");
    let (_, text) = c.call("list_triggers", json!({})).await;
    assert!(text.contains("summarize"), "{text}");
    let (error, text) =
        c.call("run_trigger", json!({"trigger": "summarize", "repo": "o/r", "inputs": {"what": "x"}})).await;
    assert!(!error, "{text}");

    // Errors are the API's reasons, as tool errors.
    let (error, text) = c.call("get_job", json!({"id": "0000000000000000"})).await;
    assert!(error && text.contains("404"), "{text}");
    let (error, text) = c.call("delegate", json!({"agent": "nobody", "prompt": "x"})).await;
    assert!(error && text.contains("agent:"), "{text}");
    let (error, text) = c.call("wait_job", json!({})).await;
    assert!(error && text.contains("`id` or `ids`"), "{text}");
}

/// `/mcp` wants the API token, and a daemon without one does not serve it.
#[tokio::test]
async fn mcp_needs_the_api_token() {
    let fake = FakeGitHub::start().await;
    let (_w, baton) = daemon(&fake, false);
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    for token in [None, Some("wrong")] {
        let c = Client {
            url: format!("{}/mcp", baton.url),
            token: token.map(str::to_string),
            session: None,
            http: reqwest::Client::new(),
            next_id: 1,
        };
        let (status, _, _) = c.send(init.clone()).await;
        assert_eq!(status, 401, "{token:?}");
    }
    let open = Workdir::new();
    open.config("[server]\nlisten = \"127.0.0.1:0\"\n");
    let open = Baton::start(open.path(), &[]);
    let c = Client {
        url: format!("{}/mcp", open.url),
        token: None,
        session: None,
        http: reqwest::Client::new(),
        next_id: 1,
    };
    let (status, answer, _) = c.send(init).await;
    assert_eq!(status, 403, "{answer}");
}

/// `/mcp` holds at most `server.max_mcp_sessions` sessions: one more is
/// refused with 503 naming the setting while the open ones go on; closing
/// one, or leaving one unused past `server.mcp_session_idle`, makes room.
#[tokio::test]
async fn mcp_sessions_are_capped_and_unused_ones_close() {
    let w = Workdir::new();
    w.config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\napi_token = \"{TOKEN}\"\nmax_mcp_sessions = 2\nmcp_session_idle = \"3s\"\n"
    ));
    let baton = Baton::start(w.path(), &[]);
    let first = Client::connect(&baton, Some(TOKEN)).await;
    let mut second = Client::connect(&baton, Some(TOKEN)).await;
    let third = Client {
        url: format!("{}/mcp", baton.url),
        token: Some(TOKEN.into()),
        session: None,
        http: reqwest::Client::new(),
        next_id: 1,
    };
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let (status, answer, session) = third.send(init.clone()).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer["error"].as_str().unwrap_or_default().contains("server.max_mcp_sessions"), "{answer}");
    assert_eq!(session, None);
    let (error, text) = second.call("list_triggers", json!({})).await;
    assert!(!error, "an open session goes on: {text}");

    // Closed by its client: room for another.
    let closed = reqwest::Client::new()
        .delete(&first.url)
        .bearer_auth(TOKEN)
        .header("mcp-session-id", first.session.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert!(closed.status().is_success(), "{}", closed.status());
    let _fourth = Client::connect(&baton, Some(TOKEN)).await;
    let (status, _, _) = third.send(init.clone()).await;
    assert_eq!(status, 503, "full again");

    // Left unused: closed after the idle time, and its room freed.
    // (Asking to open one touches none of them.)
    let start = std::time::Instant::now();
    while third.send(init.clone()).await.0 != 200 {
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "the unused sessions never closed");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let (status, _, _) = second.post(json!({"jsonrpc": "2.0", "id": 99, "method": "ping"})).await;
    assert_eq!(status, 404, "the unused session is gone");
}
