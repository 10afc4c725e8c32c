//! # gridward-export
//!
//! Turning stored readings into an export for a third party (issue 12 §2): meter ids replaced by
//! keyed pseudonyms, times coarsened to 15-minute, hourly or daily buckets, optional sums per
//! group with the groups of fewer than `k` meters left out, and CSV, JSON or Parquet that state
//! what was done.
//!
//! ## The boundary
//!
//! Pure functions over rows: no storage, no network, no clock (the caller passes
//! `generated_at`), no randomness (the caller makes keys). The callers — `gridward export` and
//! the API's `GET /api/v1/me/export` — read the store and hand each meter's readings to an
//! [`Exporter`]. The only files it touches are the export key file it is pointed at
//! ([`ExportKey::load`], [`ExportKey::write_new`]); the writers write to any `io::Write`.
//!
//! ## Modules
//!
//! - [`key`]: the export key (32 bytes, one per recipient) and its private key file.
//! - [`pseudonym`]: [`Pseudonymiser`], HMAC-SHA-256 pseudonyms of meters and groups.
//! - [`resolution`]: [`Resolution`], the UTC buckets.
//! - [`groups`]: [`Groups`], from the concentrator topology or a `meter_id,group` file.
//! - [`export`]: [`ExportSpec`], [`Exporter`], the rows and the [`Metadata`]; what `kwh` means.
//! - [`write`]: the CSV, JSON and Parquet writers.
//! - [`error`]: the one error type, [`ExportError`].
//!
//! ## What it does not protect against
//!
//! A pseudonym hides the id and cannot be joined across recipients' keys, but a per-meter series
//! is still a series: two recipients holding the same meter's values at the same times can match
//! them by value. Recipients who must not single out a household get aggregates. Suppression of
//! small groups is per export; overlapping exports with different groupings can be differenced,
//! which is the operator's to avoid.

#![forbid(unsafe_code)]

pub mod error;
pub mod export;
pub mod groups;
pub mod key;
pub mod pseudonym;
pub mod resolution;
pub mod write;

#[cfg(test)]
mod tests;

pub use error::ExportError;
pub use export::{
    Aggregation, DEFAULT_K, Export, ExportSpec, Exporter, GroupRow, MIN_K, Metadata, MeterRow,
    ReadingRow, Rows, export,
};
pub use groups::{GroupSource, Groups};
pub use key::{ExportKey, KEY_LEN};
pub use pseudonym::Pseudonymiser;
pub use resolution::Resolution;
pub use write::{OutputFormat, write};
