//! Live behaviours of a simulated fleet with known ground truth, for scoring detection: a thief
//! who opens the cover and bypasses half the load, a feeder outage, a cloned meter, and the
//! faults of a data concentrator (a PLC meter lost, an altered or unauthorised relay).
//!
//! A [`Behaviour`] is scheduled relative to the start of the fleet
//! ([`FleetConfig::behaviours`](crate::fleet::FleetConfig::behaviours)); every time one takes
//! effect, the fleet records a [`GroundTruth`] stamped with its wall clock
//! ([`Fleet::ground_truth`](crate::fleet::Fleet::ground_truth), `FleetReport::ground_truth`).

use std::time::Duration;

use gridward_core::MeterId;
use gridward_core::document::{EventKind, format_timestamp};
use time::OffsetDateTime;

use crate::identity::MeterIdentity;

/// The share of the load a thief leaves metered by default: half of it bypasses the meter.
pub const DEFAULT_METERED_SHARE: f64 = 0.5;

/// Default spread of the last gasps of an outage's meters (and of their restores).
pub const DEFAULT_OUTAGE_SPREAD: Duration = Duration::from_secs(3);

/// Something a fleet does on its own during a run.
#[derive(Debug)]
pub enum Behaviour {
    /// `after` the start, `meter` signs `event` (a cover opened), then only `metered_share` of
    /// its load is metered for the rest of the run (its register grows that much slower).
    Theft {
        /// The meter.
        meter: MeterId,
        /// When, from the start of the fleet.
        after: Duration,
        /// The tamper event it signs first (e.g. [`EventKind::CoverOpened`]).
        event: EventKind,
        /// The share of the load still metered (0..=1).
        metered_share: f64,
    },
    /// `after` the start, the `meters` lose power within `spread` of each other: each signs a
    /// PowerFail (its last gasp), takes no readings and its register stands still; `duration`
    /// later (within `spread` again) each signs a PowerRestore and resumes. `None`: the power
    /// stays off until the end of the run.
    Outage {
        /// A name for the ground truth (e.g. the prefix or list given on the command line).
        name: String,
        /// The meters on the failing feeder (direct or behind a concentrator).
        meters: Vec<MeterId>,
        /// When the first may fail, from the start of the fleet.
        after: Duration,
        /// How long the power is off.
        duration: Option<Duration>,
        /// The last gasps (and the restores) are spread over this.
        spread: Duration,
    },
    /// `after` the start, a second device with the same certificate and key as one of the
    /// fleet's meters connects alongside it (same MQTT ClientID, so a head-end's takeover rule
    /// drops each when the other connects; both reconnect with backoff). It counts its own
    /// counters from the meter's persisted mark, without persisting them, so many of its
    /// messages reuse counters the genuine meter used and are refused as replays.
    Clone {
        /// The cloned meter's identity, loaded a second time (the same files).
        identity: MeterIdentity,
        /// When it starts connecting.
        after: Duration,
    },
    /// `after` the start, a device from the local address `source` that holds no certificate
    /// of the PKI tries `attempts` connections, one every `interval`, each a TLS handshake with
    /// `tls` and a CONNECT as `client_id`: a head-end refuses each, bans the source and raises
    /// a refusal burst on it.
    BruteForce {
        /// The local address it connects from (e.g. `127.0.0.9`).
        source: std::net::IpAddr,
        /// When it starts.
        after: Duration,
        /// How many connections it tries.
        attempts: u32,
        /// The pause between two.
        interval: Duration,
        /// The ClientID it claims.
        client_id: String,
        /// Its TLS configuration (it trusts the server; what it presents is refused).
        tls: std::sync::Arc<rustls::ClientConfig>,
    },
}

impl Behaviour {
    /// A thief on `meter` at `after` with the usual cover event and share.
    pub fn theft(meter: MeterId, after: Duration) -> Self {
        Self::Theft {
            meter,
            after,
            event: EventKind::CoverOpened,
            metered_share: DEFAULT_METERED_SHARE,
        }
    }
}

/// What a behaviour did, as it happened: what detection is scored against.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GroundTruth {
    /// A thief opened the cover and bypasses part of the load from `at` on.
    Theft {
        /// The meter.
        meter: MeterId,
        /// When (the event's time).
        at: OffsetDateTime,
        /// The event it signed.
        event: EventKind,
        /// The share of the load still metered.
        metered_share: f64,
    },
    /// A feeder outage.
    Outage {
        /// Its name.
        name: String,
        /// Every meter of it.
        meters: Vec<MeterId>,
        /// When the first meter lost power.
        failed_at: OffsetDateTime,
        /// When the last meter had its power back (`None`: not before the end of the run).
        restored_at: Option<OffsetDateTime>,
    },
    /// A clone of `meter` started connecting at `at`.
    Clone {
        /// The cloned meter.
        meter: MeterId,
        /// When.
        at: OffsetDateTime,
    },
    /// A brute-forcing source started connecting at `at`.
    BruteForce {
        /// Its address.
        source: String,
        /// When.
        at: OffsetDateTime,
        /// How many connections it was to try.
        attempts: u32,
    },
    /// A concentrator lost contact with a PLC meter (and reported MeterLost).
    PlcLoss {
        /// The concentrator.
        concentrator: MeterId,
        /// The meter.
        meter: MeterId,
        /// When.
        lost_at: OffsetDateTime,
        /// When it was found again (`None`: not before the end of the run).
        found_at: Option<OffsetDateTime>,
    },
    /// A concentrator relayed an envelope of `meter` with one byte flipped.
    AlteredRelay {
        /// The concentrator.
        concentrator: MeterId,
        /// Whose envelope.
        meter: MeterId,
        /// When it was published.
        at: OffsetDateTime,
    },
    /// A concentrator relayed an envelope of a meter not registered behind it.
    UnauthorizedRelay {
        /// The concentrator.
        concentrator: MeterId,
        /// The foreign meter.
        meter: MeterId,
        /// When it was published.
        at: OffsetDateTime,
    },
}

impl GroundTruth {
    /// A short code: `theft`, `outage`, `clone`, `brute_force`, `plc_loss`, `altered_relay`,
    /// `unauthorized_relay`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Theft { .. } => "theft",
            Self::Outage { .. } => "outage",
            Self::Clone { .. } => "clone",
            Self::BruteForce { .. } => "brute_force",
            Self::PlcLoss { .. } => "plc_loss",
            Self::AlteredRelay { .. } => "altered_relay",
            Self::UnauthorizedRelay { .. } => "unauthorized_relay",
        }
    }

    /// When it began.
    pub fn at(&self) -> OffsetDateTime {
        match self {
            Self::Theft { at, .. }
            | Self::Clone { at, .. }
            | Self::BruteForce { at, .. }
            | Self::AlteredRelay { at, .. }
            | Self::UnauthorizedRelay { at, .. } => *at,
            Self::Outage { failed_at, .. } => *failed_at,
            Self::PlcLoss { lost_at, .. } => *lost_at,
        }
    }

    /// One JSON object (one line), e.g.
    /// `{"kind":"theft","meter":"m000001","at":"2026-12-03T10:00:00Z","event":"CoverOpened","metered_share":0.5}`.
    pub fn to_json(&self) -> String {
        let ts = |t: &OffsetDateTime| serde_json::Value::String(format_timestamp(*t));
        let opt = |t: &Option<OffsetDateTime>| t.as_ref().map_or(serde_json::Value::Null, ts);
        let v = match self {
            Self::Theft {
                meter,
                at,
                event,
                metered_share,
            } => serde_json::json!({
                "kind": self.kind(), "meter": meter.as_str(), "at": ts(at),
                "event": event.as_str(), "metered_share": metered_share,
            }),
            Self::Outage {
                name,
                meters,
                failed_at,
                restored_at,
            } => serde_json::json!({
                "kind": self.kind(), "name": name,
                "meters": meters.iter().map(MeterId::as_str).collect::<Vec<_>>(),
                "failed_at": ts(failed_at), "restored_at": opt(restored_at),
            }),
            Self::Clone { meter, at } => serde_json::json!({
                "kind": self.kind(), "meter": meter.as_str(), "at": ts(at),
            }),
            Self::BruteForce {
                source,
                at,
                attempts,
            } => serde_json::json!({
                "kind": self.kind(), "source": source, "at": ts(at), "attempts": attempts,
            }),
            Self::PlcLoss {
                concentrator,
                meter,
                lost_at,
                found_at,
            } => serde_json::json!({
                "kind": self.kind(), "concentrator": concentrator.as_str(),
                "meter": meter.as_str(), "lost_at": ts(lost_at), "found_at": opt(found_at),
            }),
            Self::AlteredRelay {
                concentrator,
                meter,
                at,
            }
            | Self::UnauthorizedRelay {
                concentrator,
                meter,
                at,
            } => serde_json::json!({
                "kind": self.kind(), "concentrator": concentrator.as_str(),
                "meter": meter.as_str(), "at": ts(at),
            }),
        };
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use time::macros::datetime;

    use super::*;

    #[test]
    fn ground_truth_is_one_json_line() {
        let t = datetime!(2026-12-03 10:00 UTC);
        let m = MeterId::new("m000001").unwrap();
        let theft = GroundTruth::Theft {
            meter: m.clone(),
            at: t,
            event: EventKind::CoverOpened,
            metered_share: 0.5,
        };
        let v: serde_json::Value = serde_json::from_str(&theft.to_json()).unwrap();
        assert_eq!(v["kind"], "theft");
        assert_eq!(v["meter"], "m000001");
        assert_eq!(v["at"], "2026-12-03T10:00:00Z");
        assert_eq!(v["event"], "CoverOpened");
        let outage = GroundTruth::Outage {
            name: "m0000".into(),
            meters: vec![m],
            failed_at: t,
            restored_at: None,
        };
        let line = outage.to_json();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["restored_at"], serde_json::Value::Null);
        assert_eq!(outage.at(), t);
        assert_eq!(outage.kind(), "outage");
    }
}
