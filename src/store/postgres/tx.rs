//! The store's transaction on PostgreSQL (see `store::ops`): rows a
//! decision depends on are read `FOR UPDATE`, groups before jobs, several
//! rows of one table in key order, so two transactions never wait on each
//! other in a circle; claims run under one advisory lock across replicas.
//!
//! The transaction begins only when something needs one: a read that locks
//! rows, or a write of more than one statement. A batch of plain deliveries
//! (no concurrency group, throttle or held job) locks nothing — a delivery
//! id or body stored meanwhile by another writer or replica fails the write
//! on its unique key, and the batch runs again — and is written as one
//! statement: two round trips, no `BEGIN` or `COMMIT`. A plan written alone
//! ends its sequence (`Conn::Written`).

use sqlx::pool::PoolConnection;

use super::admit::in_one_statement;
use super::*;
use crate::store::ops;

/// One transaction of `store`.
pub(in crate::store) struct PgTx<'a> {
    store: &'a PgStore,
    conn: Conn,
}

enum Conn {
    /// No transaction yet: each statement commits on its own.
    Alone(PoolConnection<Postgres>),
    Begun(Transaction<'static, Postgres>),
    /// A plan was written alone, and committed itself: the sequence is over,
    /// and nothing may follow that a failure would leave half done.
    Written,
    /// Only while a transaction begins, or after it failed to.
    Lost,
}

impl PgTx<'_> {
    /// The connection, for a read that locks nothing or a write that is
    /// one statement.
    fn conn(&mut self) -> Result<&mut PgConnection, StoreError> {
        match &mut self.conn {
            Conn::Alone(c) => Ok(&mut **c),
            Conn::Begun(tx) => Ok(&mut **tx),
            Conn::Written => Err(StoreError::Database("nothing may follow a plan written alone".into())),
            Conn::Lost => Err(StoreError::Unavailable("the connection was lost beginning a transaction".into())),
        }
    }

    /// The transaction, begun now if it was not yet.
    async fn tx(&mut self) -> Result<&mut PgConnection, StoreError> {
        if matches!(self.conn, Conn::Alone(_)) {
            if let Conn::Alone(c) = std::mem::replace(&mut self.conn, Conn::Lost) {
                self.conn = Conn::Begun(Transaction::begin(c, None).await.map_err(pg)?);
            }
        }
        self.conn()
    }
}

impl ops::Backend for PgStore {
    type Tx<'a> = PgTx<'a>;

    async fn begin(&self, claim: bool) -> Result<PgTx<'_>, StoreError> {
        let mut tx = PgTx { store: self, conn: Conn::Alone(self.pool.acquire().await.map_err(pg)?) };
        if claim {
            // Claims are one at a time across replicas, so the limits that
            // span them hold: each claim sees every claim before it.
            let conn = tx.tx().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(CLAIM_LOCK).execute(conn).await.map_err(pg)?;
        }
        Ok(tx)
    }

    async fn durable(&self) -> Result<(), StoreError> {
        // A commit has waited on the WAL's flush.
        Ok(())
    }
}

impl ops::Tx for PgTx<'_> {
    async fn job(&mut self, id: &str) -> Result<Option<Job>, StoreError> {
        lock_job(self.tx().await?, id).await
    }

    async fn existing(&mut self, ids: &[String]) -> Result<HashSet<String>, StoreError> {
        Ok(load_jobs(self.conn()?, ids).await?.into_keys().collect())
    }

    async fn group(&mut self, name: &str) -> Result<Option<GroupState>, StoreError> {
        Ok(lock_groups(self.tx().await?, &[name.to_string()]).await?.remove(name))
    }

    async fn throttles(&mut self, keys: &[String]) -> Result<HashMap<String, Vec<i64>>, StoreError> {
        lock_throttles(self.tx().await?, keys).await
    }

    async fn held(&mut self, subject: &str) -> Result<Vec<Held>, StoreError> {
        Ok(lock_held(self.tx().await?, &[subject.to_string()]).await?.remove(subject).unwrap_or_default())
    }

    async fn queued(&mut self, id: &str) -> Result<bool, StoreError> {
        let row: Option<String> = sqlx::query_scalar("SELECT id FROM queue WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(self.tx().await?)
            .await
            .map_err(pg)?;
        Ok(row.is_some())
    }

    async fn holds_lease(&mut self, id: &str) -> Result<bool, StoreError> {
        let holder: Option<String> = sqlx::query_scalar("SELECT replica FROM running WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(self.tx().await?)
            .await
            .map_err(pg)?;
        Ok(holder.as_deref() == Some(self.store.replica.as_str()))
    }

    async fn numbers(&mut self, n: usize) -> Result<Vec<u64>, StoreError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut seqs: Vec<i64> = sqlx::query_scalar("SELECT nextval('job_seq') FROM generate_series(1, $1)")
            .bind(n as i64)
            .fetch_all(self.conn()?)
            .await
            .map_err(pg)?;
        seqs.sort_unstable();
        Ok(seqs.into_iter().map(|s| s as u64).collect())
    }

    async fn admit_view(&mut self, batch: &[Admission]) -> Result<(AdmitView, Vec<u64>), StoreError> {
        let wanted = AdmitView::wanted(batch);
        let count = crate::domain::admission::jobs_in(batch);
        let mut view = AdmitView::default();
        // Rows a decision depends on are locked first, in key order: a
        // group's line, a trigger's runs, a subject's held jobs. (Two
        // replicas storing one delivery id or body at once is settled by
        // the primary key and the unique fingerprint: the loser's batch
        // runs again and finds it stored.)
        let groups: Vec<String> = wanted.groups.iter().cloned().collect();
        if !groups.is_empty() {
            view.groups = lock_groups(self.tx().await?, &groups).await?;
        }
        let keys: Vec<String> = wanted.throttles.iter().cloned().collect();
        if !keys.is_empty() {
            view.throttles = lock_throttles(self.tx().await?, &keys).await?;
        }
        let subjects: Vec<String> = wanted.subjects.iter().cloned().collect();
        if !subjects.is_empty() {
            view.held = lock_held(self.tx().await?, &subjects).await?;
        }
        // Everything else in one trip: stored ids, bodies, the jobs (the
        // batch's and those waiting in its groups), and the new jobs' numbers.
        let ids: Vec<String> = wanted.deliveries.iter().cloned().collect();
        let bodies: Vec<String> = wanted.bodies.iter().cloned().collect();
        let mut job_ids: Vec<String> = wanted.jobs.iter().cloned().collect();
        job_ids.extend(view.waiting());
        let rows = sqlx::query(
            "SELECT 0, id, NULL::text FROM deliveries WHERE id = ANY($1)
             UNION ALL SELECT 1, fingerprint, id FROM deliveries WHERE fingerprint = ANY($2)
             UNION ALL SELECT 2, id, record::text FROM jobs WHERE id = ANY($3)
             UNION ALL SELECT 3, nextval('job_seq')::text, NULL FROM generate_series(1, $4)",
        )
        .bind(&ids)
        .bind(&bodies)
        .bind(&job_ids)
        .bind(count as i64)
        .fetch_all(self.conn()?)
        .await
        .map_err(pg)?;
        let mut numbers = Vec::with_capacity(count);
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
                (3, Some(n), _) => numbers.push(n.parse::<u64>().map_err(|e| StoreError::Unavailable(e.to_string()))?),
                _ => {}
            }
        }
        numbers.sort_unstable();
        Ok((view, numbers))
    }

    async fn load(&mut self) -> Result<Load, StoreError> {
        let mut load = Load::default();
        for row in sqlx::query("SELECT replica, agent, repo FROM running").fetch_all(self.conn()?).await.map_err(pg)? {
            let replica: String = row.try_get(0).map_err(pg)?;
            let entry = QueueEntry {
                priority: 0,
                seq: 0,
                id: String::new(),
                agent: row.try_get(1).map_err(pg)?,
                repo: row.try_get(2).map_err(pg)?,
            };
            load.add(&entry, replica == self.store.replica);
        }
        Ok(load)
    }

    /// The first entry in queue order outside the repositories and agents
    /// at their limit; rows another transaction holds are skipped.
    async fn next_queued(
        &mut self,
        limits: &Limits,
        load: &Load,
        passed: &HashSet<String>,
    ) -> Result<Option<QueueEntry>, StoreError> {
        let full_repos: Vec<&String> =
            load.per_repo.iter().filter(|(_, n)| **n >= limits.per_repo).map(|(r, _)| r).collect();
        let full_agents: Vec<&String> = limits
            .per_agent
            .iter()
            .filter(|(a, cap)| load.per_agent.get(*a).copied().unwrap_or(0) >= **cap)
            .map(|(a, _)| a)
            .collect();
        let passed: Vec<&String> = passed.iter().collect();
        let row = sqlx::query(
            "SELECT id, priority, seq, agent, repo FROM queue
             WHERE (repo IS NULL OR NOT repo = ANY($1)) AND NOT agent = ANY($2) AND NOT id = ANY($3)
             ORDER BY priority DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .bind(full_repos)
        .bind(full_agents)
        .bind(passed)
        .fetch_optional(self.tx().await?)
        .await
        .map_err(pg)?;
        let entry = row.as_ref().map(queue_entry).transpose()?;
        // The query's filter is the limits' own rule; this keeps the two
        // from ever drifting apart.
        Ok(entry.filter(|e| load.admits(limits, e)))
    }

    async fn apply(&mut self, plan: Plan, lease: Duration) -> Result<(), StoreError> {
        let store = self.store;
        if let (true, Conn::Alone(conn)) = (in_one_statement(&plan), &mut self.conn) {
            // One statement commits itself; the sequence ends here.
            store.apply(conn, &plan, lease).await?;
            self.conn = Conn::Written;
            return Ok(());
        }
        store.apply(self.tx().await?, &plan, lease).await
    }

    async fn commit(self) -> Result<(), StoreError> {
        match self.conn {
            Conn::Begun(tx) => tx.commit().await.map_err(pg),
            Conn::Alone(_) | Conn::Written => Ok(()),
            Conn::Lost => Err(StoreError::Unavailable("the connection was lost beginning a transaction".into())),
        }
    }
}
