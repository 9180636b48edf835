//! Matching one event against 10,000 trigger rules spread over 50 event
//! kinds: the index means an event visits only the ~200 rules of its kind.

use std::path::Path;

use baton::config::Config;
use baton::forge::github::normalize;
use baton::rules::RuleSet;
use criterion::{criterion_group, criterion_main, Criterion};

const ACTIONS: [&str; 10] =
    ["opened", "edited", "closed", "reopened", "labeled", "unlabeled", "assigned", "unassigned", "locked", "pinned"];
const EVENTS: [&str; 5] = ["issues", "pull_request", "issue_comment", "check_run", "workflow_run"];

fn rules(count: usize) -> (tempfile::TempDir, RuleSet) {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..count {
        let kind = format!("{}.{}", EVENTS[i % 5], ACTIONS[(i / 5) % 10]);
        // Realistic rules: most listen to one organization's repositories.
        let text = format!(
            "on = [\"{kind}\"]\n[filter]\nrepos = [\"org{}/*\"]\nlabels = [\"bug\", \"crash\"]\n[job]\nagent = \"codex\"\nworkspace = \"none\"\nprompt = \"Investigate {{{{ issue.title }}}} in {{{{ repository.full_name }}}}\"\n",
            i % 100
        );
        std::fs::write(dir.path().join(format!("t{i:05}.toml")), text).expect("write");
    }
    let config = Config::from_source(None, "", Path::new("/")).expect("config");
    let (set, errors) = RuleSet::load(dir.path(), &config);
    assert!(errors.is_empty(), "{errors:?}");
    (dir, set)
}

fn bench(c: &mut Criterion) {
    let count = std::env::var("MATCH_RULES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let (_dir, set) = rules(count);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/github/issues/opened.payload.json");
    let body = std::fs::read(root).expect("fixture");
    let mut payload: serde_json::Value = serde_json::from_slice(&body).expect("json");
    payload["repository"]["full_name"] = serde_json::json!("org7/app");
    let event = normalize("issues", "bench", payload.to_string().as_bytes()).expect("event");
    let matched = set.match_event(&event).len();
    eprintln!("{count} rules; an issues.opened event from org7 matches {matched}");
    c.bench_function(&format!("match one event against {count} rules"), |b| b.iter(|| set.match_event(&event)));
}

criterion_group!(benches, bench);
criterion_main!(benches);
