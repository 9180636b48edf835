//! The queue on PostgreSQL outside the store's sequences (`tx.rs` serves
//! those): cancels asked and taken, and leases renewed and taken back.

use super::*;

impl PgStore {
    pub(crate) async fn take_cancels(&self) -> Result<Vec<(String, String)>, StoreError> {
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

    pub(crate) async fn request_cancel(&self, id: &str, by: &str) -> Result<(), StoreError> {
        self.apply_alone(&vec![Write::Cancel { job: id.to_string(), by: by.to_string() }], Duration::ZERO).await
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
    pub(crate) async fn take_expired(&self, lease: Duration) -> Result<Vec<String>, StoreError> {
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
}
