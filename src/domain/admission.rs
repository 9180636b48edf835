//! Admission: what storing a delivery writes. Dedupe by delivery id and by
//! signed body (replays), job ids from (delivery, trigger), the triggers'
//! rate limits and cooldowns, concurrency groups under `on_conflict`, and
//! jobs held for approval.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::approval::{Held, MAX_PENDING};
use super::dispatch::QueueEntry;
use super::{Delivery, Job, JobState, Plan, Skipped, Write};
use crate::rules::{JobSpec, OnConflict};

/// Jobs waiting in one concurrency group with `on_conflict = "queue"`, at most.
pub(crate) const MAX_GROUP_QUEUE: usize = 50;

/// The outcome of storing a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored, with the jobs it created and the matches it skipped.
    New(Admitted),
    /// A delivery with this id was stored before; nothing was written.
    Duplicate,
    /// The same event and body came before under another delivery id
    /// (within the delivery retention): a replay; nothing was written.
    Replay { of: String },
}

/// What a stored delivery started.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Admitted {
    pub jobs: Vec<String>,
    /// Matches held back by a trigger's rate limit or cooldown.
    pub skipped: Vec<Skipped>,
}

/// Who holds a concurrency group, and who waits for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GroupState {
    pub running: Option<String>,
    /// (job id, queue sequence), in order.
    pub waiting: Vec<(String, u64)>,
}

/// A delivery and the jobs its event created, ready to store.
#[derive(Debug, Clone)]
pub struct Admission {
    pub delivery: Delivery,
    pub jobs: Vec<Job>,
    /// Matches held until someone trusted approves: (subject key, job).
    pub held: Vec<(String, Held)>,
    pub now: DateTime<Utc>,
}

/// The records admitting a batch reads. A backend fills it (see
/// [`AdmitView::wanted`]) inside its transaction, then runs [`admit`] for
/// each delivery in order; the view takes each one's writes, so a later
/// delivery of the batch sees the earlier ones.
#[derive(Debug, Default)]
pub struct AdmitView {
    /// Delivery ids already stored.
    pub deliveries: HashSet<String>,
    /// Body fingerprint → the delivery that first brought it.
    pub bodies: HashMap<String, String>,
    /// Stored jobs among the batch's ids and those waiting in its groups.
    pub jobs: HashMap<String, Job>,
    pub groups: HashMap<String, GroupState>,
    pub(crate) throttles: HashMap<String, Vec<i64>>,
    /// Subject key → jobs held there.
    pub held: HashMap<String, Vec<Held>>,
}

/// The keys of the records a batch reads, sorted (a backend that locks
/// rows locks them in this order).
#[derive(Debug, Default)]
pub struct Wanted {
    pub deliveries: BTreeSet<String>,
    pub bodies: BTreeSet<String>,
    pub jobs: BTreeSet<String>,
    pub groups: BTreeSet<String>,
    pub(crate) throttles: BTreeSet<String>,
    pub(crate) subjects: BTreeSet<String>,
}

/// How many jobs `batch` would create: the numbers its admission needs.
pub fn jobs_in(batch: &[Admission]) -> usize {
    batch.iter().map(|a| a.jobs.len()).sum()
}

impl AdmitView {
    /// What `batch` reads, except the jobs waiting in its groups: those are
    /// known once the groups are loaded ([`AdmitView::waiting`]).
    pub fn wanted(batch: &[Admission]) -> Wanted {
        let mut w = Wanted::default();
        for a in batch {
            w.deliveries.insert(a.delivery.id.clone());
            w.bodies.extend(a.delivery.fingerprint.clone());
            for job in &a.jobs {
                w.jobs.insert(job.id.clone());
                w.groups.extend(job.spec.concurrency.clone());
                w.throttles.extend(throttle_keys(&job.spec));
                w.throttles.extend(budget_keys(&job.spec).into_iter().filter(|b| b.cap.is_some()).map(|b| b.key));
            }
            w.subjects.extend(a.held.iter().map(|(s, _)| s.clone()));
        }
        w
    }

    /// Jobs waiting in the loaded groups (`replace_pending` may cancel them).
    pub fn waiting(&self) -> BTreeSet<String> {
        self.groups.values().flat_map(|g| g.waiting.iter().map(|(id, _)| id.clone())).collect()
    }
}

/// The throttle records a job's trigger keeps: runs per repository and hour,
/// and the last run per issue or PR.
pub(crate) fn throttle_keys(spec: &JobSpec) -> Vec<String> {
    let repo = spec.repo.as_deref().unwrap_or("");
    let mut keys = Vec::new();
    if spec.max_runs_per_hour.is_some() {
        keys.push(format!("rate\u{1f}{}\u{1f}{repo}", spec.trigger));
    }
    if let (Some(_), Some(subject)) = (spec.cooldown_secs, spec.subject) {
        keys.push(format!("cool\u{1f}{}\u{1f}{repo}\u{1f}{subject}", spec.trigger));
    }
    keys
}

/// Spending is kept by the hour, in the throttle records: `[hour, micro
/// dollars, hour, micro dollars, …]`, the last day's hours only.
const SPEND_HOURS: i64 = 24;

/// One rolling day's spending a job counts against, and its cap.
pub(crate) struct BudgetKey {
    pub key: String,
    pub cap: Option<f64>,
    /// Whose budget, for the reason a match is skipped.
    pub whose: String,
}

/// Every job's spending counts in three: all agents', its trigger's and
/// its repository's (whether or not a cap is set yet).
pub(crate) fn budget_keys(spec: &JobSpec) -> Vec<BudgetKey> {
    let repo = spec.repo.as_deref().unwrap_or("");
    let b = spec.daily_budgets;
    vec![
        BudgetKey { key: "spend\u{1f}all".into(), cap: b.all, whose: "all agents' (limits.daily_budget_usd)".into() },
        BudgetKey {
            key: format!("spend\u{1f}trigger\u{1f}{}", spec.trigger),
            cap: b.trigger,
            whose: format!("trigger {}'s (job.daily_budget_usd)", spec.trigger),
        },
        BudgetKey {
            key: format!("spend\u{1f}repo\u{1f}{repo}"),
            cap: b.repo,
            whose: format!("{repo}'s (limits.daily_budget_per_repo_usd)"),
        },
    ]
}

fn hour_of(now: DateTime<Utc>) -> i64 {
    now.timestamp().div_euclid(3600)
}

/// What `buckets` hold for the rolling day up to `now` (this hour and the
/// 23 before it), in US dollars.
pub fn spent(buckets: &[i64], now: DateTime<Utc>) -> f64 {
    let since = hour_of(now) - SPEND_HOURS;
    buckets.chunks_exact(2).filter(|b| b[0] > since).map(|b| b[1] as f64 / 1e6).sum()
}

/// What recording `usd` spent at `now` writes, given the buckets stored.
pub fn spend(stored: &HashMap<String, Vec<i64>>, spec: &JobSpec, usd: f64, now: DateTime<Utc>) -> Plan {
    let (hour, micro) = (hour_of(now), (usd * 1e6).round().max(0.0) as i64);
    budget_keys(spec)
        .into_iter()
        .map(|b| {
            let mut runs: Vec<i64> = stored
                .get(&b.key)
                .map(|r| r.chunks_exact(2).filter(|x| x[0] > hour - SPEND_HOURS).flatten().copied().collect())
                .unwrap_or_default();
            match runs.len().checked_sub(2) {
                Some(at) if runs[at] == hour => runs[at + 1] += micro,
                _ => runs.extend([hour, micro]),
            }
            Write::Throttle { key: b.key, runs }
        })
        .collect()
}

/// Why a job may not start: a rolling day's budget it counts against is
/// spent.
fn over_budget(throttles: &HashMap<String, Vec<i64>>, spec: &JobSpec, now: DateTime<Utc>) -> Option<String> {
    budget_keys(spec).into_iter().find_map(|b| {
        let cap = b.cap?;
        let so_far = spent(throttles.get(&b.key).map(Vec::as_slice).unwrap_or_default(), now);
        let (cap_text, spent_text) = (super::dollars(cap), super::dollars(so_far));
        (so_far >= cap)
            .then(|| format!("daily budget: {} {cap_text} is spent ({spent_text} in the last 24 h)", b.whose))
    })
}

/// Applies a trigger's `max_runs_per_hour` (per repository) and `cooldown`
/// (per subject): the runs to record when it may go ahead, else why not.
fn throttle(
    throttles: &HashMap<String, Vec<i64>>,
    spec: &JobSpec,
    now: DateTime<Utc>,
) -> Result<Vec<(String, Vec<i64>)>, String> {
    let repo = spec.repo.as_deref().unwrap_or("");
    let now_ms = now.timestamp_millis();
    let mut writes = Vec::new();
    for key in throttle_keys(spec) {
        let mut runs = throttles.get(&key).cloned().unwrap_or_default();
        if key.starts_with("rate\u{1f}") {
            let max = spec.max_runs_per_hour.unwrap_or(u32::MAX);
            runs.retain(|t| now_ms - t < 3_600_000);
            if runs.len() >= max as usize {
                return Err(format!("max_runs_per_hour: {max} runs in the last hour for {repo}"));
            }
            runs.push(now_ms);
        } else {
            let cooldown = spec.cooldown_secs.unwrap_or(0) as i64 * 1000;
            if let Some(last) = runs.iter().max().filter(|last| now_ms - *last < cooldown) {
                let left = (cooldown - (now_ms - last)) / 1000 + 1;
                let subject = spec.subject.unwrap_or(0);
                let secs = cooldown / 1000;
                return Err(format!("cooldown: #{subject} ran less than {secs}s ago ({left}s left)"));
            }
            runs = vec![now_ms];
        }
        writes.push((key, runs));
    }
    Ok(writes)
}

/// A new job joins its concurrency group under its trigger's `on_conflict`:
/// the writes when it may wait there, or the job as dropped (cancelled) when
/// the policy turns it away. Waiting jobs it replaces are cancelled, and a
/// running one it supersedes is marked for cancelling.
fn join_group(view: &AdmitView, group: &str, job: &Job, now: DateTime<Utc>) -> Result<Plan, Box<Job>> {
    let mut st = view.groups.get(group).cloned().unwrap_or_default();
    let busy = st.running.clone().or_else(|| st.waiting.first().map(|(w, _)| w.clone()));
    let drop_with = |why: String| {
        let mut dropped = job.clone();
        dropped.end(JobState::Cancelled, None, Some(why), now);
        dropped.displaced_by = busy.clone();
        Box::new(dropped)
    };
    let mut plan = Plan::new();
    match job.spec.on_conflict {
        OnConflict::Skip if busy.is_some() => {
            let holder = busy.clone().unwrap_or_default();
            return Err(drop_with(format!(
                "dropped: concurrency group `{group}` is busy with job {holder} (on_conflict = skip)"
            )));
        }
        OnConflict::Queue if st.waiting.len() >= MAX_GROUP_QUEUE => {
            return Err(drop_with(format!(
                "dropped: {MAX_GROUP_QUEUE} jobs already wait in concurrency group `{group}`"
            )));
        }
        OnConflict::ReplacePending | OnConflict::CancelInProgress => {
            for (waiting, _seq) in std::mem::take(&mut st.waiting) {
                if let Some(old) = view.jobs.get(&waiting).filter(|j| j.state == JobState::Queued) {
                    let mut old = old.clone();
                    old.end(JobState::Cancelled, None, Some(format!("replaced by job {}", job.id)), now);
                    old.displaced_by = Some(job.id.clone());
                    plan.push(Write::Dequeue(QueueEntry::of(&old)));
                    plan.push(Write::Job { job: Box::new(old), new: false });
                }
            }
            if job.spec.on_conflict == OnConflict::CancelInProgress {
                if let Some(running) = &st.running {
                    plan.push(Write::Cancel { job: running.clone(), by: job.id.clone() });
                }
            }
        }
        _ => {}
    }
    st.waiting.push((job.id.clone(), job.seq));
    plan.push(Write::Group { name: group.to_string(), state: st });
    Ok(plan)
}

/// One delivery's admission, against (and into) `view`.
pub fn admit(view: &mut AdmitView, a: &Admission) -> (Accepted, Plan) {
    if view.deliveries.contains(&a.delivery.id) {
        return (Accepted::Duplicate, Plan::new());
    }
    if let Some(of) = a.delivery.fingerprint.as_ref().and_then(|f| view.bodies.get(f)) {
        return (Accepted::Replay { of: of.clone() }, Plan::new());
    }
    let mut plan = Plan::new();
    for (subject, p) in &a.held {
        let list = view.held.entry(subject.clone()).or_default();
        list.retain(|old| !(old.delivery == p.delivery && old.spec.trigger == p.spec.trigger));
        list.push(p.clone());
        // An outsider cannot grow this without bound.
        if list.len() > MAX_PENDING {
            list.drain(..list.len() - MAX_PENDING);
        }
        plan.push(Write::Held { subject: subject.clone(), list: list.clone() });
    }
    let mut record = a.delivery.clone();
    for job in &a.jobs {
        if let Some(reason) = over_budget(&view.throttles, &job.spec, a.now) {
            record.skipped.push(Skipped { trigger: job.trigger.clone(), reason });
            continue;
        }
        match throttle(&view.throttles, &job.spec, a.now) {
            Err(reason) => {
                record.skipped.push(Skipped { trigger: job.trigger.clone(), reason });
                continue;
            }
            Ok(runs) => {
                for (key, runs) in runs {
                    view.throttles.insert(key.clone(), runs.clone());
                    plan.push(Write::Throttle { key, runs });
                }
            }
        }
        record.jobs.push(job.id.clone());
        // A job id already present (its delivery was pruned and is now
        // redelivered) is never doubled.
        if view.jobs.contains_key(&job.id) {
            continue;
        }
        let mut stored = job.clone();
        if let Some(group) = &job.spec.concurrency {
            match join_group(view, group, job, a.now) {
                Ok(writes) => plan.extend(writes),
                Err(dropped) => stored = *dropped,
            }
        }
        if stored.state == JobState::Queued {
            plan.push(Write::Enqueue(QueueEntry::of(&stored)));
        }
        plan.push(Write::Job { job: Box::new(stored), new: true });
    }
    // The view takes the plan's writes, for the batch's next delivery.
    for w in &plan {
        match w {
            Write::Job { job, .. } => {
                view.jobs.insert(job.id.clone(), (**job).clone());
            }
            Write::Group { name, state } => {
                view.groups.insert(name.clone(), state.clone());
            }
            _ => {}
        }
    }
    view.deliveries.insert(record.id.clone());
    if let Some(f) = &record.fingerprint {
        view.bodies.insert(f.clone(), record.id.clone());
    }
    let admitted = Admitted { jobs: record.jobs.clone(), skipped: record.skipped.clone() };
    plan.push(Write::Delivery(record));
    (Accepted::New(admitted), plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::render;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    fn job(id: &str, seq: u64, spec: JobSpec) -> Job {
        Job::new(id.into(), seq, format!("d-{id}"), spec, at(0))
    }

    fn spec(trigger: &str) -> JobSpec {
        JobSpec { trigger: trigger.into(), agent: "a".into(), repo: Some("o/r".into()), ..JobSpec::default() }
    }

    fn grouped(on_conflict: OnConflict) -> JobSpec {
        JobSpec { concurrency: Some("g".into()), on_conflict, ..spec("t") }
    }

    fn delivery(id: &str, jobs: Vec<Job>, secs: i64) -> Admission {
        Admission { delivery: Delivery::new(id, "github", "issues.opened"), jobs, held: Vec::new(), now: at(secs) }
    }

    /// Spending is counted by the hour for a rolling day, in all three
    /// scopes; a match whose budget is spent is skipped saying whose.
    #[test]
    fn daily_budgets_count_a_rolling_day_and_skip_past_them() {
        let capped = JobSpec {
            daily_budgets: crate::rules::DailyBudgets { trigger: Some(1.0), ..Default::default() },
            ..spec("t")
        };
        let mut stored: HashMap<String, Vec<i64>> = HashMap::new();
        // 0.6 at hour 0, 0.3 later in that hour, 0.2 a day and an hour later.
        for (secs, usd) in [(0, 0.6), (1800, 0.3), (25 * 3600, 0.2)] {
            for w in spend(&stored, &capped, usd, at(secs)) {
                if let Write::Throttle { key, runs } = w {
                    stored.insert(key, runs);
                }
            }
        }
        let hour = at(0).timestamp().div_euclid(3600);
        let trigger = stored.get("spend\u{1f}trigger\u{1f}t").cloned().unwrap_or_default();
        assert_eq!(trigger, vec![hour + 25, 200_000], "the day-old hour is gone");
        assert_eq!(stored.len(), 3, "all agents', the trigger's and the repository's");
        assert!((spent(&[hour, 900_000], at(1800)) - 0.9).abs() < 1e-9);

        let mut view = AdmitView { throttles: stored.clone(), ..AdmitView::default() };
        view.throttles.insert("spend\u{1f}trigger\u{1f}t".into(), vec![hour, 1_000_000]);
        let (accepted, _) = admit(&mut view, &delivery("d1", vec![job("j1", 1, capped.clone())], 60));
        let Accepted::New(ad) = accepted else { panic!("stored") };
        assert!(ad.jobs.is_empty());
        assert_eq!(
            ad.skipped[0].reason,
            "daily budget: trigger t's (job.daily_budget_usd) $1.00 is spent ($1.00 in the last 24 h)"
        );
        // A day later the same spending no longer counts.
        let (accepted, _) = admit(&mut view, &delivery("d2", vec![job("j2", 2, capped)], 24 * 3600));
        assert!(matches!(accepted, Accepted::New(ad) if ad.jobs == ["j2"]));
    }

    /// Admits `batch` in order against `view`; renders each answer and plan.
    fn check(mut view: AdmitView, batch: Vec<Admission>, expect: &str) {
        let mut out = String::new();
        for a in &batch {
            let (accepted, plan) = admit(&mut view, a);
            let answer = match accepted {
                Accepted::New(ad) => {
                    format!("new {:?} skipped {:?}", ad.jobs, ad.skipped.iter().map(|s| &s.reason).collect::<Vec<_>>())
                }
                other => format!("{other:?}"),
            };
            out.push_str(&format!("{}: {answer}\n{}", a.delivery.id, render(&plan)));
        }
        assert_eq!(out.trim(), expect.trim(), "\n--- got ---\n{out}");
    }

    #[test]
    fn dedupe_by_id_and_by_body_and_job_ids_never_double() {
        let mut replay = delivery("d2", vec![], 0);
        replay.delivery.fingerprint = Some("f1".into());
        let mut first = delivery("d1", vec![job("j1", 1, spec("t"))], 0);
        first.delivery.fingerprint = Some("f1".into());
        let mut view = AdmitView::default();
        view.jobs.insert("j9".into(), job("j9", 9, spec("t")));
        check(
            view,
            vec![first.clone(), first, replay, delivery("d3", vec![job("j9", 10, spec("t"))], 0)],
            r#"
d1: new ["j1"] skipped []
enqueue j1
job j1 queued new
delivery d1 jobs=["j1"] skipped=0
d1: Duplicate
d2: Replay { of: "d1" }
d3: new ["j9"] skipped []
delivery d3 jobs=["j9"] skipped=0"#,
        );
    }

    #[test]
    fn rate_limits_and_cooldowns_skip_with_their_reason() {
        let rate = JobSpec { max_runs_per_hour: Some(1), ..spec("r") };
        let cool = JobSpec { cooldown_secs: Some(60), subject: Some(7), ..spec("c") };
        check(
            AdmitView::default(),
            vec![
                delivery("d1", vec![job("a", 1, rate.clone()), job("b", 2, cool.clone())], 0),
                delivery("d2", vec![job("c", 3, rate.clone()), job("e", 4, cool.clone())], 30),
                delivery("d3", vec![job("f", 5, rate), job("g", 6, cool)], 3_601),
            ],
            r#"
d1: new ["a", "b"] skipped []
throttle rate/r/o/r runs=1
enqueue a
job a queued new
throttle cool/c/o/r/7 runs=1
enqueue b
job b queued new
delivery d1 jobs=["a", "b"] skipped=0
d2: new [] skipped ["max_runs_per_hour: 1 runs in the last hour for o/r", "cooldown: #7 ran less than 60s ago (31s left)"]
delivery d2 jobs=[] skipped=2
d3: new ["f", "g"] skipped []
throttle rate/r/o/r runs=1
enqueue f
job f queued new
throttle cool/c/o/r/7 runs=1
enqueue g
job g queued new
delivery d3 jobs=["f", "g"] skipped=0"#,
        );
    }

    #[test]
    fn concurrency_groups_follow_on_conflict() {
        let mut view = AdmitView::default();
        view.groups.insert("g".into(), GroupState { running: Some("r".into()), waiting: vec![("w".into(), 2)] });
        view.jobs.insert("w".into(), job("w", 2, grouped(OnConflict::Queue)));
        check(
            view,
            vec![
                delivery("d1", vec![job("s", 3, grouped(OnConflict::Skip))], 0),
                delivery("d2", vec![job("q", 4, grouped(OnConflict::Queue))], 0),
                delivery("d3", vec![job("p", 5, grouped(OnConflict::ReplacePending))], 0),
                delivery("d4", vec![job("c", 6, grouped(OnConflict::CancelInProgress))], 0),
            ],
            r#"
d1: new ["s"] skipped []
job s cancelled new (dropped: concurrency group `g` is busy with job r (on_conflict = skip))
delivery d1 jobs=["s"] skipped=0
d2: new ["q"] skipped []
group g running=r waiting=["w", "q"]
enqueue q
job q queued new
delivery d2 jobs=["q"] skipped=0
d3: new ["p"] skipped []
dequeue w
job w cancelled (replaced by job p)
dequeue q
job q cancelled (replaced by job p)
group g running=r waiting=["p"]
enqueue p
job p queued new
delivery d3 jobs=["p"] skipped=0
d4: new ["c"] skipped []
dequeue p
job p cancelled (replaced by job c)
cancel r by c
group g running=r waiting=["c"]
enqueue c
job c queued new
delivery d4 jobs=["c"] skipped=0"#,
        );
    }

    #[test]
    fn a_full_group_line_drops_the_newcomer() {
        let mut view = AdmitView::default();
        let waiting = (0..MAX_GROUP_QUEUE as u64).map(|n| (format!("w{n}"), n)).collect();
        view.groups.insert("g".into(), GroupState { running: None, waiting });
        check(
            view,
            vec![delivery("d1", vec![job("x", 99, grouped(OnConflict::Queue))], 0)],
            r#"
d1: new ["x"] skipped []
job x cancelled new (dropped: 50 jobs already wait in concurrency group `g`)
delivery d1 jobs=["x"] skipped=0"#,
        );
    }

    #[test]
    fn held_jobs_are_kept_per_subject_newest_twenty() {
        let held = |n: usize| {
            let p = Held { delivery: format!("h{n}"), held_at: at(0), spec: spec("t"), text: None };
            ("o/r#1".to_string(), p)
        };
        let mut view = AdmitView::default();
        view.held.insert("o/r#1".into(), (0..MAX_PENDING).map(|n| held(n).1).collect());
        let mut a = delivery("d1", vec![], 0);
        a.held.push(held(100));
        check(
            view,
            vec![a],
            r#"
d1: new [] skipped []
held o/r#1 n=20
delivery d1 jobs=[] skipped=0"#,
        );
    }
}
