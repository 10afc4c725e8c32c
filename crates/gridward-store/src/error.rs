//! [`StoreError`]: why a store operation failed.

use std::path::PathBuf;

use time::OffsetDateTime;

/// Why a store operation failed. A failed [`commit`](crate::Store::commit) stored nothing of
/// its batch: the caller must not acknowledge any of its messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The SQLite engine reported an error: I/O, a full disk, a damaged file, a lock held
    /// longer than the busy timeout, a constraint violated.
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database file does not exist and cannot be created (missing directory, permissions).
    #[error("cannot create database file {}: {source}", path.display())]
    CreateFile {
        /// The database path.
        path: PathBuf,
        /// What the operating system reported.
        source: std::io::Error,
    },
    /// The database was created or upgraded by a newer Gridward: its schema version is higher
    /// than this build knows. Nothing was changed.
    #[error(
        "database schema version {found} is newer than this build supports ({supported}); upgrade Gridward"
    )]
    SchemaTooNew {
        /// The database's schema version.
        found: i64,
        /// The newest schema version this build knows.
        supported: i64,
    },
    /// The file is an SQLite database that Gridward did not create (another application id,
    /// or tables in a database without one). Nothing was changed.
    #[error("not a Gridward database (SQLite application id {application_id:#010x})")]
    ForeignDatabase {
        /// The database's `PRAGMA application_id`.
        application_id: i32,
    },
    /// The database could not be put in write-ahead-log mode (SQLite answered with another
    /// journal mode, e.g. on a file system without shared memory); without WAL the store's
    /// durability and concurrency guarantees do not hold, so it refuses to run.
    #[error("the database cannot use WAL journal mode (SQLite kept {0:?})")]
    WalUnavailable(String),
    /// A stored value cannot be decoded: the database was changed outside Gridward or is damaged.
    #[error("corrupt data in table {table}: {detail}")]
    Corrupt {
        /// The table holding the value.
        table: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A time lies outside what the store represents (microseconds since 1970 in 64 bits,
    /// about ±292,000 years; unreachable with `time`'s default range).
    #[error("time {0} cannot be stored")]
    TimeOutOfRange(OffsetDateTime),
    /// An item of a batch cannot be stored (a value the head-end's validation should have
    /// refused). Nothing of the batch was stored.
    #[error("batch item {index} cannot be stored: {reason}")]
    InvalidItem {
        /// Position of the item in the batch.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A record with the same key is stored already (a command id, a meter's command counter,
    /// a firmware digest, a meter listed twice). Nothing was stored.
    #[error("already stored: {0}")]
    Conflict(String),
    /// The record the operation refers to does not exist. Nothing was changed.
    #[error("not found: {0}")]
    NotFound(String),
    /// A key could not be loaded, made or unwrapped (key file unreadable or open to others,
    /// a weak passphrase setting, a wrapped key that does not unwrap).
    #[error("{0}")]
    Key(#[from] gridward_vault::VaultError),
    /// The database's data keys are wrapped by a key file that is not there.
    #[error(
        "the key file {} is missing, and this database's readings are encrypted under it: restore the key file from where you keep it (without it they cannot be read), or point `[store] key_file` at it", path.display()
    )]
    KeyFileMissing {
        /// Where the key file was looked for.
        path: PathBuf,
    },
    /// The key given is not the one the database's data keys are wrapped with.
    #[error(
        "this key-encryption key (fingerprint {given}) is not the one this database's data keys are wrapped with ({expected}): use the key file or passphrase the database was created with (or last re-wrapped with)"
    )]
    KeyMismatch {
        /// The database's.
        expected: gridward_vault::Fingerprint,
        /// The one given.
        given: gridward_vault::Fingerprint,
    },
    /// The kind of key given does not match the database's (a passphrase for a database whose
    /// keys are wrapped by a key file, or the other way round).
    #[error("{0}")]
    KeyKindMismatch(&'static str),
    /// A sealed value failed to open: the database was altered outside Gridward, or a value
    /// was moved to another row. The value is not served.
    #[error(
        "row {row} of table {table} fails authentication ({reason}): the database was altered outside Gridward; the value is not served (restore the row from a backup)"
    )]
    Tampered {
        /// The table.
        table: &'static str,
        /// The row.
        row: i64,
        /// Why it did not open.
        reason: gridward_vault::OpenError,
    },
    /// The data key of a value was destroyed (crypto-shredding): the value cannot be read.
    #[error("data key {key_id} was destroyed: the values sealed under it cannot be read")]
    KeyDestroyed {
        /// The key.
        key_id: u32,
    },
    /// The request cannot be carried out as given (a value out of range). Nothing was changed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}
