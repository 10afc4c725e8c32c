//! The audit key (Ed25519) that signs checkpoints, and the verifier key string that checks
//! them.
//!
//! The verifier key is the `golang.org/x/mod/sumdb/note` format: `NAME+KEYID+KEY`, where
//! `KEYID` is 8 lowercase hex digits, the first 4 bytes of
//! `SHA-256(NAME || "\n" || 0x01 || public key)`, and `KEY` is the standard, padded base64 of
//! `0x01 || public key` (0x01 is the signature type Ed25519 of C2SP signed-note).
//! A verifier key names the key and carries its public half: give it to whoever keeps your
//! checkpoints.
//!
//! The private key is kept as an unencrypted PKCS#8 PEM file (`-----BEGIN PRIVATE KEY-----`,
//! as `openssl genpkey -algorithm ed25519` writes it), mode 0600.
//! [`AuditKey::load_or_create`] is the only function of the crate's core that touches the file
//! system besides [`crate::AuditLog`].

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

/// The signature type byte of Ed25519 in C2SP signed-note.
pub const ALG_ED25519: u8 = 0x01;

/// Why a key cannot be made, read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be read, created or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file is readable or writable by others than its owner.
    #[error("{} has mode {mode:o}; an audit key must be 0600", path.display())]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The text is not PEM with a `PRIVATE KEY` block.
    #[error("not a PEM PRIVATE KEY: {0}")]
    BadPem(String),
    /// The PEM block is not an unencrypted PKCS#8 Ed25519 private key.
    #[error("not an unencrypted PKCS#8 Ed25519 private key")]
    NotEd25519,
    /// The system could not generate or serialise a key.
    #[error("key generation failed")]
    Generate,
    /// A key name is empty or holds whitespace or `+`.
    #[error("key name {0:?} is empty or holds whitespace or '+'")]
    BadName(String),
    /// A verifier key string is not `NAME+KEYID+KEY`.
    #[error("verifier key is malformed: {0}")]
    MalformedVerifier(&'static str),
    /// A verifier key is of another algorithm than Ed25519.
    #[error("verifier key algorithm {0:#04x} is not Ed25519 (0x01)")]
    UnsupportedAlgorithm(u8),
    /// A verifier key's key id does not match its name and key.
    #[error("verifier key id {found} does not match its name and key (expected {expected})")]
    KeyIdMismatch {
        /// The id the string carries.
        found: String,
        /// The id computed from its name and key.
        expected: String,
    },
}

/// The head-end's audit key: an Ed25519 private key.
///
/// Its `Debug` output shows the public key only.
pub struct AuditKey {
    pair: Ed25519KeyPair,
}

impl AuditKey {
    /// A new random key.
    ///
    /// # Errors
    ///
    /// [`KeyError::Generate`].
    pub fn generate() -> Result<Self, KeyError> {
        Ed25519KeyPair::generate()
            .map(|pair| Self { pair })
            .map_err(|_| KeyError::Generate)
    }

    /// The key from its 32-byte seed (for test vectors; use [`AuditKey::generate`] otherwise).
    ///
    /// # Errors
    ///
    /// [`KeyError::NotEd25519`].
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, KeyError> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .map(|pair| Self { pair })
            .map_err(|_| KeyError::NotEd25519)
    }

    /// The key as an unencrypted PKCS#8 v1 PEM (`-----BEGIN PRIVATE KEY-----`).
    ///
    /// # Errors
    ///
    /// [`KeyError::Generate`] if the key cannot be serialised.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let der = self.pair.to_pkcs8v1().map_err(|_| KeyError::Generate)?;
        Ok(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            der.as_ref().to_vec(),
        )))
    }

    /// Reads an unencrypted PKCS#8 (v1 or v2) Ed25519 private key from PEM.
    ///
    /// # Errors
    ///
    /// [`KeyError::BadPem`], [`KeyError::NotEd25519`].
    pub fn from_pkcs8_pem(text: &str) -> Result<Self, KeyError> {
        let block = pem::parse(text).map_err(|e| KeyError::BadPem(e.to_string()))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(KeyError::BadPem(format!("found a {} block", block.tag())));
        }
        Ed25519KeyPair::from_pkcs8(block.contents())
            .map(|pair| Self { pair })
            .map_err(|_| KeyError::NotEd25519)
    }

    /// Loads the key at `path`, or creates a new one there (mode 0600, never overwriting a file
    /// that appears meanwhile). An existing file readable or writable by group or others is
    /// refused.
    ///
    /// # Errors
    ///
    /// [`KeyError::Io`], [`KeyError::InsecurePermissions`], and those of
    /// [`AuditKey::from_pkcs8_pem`] and [`AuditKey::generate`].
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |action: &'static str| {
            move |source: std::io::Error| KeyError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut file) => {
                let key = Self::generate()?;
                let pem = key.to_pkcs8_pem()?;
                file.write_all(pem.as_bytes()).map_err(io("writing"))?;
                file.sync_all().map_err(io("syncing"))?;
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(path)
                        .map_err(io("reading"))?
                        .permissions()
                        .mode()
                        & 0o777;
                    if mode & 0o077 != 0 {
                        return Err(KeyError::InsecurePermissions {
                            path: path.to_owned(),
                            mode,
                        });
                    }
                }
                let text = std::fs::read_to_string(path).map_err(io("reading"))?;
                Self::from_pkcs8_pem(&text)
            }
            Err(e) => Err(io("creating")(e)),
        }
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The verifier key under `name` (the checkpoints' origin, e.g. `gridward.example/audit`).
    ///
    /// # Errors
    ///
    /// [`KeyError::BadName`].
    pub fn verifier(&self, name: &str) -> Result<VerifierKey, KeyError> {
        check_name(name)?;
        Ok(VerifierKey::new(name, self.public_key()))
    }

    /// The Ed25519 signature of `message`.
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

/// A named Ed25519 public key that opens checkpoints: `NAME+KEYID+KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_id: [u8; 4],
    public_key: [u8; 32],
}

impl VerifierKey {
    fn new(name: &str, public_key: [u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            key_id: key_id(name, &public_key),
            public_key,
        }
    }

    /// Parses `NAME+KEYID+KEY` (see the module documentation); surrounding whitespace is
    /// ignored.
    ///
    /// # Errors
    ///
    /// [`KeyError::MalformedVerifier`], [`KeyError::BadName`],
    /// [`KeyError::UnsupportedAlgorithm`], [`KeyError::KeyIdMismatch`].
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let (name, rest) = text
            .split_once('+')
            .ok_or(KeyError::MalformedVerifier("no '+' after the name"))?;
        check_name(name)?;
        let (id_hex, key_b64) = rest
            .split_once('+')
            .ok_or(KeyError::MalformedVerifier("no '+' after the key id"))?;
        if id_hex.len() != 8 || !id_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::MalformedVerifier("key id is not 8 hex digits"));
        }
        let key = STANDARD
            .decode(key_b64)
            .map_err(|_| KeyError::MalformedVerifier("key is not standard padded base64"))?;
        let (&alg, public) = key
            .split_first()
            .ok_or(KeyError::MalformedVerifier("key is empty"))?;
        if alg != ALG_ED25519 {
            return Err(KeyError::UnsupportedAlgorithm(alg));
        }
        let public_key: [u8; 32] = public
            .try_into()
            .map_err(|_| KeyError::MalformedVerifier("Ed25519 key is not 32 bytes"))?;
        let parsed = Self::new(name, public_key);
        if !hex::encode(parsed.key_id).eq_ignore_ascii_case(id_hex) {
            return Err(KeyError::KeyIdMismatch {
                found: id_hex.to_owned(),
                expected: hex::encode(parsed.key_id),
            });
        }
        Ok(parsed)
    }

    /// The key's name: the origin of the checkpoints it opens.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 4-byte key id.
    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// Whether `sig` is this key's Ed25519 signature of `message`.
    pub(crate) fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.public_key)
            .verify(message, sig)
            .is_ok()
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut key = Vec::with_capacity(33);
        key.push(ALG_ED25519);
        key.extend_from_slice(&self.public_key);
        write!(
            f,
            "{}+{}+{}",
            self.name,
            hex::encode(self.key_id),
            STANDARD.encode(key)
        )
    }
}

/// The first 4 bytes of `SHA-256(name || "\n" || 0x01 || public_key)`.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public_key);
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// A key name: non-empty, no whitespace, no `+` (C2SP signed-note).
pub(crate) fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty()
        || name.contains('+')
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        Err(KeyError::BadName(name.to_owned()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The signer key of `golang.org/x/mod/sumdb/note`'s tests and documentation:
    /// `PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz`.
    pub(crate) const PETER_SKEY_B64: &str = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    /// Its verifier key.
    pub(crate) const PETER_VKEY: &str =
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";

    pub(crate) fn peter() -> AuditKey {
        let raw = STANDARD.decode(PETER_SKEY_B64).unwrap();
        assert_eq!(raw[0], ALG_ED25519);
        AuditKey::from_seed(&raw[1..].try_into().unwrap()).unwrap()
    }

    #[test]
    fn key_id_matches_the_go_note_vector() {
        let key = peter();
        let v = key.verifier("PeterNeumann").unwrap();
        assert_eq!(hex::encode(v.key_id()), "c74f20a3");
        assert_eq!(v.to_string(), PETER_VKEY);
        assert_eq!(VerifierKey::parse(PETER_VKEY).unwrap(), v);
        assert_eq!(
            key_id("PeterNeumann", &key.public_key()),
            [0xc7, 0x4f, 0x20, 0xa3]
        );
    }

    #[test]
    fn pem_round_trip() {
        let key = AuditKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = AuditKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        assert!(matches!(
            AuditKey::from_pkcs8_pem("nonsense"),
            Err(KeyError::BadPem(_))
        ));
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
        assert!(matches!(
            AuditKey::from_pkcs8_pem(&cert),
            Err(KeyError::BadPem(_))
        ));
        let junk = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3]));
        assert!(matches!(
            AuditKey::from_pkcs8_pem(&junk),
            Err(KeyError::NotEd25519)
        ));
    }

    #[test]
    fn load_or_create_writes_0600_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let a = AuditKey::load_or_create(&path).unwrap();
        let b = AuditKey::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                AuditKey::load_or_create(&path),
                Err(KeyError::InsecurePermissions { mode: 0o644, .. })
            ));
        }
        assert!(matches!(
            AuditKey::load_or_create(&dir.path().join("missing/dir/key")),
            Err(KeyError::Io { .. })
        ));
    }

    #[test]
    fn bad_verifier_keys_are_refused() {
        type Want = fn(&KeyError) -> bool;
        let cases: &[(&str, Want)] = &[
            ("PeterNeumann", |e| {
                matches!(e, KeyError::MalformedVerifier(_))
            }),
            ("PeterNeumann+c74f20a3", |e| {
                matches!(e, KeyError::MalformedVerifier(_))
            }),
            (
                "+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
                |e| matches!(e, KeyError::BadName(_)),
            ),
            (
                "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
                |e| matches!(e, KeyError::BadName(_)),
            ),
            (
                "PeterNeumann+c74f20+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
                |e| matches!(e, KeyError::MalformedVerifier(_)),
            ),
            (
                "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T",
                |e| matches!(e, KeyError::MalformedVerifier(_)),
            ),
            ("PeterNeumann+c74f20a3+", |e| {
                matches!(e, KeyError::MalformedVerifier(_))
            }),
            (
                "PeterNeumann+c74f20a3+Alpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
                |e| matches!(e, KeyError::UnsupportedAlgorithm(0x02)),
            ),
            (
                "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy",
                |e| matches!(e, KeyError::MalformedVerifier(_)),
            ),
            (
                "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
                |e| matches!(e, KeyError::KeyIdMismatch { .. }),
            ),
            (
                "PeterNeumanm+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
                |e| matches!(e, KeyError::KeyIdMismatch { .. }),
            ),
        ];
        for (text, want) in cases {
            let err = VerifierKey::parse(text).unwrap_err();
            assert!(want(&err), "{text}: {err:?}");
        }
        assert!(matches!(peter().verifier("a+b"), Err(KeyError::BadName(_))));
    }
}
