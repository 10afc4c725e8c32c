//! `[detection]` in `gridward.toml`: thresholds for every detector, with sane defaults.

use std::collections::HashSet;

use gridward_core::MeterId;
use serde::Deserialize;

/// Why a `[detection]` section is not usable. The message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DetectConfigError {
    /// A key has a value outside its range, e.g.
    /// `detection.outage.window_secs must be at least 1`.
    #[error("{key} {message}")]
    Invalid {
        /// The full key, e.g. `detection.outage.window_secs`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> DetectConfigError {
    DetectConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// `[detection]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectionConfig {
    /// Run the detectors at all (default true).
    pub enabled: bool,
    /// `[detection.outage]`.
    pub outage: OutageConfig,
    /// `[detection.theft]`.
    pub theft: TheftConfig,
    /// `[detection.intrusion]`.
    pub intrusion: IntrusionConfig,
    /// `[[detection.feeder]]`: feeders (groups of meters besides concentrators).
    pub feeder: Vec<FeederConfig>,
}

impl Default for DetectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            outage: OutageConfig::default(),
            theft: TheftConfig::default(),
            intrusion: IntrusionConfig::default(),
            feeder: Vec::new(),
        }
    }
}

/// `[detection.outage]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutageConfig {
    /// Failures of this many meters of one group within the window make an outage (default 3).
    pub min_meters: usize,
    /// The window, in seconds (default 120).
    pub window_secs: u64,
    /// The share of the failed meters that must restore to clear the outage, in (0, 1]
    /// (default 1.0: all of them).
    pub clear_share: f64,
}

impl Default for OutageConfig {
    fn default() -> Self {
        Self {
            min_meters: 3,
            window_secs: 120,
            clear_share: 1.0,
        }
    }
}

/// `[detection.theft]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TheftConfig {
    /// How long consumption is watched after a tamper trigger, in seconds (default 6 h;
    /// at most 24 h).
    pub observe_secs: u64,
    /// Days of same-hour history forming the baseline (default 7, 1..=31).
    pub baseline_days: u32,
    /// A baseline needs this many seconds of readings: same-hour history, or else the mean
    /// rate before the trigger (default 7200, 2 h).
    pub min_baseline_secs: u64,
    /// Observed below `ratio` × baseline is suspicious (default 0.7, in (0, 1)).
    pub ratio: f64,
    /// The observation must cover at least this many seconds of readings (default 3600).
    pub min_observed_secs: u64,
    /// A register that does not advance for this long (seconds, default 6 h) while neighbours
    /// consume is stalled.
    pub stall_secs: u64,
    /// ... and the neighbours' median advanced by more than this many kWh (default 0.5).
    pub stall_min_neighbour_kwh: f64,
}

impl Default for TheftConfig {
    fn default() -> Self {
        Self {
            observe_secs: 6 * 3600,
            baseline_days: 7,
            min_baseline_secs: 7200,
            ratio: 0.7,
            min_observed_secs: 3600,
            stall_secs: 6 * 3600,
            stall_min_neighbour_kwh: 0.5,
        }
    }
}

/// `[detection.intrusion]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntrusionConfig {
    /// The sliding window refusals are counted in, seconds (default 300).
    pub window_secs: u64,
    /// Refusals naming one meter that make a burst (default 5).
    pub per_meter: usize,
    /// Refusals from one source IP that make a burst (default 10).
    pub per_source: usize,
    /// Login failures for one user that make a burst (default 5).
    pub per_user: usize,
    /// The fleet-wide count in a window is a burst at or above
    /// max(`fleet_min`, `fleet_factor` × baseline) (default 100).
    pub fleet_min: usize,
    /// See `fleet_min` (default 5.0).
    pub fleet_factor: f64,
    /// At most one repeat Raise per alarm key per this many seconds (default 30).
    pub repeat_secs: u64,
    /// Session takeovers of one meter from differing addresses that mean a clone (default 3).
    pub clone_takeovers: usize,
    /// ... within this many seconds (default 600).
    pub clone_window_secs: u64,
    /// Silence after a `certificate_revoked` attempt that raises an alarm, seconds (default 3600).
    pub silence_secs: u64,
}

impl Default for IntrusionConfig {
    fn default() -> Self {
        Self {
            window_secs: 300,
            per_meter: 5,
            per_source: 10,
            per_user: 5,
            fleet_min: 100,
            fleet_factor: 5.0,
            repeat_secs: 30,
            clone_takeovers: 3,
            clone_window_secs: 600,
            silence_secs: 3600,
        }
    }
}

/// `[[detection.feeder]]`: a named group of meters, listed and/or by id prefix.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeederConfig {
    /// The feeder's name (originator `feeder:NAME`); the meter id alphabet.
    pub name: String,
    /// Meter ids on this feeder.
    pub meters: Vec<String>,
    /// Every meter whose id starts with this is on the feeder (the longest matching prefix
    /// wins; a listed meter wins over a prefix).
    pub prefix: Option<String>,
}

/// Largest count threshold accepted (the windows keep that many events per key).
pub const MAX_COUNT_THRESHOLD: usize = 10_000;

fn at_least(key: &str, v: u64, min: u64) -> Result<(), DetectConfigError> {
    if v < min {
        return Err(invalid(key, format!("must be at least {min}")));
    }
    Ok(())
}

fn count(key: &str, v: usize) -> Result<(), DetectConfigError> {
    if v < 1 {
        return Err(invalid(key, "must be at least 1"));
    }
    if v > MAX_COUNT_THRESHOLD {
        return Err(invalid(
            key,
            format!("must be at most {MAX_COUNT_THRESHOLD}"),
        ));
    }
    Ok(())
}

impl DetectionConfig {
    /// Checks every threshold; the error names the offending key.
    pub fn validate(&self) -> Result<(), DetectConfigError> {
        let o = &self.outage;
        count("detection.outage.min_meters", o.min_meters)?;
        if o.min_meters < 2 {
            return Err(invalid("detection.outage.min_meters", "must be at least 2"));
        }
        at_least("detection.outage.window_secs", o.window_secs, 1)?;
        if !(o.clear_share > 0.0 && o.clear_share <= 1.0) {
            return Err(invalid(
                "detection.outage.clear_share",
                "must be greater than 0 and at most 1",
            ));
        }
        let t = &self.theft;
        at_least("detection.theft.observe_secs", t.observe_secs, 10)?;
        if t.observe_secs > 86_400 {
            return Err(invalid(
                "detection.theft.observe_secs",
                "must be at most 86400 (24 h)",
            ));
        }
        if !(1..=31).contains(&t.baseline_days) {
            return Err(invalid(
                "detection.theft.baseline_days",
                "must be between 1 and 31",
            ));
        }
        at_least("detection.theft.min_baseline_secs", t.min_baseline_secs, 1)?;
        if !(t.ratio > 0.0 && t.ratio < 1.0) {
            return Err(invalid(
                "detection.theft.ratio",
                "must be greater than 0 and less than 1",
            ));
        }
        if t.min_observed_secs > t.observe_secs {
            return Err(invalid(
                "detection.theft.min_observed_secs",
                "must be at most detection.theft.observe_secs",
            ));
        }
        at_least("detection.theft.stall_secs", t.stall_secs, 900)?;
        if t.stall_secs > u64::from(t.baseline_days) * 86_400 {
            return Err(invalid(
                "detection.theft.stall_secs",
                "must be at most detection.theft.baseline_days days",
            ));
        }
        if !(t.stall_min_neighbour_kwh.is_finite() && t.stall_min_neighbour_kwh >= 0.0) {
            return Err(invalid(
                "detection.theft.stall_min_neighbour_kwh",
                "must be a number at least 0",
            ));
        }
        let i = &self.intrusion;
        at_least("detection.intrusion.window_secs", i.window_secs, 1)?;
        count("detection.intrusion.per_meter", i.per_meter)?;
        count("detection.intrusion.per_source", i.per_source)?;
        count("detection.intrusion.per_user", i.per_user)?;
        count("detection.intrusion.fleet_min", i.fleet_min)?;
        if !(i.fleet_factor.is_finite() && i.fleet_factor >= 1.0) {
            return Err(invalid(
                "detection.intrusion.fleet_factor",
                "must be a number at least 1",
            ));
        }
        count("detection.intrusion.clone_takeovers", i.clone_takeovers)?;
        if i.clone_takeovers < 2 {
            return Err(invalid(
                "detection.intrusion.clone_takeovers",
                "must be at least 2",
            ));
        }
        at_least(
            "detection.intrusion.clone_window_secs",
            i.clone_window_secs,
            1,
        )?;
        at_least("detection.intrusion.silence_secs", i.silence_secs, 1)?;
        let mut names = HashSet::new();
        let mut listed = HashSet::new();
        for (n, f) in self.feeder.iter().enumerate() {
            let key = format!("detection.feeder[{n}]");
            if MeterId::new(&f.name).is_err() {
                return Err(invalid(
                    format!("{key}.name"),
                    format!(
                        "{:?} is not a valid name (1-64 of A-Z a-z 0-9 . _ -, not starting with . or -)",
                        f.name
                    ),
                ));
            }
            if !names.insert(f.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?} names two feeders", f.name),
                ));
            }
            if f.meters.is_empty() && f.prefix.is_none() {
                return Err(invalid(key, "needs meters = [...] or prefix = \"...\""));
            }
            if let Some(p) = &f.prefix
                && p.is_empty()
            {
                return Err(invalid(format!("{key}.prefix"), "must not be empty"));
            }
            for m in &f.meters {
                if let Err(e) = MeterId::new(m) {
                    return Err(invalid(format!("{key}.meters"), format!("{m:?}: {e}")));
                }
                if !listed.insert(m.as_str()) {
                    return Err(invalid(
                        format!("{key}.meters"),
                        format!("{m:?} is listed on two feeders"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(c: &DetectionConfig) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn default_is_valid() {
        DetectionConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = DetectionConfig::default();
        c.outage.window_secs = 0;
        assert_eq!(err(&c), "detection.outage.window_secs must be at least 1");

        let mut c = DetectionConfig::default();
        c.outage.clear_share = 1.5;
        assert!(err(&c).starts_with("detection.outage.clear_share "));

        let mut c = DetectionConfig::default();
        c.theft.ratio = 1.0;
        assert!(err(&c).starts_with("detection.theft.ratio "));

        let mut c = DetectionConfig::default();
        c.theft.observe_secs = 2 * 86_400;
        assert!(err(&c).starts_with("detection.theft.observe_secs "));

        let mut c = DetectionConfig::default();
        c.intrusion.per_source = 0;
        assert_eq!(err(&c), "detection.intrusion.per_source must be at least 1");

        let mut c = DetectionConfig::default();
        c.intrusion.fleet_factor = f64::NAN;
        assert!(err(&c).starts_with("detection.intrusion.fleet_factor "));

        let mut c = DetectionConfig::default();
        c.feeder.push(FeederConfig {
            name: "f/1".into(),
            ..FeederConfig::default()
        });
        assert!(err(&c).starts_with("detection.feeder[0].name "));

        let mut c = DetectionConfig::default();
        c.feeder.push(FeederConfig {
            name: "f1".into(),
            ..FeederConfig::default()
        });
        assert!(err(&c).starts_with("detection.feeder[0] needs"));

        let mut c = DetectionConfig::default();
        for _ in 0..2 {
            c.feeder.push(FeederConfig {
                name: "f1".into(),
                prefix: Some("m".into()),
                ..FeederConfig::default()
            });
        }
        assert!(err(&c).contains("names two feeders"));
    }

    #[test]
    fn parses_toml_shape_via_json() {
        // The head-end reads TOML; the shape is the same through serde.
        let c: DetectionConfig = serde_json::from_str(
            r#"{"outage":{"min_meters":4},"feeder":[{"name":"f1","prefix":"m00"}]}"#,
        )
        .unwrap();
        assert_eq!(c.outage.min_meters, 4);
        assert_eq!(c.outage.window_secs, 120);
        assert_eq!(c.feeder[0].prefix.as_deref(), Some("m00"));
        c.validate().unwrap();
        assert!(serde_json::from_str::<DetectionConfig>(r#"{"outage":{"bogus":1}}"#).is_err());
    }
}
