//! The storage tests of `tests/it` again, on sled: the embedded engine of
//! stores made before redb became the default, still selectable with
//! `[storage] backend = "sled"`. The store's own tests, the crash tests
//! (kill -9 under a flood, the fsync before every answer) and the quick soak.

// The helpers are tests/it's; only some of its tests are here.
#![allow(dead_code)]

/// The store these tests run on, unless `BATON_TEST_BACKEND` says otherwise.
pub const DEFAULT_BACKEND: &str = "sled";

#[path = "../it/crash.rs"]
mod crash;
#[path = "../it/fake_github.rs"]
mod fake_github;
#[path = "../it/harness.rs"]
mod harness;
#[path = "../it/scenario.rs"]
mod scenario;
#[path = "../it/soak.rs"]
mod soak;
#[path = "../it/store.rs"]
mod store;
