//! Reading and event documents: the payload a meter signs, in XML or JSON, parsed strictly.
//!
//! Two documents exist in two equivalent forms each (`docs/wire-format.md` §3), and a third,
//! a meter's acknowledgement of a command ([`CommandAck`], `docs/wire-format.md` §9), in JSON
//! only:
//!
//! ```text
//! <EnergyUsageReport><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>
//! {"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":350.5}
//!
//! <MeterEvent><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EventType>CoverOpened</EventType></MeterEvent>
//! {"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EventType":"CoverOpened"}
//!
//! {"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","CommandID":"000102030405060708090a0b0c0d0e0f","Outcome":"done","Detail":"relay open"}
//!
//! {"ConcentratorID":"dc-1","Timestamp":"2026-12-03T10:00:00Z","EventType":"MeterLost","Meters":["m1","m2"]}
//! ```
//!
//! The last is a data concentrator's own event ([`ConcentratorEvent`], `docs/wire-format.md`
//! §11.4), JSON only like the acknowledgement.
//!
//! [`parse`] turns bytes into a [`Document`]; [`Document::encode`] (and the `to_json` / `to_xml`
//! methods) turn it back into the canonical form. Every refusal is a [`DocumentError`] variant of
//! its own, so the caller can record the exact reason as a security event.
//!
//! ## What is accepted
//!
//! Checked in this order, before anything is parsed: the size ([`Limits::max_bytes`]), that the
//! input is not empty, that it is UTF-8.
//!
//! XML (a deliberately small subset of XML 1.0):
//! - an optional `<?xml version="1.0" ...?>` declaration, only at the very start, with no
//!   `encoding` other than UTF-8; a UTF-8 byte-order mark before it is ignored;
//! - no DTD (`<!DOCTYPE`), hence no entity declarations: entity expansion ("billion laughs") and
//!   external entities (XXE) cannot happen. Only the five predefined entities (`&lt;` `&gt;`
//!   `&amp;` `&apos;` `&quot;`) and numeric character references are resolved;
//! - no processing instructions, no CDATA sections and no comments (all refused, not skipped:
//!   meters have no reason to send them);
//! - no attributes on any element (so no namespaces either);
//! - exactly one root element, `EnergyUsageReport` or `MeterEvent`, holding each of its three
//!   field elements exactly once, in any order, each containing only text;
//! - whitespace between elements is allowed, any other text outside the fields is not. The text
//!   of a field is taken as is: no trimming, so `<MeterID> 1</MeterID>` is an invalid meter id.
//!
//! JSON: one object with exactly the three fields of one document kind; `MeterID`, `Timestamp`
//! and `EventType` are strings, `EnergyConsumed` a number. Unknown, duplicate and missing fields
//! are refused, and so is an object carrying both `EnergyConsumed` and `EventType`.
//! An acknowledgement has `MeterID`, `Timestamp`, `CommandID` (32 hex digits), `Outcome`
//! (`done` or `refused`), and either an optional `Detail` (with `done`, 1 to
//! [`MAX_ACK_DETAIL_CHARS`] characters, no control characters) or a `Reason` (with `refused`, a
//! [`Refusal`] code); an object mixing its fields with a reading's or an event's is refused.
//! A concentrator event has `ConcentratorID` (a valid [`MeterId`]), `Timestamp`, `EventType` (a
//! [`ConcentratorEventKind`] name) and `Meters`, an array of distinct meter ids: 1 to
//! [`MAX_CONCENTRATOR_EVENT_METERS`] of them for `MeterLost` and `MeterFound`, absent or empty
//! for `PowerFail` and `PowerRestore`; an object mixing its fields with a meter document's
//! (`MeterID` included) is refused.
//! XML has neither an acknowledgement nor a concentrator event: [`Document::encode`] writes
//! them as JSON whatever the format asked for ([`Document::encoding_format`] says which), and
//! the XML parser never produces one.
//!
//! Values:
//! - `MeterID` must be a valid [`MeterId`];
//! - `Timestamp` is RFC 3339 in **whole seconds** (the envelope header carries whole seconds),
//!   `YYYY-MM-DDThh:mm:ss` followed by `Z` or a numeric offset `±hh:mm`, with an upper-case `T`
//!   and `Z`; it is normalised to UTC, whose year must lie in 2000..=9999 ([`parse_timestamp`]);
//! - `EnergyConsumed` is the cumulative register in kWh: finite, not negative (not even `-0`) and
//!   at most [`MAX_ENERGY_KWH`]. In XML its text must be a plain decimal number in JSON number
//!   syntax without a sign (`350.5`, `0`, `1e-7`; not `NaN`, `inf`, `+1`, `0x10`, `.5`, ` 1`);
//! - `EventType` is one of the [`EventKind`] names.
//!
//! Output is canonical: compact JSON with the keys in the order above, XML without declaration,
//! timestamps as `2024-02-06T12:00:00Z`, energy in the shortest form that reads back to the same
//! `f64` (`350.5` stays `350.5`). Hence `parse(doc.encode(f), f) == doc` for every valid document.

mod concentrator;
mod json;
mod xml;

pub use concentrator::{ConcentratorEvent, ConcentratorEventKind, MAX_CONCENTRATOR_EVENT_METERS};

use std::fmt;
use std::str::FromStr;

use time::{Date, Month, OffsetDateTime, Time, UtcOffset};

use crate::command::{AckOutcome, CommandAck, CommandId, MAX_ACK_DETAIL_CHARS, Refusal};
use crate::{MeterId, MeterIdError};

/// Default and recommended upper bound on a document's size, in bytes.
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// Largest `EnergyConsumed` accepted, in kWh (a terawatt-hour: far beyond any meter's register).
pub const MAX_ENERGY_KWH: f64 = 1e12;

/// Earliest year (UTC) a document timestamp may have.
pub const MIN_YEAR: i32 = 2000;

/// Latest year (UTC) a document timestamp may have.
pub const MAX_YEAR: i32 = 9999;

/// Longest piece of offending input echoed in an error message, in characters.
const SNIPPET_CHARS: usize = 32;

/// The two encodings of a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// XML (`application/xml`).
    Xml,
    /// JSON (`application/json`).
    Json,
}

impl Format {
    /// The media type naming this format: `application/xml` or `application/json`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Xml => "application/xml",
            Format::Json => "application/json",
        }
    }

    /// The format a media type names: exactly `application/xml` or `application/json`
    /// (ASCII case-insensitive, as media types are), without parameters.
    pub fn from_content_type(s: &str) -> Option<Format> {
        [Format::Xml, Format::Json]
            .into_iter()
            .find(|f| s.eq_ignore_ascii_case(f.content_type()))
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.content_type())
    }
}

/// Resource limits applied before a document is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted document, in bytes; larger input is refused unread.
    pub max_bytes: usize,
}

impl Default for Limits {
    /// [`DEFAULT_MAX_DOCUMENT_BYTES`].
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
        }
    }
}

/// A meter reading: the cumulative energy register at a point in time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The meter that took the reading.
    pub meter_id: MeterId,
    /// When the reading was taken, in UTC, whole seconds.
    pub timestamp: OffsetDateTime,
    /// The cumulative register, in kWh.
    pub energy_kwh: f64,
}

/// What happened at a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The terminal cover was opened (physical tampering).
    CoverOpened,
    /// A strong magnetic field was detected (an attempt to stall the meter).
    MagneticField,
    /// The supply failed.
    PowerFail,
    /// The supply came back.
    PowerRestore,
    /// Energy flows backwards (possible bypass or reversed wiring).
    ReverseEnergy,
    /// The terminal block cover (over the supply terminals, where a bypass is wired) was
    /// opened.
    TerminalCoverOpened,
}

impl EventKind {
    /// Every event kind, in declaration order.
    pub const ALL: [EventKind; 6] = [
        EventKind::CoverOpened,
        EventKind::MagneticField,
        EventKind::PowerFail,
        EventKind::PowerRestore,
        EventKind::ReverseEnergy,
        EventKind::TerminalCoverOpened,
    ];

    /// The name used in documents, e.g. `CoverOpened`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::CoverOpened => "CoverOpened",
            EventKind::MagneticField => "MagneticField",
            EventKind::PowerFail => "PowerFail",
            EventKind::PowerRestore => "PowerRestore",
            EventKind::ReverseEnergy => "ReverseEnergy",
            EventKind::TerminalCoverOpened => "TerminalCoverOpened",
        }
    }
}

impl FromStr for EventKind {
    type Err = DocumentError;

    /// Exactly one of the names of [`EventKind::as_str`] (case-sensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DocumentError::UnknownEventType(snippet(s)))
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A meter event (tamper, power quality).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The meter that raised the event.
    pub meter_id: MeterId,
    /// When it happened, in UTC, whole seconds.
    pub timestamp: OffsetDateTime,
    /// What happened.
    pub kind: EventKind,
}

/// A parsed document: a reading, an event, or a command acknowledgement.
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    /// An `EnergyUsageReport`.
    Reading(Reading),
    /// A `MeterEvent`.
    Event(Event),
    /// A meter's acknowledgement of a command (JSON only).
    CommandAck(CommandAck),
    /// A data concentrator's own event (JSON only), told apart by its `ConcentratorID` key.
    ConcentratorEvent(ConcentratorEvent),
}

/// Why a document was refused. Every variant is a distinct reason for the security log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The document is larger than [`Limits::max_bytes`]; it was not read.
    #[error("document is {size} bytes; at most {max} are accepted")]
    TooLarge {
        /// Size of the input.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The document is empty (zero bytes).
    #[error("document is empty")]
    Empty,
    /// The document is not valid UTF-8.
    #[error("document is not UTF-8 (invalid byte sequence at byte {position})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        position: usize,
    },

    /// The XML is not well-formed (reported by the XML reader, or cut short).
    #[error("malformed XML at byte {position}: {message}")]
    MalformedXml {
        /// What the XML reader reported.
        message: String,
        /// Byte offset where the problem was found.
        position: u64,
    },
    /// The XML contains a document type declaration (`<!DOCTYPE`); DTDs, and with them entity
    /// declarations, are forbidden.
    #[error("XML document type declarations (DTD) are forbidden")]
    DtdForbidden,
    /// The XML references an entity other than the five predefined ones.
    #[error(
        "XML entity &{0:?}; is not allowed (only the five predefined entities and character references)"
    )]
    EntityForbidden(String),
    /// The XML contains a processing instruction other than the leading XML declaration.
    #[error("XML processing instructions are forbidden")]
    ProcessingInstructionForbidden,
    /// An XML declaration (`<?xml ...?>`) appears anywhere but at the very start.
    #[error("the XML declaration must be the very first thing in the document")]
    MisplacedDeclaration,
    /// The XML declaration is malformed, not version 1.0, or names an encoding other than UTF-8.
    #[error("invalid XML declaration: {0}")]
    InvalidDeclaration(&'static str),
    /// The XML contains a CDATA section.
    #[error("XML CDATA sections are forbidden")]
    CdataForbidden,
    /// The XML contains a comment.
    #[error("XML comments are forbidden")]
    CommentForbidden,
    /// An XML element carries attributes (none are allowed, namespace declarations included).
    #[error("XML element <{0:?}> has attributes; none are allowed")]
    AttributeForbidden(String),
    /// The XML root element is neither `EnergyUsageReport` nor `MeterEvent`.
    #[error("unknown root element <{0:?}> (expected EnergyUsageReport or MeterEvent)")]
    UnknownRoot(String),
    /// The root element contains an element that is not one of its fields.
    #[error("unknown element <{0:?}>")]
    UnknownElement(String),
    /// A field element contains an element instead of text.
    #[error("field {0} contains an element; only text is allowed")]
    NestedElement(&'static str),
    /// Non-whitespace text appears outside the field elements.
    #[error("text outside the field elements")]
    TextOutsideFields,
    /// Something other than whitespace follows the root element (a second root, text, ...).
    #[error("content after the root element")]
    TrailingContent,
    /// The XML has no root element.
    #[error("XML document has no root element")]
    NoRootElement,

    /// The JSON is not well-formed (reported by the JSON parser).
    #[error("malformed JSON at line {line} column {column}: {message}")]
    MalformedJson {
        /// What the JSON parser reported.
        message: String,
        /// Line of the problem (1-based).
        line: usize,
        /// Column of the problem (1-based).
        column: usize,
    },
    /// The top-level JSON value is not an object.
    #[error("JSON document must be an object, found {0}")]
    NotAnObject(&'static str),
    /// A JSON object key is not a field of any document.
    #[error("unknown field {0:?}")]
    UnknownField(String),
    /// A JSON field has the wrong type (e.g. `EnergyConsumed` as a string).
    #[error("field {field} must be a {expected}, found {found}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// The JSON type it must have.
        expected: &'static str,
        /// The JSON type it has.
        found: &'static str,
    },
    /// A JSON object mixes the fields of several document kinds (`EnergyConsumed`,
    /// `EventType`, the acknowledgement's `CommandID`/`Outcome`/`Detail`/`Reason`, the
    /// concentrator event's `ConcentratorID`/`Meters`, which excludes `MeterID`).
    #[error(
        "document mixes the fields of a reading (EnergyConsumed), an event (EventType), a command acknowledgement (CommandID, Outcome, Detail, Reason) and a concentrator event (ConcentratorID, Meters; no MeterID)"
    )]
    AmbiguousKind,

    /// A required field is absent.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field appears more than once.
    #[error("duplicate field {0}")]
    DuplicateField(&'static str),

    /// `MeterID` is not a valid meter id.
    #[error("invalid MeterID: {0}")]
    InvalidMeterId(#[from] MeterIdError),
    /// `Timestamp` is not an RFC 3339 time in whole seconds.
    #[error("invalid Timestamp {value:?}: {reason}")]
    InvalidTimestamp {
        /// The offending text (truncated).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `Timestamp`, in UTC, lies outside the years [`MIN_YEAR`]..=[`MAX_YEAR`].
    #[error("Timestamp year {year} is outside {MIN_YEAR}..={MAX_YEAR}")]
    TimestampOutOfRange {
        /// The year (UTC where it can be represented).
        year: i32,
    },
    /// The XML text of `EnergyConsumed` is not a plain unsigned decimal number.
    #[error("EnergyConsumed {0:?} is not a plain decimal number")]
    InvalidEnergy(String),
    /// `EnergyConsumed` is not finite (e.g. `1e400` overflowing to infinity).
    #[error("EnergyConsumed is not finite")]
    EnergyNotFinite,
    /// `EnergyConsumed` is negative (including `-0`).
    #[error("EnergyConsumed is negative")]
    EnergyNegative,
    /// `EnergyConsumed` exceeds [`MAX_ENERGY_KWH`].
    #[error("EnergyConsumed exceeds {MAX_ENERGY_KWH} kWh")]
    EnergyTooLarge,
    /// `EventType` is not one of the [`EventKind`] names.
    #[error("unknown EventType {0:?}")]
    UnknownEventType(String),
    /// An acknowledgement's `CommandID` is not 32 hex digits.
    #[error("invalid CommandID {0:?}: expected 32 hex digits")]
    InvalidCommandId(String),
    /// An acknowledgement's `Outcome` is neither `done` nor `refused`.
    #[error("unknown Outcome {0:?} (expected done or refused)")]
    UnknownOutcome(String),
    /// An acknowledgement's `Reason` is not a refusal code.
    #[error("unknown Reason {0:?} (expected a command refusal code such as expired)")]
    UnknownRefusal(String),
    /// An acknowledgement's `Detail` breaks the rules.
    #[error("invalid Detail: {0} (1 to {MAX_ACK_DETAIL_CHARS} characters, no control characters)")]
    InvalidDetail(&'static str),
    /// A field that the acknowledgement's outcome excludes (`Detail` with `refused`, `Reason`
    /// with `done`).
    #[error("field {field} is not allowed with Outcome {outcome}")]
    FieldNotAllowed {
        /// The field.
        field: &'static str,
        /// The outcome.
        outcome: &'static str,
    },
    /// A concentrator event's `EventType` is not one of the [`ConcentratorEventKind`] names.
    #[error("unknown concentrator EventType {0:?}")]
    UnknownConcentratorEventType(String),
    /// A `MeterLost` or `MeterFound` concentrator event without meters (`Meters` absent or
    /// empty).
    #[error("concentrator event {0} must list at least one meter in Meters")]
    MetersRequired(&'static str),
    /// A power concentrator event (`PowerFail`, `PowerRestore`) listing meters.
    #[error("concentrator event {0} must not list meters")]
    MetersNotAllowed(&'static str),
    /// A concentrator event listing more than [`MAX_CONCENTRATOR_EVENT_METERS`] meters.
    #[error("concentrator event lists {count} meters; at most {max} are accepted")]
    TooManyMeters {
        /// Meters listed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A concentrator event listing a meter twice.
    #[error("concentrator event lists meter {0:?} twice")]
    DuplicateMeter(String),
    /// The document is valid but of the other kind than required (an event where a reading
    /// was expected).
    #[error("expected a {expected} document, found a {found}")]
    WrongDocumentKind {
        /// The kind asked for.
        expected: &'static str,
        /// The kind found.
        found: &'static str,
    },
}

/// Parses a document strictly (see the [module documentation](self) for what is accepted).
pub fn parse(bytes: &[u8], format: Format, limits: &Limits) -> Result<Document, DocumentError> {
    let text = check_input(bytes, limits)?;
    match format {
        Format::Xml => xml::parse(text),
        Format::Json => json::parse(text),
    }
}

/// Parses a document that must be a reading; an event is refused with
/// [`DocumentError::WrongDocumentKind`].
pub fn parse_reading(
    bytes: &[u8],
    format: Format,
    limits: &Limits,
) -> Result<Reading, DocumentError> {
    match parse(bytes, format, limits)? {
        Document::Reading(r) => Ok(r),
        other => Err(DocumentError::WrongDocumentKind {
            expected: "reading",
            found: other.kind_name(),
        }),
    }
}

/// Parses an XML document strictly and returns its canonical JSON form.
pub fn xml_to_json(bytes: &[u8], limits: &Limits) -> Result<String, DocumentError> {
    Ok(parse(bytes, Format::Xml, limits)?.to_json())
}

/// The size, emptiness and UTF-8 checks every document passes before it is parsed.
fn check_input<'a>(bytes: &'a [u8], limits: &Limits) -> Result<&'a str, DocumentError> {
    if bytes.len() > limits.max_bytes {
        return Err(DocumentError::TooLarge {
            size: bytes.len(),
            max: limits.max_bytes,
        });
    }
    if bytes.is_empty() {
        return Err(DocumentError::Empty);
    }
    std::str::from_utf8(bytes).map_err(|e| DocumentError::NotUtf8 {
        position: e.valid_up_to(),
    })
}

impl Reading {
    /// A validated reading: the timestamp is normalised to UTC and must be in whole seconds
    /// within the accepted years; the energy must be finite, non-negative and at most
    /// [`MAX_ENERGY_KWH`].
    pub fn new(
        meter_id: MeterId,
        timestamp: OffsetDateTime,
        energy_kwh: f64,
    ) -> Result<Self, DocumentError> {
        let timestamp = check_timestamp(timestamp)?;
        check_energy(energy_kwh)?;
        Ok(Self {
            meter_id,
            timestamp,
            energy_kwh,
        })
    }

    /// The canonical JSON form, e.g.
    /// `{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":350.5}`.
    ///
    /// A non-finite energy (which [`parse`] never produces) is written as `null`.
    pub fn to_json(&self) -> String {
        // MeterId's alphabet needs no JSON escaping; the timestamp is canonical.
        format!(
            r#"{{"MeterID":"{}","Timestamp":"{}","EnergyConsumed":{}}}"#,
            self.meter_id,
            format_timestamp(self.timestamp),
            format_energy(self.energy_kwh).unwrap_or_else(|| "null".to_owned()),
        )
    }

    /// The canonical XML form, without declaration, e.g.
    /// `<EnergyUsageReport><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>`.
    ///
    /// A non-finite energy (which [`parse`] never produces) is written as Rust prints it
    /// (`NaN`, `inf`), which [`parse`] refuses.
    pub fn to_xml(&self) -> String {
        // MeterId's alphabet needs no XML escaping; the timestamp is canonical.
        format!(
            "<EnergyUsageReport><MeterID>{}</MeterID><Timestamp>{}</Timestamp><EnergyConsumed>{}</EnergyConsumed></EnergyUsageReport>",
            self.meter_id,
            format_timestamp(self.timestamp),
            format_energy(self.energy_kwh).unwrap_or_else(|| self.energy_kwh.to_string()),
        )
    }
}

impl Event {
    /// A validated event: the timestamp is normalised to UTC and must be in whole seconds
    /// within the accepted years.
    pub fn new(
        meter_id: MeterId,
        timestamp: OffsetDateTime,
        kind: EventKind,
    ) -> Result<Self, DocumentError> {
        let timestamp = check_timestamp(timestamp)?;
        Ok(Self {
            meter_id,
            timestamp,
            kind,
        })
    }

    /// The canonical JSON form, e.g.
    /// `{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EventType":"CoverOpened"}`.
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"MeterID":"{}","Timestamp":"{}","EventType":"{}"}}"#,
            self.meter_id,
            format_timestamp(self.timestamp),
            self.kind,
        )
    }

    /// The canonical XML form, without declaration, e.g.
    /// `<MeterEvent><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EventType>CoverOpened</EventType></MeterEvent>`.
    pub fn to_xml(&self) -> String {
        format!(
            "<MeterEvent><MeterID>{}</MeterID><Timestamp>{}</Timestamp><EventType>{}</EventType></MeterEvent>",
            self.meter_id,
            format_timestamp(self.timestamp),
            self.kind,
        )
    }
}

impl Document {
    /// The meter the document is about: for a concentrator event, the concentrator (whose
    /// envelope header carries the concentrator id as its meter id).
    pub fn meter_id(&self) -> &MeterId {
        match self {
            Document::Reading(r) => &r.meter_id,
            Document::Event(e) => &e.meter_id,
            Document::CommandAck(a) => &a.meter_id,
            Document::ConcentratorEvent(c) => &c.concentrator_id,
        }
    }

    /// The document's time (UTC).
    pub fn timestamp(&self) -> OffsetDateTime {
        match self {
            Document::Reading(r) => r.timestamp,
            Document::Event(e) => e.timestamp,
            Document::CommandAck(a) => a.timestamp,
            Document::ConcentratorEvent(c) => c.timestamp,
        }
    }

    /// `"reading"`, `"event"`, `"command_ack"` or `"concentrator_event"`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Document::Reading(_) => "reading",
            Document::Event(_) => "event",
            Document::CommandAck(_) => "command_ack",
            Document::ConcentratorEvent(_) => "concentrator_event",
        }
    }

    /// The canonical JSON form.
    pub fn to_json(&self) -> String {
        match self {
            Document::Reading(r) => r.to_json(),
            Document::Event(e) => e.to_json(),
            Document::CommandAck(a) => a.to_json(),
            Document::ConcentratorEvent(c) => c.to_json(),
        }
    }

    /// The canonical XML form of a reading or an event.
    ///
    /// A command acknowledgement and a concentrator event have no XML form (they are JSON
    /// only): for them, this returns the JSON form, as [`Document::encode`] does. Label what you send with
    /// [`Document::encoding_format`].
    pub fn to_xml(&self) -> String {
        match self {
            Document::Reading(r) => r.to_xml(),
            Document::Event(e) => e.to_xml(),
            Document::CommandAck(a) => a.to_json(),
            Document::ConcentratorEvent(c) => c.to_json(),
        }
    }

    /// Whether the document has an XML form (readings and events do, acknowledgements and
    /// concentrator events do not).
    pub fn has_xml_form(&self) -> bool {
        !matches!(
            self,
            Document::CommandAck(_) | Document::ConcentratorEvent(_)
        )
    }

    /// Whether the document is a data concentrator's own event (sent on
    /// `concentrators/{id}/events`, never on a meter's topic).
    pub fn is_concentrator_event(&self) -> bool {
        matches!(self, Document::ConcentratorEvent(_))
    }

    /// The format [`Document::encode`] writes when asked for `f`: `f`, except JSON for a
    /// command acknowledgement or a concentrator event, which have no XML form. Use it as the envelope's content type.
    pub fn encoding_format(&self, f: Format) -> Format {
        if self.has_xml_form() { f } else { Format::Json }
    }

    /// The canonical form in [`Document::encoding_format`]`(f)`: in `f` for a reading or an
    /// event, always JSON for a command acknowledgement or a concentrator event.
    pub fn encode(&self, f: Format) -> String {
        match self.encoding_format(f) {
            Format::Xml => self.to_xml(),
            Format::Json => self.to_json(),
        }
    }
}

impl From<Reading> for Document {
    fn from(r: Reading) -> Self {
        Document::Reading(r)
    }
}

impl From<Event> for Document {
    fn from(e: Event) -> Self {
        Document::Event(e)
    }
}

impl From<CommandAck> for Document {
    fn from(a: CommandAck) -> Self {
        Document::CommandAck(a)
    }
}

impl From<ConcentratorEvent> for Document {
    fn from(c: ConcentratorEvent) -> Self {
        Document::ConcentratorEvent(c)
    }
}

/// The canonical form of a time: UTC, whole seconds, `Z`, e.g. `2024-02-06T12:00:00Z`.
///
/// Sub-second digits are dropped. A time whose UTC form is outside what [`time`] can represent
/// is written in its own offset (`±hh:mm`) instead; [`parse_timestamp`] refuses such years anyway.
pub fn format_timestamp(t: OffsetDateTime) -> String {
    match t.checked_to_offset(UtcOffset::UTC) {
        Some(u) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            u.year(),
            u8::from(u.month()),
            u.day(),
            u.hour(),
            u.minute(),
            u.second()
        ),
        None => {
            let (oh, om, _) = t.offset().as_hms();
            let sign = if t.offset().is_negative() { '-' } else { '+' };
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                oh.unsigned_abs(),
                om.unsigned_abs()
            )
        }
    }
}

/// Parses an RFC 3339 time in whole seconds, `YYYY-MM-DDThh:mm:ss` followed by `Z` or `±hh:mm`,
/// and normalises it to UTC, whose year must lie in [`MIN_YEAR`]..=[`MAX_YEAR`].
///
/// Stricter than RFC 3339: fractional seconds, lower-case `t`/`z`, a space for `T`, and leap
/// seconds (`:60`) are refused. `-00:00` is read as UTC.
pub fn parse_timestamp(s: &str) -> Result<OffsetDateTime, DocumentError> {
    let bad = |reason| DocumentError::InvalidTimestamp {
        value: snippet(s),
        reason,
    };
    const SHAPE: &str = "expected YYYY-MM-DDThh:mm:ss followed by Z or ±hh:mm";
    let Some((head, tail)) = s.as_bytes().split_at_checked(19) else {
        return Err(bad(SHAPE));
    };
    let &[
        y1,
        y2,
        y3,
        y4,
        b'-',
        mo1,
        mo2,
        b'-',
        d1,
        d2,
        b'T',
        h1,
        h2,
        b':',
        mi1,
        mi2,
        b':',
        s1,
        s2,
    ] = head
    else {
        return Err(bad(SHAPE));
    };
    if ![y1, y2, y3, y4, mo1, mo2, d1, d2, h1, h2, mi1, mi2, s1, s2]
        .iter()
        .all(u8::is_ascii_digit)
    {
        return Err(bad(SHAPE));
    }
    let offset = match tail {
        b"Z" => UtcOffset::UTC,
        &[sign @ (b'+' | b'-'), oh1, oh2, b':', om1, om2]
            if [oh1, oh2, om1, om2].iter().all(u8::is_ascii_digit) =>
        {
            let (h, m) = (two_digits(oh1, oh2), two_digits(om1, om2));
            if h > 23 || m > 59 {
                return Err(bad("UTC offset out of range"));
            }
            // h <= 23 and m <= 59 fit in i8.
            let (h, m) = (h as i8, m as i8);
            let (h, m) = if sign == b'-' { (-h, -m) } else { (h, m) };
            UtcOffset::from_hms(h, m, 0).map_err(|_| bad("UTC offset out of range"))?
        }
        [b'.', ..] => return Err(bad("fractional seconds are not accepted")),
        _ => return Err(bad("expected Z or ±hh:mm after the seconds")),
    };
    let year = i32::from(two_digits(y1, y2)) * 100 + i32::from(two_digits(y3, y4));
    if !(MIN_YEAR..=MAX_YEAR).contains(&year) {
        return Err(DocumentError::TimestampOutOfRange { year });
    }
    let month = Month::try_from(two_digits(mo1, mo2)).map_err(|_| bad("invalid month"))?;
    let date = Date::from_calendar_date(year, month, two_digits(d1, d2))
        .map_err(|_| bad("invalid day of month"))?;
    let time = Time::from_hms(two_digits(h1, h2), two_digits(mi1, mi2), two_digits(s1, s2))
        .map_err(|_| bad("invalid time of day"))?;
    // Only the last hours of 9999-12-31 with a negative offset leave the representable range.
    let utc = OffsetDateTime::new_in_offset(date, time, offset)
        .checked_to_offset(UtcOffset::UTC)
        .ok_or(DocumentError::TimestampOutOfRange { year: MAX_YEAR + 1 })?;
    if !(MIN_YEAR..=MAX_YEAR).contains(&utc.year()) {
        return Err(DocumentError::TimestampOutOfRange { year: utc.year() });
    }
    Ok(utc)
}

/// The value of two ASCII digits (callers check they are digits).
fn two_digits(a: u8, b: u8) -> u8 {
    (a.wrapping_sub(b'0'))
        .wrapping_mul(10)
        .wrapping_add(b.wrapping_sub(b'0'))
}

/// Normalises a constructed timestamp to UTC and applies the rules [`parse_timestamp`] applies.
pub(crate) fn check_timestamp(t: OffsetDateTime) -> Result<OffsetDateTime, DocumentError> {
    let utc = t
        .checked_to_offset(UtcOffset::UTC)
        .ok_or(DocumentError::TimestampOutOfRange { year: t.year() })?;
    if !(MIN_YEAR..=MAX_YEAR).contains(&utc.year()) {
        return Err(DocumentError::TimestampOutOfRange { year: utc.year() });
    }
    if utc.nanosecond() != 0 {
        return Err(DocumentError::InvalidTimestamp {
            value: format_timestamp(utc),
            reason: "fractional seconds are not accepted",
        });
    }
    Ok(utc)
}

/// Checks an energy value: finite, not negative (sign bit clear, so `-0` too), at most
/// [`MAX_ENERGY_KWH`].
fn check_energy(kwh: f64) -> Result<f64, DocumentError> {
    if !kwh.is_finite() {
        Err(DocumentError::EnergyNotFinite)
    } else if kwh.is_sign_negative() {
        Err(DocumentError::EnergyNegative)
    } else if kwh > MAX_ENERGY_KWH {
        Err(DocumentError::EnergyTooLarge)
    } else {
        Ok(kwh)
    }
}

/// Parses the XML text of `EnergyConsumed`: JSON number syntax without a sign
/// (`int [frac] [exp]`, `int` without leading zeros), then the value checks of [`check_energy`].
fn parse_energy_text(s: &str) -> Result<f64, DocumentError> {
    if !is_plain_decimal(s.as_bytes()) {
        return Err(DocumentError::InvalidEnergy(snippet(s)));
    }
    // Rust's float parser is correctly rounded, so the shortest form written by `format_energy`
    // reads back to the same value. The grammar above is a subset of what it accepts.
    let v: f64 = s
        .parse()
        .map_err(|_| DocumentError::InvalidEnergy(snippet(s)))?;
    check_energy(v)
}

/// `0 | [1-9][0-9]*`, then optionally `.` digits, then optionally `e|E [+|-] digits`.
fn is_plain_decimal(s: &[u8]) -> bool {
    fn digits(s: &[u8], i: &mut usize) -> usize {
        let start = *i;
        while s.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    }
    let mut i = 0;
    match s.first() {
        Some(b'0') => i = 1,
        Some(b'1'..=b'9') => {
            digits(s, &mut i);
        }
        _ => return false,
    }
    if s.get(i) == Some(&b'.') {
        i += 1;
        if digits(s, &mut i) == 0 {
            return false;
        }
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(s.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(s, &mut i) == 0 {
            return false;
        }
    }
    i == s.len()
}

/// The shortest decimal form of a finite `f64` that reads back to the same value (as
/// `serde_json` writes numbers: `350.5`, `350.0`, `1e-7`); `None` for NaN and infinities.
fn format_energy(kwh: f64) -> Option<String> {
    serde_json::Number::from_f64(kwh).map(|n| n.to_string())
}

/// Where a reading's energy comes from: XML text still to be checked, or a JSON number.
enum Energy<'a> {
    /// The text of an XML `EnergyConsumed` element.
    Text(&'a str),
    /// A JSON number.
    Number(f64),
}

/// Builds a reading from present fields, validating each value in document order.
fn build_reading(
    meter_id: &str,
    timestamp: &str,
    energy: Energy<'_>,
) -> Result<Document, DocumentError> {
    let meter_id = MeterId::new(meter_id)?;
    let timestamp = parse_timestamp(timestamp)?;
    let energy_kwh = match energy {
        Energy::Text(s) => parse_energy_text(s)?,
        Energy::Number(v) => check_energy(v)?,
    };
    Ok(Document::Reading(Reading {
        meter_id,
        timestamp,
        energy_kwh,
    }))
}

/// Builds an event from present fields, validating each value in document order.
fn build_event(
    meter_id: &str,
    timestamp: &str,
    event_type: &str,
) -> Result<Document, DocumentError> {
    let meter_id = MeterId::new(meter_id)?;
    let timestamp = parse_timestamp(timestamp)?;
    let kind = event_type.parse()?;
    Ok(Document::Event(Event {
        meter_id,
        timestamp,
        kind,
    }))
}

/// The fields of an acknowledgement, as found.
struct AckFields<'a> {
    /// `MeterID`.
    meter_id: &'a str,
    /// `Timestamp`.
    timestamp: &'a str,
    /// `CommandID`.
    command_id: &'a str,
    /// `Outcome`.
    outcome: &'a str,
    /// `Detail`, if present.
    detail: Option<String>,
    /// `Reason`, if present.
    reason: Option<&'a str>,
}

/// Builds an acknowledgement from present fields, validating each value in document order.
fn build_ack(f: AckFields<'_>) -> Result<Document, DocumentError> {
    let meter_id = MeterId::new(f.meter_id)?;
    let timestamp = parse_timestamp(f.timestamp)?;
    let command_id: CommandId = f
        .command_id
        .parse()
        .map_err(|_| DocumentError::InvalidCommandId(snippet(f.command_id)))?;
    let outcome = match (f.outcome, f.detail, f.reason) {
        ("done", _, Some(_)) => {
            return Err(DocumentError::FieldNotAllowed {
                field: "Reason",
                outcome: "done",
            });
        }
        ("done", detail, None) => {
            if let Some(d) = &detail {
                crate::command::check_ack_detail(d)?;
            }
            AckOutcome::Done { detail }
        }
        ("refused", Some(_), _) => {
            return Err(DocumentError::FieldNotAllowed {
                field: "Detail",
                outcome: "refused",
            });
        }
        ("refused", None, None) => return Err(DocumentError::MissingField("Reason")),
        ("refused", None, Some(code)) => AckOutcome::Refused(
            Refusal::from_code(code).ok_or_else(|| DocumentError::UnknownRefusal(snippet(code)))?,
        ),
        (other, _, _) => return Err(DocumentError::UnknownOutcome(snippet(other))),
    };
    Ok(Document::CommandAck(CommandAck {
        meter_id,
        timestamp,
        command_id,
        outcome,
    }))
}

/// At most [`SNIPPET_CHARS`] characters of attacker-supplied text, for error messages.
fn snippet(s: &str) -> String {
    match s.char_indices().nth(SNIPPET_CHARS) {
        Some((i, _)) => format!("{}…", s.get(..i).unwrap_or_default()),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests;
