//! `[environments.NAME]`: a job's setup phase (what it runs, which hosts it
//! reaches, which secrets it alone sees) and what of its work is kept
//! between jobs (the cache, and the files that key it).
//!
//! Paths are checked here, at load time, so a cache that would cover a
//! system folder or climb out of the sandbox is a `path:line:col` error at
//! start rather than a surprise in a job.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{HumanDuration, Secret};
use crate::sandbox::egress::HostRule;

/// The setup's own timeout when the environment gives none.
pub(crate) const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The script a repository may carry for its own setup, read from its
/// default branch only.
pub const REPO_SETUP: &str = ".baton/setup.sh";

/// One environment, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Environment {
    pub name: String,
    /// Shell commands run in the workspace before the agent, in order.
    pub setup: Vec<String>,
    /// Hosts the setup (and only the setup) may reach.
    pub setup_network: Vec<HostRule>,
    /// Variables only the setup sees (secrets, e.g. a registry token).
    pub setup_env: BTreeMap<String, Secret>,
    pub setup_timeout: Duration,
    /// Paths inside the sandbox whose contents are kept, absolute there
    /// (under `HOME` or the workspace).
    pub cache: Vec<PathBuf>,
    /// Files of the repository whose contents key the cache.
    pub cache_key: Vec<String>,
    /// A read-only root (a folder, or an OCI image's unpacked rootfs) in
    /// place of the host's system folders.
    pub image: Option<PathBuf>,
    /// Whether the repository's own `.baton/setup.sh` (default branch) runs
    /// after `setup`.
    pub repo_setup: bool,
    /// Repositories that get this environment when their trigger names none.
    pub repos: Vec<glob::Pattern>,
}

impl Environment {
    /// Whether this environment has anything to do before the agent.
    pub fn has_setup(&self) -> bool {
        !self.setup.is_empty() || self.repo_setup
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnvironment {
    #[serde(default)]
    setup: Vec<Spanned<String>>,
    #[serde(default)]
    setup_network: Vec<Spanned<String>>,
    #[serde(default)]
    setup_env: BTreeMap<String, Spanned<String>>,
    setup_timeout: Option<HumanDuration>,
    #[serde(default)]
    cache: Vec<Spanned<String>>,
    #[serde(default)]
    cache_key: Vec<Spanned<String>>,
    image: Option<Spanned<String>>,
    #[serde(default)]
    repo_setup: bool,
    #[serde(default)]
    repos: Vec<Spanned<String>>,
}

/// What reading one environment found wrong: (span, message).
pub(super) type Problems = Vec<(std::ops::Range<usize>, String)>;

/// Resolves `raw`; `secret` reads an `env:`/`file:`/literal value (noting
/// where it came from, so agents never see it).
pub(super) fn resolve(
    name: &str,
    raw: &RawEnvironment,
    base: &Path,
    secret: &mut dyn FnMut(&str) -> Result<Secret, String>,
) -> Result<Environment, Problems> {
    let mut problems = Problems::new();
    let key = |k: &str| format!("environments.{name}.{k}");
    let mut setup_network = Vec::new();
    for e in &raw.setup_network {
        match HostRule::parse(e.get_ref()) {
            Ok(rule) => setup_network.push(rule),
            Err(msg) => problems.push((e.span(), format!("{}: {msg}", key("setup_network")))),
        }
    }
    let mut setup_env = BTreeMap::new();
    for (var, value) in &raw.setup_env {
        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            problems.push((value.span(), format!("{}: `{var}` is not a variable name", key("setup_env"))));
            continue;
        }
        match secret(value.get_ref()) {
            Ok(s) => {
                setup_env.insert(var.clone(), s);
            }
            Err(msg) => problems.push((value.span(), format!("{}.{var}: {msg}", key("setup_env")))),
        }
    }
    let mut cache: Vec<PathBuf> = Vec::new();
    for c in &raw.cache {
        match inside_path(c.get_ref()) {
            // Pointed at by its own span: a bad entry before it must not
            // shift which one an overlap names.
            Ok(p) if cache.iter().any(|q| p.starts_with(q) || q.starts_with(&p)) => {
                problems.push((c.span(), format!("{}: `{}` overlaps another cache path", key("cache"), p.display())));
            }
            Ok(p) => cache.push(p),
            Err(msg) => problems.push((c.span(), format!("{}: {msg}", key("cache")))),
        }
    }
    for k in &raw.cache_key {
        if !is_relative_inside(k.get_ref()) {
            problems.push((
                k.span(),
                format!(
                    "{}: `{}` must be a file of the repository (a relative path without `..`)",
                    key("cache_key"),
                    k.get_ref()
                ),
            ));
        }
    }
    let image = raw.image.as_ref().and_then(|i| {
        let path = base.join(i.get_ref());
        if path.is_dir() {
            Some(path)
        } else {
            problems.push((
                i.span(),
                format!("{}: {} is not a folder (give an unpacked root file system)", key("image"), path.display()),
            ));
            None
        }
    });
    let mut repos = Vec::new();
    for r in &raw.repos {
        match glob::Pattern::new(r.get_ref()) {
            Ok(p) => repos.push(p),
            Err(e) => problems.push((r.span(), format!("{}: {e}", key("repos")))),
        }
    }
    for c in raw.setup.iter().filter(|c| c.get_ref().trim().is_empty()) {
        problems.push((c.span(), format!("{}: a setup command is empty", key("setup"))));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Environment {
        name: name.to_string(),
        setup: raw.setup.iter().map(|c| c.get_ref().clone()).collect(),
        setup_network,
        setup_env,
        setup_timeout: raw.setup_timeout.map(|t| t.0).filter(|t| !t.is_zero()).unwrap_or(DEFAULT_SETUP_TIMEOUT),
        cache,
        cache_key: raw.cache_key.iter().map(|k| k.get_ref().clone()).collect(),
        image,
        repo_setup: raw.repo_setup,
        repos,
    })
}

/// A cache path as the sandbox sees it: `~/x` under `HOME`, a relative
/// path under the workspace; an absolute one only under those two.
fn inside_path(written: &str) -> Result<PathBuf, String> {
    let home = Path::new(crate::sandbox::HOME_PATH);
    let workspace = Path::new(crate::sandbox::WORKSPACE_PATH);
    let path = if let Some(rest) = written.strip_prefix("~/") {
        home.join(rest)
    } else if written.starts_with('/') {
        PathBuf::from(written)
    } else {
        workspace.join(written)
    };
    let clean = path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let under = [home, workspace].into_iter().find(|root| path.starts_with(root) && path != *root);
    match (clean, under) {
        (true, Some(_)) if !path.starts_with(workspace.join(".git")) => Ok(path),
        _ => Err(format!(
            "`{written}` must be a folder under HOME (`~/…`) or the workspace (a relative path), without `..`, and not `.git`"
        )),
    }
}

fn is_relative_inside(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_land_under_home_or_the_workspace() {
        assert_eq!(inside_path("~/.cargo/registry").unwrap(), PathBuf::from("/home/agent/.cargo/registry"));
        assert_eq!(inside_path("target").unwrap(), PathBuf::from("/workspace/target"));
        assert_eq!(inside_path("/workspace/node_modules").unwrap(), PathBuf::from("/workspace/node_modules"));
        for bad in ["/usr/lib", "../x", "~/../etc", "/workspace", ".git/hooks", "~/"] {
            assert!(inside_path(bad).is_err(), "{bad}");
        }
    }
}
