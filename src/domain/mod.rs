//! The domain: job records, their typed states, and the policies that decide
//! what happens to them.
//!
//! A policy is a pure function from the records a decision needs to a
//! [`Plan`] of writes. Nothing here does IO or knows the store: a storage
//! backend loads the records a policy names, calls it inside its own
//! transaction, and applies the plan it returns atomically. So sled and
//! PostgreSQL make the same decisions, and every decision is tested here
//! without a database.

pub(crate) mod admission;
pub mod approval;
pub mod chain;
pub mod dispatch;
pub mod outbox;
pub mod outcome;
pub mod records;

use std::fmt;

use sha2::{Digest, Sha256};

pub use admission::{Accepted, Admitted};

pub use admission::{Admission, AdmitView, GroupState};
pub use approval::Held;
pub use dispatch::Limits;
pub use dispatch::{Load, QueueEntry};
pub(crate) use outbox::NoOutbox;
pub use outbox::PlanOutbox;
pub use records::*;

/// One write of a plan. A backend applies a plan's writes in order, all or
/// none; a later write to the same record wins.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// A delivery record, with its place in the retention order and its body
    /// fingerprint (when it has one).
    Delivery(Delivery),
    /// A job record; a `new` one also enters the newest-first index.
    Job { job: Box<Job>, new: bool },
    /// Into the queue: by priority, then arrival.
    Enqueue(QueueEntry),
    /// Out of the queue.
    Dequeue(QueueEntry),
    /// A concurrency group's holder and waiting line.
    Group { name: String, state: GroupState },
    /// A trigger's recent runs, for `max_runs_per_hour` and `cooldown`.
    Throttle { key: String, runs: Vec<i64> },
    /// A running job to cancel, and the job that cancels it.
    Cancel { job: String, by: String },
    /// The jobs held for approval on one issue or PR (empty: none left).
    Held { subject: String, list: Vec<Held> },
    /// A claimed job's lease starts (the backend sets its deadline).
    Lease(String),
    /// A job that no longer runs gives up its lease.
    Unlease(String),
    /// The job's end still has to go back through the rules (chaining).
    End(String),
    /// A publication into the outbox (or updated there).
    Outbox(Box<Publication>),
    /// A publication that is done leaves the outbox.
    Unbox { job: String, purpose: Purpose },
}

/// What a policy asks the store to write.
pub(crate) type Plan = Vec<Write>;

/// The id of the job `trigger` creates for `delivery`: the same pair always
/// gives the same id, so reprocessing a delivery cannot double a job.
pub fn job_id(delivery: &str, trigger: &str) -> String {
    let mut h = Sha256::new();
    h.update(delivery.as_bytes());
    h.update([0]);
    h.update(trigger.as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// The key of an issue or PR (`owner/name#N`), for held jobs and heads.
pub(crate) fn subject_key(repo: &str, number: u64) -> String {
    format!("{repo}#{number}")
}

/// What a job is about on GitHub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subject {
    Issue(u64),
    PullRequest(u64),
}

impl Subject {}

/// Where a delivery came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    GitHub,
    Schedule,
    /// A job's end, sent back through the rules.
    Baton,
    /// `POST /api/jobs`.
    Api,
    /// A generic webhook source, by its configured name.
    Generic(String),
}

impl Source {
    pub fn parse(s: &str) -> Source {
        match s {
            "github" => Source::GitHub,
            "schedule" => Source::Schedule,
            "baton" => Source::Baton,
            "api" => Source::Api,
            other => Source::Generic(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Source::GitHub => "github",
            Source::Schedule => "schedule",
            Source::Baton => "baton",
            Source::Api => "api",
            Source::Generic(name) => name,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Source, D::Error> {
        Ok(Source::parse(&String::deserialize(d)?))
    }
}

/// How a finished job reads as a check run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conclusion {
    Success,
    Failure,
    Cancelled,
    TimedOut,
}

impl Conclusion {
    pub fn as_str(self) -> &'static str {
        match self {
            Conclusion::Success => "success",
            Conclusion::Failure => "failure",
            Conclusion::Cancelled => "cancelled",
            Conclusion::TimedOut => "timed_out",
        }
    }
}

/// Renders a plan one write per line, for table-driven tests: ids and
/// states, not whole records.
#[cfg(test)]
pub(crate) fn render(plan: &Plan) -> String {
    let mut out = String::new();
    for w in plan {
        let line = match w {
            Write::Delivery(d) => format!("delivery {} jobs={:?} skipped={}", d.id, d.jobs, d.skipped.len()),
            Write::Job { job, new } => format!(
                "job {} {}{}{}",
                job.id,
                job.state,
                if *new { " new" } else { "" },
                job.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
            ),
            Write::Enqueue(e) => format!("enqueue {}", e.id),
            Write::Dequeue(e) => format!("dequeue {}", e.id),
            Write::Group { name, state } => format!(
                "group {name} running={} waiting={:?}",
                state.running.as_deref().unwrap_or("-"),
                state.waiting.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>()
            ),
            Write::Throttle { key, runs } => format!("throttle {} runs={}", key.replace('\u{1f}', "/"), runs.len()),
            Write::Cancel { job, by } => format!("cancel {job} by {by}"),
            Write::Held { subject, list } => format!("held {subject} n={}", list.len()),
            Write::Lease(id) => format!("lease {id}"),
            Write::Unlease(id) => format!("unlease {id}"),
            Write::End(id) => format!("end {id}"),
            Write::Outbox(p) => format!("outbox {}/{}", p.job, p.purpose.as_str()),
            Write::Unbox { job, purpose } => format!("unbox {job}/{}", purpose.as_str()),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}
