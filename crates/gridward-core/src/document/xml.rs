//! The strict XML reader for documents: a small state machine over quick-xml's events that
//! refuses everything but the two document shapes (see the parent module for the rules).

use quick_xml::Reader;
use quick_xml::escape::{EscapeError, resolve_xml_entity};
use quick_xml::events::{BytesDecl, BytesStart, Event as XmlEvent};

use super::{Document, DocumentError, Energy, build_event, build_reading, snippet};

/// Which document the root element announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `EnergyUsageReport`.
    Reading,
    /// `MeterEvent`.
    Event,
}

impl Kind {
    /// The kind a root element name announces.
    fn from_root(name: &[u8]) -> Option<Kind> {
        match name {
            b"EnergyUsageReport" => Some(Kind::Reading),
            b"MeterEvent" => Some(Kind::Event),
            _ => None,
        }
    }

    /// The field element names, in canonical order: meter id, timestamp, value.
    fn fields(self) -> [&'static str; 3] {
        match self {
            Kind::Reading => ["MeterID", "Timestamp", "EnergyConsumed"],
            Kind::Event => ["MeterID", "Timestamp", "EventType"],
        }
    }

    /// The name of field `i` (an index from [`Kind::field_index`]).
    fn field_name(self, i: usize) -> &'static str {
        self.fields().get(i).copied().unwrap_or("field")
    }

    /// Index of a field element name in [`Kind::fields`].
    fn field_index(self, name: &[u8]) -> Option<usize> {
        self.fields().iter().position(|f| f.as_bytes() == name)
    }
}

/// Where the reader is in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the root element.
    Prolog,
    /// Inside the root element, between fields.
    InRoot(Kind),
    /// Inside a field element (index into [`Kind::fields`]).
    InField(Kind, usize),
    /// After the root element.
    Epilog(Kind),
}

/// Parses an XML document (already size-checked and UTF-8).
pub(super) fn parse(text: &str) -> Result<Document, DocumentError> {
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    // Defaults, made explicit because the strictness relies on them.
    config.check_end_names = true;
    config.allow_unmatched_ends = false;
    config.expand_empty_elements = false;
    config.trim_text(false);

    let mut state = State::Prolog;
    let mut first_event = true;
    let mut fields: [Option<String>; 3] = [None, None, None];

    loop {
        let event = reader
            .read_event()
            .map_err(|e| map_xml_error(e, reader.error_position()))?;
        match event {
            XmlEvent::Decl(decl) => {
                if !first_event {
                    return Err(DocumentError::MisplacedDeclaration);
                }
                check_declaration(&decl)?;
            }
            XmlEvent::PI(_) => return Err(DocumentError::ProcessingInstructionForbidden),
            XmlEvent::DocType(_) => return Err(DocumentError::DtdForbidden),
            XmlEvent::CData(_) => return Err(DocumentError::CdataForbidden),
            XmlEvent::Comment(_) => return Err(DocumentError::CommentForbidden),
            XmlEvent::Start(ref e) | XmlEvent::Empty(ref e) => {
                let empty = matches!(event, XmlEvent::Empty(_));
                check_no_attributes(e)?;
                let name = e.name();
                let name = name.as_ref();
                state = match state {
                    State::Prolog => {
                        let kind = Kind::from_root(name)
                            .ok_or_else(|| DocumentError::UnknownRoot(lossy(name)))?;
                        if empty {
                            State::Epilog(kind)
                        } else {
                            State::InRoot(kind)
                        }
                    }
                    State::InRoot(kind) => {
                        let i = kind
                            .field_index(name)
                            .ok_or_else(|| DocumentError::UnknownElement(lossy(name)))?;
                        let slot = fields
                            .get_mut(i)
                            .ok_or_else(|| DocumentError::UnknownElement(lossy(name)))?;
                        if slot.is_some() {
                            return Err(DocumentError::DuplicateField(kind.field_name(i)));
                        }
                        *slot = Some(String::new());
                        if empty {
                            State::InRoot(kind)
                        } else {
                            State::InField(kind, i)
                        }
                    }
                    State::InField(kind, i) => {
                        return Err(DocumentError::NestedElement(kind.field_name(i)));
                    }
                    State::Epilog(_) => return Err(DocumentError::TrailingContent),
                };
            }
            XmlEvent::End(_) => {
                // quick-xml has already checked that the end tag matches the open element.
                state = match state {
                    State::InField(kind, _) => State::InRoot(kind),
                    State::InRoot(kind) => State::Epilog(kind),
                    State::Prolog | State::Epilog(_) => {
                        return Err(DocumentError::MalformedXml {
                            message: "end tag without an open element".to_owned(),
                            position: reader.buffer_position(),
                        });
                    }
                };
            }
            XmlEvent::Text(t) => match state {
                State::InField(_, i) => {
                    let value = t
                        .unescape_with(resolve_xml_entity)
                        .map_err(|e| map_xml_error(e, reader.buffer_position()))?;
                    if let Some(Some(slot)) = fields.get_mut(i) {
                        slot.push_str(&value);
                    }
                }
                State::Prolog | State::InRoot(_) if is_xml_whitespace(&t) => {}
                State::Prolog | State::InRoot(_) => return Err(DocumentError::TextOutsideFields),
                State::Epilog(_) if is_xml_whitespace(&t) => {}
                State::Epilog(_) => return Err(DocumentError::TrailingContent),
            },
            XmlEvent::Eof => {
                return match state {
                    State::Epilog(kind) => finish(kind, fields),
                    State::Prolog => Err(DocumentError::NoRootElement),
                    State::InRoot(_) | State::InField(..) => Err(DocumentError::MalformedXml {
                        message: "input ends inside an element".to_owned(),
                        position: text.len() as u64,
                    }),
                };
            }
        }
        first_event = false;
    }
}

/// Checks that every field is present and builds the document.
fn finish(kind: Kind, fields: [Option<String>; 3]) -> Result<Document, DocumentError> {
    let [meter_id_name, timestamp_name, value_name] = kind.fields();
    let [meter_id, timestamp, value] = fields;
    let meter_id = meter_id.ok_or(DocumentError::MissingField(meter_id_name))?;
    let timestamp = timestamp.ok_or(DocumentError::MissingField(timestamp_name))?;
    let value = value.ok_or(DocumentError::MissingField(value_name))?;
    match kind {
        Kind::Reading => build_reading(&meter_id, &timestamp, Energy::Text(&value)),
        Kind::Event => build_event(&meter_id, &timestamp, &value),
    }
}

/// Refuses any attribute, including namespace declarations.
fn check_no_attributes(e: &BytesStart<'_>) -> Result<(), DocumentError> {
    if e.attributes_raw()
        .iter()
        .all(|b| is_xml_whitespace_byte(*b))
    {
        Ok(())
    } else {
        Err(DocumentError::AttributeForbidden(lossy(e.name().as_ref())))
    }
}

/// Accepts `<?xml version="1.0"?>` with an optional UTF-8 `encoding` and any `standalone`.
fn check_declaration(decl: &BytesDecl<'_>) -> Result<(), DocumentError> {
    match decl.version() {
        Ok(v) if v.as_ref() == b"1.0" => {}
        Ok(_) => return Err(DocumentError::InvalidDeclaration("version must be 1.0")),
        Err(_) => {
            return Err(DocumentError::InvalidDeclaration(
                "malformed or missing version",
            ));
        }
    }
    match decl.encoding() {
        None => Ok(()),
        Some(Ok(enc)) if enc.eq_ignore_ascii_case(b"UTF-8") => Ok(()),
        Some(Ok(_)) => Err(DocumentError::InvalidDeclaration("encoding must be UTF-8")),
        Some(Err(_)) => Err(DocumentError::InvalidDeclaration("malformed encoding")),
    }
}

/// Maps a quick-xml error to a typed error: unknown entities get their own variant.
fn map_xml_error(e: quick_xml::Error, position: u64) -> DocumentError {
    match e {
        quick_xml::Error::Escape(EscapeError::UnrecognizedEntity(_, name)) => {
            DocumentError::EntityForbidden(snippet(&name))
        }
        other => DocumentError::MalformedXml {
            message: other.to_string(),
            position,
        },
    }
}

/// True if the raw text is only XML whitespace (space, tab, CR, LF).
fn is_xml_whitespace(t: &[u8]) -> bool {
    t.iter().all(|b| is_xml_whitespace_byte(*b))
}

/// XML's `S` production: space, tab, CR, LF.
fn is_xml_whitespace_byte(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// An element name for an error message (the input is UTF-8, so this never replaces anything).
fn lossy(name: &[u8]) -> String {
    snippet(&String::from_utf8_lossy(name))
}

#[cfg(test)]
mod tests {
    use super::super::{EventKind, Format, Limits, parse};
    use super::*;
    use crate::MeterIdError;

    const READING: &str = "<EnergyUsageReport><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>";
    const EVENT: &str = "<MeterEvent><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EventType>CoverOpened</EventType></MeterEvent>";

    fn xml(s: &str) -> Result<Document, DocumentError> {
        parse(s.as_bytes(), Format::Xml, &Limits::default())
    }

    fn reading(mid: &str, ts: &str, e: &str) -> String {
        format!(
            "<EnergyUsageReport><MeterID>{mid}</MeterID><Timestamp>{ts}</Timestamp><EnergyConsumed>{e}</EnergyConsumed></EnergyUsageReport>"
        )
    }

    fn energy(e: &str) -> Result<Document, DocumentError> {
        xml(&reading("123456789", "2024-02-06T12:00:00Z", e))
    }

    fn kwh(d: Document) -> f64 {
        match d {
            Document::Reading(r) => r.energy_kwh,
            other => panic!("not a reading: {other:?}"),
        }
    }

    #[test]
    fn parses_the_issue_examples() {
        let Document::Reading(r) = xml(READING).unwrap() else {
            panic!()
        };
        assert_eq!(r.meter_id.as_str(), "123456789");
        assert_eq!(r.timestamp.unix_timestamp(), 1_707_220_800);
        assert_eq!(r.energy_kwh, 350.5);
        let Document::Event(e) = xml(EVENT).unwrap() else {
            panic!()
        };
        assert_eq!(e.kind, EventKind::CoverOpened);
        assert_eq!(e.timestamp.unix_timestamp(), 1_707_220_800);
    }

    #[test]
    fn accepts_declaration_whitespace_field_order_and_predefined_entities() {
        let pretty = "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n<EnergyUsageReport>\n  <EnergyConsumed>350.5</EnergyConsumed>\n\t<Timestamp>2024-02-06T13:00:00+01:00</Timestamp>\r\n  <MeterID>123456789</MeterID>\n</EnergyUsageReport>\n";
        assert_eq!(xml(pretty).unwrap(), xml(READING).unwrap());
        // Character references and predefined entities are resolved (and the result validated).
        assert_eq!(
            xml(&reading(
                "123&#52;56789",
                "2024-02-06T12:00:00Z",
                "3&#x35;0.5"
            )),
            xml(&reading("123456789", "2024-02-06T12:00:00Z", "350.5"))
        );
        // `&amp;` resolves to '&', which is not a meter id character: a value error, not an entity error.
        assert_eq!(
            xml(&reading("a&amp;b", "2024-02-06T12:00:00Z", "1")),
            Err(DocumentError::InvalidMeterId(MeterIdError::InvalidChar(
                '&'
            )))
        );
        // Empty end tag with whitespace, single-quoted declaration, UTF-8 BOM.
        assert!(xml(&format!("<?xml version='1.0'?>{READING}")).is_ok());
        assert!(xml(&format!("\u{feff}{READING}")).is_ok());
        assert!(xml(&READING.replace("</MeterID>", "</MeterID >")).is_ok());
    }

    #[test]
    fn dtd_is_forbidden_so_no_entity_expansion_or_xxe() {
        let laughs = "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;&lol;&lol;\">]><EnergyUsageReport><MeterID>&lol2;</MeterID></EnergyUsageReport>";
        assert_eq!(xml(laughs), Err(DocumentError::DtdForbidden));
        let xxe = "<!DOCTYPE r [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><EnergyUsageReport><MeterID>&x;</MeterID></EnergyUsageReport>";
        assert_eq!(xml(xxe), Err(DocumentError::DtdForbidden));
        assert_eq!(
            xml(&format!("<!doctype EnergyUsageReport>{READING}")),
            Err(DocumentError::DtdForbidden)
        );
        // A bare entity declaration outside a DTD is not XML at all.
        assert!(matches!(
            xml(&format!("<!ENTITY x \"y\">{READING}")),
            Err(DocumentError::MalformedXml { .. })
        ));
    }

    #[test]
    fn only_predefined_entities() {
        assert_eq!(
            xml(&reading("&lol;", "2024-02-06T12:00:00Z", "1")),
            Err(DocumentError::EntityForbidden("lol".into()))
        );
        assert_eq!(
            xml(&reading("1", "2024-02-06T12:00:00Z", "&nbsp;")),
            Err(DocumentError::EntityForbidden("nbsp".into()))
        );
        // Unterminated or invalid references are malformed XML.
        assert!(matches!(
            xml(&reading("a&b", "2024-02-06T12:00:00Z", "1")),
            Err(DocumentError::MalformedXml { .. })
        ));
        assert!(matches!(
            xml(&reading("&#0;", "2024-02-06T12:00:00Z", "1")),
            Err(DocumentError::MalformedXml { .. })
        ));
        assert!(matches!(
            xml(&reading("&#xD800;", "2024-02-06T12:00:00Z", "1")),
            Err(DocumentError::MalformedXml { .. })
        ));
    }

    #[test]
    fn processing_instructions_cdata_comments() {
        assert_eq!(
            xml(&format!("<?xml-stylesheet href='x'?>{READING}")),
            Err(DocumentError::ProcessingInstructionForbidden)
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>", "<?php echo 1 ?><MeterID>")),
            Err(DocumentError::ProcessingInstructionForbidden)
        );
        assert_eq!(
            xml(&format!("{READING}<?pi?>")),
            Err(DocumentError::ProcessingInstructionForbidden)
        );
        assert_eq!(
            xml(&format!(" <?xml version=\"1.0\"?>{READING}")),
            Err(DocumentError::MisplacedDeclaration)
        );
        assert_eq!(
            xml(&format!("{READING}<?xml version=\"1.0\"?>")),
            Err(DocumentError::MisplacedDeclaration)
        );
        assert_eq!(
            xml(&format!(
                "<?xml version=\"1.0\"?><?xml version=\"1.0\"?>{READING}"
            )),
            Err(DocumentError::MisplacedDeclaration)
        );
        assert_eq!(
            xml(&format!("<?xml version=\"1.1\"?>{READING}")),
            Err(DocumentError::InvalidDeclaration("version must be 1.0"))
        );
        assert_eq!(
            xml(&format!("<?xml?>{READING}")),
            Err(DocumentError::InvalidDeclaration(
                "malformed or missing version"
            ))
        );
        assert_eq!(
            xml(&format!(
                "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>{READING}"
            )),
            Err(DocumentError::InvalidDeclaration("encoding must be UTF-8"))
        );
        assert_eq!(
            xml(&READING.replace("350.5", "<![CDATA[350.5]]>")),
            Err(DocumentError::CdataForbidden)
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>", "<!-- hi --><MeterID>")),
            Err(DocumentError::CommentForbidden)
        );
        assert_eq!(
            xml(&format!("<!-- hi -->{READING}")),
            Err(DocumentError::CommentForbidden)
        );
    }

    #[test]
    fn attributes_are_forbidden_everywhere() {
        assert_eq!(
            xml(&READING.replace("<EnergyUsageReport>", "<EnergyUsageReport xmlns=\"urn:x\">")),
            Err(DocumentError::AttributeForbidden(
                "EnergyUsageReport".into()
            ))
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>", "<MeterID unit='x'>")),
            Err(DocumentError::AttributeForbidden("MeterID".into()))
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>", "<MeterID a>")),
            Err(DocumentError::AttributeForbidden("MeterID".into()))
        );
        assert_eq!(
            xml("<EnergyUsageReport a='1'/>"),
            Err(DocumentError::AttributeForbidden(
                "EnergyUsageReport".into()
            ))
        );
    }

    #[test]
    fn structure_errors() {
        assert_eq!(
            xml("<Report><MeterID>1</MeterID></Report>"),
            Err(DocumentError::UnknownRoot("Report".into()))
        );
        assert_eq!(
            xml(&READING.replace("EnergyUsageReport", "ns:EnergyUsageReport")),
            Err(DocumentError::UnknownRoot("ns:EnergyUsageReport".into()))
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>", "<Unit>kWh</Unit><MeterID>")),
            Err(DocumentError::UnknownElement("Unit".into()))
        );
        // A field of the other document kind is unknown in this one.
        assert_eq!(
            xml(&READING.replace("<MeterID>", "<EventType>PowerFail</EventType><MeterID>")),
            Err(DocumentError::UnknownElement("EventType".into()))
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>", "<meterid>1</meterid><MeterID>")),
            Err(DocumentError::UnknownElement("meterid".into()))
        );
        assert_eq!(
            xml(&READING.replace("350.5", "<b>350.5</b>")),
            Err(DocumentError::NestedElement("EnergyConsumed"))
        );
        assert_eq!(
            xml(&READING.replace("350.5", "<b/>")),
            Err(DocumentError::NestedElement("EnergyConsumed"))
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>123456789</MeterID>", "")),
            Err(DocumentError::MissingField("MeterID"))
        );
        assert_eq!(
            xml(&READING.replace("<Timestamp>2024-02-06T12:00:00Z</Timestamp>", "")),
            Err(DocumentError::MissingField("Timestamp"))
        );
        assert_eq!(
            xml(&READING.replace("<EnergyConsumed>350.5</EnergyConsumed>", "")),
            Err(DocumentError::MissingField("EnergyConsumed"))
        );
        assert_eq!(
            xml(&EVENT.replace("<EventType>CoverOpened</EventType>", "")),
            Err(DocumentError::MissingField("EventType"))
        );
        assert_eq!(
            xml("<MeterEvent/>"),
            Err(DocumentError::MissingField("MeterID"))
        );
        assert_eq!(
            xml(&READING.replace(
                "<MeterID>123456789</MeterID>",
                "<MeterID>123456789</MeterID><MeterID>987654321</MeterID>"
            )),
            Err(DocumentError::DuplicateField("MeterID"))
        );
        assert_eq!(
            xml(&READING.replace(
                "<MeterID>123456789</MeterID>",
                "<MeterID/><MeterID>123456789</MeterID>"
            )),
            Err(DocumentError::DuplicateField("MeterID"))
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>", "x<MeterID>")),
            Err(DocumentError::TextOutsideFields)
        );
        assert_eq!(
            xml(&format!("x{READING}")),
            Err(DocumentError::TextOutsideFields)
        );
        assert_eq!(
            xml(&READING.replace("<MeterID>", "&amp;<MeterID>")),
            Err(DocumentError::TextOutsideFields)
        );
        assert_eq!(
            xml(&format!("{READING}{READING}")),
            Err(DocumentError::TrailingContent)
        );
        assert_eq!(
            xml(&format!("{READING}<x/>")),
            Err(DocumentError::TrailingContent)
        );
        assert_eq!(
            xml(&format!("{READING}\n trailing")),
            Err(DocumentError::TrailingContent)
        );
        assert_eq!(xml(" \n"), Err(DocumentError::NoRootElement));
        assert_eq!(
            xml("<?xml version=\"1.0\"?>"),
            Err(DocumentError::NoRootElement)
        );
        // An empty field is present but invalid.
        assert_eq!(
            xml(&READING.replace("<MeterID>123456789</MeterID>", "<MeterID/>")),
            Err(DocumentError::InvalidMeterId(MeterIdError::Empty))
        );
    }

    #[test]
    fn malformed_xml_carries_message_and_position() {
        let Err(DocumentError::MalformedXml { message, position }) =
            xml(&READING.replace("</MeterID>", "</Timestamp>"))
        else {
            panic!("expected MalformedXml")
        };
        assert!(message.contains("MeterID"), "{message}");
        assert_eq!(position, READING.find("</MeterID>").unwrap() as u64);
        for bad in [
            "<",
            "<EnergyUsageReport",
            "</EnergyUsageReport>",
            "<EnergyUsageReport><MeterID>1",
            "<EnergyUsageReport>",
            "<a b='1' b='2'/>",
        ] {
            assert!(
                matches!(
                    xml(bad),
                    Err(DocumentError::MalformedXml { .. })
                        | Err(DocumentError::AttributeForbidden(_))
                ),
                "{bad}: {:?}",
                xml(bad)
            );
        }
        assert!(matches!(
            xml("<EnergyUsageReport><MeterID>1"),
            Err(DocumentError::MalformedXml { position: 29, .. })
        ));
    }

    #[test]
    fn energy_text_must_be_a_plain_decimal() {
        assert_eq!(kwh(energy("0").unwrap()), 0.0);
        assert_eq!(kwh(energy("350").unwrap()), 350.0);
        assert_eq!(kwh(energy("350.0").unwrap()), 350.0);
        assert_eq!(kwh(energy("1e-7").unwrap()), 1e-7);
        assert_eq!(kwh(energy("1.5E+3").unwrap()), 1500.0);
        assert_eq!(kwh(energy("0.000").unwrap()), 0.0);
        for bad in [
            "NaN", "nan", "inf", "Infinity", "+1", "-1", "0x10", ".5", "5.", "1e", "1e+", "01",
            " 1", "1 ", "1 0", "1,5", "1_000", "", "1.5.5", "١",
        ] {
            assert_eq!(
                energy(bad),
                Err(DocumentError::InvalidEnergy(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(energy("1e400"), Err(DocumentError::EnergyNotFinite));
        assert_eq!(
            energy("1000000000000.5"),
            Err(DocumentError::EnergyTooLarge)
        );
        assert_eq!(kwh(energy("1000000000000").unwrap()), 1e12);
        // Long junk is truncated in the error.
        let long = "9".repeat(40) + "x";
        assert_eq!(
            energy(&long),
            Err(DocumentError::InvalidEnergy(format!("{}…", "9".repeat(32))))
        );
    }

    #[test]
    fn value_errors() {
        assert_eq!(
            xml(&reading("bad/id", "2024-02-06T12:00:00Z", "1")),
            Err(DocumentError::InvalidMeterId(MeterIdError::InvalidChar(
                '/'
            )))
        );
        assert_eq!(
            xml(&reading(" 1", "2024-02-06T12:00:00Z", "1")),
            Err(DocumentError::InvalidMeterId(MeterIdError::InvalidChar(
                ' '
            )))
        );
        assert!(matches!(
            xml(&reading("1", "yesterday", "1")),
            Err(DocumentError::InvalidTimestamp { .. })
        ));
        assert!(matches!(
            xml(&reading("1", "1999-12-31T23:59:59Z", "1")),
            Err(DocumentError::TimestampOutOfRange { year: 1999 })
        ));
        assert_eq!(
            xml(&EVENT.replace("CoverOpened", "coveropened")),
            Err(DocumentError::UnknownEventType("coveropened".into()))
        );
    }
}
