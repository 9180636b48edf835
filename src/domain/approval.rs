//! Approval: jobs from people a trigger does not trust wait on their issue
//! or PR until someone trusted says `/baton approve`. For a PR, only what was
//! held at its current head is released: a later push needs a new approval.

use chrono::{DateTime, Utc};

use super::dispatch::QueueEntry;
use super::{job_id, Approval, Job, Plan, Write};
use crate::rules::JobSpec;

/// Held jobs per issue or PR, at most (oldest go first).
pub const MAX_PENDING: usize = 20;

/// A job held until a trusted person approves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub delivery: String,
    pub held_at: DateTime<Utc>,
    pub spec: JobSpec,
    /// A hash of the or PR's title and body when the match was
    /// held: its prompt was rendered from that text.
    #[serde(default)]
    pub text: Option<String>,
}

impl Pending {
    /// Whether an approval may release this held job: not when the issue's
    /// or PR's text (`current`) differs from what the prompt was made of,
    /// unless the approver said `--edited` after reading it.
    pub fn approvable(&self, current: Option<&str>, edited_ok: bool) -> bool {
        match (&self.text, current) {
            (Some(then), Some(now)) => then == now || edited_ok,
            _ => true,
        }
    }

    /// Held at the PR's current head (or not about a PR head at all).
    pub fn at_head(&self, head: Option<&str>) -> bool {
        !self.spec.subject_is_pull_request || self.spec.head_sha.is_none() || self.spec.head_sha.as_deref() == head
    }
}

/// What an approval on `subject` does to the jobs `held` there: each one
/// `may_approve` accepts, held at `head`, becomes a queued job (unless its
/// id exists, per `exists`), one sequence number from `seqs` each; holds
/// for an older head are dropped; the rest stay held. Returns the new job
/// ids and the plan.
#[allow(clippy::too_many_arguments)]
pub fn approve(
    subject: &str,
    held: &[Pending],
    head: Option<&str>,
    approval: &Approval,
    may_approve: impl Fn(&Pending) -> bool,
    exists: impl Fn(&str) -> bool,
    mut seqs: impl FnMut() -> u64,
    now: DateTime<Utc>,
) -> (Vec<String>, Plan) {
    let mut keep = Vec::new();
    let mut started = Vec::new();
    let mut plan = Plan::new();
    for p in held {
        if !p.at_head(head) {
            continue; // held for an older head: gone with the push
        }
        if !may_approve(p) {
            keep.push(p.clone());
            continue;
        }
        let id = job_id(&p.delivery, &p.spec.trigger);
        if exists(&id) || started.contains(&id) {
            continue;
        }
        let mut job = Job::new(id.clone(), seqs(), p.delivery.clone(), p.spec.clone(), now);
        job.approved = Some(approval.clone());
        plan.push(Write::Enqueue(QueueEntry::of(&job)));
        plan.push(Write::Job { job: Box::new(job), new: true });
        started.push(id);
    }
    plan.push(Write::Held { subject: subject.to_string(), list: keep });
    (started, plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::render;

    fn held(delivery: &str, head: Option<&str>, text: Option<&str>) -> Pending {
        Pending {
            delivery: delivery.into(),
            held_at: Utc::now(),
            spec: JobSpec {
                trigger: "t".into(),
                subject_is_pull_request: head.is_some(),
                head_sha: head.map(str::to_string),
                ..JobSpec::default()
            },
            text: text.map(str::to_string),
        }
    }

    #[test]
    fn an_approval_releases_a_held_job_only_for_the_text_it_was_held_with() {
        // (text when held, text now, `--edited`) → released?
        let check = |then: Option<&str>, now: Option<&str>, edited: bool, expect: bool| {
            assert_eq!(held("d", None, then).approvable(now, edited), expect, "{then:?} → {now:?}, --edited {edited}");
        };
        check(Some("a"), Some("a"), false, true);
        check(Some("a"), Some("b"), false, false);
        check(Some("a"), Some("b"), true, true);
        check(None, Some("b"), false, true); // held before texts were kept
        check(Some("a"), None, false, true); // the approval shows no text
    }

    #[test]
    fn only_holds_at_the_current_head_are_released() {
        let check = |list: Vec<Pending>, head: Option<&str>, expect: &str| {
            let approval = Approval { by: "maintainer".into(), at: Utc::now() };
            let mut seq = 10;
            let (_, plan) = approve(
                "o/r#1",
                &list,
                head,
                &approval,
                |p| p.text.as_deref() != Some("edited"),
                |id| id == job_id("old", "t"),
                || {
                    seq += 1;
                    seq
                },
                Utc::now(),
            );
            assert_eq!(render(&plan).trim(), expect.trim());
        };
        let (a, b) = (job_id("d1", "t"), job_id("d2", "t"));
        check(
            vec![held("d1", Some("new"), None), held("d2", Some("old-head"), None)],
            Some("new"),
            &format!("enqueue {a}\njob {a} queued new\nheld o/r#1 n=0"),
        );
        check(
            vec![held("d1", None, None), held("d2", None, Some("edited"))],
            None,
            &format!("enqueue {a}\njob {a} queued new\nheld o/r#1 n=1"),
        );
        let _ = b;
        // A job that already exists is not made twice.
        check(vec![held("old", None, None)], None, "held o/r#1 n=0");
    }
}
