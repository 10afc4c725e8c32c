//! rustls configurations for every Gridward TLS link: one fixed, mutually authenticated profile.
//!
//! # The profile
//!
//! - Protocol versions: TLS 1.3 (preferred) and TLS 1.2.
//! - Cipher suites ([`provider`]): AES-GCM only, ECDHE only.
//!   TLS 1.3: `TLS13_AES_256_GCM_SHA384`, `TLS13_AES_128_GCM_SHA256`;
//!   TLS 1.2: `TLS_ECDHE_{ECDSA,RSA}_WITH_AES_{256,128}_GCM_SHA{384,256}`.
//!   No ChaCha20, no CBC, no static RSA key exchange.
//! - Key exchange groups: the hybrid `X25519MLKEM768` (preferred), then X25519, secp256r1, secp384r1.
//! - TLS 1.2 requires the extended master secret (RFC 7627).
//! - Both sides authenticate: the server requires a client certificate, the client presents one.
//!   The peer's chain is verified against [`TlsMaterial::roots`] only (the system trust store is never used),
//!   every certificate of the chain below the trust anchor is checked against [`TlsMaterial::crls`],
//!   a certificate whose revocation status is unknown (no CRL from its issuer) is rejected,
//!   and an expired CRL (`nextUpdate` in the past) makes the handshake fail: revocation fails closed.
//! - No 0-RTT (early data), no session resumption (neither tickets nor session ids):
//!   every connection runs a full handshake, so a certificate revoked after an earlier connection
//!   is refused on the next one, as soon as the server runs with the new CRL.
//! - rustls itself supports neither renegotiation nor TLS compression, so both are off by construction.
//!
//! Certificate verification cannot be turned off through this module.
//!
//! # Left to callers
//!
//! - ALPN: [`server_config`] and [`client_config`] negotiate no ALPN;
//!   pass protocols with [`TlsOptions::with_alpn`] to [`server_config_with`] / [`client_config_with`].
//! - Bounding connection lifetime (48 h by default in the design) and reloading CRLs:
//!   a configuration is immutable, so a reload builds a new one with [`server_config`] and
//!   uses it for the connections that follow.
//! - The verification clock: rustls reads the system clock at each handshake
//!   unless [`TlsOptions::with_fixed_time`] pins it (deterministic tests and replays).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gridward_core::security::Reason;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::time_provider::TimeProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use time::OffsetDateTime;

/// Protocol versions of the profile, preferred first.
static VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Errors building TLS material and configurations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file is syntactically broken (bad armour or base64).
    #[error("{}: malformed PEM: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser reported.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file holds no item of the expected kind.
    #[error("{}: no {expected} found", path.display())]
    NothingFound {
        /// The file.
        path: PathBuf,
        /// What was looked for, e.g. "CERTIFICATE block".
        expected: &'static str,
    },
    /// A key file holds more than one private key, so which one to use is ambiguous.
    #[error("{}: more than one private key; expected exactly one", path.display())]
    SeveralKeys {
        /// The file.
        path: PathBuf,
    },
    /// A CERTIFICATE block does not hold a parseable X.509 certificate.
    #[error("{}: certificate {index} is not a valid X.509 certificate: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Position of the certificate in the file, from 0.
        index: usize,
        /// What the parser reported.
        reason: String,
    },
    /// An X509 CRL block does not hold a parseable certificate revocation list.
    #[error("{}: CRL {index} is not a valid X.509 CRL: {reason}", path.display())]
    BadCrl {
        /// The file.
        path: PathBuf,
        /// Position of the CRL in the file, from 0.
        index: usize,
        /// What the parser reported.
        reason: String,
    },
    /// The material has no own certificate chain.
    #[error("no certificate chain: our own end-entity certificate is missing")]
    EmptyChain,
    /// The material has no trust anchors; no peer could ever be verified.
    #[error("no trusted root certificates")]
    NoRoots,
    /// The material has no CRLs; revocation checking is mandatory (fail closed).
    #[error("no certificate revocation lists: revocation checking is mandatory")]
    NoCrls,
    /// A root certificate cannot serve as a trust anchor.
    #[error("root certificate {index} is not a usable trust anchor: {source}")]
    BadRoot {
        /// Position in [`TlsMaterial::roots`], from 0.
        index: usize,
        /// What rustls reported.
        #[source]
        source: rustls::Error,
    },
    /// The peer verifier could not be built, e.g. because a CRL does not parse.
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The private key does not belong to the first certificate of the chain.
    #[error("the private key does not match the end-entity certificate")]
    KeyMismatch,
    /// The private key is not usable (unsupported algorithm or bad encoding),
    /// or the end-entity certificate cannot be parsed.
    #[error("unusable certificate or private key: {0}")]
    Key(#[source] rustls::Error),
    /// rustls refused the configuration (should not happen with this module's fixed profile).
    #[error("rustls refused the configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Our own chain and key, the trust anchors and the CRLs: everything a TLS endpoint needs.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Our certificate chain, end-entity certificate first, then the issuing CA(s) (the root may be omitted).
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key of the end-entity certificate.
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors for verifying the peer: the only certificates trusted.
    pub roots: Vec<CertificateDer<'static>>,
    /// CRLs of every CA below the trust anchor (and of the root itself for its issuing CAs).
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            crls: self.crls.clone(),
        }
    }
}

impl TlsMaterial {
    /// Loads material from PEM files.
    ///
    /// - `chain`: one or more `CERTIFICATE` blocks, end-entity first.
    /// - `key`: exactly one unencrypted private key (`PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`).
    /// - `roots`: files of `CERTIFICATE` blocks; each file must hold at least one.
    /// - `crls`: files of `X509 CRL` blocks; each file must hold at least one.
    ///
    /// Certificates and CRLs are parsed here so that a broken file is reported by name.
    /// Empty `roots` or `crls` lists are accepted here and refused by [`server_config`] / [`client_config`].
    ///
    /// # Errors
    ///
    /// [`TlsError::Read`], [`TlsError::Pem`], [`TlsError::NothingFound`], [`TlsError::SeveralKeys`],
    /// [`TlsError::BadCertificate`], [`TlsError::BadCrl`], each naming the file.
    pub fn from_pem_files(
        chain: &Path,
        key: &Path,
        roots: &[PathBuf],
        crls: &[PathBuf],
    ) -> Result<Self, TlsError> {
        let chain = read_certs(chain)?;
        let key = read_key(key)?;
        let mut root_certs = Vec::new();
        for path in roots {
            root_certs.extend(read_certs(path)?);
        }
        let mut crl_list = Vec::new();
        for path in crls {
            crl_list.extend(read_crls(path)?);
        }
        Ok(Self {
            chain,
            key,
            roots: root_certs,
            crls: crl_list,
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_items<T: PemObject>(
    path: &Path,
    bytes: &[u8],
    expected: &'static str,
) -> Result<Vec<T>, TlsError> {
    let items = T::pem_slice_iter(bytes)
        .collect::<Result<Vec<T>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if items.is_empty() {
        return Err(TlsError::NothingFound {
            path: path.to_owned(),
            expected,
        });
    }
    Ok(items)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    let certs: Vec<CertificateDer<'static>> = pem_items(path, &bytes, "CERTIFICATE block")?;
    for (index, cert) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read_file(path)?;
    let crls: Vec<CertificateRevocationListDer<'static>> =
        pem_items(path, &bytes, "X509 CRL block")?;
    for (index, crl) in crls.iter().enumerate() {
        x509_parser::parse_x509_crl(crl).map_err(|e| TlsError::BadCrl {
            path: path.to_owned(),
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(crls)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    let mut keys: Vec<PrivateKeyDer<'static>> = pem_items(
        path,
        &bytes,
        "unencrypted private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)",
    )?;
    match (keys.pop(), keys.is_empty()) {
        (Some(key), true) => Ok(key),
        _ => Err(TlsError::SeveralKeys {
            path: path.to_owned(),
        }),
    }
}

/// The crypto provider of the profile: aws-lc-rs restricted to ECDHE + AES-GCM suites
/// and to the X25519MLKEM768, X25519, secp256r1 and secp384r1 groups.
///
/// Exposed so that other TLS users (e.g. an HTTP client) can share the exact same algorithms.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    provider.kx_groups = vec![
        kx_group::X25519MLKEM768,
        kx_group::X25519,
        kx_group::SECP256R1,
        kx_group::SECP384R1,
    ];
    Arc::new(provider)
}

/// Options that do not weaken the profile: ALPN, the verification clock, and (the HTTPS API
/// only) whether a client certificate is optional.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TlsOptions {
    /// ALPN protocol names, preferred first; empty means no ALPN.
    pub alpn_protocols: Vec<Vec<u8>>,
    /// The clock for certificate and CRL validity checks; `None` means the system clock at each handshake.
    pub clock: Option<Arc<dyn TimeProvider>>,
    /// Server only: accept clients that present no certificate (people with a session on the
    /// HTTPS API). A certificate that *is* presented is verified exactly as when one is
    /// required: chain, validity, CRLs of the whole chain, fail closed.
    pub client_certificate_optional: bool,
}

impl TlsOptions {
    /// No ALPN, system clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers (client) or accepts (server) these ALPN protocols, preferred first.
    /// A server configured with ALPN refuses clients that offer none of them.
    pub fn with_alpn<P: Into<Vec<u8>>>(mut self, protocols: impl IntoIterator<Item = P>) -> Self {
        self.alpn_protocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Server only: lets clients without a certificate complete the handshake; the application
    /// must then authenticate them otherwise (the API's sessions). Presented certificates are
    /// still verified in full. Never used for the MQTT endpoint or the sink.
    pub fn with_optional_client_certificate(mut self) -> Self {
        self.client_certificate_optional = true;
        self
    }

    /// Verifies certificates and CRLs as of `now` instead of the system clock.
    ///
    /// The clock does not advance: meant for deterministic tests and for checking past or future dates,
    /// never for a long-running service (CRL expiry would never be noticed).
    /// A time before 1970 makes every handshake fail.
    pub fn with_fixed_time(mut self, now: OffsetDateTime) -> Self {
        self.clock = Some(Arc::new(FixedClock(now)));
        self
    }
}

/// A clock stopped at one instant.
struct FixedClock(OffsetDateTime);

impl fmt::Debug for FixedClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FixedClock").field(&self.0).finish()
    }
}

impl TimeProvider for FixedClock {
    fn current_time(&self) -> Option<UnixTime> {
        let secs = u64::try_from(self.0.unix_timestamp()).ok()?;
        Some(UnixTime::since_unix_epoch(Duration::from_secs(secs)))
    }
}

/// Server configuration of the profile with no ALPN and the system clock.
///
/// The server presents `m.chain` / `m.key`, requires a client certificate and verifies it
/// against `m.roots` and `m.crls` (see the module documentation).
///
/// # Errors
///
/// See [`server_config_with`].
pub fn server_config(m: &TlsMaterial) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(m, &TlsOptions::default())
}

/// Server configuration of the profile with ALPN and clock from `opts`.
///
/// # Errors
///
/// [`TlsError::EmptyChain`], [`TlsError::NoRoots`], [`TlsError::NoCrls`], [`TlsError::BadRoot`],
/// [`TlsError::Verifier`] (e.g. a CRL that does not parse), [`TlsError::KeyMismatch`], [`TlsError::Key`],
/// [`TlsError::Config`].
pub fn server_config_with(
    m: &TlsMaterial,
    opts: &TlsOptions,
) -> Result<Arc<ServerConfig>, TlsError> {
    build_server(m, opts, provider(), VERSIONS).map(Arc::new)
}

/// Client configuration of the profile with no ALPN and the system clock.
///
/// The client presents `m.chain` / `m.key` as its certificate and verifies the server
/// against `m.roots` and `m.crls`; the server name is checked against the name given to
/// `rustls::ClientConnection::new`.
///
/// # Errors
///
/// See [`client_config_with`].
pub fn client_config(m: &TlsMaterial) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(m, &TlsOptions::default())
}

/// Client configuration of the profile with ALPN and clock from `opts`.
///
/// # Errors
///
/// The same as [`server_config_with`].
pub fn client_config_with(
    m: &TlsMaterial,
    opts: &TlsOptions,
) -> Result<Arc<ClientConfig>, TlsError> {
    build_client(m, opts, provider(), VERSIONS).map(Arc::new)
}

/// Why a TLS handshake failed, as the reason code of its security event: the same mapping for
/// every Gridward TLS endpoint (the MQTT endpoint, the HTTPS API).
///
/// | rustls error | reason |
/// |---|---|
/// | `NoCertificatesPresented` | [`Reason::CertificateMissing`] |
/// | `UnknownIssuer`, `BadSignature`, unsupported signature algorithms | [`Reason::CertificateUntrusted`] |
/// | `InvalidPurpose` | [`Reason::CertificateWrongPurpose`] |
/// | `Revoked` | [`Reason::CertificateRevoked`] |
/// | `Expired` | [`Reason::CertificateExpired`] |
/// | `NotValidYet` | [`Reason::CertificateNotYetValid`] |
/// | `ExpiredRevocationList`, `UnknownRevocationStatus` | [`Reason::CrlUnavailable`] |
/// | anything else (protocol, suite, encoding, ...) | [`Reason::TlsHandshakeFailed`] |
///
/// The `...Context` forms of these errors map like their plain forms.
pub fn tls_error_reason(err: &rustls::Error) -> Reason {
    match err {
        rustls::Error::NoCertificatesPresented => Reason::CertificateMissing,
        rustls::Error::InvalidCertificate(c) => certificate_reason(c),
        _ => Reason::TlsHandshakeFailed,
    }
}

/// [`tls_error_reason`] for the error of a tokio-rustls accept or connect: anything that is not
/// a rustls error (garbage instead of TLS, EOF, a reset) → [`Reason::TlsHandshakeFailed`].
pub fn handshake_error_reason(err: &std::io::Error) -> Reason {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(e) => tls_error_reason(e),
        None => Reason::TlsHandshakeFailed,
    }
}

fn certificate_reason(err: &rustls::CertificateError) -> Reason {
    use rustls::CertificateError;
    #[allow(deprecated)] // `UnsupportedSignatureAlgorithm`: still produced by rustls 0.23.
    match err {
        CertificateError::UnknownIssuer
        | CertificateError::BadSignature
        | CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            Reason::CertificateUntrusted
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            Reason::CertificateWrongPurpose
        }
        CertificateError::Revoked => Reason::CertificateRevoked,
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            Reason::CertificateExpired
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            Reason::CertificateNotYetValid
        }
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. }
        | CertificateError::UnknownRevocationStatus => Reason::CrlUnavailable,
        _ => Reason::TlsHandshakeFailed,
    }
}

/// Checks the parts shared by both sides and returns the trust anchors.
fn checked_roots(m: &TlsMaterial) -> Result<Arc<RootCertStore>, TlsError> {
    if m.chain.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    if m.roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    if m.crls.is_empty() {
        return Err(TlsError::NoCrls);
    }
    let mut store = RootCertStore::empty();
    for (index, root) in m.roots.iter().enumerate() {
        store
            .add(root.clone())
            .map_err(|source| TlsError::BadRoot { index, source })?;
    }
    Ok(Arc::new(store))
}

fn key_error(e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch
        }
        other => TlsError::Key(other),
    }
}

fn clock(opts: &TlsOptions) -> Arc<dyn TimeProvider> {
    match &opts.clock {
        Some(clock) => Arc::clone(clock),
        None => Arc::new(rustls::time_provider::DefaultTimeProvider),
    }
}

/// Builds a server configuration; `provider` and `versions` are parameters only so that
/// tests can build deliberately weaker peers.
fn build_server(
    m: &TlsMaterial,
    opts: &TlsOptions,
    provider: Arc<CryptoProvider>,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<ServerConfig, TlsError> {
    let roots = checked_roots(m)?;
    // Defaults kept on purpose: the full chain is checked (not only the end entity),
    // an unknown revocation status is an error, anonymous clients are refused unless the
    // caller asked for an optional client certificate (the HTTPS API).
    let builder = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .with_crls(m.crls.iter().cloned())
        .enforce_revocation_expiration();
    let builder = if opts.client_certificate_optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let verifier = builder.build().map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_details(provider, clock(opts))
        .with_protocol_versions(versions)
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(key_error)?;
    config.ignore_client_order = true;
    config.max_early_data_size = 0;
    config.send_half_rtt_data = false;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.require_ems = true;
    config.alpn_protocols = opts.alpn_protocols.clone();
    Ok(config)
}

/// Builds a client configuration; see [`build_server`] for why `provider` and `versions` are parameters.
fn build_client(
    m: &TlsMaterial,
    opts: &TlsOptions,
    provider: Arc<CryptoProvider>,
    versions: &[&'static SupportedProtocolVersion],
) -> Result<ClientConfig, TlsError> {
    let roots = checked_roots(m)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
        .with_crls(m.crls.iter().cloned())
        .enforce_revocation_expiration()
        .build()
        .map_err(TlsError::Verifier)?;
    let mut config = ClientConfig::builder_with_details(provider, clock(opts))
        .with_protocol_versions(versions)
        .map_err(TlsError::Config)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
        .map_err(key_error)?;
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    config.require_ems = true;
    config.alpn_protocols = opts.alpn_protocols.clone();
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};

    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
        DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        PKCS_ECDSA_P256_SHA256, RevocationReason, RevokedCertParams, SerialNumber,
    };
    use rustls::{
        CertificateError, ClientConnection, Connection, Error, HandshakeKind, PeerIncompatible,
        ProtocolVersion, ServerConnection,
    };
    use rustls_pki_types::ServerName;
    use time::macros::datetime;

    use super::*;

    /// CRLs of the test PKI are issued at T0 and expire at CRL_NEXT; handshakes happen at NOW.
    const T0: OffsetDateTime = datetime!(2025-01-01 00:00 UTC);
    const NOW: OffsetDateTime = datetime!(2025-01-15 00:00 UTC);
    const CRL_NEXT: OffsetDateTime = datetime!(2025-02-01 00:00 UTC);
    const AFTER_CRL: OffsetDateTime = datetime!(2025-02-02 00:00 UTC);

    const ROOT_SERIAL: u64 = 1;
    const ISSUING_SERIAL: u64 = 2;
    const SERVER_SERIAL: u64 = 100;
    const CLIENT_SERIAL: u64 = 200;

    struct Ca {
        cert: CertificateDer<'static>,
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    struct Leaf {
        cert: CertificateDer<'static>,
        pem: String,
        key: KeyPair,
    }

    impl Leaf {
        fn key(&self) -> PrivateKeyDer<'static> {
            PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
        }
    }

    fn name(cn: &str) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Gridward test");
        dn.push(DnType::CommonName, cn);
        dn
    }

    fn ca(cn: &str, serial: u64, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = name(cn);
        p.serial_number = Some(SerialNumber::from(serial));
        p.is_ca = IsCa::Ca(match parent {
            None => BasicConstraints::Unconstrained,
            Some(_) => BasicConstraints::Constrained(0),
        });
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.not_before = datetime!(2024-01-01 00:00 UTC);
        p.not_after = datetime!(2099-01-01 00:00 UTC);
        let cert = match parent {
            None => p.self_signed(&key).unwrap(),
            Some(parent) => p.signed_by(&key, &parent.issuer).unwrap(),
        };
        Ca {
            cert: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    fn leaf(
        ca: &Ca,
        cn: &str,
        serial: u64,
        eku: ExtendedKeyUsagePurpose,
        not_after: OffsetDateTime,
    ) -> Leaf {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.distinguished_name = name(cn);
        p.serial_number = Some(SerialNumber::from(serial));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        p.not_before = datetime!(2024-06-01 00:00 UTC);
        p.not_after = not_after;
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        Leaf {
            cert: cert.der().clone(),
            pem: cert.pem(),
            key,
        }
    }

    fn crl(
        ca: &Ca,
        revoked: &[u64],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> rcgen::CertificateRevocationList {
        CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(1),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: this_update,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&ca.issuer)
        .unwrap()
    }

    /// Root CA -> issuing CA -> server (serverAuth, DNS localhost) and client (clientAuth) leaves.
    struct Pki {
        root: Ca,
        issuing: Ca,
        server: Leaf,
        client: Leaf,
    }

    impl Pki {
        fn new(tag: &str) -> Self {
            let root = ca(&format!("{tag} root CA"), ROOT_SERIAL, None);
            let issuing = ca(&format!("{tag} issuing CA"), ISSUING_SERIAL, Some(&root));
            let until = datetime!(2098-01-01 00:00 UTC);
            let server = leaf(
                &issuing,
                "localhost",
                SERVER_SERIAL,
                ExtendedKeyUsagePurpose::ServerAuth,
                until,
            );
            let client = leaf(
                &issuing,
                "client",
                CLIENT_SERIAL,
                ExtendedKeyUsagePurpose::ClientAuth,
                until,
            );
            Self {
                root,
                issuing,
                server,
                client,
            }
        }

        /// Fresh CRLs of both CAs, revoking nothing.
        fn crls(&self) -> Vec<CertificateRevocationListDer<'static>> {
            self.crls_revoking(&[], &[], T0, CRL_NEXT)
        }

        fn crls_revoking(
            &self,
            by_root: &[u64],
            by_issuing: &[u64],
            this_update: OffsetDateTime,
            next_update: OffsetDateTime,
        ) -> Vec<CertificateRevocationListDer<'static>> {
            vec![
                crl(&self.root, by_root, this_update, next_update)
                    .der()
                    .clone(),
                crl(&self.issuing, by_issuing, this_update, next_update)
                    .der()
                    .clone(),
            ]
        }

        fn material(&self, leaf: &Leaf) -> TlsMaterial {
            TlsMaterial {
                chain: vec![leaf.cert.clone(), self.issuing.cert.clone()],
                key: leaf.key(),
                roots: vec![self.root.cert.clone()],
                crls: self.crls(),
            }
        }

        fn server_material(&self) -> TlsMaterial {
            self.material(&self.server)
        }

        fn client_material(&self) -> TlsMaterial {
            self.material(&self.client)
        }
    }

    fn at(now: OffsetDateTime) -> TlsOptions {
        TlsOptions::new().with_fixed_time(now)
    }

    fn server_at(m: &TlsMaterial, now: OffsetDateTime) -> Arc<ServerConfig> {
        server_config_with(m, &at(now)).unwrap()
    }

    fn client_at(m: &TlsMaterial, now: OffsetDateTime) -> Arc<ClientConfig> {
        client_config_with(m, &at(now)).unwrap()
    }

    #[derive(Debug, PartialEq)]
    enum Side {
        Client,
        Server,
    }

    /// Moves every pending TLS record from `from` to `to`.
    fn transfer(from: &mut Connection, to: &mut Connection) {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
        }
    }

    /// Runs a handshake in memory, then sends "ping" from client to server.
    /// Returns the first error and the side that raised it.
    fn connect(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<(Connection, Connection), (Side, Error)> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = Connection::Client(ClientConnection::new(client, name).unwrap());
        let mut s = Connection::Server(ServerConnection::new(server).unwrap());
        for _ in 0..10 {
            transfer(&mut c, &mut s);
            s.process_new_packets().map_err(|e| (Side::Server, e))?;
            transfer(&mut s, &mut c);
            c.process_new_packets().map_err(|e| (Side::Client, e))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                c.writer().write_all(b"ping").unwrap();
                transfer(&mut c, &mut s);
                s.process_new_packets().map_err(|e| (Side::Server, e))?;
                let mut got = [0u8; 4];
                s.reader().read_exact(&mut got).unwrap();
                assert_eq!(&got, b"ping");
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish");
    }

    fn assert_in_profile(conn: &Connection) {
        let p = provider();
        let suite = conn.negotiated_cipher_suite().unwrap();
        assert!(p.cipher_suites.contains(&suite), "{suite:?}");
        let group = conn.negotiated_key_exchange_group().unwrap().name();
        assert!(p.kx_groups.iter().any(|g| g.name() == group), "{group:?}");
        assert_eq!(conn.handshake_kind(), Some(HandshakeKind::Full));
    }

    fn expect_cert_error(
        result: Result<(Connection, Connection), (Side, Error)>,
        side: Side,
    ) -> CertificateError {
        match result {
            Err((s, Error::InvalidCertificate(e))) if s == side => e,
            Err(other) => {
                panic!("expected a certificate error on the {side:?} side, got {other:?}")
            }
            Ok(_) => panic!("handshake unexpectedly succeeded"),
        }
    }

    #[test]
    fn profile_has_only_ecdhe_aes_gcm_suites_and_the_four_groups() {
        let p = provider();
        let names: Vec<String> = p
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(
            names,
            [
                "TLS13_AES_256_GCM_SHA384",
                "TLS13_AES_128_GCM_SHA256",
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            ]
        );
        let groups: Vec<String> = p
            .kx_groups
            .iter()
            .map(|g| format!("{:?}", g.name()))
            .collect();
        assert_eq!(
            groups,
            ["X25519MLKEM768", "X25519", "secp256r1", "secp384r1"]
        );
    }

    #[test]
    fn mutual_tls13_handshake_succeeds() {
        let pki = Pki::new("main");
        let (c, s) = connect(
            client_at(&pki.client_material(), NOW),
            server_at(&pki.server_material(), NOW),
        )
        .unwrap();
        assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert_in_profile(&c);
        assert_in_profile(&s);
        // The server saw the client's chain, the client the server's.
        assert_eq!(s.peer_certificates().unwrap()[0], pki.client.cert);
        assert_eq!(c.peer_certificates().unwrap()[0], pki.server.cert);
        assert_eq!(c.alpn_protocol(), None);
    }

    #[test]
    fn mutual_tls12_handshake_succeeds_with_ecdhe_aes_gcm() {
        let pki = Pki::new("main");
        let client = build_client(
            &pki.client_material(),
            &at(NOW),
            provider(),
            &[&rustls::version::TLS12],
        )
        .unwrap();
        let (c, s) = connect(Arc::new(client), server_at(&pki.server_material(), NOW)).unwrap();
        assert_eq!(c.protocol_version(), Some(ProtocolVersion::TLSv1_2));
        assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_2));
        assert_in_profile(&c);
        assert_eq!(
            format!("{:?}", c.negotiated_cipher_suite().unwrap().suite()),
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
        );
        assert_eq!(s.peer_certificates().unwrap()[0], pki.client.cert);
    }

    #[test]
    fn system_clock_configs_accept_fresh_crls() {
        let pki = Pki::new("main");
        let now = OffsetDateTime::now_utc();
        let crls = pki.crls_revoking(
            &[],
            &[],
            now - time::Duration::hours(1),
            now + time::Duration::days(7),
        );
        let mut server = pki.server_material();
        server.crls = crls.clone();
        let mut client = pki.client_material();
        client.crls = crls;
        connect(
            client_config(&client).unwrap(),
            server_config(&server).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn second_connection_is_a_full_handshake_again() {
        let pki = Pki::new("main");
        let client = client_at(&pki.client_material(), NOW);
        let server = server_at(&pki.server_material(), NOW);
        for _ in 0..2 {
            let (c, s) = connect(Arc::clone(&client), Arc::clone(&server)).unwrap();
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
            assert_eq!(s.handshake_kind(), Some(HandshakeKind::Full));
        }
        assert_eq!(server.max_early_data_size, 0);
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(!client.enable_early_data);
    }

    #[test]
    fn alpn_is_negotiated_when_both_sides_ask_for_it() {
        let pki = Pki::new("main");
        let server =
            server_config_with(&pki.server_material(), &at(NOW).with_alpn(["mqtt"])).unwrap();
        let client =
            client_config_with(&pki.client_material(), &at(NOW).with_alpn(["mqtt"])).unwrap();
        let (c, _) = connect(client, Arc::clone(&server)).unwrap();
        assert_eq!(c.alpn_protocol(), Some(&b"mqtt"[..]));

        let other = client_config_with(&pki.client_material(), &at(NOW).with_alpn(["h2"])).unwrap();
        let err = connect(other, server).map(|_| ()).unwrap_err();
        assert_eq!(err, (Side::Server, Error::NoApplicationProtocol));
    }

    #[test]
    fn client_without_certificate_is_refused() {
        let pki = Pki::new("main");
        let m = pki.client_material();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(checked_roots(&m).unwrap(), provider())
                .with_crls(m.crls.clone())
                .build()
                .unwrap();
        let client = ClientConfig::builder_with_details(provider(), clock(&at(NOW)))
            .with_protocol_versions(VERSIONS)
            .unwrap()
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        let err = connect(Arc::new(client), server_at(&pki.server_material(), NOW))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err, (Side::Server, Error::NoCertificatesPresented));
    }

    #[test]
    fn client_from_a_foreign_ca_is_refused() {
        let pki = Pki::new("main");
        let foreign = Pki::new("foreign");
        // The foreign client trusts our root, so only the server's check can stop it.
        let mut m = foreign.client_material();
        m.roots = vec![pki.root.cert.clone()];
        m.crls = pki.crls();
        let err = expect_cert_error(
            connect(client_at(&m, NOW), server_at(&pki.server_material(), NOW)),
            Side::Server,
        );
        assert_eq!(err, CertificateError::UnknownIssuer);
    }

    #[test]
    fn client_with_server_only_eku_is_refused() {
        let pki = Pki::new("main");
        let wrong = leaf(
            &pki.issuing,
            "client",
            201,
            ExtendedKeyUsagePurpose::ServerAuth,
            datetime!(2098-01-01 00:00 UTC),
        );
        let err = expect_cert_error(
            connect(
                client_at(&pki.material(&wrong), NOW),
                server_at(&pki.server_material(), NOW),
            ),
            Side::Server,
        );
        assert!(
            matches!(
                err,
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn expired_client_certificate_is_refused() {
        let pki = Pki::new("main");
        let expired = leaf(
            &pki.issuing,
            "client",
            202,
            ExtendedKeyUsagePurpose::ClientAuth,
            datetime!(2025-01-10 00:00 UTC),
        );
        let err = expect_cert_error(
            connect(
                client_at(&pki.material(&expired), NOW),
                server_at(&pki.server_material(), NOW),
            ),
            Side::Server,
        );
        assert!(
            matches!(err, CertificateError::ExpiredContext { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn revoked_client_certificate_is_refused() {
        let pki = Pki::new("main");
        let mut server = pki.server_material();
        server.crls = pki.crls_revoking(&[], &[CLIENT_SERIAL], T0, CRL_NEXT);
        let err = expect_cert_error(
            connect(
                client_at(&pki.client_material(), NOW),
                server_at(&server, NOW),
            ),
            Side::Server,
        );
        assert_eq!(err, CertificateError::Revoked);
    }

    #[test]
    fn revoked_issuing_ca_is_refused_because_the_whole_chain_is_checked() {
        let pki = Pki::new("main");
        let mut server = pki.server_material();
        server.crls = pki.crls_revoking(&[ISSUING_SERIAL], &[], T0, CRL_NEXT);
        let err = expect_cert_error(
            connect(
                client_at(&pki.client_material(), NOW),
                server_at(&server, NOW),
            ),
            Side::Server,
        );
        assert_eq!(err, CertificateError::Revoked);
    }

    #[test]
    fn revoked_server_certificate_is_refused_by_the_client() {
        let pki = Pki::new("main");
        let mut client = pki.client_material();
        client.crls = pki.crls_revoking(&[], &[SERVER_SERIAL], T0, CRL_NEXT);
        let err = expect_cert_error(
            connect(
                client_at(&client, NOW),
                server_at(&pki.server_material(), NOW),
            ),
            Side::Client,
        );
        assert_eq!(err, CertificateError::Revoked);
    }

    #[test]
    fn expired_crl_fails_closed_on_the_server() {
        let pki = Pki::new("main");
        let err = expect_cert_error(
            connect(
                client_at(&pki.client_material(), NOW),
                server_at(&pki.server_material(), AFTER_CRL),
            ),
            Side::Server,
        );
        assert!(
            matches!(err, CertificateError::ExpiredRevocationListContext { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn expired_crl_fails_closed_on_the_client() {
        let pki = Pki::new("main");
        let err = expect_cert_error(
            connect(
                client_at(&pki.client_material(), AFTER_CRL),
                server_at(&pki.server_material(), NOW),
            ),
            Side::Client,
        );
        assert!(
            matches!(err, CertificateError::ExpiredRevocationListContext { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn expired_crl_fails_closed_with_the_system_clock() {
        let pki = Pki::new("main");
        // The test CRLs expired in 2025; the default configuration reads the system clock.
        let err = expect_cert_error(
            connect(
                client_at(&pki.client_material(), NOW),
                server_config(&pki.server_material()).unwrap(),
            ),
            Side::Server,
        );
        assert!(
            matches!(err, CertificateError::ExpiredRevocationListContext { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn missing_crl_for_the_leaf_issuer_is_unknown_status_and_refused() {
        let pki = Pki::new("main");
        let mut server = pki.server_material();
        server.crls = vec![crl(&pki.root, &[], T0, CRL_NEXT).der().clone()];
        let err = expect_cert_error(
            connect(
                client_at(&pki.client_material(), NOW),
                server_at(&server, NOW),
            ),
            Side::Server,
        );
        assert_eq!(err, CertificateError::UnknownRevocationStatus);
    }

    #[test]
    fn missing_root_crl_for_the_issuing_ca_is_unknown_status_and_refused() {
        let pki = Pki::new("main");
        let mut server = pki.server_material();
        server.crls = vec![crl(&pki.issuing, &[], T0, CRL_NEXT).der().clone()];
        let err = expect_cert_error(
            connect(
                client_at(&pki.client_material(), NOW),
                server_at(&server, NOW),
            ),
            Side::Server,
        );
        assert_eq!(err, CertificateError::UnknownRevocationStatus);
    }

    #[test]
    fn server_from_a_rogue_ca_is_refused_by_the_client() {
        let pki = Pki::new("main");
        let rogue = Pki::new("rogue");
        // The rogue server would accept our client; our client must not accept it.
        let mut m = rogue.server_material();
        m.roots = vec![pki.root.cert.clone()];
        m.crls = pki.crls();
        let err = expect_cert_error(
            connect(client_at(&pki.client_material(), NOW), server_at(&m, NOW)),
            Side::Client,
        );
        assert_eq!(err, CertificateError::UnknownIssuer);
    }

    #[test]
    fn client_offering_only_chacha20_is_refused() {
        let pki = Pki::new("main");
        let mut chacha = default_provider();
        chacha.cipher_suites = vec![
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        let client =
            build_client(&pki.client_material(), &at(NOW), Arc::new(chacha), VERSIONS).unwrap();
        let err = connect(Arc::new(client), server_at(&pki.server_material(), NOW))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            err,
            (
                Side::Server,
                Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon)
            )
        );
    }

    #[test]
    fn material_without_roots_crls_or_chain_is_refused() {
        let pki = Pki::new("main");
        let mut m = pki.server_material();
        m.roots.clear();
        assert!(matches!(server_config(&m), Err(TlsError::NoRoots)));
        assert!(matches!(client_config(&m), Err(TlsError::NoRoots)));

        let mut m = pki.server_material();
        m.crls.clear();
        assert!(matches!(server_config(&m), Err(TlsError::NoCrls)));
        assert!(matches!(client_config(&m), Err(TlsError::NoCrls)));

        let mut m = pki.server_material();
        m.chain.clear();
        assert!(matches!(server_config(&m), Err(TlsError::EmptyChain)));
        assert!(matches!(client_config(&m), Err(TlsError::EmptyChain)));
    }

    #[test]
    fn broken_material_is_refused() {
        let pki = Pki::new("main");

        let mut m = pki.server_material();
        m.key = pki.client.key();
        assert!(matches!(server_config(&m), Err(TlsError::KeyMismatch)));
        assert!(matches!(client_config(&m), Err(TlsError::KeyMismatch)));

        let mut m = pki.server_material();
        m.key = PrivateKeyDer::Pkcs8(vec![0x30, 0x03, 0x02, 0x01, 0x00].into());
        assert!(matches!(server_config(&m), Err(TlsError::Key(_))));

        let mut m = pki.server_material();
        m.crls
            .push(CertificateRevocationListDer::from(vec![0x30, 0x00]));
        assert!(matches!(server_config(&m), Err(TlsError::Verifier(_))));
        assert!(matches!(client_config(&m), Err(TlsError::Verifier(_))));

        let mut m = pki.server_material();
        m.roots.push(CertificateDer::from(vec![0x30, 0x00]));
        assert!(matches!(
            server_config(&m),
            Err(TlsError::BadRoot { index: 1, .. })
        ));
    }

    #[test]
    fn fixed_clock_before_1970_makes_handshakes_fail() {
        let pki = Pki::new("main");
        let err = connect(
            client_at(&pki.client_material(), NOW),
            server_at(&pki.server_material(), datetime!(1969-12-31 00:00 UTC)),
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(err, (Side::Server, Error::FailedToGetCurrentTime));
    }

    #[test]
    fn material_clone_keeps_the_key() {
        let pki = Pki::new("main");
        let m = pki.server_material();
        let copy = m.clone();
        assert_eq!(copy.key.secret_der(), m.key.secret_der());
        assert_eq!(copy.chain, m.chain);
        // Debug output never shows the key bytes.
        assert!(format!("{m:?}").contains("elided"));
    }

    mod pem_files {
        // `&[path.clone()]` reads better here than `std::slice::from_ref(&path)`.
        #![allow(clippy::cloned_ref_to_slice_refs)]

        use std::fs;

        use super::*;

        struct Files {
            dir: tempfile::TempDir,
        }

        impl Files {
            fn new() -> Self {
                Self {
                    dir: tempfile::tempdir().unwrap(),
                }
            }

            fn write(&self, name: &str, contents: &str) -> PathBuf {
                let path = self.dir.path().join(name);
                fs::write(&path, contents).unwrap();
                path
            }
        }

        fn write_pki(pki: &Pki, f: &Files) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
            let chain = f.write(
                "chain.pem",
                &format!("{}{}", pki.client.pem, pki.issuing.pem),
            );
            let key = f.write("key.pem", &pki.client.key.serialize_pem());
            let roots = f.write("roots.pem", &pki.root.pem);
            let crls = f.write(
                "crls.pem",
                &format!(
                    "{}{}",
                    crl(&pki.root, &[], T0, CRL_NEXT).pem().unwrap(),
                    crl(&pki.issuing, &[], T0, CRL_NEXT).pem().unwrap()
                ),
            );
            (chain, key, roots, crls)
        }

        #[test]
        fn loads_material_that_handshakes() {
            let pki = Pki::new("main");
            let f = Files::new();
            let (chain, key, roots, crls) = write_pki(&pki, &f);
            let m = TlsMaterial::from_pem_files(&chain, &key, &[roots], &[crls]).unwrap();
            assert_eq!(
                m.chain,
                vec![pki.client.cert.clone(), pki.issuing.cert.clone()]
            );
            assert_eq!(m.key.secret_der(), pki.client.key().secret_der());
            assert_eq!(m.roots, vec![pki.root.cert.clone()]);
            assert_eq!(m.crls.len(), 2);
            connect(client_at(&m, NOW), server_at(&pki.server_material(), NOW)).unwrap();
        }

        #[test]
        fn missing_file_is_named() {
            let pki = Pki::new("main");
            let f = Files::new();
            let (chain, key, roots, _) = write_pki(&pki, &f);
            let missing = f.dir.path().join("nope.pem");
            let err = TlsMaterial::from_pem_files(&chain, &key, &[roots], &[missing.clone()])
                .unwrap_err();
            assert!(matches!(&err, TlsError::Read { path, .. } if *path == missing));
            assert!(err.to_string().contains("nope.pem"), "{err}");
        }

        #[test]
        fn files_without_the_expected_blocks_are_refused() {
            let pki = Pki::new("main");
            let f = Files::new();
            let (chain, key, roots, crls) = write_pki(&pki, &f);

            let empty = f.write("empty.pem", "");
            let err = TlsMaterial::from_pem_files(&chain, &key, &[empty.clone()], &[crls.clone()])
                .unwrap_err();
            assert!(
                matches!(&err, TlsError::NothingFound { path, .. } if *path == empty),
                "{err:?}"
            );
            assert!(err.to_string().contains("empty.pem"), "{err}");

            // A certificate where the key should be.
            let err =
                TlsMaterial::from_pem_files(&chain, &roots, &[roots.clone()], &[crls.clone()])
                    .unwrap_err();
            assert!(
                matches!(&err, TlsError::NothingFound { path, .. } if *path == roots),
                "{err:?}"
            );

            // Certificates where CRLs should be.
            let err = TlsMaterial::from_pem_files(&chain, &key, &[roots.clone()], &[chain.clone()])
                .unwrap_err();
            assert!(
                matches!(&err, TlsError::NothingFound { path, .. } if *path == chain),
                "{err:?}"
            );
        }

        #[test]
        fn two_keys_in_one_file_are_refused() {
            let pki = Pki::new("main");
            let f = Files::new();
            let (chain, _, roots, crls) = write_pki(&pki, &f);
            let keys = f.write(
                "keys.pem",
                &format!(
                    "{}{}",
                    pki.client.key.serialize_pem(),
                    pki.server.key.serialize_pem()
                ),
            );
            let err = TlsMaterial::from_pem_files(&chain, &keys, &[roots], &[crls]).unwrap_err();
            assert!(
                matches!(&err, TlsError::SeveralKeys { path } if *path == keys),
                "{err:?}"
            );
        }

        #[test]
        fn malformed_pem_is_refused() {
            let pki = Pki::new("main");
            let f = Files::new();
            let (chain, key, _, crls) = write_pki(&pki, &f);
            let truncated = f.write("truncated.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
            let err = TlsMaterial::from_pem_files(&chain, &key, &[truncated.clone()], &[crls])
                .unwrap_err();
            assert!(
                matches!(&err, TlsError::Pem { path, .. } if *path == truncated),
                "{err:?}"
            );
        }

        #[test]
        fn undecodable_certificate_and_crl_are_refused_by_name() {
            let pki = Pki::new("main");
            let f = Files::new();
            let (chain, key, roots, crls) = write_pki(&pki, &f);
            // Valid base64 of bytes that are not X.509.
            let bad_cert = f.write(
                "bad-cert.pem",
                "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n",
            );
            let err = TlsMaterial::from_pem_files(
                &chain,
                &key,
                &[roots.clone(), bad_cert.clone()],
                &[crls],
            )
            .unwrap_err();
            assert!(
                matches!(&err, TlsError::BadCertificate { path, index: 0, .. } if *path == bad_cert),
                "{err:?}"
            );

            let bad_crl = f.write(
                "bad-crl.pem",
                "-----BEGIN X509 CRL-----\nMAMCAQA=\n-----END X509 CRL-----\n",
            );
            let err = TlsMaterial::from_pem_files(&chain, &key, &[roots], &[bad_crl.clone()])
                .unwrap_err();
            assert!(
                matches!(&err, TlsError::BadCrl { path, index: 0, .. } if *path == bad_crl),
                "{err:?}"
            );
        }
    }
}
