//! Revocation and certificate revocation lists: a CRL per issuer.
//!
//! `crl/issuing.crl.pem` is signed by the issuing CA and lists revoked leaves;
//! `crl/root.crl.pem` is signed by the root CA and lists a revoked issuing CA.
//! Each carries a CRL number that increases with every CRL written (kept in the inventory),
//! thisUpdate, nextUpdate and the issuer's key identifier (AKI).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, RevokedCertParams, SerialNumber,
    SigningKey,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use crate::ca::{OpCtx, Pki, flush, fmt_time, normalize_serial};
use crate::error::PkiError;
use crate::fsutil::{Layout, PUBLIC_MODE, pem_encode, write_atomic};
use crate::inventory::{CertKind, Revocation};
use crate::oplog::{self, Draft, LogAction};
use crate::profile::{LeafKind, check_validity, to_cert_time};

/// Default CRL lifetime (nextUpdate − thisUpdate), in days.
pub const DEFAULT_CRL_DAYS: u32 = 7;

/// Why a certificate was revoked (RFC 5280 §5.3.1; certificateHold is not supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevocationReason {
    /// No reason given.
    Unspecified,
    /// The private key was (or may have been) compromised.
    KeyCompromise,
    /// The CA's key was compromised.
    CaCompromise,
    /// The subject's affiliation changed.
    AffiliationChanged,
    /// Replaced by a newer certificate.
    Superseded,
    /// The device or service was taken out of operation.
    CessationOfOperation,
    /// The privilege to use the certificate was withdrawn.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// Every supported reason.
    pub const ALL: [Self; 7] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::CaCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::PrivilegeWithdrawn,
    ];

    /// The RFC 5280 name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "keyCompromise",
            Self::CaCompromise => "cACompromise",
            Self::AffiliationChanged => "affiliationChanged",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessationOfOperation",
            Self::PrivilegeWithdrawn => "privilegeWithdrawn",
        }
    }

    fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            Self::Unspecified => rcgen::RevocationReason::Unspecified,
            Self::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            Self::CaCompromise => rcgen::RevocationReason::CaCompromise,
            Self::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            Self::Superseded => rcgen::RevocationReason::Superseded,
            Self::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            Self::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A revocation reason name that is not supported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown revocation reason {0:?}: expected unspecified, keyCompromise, caCompromise, affiliationChanged, superseded, cessationOfOperation or privilegeWithdrawn"
)]
pub struct UnknownReason(pub String);

impl FromStr for RevocationReason {
    type Err = UnknownReason;
    /// Accepts the RFC names in any case, with or without `-`/`_` (`key-compromise`, `KeyCompromise`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = |v: &str| {
            v.chars()
                .filter(|c| !matches!(c, '-' | '_'))
                .collect::<String>()
                .to_ascii_lowercase()
        };
        let wanted = norm(s);
        Self::ALL
            .into_iter()
            .find(|r| norm(r.as_str()) == wanted)
            .ok_or_else(|| UnknownReason(s.to_owned()))
    }
}

/// Which CA a CRL belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrlIssuer {
    /// The root CA (its CRL covers the issuing CA).
    Root,
    /// The issuing CA (its CRL covers the leaves).
    Issuing,
}

impl CrlIssuer {
    fn kind(self) -> CertKind {
        match self {
            Self::Root => CertKind::RootCa,
            Self::Issuing => CertKind::IssuingCa,
        }
    }

    /// Whether an inventory entry of `kind` is listed in this issuer's CRL.
    fn covers(self, kind: CertKind) -> bool {
        match self {
            Self::Root => kind == CertKind::IssuingCa,
            Self::Issuing => kind.leaf().is_some(),
        }
    }

    fn path(self, layout: &Layout) -> PathBuf {
        match self {
            Self::Root => layout.root_crl(),
            Self::Issuing => layout.issuing_crl(),
        }
    }
}

/// Which certificate to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    /// By serial (hex; colons, `0x` and any case accepted).
    Serial(String),
    /// The current certificate of an identity; with `kind: None`, whichever kind has one (an
    /// error if several do).
    Identity {
        /// The kind, if known.
        kind: Option<LeafKind>,
        /// Meter id or name.
        name: String,
    },
}

/// A CRL just written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// Whose CRL.
    pub issuer: CrlIssuer,
    /// Its CRL number.
    pub number: u64,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate.
    pub next_update: OffsetDateTime,
    /// Number of revoked certificates listed.
    pub revoked: usize,
    /// Where it was written.
    pub path: PathBuf,
}

/// The result of [`Pki::revoke`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Serial of the revoked certificate.
    pub serial: String,
    /// Its kind.
    pub kind: CertKind,
    /// Its identity.
    pub name: String,
    /// Why.
    pub reason: RevocationReason,
    /// The issuing CRL written afterwards.
    pub crl: CrlInfo,
}

/// The SubjectKeyIdentifier of a CA certificate.
fn subject_key_id(ca_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(ca_der).ok()?;
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

/// Builds, signs and writes the CRL of `which`, numbering it after the last one, and records it.
#[allow(clippy::too_many_arguments)] // an internal helper shared by init and Pki
pub(crate) fn write_crl_with(
    layout: &Layout,
    ctx: &mut OpCtx,
    issuer: &Issuer<'_, impl SigningKey>,
    ca_der: &[u8],
    which: CrlIssuer,
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
    actor: &str,
) -> Result<CrlInfo, PkiError> {
    let this_update = to_cert_time(this_update);
    let next_update = to_cert_time(next_update);
    if next_update <= this_update {
        return Err(PkiError::InvalidCrlWindow {
            this_update,
            next_update,
        });
    }
    let number = match which {
        CrlIssuer::Root => ctx.inv.crl_numbers.root,
        CrlIssuer::Issuing => ctx.inv.crl_numbers.issuing,
    }
    .saturating_add(1);
    let mut revoked_certs = Vec::new();
    for c in ctx.inv.certificates.iter().filter(|c| which.covers(c.kind)) {
        let Some(r) = &c.revoked else { continue };
        let serial = hex::decode(&c.serial).map_err(|_| {
            PkiError::bad_file(
                layout.inventory(),
                format!("serial {:?} is not hex", c.serial),
            )
        })?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: to_cert_time(r.at),
            reason_code: Some(r.reason.to_rcgen()),
            invalidity_date: None,
        });
    }
    let key_identifier_method = match subject_key_id(ca_der) {
        Some(ski) => KeyIdMethod::PreSpecified(ski),
        None => KeyIdMethod::Sha256,
    };
    let params = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method,
    };
    let count = params.revoked_certs.len();
    let crl = params.signed_by(issuer)?;
    let der = crl.der();
    let path = which.path(layout);
    write_atomic(
        &path,
        pem_encode("X509 CRL", der).as_bytes(),
        PUBLIC_MODE,
        true,
    )?;
    match which {
        CrlIssuer::Root => ctx.inv.crl_numbers.root = number,
        CrlIssuer::Issuing => ctx.inv.crl_numbers.issuing = number,
    }
    ctx.log(
        this_update,
        actor,
        LogAction::Crl,
        Draft {
            kind: Some(which.kind().as_str().into()),
            serial: Some(number.to_string()),
            fingerprint: Some(oplog::sha256_hex(der)),
            detail: Some(format!(
                "CRL number {number}, {count} revoked, next update {}",
                fmt_time(next_update)
            )),
            ..Draft::default()
        },
    );
    Ok(CrlInfo {
        issuer: which,
        number,
        this_update,
        next_update,
        revoked: count,
        path,
    })
}

impl Pki {
    /// Revokes a certificate and writes a new issuing CRL (valid [`DEFAULT_CRL_DAYS`] days).
    ///
    /// The issuing CA key is loaded before anything changes, so a missing passphrase leaves
    /// everything as it was. CA certificates cannot be revoked here.
    pub fn revoke(
        &self,
        target: &RevokeTarget,
        reason: RevocationReason,
        actor: &str,
        now: OffsetDateTime,
    ) -> Result<Revoked, PkiError> {
        let _lock = self.lock()?;
        let issuer = self.load_issuer(CrlIssuer::Issuing)?;
        let mut ctx = OpCtx::new(self.load_inventory()?);
        let index = match target {
            RevokeTarget::Serial(s) => {
                let serial = normalize_serial(s)?;
                ctx.inv
                    .by_serial(&serial)
                    .ok_or_else(|| PkiError::NotFound {
                        what: format!("serial {serial}"),
                    })?
            }
            RevokeTarget::Identity { kind, name } => {
                let kinds: Vec<LeafKind> = match kind {
                    Some(k) => vec![*k],
                    None => LeafKind::ALL.to_vec(),
                };
                let found: Vec<(LeafKind, usize)> = kinds
                    .into_iter()
                    .filter_map(|k| ctx.current(k, name).map(|i| (k, i)))
                    .collect();
                match found.as_slice() {
                    [] => {
                        let what = match kind {
                            Some(k) => format!("{k} {name:?} (no current certificate)"),
                            None => format!("{name:?} (no current certificate of any kind)"),
                        };
                        return Err(PkiError::NotFound { what });
                    }
                    [(_, i)] => *i,
                    many => {
                        return Err(PkiError::AmbiguousIdentity {
                            name: name.clone(),
                            kinds: many.iter().map(|(k, _)| *k).collect(),
                        });
                    }
                }
            }
        };
        let entry = &mut ctx.inv.certificates[index];
        if entry.kind.leaf().is_none() {
            return Err(PkiError::CannotRevokeCa {
                serial: entry.serial.clone(),
            });
        }
        if entry.revoked.is_some() {
            return Err(PkiError::AlreadyRevoked {
                serial: entry.serial.clone(),
            });
        }
        let was_current = entry.is_current();
        entry.revoked = Some(Revocation {
            at: now,
            reason,
            actor: actor.to_owned(),
        });
        let (serial, kind, name, fingerprint) = (
            entry.serial.clone(),
            entry.kind,
            entry.name.clone(),
            entry.fingerprint.clone(),
        );
        if was_current {
            ctx.forget_current(kind, &name);
        }
        ctx.log(
            now,
            actor,
            LogAction::Revoke,
            Draft {
                kind: Some(kind.as_str().into()),
                identity: Some(name.clone()),
                serial: Some(serial.clone()),
                fingerprint: Some(fingerprint),
                reason: Some(reason.as_str().into()),
                ..Draft::default()
            },
        );
        let crl = write_crl_with(
            self.layout(),
            &mut ctx,
            &issuer,
            self.issuing_certificate(),
            CrlIssuer::Issuing,
            now,
            now + Duration::days(DEFAULT_CRL_DAYS.into()),
            actor,
        )?;
        flush(self.layout(), &mut ctx)?;
        Ok(Revoked {
            serial,
            kind,
            name,
            reason,
            crl,
        })
    }

    /// The CRLs on disk now (root's, then issuing's), as read back from their files: what a
    /// server loading them would enforce. A running head-end uses this to warn before a CRL's
    /// nextUpdate passes (after which every handshake is refused: fail closed).
    pub fn current_crls(&self) -> Result<Vec<CrlInfo>, PkiError> {
        let mut out = Vec::with_capacity(2);
        for (issuer, path) in [
            (CrlIssuer::Root, self.layout().root_crl()),
            (CrlIssuer::Issuing, self.layout().issuing_crl()),
        ] {
            let bytes = std::fs::read(&path)
                .map_err(|e| PkiError::bad_file(path.clone(), e.to_string()))?;
            let der = <rustls_pki_types::CertificateRevocationListDer<'_> as rustls_pki_types::pem::PemObject>::from_pem_slice(&bytes)
                .map_err(|e| PkiError::bad_file(path.clone(), format!("not a PEM CRL: {e}")))?;
            let (_, crl) = x509_parser::parse_x509_crl(&der)
                .map_err(|e| PkiError::bad_file(path.clone(), format!("not a CRL: {e}")))?;
            let time = |t: x509_parser::time::ASN1Time| t.to_datetime();
            let next_update = crl
                .next_update()
                .map(time)
                .ok_or_else(|| PkiError::bad_file(path.clone(), "the CRL has no nextUpdate"))?;
            let number = crl
                .crl_number()
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0);
            out.push(CrlInfo {
                issuer,
                number,
                this_update: time(crl.last_update()),
                next_update,
                revoked: crl.iter_revoked_certificates().count(),
                path,
            });
        }
        Ok(out)
    }

    /// Writes both CRLs (root and issuing): thisUpdate = `now`, nextUpdate = `now` +
    /// `next_update_days`, each with the next CRL number.
    pub fn write_crls(
        &self,
        now: OffsetDateTime,
        next_update_days: u32,
        actor: &str,
    ) -> Result<Vec<CrlInfo>, PkiError> {
        let days = check_validity(next_update_days)?;
        let next = now + Duration::days(days.into());
        let _lock = self.lock()?;
        let root = self.load_issuer(CrlIssuer::Root)?;
        let issuing = self.load_issuer(CrlIssuer::Issuing)?;
        let mut ctx = OpCtx::new(self.load_inventory()?);
        let a = write_crl_with(
            self.layout(),
            &mut ctx,
            &root,
            self.root_certificate(),
            CrlIssuer::Root,
            now,
            next,
            actor,
        )?;
        let b = write_crl_with(
            self.layout(),
            &mut ctx,
            &issuing,
            self.issuing_certificate(),
            CrlIssuer::Issuing,
            now,
            next,
            actor,
        )?;
        flush(self.layout(), &mut ctx)?;
        Ok(vec![a, b])
    }

    /// Writes the CRL of one issuer with explicit thisUpdate and nextUpdate, which may both lie in
    /// the past: tests use this to produce an expired CRL (TLS must then fail closed).
    pub fn write_crl(
        &self,
        which: CrlIssuer,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
        actor: &str,
    ) -> Result<CrlInfo, PkiError> {
        let _lock = self.lock()?;
        let issuer = self.load_issuer(which)?;
        let ca = match which {
            CrlIssuer::Root => self.root_certificate(),
            CrlIssuer::Issuing => self.issuing_certificate(),
        };
        let mut ctx = OpCtx::new(self.load_inventory()?);
        let info = write_crl_with(
            self.layout(),
            &mut ctx,
            &issuer,
            ca,
            which,
            this_update,
            next_update,
            actor,
        )?;
        flush(self.layout(), &mut ctx)?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_parse_loosely() {
        assert_eq!("keyCompromise".parse(), Ok(RevocationReason::KeyCompromise));
        assert_eq!(
            "key-compromise".parse(),
            Ok(RevocationReason::KeyCompromise)
        );
        assert_eq!("CACompromise".parse(), Ok(RevocationReason::CaCompromise));
        assert_eq!("ca_compromise".parse(), Ok(RevocationReason::CaCompromise));
        assert_eq!(
            "cessation-of-operation".parse(),
            Ok(RevocationReason::CessationOfOperation)
        );
        assert_eq!(
            "certificateHold".parse::<RevocationReason>(),
            Err(UnknownReason("certificateHold".into()))
        );
        for r in RevocationReason::ALL {
            assert_eq!(r.as_str().parse(), Ok(r));
        }
    }
}
