//! Admission on PostgreSQL: the batch writers (every waiting delivery in
//! one batch, written as one statement, or in one transaction when its
//! decisions lock rows), and how a domain `Plan` is applied.

use super::*;
use crate::store::ops::{self, retrying};

impl PgStore {
    /// A batch writer: every delivery waiting (up to `MAX_BATCH`) is stored
    /// at once, committed before any of them is answered.
    pub(super) async fn write_batches(
        self,
        rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<(Admission, Reply)>>>,
    ) {
        loop {
            let batch = {
                let mut rx = rx.lock().await;
                let first = tokio::select! {
                    // What is already sent is stored before a stop.
                    biased;
                    next = rx.recv() => next,
                    _ = self.stop.cancelled() => None,
                };
                let Some(first) = first else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                batch
            };
            let (mut admissions, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            crate::store::writer::answer_all(replies, retrying!(ops::admit_batch(&self, &mut admissions).await));
        }
    }

    pub async fn admit(&self, admission: Admission) -> Result<Accepted, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.admissions.send((admission, tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Applies a plan on `tx`: its net effect per record (a later write to a
    /// record wins, as if applied in order), one statement per table. A plan
    /// `in_one_statement` needs no transaction around it.
    pub(super) async fn apply(&self, tx: &mut PgConnection, plan: &Plan, lease: Duration) -> Result<(), StoreError> {
        let mut deliveries = Vec::new();
        let mut jobs: BTreeMap<String, Job> = BTreeMap::new();
        let mut queue: BTreeMap<String, Option<QueueEntry>> = BTreeMap::new();
        let mut groups: BTreeMap<String, GroupState> = BTreeMap::new();
        let mut throttles: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut held: BTreeMap<String, Vec<Held>> = BTreeMap::new();
        let mut cancels: BTreeMap<String, String> = BTreeMap::new();
        let mut leases: BTreeMap<String, bool> = BTreeMap::new();
        let mut ends = Vec::new();
        let mut outbox: BTreeMap<(String, &'static str), Option<Publication>> = BTreeMap::new();
        for w in plan {
            match w {
                Write::Delivery(d) => deliveries.push(d),
                Write::Job { job, .. } => {
                    jobs.insert(job.id.clone(), (**job).clone());
                }
                Write::Enqueue(e) => {
                    queue.insert(e.id.clone(), Some(e.clone()));
                }
                Write::Dequeue(e) => {
                    queue.insert(e.id.clone(), None);
                }
                Write::Group { name, state } => {
                    groups.insert(name.clone(), state.clone());
                }
                Write::Throttle { key, runs } => {
                    throttles.insert(key.clone(), runs.clone());
                }
                Write::Cancel { job, by } => {
                    cancels.insert(job.clone(), by.clone());
                }
                Write::Held { subject, list } => {
                    held.insert(subject.clone(), list.clone());
                }
                Write::Lease(id) => {
                    leases.insert(id.clone(), true);
                }
                Write::Unlease(id) => {
                    leases.insert(id.clone(), false);
                }
                Write::End(id) => ends.push(id.clone()),
                Write::Outbox(p) => {
                    outbox.insert((p.job.clone(), p.purpose.as_str()), Some((**p).clone()));
                }
                Write::Unbox { job, purpose } => {
                    outbox.insert((job.clone(), purpose.as_str()), None);
                }
            }
        }
        let q = |sql: &'static str| sqlx::query(sql);
        for (name, state) in &groups {
            if state.running.is_none() && state.waiting.is_empty() {
                q("DELETE FROM groups WHERE name = $1").bind(name).execute(&mut *tx).await.map_err(pg)?;
            } else {
                q("INSERT INTO groups (name, state) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET state = excluded.state")
                    .bind(name)
                    .bind(Json(state))
                    .execute(&mut *tx)
                    .await
                    .map_err(pg)?;
            }
        }
        if !throttles.is_empty() {
            q("INSERT INTO throttles (key, runs) SELECT * FROM unnest($1::text[], $2::text[]::jsonb[])
               ON CONFLICT (key) DO UPDATE SET runs = excluded.runs")
            .bind(throttles.keys().collect::<Vec<_>>())
            .bind(throttles.values().map(json).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(pg)?;
        }
        for (subject, list) in &held {
            if list.is_empty() {
                q("DELETE FROM held WHERE subject = $1").bind(subject).execute(&mut *tx).await.map_err(pg)?;
            } else {
                q("INSERT INTO held (subject, list) VALUES ($1, $2) ON CONFLICT (subject) DO UPDATE SET list = excluded.list")
                    .bind(subject)
                    .bind(Json(list))
                    .execute(&mut *tx)
                    .await
                    .map_err(pg)?;
            }
        }
        for (job, by) in &cancels {
            q("INSERT INTO cancels (id, by_job) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET by_job = excluded.by_job")
                .bind(job)
                .bind(by)
                .execute(&mut *tx)
                .await
                .map_err(pg)?;
        }
        for (id, on) in &leases {
            if *on {
                let job = jobs.get(id);
                q("INSERT INTO running (id, replica, lease_until, agent, repo)
                   VALUES ($1, $2, now() + make_interval(secs => $3), $4, $5)
                   ON CONFLICT (id) DO UPDATE SET replica = excluded.replica, lease_until = excluded.lease_until")
                .bind(id)
                .bind(&self.replica)
                .bind(lease.as_secs_f64())
                .bind(job.map(|j| j.spec.agent.as_str()).unwrap_or(""))
                .bind(job.and_then(|j| j.repo.as_deref()))
                .execute(&mut *tx)
                .await
                .map_err(pg)?;
            } else {
                q("DELETE FROM running WHERE id = $1").bind(id).execute(&mut *tx).await.map_err(pg)?;
            }
        }
        if !ends.is_empty() {
            q("INSERT INTO ends (id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING")
                .bind(&ends)
                .execute(&mut *tx)
                .await
                .map_err(pg)?;
        }
        for ((job, purpose), p) in &outbox {
            match p {
                Some(p) => q("INSERT INTO outbox (job, purpose, record) VALUES ($1, $2, $3)
                              ON CONFLICT (job, purpose) DO UPDATE SET record = excluded.record")
                .bind(job)
                .bind(*purpose)
                .bind(Json(p))
                .execute(&mut *tx)
                .await
                .map_err(pg)?,
                None => q("DELETE FROM outbox WHERE job = $1 AND purpose = $2")
                    .bind(job)
                    .bind(*purpose)
                    .execute(&mut *tx)
                    .await
                    .map_err(pg)?,
            };
        }
        // The records every delivery writes, and the wake-ups, in one
        // statement (its parts are data-modifying CTEs): admission's trips
        // to the database are what its rate is made of.
        let wake_queue = queue.values().any(Option::is_some) || leases.values().any(|on| !on) || !cancels.is_empty();
        let wake_outbox = outbox.values().any(Option::is_some);
        let gone: Vec<&str> = queue.iter().filter(|(_, e)| e.is_none()).map(|(id, _)| id.as_str()).collect();
        let added: Vec<&QueueEntry> = queue.values().flatten().collect();
        let jobs: Vec<&Job> = jobs.values().collect();
        let mut sql = Sql::default();
        if !deliveries.is_empty() {
            sql.cte(
                "INSERT INTO deliveries (id, received_at, fingerprint, record)
                 SELECT * FROM unnest(?::text[], ?::timestamptz[], ?::text[], ?::text[]::jsonb[])",
            );
        }
        if !jobs.is_empty() {
            sql.cte(
                "INSERT INTO jobs (id, seq, state, trigger, repo, finished_at, record)
                 SELECT * FROM unnest(?::text[], ?::bigint[], ?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::text[]::jsonb[])
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, finished_at = excluded.finished_at, record = excluded.record",
            );
        }
        if !gone.is_empty() {
            sql.cte("DELETE FROM queue WHERE id = ANY(?)");
        }
        if !added.is_empty() {
            sql.cte(
                "INSERT INTO queue (id, priority, seq, agent, repo)
                 SELECT * FROM unnest(?::text[], ?::smallint[], ?::bigint[], ?::text[], ?::text[]) ON CONFLICT DO NOTHING",
            );
        }
        let notify = match (wake_queue, wake_outbox) {
            (true, true) => "SELECT pg_notify(?, ''), pg_notify(?, '')",
            (true, false) | (false, true) => "SELECT pg_notify(?, '')",
            (false, false) => "SELECT 1",
        };
        if sql.is_empty() && notify == "SELECT 1" {
            return Ok(());
        }
        let text = sql.finish(notify);
        let mut query = sqlx::query(&text);
        if !deliveries.is_empty() {
            query = query
                .bind(deliveries.iter().map(|d| d.id.as_str()).collect::<Vec<_>>())
                .bind(deliveries.iter().map(|d| d.received_at).collect::<Vec<_>>())
                .bind(deliveries.iter().map(|d| d.fingerprint.as_deref()).collect::<Vec<_>>())
                .bind(deliveries.iter().map(json).collect::<Vec<_>>());
        }
        if !jobs.is_empty() {
            query = query
                .bind(jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>())
                .bind(jobs.iter().map(|j| j.seq as i64).collect::<Vec<_>>())
                .bind(jobs.iter().map(|j| j.state.as_str()).collect::<Vec<_>>())
                .bind(jobs.iter().map(|j| j.trigger.as_str()).collect::<Vec<_>>())
                .bind(jobs.iter().map(|j| j.repo.as_deref()).collect::<Vec<_>>())
                .bind(jobs.iter().map(|j| j.finished_at).collect::<Vec<_>>())
                .bind(jobs.iter().map(json).collect::<Vec<_>>());
        }
        if !gone.is_empty() {
            query = query.bind(gone);
        }
        if !added.is_empty() {
            query = query
                .bind(added.iter().map(|e| e.id.as_str()).collect::<Vec<_>>())
                .bind(added.iter().map(|e| i16::from(e.priority)).collect::<Vec<_>>())
                .bind(added.iter().map(|e| e.seq as i64).collect::<Vec<_>>())
                .bind(added.iter().map(|e| e.agent.as_str()).collect::<Vec<_>>())
                .bind(added.iter().map(|e| e.repo.as_deref()).collect::<Vec<_>>());
        }
        if wake_queue {
            query = query.bind(&self.channels.0);
        }
        if wake_outbox {
            query = query.bind(&self.channels.1);
        }
        query.execute(&mut *tx).await.map_err(pg)?;
        Ok(())
    }

    /// Applies `plan` in a transaction of its own.
    pub(super) async fn apply_alone(&self, plan: &Plan, lease: Duration) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(pg)?;
        self.apply(&mut tx, plan, lease).await?;
        tx.commit().await.map_err(pg)
    }
}

/// Whether `apply` writes `plan` as one statement (deliveries, jobs and the
/// queue, with the wake-ups, are that statement's parts), which is atomic
/// on its own. Every other kind of write is a statement of its own.
pub(super) fn in_one_statement(plan: &Plan) -> bool {
    plan.iter().all(|w| matches!(w, Write::Delivery(_) | Write::Job { .. } | Write::Enqueue(_) | Write::Dequeue(_)))
}
