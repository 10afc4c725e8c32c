//! [`SqliteStore`]: the embedded [`Store`] backend, one SQLite file in WAL mode.
//!
//! ## Durability
//!
//! The database runs in write-ahead-log mode with `synchronous = FULL`: every commit appends its
//! pages to the WAL and **fsyncs the WAL before `COMMIT` returns**, so a batch acknowledged to a
//! meter survives a process crash and a power loss. `synchronous = NORMAL` (the usual WAL
//! setting) only syncs at checkpoints: it survives a process crash but may lose the last
//! transactions on power loss or an OS crash, which would break "acknowledge only after a
//! durable store" and was therefore not chosen. Batching amortises the one fsync per commit.
//! Only [`Store::set_connected`] commits with `NORMAL` (connection state is not accounting data);
//! every durable write sets `FULL` again first, and the next `FULL` commit syncs any earlier
//! frames with it, so the WAL's order is kept.
//!
//! ## Concurrency
//!
//! One writer connection behind a mutex (a batch is the unit of work), and for file databases a
//! second, query-only connection for reads, which in WAL mode never blocks nor is blocked by the
//! writer. Other processes (the CLI's `gridward readings` while `serve` runs) may open the same
//! file; the busy timeout ([`BUSY_TIMEOUT`]) covers brief write-lock contention.
//!
//! The same store implements [`CommandStore`](crate::CommandStore) and
//! [`AlarmStore`](crate::AlarmStore) on the same connections: one `Arc<SqliteStore>` can be
//! handed out as `Arc<dyn Store>`, `Arc<dyn CommandStore>` and `Arc<dyn AlarmStore>`. Their
//! writes are durable transactions like [`Store::commit`]'s.
//!
//! ## Duplicates without an index
//!
//! Readings are appended without any index touched per row; the per-meter last counter already
//! decides freshness. Only when a counter is not above the last one (rare: a retry or a replay)
//! does the store look for the stored message with that counter, by following the meter's chain
//! of messages backwards from the newest, at most [`DUPLICATE_SEARCH_DEPTH`] steps.
//! [`Store::readings`] follows the same chain from the newest message; with `since` it stops at
//! the first message signed more than a day before `since` (signing times follow the head-end's
//! clock within the freshness window, so a meter's older messages cannot be newer than that).

#[cfg(test)]
mod alarm_tests;
mod alarms;
#[cfg(test)]
mod command_tests;
mod commands;
#[cfg(test)]
mod key_tests;
mod keys;
mod outbox;
mod schema;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use gridward_core::MeterId;
use gridward_core::command::{CommandId, Refusal};
use gridward_core::document::{ConcentratorEventKind, EventKind, Format};
use gridward_vault::{Field, Fingerprint, Keyring};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use time::OffsetDateTime;

pub use schema::{APPLICATION_ID, SCHEMA_VERSION};

use crate::error::StoreError;
use crate::keys::{KeySource, KeyStatus};
use crate::model::{
    Accepted, AcceptedBody, Counts, MeterEventQuery, MeterRow, Outcome, ReadingQuery,
    SecurityEvent, SecurityEventQuery, StoredMeterEvent, StoredReading, StoredSecurityEvent,
};
use crate::outbox::{DeadLetter, OutboxItem, OutboxStats, Settlement, TargetId};
use crate::store::Store;

/// How far back (in messages of the same meter) a counter that is not above the last one is
/// looked up to tell a byte-identical resend ([`Outcome::Duplicate`]) from a replay. A resend
/// of a message older than that is reported as [`Outcome::Replay`]. 4096 messages are six weeks
/// of 15-minute readings, far more than a meter keeps unacknowledged; the bound caps the work a
/// replayed old counter can cost while the writer lock is held.
pub const DUPLICATE_SEARCH_DEPTH: usize = 4096;

/// How long a connection waits for a lock held by another connection before failing with
/// `SQLITE_BUSY`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How far before `since` a meter's chain is still followed when querying readings: signing
/// times are within the freshness window (minutes) of the head-end's clock, so a meter's
/// messages are in time order up to that; a day leaves room for clock corrections.
const SINCE_SLACK_MICROS: i64 = 24 * 3600 * 1_000_000;

/// `messages.kind` of a reading.
const KIND_READING: i64 = 0;
/// `messages.kind` of a meter event (and of a command acknowledgement).
const KIND_EVENT: i64 = 1;
/// `messages.event_kind` of a command acknowledgement (not a meter event: the meter-event
/// queries and counts exclude it; the literal is repeated in their SQL).
const EVENT_KIND_ACK: &str = "command_ack";

/// The embedded SQLite backend of [`Store`] (see the [module documentation](self)).
#[derive(Debug)]
pub struct SqliteStore {
    /// The one connection that writes.
    writer: Mutex<Connection>,
    /// A query-only connection for reads; `None` for in-memory databases, which read through
    /// the writer (a second connection would see a different, empty database).
    reader: Option<Mutex<Connection>>,
    /// The data keys and the key-encryption key (see [`crate::keys`]).
    vault: keys::Vault,
}

impl SqliteStore {
    /// Opens (creating it if missing) the database at `path`, switches it to WAL, and applies
    /// pending migrations.
    ///
    /// # Errors
    ///
    /// [`StoreError::SchemaTooNew`] or [`StoreError::ForeignDatabase`] (nothing changed),
    /// [`StoreError::WalUnavailable`], or [`StoreError::Sqlite`] (e.g. the file cannot be created).
    ///
    /// A new file is created readable and writable by its owner only (mode 0600 on Unix; SQLite
    /// gives the `-wal` and `-shm` files the same mode): it holds consumption data.
    ///
    /// `keys` names the key-encryption key (see [`crate::keys`]); a new database gets its
    /// first data key wrapped by it, an existing one must have been wrapped by the same key
    /// ([`StoreError::KeyMismatch`], [`StoreError::KeyFileMissing`] otherwise). Rows written
    /// before encryption at rest (schema version 4) are sealed here.
    pub fn open(path: &Path, keys: KeySource) -> Result<Self, StoreError> {
        create_private(path)?;
        Self::open_with_flags(path, OpenFlags::default(), keys)
    }

    /// Like [`SqliteStore::open`] but fails if the file does not exist (for commands that only
    /// look, which should not create an empty database at a mistyped path).
    pub fn open_existing(path: &Path, keys: KeySource) -> Result<Self, StoreError> {
        Self::open_with_flags(
            path,
            OpenFlags::default() - OpenFlags::SQLITE_OPEN_CREATE,
            keys,
        )
    }

    fn open_with_flags(path: &Path, flags: OpenFlags, keys: KeySource) -> Result<Self, StoreError> {
        let mut writer = Connection::open_with_flags(path, flags)?;
        writer.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::WalUnavailable(mode));
        }
        configure_writer(&writer)?;
        schema::migrate(&mut writer, schema::MIGRATIONS)?;
        let vault = keys::Vault::open(&mut writer, keys)?;
        let reader = Connection::open_with_flags(path, flags - OpenFlags::SQLITE_OPEN_CREATE)?;
        reader.busy_timeout(BUSY_TIMEOUT)?;
        reader.pragma_update(None, "query_only", true)?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Some(Mutex::new(reader)),
            vault,
        })
    }

    /// A fresh in-memory database (for tests and demos; gone when dropped), sealed under a
    /// key held in memory.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let mut writer = Connection::open_in_memory()?;
        configure_writer(&writer)?;
        schema::migrate(&mut writer, schema::MIGRATIONS)?;
        let vault = keys::Vault::open(&mut writer, KeySource::ephemeral()?)?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: None,
            vault,
        })
    }

    /// How long a data key stays active before the store starts a new one
    /// ([`DEFAULT_KEY_PERIOD`](crate::DEFAULT_KEY_PERIOD) unless set).
    pub fn set_key_period(&self, period: Duration) {
        self.vault.set_period(period);
    }

    /// Starts a new data key for new rows (`gridward keys rotate`); returns its id. A running
    /// head-end on the same file switches to it at its next batch.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Key`].
    pub fn rotate_key(&self) -> Result<u32, StoreError> {
        let mut conn = self.writer();
        self.vault
            .rotate(&mut conn, micros(OffsetDateTime::now_utc())?)
    }

    /// Wraps every data key under the key-encryption key `new` names (a key file is created
    /// there, so it must not exist; a passphrase gets a new salt), in one transaction
    /// (`gridward keys rewrap`). The data is not touched; the old key no longer opens it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Key`] (e.g. the new key file exists), [`StoreError::InvalidRequest`]
    /// (the new key is the current one), [`StoreError::Sqlite`].
    pub fn rewrap(&self, new: &KeySource) -> Result<Fingerprint, StoreError> {
        let mut conn = self.writer();
        self.vault.rewrap(&mut conn, new)
    }

    /// Destroys data key `id` (`gridward keys destroy`): the rows sealed under it can no
    /// longer be read by anyone (crypto-shredding); returns how many messages that is. The
    /// active key and a key with deliveries still pending are refused.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`], [`StoreError::KeyDestroyed`], [`StoreError::InvalidRequest`].
    pub fn destroy_key(&self, id: u32) -> Result<u64, StoreError> {
        let mut conn = self.writer();
        self.vault
            .destroy(&mut conn, id, micros(OffsetDateTime::now_utc())?)
    }

    /// The database's keys (`gridward keys list`).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::Key`].
    pub fn key_status(&self) -> Result<KeyStatus, StoreError> {
        let conn = self.reader();
        self.vault.status(&conn)
    }

    /// The writer connection. A poisoned lock is taken over: a panic inside a transaction
    /// dropped the transaction, which rolled it back, so the connection is consistent.
    fn writer(&self) -> MutexGuard<'_, Connection> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection for reads (the writer's for in-memory databases).
    fn reader(&self) -> MutexGuard<'_, Connection> {
        match &self.reader {
            Some(r) => r.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            None => self.writer(),
        }
    }

    /// Starts a durable write transaction (`synchronous = FULL`, `BEGIN IMMEDIATE`).
    fn durable_tx(conn: &mut Connection) -> Result<Transaction<'_>, StoreError> {
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
    }
}

/// Creates `path` as an empty file only its owner may read, unless it exists.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::CreateFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Settings of the writer connection.
fn configure_writer(conn: &Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Writes go to the WAL; checkpoints fold them back. Keep the WAL file from staying large
    // after a burst.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    // 64 MiB of page cache (default 2 MiB): the meters table and its id index are updated at
    // random on every batch; keeping them cached matters from a few hundred thousand meters on
    // (not measurable at 10,000 meters, where they fit either way).
    conn.pragma_update(None, "cache_size", -65536)?;
    Ok(())
}

impl Store for SqliteStore {
    fn commit_with_outbox(
        &self,
        batch: &[Accepted],
        targets: &[TargetId],
    ) -> Result<Vec<Outcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.writer();
        self.vault
            .rotate_if_due(&mut conn, micros(OffsetDateTime::now_utc())?)?;
        let keys = self.vault.keys(&conn)?;
        // Everything that could make an item unstorable is checked (and its columns sealed)
        // before the transaction.
        let mut rows = Vec::with_capacity(batch.len());
        for (index, item) in batch.iter().enumerate() {
            rows.push(ItemRow::new(index, item, &keys.ring)?);
        }
        let tx = Self::durable_tx(&mut conn)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for (item, row) in batch.iter().zip(&rows) {
            let outcome = commit_one(&tx, item, row, &keys.ring)?;
            if let Outcome::Stored { id } = outcome
                && row.kind == KIND_READING
            {
                outbox::enqueue(&tx, id, targets)?;
            }
            outcomes.push(outcome);
        }
        tx.commit()?;
        Ok(outcomes)
    }

    fn register_outbox_target(&self, name: &str) -> Result<TargetId, StoreError> {
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let id = outbox::register_target(&tx, name)?;
        tx.commit()?;
        Ok(id)
    }

    fn outbox_pending(
        &self,
        target: TargetId,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let conn = self.reader();
        let keys = self.vault.keys(&conn)?;
        outbox::pending(&conn, target, limit, &keys.ring)
    }

    fn outbox_settle(&self, settlement: &Settlement, at: OffsetDateTime) -> Result<(), StoreError> {
        if settlement.is_empty() {
            return Ok(());
        }
        let mut conn = self.writer();
        // Not fsync'd (see the trait): a delivery lost to a power cut is repeated, and receivers
        // de-duplicate; the next durable commit syncs these frames with its own.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        outbox::settle(&tx, settlement, at)?;
        tx.commit()?;
        Ok(())
    }

    fn outbox_stats(&self) -> Result<Vec<OutboxStats>, StoreError> {
        let mut conn = self.reader();
        let tx = conn.transaction()?;
        outbox::stats(&tx)
    }

    fn outbox_dead(
        &self,
        target: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        outbox::dead(&self.reader(), target, limit)
    }

    fn outbox_retry(&self, target: Option<&str>, ids: &[i64]) -> Result<u64, StoreError> {
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let n = outbox::retry(&tx, target, ids)?;
        tx.commit()?;
        Ok(n)
    }

    fn record_security_events(&self, events: &[SecurityEvent]) -> Result<Vec<i64>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let mut ids = Vec::with_capacity(events.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO security_events (at, meter_id, source, reason, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for e in events {
                insert.execute(params![
                    micros(e.at)?,
                    e.meter_id.as_ref().map(MeterId::as_str),
                    e.source,
                    e.reason,
                    e.detail
                ])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    fn last_counters(&self) -> Result<Vec<(MeterId, u64)>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT meter_id, last_counter FROM meters WHERE last_counter IS NOT NULL ORDER BY meter_id",
        )?;
        let raw = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter()
            .map(|(id, c)| Ok((meter_id("meters", &id)?, counter_from_sql(c))))
            .collect()
    }

    fn readings(&self, query: &ReadingQuery) -> Result<Vec<StoredReading>, StoreError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let since = query.since.map(micros).transpose()?;
        let until = query.until.map(micros).transpose()?;
        let mut conn = self.reader();
        // One read transaction: the chain is walked in a consistent snapshot.
        let tx = conn.transaction()?;
        let keys = self.vault.keys(&tx)?;
        let mut next = match query.before {
            // The cursor must be one of this meter's messages; the walk goes on from the one
            // before it.
            Some(before) => tx
                .prepare_cached(
                    "SELECT m.prev FROM messages AS m JOIN meters AS mt ON mt.id = m.meter
                     WHERE m.id = ?1 AND mt.meter_id = ?2",
                )?
                .query_row(params![before, query.meter.as_str()], |r| {
                    r.get::<_, Option<i64>>(0)
                })
                .optional()?
                .flatten(),
            None => tx
                .prepare_cached("SELECT last_message FROM meters WHERE meter_id = ?1")?
                .query_row([query.meter.as_str()], |r| r.get::<_, Option<i64>>(0))
                .optional()?
                .flatten(),
        };
        let mut stmt = tx.prepare_cached(
            "SELECT prev, kind, counter, energy_kwh, taken_at, received_at, content_type, source,
                    envelope_sha256, key_id, sealed_value
             FROM messages WHERE id = ?1",
        )?;
        let mut out = Vec::new();
        while let Some(id) = next {
            let row = stmt
                .query_row([id], |r| {
                    Ok(ChainRow {
                        prev: r.get(0)?,
                        kind: r.get(1)?,
                        counter: r.get(2)?,
                        energy_kwh: r.get(3)?,
                        taken_at: r.get(4)?,
                        received_at: r.get(5)?,
                        content_type: r.get(6)?,
                        source: r.get(7)?,
                        sha: r.get(8)?,
                        key_id: r.get(9)?,
                        sealed_value: r.get(10)?,
                    })
                })
                .optional()?
                .ok_or_else(|| corrupt("messages", format!("chain points to missing id {id}")))?;
            next = check_prev(id, row.prev)?;
            if let Some(since) = since {
                if row.taken_at < since.saturating_sub(SINCE_SLACK_MICROS) {
                    break;
                }
                if row.taken_at < since {
                    continue;
                }
            }
            if row.kind != KIND_READING || until.is_some_and(|u| row.taken_at > u) {
                continue;
            }
            let energy_kwh = match (row.key_id, &row.sealed_value) {
                (Some(_), Some(sealed)) => match keys::open_f64(
                    &keys.ring,
                    "messages",
                    id,
                    Field::ReadingValue,
                    query.meter.as_str(),
                    counter_from_sql(row.counter),
                    sealed,
                )? {
                    keys::Opened::Value(v) => v,
                    // Crypto-shredded: its period's key was destroyed.
                    keys::Opened::Shredded => continue,
                },
                (Some(_), None) => {
                    return Err(corrupt(
                        "messages",
                        format!("sealed reading {id} has no value"),
                    ));
                }
                (None, _) => row
                    .energy_kwh
                    .ok_or_else(|| corrupt("messages", format!("reading {id} has no energy")))?,
            };
            out.push(StoredReading {
                id,
                meter_id: query.meter.clone(),
                counter: counter_from_sql(row.counter),
                taken_at: time_from_micros("messages", row.taken_at)?,
                received_at: time_from_micros("messages", row.received_at)?,
                energy_kwh,
                content_type: format_from_sql(&row.content_type)?,
                source: row.source,
                envelope_sha256: sha_from_sql("messages", &row.sha)?,
            });
            if out.len() >= query.limit {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    fn meter_events(&self, query: &MeterEventQuery) -> Result<Vec<StoredMeterEvent>, StoreError> {
        let since = query.since.map(micros).transpose()?.unwrap_or(i64::MIN);
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT m.id, mt.meter_id, m.counter, m.event_kind, m.taken_at, m.received_at,
                    m.content_type, m.source, m.envelope_sha256
             FROM messages AS m INDEXED BY messages_events JOIN meters AS mt ON mt.id = m.meter
             WHERE m.kind = 1 AND m.event_kind <> 'command_ack'
               AND m.event_kind NOT LIKE 'concentrator:%' AND m.taken_at >= ?1
               AND (?2 IS NULL OR mt.meter_id = ?2)
             ORDER BY m.taken_at DESC, m.id DESC LIMIT ?3",
        )?;
        let raw = stmt
            .query_map(
                params![
                    since,
                    query.meter.as_ref().map(MeterId::as_str),
                    sql_limit(query.limit)
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, Option<String>>(7)?,
                        r.get::<_, Vec<u8>>(8)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = raw
            .into_iter()
            .map(
                |(id, meter, counter, kind, taken_at, received_at, ct, source, sha)| {
                    let kind =
                        kind.ok_or_else(|| corrupt("messages", format!("event {id} has no kind")))?;
                    Ok(StoredMeterEvent {
                        id,
                        meter_id: meter_id("meters", &meter)?,
                        counter: counter_from_sql(counter),
                        taken_at: time_from_micros("messages", taken_at)?,
                        received_at: time_from_micros("messages", received_at)?,
                        kind: kind.parse::<EventKind>().map_err(|_| {
                            corrupt("messages", format!("event {id} has unknown kind {kind:?}"))
                        })?,
                        content_type: format_from_sql(&ct)?,
                        source,
                        envelope_sha256: sha_from_sql("messages", &sha)?,
                    })
                },
            )
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }

    fn security_events(
        &self,
        query: &SecurityEventQuery,
    ) -> Result<Vec<StoredSecurityEvent>, StoreError> {
        let since = query.since.map(micros).transpose()?.unwrap_or(i64::MIN);
        let until = query.until.map(micros).transpose()?.unwrap_or(i64::MAX);
        // An address without a port matches it with any port ("ip:port", "[v6]:port").
        let source_prefix = query.source.as_ref().map(|s| {
            if s.contains(':') && !s.starts_with('[') && s.parse::<std::net::Ipv6Addr>().is_ok() {
                format!("[{s}]:")
            } else {
                format!("{s}:")
            }
        });
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT id, at, meter_id, source, reason, detail FROM security_events
             WHERE at >= ?1 AND at <= ?3 AND (?4 IS NULL OR id < ?4)
               AND (?5 IS NULL OR reason = ?5) AND (?6 IS NULL OR meter_id = ?6)
               AND (?7 IS NULL OR source = ?7 OR substr(source, 1, length(?8)) = ?8)
             ORDER BY id DESC LIMIT ?2",
        )?;
        let raw = stmt
            .query_map(
                params![
                    since,
                    sql_limit(query.limit),
                    until,
                    query.before,
                    query.reason,
                    query.meter.as_ref().map(MeterId::as_str),
                    query.source,
                    source_prefix,
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = raw
            .into_iter()
            .map(|(id, at, meter, source, reason, detail)| {
                Ok(StoredSecurityEvent {
                    id,
                    event: SecurityEvent {
                        at: time_from_micros("security_events", at)?,
                        meter_id: meter.map(|m| meter_id("security_events", &m)).transpose()?,
                        source,
                        reason,
                        detail,
                    },
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }

    fn envelope(&self, id: i64) -> Result<Option<Vec<u8>>, StoreError> {
        let conn = self.reader();
        let keys = self.vault.keys(&conn)?;
        let found: Option<(Vec<u8>, Option<i64>, String, i64)> = conn
            .prepare_cached(
                "SELECT m.envelope, m.key_id, mt.meter_id, m.counter
                 FROM messages AS m JOIN meters AS mt ON mt.id = m.meter WHERE m.id = ?1",
            )?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        let Some((envelope, key_id, meter, counter)) = found else {
            return Ok(None);
        };
        if key_id.is_none() {
            return Ok(Some(envelope));
        }
        match keys::open(
            &keys.ring,
            "messages",
            id,
            Field::Envelope,
            &meter,
            counter_from_sql(counter),
            &envelope,
        )? {
            keys::Opened::Value(v) => Ok(Some(v.to_vec())),
            keys::Opened::Shredded => Err(StoreError::KeyDestroyed {
                key_id: Keyring::key_id_of(&envelope).unwrap_or(0),
            }),
        }
    }

    fn meters(&self) -> Result<Vec<MeterRow>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT meter_id, last_counter, last_kwh, last_seen, connected, connection_changed_at,
                    last_kwh_sealed, id
             FROM meters ORDER BY meter_id",
        )?;
        let keys = self.vault.keys(&conn)?;
        let raw = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<f64>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<Vec<u8>>>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter()
            .map(
                |(id, counter, kwh, seen, connected, changed, sealed, row)| {
                    let meter = meter_id("meters", &id)?;
                    let kwh = match sealed {
                        Some(sealed) => last_register(&keys.ring, row, &id, &sealed)?,
                        None => kwh,
                    };
                    Ok(MeterRow {
                        meter_id: meter,
                        last_counter: counter.map(counter_from_sql),
                        last_kwh: kwh,
                        last_seen: seen.map(|t| time_from_micros("meters", t)).transpose()?,
                        connected,
                        connection_changed_at: changed
                            .map(|t| time_from_micros("meters", t))
                            .transpose()?,
                    })
                },
            )
            .collect()
    }

    fn set_connected(
        &self,
        meter: &MeterId,
        connected: bool,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let at = micros(at)?;
        let mut conn = self.writer();
        // Not fsync'd (see the trait): durable writes set FULL again before they begin.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT INTO meters (meter_id, connected, connection_changed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (meter_id) DO UPDATE
             SET connected = excluded.connected, connection_changed_at = excluded.connection_changed_at",
        )?
        .execute(params![meter.as_str(), connected, at])?;
        tx.commit()?;
        Ok(())
    }

    fn disconnect_all(&self, at: OffsetDateTime) -> Result<u64, StoreError> {
        let at = micros(at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let n = tx.execute(
            "UPDATE meters SET connected = 0, connection_changed_at = ?1 WHERE connected = 1",
            [at],
        )?;
        tx.commit()?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn counts(&self) -> Result<Counts, StoreError> {
        let mut conn = self.reader();
        let tx = conn.transaction()?;
        let count = |sql: &str| -> Result<u64, StoreError> {
            let n: i64 = tx.query_row(sql, [], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        Ok(Counts {
            meters: count("SELECT COUNT(*) FROM meters")?,
            readings: count("SELECT COUNT(*) FROM messages WHERE kind = 0")?,
            meter_events: count(
                "SELECT COUNT(*) FROM messages WHERE kind = 1 AND event_kind <> 'command_ack'
                   AND event_kind NOT LIKE 'concentrator:%'",
            )?,
            command_acks: count(
                "SELECT COUNT(*) FROM messages WHERE kind = 1 AND event_kind = 'command_ack'",
            )?,
            security_events: count("SELECT COUNT(*) FROM security_events")?,
        })
    }
}

/// An item's columns, converted (and checked) before the transaction starts.
#[derive(Debug)]
struct ItemRow {
    counter: i64,
    kind: i64,
    energy_kwh: Option<f64>,
    event_kind: Option<&'static str>,
    taken_at: i64,
    received_at: i64,
    sha: [u8; 32],
    /// For a command acknowledgement: the command and the refusal, if refused.
    ack: Option<(CommandId, Option<Refusal>)>,
    /// The data key the sealed columns are sealed with.
    key_id: u32,
    /// The envelope, sealed.
    envelope: Vec<u8>,
    /// A reading's register, sealed as the message's value.
    sealed_value: Option<Vec<u8>>,
    /// A reading's register, sealed as the meter's last register.
    sealed_last: Option<Vec<u8>>,
}

impl ItemRow {
    fn new(index: usize, item: &Accepted, ring: &Keyring) -> Result<Self, StoreError> {
        let mut ack = None;
        let (kind, energy_kwh, event_kind) = match item.body {
            AcceptedBody::Reading { energy_kwh } => {
                // SQLite stores NaN as NULL; a negative register is not a register.
                if !energy_kwh.is_finite() || energy_kwh < 0.0 {
                    return Err(StoreError::InvalidItem {
                        index,
                        reason: "energy is not a finite, non-negative number of kWh",
                    });
                }
                (KIND_READING, Some(energy_kwh), None)
            }
            AcceptedBody::Event { kind } => (KIND_EVENT, None, Some(kind.as_str())),
            AcceptedBody::ConcentratorEvent { kind } => (
                KIND_EVENT,
                None,
                Some(match kind {
                    ConcentratorEventKind::PowerFail => "concentrator:PowerFail",
                    ConcentratorEventKind::PowerRestore => "concentrator:PowerRestore",
                    ConcentratorEventKind::MeterLost => "concentrator:MeterLost",
                    ConcentratorEventKind::MeterFound => "concentrator:MeterFound",
                }),
            ),
            AcceptedBody::CommandAck {
                command_id,
                refused,
            } => {
                ack = Some((command_id, refused));
                (KIND_EVENT, None, Some(EVENT_KIND_ACK))
            }
        };
        let meter = item.meter_id.as_str();
        let seal = |field, counter, plain: &[u8]| keys::seal(ring, field, meter, counter, plain);
        let (sealed_value, sealed_last) = match energy_kwh {
            Some(v) => (
                Some(seal(Field::ReadingValue, item.counter, &v.to_le_bytes())?),
                Some(seal(Field::LastRegister, 0, &v.to_le_bytes())?),
            ),
            None => (None, None),
        };
        Ok(Self {
            key_id: ring
                .active()
                .ok_or(StoreError::Key(gridward_vault::VaultError::Crypto(
                    "no active data key",
                )))?,
            envelope: seal(Field::Envelope, item.counter, &item.envelope)?,
            sealed_value,
            sealed_last,
            counter: counter_to_sql(item.counter),
            kind,
            energy_kwh,
            event_kind,
            taken_at: micros(item.taken_at)?,
            received_at: micros(item.received_at)?,
            sha: item.envelope_sha256(),
            ack,
        })
    }
}

/// A meter's state as read at the start of an item.
#[derive(Debug)]
struct MeterState {
    key: i64,
    last_counter: Option<i64>,
    last_message: Option<i64>,
    last_kwh: Option<f64>,
}

/// Decides one item inside the batch's transaction and stores it if it is new.
fn commit_one(
    tx: &Transaction<'_>,
    item: &Accepted,
    row: &ItemRow,
    ring: &Keyring,
) -> Result<Outcome, StoreError> {
    let meter = meter_state(tx, &item.meter_id, ring)?;
    if let Some(last) = meter.last_counter.map(counter_from_sql)
        && item.counter <= last
    {
        return Ok(
            if find_sha(tx, meter.last_message, item.counter)? == Some(row.sha) {
                Outcome::Duplicate
            } else {
                Outcome::Replay { last }
            },
        );
    }
    if let (Some(energy), Some(last_kwh)) = (row.energy_kwh, meter.last_kwh)
        && energy < last_kwh
    {
        return Ok(Outcome::RegisterWentBackwards { last_kwh });
    }
    tx.prepare_cached(
        "INSERT INTO messages (meter, counter, prev, kind, energy_kwh, event_kind, taken_at,
                               received_at, content_type, source, envelope, envelope_sha256,
                               key_id, sealed_value)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        meter.key,
        row.counter,
        meter.last_message,
        row.kind,
        // The register itself is in sealed_value; the version 1 CHECK wants a number here.
        row.energy_kwh.map(|_| 0.0),
        row.event_kind,
        row.taken_at,
        row.received_at,
        item.content_type.content_type(),
        item.source,
        row.envelope,
        row.sha,
        row.key_id,
        row.sealed_value,
    ])?;
    let id = tx.last_insert_rowid();
    tx.prepare_cached(
        "UPDATE meters SET last_counter = ?2, last_message = ?3, last_kwh = NULL,
                           last_kwh_sealed = coalesce(?4, last_kwh_sealed), last_seen = ?5
         WHERE id = ?1",
    )?
    .execute(params![
        meter.key,
        row.counter,
        id,
        row.sealed_last,
        row.received_at
    ])?;
    if let Some((command, refused)) = row.ack
        && !commands::apply_ack(tx, &item.meter_id, &command, refused, row.received_at, id)?
    {
        return Ok(Outcome::StoredUnmatchedAck { id });
    }
    Ok(Outcome::Stored { id })
}

/// The meter's row, created if the meter is new.
fn meter_state(
    tx: &Transaction<'_>,
    meter: &MeterId,
    ring: &Keyring,
) -> Result<MeterState, StoreError> {
    let found = tx
        .prepare_cached(
            "SELECT id, last_counter, last_message, last_kwh, last_kwh_sealed
             FROM meters WHERE meter_id = ?1",
        )?
        .query_row([meter.as_str()], |r| {
            Ok((
                MeterState {
                    key: r.get(0)?,
                    last_counter: r.get(1)?,
                    last_message: r.get(2)?,
                    last_kwh: r.get(3)?,
                },
                r.get::<_, Option<Vec<u8>>>(4)?,
            ))
        })
        .optional()?;
    if let Some((mut state, sealed)) = found {
        if let Some(sealed) = sealed {
            state.last_kwh = last_register(ring, state.key, meter.as_str(), &sealed)?;
        }
        return Ok(state);
    }
    tx.prepare_cached("INSERT INTO meters (meter_id) VALUES (?1)")?
        .execute([meter.as_str()])?;
    Ok(MeterState {
        key: tx.last_insert_rowid(),
        last_counter: None,
        last_message: None,
        last_kwh: None,
    })
}

/// The envelope hash of the message stored under `counter` in the chain starting at `newest`,
/// searching at most [`DUPLICATE_SEARCH_DEPTH`] messages back.
fn find_sha(
    tx: &Transaction<'_>,
    newest: Option<i64>,
    counter: u64,
) -> Result<Option<[u8; 32]>, StoreError> {
    let mut stmt =
        tx.prepare_cached("SELECT prev, counter, envelope_sha256 FROM messages WHERE id = ?1")?;
    let mut next = newest;
    for _ in 0..DUPLICATE_SEARCH_DEPTH {
        let Some(id) = next else { break };
        let (prev, stored, sha): (Option<i64>, i64, Vec<u8>) = stmt
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?
            .ok_or_else(|| corrupt("messages", format!("chain points to missing id {id}")))?;
        let stored = counter_from_sql(stored);
        if stored == counter {
            return Ok(Some(sha_from_sql("messages", &sha)?));
        }
        if stored < counter {
            // Counters strictly decrease along the chain: it is not there.
            break;
        }
        next = check_prev(id, prev)?;
    }
    Ok(None)
}

/// A meter's sealed last register; `None` if its data key was destroyed.
fn last_register(
    ring: &Keyring,
    row: i64,
    meter: &str,
    sealed: &[u8],
) -> Result<Option<f64>, StoreError> {
    Ok(
        match keys::open_f64(ring, "meters", row, Field::LastRegister, meter, 0, sealed)? {
            keys::Opened::Value(v) => Some(v),
            keys::Opened::Shredded => None,
        },
    )
}

/// One message of a meter's chain, as the readings query reads it.
#[derive(Debug)]
struct ChainRow {
    prev: Option<i64>,
    kind: i64,
    counter: i64,
    energy_kwh: Option<f64>,
    taken_at: i64,
    received_at: i64,
    content_type: String,
    source: Option<String>,
    sha: Vec<u8>,
    key_id: Option<i64>,
    sealed_value: Option<Vec<u8>>,
}

/// The chain link after `id`; links must point strictly backwards (which also rules out loops).
fn check_prev(id: i64, prev: Option<i64>) -> Result<Option<i64>, StoreError> {
    match prev {
        Some(p) if p >= id => Err(corrupt(
            "messages",
            format!("message {id} links forward to {p}"),
        )),
        _ => Ok(prev),
    }
}

/// `t` as microseconds since 1970.
fn micros(t: OffsetDateTime) -> Result<i64, StoreError> {
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1000))
        .map_err(|_| StoreError::TimeOutOfRange(t))
}

/// A stored time (microseconds since 1970), in UTC.
fn time_from_micros(table: &'static str, us: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .map_err(|_| corrupt(table, format!("time {us} µs is out of range")))
}

/// A `u64` counter, bit for bit, as SQLite's signed integer.
fn counter_to_sql(c: u64) -> i64 {
    i64::from_ne_bytes(c.to_ne_bytes())
}

/// The inverse of [`counter_to_sql`].
fn counter_from_sql(c: i64) -> u64 {
    u64::from_ne_bytes(c.to_ne_bytes())
}

/// A query limit as SQL's `LIMIT`.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn meter_id(table: &'static str, s: &str) -> Result<MeterId, StoreError> {
    MeterId::new(s).map_err(|e| corrupt(table, format!("meter id {s:?}: {e}")))
}

fn format_from_sql(s: &str) -> Result<Format, StoreError> {
    Format::from_content_type(s)
        .ok_or_else(|| corrupt("messages", format!("unknown content type {s:?}")))
}

fn sha_from_sql(table: &'static str, b: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(b).map_err(|_| corrupt(table, format!("hash of {} bytes", b.len())))
}

fn corrupt(table: &'static str, detail: String) -> StoreError {
    StoreError::Corrupt { table, detail }
}
