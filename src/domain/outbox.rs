//! The seam between the engine and publishing: which outbox records a job's
//! start and end write, and the title its pull request carries.
//!
//! The engine stores what a [`PlanOutbox`] returns together with the job's
//! state (the store's outbox is the only hand-off; the publisher reads it
//! from there). `publish::plan::Planner` implements it and the daemon wires
//! the two, so the engine never imports `publish`, and a forge of its own
//! can bring its own planner. Pure: planning does no IO.

use super::{Job, Publication};

/// What a job puts in the outbox, decided by whoever publishes.
pub trait PlanOutbox: Send + Sync {
    /// What a job's start puts out, once per job (a reaction, a status
    /// comment, an in-progress check).
    fn at_start(&self, job: &Job) -> Vec<Publication>;
    /// What a job's end puts out: its result where its output says, and
    /// the notifications its trigger asks for.
    fn at_end(&self, job: &Job) -> Vec<Publication>;
    /// The title of the pull request the job opens; the commit baton makes
    /// for it says the same.
    fn pull_request_title(&self, job: &Job) -> String;
}

/// Plans nothing: an engine nobody publishes for (`simulate --run`, tests
/// of the engine alone).
pub(crate) struct NoOutbox;

impl PlanOutbox for NoOutbox {
    fn at_start(&self, _: &Job) -> Vec<Publication> {
        Vec::new()
    }

    fn at_end(&self, _: &Job) -> Vec<Publication> {
        Vec::new()
    }

    fn pull_request_title(&self, job: &Job) -> String {
        format!("baton: {}", job.trigger)
    }
}
