//! Signing and verifying keys: Ed25519 and P-256, from the PEM files gridward-pki writes.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, ParsedPublicKey};

use super::{HttpSigAlg, HttpSigError};

/// A private key that signs requests, with the key id (`keyid`) its signatures carry.
///
/// Its `Debug` output shows the algorithm and key id, never key material.
pub struct HttpSigningKey {
    pair: Pair,
    verifying: HttpVerifyingKey,
}

enum Pair {
    Ed25519(Ed25519KeyPair),
    EcdsaP256(EcdsaKeyPair),
}

impl HttpSigningKey {
    /// Loads an unencrypted PKCS#8 Ed25519 or P-256 private key from PEM (`-----BEGIN PRIVATE
    /// KEY-----`, as gridward-pki and `openssl genpkey` write it).
    pub fn from_pkcs8_pem(pem: &str, key_id: impl Into<String>) -> Result<Self, HttpSigError> {
        let (_, der) = pem_block(pem, &["PRIVATE KEY"])?;
        Self::from_pkcs8_der(&der, key_id)
    }

    /// Loads an unencrypted PKCS#8 (v1 or v2) Ed25519 or P-256 private key from DER.
    pub fn from_pkcs8_der(der: &[u8], key_id: impl Into<String>) -> Result<Self, HttpSigError> {
        let key_id = checked_key_id(key_id.into())?;
        let unusable = || HttpSigError::BadKey("cannot encode the public key".to_owned());
        let (pair, spki) = if let Ok(k) = Ed25519KeyPair::from_pkcs8(der) {
            let spki = k.public_key().as_der().map_err(|_| unusable())?;
            let spki = spki.as_ref().to_vec();
            (Pair::Ed25519(k), spki)
        } else if let Ok(k) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
        {
            let spki = k.public_key().as_der().map_err(|_| unusable())?;
            let spki = spki.as_ref().to_vec();
            (Pair::EcdsaP256(k), spki)
        } else {
            return Err(HttpSigError::BadKey(
                "not an unencrypted PKCS#8 Ed25519 or P-256 private key".to_owned(),
            ));
        };
        let verifying = HttpVerifyingKey::from_spki_der(&spki, key_id)?;
        Ok(Self { pair, verifying })
    }

    /// The algorithm this key signs with.
    pub fn alg(&self) -> HttpSigAlg {
        self.verifying.alg
    }

    /// The key id its signatures carry as `keyid`.
    pub fn key_id(&self) -> &str {
        &self.verifying.key_id
    }

    /// The matching verifying key, under the same key id.
    pub fn verifying_key(&self) -> HttpVerifyingKey {
        self.verifying.clone()
    }

    /// Signs `message`; ECDSA signatures are raw `r ‖ s`.
    pub(super) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, HttpSigError> {
        match &self.pair {
            Pair::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            Pair::EcdsaP256(k) => k
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| HttpSigError::SigningFailed),
        }
    }
}

impl fmt::Debug for HttpSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSigningKey")
            .field("alg", &self.alg())
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

/// A public key that verifies request signatures, with the key id it is known by.
#[derive(Clone)]
pub struct HttpVerifyingKey {
    alg: HttpSigAlg,
    key: ParsedPublicKey,
    key_id: String,
    spki: Vec<u8>,
}

impl HttpVerifyingKey {
    /// Loads a public key from PEM: the first `CERTIFICATE` (its SubjectPublicKeyInfo),
    /// `PUBLIC KEY` (SubjectPublicKeyInfo) or `PRIVATE KEY` (unencrypted PKCS#8, whose public
    /// half is taken) block.
    pub fn from_pem(pem: &str, key_id: impl Into<String>) -> Result<Self, HttpSigError> {
        let (tag, der) = pem_block(pem, &["CERTIFICATE", "PUBLIC KEY", "PRIVATE KEY"])?;
        match tag.as_str() {
            "CERTIFICATE" => {
                let (rest, cert) = x509_parser::parse_x509_certificate(&der)
                    .map_err(|e| HttpSigError::BadKey(format!("certificate: {e}")))?;
                if !rest.is_empty() {
                    return Err(HttpSigError::BadKey(
                        "certificate: trailing bytes".to_owned(),
                    ));
                }
                Self::from_spki_der(cert.tbs_certificate.subject_pki.raw, key_id)
            }
            "PRIVATE KEY" => Ok(HttpSigningKey::from_pkcs8_der(&der, key_id)?.verifying),
            _ => Self::from_spki_der(&der, key_id),
        }
    }

    /// Loads an Ed25519 or P-256 public key from its DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8], key_id: impl Into<String>) -> Result<Self, HttpSigError> {
        let key_id = checked_key_id(key_id.into())?;
        let candidates: [(HttpSigAlg, &'static dyn signature::VerificationAlgorithm); 2] = [
            (HttpSigAlg::Ed25519, &signature::ED25519),
            (
                HttpSigAlg::EcdsaP256Sha256,
                &signature::ECDSA_P256_SHA256_FIXED,
            ),
        ];
        for (alg, verification) in candidates {
            if let Ok(key) = ParsedPublicKey::new(verification, der) {
                // Only the X.509 SubjectPublicKeyInfo form, not a raw key or point.
                let canonical = key
                    .as_der()
                    .map_err(|_| HttpSigError::BadKey("cannot encode the key".to_owned()))?;
                if canonical.as_ref() != der {
                    continue;
                }
                return Ok(Self {
                    alg,
                    key,
                    key_id,
                    spki: der.to_vec(),
                });
            }
        }
        Err(HttpSigError::BadKey(
            "not an Ed25519 or P-256 SubjectPublicKeyInfo".to_owned(),
        ))
    }

    /// The algorithm signatures by this key use.
    pub fn alg(&self) -> HttpSigAlg {
        self.alg
    }

    /// The key id this key is known by.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public key as DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// Checks `signature` over `message`.
    pub(super) fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), HttpSigError> {
        self.key
            .verify_sig(message, signature)
            .map_err(|_| HttpSigError::BadSignature)
    }
}

impl fmt::Debug for HttpVerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpVerifyingKey")
            .field("alg", &self.alg)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Where a verifier finds the key named by a signature's `keyid`.
pub trait KeyLookup {
    /// The verifying key known as `key_id`, if any.
    fn key(&self, key_id: &str) -> Option<HttpVerifyingKey>;
}

impl<S: BuildHasher> KeyLookup for HashMap<String, HttpVerifyingKey, S> {
    fn key(&self, key_id: &str) -> Option<HttpVerifyingKey> {
        self.get(key_id).cloned()
    }
}

/// A single key: known under its own key id only.
impl KeyLookup for HttpVerifyingKey {
    fn key(&self, key_id: &str) -> Option<HttpVerifyingKey> {
        (key_id == self.key_id).then(|| self.clone())
    }
}

/// A key id must be representable as a Structured Field string: printable ASCII, not empty.
fn checked_key_id(key_id: String) -> Result<String, HttpSigError> {
    if key_id.is_empty() || !key_id.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(HttpSigError::BadKey(format!(
            "key id {key_id:?} must be printable ASCII and not empty"
        )));
    }
    Ok(key_id)
}

/// The tag and contents of the first PEM block whose tag is one of `tags`.
fn pem_block(text: &str, tags: &[&str]) -> Result<(String, Vec<u8>), HttpSigError> {
    let blocks = pem::parse_many(text).map_err(|e| HttpSigError::BadKey(format!("PEM: {e}")))?;
    blocks
        .into_iter()
        .find(|b| tags.contains(&b.tag()))
        .map(|b| (b.tag().to_owned(), b.into_contents()))
        .ok_or_else(|| HttpSigError::BadKey(format!("no PEM block labelled {}", tags.join(", "))))
}
