//! [`SinkStore`]: the readings and the nonces, in SQLite.
//!
//! ```sql
//! readings(seq INTEGER PRIMARY KEY, reading_id TEXT UNIQUE, meter_id, counter, taken_at,
//!          energy_kwh, body, key_id, received_at)     -- each reading once, in arrival order
//! nonces(key_id, nonce, remember_until, PRIMARY KEY (key_id, nonce))
//! ```
//!
//! [`SinkStore::record`] decides a batch in one transaction. For each request, in order: the
//! nonce is inserted, and if `(key_id, nonce)` is already there the request is a replay and
//! nothing else happens; then the reading is inserted unless its `ReadingID` is stored
//! ([`Outcome::Duplicate`] if with the same values, [`Outcome::Conflict`] if not: nothing is
//! overwritten). The transaction commits with `synchronous = FULL` in WAL mode: once `record`
//! returned, its outcomes hold after a crash, and a nonce is refused across restarts.
//!
//! Nonces are kept until their signature would be refused as expired or too old anyway, then
//! [`SinkStore::purge_nonces`] drops them. (A sink restarted with a longer maximum age may
//! accept a purged nonce again while its signature has not expired; the reading it carries is
//! then a [`Outcome::Duplicate`]: nothing is stored twice.) Times are stored as RFC 3339 text (UTC, whole
//! seconds), `remember_until` as seconds since the epoch.
//!
//! A new file is created with mode 0600 (readings are personal data); the database carries
//! its own `application_id` ([`APPLICATION_ID`]) so that neither this store nor the
//! head-end's opens the other's file by mistake.

use std::path::{Path, PathBuf};

use gridward_core::MeterId;
use gridward_core::document::{format_timestamp, parse_timestamp};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use crate::check::{Incoming, Reading};

/// `PRAGMA application_id` of a sink database: `GRSK` in ASCII.
pub const APPLICATION_ID: i32 = 0x4752_534B;

/// `PRAGMA user_version` this code writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE readings (
    seq         INTEGER PRIMARY KEY,
    reading_id  TEXT NOT NULL UNIQUE,
    meter_id    TEXT NOT NULL,
    counter     INTEGER NOT NULL,
    taken_at    TEXT NOT NULL,
    energy_kwh  REAL NOT NULL,
    body        TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    received_at TEXT NOT NULL
) STRICT;
CREATE INDEX readings_meter ON readings (meter_id, seq);
CREATE TABLE nonces (
    key_id         TEXT NOT NULL,
    nonce          TEXT NOT NULL,
    remember_until INTEGER NOT NULL,
    PRIMARY KEY (key_id, nonce)
) STRICT, WITHOUT ROWID;
CREATE INDEX nonces_expiry ON nonces (remember_until);
";

/// How long a writer waits for another process's lock before failing.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed (I/O error, disk full, locked beyond the busy timeout, corrupt file).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database file could not be created.
    #[error("cannot create {}: {source}", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is another application's database (another `application_id`, or tables
    /// without one), e.g. the head-end's own store.
    #[error("{} is not a Gridward sink database (application_id {application_id:#x})", path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Its application id.
        application_id: i32,
    },
    /// The file was written by a newer version of the sink.
    #[error("{} has schema version {found}; this sink knows {SCHEMA_VERSION}", path.display())]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
    },
    /// The file does not exist (for [`SinkStore::open_existing`]).
    #[error("no sink database at {}", path.display())]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// SQLite cannot use write-ahead logging on this file system.
    #[error("WAL journal mode unavailable (got {0:?})")]
    WalUnavailable(String),
    /// A stored row does not read back (edited outside the sink).
    #[error("stored row {seq} is unreadable: {reason}")]
    BadRow {
        /// Its sequence number.
        seq: i64,
        /// What is wrong.
        reason: String,
    },
}

/// What became of one request in [`SinkStore::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The reading is new and now stored under this sequence number.
    Stored {
        /// Its position in arrival order.
        seq: i64,
    },
    /// A reading with this `ReadingID` and the same values is stored: nothing changed.
    Duplicate,
    /// A reading with this `ReadingID` but other values is stored: nothing changed.
    Conflict,
    /// The signature's nonce was seen before under the same key: nothing changed.
    Replay,
}

/// A stored reading.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    /// Position in arrival order (1, 2, ...).
    pub seq: i64,
    /// The reading.
    pub reading: Reading,
    /// The body as received.
    pub body: String,
    /// The key that signed it.
    pub key_id: String,
    /// When the sink received it (UTC, whole seconds).
    pub received_at: OffsetDateTime,
}

/// How much the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Stored readings.
    pub readings: u64,
    /// Distinct meters among them.
    pub meters: u64,
    /// Nonces remembered.
    pub nonces: u64,
}

/// The sink's SQLite database.
#[derive(Debug)]
pub struct SinkStore {
    conn: Connection,
    path: PathBuf,
}

impl SinkStore {
    /// Opens `path`, creating it (mode 0600) and its tables if needed.
    ///
    /// # Errors
    ///
    /// [`StoreError::Create`], [`StoreError::Foreign`], [`StoreError::SchemaTooNew`],
    /// [`StoreError::WalUnavailable`], [`StoreError::Sqlite`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        create_private(path)?;
        Self::open_with(path, OpenFlags::default())
    }

    /// Opens an existing database (for commands that only look: a mistyped path is an error,
    /// not a new empty file).
    ///
    /// # Errors
    ///
    /// [`StoreError::Missing`], and those of [`SinkStore::open`].
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_owned(),
            });
        }
        Self::open_with(path, OpenFlags::default() - OpenFlags::SQLITE_OPEN_CREATE)
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<Self, StoreError> {
        let mut conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::WalUnavailable(mode));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn, path)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Decides and stores `batch` in one transaction (see the module documentation); one
    /// outcome per item, in order. On error nothing of the batch is stored.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn record(&mut self, batch: &[Incoming]) -> Result<Vec<Outcome>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut nonce = tx.prepare_cached(
                "INSERT INTO nonces (key_id, nonce, remember_until) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO readings
                   (reading_id, meter_id, counter, taken_at, energy_kwh, body, key_id, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (reading_id) DO NOTHING",
            )?;
            let mut existing = tx.prepare_cached(
                "SELECT meter_id, counter, taken_at, energy_kwh FROM readings WHERE reading_id = ?1",
            )?;
            for item in batch {
                let fresh = nonce.execute(params![
                    item.key_id,
                    item.nonce,
                    item.remember_until.unix_timestamp()
                ])?;
                if fresh == 0 {
                    outcomes.push(Outcome::Replay);
                    continue;
                }
                let r = &item.reading;
                // `check` refuses counters beyond i64::MAX.
                let counter = i64::try_from(r.counter).unwrap_or(i64::MAX);
                let added = insert.execute(params![
                    r.reading_id,
                    r.meter_id.as_str(),
                    counter,
                    format_timestamp(r.taken_at),
                    r.energy_kwh,
                    item.body,
                    item.key_id,
                    format_timestamp(item.received_at),
                ])?;
                if added == 1 {
                    outcomes.push(Outcome::Stored {
                        seq: tx.last_insert_rowid(),
                    });
                    continue;
                }
                let same = existing
                    .query_row([&r.reading_id], |row| {
                        Ok(row.get::<_, String>(0)? == r.meter_id.as_str()
                            && row.get::<_, i64>(1)? == counter
                            && row.get::<_, String>(2)? == format_timestamp(r.taken_at)
                            && row.get::<_, f64>(3)?.to_bits() == r.energy_kwh.to_bits())
                    })
                    .optional()?
                    .unwrap_or(false);
                outcomes.push(if same {
                    Outcome::Duplicate
                } else {
                    Outcome::Conflict
                });
            }
        }
        tx.commit()?;
        Ok(outcomes)
    }

    /// Forgets the nonces whose signatures are refused as expired or too old at `now`;
    /// returns how many.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn purge_nonces(&mut self, now: OffsetDateTime) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM nonces WHERE remember_until < ?1",
            [now.unix_timestamp()],
        )?)
    }

    /// The stored readings in arrival order: all, or one meter's.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::BadRow`].
    pub fn readings(&self, meter: Option<&MeterId>) -> Result<Vec<StoredReading>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, reading_id, meter_id, counter, taken_at, energy_kwh, body, key_id,
                    received_at
             FROM readings WHERE ?1 IS NULL OR meter_id = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map([meter.map(MeterId::as_str)], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, f64>(5)?,
                row.get::<_, String>(6)?,
                row.get::<_, String>(7)?,
                row.get::<_, String>(8)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, reading_id, meter_id, counter, taken_at, energy_kwh, body, key_id, received) =
                row?;
            let bad = |reason: String| StoreError::BadRow { seq, reason };
            out.push(StoredReading {
                seq,
                reading: Reading {
                    reading_id,
                    meter_id: MeterId::new(&meter_id).map_err(|e| bad(e.to_string()))?,
                    counter: u64::try_from(counter).map_err(|e| bad(e.to_string()))?,
                    taken_at: parse_timestamp(&taken_at).map_err(|e| bad(e.to_string()))?,
                    energy_kwh,
                },
                body,
                key_id,
                received_at: parse_timestamp(&received).map_err(|e| bad(e.to_string()))?,
            });
        }
        Ok(out)
    }

    /// How many readings, meters and nonces the store holds.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn counts(&self) -> Result<Counts, StoreError> {
        let count = |sql: &str| -> Result<u64, StoreError> {
            let n: i64 = self.conn.query_row(sql, [], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        Ok(Counts {
            readings: count("SELECT count(*) FROM readings")?,
            meters: count("SELECT count(DISTINCT meter_id) FROM readings")?,
            nonces: count("SELECT count(*) FROM nonces")?,
        })
    }
}

/// Creates `path` as an empty file only its owner may read and write, unless it exists.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks the owner and version of the file and creates the tables of a new one.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    // IMMEDIATE: two processes opening the same new file must not both create the tables.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let application_id: i32 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let foreign = || StoreError::Foreign {
        path: path.to_owned(),
        application_id,
    };
    if application_id == 0 {
        let has_objects = tx
            .query_row("SELECT 1 FROM sqlite_schema LIMIT 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .is_some();
        if has_objects || version != 0 {
            return Err(foreign());
        }
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    } else if application_id != APPLICATION_ID || version < 1 {
        return Err(foreign());
    } else if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_owned(),
            found: version,
        });
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn incoming(meter: &str, counter: u64, kwh: f64, nonce: &str) -> Incoming {
        let reading_id = format!("{meter}-{counter}");
        Incoming {
            body: format!(r#"{{"ReadingID":"{reading_id}"}}"#),
            reading: Reading {
                reading_id,
                meter_id: MeterId::new(meter).unwrap(),
                counter,
                taken_at: datetime!(2026-12-02 10:15:00 UTC),
                energy_kwh: kwh,
            },
            key_id: "hes".into(),
            nonce: nonce.into(),
            remember_until: datetime!(2026-12-02 10:20:00 UTC),
            received_at: datetime!(2026-12-02 10:15:01 UTC),
        }
    }

    fn open() -> (tempfile::TempDir, SinkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SinkStore::open(&dir.path().join("sink.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_batch_decides_replays_duplicates_and_conflicts_in_order() {
        let (_dir, mut store) = open();
        let outcomes = store
            .record(&[
                incoming("m1", 1, 1.0, "a"),
                incoming("m1", 1, 1.0, "a"), // same nonce: replay
                incoming("m1", 1, 1.0, "b"), // same reading, new nonce: duplicate
                incoming("m1", 1, 2.0, "c"), // same id, other value: conflict
                incoming("m2", 1, 1.0, "a"), // same nonce, other reading: replay
                incoming("m1", 2, 1.5, "d"),
            ])
            .unwrap();
        assert_eq!(
            outcomes,
            [
                Outcome::Stored { seq: 1 },
                Outcome::Replay,
                Outcome::Duplicate,
                Outcome::Conflict,
                Outcome::Replay,
                Outcome::Stored { seq: 2 },
            ]
        );
        let rows = store.readings(None).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].reading, incoming("m1", 1, 1.0, "a").reading);
        assert_eq!(rows[0].body, r#"{"ReadingID":"m1-1"}"#);
        assert_eq!(rows[0].key_id, "hes");
        assert_eq!(rows[0].received_at, datetime!(2026-12-02 10:15:01 UTC));
        assert_eq!(rows[1].reading.reading_id, "m1-2");
        assert_eq!(
            store.counts().unwrap(),
            Counts {
                readings: 2,
                meters: 1,
                nonces: 4
            }
        );
        // The same nonce under another key is another nonce.
        let mut other = incoming("m3", 1, 1.0, "a");
        other.key_id = "other".into();
        assert_eq!(
            store.record(&[other]).unwrap(),
            [Outcome::Stored { seq: 3 }]
        );
        let m3 = MeterId::new("m3").unwrap();
        assert_eq!(store.readings(Some(&m3)).unwrap().len(), 1);
    }

    #[test]
    fn decisions_survive_reopening_and_nonces_are_purged_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink.db");
        SinkStore::open(&path)
            .unwrap()
            .record(&[incoming("m1", 1, 1.0, "a")])
            .unwrap();
        let mut store = SinkStore::open(&path).unwrap();
        assert_eq!(
            store.record(&[incoming("m1", 9, 1.0, "a")]).unwrap(),
            [Outcome::Replay]
        );
        // remember_until is 10:20:00: kept at that second, gone after it.
        assert_eq!(
            store
                .purge_nonces(datetime!(2026-12-02 10:20:00.9 UTC))
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .purge_nonces(datetime!(2026-12-02 10:20:01 UTC))
                .unwrap(),
            1
        );
        assert_eq!(store.counts().unwrap().nonces, 0);
        assert_eq!(store.readings(None).unwrap().len(), 1);
    }

    #[test]
    fn the_file_is_private_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sink.db");
        let store = SinkStore::open(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2); // FULL
        drop(store);

        let other = dir.path().join("other.db");
        let conn = Connection::open(&other).unwrap();
        conn.pragma_update(None, "application_id", 0x4752_4457)
            .unwrap();
        conn.execute_batch("CREATE TABLE t (x)").unwrap();
        drop(conn);
        assert!(matches!(
            SinkStore::open(&other),
            Err(StoreError::Foreign { .. })
        ));
        let plain = dir.path().join("plain.db");
        Connection::open(&plain)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            SinkStore::open(&plain),
            Err(StoreError::Foreign { .. })
        ));
        assert!(matches!(
            SinkStore::open_existing(&dir.path().join("absent.db")),
            Err(StoreError::Missing { .. })
        ));
        assert!(!dir.path().join("absent.db").exists());
    }
}
