//! The embedded engines: a sled store copied into redb by `baton migrate
//! --from sled` with nothing lost, and a damaged redb file refused with a
//! clear error rather than opened.

use std::path::Path;
use std::process::Command;

use baton::rules::{JobSpec, OutputKind};
use baton::store::{Delivery, Durability, Limits, Location, Note, PrHead, Publication, Store};
use chrono::Utc;
use serde_json::json;

use crate::harness::BIN;

const LEASE: std::time::Duration = std::time::Duration::from_secs(60);

fn spec(trigger: &str, repo: &str) -> JobSpec {
    JobSpec {
        trigger: trigger.into(),
        event: "issues.opened".into(),
        repo: Some(repo.into()),
        subject: Some(1),
        agent: "a".into(),
        prompt: "p".into(),
        max_attempts: 1,
        output: OutputKind::None,
        ..JobSpec::default()
    }
}

async fn connect(location: Location, dir: &Path) -> Store {
    let start = std::time::Instant::now();
    loop {
        match Store::connect(&location, dir).await {
            Ok(store) => return store,
            // A store just dropped lets go of its lock a moment later.
            Err(e) if start.elapsed() < crate::harness::WAIT => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn sled_at(dir: &Path) -> Location {
    Location::Sled { path: dir.to_path_buf(), durability: Durability::Fsync }
}

/// A sled store with every kind of record: deliveries, queued and running
/// jobs, a finished one with its publication still in the outbox, a note,
/// a pull request head. `baton migrate --from sled` copies it into redb:
/// every table holds what it held, record for record and byte for byte,
/// the daemon's default then opens the copy, queued jobs are claimed in
/// their order, and new jobs are numbered after the old ones.
#[tokio::test]
async fn migrate_from_sled_copies_every_record_into_redb() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join(".baton");
    std::fs::write(dir.path().join("baton.toml"), "").unwrap();
    let before = {
        let store = connect(sled_at(&storage), &storage).await;
        for n in 0..40 {
            let d = Delivery::new(format!("d{n}"), "github", "issues.opened");
            store.accept(d, vec![spec("t", &format!("o/r{}", n % 3)), spec("u", "o/r9")]).await.unwrap();
        }
        let many = Limits { per_replica: 100, per_repo: 100, ..Limits::default() };
        let mut done = store.claim_next(&many, LEASE).await.unwrap().expect("a job");
        store.claim_next(&many, LEASE).await.unwrap().expect("a second job, left running");
        done.end(baton::store::JobState::Succeeded, None, None, Utc::now());
        let publication: Publication = serde_json::from_value(json!({
            "job": done.id, "repo": "o/r0", "target": {"kind": "issue_comment", "number": 1},
            "body": "done", "state": "pending", "attempts": 0, "next_attempt_at": Utc::now(),
            "last_error": null, "url": null
        }))
        .unwrap();
        store.finish(&done, &[publication]).await.unwrap();
        let note = Note::Repairs { repo: "o/r0".into(), number: 1 };
        store.count_up(&note).await.unwrap();
        let head = PrHead { sha: "c0ffee".into(), ..PrHead::default() };
        store.set_head("o/r0", 1, &head, "2026-01-01T00:00:00Z").await.unwrap();
        assert_eq!(store.outbox().await.unwrap().len(), 1);
        store.close().await.unwrap();
        store.census().await.unwrap()
    };
    // The sled handle above lets go of its lock a moment after it goes.
    let mut out = None;
    for _ in 0..100 {
        let o = Command::new(BIN).args(["migrate", "--from", "sled"]).current_dir(dir.path()).output().unwrap();
        if o.status.success() {
            out = Some(o);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = out.expect("baton migrate --from sled succeeds");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("ok: copied into") && said.contains("jobs"), "{said}");
    assert!(
        storage.join("baton.redb").exists() && storage.join("db.migrated").exists() && !storage.join("db").exists()
    );

    // The default opens the copy: redb, since the sled files moved aside.
    assert_eq!(baton::config::Backend::found_in(&storage), baton::config::Backend::Redb);
    let store = connect(Location::Redb { path: storage.clone(), durability: Durability::Fsync }, &storage).await;
    let after = store.census().await.unwrap();
    for t in &before {
        let copied = after.iter().find(|a| a.name == t.name).unwrap_or_else(|| panic!("no table {}", t.name));
        assert_eq!((copied.records, copied.bytes), (t.records, t.bytes), "table {}", t.name);
    }
    assert_eq!(before.iter().find(|t| t.name == "jobs").map(|t| t.records), Some(80));
    assert_eq!(store.outbox().await.unwrap().len(), 1);
    assert_eq!(store.running().await.unwrap().len(), 1);
    assert_eq!(store.queue_len().await.unwrap(), 78);
    let note = Note::Repairs { repo: "o/r0".into(), number: 1 };
    assert_eq!(store.count_up(&note).await.unwrap(), 2, "the count goes on");
    assert_eq!(store.pr_head("o/r0", 1).await.unwrap().map(|h| h.sha), Some("c0ffee".into()));
    let many = Limits { per_replica: 100, per_repo: 100, ..Limits::default() };
    let next = store.claim_next(&many, LEASE).await.unwrap().expect("a queued job");
    assert_eq!(next.delivery, "d1", "queue order kept");
    let newest = store.list_jobs(&baton::store::JobQuery { limit: 1, ..Default::default() }).await.unwrap();
    store.accept(Delivery::new("later", "github", "issues.opened"), vec![spec("t", "o/r0")]).await.unwrap();
    let later = store.job(&baton::store::job_id("later", "t")).await.unwrap().expect("the new job");
    assert!(later.seq > newest[0].seq, "numbered after every copied job: {} vs {}", later.seq, newest[0].seq);
    drop(store);

    // Twice is refused: the copy is there.
    let again = Command::new(BIN).args(["migrate", "--from", "sled"]).current_dir(dir.path()).output().unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("a redb store is there already"), "{err}");
}

/// 64 KiB of a redb store's file overwritten: the store refuses to open,
/// naming the file, and the daemon does not start on it. (sled opened such
/// a file without complaint.)
#[tokio::test]
async fn a_damaged_redb_file_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join(".baton");
    let location = Location::Redb { path: storage.clone(), durability: Durability::Fsync };
    {
        let store = connect(location.clone(), &storage).await;
        for n in 0..300 {
            let mut s = spec("t", "o/r");
            s.prompt = format!("{n} {}", "x".repeat(2000));
            store.accept(Delivery::new(format!("d{n}"), "github", "issues.opened"), vec![s]).await.unwrap();
        }
        store.close().await.unwrap();
    }
    let file = storage.join("baton.redb");
    let len = std::fs::metadata(&file).unwrap().len();
    assert!(len > 256 << 10, "{len} bytes");
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.seek(std::io::SeekFrom::Start(len / 2)).unwrap();
        f.write_all(&vec![0x5a; 64 << 10]).unwrap();
        f.sync_all().unwrap();
    }
    let start = std::time::Instant::now();
    let err = loop {
        match Store::connect(&location, &storage).await {
            Ok(_) => panic!("a damaged file was opened"),
            Err(e) if e.to_string().contains("lock") && start.elapsed() < crate::harness::WAIT => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => break e.to_string(),
        }
    };
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.to_lowercase().contains("corrupt"), "{err}");
    // The daemon says the same and stops.
    std::fs::write(dir.path().join("baton.toml"), "[server]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(BIN).arg("serve").current_dir(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("baton.redb") && said.to_lowercase().contains("corrupt"), "{said}");
}

/// While one process has the store, or is still closing it (redb has let
/// go of the file but the seal is not yet written), another is refused:
/// it would find no seal, write, and have its writes sealed unchecked.
#[tokio::test]
async fn a_redb_store_another_process_holds_is_refused_until_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join(".baton");
    let location = Location::Redb { path: storage.clone(), durability: Durability::Fsync };
    connect(location.clone(), &storage).await.close().await.unwrap();
    // What a closing process holds: the lock, with redb's file let go.
    let held = std::fs::File::open(storage.join("baton.redb.lock")).unwrap();
    let start = std::time::Instant::now();
    // (The store just closed lets go of it a moment later.)
    while held.try_lock().is_err() {
        assert!(start.elapsed() < crate::harness::WAIT, "the closed store kept its lock");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let err = Store::connect(&location, &storage).await.err().expect("opened while another process held it");
    let err = err.to_string();
    assert!(
        err.contains(&storage.join("baton.redb").display().to_string()) && err.contains("another process"),
        "{err}"
    );
    // The daemon says so once, and stops.
    std::fs::write(dir.path().join("baton.toml"), "[server]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(BIN).arg("serve").current_dir(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.matches("another process").count(), 1, "{said}");
    drop(held);
    let store = connect(location, &storage).await;
    assert_eq!(store.job_count().await.unwrap(), 0);
}

/// A restart after a clean stop trusts the file baton closed, without
/// reading every page of it (seconds at a million jobs); a file changed
/// since, or left by a crash, is checked again.
#[tokio::test]
async fn a_cleanly_closed_redb_file_reopens_unchecked_and_a_changed_one_is_checked() {
    const CHECKED: &str = "Checked every page of the store's file";
    let w = crate::harness::Workdir::new();
    w.config("[server]\nlisten = \"127.0.0.1:0\"\n");
    let stop = |mut baton: crate::harness::Baton| {
        unsafe { libc::kill(baton.pid() as i32, libc::SIGTERM) };
        assert_eq!(baton.wait_exit(), Some(0), "{}", baton.log_text());
        baton.log_text()
    };
    let first = stop(crate::harness::Baton::start(w.path(), &[]));
    assert!(!first.contains(CHECKED), "a new store has nothing to check:\n{first}");
    let file = w.path().join(".baton/baton.redb");
    assert!(file.exists());

    let clean = stop(crate::harness::Baton::start(w.path(), &[]));
    assert!(!clean.contains(CHECKED), "a cleanly closed file was read through:\n{clean}");

    // The same bytes written back: nothing differs but that it was written.
    {
        use std::io::{Read, Seek, Write};
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        let mut page = vec![0u8; 4096];
        f.read_exact(&mut page).unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.write_all(&page).unwrap();
    }
    let changed = stop(crate::harness::Baton::start(w.path(), &[]));
    assert!(changed.contains(CHECKED), "a file written since its close was trusted:\n{changed}");

    let mut crashed = crate::harness::Baton::start(w.path(), &[]);
    crashed.kill9();
    let after_crash = stop(crate::harness::Baton::start(w.path(), &[]));
    assert!(after_crash.contains(CHECKED), "a file left by a crash was trusted:\n{after_crash}");
}
