//! An agent's model use, read from what its CLI reports: Claude Code's
//! `--output-format json` (`usage`, `total_cost_usd`, `num_turns`), Codex's
//! `--json` event stream (`turn.completed` usage), Gemini CLI's JSON
//! `stats`, or, from any agent, `{"usage": {...}}` written to the file named
//! in `$BATON_USAGE_FILE`. A cost the CLI does not report comes from the
//! configured price table. Pure: the engine hands in the output.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::{Price, UsageFormat};
use crate::store::Usage;

/// The usage `format` reads from `stdout`, or else what the agent wrote to
/// its usage file (`file`, its text).
pub fn read(format: UsageFormat, stdout: &str, file: Option<&str>) -> Option<Usage> {
    let from_cli = match format {
        UsageFormat::None => None,
        UsageFormat::Claude => last_object(stdout).and_then(|v| claude(&v)),
        UsageFormat::Codex => codex(stdout),
        UsageFormat::Gemini => last_object(stdout).and_then(|v| gemini(&v)),
    };
    from_cli.or_else(|| file.and_then(|f| serde_json::from_str::<Value>(f).ok()).and_then(|v| generic(&v["usage"])))
}

/// Fills in the cost from the price table when the CLI gave none: the
/// price of the model the CLI named, else of the agent's `model`.
pub(crate) fn priced_by(usage: Usage, agent_model: Option<&str>, prices: &BTreeMap<String, Price>) -> Usage {
    let model = usage.model.clone();
    let price = model.as_deref().or(agent_model).and_then(|m| prices.get(m));
    priced(usage, price)
}

/// Fills in the cost from `price` when the CLI gave none.
pub fn priced(mut usage: Usage, price: Option<&Price>) -> Usage {
    if let (None, Some(p)) = (usage.cost_usd, price) {
        let fresh = usage.input_tokens.saturating_sub(usage.cached_tokens) as f64;
        let cost = fresh * p.input_per_mtok
            + usage.cached_tokens as f64 * p.cached_per_mtok.unwrap_or(p.input_per_mtok)
            + usage.output_tokens as f64 * p.output_per_mtok;
        usage.cost_usd = Some(cost / 1_000_000.0);
    }
    usage
}

/// The whole output as one JSON object, or its last line that is one.
fn last_object(stdout: &str) -> Option<Value> {
    serde_json::from_str::<Value>(stdout.trim()).ok().filter(Value::is_object).or_else(|| {
        stdout.lines().rev().find_map(|l| serde_json::from_str::<Value>(l.trim()).ok().filter(Value::is_object))
    })
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `{"usage": {"input_tokens", "cache_read_input_tokens",
/// "cache_creation_input_tokens", "output_tokens"}, "total_cost_usd",
/// "num_turns", "modelUsage": {MODEL: …}}`. Anthropic counts cache reads
/// and writes apart from `input_tokens`; here they are part of it.
fn claude(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let by_model = v["modelUsage"].as_object();
    // The model that did the work: the one that wrote the most.
    let model =
        by_model.and_then(|m| m.iter().max_by_key(|(_, mu)| n(&mu["outputTokens"])).map(|(name, _)| name.clone()));
    // `modelUsage` counts every request, side ones and a run stopped by its
    // budget included (whose `usage` reads 0); `usage` is the fallback.
    let (input, output, cached) = match by_model.filter(|m| !m.is_empty()) {
        Some(m) => m.values().fold((0, 0, 0), |(i, o, c), mu| {
            let cached = n(&mu["cacheReadInputTokens"]);
            (
                i + n(&mu["inputTokens"]) + cached + n(&mu["cacheCreationInputTokens"]),
                o + n(&mu["outputTokens"]),
                c + cached,
            )
        }),
        None => {
            let cached = n(&u["cache_read_input_tokens"]);
            (n(&u["input_tokens"]) + cached + n(&u["cache_creation_input_tokens"]), n(&u["output_tokens"]), cached)
        }
    };
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_tokens: cached,
        cost_usd: v["total_cost_usd"].as_f64(),
        turns: v["num_turns"].as_u64(),
        model,
    })
}

/// Every `{"type": "turn.completed", "usage": {"input_tokens",
/// "cached_input_tokens", "output_tokens"}}` line, added up.
fn codex(stdout: &str) -> Option<Usage> {
    let mut total: Option<Usage> = None;
    for line in stdout.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else { continue };
        if v["type"] != "turn.completed" {
            continue;
        }
        let u = &v["usage"];
        let turn = Usage {
            input_tokens: n(&u["input_tokens"]),
            output_tokens: n(&u["output_tokens"]),
            cached_tokens: n(&u["cached_input_tokens"]),
            cost_usd: None,
            turns: Some(1),
            model: None,
        };
        total = Some(match total {
            Some(t) => t.plus(&turn),
            None => turn,
        });
    }
    total
}

/// `{"stats": {"models": {MODEL: {"api": {"totalRequests"}, "tokens":
/// {"prompt", "candidates", "cached"}}}}`.
fn gemini(v: &Value) -> Option<Usage> {
    let models = v["stats"]["models"].as_object()?;
    let mut total: Option<Usage> = None;
    for (name, m) in models {
        let t = &m["tokens"];
        let one = Usage {
            input_tokens: n(&t["prompt"]),
            output_tokens: n(&t["candidates"]),
            cached_tokens: n(&t["cached"]),
            cost_usd: None,
            turns: m["api"]["totalRequests"].as_u64(),
            model: Some(name.clone()),
        };
        total = Some(match total {
            Some(t) => t.plus(&one),
            None => one,
        });
    }
    total
}

/// What an agent wrote itself: the fields of `Usage`, all optional.
fn generic(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    Some(Usage {
        input_tokens: n(&u["input_tokens"]),
        output_tokens: n(&u["output_tokens"]),
        cached_tokens: n(&u["cached_tokens"]),
        cost_usd: u["cost_usd"].as_f64().filter(|c| c.is_finite() && *c >= 0.0),
        turns: u["turns"].as_u64(),
        model: u["model"].as_str().map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(format: UsageFormat, stdout: &str, file: Option<&str>, expect: &str) {
        let got = read(format, stdout, file).map(|u| {
            format!(
                "in={} out={} cached={} cost={:?} turns={:?} model={:?}",
                u.input_tokens, u.output_tokens, u.cached_tokens, u.cost_usd, u.turns, u.model
            )
        });
        assert_eq!(got.as_deref().unwrap_or("none"), expect, "{stdout}");
    }

    #[test]
    fn each_cli_reports_its_own_way() {
        check(
            UsageFormat::Claude,
            r#"{"type":"result","result":"ok","num_turns":3,"total_cost_usd":0.0123,
                "usage":{"input_tokens":10,"cache_read_input_tokens":100,"cache_creation_input_tokens":5,"output_tokens":7},
                "modelUsage":{"claude-haiku":{"inputTokens":2,"outputTokens":1},
                              "claude-sonnet":{"inputTokens":8,"cacheReadInputTokens":100,"cacheCreationInputTokens":5,"outputTokens":6}}}"#,
            None,
            "in=115 out=7 cached=100 cost=Some(0.0123) turns=Some(3) model=Some(\"claude-sonnet\")",
        );
        // Without `modelUsage`: `usage`.
        check(
            UsageFormat::Claude,
            r#"{"usage":{"input_tokens":10,"cache_read_input_tokens":100,"output_tokens":7},"total_cost_usd":0.5}"#,
            None,
            "in=110 out=7 cached=100 cost=Some(0.5) turns=None model=None",
        );
        check(
            UsageFormat::Codex,
            "{\"type\":\"thread.started\"}\nnot json\n\
             {\"type\":\"turn.completed\",\"usage\":{\"input_tokens\":10,\"cached_input_tokens\":4,\"output_tokens\":5}}\n\
             {\"type\":\"turn.completed\",\"usage\":{\"input_tokens\":20,\"cached_input_tokens\":0,\"output_tokens\":1}}\n",
            None,
            "in=30 out=6 cached=4 cost=None turns=Some(2) model=None",
        );
        check(
            UsageFormat::Gemini,
            r#"{"response":"ok","stats":{"models":{"gemini-2.5-pro":{"api":{"totalRequests":2},"tokens":{"prompt":50,"candidates":9,"cached":20}}}}}"#,
            None,
            "in=50 out=9 cached=20 cost=None turns=Some(2) model=Some(\"gemini-2.5-pro\")",
        );
        // Any agent: its usage file, when its CLI said nothing.
        let file = r#"{"usage": {"input_tokens": 3, "output_tokens": 4, "cost_usd": 0.5, "model": "m"}}"#;
        check(
            UsageFormat::None,
            "plain text",
            Some(file),
            "in=3 out=4 cached=0 cost=Some(0.5) turns=None model=Some(\"m\")",
        );
        check(UsageFormat::Claude, "not json", Some("{\"usage\": 5}"), "none");
        check(
            UsageFormat::None,
            "",
            Some("{\"usage\": {\"cost_usd\": -1}}"),
            "in=0 out=0 cached=0 cost=None turns=None model=None",
        );
    }

    #[test]
    fn a_missing_cost_comes_from_the_price_table() {
        let price = Price { input_per_mtok: 3.0, output_per_mtok: 15.0, cached_per_mtok: Some(0.3) };
        let u = Usage { input_tokens: 1_100_000, cached_tokens: 100_000, output_tokens: 100_000, ..Usage::default() };
        let cost = priced(u.clone(), Some(&price)).cost_usd.unwrap_or_default();
        assert!((cost - (3.0 + 0.03 + 1.5)).abs() < 1e-9, "{cost}");
        assert_eq!(priced(u.clone(), None).cost_usd, None);
        let reported = Usage { cost_usd: Some(0.01), ..u };
        assert_eq!(priced(reported, Some(&price)).cost_usd, Some(0.01), "the CLI's own figure wins");
    }
}
