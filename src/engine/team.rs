//! Agent teams: a job whose trigger says `[job] delegate = [...]` hands
//! subtasks to child jobs through baton's own `/mcp`, with a token that is
//! good only while its run lasts and only for that job's children.
//!
//! The engine mints a [`Pass`] when such a run starts and drops it when the
//! run ends; the API looks a bearer token up in [`Grants`] and lets the
//! [`Grant`] it finds decide what the caller may do. The token is never
//! stored: a daemon that restarts reruns the job with a new one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::store::Job;

/// What every job token starts with (the redactor knows the shape).
pub(crate) const TOKEN_PREFIX: &str = "batonjob_";

/// What a job's token allows: children of `job`, on its repository, run by
/// one of `agents`.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// The parent.
    pub job: String,
    pub trigger: String,
    pub repo: Option<String>,
    pub access: Option<u64>,
    /// The commit the parent works on, and its branch: a child's default.
    pub head_sha: Option<String>,
    pub default_branch: Option<String>,
    /// The agents children may be run by (the parent's `delegate`).
    pub agents: Vec<String>,
    /// The parent's depth: its children are one deeper.
    pub depth: u32,
    /// The parent's budget, which its children share.
    pub budget_usd: Option<f64>,
}

impl Grant {
    pub fn of(job: &Job) -> Grant {
        let spec = &job.spec;
        Grant {
            job: job.id.clone(),
            trigger: job.trigger.clone(),
            repo: job.repo.clone(),
            access: spec.access,
            head_sha: spec.head_sha.clone(),
            default_branch: spec.default_branch.clone(),
            agents: spec.delegate.clone(),
            depth: spec.chain_depth,
            budget_usd: spec.budget_usd,
        }
    }
}

/// Who a request comes from, as its bearer token says.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The API token's holder (anyone, on a daemon without one).
    Operator,
    /// A team job's agent: it reaches only `/mcp`, and there only the job's
    /// own children.
    Team(Arc<Grant>),
}

impl Caller {
    /// Whether the caller may see or act on `job`.
    pub fn reaches(&self, job: &Job) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Team(grant) => job.parent.as_deref() == Some(grant.job.as_str()),
        }
    }

    pub(crate) fn is_team(&self) -> bool {
        matches!(self, Caller::Team(_))
    }
}

/// Why a grant refuses a child.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("a child of job {job} would be {depth} jobs deep, past limits.max_chain_depth = {limit}")]
    TooDeep { job: String, depth: u32, limit: u32 },
    #[error("the team's budget of {budget} is spent or promised ({spent} so far, by job {job} and to its children)")]
    Spent { job: String, budget: String, spent: String },
}

/// The depth a child would have, if the limit allows it.
pub(crate) fn child_depth(grant: &Grant, max_chain_depth: u32) -> Result<u32, Refused> {
    let depth = grant.depth + 1;
    if depth > max_chain_depth {
        return Err(Refused::TooDeep { job: grant.job.clone(), depth, limit: max_chain_depth });
    }
    Ok(depth)
}

/// A new child's budget: its `share`-th part of what the parent's budget
/// leaves after `committed` (what the parent's finished attempts and its
/// ended children spent, and what its unfinished children were given). So
/// the children together never get more than the budget; a fan-out of n
/// asks for shares n, n-1, …, 1, which come out equal. No budget, no cap.
pub(crate) fn child_budget(grant: &Grant, committed: f64, share: u32) -> Result<Option<f64>, Refused> {
    let Some(budget) = grant.budget_usd else { return Ok(None) };
    let portion = (budget - committed) / f64::from(share.max(1));
    // Below a hundredth of a cent nothing useful runs.
    if portion < 0.0001 {
        return Err(Refused::Spent {
            job: grant.job.clone(),
            budget: crate::domain::dollars(budget),
            spent: crate::domain::dollars(committed),
        });
    }
    Ok(Some(portion))
}

/// The tokens of the runs under way, by their digest (a lookup does not
/// compare the token itself byte by byte).
#[derive(Debug, Default, Clone)]
pub(crate) struct Grants(Arc<Mutex<HashMap<[u8; 32], Arc<Grant>>>>);

impl Grants {
    /// A new token for `grant`, good until the pass is dropped.
    pub(crate) fn mint(&self, grant: Grant) -> Pass {
        let mut bytes = [0u8; 32];
        // No entropy is a broken machine: refuse to make a guessable token.
        let token = match getrandom::fill(&mut bytes) {
            Ok(()) => Some(format!("{TOKEN_PREFIX}{}", hex::encode(bytes))),
            Err(e) => {
                tracing::error!(error = %e, "No randomness for a job token; the job runs without its team.");
                None
            }
        };
        let key = token.as_deref().map(digest);
        if let Some(key) = key {
            self.lock().insert(key, Arc::new(grant));
        }
        Pass { token, key, grants: self.clone() }
    }

    /// The grant of a live token.
    pub fn find(&self, token: &str) -> Option<Arc<Grant>> {
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        self.lock().get(&digest(token)).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<Grant>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A run's token; dropping it revokes the token.
pub(crate) struct Pass {
    token: Option<String>,
    key: Option<[u8; 32]>,
    grants: Grants,
}

impl Pass {
    /// The bearer token (none when the machine had no randomness).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.grants.lock().remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(depth: u32, budget: Option<f64>) -> Grant {
        Grant {
            job: "p".into(),
            trigger: "t".into(),
            repo: Some("o/r".into()),
            access: None,
            head_sha: None,
            default_branch: None,
            agents: vec!["probe".into()],
            depth,
            budget_usd: budget,
        }
    }

    #[test]
    fn a_token_lives_as_long_as_its_pass() {
        let grants = Grants::default();
        let pass = grants.mint(grant(0, None));
        let token = pass.token().unwrap().to_string();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        assert_eq!(grants.find(&token).unwrap().job, "p");
        assert!(grants.find(&token[..token.len() - 1]).is_none());
        assert!(grants.find("anything").is_none());
        let other = grants.mint(grant(0, None));
        assert_ne!(other.token(), pass.token());
        drop(pass);
        assert!(grants.find(&token).is_none(), "revoked with its pass");
        assert!(grants.find(other.token().unwrap()).is_some());
    }

    #[test]
    fn children_are_one_deeper_up_to_the_limit() {
        assert_eq!(child_depth(&grant(0, None), 1), Ok(1));
        assert_eq!(child_depth(&grant(1, None), 1), Err(Refused::TooDeep { job: "p".into(), depth: 2, limit: 1 }));
        assert!(child_depth(&grant(0, None), 0).is_err());
    }

    #[test]
    fn children_share_what_the_budget_leaves() {
        assert_eq!(child_budget(&grant(0, None), 99.0, 1), Ok(None));
        assert_eq!(child_budget(&grant(0, Some(1.0)), 0.25, 1), Ok(Some(0.75)));
        // A fan-out of three: shares 3, 2, 1 of what is left come out equal.
        let g = grant(0, Some(0.9));
        let first = child_budget(&g, 0.0, 3).unwrap().unwrap();
        let second = child_budget(&g, first, 2).unwrap().unwrap();
        let third = child_budget(&g, first + second, 1).unwrap().unwrap();
        for part in [first, second, third] {
            assert!((part - 0.3).abs() < 1e-9, "{first} {second} {third}");
        }
        let e = child_budget(&grant(0, Some(1.0)), 1.0, 1).unwrap_err();
        assert!(e.to_string().contains("budget of $1.00 is spent or promised"), "{e}");
    }
}
