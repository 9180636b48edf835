//! `[mcp.NAME]`: Model Context Protocol servers a trigger may give its agent
//! (`[job] mcp = ["NAME"]`).
//!
//! A server is a command the agent's CLI starts (stdio) or a URL it calls
//! (streamable HTTP). Values of `env` and `headers` may be secrets
//! (`env:NAME`, `file:PATH`), read here at load time like every other
//! secret; `engine::mcp` hands them to the CLI through its environment, so
//! they are never written into a file or onto a command line.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{resolve_secret, Secret};
use crate::sandbox::egress::{rule_for_url, HostRule};

/// One declared server.
#[derive(Debug, Clone)]
pub struct McpServer {
    pub name: String,
    pub(crate) transport: McpTransport,
}

#[derive(Debug, Clone)]
pub enum McpTransport {
    /// Started by the CLI, inside the agent's sandbox.
    Stdio { command: Vec<String>, env: BTreeMap<String, McpValue> },
    /// Reached through the sandbox's egress proxy; its host is allowed.
    Http { url: String, host: HostRule, headers: BTreeMap<String, McpValue> },
}

/// A value given as is, or read from a secret reference.
#[derive(Debug, Clone)]
pub enum McpValue {
    Plain(String),
    Secret(Secret),
}

impl McpValue {
    pub(crate) fn expose(&self) -> &str {
        match self {
            McpValue::Plain(s) => s,
            McpValue::Secret(s) => s.expose(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMcp {
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    url: Option<Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
}

/// Variables a server's `env` may not set: the agent's CLI runs with them,
/// and a server's value would replace the sandbox's.
const RESERVED_VARS: [&str; 8] =
    ["PATH", "HOME", "TMPDIR", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE"];

/// The name under which a team's agent finds baton's own `/mcp`.
pub const TEAM_SERVER: &str = "baton";

/// A problem in one server's table, at a span of the file.
pub(super) struct McpError {
    pub span: std::ops::Range<usize>,
    pub message: String,
}

/// Where secrets of one server were read from.
#[derive(Default)]
pub(super) struct SecretSources {
    pub files: Vec<std::path::PathBuf>,
    pub vars: Vec<String>,
}

pub(super) fn load(
    name: &str,
    raw: &Spanned<RawMcp>,
    base: &Path,
    sources: &mut SecretSources,
) -> Result<McpServer, Vec<McpError>> {
    let err =
        |span: std::ops::Range<usize>, message: String| McpError { span, message: format!("mcp.{name}: {message}") };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(vec![err(raw.span(), "a server name is letters, digits, `-` and `_`".into())]);
    }
    if name == TEAM_SERVER {
        return Err(vec![err(
            raw.span(),
            "`baton` is baton's own server, given to agents with `[job] delegate`".into(),
        )]);
    }
    let r = raw.get_ref();
    let mut errors = Vec::new();
    let mut value = |v: &Spanned<String>| -> Result<McpValue, McpError> {
        let text = v.get_ref();
        if !(text.starts_with("env:") || text.starts_with("file:")) {
            return Ok(McpValue::Plain(text.clone()));
        }
        if let Some(file) = text.strip_prefix("file:") {
            sources.files.push(base.join(file));
        }
        if let Some(var) = text.strip_prefix("env:") {
            sources.vars.push(var.to_string());
        }
        resolve_secret(text, base).map(McpValue::Secret).map_err(|msg| err(v.span(), msg))
    };
    let transport = match (&r.command, &r.url) {
        (Some(command), None) => {
            if command.get_ref().first().is_none_or(|p| p.trim().is_empty()) {
                return Err(vec![err(command.span(), "`command` must name a program".into())]);
            }
            if let Some((_, h)) = r.headers.iter().next() {
                return Err(vec![err(h.span(), "`headers` are for an HTTP server (`url`)".into())]);
            }
            let mut env = BTreeMap::new();
            for (key, v) in &r.env {
                let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid || RESERVED_VARS.contains(&key.as_str()) || key.starts_with("BATON_") {
                    errors.push(err(
                        v.span(),
                        format!("`{key}` cannot be set for a server (a variable name, not PATH, HOME, a proxy's or BATON_*)"),
                    ));
                    continue;
                }
                match value(v) {
                    Ok(v) => {
                        env.insert(key.clone(), v);
                    }
                    Err(e) => errors.push(e),
                }
            }
            McpTransport::Stdio { command: command.get_ref().clone(), env }
        }
        (None, Some(url)) => {
            if let Some((_, v)) = r.env.iter().next() {
                return Err(vec![err(v.span(), "`env` is for a stdio server (`command`); use `headers`".into())]);
            }
            let web = url.get_ref().starts_with("https://") || url.get_ref().starts_with("http://");
            let Some(host) = rule_for_url(url.get_ref()).filter(|_| web) else {
                return Err(vec![err(
                    url.span(),
                    format!("invalid url `{}`: expected http:// or https://", url.get_ref()),
                )]);
            };
            let mut headers = BTreeMap::new();
            for (key, v) in &r.headers {
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                    errors.push(err(v.span(), format!("`{key}` is not a header name")));
                    continue;
                }
                match value(v) {
                    Ok(v) => {
                        headers.insert(key.clone(), v);
                    }
                    Err(e) => errors.push(e),
                }
            }
            McpTransport::Http { url: url.get_ref().clone(), host, headers }
        }
        _ => return Err(vec![err(raw.span(), "give either `command` (a stdio server) or `url` (an HTTP one)".into())]),
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(McpServer { name: name.to_string(), transport })
}

impl McpServer {
    /// Its secret values, so output can be scrubbed of them.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        let values = match &self.transport {
            McpTransport::Stdio { env, .. } => env.values(),
            McpTransport::Http { headers, .. } => headers.values(),
        };
        values.filter_map(|v| match v {
            McpValue::Secret(s) => Some(s),
            McpValue::Plain(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, McpTransport, McpValue};
    use std::path::Path;

    fn first_error(src: &str) -> String {
        match Config::from_source(None, src, Path::new("/etc/baton")) {
            Ok(_) => String::new(),
            Err(e) => e[0].to_string(),
        }
    }

    #[test]
    fn a_server_is_a_command_or_a_url_with_its_values_read_like_secrets() {
        std::env::set_var("BATON_TEST_MCP_SECRET", "sek-mcp-1");
        let c = Config::from_source(
            None,
            "[mcp.s]\ncommand = [\"srv\", \"--x\"]\nenv = { K = \"env:BATON_TEST_MCP_SECRET\", L = \"info\" }\n\
             [mcp.h]\nurl = \"https://mcp.example.com/mcp\"\nheaders = { Authorization = \"Bearer x\" }\n",
            Path::new("/etc/baton"),
        )
        .unwrap();
        let McpTransport::Stdio { env, .. } = &c.mcp["s"].transport else { panic!("stdio") };
        assert!(matches!(&env["K"], McpValue::Secret(s) if s.expose() == "sek-mcp-1"));
        assert!(matches!(&env["L"], McpValue::Plain(s) if s == "info"));
        // Scrubbed from output like every secret; a plain value is not.
        let secrets: Vec<String> = c.secrets().iter().map(|s| s.expose().to_string()).collect();
        assert!(secrets.contains(&"sek-mcp-1".to_string()) && !secrets.contains(&"info".to_string()));
        assert!(c.secret_vars.contains(&"BATON_TEST_MCP_SECRET".to_string()));
        let McpTransport::Http { host, .. } = &c.mcp["h"].transport else { panic!("http") };
        assert_eq!(host.to_string(), "mcp.example.com:443");
    }

    #[test]
    fn a_bad_server_is_an_error_where_it_is_written() {
        for (src, expect) in [
            ("[mcp.s]\nenv = {}\n", "1:1: mcp.s: give either `command` (a stdio server) or `url`"),
            ("[mcp.s]\ncommand = [\"a\"]\nurl = \"https://x\"\n", "mcp.s: give either"),
            ("[mcp.s]\ncommand = [\"a\"]\nenv = { PATH = \"/x\" }\n", "3:16: mcp.s: `PATH` cannot be set"),
            ("[mcp.s]\ncommand = [\"a\"]\nenv = { K = \"env:BATON_TEST_SURELY_UNSET\" }\n", "environment variable"),
            ("[mcp.s]\nurl = \"ftp://x\"\n", "2:7: mcp.s: invalid url `ftp://x`"),
            ("[mcp.s]\nurl = \"https://x\"\nenv = { K = \"v\" }\n", "`env` is for a stdio server"),
            ("[mcp.\"a b\"]\ncommand = [\"a\"]\n", "a server name is letters"),
        ] {
            let err = first_error(src);
            assert!(err.contains(expect), "{src}: {err}");
        }
    }
}
