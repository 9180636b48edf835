//! The mirror side of a workspace: one bare repository per repository,
//! fetched with the job's credentials, and the commits a job names.

use std::path::Path;

use super::*;

impl Workspaces {
    fn remote(&self, forge: Forge) -> Result<&Remote, WorkspaceError> {
        self.remotes.iter().find(|r| r.forge == forge).ok_or(WorkspaceError::NoForge(forge.name(), forge.source()))
    }

    /// `{git_url}/{repo}.git` on the repository's forge.
    pub(super) fn url(&self, forge: Forge, repo: &str) -> Result<String, WorkspaceError> {
        repo_key(forge, repo)?;
        Ok(forge.clone_url(&self.remote(forge)?.git_url, repo))
    }

    /// What git sends for `repo` as HTTP Basic credentials (`user:token`),
    /// if anything.
    pub(super) async fn token(
        &self,
        forge: Forge,
        access: Option<u64>,
        repo: &str,
    ) -> Result<Option<Secret>, WorkspaceError> {
        let remote = self.remote(forge)?;
        let token = match &remote.credentials {
            // A local mirror source (tests, air-gapped setups) takes no token.
            _ if remote.git_url.starts_with("file://") => return Ok(None),
            None => return Ok(None),
            Some(GitCredentials::GitHub(c)) => c.token(access, repo).await.map_err(WorkspaceError::Auth)?,
            Some(GitCredentials::Token(t)) => t.clone(),
        };
        Ok(Some(Secret::new(format!("{}:{}", forge.git_user(), token.expose()))))
    }

    pub(super) async fn remove_dir(&self, path: &Path) {
        let path = path.to_path_buf();
        let _ = blocking(move || remove_tree(&path)).await;
    }

    pub(super) async fn ensure_mirror(&self, mirror: &Path) -> Result<(), WorkspaceError> {
        if mirror.join("HEAD").exists() {
            return Ok(());
        }
        let parent = mirror.parent().unwrap_or(&self.mirrors);
        tokio::fs::create_dir_all(parent).await?;
        // Initialized beside its final name and renamed, so a crash never
        // leaves a half-made mirror that looks whole.
        let tmp = parent.join(format!(".init-{}", std::process::id()));
        self.remove_dir(&tmp).await;
        init_bare(&self.git, &tmp).await?;
        tokio::fs::rename(&tmp, mirror).await?;
        Ok(())
    }

    pub(super) async fn fetch(
        &self,
        mirror: &Path,
        url: &str,
        refspec: &str,
        token: Option<&Secret>,
    ) -> Result<(), WorkspaceError> {
        self.git.run(mirror, None, &["fetch", "--no-tags", "--quiet", url, refspec], token).await?;
        Ok(())
    }

    pub(super) async fn resolve(&self, mirror: &Path, rev: &str) -> Result<String, WorkspaceError> {
        let out = self.git.run(mirror, None, &["rev-parse", "--verify", &format!("{rev}^{{commit}}")], None).await?;
        Ok(out.trim().to_string())
    }

    pub(super) async fn has_commit(&self, mirror: &Path, sha: &str) -> bool {
        self.git.run(mirror, None, &["cat-file", "-e", &format!("{sha}^{{commit}}")], None).await.is_ok()
    }

    /// Makes sure `sha` is in the mirror: already there, fetched by id
    /// (GitHub serves any reachable commit), or fetched with its branch.
    pub(super) async fn ensure_commit(
        &self,
        mirror: &Path,
        url: &str,
        sha: &str,
        branch: Option<&str>,
        token: Option<&Secret>,
    ) -> Result<String, WorkspaceError> {
        if !sha.chars().all(|c| c.is_ascii_hexdigit()) || sha.len() < 7 {
            return Err(WorkspaceError::MissingCommit(sha.to_string()));
        }
        if self.has_commit(mirror, sha).await {
            return Ok(sha.to_string());
        }
        let by_id = self.fetch(mirror, url, sha, token).await;
        if by_id.is_err() {
            if let Some(branch) = branch {
                let local = format!("refs/heads/{branch}");
                self.fetch(mirror, url, &format!("+{local}:{local}"), token).await?;
            }
        }
        if self.has_commit(mirror, sha).await {
            Ok(sha.to_string())
        } else {
            by_id?;
            Err(WorkspaceError::MissingCommit(sha.to_string()))
        }
    }
}
