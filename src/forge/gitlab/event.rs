//! GitLab payload → `Event`.
//!
//! Read leniently from the raw JSON (a missing or oddly typed field is
//! simply absent), which is kept whole for templates. Kinds are GitLab's own
//! words: `merge_request.open`, `note.merge_request`, `issue.open`,
//! `pipeline.failed`, `build.failed` (a Job Hook: `job.*` is baton's own).

use serde_json::Value;

use crate::event::{Actor, Comment, Event, NormalizeError, Repository};

/// GitLab hook events baton understands (the kind before the dot); others
/// are stored and start no job.
pub const KNOWN_EVENTS: &[&str] =
    &["merge_request", "note", "issue", "pipeline", "build", "push", "tag_push", "release", "deployment", "emoji"];

/// The actions (after the dot) each known event has, for `baton check`.
pub const KNOWN_ACTIONS: &[(&str, &[&str])] = &[
    (
        "merge_request",
        &["open", "close", "reopen", "update", "approved", "unapproved", "approval", "unapproval", "merge"],
    ),
    ("note", &["merge_request", "issue", "commit", "snippet"]),
    ("issue", &["open", "close", "reopen", "update"]),
    (
        "pipeline",
        &[
            "created",
            "waiting_for_resource",
            "preparing",
            "pending",
            "running",
            "success",
            "failed",
            "canceled",
            "skipped",
            "manual",
            "scheduled",
        ],
    ),
    ("build", &["created", "pending", "running", "success", "failed", "canceled", "skipped", "manual"]),
];

fn text(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

/// Project ids compare as numbers; a payload that leaves one out says nothing.
fn same_project(a: &Value, b: &Value) -> Option<bool> {
    Some(a.as_u64()? == b.as_u64()?)
}

/// `MergeRequest` → `merge_request`.
fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// A project or group access token's bot (`project_42_bot_…`): GitLab's
/// payloads have no account type, so its name is what says it.
pub(crate) fn is_bot_username(name: &str) -> bool {
    let mut parts = name.split('_');
    matches!(parts.next(), Some("project" | "group"))
        && parts.next().is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        && parts.next() == Some("bot")
}

/// The person whose standing decides trust, by GitLab user id: who wrote the
/// issue, merge request or note. Pipelines and jobs have none: like GitHub's
/// checks, they are trusted by where their head commit lives.
pub fn author_id(event: &Event) -> Option<u64> {
    match event.name.as_str() {
        "merge_request" | "issue" | "note" => event.payload.value()["object_attributes"]["author_id"].as_u64(),
        _ => None,
    }
}

/// A verified GitLab delivery as an `Event`. Only JSON that is not an
/// object is refused; everything else is read as far as it goes.
pub fn normalize(name: &str, delivery: &str, body: &[u8]) -> Result<Event, NormalizeError> {
    let payload: Value = serde_json::from_slice(body)?;
    if !payload.is_object() {
        return Err(NormalizeError::NotAnObject);
    }
    let attrs = &payload["object_attributes"];
    let action = match name {
        "merge_request" | "issue" => text(&attrs["action"]),
        "note" => text(&attrs["noteable_type"]).map(|t| snake(&t)),
        "pipeline" => text(&attrs["status"]),
        "build" => text(&payload["build_status"]),
        _ => None,
    };
    let mut e = Event::new("gitlab", name, action, delivery, Default::default());
    let project = &payload["project"];
    e.repository = text(&project["path_with_namespace"]).map(|full_name| Repository {
        full_name,
        default_branch: text(&project["default_branch"]),
        id: project["id"].as_u64().or(payload["project_id"].as_u64()),
    });
    e.sender = text(&payload["user"]["username"]).map(|login| {
        let kind = if is_bot_username(&login) { "Bot" } else { "User" };
        Actor { login, kind: kind.to_string() }
    });
    let user_id = payload["user"]["id"].as_u64();
    match name {
        "merge_request" => {
            merge_request(&mut e, attrs);
            if user_id.is_some() && user_id == attrs["author_id"].as_u64() {
                e.author = e.sender.as_ref().map(|s| s.login.clone());
            }
        }
        "issue" => {
            e.subject = attrs["iid"].as_u64();
            e.title = text(&attrs["title"]);
            e.body = text(&attrs["description"]);
            e.url = text(&attrs["url"]);
            if user_id.is_some() && user_id == attrs["author_id"].as_u64() {
                e.author = e.sender.as_ref().map(|s| s.login.clone());
            }
        }
        "note" => {
            let author = text(&payload["user"]["username"]);
            e.comment = Some(Comment {
                id: attrs["id"].as_u64(),
                body: text(&attrs["note"]).unwrap_or_default(),
                author: author.clone(),
                // GitLab sends a note's edits as `action: update`.
                edited: attrs["action"].as_str() == Some("update"),
            });
            e.author = author;
            match e.action.as_deref() {
                Some("merge_request") => {
                    merge_request(&mut e, &payload["merge_request"]);
                    // The note's author is who the event is about, not the MR's.
                    e.author = e.comment.as_ref().and_then(|c| c.author.clone());
                }
                Some("issue") => {
                    let issue = &payload["issue"];
                    e.subject = issue["iid"].as_u64();
                    e.title = text(&issue["title"]);
                    e.body = text(&issue["description"]);
                    e.url = text(&issue["url"]);
                }
                Some("commit") => e.head_sha = text(&payload["commit"]["id"]).or_else(|| text(&attrs["commit_id"])),
                _ => {}
            }
        }
        "pipeline" => {
            e.head_sha = text(&attrs["sha"]);
            e.branch = text(&attrs["ref"]);
            e.conclusion = text(&attrs["status"]);
            e.ci_run = attrs["id"].as_u64();
            e.url = text(&attrs["url"]);
            let mr = &payload["merge_request"];
            if let Some(iid) = mr["iid"].as_u64() {
                e.subject = Some(iid);
                e.subject_is_pull_request = true;
                e.title = text(&mr["title"]);
                e.base_branch = text(&mr["target_branch"]);
                e.branch = text(&mr["source_branch"]).or(e.branch.take());
                e.head_in_repo = same_project(&mr["source_project_id"], &mr["target_project_id"]);
            } else {
                // A branch pipeline runs the project's own branch.
                e.head_in_repo = Some(attrs["source"].as_str() != Some("external_pull_request_event"));
            }
        }
        "build" => {
            e.head_sha = text(&payload["sha"]);
            e.branch = text(&payload["ref"]);
            e.conclusion = text(&payload["build_status"]);
            e.ci_run = payload["pipeline_id"].as_u64();
            e.head_in_repo = Some(true);
        }
        "push" | "tag_push" => {
            e.head_sha = text(&payload["checkout_sha"]).or_else(|| text(&payload["after"]));
            e.branch = text(&payload["ref"]).map(|r| r.strip_prefix("refs/heads/").unwrap_or(&r).to_string());
            e.head_in_repo = Some(true);
        }
        _ => {}
    }
    e.labels =
        payload["labels"].as_array().map(|l| l.iter().filter_map(|l| text(&l["title"])).collect()).unwrap_or_default();
    e.updated_at = text(&attrs["updated_at"]);
    e.payload = crate::event::generic::payload_of(body, payload);
    Ok(e)
}

/// A merge request's fields, from a Merge Request Hook's attributes or a
/// note's `merge_request`.
fn merge_request(e: &mut Event, mr: &Value) {
    e.subject = mr["iid"].as_u64();
    e.subject_is_pull_request = e.subject.is_some();
    e.title = text(&mr["title"]);
    e.body = text(&mr["description"]);
    e.url = text(&mr["url"]);
    e.branch = text(&mr["source_branch"]);
    e.base_branch = text(&mr["target_branch"]);
    e.head_sha = text(&mr["last_commit"]["id"]);
    e.draft = mr["draft"].as_bool().or(mr["work_in_progress"].as_bool());
    e.head_in_repo = same_project(&mr["source_project_id"], &mr["target_project_id"]);
    e.head_repo = text(&mr["source"]["path_with_namespace"]);
    // GitLab's "Allow commits from members who can merge to the target branch".
    e.maintainer_can_modify = mr["allow_collaboration"].as_bool().or(mr["allow_maintainer_to_push"].as_bool());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> Vec<u8> {
        let at = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gitlab").join(path);
        std::fs::read(at).unwrap()
    }

    #[test]
    fn a_merge_request_opening_is_a_change_request_with_its_head() {
        let e = normalize("merge_request", "gitlab:1", &fixture("merge_request/open.json")).unwrap();
        assert_eq!(e.kind, "merge_request.open");
        assert_eq!(e.source, "gitlab");
        assert!(e.subject_is_pull_request);
        assert_eq!(e.subject, Some(1));
        assert_eq!(e.branch.as_deref(), Some("ms-viewport"));
        assert_eq!(e.base_branch.as_deref(), Some("master"));
        assert_eq!(e.head_sha.as_deref(), Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7"));
        assert!(e.repository.is_some());
        assert!(author_id(&e).is_some());
    }

    #[test]
    fn notes_name_what_they_are_on() {
        for (file, kind, pr) in [
            ("note/merge_request.json", "note.merge_request", true),
            ("note/issue.json", "note.issue", false),
            ("note/commit.json", "note.commit", false),
        ] {
            let e = normalize("note", "gitlab:1", &fixture(file)).unwrap();
            assert_eq!(e.kind, kind, "{file}");
            assert_eq!(e.subject_is_pull_request, pr, "{file}");
            let c = e.comment.as_ref().unwrap();
            assert!(!c.body.is_empty() && c.id.is_some(), "{file}");
            assert_eq!(c.author.as_deref(), Some("root"), "{file}");
        }
        let commit = normalize("note", "gitlab:1", &fixture("note/commit.json")).unwrap();
        assert!(commit.head_sha.is_some() && commit.subject.is_none());
    }

    #[test]
    fn pipelines_and_jobs_carry_their_commit_and_status() {
        let p = normalize("pipeline", "gitlab:1", &fixture("pipeline/success.json")).unwrap();
        assert_eq!(p.kind, "pipeline.success");
        assert_eq!((p.subject, p.subject_is_pull_request), (Some(1), true));
        assert_eq!(p.head_in_repo, Some(true));
        assert!(p.head_sha.is_some());
        assert_eq!(author_id(&p), None, "a pipeline is trusted by its head, not its user");
        let j = normalize("build", "gitlab:2", &fixture("job/created.json")).unwrap();
        assert_eq!(j.kind, "build.created", "a Job Hook is a build: job.* is baton's own");
        let i = normalize("issue", "gitlab:3", &fixture("issue/open.json")).unwrap();
        assert_eq!((i.kind.as_str(), i.subject_is_pull_request), ("issue.open", false));
        assert!(i.title.is_some());
    }

    #[test]
    fn an_edited_note_says_so() {
        let mut v: Value = serde_json::from_slice(&fixture("note/issue.json")).unwrap();
        let first = normalize("note", "d", &serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(!first.comment.unwrap().edited);
        v["object_attributes"]["action"] = "update".into();
        let edit = normalize("note", "d", &serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(edit.comment.unwrap().edited);
    }

    #[test]
    fn odd_payloads_are_read_as_far_as_they_go() {
        assert!(normalize("note", "d", b"[1]").is_err());
        assert!(normalize("note", "d", b"nope").is_err());
        let e = normalize("merge_request", "d", br#"{"object_attributes": {"iid": "x", "action": 7}, "project": 3}"#)
            .unwrap();
        assert_eq!((e.kind.as_str(), e.subject), ("merge_request", None));
    }

    #[test]
    fn token_bots_are_told_by_their_names() {
        assert!(is_bot_username("project_42_bot_0a1b2c"));
        assert!(is_bot_username("group_7_bot"));
        assert!(!is_bot_username("projectile"));
        assert!(!is_bot_username("project_x_bot"));
    }
}
