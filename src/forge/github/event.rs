//! GitHub payload → `Event`.
//!
//! baton reads only the fields it needs through its own lenient serde structs
//! (every field optional, unknown fields ignored), borrowing from the JSON
//! text, which is kept whole for templates and never parsed into a `Value`
//! here. octocrab's webhook models are strict and fail on real payloads, so
//! they are not used here.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{Actor, Comment, Event, NormalizeError, Payload, Repository};

/// GitHub events that baton understands; others are stored and start no job.
pub const KNOWN_EVENTS: &[&str] = &[
    "issues",
    "issue_comment",
    "pull_request",
    "pull_request_review",
    "pull_request_review_comment",
    "check_run",
    "check_suite",
    "workflow_run",
    "workflow_job",
    "status",
    "push",
    "ping",
    "installation",
    "installation_repositories",
    "repository_dispatch",
    "workflow_dispatch",
];

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Fields<'a> {
    action: Option<String>,
    repository: Option<RawRepo>,
    installation: Option<Id>,
    sender: Option<RawUser>,
    #[serde(borrow)]
    issue: Option<RawIssue<'a>>,
    #[serde(borrow)]
    pull_request: Option<RawPull<'a>>,
    comment: Option<RawComment>,
    review: Option<RawComment>,
    #[serde(borrow)]
    check_run: Option<RawCheckRun<'a>>,
    #[serde(borrow)]
    check_suite: Option<RawCheck<'a>>,
    #[serde(borrow)]
    workflow_run: Option<RawCheck<'a>>,
    #[serde(borrow)]
    workflow_job: Option<RawCheck<'a>>,
    // status
    sha: Option<String>,
    state: Option<String>,
    branches: Vec<Named>,
    // push
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
    // repository_dispatch / workflow_dispatch
    branch: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Id {
    id: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Named {
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRepo {
    id: Option<u64>,
    full_name: Option<String>,
    default_branch: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawUser {
    login: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawIssue<'a> {
    number: Option<u64>,
    /// Title, text and page: kept as JSON text so an odd type never drops
    /// the issue (`text_of`).
    #[serde(borrow)]
    title: Option<&'a RawValue>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    html_url: Option<&'a RawValue>,
    author_association: Option<String>,
    /// Read leniently (`login_of`): only its `login` is needed.
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    labels: Vec<Named>,
    /// Present when the "issue" is a pull request (comments on PRs).
    #[serde(borrow)]
    pull_request: Option<&'a RawValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPull<'a> {
    number: Option<u64>,
    #[serde(borrow)]
    title: Option<&'a RawValue>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    html_url: Option<&'a RawValue>,
    author_association: Option<String>,
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    labels: Vec<Named>,
    updated_at: Option<String>,
    draft: Option<bool>,
    maintainer_can_modify: Option<bool>,
    head: Option<RawRef>,
    base: Option<RawRef>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRef {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    sha: Option<String>,
    repo: Option<RawRepo>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawComment {
    id: Option<u64>,
    body: Option<String>,
    author_association: Option<String>,
    user: Option<RawUser>,
    // A review comment's place in the diff.
    in_reply_to_id: Option<u64>,
    path: Option<String>,
    line: Option<u64>,
    original_line: Option<u64>,
    side: Option<String>,
    diff_hunk: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawCheck<'a> {
    head_sha: Option<String>,
    head_branch: Option<String>,
    conclusion: Option<String>,
    #[serde(borrow)]
    pull_requests: Vec<RawPull<'a>>,
    head_repository: Option<RawRepo>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawCheckRun<'a> {
    head_sha: Option<String>,
    conclusion: Option<String>,
    #[serde(borrow)]
    pull_requests: Vec<RawPull<'a>>,
    #[serde(borrow)]
    check_suite: Option<RawCheck<'a>>,
}

/// Parses a GitHub delivery body into an `Event`.
pub fn normalize(name: &str, delivery: &str, body: &[u8]) -> Result<Event, NormalizeError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let at = e.valid_up_to();
        NormalizeError::Json(serde::de::Error::custom(format!("invalid UTF-8 at byte {at}")))
    })?;
    // A struct would also accept an array (its fields by position).
    if !text.trim_start().starts_with('{') {
        serde_json::from_str::<serde::de::IgnoredAny>(text)?;
        return Err(NormalizeError::NotAnObject);
    }
    // Lenient: a field of an unexpected type is treated as absent rather than
    // failing the delivery, so one odd field never loses an event.
    let p = match serde_json::from_str::<Fields>(text) {
        Ok(p) => p,
        Err(_) => lenient(&serde_json::from_str(text)?),
    };

    let repository = p.repository.as_ref().and_then(|r| {
        r.full_name.clone().map(|full_name| Repository {
            full_name,
            default_branch: r.default_branch.clone(),
            id: r.id,
        })
    });
    let repo_id = repository.as_ref().and_then(|r| r.id);
    let repo_full = repository.as_ref().map(|r| r.full_name.as_str());

    let mut e = Event {
        access: p.installation.as_ref().and_then(|i| i.id),
        sender: p.sender.as_ref().and_then(|s| {
            s.login.clone().map(|login| Actor { login, kind: s.kind.clone().unwrap_or_else(|| "User".into()) })
        }),
        ..Event::new("github", name, p.action.clone(), delivery, Payload::default())
    };

    if let Some(issue) = &p.issue {
        e.subject = issue.number;
        e.subject_is_pull_request = issue.pull_request.is_some();
        e.association = issue.author_association.clone();
        e.author = login_of(&issue.user);
        e.labels = names(&issue.labels);
        (e.title, e.body, e.url) = (text_of(&issue.title), text_of(&issue.body), text_of(&issue.html_url));
    }
    if let Some(pr) = &p.pull_request {
        e.subject = pr.number.or(e.subject);
        e.subject_is_pull_request = true;
        e.association = pr.author_association.clone();
        e.author = login_of(&pr.user);
        e.labels = names(&pr.labels);
        e.draft = pr.draft;
        e.updated_at = pr.updated_at.clone();
        (e.title, e.body, e.url) = (text_of(&pr.title), text_of(&pr.body), text_of(&pr.html_url));
        apply_pull_refs(&mut e, pr, repo_id, repo_full);
    }
    // A comment or review is about its author, not the issue's.
    if let Some(c) = p.comment.as_ref().or(p.review.as_ref()) {
        e.association = c.author_association.clone();
        e.author = c.user.as_ref().and_then(|u| u.login.clone());
        e.comment = Some(Comment {
            id: c.id,
            body: c.body.clone().unwrap_or_default(),
            author: c.user.as_ref().and_then(|u| u.login.clone()),
            edited: e.action.as_deref() == Some("edited"),
        });
    }

    if let (Some(c), "pull_request_review_comment") = (&p.comment, name) {
        if let (Some(id), Some(path)) = (c.id, &c.path) {
            let author = c.user.as_ref().and_then(|u| u.login.clone()).unwrap_or_default();
            e.thread = Some(crate::event::Thread {
                root: c.in_reply_to_id.unwrap_or(id),
                path: path.clone(),
                line: c.line.or(c.original_line),
                side: c.side.clone(),
                diff_hunk: c.diff_hunk.clone().unwrap_or_default(),
                comments: vec![crate::event::ThreadComment {
                    id,
                    author,
                    association: c.author_association.clone().unwrap_or_default(),
                    body: c.body.clone().unwrap_or_default(),
                }],
            });
        }
    }

    match name {
        "check_run" => {
            if let Some(run) = &p.check_run {
                let suite = run.check_suite.as_ref();
                e.head_sha = run.head_sha.clone();
                e.conclusion = run.conclusion.clone();
                e.branch = suite.and_then(|s| s.head_branch.clone());
                let prs = if run.pull_requests.is_empty() {
                    suite.map(|s| s.pull_requests.as_slice()).unwrap_or(&[])
                } else {
                    &run.pull_requests
                };
                apply_check_pulls(&mut e, prs, repo_id);
            }
        }
        "check_suite" | "workflow_run" | "workflow_job" => {
            let check = match name {
                "check_suite" => p.check_suite.as_ref(),
                "workflow_run" => p.workflow_run.as_ref(),
                _ => p.workflow_job.as_ref(),
            };
            if let Some(c) = check {
                e.head_sha = c.head_sha.clone();
                e.conclusion = c.conclusion.clone();
                e.branch = c.head_branch.clone();
                apply_check_pulls(&mut e, &c.pull_requests, repo_id);
                if let (Some(head), Some(full)) = (&c.head_repository, repo_full) {
                    e.head_in_repo =
                        Some(head.full_name.as_deref() == Some(full) || head.id.is_some() && head.id == repo_id);
                } else if name == "workflow_job" {
                    // A job's payload does not say where its head lives.
                    e.head_in_repo = None;
                }
            }
        }
        "status" => {
            e.head_sha = p.sha.clone();
            e.conclusion = p.state.clone();
            let branches = names(&p.branches);
            // A status on a commit that sits on a branch of this repository
            // was pushed by someone with write access.
            e.head_in_repo = Some(!branches.is_empty());
            e.branch = branches.into_iter().next();
        }
        "push" => {
            e.head_sha = p.after.clone().filter(|s| !s.chars().all(|c| c == '0'));
            e.branch = p.git_ref.as_deref().and_then(|r| r.strip_prefix("refs/heads/")).map(str::to_string);
            e.head_in_repo = Some(true);
        }
        "repository_dispatch" | "workflow_dispatch" => {
            e.branch = p
                .branch
                .clone()
                .or_else(|| p.git_ref.as_deref().and_then(|r| r.strip_prefix("refs/heads/")).map(str::to_string));
        }
        _ => {}
    }

    e.repository = repository;
    e.payload = Payload::from_json(text);
    Ok(e)
}

/// A user object's `login`, whatever else it holds.
fn login_of(user: &Option<&RawValue>) -> Option<String> {
    #[derive(Deserialize)]
    struct User {
        login: String,
    }
    user.and_then(|u| serde_json::from_str::<User>(u.get()).ok()).map(|u| u.login)
}

fn names(labels: &[Named]) -> Vec<String> {
    labels.iter().filter_map(|l| l.name.clone()).collect()
}

fn apply_pull_refs(e: &mut Event, pr: &RawPull<'_>, repo_id: Option<u64>, repo_full: Option<&str>) {
    if let Some(head) = &pr.head {
        e.branch = head.git_ref.clone();
        e.head_sha = head.sha.clone();
        // A deleted fork leaves `head.repo` null: treat it as a fork.
        e.head_in_repo = Some(match &head.repo {
            None => false,
            Some(r) => {
                (r.id.is_some() && r.id == repo_id) || (r.full_name.is_some() && r.full_name.as_deref() == repo_full)
            }
        });
        e.head_repo = head.repo.as_ref().and_then(|r| r.full_name.clone());
    }
    e.maintainer_can_modify = pr.maintainer_can_modify;
    if let Some(base) = &pr.base {
        e.base_branch = base.git_ref.clone();
        e.base_sha = base.sha.clone();
    }
}

/// A string field read leniently: any other type counts as absent.
fn text_of(v: &Option<&RawValue>) -> Option<String> {
    v.and_then(|v| serde_json::from_str(v.get()).ok())
}

/// Checks and workflows name their pull requests; the first is the subject.
/// GitHub lists only pull requests whose head is in the repository itself,
/// and leaves `head_branch` null for a fork, so a check with neither is
/// treated as coming from a fork.
fn apply_check_pulls(e: &mut Event, prs: &[RawPull<'_>], repo_id: Option<u64>) {
    if let Some(pr) = prs.first() {
        e.subject = pr.number;
        e.subject_is_pull_request = true;
        e.base_branch = pr.base.as_ref().and_then(|b| b.git_ref.clone());
        let head_repo = pr.head.as_ref().and_then(|h| h.repo.as_ref()).and_then(|r| r.id);
        e.head_in_repo = Some(head_repo.is_some() && head_repo == repo_id);
        // GitHub lists only pull requests whose head is in this repository:
        // the check's branch is the PR's head branch.
        if e.branch.is_none() {
            e.branch = pr.head.as_ref().and_then(|h| h.git_ref.clone());
        }
    } else {
        e.head_in_repo = Some(e.branch.is_some());
    }
}

/// Field-by-field fallback for payloads where some field has an odd type:
/// each top-level field is read from its own text, and one that does not
/// fit counts as absent.
fn lenient<'a>(value: &HashMap<String, &'a RawValue>) -> Fields<'a> {
    fn field<'a, T: Deserialize<'a> + Default>(v: &HashMap<String, &'a RawValue>, key: &str) -> T {
        let raw: Option<&'a RawValue> = v.get(key).copied();
        raw.and_then(|f| serde_json::from_str(f.get()).ok()).unwrap_or_default()
    }
    Fields {
        action: field(value, "action"),
        repository: field(value, "repository"),
        installation: field(value, "installation"),
        sender: field(value, "sender"),
        issue: field(value, "issue"),
        pull_request: field(value, "pull_request"),
        comment: field(value, "comment"),
        review: field(value, "review"),
        check_run: field(value, "check_run"),
        check_suite: field(value, "check_suite"),
        workflow_run: field(value, "workflow_run"),
        workflow_job: field(value, "workflow_job"),
        sha: field(value, "sha"),
        state: field(value, "state"),
        branches: field(value, "branches"),
        git_ref: field(value, "ref"),
        after: field(value, "after"),
        branch: field(value, "branch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_field_types_do_not_lose_the_event() {
        let body = br#"{"action":"opened","issue":{"number":"seven"},"repository":{"full_name":"a/b"}}"#;
        let e = normalize("issues", "d1", body).unwrap();
        assert_eq!(e.kind, "issues.opened");
        assert_eq!(e.subject, None);
        assert_eq!(e.repo_name(), Some("a/b"));
    }

    #[test]
    fn fields_are_read_from_the_text_and_the_payload_is_not_parsed_whole() {
        let body = br#"{"action":"opened","pull_request":{"number":3,"title":"T\u00e9","user":{"login":"al","id":1},
            "updated_at":"2026-01-01T00:00:00Z","head":{"ref":"f","sha":"abc","repo":{"id":9}}},
            "repository":{"id":9,"full_name":"a/b"},"extra":[1,{"deep":[2]}]}"#;
        let e = normalize("pull_request", "d1", body).unwrap();
        assert_eq!((e.subject, e.title.as_deref(), e.author.as_deref()), (Some(3), Some("Té"), Some("al")));
        assert_eq!((e.head_in_repo, e.updated_at.as_deref()), (Some(true), Some("2026-01-01T00:00:00Z")));
        assert!(!e.payload.is_parsed());
        // An odd `user` or `title` is absent, the rest of the PR stays.
        let odd = br#"{"action":"opened","pull_request":{"number":3,"title":7,"user":"al"}}"#;
        let e = normalize("pull_request", "d2", odd).unwrap();
        assert_eq!((e.subject, e.title, e.author), (Some(3), None, None));
    }

    #[test]
    fn non_objects_are_rejected() {
        assert!(matches!(normalize("issues", "d", b"[1]"), Err(NormalizeError::NotAnObject)));
        assert!(matches!(normalize("issues", "d", b"{"), Err(NormalizeError::Json(_))));
        assert!(matches!(normalize("issues", "d", b"{\"a\": \"\xff\"}"), Err(NormalizeError::Json(_))));
        assert!(matches!(normalize("issues", "d", b" \"x\""), Err(NormalizeError::NotAnObject)));
    }
}
