//! Certificate profiles: what a meter, server, client or command-signer certificate contains,
//! and the options of an issuance.
//!
//! Every leaf gets: a random 16-byte positive serial, an explicit validity (not before = now − 5
//! minutes), basicConstraints CA:false, KeyUsage digitalSignature (critical; plus keyEncipherment
//! for RSA server keys), one EKU, SKI and AKI.
//!
//! A command-signer certificate carries the Gridward command-signing EKU
//! ([`COMMAND_SIGNING_EKU`], critical) and neither serverAuth nor clientAuth, so no TLS stack
//! accepts it and [`crate::identity_of`] refuses it: the key that signs commands to meters can
//! never authenticate a connection, and a TLS key can never sign a command.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use gridward_core::MeterId;
use rand::RngCore;
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::error::PkiError;
use crate::identity::{CLIENT_URI_PREFIX, CONCENTRATOR_URI_PREFIX, ROLE_URI_PREFIX};
use crate::keys::LeafKeyAlg;

/// id-ce-extKeyUsage (RFC 5280, 4.2.1.12).
const EXTENDED_KEY_USAGE_OID: &[u64] = &[2, 5, 29, 37];

/// How long before `now` a new certificate becomes valid, to absorb clock skew between peers.
pub const NOT_BEFORE_SKEW: Duration = Duration::minutes(5);

/// The longest validity accepted for any certificate, in days (100 years).
pub const MAX_VALIDITY_DAYS: u32 = 36_525;

/// Longest server, client or command-signer name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// The extended key usage of a command-signer certificate: "signs Gridward commands to meters".
///
/// An OID under the UUID arc `2.25` (ITU-T X.667 | ISO/IEC 9834-8: an OID made from a random
/// UUID needs no registration); the UUID is `346125a4-baf5-4472-90cc-77bcc626ad1d`.
/// A meter accepts a command only from a certificate whose EKU is exactly this OID.
/// Its last arc does not fit in 64 bits, so the extension is encoded by
/// [`command_signing_eku_der`], not by rcgen's `ExtendedKeyUsagePurpose::Other`.
pub const COMMAND_SIGNING_EKU: &str = "2.25.69624272076528213008981749226765987101";

/// The DER content octets (without tag and length) of the [`COMMAND_SIGNING_EKU`] OID, as
/// x509-parser's `Oid::as_bytes` returns them.
pub fn command_signing_eku_der() -> Vec<u8> {
    // COMMAND_SIGNING_EKU is a constant of the form 2.25.N with N < 2^128; the unit test
    // `command_signing_eku_encoding` checks this function against it.
    const ARC: u128 = 69_624_272_076_528_213_008_981_749_226_765_987_101;
    let mut out = vec![2 * 40 + 25];
    let mut groups = Vec::new();
    let mut n = ARC;
    loop {
        // Masked to 7 bits, so the cast is lossless.
        groups.push((n & 0x7f) as u8);
        n >>= 7;
        if n == 0 {
            break;
        }
    }
    let last = groups.len() - 1;
    for (i, g) in groups.iter().rev().enumerate() {
        out.push(if i == last { *g } else { g | 0x80 });
    }
    out
}

/// The DER of the extendedKeyUsage extension value of a command signer: a SEQUENCE holding the
/// one OID [`COMMAND_SIGNING_EKU`].
fn command_signing_eku_extension() -> Vec<u8> {
    let oid = command_signing_eku_der();
    // The OID is 19 bytes, so both lengths take the DER short form (one byte, < 128).
    let oid_len = oid.len() as u8;
    let mut out = vec![0x30, oid_len + 2, 0x06, oid_len];
    out.extend_from_slice(&oid);
    out
}

/// The kind of a leaf certificate, which fixes its profile.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LeafKind {
    /// A meter: CN = meter id, URI SAN `urn:gridward:meter:{id}`, EKU clientAuth.
    Meter,
    /// A server: CN = name, DNS/IP SANs, EKU serverAuth.
    Server,
    /// A client: CN = name, URI SAN `urn:gridward:client:{name}`, EKU clientAuth.
    Client,
    /// The head-end's command-signing key: CN = name, no SAN, EKU [`COMMAND_SIGNING_EKU`] only
    /// (critical; no serverAuth, no clientAuth), so it can never authenticate a TLS connection.
    #[serde(rename = "command-signer")]
    CommandSigner,
    /// A data concentrator: CN = id (a meter id's syntax, never also a meter's), URI SAN
    /// `urn:gridward:concentrator:{id}`, EKU clientAuth.
    Concentrator,
}

impl LeafKind {
    /// Every leaf kind.
    pub const ALL: [Self; 5] = [
        Self::Meter,
        Self::Server,
        Self::Client,
        Self::CommandSigner,
        Self::Concentrator,
    ];

    /// The name used on the command line and in the inventory.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Meter => "meter",
            Self::Server => "server",
            Self::Client => "client",
            Self::CommandSigner => "command-signer",
            Self::Concentrator => "concentrator",
        }
    }

    /// The directory (under the PKI directory) holding this kind's certificates.
    pub fn dir_name(self) -> &'static str {
        match self {
            Self::Meter => "meters",
            Self::Server => "servers",
            Self::Client => "clients",
            Self::CommandSigner => "command-signers",
            Self::Concentrator => "concentrators",
        }
    }

    /// Default validity in days: meters and concentrators 3650, servers 365, clients 730,
    /// command signers 365.
    pub fn default_validity_days(self) -> u32 {
        match self {
            Self::Meter | Self::Concentrator => 3650,
            Self::Server => 365,
            Self::Client => 730,
            Self::CommandSigner => 365,
        }
    }

    /// Whether certificates of this kind authenticate TLS peers (all but command signers).
    pub fn is_tls(self) -> bool {
        self != Self::CommandSigner
    }
}

impl fmt::Display for LeafKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A leaf kind name that is not `meter`, `server`, `client`, `command-signer` or
/// `concentrator`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown certificate kind {0:?}: expected meter, server, client, command-signer or concentrator"
)]
pub struct UnknownLeafKind(pub String);

impl FromStr for LeafKind {
    type Err = UnknownLeafKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownLeafKind(s.to_owned()))
    }
}

/// Options of one issuance (or of each certificate of a bulk issuance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Key algorithm of a generated key (ignored when signing a CSR).
    pub key_alg: LeafKeyAlg,
    /// Validity in days; `None` uses the kind's default ([`LeafKind::default_validity_days`]).
    pub validity_days: Option<u32>,
    /// Supersede an existing valid certificate of the same identity instead of refusing.
    pub replace: bool,
    /// Who asks (recorded in the log and inventory).
    pub actor: String,
    /// The API role bound in a client certificate (URI SAN `urn:gridward:role:{role}`);
    /// meters and servers refuse one ([`PkiError::RoleOnlyForClients`]). The PKI checks only its syntax ([`validate_role`]);
    /// which roles exist is the API's business.
    pub role: Option<String>,
}

impl IssueOptions {
    /// Defaults (P-256, the kind's validity, no replacement) for `actor`.
    pub fn new(actor: impl Into<String>) -> Self {
        Self {
            key_alg: LeafKeyAlg::P256,
            validity_days: None,
            replace: false,
            actor: actor.into(),
            role: None,
        }
    }
}

/// A subject alternative name of a server certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SanValue {
    /// A DNS name.
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
}

impl SanValue {
    /// Parses a `--san` value: an IP address if it parses as one, otherwise a DNS name, which must
    /// be syntactically valid (wildcards are not accepted).
    pub fn parse(value: &str) -> Result<Self, PkiError> {
        let value = value.trim();
        if let Ok(ip) = value.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let invalid = || PkiError::InvalidSan {
            value: value.to_owned(),
        };
        if value.contains('*') {
            return Err(invalid());
        }
        rustls_pki_types::DnsName::try_from(value).map_err(|_| invalid())?;
        // A DNS name must not be all-numeric in its last label (it would be an IP address typo).
        if value
            .rsplit('.')
            .next()
            .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(invalid());
        }
        Ok(Self::Dns(value.to_ascii_lowercase()))
    }

    fn to_rcgen(&self) -> Result<SanType, PkiError> {
        Ok(match self {
            Self::Dns(name) => SanType::DnsName(name.clone().try_into()?),
            Self::Ip(ip) => SanType::IpAddress(*ip),
        })
    }
}

impl fmt::Display for SanValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => f.write_str(name),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Checks a leaf identity name: a meter id for meters and concentrators; for servers, clients and command signers, 1 to
/// [`MAX_NAME_LEN`] characters from `A-Z a-z 0-9 . _ -`, not starting with `.` or `-` (the name is
/// a directory name and a URI component).
pub fn validate_name(kind: LeafKind, name: &str) -> Result<(), PkiError> {
    if matches!(kind, LeafKind::Meter | LeafKind::Concentrator) {
        MeterId::new(name)?;
        return Ok(());
    }
    let invalid = |reason| PkiError::InvalidName {
        kind,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("it is longer than 64 bytes"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid("only A-Z a-z 0-9 . _ - are allowed"));
    }
    if name.starts_with(['.', '-']) {
        return Err(invalid("it must not start with '.' or '-'"));
    }
    Ok(())
}

/// Checks a validity in days.
pub(crate) fn check_validity(days: u32) -> Result<u32, PkiError> {
    if days == 0 || days > MAX_VALIDITY_DAYS {
        return Err(PkiError::InvalidValidity {
            days,
            max: MAX_VALIDITY_DAYS,
        });
    }
    Ok(days)
}

/// A random serial: 16 bytes, top bit clear (positive), first byte nonzero (so the DER INTEGER is
/// always exactly 16 bytes and never zero).
pub(crate) fn random_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    loop {
        rand::rngs::OsRng.fill_bytes(&mut serial);
        serial[0] &= 0x7f;
        if serial[0] != 0 {
            return serial;
        }
    }
}

/// Truncates to whole seconds in UTC, the precision a certificate stores.
pub(crate) fn to_cert_time(t: OffsetDateTime) -> OffsetDateTime {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
}

/// What a leaf certificate is for: its kind, identity name and (servers) SANs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeafSpec {
    pub(crate) kind: LeafKind,
    pub(crate) name: String,
    pub(crate) sans: Vec<SanValue>,
    /// Client certificates only: the API role bound in the certificate.
    pub(crate) role: Option<String>,
}

/// Longest role name accepted, in bytes.
pub const MAX_ROLE_LEN: usize = 32;

/// Checks a role name for a client certificate: 1 to [`MAX_ROLE_LEN`] lowercase ASCII letters.
pub fn validate_role(role: &str) -> Result<(), PkiError> {
    if role.is_empty() || role.len() > MAX_ROLE_LEN || !role.bytes().all(|b| b.is_ascii_lowercase())
    {
        return Err(PkiError::InvalidRole {
            role: role.to_owned(),
        });
    }
    Ok(())
}

impl LeafSpec {
    /// Validates the name (and, for servers, that there is at least one SAN).
    pub(crate) fn new(kind: LeafKind, name: &str, sans: Vec<SanValue>) -> Result<Self, PkiError> {
        validate_name(kind, name)?;
        if kind == LeafKind::Server && sans.is_empty() {
            return Err(PkiError::NoSans);
        }
        let sans = if kind == LeafKind::Server {
            sans
        } else {
            Vec::new()
        };
        Ok(Self {
            kind,
            name: name.to_owned(),
            sans,
            role: None,
        })
    }

    /// Binds an API role (client certificates only; other kinds refuse one).
    pub(crate) fn with_role(mut self, role: Option<&str>) -> Result<Self, PkiError> {
        if let Some(role) = role {
            if self.kind != LeafKind::Client {
                return Err(PkiError::RoleOnlyForClients { kind: self.kind });
            }
            validate_role(role)?;
            self.role = Some(role.to_owned());
        }
        Ok(self)
    }

    /// The SANs as the strings kept in the inventory.
    pub(crate) fn san_strings(&self) -> Vec<String> {
        self.sans.iter().map(ToString::to_string).collect()
    }

    /// The certificate parameters of this leaf.
    pub(crate) fn params(
        &self,
        rsa_key: bool,
        serial: &[u8],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        crl_distribution_point: Option<&str>,
    ) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        if let Some(uri) = crl_distribution_point {
            params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
                uris: vec![uri.to_owned()],
            }];
        }
        params.serial_number = Some(SerialNumber::from_slice(serial));
        params.not_before = not_before;
        params.not_after = not_after;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match self.kind {
            LeafKind::Meter => {
                let id = MeterId::new(&self.name)?;
                params.subject_alt_names = vec![SanType::URI(id.to_uri().try_into()?)];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            LeafKind::Concentrator => {
                let id = MeterId::new(&self.name)?;
                let uri = format!("{CONCENTRATOR_URI_PREFIX}{id}");
                params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            LeafKind::Client => {
                let uri = format!("{CLIENT_URI_PREFIX}{}", self.name);
                params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
                if let Some(role) = &self.role {
                    let uri = format!("{ROLE_URI_PREFIX}{role}");
                    params.subject_alt_names.push(SanType::URI(uri.try_into()?));
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            LeafKind::Server => {
                params.subject_alt_names = self
                    .sans
                    .iter()
                    .map(SanValue::to_rcgen)
                    .collect::<Result<_, _>>()?;
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                if rsa_key {
                    params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
                }
            }
            LeafKind::CommandSigner => {
                // No SAN (it names no peer), no TLS EKU; rcgen writes no EKU extension when
                // `extended_key_usages` is empty, so the only one is this custom extension.
                params.extended_key_usages = Vec::new();
                let mut eku = CustomExtension::from_oid_content(
                    EXTENDED_KEY_USAGE_OID,
                    command_signing_eku_extension(),
                );
                eku.set_criticality(true);
                params.custom_extensions.push(eku);
            }
        }
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_parsing() {
        assert_eq!(
            SanValue::parse("10.0.0.1").unwrap(),
            SanValue::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            SanValue::parse("::1").unwrap(),
            SanValue::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            SanValue::parse("HES.Example.com").unwrap(),
            SanValue::Dns("hes.example.com".into())
        );
        assert_eq!(
            SanValue::parse("localhost").unwrap(),
            SanValue::Dns("localhost".into())
        );
        for bad in [
            "",
            "*.example.com",
            "a b",
            "10.0.0.256",
            "-bad.example",
            "exa mple",
        ] {
            assert!(
                matches!(SanValue::parse(bad), Err(PkiError::InvalidSan { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn names() {
        assert!(validate_name(LeafKind::Server, "hes.example.com").is_ok());
        assert!(validate_name(LeafKind::Client, "billing_1").is_ok());
        assert!(matches!(
            validate_name(LeafKind::Client, ""),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            validate_name(LeafKind::Client, "../x"),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            validate_name(LeafKind::Server, "a/b"),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            validate_name(LeafKind::Server, &"a".repeat(65)),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            validate_name(LeafKind::Meter, "a b"),
            Err(PkiError::InvalidMeterId(_))
        ));
    }

    #[test]
    fn serials_are_positive_sixteen_bytes_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let s = random_serial();
            assert!(s[0] != 0 && s[0] & 0x80 == 0);
            assert!(seen.insert(s));
        }
    }

    #[test]
    fn validity_bounds() {
        assert!(matches!(
            check_validity(0),
            Err(PkiError::InvalidValidity { days: 0, .. })
        ));
        assert!(check_validity(1).is_ok());
        assert!(matches!(
            check_validity(MAX_VALIDITY_DAYS + 1),
            Err(PkiError::InvalidValidity { .. })
        ));
    }

    #[test]
    fn server_needs_sans() {
        assert!(matches!(
            LeafSpec::new(LeafKind::Server, "hes", vec![]),
            Err(PkiError::NoSans)
        ));
        assert_eq!(
            LeafSpec::new(LeafKind::Meter, "M1", vec![SanValue::Dns("x".into())])
                .unwrap()
                .sans,
            vec![]
        );
    }

    /// Decodes DER OID content octets to dotted text (arcs up to 128 bits).
    fn dotted(der: &[u8]) -> String {
        let mut arcs: Vec<u128> = Vec::new();
        let mut n: u128 = 0;
        for b in der {
            n = (n << 7) | u128::from(b & 0x7f);
            if b & 0x80 == 0 {
                if arcs.is_empty() {
                    arcs.push(n / 40);
                    arcs.push(n % 40);
                } else {
                    arcs.push(n);
                }
                n = 0;
            }
        }
        assert_eq!(n, 0, "unterminated arc");
        arcs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(".")
    }

    #[test]
    fn command_signing_eku_encoding() {
        let der = command_signing_eku_der();
        assert_eq!(dotted(&der), COMMAND_SIGNING_EKU);
        assert_eq!(der[0], 0x69, "2.25 is one byte, 2*40+25");
        // As documented in docs/pki.md.
        assert_eq!(hex::encode(&der), "69e8e192e997afaa91e590e69df7ccb19ada1d");
        // x509-parser agrees (it keeps the encoding; its dotted form needs bigint, so compare DER).
        let oid = x509_parser::oid_registry::Oid::new(std::borrow::Cow::Borrowed(&der));
        assert_eq!(oid.as_bytes(), der.as_slice());
        let ext = command_signing_eku_extension();
        assert_eq!(&ext[..4], &[0x30, 21, 0x06, 19]);
        assert_eq!(&ext[4..], der.as_slice());
    }

    #[test]
    fn command_signer_kind() {
        assert_eq!(
            "command-signer".parse::<LeafKind>(),
            Ok(LeafKind::CommandSigner)
        );
        assert_eq!(LeafKind::CommandSigner.dir_name(), "command-signers");
        assert_eq!(LeafKind::CommandSigner.default_validity_days(), 365);
        assert!(!LeafKind::CommandSigner.is_tls());
        assert!(LeafKind::ALL.iter().filter(|k| k.is_tls()).count() == 4);
        assert_eq!(
            serde_json::to_string(&LeafKind::CommandSigner).unwrap(),
            "\"command-signer\""
        );
        assert!(validate_name(LeafKind::CommandSigner, "hes-commands.2025").is_ok());
        assert!(matches!(
            validate_name(LeafKind::CommandSigner, "../x"),
            Err(PkiError::InvalidName { .. })
        ));
        assert!(matches!(
            LeafSpec::new(LeafKind::CommandSigner, "hes", Vec::new())
                .unwrap()
                .with_role(Some("operator")),
            Err(PkiError::RoleOnlyForClients {
                kind: LeafKind::CommandSigner
            })
        ));
        let spec = LeafSpec::new(
            LeafKind::CommandSigner,
            "hes",
            vec![SanValue::Dns("hes.example".into())],
        )
        .unwrap();
        assert!(spec.sans.is_empty(), "a command signer takes no SAN");
    }

    #[test]
    fn kinds_parse() {
        assert_eq!("Meter".parse::<LeafKind>(), Ok(LeafKind::Meter));
        assert_eq!("x".parse::<LeafKind>(), Err(UnknownLeafKind("x".into())));
    }
}
