//! Line-by-line reviews: an agent's review answered as JSON becomes one
//! GitHub review with inline comments on the lines of the pull request's
//! diff. Pure: the publisher fetches the diff and posts what this plans.
//!
//! The answer format (documented in the README and put in review prompts):
//!
//! ```json
//! {"summary": "…", "event": "COMMENT" | "REQUEST_CHANGES" | "APPROVE",
//!  "comments": [{"path": "src/a.rs", "line": 12, "side": "RIGHT",
//!                "start_line": 10, "body": "…", "suggestion": "…"}]}
//! ```
//!
//! Review triggers' prompts end with `rules::REVIEW_ANSWER_FORMAT`.
//! A comment on a line the diff does not show moves into the summary as
//! `path:line: …`, never dropped. `APPROVE` needs the trigger's
//! `allow_approve = true`; otherwise the review is a comment.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

/// An agent's review, as it answered.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Answer {
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub comments: Vec<Finding>,
}

/// One inline finding.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Finding {
    pub path: String,
    pub line: u64,
    #[serde(default)]
    pub side: Option<String>,
    #[serde(default)]
    pub start_line: Option<u64>,
    pub body: String,
    #[serde(default)]
    pub suggestion: Option<String>,
}

/// The review answer in `result`, if the agent gave one: the whole result,
/// or a JSON object fenced in it (agents like to wrap it in ```json).
pub fn parse(result: &str) -> Option<Answer> {
    let text = result.trim();
    let candidates = [
        Some(text),
        text.find("```json").and_then(|at| {
            let rest = &text[at + 7..];
            rest.find("```").map(|end| rest[..end].trim())
        }),
        text.find('{').zip(text.rfind('}')).filter(|(a, b)| a < b).map(|(a, b)| &text[a..=b]),
    ];
    candidates.into_iter().flatten().find_map(|c| {
        let v: serde_json::Value = serde_json::from_str(c).ok()?;
        // Only an object that looks like a review (not any JSON an agent printed).
        let looks = v.get("summary").is_some() || v.get("comments").is_some_and(|c| c.is_array());
        looks.then(|| serde_json::from_value(v).ok()).flatten()
    })
}

/// Line number → its text, on one side of a file's diff.
type Lines = HashMap<u64, String>;

/// The lines a pull request's diff shows, per file and side.
#[derive(Debug, Default, Clone)]
pub(crate) struct DiffLines {
    /// path → (old-file lines, new-file lines).
    lines: HashMap<String, (Lines, Lines)>,
}

impl DiffLines {
    /// From `GET /pulls/{n}/files`: each file's `filename` and `patch`.
    pub(crate) fn from_files(files: &[serde_json::Value]) -> DiffLines {
        let mut out = DiffLines::default();
        for f in files {
            let (Some(path), Some(patch)) = (f["filename"].as_str(), f["patch"].as_str()) else { continue };
            out.lines.insert(path.to_string(), patch_lines(patch));
        }
        out
    }

    /// Whether `line` on `side` of `path` is in the diff.
    pub fn has(&self, path: &str, side: Side, line: u64) -> bool {
        self.text(path, side, line).is_some()
    }

    /// The text of `line` on `side` of `path`, when the diff shows it.
    pub fn text(&self, path: &str, side: Side, line: u64) -> Option<&str> {
        let (left, right) = self.lines.get(path)?;
        match side {
            Side::Left => left.get(&line).map(String::as_str),
            Side::Right => right.get(&line).map(String::as_str),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Left,
    Right,
}

impl Side {
    pub(crate) fn parse(s: Option<&str>) -> Side {
        match s.map(str::to_ascii_uppercase).as_deref() {
            Some("LEFT") => Side::Left,
            _ => Side::Right,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Side::Left => "LEFT",
            Side::Right => "RIGHT",
        }
    }
}

/// The old-file (LEFT) and new-file (RIGHT) line numbers a unified diff
/// shows: removed and context lines on the left, added and context lines
/// on the right.
fn patch_lines(patch: &str) -> (Lines, Lines) {
    let (mut left, mut right) = (HashMap::new(), HashMap::new());
    let (mut old, mut new) = (0u64, 0u64);
    for line in patch.lines() {
        if let Some(header) = line.strip_prefix("@@ ") {
            // @@ -a,b +c,d @@
            let mut parts = header.split_whitespace();
            let start = |p: Option<&str>, sign: char| {
                p.and_then(|p| p.strip_prefix(sign))
                    .and_then(|p| p.split(',').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            old = start(parts.next(), '-');
            new = start(parts.next(), '+');
            continue;
        }
        match line.chars().next() {
            Some('+') => {
                right.insert(new, line[1..].to_string());
                new += 1;
            }
            Some('-') => {
                left.insert(old, line[1..].to_string());
                old += 1;
            }
            Some('\\') => {} // "\ No newline at end of file"
            _ => {
                let text = line.get(1..).unwrap_or_default().to_string();
                left.insert(old, text.clone());
                right.insert(new, text);
                old += 1;
                new += 1;
            }
        }
    }
    (left, right)
}

/// The review to post.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    /// The summary, with the findings that could not go inline.
    pub body: String,
    pub event: &'static str,
    /// Inline comments, as GitHub's create-review API takes them.
    pub comments: Vec<serde_json::Value>,
    /// The fingerprint of every finding posted, this time or before.
    pub findings: Vec<String>,
}

/// A finding's fingerprint: where it is, by the text of its lines (not
/// their numbers, which shift as the pull request grows), and what it says.
/// A finding off the diff is known by its line number.
fn fingerprint(f: &Finding, side: Side, lines: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [f.path.as_str(), side.as_str(), lines, f.body.trim(), f.suggestion.as_deref().unwrap_or("")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..12])
}

/// Plans the review for `answer` against the diff. A finding whose
/// fingerprint is in `posted` (an earlier review of this pull request said
/// it, on lines that read the same) is not repeated.
pub(crate) fn plan(
    answer: &Answer,
    diff: &DiffLines,
    allow_approve: bool,
    posted: &HashSet<String>,
    flavor: Flavor,
) -> Review {
    let event = match answer.event.as_deref().map(str::to_ascii_uppercase).as_deref() {
        Some("REQUEST_CHANGES") => "REQUEST_CHANGES",
        Some("APPROVE") if allow_approve => "APPROVE",
        _ => "COMMENT",
    };
    let mut comments = Vec::new();
    let mut elsewhere = Vec::new();
    let mut findings: Vec<String> = posted.iter().cloned().collect();
    let mut repeated = 0;
    for f in &answer.comments {
        let side = Side::parse(f.side.as_deref());
        let mut body = f.body.clone();
        let start = f.start_line.filter(|s| *s < f.line && diff.has(&f.path, side, *s));
        if let Some(s) = &f.suggestion {
            let above = start.map_or(0, |start| f.line - start);
            body.push_str(&suggestion_block(s, flavor, above));
        }
        let inline = f.line > 0 && diff.has(&f.path, side, f.line);
        let lines = match inline {
            true => (start.unwrap_or(f.line)..=f.line)
                .filter_map(|l| diff.text(&f.path, side, l))
                .collect::<Vec<_>>()
                .join("\n"),
            false => format!("line {}", f.line),
        };
        let print = fingerprint(f, side, &lines);
        if posted.contains(&print) {
            repeated += 1;
            continue;
        }
        findings.push(print);
        if inline {
            let mut c = serde_json::json!({ "path": f.path, "line": f.line, "side": side.as_str(), "body": body });
            if let Some(start) = start {
                c["start_line"] = start.into();
                c["start_side"] = side.as_str().into();
            }
            comments.push(c);
        } else {
            elsewhere.push(format!("- `{}:{}`: {}", f.path, f.line, body));
        }
    }
    let mut body = answer.summary.trim().to_string();
    if !elsewhere.is_empty() {
        body.push_str("\n\n**On lines outside this diff:**\n");
        body.push_str(&elsewhere.join("\n"));
    }
    if repeated > 0 {
        let s = if repeated == 1 { "" } else { "s" };
        body.push_str(&format!("\n\n({repeated} finding{s} from an earlier review still apply, not repeated.)"));
    }
    if body.is_empty() {
        body = "(no summary)".into();
    }
    findings.sort();
    findings.dedup();
    Review { body, event, comments, findings }
}

/// Whose suggestion syntax a review is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// ```` ```suggestion ````: replaces the lines the comment spans.
    GitHub,
    /// ```` ```suggestion:-N+0 ````: replaces the commented line and the N
    /// above it.
    GitLab,
}

/// A suggestion block: a fence longer than any backtick run inside.
/// `above` is how many lines before the commented one it replaces too.
fn suggestion_block(text: &str, flavor: Flavor, above: u64) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    let text = text.strip_suffix('\n').unwrap_or(text);
    let range = match flavor {
        Flavor::GitHub => String::new(),
        Flavor::GitLab => format!(":-{above}+0"),
    };
    format!("\n\n{fence}suggestion{range}\n{text}\n{fence}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATCH: &str =
        "@@ -1,4 +1,5 @@\n fn a() {\n-    old();\n+    new();\n+    more();\n }\n \n@@ -20,2 +21,3 @@\n x\n+y\n z";

    fn diff() -> DiffLines {
        DiffLines::from_files(&[serde_json::json!({ "filename": "src/a.rs", "patch": PATCH })])
    }

    #[test]
    fn diff_lines_are_read_off_the_hunks() {
        let d = diff();
        // (side, line) → in the diff?
        let check = |side, line, expect| assert_eq!(d.has("src/a.rs", side, line), expect, "{side:?} {line}");
        check(Side::Right, 1, true); // context
        check(Side::Right, 2, true); // added
        check(Side::Right, 3, true);
        check(Side::Left, 2, true); // removed
        check(Side::Right, 6, false); // between hunks
        check(Side::Right, 22, true); // second hunk's addition
        check(Side::Right, 24, false);
        assert!(!d.has("src/b.rs", Side::Right, 1));
    }

    #[test]
    fn answers_are_parsed_bare_fenced_or_not_at_all() {
        let check = |text: &str, expect: Option<&str>| {
            assert_eq!(parse(text).map(|a| a.summary), expect.map(str::to_string), "{text}");
        };
        check(r#"{"summary": "ok", "comments": []}"#, Some("ok"));
        check("Here it is:\n```json\n{\"summary\": \"fenced\"}\n```\n", Some("fenced"));
        check("The code looks fine to me.", None);
        check("{\"not\": \"a review\"}", None);
        check("{\"summary\": 3}", None); // wrong type: a plain review instead
    }

    #[test]
    fn findings_go_inline_on_diff_lines_and_into_the_summary_elsewhere() {
        let answer = Answer {
            summary: "Two things.".into(),
            event: Some("APPROVE".into()),
            comments: vec![
                Finding {
                    path: "src/a.rs".into(),
                    line: 3,
                    side: None,
                    start_line: Some(2),
                    body: "Call it once.".into(),
                    suggestion: Some("    new();\n".into()),
                },
                Finding {
                    path: "src/a.rs".into(),
                    line: 10,
                    side: Some("RIGHT".into()),
                    start_line: None,
                    body: "Unrelated.".into(),
                    suggestion: None,
                },
                Finding {
                    path: "src/a.rs".into(),
                    line: 2,
                    side: Some("left".into()),
                    start_line: None,
                    body: "Why remove?".into(),
                    suggestion: None,
                },
            ],
        };
        let r = plan(&answer, &diff(), false, &HashSet::new(), Flavor::GitHub);
        assert_eq!(r.event, "COMMENT", "APPROVE needs allow_approve");
        assert_eq!(plan(&answer, &diff(), true, &HashSet::new(), Flavor::GitHub).event, "APPROVE");
        assert_eq!(r.comments.len(), 2);
        assert_eq!(r.comments[0]["start_line"], 2);
        assert_eq!(r.comments[0]["body"], "Call it once.\n\n```suggestion\n    new();\n```");
        assert_eq!(r.comments[1]["side"], "LEFT");
        assert_eq!(r.body, "Two things.\n\n**On lines outside this diff:**\n- `src/a.rs:10`: Unrelated.");
    }

    #[test]
    fn a_suggestion_with_backticks_gets_a_longer_fence() {
        assert_eq!(suggestion_block("a ``` b", Flavor::GitHub, 0), "\n\n````suggestion\na ``` b\n````");
    }

    #[test]
    fn gitlab_suggestions_say_how_many_lines_above_they_replace() {
        assert_eq!(suggestion_block("x", Flavor::GitLab, 0), "\n\n```suggestion:-0+0\nx\n```");
        let answer: Answer = serde_json::from_value(serde_json::json!({
            "summary": "s",
            "comments": [{ "path": "src/a.rs", "line": 3, "start_line": 2, "body": "b", "suggestion": "new();\nmore();" }]
        }))
        .unwrap();
        let r = plan(&answer, &diff(), false, &HashSet::new(), Flavor::GitLab);
        assert!(r.comments[0]["body"].as_str().unwrap().contains("```suggestion:-1+0\nnew();\nmore();\n```"));
    }
}
