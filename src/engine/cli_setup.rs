//! What a preset CLI is given at the start of a run besides its command:
//! the job's MCP servers (`[job] mcp`) in the CLI's own configuration, and
//! the settings Gemini CLI reads from its `HOME`.
//!
//! Secret values never reach a file or a command line: each becomes a
//! variable of the CLI's environment, and the configuration names the
//! variable (`${VAR}` for Claude Code and Gemini CLI, `env_vars` and
//! `env_http_headers` for Codex). Command lines are readable by any local
//! user in `/proc`; the configuration file sits in the run's io folder,
//! outside the worktree, and is removed with it.
//!
//! A stdio server runs inside the agent's sandbox, as a child of the CLI: the
//! agent could read what it holds, so a server should get a token scoped to
//! what the agent may do.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::{McpServer, McpTransport, McpValue, Preset, TEAM_SERVER};
use crate::sandbox::egress::HostRule;

/// What the agent's CLI is given so it can reach the job's servers.
#[derive(Debug, Default, Clone)]
pub struct Setup {
    /// Options inserted after the program (after `exec` for Codex).
    pub args: Vec<String>,
    /// Variables set on the CLI: the servers' values, secrets among them.
    pub env: Vec<(String, String)>,
    /// Files written into the run's io folder before it starts: name and text.
    pub files: Vec<(String, String)>,
    /// Files written into the sandbox's `HOME` (a path under it, and text).
    pub(crate) home_files: Vec<(String, String)>,
    /// Hosts the sandbox may reach besides the agent's own (HTTP servers).
    pub network: Vec<HostRule>,
    /// Shown read-only in the sandbox: each stdio server's program, and the
    /// absolute paths among its arguments that exist (its script, say).
    pub(crate) expose: Vec<PathBuf>,
    /// A team run: the API address the sandbox's proxy forwards `/mcp` to.
    pub baton: Option<std::net::SocketAddr>,
}

/// A team run's way to baton's own `/mcp` (`[job] delegate`).
#[derive(Debug, Clone)]
pub(crate) struct TeamAccess {
    /// As the agent reaches it: through its sandbox's proxy, or directly.
    pub url: String,
    /// The run's token (engine::team).
    pub token: String,
    /// Where the sandbox's proxy forwards `/mcp` (none unsandboxed).
    pub(crate) upstream: Option<std::net::SocketAddr>,
}

/// Why a job's servers cannot be given to its agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error(
        "agent `{0}` is not one of the codex, claude and gemini CLIs, so baton cannot give it MCP servers \
         (set `preset` on the agent, or drop `mcp` from the trigger)"
    )]
    Unsupported(String),
    #[error("MCP server `{0}` is no longer configured (was baton.toml reloaded?)")]
    Missing(String),
    #[error(
        "Gemini CLI reads MCP servers only from its HOME's settings, which baton writes only in its sandbox          ([sandbox] enabled = false here)"
    )]
    GeminiUnsandboxed,
}

/// The Claude Code file of `--mcp-config`.
pub(crate) const CLAUDE_FILE: &str = "mcp.json";
/// Gemini CLI's user settings, under its `HOME`. (0.61 ignores a file named
/// by `GEMINI_CLI_SYSTEM_SETTINGS_PATH` for both of the keys used here.)
pub(crate) const GEMINI_FILE: &str = ".gemini/settings.json";

/// The variable that carries header number `index` of HTTP server `server`.
/// (A stdio server's variables keep their own names: the CLI passes them on
/// under those.)
fn header_var(server: &str, index: usize) -> String {
    let server: String =
        server.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("BATON_MCP_{server}_HEADER_{index}")
}

/// A TOML basic string: JSON's escaping is a subset of TOML's.
fn toml_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// Renders `names` (checked against `servers`) for `agent`'s CLI, with
/// baton's own server for a team run; `io_dir` is where the run's files go,
/// `sandboxed` whether it has a `HOME` of its own.
///
/// A team run's agent also finds `BATON_MCP_URL` and `BATON_MCP_TOKEN` in
/// its environment, so a program that is none of the preset CLIs can call
/// baton too.
pub fn setup(
    agent: &crate::config::AgentDef,
    names: &[String],
    servers: &std::collections::BTreeMap<String, McpServer>,
    io_dir: &Path,
    sandboxed: bool,
    team: Option<&TeamAccess>,
) -> Result<Option<Setup>, SetupError> {
    let gateway = agent.cli == Some(Preset::Gemini) && gemini_base_url(agent);
    if names.is_empty() && team.is_none() && !(gateway && sandboxed) {
        return Ok(None);
    }
    let mut out = Setup::default();
    let team_server = team.map(|t| {
        out.env.push(("BATON_MCP_URL".into(), t.url.clone()));
        out.env.push(("BATON_MCP_TOKEN".into(), t.token.clone()));
        out.baton = t.upstream;
        let auth = McpValue::Plain(format!("Bearer {}", t.token));
        McpServer {
            name: TEAM_SERVER.to_string(),
            transport: McpTransport::Http {
                url: t.url.clone(),
                // Never allowed as a destination: the proxy itself answers it.
                host: HostRule::exact("127.0.0.1", Some(crate::sandbox::PROXY_PORT)),
                headers: [("Authorization".to_string(), auth)].into(),
            },
        }
    });
    let cli = match agent.cli {
        Some(cli @ (Preset::Claude | Preset::Codex | Preset::Gemini)) => cli,
        // Any other program reads the variables.
        _ if names.is_empty() => return Ok(Some(out)),
        _ => return Err(SetupError::Unsupported(agent.name.clone())),
    };
    let mut chosen: Vec<&McpServer> =
        names.iter().map(|n| servers.get(n).ok_or_else(|| SetupError::Missing(n.clone()))).collect::<Result<_, _>>()?;
    chosen.extend(team_server.as_ref());
    let mut claude = Map::new();
    for server in &chosen {
        let name = &server.name;
        match &server.transport {
            McpTransport::Stdio { command, env } => {
                out.env.extend(env.iter().map(|(k, v)| (k.clone(), v.expose().to_string())));
                out.expose.extend(visible_paths(command));
                let (program, args) = (&command[0], &command[1..]);
                match cli {
                    Preset::Codex => {
                        let args: Vec<String> = args.iter().map(|a| toml_str(a)).collect();
                        let vars: Vec<String> = env.keys().map(|k| toml_str(k)).collect();
                        out.args.extend([
                            "-c".to_string(),
                            format!(
                                "mcp_servers.{name}={{ command = {}, args = [{}], env_vars = [{}] }}",
                                toml_str(program),
                                args.join(", "),
                                vars.join(", ")
                            ),
                        ]);
                    }
                    _ => {
                        let env: Map<String, Value> =
                            env.keys().map(|k| (k.clone(), Value::String(format!("${{{k}}}")))).collect();
                        let mut entry = json!({"command": program, "args": args, "env": env});
                        if cli == Preset::Claude {
                            entry["type"] = json!("stdio");
                        } else {
                            // Headless Gemini refuses a tool call it would
                            // ask about; the trigger's author chose the server.
                            entry["trust"] = json!(true);
                        }
                        claude.insert(name.clone(), entry);
                    }
                }
            }
            McpTransport::Http { url, host, headers } => {
                if server.name != TEAM_SERVER {
                    out.network.push(host.clone());
                }
                let vars: Vec<(String, String)> =
                    headers.keys().enumerate().map(|(i, h)| (h.clone(), header_var(name, i))).collect();
                out.env.extend(headers.values().zip(&vars).map(|(v, (_, var))| (var.clone(), v.expose().to_string())));
                match cli {
                    Preset::Codex => {
                        let h: Vec<String> =
                            vars.iter().map(|(h, var)| format!("{} = {}", toml_str(h), toml_str(var))).collect();
                        out.args.extend([
                            "-c".to_string(),
                            format!(
                                "mcp_servers.{name}={{ url = {}, env_http_headers = {{ {} }} }}",
                                toml_str(url),
                                h.join(", ")
                            ),
                        ]);
                    }
                    _ => {
                        let h: Map<String, Value> =
                            vars.iter().map(|(h, var)| (h.clone(), Value::String(format!("${{{var}}}")))).collect();
                        let entry = if cli == Preset::Claude {
                            json!({"type": "http", "url": url, "headers": h})
                        } else {
                            json!({"httpUrl": url, "headers": h, "trust": true})
                        };
                        claude.insert(name.clone(), entry);
                    }
                }
            }
        }
    }
    let config = json!({ "mcpServers": claude }).to_string();
    match cli {
        Preset::Claude => {
            let allowed: Vec<String> = chosen.iter().map(|s| format!("mcp__{}", s.name)).collect();
            out.args.extend([
                "--mcp-config".to_string(),
                io_dir.join(CLAUDE_FILE).display().to_string(),
                "--strict-mcp-config".to_string(),
                // `-p` runs ask nobody: a tool not allowed is refused.
                "--allowedTools".to_string(),
                allowed.join(","),
            ]);
            out.files.push((CLAUDE_FILE.to_string(), config));
        }
        Preset::Gemini => {
            if !sandboxed && !chosen.is_empty() {
                return Err(SetupError::GeminiUnsandboxed);
            }
            let mut settings = json!({ "mcpServers": claude });
            // With GOOGLE_GEMINI_BASE_URL alone, Gemini CLI 0.61 takes the
            // auth type `gateway` and then refuses it in a headless run
            // ("Invalid auth method selected."): name the API key's.
            if gateway {
                settings["security"] = json!({"auth": {"selectedType": "gemini-api-key"}});
            }
            out.home_files.push((GEMINI_FILE.to_string(), settings.to_string()));
        }
        _ => {}
    }
    Ok(Some(out))
}

/// Whether Gemini CLI will run with `GOOGLE_GEMINI_BASE_URL` (the agent's
/// `base_url`, or passed through from baton's environment).
fn gemini_base_url(agent: &crate::config::AgentDef) -> bool {
    const VAR: &str = "GOOGLE_GEMINI_BASE_URL";
    agent.vars.contains_key(VAR) || (agent.env.iter().any(|e| e == VAR) && std::env::var_os(VAR).is_some())
}

/// The program (found on PATH) and absolute paths among the arguments,
/// outside the system folders the sandbox shows anyway.
fn visible_paths(command: &[String]) -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    super::agent::resolve_program(&command[0], &path, Path::new("/"))
        .into_iter()
        .chain(command[1..].iter().map(PathBuf::from).filter(|p| p.is_absolute()))
        .filter(|p| p.is_absolute() && p.exists() && !crate::sandbox::is_system_path(p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn servers() -> BTreeMap<String, McpServer> {
        let config = crate::config::Config::from_source(
            None,
            r#"
[mcp.probe]
command = ["python3", "-u", "/srv/probe.py"]
env = { PROBE_TOKEN = "s3cr3t-probe-value", LEVEL = "debug" }

[mcp.tracker]
url = "https://mcp.tracker.example/mcp"
headers = { Authorization = "Bearer s3cr3t-header-value" }
"#,
            Path::new("/etc/baton"),
        )
        .expect("valid");
        config.mcp
    }

    fn render(preset: Preset) -> Setup {
        let agent = preset.def(true);
        let names = vec!["probe".to_string(), "tracker".to_string()];
        setup(&agent, &names, &servers(), Path::new("/data/jobs/j1/io"), true, None).unwrap().unwrap()
    }

    /// No value, secret or not, is on the command line or in a file: only
    /// the names of the variables that carry them.
    fn no_value_in_args_or_files(s: &Setup) {
        for secret in ["s3cr3t-probe-value", "s3cr3t-header-value", "debug"] {
            assert!(!s.args.iter().any(|a| a.contains(secret)), "{secret} on the command line: {:?}", s.args);
            let files = s.files.iter().chain(&s.home_files);
            assert!(!files.into_iter().any(|(_, f)| f.contains(secret)), "{secret} in a file");
            assert!(s.env.iter().any(|(_, v)| v.contains(secret)), "{secret} is given through the environment");
        }
        assert_eq!(s.network.len(), 1);
        assert_eq!(s.network[0].to_string(), "mcp.tracker.example:443");
    }

    #[test]
    fn claude_gets_a_strict_config_file_and_permission_for_the_servers() {
        let s = render(Preset::Claude);
        no_value_in_args_or_files(&s);
        assert_eq!(
            s.args,
            [
                "--mcp-config",
                "/data/jobs/j1/io/mcp.json",
                "--strict-mcp-config",
                "--allowedTools",
                "mcp__probe,mcp__tracker"
            ]
        );
        let (name, text) = &s.files[0];
        assert_eq!(name, CLAUDE_FILE);
        let v: Value = serde_json::from_str(text).unwrap();
        let probe = &v["mcpServers"]["probe"];
        assert_eq!(probe["command"], "python3");
        assert_eq!(probe["args"], json!(["-u", "/srv/probe.py"]));
        assert_eq!(probe["env"]["PROBE_TOKEN"], "${PROBE_TOKEN}");
        let tracker = &v["mcpServers"]["tracker"];
        assert_eq!(tracker["type"], "http");
        assert_eq!(tracker["headers"]["Authorization"], "${BATON_MCP_TRACKER_HEADER_0}");
        assert!(s.env.contains(&("BATON_MCP_TRACKER_HEADER_0".into(), "Bearer s3cr3t-header-value".into())));
    }

    #[test]
    fn codex_gets_config_overrides_naming_variables() {
        let s = render(Preset::Codex);
        no_value_in_args_or_files(&s);
        assert!(s.files.is_empty());
        let tables: Vec<toml::Table> =
            s.args.iter().filter(|a| *a != "-c").map(|a| toml::from_str(a).expect("valid TOML")).collect();
        let probe = &tables[0]["mcp_servers"]["probe"];
        assert_eq!(probe["command"].as_str(), Some("python3"));
        assert_eq!(probe["env_vars"].as_array().map(Vec::len), Some(2));
        let tracker = &tables[1]["mcp_servers"]["tracker"];
        assert_eq!(tracker["env_http_headers"]["Authorization"].as_str(), Some("BATON_MCP_TRACKER_HEADER_0"));
        assert!(!s.args.iter().any(|a| a.contains("{{")), "never read as a template");
    }

    #[test]
    fn gemini_gets_settings_in_its_home_trusting_the_servers() {
        let s = render(Preset::Gemini);
        no_value_in_args_or_files(&s);
        assert!(s.args.is_empty() && s.files.is_empty());
        let (path, text) = &s.home_files[0];
        assert_eq!(path, ".gemini/settings.json");
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["mcpServers"]["probe"]["trust"], true);
        assert_eq!(v["mcpServers"]["probe"]["env"]["PROBE_TOKEN"], "${PROBE_TOKEN}");
        assert_eq!(v["mcpServers"]["tracker"]["httpUrl"], "https://mcp.tracker.example/mcp");
        assert!(v.get("security").is_none(), "no base_url: the auth type is the CLI's to choose");
        let names = ["probe".to_string()];
        let err = setup(&Preset::Gemini.def(false), &names, &servers(), Path::new("/io"), false, None).unwrap_err();
        assert!(err.to_string().contains("only in its sandbox"), "{err}");
    }

    #[test]
    fn gemini_behind_a_base_url_is_told_to_use_its_api_key() {
        let mut agent = Preset::Gemini.def(true);
        agent.vars.insert("GOOGLE_GEMINI_BASE_URL".into(), "http://127.0.0.1:9".into());
        let s = setup(&agent, &[], &servers(), Path::new("/io"), true, None).unwrap().expect("settings");
        let v: Value = serde_json::from_str(&s.home_files[0].1).unwrap();
        assert_eq!(v["security"]["auth"]["selectedType"], "gemini-api-key");
        // Unsandboxed, its HOME is the user's own: baton writes nothing there.
        assert!(setup(&agent, &[], &servers(), Path::new("/io"), false, None).unwrap().is_none());
        assert!(setup(&Preset::Claude.def(true), &[], &servers(), Path::new("/io"), true, None).unwrap().is_none());
    }

    #[test]
    fn an_agent_that_is_no_preset_cannot_be_given_servers() {
        let mut agent = Preset::Claude.def(true);
        agent.cli = None;
        agent.name = "mine".into();
        let err = setup(&agent, &["probe".to_string()], &servers(), Path::new("/io"), true, None).unwrap_err();
        assert!(err.to_string().contains("agent `mine`"), "{err}");
        let err = setup(&Preset::Claude.def(true), &["gone".to_string()], &servers(), Path::new("/io"), true, None)
            .unwrap_err();
        assert!(err.to_string().contains("`gone` is no longer configured"), "{err}");
    }

    /// A team run: every CLI gets baton's own server beside the job's, its
    /// token only in the environment, and no egress rule for it (the proxy
    /// answers it); a program that is no preset gets the variables alone.
    #[test]
    fn a_team_run_is_given_batons_own_server() {
        let token = "batonjob_0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab";
        let team = TeamAccess {
            url: "http://127.0.0.1:3128/mcp".into(),
            token: token.into(),
            upstream: Some("127.0.0.1:8787".parse().unwrap()),
        };
        for preset in [Preset::Claude, Preset::Codex, Preset::Gemini] {
            let s = setup(&preset.def(true), &["probe".into()], &servers(), Path::new("/io"), true, Some(&team))
                .unwrap()
                .unwrap();
            let files: Vec<&String> = s.files.iter().chain(&s.home_files).map(|(_, f)| f).collect();
            assert!(!s.args.iter().chain(files.iter().copied()).any(|a| a.contains(token)), "{preset:?}: {s:?}");
            let config = s.args.iter().chain(files).cloned().collect::<Vec<_>>().join(" ");
            assert!(config.contains("http://127.0.0.1:3128/mcp"), "{preset:?}: {config}");
            assert!(s.env.contains(&("BATON_MCP_TOKEN".into(), token.into())));
            assert!(s.env.contains(&("BATON_MCP_BATON_HEADER_0".into(), format!("Bearer {token}"))));
            assert_eq!(s.baton, team.upstream);
            assert!(s.network.iter().all(|r| r.to_string() != "127.0.0.1:3128"), "{:?}", s.network);
            if preset == Preset::Claude {
                let allowed = s.args.iter().skip_while(|a| *a != "--allowedTools").nth(1).unwrap();
                assert_eq!(allowed, "mcp__probe,mcp__baton");
            }
        }
        let mut script = Preset::Claude.def(true);
        script.cli = None;
        let s = setup(&script, &[], &servers(), Path::new("/io"), true, Some(&team)).unwrap().unwrap();
        assert!(s.args.is_empty() && s.files.is_empty());
        let names: Vec<&str> = s.env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["BATON_MCP_URL", "BATON_MCP_TOKEN"]);
    }
}
