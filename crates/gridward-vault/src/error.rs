//! Why a key could not be loaded or a sealed value could not be opened.

use std::path::PathBuf;

/// A key-encryption key or a data key could not be made, loaded or unwrapped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// Reading, creating or writing a key file failed.
    #[error("{action} key file {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The key file may be read by others than its owner.
    #[error(
        "key file {path} has mode {mode:o}: others may read it; run `chmod 600 {path}` after checking who copied it"
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not a Gridward key-encryption key.
    #[error("{path} is not a Gridward key file: {reason}")]
    MalformedKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// A key file was to be created where one exists.
    #[error("key file {0} exists already; refusing to overwrite a key (move it away first)")]
    KeyFileExists(PathBuf),
    /// Argon2id parameters weaker than the minimum.
    #[error("Argon2id parameters too weak: {0}")]
    WeakKdf(&'static str),
    /// The passphrase is empty.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// A wrapped data key did not unwrap under this key-encryption key (wrong key, or the
    /// wrapped key was altered).
    #[error(
        "data key {id} does not unwrap under this key-encryption key (wrong key, or the wrapped key was altered)"
    )]
    Unwrap {
        /// The data key.
        id: u32,
    },
    /// The operating system's random generator or the cipher failed.
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

/// A sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Too short or of an unknown version: not a sealed value.
    #[error("not a sealed value ({0})")]
    Malformed(&'static str),
    /// The value was sealed under a data key this keyring does not hold (destroyed, or from
    /// another database).
    #[error("sealed under data key {0}, which this keyring does not hold (destroyed?)")]
    UnknownKey(u32),
    /// The value was sealed under a data key that was destroyed (crypto-shredding).
    #[error("sealed under data key {0}, which was destroyed")]
    Destroyed(u32),
    /// Authentication failed: the ciphertext, its header or its context (row, meter, counter,
    /// field) is not the one it was sealed with.
    #[error(
        "sealed value under data key {key_id} fails authentication: altered, or moved from another row"
    )]
    Authentication {
        /// The data key named in the header.
        key_id: u32,
    },
    /// Sealing refused (too many values under the active key, or no active key).
    #[error("cannot seal: {0}")]
    Seal(&'static str),
}
