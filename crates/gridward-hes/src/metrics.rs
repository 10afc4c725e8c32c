//! Metrics of the head-end: how many messages arrived, what became of them, how long it took,
//! how the store and the downstream deliveries keep up, and the security-relevant counts of the
//! API (logins, lockouts, security events).
//!
//! Two views of the same counts:
//!
//! - [`Metrics::snapshot`]: a [`Snapshot`] for the status line, `gridward demo` and
//!   `gridward bench` (percentiles from an HdrHistogram, microseconds, 3 significant digits,
//!   behind a mutex held for one `record` call);
//! - [`Metrics::encode_prometheus`]: the OpenMetrics text exposition for `GET /metrics`
//!   (a `prometheus-client` [`Registry`]), served with [`CONTENT_TYPE`].
//!
//! Label cardinality is bounded by construction: reasons are [`Reason`] codes or a small
//! capped set of names the API passes, targets are the configured `[[forward]]` names, and no
//! meter id, address or user name is ever a label.
//!
//! | family | type | labels |
//! |---|---|---|
//! | `gridward_messages_received_total` | counter | |
//! | `gridward_messages_total` | counter | `outcome` = `stored`, `duplicate`, `refused` (with `reason`), `unavailable` |
//! | `gridward_ingest_latency_seconds` | histogram | (received → verdict, stored and duplicate messages) |
//! | `gridward_store_batch_size` | histogram | (messages per committed transaction) |
//! | `gridward_security_events_total` | counter | `reason` |
//! | `gridward_security_events_dropped_total` | counter | (event queue full) |
//! | `gridward_outbox_pending` | gauge | `target` |
//! | `gridward_outbox_lag_seconds` | gauge | `target` (age of the oldest pending reading) |
//! | `gridward_outbox_deliveries_total` | counter | `target`, `outcome` = `delivered`, `retry`, `dead` |
//! | `gridward_logins_total` | counter | `outcome` = `success`, `failure` |
//! | `gridward_lockouts_total` | counter | |
//! | `gridward_alarms_active` | gauge | `severity` = `critical`, `major`, `minor`, `warning` (always all four) |
//! | `gridward_alarms_raised_total` | counter | `type` (new alarms, not the repeats folded into them) |
//! | `gridward_mqtt_connections` | gauge | (open now, handshakes included; once [`Metrics::watch_endpoint`]) |
//! | `gridward_mqtt_sessions` | gauge | (meters with a live MQTT session) |
//! | `gridward_mqtt_connection_attempts_total` | counter | `outcome` = `accepted`, `banned`, `limit` |
//! | `gridward_mqtt_handshake_failures_total` | counter | |

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gridward_core::security::Reason;
use gridward_mqtt::EndpointStats;
use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{self as prom_histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::encode_prometheus`]'s text (OpenMetrics 1.0, which
/// Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Most distinct security-event reasons the API may add beyond [`Reason`]'s codes; further ones
/// are counted as `other`.
const MAX_EXTRA_REASONS: usize = 32;

/// A label set: pairs of a fixed name and a bounded value.
type Labels = Vec<(&'static str, Cow<'static, str>)>;

/// The severity codes of `gridward_alarms_active`, highest first.
const ALARM_SEVERITIES: [&str; 4] = ["critical", "major", "minor", "warning"];

/// Where the endpoint's counters come from (see [`Metrics::watch_endpoint`]).
type EndpointSource = Arc<Mutex<Option<Box<dyn Fn() -> Option<EndpointStats> + Send + Sync>>>>;

/// Ingest metrics, shared by the pipeline, the writer, the forwarder and whoever reports.
#[derive(Debug)]
pub struct Metrics {
    received: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    events_dropped: AtomicU64,
    batches: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    prom: Prom,
}

/// The `prometheus-client` side: the registry and handles to what is registered in it.
struct Prom {
    registry: Registry,
    received: Counter,
    messages: Family<Labels, Counter>,
    ingest_latency: prom_histogram::Histogram,
    batch_size: prom_histogram::Histogram,
    security_events: Family<Labels, Counter>,
    extra_reasons: Mutex<HashSet<String>>,
    events_dropped: Counter,
    outbox_pending: Family<Labels, Gauge>,
    outbox_lag: Family<Labels, Gauge<f64, AtomicU64>>,
    deliveries: Family<Labels, Counter>,
    logins: Family<Labels, Counter>,
    lockouts: Counter,
    alarms_active: Family<Labels, Gauge>,
    alarms_raised: Family<Labels, Counter>,
    endpoint: EndpointSource,
    /// Every target's gauges: each stored reading queues one row for each.
    targets: Mutex<Vec<(String, TargetGauges)>>,
}

impl std::fmt::Debug for Prom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prom").finish_non_exhaustive()
    }
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

/// The gauges and counters of one downstream target, handed to its forwarder loop.
#[derive(Debug, Clone)]
pub struct TargetGauges {
    pending: Gauge,
    lag: Gauge<f64, AtomicU64>,
    delivered: Counter,
    retried: Counter,
    dead: Counter,
}

impl TargetGauges {
    /// Rows waiting for delivery now.
    pub fn set_pending(&self, rows: u64) {
        self.pending.set(i64::try_from(rows).unwrap_or(i64::MAX));
    }

    /// Rows waiting now, as last set (an estimate between two reads of the outbox).
    pub fn pending(&self) -> u64 {
        u64::try_from(self.pending.get()).unwrap_or(0)
    }

    /// Age of the oldest pending reading (zero when nothing is pending).
    pub fn set_lag(&self, lag: Duration) {
        self.lag.set(lag.as_secs_f64());
    }

    /// Counts what one batch did.
    pub fn settled(&self, delivered: u64, retried: u64, dead: u64) {
        self.delivered.inc_by(delivered);
        self.retried.inc_by(retried);
        self.dead.inc_by(dead);
    }
}

fn label(
    name: &'static str,
    value: impl Into<Cow<'static, str>>,
) -> (&'static str, Cow<'static, str>) {
    (name, value.into())
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
            prom: Prom::new(),
        }
    }

    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.prom.received.inc();
    }

    pub(crate) fn accepted(&self, latency: Duration) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.prom.outcome("stored", None);
        self.latency(latency);
    }

    pub(crate) fn duplicate(&self, latency: Duration) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
        self.prom.outcome("duplicate", None);
        self.latency(latency);
    }

    /// A refusal by the endpoint or the pipeline (the [`Snapshot`]'s `rejected`).
    pub(crate) fn rejected(&self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A message the pipeline refused: [`Metrics::rejected`] and `gridward_messages_total`.
    pub(crate) fn message_refused(&self, reason: Reason) {
        self.rejected(reason);
        self.prom.outcome("refused", Some(reason.code()));
    }

    /// A message not decided because the store failed (no PUBACK; the meter resends).
    pub(crate) fn unavailable(&self) {
        self.prom.outcome("unavailable", None);
    }

    pub(crate) fn event_dropped(&self) {
        self.events_dropped.fetch_add(1, Ordering::Relaxed);
        self.prom.events_dropped.inc();
    }

    /// One committed store transaction of `size` messages.
    pub(crate) fn batch(&self, size: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.prom.batch_size.observe(size as f64);
    }

    /// A security event of the head-end (endpoint, pipeline, forwarder) on its way to the store.
    pub(crate) fn security_event(&self, reason: Reason) {
        self.prom.security_event(Cow::Borrowed(reason.code()));
    }

    /// A security event raised outside the ingest path (the API), by reason code. A
    /// [`Reason`] code counts under its name; other names must be short lowercase
    /// `snake_case` words, and at most 32 distinct ones are kept: anything else counts as
    /// `other`, so that no caller can grow the label set.
    pub fn record_security_event(&self, reason: &str) {
        if let Some(r) = Reason::ALL.iter().find(|r| r.code() == reason) {
            self.prom.security_event(Cow::Borrowed(r.code()));
            return;
        }
        let valid = (1..=48).contains(&reason.len())
            && reason
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let name = {
            let mut extra = self
                .prom
                .extra_reasons
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if valid && (extra.contains(reason) || extra.len() < MAX_EXTRA_REASONS) {
                extra.insert(reason.to_owned());
                Cow::Owned(reason.to_owned())
            } else {
                Cow::Borrowed("other")
            }
        };
        self.prom.security_event(name);
    }

    /// A login attempt at the API: `gridward_logins_total{outcome="success"|"failure"}`.
    pub fn record_login(&self, success: bool) {
        let outcome = if success { "success" } else { "failure" };
        self.prom
            .logins
            .get_or_create(&vec![label("outcome", outcome)])
            .inc();
    }

    /// An account locked after repeated failures: `gridward_lockouts_total`.
    pub fn record_lockout(&self) {
        self.prom.lockouts.inc();
    }

    /// The active alarms per severity code (`gridward_alarms_active`); severities not listed
    /// are zero. Unknown severity codes are ignored (the label set stays the four).
    pub fn set_active_alarms(&self, counts: &[(String, u64)]) {
        for severity in ALARM_SEVERITIES {
            let n = counts
                .iter()
                .filter(|(s, _)| s == severity)
                .map(|(_, n)| *n)
                .sum::<u64>();
            self.prom
                .alarms_active
                .get_or_create(&vec![label("severity", severity)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// A new alarm of type `alarm_type` (a `gridward-detect` code):
    /// `gridward_alarms_raised_total{type}`.
    pub fn record_alarm_raised(&self, alarm_type: &'static str) {
        self.prom
            .alarms_raised
            .get_or_create(&vec![label("type", alarm_type)])
            .inc();
    }

    /// The gauges of downstream target `name` (a configured `[[forward]]` name), created at
    /// zero so that the target shows before its first delivery.
    pub fn outbox_target(&self, name: &str) -> TargetGauges {
        let mut targets = self
            .prom
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, g)) = targets.iter().find(|(n, _)| n == name) {
            return g.clone();
        }
        let target = vec![label("target", name.to_owned())];
        let with = |outcome: &'static str| {
            let mut l = target.clone();
            l.push(label("outcome", outcome));
            self.prom.deliveries.get_or_create_owned(&l)
        };
        let gauges = TargetGauges {
            pending: self.prom.outbox_pending.get_or_create_owned(&target),
            lag: self.prom.outbox_lag.get_or_create_owned(&target),
            delivered: with("delivered"),
            retried: with("retry"),
            dead: with("dead"),
        };
        targets.push((name.to_owned(), gauges.clone()));
        gauges
    }

    /// A commit queued `readings` outbox rows for every target: their pending counts grow
    /// until the forwarder next reads the outbox and sets them exactly.
    pub(crate) fn outbox_queued(&self, readings: usize) {
        if readings == 0 {
            return;
        }
        let n = i64::try_from(readings).unwrap_or(i64::MAX);
        for t in self
            .prom
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            t.1.pending.inc_by(n);
        }
    }

    /// Makes the exposition include the MQTT endpoint's connection counts, read from `stats`
    /// at every scrape: pass `endpoint.stats_reader()`, which holds the endpoint weakly (the
    /// endpoint's handler holds these metrics; a strong handle here would be a cycle that keeps
    /// the pipeline and the writer alive after shutdown). While it is unset or answers `None`,
    /// those families are absent. A second call replaces the first source.
    pub fn watch_endpoint(
        &self,
        stats: impl Fn() -> Option<EndpointStats> + Send + Sync + 'static,
    ) {
        *self
            .prom
            .endpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(stats));
    }

    fn latency(&self, latency: Duration) {
        self.prom.ingest_latency.observe(latency.as_secs_f64());
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

    /// The OpenMetrics text exposition of every family (see the module documentation), ending
    /// with `# EOF`; serve it with [`CONTENT_TYPE`].
    pub fn encode_prometheus(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.prom.registry).is_err() {
            // Writing into a String cannot fail; an encoder error would be a bug in a metric's
            // encoding. Serve what is there, still a complete exposition.
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("# EOF\n");
        }
        out
    }
}

impl Prom {
    fn new() -> Self {
        let mut registry = Registry::default();
        let received = Counter::default();
        registry.register(
            "gridward_messages_received",
            "Messages handed to the ingest pipeline",
            received.clone(),
        );
        let messages = Family::<Labels, Counter>::default();
        registry.register(
            "gridward_messages",
            "Messages by outcome: stored, duplicate (acknowledged, not stored again), refused \
             (with the reason code), unavailable (store failure, not acknowledged)",
            messages.clone(),
        );
        let ingest_latency = prom_histogram::Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register_with_unit(
            "gridward_ingest_latency",
            "Time from receiving a message to its verdict (stored or duplicate)",
            Unit::Seconds,
            ingest_latency.clone(),
        );
        let batch_size = prom_histogram::Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register(
            "gridward_store_batch_size",
            "Messages per committed store transaction",
            batch_size.clone(),
        );
        let security_events = Family::<Labels, Counter>::default();
        registry.register(
            "gridward_security_events",
            "Security events by reason code",
            security_events.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "gridward_security_events_dropped",
            "Security events not stored because their queue was full",
            events_dropped.clone(),
        );
        let outbox_pending = Family::<Labels, Gauge>::default();
        registry.register(
            "gridward_outbox_pending",
            "Outbox rows waiting for delivery, per downstream target",
            outbox_pending.clone(),
        );
        let outbox_lag = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "gridward_outbox_lag",
            "Age of the oldest reading waiting for delivery, per downstream target",
            Unit::Seconds,
            outbox_lag.clone(),
        );
        let deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "gridward_outbox_deliveries",
            "Delivery attempts per downstream target by outcome: delivered (2xx), retry \
             (network, timeout, 5xx, 408, 429), dead (other 4xx)",
            deliveries.clone(),
        );
        let logins = Family::<Labels, Counter>::default();
        registry.register(
            "gridward_logins",
            "Login attempts at the API by outcome",
            logins.clone(),
        );
        let lockouts = Counter::default();
        registry.register(
            "gridward_lockouts",
            "Accounts locked after repeated failed logins",
            lockouts.clone(),
        );
        let alarms_active = Family::<Labels, Gauge>::default();
        registry.register(
            "gridward_alarms_active",
            "Active (not cleared) alarms by severity",
            alarms_active.clone(),
        );
        for severity in ALARM_SEVERITIES {
            alarms_active
                .get_or_create(&vec![label("severity", severity)])
                .set(0);
        }
        let alarms_raised = Family::<Labels, Counter>::default();
        registry.register(
            "gridward_alarms_raised",
            "New alarms by type (repeats folded into an active alarm are not counted)",
            alarms_raised.clone(),
        );
        let endpoint: EndpointSource = Arc::new(Mutex::new(None));
        registry.register_collector(Box::new(EndpointCollector(Arc::clone(&endpoint))));
        Self {
            registry,
            received,
            messages,
            ingest_latency,
            batch_size,
            security_events,
            extra_reasons: Mutex::new(HashSet::new()),
            events_dropped,
            outbox_pending,
            outbox_lag,
            deliveries,
            logins,
            lockouts,
            alarms_active,
            alarms_raised,
            endpoint,
            targets: Mutex::new(Vec::new()),
        }
    }

    fn outcome(&self, outcome: &'static str, reason: Option<&'static str>) {
        let mut labels = vec![label("outcome", outcome)];
        if let Some(r) = reason {
            labels.push(label("reason", r));
        }
        self.messages.get_or_create(&labels).inc();
    }

    fn security_event(&self, reason: Cow<'static, str>) {
        self.security_events
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }
}

/// Encodes the endpoint's counters at scrape time, from the source set by
/// [`Metrics::watch_endpoint`].
struct EndpointCollector(EndpointSource);

impl std::fmt::Debug for EndpointCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointCollector").finish_non_exhaustive()
    }
}

impl Collector for EndpointCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = {
            let source = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            match source.as_ref().and_then(|f| f()) {
                Some(stats) => stats,
                None => return Ok(()),
            }
        };
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let g = gauge(stats.open);
        g.encode(encoder.encode_descriptor(
            "gridward_mqtt_connections",
            "MQTT connections open now (TLS handshakes included).",
            None,
            g.metric_type(),
        )?)?;
        let g = gauge(stats.sessions);
        g.encode(encoder.encode_descriptor(
            "gridward_mqtt_sessions",
            "Meters with a live MQTT session now.",
            None,
            g.metric_type(),
        )?)?;
        let mut attempts = encoder.encode_descriptor(
            "gridward_mqtt_connection_attempts",
            "TCP connections to the MQTT endpoint by outcome: accepted, banned (source banned), \
             limit (connection limit reached).",
            None,
            MetricType::Counter,
        )?;
        for (outcome, v) in [
            ("accepted", stats.accepted),
            ("banned", stats.refused_banned),
            ("limit", stats.refused_limit),
        ] {
            ConstCounter::new(v).encode(attempts.encode_family(&[("outcome", outcome)])?)?;
        }
        let c = ConstCounter::new(stats.handshake_failures);
        c.encode(encoder.encode_descriptor(
            "gridward_mqtt_handshake_failures",
            "Failed TLS handshakes (timeouts included) and refused certificate identities.",
            None,
            c.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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

    /// The sample lines of an exposition: `name{labels}` → value. Panics on a line that is
    /// neither a comment nor `name[{labels}] value`.
    fn samples(text: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (key, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
            let name_end = key.find('{').unwrap_or(key.len());
            let name = &key[..name_end];
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
                "bad metric name in {line:?}"
            );
            if name_end < key.len() {
                assert!(key.ends_with('}'), "unterminated labels in {line:?}");
            }
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            assert!(
                out.insert(key.to_owned(), value).is_none(),
                "sample {key} twice"
            );
        }
        out
    }

    fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
        *samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in {samples:#?}"))
    }

    #[test]
    fn exposition_has_every_family_with_its_values() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.received();
        }
        m.accepted(Duration::from_millis(2));
        m.duplicate(Duration::from_millis(40));
        m.message_refused(Reason::Replay);
        m.unavailable();
        m.security_event(Reason::Replay);
        m.security_event(Reason::TlsHandshakeFailed);
        m.record_security_event("login_failed");
        m.record_security_event("tls_handshake_failed");
        m.event_dropped();
        m.batch(3);
        m.batch(700);
        m.record_login(true);
        m.record_login(false);
        m.record_login(false);
        m.record_lockout();
        let billing = m.outbox_target("billing");
        billing.set_pending(5);
        billing.set_lag(Duration::from_millis(2500));
        billing.settled(7, 2, 1);
        let _mdm = m.outbox_target("mdm");

        let text = m.encode_prometheus();
        assert!(text.ends_with("# EOF\n"), "{text}");
        let s = samples(&text);
        let expect = [
            ("gridward_messages_received_total", 3.0),
            ("gridward_messages_total{outcome=\"stored\"}", 1.0),
            ("gridward_messages_total{outcome=\"duplicate\"}", 1.0),
            (
                "gridward_messages_total{outcome=\"refused\",reason=\"replay\"}",
                1.0,
            ),
            ("gridward_messages_total{outcome=\"unavailable\"}", 1.0),
            ("gridward_ingest_latency_seconds_count", 2.0),
            ("gridward_ingest_latency_seconds_bucket{le=\"0.004\"}", 1.0),
            ("gridward_ingest_latency_seconds_bucket{le=\"+Inf\"}", 2.0),
            ("gridward_store_batch_size_count", 2.0),
            ("gridward_store_batch_size_sum", 703.0),
            ("gridward_store_batch_size_bucket{le=\"4.0\"}", 1.0),
            ("gridward_security_events_total{reason=\"replay\"}", 1.0),
            (
                "gridward_security_events_total{reason=\"tls_handshake_failed\"}",
                2.0,
            ),
            (
                "gridward_security_events_total{reason=\"login_failed\"}",
                1.0,
            ),
            ("gridward_security_events_dropped_total", 1.0),
            ("gridward_outbox_pending{target=\"billing\"}", 5.0),
            ("gridward_outbox_pending{target=\"mdm\"}", 0.0),
            ("gridward_outbox_lag_seconds{target=\"billing\"}", 2.5),
            (
                "gridward_outbox_deliveries_total{target=\"billing\",outcome=\"delivered\"}",
                7.0,
            ),
            (
                "gridward_outbox_deliveries_total{target=\"billing\",outcome=\"retry\"}",
                2.0,
            ),
            (
                "gridward_outbox_deliveries_total{target=\"billing\",outcome=\"dead\"}",
                1.0,
            ),
            ("gridward_logins_total{outcome=\"success\"}", 1.0),
            ("gridward_logins_total{outcome=\"failure\"}", 2.0),
            ("gridward_lockouts_total", 1.0),
        ];
        for (key, want) in expect {
            assert_eq!(value(&s, key), want, "{key} in\n{text}");
        }
        let sum = value(&s, "gridward_ingest_latency_seconds_sum");
        assert!((sum - 0.042).abs() < 1e-9, "{sum}");
        // Not watched yet: no endpoint families rather than zeros that would be a lie.
        assert!(!text.contains("gridward_mqtt_"), "{text}");
        // The snapshot agrees.
        let snap = m.snapshot();
        assert_eq!(
            (snap.received, snap.accepted, snap.duplicates, snap.batches),
            (3, 1, 1, 2)
        );
        assert_eq!(snap.rejected_for(Reason::Replay), 1);
    }

    #[test]
    fn endpoint_counts_are_read_at_scrape_time() {
        let m = Metrics::new();
        let open = Arc::new(AtomicU64::new(4));
        let o = Arc::clone(&open);
        m.watch_endpoint(move || {
            Some(EndpointStats {
                accepted: 10,
                open: o.load(Ordering::Relaxed),
                sessions: 3,
                handshake_failures: 2,
                refused_banned: 5,
                refused_limit: 1,
                publishes: 0,
                security_events: 0,
            })
        });
        let s = samples(&m.encode_prometheus());
        assert_eq!(value(&s, "gridward_mqtt_connections"), 4.0);
        assert_eq!(value(&s, "gridward_mqtt_sessions"), 3.0);
        assert_eq!(
            value(
                &s,
                "gridward_mqtt_connection_attempts_total{outcome=\"accepted\"}"
            ),
            10.0
        );
        assert_eq!(
            value(
                &s,
                "gridward_mqtt_connection_attempts_total{outcome=\"banned\"}"
            ),
            5.0
        );
        assert_eq!(
            value(
                &s,
                "gridward_mqtt_connection_attempts_total{outcome=\"limit\"}"
            ),
            1.0
        );
        assert_eq!(value(&s, "gridward_mqtt_handshake_failures_total"), 2.0);
        open.store(0, Ordering::Relaxed);
        let s = samples(&m.encode_prometheus());
        assert_eq!(value(&s, "gridward_mqtt_connections"), 0.0);
        // The endpoint is gone (its reader answers None): the families go with it.
        m.watch_endpoint(|| None);
        assert!(!m.encode_prometheus().contains("gridward_mqtt_"));
    }

    #[test]
    fn api_reasons_cannot_grow_the_label_set() {
        let m = Metrics::new();
        for i in 0..100 {
            m.record_security_event(&format!("made_up_{i}"));
        }
        m.record_security_event("Not A Code");
        m.record_security_event("meter\"}injected");
        m.record_security_event(&"x".repeat(49));
        let text = m.encode_prometheus();
        let s = samples(&text);
        let reasons = s
            .keys()
            .filter(|k| k.starts_with("gridward_security_events_total{"))
            .count();
        assert_eq!(reasons, MAX_EXTRA_REASONS + 1, "{text}");
        assert_eq!(
            value(&s, "gridward_security_events_total{reason=\"other\"}"),
            (100 - MAX_EXTRA_REASONS + 3) as f64
        );
        assert_eq!(
            value(&s, "gridward_security_events_total{reason=\"made_up_0\"}"),
            1.0
        );
        assert!(!text.contains("injected"), "{text}");
    }
}
