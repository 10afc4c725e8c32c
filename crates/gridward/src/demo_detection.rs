//! The demo's detection (issue 11): a terminal cover opened (a tamper alarm), an outage of a
//! feeder (one alarm for the group, cleared when the power is back), a thief who bypasses a
//! meter after opening its cover (a theft suspicion against the meter's own earlier rate), and
//! a data concentrator relaying the readings of a few PLC meters under their own ids.
//!
//! The thresholds are the demo's own, written into its `gridward.toml` as `[detection]`:
//! a theft is judged on seconds of readings, not hours. To make seconds of consumption
//! measurable in the registers' whole watt-hours, the demo's meters live in the time zone
//! where it is now 19:00 (the evening peak of their load curve).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use gridward_core::MeterId;
use gridward_core::document::EventKind;
use gridward_meter::concentrator::{ConcentratorIdentity, ConcentratorOutcome, ConcentratorSpec};
use gridward_meter::fleet::{Fleet, MeterSpec};
use gridward_meter::identity::{MeterIdentity, Trust};
use gridward_pki::tls::TlsOptions;
use gridward_pki::{IssueOptions, Pki};
use gridward_store::{AlarmQuery, AlarmStore, ReadingQuery, SqliteStore, Store, StoredAlarm};
use time::OffsetDateTime;

/// The feeder of the demo's outage: its name and the meter-id prefix that puts a meter on it.
const FEEDER: &str = "north";
const FEEDER_PREFIX: &str = "north-";
/// Meters issued on the feeder (all lose power together).
const FEEDER_METERS: usize = 4;
/// The data concentrator and the prefix of its PLC meters.
const CONCENTRATOR: &str = "dc-1";
const PLC_PREFIX: &str = "plc-";
const PLC_METERS: usize = 3;
/// Meters at the start of the fleet the rest of the demo uses (commands, firmware, events):
/// the thief is none of them.
const RESERVED: usize = 5;

/// Theft thresholds for a run of seconds (the defaults are hours): the rate before the trigger
/// over at least `MIN_BASELINE_SECS`, the rate after it over `OBSERVE_SECS` (at least
/// `MIN_OBSERVED_SECS`), suspicious below `RATIO` × the rate before.
const MIN_BASELINE_SECS: u64 = 10;
const OBSERVE_SECS: u64 = 20;
const MIN_OBSERVED_SECS: u64 = 10;
/// Low, because a few seconds of a register counted in whole watt-hours are coarse: a meter
/// consuming as before stays well above it, a bypassed one (nothing metered) is at 0.
const RATIO: f64 = 0.3;
/// The share of the thief's load still metered: none (a full bypass).
const METERED_SHARE: f64 = 0.0;
/// The shortest run with a thief: a third of it before the theft gives the baseline.
pub const MIN_RUN_FOR_THEFT: u64 = MIN_BASELINE_SECS * 3;
/// Local hour of the meters' load curve during the demo (the evening peak).
const LOCAL_HOUR: i64 = 19;

/// The `[detection]` section of the demo, as TOML (written into its `gridward.toml`).
pub fn toml() -> String {
    format!(
        "[detection]\n\
         [detection.outage]\nmin_meters = 3\nwindow_secs = 120\n\
         [detection.theft]\nobserve_secs = {OBSERVE_SECS}\nmin_baseline_secs = {MIN_BASELINE_SECS}\n\
         min_observed_secs = {MIN_OBSERVED_SECS}\nratio = {RATIO}\n\
         [[detection.feeder]]\nname = {FEEDER:?}\nprefix = {FEEDER_PREFIX:?}\n"
    )
}

/// The same section as JSON, for `RawConfig::detection` (the shape serde reads from TOML).
pub fn config_json() -> serde_json::Value {
    serde_json::json!({
        "outage": {"min_meters": 3, "window_secs": 120},
        "theft": {
            "observe_secs": OBSERVE_SECS,
            "min_baseline_secs": MIN_BASELINE_SECS,
            "min_observed_secs": MIN_OBSERVED_SECS,
            "ratio": RATIO,
        },
        "feeder": [{"name": FEEDER, "prefix": FEEDER_PREFIX}],
    })
}

/// The UTC offset, in seconds, at which it is now about [`LOCAL_HOUR`] (within ±12 h).
pub fn evening_offset(now: OffsetDateTime) -> i32 {
    let utc = i64::from(now.hour()) * 3600 + i64::from(now.minute()) * 60;
    let mut offset = (LOCAL_HOUR * 3600 - utc).rem_euclid(86_400);
    if offset > 43_200 {
        offset -= 86_400;
    }
    // Whole quarter hours, as real time zones are.
    i32::try_from(offset / 900 * 900).unwrap_or(0)
}

/// The devices of the demo's detection.
#[derive(Debug)]
pub struct Devices {
    /// The meters on the feeder that loses power.
    pub feeder: Vec<MeterId>,
    /// The concentrator.
    pub concentrator: MeterId,
    /// Its PLC meters.
    pub plc: Vec<MeterId>,
}

impl Devices {
    /// Issues the feeder's meters, the concentrator and its PLC meters in `pki`.
    pub fn issue(pki: &Pki, opts: &IssueOptions, now: OffsetDateTime) -> Result<Self> {
        let ids = |certs: Vec<gridward_pki::IssuedCertificate>| {
            certs
                .iter()
                .map(|c| MeterId::new(&c.name))
                .collect::<Result<Vec<_>, _>>()
        };
        let feeder =
            ids(pki.issue_meters(FEEDER_PREFIX, FEEDER_METERS, opts, now, &mut |_| {})?)?;
        let concentrator = MeterId::new(CONCENTRATOR)?;
        pki.issue_concentrator(&concentrator, opts, now)?;
        let plc = ids(pki.issue_meters(PLC_PREFIX, PLC_METERS, opts, now, &mut |_| {})?)?;
        Ok(Self {
            feeder,
            concentrator,
            plc,
        })
    }

    /// The feeder's meters as fleet members (they connect themselves).
    pub fn feeder_specs(
        &self,
        pki_dir: &Path,
        trust: &Trust,
        tls: &TlsOptions,
    ) -> Result<Vec<MeterSpec>> {
        self.feeder
            .iter()
            .map(|id| {
                Ok(MeterSpec::from(MeterIdentity::load(
                    pki_dir, id, trust, tls,
                )?))
            })
            .collect()
    }

    /// The concentrator with its PLC meters (which never connect themselves).
    pub fn concentrator_spec(
        &self,
        pki_dir: &Path,
        trust: &Trust,
        tls: &TlsOptions,
    ) -> Result<ConcentratorSpec> {
        let identity = ConcentratorIdentity::load(pki_dir, &self.concentrator, trust, tls)
            .with_context(|| format!("loading concentrator {}", self.concentrator))?;
        let meters = self
            .plc
            .iter()
            .map(|id| {
                Ok(MeterSpec::from(MeterIdentity::load(
                    pki_dir, id, trust, tls,
                )?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ConcentratorSpec::new(identity, meters))
    }

    /// Registers the PLC meters behind the concentrator in the store (as
    /// `gridward concentrator attach` does): the head-end accepts relayed envelopes only of
    /// meters registered behind the relaying concentrator.
    pub fn attach(&self, store: &SqliteStore, now: OffsetDateTime) -> Result<()> {
        store
            .attach_meters(&self.concentrator, &self.plc, now)
            .with_context(|| format!("attaching the PLC meters to {}", self.concentrator))?;
        Ok(())
    }
}

/// The thief: a genuine meter the rest of the demo leaves alone (the last one), if the fleet
/// has one beyond the first [`RESERVED`].
pub fn thief(meters: &[MeterId]) -> Option<MeterId> {
    (meters.len() > RESERVED)
        .then(|| meters.last().cloned())
        .flatten()
}

/// What the demo schedules, for its progress output.
pub fn describe(devices: &Devices, thief: Option<&MeterId>, tamper: &str, run_for: Duration) {
    let third = run_for.as_secs_f64() / 3.0;
    println!(
        "   detection: at {third:.0} s {tamper}'s terminal cover opens; the {} meters of feeder \
         {FEEDER} ({FEEDER_PREFIX}*) lose power and get it back at {:.0} s",
        devices.feeder.len(),
        2.0 * third
    );
    match thief {
        Some(t) if run_for.as_secs() >= MIN_RUN_FOR_THEFT => println!(
            "              at {third:.0} s a thief opens {t}'s cover and bypasses it; judged after \
             {OBSERVE_SECS} s against its rate before"
        ),
        Some(_) => println!(
            "              (no thief: a run of {} s leaves less than {MIN_BASELINE_SECS} s of \
             readings before the theft; pass --duration {} or more)",
            run_for.as_secs(),
            MIN_RUN_FOR_THEFT
        ),
        None => println!(
            "              (no thief: the fleet needs more than {RESERVED} meters for one)"
        ),
    }
    println!(
        "              concentrator {} relays the readings of {} PLC meters ({}…)",
        devices.concentrator,
        devices.plc.len(),
        devices.plc.first().map(MeterId::as_str).unwrap_or_default()
    );
}

/// A third into the run: the thief starts and the feeder loses power.
pub fn start(fleet: &Fleet, devices: &Devices, thief: Option<&MeterId>) {
    if let Some(t) = thief {
        fleet.start_theft(t, EventKind::CoverOpened, METERED_SHARE);
    }
    for m in &devices.feeder {
        fleet.power_fail(m);
    }
}

/// Two thirds into the run: the feeder's power is back.
pub fn restore(fleet: &Fleet, devices: &Devices) {
    for m in &devices.feeder {
        fleet.power_restore(m);
    }
}

/// The alarms in the store, oldest first.
pub fn alarms(store: &SqliteStore) -> Result<Vec<StoredAlarm>> {
    let mut alarms = store.alarms(&AlarmQuery::default())?;
    alarms.sort_by_key(|a| a.id);
    Ok(alarms)
}

/// Readings stored under each PLC meter's own id.
pub fn plc_readings(store: &SqliteStore, devices: &Devices) -> Result<u64> {
    let mut n = 0;
    for m in &devices.plc {
        let q = ReadingQuery {
            limit: 1_000_000,
            ..ReadingQuery::new(m.clone())
        };
        n += store.readings(&q)?.len() as u64;
    }
    Ok(n)
}

/// The report's "Alarms" section and its line on the concentrator.
pub fn print_report(
    alarms: &[StoredAlarm],
    concentrator: Option<&ConcentratorOutcome>,
    devices: &Devices,
    plc_readings: u64,
) {
    println!("\nAlarms (the detectors', from the store):");
    println!(
        "  {:<24} {:<9} {:<24} {:>5}  state",
        "type", "severity", "originator", "count"
    );
    for a in alarms {
        println!(
            "  {:<24} {:<9} {:<24} {:>5}  {}",
            a.alarm_type,
            a.severity,
            a.originator,
            a.count,
            a.state.code()
        );
    }
    println!("  {} alarms", alarms.len());
    let (relayed, batches) = concentrator.map_or((0, 0), |c| {
        (c.stats.envelopes_relayed, c.stats.batches_acked)
    });
    println!(
        "concentrator {}: {} PLC meters relayed, {relayed} envelopes in {batches} acknowledged \
         batches, {plc_readings} readings stored under the meters' own ids",
        devices.concentrator,
        concentrator.map_or(0, |c| c.meters.len())
    );
}
