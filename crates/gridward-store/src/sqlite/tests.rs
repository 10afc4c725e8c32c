//! Tests of [`SqliteStore`] through the [`Store`] trait, in memory and on files.

use std::sync::Arc;
use std::time::Instant;

use gridward_core::MeterId;
use gridward_core::document::{EventKind, Format};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use super::*;
use crate::model::DEFAULT_QUERY_LIMIT;

const T0: OffsetDateTime = datetime!(2024-02-06 12:00:00 UTC);

/// The key file of a test database: beside it, created with it.
pub(super) fn key_for(db: &std::path::Path) -> KeySource {
    KeySource::file(db.with_extension("key"))
}

fn mid(s: &str) -> MeterId {
    MeterId::new(s).unwrap()
}

/// A reading from `meter` with `counter`, signed `counter` minutes after T0; the envelope
/// bytes are derived from all fields, so equal arguments give a byte-identical envelope.
fn reading(meter: &str, counter: u64, kwh: f64) -> Accepted {
    let taken_at = T0 + Duration::minutes((counter % 1_000_000) as i64);
    Accepted {
        meter_id: mid(meter),
        counter,
        taken_at,
        received_at: taken_at + Duration::milliseconds(250),
        body: AcceptedBody::Reading { energy_kwh: kwh },
        envelope: format!("COSE:{meter}:{counter}:{kwh}").into_bytes(),
        content_type: Format::Json,
        source: Some("192.0.2.7:50123".to_owned()),
    }
}

fn event(meter: &str, counter: u64, kind: EventKind) -> Accepted {
    let taken_at = T0 + Duration::minutes((counter % 1_000_000) as i64);
    Accepted {
        meter_id: mid(meter),
        counter,
        taken_at,
        received_at: taken_at,
        body: AcceptedBody::Event { kind },
        envelope: format!("COSE:{meter}:{counter}:{kind}").into_bytes(),
        content_type: Format::Xml,
        source: None,
    }
}

fn stored_id(o: &Outcome) -> i64 {
    match o {
        Outcome::Stored { id } => *id,
        other => panic!("expected Stored, got {other:?}"),
    }
}

fn readings_of(store: &dyn Store, meter: &str) -> Vec<(u64, f64)> {
    store
        .readings(&ReadingQuery::new(mid(meter)))
        .unwrap()
        .iter()
        .map(|r| (r.counter, r.energy_kwh))
        .collect()
}

fn sec_event(at: OffsetDateTime, reason: &str) -> SecurityEvent {
    SecurityEvent {
        at,
        meter_id: Some(mid("m-1")),
        source: Some("198.51.100.9:4444".to_owned()),
        reason: reason.to_owned(),
        detail: format!("{reason} detail"),
    }
}

/// Both kinds of store: in memory, and on a fresh file (kept alive by the returned directory).
fn stores() -> Vec<(Box<dyn Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let file = SqliteStore::open(
        &dir.path().join("gridward.db"),
        key_for(&dir.path().join("gridward.db")),
    )
    .unwrap();
    vec![
        (Box::new(SqliteStore::open_in_memory().unwrap()), None),
        (Box::new(file), Some(dir)),
    ]
}

#[test]
fn batch_with_mixed_outcomes() {
    for (store, _dir) in stores() {
        let first = store
            .commit(&[reading("m-1", 1, 10.0), reading("m-2", 1, 5.0)])
            .unwrap();
        assert!(matches!(
            first[..],
            [Outcome::Stored { .. }, Outcome::Stored { .. }]
        ));

        let mut forged = reading("m-1", 1, 11.0); // counter 1 again, other content
        forged.envelope.push(0);
        let out = store
            .commit(&[
                reading("m-1", 2, 12.5),                 // new
                reading("m-1", 1, 10.0),                 // byte-identical resend
                forged,                                  // used counter, different envelope
                reading("m-2", 2, 4.0),                  // register backwards
                reading("m-3", 7, 0.0),                  // new meter
                event("m-2", 2, EventKind::CoverOpened), // counter 2 still free for m-2
            ])
            .unwrap();
        assert!(matches!(out[0], Outcome::Stored { .. }));
        assert_eq!(out[1], Outcome::Duplicate);
        assert_eq!(out[2], Outcome::Replay { last: 2 });
        assert_eq!(out[3], Outcome::RegisterWentBackwards { last_kwh: 5.0 });
        assert!(matches!(out[4], Outcome::Stored { .. }));
        assert!(matches!(out[5], Outcome::Stored { .. }));

        assert_eq!(readings_of(&*store, "m-1"), vec![(1, 10.0), (2, 12.5)]);
        assert_eq!(readings_of(&*store, "m-2"), vec![(1, 5.0)]);
        assert_eq!(readings_of(&*store, "m-3"), vec![(7, 0.0)]);
        assert_eq!(
            store.counts().unwrap(),
            Counts {
                meters: 3,
                readings: 4,
                meter_events: 1,
                command_acks: 0,
                security_events: 0
            }
        );
        assert_eq!(
            store.last_counters().unwrap(),
            vec![(mid("m-1"), 2), (mid("m-2"), 2), (mid("m-3"), 7)]
        );
    }
}

#[test]
fn stored_ids_are_unique_across_readings_and_events() {
    let store = SqliteStore::open_in_memory().unwrap();
    let out = store
        .commit(&[
            reading("m-1", 1, 1.0),
            event("m-1", 2, EventKind::PowerFail),
            reading("m-1", 3, 1.0),
        ])
        .unwrap();
    let ids: Vec<i64> = out.iter().map(stored_id).collect();
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "{ids:?}");
}

#[test]
fn duplicate_versus_replay() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .commit(&[
            reading("m-1", 1, 1.0),
            reading("m-1", 2, 2.0),
            event("m-1", 5, EventKind::MagneticField),
            reading("m-1", 6, 3.0),
        ])
        .unwrap();
    let last = 6;
    // Resends of any stored message, reading or event, old or newest: duplicates.
    for item in [
        reading("m-1", 6, 3.0),
        reading("m-1", 1, 1.0),
        event("m-1", 5, EventKind::MagneticField),
    ] {
        assert_eq!(store.commit(&[item]).unwrap(), vec![Outcome::Duplicate]);
    }
    // A used counter with another envelope, or a counter never stored (3, 4: gaps; 0): replays.
    let mut changed = reading("m-1", 2, 2.0);
    changed.envelope[0] ^= 1;
    for item in [
        changed,
        reading("m-1", 3, 2.5),
        reading("m-1", 4, 2.5),
        reading("m-1", 0, 0.0),
        // Same counter as a stored event but a reading: another envelope.
        reading("m-1", 5, 2.5),
    ] {
        assert_eq!(
            store.commit(&[item]).unwrap(),
            vec![Outcome::Replay { last }]
        );
    }
    // The same envelope received at another time from another source is still a duplicate:
    // only the envelope's bytes count.
    let mut again = reading("m-1", 2, 2.0);
    again.received_at += Duration::hours(1);
    again.source = None;
    assert_eq!(store.commit(&[again]).unwrap(), vec![Outcome::Duplicate]);
    // Nothing of the above was stored.
    assert_eq!(store.counts().unwrap().readings, 3);
    assert_eq!(store.counts().unwrap().meter_events, 1);
    assert_eq!(store.last_counters().unwrap(), vec![(mid("m-1"), 6)]);
}

#[test]
fn items_of_one_meter_in_one_batch_see_each_other() {
    let store = SqliteStore::open_in_memory().unwrap();
    let mut replay = reading("m-1", 2, 9.0);
    replay.envelope.extend_from_slice(b"-other");
    let out = store
        .commit(&[
            reading("m-1", 1, 1.0),
            reading("m-1", 2, 2.0),
            reading("m-1", 2, 2.0), // resent before the first copy was acknowledged
            replay,
            reading("m-1", 3, 1.5), // lower than item 2's register, stored in this batch
            reading("m-1", 3, 2.5),
            reading("m-1", 1, 1.0),
        ])
        .unwrap();
    assert!(matches!(out[0], Outcome::Stored { .. }));
    assert!(matches!(out[1], Outcome::Stored { .. }));
    assert_eq!(out[2], Outcome::Duplicate);
    assert_eq!(out[3], Outcome::Replay { last: 2 });
    assert_eq!(out[4], Outcome::RegisterWentBackwards { last_kwh: 2.0 });
    assert!(matches!(out[5], Outcome::Stored { .. }));
    assert_eq!(out[6], Outcome::Duplicate);
    assert_eq!(
        readings_of(&store, "m-1"),
        vec![(1, 1.0), (2, 2.0), (3, 2.5)]
    );
}

#[test]
fn register_going_backwards_is_not_stored_and_keeps_the_counter_free() {
    let store = SqliteStore::open_in_memory().unwrap();
    store.commit(&[reading("m-1", 1, 100.0)]).unwrap();
    assert_eq!(
        store.commit(&[reading("m-1", 2, 99.9)]).unwrap(),
        vec![Outcome::RegisterWentBackwards { last_kwh: 100.0 }]
    );
    assert_eq!(store.last_counters().unwrap(), vec![(mid("m-1"), 1)]);
    // An event does not change the register; an equal register (no consumption) is fine.
    let out = store
        .commit(&[
            event("m-1", 2, EventKind::ReverseEnergy),
            reading("m-1", 3, 100.0),
        ])
        .unwrap();
    assert!(out.iter().all(|o| matches!(o, Outcome::Stored { .. })));
    assert_eq!(readings_of(&store, "m-1"), vec![(1, 100.0), (3, 100.0)]);
    let meter = &store.meters().unwrap()[0];
    assert_eq!((meter.last_counter, meter.last_kwh), (Some(3), Some(100.0)));
}

#[test]
fn a_resend_older_than_the_search_depth_is_a_replay() {
    let store = SqliteStore::open_in_memory().unwrap();
    let n = DUPLICATE_SEARCH_DEPTH as u64 + 2;
    let batch: Vec<Accepted> = (1..=n).map(|c| reading("m-1", c, c as f64)).collect();
    store.commit(&batch).unwrap();
    // Counter n - DEPTH + 1 is the oldest within reach (the chain walk starts at n).
    let oldest_in_reach = n - DUPLICATE_SEARCH_DEPTH as u64 + 1;
    let c = oldest_in_reach;
    assert_eq!(
        store.commit(&[reading("m-1", c, c as f64)]).unwrap(),
        vec![Outcome::Duplicate]
    );
    let c = oldest_in_reach - 1;
    assert_eq!(
        store.commit(&[reading("m-1", c, c as f64)]).unwrap(),
        vec![Outcome::Replay { last: n }]
    );
}

#[test]
fn counters_use_the_whole_u64_range() {
    let store = SqliteStore::open_in_memory().unwrap();
    let big = u64::MAX - 1; // stored as a negative SQLite integer
    store
        .commit(&[
            reading("m-1", i64::MAX as u64, 1.0),
            reading("m-1", big, 2.0),
        ])
        .unwrap();
    assert_eq!(store.last_counters().unwrap(), vec![(mid("m-1"), big)]);
    assert_eq!(
        store.commit(&[reading("m-1", big, 2.0)]).unwrap(),
        vec![Outcome::Duplicate]
    );
    assert_eq!(
        store
            .commit(&[reading("m-1", i64::MAX as u64, 1.0)])
            .unwrap(),
        vec![Outcome::Duplicate]
    );
    assert_eq!(
        store.commit(&[reading("m-1", 5, 3.0)]).unwrap(),
        vec![Outcome::Replay { last: big }]
    );
    assert!(matches!(
        store.commit(&[reading("m-1", u64::MAX, 3.0)]).unwrap()[..],
        [Outcome::Stored { .. }]
    ));
    assert_eq!(readings_of(&store, "m-1").last(), Some(&(u64::MAX, 3.0)));
}

#[test]
fn unstorable_items_refuse_the_whole_batch() {
    let store = SqliteStore::open_in_memory().unwrap();
    for (bad, index) in [(f64::NAN, 1), (f64::INFINITY, 1), (-0.5, 1)] {
        let err = store
            .commit(&[reading("m-1", 1, 1.0), reading("m-2", 1, bad)])
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidItem { index: i, .. } if i == index),
            "{err:?}"
        );
    }
    assert_eq!(store.counts().unwrap(), Counts::default());
}

#[test]
fn a_batch_failing_midway_leaves_nothing_behind() {
    let store = SqliteStore::open_in_memory().unwrap();
    store.commit(&[reading("m-1", 1, 1.0)]).unwrap();
    // Inject a failure on the third item's insert, after two items were written.
    store
        .writer()
        .execute_batch(
            "CREATE TRIGGER fail BEFORE INSERT ON messages WHEN NEW.counter = 666
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        )
        .unwrap();
    let batch = [
        reading("m-1", 2, 2.0),
        reading("m-new", 1, 1.0),
        reading("m-2", 666, 3.0),
        reading("m-1", 3, 4.0),
    ];
    let err = store.commit(&batch).unwrap_err();
    assert!(
        matches!(&err, StoreError::Sqlite(e) if e.to_string().contains("injected failure")),
        "{err:?}"
    );
    assert_eq!(store.counts().unwrap().readings, 1);
    assert_eq!(
        store.counts().unwrap().meters,
        1,
        "meter rows rolled back too"
    );
    assert_eq!(store.last_counters().unwrap(), vec![(mid("m-1"), 1)]);
    // The same batch without the failing item is then stored as if nothing had happened.
    let out = store
        .commit(&[batch[0].clone(), batch[1].clone(), batch[3].clone()])
        .unwrap();
    assert!(out.iter().all(|o| matches!(o, Outcome::Stored { .. })));
    assert_eq!(
        readings_of(&store, "m-1"),
        vec![(1, 1.0), (2, 2.0), (3, 4.0)]
    );
}

#[test]
fn file_database_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gridward.db");
    let ids;
    {
        let store = SqliteStore::open(&path, key_for(&path)).unwrap();
        let out = store
            .commit(&[
                reading("m-1", 1, 1.0),
                reading("m-2", 41, 7.25),
                event("m-2", 42, EventKind::CoverOpened),
            ])
            .unwrap();
        assert_eq!(out.len(), 3);
        ids = store
            .record_security_events(&[sec_event(T0, "replay")])
            .unwrap();
        store.set_connected(&mid("m-2"), true, T0).unwrap();
    }
    let store = SqliteStore::open(&path, key_for(&path)).unwrap();
    assert_eq!(
        store.last_counters().unwrap(),
        vec![(mid("m-1"), 1), (mid("m-2"), 42)]
    );
    assert_eq!(readings_of(&store, "m-2"), vec![(41, 7.25)]);
    assert_eq!(
        store
            .meter_events(&MeterEventQuery::default())
            .unwrap()
            .len(),
        1
    );
    let sec = store
        .security_events(&SecurityEventQuery::default())
        .unwrap();
    assert_eq!(sec.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    // Decisions after reopen use the stored state.
    assert_eq!(
        store
            .commit(&[reading("m-2", 41, 7.25), reading("m-1", 1, 5.0)])
            .unwrap(),
        vec![Outcome::Duplicate, Outcome::Replay { last: 1 }]
    );
    assert_eq!(
        store.commit(&[reading("m-2", 43, 7.0)]).unwrap(),
        vec![Outcome::RegisterWentBackwards { last_kwh: 7.25 }]
    );
    // A second store on the same file (e.g. the CLI while the service runs) sees it all.
    let other = SqliteStore::open_existing(&path, key_for(&path)).unwrap();
    assert_eq!(other.counts().unwrap(), store.counts().unwrap());
}

#[test]
fn committed_data_is_visible_to_the_reader_connection_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db"), key_for(&dir.path().join("db"))).unwrap();
    assert!(store.reader.is_some());
    for c in 1..=3 {
        store.commit(&[reading("m-1", c, c as f64)]).unwrap();
        assert_eq!(readings_of(&store, "m-1").len() as u64, c);
    }
}

#[test]
fn open_existing_does_not_create_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.db");
    let err = SqliteStore::open_existing(&path, key_for(&path)).unwrap_err();
    assert!(
        matches!(&err, StoreError::Sqlite(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::CannotOpen)),
        "{err:?}"
    );
    assert!(!path.exists());
}

#[test]
fn a_new_database_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = SqliteStore::open(&path, key_for(&path)).unwrap();
    store.commit(&[reading("m-1", 1, 1.0)]).unwrap();
    #[cfg(unix)]
    for name in ["db", "db-wal", "db-shm"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name}: {mode:o}");
    }
}

#[test]
fn a_database_that_cannot_be_created_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("db");
    let err = SqliteStore::open(&path, key_for(&path)).unwrap_err();
    assert!(
        matches!(&err, StoreError::CreateFile { path: p, source }
            if *p == path && source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
}

#[test]
fn the_database_is_in_wal_mode_with_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db"), key_for(&dir.path().join("db"))).unwrap();
    let pragma = |name: &str| -> String {
        store
            .writer()
            .query_row(&format!("PRAGMA {name}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| format!("{v:?}"))
            .unwrap()
    };
    assert_eq!(pragma("journal_mode"), r#"Text("wal")"#);
    assert_eq!(pragma("synchronous"), "Integer(2)"); // FULL
    // set_connected commits with NORMAL; the next durable write restores FULL before it begins.
    store.set_connected(&mid("m-1"), true, T0).unwrap();
    assert_eq!(pragma("synchronous"), "Integer(1)");
    store.commit(&[reading("m-1", 1, 1.0)]).unwrap();
    assert_eq!(pragma("synchronous"), "Integer(2)");
    store.set_connected(&mid("m-1"), false, T0).unwrap();
    store.record_security_events(&[sec_event(T0, "x")]).unwrap();
    assert_eq!(pragma("synchronous"), "Integer(2)");
    store.set_connected(&mid("m-1"), true, T0).unwrap();
    store.disconnect_all(T0).unwrap();
    assert_eq!(pragma("synchronous"), "Integer(2)");
}

#[test]
fn opening_a_database_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(SqliteStore::open(&path, key_for(&path)).unwrap());
    {
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let err = SqliteStore::open(&path, key_for(&path)).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, supported }
            if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
        "{err:?}"
    );
}

#[test]
fn a_foreign_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    // Tables but no application id.
    let path = dir.path().join("other.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
    }
    let err = SqliteStore::open(&path, key_for(&path)).unwrap_err();
    assert!(
        matches!(err, StoreError::ForeignDatabase { application_id: 0 }),
        "{err:?}"
    );
    // Another application's id, even on an empty database.
    let path = dir.path().join("other2.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "application_id", 0x1234).unwrap();
    }
    let err = SqliteStore::open(&path, key_for(&path)).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::ForeignDatabase {
                application_id: 0x1234
            }
        ),
        "{err:?}"
    );
    let conn = Connection::open(&path).unwrap();
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tables, 0);
}

#[test]
fn migrations_apply_in_order_and_only_once() {
    let mut conn = Connection::open_in_memory().unwrap();
    let steps = [
        "CREATE TABLE a (x INTEGER);",
        "INSERT INTO a VALUES (1);",
        "INSERT INTO a VALUES (2);",
    ];
    assert_eq!(schema::migrate(&mut conn, &steps[..1]).unwrap(), 1);
    assert_eq!(schema::migrate(&mut conn, &steps).unwrap(), 3);
    assert_eq!(schema::migrate(&mut conn, &steps).unwrap(), 3);
    let rows: Vec<i64> = conn
        .prepare("SELECT x FROM a")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, vec![1, 2]);
    // A failing step leaves the version where it was.
    let broken = [
        steps[0],
        steps[1],
        steps[2],
        "INSERT INTO missing VALUES (1);",
    ];
    assert!(matches!(
        schema::migrate(&mut conn, &broken),
        Err(StoreError::Sqlite(_))
    ));
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 3);
    assert!(matches!(
        schema::migrate(&mut conn, &steps[..2]),
        Err(StoreError::SchemaTooNew {
            found: 3,
            supported: 2
        })
    ));
}

#[test]
fn security_events_round_trip_with_ids() {
    for (store, _dir) in stores() {
        assert_eq!(
            store.record_security_events(&[]).unwrap(),
            Vec::<i64>::new()
        );
        let events = vec![
            sec_event(T0, "replay"),
            SecurityEvent {
                at: T0 + Duration::seconds(1) + Duration::microseconds(5),
                meter_id: None,
                source: None,
                reason: "tls_handshake".to_owned(),
                detail: "no client certificate".to_owned(),
            },
            sec_event(T0 + Duration::seconds(2), "bad_signature"),
        ];
        let ids = store.record_security_events(&events).unwrap();
        assert_eq!(ids.len(), 3);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let more = store
            .record_security_events(&[sec_event(T0 + Duration::seconds(3), "stale")])
            .unwrap();
        assert!(more[0] > ids[2]);

        let all = store
            .security_events(&SecurityEventQuery::default())
            .unwrap();
        assert_eq!(all.len(), 4);
        for (stored, (id, event)) in all.iter().zip(ids.iter().zip(&events)) {
            assert_eq!((stored.id, &stored.event), (*id, event));
        }
        let since = store
            .security_events(&SecurityEventQuery {
                since: Some(T0 + Duration::seconds(2)),
                limit: 10,
                ..SecurityEventQuery::default()
            })
            .unwrap();
        let reasons: Vec<&str> = since.iter().map(|e| e.event.reason.as_str()).collect();
        assert_eq!(reasons, ["bad_signature", "stale"]);
        // The newest `limit`, oldest first.
        let newest = store
            .security_events(&SecurityEventQuery {
                limit: 2,
                ..SecurityEventQuery::default()
            })
            .unwrap();
        let reasons: Vec<&str> = newest.iter().map(|e| e.event.reason.as_str()).collect();
        assert_eq!(reasons, ["bad_signature", "stale"]);
        assert_eq!(store.counts().unwrap().security_events, 4);

        // Filters and the paging cursor (the smallest id of a page gives the page before).
        let q = |f: &dyn Fn(&mut SecurityEventQuery)| {
            let mut q = SecurityEventQuery::default();
            f(&mut q);
            let found = store.security_events(&q).unwrap();
            found
                .into_iter()
                .map(|e| e.event.reason)
                .collect::<Vec<_>>()
        };
        assert_eq!(q(&|q| q.reason = Some("stale".into())), ["stale"]);
        assert_eq!(
            q(&|q| q.until = Some(T0 + Duration::seconds(1) + Duration::microseconds(5))).len(),
            2
        );
        assert_eq!(
            q(&|q| q.before = Some(newest[0].id)),
            ["replay", "tls_handshake"]
        );
        assert_eq!(q(&|q| q.meter = Some(mid("m-x"))), Vec::<String>::new());
        assert!(q(&|q| q.source = Some("nowhere".into())).is_empty());
        assert_eq!(
            q(&|q| q.meter = Some(mid("m-1"))),
            ["replay", "bad_signature", "stale"]
        );
        assert_eq!(q(&|q| q.source = Some("198.51.100.9".into())).len(), 3);
        assert_eq!(q(&|q| q.source = Some("198.51.100.9:4444".into())).len(), 3);
        assert!(q(&|q| q.source = Some("198.51.100.90".into())).is_empty());
    }
}

#[test]
fn meters_listing_with_connection_state() {
    for (store, _dir) in stores() {
        let t1 = T0 + Duration::minutes(10);
        store.set_connected(&mid("m-b"), true, T0).unwrap(); // registers a new meter
        store.commit(&[reading("m-a", 3, 2.5)]).unwrap();
        store.set_connected(&mid("m-a"), true, T0).unwrap();
        store.set_connected(&mid("m-a"), false, t1).unwrap();
        let meters = store.meters().unwrap();
        assert_eq!(
            meters,
            vec![
                MeterRow {
                    meter_id: mid("m-a"),
                    last_counter: Some(3),
                    last_kwh: Some(2.5),
                    last_seen: Some(reading("m-a", 3, 2.5).received_at),
                    connected: false,
                    connection_changed_at: Some(t1),
                },
                MeterRow {
                    meter_id: mid("m-b"),
                    last_counter: None,
                    last_kwh: None,
                    last_seen: None,
                    connected: true,
                    connection_changed_at: Some(T0),
                },
            ]
        );
        // A meter known only by its connection has no counter yet.
        assert_eq!(store.last_counters().unwrap(), vec![(mid("m-a"), 3)]);
        // Its first message is accepted whatever its counter.
        assert!(matches!(
            store.commit(&[reading("m-b", 0, 0.0)]).unwrap()[..],
            [Outcome::Stored { .. }]
        ));
        // At start-up every session is gone.
        assert_eq!(store.disconnect_all(t1).unwrap(), 1);
        assert!(store.meters().unwrap().iter().all(|m| !m.connected));
        assert_eq!(store.disconnect_all(t1).unwrap(), 0);
    }
}

#[test]
fn readings_query_by_since_and_limit() {
    for (store, _dir) in stores() {
        // Readings every minute, with an event and another meter's readings interleaved.
        let mut batch = Vec::new();
        for c in 1..=10 {
            if c == 5 {
                batch.push(event("m-1", c, EventKind::PowerFail));
            } else {
                batch.push(reading("m-1", c, c as f64));
            }
            batch.push(reading("m-2", c, 100.0 + c as f64));
        }
        store.commit(&batch).unwrap();

        let q = ReadingQuery::new(mid("m-1"));
        assert_eq!(q.limit, DEFAULT_QUERY_LIMIT);
        let counters = |q: ReadingQuery| -> Vec<u64> {
            store
                .readings(&q)
                .unwrap()
                .iter()
                .map(|r| r.counter)
                .collect()
        };
        assert_eq!(counters(q.clone()), [1, 2, 3, 4, 6, 7, 8, 9, 10]);
        // since is inclusive, on the reading's (signed) time.
        let t7 = T0 + Duration::minutes(7);
        assert_eq!(counters(q.clone().since(t7)), [7, 8, 9, 10]);
        assert_eq!(
            counters(q.clone().since(t7 + Duration::seconds(1))),
            [8, 9, 10]
        );
        assert_eq!(counters(q.clone().limit(3)), [8, 9, 10]);
        assert_eq!(
            counters(q.clone().since(T0 + Duration::minutes(3)).limit(4)),
            [7, 8, 9, 10]
        );
        assert_eq!(counters(q.clone().limit(0)), Vec::<u64>::new());
        assert_eq!(
            counters(q.clone().since(T0 + Duration::days(1))),
            Vec::<u64>::new()
        );
        assert_eq!(
            counters(ReadingQuery::new(mid("unknown"))),
            Vec::<u64>::new()
        );
        // until is inclusive; paging back with the smallest id of a page as the cursor.
        assert_eq!(counters(q.clone().until(t7)), [1, 2, 3, 4, 6, 7]);
        let page1 = store.readings(&q.clone().limit(4)).unwrap();
        assert_eq!(
            page1.iter().map(|r| r.counter).collect::<Vec<_>>(),
            [7, 8, 9, 10]
        );
        let page2 = q.clone().limit(4).before(page1[0].id);
        assert_eq!(counters(page2.clone()), [2, 3, 4, 6]);
        let oldest = store.readings(&page2).unwrap()[0].id;
        assert_eq!(counters(q.clone().limit(4).before(oldest)), [1]);
        // A cursor that is another meter's message gives nothing, not that meter's readings.
        let other = store
            .readings(&ReadingQuery::new(mid("m-2")).limit(1))
            .unwrap()[0]
            .id;
        assert_eq!(counters(q.clone().before(other)), Vec::<u64>::new());

        let r = &store.readings(&q.clone().limit(1)).unwrap()[0];
        let expected = reading("m-1", 10, 10.0);
        assert_eq!(r.meter_id, mid("m-1"));
        assert_eq!(
            (r.taken_at, r.received_at),
            (expected.taken_at, expected.received_at)
        );
        assert_eq!(r.content_type, Format::Json);
        assert_eq!(r.source.as_deref(), Some("192.0.2.7:50123"));
        assert_eq!(r.envelope_sha256, expected.envelope_sha256());
        assert_eq!(r.envelope_sha256_hex().len(), 64);
        let doc = gridward_core::document::Reading {
            meter_id: mid("m-1"),
            timestamp: datetime!(2024-02-06 12:10:00 UTC),
            energy_kwh: 10.0,
        };
        assert_eq!(r.to_reading(), doc);
        assert_eq!(r.to_json(), doc.to_json());
        assert!(r.to_json().starts_with(
            r#"{"MeterID":"m-1","Timestamp":"2024-02-06T12:10:00Z","EnergyConsumed":10"#
        ));
        assert!(
            r.to_xml()
                .starts_with("<EnergyUsageReport><MeterID>m-1</MeterID>")
        );
        assert_eq!(store.envelope(r.id).unwrap(), Some(expected.envelope));
        assert_eq!(store.envelope(i64::MAX).unwrap(), None);
        // Issue 17: `gridward readings --format json` omitted the counter.
        assert_eq!(
            r.to_forwarded().to_json(),
            r#"{"ReadingID":"m-1-10","MeterID":"m-1","Counter":10,"Timestamp":"2024-02-06T12:10:00Z","EnergyConsumed":10.0}"#
        );
    }
}

#[test]
fn readings_since_tolerates_timestamps_slightly_out_of_order() {
    let store = SqliteStore::open_in_memory().unwrap();
    // Counter 3 is signed before counter 2 (the meter's clock was corrected by a minute).
    let mut r3 = reading("m-1", 3, 3.0);
    r3.taken_at = T0 + Duration::seconds(90);
    store
        .commit(&[reading("m-1", 1, 1.0), reading("m-1", 2, 2.0), r3])
        .unwrap();
    let got: Vec<u64> = store
        .readings(&ReadingQuery::new(mid("m-1")).since(T0 + Duration::minutes(2)))
        .unwrap()
        .iter()
        .map(|r| r.counter)
        .collect();
    assert_eq!(got, [2]);
}

#[test]
fn received_times_keep_microseconds() {
    let store = SqliteStore::open_in_memory().unwrap();
    let mut r = reading("m-1", 1, 1.0);
    r.received_at = T0 + Duration::nanoseconds(123_456_789);
    store.commit(&[r]).unwrap();
    let got = store.readings(&ReadingQuery::new(mid("m-1"))).unwrap();
    assert_eq!(got[0].received_at, T0 + Duration::microseconds(123_456));
}

#[test]
fn meter_events_query() {
    for (store, _dir) in stores() {
        store
            .commit(&[
                event("m-1", 1, EventKind::CoverOpened),
                reading("m-1", 2, 1.0),
                event("m-2", 3, EventKind::PowerFail),
                event("m-2", 4, EventKind::PowerRestore),
            ])
            .unwrap();
        let kinds = |q: MeterEventQuery| -> Vec<(String, EventKind)> {
            store
                .meter_events(&q)
                .unwrap()
                .into_iter()
                .map(|e| (e.meter_id.to_string(), e.kind))
                .collect()
        };
        assert_eq!(
            kinds(MeterEventQuery::default()),
            [
                ("m-1".to_owned(), EventKind::CoverOpened),
                ("m-2".to_owned(), EventKind::PowerFail),
                ("m-2".to_owned(), EventKind::PowerRestore)
            ]
        );
        let m2 = MeterEventQuery {
            meter: Some(mid("m-2")),
            ..MeterEventQuery::default()
        };
        assert_eq!(kinds(m2.clone()).len(), 2);
        assert_eq!(
            kinds(MeterEventQuery { limit: 1, ..m2 }),
            [("m-2".to_owned(), EventKind::PowerRestore)]
        );
        assert_eq!(
            kinds(MeterEventQuery {
                since: Some(T0 + Duration::minutes(2)),
                ..MeterEventQuery::default()
            })
            .len(),
            2
        );
        let e = &store.meter_events(&MeterEventQuery::default()).unwrap()[0];
        assert_eq!(
            (e.counter, e.content_type, e.source.clone()),
            (1, Format::Xml, None)
        );
        assert_eq!(
            e.to_json(),
            r#"{"MeterID":"m-1","Timestamp":"2024-02-06T12:01:00Z","EventType":"CoverOpened"}"#
        );
    }
}

#[test]
fn hot_paths_use_no_secondary_index_and_queries_no_table_scan() {
    let store = SqliteStore::open_in_memory().unwrap();
    let conn = store.writer();
    let indexes: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'messages'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(indexes, ["messages_events"]); // partial: WHERE kind = 1
    let plan = |sql: &str| -> String {
        conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .join("; ")
    };
    let events = plan(
        "SELECT m.id FROM messages AS m INDEXED BY messages_events JOIN meters AS mt ON mt.id = m.meter
         WHERE m.kind = 1 AND m.taken_at >= 0 AND (NULL IS NULL OR mt.meter_id = NULL)
         ORDER BY m.taken_at DESC, m.id DESC LIMIT 5",
    );
    assert!(events.contains("USING INDEX messages_events"), "{events}");
    let sec =
        plan("SELECT id FROM security_events WHERE at >= 0 ORDER BY at DESC, id DESC LIMIT 5");
    assert!(sec.contains("INDEX security_events_at"), "{sec}");
}

#[test]
fn corrupt_rows_are_typed_errors() {
    let store = SqliteStore::open_in_memory().unwrap();
    store.commit(&[reading("m-1", 1, 1.0)]).unwrap();
    store
        .writer()
        .execute("UPDATE meters SET meter_id = 'bad/id'", [])
        .unwrap();
    let err = store.meters().unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { table: "meters", detail } if detail.contains("bad/id")),
        "{err:?}"
    );
    let store = SqliteStore::open_in_memory().unwrap();
    store.commit(&[reading("m-1", 1, 1.0)]).unwrap();
    store
        .writer()
        .execute("UPDATE messages SET content_type = 'text/plain'", [])
        .unwrap();
    let err = store.readings(&ReadingQuery::new(mid("m-1"))).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Corrupt {
                table: "messages",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn concurrent_writers_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("db"), key_for(&dir.path().join("db"))).unwrap(),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let meter = format!("m-{t}");
                for c in 1..=20u64 {
                    let out = store.commit(&[reading(&meter, c, c as f64)]).unwrap();
                    assert!(matches!(out[..], [Outcome::Stored { .. }]));
                    assert_eq!(readings_of(&*store, &meter).len() as u64, c);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.counts().unwrap().readings, 80);
}

/// Throughput of the embedded store, not asserted: batches of 1,000 readings across 10,000
/// meters with increasing counters, on a file with `synchronous = FULL`.
/// `CARGO_PROFILE_DEV_OPT_LEVEL=2 cargo test -p gridward-store -- --ignored --nocapture --test-threads 1 throughput`
#[test]
#[ignore = "timing; run by hand"]
fn throughput() {
    throughput_of("schema as shipped", None);
}

/// The same with the secondary index this schema avoids, for comparison.
#[test]
#[ignore = "timing; run by hand"]
fn throughput_with_a_meter_counter_index() {
    throughput_of(
        "with INDEX ON messages (meter, counter)",
        Some("CREATE INDEX messages_meter_counter ON messages (meter, counter)"),
    );
}

fn throughput_of(name: &str, extra_sql: Option<&str>) {
    println!("--- {name}");
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        &dir.path().join("bench.db"),
        key_for(&dir.path().join("bench.db")),
    )
    .unwrap();
    if let Some(sql) = extra_sql {
        store.writer().execute_batch(sql).unwrap();
    }
    let meters: Vec<String> = (0..10_000).map(|i| format!("meter-{i:06}")).collect();
    let mut counters = vec![0u64; meters.len()];
    let envelope = vec![0xA5u8; 300]; // a signed COSE reading is about 250–400 bytes
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let batches = 500;
    let start = Instant::now();
    let mut lap = start;
    let mut in_commit = std::time::Duration::ZERO;
    for b in 0..batches {
        let batch: Vec<Accepted> = (0..1000)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let m = (rng % meters.len() as u64) as usize;
                counters[m] += 1;
                let mut a = reading(&meters[m], counters[m], counters[m] as f64);
                a.envelope.clone_from(&envelope);
                a.envelope.extend_from_slice(&rng.to_le_bytes());
                a
            })
            .collect();
        let t = Instant::now();
        let out = store.commit(&batch).unwrap();
        in_commit += t.elapsed();
        assert!(out.iter().all(|o| matches!(o, Outcome::Stored { .. })));
        if (b + 1) % 100 == 0 {
            let now = Instant::now();
            println!(
                "rows {:>6}..{:>6}: {:>7.0} rows/s",
                (b + 1 - 100) * 1000,
                (b + 1) * 1000,
                100_000.0 / (now - lap).as_secs_f64()
            );
            lap = now;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "total: {} rows in {secs:.2} s = {:.0} rows/s",
        batches * 1000,
        f64::from(batches * 1000) / secs
    );
    println!(
        "inside commit: {:.2} s = {:.0} rows/s",
        in_commit.as_secs_f64(),
        f64::from(batches * 1000) / in_commit.as_secs_f64()
    );
    // The rare paths: a resend of the newest message, and a replayed old counter (walks the
    // whole search depth, or the meter's whole chain if shorter).
    let m = 0;
    let c = counters[m];
    let t = Instant::now();
    let mut resend = reading(&meters[m], c, c as f64);
    resend.envelope = store
        .envelope(
            store
                .readings(&ReadingQuery::new(mid(&meters[m])).limit(1))
                .unwrap()[0]
                .id,
        )
        .unwrap()
        .unwrap();
    assert_eq!(store.commit(&[resend]).unwrap(), vec![Outcome::Duplicate]);
    println!("duplicate (newest) incl. lookups: {:?}", t.elapsed());
    let t = Instant::now();
    let out = store.commit(&[reading(&meters[m], 1, 0.0)]).unwrap();
    assert_eq!(out, vec![Outcome::Replay { last: c }]);
    println!("replay of counter 1 (chain of {c}): {:?}", t.elapsed());
    let t = Instant::now();
    let n = store
        .readings(&ReadingQuery::new(mid(&meters[m])))
        .unwrap()
        .len();
    println!("readings of one meter ({n} rows): {:?}", t.elapsed());
    let deep = "meter-deep";
    for b in 0..5 {
        let batch: Vec<Accepted> = (1..=1000)
            .map(|i| reading(deep, b * 1000 + i, 1.0))
            .collect();
        store.commit(&batch).unwrap();
    }
    let t = Instant::now();
    let out = store.commit(&[reading(deep, 1, 0.0)]).unwrap();
    assert_eq!(out, vec![Outcome::Replay { last: 5000 }]);
    println!(
        "replay of counter 1 (chain of 5000, walks {DUPLICATE_SEARCH_DEPTH}): {:?}",
        t.elapsed()
    );
    let size = std::fs::metadata(dir.path().join("bench.db"))
        .unwrap()
        .len()
        + std::fs::metadata(dir.path().join("bench.db-wal")).map_or(0, |m| m.len());
    println!("database + WAL: {:.1} MB", size as f64 / 1e6);
}

mod outbox {
    //! The outbox: rows written with the reading, read in commit order, settled.

    use super::*;
    use crate::outbox::{Settlement, TargetId};

    fn pending_ids(store: &dyn Store, target: TargetId) -> Vec<(String, u64)> {
        store
            .outbox_pending(target, 1000)
            .unwrap()
            .iter()
            .map(|i| (i.meter_id.to_string(), i.counter))
            .collect()
    }

    fn stats_of(store: &dyn Store, name: &str) -> (u64, u64, u64) {
        let s = store.outbox_stats().unwrap();
        let s = s.iter().find(|s| s.target == name).unwrap();
        (s.pending, s.delivered, s.dead)
    }

    #[test]
    fn rows_are_written_with_stored_readings_only() {
        for (store, _dir) in stores() {
            let billing = store.register_outbox_target("billing").unwrap();
            let mdm = store.register_outbox_target("mdm").unwrap();
            assert_eq!(store.register_outbox_target("billing").unwrap(), billing);
            assert_ne!(billing, mdm);
            let targets = [billing, mdm];

            store
                .commit_with_outbox(&[reading("m-1", 1, 1.0)], &targets)
                .unwrap();
            let mut forged = reading("m-1", 1, 1.5);
            forged.envelope.push(1);
            let out = store
                .commit_with_outbox(
                    &[
                        reading("m-2", 1, 3.0),
                        reading("m-1", 1, 1.0),                  // duplicate
                        forged,                                  // replay
                        reading("m-2", 2, 2.0),                  // register backwards
                        event("m-1", 2, EventKind::CoverOpened), // events are not forwarded
                        reading("m-1", 3, 1.25),
                    ],
                    &targets,
                )
                .unwrap();
            assert!(matches!(out[0], Outcome::Stored { .. }));
            assert_eq!(out[1], Outcome::Duplicate);
            assert!(matches!(out[2], Outcome::Replay { .. }));
            assert!(matches!(out[3], Outcome::RegisterWentBackwards { .. }));
            assert!(matches!(out[4], Outcome::Stored { .. }));
            assert!(matches!(out[5], Outcome::Stored { .. }));

            let expected = vec![
                ("m-1".to_owned(), 1),
                ("m-2".to_owned(), 1),
                ("m-1".to_owned(), 3),
            ];
            assert_eq!(pending_ids(store.as_ref(), billing), expected);
            assert_eq!(pending_ids(store.as_ref(), mdm), expected);

            let items = store.outbox_pending(billing, 10).unwrap();
            assert_eq!(items[2].energy_kwh, 1.25);
            assert_eq!(items[2].reading_id(), "m-1-3");
            assert_eq!(items[2].taken_at, reading("m-1", 3, 1.25).taken_at);
            assert_eq!(items[2].queued_at, reading("m-1", 3, 1.25).received_at);
            assert_eq!(items[2].message_id, stored_id(&out[5]));
            assert_eq!(items[0].attempts, 0);
            assert_eq!(store.outbox_pending(billing, 2).unwrap().len(), 2);

            // A plain commit queues nothing.
            store.commit(&[reading("m-9", 1, 1.0)]).unwrap();
            assert_eq!(stats_of(store.as_ref(), "billing"), (3, 0, 0));
        }
    }

    #[test]
    fn settle_delivered_failed_dead_and_retry() {
        for (store, _dir) in stores() {
            let t = store.register_outbox_target("billing").unwrap();
            let other = store.register_outbox_target("mdm").unwrap();
            let batch: Vec<Accepted> = (1..=4).map(|c| reading("m-1", c, c as f64)).collect();
            store.commit_with_outbox(&batch, &[t, other]).unwrap();
            let items = store.outbox_pending(t, 10).unwrap();
            let ids: Vec<i64> = items.iter().map(|i| i.id).collect();

            let at = T0 + Duration::hours(1);
            store
                .outbox_settle(
                    &Settlement {
                        delivered: vec![ids[0]],
                        failed: vec![(ids[1], "HTTP 503".into())],
                        dead: vec![(ids[2], "HTTP 422: bad reading".into())],
                    },
                    at,
                )
                .unwrap();
            let pending = store.outbox_pending(t, 10).unwrap();
            assert_eq!(
                pending.iter().map(|i| i.id).collect::<Vec<_>>(),
                vec![ids[1], ids[3]]
            );
            assert_eq!(pending[0].attempts, 1);
            assert_eq!(stats_of(store.as_ref(), "billing"), (2, 1, 1));
            // The other target is untouched.
            assert_eq!(stats_of(store.as_ref(), "mdm"), (4, 0, 0));
            let stats = store.outbox_stats().unwrap();
            let billing = stats.iter().find(|s| s.target == "billing").unwrap();
            assert_eq!(
                billing.oldest_pending,
                Some(reading("m-1", 2, 2.0).received_at)
            );

            let dead = store.outbox_dead(None, 10).unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].id, ids[2]);
            assert_eq!(dead[0].counter, 3);
            assert_eq!(dead[0].target, "billing");
            assert_eq!(dead[0].attempts, 1);
            assert_eq!(dead[0].dead_at, at);
            assert_eq!(dead[0].reason, "HTTP 422: bad reading");
            assert!(store.outbox_dead(Some("mdm"), 10).unwrap().is_empty());

            // Settling a row that is no longer pending changes nothing.
            store
                .outbox_settle(
                    &Settlement {
                        delivered: vec![ids[2]],
                        failed: vec![(ids[0], "late".into())],
                        ..Settlement::default()
                    },
                    at,
                )
                .unwrap();
            assert_eq!(stats_of(store.as_ref(), "billing"), (2, 1, 1));

            // Retry: only dead rows, only of the named target; back in commit order.
            assert_eq!(store.outbox_retry(Some("mdm"), &[]).unwrap(), 0);
            assert_eq!(store.outbox_retry(None, &[ids[0]]).unwrap(), 0);
            assert_eq!(store.outbox_retry(Some("billing"), &[ids[2]]).unwrap(), 1);
            let pending = store.outbox_pending(t, 10).unwrap();
            assert_eq!(
                pending.iter().map(|i| i.counter).collect::<Vec<_>>(),
                vec![2, 3, 4]
            );
            assert_eq!(pending[1].attempts, 0);
            assert_eq!(stats_of(store.as_ref(), "billing"), (3, 1, 0));
        }
    }

    #[test]
    fn long_errors_are_cut_at_a_character_boundary() {
        let store = SqliteStore::open_in_memory().unwrap();
        let t = store.register_outbox_target("t").unwrap();
        store
            .commit_with_outbox(&[reading("m-1", 1, 1.0)], &[t])
            .unwrap();
        let id = store.outbox_pending(t, 1).unwrap()[0].id;
        let long = "é".repeat(1000);
        store
            .outbox_settle(
                &Settlement {
                    dead: vec![(id, long)],
                    ..Settlement::default()
                },
                T0,
            )
            .unwrap();
        let dead = store.outbox_dead(Some("t"), 1).unwrap();
        assert!(dead[0].reason.len() <= 500 && dead[0].reason.starts_with("éé"));
    }

    #[test]
    fn outbox_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gridward.db");
        {
            let store = SqliteStore::open(&path, key_for(&path)).unwrap();
            let t = store.register_outbox_target("billing").unwrap();
            store
                .commit_with_outbox(&[reading("m-1", 1, 1.0), reading("m-1", 2, 2.0)], &[t])
                .unwrap();
        }
        let store = SqliteStore::open(&path, key_for(&path)).unwrap();
        let t = store.register_outbox_target("billing").unwrap();
        assert_eq!(
            pending_ids(&store, t),
            vec![("m-1".to_owned(), 1), ("m-1".to_owned(), 2)]
        );
    }

    #[test]
    fn a_version_1_database_is_migrated_with_its_readings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            schema::migrate(&mut conn, &schema::MIGRATIONS[..1]).unwrap();
        }
        let store = SqliteStore::open(&path, key_for(&path)).unwrap();
        let t = store.register_outbox_target("billing").unwrap();
        store
            .commit_with_outbox(&[reading("m-1", 1, 1.0)], &[t])
            .unwrap();
        assert_eq!(pending_ids(&store, t), vec![("m-1".to_owned(), 1)]);
    }
}
