//! Network egress for sandboxed agents: the allowlist (`[agents.NAME]
//! network`), and the filtering HTTP proxy each run reaches through a Unix
//! socket bridged into its otherwise empty network namespace.
//!
//! The proxy speaks just enough HTTP/1.1: `CONNECT host:port` (HTTPS and
//! anything tunnelled), and absolute-form requests (`GET http://host/…`),
//! which are forwarded with `Connection: close` so a client cannot reuse the
//! upstream connection for another host. Every refused destination is
//! counted for the run's attempt record. The proxy never reads what flows
//! through a tunnel.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// One allowlist entry: a host (exact, `*.suffix`, or `*` for all) and an
/// optional port (none: any port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com`: any subdomain of `example.com`, not itself.
    Suffix(String),
}

impl HostRule {
    /// `host`, `host:port`, `*.domain`, `*`, `[v6]`, `[v6]:port` or a bare IPv6 address.
    pub fn parse(entry: &str) -> Result<HostRule, String> {
        let bad = |why: &str| format!("invalid network entry `{entry}`: {why}");
        let entry_t = entry.trim();
        if entry_t.is_empty() {
            return Err(bad("empty"));
        }
        if entry_t == "*" {
            return Ok(HostRule { host: HostPattern::Any, port: None });
        }
        let (host, port) = split_host_port(entry_t).map_err(|w| bad(&w))?;
        let host = host.to_ascii_lowercase();
        if host.parse::<IpAddr>().is_ok() {
            return Ok(HostRule { host: HostPattern::Exact(host), port });
        }
        let (pattern, name) = match host.strip_prefix("*.") {
            Some(rest) => (HostPattern::Suffix(rest.to_string()), rest),
            None => (HostPattern::Exact(host.clone()), host.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if name.is_empty() || !name.split('.').all(label_ok) {
            return Err(bad("expected a host name, an IP address, `*.domain` or `*`, with an optional `:port`"));
        }
        Ok(HostRule { host: pattern, port })
    }

    /// Exactly `host` (an IP address or a lowercase name), at `port` or any.
    pub fn exact(host: &str, port: Option<u16>) -> HostRule {
        HostRule { host: HostPattern::Exact(host.to_ascii_lowercase()), port }
    }

    pub(crate) fn allows(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(h) => *h == host,
            HostPattern::Suffix(s) => {
                host.len() > s.len() + 1 && host.ends_with(s.as_str()) && {
                    let cut = host.len() - s.len();
                    host.as_bytes()[cut - 1] == b'.'
                }
            }
        }
    }
}

impl HostRule {
    /// Whether this entry names `host` itself (no wildcard) and allows `port`.
    pub(crate) fn names_exactly(&self, host: &str, port: u16) -> bool {
        matches!(self.host, HostPattern::Exact(_)) && self.allows(host, port)
    }
}

/// Addresses of the host itself, its networks, or nothing routable:
/// loopback, private (RFC 1918, unique local), link-local (cloud metadata
/// lives there), shared (CGNAT), unspecified, multicast and broadcast.
pub(crate) fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_internal(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (s[0] & 0xfe00) == 0xfc00
                    || (s[0] & 0xffc0) == 0xfe80
            }
        },
    }
}

impl std::fmt::Display for HostRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            HostPattern::Any => f.write_str("*")?,
            HostPattern::Exact(h) if h.contains(':') => write!(f, "[{h}]")?,
            HostPattern::Exact(h) => f.write_str(h)?,
            HostPattern::Suffix(s) => write!(f, "*.{s}")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

/// `host[:port]`, with IPv6 in brackets (or bare, without a port).
fn split_host_port(s: &str) -> Result<(&str, Option<u16>), String> {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("bad port `{p}`"));
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed `[`")?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(port(p)?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err("unexpected text after `]`".into()),
        };
    }
    if s.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((s, None));
    }
    match s.rsplit_once(':') {
        Some((host, p)) => Ok((host, Some(port(p)?))),
        None => Ok((s, None)),
    }
}

/// The host and port of a URL (`base_url`), as an allowlist entry.
pub(crate) fn rule_for_url(url: &str) -> Option<HostRule> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    let (host, port) = split_host_port(authority).ok()?;
    let port = port.or(match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    });
    let mut rule = HostRule::parse(host).ok()?;
    rule.port = port;
    Some(rule)
}

/// A destination the proxy refused, and how many times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    pub host: String,
    pub port: u16,
    pub count: u64,
}

/// What one run's proxy refused, shared with the engine.
#[derive(Debug, Clone, Default)]
pub struct Refusals(Arc<Mutex<BTreeMap<(String, u16), u64>>>);

impl Refusals {
    fn record(&self, host: &str, port: u16) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((host.to_ascii_lowercase(), port)).or_default() += 1;
    }

    pub fn list(&self) -> Vec<Blocked> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|((host, port), count)| Blocked { host: host.clone(), port: *port, count: *count }).collect()
    }
}

/// The init's report of a connection attempted around the proxy (never
/// forwarded; an agent that sends it only miscounts its own run).
pub(crate) const DIRECT_METHOD: &str = "BATON-DIRECT";

/// A request head is at most this long; longer is refused.
const MAX_HEAD: usize = 64 * 1024;

/// How long a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections one run's proxy serves at once.
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// Serves the proxy on `socket` until `stop` fires.
///
/// With `baton` (a team run), a request for `/mcp` — made to the proxy's own
/// address, directly or as a proxied request — goes to baton's API there.
pub fn serve(
    socket: &Path,
    rules: Arc<Vec<HostRule>>,
    baton: Option<SocketAddr>,
    refusals: Refusals,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = UnixListener::bind(socket)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(20)).await; continue; }
                },
                _ = stop.cancelled() => return,
            };
            // Past its share, a run's connection is closed at once: an agent
            // holding thousands open would take the daemon's descriptors.
            let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
            let (rules, refusals, stop) = (rules.clone(), refusals.clone(), stop.clone());
            tokio::spawn(async move {
                let _slot = slot;
                tokio::select! {
                    _ = handle(stream, &rules, baton, &refusals) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    Ok(())
}

/// Where a request wants to go, and what to send upstream first.
struct Target {
    host: String,
    port: u16,
    /// `None` for CONNECT; else the request head rewritten to origin form.
    forward: Option<Vec<u8>>,
}

async fn handle(stream: UnixStream, rules: &[HostRule], baton: Option<SocketAddr>, refusals: &Refusals) {
    let mut client = BufReader::new(stream);
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(head)) => head,
        _ => return,
    };
    if let Some(rest) = head.strip_prefix(DIRECT_METHOD.as_bytes()) {
        let dest = String::from_utf8_lossy(rest);
        if let Some(Ok((host, Some(port)))) = dest.split_whitespace().next().map(split_host_port) {
            refusals.record(host.trim_start_matches('[').trim_end_matches(']'), port);
        }
        // Counted: the init lets the agent's connect go on.
        let _ = client.get_mut().write_all(b"k").await;
        return;
    }
    // A client that tunnels everything (undici's ProxyAgent, in Gemini CLI)
    // asks to CONNECT to the proxy's own address: the tunnel's first request
    // is then the one that may go to baton.
    let mut head = head;
    if baton.is_some() && connects_to_proxy(&head) {
        if client.get_mut().write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err() {
            return;
        }
        head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
            Ok(Ok(head)) => head,
            _ => return,
        };
    }
    let to_baton = baton.and_then(|addr| to_baton(&head, addr).map(|h| (addr, h)));
    let for_baton = to_baton.is_some();
    let target = match to_baton {
        Some((addr, forward)) => Ok(Target { host: addr.ip().to_string(), port: addr.port(), forward: Some(forward) }),
        None => parse_head(&head),
    };
    let allowed = |t: &Target| for_baton || rules.iter().any(|r| r.allows(&t.host, t.port));
    let target = match target {
        Ok(t) => t,
        Err(why) => {
            let _ = respond(client.get_mut(), "400 Bad Request", &format!("baton proxy: {why}\n")).await;
            return;
        }
    };
    if !allowed(&target) {
        refusals.record(&target.host, target.port);
        let why = format!(
            "baton: egress to {}:{} is not allowed for this agent (add it to the agent's `network` in baton.toml)\n",
            target.host, target.port
        );
        let _ = respond(client.get_mut(), "403 Forbidden", &why).await;
        return;
    }
    let host = target.host.trim_start_matches('[').trim_end_matches(']').to_string();
    // Resolved here, once: the addresses checked are the ones connected to.
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), target.port)).await {
        Ok(a) => a.collect(),
        Err(e) => {
            let _ = respond(client.get_mut(), "502 Bad Gateway", &format!("baton proxy: {e}\n")).await;
            return;
        }
    };
    // The host's own services (baton's API among them), its network and its
    // cloud's metadata answer only to a rule that names them exactly.
    let named = for_baton || rules.iter().any(|r| r.names_exactly(&target.host, target.port));
    let addrs: Vec<SocketAddr> = addrs.into_iter().filter(|a| named || !is_internal(a.ip())).collect();
    if addrs.is_empty() {
        refusals.record(&target.host, target.port);
        let why = format!(
            "baton: {}:{} is an address of this host or its network, which only an exact entry in the agent's \
             `network` reaches (not `*` or `*.domain`)\n",
            target.host, target.port
        );
        let _ = respond(client.get_mut(), "403 Forbidden", &why).await;
        return;
    }
    let upstream = match tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(&addrs[..])).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let _ = respond(client.get_mut(), "502 Bad Gateway", &format!("baton proxy: {e}\n")).await;
            return;
        }
        Err(_) => {
            let _ = respond(client.get_mut(), "504 Gateway Timeout", "baton proxy: connect timed out\n").await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut upstream = upstream;
    match &target.forward {
        None => {
            if client.get_mut().write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err() {
                return;
            }
        }
        Some(head) => {
            if upstream.write_all(head).await.is_err() {
                return;
            }
        }
    }
    // Bytes the client sent after its head are still in the reader's buffer.
    let buffered = client.buffer().to_vec();
    if !buffered.is_empty() && upstream.write_all(&buffered).await.is_err() {
        return;
    }
    let mut client = client.into_inner();
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Whether `head` is a CONNECT to the proxy's own address.
fn connects_to_proxy(head: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(head) else { return false };
    let mut parts = text.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return false };
    method.eq_ignore_ascii_case("CONNECT")
        && matches!(split_host_port(target), Ok(("127.0.0.1" | "localhost", Some(super::PROXY_PORT))))
}

/// A request for baton's `/mcp`, rewritten for its API at `addr`: the path
/// `/mcp` asked of the proxy itself (`POST /mcp`, or `POST
/// http://127.0.0.1:3128/mcp` from a client that proxies everything). Its
/// `Host` becomes one the API answers to; nothing else reaches the API.
fn to_baton(head: &[u8], addr: SocketAddr) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let mut parts = lines.next()?.split_whitespace();
    let (method, uri, version) = (parts.next()?, parts.next()?, parts.next()?);
    let path = match uri.strip_prefix("http://") {
        Some(rest) => {
            let (authority, path) = rest.find('/').map(|i| rest.split_at(i))?;
            let (host, port) = split_host_port(authority).ok()?;
            let ours = matches!(host, "127.0.0.1" | "localhost") && port == Some(super::PROXY_PORT);
            ours.then_some(path)?
        }
        None => uri,
    };
    let bare = path.split(['?', '#']).next()?;
    if bare != "/mcp" || method.eq_ignore_ascii_case("CONNECT") {
        return None;
    }
    let host = format!("localhost:{}", addr.port());
    Some(origin_form(method, path, version, lines, Some(&host)))
}

async fn read_head(r: &mut BufReader<UnixStream>) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head).await?;
        if n == 0 || head.len() > MAX_HEAD {
            return Err(std::io::Error::other("no complete request head"));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(head);
        }
    }
}

fn parse_head(head: &[u8]) -> Result<Target, String> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8".to_string())?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (method, uri, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(u), Some(v)) => (m, u, v),
        _ => return Err(format!("malformed request line `{first}`")),
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_host_port(uri).map_err(|e| format!("bad CONNECT target: {e}"))?;
        let port = port.ok_or("CONNECT needs host:port")?;
        return Ok(Target { host: host.to_string(), port, forward: None });
    }
    let rest = uri.strip_prefix("http://").ok_or_else(|| {
        "only CONNECT and absolute http:// requests go through this proxy (is HTTP_PROXY set?)".to_string()
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority).map_err(|e| format!("bad URL host: {e}"))?;
    let forward = origin_form(method, path, version, lines, None);
    Ok(Target { host: host.to_string(), port: port.unwrap_or(80), forward: Some(forward) })
}

/// A request head in origin form, as the proxy sends it on: its headers
/// without the proxy's and connection ones (and `Host`, when `host` replaces
/// it), closed after one answer so the connection cannot be reused.
fn origin_form<'a>(
    method: &str,
    path: &str,
    version: &str,
    headers: impl Iterator<Item = &'a str>,
    host: Option<&str>,
) -> Vec<u8> {
    let mut out = format!("{method} {path} {version}\r\n");
    for line in headers.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
        let dropped = matches!(name.as_str(), "connection" | "proxy-connection" | "proxy-authorization" | "keep-alive")
            || (host.is_some() && name == "host");
        if !dropped {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    if let Some(host) = host {
        out.push_str(&format!("Host: {host}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

async fn respond(w: &mut UnixStream, status: &str, body: &str) -> std::io::Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    w.write_all(msg.as_bytes()).await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rule: &str, host: &str, port: u16, expect: bool) {
        let r = HostRule::parse(rule).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.allows(host, port), expect, "{rule} vs {host}:{port}");
    }

    #[test]
    fn internal_addresses_need_an_exact_rule() {
        for ip in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0"] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["::1", "fd00::1", "fe80::1", "::ffff:127.0.0.1", "::"] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1", "100.128.0.1"] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
        assert!(HostRule::parse("127.0.0.1:8080").unwrap().names_exactly("127.0.0.1", 8080));
        assert!(!HostRule::parse("*").unwrap().names_exactly("127.0.0.1", 8080));
        assert!(!HostRule::parse("*.example.com").unwrap().names_exactly("a.example.com", 443));
        assert!(HostRule::parse("svc.internal").unwrap().names_exactly("svc.internal", 443));
    }

    #[test]
    fn rules_match_hosts_and_ports() {
        check("api.anthropic.com", "api.anthropic.com", 443, true);
        check("api.anthropic.com", "API.Anthropic.com", 80, true);
        check("api.anthropic.com", "evil.com", 443, false);
        check("api.anthropic.com", "api.anthropic.com.evil.com", 443, false);
        check("registry.npmjs.org:443", "registry.npmjs.org", 443, true);
        check("registry.npmjs.org:443", "registry.npmjs.org", 80, false);
        check("*.example.com", "a.b.example.com", 1, true);
        check("*.example.com", "example.com", 1, false);
        check("*.example.com", "badexample.com", 1, false);
        check("*", "anything", 9, true);
        check("127.0.0.1:8080", "127.0.0.1", 8080, true);
        check("127.0.0.1:8080", "127.0.0.1", 8081, false);
        check("[::1]:9", "[::1]", 9, true);
        check("::1", "::1", 5, true);
    }

    #[test]
    fn bad_entries_say_why() {
        for bad in ["", "a b", "host:0", "host:99999", "[::1", "exa mple.com", "http://x", "a..b"] {
            let e = HostRule::parse(bad).unwrap_err();
            assert!(e.starts_with("invalid network entry"), "{bad}: {e}");
        }
    }

    #[test]
    fn base_urls_become_rules_with_their_port() {
        assert_eq!(rule_for_url("http://127.0.0.1:9/v1").unwrap().to_string(), "127.0.0.1:9");
        assert_eq!(rule_for_url("https://gw.example.com/x").unwrap().to_string(), "gw.example.com:443");
        assert_eq!(rule_for_url("http://[::1]:7").unwrap().to_string(), "[::1]:7");
    }

    #[test]
    fn absolute_requests_are_rewritten_to_origin_form_and_closed() {
        let t = parse_head(
            b"GET http://h.example:81/a?b HTTP/1.1\r\nHost: h.example:81\r\nProxy-Connection: keep-alive\r\n\r\n",
        )
        .unwrap();
        assert_eq!((t.host.as_str(), t.port), ("h.example", 81));
        let fwd = String::from_utf8(t.forward.unwrap()).unwrap();
        assert_eq!(fwd, "GET /a?b HTTP/1.1\r\nHost: h.example:81\r\nConnection: close\r\n\r\n");
        let t = parse_head(b"CONNECT api.x.com:443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.forward.is_none()), ("api.x.com", 443, true));
        assert!(parse_head(b"GET /relative HTTP/1.1\r\n\r\n").is_err());
    }

    #[test]
    fn mcp_asked_of_the_proxy_goes_to_baton_and_nothing_else_does() {
        let addr: SocketAddr = "127.0.0.1:8787".parse().unwrap();
        let head = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:3128\r\nAuthorization: Bearer x\r\n\r\n";
        let fwd = String::from_utf8(to_baton(head, addr).unwrap()).unwrap();
        assert_eq!(
            fwd,
            "POST /mcp HTTP/1.1\r\nAuthorization: Bearer x\r\nHost: localhost:8787\r\nConnection: close\r\n\r\n"
        );
        let proxied = to_baton(b"POST http://127.0.0.1:3128/mcp?x HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n\r\n", addr);
        assert!(String::from_utf8(proxied.unwrap()).unwrap().starts_with("POST /mcp?x HTTP/1.1\r\n"));
        for other in [
            b"GET /api/jobs HTTP/1.1\r\n\r\n".as_slice(),
            b"POST http://example.com/mcp HTTP/1.1\r\n\r\n",
            b"POST http://127.0.0.1:8787/mcp HTTP/1.1\r\n\r\n",
            b"POST /mcpx HTTP/1.1\r\n\r\n",
            b"POST /mcp/../api/jobs HTTP/1.1\r\n\r\n",
            b"CONNECT 127.0.0.1:3128 HTTP/1.1\r\n\r\n",
        ] {
            assert!(to_baton(other, addr).is_none(), "{}", String::from_utf8_lossy(other));
        }
        assert!(connects_to_proxy(b"CONNECT 127.0.0.1:3128 HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n\r\n"));
        assert!(connects_to_proxy(b"CONNECT localhost:3128 HTTP/1.1\r\n\r\n"));
        assert!(!connects_to_proxy(b"CONNECT 127.0.0.1:8787 HTTP/1.1\r\n\r\n"));
        assert!(!connects_to_proxy(b"CONNECT example.com:3128 HTTP/1.1\r\n\r\n"));
    }
}
