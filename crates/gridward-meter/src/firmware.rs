//! The meter's firmware: two slots (A/B), the transfer of a new image, and the install decision
//! (sans-IO).
//!
//! ```text
//!   firmware_update command (verified) ─► verify_manifest (manufacturer keys) ─► check_manifest
//!        │ refused: ack at once                                                    │ ok
//!        ▼                                                                         ▼
//!   Transfer: chunks on meters/{id}/firmware, assembled by offset, until `size` bytes or the deadline
//!        │ complete: check_install (size, digest) ─► write the inactive slot ─► "reboot" into it
//!        │                                             ─► self-test ─► confirm (Done) | fall back
//!        └ deadline passed: FirmwareIncomplete                              (FirmwareNotConfirmed)
//! ```
//!
//! Chunks are not signed: whatever arrives, only an image whose size and SHA-256 equal the signed
//! manifest's is ever written to a slot.

use std::fmt;

use gridward_core::command::CommandId;
use gridward_core::firmware::{self, Chunk, FirmwareError, Installed, VerifiedManifest};
use time::OffsetDateTime;

/// One of the two firmware slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Slot {
    /// Slot A (the factory slot).
    #[default]
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    /// `A` or `B`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "A",
            Self::B => "B",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::A => 0,
            Self::B => 1,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two slots and which one runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    /// The running slot.
    pub active: Slot,
    /// Contents of slot A and slot B (`None`: empty, or an image that failed to confirm).
    pub images: [Option<Installed>; 2],
}

impl Slots {
    /// Factory state: `factory` in slot A, B empty.
    pub fn factory(factory: Installed) -> Self {
        Self {
            active: Slot::A,
            images: [Some(factory), None],
        }
    }

    /// What runs now. A state whose active slot is empty (only possible from a hand-edited state
    /// file) reports `fallback`.
    pub fn installed<'a>(&'a self, fallback: &'a Installed) -> &'a Installed {
        self.slot(self.active).unwrap_or(fallback)
    }

    /// The contents of `slot`.
    pub fn slot(&self, slot: Slot) -> Option<&Installed> {
        self.images.get(slot.index()).and_then(Option::as_ref)
    }

    fn set(&mut self, slot: Slot, image: Option<Installed>) {
        if let Some(s) = self.images.get_mut(slot.index()) {
            *s = image;
        }
    }

    /// Writes `image` to the inactive slot and boots it: `boots` says whether the self-test after
    /// the reboot succeeds. On success the new slot is active (and confirmed); otherwise the
    /// meter falls back to the old slot and the failed image is erased.
    pub fn install(&mut self, image: Installed, boots: bool) -> bool {
        let target = self.active.other();
        self.set(target, Some(image));
        if boots {
            self.active = target;
            true
        } else {
            self.set(target, None);
            false
        }
    }
}

/// An image being received for a verified manifest.
#[derive(Debug)]
pub struct Transfer {
    command_id: CommandId,
    manifest: VerifiedManifest,
    deadline: OffsetDateTime,
    image: Vec<u8>,
    /// Received byte ranges `[start, end)`, sorted and merged.
    received: Vec<(u64, u64)>,
}

/// What a chunk did to a [`Transfer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkResult {
    /// Stored; the image is not complete yet.
    Stored {
        /// Bytes received so far.
        received: u64,
        /// Bytes expected.
        size: u64,
    },
    /// Every byte is there: install it.
    Complete,
    /// The chunk lies (partly) beyond the manifest's size: the transfer fails.
    TooLarge(FirmwareError),
}

impl Transfer {
    /// A transfer for `command_id`'s verified `manifest`, abandoned at `deadline`.
    pub fn new(
        command_id: CommandId,
        manifest: VerifiedManifest,
        deadline: OffsetDateTime,
    ) -> Self {
        Self {
            command_id,
            manifest,
            deadline,
            image: Vec::new(),
            received: Vec::new(),
        }
    }

    /// The command that started it.
    pub fn command_id(&self) -> CommandId {
        self.command_id
    }

    /// The manifest.
    pub fn manifest(&self) -> &VerifiedManifest {
        &self.manifest
    }

    /// When it is given up as incomplete.
    pub fn deadline(&self) -> OffsetDateTime {
        self.deadline
    }

    /// Bytes received so far (overlaps counted once).
    pub fn received(&self) -> u64 {
        self.received.iter().map(|(s, e)| e - s).sum()
    }

    /// The image as received (complete once [`ChunkResult::Complete`] was returned).
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// Whether `chunk` belongs to this transfer (its digest names the manifest's image).
    pub fn wants(&self, chunk: &Chunk) -> bool {
        chunk.digest == self.manifest.manifest().digest
    }

    /// Stores `chunk` (which [`wants`](Self::wants) accepted) at its offset. Chunks may come in
    /// any order and again; a later copy of a byte overwrites an earlier one (the digest decides).
    pub fn store(&mut self, chunk: &Chunk) -> ChunkResult {
        let size = self.manifest.manifest().size;
        let len = chunk.data.len() as u64;
        let end = chunk.offset.checked_add(len);
        let Some(end) = end.filter(|&e| e <= size) else {
            return ChunkResult::TooLarge(FirmwareError::SizeMismatch {
                expected: size,
                actual: end.unwrap_or(u64::MAX),
            });
        };
        if len > 0 {
            // Both fit a usize: `end <= size <= MAX_IMAGE_BYTES` (verified manifest).
            let (start, stop) = (chunk.offset as usize, end as usize);
            if self.image.len() < stop {
                self.image.resize(stop, 0);
            }
            if let Some(dst) = self.image.get_mut(start..stop) {
                dst.copy_from_slice(&chunk.data);
            }
            self.add_range(chunk.offset, end);
        }
        if self.received.as_slice() == [(0, size)] {
            ChunkResult::Complete
        } else {
            ChunkResult::Stored {
                received: self.received(),
                size,
            }
        }
    }

    fn add_range(&mut self, start: u64, end: u64) {
        self.received.push((start, end));
        self.received.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.received.len());
        for &(s, e) in &self.received {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.received = merged;
    }
}

/// Verifies `manifest` against `manufacturers` and checks it against `installed` at `now`: what
/// a meter decides before it downloads anything.
///
/// # Errors
///
/// The [`FirmwareError`] of the first failed rule (see [`FirmwareError::refusal`] for its code).
pub fn accept_manifest(
    manifest: &[u8],
    manufacturers: &[gridward_core::envelope::VerifyingKey],
    installed: &Installed,
    now: OffsetDateTime,
) -> Result<VerifiedManifest, FirmwareError> {
    let verified = firmware::verify_manifest(manifest, manufacturers)?;
    firmware::check_manifest(&verified, installed, now)?;
    Ok(verified)
}

/// The `Installed` record an accepted manifest produces.
pub fn installed_from(manifest: &VerifiedManifest) -> Installed {
    let m = manifest.manifest();
    Installed {
        vendor_id: m.vendor_id.clone(),
        class_id: m.class_id.clone(),
        version: m.version.clone(),
        sequence: m.sequence,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn fw(version: &str, sequence: u64) -> Installed {
        Installed {
            vendor_id: "v".into(),
            class_id: "c".into(),
            version: version.into(),
            sequence,
        }
    }

    #[test]
    fn install_switches_slots_or_falls_back() {
        let mut s = Slots::factory(fw("1.0.0", 0));
        assert!(s.install(fw("1.1.0", 1), true));
        assert_eq!(s.active, Slot::B);
        assert_eq!(s.installed(&fw("x", 9)), &fw("1.1.0", 1));
        assert_eq!(s.slot(Slot::A), Some(&fw("1.0.0", 0)));
        // A failing image: back to B, slot A erased.
        assert!(!s.install(fw("1.2.0", 2), false));
        assert_eq!(s.active, Slot::B);
        assert_eq!(s.slot(Slot::A), None);
        assert_eq!(s.installed(&fw("x", 9)).version, "1.1.0");
    }
}
