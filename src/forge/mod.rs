//! What differs between code hosts ("forges"): verifying a webhook and naming
//! its delivery, normalizing its payload into an `Event`, credentials, clone
//! URLs and change-request refs, the REST calls each output needs, catch-up
//! of missed deliveries, and which outputs the forge offers at all.
//!
//! GitHub (`github/`) is the only forge today. The seam is a closed enum
//! (`Forge`), as bors and Atlantis do, rather than a trait object as
//! Renovate's `Platform` is: there will be a handful of forges, all in this
//! crate, so a `match` shows every forge's answer side by side, the compiler
//! names each place a new forge must fill, and nothing pays for dynamic
//! dispatch or `async` trait objects. Everything forge-neutral (the `Event`,
//! rules, the store, the outbox) stays outside; this module imports only
//! `config` and `event`, so the rules and the records can name its types.

pub mod github;
pub mod signature;

use std::future::Future;

/// What catch-up asks of the store: whether a delivery is already held, and
/// a once-only note that its redelivery was asked for. A trait because the
/// store sits above `forge` in the module graph (its records name forge
/// types); the store implements it.
pub trait Deliveries {
    /// Whether a delivery with this id is stored.
    fn holds(&self, delivery: &str) -> impl Future<Output = Result<bool, String>> + Send;
    /// Notes that a redelivery was asked for; `false` when one already was
    /// (on any replica), so each delivery is asked for once.
    fn note_redelivery(&self, delivery: &str) -> impl Future<Output = Result<bool, String>> + Send;
}
