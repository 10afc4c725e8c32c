//! # gridward-core
//!
//! The sans-IO heart of Gridward: what a meter says, how it is signed, and whether it is fresh.
//! Nothing in this crate opens a socket, a file or reads the clock: bytes and `now` go in,
//! typed results come out, so every attack can be replayed in memory, deterministically.
//!
//! ```text
//!   meter bytes ──► envelope::decode ──► envelope::verify(key, topic) ──► VerifiedEnvelope
//!                                                                             │
//!                         replay::ReplayGuard::check(counter, timestamp, now) ◄┘
//!                                                                             │
//!                                   document::parse (XML or JSON, strict) ◄───┘
//! ```
//!
//! - [`meter_id`]: the validated [`MeterId`] shared by certificates, topics and documents.
//! - [`document`]: reading and event documents in XML and JSON, strict parsing, XML → JSON.
//! - [`downstream`]: the JSON body of a reading forwarded to billing/MDM, shared by sender
//!   and receiver.
//! - [`envelope`]: the COSE_Sign1 (RFC 9052) envelope every meter message travels in;
//!   only verification produces a [`envelope::VerifiedEnvelope`].
//! - [`replay`]: the per-meter counter and time-window check.
//! - [`backoff`]: retry delays, exponential with full jitter (the randomness is passed in).
//! - [`command`]: commands signed by the head-end's command key, the meter's checks
//!   ([`command::verify`]) and its acknowledgement ([`command::CommandAck`]).
//! - [`firmware`]: manufacturer-signed firmware manifests, image chunks and the meter's install
//!   decision ([`firmware::check_install`]).
//! - [`security`]: [`security::SecurityEvent`] and the stable reason codes every refusal carries.
//! - [`httpsig`]: HTTP Message Signatures (RFC 9421) and `Content-Digest` (RFC 9530) for the
//!   requests Gridward forwards downstream; only [`httpsig::verify_request`] produces a
//!   [`httpsig::VerifiedSignature`].
//!
//! The wire format is specified in `docs/wire-format.md` at the repository root.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod command;
mod cose;
pub mod document;
pub mod downstream;
pub mod envelope;
pub mod firmware;
pub mod httpsig;
pub mod meter_id;
pub mod relay;
pub mod replay;
pub mod security;

pub use meter_id::{MeterId, MeterIdError};
