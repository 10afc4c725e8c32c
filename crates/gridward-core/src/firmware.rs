//! Firmware manifests in the spirit of SUIT (RFC 9124), signed by the *manufacturer's* key
//! (never the head-end's), and the meter's install decision (sans-IO).
//!
//! A manifest is a tagged COSE_Sign1 with content type [`CONTENT_TYPE`], external AAD
//! [`MANIFEST_AAD`], and a CBOR map payload: manifest version, sequence number (monotonically
//! increasing: anti-rollback), vendor id, class id, version `X.Y.Z`, SHA-256 digest and size of
//! the image, optional expiry, optional `rollback_from` (see [`Manifest::rollback_from`]).
//! The image travels to the meter in [`Chunk`]s; [`check_install`] decides.

use ciborium::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::command::Refusal;
use crate::cose;
use crate::document::format_timestamp;
use crate::envelope::{SigningKey, VerifyingKey, hex_string};

/// Payload key: manifest version (uint).
const KEY_VERSION_OF_MANIFEST: &str = "v";
/// Payload key: sequence number (uint).
const KEY_SEQ: &str = "seq";
/// Payload key: vendor id (tstr).
const KEY_VENDOR: &str = "vendor";
/// Payload key: class id (tstr).
const KEY_CLASS: &str = "class";
/// Payload key: firmware version `X.Y.Z` (tstr).
const KEY_VERSION: &str = "version";
/// Payload key: SHA-256 of the image (bstr, 32 bytes).
const KEY_DIGEST: &str = "digest";
/// Payload key: image size in bytes (uint).
const KEY_SIZE: &str = "size";
/// Payload key, optional: expiry (int, seconds since the epoch).
const KEY_EXP: &str = "exp";
/// Payload key, optional: the installed sequence an explicit rollback replaces (uint).
const KEY_ROLLBACK_FROM: &str = "rollback_from";

/// Largest encoded chunk accepted by [`Chunk::decode`]: the data plus the array, digest and
/// offset heads.
const MAX_CHUNK_ENCODED: usize = MAX_CHUNK_BYTES + 64;

/// Content type (COSE header 3) of a manifest.
pub const CONTENT_TYPE: &str = "application/vnd.gridward.firmware-manifest+cbor";

/// External AAD of a manifest signature (binds the signature to this use of the key).
pub const MANIFEST_AAD: &[u8] = b"gridward firmware manifest v1";

/// The manifest format version written and accepted.
pub const MANIFEST_VERSION: u32 = 1;

/// Largest encoded manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024;

/// Largest image accepted, in bytes (16 MiB).
pub const MAX_IMAGE_BYTES: u64 = 16 * 1024 * 1024;

/// Largest chunk payload, in bytes.
pub const MAX_CHUNK_BYTES: usize = 16 * 1024;

/// Longest vendor or class id, in bytes (`[A-Za-z0-9_.-]`).
pub const MAX_ID_LEN: usize = 64;

/// A firmware manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub manifest_version: u32,
    /// Monotonically increasing sequence number.
    pub sequence: u64,
    /// The vendor.
    pub vendor_id: String,
    /// The device class.
    pub class_id: String,
    /// The firmware version `X.Y.Z`.
    pub version: String,
    /// SHA-256 of the image.
    pub digest: [u8; 32],
    /// Size of the image in bytes (1..=[`MAX_IMAGE_BYTES`]).
    pub size: u64,
    /// After this instant the manifest is refused.
    pub expires_at: Option<OffsetDateTime>,
    /// An explicit, signed rollback: this manifest may be installed although its sequence is not
    /// greater than the installed one, but only over the installed sequence named here (so it
    /// cannot be replayed once anything else is installed).
    pub rollback_from: Option<u64>,
}

impl Manifest {
    /// Checks ids, version syntax, size bounds, manifest version.
    ///
    /// # Errors
    ///
    /// [`FirmwareError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), FirmwareError> {
        let invalid = |d: String| Err(FirmwareError::Invalid(d));
        if self.manifest_version != MANIFEST_VERSION {
            return invalid(format!(
                "manifest version {} is not supported (only {MANIFEST_VERSION})",
                self.manifest_version
            ));
        }
        for (name, id) in [("vendor id", &self.vendor_id), ("class id", &self.class_id)] {
            if id.is_empty() || id.len() > MAX_ID_LEN {
                return invalid(format!(
                    "{name} is {} bytes; 1 to {MAX_ID_LEN} are allowed",
                    id.len()
                ));
            }
            if !id.chars().all(is_id_char) {
                return invalid(format!(
                    "{name} {:?} has characters outside A-Z a-z 0-9 _ . -",
                    cose::snippet(id)
                ));
            }
        }
        if !is_version(&self.version) {
            return invalid(format!(
                "version {:?} is not X.Y.Z (three decimal numbers below 2^32)",
                cose::snippet(&self.version)
            ));
        }
        if !(1..=MAX_IMAGE_BYTES).contains(&self.size) {
            return invalid(format!(
                "image size {} is outside 1..={MAX_IMAGE_BYTES} bytes",
                self.size
            ));
        }
        Ok(())
    }

    /// The CBOR payload map.
    fn to_value(&self) -> Value {
        let text = |s: &str| Value::Text(s.to_owned());
        let mut map = vec![
            (
                text(KEY_VERSION_OF_MANIFEST),
                Value::Integer(self.manifest_version.into()),
            ),
            (text(KEY_SEQ), Value::Integer(self.sequence.into())),
            (text(KEY_VENDOR), text(&self.vendor_id)),
            (text(KEY_CLASS), text(&self.class_id)),
            (text(KEY_VERSION), text(&self.version)),
            (text(KEY_DIGEST), Value::Bytes(self.digest.to_vec())),
            (text(KEY_SIZE), Value::Integer(self.size.into())),
        ];
        if let Some(exp) = self.expires_at {
            map.push((text(KEY_EXP), Value::Integer(exp.unix_timestamp().into())));
        }
        if let Some(from) = self.rollback_from {
            map.push((text(KEY_ROLLBACK_FROM), Value::Integer(from.into())));
        }
        Value::Map(map)
    }

    /// Decodes the CBOR payload map (types and keys) and validates it.
    fn from_payload(bytes: &[u8]) -> Result<Self, FirmwareError> {
        let malformed = |d: String| FirmwareError::Malformed(format!("manifest payload: {d}"));
        let value = cose::decode_cbor(bytes).map_err(malformed)?;
        let mut entries = cose::text_map(value, "manifest").map_err(malformed)?;
        let mut required = |key: &str| {
            cose::take(&mut entries, key).ok_or_else(|| malformed(format!("lacks {key:?}")))
        };
        let manifest_version =
            cose::uint(&required(KEY_VERSION_OF_MANIFEST)?, "v").map_err(malformed)?;
        let manifest_version = u32::try_from(manifest_version).map_err(|_| {
            FirmwareError::Invalid(format!(
                "manifest version {manifest_version} is not supported (only {MANIFEST_VERSION})"
            ))
        })?;
        let sequence = cose::uint(&required(KEY_SEQ)?, KEY_SEQ).map_err(malformed)?;
        let vendor_id = cose::text(required(KEY_VENDOR)?, KEY_VENDOR).map_err(malformed)?;
        let class_id = cose::text(required(KEY_CLASS)?, KEY_CLASS).map_err(malformed)?;
        let version = cose::text(required(KEY_VERSION)?, KEY_VERSION).map_err(malformed)?;
        let digest = cose::fixed_bytes(required(KEY_DIGEST)?, KEY_DIGEST).map_err(malformed)?;
        let size = cose::uint(&required(KEY_SIZE)?, KEY_SIZE).map_err(malformed)?;
        let expires_at = cose::take(&mut entries, KEY_EXP)
            .map(|v| {
                let secs = cose::int(&v, KEY_EXP).map_err(malformed)?;
                OffsetDateTime::from_unix_timestamp(secs)
                    .map_err(|_| malformed(format!("\"exp\" {secs} is out of range")))
            })
            .transpose()?;
        let rollback_from = cose::take(&mut entries, KEY_ROLLBACK_FROM)
            .map(|v| cose::uint(&v, KEY_ROLLBACK_FROM).map_err(malformed))
            .transpose()?;
        cose::no_other_keys(&entries, "manifest").map_err(malformed)?;
        let manifest = Self {
            manifest_version,
            sequence,
            vendor_id,
            class_id,
            version,
            digest,
            size,
            expires_at,
            rollback_from,
        };
        manifest.validate()?;
        Ok(manifest)
    }
}

/// `[A-Za-z0-9_.-]`.
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// `X.Y.Z`: three decimal numbers (ASCII digits, each fitting a `u32`).
fn is_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u32>().is_ok()
        })
}

/// Signs `manifest` with a manufacturer key.
///
/// # Errors
///
/// [`FirmwareError::Invalid`] if the manifest does not validate; [`FirmwareError::Malformed`] if
/// encoding or signing fails.
///
/// An expiry is signed in whole seconds (a sub-second part is dropped).
pub fn sign_manifest(key: &SigningKey, manifest: &Manifest) -> Result<Vec<u8>, FirmwareError> {
    manifest.validate()?;
    let payload = cose::encode_cbor(&manifest.to_value()).map_err(FirmwareError::Malformed)?;
    let signed = cose::sign(key, CONTENT_TYPE, MANIFEST_AAD, payload)
        .map_err(|e| FirmwareError::Malformed(format!("signing failed: {e}")))?;
    if signed.len() > MAX_MANIFEST_BYTES {
        return Err(FirmwareError::Malformed(format!(
            "the signed manifest is {} bytes; meters accept at most {MAX_MANIFEST_BYTES}",
            signed.len()
        )));
    }
    Ok(signed)
}

/// A manifest whose manufacturer signature verified; only [`verify_manifest`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    /// Key id of the manufacturer key that signed it.
    signer_kid: Vec<u8>,
}

impl VerifiedManifest {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The key id of the manufacturer key that signed it.
    pub fn signer_kid(&self) -> &[u8] {
        &self.signer_kid
    }
}

/// Decodes `bytes` and checks the signature against the trusted manufacturer keys (by key id).
/// Does not check expiry or the install rules (see [`check_install`]).
///
/// # Errors
///
/// [`FirmwareError::Malformed`], [`FirmwareError::UnknownSigner`], [`FirmwareError::BadSignature`],
/// [`FirmwareError::Invalid`].
///
/// Order: size, structure and header (`Malformed`), key id among `manufacturers`
/// (`UnknownSigner`), signature over [`MANIFEST_AAD`] (`BadSignature`), payload (`Malformed`),
/// field bounds (`Invalid`).
pub fn verify_manifest(
    bytes: &[u8],
    manufacturers: &[VerifyingKey],
) -> Result<VerifiedManifest, FirmwareError> {
    let signed = decode_signed(bytes)?;
    let keys: Vec<&VerifyingKey> = manufacturers
        .iter()
        .filter(|k| k.kid() == signed.kid.as_slice())
        .collect();
    if keys.is_empty() {
        return Err(FirmwareError::UnknownSigner(hex_string(&signed.kid)));
    }
    if !keys.iter().any(|k| signed.verifies(k, MANIFEST_AAD)) {
        return Err(FirmwareError::BadSignature);
    }
    let manifest = Manifest::from_payload(signed.payload())?;
    Ok(VerifiedManifest {
        manifest,
        signer_kid: signed.kid,
    })
}

/// Decodes the COSE_Sign1 of a manifest and checks its header.
fn decode_signed(bytes: &[u8]) -> Result<cose::Signed, FirmwareError> {
    cose::decode(bytes, MAX_MANIFEST_BYTES, CONTENT_TYPE)
        .map_err(|d| FirmwareError::Malformed(format!("manifest: {d}")))
}

/// Reads a manifest without verifying it (for the head-end's listing of an upload it is about
/// to verify, and for tests); never for a decision.
///
/// # Errors
///
/// [`FirmwareError::Malformed`], [`FirmwareError::Invalid`].
pub fn decode_unverified(bytes: &[u8]) -> Result<Manifest, FirmwareError> {
    Manifest::from_payload(decode_signed(bytes)?.payload())
}

/// What a meter has installed in its active slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Vendor id of the device.
    pub vendor_id: String,
    /// Class id of the device.
    pub class_id: String,
    /// Running version.
    pub version: String,
    /// Sequence number of the installed manifest (0 for factory firmware).
    pub sequence: u64,
}

/// The meter's install decision: vendor and class match, not expired at `now`, sequence greater
/// than installed (or an explicit `rollback_from` equal to the installed sequence), image size and
/// SHA-256 digest equal to the manifest's.
///
/// # Errors
///
/// The first failed rule.
pub fn check_install(
    manifest: &VerifiedManifest,
    installed: &Installed,
    image: &[u8],
    now: OffsetDateTime,
) -> Result<(), FirmwareError> {
    check_manifest(manifest, installed, now)?;
    let m = &manifest.manifest;
    let actual = u64::try_from(image.len()).unwrap_or(u64::MAX);
    if actual != m.size {
        return Err(FirmwareError::SizeMismatch {
            expected: m.size,
            actual,
        });
    }
    if Sha256::digest(image).as_slice() != m.digest.as_slice() {
        return Err(FirmwareError::DigestMismatch);
    }
    Ok(())
}

/// The vendor, class, expiry and sequence rules alone, before any image byte arrived (so a meter
/// refuses a bad update without downloading it).
///
/// # Errors
///
/// As [`check_install`], without the image rules.
pub fn check_manifest(
    manifest: &VerifiedManifest,
    installed: &Installed,
    now: OffsetDateTime,
) -> Result<(), FirmwareError> {
    let m = &manifest.manifest;
    if m.vendor_id != installed.vendor_id || m.class_id != installed.class_id {
        return Err(FirmwareError::WrongClass {
            vendor: m.vendor_id.clone(),
            class: m.class_id.clone(),
            device_vendor: installed.vendor_id.clone(),
            device_class: installed.class_id.clone(),
        });
    }
    if let Some(exp) = m.expires_at.filter(|exp| now >= *exp) {
        return Err(FirmwareError::Expired(format_timestamp(exp)));
    }
    let forward = m.sequence > installed.sequence;
    let explicit_rollback = m.rollback_from == Some(installed.sequence);
    if !(forward || explicit_rollback) {
        return Err(FirmwareError::Rollback {
            manifest: m.sequence,
            installed: installed.sequence,
        });
    }
    Ok(())
}

/// One piece of an image on `meters/{id}/firmware`: CBOR array `[digest, offset, data]` where
/// `digest` is the manifest's image digest (32 bytes) naming the transfer. Chunks are not signed:
/// the signed manifest's digest decides at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The image's SHA-256 (the manifest's `digest`).
    pub digest: [u8; 32],
    /// Offset of `data` in the image.
    pub offset: u64,
    /// At most [`MAX_CHUNK_BYTES`].
    pub data: Vec<u8>,
}

impl Chunk {
    /// CBOR encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() + 48);
        cbor_head(&mut out, 4, 3);
        cbor_head(&mut out, 2, 32);
        out.extend_from_slice(&self.digest);
        cbor_head(&mut out, 0, self.offset);
        cbor_head(
            &mut out,
            2,
            u64::try_from(self.data.len()).unwrap_or(u64::MAX),
        );
        out.extend_from_slice(&self.data);
        out
    }

    /// Decodes a chunk: exactly the array `[bstr 32, uint, bstr]`, its data at most
    /// [`MAX_CHUNK_BYTES`] and within [`MAX_IMAGE_BYTES`] of the image start, nothing after it.
    ///
    /// # Errors
    ///
    /// [`FirmwareError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FirmwareError> {
        let malformed = |d: String| FirmwareError::Malformed(format!("chunk: {d}"));
        if bytes.len() > MAX_CHUNK_ENCODED {
            return Err(malformed(format!(
                "{} bytes; at most {MAX_CHUNK_ENCODED} are accepted",
                bytes.len()
            )));
        }
        let Value::Array(items) = cose::decode_cbor(bytes).map_err(malformed)? else {
            return Err(malformed("not a CBOR array".to_owned()));
        };
        let [digest, offset, data] = <[Value; 3]>::try_from(items)
            .map_err(|items| malformed(format!("{} elements, expected 3", items.len())))?;
        let digest = cose::fixed_bytes(digest, "digest").map_err(malformed)?;
        let offset = cose::uint(&offset, "offset").map_err(malformed)?;
        let Value::Bytes(data) = data else {
            return Err(malformed("data is not a byte string".to_owned()));
        };
        if data.len() > MAX_CHUNK_BYTES {
            return Err(malformed(format!(
                "data is {} bytes; at most {MAX_CHUNK_BYTES} are accepted",
                data.len()
            )));
        }
        let end = offset.checked_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        if end.is_none_or(|end| end > MAX_IMAGE_BYTES) {
            return Err(malformed(format!(
                "data at offset {offset} ends beyond the largest image ({MAX_IMAGE_BYTES} bytes)"
            )));
        }
        Ok(Self {
            digest,
            offset,
            data,
        })
    }
}

/// Appends a CBOR head (major type `major`, argument `n`) in its shortest form.
fn cbor_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let major = major << 5;
    if n < 24 {
        out.push(major | n as u8);
    } else if let Ok(n) = u8::try_from(n) {
        out.extend_from_slice(&[major | 24, n]);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(major | 25);
        out.extend_from_slice(&n.to_be_bytes());
    } else if let Ok(n) = u32::try_from(n) {
        out.push(major | 26);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(major | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// The chunks of `image`, [`MAX_CHUNK_BYTES`] each (the last one shorter).
pub fn chunks(digest: [u8; 32], image: &[u8]) -> Vec<Chunk> {
    image
        .chunks(MAX_CHUNK_BYTES)
        .enumerate()
        .map(|(i, data)| Chunk {
            digest,
            offset: (i as u64).saturating_mul(MAX_CHUNK_BYTES as u64),
            data: data.to_vec(),
        })
        .collect()
}

/// Why a manifest or an image was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FirmwareError {
    /// Not a well-formed manifest or chunk.
    #[error("malformed: {0}")]
    Malformed(String),
    /// Fields out of bounds.
    #[error("invalid manifest: {0}")]
    Invalid(String),
    /// Signed by a key that is not a trusted manufacturer key (e.g. the head-end's).
    #[error("manifest not signed by a trusted manufacturer key (key id {0})")]
    UnknownSigner(String),
    /// The signature does not verify.
    #[error("manifest signature does not verify")]
    BadSignature,
    /// Vendor or class differs from the device's.
    #[error("manifest is for {vendor}/{class}, the device is {device_vendor}/{device_class}")]
    WrongClass {
        /// Manifest vendor.
        vendor: String,
        /// Manifest class.
        class: String,
        /// Device vendor.
        device_vendor: String,
        /// Device class.
        device_class: String,
    },
    /// Expired.
    #[error("manifest expired at {0}")]
    Expired(String),
    /// Sequence not greater than installed, without a matching rollback.
    #[error("sequence {manifest} is not greater than the installed {installed} (rollback refused)")]
    Rollback {
        /// Manifest sequence.
        manifest: u64,
        /// Installed sequence.
        installed: u64,
    },
    /// Size differs.
    #[error("image is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// Manifest size.
        expected: u64,
        /// Received size.
        actual: u64,
    },
    /// Digest differs.
    #[error("image digest differs from the manifest's")]
    DigestMismatch,
}

impl FirmwareError {
    /// The refusal code a meter reports for this error.
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::Malformed(_) | Self::Invalid(_) => Refusal::Malformed,
            Self::UnknownSigner(_) | Self::BadSignature => Refusal::FirmwareBadSignature,
            Self::WrongClass { .. } => Refusal::FirmwareWrongClass,
            Self::Expired(_) => Refusal::FirmwareExpired,
            Self::Rollback { .. } => Refusal::FirmwareRollback,
            Self::SizeMismatch { .. } | Self::DigestMismatch => Refusal::FirmwareDigestMismatch,
        }
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
    use coset::{CoseSign1, HeaderBuilder, ProtectedHeader, TaggedCborSerializable};
    use proptest::prelude::*;
    use time::Duration;

    use super::*;
    use crate::command::tests::spec_block;

    const NOW_TS: i64 = 1_707_220_800;
    const IMAGE: &[u8] = b"GRIDWARD-FIRMWARE-TEST-IMAGE";

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(NOW_TS).unwrap()
    }

    fn es256() -> SigningKey {
        let der =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        SigningKey::from_pkcs8_der(der.as_ref()).unwrap()
    }

    fn eddsa() -> SigningKey {
        let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        SigningKey::from_pkcs8_der(der.as_ref()).unwrap()
    }

    fn manifest(sequence: u64, image: &[u8]) -> Manifest {
        Manifest {
            manifest_version: MANIFEST_VERSION,
            sequence,
            vendor_id: "acme".into(),
            class_id: "em-1".into(),
            version: "1.2.0".into(),
            digest: Sha256::digest(image).into(),
            size: image.len() as u64,
            expires_at: Some(now() + Duration::days(30)),
            rollback_from: None,
        }
    }

    fn installed(sequence: u64) -> Installed {
        Installed {
            vendor_id: "acme".into(),
            class_id: "em-1".into(),
            version: "1.1.0".into(),
            sequence,
        }
    }

    fn verified(key: &SigningKey, m: &Manifest) -> VerifiedManifest {
        let bytes = sign_manifest(key, m).unwrap();
        verify_manifest(&bytes, &[key.verifying_key().unwrap()]).unwrap()
    }

    /// A hand-made manifest COSE_Sign1 with `payload`, for what `sign_manifest` never writes.
    fn craft(key: &SigningKey, payload: Value) -> Vec<u8> {
        let protected = HeaderBuilder::new()
            .algorithm(key.algorithm().iana())
            .key_id(key.kid().to_vec())
            .content_type(CONTENT_TYPE.to_owned())
            .build();
        let mut sign1 = CoseSign1 {
            protected: ProtectedHeader {
                original_data: None,
                header: protected,
            },
            unprotected: coset::Header::default(),
            payload: Some(cose::encode_cbor(&payload).unwrap()),
            signature: vec![],
        };
        sign1.signature = key.sign_bytes(&sign1.tbs_data(MANIFEST_AAD)).unwrap();
        sign1.to_tagged_vec().unwrap()
    }

    #[test]
    fn manifests_round_trip_es256_and_eddsa() {
        for key in [es256(), eddsa()] {
            for m in [
                manifest(5, IMAGE),
                Manifest {
                    expires_at: None,
                    rollback_from: Some(7),
                    ..manifest(3, IMAGE)
                },
            ] {
                let bytes = sign_manifest(&key, &m).unwrap();
                assert_eq!(bytes[0], 0xd2);
                let v = verify_manifest(
                    &bytes,
                    &[
                        es256().verifying_key().unwrap(),
                        key.verifying_key().unwrap(),
                    ],
                )
                .unwrap();
                assert_eq!(v.manifest(), &m);
                assert_eq!(v.signer_kid(), key.kid());
                assert_eq!(decode_unverified(&bytes), Ok(m));
            }
        }
    }

    #[test]
    fn install_accepts_a_newer_matching_image() {
        let key = es256();
        let v = verified(&key, &manifest(5, IMAGE));
        assert_eq!(check_manifest(&v, &installed(4), now()), Ok(()));
        assert_eq!(check_install(&v, &installed(4), IMAGE, now()), Ok(()));
        assert_eq!(check_install(&v, &installed(0), IMAGE, now()), Ok(()));
    }

    #[test]
    fn each_install_rule_refuses() {
        let key = es256();
        let v = verified(&key, &manifest(5, IMAGE));
        let other_class = Installed {
            class_id: "em-2".into(),
            ..installed(4)
        };
        let other_vendor = Installed {
            vendor_id: "globex".into(),
            ..installed(4)
        };
        for device in [other_class, other_vendor] {
            let err = check_install(&v, &device, IMAGE, now()).unwrap_err();
            assert!(matches!(err, FirmwareError::WrongClass { .. }), "{err}");
            assert_eq!(err.refusal(), Refusal::FirmwareWrongClass);
        }
        let exp = now() + Duration::days(30);
        let err = check_install(&v, &installed(4), IMAGE, exp).unwrap_err();
        assert_eq!(err, FirmwareError::Expired("2024-03-07T12:00:00Z".into()));
        assert_eq!(err.refusal(), Refusal::FirmwareExpired);
        assert!(check_install(&v, &installed(4), IMAGE, exp - Duration::seconds(1)).is_ok());
        for seq in [5, 6, u64::MAX] {
            let err = check_install(&v, &installed(seq), IMAGE, now()).unwrap_err();
            assert_eq!(
                err,
                FirmwareError::Rollback {
                    manifest: 5,
                    installed: seq
                }
            );
            assert_eq!(err.refusal(), Refusal::FirmwareRollback);
        }
        // A truncated transfer, a longer one, and one changed byte.
        let err = check_install(&v, &installed(4), &IMAGE[..IMAGE.len() - 1], now()).unwrap_err();
        assert_eq!(
            err,
            FirmwareError::SizeMismatch {
                expected: IMAGE.len() as u64,
                actual: IMAGE.len() as u64 - 1
            }
        );
        assert_eq!(err.refusal(), Refusal::FirmwareDigestMismatch);
        let mut longer = IMAGE.to_vec();
        longer.push(0);
        assert!(matches!(
            check_install(&v, &installed(4), &longer, now()),
            Err(FirmwareError::SizeMismatch { .. })
        ));
        let mut changed = IMAGE.to_vec();
        changed[3] ^= 0x20;
        let err = check_install(&v, &installed(4), &changed, now()).unwrap_err();
        assert_eq!(err, FirmwareError::DigestMismatch);
        assert_eq!(err.refusal(), Refusal::FirmwareDigestMismatch);
        // The class is checked first, before expiry, sequence and image.
        assert!(matches!(
            check_install(
                &v,
                &Installed {
                    class_id: "x".into(),
                    ..installed(9)
                },
                &[],
                exp
            ),
            Err(FirmwareError::WrongClass { .. })
        ));
        assert!(matches!(
            check_install(&v, &installed(9), &[], exp),
            Err(FirmwareError::Expired(_))
        ));
        assert!(matches!(
            check_install(&v, &installed(9), &[], now()),
            Err(FirmwareError::Rollback { .. })
        ));
    }

    #[test]
    fn a_rollback_manifest_installs_only_over_its_named_sequence() {
        let key = eddsa();
        let rollback = Manifest {
            rollback_from: Some(7),
            ..manifest(3, IMAGE)
        };
        let v = verified(&key, &rollback);
        assert_eq!(check_install(&v, &installed(7), IMAGE, now()), Ok(()));
        for seq in [3, 4, 6, 8] {
            assert_eq!(
                check_install(&v, &installed(seq), IMAGE, now()),
                Err(FirmwareError::Rollback {
                    manifest: 3,
                    installed: seq
                }),
                "installed {seq}"
            );
        }
        // Without the explicit rollback the same older sequence is refused.
        let plain = verified(&key, &manifest(3, IMAGE));
        assert!(matches!(
            check_install(&plain, &installed(7), IMAGE, now()),
            Err(FirmwareError::Rollback { .. })
        ));
    }

    #[test]
    fn signatures_by_other_keys_and_changed_bytes_are_refused() {
        let manufacturer = es256();
        let trusted = [manufacturer.verifying_key().unwrap()];
        // The head-end's command key (or any non-manufacturer key) signs a manifest.
        let head_end = es256();
        let bytes = sign_manifest(&head_end, &manifest(5, IMAGE)).unwrap();
        let err = verify_manifest(&bytes, &trusted).unwrap_err();
        assert_eq!(
            err,
            FirmwareError::UnknownSigner(hex_string(head_end.kid()))
        );
        assert_eq!(err.refusal(), Refusal::FirmwareBadSignature);
        assert!(matches!(
            verify_manifest(&bytes, &[]),
            Err(FirmwareError::UnknownSigner(_))
        ));

        let bytes = sign_manifest(&manufacturer, &manifest(5, IMAGE)).unwrap();
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let err = verify_manifest(&flipped, &trusted).unwrap_err();
        assert_eq!(err, FirmwareError::BadSignature);
        assert_eq!(err.refusal(), Refusal::FirmwareBadSignature);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(verify_manifest(&bad, &trusted).is_err(), "byte {i}");
        }

        // A command signed over the manifest's bytes is not a manifest: the AAD differs.
        let mut sign1 = CoseSign1::from_tagged_slice(&bytes).unwrap();
        sign1.signature = manufacturer
            .sign_bytes(&sign1.tbs_data(b"meters/123456789/commands"))
            .unwrap();
        assert_eq!(
            verify_manifest(&sign1.to_tagged_vec().unwrap(), &trusted),
            Err(FirmwareError::BadSignature)
        );
    }

    #[test]
    fn malformed_and_invalid_manifests_are_refused() {
        let key = es256();
        let trusted = [key.verifying_key().unwrap()];
        let good = manifest(5, IMAGE);
        let invalid = [
            Manifest {
                manifest_version: 2,
                ..good.clone()
            },
            Manifest {
                vendor_id: "".into(),
                ..good.clone()
            },
            Manifest {
                vendor_id: "a".repeat(MAX_ID_LEN + 1),
                ..good.clone()
            },
            Manifest {
                class_id: "em 1".into(),
                ..good.clone()
            },
            Manifest {
                class_id: "em/1".into(),
                ..good.clone()
            },
            Manifest {
                version: "1.2".into(),
                ..good.clone()
            },
            Manifest {
                version: "1.2.0.0".into(),
                ..good.clone()
            },
            Manifest {
                version: "1.2.x".into(),
                ..good.clone()
            },
            Manifest {
                version: "1..0".into(),
                ..good.clone()
            },
            Manifest {
                version: "+1.2.0".into(),
                ..good.clone()
            },
            Manifest {
                version: "1.2.4294967296".into(),
                ..good.clone()
            },
            Manifest {
                size: 0,
                ..good.clone()
            },
            Manifest {
                size: MAX_IMAGE_BYTES + 1,
                ..good.clone()
            },
        ];
        for m in invalid {
            let err = sign_manifest(&key, &m).unwrap_err();
            assert!(matches!(err, FirmwareError::Invalid(_)), "{m:?}: {err}");
            assert_eq!(err.refusal(), Refusal::Malformed);
            // Signed by hand, the verifier refuses it too.
            let Value::Map(map) = m.to_value() else {
                unreachable!()
            };
            let bytes = craft(&key, Value::Map(map));
            assert!(
                matches!(
                    verify_manifest(&bytes, &trusted),
                    Err(FirmwareError::Invalid(_))
                ),
                "{m:?}"
            );
        }
        assert!(
            Manifest {
                version: "0.0.4294967295".into(),
                ..good.clone()
            }
            .validate()
            .is_ok()
        );
        assert!(
            Manifest {
                vendor_id: "a".repeat(MAX_ID_LEN),
                ..good.clone()
            }
            .validate()
            .is_ok()
        );

        let t = |s: &str| Value::Text(s.to_owned());
        let Value::Map(base) = good.to_value() else {
            unreachable!()
        };
        type Edit = Box<dyn Fn(&mut Vec<(Value, Value)>)>;
        let edits: Vec<(&str, Edit)> = vec![
            (
                "unknown key",
                Box::new(move |m| m.push((t("url"), t("http://x")))),
            ),
            (
                "duplicate key",
                Box::new(move |m| m.push((t("seq"), Value::Integer(9.into())))),
            ),
            (
                "missing digest",
                Box::new(|m| m.retain(|(k, _)| k.as_text() != Some("digest"))),
            ),
            (
                "short digest",
                Box::new(|m| m[5].1 = Value::Bytes(vec![0; 31])),
            ),
            ("text size", Box::new(move |m| m[6].1 = t("28"))),
            (
                "negative seq",
                Box::new(|m| m[1].1 = Value::Integer((-1).into())),
            ),
            ("float exp", Box::new(|m| m[7].1 = Value::Float(1.0))),
            (
                "exp out of range",
                Box::new(|m| m[7].1 = Value::Integer(i64::MAX.into())),
            ),
            (
                "text rollback_from",
                Box::new(move |m| m.push((t("rollback_from"), t("7")))),
            ),
            (
                "integer key",
                Box::new(|m| m.push((Value::Integer(1.into()), Value::Null))),
            ),
        ];
        for (name, edit) in edits {
            let mut map = base.clone();
            edit(&mut map);
            let bytes = craft(&key, Value::Map(map));
            let err = verify_manifest(&bytes, &trusted).unwrap_err();
            assert!(matches!(err, FirmwareError::Malformed(_)), "{name}: {err}");
            assert!(
                matches!(decode_unverified(&bytes), Err(FirmwareError::Malformed(_))),
                "{name}"
            );
        }
        // A manifest version beyond u32 is unsupported, not malformed.
        let mut map = base.clone();
        map[0].1 = Value::Integer(u64::MAX.into());
        assert!(matches!(
            verify_manifest(&craft(&key, Value::Map(map)), &trusted),
            Err(FirmwareError::Invalid(_))
        ));
        // Not a map, garbage, too large, a command's content type.
        assert!(matches!(
            verify_manifest(&craft(&key, Value::Array(vec![])), &trusted),
            Err(FirmwareError::Malformed(_))
        ));
        for bytes in [
            vec![],
            b"firmware".to_vec(),
            vec![0; MAX_MANIFEST_BYTES + 1],
        ] {
            assert!(matches!(
                verify_manifest(&bytes, &trusted),
                Err(FirmwareError::Malformed(_))
            ));
            assert!(matches!(
                decode_unverified(&bytes),
                Err(FirmwareError::Malformed(_))
            ));
        }
        let cmd = crate::cose::sign(
            &key,
            crate::command::CONTENT_TYPE,
            MANIFEST_AAD,
            cose::encode_cbor(&good.to_value()).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            verify_manifest(&cmd, &trusted),
            Err(FirmwareError::Malformed(_))
        ));
    }

    #[test]
    fn chunks_round_trip_and_reassemble() {
        let image: Vec<u8> = (0..(2 * MAX_CHUNK_BYTES + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        let digest: [u8; 32] = Sha256::digest(&image).into();
        let parts = chunks(digest, &image);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[2].data.len(), 100);
        let mut rebuilt = Vec::new();
        for c in &parts {
            assert_eq!(c.offset, rebuilt.len() as u64);
            let decoded = Chunk::decode(&c.encode()).unwrap();
            assert_eq!(&decoded, c);
            rebuilt.extend_from_slice(&decoded.data);
        }
        assert_eq!(rebuilt, image);
        assert!(chunks(digest, &[]).is_empty());
        // The encoding is the CBOR ciborium reads, for every head size.
        for offset in [0, 23, 24, 255, 256, 65_535, 65_536, u64::from(u32::MAX) + 1] {
            let c = Chunk {
                digest,
                offset,
                data: vec![1; 30],
            };
            let Value::Array(items) = cose::decode_cbor(&c.encode()).unwrap() else {
                panic!()
            };
            assert_eq!(items[1], Value::Integer(offset.into()));
            if offset < MAX_IMAGE_BYTES {
                assert_eq!(Chunk::decode(&c.encode()).unwrap(), c);
            }
        }
    }

    #[test]
    fn malformed_chunks_are_refused() {
        let digest = [9u8; 32];
        let good = Chunk {
            digest,
            offset: 0,
            data: vec![1, 2, 3],
        }
        .encode();
        let enc = |v: Value| cose::encode_cbor(&v).unwrap();
        let b = |n: usize| Value::Bytes(vec![0; n]);
        let u = |n: u64| Value::Integer(n.into());
        let cases = [
            ("empty", vec![]),
            ("map", enc(Value::Map(vec![]))),
            ("two elements", enc(Value::Array(vec![b(32), u(0)]))),
            (
                "four elements",
                enc(Value::Array(vec![b(32), u(0), b(1), u(0)])),
            ),
            ("short digest", enc(Value::Array(vec![b(31), u(0), b(1)]))),
            (
                "text data",
                enc(Value::Array(vec![b(32), u(0), Value::Text("x".into())])),
            ),
            (
                "negative offset",
                enc(Value::Array(vec![b(32), Value::Integer((-1).into()), b(1)])),
            ),
            (
                "data too large",
                enc(Value::Array(vec![b(32), u(0), b(MAX_CHUNK_BYTES + 1)])),
            ),
            (
                "beyond the largest image",
                enc(Value::Array(vec![b(32), u(MAX_IMAGE_BYTES), b(1)])),
            ),
            (
                "offset overflows",
                enc(Value::Array(vec![b(32), u(u64::MAX), b(1)])),
            ),
            ("trailing byte", {
                let mut g = good.clone();
                g.push(0);
                g
            }),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("too large", vec![0; MAX_CHUNK_ENCODED + 1]),
        ];
        for (name, bytes) in cases {
            assert!(
                matches!(Chunk::decode(&bytes), Err(FirmwareError::Malformed(_))),
                "{name}"
            );
        }
        assert!(
            Chunk::decode(&enc(Value::Array(vec![
                b(32),
                u(MAX_IMAGE_BYTES - 1),
                b(1)
            ])))
            .is_ok()
        );
        assert!(Chunk::decode(&enc(Value::Array(vec![b(32), u(0), b(MAX_CHUNK_BYTES)]))).is_ok());
    }

    /// The manufacturer key of the §10 vector: PKCS#8 v1 of the RFC 8032 test 2 seed.
    const VECTOR_KEY: &str = "302e020100300506032b6570042204204ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb";

    fn vector_manifest() -> Manifest {
        Manifest {
            expires_at: Some(OffsetDateTime::from_unix_timestamp(1_738_843_200).unwrap()),
            ..manifest(5, IMAGE)
        }
    }

    #[test]
    #[ignore = "generator: run with --ignored --nocapture to print the §10 vector"]
    fn print_wire_format_vector() {
        let key = SigningKey::from_pkcs8_der(&hex::decode(VECTOR_KEY).unwrap()).unwrap();
        let bytes = sign_manifest(&key, &vector_manifest()).unwrap();
        let sign1 = CoseSign1::from_tagged_slice(&bytes).unwrap();
        println!("```firmware-vector");
        println!("private_key_pkcs8: {VECTOR_KEY}");
        println!("public_key_spki: {}", hex::encode(key.public_key_spki()));
        println!("kid: {}", hex::encode(key.kid()));
        println!("image: {}", hex::encode(IMAGE));
        println!("payload: {}", hex::encode(sign1.payload.as_ref().unwrap()));
        println!("manifest: {}", hex::encode(&bytes));
        println!(
            "chunk: {}",
            hex::encode(chunks(vector_manifest().digest, IMAGE)[0].encode())
        );
        println!("```");
    }

    #[test]
    fn wire_format_firmware_vector_is_reproduced() {
        let mut block = spec_block("firmware-vector");
        let key = SigningKey::from_pkcs8_der(
            &hex::decode(block.remove("private_key_pkcs8").unwrap()).unwrap(),
        )
        .unwrap();
        let m = vector_manifest();
        let bytes = sign_manifest(&key, &m).unwrap();
        let sign1 = CoseSign1::from_tagged_slice(&bytes).unwrap();
        let parts = chunks(m.digest, IMAGE);
        assert_eq!(parts.len(), 1);
        let expected = [
            ("public_key_spki", hex::encode(key.public_key_spki())),
            ("kid", hex::encode(key.kid())),
            ("image", hex::encode(IMAGE)),
            ("payload", hex::encode(sign1.payload.as_ref().unwrap())),
            ("manifest", hex::encode(&bytes)),
            ("chunk", hex::encode(parts[0].encode())),
        ];
        for (name, value) in expected {
            assert_eq!(block.remove(name), Some(value.as_str()), "{name}");
        }
        assert!(block.is_empty(), "unchecked vector lines: {block:?}");
        let v = verify_manifest(
            &bytes,
            &[VerifyingKey::from_spki_der(key.public_key_spki()).unwrap()],
        )
        .unwrap();
        assert_eq!(check_install(&v, &installed(4), IMAGE, now()), Ok(()));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let key = eddsa().verifying_key().unwrap();
            let _ = verify_manifest(&bytes, std::slice::from_ref(&key));
            let _ = decode_unverified(&bytes);
            let _ = Chunk::decode(&bytes);
        }

        #[test]
        fn parsers_never_panic_on_mutations(
            i in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            static SIGNED: std::sync::OnceLock<(VerifyingKey, Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
            let (key, manifest_bytes, chunk) = SIGNED.get_or_init(|| {
                let k = eddsa();
                let m = sign_manifest(&k, &manifest(5, IMAGE)).unwrap();
                let c = Chunk { digest: [1; 32], offset: 300, data: IMAGE.to_vec() }.encode();
                (k.verifying_key().unwrap(), m, c)
            });
            for original in [manifest_bytes, chunk] {
                let mut bad = original.clone();
                let at = i.index(bad.len());
                bad[at] = byte;
                bad.truncate(cut.index(bad.len() + 1));
                let _ = verify_manifest(&bad, std::slice::from_ref(key));
                let _ = decode_unverified(&bad);
                let _ = Chunk::decode(&bad);
            }
        }
    }
}
