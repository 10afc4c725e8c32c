//! [`Commands::upload_firmware`]: an image enters the head-end only with a manifest signed by a
//! trusted manufacturer key (never the head-end's own command key), whose digest and size match
//! the image.

use gridward_audit::{Actor, Outcome};
use gridward_core::envelope::VerifyingKey;
use gridward_core::firmware::{self, FirmwareError, MAX_IMAGE_BYTES};
use gridward_store::{NewFirmware, StoreError};
use sha2::{Digest, Sha256};

use crate::issue::Commands;

/// Why an upload was refused or failed. Nothing was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirmwareUploadError {
    /// The uploader is not named.
    #[error("the upload names no operator")]
    NoActor,
    /// The manifest did not verify against the trusted manufacturer keys (malformed, unknown
    /// signer such as the head-end's key, bad signature, invalid fields).
    #[error("manifest refused: {0}")]
    Manifest(FirmwareError),
    /// The manifest is signed by the head-end's own command key, even though that key is
    /// configured as a manufacturer key: firmware is signed by the manufacturer only. Remove the
    /// head-end key from the manufacturer keys.
    #[error(
        "manifest signed by the head-end's command key; firmware must be signed by the manufacturer"
    )]
    SignedByHeadEnd,
    /// The image's size differs from the manifest's.
    #[error("image is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// The manifest's size.
        expected: u64,
        /// The image's size.
        actual: u64,
    },
    /// The image's SHA-256 differs from the manifest's digest.
    #[error("image digest differs from the manifest's: wrong image for this manifest")]
    DigestMismatch,
    /// The manifest has already expired: meters would refuse it.
    #[error("manifest expired at {0}; ask the manufacturer for a current one")]
    Expired(time::OffsetDateTime),
    /// An image with this digest is stored already.
    #[error("this image is already uploaded")]
    AlreadyStored,
    /// The store failed.
    #[error("store: {0}")]
    Store(StoreError),
}

impl FirmwareUploadError {
    fn is_denial(&self) -> bool {
        matches!(self, Self::Manifest(_) | Self::SignedByHeadEnd)
    }

    /// Whether the upload did not verify (a signature that is not a manufacturer's, the head-end's
    /// own key, an image that is not the manifest's): a `firmware_refused` security event, for
    /// whichever door it came through.
    pub fn is_security_refusal(&self) -> bool {
        matches!(
            self,
            Self::Manifest(_)
                | Self::SignedByHeadEnd
                | Self::SizeMismatch { .. }
                | Self::DigestMismatch
        )
    }
}

impl Commands {
    /// Verifies and stores a firmware image: the manifest's signature by one of `manufacturers`
    /// (and not by the head-end's command key), its expiry, the image's size and digest. Returns
    /// the firmware's id. Audited as `firmware.upload` (success, denied for a signature
    /// refusal, failure otherwise).
    ///
    /// # Errors
    ///
    /// A [`FirmwareUploadError`] naming the first failed check.
    pub fn upload_firmware(
        &self,
        manifest: &[u8],
        image: &[u8],
        manufacturers: &[VerifyingKey],
        actor: &str,
    ) -> Result<i64, FirmwareUploadError> {
        let result = self.upload_checked(manifest, image, manufacturers, actor);
        let who = if actor.is_empty() {
            Actor::System
        } else {
            crate::audit::actor(actor)
        };
        match &result {
            Ok(id) => {
                let detail = match self.store.firmware(*id) {
                    Ok(Some(f)) => format!(
                        "firmware {id}: {}/{} version {} sequence {}, {} bytes, sha256 {}",
                        f.vendor_id,
                        f.class_id,
                        f.version,
                        f.sequence,
                        f.size,
                        hex::encode(f.digest)
                    ),
                    _ => format!("firmware {id}"),
                };
                self.record(
                    who,
                    "firmware.upload",
                    format!("firmware:{id}"),
                    Outcome::Success,
                    detail,
                );
            }
            Err(e) => {
                let outcome = if e.is_denial() {
                    Outcome::Denied
                } else {
                    Outcome::Failure
                };
                self.record(
                    who,
                    "firmware.upload",
                    "",
                    outcome,
                    format!("{} bytes refused: {e}", image.len()),
                );
            }
        }
        result
    }

    fn upload_checked(
        &self,
        manifest: &[u8],
        image: &[u8],
        manufacturers: &[VerifyingKey],
        actor: &str,
    ) -> Result<i64, FirmwareUploadError> {
        if actor.is_empty() {
            return Err(FirmwareUploadError::NoActor);
        }
        let verified = firmware::verify_manifest(manifest, manufacturers)
            .map_err(FirmwareUploadError::Manifest)?;
        if verified.signer_kid() == self.signer().kid() {
            return Err(FirmwareUploadError::SignedByHeadEnd);
        }
        let m = verified.manifest();
        let now = (self.clock)();
        if let Some(exp) = m.expires_at
            && exp <= now
        {
            return Err(FirmwareUploadError::Expired(exp));
        }
        let actual = image.len() as u64;
        if actual != m.size || actual > MAX_IMAGE_BYTES {
            return Err(FirmwareUploadError::SizeMismatch {
                expected: m.size,
                actual,
            });
        }
        let digest: [u8; 32] = Sha256::digest(image).into();
        if digest != m.digest {
            return Err(FirmwareUploadError::DigestMismatch);
        }
        self.store
            .insert_firmware(&NewFirmware {
                digest,
                manifest: manifest.to_vec(),
                image: image.to_vec(),
                vendor_id: m.vendor_id.clone(),
                class_id: m.class_id.clone(),
                version: m.version.clone(),
                sequence: m.sequence,
                uploaded_by: actor.to_owned(),
                uploaded_at: now,
            })
            .map_err(|e| match e {
                StoreError::Conflict(_) => FirmwareUploadError::AlreadyStored,
                other => FirmwareUploadError::Store(other),
            })
    }
}
