//! What baton says on GitHub: the bodies of comments, reviews, pull
//! requests and check runs. Every body carries a hidden marker naming the
//! job, so baton can find its own posts and never triggers on them.
//!
//! The agent's text enters a body only here, and only defused
//! (`super::defuse`): through `fit` for what stands as markdown of its own,
//! through `template_context` for what a trigger's template places, through
//! `review_comments` for a review's inline comments. Baton's footer and
//! marker are added after, untouched.

use super::defuse;
use crate::rules::OutputKind;
use crate::store::{Job, JobState};

/// GitHub rejects bodies over 65,536 characters.
const MAX_BODY_CHARS: usize = 65_536;

/// The hidden marker of a job's result.
pub fn marker(job_id: &str) -> String {
    format!("{}job={job_id} -->", crate::event::MARKER_PREFIX)
}

/// The hidden marker of a job's status comment (distinct from its result's,
/// so that finding one never passes for the other).
pub(crate) fn status_marker(job_id: &str) -> String {
    format!("{}job={job_id} status -->", crate::event::MARKER_PREFIX)
}

fn footer(job: &Job, marker: &str) -> String {
    let usage = job.usage.as_ref().map(|u| format!(" · {}", usage_line(u))).unwrap_or_default();
    format!("\n\n---\n<sub>baton · trigger `{}` · job `{}`{usage}</sub>\n{marker}", job.trigger, job.id)
}

/// A job's model use in a few words: `12.3k tokens in, 1.2k out, $0.08`.
pub(crate) fn usage_line(u: &crate::store::Usage) -> String {
    let count = |n: u64| match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.1}M", n as f64 / 1e6),
    };
    let cost = u.cost_usd.map(|c| format!(", ${c:.2}")).unwrap_or_default();
    format!("{} tokens in, {} out{cost}", count(u.input_tokens), count(u.output_tokens))
}

/// How `job`'s agent text is defused: its trigger's `mentions`, and the
/// event's author, who may still be mentioned.
fn policy(job: &Job) -> defuse::Policy<'_> {
    defuse::Policy { mentions: job.spec.output_options.mentions, author: job.spec.author.as_deref() }
}

/// How many characters of the body `footer` leaves for the text before it.
fn room(footer: &str) -> usize {
    MAX_BODY_CHARS.saturating_sub(footer.chars().count() + 200)
}

fn cut_note(job: &Job) -> String {
    format!("\n\n… (cut: the result is longer than GitHub allows; the full text is on the job `{}`)", job.id)
}

/// `main`, which holds the agent's text, defused and cut to fit GitHub's
/// limit beside `footer` (with a note), then the footer.
fn fit(main: String, footer: &str, job: &Job) -> String {
    let (room, policy) = (room(footer), policy(job));
    let mut said = defuse::markdown(&main, &policy);
    if said.chars().count() <= room {
        return format!("{said}{footer}");
    }
    // Cut first, then defuse what is left: a cut through a code span
    // would turn what was read as code into text, and a mention in it
    // would be live. Defusing adds a character per mention, so the cut
    // may need to go a little deeper.
    let mut take = main.chars().count();
    for _ in 0..8 {
        let over = said.chars().count().saturating_sub(room);
        if over == 0 {
            return format!("{said}{}{footer}", cut_note(job));
        }
        take = take.saturating_sub(over).min(room);
        said = defuse::markdown(&main.chars().take(take).collect::<String>(), &policy);
    }
    // Still over (hardly possible): defused with code and all, a cut
    // anywhere leaves no mention live.
    let all: String = defuse::anywhere(&main.chars().take(take).collect::<String>(), &policy);
    format!("{}{}{footer}", all.chars().take(room).collect::<String>(), cut_note(job))
}

/// A template's output (the trigger's own text, with the agent's already
/// defused in it) cut to fit beside `footer`, then the footer.
fn fit_template(main: String, footer: &str, job: &Job) -> String {
    let room = room(footer);
    if main.chars().count() <= room {
        return format!("{main}{footer}");
    }
    format!("{}{}{footer}", main.chars().take(room).collect::<String>(), cut_note(job))
}

/// Whether the job's last attempt ran out of time.
fn timed_out(job: &Job) -> bool {
    job.history.last().and_then(|a| a.outcome) == Some(crate::store::Outcome::Timeout)
}

/// The result of a finished job, or why there is none.
pub(crate) fn comment_body(job: &Job) -> String {
    let main = match job.state {
        JobState::Succeeded if job.spec.output == OutputKind::PullRequest && job.branch.is_none() => {
            format!(
                "The agent changed nothing, so there is no pull request.\n\n{}",
                job.result.clone().unwrap_or_default()
            )
        }
        JobState::Succeeded if job.spec.output == OutputKind::Push => {
            format!("{}\n\n{}", job.result.clone().unwrap_or_default(), pushed_line(job))
        }
        JobState::Succeeded => job.result.clone().unwrap_or_default(),
        JobState::Cancelled => format!("baton: this job was cancelled. {}", job.error.as_deref().unwrap_or("")),
        _ if timed_out(job) => {
            format!("baton: this job timed out: {}", job.error.as_deref().unwrap_or("the agent ran out of time"))
        }
        _ => format!("baton could not finish this job: {}", job.error.as_deref().unwrap_or("unknown error")),
    };
    fit(main, &footer(job, &marker(&job.id)), job)
}

/// What a `push` job did to the pull request's branch. GitHub links a
/// full commit id (and `owner/name@id` for a fork's) by itself.
fn pushed_line(job: &Job) -> String {
    match (&job.commit, &job.spec.push) {
        (Some(commit), Some(target)) => {
            let link = if job.repo.as_deref() == Some(target.repo.as_str()) {
                commit.clone()
            } else {
                format!("{}@{commit}", target.repo)
            };
            format!("Pushed {link} to `{}`.", target.branch)
        }
        _ => "The agent changed nothing, so nothing was pushed.".to_string(),
    }
}

/// A line-by-line review's body: its summary and baton's footer.
pub(crate) fn review_body(job: &Job, summary: &str) -> String {
    fit(summary.to_string(), &footer(job, &marker(&job.id)), job)
}

/// A line-by-line review's inline comments (as `review::plan` made them)
/// with the agent's text in their `body` defused; a suggestion block in
/// it is code, and stays as it is.
pub(crate) fn review_comments(job: &Job, comments: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let policy = policy(job);
    comments
        .iter()
        .map(|c| {
            let mut c = c.clone();
            if let Some(body) = c["body"].as_str() {
                c["body"] = defuse::markdown(body, &policy).into();
            }
            c
        })
        .collect()
}

/// The status comment when a job starts.
pub(crate) fn status_start_body(job: &Job, public_url: Option<&str>) -> String {
    let link = match public_url {
        Some(url) => format!(" ([job `{}`]({}/jobs/{}))", job.id, url.trim_end_matches('/'), job.id),
        None => format!(" (job `{}`)", job.id),
    };
    format!(
        "👀 baton is working on it: trigger `{}`{link}. This comment is updated when the job ends.{}",
        job.trigger,
        footer(job, &status_marker(&job.id))
    )
}

/// The status comment's last edit when the result went elsewhere.
pub(crate) fn status_end_body(job: &Job) -> String {
    let main = match (job.state, job.spec.output) {
        (JobState::Succeeded, OutputKind::PullRequest) => match &job.branch {
            Some(branch) => format!("Done: the changes are in a pull request from `{branch}`."),
            None => "Done: the agent changed nothing, so there is no pull request.".to_string(),
        },
        (JobState::Succeeded, OutputKind::Review) => {
            let short = |sha: &str| sha.get(..7).unwrap_or(sha).to_string();
            let head = job.spec.head_sha.as_deref().map(short).unwrap_or_default();
            match &job.spec.review_since {
                Some(since) => format!("Done: the review is posted (reviewed {}..{head}).", short(since)),
                None if head.is_empty() => "Done: the review is posted.".to_string(),
                None => format!("Done: the review is posted (reviewed {head}, the whole pull request)."),
            }
        }
        (JobState::Succeeded, OutputKind::CheckRun) => "Done: see the check run.".to_string(),
        (JobState::Succeeded, _) if job.spec.reply_to.is_some() => "Done: answered in the review thread.".to_string(),
        (JobState::Succeeded, _) => "Done.".to_string(),
        _ => return comment_body(job),
    };
    fit(main, &footer(job, &marker(&job.id)), job)
}

/// The context of a trigger's `output.title` and `output.body` templates.
/// The result is defused code and all: where the template puts it, what
/// was a code span may no longer be one.
fn template_context(job: &Job) -> minijinja::Value {
    let result = defuse::anywhere(job.result.as_deref().unwrap_or_default(), &policy(job));
    minijinja::context! {
        job => minijinja::context! { id => job.id, trigger => job.trigger, branch => job.branch },
        result => result,
        trigger => job.trigger,
        repo => job.repo,
        subject => job.subject,
    }
}

/// `template` rendered for `job`, or `None` (logged) when it fails.
fn render(template: Option<&str>, job: &Job) -> Option<String> {
    let template = template?;
    match minijinja::Environment::new().render_str(template, template_context(job)) {
        Ok(text) if !text.trim().is_empty() => Some(text),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e, "An output template failed; using the default.");
            None
        }
    }
}

/// The title of the pull request a job opens (`output.title`, or a default).
pub(crate) fn pull_request_title(job: &Job) -> String {
    let title = render(job.spec.output_options.title.as_deref(), job).unwrap_or_else(|| match job.spec.subject {
        Some(n) => format!("baton: {} for #{n}", job.trigger),
        None => format!("baton: {}", job.trigger),
    });
    title.lines().next().unwrap_or_default().chars().take(256).collect()
}

/// The body of the pull request a job opens: `output.body`, or the result
/// with `Fixes #N` when the job came from an issue.
pub(crate) fn pull_request_body(job: &Job) -> String {
    if let Some(body) = render(job.spec.output_options.body.as_deref(), job) {
        return fit_template(body, &footer(job, &marker(&job.id)), job);
    }
    let mut body = comment_body(job);
    if let (Some(n), false) = (job.spec.subject, job.spec.subject_is_pull_request) {
        body = format!("Fixes #{n}\n\n{body}");
    }
    body
}

#[cfg(test)]
mod usage_tests {
    use super::usage_line;
    use crate::store::Usage;

    #[test]
    fn usage_reads_in_a_few_words() {
        let u = Usage { input_tokens: 12_345, output_tokens: 1_234, cost_usd: Some(0.0812), ..Usage::default() };
        assert_eq!(usage_line(&u), "12.3k tokens in, 1.2k out, $0.08");
        let u = Usage { input_tokens: 2_500_000, output_tokens: 12, ..Usage::default() };
        assert_eq!(usage_line(&u), "2.5M tokens in, 12 out");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::JobSpec;

    fn job(result: &str) -> Job {
        let spec = JobSpec { trigger: "t".into(), output: OutputKind::Comment, ..JobSpec::default() };
        let mut job = Job::new("abc123".into(), 1, "d".into(), spec, chrono::Utc::now());
        job.end(JobState::Succeeded, Some(result.to_string()), None, chrono::Utc::now());
        job
    }

    #[test]
    fn a_long_result_is_cut_to_fit_github_and_keeps_its_marker() {
        let body = comment_body(&job(&"é".repeat(100_000)));
        assert!(body.chars().count() <= MAX_BODY_CHARS);
        assert!(body.contains("cut: the result is longer than GitHub allows; the full text is on the job `abc123`"));
        assert!(body.ends_with(&marker("abc123")));
        let short = comment_body(&job("short"));
        assert!(short.starts_with("short") && !short.contains("cut:"));
    }

    /// The agent's text, as a comment's body, the template's `{{ result }}`
    /// and a review's inline comments: no control character, no marker
    /// but baton's own, no mention but the author's; the footer untouched.
    #[test]
    fn the_agents_text_is_defused_wherever_it_goes() {
        let mut j = job("@x, @Codertocat: \x1b]52;c;aGk=\x07 <!-- baton:job=other --> `@code`");
        j.spec.author = Some("Codertocat".into());
        let body = comment_body(&j);
        assert!(
            body.starts_with("@\u{200B}x, @Codertocat: ]52;c;aGk= <\u{200B}!-- baton:job=other --> `@code`"),
            "{body}"
        );
        assert_eq!(body.matches(crate::event::MARKER_PREFIX).count(), 1, "{body}");
        assert!(body.ends_with(&marker("abc123")) && body.contains("trigger `t` · job `abc123`"), "{body}");

        j.spec.output_options.body = Some("cc @acme/reviewers\n\n{{ result }}".into());
        j.spec.output_options.title = Some("Fix {{ result }}".into());
        let body = pull_request_body(&j);
        assert!(
            body.starts_with("cc @acme/reviewers\n\n@\u{200B}x, @Codertocat"),
            "the trigger's own mention stays: {body}"
        );
        assert!(body.contains("`@\u{200B}code`"), "in a template, code may not stay code: {body}");
        assert!(pull_request_title(&j).starts_with("Fix @\u{200B}x, @Codertocat: ]52;c;aGk= <\u{200B}!--"));

        let comments =
            [serde_json::json!({ "path": "a", "line": 1, "body": "@y\n\n```suggestion\n@Inject \x1b\n```" })];
        let comments = review_comments(&j, &comments);
        assert_eq!(comments[0]["body"], "@\u{200B}y\n\n```suggestion\n@Inject \n```");
        assert_eq!(comments[0]["path"], "a");

        j.spec.output_options.mentions = crate::rules::Mentions::Keep;
        assert!(comment_body(&j).starts_with("@x, @Codertocat: ]52;c;aGk= <\u{200B}!--"));
    }

    /// A result cut to fit is defused after the cut: a code span the cut
    /// leaves open is text, and its mention is defused.
    #[test]
    fn a_cut_never_leaves_a_mention_live() {
        let probe = job("x");
        let room = room(&footer(&probe, &marker("abc123")));
        let body = comment_body(&job(&format!("{}`@live and more code`", "y".repeat(room - 8))));
        assert!(body.chars().count() <= MAX_BODY_CHARS && body.contains("cut:"), "{}", body.len());
        assert!(body.contains("`@\u{200B}live") && !body.contains("`@live"), "{}", &body[room - 20..room + 20]);
        // Many mentions near the end: the cut goes deeper until it fits.
        let body = comment_body(&job(&format!("{}{}", "y".repeat(room - 400), " @a".repeat(400))));
        assert!(body.chars().count() <= MAX_BODY_CHARS && body.ends_with(&marker("abc123")));
    }

    #[test]
    fn the_status_marker_is_not_the_result_marker() {
        let j = job("x");
        let status = status_start_body(&j, Some("https://baton.example/"));
        assert!(status.contains(&status_marker("abc123")) && !status.contains(&marker("abc123")));
        assert!(status.contains("https://baton.example/jobs/abc123"));
    }
}
