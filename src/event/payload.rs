//! A delivery's payload as it arrived: its JSON text, parsed whole only
//! when something asks for the whole of it.
//!
//! Matching needs a handful of fields, which the forge's normalizer reads
//! straight from the text; templates read the text in place
//! (`rules::template`). Most deliveries therefore never build a
//! `serde_json::Value`, which was the largest cost of a delivery.

use std::fmt;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

/// A payload shared by an event and every template it renders.
#[derive(Clone)]
pub struct Payload(Arc<Inner>);

struct Inner {
    /// A JSON object (or `null` for an event without a payload).
    text: Box<str>,
    value: OnceLock<Value>,
}

impl Payload {
    /// A payload baton made itself (schedules, job ends, the API).
    pub fn from_value(value: Value) -> Payload {
        let text = value.to_string().into_boxed_str();
        Payload(Arc::new(Inner { text, value: OnceLock::from(value) }))
    }

    /// A received payload whose text is known to be one JSON value (the
    /// normalizer has read it); it is parsed whole only on demand.
    pub(crate) fn from_json(text: &str) -> Payload {
        Payload(Arc::new(Inner { text: text.into(), value: OnceLock::new() }))
    }

    /// A received payload already parsed, with its text.
    pub(crate) fn parsed(text: &str, value: Value) -> Payload {
        Payload(Arc::new(Inner { text: text.into(), value: OnceLock::from(value) }))
    }

    /// The JSON text.
    pub fn json(&self) -> &str {
        &self.0.text
    }

    /// The whole payload, parsed on first use.
    pub fn value(&self) -> &Value {
        self.0.value.get_or_init(|| serde_json::from_str(&self.0.text).unwrap_or(Value::Null))
    }

    /// Whether the whole payload has been parsed (for tests of laziness).
    pub fn is_parsed(&self) -> bool {
        self.0.value.get().is_some()
    }
}

impl Default for Payload {
    fn default() -> Payload {
        Payload::from_value(Value::Null)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.0.text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_payload_is_parsed_only_when_asked() {
        let p = Payload::from_json(r#"{"a":{"b":1}}"#);
        assert!(!p.is_parsed());
        assert_eq!(p.value()["a"]["b"], 1);
        assert!(p.is_parsed());
        assert_eq!(Payload::from_value(serde_json::json!({"x": 2})).json(), r#"{"x":2}"#);
    }
}
