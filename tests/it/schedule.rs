//! Schedules against a real store with a driven clock: first sight owes
//! nothing, a due slot fires once, downtime collapses into one run, and a
//! restart neither doubles nor drops a run.

use std::path::Path;

use baton::config::Config;
use baton::rules::{RuleSet, SharedRules};
use baton::schedule::tick;
use chrono::{DateTime, Utc};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn rules(dir: &Path) -> SharedRules {
    std::fs::write(
        dir.join("hourly.toml"),
        "on = [\"schedule\"]\nschedule = \"0 * * * *\"\n[filter]\nrepos = [\"acme/app\", \"acme/lib\"]\n[job]\nagent = \"codex\"\nprompt = \"chores for {{ repository.full_name }} at {{ schedule.time }}\"\n",
    )
    .unwrap();
    let config = Config::from_source(None, "", Path::new("/")).unwrap();
    let (set, errors) = RuleSet::load(dir, &config);
    assert!(errors.is_empty(), "{errors:?}");
    SharedRules::new(set, Vec::new())
}

#[tokio::test]
async fn catch_up_across_a_restart_fires_once() {
    let triggers = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let rules = rules(triggers.path());
    let store = crate::harness::open_store(data.path()).await;

    assert!(tick(&store, &rules, at("2026-11-24T00:30:00Z")).await.unwrap().is_empty(), "first sight owes nothing");
    assert!(tick(&store, &rules, at("2026-11-24T00:59:59Z")).await.unwrap().is_empty());
    let fired = tick(&store, &rules, at("2026-11-24T01:00:00Z")).await.unwrap();
    assert_eq!(fired.len(), 2, "one per repository: {fired:?}");
    assert!(tick(&store, &rules, at("2026-11-24T01:00:30Z")).await.unwrap().is_empty(), "a slot fires once");

    // The daemon is down from 01:30 to 05:10, then restarts on the same store.
    drop(store);
    let store = crate::harness::reopen_store(data.path()).await;
    let fired = tick(&store, &rules, at("2026-11-24T05:10:00Z")).await.unwrap();
    assert_eq!(fired.len(), 2, "missed slots collapse into one run per repository: {fired:?}");
    assert!(fired[0].ends_with(&at("2026-11-24T05:00:00Z").timestamp().to_string()), "{fired:?}");
    assert_eq!(store.queued().await.unwrap().len(), 4);

    // A crash after the jobs were stored but before the fire time was: the
    // same slot again is a duplicate, never a second run.
    store.set_schedule_last("hourly", at("2026-11-24T04:30:00Z")).await.unwrap();
    assert!(tick(&store, &rules, at("2026-11-24T05:20:00Z")).await.unwrap().is_empty());
    assert_eq!(store.queued().await.unwrap().len(), 4);

    let mut jobs = Vec::new();
    for e in store.queued().await.unwrap() {
        jobs.push(store.job(&e.id).await.unwrap().unwrap());
    }
    assert!(
        jobs.iter().any(|j| j.spec.prompt == "chores for acme/lib at 2026-11-24T05:00:00+00:00"),
        "{:?}",
        jobs[3].spec.prompt
    );
}
