//! Trigger matching against recorded payloads: each filter both ways.

use std::path::Path;

use baton::config::Config;
use baton::forge::github::normalize;
use baton::rules::{RuleSet, Verdict, Workspace};
use serde_json::json;

use crate::harness::{fixture, fixture_json};

/// Loads one trigger (with `agent = "codex"` and a prompt added) and judges
/// `payload` as event `name`; returns `Ok(prompt)` or `Err((filter, reason))`.
fn judge(trigger: &str, name: &str, payload: &[u8]) -> Result<baton::rules::JobSpec, (String, String)> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.toml"), trigger).unwrap();
    let config = Config::from_source(None, "", Path::new("/")).unwrap();
    let (rules, errors) = RuleSet::load(dir.path(), &config);
    assert!(errors.is_empty(), "{errors:?}");
    let event = normalize(name, "d", payload).unwrap();
    let mut verdicts = rules.explain(&event);
    match verdicts.remove(0).1 {
        Verdict::Matched(spec) => {
            // match_event (the indexed path) agrees with explain.
            assert_eq!(rules.match_event(&event).len(), 1);
            Ok(*spec)
        }
        Verdict::Rejected { filter, reason } => {
            assert!(rules.match_event(&event).is_empty());
            Err((filter.to_string(), reason))
        }
        // Held for a trusted person's approval: for the author filter, a no.
        Verdict::Held { reason, .. } => {
            assert!(rules.match_event(&event).is_empty());
            assert_eq!(rules.evaluate(&event).pending.len(), 1);
            Err(("authors".to_string(), reason))
        }
    }
}

fn trig(on: &str, filter: &str) -> String {
    format!("on = {on}\n[filter]\n{filter}\n[job]\nagent = \"codex\"\nworkspace = \"none\"\nprompt = \"#{{{{ issue.number }}}} {{{{ command.args }}}}\"\n")
}

fn rejected_by(r: Result<baton::rules::JobSpec, (String, String)>, filter: &str) -> String {
    match r {
        Err((f, reason)) => {
            assert_eq!(f, filter, "rejected by {f}: {reason}");
            reason
        }
        Ok(spec) => panic!("expected rejection by {filter}, matched: {spec:?}"),
    }
}

#[test]
fn on_matches_kind_or_whole_event() {
    let issue = fixture("issues/opened.payload.json");
    assert!(judge(&trig("[\"issues.opened\"]", ""), "issues", &issue).is_ok());
    assert!(judge(&trig("[\"issues\"]", ""), "issues", &issue).is_ok());
    rejected_by(judge(&trig("[\"issues.closed\"]", ""), "issues", &issue), "on");
}

#[test]
fn repos_globs() {
    let issue = fixture("issues/opened.payload.json");
    assert!(judge(&trig("[\"issues.opened\"]", "repos = [\"Codertocat/*\"]"), "issues", &issue).is_ok());
    let why = rejected_by(judge(&trig("[\"issues.opened\"]", "repos = [\"acme/*\"]"), "issues", &issue), "repos");
    assert!(why.contains("Codertocat/Hello-World"), "{why}");
}

#[test]
fn labels_and_exclude_labels() {
    let issue = fixture("issues/opened.payload.json"); // labelled "bug"
    assert!(judge(&trig("[\"issues.opened\"]", "labels = [\"bug\", \"crash\"]"), "issues", &issue).is_ok());
    let why = rejected_by(judge(&trig("[\"issues.opened\"]", "labels = [\"question\"]"), "issues", &issue), "labels");
    assert_eq!(why, "wanted any of [question], has [bug]");
    rejected_by(judge(&trig("[\"issues.opened\"]", "exclude_labels = [\"bug\"]"), "issues", &issue), "exclude_labels");
}

#[test]
fn authors_default_to_owner_member_collaborator() {
    let t = trig("[\"issues.opened\"]", "");
    for (assoc, ok) in
        [("OWNER", true), ("MEMBER", true), ("COLLABORATOR", true), ("CONTRIBUTOR", false), ("NONE", false)]
    {
        let mut p = fixture_json("issues/opened.payload.json");
        p["issue"]["author_association"] = json!(assoc);
        let r = judge(&t, "issues", p.to_string().as_bytes());
        assert_eq!(r.is_ok(), ok, "{assoc}: {r:?}");
    }
    let mut p = fixture_json("issues/opened.payload.json");
    p["issue"]["author_association"] = json!("CONTRIBUTOR");
    assert!(
        judge(&trig("[\"issues.opened\"]", "authors = [\"CONTRIBUTOR\"]"), "issues", p.to_string().as_bytes()).is_ok()
    );
}

#[test]
fn command_matches_the_first_line_and_gives_args() {
    let t = trig("[\"issue_comment.created\"]", "command = \"/investigate\"");
    let mut p = fixture_json("issue_comment/created.payload.json");
    p["comment"]["body"] = json!("/investigate the login page\nthanks");
    let spec = judge(&t, "issue_comment", p.to_string().as_bytes()).unwrap();
    assert_eq!(spec.prompt, "#1 the login page");
    p["comment"]["body"] = json!("please /investigate");
    rejected_by(judge(&t, "issue_comment", p.to_string().as_bytes()), "command");
    // The commenter's association is what counts.
    p["comment"]["body"] = json!("/investigate");
    p["comment"]["author_association"] = json!("NONE");
    rejected_by(judge(&t, "issue_comment", p.to_string().as_bytes()), "authors");
}

#[test]
fn conclusions_and_head_sha_workspace() {
    let failed = fixture("check_run/completed.1.payload.json");
    let ok = fixture("check_run/completed.payload.json");
    let t = "on = [\"check_run.completed\"]\n[filter]\nconclusions = [\"failure\"]\n[job]\nagent = \"codex\"\nworkspace = \"head-sha\"\nprompt = \"x\"\n";
    let spec = judge(t, "check_run", &failed).unwrap();
    assert_eq!(
        spec.workspace,
        Workspace::HeadSha { sha: "ec26c3e57ca3a959ca5aad62de7213c562f8c821".into(), branch: Some("changes".into()) }
    );
    assert_eq!(spec.subject, Some(2));
    rejected_by(judge(t, "check_run", &ok), "conclusions");
}

#[test]
fn bots_never_trigger_unless_allowed_and_baton_never() {
    let t = trig("[\"issues.opened\"]", "");
    let mut p = fixture_json("issues/opened.payload.json");
    p["sender"]["type"] = json!("Bot");
    p["sender"]["login"] = json!("renovate[bot]");
    rejected_by(judge(&t, "issues", p.to_string().as_bytes()), "allow_bots");
    assert!(judge(
        &trig("[\"issues.opened\"]", "allow_bots = [\"renovate[bot]\"]"),
        "issues",
        p.to_string().as_bytes()
    )
    .is_ok());
    p["sender"]["login"] = json!("baton[bot]");
    rejected_by(judge(&t, "issues", p.to_string().as_bytes()), "bot");
}

#[test]
fn pull_requests_from_forks_need_allow_forks() {
    let t = "on = [\"pull_request.opened\"]\n[job]\nagent = \"codex\"\nworkspace = \"pr-head\"\nprompt = \"x\"\n";
    let same_repo = fixture("pull_request/opened.payload.json");
    let spec = judge(t, "pull_request", &same_repo).unwrap();
    assert!(matches!(spec.workspace, Workspace::PrHead { number: 2, .. }));
    let mut fork = fixture_json("pull_request/opened.payload.json");
    fork["pull_request"]["head"]["repo"]["id"] = json!(1);
    fork["pull_request"]["head"]["repo"]["full_name"] = json!("outsider/Hello-World");
    rejected_by(judge(t, "pull_request", fork.to_string().as_bytes()), "authors");
    let allowed = t.replace("[job]", "[filter]\nallow_forks = true\n[job]");
    assert!(judge(&allowed, "pull_request", fork.to_string().as_bytes()).is_ok());
}

#[test]
fn branches_match_the_pull_request_base() {
    let pr = fixture("pull_request/opened.payload.json"); // base master, head "changes"
    let t = |b: &str| {
        format!("on = [\"pull_request.opened\"]\n[filter]\nbranches = [\"{b}\"]\n[job]\nagent = \"codex\"\nworkspace = \"none\"\nprompt = \"x\"\n")
    };
    assert!(judge(&t("mast*"), "pull_request", &pr).is_ok());
    let why = rejected_by(judge(&t("main"), "pull_request", &pr), "branches");
    assert_eq!(why, "wanted [main], event is on master");
}

#[test]
fn drafts_are_skipped_unless_asked_for() {
    let t = "on = [\"pull_request.opened\"]\n[job]\nagent = \"codex\"\nworkspace = \"none\"\nprompt = \"x\"\n";
    let mut p = fixture_json("pull_request/opened.payload.json");
    p["pull_request"]["draft"] = json!(true);
    rejected_by(judge(t, "pull_request", p.to_string().as_bytes()), "draft");
    let with_drafts = t.replace("[job]", "[filter]\ndraft = true\n[job]");
    assert!(judge(&with_drafts, "pull_request", p.to_string().as_bytes()).is_ok());
}

#[test]
fn if_expressions_see_the_payload() {
    let issue = fixture("issues/opened.payload.json"); // "Spelling error in the README file"
    assert!(judge(&trig("[\"issues.opened\"]", "if = \"'readme' in issue.title | lower\""), "issues", &issue).is_ok());
    let why = rejected_by(
        judge(&trig("[\"issues.opened\"]", "if = \"'crash' in issue.title | lower\""), "issues", &issue),
        "if",
    );
    assert!(why.contains("is false"), "{why}");
    assert!(judge(
        &trig("[\"issues.opened\"]", "if = \"issue.number > 0 and event.kind == 'issues.opened'\""),
        "issues",
        &issue
    )
    .is_ok());
}

#[test]
fn baton_own_comments_and_edits_never_run_commands() {
    let t = trig("[\"issue_comment\"]", "command = \"/fix\"");
    let mut p = fixture_json("issue_comment/created.payload.json");
    p["comment"]["body"] = json!("/fix it\n<!-- baton:job=abc -->");
    rejected_by(judge(&t, "issue_comment", p.to_string().as_bytes()), "bot");
    p["comment"]["body"] = json!("/fix it");
    assert!(judge(&t, "issue_comment", p.to_string().as_bytes()).is_ok());
    p["action"] = json!("edited");
    rejected_by(judge(&t, "issue_comment", p.to_string().as_bytes()), "command");
}

#[test]
fn exclude_labels_and_job_triggers_both_ways() {
    let issue = fixture("issues/opened.payload.json"); // labelled "bug"
    assert!(judge(&trig("[\"issues.opened\"]", "exclude_labels = [\"wontfix\"]"), "issues", &issue).is_ok());
}

#[test]
fn job_events_match_filter_triggers_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fix.toml"),
        "on = [\"job.succeeded\"]\n[filter]\ntriggers = [\"investigate\"]\n[job]\nagent = \"codex\"\nprompt = \"fix: {{ result }}\"\n",
    )
    .unwrap();
    let config = Config::from_source(None, "", Path::new("/")).unwrap();
    let (rules, errors) = RuleSet::load(dir.path(), &config);
    assert!(errors.is_empty(), "{errors:?}");
    let issue = normalize("issues", "d", &fixture("issues/opened.payload.json")).unwrap();
    let parent = rules_spec_for(&issue);
    let finished = |trigger: &str| {
        let mut spec = parent.clone();
        spec.trigger = trigger.into();
        let mut job = baton::store::Job::new("j1".into(), 1, "d".into(), spec, chrono::Utc::now());
        job.start_attempt(chrono::Utc::now());
        job.end(baton::store::JobState::Succeeded, Some("the cause".into()), None, chrono::Utc::now());
        baton::domain::chain::job_event(&job).unwrap()
    };
    let specs = rules.match_event(&finished("investigate"));
    assert_eq!(specs.len(), 1);
    assert_eq!(specs[0].prompt, "fix: the cause");
    assert_eq!(specs[0].chain_depth, 1);
    assert_eq!(specs[0].workspace, Workspace::DefaultBranch { branch: "master".into() });
    let (_, verdict) = rules.explain(&finished("review")).remove(0);
    assert!(matches!(verdict, Verdict::Rejected { filter: "triggers", .. }), "{verdict:?}");
}

/// A spec as the issue fixture would start it.
fn rules_spec_for(event: &baton::event::Event) -> baton::rules::JobSpec {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("investigate.toml"),
        "on = [\"issues.opened\"]\n[job]\nagent = \"codex\"\nprompt = \"x\"\n",
    )
    .unwrap();
    let config = Config::from_source(None, "", Path::new("/")).unwrap();
    let (rules, _) = RuleSet::load(dir.path(), &config);
    rules.match_event(event).remove(0)
}

#[test]
fn batons_own_branches_trigger_only_triggers_that_opt_in() {
    let t = "on = [\"check_run.completed\"]\n[job]\nagent = \"codex\"\nworkspace = \"none\"\nprompt = \"x\"\n";
    let mut p = fixture_json("check_run/completed.1.payload.json");
    p["check_run"]["check_suite"]["head_branch"] = json!("baton/fix/1-abcdef12");
    let why = rejected_by(judge(t, "check_run", p.to_string().as_bytes()), "own_branches");
    assert!(why.contains("baton/fix/1-abcdef12"), "{why}");
    let opted_in = t.replace("[job]", "[filter]\nown_branches = true\n[job]");
    assert!(judge(&opted_in, "check_run", p.to_string().as_bytes()).is_ok());
}

/// `kind = "push"` goes to the pull request's own head branch: in the
/// repository itself, or in a fork only with `allow_forks` and the fork's
/// consent to maintainer edits; the job is pinned to the head it matched.
#[test]
fn push_targets_the_pull_requests_branch_and_a_fork_only_with_consent() {
    let push = |filter: &str| {
        format!(
            "on = [\"pull_request.opened\"]\n[filter]\n{filter}\n[job]\nagent = \"codex\"\nworkspace = \"pr-head\"\n\
             prompt = \"x\"\n[output]\nkind = \"push\"\n"
        )
    };
    let same = fixture("pull_request/opened.payload.json");
    let spec = judge(&push(""), "pull_request", &same).unwrap();
    let target = spec.push.clone().expect("a target");
    assert_eq!((target.repo.as_str(), target.branch.as_str()), ("Codertocat/Hello-World", "changes"));
    assert!(matches!(spec.workspace, Workspace::PrHead { pinned: true, .. }), "{:?}", spec.workspace);

    let fork = |editable: bool| {
        let mut p = fixture_json("pull_request/opened.payload.json");
        p["pull_request"]["head"]["repo"] = json!({ "id": 999, "full_name": "someone/Hello-World" });
        p["pull_request"]["maintainer_can_modify"] = json!(editable);
        serde_json::to_vec(&p).unwrap()
    };
    let why = rejected_by(judge(&push(""), "pull_request", &fork(true)), "output");
    assert!(why.contains("from a fork (set filter.allow_forks = true"), "{why}");
    let why = rejected_by(judge(&push("allow_forks = true"), "pull_request", &fork(false)), "output");
    assert!(why.contains("does not allow edits from maintainers"), "{why}");
    let spec = judge(&push("allow_forks = true"), "pull_request", &fork(true)).unwrap();
    assert_eq!(spec.push.map(|t| t.repo), Some("someone/Hello-World".to_string()));

    // An issue has no branch to push to.
    let why = rejected_by(
        judge(
            &push("").replace("pull_request.opened", "issues.opened"),
            "issues",
            &fixture("issues/opened.payload.json"),
        ),
        "output",
    );
    assert!(why.contains("not about one"), "{why}");
}

/// A push commits onto the pull request's head, so it needs that head as
/// its workspace; `on_moved` and `max_repairs_per_pr` belong to pushes.
#[test]
fn push_options_are_checked_where_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_source(None, "", Path::new("/")).unwrap();
    for (body, expect) in [
        ("[job]\nagent = \"codex\"\nworkspace = \"default-branch\"\nprompt = \"x\"\n[output]\nkind = \"push\"\n", "needs [job] workspace = \"pr-head\""),
        ("[job]\nagent = \"codex\"\nprompt = \"x\"\n[output]\nkind = \"comment\"\non_moved = \"rebase\"\n", "`on_moved` applies only"),
        ("[job]\nagent = \"codex\"\nprompt = \"x\"\nmax_repairs_per_pr = 2\n", "`max_repairs_per_pr` counts pushes"),
        ("[job]\nagent = \"codex\"\nworkspace = \"pr-head\"\nprompt = \"x\"\n[output]\nkind = \"push\"\non_moved = \"merge\"\n", "unknown variant `merge`"),
    ] {
        let (_, text) = load_one(dir.path(), &config, &format!("on = [\"pull_request.opened\"]\n{body}"));
        assert!(text.contains("t.toml:") && text.contains(expect), "{expect}: {text}");
    }
}

/// A review trigger covers what changed since its last review of the pull
/// request (as ingress recalls it on the event), unless `/review full` or
/// `incremental = false` asks for all of it.
#[test]
fn a_review_is_incremental_unless_asked_for_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_source(None, "", Path::new("/")).unwrap();
    let spec_for = |trigger: &str, name: &str, payload: &[u8]| {
        std::fs::write(dir.path().join("t.toml"), trigger).unwrap();
        let (rules, errors) = RuleSet::load(dir.path(), &config);
        assert!(errors.is_empty(), "{errors:?}");
        let mut event = normalize(name, "d", payload).unwrap();
        event.reviewed.insert("t".into(), "1111111aaaa".into());
        rules.match_event(&event).pop()
    };
    let review = |on: &str, extra: &str| {
        format!(
            "on = [\"{on}\"]\n[job]\nagent = \"codex\"\nworkspace = \"pr-head\"\n\
             prompt = \"since={{{{ review.since }}}} full={{{{ review.full }}}}\"\n[output]\nkind = \"review\"\n{extra}"
        )
    };
    let sync = fixture("pull_request/synchronize.payload.json");
    let spec = spec_for(&review("pull_request.synchronize", ""), "pull_request", &sync).expect("a review");
    assert_eq!(spec.review_since.as_deref(), Some("1111111aaaa"));
    assert!(spec.prompt.starts_with("since=1111111aaaa full=False"), "{}", spec.prompt);
    assert!(spec.prompt.contains("reviewed up to 1111111aaaa before"), "{}", spec.prompt);

    let spec = spec_for(&review("pull_request.synchronize", "incremental = false"), "pull_request", &sync).unwrap();
    assert_eq!((spec.review_since, spec.review_full), (None, true));

    let mut comment = fixture_json("issue_comment/created.payload.json");
    comment["issue"]["pull_request"] = json!({ "url": "https://api.github.com/repos/Codertocat/Hello-World/pulls/1" });
    let with_command = |body: &str| {
        let mut c = comment.clone();
        c["comment"]["body"] = json!(body);
        serde_json::to_vec(&c).unwrap()
    };
    let on_command = review("issue_comment.created", "")
        .replace("[job]", "[filter]\ncommand = \"/review\"\nallow_forks = true\n[job]");
    let spec = spec_for(&on_command, "issue_comment", &with_command("/review full")).expect("a review");
    assert!(
        spec.review_full && spec.review_since.is_none() && spec.prompt.starts_with("since=None full=True"),
        "{spec:?}"
    );
    let spec = spec_for(&on_command, "issue_comment", &with_command("/review")).expect("a review");
    assert!(!spec.review_full, "{spec:?}");
}

/// `[job] mcp` names servers of `[mcp]`, for an agent whose CLI baton can
/// configure; a mistake is an error where it is written.
#[test]
fn mcp_servers_are_checked_where_they_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_source(
        None,
        "[mcp.probe]\ncommand = [\"probe\"]\n[agents.mine]\ncommand = [\"my-agent\"]\n",
        Path::new("/"),
    )
    .unwrap();
    for (body, expect) in [
        ("agent = \"codex\"\nmcp = [\"sentry\"]", "t.toml:5:8: unknown MCP server `sentry`; [mcp] servers: probe"),
        (
            "agent = \"mine\"\nmcp = [\"probe\"]",
            "t.toml:5:8: agent `mine` is not one of the codex, claude and gemini CLIs",
        ),
        ("agent = \"claude\"\nmcp = [\"probe\"]", ""),
    ] {
        let source = format!("on = [\"issues.opened\"]\n[job]\nprompt = \"x\"\n{body}\n");
        let (rules, text) = load_one(dir.path(), &config, &source);
        if expect.is_empty() {
            assert!(text.is_empty(), "{text}");
            let event = normalize("issues", "d", &fixture("issues/opened.payload.json")).unwrap();
            let spec = rules.match_event(&event).pop().expect("a match");
            assert_eq!(spec.mcp, ["probe"]);
        } else {
            assert!(text.contains(expect), "{expect}: {text}");
        }
    }
}

/// `[job] delegate` names agents that exist; `[mcp.baton]` is baton's own.
#[test]
fn delegate_names_defined_agents() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_source(None, "[agents.probe]\ncommand = [\"probe\"]\n", Path::new("/")).unwrap();
    for (body, expect) in [
        ("delegate = [\"probe\", \"ghost\"]", "t.toml:5:22: `delegate` names unknown agent `ghost`"),
        ("delegate = [\"probe\", \"codex\"]", ""),
    ] {
        let source = format!("on = [\"issues.opened\"]\n[job]\nprompt = \"x\"\nagent = \"claude\"\n{body}\n");
        let (rules, text) = load_one(dir.path(), &config, &source);
        if expect.is_empty() {
            assert!(text.is_empty(), "{text}");
            let event = normalize("issues", "d", &fixture("issues/opened.payload.json")).unwrap();
            let spec = rules.match_event(&event).pop().expect("a match");
            assert_eq!(spec.delegate, ["probe", "codex"]);
            assert_eq!(spec.parent, None);
        } else {
            assert!(text.contains(expect), "{expect}: {text}");
        }
    }
    // One job at a time: a parent would wait for children that wait for it.
    let one = Config::from_source(None, "[limits]\nmax_parallel_per_repo = 1\n", Path::new("/")).unwrap();
    let source = "on = [\"api\"]
[job]
prompt = \"x\"
agent = \"claude\"
delegate = [\"codex\"]
";
    let (_, text) = load_one(dir.path(), &one, source);
    assert!(text.contains("t.toml:5:13: a job that delegates runs beside its children"), "{text}");
    let errors = Config::from_source(None, "[mcp.baton]\ncommand = [\"x\"]\n", Path::new("/")).unwrap_err();
    let err = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
    assert!(err.contains("`baton` is baton's own server"), "{err}");
}

/// Loads `source` as the one trigger `t.toml` in `dir`: the rules, and the
/// errors as their text, one per line.
fn load_one(dir: &Path, config: &Config, source: &str) -> (RuleSet, String) {
    std::fs::write(dir.join("t.toml"), source).unwrap();
    let (rules, errors) = RuleSet::load(dir, config);
    (rules, errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))
}

/// The forge-neutral template variables render from real GitHub payloads,
/// beside GitHub's own (the payload's `repository` keeps all its fields).
#[test]
fn forge_neutral_variables_render_beside_github_ones() {
    let trigger = |on: &str| {
        format!(
            "on = [\"{on}\"]\n[job]\nagent = \"codex\"\nworkspace = \"none\"\nprompt = '''{}'''\n",
            "{{ subject.kind }} #{{ subject.number }} {{ subject.title }} <{{ subject.url }}> in \
             {{ repository.full_name }} by {{ subject.author }} ({{ subject.trust }}) \
             {{ subject.head.sha }}..{{ subject.base.sha }} fork={{ subject.fork }} | \
             {{ repository.html_url }} {{ issue.title }}{{ pull_request.title }}"
        )
    };
    let issue = judge(&trigger("issues.opened"), "issues", &fixture("issues/opened.payload.json")).unwrap();
    assert_eq!(
        issue.prompt,
        "issue #1 Spelling error in the README file <https://github.com/Codertocat/Hello-World/issues/1> in \
         Codertocat/Hello-World by Codertocat (OWNER) .. fork= | \
         https://github.com/Codertocat/Hello-World Spelling error in the README file"
    );
    let pr =
        judge(&trigger("pull_request.opened"), "pull_request", &fixture("pull_request/opened.payload.json")).unwrap();
    assert_eq!(
        pr.prompt,
        "change_request #2 Update the README with new information. <https://github.com/Codertocat/Hello-World/pull/2> in \
         Codertocat/Hello-World by Codertocat (OWNER) \
         ec26c3e57ca3a959ca5aad62de7213c562f8c821..f95f852bd8fca8fcc58a9a2d6c842781e32a215e fork=False | \
         https://github.com/Codertocat/Hello-World Update the README with new information."
    );
}

/// The same forge-neutral variables render from GitLab's documented
/// payloads, beside GitLab's own names (its `repository` object has no
/// `full_name`: the neutral one fills it in, the payload's fields stay).
#[test]
fn forge_neutral_variables_render_beside_gitlab_ones() {
    let trigger = "on = [\"merge_request.open\"]\n[job]\nagent = \"codex\"\nworkspace = \"none\"\nprompt = '''\
                   {{ subject.kind }} !{{ subject.number }} {{ subject.title }} <{{ subject.url }}> in \
                   {{ repository.full_name }} by {{ subject.author }} ({{ subject.trust }}) fork={{ subject.fork }} | \
                   {{ repository.homepage }} {{ object_attributes.title }} {{ object_kind }}'''\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.toml"), trigger).unwrap();
    let config = Config::from_source(None, "", Path::new("/")).unwrap();
    let (rules, errors) = RuleSet::load(dir.path(), &config);
    assert!(errors.is_empty(), "{errors:?}");
    let payload =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gitlab/merge_request/open.json"));
    let mut event = baton::forge::gitlab::normalize("merge_request", "d", &payload.unwrap()).unwrap();
    // What ingress asks of GitLab: the author's role. (The documented
    // example's author, id 51, is not its sender, so no login names them.)
    event.association = Some("DEVELOPER".into());
    let jobs = rules.match_event(&event);
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].prompt,
        "change_request !1 MS-Viewport <http://example.com/diaspora/merge_requests/1> in \
         gitlabhq/gitlab-test by  (DEVELOPER) fork=False | \
         http://example.com/gitlabhq/gitlab-test MS-Viewport merge_request"
    );
    assert_eq!(jobs[0].forge, baton::forge::Forge::GITLAB);
}
