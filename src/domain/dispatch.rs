//! Dispatch: which queued job runs next within the limits, what claiming
//! it writes, and what a job's end (or its interruption) writes: the group
//! it frees, the queue it may go back to, its publications.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::admission::GroupState;
use super::{Job, JobState, Outcome, Plan, Publication, PublicationState, Purpose, Target, Write};

/// A job interrupted by this many daemon restarts (or lapsed leases) fails.
pub(crate) const MAX_INTERRUPTIONS: u32 = 3;

/// A queued job, as the dispatcher sees it without loading the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub priority: i8,
    /// Arrival order within a priority.
    pub seq: u64,
    pub id: String,
    pub agent: String,
    pub repo: Option<String>,
}

impl QueueEntry {
    pub fn of(job: &Job) -> QueueEntry {
        QueueEntry {
            priority: job.spec.priority,
            seq: job.seq,
            id: job.id.clone(),
            agent: job.spec.agent.clone(),
            repo: job.repo.clone(),
        }
    }

    /// Queue order: highest priority first, then first come.
    pub fn order(&self) -> (i16, u64) {
        (-i16::from(self.priority), self.seq)
    }
}

/// The limits a claim must keep.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Jobs this replica runs at once (`limits.max_parallel_jobs`).
    pub per_replica: usize,
    /// Jobs of one repository running at once, on all replicas.
    pub per_repo: usize,
    /// Agents' `max_parallel`, on all replicas.
    pub per_agent: HashMap<String, usize>,
}

/// What runs now: on this replica (`local`), and by repository and agent on
/// all of them.
#[derive(Debug, Clone, Default)]
pub struct Load {
    pub local: usize,
    pub per_repo: HashMap<String, usize>,
    pub per_agent: HashMap<String, usize>,
}

impl Load {
    /// Counts one more running job.
    pub fn add(&mut self, entry: &QueueEntry, local: bool) {
        if local {
            self.local += 1;
        }
        if let Some(repo) = &entry.repo {
            *self.per_repo.entry(repo.clone()).or_default() += 1;
        }
        *self.per_agent.entry(entry.agent.clone()).or_default() += 1;
    }

    /// Whether this replica may take another job at all.
    pub(crate) fn has_room(&self, limits: &Limits) -> bool {
        self.local < limits.per_replica
    }

    /// Whether `repo` is at its limit (its whole line is passed over).
    pub(crate) fn repo_full(&self, limits: &Limits, repo: Option<&str>) -> bool {
        repo.is_some_and(|r| self.per_repo.get(r).copied().unwrap_or(0) >= limits.per_repo)
    }

    /// Whether `entry` may start now as far as the limits go.
    pub(crate) fn admits(&self, limits: &Limits, entry: &QueueEntry) -> bool {
        self.has_room(limits)
            && !self.repo_full(limits, entry.repo.as_deref())
            && limits
                .per_agent
                .get(&entry.agent)
                .is_none_or(|cap| self.per_agent.get(&entry.agent).copied().unwrap_or(0) < *cap)
    }
}

/// What claiming a queue entry comes to.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// It runs: the job as started, and the writes.
    Run(Box<Job>, Plan),
    /// It waits, still queued, for its concurrency group.
    Wait,
    /// It is no longer queued (cancelled or claimed since): drop the entry.
    Stale(Plan),
}

/// Claims `entry`, whose stored job is `job`, with its group's state.
pub fn claim(entry: &QueueEntry, job: Option<&Job>, group: Option<&GroupState>, now: DateTime<Utc>) -> Claim {
    let Some(job) = job.filter(|j| j.state == JobState::Queued) else {
        return Claim::Stale(vec![Write::Dequeue(entry.clone())]);
    };
    let mut plan = Plan::new();
    if let Some(name) = &job.spec.concurrency {
        let mut st = group.cloned().unwrap_or_default();
        if st.running.as_ref().is_some_and(|r| r != &job.id) {
            return Claim::Wait;
        }
        st.running = Some(job.id.clone());
        st.waiting.retain(|(w, _)| w != &job.id);
        plan.push(Write::Group { name: name.clone(), state: st });
    }
    let mut job = job.clone();
    job.start_attempt(now);
    plan.push(Write::Dequeue(entry.clone()));
    plan.push(Write::Job { job: Box::new(job.clone()), new: false });
    plan.push(Write::Lease(job.id.clone()));
    Claim::Run(Box::new(job), plan)
}

/// `job` as its worker has it, with what the publisher wrote on the stored
/// record since (the status comment, the check run, what was created, the
/// publication's outcome): the two write one record, and neither may undo
/// the other.
pub fn merged(job: &Job, stored: Option<&Job>) -> Job {
    let mut merged = job.clone();
    if let Some(stored) = stored {
        let (p, s) = (&mut merged.progress, &stored.progress);
        p.started |= s.started;
        p.status_comment = p.status_comment.or(s.status_comment);
        p.check_run = p.check_run.or(s.check_run);
        p.comments = p.comments.max(s.comments);
        p.pull_requests = p.pull_requests.max(s.pull_requests);
        if merged.publication.is_none() {
            merged.publication = stored.publication.clone();
        }
    }
    merged
}

/// What storing a job's end (or its return to the queue) writes: the job,
/// its lease given up, its group freed (a requeued job goes back to the
/// front of the line it was first in), the end marked for chaining, and its
/// publications.
pub fn finish(job: &Job, stored: Option<&Job>, group: Option<&GroupState>, publications: &[Publication]) -> Plan {
    let requeue = job.state == JobState::Queued;
    let mut plan = vec![Write::Job { job: Box::new(merged(job, stored)), new: false }];
    if matches!(job.state, JobState::Succeeded | JobState::Failed) {
        plan.push(Write::End(job.id.clone()));
    }
    if job.state != JobState::Running {
        plan.push(Write::Unlease(job.id.clone()));
    }
    if requeue {
        plan.push(Write::Enqueue(QueueEntry::of(job)));
    }
    if let Some(name) = &job.spec.concurrency {
        let mut st = group.cloned().unwrap_or_default();
        if st.running.as_deref() == Some(job.id.as_str()) {
            st.running = None;
        }
        if requeue && !st.waiting.iter().any(|(w, _)| w == &job.id) {
            st.waiting.insert(0, (job.id.clone(), job.seq));
        }
        plan.push(Write::Group { name: name.clone(), state: st });
    }
    plan.extend(publications.iter().map(|p| Write::Outbox(Box::new(p.clone()))));
    plan
}

/// Cancelling a queued job: it leaves the queue and its group's line.
pub fn cancel(job: &Job, group: Option<&GroupState>, reason: &str, now: DateTime<Utc>) -> (Job, Plan) {
    let mut plan = vec![Write::Dequeue(QueueEntry::of(job))];
    if let Some(name) = &job.spec.concurrency {
        let mut st = group.cloned().unwrap_or_default();
        st.waiting.retain(|(w, _)| w != &job.id);
        plan.push(Write::Group { name: name.clone(), state: st });
    }
    let mut job = job.clone();
    job.end(JobState::Cancelled, None, Some(reason.to_string()), now);
    plan.push(Write::Job { job: Box::new(job.clone()), new: false });
    (job, plan)
}

/// A running job whose run was cut short (a restart, a lapsed lease): its
/// attempt ends as interrupted and it goes back to the queue, or fails once
/// interruptions or attempts run out (then it needs its end publications).
pub fn interrupt(job: &Job, why: &str, now: DateTime<Utc>) -> Job {
    let mut job = job.clone();
    job.end_attempt(Outcome::Interrupted, None, Some(why.to_string()), now);
    // Interruptions do not use up a job's attempts, but a job that keeps
    // being interrupted (say, it takes the machine down) must end.
    if job.interruptions() < MAX_INTERRUPTIONS && job.attempts_left() {
        job.state = JobState::Queued;
    } else {
        let why = format!("interrupted {} times (last: {why})", job.interruptions());
        job.end(JobState::Failed, None, Some(why), now);
    }
    job
}

/// A publication attempt recorded on its job: the final one's outcome, what
/// was created (counted against the caps), and the ids of the status comment
/// and check run. `None` when the record does not change.
pub fn published(job: &Job, p: &Publication, created: bool, now: DateTime<Utc>) -> Job {
    let mut job = job.clone();
    if p.purpose == Purpose::Final {
        job.publication = Some(p.summary());
        if let (PublicationState::Published, Some(ended)) = (p.state, job.finished_at) {
            let ms = (now - ended).num_milliseconds().max(0) as u64;
            if let Some(last) = job.history.last_mut() {
                last.phases.publish_ms = Some(ms);
            }
        }
    }
    if p.state == PublicationState::Published {
        match p.purpose {
            Purpose::Status => job.progress.status_comment = p.remote_id,
            Purpose::CheckStart => job.progress.check_run = p.remote_id,
            _ => {}
        }
    }
    if created {
        match p.target {
            Target::PullRequest { .. } => job.progress.pull_requests += 1,
            Target::IssueComment { .. }
            | Target::CommitComment { .. }
            | Target::StatusComment { .. }
            | Target::EditStatus { .. }
            | Target::Review { .. }
            | Target::ReviewReply { .. } => job.progress.comments += 1,
            Target::Reaction { .. } | Target::CheckRun { .. } | Target::Notify { .. } => {}
        }
    }
    job
}

/// What recording a publication attempt writes: it stays in the outbox while
/// pending and leaves it otherwise; its job takes the outcome.
pub(crate) fn publication_update(job: Option<&Job>, p: &Publication, created: bool, now: DateTime<Utc>) -> Plan {
    let mut plan = match p.state {
        PublicationState::Pending => vec![Write::Outbox(Box::new(p.clone()))],
        _ => vec![Write::Unbox { job: p.job.clone(), purpose: p.purpose }],
    };
    if let Some(job) = job {
        plan.push(Write::Job { job: Box::new(published(job, p, created, now)), new: false });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::render;
    use crate::rules::JobSpec;

    fn entry(id: &str, repo: &str, agent: &str) -> QueueEntry {
        QueueEntry { priority: 0, seq: 1, id: id.into(), agent: agent.into(), repo: Some(repo.into()) }
    }

    fn job(id: &str, group: Option<&str>) -> Job {
        let spec = JobSpec {
            trigger: "t".into(),
            agent: "a".into(),
            max_attempts: 2,
            concurrency: group.map(str::to_string),
            ..JobSpec::default()
        };
        Job::new(id.into(), 1, "d".into(), spec, Utc::now())
    }

    #[test]
    fn limits_count_this_replica_and_all_replicas() {
        let limits = Limits { per_replica: 2, per_repo: 1, per_agent: HashMap::from([("slow".into(), 1)]) };
        // (running before, candidate) → may start?
        let check = |running: &[(&str, &str, bool)], candidate: QueueEntry, expect: bool| {
            let mut load = Load::default();
            for (repo, agent, local) in running {
                load.add(&entry("x", repo, agent), *local);
            }
            assert_eq!(load.admits(&limits, &candidate), expect, "{running:?} + {candidate:?}");
        };
        check(&[], entry("j", "o/a", "fast"), true);
        check(&[("o/a", "fast", false)], entry("j", "o/a", "fast"), false); // repo busy on another replica
        check(&[("o/b", "fast", true), ("o/c", "fast", true)], entry("j", "o/a", "fast"), false); // this replica full
        check(&[("o/b", "fast", false), ("o/c", "fast", false)], entry("j", "o/a", "fast"), true);
        check(&[("o/b", "slow", false)], entry("j", "o/a", "slow"), false); // agent cap, across replicas
        let mut order = [entry("b", "o", "a"), QueueEntry { priority: 5, seq: 9, ..entry("a", "o", "a") }];
        order.sort_by_key(QueueEntry::order);
        assert_eq!(order[0].id, "a", "higher priority first");
    }

    #[test]
    fn claims_take_the_group_or_wait_for_it() {
        let check = |job: Option<Job>, group: Option<GroupState>, expect: &str| {
            let e = entry("j", "o/r", "a");
            let got = match claim(&e, job.as_ref(), group.as_ref(), Utc::now()) {
                Claim::Run(job, plan) => format!("run attempt {}\n{}", job.attempts, render(&plan)),
                Claim::Wait => "wait".into(),
                Claim::Stale(plan) => format!("stale\n{}", render(&plan)),
            };
            assert_eq!(got.trim(), expect.trim());
        };
        check(Some(job("j", None)), None, "run attempt 1\ndequeue j\njob j running\nlease j");
        check(
            Some(job("j", Some("g"))),
            Some(GroupState { running: None, waiting: vec![("j".into(), 1), ("k".into(), 2)] }),
            "run attempt 1\ngroup g running=j waiting=[\"k\"]\ndequeue j\njob j running\nlease j",
        );
        check(Some(job("j", Some("g"))), Some(GroupState { running: Some("k".into()), waiting: vec![] }), "wait");
        let mut cancelled = job("j", None);
        cancelled.end(JobState::Cancelled, None, None, Utc::now());
        check(Some(cancelled), None, "stale\ndequeue j");
        check(None, None, "stale\ndequeue j");
    }

    #[test]
    fn an_end_frees_the_group_and_a_requeue_goes_first_in_line() {
        let check = |job: Job, group: GroupState, expect: &str| {
            assert_eq!(render(&finish(&job, None, Some(&group), &[])).trim(), expect.trim());
        };
        let running = GroupState { running: Some("j".into()), waiting: vec![("k".into(), 2)] };
        let mut done = job("j", Some("g"));
        done.end(JobState::Succeeded, Some("ok".into()), None, Utc::now());
        check(done, running.clone(), "job j succeeded\nend j\nunlease j\ngroup g running=- waiting=[\"k\"]");
        let mut again = job("j", Some("g"));
        again.start_attempt(Utc::now());
        let again = interrupt(&again, "daemon restarted", Utc::now());
        check(again, running, "job j queued\nunlease j\nenqueue j\ngroup g running=- waiting=[\"j\", \"k\"]");
    }

    #[test]
    fn interruptions_requeue_until_they_run_out() {
        let mut j = job("j", None);
        let mut states = Vec::new();
        for _ in 0..MAX_INTERRUPTIONS {
            j.start_attempt(Utc::now());
            j = interrupt(&j, "lease expired", Utc::now());
            states.push(j.state.as_str());
        }
        assert_eq!(states, ["queued", "queued", "failed"]);
        assert_eq!(j.error.as_deref(), Some("interrupted 3 times (last: lease expired)"));
    }

    #[test]
    fn the_publisher_and_the_worker_never_undo_each_other() {
        let mut stored = job("j", None);
        stored.progress.status_comment = Some(7);
        stored.progress.comments = 2;
        let mut worker = job("j", None);
        worker.progress.started = true;
        let m = merged(&worker, Some(&stored));
        assert_eq!((m.progress.started, m.progress.status_comment, m.progress.comments), (true, Some(7), 2));
    }
}
