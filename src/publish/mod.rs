//! Publishing results to GitHub through the outbox.
//!
//! The engine writes a `Publication` into the store together with the job's
//! end; this worker delivers it, retrying with backoff on 5xx and timeouts
//! and waiting out rate limits. A failed publication never re-runs the agent,
//! and a 4xx that cannot succeed is recorded on the job, visibly.

pub mod github;
pub mod redact;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::{Job, JobState, PublicationState, Store, Target};
pub use github::GitHub;

/// A hidden marker in every body baton posts: it names the job, lets baton
/// find its own comments, and keeps its comments from triggering jobs.
pub fn marker(job_id: &str) -> String {
    format!("{}job={job_id} -->", crate::event::MARKER_PREFIX)
}

/// Publications give up after this many tries.
const MAX_ATTEMPTS: u32 = 12;

/// GitHub rejects comment bodies over 65,536 characters.
const MAX_BODY_CHARS: usize = 65_536;

/// The comment for a finished job.
pub fn comment_body(job: &Job) -> String {
    let footer =
        format!("\n\n---\n<sub>baton · trigger `{}` · job `{}`</sub>\n{}", job.trigger, job.id, marker(&job.id));
    let main = match job.state {
        JobState::Succeeded if job.spec.output == crate::rules::OutputKind::PullRequest && job.branch.is_none() => {
            format!(
                "The agent changed nothing, so there is no pull request.\n\n{}",
                job.result.clone().unwrap_or_default()
            )
        }
        JobState::Succeeded => job.result.clone().unwrap_or_default(),
        JobState::Cancelled => "baton: this job was cancelled.".to_string(),
        _ => format!("baton could not finish this job: {}", job.error.as_deref().unwrap_or("unknown error")),
    };
    let room = MAX_BODY_CHARS.saturating_sub(footer.chars().count() + 200);
    let main = if main.chars().count() > room {
        let cut: String = main.chars().take(room).collect();
        format!("{cut}\n\n… (cut: the result is longer than GitHub allows; the full text is on the job `{}`)", job.id)
    } else {
        main
    };
    format!("{main}{footer}")
}

/// The body of the pull request a job opens: the result, and `Fixes #N`
/// when the job came from an issue.
pub fn pull_request_body(job: &Job) -> String {
    let mut body = comment_body(job);
    if let (Some(n), false) = (job.spec.subject, job.spec.subject_is_pull_request) {
        body = format!("Fixes #{n}\n\n{body}");
    }
    body
}

/// Delivers outbox entries.
pub struct Publisher {
    store: Store,
    github: GitHub,
    wake: Arc<Notify>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Publisher {
    pub fn new(store: Store, github: GitHub, wake: Arc<Notify>, metrics: Arc<crate::metrics::Metrics>) -> Publisher {
        Publisher { store, github, wake, metrics }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let next = match self.drain().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::error!(error = %e, "Reading the outbox failed; retrying shortly.");
                    Some(Duration::from_secs(5))
                }
            };
            let sleep = next.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// Tries every due publication; returns when the next one is due.
    async fn drain(&self) -> Result<Option<Duration>, crate::store::StoreError> {
        let mut next: Option<Duration> = None;
        for mut p in self.store.outbox()? {
            let now = Utc::now();
            if p.next_attempt_at > now {
                let wait = (p.next_attempt_at - now).to_std().unwrap_or_default();
                next = Some(next.map_or(wait, |n| n.min(wait)));
                continue;
            }
            p.attempts += 1;
            let sent = match &p.target {
                Target::IssueComment { number } => self.github.issue_comment(&p.repo, *number, &p.body).await,
                Target::CommitComment { sha } => self.github.commit_comment(&p.repo, sha, &p.body).await,
                Target::PullRequest { head, base, title } => {
                    self.github.pull_request(&p.repo, title, head, base, &p.body).await
                }
            };
            match sent {
                Ok(url) => {
                    self.metrics.publish("published");
                    p.state = PublicationState::Published;
                    p.url = url;
                    p.last_error = None;
                    tracing::info!(job = %p.job, url = p.url.as_deref().unwrap_or(""), "Result published.");
                }
                Err(e) if e.retryable && p.attempts < MAX_ATTEMPTS => {
                    self.metrics.publish("retry");
                    let wait = e.retry_after.unwrap_or_else(|| backoff(p.attempts));
                    p.next_attempt_at = now + chrono::Duration::from_std(wait).unwrap_or_default();
                    p.last_error = Some(e.message.clone());
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                    tracing::warn!(job = %p.job, error = %e, attempt = p.attempts, "Publishing failed; will retry.");
                }
                Err(e) => {
                    self.metrics.publish("failed");
                    p.state = PublicationState::Failed;
                    p.last_error = Some(e.message.clone());
                    tracing::error!(job = %p.job, error = %e, "Publishing failed for good.");
                }
            }
            self.store.update_publication(&p).await?;
        }
        Ok(next)
    }
}

/// 2 s, 4 s, 8 s, … capped at 5 minutes.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs((2u64 << attempt.min(10).saturating_sub(1)).min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(12), Duration::from_secs(300));
    }
}
