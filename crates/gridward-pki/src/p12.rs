//! PKCS#12 key stores and trust stores that Java keytool (17 and later) and OpenSSL 3 read and write.
//!
//! Stores written here use what JDK 17 writes by default, with a higher iteration count:
//! certificates and keys encrypted with PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC, [`KDF_ITERATIONS`] iterations),
//! integrity by an HMAC-SHA256 MAC over the whole store.
//! Trust-store entries carry Oracle's trusted-key-usage attribute (`2.16.840.1.113894.746875.1.1` = anyExtendedKeyUsage),
//! which is what makes keytool list them as `trustedCertEntry`.
//!
//! [`read`] accepts stores from keytool (PBES2 or legacy PBE encryption, any SHA-1/SHA-2 MAC) and OpenSSL,
//! but refuses a store without a MAC: a password that authenticates nothing would let a swapped file pass unnoticed.

use std::collections::HashSet;
use std::fmt;

use p12_keystore::error::Error as KsError;
use p12_keystore::{
    Certificate, EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, Pkcs12ImportPolicy,
    PrivateKey, PrivateKeyChain,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use x509_parser::asn1_rs::{Any, FromDer, Sequence, Tag};

/// PBKDF2 and MAC iteration count of the stores written here (JDK 17 writes 10,000; OpenSSL 3 writes 2,048).
pub const KDF_ITERATIONS: u32 = 100_000;

/// Shortest store password accepted when writing: keytool refuses shorter ones for PKCS#12 stores.
pub const MIN_PASSWORD_CHARS: usize = 6;

/// Errors reading or writing PKCS#12 stores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum P12Error {
    /// The MAC does not verify: wrong password (or a store altered after it was written).
    #[error("wrong password, or the store was modified (MAC check failed)")]
    BadPassword,
    /// The store has no MAC, so its integrity cannot be checked; refused.
    #[error("the store has no integrity MAC")]
    NoMac,
    /// The bytes are not a well-formed PKCS#12 store.
    #[error("not a valid PKCS#12 store: {reason}")]
    Malformed {
        /// What the decoder reported.
        reason: String,
    },
    /// The store uses an encryption, MAC or bag type this crate does not support.
    #[error("unsupported PKCS#12 feature: {reason}")]
    Unsupported {
        /// What the decoder reported.
        reason: String,
    },
    /// The password given for a new store is too short for keytool.
    #[error("store password must have at least {min} characters")]
    ShortPassword {
        /// The minimum, [`MIN_PASSWORD_CHARS`].
        min: usize,
    },
    /// An alias is empty, holds a control character, or a character outside the Basic Multilingual Plane
    /// (PKCS#12 friendly names are BMPStrings).
    #[error("invalid alias {alias:?}: {reason}")]
    InvalidAlias {
        /// The alias.
        alias: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Two trust-store entries share an alias; keytool compares aliases case-insensitively.
    #[error("duplicate alias {0:?} (aliases are case-insensitive)")]
    DuplicateAlias(String),
    /// A key store needs at least the end-entity certificate.
    #[error("empty certificate chain")]
    EmptyChain,
    /// A trust store needs at least one certificate.
    #[error("empty trust store")]
    EmptyTrustStore,
    /// The private key is not a PKCS#8 key of a supported type (EC P-256/P-384/P-521, RSA, Ed25519).
    #[error("invalid private key: {reason}")]
    InvalidKey {
        /// What was wrong.
        reason: String,
    },
    /// A certificate does not parse as X.509.
    #[error("certificate {index} is not a valid X.509 certificate: {reason}")]
    InvalidCertificate {
        /// Position in the chain or trust list, from 0.
        index: usize,
        /// What the parser reported.
        reason: String,
    },
    /// The private key does not belong to the first certificate of the chain.
    #[error("the private key does not match the end-entity certificate")]
    KeyMismatch,
    /// Encoding the store failed.
    #[error("cannot encode the store: {reason}")]
    Encode {
        /// What the encoder reported.
        reason: String,
    },
}

/// What a store holds: key entries (with their chains) and trusted certificates.
#[derive(Debug)]
pub struct P12Contents {
    /// Private key entries (keytool's `PrivateKeyEntry`), by alias.
    pub keys: Vec<P12KeyEntry>,
    /// Trusted certificate entries (keytool's `trustedCertEntry`): alias and certificate.
    pub trusted: Vec<(String, CertificateDer<'static>)>,
}

/// One private key entry.
pub struct P12KeyEntry {
    /// The entry's alias (PKCS#12 friendly name).
    pub alias: String,
    /// The private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
    /// The certificate chain, end-entity first, as far as the store holds it.
    pub chain: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for P12KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P12KeyEntry")
            .field("alias", &self.alias)
            .field("key_pkcs8_der", &"[secret key elided]")
            .field("chain", &self.chain)
            .finish()
    }
}

/// Writes a key store with one `PrivateKeyEntry`: `key_pkcs8_der` under `alias`, with `chain` (end-entity first).
///
/// The key must match the end-entity certificate.
///
/// # Errors
///
/// [`P12Error::ShortPassword`], [`P12Error::InvalidAlias`], [`P12Error::EmptyChain`],
/// [`P12Error::InvalidKey`], [`P12Error::InvalidCertificate`], [`P12Error::KeyMismatch`], [`P12Error::Encode`].
pub fn export_key_store(
    alias: &str,
    key_pkcs8_der: &[u8],
    chain: &[CertificateDer<'_>],
    password: &str,
) -> Result<Vec<u8>, P12Error> {
    check_password(password)?;
    check_alias(alias)?;
    let Some(leaf) = chain.first() else {
        return Err(P12Error::EmptyChain);
    };
    let key = PrivateKey::from_der(key_pkcs8_der).map_err(|e| P12Error::InvalidKey {
        reason: e.to_string(),
    })?;
    let certs = parse_certs(chain.iter())?;
    check_key_matches(key_pkcs8_der, leaf)?;
    // keytool writes "Time <millis>", OpenSSL the SHA-1 of the certificate; any unique bytes will do.
    let local_key_id = Sha256::digest(leaf.as_ref()).to_vec();
    let mut store = KeyStore::new();
    store.add_entry(
        alias,
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(local_key_id, key, certs)),
    );
    write(&store, password)
}

/// Writes a trust store: each certificate as a `trustedCertEntry` under its alias.
///
/// # Errors
///
/// [`P12Error::ShortPassword`], [`P12Error::EmptyTrustStore`], [`P12Error::InvalidAlias`],
/// [`P12Error::DuplicateAlias`], [`P12Error::InvalidCertificate`], [`P12Error::Encode`].
pub fn export_trust_store(
    certs: &[(String, CertificateDer<'_>)],
    password: &str,
) -> Result<Vec<u8>, P12Error> {
    check_password(password)?;
    if certs.is_empty() {
        return Err(P12Error::EmptyTrustStore);
    }
    let mut seen = HashSet::new();
    let mut store = KeyStore::new();
    for (index, (alias, der)) in certs.iter().enumerate() {
        check_alias(alias)?;
        if !seen.insert(alias.to_lowercase()) {
            return Err(P12Error::DuplicateAlias(alias.clone()));
        }
        let cert = parse_cert(index, der)?;
        store.add_entry(alias, KeyStoreEntry::Certificate(cert));
    }
    write(&store, password)
}

/// Reads a PKCS#12 store: its key entries and its trusted certificates.
///
/// Certificates that are neither part of a key's chain nor marked trusted, keys without a certificate,
/// and secret-key entries are left out.
/// Nothing here verifies the chains: that is the job of whoever uses them.
///
/// # Errors
///
/// [`P12Error::BadPassword`] when the MAC does not verify, [`P12Error::NoMac`], [`P12Error::Malformed`],
/// [`P12Error::Unsupported`].
pub fn read(bytes: &[u8], password: &str) -> Result<P12Contents, P12Error> {
    require_mac(bytes)?;
    let store =
        KeyStore::from_pkcs12(bytes, password, Pkcs12ImportPolicy::Strict).map_err(read_error)?;
    let mut contents = P12Contents {
        keys: Vec::new(),
        trusted: Vec::new(),
    };
    for (alias, entry) in store.entries() {
        match entry {
            KeyStoreEntry::PrivateKeyChain(chain) => contents.keys.push(P12KeyEntry {
                alias: alias.clone(),
                key_pkcs8_der: chain.key().as_der().to_vec(),
                chain: chain
                    .certs()
                    .iter()
                    .map(|c| CertificateDer::from(c.as_der().to_vec()))
                    .collect(),
            }),
            KeyStoreEntry::Certificate(cert) => contents
                .trusted
                .push((alias.clone(), CertificateDer::from(cert.as_der().to_vec()))),
            KeyStoreEntry::Secret(_) => {}
        }
    }
    Ok(contents)
}

fn check_password(password: &str) -> Result<(), P12Error> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(P12Error::ShortPassword {
            min: MIN_PASSWORD_CHARS,
        });
    }
    Ok(())
}

fn check_alias(alias: &str) -> Result<(), P12Error> {
    let reason = if alias.is_empty() {
        "empty"
    } else if alias.chars().any(char::is_control) {
        "control character"
    } else if alias.chars().any(|c| u32::from(c) > 0xFFFF) {
        "character outside the Basic Multilingual Plane"
    } else {
        return Ok(());
    };
    Err(P12Error::InvalidAlias {
        alias: alias.to_owned(),
        reason,
    })
}

fn parse_cert(index: usize, der: &CertificateDer<'_>) -> Result<Certificate, P12Error> {
    Certificate::from_der(der).map_err(|e| P12Error::InvalidCertificate {
        index,
        reason: e.to_string(),
    })
}

fn parse_certs<'a>(
    ders: impl Iterator<Item = &'a CertificateDer<'a>>,
) -> Result<Vec<Certificate>, P12Error> {
    ders.enumerate()
        .map(|(index, der)| parse_cert(index, der))
        .collect()
}

/// Loads the key with aws-lc-rs and compares its public key with the certificate's.
fn check_key_matches(key_pkcs8_der: &[u8], leaf: &CertificateDer<'_>) -> Result<(), P12Error> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8_der.to_vec()));
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| {
        P12Error::InvalidKey {
            reason: e.to_string(),
        }
    })?;
    let Some(spki) = signer.public_key() else {
        return Err(P12Error::InvalidKey {
            reason: "cannot derive the public key".to_owned(),
        });
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| P12Error::InvalidCertificate {
            index: 0,
            reason: e.to_string(),
        })?;
    if spki.as_ref() != cert.tbs_certificate.subject_pki.raw {
        return Err(P12Error::KeyMismatch);
    }
    Ok(())
}

fn write(store: &KeyStore, password: &str) -> Result<Vec<u8>, P12Error> {
    store
        .writer(password)
        .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
        .encryption_iterations(KDF_ITERATIONS)
        .mac_algorithm(MacAlgorithm::HmacSha256)
        .mac_iterations(KDF_ITERATIONS)
        .write()
        .map_err(|e| P12Error::Encode {
            reason: e.to_string(),
        })
}

fn malformed(reason: impl fmt::Display) -> P12Error {
    P12Error::Malformed {
        reason: reason.to_string(),
    }
}

/// `PFX ::= SEQUENCE { version INTEGER, authSafe ContentInfo, macData MacData OPTIONAL }`:
/// refuses a store whose third element (the MAC) is missing.
fn require_mac(bytes: &[u8]) -> Result<(), P12Error> {
    let (rest, pfx) = Sequence::from_der(bytes).map_err(malformed)?;
    if !rest.is_empty() {
        return Err(malformed("trailing data after the store"));
    }
    let (inner, _version) = Any::from_der(&pfx.content).map_err(malformed)?;
    let (inner, _auth_safe) = Any::from_der(inner).map_err(malformed)?;
    if inner.is_empty() {
        return Err(P12Error::NoMac);
    }
    let (inner, mac_data) = Any::from_der(inner).map_err(malformed)?;
    if mac_data.tag() != Tag::Sequence || !inner.is_empty() {
        return Err(malformed("unexpected element after the authenticated safe"));
    }
    Ok(())
}

fn read_error(e: KsError) -> P12Error {
    match e {
        KsError::MacError(_) => P12Error::BadPassword,
        KsError::UnsupportedContentType
        | KsError::UnsupportedCertificateType
        | KsError::UnsupportedEncryptionScheme
        | KsError::UnsupportedMacAlgorithm => P12Error::Unsupported {
            reason: e.to_string(),
        },
        other => malformed(other),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
        PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SignatureAlgorithm,
    };

    use super::*;

    const PASSWORD: &str = "changeit";

    struct Chain {
        key: KeyPair,
        certs: Vec<CertificateDer<'static>>,
    }

    /// CA -> leaf, both with `alg`.
    fn chain(alg: &'static SignatureAlgorithm) -> Chain {
        let ca_key = KeyPair::generate_for(alg).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "Test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate_for(alg).unwrap();
        let mut leaf = CertificateParams::new(vec!["meter-1.example".to_owned()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "meter-1");
        let leaf_cert = leaf.signed_by(&key, &issuer).unwrap();
        Chain {
            key,
            certs: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
        }
    }

    #[test]
    fn key_store_round_trips_for_each_key_type() {
        for alg in [
            &PKCS_ECDSA_P256_SHA256,
            &PKCS_ECDSA_P384_SHA384,
            &PKCS_ED25519,
        ] {
            let c = chain(alg);
            let bytes =
                export_key_store("meter-1", &c.key.serialize_der(), &c.certs, PASSWORD).unwrap();
            let contents = read(&bytes, PASSWORD).unwrap();
            assert!(contents.trusted.is_empty());
            let [entry] = &contents.keys[..] else {
                panic!("expected one key entry, got {contents:?}");
            };
            assert_eq!(entry.alias, "meter-1");
            assert_eq!(entry.key_pkcs8_der, c.key.serialize_der());
            assert_eq!(entry.chain, c.certs);
        }
    }

    #[test]
    fn trust_store_round_trips() {
        let a = chain(&PKCS_ECDSA_P256_SHA256);
        let b = chain(&PKCS_ECDSA_P256_SHA256);
        let certs = vec![
            ("gridward-root".to_owned(), a.certs[1].clone()),
            ("other-root".to_owned(), b.certs[1].clone()),
        ];
        let bytes = export_trust_store(&certs, PASSWORD).unwrap();
        let contents = read(&bytes, PASSWORD).unwrap();
        assert!(contents.keys.is_empty());
        assert_eq!(contents.trusted, certs);
    }

    #[test]
    fn wrong_password_is_bad_password() {
        let c = chain(&PKCS_ECDSA_P256_SHA256);
        let bytes = export_key_store("k", &c.key.serialize_der(), &c.certs, PASSWORD).unwrap();
        assert!(matches!(
            read(&bytes, "wrong-password"),
            Err(P12Error::BadPassword)
        ));
        let trust = export_trust_store(&[("ca".to_owned(), c.certs[1].clone())], PASSWORD).unwrap();
        assert!(matches!(read(&trust, ""), Err(P12Error::BadPassword)));
    }

    #[test]
    fn modified_store_fails_the_mac_check() {
        let c = chain(&PKCS_ECDSA_P256_SHA256);
        let mut bytes = export_key_store("k", &c.key.serialize_der(), &c.certs, PASSWORD).unwrap();
        // A byte well inside the encrypted content: the DER stays valid, the MAC does not.
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        assert!(matches!(read(&bytes, PASSWORD), Err(P12Error::BadPassword)));
    }

    /// DER length octets for `len`.
    fn der_len(len: usize) -> Vec<u8> {
        if len < 0x80 {
            return vec![len as u8];
        }
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        let mut out = vec![0x80 | bytes.len() as u8];
        out.extend(bytes);
        out
    }

    #[test]
    fn store_without_mac_is_refused() {
        let c = chain(&PKCS_ECDSA_P256_SHA256);
        let bytes = export_key_store("k", &c.key.serialize_der(), &c.certs, PASSWORD).unwrap();
        // Rebuild the PFX with only its first two elements.
        let (_, pfx) = Sequence::from_der(&bytes).unwrap();
        let (rest, _) = Any::from_der(&pfx.content).unwrap();
        let (rest, _) = Any::from_der(rest).unwrap();
        let kept = &pfx.content[..pfx.content.len() - rest.len()];
        let mut stripped = vec![0x30];
        stripped.extend(der_len(kept.len()));
        stripped.extend_from_slice(kept);
        assert!(matches!(read(&stripped, PASSWORD), Err(P12Error::NoMac)));
    }

    #[test]
    fn garbage_is_malformed() {
        for bytes in [
            &b""[..],
            b"not a store",
            &[0x30, 0x03, 0x02, 0x01, 0x03],
            &[0x30, 0x00, 0x00],
        ] {
            assert!(
                matches!(read(bytes, PASSWORD), Err(P12Error::Malformed { .. })),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn export_refuses_bad_input() {
        let c = chain(&PKCS_ECDSA_P256_SHA256);
        let other = chain(&PKCS_ECDSA_P256_SHA256);
        let key = c.key.serialize_der();

        assert!(matches!(
            export_key_store("k", &key, &c.certs, "12345"),
            Err(P12Error::ShortPassword { min: 6 })
        ));
        assert!(matches!(
            export_key_store("", &key, &c.certs, PASSWORD),
            Err(P12Error::InvalidAlias {
                reason: "empty",
                ..
            })
        ));
        assert!(matches!(
            export_key_store("a\nb", &key, &c.certs, PASSWORD),
            Err(P12Error::InvalidAlias { .. })
        ));
        assert!(matches!(
            export_key_store("meter-\u{1F600}", &key, &c.certs, PASSWORD),
            Err(P12Error::InvalidAlias { .. })
        ));
        assert!(matches!(
            export_key_store("k", &key, &[], PASSWORD),
            Err(P12Error::EmptyChain)
        ));
        assert!(matches!(
            export_key_store("k", b"not a key", &c.certs, PASSWORD),
            Err(P12Error::InvalidKey { .. })
        ));
        assert!(matches!(
            export_key_store(
                "k",
                &key,
                &[c.certs[0].clone(), CertificateDer::from(vec![0x30, 0x00])],
                PASSWORD
            ),
            Err(P12Error::InvalidCertificate { index: 1, .. })
        ));
        assert!(matches!(
            export_key_store("k", &other.key.serialize_der(), &c.certs, PASSWORD),
            Err(P12Error::KeyMismatch)
        ));
    }

    #[test]
    fn trust_store_export_refuses_bad_input() {
        let c = chain(&PKCS_ECDSA_P256_SHA256);
        let ca = c.certs[1].clone();
        assert!(matches!(
            export_trust_store(&[], PASSWORD),
            Err(P12Error::EmptyTrustStore)
        ));
        assert!(matches!(
            export_trust_store(&[("ca".to_owned(), ca.clone())], "short"),
            Err(P12Error::ShortPassword { .. })
        ));
        assert!(matches!(
            export_trust_store(
                &[("Root".to_owned(), ca.clone()), ("root".to_owned(), ca.clone())],
                PASSWORD
            ),
            Err(P12Error::DuplicateAlias(alias)) if alias == "root"
        ));
        assert!(matches!(
            export_trust_store(
                &[
                    ("ok".to_owned(), ca.clone()),
                    ("bad".to_owned(), CertificateDer::from(vec![1, 2, 3]))
                ],
                PASSWORD
            ),
            Err(P12Error::InvalidCertificate { index: 1, .. })
        ));
        assert!(matches!(
            export_trust_store(&[(String::new(), ca)], PASSWORD),
            Err(P12Error::InvalidAlias { .. })
        ));
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let c = chain(&PKCS_ECDSA_P256_SHA256);
        let key = c.key.serialize_der();
        let bytes = export_key_store("k", &key, &c.certs, PASSWORD).unwrap();
        let contents = read(&bytes, PASSWORD).unwrap();
        let shown = format!("{contents:?}");
        assert!(shown.contains("elided"));
        let key_bytes = format!("{key:?}");
        assert!(!shown.contains(key_bytes.trim_matches(['[', ']'])));
    }
}
