//! The writer thread: the one owner of the [`SinkStore`] while the sink runs.
//!
//! Requests that passed [`check`](crate::check::check) arrive on a bounded queue, each with a
//! reply slot. The thread takes everything queued (up to the batch size), decides it in one
//! transaction ([`SinkStore::record`]) and answers every slot (group commit: under load the
//! batches grow and the fsyncs are shared). When the queue is full, request handlers wait:
//! nothing is answered before it is durable. Now and then, after a batch, expired nonces are
//! purged.

use std::sync::Arc;
use std::thread;

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::Clock;
use crate::check::Incoming;
use crate::store::{Outcome, SinkStore, StoreError};

/// Most requests decided in one transaction.
pub const BATCH_SIZE: usize = 256;
/// Requests that may wait for the writer before handlers wait too.
pub const QUEUE_DEPTH: usize = 1024;
/// Expired nonces are purged at most this often.
const PURGE_EVERY: time::Duration = time::Duration::minutes(1);

/// Why a request could not be decided. Nothing of its batch was stored.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The batch's transaction failed.
    #[error("store: {0}")]
    Store(Arc<StoreError>),
    /// The writer has stopped.
    #[error("the writer has stopped")]
    Stopped,
}

struct Job {
    item: Incoming,
    reply: oneshot::Sender<Result<Outcome, WriteError>>,
}

/// A handle to the writer thread; the thread stops when every clone is dropped, after
/// deciding what was queued.
#[derive(Debug, Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("item", &self.item).finish()
    }
}

impl Writer {
    /// Starts the thread that owns `store`.
    pub fn start(
        store: SinkStore,
        clock: Clock,
    ) -> std::io::Result<(Self, thread::JoinHandle<()>)> {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let handle = thread::Builder::new()
            .name("gridward-sink-writer".into())
            .spawn(move || write_loop(store, rx, &clock))?;
        Ok((Self { jobs }, handle))
    }

    /// Queues `item` and waits for its outcome.
    pub async fn write(&self, item: Incoming) -> Result<Outcome, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { item, reply })
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }
}

fn write_loop(mut store: SinkStore, mut rx: mpsc::Receiver<Job>, clock: &Clock) {
    let mut last_purge: Option<OffsetDateTime> = None;
    purge_if_due(&mut store, clock(), &mut last_purge);
    let mut jobs: Vec<Job> = Vec::with_capacity(BATCH_SIZE);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < BATCH_SIZE {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let batch: Vec<Incoming> = jobs.iter().map(|j| j.item.clone()).collect();
        match store.record(&batch) {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for job in jobs.drain(..) {
                    let _ = job.reply.send(outcomes.next().ok_or(WriteError::Stopped));
                }
            }
            Err(e) => {
                let e = WriteError::Store(Arc::new(e));
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
        purge_if_due(&mut store, clock(), &mut last_purge);
    }
}

fn purge_if_due(store: &mut SinkStore, now: OffsetDateTime, last: &mut Option<OffsetDateTime>) {
    if last.is_some_and(|l| now - l < PURGE_EVERY) {
        return;
    }
    *last = Some(now);
    if let Err(e) = store.purge_nonces(now) {
        // Not fatal: expired nonces only take room; the next purge tries again.
        tracing::warn!(error = %e, "cannot purge expired nonces");
    }
}
