//! Key stores in and out of the PKI directory: PKCS#12 export and import, and the TLS material
//! ([`Pki::tls_material`]) the rustls builders in [`crate::tls`] take.

use std::path::PathBuf;

use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use time::OffsetDateTime;

use crate::ca::{CertFacts, OpCtx, Pki, cert_pem, flush, load_cert, verify_issued_by};
use crate::crl::CrlIssuer;
use crate::error::PkiError;
use crate::fsutil::{PRIVATE_MODE, PUBLIC_MODE, ensure_dir, read_file, write_atomic};
use crate::identity::{
    Identity, IdentityError, client_role_of, command_signer_name_of, identity_of,
};
use crate::inventory::{CertKind, InventoryEntry, Origin};
use crate::keys::{self, pem_block};
use crate::oplog::{self, Draft, LogAction};
use crate::profile::{LeafKind, validate_name};
use crate::{p12, tls};

/// Alias of the root CA in an exported trust store.
pub const TRUST_ALIAS_ROOT: &str = "gridward-root-ca";
/// Alias of the issuing CA in an exported trust store.
pub const TRUST_ALIAS_ISSUING: &str = "gridward-issuing-ca";

/// What [`Pki::import_p12`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Key entries written to leaf directories: kind, identity, serial, and whether the
    /// certificate was new to the inventory.
    pub keys: Vec<ImportedKey>,
    /// Trusted certificates written to `DIR/trusted/`.
    pub trusted: Vec<ImportedTrust>,
    /// Trusted entries skipped because they are this PKI's own CA certificates.
    pub skipped: Vec<String>,
}

/// A key entry imported by [`Pki::import_p12`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedKey {
    /// The PKCS#12 alias.
    pub alias: String,
    /// Kind of leaf.
    pub kind: LeafKind,
    /// Identity.
    pub name: String,
    /// Serial (hex).
    pub serial: String,
    /// Whether the certificate was unknown to the inventory (otherwise its key was restored).
    pub new_to_inventory: bool,
}

/// A trusted certificate imported by [`Pki::import_p12`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedTrust {
    /// The PKCS#12 alias.
    pub alias: String,
    /// Where it was written.
    pub path: PathBuf,
    /// SHA-256 of its DER (hex).
    pub fingerprint: String,
}

/// A key entry checked and ready to be written.
struct PlannedKey {
    alias: String,
    kind: LeafKind,
    name: String,
    facts: CertFacts,
    leaf: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
    key_alg: String,
    role: Option<String>,
    known: Option<usize>,
}

/// A file-name-safe version of a PKCS#12 alias.
fn safe_alias(alias: &str, fingerprint: &str) -> String {
    let mut s: String = alias
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with(['.', '-']) {
        s.remove(0);
    }
    s.truncate(64);
    if s.is_empty() {
        fingerprint.chars().take(16).collect()
    } else {
        s
    }
}

impl Pki {
    /// The PKCS#12 key store of a leaf: its key, and the chain leaf → issuing CA → root CA, under
    /// the alias `name`. The key must be on disk ([`PkiError::NoPrivateKey`] otherwise).
    pub fn export_p12(
        &self,
        kind: LeafKind,
        name: &str,
        password: &str,
        actor: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, PkiError> {
        if password.is_empty() {
            return Err(PkiError::EmptyPassphrase);
        }
        validate_name(kind, name)?;
        let _lock = self.lock()?;
        let mut ctx = OpCtx::new(self.load_inventory()?);
        let index = ctx.current(kind, name).ok_or_else(|| PkiError::NotFound {
            what: format!("{kind} {name:?} (no current certificate)"),
        })?;
        let entry = ctx.inv.certificates[index].clone();
        let key_path = self.layout().leaf_key(kind, name);
        if !entry.key_on_disk || !key_path.exists() {
            return Err(PkiError::NoPrivateKey {
                kind,
                name: name.to_owned(),
            });
        }
        let key_pem = read_file(&key_path, "the private key is missing")?;
        let (_, key_der) = pem_block(&key_pem, |l| l == "PRIVATE KEY")
            .ok_or_else(|| PkiError::bad_file(&key_path, "no PKCS#8 PRIVATE KEY PEM block"))?;
        let leaf = load_cert(
            &self.layout().leaf_cert(kind, name),
            "the certificate is missing; re-issue it",
        )?;
        if oplog::sha256_hex(&leaf) != entry.fingerprint {
            return Err(PkiError::bad_file(
                self.layout().leaf_cert(kind, name),
                format!(
                    "is not certificate {} recorded in the inventory",
                    entry.serial
                ),
            ));
        }
        let chain = [
            leaf,
            self.issuing_certificate().clone(),
            self.root_certificate().clone(),
        ];
        // Keys written before version 1 was the rule may be version 2: export what every tool reads.
        let key_der = keys::interoperable_pkcs8(&key_der);
        let bytes = p12::export_key_store(name, &key_der, &chain, password)?;
        ctx.log(
            now,
            actor,
            LogAction::Export,
            Draft {
                kind: Some(kind.as_str().into()),
                identity: Some(name.to_owned()),
                serial: Some(entry.serial.clone()),
                fingerprint: Some(entry.fingerprint.clone()),
                detail: Some("PKCS#12 key store (key, leaf, issuing CA, root CA)".into()),
                ..Draft::default()
            },
        );
        flush(self.layout(), &mut ctx)?;
        Ok(bytes)
    }

    /// A PKCS#12 trust store holding the root CA and the issuing CA as trusted certificates
    /// (aliases [`TRUST_ALIAS_ROOT`] and [`TRUST_ALIAS_ISSUING`]).
    pub fn export_trust_store(
        &self,
        password: &str,
        actor: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<u8>, PkiError> {
        if password.is_empty() {
            return Err(PkiError::EmptyPassphrase);
        }
        let _lock = self.lock()?;
        let mut ctx = OpCtx::new(self.load_inventory()?);
        let certs = [
            (TRUST_ALIAS_ROOT.to_owned(), self.root_certificate().clone()),
            (
                TRUST_ALIAS_ISSUING.to_owned(),
                self.issuing_certificate().clone(),
            ),
        ];
        let bytes = p12::export_trust_store(&certs, password)?;
        for (alias, der) in &certs {
            let facts = CertFacts::read(der, &self.layout().ca_chain())?;
            ctx.log(
                now,
                actor,
                LogAction::Export,
                Draft {
                    kind: Some(
                        if alias == TRUST_ALIAS_ROOT {
                            "root-ca"
                        } else {
                            "issuing-ca"
                        }
                        .into(),
                    ),
                    serial: Some(facts.serial),
                    fingerprint: Some(facts.fingerprint),
                    detail: Some(format!("PKCS#12 trust store entry {alias}")),
                    ..Draft::default()
                },
            );
        }
        flush(self.layout(), &mut ctx)?;
        Ok(bytes)
    }

    /// Imports a PKCS#12 file.
    ///
    /// Key entries: the leaf certificate must have been issued by this PKI's issuing CA (issuer
    /// name and signature checked; [`PkiError::NotIssuedByThisCa`] otherwise), carry an identity
    /// ([`identity_of`]), and match the key ([`PkiError::KeyMismatch`]). Key, certificate and chain
    /// go to the leaf directory of that identity. A certificate already in the inventory gets its
    /// key restored unless it was revoked or superseded; an unknown one is added.
    /// Trusted-certificate entries go to `DIR/trusted/{alias}.crt.pem` (and so into the roots of
    /// [`Pki::tls_material`]); this PKI's own CA certificates are skipped.
    ///
    /// Every entry is checked before anything is written.
    pub fn import_p12(
        &self,
        bytes: &[u8],
        password: &str,
        actor: &str,
        now: OffsetDateTime,
    ) -> Result<ImportReport, PkiError> {
        let contents = p12::read(bytes, password)?;
        let _lock = self.lock()?;
        let mut ctx = OpCtx::new(self.load_inventory()?);
        let issuing_facts =
            CertFacts::read(self.issuing_certificate(), &self.layout().issuing_cert())?;

        // Check everything first.
        let mut planned = Vec::new();
        for entry in &contents.keys {
            let alias = entry.alias.clone();
            let leaf = entry
                .chain
                .first()
                .ok_or_else(|| PkiError::ImportNoCertificate {
                    alias: alias.clone(),
                })?
                .clone()
                .into_owned();
            let facts = CertFacts::read(&leaf, &PathBuf::from(format!("PKCS#12 entry {alias}")))
                .map_err(|e| PkiError::ImportBadCertificate {
                    alias: alias.clone(),
                    reason: e.to_string(),
                })?;
            if verify_issued_by(&leaf, self.issuing_certificate()).is_err() {
                return Err(PkiError::NotIssuedByThisCa {
                    alias,
                    subject: facts.subject,
                    issuing: issuing_facts.subject,
                });
            }
            let (kind, name) = match identity_of(&leaf) {
                Ok(Identity::Meter(id)) => (LeafKind::Meter, id.as_str().to_owned()),
                Ok(Identity::Client(name)) => (LeafKind::Client, name),
                Ok(Identity::Server(name)) => (LeafKind::Server, name),
                Ok(Identity::Concentrator(id)) => (LeafKind::Concentrator, id.as_str().to_owned()),
                Err(IdentityError::CommandSigner) => {
                    (LeafKind::CommandSigner, command_signer_name_of(&leaf)?)
                }
                Err(e) => return Err(e.into()),
            };
            validate_name(kind, &name)?;
            let key = KeyPair::try_from(entry.key_pkcs8_der.as_slice()).map_err(|e| {
                PkiError::UnsupportedKey {
                    reason: format!("entry {alias:?}: {e}"),
                }
            })?;
            if key.subject_public_key_info() != facts.spki_raw {
                return Err(PkiError::KeyMismatch { alias });
            }
            let key_alg = keys::describe_public_key(&facts.spki_raw)?;
            let known = ctx.inv.by_serial(&facts.serial);
            match known.map(|i| &ctx.inv.certificates[i]) {
                Some(e) if e.revoked.is_some() => {
                    return Err(PkiError::ImportStale {
                        alias,
                        serial: facts.serial,
                        status: "revoked",
                    });
                }
                Some(e) if e.superseded.is_some() => {
                    return Err(PkiError::ImportStale {
                        alias,
                        serial: facts.serial,
                        status: "superseded",
                    });
                }
                Some(_) => {}
                None => {
                    ctx.check_device_id(kind, &name)?;
                    if let Some(i) = ctx.current(kind, &name) {
                        let e = &ctx.inv.certificates[i];
                        if now < e.not_after {
                            return Err(PkiError::AlreadyIssued {
                                kind,
                                name,
                                serial: e.serial.clone(),
                                not_after: e.not_after,
                            });
                        }
                    }
                }
            }
            let role = if kind == LeafKind::Client {
                client_role_of(&leaf)?
            } else {
                None
            };
            planned.push(PlannedKey {
                alias,
                kind,
                name,
                facts,
                leaf,
                key_pkcs8: entry.key_pkcs8_der.clone(),
                key_alg,
                role,
                known,
            });
        }
        let own = [
            oplog::sha256_hex(self.root_certificate()),
            oplog::sha256_hex(self.issuing_certificate()),
        ];
        let mut trusted = Vec::new();
        let mut report = ImportReport::default();
        for (alias, der) in &contents.trusted {
            let facts = CertFacts::read(der, &PathBuf::from(format!("PKCS#12 entry {alias}")))
                .map_err(|e| PkiError::ImportBadCertificate {
                    alias: alias.clone(),
                    reason: e.to_string(),
                })?;
            if own.contains(&facts.fingerprint) {
                report.skipped.push(alias.clone());
                continue;
            }
            trusted.push((alias.clone(), der.clone().into_owned(), facts));
        }

        // Then write.
        for p in planned {
            let dir = self.layout().leaf_dir(p.kind, &p.name);
            ensure_dir(&dir, 0o755)?;
            write_atomic(
                &self.layout().leaf_key(p.kind, &p.name),
                keys::pkcs8_der_to_pem(&p.key_pkcs8).as_bytes(),
                PRIVATE_MODE,
                true,
            )?;
            let leaf_pem = cert_pem(&p.leaf);
            write_atomic(
                &self.layout().leaf_cert(p.kind, &p.name),
                leaf_pem.as_bytes(),
                PUBLIC_MODE,
                true,
            )?;
            let chain = format!("{leaf_pem}{}", cert_pem(self.issuing_certificate()));
            write_atomic(
                &self.layout().leaf_chain(p.kind, &p.name),
                chain.as_bytes(),
                PUBLIC_MODE,
                true,
            )?;
            match p.known {
                Some(i) => ctx.inv.certificates[i].key_on_disk = true,
                None => {
                    if let Some(i) = ctx.current(p.kind, &p.name) {
                        // The current certificate has expired (checked above): this one takes over.
                        ctx.inv.certificates[i].superseded = Some(crate::inventory::Supersession {
                            at: now,
                            by: Some(p.facts.serial.clone()),
                        });
                        ctx.forget_current(CertKind::from(p.kind), &p.name);
                    }
                    let days = (p.facts.not_after - p.facts.not_before)
                        .whole_days()
                        .clamp(1, i64::from(u32::MAX));
                    ctx.push_entry(InventoryEntry {
                        serial: p.facts.serial.clone(),
                        kind: p.kind.into(),
                        name: p.name.clone(),
                        subject: p.facts.subject.clone(),
                        sans: Vec::new(),
                        role: p.role.clone(),
                        key_alg: p.key_alg.clone(),
                        not_before: p.facts.not_before,
                        not_after: p.facts.not_after,
                        validity_days: u32::try_from(days).unwrap_or(u32::MAX),
                        fingerprint: p.facts.fingerprint.clone(),
                        issued_at: now,
                        issued_by: actor.to_owned(),
                        origin: Origin::Imported,
                        key_on_disk: true,
                        revoked: None,
                        superseded: None,
                    });
                }
            }
            ctx.log(
                now,
                actor,
                LogAction::Import,
                Draft {
                    kind: Some(p.kind.as_str().into()),
                    identity: Some(p.name.clone()),
                    serial: Some(p.facts.serial.clone()),
                    fingerprint: Some(p.facts.fingerprint.clone()),
                    detail: Some(format!(
                        "PKCS#12 key entry {:?}{}",
                        p.alias,
                        if p.known.is_some() {
                            ", key restored"
                        } else {
                            ", new to the inventory"
                        }
                    )),
                    ..Draft::default()
                },
            );
            report.keys.push(ImportedKey {
                alias: p.alias,
                kind: p.kind,
                name: p.name,
                serial: p.facts.serial,
                new_to_inventory: p.known.is_none(),
            });
        }
        if !trusted.is_empty() {
            ensure_dir(&self.layout().trusted_dir(), 0o755)?;
        }
        for (alias, der, facts) in trusted {
            let base = safe_alias(&alias, &facts.fingerprint);
            let mut path = self.layout().trusted_dir().join(format!("{base}.crt.pem"));
            if path.exists() {
                let same = load_cert(&path, "")
                    .map(|d| d.as_ref() == der.as_ref())
                    .unwrap_or(false);
                if !same {
                    let short: String = facts.fingerprint.chars().take(8).collect();
                    path = self
                        .layout()
                        .trusted_dir()
                        .join(format!("{base}-{short}.crt.pem"));
                }
            }
            write_atomic(&path, cert_pem(&der).as_bytes(), PUBLIC_MODE, true)?;
            ctx.log(
                now,
                actor,
                LogAction::Import,
                Draft {
                    kind: Some("trusted".into()),
                    identity: Some(facts.subject.clone()),
                    serial: Some(facts.serial.clone()),
                    fingerprint: Some(facts.fingerprint.clone()),
                    detail: Some(format!(
                        "trusted certificate entry {alias:?} -> {}",
                        path.display()
                    )),
                    ..Draft::default()
                },
            );
            report.trusted.push(ImportedTrust {
                alias,
                path,
                fingerprint: facts.fingerprint,
            });
        }
        flush(self.layout(), &mut ctx)?;
        Ok(report)
    }

    /// Everything a rustls endpoint of identity (`kind`, `name`) needs: its chain (leaf, issuing
    /// CA), its key, the roots (the root CA, plus every certificate in `DIR/trusted/*.pem`), and
    /// both CRLs. A missing CRL is an error ([`PkiError::CrlMissing`]): TLS fails closed.
    ///
    /// A command signer has no TLS material ([`PkiError::NotForTls`]).
    pub fn tls_material(&self, kind: LeafKind, name: &str) -> Result<tls::TlsMaterial, PkiError> {
        if !kind.is_tls() {
            return Err(PkiError::NotForTls { kind });
        }
        validate_name(kind, name)?;
        let hint = format!(
            "issue it first with `gridward pki issue {kind} --dir {}` (or import it)",
            self.dir().display()
        );
        let leaf = load_cert(&self.layout().leaf_cert(kind, name), &hint)?;
        let key_path = self.layout().leaf_key(kind, name);
        let key_pem = read_file(
            &key_path,
            "the certificate was made from a CSR, so its key is not here; export it from where the CSR was made",
        )?;
        let (_, key_der) = pem_block(&key_pem, |l| l == "PRIVATE KEY")
            .ok_or_else(|| PkiError::bad_file(&key_path, "no PKCS#8 PRIVATE KEY PEM block"))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));

        let mut roots = vec![self.root_certificate().clone()];
        let trusted_dir = self.layout().trusted_dir();
        if trusted_dir.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&trusted_dir)
                .map_err(PkiError::io("listing", &trusted_dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "pem"))
                .collect();
            files.sort();
            for path in files {
                let bytes = read_file(&path, "it was listed a moment ago; retry")?;
                let certs = CertificateDer::pem_slice_iter(&bytes)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| PkiError::bad_file(&path, format!("unreadable PEM: {e}")))?;
                if certs.is_empty() {
                    return Err(PkiError::bad_file(&path, "no CERTIFICATE PEM block"));
                }
                roots.extend(certs);
            }
        }

        let mut crls = Vec::new();
        for which in [CrlIssuer::Root, CrlIssuer::Issuing] {
            let path = match which {
                CrlIssuer::Root => self.layout().root_crl(),
                CrlIssuer::Issuing => self.layout().issuing_crl(),
            };
            if !path.exists() {
                return Err(PkiError::CrlMissing { path });
            }
            let bytes = read_file(&path, "run `gridward pki crl --dir DIR`")?;
            let crl = CertificateRevocationListDer::from_pem_slice(&bytes).map_err(|e| {
                PkiError::bad_file(&path, format!("no readable X509 CRL PEM block: {e}"))
            })?;
            crls.push(crl);
        }

        Ok(tls::TlsMaterial {
            chain: vec![leaf, self.issuing_certificate().clone()],
            key,
            roots,
            crls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_become_safe_file_names() {
        assert_eq!(safe_alias("My CA/1", "abcdef0123456789ff"), "My_CA_1");
        assert_eq!(safe_alias("..", "abcdef0123456789ff"), "abcdef0123456789");
        assert_eq!(safe_alias("-x", "ff"), "x");
    }
}
