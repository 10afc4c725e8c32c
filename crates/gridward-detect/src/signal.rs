//! What the detectors are fed ([`Signal`]) and the meter groups they reason over ([`Topology`]).

use std::collections::HashMap;

use gridward_core::MeterId;
use gridward_core::document::EventKind;
use time::OffsetDateTime;

use crate::config::DetectionConfig;
use crate::model::Originator;

pub use gridward_core::document::ConcentratorEventKind;

/// One input to the detectors. The head-end feeds only what it stored and verified.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// A verified, stored meter event.
    MeterEvent {
        /// The meter.
        meter: MeterId,
        /// The event's own timestamp.
        at: OffsetDateTime,
        /// What happened.
        kind: EventKind,
    },
    /// A verified, stored reading of the cumulative register.
    Reading {
        /// The meter.
        meter: MeterId,
        /// The reading's timestamp.
        at: OffsetDateTime,
        /// The cumulative register, kWh.
        energy_kwh: f64,
    },
    /// A data concentrator's own event (verified with the concentrator's key).
    ConcentratorEvent {
        /// The concentrator.
        concentrator: MeterId,
        /// The event's timestamp.
        at: OffsetDateTime,
        /// What happened.
        kind: ConcentratorEventKind,
        /// The PLC meters concerned (MeterLost / MeterFound).
        meters: Vec<MeterId>,
    },
    /// A security event (a refusal, a login failure, ...), as the head-end records it.
    Security {
        /// When.
        at: OffsetDateTime,
        /// The stable reason code, e.g. `replay`, `certificate_revoked`, `login_bad_password`.
        reason: String,
        /// The meter (or, for `relay_not_authorized`, the concentrator) concerned.
        meter: Option<MeterId>,
        /// The peer, `ip:port` or `ip`.
        source: Option<String>,
        /// The user (login failures).
        user: Option<String>,
        /// Free text.
        detail: String,
    },
    /// A meter's MQTT session opened.
    Connected {
        /// The meter.
        meter: MeterId,
        /// When.
        at: OffsetDateTime,
        /// The peer, `ip:port`.
        source: Option<String>,
    },
    /// A meter's MQTT session closed.
    Disconnected {
        /// The meter.
        meter: MeterId,
        /// When.
        at: OffsetDateTime,
    },
    /// A new connection with the same certificate took over a live session.
    SessionReplaced {
        /// The meter.
        meter: MeterId,
        /// When.
        at: OffsetDateTime,
        /// The replaced session's peer, `ip:port`.
        previous: String,
        /// The new session's peer, `ip:port`.
        current: String,
    },
}

impl Signal {
    /// The signal's timestamp.
    pub fn at(&self) -> OffsetDateTime {
        match self {
            Self::MeterEvent { at, .. }
            | Self::Reading { at, .. }
            | Self::ConcentratorEvent { at, .. }
            | Self::Security { at, .. }
            | Self::Connected { at, .. }
            | Self::Disconnected { at, .. }
            | Self::SessionReplaced { at, .. } => *at,
        }
    }
}

/// Which group (concentrator or feeder) each meter belongs to.
///
/// A meter is in at most one group: a concentrator assignment wins over a feeder, a listed
/// feeder member wins over a feeder prefix, and the longest prefix wins among prefixes.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    explicit_feeder: HashMap<MeterId, Originator>,
    concentrator: HashMap<MeterId, Originator>,
    members: HashMap<Originator, Vec<MeterId>>,
    prefixes: Vec<(String, Originator)>,
}

impl Topology {
    /// No groups.
    pub fn new() -> Self {
        Self::default()
    }

    /// The feeders of `[[detection.feeder]]` (entries that do not validate are skipped: call
    /// [`DetectionConfig::validate`] first).
    pub fn from_config(config: &DetectionConfig) -> Self {
        let mut t = Self::new();
        t.add_config_feeders(config);
        t
    }

    /// Adds the feeders of `[[detection.feeder]]`.
    pub fn add_config_feeders(&mut self, config: &DetectionConfig) {
        for f in &config.feeder {
            let meters: Vec<MeterId> = f
                .meters
                .iter()
                .filter_map(|m| MeterId::new(m).ok())
                .collect();
            self.add_feeder(&f.name, meters);
            if let Some(p) = &f.prefix {
                self.add_feeder_prefix(&f.name, p);
            }
        }
    }

    /// Sets the meters registered behind `concentrator` (replacing its previous list).
    pub fn set_concentrator(
        &mut self,
        concentrator: MeterId,
        meters: impl IntoIterator<Item = MeterId>,
    ) {
        let group = Originator::Concentrator(concentrator);
        if let Some(old) = self.members.remove(&group) {
            for m in old {
                if self.concentrator.get(&m) == Some(&group) {
                    self.concentrator.remove(&m);
                }
            }
        }
        let mut list = Vec::new();
        for m in meters {
            if let Some(Originator::Concentrator(prev)) = self.concentrator.get(&m).cloned() {
                // A meter is behind one concentrator at a time: the newest assignment wins.
                if let Some(v) = self.members.get_mut(&Originator::Concentrator(prev)) {
                    v.retain(|x| x != &m);
                }
            }
            if self.concentrator.insert(m.clone(), group.clone()) != Some(group.clone()) {
                list.push(m);
            }
        }
        self.members.insert(group, list);
    }

    /// Adds meters to the feeder `name` (a meter listed on another feeder moves here).
    pub fn add_feeder(&mut self, name: &str, meters: impl IntoIterator<Item = MeterId>) {
        let group = Originator::Feeder(name.to_owned());
        for m in meters {
            match self.explicit_feeder.insert(m.clone(), group.clone()) {
                Some(prev) if prev == group => continue,
                Some(prev) => {
                    if let Some(v) = self.members.get_mut(&prev) {
                        v.retain(|x| x != &m);
                    }
                }
                None => {}
            }
            self.members.entry(group.clone()).or_default().push(m);
        }
        self.members.entry(group).or_default();
    }

    /// Every meter whose id starts with `prefix` is on the feeder `name`.
    pub fn add_feeder_prefix(&mut self, name: &str, prefix: &str) {
        let group = Originator::Feeder(name.to_owned());
        self.members.entry(group.clone()).or_default();
        self.prefixes.push((prefix.to_owned(), group));
        self.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    }

    /// The group `meter` belongs to.
    pub fn group_of(&self, meter: &MeterId) -> Option<&Originator> {
        if let Some(g) = self.concentrator.get(meter) {
            return Some(g);
        }
        if let Some(g) = self.explicit_feeder.get(meter) {
            return Some(g);
        }
        self.prefixes
            .iter()
            .find(|(p, _)| meter.as_str().starts_with(p.as_str()))
            .map(|(_, g)| g)
    }

    /// The meters explicitly assigned to `group` (a prefix feeder's meters are not known in
    /// advance: the detector learns them as they report).
    pub fn members(&self, group: &Originator) -> &[MeterId] {
        self.members.get(group).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every group known.
    pub fn groups(&self) -> impl Iterator<Item = &Originator> {
        self.members.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MeterId {
        MeterId::new(s).unwrap()
    }

    #[test]
    fn precedence_concentrator_listed_prefix() {
        let mut t = Topology::new();
        t.add_feeder_prefix("short", "m");
        t.add_feeder_prefix("long", "m00");
        t.add_feeder("listed", [m("m001")]);
        t.set_concentrator(m("dc-1"), [m("m002")]);
        assert_eq!(
            t.group_of(&m("m002")),
            Some(&Originator::Concentrator(m("dc-1")))
        );
        assert_eq!(
            t.group_of(&m("m001")),
            Some(&Originator::Feeder("listed".into()))
        );
        assert_eq!(
            t.group_of(&m("m003")),
            Some(&Originator::Feeder("long".into()))
        );
        assert_eq!(
            t.group_of(&m("m1")),
            Some(&Originator::Feeder("short".into()))
        );
        assert_eq!(t.group_of(&m("x1")), None);
        assert_eq!(
            t.members(&Originator::Concentrator(m("dc-1"))),
            &[m("m002")]
        );
    }

    #[test]
    fn set_concentrator_replaces_and_moves() {
        let mut t = Topology::new();
        t.set_concentrator(m("dc-1"), [m("a"), m("b")]);
        t.set_concentrator(m("dc-2"), [m("b")]);
        assert_eq!(t.members(&Originator::Concentrator(m("dc-1"))), &[m("a")]);
        t.set_concentrator(m("dc-1"), []);
        assert_eq!(t.group_of(&m("a")), None);
        assert_eq!(
            t.group_of(&m("b")),
            Some(&Originator::Concentrator(m("dc-2")))
        );
    }
}
