//! Approval: jobs from people a trigger does not trust wait on their issue
//! or PR until someone trusted says `/baton approve`. For a PR, only what was
//! held at its current head is released: a later push needs a new approval.

use chrono::{DateTime, Utc};

use super::dispatch::QueueEntry;
use super::{job_id, Approval, Job, JobState, Plan, Write};
use crate::rules::JobSpec;

/// Held jobs per issue or PR, at most (oldest go first).
pub(crate) const MAX_PENDING: usize = 20;

/// A job held until a trusted person approves it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Held {
    pub delivery: String,
    pub(crate) held_at: DateTime<Utc>,
    pub spec: JobSpec,
    /// A hash of the issue's or PR's title and body when the match was
    /// held: its prompt was rendered from that text.
    #[serde(default)]
    pub text: Option<String>,
}

impl Held {
    /// Whether an approval may release this held job: not when the issue's
    /// or PR's text (`current`) differs from what the prompt was made of,
    /// unless the approver said `--edited` after reading it.
    pub(crate) fn approvable(&self, current: Option<&str>, edited_ok: bool) -> bool {
        match (&self.text, current) {
            (Some(then), Some(now)) => then == now || edited_ok,
            _ => true,
        }
    }

    /// Held at the PR's current head (or not about a PR head at all).
    pub(crate) fn at_head(&self, head: Option<&str>) -> bool {
        !self.spec.subject_is_pull_request || self.spec.head_sha.is_none() || self.spec.head_sha.as_deref() == head
    }
}

/// A `/baton approve` comment, as the forge reported it: the facts the
/// trust rule reads, and nothing else.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Request<'a> {
    /// Who sent the event, and whether the forge calls them a bot.
    pub sender: Option<&'a str>,
    pub(crate) sender_is_bot: bool,
    /// The comment's author, as the comment names them.
    pub author: Option<&'a str>,
    pub body: &'a str,
    /// The author's standing in the repository (`OWNER`, `MEMBER`, …).
    pub association: Option<&'a str>,
}

/// Why a request approves nothing at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ignored {
    /// baton itself or a bot: an injected agent's result could start with
    /// the command, so neither ever approves.
    Bot,
    /// The comment carries baton's marker: it is (or copies) baton's post.
    Marker,
    /// The forge said nothing about the author's standing.
    NoAssociation,
}

/// Whether `req` may approve anything, and with which standing: never
/// baton's own words (`bot_login`) nor a bot's, never a comment carrying
/// baton's `marker`, never an author of unknown standing.
pub(crate) fn requester<'a>(req: &Request<'a>, bot_login: &str, marker: &str) -> Result<&'a str, Ignored> {
    let bot = |login: &str| login == bot_login || login.ends_with("[bot]");
    if req.sender_is_bot || req.sender.is_some_and(bot) || req.author.is_some_and(bot) {
        return Err(Ignored::Bot);
    }
    if req.body.contains(marker) {
        return Err(Ignored::Marker);
    }
    req.association.ok_or(Ignored::NoAssociation)
}

/// What an approval by someone of standing `association` does to one held
/// job, given the authors its trigger trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Released,
    /// The approver is not someone the held job's trigger trusts.
    Untrusted,
    /// The issue's or PR's text changed since the hold, and the approver
    /// did not say `--edited`.
    Edited,
}

/// The trust rule for one held job: the approver's standing is among the
/// trigger's `trusted` authors, and the text is what was held (or the
/// approver said `--edited`).
pub fn release(held: &Held, trusted: &[String], association: &str, current: Option<&str>, edited_ok: bool) -> Release {
    if !trusted.iter().any(|a| a == association) {
        Release::Untrusted
    } else if !held.approvable(current, edited_ok) {
        Release::Edited
    } else {
        Release::Released
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
    held: &[Held],
    head: Option<&str>,
    approval: &Approval,
    may_approve: impl Fn(&Held) -> bool,
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

/// What expiring the holds on `subject` older than `cutoff` writes: the
/// rest stay held, and the expired ones become one cancelled job (the
/// first's id, its output a comment on the subject), so the issue or pull
/// request is told once however many expired. The plan is empty when none
/// expired; no job is made when its id exists already.
pub fn expire(
    subject: &str,
    held: &[Held],
    cutoff: DateTime<Utc>,
    held_for: &str,
    exists: impl Fn(&str) -> bool,
    seq: u64,
    now: DateTime<Utc>,
) -> (Plan, Option<Job>) {
    let (expired, keep): (Vec<&Held>, Vec<&Held>) = held.iter().partition(|p| p.held_at < cutoff);
    let Some(first) = expired.first() else { return (Plan::new(), None) };
    let mut plan = vec![Write::Held { subject: subject.to_string(), list: keep.into_iter().cloned().collect() }];
    let id = job_id(&first.delivery, &first.spec.trigger);
    if exists(&id) {
        return (plan, None);
    }
    let mut triggers: Vec<String> = expired.iter().map(|p| format!("`{}`", p.spec.trigger)).collect();
    triggers.sort();
    triggers.dedup();
    let what = match expired.len() {
        1 => format!("The job trigger {} held here", triggers.join(", ")),
        n => format!("The {n} jobs held here (triggers {})", triggers.join(", ")),
    };
    let why = format!(
        "{what} waited since {} for a trusted person's `/baton approve` and expired after limits.held_for \
         ({held_for}). Nothing ran; a new event can hold it again.",
        first.held_at.format("%Y-%m-%d %H:%M UTC")
    );
    let spec = JobSpec { output: crate::rules::OutputKind::Comment, ..first.spec.clone() };
    let mut job = Job::new(id, seq, first.delivery.clone(), spec, now);
    job.end(JobState::Cancelled, None, Some(why), now);
    plan.push(Write::Job { job: Box::new(job.clone()), new: true });
    (plan, Some(job))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::render;

    fn held(delivery: &str, head: Option<&str>, text: Option<&str>) -> Held {
        Held {
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
    fn holds_past_their_time_expire_into_one_cancelled_job_and_the_rest_stay() {
        let now = Utc::now();
        let at = |delivery: &str, trigger: &str, age: i64| Held {
            held_at: now - chrono::Duration::seconds(age),
            spec: JobSpec { trigger: trigger.into(), repo: Some("o/r".into()), subject: Some(1), ..JobSpec::default() },
            ..held(delivery, None, None)
        };
        let list = vec![at("old", "a", 100), at("older", "b", 200), at("new", "a", 5)];
        let cutoff = now - chrono::Duration::seconds(60);
        let (plan, job) = expire("o/r#1", &list, cutoff, "1m", |_| false, 7, now);
        let job = job.expect("one job tells the subject");
        assert_eq!((job.id.as_str(), job.seq, job.state), (job_id("old", "a").as_str(), 7, JobState::Cancelled));
        assert_eq!(job.spec.output, crate::rules::OutputKind::Comment);
        let why = job.error.clone().unwrap_or_default();
        assert!(why.starts_with("The 2 jobs held here (triggers `a`, `b`) waited since "), "{why}");
        assert!(why.contains("expired after limits.held_for (1m)"), "{why}");
        match &plan[0] {
            Write::Held { list, .. } => {
                assert_eq!(list.iter().map(|h| h.delivery.as_str()).collect::<Vec<_>>(), ["new"])
            }
            other => panic!("{other:?}"),
        }
        // Its job exists already (told before): the holds go, nothing is told.
        let (plan, job) = expire("o/r#1", &list, cutoff, "1m", |_| true, 7, now);
        assert!(job.is_none() && plan.len() == 1, "{plan:?}");
        // Nothing old enough: nothing written.
        let (plan, job) = expire("o/r#1", &list[2..], cutoff, "1m", |_| false, 7, now);
        assert!(job.is_none() && plan.is_empty());
    }

    #[test]
    fn only_holds_at_the_current_head_are_released() {
        let check = |list: Vec<Held>, head: Option<&str>, expect: &str| {
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
    #[test]
    fn bots_baton_and_its_marker_never_approve() {
        // (sender, sender is a bot, author, body, association) → requester
        let check = |sender: Option<&str>,
                     is_bot: bool,
                     author: Option<&str>,
                     body: &str,
                     assoc: Option<&str>,
                     expect: Result<&str, Ignored>| {
            let req = Request { sender, sender_is_bot: is_bot, author, body, association: assoc };
            assert_eq!(requester(&req, "baton-app[bot]", "<!-- baton:"), expect, "{req:?}");
        };
        check(Some("alice"), false, Some("alice"), "/baton approve", Some("OWNER"), Ok("OWNER"));
        check(Some("ci"), true, Some("ci"), "/baton approve", Some("OWNER"), Err(Ignored::Bot));
        check(Some("alice"), false, Some("renovate[bot]"), "/baton approve", Some("MEMBER"), Err(Ignored::Bot));
        check(Some("baton-app[bot]"), false, None, "/baton approve", Some("OWNER"), Err(Ignored::Bot));
        check(Some("alice"), false, Some("baton-app[bot]"), "/baton approve", Some("OWNER"), Err(Ignored::Bot));
        check(
            Some("alice"),
            false,
            Some("alice"),
            "/baton approve\n<!-- baton:job -->",
            Some("OWNER"),
            Err(Ignored::Marker),
        );
        check(Some("alice"), false, Some("alice"), "/baton approve", None, Err(Ignored::NoAssociation));
    }

    #[test]
    fn a_held_job_is_released_by_whom_its_trigger_trusts_at_the_text_it_was_held_with() {
        let trusted = ["OWNER".to_string(), "MEMBER".to_string()];
        // (standing, text held, text now, --edited) → release
        let check = |assoc: &str, then: Option<&str>, now: Option<&str>, edited: bool, expect: Release| {
            assert_eq!(
                release(&held("d", None, then), &trusted, assoc, now, edited),
                expect,
                "{assoc} {then:?}→{now:?} {edited}"
            );
        };
        check("OWNER", Some("a"), Some("a"), false, Release::Released);
        check("MEMBER", Some("a"), Some("a"), false, Release::Released);
        check("CONTRIBUTOR", Some("a"), Some("a"), false, Release::Untrusted);
        check("NONE", Some("a"), Some("b"), true, Release::Untrusted);
        check("OWNER", Some("a"), Some("b"), false, Release::Edited);
        check("OWNER", Some("a"), Some("b"), true, Release::Released);
    }
}
