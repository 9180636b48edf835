//! Describing a daemon in typed values rather than TOML text.
// tests/pg shares this file and uses only part of it.
#![allow(dead_code)]

use std::path::Path;

use toml::{Table, Value};

use crate::fake_github::FakeGitHub;
use crate::harness::Workdir;

/// A daemon's `baton.toml` and `triggers/*.toml`. It owns the parts most
/// tests share: `[server] listen` on a free port, the `[github]` block, the
/// agents and the triggers. A setting only one test needs goes in through
/// `set` or `raw` rather than growing a method here.
#[derive(Clone, Debug, Default)]
pub struct Scenario {
    config: Table,
    triggers: Vec<(String, Trigger)>,
}

impl Scenario {
    pub fn new() -> Scenario {
        Scenario::default().set("server.listen", "127.0.0.1:0")
    }

    pub fn github(mut self, github: GitHub) -> Scenario {
        merge(&mut self.config, table_of([("github", Value::Table(github.0))]));
        self
    }

    /// `[agents.NAME]`.
    pub fn agent(mut self, name: &str, agent: Agent) -> Scenario {
        let agents = table_at(&mut self.config, &["agents"]);
        agents.insert(name.to_string(), Value::Table(agent.0));
        self
    }

    /// `triggers/NAME.toml`; a later one of the same name replaces it.
    pub fn trigger(mut self, name: &str, trigger: Trigger) -> Scenario {
        self.triggers.retain(|(n, _)| n != name);
        self.triggers.push((name.to_string(), trigger));
        self
    }

    /// One key, by its dotted path (`limits.max_parallel_jobs`).
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> Scenario {
        set_path(&mut self.config, path, value.into());
        self
    }

    /// A TOML fragment merged into the config, table by table.
    pub fn raw(mut self, toml: &str) -> Scenario {
        merge(&mut self.config, parse(toml));
        self
    }

    /// `baton.toml` as written (before `with_backend`).
    pub fn toml(&self) -> String {
        render(&self.config)
    }

    /// Writes `baton.toml` (on the test's backend) and the trigger files.
    pub fn write(&self, w: &Workdir) {
        w.config(&self.toml());
        for (name, trigger) in &self.triggers {
            w.trigger(name, &trigger.toml());
        }
    }

    /// Writes `baton.toml` and `triggers/` into `dir` as they are, for
    /// tests that choose their `[storage]` themselves.
    pub fn write_to(&self, dir: &Path) {
        std::fs::write(dir.join("baton.toml"), self.toml()).expect("write config");
        std::fs::create_dir_all(dir.join("triggers")).expect("triggers dir");
        for (name, trigger) in &self.triggers {
            std::fs::write(dir.join("triggers").join(format!("{name}.toml")), trigger.toml()).expect("write trigger");
        }
    }
}

/// The `[github]` block.
#[derive(Clone, Debug)]
pub struct GitHub(Table);

impl GitHub {
    /// Signed webhooks and nothing else.
    pub fn secret(webhook_secret: &str) -> GitHub {
        GitHub(table_of([("webhook_secret", webhook_secret.into())]))
    }

    /// The API of `fake`.
    pub fn api(self, fake: &FakeGitHub) -> GitHub {
        self.set("api_url", fake.url.as_str())
    }

    /// Repositories cloned from `root/OWNER/NAME.git` (see `bare_repo`).
    pub fn repos(self, root: &Path) -> GitHub {
        self.set("git_url", format!("file://{}", root.display()))
    }

    pub fn token(self, token: &str) -> GitHub {
        self.set("token", token)
    }

    pub fn set(mut self, key: &str, value: impl Into<Value>) -> GitHub {
        set_path(&mut self.0, key, value.into());
        self
    }
}

/// One `[agents.NAME]` table.
#[derive(Clone, Debug)]
pub struct Agent(Table);

impl Agent {
    /// `command = [path]`.
    pub fn script(path: &Path) -> Agent {
        Agent::command(&[&path.display().to_string()])
    }

    /// No command: a preset's (`claude`, `codex`, ...), by the agent's name.
    pub fn preset() -> Agent {
        Agent(Table::new())
    }

    pub fn command(argv: &[&str]) -> Agent {
        Agent(table_of([("command", argv.to_vec().into())]))
    }

    /// How the prompt reaches the agent (`stdin`, `arg`, ...).
    pub fn prompt(self, how: &str) -> Agent {
        self.set("prompt", how)
    }

    /// Where the result comes from (`stdout`, `file`, ...).
    pub fn result(self, from: &str) -> Agent {
        self.set("result", from)
    }

    /// Folders outside the sandbox the agent may write (such as
    /// `Workdir::shared`).
    pub fn read_write(self, paths: &[&Path]) -> Agent {
        let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        self.set("read_write", paths)
    }

    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Agent {
        set_path(&mut self.0, key, value.into());
        self
    }

    pub fn raw(mut self, toml: &str) -> Agent {
        merge(&mut self.0, parse(toml));
        self
    }
}

/// One trigger file.
#[derive(Clone, Debug)]
pub struct Trigger(Table);

impl Trigger {
    pub fn on(events: &[&str]) -> Trigger {
        Trigger(table_of([("on", events.to_vec().into())]))
    }

    /// `[job] agent`.
    pub fn agent(self, name: &str) -> Trigger {
        self.job("agent", name)
    }

    /// `[job] workspace`.
    pub fn workspace(self, kind: &str) -> Trigger {
        self.job("workspace", kind)
    }

    /// `[job] prompt`, a template.
    pub fn prompt(self, template: &str) -> Trigger {
        self.job("prompt", template)
    }

    /// `[output] kind`.
    pub fn output(self, kind: &str) -> Trigger {
        self.set("output.kind", kind)
    }

    /// A key of `[job]`.
    pub fn job(self, key: &str, value: impl Into<Value>) -> Trigger {
        self.set(&format!("job.{key}"), value)
    }

    /// A key of `[filter]`.
    pub fn filter(self, key: &str, value: impl Into<Value>) -> Trigger {
        self.set(&format!("filter.{key}"), value)
    }

    /// One key, by its dotted path (`output.allow_approve`).
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> Trigger {
        set_path(&mut self.0, path, value.into());
        self
    }

    /// A TOML fragment merged into the file, table by table.
    pub fn raw(mut self, toml: &str) -> Trigger {
        merge(&mut self.0, parse(toml));
        self
    }

    pub fn toml(&self) -> String {
        render(&self.0)
    }
}

fn table_of<const N: usize>(entries: [(&str, Value); N]) -> Table {
    entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn parse(toml: &str) -> Table {
    toml::from_str(toml).unwrap_or_else(|e| panic!("a test's TOML fragment does not parse: {e}\n{toml}"))
}

/// The table at `path` under `table`, made on the way if missing.
fn table_at<'a>(table: &'a mut Table, path: &[&str]) -> &'a mut Table {
    let mut at = table;
    for key in path {
        let next = at.entry(key.to_string()).or_insert_with(|| Value::Table(Table::new()));
        at = match next {
            Value::Table(t) => t,
            other => panic!("`{key}` is {other:?}, not a table"),
        };
    }
    at
}

fn set_path(table: &mut Table, path: &str, value: Value) {
    let keys: Vec<&str> = path.split('.').collect();
    let (last, parents) = keys.split_last().expect("a key");
    table_at(table, parents).insert(last.to_string(), value);
}

/// `from` into `into`: tables merge key by key, anything else replaces.
fn merge(into: &mut Table, from: Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Table(old)), Value::Table(new)) => merge(old, new),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// TOML text for `table`: its own keys, then each sub-table under a header
/// (a table holding only tables needs none of its own).
fn render(table: &Table) -> String {
    let mut out = String::new();
    render_section(&mut out, &[], table);
    out
}

fn render_section(out: &mut String, path: &[&str], table: &Table) {
    let (tables, values): (Vec<_>, Vec<_>) = table.iter().partition(|(_, v)| v.is_table());
    if !path.is_empty() && (!values.is_empty() || tables.is_empty()) {
        let header: Vec<String> = path.iter().map(|k| key(k)).collect();
        out.push_str(&format!("[{}]\n", header.join(".")));
    }
    for (k, v) in values {
        out.push_str(&format!("{} = {}\n", key(k), value(v)));
    }
    for (k, v) in tables {
        let Value::Table(sub) = v else { unreachable!() };
        let path: Vec<&str> = path.iter().copied().chain([k.as_str()]).collect();
        render_section(out, &path, sub);
    }
}

fn key(k: &str) -> String {
    let bare = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        quote(k)
    }
}

fn value(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        Value::Integer(i) => i.to_string(),
        // `{:?}` keeps the `.0` a TOML float needs.
        Value::Float(f) => format!("{f:?}"),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.to_string(),
        Value::Array(items) => format!("[{}]", items.iter().map(value).collect::<Vec<_>>().join(", ")),
        Value::Table(t) => {
            let entries: Vec<String> = t.iter().map(|(k, v)| format!("{} = {}", key(k), value(v))).collect();
            format!("{{ {} }}", entries.join(", "))
        }
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[test]
fn what_is_written_reads_back_as_what_was_built() {
    let s = Scenario::new()
        .github(GitHub::secret("s\"e\\c").token("env:T"))
        .agent("a b", Agent::command(&["sh", "-c", "echo \"{{ x }}\"\n"]).set("timeout", "1s"))
        .set("limits.max_parallel_jobs", 2)
        .set("sandbox.enabled", false)
        .raw("[prices.\"m-1\"]\ninput_per_mtok = 1.5\n[server]\napi_token = \"t\"")
        .raw("[storage]");
    let back: Table = toml::from_str(&s.toml()).unwrap_or_else(|e| panic!("{e}\n{}", s.toml()));
    assert_eq!(back, s.config, "{}", s.toml());
    let t = Trigger::on(&["issues.opened"]).agent("a").prompt("#{{ issue.number }} \"q\"").output("none");
    let back: Table = toml::from_str(&t.toml()).unwrap_or_else(|e| panic!("{e}\n{}", t.toml()));
    assert_eq!(back, t.0, "{}", t.toml());
}
