//! The storage tests of `tests/it` again, on PostgreSQL (each test in a
//! schema of its own), and the tests only several replicas can run: three
//! daemons on one database under a flood with one killed, a schedule on
//! three replicas, a concurrency group raced by two, a database restart.
//!
//! Needs the PostgreSQL of `BATON_TEST_DATABASE_URL` (default: the project
//! machine's, `postgres://postgres@127.0.0.1:5432/test`).

/// The store these tests run on, unless `BATON_TEST_BACKEND` says otherwise.
pub const DEFAULT_BACKEND: &str = "postgres";

#[path = "../it/api.rs"]
mod api;
#[path = "../it/api_jobs.rs"]
mod api_jobs;
#[path = "../it/approve.rs"]
mod approve;
#[path = "../it/chain.rs"]
mod chain;
#[path = "../it/e2e.rs"]
mod e2e;
#[path = "../it/fake_github.rs"]
mod fake_github;
#[path = "../it/groups.rs"]
mod groups;
#[path = "../it/harness.rs"]
mod harness;
#[path = "../it/ingress.rs"]
mod ingress;
#[path = "../it/lease.rs"]
mod lease;
#[path = "../it/publish.rs"]
mod publish;
#[path = "../it/push.rs"]
mod push;
mod replicas;
#[path = "../it/scenario.rs"]
mod scenario;
#[path = "../it/schedule.rs"]
mod schedule;
#[path = "../it/soak.rs"]
mod soak;
#[path = "../it/store.rs"]
mod store;
#[path = "../it/teams.rs"]
mod teams;
mod wire;
