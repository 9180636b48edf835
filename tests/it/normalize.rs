//! Every recorded GitHub payload through the normalizer, table-driven.

use baton::forge::github::normalize;
use serde_json::Value;

use crate::harness::fixture;

struct Want {
    file: &'static str,
    kind: &'static str,
    subject: Option<u64>,
    association: Option<&'static str>,
    head_sha: Option<&'static str>,
    branch: Option<&'static str>,
    conclusion: Option<&'static str>,
}

fn check(w: &Want) {
    let name = w.file.split('/').next().unwrap();
    let e = normalize(name, "d", &fixture(w.file)).unwrap_or_else(|err| panic!("{}: {err}", w.file));
    assert_eq!(e.kind, w.kind, "{}", w.file);
    assert_eq!(e.subject, w.subject, "{} subject", w.file);
    assert_eq!(e.association.as_deref(), w.association, "{} association", w.file);
    assert_eq!(e.head_sha.as_deref(), w.head_sha, "{} head_sha", w.file);
    assert_eq!(e.branch.as_deref(), w.branch, "{} branch", w.file);
    assert_eq!(e.conclusion.as_deref(), w.conclusion, "{} conclusion", w.file);
}

#[test]
fn recorded_payloads_normalize_to_the_expected_fields() {
    let table = [
        Want {
            file: "issues/opened.payload.json",
            kind: "issues.opened",
            subject: Some(1),
            association: Some("OWNER"),
            head_sha: None,
            branch: None,
            conclusion: None,
        },
        Want {
            file: "issue_comment/created.payload.json",
            kind: "issue_comment.created",
            subject: Some(1),
            association: Some("OWNER"),
            head_sha: None,
            branch: None,
            conclusion: None,
        },
        Want {
            file: "pull_request/opened.payload.json",
            kind: "pull_request.opened",
            subject: Some(2),
            association: Some("OWNER"),
            head_sha: Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821"),
            branch: Some("changes"),
            conclusion: None,
        },
        Want {
            file: "check_run/completed.1.payload.json",
            kind: "check_run.completed",
            subject: Some(2),
            association: None,
            head_sha: Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821"),
            branch: Some("changes"),
            conclusion: Some("failure"),
        },
        Want {
            file: "workflow_run/completed.payload.json",
            kind: "workflow_run.completed",
            subject: None,
            association: None,
            head_sha: Some("3484a3fb816e0859fd6e1cea078d76385ff50625"),
            branch: Some("master"),
            conclusion: Some("success"),
        },
        Want {
            file: "status/payload.json",
            kind: "status",
            subject: None,
            association: None,
            head_sha: Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246"),
            branch: Some("master"),
            conclusion: Some("success"),
        },
        Want {
            file: "push/payload.json",
            kind: "push",
            subject: None,
            association: None,
            head_sha: None,
            branch: None,
            conclusion: None,
        },
    ];
    for w in &table {
        check(w);
    }
}

#[test]
fn every_fixture_normalizes_with_its_repository_and_sender() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/github");
    let mut count = 0;
    for dir in std::fs::read_dir(&root).unwrap().flatten().filter(|d| d.path().is_dir()) {
        let name = dir.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let body = std::fs::read(file.path()).unwrap();
            let raw: Value = serde_json::from_slice(&body).unwrap();
            let e = normalize(&name, "d", &body).unwrap_or_else(|err| panic!("{}: {err}", file.path().display()));
            let action = raw["action"].as_str();
            let want_kind = match action {
                Some(a) => format!("{name}.{a}"),
                None => name.clone(),
            };
            assert_eq!(e.kind, want_kind, "{}", file.path().display());
            assert_eq!(e.repo_name(), raw["repository"]["full_name"].as_str(), "{}", file.path().display());
            assert_eq!(e.sender.as_ref().map(|s| s.login.as_str()), raw["sender"]["login"].as_str());
            count += 1;
        }
    }
    assert!(count >= 70, "expected the whole fixture set, saw {count}");
}

#[test]
fn installation_labels_branches_and_sender_are_read() {
    let e = normalize("pull_request", "d", &fixture("pull_request/opened.payload.json")).unwrap();
    assert_eq!(e.access, Some(1));
    assert_eq!(e.labels, vec!["bug".to_string()]);
    assert_eq!(e.base_branch.as_deref(), Some("master"));
    assert_eq!(e.repository.as_ref().unwrap().default_branch.as_deref(), Some("master"));
    assert_eq!(e.head_in_repo, Some(true));
    assert_eq!(e.draft, Some(false));
    let sender = e.sender.unwrap();
    assert_eq!((sender.login.as_str(), sender.kind.as_str()), ("Codertocat", "User"));

    let e = normalize("pull_request_review", "d", &fixture("pull_request_review/submitted.payload.json")).unwrap();
    assert_eq!((e.subject, e.subject_is_pull_request), (Some(2), true));
    assert!(e.comment.is_some(), "a review's body is its comment");

    let e = normalize("installation", "d", &fixture("installation/created.payload.json")).unwrap();
    assert_eq!(e.access, Some(957387));
    assert_eq!(e.kind, "installation.created");

    let e = normalize("workflow_job", "d", &fixture("workflow_job/queued.payload.json")).unwrap();
    assert_eq!(e.access, Some(3456996));
    assert!(e.head_sha.is_some());

    let e = normalize("repository_dispatch", "d", &fixture("repository_dispatch/payload.json")).unwrap();
    assert_eq!(e.access, Some(375706));

    let e = normalize("issue_comment", "d", &fixture("issue_comment/created.payload.json")).unwrap();
    let comment = e.comment.unwrap();
    assert!(!comment.body.is_empty());
    assert_eq!(comment.author.as_deref(), Some("Codertocat"));
}
