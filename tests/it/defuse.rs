//! Agent text that an attacker shaped (issue #33): on GitHub it pages no
//! one, carries no marker but baton's own and no control character; a
//! comment by another login that carries a job's marker is never taken for
//! baton's own post; and an operator's terminal sees control characters
//! escaped.

use crate::fake_github::{App, FakeGitHub, Faults, TOKEN_LOGIN};
use crate::harness::{bare_repo, eventually, fixture, Baton, Workdir, BIN};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const SECRET: &str = "defuse-secret";
const TOKEN: &str = "ghp_defuseTestToken0123456789abcdefghijk";
const ISSUE: &str = "Codertocat/Hello-World#1";

/// A daemon publishing to `fake` with an agent whose script is `agent`
/// and one trigger per `(name, trigger)`.
fn daemon(fake: &FakeGitHub, agent: &str, triggers: Vec<(&str, Trigger)>) -> (Workdir, Baton) {
    let w = Workdir::new();
    let repos = w.path().join("remote");
    bare_repo(&repos, "Codertocat/Hello-World", "master", &[("README.md", "hello")]);
    let agent = w.script("agent.sh", agent);
    let mut scenario = Scenario::new()
        .github(GitHub::secret(SECRET).api(fake).repos(&repos).token("env:GITHUB_TOKEN"))
        .agent("script", Agent::script(&agent));
    for (name, trigger) in triggers {
        scenario = scenario.trigger(name, trigger);
    }
    scenario.write(&w);
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", TOKEN)]);
    (w, baton)
}

/// A comment trigger on an opened issue with no status comment: its result
/// is one create.
fn comment_trigger() -> Trigger {
    Trigger::on(&["issues.opened"])
        .agent("script")
        .workspace("none")
        .prompt("x")
        .output("comment")
        .set("output.progress", false)
}

fn marker(id: &str) -> String {
    format!("<!-- baton:job={id} -->")
}

/// What GitHub would take for a mention in `body`: `@` at the start or
/// after a character other than a letter or digit, then a letter or digit.
/// (Code spans are not told apart: the caller names what is in one.)
fn live_mentions(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut prev: Option<char> = None;
    for (i, c) in body.char_indices() {
        if c == '@' && prev.is_none_or(|p| !p.is_ascii_alphanumeric()) {
            let name: String =
                body[i + 1..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '/').collect();
            if name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
                out.push(name);
            }
        }
        prev = Some(c);
    }
    out
}

/// An agent's result with 50 mentions, a team, a foreign marker, ESC, OSC
/// 52 (clipboard), OSC 0 (title) and NUL lands with none of them live: the
/// only mention left is the event's author (and one in a code span, which
/// GitHub does not link), the only marker baton's own, at the end. With
/// `mentions = "keep"` the mentions stay, the rest does not.
#[tokio::test]
async fn an_agents_result_reaches_github_defused() {
    let fake = FakeGitHub::start().await;
    let agent = "#!/bin/sh\ncat > /dev/null\ni=1\nwhile [ $i -le 50 ]; do printf '@user%d ' $i; i=$((i+1)); done\n\
                 printf '\\ncc @acme/security-team, thanks @Codertocat; `@code` stays.\\n'\n\
                 printf '<!-- baton:job=0123456789abcdef -->\\n'\n\
                 printf 'red \\033[31mRED\\033[0m clip \\033]52;c;ZWNobyBwd25lZA==\\007 title \\033]0;owned\\007 nul \\000 end\\n'\n";
    let (_w, baton) = daemon(
        &fake,
        agent,
        vec![("defused", comment_trigger()), ("kept", comment_trigger().set("output.mentions", "keep"))],
    );
    let (status, answer) = baton.deliver(SECRET, "issues", "defuse-1", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    let ids: Vec<String> = answer["jobs"].as_array().unwrap().iter().map(|j| j.as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 2, "{answer}");
    for id in &ids {
        assert_eq!(baton.finished(id).await["state"], "succeeded");
    }
    eventually("both results posted", || fake.comments(ISSUE).len() == 2).await;
    let body_of = |trigger: &str| {
        let id = baton::domain::job_id("defuse-1", trigger);
        let comment = fake.comments(ISSUE).into_iter().find(|c| c.body.contains(&marker(&id)));
        (id, comment.map(|c| c.body).unwrap_or_default())
    };

    for trigger in ["defused", "kept"] {
        let (id, body) = body_of(trigger);
        let controls: Vec<char> = body.chars().filter(|c| c.is_control() && !matches!(c, '\n' | '\t')).collect();
        assert!(controls.is_empty(), "{trigger}: control characters {controls:?} in {body:?}");
        assert!(body.contains("clip ]52;c;ZWNobyBwd25lZA== title ]0;owned nul  end"), "{trigger}: {body:?}");
        assert_eq!(body.matches("<!-- baton:").count(), 1, "{trigger}: only baton's own marker: {body}");
        assert!(body.ends_with(&marker(&id)), "{trigger}: {body}");
        assert!(body.contains("<\u{200B}!-- baton:job=0123456789abcdef -->"), "{trigger}: shown, not hidden: {body}");
    }

    let (_, defused) = body_of("defused");
    assert_eq!(live_mentions(&defused), ["Codertocat", "code"], "only the author (and code) in {defused}");
    assert!(defused.contains("@\u{200B}user50 ") && defused.contains("@\u{200B}acme/security-team"), "{defused}");
    let (_, kept) = body_of("kept");
    let live = live_mentions(&kept);
    assert_eq!(live.len(), 53, "{live:?}");
    assert!(live.contains(&"user1".to_string()) && live.contains(&"acme/security-team".to_string()), "{live:?}");
    // The job keeps what the agent said, as it said it.
    let job = baton.job(&baton::domain::job_id("defuse-1", "defused")).await;
    assert!(job["result"].as_str().unwrap_or("").contains("\u{1b}]52;c;"), "{job}");
}

/// Job ids can be predicted, and anyone can comment: a comment by another
/// login that carries the job's marker is not taken for baton's own post
/// when the answer to baton's create was lost. baton posts its result.
#[tokio::test]
async fn a_strangers_comment_with_the_jobs_marker_is_not_taken_for_batons_post() {
    let fake = FakeGitHub::start().await;
    let id = baton::domain::job_id("defuse-2", "work");
    let planted = fake.add_comment_by(ISSUE, "mallory", &format!("Nothing to see here.\n{}", marker(&id)));
    // The create is lost before GitHub applies it: baton must look for its
    // marker before sending again, and find only its own.
    fake.drop_writes(1);
    let agent = "#!/bin/sh\ncat > /dev/null\necho 'The real result.'\n";
    let (_w, baton) = daemon(&fake, agent, vec![("work", comment_trigger())]);
    let (status, answer) = baton.deliver(SECRET, "issues", "defuse-2", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["jobs"][0], id.as_str());
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    let ours =
        || fake.comments(ISSUE).into_iter().find(|c| c.user == TOKEN_LOGIN && c.body.starts_with("The real result."));
    eventually("baton's own result comment", || ours().is_some()).await;
    let statuses: Vec<(String, u16)> =
        fake.requests.lock().unwrap().iter().map(|r| (format!("{} {}", r.method, r.path), r.status)).collect();
    let creates = "POST /repos/Codertocat/Hello-World/issues/1/comments";
    assert!(statuses.contains(&(creates.to_string(), 502)), "the first create was lost: {statuses:?}");
    assert!(statuses.iter().any(|(r, _)| r == "GET /user"), "baton asked who it is: {statuses:?}");
    let comments = fake.comments(ISSUE);
    assert_eq!(comments.len(), 2, "{comments:#?}");
    let stranger = comments.iter().find(|c| c.id == planted).map(|c| c.body.clone()).unwrap_or_default();
    assert!(stranger.starts_with("Nothing to see here."), "the stranger's comment is untouched: {stranger}");
    // The job points at baton's comment, not the stranger's.
    let ours = ours().map(|c| c.id).unwrap_or_default();
    eventually_url(&baton, &id, &format!("issuecomment-{ours}")).await;
}

/// The same for a check run: another App's run with the job's name and
/// external id is not taken for the one baton's create made, nor completed.
#[tokio::test]
async fn another_apps_check_run_is_not_taken_for_batons() {
    let (private_pem, public_pem) = crate::publish::app_keys();
    let app = App { app_id: 4343, public_pem, installation: 1, token: "ghs_defuseInstallationToken0000001".into() };
    let fake = FakeGitHub::start_with(Faults::default(), Some(app)).await;
    let id = baton::domain::job_id("defuse-4", "work");
    let sha = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";
    let planted = fake.add_check_run(serde_json::json!({
        "repo": "Codertocat/Hello-World", "head_sha": sha, "name": "baton/work", "external_id": id,
        "status": "in_progress", "app": { "id": 999, "slug": "mallory-app" },
    }));
    fake.drop_writes(1);
    let w = Workdir::new();
    let key_file = w.shared().join("app.pem");
    std::fs::write(&key_file, &private_pem).unwrap();
    let agent = w.script("agent.sh", "#!/bin/sh\ncat > /dev/null\necho 'All good.'\n");
    let app = GitHub::secret(SECRET)
        .api(&fake)
        .set("app_id", 4343)
        .set("private_key", format!("file:{}", key_file.display()));
    Scenario::new()
        .github(app)
        .agent("script", Agent::script(&agent))
        .trigger(
            "work",
            Trigger::on(&["pull_request.opened"]).agent("script").workspace("none").prompt("x").output("check_run"),
        )
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let (status, answer) =
        baton.deliver(SECRET, "pull_request", "defuse-4", &fixture("pull_request/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    let ours = || fake.check_runs().into_iter().find(|r| r["app"]["id"] == 4343 && r["conclusion"] == "success");
    eventually("baton's own check run completed", || ours().is_some()).await;
    let runs = fake.check_runs();
    let theirs = runs.iter().find(|r| r["id"] == planted).cloned().unwrap_or_default();
    assert_eq!(theirs["status"], "in_progress", "the other App's run is untouched: {runs:#?}");
    assert!(theirs["conclusion"].is_null(), "{runs:#?}");
    let statuses: Vec<u16> =
        fake.requests_to("POST", "/repos/Codertocat/Hello-World/check-runs").iter().map(|r| r.status).collect();
    assert_eq!(statuses, [502, 201], "the first create was lost, the second made baton's own run");
    let asked = fake.requests_to("GET", "/app").iter().any(|r| r.path == "/app");
    assert!(asked, "baton asked which App it is");
}

/// The job's publication names `url_part` once it is published.
async fn eventually_url(baton: &Baton, id: &str, url_part: &str) {
    for _ in 0..200 {
        let job = baton.job(id).await;
        if job.to_string().contains(url_part) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("job {id} never named {url_part}: {}", baton.job(id).await);
}

/// `baton jobs logs ID` shows an agent's control characters escaped (`\x1b`,
/// as journalctl does), so a log cannot write the operator's clipboard or
/// retitle their terminal; `--raw` prints them as they are.
#[tokio::test]
async fn job_logs_show_control_characters_escaped_unless_raw() {
    let fake = FakeGitHub::start().await;
    let agent = "#!/bin/sh\ncat > /dev/null\nprintf 'clip \\033]52;c;ZWNobyBwd25lZA==\\007 title \\033]0;owned\\007\\tdone\\n' >&2\n\
                 echo 'result'\n";
    let (_w, baton) = daemon(&fake, agent, vec![("work", comment_trigger())]);
    let (status, answer) = baton.deliver(SECRET, "issues", "defuse-3", &fixture("issues/opened.payload.json")).await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["jobs"][0].as_str().unwrap().to_string();
    assert_eq!(baton.finished(&id).await["state"], "succeeded");
    let logs = |extra: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["jobs", "--url", &baton.url, "logs", &id])
            .args(extra)
            .output()
            .expect("baton jobs logs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    for args in [&[][..], &["--follow"][..]] {
        let shown = logs(args);
        assert!(
            shown.contains("clip \\x1b]52;c;ZWNobyBwd25lZA==\\x07 title \\x1b]0;owned\\x07\tdone\n"),
            "{args:?}: {shown:?}"
        );
        assert!(!shown.contains(['\u{1b}', '\u{7}']), "{args:?}: {shown:?}");
    }
    let raw = logs(&["--raw"]);
    assert!(raw.contains("clip \u{1b}]52;c;ZWNobyBwd25lZA==\u{7} title \u{1b}]0;owned\u{7}\tdone\n"), "{raw:?}");
    // The API itself stays raw: it is the record.
    let text = reqwest::get(format!("{}/api/jobs/{id}/log", baton.url)).await.unwrap().text().await.unwrap();
    assert!(text.contains("\u{1b}]52;c;"), "{text:?}");
}

/// `[output] mentions` takes `defuse` or `keep`, and `baton check` says
/// where a wrong value is.
#[test]
fn the_mentions_key_is_checked() {
    let w = Workdir::new();
    w.config("[agents.script]\ncommand = [\"true\"]\n");
    // Literal TOML: the line the error points at is part of the check.
    let check = |value: &str| {
        w.trigger(
            "t",
            &format!(
                "on = [\"issues.opened\"]\n[job]\nagent = \"script\"\nworkspace = \"none\"\nprompt = \"x\"\n\
                 [output]\nkind = \"comment\"\nprogress = false\nmentions = \"{value}\""
            ),
        );
        let out = std::process::Command::new(BIN).arg("check").current_dir(w.path()).output().expect("baton check");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    for ok in ["defuse", "keep"] {
        let (success, text) = check(ok);
        assert!(success, "{ok}: {text}");
    }
    let (success, text) = check("loud");
    assert!(!success && text.contains("t.toml:9:") && text.contains("unknown variant `loud`"), "{text}");
}
