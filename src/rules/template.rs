//! Templates over events: the minijinja environment shared by a rule set,
//! and a view of a payload's JSON text as template values.
//!
//! A GitHub payload is often 10–30 KB. Parsing it whole (into a
//! `serde_json::Value`, let alone minijinja values) for every event cost
//! more than all the matching around it, so templates read the payload's
//! text in place: an object's members are found by one scan of its own text
//! the first time a template looks inside it, and a field is converted only
//! when a template touches it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{Environment, UndefinedBehavior};
use serde_json::value::RawValue;

use crate::event::Payload;

/// The environment prompts, `if` expressions and the like compile into.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Payloads differ between events: a missing field renders empty instead
    // of failing the job, and `issue.title` on a push is simply empty.
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_keep_trailing_newline(true);
    env
}

/// A JSON object or array inside a payload's text.
struct JsonView {
    payload: Payload,
    /// Where it is in the payload's text.
    span: Range<usize>,
    /// Its members, found on first use: an object's sorted by key (as a
    /// parsed payload would list them), an array's in order.
    members: OnceLock<Vec<Member>>,
}

struct Member {
    key: Option<Box<str>>,
    span: Range<usize>,
    value: OnceLock<Value>,
}

impl std::fmt::Debug for JsonView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

impl JsonView {
    fn text(&self) -> &str {
        &self.payload.json()[self.span.clone()]
    }

    fn is_array(&self) -> bool {
        self.text().starts_with('[')
    }

    fn members(&self) -> &[Member] {
        self.members.get_or_init(|| {
            let whole = self.payload.json();
            let at = |raw: &RawValue| {
                let start = raw.get().as_ptr() as usize - whole.as_ptr() as usize;
                start..start + raw.get().len()
            };
            let member = |key: Option<Box<str>>, raw: &RawValue| Member { key, span: at(raw), value: OnceLock::new() };
            // The text was read as JSON when the payload arrived.
            if self.is_array() {
                let list: Vec<&RawValue> = serde_json::from_str(self.text()).unwrap_or_default();
                list.into_iter().map(|raw| member(None, raw)).collect()
            } else {
                let map: BTreeMap<String, &RawValue> = serde_json::from_str(self.text()).unwrap_or_default();
                map.into_iter().map(|(k, raw)| member(Some(k.into()), raw)).collect()
            }
        })
    }

    fn value_of(&self, m: &Member) -> Value {
        m.value.get_or_init(|| to_value(&self.payload, m.span.clone())).clone()
    }
}

impl Object for JsonView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        if self.is_array() {
            ObjectRepr::Seq
        } else {
            ObjectRepr::Map
        }
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let members = self.members();
        let m = if self.is_array() {
            let i = key.as_i64()?;
            let i = if i < 0 { members.len() as i64 + i } else { i };
            members.get(usize::try_from(i).ok()?)?
        } else {
            let k = key.as_str()?;
            let i = members.binary_search_by(|m| m.key.as_deref().unwrap_or_default().cmp(k)).ok()?;
            &members[i]
        };
        Some(self.value_of(m))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let members = self.members();
        if self.is_array() {
            Enumerator::Seq(members.len())
        } else {
            Enumerator::Values(members.iter().map(|m| Value::from(m.key.as_deref().unwrap_or_default())).collect())
        }
    }
}

/// The JSON value at `span` of the payload's text as a template value.
fn to_value(payload: &Payload, span: Range<usize>) -> Value {
    let text = &payload.json()[span.clone()];
    match text.as_bytes().first() {
        Some(b'{' | b'[') => Value::from_object(JsonView { payload: payload.clone(), span, members: OnceLock::new() }),
        Some(b'"') => serde_json::from_str::<String>(text).map(Value::from).unwrap_or(Value::UNDEFINED),
        Some(b't') => Value::from(true),
        Some(b'f') => Value::from(false),
        Some(b'n') | None => Value::from(()),
        Some(_) => match serde_json::from_str::<serde_json::Number>(text) {
            Ok(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Value::from(i),
                (None, Some(u)) => Value::from(u),
                _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
            },
            Err(_) => Value::UNDEFINED,
        },
    }
}

/// The payload as a template value, read in place.
pub(crate) fn payload_value(payload: &Payload) -> Value {
    let text = payload.json();
    let start = text.len() - text.trim_start().len();
    to_value(payload, start..text.trim_end().len().max(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, payload: serde_json::Value) -> String {
        let env = environment();
        let ctx = payload_value(&Payload::from_value(payload));
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

    #[test]
    fn templates_read_received_text_in_place_without_parsing_it_whole() {
        let text =
            " {\"issue\": {\"title\": \"Caf\\u00e9 \\\"x\\\"\", \"n\": -3, \"f\": 1.5, \"big\": 18446744073709551615,
                      \"esc\\u0061ped\": true, \"none\": null, \"list\": [ [1], {\"a\": 2} ]}} \n";
        let payload = Payload::from_json(text);
        let env = environment();
        let out = env
            .render_str(
                "{{ issue.title }}|{{ issue.n }}|{{ issue.f }}|{{ issue.big }}|{{ issue.escaped }}|{{ issue.none }}|{{ issue.list[0][0] }}{{ issue.list[-1].a }}|{{ issue.list | length }}",
                payload_value(&payload),
            )
            .unwrap();
        assert_eq!(out, "Café \"x\"|-3|1.5|18446744073709551615|True|None|12|2");
        assert!(!payload.is_parsed(), "rendering must not parse the payload whole");
    }
}
