//! Workspaces: recycled worktrees keep nothing of the job before, the pool
//! is bounded, a worktree an agent broke never reaches the repository around
//! the storage folder, and mirrors are garbage-collected in the background.

use std::path::Path;

use serde_json::Value;

use crate::harness::{bare_repo, eventually, fixture_json, git, Baton, Workdir};
use crate::scenario::{Agent, GitHub, Scenario, Trigger};
use std::convert::identity;

const SECRET: &str = "workspace-secret";

/// A daemon whose one trigger runs `agent_body` on every opened issue, with
/// repositories under `remote/`; `adjust` adds to it.
fn setup(agent_body: &str, adjust: impl FnOnce(Scenario) -> Scenario) -> Workdir {
    let w = Workdir::new();
    adjust(scenario(&w, agent_body, identity, "none")).write(&w);
    w
}

/// `@SHARED@` in `agent_body` is a folder the agent and the test share; the
/// trigger publishes as `output`, and `github` adds to `[github]`.
fn scenario(w: &Workdir, agent_body: &str, github: impl FnOnce(GitHub) -> GitHub, output: &str) -> Scenario {
    let agent = w.script("agent.sh", &agent_body.replace("@SHARED@", &w.shared().display().to_string()));
    Scenario::new()
        .github(github(GitHub::secret(SECRET).repos(&w.path().join("remote"))))
        .agent("script", Agent::script(&agent).read_write(&[w.shared()]))
        .trigger(
            "work",
            Trigger::on(&["issues.opened"]).agent("script").workspace("default-branch").prompt("work").output(output),
        )
}

/// Opens an issue on `repo` and waits for its job to succeed.
async fn run_issue(baton: &Baton, repo: &str, delivery: &str) -> Value {
    let mut payload = fixture_json("issues/opened.payload.json");
    let (owner, name) = repo.split_once('/').unwrap();
    payload["repository"]["full_name"] = repo.into();
    payload["repository"]["name"] = name.into();
    payload["repository"]["owner"]["login"] = owner.into();
    let (status, body) = baton.deliver(SECRET, "issues", delivery, payload.to_string().as_bytes()).await;
    assert_eq!(status, 202, "{body}");
    let id = body["jobs"][0].as_str().expect("a job").to_string();
    let job = baton.finished(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", baton.log_text());
    job
}

async fn job_log(baton: &Baton, id: &Value) -> String {
    let resp = reqwest::get(format!("{}/api/jobs/{}/log", baton.url, id.as_str().unwrap())).await.unwrap();
    resp.text().await.unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_string()
}

#[tokio::test]
async fn a_recycled_worktree_keeps_nothing_of_the_job_before() {
    let s = "@SHARED@";
    // The first job leaves every kind of mess; the second reports what it finds.
    let agent = format!(
        r#"#!/bin/sh
n=$(cat {s}/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {s}/count
pwd > {s}/pwd$n
if [ $n -eq 1 ]; then
  echo changed > README.md
  echo junk > untracked.txt
  mkdir -p build/deep && echo obj > build/deep/x.o
  echo log > debug.log
  echo staged > staged.txt && git add staged.txt
  git -c user.name=a -c user.email=a@b commit -qm local
  mkdir nested && (cd nested && git init -q && echo n > n.txt)
  echo left a mess
else
  git status --porcelain --ignored > {s}/status
  git rev-parse HEAD > {s}/head
  cat README.md > {s}/readme
  find . -path ./.git -prune -o -print | sort > {s}/files
  echo reported
fi
"#
    );
    let w = setup(&agent, identity);
    let state = w.shared();
    let origin = w.path().join("remote/Codertocat/Hello-World.git");
    bare_repo(
        &w.path().join("remote"),
        "Codertocat/Hello-World",
        "master",
        &[("README.md", "hello v1"), (".gitignore", "*.log\n")],
    );
    let baton = Baton::start(w.path(), &[]);
    run_issue(&baton, "Codertocat/Hello-World", "recycle-1").await;

    // The branch moves on between the jobs: the next job is at a nearby commit.
    let clone = tempfile::tempdir().unwrap();
    git(clone.path(), &["clone", "--quiet", origin.to_str().unwrap(), "."]);
    std::fs::write(clone.path().join("README.md"), "hello v2").unwrap();
    std::fs::write(clone.path().join("second.txt"), "2").unwrap();
    git(clone.path(), &["add", "."]);
    git(clone.path(), &["commit", "--quiet", "-m", "v2"]);
    git(clone.path(), &["push", "--quiet", "origin", "HEAD:master"]);
    let v2 = git(clone.path(), &["rev-parse", "HEAD"]);

    let second = run_issue(&baton, "Codertocat/Hello-World", "recycle-2").await;
    assert_eq!(read(&state.join("pwd1")), read(&state.join("pwd2")), "the worktree was reused");
    assert!(job_log(&baton, &second["id"]).await.contains("recycled worktree"));
    assert_eq!(read(&state.join("status")), "", "no change, untracked or ignored file survives");
    assert_eq!(read(&state.join("head")), v2);
    assert_eq!(read(&state.join("readme")), "hello v2");
    assert_eq!(read(&state.join("files")), ".\n./.gitignore\n./README.md\n./second.txt");
}

#[tokio::test]
async fn the_pool_is_bounded_and_least_recently_used_goes_first() {
    let w = setup("#!/bin/sh\necho ok\n", |s| s.set("storage.worktree_pool", 1));
    for repo in ["acme/one", "acme/two"] {
        bare_repo(&w.path().join("remote"), repo, "master", &[("README.md", repo)]);
    }
    let baton = Baton::start(w.path(), &[]);
    run_issue(&baton, "acme/one", "bound-1").await;
    run_issue(&baton, "acme/two", "bound-2").await;
    let pool = w.path().join(".baton/pool/acme");
    let slots = |repo: &str| std::fs::read_dir(pool.join(repo)).map(|d| d.count()).unwrap_or(0);
    eventually("the older worktree to be evicted", || slots("one") == 0).await;
    assert_eq!(slots("two"), 1, "the most recent worktree stays for the next job");
    // The evicted slot's commit is no longer kept in its mirror.
    let keep = |repo: &str| {
        git(&w.path().join(format!(".baton/mirrors/acme/{repo}.git")), &["for-each-ref", "refs/baton/keep"])
    };
    assert_eq!(keep("one"), "", "the evicted slot's keep-ref is gone");
    assert_eq!(keep("two").lines().count(), 1, "the pooled slot's commit is kept from gc");
}

/// baton commits through its own repository for the workspace, never the
/// agent's `.git`: an agent that deletes its `.git` changes nothing about
/// what is pushed, and git never finds the repository around the storage.
#[tokio::test]
async fn a_workspace_whose_git_the_agent_deleted_still_publishes_and_never_reaches_the_repository_around_it() {
    let fake = crate::fake_github::FakeGitHub::start().await;
    let agent = "#!/bin/sh\nrm -rf .git\necho change > README.md\necho done\n";
    let w = Workdir::new();
    scenario(&w, agent, |g| g.api(&fake).token("env:GITHUB_TOKEN"), "pull_request").write(&w);
    // The daemon's own folder is a git repository with work in progress.
    git(w.path(), &["init", "--quiet"]);
    std::fs::write(w.path().join("precious.txt"), "uncommitted work").unwrap();
    let origin = w.path().join("remote/Codertocat/Hello-World.git");
    let base = bare_repo(&w.path().join("remote"), "Codertocat/Hello-World", "master", &[("README.md", "hi")]);
    let baton = Baton::start(w.path(), &[("GITHUB_TOKEN", "ghs_workspacetest")]);
    let mut payload = fixture_json("issues/opened.payload.json");
    payload["repository"]["full_name"] = "Codertocat/Hello-World".into();
    let (status, body) = baton.deliver(SECRET, "issues", "broken-1", payload.to_string().as_bytes()).await;
    assert_eq!(status, 202, "{body}");
    let job = baton.finished(body["jobs"][0].as_str().unwrap()).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let outer_head =
        std::process::Command::new("git").arg("-C").arg(w.path()).args(["rev-parse", "--verify", "HEAD"]).output();
    assert!(!outer_head.unwrap().status.success(), "nothing was committed in the repository around");
    let branch = job["branch"].as_str().expect("pushed");
    assert_eq!(git(&origin, &["show", &format!("{branch}:README.md")]), "change");
    assert_eq!(git(&origin, &["rev-parse", &format!("{branch}^")]), base, "one commit on top of the prepared one");
}

#[tokio::test]
async fn mirrors_are_garbage_collected_in_the_background() {
    let w = setup("#!/bin/sh\necho ok\n", |s| s.set("storage.gc_interval", "1s"));
    bare_repo(&w.path().join("remote"), "Codertocat/Hello-World", "master", &[("README.md", "hi")]);
    let baton = Baton::start(w.path(), &[]);
    run_issue(&baton, "Codertocat/Hello-World", "gc-1").await;
    let mirror = w.path().join(".baton/mirrors/Codertocat/Hello-World.git");
    // A small fetch arrives as loose objects; gc packs them.
    eventually("the mirror to be packed", || {
        let counts = git(&mirror, &["count-objects", "-v"]);
        counts.lines().any(|l| l == "count: 0") && counts.lines().any(|l| l.starts_with("packs: ") && l != "packs: 0")
    })
    .await;
    eventually("gc to be logged", || baton.log_text().contains("Mirror garbage-collected.")).await;
}

#[tokio::test]
async fn two_jobs_on_one_repository_never_fetch_at_once() {
    let w =
        setup("#!/bin/sh\necho ok\n", |s| s.set("limits.max_parallel_jobs", 4).set("limits.max_parallel_per_repo", 4));
    // Enough to fetch that two unlocked fetches would overlap.
    let files: Vec<(String, String)> =
        (0..400).map(|i| (format!("f{i}.txt"), format!("{i} {}", "x".repeat(2000 + i)))).collect();
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    bare_repo(&w.path().join("remote"), "Codertocat/Hello-World", "master", &refs);
    let trace = w.path().join("git-trace");
    let baton = Baton::start(w.path(), &[("GIT_TRACE_PERFORMANCE", trace.to_str().unwrap())]);
    let mut payload = fixture_json("issues/opened.payload.json");
    payload["repository"]["full_name"] = "Codertocat/Hello-World".into();
    let mut ids = Vec::new();
    for n in 0..3 {
        let (status, body) =
            baton.deliver(SECRET, "issues", &format!("lock-{n}"), payload.to_string().as_bytes()).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["jobs"][0].as_str().unwrap().to_string());
    }
    for id in &ids {
        assert_eq!(baton.finished(id).await["state"], "succeeded");
    }
    // Each traced `git fetch` as (start, end) in seconds of the day.
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut fetches: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.contains("git command: git ") && l.contains(" fetch "))
        .filter_map(|l| {
            let clock = l.split_whitespace().next()?;
            let mut hms = clock.split(':').map(|p| p.parse::<f64>().ok());
            let end = hms.next()?? * 3600.0 + hms.next()?? * 60.0 + hms.next()??;
            let took: f64 = l.split("performance: ").nth(1)?.split(' ').next()?.parse().ok()?;
            Some((end - took, end))
        })
        .collect();
    assert!(fetches.len() >= 3, "{text}");
    fetches.sort_by(|a, b| a.0.total_cmp(&b.0));
    for pair in fetches.windows(2) {
        assert!(pair[1].0 >= pair[0].1 - 0.001, "two fetches overlapped: {pair:?}");
    }
}

/// `workspace = "none"` folders are emptied and reused rather than made
/// anew for every job (inode allocation was the largest cost of a short
/// job): nothing a job leaves reaches the next, a link it leaves is removed
/// without touching its target, and a folder it swapped for a link is never
/// handed out again.
#[tokio::test]
async fn an_empty_workspace_is_reused_with_nothing_of_the_job_before() {
    let w = Workdir::new();
    let outside = w.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), "keep").unwrap();
    let mode = w.path().join("mode");
    let agent = w.script(
        "agent.sh",
        &format!(
            r#"#!/bin/sh
cat > /dev/null
echo "inode $(stat -c %i .) sees [$(ls -A | tr '\n' ' ')]"
case $(cat {mode}) in
  dirty) mkdir -p sub/deeper && echo x > sub/deeper/f && echo s > secret.txt && touch .hidden && ln -s {outside} link ;;
  swap) here=$PWD; cd .. && rm -rf "$here" && ln -s {outside} "$here" ;;
esac
"#,
            mode = mode.display(),
            outside = outside.display()
        ),
    );
    // Unsandboxed: in the sandbox the folder is a mount point the agent
    // cannot swap; this is about what baton does when nothing stops it.
    Scenario::new()
        .set("sandbox.enabled", false)
        .github(GitHub::secret(SECRET))
        .set("limits.max_parallel_jobs", 1)
        .agent("script", Agent::script(&agent))
        .trigger(
            "work",
            Trigger::on(&["issues.opened"]).agent("script").workspace("none").prompt("work").output("none"),
        )
        .write(&w);
    let baton = Baton::start(w.path(), &[]);
    let run = async |n: u32, what: &str| -> (String, String) {
        std::fs::write(&mode, what).unwrap();
        let payload = fixture_json("issues/opened.payload.json").to_string();
        let (status, body) = baton.deliver(SECRET, "issues", &format!("empty-{n}"), payload.as_bytes()).await;
        assert_eq!(status, 202, "{body}");
        let job = baton.finished(body["jobs"][0].as_str().unwrap()).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let result = job["result"].as_str().unwrap().trim().to_string();
        let (inode, sees) = result.strip_prefix("inode ").unwrap().split_once(" sees ").unwrap();
        (inode.to_string(), sees.to_string())
    };
    let (first, sees) = run(1, "dirty").await;
    assert_eq!(sees, "[]");
    let (second, sees) = run(2, "look").await;
    assert_eq!(second, first, "the emptied folder is reused");
    assert_eq!(sees, "[]", "nothing of the job before");
    assert_eq!(read(&outside.join("keep")), "keep", "a link's target is left alone");
    run(3, "swap").await;
    let (_, sees) = run(4, "look").await;
    assert_eq!(sees, "[]", "a folder swapped for a link is not handed out");
    assert_eq!(read(&outside.join("keep")), "keep");
}
