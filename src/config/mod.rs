//! `baton.toml`: the file model, built-in defaults, agent presets and secret
//! references (`env:NAME`, `file:PATH`).
//!
//! Loading resolves everything the daemon needs up front (paths made absolute
//! against the config file's folder, secrets read, agents merged over their
//! presets), so a bad value is a `path:line:col` error at start and never a
//! surprise at 3 a.m. This module does no network IO.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

mod agents;
mod mcp;

use crate::diag::Diagnostic;
use agents::{merge_agent, RawAgent};
pub use agents::{presets, AgentDef, Preset, PromptMode, ResultMode, UsageFormat};
pub use mcp::{McpServer, McpTransport, McpValue, TEAM_SERVER};

/// Webhook secrets shorter than this get a warning.
const MIN_SECRET_LEN: usize = 16;

/// The file `baton serve` reads when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "baton.toml";

/// A resolved configuration: every path absolute, every secret read.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from; `None` when running on built-in defaults.
    pub file: Option<PathBuf>,
    pub triggers_dir: PathBuf,
    pub server: Server,
    pub storage: Storage,
    pub github: Github,
    pub limits: Limits,
    pub agents: BTreeMap<String, AgentDef>,
    pub sources: BTreeMap<String, Source>,
    /// `[notify.NAME]`: where job ends are announced.
    pub notify: BTreeMap<String, NotifyTarget>,
    /// `[mcp.NAME]`: tool servers a trigger may give its agent.
    pub mcp: BTreeMap<String, McpServer>,
    /// `[prices."MODEL"]`: what a model costs, for CLIs that report tokens
    /// but no cost.
    pub prices: BTreeMap<String, Price>,
    pub sandbox: SandboxSettings,
    /// `[api]`: jobs created through `POST /api/jobs`.
    pub api: ApiSettings,
    /// Files secrets were read from (`file:`): hidden from agents.
    pub secret_files: Vec<PathBuf>,
    /// Variables secrets were read from (`env:`): erased once loaded.
    pub secret_vars: Vec<String>,
}

/// `[api]`: what `POST /api/jobs` may create besides `on = ["api"]`
/// triggers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// A job with no trigger: agent, repository, prompt and output given in
    /// the request.
    #[serde(default)]
    pub allow_adhoc: bool,
    /// The agents such a job may run.
    #[serde(default)]
    pub agents: Vec<String>,
}

/// `[sandbox]`.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Whether agents run sandboxed; off only on purpose.
    pub enabled: bool,
    /// How memory and process caps are enforced.
    pub caps: crate::sandbox::CapsBy,
    /// Who agents run as (`[sandbox] user` when the daemon is root).
    pub run_as: crate::sandbox::RunAs,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub api_token: Option<Secret>,
    /// Requests handled at once; beyond it, 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Unverified webhook body bytes held at once; beyond it, 503.
    pub max_buffered_bytes: usize,
    /// Live log streams (SSE) at once; beyond it, 503.
    pub max_streams: usize,
    /// A signed body already received under another delivery id (within
    /// `storage.delivery_retention`) is answered as a duplicate.
    pub reject_replays: bool,
    /// Time a client has to send its headers, and then its body.
    pub read_timeout: Duration,
    /// On SIGTERM, how long running jobs may take to finish before they are
    /// stopped (and resumed at the next start).
    pub shutdown_grace: Duration,
    /// Where people reach the dashboard, for links in status comments.
    pub public_url: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Storage {
    pub path: PathBuf,
    pub durability: Durability,
    /// How long delivery ids are kept for duplicate detection.
    pub delivery_retention: Duration,
    /// Finished worktrees kept for reuse, across repositories (0: none).
    pub worktree_pool: usize,
    /// How often mirrors are garbage-collected.
    pub gc_interval: Duration,
    /// Finished jobs, their folders and logs are pruned after this.
    pub job_retention: Duration,
    /// The database: sled in `path` (one replica), or PostgreSQL.
    pub backend: Backend,
    /// PostgreSQL's URL (a secret: it may carry a password).
    pub url: Option<Secret>,
    /// The PostgreSQL schema baton's tables live in (created if missing).
    pub schema: Option<String>,
    /// This replica's name in the database: what it runs and sends is
    /// marked with it. Default: the host name and the storage folder.
    pub replica: String,
    /// Below this much free space in the storage folder no agent starts.
    pub min_free: u64,
    /// The longest a daemon-side git command on a work tree or baton's own
    /// repository may take (network commands get at least 15 minutes).
    pub git_timeout: Duration,
}

/// What "durable" means for an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync before anything is acknowledged (the default).
    #[default]
    Fsync,
    /// Leave writing back to the operating system: faster, but an
    /// acknowledged delivery can be lost if the machine (not just baton)
    /// crashes. Unsafe; for throwaway setups only.
    Os,
}

/// `[storage] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sled,
    Postgres,
}

/// `[prices."MODEL"]`, in US dollars per million tokens. baton ships no
/// prices (they would go stale): only the mechanism.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Cached input; the input price when not given.
    pub cached_per_mtok: Option<f64>,
}

/// `[notify.NAME]`: a place told when a job ends.
#[derive(Debug, Clone)]
pub struct NotifyTarget {
    pub name: String,
    pub kind: NotifyKind,
    /// Where to POST (a Slack incoming-webhook URL is itself a secret).
    pub url: Secret,
    /// `webhook`: the key the body is signed with (`X-Baton-Signature-256`).
    pub secret: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyKind {
    /// Any URL: baton's JSON, signed with HMAC-SHA256.
    Webhook,
    /// A Slack incoming webhook: a Block Kit message.
    Slack,
}

/// A generic webhook source: `POST /webhooks/NAME`.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub secret: Secret,
    /// Carries `sha256=<hex HMAC of the body>`.
    pub signature_header: String,
    /// Carries the delivery id; without it the id is a hash of the body.
    pub delivery_header: Option<String>,
    /// Dotted path of the field whose value is the event's action.
    pub action_field: Option<String>,
    /// Dotted path of the field naming the repository (`owner/name`).
    pub repo_field: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Github {
    pub api_url: String,
    pub git_url: String,
    /// `None` until `serve` generates one under the storage folder.
    pub webhook_secret: Option<Secret>,
    pub token: Option<Secret>,
    pub app_id: Option<u64>,
    pub private_key: Option<Secret>,
    pub bot_login: String,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_parallel_jobs: usize,
    pub max_parallel_per_repo: usize,
    /// How many job ends in a row may start jobs (investigate → fix → review).
    pub max_chain_depth: u32,
    /// How long a claim on a running job holds unless its worker renews it
    /// (every third of it): a replica that dies has its jobs taken back by
    /// the others this long after.
    pub job_lease: Duration,
    /// What all agents, and each repository's, may spend in a rolling day
    /// (US dollars); a match over it is skipped.
    pub daily_budget_usd: Option<f64>,
    pub daily_budget_per_repo_usd: Option<f64>,
}

/// A secret value. Its only accessor says what it does; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A duration written the way people write them: `90s`, `30m`, `2h`, `1h30m`
/// (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty duration".into());
        }
        let mut total = 0u64;
        let mut digits = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                _ => return Err(format!("invalid duration `{s}`: unknown unit `{c}` (use s, m, h or d)")),
            };
            let n: u64 =
                digits.parse().map_err(|_| format!("invalid duration `{s}`: a number must come before `{c}`"))?;
            total = total.saturating_add(n.saturating_mul(unit));
            digits.clear();
        }
        if !digits.is_empty() {
            if total != 0 {
                return Err(format!("invalid duration `{s}`: the last number has no unit"));
            }
            total = digits.parse().map_err(|_| format!("invalid duration `{s}`"))?;
        }
        if total == 0 {
            return Err(format!("invalid duration `{s}`: must be more than zero"));
        }
        Ok(Duration::from_secs(total))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Secs(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        HumanDuration::parse(&text).map(HumanDuration).map_err(serde::de::Error::custom)
    }
}

/// Renders a duration compactly for messages: `30m`, `1h30m`, `45s`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        if secs == 0 && d.as_millis() > 0 {
            return format!("{}ms", d.as_millis());
        }
        out.push_str(&format!("{s}s"));
    }
    out
}

// ---- the file model -------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    triggers: Option<Spanned<String>>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    storage: RawStorage,
    #[serde(default)]
    github: RawGithub,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    agents: BTreeMap<String, Spanned<RawAgent>>,
    #[serde(default)]
    sources: BTreeMap<String, Spanned<RawSource>>,
    #[serde(default)]
    notify: BTreeMap<String, Spanned<RawNotify>>,
    #[serde(default)]
    mcp: BTreeMap<String, Spanned<mcp::RawMcp>>,
    #[serde(default)]
    prices: BTreeMap<String, Spanned<Price>>,
    #[serde(default)]
    sandbox: RawSandbox,
    api: Option<Spanned<ApiSettings>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    kind: NotifyKind,
    url: Spanned<String>,
    secret: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    enabled: Option<bool>,
    #[serde(default)]
    caps: crate::sandbox::CapsBy,
    user: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    secret: Spanned<String>,
    signature_header: Option<String>,
    delivery_header: Option<String>,
    action_field: Option<String>,
    repo_field: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<u64>>,
    api_token: Option<Spanned<String>>,
    max_in_flight: Option<Spanned<usize>>,
    max_buffered_bytes: Option<Spanned<u64>>,
    max_streams: Option<Spanned<usize>>,
    reject_replays: Option<bool>,
    read_timeout: Option<HumanDuration>,
    shutdown_grace: Option<HumanDuration>,
    public_url: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<String>,
    #[serde(default)]
    durability: Durability,
    delivery_retention: Option<HumanDuration>,
    worktree_pool: Option<usize>,
    gc_interval: Option<HumanDuration>,
    job_retention: Option<HumanDuration>,
    backend: Option<Spanned<Backend>>,
    url: Option<Spanned<String>>,
    schema: Option<String>,
    replica: Option<String>,
    min_free: Option<Spanned<String>>,
    git_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGithub {
    api_url: Option<Spanned<String>>,
    git_url: Option<Spanned<String>>,
    webhook_secret: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    app_id: Option<u64>,
    private_key: Option<Spanned<String>>,
    bot_login: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_parallel_jobs: Option<Spanned<usize>>,
    max_parallel_per_repo: Option<Spanned<usize>>,
    max_chain_depth: Option<u32>,
    job_lease: Option<HumanDuration>,
    daily_budget_usd: Option<Spanned<f64>>,
    daily_budget_per_repo_usd: Option<Spanned<f64>>,
}

impl Config {
    /// Loads `path`, or `./baton.toml` when it exists, or the built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Config, Vec<Diagnostic>> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => {
                let default = cwd.join(DEFAULT_CONFIG_FILE);
                default.exists().then_some(default)
            }
        };
        match path {
            None => Config::from_source(None, "", &cwd),
            Some(path) => {
                let source = std::fs::read_to_string(&path)
                    .map_err(|e| vec![Diagnostic::file(&path, format!("cannot read config: {e}"))])?;
                let path = absolute(&cwd, &path);
                let base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| cwd.clone());
                Config::from_source(Some(&path), &source, &base)
            }
        }
    }

    /// Parses config text; `base` is the folder relative paths resolve against.
    pub fn from_source(path: Option<&Path>, source: &str, base: &Path) -> Result<Config, Vec<Diagnostic>> {
        let shown = path.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("<built-in defaults>"));
        let raw: RawConfig = toml::from_str(source).map_err(|e| vec![Diagnostic::from_toml(&shown, source, &e)])?;
        let mut errors = Vec::new();
        let at = |span: std::ops::Range<usize>, msg: String| Diagnostic::at(&shown, source, Some(span), msg);

        let listen = match &raw.server.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 8787)),
            Some(s) => match s.get_ref().parse() {
                Ok(addr) => addr,
                Err(_) => {
                    errors.push(at(
                        s.span(),
                        format!("invalid listen address `{}`: expected IP:PORT, e.g. 127.0.0.1:8787", s.get_ref()),
                    ));
                    SocketAddr::from(([127, 0, 0, 1], 8787))
                }
            },
        };
        let max_body_bytes = match &raw.server.max_body_bytes {
            None => 25 * 1024 * 1024,
            Some(n) if *n.get_ref() == 0 => {
                errors.push(at(n.span(), "max_body_bytes must be more than zero".into()));
                1
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
        };

        let mut secret_files = Vec::new();
        let mut secret_vars = Vec::new();
        let mut secret = |field: &Option<Spanned<String>>, implicit_env: Option<&str>| -> Option<Secret> {
            if let Some(file) = field.as_ref().and_then(|s| s.get_ref().strip_prefix("file:")) {
                secret_files.push(absolute(base, Path::new(file)));
            }
            if let Some(var) = field.as_ref().and_then(|s| s.get_ref().strip_prefix("env:")) {
                secret_vars.push(var.to_string());
            }
            match field {
                Some(s) => match resolve_secret(s.get_ref(), base) {
                    Ok(v) => Some(v),
                    Err(msg) => {
                        errors.push(at(s.span(), msg));
                        None
                    }
                },
                // Only when the key is absent: a variable named by the user
                // that is unset is an error, an implicit one is simply absent.
                None => {
                    implicit_env.and_then(|name| std::env::var(name).ok()).filter(|v| !v.is_empty()).map(Secret::new)
                }
            }
        };
        let api_token = secret(&raw.server.api_token, None);
        let webhook_secret = secret(&raw.github.webhook_secret, Some("GITHUB_WEBHOOK_SECRET"));
        let token = secret(&raw.github.token, Some("GITHUB_TOKEN"));
        let private_key = secret(&raw.github.private_key, None);
        let database_url = secret(&raw.storage.url, None);
        let backend = raw.storage.backend.as_ref().map(|b| *b.get_ref()).unwrap_or_default();
        if let (Backend::Postgres, None, Some(b)) = (backend, &raw.storage.url, &raw.storage.backend) {
            errors.push(at(
                b.span(),
                "storage.backend = \"postgres\" needs storage.url, e.g. url = \"env:DATABASE_URL\"".to_string(),
            ));
        }

        let url = |field: &Option<Spanned<String>>, default: &str, errors: &mut Vec<Diagnostic>| -> String {
            match field {
                None => default.to_string(),
                Some(s) => {
                    let v = s.get_ref().trim_end_matches('/');
                    if !(v.starts_with("http://") || v.starts_with("https://") || v.starts_with("file://")) {
                        errors.push(at(s.span(), format!("invalid URL `{v}`: expected http://, https:// or file://")));
                    }
                    v.to_string()
                }
            }
        };
        let api_url = url(&raw.github.api_url, "https://api.github.com", &mut errors);
        let public_url = raw.server.public_url.as_ref().map(|_| url(&raw.server.public_url, "", &mut errors));
        let git_url = url(&raw.github.git_url, "https://github.com", &mut errors);

        let positive = |field: &Option<Spanned<usize>>, default: usize, errors: &mut Vec<Diagnostic>| match field {
            None => default,
            Some(n) if *n.get_ref() == 0 => {
                errors.push(at(n.span(), "must be at least 1".into()));
                default
            }
            Some(n) => *n.get_ref(),
        };
        // A budget in US dollars: positive, or an error where it is written.
        let amount = |v: &Option<Spanned<f64>>, key: &str, errors: &mut Vec<Diagnostic>| {
            let v = v.as_ref()?;
            if v.get_ref().is_finite() && *v.get_ref() > 0.0 {
                Some(*v.get_ref())
            } else {
                errors.push(at(v.span(), format!("{key} must be a positive amount of US dollars")));
                None
            }
        };
        let max_in_flight = positive(&raw.server.max_in_flight, 512, &mut errors);
        let max_streams = positive(&raw.server.max_streams, 64, &mut errors);
        let max_buffered_bytes = match &raw.server.max_buffered_bytes {
            None => (64usize << 20).max(max_body_bytes),
            Some(n) if (*n.get_ref() as usize) < max_body_bytes => {
                errors.push(at(
                    n.span(),
                    format!("max_buffered_bytes must be at least max_body_bytes ({max_body_bytes}), or no delivery that large could ever be received"),
                ));
                max_body_bytes
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
        };
        let limits = Limits {
            max_parallel_jobs: positive(&raw.limits.max_parallel_jobs, 4, &mut errors),
            max_parallel_per_repo: positive(&raw.limits.max_parallel_per_repo, 2, &mut errors),
            max_chain_depth: raw.limits.max_chain_depth.unwrap_or(3),
            job_lease: raw.limits.job_lease.map(|d| d.0).filter(|d| !d.is_zero()).unwrap_or(Duration::from_secs(60)),
            daily_budget_usd: amount(&raw.limits.daily_budget_usd, "limits.daily_budget_usd", &mut errors),
            daily_budget_per_repo_usd: amount(
                &raw.limits.daily_budget_per_repo_usd,
                "limits.daily_budget_per_repo_usd",
                &mut errors,
            ),
        };

        let sandboxed = raw.sandbox.enabled.unwrap_or(true);
        let mut agents = presets(sandboxed);
        for (name, spanned) in &raw.agents {
            // Each bad network entry is reported where it is.
            let entries = spanned.get_ref().network.iter().flatten();
            let bad: Vec<Diagnostic> = entries
                .filter_map(|e| {
                    crate::sandbox::egress::HostRule::parse(e.get_ref())
                        .err()
                        .map(|msg| at(e.span(), format!("agents.{name}.network: {msg}")))
                })
                .collect();
            if !bad.is_empty() {
                errors.extend(bad);
                continue;
            }
            match merge_agent(name, spanned.get_ref(), sandboxed, base) {
                Ok(def) => {
                    agents.insert(name.clone(), def);
                }
                Err(msg) => errors.push(at(spanned.span(), format!("agents.{name}: {msg}"))),
            }
        }

        let mut sources = BTreeMap::new();
        for (name, spanned) in &raw.sources {
            let raw_source = spanned.get_ref();
            if name == "github"
                || name == "api"
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                errors.push(at(
                    spanned.span(),
                    format!("sources.{name}: a source name is letters, digits, `-` and `_`, and not `github` or `api`"),
                ));
                continue;
            }
            if let Some(file) = raw_source.secret.get_ref().strip_prefix("file:") {
                secret_files.push(absolute(base, Path::new(file)));
            }
            if let Some(var) = raw_source.secret.get_ref().strip_prefix("env:") {
                secret_vars.push(var.to_string());
            }
            match resolve_secret(raw_source.secret.get_ref(), base) {
                Ok(secret) => {
                    sources.insert(
                        name.clone(),
                        Source {
                            name: name.clone(),
                            secret,
                            signature_header: raw_source
                                .signature_header
                                .clone()
                                .unwrap_or_else(|| "X-Signature-256".into()),
                            delivery_header: raw_source.delivery_header.clone(),
                            action_field: raw_source.action_field.clone(),
                            repo_field: raw_source.repo_field.clone(),
                        },
                    );
                }
                Err(msg) => errors.push(at(raw_source.secret.span(), msg)),
            }
        }

        let mut notify = BTreeMap::new();
        for (name, spanned) in &raw.notify {
            let target = spanned.get_ref();
            let mut resolve = |value: &Spanned<String>| {
                let v = value.get_ref();
                if let Some(file) = v.strip_prefix("file:") {
                    secret_files.push(absolute(base, Path::new(file)));
                }
                if let Some(var) = v.strip_prefix("env:") {
                    secret_vars.push(var.to_string());
                }
                resolve_secret(v, base).map_err(|msg| at(value.span(), format!("notify.{name}: {msg}")))
            };
            let url = resolve(&target.url);
            let secret = target.secret.as_ref().map(&mut resolve).transpose();
            let (url, secret) = match (url, secret) {
                (Ok(url), Ok(secret)) => (url, secret),
                (url, secret) => {
                    errors.extend(url.err().into_iter().chain(secret.err()));
                    continue;
                }
            };
            if !url.expose().starts_with("https://") && !url.expose().starts_with("http://") {
                errors.push(at(target.url.span(), format!("notify.{name}: the url must be http:// or https://")));
                continue;
            }
            if target.kind == NotifyKind::Webhook && secret.is_none() {
                errors.push(at(
                    spanned.span(),
                    format!(
                        "notify.{name}: a webhook target signs its body: give `secret` (e.g. \"env:NOTIFY_SECRET\")"
                    ),
                ));
                continue;
            }
            notify.insert(name.clone(), NotifyTarget { name: name.clone(), kind: target.kind, url, secret });
        }

        let mut mcp = BTreeMap::new();
        for (name, spanned) in &raw.mcp {
            let mut sources = mcp::SecretSources::default();
            match mcp::load(name, spanned, base, &mut sources) {
                Ok(server) => {
                    mcp.insert(name.clone(), server);
                }
                Err(errs) => errors.extend(errs.into_iter().map(|e| at(e.span, e.message))),
            }
            secret_files.extend(sources.files);
            secret_vars.extend(sources.vars);
        }

        let mut prices = BTreeMap::new();
        for (model, spanned) in &raw.prices {
            let p = spanned.get_ref();
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            if !(ok(p.input_per_mtok) && ok(p.output_per_mtok) && p.cached_per_mtok.is_none_or(ok)) {
                errors.push(at(spanned.span(), format!("prices.\"{model}\": prices are amounts of 0 or more")));
                continue;
            }
            prices.insert(model.clone(), p.clone());
        }

        for (api, name) in raw.api.iter().flat_map(|a| a.get_ref().agents.iter().map(move |n| (a, n))) {
            if !agents.contains_key(name) {
                let known: Vec<&str> = agents.keys().map(String::as_str).collect();
                errors.push(at(
                    api.span(),
                    format!("api.agents: unknown agent `{name}`; defined agents: {}", known.join(", ")),
                ));
            }
        }

        let triggers_dir = base.join(raw.triggers.as_ref().map(|t| t.get_ref().as_str()).unwrap_or("triggers"));
        let storage = base.join(raw.storage.path.as_deref().unwrap_or(".baton"));

        let run_as = crate::sandbox::RunAs::resolve(
            raw.sandbox.user.as_ref().map(|u| u.get_ref().as_str()),
            crate::sandbox::RunAs::daemon_euid(),
        )
        .unwrap_or_else(|e| {
            errors.push(at(raw.sandbox.user.as_ref().map(|u| u.span()).unwrap_or(0..0), e));
            crate::sandbox::RunAs { uid: 65534, gid: 65534, name: None, switched: true }
        });
        let min_free = match &raw.storage.min_free {
            None => 2 << 30,
            Some(v) => crate::sandbox::parse_bytes(v.get_ref()).unwrap_or_else(|e| {
                errors.push(at(v.span(), format!("storage.min_free: {e}")));
                0
            }),
        };

        if !listen.ip().is_loopback() && api_token.is_none() && raw.server.api_token.is_none() {
            let span = raw.server.listen.as_ref().map(|s| s.span()).unwrap_or(0..0);
            errors.push(at(
                span,
                format!(
                    "listening on {listen} (not loopback) needs an API token: set server.api_token, \
                     e.g. api_token = \"env:BATON_API_TOKEN\""
                ),
            ));
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        // A short HMAC key can be guessed offline from one signed delivery.
        let short = webhook_secret
            .iter()
            .map(|s| ("github.webhook_secret".to_string(), s))
            .chain(sources.iter().map(|(name, src)| (format!("sources.{name}.secret"), &src.secret)));
        for (key, secret) in short {
            if secret.expose().len() < MIN_SECRET_LEN {
                tracing::warn!(key = %key, "This webhook secret is shorter than {MIN_SECRET_LEN} bytes; use a long random one (e.g. `openssl rand -hex 32`).");
            }
        }
        Ok(Config {
            file: path.map(Path::to_path_buf),
            triggers_dir,
            server: Server {
                listen,
                max_body_bytes,
                api_token,
                max_in_flight,
                max_buffered_bytes,
                max_streams,
                reject_replays: raw.server.reject_replays.unwrap_or(true),
                read_timeout: raw.server.read_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
                shutdown_grace: raw.server.shutdown_grace.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
                public_url,
            },
            storage: Storage {
                durability: raw.storage.durability,
                delivery_retention: raw
                    .storage
                    .delivery_retention
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_secs(7 * 24 * 3600)),
                worktree_pool: raw.storage.worktree_pool.unwrap_or(4),
                gc_interval: raw.storage.gc_interval.map(|d| d.0).unwrap_or(Duration::from_secs(24 * 3600)),
                job_retention: raw.storage.job_retention.map(|d| d.0).unwrap_or(Duration::from_secs(30 * 24 * 3600)),
                replica: raw.storage.replica.clone().unwrap_or_else(|| default_replica(&storage)),
                path: storage,
                backend,
                url: database_url,
                schema: raw.storage.schema.clone(),
                min_free,
                git_timeout: raw.storage.git_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(60)),
            },
            github: Github {
                api_url,
                git_url,
                webhook_secret,
                token,
                app_id: raw.github.app_id.filter(|id| *id != 0),
                private_key,
                bot_login: raw.github.bot_login.unwrap_or_else(|| "baton[bot]".to_string()),
            },
            limits,
            agents,
            sources,
            notify,
            mcp,
            prices,
            sandbox: SandboxSettings { enabled: sandboxed, caps: raw.sandbox.caps, run_as },
            api: raw.api.as_ref().map(|a| a.get_ref().clone()).unwrap_or_default(),
            secret_files,
            secret_vars,
        })
    }

    /// baton's own paths, which no agent may see: the storage folder (store,
    /// mirrors, other jobs, the generated webhook secret), the config file
    /// and its folder, the trigger folder, and files secrets came from.
    pub fn hidden_paths(&self) -> Vec<PathBuf> {
        let mut out = vec![self.storage.path.clone(), self.triggers_dir.clone()];
        if let Some(file) = &self.file {
            out.push(file.clone());
            // Its folder holds the triggers, env files and keys, usually;
            // not when it is a system folder everything needs (`/etc`).
            if let Some(dir) = file.parent().filter(|d| d.components().count() > 2) {
                out.push(dir.to_path_buf());
            }
        }
        out.extend(self.secret_files.iter().cloned());
        out
    }

    /// Every configured secret value, so output can be scrubbed of them.
    pub fn secrets(&self) -> Vec<Secret> {
        [&self.server.api_token, &self.github.webhook_secret, &self.github.token, &self.github.private_key]
            .into_iter()
            .flatten()
            .cloned()
            .chain(self.sources.values().map(|s| s.secret.clone()))
            .chain(self.notify.values().flat_map(|n| [Some(n.url.clone()), n.secret.clone()]).flatten())
            .chain(self.mcp.values().flat_map(|m| m.secrets().cloned()))
            .chain(self.storage.url.clone())
            .chain(self.storage.url.as_ref().and_then(|u| database_password(u.expose())).map(Secret::new))
            .collect()
    }
}

fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    }
}

/// The password in a database URL (`scheme://user:PASSWORD@host/…`), if any.
fn database_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let credentials = rest.rsplit_once('@')?.0;
    let password = credentials.split_once(':')?.1;
    (!password.is_empty()).then(|| password.to_string())
}

/// A replica's default name: this host, and a hash of its storage folder
/// (two replicas on one host keep apart; a restart keeps its name).
fn default_replica(storage: &Path) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "baton".to_string()
    };
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(storage.to_string_lossy().as_bytes());
    format!("{host}-{}", hex::encode(&hash[..4]))
}

/// `env:NAME` reads a variable, `file:PATH` a file (relative to the config's
/// folder, trailing newline dropped); anything else is the value itself.
fn resolve_secret(value: &str, base: &Path) -> Result<Secret, String> {
    if let Some(name) = value.strip_prefix("env:") {
        return match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
            _ => Err(format!("environment variable {name} is not set")),
        };
    }
    if let Some(file) = value.strip_prefix("file:") {
        let path = absolute(base, Path::new(file));
        return match std::fs::read_to_string(&path) {
            Ok(v) if v.trim().is_empty() => Err(format!("secret file {} is empty", path.display())),
            Ok(v) => Ok(Secret::new(v.trim_end_matches(['\n', '\r']).to_string())),
            Err(e) => Err(format!("cannot read secret file {}: {e}", path.display())),
        };
    }
    if value.is_empty() {
        return Err("empty secret".into());
    }
    Ok(Secret::new(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(src: &str) -> Result<Config, Vec<Diagnostic>> {
        Config::from_source(Some(Path::new("/etc/baton/baton.toml")), src, Path::new("/etc/baton"))
    }

    fn first_error(src: &str) -> String {
        load(src).unwrap_err()[0].to_string()
    }

    #[test]
    fn a_database_url_and_its_password_are_secrets() {
        std::env::set_var("BATON_TEST_DB_URL_FOR_SECRETS", "postgres://baton:pa55word@db:5432/baton");
        let c = Config::from_source(
            None,
            "[storage]\nbackend = \"postgres\"\nurl = \"env:BATON_TEST_DB_URL_FOR_SECRETS\"\n",
            Path::new("/"),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let secrets: Vec<String> = c.secrets().iter().map(|s| s.expose().to_string()).collect();
        assert!(secrets.contains(&"postgres://baton:pa55word@db:5432/baton".to_string()), "{secrets:?}");
        assert!(secrets.contains(&"pa55word".to_string()));
        assert_eq!(database_password("postgres://db/baton"), None);
        assert!(c.secret_vars.contains(&"BATON_TEST_DB_URL_FOR_SECRETS".to_string()));
    }

    #[test]
    fn defaults_serve_on_loopback() {
        let c = load("").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.server.max_body_bytes, 26_214_400);
        assert_eq!(c.storage.path, Path::new("/etc/baton/.baton"));
        assert_eq!(c.triggers_dir, Path::new("/etc/baton/triggers"));
        assert_eq!(c.limits.max_parallel_jobs, 4);
        assert_eq!(c.github.bot_login, "baton[bot]");
        assert!(c.agents.contains_key("codex") && c.agents.contains_key("aider"));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let c = load("triggers = \"rules\"\n[storage]\npath = \"/var/lib/baton\"\n").unwrap();
        assert_eq!(c.triggers_dir, Path::new("/etc/baton/rules"));
        assert_eq!(c.storage.path, Path::new("/var/lib/baton"));
    }

    #[test]
    fn unknown_key_points_at_line_and_column() {
        let err = first_error("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n");
        assert!(err.starts_with("/etc/baton/baton.toml:3:1: "), "{err}");
        assert!(err.contains("did you mean `listen`"), "{err}");
    }

    #[test]
    fn bad_values_are_reported_where_they_are() {
        let err = first_error("[server]\nlisten = \"nowhere\"\n");
        assert!(err.starts_with("/etc/baton/baton.toml:2:10: invalid listen address"), "{err}");
        let err = first_error("[limits]\nmax_parallel_jobs = \"four\"\n");
        assert!(err.starts_with("/etc/baton/baton.toml:2:21: "), "{err}");
        let err = first_error("[agents.x]\ncommand = [\"x\"]\ntimeout = \"5 parsecs\"\n");
        assert!(err.contains(":3:11: ") && err.contains("invalid duration"), "{err}");
    }

    #[test]
    fn env_secret_that_is_unset_is_an_error_naming_the_variable() {
        let err = first_error("[github]\ntoken = \"env:BATON_TEST_SURELY_UNSET\"\n");
        assert!(err.contains(":2:9: environment variable BATON_TEST_SURELY_UNSET is not set"), "{err}");
    }

    #[test]
    fn an_empty_secret_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let err = Config::from_source(None, "[github]\nwebhook_secret = \"file:empty\"\n", dir.path()).unwrap_err();
        assert!(
            err[0].to_string().contains(":2:18: secret file") && err[0].to_string().contains("is empty"),
            "{}",
            err[0]
        );
        let src = "[sources.ci]\nsecret = \"file:empty\"\n";
        assert!(Config::from_source(None, src, dir.path()).unwrap_err()[0].to_string().contains("is empty"));
    }

    #[test]
    fn file_secret_is_read_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "s3cr3t\n").unwrap();
        let c = Config::from_source(None, "[github]\ntoken = \"file:tok\"\n", dir.path()).unwrap();
        let token = c.github.token.unwrap();
        assert_eq!(token.expose(), "s3cr3t");
        assert_eq!(format!("{token:?}"), "Secret(***)");
    }

    #[test]
    fn non_loopback_listen_needs_an_api_token() {
        let err = first_error("[server]\nlisten = \"0.0.0.0:8787\"\n");
        assert!(err.contains("server.api_token"), "{err}");
        assert!(load("[server]\nlisten = \"0.0.0.0:8787\"\napi_token = \"t\"\n").is_ok());
    }

    #[test]
    fn agent_keys_replace_the_preset_and_keep_the_rest() {
        let c = load("[agents.claude]\ntimeout = \"5m\"\nenv = [\"X\"]\n").unwrap();
        let a = &c.agents["claude"];
        assert_eq!(a.timeout, Duration::from_secs(300));
        assert_eq!(a.env, vec!["X".to_string()]);
        assert_eq!(a.command[0], "claude");
        let err = first_error("[agents.mine]\nprompt = \"arg\"\n");
        assert!(err.contains("agents.mine: `command` is required"), "{err}");
        let err = first_error("[agents.mine]\ncommand = [\"x\"]\nprompt = \"arg\"\n");
        assert!(err.contains("{{ prompt }}"), "{err}");
    }

    #[test]
    fn durations_parse_like_people_write_them() {
        assert_eq!(HumanDuration::parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(HumanDuration::parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(HumanDuration::parse("45").unwrap(), Duration::from_secs(45));
        assert!(HumanDuration::parse("0s").is_err());
        assert!(HumanDuration::parse("3w").is_err());
        assert!(HumanDuration::parse("1h30").is_err());
        assert_eq!(format_duration(Duration::from_secs(1800)), "30m");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }
}
