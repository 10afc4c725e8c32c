//! Tests of the document API as a whole: input checks, timestamps, encoding, round trips and
//! property tests. Format-specific rejection paths are tested in `xml.rs` and `json.rs`.

use proptest::prelude::*;
use time::macros::datetime;

use super::*;

const XML: &str = "<EnergyUsageReport><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>";
const JSON_SPACED: &str =
    r#"{"MeterID": "123456789", "Timestamp": "2024-02-06T12:00:00Z", "EnergyConsumed": 350.5}"#;
const JSON: &str =
    r#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":350.5}"#;
const EVENT_XML: &str = "<MeterEvent><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EventType>CoverOpened</EventType></MeterEvent>";
const EVENT_JSON: &str =
    r#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EventType":"CoverOpened"}"#;

fn limits() -> Limits {
    Limits::default()
}

fn sample_reading() -> Reading {
    Reading {
        meter_id: MeterId::new("123456789").unwrap(),
        timestamp: datetime!(2024-02-06 12:00:00 UTC),
        energy_kwh: 350.5,
    }
}

fn sample_event() -> Event {
    Event {
        meter_id: MeterId::new("123456789").unwrap(),
        timestamp: datetime!(2024-02-06 12:00:00 UTC),
        kind: EventKind::CoverOpened,
    }
}

#[test]
fn issue_example_converts_xml_to_json() {
    assert_eq!(xml_to_json(XML.as_bytes(), &limits()).unwrap(), JSON);
    assert_eq!(
        xml_to_json(EVENT_XML.as_bytes(), &limits()).unwrap(),
        EVENT_JSON
    );
    // The conversion is strict: a bad document is refused, not converted.
    assert_eq!(
        xml_to_json(b"<!DOCTYPE x><x/>", &limits()),
        Err(DocumentError::DtdForbidden)
    );
    assert_eq!(
        xml_to_json(JSON.as_bytes(), &limits()),
        Err(DocumentError::TextOutsideFields)
    );
}

#[test]
fn canonical_output_forms() {
    assert_eq!(sample_reading().to_xml(), XML);
    assert_eq!(sample_reading().to_json(), JSON);
    assert_eq!(sample_event().to_xml(), EVENT_XML);
    assert_eq!(sample_event().to_json(), EVENT_JSON);
    let doc = Document::from(sample_reading());
    assert_eq!(doc.encode(Format::Xml), XML);
    assert_eq!(doc.encode(Format::Json), JSON);
    assert_eq!(
        Document::from(sample_event()).encode(Format::Json),
        EVENT_JSON
    );
    // The spaced JSON of the spec parses to the same document.
    assert_eq!(
        parse(JSON_SPACED.as_bytes(), Format::Json, &limits()).unwrap(),
        doc
    );
    // Our JSON is valid JSON with the fields in order.
    let v: serde_json::Value = serde_json::from_str(&doc.to_json()).unwrap();
    assert_eq!(v["EnergyConsumed"], serde_json::json!(350.5));
}

#[test]
fn energy_is_written_so_it_reads_back_exactly() {
    for (kwh, text) in [
        (350.5, "350.5"),
        (350.0, "350.0"),
        (0.0, "0.0"),
        (1e-7, "1e-7"),
        (1e12, "1000000000000.0"),
        (0.1, "0.1"),
    ] {
        let r = Reading {
            energy_kwh: kwh,
            ..sample_reading()
        };
        assert!(
            r.to_json().contains(&format!(":{text}}}")),
            "{}",
            r.to_json()
        );
        assert!(
            r.to_xml().contains(&format!("<EnergyConsumed>{text}</")),
            "{}",
            r.to_xml()
        );
        assert_eq!(
            parse_reading(r.to_xml().as_bytes(), Format::Xml, &limits())
                .unwrap()
                .energy_kwh
                .to_bits(),
            kwh.to_bits()
        );
        assert_eq!(
            parse_reading(r.to_json().as_bytes(), Format::Json, &limits())
                .unwrap()
                .energy_kwh
                .to_bits(),
            kwh.to_bits()
        );
    }
    // Invalid values built by hand are written so that parsing refuses them.
    let nan = Reading {
        energy_kwh: f64::NAN,
        ..sample_reading()
    };
    assert_eq!(
        parse(nan.to_json().as_bytes(), Format::Json, &limits()),
        Err(DocumentError::WrongType {
            field: "EnergyConsumed",
            expected: "number",
            found: "null"
        })
    );
    assert_eq!(
        parse(nan.to_xml().as_bytes(), Format::Xml, &limits()),
        Err(DocumentError::InvalidEnergy("NaN".into()))
    );
    let inf = Reading {
        energy_kwh: f64::INFINITY,
        ..sample_reading()
    };
    assert_eq!(
        parse(inf.to_xml().as_bytes(), Format::Xml, &limits()),
        Err(DocumentError::InvalidEnergy("inf".into()))
    );
}

#[test]
fn input_checks_come_first() {
    let small = Limits { max_bytes: 10 };
    // Size is checked before anything else, even for garbage or non-UTF-8 input.
    assert_eq!(
        parse(&[0xff; 11], Format::Xml, &small),
        Err(DocumentError::TooLarge { size: 11, max: 10 })
    );
    assert_eq!(
        parse(XML.as_bytes(), Format::Json, &small),
        Err(DocumentError::TooLarge {
            size: XML.len(),
            max: 10
        })
    );
    let big = vec![b' '; DEFAULT_MAX_DOCUMENT_BYTES + 1];
    assert_eq!(
        parse(&big, Format::Json, &limits()),
        Err(DocumentError::TooLarge {
            size: big.len(),
            max: DEFAULT_MAX_DOCUMENT_BYTES
        })
    );
    // Exactly at the limit is fine.
    let exact = Limits {
        max_bytes: XML.len(),
    };
    assert!(parse(XML.as_bytes(), Format::Xml, &exact).is_ok());
    for f in [Format::Xml, Format::Json] {
        assert_eq!(parse(b"", f, &limits()), Err(DocumentError::Empty));
        assert_eq!(
            parse(b"{\"\xc3\x28\"}", f, &limits()),
            Err(DocumentError::NotUtf8 { position: 2 })
        );
        assert_eq!(
            parse(
                &XML.as_bytes()[..XML.len() - 1]
                    .iter()
                    .chain(b"\xff")
                    .copied()
                    .collect::<Vec<_>>(),
                f,
                &limits()
            ),
            Err(DocumentError::NotUtf8 {
                position: XML.len() - 1
            })
        );
    }
    // An XML document is not JSON and vice versa.
    assert!(matches!(
        parse(XML.as_bytes(), Format::Json, &limits()),
        Err(DocumentError::MalformedJson { .. })
    ));
    assert_eq!(
        parse(JSON.as_bytes(), Format::Xml, &limits()),
        Err(DocumentError::TextOutsideFields)
    );
    assert_eq!(Limits::default().max_bytes, 65_536);
}

#[test]
fn parse_reading_refuses_events() {
    assert_eq!(
        parse_reading(XML.as_bytes(), Format::Xml, &limits()).unwrap(),
        sample_reading()
    );
    assert_eq!(
        parse_reading(EVENT_JSON.as_bytes(), Format::Json, &limits()),
        Err(DocumentError::WrongDocumentKind {
            expected: "reading",
            found: "event"
        })
    );
}

#[test]
fn document_accessors() {
    let r = Document::from(sample_reading());
    let e = Document::from(sample_event());
    assert_eq!(r.meter_id().as_str(), "123456789");
    assert_eq!(e.timestamp(), datetime!(2024-02-06 12:00:00 UTC));
    assert_eq!((r.kind_name(), e.kind_name()), ("reading", "event"));
}

#[test]
fn content_types() {
    assert_eq!(Format::Xml.content_type(), "application/xml");
    assert_eq!(Format::Json.content_type(), "application/json");
    assert_eq!(
        Format::from_content_type("application/xml"),
        Some(Format::Xml)
    );
    assert_eq!(
        Format::from_content_type("Application/JSON"),
        Some(Format::Json)
    );
    for bad in [
        "text/xml",
        "application/json; charset=utf-8",
        "",
        "application/xml ",
        "application/cbor",
    ] {
        assert_eq!(Format::from_content_type(bad), None, "{bad}");
    }
    assert_eq!(Format::Json.to_string(), "application/json");
}

#[test]
fn event_kinds() {
    for k in EventKind::ALL {
        assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
        assert_eq!(k.to_string(), k.as_str());
    }
    let names: Vec<_> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "CoverOpened",
            "MagneticField",
            "PowerFail",
            "PowerRestore",
            "ReverseEnergy",
            "TerminalCoverOpened"
        ]
    );
    assert_eq!(
        "coverOpened".parse::<EventKind>(),
        Err(DocumentError::UnknownEventType("coverOpened".into()))
    );
    assert_eq!(
        " PowerFail".parse::<EventKind>(),
        Err(DocumentError::UnknownEventType(" PowerFail".into()))
    );
}

#[test]
fn timestamps_parse_strictly_and_normalise_to_utc() {
    let noon = datetime!(2024-02-06 12:00:00 UTC);
    assert_eq!(parse_timestamp("2024-02-06T12:00:00Z").unwrap(), noon);
    assert_eq!(parse_timestamp("2024-02-06T13:30:00+01:30").unwrap(), noon);
    assert_eq!(parse_timestamp("2024-02-06T07:00:00-05:00").unwrap(), noon);
    assert_eq!(parse_timestamp("2024-02-06T12:00:00-00:00").unwrap(), noon);
    assert_eq!(
        parse_timestamp("2024-02-06T12:00:00+00:00")
            .unwrap()
            .offset(),
        UtcOffset::UTC
    );
    assert_eq!(
        parse_timestamp("2024-02-29T00:00:00Z").unwrap(),
        datetime!(2024-02-29 00:00:00 UTC)
    );
    assert_eq!(
        parse_timestamp("2000-01-01T00:00:00Z").unwrap(),
        datetime!(2000-01-01 00:00:00 UTC)
    );
    assert_eq!(
        parse_timestamp("9999-12-31T23:59:59Z").unwrap(),
        datetime!(9999-12-31 23:59:59 UTC)
    );

    let reason = |s: &str| match parse_timestamp(s) {
        Err(DocumentError::InvalidTimestamp { reason, .. }) => reason,
        other => panic!("{s}: {other:?}"),
    };
    const SHAPE: &str = "expected YYYY-MM-DDThh:mm:ss followed by Z or ±hh:mm";
    assert_eq!(
        reason("2024-02-06T12:00:00.5Z"),
        "fractional seconds are not accepted"
    );
    assert_eq!(
        reason("2024-02-06T12:00:00.000+01:00"),
        "fractional seconds are not accepted"
    );
    for s in [
        "",
        "2024-02-06",
        "2024-02-06 12:00:00Z",
        "2024-02-06t12:00:00Z",
        "2024-2-06T12:00:00Z",
        "24-02-06T12:00:00Z",
        "2024-02-06T12:00Z",
        "+2024-02-06T12:00:00Z",
        "2024-02-06T12:0a:00Z",
        "２０２４-02-06T12:00:00Z",
    ] {
        assert_eq!(reason(s), SHAPE, "{s}");
    }
    for s in [
        "2024-02-06T12:00:00",
        "2024-02-06T12:00:00z",
        "2024-02-06T12:00:00+0100",
        "2024-02-06T12:00:00+01",
        "2024-02-06T12:00:00Z ",
        "2024-02-06T12:00:00ZZ",
        "2024-02-06T12:00:00UTC",
    ] {
        assert_eq!(reason(s), "expected Z or ±hh:mm after the seconds", "{s}");
    }
    assert_eq!(
        reason("2024-02-06T12:00:00+24:00"),
        "UTC offset out of range"
    );
    assert_eq!(
        reason("2024-02-06T12:00:00+01:60"),
        "UTC offset out of range"
    );
    assert_eq!(reason("2024-13-06T12:00:00Z"), "invalid month");
    assert_eq!(reason("2024-00-06T12:00:00Z"), "invalid month");
    assert_eq!(reason("2023-02-29T12:00:00Z"), "invalid day of month");
    assert_eq!(reason("2024-02-00T12:00:00Z"), "invalid day of month");
    assert_eq!(reason("2024-02-06T24:00:00Z"), "invalid time of day");
    assert_eq!(reason("2016-12-31T23:59:60Z"), "invalid time of day");
    assert_eq!(reason("2024-02-06T12:60:00Z"), "invalid time of day");

    assert_eq!(
        parse_timestamp("1999-12-31T23:59:59Z"),
        Err(DocumentError::TimestampOutOfRange { year: 1999 })
    );
    assert_eq!(
        parse_timestamp("0000-01-01T00:00:00Z"),
        Err(DocumentError::TimestampOutOfRange { year: 0 })
    );
    // Out of range only after normalisation to UTC.
    assert_eq!(
        parse_timestamp("2000-01-01T00:30:00+01:00"),
        Err(DocumentError::TimestampOutOfRange { year: 1999 })
    );
    assert_eq!(
        parse_timestamp("9999-12-31T23:30:00-01:00"),
        Err(DocumentError::TimestampOutOfRange { year: 10_000 })
    );
    // The offending value is echoed, truncated.
    let long = "x".repeat(100);
    assert!(
        matches!(parse_timestamp(&long), Err(DocumentError::InvalidTimestamp { value, .. }) if value.chars().count() == 33)
    );
}

#[test]
fn timestamps_format_canonically() {
    assert_eq!(
        format_timestamp(datetime!(2024-02-06 12:00:00 UTC)),
        "2024-02-06T12:00:00Z"
    );
    assert_eq!(
        format_timestamp(datetime!(2024-02-06 13:00:00 +01:00)),
        "2024-02-06T12:00:00Z"
    );
    assert_eq!(
        format_timestamp(datetime!(2024-02-06 12:00:00.999 UTC)),
        "2024-02-06T12:00:00Z"
    );
    assert_eq!(
        format_timestamp(datetime!(2000-01-01 00:00:00 UTC)),
        "2000-01-01T00:00:00Z"
    );
    // Outside time's range in UTC: written with its own offset.
    assert_eq!(
        format_timestamp(datetime!(9999-12-31 23:30:00 -01:00)),
        "9999-12-31T23:30:00-01:00"
    );
    assert_eq!(
        parse_timestamp(&format_timestamp(datetime!(9999-12-31 23:30:00 -01:00))),
        Err(DocumentError::TimestampOutOfRange { year: 10_000 })
    );
}

#[test]
fn validating_constructors() {
    let id = || MeterId::new("m-1").unwrap();
    let t = datetime!(2024-02-06 13:00:00 +01:00);
    let r = Reading::new(id(), t, 1.5).unwrap();
    assert_eq!(r.timestamp.offset(), UtcOffset::UTC);
    assert_eq!(r.timestamp, t);
    assert_eq!(
        Reading::new(id(), t, -1.0),
        Err(DocumentError::EnergyNegative)
    );
    assert_eq!(
        Reading::new(id(), t, -0.0),
        Err(DocumentError::EnergyNegative)
    );
    assert_eq!(
        Reading::new(id(), t, f64::NAN),
        Err(DocumentError::EnergyNotFinite)
    );
    assert_eq!(
        Reading::new(id(), t, f64::INFINITY),
        Err(DocumentError::EnergyNotFinite)
    );
    assert_eq!(
        Reading::new(id(), t, 1.1e12),
        Err(DocumentError::EnergyTooLarge)
    );
    assert!(matches!(
        Reading::new(id(), datetime!(2024-02-06 12:00:00.5 UTC), 1.0),
        Err(DocumentError::InvalidTimestamp {
            reason: "fractional seconds are not accepted",
            ..
        })
    ));
    assert_eq!(
        Event::new(
            id(),
            datetime!(1999-12-31 23:59:59 UTC),
            EventKind::PowerFail
        ),
        Err(DocumentError::TimestampOutOfRange { year: 1999 })
    );
    let e = Event::new(id(), t, EventKind::PowerFail).unwrap();
    assert_eq!(
        parse(e.to_xml().as_bytes(), Format::Xml, &limits()).unwrap(),
        Document::Event(e)
    );
}

#[test]
fn errors_display_without_echoing_much() {
    let e = parse(
        format!("<{}/>", "x".repeat(1000)).as_bytes(),
        Format::Xml,
        &limits(),
    )
    .unwrap_err();
    assert!(e.to_string().len() < 120, "{e}");
    assert_eq!(
        DocumentError::DtdForbidden.to_string(),
        "XML document type declarations (DTD) are forbidden"
    );
    let e = DocumentError::UnknownField("a\nb".into());
    assert_eq!(e.to_string(), "unknown field \"a\\nb\"");
}

#[test]
fn plain_decimal_grammar() {
    for ok in [
        "0",
        "7",
        "10",
        "0.0",
        "350.5",
        "1e5",
        "1E-05",
        "1.5e+3",
        "123456789012.125",
    ] {
        assert!(is_plain_decimal(ok.as_bytes()), "{ok}");
    }
    for bad in [
        "", "-0", "+0", "00", "01", ".1", "1.", "1e", "e1", "1e+-1", "0x1", "1 ", "NaN", "∞",
    ] {
        assert!(!is_plain_decimal(bad.as_bytes()), "{bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests

fn meter_id() -> impl Strategy<Value = MeterId> {
    "[0-9A-Za-z_][0-9A-Za-z._-]{0,63}".prop_map(|s| MeterId::new(&s).unwrap())
}

fn timestamp() -> impl Strategy<Value = OffsetDateTime> {
    // 2000-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z
    (946_684_800i64..=253_402_300_799).prop_map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap())
}

fn energy() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0..=MAX_ENERGY_KWH,
        (0u64..=1_000_000_000_000).prop_map(|n| n as f64),
        (0u64..=10_000_000_000_000).prop_map(|n| n as f64 / 10.0),
        (0u64..=1_000_000_000).prop_map(|n| n as f64 / 1000.0),
        // Any bit pattern that is a valid energy, subnormals included.
        any::<u64>()
            .prop_map(|b| f64::from_bits(b & !(1 << 63)))
            .prop_filter("valid energy", |v| check_energy(*v).is_ok()),
        Just(0.0),
        Just(MAX_ENERGY_KWH),
        Just(f64::MIN_POSITIVE),
        Just(5e-324),
    ]
}

fn document() -> impl Strategy<Value = Document> {
    prop_oneof![
        (meter_id(), timestamp(), energy()).prop_map(|(meter_id, timestamp, energy_kwh)| {
            Document::Reading(Reading {
                meter_id,
                timestamp,
                energy_kwh,
            })
        }),
        (
            meter_id(),
            timestamp(),
            prop::sample::select(EventKind::ALL.to_vec())
        )
            .prop_map(|(meter_id, timestamp, kind)| Document::Event(Event {
                meter_id,
                timestamp,
                kind
            })),
    ]
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Xml), Just(Format::Json)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_parse_is_identity(doc in document(), f in format()) {
        let encoded = doc.encode(f);
        let parsed = parse(encoded.as_bytes(), f, &limits()).unwrap();
        // Compare bits too: == on f64 would equate 0.0 and -0.0.
        if let (Document::Reading(a), Document::Reading(b)) = (&parsed, &doc) {
            prop_assert_eq!(a.energy_kwh.to_bits(), b.energy_kwh.to_bits());
        }
        prop_assert_eq!(parsed, doc);
    }

    #[test]
    fn xml_to_json_agrees_with_to_json(doc in document()) {
        prop_assert_eq!(xml_to_json(doc.to_xml().as_bytes(), &limits()).unwrap(), doc.to_json());
    }

    #[test]
    fn timestamps_round_trip_through_any_offset(t in timestamp(), off_min in -(23 * 60 + 59)..=(23 * 60 + 59i32)) {
        let offset = UtcOffset::from_whole_seconds(off_min * 60).unwrap();
        let local = t.to_offset(offset);
        let (h, m, _) = offset.as_hms();
        let sign = if offset.is_negative() { '-' } else { '+' };
        let text = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
            local.year(), u8::from(local.month()), local.day(), local.hour(), local.minute(), local.second(),
            h.unsigned_abs(), m.unsigned_abs()
        );
        match parse_timestamp(&text) {
            Ok(parsed) => {
                prop_assert_eq!(parsed, t);
                prop_assert_eq!(format_timestamp(parsed), format_timestamp(t));
            }
            // Only a local year outside 2000..=9999 may be refused.
            Err(DocumentError::TimestampOutOfRange { .. }) => prop_assert!(!(MIN_YEAR..=MAX_YEAR).contains(&local.year())),
            Err(e) => prop_assert!(false, "{text}: {e}"),
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), f in format()) {
        let _ = parse(&bytes, f, &limits());
    }

    #[test]
    fn parse_never_panics_on_markup_soup(s in r#"[<>/?!\[\]&;#x="' {}:,a-zA-Z0-9.\-\n]{0,200}"#, f in format()) {
        let _ = parse(s.as_bytes(), f, &limits());
    }

    #[test]
    fn mutated_documents_are_refused_or_still_valid(doc in document(), f in format(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = doc.encode(f).into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        // Whatever the outcome, a parsed document re-encodes to something that parses to itself.
        if let Ok(d) = parse(&bytes, f, &limits()) {
            for g in [Format::Xml, Format::Json] {
                prop_assert_eq!(&parse(d.encode(g).as_bytes(), g, &limits()).unwrap(), &d);
            }
        }
    }
}
