//! The detection engine: [`Detector::observe`] and [`Detector::tick`].
//!
//! All state is in hash maps keyed by meter, group, source or user; `observe` touches only the
//! entries its signal names, `tick` only the pending watches (theft observations, revocation
//! silences) and, at most once per 15 simulated minutes, the meters whose register stopped.

use std::collections::{HashMap, HashSet, VecDeque};

use gridward_core::MeterId;
use gridward_core::document::EventKind;
use time::OffsetDateTime;

use crate::config::DetectionConfig;
use crate::model::{AlarmAction, AlarmType, Clear, Evidence, Originator, Raise, strip_port};
use crate::signal::{ConcentratorEventKind, Signal, Topology};

/// How often `tick` looks for stalled registers, seconds.
pub const STALL_CHECK_SECS: i64 = 900;
/// How many first events of a refusal burst go into the first Raise's evidence.
const BURST_FIRST: usize = 5;
/// Weight of the newest window in the fleet refusal baseline.
const FLEET_ALPHA: f64 = 0.2;
/// Reading gaps longer than this are not spread over the hourly buckets (unknown profile).
const MAX_SPREAD_SECS: i64 = 6 * 3600;
/// A register "advances" when it grows by more than this, kWh.
const ADVANCE_EPS: f64 = 1e-6;

fn ts(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn is_tamper(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::CoverOpened
            | EventKind::TerminalCoverOpened
            | EventKind::MagneticField
            | EventKind::ReverseEnergy
    )
}

/// Whether a security reason counts as a refusal for the intrusion detectors.
///
/// The ISSUE11 list (`bad_signature`, `replay`, `key_mismatch`, `malformed_envelope`,
/// `certificate_*`, `tls_handshake_failed`, `client_id_mismatch`, `topic_not_authorized`,
/// `relay_not_authorized`) and login failures (`login_*`), except `login_internal_error` (our
/// fault, not the client's) and `login_totp_required` (a normal step of a two-factor login).
pub fn is_refusal(reason: &str) -> bool {
    matches!(
        reason,
        "bad_signature"
            | "replay"
            | "key_mismatch"
            | "malformed_envelope"
            | "tls_handshake_failed"
            | "client_id_mismatch"
            | "topic_not_authorized"
            | "relay_not_authorized"
    ) || reason.starts_with("certificate_")
        || is_login_failure(reason)
}

/// Whether a security reason is a login failure (counted per user).
pub fn is_login_failure(reason: &str) -> bool {
    reason.starts_with("login_")
        && reason != "login_internal_error"
        && reason != "login_totp_required"
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    hour: i64,
    kwh: f32,
    secs: f32,
}

const EMPTY_BUCKET: Bucket = Bucket {
    hour: i64::MIN,
    kwh: 0.0,
    secs: 0.0,
};

#[derive(Debug, Default)]
struct MeterState {
    group: Option<Originator>,
    last_reading: Option<(i64, f64)>,
    last_advance: Option<i64>,
    /// Ring of hourly consumption, slot = hour mod len.
    buckets: Vec<Bucket>,
    power_failed_at: Option<i64>,
    power_failed_evidence: Option<Evidence>,
    power_alarm: bool,
    stalled_alarm: bool,
    plc_lost: bool,
    last_ip: Option<String>,
    takeovers: VecDeque<(i64, Evidence)>,
}

impl MeterState {
    fn bucket_sum(&self, hour: i64) -> Option<(f64, f64)> {
        if self.buckets.is_empty() {
            return None;
        }
        let b = self.buckets[hour.rem_euclid(self.buckets.len() as i64) as usize];
        (b.hour == hour).then_some((f64::from(b.kwh), f64::from(b.secs)))
    }

    fn add(&mut self, from: i64, to: i64, kwh: f64) {
        let len = self.buckets.len() as i64;
        if len == 0 || to <= from {
            return;
        }
        let span = (to - from) as f64;
        let mut t = from;
        while t < to {
            let hour = t.div_euclid(3600);
            let end = ((hour + 1) * 3600).min(to);
            let part = (end - t) as f64;
            let slot = &mut self.buckets[hour.rem_euclid(len) as usize];
            if slot.hour != hour {
                *slot = Bucket {
                    hour,
                    kwh: 0.0,
                    secs: 0.0,
                };
            }
            slot.kwh += (kwh * part / span) as f32;
            slot.secs += part as f32;
            t = end;
        }
    }
}

#[derive(Debug)]
struct TheftWatch {
    trigger_at: i64,
    trigger: Evidence,
    /// (kWh/h, how it was computed), or None when the meter has too little history.
    baseline: Option<(f64, String)>,
    start: Option<(i64, f64)>,
    last: Option<(i64, f64)>,
}

#[derive(Debug)]
struct RevocationWatch {
    since: i64,
    evidence: Evidence,
    alarmed: bool,
}

#[derive(Debug)]
struct Outage {
    /// Failed meter → restored?
    failed: HashMap<MeterId, bool>,
    restored: usize,
    concentrator_down: bool,
}

#[derive(Debug, Default)]
struct GroupState {
    recent: VecDeque<(i64, MeterId)>,
    active: Option<Outage>,
}

#[derive(Debug, Default)]
struct Window {
    events: VecDeque<(i64, Evidence)>,
    first: Vec<Evidence>,
    last_at: i64,
}

impl Window {
    /// Pushes an event; true when the window now holds at least `threshold` events.
    fn push(&mut self, t: i64, e: Evidence, window: i64, threshold: usize) -> bool {
        while let Some((front, _)) = self.events.front() {
            if t - *front >= window {
                self.events.pop_front();
            } else {
                break;
            }
        }
        if self.events.is_empty() {
            self.first.clear();
        }
        if self.first.len() < BURST_FIRST {
            self.first.push(e.clone());
        }
        self.events.push_back((t, e));
        while self.events.len() > threshold {
            self.events.pop_front();
        }
        self.last_at = t;
        self.events.len() >= threshold
    }
}

#[derive(Debug, Default)]
struct Fleet {
    per_second: VecDeque<(i64, usize)>,
    in_window: usize,
    first: Vec<Evidence>,
    baseline: f64,
    tumbling_start: Option<i64>,
    tumbling_count: usize,
}

/// Sizes of the detector's state, for memory tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateSizes {
    /// Meters with state.
    pub meters: usize,
    /// Hourly buckets held per meter (the same for all).
    pub buckets_per_meter: usize,
    /// Pending theft observations.
    pub theft_watches: usize,
    /// Pending revocation silences.
    pub revocation_watches: usize,
    /// Refusal windows (per meter, source and user).
    pub refusal_windows: usize,
    /// Events held in refusal windows.
    pub refusal_events: usize,
    /// Repeat rate-limit entries.
    pub rate_limit_entries: usize,
    /// Groups with outage state.
    pub groups: usize,
    /// Meters whose register did not advance with their latest reading.
    pub stall_candidates: usize,
}

/// The detection engine. Pure: signals and `now` in, [`AlarmAction`]s out.
#[derive(Debug)]
pub struct Detector {
    cfg: DetectionConfig,
    topo: Topology,
    members_seen: HashMap<Originator, Vec<MeterId>>,
    meters: HashMap<MeterId, MeterState>,
    groups: HashMap<Originator, GroupState>,
    theft: HashMap<MeterId, TheftWatch>,
    revocation: HashMap<MeterId, RevocationWatch>,
    stall_candidates: HashSet<MeterId>,
    meter_by_ip: HashMap<String, MeterId>,
    per_meter: HashMap<MeterId, Window>,
    per_source: HashMap<String, Window>,
    per_user: HashMap<String, Window>,
    fleet: Fleet,
    last_raise: HashMap<(AlarmType, Originator), i64>,
    last_stall_check: Option<i64>,
    last_prune: Option<i64>,
}

impl Detector {
    /// A detector with `config` (validate it first) over `topology`; the feeders of
    /// `config.feeder` are added to the topology.
    pub fn new(config: DetectionConfig, topology: Topology) -> Self {
        let mut d = Self {
            cfg: config,
            topo: Topology::new(),
            members_seen: HashMap::new(),
            meters: HashMap::new(),
            groups: HashMap::new(),
            theft: HashMap::new(),
            revocation: HashMap::new(),
            stall_candidates: HashSet::new(),
            meter_by_ip: HashMap::new(),
            per_meter: HashMap::new(),
            per_source: HashMap::new(),
            per_user: HashMap::new(),
            fleet: Fleet::default(),
            last_raise: HashMap::new(),
            last_stall_check: None,
            last_prune: None,
        };
        d.set_topology(topology);
        d
    }

    /// Replaces the topology (e.g. an operator moved meters between concentrators); the
    /// feeders of the configuration are kept. Outages in progress keep their meters.
    pub fn set_topology(&mut self, mut topology: Topology) {
        topology.add_config_feeders(&self.cfg);
        self.topo = topology;
        self.members_seen.clear();
        for (id, st) in &mut self.meters {
            st.group = self.topo.group_of(id).cloned();
            if let Some(g) = &st.group {
                self.members_seen
                    .entry(g.clone())
                    .or_default()
                    .push(id.clone());
            }
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &DetectionConfig {
        &self.cfg
    }

    /// The topology in use (with the configured feeders).
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// Sizes of the state held.
    pub fn state_sizes(&self) -> StateSizes {
        StateSizes {
            meters: self.meters.len(),
            buckets_per_meter: self.bucket_len(),
            theft_watches: self.theft.len(),
            revocation_watches: self.revocation.len(),
            refusal_windows: self.per_meter.len() + self.per_source.len() + self.per_user.len(),
            refusal_events: self
                .per_meter
                .values()
                .chain(self.per_source.values())
                .chain(self.per_user.values())
                .map(|w| w.events.len())
                .sum(),
            rate_limit_entries: self.last_raise.len(),
            groups: self.groups.len(),
            stall_candidates: self.stall_candidates.len(),
        }
    }

    fn bucket_len(&self) -> usize {
        (self.cfg.theft.baseline_days as usize + 1) * 24 + 1
    }

    fn meter(&mut self, id: &MeterId) -> &mut MeterState {
        let len = self.bucket_len();
        let topo = &self.topo;
        let seen = &mut self.members_seen;
        self.meters.entry(id.clone()).or_insert_with(|| {
            let group = topo.group_of(id).cloned();
            if let Some(g) = &group {
                seen.entry(g.clone()).or_default().push(id.clone());
            }
            MeterState {
                group,
                buckets: vec![EMPTY_BUCKET; len],
                ..MeterState::default()
            }
        })
    }

    /// Rate limit for repeats: true if a Raise of this key may go out now.
    fn may_repeat(&mut self, t: AlarmType, o: &Originator, now: i64) -> bool {
        let key = (t, o.clone());
        match self.last_raise.get(&key) {
            Some(last) if now - *last < self.cfg.intrusion.repeat_secs as i64 => false,
            _ => {
                self.last_raise.insert(key, now);
                true
            }
        }
    }

    /// Feeds one signal; returns the alarm actions it causes.
    pub fn observe(&mut self, signal: &Signal, now: OffsetDateTime) -> Vec<AlarmAction> {
        let mut out = Vec::new();
        if !self.cfg.enabled {
            return out;
        }
        match signal {
            Signal::MeterEvent { meter, at, kind } => {
                self.on_event(meter, *at, *kind, now, &mut out)
            }
            Signal::Reading {
                meter,
                at,
                energy_kwh,
            } => self.on_reading(meter, *at, *energy_kwh, now, &mut out),
            Signal::ConcentratorEvent {
                concentrator,
                at,
                kind,
                meters,
            } => self.on_concentrator(concentrator, *at, *kind, meters, now, &mut out),
            Signal::Security {
                at,
                reason,
                meter,
                source,
                user,
                detail,
            } => self.on_security(
                *at,
                reason,
                meter.as_ref(),
                source.as_deref(),
                user.as_deref(),
                detail,
                now,
                &mut out,
            ),
            Signal::Connected { meter, source, .. } => {
                if let Some(s) = source {
                    self.note_address(meter, s);
                }
            }
            Signal::Disconnected { .. } => {}
            Signal::SessionReplaced {
                meter,
                at,
                previous,
                current,
            } => self.on_session_replaced(meter, *at, previous, current, now, &mut out),
        }
        out
    }

    fn note_address(&mut self, meter: &MeterId, address: &str) {
        let ip = strip_port(address);
        let st = self.meter(meter);
        let old = st.last_ip.replace(ip.clone());
        if let Some(old) = old
            && old != ip
            && self.meter_by_ip.get(&old) == Some(meter)
        {
            self.meter_by_ip.remove(&old);
        }
        self.meter_by_ip.insert(ip, meter.clone());
    }

    /// A meter reported (reading or event) at `at`: ends a revocation silence.
    fn reported(
        &mut self,
        meter: &MeterId,
        at: i64,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        if let Some(w) = self.revocation.get(meter)
            && at > w.since
        {
            let alarmed = w.alarmed;
            self.revocation.remove(meter);
            if alarmed {
                out.push(AlarmAction::Clear(Clear {
                    alarm_type: AlarmType::SilentAfterRevocation,
                    originator: Originator::Meter(meter.clone()),
                    at: now,
                    reason: "the meter reports again".into(),
                }));
            }
        }
    }

    fn on_event(
        &mut self,
        meter: &MeterId,
        at: OffsetDateTime,
        kind: EventKind,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let t = ts(at);
        self.meter(meter);
        self.reported(meter, t, now, out);
        let ev = Evidence::new(at, format!("event:{}", kind.as_str())).meter(meter);
        if is_tamper(kind) {
            out.push(AlarmAction::Raise(Raise {
                alarm_type: AlarmType::Tamper,
                severity: AlarmType::Tamper.default_severity(),
                originator: Originator::Meter(meter.clone()),
                at: now,
                summary: format!("{} at meter {meter}", kind.as_str()),
                evidence: vec![ev.clone()],
            }));
            if !self.theft.contains_key(meter) {
                let baseline = self.baseline(meter, t);
                self.theft.insert(
                    meter.clone(),
                    TheftWatch {
                        trigger_at: t,
                        trigger: ev,
                        baseline,
                        start: None,
                        last: None,
                    },
                );
            }
            return;
        }
        match kind {
            EventKind::PowerFail => self.power_fail(meter, t, ev, now, out),
            EventKind::PowerRestore => self.power_restore(meter, t, "PowerRestore", now, out),
            _ => {}
        }
    }

    /// The meter's baseline consumption rate (kWh/h) for the observation window starting at `t`.
    fn baseline(&self, meter: &MeterId, t: i64) -> Option<(f64, String)> {
        let st = self.meters.get(meter)?;
        let tc = &self.cfg.theft;
        let min_secs = tc.min_baseline_secs as f64;
        let h0 = t.div_euclid(3600);
        let h1 = (t + tc.observe_secs as i64 + 3599).div_euclid(3600);
        let (mut kwh, mut secs, mut days) = (0.0, 0.0, 0u32);
        for d in 1..=i64::from(tc.baseline_days) {
            let mut any = false;
            for h in h0..h1 {
                if let Some((k, s)) = st.bucket_sum(h - 24 * d) {
                    kwh += k;
                    secs += s;
                    any = true;
                }
            }
            days += u32::from(any);
        }
        if secs >= min_secs && secs > 0.0 {
            return Some((
                kwh / secs * 3600.0,
                format!("same hours of day over the previous {days} day(s)"),
            ));
        }
        // Fallback: the mean rate over the history held before the trigger.
        let (mut kwh, mut secs) = (0.0, 0.0);
        for b in &st.buckets {
            if b.hour != i64::MIN && b.hour < h0 {
                kwh += f64::from(b.kwh);
                secs += f64::from(b.secs);
            }
        }
        if let Some(b) = st.bucket_sum(h0) {
            kwh += b.0;
            secs += b.1;
        }
        (secs >= min_secs && secs > 0.0).then(|| {
            (
                kwh / secs * 3600.0,
                format!(
                    "mean rate over {:.1} h of readings before the trigger",
                    secs / 3600.0
                ),
            )
        })
    }

    fn on_reading(
        &mut self,
        meter: &MeterId,
        at: OffsetDateTime,
        kwh: f64,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let t = ts(at);
        if !kwh.is_finite() {
            return;
        }
        self.reported(meter, t, now, out);
        let st = self.meter(meter);
        let failed_at = st.power_failed_at;
        let mut advanced = false;
        let mut cleared_stall = false;
        match st.last_reading {
            Some((t0, k0)) if t > t0 => {
                let delta = kwh - k0;
                if delta >= 0.0 && t - t0 <= MAX_SPREAD_SECS {
                    st.add(t0, t, delta);
                }
                if delta > ADVANCE_EPS {
                    advanced = true;
                }
                st.last_reading = Some((t, kwh));
            }
            Some(_) => {} // older or duplicate reading: history already past it
            None => {
                st.last_reading = Some((t, kwh));
                st.last_advance = Some(t);
            }
        }
        if advanced {
            st.last_advance = Some(t);
            if st.stalled_alarm {
                st.stalled_alarm = false;
                cleared_stall = true;
            }
        }
        let current = st.last_reading == Some((t, kwh));
        if current {
            if advanced {
                self.stall_candidates.remove(meter);
            } else if self.meters.get(meter).and_then(|s| s.last_advance) != Some(t) {
                self.stall_candidates.insert(meter.clone());
            }
        }
        if cleared_stall {
            out.push(AlarmAction::Clear(Clear {
                alarm_type: AlarmType::RegisterStalled,
                originator: Originator::Meter(meter.clone()),
                at: now,
                reason: "the register advances again".into(),
            }));
        }
        if let Some(f) = failed_at
            && t > f
        {
            self.power_restore(meter, t, "reading after the power failure", now, out);
        }
        if let Some(w) = self.theft.get_mut(meter)
            && t >= w.trigger_at
        {
            let end = w.trigger_at + self.cfg.theft.observe_secs as i64;
            if t <= end {
                if w.start.is_none() {
                    w.start = Some((t, kwh));
                }
                w.last = Some((t, kwh));
            } else {
                self.finish_theft(meter, now, out);
            }
        }
    }

    fn finish_theft(&mut self, meter: &MeterId, now: OffsetDateTime, out: &mut Vec<AlarmAction>) {
        let Some(w) = self.theft.remove(meter) else {
            return;
        };
        let tc = &self.cfg.theft;
        let (Some((base, how)), Some((t0, k0)), Some((t1, k1))) = (w.baseline, w.start, w.last)
        else {
            return;
        };
        if t1 - t0 < tc.min_observed_secs as i64 {
            return;
        }
        let observed = (k1 - k0) / ((t1 - t0) as f64 / 3600.0);
        if base > 0.0 && observed < tc.ratio * base {
            let window = format!("{} .. {}", fmt_ts(t0), fmt_ts(t1));
            out.push(AlarmAction::Raise(Raise {
                alarm_type: AlarmType::TheftSuspected,
                severity: AlarmType::TheftSuspected.default_severity(),
                originator: Originator::Meter(meter.clone()),
                at: now,
                summary: format!(
                    "meter {meter}: {observed:.3} kWh/h after {} against a baseline of {base:.3} kWh/h ({:.0} %)",
                    w.trigger.what,
                    observed / base * 100.0
                ),
                evidence: vec![
                    w.trigger,
                    Evidence::new(at_of(t0), "baseline")
                        .meter(meter)
                        .detail(format!("{base:.4} kWh/h, {how}")),
                    Evidence::new(at_of(t1), "observed")
                        .meter(meter)
                        .detail(format!(
                            "{observed:.4} kWh/h over {window} ({:.1} h); threshold {:.2} x baseline",
                            (t1 - t0) as f64 / 3600.0,
                            tc.ratio
                        )),
                ],
            }));
        }
    }

    fn power_fail(
        &mut self,
        meter: &MeterId,
        t: i64,
        ev: Evidence,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let st = self.meter(meter);
        st.power_failed_at = Some(t);
        st.power_failed_evidence = Some(ev.clone());
        let Some(group) = st.group.clone() else {
            self.raise_power_failure(meter, ev, now, out);
            return;
        };
        let window = self.cfg.outage.window_secs as i64;
        let min = self.cfg.outage.min_meters;
        let gs = self.groups.entry(group.clone()).or_default();
        if let Some(o) = &mut gs.active {
            match o.failed.insert(meter.clone(), false) {
                Some(true) => o.restored -= 1,
                Some(false) => return, // repeated PowerFail: already counted
                None => {}
            }
            let n = o.failed.len();
            out.push(AlarmAction::Raise(Raise {
                alarm_type: AlarmType::Outage,
                severity: AlarmType::Outage.default_severity(),
                originator: group.clone(),
                at: now,
                summary: format!("outage of {group}: {n} meters without supply"),
                evidence: vec![ev],
            }));
            return;
        }
        gs.recent.retain(|(rt, m)| t - *rt < window && m != meter);
        gs.recent.push_back((t, meter.clone()));
        let meters = &self.meters;
        gs.recent
            .retain(|(_, m)| meters.get(m).is_some_and(|s| s.power_failed_at.is_some()));
        if gs.recent.len() < min {
            self.raise_power_failure(meter, ev, now, out);
            return;
        }
        let folded: Vec<MeterId> = gs.recent.drain(..).map(|(_, m)| m).collect();
        self.start_outage(&group, folded, None, now, out);
    }

    fn start_outage(
        &mut self,
        group: &Originator,
        folded: Vec<MeterId>,
        concentrator_ev: Option<Evidence>,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let mut evidence = Vec::new();
        let concentrator_down = concentrator_ev.is_some();
        if let Some(e) = concentrator_ev {
            evidence.push(e);
        }
        let mut failed = HashMap::new();
        for m in &folded {
            if let Some(st) = self.meters.get_mut(m) {
                if let Some(e) = &st.power_failed_evidence {
                    evidence.push(e.clone());
                }
                if st.power_alarm {
                    st.power_alarm = false;
                    out.push(AlarmAction::Clear(Clear {
                        alarm_type: AlarmType::PowerFailure,
                        originator: Originator::Meter(m.clone()),
                        at: now,
                        reason: format!("part of outage {group}"),
                    }));
                }
            }
            failed.insert(m.clone(), false);
        }
        let n = failed.len();
        let summary = if concentrator_down {
            format!(
                "outage of {group}: the concentrator lost supply ({n} meters reported PowerFail)"
            )
        } else {
            format!("outage of {group}: {n} meters without supply")
        };
        self.groups.entry(group.clone()).or_default().active = Some(Outage {
            failed,
            restored: 0,
            concentrator_down,
        });
        out.push(AlarmAction::Raise(Raise {
            alarm_type: AlarmType::Outage,
            severity: AlarmType::Outage.default_severity(),
            originator: group.clone(),
            at: now,
            summary,
            evidence,
        }));
    }

    fn raise_power_failure(
        &mut self,
        meter: &MeterId,
        ev: Evidence,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        self.meter(meter).power_alarm = true;
        out.push(AlarmAction::Raise(Raise {
            alarm_type: AlarmType::PowerFailure,
            severity: AlarmType::PowerFailure.default_severity(),
            originator: Originator::Meter(meter.clone()),
            at: now,
            summary: format!("meter {meter} lost supply"),
            evidence: vec![ev],
        }));
    }

    fn power_restore(
        &mut self,
        meter: &MeterId,
        _t: i64,
        why: &str,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let st = self.meter(meter);
        st.power_failed_at = None;
        st.power_failed_evidence = None;
        let had_alarm = std::mem::take(&mut st.power_alarm);
        let group = st.group.clone();
        if had_alarm {
            out.push(AlarmAction::Clear(Clear {
                alarm_type: AlarmType::PowerFailure,
                originator: Originator::Meter(meter.clone()),
                at: now,
                reason: why.to_owned(),
            }));
        }
        if let Some(g) = group
            && let Some(gs) = self.groups.get_mut(&g)
            && let Some(o) = &mut gs.active
            && let Some(r) = o.failed.get_mut(meter)
            && !*r
        {
            *r = true;
            o.restored += 1;
            self.maybe_clear_outage(&g, now, out);
        }
    }

    fn maybe_clear_outage(
        &mut self,
        group: &Originator,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let share = self.cfg.outage.clear_share;
        let Some(gs) = self.groups.get_mut(group) else {
            return;
        };
        let Some(o) = &gs.active else {
            return;
        };
        let n = o.failed.len();
        let need = (share * n as f64).ceil() as usize;
        if o.concentrator_down || o.restored < need {
            return;
        }
        let Some(o) = gs.active.take() else {
            return;
        };
        out.push(AlarmAction::Clear(Clear {
            alarm_type: AlarmType::Outage,
            originator: group.clone(),
            at: now,
            reason: format!("{} of {n} failed meters restored", o.restored),
        }));
        // Meters still without supply keep a per-meter alarm.
        let mut still: Vec<MeterId> = o
            .failed
            .into_iter()
            .filter_map(|(m, r)| (!r).then_some(m))
            .collect();
        still.sort();
        for m in still {
            let ev = self
                .meters
                .get(&m)
                .and_then(|s| s.power_failed_evidence.clone());
            if let Some(ev) = ev {
                self.raise_power_failure(&m, ev, now, out);
            }
        }
    }

    fn on_concentrator(
        &mut self,
        c: &MeterId,
        at: OffsetDateTime,
        kind: ConcentratorEventKind,
        meters: &[MeterId],
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let group = Originator::Concentrator(c.clone());
        let ev = Evidence::new(at, format!("concentrator:{}", kind.as_str())).meter(c);
        match kind {
            ConcentratorEventKind::PowerFail => {
                let gs = self.groups.entry(group.clone()).or_default();
                if let Some(o) = &mut gs.active {
                    o.concentrator_down = true;
                    out.push(AlarmAction::Raise(Raise {
                        alarm_type: AlarmType::Outage,
                        severity: AlarmType::Outage.default_severity(),
                        originator: group,
                        at: now,
                        summary: format!(
                            "outage of concentrator:{c}: the concentrator lost supply"
                        ),
                        evidence: vec![ev],
                    }));
                    return;
                }
                let mut folded: Vec<MeterId> = gs.recent.drain(..).map(|(_, m)| m).collect();
                // Every member with a per-meter power_failure alarm is folded in too.
                for m in self.topo.members(&group) {
                    if self
                        .meters
                        .get(m)
                        .is_some_and(|s| s.power_failed_at.is_some())
                        && !folded.contains(m)
                    {
                        folded.push(m.clone());
                    }
                }
                self.start_outage(&group, folded, Some(ev), now, out);
            }
            ConcentratorEventKind::PowerRestore => {
                if let Some(o) = self.groups.get_mut(&group).and_then(|g| g.active.as_mut()) {
                    o.concentrator_down = false;
                    self.maybe_clear_outage(&group, now, out);
                }
            }
            ConcentratorEventKind::MeterLost => {
                for m in meters {
                    let st = self.meter(m);
                    st.plc_lost = true;
                    out.push(AlarmAction::Raise(Raise {
                        alarm_type: AlarmType::PlcMeterLost,
                        severity: AlarmType::PlcMeterLost.default_severity(),
                        originator: Originator::Meter(m.clone()),
                        at: now,
                        summary: format!("concentrator {c} lost PLC meter {m}"),
                        evidence: vec![ev.clone().detail(format!("meter {m}"))],
                    }));
                }
            }
            ConcentratorEventKind::MeterFound => {
                for m in meters {
                    if let Some(st) = self.meters.get_mut(m)
                        && std::mem::take(&mut st.plc_lost)
                    {
                        out.push(AlarmAction::Clear(Clear {
                            alarm_type: AlarmType::PlcMeterLost,
                            originator: Originator::Meter(m.clone()),
                            at: now,
                            reason: format!("concentrator {c} found the meter again"),
                        }));
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_security(
        &mut self,
        at: OffsetDateTime,
        reason: &str,
        meter: Option<&MeterId>,
        source: Option<&str>,
        user: Option<&str>,
        detail: &str,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let t = ts(at);
        let n = ts(now);
        let mut ev = Evidence::new(at, format!("security:{reason}"))
            .source(source)
            .detail(detail);
        ev.meter = meter.cloned();
        if let Some(u) = user {
            ev.detail = if detail.is_empty() {
                format!("user {u}")
            } else {
                format!("user {u}: {detail}")
            };
        }
        if reason == "certificate_revoked" {
            let who = meter
                .cloned()
                .or_else(|| source.and_then(|s| self.meter_by_ip.get(&strip_port(s)).cloned()));
            if let Some(m) = who {
                self.revocation.entry(m).or_insert_with(|| RevocationWatch {
                    since: t,
                    evidence: ev.clone(),
                    alarmed: false,
                });
            }
        }
        if reason == "relay_not_authorized"
            && let Some(c) = meter
        {
            let o = Originator::Concentrator(c.clone());
            if self.may_repeat(AlarmType::RelayRefused, &o, n) {
                out.push(AlarmAction::Raise(Raise {
                    alarm_type: AlarmType::RelayRefused,
                    severity: AlarmType::RelayRefused.default_severity(),
                    originator: o,
                    at: now,
                    summary: format!("concentrator {c}: relay refused ({detail})"),
                    evidence: vec![ev.clone()],
                }));
            }
        }
        if !is_refusal(reason) {
            return;
        }
        let ic = self.cfg.intrusion.clone();
        let window = ic.window_secs as i64;
        if let Some(m) = meter
            && reason != "relay_not_authorized"
        {
            let w = self.per_meter.entry(m.clone()).or_default();
            if w.push(t, ev.clone(), window, ic.per_meter) {
                let burst = burst_evidence(w);
                self.raise_burst(Originator::Meter(m.clone()), burst, ic.per_meter, now, out);
            }
        }
        if let Some(s) = source {
            let ip = strip_port(s);
            let w = self.per_source.entry(ip.clone()).or_default();
            if w.push(t, ev.clone(), window, ic.per_source) {
                let burst = burst_evidence(w);
                self.raise_burst(Originator::Source(ip), burst, ic.per_source, now, out);
            }
        }
        if let Some(u) = user
            && is_login_failure(reason)
        {
            let w = self.per_user.entry(u.to_owned()).or_default();
            if w.push(t, ev.clone(), window, ic.per_user) {
                let burst = burst_evidence(w);
                self.raise_burst(Originator::User(u.to_owned()), burst, ic.per_user, now, out);
            }
        }
        self.fleet_refusal(t, ev, now, out);
    }

    fn raise_burst(
        &mut self,
        o: Originator,
        evidence: Vec<Evidence>,
        threshold: usize,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let n = ts(now);
        if !self.may_repeat(AlarmType::RefusalBurst, &o, n) {
            return;
        }
        let window = self.cfg.intrusion.window_secs;
        out.push(AlarmAction::Raise(Raise {
            alarm_type: AlarmType::RefusalBurst,
            severity: AlarmType::RefusalBurst.default_severity(),
            summary: format!("{o}: at least {threshold} refusals within {window} s"),
            originator: o,
            at: now,
            evidence,
        }));
    }

    fn fleet_threshold(&self) -> usize {
        let ic = &self.cfg.intrusion;
        let scaled = (ic.fleet_factor * self.fleet.baseline).ceil();
        ic.fleet_min.max(if scaled.is_finite() {
            scaled as usize
        } else {
            usize::MAX
        })
    }

    /// Closes the tumbling windows that ended by `t`, updating the fleet baseline with each
    /// (windows at or above the threshold are not learned from).
    fn roll_fleet(&mut self, t: i64) {
        let window = self.cfg.intrusion.window_secs as i64;
        let start = *self.fleet.tumbling_start.get_or_insert(t);
        if t < start + window {
            return;
        }
        let elapsed = ((t - start) / window).min(10_000);
        for i in 0..elapsed {
            let count = if i == 0 { self.fleet.tumbling_count } else { 0 };
            if count < self.fleet_threshold() {
                self.fleet.baseline =
                    FLEET_ALPHA * count as f64 + (1.0 - FLEET_ALPHA) * self.fleet.baseline;
            }
        }
        self.fleet.tumbling_count = 0;
        self.fleet.tumbling_start = Some(start + ((t - start) / window) * window);
    }

    fn fleet_refusal(
        &mut self,
        t: i64,
        ev: Evidence,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        self.roll_fleet(t);
        let window = self.cfg.intrusion.window_secs as i64;
        let f = &mut self.fleet;
        f.tumbling_count += 1;
        while let Some(&(s, c)) = f.per_second.front() {
            if t - s >= window {
                f.per_second.pop_front();
                f.in_window -= c;
            } else {
                break;
            }
        }
        if f.in_window == 0 {
            f.first.clear();
        }
        if f.first.len() < BURST_FIRST {
            f.first.push(ev.clone());
        }
        match f.per_second.back_mut() {
            Some((s, c)) if *s == t => *c += 1,
            _ => f.per_second.push_back((t, 1)),
        }
        f.in_window += 1;
        let count = f.in_window;
        let threshold = self.fleet_threshold();
        if count >= threshold
            && self.may_repeat(AlarmType::RefusalBurstFleet, &Originator::Fleet, ts(now))
        {
            let mut evidence = self.fleet.first.clone();
            evidence.push(ev);
            out.push(AlarmAction::Raise(Raise {
                alarm_type: AlarmType::RefusalBurstFleet,
                severity: AlarmType::RefusalBurstFleet.default_severity(),
                originator: Originator::Fleet,
                at: now,
                summary: format!(
                    "{count} refusals fleet-wide within {window} s (threshold {threshold}, baseline {:.1} per window)",
                    self.fleet.baseline
                ),
                evidence,
            }));
        }
    }

    fn on_session_replaced(
        &mut self,
        meter: &MeterId,
        at: OffsetDateTime,
        previous: &str,
        current: &str,
        now: OffsetDateTime,
        out: &mut Vec<AlarmAction>,
    ) {
        let t = ts(at);
        self.note_address(meter, current);
        let window = self.cfg.intrusion.clone_window_secs as i64;
        let need = self.cfg.intrusion.clone_takeovers;
        let st = self.meter(meter);
        while let Some((front, _)) = st.takeovers.front() {
            if t - *front >= window {
                st.takeovers.pop_front();
            } else {
                break;
            }
        }
        if strip_port(previous) == strip_port(current) {
            return; // the same device reconnecting (new port): not a clone
        }
        st.takeovers.push_back((
            t,
            Evidence::new(at, "session_replaced")
                .meter(meter)
                .source(Some(current))
                .detail(format!("{previous} replaced by {current}")),
        ));
        while st.takeovers.len() > need.max(BURST_FIRST) {
            st.takeovers.pop_front();
        }
        if st.takeovers.len() < need {
            return;
        }
        let evidence: Vec<Evidence> = st.takeovers.iter().map(|(_, e)| e.clone()).collect();
        let mut addrs: Vec<String> = evidence
            .iter()
            .filter_map(|e| e.source.as_deref().map(strip_port))
            .collect();
        addrs.sort();
        addrs.dedup();
        let o = Originator::Meter(meter.clone());
        if self.may_repeat(AlarmType::ClonedMeter, &o, ts(now)) {
            out.push(AlarmAction::Raise(Raise {
                alarm_type: AlarmType::ClonedMeter,
                severity: AlarmType::ClonedMeter.default_severity(),
                originator: o,
                at: now,
                summary: format!(
                    "meter {meter}: {} session takeovers within {window} s from {}",
                    evidence.len(),
                    addrs.join(", ")
                ),
                evidence,
            }));
        }
    }

    /// Time-driven decisions: theft observations that ended, silences after revocation, the
    /// fleet refusal baseline, stalled registers (at most every [`STALL_CHECK_SECS`]) and
    /// pruning of idle windows. Call it regularly (e.g. every minute).
    pub fn tick(&mut self, now: OffsetDateTime) -> Vec<AlarmAction> {
        let mut out = Vec::new();
        if !self.cfg.enabled {
            return out;
        }
        let n = ts(now);
        // Theft observations whose window has closed.
        let obs = self.cfg.theft.observe_secs as i64;
        let mut due: Vec<MeterId> = self
            .theft
            .iter()
            .filter(|(_, w)| n >= w.trigger_at + obs)
            .map(|(m, _)| m.clone())
            .collect();
        due.sort();
        for m in due {
            self.finish_theft(&m, now, &mut out);
        }
        // Silence after a revocation attempt.
        let silence = self.cfg.intrusion.silence_secs as i64;
        let mut silent: Vec<MeterId> = self
            .revocation
            .iter()
            .filter(|(_, w)| !w.alarmed && n - w.since >= silence)
            .map(|(m, _)| m.clone())
            .collect();
        silent.sort();
        for m in silent {
            if let Some(w) = self.revocation.get_mut(&m) {
                w.alarmed = true;
                out.push(AlarmAction::Raise(Raise {
                    alarm_type: AlarmType::SilentAfterRevocation,
                    severity: AlarmType::SilentAfterRevocation.default_severity(),
                    originator: Originator::Meter(m.clone()),
                    at: now,
                    summary: format!(
                        "meter {m} silent for {} s after a certificate_revoked attempt",
                        n - w.since
                    ),
                    evidence: vec![w.evidence.clone()],
                }));
            }
        }
        self.roll_fleet(n);
        if self
            .last_stall_check
            .is_none_or(|l| n - l >= STALL_CHECK_SECS)
        {
            self.last_stall_check = Some(n);
            self.check_stalls(now, &mut out);
        }
        if self.last_prune.is_none_or(|l| n - l >= 60) {
            self.last_prune = Some(n);
            self.prune(n);
        }
        out
    }

    fn prune(&mut self, n: i64) {
        let window = self.cfg.intrusion.window_secs as i64;
        self.per_meter.retain(|_, w| n - w.last_at < window);
        self.per_source.retain(|_, w| n - w.last_at < window);
        self.per_user.retain(|_, w| n - w.last_at < window);
        let repeat = self.cfg.intrusion.repeat_secs as i64;
        self.last_raise.retain(|_, t| n - *t < repeat);
        let owindow = self.cfg.outage.window_secs as i64;
        self.groups.retain(|_, g| {
            g.recent.retain(|(t, _)| n - *t < owindow);
            g.active.is_some() || !g.recent.is_empty()
        });
    }

    fn check_stalls(&mut self, now: OffsetDateTime, out: &mut Vec<AlarmAction>) {
        let n = ts(now);
        let tc = &self.cfg.theft;
        let stall = tc.stall_secs as i64;
        let mut cands: Vec<&MeterId> = self.stall_candidates.iter().collect();
        cands.sort();
        let mut raise = Vec::new();
        for m in cands {
            let Some(st) = self.meters.get(m) else {
                continue;
            };
            let (Some((last_t, _)), Some(adv)) = (st.last_reading, st.last_advance) else {
                continue;
            };
            if st.stalled_alarm || last_t - adv < stall || n - last_t > 3600 {
                continue;
            }
            let Some(group) = &st.group else {
                continue;
            };
            // Whole hours inside the stall period.
            let h0 = (adv + 3599).div_euclid(3600);
            let h1 = last_t.div_euclid(3600);
            if h1 <= h0 {
                continue;
            }
            let span = ((h1 - h0) * 3600) as f64;
            let mut advances: Vec<f64> = Vec::new();
            for other in self
                .members_seen
                .get(group)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                if other == m {
                    continue;
                }
                let Some(os) = self.meters.get(other) else {
                    continue;
                };
                let (mut k, mut s) = (0.0, 0.0);
                for h in h0..h1 {
                    if let Some((bk, bs)) = os.bucket_sum(h) {
                        k += bk;
                        s += bs;
                    }
                }
                if s >= span * 0.5 {
                    advances.push(k);
                }
            }
            if advances.len() < 3 {
                continue;
            }
            advances.sort_by(f64::total_cmp);
            let mid = advances.len() / 2;
            let median = if advances.len().is_multiple_of(2) {
                (advances[mid - 1] + advances[mid]) / 2.0
            } else {
                advances[mid]
            };
            if median > tc.stall_min_neighbour_kwh {
                raise.push((
                    m.clone(),
                    adv,
                    last_t,
                    median,
                    advances.len(),
                    group.clone(),
                ));
            }
        }
        for (m, adv, last_t, median, k, group) in raise {
            if let Some(st) = self.meters.get_mut(&m) {
                st.stalled_alarm = true;
            }
            out.push(AlarmAction::Raise(Raise {
                alarm_type: AlarmType::RegisterStalled,
                severity: AlarmType::RegisterStalled.default_severity(),
                originator: Originator::Meter(m.clone()),
                at: now,
                summary: format!(
                    "meter {m}: register unchanged for {:.1} h while the median of {k} neighbours on {group} consumed {median:.2} kWh",
                    (last_t - adv) as f64 / 3600.0
                ),
                evidence: vec![
                    Evidence::new(at_of(adv), "reading")
                        .meter(&m)
                        .detail("last reading that advanced the register"),
                    Evidence::new(at_of(last_t), "reading")
                        .meter(&m)
                        .detail("latest reading, register unchanged"),
                    Evidence::new(now, "neighbours")
                        .detail(format!("median {median:.3} kWh over {k} meters of {group}")),
                ],
            }));
        }
    }
}

fn burst_evidence(w: &Window) -> Vec<Evidence> {
    let mut e = w.first.clone();
    if let Some((_, last)) = w.events.back()
        && e.last() != Some(last)
    {
        e.push(last.clone());
    }
    e
}

fn at_of(t: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn fmt_ts(t: i64) -> String {
    at_of(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Severity;
    use time::Duration;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-12-01 00:00 UTC);

    fn m(s: &str) -> MeterId {
        MeterId::new(s).unwrap()
    }

    fn t(secs: i64) -> OffsetDateTime {
        T0 + Duration::seconds(secs)
    }

    fn ev(meter: &str, secs: i64, kind: EventKind) -> Signal {
        Signal::MeterEvent {
            meter: m(meter),
            at: t(secs),
            kind,
        }
    }

    fn reading(meter: &str, secs: i64, kwh: f64) -> Signal {
        Signal::Reading {
            meter: m(meter),
            at: t(secs),
            energy_kwh: kwh,
        }
    }

    fn sec(
        reason: &str,
        meter: Option<&str>,
        source: Option<&str>,
        user: Option<&str>,
        secs: i64,
    ) -> Signal {
        Signal::Security {
            at: t(secs),
            reason: reason.into(),
            meter: meter.map(m),
            source: source.map(str::to_owned),
            user: user.map(str::to_owned),
            detail: String::new(),
        }
    }

    fn feed(d: &mut Detector, s: &Signal) -> Vec<AlarmAction> {
        d.observe(s, s.at())
    }

    fn raises(a: &[AlarmAction]) -> Vec<(AlarmType, String)> {
        a.iter()
            .filter_map(AlarmAction::as_raise)
            .map(|r| (r.alarm_type, r.originator.code()))
            .collect()
    }

    fn clears(a: &[AlarmAction]) -> Vec<(AlarmType, String)> {
        a.iter()
            .filter_map(|a| match a {
                AlarmAction::Clear(c) => Some((c.alarm_type, c.originator.code())),
                AlarmAction::Raise(_) => None,
            })
            .collect()
    }

    fn feeder_topology(name: &str, n: usize) -> Topology {
        let mut topo = Topology::new();
        topo.add_feeder(name, (0..n).map(|i| m(&format!("m{i}"))));
        topo
    }

    fn det(topo: Topology) -> Detector {
        Detector::new(DetectionConfig::default(), topo)
    }

    #[test]
    fn tamper_raises_at_once_for_every_tamper_kind() {
        let mut d = det(Topology::new());
        for kind in [
            EventKind::CoverOpened,
            EventKind::TerminalCoverOpened,
            EventKind::MagneticField,
            EventKind::ReverseEnergy,
        ] {
            let a = feed(&mut d, &ev("m1", 10, kind));
            assert_eq!(raises(&a), vec![(AlarmType::Tamper, "meter:m1".into())]);
            let r = a[0].as_raise().unwrap();
            assert_eq!(r.severity, Severity::Major);
            assert_eq!(r.at, t(10));
            assert_eq!(r.evidence[0].what, format!("event:{}", kind.as_str()));
        }
        assert!(feed(&mut d, &ev("m1", 20, EventKind::PowerRestore)).is_empty());
    }

    #[test]
    fn single_power_failure_is_minor_and_restore_clears() {
        let mut d = det(feeder_topology("f1", 10));
        let a = feed(&mut d, &ev("m1", 0, EventKind::PowerFail));
        assert_eq!(
            raises(&a),
            vec![(AlarmType::PowerFailure, "meter:m1".into())]
        );
        assert_eq!(a[0].as_raise().unwrap().severity, Severity::Minor);
        let a = feed(&mut d, &ev("m1", 60, EventKind::PowerRestore));
        assert_eq!(
            clears(&a),
            vec![(AlarmType::PowerFailure, "meter:m1".into())]
        );
        // A meter on no feeder: the same.
        let a = feed(&mut d, &ev("x1", 0, EventKind::PowerFail));
        assert_eq!(
            raises(&a),
            vec![(AlarmType::PowerFailure, "meter:x1".into())]
        );
        // A reading after the failure counts as restored.
        let a = feed(&mut d, &reading("x1", 900, 1.0));
        assert_eq!(
            clears(&a),
            vec![(AlarmType::PowerFailure, "meter:x1".into())]
        );
    }

    #[test]
    fn outage_folds_per_meter_alarms_and_clears_when_all_restore() {
        let mut d = det(feeder_topology("f1", 10));
        assert_eq!(
            raises(&feed(&mut d, &ev("m1", 0, EventKind::PowerFail))).len(),
            1
        );
        assert_eq!(
            raises(&feed(&mut d, &ev("m2", 30, EventKind::PowerFail))).len(),
            1
        );
        let a = feed(&mut d, &ev("m3", 60, EventKind::PowerFail));
        assert_eq!(raises(&a), vec![(AlarmType::Outage, "feeder:f1".into())]);
        let mut c = clears(&a);
        c.sort();
        assert_eq!(
            c,
            vec![
                (AlarmType::PowerFailure, "meter:m1".into()),
                (AlarmType::PowerFailure, "meter:m2".into())
            ]
        );
        let r = a.iter().find_map(AlarmAction::as_raise).unwrap();
        assert_eq!(r.severity, Severity::Critical);
        assert_eq!(r.evidence.len(), 3);
        // A later failure updates the outage, no per-meter alarm.
        let a = feed(&mut d, &ev("m4", 200, EventKind::PowerFail));
        assert_eq!(raises(&a), vec![(AlarmType::Outage, "feeder:f1".into())]);
        for (i, s) in [(1, 7200), (2, 7201), (3, 7202)] {
            let a = feed(&mut d, &ev(&format!("m{i}"), s, EventKind::PowerRestore));
            assert!(a.is_empty(), "{a:?}");
        }
        // The last one restores by a reading.
        let a = feed(&mut d, &reading("m4", 7300, 5.0));
        assert_eq!(clears(&a), vec![(AlarmType::Outage, "feeder:f1".into())]);
    }

    #[test]
    fn failures_spread_wider_than_the_window_are_not_an_outage() {
        let mut d = det(feeder_topology("f1", 10));
        for (i, s) in [(1, 0), (2, 100), (3, 250)] {
            let a = feed(&mut d, &ev(&format!("m{i}"), s, EventKind::PowerFail));
            assert_eq!(
                raises(&a),
                vec![(AlarmType::PowerFailure, format!("meter:m{i}"))]
            );
        }
        // Restored meters do not count either.
        let mut d = det(feeder_topology("f1", 10));
        feed(&mut d, &ev("m1", 0, EventKind::PowerFail));
        feed(&mut d, &ev("m1", 5, EventKind::PowerRestore));
        feed(&mut d, &ev("m2", 10, EventKind::PowerFail));
        let a = feed(&mut d, &ev("m3", 20, EventKind::PowerFail));
        assert_eq!(
            raises(&a),
            vec![(AlarmType::PowerFailure, "meter:m3".into())]
        );
    }

    #[test]
    fn clear_share_leaves_the_rest_with_per_meter_alarms() {
        let mut cfg = DetectionConfig::default();
        cfg.outage.clear_share = 0.5;
        let mut d = Detector::new(cfg, feeder_topology("f1", 10));
        for i in 0..4 {
            feed(&mut d, &ev(&format!("m{i}"), i, EventKind::PowerFail));
        }
        assert!(feed(&mut d, &ev("m0", 100, EventKind::PowerRestore)).is_empty());
        let a = feed(&mut d, &ev("m1", 101, EventKind::PowerRestore));
        assert_eq!(clears(&a), vec![(AlarmType::Outage, "feeder:f1".into())]);
        assert_eq!(
            raises(&a),
            vec![
                (AlarmType::PowerFailure, "meter:m2".into()),
                (AlarmType::PowerFailure, "meter:m3".into())
            ]
        );
    }

    #[test]
    fn concentrator_power_fail_is_an_outage_at_once() {
        let mut topo = Topology::new();
        topo.set_concentrator(m("dc-1"), [m("p1"), m("p2")]);
        let mut d = det(topo);
        feed(&mut d, &ev("p1", 0, EventKind::PowerFail));
        let s = Signal::ConcentratorEvent {
            concentrator: m("dc-1"),
            at: t(5),
            kind: ConcentratorEventKind::PowerFail,
            meters: vec![],
        };
        let a = feed(&mut d, &s);
        assert_eq!(
            raises(&a),
            vec![(AlarmType::Outage, "concentrator:dc-1".into())]
        );
        assert_eq!(
            clears(&a),
            vec![(AlarmType::PowerFailure, "meter:p1".into())]
        );
        let restore = Signal::ConcentratorEvent {
            concentrator: m("dc-1"),
            at: t(600),
            kind: ConcentratorEventKind::PowerRestore,
            meters: vec![],
        };
        assert!(feed(&mut d, &restore).is_empty(), "p1 is still down");
        let a = feed(&mut d, &ev("p1", 610, EventKind::PowerRestore));
        assert_eq!(
            clears(&a),
            vec![(AlarmType::Outage, "concentrator:dc-1".into())]
        );
    }

    #[test]
    fn plc_meter_lost_and_found() {
        let mut d = det(Topology::new());
        let lost = Signal::ConcentratorEvent {
            concentrator: m("dc-1"),
            at: t(0),
            kind: ConcentratorEventKind::MeterLost,
            meters: vec![m("p1"), m("p2")],
        };
        let a = feed(&mut d, &lost);
        assert_eq!(
            raises(&a),
            vec![
                (AlarmType::PlcMeterLost, "meter:p1".into()),
                (AlarmType::PlcMeterLost, "meter:p2".into())
            ]
        );
        let found = Signal::ConcentratorEvent {
            concentrator: m("dc-1"),
            at: t(60),
            kind: ConcentratorEventKind::MeterFound,
            meters: vec![m("p1"), m("p3")],
        };
        assert_eq!(
            clears(&feed(&mut d, &found)),
            vec![(AlarmType::PlcMeterLost, "meter:p1".into())]
        );
    }

    /// Feeds readings every 15 min from `from` to `to` (seconds) at `kw`, returning the register.
    fn consume(
        d: &mut Detector,
        meter: &str,
        from: i64,
        to: i64,
        kw: f64,
        mut kwh: f64,
    ) -> (f64, Vec<AlarmAction>) {
        let mut out = Vec::new();
        let mut s = from;
        while s <= to {
            out.extend(feed(d, &reading(meter, s, kwh)));
            kwh += kw * 0.25;
            s += 900;
        }
        (kwh, out)
    }

    #[test]
    fn theft_after_tamper_against_the_same_hours_baseline() {
        let mut d = det(Topology::new());
        let (kwh, _) = consume(&mut d, "m1", 0, 3 * 86_400, 1.0, 0.0);
        let trig = 3 * 86_400 + 100;
        feed(&mut d, &ev("m1", trig, EventKind::CoverOpened));
        let (_, a) = consume(
            &mut d,
            "m1",
            3 * 86_400 + 900,
            3 * 86_400 + 6 * 3600,
            0.5,
            kwh,
        );
        assert!(raises(&a).is_empty());
        assert!(raises(&d.tick(t(trig + 6 * 3600 - 60))).is_empty());
        let a = d.tick(t(trig + 6 * 3600));
        assert_eq!(
            raises(&a),
            vec![(AlarmType::TheftSuspected, "meter:m1".into())]
        );
        let r = a[0].as_raise().unwrap();
        assert_eq!(r.severity, Severity::Critical);
        assert_eq!(r.evidence[0].what, "event:CoverOpened");
        assert_eq!(r.evidence[1].what, "baseline");
        assert!(
            r.evidence[1].detail.contains("same hours"),
            "{}",
            r.evidence[1].detail
        );
        assert!(
            r.evidence[1].detail.starts_with("1.0000 kWh/h"),
            "{}",
            r.evidence[1].detail
        );
        assert!(
            r.evidence[2].detail.starts_with("0.5000 kWh/h"),
            "{}",
            r.evidence[2].detail
        );
        assert_eq!(d.state_sizes().theft_watches, 0);
    }

    #[test]
    fn no_theft_when_consumption_holds_or_without_history() {
        let mut d = det(Topology::new());
        let (kwh, _) = consume(&mut d, "m1", 0, 86_400, 1.0, 0.0);
        feed(&mut d, &ev("m1", 86_400 + 10, EventKind::MagneticField));
        consume(&mut d, "m1", 86_400 + 900, 86_400 + 7 * 3600, 0.75, kwh);
        assert!(raises(&d.tick(t(86_400 + 7 * 3600))).is_empty());
        // Only 1 h of history (< min_baseline_secs): no conclusion.
        let (kwh, _) = consume(&mut d, "m2", 0, 3600, 1.0, 0.0);
        feed(&mut d, &ev("m2", 3700, EventKind::CoverOpened));
        consume(&mut d, "m2", 4500, 4500 + 6 * 3600, 0.1, kwh);
        assert!(raises(&d.tick(t(3700 + 7 * 3600))).is_empty());
    }

    #[test]
    fn theft_falls_back_to_the_mean_rate_before_the_trigger() {
        let mut d = det(Topology::new());
        let (kwh, _) = consume(&mut d, "m1", 0, 3 * 3600, 2.0, 0.0);
        feed(&mut d, &ev("m1", 3 * 3600 + 1, EventKind::ReverseEnergy));
        let (_, a) = consume(
            &mut d,
            "m1",
            3 * 3600 + 900,
            3 * 3600 + 6 * 3600 + 900,
            0.4,
            kwh,
        );
        // The reading past the window ends the observation at once.
        assert_eq!(
            raises(&a),
            vec![(AlarmType::TheftSuspected, "meter:m1".into())]
        );
        let r = a.iter().find_map(AlarmAction::as_raise).unwrap();
        assert!(
            r.evidence[1].detail.contains("mean rate"),
            "{}",
            r.evidence[1].detail
        );
    }

    #[test]
    fn stalled_register_against_neighbours() {
        let mut d = det(feeder_topology("f1", 5));
        let mut regs = [0.0f64; 5];
        let mut out = Vec::new();
        let mut s = 0;
        while s <= 8 * 3600 {
            for (i, r) in regs.iter_mut().enumerate() {
                out.extend(feed(&mut d, &reading(&format!("m{i}"), s, *r)));
                if i != 0 || s < 3600 {
                    *r += 0.25;
                }
            }
            out.extend(d.tick(t(s + 60)));
            s += 900;
        }
        assert_eq!(
            raises(&out),
            vec![(AlarmType::RegisterStalled, "meter:m0".into())]
        );
        let a = feed(&mut d, &reading("m0", s, regs[0] + 1.0));
        assert_eq!(
            clears(&a),
            vec![(AlarmType::RegisterStalled, "meter:m0".into())]
        );
    }

    #[test]
    fn no_stall_when_neighbours_do_not_consume_either() {
        let mut d = det(feeder_topology("f1", 5));
        let mut out = Vec::new();
        let mut s = 0;
        while s <= 8 * 3600 {
            for i in 0..5 {
                // Neighbours consume 0.05 kWh in 6 h: below stall_min_neighbour_kwh.
                let k = if i == 0 {
                    0.0
                } else {
                    s as f64 / 3600.0 * 0.008
                };
                out.extend(feed(&mut d, &reading(&format!("m{i}"), s, k)));
            }
            out.extend(d.tick(t(s + 60)));
            s += 900;
        }
        assert!(raises(&out).is_empty(), "{out:?}");
    }

    #[test]
    fn refusal_burst_per_meter_source_and_user() {
        let mut d = det(Topology::new());
        for i in 0..4 {
            assert!(
                raises(&feed(
                    &mut d,
                    &sec("replay", Some("m1"), Some("10.0.0.1:1000"), None, i)
                ))
                .is_empty()
            );
        }
        let a = feed(
            &mut d,
            &sec("bad_signature", Some("m1"), Some("10.0.0.1:1001"), None, 4),
        );
        assert_eq!(
            raises(&a),
            vec![(AlarmType::RefusalBurst, "meter:m1".into())]
        );
        assert_eq!(a[0].as_raise().unwrap().evidence.len(), 5);

        let mut d = det(Topology::new());
        let mut all = Vec::new();
        for i in 0..10 {
            all.extend(feed(
                &mut d,
                &sec(
                    "login_bad_password",
                    None,
                    Some("203.0.113.9:4000"),
                    Some(&format!("u{i}")),
                    i,
                ),
            ));
        }
        assert_eq!(
            raises(&all),
            vec![(AlarmType::RefusalBurst, "source:203.0.113.9".into())]
        );

        let mut d = det(Topology::new());
        let mut all = Vec::new();
        for i in 0..5 {
            all.extend(feed(
                &mut d,
                &sec(
                    "login_bad_totp",
                    None,
                    Some(&format!("192.0.2.{i}")),
                    Some("alice"),
                    i,
                ),
            ));
        }
        assert_eq!(
            raises(&all),
            vec![(AlarmType::RefusalBurst, "user:alice".into())]
        );
    }

    #[test]
    fn refusals_below_threshold_or_outside_the_window_do_not_burst() {
        let mut d = det(Topology::new());
        let mut all = Vec::new();
        for i in 0..20 {
            // One every 80 s: at most 4 in any 300 s.
            all.extend(feed(&mut d, &sec("replay", Some("m1"), None, None, i * 80)));
            // Not refusals at all.
            all.extend(feed(&mut d, &sec("stale", Some("m2"), None, None, i)));
            all.extend(feed(
                &mut d,
                &sec("login_internal_error", None, None, Some("bob"), i),
            ));
        }
        assert!(raises(&all).is_empty(), "{all:?}");
    }

    #[test]
    fn burst_repeats_are_rate_limited() {
        let mut d = det(Topology::new());
        let mut times = Vec::new();
        // 1,000 refusals from one source over 100 s.
        for i in 0..1000 {
            let s = i / 10;
            let a = feed(
                &mut d,
                &sec(
                    "tls_handshake_failed",
                    None,
                    Some("198.51.100.7:1"),
                    None,
                    s,
                ),
            );
            for r in a.iter().filter_map(AlarmAction::as_raise) {
                if r.alarm_type == AlarmType::RefusalBurst {
                    times.push(r.at);
                }
            }
        }
        assert_eq!(times, vec![t(0), t(30), t(60), t(90)]);
        assert!(d.state_sizes().refusal_events <= 10);
    }

    #[test]
    fn fleet_burst_above_min_and_baseline() {
        let mut d = det(Topology::new());
        let mut fleet = 0;
        // 99 refusals from 99 sources within the window: below fleet_min.
        for i in 0..99 {
            let a = feed(
                &mut d,
                &sec(
                    "bad_signature",
                    None,
                    Some(&format!("10.0.{}.{}", i / 250, i % 250)),
                    None,
                    i,
                ),
            );
            fleet += raises(&a)
                .iter()
                .filter(|r| r.0 == AlarmType::RefusalBurstFleet)
                .count();
        }
        assert_eq!(fleet, 0);
        let a = feed(
            &mut d,
            &sec("bad_signature", None, Some("10.9.9.9"), None, 100),
        );
        assert_eq!(
            raises(&a),
            vec![(AlarmType::RefusalBurstFleet, "fleet".into())]
        );
        assert_eq!(a[0].as_raise().unwrap().severity, Severity::Critical);

        // A high baseline raises the threshold: 80 per window for an hour, then 150 is not 5×.
        let mut cfg = DetectionConfig::default();
        cfg.intrusion.fleet_min = 50;
        let mut d = Detector::new(cfg, Topology::new());
        let mut fleet = Vec::new();
        for w in 0..12i64 {
            for i in 0..40 {
                let s = w * 300 + i * 7;
                fleet.extend(feed(
                    &mut d,
                    &sec("replay", None, Some(&format!("10.1.{w}.{i}")), None, s),
                ));
            }
            d.tick(t(w * 300 + 299));
        }
        assert!(raises(&fleet).is_empty(), "40 per window < 50");
        let base_threshold = d.fleet_threshold();
        assert!(base_threshold > 150, "{base_threshold}");
        let mut out = Vec::new();
        for i in 0..150 {
            out.extend(feed(
                &mut d,
                &sec(
                    "replay",
                    None,
                    Some(&format!("10.2.{}.{}", i / 200, i % 200)),
                    None,
                    3600 + i,
                ),
            ));
        }
        assert!(
            raises(&out)
                .iter()
                .all(|r| r.0 != AlarmType::RefusalBurstFleet)
        );
    }

    fn replaced(meter: &str, secs: i64, prev: &str, cur: &str) -> Signal {
        Signal::SessionReplaced {
            meter: m(meter),
            at: t(secs),
            previous: prev.into(),
            current: cur.into(),
        }
    }

    #[test]
    fn cloned_meter_after_repeated_takeovers_from_two_addresses() {
        let mut d = det(Topology::new());
        let a1 = "10.0.0.1:5000";
        let b = "198.51.100.2:6000";
        assert!(feed(&mut d, &replaced("m1", 0, a1, b)).is_empty());
        assert!(feed(&mut d, &replaced("m1", 60, b, a1)).is_empty());
        let a = feed(&mut d, &replaced("m1", 120, a1, b));
        assert_eq!(
            raises(&a),
            vec![(AlarmType::ClonedMeter, "meter:m1".into())]
        );
        let r = a[0].as_raise().unwrap();
        assert_eq!(r.evidence.len(), 3);
        assert!(r.summary.contains("10.0.0.1") && r.summary.contains("198.51.100.2"));
    }

    #[test]
    fn reconnects_from_the_same_address_or_slow_takeovers_are_not_clones() {
        let mut d = det(Topology::new());
        for i in 0..10 {
            let a = feed(
                &mut d,
                &replaced(
                    "m1",
                    i * 10,
                    &format!("10.0.0.1:{}", 5000 + i),
                    &format!("10.0.0.1:{}", 5001 + i),
                ),
            );
            assert!(a.is_empty());
        }
        for i in 0..10 {
            let (p, c) = if i % 2 == 0 {
                ("10.0.0.1:1", "10.0.0.2:1")
            } else {
                ("10.0.0.2:1", "10.0.0.1:1")
            };
            // One takeover every 400 s: never 3 within 600 s.
            assert!(feed(&mut d, &replaced("m2", i * 400, p, c)).is_empty());
        }
    }

    #[test]
    fn silent_after_revocation_raises_then_clears() {
        let mut d = det(Topology::new());
        let c = Signal::Connected {
            meter: m("m1"),
            at: t(0),
            source: Some("10.0.0.5:4000".into()),
        };
        feed(&mut d, &c);
        feed(&mut d, &reading("m1", 10, 1.0));
        // Named by source only.
        feed(
            &mut d,
            &sec(
                "certificate_revoked",
                None,
                Some("10.0.0.5:4001"),
                None,
                100,
            ),
        );
        assert!(raises(&d.tick(t(100 + 3599))).is_empty());
        let a = d.tick(t(100 + 3600));
        assert_eq!(
            raises(&a),
            vec![(AlarmType::SilentAfterRevocation, "meter:m1".into())]
        );
        assert!(raises(&d.tick(t(100 + 7200))).is_empty(), "raised once");
        let a = feed(&mut d, &reading("m1", 8000, 2.0));
        assert_eq!(
            clears(&a),
            vec![(AlarmType::SilentAfterRevocation, "meter:m1".into())]
        );
        // A meter that keeps reporting: no alarm.
        feed(
            &mut d,
            &sec("certificate_revoked", Some("m2"), None, None, 9000),
        );
        feed(&mut d, &ev("m2", 9100, EventKind::PowerRestore));
        assert!(raises(&d.tick(t(9000 + 4000))).is_empty());
        assert_eq!(d.state_sizes().revocation_watches, 0);
    }

    #[test]
    fn relay_not_authorized_raises_on_the_concentrator() {
        let mut d = det(Topology::new());
        let a = feed(
            &mut d,
            &sec(
                "relay_not_authorized",
                Some("dc-1"),
                Some("10.0.0.9:1"),
                None,
                0,
            ),
        );
        assert_eq!(
            raises(&a),
            vec![(AlarmType::RelayRefused, "concentrator:dc-1".into())]
        );
        assert!(
            raises(&feed(
                &mut d,
                &sec("relay_not_authorized", Some("dc-1"), None, None, 10)
            ))
            .is_empty()
        );
        assert_eq!(
            raises(&feed(
                &mut d,
                &sec("relay_not_authorized", Some("dc-1"), None, None, 40)
            ))
            .len(),
            1
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut d = det(feeder_topology("f1", 3));
        // 30 days of readings for 3 meters, a refusal flood from 5,000 sources.
        let mut s = 0;
        let mut k = 0.0;
        while s < 30 * 86_400 {
            for i in 0..3 {
                feed(&mut d, &reading(&format!("m{i}"), s, k));
            }
            k += 0.2;
            if s % 3600 == 0 {
                d.tick(t(s));
            }
            s += 900;
        }
        for i in 0..5000 {
            feed(
                &mut d,
                &sec(
                    "replay",
                    None,
                    Some(&format!("10.{}.{}.1", i / 250, i % 250)),
                    None,
                    s + i / 100,
                ),
            );
        }
        let sizes = d.state_sizes();
        assert_eq!(sizes.meters, 3);
        assert_eq!(sizes.buckets_per_meter, 8 * 24 + 1);
        assert!(sizes.refusal_events <= 5000);
        d.tick(t(s + 1000));
        let sizes = d.state_sizes();
        assert_eq!(sizes.refusal_windows, 0, "idle windows pruned");
        assert_eq!(sizes.rate_limit_entries, 0);
        assert_eq!(sizes.groups, 0);
    }

    #[test]
    fn disabled_detects_nothing() {
        let cfg = DetectionConfig {
            enabled: false,
            ..DetectionConfig::default()
        };
        let mut d = Detector::new(cfg, Topology::new());
        assert!(feed(&mut d, &ev("m1", 0, EventKind::CoverOpened)).is_empty());
        assert!(d.tick(t(10)).is_empty());
    }

    #[test]
    fn config_feeders_by_prefix_group_meters() {
        let mut cfg = DetectionConfig::default();
        cfg.feeder.push(crate::config::FeederConfig {
            name: "north".into(),
            meters: vec![],
            prefix: Some("n-".into()),
        });
        let mut d = Detector::new(cfg, Topology::new());
        feed(&mut d, &ev("n-1", 0, EventKind::PowerFail));
        feed(&mut d, &ev("n-2", 1, EventKind::PowerFail));
        let a = feed(&mut d, &ev("n-3", 2, EventKind::PowerFail));
        assert_eq!(raises(&a), vec![(AlarmType::Outage, "feeder:north".into())]);
    }
}
