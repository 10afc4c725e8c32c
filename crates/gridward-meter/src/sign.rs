//! Signing a document handed in from outside (`gridward meter sign`), so other tools can
//! produce genuine envelopes.
//!
//! By default the document is parsed and must agree with what is signed: its `MeterID` is the
//! meter's, its `Timestamp` the envelope's (taken from the document when not given). The topic
//! follows from the document kind. [`SignOptions::unchecked`] signs the bytes as they are, for
//! tests that need an envelope the head-end must refuse for its content.

use gridward_core::MeterId;
use gridward_core::document::{self, Document, DocumentError, Format, Limits};
use gridward_core::envelope::{self, EnvelopeError, EnvelopeParams, SigningKey};

/// Options of [`sign_document`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignOptions {
    /// The MQTT topic; default `meters/{id}/readings` or `meters/{id}/events` by document kind.
    pub topic: Option<String>,
    /// The envelope timestamp (seconds since the epoch); default the document's `Timestamp`.
    pub timestamp: Option<i64>,
    /// The document format; default detected from the first non-blank byte (`<` or `{`).
    pub format: Option<Format>,
    /// Sign the bytes without parsing or checking them.
    pub unchecked: bool,
}

/// A signed envelope and what went into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The COSE_Sign1 envelope.
    pub envelope: Vec<u8>,
    /// The topic it is bound to.
    pub topic: String,
    /// The envelope timestamp.
    pub timestamp: i64,
    /// The document format.
    pub format: Format,
}

/// Why a document could not be signed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The format was not given and the document starts with neither `<` nor `{`.
    #[error("cannot tell the document format (it starts with neither '<' nor '{{'); give --format")]
    UnknownFormat,
    /// The document does not parse.
    #[error("invalid document: {0}")]
    Document(#[from] DocumentError),
    /// The document is another meter's.
    #[error("the document is for meter {document}, but signing as meter {meter}")]
    MeterMismatch {
        /// `MeterID` in the document.
        document: String,
        /// The signing meter.
        meter: String,
    },
    /// The timestamp given differs from the document's.
    #[error("--timestamp {given} differs from the document's Timestamp {document}")]
    TimestampMismatch {
        /// Seconds since the epoch, given.
        given: i64,
        /// Seconds since the epoch, in the document.
        document: i64,
    },
    /// Unchecked signing needs an explicit timestamp.
    #[error("an unchecked document needs an explicit timestamp")]
    MissingTimestamp,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Envelope(#[from] EnvelopeError),
}

/// The format a document is written in, from its first non-blank byte.
pub fn detect_format(doc: &[u8]) -> Option<Format> {
    let doc = doc.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(doc);
    let first = doc.iter().copied().find(|b| !b.is_ascii_whitespace())?;
    match first {
        b'<' => Some(Format::Xml),
        b'{' => Some(Format::Json),
        _ => None,
    }
}

/// Signs `doc` as meter `meter` with `counter` (the caller guarantees it was never used).
pub fn sign_document(
    key: &SigningKey,
    meter: &MeterId,
    counter: u64,
    doc: &[u8],
    opts: &SignOptions,
) -> Result<Signed, SignError> {
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(doc).ok_or(SignError::UnknownFormat)?,
    };
    let (timestamp, default_topic) = if opts.unchecked {
        (
            opts.timestamp.ok_or(SignError::MissingTimestamp)?,
            meter.readings_topic(),
        )
    } else {
        let parsed = document::parse(doc, format, &Limits::default())?;
        if parsed.meter_id() != meter {
            return Err(SignError::MeterMismatch {
                document: parsed.meter_id().to_string(),
                meter: meter.to_string(),
            });
        }
        let doc_ts = parsed.timestamp().unix_timestamp();
        if let Some(given) = opts.timestamp.filter(|t| *t != doc_ts) {
            return Err(SignError::TimestampMismatch {
                given,
                document: doc_ts,
            });
        }
        let topic = match parsed {
            Document::Reading(_) => meter.readings_topic(),
            Document::Event(_) | Document::CommandAck(_) => meter.events_topic(),
            Document::ConcentratorEvent(_) => {
                gridward_core::relay::concentrator_events_topic(meter)
            }
        };
        (doc_ts, topic)
    };
    let topic = opts.topic.clone().unwrap_or(default_topic);
    let params = EnvelopeParams {
        meter_id: meter,
        counter,
        timestamp,
        content_type: format,
        topic: &topic,
    };
    let envelope = envelope::sign(key, &params, doc)?;
    Ok(Signed {
        envelope,
        topic,
        timestamp,
        format,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use gridward_core::envelope::verify;

    use super::*;

    const XML: &str = "<EnergyUsageReport><MeterID>M1</MeterID><Timestamp>2025-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>";
    const EVENT: &str =
        r#"{"MeterID":"M1","Timestamp":"2025-02-06T12:00:00Z","EventType":"CoverOpened"}"#;
    const TS: i64 = 1_738_843_200;

    fn key() -> SigningKey {
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        SigningKey::from_pkcs8_der(pkcs8.as_ref()).unwrap()
    }

    fn m1() -> MeterId {
        MeterId::new("M1").unwrap()
    }

    #[test]
    fn signs_readings_and_events_on_their_topics() {
        let k = key();
        let s = sign_document(&k, &m1(), 7, XML.as_bytes(), &SignOptions::default()).unwrap();
        assert_eq!(
            (s.topic.as_str(), s.timestamp, s.format),
            ("meters/M1/readings", TS, Format::Xml)
        );
        let v = verify(&s.envelope, &k.verifying_key().unwrap(), &m1(), &s.topic).unwrap();
        assert_eq!(v.header().counter, 7);
        assert!(v.into_document(&Limits::default()).is_ok());

        let s = sign_document(
            &k,
            &m1(),
            8,
            format!("\n {EVENT}").as_bytes(),
            &SignOptions::default(),
        )
        .unwrap();
        assert_eq!(
            (s.topic.as_str(), s.format),
            ("meters/M1/events", Format::Json)
        );
    }

    #[test]
    fn refuses_documents_that_disagree() {
        let k = key();
        let other = MeterId::new("M2").unwrap();
        assert!(matches!(
            sign_document(&k, &other, 1, XML.as_bytes(), &SignOptions::default()),
            Err(SignError::MeterMismatch { .. })
        ));
        let opts = SignOptions {
            timestamp: Some(TS + 1),
            ..SignOptions::default()
        };
        assert_eq!(
            sign_document(&k, &m1(), 1, XML.as_bytes(), &opts),
            Err(SignError::TimestampMismatch {
                given: TS + 1,
                document: TS
            })
        );
        assert_eq!(
            sign_document(&k, &m1(), 1, b"junk", &SignOptions::default()),
            Err(SignError::UnknownFormat)
        );
        let opts = SignOptions {
            format: Some(Format::Json),
            ..SignOptions::default()
        };
        assert!(matches!(
            sign_document(&k, &m1(), 1, XML.as_bytes(), &opts),
            Err(SignError::Document(_))
        ));
    }

    #[test]
    fn unchecked_signs_anything_with_explicit_time_and_topic() {
        let k = key();
        let opts = SignOptions {
            unchecked: true,
            format: Some(Format::Xml),
            ..SignOptions::default()
        };
        assert_eq!(
            sign_document(&k, &m1(), 1, b"junk", &opts),
            Err(SignError::MissingTimestamp)
        );
        let opts = SignOptions {
            timestamp: Some(5),
            topic: Some("meters/M2/readings".into()),
            ..opts
        };
        let s = sign_document(&k, &m1(), 1, b"junk", &opts).unwrap();
        assert_eq!(s.topic, "meters/M2/readings");
        assert!(verify(&s.envelope, &k.verifying_key().unwrap(), &m1(), &s.topic).is_ok());
    }
}
