//! The batch writer: one thread owns durable writes.
//!
//! Accepted messages arrive on a bounded queue with a reply slot each. The thread takes
//! everything queued (up to the batch size), commits it in one transaction, and answers every
//! slot with its [`Outcome`]. While a commit runs the queue fills, so batches grow with load
//! (group commit). When the store is slow the queue is full, senders wait, verdicts and
//! therefore PUBACKs slow down: nothing acknowledged is ever dropped.
//!
//! Security events take the same road on a second queue, without reply; when that queue is
//! full under attack, events are counted as dropped rather than block the ingest path.

use std::sync::Arc;
use std::thread;

use gridward_core::MeterId;
use gridward_core::security::SecurityEvent;
use gridward_store::{Accepted, AcceptedBody, Outcome, Store, StoreError, TargetId};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// What the writer answers for one message.
pub type WriteResult = Result<Outcome, WriteError>;

/// Why a message could not be written. Nothing of its batch was stored.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The store failed the batch's transaction.
    #[error("store: {0}")]
    Store(Arc<StoreError>),
    /// The writer has stopped (shutdown) or the store broke its contract.
    #[error("the writer has stopped")]
    Stopped,
}

/// One message to store and where to send its outcome.
#[derive(Debug)]
pub(crate) struct Job {
    pub accepted: Accepted,
    pub reply: oneshot::Sender<WriteResult>,
}

/// Called after every committed batch with the meters whose last counter advanced.
pub type OnCommit = Box<dyn Fn(&[(MeterId, u64)]) + Send>;

/// What the event thread writes.
#[derive(Debug)]
enum EventJob {
    Security(gridward_store::SecurityEvent),
    Connection(MeterId, bool, time::OffsetDateTime),
}

/// Handles to the writer threads.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    events: mpsc::Sender<EventJob>,
    metrics: Arc<Metrics>,
    hook: Option<SecurityHook>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("hook", &self.hook.is_some())
            .finish_non_exhaustive()
    }
}

/// Called with every security event as it is queued (the audit chain and syslog).
pub type SecurityHook = Arc<dyn Fn(&gridward_store::SecurityEvent) + Send + Sync>;

/// Sizes of the writer's queues and batches.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Most messages per transaction.
    pub batch_size: usize,
    /// Messages that may wait for the writer; beyond, senders wait (backpressure).
    pub queue_depth: usize,
    /// Security events that may wait; beyond, events are counted as dropped.
    pub event_queue_depth: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            queue_depth: 8192,
            event_queue_depth: 65_536,
        }
    }
}

impl Writer {
    /// Starts the writer threads over `store`. They stop when every [`Writer`] clone is dropped,
    /// after writing what was queued. Every stored reading is queued in the outbox for each of
    /// `outbox` in its own transaction.
    pub fn start(
        store: Arc<dyn Store>,
        config: WriterConfig,
        metrics: Arc<Metrics>,
        on_commit: OnCommit,
        outbox: Vec<TargetId>,
    ) -> std::io::Result<(Self, WriterThreads)> {
        let (jobs_tx, jobs_rx) = mpsc::channel(config.queue_depth.max(1));
        let (events_tx, events_rx) = mpsc::channel(config.event_queue_depth.max(1));
        let batch_size = config.batch_size.max(1);
        let s = Arc::clone(&store);
        let m = Arc::clone(&metrics);
        let readings = thread::Builder::new()
            .name("gridward-writer".into())
            .spawn(move || write_loop(s.as_ref(), jobs_rx, batch_size, &m, &on_commit, &outbox))?;
        let events = thread::Builder::new()
            .name("gridward-events".into())
            .spawn(move || event_loop(store.as_ref(), events_rx, batch_size))?;
        Ok((
            Self {
                jobs: jobs_tx,
                events: events_tx,
                metrics,
                hook: None,
            },
            WriterThreads {
                readings: Some(readings),
                events: Some(events),
            },
        ))
    }

    /// Queues `accepted` and waits for its outcome (waits for room first when the queue is full).
    pub async fn write(&self, accepted: Accepted) -> WriteResult {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job { accepted, reply })
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Calls `hook` with every security event this writer (and its clones made after) queues.
    #[must_use]
    pub fn with_security_hook(mut self, hook: SecurityHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The metrics this writer updates.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Queues a security event without waiting; counts it as dropped if the queue is full.
    pub fn security_event(&self, event: SecurityEvent) {
        self.metrics.security_event(event.reason);
        let event = gridward_store::SecurityEvent {
            at: event.at,
            meter_id: event.meter_id,
            source: event.source,
            reason: event.reason.code().to_owned(),
            detail: event.detail,
        };
        if let Some(hook) = &self.hook {
            hook(&event);
        }
        if self.events.try_send(EventJob::Security(event)).is_err() {
            self.metrics.event_dropped();
        }
    }

    /// Queues a connection change of `meter` without waiting (dropped if the queue is full:
    /// the connection state is informational).
    pub fn connection(&self, meter: &MeterId, connected: bool, at: time::OffsetDateTime) {
        let _ = self
            .events
            .try_send(EventJob::Connection(meter.clone(), connected, at));
    }
}

/// The writer threads, to wait for on shutdown.
#[derive(Debug)]
pub struct WriterThreads {
    readings: Option<thread::JoinHandle<()>>,
    events: Option<thread::JoinHandle<()>>,
}

impl WriterThreads {
    /// Waits until both threads have written everything queued and stopped (all [`Writer`]s
    /// must have been dropped).
    pub fn join(mut self) {
        for h in [self.readings.take(), self.events.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
    }
}

fn write_loop(
    store: &dyn Store,
    mut rx: mpsc::Receiver<Job>,
    batch_size: usize,
    metrics: &Metrics,
    on_commit: &OnCommit,
    outbox: &[TargetId],
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(batch_size);
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < batch_size {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let batch: Vec<Accepted> = jobs.iter().map(|j| j.accepted.clone()).collect();
        match store.commit_with_outbox(&batch, outbox) {
            Ok(outcomes) => {
                metrics.batch(batch.len());
                let advanced: Vec<(MeterId, u64)> = batch
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, o)| {
                        matches!(
                            o,
                            Outcome::Stored { .. } | Outcome::StoredUnmatchedAck { .. }
                        )
                    })
                    .map(|(a, _)| (a.meter_id.clone(), a.counter))
                    .collect();
                if !outbox.is_empty() {
                    let readings = batch
                        .iter()
                        .zip(&outcomes)
                        .filter(|(a, o)| {
                            matches!(o, Outcome::Stored { .. })
                                && matches!(a.body, AcceptedBody::Reading { .. })
                        })
                        .count();
                    metrics.outbox_queued(readings);
                }
                on_commit(&advanced);
                for (job, outcome) in jobs.drain(..).zip(outcomes) {
                    let _ = job.reply.send(Ok(outcome));
                }
                // A store that answered fewer outcomes than items broke its contract: the rest
                // get an error, so nothing is acknowledged without an outcome.
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(WriteError::Stopped));
                }
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    batch = jobs.len(),
                    "store commit failed: nothing of the batch is acknowledged, the meters resend"
                );
                let e = WriteError::Store(Arc::new(e));
                for job in jobs.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn event_loop(store: &dyn Store, mut rx: mpsc::Receiver<EventJob>, batch_size: usize) {
    let mut events = Vec::with_capacity(batch_size);
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                EventJob::Security(e) => events.push(e),
                EventJob::Connection(meter, connected, at) => {
                    let _ = store.set_connected(&meter, connected, at);
                }
            }
            if events.len() < batch_size {
                next = rx.try_recv().ok();
            }
        }
        // A failed write of security events is retried once with the same batch; the ingest
        // path never waits for it.
        if !events.is_empty()
            && store.record_security_events(&events).is_err()
            && let Err(e) = store.record_security_events(&events)
        {
            tracing::error!(error = %e, events = events.len(), "security events not stored");
        }
        events.clear();
    }
}
