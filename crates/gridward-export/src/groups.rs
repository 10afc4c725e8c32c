//! [`Groups`]: which meters are summed together in an aggregated export.

use std::collections::HashMap;

use gridward_core::MeterId;

use crate::error::ExportError;

/// Longest group name, in bytes.
pub const MAX_GROUP_NAME: usize = 64;

/// Where the groups came from (stated in the metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GroupSource {
    /// The concentrator topology: one group per data concentrator, named by its id.
    Concentrator,
    /// A `meter_id,group` CSV file.
    File,
}

impl GroupSource {
    /// The code in the metadata: `concentrator`, `groups_file`.
    pub fn code(self) -> &'static str {
        match self {
            GroupSource::Concentrator => "concentrator",
            GroupSource::File => "groups_file",
        }
    }
}

/// Each meter's group (a meter is in at most one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    source: GroupSource,
    by_meter: HashMap<MeterId, String>,
}

/// Whether `name` is a group name: 1 to [`MAX_GROUP_NAME`] bytes of `A-Z a-z 0-9 . _ : -`, so
/// that it needs no quoting in CSV and cannot start a spreadsheet formula.
pub fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_GROUP_NAME
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl Groups {
    /// One group per concentrator: `topology` is (concentrator, meter) pairs, as the store's
    /// `AlarmStore::topology` gives them (a meter is behind at most one concentrator; should a
    /// meter appear twice, its last pair wins).
    pub fn from_topology(topology: &[(MeterId, MeterId)]) -> Self {
        Self {
            source: GroupSource::Concentrator,
            by_meter: topology
                .iter()
                .map(|(c, m)| (m.clone(), c.as_str().to_owned()))
                .collect(),
        }
    }

    /// Parses a groups file: one `meter_id,group` per line; blank lines, lines starting with
    /// `#`, and a first line `meter_id,group` are skipped; surrounding spaces are trimmed.
    ///
    /// # Errors
    ///
    /// [`ExportError::GroupsFile`] naming the line: not two fields, a bad meter id, a bad
    /// group name (see [`valid_group_name`]), or a meter listed twice.
    pub fn parse_csv(text: &str) -> Result<Self, ExportError> {
        let mut by_meter = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let err = |reason: String| ExportError::GroupsFile { line, reason };
            let fields: Vec<&str> = l.split(',').map(str::trim).collect();
            if by_meter.is_empty() && fields == ["meter_id", "group"] {
                continue;
            }
            let [meter, group] = fields[..] else {
                return Err(err(format!(
                    "expected `meter_id,group`, found {} field(s)",
                    fields.len()
                )));
            };
            let meter = MeterId::new(meter)
                .map_err(|e| err(format!("{meter:?} is not a meter id: {e}")))?;
            if !valid_group_name(group) {
                return Err(err(format!(
                    "{group:?} is not a group name (1 to {MAX_GROUP_NAME} of A-Z a-z 0-9 . _ : -, \
                     not starting with -)"
                )));
            }
            if by_meter.insert(meter.clone(), group.to_owned()).is_some() {
                return Err(err(format!(
                    "meter {meter} is listed twice (a meter is in one group)"
                )));
            }
        }
        Ok(Self {
            source: GroupSource::File,
            by_meter,
        })
    }

    /// Where the groups came from.
    pub fn source(&self) -> GroupSource {
        self.source
    }

    /// The group of `meter`, if it is in one.
    pub fn group_of(&self, meter: &MeterId) -> Option<&str> {
        self.by_meter.get(meter).map(String::as_str)
    }

    /// How many meters are in a group.
    pub fn len(&self) -> usize {
        self.by_meter.len()
    }

    /// Whether no meter is in a group.
    pub fn is_empty(&self) -> bool {
        self.by_meter.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> MeterId {
        MeterId::new(s).unwrap()
    }

    #[test]
    fn a_groups_file_parses() {
        let g = Groups::parse_csv(
            "meter_id,group\n# feeder 7\nGW1, feeder-7\n\nGW2,feeder-7\r\nGW3,street:elm\n",
        )
        .unwrap();
        assert_eq!(g.source(), GroupSource::File);
        assert_eq!(g.len(), 3);
        assert_eq!(g.group_of(&m("GW1")), Some("feeder-7"));
        assert_eq!(g.group_of(&m("GW3")), Some("street:elm"));
        assert_eq!(g.group_of(&m("GW4")), None);
    }

    #[test]
    fn bad_groups_files_name_the_line() {
        for (text, line, says) in [
            ("GW1\n", 1, "field"),
            ("GW1,a,b\n", 1, "field"),
            ("GW1,a\nbad id!,a\n", 2, "meter id"),
            ("GW1,=HYPERLINK(1)\n", 1, "group name"),
            ("GW1,\n", 1, "group name"),
            ("GW1,-2\n", 1, "group name"),
            (&format!("GW1,{}\n", "x".repeat(65)), 1, "group name"),
            ("GW1,a\n\nGW1,b\n", 3, "twice"),
        ] {
            match Groups::parse_csv(text) {
                Err(ExportError::GroupsFile { line: l, reason }) => {
                    assert_eq!(l, line, "{text:?}");
                    assert!(reason.contains(says), "{text:?}: {reason}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_topology_groups_by_concentrator() {
        let g = Groups::from_topology(&[(m("dc-1"), m("GW1")), (m("dc-2"), m("GW2"))]);
        assert_eq!(g.source(), GroupSource::Concentrator);
        assert_eq!(g.group_of(&m("GW2")), Some("dc-2"));
        assert_eq!(g.group_of(&m("dc-1")), None);
    }
}
