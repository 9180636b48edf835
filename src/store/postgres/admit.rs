//! Admission on PostgreSQL: the batch writer (every waiting delivery in one
//! transaction, under advisory locks per delivery id and body fingerprint),
//! and how a domain `Plan` is applied inside a transaction.

use super::*;

impl PgStore {
    /// The batch writer: every delivery waiting (up to `MAX_BATCH`) goes
    /// into one transaction, committed before any of them is answered.
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
            let (admissions, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            crate::store::writer::answer_all(replies, retrying!(self.admit_batch(&admissions).await));
        }
    }

    pub async fn admit(&self, admission: Admission) -> Result<Accepted, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.admissions.send((admission, tx)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(super) async fn admit_batch(&self, batch: &[Admission]) -> Result<Vec<Accepted>, StoreError> {
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
    pub(super) async fn apply(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        plan: &Plan,
        lease: Duration,
    ) -> Result<(), StoreError> {
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
    pub(super) async fn apply_alone(&self, plan: &Plan, lease: Duration) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(pg)?;
        self.apply(&mut tx, plan, lease).await?;
        tx.commit().await.map_err(pg)
    }
}
