//! The peer's certificate after the TLS handshake: which device it is, a meter or a
//! concentrator ([`PeerCert::from_der`] via `gridward_pki::identity_of`), why a handshake failed ([`handshake_reason`], one reason per
//! certificate-path refusal), and which
//! certificates are revoked ([`Revocations`]).

use std::collections::HashSet;
use std::io;
use std::sync::Arc;

use gridward_core::MeterId;
use gridward_core::security::Reason;
use gridward_pki::{Identity, IdentityError, identity_of};
use rustls_pki_types::CertificateRevocationListDer;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::handler::DeviceKind;

/// Why a verified client certificate cannot be used on the device endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The client presented no certificate (cannot happen with the Gridward server profile).
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate does not prove an identity.
    #[error("certificate does not prove an identity: {0}")]
    Identity(#[from] IdentityError),
    /// The certificate proves an identity that is neither a meter nor a concentrator
    /// (a client or server certificate).
    #[error("{0} may not connect to the device endpoint")]
    NotADevice(String),
}

/// What the endpoint keeps of a device's (meter's or concentrator's) certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The device id (URI SAN and CN): a meter's or a concentrator's, see `kind`.
    pub meter: MeterId,
    /// Meter or concentrator.
    pub kind: DeviceKind,
    /// DER SubjectPublicKeyInfo.
    pub spki: Arc<[u8]>,
    /// Serial, lowercase hex without leading zero bytes (the `gridward-pki` form).
    pub serial: String,
    /// DER of the issuer name (to match CRL entries).
    pub issuer: Vec<u8>,
}

impl PeerCert {
    /// Reads the end-entity certificate `der` of a verified chain.
    ///
    /// # Errors
    ///
    /// [`PeerError::Identity`] from `identity_of`, [`PeerError::NotADevice`] for client and
    /// server certificates.
    pub fn from_der(der: &[u8]) -> Result<Self, PeerError> {
        let (meter, kind) = match identity_of(der)? {
            Identity::Meter(id) => (id, DeviceKind::Meter),
            Identity::Concentrator(id) => (id, DeviceKind::Concentrator),
            other => return Err(PeerError::NotADevice(other.to_string())),
        };
        // identity_of parsed the same bytes successfully, so this parse cannot fail; map anyway.
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| PeerError::Identity(IdentityError::Malformed(e.to_string())))?;
        Ok(Self {
            meter,
            kind,
            spki: Arc::from(cert.public_key().raw),
            serial: serial_hex(cert.raw_serial()),
            issuer: cert.issuer().as_raw().to_vec(),
        })
    }
}

/// Lowercase hex of a serial without leading zero bytes ("00" for zero), as `gridward-pki` writes it.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    match raw.get(start..) {
        Some(trimmed) if !trimmed.is_empty() => hex::encode(trimmed),
        _ => "00".to_owned(),
    }
}

/// The security-event reason for a failed server-side TLS handshake.
///
/// Each certificate-path refusal has its own reason (see [`tls_reason`]); anything that is not
/// a rustls error (garbage instead of TLS, EOF, a reset) → [`Reason::TlsHandshakeFailed`].
pub fn handshake_reason(err: &io::Error) -> Reason {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(e) => tls_reason(e),
        None => Reason::TlsHandshakeFailed,
    }
}

/// [`handshake_reason`] for a rustls error.
///
/// | rustls error | reason |
/// | --- | --- |
/// | `NoCertificatesPresented` | [`Reason::CertificateMissing`] |
/// | `UnknownIssuer`, `BadSignature`, unsupported signature algorithms | [`Reason::CertificateUntrusted`] |
/// | `InvalidPurpose` (EKU) | [`Reason::CertificateWrongPurpose`] |
/// | `Revoked` | [`Reason::CertificateRevoked`] |
/// | `Expired` | [`Reason::CertificateExpired`] |
/// | `NotValidYet` | [`Reason::CertificateNotYetValid`] |
/// | `ExpiredRevocationList`, `UnknownRevocationStatus` | [`Reason::CrlUnavailable`] |
/// | anything else (protocol, suite, encoding, ...) | [`Reason::TlsHandshakeFailed`] |
///
/// The `...Context` forms of these errors map like their plain forms.
pub fn tls_reason(err: &rustls::Error) -> Reason {
    gridward_pki::tls::tls_error_reason(err)
}

/// Errors reading CRLs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    /// A CRL does not parse.
    #[error("CRL {index} does not parse: {reason}")]
    BadCrl {
        /// Position in the list, from 0.
        index: usize,
        /// What the parser reported.
        reason: String,
    },
}

/// A set of revoked certificates: (issuer, serial) pairs from CRLs, and bare serials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    by_issuer: HashSet<(Vec<u8>, String)>,
    serials: HashSet<String>,
}

impl Revocations {
    /// Nothing revoked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every entry of `crls` (matched on issuer name and serial).
    ///
    /// # Errors
    ///
    /// [`RevocationError::BadCrl`].
    pub fn from_crls(crls: &[CertificateRevocationListDer<'_>]) -> Result<Self, RevocationError> {
        let mut r = Self::new();
        for (index, der) in crls.iter().enumerate() {
            let (_, crl) =
                CertificateRevocationList::from_der(der).map_err(|e| RevocationError::BadCrl {
                    index,
                    reason: e.to_string(),
                })?;
            let issuer = crl.issuer().as_raw().to_vec();
            for entry in crl.iter_revoked_certificates() {
                r.by_issuer
                    .insert((issuer.clone(), serial_hex(entry.raw_serial())));
            }
        }
        Ok(r)
    }

    /// Serials revoked whatever their issuer (any case, with or without leading zeros;
    /// colons and a `0x` prefix are ignored).
    pub fn from_serials<S: AsRef<str>>(serials: impl IntoIterator<Item = S>) -> Self {
        let mut r = Self::new();
        for s in serials {
            let cleaned: String = s
                .as_ref()
                .trim()
                .trim_start_matches("0x")
                .chars()
                .filter(|c| *c != ':')
                .collect::<String>()
                .to_ascii_lowercase();
            let cleaned = if cleaned.len() % 2 == 1 {
                format!("0{cleaned}")
            } else {
                cleaned
            };
            match hex::decode(&cleaned) {
                Ok(bytes) => r.serials.insert(serial_hex(&bytes)),
                Err(_) => r.serials.insert(cleaned),
            };
        }
        r
    }

    /// Whether `cert` is revoked.
    pub fn contains(&self, cert: &PeerCert) -> bool {
        self.serials.contains(&cert.serial)
            || self
                .by_issuer
                .contains(&(cert.issuer.clone(), cert.serial.clone()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_issuer.len() + self.serials.len()
    }

    /// Whether nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rustls::CertificateError;

    use super::*;

    #[test]
    fn reasons_of_handshake_errors() {
        use rustls::pki_types::UnixTime;
        use rustls::{Error, ExtendedKeyPurpose};
        let t = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_700_000_000));
        let cert = |c| Error::InvalidCertificate(c);
        let cases = [
            (Error::NoCertificatesPresented, Reason::CertificateMissing),
            (
                cert(CertificateError::UnknownIssuer),
                Reason::CertificateUntrusted,
            ),
            (
                cert(CertificateError::BadSignature),
                Reason::CertificateUntrusted,
            ),
            (
                cert(CertificateError::UnsupportedSignatureAlgorithmContext {
                    signature_algorithm_id: vec![1],
                    supported_algorithms: vec![],
                }),
                Reason::CertificateUntrusted,
            ),
            (
                cert(CertificateError::InvalidPurpose),
                Reason::CertificateWrongPurpose,
            ),
            (
                cert(CertificateError::InvalidPurposeContext {
                    required: ExtendedKeyPurpose::ClientAuth,
                    presented: vec![ExtendedKeyPurpose::ServerAuth],
                }),
                Reason::CertificateWrongPurpose,
            ),
            (cert(CertificateError::Revoked), Reason::CertificateRevoked),
            (cert(CertificateError::Expired), Reason::CertificateExpired),
            (
                cert(CertificateError::ExpiredContext {
                    time: t,
                    not_after: t,
                }),
                Reason::CertificateExpired,
            ),
            (
                cert(CertificateError::NotValidYet),
                Reason::CertificateNotYetValid,
            ),
            (
                cert(CertificateError::NotValidYetContext {
                    time: t,
                    not_before: t,
                }),
                Reason::CertificateNotYetValid,
            ),
            (
                cert(CertificateError::ExpiredRevocationList),
                Reason::CrlUnavailable,
            ),
            (
                cert(CertificateError::ExpiredRevocationListContext {
                    time: t,
                    next_update: t,
                }),
                Reason::CrlUnavailable,
            ),
            (
                cert(CertificateError::UnknownRevocationStatus),
                Reason::CrlUnavailable,
            ),
            (
                cert(CertificateError::BadEncoding),
                Reason::TlsHandshakeFailed,
            ),
            (
                Error::PeerIncompatible(rustls::PeerIncompatible::NoCipherSuitesInCommon),
                Reason::TlsHandshakeFailed,
            ),
        ];
        for (err, reason) in cases {
            let wrapped = io::Error::new(io::ErrorKind::InvalidData, err.clone());
            assert_eq!(handshake_reason(&wrapped), reason, "{err:?}");
        }
        assert_eq!(
            handshake_reason(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            Reason::TlsHandshakeFailed
        );
    }

    #[test]
    fn serial_forms() {
        assert_eq!(serial_hex(&[0, 0, 0x0a, 0xff]), "0aff");
        assert_eq!(serial_hex(&[0, 0]), "00");
        assert_eq!(serial_hex(&[]), "00");
        let r = Revocations::from_serials(["0A:FF", "0x0001"]);
        let cert = |serial: &str| PeerCert {
            meter: MeterId::new("M").unwrap(),
            kind: DeviceKind::Meter,
            spki: Arc::from(&[][..]),
            serial: serial.into(),
            issuer: vec![1],
        };
        assert!(r.contains(&cert("0aff")));
        assert!(r.contains(&cert("01")));
        assert!(!r.contains(&cert("02")));
        assert_eq!(r.len(), 2);
    }
}
