//! baton: an event-triggered automation daemon for coding agents.
//!
//! Data flows one way: `ingress` (webhooks) → `rules` (match, render) →
//! `store` (durable) → `engine` (run agents) → `publish` (GitHub). `domain`
//! holds the records and the policies the store applies; `api` reads the
//! store and asks the engine to cancel; `mcp` serves the API's job tools
//! over MCP; `forge` holds what differs between code hosts (GitHub today);
//! `daemon` wires it all.

pub(crate) mod admit;
pub mod api;
pub mod cache;
pub mod config;
pub mod daemon;
pub mod diag;
pub mod domain;
pub mod engine;
pub mod event;
pub mod forge;
pub mod harden;
pub(crate) mod ingress;
pub mod mcp;
pub(crate) mod metrics;
pub mod publish;
pub(crate) mod redact;
pub mod rules;
pub mod sandbox;
pub mod schedule;
pub mod store;
pub(crate) mod tree;
pub(crate) mod workspace;
