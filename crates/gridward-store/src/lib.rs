//! # gridward-store
//!
//! Durable storage for the head-end, behind the [`Store`] trait: meters and their last counter,
//! readings and meter events (append-only, with the raw envelope kept for audit), and security
//! events. The embedded backend is SQLite ([`SqliteStore`]); the trait is shaped so a PostgreSQL
//! backend can follow without changing callers.
//!
//! ```text
//!   head-end ingest ── Vec<Accepted> ──► Store::commit ──► Vec<Outcome>  (one durable transaction)
//!                                           │                 Stored / Duplicate → acknowledge
//!                                           │                 Replay / RegisterWentBackwards → security event
//!                                           └─ + one outbox row per stored reading and target
//!   forwarder  ──► outbox_pending ──► (deliver) ──► outbox_settle
//!   command ack ──► Store::commit ──► command acknowledged | refused   (same transaction)
//!   rejections ──► Store::record_security_events
//!   CLI / API  ──► readings, meter_events, security_events, meters, counts
//! ```
//!
//! - [`model`]: the values that cross the trait ([`Accepted`], [`Outcome`], query and row types).
//! - [`store`]: the [`Store`] trait and its contract.
//! - [`commands`]: the downward path behind [`CommandStore`]: command counters, signed commands
//!   and their lifecycle, four-eyes proposals, firmware images and campaigns. A meter's
//!   acknowledgement is committed like an event and settles its command in the same transaction.
//! - [`alarms`]: alarms (one active per type and originator, acknowledged and cleared with who
//!   and when) and the concentrator topology, behind [`AlarmStore`]; [`SqliteStore`] implements
//!   it (schema version 4) and is usable as `Arc<dyn AlarmStore>`.
//! - [`outbox`]: the downstream outbox: one row per stored reading and target, written in the
//!   reading's transaction, settled by the forwarder.
//! - [`sqlite`]: [`SqliteStore`]: WAL, `synchronous = FULL`, batched transactions, migrations.
//! - [`keys`]: encryption at rest: [`KeySource`] (key file, passphrase), data keys per period,
//!   rotation, re-wrapping and crypto-shredding. Reading registers, envelopes and each meter's
//!   last register are sealed (AES-256-GCM, meter id and counter bound) before they are written.
//! - [`error`]: [`StoreError`], why an operation failed.
//!
//! This crate knows nothing of the network: it stores what the head-end has already verified.

#![forbid(unsafe_code)]

pub mod alarms;
pub mod commands;
pub mod error;
pub mod keys;
pub mod model;
pub mod outbox;
pub mod sqlite;
pub mod store;

pub use alarms::{
    AlarmChangeError, AlarmQuery, AlarmState, AlarmStore, RaiseAlarm, RaiseOutcome, StoredAlarm,
};
pub use commands::{
    CampaignMember, CampaignState, CommandQuery, CommandStatus, CommandStore, DecideError,
    Decision, NewCampaign, NewCommand, NewFirmware, NewProposal, ProposalStatus, StoredCampaign,
    StoredCommand, StoredFirmware, StoredProposal, UnknownStatus,
};
pub use error::StoreError;
pub use keys::{DEFAULT_KEY_PERIOD, DataKeyInfo, KeySource, KeyStatus};
pub use model::{
    Accepted, AcceptedBody, Counts, DEFAULT_QUERY_LIMIT, MeterEventQuery, MeterRow, Outcome,
    ReadingQuery, SecurityEvent, SecurityEventQuery, StoredMeterEvent, StoredReading,
    StoredSecurityEvent,
};
pub use outbox::{DeadLetter, OutboxItem, OutboxStats, Settlement, TargetId};
pub use sqlite::SqliteStore;
pub use store::Store;
