//! [`AccessStore`]: users, recovery codes and sessions in SQLite.
//!
//! ```sql
//! schema_version(version)
//! users(id, username UNIQUE, role, meters /* JSON array */, password_hash /* Argon2id PHC */,
//!       disabled, totp_secret, totp_last_step, failures, locked_until, created_at, changed_at)
//! recovery_codes(user_id, code_hash /* SHA-256 hex */, used_at)
//! sessions(id, token_hash UNIQUE /* SHA-256 */, csrf_hash /* SHA-256 */, user_id, created_at,
//!          last_used_at, revoked_at)
//! ```
//!
//! Times are seconds since the Unix epoch (UTC). WAL mode with `synchronous = FULL`: a change
//! that returned is on disk. Every change that must revoke sessions does so in its own
//! transaction. The connection sits behind a mutex, so the store is `Send + Sync`; Argon2 runs
//! outside it. A new file is created with mode 0600 and carries its own `application_id`
//! ([`APPLICATION_ID`]).
//!
//! The TOTP secret is stored as is (it must be read back to check codes); the file's mode is
//! what protects it for now.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use gridward_core::MeterId;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Row, Transaction, TransactionBehavior, params,
};
use time::{Duration, OffsetDateTime};

use crate::principal::Role;

/// `PRAGMA application_id` of an access database: `GRAC` in ASCII.
pub const APPLICATION_ID: i32 = 0x4752_4143;

/// The schema version this code writes and reads (table `schema_version`).
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE schema_version (
    version INTEGER NOT NULL
) STRICT;
CREATE TABLE users (
    id             INTEGER PRIMARY KEY,
    username       TEXT NOT NULL UNIQUE,
    role           TEXT NOT NULL,
    meters         TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    disabled       INTEGER NOT NULL DEFAULT 0,
    totp_secret    BLOB,
    totp_last_step INTEGER,
    failures       INTEGER NOT NULL DEFAULT 0,
    locked_until   INTEGER,
    created_at     INTEGER NOT NULL,
    changed_at     INTEGER NOT NULL
) STRICT;
CREATE TABLE recovery_codes (
    user_id   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash TEXT NOT NULL,
    used_at   INTEGER,
    PRIMARY KEY (user_id, code_hash)
) STRICT, WITHOUT ROWID;
CREATE TABLE sessions (
    id           INTEGER PRIMARY KEY,
    token_hash   BLOB NOT NULL UNIQUE,
    csrf_hash    BLOB NOT NULL,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL,
    revoked_at   INTEGER
) STRICT;
CREATE INDEX sessions_user ON sessions (user_id);
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
    /// The file is another application's database.
    #[error("{} is not a Gridward access database (application_id {application_id:#x})", path.display())]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Its application id.
        application_id: i32,
    },
    /// The file was written by a newer version of Gridward.
    #[error("{} has schema version {found}; this version knows {SCHEMA_VERSION}", path.display())]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: i64,
    },
    /// SQLite cannot use write-ahead logging on this file system.
    #[error("WAL journal mode unavailable (got {0:?})")]
    WalUnavailable(String),
    /// A user with this name exists already.
    #[error("user {0:?} exists already")]
    UserExists(String),
    /// No user has this name.
    #[error("no user {0:?}")]
    NoSuchUser(String),
    /// A stored row does not read back (edited outside Gridward).
    #[error("stored user {user:?} is unreadable: {reason}")]
    BadRow {
        /// The user (or row id).
        user: String,
        /// What is wrong.
        reason: String,
    },
    /// Another thread panicked while holding the connection.
    #[error("store lock poisoned")]
    Poisoned,
}

/// A user as stored. `Debug` redacts the password hash and the TOTP secret.
#[derive(Clone, PartialEq, Eq)]
pub struct UserRow {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// Bound meters (consumers).
    pub meters: Vec<MeterId>,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Whether the user may not log in.
    pub disabled: bool,
    /// The TOTP secret, if enrolled.
    pub totp_secret: Option<Vec<u8>>,
    /// The last TOTP step accepted.
    pub totp_last_step: Option<u64>,
    /// Consecutive failed logins.
    pub failures: u32,
    /// Locked until this time, if a lockout was started.
    pub locked_until: Option<OffsetDateTime>,
    /// Created.
    pub created_at: OffsetDateTime,
    /// Last changed (role, password, state, second factor).
    pub changed_at: OffsetDateTime,
}

impl std::fmt::Debug for UserRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRow")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("role", &self.role)
            .field("meters", &self.meters)
            .field("password_hash", &"[redacted]")
            .field("disabled", &self.disabled)
            .field(
                "totp_secret",
                &self.totp_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("totp_last_step", &self.totp_last_step)
            .field("failures", &self.failures)
            .field("locked_until", &self.locked_until)
            .field("created_at", &self.created_at)
            .field("changed_at", &self.changed_at)
            .finish()
    }
}

/// A second factor to store: the TOTP secret and the hashes of its recovery codes.
#[derive(Clone)]
pub struct NewTotp {
    /// The secret.
    pub secret: Vec<u8>,
    /// SHA-256 (hex) of each recovery code.
    pub recovery_hashes: Vec<String>,
}

impl std::fmt::Debug for NewTotp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewTotp([redacted])")
    }
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// Row id.
    pub id: i64,
    /// SHA-256 of the CSRF token.
    pub csrf_hash: [u8; 32],
    /// Created.
    pub created_at: OffsetDateTime,
    /// Last used.
    pub last_used_at: OffsetDateTime,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// The access database.
#[derive(Debug)]
pub struct AccessStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

const USER_COLUMNS: &str = "id, username, role, meters, password_hash, disabled, totp_secret,
    totp_last_step, failures, locked_until, created_at, changed_at";

impl AccessStore {
    /// Opens `path`, creating it (mode 0600) and its tables if needed.
    ///
    /// # Errors
    ///
    /// [`StoreError::Create`], [`StoreError::Foreign`], [`StoreError::SchemaTooNew`],
    /// [`StoreError::WalUnavailable`], [`StoreError::Sqlite`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        create_private(path)?;
        let mut conn = Connection::open_with_flags(path, OpenFlags::default())?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::WalUnavailable(mode));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
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

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Adds a user, with its second factor if given.
    ///
    /// # Errors
    ///
    /// [`StoreError::UserExists`], [`StoreError::Sqlite`].
    pub fn insert_user(
        &self,
        username: &str,
        role: Role,
        meters: &[MeterId],
        password_hash: &str,
        totp: Option<&NewTotp>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let added = tx.execute(
            "INSERT INTO users (username, role, meters, password_hash, created_at, changed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (username) DO NOTHING",
            params![
                username,
                role.as_str(),
                meters_json(meters),
                password_hash,
                ts(now)
            ],
        )?;
        if added == 0 {
            return Err(StoreError::UserExists(username.to_owned()));
        }
        let id = tx.last_insert_rowid();
        if let Some(totp) = totp {
            put_totp(&tx, id, totp)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The user called `username`, if any.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::BadRow`].
    pub fn user(&self, username: &str) -> Result<Option<UserRow>, StoreError> {
        let conn = self.conn()?;
        let row = conn
            .query_row(
                &format!("SELECT {USER_COLUMNS} FROM users WHERE username = ?1"),
                [username],
                raw_user,
            )
            .optional()?;
        row.map(RawUser::parse).transpose()
    }

    /// Every user, by name.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::BadRow`].
    pub fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY username"
        ))?;
        let rows = stmt.query_map([], raw_user)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?.parse()?);
        }
        Ok(out)
    }

    /// Unused recovery codes of user `user_id`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn recovery_codes_left(&self, user_id: i64) -> Result<u32, StoreError> {
        let conn = self.conn()?;
        let n: i64 = conn.query_row(
            "SELECT count(*) FROM recovery_codes WHERE user_id = ?1 AND used_at IS NULL",
            [user_id],
            |r| r.get(0),
        )?;
        Ok(u32::try_from(n).unwrap_or(0))
    }

    /// Disables or enables `username`; disabling revokes its sessions.
    ///
    /// # Errors
    ///
    /// [`StoreError::NoSuchUser`], [`StoreError::Sqlite`].
    pub fn set_disabled(
        &self,
        username: &str,
        disabled: bool,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.change_user(username, now, disabled, |tx, id| {
            tx.execute(
                "UPDATE users SET disabled = ?2, changed_at = ?3 WHERE id = ?1",
                params![id, disabled, ts(now)],
            )?;
            Ok(())
        })
    }

    /// Replaces the password hash of `username`, clears its failures and lockout, revokes its
    /// sessions.
    ///
    /// # Errors
    ///
    /// [`StoreError::NoSuchUser`], [`StoreError::Sqlite`].
    pub fn set_password(
        &self,
        username: &str,
        password_hash: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.change_user(username, now, true, |tx, id| {
            tx.execute(
                "UPDATE users SET password_hash = ?2, failures = 0, locked_until = NULL,
                     changed_at = ?3 WHERE id = ?1",
                params![id, password_hash, ts(now)],
            )?;
            Ok(())
        })
    }

    /// Sets the role and meters of `username` (and a second factor if given), revokes its
    /// sessions.
    ///
    /// # Errors
    ///
    /// [`StoreError::NoSuchUser`], [`StoreError::Sqlite`].
    pub fn set_role(
        &self,
        username: &str,
        role: Role,
        meters: &[MeterId],
        totp: Option<&NewTotp>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.change_user(username, now, true, |tx, id| {
            tx.execute(
                "UPDATE users SET role = ?2, meters = ?3, changed_at = ?4 WHERE id = ?1",
                params![id, role.as_str(), meters_json(meters), ts(now)],
            )?;
            if let Some(totp) = totp {
                put_totp(tx, id, totp)?;
            }
            Ok(())
        })
    }

    /// Replaces the second factor of `username` (secret and recovery codes), revokes its
    /// sessions.
    ///
    /// # Errors
    ///
    /// [`StoreError::NoSuchUser`], [`StoreError::Sqlite`].
    pub fn set_totp(
        &self,
        username: &str,
        totp: &NewTotp,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.change_user(username, now, true, |tx, id| {
            tx.execute(
                "UPDATE users SET changed_at = ?2 WHERE id = ?1",
                params![id, ts(now)],
            )?;
            put_totp(tx, id, totp)
        })
    }

    /// Runs `change` on the user called `username` in one transaction, then revokes its
    /// sessions if `revoke`.
    fn change_user(
        &self,
        username: &str,
        now: OffsetDateTime,
        revoke: bool,
        change: impl FnOnce(&Transaction<'_>, i64) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id: i64 = tx
            .query_row(
                "SELECT id FROM users WHERE username = ?1",
                [username],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NoSuchUser(username.to_owned()))?;
        change(&tx, id)?;
        if revoke {
            tx.execute(
                "UPDATE sessions SET revoked_at = ?2 WHERE user_id = ?1 AND revoked_at IS NULL",
                params![id, ts(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Counts a failed login of user `user_id` at `now`. A lockout that has run out is forgotten
    /// first; the `max_failures`-th consecutive failure locks the user for `lock_for` and starts
    /// the count again. Returns whether this failure started a lockout.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn record_failure(
        &self,
        user_id: i64,
        now: OffsetDateTime,
        max_failures: u32,
        lock_for: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (failures, locked_until): (i64, Option<i64>) = tx.query_row(
            "SELECT failures, locked_until FROM users WHERE id = ?1",
            [user_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let expired = locked_until.is_some_and(|until| until <= ts(now));
        let failures = if expired {
            1
        } else {
            failures.saturating_add(1)
        };
        let locks = failures >= i64::from(max_failures);
        if locks {
            tx.execute(
                "UPDATE users SET failures = 0, locked_until = ?2 WHERE id = ?1",
                params![user_id, ts(now + lock_for)],
            )?;
        } else {
            tx.execute(
                "UPDATE users SET failures = ?2,
                     locked_until = CASE WHEN ?3 THEN NULL ELSE locked_until END WHERE id = ?1",
                params![user_id, failures, expired],
            )?;
        }
        tx.commit()?;
        Ok(locks)
    }

    /// Forgets the failures and any lockout of user `user_id` (after a successful login).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn reset_failures(&self, user_id: i64) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE users SET failures = 0, locked_until = NULL WHERE id = ?1",
            [user_id],
        )?;
        Ok(())
    }

    /// Clears the failures and lockout of `username` (an administrator's unlock).
    ///
    /// # Errors
    ///
    /// [`StoreError::NoSuchUser`], [`StoreError::Sqlite`].
    pub fn unlock(&self, username: &str, now: OffsetDateTime) -> Result<(), StoreError> {
        self.change_user(username, now, false, |tx, id| {
            tx.execute(
                "UPDATE users SET failures = 0, locked_until = NULL, changed_at = ?2 WHERE id = ?1",
                params![id, ts(now)],
            )?;
            Ok(())
        })
    }

    /// Records TOTP step `step` as accepted for user `user_id` if it is later than the last one;
    /// `false` if it is not (a replay, also when two logins race with the same code).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn accept_totp_step(&self, user_id: i64, step: u64) -> Result<bool, StoreError> {
        let step = i64::try_from(step).unwrap_or(i64::MAX);
        let n = self.conn()?.execute(
            "UPDATE users SET totp_last_step = ?2
             WHERE id = ?1 AND (totp_last_step IS NULL OR totp_last_step < ?2)",
            params![user_id, step],
        )?;
        Ok(n == 1)
    }

    /// Uses the recovery code with hash `code_hash` of user `user_id`; `false` if there is no
    /// such unused code.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn use_recovery_code(
        &self,
        user_id: i64,
        code_hash: &str,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let n = self.conn()?.execute(
            "UPDATE recovery_codes SET used_at = ?3
             WHERE user_id = ?1 AND code_hash = ?2 AND used_at IS NULL",
            params![user_id, code_hash, ts(now)],
        )?;
        Ok(n == 1)
    }

    /// Stores a new session; returns its id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn insert_session(
        &self,
        user_id: i64,
        token_hash: &[u8; 32],
        csrf_hash: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<i64, StoreError> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO sessions (token_hash, csrf_hash, user_id, created_at, last_used_at)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![&token_hash[..], &csrf_hash[..], user_id, ts(now)],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// The session with token hash `token_hash` and its user.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`], [`StoreError::BadRow`].
    pub fn session(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<(SessionRow, UserRow)>, StoreError> {
        let conn = self.conn()?;
        let cols = USER_COLUMNS
            .split(',')
            .map(|c| format!("u.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let row = conn
            .query_row(
                &format!(
                    "SELECT s.id, s.csrf_hash, s.created_at, s.last_used_at, s.revoked_at IS NOT NULL,
                            {cols}
                     FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = ?1"
                ),
                [&token_hash[..]],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, bool>(4)?,
                        raw_user_at(r, 5)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, csrf, created, last_used, revoked, user)) = row else {
            return Ok(None);
        };
        let bad = |reason: &str| StoreError::BadRow {
            user: format!("session {id}"),
            reason: reason.to_owned(),
        };
        let session = SessionRow {
            id,
            csrf_hash: csrf
                .try_into()
                .map_err(|_| bad("csrf hash is not 32 bytes"))?,
            created_at: from_ts(created).ok_or_else(|| bad("bad created_at"))?,
            last_used_at: from_ts(last_used).ok_or_else(|| bad("bad last_used_at"))?,
            revoked,
        };
        Ok(Some((session, user.parse()?)))
    }

    /// Marks session `id` as used at `now` (never moving `last_used_at` backwards).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn touch_session(&self, id: i64, now: OffsetDateTime) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE sessions SET last_used_at = max(last_used_at, ?2) WHERE id = ?1",
            params![id, ts(now)],
        )?;
        Ok(())
    }

    /// Revokes the session with token hash `token_hash`; `false` if there is none (or it was
    /// revoked already).
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn revoke_session(
        &self,
        token_hash: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let n = self.conn()?.execute(
            "UPDATE sessions SET revoked_at = ?2 WHERE token_hash = ?1 AND revoked_at IS NULL",
            params![&token_hash[..], ts(now)],
        )?;
        Ok(n == 1)
    }

    /// Deletes sessions that ended (revoked, or created before `created_before`, or last used
    /// before `used_before`); returns how many.
    ///
    /// # Errors
    ///
    /// [`StoreError::Sqlite`].
    pub fn purge_sessions(
        &self,
        created_before: OffsetDateTime,
        used_before: OffsetDateTime,
    ) -> Result<usize, StoreError> {
        Ok(self.conn()?.execute(
            "DELETE FROM sessions
             WHERE revoked_at IS NOT NULL OR created_at < ?1 OR last_used_at < ?2",
            params![ts(created_before), ts(used_before)],
        )?)
    }
}

fn put_totp(tx: &Transaction<'_>, user_id: i64, totp: &NewTotp) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE users SET totp_secret = ?2 WHERE id = ?1",
        params![user_id, totp.secret],
    )?;
    tx.execute("DELETE FROM recovery_codes WHERE user_id = ?1", [user_id])?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO recovery_codes (user_id, code_hash) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
    )?;
    for hash in &totp.recovery_hashes {
        insert.execute(params![user_id, hash])?;
    }
    Ok(())
}

fn ts(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn from_ts(t: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(t).ok()
}

fn meters_json(meters: &[MeterId]) -> String {
    let names: Vec<&str> = meters.iter().map(MeterId::as_str).collect();
    serde_json::to_string(&names).unwrap_or_else(|_| "[]".to_owned())
}

/// A user row as SQLite returns it, before validation.
struct RawUser {
    id: i64,
    username: String,
    role: String,
    meters: String,
    password_hash: String,
    disabled: bool,
    totp_secret: Option<Vec<u8>>,
    totp_last_step: Option<i64>,
    failures: i64,
    locked_until: Option<i64>,
    created_at: i64,
    changed_at: i64,
}

fn raw_user(r: &Row<'_>) -> rusqlite::Result<RawUser> {
    raw_user_at(r, 0)
}

fn raw_user_at(r: &Row<'_>, o: usize) -> rusqlite::Result<RawUser> {
    Ok(RawUser {
        id: r.get(o)?,
        username: r.get(o + 1)?,
        role: r.get(o + 2)?,
        meters: r.get(o + 3)?,
        password_hash: r.get(o + 4)?,
        disabled: r.get(o + 5)?,
        totp_secret: r.get(o + 6)?,
        totp_last_step: r.get(o + 7)?,
        failures: r.get(o + 8)?,
        locked_until: r.get(o + 9)?,
        created_at: r.get(o + 10)?,
        changed_at: r.get(o + 11)?,
    })
}

impl RawUser {
    fn parse(self) -> Result<UserRow, StoreError> {
        let user = self.username.clone();
        let bad = |reason: String| StoreError::BadRow {
            user: user.clone(),
            reason,
        };
        let names: Vec<String> =
            serde_json::from_str(&self.meters).map_err(|e| bad(format!("meters: {e}")))?;
        let meters = names
            .iter()
            .map(|m| MeterId::new(m).map_err(|e| bad(format!("meter {m:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UserRow {
            id: self.id,
            role: self
                .role
                .parse()
                .map_err(|e: crate::principal::UnknownRole| bad(e.to_string()))?,
            meters,
            password_hash: self.password_hash,
            disabled: self.disabled,
            totp_secret: self.totp_secret,
            totp_last_step: self
                .totp_last_step
                .map(|s| u64::try_from(s).map_err(|e| bad(format!("totp_last_step: {e}"))))
                .transpose()?,
            failures: u32::try_from(self.failures).map_err(|e| bad(format!("failures: {e}")))?,
            locked_until: self
                .locked_until
                .map(|t| from_ts(t).ok_or_else(|| bad("bad locked_until".into())))
                .transpose()?,
            created_at: from_ts(self.created_at).ok_or_else(|| bad("bad created_at".into()))?,
            changed_at: from_ts(self.changed_at).ok_or_else(|| bad("bad changed_at".into()))?,
            username: self.username,
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
        if has_objects {
            return Err(foreign());
        }
        tx.execute_batch(SCHEMA)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [SCHEMA_VERSION],
        )?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    } else if application_id != APPLICATION_ID {
        return Err(foreign());
    } else {
        let found: i64 =
            tx.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
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
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 08:00 UTC);

    #[test]
    fn creates_reopens_and_refuses_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.db");
        let store = AccessStore::open(&path).unwrap();
        store
            .insert_user("alice", Role::Admin, &[], "$argon2id$x", None, T0)
            .unwrap();
        assert!(matches!(
            store.insert_user("alice", Role::Admin, &[], "$argon2id$x", None, T0),
            Err(StoreError::UserExists(_))
        ));
        drop(store);
        let store = AccessStore::open(&path).unwrap();
        let alice = store.user("alice").unwrap().unwrap();
        assert_eq!(alice.role, Role::Admin);
        assert!(!format!("{alice:?}").contains("$argon2id$x"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            AccessStore::open(&other),
            Err(StoreError::Foreign { .. })
        ));
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.db");
        drop(AccessStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute("INSERT INTO schema_version (version) VALUES (99)", [])
            .unwrap();
        assert!(matches!(
            AccessStore::open(&path),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<AccessStore>();
    }
}
