//! The README says what baton is before anything else, then the two-command
//! quick start, and stays short: each part of the documentation is one
//! click away in `docs/`, and every relative link there leads somewhere.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_readme_says_what_baton_is_then_the_quick_start_and_links_every_page() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    assert_eq!(lines[0], "# baton");
    assert!(lines.len() <= 150, "the README is short: {} lines", lines.len());
    let quick = readme.find("\n## Quick start\n").expect("a quick start");
    let intro = &readme[..quick];
    assert!(intro.contains("automation daemon for coding agents"), "what baton is comes first");
    assert!(
        intro.contains("```\n") && intro.contains("trigger") && intro.contains("sandboxed agent"),
        "the flow, drawn"
    );
    assert!(!intro.contains("\n## "), "nothing before the quick start but the description");
    // Exactly two commands: the daemon on built-in defaults, the tests.
    let block = readme[quick..].split("```sh\n").nth(1).and_then(|b| b.split("```").next()).unwrap();
    let commands: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(commands[0].starts_with("cargo run --release -- serve") && commands[1].starts_with("cargo test"));
    for page in ["configuration", "triggers", "outputs", "security", "operations", "delegation"] {
        assert!(readme.contains(&format!("](docs/{page}.md)")), "docs/{page}.md is linked from the README");
    }
}

#[test]
fn every_relative_link_in_the_documentation_leads_to_a_file() {
    let mut pages = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        pages.push(entry.unwrap().path());
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for target in links(&text) {
            if target.starts_with("http") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let file = target.split('#').next().unwrap_or_default();
            if !page.parent().unwrap_or(Path::new(".")).join(file).exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The targets of `[text](target)` links.
fn links(text: &str) -> Vec<String> {
    text.split("](").skip(1).filter_map(|rest| rest.split(')').next()).map(str::to_string).collect()
}
