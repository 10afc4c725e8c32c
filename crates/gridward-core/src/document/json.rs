//! The strict JSON reader for documents: serde_json reads the syntax into a small value tree
//! that keeps every key (duplicates included), then plain code checks the fields.
//!
//! Collecting the entries ourselves, rather than deriving `Deserialize` with
//! `deny_unknown_fields`, gives each refusal (unknown, duplicate, missing field, wrong type) its
//! own [`DocumentError`] variant instead of a serde message to pattern-match on.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{
    AckFields, Document, DocumentError, Energy, build_ack, build_event, build_reading,
    concentrator, snippet,
};

/// The keys a JSON document may contain.
const METER_ID: &str = "MeterID";
/// See [`METER_ID`].
const TIMESTAMP: &str = "Timestamp";
/// See [`METER_ID`].
const ENERGY: &str = "EnergyConsumed";
/// See [`METER_ID`].
const EVENT_TYPE: &str = "EventType";
/// See [`METER_ID`]: an acknowledgement's command id.
const COMMAND_ID: &str = "CommandID";
/// See [`METER_ID`]: an acknowledgement's outcome.
const OUTCOME: &str = "Outcome";
/// See [`METER_ID`]: an acknowledgement's optional detail (with `done`).
const DETAIL: &str = "Detail";
/// See [`METER_ID`]: an acknowledgement's refusal code (with `refused`).
const REASON: &str = "Reason";
/// See [`METER_ID`]: a concentrator event's concentrator.
const CONCENTRATOR_ID: &str = "ConcentratorID";
/// See [`METER_ID`]: a concentrator event's meters.
const METERS: &str = "Meters";
/// Reported when a document has neither `EnergyConsumed` nor `EventType` nor the fields of an
/// acknowledgement.
const KIND_FIELD: &str = "EnergyConsumed, EventType or CommandID";

/// A JSON value, as much of it as the document checks need.
#[derive(Debug)]
enum Value {
    /// A string.
    String(String),
    /// A number (integers are converted; above 2^53 they lose precision, but such values
    /// exceed [`super::MAX_ENERGY_KWH`] anyway).
    Number(f64),
    /// An object with every entry in input order, duplicates kept.
    Object(Vec<(String, Value)>),
    /// An array: each element a string, or the JSON type name of what it is instead (nested
    /// values are skipped, not collected).
    Array(Vec<Result<String, &'static str>>),
    /// Anything else (`null`, a boolean, an array), by its JSON type name.
    Other(&'static str),
}

impl Value {
    /// The JSON type name, for error messages.
    fn type_name(&self) -> &'static str {
        match self {
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Object(_) => "object",
            Value::Array(_) => "array",
            Value::Other(name) => name,
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

/// Builds a [`Value`] from whatever serde_json reports.
struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Other("boolean"))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v as f64))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v as f64))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Other("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        // Keep the strings (a concentrator event's `Meters`); of anything else only its type,
        // skipping its content without recursion. Bounded by the document size limit.
        let mut elements = Vec::new();
        while let Some(Element(e)) = seq.next_element::<Element>()? {
            elements.push(e);
        }
        Ok(Value::Array(elements))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        // Bounded by the document size limit; serde_json bounds the nesting depth (128).
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<String, Value>()? {
            entries.push(entry);
        }
        Ok(Value::Object(entries))
    }
}

/// An array element: a string, or the JSON type name of what it is instead.
struct Element(Result<String, &'static str>);

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ElementVisitor)
    }
}

/// Builds an [`Element`], skipping the content of nested arrays and objects.
struct ElementVisitor;

impl<'de> Visitor<'de> for ElementVisitor {
    type Value = Element;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Element, E> {
        Ok(Element(Err("boolean")))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Element, E> {
        Ok(Element(Err("number")))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Element, E> {
        Ok(Element(Err("number")))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Element, E> {
        Ok(Element(Err("number")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Element, E> {
        Ok(Element(Ok(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Element, E> {
        Ok(Element(Ok(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Element, E> {
        Ok(Element(Err("null")))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Element(Err("array")))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Element, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Element(Err("object")))
    }
}

/// Parses a JSON document (already size-checked and UTF-8).
pub(super) fn parse(text: &str) -> Result<Document, DocumentError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        let message = e.to_string();
        // serde_json appends " at line L column C"; the variant carries those separately.
        let message = match message.rsplit_once(" at line ") {
            Some((m, _)) => m.to_owned(),
            None => message,
        };
        DocumentError::MalformedJson {
            message,
            line: e.line(),
            column: e.column(),
        }
    })?;
    let entries = match value {
        Value::Object(entries) => entries,
        other => return Err(DocumentError::NotAnObject(other.type_name())),
    };

    let (mut meter_id, mut timestamp, mut energy, mut event_type) = (None, None, None, None);
    let (mut command_id, mut outcome, mut detail, mut reason) = (None, None, None, None);
    let (mut concentrator_id, mut meters) = (None, None);
    for (key, value) in entries {
        let (name, slot) = match key.as_str() {
            METER_ID => (METER_ID, &mut meter_id),
            TIMESTAMP => (TIMESTAMP, &mut timestamp),
            ENERGY => (ENERGY, &mut energy),
            EVENT_TYPE => (EVENT_TYPE, &mut event_type),
            COMMAND_ID => (COMMAND_ID, &mut command_id),
            OUTCOME => (OUTCOME, &mut outcome),
            DETAIL => (DETAIL, &mut detail),
            REASON => (REASON, &mut reason),
            CONCENTRATOR_ID => (CONCENTRATOR_ID, &mut concentrator_id),
            METERS => (METERS, &mut meters),
            _ => return Err(DocumentError::UnknownField(snippet(&key))),
        };
        if slot.is_some() {
            return Err(DocumentError::DuplicateField(name));
        }
        *slot = Some(value);
    }

    let is_ack = command_id.is_some() || outcome.is_some() || detail.is_some() || reason.is_some();
    if concentrator_id.is_some() || meters.is_some() {
        // A concentrator event: nothing of a meter's documents may come with it.
        if meter_id.is_some() || energy.is_some() || is_ack {
            return Err(DocumentError::AmbiguousKind);
        }
        let concentrator_id = string(
            CONCENTRATOR_ID,
            concentrator_id.ok_or(DocumentError::MissingField(CONCENTRATOR_ID))?,
        )?;
        let timestamp = string(
            TIMESTAMP,
            timestamp.ok_or(DocumentError::MissingField(TIMESTAMP))?,
        )?;
        let event_type = string(
            EVENT_TYPE,
            event_type.ok_or(DocumentError::MissingField(EVENT_TYPE))?,
        )?;
        let meters = match meters {
            None => Vec::new(),
            Some(Value::Array(elements)) => elements,
            Some(other) => return Err(wrong_type(METERS, "array", &other)),
        };
        return concentrator::build(&concentrator_id, &timestamp, &event_type, meters);
    }
    let kinds = [energy.is_some(), event_type.is_some(), is_ack];
    if kinds.iter().filter(|k| **k).count() > 1 {
        return Err(DocumentError::AmbiguousKind);
    }
    let meter_id = string(
        METER_ID,
        meter_id.ok_or(DocumentError::MissingField(METER_ID))?,
    )?;
    let timestamp = string(
        TIMESTAMP,
        timestamp.ok_or(DocumentError::MissingField(TIMESTAMP))?,
    )?;
    if is_ack {
        let command_id = string(
            COMMAND_ID,
            command_id.ok_or(DocumentError::MissingField(COMMAND_ID))?,
        )?;
        let outcome = string(
            OUTCOME,
            outcome.ok_or(DocumentError::MissingField(OUTCOME))?,
        )?;
        let detail = detail.map(|d| string(DETAIL, d)).transpose()?;
        let reason = reason.map(|r| string(REASON, r)).transpose()?;
        return build_ack(AckFields {
            meter_id: &meter_id,
            timestamp: &timestamp,
            command_id: &command_id,
            outcome: &outcome,
            detail,
            reason: reason.as_deref(),
        });
    }
    match (energy, event_type) {
        (Some(Value::Number(kwh)), None) => {
            build_reading(&meter_id, &timestamp, Energy::Number(kwh))
        }
        (Some(other), None) => Err(wrong_type(ENERGY, "number", &other)),
        (None, Some(kind)) => build_event(&meter_id, &timestamp, &string(EVENT_TYPE, kind)?),
        (None, None) => Err(DocumentError::MissingField(KIND_FIELD)),
        (Some(_), Some(_)) => Err(DocumentError::AmbiguousKind),
    }
}

/// The string a field must hold.
fn string(field: &'static str, value: Value) -> Result<String, DocumentError> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(field, "string", &other)),
    }
}

/// A [`DocumentError::WrongType`] for `field`.
fn wrong_type(field: &'static str, expected: &'static str, found: &Value) -> DocumentError {
    DocumentError::WrongType {
        field,
        expected,
        found: found.type_name(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{EventKind, Format, Limits, parse};
    use super::*;
    use crate::MeterIdError;

    const READING: &str =
        r#"{"MeterID": "123456789", "Timestamp": "2024-02-06T12:00:00Z", "EnergyConsumed": 350.5}"#;
    const EVENT: &str = r#"{"MeterID": "123456789", "Timestamp": "2024-02-06T12:00:00Z", "EventType": "CoverOpened"}"#;

    fn json(s: &str) -> Result<Document, DocumentError> {
        parse(s.as_bytes(), Format::Json, &Limits::default())
    }

    fn energy(e: &str) -> Result<Document, DocumentError> {
        json(&format!(
            r#"{{"MeterID":"1","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":{e}}}"#
        ))
    }

    #[test]
    fn parses_the_issue_examples() {
        let Document::Reading(r) = json(READING).unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                r.meter_id.as_str(),
                r.timestamp.unix_timestamp(),
                r.energy_kwh
            ),
            ("123456789", 1_707_220_800, 350.5)
        );
        let Document::Event(e) = json(EVENT).unwrap() else {
            panic!()
        };
        assert_eq!(
            (e.meter_id.as_str(), e.kind),
            ("123456789", EventKind::CoverOpened)
        );
        // Any key order, whitespace, escapes in keys and values.
        let d = json("\n{ \"EnergyConsumed\" : 350.5 ,\"Timestamp\":\"2024-02-06T12:00:00Z\", \"Meter\\u0049D\":\"12345678\\u0039\" }\n").unwrap();
        assert_eq!(d, json(READING).unwrap());
        assert_eq!(energy("350").unwrap(), energy("350.0").unwrap());
    }

    #[test]
    fn top_level_must_be_an_object() {
        for (doc, found) in [
            ("[]", "array"),
            ("[1,2]", "array"),
            ("\"x\"", "string"),
            ("1", "number"),
            ("null", "null"),
            ("true", "boolean"),
        ] {
            assert_eq!(json(doc), Err(DocumentError::NotAnObject(found)), "{doc}");
        }
    }

    #[test]
    fn unknown_missing_duplicate_fields() {
        assert_eq!(
            json(&READING.replace("}", r#", "Unit": "kWh"}"#)),
            Err(DocumentError::UnknownField("Unit".into()))
        );
        assert_eq!(
            json(&READING.replace("MeterID", "meterId")),
            Err(DocumentError::UnknownField("meterId".into()))
        );
        assert_eq!(
            json(r#"{"MeterID":"1","Timestamp":"2024-02-06T12:00:00Z"}"#),
            Err(DocumentError::MissingField(KIND_FIELD))
        );
        assert_eq!(
            json(r#"{"Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":1}"#),
            Err(DocumentError::MissingField("MeterID"))
        );
        assert_eq!(
            json(r#"{"MeterID":"1","EventType":"PowerFail"}"#),
            Err(DocumentError::MissingField("Timestamp"))
        );
        assert_eq!(json("{}"), Err(DocumentError::MissingField("MeterID")));
        // Duplicates are refused, even when the second copy agrees or is spelt with an escape.
        assert_eq!(
            json(&READING.replace("}", r#", "MeterID": "123456789"}"#)),
            Err(DocumentError::DuplicateField("MeterID"))
        );
        assert_eq!(
            json(&READING.replace("}", r#", "Energy\u0043onsumed": 1}"#)),
            Err(DocumentError::DuplicateField("EnergyConsumed"))
        );
        assert_eq!(
            json(&EVENT.replace("}", r#", "EventType": "PowerFail"}"#)),
            Err(DocumentError::DuplicateField("EventType"))
        );
        assert_eq!(
            json(&READING.replace("}", r#", "EventType": "PowerFail"}"#)),
            Err(DocumentError::AmbiguousKind)
        );
        assert_eq!(
            json(r#"{"EventType":"PowerFail","EnergyConsumed":1}"#),
            Err(DocumentError::AmbiguousKind)
        );
    }

    #[test]
    fn wrong_types() {
        let wt = |field, expected, found| {
            Err(DocumentError::WrongType {
                field,
                expected,
                found,
            })
        };
        assert_eq!(
            energy("\"350.5\""),
            wt("EnergyConsumed", "number", "string")
        );
        assert_eq!(energy("null"), wt("EnergyConsumed", "number", "null"));
        assert_eq!(energy("[350.5]"), wt("EnergyConsumed", "number", "array"));
        assert_eq!(
            energy("{\"kWh\":350.5}"),
            wt("EnergyConsumed", "number", "object")
        );
        assert_eq!(energy("true"), wt("EnergyConsumed", "number", "boolean"));
        assert_eq!(
            json(&READING.replace("\"123456789\"", "123456789")),
            wt("MeterID", "string", "number")
        );
        assert_eq!(
            json(&READING.replace("\"2024-02-06T12:00:00Z\"", "1707220800")),
            wt("Timestamp", "string", "number")
        );
        assert_eq!(
            json(&EVENT.replace("\"CoverOpened\"", "0")),
            wt("EventType", "string", "number")
        );
    }

    #[test]
    fn malformed_json_carries_position() {
        assert_eq!(
            json("{\"MeterID\": \"1\",\n \"Timestamp\": }"),
            Err(DocumentError::MalformedJson {
                message: "expected value".into(),
                line: 2,
                column: 15
            })
        );
        for bad in [
            "{",
            "{\"MeterID\":\"1\",}",
            "{'MeterID':'1'}",
            "{\"a\":1} {}",
            "{\"a\":1}x",
            "\u{feff}{}",
            "{\"a\":NaN}",
            " ",
            "{\"a\":01}",
        ] {
            assert!(
                matches!(json(bad), Err(DocumentError::MalformedJson { .. })),
                "{bad:?}: {:?}",
                json(bad)
            );
        }
        // Deeply nested arrays are skipped by serde_json without recursion; deeply nested
        // objects (which we collect) are stopped by its recursion limit, not by the stack.
        let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
        assert_eq!(json(&deep), Err(DocumentError::NotAnObject("array")));
        let deep = format!(
            "{{\"MeterID\":{}{}}}",
            "[".repeat(30_000),
            "]".repeat(30_000)
        );
        assert_eq!(
            json(&deep),
            Err(DocumentError::WrongType {
                field: "MeterID",
                expected: "string",
                found: "array"
            })
        );
        let deep = format!(
            "{{\"MeterID\":{}1{}}}",
            "{\"a\":".repeat(5_000),
            "}".repeat(5_000)
        );
        assert!(
            matches!(json(&deep), Err(DocumentError::MalformedJson { .. })),
            "{:?}",
            json(&deep)
        );
    }

    #[test]
    fn energy_values() {
        assert_eq!(energy("-1"), Err(DocumentError::EnergyNegative));
        assert_eq!(energy("-0.5"), Err(DocumentError::EnergyNegative));
        assert_eq!(energy("-0"), Err(DocumentError::EnergyNegative));
        assert_eq!(energy("-0.0"), Err(DocumentError::EnergyNegative));
        assert_eq!(
            energy("1000000000000.5"),
            Err(DocumentError::EnergyTooLarge)
        );
        assert_eq!(
            energy("18446744073709551615"),
            Err(DocumentError::EnergyTooLarge)
        );
        // serde_json refuses numbers that overflow f64.
        assert!(matches!(
            energy("1e400"),
            Err(DocumentError::MalformedJson { .. })
        ));
        assert!(energy("1e-400").is_ok());
        assert!(energy("0").is_ok());
        assert!(energy("1E3").is_ok());
    }

    #[test]
    fn value_errors() {
        assert_eq!(
            json(&READING.replace("123456789", "-1")),
            Err(DocumentError::InvalidMeterId(MeterIdError::BadStart))
        );
        assert_eq!(
            json(&READING.replace("123456789", "")),
            Err(DocumentError::InvalidMeterId(MeterIdError::Empty))
        );
        assert!(matches!(
            json(&READING.replace("12:00:00Z", "12:00:00.000Z")),
            Err(DocumentError::InvalidTimestamp {
                reason: "fractional seconds are not accepted",
                ..
            })
        ));
        assert_eq!(
            json(&EVENT.replace("CoverOpened", "Earthquake")),
            Err(DocumentError::UnknownEventType("Earthquake".into()))
        );
        // The first bad value in document order is reported.
        assert_eq!(
            json(r#"{"EnergyConsumed":-1,"Timestamp":"x","MeterID":"/"}"#),
            Err(DocumentError::InvalidMeterId(MeterIdError::InvalidChar(
                '/'
            )))
        );
    }
}
