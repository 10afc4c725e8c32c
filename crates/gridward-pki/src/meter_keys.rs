//! The meter key directory: which keys may have signed a meter's envelope right now.
//!
//! A data concentrator relays meters' own envelopes; the head-end verifies each with the key of
//! the meter it names, which it cannot take from a TLS handshake (the concentrator connected,
//! not the meter). [`Pki::meter_keys`] reads them from the inventory: every meter certificate
//! that is valid at `now` and not revoked, the current one and, during a renewal overlap, the
//! superseded ones still within their validity (a meter that has not picked up its new
//! certificate yet still signs with the old key, as it still connects with it).

use std::collections::HashMap;
use std::sync::Arc;

use gridward_core::MeterId;
use time::OffsetDateTime;

use crate::ca::{CertFacts, Pki, load_cert};
use crate::error::PkiError;
use crate::inventory::CertKind;
use crate::oplog;
use crate::profile::LeafKind;

/// One key a meter may sign with: one of its valid certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterKey {
    /// The certificate's serial, in the inventory's hex form.
    pub serial: String,
    /// The certificate's DER SubjectPublicKeyInfo (what
    /// `gridward_core::envelope::VerifyingKey::from_spki_der` takes).
    pub spki_der: Arc<[u8]>,
    /// When the certificate expires.
    pub not_after: OffsetDateTime,
}

/// The valid keys of every meter at one instant ([`Pki::meter_keys`]).
#[derive(Debug, Clone, Default)]
pub struct MeterKeys {
    keys: HashMap<MeterId, Vec<MeterKey>>,
}

impl MeterKeys {
    /// The keys of `meter`, the latest-expiring (normally the current certificate) first;
    /// empty if it has no valid certificate.
    pub fn get(&self, meter: &MeterId) -> &[MeterKey] {
        self.keys.get(meter).map_or(&[], Vec::as_slice)
    }

    /// How many meters have at least one valid key.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no meter has a valid key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl Pki {
    /// The key directory at `now`: for every meter, the keys of its certificates that are
    /// within their validity (`not_before <= now < not_after`) and not revoked, current or
    /// superseded. Reads the inventory and one certificate file per key; cheap enough to call
    /// at start and on every reload.
    ///
    /// # Errors
    ///
    /// The inventory cannot be read, or a certificate file is missing, unreadable or not the
    /// certificate the inventory records.
    pub fn meter_keys(&self, now: OffsetDateTime) -> Result<MeterKeys, PkiError> {
        let inv = self.load_inventory()?;
        let mut keys: HashMap<MeterId, Vec<MeterKey>> = HashMap::new();
        for entry in &inv.certificates {
            if entry.kind != CertKind::Meter
                || entry.revoked.is_some()
                || now < entry.not_before
                || now >= entry.not_after
            {
                continue;
            }
            let meter = MeterId::new(&entry.name)?;
            let path = if entry.superseded.is_some() {
                self.layout().archived_cert(&entry.serial)
            } else {
                self.layout().leaf_cert(LeafKind::Meter, &entry.name)
            };
            let der = load_cert(
                &path,
                "a meter certificate recorded in the inventory is missing; restore the PKI directory from a backup",
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
            let facts = CertFacts::read(&der, &path)?;
            keys.entry(meter).or_default().push(MeterKey {
                serial: entry.serial.clone(),
                spki_der: Arc::from(facts.spki_raw),
                not_after: entry.not_after,
            });
        }
        for list in keys.values_mut() {
            list.sort_by_key(|b| std::cmp::Reverse(b.not_after));
        }
        Ok(MeterKeys { keys })
    }
}
