//! Generic webhook sources (`[sources.NAME]`): any JSON a CI system or a
//! script sends becomes an `Event` of kind `NAME` or `NAME.<action>`.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::NormalizeError;
use super::{Event, Repository};
use crate::config::SourceSettings;

/// The delivery id when the source names no header for it: the same body
/// always gets the same id, so a resent request is a duplicate.
pub fn body_delivery_id(body: &[u8]) -> String {
    format!("sha256-{}", hex::encode(&Sha256::digest(body)[..16]))
}

/// The value at a dotted path (`build.status`), as text.
fn lookup(value: &Value, path: &str) -> Option<String> {
    let mut cur = value;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(map) => map.get(part)?,
            Value::Array(list) => list.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match cur {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub fn normalize(source: &SourceSettings, delivery: &str, body: &[u8]) -> Result<Event, NormalizeError> {
    let value: Value = serde_json::from_slice(body)?;
    if !value.is_object() {
        return Err(NormalizeError::NotAnObject);
    }
    let action = source
        .action_field
        .as_deref()
        .and_then(|f| lookup(&value, f))
        // An action becomes part of a kind name: keep it to one plain word.
        .filter(|a| a.len() <= 100 && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)));
    let repo = match &source.repo_field {
        Some(f) => lookup(&value, f),
        None => lookup(&value, "repository.full_name").or_else(|| lookup(&value, "repository")),
    }
    .filter(|r| r.split('/').count() == 2);
    let repository = repo.map(|full_name| Repository {
        full_name,
        default_branch: lookup(&value, "repository.default_branch"),
        id: None,
    });
    Ok(Event {
        repository,
        branch: lookup(&value, "branch"),
        head_sha: lookup(&value, "sha").or_else(|| lookup(&value, "head_sha")),
        conclusion: lookup(&value, "conclusion").or_else(|| lookup(&value, "status")),
        ..Event::new(&source.name, &source.name, action, delivery, payload_of(body, value))
    })
}

/// A parsed body as the event's payload, its text kept.
pub(crate) fn payload_of(body: &[u8], value: Value) -> crate::event::Payload {
    match std::str::from_utf8(body) {
        Ok(text) => crate::event::Payload::parsed(text, value),
        Err(_) => crate::event::Payload::from_value(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn source(action: Option<&str>) -> SourceSettings {
        SourceSettings {
            name: "ci".into(),
            secret: Secret::new("s"),
            signature_header: "X-Signature-256".into(),
            delivery_header: None,
            action_field: action.map(str::to_string),
            repo_field: None,
        }
    }

    #[test]
    fn kind_comes_from_the_named_action_field() {
        let body = br#"{"build": {"status": "failed"}, "repository": "acme/app", "sha": "abc1234"}"#;
        let e = normalize(&source(Some("build.status")), "d", body).unwrap();
        assert_eq!(e.kind, "ci.failed");
        assert_eq!(e.repo_name(), Some("acme/app"));
        assert_eq!(e.head_sha.as_deref(), Some("abc1234"));
        let e = normalize(&source(None), "d", body).unwrap();
        assert_eq!(e.kind, "ci");
        let odd = br#"{"build": {"status": "a.b c"}}"#;
        assert_eq!(normalize(&source(Some("build.status")), "d", odd).unwrap().kind, "ci");
    }

    #[test]
    fn body_ids_are_stable() {
        assert_eq!(body_delivery_id(b"x"), body_delivery_id(b"x"));
        assert_ne!(body_delivery_id(b"x"), body_delivery_id(b"y"));
    }
}
