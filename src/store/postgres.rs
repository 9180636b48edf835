//! The PostgreSQL backend, for several replicas on one database.
//!
//! The tables are in `migrations/`, applied at start under an advisory lock.
//! Each change is a domain plan applied in one transaction, like sled's; what
//! is new is that other replicas write too:
//! - admission takes a transaction-scoped advisory lock per delivery id and
//!   body fingerprint (in sorted order), so two replicas given the same
//!   delivery store it once;
//! - claims run under one advisory lock, so the limits that span replicas
//!   (per repository, per agent, concurrency groups) are checked against
//!   every replica's running jobs; queue rows are taken `FOR UPDATE SKIP
//!   LOCKED`;
//! - a running job carries its replica and a lease deadline; a lapsed lease
//!   is taken by exactly one replica (one `UPDATE … RETURNING`);
//! - the outbox leases each publication to one replica at a time;
//! - `NOTIFY` wakes every replica's dispatcher and publisher.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot, Notify};

use super::writer::{Reply, MAX_BATCH};
use super::{JobQuery, PrHead, StoreError};
use crate::domain::admission::{self, Admission, AdmitView};
use crate::domain::approval::{self, Pending};
use crate::domain::dispatch::{self, Claim, Limits, Load, QueueEntry};
use crate::domain::{subject_key, Accepted, Approval, Delivery, GroupState, Job, Plan, Publication, Purpose, Write};

/// The migrations, in order; each runs once, in its own transaction.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_tables.sql")),
    (2, include_str!("migrations/0002_notes.sql")),
    (3, include_str!("migrations/0003_children.sql")),
];

/// The whole schema, as `baton migrate --print` shows it.
pub fn schema() -> String {
    MIGRATIONS.iter().map(|(_, sql)| *sql).collect::<Vec<_>>().join("\n")
}

/// Advisory lock keys (arbitrary, fixed): migrations, and claims.
const MIGRATE_LOCK: i64 = 0x6261_746f_6e00_0001;
const CLAIM_LOCK: i64 = 0x6261_746f_6e00_0002;

/// Admission batches in flight at once.
const WRITERS: usize = 2;

/// How long a replica holds a publication it is sending.
const OUTBOX_LEASE: Duration = Duration::from_secs(60);

/// A pool of connections to one database (and schema), as one replica.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// This replica's name: what it runs, leases and sends is marked with it.
    replica: String,
    /// The `NOTIFY` channels of this schema: the queue, the outbox.
    channels: (String, String),
    /// Deliveries waiting for the batch writer.
    admissions: mpsc::Sender<(Admission, Reply)>,
    /// Stops the batch writers once what waits is stored (`close`).
    stop: tokio_util::sync::CancellationToken,
    writers: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

fn pg(e: sqlx::Error) -> StoreError {
    match &e {
        // The code tells a conflict to retry from a real failure.
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => StoreError::Postgres(format!("{} (SQLSTATE {code})", db.message())),
            None => StoreError::Postgres(db.message().to_string()),
        },
        _ => StoreError::Postgres(e.to_string()),
    }
}

/// Whether a transaction failed only because another got in its way
/// (serialization, deadlock, a unique key taken meanwhile): run it again.
fn conflict(e: &StoreError) -> bool {
    let codes = ["(SQLSTATE 40001)", "(SQLSTATE 40P01)", "(SQLSTATE 23505)"];
    matches!(e, StoreError::Postgres(m) if codes.iter().any(|c| m.ends_with(c)))
}

/// `url` without its password, for messages.
fn display_url(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| rest.split_once('@').map(|(cred, host)| (scheme, cred, host)))
    {
        Some((scheme, cred, host)) => {
            let user = cred.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

/// Runs `f` again while it fails on a conflict with another transaction.
macro_rules! retrying {
    ($body:expr) => {{
        let mut tries = 0;
        loop {
            match $body {
                Err(e) if conflict(&e) && tries < 8 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(5 * tries)).await;
                }
                other => break other,
            }
        }
    }};
}

impl PgStore {
    /// Connects, creates the schema if it is missing and applies the
    /// migrations, then starts the batch writer.
    pub async fn connect(url: &str, schema: Option<&str>, replica: &str) -> Result<PgStore, StoreError> {
        let unreachable = |reason: String| StoreError::Unreachable { url: display_url(url), reason };
        let mut options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| unreachable(e.to_string()))?;
        if let Some(schema) = schema {
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        migrate(&pool, schema).await?;
        let tag = schema.unwrap_or("public").replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
        let (tx, rx) = mpsc::channel(4096);
        let store = PgStore {
            pool,
            replica: replica.to_string(),
            channels: (format!("baton_queue_{tag}"), format!("baton_outbox_{tag}")),
            admissions: tx,
            stop: tokio_util::sync::CancellationToken::new(),
            writers: std::sync::Arc::default(),
        };
        // Batches overlap: while one commits (and waits on the WAL's flush),
        // the next is gathered and written.
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        let handles = (0..WRITERS).map(|_| tokio::spawn(store.clone().write_batches(rx.clone()))).collect();
        *store.writers.lock().unwrap_or_else(|p| p.into_inner()) = handles;
        Ok(store)
    }

    /// Stores what waits, then stops the batch writers and waits for them.
    pub async fn close(&self) {
        self.stop.cancel();
        let handles = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.await;
        }
    }

    /// The batch writer: every delivery waiting (up to `MAX_BATCH`) goes
    /// into one transaction, committed before any of them is answered.
    async fn write_batches(self, rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<(Admission, Reply)>>>) {
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
            let (admissions, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            super::writer::answer_all(replies, retrying!(self.admit_batch(&admissions).await));
        }
    }

    pub async fn admit(&self, admission: Admission) -> Result<Accepted, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.admissions.send((admission, tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn admit_batch(&self, batch: &[Admission]) -> Result<Vec<Accepted>, StoreError> {
        let mut batch = batch.to_vec();
        let mut tx = self.pool.begin().await.map_err(pg)?;
        let wanted = AdmitView::wanted(&batch);
        let mut view = AdmitView::default();
        // Rows a decision depends on are locked first, in key order: a
        // group's line, a trigger's runs, a subject's held jobs. (Two
        // replicas storing one delivery id or body at once is settled by
        // the primary key and the unique fingerprint: the loser's batch
        // runs again and finds it stored.)
        let groups: Vec<String> = wanted.groups.iter().cloned().collect();
        view.groups = lock_groups(&mut tx, &groups).await?;
        let keys: Vec<String> = wanted.throttles.iter().cloned().collect();
        view.throttles = lock_throttles(&mut tx, &keys).await?;
        let subjects: Vec<String> = wanted.subjects.iter().cloned().collect();
        if !subjects.is_empty() {
            let rows =
                sqlx::query("SELECT subject, list FROM held WHERE subject = ANY($1) ORDER BY subject FOR UPDATE")
                    .bind(&subjects)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(pg)?;
            for row in rows {
                let Json(list): Json<Vec<Pending>> = row.try_get(1).map_err(pg)?;
                view.held.insert(row.try_get(0).map_err(pg)?, list);
            }
        }
        // Everything else in one trip: stored ids, bodies, jobs (the batch's
        // and those waiting in its groups), and the new jobs' numbers.
        let ids: Vec<String> = wanted.deliveries.iter().cloned().collect();
        let bodies: Vec<String> = wanted.bodies.iter().cloned().collect();
        let mut job_ids: Vec<String> = wanted.jobs.iter().cloned().collect();
        job_ids.extend(view.waiting());
        let count = batch.iter().map(|a| a.jobs.len()).sum::<usize>() as i64;
        let rows = sqlx::query(
            "SELECT 0, id, NULL::text FROM deliveries WHERE id = ANY($1)
             UNION ALL SELECT 1, fingerprint, id FROM deliveries WHERE fingerprint = ANY($2)
             UNION ALL SELECT 2, id, record::text FROM jobs WHERE id = ANY($3)
             UNION ALL SELECT 3, NULL, nextval('job_seq')::text FROM generate_series(1, $4)",
        )
        .bind(&ids)
        .bind(&bodies)
        .bind(&job_ids)
        .bind(count)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg)?;
        let mut seqs = Vec::new();
        for row in rows {
            let kind: i32 = row.try_get(0).map_err(pg)?;
            let key: Option<String> = row.try_get(1).map_err(pg)?;
            let value: Option<String> = row.try_get(2).map_err(pg)?;
            match (kind, key, value) {
                (0, Some(id), _) => {
                    view.deliveries.insert(id);
                }
                (1, Some(fingerprint), Some(id)) => {
                    view.bodies.insert(fingerprint, id);
                }
                (2, Some(id), Some(record)) => {
                    let job: Job = serde_json::from_str(&record).map_err(|source| StoreError::Corrupt {
                        tree: "jobs",
                        key: id.clone(),
                        source,
                    })?;
                    view.jobs.insert(id, job);
                }
                (3, _, Some(seq)) => seqs.push(seq.parse::<u64>().unwrap_or(0)),
                _ => {}
            }
        }
        seqs.sort_unstable();
        let mut seqs = seqs.into_iter();
        for job in batch.iter_mut().flat_map(|a| a.jobs.iter_mut()) {
            job.seq = seqs.next().unwrap_or(0);
        }
        let mut plan = Plan::new();
        let mut answers = Vec::with_capacity(batch.len());
        for a in &batch {
            let (accepted, writes) = admission::admit(&mut view, a);
            plan.extend(writes);
            answers.push(accepted);
        }
        self.apply(&mut tx, &plan, Duration::ZERO).await?;
        tx.commit().await.map_err(pg)?;
        Ok(answers)
    }

    /// Applies a plan inside `tx`: its net effect per record (a later write
    /// to a record wins, as if applied in order), one statement per table.
    async fn apply(&self, tx: &mut Transaction<'_, Postgres>, plan: &Plan, lease: Duration) -> Result<(), StoreError> {
        let mut deliveries = Vec::new();
        let mut jobs: BTreeMap<String, Job> = BTreeMap::new();
        let mut queue: BTreeMap<String, Option<QueueEntry>> = BTreeMap::new();
        let mut groups: BTreeMap<String, GroupState> = BTreeMap::new();
        let mut throttles: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut held: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
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
                q("DELETE FROM groups WHERE name = $1").bind(name).execute(&mut **tx).await.map_err(pg)?;
            } else {
                q("INSERT INTO groups (name, state) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET state = excluded.state")
                    .bind(name)
                    .bind(Json(state))
                    .execute(&mut **tx)
                    .await
                    .map_err(pg)?;
            }
        }
        if !throttles.is_empty() {
            q("INSERT INTO throttles (key, runs) SELECT * FROM unnest($1::text[], $2::text[]::jsonb[])
               ON CONFLICT (key) DO UPDATE SET runs = excluded.runs")
            .bind(throttles.keys().collect::<Vec<_>>())
            .bind(throttles.values().map(json).collect::<Vec<_>>())
            .execute(&mut **tx)
            .await
            .map_err(pg)?;
        }
        for (subject, list) in &held {
            if list.is_empty() {
                q("DELETE FROM held WHERE subject = $1").bind(subject).execute(&mut **tx).await.map_err(pg)?;
            } else {
                q("INSERT INTO held (subject, list) VALUES ($1, $2) ON CONFLICT (subject) DO UPDATE SET list = excluded.list")
                    .bind(subject)
                    .bind(Json(list))
                    .execute(&mut **tx)
                    .await
                    .map_err(pg)?;
            }
        }
        for (job, by) in &cancels {
            q("INSERT INTO cancels (id, by_job) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET by_job = excluded.by_job")
                .bind(job)
                .bind(by)
                .execute(&mut **tx)
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
                .execute(&mut **tx)
                .await
                .map_err(pg)?;
            } else {
                q("DELETE FROM running WHERE id = $1").bind(id).execute(&mut **tx).await.map_err(pg)?;
            }
        }
        if !ends.is_empty() {
            q("INSERT INTO ends (id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING")
                .bind(&ends)
                .execute(&mut **tx)
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
                .execute(&mut **tx)
                .await
                .map_err(pg)?,
                None => q("DELETE FROM outbox WHERE job = $1 AND purpose = $2")
                    .bind(job)
                    .bind(*purpose)
                    .execute(&mut **tx)
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
        query.execute(&mut **tx).await.map_err(pg)?;
        Ok(())
    }

    /// Applies `plan` in a transaction of its own.
    async fn apply_alone(&self, plan: &Plan, lease: Duration) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(pg)?;
        self.apply(&mut tx, plan, lease).await?;
        tx.commit().await.map_err(pg)
    }

    /// Wakes `queue` and `outbox` on the schema's notifications; after a
    /// lost connection (notifications may have been missed) it wakes both.
    pub fn listen(
        &self,
        queue: std::sync::Arc<Notify>,
        outbox: std::sync::Arc<Notify>,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (pool, channels) = (self.pool.clone(), self.channels.clone());
        tokio::spawn(async move {
            let mut listener: Option<PgListener> = None;
            loop {
                if listener.is_none() {
                    match PgListener::connect_with(&pool).await {
                        Ok(mut l) => match l.listen_all([channels.0.as_str(), channels.1.as_str()]).await {
                            Ok(()) => {
                                listener = Some(l);
                                queue.notify_one();
                                outbox.notify_one();
                            }
                            Err(e) => tracing::warn!(error = %e, "Cannot listen for other replicas' work; retrying."),
                        },
                        Err(e) => tracing::warn!(error = %e, "Cannot listen for other replicas' work; retrying."),
                    }
                }
                let Some(l) = listener.as_mut() else {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                };
                tokio::select! {
                    n = l.try_recv() => match n {
                        Ok(Some(n)) if n.channel() == channels.1 => outbox.notify_one(),
                        Ok(Some(_)) => queue.notify_one(),
                        // The connection was lost and is made anew: wake all.
                        Ok(None) => {
                            queue.notify_one();
                            outbox.notify_one();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Lost the database's notifications; reconnecting.");
                            listener = None;
                        }
                    },
                    _ = stop.cancelled() => return,
                }
            }
        })
    }

    pub async fn prune_deliveries(&self, cutoff: DateTime<Utc>) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries WHERE received_at < $1 LIMIT 500)",
            )
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .map_err(pg)?
            .rows_affected();
            total += n as usize;
            if n < 500 {
                return Ok(total);
            }
        }
    }

    pub async fn prune_jobs(&self, cutoff: DateTime<Utc>, max: usize) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(pg)?;
        let ids: Vec<String> = sqlx::query_scalar(
            "DELETE FROM jobs WHERE id IN (
                SELECT j.id FROM jobs j
                WHERE j.state IN ('succeeded', 'failed', 'cancelled') AND j.finished_at < $1
                  AND NOT EXISTS (SELECT 1 FROM ends e WHERE e.id = j.id)
                  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job = j.id AND o.record->>'state' = 'pending')
                ORDER BY j.seq LIMIT $2
                FOR UPDATE SKIP LOCKED)
             RETURNING id",
        )
        .bind(cutoff)
        .bind(max as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg)?;
        sqlx::query("DELETE FROM outbox WHERE job = ANY($1)").bind(&ids).execute(&mut *tx).await.map_err(pg)?;
        sqlx::query("DELETE FROM job_logs WHERE job = ANY($1)").bind(&ids).execute(&mut *tx).await.map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(ids)
    }

    pub async fn note_redelivery(&self, guid: &str) -> Result<bool, StoreError> {
        let n = sqlx::query("INSERT INTO redeliveries (guid) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(guid)
            .execute(&self.pool)
            .await
            .map_err(pg)?
            .rows_affected();
        Ok(n == 1)
    }

    pub async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        let row: Option<Json<Delivery>> = sqlx::query_scalar("SELECT record FROM deliveries WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)?;
        Ok(row.map(|Json(d)| d))
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let row: Option<Json<Job>> = sqlx::query_scalar("SELECT record FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)?;
        Ok(row.map(|Json(j)| j))
    }

    pub async fn list_jobs(&self, q: &JobQuery) -> Result<Vec<Job>, StoreError> {
        if let Some(delivery) = &q.delivery {
            let ids = self.delivery(delivery).await?.map(|d| d.jobs).unwrap_or_default();
            let jobs = load_jobs_from(&self.pool, &ids).await?;
            return Ok(q.finish(jobs.into_values().collect()));
        }
        let rows: Vec<Json<Job>> = sqlx::query_scalar(
            "SELECT record FROM jobs
             WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR trigger = $2)
               AND ($3::text IS NULL OR repo = $3) AND ($4::bigint IS NULL OR seq < $4)
               AND ($6::text IS NULL OR record->>'parent' = $6)
             ORDER BY seq DESC LIMIT $5",
        )
        .bind(q.state.map(|s| s.as_str()))
        .bind(q.trigger.as_deref())
        .bind(q.repo.as_deref())
        .bind(q.before.map(|b| b as i64))
        .bind(q.limit as i64)
        .bind(q.parent.as_deref())
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        Ok(rows.into_iter().map(|Json(j)| j).collect())
    }

    pub async fn queue_len(&self) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM queue").fetch_one(&self.pool).await.map_err(pg)?;
        Ok(n as usize)
    }

    pub async fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        let rows = sqlx::query("SELECT id, priority, seq, agent, repo FROM queue ORDER BY priority DESC, seq")
            .fetch_all(&self.pool)
            .await
            .map_err(pg)?;
        rows.iter().map(queue_entry).collect()
    }

    pub async fn claim_next(&self, limits: &Limits, lease: Duration) -> Result<Option<Job>, StoreError> {
        retrying!(self.try_claim(limits, lease).await)
    }

    async fn try_claim(&self, limits: &Limits, lease: Duration) -> Result<Option<Job>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(pg)?;
        // Claims are one at a time across replicas, so the limits that span
        // them hold: each claim sees every claim before it.
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(CLAIM_LOCK).execute(&mut *tx).await.map_err(pg)?;
        let mut load = Load::default();
        for row in sqlx::query("SELECT replica, agent, repo FROM running").fetch_all(&mut *tx).await.map_err(pg)? {
            let replica: String = row.try_get(0).map_err(pg)?;
            let entry = QueueEntry {
                priority: 0,
                seq: 0,
                id: String::new(),
                agent: row.try_get(1).map_err(pg)?,
                repo: row.try_get(2).map_err(pg)?,
            };
            load.add(&entry, replica == self.replica);
        }
        if !load.has_room(limits) {
            return Ok(None);
        }
        let full_repos: Vec<&String> =
            load.per_repo.iter().filter(|(_, n)| **n >= limits.per_repo).map(|(r, _)| r).collect();
        let full_agents: Vec<&String> = limits
            .per_agent
            .iter()
            .filter(|(a, cap)| load.per_agent.get(*a).copied().unwrap_or(0) >= **cap)
            .map(|(a, _)| a)
            .collect();
        let rows = sqlx::query(
            "SELECT id, priority, seq, agent, repo FROM queue
             WHERE (repo IS NULL OR NOT repo = ANY($1)) AND NOT agent = ANY($2)
             ORDER BY priority DESC, seq LIMIT 64 FOR UPDATE SKIP LOCKED",
        )
        .bind(full_repos)
        .bind(full_agents)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg)?;
        let entries: Vec<QueueEntry> = rows.iter().map(queue_entry).collect::<Result<_, _>>()?;
        for entry in entries {
            if !load.admits(limits, &entry) {
                continue;
            }
            let job = load_jobs(&mut tx, std::slice::from_ref(&entry.id)).await?.remove(&entry.id);
            let group = match job.as_ref().and_then(|j| j.spec.concurrency.clone()) {
                Some(g) => lock_groups(&mut tx, std::slice::from_ref(&g)).await?.remove(&g),
                None => None,
            };
            match dispatch::claim(&entry, job.as_ref(), group.as_ref(), Utc::now()) {
                Claim::Run(job, plan) => {
                    self.apply(&mut tx, &plan, lease).await?;
                    tx.commit().await.map_err(pg)?;
                    return Ok(Some(*job));
                }
                Claim::Stale(plan) => self.apply(&mut tx, &plan, lease).await?,
                Claim::Wait => {}
            }
        }
        tx.commit().await.map_err(pg)?;
        Ok(None)
    }

    pub async fn take_cancels(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "DELETE FROM cancels c USING running r WHERE c.id = r.id AND r.replica = $1 RETURNING c.id, c.by_job",
        )
        .bind(&self.replica)
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        // Cancels of jobs that stopped running meanwhile are moot.
        sqlx::query("DELETE FROM cancels c WHERE NOT EXISTS (SELECT 1 FROM running r WHERE r.id = c.id)")
            .execute(&self.pool)
            .await
            .map_err(pg)?;
        rows.iter().map(|r| Ok((r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?))).collect()
    }

    pub async fn request_cancel(&self, id: &str, by: &str) -> Result<(), StoreError> {
        self.apply_alone(&vec![Write::Cancel { job: id.to_string(), by: by.to_string() }], Duration::ZERO).await
    }

    pub async fn save(&self, job: &Job) -> Result<(), StoreError> {
        retrying!(
            async {
                let mut tx = self.pool.begin().await.map_err(pg)?;
                let stored = lock_job(&mut tx, &job.id).await?;
                let plan = vec![Write::Job { job: Box::new(dispatch::merged(job, stored.as_ref())), new: false }];
                self.apply(&mut tx, &plan, Duration::ZERO).await?;
                tx.commit().await.map_err(pg)
            }
            .await
        )
    }

    /// A job's end (or its return to the queue), from the replica that
    /// holds its lease: a worker cut off long enough for another replica to
    /// take the job back must not write over what that one does.
    pub async fn finish(&self, job: &Job, publications: &[Publication]) -> Result<(), StoreError> {
        self.finish_as(job, publications, true).await
    }

    /// A finished job back in the queue (`retry`): it holds no lease.
    pub async fn requeue(&self, job: &Job) -> Result<(), StoreError> {
        self.finish_as(job, &[], false).await
    }

    async fn finish_as(&self, job: &Job, publications: &[Publication], leased: bool) -> Result<(), StoreError> {
        retrying!(
            async {
                let mut tx = self.pool.begin().await.map_err(pg)?;
                if leased {
                    let holder: Option<String> =
                        sqlx::query_scalar("SELECT replica FROM running WHERE id = $1 FOR UPDATE")
                            .bind(&job.id)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(pg)?;
                    if holder.as_deref() != Some(self.replica.as_str()) {
                        return Err(StoreError::LeaseLost(job.id.clone()));
                    }
                }
                let group = match &job.spec.concurrency {
                    Some(g) => lock_groups(&mut tx, std::slice::from_ref(g)).await?.remove(g),
                    None => None,
                };
                let stored = lock_job(&mut tx, &job.id).await?;
                let plan = dispatch::finish(job, stored.as_ref(), group.as_ref(), publications);
                self.apply(&mut tx, &plan, Duration::ZERO).await?;
                tx.commit().await.map_err(pg)
            }
            .await
        )
    }

    pub async fn record_spend(
        &self,
        spec: &crate::rules::JobSpec,
        usd: f64,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let keys: Vec<String> = admission::budget_keys(spec).into_iter().map(|b| b.key).collect();
        retrying!(
            async {
                let mut tx = self.pool.begin().await.map_err(pg)?;
                let stored = lock_throttles(&mut tx, &keys).await?;
                self.apply(&mut tx, &admission::spend(&stored, spec, usd, now), Duration::ZERO).await?;
                tx.commit().await.map_err(pg)
            }
            .await
        )
    }

    pub async fn start_publications(&self, job: &Job, publications: &[Publication]) -> Result<(), StoreError> {
        retrying!(
            async {
                let mut tx = self.pool.begin().await.map_err(pg)?;
                let stored = lock_job(&mut tx, &job.id).await?;
                let mut plan = vec![Write::Job { job: Box::new(dispatch::merged(job, stored.as_ref())), new: false }];
                plan.extend(publications.iter().map(|p| Write::Outbox(Box::new(p.clone()))));
                self.apply(&mut tx, &plan, Duration::ZERO).await?;
                tx.commit().await.map_err(pg)
            }
            .await
        )
    }

    pub async fn cancel_queued(&self, id: &str, reason: &str) -> Result<Option<Job>, StoreError> {
        retrying!(
            async {
                let mut tx = self.pool.begin().await.map_err(pg)?;
                let Some(job) = self.job(id).await? else { return Ok(None) };
                let group = match &job.spec.concurrency {
                    Some(g) => lock_groups(&mut tx, std::slice::from_ref(g)).await?.remove(g),
                    None => None,
                };
                // Still queued? (A claim may have taken it since.)
                let queued: Option<String> = sqlx::query_scalar("SELECT id FROM queue WHERE id = $1 FOR UPDATE")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(pg)?;
                let Some(job) = lock_job(&mut tx, id)
                    .await?
                    .filter(|j| queued.is_some() && j.state == crate::domain::JobState::Queued)
                else {
                    return Ok(None);
                };
                let (job, plan) = dispatch::cancel(&job, group.as_ref(), reason, Utc::now());
                self.apply(&mut tx, &plan, Duration::ZERO).await?;
                tx.commit().await.map_err(pg)?;
                Ok(Some(job))
            }
            .await
        )
    }

    pub async fn renew_lease(&self, id: &str, lease: Duration) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE running SET lease_until = now() + make_interval(secs => $1) WHERE id = $2 AND replica = $3",
        )
        .bind(lease.as_secs_f64())
        .bind(id)
        .bind(&self.replica)
        .execute(&self.pool)
        .await
        .map_err(pg)?
        .rows_affected();
        Ok(n == 1)
    }

    /// Takes every lapsed lease for this replica, so no other replica takes
    /// the same job back.
    pub async fn take_expired(&self, lease: Duration) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "UPDATE running SET replica = $1, lease_until = now() + make_interval(secs => $2)
             WHERE lease_until < now() RETURNING id",
        )
        .bind(&self.replica)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .map_err(pg)
    }

    /// This replica's running jobs (after a restart: what it left), their
    /// leases renewed in the same statement, so no other replica takes them
    /// back while this one puts them back.
    pub async fn running(&self) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<Json<Job>> = sqlx::query_scalar(
            "WITH mine AS (
                 UPDATE running SET lease_until = greatest(lease_until, now() + interval '60 seconds')
                 WHERE replica = $1 RETURNING id)
             SELECT j.record FROM mine JOIN jobs j ON j.id = mine.id WHERE j.state = 'running'",
        )
        .bind(&self.replica)
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        Ok(rows.into_iter().map(|Json(j)| j).collect())
    }

    pub async fn publication_pending(&self, job: &str, purpose: Purpose) -> Result<bool, StoreError> {
        let row: Option<i32> = sqlx::query_scalar("SELECT 1 FROM outbox WHERE job = $1 AND purpose = $2")
            .bind(job)
            .bind(purpose.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)?;
        Ok(row.is_some())
    }

    /// The publications this replica may send: free ones, lapsed ones, and
    /// its own, each leased to it.
    pub async fn outbox(&self) -> Result<Vec<Publication>, StoreError> {
        let rows: Vec<Json<Publication>> = sqlx::query_scalar(
            "UPDATE outbox SET lease_by = $1, lease_until = now() + make_interval(secs => $2)
             WHERE (job, purpose) IN (
                 SELECT job, purpose FROM outbox
                 WHERE lease_by IS NULL OR lease_by = $1 OR lease_until < now()
                 LIMIT 100 FOR UPDATE SKIP LOCKED)
             RETURNING record",
        )
        .bind(&self.replica)
        .bind(OUTBOX_LEASE.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        Ok(rows.into_iter().map(|Json(p)| p).collect())
    }

    pub async fn update_publication(&self, p: &Publication, created: bool) -> Result<(), StoreError> {
        retrying!(
            async {
                let mut tx = self.pool.begin().await.map_err(pg)?;
                let job = lock_job(&mut tx, &p.job).await?;
                let plan = dispatch::publication_update(job.as_ref(), p, created, Utc::now());
                self.apply(&mut tx, &plan, Duration::ZERO).await?;
                tx.commit().await.map_err(pg)
            }
            .await
        )
    }

    pub async fn pending_ends(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT id FROM ends").fetch_all(&self.pool).await.map_err(pg)
    }

    pub async fn end_handled(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM ends WHERE id = $1").bind(id).execute(&self.pool).await.map_err(pg)?;
        Ok(())
    }

    pub async fn set_head(&self, repo: &str, number: u64, head: &PrHead, updated_at: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO heads (subject, value, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (subject) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at
             WHERE heads.updated_at <= excluded.updated_at",
        )
        .bind(subject_key(repo, number))
        .bind(super::encode_head(head, updated_at))
        .bind(updated_at)
        .execute(&self.pool)
        .await
        .map_err(pg)?;
        Ok(())
    }

    pub async fn pr_head(&self, repo: &str, number: u64) -> Result<Option<PrHead>, StoreError> {
        let value: Option<String> = sqlx::query_scalar("SELECT value FROM heads WHERE subject = $1")
            .bind(subject_key(repo, number))
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)?;
        Ok(value.map(|v| super::decode_head(&v).0))
    }

    pub async fn note(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let value: Option<Json<serde_json::Value>> = sqlx::query_scalar("SELECT value FROM notes WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)?;
        Ok(value.map(|v| v.0))
    }

    pub async fn set_note(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO notes (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(Json(value))
        .execute(&self.pool)
        .await
        .map_err(pg)?;
        Ok(())
    }

    pub async fn count_up(&self, key: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "INSERT INTO notes (key, value) VALUES ($1, '1') ON CONFLICT (key) DO UPDATE
             SET value = to_jsonb(COALESCE((notes.value #>> '{}')::bigint, 0) + 1)
             RETURNING (value #>> '{}')::bigint",
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(pg)?;
        Ok(n.max(0) as u64)
    }

    pub async fn pending(&self, repo: &str, number: u64) -> Result<Vec<Pending>, StoreError> {
        let list: Option<Json<Vec<Pending>>> = sqlx::query_scalar("SELECT list FROM held WHERE subject = $1")
            .bind(subject_key(repo, number))
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)?;
        Ok(list.map(|Json(l)| l).unwrap_or_default())
    }

    pub async fn approve(
        &self,
        repo: &str,
        number: u64,
        approval: &Approval,
        may_approve: impl Fn(&Pending) -> bool,
    ) -> Result<Vec<String>, StoreError> {
        let subject = subject_key(repo, number);
        let head = self.pr_head(repo, number).await?.map(|h| h.sha);
        let mut tx = self.pool.begin().await.map_err(pg)?;
        let list: Option<Json<Vec<Pending>>> =
            sqlx::query_scalar("SELECT list FROM held WHERE subject = $1 FOR UPDATE")
                .bind(&subject)
                .fetch_optional(&mut *tx)
                .await
                .map_err(pg)?;
        let held = list.map(|Json(l)| l).unwrap_or_default();
        let ids: Vec<String> = held.iter().map(|p| crate::domain::job_id(&p.delivery, &p.spec.trigger)).collect();
        let exists: HashSet<String> = load_jobs(&mut tx, &ids).await?.into_keys().collect();
        let seqs: Vec<i64> = sqlx::query_scalar("SELECT nextval('job_seq') FROM generate_series(1, $1)")
            .bind(held.len() as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(pg)?;
        let mut next = seqs.into_iter();
        let (started, plan) = approval::approve(
            &subject,
            &held,
            head.as_deref(),
            approval,
            may_approve,
            |id| exists.contains(id),
            || next.next().unwrap_or(0) as u64,
            Utc::now(),
        );
        self.apply(&mut tx, &plan, Duration::ZERO).await?;
        tx.commit().await.map_err(pg)?;
        Ok(started)
    }

    pub async fn note_agent(&self, job: &str, process: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO agents (replica, job, process) VALUES ($1, $2, $3)
             ON CONFLICT (replica, job) DO UPDATE SET process = excluded.process",
        )
        .bind(&self.replica)
        .bind(job)
        .bind(Json(process))
        .execute(&self.pool)
        .await
        .map_err(pg)?;
        Ok(())
    }

    pub async fn forget_agent(&self, job: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM agents WHERE replica = $1 AND job = $2")
            .bind(&self.replica)
            .bind(job)
            .execute(&self.pool)
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub async fn agents(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let rows = sqlx::query("SELECT job, process FROM agents WHERE replica = $1")
            .bind(&self.replica)
            .fetch_all(&self.pool)
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let Json(v): Json<serde_json::Value> = r.try_get(1).map_err(pg)?;
                Ok((r.try_get(0).map_err(pg)?, v))
            })
            .collect()
    }

    pub async fn schedule_last(&self, trigger: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        sqlx::query_scalar("SELECT last_fired FROM schedules WHERE trigger = $1")
            .bind(trigger)
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)
    }

    pub async fn set_schedule_last(&self, trigger: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO schedules (trigger, last_fired) VALUES ($1, $2)
             ON CONFLICT (trigger) DO UPDATE SET last_fired = greatest(schedules.last_fired, excluded.last_fired)",
        )
        .bind(trigger)
        .bind(at)
        .execute(&self.pool)
        .await
        .map_err(pg)?;
        Ok(())
    }

    pub async fn append_log(&self, job: &str, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO job_logs (job, start_at, chunk) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(job)
            .bind(offset as i64)
            .bind(bytes)
            .execute(&self.pool)
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub async fn read_log(&self, job: &str, offset: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = sqlx::query(
            "SELECT start_at, chunk FROM job_logs WHERE job = $1 AND start_at + length(chunk) > $2 ORDER BY start_at",
        )
        .bind(job)
        .bind(offset as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        if rows.is_empty() {
            let any: Option<i32> = sqlx::query_scalar("SELECT 1 FROM job_logs WHERE job = $1 LIMIT 1")
                .bind(job)
                .fetch_optional(&self.pool)
                .await
                .map_err(pg)?;
            return Ok(any.map(|_| Vec::new()));
        }
        let mut out = Vec::new();
        let mut at = offset;
        for row in rows {
            let start: i64 = row.try_get(0).map_err(pg)?;
            let chunk: Vec<u8> = row.try_get(1).map_err(pg)?;
            let start = start as u64;
            if start > at {
                break; // a gap: the rest is not shipped yet
            }
            let skip = (at - start) as usize;
            if let Some(rest) = chunk.get(skip..) {
                out.extend_from_slice(rest);
                at += rest.len() as u64;
            }
        }
        Ok(Some(out))
    }

    pub async fn job_count(&self) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&self.pool).await.map_err(pg)?;
        Ok(n as usize)
    }
}

/// One statement made of data-modifying CTEs and a final `SELECT`, its `?`
/// placeholders numbered in order (no part has a `?` of its own).
#[derive(Default)]
struct Sql {
    ctes: Vec<&'static str>,
}

impl Sql {
    fn cte(&mut self, part: &'static str) {
        self.ctes.push(part);
    }

    fn is_empty(&self) -> bool {
        self.ctes.is_empty()
    }

    fn finish(&self, last: &str) -> String {
        let mut text = String::new();
        for (i, part) in self.ctes.iter().enumerate() {
            text.push_str(if i == 0 { "WITH " } else { ", " });
            text.push_str(&format!("w{i} AS ({part})"));
        }
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(last);
        let mut out = String::with_capacity(text.len() + 32);
        let mut n = 0;
        for c in text.chars() {
            if c == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(c);
            }
        }
        out
    }
}

/// Brings the schema up to date, one replica at a time.
async fn migrate(pool: &PgPool, schema: Option<&str>) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await.map_err(pg)?;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATE_LOCK).execute(&mut *conn).await.map_err(pg)?;
    let result = async {
        if let Some(schema) = schema {
            let quoted = format!("\"{}\"", schema.replace('"', "\"\""));
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {quoted}")).execute(&mut *conn).await.map_err(pg)?;
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS baton_migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
            .execute(&mut *conn)
            .await
            .map_err(pg)?;
        let done: Vec<i32> =
            sqlx::query_scalar("SELECT version FROM baton_migrations").fetch_all(&mut *conn).await.map_err(pg)?;
        for (version, sql) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(pg)?;
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(pg)?;
            sqlx::query("INSERT INTO baton_migrations (version) VALUES ($1)").bind(version).execute(&mut *tx).await.map_err(pg)?;
            tx.commit().await.map_err(pg)?;
            tracing::info!(version, "Applied a database migration.");
        }
        Ok(())
    }
    .await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATE_LOCK).execute(&mut *conn).await;
    result
}

/// The throttle records named (runs, cooldowns, spending), created if
/// missing and locked (in key order).
async fn lock_throttles(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[String],
) -> Result<HashMap<String, Vec<i64>>, StoreError> {
    lock_rows(tx, "throttles", "key", "runs", "[]", keys).await
}

/// The groups named, created if missing and locked (in name order).
async fn lock_groups(
    tx: &mut Transaction<'_, Postgres>,
    names: &[String],
) -> Result<HashMap<String, GroupState>, StoreError> {
    lock_rows(tx, "groups", "name", "state", "{}", names).await
}

/// Rows of `table` by `key` (its JSON column `value`), each created as
/// `empty` if missing, locked in key order so two transactions never wait
/// on each other in a circle. Names are baton's own constants, never input.
async fn lock_rows<T: serde::de::DeserializeOwned>(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    key: &str,
    value: &str,
    empty: &str,
    keys: &[String],
) -> Result<HashMap<String, T>, StoreError> {
    let mut out = HashMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let insert =
        format!("INSERT INTO {table} ({key}, {value}) SELECT unnest($1::text[]), '{empty}' ON CONFLICT DO NOTHING");
    sqlx::query(&insert).bind(keys).execute(&mut **tx).await.map_err(pg)?;
    let select = format!("SELECT {key}, {value} FROM {table} WHERE {key} = ANY($1) ORDER BY {key} FOR UPDATE");
    let rows = sqlx::query(&select).bind(keys).fetch_all(&mut **tx).await.map_err(pg)?;
    for row in rows {
        let Json(v): Json<T> = row.try_get(1).map_err(pg)?;
        out.insert(row.try_get(0).map_err(pg)?, v);
    }
    Ok(out)
}

async fn load_jobs(tx: &mut Transaction<'_, Postgres>, ids: &[String]) -> Result<HashMap<String, Job>, StoreError> {
    let rows: Vec<Json<Job>> = sqlx::query_scalar("SELECT record FROM jobs WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(&mut **tx)
        .await
        .map_err(pg)?;
    Ok(rows.into_iter().map(|Json(j)| (j.id.clone(), j)).collect())
}

async fn load_jobs_from(pool: &PgPool, ids: &[String]) -> Result<HashMap<String, Job>, StoreError> {
    let rows: Vec<Json<Job>> =
        sqlx::query_scalar("SELECT record FROM jobs WHERE id = ANY($1)").bind(ids).fetch_all(pool).await.map_err(pg)?;
    Ok(rows.into_iter().map(|Json(j)| (j.id.clone(), j)).collect())
}

async fn lock_job(tx: &mut Transaction<'_, Postgres>, id: &str) -> Result<Option<Job>, StoreError> {
    let row: Option<Json<Job>> = sqlx::query_scalar("SELECT record FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(pg)?;
    Ok(row.map(|Json(j)| j))
}

fn queue_entry(row: &sqlx::postgres::PgRow) -> Result<QueueEntry, StoreError> {
    let priority: i16 = row.try_get(1).map_err(pg)?;
    let seq: i64 = row.try_get(2).map_err(pg)?;
    Ok(QueueEntry {
        id: row.try_get(0).map_err(pg)?,
        priority: priority.clamp(-100, 100) as i8,
        seq: seq as u64,
        agent: row.try_get(3).map_err(pg)?,
        repo: row.try_get(4).map_err(pg)?,
    })
}

fn json<T: serde::Serialize>(v: &T) -> String {
    // Records are plain data structs; serializing them cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_statement_numbers_its_placeholders_in_order() {
        let mut sql = Sql::default();
        assert_eq!(sql.finish("SELECT pg_notify(?, '')"), "SELECT pg_notify($1, '')");
        sql.cte("INSERT INTO a SELECT * FROM unnest(?::text[], ?::text[])");
        sql.cte("DELETE FROM b WHERE id = ANY(?)");
        assert_eq!(
            sql.finish("SELECT 1"),
            "WITH w0 AS (INSERT INTO a SELECT * FROM unnest($1::text[], $2::text[])), w1 AS (DELETE FROM b WHERE id = ANY($3)) SELECT 1"
        );
    }

    #[test]
    fn only_conflicts_between_transactions_are_retried() {
        let check = |m: &str, expect: bool| assert_eq!(conflict(&StoreError::Postgres(m.into())), expect, "{m}");
        check("deadlock detected (SQLSTATE 40P01)", true);
        check("could not serialize access (SQLSTATE 40001)", true);
        check("duplicate key value violates unique constraint \"jobs_pkey\" (SQLSTATE 23505)", true);
        check("relation \"jobs\" does not exist (SQLSTATE 42P01)", false);
        check("pool timed out while waiting for an open connection", false);
    }

    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(display_url("postgres://baton:s3cret@db:5432/baton"), "postgres://baton@db:5432/baton");
        assert_eq!(display_url("postgres://db/baton"), "postgres://db/baton");
    }
}
