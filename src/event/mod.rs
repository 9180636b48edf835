//! The normalized `Event`: one shape for everything that can start a job —
//! a GitHub webhook, a generic webhook, a schedule, or a job that finished.
//!
//! Rules match on `Event` fields and render prompts over `Event::context`;
//! nothing downstream of ingress looks at HTTP or at a source's own format.

pub mod generic;
mod payload;

pub use payload::Payload;

use serde::Serialize;

/// Why a payload could not be normalized.
#[derive(Debug, thiserror::Error)]
pub enum NormalizeError {
    #[error("payload is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("payload must be a JSON object")]
    NotAnObject,
}

/// Starts the hidden marker in every body baton posts (`<!-- baton:job=ID -->`):
/// it names the job, and keeps baton's own comments from triggering jobs.
pub(crate) const MARKER_PREFIX: &str = "<!-- baton:";

/// A repository an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Repository {
    /// `owner/name`
    pub full_name: String,
    pub default_branch: Option<String>,
    pub id: Option<u64>,
}

/// `owner/name` split in two, when both are names GitHub allows (letters,
/// digits, `-`, `_`, `.`; never `.` or `..`): what may become a path or URL.
pub(crate) fn split_repo_name(repo: &str) -> Option<(&str, &str)> {
    let ok = |s: &str| {
        !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    repo.split_once('/').filter(|(o, n)| ok(o) && ok(n))
}

/// A GitLab project path (`group/sub/project`): at least two segments,
/// each of the characters GitLab allows (letters, digits, `-`, `_`, `.`;
/// never `.` or `..`), and at most 20 deep. Returns the segments.
pub(crate) fn split_project_path(path: &str) -> Option<Vec<&str>> {
    let ok = |s: &str| {
        !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let parts: Vec<&str> = path.split('/').collect();
    (parts.len() >= 2 && parts.len() <= 20 && parts.iter().all(|p| ok(p))).then_some(parts)
}

impl Repository {
    pub fn owner(&self) -> &str {
        self.full_name.split_once('/').map(|(o, _)| o).unwrap_or(&self.full_name)
    }

    pub fn name(&self) -> &str {
        self.full_name.split_once('/').map(|(_, n)| n).unwrap_or("")
    }
}

/// Who caused the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Actor {
    pub login: String,
    /// GitHub's account type: `User`, `Bot`, `Organization`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl Actor {
    pub(crate) fn is_bot(&self) -> bool {
        self.kind.eq_ignore_ascii_case("bot") || self.login.ends_with("[bot]")
    }
}

/// A comment that came with the event (issue, PR or review comment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Comment {
    pub id: Option<u64>,
    pub body: String,
    pub author: Option<String>,
    /// An edit of a comment made before: its command already ran once.
    #[serde(skip)]
    pub edited: bool,
}

/// The review thread a review comment belongs to: where it is in the diff,
/// and the conversation so far (what baton has seen of it, oldest first,
/// ending with this comment).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Thread {
    /// The thread's first comment: replies go to it.
    pub root: u64,
    pub path: String,
    pub line: Option<u64>,
    pub side: Option<String>,
    pub diff_hunk: String,
    pub comments: Vec<ThreadComment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ThreadComment {
    pub id: u64,
    pub author: String,
    /// The author's standing in the repository as the forge reports it
    /// (owner, member, …): a template can leave out what people the trigger
    /// does not trust wrote.
    #[serde(default)]
    pub association: String,
    pub body: String,
}

/// The job whose end an event reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentJob {
    pub id: String,
    pub trigger: String,
    /// How many job ends led to this one (0 for a job started from outside).
    pub depth: u32,
    /// The forge the job's repository is on (`github`, `gitlab`; empty
    /// when not known, which is GitHub).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub forge: String,
}

/// One thing that happened, normalized.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `github`, or the name of a generic source.
    pub source: String,
    /// The event's type, as its forge or source names it (e.g. `issues`).
    pub name: String,
    pub action: Option<String>,
    /// `name.action`, or `name` when there is no action: what `on` lists.
    pub kind: String,
    pub delivery: String,
    pub repository: Option<Repository>,
    /// Which of the forge's credentials act for this event (a GitHub App's
    /// install id), handed back to the forge for tokens. Templates and
    /// stored records keep the name they had before the forge seam.
    #[serde(rename = "installation")]
    pub access: Option<u64>,
    pub sender: Option<Actor>,
    /// The issue or pull request the event is about.
    pub subject: Option<u64>,
    /// Whether `subject` is a pull request.
    pub subject_is_pull_request: bool,
    /// The subject's title, text and web page, as the forge shows them.
    /// Templates read them as `subject.*`; `event` leaves them out, so it
    /// renders as it did before they existed.
    #[serde(skip)]
    pub title: Option<String>,
    #[serde(skip)]
    pub body: Option<String>,
    #[serde(skip)]
    pub url: Option<String>,
    /// The standing of the person the event is about, as the forge reports
    /// it (on GitHub their association: `OWNER`, `MEMBER`, …).
    pub association: Option<String>,
    /// The login of that person: who opened the issue or pull request, or
    /// wrote the comment or review. What baton posts may still mention
    /// them (`publish::defuse`).
    pub author: Option<String>,
    pub labels: Vec<String>,
    /// Head branch of a PR, or the branch of a check, workflow or push.
    pub branch: Option<String>,
    /// Base branch of a pull request.
    pub base_branch: Option<String>,
    pub head_sha: Option<String>,
    /// Base commit of a pull request (shown as `subject.base.sha`).
    #[serde(skip)]
    pub base_sha: Option<String>,
    /// Whether the head commit lives in the repository itself (not a fork);
    /// `None` when the payload does not say.
    pub head_in_repo: Option<bool>,
    /// The repository a pull request's head branch lives in (`owner/name`;
    /// a fork's, for a PR from a fork).
    pub(crate) head_repo: Option<String>,
    /// Whether a pull request from a fork lets the base repository's
    /// maintainers push to its branch.
    pub maintainer_can_modify: Option<bool>,
    /// `head_sha` is what baton had noted of a pull request when a comment
    /// on it arrived: a job it starts must run at exactly that commit.
    pub(crate) head_pinned: bool,
    pub conclusion: Option<String>,
    /// The CI run a check event reports, by the forge's id (GitLab's
    /// pipeline): a repair reads its failed jobs' logs.
    #[serde(skip)]
    pub ci_run: Option<u64>,
    pub draft: Option<bool>,
    pub comment: Option<Comment>,
    /// For a review comment: its thread.
    pub thread: Option<Thread>,
    /// For a pull request: the head each review trigger reviewed last
    /// (trigger name → sha), as baton noted it.
    #[serde(skip)]
    pub reviewed: std::collections::BTreeMap<String, String>,
    /// For `job.succeeded` / `job.failed`: the job that ended.
    pub parent: Option<ParentJob>,
    /// When the forge last changed a pull or merge request (as the payload
    /// has it): a head is moved only by a newer one.
    #[serde(skip)]
    pub updated_at: Option<String>,
    /// The payload as received, for templates.
    #[serde(skip)]
    pub payload: Payload,
}

impl Event {
    /// A hash of the title and body of the issue or pull request the event
    /// is about, as the payload has them now (`None` when it has neither).
    pub(crate) fn subject_text(&self) -> Option<String> {
        use sha2::Digest as _;
        let payload = self.payload.value();
        let subject = [&payload["pull_request"], &payload["issue"]].into_iter().find(|v| v.is_object())?;
        let mut h = sha2::Sha256::new();
        h.update(subject["title"].as_str().unwrap_or_default().as_bytes());
        h.update([0]);
        h.update(subject["body"].as_str().unwrap_or_default().as_bytes());
        Some(hex::encode(&h.finalize()[..16]))
    }

    /// An event with its identity and payload only; normalizers fill in the rest.
    pub fn new(source: &str, name: &str, action: Option<String>, delivery: &str, payload: Payload) -> Event {
        Event {
            source: source.to_string(),
            name: name.to_string(),
            kind: kind_of(name, action.as_deref()),
            action,
            delivery: delivery.to_string(),
            repository: None,
            access: None,
            sender: None,
            subject: None,
            subject_is_pull_request: false,
            title: None,
            body: None,
            url: None,
            association: None,
            author: None,
            labels: Vec::new(),
            branch: None,
            base_branch: None,
            head_sha: None,
            base_sha: None,
            head_in_repo: None,
            head_repo: None,
            maintainer_can_modify: None,
            head_pinned: false,
            conclusion: None,
            ci_run: None,
            draft: None,
            comment: None,
            thread: None,
            reviewed: Default::default(),
            parent: None,
            updated_at: None,
            payload,
        }
    }

    pub fn repo_name(&self) -> Option<&str> {
        self.repository.as_ref().map(|r| r.full_name.as_str())
    }
}

/// `name.action` or `name`.
pub(crate) fn kind_of(name: &str, action: Option<&str>) -> String {
    match action {
        Some(a) if !a.is_empty() => format!("{name}.{a}"),
        _ => name.to_string(),
    }
}
