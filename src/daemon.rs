//! `baton serve`: wires store, rules, engine, publisher and HTTP together and
//! runs them until the shutdown token fires.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Secret};
use crate::diag::Diagnostic;
use crate::engine::Engine;
use crate::forge::github::Client;
use crate::forge::gitlab::api::Client as GitLabClient;
use crate::publish::Publisher;
use crate::rules::{RuleSet, SharedRules};
use crate::store::{Store, StoreError};
use crate::{api, ingress};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("trigger files have errors:\n{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Triggers(Vec<Diagnostic>),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("webhook secret at {path}: {source}")]
    Secret { path: std::path::PathBuf, source: std::io::Error },
    #[error("GitHub client: {0}")]
    GitHub(#[from] crate::forge::github::auth::AuthError),
    #[error("server error: {0}")]
    Server(std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// The sandbox agents run in, or `None` (with a loud warning) when the
/// config turned it off.
pub fn sandbox(config: &Config) -> Result<Option<Arc<crate::sandbox::Sandbox>>, crate::sandbox::SandboxError> {
    if !config.sandbox.enabled {
        tracing::warn!(
            "THE AGENT SANDBOX IS OFF ([sandbox] enabled = false): agents run with the daemon's own authority and \
             can read its token, its store and every other job. Turn it back on unless this machine runs nothing else."
        );
        return Ok(None);
    }
    crate::sandbox::Sandbox::new(crate::sandbox::Settings {
        hidden: config.hidden_paths(),
        caps: config.sandbox.caps,
        run_as: config.sandbox.run_as.clone(),
        records: config.storage.path.join("sandboxes"),
    })
    .map(|s| Some(Arc::new(s)))
}

/// Runs the daemon on an already bound listener (tests bind port 0).
pub async fn serve(
    mut config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let sandbox = sandbox(&config)?;
    let store = Store::connect(&crate::store::Location::of(&config), &config.storage.path).await?;
    if config.github.webhook_secret.is_none() {
        config.github.webhook_secret = Some(generated_secret(&config.storage.path)?);
    }
    let gitlab = config.gitlab.as_ref().map(|g| Arc::new(GitLabClient::new(&g.api_url, g.token.clone())));
    if let (Some(settings), Some(client)) = (config.gitlab.as_mut(), &gitlab) {
        resolve_gitlab_bot(settings, client).await;
    }
    let (rules, errors) = RuleSet::load(&config.triggers_dir, &config);
    if !errors.is_empty() {
        return Err(ServeError::Triggers(errors));
    }
    if !config.triggers_dir.exists() {
        tracing::warn!(folder = %config.triggers_dir.display(), "Trigger folder does not exist; no event will start a job.");
    }
    tracing::info!(triggers = rules.triggers().len(), folder = %config.triggers_dir.display(), "Triggers loaded.");
    let rules = SharedRules::new(rules, crate::rules::fingerprint(&config.triggers_dir));

    let credentials = crate::forge::github::auth::Credentials::from_config(&config.github)?.map(Arc::new);
    match &credentials {
        Some(c) if c.is_app() => tracing::info!(app_id = config.github.app_id, "Publishing as a GitHub App."),
        Some(_) => tracing::info!("Publishing with github.token."),
        None => tracing::warn!(
            "Publishing is off: no GitHub credentials (set github.token, or GITHUB_TOKEN, or github.app_id and github.private_key). Results stay on each job."
        ),
    }
    let metrics: Arc<crate::metrics::Metrics> = Arc::default();
    let github = credentials.clone().map(|c| {
        let metrics = metrics.clone();
        Client::new(&config.github.api_url, c, Some(Arc::new(move |left| metrics.rate_limit_remaining(left))))
    });
    let config = Arc::new(config);
    let wake = Arc::new(Notify::new());
    let publish_wake = Arc::new(Notify::new());
    let addr = listener.local_addr().map_err(ServeError::Server)?;
    let engine = Arc::new(
        Engine::new(
            store.clone(),
            rules.clone(),
            config.clone(),
            wake.clone(),
            publish_wake.clone(),
            credentials.clone(),
            metrics.clone(),
        )
        .with_gitlab_from(config.gitlab.as_ref(), gitlab.clone())
        .with_outbox(Arc::new(crate::publish::plan::Planner {
            publishing: credentials.is_some(),
            gitlab: gitlab.is_some(),
            public_url: config.server.public_url.clone(),
            redactor: crate::redact::Redactor::new(config.secrets()),
            web_url: config.github.git_url.clone(),
        }))
        .with_sandbox(sandbox)
        .with_api_addr(addr),
    );
    let recovered = engine.recover().await?;
    if recovered > 0 {
        tracing::warn!(jobs = recovered, "Recovered jobs left running by a previous daemon.");
    }

    let ready = Arc::new(AtomicBool::new(false));
    let api = api::Api {
        store: store.clone(),
        engine: engine.clone(),
        token: config.server.api_token.clone(),
        wake: wake.clone(),
        ready: ready.clone(),
        rules: rules.clone(),
        metrics: metrics.clone(),
        hosts: Arc::new(api::Hosts::new(config.server.listen, config.server.public_url.as_deref())),
        streams: Arc::new(tokio::sync::Semaphore::new(config.server.max_streams)),
        web_url: config.server.public_url.clone().unwrap_or_else(|| format!("http://{addr}")),
        stop: shutdown.clone(),
    };
    // `/mcp`'s tools are a client of the API, calling its routes in-process.
    let sessions =
        crate::mcp::SessionLimits { max: config.server.max_mcp_sessions, idle: config.server.mcp_session_idle };
    let mcp = crate::mcp::http_service(api::inner_routes(api.clone()), api.web_url.clone(), api.stop.clone(), sessions);
    let app = ingress::router(ingress::Ingress {
        store: store.clone(),
        rules: rules.clone(),
        secret: config.github.webhook_secret.clone().unwrap_or_else(|| Secret::new("")),
        gitlab: config.gitlab.as_ref().zip(gitlab.clone()).map(|(g, client)| ingress::GitLabHook {
            token: g.webhook_secret.clone(),
            signing: g.signing_token.clone(),
            members: Arc::new(crate::forge::gitlab::trust::Members::new(client)),
        }),
        sources: Arc::new(config.sources.clone()),
        max_body_bytes: config.server.max_body_bytes,
        read_timeout: config.server.read_timeout,
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.server.max_in_flight)),
        buffered: Arc::new(tokio::sync::Semaphore::new(ingress::buffer_permits(config.server.max_buffered_bytes))),
        wake: wake.clone(),
        reject_replays: config.server.reject_replays,
        metrics: metrics.clone(),
    })
    .merge(api::router(api.clone(), mcp));

    let workers = CancellationToken::new();
    // Another replica's new jobs and publications wake this one's workers.
    let listening = store.listen(wake.clone(), publish_wake.clone(), workers.clone());
    let engine_task = tokio::spawn(engine.clone().run(workers.clone()));
    // Without GitHub credentials the publisher still sends notifications.
    let notify = Arc::new(config.notify.clone());
    let publisher_task = (github.is_some() || gitlab.is_some() || !notify.is_empty()).then(|| {
        let publisher = Publisher::new(store.clone(), github, notify, publish_wake.clone(), metrics.clone())
            .with_gitlab(gitlab.clone());
        tokio::spawn(publisher.run(workers.clone()))
    });
    // Background loops, each stopped by `workers` and joined at shutdown.
    let background = tokio_util::task::TaskTracker::new();
    background.spawn(prune_deliveries(store.clone(), config.storage.delivery_retention, workers.clone()));
    background.spawn(reload_triggers(config.clone(), rules.clone(), workers.clone()));
    background.spawn(run_schedules(store.clone(), rules.clone(), wake.clone(), workers.clone()));
    background.spawn(gc_mirrors(engine.clone(), config.storage.gc_interval, workers.clone()));
    background.spawn(engine.space().clone().run(workers.clone()));
    background.spawn(prune_jobs(
        store.clone(),
        config.storage.path.clone(),
        config.storage.job_retention,
        workers.clone(),
    ));
    background.spawn(upkeep(store.clone(), workers.clone()));
    background.spawn(expire_held(
        store.clone(),
        engine.outbox(),
        publish_wake.clone(),
        config.limits.held_for,
        workers.clone(),
    ));
    background.spawn(evict_caches(
        crate::cache::Caches::new(&config.storage.path),
        config.storage.cache_retention,
        config.storage.cache_max,
        workers.clone(),
    ));
    if let Some(c) = credentials.clone().filter(|c| c.is_app()) {
        background.spawn(crate::forge::github::catchup::run(c, store.clone(), workers.clone()));
    }
    if let Some((settings, client)) = config.gitlab.as_ref().zip(gitlab.clone()) {
        match settings.projects.is_empty() {
            true => tracing::info!(
                "GitLab catch-up is off (set gitlab.hook_id and gitlab.projects): deliveries GitLab failed to send while baton was down are not fetched again."
            ),
            false => {
                let projects = settings.projects.clone();
                background.spawn(crate::forge::gitlab::catchup::run(client, projects, store.clone(), workers.clone()));
            }
        }
    }

    ready.store(true, Ordering::Release);
    tracing::info!(listen = %addr, storage = %config.storage.path.display(), "baton is serving.");
    let result = serve_http(listener, app, config.server.read_timeout, shutdown.clone()).await;

    // No new deliveries, no new jobs; running jobs get the grace period to
    // finish, then stop and are left to resume at the next start.
    workers.cancel();
    let _ = engine_task.await;
    engine.drain(config.server.shutdown_grace).await;
    if let Some(t) = publisher_task {
        let _ = t.await;
    }
    // A loop in the middle of its work (a mirror's gc, a prune batch)
    // finishes it; one that does not within the bound is left behind.
    background.close();
    if tokio::time::timeout(BACKGROUND_GRACE, background.wait()).await.is_err() {
        tracing::warn!("A background task did not stop in time; stopping without it.");
    }
    if let Some(l) = listening {
        let _ = l.await;
    }
    store.close().await?;
    tracing::info!("baton stopped.");
    result
}

/// How long shutdown waits for background loops to finish what they are doing.
const BACKGROUND_GRACE: Duration = Duration::from_secs(10);

/// The HTTP loop. Hand-rolled on hyper rather than `axum::serve` for the
/// header read timeout: a client that trickles its headers (slowloris) is
/// cut off instead of holding a connection forever. Body time is bounded by
/// ingress itself.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    read_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(read_timeout);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, usually: back off, keep serving.
                    tracing::warn!(error = %e, "Accepting a connection failed.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    // Let requests in progress finish, but do not wait on idle keep-alives.
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {}
    }
    Ok(())
}

/// Reloads the trigger folder on SIGHUP and whenever its files change.
/// Changes are found by polling the folder's fingerprint (names, sizes,
/// mtimes) rather than by a file watcher: watchers miss editors' rename-on-save,
/// `git checkout` and bind mounts, and a poll of a few files costs nothing.
async fn reload_triggers(config: Arc<Config>, rules: SharedRules, stop: CancellationToken) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let force = tokio::select! {
            _ = tokio::time::sleep(TRIGGER_POLL) => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = stop.cancelled() => return,
        };
        let (config, rules2) = (config.clone(), rules.clone());
        let outcome = tokio::task::spawn_blocking(move || rules2.reload(&config.triggers_dir, &config, force)).await;
        match outcome {
            Ok(crate::rules::Reload::Unchanged) | Err(_) => {}
            Ok(crate::rules::Reload::Loaded(n)) => tracing::info!(triggers = n, "Triggers reloaded."),
            Ok(crate::rules::Reload::Kept(errors)) => {
                for e in &errors {
                    tracing::error!(error = %e, "Trigger file has an error; the previous triggers stay in force.");
                }
            }
        }
    }
}

/// Fires schedule triggers; their jobs go through the store like any other.
async fn run_schedules(store: Store, rules: SharedRules, wake: Arc<Notify>, stop: CancellationToken) {
    loop {
        match crate::schedule::tick(&store, &rules, chrono::Utc::now()).await {
            Ok(fired) if !fired.is_empty() => wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "Schedules could not be checked; will retry."),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// How often the trigger folder is checked for changes.
const TRIGGER_POLL: Duration = Duration::from_secs(2);

/// Forgets delivery ids older than the retention, in the background.
async fn prune_deliveries(store: Store, retention: Duration, stop: CancellationToken) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
        match store.prune_deliveries(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deliveries = n, "Pruned old delivery ids."),
            Err(e) => tracing::warn!(error = %e, "Pruning delivery ids failed; will retry."),
        }
    }
}

/// Jobs pruned per batch: the store is never held long.
const PRUNE_BATCH: usize = 500;

/// Keeps the environment caches within `storage.cache_retention` and
/// `storage.cache_max` even while no job fills one (a job's setup also
/// evicts after it fills).
async fn evict_caches(caches: crate::cache::Caches, retention: Duration, max: u64, stop: CancellationToken) {
    let every = (retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        let pass = caches.clone();
        let removed = tokio::task::spawn_blocking(move || pass.evict(retention, max)).await.unwrap_or_default();
        if !removed.is_empty() {
            tracing::info!(
                caches = removed.len(),
                "Removed environment caches unused too long, or over storage.cache_max."
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Forgets finished jobs older than the retention, and removes their
/// folders (log, run folders), in batches in the background.
async fn prune_jobs(store: Store, storage: std::path::PathBuf, retention: Duration, stop: CancellationToken) {
    let every = (retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(30));
        loop {
            match store.prune_jobs(cutoff, PRUNE_BATCH).await {
                Ok(ids) if ids.is_empty() => break,
                Ok(ids) => {
                    let n = ids.len();
                    let storage = storage.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        for id in ids {
                            let _ = crate::tree::remove(&crate::engine::job_dir(&storage, &id));
                        }
                    })
                    .await;
                    tracing::info!(jobs = n, "Pruned finished jobs past their retention.");
                    if n < PRUNE_BATCH || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Pruning old jobs failed; will retry.");
                    break;
                }
            }
        }
        match store.prune_notes(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(notes = n, "Forgot notes on pull requests unused past the job retention."),
            Err(e) => tracing::warn!(error = %e, "Pruning old notes failed; will retry."),
        }
        // Another replica may have pruned jobs this one ran: their folders
        // here go too, once the store no longer knows them.
        let jobs = storage.join("jobs");
        let dir = jobs.clone();
        let old = tokio::task::spawn_blocking(move || folders_older_than(&dir, retention)).await.unwrap_or_default();
        for id in old {
            if let Ok(None) = store.job(&id).await {
                let path = jobs.join(&id);
                let _ = tokio::task::spawn_blocking(move || crate::tree::remove(&path)).await;
            }
        }
    }
}

/// The store's slow housekeeping (`Store::upkeep`): first a while after
/// the start, out of the way of a restarted daemon catching up, then hourly.
async fn upkeep(store: Store, stop: CancellationToken) {
    let mut wait = Duration::from_secs(600);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = store.upkeep().await {
            tracing::warn!(error = %e, "The store's housekeeping failed; will retry.");
        }
        wait = Duration::from_secs(3600);
    }
}

/// Jobs held for `/baton approve` longer than `held_for` expire; their
/// issue or pull request is told once.
async fn expire_held(
    store: Store,
    outbox: Arc<dyn crate::domain::PlanOutbox>,
    publish: Arc<tokio::sync::Notify>,
    held_for: Duration,
    stop: CancellationToken,
) {
    let every = (held_for / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let spelled = crate::config::format_duration(held_for);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(held_for).unwrap_or(chrono::Duration::days(14));
        match store.expire_held(cutoff, &spelled, outbox.as_ref()).await {
            Ok(told) if told.is_empty() => {}
            Ok(told) => {
                tracing::info!(subjects = told.len(), "Jobs held for approval past limits.held_for expired.");
                publish.notify_one();
            }
            Err(e) => tracing::warn!(error = %e, "Expiring held jobs failed; will retry."),
        }
    }
}

/// The names of the folders in `dir` untouched for longer than `age`
/// (never following a link).
fn folders_older_than(dir: &std::path::Path, age: Duration) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| {
            e.path()
                .symlink_metadata()
                .is_ok_and(|m| m.is_dir() && m.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|e| e > age))
        })
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Keeps the mirrors' disk in check, in the background.
async fn gc_mirrors(engine: Arc<Engine>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        engine.gc_mirrors().await;
    }
}

/// Binds the configured address, with a clear error when it is taken.
pub async fn bind(config: &Config) -> Result<tokio::net::TcpListener, ServeError> {
    let addr = config.server.listen;
    tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Listen { addr, source })
}

/// With no webhook secret configured, baton makes one at first start and
/// keeps it (mode 0600) under the storage folder.
fn generated_secret(storage: &Path) -> Result<Secret, ServeError> {
    let path = storage.join("webhook-secret");
    let err = |source| ServeError::Secret { path: path.clone(), source };
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let s = existing.trim();
        if !s.is_empty() {
            tracing::info!(path = %path.display(), "Using the generated webhook secret.");
            return Ok(Secret::new(s.to_string()));
        }
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let secret = hex::encode(bytes);
    std::fs::create_dir_all(storage).map_err(err)?;
    write_private(&path, &secret).map_err(err)?;
    tracing::warn!(
        path = %path.display(),
        "No webhook secret was configured, so baton generated one. Paste the contents of this file into \
         the webhook's \"Secret\" field on GitHub (Settings → Webhooks), or set github.webhook_secret."
    );
    Ok(Secret::new(secret))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Who baton posts as on GitLab, when `gitlab.bot_username` does not say:
/// asked of GitLab once at start. Without it, baton's own notes are still
/// known by their marker.
async fn resolve_gitlab_bot(settings: &mut crate::config::GitLabSettings, client: &GitLabClient) {
    if settings.bot_username.is_some() {
        return;
    }
    // Bounded: a GitLab that does not answer must not hold up the start.
    match tokio::time::timeout(std::time::Duration::from_secs(5), client.identity()).await {
        Err(_) => tracing::warn!(
            "GitLab did not say who the token belongs to (GET /user) within 5 s; set gitlab.bot_username."
        ),
        Ok(Ok(user)) => {
            tracing::info!(user = %user.username, "Posting to GitLab as this user.");
            settings.bot_username = Some(user.username.clone());
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Could not ask GitLab who the token belongs to (GET /user); set gitlab.bot_username.")
        }
    }
}
