//! Security events: every refusal anywhere in Gridward becomes one, with a stable reason code.
//!
//! The reason codes are part of the interface: operators filter on them, alarms key on them,
//! and the attack harness checks that each attack produced the one it should.

use std::fmt;

use time::OffsetDateTime;

use crate::envelope::EnvelopeError;
use crate::meter_id::MeterId;
use crate::replay::FreshnessError;

/// Why something was refused. [`Reason::code`] is the stable, machine-readable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Reason {
    /// The TLS handshake failed for a reason no more specific variant names (bad protocol
    /// version or cipher suite, a malformed certificate, garbage instead of TLS, EOF, ...).
    TlsHandshakeFailed,
    /// The client presented no certificate.
    CertificateMissing,
    /// The client certificate does not chain to a trusted CA: unknown issuer, a signature in the
    /// chain that does not verify with its claimed issuer's key, or one made with an
    /// unsupported algorithm.
    CertificateUntrusted,
    /// The client certificate's extended key usage does not allow this use (e.g. a server
    /// certificate presented as a client certificate).
    CertificateWrongPurpose,
    /// The client certificate is revoked.
    CertificateRevoked,
    /// The client certificate is expired.
    CertificateExpired,
    /// The client certificate is not valid yet.
    CertificateNotYetValid,
    /// The CRL needed to check a certificate is expired or missing (fail closed).
    CrlUnavailable,
    /// The certificate does not carry a usable identity for this endpoint.
    BadIdentity,
    /// The MQTT ClientID is not the meter id of the certificate.
    ClientIdMismatch,
    /// A publish to a topic the meter may not publish to.
    TopicNotAuthorized,
    /// A subscription the meter may not make.
    SubscribeNotAuthorized,
    /// A malformed or protocol-violating MQTT packet.
    MalformedPacket,
    /// A packet larger than the maximum packet size.
    PacketTooLarge,
    /// The meter's message rate was exceeded.
    RateLimited,
    /// The connection limit was reached.
    ConnectionLimit,
    /// The source address is temporarily banned after repeated failures.
    SourceBanned,
    /// No CONNECT (or no traffic within the keep-alive) in time.
    Timeout,
    /// The envelope is not a well-formed COSE_Sign1 with the required headers.
    MalformedEnvelope,
    /// The envelope's algorithm, key id or meter id do not match the sender's certificate.
    KeyMismatch,
    /// The signature does not verify (tampered, wrong topic, wrong key).
    BadSignature,
    /// The counter was already used: a replay.
    Replay,
    /// The timestamp is older than the freshness window.
    Stale,
    /// The timestamp is further ahead than the freshness window.
    FromTheFuture,
    /// The payload is not a valid document, or disagrees with the signed header.
    InvalidDocument,
    /// A reading's register is lower than the meter's last one.
    RegisterWentBackwards,
    /// A downstream target (billing, MDM) refused a forwarded reading for good (a 4xx other
    /// than 408/429): the reading is a dead letter until an operator retries it.
    DownstreamRejected,
    /// A meter refused a command (its signed acknowledgement said `refused`); the detail names
    /// the meter's refusal code ([`crate::command::Refusal::code`]).
    CommandRefused,
    /// A firmware upload (at the head-end) or install (reported by the meter) was refused: bad
    /// manufacturer signature, wrong class, rollback, expired manifest, digest or size mismatch.
    FirmwareRefused,
    /// A data concentrator relayed an envelope for a meter that is not registered behind it
    /// (the topology in the store), or on a topic that is not a meter's readings or events.
    RelayNotAuthorized,
}

impl Reason {
    /// Every reason, for reports that list counts per reason.
    pub const ALL: [Reason; 30] = [
        Reason::TlsHandshakeFailed,
        Reason::CertificateMissing,
        Reason::CertificateUntrusted,
        Reason::CertificateWrongPurpose,
        Reason::CertificateRevoked,
        Reason::CertificateExpired,
        Reason::CertificateNotYetValid,
        Reason::CrlUnavailable,
        Reason::BadIdentity,
        Reason::ClientIdMismatch,
        Reason::TopicNotAuthorized,
        Reason::SubscribeNotAuthorized,
        Reason::MalformedPacket,
        Reason::PacketTooLarge,
        Reason::RateLimited,
        Reason::ConnectionLimit,
        Reason::SourceBanned,
        Reason::Timeout,
        Reason::MalformedEnvelope,
        Reason::KeyMismatch,
        Reason::BadSignature,
        Reason::Replay,
        Reason::Stale,
        Reason::FromTheFuture,
        Reason::InvalidDocument,
        Reason::RegisterWentBackwards,
        Reason::DownstreamRejected,
        Reason::CommandRefused,
        Reason::FirmwareRefused,
        Reason::RelayNotAuthorized,
    ];

    /// The stable snake_case code of this reason.
    pub fn code(self) -> &'static str {
        match self {
            Self::TlsHandshakeFailed => "tls_handshake_failed",
            Self::CertificateMissing => "certificate_missing",
            Self::CertificateUntrusted => "certificate_untrusted",
            Self::CertificateWrongPurpose => "certificate_wrong_purpose",
            Self::CertificateRevoked => "certificate_revoked",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateNotYetValid => "certificate_not_yet_valid",
            Self::CrlUnavailable => "crl_unavailable",
            Self::BadIdentity => "bad_identity",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::TopicNotAuthorized => "topic_not_authorized",
            Self::SubscribeNotAuthorized => "subscribe_not_authorized",
            Self::MalformedPacket => "malformed_packet",
            Self::PacketTooLarge => "packet_too_large",
            Self::RateLimited => "rate_limited",
            Self::ConnectionLimit => "connection_limit",
            Self::SourceBanned => "source_banned",
            Self::Timeout => "timeout",
            Self::MalformedEnvelope => "malformed_envelope",
            Self::KeyMismatch => "key_mismatch",
            Self::BadSignature => "bad_signature",
            Self::Replay => "replay",
            Self::Stale => "stale",
            Self::FromTheFuture => "from_the_future",
            Self::InvalidDocument => "invalid_document",
            Self::RegisterWentBackwards => "register_went_backwards",
            Self::DownstreamRejected => "downstream_rejected",
            Self::CommandRefused => "command_refused",
            Self::FirmwareRefused => "firmware_refused",
            Self::RelayNotAuthorized => "relay_not_authorized",
        }
    }

    /// The reason with code `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl From<&EnvelopeError> for Reason {
    fn from(e: &EnvelopeError) -> Self {
        match e {
            EnvelopeError::BadSignature => Self::BadSignature,
            EnvelopeError::AlgorithmMismatch { .. }
            | EnvelopeError::KeyIdMismatch { .. }
            | EnvelopeError::MeterMismatch { .. } => Self::KeyMismatch,
            EnvelopeError::Document(_)
            | EnvelopeError::DocumentMeterMismatch { .. }
            | EnvelopeError::DocumentTimeMismatch { .. } => Self::InvalidDocument,
            _ => Self::MalformedEnvelope,
        }
    }
}

impl From<&FreshnessError> for Reason {
    fn from(e: &FreshnessError) -> Self {
        match e {
            FreshnessError::Replay { .. } => Self::Replay,
            FreshnessError::Stale { .. } => Self::Stale,
            FreshnessError::Future { .. } => Self::FromTheFuture,
        }
    }
}

/// One refusal: what, when, who (if known) and from where.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityEvent {
    /// When it happened (the caller's `now`).
    pub at: OffsetDateTime,
    /// Why.
    pub reason: Reason,
    /// The meter concerned, when the sender was authenticated (or claimed one).
    pub meter_id: Option<MeterId>,
    /// The peer's address, when known.
    pub source: Option<String>,
    /// Human-readable detail (the typed error's message).
    pub detail: String,
}

impl SecurityEvent {
    /// A new event.
    pub fn new(at: OffsetDateTime, reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            at,
            reason,
            meter_id: None,
            source: None,
            detail: detail.into(),
        }
    }

    /// Sets the meter concerned.
    pub fn meter(mut self, meter: &MeterId) -> Self {
        self.meter_id = Some(meter.clone());
        self
    }

    /// Sets the peer address.
    pub fn source(mut self, source: impl fmt::Display) -> Self {
        self.source = Some(source.to_string());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut codes: Vec<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r.code()), Some(r));
        }
        assert_eq!(Reason::from_code("nope"), None);
    }

    #[test]
    fn certificate_codes_are_distinct_and_stable() {
        // Operators and alarms key on these strings: changing one is a breaking change.
        let codes = [
            (Reason::TlsHandshakeFailed, "tls_handshake_failed"),
            (Reason::CertificateMissing, "certificate_missing"),
            (Reason::CertificateUntrusted, "certificate_untrusted"),
            (Reason::CertificateWrongPurpose, "certificate_wrong_purpose"),
            (Reason::CertificateRevoked, "certificate_revoked"),
            (Reason::CertificateExpired, "certificate_expired"),
            (Reason::CertificateNotYetValid, "certificate_not_yet_valid"),
            (Reason::CrlUnavailable, "crl_unavailable"),
        ];
        for (reason, code) in codes {
            assert_eq!(reason.code(), code);
            assert!(
                Reason::ALL.contains(&reason),
                "{code} missing from Reason::ALL"
            );
        }
    }

    #[test]
    fn command_and_firmware_codes_are_stable() {
        assert_eq!(Reason::CommandRefused.code(), "command_refused");
        assert_eq!(Reason::FirmwareRefused.code(), "firmware_refused");
        assert!(Reason::ALL.contains(&Reason::CommandRefused));
        assert!(Reason::ALL.contains(&Reason::FirmwareRefused));
    }

    #[test]
    fn envelope_and_freshness_errors_map_to_reasons() {
        assert_eq!(
            Reason::from(&EnvelopeError::BadSignature),
            Reason::BadSignature
        );
        assert_eq!(
            Reason::from(&EnvelopeError::MissingAlgorithm),
            Reason::MalformedEnvelope
        );
        assert_eq!(
            Reason::from(&FreshnessError::Replay {
                counter: 1,
                last: 1
            }),
            Reason::Replay
        );
    }
}
