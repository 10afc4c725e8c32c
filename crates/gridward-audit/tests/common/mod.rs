//! A real audit log on disk, and an attacker's direct SQL access to it.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use gridward_audit::{Actor, AuditKey, AuditLog, Entry, NewEntry, Outcome, VerifierKey};
use rusqlite::{Connection, params};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

pub const ORIGIN: &str = "gridward.test/audit";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub key: AuditKey,
    pub verifier: VerifierKey,
}

pub fn t(i: i64) -> OffsetDateTime {
    datetime!(2026-03-01 12:00:00.123456 UTC) + Duration::seconds(i)
}

/// The i-th entry of the fixture (varied actors, actions, sources and details).
pub fn nth(i: i64) -> NewEntry {
    let (actor, action, outcome) = match i % 5 {
        0 => (
            Actor::User("alice".into()),
            "login.success",
            Outcome::Success,
        ),
        1 => (
            Actor::User("mallory".into()),
            "login.failure",
            Outcome::Failure,
        ),
        2 => (
            Actor::Certificate("CN=ops-01,serial=0a1b".into()),
            "command.send",
            Outcome::Success,
        ),
        3 => (Actor::System, "config.reload", Outcome::Success),
        _ => (
            Actor::User("bob".into()),
            "user.role-change",
            Outcome::Denied,
        ),
    };
    let e = NewEntry::new(t(i), actor, action, format!("target-{i}"), outcome);
    match i % 3 {
        0 => e.source("192.0.2.10"),
        1 => e
            .source("2001:db8::7")
            .detail(format!("attempt {i}\nsecond line \u{e9}")),
        _ => e,
    }
}

/// A log of 20 entries with checkpoints after entries 10 and 20.
pub fn build() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let key = AuditKey::generate().unwrap();
    let verifier = key.verifier(ORIGIN).unwrap();
    {
        let log = AuditLog::open(&path).unwrap();
        for i in 1..=10 {
            log.append(&nth(i)).unwrap();
        }
        log.checkpoint(&key, ORIGIN, t(100)).unwrap().unwrap();
        log.append_all(&(11..=20).map(nth).collect::<Vec<_>>())
            .unwrap();
        log.checkpoint(&key, ORIGIN, t(200)).unwrap().unwrap();
    }
    Fixture {
        dir,
        path,
        key,
        verifier,
    }
}

impl Fixture {
    pub fn log(&self) -> AuditLog {
        AuditLog::open(&self.path).unwrap()
    }

    /// The attacker's connection: the append-only triggers dropped.
    pub fn attacker(&self) -> Connection {
        attacker(&self.path)
    }
}

pub fn attacker(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "DROP TRIGGER entries_no_update; DROP TRIGGER entries_no_delete;
         DROP TRIGGER checkpoints_no_update; DROP TRIGGER checkpoints_no_delete;",
    )
    .unwrap();
    conn
}

/// Reads row `seq` as an entry.
pub fn row(conn: &Connection, seq: i64) -> Entry {
    conn.query_row(
        "SELECT seq, time, actor, action, target, outcome, source, detail, prev, hash
         FROM entries WHERE seq = ?1",
        [seq],
        |r| {
            let time: String = r.get(1)?;
            let actor: String = r.get(2)?;
            let outcome: String = r.get(5)?;
            let prev: Vec<u8> = r.get(8)?;
            let hash: Vec<u8> = r.get(9)?;
            Ok(Entry {
                seq: r.get::<_, i64>(0)? as u64,
                time: gridward_audit::entry::parse_time(&time).unwrap(),
                actor: actor.parse().unwrap(),
                action: r.get(3)?,
                target: r.get(4)?,
                outcome: outcome.parse().unwrap(),
                source: r.get(6)?,
                detail: r.get(7)?,
                prev: prev.try_into().unwrap(),
                hash: hash.try_into().unwrap(),
            })
        },
    )
    .unwrap()
}

/// Writes `e` as row `e.seq` (inserting or replacing), as an attacker with SQL access would.
pub fn write_row(conn: &Connection, e: &Entry) {
    conn.execute(
        "INSERT OR REPLACE INTO entries
           (seq, time, actor, action, target, outcome, source, detail, prev, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            e.seq as i64,
            gridward_audit::entry::format_time(e.time).unwrap(),
            e.actor.to_string(),
            e.action,
            e.target,
            e.outcome.as_str(),
            e.source,
            e.detail,
            &e.prev[..],
            &e.hash[..],
        ],
    )
    .unwrap();
}

/// Shifts rows with `seq > after` by `by` (positive or negative), the way one renumbers
/// under a primary key: out of the way through negative numbers first.
pub fn renumber(conn: &Connection, after: i64, by: i64) {
    conn.execute("UPDATE entries SET seq = -seq WHERE seq > ?1", [after])
        .unwrap();
    conn.execute("UPDATE entries SET seq = -seq + ?1 WHERE seq < 0", [by])
        .unwrap();
}
