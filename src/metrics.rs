//! Counters and gauges for `GET /metrics` (Prometheus text format).
//!
//! Labels stay low-cardinality: event kinds, trigger names, states and
//! outcomes, never a job or delivery id.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds of the job duration histogram, in seconds.
const BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// The storage folder's disk, as last read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Space {
    pub free: u64,
    /// Below `storage.min_free`: no new agent starts.
    pub low: bool,
}

/// The daemon's metrics; shared by ingress, engine and publisher.
pub struct Metrics {
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
    jobs: Mutex<BTreeMap<(String, &'static str), u64>>,
    durations: Mutex<BTreeMap<String, Histogram>>,
    publishes: Mutex<BTreeMap<&'static str, u64>>,
    /// Connections the egress proxy refused, by agent.
    egress_blocked: Mutex<BTreeMap<String, u64>>,
    /// Tokens by (trigger, agent, kind), and dollars by (trigger, agent).
    tokens: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    cost: Mutex<BTreeMap<(String, String), f64>>,
    /// GitHub's `X-RateLimit-Remaining` on its latest answer; -1 until one.
    rate_limit_remaining: std::sync::atomic::AtomicI64,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default() += 1;
}

/// Label values are our own names, but escape them as the format asks.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            deliveries: Mutex::default(),
            jobs: Mutex::default(),
            durations: Mutex::default(),
            publishes: Mutex::default(),
            egress_blocked: Mutex::default(),
            tokens: Mutex::default(),
            cost: Mutex::default(),
            rate_limit_remaining: std::sync::atomic::AtomicI64::new(-1),
        }
    }
}

impl Metrics {
    /// What GitHub said is left of the rate limit.
    pub(crate) fn rate_limit_remaining(&self, remaining: u64) {
        let v = i64::try_from(remaining).unwrap_or(i64::MAX);
        self.rate_limit_remaining.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// A delivery answered: `accepted`, `duplicate` or `failed` (not stored).
    pub fn delivery(&self, event: &str, outcome: &'static str) {
        bump(&self.deliveries, (event.to_string(), outcome));
    }

    /// A job reached a final state after running `seconds`.
    pub(crate) fn job_finished(&self, trigger: &str, state: &'static str, seconds: f64) {
        bump(&self.jobs, (trigger.to_string(), state));
        let mut d = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let h = d.entry(trigger.to_string()).or_default();
        if h.counts.is_empty() {
            h.counts = vec![0; BUCKETS.len()];
        }
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// A publication attempt: `published`, `retry` or `failed`.
    pub fn publish(&self, outcome: &'static str) {
        bump(&self.publishes, outcome);
    }

    /// `count` connections of `agent` refused by its egress allowlist.
    pub fn egress_blocked(&self, agent: &str, count: u64) {
        *self.egress_blocked.lock().unwrap_or_else(|p| p.into_inner()).entry(agent.to_string()).or_default() += count;
    }

    /// An attempt's model use.
    pub fn usage(&self, trigger: &str, agent: &str, usage: &crate::store::Usage) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, n) in
            [("input", usage.input_tokens), ("output", usage.output_tokens), ("cached", usage.cached_tokens)]
        {
            *tokens.entry((trigger.to_string(), agent.to_string(), kind)).or_default() += n;
        }
        if let Some(c) = usage.cost_usd {
            *self
                .cost
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((trigger.to_string(), agent.to_string()))
                .or_default() += c;
        }
    }

    /// The text exposition, with the gauges read at scrape time.
    pub fn render(&self, queued: usize, running: usize, store_bytes: u64, space: Space) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP baton_deliveries_total Webhook deliveries by event and outcome.");
        let _ = writeln!(out, "# TYPE baton_deliveries_total counter");
        for ((event, outcome), n) in self.deliveries.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "baton_deliveries_total{{event=\"{}\",outcome=\"{outcome}\"}} {n}", label(event));
        }
        let _ = writeln!(out, "# HELP baton_jobs_finished_total Jobs by trigger and final state.");
        let _ = writeln!(out, "# TYPE baton_jobs_finished_total counter");
        for ((trigger, state), n) in self.jobs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "baton_jobs_finished_total{{trigger=\"{}\",state=\"{state}\"}} {n}", label(trigger));
        }
        let _ = writeln!(out, "# HELP baton_job_duration_seconds Time from a job's start to its end.");
        let _ = writeln!(out, "# TYPE baton_job_duration_seconds histogram");
        for (trigger, h) in self.durations.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let t = label(trigger);
            for (b, n) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(out, "baton_job_duration_seconds_bucket{{trigger=\"{t}\",le=\"{b}\"}} {n}");
            }
            let _ = writeln!(out, "baton_job_duration_seconds_bucket{{trigger=\"{t}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "baton_job_duration_seconds_sum{{trigger=\"{t}\"}} {}", h.sum);
            let _ = writeln!(out, "baton_job_duration_seconds_count{{trigger=\"{t}\"}} {}", h.count);
        }
        let _ = writeln!(out, "# HELP baton_publish_attempts_total Attempts to publish a result, by outcome.");
        let _ = writeln!(out, "# TYPE baton_publish_attempts_total counter");
        for (outcome, n) in self.publishes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "baton_publish_attempts_total{{outcome=\"{outcome}\"}} {n}");
        }
        let _ =
            writeln!(out, "# HELP baton_egress_blocked_total Agent connections refused by their network allowlist.");
        let _ = writeln!(out, "# TYPE baton_egress_blocked_total counter");
        for (agent, n) in self.egress_blocked.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "baton_egress_blocked_total{{agent=\"{}\"}} {n}", label(agent));
        }
        let _ = writeln!(out, "# HELP baton_agent_tokens_total Model tokens agents used, as their CLIs reported.");
        let _ = writeln!(out, "# TYPE baton_agent_tokens_total counter");
        for ((trigger, agent, kind), n) in self.tokens.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let (t, a) = (label(trigger), label(agent));
            let _ = writeln!(out, "baton_agent_tokens_total{{trigger=\"{t}\",agent=\"{a}\",kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP baton_agent_cost_usd_total What agents' model use cost, in US dollars.");
        let _ = writeln!(out, "# TYPE baton_agent_cost_usd_total counter");
        for ((trigger, agent), c) in self.cost.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "baton_agent_cost_usd_total{{trigger=\"{}\",agent=\"{}\"}} {c}",
                label(trigger),
                label(agent)
            );
        }
        let remaining = self.rate_limit_remaining.load(std::sync::atomic::Ordering::Relaxed);
        for (name, help, v) in [
            ("baton_queue_depth", "Jobs waiting to run.", queued as i64),
            ("baton_jobs_running", "Jobs running now.", running as i64),
            ("baton_store_size_bytes", "Size of the store on disk.", store_bytes as i64),
            ("baton_storage_free_bytes", "Free space of the storage folder's disk.", space.free as i64),
            (
                "baton_agents_paused",
                "1 while no new agent starts because the storage folder's disk is below storage.min_free.",
                i64::from(space.low),
            ),
            (
                "baton_github_rate_limit_remaining",
                "Requests GitHub's rate limit still allows (its latest X-RateLimit-Remaining; -1 before any call).",
                remaining,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.delivery("issues.opened", "accepted");
        m.delivery("issues.opened", "accepted");
        m.job_finished("investigate", "succeeded", 3.0);
        m.publish("published");
        let text = m.render(2, 1, 4096, Space { free: 1 << 30, low: true });
        assert!(text.contains("baton_agents_paused 1\n") && text.contains("baton_storage_free_bytes 1073741824\n"));
        assert!(text.contains("baton_deliveries_total{event=\"issues.opened\",outcome=\"accepted\"} 2"), "{text}");
        assert!(text.contains("baton_jobs_finished_total{trigger=\"investigate\",state=\"succeeded\"} 1"));
        assert!(text.contains("baton_job_duration_seconds_bucket{trigger=\"investigate\",le=\"1\"} 0"));
        assert!(text.contains("baton_job_duration_seconds_bucket{trigger=\"investigate\",le=\"5\"} 1"));
        assert!(text.contains("baton_queue_depth 2\n") && text.contains("baton_store_size_bytes 4096"));
        assert!(text.contains("baton_github_rate_limit_remaining -1\n"));
        m.rate_limit_remaining(4999);
        assert!(m.render(0, 0, 0, Space::default()).contains("baton_github_rate_limit_remaining 4999\n"));
    }
}
