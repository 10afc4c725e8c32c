//! Metrics of the ingest path: how many messages arrived, what became of them, how long it took.
//!
//! Counters are atomics; the latency histogram (HdrHistogram, microseconds, 3 significant
//! digits) sits behind a mutex held for one `record` call.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gridward_core::security::Reason;
use hdrhistogram::Histogram;

/// Ingest metrics, shared by the pipeline, the writer and whoever reports.
#[derive(Debug)]
pub struct Metrics {
    received: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    events_dropped: AtomicU64,
    batches: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Messages handed to the pipeline.
    pub received: u64,
    /// Messages durably stored.
    pub accepted: u64,
    /// Byte-identical resends of stored messages (acknowledged, not stored again).
    pub duplicates: u64,
    /// Refusals per reason, only the non-zero ones, in [`Reason::ALL`] order.
    pub rejected: Vec<(Reason, u64)>,
    /// Security events that could not be queued for storage (queue full under attack).
    pub events_dropped: u64,
    /// Store transactions committed.
    pub batches: u64,
    /// Ingest latency (received → verdict), 50th percentile.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Maximum.
    pub max: Duration,
}

impl Snapshot {
    /// Total refusals.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }

    /// Refusals for `reason`.
    pub fn rejected_for(&self, reason: Reason) -> u64 {
        self.rejected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Zeroed metrics.
    pub fn new() -> Self {
        // 1 µs .. 1 h with 3 significant digits: bounds are constants, creation cannot fail.
        let histogram = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"));
        Self {
            received: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            events_dropped: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            latency_us: Mutex::new(histogram),
        }
    }

    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn accepted(&self, latency: Duration) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.latency(latency);
    }

    pub(crate) fn duplicate(&self, latency: Duration) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
        self.latency(latency);
    }

    pub(crate) fn rejected(&self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn event_dropped(&self) {
        self.events_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn batch(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    fn latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        if let Ok(mut h) = self.latency_us.lock() {
            h.saturating_record(us);
        }
    }

    /// Copies the current values.
    pub fn snapshot(&self) -> Snapshot {
        let (p50, p99, max) = match self.latency_us.lock() {
            Ok(h) if !h.is_empty() => (
                h.value_at_quantile(0.50),
                h.value_at_quantile(0.99),
                h.max(),
            ),
            _ => (0, 0, 0),
        };
        Snapshot {
            received: self.received.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            rejected: Reason::ALL
                .iter()
                .zip(&self.rejected)
                .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            events_dropped: self.events_dropped.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            p50: Duration::from_micros(p50),
            p99: Duration::from_micros(p99),
            max: Duration::from_micros(max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let m = Metrics::new();
        for i in 1..=100u64 {
            m.received();
            m.accepted(Duration::from_millis(i));
        }
        m.rejected(Reason::Replay);
        m.rejected(Reason::Replay);
        let s = m.snapshot();
        assert_eq!((s.received, s.accepted, s.rejected_total()), (100, 100, 2));
        assert_eq!(s.rejected_for(Reason::Replay), 2);
        assert_eq!(s.rejected_for(Reason::BadSignature), 0);
        assert!(
            s.p50 >= Duration::from_millis(49) && s.p50 <= Duration::from_millis(51),
            "{:?}",
            s.p50
        );
        assert!(s.p99 >= Duration::from_millis(98), "{:?}", s.p99);
    }
}
