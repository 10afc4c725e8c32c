//! The SQLite schema and its migrations: ordered steps, version `n` is reached by applying step
//! `n - 1`; the version is kept in `PRAGMA user_version`, the owner in `PRAGMA application_id`.
//!
//! ## Layout (version 1)
//!
//! - `meters`: one row per meter; besides its state (last counter, last register, last seen,
//!   connection) it holds `last_message`, the id of its newest stored message.
//! - `messages`: readings (`kind = 0`) and meter events (`kind = 1`), **append-only** in id order,
//!   with no index on the hot path. Each row links to the same meter's previous message (`prev`),
//!   so a meter's messages are a chain from `meters.last_message` backwards: the few queries that
//!   need one meter's messages (duplicate check, `gridward readings --meter`) follow it with
//!   primary-key lookups. A secondary index on `(meter, counter)` would cost a random B-tree
//!   insert per reading: measured with batches of 1,000 across 10,000 meters, it cut the rate
//!   from about 58k to 25k rows/s over 500k rows, falling further as the table grew (the
//!   `throughput` tests in `tests.rs`). Meter events, being rare, have a partial index.
//! - `security_events`: append-only, indexed by time.
//!
//! ## Version 2: the outbox
//!
//! - `outbox_targets`: downstream targets by name.
//! - `outbox`: one row per stored reading and target, appended in the reading's transaction
//!   (`state` 0 pending, 1 delivered, 2 dead). Partial indexes cover the pending and the dead
//!   rows only: appends go to the end of both, and delivered rows leave the pending index.
//!
//! Times are integers, microseconds since 1970-01-01 UTC. Counters are `u64` stored bit for bit
//! in SQLite's signed 64-bit integers (values above `i64::MAX` read negative in SQL); the store
//! compares them in Rust, never in SQL.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::error::StoreError;

/// `PRAGMA application_id` of a Gridward database: `GRDW` in ASCII.
pub const APPLICATION_ID: i32 = 0x4752_4457;

/// The migration steps, oldest first. Step `i` takes the schema from version `i` to `i + 1`.
/// Never edit a released step: append a new one.
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2];

/// The schema version this build creates and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const V1: &str = "
CREATE TABLE meters (
    id                    INTEGER PRIMARY KEY,
    meter_id              TEXT    NOT NULL UNIQUE,
    last_counter          INTEGER,
    last_message          INTEGER,
    last_kwh              REAL,
    last_seen             INTEGER,
    connected             INTEGER NOT NULL DEFAULT 0 CHECK (connected IN (0, 1)),
    connection_changed_at INTEGER
) STRICT;

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    meter           INTEGER NOT NULL,
    counter         INTEGER NOT NULL,
    prev            INTEGER CHECK (prev < id),
    kind            INTEGER NOT NULL CHECK (kind IN (0, 1)),
    energy_kwh      REAL,
    event_kind      TEXT,
    taken_at       INTEGER NOT NULL,
    received_at     INTEGER NOT NULL,
    content_type    TEXT    NOT NULL,
    source          TEXT,
    envelope        BLOB    NOT NULL,
    envelope_sha256 BLOB    NOT NULL CHECK (length(envelope_sha256) = 32),
    CHECK ((kind = 0 AND energy_kwh IS NOT NULL AND event_kind IS NULL)
        OR (kind = 1 AND energy_kwh IS NULL AND event_kind IS NOT NULL))
) STRICT;

CREATE INDEX messages_events ON messages (taken_at) WHERE kind = 1;

CREATE TABLE security_events (
    id       INTEGER PRIMARY KEY,
    at       INTEGER NOT NULL,
    meter_id TEXT,
    source   TEXT,
    reason   TEXT    NOT NULL,
    detail   TEXT    NOT NULL
) STRICT;

CREATE INDEX security_events_at ON security_events (at);
";

const V2: &str = "
CREATE TABLE outbox_targets (
    id   INTEGER PRIMARY KEY,
    name TEXT    NOT NULL UNIQUE
) STRICT;

CREATE TABLE outbox (
    id         INTEGER PRIMARY KEY,
    target     INTEGER NOT NULL REFERENCES outbox_targets (id),
    message    INTEGER NOT NULL REFERENCES messages (id),
    state      INTEGER NOT NULL DEFAULT 0 CHECK (state IN (0, 1, 2)),
    attempts   INTEGER NOT NULL DEFAULT 0,
    settled_at INTEGER,
    last_error TEXT
) STRICT;

CREATE INDEX outbox_pending ON outbox (target, id) WHERE state = 0;
CREATE INDEX outbox_dead ON outbox (target, id) WHERE state = 2;
";

/// Checks that `conn` is a new or a Gridward database no newer than `steps` knows, then applies
/// the missing steps, each in its own transaction together with its version bump. Returns the
/// resulting version.
pub(crate) fn migrate(conn: &mut Connection, steps: &[&str]) -> Result<i64, StoreError> {
    let supported = i64::try_from(steps.len()).unwrap_or(i64::MAX);
    loop {
        // IMMEDIATE: two processes opening the same new file must not both apply a step.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let application_id: i32 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        if application_id != APPLICATION_ID {
            let has_objects = tx
                .query_row("SELECT 1 FROM sqlite_schema LIMIT 1", [], |r| {
                    r.get::<_, i64>(0)
                })
                .optional()?
                .is_some();
            if application_id != 0 || version != 0 || has_objects {
                return Err(StoreError::ForeignDatabase { application_id });
            }
            tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        }
        if version > supported {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported,
            });
        }
        let Some(step) = usize::try_from(version).ok().and_then(|v| steps.get(v)) else {
            // version == supported (a negative user_version is refused as foreign below).
            if version < 0 {
                return Err(StoreError::ForeignDatabase { application_id });
            }
            tx.commit()?;
            return Ok(version);
        };
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}
