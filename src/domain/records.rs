//! The records kept in the store, as the API shows them.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::rules::JobSpec;

/// A webhook delivery as received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: String,
    pub source: super::Source,
    pub event: String,
    pub received_at: DateTime<Utc>,
    /// Ids of the jobs it created.
    pub jobs: Vec<String>,
    /// Matches that started no job, and why.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    /// A hash of the event name and body (webhooks only): a signed body
    /// sent again under a new delivery id is a replay, not new work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl Delivery {
    /// Marks the delivery with the hash of `event` and `body`.
    pub(crate) fn with_body(mut self, event: &str, body: &[u8]) -> Delivery {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(event.as_bytes());
        h.update([0]);
        h.update(body);
        self.fingerprint = Some(hex::encode(h.finalize()));
        self
    }

    /// A delivery received now, before its jobs are known.
    pub fn new(id: impl Into<String>, source: &str, event: impl Into<String>) -> Delivery {
        Delivery {
            id: id.into(),
            source: super::Source::parse(source),
            event: event.into(),
            received_at: Utc::now(),
            jobs: Vec::new(),
            skipped: Vec::new(),
            fingerprint: None,
        }
    }
}

/// A trigger that matched but was held back (rate limit, cooldown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub trigger: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an attempt ended. Stored and shown as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The agent exited (0 when the attempt succeeded).
    Exit,
    Timeout,
    Cancelled,
    /// Its `verify` command failed.
    VerifyFailed,
    /// The agent could not start (not installed, not defined, the sandbox).
    SpawnFailed,
    /// The workspace could not be made.
    PrepareFailed,
    /// Its environment's setup failed (or left a `setup_env` secret where
    /// the agent would see it); the agent did not run.
    Setup,
    /// Its changes could not be pushed (or were refused: paths, secrets, size).
    PublishFailed,
    /// Too many job ends in a row started it.
    ChainLimit,
    /// It ran into its sandbox's memory or process cap.
    Limit,
    /// A daemon restart (or a lapsed lease) cut it short.
    Interrupted,
    /// It spent its `budget_usd`.
    Budget,
    /// Written by a later version; kept rather than refused.
    #[serde(other)]
    Unknown,
}

/// One try at running a job's agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub(crate) started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub(crate) exit_code: Option<i32>,
    /// Why it ended; `None` while it runs.
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    /// Time spent in each phase, in milliseconds.
    #[serde(default)]
    pub phases: Phases,
    /// Destinations the sandbox's egress proxy refused.
    #[serde(default)]
    pub egress_blocked: Vec<crate::sandbox::egress::Blocked>,
    /// What the agent's model use was, as its CLI reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// An agent's model use: tokens, turns, and what it cost when known (the
/// CLI's own figure, or the configured price table's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input tokens read from the model's cache (part of `input_tokens`).
    pub cached_tokens: u64,
    pub cost_usd: Option<f64>,
    pub turns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl Usage {
    /// Both together: tokens and turns add up; a cost is known only when
    /// both sides knew theirs; a model stays when it is the same.
    pub fn plus(&self, other: &Usage) -> Usage {
        let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        Usage {
            input_tokens: self.input_tokens + other.input_tokens,
            output_tokens: self.output_tokens + other.output_tokens,
            cached_tokens: self.cached_tokens + other.cached_tokens,
            cost_usd: self.cost_usd.zip(other.cost_usd).map(|(a, b)| a + b),
            turns: add(self.turns, other.turns),
            model: if self.model == other.model { self.model.clone() } else { None },
        }
    }
}

/// US dollars as people read them: cents from a dollar up, else as many
/// digits as it takes (`$0.000175`).
pub(crate) fn dollars(usd: f64) -> String {
    if usd >= 1.0 {
        format!("${usd:.2}")
    } else {
        let s = format!("{usd:.6}");
        format!("${}", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Phase timings of one attempt (milliseconds; absent when not reached).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    pub prepare_ms: Option<u64>,
    /// The environment's setup (absent on a cache hit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_ms: Option<u64>,
    pub run_ms: Option<u64>,
    pub verify_ms: Option<u64>,
    /// From the job's end to its result landing on GitHub.
    #[serde(default)]
    pub(crate) publish_ms: Option<u64>,
}

/// Who released a held job, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub at: DateTime<Utc>,
}

/// A job: one trigger's work for one delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// Creation order; the queue and the listing sort by it.
    pub seq: u64,
    pub delivery: String,
    pub trigger: String,
    /// The event kind, e.g. `issues.opened`.
    pub event: String,
    /// The forge `repo` is on (`github`, `gitlab`).
    #[serde(default)]
    pub forge: crate::forge::Forge,
    pub repo: Option<String>,
    pub subject: Option<u64>,
    pub state: JobState,
    /// Attempts started so far.
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub(crate) started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub history: Vec<Attempt>,
    pub publication: Option<PublicationSummary>,
    /// The branch baton pushed with the agent's changes (`pull_request` output).
    #[serde(default)]
    pub branch: Option<String>,
    /// The commit baton pushed (`pull_request` and `push` outputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The model use of all its attempts together, when any was reported.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// The job that replaced, dropped or cancelled this one (concurrency groups).
    #[serde(default)]
    pub displaced_by: Option<String>,
    /// What baton has put on GitHub for this job so far.
    #[serde(default)]
    pub progress: Progress,
    /// The approval that released it, when it was held.
    #[serde(default)]
    pub approved: Option<Approval>,
    /// The job that handed this one its task (`[job] delegate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub spec: JobSpec,
}

/// A job's footprint on GitHub.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Whether the start publications (reaction, status comment, check run)
    /// were written to the outbox: they are written once per job.
    pub started: bool,
    /// The status comment, edited in place at the end.
    pub(crate) status_comment: Option<u64>,
    /// The check run, completed at the end.
    pub check_run: Option<u64>,
    /// Comments and pull requests created, for the per-job caps.
    pub comments: u32,
    pub pull_requests: u32,
}

impl Job {
    pub fn new(id: String, seq: u64, delivery: String, spec: JobSpec, now: DateTime<Utc>) -> Job {
        Job {
            id,
            seq,
            delivery,
            trigger: spec.trigger.clone(),
            event: spec.event.clone(),
            forge: spec.forge,
            repo: spec.repo.clone(),
            subject: spec.subject,
            state: JobState::Queued,
            attempts: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
            history: Vec::new(),
            publication: None,
            branch: None,
            commit: None,
            usage: None,
            displaced_by: None,
            progress: Progress::default(),
            approved: None,
            parent: spec.parent.clone(),
            spec,
        }
    }

    pub fn start_attempt(&mut self, now: DateTime<Utc>) {
        self.state = JobState::Running;
        self.attempts += 1;
        self.started_at.get_or_insert(now);
        self.history.push(Attempt {
            number: self.attempts,
            started_at: now,
            finished_at: None,
            exit_code: None,
            outcome: None,
            error: None,
            phases: Phases::default(),
            egress_blocked: Vec::new(),
            usage: None,
        });
    }

    /// Closes the current attempt.
    pub fn end_attempt(&mut self, outcome: Outcome, exit_code: Option<i32>, error: Option<String>, now: DateTime<Utc>) {
        if let Some(a) = self.history.last_mut().filter(|a| a.finished_at.is_none()) {
            a.finished_at = Some(now);
            a.exit_code = exit_code;
            a.outcome = Some(outcome);
            a.error = error;
        }
    }

    /// Adds refused destinations to the current attempt's.
    pub(crate) fn record_egress(&mut self, blocked: Vec<crate::sandbox::egress::Blocked>) {
        let Some(a) = self.history.last_mut() else { return };
        for b in blocked {
            match a.egress_blocked.iter_mut().find(|x| x.host == b.host && x.port == b.port) {
                Some(x) => x.count += b.count,
                None => a.egress_blocked.push(b),
            }
        }
    }

    /// Records the current attempt's model use, and the job's total.
    pub(crate) fn record_usage(&mut self, usage: Option<Usage>) {
        if let (Some(a), Some(u)) = (self.history.last_mut(), usage) {
            a.usage = Some(u);
        }
        let used: Vec<&Usage> = self.history.iter().filter_map(|a| a.usage.as_ref()).collect();
        self.usage = used.split_first().map(|(first, rest)| rest.iter().fold((*first).clone(), |t, u| t.plus(u)));
    }

    /// Records the phase timings of the current attempt.
    pub(crate) fn record_phases(&mut self, phases: Phases) {
        if let Some(a) = self.history.last_mut() {
            a.phases = phases;
        }
    }

    /// The job reaches a final state.
    pub fn end(&mut self, state: JobState, result: Option<String>, error: Option<String>, now: DateTime<Utc>) {
        self.state = state;
        self.result = result;
        self.error = error;
        self.finished_at = Some(now);
    }

    /// Back to the queue for a whole new run (`retry`); history is kept.
    pub(crate) fn requeue_fresh(&mut self) {
        self.state = JobState::Queued;
        self.attempts = 0;
        self.result = None;
        self.error = None;
        self.finished_at = None;
        self.publication = None;
    }

    /// Attempts that count against `attempts`: a daemon restart is not the
    /// job's fault, so an interrupted attempt does not use up the budget.
    pub(crate) fn counted_attempts(&self) -> u32 {
        self.history.iter().filter(|a| a.outcome != Some(Outcome::Interrupted)).count() as u32
    }

    pub(crate) fn interruptions(&self) -> u32 {
        self.history.iter().filter(|a| a.outcome == Some(Outcome::Interrupted)).count() as u32
    }

    pub(crate) fn attempts_left(&self) -> bool {
        self.counted_attempts() < self.spec.max_attempts
    }

    /// The issue or PR the job is about, if any.
    pub(crate) fn subject_of(&self) -> Option<super::Subject> {
        let n = self.spec.subject?;
        Some(if self.spec.subject_is_pull_request { super::Subject::PullRequest(n) } else { super::Subject::Issue(n) })
    }

    /// How the job reads as a check run.
    pub fn conclusion(&self) -> super::Conclusion {
        use super::Conclusion;
        match self.state {
            JobState::Succeeded => Conclusion::Success,
            JobState::Cancelled => Conclusion::Cancelled,
            _ if self.history.last().and_then(|a| a.outcome) == Some(Outcome::Timeout) => Conclusion::TimedOut,
            _ => Conclusion::Failure,
        }
    }
}

/// Where a publication goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A comment on an issue or pull request.
    IssueComment { number: u64 },
    /// A comment on a commit, for events with no issue or PR.
    CommitComment { sha: String },
    /// A pull request from a branch baton pushed.
    PullRequest { head: String, base: String, title: String },
    /// A pull request review (event `COMMENT`).
    Review { number: u64 },
    /// 👀 on the triggering comment (a review comment when `review`), or on
    /// the issue or PR itself.
    Reaction {
        number: u64,
        comment_id: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        review: bool,
    },
    /// A reply in a pull request's review thread (to its first comment).
    ReviewReply { number: u64, comment_id: u64 },
    /// The job's end, told to `[notify.NAME]` targets; `sent` are those
    /// that took it (a retry tells only the others).
    Notify {
        targets: Vec<String>,
        #[serde(default)]
        sent: Vec<String>,
    },
    /// The status comment posted when the job starts.
    StatusComment { number: u64 },
    /// The status comment, edited in place; posted anew if it never landed.
    EditStatus { number: u64 },
    /// A check run on `head_sha`: in progress without a conclusion, else
    /// completed with it (the run made at start is updated when known).
    CheckRun { head_sha: String, name: String, conclusion: Option<super::Conclusion> },
}

/// Why a publication exists. A job has at most one of each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// The job's result (or failure), where the trigger's output says.
    #[default]
    Final,
    Reaction,
    Status,
    CheckStart,
    /// The status comment's last edit, when the result went elsewhere.
    StatusEnd,
    /// The job's end, told to the trigger's notify targets.
    Notify,
}

impl Purpose {
    pub(crate) const ALL: [Purpose; 6] =
        [Purpose::Final, Purpose::Reaction, Purpose::Status, Purpose::CheckStart, Purpose::StatusEnd, Purpose::Notify];

    /// Published when the job starts; a job's end waits for these.
    pub(crate) fn at_start(self) -> bool {
        matches!(self, Purpose::Reaction | Purpose::Status | Purpose::CheckStart)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Final => "final",
            Purpose::Reaction => "reaction",
            Purpose::Status => "status",
            Purpose::CheckStart => "check-start",
            Purpose::StatusEnd => "status-end",
            Purpose::Notify => "notify",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublicationState {
    Pending,
    Published,
    Failed,
}

/// A result on its way to GitHub: written before the first attempt, retried
/// by the publisher, never by re-running the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    pub job: String,
    #[serde(default)]
    pub(crate) purpose: Purpose,
    pub repo: String,
    /// The job's `access` (see `Event`): which forge credentials send it.
    #[serde(default, rename = "installation")]
    pub access: Option<u64>,
    pub target: Target,
    pub body: String,
    pub state: PublicationState,
    pub attempts: u32,
    pub(crate) next_attempt_at: DateTime<Utc>,
    pub(crate) last_error: Option<String>,
    pub url: Option<String>,
    /// A creating request went out and its answer was lost (a crash, a 5xx,
    /// a timeout): before sending again, baton looks for its marker.
    #[serde(default)]
    pub(crate) maybe_sent: bool,
    /// The id GitHub gave what was created (comment, check run).
    #[serde(default)]
    pub(crate) remote_id: Option<u64>,
}

/// What the job record shows of its publication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublicationSummary {
    pub state: PublicationState,
    pub attempts: u32,
    pub url: Option<String>,
    pub error: Option<String>,
}

impl Publication {
    pub fn summary(&self) -> PublicationSummary {
        PublicationSummary {
            state: self.state,
            attempts: self.attempts,
            url: self.url.clone(),
            error: self.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod dollar_tests {
    #[test]
    fn dollars_read_as_people_write_them() {
        use super::dollars;
        assert_eq!(dollars(2.0134), "$2.01");
        assert_eq!(dollars(0.25), "$0.25");
        assert_eq!(dollars(0.000175), "$0.000175");
        assert_eq!(dollars(0.0), "$0");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_keep_the_names_the_api_has_always_shown() {
        let check = |o: Outcome, name: &str| {
            assert_eq!(serde_json::to_value(o).unwrap(), serde_json::json!(name));
            assert_eq!(serde_json::from_value::<Outcome>(serde_json::json!(name)).unwrap(), o);
        };
        check(Outcome::Exit, "exit");
        check(Outcome::VerifyFailed, "verify_failed");
        check(Outcome::PrepareFailed, "prepare_failed");
        check(Outcome::Setup, "setup");
        check(Outcome::Interrupted, "interrupted");
        check(Outcome::Limit, "limit");
        // A record from a later version still reads.
        assert_eq!(serde_json::from_value::<Outcome>(serde_json::json!("something_new")).unwrap(), Outcome::Unknown);
    }
}
