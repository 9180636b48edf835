//! Leases: a running job's worker renews its claim; a claim whose worker
//! stopped renewing is taken back and the job runs again, once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use baton::config::Config;
use baton::engine::Engine;
use baton::rules::{RuleSet, SharedRules};
use baton::store::{Delivery, Store};
use tokio_util::sync::CancellationToken;

use crate::harness::{fixture, WAIT};

const LEASE: Duration = Duration::from_secs(1);

struct Setup {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    store: Store,
    engine: Arc<Engine>,
    runs: std::path::PathBuf,
}

/// A store with one queued job whose agent appends to `runs` after `sleep`
/// seconds, and an engine (not yet running) with a short lease.
async fn setup(sleep: &str) -> Setup {
    let data = tempfile::tempdir().unwrap();
    let triggers = tempfile::tempdir().unwrap();
    let runs = data.path().join("runs");
    std::fs::write(
        triggers.path().join("work.toml"),
        "on = [\"issues.opened\"]\n[job]\nagent = \"script\"\nworkspace = \"none\"\nprompt = \"x\"\n[output]\nkind = \"none\"\n",
    )
    .unwrap();
    let config = format!(
        "[storage]\npath = \"{data}\"\n[agents.script]\ncommand = [\"sh\", \"-c\", \"sleep {sleep}; echo run >> {runs}; echo done\"]\n",
        data = data.path().display(),
        runs = runs.display(),
    );
    let config = Config::from_source(None, &config, data.path()).unwrap();
    let (set, errors) = RuleSet::load(triggers.path(), &config);
    assert!(errors.is_empty(), "{errors:?}");
    let rules = SharedRules::new(set, Vec::new());
    let store = crate::harness::open_store(&data.path().join("store")).await;
    let event = baton::forge::github::normalize("issues", "lease-1", &fixture("issues/opened.payload.json")).unwrap();
    store
        .accept(Delivery::new("lease-1", "github", "issues.opened"), rules.current().match_event(&event))
        .await
        .unwrap();
    let mut engine =
        Engine::new(store.clone(), rules, Arc::new(config), Arc::default(), Arc::default(), None, Arc::default());
    engine.set_lease(LEASE);
    Setup { _dirs: (data, triggers), store, engine: Arc::new(engine), runs }
}

/// Runs the dispatcher until job `id` has ended; returns the job.
async fn run_until_finished(s: &Setup, id: &str) -> baton::store::Job {
    let stop = CancellationToken::new();
    let dispatcher = tokio::spawn(s.engine.clone().run(stop.clone()));
    let start = std::time::Instant::now();
    let job = loop {
        let job = s.store.job(id).await.unwrap().unwrap();
        if job.state.is_final() {
            break job;
        }
        assert!(start.elapsed() < WAIT, "job did not finish: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.cancel();
    let _ = dispatcher.await;
    job
}

fn runs(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

#[tokio::test]
async fn a_claim_whose_worker_is_gone_is_taken_back_when_its_lease_lapses() {
    let s = setup("0").await;
    // Claimed as a worker would, and then the worker is never heard of again.
    let limits = baton::store::Limits { per_replica: 1, per_repo: 1, ..Default::default() };
    let id = s.store.claim_next(&limits, LEASE).await.unwrap().unwrap().id;
    let job = run_until_finished(&s, &id).await;
    assert_eq!(job.state.to_string(), "succeeded", "{job:?}");
    assert_eq!(job.history.len(), 2, "{job:?}");
    assert_eq!(job.history[0].outcome, Some(baton::store::Outcome::Interrupted));
    assert!(job.history[0].error.as_deref().is_some_and(|e| e.contains("lease expired")), "{job:?}");
    assert_eq!(runs(&s.runs), 1, "the agent ran once");
}

#[tokio::test]
async fn a_worker_renews_its_lease_for_as_long_as_its_job_runs() {
    // The agent runs for several leases.
    let s = setup("3.5").await;
    let id = s.store.queued().await.unwrap()[0].id.clone();
    let job = run_until_finished(&s, &id).await;
    assert_eq!(job.state.to_string(), "succeeded", "{job:?}");
    assert_eq!(job.history.len(), 1, "never taken back while renewed: {job:?}");
    assert_eq!(runs(&s.runs), 1);
}
