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
//! ## Version 3: the downward path
//!
//! - `command_counters`: the last command counter reserved per meter (keyed by meter id text:
//!   a command may be addressed to a meter that never connected).
//! - `commands`: signed commands, `seq` the row number (the paging cursor), `id` the 16-byte
//!   command id (unique), `UNIQUE (meter_id, counter)`, the envelope stored once at insertion,
//!   `status` as text. Partial indexes over the open (queued, sent) commands serve the
//!   dispatcher (by meter and counter) and the expiry sweep (by expiry); the listing has one
//!   index per filter, ordered by `seq`.
//! - `proposals` and `proposal_meters`: four-eyes proposals and their meters in order.
//! - `firmware`: manifest and image (the image is the last column, so describing a firmware does
//!   not read the image's overflow pages).
//! - `campaigns` and `campaign_members`: staged campaigns; each member's command is joined from
//!   `commands`.
//! - Command acknowledgements are stored in `messages` as meter events (`kind = 1`) with
//!   `event_kind = 'command_ack'` (the version 1 `CHECK` on `kind` would need a rebuild of the
//!   largest table to admit a third kind); the meter-event queries exclude that kind.
//!
//! ## Version 4: alarms and the concentrator topology
//!
//! - `alarms`: one row per alarm, `id` increasing (the paging cursor), type, severity and
//!   originator as their stable codes, `state` as text. The partial `UNIQUE` index
//!   `alarms_active` on `(alarm_type, originator) WHERE state <> 'cleared'` makes "one active
//!   alarm per key" a constraint and serves the lookup of every raise; `CHECK`s tie the audit
//!   columns to the state (acknowledged ⇒ who and when; cleared ⇔ who, when and why).
//!   `evidence_json` is always a JSON array. Listing filters have one index each, ordered by
//!   `id`; `alarms_open` (active rows by severity) serves the per-severity gauge.
//! - `concentrator_meters`: which meter is registered behind which concentrator, keyed by the
//!   meter (a meter is behind at most one), with an index by concentrator.
//!
//! ## Version 5: encryption at rest
//!
//! - `vault`: one row: the fingerprint of the key-encryption key that wraps the data keys, how
//!   that key is made (`key_file`, or `argon2id` with its salt and parameters), and a
//!   `generation` bumped by every change to the keys, which tells a running head-end to reload
//!   them.
//! - `data_keys`: one row per data key (`id` is the key id in every sealed value's header), its
//!   creation time and the key wrapped by the key-encryption key; a destroyed key keeps its row
//!   with `wrapped` NULL and `destroyed_at` set (crypto-shredding).
//! - `messages.key_id` and `messages.sealed_value` (added columns, no rebuild): a sealed row has
//!   its data key's id; its envelope is stored sealed in `envelope` and a reading's register in
//!   `sealed_value`, with `energy_kwh` 0 (the version 1 `CHECK` wants a number there).
//!   `key_id` NULL marks a row written before version 5 (plaintext); the store seals such rows
//!   when it opens the database with a key.
//! - `meters.last_kwh_sealed`: the last register, sealed; `last_kwh` stays NULL.
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
pub(crate) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5];

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

const V3: &str = "
CREATE TABLE command_counters (
    meter_id TEXT    PRIMARY KEY,
    last     INTEGER NOT NULL CHECK (last > 0)
) STRICT, WITHOUT ROWID;

CREATE TABLE proposals (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL,
    args_json   TEXT    NOT NULL,
    proposed_by TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    reason      TEXT    NOT NULL,
    status      TEXT    NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'approved', 'rejected', 'expired')),
    decided_by  TEXT,
    decided_at  INTEGER,
    note        TEXT
) STRICT;

CREATE INDEX proposals_pending ON proposals (expires_at) WHERE status = 'pending';
CREATE INDEX proposals_status ON proposals (status, id);

CREATE TABLE proposal_meters (
    proposal INTEGER NOT NULL REFERENCES proposals (id),
    position INTEGER NOT NULL,
    meter_id TEXT    NOT NULL,
    PRIMARY KEY (proposal, position),
    UNIQUE (proposal, meter_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE firmware (
    id          INTEGER PRIMARY KEY,
    digest      BLOB    NOT NULL UNIQUE CHECK (length(digest) = 32),
    manifest    BLOB    NOT NULL,
    vendor_id   TEXT    NOT NULL,
    class_id    TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    sequence    INTEGER NOT NULL,
    uploaded_by TEXT    NOT NULL,
    uploaded_at INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    image       BLOB    NOT NULL
) STRICT;

CREATE TABLE campaigns (
    id                INTEGER PRIMARY KEY,
    firmware_id       INTEGER NOT NULL REFERENCES firmware (id),
    first_stage       INTEGER NOT NULL CHECK (first_stage >= 0),
    success_threshold REAL    NOT NULL CHECK (success_threshold BETWEEN 0 AND 1),
    max_failures      INTEGER NOT NULL CHECK (max_failures >= 0),
    created_by        TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    state             TEXT    NOT NULL
                      CHECK (state IN ('running', 'paused', 'completed', 'cancelled')),
    stage             INTEGER NOT NULL CHECK (stage IN (1, 2)),
    updated_at        INTEGER NOT NULL,
    note              TEXT
) STRICT;

CREATE TABLE campaign_members (
    campaign   INTEGER NOT NULL REFERENCES campaigns (id),
    position   INTEGER NOT NULL,
    meter_id   TEXT    NOT NULL,
    stage      INTEGER NOT NULL CHECK (stage IN (1, 2)),
    command_id BLOB    CHECK (command_id IS NULL OR length(command_id) = 16),
    PRIMARY KEY (campaign, position),
    UNIQUE (campaign, meter_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE commands (
    seq         INTEGER PRIMARY KEY,
    id          BLOB    NOT NULL UNIQUE CHECK (length(id) = 16),
    meter_id    TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    args_json   TEXT    NOT NULL,
    counter     INTEGER NOT NULL CHECK (counter > 0),
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    envelope    BLOB    NOT NULL,
    issued_by   TEXT    NOT NULL,
    approved_by TEXT,
    proposal_id INTEGER REFERENCES proposals (id),
    campaign_id INTEGER REFERENCES campaigns (id),
    status      TEXT    NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'sent', 'acknowledged', 'refused', 'expired', 'failed')),
    sent_at     INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    settled_at  INTEGER,
    outcome     TEXT,
    ack_message INTEGER REFERENCES messages (id),
    UNIQUE (meter_id, counter)
) STRICT;

CREATE INDEX commands_open ON commands (meter_id, counter) WHERE status IN ('queued', 'sent');
CREATE INDEX commands_expiry ON commands (expires_at) WHERE status IN ('queued', 'sent');
CREATE INDEX commands_meter ON commands (meter_id, seq);
CREATE INDEX commands_status ON commands (status, seq);
CREATE INDEX commands_campaign ON commands (campaign_id, seq) WHERE campaign_id IS NOT NULL;
CREATE INDEX commands_proposal ON commands (proposal_id, seq) WHERE proposal_id IS NOT NULL;
";

const V4: &str = "
CREATE TABLE alarms (
    id            INTEGER PRIMARY KEY,
    alarm_type    TEXT    NOT NULL CHECK (alarm_type <> ''),
    severity      TEXT    NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning')),
    originator    TEXT    NOT NULL CHECK (originator <> ''),
    state         TEXT    NOT NULL DEFAULT 'active_unacknowledged'
                  CHECK (state IN ('active_unacknowledged', 'active_acknowledged', 'cleared')),
    first_seen    INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL CHECK (last_seen >= first_seen),
    count         INTEGER NOT NULL CHECK (count >= 1),
    summary       TEXT    NOT NULL,
    evidence_json TEXT    NOT NULL,
    acked_by      TEXT,
    acked_at      INTEGER,
    cleared_by    TEXT,
    cleared_at    INTEGER,
    clear_reason  TEXT,
    CHECK ((acked_by IS NULL) = (acked_at IS NULL)),
    CHECK ((acked_at IS NULL) = (state = 'active_unacknowledged') OR state = 'cleared'),
    CHECK ((cleared_at IS NOT NULL) = (state = 'cleared')),
    CHECK ((cleared_by IS NULL) = (cleared_at IS NULL)
       AND (clear_reason IS NULL) = (cleared_at IS NULL))
) STRICT;

CREATE UNIQUE INDEX alarms_active ON alarms (alarm_type, originator) WHERE state <> 'cleared';
CREATE INDEX alarms_open ON alarms (severity, id) WHERE state <> 'cleared';
CREATE INDEX alarms_type ON alarms (alarm_type, id);
CREATE INDEX alarms_originator ON alarms (originator, id);

CREATE TABLE concentrator_meters (
    meter_id        TEXT    PRIMARY KEY,
    concentrator_id TEXT    NOT NULL CHECK (concentrator_id <> meter_id),
    attached_at     INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX concentrator_meters_by_concentrator
    ON concentrator_meters (concentrator_id, meter_id);
";

const V5: &str = "
CREATE TABLE vault (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    kek_fingerprint BLOB    NOT NULL CHECK (length(kek_fingerprint) = 16),
    kdf             TEXT    NOT NULL CHECK (kdf IN ('key_file', 'argon2id')),
    salt            BLOB    CHECK (salt IS NULL OR length(salt) = 16),
    m_kib           INTEGER,
    t               INTEGER,
    p               INTEGER,
    generation      INTEGER NOT NULL DEFAULT 0,
    CHECK ((kdf = 'argon2id') = (salt IS NOT NULL AND m_kib IS NOT NULL AND t IS NOT NULL
                                 AND p IS NOT NULL))
) STRICT;

CREATE TABLE data_keys (
    id           INTEGER PRIMARY KEY CHECK (id BETWEEN 1 AND 4294967295),
    created_at   INTEGER NOT NULL,
    wrapped      BLOB,
    destroyed_at INTEGER,
    CHECK ((wrapped IS NULL) = (destroyed_at IS NOT NULL))
) STRICT;

ALTER TABLE messages ADD COLUMN key_id INTEGER;
ALTER TABLE messages ADD COLUMN sealed_value BLOB;
ALTER TABLE meters ADD COLUMN last_kwh_sealed BLOB;
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
