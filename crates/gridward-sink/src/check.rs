//! The decision on one request, sans-IO: method, path, headers, body and `now` in, an
//! [`Incoming`] reading or a typed [`Refusal`] out.
//!
//! The checks run in this order, and the first failure is the answer:
//!
//! 1. method `POST` (else 405) and the configured path (else 404);
//! 2. `Content-Type: application/json` (else 415);
//! 3. the body's size (else 413; the server also stops reading past the limit);
//! 4. the RFC 9421 signature (`gridward_core::httpsig::verify_request`): covered components,
//!    `keyid` known, `created` not older than the maximum age nor in the future, `expires`
//!    not passed, a `nonce` present, the signature itself (else 401 with the reason code);
//! 5. `Content-Digest` against the body (else 400): the signature covers the digest, the
//!    digest covers the body;
//! 6. the body is a reading (else 400): `ReadingID`, `MeterID`, `Counter`, `Timestamp`,
//!    `EnergyConsumed`, nothing else, and `ReadingID` = `{MeterID}-{Counter}`.
//!
//! The nonce is not checked here: whether it was seen before is the store's durable decision
//! ([`crate::store`]), made in the transaction that stores the reading.

use gridward_core::MeterId;
use gridward_core::document::{self, DocumentError, MAX_ENERGY_KWH};
use gridward_core::downstream::{self, ForwardedReading};
use gridward_core::envelope::Envelope;
use gridward_core::httpsig::{self, HttpSigError, KeyLookup, Request, VerifyPolicy};
use gridward_core::meter_id::MeterIdError;
use time::OffsetDateTime;

/// The path readings are posted to unless configured otherwise.
pub const DEFAULT_PATH: &str = "/readings";

/// Largest body accepted, in bytes (a reading is about 130).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The only media type accepted.
pub const CONTENT_TYPE: &str = "application/json";

/// The components every accepted signature must cover (what the head-end's forwarder signs).
pub const REQUIRED_COMPONENTS: [&str; 4] =
    ["@method", "@target-uri", "content-digest", "content-type"];

/// What the sink demands of a request. Signature verification, the nonce and `expires` cannot
/// be switched off; only the limits are configurable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The path readings are posted to, e.g. `/readings`.
    pub path: String,
    /// Largest body, in bytes.
    pub max_body: usize,
    /// Largest accepted age of a signature (`now - created`).
    pub max_age: std::time::Duration,
    /// How far `created` may lie in the future (the signer's clock being ahead).
    pub max_skew: std::time::Duration,
}

impl Default for Rules {
    /// [`DEFAULT_PATH`], [`MAX_BODY_BYTES`], maximum age 300 s, skew 5 s.
    fn default() -> Self {
        let policy = VerifyPolicy::default();
        Self {
            path: DEFAULT_PATH.to_owned(),
            max_body: MAX_BODY_BYTES,
            max_age: policy.max_age,
            max_skew: policy.max_skew,
        }
    }
}

impl Rules {
    /// The signature policy: [`REQUIRED_COMPONENTS`], `expires` and `nonce` required, this
    /// maximum age and skew.
    pub fn verify_policy(&self) -> VerifyPolicy {
        VerifyPolicy {
            required_components: REQUIRED_COMPONENTS.map(String::from).to_vec(),
            max_age: self.max_age,
            max_skew: self.max_skew,
            require_expires: true,
            require_nonce: true,
        }
    }
}

/// A request as the server received it.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// The method, as sent.
    pub method: &'a str,
    /// The path of the request target, without the query.
    pub path: &'a str,
    /// The absolute target URI the sender signed, rebuilt by the server with [`target_uri`].
    pub target_uri: &'a str,
    /// The header fields in the order received.
    pub headers: &'a [(&'a str, &'a str)],
}

impl<'a> RequestParts<'a> {
    fn as_signed(&self) -> Request<'a> {
        Request {
            method: self.method,
            target_uri: self.target_uri,
            headers: self.headers,
        }
    }
}

/// Why a request was refused: every variant has an HTTP status ([`Refusal::status`]) and a
/// stable reason code ([`Refusal::code`]) for the answer, the log and the counters. The
/// `Display` text is detail for the log only; answers carry the code alone.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// 405 `method_not_allowed`: only `POST` is served.
    #[error("method {0} is not allowed; only POST")]
    MethodNotAllowed(String),
    /// 404 `not_found`: not the configured path.
    #[error("no readings are posted to {0:?}")]
    NotFound(String),
    /// 415 `content_type_unsupported`: `Content-Type` is absent or not `application/json`
    /// (optionally with `charset=utf-8`).
    #[error("content type {0:?} is not application/json")]
    UnsupportedMediaType(String),
    /// 413 `body_too_large`: the body is larger than the limit; it was not read past it.
    #[error("body larger than {max} bytes")]
    BodyTooLarge {
        /// The limit.
        max: usize,
    },
    /// 408 `body_timeout`: the body did not arrive in time.
    #[error("body not received within {0} s")]
    BodyTimeout(u64),
    /// 400 `body_incomplete`: the connection failed while the body was read.
    #[error("body incomplete: {0}")]
    BodyIncomplete(String),
    /// 400 `host_invalid`: no single `Host` (HTTP/1.1) or `:authority` (HTTP/2), or one that
    /// cannot be part of a URI, so the signed target URI cannot be rebuilt.
    #[error("host invalid: {0}")]
    HostInvalid(String),
    /// 401, the code of the error: the RFC 9421 signature is missing, malformed, made by an
    /// unknown key, expired, too old, from the future, without nonce, does not cover a
    /// required component, or does not verify.
    #[error("signature refused: {0}")]
    Signature(HttpSigError),
    /// 400, the code of the error: `Content-Digest` is missing, malformed, names no sha-256,
    /// or does not match the body.
    #[error("content digest refused: {0}")]
    Digest(HttpSigError),
    /// 400 `body_malformed`: not UTF-8 JSON, not an object, a field missing, unknown,
    /// repeated or of the wrong type.
    #[error("body malformed: {0}")]
    BodyMalformed(String),
    /// 400 `meter_id_invalid`: `MeterID` is not a valid meter id.
    #[error("MeterID invalid: {0}")]
    MeterIdInvalid(MeterIdError),
    /// 400 `counter_invalid`: `Counter` is beyond 2^63 - 1 (what the store keeps exactly).
    #[error("Counter {0} is out of range")]
    CounterInvalid(u64),
    /// 400 `timestamp_invalid`: `Timestamp` is not an RFC 3339 time in whole seconds between
    /// the years 2000 and 9999.
    #[error("Timestamp invalid: {0}")]
    TimestampInvalid(DocumentError),
    /// 400 `energy_invalid`: `EnergyConsumed` is negative or implausibly large.
    #[error("EnergyConsumed {0} is negative or above {MAX_ENERGY_KWH}")]
    EnergyInvalid(f64),
    /// 400 `reading_id_mismatch`: `ReadingID` is not `{MeterID}-{Counter}`.
    #[error("ReadingID {found:?} is not {expected:?}")]
    ReadingIdMismatch {
        /// The `ReadingID` sent.
        found: String,
        /// `{MeterID}-{Counter}`.
        expected: String,
    },
    /// 401 `nonce_replayed`: the signature's nonce was used before under the same key: the
    /// request is a replay. Decided by the store.
    #[error("nonce {nonce:?} of key {key_id:?} was used before")]
    NonceReplayed {
        /// The key id.
        key_id: String,
        /// The nonce.
        nonce: String,
    },
    /// 409 `reading_conflict`: a reading with this `ReadingID` is stored with other values.
    /// Nothing is overwritten. Decided by the store.
    #[error("reading {0} is stored with other values")]
    ReadingConflict(String),
}

impl Refusal {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Self::MethodNotAllowed(_) => 405,
            Self::NotFound(_) => 404,
            Self::UnsupportedMediaType(_) => 415,
            Self::BodyTooLarge { .. } => 413,
            Self::BodyTimeout(_) => 408,
            Self::Signature(_) | Self::NonceReplayed { .. } => 401,
            Self::ReadingConflict(_) => 409,
            Self::BodyIncomplete(_)
            | Self::HostInvalid(_)
            | Self::Digest(_)
            | Self::BodyMalformed(_)
            | Self::MeterIdInvalid(_)
            | Self::CounterInvalid(_)
            | Self::TimestampInvalid(_)
            | Self::EnergyInvalid(_)
            | Self::ReadingIdMismatch { .. } => 400,
        }
    }

    /// The stable, snake_case reason code (for signature and digest refusals, the
    /// [`HttpSigError::code`]).
    pub fn code(&self) -> &'static str {
        match self {
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::NotFound(_) => "not_found",
            Self::UnsupportedMediaType(_) => "content_type_unsupported",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyTimeout(_) => "body_timeout",
            Self::BodyIncomplete(_) => "body_incomplete",
            Self::HostInvalid(_) => "host_invalid",
            Self::Signature(e) | Self::Digest(e) => e.code(),
            Self::BodyMalformed(_) => "body_malformed",
            Self::MeterIdInvalid(_) => "meter_id_invalid",
            Self::CounterInvalid(_) => "counter_invalid",
            Self::TimestampInvalid(_) => "timestamp_invalid",
            Self::EnergyInvalid(_) => "energy_invalid",
            Self::ReadingIdMismatch { .. } => "reading_id_mismatch",
            Self::NonceReplayed { .. } => "nonce_replayed",
            Self::ReadingConflict(_) => "reading_conflict",
        }
    }
}

/// One reading as forwarded by the head-end.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// `{MeterID}-{Counter}`: what receivers de-duplicate on.
    pub reading_id: String,
    /// The meter.
    pub meter_id: MeterId,
    /// The meter's message counter (at most 2^63 - 1).
    pub counter: u64,
    /// When the meter took the reading (UTC, whole seconds).
    pub taken_at: OffsetDateTime,
    /// The cumulative register, in kWh: finite, not negative.
    pub energy_kwh: f64,
}

/// A request that passed every check: a reading, signed by a known key, with a body that
/// matches its digest. Only [`check`] makes one; the store takes nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub(crate) reading: Reading,
    pub(crate) body: String,
    pub(crate) key_id: String,
    pub(crate) nonce: String,
    pub(crate) remember_until: OffsetDateTime,
    pub(crate) received_at: OffsetDateTime,
}

impl Incoming {
    /// The reading.
    pub fn reading(&self) -> &Reading {
        &self.reading
    }

    /// The body as received (UTF-8 JSON).
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The key that signed the request.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The signature's nonce.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// Until when the nonce must be remembered: afterwards the signature is refused as
    /// expired or too old anyway.
    pub fn remember_until(&self) -> OffsetDateTime {
        self.remember_until
    }

    /// The `now` of the check.
    pub fn received_at(&self) -> OffsetDateTime {
        self.received_at
    }
}

/// The checks that need no body: method, path, content type. The server runs them before it
/// reads the body; [`check`] runs them again.
pub fn check_head(req: &RequestParts<'_>, rules: &Rules) -> Result<(), Refusal> {
    if req.method != "POST" {
        return Err(Refusal::MethodNotAllowed(req.method.to_owned()));
    }
    if req.path != rules.path {
        return Err(Refusal::NotFound(req.path.to_owned()));
    }
    let content_type = req
        .as_signed()
        .field_value("content-type")
        .map_err(|_| Refusal::UnsupportedMediaType("(too long)".to_owned()))?
        .unwrap_or_default();
    if !is_json(&content_type) {
        return Err(Refusal::UnsupportedMediaType(content_type));
    }
    Ok(())
}

/// Every check, in the order of the module documentation.
pub fn check(
    req: &RequestParts<'_>,
    body: &[u8],
    keys: &dyn KeyLookup,
    rules: &Rules,
    now: OffsetDateTime,
) -> Result<Incoming, Refusal> {
    check_head(req, rules)?;
    if body.len() > rules.max_body {
        return Err(Refusal::BodyTooLarge {
            max: rules.max_body,
        });
    }
    let signed = req.as_signed();
    let verified = httpsig::verify_request(&signed, keys, &rules.verify_policy(), now)
        .map_err(Refusal::Signature)?;
    let nonce = verified
        .nonce
        .ok_or(Refusal::Signature(HttpSigError::NonceMissing))?;
    httpsig::verify_request_content_digest(&signed, body).map_err(Refusal::Digest)?;
    let (reading, body) = parse_reading(body)?;
    Ok(Incoming {
        reading,
        body,
        key_id: verified.key_id,
        nonce,
        remember_until: verified.remember_until,
        received_at: now,
    })
}

/// `application/json`, any case, optionally with `charset=utf-8`.
fn is_json(value: &str) -> bool {
    let mut parts = value.split(';').map(str::trim);
    let media_type_ok = parts
        .next()
        .is_some_and(|t| t.eq_ignore_ascii_case(CONTENT_TYPE));
    media_type_ok
        && parts.all(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("charset")
                    && v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
            })
        })
}

/// Parses and checks a reading body; returns it with the body as text.
pub fn parse_reading(body: &[u8]) -> Result<(Reading, String), Refusal> {
    let text =
        std::str::from_utf8(body).map_err(|e| Refusal::BodyMalformed(format!("not UTF-8: {e}")))?;
    let wire: ForwardedReading =
        serde_json::from_str(text).map_err(|e| Refusal::BodyMalformed(e.to_string()))?;
    let meter_id = MeterId::new(&wire.meter_id).map_err(Refusal::MeterIdInvalid)?;
    if i64::try_from(wire.counter).is_err() {
        return Err(Refusal::CounterInvalid(wire.counter));
    }
    let taken_at = document::parse_timestamp(&wire.timestamp).map_err(Refusal::TimestampInvalid)?;
    let energy = wire.energy_consumed;
    if !(energy.is_finite() && (0.0..=MAX_ENERGY_KWH).contains(&energy)) {
        return Err(Refusal::EnergyInvalid(energy));
    }
    let expected = downstream::reading_id(meter_id.as_str(), wire.counter);
    if wire.reading_id != expected {
        return Err(Refusal::ReadingIdMismatch {
            found: wire.reading_id,
            expected,
        });
    }
    if let Some(bytes) = wire.envelope_bytes() {
        // The sink holds no meter keys: it checks that the envelope is the reading's, and keeps
        // it in the body for whoever verifies the meter's signature.
        let bytes = bytes.map_err(Refusal::BodyMalformed)?;
        let envelope = Envelope::decode(&bytes)
            .map_err(|e| Refusal::BodyMalformed(format!("Envelope: {e}")))?;
        let header = envelope.unverified_header();
        if header.meter_id != meter_id || header.counter != wire.counter {
            return Err(Refusal::BodyMalformed(format!(
                "Envelope is meter {} counter {}, not the reading's",
                header.meter_id, header.counter
            )));
        }
    }
    Ok((
        Reading {
            reading_id: expected,
            meter_id,
            counter: wire.counter,
            taken_at,
            // -0.0 is stored as 0.
            energy_kwh: energy + 0.0,
        },
        text.to_owned(),
    ))
}

/// The authority of the request target: the URI's (HTTP/2 `:authority`, or an HTTP/1.1
/// absolute-form target), else the single `Host` field. It must be a plain `host[:port]`.
pub fn authority<'a>(
    uri_authority: Option<&'a str>,
    host_fields: &[&'a str],
) -> Result<&'a str, Refusal> {
    let value = match (uri_authority, host_fields) {
        (Some(a), _) => a,
        (None, [host]) => host.trim_matches([' ', '\t']),
        (None, []) => return Err(Refusal::HostInvalid("no Host field".to_owned())),
        (None, _) => return Err(Refusal::HostInvalid("several Host fields".to_owned())),
    };
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"/?#@\\".contains(&b));
    if !plain {
        return Err(Refusal::HostInvalid(format!("{:?}", value.escape_debug())));
    }
    Ok(value)
}

/// The absolute target URI the sender signed: `https://{authority}{path-and-query}`.
pub fn target_uri(authority: &str, path_and_query: &str) -> String {
    format!("https://{authority}{path_and_query}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gridward_core::httpsig::{HttpSigningKey, HttpVerifyingKey, SignParams, sign_request};
    use time::macros::datetime;

    use super::*;

    // The Ed25519 test key of gridward-hes/src/forward/body.rs.
    const ED25519_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF
-----END PRIVATE KEY-----
";
    const URL: &str = "https://127.0.0.1:8443/readings";
    const BODY: &str = r#"{"ReadingID":"m000001-42","MeterID":"m000001","Counter":42,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":350.5}"#;
    const NOW: OffsetDateTime = datetime!(2026-12-02 10:15:02 UTC);

    fn key() -> HttpSigningKey {
        HttpSigningKey::from_pkcs8_pem(ED25519_PKCS8, "hes").unwrap()
    }

    /// What the head-end's forwarder sends: headers and body.
    struct Signed {
        url: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    struct Sign<'a> {
        body: &'a [u8],
        created: OffsetDateTime,
        validity: time::Duration,
        components: &'a [&'a str],
        key: &'a HttpSigningKey,
        content_type: &'a str,
        /// A `Content-Digest` to sign instead of the body's.
        digest: Option<&'a str>,
    }

    impl Default for Sign<'_> {
        fn default() -> Self {
            static KEY: std::sync::OnceLock<HttpSigningKey> = std::sync::OnceLock::new();
            Self {
                body: BODY.as_bytes(),
                created: NOW - time::Duration::seconds(1),
                validity: time::Duration::MINUTE,
                components: &REQUIRED_COMPONENTS,
                key: KEY.get_or_init(key),
                content_type: CONTENT_TYPE,
                digest: None,
            }
        }
    }

    impl Sign<'_> {
        fn make(&self) -> Signed {
            let digest = self
                .digest
                .map_or_else(|| httpsig::content_digest(self.body), str::to_owned);
            let fields = [
                ("content-type", self.content_type),
                ("content-digest", digest.as_str()),
            ];
            let sig = sign_request(
                &Request {
                    method: "POST",
                    target_uri: URL,
                    headers: &fields,
                },
                self.key,
                &SignParams {
                    label: "gridward".into(),
                    components: self.components.iter().map(|c| (*c).to_owned()).collect(),
                    created: self.created,
                    expires: self.created + self.validity,
                    nonce: "n-1".into(),
                },
            )
            .unwrap();
            Signed {
                url: URL.into(),
                headers: vec![
                    ("Content-Type".into(), self.content_type.into()),
                    ("Content-Digest".into(), digest),
                    ("Signature-Input".into(), sig.signature_input),
                    ("Signature".into(), sig.signature),
                ],
                body: self.body.to_vec(),
            }
        }
    }

    fn rules() -> Rules {
        Rules::default()
    }

    fn keys() -> HttpVerifyingKey {
        key().verifying_key()
    }

    impl Signed {
        fn check_with(
            &self,
            keys: &dyn KeyLookup,
            method: &str,
            path: &str,
        ) -> Result<Incoming, Refusal> {
            let headers: Vec<(&str, &str)> = self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let req = RequestParts {
                method,
                path,
                target_uri: &self.url,
                headers: &headers,
            };
            check(&req, &self.body, keys, &rules(), NOW)
        }

        fn check_as(&self, method: &str, path: &str) -> Result<Incoming, Refusal> {
            self.check_with(&keys(), method, path)
        }

        fn check(&self) -> Result<Incoming, Refusal> {
            self.check_as("POST", "/readings")
        }

        fn without(mut self, name: &str) -> Self {
            self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            self
        }

        fn set(mut self, name: &str, value: &str) -> Self {
            self = self.without(name);
            self.headers.push((name.into(), value.into()));
            self
        }
    }

    fn sig_code(r: Result<Incoming, Refusal>) -> &'static str {
        match r {
            Err(e @ Refusal::Signature(_)) => {
                assert_eq!(e.status(), 401);
                e.code()
            }
            other => panic!("expected a signature refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_genuine_request_is_accepted() {
        let incoming = Sign::default().make().check().unwrap();
        assert_eq!(
            incoming.reading(),
            &Reading {
                reading_id: "m000001-42".into(),
                meter_id: MeterId::new("m000001").unwrap(),
                counter: 42,
                taken_at: datetime!(2026-12-02 10:15:00 UTC),
                energy_kwh: 350.5,
            }
        );
        assert_eq!(incoming.body(), BODY);
        assert_eq!(incoming.key_id(), "hes");
        assert_eq!(incoming.nonce(), "n-1");
        assert_eq!(incoming.received_at(), NOW);
        // The earlier of expires (created + 60 s) and created + max age (300 s).
        assert_eq!(incoming.remember_until(), NOW + time::Duration::seconds(59));
    }

    #[test]
    fn a_p256_signature_and_a_charset_are_accepted() {
        // gridward-core/tests/fixtures/es256.key.pem (public test material).
        let pem = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQglcV95VA5iSR3jTJE
glXxWUrqOnwNJ4z7dDZB1j8eKIahRANCAAQ8D9dzKa7KQEhKRraY8pfcfc/cC6Bn
Jy0Gl+wXLtgbodK5LGXvCnRW1CpbqHnpACLsqfACZjGIK5vBiiRHZIOx
-----END PRIVATE KEY-----
";
        let p256 = HttpSigningKey::from_pkcs8_pem(pem, "hes").unwrap();
        let signed = Sign {
            key: &p256,
            content_type: "Application/JSON; charset=UTF-8",
            ..Sign::default()
        }
        .make();
        let incoming = signed
            .check_with(&p256.verifying_key(), "POST", "/readings")
            .unwrap();
        assert_eq!(incoming.key_id(), "hes");
    }

    #[test]
    fn method_and_path_come_first() {
        let signed = Sign::default().make();
        let r = signed.check_as("GET", "/readings").unwrap_err();
        assert_eq!((r.status(), r.code()), (405, "method_not_allowed"));
        let r = signed.check_as("post", "/readings").unwrap_err();
        assert_eq!(r, Refusal::MethodNotAllowed("post".into()));
        let r = signed.check_as("POST", "/other").unwrap_err();
        assert_eq!((r.status(), r.code()), (404, "not_found"));
        let r = signed.check_as("POST", "/readings/").unwrap_err();
        assert_eq!(r, Refusal::NotFound("/readings/".into()));
        // Even without a signature, the method is checked first.
        let r = Sign::default()
            .make()
            .without("signature")
            .check_as("PUT", "/x")
            .unwrap_err();
        assert_eq!(r.code(), "method_not_allowed");
    }

    #[test]
    fn content_type_must_be_json() {
        for ct in [
            "text/plain",
            "application/json; charset=latin1",
            "application/jsonx",
            "application/json, application/json",
            "",
        ] {
            let r = Sign::default()
                .make()
                .set("content-type", ct)
                .check()
                .unwrap_err();
            assert_eq!(
                (r.status(), r.code()),
                (415, "content_type_unsupported"),
                "{ct:?}"
            );
        }
        let r = Sign::default()
            .make()
            .without("content-type")
            .check()
            .unwrap_err();
        assert_eq!(r, Refusal::UnsupportedMediaType(String::new()));
    }

    #[test]
    fn an_oversized_body_is_413() {
        let mut signed = Sign::default().make();
        signed.body = vec![b' '; MAX_BODY_BYTES + 1];
        let r = signed.check().unwrap_err();
        assert_eq!(
            r,
            Refusal::BodyTooLarge {
                max: MAX_BODY_BYTES
            }
        );
        assert_eq!((r.status(), r.code()), (413, "body_too_large"));
    }

    #[test]
    fn every_signature_problem_is_401_with_its_code() {
        // Missing.
        assert_eq!(
            sig_code(Sign::default().make().without("signature").check()),
            "signature_missing"
        );
        assert_eq!(
            sig_code(Sign::default().make().without("signature-input").check()),
            "signature_missing"
        );
        // Malformed.
        assert_eq!(
            sig_code(
                Sign::default()
                    .make()
                    .set("signature-input", "gridward=(((")
                    .check()
            ),
            "signature_input_malformed"
        );
        assert_eq!(
            sig_code(
                Sign::default()
                    .make()
                    .set("signature", "gridward=12")
                    .check()
            ),
            "signature_malformed"
        );
        // Unknown key.
        let other = HttpSigningKey::from_pkcs8_pem(ED25519_PKCS8, "someone-else").unwrap();
        assert_eq!(
            sig_code(
                Sign {
                    key: &other,
                    ..Sign::default()
                }
                .make()
                .check()
            ),
            "unknown_key"
        );
        // Expired.
        assert_eq!(
            sig_code(
                Sign {
                    created: NOW - time::Duration::seconds(120),
                    ..Sign::default()
                }
                .make()
                .check()
            ),
            "signature_expired"
        );
        // Too old (but not yet expired).
        assert_eq!(
            sig_code(
                Sign {
                    created: NOW - time::Duration::seconds(301),
                    validity: time::Duration::HOUR,
                    ..Sign::default()
                }
                .make()
                .check()
            ),
            "signature_too_old"
        );
        // From the future.
        assert_eq!(
            sig_code(
                Sign {
                    created: NOW + time::Duration::seconds(60),
                    ..Sign::default()
                }
                .make()
                .check()
            ),
            "created_in_future"
        );
        // A required component not covered.
        assert_eq!(
            sig_code(
                Sign {
                    components: &["@method", "@target-uri", "content-digest"],
                    ..Sign::default()
                }
                .make()
                .check()
            ),
            "component_not_covered"
        );
        // Signed for another URL.
        let mut signed = Sign::default().make();
        signed.url = "https://127.0.0.1:9999/readings".into();
        assert_eq!(sig_code(signed.check()), "bad_signature");
        // Signed content type changed to another JSON spelling.
        assert_eq!(
            sig_code(
                Sign::default()
                    .make()
                    .set("content-type", "application/json; charset=utf-8")
                    .check()
            ),
            "bad_signature"
        );
    }

    #[test]
    fn a_signature_without_nonce_is_refused() {
        // Hand-made Signature-Input without nonce: refused before the signature is checked.
        let signed = Sign::default().make();
        let input = signed
            .headers
            .iter()
            .find(|(n, _)| n == "Signature-Input")
            .map(|(_, v)| v.replace(";nonce=\"n-1\"", ""))
            .unwrap();
        assert_eq!(
            sig_code(signed.set("signature-input", &input).check()),
            "nonce_missing"
        );
    }

    #[test]
    fn digest_problems_are_400() {
        // The body changed: the digest no longer matches.
        let mut signed = Sign::default().make();
        signed.body = BODY.replace("350.5", "1.5").into_bytes();
        let r = signed.check().unwrap_err();
        assert_eq!((r.status(), r.code()), (400, "content_digest_mismatch"));
        // The body and the digest changed: the signature no longer verifies.
        let mut signed = Sign::default().make();
        signed.body = BODY.replace("350.5", "1.5").into_bytes();
        let digest = httpsig::content_digest(&signed.body);
        let r = signed.set("content-digest", &digest).check().unwrap_err();
        assert_eq!((r.status(), r.code()), (401, "bad_signature"));
        // Digest with another algorithm only: covered by the signature, so the signature
        // fails first; signed that way, it is unsupported.
        let r = Sign::default()
            .make()
            .set("content-digest", "sha-512=:AAAA:")
            .check()
            .unwrap_err();
        assert_eq!(r.code(), "bad_signature");
    }

    #[test]
    fn a_signed_but_unusable_digest_is_400() {
        let sha512 = format!("sha-512=:{}==:", "A".repeat(86));
        for (digest, code) in [
            ("", "content_digest_missing"),
            ("sha-256=((", "content_digest_malformed"),
            ("sha-256=:AAAA:", "content_digest_malformed"),
            (sha512.as_str(), "content_digest_unsupported"),
        ] {
            let r = Sign {
                digest: Some(digest),
                ..Sign::default()
            }
            .make()
            .check()
            .unwrap_err();
            assert!(matches!(r, Refusal::Digest(_)), "{digest:?}: {r:?}");
            assert_eq!((r.status(), r.code()), (400, code), "{digest:?}");
        }
        // An absent digest fails the signature, which covers it.
        let r = Sign::default()
            .make()
            .without("content-digest")
            .check()
            .unwrap_err();
        assert_eq!((r.status(), r.code()), (401, "component_missing"));
    }

    fn body_refusal(body: &str) -> Refusal {
        Sign {
            body: body.as_bytes(),
            ..Sign::default()
        }
        .make()
        .check()
        .unwrap_err()
    }

    #[test]
    fn a_body_that_is_not_a_reading_is_400() {
        let cases: &[(&str, &str)] = &[
            ("", "body_malformed"),
            ("[]", "body_malformed"),
            ("{\"ReadingID\":\"m1-1\"}", "body_malformed"),
            (
                r#"{"ReadingID":"m1-1","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1,"Extra":1}"#,
                "body_malformed",
            ),
            (
                r#"{"ReadingID":"m1-1","ReadingID":"m1-1","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#,
                "body_malformed",
            ),
            (
                r#"{"ReadingID":"m1-1","MeterID":"m1","Counter":"1","Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#,
                "body_malformed",
            ),
            (
                r#"{"ReadingID":"m1-1","MeterID":"m1","Counter":-1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#,
                "body_malformed",
            ),
            (
                r#"{"ReadingID":"m1-1","MeterID":"m1","Counter":1.5,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#,
                "body_malformed",
            ),
            (
                r#"{"ReadingID":"m 1-1","MeterID":"m 1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#,
                "meter_id_invalid",
            ),
            (
                r#"{"ReadingID":"m1-18446744073709551615","MeterID":"m1","Counter":18446744073709551615,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#,
                "counter_invalid",
            ),
            (
                r#"{"ReadingID":"m1-1","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02 10:15:00","EnergyConsumed":1}"#,
                "timestamp_invalid",
            ),
            (
                r#"{"ReadingID":"m1-1","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":-0.5}"#,
                "energy_invalid",
            ),
            (
                r#"{"ReadingID":"m1-1","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1e13}"#,
                "energy_invalid",
            ),
            (
                r#"{"ReadingID":"m1-2","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#,
                "reading_id_mismatch",
            ),
            (
                r#"{"ReadingID":"m1-01","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#,
                "reading_id_mismatch",
            ),
        ];
        for (body, code) in cases {
            let r = body_refusal(body);
            assert_eq!((r.status(), r.code()), (400, *code), "{body}: {r}");
        }
        let r = Sign {
            body: b"\xff\xfe",
            ..Sign::default()
        }
        .make()
        .check()
        .unwrap_err();
        assert_eq!(r.code(), "body_malformed");
        assert_eq!(
            body_refusal(
                r#"{"ReadingID":"m1-2","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":1}"#
            ),
            Refusal::ReadingIdMismatch {
                found: "m1-2".into(),
                expected: "m1-1".into()
            }
        );
    }

    #[test]
    fn an_envelope_must_be_the_readings_own() {
        let key = gridward_core::envelope::SigningKey::from_pkcs8_pem(ED25519_PKCS8).unwrap();
        let meter = MeterId::new("m1").unwrap();
        let cose = |counter| {
            gridward_core::envelope::sign(
                &key,
                &gridward_core::envelope::EnvelopeParams {
                    meter_id: &meter,
                    counter,
                    timestamp: 1_764_670_500,
                    content_type: document::Format::Json,
                    topic: "meters/m1/readings",
                },
                b"{}",
            )
            .unwrap()
        };
        let body = |counter, envelope: &[u8]| {
            ForwardedReading::new(&meter, counter, datetime!(2026-12-02 10:15:00 UTC), 1.0)
                .with_envelope(envelope)
                .to_json()
        };
        let (r, text) = parse_reading(body(1, &cose(1)).as_bytes()).unwrap();
        assert_eq!(r.counter, 1);
        assert!(text.contains("\"Envelope\":\""), "{text}");
        for bad in [body(2, &cose(1)), body(1, b"not cose")] {
            let r = body_refusal(&bad);
            assert_eq!(r.code(), "body_malformed", "{bad}: {r}");
        }
        let r = body_refusal(&body(1, &cose(1)).replace("\"Envelope\":\"", "\"Envelope\":\"!"));
        assert!(r.to_string().contains("base64"), "{r}");
    }

    #[test]
    fn readings_parse_with_offsets_and_integers() {
        let (r, _) = parse_reading(
            br#"{"EnergyConsumed":7,"Timestamp":"2026-12-02T11:15:00+01:00","Counter":0,"MeterID":"M-1","ReadingID":"M-1-0"}"#,
        )
        .unwrap();
        assert_eq!(r.taken_at, datetime!(2026-12-02 10:15:00 UTC));
        assert_eq!(r.energy_kwh, 7.0);
        assert_eq!(r.counter, 0);
        let (r, _) = parse_reading(
            br#"{"ReadingID":"m1-1","MeterID":"m1","Counter":1,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":-0.0}"#,
        )
        .unwrap();
        assert!(r.energy_kwh.is_sign_positive());
    }

    #[test]
    fn the_authority_comes_from_the_uri_or_the_single_host() {
        assert_eq!(authority(Some("a:1"), &["b:2"]), Ok("a:1"));
        assert_eq!(authority(None, &[" b:2 "]), Ok("b:2"));
        assert_eq!(authority(None, &["[::1]:8443"]), Ok("[::1]:8443"));
        for hosts in [
            &[][..],
            &["a", "b"][..],
            &[""][..],
            &["a/b"][..],
            &["u@h"][..],
            &["h\n"][..],
        ] {
            let r = authority(None, hosts).unwrap_err();
            assert_eq!((r.status(), r.code()), (400, "host_invalid"), "{hosts:?}");
        }
        assert_eq!(
            target_uri("127.0.0.1:8443", "/readings?x=1"),
            "https://127.0.0.1:8443/readings?x=1"
        );
    }

    #[test]
    fn store_decisions_have_their_codes() {
        let r = Refusal::NonceReplayed {
            key_id: "hes".into(),
            nonce: "n".into(),
        };
        assert_eq!((r.status(), r.code()), (401, "nonce_replayed"));
        let r = Refusal::ReadingConflict("m1-1".into());
        assert_eq!((r.status(), r.code()), (409, "reading_conflict"));
        let r = Refusal::BodyTimeout(30);
        assert_eq!((r.status(), r.code()), (408, "body_timeout"));
    }

    #[test]
    fn rules_cannot_drop_nonce_or_expires() {
        let p = Rules {
            max_age: Duration::from_secs(10),
            ..Rules::default()
        }
        .verify_policy();
        assert!(p.require_nonce && p.require_expires);
        assert_eq!(p.max_age, Duration::from_secs(10));
        assert_eq!(p.required_components, REQUIRED_COMPONENTS.map(String::from));
    }
}
