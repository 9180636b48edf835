//! The shape of the code, checked: the module graph has no cycle, only the
//! store names a database crate, the domain does no IO, the engine never
//! imports the publisher, every event enters through one front door, and
//! only the forge module names GitHub's headers, refs and credential scopes;
//! and ARCHITECTURE.md's import table is the graph the code has.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `src/` file's text (test modules cut off), by top-level module.
fn sources() -> Vec<(String, String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
                let top = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
                let text = std::fs::read_to_string(&path).unwrap();
                let text = text.split("#[cfg(test)]").next().unwrap_or_default().to_string();
                out.push((top, rel, text));
            }
        }
    }
    out
}

/// `crate::X` references between top-level modules.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (top, _, text) in sources() {
        if top == "main" || top == "lib" {
            continue;
        }
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + 7..];
            // `crate::a::…`, or a group: `crate::{a, b::c}`.
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group.split('}').next().unwrap_or_default().split(',').collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String =
                    name.trim_start().chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                if !name.is_empty() && name != top {
                    g.entry(top.clone()).or_default().insert(name);
                }
            }
        }
    }
    g
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    // Depth-first, colouring: a grey module met again closes a cycle.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(1) => {
                let from = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if let Some(cycle) = visit(n, &g, &mut state, &mut Vec::new()) {
            panic!("module cycle: {}", cycle.join(" -> "));
        }
    }
    // The cycle the store redesign broke stays broken.
    assert!(!g["rules"].contains("schedule") && !g["rules"].contains("store"), "{:?}", g["rules"]);
}

#[test]
fn only_the_store_knows_the_database() {
    for (top, rel, text) in sources() {
        for db in ["sled::", "redb::", "sqlx::"] {
            assert!(top == "store" || !text.contains(db), "{rel} names {db}: only src/store/ may");
        }
    }
}

#[test]
fn the_domain_does_no_io_and_knows_no_store() {
    for (top, rel, text) in sources() {
        if top != "domain" {
            continue;
        }
        for io in ["crate::store", "tokio", "std::fs", "std::net", "std::process", "reqwest"] {
            assert!(!text.contains(io), "{rel} uses {io}: the domain is pure");
        }
    }
}

/// Every event enters through one front door: nothing but `src/admit.rs`
/// stores a delivery, so pinning, thread notes, review recall and approvals
/// apply to webhooks, schedules, job ends and the API alike.
#[test]
fn every_event_enters_through_the_front_door() {
    for (top, rel, text) in sources() {
        if top == "admit" || top == "store" {
            continue;
        }
        for call in [".accept(", ".accept_with("] {
            let stores = text.match_indices(call).any(|(i, _)| text[..i].ends_with("store"));
            assert!(!stores, "{rel} calls store{call}…): events go through admit::Door");
        }
    }
}

#[test]
fn the_engine_hands_off_to_publishing_only_through_the_store() {
    // The engine writes outbox records with a job's state; what they hold
    // is the publisher's planner's to say, through `domain::PlanOutbox`.
    let g = graph();
    assert!(!g["engine"].contains("publish"), "engine imports {:?}", g["engine"]);
    for (top, rel, text) in sources() {
        assert!(top != "engine" || !text.contains("publish::"), "{rel} names publish::");
    }
}

#[test]
fn only_the_forge_names_githubs_own_words() {
    // Headers, the trust field, the App's credential scope and the head ref
    // of a pull request: what a second forge names differently.
    let words = ["x-github-", "x-hub-signature", "author_association", "installation", "refs/pull/"];
    let mut found = Vec::new();
    for (top, rel, text) in sources() {
        if top == "forge" {
            continue;
        }
        // Stored records and the `event` template value keep the key they
        // had before the seam, so old databases and templates still read.
        let text = text.to_lowercase().replace("rename = \"installation\"", "");
        for word in words {
            for (i, _) in text.match_indices(word) {
                let line = text[..i].matches('\n').count() + 1;
                found.push(format!("src/{rel}:{line} names `{word}`"));
            }
        }
    }
    assert!(found.is_empty(), "only src/forge/ may name these:\n{}", found.join("\n"));
}

#[test]
fn the_forge_imports_only_config_and_event() {
    // Rules, records and the store name forge types, so the forge must sit
    // below them; what it needs of the store comes through `Deliveries`.
    let g = graph();
    let imports = g.get("forge").cloned().unwrap_or_default();
    assert!(imports.iter().all(|m| m == "config" || m == "event"), "forge imports {imports:?}");
    for m in ["ingress", "publish", "engine", "rules"] {
        assert!(g.get(m).is_some_and(|i| i.contains("forge")), "{m} does not go through the forge");
    }
}

/// ARCHITECTURE.md's import table names, for every top-level module, the
/// modules it imports: a new arrow between modules is a decision the map
/// records, not something it learns later.
#[test]
fn the_import_table_in_architecture_md_is_the_code_s() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md")).unwrap();
    let table = doc.split("\n## Imports\n").nth(1).expect("ARCHITECTURE.md has an `## Imports` section");
    let table = table.split("\n## ").next().unwrap_or_default();
    let mut written: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let module = cells[0].trim_matches('`').to_string();
        let imports = cells.get(1).copied().unwrap_or_default();
        let imports =
            imports.split(',').map(|i| i.trim().trim_matches('`').to_string()).filter(|i| !i.is_empty() && i != "—");
        written.insert(module, imports.collect());
    }
    let code = graph();
    let modules: BTreeSet<&String> = code.keys().chain(code.values().flatten()).collect();
    let mut wrong = Vec::new();
    for m in modules {
        let has = code.get(m).cloned().unwrap_or_default();
        match written.get(m) {
            None => wrong.push(format!("`{m}` has no row (it imports {has:?})")),
            Some(w) if *w != has => wrong.push(format!("`{m}`: the table says {w:?}, the code imports {has:?}")),
            Some(_) => {}
        }
    }
    for m in written.keys().filter(|m| !code.contains_key(*m) && !code.values().any(|v| v.contains(*m))) {
        wrong.push(format!("`{m}` is in the table but not in src/"));
    }
    assert!(wrong.is_empty(), "ARCHITECTURE.md's import table is out of date:\n{}", wrong.join("\n"));
}
