//! Reading `baton.toml`: the file model as serde reads it (unknown keys
//! are errors), and the checks that turn it into a `Config`, each error at
//! the `path:line:col` of what was written.

use super::*;

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
    gitlab: Option<Spanned<RawGitlab>>,
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
    environments: BTreeMap<String, Spanned<environments::RawEnvironment>>,
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
    max_mcp_sessions: Option<Spanned<usize>>,
    mcp_session_idle: Option<HumanDuration>,
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
    cache_retention: Option<HumanDuration>,
    cache_max: Option<Spanned<String>>,
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
struct RawGitlab {
    url: Option<Spanned<String>>,
    api_url: Option<Spanned<String>>,
    git_url: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    webhook_secret: Option<Spanned<String>>,
    signing_token: Option<Spanned<String>>,
    bot_username: Option<String>,
    /// The project hook's id, for catch-up through its event list.
    hook_id: Option<u64>,
    /// The projects catch-up watches: a path (its hook is `hook_id`), or
    /// `{ path = "…", hook_id = N }` for a project with a hook of its own.
    #[serde(default)]
    projects: Vec<Spanned<RawWatched>>,
}

/// One entry of `gitlab.projects`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawWatched {
    Path(String),
    Hooked(RawHooked),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHooked {
    path: String,
    hook_id: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_parallel_jobs: Option<Spanned<usize>>,
    max_parallel_per_repo: Option<Spanned<usize>>,
    max_chain_depth: Option<u32>,
    job_lease: Option<HumanDuration>,
    held_for: Option<HumanDuration>,
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

    /// Only the storage folder a config names (default `.baton` beside it),
    /// for commands that read local files and need none of its secrets.
    pub fn storage_folder(path: Option<&Path>) -> Result<PathBuf, Vec<Diagnostic>> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let path = path.map(Path::to_path_buf).unwrap_or_else(|| cwd.join(DEFAULT_CONFIG_FILE));
        let (source, base) = match std::fs::read_to_string(&path) {
            Ok(s) => {
                let path = absolute(&cwd, &path);
                (s, path.parent().map(Path::to_path_buf).unwrap_or_else(|| cwd.clone()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), cwd.clone()),
            Err(e) => return Err(vec![Diagnostic::file(&path, format!("cannot read config: {e}"))]),
        };
        #[derive(Deserialize)]
        struct Only {
            #[serde(default)]
            storage: OnlyStorage,
        }
        #[derive(Default, Deserialize)]
        struct OnlyStorage {
            path: Option<String>,
        }
        let only: Only = toml::from_str(&source).map_err(|e| vec![Diagnostic::from_toml(&path, &source, &e)])?;
        Ok(base.join(only.storage.path.as_deref().unwrap_or(".baton")))
    }

    /// Parses config text; `base` is the folder relative paths resolve against.
    pub fn from_source(path: Option<&Path>, source: &str, base: &Path) -> Result<Config, Vec<Diagnostic>> {
        let shown = path.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("<built-in defaults>"));
        let raw: RawConfig = toml::from_str(source).map_err(|e| vec![Diagnostic::from_toml(&shown, source, &e)])?;
        let mut r = Reader {
            shown: &shown,
            source,
            base,
            errors: Vec::new(),
            secret_files: Vec::new(),
            secret_vars: Vec::new(),
        };
        let server = r.server(&raw.server);
        let github = r.github(&raw.github);
        let gitlab = raw.gitlab.as_ref().map(|g| r.gitlab(g));
        let storage = r.storage(&raw.storage);
        let limits = r.limits(&raw.limits);
        let sandbox = r.sandbox(&raw.sandbox);
        let agents = r.agents(&raw.agents, sandbox.enabled);
        let sources = r.sources(&raw.sources);
        let notify = r.notify(&raw.notify);
        let mcp = r.mcp(&raw.mcp);
        let prices = r.prices(&raw.prices);
        let environments = r.environments(&raw.environments);
        r.api_agents(raw.api.as_ref(), &agents);
        let Reader { mut errors, secret_files, secret_vars, .. } = r;
        if !errors.is_empty() {
            // In the order a reader of the file meets them.
            errors.sort_by_key(|d| (d.line, d.col));
            return Err(errors);
        }
        // A short HMAC key can be guessed offline from one signed delivery.
        let short = github
            .webhook_secret
            .iter()
            .map(|s| ("github.webhook_secret".to_string(), s))
            .chain(gitlab.iter().map(|g| ("gitlab.webhook_secret".to_string(), &g.webhook_secret)))
            .chain(sources.iter().map(|(name, src)| (format!("sources.{name}.secret"), &src.secret)));
        for (key, secret) in short {
            if secret.expose().len() < MIN_SECRET_LEN {
                tracing::warn!(key = %key, "This webhook secret is shorter than {MIN_SECRET_LEN} bytes; use a long random one (e.g. `openssl rand -hex 32`).");
            }
        }
        Ok(Config {
            file: path.map(Path::to_path_buf),
            triggers_dir: base.join(raw.triggers.as_ref().map(|t| t.get_ref().as_str()).unwrap_or("triggers")),
            server,
            storage,
            github,
            gitlab,
            limits,
            agents,
            sources,
            notify,
            mcp,
            prices,
            environments,
            sandbox,
            api: raw.api.as_ref().map(|a| a.get_ref().clone()).unwrap_or_default(),
            secret_files,
            secret_vars,
        })
    }
}

/// Reading one `baton.toml`, a section at a time: the problems found (each
/// at its `path:line:col`), and the secret files and variables it names,
/// which agents must never see.
struct Reader<'a> {
    shown: &'a Path,
    source: &'a str,
    base: &'a Path,
    errors: Vec<Diagnostic>,
    secret_files: Vec<PathBuf>,
    secret_vars: Vec<String>,
}

impl Reader<'_> {
    fn at(&self, span: std::ops::Range<usize>, msg: String) -> Diagnostic {
        Diagnostic::at(self.shown, self.source, Some(span), msg)
    }

    fn error(&mut self, span: std::ops::Range<usize>, msg: String) {
        let d = self.at(span, msg);
        self.errors.push(d);
    }

    /// A secret's value (`file:`, `env:` or literal), noting where it comes
    /// from.
    fn resolve(&mut self, value: &str) -> Result<Secret, String> {
        if let Some(file) = value.strip_prefix("file:") {
            self.secret_files.push(absolute(self.base, Path::new(file)));
        }
        if let Some(var) = value.strip_prefix("env:") {
            self.secret_vars.push(var.to_string());
        }
        resolve_secret(value, self.base)
    }

    fn secret(&mut self, field: &Option<Spanned<String>>, implicit_env: Option<&str>) -> Option<Secret> {
        match field {
            Some(s) => match self.resolve(s.get_ref()) {
                Ok(v) => Some(v),
                Err(msg) => {
                    self.error(s.span(), msg);
                    None
                }
            },
            // Only when the key is absent: a variable named by the user
            // that is unset is an error, an implicit one is simply absent.
            None => implicit_env.and_then(|name| std::env::var(name).ok()).filter(|v| !v.is_empty()).map(Secret::new),
        }
    }

    fn url(&mut self, field: &Option<Spanned<String>>, default: &str) -> String {
        match field {
            None => default.to_string(),
            Some(s) => {
                let v = s.get_ref().trim_end_matches('/');
                if !(v.starts_with("http://") || v.starts_with("https://") || v.starts_with("file://")) {
                    self.error(s.span(), format!("invalid URL `{v}`: expected http://, https:// or file://"));
                }
                v.to_string()
            }
        }
    }

    fn positive(&mut self, field: &Option<Spanned<usize>>, key: &str, default: usize) -> usize {
        match field {
            None => default,
            Some(n) if *n.get_ref() == 0 => {
                self.error(n.span(), format!("{key} must be at least 1"));
                default
            }
            Some(n) => *n.get_ref(),
        }
    }

    /// A budget in US dollars: positive, or an error where it is written.
    fn amount(&mut self, v: &Option<Spanned<f64>>, key: &str) -> Option<f64> {
        let v = v.as_ref()?;
        if v.get_ref().is_finite() && *v.get_ref() > 0.0 {
            Some(*v.get_ref())
        } else {
            self.error(v.span(), format!("{key} must be a positive amount of US dollars"));
            None
        }
    }

    fn server(&mut self, raw: &RawServer) -> Server {
        let listen = match &raw.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 8787)),
            Some(s) => match s.get_ref().parse() {
                Ok(addr) => addr,
                Err(_) => {
                    self.error(
                        s.span(),
                        format!("invalid listen address `{}`: expected IP:PORT, e.g. 127.0.0.1:8787", s.get_ref()),
                    );
                    SocketAddr::from(([127, 0, 0, 1], 8787))
                }
            },
        };
        let max_body_bytes = match &raw.max_body_bytes {
            None => 25 * 1024 * 1024,
            Some(n) if *n.get_ref() == 0 => {
                self.error(n.span(), "server.max_body_bytes must be more than zero".into());
                1
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
        };
        let api_token = self.secret(&raw.api_token, None);
        if !listen.ip().is_loopback() && api_token.is_none() && raw.api_token.is_none() {
            let span = raw.listen.as_ref().map(|s| s.span()).unwrap_or(0..0);
            self.error(
                span,
                format!(
                    "listening on {listen} (not loopback) needs an API token: set server.api_token, \
                     e.g. api_token = \"env:BATON_API_TOKEN\""
                ),
            );
        }
        let public_url = raw.public_url.as_ref().map(|_| self.url(&raw.public_url, ""));
        let max_buffered_bytes = match &raw.max_buffered_bytes {
            None => (64usize << 20).max(max_body_bytes),
            Some(n) if (*n.get_ref() as usize) < max_body_bytes => {
                self.error(
                    n.span(),
                    format!("max_buffered_bytes must be at least max_body_bytes ({max_body_bytes}), or no delivery that large could ever be received"),
                );
                max_body_bytes
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(usize::MAX),
        };
        Server {
            listen,
            max_body_bytes,
            api_token,
            max_in_flight: self.positive(&raw.max_in_flight, "server.max_in_flight", 512),
            max_buffered_bytes,
            max_streams: self.positive(&raw.max_streams, "server.max_streams", 64),
            max_mcp_sessions: self.positive(&raw.max_mcp_sessions, "server.max_mcp_sessions", 64),
            mcp_session_idle: raw.mcp_session_idle.map(|d| d.0).unwrap_or(Duration::from_secs(30 * 60)),
            reject_replays: raw.reject_replays.unwrap_or(true),
            read_timeout: raw.read_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
            shutdown_grace: raw.shutdown_grace.map(|d| d.0).unwrap_or(Duration::from_secs(30)),
            public_url,
        }
    }

    fn github(&mut self, raw: &RawGithub) -> GitHubSettings {
        GitHubSettings {
            webhook_secret: self.secret(&raw.webhook_secret, Some("GITHUB_WEBHOOK_SECRET")),
            token: self.secret(&raw.token, Some("GITHUB_TOKEN")),
            private_key: self.secret(&raw.private_key, None),
            api_url: self.url(&raw.api_url, "https://api.github.com"),
            git_url: self.url(&raw.git_url, "https://github.com"),
            app_id: raw.app_id.filter(|id| *id != 0),
            bot_login: raw.bot_login.clone().unwrap_or_else(|| "baton[bot]".to_string()),
        }
    }

    /// `[gitlab]`: `url` is the instance (a self-managed one may live under a
    /// path); the API and git URLs derive from it unless given.
    fn gitlab(&mut self, raw: &Spanned<RawGitlab>) -> GitLabSettings {
        let (span, raw) = (raw.span(), raw.get_ref());
        let url = self.url(&raw.url, "https://gitlab.com");
        let mut need = |what: &Option<Spanned<String>>, key: &str, hint: &str| {
            let secret = self.secret(what, None);
            // A value given but unreadable is reported where it is, once.
            if what.is_none() {
                self.error(span.clone(), format!("[gitlab] needs `{key}`: {hint}"));
            }
            secret.unwrap_or_else(|| Secret::new(""))
        };
        let token = need(
            &raw.token,
            "token",
            "a project, group or personal access token with the `api` and `write_repository` scopes, e.g. \
             token = \"env:GITLAB_TOKEN\"",
        );
        let webhook_secret = need(
            &raw.webhook_secret,
            "webhook_secret",
            "the \"Secret token\" of the project's webhook, e.g. webhook_secret = \"env:GITLAB_WEBHOOK_SECRET\"",
        );
        GitLabSettings {
            api_url: self.url(&raw.api_url, &format!("{url}/api/v4")),
            git_url: self.url(&raw.git_url, &url),
            url,
            token,
            webhook_secret,
            signing_token: self.secret(&raw.signing_token, None),
            bot_username: raw.bot_username.clone(),
            hook_id: raw.hook_id,
            projects: self.watched(raw),
        }
    }

    /// `gitlab.projects`, each with the hook whose events catch-up reads: a
    /// project hook belongs to one project, so a project without a
    /// `hook_id` of its own needs `gitlab.hook_id`.
    fn watched(&mut self, raw: &RawGitlab) -> Vec<WatchedProject> {
        let mut out: Vec<WatchedProject> = Vec::new();
        for entry in &raw.projects {
            let (path, hook_id) = match entry.get_ref() {
                RawWatched::Path(path) => (path, raw.hook_id),
                RawWatched::Hooked(RawHooked { path, hook_id }) => (path, Some(*hook_id)),
            };
            let path = path.trim().trim_matches('/');
            if path.is_empty() || !path.contains('/') || path.chars().any(|c| c.is_whitespace() || c == ':') {
                self.error(
                    entry.span(),
                    format!("gitlab.projects: `{path}` is not a project's full path, e.g. \"group/sub/project\""),
                );
                continue;
            }
            let Some(hook_id) = hook_id.filter(|id| *id != 0) else {
                self.error(
                    entry.span(),
                    format!(
                        "gitlab.projects: `{path}` needs the id of its webhook: set gitlab.hook_id, or write \
                         {{ path = \"{path}\", hook_id = N }}"
                    ),
                );
                continue;
            };
            if out.iter().any(|w| w.path == path) {
                self.error(entry.span(), format!("gitlab.projects: `{path}` is listed twice"));
                continue;
            }
            out.push(WatchedProject { path: path.to_string(), hook_id });
        }
        out
    }

    fn storage(&mut self, raw: &RawStorage) -> Storage {
        let url = self.secret(&raw.url, None);
        let path = self.base.join(raw.path.as_deref().unwrap_or(".baton"));
        let backend = raw.backend.as_ref().map(|b| *b.get_ref()).unwrap_or_else(|| Backend::found_in(&path));
        if let (Backend::Postgres, None, Some(b)) = (backend, &raw.url, &raw.backend) {
            self.error(
                b.span(),
                "storage.backend = \"postgres\" needs storage.url, e.g. url = \"env:DATABASE_URL\"".to_string(),
            );
        }
        let min_free = match &raw.min_free {
            None => 2 << 30,
            Some(v) => crate::sandbox::parse_bytes(v.get_ref()).unwrap_or_else(|e| {
                self.error(v.span(), format!("storage.min_free: {e}"));
                0
            }),
        };
        let cache_max = match &raw.cache_max {
            None => 20 << 30,
            Some(v) => crate::sandbox::parse_bytes(v.get_ref()).unwrap_or_else(|e| {
                self.error(v.span(), format!("storage.cache_max: {e}"));
                0
            }),
        };
        Storage {
            cache_retention: raw.cache_retention.map(|d| d.0).unwrap_or(Duration::from_secs(7 * 24 * 3600)),
            cache_max,
            durability: raw.durability,
            delivery_retention: raw.delivery_retention.map(|d| d.0).unwrap_or(Duration::from_secs(7 * 24 * 3600)),
            worktree_pool: raw.worktree_pool.unwrap_or(4),
            gc_interval: raw.gc_interval.map(|d| d.0).unwrap_or(Duration::from_secs(24 * 3600)),
            job_retention: raw.job_retention.map(|d| d.0).unwrap_or(Duration::from_secs(30 * 24 * 3600)),
            replica: raw.replica.clone().unwrap_or_else(|| default_replica(&path)),
            path,
            backend,
            url,
            schema: raw.schema.clone(),
            min_free,
            git_timeout: raw.git_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(60)),
        }
    }

    fn limits(&mut self, raw: &RawLimits) -> LimitSettings {
        LimitSettings {
            max_parallel_jobs: self.positive(&raw.max_parallel_jobs, "limits.max_parallel_jobs", 4),
            max_parallel_per_repo: self.positive(&raw.max_parallel_per_repo, "limits.max_parallel_per_repo", 2),
            max_chain_depth: raw.max_chain_depth.unwrap_or(3),
            job_lease: raw.job_lease.map(|d| d.0).filter(|d| !d.is_zero()).unwrap_or(Duration::from_secs(60)),
            held_for: raw.held_for.map(|d| d.0).unwrap_or(Duration::from_secs(14 * 24 * 3600)),
            daily_budget_usd: self.amount(&raw.daily_budget_usd, "limits.daily_budget_usd"),
            daily_budget_per_repo_usd: self.amount(&raw.daily_budget_per_repo_usd, "limits.daily_budget_per_repo_usd"),
        }
    }

    fn sandbox(&mut self, raw: &RawSandbox) -> SandboxSettings {
        let run_as = crate::sandbox::RunAs::resolve(
            raw.user.as_ref().map(|u| u.get_ref().as_str()),
            crate::sandbox::RunAs::daemon_euid(),
        )
        .unwrap_or_else(|e| {
            self.error(raw.user.as_ref().map(|u| u.span()).unwrap_or(0..0), e);
            crate::sandbox::RunAs { uid: 65534, gid: 65534, name: None, switched: true }
        });
        SandboxSettings { enabled: raw.enabled.unwrap_or(true), caps: raw.caps, run_as }
    }

    /// The presets, with `[agents.*]` over them.
    fn agents(&mut self, raw: &BTreeMap<String, Spanned<RawAgent>>, sandboxed: bool) -> BTreeMap<String, AgentDef> {
        let mut agents = presets(sandboxed);
        for (name, spanned) in raw {
            // Each bad network entry is reported where it is.
            let entries = spanned.get_ref().network.iter().flatten();
            let bad: Vec<Diagnostic> = entries
                .filter_map(|e| {
                    crate::sandbox::egress::HostRule::parse(e.get_ref())
                        .err()
                        .map(|msg| self.at(e.span(), format!("agents.{name}.network: {msg}")))
                })
                .collect();
            if !bad.is_empty() {
                self.errors.extend(bad);
                continue;
            }
            match merge_agent(name, spanned.get_ref(), sandboxed, self.base) {
                Ok(def) => {
                    agents.insert(name.clone(), def);
                }
                Err(msg) => self.error(spanned.span(), format!("agents.{name}: {msg}")),
            }
        }
        agents
    }

    fn sources(&mut self, raw: &BTreeMap<String, Spanned<RawSource>>) -> BTreeMap<String, SourceSettings> {
        let mut sources = BTreeMap::new();
        for (name, spanned) in raw {
            let raw_source = spanned.get_ref();
            if ["github", "gitlab", "api", "schedule", "baton"].contains(&name.as_str())
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                self.error(
                    spanned.span(),
                    format!("sources.{name}: a source name is letters, digits, `-` and `_`, and not `github`, `gitlab`, `api`, `schedule` or `baton`"),
                );
                continue;
            }
            match self.resolve(raw_source.secret.get_ref()) {
                Ok(secret) => {
                    let source = SourceSettings {
                        name: name.clone(),
                        secret,
                        signature_header: raw_source
                            .signature_header
                            .clone()
                            .unwrap_or_else(|| "X-Signature-256".into()),
                        delivery_header: raw_source.delivery_header.clone(),
                        action_field: raw_source.action_field.clone(),
                        repo_field: raw_source.repo_field.clone(),
                    };
                    sources.insert(name.clone(), source);
                }
                Err(msg) => self.error(raw_source.secret.span(), msg),
            }
        }
        sources
    }

    fn notify(&mut self, raw: &BTreeMap<String, Spanned<RawNotify>>) -> BTreeMap<String, NotifyTarget> {
        let mut notify = BTreeMap::new();
        for (name, spanned) in raw {
            let target = spanned.get_ref();
            let mut resolve = |value: &Spanned<String>| {
                self.resolve(value.get_ref()).map_err(|msg| self.at(value.span(), format!("notify.{name}: {msg}")))
            };
            let url = resolve(&target.url);
            let secret = target.secret.as_ref().map(&mut resolve).transpose();
            let (url, secret) = match (url, secret) {
                (Ok(url), Ok(secret)) => (url, secret),
                (url, secret) => {
                    self.errors.extend(url.err().into_iter().chain(secret.err()));
                    continue;
                }
            };
            if !url.expose().starts_with("https://") && !url.expose().starts_with("http://") {
                self.error(target.url.span(), format!("notify.{name}: the url must be http:// or https://"));
                continue;
            }
            if target.kind == NotifyKind::Webhook && secret.is_none() {
                self.error(
                    spanned.span(),
                    format!(
                        "notify.{name}: a webhook target signs its body: give `secret` (e.g. \"env:NOTIFY_SECRET\")"
                    ),
                );
                continue;
            }
            notify.insert(name.clone(), NotifyTarget { name: name.clone(), kind: target.kind, url, secret });
        }
        notify
    }

    fn mcp(&mut self, raw: &BTreeMap<String, Spanned<mcp::RawMcp>>) -> BTreeMap<String, McpServer> {
        let mut servers = BTreeMap::new();
        for (name, spanned) in raw {
            let mut sources = mcp::SecretSources::default();
            match mcp::load(name, spanned, self.base, &mut sources) {
                Ok(server) => {
                    servers.insert(name.clone(), server);
                }
                Err(errs) => {
                    let found: Vec<Diagnostic> = errs.into_iter().map(|e| self.at(e.span, e.message)).collect();
                    self.errors.extend(found);
                }
            }
            self.secret_files.extend(sources.files);
            self.secret_vars.extend(sources.vars);
        }
        servers
    }

    fn environments(
        &mut self,
        raw: &BTreeMap<String, Spanned<environments::RawEnvironment>>,
    ) -> BTreeMap<String, Environment> {
        let mut out = BTreeMap::new();
        for (name, spanned) in raw {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                self.error(spanned.span(), format!("environments.{name}: a name is letters, digits, `-` and `_`"));
                continue;
            }
            let base = self.base.to_path_buf();
            let resolved = environments::resolve(name, spanned.get_ref(), &base, &mut |v| self.resolve(v));
            match resolved {
                Ok(env) => {
                    out.insert(name.clone(), env);
                }
                Err(problems) => {
                    for (span, msg) in problems {
                        self.error(span, msg);
                    }
                }
            }
        }
        out
    }

    fn prices(&mut self, raw: &BTreeMap<String, Spanned<Price>>) -> BTreeMap<String, Price> {
        let mut prices = BTreeMap::new();
        for (model, spanned) in raw {
            let p = spanned.get_ref();
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            if !(ok(p.input_per_mtok) && ok(p.output_per_mtok) && p.cached_per_mtok.is_none_or(ok)) {
                self.error(spanned.span(), format!("prices.\"{model}\": prices are amounts of 0 or more"));
                continue;
            }
            prices.insert(model.clone(), p.clone());
        }
        prices
    }

    /// `[api] agents` names only agents that are defined.
    fn api_agents(&mut self, api: Option<&Spanned<ApiSettings>>, agents: &BTreeMap<String, AgentDef>) {
        for (api, name) in api.iter().flat_map(|a| a.get_ref().agents.iter().map(move |n| (a, n))) {
            if !agents.contains_key(name) {
                let known: Vec<&str> = agents.keys().map(String::as_str).collect();
                self.error(
                    api.span(),
                    format!("api.agents: unknown agent `{name}`; defined agents: {}", known.join(", ")),
                );
            }
        }
    }
}

pub(super) fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    }
}

/// The password in a database URL (`scheme://user:PASSWORD@host/…`), if any.
pub(super) fn database_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let credentials = rest.rsplit_once('@')?.0;
    let password = credentials.split_once(':')?.1;
    (!password.is_empty()).then(|| password.to_string())
}

/// A replica's default name: this host, and a hash of its storage folder
/// (two replicas on one host keep apart; a restart keeps its name).
pub(super) fn default_replica(storage: &Path) -> String {
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
pub(super) fn resolve_secret(value: &str, base: &Path) -> Result<Secret, String> {
    if let Some(name) = value.strip_prefix("env:") {
        return match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
            _ => Err(format!(
                "environment variable {name} is not set: set it where baton starts, or put the value in a file \
                 and write `file:PATH`"
            )),
        };
    }
    if let Some(file) = value.strip_prefix("file:") {
        let path = absolute(base, Path::new(file));
        return match std::fs::read_to_string(&path) {
            Ok(v) if v.trim().is_empty() => {
                Err(format!("secret file {} is empty: write the secret into it", path.display()))
            }
            Ok(v) => Ok(Secret::new(v.trim_end_matches(['\n', '\r']).to_string())),
            Err(e) => Err(format!("cannot read secret file {}: {e}", path.display())),
        };
    }
    if value.is_empty() {
        return Err("empty secret".into());
    }
    Ok(Secret::new(value.to_string()))
}
