//! # gridward-vault
//!
//! The keys that protect data at rest, and the sealing of values with them. No storage and no
//! network: the store keeps the wrapped data keys and the sealed values; this crate turns bytes
//! and keys into sealed bytes and back.
//!
//! ```text
//!   key file (0600) ──┐
//!                     ├─► Kek ──wrap/unwrap──► DataKey (one per period, id u32) ──► Keyring
//!   passphrase ───────┘   (Argon2id + salt)                                            │
//!                                                                                       ▼
//!              plaintext + Context (field, meter id, counter) ──seal──► 1 ‖ key id ‖ nonce ‖ ciphertext ‖ tag
//! ```
//!
//! - [`kek`]: the key-encryption key ([`Kek`]): a 32-byte random key in a key file only its
//!   owner may read, or derived from a passphrase with Argon2id; its [`fingerprint`](Kek::fingerprint)
//!   tells which key a database was wrapped with without revealing it. It wraps and unwraps the
//!   data keys (AES-256-GCM, the data key's id bound as associated data).
//! - [`keyring`]: [`DataKey`]s by id, the active one, and [`Keyring::seal`] /
//!   [`Keyring::open`]: AES-256-GCM with a random 96-bit nonce per value and a [`Context`]
//!   (what the value is, which meter, which counter) bound as associated data, so a sealed value
//!   copied to another row, another meter or another field fails to open.
//! - [`error`]: [`VaultError`] (keys) and [`OpenError`] (a sealed value that does not open).
//!
//! ## Nonces and key lifetimes
//!
//! Nonces are random (96 bits from the operating system's generator via aws-lc-rs). NIST SP
//! 800-38D bounds random-nonce AES-GCM to 2³² messages per key; a data key is replaced every
//! period (30 days by default) and [`Keyring::seal`] refuses to seal more than
//! [`MAX_SEALS_PER_KEY`] values under one key in this process, asking for a rotation instead.

#![forbid(unsafe_code)]

pub mod error;
pub mod kek;
pub mod keyring;

pub use error::{OpenError, VaultError};
pub use kek::{Fingerprint, Kdf, KdfParams, Kek};
pub use keyring::{Context, DataKey, Field, Keyring, MAX_SEALS_PER_KEY};
