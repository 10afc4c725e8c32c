//! The tamper-evident audit log of the head-end.
//!
//! Every administrative and security-relevant act (logins and their failures, lockouts, user
//! and role changes, PKI operations, configuration reloads, security events, commands) is an
//! [`Entry`] in an append-only SQLite table. Each entry carries the SHA-256 of the previous
//! one, so editing, deleting, inserting or reordering entries breaks the chain; periodic
//! [`Checkpoint`]s (size, head hash, time), signed with the head-end's [`AuditKey`] as C2SP
//! signed notes, let a third party who keeps them prove later that the log was not rewritten
//! or cut short. `docs/audit-format.md` specifies the encoding precisely enough for an
//! independent verifier (`tests/py/audit_verify.py` is one).
//!
//! ## Modules
//!
//! - [`entry`]: [`Actor`], [`Outcome`], [`NewEntry`], [`Entry`], the byte encoding that is
//!   hashed, the time format. Sans-IO.
//! - [`key`]: [`AuditKey`] (Ed25519, PKCS#8 PEM) and [`VerifierKey`] (`NAME+KEYID+KEY`, the Go
//!   `note` format). Only [`AuditKey::load_or_create`] touches the file system.
//! - [`checkpoint`]: [`Checkpoint`] bodies (C2SP tlog-checkpoint) signed and opened as C2SP
//!   signed notes. Sans-IO.
//! - [`verify`](mod@verify): [`verify()`] walks entries and checkpoints and returns a
//!   [`Report`] naming the first problem as a [`Finding`]. Sans-IO.
//! - [`sqlite`]: [`AuditLog`], the only module that knows SQL.
//!
//! Time is always passed in (`now`, [`NewEntry::time`]); nothing here reads a clock.
//!
//! ```text
//!  NewEntry ──append──▶ AuditLog (SQLite) ──all_entries/checkpoints──▶ verify() ──▶ Report
//!                          │   ▲
//!              checkpoint()│   │ note
//!                          ▼   │
//!                     Checkpoint::sign(AuditKey)      Checkpoint::open(note, VerifierKey)
//! ```

pub mod checkpoint;
pub mod entry;
pub mod key;
pub mod sqlite;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use entry::{Actor, Entry, EntryError, GENESIS, NewEntry, Outcome};
pub use key::{AuditKey, KeyError, VerifierKey};
pub use sqlite::{AuditError, AuditLog, Query};
pub use verify::{Finding, Report, verify};
