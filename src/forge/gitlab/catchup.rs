//! Catch-up after downtime. GitLab logs each delivery of a hook, failed
//! ones too, and can send a logged one again; so at start and then
//! periodically baton reads each watched project's hook events (`GET
//! /projects/:id/hooks/:hook_id/events`) and asks GitLab to resend each
//! delivery that failed, that the store does not hold, and that is recent —
//! once per delivery, across replicas.
//!
//! A delivery is known by the id baton stores it under (`GitLab::verify`):
//! `gitlab:` and its `Idempotency-Key` (the same across GitLab's retries),
//! else its `X-Gitlab-Event-UUID`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::api::{Client, HookEvent};
use crate::config::WatchedProject;
use crate::forge::{ApiError, Deliveries};

/// Events older than this are left alone: as for GitHub, three days, a
/// little short (GitLab keeps a week of them).
const WINDOW: chrono::Duration = chrono::Duration::hours(71);

/// How often the hooks' events are looked at after the first time.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10 * 60);

/// Pages of events read per project and pass (20 each, GitLab's most, newest
/// first): the last 1,000 deliveries.
const MAX_PAGES: u32 = 50;

/// Tries of one call that GitLab rate-limits (resending is limited to 5 a
/// minute per hook and user), and the longest wait between them.
const TRIES: u32 = 3;
const MAX_WAIT: Duration = Duration::from_secs(60);

/// A delivery to ask GitLab to resend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    /// The hook event to resend: the delivery's latest attempt.
    pub event: u64,
    /// The id baton stores the delivery under (`gitlab:…`).
    pub delivery: String,
    /// The hook's event, as GitLab logged it (`note_hooks`, …).
    pub trigger: String,
}

/// Why a project's pass stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The token may not read the hook's events: no use asking again.
    Denied(String),
    /// Anything else: the next pass tries again.
    Failed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Denied(m) | Failure::Failed(m) => f.write_str(m),
        }
    }
}

/// The id baton stored (or would store) a logged delivery under: the
/// headers `GitLab::verify` reads, in its order.
pub fn delivery_id(event: &HookEvent) -> Option<String> {
    [super::IDEMPOTENCY, super::EVENT_UUID, super::SW_ID]
        .iter()
        .find_map(|name| event.request_header(name))
        .filter(|id| crate::forge::signature::valid_token(id))
        .map(|id| format!("{}{id}", super::DELIVERY_PREFIX))
}

/// Whether the receiver answered 2xx. GitLab logs a status code, or its
/// words for not reaching the receiver (`internal error`).
fn answered_ok(event: &HookEvent) -> bool {
    event.response_status.trim().parse::<u16>().is_ok_and(|code| (200..300).contains(&code))
}

fn recent(event: &HookEvent, now: DateTime<Utc>) -> bool {
    event
        .created_at
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| now - t.with_timezone(&Utc) < WINDOW)
}

/// The deliveries to resend among `events`, oldest first: each one whose
/// attempts inside the window all failed, that has an id, and that is not
/// `held`. A delivery with a 2xx attempt was stored when it was answered
/// (and may since have been pruned): it is never resent. A delivery tried
/// several times is resent once, by its latest attempt.
pub fn select(events: &[HookEvent], held: &HashSet<String>, now: DateTime<Utc>) -> Vec<Missed> {
    let mut delivered = HashSet::new();
    let mut failed: BTreeMap<String, &HookEvent> = BTreeMap::new();
    for event in events {
        let Some(delivery) = delivery_id(event) else { continue };
        if answered_ok(event) {
            delivered.insert(delivery);
        } else if recent(event, now) {
            let latest = failed.entry(delivery).or_insert(event);
            if event.id > latest.id {
                *latest = event;
            }
        }
    }
    let mut missed: Vec<Missed> = failed
        .into_iter()
        .filter(|(delivery, _)| !delivered.contains(delivery) && !held.contains(delivery))
        .map(|(delivery, event)| Missed { event: event.id, delivery, trigger: event.trigger.clone() })
        .collect();
    missed.sort_by_key(|m| m.event);
    missed
}

/// One project's pass: returns how many resends were asked for.
pub async fn catch_up(client: &Client, project: &WatchedProject, store: &impl Deliveries) -> Result<usize, Failure> {
    let (path, hook) = (project.path.as_str(), project.hook_id);
    let now = Utc::now();
    let mut events = Vec::new();
    for page in 1..=MAX_PAGES {
        let listed = patiently(|| client.hook_events(path, hook, page), |e| &e.error).await;
        let (list, more) = listed.map_err(|e| match e.denied {
            true => Failure::Denied(format!(
                "the token cannot read the events of hook {hook} in {path} ({e}): it needs the Maintainer role \
                 and the api scope"
            )),
            false => Failure::Failed(format!("listing the events of hook {hook} in {path} failed: {e}")),
        })?;
        let older = list.last().is_some_and(|e| !recent(e, now));
        events.extend(list);
        if !more || older {
            break;
        }
    }
    // The store is asked only about deliveries that failed.
    let mut held = HashSet::new();
    for m in select(&events, &held, now) {
        if store.holds(&m.delivery).await.map_err(Failure::Failed)? {
            held.insert(m.delivery);
        }
    }
    let mut asked = 0;
    for m in select(&events, &held, now) {
        if !store.note_redelivery(&m.delivery).await.map_err(Failure::Failed)? {
            continue;
        }
        match patiently(|| client.resend_hook_event(path, hook, m.event), |e| e).await {
            Ok(()) => {
                asked += 1;
                tracing::info!(
                    project = path,
                    hook,
                    hook_event = m.event,
                    delivery = %m.delivery,
                    event = %m.trigger,
                    "Asked GitLab to resend a missed webhook."
                );
            }
            Err(e) => tracing::warn!(
                project = path,
                hook,
                hook_event = m.event,
                delivery = %m.delivery,
                error = %e,
                "Asking GitLab to resend a webhook failed."
            ),
        }
    }
    Ok(asked)
}

/// A call, tried again after the wait GitLab names when it rate-limits it.
async fn patiently<T, E, F, Fut>(call: F, api: impl Fn(&E) -> &ApiError) -> Result<T, E>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut tries = 1;
    loop {
        match call().await {
            Err(e) if tries < TRIES && api(&e).retryable && api(&e).retry_after.is_some() => {
                let wait = api(&e).retry_after.unwrap_or(MAX_WAIT).min(MAX_WAIT);
                tokio::time::sleep(wait).await;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Runs `catch_up` for each project now and every `INTERVAL` until `stop`.
/// A project whose events the token may not read is said once and dropped;
/// with none left, the loop ends.
pub async fn run(
    client: std::sync::Arc<Client>,
    projects: Vec<WatchedProject>,
    store: impl Deliveries,
    stop: CancellationToken,
) {
    let mut watched = projects;
    while !watched.is_empty() {
        let mut denied = Vec::new();
        for project in &watched {
            let pass = tokio::select! {
                pass = catch_up(&client, project, &store) => pass,
                _ = stop.cancelled() => return,
            };
            match pass {
                Ok(_) => {}
                Err(Failure::Denied(why)) => {
                    tracing::error!(project = %project.path, hook = project.hook_id, "GitLab catch-up is off for this project: {why}.");
                    denied.push(project.path.clone());
                }
                Err(Failure::Failed(e)) => {
                    tracing::warn!(project = %project.path, error = %e, "GitLab webhook catch-up failed; will retry.")
                }
            }
        }
        watched.retain(|p| !denied.contains(&p.path));
        if watched.is_empty() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u64, status: &str, headers: &[(&str, &str)], hours_ago: i64) -> HookEvent {
        let at = (Utc::now() - chrono::Duration::hours(hours_ago)).to_rfc3339();
        serde_json::from_value(serde_json::json!({
            "id": id, "trigger": "note_hooks", "response_status": status, "created_at": at,
            "request_headers": headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }))
        .unwrap()
    }

    fn ids(missed: &[Missed]) -> Vec<(u64, &str)> {
        missed.iter().map(|m| (m.event, m.delivery.as_str())).collect()
    }

    #[test]
    fn the_delivery_is_named_as_verify_names_it() {
        let both = event(1, "500", &[("X-Gitlab-Event-UUID", "uuid-1"), ("Idempotency-Key", "key-1")], 1);
        assert_eq!(delivery_id(&both).as_deref(), Some("gitlab:key-1"));
        let uuid = event(2, "500", &[("x-gitlab-event-uuid", "uuid-2")], 1);
        assert_eq!(delivery_id(&uuid).as_deref(), Some("gitlab:uuid-2"));
        assert_eq!(delivery_id(&event(3, "500", &[("X-Gitlab-Event", "Note Hook")], 1)), None);
        assert_eq!(delivery_id(&event(4, "500", &[("Idempotency-Key", "has space")], 1)), None);
    }

    #[test]
    fn failed_recent_unheld_deliveries_are_resent_once_oldest_first() {
        let key = |k: &'static str| [("Idempotency-Key", k)];
        let events = vec![
            event(9, "internal error", &key("down"), 1),
            event(8, "502", &key("bad-gateway"), 2),
            event(7, "200", &key("fine"), 2),
            event(6, "500", &key("retried-then-fine"), 3),
            event(5, "202", &key("retried-then-fine"), 3),
            event(4, "500", &key("held"), 3),
            event(3, "internal error", &key("twice"), 4),
            event(2, "internal error", &key("twice"), 5),
            event(1, "500", &key("ancient"), 24 * 4),
            event(0, "500", &[], 1),
        ];
        let held: HashSet<String> = ["gitlab:held".to_string()].into();
        let missed = select(&events, &held, Utc::now());
        assert_eq!(ids(&missed), [(3, "gitlab:twice"), (8, "gitlab:bad-gateway"), (9, "gitlab:down")]);
        assert_eq!(missed[0].trigger, "note_hooks");
        // Nothing held: the held one too.
        let all = select(&events, &HashSet::new(), Utc::now());
        assert_eq!(all.len(), 4);
        assert!(all.iter().any(|m| m.delivery == "gitlab:held"));
    }

    #[test]
    fn a_status_is_ok_only_when_it_is_2xx() {
        for (status, ok) in
            [("200", true), ("204", true), (" 201 ", true), ("301", false), ("internal error", false), ("", false)]
        {
            assert_eq!(answered_ok(&event(1, status, &[], 1)), ok, "{status:?}");
        }
        // GitLab may log the code as a number.
        let numeric: HookEvent =
            serde_json::from_value(serde_json::json!({ "id": 1, "response_status": 202 })).unwrap();
        assert!(answered_ok(&numeric));
    }
}
