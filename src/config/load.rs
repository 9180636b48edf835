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
        let limits = LimitSettings {
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
                        SourceSettings {
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
            github: GitHubSettings {
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
