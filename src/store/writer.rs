//! Batched admission: one writer thread stores deliveries for everyone.
//!
//! A delivery and its jobs are one transaction and, before the sender hears
//! 2xx, durable. Done per delivery from many tasks, both dominate ingest:
//! concurrent transactions over the same tables contend, and each carries a
//! fixed cost. Here every delivery waiting when the writer comes round goes
//! into one transaction, durable when it returns (one commit on redb, a
//! commit and a flush on sled); while it is on disk the next batch gathers,
//! so a burst costs a few transactions rather than one per request.
//! Deliveries are processed in arrival order inside the transaction, so a
//! duplicate within one batch is still seen as one.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::{Accepted, StoreError};

/// Deliveries taken into one transaction, at most: bounds how long the
/// first of them waits on the others.
pub(super) const MAX_BATCH: usize = 256;

pub(super) type Reply = oneshot::Sender<Result<Accepted, StoreError>>;

/// Answers every delivery of a batch: each its own outcome, or all the
/// batch's failure.
pub(super) fn answer_all(replies: Vec<Reply>, outcome: Result<Vec<Accepted>, StoreError>) {
    match outcome {
        Ok(accepted) => {
            for (reply, a) in replies.into_iter().zip(accepted) {
                let _ = reply.send(Ok(a));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, deliveries = replies.len(), "Storing deliveries failed.");
            for reply in replies {
                let _ = reply.send(Err(e.again()));
            }
        }
    }
}

/// The writer thread and the way to it. Dropped with the last `Store`
/// clone: closing the channel ends the thread, and the drop waits for it so
/// the database is released when the store is gone.
pub(super) struct Writer<A: Send + 'static> {
    tx: Option<mpsc::Sender<(A, Reply)>>,
    thread: Option<JoinHandle<()>>,
}

impl<A: Send + 'static> Writer<A> {
    /// Starts the thread. `apply` writes a batch in one transaction, durable
    /// when it returns, and answers each admission in order.
    pub fn start<F>(apply: F) -> Result<Writer<A>, std::io::Error>
    where
        F: Fn(&mut [A]) -> Result<Vec<Accepted>, StoreError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<(A, Reply)>();
        let thread = std::thread::Builder::new().name("baton-store".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let (mut admissions, replies): (Vec<A>, Vec<Reply>) = batch.into_iter().unzip();
                // A bug in one batch fails that batch, not every delivery after it.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(&mut admissions)))
                    .unwrap_or_else(|_| Err(StoreError::Batch("storing the batch panicked".into())));
                answer_all(replies, outcome);
            }
        })?;
        Ok(Writer { tx: Some(tx), thread: Some(thread) })
    }

    /// Stores `admission` with whatever else is waiting; returns once it is
    /// durable (or known to have failed).
    pub(crate) async fn submit(&self, admission: A) -> Result<Accepted, StoreError> {
        let (reply, answer) = oneshot::channel();
        if self.tx.as_ref().is_none_or(|tx| tx.send((admission, reply)).is_err()) {
            return Err(StoreError::Closed);
        }
        answer.await.unwrap_or(Err(StoreError::Closed))
    }
}

impl<A: Send + 'static> Drop for Writer<A> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
