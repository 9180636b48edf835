//! Hostile input at the HTTP endpoints: random bytes, random JSON, truncated
//! and mutated fixtures, odd headers. The answer is always a 2xx or 4xx —
//! never a 5xx, never a dead daemon.

use serde_json::{json, Value};

use crate::harness::{Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "hostile-secret";

/// xorshift64*: a fixed seed keeps every run the same.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn string(&mut self) -> String {
        let pool =
            ["", "opened", "a\u{0}b", "ü", "🙂", "/fix", "OWNER", "x".repeat(300).as_str(), "null"].map(String::from);
        pool[self.below(pool.len())].clone()
    }
    fn json(&mut self, depth: u32) -> Value {
        match self.below(if depth > 3 { 5 } else { 8 }) {
            0 => Value::Null,
            1 => json!(self.next().is_multiple_of(3)),
            2 => json!(self.next() as i64),
            3 => json!(-1.5e300),
            4 => json!(self.string()),
            5 => Value::Array((0..self.below(4)).map(|_| self.json(depth + 1)).collect()),
            _ => {
                let keys = [
                    "action",
                    "issue",
                    "pull_request",
                    "comment",
                    "repository",
                    "sender",
                    "installation",
                    "labels",
                    "number",
                    "head",
                    "base",
                    "sha",
                    "check_run",
                    "pull_requests",
                    "full_name",
                    "type",
                    "login",
                    "body",
                    "author_association",
                    "default_branch",
                    "ref",
                    "repo",
                    "id",
                    "branches",
                    "build",
                ];
                let mut map = serde_json::Map::new();
                for _ in 0..self.below(6) {
                    map.insert(keys[self.below(keys.len())].to_string(), self.json(depth + 1));
                }
                Value::Object(map)
            }
        }
    }
}

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/github");
    let mut out = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap().flatten().filter(|d| d.path().is_dir()) {
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            out.push((dir.file_name().to_string_lossy().into_owned(), std::fs::read(f.path()).unwrap()));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn random_and_broken_payloads_never_get_a_5xx() {
    let w = Workdir::new();
    // Triggers that read deep into payloads, so matching and templates see the junk too.
    let job = |on: &[&str]| {
        Trigger::on(on)
            .agent("noop")
            .workspace("none")
            .prompt("{{ issue.title }} {{ pull_request.head.sha }} {{ command.args }}")
            .output("none")
    };
    Scenario::new()
        .github(GitHub::secret(SECRET))
        .agent("noop", Agent::command(&["true"]))
        .set("sources.ci.secret", SECRET)
        .set("sources.ci.action_field", "build.status")
        .trigger("any-issue", job(&["issues", "issue_comment", "pull_request"]))
        .trigger("cmd", job(&["issue_comment.created"]).filter("command", "/fix").filter("if", "issue.title | lower"))
        .trigger("checks", job(&["check_run", "ci"]).filter("conclusions", vec!["failure"]))
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let fixtures = fixtures();
    let events =
        ["issues", "issue_comment", "pull_request", "check_run", "push", "status", "ping", "weird", "issues.x"];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let http = reqwest::Client::new();

    for i in 0..400 {
        let (event, body): (String, Vec<u8>) = match rng.below(5) {
            0 => {
                let n = rng.below(3000);
                (events[rng.below(events.len())].to_string(), rng.bytes(n))
            }
            1 => (events[rng.below(events.len())].to_string(), rng.json(0).to_string().into_bytes()),
            2 => {
                let (name, f) = &fixtures[rng.below(fixtures.len())];
                (name.clone(), f[..rng.below(f.len())].to_vec())
            }
            3 => {
                let (name, f) = &fixtures[rng.below(fixtures.len())];
                let mut f = f.clone();
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(f.len());
                    f[at] = rng.next() as u8;
                }
                (name.clone(), f)
            }
            _ => {
                // A real payload with one field replaced by junk of another type.
                let (name, f) = &fixtures[rng.below(fixtures.len())];
                let mut v: Value = serde_json::from_slice(f).unwrap();
                if let Some(obj) = v.as_object_mut() {
                    let keys: Vec<String> = obj.keys().cloned().collect();
                    let key = keys[rng.below(keys.len())].clone();
                    obj.insert(key, rng.json(1));
                }
                (name.clone(), v.to_string().into_bytes())
            }
        };
        let signed = rng.below(10) != 0;
        let (path, header) = if rng.below(4) == 0 {
            ("/webhooks/ci", "x-signature-256")
        } else {
            ("/webhooks/github", "x-hub-signature-256")
        };
        let mut req = http
            .post(format!("{}{path}", baton.url))
            .header("x-github-event", event.as_str())
            .header("x-github-delivery", format!("hostile-{i}"))
            .body(body.clone());
        if signed {
            req = req.header(header, baton::forge::signature::sign(SECRET.as_bytes(), &body));
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("case {i}: the daemon did not answer: {e}"));
        let status = resp.status().as_u16();
        assert!((200..500).contains(&status), "case {i} ({event}, {} bytes): status {status}", body.len());
        if !signed {
            assert_eq!(status, 401, "case {i}: unsigned");
        }
    }
    assert_eq!(baton.get("/healthz").await.0, 200);
    assert_eq!(baton.get("/api/jobs?limit=1000").await.0, 200);
}
