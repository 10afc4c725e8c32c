//! Firmware manifests in the spirit of SUIT (RFC 9124), signed by the *manufacturer's* key
//! (never the head-end's), and the meter's install decision (sans-IO).
//!
//! A manifest is a tagged COSE_Sign1 with content type [`CONTENT_TYPE`], external AAD
//! [`MANIFEST_AAD`], and a CBOR map payload: manifest version, sequence number (monotonically
//! increasing: anti-rollback), vendor id, class id, version `X.Y.Z`, SHA-256 digest and size of
//! the image, optional expiry, optional `rollback_from` (see [`Manifest::rollback_from`]).
//! The image travels to the meter in [`Chunk`]s; [`check_install`] decides.

use time::OffsetDateTime;

use crate::command::Refusal;
use crate::envelope::{SigningKey, VerifyingKey};

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
    pub fn validate(&self) -> Result<(), FirmwareError> {
        todo!()
    }
}

/// Signs `manifest` with a manufacturer key.
///
/// # Errors
///
/// [`FirmwareError::Invalid`] if the manifest does not validate; [`FirmwareError::Malformed`] if
/// encoding or signing fails.
pub fn sign_manifest(key: &SigningKey, manifest: &Manifest) -> Result<Vec<u8>, FirmwareError> {
    todo!("{key:?} {manifest:?}")
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
pub fn verify_manifest(
    bytes: &[u8],
    manufacturers: &[VerifyingKey],
) -> Result<VerifiedManifest, FirmwareError> {
    todo!("{bytes:?} {manufacturers:?}")
}

/// Reads a manifest without verifying it (for the head-end's listing of an upload it is about
/// to verify, and for tests); never for a decision.
pub fn decode_unverified(bytes: &[u8]) -> Result<Manifest, FirmwareError> {
    todo!("{bytes:?}")
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
    todo!("{manifest:?} {installed:?} {} {now}", image.len())
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
    todo!("{manifest:?} {installed:?} {now}")
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
        todo!()
    }

    /// Decodes a chunk.
    ///
    /// # Errors
    ///
    /// [`FirmwareError::Malformed`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FirmwareError> {
        todo!("{bytes:?}")
    }
}

/// The chunks of `image`, [`MAX_CHUNK_BYTES`] each (the last one shorter).
pub fn chunks(digest: [u8; 32], image: &[u8]) -> Vec<Chunk> {
    todo!("{digest:?} {}", image.len())
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
        todo!()
    }
}
