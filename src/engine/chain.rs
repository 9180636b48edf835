//! Chaining: a job's end goes back through the rules as a `job.succeeded`
//! or `job.failed` event (`domain::chain` makes the event), and the jobs it
//! starts enter through the front door like any delivery's. A crash between the end and this
//! leaves the end pending; recovery sends it through again.

use super::Engine;
use crate::admit::{Door, Origin, Received};
use crate::store::{Accepted, Job};

impl Engine {
    /// Sends a job's end back through the rules as `job.succeeded` or
    /// `job.failed`; the jobs it starts are stored like any delivery's.
    pub(super) async fn emit_end(&self, job: &Job) {
        let Some(event) = crate::domain::chain::job_event(job) else { return };
        let door = Door { store: &self.store, rules: &self.rules, wake: Some(&self.wake), reject_replays: false };
        let (id, kind) = (event.delivery.clone(), event.kind.clone());
        match door.admit(event, Origin::Chain).await {
            Ok(Some(Received { accepted: Accepted::New(admitted), .. })) => {
                tracing::info!(delivery = %id, event = %kind, jobs = admitted.jobs.len(), "Job end started jobs.");
            }
            Ok(_) => {}
            Err(e) => {
                // Left pending: the next start sends it through again.
                tracing::error!(delivery = %id, error = %e, "Could not store the jobs a job end started.");
                return;
            }
        }
        if let Err(e) = self.store.end_handled(&job.id).await {
            tracing::warn!(job = %job.id, error = %e, "Could not clear the job's pending end.");
        }
    }
}
