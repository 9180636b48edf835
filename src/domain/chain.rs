//! Job ends as events: when a job succeeds or fails, an `Event` of kind
//! `job.succeeded` / `job.failed` goes back through the rules, so a trigger
//! with `filter.triggers = ["investigate"]` can take over (investigate → fix
//! → review). Its delivery id derives from the job and its run, so a job's
//! end is admitted once however often it is reprocessed.

use serde_json::json;

use super::{Job, JobState};
use crate::event::{Event, ParentJob, Repository};

/// The event for a job that ended; `None` for a cancelled job.
pub fn job_event(job: &Job) -> Option<Event> {
    let action = match job.state {
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        _ => return None,
    };
    let spec = &job.spec;
    let subject_key = if spec.subject_is_pull_request { "pull_request" } else { "issue" };
    let mut payload = json!({
        "action": action,
        "trigger": job.trigger,
        "result": job.result,
        "error": job.error,
        "subject": job.subject,
        "job": {
            "id": job.id,
            "trigger": job.trigger,
            "state": job.state,
            "event": job.event,
            "delivery": job.delivery,
            "attempts": job.attempts,
            "result": job.result,
            "error": job.error,
        },
        "repository": {
            "full_name": job.repo,
            "default_branch": spec.default_branch,
        },
    });
    if let Some(n) = job.subject {
        payload[subject_key] = json!({ "number": n });
    }
    let delivery = format!("job:{}:{}", job.id, job.history.len());
    Some(Event {
        repository: job.repo.clone().map(|full_name| Repository {
            full_name,
            default_branch: spec.default_branch.clone(),
            id: None,
        }),
        access: spec.access,
        subject: job.subject,
        subject_is_pull_request: spec.subject_is_pull_request,
        head_sha: spec.head_sha.clone(),
        conclusion: Some(action.into()),
        // The person who started the chain may still be mentioned by its
        // next job.
        author: spec.author.clone(),
        parent: Some(ParentJob {
            id: job.id.clone(),
            trigger: job.trigger.clone(),
            depth: spec.chain_depth,
            forge: spec.forge.source().to_string(),
        }),
        ..Event::new("baton", "job", Some(action.into()), &delivery, crate::event::Payload::from_value(payload))
    })
}
