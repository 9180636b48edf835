//! Hot reload of the trigger folder: on change and on SIGHUP; a broken file
//! leaves the previous set in force and is shown by `GET /api/triggers`.

use serde_json::Value;

use crate::harness::{eventually_async, fixture, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario};

const SECRET: &str = "reload-secret";

fn trigger(prompt: &str) -> String {
    format!("on = [\"issues.opened\"]\n[job]\nagent = \"noop\"\nworkspace = \"none\"\nprompt = \"{prompt}\"\n[output]\nkind = \"none\"\n")
}

async fn triggers(baton: &Baton) -> Value {
    let (status, v) = baton.get("/api/triggers").await;
    assert_eq!(status, 200);
    v
}

async fn prompt_of_new_job(baton: &Baton, delivery: &str) -> String {
    let (status, answer) = baton.deliver(SECRET, "issues", delivery, &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["jobs"][0].as_str().expect("one job").to_string();
    baton.job(&id).await["spec"]["prompt"].as_str().unwrap().to_string()
}

/// The triggers are what these tests rewrite, as text; the config stays.
fn config() -> String {
    Scenario::new().github(GitHub::secret(SECRET)).agent("noop", Agent::command(&["true"])).toml()
}

#[tokio::test]
async fn triggers_reload_on_change_and_a_broken_file_keeps_the_old_set() {
    let w = Workdir::new();
    w.config(&config());
    w.trigger("one", &trigger("first"));
    let baton = Baton::start(w.path(), &[]);
    let v = triggers(&baton).await;
    assert_eq!(v["triggers"][0]["name"], "one");
    assert_eq!(v["errors"], serde_json::json!([]));
    assert_eq!(prompt_of_new_job(&baton, "r1").await, "first");

    // An edit is picked up.
    w.trigger("one", &trigger("second"));
    eventually_async("the edit to load", || async { prompt_of_new_job(&baton, &unique()).await == "second" }).await;

    // A broken file: the error shows, the previous set stays in force.
    w.trigger("two", "on = [\"issues.opened\"]\n[job]\nagnet = \"noop\"\n");
    eventually_async("the error to show", || async {
        !triggers(&baton).await["errors"].as_array().unwrap().is_empty()
    })
    .await;
    let v = triggers(&baton).await;
    let error = v["errors"][0]["error"].as_str().unwrap();
    assert!(error.contains("two.toml:3:1: unknown key `agnet` (did you mean `agent`?)"), "{error}");
    assert_eq!(v["triggers"].as_array().unwrap().len(), 1);
    assert_eq!(prompt_of_new_job(&baton, "r3").await, "second");

    // Fixed: both load, the error clears.
    w.trigger("two", &trigger("third"));
    eventually_async("the fix to load", || async {
        let v = triggers(&baton).await;
        v["triggers"].as_array().unwrap().len() == 2 && v["errors"].as_array().unwrap().is_empty()
    })
    .await;
}

#[tokio::test]
async fn sighup_reloads_even_when_nothing_looks_changed() {
    let w = Workdir::new();
    w.config(&config());
    let path = w.path().join("triggers/one.toml");
    w.trigger("one", &trigger("aaaa"));
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let baton = Baton::start(w.path(), &[]);
    assert_eq!(prompt_of_new_job(&baton, "h1").await, "aaaa");

    // Same size, same mtime: a poll cannot see it (as with some bind mounts).
    w.trigger("one", &trigger("bbbb"));
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(prompt_of_new_job(&baton, "h2").await, "aaaa", "the poll cannot see this change");
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(baton.pid() as i32, libc::SIGHUP) };
    eventually_async("SIGHUP to reload", || async { prompt_of_new_job(&baton, &unique()).await == "bbbb" }).await;
}

fn unique() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("u{}", N.fetch_add(1, Ordering::SeqCst))
}
