//! Agent teams (`[job] delegate`): a job's agent hands subtasks to child
//! jobs through baton's own `/mcp`, reached through its sandbox's proxy with
//! a token scoped to the job. The team is played by `teams/team.py`, which
//! speaks MCP as a CLI would and tries what it should not be able to do.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::api_jobs::TOKEN;
use crate::fake_github::FakeGitHub;
use crate::harness::{bare_repo, eventually, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};

const TEAM_PY: &str = include_str!("teams/team.py");

/// A daemon whose agents are members of a team (`boss`, `sleeper`,
/// `spender` hand work to `probe`), with children one level deep at most,
/// and room in the repository for a parent and two children at once;
/// `adjust` adds to it.
fn team(fake: &FakeGitHub, adjust: impl FnOnce(Scenario) -> Scenario) -> (Workdir, Baton, PathBuf) {
    let w = Workdir::new();
    let repos = w.path().join("remote");
    bare_repo(&repos, "o/r", "master", &[("README.md", "the readme of o/r")]);
    let py = w.script("team.py", TEAM_PY);
    // Where an agent leaves what it took (its token), for the test to try.
    let loot = w.path().join("loot");
    std::fs::create_dir_all(&loot).unwrap();
    // Agents run as another uid than the test's.
    std::fs::set_permissions(&loot, <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o777))
        .unwrap();
    let (py, loot_arg) = (py.display().to_string(), loot.display().to_string());
    let agent = |role: &str| Agent::command(&[&py, role, &loot_arg]).read_write(&[&loot]);
    let trigger = |agent: &str| {
        Trigger::on(&["api"]).agent(agent).workspace("default-branch").prompt("{{ inputs.task }}").output("none")
    };
    let delegates = |agent: &str| trigger(agent).job("delegate", vec!["probe"]);
    let scenario = Scenario::new()
        .set("server.api_token", TOKEN)
        .github(GitHub::secret("teams-webhook-secret").api(fake).repos(&repos).token("ghs_teams"))
        .set("limits.max_chain_depth", 1)
        .set("limits.max_parallel_per_repo", 3)
        .agent("boss", agent("boss"))
        .agent("sleeper", agent("sleeper"))
        .agent("spender", agent("spender"))
        .agent("probe", agent("probe"))
        .agent("other", agent("other"))
        .trigger("boss", delegates("boss"))
        .trigger("sleeper", delegates("sleeper"))
        .trigger("spender", delegates("spender").job("budget_usd", 1.0))
        .trigger("plain", trigger("probe"));
    adjust(scenario).write(&w);
    let baton = Baton::start(w.path(), &[]).with_token(TOKEN);
    (w, baton, loot)
}

async fn start(baton: &Baton, trigger: &str, task: &str) -> String {
    let req = baton::api::wire::CreateJob {
        trigger: Some(trigger.into()),
        repo: Some("o/r".into()),
        inputs: json!({ "task": task }).as_object().cloned(),
        ..Default::default()
    };
    let created = baton.client().create(&req, None).await.expect("created");
    assert!(created.new, "201: {created:?}");
    created.job.id
}

async fn children(baton: &Baton, parent: &str) -> Vec<Value> {
    let (status, page) = baton.get(&format!("/api/jobs?parent={parent}")).await;
    assert_eq!(status, 200, "{page}");
    page["jobs"].as_array().cloned().unwrap_or_default()
}

/// `initialize` on `/mcp` with `token`: the HTTP status.
async fn mcp_status(baton: &Baton, token: &str) -> u16 {
    let resp = reqwest::Client::new()
        .post(format!("{}/mcp", baton.url))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}))
        .send()
        .await
        .expect("POST /mcp");
    resp.status().as_u16()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A job hands two subtasks to children, which run in worktrees of their
/// own, and waits for both; a child that delegates further is refused at
/// the depth limit. With its token the boss reaches nothing else: no other
/// agent, repository, trigger or job, and no API route past `/mcp`; and the
/// token is dead once the job has ended. The children show under their
/// parent, in the API and on the dashboard.
#[tokio::test]
async fn a_job_delegates_to_children_and_its_token_reaches_nothing_else() {
    let fake = FakeGitHub::start().await;
    let (_w, baton, loot) = team(&fake, std::convert::identity);
    let outsider = start(&baton, "plain", "mind my own business").await;
    assert_eq!(baton.finished(&outsider).await["state"], "succeeded");

    let (boss, result, log) = run_boss(&baton, &outsider).await;
    assert!(result.contains("REFUSED the API past /mcp: 403 baton: egress to 127.0.0.1:3128"), "{result}");
    // A client that tunnels everything reaches `/mcp` through the proxy too.
    assert!(result.contains("tunnel: HTTP/1.1 200 Connection Established / HTTP/1.1 200 OK"), "{result}");

    let all = children(&baton, &boss).await;
    assert_eq!(all.len(), 3, "{all:?}");
    let kids: Vec<Value> = all.into_iter().filter(|k| k["spec"]["prompt"] != "fail").collect();
    let mut dirs = Vec::new();
    for kid in &kids {
        let id = kid["id"].as_str().unwrap();
        assert_eq!((kid["parent"].as_str(), kid["repo"].as_str()), (Some(boss.as_str()), Some("o/r")), "{kid}");
        assert_eq!(kid["spec"]["chain_depth"], 1, "{kid}");
        assert_eq!(kid["state"], "succeeded", "{kid}");
        let line = format!("child {id} succeeded: probe did <subtask");
        assert!(result.contains(&line), "the boss read its child's result: {line}\n{result}");
        let said = kid["result"].as_str().unwrap_or_default();
        dirs.push(said.split(" in ").nth(1).and_then(|r| r.lines().next()).unwrap_or_default().to_string());
        assert!(children(&baton, id).await.is_empty(), "no grandchild");
    }
    // Each holds its own mark and no other child's.
    let own = |d: &String| d.starts_with("/workspace holding mark-") && !d.contains(',');
    assert!(dirs[0] != dirs[1] && dirs.iter().all(own), "own worktrees: {dirs:?}");
    let deeper = kids.iter().find(|k| k["result"].as_str().unwrap_or_default().contains("hand on")).expect("the child");
    let said = deeper["result"].as_str().unwrap_or_default();
    assert!(said.contains("deeper: refused") && said.contains("max_chain_depth = 1"), "{said}");

    // The token the boss left behind died with its run.
    let token = read(&loot.join("token"));
    assert!(token.starts_with("batonjob_"), "{token}");
    assert_eq!(mcp_status(&baton, &token).await, 401);
    assert!(!log.to_string().contains(&token) && !result.contains(&token));
    for kid in &kids {
        let line = format!("delegated job {} to agent `probe`", kid["id"].as_str().unwrap());
        assert!(log.to_string().contains(&line), "{log}");
    }

    // The dashboard: children right under their parent, and on its page.
    let (_, page) = baton.get("/").await;
    let page = page.as_str().unwrap_or_default();
    let at = |id: &str| page.find(&format!("/jobs/{id}\"")).unwrap_or(usize::MAX);
    let kid_ids: Vec<&str> = kids.iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert!(kid_ids.iter().all(|k| at(&boss) < at(k) && at(k) < at(&outsider)), "{page}");
    assert_eq!(page.matches("└").count(), 3, "{page}");
    let (_, page) = baton.get(&format!("/jobs/{boss}")).await;
    let page = page.as_str().unwrap_or_default();
    assert!(page.contains("id=\"children\"") && kid_ids.iter().all(|k| page.contains(k)), "{page}");
    let (_, page) = baton.get(&format!("/jobs/{}", kid_ids[0])).await;
    assert!(page.as_str().unwrap_or_default().contains(&format!("id=\"parent\" href=\"/jobs/{boss}\"")));
}

/// Runs the boss: it succeeds, and its token did nothing it may not.
async fn run_boss(baton: &Baton, outsider: &str) -> (String, String, Value) {
    let boss = start(baton, "boss", outsider).await;
    let done = baton.finished(&boss).await;
    let (_, log) = baton.get(&format!("/api/jobs/{boss}/log")).await;
    assert_eq!(done["state"], "succeeded", "{done}\n{log}");
    let result = done["result"].as_str().unwrap_or_default().to_string();
    assert!(!result.contains("ALLOWED"), "the token did something it may not: {result}");
    assert_eq!(result.matches("REFUSED").count(), 7, "{result}");
    assert!(result.contains("lists only its children: True"), "{result}");
    assert!(result.matches(" succeeded: probe did <subtask").count() == 2, "{result}");
    assert!(result.contains("failed: agent `probe` exited with status 3"), "a failed child is visible: {result}");
    (boss, result, log)
}

/// With the sandbox off, the agent reaches `/mcp` on baton's own address,
/// and its token is scoped just the same.
#[tokio::test]
async fn a_team_runs_unconfined_with_the_same_scope() {
    let fake = FakeGitHub::start().await;
    let (_w, baton, _loot) = team(&fake, |s| s.set("sandbox.enabled", false));
    let outsider = start(&baton, "plain", "mind my own business").await;
    baton.finished(&outsider).await;
    let (boss, result, _) = run_boss(&baton, &outsider).await;
    assert!(
        result.contains("REFUSED the API past /mcp: 403 {\"error\":\"a job's token reaches only /mcp\"}"),
        "{result}"
    );
    assert_eq!(children(&baton, &boss).await.len(), 3);
}

/// Cancelling a parent cancels its running child; while it ran, its token
/// reached `/mcp` and nothing else, and after, not even that.
#[tokio::test]
async fn children_are_cancelled_with_their_parent_and_its_token_dies() {
    let fake = FakeGitHub::start().await;
    let (_w, baton, loot) = team(&fake, std::convert::identity);
    let parent = start(&baton, "sleeper", "").await;
    eventually("the sleeper's child and token", || loot.join("token").exists()).await;
    let token = read(&loot.join("token"));
    let child = read(&loot.join("child"));
    assert_eq!(mcp_status(&baton, &token).await, 200, "alive while its job runs");
    let resp = reqwest::Client::new().get(format!("{}/api/jobs", baton.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403, "a job's token reaches only /mcp");

    eventually_running(&baton, &child).await;
    let (status, _) = baton.post(&format!("/api/jobs/{parent}/cancel")).await;
    assert_eq!(status, 200);
    assert_eq!(baton.finished(&parent).await["state"], "cancelled");
    let kid = baton.finished(&child).await;
    assert_eq!((kid["state"].as_str(), kid["parent"].as_str()), (Some("cancelled"), Some(parent.as_str())), "{kid}");
    let (_, log) = baton.get(&format!("/api/jobs/{child}/log")).await;
    assert!(log.to_string().contains(&format!("its parent job {parent} ended")), "{log}");
    assert_eq!(mcp_status(&baton, &token).await, 401, "dead with its run");
}

async fn eventually_running(baton: &Baton, id: &str) {
    for _ in 0..600 {
        if baton.job(id).await["state"] == "running" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {id} never ran");
}

/// Children spend from their parent's budget: a fan-out shares what it
/// leaves equally (what a running child was given counts as spent), a later
/// child gets what is left, and once nothing is, `delegate` is refused.
#[tokio::test]
async fn children_spend_from_their_parents_budget() {
    let fake = FakeGitHub::start().await;
    let (_w, baton, _loot) = team(&fake, std::convert::identity);
    let parent = start(&baton, "spender", "").await;
    let done = baton.finished(&parent).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let result = done["result"].as_str().unwrap_or_default();
    assert!(
        result.contains("delegate 2: ")
            && result.contains("delegate 3 refused")
            && result.contains("the team's budget of $1.00 is spent or promised ($1.00 so far"),
        "{result}\n{:?}",
        children(&baton, &parent).await
    );
    let mut kids = children(&baton, &parent).await;
    kids.reverse();
    let budgets: Vec<f64> = kids.iter().map(|k| k["spec"]["budget_usd"].as_f64().unwrap_or(-1.0)).collect();
    assert_eq!(budgets.len(), 3, "{kids:?}");
    // The fan-out's first child gets half; its sibling, created while it
    // runs (it sleeps 2 s), the other half (all that is left, had it ended).
    assert_eq!(budgets[0], 0.5, "{budgets:?}");
    assert!(budgets[1] == 0.5 || budgets[1] == 0.75, "{budgets:?}");
    assert_eq!(budgets[2], 0.5, "what the fan-out left: {budgets:?}");
    let spent: Vec<Option<f64>> = kids.iter().map(|k| k["usage"]["cost_usd"].as_f64()).collect();
    assert_eq!(spent, [Some(0.25), Some(0.25), Some(0.5)]);
}
