//! Integration tests: the real `baton` binary over loopback HTTP, real git
//! repositories, real agent processes, and a fake GitHub API that records
//! what it is sent. One test crate, so it links once; `tests/pg` runs the
//! storage tests again on PostgreSQL.

/// The store these tests run on, unless `BATON_TEST_BACKEND` says otherwise.
pub const DEFAULT_BACKEND: &str = "redb";

mod agent;
mod api;
mod api_jobs;
mod approve;
mod browser;
mod chain;
mod config_cli;
mod crash;
mod defuse;
mod deploy;
mod docs;
mod e2e;
mod engines;
mod environments;
mod escape;
mod fake_github;
mod fake_gitlab;
mod gitlab;
mod gitlab_catchup;
mod gitlab_client;
mod groups;
mod harness;
mod hostile;
mod ingress;
mod layout;
mod lease;
mod mcp_server;
mod messages;
mod normalize;
mod notify;
mod publish;
mod push;
mod real_agents;
mod reload;
mod rules;
mod sandbox;
mod scenario;
mod schedule;
mod soak;
mod store;
mod teams;
mod workspaces;
