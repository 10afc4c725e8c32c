//! Data keys, the keyring, and sealing values with associated data.
//!
//! A sealed value is `1 ‖ key id (u32, big-endian) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`. The
//! associated data is the 5-byte header followed by the [`Context`]'s encoding, so neither the
//! key id nor the row a value belongs to can be changed without the value failing to open.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

use crate::error::{OpenError, VaultError};
use crate::kek::{Kek, random_key};

/// Version byte of a sealed value.
const SEAL_VERSION: u8 = 1;
/// Header length: version and key id.
const HEADER_LEN: usize = 5;
/// Tag length of AES-256-GCM.
const TAG_LEN: usize = 16;
/// What sealing adds to a value's length.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// Most values one process seals under one data key before it asks for a rotation: 2³¹, half
/// of NIST SP 800-38D's bound for random 96-bit nonces, counted per process (a restart starts
/// again; the period rotation bounds the total).
pub const MAX_SEALS_PER_KEY: u64 = 1 << 31;

/// What a sealed value is: part of its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum Field {
    /// A reading's register value (f64, little-endian).
    ReadingValue = 1,
    /// A message's raw envelope (COSE_Sign1 with its document).
    Envelope = 2,
    /// A meter's last register (f64, little-endian), kept for the register-backwards check.
    LastRegister = 3,
    /// Anything else a caller seals (its own label in the context).
    Other = 4,
}

/// The associated data of a sealed value: the field, the meter and the counter it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// What the value is.
    pub field: Field,
    /// The meter (or another owner's id).
    pub owner: &'a str,
    /// The message counter (0 where there is none).
    pub counter: u64,
}

impl<'a> Context<'a> {
    /// The context of a message's `field`.
    pub fn message(field: Field, meter: &'a str, counter: u64) -> Self {
        Self {
            field,
            owner: meter,
            counter,
        }
    }

    fn encode(&self, header: &[u8; HEADER_LEN]) -> Vec<u8> {
        let owner = self.owner.as_bytes();
        let mut aad = Vec::with_capacity(HEADER_LEN + 17 + 1 + 8 + 8 + owner.len());
        aad.extend_from_slice(header);
        aad.extend_from_slice(b"gridward/seal/v1");
        aad.push(self.field as u8);
        aad.extend_from_slice(&(owner.len() as u64).to_be_bytes());
        aad.extend_from_slice(owner);
        aad.extend_from_slice(&self.counter.to_be_bytes());
        aad
    }
}

/// One data key: an AES-256-GCM key and its id.
pub struct DataKey {
    id: u32,
    key: LessSafeKey,
    sealed: AtomicU64,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl DataKey {
    pub(crate) fn from_bytes(id: u32, bytes: &[u8; 32]) -> Result<Self, VaultError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| VaultError::Crypto("AES-256-GCM key"))?;
        Ok(Self {
            id,
            key: LessSafeKey::new(key),
            sealed: AtomicU64::new(0),
        })
    }

    /// A new random data key with `id`, and its bytes wrapped by `kek` (to be stored).
    ///
    /// # Errors
    ///
    /// [`VaultError::Crypto`].
    pub fn generate(id: u32, kek: &Kek) -> Result<(Self, Vec<u8>), VaultError> {
        let bytes: Zeroizing<[u8; 32]> = random_key()?;
        let wrapped = kek.wrap(id, &bytes)?;
        Ok((Self::from_bytes(id, &bytes)?, wrapped))
    }

    /// The key's id.
    pub fn id(&self) -> u32 {
        self.id
    }
}

/// The data keys a store can use, by id, and the one new values are sealed with.
#[derive(Debug, Default)]
pub struct Keyring {
    keys: BTreeMap<u32, DataKey>,
    active: Option<u32>,
    /// Ids of destroyed keys: their values are gone on purpose, not unknown.
    destroyed: BTreeSet<u32>,
}

impl Keyring {
    /// An empty keyring: it opens nothing and seals nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` (replacing one with the same id); it becomes active if it is the newest.
    pub fn insert(&mut self, key: DataKey) {
        let id = key.id;
        self.keys.insert(id, key);
        if self.active.is_none_or(|a| id > a) {
            self.active = Some(id);
        }
    }

    /// Forgets key `id` (a destroyed key); if it was active, the newest remaining key is.
    pub fn remove(&mut self, id: u32) {
        self.keys.remove(&id);
        if self.active == Some(id) {
            self.active = self.keys.keys().next_back().copied();
        }
    }

    /// Records that key `id` was destroyed: its values open as [`OpenError::Destroyed`]
    /// rather than [`OpenError::UnknownKey`] (a key id nobody made: an altered header).
    pub fn mark_destroyed(&mut self, id: u32) {
        self.remove(id);
        self.destroyed.insert(id);
    }

    /// The active key's id.
    pub fn active(&self) -> Option<u32> {
        self.active
    }

    /// Whether key `id` is held.
    pub fn holds(&self, id: u32) -> bool {
        self.keys.contains_key(&id)
    }

    /// The ids of the keys held, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }

    /// Seals `plaintext` under the active key with `context` as associated data.
    ///
    /// # Errors
    ///
    /// [`OpenError::Seal`]: no active key, the key's seal budget
    /// ([`MAX_SEALS_PER_KEY`]) is spent, or the random generator failed.
    pub fn seal(&self, context: &Context<'_>, plaintext: &[u8]) -> Result<Vec<u8>, OpenError> {
        let id = self.active.ok_or(OpenError::Seal("no active data key"))?;
        let key = self
            .keys
            .get(&id)
            .ok_or(OpenError::Seal("no active data key"))?;
        if key.sealed.fetch_add(1, Ordering::Relaxed) >= MAX_SEALS_PER_KEY {
            return Err(OpenError::Seal(
                "the active data key sealed its budget of values: rotate it (`gridward keys rotate`)",
            ));
        }
        let mut header = [0; HEADER_LEN];
        header[0] = SEAL_VERSION;
        header[1..].copy_from_slice(&id.to_be_bytes());
        let mut nonce = [0; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| OpenError::Seal("random nonce"))?;
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let mut body = out.split_off(HEADER_LEN + NONCE_LEN);
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.encode(&header)),
                &mut body,
            )
            .map_err(|_| OpenError::Seal("AES-256-GCM"))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The data key a sealed value names.
    ///
    /// # Errors
    ///
    /// [`OpenError::Malformed`].
    pub fn key_id_of(sealed: &[u8]) -> Result<u32, OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError::Malformed("too short"));
        }
        if sealed[0] != SEAL_VERSION {
            return Err(OpenError::Malformed("unknown version"));
        }
        let mut id = [0; 4];
        id.copy_from_slice(&sealed[1..HEADER_LEN]);
        Ok(u32::from_be_bytes(id))
    }

    /// Opens a value sealed with `context`.
    ///
    /// # Errors
    ///
    /// [`OpenError::Malformed`], [`OpenError::Destroyed`], [`OpenError::UnknownKey`] (a key
    /// this keyring never held: an altered header or another database's value),
    /// [`OpenError::Authentication`] (altered, or another row's value).
    pub fn open(
        &self,
        context: &Context<'_>,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let id = Self::key_id_of(sealed)?;
        let key = self.keys.get(&id).ok_or(if self.destroyed.contains(&id) {
            OpenError::Destroyed(id)
        } else {
            OpenError::UnknownKey(id)
        })?;
        let mut header = [0; HEADER_LEN];
        header.copy_from_slice(&sealed[..HEADER_LEN]);
        let mut nonce = [0; NONCE_LEN];
        nonce.copy_from_slice(&sealed[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
        let mut body = Zeroizing::new(sealed[HEADER_LEN + NONCE_LEN..].to_vec());
        let len = key
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.encode(&header)),
                &mut body,
            )
            .map_err(|_| OpenError::Authentication { key_id: id })?
            .len();
        body.truncate(len);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[u32]) -> Keyring {
        let kek = Kek::generate().unwrap();
        let mut ring = Keyring::new();
        for &id in ids {
            ring.insert(DataKey::generate(id, &kek).unwrap().0);
        }
        ring
    }

    #[test]
    fn a_sealed_value_opens_with_its_context_only() {
        let ring = ring(&[1]);
        let ctx = Context::message(Field::ReadingValue, "meter-1", 42);
        let sealed = ring.seal(&ctx, &350.5f64.to_le_bytes()).unwrap();
        assert_eq!(sealed.len(), 8 + OVERHEAD);
        assert_eq!(&*ring.open(&ctx, &sealed).unwrap(), &350.5f64.to_le_bytes());
        for other in [
            Context::message(Field::ReadingValue, "meter-2", 42),
            Context::message(Field::ReadingValue, "meter-1", 43),
            Context::message(Field::Envelope, "meter-1", 42),
            Context::message(Field::ReadingValue, "meter-", 42),
        ] {
            assert_eq!(
                ring.open(&other, &sealed),
                Err(OpenError::Authentication { key_id: 1 }),
                "{other:?}"
            );
        }
    }

    #[test]
    fn every_altered_byte_is_detected() {
        let ring = ring(&[1, 2]);
        let ctx = Context::message(Field::Envelope, "m", 1);
        let sealed = ring.seal(&ctx, b"<EnergyUsageReport/>").unwrap();
        assert_eq!(Keyring::key_id_of(&sealed), Ok(2));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x80;
            assert!(ring.open(&ctx, &bad).is_err(), "byte {i}");
        }
        assert_eq!(
            ring.open(&ctx, &sealed[..OVERHEAD - 1]),
            Err(OpenError::Malformed("too short"))
        );
    }

    #[test]
    fn nonces_differ_and_old_keys_still_open_after_rotation() {
        let kek = Kek::generate().unwrap();
        let mut ring = Keyring::new();
        ring.insert(DataKey::generate(1, &kek).unwrap().0);
        let ctx = Context::message(Field::ReadingValue, "m", 1);
        let a = ring.seal(&ctx, b"x").unwrap();
        let b = ring.seal(&ctx, b"x").unwrap();
        assert_ne!(a, b);
        ring.insert(DataKey::generate(2, &kek).unwrap().0);
        assert_eq!(ring.active(), Some(2));
        let c = ring.seal(&ctx, b"y").unwrap();
        assert_eq!(Keyring::key_id_of(&c), Ok(2));
        assert_eq!(&*ring.open(&ctx, &a).unwrap(), b"x");
        // Destroying key 1 makes its values unreadable (crypto-shredding), not key 2's.
        ring.mark_destroyed(1);
        assert_eq!(ring.open(&ctx, &a), Err(OpenError::Destroyed(1)));
        let mut foreign = a.clone();
        foreign[1..5].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(ring.open(&ctx, &foreign), Err(OpenError::UnknownKey(7)));
        assert_eq!(&*ring.open(&ctx, &c).unwrap(), b"y");
        ring.remove(2);
        assert_eq!(
            ring.seal(&ctx, b"z"),
            Err(OpenError::Seal("no active data key"))
        );
    }

    #[test]
    fn a_value_from_another_keyring_does_not_open() {
        let a = ring(&[1]);
        let b = ring(&[1]);
        let ctx = Context::message(Field::ReadingValue, "m", 1);
        let sealed = a.seal(&ctx, b"v").unwrap();
        assert_eq!(
            b.open(&ctx, &sealed),
            Err(OpenError::Authentication { key_id: 1 })
        );
    }
}
