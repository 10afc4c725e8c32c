//! [`ExportError`]: every reason an export is refused or fails.

use std::path::PathBuf;

/// Why an export (or its key file, or its groups file) was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The key file does not exist.
    #[error("no export key at {path} (create one with `gridward export keygen --out {path}`)")]
    KeyFileMissing {
        /// The path given.
        path: PathBuf,
    },
    /// The key file exists but cannot be read.
    #[error("cannot read the export key {path}: {source}")]
    KeyFileUnreadable {
        /// The path given.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The key file may be read or written by its group or by others.
    #[error(
        "the export key {path} is open to other users (mode {mode:04o}): run `chmod 600 {path}`, \
         and make a new key if someone else may have read it"
    )]
    KeyFileExposed {
        /// The path given.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not one line of hexadecimal.
    #[error("the export key {path} is not a key written by `gridward export keygen`: {reason}")]
    KeyFileMalformed {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The key file holds a key of the wrong length.
    #[error(
        "the export key {path} holds {found} bytes, not {expected} (a key from \
         `gridward export keygen` is 64 hexadecimal digits)"
    )]
    KeyWrongLength {
        /// The path given.
        path: PathBuf,
        /// How many bytes it holds.
        found: usize,
        /// How many a key has ([`crate::KEY_LEN`]).
        expected: usize,
    },
    /// `keygen` would overwrite an existing file.
    #[error("{path} exists: a key is never overwritten (pick another path, or remove it first)")]
    KeyFileExists {
        /// The path given.
        path: PathBuf,
    },
    /// Writing the key file failed.
    #[error("cannot write the export key {path}: {source}")]
    KeyFileWrite {
        /// The path given.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// Not one of `15m`, `1h`, `1d`.
    #[error("resolution {0:?} is not one of 15m, 1h, 1d")]
    BadResolution(String),
    /// Not one of `csv`, `json`, `parquet`.
    #[error("format {0:?} is not one of csv, json, parquet")]
    BadFormat(String),
    /// `to` is not after `from`.
    #[error("the time range is empty: `to` ({to}) must be after `from` ({from})")]
    EmptyRange {
        /// The start given (RFC 3339).
        from: String,
        /// The end given (RFC 3339).
        to: String,
    },
    /// `from` or `to` is not on a bucket boundary, so a bucket would be cut.
    #[error(
        "{which} ({at}) is not on a {resolution} boundary (UTC), so its bucket would be \
         incomplete: use e.g. {suggestion}"
    )]
    UnalignedRange {
        /// `from` or `to`.
        which: &'static str,
        /// The time given (RFC 3339).
        at: String,
        /// The resolution's code.
        resolution: &'static str,
        /// The boundary just before it (RFC 3339).
        suggestion: String,
    },
    /// The range holds more buckets than the caller allows.
    #[error("the range holds {buckets} buckets of {resolution}, more than the {max} allowed")]
    RangeTooLong {
        /// Buckets in the range.
        buckets: i64,
        /// The resolution's code.
        resolution: &'static str,
        /// The limit.
        max: i64,
    },
    /// The minimum group size is below 2 (a group of one is one meter's data).
    #[error("k = {0} is too small: the smallest group shown must have at least 2 meters")]
    KTooSmall(usize),
    /// A line of a groups file is wrong.
    #[error("groups file, line {line}: {reason}")]
    GroupsFile {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A meter's readings were given twice to the same export.
    #[error("the readings of meter {0} were added twice")]
    DuplicateMeter(String),
    /// A register value is not a finite, non-negative number.
    #[error("meter {meter}: register {value} kWh is not a finite, non-negative number")]
    BadRegister {
        /// The meter.
        meter: String,
        /// The value.
        value: f64,
    },
    /// A meter's register decreased over time (the store refuses such readings, so the input
    /// is not what the store holds).
    #[error("meter {meter}: the register went down from {before} to {after} kWh")]
    RegisterWentBackwards {
        /// The meter.
        meter: String,
        /// The earlier register.
        before: f64,
        /// The later, lower register.
        after: f64,
    },
    /// Writing the output failed.
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    /// The Parquet writer failed.
    #[error("writing the Parquet file: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// The JSON writer failed.
    #[error("writing the JSON export: {0}")]
    Json(#[from] serde_json::Error),
}
