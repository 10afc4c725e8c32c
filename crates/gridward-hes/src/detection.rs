//! Detection in the head-end: the signals of the pipeline (stored readings and events), the
//! endpoint (connections, takeovers) and every security event go to one thread that runs
//! [`gridward_detect::Detector`] and turns its actions into alarms in the store.
//!
//! ```text
//!  pipeline (stored) ─┐
//!  endpoint events  ──┼─► DetectionHandle::signal ─► bounded queue ─► detection thread
//!  security events  ──┘    (never blocks ingest:        │  Detector::observe / tick (1 s)
//!                           a full queue drops and      ▼
//!                           counts)                 AlarmStore::raise_alarm / clear_active_alarm
//!                                                   → audit (alarm.raise, alarm.clear), metrics,
//!                                                     syslog for every new critical alarm
//! ```
//!
//! The detector's decisions are pure (`gridward-detect`); this module is the IO around them.
//! The topology it groups meters by (concentrators from the store, feeders from
//! `[[detection.feeder]]`) is re-read every [`TOPOLOGY_REFRESH`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gridward_detect::{AlarmAction, DetectionConfig, Detector, Signal, Topology};
use gridward_store::{AlarmStore, RaiseAlarm, RaiseOutcome};

use crate::audit::AuditSink;
use crate::metrics::Metrics;
use crate::pipeline::Clock;

/// Signals waiting for the detection thread; beyond this they are dropped (and counted).
pub const QUEUE_DEPTH: usize = 65_536;

/// How often the topology is re-read from the store.
pub const TOPOLOGY_REFRESH: Duration = Duration::from_secs(10);

/// How often the detector's time-driven rules run.
const TICK: Duration = Duration::from_secs(1);

/// The senders' side: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct DetectionHandle {
    tx: SyncSender<Signal>,
    dropped: Arc<AtomicU64>,
}

impl DetectionHandle {
    /// Queues `signal` for the detectors; drops it (counted, see [`DetectionHandle::dropped`])
    /// when the queue is full, so detection never slows ingest down.
    pub fn signal(&self, signal: Signal) {
        match self.tx.try_send(signal) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if self
                    .dropped
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(10_000)
                {
                    tracing::warn!("detection queue full: signals dropped");
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Signals dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The detection thread; it ends when every [`DetectionHandle`] is dropped or when stopped.
#[derive(Debug)]
pub struct DetectionThread {
    join: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl DetectionThread {
    /// Handles the signals already queued, runs the time-driven rules once more, and waits
    /// for the thread to end.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        if self.join.join().is_err() {
            tracing::error!("the detection thread panicked");
        }
    }
}

/// What the detection thread writes to and reports through.
pub struct DetectionContext {
    /// Alarms and topology.
    pub store: Arc<dyn AlarmStore>,
    /// Alarm gauges and counters.
    pub metrics: Arc<Metrics>,
    /// Audit entries for raised and cleared alarms.
    pub audit: AuditSink,
    /// Syslog for new critical alarms, when configured.
    pub syslog: Option<gridward_syslog::SyslogHandle>,
    /// The head-end's clock.
    pub clock: Clock,
}

impl std::fmt::Debug for DetectionContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DetectionContext").finish_non_exhaustive()
    }
}

/// Starts the detection thread with `config` (already validated).
///
/// # Errors
///
/// The thread could not be spawned.
pub fn start(
    config: DetectionConfig,
    ctx: DetectionContext,
) -> std::io::Result<(DetectionHandle, DetectionThread)> {
    let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let join = std::thread::Builder::new()
        .name("gridward-detect".into())
        .spawn(move || run(config, ctx, rx, &stopping))?;
    Ok((
        DetectionHandle {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        },
        DetectionThread { join, stop },
    ))
}

fn run(
    config: DetectionConfig,
    ctx: DetectionContext,
    rx: mpsc::Receiver<Signal>,
    stop: &AtomicBool,
) {
    let mut detector = Detector::new(config.clone(), topology(&config, ctx.store.as_ref()));
    refresh_gauge(&ctx);
    let mut last_tick = Instant::now();
    let mut last_topology = Instant::now();
    loop {
        if stop.load(Ordering::Acquire) {
            // What was queued before the stop is still decided.
            while let Ok(signal) = rx.try_recv() {
                let actions = detector.observe(&signal, (ctx.clock)());
                apply(&ctx, actions);
            }
            break;
        }
        let actions = match rx.recv_timeout(TICK) {
            Ok(signal) => detector.observe(&signal, (ctx.clock)()),
            Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut changed = apply(&ctx, actions);
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            changed |= apply(&ctx, detector.tick((ctx.clock)()));
        }
        if last_topology.elapsed() >= TOPOLOGY_REFRESH {
            last_topology = Instant::now();
            detector.set_topology(topology(&config, ctx.store.as_ref()));
        }
        if changed {
            refresh_gauge(&ctx);
        }
    }
    // The last time-driven decisions before stopping.
    if apply(&ctx, detector.tick((ctx.clock)())) {
        refresh_gauge(&ctx);
    }
}

/// Concentrators from the store, feeders from the configuration.
fn topology(config: &DetectionConfig, store: &dyn AlarmStore) -> Topology {
    let mut topology = Topology::from_config(config);
    match store.topology() {
        Ok(pairs) => {
            let mut current: Option<(gridward_core::MeterId, Vec<gridward_core::MeterId>)> = None;
            for (concentrator, meter) in pairs {
                match &mut current {
                    Some((c, meters)) if *c == concentrator => meters.push(meter),
                    _ => {
                        if let Some((c, meters)) = current.take() {
                            topology.set_concentrator(c, meters);
                        }
                        current = Some((concentrator, vec![meter]));
                    }
                }
            }
            if let Some((c, meters)) = current {
                topology.set_concentrator(c, meters);
            }
        }
        Err(e) => tracing::warn!(error = %e, "topology not read; detection keeps the last one"),
    }
    topology
}

/// Writes the actions; says whether any alarm changed.
fn apply(ctx: &DetectionContext, actions: Vec<AlarmAction>) -> bool {
    let mut changed = false;
    for action in actions {
        match action {
            AlarmAction::Raise(raise) => {
                let record = RaiseAlarm {
                    alarm_type: raise.alarm_type.code().to_owned(),
                    severity: raise.severity.code().to_owned(),
                    originator: raise.originator.code(),
                    at: raise.at,
                    summary: raise.summary.clone(),
                    evidence_json: gridward_detect::evidence_json(&raise.evidence),
                };
                match ctx.store.raise_alarm(&record) {
                    Ok(RaiseOutcome::New(alarm)) => {
                        changed = true;
                        ctx.metrics.record_alarm_raised(raise.alarm_type.code());
                        tracing::warn!(id = alarm.id, r#type = %alarm.alarm_type,
                            severity = %alarm.severity, originator = %alarm.originator,
                            "alarm: {}", alarm.summary);
                        ctx.audit.append(
                            gridward_audit::NewEntry::new(
                                raise.at,
                                gridward_audit::Actor::System,
                                "alarm.raise",
                                format!("alarm:{}", alarm.id),
                                gridward_audit::Outcome::Success,
                            )
                            .detail(format!(
                                "{} {} on {}: {}",
                                alarm.severity, alarm.alarm_type, alarm.originator, alarm.summary
                            )),
                        );
                        if alarm.severity == "critical"
                            && let Some(syslog) = &ctx.syslog
                        {
                            syslog.send(syslog_alarm(&alarm));
                        }
                    }
                    Ok(RaiseOutcome::Updated(alarm)) => {
                        // A repeat folded into the active alarm; a severity raised to critical
                        // is news for the SIEM.
                        changed = true;
                        tracing::debug!(id = alarm.id, count = alarm.count, "alarm repeated");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, r#type = raise.alarm_type.code(),
                            "alarm not stored: {}", raise.summary);
                    }
                }
            }
            AlarmAction::Clear(clear) => {
                match ctx.store.clear_active_alarm(
                    clear.alarm_type.code(),
                    &clear.originator.code(),
                    "detector",
                    clear.at,
                    &clear.reason,
                ) {
                    Ok(Some(alarm)) => {
                        changed = true;
                        ctx.audit.append(
                            gridward_audit::NewEntry::new(
                                clear.at,
                                gridward_audit::Actor::System,
                                "alarm.clear",
                                format!("alarm:{}", alarm.id),
                                gridward_audit::Outcome::Success,
                            )
                            .detail(format!(
                                "{} on {} cleared: {}",
                                alarm.alarm_type, alarm.originator, clear.reason
                            )),
                        );
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "alarm not cleared: {}", clear.reason),
                }
            }
        }
    }
    changed
}

fn refresh_gauge(ctx: &DetectionContext) {
    match ctx.store.active_alarm_counts() {
        Ok(counts) => ctx.metrics.set_active_alarms(&counts),
        Err(e) => tracing::warn!(error = %e, "active alarm counts not read"),
    }
}

/// A new critical alarm as a syslog message: MSGID `alarm`, the type, originator and id as
/// structured data, the summary as MSG.
pub fn syslog_alarm(alarm: &gridward_store::StoredAlarm) -> gridward_syslog::SyslogMessage {
    gridward_syslog::SyslogMessage::new(
        alarm.first_seen,
        gridward_syslog::Severity::Critical,
        "alarm".to_owned(),
        alarm.summary.clone(),
    )
    .with_param("alarm", alarm.id.to_string())
    .with_param("type", alarm.alarm_type.clone())
    .with_param("severity", alarm.severity.clone())
    .with_param("originator", alarm.originator.clone())
}

/// The detection signal of a security event (the user of a failed login is read from the
/// detail the API writes: `login as "NAME" refused: ...`).
pub fn security_signal(event: &gridward_store::SecurityEvent) -> Signal {
    let user = event
        .detail
        .strip_prefix("login as \"")
        .and_then(|rest| rest.split_once('"'))
        .map(|(name, _)| name.to_owned());
    Signal::Security {
        at: event.at,
        reason: event.reason.clone(),
        meter: event.meter_id.clone(),
        source: event.source.clone(),
        user,
        detail: event.detail.clone(),
    }
}

/// The detection signal of a stored message: readings, meter events and concentrator events
/// (acknowledgements of commands are not signals).
pub fn stored_signal(
    stored: &gridward_store::Accepted,
    document: &gridward_core::document::Document,
) -> Option<Signal> {
    use gridward_core::document::Document;
    match document {
        Document::Reading(r) => Some(Signal::Reading {
            meter: stored.meter_id.clone(),
            at: r.timestamp,
            energy_kwh: r.energy_kwh,
        }),
        Document::Event(e) => Some(Signal::MeterEvent {
            meter: stored.meter_id.clone(),
            at: e.timestamp,
            kind: e.kind,
        }),
        Document::ConcentratorEvent(e) => Some(Signal::ConcentratorEvent {
            concentrator: e.concentrator_id.clone(),
            at: e.timestamp,
            kind: e.kind,
            meters: e.meters.clone(),
        }),
        Document::CommandAck(_) => None,
    }
}
