//! Chaining: a job's end goes back through the rules as a `job.succeeded`
//! or `job.failed` event (`domain::chain` makes the event), and the jobs it
//! starts are stored like any delivery's. A crash between the end and this
//! leaves the end pending; recovery sends it through again.

use super::Engine;
use crate::store::{Accepted, Delivery, Job};

impl Engine {
    /// Sends a job's end back through the rules as `job.succeeded` or
    /// `job.failed`; the jobs it starts are stored like any delivery's.
    pub(super) async fn emit_end(&self, job: &Job) {
        let Some(event) = crate::domain::chain::job_event(job) else { return };
        let specs = self.rules.current().match_event(&event);
        if !specs.is_empty() {
            let delivery = Delivery::new(&event.delivery, &event.source, &event.kind);
            match self.store.accept(delivery, specs).await {
                Ok(Accepted::New(admitted)) => {
                    tracing::info!(delivery = %event.delivery, event = %event.kind, jobs = admitted.jobs.len(), "Job end started jobs.");
                    self.wake.notify_one();
                }
                Ok(Accepted::Duplicate | Accepted::Replay { .. }) => {}
                Err(e) => {
                    // Left pending: the next start sends it through again.
                    tracing::error!(delivery = %event.delivery, error = %e, "Could not store the jobs a job end started.");
                    return;
                }
            }
        }
        if let Err(e) = self.store.end_handled(&job.id).await {
            tracing::warn!(job = %job.id, error = %e, "Could not clear the job's pending end.");
        }
    }
}
