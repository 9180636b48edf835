//! The PostgreSQL backend, for several replicas on one database.
//!
//! The tables are in `migrations/`, applied at start under an advisory lock.
//! Each change is a domain plan applied all or nothing, like the embedded
//! store's; what is new is that other replicas write too:
//! - a delivery id and a body fingerprint are unique keys, so two writers or
//!   replicas given the same delivery store it once (the loser's batch runs
//!   again and finds it stored);
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
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::{mpsc, oneshot, Notify};

use super::writer::{Reply, MAX_BATCH};
use super::{JobQuery, PrHead, StoreError};
use crate::domain::admission::{Admission, AdmitView};
use crate::domain::approval::Held;
use crate::domain::dispatch::{Limits, Load, QueueEntry};
use crate::domain::{subject_key, Accepted, Delivery, GroupState, Job, Plan, Publication, Purpose, Write};

/// The migrations, in order; each runs once, in its own transaction.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_tables.sql")),
    (2, include_str!("migrations/0002_notes.sql")),
    (3, include_str!("migrations/0003_children.sql")),
    (4, include_str!("migrations/0004_used.sql")),
];

/// The whole schema, as `baton migrate --print` shows it.
pub fn schema() -> String {
    MIGRATIONS.iter().map(|(_, sql)| *sql).collect::<Vec<_>>().join("\n")
}

/// Advisory lock keys (arbitrary, fixed): migrations, and claims.
const MIGRATE_LOCK: i64 = 0x6261_746f_6e00_0001;
const CLAIM_LOCK: i64 = 0x6261_746f_6e00_0002;

/// Admission batches in flight at once: a batch is two round trips and a
/// wait on the WAL's flush, and PostgreSQL flushes for several commits at
/// once, so more in flight is more stored per flush (bench: 2 → 4 writers,
/// 2.7-3.8k → 3.6-4.7k deliveries/s on two cores).
const WRITERS: usize = 4;

/// How long a replica holds a publication it is sending.
const OUTBOX_LEASE: Duration = Duration::from_secs(60);

/// A pool of connections to one database (and schema), as one replica.
#[derive(Clone)]
pub(crate) struct PgStore {
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
        // The code tells a conflict to retry from a real failure:
        // serialization, deadlock, a unique key taken meanwhile.
        sqlx::Error::Database(db) => match db.code() {
            Some(code) if ["40001", "40P01", "23505"].contains(&code.as_ref()) => {
                StoreError::Conflict(format!("{} (SQLSTATE {code})", db.message()))
            }
            Some(code) => StoreError::Unavailable(format!("{} (SQLSTATE {code})", db.message())),
            None => StoreError::Unavailable(db.message().to_string()),
        },
        _ => StoreError::Unavailable(e.to_string()),
    }
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
            // The admission writers', and as many again for claims, leases,
            // the outbox and the API.
            .max_connections(2 * WRITERS as u32)
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        migrate(&pool, schema).await?;
        // baton deletes what its retention prunes; only vacuuming lets the
        // space be used again.
        let autovacuum: Option<String> =
            sqlx::query_scalar("SHOW autovacuum").fetch_optional(&pool).await.ok().flatten();
        if autovacuum.as_deref() == Some("off") {
            tracing::warn!(
                "The database has autovacuum off: the tables baton prunes will keep growing on disk. \
                 Turn it on, or run VACUUM on baton's tables regularly."
            );
        }
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
                break;
            }
        }
        // What baton asked GitHub to redeliver is worth remembering only as
        // long as the deliveries themselves.
        sqlx::query("DELETE FROM redeliveries WHERE asked_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .map_err(pg)?;
        Ok(total)
    }

    pub(crate) async fn prune_jobs(&self, cutoff: DateTime<Utc>, max: usize) -> Result<Vec<String>, StoreError> {
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

    pub(crate) async fn note_redelivery(&self, guid: &str) -> Result<bool, StoreError> {
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

    /// Counted exactly while the queue is short; a long one (a backlog of
    /// more than 10,000) is what the statistics say it holds, so `/metrics`
    /// costs the same however deep the backlog grows.
    pub(crate) async fn queue_len(&self) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT CASE WHEN s.n_live_tup > 10000 THEN s.n_live_tup ELSE (SELECT count(*) FROM queue) END
             FROM pg_stat_user_tables s WHERE s.relid = 'queue'::regclass",
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(pg)?
        .unwrap_or_default();
        Ok(n.max(0) as usize)
    }

    pub async fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        let rows = sqlx::query("SELECT id, priority, seq, agent, repo FROM queue ORDER BY priority DESC, seq")
            .fetch_all(&self.pool)
            .await
            .map_err(pg)?;
        rows.iter().map(queue_entry).collect()
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
async fn lock_throttles(tx: &mut PgConnection, keys: &[String]) -> Result<HashMap<String, Vec<i64>>, StoreError> {
    lock_rows(tx, "throttles", "key", "runs", "[]", keys).await
}

/// The jobs held on the subjects named, an empty list created for each
/// missing one and locked (in subject order): two batches holding jobs on
/// one new subject wait for each other instead of each writing its own
/// list over the other's.
async fn lock_held(tx: &mut PgConnection, subjects: &[String]) -> Result<HashMap<String, Vec<Held>>, StoreError> {
    lock_rows(tx, "held", "subject", "list", "[]", subjects).await
}

/// The groups named, created if missing and locked (in name order).
async fn lock_groups(tx: &mut PgConnection, names: &[String]) -> Result<HashMap<String, GroupState>, StoreError> {
    lock_rows(tx, "groups", "name", "state", "{}", names).await
}

/// Rows of `table` by `key` (its JSON column `value`), each created as
/// `empty` if missing, locked in key order so two transactions never wait
/// on each other in a circle. Names are baton's own constants, never input.
async fn lock_rows<T: serde::de::DeserializeOwned>(
    tx: &mut PgConnection,
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
    sqlx::query(&insert).bind(keys).execute(&mut *tx).await.map_err(pg)?;
    let select = format!("SELECT {key}, {value} FROM {table} WHERE {key} = ANY($1) ORDER BY {key} FOR UPDATE");
    let rows = sqlx::query(&select).bind(keys).fetch_all(&mut *tx).await.map_err(pg)?;
    for row in rows {
        let Json(v): Json<T> = row.try_get(1).map_err(pg)?;
        out.insert(row.try_get(0).map_err(pg)?, v);
    }
    Ok(out)
}

async fn load_jobs(tx: &mut PgConnection, ids: &[String]) -> Result<HashMap<String, Job>, StoreError> {
    let rows: Vec<Json<Job>> = sqlx::query_scalar("SELECT record FROM jobs WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg)?;
    Ok(rows.into_iter().map(|Json(j)| (j.id.clone(), j)).collect())
}

async fn load_jobs_from(pool: &PgPool, ids: &[String]) -> Result<HashMap<String, Job>, StoreError> {
    let rows: Vec<Json<Job>> =
        sqlx::query_scalar("SELECT record FROM jobs WHERE id = ANY($1)").bind(ids).fetch_all(pool).await.map_err(pg)?;
    Ok(rows.into_iter().map(|Json(j)| (j.id.clone(), j)).collect())
}

async fn lock_job(tx: &mut PgConnection, id: &str) -> Result<Option<Job>, StoreError> {
    let row: Option<Json<Job>> = sqlx::query_scalar("SELECT record FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
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

mod admit;
mod claims;
mod records;
mod tx;

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
    fn urls_lose_their_password_in_messages() {
        assert_eq!(display_url("postgres://baton:s3cret@db:5432/baton"), "postgres://baton@db:5432/baton");
        assert_eq!(display_url("postgres://db/baton"), "postgres://db/baton");
    }
}
