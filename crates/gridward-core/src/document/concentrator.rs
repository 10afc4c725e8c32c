//! The data concentrator's own event document (`docs/wire-format.md` §11.4), JSON only:
//!
//! ```text
//! {"ConcentratorID":"dc-1","Timestamp":"2026-12-03T10:00:00Z","EventType":"MeterLost","Meters":["m1","m2"]}
//! ```

use std::fmt;
use std::str::FromStr;

use time::OffsetDateTime;

use super::{DocumentError, check_timestamp, format_timestamp, parse_timestamp, snippet};
use crate::MeterId;

/// Most meter ids in one [`ConcentratorEvent`].
pub const MAX_CONCENTRATOR_EVENT_METERS: usize = 1024;

/// What happened at a data concentrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConcentratorEventKind {
    /// The concentrator's own supply failed.
    PowerFail,
    /// The concentrator's supply came back.
    PowerRestore,
    /// Meters stopped answering on the concentrator's PLC segment (listed in `Meters`).
    MeterLost,
    /// Meters answer again on the concentrator's PLC segment (listed in `Meters`).
    MeterFound,
}

impl ConcentratorEventKind {
    /// Every kind, in declaration order.
    pub const ALL: [ConcentratorEventKind; 4] = [
        ConcentratorEventKind::PowerFail,
        ConcentratorEventKind::PowerRestore,
        ConcentratorEventKind::MeterLost,
        ConcentratorEventKind::MeterFound,
    ];

    /// The name used in documents, e.g. `MeterLost`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConcentratorEventKind::PowerFail => "PowerFail",
            ConcentratorEventKind::PowerRestore => "PowerRestore",
            ConcentratorEventKind::MeterLost => "MeterLost",
            ConcentratorEventKind::MeterFound => "MeterFound",
        }
    }

    /// Whether the kind is about meters (`MeterLost`, `MeterFound`), so `Meters` must list at
    /// least one; for the power kinds it must be empty.
    pub fn lists_meters(self) -> bool {
        matches!(
            self,
            ConcentratorEventKind::MeterLost | ConcentratorEventKind::MeterFound
        )
    }
}

impl FromStr for ConcentratorEventKind {
    type Err = DocumentError;

    /// Exactly one of the names of [`ConcentratorEventKind::as_str`] (case-sensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConcentratorEventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DocumentError::UnknownConcentratorEventType(snippet(s)))
    }
}

impl fmt::Display for ConcentratorEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event a data concentrator reports about itself or its PLC segment, signed with the
/// concentrator's own key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConcentratorEvent {
    /// The concentrator that raised the event.
    pub concentrator_id: MeterId,
    /// When it happened, in UTC, whole seconds.
    pub timestamp: OffsetDateTime,
    /// What happened.
    pub kind: ConcentratorEventKind,
    /// The meters concerned: 1 to [`MAX_CONCENTRATOR_EVENT_METERS`] distinct ids for
    /// `MeterLost` and `MeterFound`, empty for the power kinds.
    pub meters: Vec<MeterId>,
}

impl ConcentratorEvent {
    /// A validated event: the timestamp is normalised to UTC and must be in whole seconds
    /// within the accepted years; `meters` must follow the rules of
    /// [`ConcentratorEvent::meters`].
    pub fn new(
        concentrator_id: MeterId,
        timestamp: OffsetDateTime,
        kind: ConcentratorEventKind,
        meters: Vec<MeterId>,
    ) -> Result<Self, DocumentError> {
        let timestamp = check_timestamp(timestamp)?;
        check_meters(kind, &meters)?;
        Ok(Self {
            concentrator_id,
            timestamp,
            kind,
            meters,
        })
    }

    /// The canonical JSON form, e.g.
    /// `{"ConcentratorID":"dc-1","Timestamp":"2026-12-03T10:00:00Z","EventType":"MeterLost","Meters":["m1","m2"]}`;
    /// `Meters` is always written (`[]` for the power kinds).
    pub fn to_json(&self) -> String {
        // MeterId's alphabet needs no JSON escaping; the timestamp is canonical.
        let meters: Vec<String> = self.meters.iter().map(|m| format!("\"{m}\"")).collect();
        format!(
            r#"{{"ConcentratorID":"{}","Timestamp":"{}","EventType":"{}","Meters":[{}]}}"#,
            self.concentrator_id,
            format_timestamp(self.timestamp),
            self.kind,
            meters.join(","),
        )
    }
}

/// The `Meters` rules: 1 to [`MAX_CONCENTRATOR_EVENT_METERS`] distinct ids for the meter kinds,
/// none for the power kinds.
fn check_meters(kind: ConcentratorEventKind, meters: &[MeterId]) -> Result<(), DocumentError> {
    if meters.len() > MAX_CONCENTRATOR_EVENT_METERS {
        return Err(DocumentError::TooManyMeters {
            count: meters.len(),
            max: MAX_CONCENTRATOR_EVENT_METERS,
        });
    }
    match (kind.lists_meters(), meters.is_empty()) {
        (true, true) => return Err(DocumentError::MetersRequired(kind.as_str())),
        (false, false) => return Err(DocumentError::MetersNotAllowed(kind.as_str())),
        _ => {}
    }
    let mut seen: std::collections::HashSet<&MeterId> =
        std::collections::HashSet::with_capacity(meters.len());
    for m in meters {
        if !seen.insert(m) {
            return Err(DocumentError::DuplicateMeter(m.to_string()));
        }
    }
    Ok(())
}

/// Builds a concentrator event from present fields, validating each value in document order
/// (`meters` as found: each entry a string, or the JSON type name of what it is instead).
pub(super) fn build(
    concentrator_id: &str,
    timestamp: &str,
    event_type: &str,
    meters: Vec<Result<String, &'static str>>,
) -> Result<super::Document, DocumentError> {
    let concentrator_id = MeterId::new(concentrator_id)?;
    let timestamp = parse_timestamp(timestamp)?;
    let kind: ConcentratorEventKind = event_type.parse()?;
    if meters.len() > MAX_CONCENTRATOR_EVENT_METERS {
        return Err(DocumentError::TooManyMeters {
            count: meters.len(),
            max: MAX_CONCENTRATOR_EVENT_METERS,
        });
    }
    let meters = meters
        .into_iter()
        .map(|m| match m {
            Ok(s) => Ok(MeterId::new(&s)?),
            Err(found) => Err(DocumentError::WrongType {
                field: "Meters",
                expected: "array of strings",
                found,
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_meters(kind, &meters)?;
    Ok(super::Document::ConcentratorEvent(ConcentratorEvent {
        concentrator_id,
        timestamp,
        kind,
        meters,
    }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use time::macros::datetime;

    use super::super::{Document, Format, Limits, parse};
    use super::*;
    use crate::MeterIdError;

    const LOST: &str = r#"{"ConcentratorID":"dc-1","Timestamp":"2026-12-03T10:00:00Z","EventType":"MeterLost","Meters":["m1","m2"]}"#;

    fn json(s: &str) -> Result<Document, DocumentError> {
        parse(s.as_bytes(), Format::Json, &Limits::default())
    }

    fn id(s: &str) -> MeterId {
        MeterId::new(s).unwrap()
    }

    fn lost() -> ConcentratorEvent {
        ConcentratorEvent {
            concentrator_id: id("dc-1"),
            timestamp: datetime!(2026-12-03 10:00:00 UTC),
            kind: ConcentratorEventKind::MeterLost,
            meters: vec![id("m1"), id("m2")],
        }
    }

    #[test]
    fn parses_the_plan_example_and_writes_it_back() {
        let doc = json(LOST).unwrap();
        assert_eq!(doc, Document::ConcentratorEvent(lost()));
        assert_eq!(doc.meter_id(), &id("dc-1"));
        assert_eq!(doc.timestamp(), datetime!(2026-12-03 10:00:00 UTC));
        assert_eq!(doc.kind_name(), "concentrator_event");
        assert!(doc.is_concentrator_event());
        assert!(!doc.has_xml_form());
        assert_eq!(doc.encoding_format(Format::Xml), Format::Json);
        assert_eq!(doc.to_json(), LOST);
        assert_eq!(doc.to_xml(), LOST);
        assert_eq!(doc.encode(Format::Xml), LOST);
        assert_eq!(Document::from(lost()), doc);
        // Any key order and whitespace.
        let spaced = r#" { "Meters" : [ "m1" , "m2" ], "EventType":"MeterLost", "Timestamp":"2026-12-03T11:00:00+01:00", "ConcentratorID":"dc-1" } "#;
        assert_eq!(json(spaced).unwrap(), doc);
        // The XML parser knows no such root.
        assert!(matches!(
            parse(b"<ConcentratorEvent/>", Format::Xml, &Limits::default()),
            Err(DocumentError::UnknownRoot(_))
        ));
    }

    #[test]
    fn power_events_have_no_meters() {
        for kind in ["PowerFail", "PowerRestore"] {
            let absent = format!(
                r#"{{"ConcentratorID":"dc-1","Timestamp":"2026-12-03T10:00:00Z","EventType":"{kind}"}}"#
            );
            let empty = absent.replace("\"}", "\",\"Meters\":[]}");
            let doc = json(&absent).unwrap();
            assert_eq!(json(&empty).unwrap(), doc);
            assert_eq!(doc.to_json(), empty);
            let Document::ConcentratorEvent(e) = doc else {
                panic!()
            };
            assert_eq!(e.kind.as_str(), kind);
            assert!(e.meters.is_empty());
            assert_eq!(
                json(&absent.replace("\"}", "\",\"Meters\":[\"m1\"]}")),
                Err(DocumentError::MetersNotAllowed(e.kind.as_str()))
            );
        }
    }

    #[test]
    fn meter_lists_follow_the_rules() {
        let with = |meters: &str| json(&LOST.replace(r#"["m1","m2"]"#, meters));
        assert_eq!(with("[]"), Err(DocumentError::MetersRequired("MeterLost")));
        assert_eq!(
            json(&LOST.replace(r#","Meters":["m1","m2"]"#, "")),
            Err(DocumentError::MetersRequired("MeterLost"))
        );
        assert_eq!(
            json(
                &LOST
                    .replace("MeterLost", "MeterFound")
                    .replace(r#"["m1","m2"]"#, "[]")
            ),
            Err(DocumentError::MetersRequired("MeterFound"))
        );
        assert_eq!(
            with(r#"["m1","m2","m1"]"#),
            Err(DocumentError::DuplicateMeter("m1".into()))
        );
        assert_eq!(
            with(r#"["m1","/"]"#),
            Err(DocumentError::InvalidMeterId(MeterIdError::InvalidChar(
                '/'
            )))
        );
        let wt = |found| {
            Err(DocumentError::WrongType {
                field: "Meters",
                expected: "array of strings",
                found,
            })
        };
        assert_eq!(with(r#"["m1",2]"#), wt("number"));
        assert_eq!(with(r#"["m1",null]"#), wt("null"));
        assert_eq!(with(r#"[["m1"]]"#), wt("array"));
        assert_eq!(with(r#"[{"m":1}]"#), wt("object"));
        assert_eq!(
            with(r#""m1""#),
            Err(DocumentError::WrongType {
                field: "Meters",
                expected: "array",
                found: "string"
            })
        );
        let max: Vec<String> = (0..MAX_CONCENTRATOR_EVENT_METERS)
            .map(|i| format!("\"m{i}\""))
            .collect();
        let Document::ConcentratorEvent(e) = with(&format!("[{}]", max.join(","))).unwrap() else {
            panic!()
        };
        assert_eq!(e.meters.len(), MAX_CONCENTRATOR_EVENT_METERS);
        assert_eq!(json(&e.to_json()).unwrap(), Document::ConcentratorEvent(e));
        let over: Vec<String> = (0..=MAX_CONCENTRATOR_EVENT_METERS)
            .map(|i| format!("\"m{i}\""))
            .collect();
        assert_eq!(
            with(&format!("[{}]", over.join(","))),
            Err(DocumentError::TooManyMeters {
                count: MAX_CONCENTRATOR_EVENT_METERS + 1,
                max: MAX_CONCENTRATOR_EVENT_METERS
            })
        );
        // Deeply nested arrays inside Meters are skipped without recursion.
        let deep = format!("[{}{}]", "[".repeat(30_000), "]".repeat(30_000));
        assert_eq!(with(&deep), wt("array"));
    }

    #[test]
    fn fields_are_strict() {
        assert_eq!(
            json(&LOST.replace("}", r#","Meters":["m3"]}"#)),
            Err(DocumentError::DuplicateField("Meters"))
        );
        assert_eq!(
            json(&LOST.replace("}", r#","ConcentratorID":"dc-1"}"#)),
            Err(DocumentError::DuplicateField("ConcentratorID"))
        );
        assert_eq!(
            json(&LOST.replace("}", r#","Extra":1}"#)),
            Err(DocumentError::UnknownField("Extra".into()))
        );
        for mixed in [
            r#","MeterID":"m1"}"#,
            r#","EnergyConsumed":1}"#,
            r#","Outcome":"done"}"#,
        ] {
            assert_eq!(
                json(&LOST.replace("}", mixed)),
                Err(DocumentError::AmbiguousKind),
                "{mixed}"
            );
        }
        // A meter event carrying Meters is not a concentrator event either.
        assert_eq!(
            json(
                r#"{"MeterID":"m1","Timestamp":"2026-12-03T10:00:00Z","EventType":"PowerFail","Meters":[]}"#
            ),
            Err(DocumentError::AmbiguousKind)
        );
        assert_eq!(
            json(r#"{"Timestamp":"2026-12-03T10:00:00Z","EventType":"PowerFail","Meters":[]}"#),
            Err(DocumentError::MissingField("ConcentratorID"))
        );
        assert_eq!(
            json(&LOST.replace(r#","Timestamp":"2026-12-03T10:00:00Z""#, "")),
            Err(DocumentError::MissingField("Timestamp"))
        );
        assert_eq!(
            json(&LOST.replace(r#","EventType":"MeterLost""#, "")),
            Err(DocumentError::MissingField("EventType"))
        );
        // Meter event names are not concentrator event names, and vice versa.
        assert_eq!(
            json(&LOST.replace("MeterLost", "CoverOpened")),
            Err(DocumentError::UnknownConcentratorEventType(
                "CoverOpened".into()
            ))
        );
        assert_eq!(
            json(r#"{"MeterID":"m1","Timestamp":"2026-12-03T10:00:00Z","EventType":"MeterLost"}"#),
            Err(DocumentError::UnknownEventType("MeterLost".into()))
        );
        assert_eq!(
            json(&LOST.replace("\"dc-1\"", "1")),
            Err(DocumentError::WrongType {
                field: "ConcentratorID",
                expected: "string",
                found: "number"
            })
        );
        assert_eq!(
            json(&LOST.replace("dc-1", "-dc")),
            Err(DocumentError::InvalidMeterId(MeterIdError::BadStart))
        );
    }

    #[test]
    fn validating_constructor() {
        let e = ConcentratorEvent::new(
            id("dc-1"),
            datetime!(2026-12-03 11:00:00 +01:00),
            ConcentratorEventKind::MeterLost,
            vec![id("m1"), id("m2")],
        )
        .unwrap();
        assert_eq!(e, lost());
        assert_eq!(
            ConcentratorEvent::new(
                id("dc-1"),
                datetime!(2026-12-03 10:00:00.5 UTC),
                ConcentratorEventKind::PowerFail,
                vec![]
            )
            .map(|_| ()),
            Err(DocumentError::InvalidTimestamp {
                value: "2026-12-03T10:00:00Z".into(),
                reason: "fractional seconds are not accepted"
            })
        );
        assert_eq!(
            ConcentratorEvent::new(
                id("dc-1"),
                datetime!(2026-12-03 10:00:00 UTC),
                ConcentratorEventKind::PowerFail,
                vec![id("m1")]
            )
            .map(|_| ()),
            Err(DocumentError::MetersNotAllowed("PowerFail"))
        );
        for k in ConcentratorEventKind::ALL {
            assert_eq!(k.as_str().parse::<ConcentratorEventKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.as_str());
        }
        assert!("meterlost".parse::<ConcentratorEventKind>().is_err());
    }

    fn event() -> impl Strategy<Value = ConcentratorEvent> {
        (
            "[0-9A-Za-z_][0-9A-Za-z._-]{0,63}",
            946_684_800i64..=253_402_300_799,
            prop::sample::select(ConcentratorEventKind::ALL.to_vec()),
            prop::collection::btree_set("[0-9A-Za-z_][0-9A-Za-z._-]{0,20}", 1..40),
        )
            .prop_map(|(c, t, kind, meters)| ConcentratorEvent {
                concentrator_id: id(&c),
                timestamp: OffsetDateTime::from_unix_timestamp(t).unwrap(),
                kind,
                meters: if kind.lists_meters() {
                    meters.iter().map(|m| id(m)).collect()
                } else {
                    Vec::new()
                },
            })
    }

    proptest! {
        #[test]
        fn encode_then_parse_is_identity(e in event(), f in prop_oneof![Just(Format::Xml), Just(Format::Json)]) {
            let doc = Document::ConcentratorEvent(e);
            prop_assert_eq!(parse(doc.encode(f).as_bytes(), Format::Json, &Limits::default()).unwrap(), doc);
        }
    }
}
