//! The rule set in force, reloaded when the trigger folder changes: a
//! folder with errors leaves the last good set in force.

use std::path::Path;

use super::RuleSet;
use crate::config::Config;
use crate::diag::Diagnostic;

/// The rule set in force and the errors of the last load, swapped as a whole
/// on reload: readers take a cheap snapshot and never see half a folder.
#[derive(Clone, Debug)]
pub struct SharedRules(std::sync::Arc<std::sync::RwLock<Loaded>>);

#[derive(Debug)]
struct Loaded {
    rules: std::sync::Arc<RuleSet>,
    /// Problems of the most recent load; when not empty, `rules` is the last
    /// set that loaded cleanly.
    errors: Vec<Diagnostic>,
    fingerprint: Fingerprint,
}

/// Every file under the trigger folder with its size and modification time:
/// a change to any of them (an edit, a rename-on-save, a `git checkout`)
/// changes the fingerprint.
pub type Fingerprint = Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)>;

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reload {
    Unchanged,
    Loaded(usize),
    /// The folder has errors; the previous set stays in force.
    Kept(Vec<Diagnostic>),
}

pub fn fingerprint(dir: &Path) -> Fingerprint {
    fn walk(dir: &Path, out: &mut Fingerprint, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() && depth < 4 {
                walk(&path, out, depth + 1);
            } else if meta.is_file() {
                out.push((path, meta.len(), meta.modified().ok()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out, 0);
    out.sort();
    out
}

impl SharedRules {
    pub fn new(rules: RuleSet, fingerprint: Fingerprint) -> SharedRules {
        SharedRules(std::sync::Arc::new(std::sync::RwLock::new(Loaded {
            rules: std::sync::Arc::new(rules),
            errors: Vec::new(),
            fingerprint,
        })))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current(&self) -> std::sync::Arc<RuleSet> {
        self.read().rules.clone()
    }

    pub fn errors(&self) -> Vec<Diagnostic> {
        self.read().errors.clone()
    }

    /// Loads the folder again when it changed since the last load (or when
    /// `force`). A folder with any error leaves the previous set in force.
    pub fn reload(&self, dir: &Path, config: &Config, force: bool) -> Reload {
        let now = fingerprint(dir);
        if !force && now == self.read().fingerprint {
            return Reload::Unchanged;
        }
        let (rules, errors) = RuleSet::load(dir, config);
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        g.fingerprint = now;
        if errors.is_empty() {
            let n = rules.triggers().len();
            g.rules = std::sync::Arc::new(rules);
            g.errors.clear();
            Reload::Loaded(n)
        } else {
            g.errors = errors.clone();
            Reload::Kept(errors)
        }
    }
}
