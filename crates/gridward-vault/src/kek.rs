//! The key-encryption key: from a key file or a passphrase; it wraps the data keys.
//!
//! ## The key file
//!
//! ```text
//! # Gridward key-encryption key. Keep it secret; back it up apart from the data.
//! gridward-kek-v1 <64 hex digits>
//! ```
//!
//! Created with mode 0600 and refused when group or others may read it (as ssh does).
//!
//! ## The passphrase
//!
//! Argon2id (RFC 9106) over the passphrase and a 16-byte random salt kept with the wrapped
//! keys; [`KdfParams::DEFAULT`] is 64 MiB, 3 passes, 1 lane (RFC 9106's second recommended
//! option uses 64 MiB); anything below OWASP's minimum (19 MiB, 2 passes) is refused.

use std::io::Write;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use zeroize::Zeroizing;

use crate::error::VaultError;
use crate::keyring::DataKey;

/// The first word of a key file's key line.
const KEY_FILE_TAG: &str = "gridward-kek-v1";
/// Version byte of a wrapped data key.
const WRAP_VERSION: u8 = 1;
/// Length of a wrapped data key: version, nonce, 32-byte key, tag.
pub const WRAPPED_LEN: usize = 1 + NONCE_LEN + 32 + 16;

/// A key-encryption key's fingerprint: the first 16 bytes of HMAC-SHA-256 under the key of a
/// fixed label. It names the key (in the database, in errors) without revealing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 16]);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// How a key-encryption key was made, as recorded beside the wrapped keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    /// Random, kept in a key file.
    KeyFile,
    /// Argon2id over a passphrase with this salt and these parameters.
    Argon2id {
        /// The salt.
        salt: [u8; 16],
        /// The parameters.
        params: KdfParams,
    },
}

/// Argon2id parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes, 1 lane.
    pub const DEFAULT: Self = Self {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };

    /// Checks the parameters are at least OWASP's minimum (19 MiB, 2 passes, 1 lane).
    ///
    /// # Errors
    ///
    /// [`VaultError::WeakKdf`].
    pub fn check(self) -> Result<Self, VaultError> {
        if self.m_kib < 19 * 1024 {
            return Err(VaultError::WeakKdf("less than 19 MiB of memory"));
        }
        if self.t < 2 {
            return Err(VaultError::WeakKdf("fewer than 2 passes"));
        }
        if self.p == 0 || self.p > 16 {
            return Err(VaultError::WeakKdf("lanes must be 1 to 16"));
        }
        Ok(self)
    }
}

/// The key-encryption key (see the [module documentation](self)).
pub struct Kek {
    key: LessSafeKey,
    fingerprint: Fingerprint,
    kdf: Kdf,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek")
            .field("fingerprint", &self.fingerprint)
            .field("kdf", &self.kdf)
            .finish_non_exhaustive()
    }
}

impl Kek {
    fn from_bytes(bytes: &[u8; 32], kdf: Kdf) -> Result<Self, VaultError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| VaultError::Crypto("AES-256-GCM key"))?;
        let mac = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, bytes),
            b"gridward/kek-fingerprint/v1",
        );
        let mut fingerprint = [0; 16];
        fingerprint.copy_from_slice(&mac.as_ref()[..16]);
        Ok(Self {
            key: LessSafeKey::new(key),
            fingerprint: Fingerprint(fingerprint),
            kdf,
        })
    }

    /// A new random key, held only in memory (tests, in-memory stores).
    ///
    /// # Errors
    ///
    /// [`VaultError::Crypto`] if the random generator fails.
    pub fn generate() -> Result<Self, VaultError> {
        let bytes = random_key()?;
        Self::from_bytes(&bytes, Kdf::KeyFile)
    }

    /// Creates a key file at `path` (mode 0600, never overwriting) holding a new random key.
    ///
    /// # Errors
    ///
    /// [`VaultError::KeyFileExists`], [`VaultError::Io`], [`VaultError::Crypto`].
    pub fn create_file(path: &Path) -> Result<Self, VaultError> {
        let bytes = random_key()?;
        let text = Zeroizing::new(format!(
            "# Gridward key-encryption key. Keep it secret; back it up apart from the data:\n\
             # without it the readings in the database cannot be decrypted.\n\
             {KEY_FILE_TAG} {}\n",
            hex::encode(*bytes)
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let io = |action| {
            move |source| VaultError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                VaultError::KeyFileExists(path.to_owned())
            } else {
                io("creating")(e)
            }
        })?;
        file.write_all(text.as_bytes()).map_err(io("writing"))?;
        file.sync_all().map_err(io("syncing"))?;
        Self::from_bytes(&bytes, Kdf::KeyFile)
    }

    /// Loads the key file at `path`.
    ///
    /// # Errors
    ///
    /// [`VaultError::Io`] (missing, unreadable), [`VaultError::InsecurePermissions`],
    /// [`VaultError::MalformedKeyFile`].
    pub fn load(path: &Path) -> Result<Self, VaultError> {
        let io = |action| {
            move |source| VaultError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(io("reading"))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(VaultError::InsecurePermissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io("reading"))?);
        let malformed = |reason| VaultError::MalformedKeyFile {
            path: path.to_owned(),
            reason,
        };
        let mut key_line = None;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if key_line.replace(line).is_some() {
                return Err(malformed("more than one key line"));
            }
        }
        let line = key_line.ok_or_else(|| malformed("no key line"))?;
        let hex_key = line
            .strip_prefix(KEY_FILE_TAG)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or_else(|| malformed("the key line does not start with `gridward-kek-v1 `"))?;
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_key.trim(), &mut bytes[..])
            .map_err(|_| malformed("the key is not 64 hex digits"))?;
        Self::from_bytes(&bytes, Kdf::KeyFile)
    }

    /// Derives the key from `passphrase` with Argon2id, `salt` and `params`.
    ///
    /// # Errors
    ///
    /// [`VaultError::EmptyPassphrase`], [`VaultError::WeakKdf`], [`VaultError::Crypto`].
    pub fn from_passphrase(
        passphrase: &[u8],
        salt: [u8; 16],
        params: KdfParams,
    ) -> Result<Self, VaultError> {
        if passphrase.is_empty() {
            return Err(VaultError::EmptyPassphrase);
        }
        let params = params.check()?;
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
                .map_err(|_| VaultError::WeakKdf("parameters out of Argon2's range"))?,
        );
        let mut bytes = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase, &salt, &mut bytes[..])
            .map_err(|_| VaultError::Crypto("Argon2id"))?;
        Self::from_bytes(&bytes, Kdf::Argon2id { salt, params })
    }

    /// A new random salt for [`Kek::from_passphrase`].
    ///
    /// # Errors
    ///
    /// [`VaultError::Crypto`] if the random generator fails.
    pub fn new_salt() -> Result<[u8; 16], VaultError> {
        let mut salt = [0; 16];
        aws_lc_rs::rand::fill(&mut salt).map_err(|_| VaultError::Crypto("random salt"))?;
        Ok(salt)
    }

    /// The key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// How the key was made.
    pub fn kdf(&self) -> Kdf {
        self.kdf
    }

    /// Wraps a data key's bytes (AES-256-GCM, its id as associated data): [`WRAPPED_LEN`] bytes.
    ///
    /// # Errors
    ///
    /// [`VaultError::Crypto`].
    pub fn wrap(&self, id: u32, key: &[u8; 32]) -> Result<Vec<u8>, VaultError> {
        let mut nonce = [0; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| VaultError::Crypto("random nonce"))?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.push(WRAP_VERSION);
        out.extend_from_slice(&nonce);
        let mut body = key.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(id)),
                &mut body,
            )
            .map_err(|_| VaultError::Crypto("wrapping a data key"))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Unwraps data key `id`.
    ///
    /// # Errors
    ///
    /// [`VaultError::Unwrap`]: wrong key-encryption key, or the wrapped key was altered.
    pub fn unwrap_key(&self, id: u32, wrapped: &[u8]) -> Result<DataKey, VaultError> {
        let raw = self.unwrap_raw(id, wrapped)?;
        DataKey::from_bytes(id, &raw)
    }

    /// Unwraps data key `id` to its bytes (to wrap them under another key-encryption key).
    ///
    /// # Errors
    ///
    /// [`VaultError::Unwrap`]: wrong key-encryption key, or the wrapped key was altered.
    pub fn unwrap_raw(&self, id: u32, wrapped: &[u8]) -> Result<Zeroizing<[u8; 32]>, VaultError> {
        if wrapped.len() != WRAPPED_LEN || wrapped[0] != WRAP_VERSION {
            return Err(VaultError::Unwrap { id });
        }
        let mut nonce = [0; NONCE_LEN];
        nonce.copy_from_slice(&wrapped[1..1 + NONCE_LEN]);
        let mut body = Zeroizing::new(wrapped[1 + NONCE_LEN..].to_vec());
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(id)),
                &mut body,
            )
            .map_err(|_| VaultError::Unwrap { id })?;
        let mut out = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(VaultError::Unwrap { id });
        }
        out.copy_from_slice(plain);
        Ok(out)
    }
}

fn wrap_aad(id: u32) -> [u8; 19] {
    let mut aad = [0; 19];
    aad[..15].copy_from_slice(b"gridward/dek/v1");
    aad[15..].copy_from_slice(&id.to_be_bytes());
    aad
}

/// 32 random bytes, wiped when dropped.
pub(crate) fn random_key() -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(&mut bytes[..]).map_err(|_| VaultError::Crypto("random key"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_created_0600_once_and_loads_to_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gridward.key");
        let made = Kek::create_file(&path).unwrap();
        assert!(matches!(
            Kek::create_file(&path),
            Err(VaultError::KeyFileExists(_))
        ));
        let loaded = Kek::load(&path).unwrap();
        assert_eq!(made.fingerprint(), loaded.fingerprint());
        let wrapped = made.wrap(7, &[9; 32]).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        loaded.unwrap_key(7, &wrapped).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            assert!(matches!(
                Kek::load(&path),
                Err(VaultError::InsecurePermissions { mode: 0o640, .. })
            ));
        }
    }

    #[test]
    fn malformed_key_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("", "no key line"),
            ("# only a comment\n", "no key line"),
            (
                "gridward-kek-v2 00\n",
                "the key line does not start with `gridward-kek-v1 `",
            ),
            ("gridward-kek-v1 abcd\n", "the key is not 64 hex digits"),
            (
                "gridward-kek-v1 zz00000000000000000000000000000000000000000000000000000000000000\n",
                "the key is not 64 hex digits",
            ),
            (
                "gridward-kek-v1 0000000000000000000000000000000000000000000000000000000000000000\n\
                 gridward-kek-v1 0000000000000000000000000000000000000000000000000000000000000000\n",
                "more than one key line",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("k{i}"));
            std::fs::write(&path, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            match Kek::load(&path) {
                Err(VaultError::MalformedKeyFile { reason, .. }) => assert_eq!(reason, *want),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(
            Kek::load(&dir.path().join("missing")),
            Err(VaultError::Io { .. })
        ));
    }

    #[test]
    fn a_passphrase_derives_the_same_key_from_the_same_salt_only() {
        let params = KdfParams {
            m_kib: 19 * 1024,
            t: 2,
            p: 1,
        };
        let salt = Kek::new_salt().unwrap();
        let a = Kek::from_passphrase(b"correct horse", salt, params).unwrap();
        let b = Kek::from_passphrase(b"correct horse", salt, params).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = Kek::from_passphrase(b"correct horse", Kek::new_salt().unwrap(), params).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
        let d = Kek::from_passphrase(b"correct horsf", salt, params).unwrap();
        let wrapped = a.wrap(1, &[3; 32]).unwrap();
        b.unwrap_key(1, &wrapped).unwrap();
        assert!(matches!(
            d.unwrap_key(1, &wrapped),
            Err(VaultError::Unwrap { id: 1 })
        ));
        assert!(matches!(
            Kek::from_passphrase(b"", salt, params),
            Err(VaultError::EmptyPassphrase)
        ));
        assert!(matches!(
            Kek::from_passphrase(
                b"x",
                salt,
                KdfParams {
                    m_kib: 1024,
                    t: 2,
                    p: 1
                }
            ),
            Err(VaultError::WeakKdf(_))
        ));
        assert!(matches!(
            Kek::from_passphrase(
                b"x",
                salt,
                KdfParams {
                    m_kib: 19456,
                    t: 1,
                    p: 1
                }
            ),
            Err(VaultError::WeakKdf(_))
        ));
    }

    #[test]
    fn a_wrapped_key_unwraps_only_under_its_id_and_unaltered() {
        let kek = Kek::generate().unwrap();
        let wrapped = kek.wrap(5, &[1; 32]).unwrap();
        assert!(matches!(
            kek.unwrap_key(6, &wrapped),
            Err(VaultError::Unwrap { id: 6 })
        ));
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x01;
            assert!(kek.unwrap_key(5, &bad).is_err(), "byte {i}");
        }
        assert!(kek.unwrap_key(5, &wrapped[..10]).is_err());
        let other = Kek::generate().unwrap();
        assert!(other.unwrap_key(5, &wrapped).is_err());
        assert_ne!(kek.fingerprint(), other.fingerprint());
    }
}
