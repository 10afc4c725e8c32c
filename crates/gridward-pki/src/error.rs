//! [`PkiError`]: everything a CA operation can refuse or fail with.

use std::io;
use std::path::PathBuf;

use gridward_core::MeterIdError;
use time::OffsetDateTime;

use crate::identity::IdentityError;
use crate::profile::LeafKind;

/// Why a CA operation failed.
///
/// Messages name the file involved and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The directory holds no CA (no `ca/root.crt.pem`).
    #[error("no certificate authority in {}: run `gridward pki init --dir {}` first", dir.display(), dir.display())]
    NotInitialised {
        /// The PKI directory.
        dir: PathBuf,
    },
    /// `init` was asked to create a CA where one already exists.
    #[error("{} already holds a certificate authority (ca/root.crt.pem exists); refusing to overwrite it", dir.display())]
    AlreadyInitialised {
        /// The PKI directory.
        dir: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "writing", "creating directory", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file the CA needs is missing.
    #[error("{} is missing: {hint}", path.display())]
    MissingFile {
        /// The missing file.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },
    /// A file exists but its content is not what it should be (bad PEM, DER, key ...).
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `inventory.json` is not valid.
    #[error("{} is corrupt: {source}", path.display())]
    InventoryCorrupt {
        /// The inventory file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A CA key is encrypted and no passphrase was given.
    #[error("CA key is encrypted: pass --passphrase-file (key file {})", path.display())]
    CaKeyEncrypted {
        /// The encrypted key file.
        path: PathBuf,
    },
    /// The passphrase does not decrypt the CA key.
    #[error("wrong passphrase for the CA key {}", path.display())]
    WrongPassphrase {
        /// The encrypted key file.
        path: PathBuf,
    },
    /// A CRL publication URL is not an `http://` or `https://` URL with a host.
    #[error("{0:?} is not a CRL publication URL: give http://host/path or https://host/path")]
    InvalidCrlUrl(String),
    /// An empty passphrase or password was given.
    #[error("the passphrase is empty; an empty passphrase protects nothing")]
    EmptyPassphrase,
    /// Encrypting a private key with the passphrase failed.
    #[error("encrypting the private key: {0}")]
    KeyEncryption(String),
    /// Generating a key or building and signing a certificate or CRL failed.
    #[error("building the certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// The meter id is not valid.
    #[error("invalid meter id: {0}")]
    InvalidMeterId(#[from] MeterIdError),
    /// A server or client name is not valid.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// The kind of leaf the name was for.
        kind: LeafKind,
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A subject alternative name for a server is neither an IP address nor a valid DNS name.
    #[error("invalid --san {value:?}: not an IP address and not a valid DNS name")]
    InvalidSan {
        /// The value given.
        value: String,
    },
    /// A role name for a client certificate is not 1 to 32 lowercase ASCII letters.
    #[error("invalid role {role:?}: expected 1 to 32 lowercase letters, e.g. operator")]
    InvalidRole {
        /// The value given.
        role: String,
    },
    /// A role was requested for a certificate that is not a client certificate.
    #[error("only client certificates carry a role, not {kind} certificates")]
    RoleOnlyForClients {
        /// The kind requested.
        kind: crate::profile::LeafKind,
    },
    /// A server certificate was requested without any subject alternative name.
    #[error("a server certificate needs at least one --san (DNS name or IP address)")]
    NoSans,
    /// The requested validity is out of range.
    #[error("invalid validity of {days} days: must be between 1 and {max}")]
    InvalidValidity {
        /// The number of days requested.
        days: u32,
        /// The largest number accepted.
        max: u32,
    },
    /// The issuing CA has expired; nothing more can be issued under it.
    #[error(
        "the issuing CA expired at {}; nothing can be issued under it",
        rfc3339(not_after)
    )]
    IssuingCaExpired {
        /// When it expired.
        not_after: OffsetDateTime,
    },
    /// The identity already has a valid certificate and `replace` was not requested.
    #[error(
        "{kind} {name:?} already has a valid certificate (serial {serial}, expires {}); pass --replace to supersede it",
        rfc3339(not_after)
    )]
    AlreadyIssued {
        /// The kind of leaf.
        kind: LeafKind,
        /// The identity.
        name: String,
        /// The serial of the existing certificate (hex).
        serial: String,
        /// When the existing certificate expires.
        not_after: OffsetDateTime,
    },
    /// Meter ids and concentrator ids are one namespace: the id was already issued to a
    /// device of the other kind (at any time), so it cannot be this kind's.
    #[error(
        "{name:?} cannot be a {kind} id: it is already a {taken_by} id (serial {serial}); a meter id is never also a concentrator's"
    )]
    DeviceIdTaken {
        /// The kind being issued.
        kind: LeafKind,
        /// The id.
        name: String,
        /// The kind that holds the id.
        taken_by: LeafKind,
        /// The serial of a certificate of that kind with that id (hex).
        serial: String,
    },
    /// No certificate matches the selector.
    #[error("no certificate found for {what}")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// An identity name matches current certificates of several kinds.
    #[error("{name:?} names certificates of several kinds ({}); say which with --kind", kinds.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    AmbiguousIdentity {
        /// The name given.
        name: String,
        /// The kinds that have a current certificate of that name.
        kinds: Vec<LeafKind>,
    },
    /// The certificate is already revoked.
    #[error("certificate {serial} is already revoked")]
    AlreadyRevoked {
        /// The serial (hex).
        serial: String,
    },
    /// A CA certificate cannot be revoked with this operation.
    #[error(
        "certificate {serial} is a CA certificate; revoking CA certificates is not supported here"
    )]
    CannotRevokeCa {
        /// The serial (hex).
        serial: String,
    },
    /// A serial number given on input is not hexadecimal.
    #[error("invalid serial number {value:?}: expected hexadecimal (colons allowed)")]
    InvalidSerial {
        /// The value given.
        value: String,
    },
    /// The CSR could not be parsed (not PEM or DER, or not a PKCS#10 request).
    #[error("cannot parse the CSR: {reason}")]
    CsrParse {
        /// What is wrong.
        reason: String,
    },
    /// The CSR's self-signature does not verify with the public key it carries.
    #[error(
        "the CSR's signature does not verify: it was altered or not made with the key it carries"
    )]
    CsrSignature,
    /// The CSR has no subject common name and no identity was given.
    #[error("the CSR has no subject common name; give the identity explicitly (--id)")]
    CsrMissingCommonName,
    /// The public key (of a CSR or a key file) is of a type or size this CA does not certify.
    #[error("unsupported key: {reason}")]
    UnsupportedKey {
        /// What the key is and why it is refused.
        reason: String,
    },
    /// An operation needs the private key of a leaf, which is not in the PKI directory.
    #[error(
        "no private key on disk for {kind} {name:?} (its certificate was made from a CSR, or the key was removed)"
    )]
    NoPrivateKey {
        /// The kind of leaf.
        kind: LeafKind,
        /// The identity.
        name: String,
    },
    /// TLS material was asked for a certificate kind that never authenticates TLS.
    #[error(
        "{kind} certificates sign commands and cannot be used for TLS; use a server or client certificate"
    )]
    NotForTls {
        /// The kind asked for.
        kind: LeafKind,
    },
    /// A PKCS#12 file could not be written or read.
    #[error("PKCS#12: {0}")]
    P12(#[from] crate::p12::P12Error),
    /// An imported certificate was not issued by this PKI's issuing CA.
    #[error(
        "the certificate for {subject} in entry {alias:?} was not issued by this CA (issuing CA {issuing}); import only keys certified here, or add a CA as a trusted entry"
    )]
    NotIssuedByThisCa {
        /// The PKCS#12 alias.
        alias: String,
        /// The certificate's subject.
        subject: String,
        /// This PKI's issuing CA subject.
        issuing: String,
    },
    /// An imported private key does not belong to the certificate it came with.
    #[error("entry {alias:?}: the private key does not match the certificate")]
    KeyMismatch {
        /// The PKCS#12 alias.
        alias: String,
    },
    /// An imported certificate is known here but no longer current.
    #[error("entry {alias:?}: certificate {serial} is {status}; it cannot be brought back")]
    ImportStale {
        /// The PKCS#12 alias.
        alias: String,
        /// The serial (hex).
        serial: String,
        /// "revoked" or "superseded".
        status: &'static str,
    },
    /// A CRL's next update is not after its this update.
    #[error(
        "a CRL's next update ({}) must be after its this update ({})",
        rfc3339(next_update),
        rfc3339(this_update)
    )]
    InvalidCrlWindow {
        /// The this-update time asked for.
        this_update: OffsetDateTime,
        /// The next-update time asked for.
        next_update: OffsetDateTime,
    },
    /// A PKCS#12 key entry carries no certificate.
    #[error("entry {alias:?} of the PKCS#12 file has a key but no certificate")]
    ImportNoCertificate {
        /// The PKCS#12 alias.
        alias: String,
    },
    /// A certificate in a PKCS#12 file cannot be parsed.
    #[error("entry {alias:?} of the PKCS#12 file: {reason}")]
    ImportBadCertificate {
        /// The PKCS#12 alias.
        alias: String,
        /// What is wrong.
        reason: String,
    },
    /// A CRL file is missing; TLS must not run without one (fail closed).
    #[error("{} is missing: run `gridward pki crl --dir DIR` to write the CRLs (TLS refuses to start without them)", path.display())]
    CrlMissing {
        /// The CRL file.
        path: PathBuf,
    },
    /// A certificate does not carry a usable identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// RFC 3339 text of a time, for messages.
fn rfc3339(t: &OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

impl PkiError {
    /// Builds an [`PkiError::Io`] mapper for `action` on `path`.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }

    /// Builds a [`PkiError::BadFile`].
    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
