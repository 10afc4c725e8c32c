//! [`AuditLog`]: the entries and checkpoints in SQLite.
//!
//! ```sql
//! entries(seq INTEGER PRIMARY KEY, time TEXT, actor TEXT, action TEXT, target TEXT,
//!         outcome TEXT, source TEXT NULL, detail TEXT, prev BLOB, hash BLOB)
//! checkpoints(id INTEGER PRIMARY KEY, size INTEGER, note TEXT)
//! schema(version INTEGER)                       -- one row: SCHEMA_VERSION
//! ```
//!
//! Appends run in one `IMMEDIATE` transaction that reads the last stored row and chains from
//! its stored hash, committed with `synchronous = FULL` in WAL mode: once
//! [`AuditLog::append`] returned, the entry survives a crash. An edit made behind the log's
//! back is never "healed" by later appends: they chain from whatever the last row holds.
//! Triggers refuse `UPDATE` and `DELETE` on both tables, so that only someone who drops them
//! (i.e. deliberately) can rewrite history; [`AuditLog::verify`] catches that.
//!
//! A new file is created with mode 0600 and carries its own `application_id`
//! ([`APPLICATION_ID`]).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::entry::{
    Entry, EntryError, GENESIS, NewEntry, format_time, hash_from_slice, parse_time,
};
use crate::key::{AuditKey, KeyError};
use crate::verify::{Finding, Report, verify, walk};

/// `PRAGMA application_id` of an audit database: `GRAU` in ASCII.
pub const APPLICATION_ID: i32 = 0x4752_4155;

/// The schema version this code writes and reads (table `schema`).
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE schema (version INTEGER NOT NULL) STRICT;
CREATE TABLE entries (
    seq     INTEGER PRIMARY KEY,
    time    TEXT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    outcome TEXT NOT NULL,
    source  TEXT,
    detail  TEXT NOT NULL,
    prev    BLOB NOT NULL,
    hash    BLOB NOT NULL
) STRICT;
CREATE INDEX entries_time ON entries (time);
CREATE INDEX entries_actor ON entries (actor, seq);
CREATE INDEX entries_action ON entries (action, seq);
CREATE TABLE checkpoints (
    id   INTEGER PRIMARY KEY,
    size INTEGER NOT NULL,
    note TEXT NOT NULL
) STRICT;
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

const ENTRY_COLUMNS: &str = "seq, time, actor, action, target, outcome, source, detail, prev, hash";

/// How long a writer waits for another process's lock before failing.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the audit log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
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
    /// The file is another application's database.
    #[error("{} is not a Gridward audit database (application_id {application_id:#x})", path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Its application id.
        application_id: i32,
    },
    /// The file was written by a newer version (or its `schema` table was damaged).
    #[error("{} has schema version {found}; this code knows {SCHEMA_VERSION}", path.display())]
    SchemaVersion {
        /// The file.
        path: PathBuf,
        /// Its version (-1 if unreadable).
        found: i64,
    },
    /// SQLite cannot use write-ahead logging on this file system.
    #[error("WAL journal mode unavailable (got {0:?})")]
    WalUnavailable(String),
    /// An entry to append is invalid.
    #[error("invalid audit entry: {0}")]
    Entry(#[from] EntryError),
    /// A stored row does not read back (edited outside the log): run `gridward audit verify`.
    #[error("stored entry {seq} is unreadable: {reason}")]
    BadRow {
        /// Its sequence number.
        seq: i64,
        /// What is wrong.
        reason: String,
    },
    /// The log is full (sequence numbers exhausted).
    #[error("the audit log is full")]
    Full,
    /// A checkpoint could not be signed, or the last stored one does not open with this key.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The origin is not a valid key name.
    #[error("checkpoint key: {0}")]
    Key(#[from] KeyError),
    /// The log does not extend the last checkpoint: no new checkpoint is signed over it.
    #[error("refusing to sign a checkpoint: {0}")]
    Tampered(Finding),
    /// A thread panicked while holding the connection.
    #[error("the audit log's lock is poisoned")]
    Poisoned,
}

/// Which entries [`AuditLog::entries`] returns, in `seq` order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Only entries at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only this actor (`user:alice`), or actors with this prefix if it ends with `:`
    /// (`user:`, `cert:`).
    pub actor: Option<String>,
    /// Only this action (`login.failure`), or actions with this prefix if it ends with `.`
    /// (`login.`).
    pub action: Option<String>,
    /// Only entries with a higher `seq` (for paging).
    pub after_seq: Option<u64>,
    /// At most this many entries; 0 means no limit.
    pub limit: usize,
}

/// The audit log: a SQLite database. `Send + Sync`; share it behind an `Arc`.
#[derive(Debug)]
pub struct AuditLog {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// A stored row as text and bytes, before it is parsed.
struct RawRow {
    seq: i64,
    time: String,
    actor: String,
    action: String,
    target: String,
    outcome: String,
    source: Option<String>,
    detail: String,
    prev: Vec<u8>,
    hash: Vec<u8>,
}

impl RawRow {
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: row.get(0)?,
            time: row.get(1)?,
            actor: row.get(2)?,
            action: row.get(3)?,
            target: row.get(4)?,
            outcome: row.get(5)?,
            source: row.get(6)?,
            detail: row.get(7)?,
            prev: row.get(8)?,
            hash: row.get(9)?,
        })
    }

    fn parse(self) -> Result<Entry, AuditError> {
        let seq = self.seq;
        let bad = |reason: String| AuditError::BadRow { seq, reason };
        Ok(Entry {
            seq: u64::try_from(seq).map_err(|_| bad("negative seq".into()))?,
            time: parse_time(&self.time).map_err(|e| bad(e.to_string()))?,
            actor: self
                .actor
                .parse()
                .map_err(|e: EntryError| bad(e.to_string()))?,
            action: self.action,
            target: self.target,
            outcome: self
                .outcome
                .parse()
                .map_err(|e: EntryError| bad(e.to_string()))?,
            source: self.source,
            detail: self.detail,
            prev: hash_from_slice("prev", &self.prev).map_err(|e| bad(e.to_string()))?,
            hash: hash_from_slice("hash", &self.hash).map_err(|e| bad(e.to_string()))?,
        })
    }
}

impl AuditLog {
    /// Opens `path`, creating it (mode 0600) and its tables if needed.
    ///
    /// # Errors
    ///
    /// [`AuditError::Create`], [`AuditError::Foreign`], [`AuditError::SchemaVersion`],
    /// [`AuditError::WalUnavailable`], [`AuditError::Sqlite`].
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        create_private(path)?;
        let mut conn = Connection::open_with_flags(path, OpenFlags::default())?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(AuditError::WalUnavailable(mode));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn, path)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, AuditError> {
        self.conn.lock().map_err(|_| AuditError::Poisoned)
    }

    /// Appends one entry; returns it as stored.
    ///
    /// # Errors
    ///
    /// [`AuditError::Entry`] (nothing is stored), [`AuditError::Full`], [`AuditError::Sqlite`].
    pub fn append(&self, entry: &NewEntry) -> Result<Entry, AuditError> {
        let mut stored = self.append_all(std::slice::from_ref(entry))?;
        stored.pop().ok_or(AuditError::Full)
    }

    /// Appends `entries` in order, in one durable transaction: all or none are stored.
    ///
    /// # Errors
    ///
    /// [`AuditError::Entry`] (nothing is stored), [`AuditError::Full`], [`AuditError::Sqlite`].
    pub fn append_all(&self, entries: &[NewEntry]) -> Result<Vec<Entry>, AuditError> {
        let validated = entries
            .iter()
            .map(NewEntry::validated)
            .collect::<Result<Vec<_>, _>>()?;
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (mut seq, mut prev) = head_of(&tx)?.unwrap_or((0, GENESIS));
        let mut out = Vec::with_capacity(validated.len());
        {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT INTO entries ({ENTRY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ))?;
            for new in &validated {
                seq = seq.checked_add(1).ok_or(AuditError::Full)?;
                let sql_seq = i64::try_from(seq).map_err(|_| AuditError::Full)?;
                let entry = Entry::seal(seq, new, prev)?;
                insert.execute(params![
                    sql_seq,
                    format_time(entry.time)?,
                    entry.actor.to_string(),
                    entry.action,
                    entry.target,
                    entry.outcome.as_str(),
                    entry.source,
                    entry.detail,
                    &entry.prev[..],
                    &entry.hash[..],
                ])?;
                prev = entry.hash;
                out.push(entry);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// The last entry's `seq` and stored hash, or `None` if the log is empty.
    ///
    /// # Errors
    ///
    /// [`AuditError::Sqlite`].
    pub fn head(&self) -> Result<Option<(u64, [u8; 32])>, AuditError> {
        let conn = self.lock()?;
        head_of(&conn)
    }

    /// Signs and stores a checkpoint of the current head if entries were appended since the
    /// last one; returns its note. Before signing, checks that the entries since the last
    /// checkpoint extend it (and refuses with [`AuditError::Tampered`] otherwise, so that a
    /// tampered log is never signed over).
    ///
    /// The checkpoint's origin is also the key name: verify with `key.verifier(origin)`.
    ///
    /// # Errors
    ///
    /// [`AuditError::Tampered`], [`AuditError::Checkpoint`] (bad origin; or the last stored
    /// checkpoint does not open with this key, e.g. after a key change), [`AuditError::Key`],
    /// [`AuditError::BadRow`], [`AuditError::Sqlite`].
    pub fn checkpoint(
        &self,
        key: &AuditKey,
        origin: &str,
        now: OffsetDateTime,
    ) -> Result<Option<String>, AuditError> {
        let verifier = key.verifier(origin)?;
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some((size, head)) = head_of(&tx)? else {
            return Ok(None);
        };
        let last: Option<String> = tx
            .query_row(
                "SELECT note FROM checkpoints ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let (from_seq, anchor) = match last {
            None => (1, GENESIS),
            Some(note) => {
                let last = Checkpoint::open(&note, &verifier)?;
                if last.size == size && last.head == head {
                    return Ok(None);
                }
                if last.size >= size {
                    return Err(AuditError::Tampered(Finding::Truncated {
                        expected: last.size,
                        found: size,
                    }));
                }
                // The entry the last checkpoint ends at must still be the one it signed.
                let at = i64::try_from(last.size).map_err(|_| AuditError::Full)?;
                let stored: Option<Vec<u8>> = tx
                    .query_row("SELECT hash FROM entries WHERE seq = ?1", [at], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if stored.as_deref() != Some(&last.head[..]) {
                    return Err(AuditError::Tampered(Finding::CheckpointMismatch {
                        size: last.size,
                    }));
                }
                (last.size + 1, last.head)
            }
        };
        let since = read_entries(&tx, i64::try_from(from_seq).map_err(|_| AuditError::Full)?)?;
        if let Some(finding) = walk(&since, from_seq, anchor) {
            return Err(AuditError::Tampered(finding));
        }
        let cp = Checkpoint {
            origin: origin.to_owned(),
            size,
            head,
            time: now,
        };
        let note = cp.sign(key)?;
        tx.execute(
            "INSERT INTO checkpoints (size, note) VALUES (?1, ?2)",
            params![i64::try_from(size).map_err(|_| AuditError::Full)?, note],
        )?;
        tx.commit()?;
        Ok(Some(note))
    }

    /// The last stored checkpoint note.
    ///
    /// # Errors
    ///
    /// [`AuditError::Sqlite`].
    pub fn latest_checkpoint(&self) -> Result<Option<String>, AuditError> {
        Ok(self
            .lock()?
            .query_row(
                "SELECT note FROM checkpoints ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every stored checkpoint note, oldest first.
    ///
    /// # Errors
    ///
    /// [`AuditError::Sqlite`].
    pub fn checkpoints(&self) -> Result<Vec<String>, AuditError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached("SELECT note FROM checkpoints ORDER BY id")?;
        let notes = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(notes)
    }

    /// The entries matching `query`, in `seq` order.
    ///
    /// # Errors
    ///
    /// [`AuditError::BadRow`], [`AuditError::Entry`] (a `since` out of range),
    /// [`AuditError::Sqlite`].
    pub fn entries(&self, query: &Query) -> Result<Vec<Entry>, AuditError> {
        let since = query.since.map(format_time).transpose()?;
        let (actor_exact, actor_prefix) = split_filter(query.actor.as_deref(), ':');
        let (action_exact, action_prefix) = split_filter(query.action.as_deref(), '.');
        let after = query
            .after_seq
            .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let limit = if query.limit == 0 {
            -1
        } else {
            i64::try_from(query.limit).unwrap_or(i64::MAX)
        };
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries
             WHERE seq > ?1
               AND (?2 IS NULL OR time >= ?2)
               AND (?3 IS NULL OR actor = ?3)
               AND (?4 IS NULL OR substr(actor, 1, length(?4)) = ?4)
               AND (?5 IS NULL OR action = ?5)
               AND (?6 IS NULL OR substr(action, 1, length(?6)) = ?6)
             ORDER BY seq LIMIT ?7"
        ))?;
        let rows = stmt.query_map(
            params![
                after,
                since,
                actor_exact,
                actor_prefix,
                action_exact,
                action_prefix,
                limit
            ],
            RawRow::read,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?.parse()?);
        }
        Ok(out)
    }

    /// Every entry, in `seq` order.
    ///
    /// # Errors
    ///
    /// [`AuditError::BadRow`], [`AuditError::Sqlite`].
    pub fn all_entries(&self) -> Result<Vec<Entry>, AuditError> {
        let conn = self.lock()?;
        read_entries(&conn, i64::MIN)
    }

    /// Verifies the whole log and its checkpoints with `key` (see [`crate::verify()`] and the rules in [`crate::verify`](mod@crate::verify)).
    /// A row that does not even read back (a `seq` below 1, an unknown actor or outcome, a
    /// time in another format, a hash that is not 32 bytes) is an entry that was changed
    /// (or, below 1, inserted), unless a problem before it is found first.
    ///
    /// # Errors
    ///
    /// [`AuditError::Sqlite`] only: tampering is reported in the [`Report`].
    pub fn verify(&self, key: &crate::key::VerifierKey) -> Result<Report, AuditError> {
        let (entries, unreadable) = {
            let conn = self.lock()?;
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY seq"))?;
            let mut rows = stmt.query([])?;
            let mut entries = Vec::new();
            let mut unreadable = None;
            while let Some(row) = rows.next()? {
                // A column of an unexpected type (possible only if the STRICT table was
                // replaced) reads as an unreadable row too.
                let seq: i64 = row.get(0).unwrap_or(i64::MIN);
                match RawRow::read(row)
                    .map_err(AuditError::from)
                    .and_then(RawRow::parse)
                {
                    Ok(e) => entries.push(e),
                    Err(_) => {
                        unreadable = Some(seq);
                        break;
                    }
                }
            }
            (entries, unreadable)
        };
        let checkpoints = self.checkpoints()?;
        let mut report = verify(&entries, &checkpoints, key);
        if let Some(seq) = unreadable {
            let at = if seq < 1 {
                Finding::Inserted { seq: 0 }
            } else {
                Finding::Changed {
                    seq: u64::try_from(seq).unwrap_or(0),
                }
            };
            let keep = match &report.finding {
                Some(f @ Finding::BadCheckpoint { .. }) => Some(f.clone()),
                Some(f) if f.seq() < at.seq() => Some(f.clone()),
                _ => None,
            };
            report.finding = Some(keep.unwrap_or(at));
            report.entries_checked += 1;
        }
        Ok(report)
    }
}

/// `(exact, prefix)`: a filter ending with `sep` is a prefix.
fn split_filter(filter: Option<&str>, sep: char) -> (Option<&str>, Option<&str>) {
    match filter {
        Some(f) if f.ends_with(sep) => (None, Some(f)),
        Some(f) => (Some(f), None),
        None => (None, None),
    }
}

/// The last row's seq and hash. A hash of the wrong length (edited) is chained from as
/// SHA-256 of its bytes, so that logging never stops and the break stays visible.
fn head_of(conn: &Connection) -> Result<Option<(u64, [u8; 32])>, AuditError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        None => None,
        Some((seq, hash)) => {
            let seq = u64::try_from(seq).map_err(|_| AuditError::BadRow {
                seq,
                reason: "negative seq".into(),
            })?;
            let hash = hash_from_slice("hash", &hash).unwrap_or_else(|_| {
                use sha2::Digest;
                sha2::Sha256::digest(&hash).into()
            });
            Some((seq, hash))
        }
    })
}

fn read_entries(conn: &Connection, from_seq: i64) -> Result<Vec<Entry>, AuditError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ENTRY_COLUMNS} FROM entries WHERE seq >= ?1 ORDER BY seq"
    ))?;
    let rows = stmt.query_map([from_seq], RawRow::read)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row?.parse()?);
    }
    Ok(out)
}

fn create_private(path: &Path) -> Result<(), AuditError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(AuditError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks the owner and version of the file and creates the tables of a new one.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AuditError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let application_id: i32 = tx.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let foreign = || AuditError::Foreign {
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
        if has_objects {
            return Err(foreign());
        }
        tx.execute_batch(SCHEMA)?;
        tx.execute("INSERT INTO schema (version) VALUES (?1)", [SCHEMA_VERSION])?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    } else if application_id != APPLICATION_ID {
        return Err(foreign());
    } else {
        let found: i64 = tx
            .query_row("SELECT max(version) FROM schema", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()
            .ok()
            .flatten()
            .flatten()
            .unwrap_or(-1);
        if found != SCHEMA_VERSION {
            return Err(AuditError::SchemaVersion {
                path: path.to_owned(),
                found,
            });
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use time::Duration;
    use time::macros::datetime;

    use super::*;
    use crate::entry::{Actor, Outcome};

    const ORIGIN: &str = "gridward.test/audit";

    fn open() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&dir.path().join("audit.db")).unwrap();
        (dir, log)
    }

    fn entry(i: i64, actor: Actor, action: &str) -> NewEntry {
        NewEntry::new(
            datetime!(2026-03-01 12:00 UTC) + Duration::minutes(i),
            actor,
            action,
            format!("t{i}"),
            Outcome::Success,
        )
    }

    #[test]
    fn append_chains_and_reads_back() {
        let (_dir, log) = open();
        assert_eq!(log.head().unwrap(), None);
        let a = log
            .append(&entry(0, Actor::System, "config.reload").source("192.0.2.1"))
            .unwrap();
        assert_eq!((a.seq, a.prev), (1, GENESIS));
        let more = log
            .append_all(&[
                entry(1, Actor::User("alice".into()), "login.success"),
                entry(2, Actor::User("bob".into()), "login.failure"),
            ])
            .unwrap();
        assert_eq!(more[0].prev, a.hash);
        assert_eq!(more[1].prev, more[0].hash);
        assert_eq!(log.head().unwrap(), Some((3, more[1].hash)));
        let all = log.all_entries().unwrap();
        assert_eq!(all, [vec![a], more].concat());
        assert!(all.iter().all(Entry::hash_ok));
    }

    #[test]
    fn a_bad_entry_stores_nothing() {
        let (_dir, log) = open();
        let err = log
            .append_all(&[
                entry(0, Actor::System, "ok"),
                entry(1, Actor::System, "Not OK"),
            ])
            .unwrap_err();
        assert!(matches!(err, AuditError::Entry(EntryError::BadAction(_))));
        assert_eq!(log.head().unwrap(), None);
    }

    #[test]
    fn queries_filter() {
        let (_dir, log) = open();
        log.append_all(&[
            entry(0, Actor::User("alice".into()), "login.success"),
            entry(1, Actor::User("alice".into()), "user.add"),
            entry(2, Actor::User("bob".into()), "login.failure"),
            entry(3, Actor::Certificate("CN=ops".into()), "command.send"),
            entry(4, Actor::System, "login.lockout"),
        ])
        .unwrap();
        let seqs =
            |q: Query| -> Vec<u64> { log.entries(&q).unwrap().iter().map(|e| e.seq).collect() };
        assert_eq!(seqs(Query::default()), [1, 2, 3, 4, 5]);
        let actor = |a: &str| Query {
            actor: Some(a.into()),
            ..Query::default()
        };
        assert_eq!(seqs(actor("user:alice")), [1, 2]);
        assert_eq!(seqs(actor("user:")), [1, 2, 3]);
        assert_eq!(seqs(actor("user:ali")), Vec::<u64>::new());
        assert_eq!(seqs(actor("system")), [5]);
        let action = |a: &str| Query {
            action: Some(a.into()),
            ..Query::default()
        };
        assert_eq!(seqs(action("login.")), [1, 3, 5]);
        assert_eq!(seqs(action("login.failure")), [3]);
        assert_eq!(seqs(action("login")), Vec::<u64>::new());
        assert_eq!(
            seqs(Query {
                since: Some(datetime!(2026-03-01 12:02 UTC)),
                ..Query::default()
            }),
            [3, 4, 5]
        );
        assert_eq!(
            seqs(Query {
                after_seq: Some(1),
                limit: 2,
                ..Query::default()
            }),
            [2, 3]
        );
        assert_eq!(
            seqs(Query {
                since: Some(datetime!(2026-03-01 13:01 +01:00)),
                action: Some("login.".into()),
                ..Query::default()
            }),
            [3, 5]
        );
    }

    #[test]
    fn checkpoints_only_when_the_log_grew() {
        let (_dir, log) = open();
        let key = AuditKey::generate().unwrap();
        let v = key.verifier(ORIGIN).unwrap();
        let now = datetime!(2026-03-02 0:00 UTC);
        assert_eq!(log.checkpoint(&key, ORIGIN, now).unwrap(), None);
        log.append(&entry(0, Actor::System, "a")).unwrap();
        let note = log.checkpoint(&key, ORIGIN, now).unwrap().unwrap();
        let cp = Checkpoint::open(&note, &v).unwrap();
        assert_eq!(
            (cp.size, Some(cp.head)),
            (1, log.head().unwrap().map(|h| h.1))
        );
        assert_eq!(log.checkpoint(&key, ORIGIN, now).unwrap(), None);
        log.append(&entry(1, Actor::System, "b")).unwrap();
        assert!(log.checkpoint(&key, ORIGIN, now).unwrap().is_some());
        assert_eq!(log.checkpoints().unwrap().len(), 2);
        assert_eq!(
            log.latest_checkpoint().unwrap(),
            log.checkpoints().unwrap().pop()
        );
        let report = log.verify(&v).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            (
                report.entries_checked,
                report.checkpoints_checked,
                report.covered
            ),
            (2, 2, 2)
        );
        assert!(matches!(
            log.checkpoint(&key, "bad origin", now),
            Err(AuditError::Key(KeyError::BadName(_)))
        ));
        let other = AuditKey::generate().unwrap();
        log.append(&entry(2, Actor::System, "c")).unwrap();
        assert!(matches!(
            log.checkpoint(&other, ORIGIN, now),
            Err(AuditError::Checkpoint(CheckpointError::UnknownKey { .. }))
        ));
    }

    #[test]
    fn triggers_refuse_edits_through_the_log_connection() {
        let (_dir, log) = open();
        log.append(&entry(0, Actor::System, "a")).unwrap();
        let conn = log.lock().unwrap();
        assert!(conn.execute("UPDATE entries SET target = 'x'", []).is_err());
        assert!(conn.execute("DELETE FROM entries", []).is_err());
    }

    #[test]
    fn foreign_and_newer_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x)").unwrap();
        drop(conn);
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Foreign { .. })
        ));
        let path = dir.path().join("audit.db");
        drop(AuditLog::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE schema SET version = 2", []).unwrap();
        drop(conn);
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::SchemaVersion { found: 2, .. })
        ));
    }

    #[test]
    fn the_log_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AuditLog>();
    }
}
