//! The real Codex, Claude Code and Gemini CLIs, run through baton's presets
//! against a scripted fake of their model APIs on loopback. The fake asks for
//! one tool call (writing a file, or an MCP server's tool), then answers; the
//! tests check the file landed in the job's worktree (it is in the pushed
//! branch), or the tool's answer reached the model, and that the answer
//! became the job's result.
//!
//! `.ci/run` installs the CLIs from npm; where they are missing the test
//! installs them under `target/real-agents` itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use crate::fake_github::FakeGitHub;
use crate::harness::{bare_repo, eventually, fixture, git, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "real-agent-secret";
const PROOF_FILE: &str = "AGENT_PROOF.txt";

/// Which model API the fake speaks.
#[derive(Clone, Copy)]
enum Api {
    /// OpenAI Responses, as Codex calls it: `POST /v1/responses`, SSE.
    Responses,
    /// Anthropic Messages, as Claude Code calls it: `POST /v1/messages`, SSE.
    Messages,
    /// Gemini, as Gemini CLI calls it:
    /// `POST /v1beta/models/M:streamGenerateContent?alt=sse`.
    Gemini,
}

/// What the scripted model asks for before it answers.
#[derive(Clone, Copy)]
enum Script {
    /// A tool call writing `PROOF_FILE` with this text.
    WriteProof(&'static str),
    /// A call of the tool whose name ends with this (an MCP server's tool);
    /// the answer then quotes what the tool returned.
    CallTool(&'static str),
    /// baton's own MCP tools: `delegate` a task, `wait_job` on the job it
    /// started, then answer quoting what `wait_job` returned.
    Delegate,
    /// An orchestrator: two `delegate` calls to the `probe` agent in one
    /// turn, then `wait_job` on both, then answer quoting what it returned.
    Team,
}

/// A scripted model: first a tool call, then, once the tool's result comes
/// back, a final message.
struct FakeModel {
    url: String,
    /// Every request body, in order.
    requests: Arc<Mutex<Vec<Value>>>,
}

impl FakeModel {
    async fn start(api: Api, final_text: &'static str, proof: &'static str) -> FakeModel {
        FakeModel::scripted(api, final_text, Script::WriteProof(proof)).await
    }

    async fn scripted(api: Api, final_text: &'static str, script: Script) -> FakeModel {
        let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = requests.clone();
        let app = Router::new().fallback(move |uri: Uri, body: Bytes| {
            let sink = sink.clone();
            async move {
                let Ok(body) = serde_json::from_slice::<Value>(&body) else {
                    return (axum::http::StatusCode::NOT_FOUND, "").into_response();
                };
                sink.lock().unwrap().push(body.clone());
                match api {
                    Api::Responses if uri.path().ends_with("/responses") => responses(&body, final_text, script),
                    Api::Messages if uri.path().ends_with("/messages") => messages(&body, final_text, script),
                    Api::Gemini if uri.path().contains(":streamGenerateContent") => gemini(&body, final_text, script),
                    _ => (axum::http::StatusCode::NOT_FOUND, "").into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeModel { url, requests }
    }

    fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

fn sse(events: &[Value]) -> Response {
    let mut out = String::new();
    for e in events {
        out.push_str(&format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap_or("message")));
    }
    ([("content-type", "text/event-stream")], out).into_response()
}

/// The name of the tool in a request's `tools` whose name ends with `suffix`.
fn tool_named(body: &Value, suffix: &str) -> Option<String> {
    let tools = body["tools"].as_array()?;
    tools.iter().filter_map(|t| t["name"].as_str()).find(|n| n.ends_with(suffix)).map(str::to_string)
}

/// Codex lists an MCP server's tools in a namespace (`mcp__SERVER`): the
/// namespace and the name of its tool ending with `suffix`.
fn namespaced_tool(body: &Value, suffix: &str) -> Option<(String, String)> {
    body["tools"].as_array()?.iter().filter(|t| t["type"] == "namespace").find_map(|ns| {
        let name = ns["tools"].as_array()?.iter().filter_map(|t| t["name"].as_str()).find(|n| n.ends_with(suffix))?;
        Some((ns["name"].as_str()?.to_string(), name.to_string()))
    })
}

/// Codex: `exec_command` writes the file (or the MCP tool is called); the
/// next turn answers.
fn responses(body: &Value, final_text: &str, script: Script) -> Response {
    if let (Script::Team, Some((namespace, delegate)), Some((_, wait))) =
        (script, namespaced_tool(body, "delegate"), namespaced_tool(body, "wait_job"))
    {
        let call = |n: usize, name: &str, args: Value| {
            json!({"type": "function_call", "id": format!("fc_{n}"), "call_id": format!("call_{n}"),
                   "namespace": namespace, "name": name, "arguments": args.to_string(), "status": "completed"})
        };
        let outputs = tool_outputs(Api::Responses, body);
        let items = match outputs.as_slice() {
            // Two calls in one turn, which the CLI makes side by side.
            [] => vec![
                call(1, &delegate, json!({"agent": "probe", "prompt": "subtask one"})),
                call(2, &delegate, json!({"agent": "probe", "prompt": "subtask two: hand on"})),
            ],
            [a, b] => {
                let ids: Vec<String> = job_ids(a).into_iter().chain(job_ids(b)).collect();
                vec![call(3, &wait, json!({"ids": ids, "timeout": 120}))]
            }
            [.., waited] => vec![json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": format!("{final_text} {waited}"), "annotations": []}]})],
        };
        return response_sse(&items);
    }
    let output = body["input"].as_array().and_then(|items| {
        items.iter().rev().find(|i| i["type"] == "function_call_output").map(|i| i["output"].to_string())
    });
    let item = match (output, script) {
        (Some(output), _) => {
            let text = match script {
                Script::CallTool(_) => format!("{final_text} {output}"),
                Script::WriteProof(_) | Script::Delegate | Script::Team => final_text.to_string(),
            };
            json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]})
        }
        (None, Script::WriteProof(proof)) => {
            let cmd = format!("printf '%s\\n' '{proof}' > {PROOF_FILE}");
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
                   "arguments": json!({"cmd": cmd}).to_string(), "status": "completed"})
        }
        (None, Script::Delegate | Script::Team) => json!({"type": "message", "id": "msg_1", "role": "assistant",
            "status": "completed", "content": [{"type": "output_text", "text": final_text, "annotations": []}]}),
        (None, Script::CallTool(suffix)) => {
            let (namespace, name) =
                namespaced_tool(body, suffix).unwrap_or_else(|| (String::new(), format!("no tool ending in {suffix}")));
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "namespace": namespace,
                   "name": name, "arguments": "{}", "status": "completed"})
        }
    };
    response_sse(&[item])
}

/// A Responses answer of `items`.
fn response_sse(items: &[Value]) -> Response {
    let mut events = vec![json!({"type": "response.created", "response": {"id": "resp_1"}})];
    for (index, item) in items.iter().enumerate() {
        events.push(json!({"type": "response.output_item.added", "output_index": index, "item": item}));
        events.push(json!({"type": "response.output_item.done", "output_index": index, "item": item}));
    }
    events.push(json!({"type": "response.completed", "response": {"id": "resp_1", "usage": {
        "input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}}}));
    sse(&events)
}

/// Claude Code: the `Write` tool writes the file at an absolute path, read
/// from the system prompt's "Primary working directory" (or the MCP tool is
/// called); side requests without tools (the session title) get plain text.
fn messages(body: &Value, final_text: &str, script: Script) -> Response {
    let result = body["messages"].as_array().and_then(|m| m.last()).and_then(|last| {
        last["content"].as_array()?.iter().find(|b| b["type"] == "tool_result").map(|b| b["content"].to_string())
    });
    let cwd = body.to_string().split("Primary working directory: ").nth(1).and_then(|rest| {
        // The system prompt is JSON-escaped here: the line ends at `\n`.
        rest.split("\\n").next().map(str::to_string)
    });
    let text =
        |text: String| (json!({"type": "text", "text": ""}), json!({"type": "text_delta", "text": text}), "end_turn");
    // Each call its own id: the CLI pairs results with calls by it.
    let call_id = format!("toolu_{}", tool_results(body).len() + 1);
    let call = |name: String, input: Value| {
        let partial = json!({"type": "input_json_delta", "partial_json": input.to_string()});
        (json!({"type": "tool_use", "id": call_id, "name": name, "input": {}}), partial, "tool_use")
    };
    if let (Script::Team, Some(delegate), Some(wait)) =
        (script, tool_named(body, "__delegate"), tool_named(body, "__wait_job"))
    {
        let results = tool_results(body);
        let call = |id: usize, name: &str, input: Value| {
            let partial = json!({"type": "input_json_delta", "partial_json": input.to_string()});
            (json!({"type": "tool_use", "id": format!("toolu_{id}"), "name": name, "input": {}}), partial)
        };
        return match results.as_slice() {
            // Two calls in one turn, which the CLI makes side by side.
            [] => blocks_sse(
                body,
                vec![
                    call(1, &delegate, json!({"agent": "probe", "prompt": "subtask one"})),
                    call(2, &delegate, json!({"agent": "probe", "prompt": "subtask two: hand on"})),
                ],
                "tool_use",
            ),
            [a, b] => {
                let id = |r: &String| {
                    serde_json::from_str::<Value>(r).ok().and_then(|v| v["jobs"][0]["id"].as_str().map(str::to_string))
                };
                let ids: Vec<String> = [a, b].into_iter().filter_map(id).collect();
                blocks_sse(body, vec![call(3, &wait, json!({"ids": ids, "timeout": 120}))], "tool_use")
            }
            [.., waited] => {
                let text = json!({"type": "text_delta", "text": format!("{final_text} {waited}")});
                blocks_sse(body, vec![(json!({"type": "text", "text": ""}), text)], "end_turn")
            }
        };
    }
    if let (Script::Delegate, Some(delegate), Some(wait)) =
        (script, tool_named(body, "__delegate"), tool_named(body, "__wait_job"))
    {
        let results = tool_results(body);
        let (block, delta, stop) = match results.as_slice() {
            [] => call(delegate, json!({"agent": "script", "repo": "o/r", "prompt": "Count the files."})),
            [started] => {
                let id = serde_json::from_str::<Value>(started)
                    .ok()
                    .and_then(|v| v["jobs"][0]["id"].as_str().map(str::to_string));
                call(wait, json!({"id": id.unwrap_or_default(), "timeout": 60}))
            }
            [.., waited] => text(format!("{final_text} {waited}")),
        };
        return message_sse(body, block, delta, stop);
    }
    let (block, delta, stop) = match (script, result) {
        (Script::CallTool(_), Some(output)) => text(format!("{final_text} {output}")),
        (_, Some(_)) => text(final_text.to_string()),
        (Script::WriteProof(proof), None) => match cwd {
            Some(cwd) if tool_named(body, "Write").is_some() => (
                json!({"type": "tool_use", "id": "toolu_1", "name": "Write", "input": {}}),
                json!({"type": "input_json_delta", "partial_json":
                    json!({"file_path": format!("{cwd}/{PROOF_FILE}"), "content": format!("{proof}\n")}).to_string()}),
                "tool_use",
            ),
            _ => text(final_text.to_string()),
        },
        (Script::CallTool(suffix), None) => match tool_named(body, suffix) {
            Some(name) => call(name, json!({})),
            None => text(final_text.to_string()),
        },
        (Script::Delegate | Script::Team, None) => text(final_text.to_string()),
    };
    message_sse(body, block, delta, stop)
}

/// The text of every tool result in a Messages request, in order.
fn tool_results(body: &Value) -> Vec<String> {
    let messages = body["messages"].as_array().into_iter().flatten();
    let blocks = messages.flat_map(|m| m["content"].as_array().cloned().unwrap_or_default());
    blocks
        .filter(|b| b["type"] == "tool_result")
        .map(|b| match &b["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""),
            other => other.to_string(),
        })
        .collect()
}

/// One streamed Messages answer of one content block.
fn message_sse(body: &Value, block: Value, delta: Value, stop: &str) -> Response {
    blocks_sse(body, vec![(block, delta)], stop)
}

/// A Messages answer of several content blocks (each a start and one delta).
fn blocks_sse(body: &Value, blocks: Vec<(Value, Value)>, stop: &str) -> Response {
    let mut events = vec![json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
        "role": "assistant", "model": body["model"], "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 1}}})];
    for (index, (block, delta)) in blocks.into_iter().enumerate() {
        events.push(json!({"type": "content_block_start", "index": index, "content_block": block}));
        events.push(json!({"type": "content_block_delta", "index": index, "delta": delta}));
        events.push(json!({"type": "content_block_stop", "index": index}));
    }
    events.push(json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
        "usage": {"output_tokens": 5}}));
    events.push(json!({"type": "message_stop"}));
    sse(&events)
}

/// Gemini CLI: `write_file` writes the file (relative to the worktree), or
/// the MCP tool is called; once a `functionResponse` comes back, it answers.
fn gemini(body: &Value, final_text: &str, script: Script) -> Response {
    let parts = |c: &Value| c["parts"].as_array().cloned().unwrap_or_default();
    let contents = body["contents"].as_array().cloned().unwrap_or_default();
    let response = contents.iter().flat_map(parts).find_map(|p| p.get("functionResponse").map(|r| r.to_string()));
    let tools: Vec<String> = body["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["functionDeclarations"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f["name"].as_str().map(str::to_string))
        .collect();
    let responses: Vec<String> = tool_outputs(Api::Gemini, body);
    let named = |suffix: &str| tools.iter().find(|t| t.ends_with(suffix)).cloned();
    if let (Script::Team, Some(delegate), Some(wait)) = (script, named("delegate"), named("wait_job")) {
        let parts = match responses.as_slice() {
            // Two calls in one turn, which the CLI makes side by side.
            [] => vec![
                json!({"functionCall": {"name": delegate, "args": {"agent": "probe", "prompt": "subtask one"}}}),
                json!({"functionCall": {"name": delegate,
                    "args": {"agent": "probe", "prompt": "subtask two: hand on"}}}),
            ],
            [a, b] => {
                let ids: Vec<String> = job_ids(a).into_iter().chain(job_ids(b)).collect();
                vec![json!({"functionCall": {"name": wait, "args": {"ids": ids, "timeout": 120}}})]
            }
            [.., waited] => vec![json!({"text": format!("{final_text} {waited}")})],
        };
        return gemini_sse(parts);
    }
    let part = match (response, script) {
        (Some(r), Script::CallTool(_)) => json!({"text": format!("{final_text} {r}")}),
        (Some(_), Script::WriteProof(_) | Script::Delegate | Script::Team) => json!({"text": final_text}),
        (None, Script::WriteProof(proof)) if tools.iter().any(|t| t == "write_file") => {
            json!({"functionCall": {"name": "write_file",
                "args": {"file_path": PROOF_FILE, "content": format!("{proof}\n")}}})
        }
        (None, Script::CallTool(suffix)) => match tools.iter().find(|t| t.ends_with(suffix)) {
            Some(name) => json!({"functionCall": {"name": name, "args": {}}}),
            None => json!({"text": format!("no tool ending in {suffix}")}),
        },
        (None, _) => json!({"text": final_text}),
    };
    gemini_sse(vec![part])
}

/// A `streamGenerateContent` answer of `parts`, in one chunk.
fn gemini_sse(parts: Vec<Value>) -> Response {
    let chunk = json!({
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
        "modelVersion": "baton-fake",
    });
    ([("content-type", "text/event-stream")], format!("data: {chunk}\r\n\r\n")).into_response()
}

/// The folder holding `program`: on PATH, or installed from npm into
/// `target/real-agents/<program>` on first use.
fn cli_dir(program: &str, package: &str) -> PathBuf {
    if let Some(dir) =
        std::env::var_os("PATH").iter().flat_map(std::env::split_paths).find(|d| d.join(program).is_file())
    {
        return dir;
    }
    let prefix = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/real-agents").join(program);
    let bin = prefix.join("bin");
    if !bin.join(program).is_file() {
        let out = Command::new("npm")
            .args(["install", "--global", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg(package)
            .output()
            .unwrap_or_else(|e| panic!("`{program}` is not on PATH and npm cannot run to install {package}: {e}"));
        assert!(out.status.success(), "npm install {package}: {}", String::from_utf8_lossy(&out.stderr));
    }
    bin
}

/// A daemon whose agent `preset` (tuned by `agent_keys`, TOML that starts
/// in the agent's table) talks to a fake model, with the one trigger
/// `trigger`, publishing to `fake`.
///
/// The agent runs in baton's sandbox: its fake model API is reached through
/// the egress proxy (allowed by `base_url`), and a CLI installed outside the
/// system folders is shown read-only.
fn daemon(
    fake: &FakeGitHub,
    preset: &str,
    agent_keys: &str,
    env: &[(&str, &str)],
    cli: &Path,
    trigger: Trigger,
) -> (Workdir, Baton) {
    let w = Workdir::new();
    let repos = w.path().join("remote");
    let head = bare_repo(&repos, "Codertocat/Hello-World", "master", &[("README.md", "hello from master")]);
    // Pull request #2's head, as GitHub keeps it.
    git(&repos.join("Codertocat/Hello-World.git"), &["update-ref", "refs/pull/2/head", &head]);
    let mut agent = Agent::preset().set("timeout", "2m");
    if let Some(prefix) = cli.parent().filter(|_| !cli.starts_with("/usr")) {
        agent = agent.set("read_only", vec![prefix.display().to_string()]);
    }
    Scenario::new()
        .github(GitHub::secret(SECRET).api(fake).repos(&repos).token("env:GITHUB_TOKEN"))
        // What the fake model costs, for CLIs that report tokens but no cost.
        .set("prices.baton-fake.input_per_mtok", 2.0)
        .set("prices.baton-fake.output_per_mtok", 10.0)
        .agent(preset, agent)
        .raw(&format!("[agents.{preset}]\n{agent_keys}"))
        .trigger("work", trigger)
        .write(&w);
    let home = w.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let path = format!("{}:{}", cli.display(), std::env::var("PATH").unwrap_or_default());
    let mut all_env = vec![("GITHUB_TOKEN", "ghs_realagenttoken"), ("PATH", path.as_str())];
    let home = home.display().to_string();
    all_env.push(("HOME", home.as_str()));
    all_env.extend_from_slice(env);
    let baton = Baton::start(w.path(), &all_env);
    (w, baton)
}

/// Delivers `body` as `event` and waits for its one job to succeed.
async fn job_of(baton: &Baton, event: &str, body: &[u8]) -> Value {
    let (status, answer) = baton.deliver(SECRET, event, "real-agent-1", body).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["jobs"][0].as_str().expect("a job").to_string();
    let job = baton.finished(&id).await;
    let log = baton.get(&format!("/api/jobs/{id}/log")).await;
    assert_eq!(job["state"], "succeeded", "{job}\njob log: {log:?}\ndaemon log:\n{}", baton.log_text());
    job
}

/// Runs one job through `preset` with a `pull_request` output, so the
/// worktree's changes come back as a branch.
async fn run_job(
    preset: &str,
    agent_keys: &str,
    env: &[(&str, &str)],
    cli: &Path,
) -> (Workdir, Value, Baton, FakeGitHub) {
    let fake = FakeGitHub::start().await;
    let trigger = Trigger::on(&["issues.opened"])
        .agent(preset)
        .workspace("default-branch")
        .prompt("Fix #{{ issue.number }}: {{ issue.title }}")
        .output("pull_request");
    let (w, baton) = daemon(&fake, preset, agent_keys, env, cli, trigger);
    let job = job_of(&baton, "issues", &fixture("issues/opened.payload.json")).await;
    eventually("the pull request", || !fake.posts("/repos/Codertocat/Hello-World/pulls").is_empty()).await;
    (w, job, baton, fake)
}

/// The job's model use is what the fake model reported on each of its
/// answers (10 tokens in, 5 out), added up; it is in the job, in the status
/// comment's footer and in `/metrics`.
async fn check_usage(job: &Value, answers: usize, baton: &Baton, fake: &FakeGitHub, agent: &str) {
    let usage = &job["usage"];
    assert_eq!(usage["input_tokens"].as_u64(), Some(10 * answers as u64), "{usage}");
    assert_eq!(usage["output_tokens"].as_u64(), Some(5 * answers as u64), "{usage}");
    assert_eq!(job["history"][0]["usage"], *usage, "one attempt: its usage is the total");
    let footer = format!("{} tokens in, {} out, $", 10 * answers, 5 * answers);
    eventually("the status comment's footer", || {
        fake.comments("Codertocat/Hello-World#1").iter().any(|c| c.body.contains(&footer))
    })
    .await;
    let (_, metrics) = baton.get("/metrics").await;
    let line =
        format!("baton_agent_tokens_total{{trigger=\"work\",agent=\"{agent}\",kind=\"input\"}} {}", 10 * answers);
    assert!(metrics.as_str().unwrap_or_default().contains(&line), "{metrics}");
    assert!(metrics
        .as_str()
        .unwrap_or_default()
        .contains(&format!("baton_agent_cost_usd_total{{trigger=\"work\",agent=\"{agent}\"}}")));
}

/// The file the agent's tool call wrote, as committed on the job's branch.
fn proof_on_branch(w: &Workdir, job: &Value) -> String {
    let branch = job["branch"].as_str().expect("the agent's change was pushed");
    let bare = w.path().join("remote/Codertocat/Hello-World.git");
    git(&bare, &["show", &format!("{branch}:{PROOF_FILE}")])
}

fn prompt_reached(requests: &[Value]) -> bool {
    requests.iter().any(|r| r.to_string().contains("Fix #1: Spelling error in the README file"))
}

#[tokio::test]
async fn codex_preset_edits_the_worktree_and_its_last_message_is_the_result() {
    let cli = cli_dir("codex", "@openai/codex@0.169.0");
    let model = FakeModel::start(Api::Responses, "Codex wrote the proof file.", "edited by codex").await;
    let keys = format!("model = \"baton-fake\"\nbase_url = \"{}/v1\"", model.url);
    let (w, job, baton, fake) = run_job("codex", &keys, &[("OPENAI_API_KEY", "sk-fake-codex-key")], &cli).await;
    assert_eq!(job["result"], "Codex wrote the proof file.");
    let answers = model.requests().iter().filter(|r| r.get("input").is_some()).count();
    check_usage(&job, answers, &baton, &fake, "codex").await;
    // Codex reports no cost: the price table's, 2 $/M in and 10 $/M out.
    let cost = job["usage"]["cost_usd"].as_f64().expect("priced");
    assert!((cost - (answers as f64) * (10.0 * 2.0 + 5.0 * 10.0) / 1e6).abs() < 1e-12, "{cost}");
    assert_eq!(proof_on_branch(&w, &job), "edited by codex");
    let requests = model.requests();
    assert!(requests.len() >= 2, "a tool call and an answer: {}", requests.len());
    assert!(prompt_reached(&requests), "baton's prompt reached the model");
    assert!(
        requests.iter().any(|r| r["input"].to_string().contains("function_call_output")),
        "the tool's output came back to the model"
    );
}

/// Gemini CLI 0.61 for real: `write_file` lands in the worktree, the JSON
/// answer's `response` is the result, and its `stats` are the ledger. The
/// preset trusts the worktree (else a headless run refuses edits) and, with
/// `base_url`, names the API key's auth type in the sandbox's settings
/// (else 0.61 refuses the `gateway` type it picks itself).
#[tokio::test]
async fn gemini_preset_edits_the_worktree_and_its_answer_is_the_result() {
    let cli = cli_dir("gemini", "@google/gemini-cli@0.61.0");
    let model =
        FakeModel::scripted(Api::Gemini, "Gemini wrote the proof file.", Script::WriteProof("edited by gemini")).await;
    // An explicit model: `auto` would first ask a router model to classify
    // the prompt.
    let keys = format!("model = \"baton-fake\"\nbase_url = \"{}\"", model.url);
    let (w, job, baton, fake) = run_job("gemini", &keys, &[("GEMINI_API_KEY", "fake-gemini-key")], &cli).await;
    assert_eq!(job["result"], "Gemini wrote the proof file.");
    let answers = model.requests().len();
    assert!(answers >= 2, "a tool call and an answer: {answers}");
    check_usage(&job, answers, &baton, &fake, "gemini").await;
    assert_eq!(job["usage"]["model"], "baton-fake");
    assert_eq!(proof_on_branch(&w, &job), "edited by gemini");
    assert!(prompt_reached(&model.requests()), "baton's prompt reached the model");
}

#[tokio::test]
async fn claude_preset_edits_the_worktree_and_its_answer_is_the_result() {
    let cli = cli_dir("claude", "@anthropic-ai/claude-code@2.1.197");
    let model = FakeModel::start(Api::Messages, "Claude wrote the proof file.", "edited by claude").await;
    let keys = format!("model = \"claude-fake\"\nmax_turns = 5\nbase_url = \"{}\"", model.url);
    let env = [("ANTHROPIC_API_KEY", "sk-ant-fake-key"), ("CLAUDE_CODE_MAX_RETRIES", "0")];
    let (w, job, baton, fake) = run_job("claude", &keys, &env, &cli).await;
    assert_eq!(job["result"], "Claude wrote the proof file.");
    let answers = model.requests().iter().filter(|r| r.get("messages").is_some()).count();
    check_usage(&job, answers, &baton, &fake, "claude").await;
    // Claude Code prices its own use: its figure is kept.
    assert!(job["usage"]["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{job}");
    assert_eq!(job["usage"]["model"], "claude-fake");
    assert_eq!(proof_on_branch(&w, &job), "edited by claude");
    let requests = model.requests();
    assert!(prompt_reached(&requests), "baton's prompt reached the model");
    assert!(requests.iter().any(|r| r["model"] == "claude-fake"), "`model` reached the CLI");
    assert!(requests.iter().any(|r| r["messages"].to_string().contains("tool_result")), "the tool ran");
}

/// The real Claude Code CLI reviews a pull request: the scripted model
/// answers in the review JSON baton asked for, and its findings land as
/// inline comments (a suggestion as a suggestion block) in one review.
#[tokio::test]
async fn claude_reviews_a_pull_request_line_by_line() {
    let cli = cli_dir("claude", "@anthropic-ai/claude-code@2.1.197");
    let answer = json!({
        "summary": "One bug.",
        "event": "REQUEST_CHANGES",
        "comments": [{ "path": "src/lib.rs", "line": 3, "body": "Called twice.", "suggestion": "    new();" }]
    })
    .to_string();
    let model = FakeModel::start(Api::Messages, Box::leak(answer.into_boxed_str()), "review notes").await;
    let keys = format!("model = \"claude-fake\"\nmax_turns = 5\nbase_url = \"{}\"", model.url);
    let env = [("ANTHROPIC_API_KEY", "sk-ant-fake-key"), ("CLAUDE_CODE_MAX_RETRIES", "0")];
    let fake = FakeGitHub::start().await;
    let patch = "@@ -1,3 +1,4 @@\n fn a() {\n-    old();\n+    new();\n+    more();\n }";
    fake.set_pr_files("Codertocat/Hello-World#2", vec![json!({ "filename": "src/lib.rs", "patch": patch })]);
    let trigger = Trigger::on(&["pull_request.opened"])
        .agent("claude")
        .workspace("pr-head")
        .prompt("Review pull request #{{ pull_request.number }}.")
        .output("review");
    let (w, baton) = daemon(&fake, "claude", &keys, &env, &cli, trigger);
    let head = git(&w.path().join("remote/Codertocat/Hello-World.git"), &["rev-parse", "master"]);
    let mut pr = crate::harness::fixture_json("pull_request/opened.payload.json");
    pr["pull_request"]["head"]["sha"] = json!(head);
    let job = job_of(&baton, "pull_request", &serde_json::to_vec(&pr).unwrap()).await;
    assert!(job["result"].as_str().unwrap().contains("\"REQUEST_CHANGES\""), "{job}");
    let requests = model.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.to_string().contains("Review pull request #2.") && r.to_string().contains("Answer format")),
        "the prompt, with the answer format, reached the model"
    );
    eventually("the review", || !fake.review_posts().is_empty()).await;
    let review = &fake.review_posts()[0];
    assert_eq!(review["event"], "REQUEST_CHANGES", "{review}");
    assert!(review["body"].as_str().unwrap().starts_with("One bug."), "{review}");
    let comments = review["comments"].as_array().expect("inline comments");
    assert_eq!((comments[0]["path"].as_str(), comments[0]["line"].as_u64()), (Some("src/lib.rs"), Some(3)));
    assert_eq!(comments[0]["body"], "Called twice.\n\n```suggestion\n    new();\n```");
}

/// The real Claude Code against the scripted model, on a trigger whose
/// `[job]` has `key` = `value` and whose result is a comment.
async fn claude_with_job_key(key: &str, value: f64) -> (FakeModel, Workdir, Baton) {
    let cli = cli_dir("claude", "@anthropic-ai/claude-code@2.1.197");
    let model = FakeModel::start(Api::Messages, "Claude wrote the proof file.", "edited by claude").await;
    let keys = format!("model = \"claude-fake\"\nmax_turns = 5\nbase_url = \"{}\"", model.url);
    let env = [("ANTHROPIC_API_KEY", "sk-ant-fake-key"), ("CLAUDE_CODE_MAX_RETRIES", "0")];
    let fake = FakeGitHub::start().await;
    let trigger = Trigger::on(&["issues.opened"])
        .agent("claude")
        .workspace("default-branch")
        .prompt("Fix it.")
        .job(key, value)
        .output("comment");
    let (w, baton) = daemon(&fake, "claude", &keys, &env, &cli, trigger);
    (model, w, baton)
}

/// `[job] budget_usd` with the real Claude Code: baton passes it as the
/// CLI's own `--max-budget-usd`, the CLI stops past it (the scripted model's
/// first answer costs more), and the job fails saying so.
#[tokio::test]
async fn claude_stops_at_the_jobs_budget() {
    let (model, _w, baton) = claude_with_job_key("budget_usd", 0.0001).await;
    let (status, answer) = baton.deliver(SECRET, "issues", "budget-1", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    let job = baton.finished(answer["jobs"][0].as_str().unwrap()).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"], "budget of $0.0001 reached after $0.000175", "{job}");
    assert_eq!(job["history"][0]["outcome"], "budget");
    // What the one answer cost, as the CLI counted it.
    assert_eq!((job["usage"]["input_tokens"].as_u64(), job["usage"]["output_tokens"].as_u64()), (Some(10), Some(5)));
    let argv = model.requests().len();
    assert_eq!(argv, 1, "the CLI stopped after the answer that passed the budget");
}

/// `[job] daily_budget_usd`: the real Claude Code's first job spends what
/// the scripted model's answers cost; that passes the trigger's budget for
/// the day, so the next match is skipped with the reason, in the 202 and
/// on its delivery.
#[tokio::test]
async fn a_spent_daily_budget_skips_the_next_job() {
    let (_model, _w, baton) = claude_with_job_key("daily_budget_usd", 0.0003).await;
    let first = job_of(&baton, "issues", &fixture("issues/opened.payload.json")).await;
    let cost = first["usage"]["cost_usd"].as_f64().expect("the CLI's cost");
    assert!(cost > 0.0003, "the first job spends past the budget: {cost}");

    let (status, answer) =
        baton.deliver(SECRET, "issues", "real-agent-2", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"], serde_json::json!([]), "{answer}");
    let reason = answer["skipped"][0]["reason"].as_str().unwrap_or_default();
    assert_eq!(
        reason,
        format!("daily budget: trigger work's (job.daily_budget_usd) $0.0003 is spent (${cost} in the last 24 h)")
    );
    let (_, listed) = baton.get("/api/jobs?delivery=real-agent-2").await;
    assert_eq!(listed["skipped"][0]["reason"], reason, "{listed}");
}

/// A stdio MCP server written for the test (newline-delimited JSON-RPC):
/// one tool, `get_token`, whose answer proves the server was given its
/// secret, as a digest, never the secret itself.
const MCP_PROBE: &str = r#"
import hashlib, json, os, sys
token = "mcp-proof-" + hashlib.sha256(os.environ.get("PROBE_TOKEN", "").encode()).hexdigest()[:16]
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    method, result = msg.get("method"), None
    if method == "initialize":
        result = {"protocolVersion": msg["params"].get("protocolVersion", "2025-06-18"),
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "probe", "version": "1.0.0"}}
    elif method == "tools/list":
        result = {"tools": [{"name": "get_token", "description": "Returns the probe's token.",
                             "inputSchema": {"type": "object", "properties": {}}}]}
    elif method == "tools/call":
        result = {"content": [{"type": "text", "text": token}], "isError": False}
    elif method == "ping":
        result = {}
    if result is None:
        reply = {"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "no such method"}}
    else:
        reply = {"jsonrpc": "2.0", "id": msg["id"], "result": result}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
"#;

const MCP_SECRET: &str = "mcp-probe-secret-5f1e9a";

/// What the probe answers when it was given `MCP_SECRET`.
fn mcp_proof() -> String {
    use sha2::Digest as _;
    format!("mcp-proof-{}", &hex::encode(sha2::Sha256::digest(MCP_SECRET.as_bytes()))[..16])
}

/// Every file under `dir` (the daemon's storage, config and worktrees)
/// that holds `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t)
                    if t.is_file()
                        && std::fs::read(&path)
                            .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes())) =>
                {
                    out.push(path)
                }
                _ => {}
            }
        }
    }
    out
}

/// `[job] mcp = ["probe"]` through a real CLI: the scripted model calls the
/// probe's tool, the probe (started by the CLI in the sandbox, with its
/// secret from baton's `env:`) answers, and the answer reaches the job's
/// result. The secret is in no file baton or the agent wrote, and not in
/// the job's log or result.
async fn mcp_tool_reaches_the_result(preset: &str, api: Api, cli: &Path, agent_keys: &str, env: &[(&str, &str)]) {
    let probe_dir = tempfile::tempdir().unwrap();
    let script = probe_dir.path().join("probe.py");
    std::fs::write(&script, MCP_PROBE).unwrap();
    let model = FakeModel::scripted(api, "The tool said:", Script::CallTool("get_token")).await;
    let keys = format!(
        "{agent_keys}\nbase_url = \"{url}{path}\"\n\n[mcp.probe]\ncommand = [\"/usr/bin/python3\", \"{script}\"]\n\
         env = {{ PROBE_TOKEN = \"env:MCP_PROBE_SECRET\" }}\n",
        url = model.url,
        path = if matches!(api, Api::Responses) { "/v1" } else { "" },
        script = script.display(),
    );
    let mut env = env.to_vec();
    env.push(("MCP_PROBE_SECRET", MCP_SECRET));
    let fake = FakeGitHub::start().await;
    let trigger = Trigger::on(&["issues.opened"])
        .agent(preset)
        .workspace("default-branch")
        .job("mcp", vec!["probe"])
        .prompt("Ask the probe for its token.")
        .output("comment");
    let (w, baton) = daemon(&fake, preset, &keys, &env, cli, trigger);
    let job = job_of(&baton, "issues", &fixture("issues/opened.payload.json")).await;
    let result = job["result"].as_str().unwrap_or_default();
    let requests = model.requests();
    assert!(
        result.starts_with("The tool said:") && result.contains(&mcp_proof()),
        "the probe's answer is the result: {result}\nrequests: {requests:?}"
    );
    let (_, log) = baton.get(&format!("/api/jobs/{}/log", job["id"].as_str().unwrap())).await;
    assert!(!log.to_string().contains(MCP_SECRET) && !result.contains(MCP_SECRET));
    assert_eq!(files_holding(w.path(), MCP_SECRET), Vec::<PathBuf>::new(), "the secret is in no file");
}

#[tokio::test]
async fn claude_calls_a_jobs_mcp_server() {
    let cli = cli_dir("claude", "@anthropic-ai/claude-code@2.1.197");
    let env = [("ANTHROPIC_API_KEY", "sk-ant-fake-key"), ("CLAUDE_CODE_MAX_RETRIES", "0")];
    mcp_tool_reaches_the_result("claude", Api::Messages, &cli, "model = \"claude-fake\"\nmax_turns = 5", &env).await;
}

#[tokio::test]
async fn codex_calls_a_jobs_mcp_server() {
    let cli = cli_dir("codex", "@openai/codex@0.169.0");
    let env = [("OPENAI_API_KEY", "sk-fake-codex-key")];
    mcp_tool_reaches_the_result("codex", Api::Responses, &cli, "model = \"baton-fake\"", &env).await;
}

#[tokio::test]
async fn gemini_calls_a_jobs_mcp_server() {
    let cli = cli_dir("gemini", "@google/gemini-cli@0.61.0");
    let env = [("GEMINI_API_KEY", "fake-gemini-key")];
    mcp_tool_reaches_the_result("gemini", Api::Gemini, &cli, "model = \"baton-fake\"", &env).await;
}

/// The real Claude Code CLI as an interactive session's stand-in, with
/// `baton mcp` as its MCP server (`--mcp-config`): driven by the scripted
/// model it calls `delegate`, then `wait_job`, and answers. The delegated
/// job really runs, in a worktree of the repository through a second agent
/// (a script that prints the README), and its result is in the session's
/// final answer.
#[tokio::test]
async fn claude_delegates_to_baton_through_baton_mcp() {
    let cli = cli_dir("claude", "@anthropic-ai/claude-code@2.1.197");
    let model = FakeModel::scripted(Api::Messages, "baton says:", Script::Delegate).await;
    let fake = FakeGitHub::start().await;
    let (_w, baton) = crate::api_jobs::daemon(&fake, true);
    let dir = tempfile::tempdir().unwrap();
    let config = json!({"mcpServers": {"baton": {"type": "stdio", "command": env!("CARGO_BIN_EXE_baton"),
        "args": ["mcp", "--url", baton.url], "env": {"BATON_API_TOKEN": crate::api_jobs::TOKEN}}}});
    let config_file = dir.path().join("mcp.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let path = format!("{}:{}", cli.display(), std::env::var("PATH").unwrap_or_default());
    let (url, cwd) = (model.url.clone(), dir.path().to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = Command::new(cli.join("claude"))
            .args(["-p", "--output-format", "json", "--model", "claude-fake", "--max-turns", "6"])
            .arg("--mcp-config")
            .arg(&config_file)
            .args(["--strict-mcp-config", "--allowedTools", "mcp__baton"])
            .env_clear()
            .env("PATH", path)
            .env("HOME", &home)
            .env("ANTHROPIC_BASE_URL", url)
            .env("ANTHROPIC_API_KEY", "sk-ant-fake-key")
            .env("CLAUDE_CODE_MAX_RETRIES", "0")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .current_dir(cwd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("claude");
        child.stdin.take().unwrap().write_all(b"Have baton count the files of o/r.").unwrap();
        child.wait_with_output().expect("claude ran")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answer: Value = serde_json::from_str(&stdout).unwrap_or_else(|_| json!({}));
    let result = answer["result"].as_str().unwrap_or_default();
    assert!(
        result.starts_with("baton says:") && result.contains("the readme of o/r") && result.contains("succeeded"),
        "the delegated job's result is in the answer: {stdout}\n{}\nrequests: {:?}",
        String::from_utf8_lossy(&out.stderr),
        model.requests()
    );
    let (_, jobs) = baton.get("/api/jobs").await;
    let jobs = jobs["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 1, "one delegated job: {jobs:?}");
    assert_eq!((jobs[0]["trigger"].as_str(), jobs[0]["state"].as_str()), (Some("api"), Some("succeeded")));
}

/// Agent teams with a real CLI as the orchestrator: baton gives it its own
/// `/mcp` (reached through the sandbox's proxy, with the job's token, and
/// for Claude Code `mcp__baton` allowed). Driven by the scripted model, it
/// delegates two subtasks to the `probe` agent in one turn (two parallel
/// tool calls), waits for both, and its final answer, posted as the job's
/// result, holds both children's results. The child told to hand its work
/// on is refused at `limits.max_chain_depth`.
async fn a_team_orchestrated_by(preset: &str, api: Api, cli: &Path, agent_keys: &str, env: &[(&str, &str)]) {
    let model = FakeModel::scripted(api, "The team reports:", Script::Team).await;
    let team = tempfile::tempdir().unwrap();
    let py = team.path().join("team.py");
    std::fs::write(&py, include_str!("teams/team.py")).unwrap();
    std::fs::set_permissions(&py, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let keys = format!(
        "{agent_keys}\nbase_url = \"{url}{path}\"\n\n\
         [agents.probe]\ncommand = [\"{py}\", \"probe\"]\n\n[limits]\nmax_chain_depth = 1\nmax_parallel_per_repo = 3\n",
        url = model.url,
        path = if matches!(api, Api::Responses) { "/v1" } else { "" },
        py = py.display(),
    );
    let fake = FakeGitHub::start().await;
    let trigger = Trigger::on(&["issues.opened"])
        .agent(preset)
        .workspace("default-branch")
        .job("delegate", vec!["probe"])
        .prompt("Split the work between two probes.")
        .output("comment");
    let (_w, baton) = daemon(&fake, preset, &keys, env, cli, trigger);
    let job = job_of(&baton, "issues", &fixture("issues/opened.payload.json")).await;
    let id = job["id"].as_str().unwrap();
    let result = job["result"].as_str().unwrap_or_default();
    let requests = model.requests();

    // Both calls were in one turn: the next request answers both at once.
    let (_, log) = baton.get(&format!("/api/jobs/{id}/log")).await;
    assert!(
        requests.iter().any(|r| tool_outputs(api, r).len() == 2),
        "two delegate calls in one turn: {log}\n{}",
        baton.log_text()
    );
    let (_, page) = baton.get(&format!("/api/jobs?parent={id}")).await;
    let kids = page["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(kids.len(), 2, "{page}");
    assert!(result.starts_with("The team reports:"), "{result}\nrequests: {requests:?}");
    for kid in &kids {
        assert_eq!((kid["state"].as_str(), kid["parent"].as_str()), (Some("succeeded"), Some(id)), "{kid}");
        let said = kid["result"].as_str().unwrap_or_default();
        let line = said.lines().next().unwrap_or("?");
        assert!(result.contains(line), "the answer holds the child's result `{line}`: {result}");
    }
    assert!(result.contains("probe did <subtask one>") && result.contains("probe did <subtask two: hand on>"));
    assert!(result.contains("deeper: refused") && result.contains("max_chain_depth = 1"), "{result}");
    eventually("the result on the issue", || {
        fake.comments("Codertocat/Hello-World#1").iter().any(|c| c.body.contains("probe did <subtask one>"))
    })
    .await;
}

/// The tool results a request carries, in order: Claude Code's
/// `tool_result` blocks, Codex's `function_call_output` items, Gemini CLI's
/// `functionResponse` parts.
fn tool_outputs(api: Api, body: &Value) -> Vec<String> {
    match api {
        Api::Messages => tool_results(body),
        Api::Gemini => body["contents"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["parts"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.get("functionResponse").map(|r| r.to_string()))
            .collect(),
        _ => body["input"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["type"] == "function_call_output")
            .map(|i| match &i["output"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
    }
}

/// The job ids a tool's answer names (`"id": "…"`), however it was quoted.
fn job_ids(text: &str) -> Vec<String> {
    let plain = text.replace('\\', "");
    plain
        .split("\"id\":")
        .skip(1)
        .filter_map(|rest| {
            let id: String =
                rest.trim_start().trim_start_matches('"').chars().take_while(char::is_ascii_hexdigit).collect();
            (id.len() == 16).then_some(id)
        })
        .collect()
}

#[tokio::test]
async fn claude_orchestrates_a_team_of_probe_agents() {
    let cli = cli_dir("claude", "@anthropic-ai/claude-code@2.1.197");
    let env = [("ANTHROPIC_API_KEY", "sk-ant-fake-key"), ("CLAUDE_CODE_MAX_RETRIES", "0")];
    a_team_orchestrated_by("claude", Api::Messages, &cli, "model = \"claude-fake\"\nmax_turns = 6", &env).await;
}

#[tokio::test]
async fn gemini_orchestrates_a_team_of_probe_agents() {
    let cli = cli_dir("gemini", "@google/gemini-cli@0.61.0");
    let env = [("GEMINI_API_KEY", "fake-gemini-key")];
    a_team_orchestrated_by("gemini", Api::Gemini, &cli, "model = \"baton-fake\"", &env).await;
}

#[tokio::test]
async fn codex_orchestrates_a_team_of_probe_agents() {
    let cli = cli_dir("codex", "@openai/codex@0.169.0");
    let env = [("OPENAI_API_KEY", "sk-fake-codex-key")];
    a_team_orchestrated_by("codex", Api::Responses, &cli, "model = \"baton-fake\"", &env).await;
}
