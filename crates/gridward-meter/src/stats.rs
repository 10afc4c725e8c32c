//! Live fleet counters and the publish → PUBACK latency histogram, shared lock-free between
//! the meter tasks and whoever displays progress.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets per factor of ten: about 2.3 % relative resolution.
const BUCKETS_PER_DECADE: f64 = 100.0;
/// Decades covered above 1 µs: up to 1000 s.
const DECADES: usize = 9;
const BUCKETS: usize = DECADES * BUCKETS_PER_DECADE as usize + 1;

/// A log-scale latency histogram (1 µs to 1000 s, ~2.3 % resolution) recorded with atomics.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bucket_of(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    let i = ((us as f64).log10() * BUCKETS_PER_DECADE).ceil() as usize;
    i.min(BUCKETS - 1)
}

fn bucket_upper_us(i: usize) -> f64 {
    10f64.powf(i as f64 / BUCKETS_PER_DECADE)
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }

    /// Records one sample.
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = self.buckets.get(bucket_of(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `q`-quantile (0 ≤ q ≤ 1), as the upper edge of its bucket (never above the maximum);
    /// `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let max = self.max_us.load(Ordering::Relaxed) as f64;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_secs_f64(
                    bucket_upper_us(i).min(max).max(0.0) / 1e6,
                ));
            }
        }
        Some(Duration::from_secs_f64(max / 1e6))
    }

    /// Count, mean, p50, p90, p99, p99.9 and maximum.
    pub fn summary(&self) -> LatencySummary {
        let count = self.count();
        let q = |p| self.quantile(p).unwrap_or_default();
        LatencySummary {
            count,
            mean: Duration::from_micros(
                self.sum_us
                    .load(Ordering::Relaxed)
                    .checked_div(count)
                    .unwrap_or(0),
            ),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: Duration::from_micros(self.max_us.load(Ordering::Relaxed)),
        }
    }
}

/// A snapshot of a [`LatencyHistogram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: Duration,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest sample.
    pub max: Duration,
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters of a fleet, updated by every meter task.
        #[derive(Debug, Default)]
        pub struct FleetStats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
            /// Publish → PUBACK latency of genuine messages.
            pub latency: LatencyHistogram,
        }

        /// A plain copy of [`FleetStats`]' counters at one instant.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl FleetStats {
            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Meters currently connected (a gauge).
    connected,
    /// Successful connections (TLS + CONNACK accepted), reconnects included.
    connects,
    /// Connection attempts that failed (TCP, TLS handshake, CONNACK refusal, timeout).
    connect_failures,
    /// Established connections that were lost.
    disconnects,
    /// Readings signed.
    readings,
    /// Events signed.
    events,
    /// Unacknowledged messages of an earlier run restored from the outbox (sent again).
    restored,
    /// Publishes written (first sends and resends).
    sent,
    /// Publishes that were resends of a message not acknowledged on an earlier connection.
    resent,
    /// Genuine messages acknowledged with success.
    acked,
    /// Genuine messages refused by the head-end (PUBACK with a failure reason code, MQTT 5).
    rejected,
    /// Messages deliberately crafted to be refused (replay, tamper), sent.
    misbehaviour_sent,
    /// Misbehaviour messages acknowledged with success (MQTT 3.1.1 always acknowledges).
    misbehaviour_acked,
    /// Misbehaviour messages refused with a failure reason code.
    misbehaviour_rejected,
    /// Readings not taken because the meter's queue of unsent messages was full.
    skipped,
    /// Counter marks persisted (fsync'd rewrites of the counters file).
    counter_writes,
    /// Failures to persist counter marks or to write the outbox.
    state_errors,
    /// Messages that could not be signed.
    sign_errors,
    /// PUBACKs for a packet id not in flight (a protocol error by the peer).
    unexpected_acks,
    /// Meters that stopped trying to connect.
    gave_up,
    /// Commands received (over MQTT or injected).
    commands_received,
    /// Commands executed (firmware: installed and confirmed).
    commands_executed,
    /// Commands refused (by verification, or a firmware failure after it).
    commands_refused,
    /// Command acknowledgements signed.
    command_acks,
    /// Firmware chunks received.
    firmware_chunks,
    /// SUBACKs that refused a subscription.
    subscribe_refused,
    /// PUBLISHes from the head-end on a topic the meter does not read.
    unexpected_publishes,
}

impl StatsSnapshot {
    /// Genuine messages signed (or restored) but not yet acknowledged or refused.
    pub fn unacknowledged(&self) -> u64 {
        (self.readings + self.events + self.command_acks + self.restored)
            .saturating_sub(self.acked + self.rejected)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn quantiles_are_within_resolution() {
        let h = LatencyHistogram::new();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        let close = |d: Duration, ms: f64| (d.as_secs_f64() * 1e3 / ms - 1.0).abs() < 0.03;
        assert!(close(s.p50, 500.0), "{:?}", s.p50);
        assert!(close(s.p99, 990.0), "{:?}", s.p99);
        assert_eq!(s.max, Duration::from_millis(1000));
        assert!(s.p999 <= s.max);
        assert_eq!(s.mean, Duration::from_micros(500_500));
    }

    #[test]
    fn empty_and_extreme_samples() {
        let h = LatencyHistogram::new();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.summary(), LatencySummary::default());
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(100_000));
        assert!(h.quantile(0.0).unwrap() <= Duration::from_micros(1));
        assert_eq!(h.count(), 2);
        assert!(h.quantile(1.0).unwrap() <= Duration::from_secs(100_000));
    }

    #[test]
    fn snapshot_copies_counters() {
        let s = FleetStats::default();
        s.readings.fetch_add(5, Ordering::Relaxed);
        s.events.fetch_add(1, Ordering::Relaxed);
        s.acked.fetch_add(3, Ordering::Relaxed);
        let snap = s.snapshot();
        assert_eq!(
            (snap.readings, snap.acked, snap.unacknowledged()),
            (5, 3, 3)
        );
    }
}
