//! The queue on PostgreSQL: claims under one advisory lock with `FOR UPDATE
//! SKIP LOCKED`, a job's saves, ends and requeues, cancels, spend, and
//! leases renewed and taken back.

use super::*;

impl PgStore {
    pub async fn claim_next(&self, limits: &Limits, lease: Duration) -> Result<Option<Job>, StoreError> {
        retrying!(self.try_claim(limits, lease).await)
    }

    pub(super) async fn try_claim(&self, limits: &Limits, lease: Duration) -> Result<Option<Job>, StoreError> {
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

    pub(super) async fn finish_as(
        &self,
        job: &Job,
        publications: &[Publication],
        leased: bool,
    ) -> Result<(), StoreError> {
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
}
