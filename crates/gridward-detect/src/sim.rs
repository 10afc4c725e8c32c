//! A deterministic simulated fleet with known ground truth, on an accelerated (virtual) clock.
//!
//! [`run`] generates a week (by default) of signals for ≥ 1,000 meters in time order —
//! readings every interval with daily household profiles, day-to-day and interval noise,
//! holidays (low consumption, no tamper), single power blips, single genuine replays after a
//! reboot, reconnects from the same address, users' login typos — and injects incidents:
//! thieves (cover opened, then half the load bypassed), feeder outages (50 meters fail within
//! 60 s, restore 2 h later), cloned meters (a second device with the same certificate taking
//! the session over from another address, back and forth), brute-forcing sources (a login
//! failure every 2 s), benign cover openings (a technician; no load change), stalled
//! registers. Everything is fed through [`Detector::observe`] and [`Detector::tick`] (every
//! simulated minute) and scored against the ground truth.
//!
//! Randomness is a splitmix64 seeded from [`SimConfig::seed`]: the same config gives the same
//! report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use gridward_core::MeterId;
use gridward_core::document::EventKind;
use time::OffsetDateTime;
use time::macros::datetime;

use crate::config::DetectionConfig;
use crate::detector::Detector;
use crate::model::{AlarmAction, AlarmType, Originator};
use crate::signal::{Signal, Topology};

/// Meters per simulated feeder.
pub const FEEDER_SIZE: usize = 50;

/// The simulated fleet and what to inject.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Meters (ids `m00000`..), on feeders of [`FEEDER_SIZE`] (`f000`..); a remainder is on no
    /// feeder.
    pub meters: usize,
    /// Simulated days.
    pub days: u32,
    /// Seconds between readings.
    pub reading_interval_secs: u32,
    /// PRNG seed.
    pub seed: u64,
    /// Thieves: cover opened, then half the load bypassed (expects `tamper` and
    /// `theft_suspected`).
    pub thieves: usize,
    /// Feeder outages (a whole feeder of 50 meters; expects one `outage`).
    pub outage_feeders: usize,
    /// Cloned meters (expects `cloned_meter`).
    pub clones: usize,
    /// Brute-forcing sources (expects `refusal_burst` on `source:IP`).
    pub brute_force_sources: usize,
    /// Technicians opening a cover with no load change (expects `tamper`, must not raise
    /// theft).
    pub benign_tampers: usize,
    /// Registers that stop advancing while the meter keeps reporting (expects
    /// `register_stalled`).
    pub stalled_registers: usize,
    /// Single-meter power blips of 1-10 min (expects `power_failure`).
    pub power_blips: usize,
    /// Share of households on a 3-day holiday (low consumption, no tamper).
    pub holiday_share: f64,
    /// Single genuine `replay` refusals after a reboot (noise).
    pub replay_noise: usize,
    /// Reconnects taking over the stale session from the same address (noise).
    pub reconnect_noise: usize,
    /// Users mistyping their password once or twice (noise).
    pub login_typos: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            meters: 1000,
            days: 7,
            reading_interval_secs: 900,
            seed: 11,
            thieves: 5,
            outage_feeders: 1,
            clones: 2,
            brute_force_sources: 2,
            benign_tampers: 5,
            stalled_registers: 2,
            power_blips: 20,
            holiday_share: 0.05,
            replay_noise: 30,
            reconnect_noise: 30,
            login_typos: 20,
        }
    }
}

/// The kinds of injected incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IncidentKind {
    /// A cover opening (thieves' and technicians'): expects `tamper`.
    Tamper,
    /// A thief: expects `theft_suspected`.
    Theft,
    /// A feeder outage: expects `outage`.
    Outage,
    /// A cloned meter: expects `cloned_meter`.
    ClonedMeter,
    /// A brute-forcing source: expects `refusal_burst` on `source:IP`.
    BruteForce,
    /// A stalled register: expects `register_stalled`.
    StalledRegister,
    /// A single-meter power blip: expects `power_failure`.
    PowerBlip,
}

impl IncidentKind {
    /// Every kind, in report order.
    pub const ALL: [IncidentKind; 7] = [
        IncidentKind::Tamper,
        IncidentKind::Theft,
        IncidentKind::Outage,
        IncidentKind::ClonedMeter,
        IncidentKind::BruteForce,
        IncidentKind::StalledRegister,
        IncidentKind::PowerBlip,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tamper => "tamper (cover opened)",
            Self::Theft => "thief (half load bypassed)",
            Self::Outage => "feeder outage (50 meters)",
            Self::ClonedMeter => "cloned meter",
            Self::BruteForce => "brute-force source",
            Self::StalledRegister => "stalled register",
            Self::PowerBlip => "single power blip",
        }
    }

    /// The alarm type that detects it.
    pub fn expected(self) -> AlarmType {
        match self {
            Self::Tamper => AlarmType::Tamper,
            Self::Theft => AlarmType::TheftSuspected,
            Self::Outage => AlarmType::Outage,
            Self::ClonedMeter => AlarmType::ClonedMeter,
            Self::BruteForce => AlarmType::RefusalBurst,
            Self::StalledRegister => AlarmType::RegisterStalled,
            Self::PowerBlip => AlarmType::PowerFailure,
        }
    }
}

/// One injected incident and how it was scored.
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentResult {
    /// What it was.
    pub kind: IncidentKind,
    /// The expected alarm's originator.
    pub originator: Originator,
    /// Its first signal.
    pub start: OffsetDateTime,
    /// Seconds from the first signal to the first matching Raise; `None` = missed.
    pub latency_secs: Option<i64>,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRow {
    /// The incident kind.
    pub kind: IncidentKind,
    /// Injected.
    pub injected: usize,
    /// Detected (the expected alarm type on the expected originator).
    pub detected: usize,
    /// Missed.
    pub missed: usize,
    /// False alarms of the expected alarm type (distinct keys matching no incident).
    pub false_alarms: usize,
    /// Median latency, seconds (over the detected).
    pub latency_p50: Option<i64>,
    /// Largest latency, seconds.
    pub latency_max: Option<i64>,
}

/// The scored run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Meters simulated.
    pub meters: usize,
    /// Days simulated.
    pub days: u32,
    /// Readings fed.
    pub readings: usize,
    /// Signals fed (readings included).
    pub signals: usize,
    /// Ticks.
    pub ticks: usize,
    /// Raise actions emitted (repeats included).
    pub raises: usize,
    /// Clear actions emitted.
    pub clears: usize,
    /// Every incident.
    pub incidents: Vec<IncidentResult>,
    /// Per kind.
    pub rows: Vec<SimRow>,
    /// False alarms by type: distinct (type, originator) keys raised that match no incident
    /// and are not a known side effect of one.
    pub false_alarms: BTreeMap<AlarmType, usize>,
    /// The false alarms' keys (`type originator`), for diagnosis.
    pub false_alarm_keys: Vec<String>,
    /// Distinct alarm keys that are a side effect of an incident (the brute force's fleet-wide
    /// burst, per-meter power failures raised before an outage folded them).
    pub related: BTreeMap<AlarmType, usize>,
    /// The missed incidents, described.
    pub misses: Vec<String>,
}

impl SimReport {
    /// The row of `kind`.
    pub fn row(&self, kind: IncidentKind) -> Option<&SimRow> {
        self.rows.iter().find(|r| r.kind == kind)
    }

    /// False alarms of `t`.
    pub fn false_alarms_of(&self, t: AlarmType) -> usize {
        self.false_alarms.get(&t).copied().unwrap_or(0)
    }
}

fn fmt_latency(l: Option<i64>) -> String {
    match l {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s} s"),
        Some(s) if s < 7200 => format!("{:.1} min", s as f64 / 60.0),
        Some(s) => format!("{:.2} h", s as f64 / 3600.0),
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Simulated fleet: {} meters x {} days, {} readings, {} signals, {} ticks; {} raises, {} clears",
            self.meters,
            self.days,
            self.readings,
            self.signals,
            self.ticks,
            self.raises,
            self.clears
        )?;
        writeln!(
            f,
            "{:<28} {:<18} {:>8} {:>8} {:>6} {:>6} {:>10} {:>10}",
            "incident", "expected alarm", "injected", "detected", "missed", "false", "p50", "max"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<28} {:<18} {:>8} {:>8} {:>6} {:>6} {:>10} {:>10}",
                r.kind.name(),
                r.kind.expected().code(),
                r.injected,
                r.detected,
                r.missed,
                r.false_alarms,
                fmt_latency(r.latency_p50),
                fmt_latency(r.latency_max)
            )?;
        }
        let expected: HashSet<AlarmType> = self.rows.iter().map(|r| r.kind.expected()).collect();
        let others: Vec<String> = self
            .false_alarms
            .iter()
            .filter(|(t, _)| !expected.contains(t))
            .map(|(t, n)| format!("{t}: {n}"))
            .collect();
        writeln!(
            f,
            "false alarms of other types: {}",
            if others.is_empty() {
                "none".into()
            } else {
                others.join(", ")
            }
        )?;
        let related: Vec<String> = self
            .related
            .iter()
            .map(|(t, n)| format!("{t}: {n}"))
            .collect();
        writeln!(
            f,
            "side-effect alarms of incidents (not counted as false): {}",
            if related.is_empty() {
                "none".into()
            } else {
                related.join(", ")
            }
        )?;
        if self.misses.is_empty() {
            writeln!(f, "misses: none")?;
        } else {
            writeln!(f, "misses:")?;
            for m in &self.misses {
                writeln!(f, "  {m}")?;
            }
        }
        if !self.false_alarm_keys.is_empty() {
            writeln!(f, "false alarm keys: {}", self.false_alarm_keys.join(", "))?;
        }
        writeln!(
            f,
            "latency = simulated seconds from the incident's first signal to the first Raise of the expected key; \
             false = distinct alarm keys matching no incident"
        )
    }
}

/// splitmix64.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn f(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f()
    }
    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

fn hash3(seed: u64, a: u64, b: u64) -> f64 {
    let mut r =
        Rng(seed ^ a.wrapping_mul(0x1000_0000_01B3) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
    r.next();
    r.f()
}

/// Relative household load by hour of day (UTC is local time here).
const PROFILE: [f64; 24] = [
    0.35, 0.3, 0.3, 0.3, 0.3, 0.4, 0.8, 1.3, 1.2, 0.8, 0.6, 0.6, 0.7, 0.6, 0.55, 0.6, 0.8, 1.1,
    1.5, 1.6, 1.5, 1.2, 0.8, 0.5,
];

#[derive(Debug, Clone)]
struct SimMeter {
    id: MeterId,
    scale: f64,
    base_kw: f64,
    holiday: Option<(i64, i64)>,
    thief_from: Option<i64>,
    stalled_from: Option<i64>,
    down: Vec<(i64, i64)>,
    register: f64,
    ip: String,
}

#[derive(Debug, Clone)]
struct Expect {
    kind: IncidentKind,
    originator: Originator,
    start: i64,
}

fn at(t: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn mid(i: usize) -> MeterId {
    MeterId::new(&format!("m{i:05}"))
        .unwrap_or_else(|_| unreachable!("m{{digits}} is a valid meter id"))
}

/// Records a side-effect key valid from the earliest incident that can cause it.
fn note_related(
    related: &mut HashMap<(AlarmType, Originator), i64>,
    key: (AlarmType, Originator),
    from: i64,
) {
    let e = related.entry(key).or_insert(from);
    *e = (*e).min(from);
}

/// Runs the simulation and scores the detectors.
pub fn run(cfg: &SimConfig, detection: &DetectionConfig) -> SimReport {
    let mut rng = Rng(cfg.seed);
    let start = datetime!(2026-11-23 00:00 UTC).unix_timestamp();
    let days = i64::from(cfg.days.max(1));
    let end = start + days * 86_400;
    let interval = i64::from(cfg.reading_interval_secs.max(60));
    let n = cfg.meters.max(1);
    let feeders = n / FEEDER_SIZE;

    let mut topo = Topology::new();
    for f in 0..feeders {
        topo.add_feeder(
            &format!("f{f:03}"),
            (f * FEEDER_SIZE..(f + 1) * FEEDER_SIZE).map(mid),
        );
    }

    let mut meters: Vec<SimMeter> = (0..n)
        .map(|i| {
            let holiday = if rng.f() < cfg.holiday_share {
                let d = 2 + rng.below(days.saturating_sub(4).max(1) as u64) as i64;
                Some((start + d * 86_400, start + (d + 3) * 86_400))
            } else {
                None
            };
            SimMeter {
                id: mid(i),
                scale: rng.range(0.5, 2.0),
                base_kw: rng.range(0.08, 0.25),
                holiday,
                thief_from: None,
                stalled_from: None,
                down: Vec::new(),
                register: rng.range(100.0, 20_000.0),
                ip: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            }
        })
        .collect();

    let mut specials: Vec<(i64, Signal)> = Vec::new();
    let mut expects: Vec<Expect> = Vec::new();
    // Side effects that are not false alarms: (type, originator) → valid from.
    let mut related: HashMap<(AlarmType, Originator), i64> = HashMap::new();
    let mut taken: HashSet<usize> = HashSet::new();

    for (i, m) in meters.iter().enumerate() {
        specials.push((
            start,
            Signal::Connected {
                meter: m.id.clone(),
                at: at(start),
                source: Some(format!("{}:{}", m.ip, 40_000 + i % 20_000)),
            },
        ));
    }

    // Feeder outages.
    let mut outage_feeders: Vec<usize> = Vec::new();
    for _ in 0..cfg.outage_feeders.min(feeders) {
        let mut f = rng.below(feeders as u64) as usize;
        while outage_feeders.contains(&f) {
            f = (f + 1) % feeders;
        }
        outage_feeders.push(f);
        let t0 = start + 86_400 + rng.below((days - 2).max(1) as u64 * 86_400) as i64;
        let group = Originator::Feeder(format!("f{f:03}"));
        let mut first = i64::MAX;
        let range = f * FEEDER_SIZE..(f + 1) * FEEDER_SIZE;
        for (i, sm) in meters
            .iter_mut()
            .enumerate()
            .take(range.end)
            .skip(range.start)
        {
            taken.insert(i);
            let fail = t0 + rng.below(60) as i64;
            let restore = t0 + 7200 + rng.below(60) as i64;
            first = first.min(fail);
            let id = sm.id.clone();
            sm.down.push((fail, restore));
            specials.push((
                fail,
                Signal::MeterEvent {
                    meter: id.clone(),
                    at: at(fail),
                    kind: EventKind::PowerFail,
                },
            ));
            specials.push((
                restore,
                Signal::MeterEvent {
                    meter: id.clone(),
                    at: at(restore),
                    kind: EventKind::PowerRestore,
                },
            ));
            note_related(
                &mut related,
                (AlarmType::PowerFailure, Originator::Meter(id)),
                t0,
            );
        }
        expects.push(Expect {
            kind: IncidentKind::Outage,
            originator: group,
            start: first,
        });
    }

    let pick = |rng: &mut Rng,
                taken: &mut HashSet<usize>,
                meters: &[SimMeter],
                no_holiday: bool|
     -> usize {
        loop {
            let i = rng.below(n as u64) as usize;
            if !(taken.contains(&i) || no_holiday && meters[i].holiday.is_some()) {
                taken.insert(i);
                return i;
            }
        }
    };
    let day_time = |rng: &mut Rng, from_day: i64, to_day: i64| -> i64 {
        let span = (to_day - from_day).max(1) as u64 * 86_400;
        start + from_day * 86_400 + rng.below(span) as i64
    };

    for _ in 0..cfg.thieves.min(n / 4) {
        let i = pick(&mut rng, &mut taken, &meters, true);
        let t0 = day_time(&mut rng, 2.min(days - 1), (days - 1).max(1));
        meters[i].thief_from = Some(t0);
        let id = meters[i].id.clone();
        specials.push((
            t0,
            Signal::MeterEvent {
                meter: id.clone(),
                at: at(t0),
                kind: EventKind::CoverOpened,
            },
        ));
        expects.push(Expect {
            kind: IncidentKind::Tamper,
            originator: Originator::Meter(id.clone()),
            start: t0,
        });
        expects.push(Expect {
            kind: IncidentKind::Theft,
            originator: Originator::Meter(id),
            start: t0,
        });
    }
    for _ in 0..cfg.benign_tampers.min(n / 4) {
        let i = pick(&mut rng, &mut taken, &meters, true);
        let t0 = day_time(&mut rng, 1.min(days - 1), (days - 1).max(1));
        let id = meters[i].id.clone();
        let kind = if rng.f() < 0.5 {
            EventKind::CoverOpened
        } else {
            EventKind::TerminalCoverOpened
        };
        specials.push((
            t0,
            Signal::MeterEvent {
                meter: id.clone(),
                at: at(t0),
                kind,
            },
        ));
        expects.push(Expect {
            kind: IncidentKind::Tamper,
            originator: Originator::Meter(id),
            start: t0,
        });
    }
    for _ in 0..cfg.stalled_registers.min(n / 4) {
        let i = pick(&mut rng, &mut taken, &meters, true);
        let t0 = day_time(&mut rng, 1.min(days - 1), (days - 1).max(1));
        meters[i].stalled_from = Some(t0);
        if i / FEEDER_SIZE < feeders {
            expects.push(Expect {
                kind: IncidentKind::StalledRegister,
                originator: Originator::Meter(meters[i].id.clone()),
                start: t0,
            });
        }
    }
    for k in 0..cfg.clones.min(n / 4) {
        let i = pick(&mut rng, &mut taken, &meters, false);
        let t0 = day_time(&mut rng, 1.min(days - 1), days);
        let id = meters[i].id.clone();
        let genuine = format!("{}:{}", meters[i].ip, 41_000);
        let clone = format!("198.51.100.{}:{}", 10 + k % 200, 52_000);
        let mut t = t0;
        let mut prev = genuine.clone();
        for j in 0..40 {
            let cur = if j % 2 == 0 {
                clone.clone()
            } else {
                genuine.clone()
            };
            specials.push((
                t,
                Signal::SessionReplaced {
                    meter: id.clone(),
                    at: at(t),
                    previous: prev.clone(),
                    current: cur.clone(),
                },
            ));
            prev = cur;
            t += 30 + rng.below(60) as i64;
        }
        expects.push(Expect {
            kind: IncidentKind::ClonedMeter,
            originator: Originator::Meter(id),
            start: t0,
        });
    }
    let users = [
        "admin", "root", "operator", "alice", "bob", "carol", "dave", "erin", "frank", "grace",
    ];
    for k in 0..cfg.brute_force_sources {
        let t0 = day_time(&mut rng, 0, days);
        let ip = format!("203.0.113.{}", 1 + k % 250);
        for j in 0..600i64 {
            let t = t0 + 2 * j;
            let user = format!(
                "{}{}",
                users[(j as usize) % users.len()],
                (j as usize / users.len()) % 6
            );
            let reason = if j % 3 == 0 {
                "login_unknown_user"
            } else {
                "login_bad_password"
            };
            specials.push((
                t,
                Signal::Security {
                    at: at(t),
                    reason: reason.into(),
                    meter: None,
                    source: Some(format!("{ip}:{}", 30_000 + j)),
                    user: Some(user.clone()),
                    detail: "POST /api/v1/session".into(),
                },
            ));
            note_related(
                &mut related,
                (AlarmType::RefusalBurst, Originator::User(user)),
                t0,
            );
        }
        note_related(
            &mut related,
            (AlarmType::RefusalBurstFleet, Originator::Fleet),
            t0,
        );
        expects.push(Expect {
            kind: IncidentKind::BruteForce,
            originator: Originator::Source(ip),
            start: t0,
        });
    }

    // Noise (and the power blips, which are real single-meter failures).
    for _ in 0..cfg.power_blips {
        let i = loop {
            let i = rng.below(n as u64) as usize;
            if !taken.contains(&i) {
                break i;
            }
        };
        let t0 = day_time(&mut rng, 0, days) - 3600;
        let t0 = t0.max(start + 60);
        let t1 = t0 + 60 + rng.below(540) as i64;
        let id = meters[i].id.clone();
        meters[i].down.push((t0, t1));
        specials.push((
            t0,
            Signal::MeterEvent {
                meter: id.clone(),
                at: at(t0),
                kind: EventKind::PowerFail,
            },
        ));
        specials.push((
            t1,
            Signal::MeterEvent {
                meter: id.clone(),
                at: at(t1),
                kind: EventKind::PowerRestore,
            },
        ));
        expects.push(Expect {
            kind: IncidentKind::PowerBlip,
            originator: Originator::Meter(id),
            start: t0,
        });
    }
    for _ in 0..cfg.replay_noise {
        let i = rng.below(n as u64) as usize;
        let t = day_time(&mut rng, 0, days);
        specials.push((
            t,
            Signal::Security {
                at: at(t),
                reason: "replay".into(),
                meter: Some(meters[i].id.clone()),
                source: Some(format!("{}:{}", meters[i].ip, 42_000)),
                user: None,
                detail: "the reading's counter was seen before (reboot)".into(),
            },
        ));
    }
    for _ in 0..cfg.reconnect_noise {
        let i = rng.below(n as u64) as usize;
        let t = day_time(&mut rng, 0, days);
        specials.push((
            t,
            Signal::SessionReplaced {
                meter: meters[i].id.clone(),
                at: at(t),
                previous: format!("{}:{}", meters[i].ip, 43_000),
                current: format!("{}:{}", meters[i].ip, 43_001),
            },
        ));
    }
    for k in 0..cfg.login_typos {
        let t = day_time(&mut rng, 0, days);
        let user = users[3 + k % 7].to_owned();
        for j in 0..=(k % 2) as i64 {
            specials.push((
                t + 10 * j,
                Signal::Security {
                    at: at(t + 10 * j),
                    reason: "login_bad_password".into(),
                    meter: None,
                    source: Some(format!("192.0.2.{}:5{j}000", 10 + k % 20)),
                    user: Some(user.clone()),
                    detail: "POST /api/v1/session".into(),
                },
            ));
        }
    }
    specials.sort_by_key(|(t, _)| *t);

    // Drive the detector.
    let mut det = Detector::new(detection.clone(), topo);
    let mut raises: Vec<(i64, AlarmType, Originator)> = Vec::new();
    let (mut readings, mut signals, mut ticks, mut clears) = (0usize, 0usize, 0usize, 0usize);
    let collect = |actions: Vec<AlarmAction>,
                   raises: &mut Vec<(i64, AlarmType, Originator)>,
                   clears: &mut usize| {
        for a in actions {
            match a {
                AlarmAction::Raise(r) => {
                    raises.push((r.at.unix_timestamp(), r.alarm_type, r.originator))
                }
                AlarmAction::Clear(_) => *clears += 1,
            }
        }
    };
    let mut next_special = 0usize;
    let mut t = start;
    let interval_h = interval as f64 / 3600.0;
    while t < end {
        if (t - start) % interval == 0 && t > start {
            let day = (t - start) / 86_400;
            let hour = ((t - interval).rem_euclid(86_400) / 3600) as usize;
            for (i, m) in meters.iter_mut().enumerate() {
                if m.down.iter().any(|(a, b)| t >= *a && t < *b) {
                    continue;
                }
                let stalled = m.stalled_from.is_some_and(|s| t - interval >= s);
                if !stalled {
                    let dayf = 0.85 + 0.3 * hash3(cfg.seed, i as u64, day as u64);
                    let noise = rng.range(0.6, 1.4);
                    let mut kw = m.base_kw + m.scale * 0.5 * PROFILE[hour] * dayf * noise;
                    if m.holiday.is_some_and(|(a, b)| t > a && t <= b) {
                        kw = m.base_kw * rng.range(0.5, 0.8);
                    }
                    if m.thief_from.is_some_and(|s| t - interval >= s) {
                        kw *= 0.5;
                    }
                    m.register += kw * interval_h;
                }
                let s = Signal::Reading {
                    meter: m.id.clone(),
                    at: at(t),
                    energy_kwh: m.register,
                };
                let a = det.observe(&s, at(t));
                collect(a, &mut raises, &mut clears);
                readings += 1;
                signals += 1;
            }
        }
        while next_special < specials.len() && specials[next_special].0 < t + 60 {
            let (st, s) = &specials[next_special];
            let a = det.observe(s, at(*st));
            collect(a, &mut raises, &mut clears);
            signals += 1;
            next_special += 1;
        }
        t += 60;
        let a = det.tick(at(t));
        collect(a, &mut raises, &mut clears);
        ticks += 1;
    }

    // Score.
    let mut first_raise: HashMap<(AlarmType, Originator), Vec<i64>> = HashMap::new();
    for (rt, ty, o) in &raises {
        first_raise.entry((*ty, o.clone())).or_default().push(*rt);
    }
    let mut incidents = Vec::new();
    let mut matched: HashSet<(AlarmType, Originator)> = HashSet::new();
    let mut misses = Vec::new();
    for e in &expects {
        let key = (e.kind.expected(), e.originator.clone());
        let lat = first_raise
            .get(&key)
            .and_then(|v| v.iter().copied().find(|r| *r >= e.start))
            .map(|r| r - e.start);
        if lat.is_some() {
            matched.insert(key);
        } else {
            misses.push(format!(
                "{} on {} from {}",
                e.kind.name(),
                e.originator,
                at(e.start)
            ));
        }
        incidents.push(IncidentResult {
            kind: e.kind,
            originator: e.originator.clone(),
            start: at(e.start),
            latency_secs: lat,
        });
    }
    let mut false_alarms: BTreeMap<AlarmType, usize> = BTreeMap::new();
    let mut related_count: BTreeMap<AlarmType, usize> = BTreeMap::new();
    let mut false_alarm_keys = Vec::new();
    let mut keys: Vec<&(AlarmType, Originator)> = first_raise.keys().collect();
    keys.sort();
    for key in keys {
        if matched.contains(key) {
            continue;
        }
        let first = first_raise[key].iter().copied().min().unwrap_or(0);
        if related.get(key).is_some_and(|from| first >= *from) {
            *related_count.entry(key.0).or_default() += 1;
        } else {
            *false_alarms.entry(key.0).or_default() += 1;
            false_alarm_keys.push(format!("{} {}", key.0, key.1));
        }
    }
    let rows = IncidentKind::ALL
        .iter()
        .map(|&k| {
            let mut lats: Vec<i64> = incidents
                .iter()
                .filter(|i| i.kind == k)
                .filter_map(|i| i.latency_secs)
                .collect();
            lats.sort_unstable();
            let injected = incidents.iter().filter(|i| i.kind == k).count();
            SimRow {
                kind: k,
                injected,
                detected: lats.len(),
                missed: injected - lats.len(),
                false_alarms: false_alarms.get(&k.expected()).copied().unwrap_or(0),
                latency_p50: (!lats.is_empty()).then(|| lats[(lats.len() - 1) / 2]),
                latency_max: lats.last().copied(),
            }
        })
        .collect();
    SimReport {
        meters: n,
        days: days as u32,
        readings,
        signals,
        ticks,
        raises: raises.len(),
        clears,
        incidents,
        rows,
        false_alarms,
        false_alarm_keys,
        related: related_count,
        misses,
    }
}
