//! The signed envelope every meter message travels in: COSE_Sign1 (RFC 9052).
//!
//! A meter signs `Sig_structure = ["Signature1", protected, external_aad, payload]` where the
//! external AAD is the MQTT topic, so a message replayed on another topic fails verification.
//! Everything the head-end decides on (algorithm, key id, content type, meter id, counter,
//! timestamp) is in the protected header; the unprotected header must be empty.
//!
//! The flow is decode → verify → parse:
//!
//! - [`Envelope::decode`] checks the structure and the header and nothing else. Its header is
//!   available as [`Envelope::unverified_header`] for routing and logging, never for decisions.
//! - [`Envelope::verify`] checks the signature with the key bound to the meter's certificate and
//!   is the only way to obtain a [`VerifiedEnvelope`].
//! - [`VerifiedEnvelope::into_document`] parses the payload (only now) and checks that the
//!   document's meter id and time agree with the signed header.
//!
//! There is no switch that turns verification off. `docs/wire-format.md` specifies the format.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, ParsedPublicKey, RsaKeyPair,
};
use ciborium::Value;
use coset::{
    CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, Label, ProtectedHeader,
    RegisteredLabel, RegisteredLabelWithPrivate, TaggedCborSerializable, iana,
};
use sha2::{Digest, Sha256};

use crate::document::{self, Document, Format, Limits};
use crate::meter_id::MeterId;

/// Private-use protected header label carrying the meter id (text string).
pub const LABEL_METER_ID: i64 = -65537;
/// Private-use protected header label carrying the message counter (unsigned integer).
pub const LABEL_COUNTER: i64 = -65538;
/// Private-use protected header label carrying the signing time (integer, seconds since the Unix epoch, UTC).
pub const LABEL_TIMESTAMP: i64 = -65539;

/// The labels a Gridward verifier understands when they are listed as critical.
const UNDERSTOOD_CRITICAL: [i64; 3] = [LABEL_METER_ID, LABEL_COUNTER, LABEL_TIMESTAMP];

/// Largest envelope accepted by [`Envelope::decode`], in bytes: a maximal document plus headers.
pub const MAX_ENVELOPE_BYTES: usize = document::DEFAULT_MAX_DOCUMENT_BYTES + 16 * 1024;

/// How long before its signing time a document may have been taken: 35 days, so a meter can
/// re-sign readings it buffered through an outage. A document never post-dates its signature.
pub const MAX_DOCUMENT_AGE_SECONDS: i64 = 35 * 24 * 3600;

/// Length of a key id: the first 16 bytes of SHA-256 over the DER SubjectPublicKeyInfo.
pub const KEY_ID_LEN: usize = 16;

/// CBOR tag of a COSE_Sign1 structure.
pub(crate) const COSE_SIGN1_TAG_BYTE: u8 = 0xd2;

/// A signature algorithm allowed in an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// ECDSA over P-256 with SHA-256; the signature is raw `r ‖ s` (64 bytes). COSE -7.
    Es256,
    /// Ed25519 (PureEdDSA). COSE -8.
    EdDsa,
    /// RSASSA-PKCS1-v1_5 with SHA-256, as Java's `SHA256withRSA`; keys of 2048 bits or more. COSE -257.
    Rs256,
}

impl Algorithm {
    /// The COSE algorithm identifier.
    pub fn cose_id(self) -> i64 {
        match self {
            Self::Es256 => -7,
            Self::EdDsa => -8,
            Self::Rs256 => -257,
        }
    }

    /// The algorithm with COSE identifier `id`, if Gridward allows it.
    pub fn from_cose_id(id: i64) -> Option<Self> {
        match id {
            -7 => Some(Self::Es256),
            -8 => Some(Self::EdDsa),
            -257 => Some(Self::Rs256),
            _ => None,
        }
    }

    /// The algorithm's COSE name: `ES256`, `EdDSA` or `RS256`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
            Self::Rs256 => "RS256",
        }
    }

    pub(crate) fn iana(self) -> iana::Algorithm {
        match self {
            Self::Es256 => iana::Algorithm::ES256,
            Self::EdDsa => iana::Algorithm::EdDSA,
            Self::Rs256 => iana::Algorithm::RS256,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The protected header of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// Signature algorithm.
    pub alg: Algorithm,
    /// Key id: [`KEY_ID_LEN`] bytes, see [`key_id`].
    pub kid: Vec<u8>,
    /// Payload format.
    pub content_type: Format,
    /// The meter that signed the message.
    pub meter_id: MeterId,
    /// The meter's message counter: strictly increasing per meter, never reused under a key.
    pub counter: u64,
    /// Signing time, seconds since the Unix epoch (UTC).
    pub timestamp: i64,
}

/// Why an envelope was refused. Every variant is a distinct security event reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The envelope is larger than [`MAX_ENVELOPE_BYTES`].
    #[error("envelope is {0} bytes; at most {MAX_ENVELOPE_BYTES} are accepted")]
    TooLarge(usize),
    /// The bytes are not a well-formed COSE_Sign1 structure.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// A CBOR tag other than COSE_Sign1 (18) wraps the structure.
    #[error("envelope is not a COSE_Sign1 structure (wrong CBOR tag)")]
    WrongTag,
    /// The protected header has no `alg`.
    #[error("protected header has no algorithm")]
    MissingAlgorithm,
    /// The protected header names an algorithm Gridward does not allow.
    #[error("algorithm {0} is not allowed (only ES256, EdDSA, RS256)")]
    UnsupportedAlgorithm(String),
    /// `alg` appears in the unprotected header, where an attacker could change it.
    #[error("algorithm must be in the protected header, found it in the unprotected header")]
    AlgorithmInUnprotectedHeader,
    /// The unprotected header is not empty.
    #[error("unprotected header must be empty, found label {0}")]
    UnprotectedHeaderNotEmpty(String),
    /// A header listed as critical is not one Gridward understands.
    #[error("unknown critical header {0}")]
    UnknownCriticalHeader(String),
    /// The protected header contains a label Gridward does not use.
    #[error("unexpected protected header label {0}")]
    UnexpectedHeader(String),
    /// A required protected header field is absent.
    #[error("protected header lacks {0}")]
    MissingHeader(&'static str),
    /// A protected header field has the wrong type or an invalid value.
    #[error("protected header field {field} is invalid: {reason}")]
    InvalidHeader {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The content type is neither `application/xml` nor `application/json`.
    #[error("content type {0} is not supported (application/xml or application/json)")]
    UnsupportedContentType(String),
    /// The payload is absent (detached payloads are not used).
    #[error("payload is missing")]
    MissingPayload,
    /// The envelope's algorithm is not the algorithm of the meter's key.
    #[error("envelope algorithm {envelope} does not match the meter key's {key}")]
    AlgorithmMismatch {
        /// Algorithm named by the envelope.
        envelope: Algorithm,
        /// Algorithm of the verifying key.
        key: Algorithm,
    },
    /// The key id does not identify the meter's key: signed with another key.
    #[error("key id {envelope} does not match the meter key {key}")]
    KeyIdMismatch {
        /// Key id in the envelope, hex.
        envelope: String,
        /// Key id of the verifying key, hex.
        key: String,
    },
    /// The header claims a meter other than the one whose key and identity were expected.
    #[error("envelope claims meter {claimed}, but the sender is meter {expected}")]
    MeterMismatch {
        /// Meter id in the header.
        claimed: String,
        /// Meter id of the authenticated sender.
        expected: String,
    },
    /// The signature does not verify: wrong key, wrong topic, or a changed byte.
    #[error("signature verification failed (wrong key, wrong topic or tampered message)")]
    BadSignature,
    /// The payload is not a valid document.
    #[error("payload rejected: {0}")]
    Document(#[from] document::DocumentError),
    /// The document's meter id differs from the signed header's.
    #[error("document is for meter {document}, envelope for {envelope}")]
    DocumentMeterMismatch {
        /// Meter id in the document.
        document: String,
        /// Meter id in the envelope header.
        envelope: String,
    },
    /// The document's time is after the signed header's, or more than
    /// [`MAX_DOCUMENT_AGE_SECONDS`] before it.
    #[error(
        "document time {document} does not fit envelope time {envelope} (at most 35 days before, never after)"
    )]
    DocumentTimeMismatch {
        /// Document timestamp, seconds since the epoch.
        document: i64,
        /// Header timestamp, seconds since the epoch.
        envelope: i64,
    },
    /// Signing failed (key or random generator failure).
    #[error("signing failed")]
    SigningFailed,
}

/// Why a key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not PEM, or no `PRIVATE KEY` / `PUBLIC KEY` block.
    #[error("key is not PEM-encoded PKCS#8 / SubjectPublicKeyInfo: {0}")]
    Pem(String),
    /// The key is not P-256, Ed25519 or RSA of at least 2048 bits.
    #[error("unsupported or malformed key (P-256, Ed25519 or RSA ≥ 2048 bits expected)")]
    Unsupported,
}

/// The key id of a public key: the first [`KEY_ID_LEN`] bytes of SHA-256 over its DER
/// SubjectPublicKeyInfo.
pub fn key_id(spki_der: &[u8]) -> Vec<u8> {
    Sha256::digest(spki_der)[..KEY_ID_LEN].to_vec()
}

/// A meter's private signing key.
pub struct SigningKey {
    inner: SigningKeyInner,
    spki: Vec<u8>,
    kid: Vec<u8>,
}

enum SigningKeyInner {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
    Rs256(RsaKeyPair),
}

impl SigningKey {
    /// Loads an unencrypted PKCS#8 private key (DER). The algorithm follows from the key type.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let (inner, spki) = if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
        {
            let spki = k.public_key().as_der().map_err(|_| KeyError::Unsupported)?;
            (SigningKeyInner::Es256(k), spki.as_ref().to_vec())
        } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            let spki = k.public_key().as_der().map_err(|_| KeyError::Unsupported)?;
            (SigningKeyInner::EdDsa(k), spki.as_ref().to_vec())
        } else if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
            if k.public_modulus_len() < 256 {
                return Err(KeyError::Unsupported);
            }
            let spki = k.public_key().as_der().map_err(|_| KeyError::Unsupported)?;
            (SigningKeyInner::Rs256(k), spki.as_ref().to_vec())
        } else {
            return Err(KeyError::Unsupported);
        };
        let kid = key_id(&spki);
        Ok(Self { inner, spki, kid })
    }

    /// Loads an unencrypted PKCS#8 private key from PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        Self::from_pkcs8_der(&pem_block(pem, "PRIVATE KEY")?)
    }

    /// The envelope algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        match self.inner {
            SigningKeyInner::Es256(_) => Algorithm::Es256,
            SigningKeyInner::EdDsa(_) => Algorithm::EdDsa,
            SigningKeyInner::Rs256(_) => Algorithm::Rs256,
        }
    }

    /// The key id carried in envelopes signed with this key.
    pub fn kid(&self) -> &[u8] {
        &self.kid
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn public_key_spki(&self) -> &[u8] {
        &self.spki
    }

    /// The matching verifying key.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_spki_der(&self.spki)
    }

    /// Signs raw bytes with this key's algorithm (ES256 signatures are raw `r ‖ s`).
    pub(crate) fn sign_bytes(&self, msg: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let rng = SystemRandom::new();
        match &self.inner {
            SigningKeyInner::Es256(k) => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| EnvelopeError::SigningFailed),
            SigningKeyInner::EdDsa(k) => Ok(k.sign(msg).as_ref().to_vec()),
            SigningKeyInner::Rs256(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| EnvelopeError::SigningFailed)?;
                Ok(sig)
            }
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.algorithm())
            .field("kid", &hex_string(&self.kid))
            .finish_non_exhaustive()
    }
}

/// A meter's public key, as taken from its certificate, ready for verification.
#[derive(Clone)]
pub struct VerifyingKey {
    alg: Algorithm,
    key: ParsedPublicKey,
    kid: Vec<u8>,
}

impl VerifyingKey {
    /// Loads a public key from its DER SubjectPublicKeyInfo (as found in an X.509 certificate).
    pub fn from_spki_der(spki: &[u8]) -> Result<Self, KeyError> {
        let candidates: [(Algorithm, &'static dyn signature::VerificationAlgorithm); 3] = [
            (Algorithm::Es256, &signature::ECDSA_P256_SHA256_FIXED),
            (Algorithm::EdDsa, &signature::ED25519),
            (Algorithm::Rs256, &signature::RSA_PKCS1_2048_8192_SHA256),
        ];
        for (alg, verification) in candidates {
            if let Ok(key) = ParsedPublicKey::new(verification, spki) {
                // Only accept the X.509 form: the key id is defined over it.
                let der = key.as_der().map_err(|_| KeyError::Unsupported)?;
                if der.as_ref() != spki {
                    continue;
                }
                return Ok(Self {
                    alg,
                    key,
                    kid: key_id(spki),
                });
            }
        }
        Err(KeyError::Unsupported)
    }

    /// Loads a public key from PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_spki_pem(pem: &str) -> Result<Self, KeyError> {
        Self::from_spki_der(&pem_block(pem, "PUBLIC KEY")?)
    }

    /// The algorithm envelopes signed by this key must name.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The key id envelopes signed by this key must carry.
    pub fn kid(&self) -> &[u8] {
        &self.kid
    }

    /// Whether `signature` is this key's signature over `msg`, with the key's algorithm.
    pub(crate) fn verifies(&self, msg: &[u8], signature: &[u8]) -> bool {
        self.key.verify_sig(msg, signature).is_ok()
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("alg", &self.alg)
            .field("kid", &hex_string(&self.kid))
            .finish()
    }
}

/// What a meter signs: everything in the protected header but the algorithm and key id, which
/// come from the key.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeParams<'a> {
    /// The signing meter.
    pub meter_id: &'a MeterId,
    /// The message counter (persist it before sending; never reuse it).
    pub counter: u64,
    /// Signing time, seconds since the Unix epoch.
    pub timestamp: i64,
    /// Format of the payload.
    pub content_type: Format,
    /// The MQTT topic the message will be published to (the external AAD).
    pub topic: &'a str,
}

/// Signs `payload` into a tagged COSE_Sign1 envelope.
pub fn sign(
    key: &SigningKey,
    params: &EnvelopeParams<'_>,
    payload: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let header = EnvelopeHeader {
        alg: key.algorithm(),
        kid: key.kid.clone(),
        content_type: params.content_type,
        meter_id: params.meter_id.clone(),
        counter: params.counter,
        timestamp: params.timestamp,
    };
    let unsigned = UnsignedEnvelope::new(header, payload.to_vec(), params.topic)?;
    let signature = key.sign_bytes(&unsigned.to_be_signed())?;
    unsigned.assemble(signature)
}

/// An envelope waiting for its signature, for signers outside this crate (an HSM, a Java
/// `Signature`, a smart meter's secure element): take [`to_be_signed`](Self::to_be_signed),
/// sign it, and [`assemble`](Self::assemble) the result.
#[derive(Debug, Clone)]
pub struct UnsignedEnvelope {
    protected: ProtectedHeader,
    payload: Vec<u8>,
    topic: String,
}

impl UnsignedEnvelope {
    /// Prepares the protected header for `header`, `payload` and `topic`.
    pub fn new(
        header: EnvelopeHeader,
        payload: Vec<u8>,
        topic: &str,
    ) -> Result<Self, EnvelopeError> {
        let built = HeaderBuilder::new()
            .algorithm(header.alg.iana())
            .key_id(header.kid)
            .content_type(header.content_type.content_type().to_owned())
            .value(
                LABEL_METER_ID,
                Value::Text(header.meter_id.as_str().to_owned()),
            )
            .value(LABEL_COUNTER, Value::Integer(header.counter.into()))
            .value(LABEL_TIMESTAMP, Value::Integer(header.timestamp.into()));
        let built = UNDERSTOOD_CRITICAL.iter().fold(built, |b, label| {
            b.add_critical_label(RegisteredLabelWithPrivate::PrivateUse(*label))
        });
        let header = built.build();
        let bytes = header
            .clone()
            .to_vec()
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        Ok(Self {
            protected: ProtectedHeader {
                original_data: Some(bytes),
                header,
            },
            payload,
            topic: topic.to_owned(),
        })
    }

    /// The exact bytes to sign: the CBOR `Sig_structure` of RFC 9052 §4.4.
    pub fn to_be_signed(&self) -> Vec<u8> {
        coset::sig_structure_data(
            coset::SignatureContext::CoseSign1,
            self.protected.clone(),
            None,
            self.topic.as_bytes(),
            &self.payload,
        )
    }

    /// The encoded protected header (the `body_protected` bstr's contents).
    pub fn protected_bytes(&self) -> &[u8] {
        self.protected.original_data.as_deref().unwrap_or_default()
    }

    /// Attaches `signature` and encodes the tagged COSE_Sign1.
    pub fn assemble(self, signature: Vec<u8>) -> Result<Vec<u8>, EnvelopeError> {
        CoseSign1Builder::new()
            .protected(self.protected.header.clone())
            .payload(self.payload)
            .signature(signature)
            .build()
            .to_tagged_vec()
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }
}

/// A decoded envelope whose signature has not been checked yet.
#[derive(Debug, Clone)]
pub struct Envelope {
    header: EnvelopeHeader,
    sign1: CoseSign1,
}

impl Envelope {
    /// Decodes the envelope structure and its protected header; checks no signature.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        let sign1 = if bytes.first() == Some(&COSE_SIGN1_TAG_BYTE) {
            CoseSign1::from_tagged_slice(bytes)
        } else if bytes.first().is_some_and(|b| b >> 5 == 6) {
            // Any other CBOR tag (major type 6).
            return Err(EnvelopeError::WrongTag);
        } else {
            CoseSign1::from_slice(bytes)
        }
        .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        check_unprotected(&sign1.unprotected)?;
        if sign1.payload.is_none() {
            return Err(EnvelopeError::MissingPayload);
        }
        let header = parse_protected(&sign1.protected.header)?;
        Ok(Self { header, sign1 })
    }

    /// The header as the sender claims it. Not authenticated: use it to look up the sender's
    /// key or for logging, never to decide anything.
    pub fn unverified_header(&self) -> &EnvelopeHeader {
        &self.header
    }

    /// Verifies the signature with `key`, the key of meter `sender`, over `topic`.
    ///
    /// Checks, in order: the algorithm matches the key, the key id matches the key, the
    /// header's meter id is `sender`, and the signature verifies over the protected header,
    /// the topic and the payload.
    pub fn verify(
        self,
        key: &VerifyingKey,
        sender: &MeterId,
        topic: &str,
    ) -> Result<VerifiedEnvelope, EnvelopeError> {
        let header = self.header;
        if header.alg != key.alg {
            return Err(EnvelopeError::AlgorithmMismatch {
                envelope: header.alg,
                key: key.alg,
            });
        }
        if header.kid != key.kid {
            return Err(EnvelopeError::KeyIdMismatch {
                envelope: hex_string(&header.kid),
                key: hex_string(&key.kid),
            });
        }
        if &header.meter_id != sender {
            return Err(EnvelopeError::MeterMismatch {
                claimed: header.meter_id.to_string(),
                expected: sender.to_string(),
            });
        }
        let tbs = self.sign1.tbs_data(topic.as_bytes());
        key.key
            .verify_sig(&tbs, &self.sign1.signature)
            .map_err(|_| EnvelopeError::BadSignature)?;
        let payload = self.sign1.payload.unwrap_or_default();
        Ok(VerifiedEnvelope {
            header,
            payload,
            topic: topic.to_owned(),
        })
    }
}

/// Decodes and verifies in one step; see [`Envelope::verify`].
pub fn verify(
    bytes: &[u8],
    key: &VerifyingKey,
    sender: &MeterId,
    topic: &str,
) -> Result<VerifiedEnvelope, EnvelopeError> {
    Envelope::decode(bytes)?.verify(key, sender, topic)
}

/// An envelope whose signature verified. Only [`Envelope::verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedEnvelope {
    header: EnvelopeHeader,
    payload: Vec<u8>,
    topic: String,
}

impl VerifiedEnvelope {
    /// The authenticated header.
    pub fn header(&self) -> &EnvelopeHeader {
        &self.header
    }

    /// The authenticated payload bytes (not yet parsed).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The topic the signature was verified over.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Parses the payload as the header's content type and checks that the document's meter id
    /// is the header's and its time is not after the header's (nor more than
    /// [`MAX_DOCUMENT_AGE_SECONDS`] before it).
    pub fn into_document(self, limits: &Limits) -> Result<VerifiedDocument, EnvelopeError> {
        let document = document::parse(&self.payload, self.header.content_type, limits)?;
        if document.meter_id() != &self.header.meter_id {
            return Err(EnvelopeError::DocumentMeterMismatch {
                document: document.meter_id().to_string(),
                envelope: self.header.meter_id.to_string(),
            });
        }
        let document_time = document.timestamp().unix_timestamp();
        let age = self.header.timestamp.saturating_sub(document_time);
        if !(0..=MAX_DOCUMENT_AGE_SECONDS).contains(&age) {
            return Err(EnvelopeError::DocumentTimeMismatch {
                document: document_time,
                envelope: self.header.timestamp,
            });
        }
        Ok(VerifiedDocument {
            envelope: self,
            document,
        })
    }
}

/// A verified envelope with its parsed, consistent document. Only
/// [`VerifiedEnvelope::into_document`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedDocument {
    envelope: VerifiedEnvelope,
    document: Document,
}

impl VerifiedDocument {
    /// The authenticated header.
    pub fn header(&self) -> &EnvelopeHeader {
        &self.envelope.header
    }

    /// The document.
    pub fn document(&self) -> &Document {
        &self.document
    }

    /// The authenticated payload bytes, as signed.
    pub fn payload(&self) -> &[u8] {
        &self.envelope.payload
    }
}

pub(crate) fn check_unprotected(h: &coset::Header) -> Result<(), EnvelopeError> {
    if h.alg.is_some() {
        return Err(EnvelopeError::AlgorithmInUnprotectedHeader);
    }
    let first = if !h.crit.is_empty() {
        Some("crit (2)".to_owned())
    } else if h.content_type.is_some() {
        Some("content type (3)".to_owned())
    } else if !h.key_id.is_empty() {
        Some("kid (4)".to_owned())
    } else if !h.iv.is_empty() {
        Some("IV (5)".to_owned())
    } else if !h.partial_iv.is_empty() {
        Some("partial IV (6)".to_owned())
    } else if !h.counter_signatures.is_empty() {
        Some("counter signature (7)".to_owned())
    } else {
        h.rest.first().map(|(l, _)| label_string(l))
    };
    match first {
        Some(label) => Err(EnvelopeError::UnprotectedHeaderNotEmpty(label)),
        None => Ok(()),
    }
}

fn parse_protected(h: &coset::Header) -> Result<EnvelopeHeader, EnvelopeError> {
    let alg = match &h.alg {
        None => return Err(EnvelopeError::MissingAlgorithm),
        Some(RegisteredLabelWithPrivate::Assigned(a)) => Algorithm::from_cose_id(*a as i64)
            .ok_or_else(|| EnvelopeError::UnsupportedAlgorithm(format!("{a:?} ({})", *a as i64)))?,
        Some(RegisteredLabelWithPrivate::PrivateUse(i)) => {
            return Err(EnvelopeError::UnsupportedAlgorithm(i.to_string()));
        }
        Some(RegisteredLabelWithPrivate::Text(t)) => {
            return Err(EnvelopeError::UnsupportedAlgorithm(format!("{t:?}")));
        }
    };
    for c in &h.crit {
        let understood = matches!(c, RegisteredLabelWithPrivate::PrivateUse(l) if UNDERSTOOD_CRITICAL.contains(l));
        if !understood {
            return Err(EnvelopeError::UnknownCriticalHeader(match c {
                RegisteredLabelWithPrivate::PrivateUse(l) => l.to_string(),
                RegisteredLabelWithPrivate::Assigned(a) => (*a as i64).to_string(),
                RegisteredLabelWithPrivate::Text(t) => format!("{t:?}"),
            }));
        }
    }
    if !h.iv.is_empty() || !h.partial_iv.is_empty() {
        return Err(EnvelopeError::UnexpectedHeader("IV (5/6)".to_owned()));
    }
    if !h.counter_signatures.is_empty() {
        return Err(EnvelopeError::UnexpectedHeader(
            "counter signature (7)".to_owned(),
        ));
    }
    let content_type = match &h.content_type {
        None => return Err(EnvelopeError::MissingHeader("content type (3)")),
        Some(RegisteredLabel::Text(t)) => Format::from_content_type(t)
            .ok_or_else(|| EnvelopeError::UnsupportedContentType(t.clone()))?,
        Some(RegisteredLabel::Assigned(a)) => {
            return Err(EnvelopeError::UnsupportedContentType(format!(
                "CoAP content format {}",
                *a as i64
            )));
        }
    };
    if h.key_id.is_empty() {
        return Err(EnvelopeError::MissingHeader("kid (4)"));
    }
    if h.key_id.len() != KEY_ID_LEN {
        return Err(EnvelopeError::InvalidHeader {
            field: "kid (4)",
            reason: format!("{} bytes, expected {KEY_ID_LEN}", h.key_id.len()),
        });
    }
    let (mut meter_id, mut counter, mut timestamp) = (None, None, None);
    for (label, value) in &h.rest {
        match label {
            Label::Int(LABEL_METER_ID) => {
                let text = value.as_text().ok_or(EnvelopeError::InvalidHeader {
                    field: "meter id (-65537)",
                    reason: "not a text string".to_owned(),
                })?;
                let id = MeterId::new(text).map_err(|e| EnvelopeError::InvalidHeader {
                    field: "meter id (-65537)",
                    reason: e.to_string(),
                })?;
                meter_id = Some(id);
            }
            Label::Int(LABEL_COUNTER) => {
                let n = value
                    .as_integer()
                    .and_then(|i| u64::try_from(i).ok())
                    .ok_or(EnvelopeError::InvalidHeader {
                        field: "counter (-65538)",
                        reason: "not an unsigned 64-bit integer".to_owned(),
                    })?;
                counter = Some(n);
            }
            Label::Int(LABEL_TIMESTAMP) => {
                let n = value
                    .as_integer()
                    .and_then(|i| i64::try_from(i).ok())
                    .ok_or(EnvelopeError::InvalidHeader {
                        field: "timestamp (-65539)",
                        reason: "not a 64-bit integer".to_owned(),
                    })?;
                timestamp = Some(n);
            }
            other => return Err(EnvelopeError::UnexpectedHeader(label_string(other))),
        }
    }
    Ok(EnvelopeHeader {
        alg,
        kid: h.key_id.clone(),
        content_type,
        meter_id: meter_id.ok_or(EnvelopeError::MissingHeader("meter id (-65537)"))?,
        counter: counter.ok_or(EnvelopeError::MissingHeader("counter (-65538)"))?,
        timestamp: timestamp.ok_or(EnvelopeError::MissingHeader("timestamp (-65539)"))?,
    })
}

pub(crate) fn label_string(l: &Label) -> String {
    match l {
        Label::Int(i) => i.to_string(),
        Label::Text(t) => format!("{t:?}"),
    }
}

pub(crate) fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Returns the contents of the first PEM block labelled `label`.
fn pem_block(text: &str, label: &str) -> Result<Vec<u8>, KeyError> {
    let blocks = pem::parse_many(text).map_err(|e| KeyError::Pem(e.to_string()))?;
    blocks
        .into_iter()
        .find(|b| b.tag() == label)
        .map(pem::Pem::into_contents)
        .ok_or_else(|| KeyError::Pem(format!("no -----BEGIN {label}----- block")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "meters/123456789/readings";
    const NOW_TS: i64 = 1_707_220_800; // 2024-02-06T12:00:00Z
    const XML: &str = "<EnergyUsageReport><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>";

    fn key(name: &str) -> SigningKey {
        let pem = match name {
            "es256" => include_str!("../tests/fixtures/es256.key.pem"),
            "eddsa" => include_str!("../tests/fixtures/eddsa.key.pem"),
            _ => include_str!("../tests/fixtures/rs256.key.pem"),
        };
        SigningKey::from_pkcs8_pem(pem).unwrap()
    }

    fn meter() -> MeterId {
        MeterId::new("123456789").unwrap()
    }

    fn params(counter: u64) -> EnvelopeParams<'static> {
        static METER: std::sync::OnceLock<MeterId> = std::sync::OnceLock::new();
        EnvelopeParams {
            meter_id: METER.get_or_init(meter),
            counter,
            timestamp: NOW_TS,
            content_type: Format::Xml,
            topic: TOPIC,
        }
    }

    /// Signs a hand-made COSE_Sign1 with `key`, for headers `sign` would never produce.
    fn craft(
        key: &SigningKey,
        protected: coset::Header,
        unprotected: coset::Header,
        payload: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut sign1 = CoseSign1 {
            protected: ProtectedHeader {
                original_data: None,
                header: protected,
            },
            unprotected,
            payload: payload.map(<[u8]>::to_vec),
            signature: vec![],
        };
        let tbs = sign1.tbs_data(TOPIC.as_bytes());
        sign1.signature = key.sign_bytes(&tbs).unwrap();
        sign1.to_tagged_vec().unwrap()
    }

    fn good_header(key: &SigningKey) -> HeaderBuilder {
        HeaderBuilder::new()
            .algorithm(key.algorithm().iana())
            .key_id(key.kid().to_vec())
            .content_type("application/xml".to_owned())
            .value(LABEL_METER_ID, Value::Text("123456789".to_owned()))
            .value(LABEL_COUNTER, Value::Integer(7.into()))
            .value(LABEL_TIMESTAMP, Value::Integer(NOW_TS.into()))
    }

    fn verify_crafted(bytes: &[u8], key: &SigningKey) -> Result<VerifiedEnvelope, EnvelopeError> {
        verify(bytes, &key.verifying_key().unwrap(), &meter(), TOPIC)
    }

    #[test]
    fn round_trip_every_algorithm() {
        for name in ["es256", "eddsa", "rs256"] {
            let k = key(name);
            let env = sign(&k, &params(42), XML.as_bytes()).unwrap();
            assert_eq!(env[0], COSE_SIGN1_TAG_BYTE);
            let verified = verify(&env, &k.verifying_key().unwrap(), &meter(), TOPIC).unwrap();
            let h = verified.header();
            assert_eq!((h.alg, h.counter, h.timestamp), (k.algorithm(), 42, NOW_TS));
            assert_eq!(verified.payload(), XML.as_bytes());
            let doc = verified.into_document(&Limits::default()).unwrap();
            assert_eq!(doc.document().meter_id(), &meter());
        }
    }

    #[test]
    fn crafted_good_header_verifies() {
        let k = key("es256");
        let env = craft(
            &k,
            good_header(&k).build(),
            coset::Header::default(),
            Some(XML.as_bytes()),
        );
        assert_eq!(verify_crafted(&env, &k).unwrap().header().counter, 7);
    }

    #[test]
    fn untagged_envelope_is_accepted() {
        let k = key("eddsa");
        let env = sign(&k, &params(1), XML.as_bytes()).unwrap();
        assert!(verify_crafted(&env[1..], &k).is_ok());
    }

    #[test]
    fn wrong_topic_fails() {
        let k = key("es256");
        let env = sign(&k, &params(1), XML.as_bytes()).unwrap();
        let err = verify(
            &env,
            &k.verifying_key().unwrap(),
            &meter(),
            "meters/123456789/events",
        )
        .unwrap_err();
        assert_eq!(err, EnvelopeError::BadSignature);
    }

    #[test]
    fn wrong_key_fails() {
        let env = sign(&key("es256"), &params(1), XML.as_bytes()).unwrap();
        let other = SigningKey::from_pkcs8_der(
            aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .unwrap()
            .as_ref(),
        )
        .unwrap();
        assert!(matches!(
            verify_crafted(&env, &other),
            Err(EnvelopeError::KeyIdMismatch { .. })
        ));
        assert!(matches!(
            verify_crafted(&env, &key("eddsa")),
            Err(EnvelopeError::AlgorithmMismatch { .. })
        ));
    }

    #[test]
    fn signature_by_another_key_under_the_right_kid_fails() {
        // An attacker who knows the victim's kid (it is public) signs with their own key.
        let victim = key("es256");
        let attacker = SigningKey::from_pkcs8_der(
            aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .unwrap()
            .as_ref(),
        )
        .unwrap();
        let env = craft(
            &attacker,
            good_header(&victim).build(),
            coset::Header::default(),
            Some(XML.as_bytes()),
        );
        assert_eq!(
            verify_crafted(&env, &victim).unwrap_err(),
            EnvelopeError::BadSignature
        );
    }

    #[test]
    fn other_meter_claim_fails() {
        let k = key("es256");
        let other = MeterId::new("987654321").unwrap();
        let env = sign(
            &k,
            &EnvelopeParams {
                meter_id: &other,
                ..params(1)
            },
            XML.as_bytes(),
        )
        .unwrap();
        assert!(matches!(
            verify_crafted(&env, &k),
            Err(EnvelopeError::MeterMismatch { .. })
        ));
    }

    #[test]
    fn alg_in_unprotected_header_is_refused() {
        let k = key("es256");
        let protected = coset::Header {
            alg: None,
            ..good_header(&k).build()
        };
        let unprotected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES256)
            .build();
        let env = craft(&k, protected, unprotected, Some(XML.as_bytes()));
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::AlgorithmInUnprotectedHeader
        );
        // Even next to a protected alg.
        let unprotected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES256)
            .build();
        let env = craft(
            &k,
            good_header(&k).build(),
            unprotected,
            Some(XML.as_bytes()),
        );
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::AlgorithmInUnprotectedHeader
        );
    }

    #[test]
    fn anything_in_unprotected_header_is_refused() {
        let k = key("es256");
        let unprotected = HeaderBuilder::new().key_id(b"x".to_vec()).build();
        let env = craft(
            &k,
            good_header(&k).build(),
            unprotected,
            Some(XML.as_bytes()),
        );
        assert!(matches!(
            verify_crafted(&env, &k),
            Err(EnvelopeError::UnprotectedHeaderNotEmpty(_))
        ));
    }

    #[test]
    fn unknown_critical_header_is_refused() {
        let k = key("es256");
        let h = good_header(&k)
            .add_critical_label(RegisteredLabelWithPrivate::PrivateUse(-70000))
            .value(-70000, Value::Bool(true))
            .build();
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::UnknownCriticalHeader("-70000".to_owned())
        );
        let h = good_header(&k)
            .add_critical(iana::HeaderParameter::Iv)
            .build();
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::UnknownCriticalHeader("5".to_owned())
        );
    }

    #[test]
    fn unexpected_and_missing_headers_are_refused() {
        let k = key("es256");
        let h = good_header(&k).value(-70001, Value::Null).build();
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::UnexpectedHeader("-70001".to_owned())
        );

        let mut h = good_header(&k).build();
        h.alg = None;
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::MissingAlgorithm
        );

        let h = coset::Header {
            content_type: None,
            ..good_header(&k).build()
        };
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::MissingHeader("content type (3)")
        );

        let h = coset::Header {
            key_id: vec![],
            ..good_header(&k).build()
        };
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::MissingHeader("kid (4)")
        );

        for (label, name) in [
            (LABEL_METER_ID, "meter id (-65537)"),
            (LABEL_COUNTER, "counter (-65538)"),
            (LABEL_TIMESTAMP, "timestamp (-65539)"),
        ] {
            let mut h = good_header(&k).build();
            h.rest.retain(|(l, _)| l != &Label::Int(label));
            let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
            assert_eq!(
                verify_crafted(&env, &k).unwrap_err(),
                EnvelopeError::MissingHeader(name)
            );
        }
    }

    #[test]
    fn invalid_header_values_are_refused() {
        let k = key("es256");
        let cases: [(i64, Value, &str); 4] = [
            (
                LABEL_COUNTER,
                Value::Integer((-1).into()),
                "counter (-65538)",
            ),
            (LABEL_COUNTER, Value::Text("1".into()), "counter (-65538)"),
            (
                LABEL_METER_ID,
                Value::Text("a/b".into()),
                "meter id (-65537)",
            ),
            (LABEL_TIMESTAMP, Value::Float(1.5), "timestamp (-65539)"),
        ];
        for (label, value, field) in cases {
            let mut h = good_header(&k).build();
            for (l, v) in &mut h.rest {
                if l == &Label::Int(label) {
                    *v = value.clone();
                }
            }
            let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
            match verify_crafted(&env, &k) {
                Err(EnvelopeError::InvalidHeader { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let h = coset::Header {
            key_id: vec![1; 8],
            ..good_header(&k).build()
        };
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert!(matches!(
            verify_crafted(&env, &k),
            Err(EnvelopeError::InvalidHeader {
                field: "kid (4)",
                ..
            })
        ));
    }

    #[test]
    fn unsupported_algorithm_and_content_type_are_refused() {
        let k = key("es256");
        let h = coset::Header {
            alg: Some(RegisteredLabelWithPrivate::Assigned(
                iana::Algorithm::HMAC_256_256,
            )),
            ..good_header(&k).build()
        };
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert!(matches!(
            verify_crafted(&env, &k),
            Err(EnvelopeError::UnsupportedAlgorithm(_))
        ));
        let h = coset::Header {
            content_type: Some(RegisteredLabel::Text("text/plain".into())),
            ..good_header(&k).build()
        };
        let env = craft(&k, h, coset::Header::default(), Some(XML.as_bytes()));
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::UnsupportedContentType("text/plain".into())
        );
    }

    #[test]
    fn structural_errors() {
        let k = key("es256");
        let env = craft(&k, good_header(&k).build(), coset::Header::default(), None);
        assert_eq!(
            verify_crafted(&env, &k).unwrap_err(),
            EnvelopeError::MissingPayload
        );
        assert!(matches!(
            verify_crafted(&[], &k),
            Err(EnvelopeError::Malformed(_))
        ));
        assert!(matches!(
            verify_crafted(&[0x84, 0x40], &k),
            Err(EnvelopeError::Malformed(_))
        ));
        // COSE_Sign (tag 98) instead of COSE_Sign1.
        assert_eq!(
            verify_crafted(&[0xd8, 0x62, 0x80], &k).unwrap_err(),
            EnvelopeError::WrongTag
        );
        let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(
            verify_crafted(&big, &k).unwrap_err(),
            EnvelopeError::TooLarge(MAX_ENVELOPE_BYTES + 1)
        );
        // Trailing bytes after the structure.
        let mut env = sign(&k, &params(1), XML.as_bytes()).unwrap();
        env.push(0);
        assert!(matches!(
            verify_crafted(&env, &k),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn every_flipped_bit_fails() {
        for name in ["es256", "eddsa", "rs256"] {
            let k = key(name);
            let vk = k.verifying_key().unwrap();
            let env = sign(&k, &params(9), XML.as_bytes()).unwrap();
            for i in 0..env.len() {
                for bit in [0x01u8, 0x80] {
                    let mut bad = env.clone();
                    bad[i] ^= bit;
                    let result = verify(&bad, &vk, &meter(), TOPIC);
                    assert!(
                        result.is_err(),
                        "{name}: flipping bit {bit:#x} of byte {i} went unnoticed"
                    );
                }
            }
        }
    }

    #[test]
    fn document_must_agree_with_header() {
        let k = key("eddsa");
        let other = XML.replace("123456789", "111");
        let env = sign(&k, &params(1), other.as_bytes()).unwrap();
        let v = verify_crafted(&env, &k).unwrap();
        assert!(matches!(
            v.into_document(&Limits::default()),
            Err(EnvelopeError::DocumentMeterMismatch { .. })
        ));

        // A reading signed later (re-signed after an outage) is fine; one from the future is not.
        let at = |timestamp| EnvelopeParams {
            timestamp,
            ..params(1)
        };
        let env = sign(&k, &at(NOW_TS + 3600), XML.as_bytes()).unwrap();
        let v = verify_crafted(&env, &k).unwrap();
        assert!(v.into_document(&Limits::default()).is_ok());
        let env = sign(&k, &at(NOW_TS - 1), XML.as_bytes()).unwrap();
        let v = verify_crafted(&env, &k).unwrap();
        assert_eq!(
            v.into_document(&Limits::default()).unwrap_err(),
            EnvelopeError::DocumentTimeMismatch {
                document: NOW_TS,
                envelope: NOW_TS - 1
            }
        );
        let env = sign(
            &k,
            &at(NOW_TS + MAX_DOCUMENT_AGE_SECONDS + 1),
            XML.as_bytes(),
        )
        .unwrap();
        let v = verify_crafted(&env, &k).unwrap();
        assert!(matches!(
            v.into_document(&Limits::default()),
            Err(EnvelopeError::DocumentTimeMismatch { .. })
        ));

        let env = sign(&k, &params(1), b"<EnergyUsageReport>").unwrap();
        let v = verify_crafted(&env, &k).unwrap();
        assert!(matches!(
            v.into_document(&Limits::default()),
            Err(EnvelopeError::Document(_))
        ));

        // The content type decides the parser: XML bytes labelled JSON are refused.
        let env = sign(
            &k,
            &EnvelopeParams {
                content_type: Format::Json,
                ..params(1)
            },
            XML.as_bytes(),
        )
        .unwrap();
        let v = verify_crafted(&env, &k).unwrap();
        assert!(matches!(
            v.into_document(&Limits::default()),
            Err(EnvelopeError::Document(_))
        ));
    }

    #[test]
    fn keys_load_from_pem_and_reject_junk() {
        let vk =
            VerifyingKey::from_spki_pem(include_str!("../tests/fixtures/rs256.pub.pem")).unwrap();
        assert_eq!(vk.algorithm(), Algorithm::Rs256);
        assert_eq!(vk.kid(), key("rs256").kid());
        assert!(matches!(
            VerifyingKey::from_spki_pem("junk"),
            Err(KeyError::Pem(_))
        ));
        assert_eq!(
            VerifyingKey::from_spki_der(b"\x30\x00").unwrap_err(),
            KeyError::Unsupported
        );
        assert_eq!(
            SigningKey::from_pkcs8_der(b"\x30\x00").unwrap_err(),
            KeyError::Unsupported
        );
    }
}
