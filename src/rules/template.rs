//! Templates over events: the minijinja environment shared by a rule set,
//! and a zero-copy view of a JSON payload as template values.
//!
//! A GitHub payload is often 10–30 KB. Converting it whole into minijinja
//! values for every event cost more than all the matching around it, so
//! templates read the payload in place: a field is converted only when a
//! template touches it.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{Environment, UndefinedBehavior};

/// The environment prompts, `if` expressions and the like compile into.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Payloads differ between events: a missing field renders empty instead
    // of failing the job, and `issue.title` on a push is simply empty.
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_keep_trailing_newline(true);
    env
}

/// A JSON value (object or array) inside a shared payload, addressed by a
/// JSON pointer so nested views share the one parsed payload.
#[derive(Debug)]
struct JsonView {
    root: Arc<serde_json::Value>,
    pointer: String,
}

impl JsonView {
    fn node(&self) -> &serde_json::Value {
        self.root.pointer(&self.pointer).unwrap_or(&serde_json::Value::Null)
    }

    fn child(&self, key: &str) -> Value {
        let escaped = key.replace('~', "~0").replace('/', "~1");
        let pointer = format!("{}/{escaped}", self.pointer);
        match self.root.pointer(&pointer) {
            Some(v) => to_value(&self.root, pointer, v),
            None => Value::UNDEFINED,
        }
    }
}

impl Object for JsonView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.node() {
            serde_json::Value::Array(_) => ObjectRepr::Seq,
            _ => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match self.node() {
            serde_json::Value::Object(_) => key.as_str().map(|k| self.child(k)),
            serde_json::Value::Array(list) => {
                let i = key.as_i64()?;
                let i = if i < 0 { list.len() as i64 + i } else { i };
                usize::try_from(i).ok().map(|i| self.child(&i.to_string()))
            }
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match self.node() {
            serde_json::Value::Object(map) => Enumerator::Values(map.keys().map(|k| Value::from(k.as_str())).collect()),
            serde_json::Value::Array(list) => Enumerator::Seq(list.len()),
            _ => Enumerator::Empty,
        }
    }
}

fn to_value(root: &Arc<serde_json::Value>, pointer: String, v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
            Value::from_object(JsonView { root: root.clone(), pointer })
        }
    }
}

/// The payload as a template value, read in place.
pub(crate) fn payload_value(payload: &Arc<serde_json::Value>) -> Value {
    to_value(payload, String::new(), payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, payload: serde_json::Value) -> String {
        let env = environment();
        let ctx = payload_value(&Arc::new(payload));
        env.render_str(template, ctx).unwrap()
    }

    #[test]
    fn templates_read_nested_fields_lists_and_missing_ones() {
        let p = serde_json::json!({
            "issue": {"title": "Crash", "number": 7, "labels": [{"name": "bug"}, {"name": "p1"}], "draft": false},
            "a/b": {"~x": 1}
        });
        assert_eq!(render("{{ issue.title }} #{{ issue.number }}", p.clone()), "Crash #7");
        assert_eq!(render("{% for l in issue.labels %}{{ l.name }},{% endfor %}", p.clone()), "bug,p1,");
        assert_eq!(render("{{ issue.labels | length }} {{ issue.labels[-1].name }}", p.clone()), "2 p1");
        assert_eq!(render("{{ issue.missing.deeper }}|{{ nothing }}", p.clone()), "|");
        assert_eq!(render("{% if 'crash' in issue.title | lower %}yes{% endif %}", p.clone()), "yes");
        assert_eq!(render("{% for k in issue %}{{ k }} {% endfor %}", p.clone()).split(' ').count(), 5);
        assert_eq!(render("{% if not issue.draft %}ready{% endif %} {{ issue.number + 1 }}", p), "ready 8");
    }
}
