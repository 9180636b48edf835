//! What else PostgreSQL keeps: the outbox and its leases, pending ends, PR
//! heads and notes, held jobs and approvals, agents' processes, schedules,
//! and job logs shipped from their replica.

use super::*;

impl PgStore {
    pub(crate) async fn publication_pending(&self, job: &str, purpose: Purpose) -> Result<bool, StoreError> {
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

    pub async fn pending_ends(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT id FROM ends").fetch_all(&self.pool).await.map_err(pg)
    }

    pub async fn end_handled(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM ends WHERE id = $1").bind(id).execute(&self.pool).await.map_err(pg)?;
        Ok(())
    }

    pub(crate) async fn set_head(
        &self,
        repo: &str,
        number: u64,
        head: &PrHead,
        updated_at: &str,
    ) -> Result<Option<String>, StoreError> {
        // `old` is the row as the statement found it; the update happened
        // when `moved` returned it.
        let (old, moved): (Option<String>, bool) = sqlx::query_as(
            "WITH old AS (SELECT value FROM heads WHERE subject = $1),
             moved AS (
                INSERT INTO heads (subject, value, updated_at, used_at) VALUES ($1, $2, $3, now())
                ON CONFLICT (subject) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at,
                    used_at = now()
                WHERE heads.updated_at <= excluded.updated_at
                RETURNING 1)
             SELECT (SELECT value FROM old), EXISTS (SELECT 1 FROM moved)",
        )
        .bind(subject_key(repo, number))
        .bind(crate::store::encode_head(head, updated_at))
        .bind(updated_at)
        .fetch_one(&self.pool)
        .await
        .map_err(pg)?;
        let from = old.filter(|_| moved).map(|o| crate::store::decode_head(&o).0.sha);
        Ok(from.filter(|sha| *sha != head.sha))
    }

    pub(crate) async fn pr_head(&self, repo: &str, number: u64) -> Result<Option<PrHead>, StoreError> {
        let value: Option<String> =
            sqlx::query_scalar("UPDATE heads SET used_at = now() WHERE subject = $1 RETURNING value")
                .bind(subject_key(repo, number))
                .fetch_optional(&self.pool)
                .await
                .map_err(pg)?;
        Ok(value.map(|v| crate::store::decode_head(&v).0))
    }

    pub(crate) async fn note(&self, key: &str) -> Result<Option<serde_json::Value>, StoreError> {
        let value: Option<Json<serde_json::Value>> =
            sqlx::query_scalar("UPDATE notes SET used_at = now() WHERE key = $1 RETURNING value")
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(pg)?;
        Ok(value.map(|v| v.0))
    }

    pub(crate) async fn forget_notes(&self, keys: &[String]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM notes WHERE key = ANY($1)").bind(keys).execute(&self.pool).await.map_err(pg)?;
        Ok(())
    }

    /// Forgets the notes and heads nobody wrote or read since `cutoff`.
    pub(crate) async fn prune_notes(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<usize, StoreError> {
        let mut gone = 0;
        for table in ["notes", "heads"] {
            let key = if table == "notes" { "key" } else { "subject" };
            loop {
                let sql = format!(
                    "DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE used_at < $1 LIMIT 500)"
                );
                let n = sqlx::query(&sql).bind(cutoff).execute(&self.pool).await.map_err(pg)?.rows_affected();
                gone += n as usize;
                if n < 500 {
                    break;
                }
            }
        }
        Ok(gone)
    }

    pub(crate) async fn set_note(&self, key: &str, value: &serde_json::Value) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO notes (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, used_at = now()",
        )
        .bind(key)
        .bind(Json(value))
        .execute(&self.pool)
        .await
        .map_err(pg)?;
        Ok(())
    }

    pub(crate) async fn count_up(&self, key: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "INSERT INTO notes (key, value) VALUES ($1, '1') ON CONFLICT (key) DO UPDATE
             SET value = to_jsonb(COALESCE((notes.value #>> '{}')::bigint, 0) + 1), used_at = now()
             RETURNING (value #>> '{}')::bigint",
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(pg)?;
        Ok(n.max(0) as u64)
    }

    pub async fn pending(&self, repo: &str, number: u64) -> Result<Vec<Held>, StoreError> {
        let list: Option<Json<Vec<Held>>> = sqlx::query_scalar("SELECT list FROM held WHERE subject = $1")
            .bind(subject_key(repo, number))
            .fetch_optional(&self.pool)
            .await
            .map_err(pg)?;
        Ok(list.map(|Json(l)| l).unwrap_or_default())
    }

    pub async fn held_all(&self) -> Result<Vec<(String, Vec<Held>)>, StoreError> {
        let rows: Vec<(String, Json<Vec<Held>>)> =
            sqlx::query_as("SELECT subject, list FROM held WHERE jsonb_array_length(list) > 0 ORDER BY subject")
                .fetch_all(&self.pool)
                .await
                .map_err(pg)?;
        Ok(rows.into_iter().map(|(s, Json(l))| (s, l)).collect())
    }

    pub(crate) async fn note_agent(&self, job: &str, process: &serde_json::Value) -> Result<(), StoreError> {
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

    pub(crate) async fn forget_agent(&self, job: &str) -> Result<(), StoreError> {
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

    pub(crate) async fn schedule_last(&self, trigger: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
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

    pub(crate) async fn append_log(&self, job: &str, offset: u64, bytes: &[u8]) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO job_logs (job, start_at, chunk) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(job)
            .bind(offset as i64)
            .bind(bytes)
            .execute(&self.pool)
            .await
            .map_err(pg)?;
        Ok(())
    }

    pub(crate) async fn read_log(&self, job: &str, offset: u64) -> Result<Option<Vec<u8>>, StoreError> {
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

    pub async fn census(&self) -> Result<Vec<crate::store::TableSize>, StoreError> {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_class c WHERE c.relkind = 'r' AND c.relnamespace = current_schema()::regnamespace
             ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(pg)?;
        let mut out = Vec::new();
        for name in tables {
            let sql = format!(
                "SELECT count(*), pg_total_relation_size(to_regclass(quote_ident($1))) FROM \"{}\"",
                name.replace('"', "\"\"")
            );
            let (records, bytes): (i64, i64) =
                sqlx::query_as(&sql).bind(&name).fetch_one(&self.pool).await.map_err(pg)?;
            out.push(crate::store::TableSize { name, records: records.max(0) as u64, bytes: bytes.max(0) as u64 });
        }
        Ok(out)
    }

    pub async fn job_count(&self) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&self.pool).await.map_err(pg)?;
        Ok(n as usize)
    }
}
