//! Notifications: a job's end told to `[notify.NAME]` targets — a signed
//! JSON webhook, or a Slack message in Block Kit. They go through the
//! outbox like every publication (retried, at most one success per target);
//! the body is planned with the job's end (`payload`, redacted) and shaped
//! for the target here.

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::config::{NotifyKind, NotifyTarget};
use crate::forge::ApiError;
use crate::store::Job;

/// Lines of the result a notification carries, at most.
const RESULT_LINES: usize = 10;
const RESULT_CHARS: usize = 1500;

/// How long one notification may take.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What a notification says of `job` (the webhook body; Slack's message is
/// made from it): the trigger, the subject and its link, the end, the first
/// lines of the result, the cost when known, the dashboard link.
pub fn payload(job: &Job, web_url: &str, public_url: Option<&str>) -> Value {
    let subject_url = match (&job.repo, job.subject) {
        (Some(repo), Some(n)) => Some(format!("{}/{repo}/issues/{n}", web_url.trim_end_matches('/'))),
        _ => None,
    };
    // The agent's text goes out without control characters (a receiver
    // may print it on a terminal); Slack's own markup is escaped where the
    // message is made (`slack_message`).
    let result = super::defuse::plain(job.result.as_deref().unwrap_or_default());
    let mut head: String = result.lines().take(RESULT_LINES).collect::<Vec<_>>().join("\n");
    if head.chars().count() > RESULT_CHARS {
        head = head.chars().take(RESULT_CHARS).collect::<String>() + "…";
    }
    json!({
        "event": format!("job.{}", job.state),
        "job": {
            "id": job.id,
            "trigger": job.trigger,
            "state": job.state,
            "repo": job.repo,
            "subject": job.subject,
            "attempts": job.attempts,
            "error": job.error.as_deref().map(super::defuse::plain),
            "created_at": job.created_at,
            "finished_at": job.finished_at,
        },
        "result": head,
        "subject_url": subject_url,
        "dashboard_url": public_url.map(|u| format!("{}/jobs/{}", u.trim_end_matches('/'), job.id)),
        "cost_usd": job.usage.as_ref().and_then(|u| u.cost_usd),
        "usage": job.usage,
    })
}

/// `HMAC-SHA256(secret, body)` as `sha256=<hex>`, as GitHub signs its own.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // An HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Slack's mrkdwn treats these three as markup.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The Block Kit message for `payload`.
pub(crate) fn slack_message(payload: &Value) -> Value {
    let job = &payload["job"];
    let state = job["state"].as_str().unwrap_or_default();
    let mark = match state {
        "succeeded" => "✅",
        "failed" => "❌",
        _ => "⏹️",
    };
    let trigger = escape(job["trigger"].as_str().unwrap_or_default());
    let subject = match (job["repo"].as_str(), job["subject"].as_u64()) {
        (Some(repo), Some(n)) => {
            let name = escape(&format!("{repo}#{n}"));
            match payload["subject_url"].as_str() {
                Some(url) => format!(" on <{url}|{name}>"),
                None => format!(" on {name}"),
            }
        }
        (Some(repo), None) => format!(" on {}", escape(repo)),
        _ => String::new(),
    };
    let title = format!("{mark} *{trigger}* {state}{subject}");
    let mut blocks = vec![json!({ "type": "section", "text": { "type": "mrkdwn", "text": title } })];
    let body = match (payload["result"].as_str().filter(|r| !r.is_empty()), job["error"].as_str()) {
        (Some(result), _) => Some(result),
        (None, Some(error)) => Some(error),
        _ => None,
    };
    if let Some(body) = body {
        blocks.push(
            json!({ "type": "section", "text": { "type": "mrkdwn", "text": format!("```{}```", escape(body)) } }),
        );
    }
    let mut context = Vec::new();
    if let Some(cost) = payload["cost_usd"].as_f64() {
        context.push(format!("cost ${cost:.2}"));
    }
    let id = escape(job["id"].as_str().unwrap_or_default());
    context.push(match payload["dashboard_url"].as_str() {
        Some(url) => format!("<{url}|job {id}>"),
        None => format!("job {id}"),
    });
    blocks.push(json!({ "type": "context", "elements": [{ "type": "mrkdwn", "text": context.join(" · ") }] }));
    json!({ "text": format!("baton: {} {state}", job["trigger"].as_str().unwrap_or_default()), "blocks": blocks })
}

/// Sends the planned `body` (a `payload`) to `target`; `job` names the
/// delivery so a receiver can drop a retry of one it already took.
pub async fn send(http: &reqwest::Client, target: &NotifyTarget, job: &str, body: &str) -> Result<(), ApiError> {
    let request = match target.kind {
        NotifyKind::Webhook => {
            let key = target.secret.as_ref().map(|s| s.expose().as_bytes().to_vec()).unwrap_or_default();
            let event = serde_json::from_str::<Value>(body).ok().and_then(|v| v["event"].as_str().map(str::to_string));
            http.post(target.url.expose())
                .header("content-type", "application/json")
                .header("x-baton-signature-256", signature(&key, body.as_bytes()))
                .header("x-baton-delivery", format!("{job}/notify/{}", target.name))
                .header("x-baton-event", event.unwrap_or_default())
                .body(body.to_string())
        }
        NotifyKind::Slack => {
            let payload: Value = serde_json::from_str(body).unwrap_or_default();
            http.post(target.url.expose()).json(&slack_message(&payload))
        }
    };
    let who = format!("notify target `{}`", target.name);
    // reqwest's errors name the URL, which may be a secret: never shown.
    let answer = request.timeout(TIMEOUT).send().await.map_err(|e| {
        let maybe_applied = !e.is_connect();
        ApiError { message: format!("{who}: {}", e.without_url()), retryable: true, retry_after: None, maybe_applied }
    })?;
    let status = answer.status();
    if status.is_success() {
        return Ok(());
    }
    let retry_after = answer
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(std::time::Duration::from_secs);
    let retryable = status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408;
    Err(ApiError {
        message: format!("{who} answered {status}"),
        retryable,
        retry_after,
        maybe_applied: status.is_server_error(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_messages_escape_markup_and_link_what_they_can() {
        let payload = json!({
            "job": { "id": "j1", "trigger": "fix", "state": "failed", "repo": "o/r", "subject": 7, "error": "x < y & z" },
            "result": "",
            "subject_url": "https://github.com/o/r/issues/7",
            "dashboard_url": "https://baton.example/jobs/j1",
            "cost_usd": 0.084,
        });
        let m = slack_message(&payload);
        assert_eq!(m["blocks"][0]["text"]["text"], "❌ *fix* failed on <https://github.com/o/r/issues/7|o/r#7>");
        assert_eq!(m["blocks"][1]["text"]["text"], "```x &lt; y &amp; z```");
        assert_eq!(m["blocks"][2]["elements"][0]["text"], "cost $0.08 · <https://baton.example/jobs/j1|job j1>");
    }

    /// The agent's text reaches no receiver with control characters, nor
    /// Slack with live `<!channel>` or `<@U…>` mentions.
    #[test]
    fn the_agents_text_is_defused_for_receivers() {
        let spec = crate::rules::JobSpec { trigger: "t".into(), ..Default::default() };
        let mut job = Job::new("j1".into(), 1, "d".into(), spec, chrono::Utc::now());
        let text = "<!channel> <@U024BE7LH> <!here|here> \x1b]52;c;aGk=\x07 <!-- baton:job=x -->";
        job.end(crate::store::JobState::Failed, Some(text.into()), Some(format!("why: {text}")), chrono::Utc::now());
        let payload = payload(&job, "https://github.com", None);
        for got in [payload["result"].as_str().unwrap_or(""), payload["job"]["error"].as_str().unwrap_or("")] {
            assert!(!got.contains(['\x1b', '\x07']) && got.contains("<\u{200B}!-- baton:"), "{got:?}");
        }
        let slack = slack_message(&payload).to_string();
        assert!(!slack.contains("<!") && !slack.contains("<@") && slack.contains("&lt;!channel&gt;"), "{slack}");
    }

    #[test]
    fn signatures_are_githubs_format() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
