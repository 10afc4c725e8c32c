//! The forwarder: readings from the outbox to downstream services (billing, MDM) as signed JSON
//! over HTTPS with mutual TLS, until each target has answered 2xx.
//!
//! ```text
//!  writer commit ──notify──► one task per target:
//!                              outbox_pending(batch) ─► per-meter chains, `concurrency` at once
//!                                                         POST JSON + Content-Digest + Signature
//!                              outbox_settle ◄─ delivered / failed (retry) / dead (4xx)
//!                              any failure: back off (exponential, full jitter), then re-read
//! ```
//!
//! - Order: rows are read in commit order and each meter's rows are sent one after the other;
//!   a meter whose request failed sends nothing more from the batch, and the next read starts
//!   again from its oldest pending row. Different meters go in parallel.
//! - Nothing lost: a row leaves `pending` only when the target answered 2xx (delivered) or a
//!   4xx other than 408/429 (dead letter, with a security event). A crash before the settlement
//!   is written sends the row again; receivers de-duplicate on `ReadingID`.
//! - Every attempt is signed anew (RFC 9421: fresh `created`, `expires`, `nonce`), so a retry
//!   is never mistaken for a replay.
//!
//! [`body`] builds the JSON and the signed headers and classifies answers: pure functions,
//! tested in memory. [`client`] is the HTTPS client (hyper over rustls with the Gridward TLS
//! profile). This module runs the loops.

pub mod body;
pub mod client;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use gridward_core::backoff::Backoff;
use gridward_core::security::{Reason, SecurityEvent};
use gridward_store::{OutboxItem, Settlement, Store, TargetId};
use hdrhistogram::Histogram;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use body::Disposition;
pub use client::{
    ForwardError, HttpVersion, LoadedTarget, TargetSettings, TargetTls, normalize_https_url,
};

use crate::metrics::TargetGauges;
use crate::pipeline::Clock;
use crate::writer::Writer;

/// How long an idle target waits for new rows before looking again (new commits wake it at
/// once; this only covers rows put back by `gridward outbox retry` from another process).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Delivery metrics of one target.
#[derive(Debug)]
pub struct TargetMetrics {
    /// The target's name.
    pub name: String,
    delivered: AtomicU64,
    failed_attempts: AtomicU64,
    dead: AtomicU64,
    lag_ms: Mutex<Histogram<u64>>,
}

/// A point-in-time copy of [`TargetMetrics`].
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSnapshot {
    /// The target's name.
    pub name: String,
    /// Readings delivered (2xx) since start.
    pub delivered: u64,
    /// Attempts that failed and will be retried (network, timeout, 5xx, 408, 429).
    pub failed_attempts: u64,
    /// Readings moved to the dead letters since start.
    pub dead: u64,
    /// Delivery lag (received by the head-end → 2xx from the target), 50th percentile.
    pub lag_p50: Duration,
    /// 99th percentile.
    pub lag_p99: Duration,
    /// Maximum.
    pub lag_max: Duration,
}

impl TargetMetrics {
    fn new(name: String) -> Self {
        // 1 ms .. 30 days, 3 significant digits: constant bounds, creation cannot fail.
        let histogram = Histogram::new_with_bounds(1, 30 * 24 * 3_600_000, 3)
            .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"));
        Self {
            name,
            delivered: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            lag_ms: Mutex::new(histogram),
        }
    }

    /// Copies the current values.
    pub fn snapshot(&self) -> TargetSnapshot {
        let h = self.lag_ms.lock().unwrap_or_else(PoisonError::into_inner);
        let q = |q: f64| {
            if h.is_empty() {
                Duration::ZERO
            } else {
                Duration::from_millis(h.value_at_quantile(q))
            }
        };
        TargetSnapshot {
            name: self.name.clone(),
            delivered: self.delivered.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            lag_p50: q(0.5),
            lag_p99: q(0.99),
            lag_max: if h.is_empty() {
                Duration::ZERO
            } else {
                Duration::from_millis(h.max())
            },
        }
    }
}

/// The running forwarders, one task per target.
#[derive(Debug)]
pub struct Forwarders {
    targets: Vec<TargetHandle>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

#[derive(Debug)]
struct TargetHandle {
    metrics: Arc<TargetMetrics>,
    target: Arc<Target>,
}

/// What one target's task needs, shared with its requests.
#[derive(Debug)]
struct Target {
    settings: TargetSettings,
    client: Mutex<Arc<client::HttpsClient>>,
}

impl Target {
    fn client(&self) -> Arc<client::HttpsClient> {
        Arc::clone(&self.client.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What a forwarder needs from the head-end.
#[derive(Clone)]
pub struct ForwardContext {
    /// The store holding the outbox.
    pub store: Arc<dyn Store>,
    /// Where dead letters are reported as security events.
    pub writer: Writer,
    /// The clock (signature times, lag).
    pub clock: Clock,
}

impl std::fmt::Debug for ForwardContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardContext").finish_non_exhaustive()
    }
}

impl Forwarders {
    /// Starts one task per target on the current runtime. Each target comes with its id in the
    /// store ([`Store::register_outbox_target`]) and the [`Notify`] the writer signals after a
    /// commit that queued rows (see [`wake_all`]).
    pub fn start(ctx: ForwardContext, targets: Vec<(TargetId, LoadedTarget, Arc<Notify>)>) -> Self {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut handles = Vec::with_capacity(targets.len());
        for (id, loaded, notify) in targets {
            let metrics = Arc::new(TargetMetrics::new(loaded.settings.name.clone()));
            let gauges = ctx.writer.metrics().outbox_target(&loaded.settings.name);
            let span = tracing::info_span!("forward", target = %loaded.settings.name);
            let target = Arc::new(Target {
                settings: loaded.settings,
                client: Mutex::new(Arc::new(loaded.client)),
            });
            tasks.spawn(
                run_target(
                    id,
                    Arc::clone(&target),
                    ctx.clone(),
                    Arc::clone(&notify),
                    (Arc::clone(&metrics), gauges),
                    cancel.clone(),
                )
                .instrument(span),
            );
            handles.push(TargetHandle { metrics, target });
        }
        Self {
            targets: handles,
            cancel,
            tasks,
        }
    }

    /// Delivery metrics per target.
    pub fn snapshot(&self) -> Vec<TargetSnapshot> {
        self.targets.iter().map(|t| t.metrics.snapshot()).collect()
    }

    /// Replaces every target's HTTPS client by one built from `load` (re-read certificates,
    /// keys and CRLs); a target whose material fails to load keeps its client. Returns the
    /// failures.
    pub fn reload(
        &self,
        load: impl Fn(&TargetSettings) -> Result<client::HttpsClient, ForwardError>,
    ) -> Vec<(String, ForwardError)> {
        let mut failures = Vec::new();
        for t in &self.targets {
            match load(&t.target.settings) {
                Ok(c) => {
                    *t.target
                        .client
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Arc::new(c);
                }
                Err(e) => failures.push((t.target.settings.name.clone(), e)),
            }
        }
        failures
    }

    /// Stops every target's task. Requests in flight are abandoned: their rows stay pending and
    /// are sent again at the next start.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Wakes every target's task (after a commit that queued rows); a task that is busy finds the
/// permit when it next waits.
pub fn wake_all(notifies: &[Arc<Notify>]) {
    for n in notifies {
        n.notify_one();
    }
}

/// One target's loop (see the module documentation).
async fn run_target(
    id: TargetId,
    target: Arc<Target>,
    ctx: ForwardContext,
    notify: Arc<Notify>,
    (metrics, gauges): (Arc<TargetMetrics>, TargetGauges),
    cancel: CancellationToken,
) {
    let s = &target.settings;
    tracing::debug!(url = %s.url, "forwarder started");
    let mut backoff = Backoff::new(s.retry_initial, s.retry_max);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let store = Arc::clone(&ctx.store);
        let limit = s.batch_size;
        let items = match tokio::task::spawn_blocking(move || store.outbox_pending(id, limit)).await
        {
            Ok(Ok(items)) => items,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the outbox");
                let delay = backoff.next_delay(&mut rand::thread_rng());
                if !pause(&cancel, delay).await {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        observe_outbox(&gauges, &items, limit, (ctx.clock)());
        if items.is_empty() {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = notify.notified() => {}
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        }
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            o = deliver_batch(&target, &ctx, items) => o,
        };
        record(&ctx, &metrics, &gauges, s, &outcome);
        let store = Arc::clone(&ctx.store);
        let settled_at = (ctx.clock)();
        let settlement = outcome.settlement;
        match tokio::task::spawn_blocking(move || store.outbox_settle(&settlement, settled_at))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(
                error = %e,
                "cannot record deliveries (they will be sent again)"
            ),
            Err(_) => return,
        }
        if outcome.transient_failure {
            let delay = backoff.next_delay(&mut rand::thread_rng());
            if !pause(&cancel, delay).await {
                return;
            }
        } else {
            backoff.reset();
        }
    }
}

/// Sets the target's gauges from a read of its pending rows (`limit` at most, oldest first): the
/// lag is the age of the oldest; the count is exact when the read returned fewer than `limit`
/// rows, and otherwise at least what was read.
fn observe_outbox(
    gauges: &TargetGauges,
    items: &[OutboxItem],
    limit: usize,
    now: time::OffsetDateTime,
) {
    let Some(oldest) = items.first() else {
        gauges.set_pending(0);
        gauges.set_lag(Duration::ZERO);
        return;
    };
    gauges.set_lag(
        (now - oldest.queued_at)
            .try_into()
            .unwrap_or(Duration::ZERO),
    );
    let read = items.len() as u64;
    gauges.set_pending(if items.len() < limit {
        read
    } else {
        read.max(gauges.pending())
    });
}

/// Sleeps for `d` unless cancelled first; false if cancelled.
async fn pause(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// What delivering one batch did.
#[derive(Debug, Default)]
struct BatchOutcome {
    settlement: Settlement,
    /// (row, reading id, meter, lag) of the delivered rows, for metrics.
    delivered: Vec<(OutboxItem, Duration)>,
    /// Dead rows with their item, for security events.
    dead: Vec<(OutboxItem, String)>,
    transient_failure: bool,
}

/// Sends a batch: one chain per meter in first-appearance order, up to `concurrency` chains at
/// once; a chain stops at its first transient failure.
async fn deliver_batch(
    target: &Arc<Target>,
    ctx: &ForwardContext,
    items: Vec<OutboxItem>,
) -> BatchOutcome {
    let mut chains: Vec<Vec<OutboxItem>> = Vec::new();
    let mut index: HashMap<gridward_core::MeterId, usize> = HashMap::new();
    for item in items {
        match index.get(&item.meter_id) {
            Some(&i) => chains[i].push(item),
            None => {
                index.insert(item.meter_id.clone(), chains.len());
                chains.push(vec![item]);
            }
        }
    }
    let semaphore = Arc::new(Semaphore::new(target.settings.concurrency.max(1)));
    let client = target.client();
    let mut set = JoinSet::new();
    for chain in chains {
        let semaphore = Arc::clone(&semaphore);
        let client = Arc::clone(&client);
        let target = Arc::clone(target);
        let clock = Arc::clone(&ctx.clock);
        set.spawn(async move {
            let Ok(_permit) = semaphore.acquire_owned().await else {
                return Vec::new();
            };
            let mut results = Vec::with_capacity(chain.len());
            for item in chain {
                let d = client.send(&target.settings, &item, &clock).await;
                let stop = matches!(d, Disposition::Retry(_));
                results.push((item, d, (clock)()));
                if stop {
                    break;
                }
            }
            results
        });
    }
    let mut out = BatchOutcome::default();
    while let Some(joined) = set.join_next().await {
        let Ok(results) = joined else { continue };
        for (item, disposition, at) in results {
            match disposition {
                Disposition::Delivered => {
                    out.settlement.delivered.push(item.id);
                    let lag = (at - item.queued_at).unsigned_abs();
                    out.delivered.push((item, lag));
                }
                Disposition::Retry(e) => {
                    out.transient_failure = true;
                    out.settlement.failed.push((item.id, e));
                }
                Disposition::Dead(reason) => {
                    out.settlement.dead.push((item.id, reason.clone()));
                    out.dead.push((item, reason));
                }
            }
        }
    }
    out
}

/// Updates metrics and reports dead letters and failures.
fn record(
    ctx: &ForwardContext,
    m: &TargetMetrics,
    gauges: &TargetGauges,
    s: &TargetSettings,
    o: &BatchOutcome,
) {
    let (delivered, failed, dead) = (
        o.delivered.len() as u64,
        o.settlement.failed.len() as u64,
        o.dead.len() as u64,
    );
    gauges.settled(delivered, failed, dead);
    gauges.set_pending(gauges.pending().saturating_sub(delivered + dead));
    m.delivered
        .fetch_add(o.delivered.len() as u64, Ordering::Relaxed);
    m.failed_attempts
        .fetch_add(o.settlement.failed.len() as u64, Ordering::Relaxed);
    m.dead.fetch_add(o.dead.len() as u64, Ordering::Relaxed);
    {
        let mut h = m.lag_ms.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, lag) in &o.delivered {
            h.saturating_record(u64::try_from(lag.as_millis()).unwrap_or(u64::MAX).max(1));
        }
    }
    if delivered > 0 {
        tracing::debug!(delivered, "readings delivered");
    }
    if let Some((_, e)) = o.settlement.failed.first() {
        tracing::warn!(failed, error = %e, "deliveries failed, will retry");
    }
    for (item, reason) in &o.dead {
        tracing::warn!(
            meter = %item.meter_id,
            counter = item.counter,
            reason = ?reason,
            "reading refused for good by the target: dead letter"
        );
        let event = SecurityEvent::new(
            (ctx.clock)(),
            Reason::DownstreamRejected,
            format!(
                "target {} refused reading {} for good: {reason}",
                s.name,
                item.reading_id()
            ),
        )
        .meter(&item.meter_id);
        ctx.writer.security_event(event);
    }
}
