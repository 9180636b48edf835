//! The template context an event gives every trigger it visits: the raw
//! payload, the normalized `event`, and the forge-neutral `subject.*` and
//! `repository.*` that every forge fills.

use minijinja::{context, Value};

use super::template;
use crate::event::Event;

/// The template context shared by every trigger an event visits: the raw
/// payload's top-level fields, plus `event` (the normalized view), plus the
/// forge-neutral `subject` and `repository` wherever the payload has no field
/// of that name (a payload's own `repository` keeps every field, and gains
/// the neutral ones it lacks).
pub(super) fn base_context(event: &Event) -> Value {
    let payload = template::payload_value(&event.payload);
    let neutral = neutral_context(event);
    // A payload's `repository` without the neutral fields (GitLab's has no
    // `full_name`) gets them, its own fields first.
    let defined = |v: Result<Value, _>| v.ok().filter(|v: &Value| !v.is_undefined() && !v.is_none());
    let repository = match (defined(payload.get_attr("repository")), defined(neutral.get_attr("repository"))) {
        (Some(own), Some(n)) => Some(minijinja::value::merge_maps([n, own])),
        _ => None,
    };
    let own = context! {
        event => Value::from_serialize(event),
        thread => Value::from_serialize(&event.thread),
        ..payload
    };
    // The last map wins a lookup, and a map lacking the key passes it on.
    let merged = minijinja::value::merge_maps([neutral, own]);
    match repository {
        Some(repository) => minijinja::value::merge_maps([merged, context! { repository }]),
        None => merged,
    }
}

/// `subject.*` (kind, number, title, body, url, author, trust, head and base
/// refs and shas, fork) and `repository.full_name`, which every forge fills.
fn neutral_context(event: &Event) -> Value {
    // What the forge did not say renders empty, as a missing payload field does.
    fn opt<T: Into<Value>>(v: Option<T>) -> Value {
        v.map(Into::into).unwrap_or(Value::UNDEFINED)
    }
    let text = |s: &Option<String>| opt(s.as_deref());
    let subject = event.subject.map(|number| {
        context! {
            kind => if event.subject_is_pull_request { "change_request" } else { "issue" },
            number => number,
            title => text(&event.title),
            body => text(&event.body),
            url => text(&event.url),
            author => text(&event.author),
            trust => text(&event.association),
            head => context! { ref => text(&event.branch), sha => text(&event.head_sha) },
            base => context! { ref => text(&event.base_branch), sha => text(&event.base_sha) },
            fork => opt(event.head_in_repo.map(|own| !own)),
        }
    });
    let repository = event.repository.as_ref().map(|r| {
        context! { full_name => r.full_name, default_branch => text(&r.default_branch) }
    });
    context! { subject => opt(subject), repository => opt(repository) }
}
