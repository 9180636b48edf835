//! GitHub credentials, for publishing and for git: a configured token, or a
//! GitHub App's installation tokens (a JWT signed with the App's key buys a
//! token for one installation; it is cached until five minutes before it
//! expires). Tokens leave this module only as `Secret`s.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use octocrab::Octocrab;
use serde_json::Value;

use crate::config::{GitHubSettings, Secret};

/// A token is renewed this long before GitHub says it expires.
const RENEW_BEFORE: chrono::Duration = chrono::Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid github.api_url `{url}`: {message}")]
    ApiUrl { url: String, message: String },
    #[error("github.private_key is not an RSA private key in PEM format: {0}")]
    PrivateKey(String),
    #[error("github.app_id is set but github.private_key is not (or the other way round)")]
    Incomplete,
    #[error("no GitHub App installation for {0}: the event carried none and GitHub knows none for the repository")]
    NoInstallation(String),
    #[error("GitHub refused an installation token: {0}")]
    Token(String),
}

enum Kind {
    Token(Secret),
    App(Box<App>),
}

struct App {
    app: Octocrab,
    tokens: Mutex<HashMap<u64, (Secret, DateTime<Utc>)>>,
}

/// How baton authenticates to one GitHub.
pub struct Credentials {
    kind: Kind,
}

impl Credentials {
    /// The App when `app_id` and `private_key` are set, else the token;
    /// `None` when neither is (publishing is off).
    pub(crate) fn from_config(github: &GitHubSettings) -> Result<Option<Credentials>, AuthError> {
        let kind = match (github.app_id, &github.private_key, &github.token) {
            (Some(app_id), Some(key), _) => {
                let bad =
                    |e: octocrab::Error| AuthError::ApiUrl { url: github.api_url.clone(), message: e.to_string() };
                let app = Octocrab::builder()
                    .base_uri(github.api_url.as_str())
                    .map_err(bad)?
                    .app_from_rsa_pem(octocrab::models::AppId(app_id), key.expose().as_bytes())
                    .map_err(|e| AuthError::PrivateKey(describe(&e)))?
                    .set_connect_timeout(Some(Duration::from_secs(10)))
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .build()
                    .map_err(bad)?;
                Kind::App(Box::new(App { app, tokens: Mutex::new(HashMap::new()) }))
            }
            (Some(_), None, _) | (None, Some(_), _) => return Err(AuthError::Incomplete),
            (None, None, Some(token)) => Kind::Token(token.clone()),
            (None, None, None) => return Ok(None),
        };
        Ok(Some(Credentials { kind }))
    }

    pub(crate) fn is_app(&self) -> bool {
        matches!(self.kind, Kind::App(_))
    }

    /// The App's own client (JWT), for `/app/...` routes.
    pub(crate) fn app_client(&self) -> Option<&Octocrab> {
        match &self.kind {
            Kind::App(a) => Some(&a.app),
            Kind::Token(_) => None,
        }
    }

    /// A token for `repo`: the configured one, or an installation token
    /// (of `installation`, or else of the App's installation on `repo`).
    pub async fn token(&self, installation: Option<u64>, repo: &str) -> Result<Secret, AuthError> {
        let (app, tokens) = match &self.kind {
            Kind::Token(t) => return Ok(t.clone()),
            Kind::App(a) => (&a.app, &a.tokens),
        };
        let installation = match installation {
            Some(id) => id,
            None => {
                let found: Value = app
                    .get(format!("/repos/{repo}/installation"), None::<&()>)
                    .await
                    .map_err(|_| AuthError::NoInstallation(repo.to_string()))?;
                found["id"].as_u64().ok_or_else(|| AuthError::NoInstallation(repo.to_string()))?
            }
        };
        let now = Utc::now();
        if let Some((token, expires)) = lock(tokens).get(&installation) {
            if *expires - RENEW_BEFORE > now {
                return Ok(token.clone());
            }
        }
        let answer: Value = app
            .post(format!("/app/installations/{installation}/access_tokens"), None::<&()>)
            .await
            .map_err(|e| AuthError::Token(describe(&e)))?;
        let token = answer["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::Token("the answer has no token".into()))?;
        let expires = answer["expires_at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(now + chrono::Duration::minutes(30));
        let token = Secret::new(token.to_string());
        lock(tokens).insert(installation, (token.clone(), expires));
        tracing::info!(installation, expires = %expires, "GitHub App installation token obtained.");
        Ok(token)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A client for `api_url` authenticated with `token`, with baton's
/// timeouts and without octocrab's retries (the outbox retries).
pub(crate) fn token_client(api_url: &str, token: &Secret) -> Result<Octocrab, AuthError> {
    let bad = |e: octocrab::Error| AuthError::ApiUrl { url: api_url.to_string(), message: e.to_string() };
    Octocrab::builder()
        .base_uri(api_url)
        .map_err(bad)?
        .personal_token(token.expose().to_string())
        .set_connect_timeout(Some(Duration::from_secs(10)))
        .set_read_timeout(Some(Duration::from_secs(30)))
        .build()
        .map_err(bad)
}

/// octocrab's error, without anything a log should not carry.
pub fn describe(e: &octocrab::Error) -> String {
    match e {
        octocrab::Error::GitHub { source, .. } => {
            format!("GitHub answered {}: {}", source.status_code.as_u16(), source.message)
        }
        other => other.to_string(),
    }
}
