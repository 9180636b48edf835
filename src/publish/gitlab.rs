//! The outbox's GitLab side: each `Target` as GitLab REST calls, with the
//! same marker lookups and exactly-once rules as on GitHub.
//!
//! - Comments are notes on the issue or merge request (GitLab numbers the
//!   two apart, so the job's subject says which), the status note is edited
//!   in place, and receipt is an award emoji.
//! - A review is one batch of draft notes, published at once: inline notes
//!   placed by the MR's latest diff version, and the summary (with the
//!   marker), so a lost answer never posts half a review twice.
//! - A check run is a commit status named after the trigger; a change
//!   request is a merge request, which GitLab refuses to open twice for one
//!   branch (the client then answers with the open one).

use super::*;
use crate::forge::gitlab::api::{InlineNote, Noteable, Review, Side as NoteSide, Status, StatusState};

impl Publisher {
    pub(super) async fn attempt_gitlab(&self, p: &mut Publication, job: &Job) -> Result<Outcome, ApiError> {
        let Some(gl) = self.gitlab.clone() else {
            return Err(ApiError::fatal("publishing to GitLab is off: no [gitlab] in baton.toml".into()));
        };
        let project = p.repo.clone();
        let project = project.as_str();
        let body = p.body.clone();
        let result_marker = marker(&job.id);
        let mr = job.spec.subject_is_pull_request;
        let on = |number| if mr { Noteable::MergeRequest(number) } else { Noteable::Issue(number) };
        let done = |made: Created| Ok(Outcome::Done { made, created: false });
        match p.target.clone() {
            Target::Notify { .. } => self.notify_all(p, job).await,
            Target::Reaction { number, comment_id, .. } => {
                done(gl.award_emoji(project, on(number), comment_id, "eyes").await?)
            }
            // GitLab's webhooks name a diff note's discussion by a hash
            // baton does not keep: the answer goes on the MR itself.
            Target::ReviewReply { number, .. } | Target::IssueComment { number } => {
                let look = Some(gl.find_note(project, on(number), &result_marker));
                self.create(p, job, CapKind::Comment, look, gl.create_note(project, on(number), &body)).await
            }
            Target::StatusComment { number } => {
                let status = body::status_marker(&job.id);
                let look = Some(gl.find_note(project, on(number), &status));
                self.create(p, job, CapKind::Comment, look, gl.create_note(project, on(number), &body)).await
            }
            Target::EditStatus { number } => {
                let Some(status) = self.status_comment(job).await? else { return Ok(Outcome::Wait) };
                if let Some(id) = status {
                    return done(gl.edit_note(project, on(number), id, &body).await?);
                }
                let look = Some(gl.find_note(project, on(number), &result_marker));
                self.create(p, job, CapKind::Comment, look, gl.create_note(project, on(number), &body)).await
            }
            Target::CommitComment { sha } => {
                let look = Some(gl.find_commit_comment(project, &sha, &result_marker));
                self.create(p, job, CapKind::Comment, look, gl.commit_comment(project, &sha, &body)).await
            }
            Target::Review { number } => self.review_on_gitlab(&gl, p, job, number).await,
            Target::PullRequest { head, base, title } => {
                let sent = gl.create_merge_request(project, &head, &base, &title, &body);
                self.create(p, job, CapKind::PullRequest, NO_LOOK, sent).await
            }
            Target::CheckRun { head_sha, name, conclusion } => {
                // The end's status must land after the start's, never under it.
                if conclusion.is_some() && self.start_pending(&job.id, Purpose::CheckStart).await? {
                    return Ok(Outcome::Wait);
                }
                let state = match conclusion {
                    None => StatusState::Running,
                    Some(crate::domain::Conclusion::Success) => StatusState::Success,
                    Some(crate::domain::Conclusion::Cancelled) => StatusState::Canceled,
                    Some(_) => StatusState::Failed,
                };
                let description = status_description(&body);
                let status = Status { state, name: &name, description: &description, target_url: None };
                match gl.set_status(project, &head_sha, &status).await {
                    Ok(made) => done(made),
                    // A retry of a status whose answer was lost: it is set.
                    Err(e) if e.message.contains("Cannot transition status") => done(Created::default()),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// A merge request review: line by line when the agent answered in the
    /// review format, else its answer as one note.
    ///
    /// The review's summary carries a marker of its own: the status note on
    /// the same merge request carries the job's, and a lost answer must find
    /// the review, not the status.
    async fn review_on_gitlab(
        &self,
        gl: &crate::forge::gitlab::api::Client,
        p: &mut Publication,
        job: &Job,
        number: u64,
    ) -> Result<Outcome, ApiError> {
        let project = p.repo.clone();
        let project = project.as_str();
        let result_marker = review_marker(&job.id);
        let on = Noteable::MergeRequest(number);
        let answer = job.result.as_deref().filter(|_| job.state == JobState::Succeeded).and_then(review::parse);
        let note = Note::Reviewed { repo: project.to_string(), number, trigger: job.trigger.clone() };
        let earlier = self.reviewed(&note).await;
        let Some(answer) = answer else {
            let body = format!("{}\n{result_marker}", p.body);
            let look = Some(gl.find_note(project, on, &result_marker));
            let sent = self.create(p, job, CapKind::Comment, look, gl.create_note(project, on, &body)).await;
            return self.note_reviewed(sent, &note, job, earlier.findings).await;
        };
        let version = gl.mr_version(project, number).await?;
        let files = gl.mr_diffs(project, number).await?;
        let patches: Vec<serde_json::Value> =
            files.iter().map(|f| serde_json::json!({ "filename": f.new_path, "patch": f.diff })).collect();
        let diff = review::DiffLines::from_files(&patches);
        let posted = if job.spec.review_full { Default::default() } else { earlier.findings };
        let allow_approve = job.spec.output_options.allow_approve;
        let planned = review::plan(&answer, &diff, allow_approve, &posted, review::Flavor::GitLab);
        let summary = format!("{}\n{result_marker}", body::review_body(job, &planned.body));
        let notes: Vec<InlineNote> = body::review_comments(job, &planned.comments)
            .iter()
            .filter_map(|c| {
                let path = c["path"].as_str()?.to_string();
                let line = c["line"].as_u64()?;
                let side = review::Side::parse(c["side"].as_str());
                let old_path = files.iter().find(|f| f.new_path == path).map(|f| f.old_path.clone());
                Some(InlineNote {
                    side: if side == review::Side::Left { NoteSide::Old } else { NoteSide::New },
                    start_line: c["start_line"].as_u64(),
                    body: c["body"].as_str().unwrap_or_default().to_string(),
                    old_path,
                    path,
                    line,
                })
            })
            .collect();
        let review = Review { version: &version, summary: &summary, marker: &result_marker, comments: &notes };
        let look = Some(gl.find_note(project, on, &result_marker));
        let sent = self.create(p, job, CapKind::Comment, look, gl.publish_review(project, number, &review)).await;
        // Approving is asked again on a retry: it changes nothing twice.
        if sent.is_ok() && planned.event == "APPROVE" {
            gl.approve(project, number).await?;
        }
        self.note_reviewed(sent, &note, job, planned.findings.into_iter().collect()).await
    }
}

/// What marks a job's review among the merge request's notes.
fn review_marker(job: &str) -> String {
    format!("{}review={job} -->", crate::event::MARKER_PREFIX)
}

/// A commit status's description: the summary's first line, within
/// GitLab's 255 characters.
fn status_description(body: &str) -> String {
    let first = body.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("<!--")).unwrap_or("");
    first.chars().take(255).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_says_the_first_line_within_255_characters() {
        assert_eq!(status_description("\n<!-- baton:job=j -->\nAll good.\nmore"), "All good.");
        assert_eq!(status_description(&"é".repeat(300)).chars().count(), 255);
    }
}
