//! The inventory: every certificate the CA ever issued, and what became of it.
//!
//! Kept in `DIR/inventory.json`, rewritten atomically (temporary file, fsync, rename) after each
//! operation, never edited in place. It also holds the CRL numbers and the head of the operation
//! log (so a truncated log is detected).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::crl::RevocationReason;
use crate::error::PkiError;
use crate::fsutil::{PUBLIC_MODE, read_file, write_atomic};
use crate::oplog::LogHead;
use crate::profile::LeafKind;

/// The inventory file format version written by this code.
pub const INVENTORY_FORMAT: u32 = 1;

/// Default "expiring soon" threshold of [`CertStatus::Expiring`].
pub const DEFAULT_EXPIRING_WITHIN: Duration = Duration::days(30);

/// What a certificate in the inventory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertKind {
    /// The root CA.
    RootCa,
    /// The issuing CA.
    IssuingCa,
    /// A meter leaf.
    Meter,
    /// A server leaf.
    Server,
    /// A client leaf.
    Client,
    /// A command-signer leaf (the head-end's command-signing key; not a TLS certificate).
    CommandSigner,
    /// A data concentrator leaf.
    Concentrator,
}

impl CertKind {
    /// The leaf kind, if this is a leaf.
    pub fn leaf(self) -> Option<LeafKind> {
        match self {
            Self::Meter => Some(LeafKind::Meter),
            Self::Server => Some(LeafKind::Server),
            Self::Client => Some(LeafKind::Client),
            Self::CommandSigner => Some(LeafKind::CommandSigner),
            Self::Concentrator => Some(LeafKind::Concentrator),
            Self::RootCa | Self::IssuingCa => None,
        }
    }

    /// The name shown in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RootCa => "root-ca",
            Self::IssuingCa => "issuing-ca",
            Self::Meter => "meter",
            Self::Server => "server",
            Self::Client => "client",
            Self::CommandSigner => "command-signer",
            Self::Concentrator => "concentrator",
        }
    }
}

impl From<LeafKind> for CertKind {
    fn from(kind: LeafKind) -> Self {
        match kind {
            LeafKind::Meter => Self::Meter,
            LeafKind::Server => Self::Server,
            LeafKind::Client => Self::Client,
            LeafKind::CommandSigner => Self::CommandSigner,
            LeafKind::Concentrator => Self::Concentrator,
        }
    }
}

impl fmt::Display for CertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a certificate's key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// The CA generated the key pair (the key is in the PKI directory).
    Generated,
    /// The certificate was made from a CSR (the key stays with the requester).
    Csr,
    /// The key and certificate were imported from a PKCS#12 file.
    Imported,
}

/// A revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Why.
    pub reason: RevocationReason,
    /// Who revoked it.
    pub actor: String,
}

/// A supersession: a newer certificate took this one's place (not a revocation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Supersession {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The serial of the certificate that replaced it.
    pub by: Option<String>,
}

/// One certificate in the inventory, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryEntry {
    /// Serial number, lowercase hex without leading zero bytes.
    pub serial: String,
    /// What the certificate is.
    pub kind: CertKind,
    /// The identity: meter id, server or client name, or the CA's common name.
    pub name: String,
    /// The subject distinguished name, as text.
    pub subject: String,
    /// Server SANs (DNS names and IP addresses); empty for other kinds.
    #[serde(default)]
    pub sans: Vec<String>,
    /// Client certificates: the API role bound in the certificate (kept for renewal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Key algorithm (`p256`, `ed25519`, `rsa2048`, ...).
    pub key_alg: String,
    /// Start of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// The validity requested, in days (reused on renewal).
    pub validity_days: u32,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub fingerprint: String,
    /// When it was issued (or imported).
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// Who issued it.
    pub issued_by: String,
    /// Where the key came from.
    pub origin: Origin,
    /// Whether the private key is in the PKI directory.
    pub key_on_disk: bool,
    /// Set when revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
    /// Set when superseded by a newer certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded: Option<Supersession>,
}

impl InventoryEntry {
    /// Whether the certificate is the current one of its identity (neither revoked nor superseded).
    pub fn is_current(&self) -> bool {
        self.revoked.is_none() && self.superseded.is_none()
    }

    /// The status at `now`, counting certificates that expire within `expiring_within` as expiring.
    pub fn status(&self, now: OffsetDateTime, expiring_within: Duration) -> CertStatus {
        if self.revoked.is_some() {
            CertStatus::Revoked
        } else if self.superseded.is_some() {
            CertStatus::Superseded
        } else if now >= self.not_after {
            CertStatus::Expired
        } else if self.not_after - now <= expiring_within {
            CertStatus::Expiring
        } else {
            CertStatus::Valid
        }
    }
}

/// The status of a certificate at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertStatus {
    /// Current and not expiring soon.
    Valid,
    /// Current and expiring within the threshold.
    Expiring,
    /// Past its not-after.
    Expired,
    /// Revoked.
    Revoked,
    /// Superseded by a newer certificate of the same identity.
    Superseded,
}

impl CertStatus {
    /// The name shown in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Expiring => "expiring",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Superseded => "superseded",
        }
    }
}

impl fmt::Display for CertStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A certificate with its status at the time of listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    /// The stored entry.
    #[serde(flatten)]
    pub entry: InventoryEntry,
    /// Its status at the time of listing.
    pub status: CertStatus,
}

/// CRL numbers last used, per issuer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CrlNumbers {
    pub(crate) root: u64,
    pub(crate) issuing: u64,
}

/// The whole inventory file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Inventory {
    pub(crate) format: u32,
    #[serde(default)]
    pub(crate) crl_numbers: CrlNumbers,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) log_head: Option<LogHead>,
    pub(crate) certificates: Vec<InventoryEntry>,
}

impl Inventory {
    /// A new, empty inventory.
    pub(crate) fn new() -> Self {
        Self {
            format: INVENTORY_FORMAT,
            ..Self::default()
        }
    }

    /// Reads `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, PkiError> {
        let bytes = read_file(
            path,
            "the PKI directory is incomplete; was it initialised with `gridward pki init`?",
        )?;
        let inv: Self =
            serde_json::from_slice(&bytes).map_err(|source| PkiError::InventoryCorrupt {
                path: path.to_path_buf(),
                source,
            })?;
        if inv.format != INVENTORY_FORMAT {
            return Err(PkiError::bad_file(
                path,
                format!(
                    "inventory format {} is not supported (expected {INVENTORY_FORMAT})",
                    inv.format
                ),
            ));
        }
        Ok(inv)
    }

    /// Writes `path` atomically.
    pub(crate) fn save(&self, path: &Path) -> Result<(), PkiError> {
        let mut json =
            serde_json::to_vec_pretty(self).map_err(|source| PkiError::InventoryCorrupt {
                path: path.to_path_buf(),
                source,
            })?;
        json.push(b'\n');
        write_atomic(path, &json, PUBLIC_MODE, true)
    }

    /// Index of the entry with `serial`.
    pub(crate) fn by_serial(&self, serial: &str) -> Option<usize> {
        self.certificates.iter().position(|c| c.serial == serial)
    }

    /// Index of the current certificate of each leaf identity.
    pub(crate) fn current_index(&self) -> HashMap<(CertKind, String), usize> {
        let mut map = HashMap::new();
        for (i, c) in self.certificates.iter().enumerate() {
            if c.kind.leaf().is_some() && c.is_current() {
                map.insert((c.kind, c.name.clone()), i);
            }
        }
        map
    }

    /// All serials.
    pub(crate) fn serials(&self) -> HashSet<String> {
        self.certificates.iter().map(|c| c.serial.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn entry() -> InventoryEntry {
        InventoryEntry {
            serial: "01".into(),
            kind: CertKind::Meter,
            name: "M1".into(),
            subject: "CN=M1".into(),
            sans: vec![],
            role: None,
            key_alg: "p256".into(),
            not_before: datetime!(2025-01-01 0:00 UTC),
            not_after: datetime!(2026-01-01 0:00 UTC),
            validity_days: 365,
            fingerprint: "00".into(),
            issued_at: datetime!(2025-01-01 0:00 UTC),
            issued_by: "test".into(),
            origin: Origin::Generated,
            key_on_disk: true,
            revoked: None,
            superseded: None,
        }
    }

    #[test]
    fn statuses() {
        let e = entry();
        let w = DEFAULT_EXPIRING_WITHIN;
        assert_eq!(
            e.status(datetime!(2025-06-01 0:00 UTC), w),
            CertStatus::Valid
        );
        assert_eq!(
            e.status(datetime!(2025-12-15 0:00 UTC), w),
            CertStatus::Expiring
        );
        assert_eq!(
            e.status(datetime!(2026-01-01 0:00 UTC), w),
            CertStatus::Expired
        );
        let mut s = e.clone();
        s.superseded = Some(Supersession {
            at: datetime!(2025-02-01 0:00 UTC),
            by: None,
        });
        assert_eq!(
            s.status(datetime!(2025-06-01 0:00 UTC), w),
            CertStatus::Superseded
        );
        let mut r = e;
        r.revoked = Some(Revocation {
            at: datetime!(2025-02-01 0:00 UTC),
            reason: RevocationReason::KeyCompromise,
            actor: "a".into(),
        });
        assert_eq!(
            r.status(datetime!(2025-06-01 0:00 UTC), w),
            CertStatus::Revoked
        );
    }

    #[test]
    fn record_json_is_flat() {
        let rec = CertificateRecord {
            entry: entry(),
            status: CertStatus::Valid,
        };
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["serial"], "01");
        assert_eq!(v["status"], "valid");
        assert_eq!(v["not_after"], "2026-01-01T00:00:00Z");
        let back: CertificateRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, rec);
    }
}
