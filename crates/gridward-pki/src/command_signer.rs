//! Command signers: the head-end's command-signing certificates ([`LeafKind::CommandSigner`]),
//! as meters pin them ([`Pki::command_signers`]) and as the head-end picks the one it signs with
//! ([`Pki::current_command_signer`], [`Pki::command_signer_key_path`]).
//!
//! Issuance, renewal, revocation, PKCS#12 export and the inventory treat a command signer like
//! any other leaf; only its profile differs (see [`crate::profile`]).
//!
//! Rotation: issue the new certificate (`gridward pki issue command-signer NAME --replace`, or a
//! second name, or [`Pki::renew`]); the superseded certificate stays in
//! [`Pki::command_signers`] until it expires or is revoked, so meters can pin old and new at once
//! and commands already signed with the old key still verify. Its key is gone from the PKI
//! directory: the head-end signs only with the current certificate's key.

use std::path::PathBuf;

use rcgen::PublicKeyData;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::ca::{CertFacts, Pki, load_cert};
use crate::error::PkiError;
use crate::fsutil::read_file;
use crate::identity::command_signer_name_of;
use crate::inventory::{CertKind, InventoryEntry};
use crate::keys;
use crate::oplog;
use crate::profile::{LeafKind, validate_name};

/// One command-signer certificate that is neither revoked nor expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSignerCert {
    /// Its name (the CN; the directory `DIR/command-signers/{name}/`).
    pub name: String,
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// The certificate (DER).
    pub certificate: CertificateDer<'static>,
    /// Its public key as DER SubjectPublicKeyInfo (what `gridward_core`'s `VerifyingKey` loads).
    pub spki_der: Vec<u8>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Whether it is the current certificate of its name (not superseded by a newer one).
    pub current: bool,
    /// Whether its private key is in the PKI directory (only ever for a current certificate
    /// that was not made from a CSR).
    pub key_on_disk: bool,
}

impl CommandSignerCert {
    /// Whether `now` is within its validity (notBefore ≤ now < notAfter).
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

impl Pki {
    /// Every command-signer certificate that is not revoked and not expired at `now` (including
    /// superseded ones and ones whose validity has not begun yet), newest first (latest
    /// notBefore; among equal ones, the latest issued).
    ///
    /// This is the set a meter pins: during a rotation it holds the old and the new certificate.
    /// Each certificate is read from its file (`DIR/command-signers/{name}/cert.pem`, or
    /// `DIR/archive/{serial}.crt.pem` once superseded), checked against the inventory's
    /// fingerprint and against the command-signer profile ([`command_signer_name_of`]).
    pub fn command_signers(&self, now: OffsetDateTime) -> Result<Vec<CommandSignerCert>, PkiError> {
        let inv = self.load_inventory()?;
        let mut out = Vec::new();
        for entry in inv.certificates.iter().rev() {
            if entry.kind != CertKind::CommandSigner
                || entry.revoked.is_some()
                || now >= entry.not_after
            {
                continue;
            }
            out.push(self.command_signer_cert(entry)?);
        }
        // Stable: equal notBefore keeps the reversed inventory order (latest issued first).
        out.sort_by_key(|c| std::cmp::Reverse(c.not_before));
        Ok(out)
    }

    /// The certificate the head-end signs commands with at `now`: the newest current
    /// (not superseded), unrevoked command-signer certificate valid at `now`.
    ///
    /// Its key is at [`Pki::command_signer_key_path`]. [`PkiError::NotFound`] if there is none.
    pub fn current_command_signer(
        &self,
        now: OffsetDateTime,
    ) -> Result<CommandSignerCert, PkiError> {
        self.command_signers(now)?
            .into_iter()
            .find(|c| c.current && c.is_valid_at(now))
            .ok_or_else(|| PkiError::NotFound {
                what: format!(
                    "a valid command-signer certificate; issue one with `gridward pki issue command-signer --dir {} NAME`",
                    self.dir().display()
                ),
            })
    }

    /// Where the private key (PKCS#8 PEM, mode 0600) of command signer `name`'s current
    /// certificate is: `DIR/command-signers/{name}/key.pem`.
    ///
    /// Checks that the name has a current, unrevoked certificate ([`PkiError::NotFound`]),
    /// that the key is on disk ([`PkiError::NoPrivateKey`]: made from a CSR, or removed), and
    /// that it is the key of that certificate. The key is not decrypted or kept: the caller
    /// loads the file (e.g. with `gridward_core::envelope::SigningKey::from_pkcs8_pem`).
    pub fn command_signer_key_path(&self, name: &str) -> Result<PathBuf, PkiError> {
        let kind = LeafKind::CommandSigner;
        validate_name(kind, name)?;
        let inv = self.load_inventory()?;
        let entry = inv
            .certificates
            .iter()
            .rev()
            .find(|e| e.kind == CertKind::CommandSigner && e.name == name && e.is_current())
            .ok_or_else(|| PkiError::NotFound {
                what: format!("{kind} {name:?} (no current certificate)"),
            })?;
        let key_path = self.layout().leaf_key(kind, name);
        if !entry.key_on_disk || !key_path.exists() {
            return Err(PkiError::NoPrivateKey {
                kind,
                name: name.to_owned(),
            });
        }
        let cert = self.command_signer_cert(entry)?;
        let pem = read_file(
            &key_path,
            "the private key vanished; re-issue with --replace",
        )?;
        let key = keys::load_private_key(&key_path, &pem, None)?;
        if key.subject_public_key_info() != cert.spki_der {
            return Err(PkiError::bad_file(
                &key_path,
                format!(
                    "this key does not belong to certificate {} of {kind} {name:?}; re-issue with --replace",
                    cert.serial
                ),
            ));
        }
        Ok(key_path)
    }

    /// Reads and checks the certificate of one command-signer inventory entry.
    fn command_signer_cert(&self, entry: &InventoryEntry) -> Result<CommandSignerCert, PkiError> {
        let kind = LeafKind::CommandSigner;
        let current = entry.is_current();
        let path = if current {
            self.layout().leaf_cert(kind, &entry.name)
        } else {
            self.layout().archived_cert(&entry.serial)
        };
        let der = load_cert(
            &path,
            "the certificate file is missing; restore it from a backup, or revoke the certificate",
        )?;
        if oplog::sha256_hex(&der) != entry.fingerprint {
            return Err(PkiError::bad_file(
                &path,
                format!(
                    "is not certificate {} recorded in the inventory",
                    entry.serial
                ),
            ));
        }
        let cn = command_signer_name_of(&der)?;
        if cn != entry.name {
            return Err(PkiError::bad_file(
                &path,
                format!("names {cn:?}, the inventory says {:?}", entry.name),
            ));
        }
        let facts = CertFacts::read(&der, &path)?;
        Ok(CommandSignerCert {
            name: entry.name.clone(),
            serial: facts.serial,
            fingerprint: facts.fingerprint,
            certificate: der,
            spki_der: facts.spki_raw,
            not_before: facts.not_before,
            not_after: facts.not_after,
            current,
            key_on_disk: current && entry.key_on_disk,
        })
    }
}
