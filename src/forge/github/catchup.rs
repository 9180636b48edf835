//! Catch-up after downtime (GitHub App mode). GitHub never retries a failed
//! webhook delivery by itself, so at start and then periodically baton lists
//! the App's recent deliveries and asks GitHub to redeliver each one that
//! failed, that the store does not hold, and that is still inside GitHub's
//! redelivery window — once per delivery.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::auth::Credentials;
use crate::forge::Deliveries;

/// GitHub redelivers deliveries of the past three days; a little margin.
const WINDOW: chrono::Duration = chrono::Duration::hours(71);

/// How often the App's deliveries are looked at after the first time.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10 * 60);

/// One pass: returns how many redeliveries were asked for.
pub(crate) async fn catch_up(credentials: &Credentials, store: &impl Deliveries) -> Result<usize, String> {
    let Some(app) = credentials.app_client() else { return Ok(0) };
    let list: Value = app
        .get("/app/hook/deliveries?per_page=100", None::<&()>)
        .await
        .map_err(|e| format!("listing the App's webhook deliveries failed: {}", super::auth::describe(&e)))?;
    let now = Utc::now();
    let mut asked = 0;
    for d in list.as_array().into_iter().flatten() {
        let (Some(id), Some(guid)) = (d["id"].as_u64(), d["guid"].as_str()) else { continue };
        let ok = d["status_code"].as_u64().is_some_and(|c| (200..300).contains(&c));
        let recent = d["delivered_at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| now - t.with_timezone(&Utc) < WINDOW);
        if ok || !recent || store.holds(guid).await? {
            continue;
        }
        if !store.note_redelivery(guid).await? {
            continue;
        }
        let sent: Result<Value, _> = app.post(format!("/app/hook/deliveries/{id}/attempts"), None::<&()>).await;
        match sent {
            Ok(_) => {
                asked += 1;
                tracing::info!(
                    delivery = guid,
                    event = d["event"].as_str().unwrap_or(""),
                    "Asked GitHub to redeliver a missed webhook."
                );
            }
            Err(e) => {
                tracing::warn!(delivery = guid, error = %super::auth::describe(&e), "Asking GitHub to redeliver a webhook failed.")
            }
        }
    }
    Ok(asked)
}

/// Runs `catch_up` now and every `INTERVAL` until `stop`.
pub async fn run(credentials: std::sync::Arc<Credentials>, store: impl Deliveries, stop: CancellationToken) {
    loop {
        if let Err(e) = catch_up(&credentials, &store).await {
            tracing::warn!(error = %e, "Webhook catch-up failed; will retry.");
        }
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}
