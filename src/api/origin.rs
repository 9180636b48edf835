//! Who may talk to the API and the dashboard from a browser.
//!
//! A daemon on loopback is still reachable from any web page its user
//! opens: through DNS rebinding (an attacker's name that resolves to
//! 127.0.0.1, so the browser sends `Host: attacker.example`) and through
//! cross-site form posts. So a request whose `Host` is not a name this
//! daemon answers to gets 421, and a state-changing request whose `Origin`
//! is another site, or that the browser marks `Sec-Fetch-Site: cross-site`,
//! gets 403. Clients that send neither header (curl, `baton jobs`) pass.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// The host names (any port) this daemon answers to.
#[derive(Debug, Clone)]
pub(crate) struct Hosts {
    names: Vec<String>,
    /// Listening on every address: any IP literal is this machine (a
    /// rebinding attack needs a name, never a literal).
    any_ip: bool,
}

impl Hosts {
    /// The listen address, `localhost`, and `public_url`'s host.
    pub fn new(listen: SocketAddr, public_url: Option<&str>) -> Hosts {
        let mut names = vec!["localhost".to_string(), listen.ip().to_string()];
        if listen.ip().is_loopback() {
            names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
        }
        if let Some(host) = public_url.and_then(url_host) {
            names.push(host);
        }
        Hosts { names, any_ip: listen.ip().is_unspecified() }
    }

    fn allows(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        self.names.contains(&host) || (self.any_ip && host.parse::<IpAddr>().is_ok())
    }
}

/// The host of `scheme://host[:port]/…`.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next()?;
    host_of(authority)
}

/// The host of a `Host` header value or URL authority: `name`, `name:port`,
/// `[v6]:port`.
fn host_of(authority: &str) -> Option<String> {
    let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority).trim();
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split_once(']')?.0,
        None => authority.split(':').next()?,
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

pub(crate) async fn same_site(State(hosts): State<Arc<Hosts>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).and_then(host_of);
    if !host.as_deref().is_some_and(|h| hosts.allows(h)) {
        let shown = host.unwrap_or_else(|| "(none)".into());
        return (
            StatusCode::MISDIRECTED_REQUEST,
            Json(json!({ "error": format!("this daemon does not answer to host `{shown}`; set server.public_url to the name you reach it by") })),
        )
            .into_response();
    }
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if changes_state {
        let cross_site =
            headers.get("sec-fetch-site").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        let foreign_origin = headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|o| o == "null" || !url_host(o).is_some_and(|h| hosts.allows(&h)));
        if cross_site || foreign_origin {
            return (
                StatusCode::FORBIDDEN,
                Json(json!({ "error": "cross-site requests may not change anything here" })),
            )
                .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_answers_to_its_own_names_only() {
        let h = Hosts::new("127.0.0.1:8787".parse().unwrap(), Some("https://baton.example.com/"));
        for ok in ["127.0.0.1", "localhost", "::1", "baton.example.com"] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in ["attacker.example", "127.0.0.1.nip.io", "10.0.0.1"] {
            assert!(!h.allows(bad), "{bad}");
        }
        assert_eq!(host_of("127.0.0.1:8787").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:8787").as_deref(), Some("::1"));
        assert_eq!(url_host("http://Evil.Example:80/x").as_deref(), Some("evil.example"));
    }

    #[test]
    fn every_address_answers_to_ip_literals_but_not_other_names() {
        let h = Hosts::new("0.0.0.0:8787".parse().unwrap(), None);
        assert!(h.allows("192.0.2.7") && h.allows("localhost"));
        assert!(!h.allows("attacker.example"));
    }
}
