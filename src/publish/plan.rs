//! Publication planning: what a job's start and end put on GitHub, as
//! outbox records (the engine stores them with the job's state; the
//! publisher sends them), and the per-job caps on what a job may create.
//! Pure: no IO.

use chrono::Utc;

use crate::domain::{Job, JobState, Publication, PublicationState, Purpose, Subject, Target};
use crate::redact::Redactor;
use crate::rules::{JobSpec, OutputKind};

/// Plans publications for the jobs of one daemon.
pub(crate) struct Planner {
    /// Off without GitHub credentials: nothing is planned.
    pub publishing: bool,
    /// Whether GitLab can be published to (`[gitlab]` is configured).
    pub gitlab: bool,
    /// Links the status comment to the dashboard.
    pub public_url: Option<String>,
    /// Every body and title leaves through it.
    pub(crate) redactor: Redactor,
    /// GitHub's web address (`github.git_url`), for links in notifications.
    pub(crate) web_url: String,
}

/// What a create counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapKind {
    Comment,
    PullRequest,
    None,
}

/// Why `job` may not create one more `kind`, when its caps are reached.
pub(crate) fn cap_reached(job: &Job, kind: CapKind) -> Option<String> {
    let opts = &job.spec.output_options;
    match kind {
        CapKind::Comment => (job.progress.comments >= opts.max_comments)
            .then(|| format!("the job's cap of {} comments (output.max_comments) is reached", opts.max_comments)),
        CapKind::PullRequest => (job.progress.pull_requests >= opts.max_pull_requests).then(|| {
            format!("the job's cap of {} pull requests (output.max_pull_requests) is reached", opts.max_pull_requests)
        }),
        CapKind::None => None,
    }
}

impl Planner {
    /// What a job's end puts on GitHub: its result where the output says
    /// (a check run, a pull request, a review, or a comment — the status
    /// comment edited in place when there is one), and the status comment's
    /// last edit when the result went elsewhere. Failures and cancellations
    /// go where a comment would.
    pub(crate) fn at_end(&self, job: &Job) -> Vec<Publication> {
        let mut out = self.on_github_at_end(job);
        out.extend(self.notification(job));
        out
    }

    /// The trigger's notify targets, told of the job's end when `notify_on`
    /// lists it (whether or not anything goes to GitHub).
    fn notification(&self, job: &Job) -> Option<Publication> {
        let opts = &job.spec.output_options;
        if opts.notify.is_empty() || !job.state.is_final() || !opts.notify_on.iter().any(|e| e == job.state.as_str()) {
            return None;
        }
        let body = super::notify::payload(job, &self.web_url, self.public_url.as_deref()).to_string();
        let target = Target::Notify { targets: opts.notify.clone(), sent: Vec::new() };
        let repo = job.spec.repo.clone().unwrap_or_default();
        Some(self.publication(job, &repo, Purpose::Notify, target, body))
    }

    /// Whether the job's forge has credentials to publish with.
    fn publishes(&self, spec: &JobSpec) -> bool {
        match spec.forge {
            crate::forge::Forge::GitHub(_) => self.publishing,
            crate::forge::Forge::GitLab(_) => self.gitlab,
        }
    }

    fn on_github_at_end(&self, job: &Job) -> Vec<Publication> {
        let spec: &JobSpec = &job.spec;
        if spec.output == OutputKind::None || !self.publishes(spec) || !job.state.is_final() {
            return Vec::new();
        }
        let Some(repo) = spec.repo.clone() else { return Vec::new() };
        let publication = |purpose, target, body| self.publication(job, &repo, purpose, target, body);
        let mut out = Vec::new();
        let succeeded = job.state == JobState::Succeeded;
        match (spec.output, &job.branch, job.subject_of()) {
            (OutputKind::CheckRun, _, _) => {
                if let Some(sha) = &spec.head_sha {
                    let conclusion = Some(job.conclusion());
                    let target = Target::CheckRun { head_sha: sha.clone(), name: check_name(job), conclusion };
                    out.push(publication(Purpose::Final, target, super::comment_body(job)));
                }
            }
            (OutputKind::PullRequest, Some(branch), _) if succeeded => {
                let target = Target::PullRequest {
                    head: branch.clone(),
                    base: spec.default_branch.clone().unwrap_or_else(|| "main".into()),
                    title: super::pull_request_title(job),
                };
                out.push(publication(Purpose::Final, target, super::pull_request_body(job)));
            }
            (OutputKind::Review, _, Some(Subject::PullRequest(number))) if succeeded => {
                out.push(publication(Purpose::Final, Target::Review { number }, super::comment_body(job)));
            }
            // Asked for in a review thread: answered there, failures too.
            (OutputKind::Comment | OutputKind::Push, _, Some(Subject::PullRequest(number)))
                if spec.reply_to.is_some() =>
            {
                let comment_id = spec.reply_to.unwrap_or_default();
                out.push(publication(
                    Purpose::Final,
                    Target::ReviewReply { number, comment_id },
                    super::comment_body(job),
                ));
            }
            _ => {}
        }
        let progress = spec.output_options.progress && job.progress.started;
        match (spec.subject, out.is_empty()) {
            (Some(number), true) if progress => {
                out.push(publication(Purpose::Final, Target::EditStatus { number }, super::comment_body(job)))
            }
            (Some(number), false) if progress => {
                out.push(publication(Purpose::StatusEnd, Target::EditStatus { number }, super::status_end_body(job)))
            }
            (Some(number), true) => {
                out.push(publication(Purpose::Final, Target::IssueComment { number }, super::comment_body(job)))
            }
            (None, true) if spec.output != OutputKind::CheckRun => {
                if let Some(sha) = &spec.head_sha {
                    let target = Target::CommitComment { sha: sha.clone() };
                    out.push(publication(Purpose::Final, target, super::comment_body(job)));
                }
            }
            _ => {}
        }
        out
    }

    /// What a job's start puts on GitHub, once per job: 👀 and a status
    /// comment (with `progress`), and an in-progress check run.
    pub(crate) fn at_start(&self, job: &Job) -> Vec<Publication> {
        let spec: &JobSpec = &job.spec;
        if spec.output == OutputKind::None || !self.publishes(spec) || job.progress.started {
            return Vec::new();
        }
        let Some(repo) = spec.repo.clone() else { return Vec::new() };
        let mut out = Vec::new();
        if let (true, Some(number)) = (spec.output_options.progress, spec.subject) {
            let reaction = Target::Reaction { number, comment_id: spec.comment_id, review: spec.reply_to.is_some() };
            out.push(self.publication(job, &repo, Purpose::Reaction, reaction, String::new()));
            let body = super::status_start_body(job, self.public_url.as_deref());
            out.push(self.publication(job, &repo, Purpose::Status, Target::StatusComment { number }, body));
        }
        if let (OutputKind::CheckRun, Some(sha)) = (spec.output, &spec.head_sha) {
            let target = Target::CheckRun { head_sha: sha.clone(), name: check_name(job), conclusion: None };
            let body = super::status_start_body(job, self.public_url.as_deref());
            out.push(self.publication(job, &repo, Purpose::CheckStart, target, body));
        }
        out
    }

    /// Every publication passes here on its way to the outbox: whatever a
    /// template put in its body or title (a prompt, the event's text, the
    /// result) leaves redacted.
    pub fn publication(&self, job: &Job, repo: &str, purpose: Purpose, target: Target, body: String) -> Publication {
        let target = match target {
            Target::PullRequest { head, base, title } => {
                Target::PullRequest { head, base, title: self.redactor.redact(&title) }
            }
            other => other,
        };
        Publication {
            job: job.id.clone(),
            purpose,
            repo: repo.to_string(),
            access: job.spec.access,
            target,
            body: self.redactor.redact(&body),
            state: PublicationState::Pending,
            attempts: 0,
            next_attempt_at: Utc::now(),
            last_error: None,
            url: None,
            maybe_sent: false,
            remote_id: None,
        }
    }
}

impl crate::domain::PlanOutbox for Planner {
    fn at_start(&self, job: &Job) -> Vec<Publication> {
        Planner::at_start(self, job)
    }

    fn at_end(&self, job: &Job) -> Vec<Publication> {
        Planner::at_end(self, job)
    }

    fn pull_request_title(&self, job: &Job) -> String {
        super::pull_request_title(job)
    }
}

/// The check run a job makes is named after its trigger.
fn check_name(job: &Job) -> String {
    format!("baton/{}", job.trigger)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Outcome;

    fn planner() -> Planner {
        Planner {
            publishing: true,
            gitlab: false,
            public_url: None,
            redactor: Redactor::new(Vec::new()),
            web_url: "https://github.com".into(),
        }
    }

    /// (output, how the job ended, about a PR?, progress shown?) → what its
    /// end publishes, as `purpose:target` in order.
    fn check(output: OutputKind, state: JobState, pr: bool, progress: bool, expect: &str) {
        let mut spec = JobSpec {
            trigger: "t".into(),
            repo: Some("o/r".into()),
            subject: Some(7),
            subject_is_pull_request: pr,
            head_sha: Some("abc".into()),
            output,
            ..JobSpec::default()
        };
        spec.output_options.progress = progress;
        let mut job = Job::new("j".into(), 1, "d".into(), spec, Utc::now());
        job.start_attempt(Utc::now());
        job.progress.started = progress;
        if output == OutputKind::PullRequest && state == JobState::Succeeded {
            job.branch = Some("baton/j".into());
        }
        job.end_attempt(Outcome::Exit, Some(0), None, Utc::now());
        job.end(state, Some("ok".into()), None, Utc::now());
        let got: Vec<String> = planner()
            .at_end(&job)
            .iter()
            .map(|p| {
                let target =
                    serde_json::to_value(&p.target).unwrap_or_default()["kind"].as_str().unwrap_or("").to_string();
                format!("{}:{target}", p.purpose.as_str())
            })
            .collect();
        assert_eq!(got.join(" "), expect, "{output:?} {state} pr={pr} progress={progress}");
    }

    #[test]
    fn a_jobs_end_publishes_where_its_output_says() {
        use JobState::*;
        use OutputKind as O;
        check(O::Comment, Succeeded, false, false, "final:issue_comment");
        check(O::Comment, Failed, false, false, "final:issue_comment");
        check(O::Comment, Succeeded, false, true, "final:edit_status");
        check(O::Review, Succeeded, true, false, "final:review");
        check(O::Review, Succeeded, false, false, "final:issue_comment"); // an issue has no review
        check(O::Review, Failed, true, true, "final:edit_status");
        check(O::PullRequest, Succeeded, false, true, "final:pull_request status-end:edit_status");
        check(O::PullRequest, Failed, false, false, "final:issue_comment");
        check(O::CheckRun, Succeeded, true, false, "final:check_run");
        check(O::CheckRun, Cancelled, true, true, "final:check_run status-end:edit_status");
        check(O::None, Failed, false, false, "");
    }

    /// A job asked for in a review thread answers there, whatever its end;
    /// the status comment only says where.
    #[test]
    fn a_thread_is_answered_in_the_thread() {
        for (output, state) in [(OutputKind::Push, JobState::Succeeded), (OutputKind::Comment, JobState::Failed)] {
            let spec = JobSpec {
                repo: Some("o/r".into()),
                subject: Some(7),
                subject_is_pull_request: true,
                output,
                reply_to: Some(100),
                comment_id: Some(101),
                ..JobSpec::default()
            };
            let mut job = Job::new("j".into(), 1, "d".into(), spec, Utc::now());
            job.spec.output_options.progress = true;
            let start = planner().at_start(&job);
            assert_eq!(start[0].target, Target::Reaction { number: 7, comment_id: Some(101), review: true });
            job.progress.started = true;
            job.start_attempt(Utc::now());
            job.end(state, Some("ok".into()), None, Utc::now());
            let end = planner().at_end(&job);
            let got: Vec<_> = end.iter().map(|p| (p.purpose, p.target.clone())).collect();
            assert_eq!(
                got,
                vec![
                    (Purpose::Final, Target::ReviewReply { number: 7, comment_id: 100 }),
                    (Purpose::StatusEnd, Target::EditStatus { number: 7 })
                ],
                "{output:?} {state}"
            );
        }
    }

    /// Notify targets hear of the ends `notify_on` lists, whether or not
    /// anything goes to GitHub.
    #[test]
    fn notifications_follow_notify_on_even_without_github() {
        for (state, publishing, expect) in [
            (JobState::Failed, true, "final:issue_comment notify:notify"),
            (JobState::Failed, false, "notify:notify"),
            (JobState::Succeeded, true, "final:issue_comment"),
            (JobState::Cancelled, false, ""),
        ] {
            let mut spec = JobSpec { repo: Some("o/r".into()), subject: Some(7), ..JobSpec::default() };
            spec.output_options.notify = vec!["team".into()];
            spec.output_options.notify_on = vec!["failed".into()];
            let mut job = Job::new("j".into(), 1, "d".into(), spec, Utc::now());
            job.start_attempt(Utc::now());
            job.end(state, Some("r".into()), None, Utc::now());
            let planner = Planner { publishing, ..planner() };
            let got: Vec<String> = planner
                .at_end(&job)
                .iter()
                .map(|p| {
                    let kind =
                        serde_json::to_value(&p.target).unwrap_or_default()["kind"].as_str().unwrap_or("").to_string();
                    format!("{}:{kind}", p.purpose.as_str())
                })
                .collect();
            assert_eq!(got.join(" "), expect, "{state} publishing={publishing}");
        }
    }

    #[test]
    fn caps_stop_creates_past_the_jobs_limits() {
        let mut job = Job::new("j".into(), 1, "d".into(), JobSpec::default(), Utc::now());
        job.spec.output_options.max_comments = 2;
        job.progress.comments = 1;
        assert_eq!(cap_reached(&job, CapKind::Comment), None);
        job.progress.comments = 2;
        assert!(cap_reached(&job, CapKind::Comment).is_some_and(|w| w.contains("output.max_comments")));
        assert_eq!(cap_reached(&job, CapKind::None), None);
    }
}
