//! Running one agent process: its command line, a cleared environment, its
//! own process group, a time limit, an output cap, and reading its result.
//!
//! The agent's stdin is always closed after the prompt is written (Codex
//! waits forever on an open stdin). On timeout or cancel the whole process
//! group gets SIGTERM, then SIGKILL after a grace period; after a normal exit
//! the group is killed too, so nothing the agent started outlives it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::config::{format_duration, AgentDef, PromptMode, ResultMode, UsageFormat};
use crate::domain::outcome::{RunEnd, Stop};
use crate::sandbox::egress::Blocked;
use crate::sandbox::usage::{Meter, Over};
use crate::sandbox::{LimitHit, Sandbox};

/// How long a process group has between SIGTERM and SIGKILL.
pub(crate) const KILL_GRACE: Duration = Duration::from_secs(5);

/// Output kept per job, across stdout and stderr; the log says where it was cut.
pub(crate) const DEFAULT_OUTPUT_CAP: u64 = 10 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent command `{program}` not found on PATH{hint}")]
    NotFound { program: String, hint: String },
    #[error("agent command `{program}` could not start: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("invalid agent command template: {0}")]
    Template(String),
    #[error("cannot write agent files in {path}: {source}")]
    Files { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(Option<i32>),
    TimedOut(Duration),
    Cancelled,
    /// baton stopped it: its model use passed the run's budget.
    OverBudget,
    /// baton stopped it: it passed a cap baton meters itself (disk, files),
    /// or it grew fastest while the storage folder ran short of space.
    Limit(LimitHit),
}

/// What one run may spend: the CLI's own cap where it has one (Claude
/// Code's `--max-budget-usd`), else baton watches the use the CLI reports
/// as it goes and stops the run past it.
#[derive(Debug, Clone)]
pub struct Budget {
    pub usd: f64,
    /// For a CLI that reports tokens but no cost (`[prices]`).
    pub prices: std::sync::Arc<std::collections::BTreeMap<String, crate::config::Price>>,
}

/// How often baton reads a running agent's reported use.
const BUDGET_POLL: Duration = Duration::from_millis(200);

/// The shortest time between two samples of a run's disk use; a tree that
/// takes long to walk is walked less often (at most a tenth of the time).
const DISK_POLL: Duration = Duration::from_secs(1);

const PROMPT_FILE: &str = "prompt.md";
const RESULT_FILE: &str = "result.md";
const USAGE_FILE: &str = "usage.json";

/// What one run produced.
#[derive(Debug)]
pub struct RunOutput {
    pub ending: Ending,
    pub stdout: String,
    /// The last few KB of stdout and stderr together, for feedback.
    pub(crate) output_tail: String,
    /// The sandbox cap the run ran into, if any.
    pub limit: Option<LimitHit>,
    /// Destinations its egress proxy refused.
    pub egress_blocked: Vec<Blocked>,
}

impl Ending {
    /// How the run stopped, in the terms `domain::outcome` decides by.
    pub fn stop(&self) -> Stop {
        match self {
            Ending::Exited(code) => Stop::Exited(*code),
            Ending::TimedOut(_) => Stop::TimedOut,
            Ending::Cancelled => Stop::Cancelled,
            Ending::OverBudget => Stop::OverBudget,
            Ending::Limit(_) => Stop::Limit,
        }
    }
}

impl RunOutput {
    /// Its end as `domain::outcome` weighs it: how it stopped, the sandbox
    /// cap it ran into, and its budget and spend when it had one.
    pub fn end(&self, budget_usd: Option<f64>, spent_usd: Option<f64>) -> RunEnd {
        RunEnd { stop: self.ending.stop(), limit: self.limit.is_some(), budget_usd, spent_usd }
    }
}

/// The sandbox a run is confined to, and what it sees besides its workspace.
pub struct Confinement<'a> {
    pub sandbox: &'a Sandbox,
    /// Unique among runs at one time.
    pub name: String,
    /// baton's folder for the run (the agent's `HOME`, the proxy socket);
    /// made anew and removed afterwards.
    pub(crate) run_dir: PathBuf,
    /// The mirror's objects the workspace's repository borrows (shown
    /// read-only at `sandbox::OBJECTS_PATH`).
    pub objects: Option<PathBuf>,
    /// Told of the run's disk use; may stop it when the disk runs short.
    pub space: Option<std::sync::Arc<super::space::Space>>,
    /// The environment's cache folders (host, inside), read-write.
    pub caches: Vec<(PathBuf, PathBuf)>,
    /// The environment's read-only root, if it has one.
    pub image: Option<PathBuf>,
}

/// One invocation of an agent.
pub struct Invocation<'a> {
    pub agent: &'a AgentDef,
    pub prompt: &'a str,
    /// The worktree: the agent's working directory.
    pub workdir: &'a Path,
    /// Holds the prompt and result files (outside the worktree).
    pub job_dir: &'a Path,
    pub log: &'a Path,
    pub timeout: Duration,
    pub output_cap: u64,
    pub cancel: &'a CancellationToken,
    /// Told the agent's process group id as soon as it runs, so a daemon
    /// that dies can find the group at its next start.
    pub on_spawn: Option<&'a (dyn Fn(i32) + Send + Sync)>,
    /// The sandbox; `None` runs the agent unconfined (`[sandbox] enabled = false`).
    pub confine: Option<Confinement<'a>>,
    /// What the run may spend.
    pub budget: Option<&'a Budget>,
    /// What its CLI is given besides its command: MCP servers, settings.
    pub setup: Option<&'a super::cli_setup::Setup>,
}

impl Invocation<'_> {
    pub fn prompt_file(&self) -> PathBuf {
        self.job_dir.join(PROMPT_FILE)
    }

    pub fn result_file(&self) -> PathBuf {
        self.job_dir.join(RESULT_FILE)
    }

    /// Where any agent may report its model use (`$BATON_USAGE_FILE`).
    pub(crate) fn usage_file(&self) -> PathBuf {
        self.job_dir.join(USAGE_FILE)
    }

    /// The io folder as the agent sees it: at a fixed path in the sandbox.
    fn visible_io(&self) -> PathBuf {
        match self.confine {
            Some(_) => PathBuf::from(crate::sandbox::IO_PATH),
            None => self.job_dir.to_path_buf(),
        }
    }

    /// The model use the run reported: on the CLI's own output, or in the
    /// usage file (read as the result file is: never through a link).
    pub async fn usage(&self, run: &RunOutput) -> Option<crate::store::Usage> {
        let path = self.usage_file();
        let file = tokio::task::spawn_blocking(move || read_result_file(&path).ok()).await.ok().flatten();
        super::usage::read(self.agent.usage, &run.stdout, file.as_deref())
    }

    fn argv(&self) -> Result<Vec<String>, AgentError> {
        let env = minijinja::Environment::new();
        let io = self.visible_io();
        let ctx = minijinja::context! {
            prompt => self.prompt,
            prompt_file => io.join(PROMPT_FILE).display().to_string(),
            result_file => io.join(RESULT_FILE).display().to_string(),
        };
        let mut argv: Vec<String> = self
            .agent
            .command
            .iter()
            .map(|arg| env.render_str(arg, &ctx).map_err(|e| AgentError::Template(e.to_string())))
            .collect::<Result<_, _>>()?;
        if let (Some(b), UsageFormat::Claude) = (self.budget, self.agent.usage) {
            argv.splice(1..1, ["--max-budget-usd".to_string(), b.usd.to_string()]);
        }
        // After rendering: none of it is a template. Options go before any
        // positional argument, after Codex's `exec` subcommand.
        if let Some(setup) = self.setup {
            let at = if argv.get(1).map(String::as_str) == Some("exec") { 2 } else { 1 };
            argv.splice(at..at, setup.args.iter().cloned());
        }
        Ok(argv)
    }

    /// Whether baton itself watches the run's spending (a CLI without a cap
    /// of its own).
    fn watches_budget(&self) -> bool {
        self.budget.is_some() && self.agent.usage != UsageFormat::Claude
    }

    /// Returns once the use the run reported since `offset` of its log
    /// (Codex's events, say) or in its usage file passes the budget.
    async fn over_budget(&self, offset: u64) {
        let Some(budget) = self.budget else { return std::future::pending().await };
        loop {
            tokio::time::sleep(BUDGET_POLL).await;
            let (log, usage_file) = (self.log.to_path_buf(), self.usage_file());
            let (text, file) = tokio::task::spawn_blocking(move || {
                use std::io::{Read as _, Seek as _};
                let mut text = String::new();
                if let Ok(mut f) = std::fs::File::open(&log) {
                    if f.seek(std::io::SeekFrom::Start(offset)).is_ok() {
                        let _ = f.take(DEFAULT_OUTPUT_CAP).read_to_string(&mut text);
                    }
                }
                (text, read_result_file(&usage_file).ok())
            })
            .await
            .unwrap_or_default();
            let used = super::usage::read(self.agent.usage, &text, file.as_deref())
                .map(|u| super::usage::priced_by(u, self.agent.model.as_deref(), &budget.prices));
            if used.and_then(|u| u.cost_usd).is_some_and(|c| c >= budget.usd) {
                return;
            }
        }
    }

    /// Runs the agent to its end.
    pub async fn run(&self) -> Result<RunOutput, AgentError> {
        let files_err = |source| AgentError::Files { path: self.job_dir.to_path_buf(), source };
        // Made anew for every run: an earlier run may have left links here
        // that a write of the prompt would follow.
        let (dir, prompt_file) = (
            self.job_dir.to_path_buf(),
            (self.agent.prompt == PromptMode::File).then(|| (self.prompt_file(), self.prompt.to_string())),
        );
        let files = self.setup.map(|m| m.files.clone()).unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            crate::tree::remove(&dir)?;
            std::fs::create_dir_all(&dir)?;
            if let Some((path, text)) = prompt_file {
                std::fs::write(path, text)?;
            }
            for (name, text) in files {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join(name))?;
                f.write_all(text.as_bytes())?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(files_err)?;
        let argv = self.argv()?;
        let program = argv[0].clone();
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        let Some(resolved) = resolve_program(&program, &path_var, self.workdir) else {
            return Err(AgentError::NotFound {
                hint: match &self.agent.install {
                    Some(how) => format!("; install it with `{how}`"),
                    None => "; install it or set the full path in the agent's `command`".into(),
                },
                program: program.clone(),
            });
        };

        let mut jail = None;
        let mut cmd = match &self.confine {
            Some(c) => {
                let mut expose = Vec::new();
                if !crate::sandbox::is_system_path(&resolved) && resolved.is_absolute() {
                    expose.push(resolved.clone());
                }
                let mut profile = std::borrow::Cow::Borrowed(&self.agent.sandbox);
                if let Some(setup) = self.setup {
                    expose.extend(setup.expose.iter().cloned());
                    profile.to_mut().network.extend(setup.network.iter().cloned());
                }
                let run = crate::sandbox::Run {
                    name: &c.name,
                    profile: &profile,
                    workdir: self.workdir,
                    io_dir: self.job_dir,
                    run_dir: &c.run_dir,
                    objects: c.objects.as_deref(),
                    expose,
                    baton: self.setup.and_then(|s| s.baton),
                    caches: &c.caches,
                    image: c.image.as_deref(),
                };
                let j = c.sandbox.jail(&run, &argv)?;
                if let Some(setup) = self.setup {
                    let (home, owner) = (j.home(), j.owner());
                    let written =
                        write_private(&home, &setup.home_files).and_then(|()| crate::sandbox::hand_over(&home, owner));
                    if let Err(source) = written {
                        let _ = tokio::task::spawn_blocking(move || j.close()).await;
                        return Err(files_err(source));
                    }
                }
                let cmd = j.command();
                jail = Some(j);
                cmd
            }
            None => {
                let mut cmd = Command::new(&program);
                cmd.args(&argv[1..]);
                cmd
            }
        };
        cmd.current_dir(if jail.is_some() { Path::new("/") } else { self.workdir })
            .env_clear()
            .stdin(if self.agent.prompt == PromptMode::Stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for name in ["PATH", "HOME"].iter().copied().chain(self.agent.env.iter().map(String::as_str)) {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        cmd.envs(&self.agent.vars);
        if let Some(setup) = self.setup {
            cmd.envs(setup.env.iter().map(|(k, v)| (k, v)));
        }
        cmd.env("BATON_USAGE_FILE", self.visible_io().join(USAGE_FILE));
        if let Some(j) = &jail {
            cmd.envs(j.env.iter().map(|(k, v)| (k, v)));
        }
        // What the folders held before the agent ran, walked while
        // bubblewrap sets up.
        let base = jail.as_ref().map(|j| {
            let meter = j.meter().clone();
            tokio::task::spawn_blocking(move || meter.sample().disk)
        });
        let spawned = cmd.spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(source) => {
                if let Some(j) = jail {
                    let _ = tokio::task::spawn_blocking(move || j.close()).await;
                }
                return Err(AgentError::Spawn { program: program.clone(), source });
            }
        };
        // With process_group(0) the group id is the child's pid. Take it now:
        // `child.id()` is gone once the child has been reaped.
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        if let (Some(pgid), Some(on_spawn)) = (pgid, self.on_spawn) {
            on_spawn(pgid);
        }
        let mut meter = None;
        if let (Some(j), Some(base)) = (jail.as_mut(), base) {
            let base = base.await.unwrap_or_default();
            match j.started(base).await {
                Ok(m) => meter = Some(m),
                Err(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    if let Some(j) = jail {
                        let _ = tokio::task::spawn_blocking(move || j.close()).await;
                    }
                    return Err(AgentError::Sandbox(e));
                }
            }
        }
        let tracker = match (&self.confine, &meter) {
            (Some(Confinement { space: Some(space), name, .. }), Some(_)) => Some(space.track(name)),
            _ => None,
        };

        if let Some(mut stdin) = child.stdin.take() {
            let prompt = self.prompt.as_bytes().to_vec();
            // Written from a task so a child that never reads cannot block us;
            // dropping `stdin` closes it.
            tokio::spawn(async move {
                let _ = stdin.write_all(&prompt).await;
                let _ = stdin.shutdown().await;
            });
        }

        let log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log)
            .await
            .map_err(|source| AgentError::Files { path: self.log.to_path_buf(), source })?;
        // The job's log holds earlier runs too: a budget counts this one's.
        let log_start = log.metadata().await.map(|m| m.len()).unwrap_or(0);
        let log = std::sync::Arc::new(tokio::sync::Mutex::new(CappedLog {
            file: log,
            left: self.output_cap,
            cut: false,
            tail: Vec::new(),
        }));
        let stdout = child.stdout.take().map(|s| tokio::spawn(pump(s, log.clone(), true)));
        let stderr = child.stderr.take().map(|s| tokio::spawn(pump(s, log.clone(), false)));

        let watching = self.watches_budget();
        let mut ending = tokio::select! {
            status = child.wait() => Ending::Exited(status.ok().and_then(|s| s.code())),
            _ = tokio::time::sleep(self.timeout) => Ending::TimedOut(self.timeout),
            _ = self.cancel.cancelled() => Ending::Cancelled,
            _ = self.over_budget(log_start), if watching => Ending::OverBudget,
            hit = watch_disk(meter.as_ref(), tracker.as_ref()) => Ending::Limit(hit),
            _ = async { match &tracker { Some(t) => t.stopped().await, None => std::future::pending().await } } => {
                Ending::Limit(LimitHit::MinFree)
            }
        };
        // What the run left counts as much as what it wrote while watched.
        if let (Ending::Exited(_), Some(m)) = (&ending, meter.clone()) {
            let now = tokio::task::spawn_blocking(move || m.over(m.sample())).await.ok().flatten();
            if let Some(over) = now {
                ending = Ending::Limit(limit_of(over));
            }
        }
        if let Some(pgid) = pgid {
            if matches!(ending, Ending::Exited(_)) {
                // The agent is gone; whatever it left running goes with it.
                kill_group(pgid, libc::SIGKILL);
            } else {
                terminate_group(pgid, &mut child).await;
            }
        }
        let _ = child.wait().await;

        // A process that left the group (setsid) can hold the pipes open
        // forever; its output is not worth a hung job.
        let stdout = match stdout {
            Some(h) => drain(h).await,
            None => Vec::new(),
        };
        if let Some(h) = stderr {
            drain(h).await;
        }
        let mut log = log.lock().await;
        let note = match &ending {
            Ending::Exited(code) => {
                format!("\n[baton] agent exited with {}\n", describe_exit(*code))
            }
            Ending::TimedOut(d) => format!("\n[baton] agent stopped: timeout after {}\n", format_duration(*d)),
            Ending::Cancelled => "\n[baton] agent stopped: job cancelled\n".to_string(),
            Ending::OverBudget => "\n[baton] agent stopped: its budget is spent\n".to_string(),
            Ending::Limit(hit) => format!("\n[baton] agent stopped: {}\n", hit.key()),
        };
        let (limit, egress_blocked) = match jail {
            Some(j) => {
                let by_init = j.limit_reported();
                let ours = match &ending {
                    Ending::Limit(hit) => Some(*hit),
                    _ => None,
                };
                let (hit, blocked) = tokio::task::spawn_blocking(move || j.close()).await.unwrap_or_default();
                (ours.or(hit).or(by_init), blocked)
            }
            None => (None, Vec::new()),
        };
        let mut note = note;
        for b in &egress_blocked {
            note.push_str(&format!("[baton] egress refused: {}:{} ({}×)\n", b.host, b.port, b.count));
        }
        let _ = log.file.write_all(note.as_bytes()).await;
        let _ = log.file.flush().await;
        Ok(RunOutput {
            ending,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            output_tail: String::from_utf8_lossy(&log.tail).into_owned(),
            limit,
            egress_blocked,
        })
    }

    /// Reads the agent's answer as its definition says.
    pub async fn result(&self, run: &RunOutput) -> Result<String, String> {
        match &self.agent.result {
            ResultMode::Stdout => Ok(run.stdout.trim().to_string()),
            ResultMode::File => {
                let path = self.result_file();
                tokio::task::spawn_blocking(move || read_result_file(&path))
                    .await
                    .unwrap_or_else(|_| Err("the result file could not be read".into()))
            }
            ResultMode::Json(field) => json_field(&run.stdout, field),
        }
    }
}

/// Samples a run's disk use until it passes a cap, telling `tracker` how
/// it grows; never returns for a run that is not metered.
async fn watch_disk(meter: Option<&Meter>, tracker: Option<&super::space::Tracker>) -> LimitHit {
    let Some(meter) = meter else { return std::future::pending().await };
    let mut pause = DISK_POLL;
    loop {
        tokio::time::sleep(pause).await;
        let m = meter.clone();
        let started = std::time::Instant::now();
        let Ok((now, over)) = tokio::task::spawn_blocking(move || {
            let now = m.sample();
            (now, m.over(now))
        })
        .await
        else {
            continue;
        };
        if let Some(t) = tracker {
            t.update(now.disk.beyond(meter.base).bytes);
        }
        if let Some(over) = over {
            return limit_of(over);
        }
        pause = DISK_POLL.max(started.elapsed() * 10);
    }
}

fn limit_of(over: Over) -> LimitHit {
    match over {
        Over::Disk => LimitHit::Disk,
        Over::Files => LimitHit::Files,
        Over::Memory => LimitHit::Memory,
    }
}

/// A result file bigger than this is cut.
const MAX_RESULT: u64 = 4 * 1024 * 1024;

/// Reads the agent's result file, never through a link: an agent that
/// swaps it for a link to some other file gets an error, not that file.
fn read_result_file(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => "the agent's result file is a symbolic link; baton does not follow it".to_string(),
                _ => "the agent wrote no result file".to_string(),
            },
        )?;
    let meta = file.metadata().map_err(|_| "the result file could not be read".to_string())?;
    if !meta.is_file() {
        return Err("the agent's result file is not a regular file".into());
    }
    let mut text = String::new();
    file.take(MAX_RESULT)
        .read_to_string(&mut text)
        .map_err(|_| "the agent's result file is not UTF-8 text".to_string())?;
    Ok(text.trim().to_string())
}

/// Writes each (path under `dir`, text) as a new file only its owner reads.
fn write_private(dir: &Path, files: &[(String, String)]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    for (name, text) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
        f.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// Where `program` is: a path (relative to `workdir`), or found on `path`.
pub(super) fn resolve_program(program: &str, path: &std::ffi::OsStr, workdir: &Path) -> Option<PathBuf> {
    use crate::sandbox::is_executable;
    if program.contains('/') {
        let p = workdir.join(program);
        return is_executable(&p).then_some(p);
    }
    std::env::split_paths(path).map(|d| d.join(program)).find(|p| is_executable(p))
}

pub(crate) fn describe_exit(code: Option<i32>) -> String {
    match code {
        Some(c) => format!("status {c}"),
        None => "a signal".into(),
    }
}

/// `field` of the JSON object on stdout: the whole output, or else its last
/// line that parses (CLIs may print progress before the final object).
fn json_field(stdout: &str, field: &str) -> Result<String, String> {
    let parsed = serde_json::from_str::<serde_json::Value>(stdout.trim()).ok().or_else(|| {
        stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok().filter(|v| v.is_object()))
    });
    let Some(value) = parsed else {
        return Err("the agent printed no JSON object".into());
    };
    match value.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.trim().to_string()),
        Some(serde_json::Value::Null) | None => Err(format!("the agent's JSON output has no `{field}`")),
        Some(other) => Ok(other.to_string()),
    }
}

struct CappedLog {
    file: tokio::fs::File,
    left: u64,
    cut: bool,
    /// The most recent output, whether or not the cap was reached.
    tail: Vec<u8>,
}

const TAIL_BYTES: usize = 8 * 1024;

/// Copies a pipe into the log (up to the cap) and, for stdout, into memory
/// (up to the cap as well).
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    log: std::sync::Arc<tokio::sync::Mutex<CappedLog>>,
    keep: bool,
) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut log = log.lock().await;
        log.tail.extend_from_slice(&buf[..n]);
        if log.tail.len() > TAIL_BYTES {
            let excess = log.tail.len() - TAIL_BYTES;
            log.tail.drain(..excess);
        }
        if log.left > 0 {
            let take = (n as u64).min(log.left) as usize;
            let _ = log.file.write_all(&buf[..take]).await;
            log.left -= take as u64;
            if keep {
                kept.extend_from_slice(&buf[..take]);
            }
        }
        if log.left == 0 && !log.cut {
            log.cut = true;
            let _ = log.file.write_all(b"\n[baton] output cap reached: the rest of the output is not kept\n").await;
        }
    }
    kept
}

async fn drain(mut reader: tokio::task::JoinHandle<Vec<u8>>) -> Vec<u8> {
    match tokio::time::timeout(KILL_GRACE, &mut reader).await {
        Ok(out) => out.unwrap_or_default(),
        Err(_) => {
            reader.abort();
            Vec::new()
        }
    }
}

/// Who a process is, across pid reuse: its start time (clock ticks after
/// boot) and the boot it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ProcessIdentity {
    pub(crate) pgid: i32,
    pub(crate) start_ticks: Option<u64>,
    pub(crate) boot_id: Option<String>,
}

use crate::sandbox::leftovers::{boot_id, start_ticks};

impl ProcessIdentity {
    pub fn of(pgid: i32) -> ProcessIdentity {
        ProcessIdentity { pgid, start_ticks: start_ticks(pgid), boot_id: boot_id() }
    }

    /// Kills the group a previous daemon left behind, if it is still the
    /// same one: same boot, and its leader (when alive) started when recorded.
    pub(crate) fn kill_leftover(&self) -> bool {
        if self.boot_id.is_none() || self.boot_id != boot_id() || !group_alive(self.pgid) {
            return false;
        }
        if let Some(now) = start_ticks(self.pgid) {
            if Some(now) != self.start_ticks {
                return false; // the pid belongs to someone else now
            }
        }
        kill_group(self.pgid, libc::SIGKILL)
    }
}

/// Sends `signal` to every process in the group.
pub(crate) fn kill_group(pgid: i32, signal: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory
    // is involved.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// Whether any process of the group is still alive.
pub(crate) fn group_alive(pgid: i32) -> bool {
    pgid > 1 && unsafe { libc::kill(-pgid, 0) == 0 }
}

/// SIGTERM, a grace period for the leader to exit, then SIGKILL for all.
async fn terminate_group(pgid: i32, child: &mut tokio::process::Child) {
    kill_group(pgid, libc::SIGTERM);
    let _ = tokio::time::timeout(KILL_GRACE, child.wait()).await;
    kill_group(pgid, libc::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_reads_whole_output_or_last_object_line() {
        assert_eq!(json_field(r#"{"result":"done"}"#, "result"), Ok("done".into()));
        assert_eq!(json_field("progress...\n{\"result\": \"ok\"}\n", "result"), Ok("ok".into()));
        assert!(json_field("nothing here", "result").is_err());
        assert!(json_field(r#"{"other":1}"#, "result").is_err());
    }
}
