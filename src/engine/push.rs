//! What leaves the machine with an agent's change: the checks it must
//! pass, the commit baton makes, and the two ways it is pushed — a branch
//! of baton's own for a new pull request (`pull_request`), or the pull
//! request's own branch (`push`), as a compare-and-swap from the head the
//! job ran at, replayed onto a moved branch only when the trigger asks. And
//! the bound on repairs (a `push` answering a failed check).

use tokio_util::sync::CancellationToken;

use super::attempt::{failed, is_workflow_path, AttemptEnd, Report};
use super::Engine;
use crate::config::AgentDef;
use crate::rules::JobSpec;
use crate::store::{Job, Note, Outcome};
use crate::workspace;

/// What baton pushed with an agent's change.
#[derive(Debug)]
pub(super) struct Pushed {
    pub(super) branch: String,
    pub(super) commit: String,
}

impl Engine {
    /// Why the agent's change may not leave the machine, if it may not:
    /// paths outside `output.allowed_paths`, over `max_push_bytes`,
    /// workflows without consent, or what looks like a secret.
    fn refuse_change(&self, spec: &JobSpec, staged: &workspace::Staged) -> Option<String> {
        let opts = &spec.output_options;
        let allowed: Vec<glob::Pattern> =
            opts.allowed_paths.iter().filter_map(|g| glob::Pattern::new(g).ok()).collect();
        if !allowed.is_empty() {
            let outside: Vec<&str> =
                staged.paths.iter().filter(|p| !allowed.iter().any(|g| g.matches(p))).map(String::as_str).collect();
            if !outside.is_empty() {
                let shown = outside.iter().take(10).copied().collect::<Vec<_>>().join(", ");
                return Some(format!(
                    "the agent changed files outside output.allowed_paths ({shown}); nothing was pushed"
                ));
            }
        }
        if staged.bytes > opts.max_push_bytes {
            return Some(format!(
                "the agent's changes add up to {} bytes, over output.max_push_bytes ({}); nothing was pushed",
                staged.bytes, opts.max_push_bytes
            ));
        }
        if !opts.allow_workflow_changes {
            let workflows: Vec<&str> =
                staged.paths.iter().filter(|p| is_workflow_path(p)).map(String::as_str).take(10).collect();
            if !workflows.is_empty() {
                return Some(format!(
                    "the agent changed GitHub Actions workflows or actions ({}); these are pushed only with \
                     output.allow_workflow_changes = true; nothing was pushed",
                    workflows.join(", ")
                ));
            }
        }
        if self.redactor.redact(&staged.added) != staged.added {
            return Some(
                "the agent's changes contain what looks like a secret (a token or private key); nothing was pushed"
                    .into(),
            );
        }
        None
    }

    /// Stages the agent's change and checks it: `None` when it may go on
    /// to be committed, else how the attempt ends (nothing changed, saying
    /// `unchanged`; or the change may not leave).
    async fn stage_or_end(
        &self,
        job: &Job,
        prepared: &workspace::Prepared,
        result: &str,
        unchanged: &str,
        cancel: &CancellationToken,
    ) -> Option<AttemptEnd> {
        let max = job.spec.output_options.max_push_bytes;
        let staging = match self.workspaces.stage(prepared, max, cancel).await {
            Ok(s) => s,
            Err(workspace::WorkspaceError::Cancelled(_)) => return Some(AttemptEnd::Cancelled),
            Err(e) => {
                return Some(failed(Outcome::PublishFailed, Some(0), format!("staging the changes failed: {e}"), false))
            }
        };
        if !staging.removed.is_empty() {
            let list = workspace::sweep::describe(&staging.removed);
            self.log_line(&job.id, &format!("removed from the workspace before staging: {list}")).await;
        }
        match staging.changes {
            None => {
                self.log_line(&job.id, &format!("the agent changed nothing; {unchanged}")).await;
                Some(AttemptEnd::Succeeded(result.to_string(), None))
            }
            Some(staged) => {
                self.refuse_change(&job.spec, &staged).map(|why| failed(Outcome::PublishFailed, Some(0), why, false))
            }
        }
    }

    /// The message of the commit baton makes: the redacted title (a
    /// template's, or the result's first line) and where it came from. It
    /// leaves the machine with the push, so it is redacted once more whole.
    fn commit_message(&self, job: &Job, result: &str) -> String {
        let mut titled = job.clone();
        titled.result = Some(self.redactor.redact(result));
        let title = self.outbox.pull_request_title(&titled);
        self.redactor.redact(&format!("{title}\n\nMade by baton (trigger {}, job {}).", job.trigger, job.id))
    }

    /// `pull_request` output: the agent's changes, checked, committed as the
    /// bot and pushed to `baton/<trigger>/<subject>-<job>`. Failures here
    /// are not retried: another attempt would run the agent again for a
    /// failure that is not its own.
    pub(super) async fn push_changes(
        &self,
        job: &Job,
        prepared: &workspace::Prepared,
        result: String,
        cancel: &CancellationToken,
    ) -> AttemptEnd {
        let spec = &job.spec;
        let Some(repo) = spec.repo.as_deref() else {
            return failed(Outcome::PublishFailed, Some(0), "a pull_request output needs a repository".into(), false);
        };
        if let Some(end) = self.stage_or_end(job, prepared, &result, "no pull request", cancel).await {
            return end;
        }
        let short = job.id.get(..8).unwrap_or(&job.id);
        let subject = spec.subject.map(|n| n.to_string()).unwrap_or_else(|| "run".into());
        let branch = format!("{}{}/{subject}-{short}", crate::rules::BATON_BRANCH_PREFIX, job.trigger);
        let message = self.commit_message(job, &result);
        self.log_line(&job.id, &format!("committing the changes and pushing {branch}")).await;
        let pushed = async {
            let commit = self.workspaces.commit(prepared, &message, &self.config.github.bot_login, cancel).await?;
            let over = workspace::Over::Anything;
            let to = workspace::Branch { repo, branch: &branch, access: spec.access, token_repo: repo };
            self.workspaces.push(prepared, &to, &commit, over, cancel).await?;
            Ok::<_, workspace::WorkspaceError>(commit)
        };
        match pushed.await {
            Ok(commit) => {
                self.log_line(&job.id, &format!("pushed {commit} to {branch}")).await;
                AttemptEnd::Succeeded(result, Some(Pushed { branch, commit }))
            }
            Err(workspace::WorkspaceError::Cancelled(_)) => AttemptEnd::Cancelled,
            Err(e) => failed(Outcome::PublishFailed, Some(0), format!("pushing the branch failed: {e}"), false),
        }
    }

    /// `push` output: the agent's change, checked, committed as the bot on
    /// the head the job ran at, and pushed to the pull request's branch as
    /// a fast-forward from that head — never forced. When the branch moved
    /// on meanwhile, the job fails naming both heads, or (`on_moved =
    /// "rebase"`, never for a repair) the change is replayed onto the new
    /// head, checked and verified again, and pushed from there.
    pub(super) async fn push_to_pull_request(
        &self,
        job: &Job,
        agent: &AgentDef,
        prepared: &workspace::Prepared,
        result: String,
        cancel: &CancellationToken,
        report: &mut Report,
    ) -> AttemptEnd {
        let spec = &job.spec;
        let (Some(repo), Some(target), Some(base)) = (spec.repo.as_deref(), &spec.push, prepared.commit.clone()) else {
            return failed(
                Outcome::PublishFailed,
                Some(0),
                "a push output needs a pull request's branch".into(),
                false,
            );
        };
        if let Some(end) = self.stage_or_end(job, prepared, &result, "nothing to push", cancel).await {
            return end;
        }
        let publish_failed = |why: String| failed(Outcome::PublishFailed, Some(0), why, false);
        let message = self.commit_message(job, &result);
        let commit = match self.workspaces.commit(prepared, &message, &self.config.github.bot_login, cancel).await {
            Ok(c) => c,
            Err(workspace::WorkspaceError::Cancelled(_)) => return AttemptEnd::Cancelled,
            Err(e) => return publish_failed(format!("committing the change failed: {e}")),
        };
        let branch = &target.branch;
        let to = workspace::Branch { repo: &target.repo, branch, access: spec.access, token_repo: repo };
        let push = |from: String, commit: String| async move {
            self.log_line(&job.id, &format!("pushing {commit} onto {branch} of {} (from {from})", target.repo)).await;
            let over = workspace::Over::Only(&from);
            self.workspaces.push(prepared, &to, &commit, over, cancel).await
        };
        if let Err(e) = self.note_pushing(job, &commit).await {
            return publish_failed(e);
        }
        let moved_to = match push(base.clone(), commit.clone()).await {
            Ok(()) => return self.pushed(job, result, branch, commit).await,
            Err(workspace::WorkspaceError::BranchMoved { to, .. }) => to,
            Err(workspace::WorkspaceError::Cancelled(_)) => return AttemptEnd::Cancelled,
            Err(e) if target.repo != repo => {
                return publish_failed(format!(
                    "pushing to {branch} of the fork {} failed: {e} (GitHub refuses a push to a fork whose author \
                     turned off \"Allow edits from maintainers\", and to any fork an organization owns)",
                    target.repo
                ))
            }
            Err(e) => return publish_failed(format!("pushing to {branch} failed: {e}")),
        };
        let moved = format!("the branch moved from {base} to {moved_to}");
        if spec.output_options.on_moved != crate::rules::trigger::OnMoved::Rebase || spec.is_repair() {
            let hint = if spec.is_repair() {
                " (a repair is never replayed onto a head its failure was not seen on)"
            } else {
                " (output.on_moved = \"rebase\" replays the change onto the new head)"
            };
            return publish_failed(format!("{moved} while the agent worked; nothing was pushed{hint}"));
        }
        self.log_line(&job.id, &format!("{moved}; replaying the change onto it")).await;
        let replayed = self
            .workspaces
            .replay(
                prepared,
                &to,
                workspace::Replay { base: &base, commit: &commit, onto: &moved_to },
                spec.output_options.max_push_bytes,
                cancel,
            )
            .await;
        let (commit, changes) = match replayed {
            Ok(Some(r)) => r,
            Ok(None) => {
                return publish_failed(format!("{moved}, and the change does not apply onto it; nothing was pushed"))
            }
            Err(workspace::WorkspaceError::Cancelled(_)) => return AttemptEnd::Cancelled,
            Err(e) => return publish_failed(format!("{moved}, and replaying the change failed: {e}")),
        };
        let Some(changes) = changes else {
            self.log_line(&job.id, "the new head already holds the change; nothing to push").await;
            return AttemptEnd::Succeeded(result, None);
        };
        if let Some(why) = self.refuse_change(spec, &changes) {
            return publish_failed(format!("{moved}; replayed onto it, {why}"));
        }
        // baton's git rewrote files; the verify runs as the agent's uid.
        if let Err(e) = self.workspaces.hand_back(prepared).await {
            return publish_failed(format!(
                "{moved}; replayed onto it, but the workspace could not be handed over: {e}"
            ));
        }
        if let Err(end) = self.verify(job, agent, &prepared.path, prepared.objects.as_ref(), cancel, report).await {
            return match end {
                AttemptEnd::Failed { error, .. } => publish_failed(format!("{moved}; replayed onto it, {error}")),
                other => other,
            };
        }
        if let Err(e) = self.note_pushing(job, &commit).await {
            return publish_failed(e);
        }
        match push(moved_to.clone(), commit.clone()).await {
            Ok(()) => self.pushed(job, result, branch, commit).await,
            Err(e) => publish_failed(format!("{moved}; the replayed change could not be pushed either: {e}")),
        }
    }

    /// Notes `commit` as baton's own before it can land, so the head event
    /// it causes never reads as a person's push (which restarts the count
    /// of repairs: see `admit`).
    async fn note_pushing(&self, job: &Job, commit: &str) -> Result<(), String> {
        let (Some(repo), Some(number)) = (job.repo.clone(), job.subject) else { return Ok(()) };
        let note = Note::Pushed { repo, number };
        self.store
            .set_note(&note, &serde_json::json!(commit))
            .await
            .map_err(|e| format!("could not note the commit about to be pushed, so nothing was pushed: {e}"))
    }

    /// A push landed: logged, and counted when it is a repair.
    async fn pushed(&self, job: &Job, result: String, branch: &str, commit: String) -> AttemptEnd {
        self.log_line(&job.id, &format!("pushed {commit} to {branch}")).await;
        if let (true, Some(repo), Some(number)) = (job.spec.is_repair(), job.repo.clone(), job.subject) {
            if let Err(e) = self.store.count_up(&Note::Repairs { repo, number }).await {
                tracing::error!(error = %e, "Could not count the repair pushed.");
            }
        }
        AttemptEnd::Succeeded(result, Some(Pushed { branch: branch.to_string(), commit }))
    }

    /// A repair (a `push` answering a failed check) past its bound: why,
    /// and whether this is the first refusal on its pull request. Each
    /// repair baton pushed counts against `job.max_repairs_per_pr`, and as
    /// one link of a chain against `limits.max_chain_depth`.
    pub(super) async fn repair_refused(&self, job: &Job) -> Option<(String, bool)> {
        let spec = &job.spec;
        let (true, Some(repo), Some(number)) = (spec.is_repair(), job.repo.clone(), job.subject) else { return None };
        let pushed = match self.store.note(&Note::Repairs { repo: repo.clone(), number }).await {
            Ok(n) => n.and_then(|v| v.as_u64()).unwrap_or(0),
            Err(e) => {
                tracing::error!(error = %e, "Could not read the repairs pushed; refusing to push another.");
                return Some((format!("could not read how many repairs baton pushed to #{number}: {e}"), false));
            }
        };
        let depth = self.config.limits.max_chain_depth;
        let why = if pushed >= u64::from(spec.max_repairs_per_pr) {
            format!(
                "baton has pushed {pushed} repairs to this pull request, its limit (job.max_repairs_per_pr = {}); \
                 it stops repairing it here, over to a person",
                spec.max_repairs_per_pr
            )
        } else if pushed > u64::from(depth) {
            format!(
                "chain depth limit reached: baton has pushed {pushed} repairs to this pull request in a row, and \
                 limits.max_chain_depth is {depth}; it stops repairing it here"
            )
        } else {
            return None;
        };
        let stopped = Note::RepairsStopped { repo, number };
        let first = match self.store.note(&stopped).await {
            Ok(None) => self.store.set_note(&stopped, &serde_json::json!(job.id)).await.is_ok(),
            _ => false,
        };
        Some((why, first))
    }
}
