//! `[agents.NAME]`: how an agent CLI is run, the built-in presets for Codex,
//! Claude Code, Gemini CLI and aider, and how a user's table is merged over
//! a preset.
//!
//! The tuning keys (`model`, `base_url`, `max_turns`, `budget_usd`) are
//! translated here, at load time, into each CLI's own flags and variables,
//! so a key a CLI cannot honour is a `path:line:col` error at start rather
//! than a flag the agent rejects at 3 a.m.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::HumanDuration;
use crate::sandbox::egress::{rule_for_url, HostRule};
use crate::sandbox::{parse_size, Profile};

/// How an agent command is run: what it is, how it gets its prompt and how
/// its answer is read back.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentDef {
    pub name: String,
    /// argv; each element is a minijinja template over `prompt`,
    /// `prompt_file` and `result_file`.
    pub command: Vec<String>,
    pub prompt: PromptMode,
    pub result: ResultMode,
    /// Environment variables passed through besides PATH and HOME.
    pub env: Vec<String>,
    /// Variables baton sets itself, after the passed-through ones. Never
    /// secrets: those are only ever passed through by name.
    pub vars: BTreeMap<String, String>,
    pub timeout: Duration,
    /// Told to the user when the command cannot be found.
    pub install: Option<String>,
    /// Jobs of this agent running at once, at most.
    pub max_parallel: Option<usize>,
    /// What its sandbox lets it see, reach and use.
    pub sandbox: Profile,
    /// How its CLI reports model use (besides `$BATON_USAGE_FILE`).
    pub usage: UsageFormat,
    /// The model it was told to use (`model`), for the price table.
    pub model: Option<String>,
    /// The preset CLI it drives, whose own format MCP servers are given in.
    pub cli: Option<Preset>,
}

/// Where an agent's model use is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageFormat {
    /// Only the agent's own `$BATON_USAGE_FILE`.
    #[default]
    None,
    /// Claude Code's `--output-format json` object.
    Claude,
    /// Codex's `--json` event stream.
    Codex,
    /// Gemini CLI's JSON output's `stats`.
    Gemini,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptMode {
    Stdin,
    Arg,
    File,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultMode {
    Stdout,
    File,
    /// A top-level field of a JSON object printed on stdout.
    Json(String),
}

impl<'de> Deserialize<'de> for ResultMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "stdout" => Ok(ResultMode::Stdout),
            "file" => Ok(ResultMode::File),
            _ => match s.strip_prefix("json:") {
                Some(field) if !field.is_empty() => Ok(ResultMode::Json(field.to_string())),
                _ => Err(serde::de::Error::custom(format!(
                    "invalid result `{s}`: expected `stdout`, `file` or `json:FIELD`"
                ))),
            },
        }
    }
}

/// The CLIs baton knows how to drive without configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Codex,
    Claude,
    Gemini,
    Aider,
}

impl Preset {
    const ALL: [Preset; 4] = [Preset::Codex, Preset::Claude, Preset::Gemini, Preset::Aider];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Codex => "codex",
            Preset::Claude => "claude",
            Preset::Gemini => "gemini",
            Preset::Aider => "aider",
        }
    }

    fn named(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The model API the CLI talks to, reachable from its sandbox.
    fn hosts(self) -> &'static [&'static str] {
        match self {
            Preset::Codex => &["api.openai.com:443"],
            Preset::Claude => &["api.anthropic.com:443"],
            Preset::Gemini => &["generativelanguage.googleapis.com:443"],
            Preset::Aider => &["api.openai.com:443", "api.anthropic.com:443"],
        }
    }

    /// The preset's own definition, before any user keys. `sandboxed`:
    /// whether baton's sandbox confines it (then a CLI's own sandbox is
    /// switched off rather than nested: Codex's `bwrap` inside baton's
    /// hangs, and baton's is the boundary either way).
    pub fn def(self, sandboxed: bool) -> AgentDef {
        let def = |command: &[&str], prompt, result, env: &[&str], vars: &[(&str, &str)], install: &str| AgentDef {
            name: self.name().to_string(),
            command: command.iter().map(|s| s.to_string()).collect(),
            prompt,
            result,
            env: env.iter().map(|s| s.to_string()).collect(),
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            timeout: Duration::from_secs(30 * 60),
            install: Some(install.to_string()),
            max_parallel: None,
            sandbox: Profile {
                network: self.hosts().iter().filter_map(|h| HostRule::parse(h).ok()).collect(),
                ..Profile::default()
            },
            usage: match self {
                Preset::Codex => UsageFormat::Codex,
                Preset::Claude => UsageFormat::Claude,
                Preset::Gemini => UsageFormat::Gemini,
                Preset::Aider => UsageFormat::None,
            },
            model: None,
            cli: Some(self),
        };
        match self {
            // Without `--disable plugins` and analytics off, Codex clones a
            // plugin marketplace and phones home on every run.
            Preset::Codex => def(
                &[
                    "codex",
                    "exec",
                    "--sandbox",
                    if sandboxed { "danger-full-access" } else { "workspace-write" },
                    "--skip-git-repo-check",
                    "--ephemeral",
                    "--disable",
                    "plugins",
                    "-c",
                    "analytics.enabled=false",
                    // Events (with each turn's usage) on stdout; the last
                    // message still goes to the result file.
                    "--json",
                    "-o",
                    "{{ result_file }}",
                    "-",
                ],
                PromptMode::Stdin,
                ResultMode::File,
                &["OPENAI_API_KEY", "CODEX_HOME"],
                &[],
                "npm install -g @openai/codex",
            ),
            // The default permission mode refuses file writes yet exits 0.
            Preset::Claude => def(
                &["claude", "-p", "--output-format", "json", "--permission-mode", "acceptEdits"],
                PromptMode::Stdin,
                ResultMode::Json("result".into()),
                &["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "CLAUDE_CODE_MAX_RETRIES"],
                &[("DISABLE_AUTOUPDATER", "1"), ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")],
                "npm install -g @anthropic-ai/claude-code",
            ),
            Preset::Gemini => def(
                &["gemini", "--output-format", "json", "--approval-mode", "auto_edit"],
                PromptMode::Stdin,
                ResultMode::Json("response".into()),
                &["GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"],
                // An untrusted folder drops the approval mode to `default`,
                // which refuses every edit in a headless run. The worktree
                // is the job's own; the sandbox is the boundary.
                &[("GEMINI_CLI_TRUST_WORKSPACE", "true")],
                "npm install -g @google/gemini-cli",
            ),
            Preset::Aider => def(
                &[
                    "aider",
                    "--yes-always",
                    "--no-auto-commits",
                    "--no-check-update",
                    "--no-show-model-warnings",
                    "--message-file",
                    "{{ prompt_file }}",
                ],
                PromptMode::File,
                ResultMode::Stdout,
                &["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_API_BASE"],
                &[],
                "pip install aider-chat",
            ),
        }
    }
}

/// The agents that work with no configuration beyond their API key.
pub fn presets(sandboxed: bool) -> BTreeMap<String, AgentDef> {
    Preset::ALL.into_iter().map(|p| (p.name().to_string(), p.def(sandboxed))).collect()
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    /// The preset this agent extends; by default the one of the same name.
    preset: Option<Preset>,
    command: Option<Vec<String>>,
    prompt: Option<PromptMode>,
    result: Option<ResultMode>,
    env: Option<Vec<String>>,
    timeout: Option<HumanDuration>,
    install: Option<String>,
    max_parallel: Option<usize>,
    model: Option<String>,
    base_url: Option<String>,
    max_turns: Option<u32>,
    budget_usd: Option<f64>,
    pub(super) network: Option<Vec<toml::Spanned<String>>>,
    pub(super) read_only: Option<Vec<PathBuf>>,
    pub(super) read_write: Option<Vec<PathBuf>>,
    max_memory: Option<String>,
    max_processes: Option<u64>,
    max_disk: Option<String>,
    max_files: Option<u64>,
}

/// Keys given in the file replace the preset's; the others keep the preset's.
/// Relative `read_only`/`read_write` paths resolve against `base`.
pub(super) fn merge_agent(name: &str, raw: &RawAgent, sandboxed: bool, base_dir: &Path) -> Result<AgentDef, String> {
    let preset = raw.preset.or(Preset::named(name));
    let base = preset.map(|p| p.def(sandboxed));
    let base = base.as_ref();
    let command = match (&raw.command, base) {
        (Some(c), _) => c.clone(),
        (None, Some(p)) => p.command.clone(),
        (None, None) => return Err("`command` is required for an agent that is not a preset".into()),
    };
    if command.is_empty() || command[0].trim().is_empty() {
        return Err("`command` must name a program".into());
    }
    let prompt = raw.prompt.or(base.map(|p| p.prompt)).unwrap_or(PromptMode::Stdin);
    let result = raw.result.clone().or(base.map(|p| p.result.clone())).unwrap_or(ResultMode::Stdout);
    let mentions = |var: &str| command.iter().any(|a| a.contains(var));
    if prompt == PromptMode::Arg && !mentions("prompt") {
        return Err("prompt = \"arg\" needs `{{ prompt }}` in `command`".into());
    }
    if prompt == PromptMode::File && !mentions("prompt_file") {
        return Err("prompt = \"file\" needs `{{ prompt_file }}` in `command`".into());
    }
    if result == ResultMode::File && !mentions("result_file") {
        return Err("result = \"file\" needs `{{ result_file }}` in `command`".into());
    }
    let mut def = AgentDef {
        name: name.to_string(),
        command,
        prompt,
        result,
        env: raw.env.clone().or(base.map(|p| p.env.clone())).unwrap_or_default(),
        vars: base.map(|p| p.vars.clone()).unwrap_or_default(),
        timeout: raw.timeout.map(|t| t.0).or(base.map(|p| p.timeout)).unwrap_or(Duration::from_secs(30 * 60)),
        install: raw.install.clone().or(base.and_then(|p| p.install.clone())),
        max_parallel: raw.max_parallel.or(base.and_then(|p| p.max_parallel)).filter(|n| *n > 0),
        sandbox: sandbox_profile(raw, base, base_dir)?,
        // A command of the user's own reports nothing baton can read on
        // stdout: only its usage file counts.
        usage: match (&raw.command, base) {
            (None, Some(p)) => p.usage,
            _ => UsageFormat::None,
        },
        model: raw.model.clone(),
        cli: preset,
    };
    apply_tuning(&mut def, preset, raw)?;
    Ok(def)
}

/// The sandbox keys over the preset's: an explicit `network` replaces the
/// preset's hosts (and `base_url`'s), so `[]` really cuts everything.
fn sandbox_profile(raw: &RawAgent, base: Option<&AgentDef>, base_dir: &Path) -> Result<Profile, String> {
    let mut profile = base.map(|b| b.sandbox.clone()).unwrap_or_default();
    match &raw.network {
        Some(entries) => {
            profile.network =
                entries.iter().map(|e| HostRule::parse(e.get_ref())).collect::<Result<Vec<_>, String>>()?;
        }
        None => {
            if let Some(rule) = raw.base_url.as_deref().and_then(rule_for_url) {
                profile.network.push(rule);
            }
        }
    }
    let absolute = |paths: &Vec<PathBuf>| paths.iter().map(|p| base_dir.join(p)).collect::<Vec<_>>();
    if let Some(p) = &raw.read_only {
        profile.read_only = absolute(p);
    }
    if let Some(p) = &raw.read_write {
        profile.read_write = absolute(p);
    }
    if let Some(m) = &raw.max_memory {
        profile.max_memory = parse_size(m).map_err(|e| format!("max_memory: {e}"))?;
    }
    if let Some(n) = raw.max_processes {
        if n < 8 {
            return Err("max_processes must be at least 8 (the sandbox itself takes a few)".into());
        }
        profile.max_processes = n;
    }
    if let Some(d) = &raw.max_disk {
        profile.max_disk = parse_size(d).map_err(|e| format!("max_disk: {e}"))?;
    }
    if let Some(n) = raw.max_files {
        if n < 1000 {
            return Err("max_files must be at least 1000 (a checkout and a CLI's caches take some)".into());
        }
        profile.max_files = n;
    }
    Ok(profile)
}

/// Maps `model`, `base_url`, `max_turns` and `budget_usd` onto the CLI's own
/// flags and variables.
fn apply_tuning(def: &mut AgentDef, preset: Option<Preset>, raw: &RawAgent) -> Result<(), String> {
    let given: Vec<&str> = [
        raw.model.as_ref().map(|_| "model"),
        raw.base_url.as_ref().map(|_| "base_url"),
        raw.max_turns.map(|_| "max_turns"),
        raw.budget_usd.map(|_| "budget_usd"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let Some(preset) = preset else {
        return match given.first() {
            None => Ok(()),
            Some(key) => Err(format!(
                "`{key}` is translated for the codex, claude, gemini and aider presets only \
                 (set `preset = \"claude\"`, say); for another command put the flag in `command`"
            )),
        };
    };
    if let Some(url) = &raw.base_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("invalid base_url `{url}`: expected http:// or https://"));
        }
    }
    if raw.max_turns == Some(0) {
        return Err("max_turns must be at least 1".into());
    }
    if let Some(b) = raw.budget_usd {
        if !(b.is_finite() && b > 0.0) {
            return Err("budget_usd must be a positive amount".into());
        }
    }
    // Only Claude Code has flags for turns and budget.
    if preset != Preset::Claude {
        let given = [raw.max_turns.map(|_| "max_turns"), raw.budget_usd.map(|_| "budget_usd")];
        if let Some(key) = given.into_iter().flatten().next() {
            return Err(format!("`{key}` is not supported by the {} CLI; remove it", preset.name()));
        }
    }
    let mut flags: Vec<String> = Vec::new();
    if let Some(m) = &raw.model {
        flags.extend(["--model".to_string(), m.clone()]);
    }
    match (preset, &raw.base_url) {
        (Preset::Claude, url) => {
            if let Some(n) = raw.max_turns {
                flags.extend(["--max-turns".to_string(), n.to_string()]);
            }
            if let Some(b) = raw.budget_usd {
                flags.extend(["--max-budget-usd".to_string(), b.to_string()]);
            }
            if let Some(url) = url {
                def.vars.insert("ANTHROPIC_BASE_URL".into(), url.clone());
            }
        }
        // Codex's built-in provider ignores OPENAI_BASE_URL: a gateway is a
        // custom provider. `{ ` never forms a minijinja `{{`, and a JSON
        // string is also a valid TOML basic string.
        (Preset::Codex, Some(url)) => {
            let url = serde_json::Value::String(url.clone()).to_string();
            flags.extend([
                "-c".to_string(),
                "model_provider=baton".to_string(),
                "-c".to_string(),
                format!(
                    "model_providers.baton={{ name = \"baton\", base_url = {url}, wire_api = \"responses\", \
                     env_key = \"OPENAI_API_KEY\" }}"
                ),
            ]);
        }
        (Preset::Gemini, Some(url)) => {
            def.vars.insert("GOOGLE_GEMINI_BASE_URL".into(), url.clone());
        }
        (Preset::Aider, Some(url)) => flags.extend(["--openai-api-base".to_string(), url.clone()]),
        (_, None) => {}
    }
    // Options go before any positional argument: after the program, and
    // after Codex's `exec` subcommand.
    let at = if def.command.get(1).map(String::as_str) == Some("exec") { 2 } else { 1 };
    def.command.splice(at..at, flags);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merge(src: &str, name: &str) -> Result<AgentDef, String> {
        let raw: RawAgent = toml::from_str(src).map_err(|e| e.to_string())?;
        merge_agent(name, &raw, true, Path::new("/etc/baton"))
    }

    #[test]
    fn claude_tuning_becomes_its_flags_and_base_url_variable() {
        let a =
            merge("model = \"sonnet\"\nmax_turns = 8\nbudget_usd = 2.5\nbase_url = \"http://127.0.0.1:9/\"", "claude")
                .unwrap();
        assert_eq!(
            &a.command[..8],
            ["claude", "--model", "sonnet", "--max-turns", "8", "--max-budget-usd", "2.5", "-p"]
        );
        assert_eq!(a.vars["ANTHROPIC_BASE_URL"], "http://127.0.0.1:9/");
        assert_eq!(a.vars["DISABLE_AUTOUPDATER"], "1");
    }

    #[test]
    fn codex_base_url_is_a_custom_provider_before_the_prompt_argument() {
        let a = merge("model = \"gpt-x\"\nbase_url = \"http://127.0.0.1:9/v1\"", "codex").unwrap();
        assert_eq!(&a.command[..4], ["codex", "exec", "--model", "gpt-x"]);
        let provider = a.command.iter().find(|c| c.starts_with("model_providers.baton=")).unwrap();
        let table: toml::Table = toml::from_str(provider).unwrap();
        let p = &table["model_providers"]["baton"];
        assert_eq!(p["base_url"].as_str(), Some("http://127.0.0.1:9/v1"));
        assert_eq!(p["wire_api"].as_str(), Some("responses"));
        assert!(a.command.contains(&"model_provider=baton".to_string()));
        assert_eq!(a.command.last().map(String::as_str), Some("-"));
        assert!(!provider.contains("{{"), "must not read as a template");
    }

    #[test]
    fn a_named_agent_extends_the_preset_it_names() {
        let a = merge("preset = \"claude\"\nmodel = \"opus\"", "reviewer").unwrap();
        assert_eq!(a.name, "reviewer");
        assert_eq!(&a.command[..3], ["claude", "--model", "opus"]);
        assert_eq!(a.result, ResultMode::Json("result".into()));
    }

    #[test]
    fn tuning_a_cli_cannot_honour_is_an_error() {
        assert!(merge("max_turns = 3", "codex").unwrap_err().contains("not supported by the codex CLI"));
        assert!(merge("budget_usd = 1.0", "aider").unwrap_err().contains("not supported by the aider CLI"));
        assert!(merge("command = [\"x\"]\nmodel = \"m\"", "mine").unwrap_err().contains("presets only"));
        assert!(merge("budget_usd = -1.0", "claude").unwrap_err().contains("positive"));
        assert!(merge("base_url = \"ftp://x\"", "claude").unwrap_err().contains("invalid base_url"));
        assert!(merge("preset = \"nope\"", "x").is_err());
    }

    #[test]
    fn aider_and_gemini_map_model_and_base_url() {
        let a = merge("model = \"m\"\nbase_url = \"https://gw/v1\"", "aider").unwrap();
        assert_eq!(&a.command[..5], ["aider", "--model", "m", "--openai-api-base", "https://gw/v1"]);
        let g = merge("base_url = \"https://gw\"", "gemini").unwrap();
        assert_eq!(g.vars["GOOGLE_GEMINI_BASE_URL"], "https://gw");
    }
}
