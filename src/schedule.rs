//! The scheduler: fires `on = ["schedule"]` triggers as events.
//!
//! The last fire time of each trigger is stored; after downtime a missed
//! schedule fires once, not once per missed slot, and a restart never fires a
//! slot twice: its delivery id names the slot, so however many replicas tick
//! at once, the store admits each slot once.

use chrono::{DateTime, Utc};

use crate::admit::{Door, Origin, Received};
use crate::event::{Event, Payload, Repository};
use crate::rules::SharedRules;
use crate::store::{Accepted, Store, StoreError};

/// The event a schedule fires for one repository.
pub fn event(trigger: &str, repo: &str, slot: DateTime<Utc>) -> Event {
    let payload = serde_json::json!({
        "schedule": { "trigger": trigger, "time": slot.to_rfc3339() },
        "repository": { "full_name": repo },
    });
    Event {
        // No payload names the default branch: `HEAD` is the remote's own.
        repository: Some(Repository { full_name: repo.to_string(), default_branch: Some("HEAD".into()), id: None }),
        ..Event::new(
            "schedule",
            "schedule",
            None,
            &format!("schedule:{trigger}:{repo}:{}", slot.timestamp()),
            Payload::from_value(payload),
        )
    }
}

/// One pass of the scheduler at `now`: fires every schedule trigger that is
/// due, for each of its repositories. Returns the deliveries it stored.
pub async fn tick(store: &Store, rules: &SharedRules, now: DateTime<Utc>) -> Result<Vec<String>, StoreError> {
    let set = rules.current();
    // The daemon wakes the workers once for everything a tick fired.
    let door = Door { store, rules, wake: None, reject_replays: false };
    let mut fired = Vec::new();
    for t in set.triggers() {
        let Some(schedule) = &t.schedule else { continue };
        let Some(last) = store.schedule_last(&t.name).await? else {
            // First sight of this trigger: slots before baton knew it are not owed.
            store.set_schedule_last(&t.name, now).await?;
            continue;
        };
        let Some(slot) = schedule.due(last, now) else { continue };
        for repo in &t.schedule_repos {
            let event = event(&t.name, repo, slot);
            let id = event.delivery.clone();
            if let Some(Received { accepted: Accepted::New(_), .. }) =
                door.admit(event, Origin::Schedule { trigger: &t.name }).await?
            {
                fired.push(id);
            }
        }
        store.set_schedule_last(&t.name, now).await?;
        tracing::info!(trigger = %t.name, slot = %slot, "Schedule fired.");
    }
    Ok(fired)
}
