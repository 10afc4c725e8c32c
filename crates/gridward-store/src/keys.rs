//! Encryption at rest: where the store's key-encryption key comes from, and what the key
//! listing shows. The sealing itself is [`gridward_vault`]'s; the store keeps the wrapped data
//! keys beside the data (schema version 5) and seals every reading's register, every stored
//! envelope and every meter's last register before it writes them.
//!
//! - A data key per period ([`DEFAULT_KEY_PERIOD`]): the store starts a new one by itself when
//!   the active key is older, or on [`SqliteStore::rotate_key`](crate::SqliteStore::rotate_key)
//!   (`gridward keys rotate`). Older keys stay and keep their rows readable.
//! - [`SqliteStore::rewrap`](crate::SqliteStore::rewrap) (`gridward keys rewrap`) wraps every
//!   data key under a new key-encryption key in one transaction; the data is not touched.
//! - [`SqliteStore::destroy_key`](crate::SqliteStore::destroy_key) (`gridward keys destroy`)
//!   erases a data key: its rows can no longer be read (crypto-shredding for retention); the
//!   readings queries skip them.
//! - A running head-end notices keys changed by another process (a `generation` counter read at
//!   the start of each operation) and reloads them: rotation needs no restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gridward_vault::{Fingerprint, KdfParams, Kek};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// How long a data key is the active one before the store starts a new one: 30 days.
pub const DEFAULT_KEY_PERIOD: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where the key-encryption key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A key file (`gridward-kek-v1 <hex>`, mode 0600).
    File {
        /// The file.
        path: PathBuf,
        /// Create the file with a new key if it is missing and the database has no keys yet
        /// (`gridward serve` on a new database); commands that only read never create one.
        create: bool,
    },
    /// A passphrase, stretched with Argon2id; the salt and parameters are kept in the
    /// database (`params` are used only for a new database).
    Passphrase {
        /// The passphrase.
        passphrase: Arc<Zeroizing<Vec<u8>>>,
        /// Argon2id parameters for a new database.
        params: KdfParams,
    },
    /// A key held in memory only (tests, in-memory stores).
    Memory(Arc<Kek>),
}

impl KeySource {
    /// The key file at `path`, created when the database is new.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::File {
            path: path.into(),
            create: true,
        }
    }

    /// The key file at `path`, which must exist.
    pub fn existing_file(path: impl Into<PathBuf>) -> Self {
        Self::File {
            path: path.into(),
            create: false,
        }
    }

    /// A new random key in memory.
    ///
    /// # Errors
    ///
    /// The random generator failed.
    pub fn ephemeral() -> Result<Self, gridward_vault::VaultError> {
        Ok(Self::Memory(Arc::new(Kek::generate()?)))
    }
}

/// One data key, as `gridward keys list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataKeyInfo {
    /// The key's id (in every sealed value's header).
    pub id: u32,
    /// When it was made.
    pub created_at: OffsetDateTime,
    /// When it was destroyed, if it was.
    pub destroyed_at: Option<OffsetDateTime>,
    /// Messages sealed under it.
    pub messages: u64,
    /// Whether new rows are sealed with it.
    pub active: bool,
}

/// The keys of a database.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
    /// The key-encryption key's fingerprint.
    pub kek_fingerprint: Fingerprint,
    /// `key_file` or `argon2id`.
    pub kdf: String,
    /// The data keys, oldest first.
    pub keys: Vec<DataKeyInfo>,
    /// Messages written before encryption at rest and not yet sealed.
    pub plaintext_messages: u64,
}
