//! The `baton` command line. Everything it runs lives in the library.

use baton::forge::{Forge, WebhookKeys};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use baton::api::client::Client;
use baton::api::wire::{CreateJob, JobState, JobsQuery};
use baton::config::Config;
use baton::diag::Diagnostic;
use baton::rules::{RuleSet, Verdict};
use baton::store::Store;

#[derive(Parser)]
#[command(name = "baton", version, about = "Event-triggered automation daemon for coding agents")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Config file (default ./baton.toml, or built-in defaults when absent).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check the config and every trigger file; print each error as path:line:col: message.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply the PostgreSQL schema (`[storage] backend = "postgres"`), or print it.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the schema's SQL instead of applying it.
        #[arg(long)]
        print: bool,
        /// Copy the embedded store made with this engine into redb, the
        /// default (stop the daemon first).
        #[arg(long, value_enum)]
        from: Option<FromEngine>,
    },
    /// Show which triggers match a payload, and the prompt each would get.
    Simulate {
        /// The event name, as the forge sends it (e.g. `issues`).
        #[arg(long)]
        event: String,
        /// The payload file (JSON).
        #[arg(long)]
        payload: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run each matching job locally and print its result (nothing is published).
        #[arg(long)]
        run: bool,
        /// The forge the payload is from.
        #[arg(long, value_enum, default_value_t = ForgeArg::Github)]
        forge: ForgeArg,
    },
    /// Sign a payload and send it to a running daemon, as the forge would.
    Deliver {
        /// The webhook URL, e.g. http://127.0.0.1:8787/webhooks/github.
        #[arg(long)]
        url: String,
        /// The webhook secret (GitLab: the hook's secret token).
        #[arg(long, env = "BATON_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// GitLab: the hook's signing token, to sign as Standard Webhooks.
        #[arg(long, env = "BATON_SIGNING_TOKEN", hide_env_values = true)]
        signing_token: Option<String>,
        /// The forge to deliver as.
        #[arg(long, value_enum, default_value_t = ForgeArg::Github)]
        forge: ForgeArg,
        /// The event name, as the forge sends it.
        #[arg(long)]
        event: String,
        /// The delivery id (default: a random one).
        #[arg(long)]
        delivery: Option<String>,
        /// The payload file.
        file: PathBuf,
    },
    /// The first process inside an agent's sandbox (started by baton itself).
    #[command(name = "sandbox-init", hide = true)]
    SandboxInit {
        #[arg(long)]
        proxy: Option<PathBuf>,
        #[arg(long, default_value_t = baton::sandbox::PROXY_PORT)]
        port: u16,
        #[arg(long)]
        max_processes: Option<u64>,
        #[arg(long)]
        max_data: Option<u64>,
        /// A tmpfs whose pages count against `--max-data`.
        #[arg(long)]
        tmpfs: Vec<PathBuf>,
        /// Where to report a cap hit.
        #[arg(long)]
        report_fd: Option<i32>,
        #[arg(last = true, required = true)]
        argv: Vec<std::ffi::OsString>,
    },
    /// Serve baton's job tools (delegate, wait_job, …) over MCP on stdio, for
    /// an agent session such as `claude mcp add baton -- baton mcp`.
    Mcp {
        /// The daemon's address.
        #[arg(long, env = "BATON_URL", default_value = "http://127.0.0.1:8787")]
        url: String,
    },
    /// The environment caches on this machine's disk (`[environments]`).
    Cache {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Inspect and control jobs of a running daemon.
    Jobs {
        /// The daemon's address.
        #[arg(long, env = "BATON_URL", default_value = "http://127.0.0.1:8787", global = true)]
        url: String,
        #[command(subcommand)]
        command: JobsCommand,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Each cache: its key, repository, environment, size and last use.
    List,
    /// Remove caches (all, or those of one repository or environment);
    /// a cache in use is left alone.
    Clear {
        #[arg(long)]
        repo: Option<String>,
        #[arg(long)]
        environment: Option<String>,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// List jobs, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        trigger: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one job.
    Show { id: String },
    /// Print a job's log (control characters shown escaped, as `\x1b`).
    Logs {
        id: String,
        /// Keep printing as the log grows, until the job ends.
        #[arg(long)]
        follow: bool,
        /// Print control characters as they are, for a terminal to obey.
        #[arg(long)]
        raw: bool,
    },
    /// Cancel a queued or running job.
    Cancel { id: String },
    /// Run a finished job again.
    Retry { id: String },
    /// Create a job (`POST /api/jobs`): a trigger with `on = ["api"]`, or a
    /// free-form job (`[api] allow_adhoc`).
    Run {
        /// A trigger with `on = ["api"]`.
        #[arg(long, conflicts_with_all = ["agent", "prompt", "workspace", "git_ref", "output"])]
        trigger: Option<String>,
        /// The trigger's inputs, `KEY=VALUE` (`{{ inputs.KEY }}` in its templates).
        #[arg(long = "input", value_name = "KEY=VALUE")]
        inputs: Vec<String>,
        /// `owner/name`.
        #[arg(long)]
        repo: Option<String>,
        /// A free-form job's agent (one of `[api] agents`).
        #[arg(long)]
        agent: Option<String>,
        /// A free-form job's prompt.
        #[arg(long)]
        prompt: Option<String>,
        /// none | default-branch | head-sha | pr-head.
        #[arg(long)]
        workspace: Option<String>,
        /// The branch (default-branch) or commit (head-sha) to work on.
        #[arg(long = "ref")]
        git_ref: Option<String>,
        /// The issue or pull request the job is about.
        #[arg(long)]
        subject: Option<u64>,
        /// Where the result goes: comment | review | pull_request | push | none.
        #[arg(long)]
        output: Option<String>,
        /// Sent as `Idempotency-Key`: the same key again returns the same job.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Print the job's log until it ends, then its result; exit 1 unless it succeeded.
        #[arg(long)]
        follow: bool,
        /// With --follow: print control characters as they are (escaped, as `\x1b`, by default).
        #[arg(long, requires = "follow")]
        raw: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::SandboxInit { proxy, port, max_processes, max_data, tmpfs, report_fd, argv } = cli.command {
        let args =
            baton::sandbox::init::InitArgs { proxy, port, max_processes, max_data, tmpfs, report: report_fd, argv };
        let code = baton::sandbox::init::run(args);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    init_logging(cli.log_format);
    // `serve` loads its config and locks its secrets away before any thread
    // exists: the environment cannot be changed safely once threads run.
    let command = match cli.command {
        Command::Serve { config } => match load_config(config.as_deref()) {
            Ok(config) => {
                baton::harden::protect(&config.secret_vars);
                Prepared::Serve(Box::new(config))
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        other => Prepared::Other(Box::new(other)),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match command {
        Prepared::Serve(config) => runtime.block_on(serve(*config)),
        Prepared::Other(command) => runtime.block_on(run(*command)),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sled=warn,hyper=warn,octocrab=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A command ready to run.
enum Prepared {
    Serve(Box<Config>),
    Other(Box<Command>),
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Serve { config } => serve(load_config(config.as_deref())?).await,
        Command::SandboxInit { .. } => Ok(ExitCode::FAILURE),
        Command::Check { config } => Ok(check(config.as_deref()).await),
        Command::Migrate { config, from: Some(FromEngine::Sled), .. } => migrate_from_sled(config.as_deref()),
        Command::Migrate { config, print, from: None } => migrate(config.as_deref(), print).await,
        Command::Simulate { event, payload, config, run, forge } => {
            simulate(forge.into(), &event, &payload, config.as_deref(), run).await
        }
        Command::Deliver { url, secret, signing_token, forge, event, delivery, file } => {
            let keys = WebhookKeys { secret: secret.as_bytes(), signing: signing_token.as_deref().map(str::as_bytes) };
            deliver(forge.into(), &url, keys, &event, delivery, &file).await
        }
        Command::Jobs { url, command } => jobs(&url, command).await,
        Command::Cache { config, command } => cache(config.as_deref(), command),
        Command::Mcp { url } => {
            let token = std::env::var("BATON_API_TOKEN").ok().filter(|t| !t.is_empty());
            baton::mcp::serve_stdio(&url, token).await.map(|()| ExitCode::SUCCESS)
        }
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    Config::load(path).map_err(|errors| anyhow::anyhow!(join(&errors)))
}

fn join(errors: &[Diagnostic]) -> String {
    errors.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n")
}

async fn serve(config: Config) -> Result<ExitCode> {
    let listener = baton::daemon::bind(&config).await?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("Shutting down.");
        signal.cancel();
    });
    baton::daemon::serve(config, listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// What `baton migrate --from` copies.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FromEngine {
    Sled,
}

/// `baton migrate --from sled`: the storage folder's sled store, copied
/// into redb. It reads only the folder, so it needs none of the secrets.
fn migrate_from_sled(path: Option<&Path>) -> Result<ExitCode> {
    let storage = Config::storage_folder(path).map_err(|errors| anyhow::anyhow!(join(&errors)))?;
    let copied = Store::migrate_from_sled(&storage)
        .with_context(|| format!("copying the sled store in {} (is baton still running?)", storage.display()))?;
    for t in copied.iter().filter(|t| t.records > 0) {
        println!("{:<16} {:>9} records  {:>12} bytes", t.name, t.records, t.bytes);
    }
    println!(
        "ok: copied into {}; the sled files are in {} (remove them once baton runs well)",
        storage.join("baton.redb").display(),
        storage.join("db.migrated").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `baton migrate`: the schema a PostgreSQL store needs, printed or applied.
async fn migrate(path: Option<&Path>, print: bool) -> Result<ExitCode> {
    if print {
        print!("{}", baton::store::schema());
        return Ok(ExitCode::SUCCESS);
    }
    let config = load_config(path)?;
    if config.storage.backend != baton::config::Backend::Postgres {
        anyhow::bail!(
            "[storage] backend is not \"postgres\": an embedded store needs no schema (`--from sled` copies a sled store into redb)"
        );
    }
    Store::connect(&baton::store::Location::of(&config), &config.storage.path).await?;
    println!("ok: the database schema is up to date");
    Ok(ExitCode::SUCCESS)
}

async fn check(path: Option<&Path>) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                println!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let (rules, errors) = RuleSet::load(&config.triggers_dir, &config);
    for e in &errors {
        println!("{e}");
    }
    let sandbox = sandbox_check(&config);
    if let Err(e) = &sandbox {
        println!("{}: {e}", config.file.as_deref().unwrap_or(Path::new("<built-in defaults>")).display());
    }
    // A database that cannot be reached is reported here, not at the first
    // delivery.
    let database = match config.storage.backend {
        baton::config::Backend::Postgres => {
            Store::connect(&baton::store::Location::of(&config), &config.storage.path).await.map(|_| ())
        }
        baton::config::Backend::Sled | baton::config::Backend::Redb => Ok(()),
    };
    if let Err(e) = &database {
        println!("{}: storage: {e}", config.file.as_deref().unwrap_or(Path::new("<built-in defaults>")).display());
    }
    if errors.is_empty() && sandbox.is_ok() && database.is_ok() {
        println!("ok: {} trigger(s) in {}", rules.triggers().len(), config.triggers_dir.display());
        if config.sandbox.enabled {
            println!("ok: agents run sandboxed as {}", config.sandbox.run_as.describe());
        }
        for line in environment_lines(&config, &rules) {
            println!("{line}");
        }
        if let Some(gitlab) = &config.gitlab {
            for line in gitlab_lines(gitlab) {
                println!("{line}");
            }
        }
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `baton cache list|clear`: the caches are files of this machine's, so
/// this reads the storage folder directly (each cache's lock keeps it
/// safe beside a running daemon), and needs none of the config's secrets.
fn cache(path: Option<&Path>, command: CacheCommand) -> Result<ExitCode> {
    let storage = Config::storage_folder(path).map_err(|errors| anyhow::anyhow!(join(&errors)))?;
    let caches = baton::cache::Caches::new(&storage);
    match command {
        CacheCommand::List => {
            let list = caches.list();
            if list.is_empty() {
                println!("no caches in {}", caches.root().display());
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<32}  {:<30}  {:<14}  {:>10}  LAST USED", "KEY", "REPOSITORY", "ENVIRONMENT", "SIZE");
            for m in list {
                let used = chrono::DateTime::from_timestamp(m.last_used as i64, 0)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default();
                println!(
                    "{:<32}  {:<30}  {:<14}  {:>10}  {used}",
                    m.key,
                    m.repo,
                    m.environment,
                    baton::cache::human(m.bytes)
                );
            }
        }
        CacheCommand::Clear { repo, environment } => {
            let removed = caches.remove_where(|m| {
                repo.as_ref().is_none_or(|r| &m.repo == r) && environment.as_ref().is_none_or(|e| &m.environment == e)
            });
            println!("removed {} cache(s)", removed.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `baton check` says of `[gitlab]`: where it is, and whether
/// catch-up after downtime is on.
fn gitlab_lines(gitlab: &baton::config::GitLabSettings) -> Vec<String> {
    let mut lines = vec![format!("ok: GitLab at {} (API {})", gitlab.url, gitlab.api_url)];
    let mut hooks: Vec<u64> = gitlab.projects.iter().map(|p| p.hook_id).collect();
    hooks.sort_unstable();
    hooks.dedup();
    let hooks = hooks.iter().map(u64::to_string).collect::<Vec<_>>();
    lines.push(match hooks.len() {
        0 => "note: GitLab catch-up is off: set gitlab.hook_id (the project webhook's id) and gitlab.projects, with a \
              token that may read the hook's events (Maintainer, api scope); without it, deliveries GitLab failed to \
              send while baton was down are not fetched again"
            .to_string(),
        1 => format!("ok: GitLab catch-up watches {} project(s) through hook {}", gitlab.projects.len(), hooks[0]),
        _ => format!(
            "ok: GitLab catch-up watches {} project(s) through hooks {}",
            gitlab.projects.len(),
            hooks.join(", ")
        ),
    });
    lines
}

/// What `baton check` says of each trigger's environment, when any is
/// defined.
fn environment_lines(config: &Config, rules: &RuleSet) -> Vec<String> {
    if config.environments.is_empty() {
        return Vec::new();
    }
    let by_repo: Vec<String> = config
        .environments
        .values()
        .flat_map(|e| e.repos.iter().map(move |p| format!("{} for {}", e.name, p.as_str())))
        .collect();
    rules
        .triggers()
        .iter()
        .map(|t| match (&t.job.environment, by_repo.is_empty()) {
            (Some(env), _) => format!("ok: trigger {} runs in environment {env}", t.name),
            (None, false) => {
                format!("ok: trigger {} runs in the environment of its repository ({})", t.name, by_repo.join(", "))
            }
            (None, true) => format!("ok: trigger {} runs in no environment", t.name),
        })
        .collect()
}

/// `[sandbox] enabled` needs a working bubblewrap.
fn sandbox_check(config: &Config) -> Result<(), baton::sandbox::SandboxError> {
    if config.sandbox.enabled {
        baton::sandbox::preflight(&config.sandbox.run_as)?;
    }
    Ok(())
}

/// `--forge`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ForgeArg {
    Github,
    Gitlab,
}

impl From<ForgeArg> for Forge {
    fn from(f: ForgeArg) -> Forge {
        match f {
            ForgeArg::Github => Forge::GITHUB,
            ForgeArg::Gitlab => Forge::GITLAB,
        }
    }
}

async fn simulate(forge: Forge, event: &str, payload: &Path, path: Option<&Path>, run: bool) -> Result<ExitCode> {
    let mut config = load_config(path)?;
    let (rules, errors) = RuleSet::load(&config.triggers_dir, &config);
    for e in &errors {
        eprintln!("{e}");
    }
    let body = std::fs::read(payload).with_context(|| format!("cannot read {}", payload.display()))?;
    let name = event.split('.').next().unwrap_or(event);
    let verified = baton::forge::Verified { event: name.to_string(), delivery: "simulated".to_string() };
    let ev = forge.normalize(&verified, &body).with_context(|| format!("{}", payload.display()))?;
    println!("event: {}", ev.kind);
    let mut matched = Vec::new();
    for (trigger, verdict) in rules.explain(&ev) {
        match verdict {
            Verdict::Matched(spec) => {
                println!("\n✓ {} matches\n--- prompt ---\n{}\n--------------", trigger.name, spec.prompt.trim_end());
                matched.push(*spec);
            }
            Verdict::Held { reason, .. } => {
                println!("… {}: waits for a trusted person's `/baton approve`: {reason}", trigger.name)
            }
            Verdict::Rejected { filter, reason } => {
                println!("✗ {}: {filter}: {reason}", trigger.name)
            }
        }
    }
    if run && !matched.is_empty() {
        let scratch = std::env::temp_dir().join(format!("baton-simulate-{}", std::process::id()));
        config.storage.path = scratch.clone();
        let sandbox = baton::daemon::sandbox(&config)?;
        let results = baton::engine::run_locally(config, matched, sandbox).await;
        let _ = std::fs::remove_dir_all(&scratch);
        for job in results? {
            println!("\n== {} ({}) ==", job.trigger, job.state);
            if let Some(r) = &job.result {
                println!("{}", shown(r, false));
            }
            if let Some(e) = &job.error {
                println!("error: {}", shown(e, false));
            }
        }
    }
    Ok(if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn deliver(
    forge: Forge,
    url: &str,
    keys: WebhookKeys<'_>,
    event: &str,
    delivery: Option<String>,
    file: &Path,
) -> Result<ExitCode> {
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let delivery = delivery.unwrap_or_else(random_id);
    let mut request = reqwest::Client::new().post(url).header("content-type", "application/json");
    for (name, value) in forge.delivery_headers(keys, event, &delivery, &body) {
        request = request.header(name, value);
    }
    let resp = request.body(body).send().await.with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    println!("{} {}", status.as_u16(), text.trim());
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

async fn jobs(url: &str, command: JobsCommand) -> Result<ExitCode> {
    let token = std::env::var("BATON_API_TOKEN").ok().filter(|t| !t.is_empty());
    let client = Client::new(url, token.map(baton::config::Secret::new));
    match command {
        JobsCommand::List { state, trigger, limit } => {
            let query = JobsQuery { state, trigger, limit: Some(limit), ..JobsQuery::default() };
            let list = client.jobs(&query).await?;
            println!("{:<16}  {:<10}  {:<20}  {:<28}  {:>7}  CREATED", "ID", "STATE", "TRIGGER", "REPO", "SUBJECT");
            for j in list.jobs {
                let subject = j.subject.map(|n| format!("#{n}")).unwrap_or_else(|| "-".into());
                println!(
                    "{:<16}  {:<10}  {:<20}  {:<28}  {:>7}  {}",
                    j.id,
                    j.state,
                    j.trigger,
                    j.repo.as_deref().unwrap_or("-"),
                    subject,
                    // As the API writes it.
                    serde_json::to_value(j.created_at)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                );
            }
        }
        JobsCommand::Show { id } => {
            // Through a `Value`: its keys sorted, as this command always showed them.
            let job = serde_json::to_value(client.job(&id).await?)?;
            println!("{}", serde_json::to_string_pretty(&job)?);
        }
        JobsCommand::Cancel { id } => {
            let job = client.cancel(&id).await?;
            println!("{} {}", job.id, job.state);
        }
        JobsCommand::Retry { id } => {
            let job = client.retry(&id).await?;
            println!("{} {}", job.id, job.state);
        }
        JobsCommand::Run {
            trigger,
            inputs,
            repo,
            agent,
            prompt,
            workspace,
            git_ref,
            subject,
            output,
            idempotency_key,
            follow,
            raw,
        } => {
            let inputs = match inputs.is_empty() {
                true => None,
                false => {
                    let mut map = serde_json::Map::new();
                    for pair in inputs {
                        let Some((k, v)) = pair.split_once('=') else { bail!("--input {pair}: expected KEY=VALUE") };
                        map.insert(k.to_string(), v.into());
                    }
                    Some(map)
                }
            };
            let req = CreateJob {
                trigger,
                inputs,
                agent,
                repo,
                workspace,
                git_ref,
                prompt,
                output: output.map(|kind| serde_json::Map::from_iter([("kind".to_string(), kind.into())])),
                subject,
            };
            let id = client.create(&req, idempotency_key.as_deref()).await?.job.id;
            if !follow {
                println!("{id}");
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("job {id}");
            let job = client.follow_log(&id, FOLLOW_EVERY, |chunk| print_chunk(chunk, raw)).await?;
            let error = job.error.as_deref().map(|e| format!(": {}", shown(e, raw))).unwrap_or_default();
            eprintln!("job {id} {}{error}", job.state);
            if let Some(result) = &job.result {
                println!("{}", shown(result, raw));
            }
            return Ok(if job.state == JobState::Succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        JobsCommand::Logs { id, follow, raw } => match follow {
            true => drop(client.follow_log(&id, FOLLOW_EVERY, |chunk| print_chunk(chunk, raw)).await?),
            false => print_chunk(&client.log(&id).await?, raw)?,
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// How often `--follow` asks for more of a job's log.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// An agent's text for the terminal: its control characters escaped
/// (`\x1b`), so that it cannot drive the terminal (OSC 52 writes the
/// clipboard, OSC 0 the title); `raw` leaves them.
fn shown(text: &str, raw: bool) -> std::borrow::Cow<'_, str> {
    match raw {
        true => text.into(),
        false => baton::publish::defuse::escape_controls(text).into(),
    }
}

/// Writes a piece of a job's log to stdout (see `shown`).
fn print_chunk(bytes: &[u8], raw: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout();
    match raw {
        true => out.write_all(bytes)?,
        false => out.write_all(shown(&String::from_utf8_lossy(bytes), false).as_bytes())?,
    }
    out.flush()
}

// glibc's malloc was a sixth of ingest's CPU (webhook bodies parsed into
// many small values); with mimalloc ingest is 16% faster (bench/RESULTS.md).
// Built without transparent huge pages (Cargo.toml): with them, idle memory
// went from 14 MB to 51 MB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
