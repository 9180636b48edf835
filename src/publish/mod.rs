//! Publishing results to the job's forge through the outbox.
//!
//! Each `Target` becomes calls on the forge's REST client (GitHub's here,
//! `forge::github::Client`; GitLab's in `gitlab.rs`); what to send, when,
//! and the bookkeeping around it (markers, lost answers, start
//! publications) stay forge-neutral.
//!
//! The engine writes a `Publication` into the store together with the job's
//! end; this worker delivers it, retrying with backoff on 5xx and timeouts
//! and waiting out rate limits. A failed publication never re-runs the agent,
//! and a 4xx that cannot succeed is recorded on the job, visibly.

pub mod body;
pub mod defuse;
mod gitlab;
pub mod notify;
pub(crate) mod plan;
pub mod review;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::forge::github::api::{self as github, Listing};
use crate::forge::github::Client;
use crate::forge::{ApiError, Created};
use crate::store::{Job, JobState, Note, Publication, PublicationState, Purpose, Store, Target};
pub use body::marker;
pub(crate) use body::{comment_body, pull_request_body, pull_request_title, status_end_body, status_start_body};
use plan::CapKind;

/// `create` without a marker lookup.
const NO_LOOK: Option<std::future::Ready<Result<Option<Created>, ApiError>>> = None;

/// Publications give up after this many tries.
const MAX_ATTEMPTS: u32 = 12;

/// A job's end waits this long between looks at its start publications.
const DEFER: Duration = Duration::from_secs(1);

/// What a review trigger last reviewed on a pull request (`Note::Reviewed`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Reviewed {
    /// The head it reviewed.
    pub head: Option<String>,
    /// Fingerprints of the findings posted (see `review::plan`).
    #[serde(default)]
    pub findings: std::collections::HashSet<String>,
}

/// How one try went.
enum Outcome {
    /// Done; `created` when it made a new comment or pull request.
    Done { made: Created, created: bool },
    /// Not yet: it waits for a start publication of its job.
    Wait,
}

/// Delivers outbox entries.
pub(crate) struct Publisher {
    store: Store,
    /// `None` without GitHub credentials: only notifications are sent.
    github: Option<Client>,
    /// `[gitlab]`'s client, when configured.
    gitlab: Option<Arc<crate::forge::gitlab::api::Client>>,
    /// `[notify.NAME]`, and the client that calls them.
    notify: Arc<std::collections::BTreeMap<String, crate::config::NotifyTarget>>,
    http: reqwest::Client,
    wake: Arc<Notify>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Publisher {
    pub fn new(
        store: Store,
        github: Option<Client>,
        notify: Arc<std::collections::BTreeMap<String, crate::config::NotifyTarget>>,
        wake: Arc<Notify>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Publisher {
        let http = reqwest::Client::builder()
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Publisher { store, github, gitlab: None, notify, http, wake, metrics }
    }

    /// Publishes to GitLab too.
    pub fn with_gitlab(mut self, gitlab: Option<Arc<crate::forge::gitlab::api::Client>>) -> Publisher {
        self.gitlab = gitlab;
        self
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

    /// Tries every due publication, those of a job's start first; returns
    /// when the next one is due.
    async fn drain(&self) -> Result<Option<Duration>, crate::store::StoreError> {
        let mut next: Option<Duration> = None;
        let mut soon = |wait: Duration| next = Some(next.map_or(wait, |n: Duration| n.min(wait)));
        let mut outbox = self.store.outbox().await?;
        outbox.sort_by_key(|p| !p.purpose.at_start());
        for mut p in outbox {
            let now = Utc::now();
            if p.next_attempt_at > now {
                soon((p.next_attempt_at - now).to_std().unwrap_or_default());
                continue;
            }
            let Some(job) = self.store.job(&p.job).await? else {
                // The job is gone (it cannot be, short of a wiped store): drop it.
                p.state = PublicationState::Failed;
                self.store.update_publication(&p, false).await?;
                continue;
            };
            p.attempts += 1;
            match self.attempt(&mut p, &job).await {
                Ok(Outcome::Wait) => {
                    p.attempts -= 1;
                    soon(DEFER);
                    continue;
                }
                Ok(Outcome::Done { made, created }) => {
                    self.metrics.publish("published");
                    p.state = PublicationState::Published;
                    p.url = made.url.or(p.url.take());
                    p.remote_id = made.id.or(p.remote_id);
                    p.last_error = None;
                    p.maybe_sent = false;
                    tracing::info!(job = %p.job, purpose = p.purpose.as_str(), url = p.url.as_deref().unwrap_or(""), "Published.");
                    self.store.update_publication(&p, created).await?;
                }
                Err(e) => {
                    p.maybe_sent = p.maybe_sent || e.maybe_applied;
                    p.last_error = Some(e.message.clone());
                    if e.retryable && p.attempts < MAX_ATTEMPTS {
                        self.metrics.publish("retry");
                        let wait = e.retry_after.unwrap_or_else(|| backoff(p.attempts));
                        p.next_attempt_at = now + chrono::Duration::from_std(wait).unwrap_or_default();
                        soon(wait);
                        tracing::warn!(job = %p.job, purpose = p.purpose.as_str(), error = %e, attempt = p.attempts, "Publishing failed; will retry.");
                    } else {
                        self.metrics.publish("failed");
                        p.state = PublicationState::Failed;
                        tracing::error!(job = %p.job, purpose = p.purpose.as_str(), error = %e, "Publishing failed for good.");
                    }
                    self.store.update_publication(&p, false).await?;
                }
            }
        }
        Ok(next)
    }

    /// Tells each of a notification's targets that has not taken it yet;
    /// those that took it are noted on the record, which is stored after
    /// every try, so a retry tells only the others.
    async fn notify_all(&self, p: &mut Publication, job: &Job) -> Result<Outcome, ApiError> {
        let Target::Notify { targets, sent } = &mut p.target else {
            return Err(ApiError::fatal("not a notification".into()));
        };
        for name in targets.iter() {
            if sent.contains(name) {
                continue;
            }
            let Some(target) = self.notify.get(name) else {
                return Err(ApiError::fatal(format!("notify target `{name}` is not configured")));
            };
            notify::send(&self.http, target, &job.id, &p.body).await?;
            sent.push(name.clone());
        }
        Ok(Outcome::Done { made: Created::default(), created: false })
    }

    /// What this trigger last reviewed on the pull request (nothing, when
    /// the store cannot say: the review then repeats rather than drops).
    async fn reviewed(&self, note: &Note) -> Reviewed {
        match self.store.note(note).await {
            Ok(v) => v.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "Could not read what was reviewed before.");
                Reviewed::default()
            }
        }
    }

    /// After a review landed: the head it covered and every finding said.
    async fn note_reviewed(
        &self,
        sent: Result<Outcome, ApiError>,
        note: &Note,
        job: &Job,
        findings: std::collections::HashSet<String>,
    ) -> Result<Outcome, ApiError> {
        if let (Ok(Outcome::Done { .. }), Some(head)) = (&sent, &job.spec.head_sha) {
            let mut findings: Vec<String> = findings.into_iter().collect();
            findings.sort();
            let value =
                serde_json::to_value(Reviewed { head: Some(head.clone()), findings: findings.into_iter().collect() })
                    .unwrap_or_default();
            if let Err(e) = self.store.set_note(note, &value).await {
                tracing::warn!(job = %job.id, error = %e, "Could not note what was reviewed.");
            }
        }
        sent
    }

    /// One try at `p`. A create whose earlier answer was lost first looks
    /// for its marker, so nothing lands twice.
    async fn attempt(&self, p: &mut Publication, job: &Job) -> Result<Outcome, ApiError> {
        if let Target::Notify { .. } = p.target {
            return self.notify_all(p, job).await;
        }
        if let crate::forge::Forge::GitLab(_) = job.spec.forge {
            return self.attempt_gitlab(p, job).await;
        }
        let Some(gh) = &self.github else {
            return Err(ApiError::fatal("publishing to GitHub is off: no GitHub credentials".into()));
        };
        let (inst, repo) = (p.access, p.repo.clone());
        let repo = repo.as_str();
        let body = p.body.clone();
        let result_marker = marker(&job.id);
        let done = |made: Created| Ok(Outcome::Done { made, created: false });
        // Start publications still in the outbox hold back the job's end.
        match p.target.clone() {
            Target::Notify { .. } => self.notify_all(p, job).await,
            Target::Reaction { number, comment_id, review } => {
                done(gh.react(inst, repo, number, comment_id, review).await?)
            }
            Target::ReviewReply { number, comment_id } => {
                let look = Some(gh.find(inst, repo, Listing::ReviewComments(number), &result_marker));
                self.create(p, job, CapKind::Comment, look, gh.reply(inst, repo, number, comment_id, &body)).await
            }
            Target::StatusComment { number } => {
                let status = body::status_marker(&job.id);
                let look = Some(gh.find(inst, repo, Listing::IssueComments(number), &status));
                self.create(p, job, CapKind::Comment, look, gh.create_comment(inst, repo, number, &body)).await
            }
            Target::EditStatus { number } => {
                let Some(status) = self.status_comment(job).await? else { return Ok(Outcome::Wait) };
                if let Some(id) = status {
                    return done(gh.edit_comment(inst, repo, id, &p.body).await?);
                }
                // The status comment never landed: say it in a new one.
                let look = Some(gh.find(inst, repo, Listing::IssueComments(number), &result_marker));
                self.create(p, job, CapKind::Comment, look, gh.create_comment(inst, repo, number, &body)).await
            }
            Target::IssueComment { number } => {
                let look = Some(gh.find(inst, repo, Listing::IssueComments(number), &result_marker));
                self.create(p, job, CapKind::Comment, look, gh.create_comment(inst, repo, number, &body)).await
            }
            Target::CommitComment { sha } => {
                let look = Some(gh.find(inst, repo, Listing::CommitComments(&sha), &result_marker));
                self.create(p, job, CapKind::Comment, look, gh.commit_comment(inst, repo, &sha, &body)).await
            }
            Target::Review { number } => {
                let look = Some(gh.find(inst, repo, Listing::Reviews(number), &result_marker));
                // A review answered as JSON goes line by line; any other
                // answer is the review's body, as it is.
                let answer = job.result.as_deref().filter(|_| job.state == JobState::Succeeded).and_then(review::parse);
                let note = Note::Reviewed { repo: repo.to_string(), number, trigger: job.trigger.clone() };
                let earlier = self.reviewed(&note).await;
                let Some(answer) = answer else {
                    let sent = self.create(p, job, CapKind::Comment, look, gh.review(inst, repo, number, &body)).await;
                    return self.note_reviewed(sent, &note, job, earlier.findings).await;
                };
                let diff = review::DiffLines::from_files(&gh.pr_files(inst, repo, number).await?);
                // A full review says everything again; an incremental one
                // leaves out what it already said on lines that read the same.
                let posted = if job.spec.review_full { Default::default() } else { earlier.findings };
                let planned = review::plan(
                    &answer,
                    &diff,
                    job.spec.output_options.allow_approve,
                    &posted,
                    review::Flavor::GitHub,
                );
                let body = body::review_body(job, &planned.body);
                let comments = body::review_comments(job, &planned.comments);
                let send = gh.review_with(inst, repo, number, &body, planned.event, &comments);
                let sent = self.create(p, job, CapKind::Comment, look, send).await;
                self.note_reviewed(sent, &note, job, planned.findings.into_iter().collect()).await
            }
            Target::PullRequest { head, base, title } => {
                // GitHub refuses a second PR for one branch: no marker needed.
                let sent = gh.pull_request(inst, repo, &title, &head, &base, &body);
                self.create(p, job, CapKind::PullRequest, NO_LOOK, sent).await
            }
            Target::CheckRun { head_sha, name, conclusion } => {
                let summary = body.clone();
                match conclusion {
                    None => {
                        if p.maybe_sent {
                            if let Some(found) = gh.find_check_run(inst, repo, &head_sha, &name, &job.id).await? {
                                return done(found);
                            }
                        }
                        let run = github::CheckRun {
                            sha: &head_sha,
                            name: &name,
                            external_id: &job.id,
                            conclusion: None,
                            summary: &summary,
                        };
                        self.create(p, job, CapKind::None, NO_LOOK, gh.create_check_run(inst, repo, &run)).await
                    }
                    Some(conclusion) => {
                        let id = match job.progress.check_run {
                            Some(id) => Some(id),
                            None if self.start_pending(&job.id, Purpose::CheckStart).await? => {
                                return Ok(Outcome::Wait)
                            }
                            None => match self.fresh(job).await?.progress.check_run {
                                Some(id) => Some(id),
                                None => {
                                    gh.find_check_run(inst, repo, &head_sha, &name, &job.id).await?.and_then(|c| c.id)
                                }
                            },
                        };
                        match id {
                            Some(id) => {
                                done(gh.complete_check_run(inst, repo, id, &name, conclusion.as_str(), &summary).await?)
                            }
                            None => {
                                let run = github::CheckRun {
                                    sha: &head_sha,
                                    name: &name,
                                    external_id: &job.id,
                                    conclusion: Some(conclusion.as_str()),
                                    summary: &summary,
                                };
                                self.create(p, job, CapKind::None, NO_LOOK, gh.create_check_run(inst, repo, &run)).await
                            }
                        }
                    }
                }
            }
        }
    }

    /// The status comment a job's end edits: `None` while its start's
    /// is still to send (the end waits), else its id, when it ever landed.
    async fn status_comment(&self, job: &Job) -> Result<Option<Option<u64>>, ApiError> {
        if let Some(id) = job.progress.status_comment {
            return Ok(Some(Some(id)));
        }
        if self.start_pending(&job.id, Purpose::Status).await? {
            return Ok(None);
        }
        Ok(Some(self.fresh(job).await?.progress.status_comment))
    }

    /// `job` as stored now. Read after a start publication is found sent:
    /// whichever replica sent it wrote what it made onto the job in the same
    /// transaction that took it out of the outbox, so this sees it.
    async fn fresh(&self, job: &Job) -> Result<Job, ApiError> {
        match self.store.job(&job.id).await {
            Ok(Some(job)) => Ok(job),
            Ok(None) => Ok(job.clone()),
            Err(e) => Err(ApiError::before_sending(e.to_string())),
        }
    }

    /// Whether the job's start publication for `purpose` is still to send:
    /// its end waits for it.
    async fn start_pending(&self, job: &str, purpose: Purpose) -> Result<bool, ApiError> {
        self.store.publication_pending(job, purpose).await.map_err(|e| ApiError::before_sending(e.to_string()))
    }

    /// Sends a create within the job's caps, marking the publication as
    /// maybe sent (durably) before the request leaves. When an earlier try's
    /// answer was lost, `look` (a lookup of baton's marker, not yet sent)
    /// finds what it made instead.
    async fn create(
        &self,
        p: &mut Publication,
        job: &Job,
        kind: CapKind,
        look: Option<impl std::future::Future<Output = Result<Option<Created>, ApiError>>>,
        send: impl std::future::Future<Output = Result<Created, ApiError>>,
    ) -> Result<Outcome, ApiError> {
        if let (true, Some(look)) = (p.maybe_sent, look) {
            if let Some(made) = look.await? {
                return Ok(Outcome::Done { made, created: kind != CapKind::None });
            }
        }
        if let Some(why) = plan::cap_reached(job, kind) {
            return Err(ApiError::fatal(why));
        }
        if !p.maybe_sent {
            p.maybe_sent = true;
            self.store.update_publication(p, false).await.map_err(|e| ApiError::before_sending(e.to_string()))?;
        }
        match send.await {
            Ok(made) => Ok(Outcome::Done { made, created: kind != CapKind::None }),
            Err(e) => {
                if !e.maybe_applied {
                    p.maybe_sent = false;
                }
                Err(e)
            }
        }
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
