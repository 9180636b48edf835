//! The store on a real database (sled, or PostgreSQL in `tests/pg`): group
//! commit, idempotence, retention, claims within limits, and clear errors
//! for a store that cannot be opened.

use std::sync::Arc;

use baton::rules::{JobSpec, OutputKind};
use baton::store::{job_id, Accepted, Admitted, Delivery, Durability, Limits, Note, PrHead, Store};
use chrono::{Duration, Utc};

const LEASE: std::time::Duration = std::time::Duration::from_secs(60);

/// One replica that may run plenty, one job per repository.
fn limits() -> Limits {
    Limits { per_replica: 100, per_repo: 1, ..Limits::default() }
}

fn spec(trigger: &str) -> JobSpec {
    JobSpec {
        trigger: trigger.into(),
        event: "issues.opened".into(),
        repo: Some("a/b".into()),
        subject: Some(1),
        agent: "codex".into(),
        prompt: "p".into(),
        max_attempts: 1,
        output: OutputKind::None,
        ..JobSpec::default()
    }
}

fn delivery(id: &str, age: Duration) -> Delivery {
    Delivery { received_at: Utc::now() - age, ..Delivery::new(id, "github", "issues.opened") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    let n = 200;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.accept(delivery(&format!("d{i}"), Duration::zero()), vec![spec("t")]).await.unwrap()
        }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Accepted::New(ref a) if a.jobs.len() == 1));
    }
    if !crate::harness::postgres() {
        let flushes = store.flushes();
        assert!(flushes >= 1, "acknowledged writes were flushed");
        assert!(flushes < n as u64 / 2, "{n} concurrent deliveries took {flushes} flushes");
    }
    drop(store);
    // Everything acknowledged is there after reopening.
    let store = crate::harness::reopen_store(dir.path()).await;
    assert_eq!(store.job_count().await.unwrap(), n);
}

/// Deliveries are written in batches: the same delivery twice in one batch
/// must still be stored once and answered once as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_delivery_sent_twice_at_once_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    let n = 100;
    let barrier = Arc::new(tokio::sync::Barrier::new(2 * n));
    let mut tasks = Vec::new();
    for i in 0..2 * n {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            store.accept(delivery(&format!("d{}", i / 2), Duration::zero()), vec![spec("t")]).await.unwrap()
        }));
    }
    let mut new = 0;
    for t in tasks {
        match t.await.unwrap() {
            Accepted::New(a) => {
                assert_eq!(a.jobs.len(), 1);
                new += 1;
            }
            Accepted::Duplicate => {}
            Accepted::Replay { of } => panic!("no body fingerprints here, yet a replay of {of}"),
        }
    }
    assert_eq!(new, n, "each delivery is new exactly once");
    drop(store);
    let store = crate::harness::reopen_store(dir.path()).await;
    assert_eq!(store.job_count().await.unwrap(), n);
}

/// `durability = "os"` answers without waiting for the disk, but what it
/// wrote still reaches it about a second later, with no one waiting: the
/// file as a kill -9 would leave it then holds the delivery. (redb keeps
/// commits that are not durable out of its file's header until a durable
/// one: without the background flush, a daemon on "os" lost everything
/// since it started, and its file and memory grew with every write.)
#[tokio::test]
async fn os_durability_skips_fsync_yet_writes_back_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let opened = std::time::Instant::now();
    let store = Store::open_with(dir.path(), Durability::Os).unwrap();
    store.accept(delivery("d", Duration::zero()), vec![spec("t")]).await.unwrap();
    // (Unless a second has passed: then the background flush may be done.)
    if opened.elapsed() < std::time::Duration::from_millis(900) {
        assert!(store.unflushed_writes() > 0, "the delivery was answered before any flush");
    }

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.unflushed_writes() > 0 {
        assert!(std::time::Instant::now() < deadline, "nothing was written back in 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(store.flushes() > 0);
    // What a crash would leave: the file as it is now, the store still open.
    let image = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("baton.redb"), image.path().join("baton.redb")).unwrap();
    let crashed = Store::open_with(image.path(), Durability::Fsync).unwrap();
    assert!(crashed.delivery("d").await.unwrap().is_some(), "the delivery was not on disk");
    assert_eq!(crashed.job_count().await.unwrap(), 1);
}

#[tokio::test]
async fn job_ids_derive_from_delivery_and_trigger_and_never_double() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    assert_eq!(job_id("d1", "t"), job_id("d1", "t"));
    assert_ne!(job_id("d1", "t"), job_id("d1", "u"));
    assert_ne!(job_id("d1", "t"), job_id("d2", "t"));

    let first = store.accept(delivery("d1", Duration::zero()), vec![spec("t"), spec("u"), spec("t")]).await.unwrap();
    assert_eq!(first, Accepted::New(Admitted { jobs: vec![job_id("d1", "t"), job_id("d1", "u")], skipped: vec![] }));
    let again = store.accept(delivery("d1", Duration::zero()), vec![spec("t")]).await.unwrap();
    assert_eq!(again, Accepted::Duplicate);
    assert_eq!(store.job_count().await.unwrap(), 2);
}

#[tokio::test]
async fn pruning_forgets_old_delivery_ids_but_never_doubles_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    store.accept(delivery("old", Duration::days(8)), vec![spec("t")]).await.unwrap();
    store.accept(delivery("new", Duration::hours(1)), vec![spec("t")]).await.unwrap();
    let pruned = store.prune_deliveries(Utc::now() - Duration::days(7)).await.unwrap();
    assert_eq!(pruned, 1);
    assert!(store.delivery("old").await.unwrap().is_none());
    assert!(store.delivery("new").await.unwrap().is_some());
    // A redelivery of the pruned id is new again, but its job already exists.
    let again = store.accept(delivery("old", Duration::zero()), vec![spec("t")]).await.unwrap();
    assert_eq!(again, Accepted::New(Admitted { jobs: vec![job_id("old", "t")], skipped: vec![] }));
    assert_eq!(store.job_count().await.unwrap(), 2);
    assert_eq!(store.queued().await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_unopenable_store_names_its_path() {
    if crate::harness::postgres() {
        return; // (an unreachable database: `config_cli`)
    }
    let dir = tempfile::tempdir().unwrap();
    if crate::harness::backend() == "sled" {
        // A file where the database folder should be.
        std::fs::write(dir.path().join("db"), b"not a database").unwrap();
    } else {
        // A folder where the database file should be.
        std::fs::create_dir(dir.path().join("baton.redb")).unwrap();
    }
    let location = match crate::harness::backend().as_str() {
        "sled" => baton::store::Location::Sled { path: dir.path().into(), durability: baton::store::Durability::Fsync },
        _ => baton::store::Location::Redb { path: dir.path().into(), durability: baton::store::Durability::Fsync },
    };
    let err = Store::connect(&location, dir.path()).await.err().expect("open fails").to_string();
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(err.starts_with("cannot open store at"), "{err}");
}

#[tokio::test]
async fn a_group_runs_one_job_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    let grouped = |t: &str| {
        let mut s = spec(t);
        s.concurrency = Some("g".into());
        s
    };
    store.accept(delivery("a", Duration::zero()), vec![grouped("t")]).await.unwrap();
    let mut a = store.claim_next(&limits(), LEASE).await.unwrap().expect("A runs");
    let mut other = spec("t");
    other.repo = Some("c/d".into());
    other.concurrency = Some("g".into());
    store.accept(delivery("c", Duration::zero()), vec![other]).await.unwrap();
    assert!(store.claim_next(&limits(), LEASE).await.unwrap().is_none(), "C waits while A runs");
    assert_eq!(store.queued().await.unwrap().len(), 1);
    a.end(baton::store::JobState::Succeeded, None, None, Utc::now());
    store.finish(&a, &[]).await.unwrap();
    assert!(store.claim_next(&limits(), LEASE).await.unwrap().is_some(), "C runs once A is done");
}

#[tokio::test]
async fn the_queue_is_first_in_first_out_within_a_priority() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    for (name, priority) in [("low", -1), ("first", 0), ("urgent-1", 5), ("second", 0), ("urgent-2", 5)] {
        let mut s = spec(name);
        s.priority = priority;
        store.accept(delivery(name, Duration::zero()), vec![s]).await.unwrap();
    }
    let mut order = Vec::new();
    for e in store.queued().await.unwrap() {
        order.push(store.job(&e.id).await.unwrap().unwrap().trigger);
    }
    assert_eq!(order, ["urgent-1", "urgent-2", "first", "second", "low"]);
    // Claiming takes the head of the queue out.
    let many = Limits { per_repo: 10, ..limits() };
    assert_eq!(store.claim_next(&many, LEASE).await.unwrap().unwrap().trigger, "urgent-1");
    assert_eq!(store.queued().await.unwrap().len(), 4);
}

/// A claim takes the next job within the limits: queue order across
/// repositories, a repository at its limit passed over whole (however long
/// its line), an agent at its cap passed over, and nothing past the
/// replica's own limit.
#[tokio::test]
async fn claims_take_the_next_job_within_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    let queue = [("busy/repo", 0), ("busy/repo", 5), ("other/one", 0), ("other/two", 0), ("other/two", 1)];
    for (n, (repo, priority)) in queue.iter().enumerate() {
        let mut s = spec(&format!("{repo}-{n}"));
        s.repo = Some(repo.to_string());
        s.priority = *priority;
        store.accept(delivery(&format!("d{n}"), Duration::zero()), vec![s]).await.unwrap();
    }
    // A long line on the busy repository, and a job of a capped agent.
    for n in 0..200 {
        let mut s = spec(&format!("line-{n}"));
        s.repo = Some("busy/repo".into());
        store.accept(delivery(&format!("line{n}"), Duration::zero()), vec![s]).await.unwrap();
    }
    let mut capped = spec("capped");
    capped.repo = Some("third/repo".into());
    capped.agent = "slow".into();
    store.accept(delivery("capped", Duration::zero()), vec![capped]).await.unwrap();
    let limits = Limits { per_agent: [("slow".to_string(), 0)].into(), ..limits() };
    let mut claimed = Vec::new();
    while let Some(job) = store.claim_next(&limits, LEASE).await.unwrap() {
        claimed.push(job.trigger);
    }
    assert_eq!(claimed, ["busy/repo-1", "other/two-4", "other/one-2"], "priority, then FIFO; one per repository");
    assert_eq!(store.queued().await.unwrap().len(), 203);
    // Cancelled jobs leave the queue; a full replica claims nothing.
    let two = store.queued().await.unwrap().into_iter().find(|e| e.repo.as_deref() == Some("other/two")).unwrap();
    assert_eq!(store.cancel_queued(&two.id, "no").await.unwrap().unwrap().trigger, "other/two-3");
    assert_eq!(store.queued().await.unwrap().len(), 202);
    let full = Limits { per_replica: 3, per_repo: 100, ..limits };
    assert!(store.claim_next(&full, LEASE).await.unwrap().is_none());
}

#[tokio::test]
async fn a_lease_lapses_unless_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    store.accept(delivery("l", Duration::zero()), vec![spec("t")]).await.unwrap();
    // Long enough that a loaded machine still sees it fresh.
    let job = store.claim_next(&limits(), std::time::Duration::from_secs(3)).await.unwrap().unwrap();
    assert!(store.expired_leases(LEASE).await.unwrap().is_empty(), "fresh lease");
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    assert_eq!(store.expired_leases(LEASE).await.unwrap(), vec![job.id.clone()]);
    store.renew_lease(&job.id, LEASE).await.unwrap();
    assert!(store.expired_leases(LEASE).await.unwrap().is_empty(), "renewed");
    // A job that has ended holds no lease to renew.
    let mut ended = job.clone();
    ended.end(baton::store::JobState::Succeeded, None, None, Utc::now());
    store.finish(&ended, &[]).await.unwrap();
    store.renew_lease(&job.id, std::time::Duration::ZERO).await.unwrap();
    assert!(store.expired_leases(LEASE).await.unwrap().is_empty());
}

/// What runs spend is counted against the rolling day's budgets in the
/// store (both backends): under a cap a match is admitted, past it skipped,
/// and a repository's spending does not count against another's.
#[tokio::test]
async fn spending_past_a_daily_budget_skips_matches() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    let capped = |repo: &str| JobSpec {
        repo: Some(repo.into()),
        daily_budgets: baton::rules::DailyBudgets { repo: Some(1.0), ..Default::default() },
        ..spec("t")
    };
    store.record_spend(&capped("a/b"), 0.6).await.unwrap();
    let first = store.accept(delivery("b1", Duration::zero()), vec![capped("a/b")]).await.unwrap();
    assert!(matches!(first, Accepted::New(ref a) if a.jobs.len() == 1), "{first:?}");
    store.record_spend(&capped("a/b"), 0.5).await.unwrap();
    let second = store.accept(delivery("b2", Duration::zero()), vec![capped("a/b")]).await.unwrap();
    let Accepted::New(Admitted { jobs, skipped }) = second else { panic!("stored: {second:?}") };
    assert!(jobs.is_empty());
    assert_eq!(
        skipped[0].reason,
        "daily budget: a/b's (limits.daily_budget_per_repo_usd) $1.00 is spent ($1.10 in the last 24 h)"
    );
    let other = store.accept(delivery("b3", Duration::zero()), vec![capped("c/d")]).await.unwrap();
    assert!(matches!(other, Accepted::New(ref a) if a.jobs.len() == 1), "{other:?}");
    assert_eq!(store.delivery("b2").await.unwrap().map(|d| d.skipped.len()), Some(1), "kept on the delivery");
}

#[tokio::test]
async fn a_jobs_children_are_listed_newest_first_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    store.accept(delivery("parent", Duration::zero()), vec![spec("lead")]).await.unwrap();
    let parent = job_id("parent", "lead");
    let child = |n: usize| JobSpec { parent: Some(parent.clone()), ..spec(&format!("c{n}")) };
    for n in 0..3 {
        // Unrelated jobs between the children, and another job's child.
        store.accept(delivery(&format!("other-{n}"), Duration::zero()), vec![spec("x")]).await.unwrap();
        let stranger = JobSpec { parent: Some("someone-else".into()), ..spec("s") };
        store.accept(delivery(&format!("stranger-{n}"), Duration::zero()), vec![stranger]).await.unwrap();
        store.accept(delivery(&format!("child-{n}"), Duration::zero()), vec![child(n)]).await.unwrap();
    }
    let ids = |jobs: Vec<baton::store::Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let query =
        |limit, before| baton::store::JobQuery { parent: Some(parent.clone()), limit, before, ..Default::default() };
    let all = store.list_jobs(&query(10, None)).await.unwrap();
    let want: Vec<String> = (0..3).rev().map(|n| job_id(&format!("child-{n}"), &format!("c{n}"))).collect();
    assert_eq!(ids(all.clone()), want);
    let first = store.list_jobs(&query(2, None)).await.unwrap();
    assert_eq!(ids(first.clone()), want[..2]);
    let rest = store.list_jobs(&query(2, Some(first[1].seq))).await.unwrap();
    assert_eq!(ids(rest), want[2..]);
}

#[tokio::test]
async fn the_queue_depth_counts_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    for n in 0..3 {
        store.accept(delivery(&format!("q-{n}"), Duration::zero()), vec![spec(&format!("t{n}"))]).await.unwrap();
    }
    // A redelivery queues nothing more.
    store.accept(delivery("q-0", Duration::zero()), vec![spec("t0")]).await.unwrap();
    assert_eq!(store.queue_len().await.unwrap(), 3);
    let many = Limits { per_replica: 100, per_repo: 100, ..Limits::default() };
    let job = store.claim_next(&many, LEASE).await.unwrap().expect("a job");
    assert_eq!(store.queue_len().await.unwrap(), 2);
    store.cancel_queued(&job_id("q-2", "t2"), "api").await.unwrap();
    // Cancelling a job no longer queued changes nothing.
    store.cancel_queued(&job.id, "api").await.unwrap();
    assert_eq!(store.queue_len().await.unwrap(), 1);
    assert_eq!(store.queued().await.unwrap().len(), 1);
}

/// What baton notes of a pull request lives as long as it is used: a note
/// or head unwritten and unread since the cutoff is forgotten, one read
/// since then stays.
#[tokio::test]
async fn notes_and_heads_unused_since_the_cutoff_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    let (repo, number) = ("a/b".to_string(), 7);
    let repairs = Note::Repairs { repo: repo.clone(), number };
    let pushed = Note::Pushed { repo: repo.clone(), number };
    let review = Note::Reviewed { repo: repo.clone(), number, trigger: "review".into() };
    let head = PrHead { sha: "c0ffee".into(), ..PrHead::default() };
    store.count_up(&repairs).await.unwrap();
    store.set_note(&pushed, &serde_json::json!("c0ffee")).await.unwrap();
    store.set_note(&review, &serde_json::json!({"head": "c0ffee"})).await.unwrap();
    store.set_head(&repo, number, &head, "2026-01-01T00:00:00Z").await.unwrap();
    assert_eq!(store.prune_notes(Utc::now() - Duration::hours(1)).await.unwrap(), 0, "all in use");

    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let cutoff = Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    // Read since the cutoff: these stay.
    assert_eq!(store.note(&review).await.unwrap(), Some(serde_json::json!({"head": "c0ffee"})));
    assert_eq!(store.pr_head(&repo, number).await.unwrap().map(|h| h.sha), Some("c0ffee".into()));
    assert_eq!(store.prune_notes(cutoff).await.unwrap(), 2, "the count and the pushed commit");
    assert_eq!(store.note(&repairs).await.unwrap(), None);
    assert_eq!(store.note(&pushed).await.unwrap(), None);
    assert!(store.note(&review).await.unwrap().is_some());
    assert!(store.head(&repo, number).await.unwrap().is_some());

    // Everything forgotten once nothing is used past a later cutoff; a
    // forgotten count starts from zero.
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    assert_eq!(store.prune_notes(Utc::now()).await.unwrap(), 2);
    assert_eq!(store.head(&repo, number).await.unwrap(), None);
    assert_eq!(store.count_up(&repairs).await.unwrap(), 1);
}

/// Noting a head says which commit it moved from, only when it moved
/// forward to another commit.
#[tokio::test]
async fn a_head_moving_forward_names_the_commit_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::harness::open_store(dir.path()).await;
    let at = |sha: &str| PrHead { sha: sha.into(), ..PrHead::default() };
    let set = |sha: &'static str, when: &'static str| {
        let store = store.clone();
        async move { store.set_head("a/b", 2, &at(sha), when).await.unwrap() }
    };
    assert_eq!(set("one", "2026-01-01T00:00:00Z").await, None, "nothing before it");
    assert_eq!(set("one", "2026-01-01T00:01:00Z").await, None, "the same commit");
    assert_eq!(set("two", "2026-01-01T00:02:00Z").await.as_deref(), Some("one"));
    assert_eq!(set("old", "2026-01-01T00:00:30Z").await, None, "an older event moves nothing");
    assert_eq!(store.head("a/b", 2).await.unwrap().as_deref(), Some("two"));
}
