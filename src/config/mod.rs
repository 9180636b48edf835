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
mod environments;
mod load;
mod mcp;

use crate::diag::Diagnostic;
use agents::{merge_agent, RawAgent};
pub use agents::{presets, AgentDef, PromptMode, ResultMode};
pub use agents::{Preset, UsageFormat};
pub use environments::{Environment, REPO_SETUP};
use load::*;
pub use mcp::{McpServer, McpTransport, McpValue, TEAM_SERVER};

/// Webhook secrets shorter than this get a warning.
const MIN_SECRET_LEN: usize = 16;

/// The file `baton serve` reads when `--config` is not given.
pub(crate) const DEFAULT_CONFIG_FILE: &str = "baton.toml";

/// A resolved configuration: every path absolute, every secret read.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from; `None` when running on built-in defaults.
    pub file: Option<PathBuf>,
    pub triggers_dir: PathBuf,
    pub server: Server,
    pub storage: Storage,
    pub github: GitHubSettings,
    /// `[gitlab]`, when the daemon serves a GitLab instance too.
    pub gitlab: Option<GitLabSettings>,
    pub limits: LimitSettings,
    pub agents: BTreeMap<String, AgentDef>,
    pub sources: BTreeMap<String, SourceSettings>,
    /// `[notify.NAME]`: where job ends are announced.
    pub notify: BTreeMap<String, NotifyTarget>,
    /// `[mcp.NAME]`: tool servers a trigger may give its agent.
    pub mcp: BTreeMap<String, McpServer>,
    /// `[environments.NAME]`: setup phases and their caches.
    pub environments: BTreeMap<String, Environment>,
    /// `[prices."MODEL"]`: what a model costs, for CLIs that report tokens
    /// but no cost.
    pub prices: BTreeMap<String, Price>,
    pub sandbox: SandboxSettings,
    /// `[api]`: jobs created through `POST /api/jobs`.
    pub api: ApiSettings,
    /// Files secrets were read from (`file:`): hidden from agents.
    pub(crate) secret_files: Vec<PathBuf>,
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
    /// `/mcp` sessions open at once; beyond it, a new one is refused (503).
    pub max_mcp_sessions: usize,
    /// A `/mcp` session unused this long is closed.
    pub mcp_session_idle: Duration,
    /// A signed body already received under another delivery id (within
    /// `storage.delivery_retention`) is answered as a duplicate.
    pub(crate) reject_replays: bool,
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
    pub(crate) durability: Durability,
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
    /// Environment caches unused this long are removed.
    pub cache_retention: Duration,
    /// Past this many bytes of environment caches, the least recently used
    /// are removed.
    pub cache_max: u64,
}

/// What "durable" means for an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync before anything is acknowledged (the default).
    #[default]
    Fsync,
    /// Answer without waiting for the disk, and write back about once a
    /// second: faster, but a crash can lose the last second of acknowledged
    /// deliveries. Unsafe; for throwaway setups only.
    Os,
}

/// `[storage] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded, the default: one file, `PATH/baton.redb`.
    #[default]
    Redb,
    /// Embedded, as stores made before redb (`PATH/db/`); see `baton
    /// migrate --from sled`.
    Sled,
    Postgres,
}

impl Backend {
    /// The embedded engine when `[storage] backend` is not given: redb,
    /// unless `path` holds a sled store and no redb one (a store made
    /// before redb keeps working until `baton migrate --from sled`).
    pub fn found_in(path: &std::path::Path) -> Backend {
        let sled = path.join("db").join("db").exists();
        let redb = path.join("baton.redb").exists();
        if sled && !redb {
            Backend::Sled
        } else {
            Backend::Redb
        }
    }
}

/// `[prices."MODEL"]`, in US dollars per million tokens. baton ships no
/// prices (they would go stale): only the mechanism.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Cached input; the input price when not given.
    pub(crate) cached_per_mtok: Option<f64>,
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
pub struct SourceSettings {
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
pub struct GitHubSettings {
    pub api_url: String,
    pub git_url: String,
    /// `None` until `serve` generates one under the storage folder.
    pub webhook_secret: Option<Secret>,
    pub token: Option<Secret>,
    pub app_id: Option<u64>,
    pub private_key: Option<Secret>,
    pub bot_login: String,
}

/// `[gitlab]`: one GitLab instance (gitlab.com or self-managed).
#[derive(Debug, Clone)]
pub struct GitLabSettings {
    /// The instance, e.g. `https://gitlab.example.com/gitlab`.
    pub url: String,
    /// `{url}/api/v4` unless set.
    pub api_url: String,
    /// `{url}` unless set: clone URLs are `{git_url}/{path}.git`.
    pub git_url: String,
    /// A project, group or personal access token (`api`, `write_repository`).
    pub token: Secret,
    /// The hook's secret token (`X-Gitlab-Token`).
    pub webhook_secret: Secret,
    /// The hook's signing token: when set, every delivery must be signed
    /// (`webhook-signature`, Standard Webhooks).
    pub signing_token: Option<Secret>,
    /// Who baton posts as; asked of GitLab (`GET /user`) when unset.
    pub bot_username: Option<String>,
    /// The project hook's id: catch-up reads its event list.
    pub hook_id: Option<u64>,
    /// `gitlab.projects`: the projects catch-up watches, each with its
    /// hook. Empty: catch-up is off.
    pub projects: Vec<WatchedProject>,
}

/// A project whose hook's event list catch-up reads (`GET
/// /projects/:id/hooks/:hook_id/events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedProject {
    /// Its full path, `group/sub/project`.
    pub path: String,
    /// Its webhook's id (a project hook belongs to one project).
    pub hook_id: u64,
}

#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub max_parallel_jobs: usize,
    pub max_parallel_per_repo: usize,
    /// How many job ends in a row may start jobs (investigate → fix → review).
    pub max_chain_depth: u32,
    /// How long a claim on a running job holds unless its worker renews it
    /// (every third of it): a replica that dies has its jobs taken back by
    /// the others this long after.
    pub job_lease: Duration,
    /// How long a job held for `/baton approve` waits before it expires
    /// (its issue or pull request is told, once).
    pub held_for: Duration,
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

    pub(crate) fn expose(&self) -> &str {
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
pub(crate) struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty duration: expected a number and a unit, e.g. 30s, 15m, 2h or 14d".into());
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
            let n: u64 = digits.parse().map_err(|_| {
                format!("invalid duration `{s}`: expected a number and a unit, e.g. 30s, 15m, 2h or 14d")
            })?;
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
pub(crate) fn format_duration(d: Duration) -> String {
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

impl Config {
    /// The environment a job gets: its trigger's, else the first whose
    /// `repos` match its repository.
    pub fn environment_for(&self, named: Option<&str>, repo: Option<&str>) -> Option<&Environment> {
        match named {
            Some(name) => self.environments.get(name),
            None => {
                let repo = repo?;
                self.environments.values().find(|e| e.repos.iter().any(|p| p.matches(repo)))
            }
        }
    }

    /// baton's own paths, which no agent may see: the storage folder (store,
    /// mirrors, other jobs, the generated webhook secret), the config file
    /// and its folder, the trigger folder, and files secrets came from.
    pub(crate) fn hidden_paths(&self) -> Vec<PathBuf> {
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
            .chain(
                self.gitlab
                    .iter()
                    .flat_map(|g| [Some(g.token.clone()), Some(g.webhook_secret.clone()), g.signing_token.clone()])
                    .flatten(),
            )
            .chain(self.sources.values().map(|s| s.secret.clone()))
            .chain(self.notify.values().flat_map(|n| [Some(n.url.clone()), n.secret.clone()]).flatten())
            .chain(self.mcp.values().flat_map(|m| m.secrets().cloned()))
            .chain(self.environments.values().flat_map(|e| e.setup_env.values().cloned()))
            .chain(self.storage.url.clone())
            .chain(self.storage.url.as_ref().and_then(|u| database_password(u.expose())).map(Secret::new))
            .collect()
    }
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
    fn gitlab_derives_its_urls_from_the_instance_and_needs_its_keys() {
        let c =
            load("[gitlab]\nurl = \"https://git.example.com/gitlab/\"\ntoken = \"glpat-x\"\nwebhook_secret = \"w\"\n")
                .unwrap();
        let g = c.gitlab.as_ref().unwrap();
        assert_eq!(g.api_url, "https://git.example.com/gitlab/api/v4");
        assert_eq!(g.git_url, "https://git.example.com/gitlab");
        assert!(c.secrets().iter().any(|s| s.expose() == "glpat-x"), "the token is redacted everywhere");
        let c = load("[gitlab]\ntoken = \"t\"\nwebhook_secret = \"w\"\n").unwrap();
        assert_eq!(c.gitlab.unwrap().api_url, "https://gitlab.com/api/v4");
        let errors = load("[gitlab]\ntoken = \"t\"\n").unwrap_err();
        let shown: Vec<String> = errors.iter().map(|d| d.to_string()).collect();
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(shown[0].starts_with("/etc/baton/baton.toml:1:1: [gitlab] needs `webhook_secret`"), "{shown:?}");
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

    #[test]
    fn gitlab_projects_name_the_hook_catch_up_reads() {
        let base = "[gitlab]\ntoken = \"glpat-x\"\nwebhook_secret = \"a-long-enough-secret-for-tests\"\n";
        let c = load(&format!(
            "{base}hook_id = 12\nprojects = [\"group/sub/app\", {{ path = \"group/lib\", hook_id = 31 }}]\n"
        ))
        .unwrap_or_else(|e| panic!("{e:?}"));
        let watched = &c.gitlab.as_ref().unwrap().projects;
        assert_eq!(
            watched,
            &[
                WatchedProject { path: "group/sub/app".into(), hook_id: 12 },
                WatchedProject { path: "group/lib".into(), hook_id: 31 }
            ]
        );
        assert!(load(base).unwrap().gitlab.unwrap().projects.is_empty(), "catch-up is off unless asked for");
        let err = first_error(&format!("{base}projects = [\"group/app\"]\n"));
        assert!(err.contains(":4:13:") && err.contains("set gitlab.hook_id"), "{err}");
        let err = first_error(&format!("{base}hook_id = 3\nprojects = [\"app\"]\n"));
        assert!(err.contains("not a project's full path"), "{err}");
        let err = first_error(&format!("{base}hook_id = 3\nprojects = [\"g/app\", \"g/app/\"]\n"));
        assert!(err.contains("listed twice"), "{err}");
    }
}
