//! The alarm model: severities, alarm types, originators, evidence and the actions a detector
//! emits. Every `code()` here is a stable string stored by `gridward-store` and shown by the API.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use gridward_core::MeterId;
use serde::Serialize;
use time::OffsetDateTime;

/// How bad an alarm is. `Ord` ranks [`Severity::Critical`] highest, so `max()` picks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// Needs action now (outage, theft, cloned meter, fleet-wide attack).
    Critical,
    /// Needs action soon (tamper, refusal bursts, stalled register).
    Major,
    /// Worth knowing (one meter's power failure, a PLC meter lost).
    Minor,
    /// Informational.
    Warning,
}

impl Severity {
    /// Every severity, highest first.
    pub const ALL: [Severity; 4] = [
        Severity::Critical,
        Severity::Major,
        Severity::Minor,
        Severity::Warning,
    ];

    /// `critical`, `major`, `minor` or `warning`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Major => "major",
            Self::Minor => "minor",
            Self::Warning => "warning",
        }
    }

    /// The severity named `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }

    fn rank(self) -> u8 {
        match self {
            Self::Critical => 3,
            Self::Major => 2,
            Self::Minor => 1,
            Self::Warning => 0,
        }
    }
}

impl PartialOrd for Severity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Severity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// What an alarm is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlarmType {
    /// CoverOpened, TerminalCoverOpened, MagneticField or ReverseEnergy at a meter.
    Tamper,
    /// One meter's supply failed.
    PowerFailure,
    /// Several meters of one group (concentrator or feeder) lost supply.
    Outage,
    /// Consumption well below the meter's own baseline after a tamper trigger.
    TheftSuspected,
    /// A register that stopped while its neighbours consumed.
    RegisterStalled,
    /// A burst of refusals for one meter, source address or user.
    RefusalBurst,
    /// The fleet-wide refusal rate above its baseline.
    RefusalBurstFleet,
    /// The same meter certificate connected from two addresses, repeatedly.
    ClonedMeter,
    /// A meter that went silent after a `certificate_revoked` attempt.
    SilentAfterRevocation,
    /// A concentrator reported a PLC meter lost.
    PlcMeterLost,
    /// A concentrator relayed for an unregistered meter or altered an envelope.
    RelayRefused,
}

impl AlarmType {
    /// Every alarm type.
    pub const ALL: [AlarmType; 11] = [
        AlarmType::Tamper,
        AlarmType::PowerFailure,
        AlarmType::Outage,
        AlarmType::TheftSuspected,
        AlarmType::RegisterStalled,
        AlarmType::RefusalBurst,
        AlarmType::RefusalBurstFleet,
        AlarmType::ClonedMeter,
        AlarmType::SilentAfterRevocation,
        AlarmType::PlcMeterLost,
        AlarmType::RelayRefused,
    ];

    /// The stable code, e.g. `tamper`, `refusal_burst_fleet`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Tamper => "tamper",
            Self::PowerFailure => "power_failure",
            Self::Outage => "outage",
            Self::TheftSuspected => "theft_suspected",
            Self::RegisterStalled => "register_stalled",
            Self::RefusalBurst => "refusal_burst",
            Self::RefusalBurstFleet => "refusal_burst_fleet",
            Self::ClonedMeter => "cloned_meter",
            Self::SilentAfterRevocation => "silent_after_revocation",
            Self::PlcMeterLost => "plc_meter_lost",
            Self::RelayRefused => "relay_refused",
        }
    }

    /// The type named `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The severity this type is raised with.
    pub fn default_severity(self) -> Severity {
        match self {
            Self::Outage | Self::TheftSuspected | Self::RefusalBurstFleet | Self::ClonedMeter => {
                Severity::Critical
            }
            Self::Tamper
            | Self::RegisterStalled
            | Self::RefusalBurst
            | Self::SilentAfterRevocation
            | Self::RelayRefused => Severity::Major,
            Self::PowerFailure | Self::PlcMeterLost => Severity::Minor,
        }
    }
}

impl fmt::Display for AlarmType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Who (or what) an alarm is about. With the type it forms the alarm's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Originator {
    /// `meter:ID`.
    Meter(MeterId),
    /// `concentrator:ID`.
    Concentrator(MeterId),
    /// `feeder:NAME` (configured in `[[detection.feeder]]`).
    Feeder(String),
    /// `source:IP` — the IP address only, never a port.
    Source(String),
    /// `user:NAME` (login failures).
    User(String),
    /// `fleet`: the whole fleet.
    Fleet,
}

impl Originator {
    /// The stable code: `meter:ID`, `concentrator:ID`, `feeder:NAME`, `source:IP`, `user:NAME`
    /// or `fleet`.
    pub fn code(&self) -> String {
        match self {
            Self::Meter(m) => format!("meter:{m}"),
            Self::Concentrator(c) => format!("concentrator:{c}"),
            Self::Feeder(n) => format!("feeder:{n}"),
            Self::Source(ip) => format!("source:{ip}"),
            Self::User(u) => format!("user:{u}"),
            Self::Fleet => "fleet".to_owned(),
        }
    }

    /// Parses a code made by [`Originator::code`]; `None` if it is not one.
    pub fn parse(code: &str) -> Option<Self> {
        if code == "fleet" {
            return Some(Self::Fleet);
        }
        let (kind, rest) = code.split_once(':')?;
        if rest.is_empty() {
            return None;
        }
        match kind {
            "meter" => MeterId::new(rest).ok().map(Self::Meter),
            "concentrator" => MeterId::new(rest).ok().map(Self::Concentrator),
            "feeder" => Some(Self::Feeder(rest.to_owned())),
            "source" => rest
                .parse::<IpAddr>()
                .ok()
                .map(|ip| Self::Source(ip.to_string())),
            "user" => Some(Self::User(rest.to_owned())),
            _ => None,
        }
    }

    /// `source:IP` for an address given as `ip:port`, `[v6]:port` or a bare IP (the port is
    /// dropped). An unparsable address is kept as given.
    pub fn source(address: &str) -> Self {
        Self::Source(strip_port(address))
    }
}

impl fmt::Display for Originator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code())
    }
}

/// The IP part of `ip:port`, `[v6]:port` or a bare IP; anything else unchanged.
pub fn strip_port(address: &str) -> String {
    if let Ok(sa) = address.parse::<SocketAddr>() {
        return sa.ip().to_string();
    }
    let trimmed = address.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return ip.to_string();
    }
    address.to_owned()
}

fn ser_opt_meter<S: serde::Serializer>(m: &Option<MeterId>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_some(m.as_str()),
        None => s.serialize_none(),
    }
}

/// One thing that made a detector raise an alarm.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    /// When it happened (RFC 3339 in JSON).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// What it was: `event:CoverOpened`, `security:replay`, `reading`, `baseline`,
    /// `observed`, `session_replaced`, `concentrator:PowerFail`, ...
    pub what: String,
    /// The meter concerned, if any.
    #[serde(serialize_with = "ser_opt_meter")]
    pub meter: Option<MeterId>,
    /// The source address concerned, if any.
    pub source: Option<String>,
    /// Free text for people (figures, addresses).
    pub detail: String,
}

impl Evidence {
    /// Evidence with no meter, no source and no detail.
    pub fn new(at: OffsetDateTime, what: impl Into<String>) -> Self {
        Self {
            at,
            what: what.into(),
            meter: None,
            source: None,
            detail: String::new(),
        }
    }

    /// With the meter set.
    pub fn meter(mut self, meter: &MeterId) -> Self {
        self.meter = Some(meter.clone());
        self
    }

    /// With the source set.
    pub fn source(mut self, source: Option<&str>) -> Self {
        self.source = source.map(str::to_owned);
        self
    }

    /// With the detail set.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// The evidence as a JSON array (what `AlarmStore` stores).
pub fn evidence_json(e: &[Evidence]) -> String {
    serde_json::to_string(e).unwrap_or_else(|_| "[]".to_owned())
}

/// Raise (or repeat) the alarm keyed by (`alarm_type`, `originator`).
#[derive(Debug, Clone, PartialEq)]
pub struct Raise {
    /// The alarm type.
    pub alarm_type: AlarmType,
    /// Its severity (normally `alarm_type.default_severity()`).
    pub severity: Severity,
    /// Who it is about.
    pub originator: Originator,
    /// The detector's `now` when it decided.
    pub at: OffsetDateTime,
    /// One line for people.
    pub summary: String,
    /// What triggered it.
    pub evidence: Vec<Evidence>,
}

/// Clear the active alarm keyed by (`alarm_type`, `originator`), if there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Clear {
    /// The alarm type.
    pub alarm_type: AlarmType,
    /// Who it is about.
    pub originator: Originator,
    /// The detector's `now` when it decided.
    pub at: OffsetDateTime,
    /// Why, for people (e.g. `PowerRestore`, `part of outage feeder:f1`).
    pub reason: String,
}

/// What a detector asks the alarm store to do.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmAction {
    /// Raise or repeat an alarm.
    Raise(Raise),
    /// Clear an alarm.
    Clear(Clear),
}

impl AlarmAction {
    /// The alarm type acted on.
    pub fn alarm_type(&self) -> AlarmType {
        match self {
            Self::Raise(r) => r.alarm_type,
            Self::Clear(c) => c.alarm_type,
        }
    }

    /// The originator acted on.
    pub fn originator(&self) -> &Originator {
        match self {
            Self::Raise(r) => &r.originator,
            Self::Clear(c) => &c.originator,
        }
    }

    /// The raise, if this is one.
    pub fn as_raise(&self) -> Option<&Raise> {
        match self {
            Self::Raise(r) => Some(r),
            Self::Clear(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn severity_codes_round_trip_and_critical_is_max() {
        for s in Severity::ALL {
            assert_eq!(Severity::from_code(s.code()), Some(s));
        }
        assert_eq!(Severity::ALL.into_iter().max(), Some(Severity::Critical));
        assert!(Severity::Major > Severity::Minor);
        assert_eq!(Severity::from_code("fatal"), None);
    }

    #[test]
    fn alarm_type_codes_round_trip() {
        for t in AlarmType::ALL {
            assert_eq!(AlarmType::from_code(t.code()), Some(t));
        }
        assert_eq!(AlarmType::Outage.default_severity(), Severity::Critical);
        assert_eq!(AlarmType::Tamper.default_severity(), Severity::Major);
        assert_eq!(AlarmType::PowerFailure.default_severity(), Severity::Minor);
        assert_eq!(AlarmType::from_code("nope"), None);
    }

    #[test]
    fn originator_codes_round_trip() {
        let m = MeterId::new("m1").unwrap();
        for o in [
            Originator::Meter(m.clone()),
            Originator::Concentrator(m),
            Originator::Feeder("f1".into()),
            Originator::Source("10.0.0.7".into()),
            Originator::Source("2001:db8::1".into()),
            Originator::User("alice".into()),
            Originator::Fleet,
        ] {
            assert_eq!(Originator::parse(&o.code()), Some(o.clone()), "{o}");
        }
        assert_eq!(Originator::parse("meter:"), None);
        assert_eq!(Originator::parse("meter:bad/id"), None);
        assert_eq!(Originator::parse("source:10.0.0.7:80"), None);
        assert_eq!(Originator::parse("planet:earth"), None);
    }

    #[test]
    fn source_strips_the_port() {
        assert_eq!(
            Originator::source("10.0.0.7:4711").code(),
            "source:10.0.0.7"
        );
        assert_eq!(Originator::source("10.0.0.7").code(), "source:10.0.0.7");
        assert_eq!(Originator::source("[::1]:8883").code(), "source:::1");
        assert_eq!(Originator::source("[::1]").code(), "source:::1");
    }

    #[test]
    fn evidence_serialises_rfc3339() {
        let e = Evidence::new(datetime!(2026-12-03 10:00 UTC), "event:CoverOpened")
            .meter(&MeterId::new("m1").unwrap())
            .detail("x");
        let j = evidence_json(&[e]);
        assert_eq!(
            j,
            r#"[{"at":"2026-12-03T10:00:00Z","what":"event:CoverOpened","meter":"m1","source":null,"detail":"x"}]"#
        );
    }
}
