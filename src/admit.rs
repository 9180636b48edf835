//! The front door: every event, wherever it comes from (a webhook, a
//! schedule, a job's end, the API), enters the queue through
//! [`Door::admit`]. It owns the path "event → rules → store → wake" and what
//! rides on it: pinning a comment to the pull request head it was made on,
//! noting review threads, recalling past reviews, moving a pull request's
//! head forward, and releasing held jobs on `/baton approve`.
//!
//! Written once, so a source added later (another forge, a new trigger
//! kind) gets all of it, and none of the callers can forget a step.

use std::sync::Arc;

use tokio::sync::Notify;

use crate::domain::approval;
use crate::event::{Event, ThreadComment};
use crate::rules::{JobSpec, RuleSet, SharedRules};
use crate::store::{Accepted, Delivery, Note, PrHead, Store, StoreError};

/// Where an event came from, and so how it is matched and stored.
#[derive(Debug)]
pub enum Origin<'a> {
    /// A verified delivery. `signed`, the event name and body as received,
    /// fingerprints it so the same body under a new delivery id is a replay
    /// (`None` for sources whose bodies may legitimately repeat).
    Webhook { signed: Option<(&'a str, &'a [u8])> },
    /// A verified delivery of a kind nothing `reads`: stored by its name,
    /// matched against nothing (its payload was never parsed).
    Unread { signed: (&'a str, &'a [u8]) },
    /// A schedule's slot: only its own trigger may take it.
    Schedule { trigger: &'a str },
    /// A job's end (`job.succeeded`, `job.failed`): stored only when some
    /// trigger takes it, since every job ends.
    Chain,
    /// A job the API was asked for, already judged by its trigger.
    Api { spec: Box<JobSpec> },
}

/// Event names the door acts on whatever the triggers listen for: a pull or
/// merge request moves its head, a review comment is noted in its thread,
/// a comment or note may approve held jobs.
const ACTS_ON: &[&str] = &["pull_request", "merge_request", "issue_comment", "note", "pull_request_review_comment"];

/// Whether admitting an event named `name` needs what its payload says: a
/// trigger listens for it, or the door acts on it. Any other is stored as
/// `Event::unread`, its payload never parsed.
pub(crate) fn reads(rules: &RuleSet, name: &str) -> bool {
    ACTS_ON.contains(&name) || rules.listens_for(name)
}

/// What the door did with an event it stored.
#[derive(Debug)]
pub struct Received {
    /// The store's answer; for a new delivery, its jobs include the held
    /// jobs an approval in it released.
    pub accepted: Accepted,
    /// Matches held until someone trusted approves them.
    pub held: usize,
}

/// The front door, borrowed from whoever holds the store and the rules.
pub struct Door<'a> {
    pub store: &'a Store,
    pub rules: &'a SharedRules,
    /// Woken when new jobs are queued (`None`: the caller wakes the workers
    /// itself, once for a batch).
    pub(crate) wake: Option<&'a Notify>,
    /// Whether a webhook body seen under another delivery id is a replay.
    pub(crate) reject_replays: bool,
}

impl Door<'_> {
    /// Matches `event` and stores it with its jobs. `None`: nothing matched
    /// an event whose origin keeps no record of such (a job's end).
    pub async fn admit(&self, event: Event, origin: Origin<'_>) -> Result<Option<Received>, StoreError> {
        self.admit_under(self.rules.current(), event, origin).await
    }

    /// `admit` under `rules`: the rule set the caller already read the
    /// event by (ingress asks it whether anything reads the event kind), so
    /// a reload in between cannot judge one delivery by two rule sets.
    pub(crate) async fn admit_under(
        &self,
        rules: Arc<RuleSet>,
        mut event: Event,
        origin: Origin<'_>,
    ) -> Result<Option<Received>, StoreError> {
        self.pin_comment_to_head(&mut event).await;
        self.note_thread(&mut event).await;
        self.recall_reviews(&rules, &mut event).await;
        let mut delivery = Delivery::new(&event.delivery, &event.source, &event.kind);
        let signed = match origin {
            Origin::Webhook { signed } => signed,
            Origin::Unread { signed } => Some(signed),
            _ => None,
        };
        if let (true, Some((name, body))) = (self.reject_replays, signed) {
            delivery = delivery.with_body(name, body);
        }
        let (jobs, pending) = match origin {
            Origin::Webhook { .. } => {
                let m = rules.evaluate(&event);
                (m.jobs, m.pending)
            }
            Origin::Unread { .. } => (Vec::new(), Vec::new()),
            Origin::Schedule { trigger } => {
                (rules.match_event(&event).into_iter().filter(|s| s.trigger == trigger).collect(), Vec::new())
            }
            Origin::Chain => {
                let jobs = rules.match_event(&event);
                if jobs.is_empty() {
                    return Ok(None);
                }
                (jobs, Vec::new())
            }
            Origin::Api { spec } => (vec![*spec], Vec::new()),
        };
        let held = pending.len();
        let subject_text = if pending.is_empty() { None } else { event.subject_text() };
        let mut accepted = self.store.accept_with(delivery, jobs, pending, subject_text).await?;
        if let Accepted::New(admitted) = &mut accepted {
            self.move_head(&event).await;
            match self.approve(&rules, &event).await {
                Ok(approved) => admitted.jobs.extend(approved),
                Err(e) => tracing::error!(delivery = %event.delivery, error = %e, "Approving held jobs failed."),
            }
            if let (false, Some(wake)) = (admitted.jobs.is_empty(), self.wake) {
                wake.notify_one();
            }
        }
        Ok(Some(Received { accepted, held }))
    }

    /// Only a new delivery moves a pull request's head (a redelivery of an
    /// old event must not), and only forward.
    async fn move_head(&self, event: &Event) {
        let (Some(repo), Some(n), Some(sha), "pull_request" | "merge_request") =
            (event.repo_name(), event.subject, event.head_sha.as_deref(), event.name.as_str())
        else {
            return;
        };
        let updated_at = event.updated_at.as_deref().unwrap_or_default();
        let head = PrHead {
            sha: sha.to_string(),
            in_repo: event.head_in_repo,
            branch: event.branch.clone(),
            repo: event.head_repo.clone(),
            maintainer_can_modify: event.maintainer_can_modify,
        };
        match self.store.set_head(repo, n, &head, updated_at).await {
            Ok(Some(_)) => self.restart_repairs(repo, n, sha).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(delivery = %event.delivery, error = %e, "Could not note the pull request's head."),
        }
    }

    /// The head moved to `sha`: unless that is the commit baton itself
    /// pushed last, a person pushed, and the repairs baton may push to the
    /// pull request count from zero again.
    async fn restart_repairs(&self, repo: &str, n: u64, sha: &str) {
        let (repo, number) = (repo.to_string(), n);
        let pushed = match self.store.note(&Note::Pushed { repo: repo.clone(), number }).await {
            Ok(v) => v,
            Err(e) => return tracing::warn!(error = %e, "Could not read what baton pushed last."),
        };
        if pushed.as_ref().and_then(|v| v.as_str()) == Some(sha) {
            return;
        }
        let counted = match self.store.note(&Note::Repairs { repo: repo.clone(), number }).await {
            Ok(v) => v.and_then(|v| v.as_u64()).unwrap_or(0),
            Err(e) => return tracing::warn!(error = %e, "Could not read the repairs pushed."),
        };
        if counted == 0 {
            return;
        }
        let notes = [Note::Repairs { repo: repo.clone(), number }, Note::RepairsStopped { repo: repo.clone(), number }];
        match self.store.forget_notes(&notes).await {
            Ok(()) => tracing::info!(repo = %repo, number, head = %sha, repairs = counted,
                "A person pushed to the pull request: its repairs count from zero again."),
            Err(e) => tracing::warn!(error = %e, "Could not restart the repairs' count."),
        }
    }

    /// A comment on a pull request says nothing of the PR's head: what baton
    /// noted from the PR's own events fills it in before the rules look, so
    /// `allow_forks` applies to comments too and a `pr-head` job is pinned to
    /// the commit the commenter saw (not whatever the branch holds when the
    /// job runs). Nothing noted: the event stays as it came.
    async fn pin_comment_to_head(&self, event: &mut Event) {
        if event.comment.is_none() || !event.subject_is_pull_request || event.head_sha.is_some() {
            return;
        }
        let (Some(repo), Some(n)) = (event.repo_name(), event.subject) else { return };
        match self.store.pr_head(repo, n).await {
            Ok(Some(head)) => {
                event.head_sha = Some(head.sha);
                event.head_in_repo = head.in_repo;
                event.branch = head.branch;
                event.head_repo = head.repo;
                event.maintainer_can_modify = head.maintainer_can_modify;
                event.head_pinned = true;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(delivery = %event.delivery, error = %e, "Could not read the pull request's head."),
        }
    }

    /// For an event on a pull request: the head each review trigger
    /// listening for it reviewed last, so an incremental review covers what
    /// changed since.
    async fn recall_reviews(&self, rules: &RuleSet, event: &mut Event) {
        let (Some(repo), Some(number), true) = (event.repo_name(), event.subject, event.subject_is_pull_request) else {
            return;
        };
        let repo = repo.to_string();
        let listening = rules.triggers().iter().filter(|t| {
            t.output == crate::rules::OutputKind::Review && t.on.iter().any(|k| k == &event.kind || k == &event.name)
        });
        for t in listening {
            let note = Note::Reviewed { repo: repo.clone(), number, trigger: t.name.clone() };
            match self.store.note(&note).await {
                Ok(Some(v)) => {
                    if let Some(head) = v["head"].as_str() {
                        event.reviewed.insert(t.name.clone(), head.to_string());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(delivery = %event.delivery, error = %e, "Could not read what was reviewed before.")
                }
            }
        }
    }

    /// A review comment's payload names its place in the diff but not the
    /// conversation it answers: baton notes every review comment it is sent
    /// (its own included, before the rules drop those) by thread, and a new
    /// one carries what came before it. Noted before it is stored, by
    /// comment id, so a delivery sent again adds nothing twice.
    async fn note_thread(&self, event: &mut Event) {
        let (Some(thread), Some(repo)) = (event.thread.as_mut(), event.repository.as_ref()) else { return };
        if event.action.as_deref() != Some("created") {
            return;
        }
        let key = Note::Thread { repo: repo.full_name.clone(), root: thread.root };
        let mut seen: Vec<ThreadComment> = match self.store.note(&key).await {
            Ok(v) => v.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(delivery = %event.delivery, error = %e, "Could not read the review thread.");
                return;
            }
        };
        for c in std::mem::take(&mut thread.comments) {
            if !seen.iter().any(|s| s.id == c.id) {
                let body = c.body.chars().take(THREAD_COMMENT_CHARS).collect();
                seen.push(ThreadComment { body, ..c });
            }
        }
        let skip = seen.len().saturating_sub(THREAD_COMMENTS);
        seen.drain(..skip);
        if let Err(e) = self.store.set_note(&key, &serde_json::to_value(&seen).unwrap_or_default()).await {
            tracing::warn!(delivery = %event.delivery, error = %e, "Could not note the review comment.");
        }
        thread.comments = seen;
    }

    /// `/baton approve` on an issue or PR, by someone a held job's trigger
    /// trusts, releases the jobs held there (for a PR: at its current head).
    /// The trust rule itself is `domain::approval`'s.
    async fn approve(&self, rules: &RuleSet, event: &Event) -> Result<Vec<String>, StoreError> {
        let (Some(comment), Some(repo), Some(n)) = (&event.comment, event.repo_name(), event.subject) else {
            return Ok(Vec::new());
        };
        // A comment on GitHub; a note on an issue or MR on GitLab.
        if !matches!(event.kind.as_str(), "issue_comment.created" | "note.issue" | "note.merge_request") {
            return Ok(Vec::new());
        }
        let Some(command) = crate::rules::command::parse(APPROVE, &comment.body) else { return Ok(Vec::new()) };
        let edited_ok = command.argv.iter().any(|a| a == "--edited");
        let current_text = event.subject_text();
        let request = approval::Request {
            sender: event.sender.as_ref().map(|a| a.login.as_str()),
            sender_is_bot: event.sender.as_ref().is_some_and(|a| a.is_bot()),
            author: comment.author.as_deref(),
            body: &comment.body,
            association: event.association.as_deref(),
        };
        let assoc = match approval::requester(&request, rules.bot_login_for(event), crate::event::MARKER_PREFIX) {
            Ok(assoc) => assoc,
            Err(approval::Ignored::NoAssociation) => return Ok(Vec::new()),
            Err(_) => {
                tracing::info!(delivery = %event.delivery, "An approval by a bot or carrying baton's marker was ignored.");
                return Ok(Vec::new());
            }
        };
        let approver = crate::store::Approval {
            by: comment.author.clone().or_else(|| event.sender.as_ref().map(|s| s.login.clone())).unwrap_or_default(),
            at: chrono::Utc::now(),
        };
        let approved = self
            .store
            .approve(repo, n, &approver, |p| {
                // GitLab numbers issues and merge requests apart: a note on
                // issue #3 approves nothing held on !3, nor on another forge.
                if p.spec.subject_is_pull_request != event.subject_is_pull_request
                    || p.spec.forge != crate::rules::forge_of(event)
                {
                    return false;
                }
                let trusted = rules.get(&p.spec.trigger).map(|t| t.filter.authors.as_slice()).unwrap_or_default();
                match approval::release(p, trusted, assoc, current_text.as_deref(), edited_ok) {
                    approval::Release::Released => true,
                    approval::Release::Untrusted => false,
                    approval::Release::Edited => {
                        tracing::warn!(
                            delivery = %event.delivery, trigger = %p.spec.trigger,
                            "A held job stays held: its issue or pull request was edited since; `/baton approve --edited` releases it."
                        );
                        false
                    }
                }
            })
            .await?;
        if !approved.is_empty() {
            tracing::info!(delivery = %event.delivery, jobs = approved.len(), approver = comment.author.as_deref().unwrap_or(""), "Held jobs approved.");
        }
        Ok(approved)
    }
}

/// Comments a review thread keeps, at most (the newest), and the
/// characters kept of each.
const THREAD_COMMENTS: usize = 50;
const THREAD_COMMENT_CHARS: usize = 4000;

/// The comment that releases held jobs.
const APPROVE: &str = "/baton approve";
