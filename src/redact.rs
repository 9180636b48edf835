//! Redaction of secrets from what baton shows or posts: an agent's result or
//! error may quote a token it found, and neither the API nor GitHub may see
//! it. Known token shapes (GitHub, OpenAI, Anthropic, AWS, private keys) and
//! the daemon's own configured secrets become `[redacted]`.
//!
//! Neutral ground: the engine scrubs results and logs with it, the
//! publisher's planner every body it writes, the API every log it serves;
//! none of them owns it. It imports only `config` (for `Secret`).

use crate::config::Secret;

/// What a redacted secret is replaced with.
pub(crate) const REDACTED: &str = "[redacted]";

/// A token shape: a prefix, the characters that may follow, and how many at least.
type Shape = (&'static str, fn(char) -> bool, usize);

const SHAPES: &[Shape] = &[
    ("github_pat_", is_word, 22),
    ("ghp_", char::is_alphanumeric, 30),
    ("gho_", char::is_alphanumeric, 30),
    ("ghu_", char::is_alphanumeric, 30),
    ("ghs_", char::is_alphanumeric, 30),
    ("ghr_", char::is_alphanumeric, 30),
    ("sk-", is_key, 20),
    // A job's token for baton's own `/mcp` (engine::team).
    ("batonjob_", is_hex, 64),
    ("AKIA", is_upper_alnum, 16),
    ("ASIA", is_upper_alnum, 16),
];

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn is_key(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_hex(c: char) -> bool {
    c.is_ascii_hexdigit()
}

fn is_upper_alnum(c: char) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit()
}

/// Redacts with the daemon's own secrets besides the known shapes.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    secrets: Vec<Secret>,
}

impl Redactor {
    pub fn new(secrets: Vec<Secret>) -> Redactor {
        // Very short values would redact ordinary words; they are not secrets
        // worth the name, and `check` would be the place to say so.
        let secrets = secrets.into_iter().filter(|s| s.expose().len() >= 8).collect();
        Redactor { secrets }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = redact_keys(&redact_shapes(text));
        for s in &self.secrets {
            if out.contains(s.expose()) {
                out = out.replace(s.expose(), REDACTED);
            }
        }
        out
    }
}

fn redact_shapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        let at_boundary = out.chars().next_back().is_none_or(|c| !is_key(c));
        if at_boundary {
            for (prefix, allowed, min) in SHAPES {
                if let Some(tail) = rest.strip_prefix(prefix) {
                    let len: usize = tail.chars().take_while(|c| allowed(*c)).map(char::len_utf8).sum();
                    if len >= *min {
                        out.push_str(REDACTED);
                        rest = &tail[len..];
                        continue 'scan;
                    }
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// PEM private keys, from their BEGIN line to their END line.
fn redact_keys(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let header_end = rest[start..].find("-----\n").or_else(|| rest[start + 11..].find("-----").map(|i| i + 11));
        let is_private = header_end.is_some_and(|h| rest[start..start + h].contains("PRIVATE KEY"));
        if !is_private {
            out.push_str(&rest[..start + 11]);
            rest = &rest[start + 11..];
            continue;
        }
        out.push_str(&rest[..start]);
        out.push_str(REDACTED);
        match rest[start..].find("-----END ") {
            Some(end) => {
                let after = &rest[start + end + 9..];
                let close = after.find("-----").map(|i| i + 5).unwrap_or(after.len());
                rest = &after[close..];
            }
            None => rest = "",
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, want: &str) {
        assert_eq!(Redactor::new(vec![Secret::new("hunter2-daemon-secret")]).redact(input), want, "{input}");
    }

    #[test]
    fn known_token_shapes_are_redacted() {
        check("token ghp_abcdefghijklmnopqrstuvwxyz0123456789 here", "token [redacted] here");
        check("github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "[redacted]");
        check("OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz", "OPENAI_API_KEY=[redacted]");
        check("sk-ant-api03-abcdefghijklmnopqrstuvwxyz-0123", "[redacted]");
        check("aws AKIAIOSFODNN7EXAMPLE.", "aws [redacted].");
        let job_token = format!("batonjob_{}", "0a".repeat(32));
        check(&format!("my token is {job_token}."), "my token is [redacted].");
        check("the daemon's hunter2-daemon-secret leaked", "the daemon's [redacted] leaked");
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        for text in ["ask-me later", "task-runner", "ghp_short", "AKIA", "risk-free sk-12", "ünïcödé ghp_"] {
            check(text, text);
        }
    }

    #[test]
    fn private_keys_are_redacted_whole() {
        let pem = "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc\n-----END RSA PRIVATE KEY-----\ndone";
        check(pem, "key:\n[redacted]\ndone");
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        check(cert, cert);
    }
}
