//! Who GitLab trusts: payloads carry no standing like GitHub's
//! `author_association`, so it is the member's access level in the project
//! (inherited from groups too), asked of the API and kept for a short while.
//!
//! The level becomes a standing named after GitLab's role (`MAINTAINER`,
//! `DEVELOPER`, …), which triggers' `authors` list beside GitHub's
//! associations. Developer and above are trusted by default; Reporter,
//! Planner and Guest are outsiders unless a trigger lists them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::api::Client;

/// GitLab's roles as standings, highest first, and `NONE` for a stranger.
pub const ROLES: &[&str] =
    &["OWNER", "MAINTAINER", "DEVELOPER", "REPORTER", "PLANNER", "GUEST", "MINIMAL_ACCESS", "NONE"];

/// How long an answer is kept: short, so a removed member loses trust soon.
const TTL: Duration = Duration::from_secs(60);

/// The standing of an access level (`None`: not a member).
pub fn standing(access_level: Option<u32>) -> &'static str {
    match access_level {
        Some(50..) => "OWNER",
        Some(40..=49) => "MAINTAINER",
        Some(30..=39) => "DEVELOPER",
        Some(20..=29) => "REPORTER",
        Some(15..=19) => "PLANNER",
        Some(10..=14) => "GUEST",
        Some(1..=9) => "MINIMAL_ACCESS",
        _ => "NONE",
    }
}

/// (project, user) → when asked, and the access level GitLab answered.
type Levels = HashMap<(String, u64), (Instant, Option<u32>)>;

/// Access levels by (project, user), asked of GitLab at most once per TTL.
pub struct Members {
    client: std::sync::Arc<Client>,
    cache: Mutex<Levels>,
}

impl Members {
    pub fn new(client: std::sync::Arc<Client>) -> Members {
        Members { client, cache: Mutex::new(HashMap::new()) }
    }

    /// The standing of `user` in `project`. When GitLab cannot say (down,
    /// or the token may not read members), the answer is `NONE`: an
    /// unknown person is an outsider, whose jobs wait for approval.
    pub async fn standing(&self, project: &str, user: u64) -> &'static str {
        let key = (project.to_string(), user);
        let cached = self.lock().get(&key).filter(|(at, _)| at.elapsed() < TTL).map(|(_, level)| *level);
        if let Some(level) = cached {
            return standing(level);
        }
        match self.client.member_access(project, user).await {
            Ok(level) => {
                let mut cache = self.lock();
                // Bounded: a flood of strangers must not grow it for ever.
                if cache.len() > 10_000 {
                    cache.retain(|_, (at, _)| at.elapsed() < TTL);
                }
                cache.insert(key, (Instant::now(), level));
                standing(level)
            }
            Err(e) => {
                tracing::warn!(project, user, error = %e, "Could not read a GitLab member's access level; treating them as an outsider.");
                "NONE"
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Levels> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_levels_become_gitlab_roles() {
        assert_eq!(standing(Some(50)), "OWNER");
        assert_eq!(standing(Some(40)), "MAINTAINER");
        assert_eq!(standing(Some(30)), "DEVELOPER");
        assert_eq!(standing(Some(20)), "REPORTER");
        assert_eq!(standing(Some(10)), "GUEST");
        assert_eq!(standing(Some(0)), "NONE");
        assert_eq!(standing(None), "NONE");
        for level in [Some(50), Some(40), Some(30), Some(20), Some(15), Some(10), Some(5), None] {
            assert!(ROLES.contains(&standing(level)));
        }
    }
}
