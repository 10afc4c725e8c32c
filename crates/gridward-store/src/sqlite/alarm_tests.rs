//! Tests of [`AlarmStore`] on [`SqliteStore`]: alarm folding and lifecycle, queries, the
//! concentrator topology, persistence, the version 4 migration and concurrent raises.

use std::sync::{Arc, Barrier};

use gridward_core::MeterId;
use rusqlite::Connection;
use serde_json::Value;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use super::{SCHEMA_VERSION, SqliteStore, schema};
use crate::alarms::{
    AlarmChangeError, AlarmQuery, AlarmState, AlarmStore, RaiseAlarm, RaiseOutcome, StoredAlarm,
};
use crate::error::StoreError;
use crate::model::SecurityEventQuery;
use crate::store::Store;

const T0: OffsetDateTime = datetime!(2026-12-03 10:00:00 UTC);

fn mid(s: &str) -> MeterId {
    MeterId::new(s).unwrap()
}

fn mids(ids: &[&str]) -> Vec<MeterId> {
    ids.iter().map(|s| mid(s)).collect()
}

fn raise(alarm_type: &str, severity: &str, originator: &str, at: OffsetDateTime) -> RaiseAlarm {
    RaiseAlarm {
        alarm_type: alarm_type.to_owned(),
        severity: severity.to_owned(),
        originator: originator.to_owned(),
        at,
        summary: format!("{alarm_type} on {originator} at {at}"),
        evidence_json: "[]".to_owned(),
    }
}

fn evidence(alarm: &StoredAlarm) -> Vec<Value> {
    serde_json::from_str(&alarm.evidence_json).unwrap()
}

fn new_alarm(store: &dyn AlarmStore, r: &RaiseAlarm) -> StoredAlarm {
    match store.raise_alarm(r).unwrap() {
        RaiseOutcome::New(a) => a,
        other => panic!("expected a new alarm: {other:?}"),
    }
}

fn updated_alarm(store: &dyn AlarmStore, r: &RaiseAlarm) -> StoredAlarm {
    match store.raise_alarm(r).unwrap() {
        RaiseOutcome::Updated(a) => a,
        other => panic!("expected an update: {other:?}"),
    }
}

/// Both kinds of store: in memory, and on a fresh file (kept alive by the returned directory).
fn stores() -> Vec<(Box<dyn AlarmStore>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let file = SqliteStore::open(
        &dir.path().join("gridward.db"),
        super::tests::key_for(&dir.path().join("gridward.db")),
    )
    .unwrap();
    vec![
        (Box::new(SqliteStore::open_in_memory().unwrap()), None),
        (Box::new(file), Some(dir)),
    ]
}

#[test]
fn a_sqlite_store_is_an_arc_dyn_alarm_store() {
    let store: Arc<dyn AlarmStore> = Arc::new(SqliteStore::open_in_memory().unwrap());
    let a = new_alarm(&*store, &raise("tamper", "major", "meter:m-1", T0));
    assert_eq!(store.alarm(a.id).unwrap(), Some(a));
    // And one store serves both traits.
    let both = Arc::new(SqliteStore::open_in_memory().unwrap());
    let alarms: Arc<dyn AlarmStore> = both.clone();
    let data: Arc<dyn Store> = both;
    alarms
        .raise_alarm(&raise("tamper", "major", "meter:m-1", T0))
        .unwrap();
    assert_eq!(data.counts().unwrap().meters, 0);
}

#[test]
fn a_first_raise_opens_an_alarm_and_repeats_fold_into_it() {
    for (store, _dir) in stores() {
        let mut r = raise("tamper", "minor", "meter:m-1", T0);
        r.evidence_json = r#"[{"kind":"CoverOpened"}]"#.to_owned();
        let a = new_alarm(&*store, &r);
        assert_eq!(a.alarm_type, "tamper");
        assert_eq!(a.severity, "minor");
        assert_eq!(a.originator, "meter:m-1");
        assert_eq!(a.state, AlarmState::ActiveUnacknowledged);
        assert_eq!((a.first_seen, a.last_seen, a.count), (T0, T0, 1));
        assert_eq!(
            evidence(&a),
            vec![serde_json::json!({"kind": "CoverOpened"})]
        );
        assert_eq!((a.acknowledged.clone(), a.cleared.clone()), (None, None));

        // A later repeat with a higher severity.
        let mut r2 = raise("tamper", "critical", "meter:m-1", T0 + Duration::minutes(5));
        r2.summary = "second".to_owned();
        r2.evidence_json = r#"[{"kind":"MagneticField"}]"#.to_owned();
        let b = updated_alarm(&*store, &r2);
        assert_eq!(b.id, a.id);
        assert_eq!(b.count, 2);
        assert_eq!(b.first_seen, T0);
        assert_eq!(b.last_seen, T0 + Duration::minutes(5));
        assert_eq!(b.severity, "critical");
        assert_eq!(b.summary, "second");
        assert_eq!(evidence(&b).len(), 2);

        // An older, lower one: last_seen and severity stay, the summary is the latest call's.
        let mut r3 = raise("tamper", "warning", "meter:m-1", T0 + Duration::minutes(1));
        r3.summary = "third".to_owned();
        let c = updated_alarm(&*store, &r3);
        assert_eq!(c.count, 3);
        assert_eq!(c.last_seen, T0 + Duration::minutes(5));
        assert_eq!(c.severity, "critical");
        assert_eq!(c.summary, "third");
        // Even older than the first raise: first_seen moves back.
        let d = updated_alarm(
            &*store,
            &raise("tamper", "major", "meter:m-1", T0 - Duration::minutes(1)),
        );
        assert_eq!(d.first_seen, T0 - Duration::minutes(1));
        assert_eq!(d.severity, "critical");
        assert_eq!(store.alarm(a.id).unwrap(), Some(d));
        assert_eq!(store.alarms(&AlarmQuery::default()).unwrap().len(), 1);
    }
}

#[test]
fn severity_takes_the_highest_in_the_order_critical_major_minor_warning() {
    let store = SqliteStore::open_in_memory().unwrap();
    let seq = [
        ("warning", "warning"),
        ("minor", "minor"),
        ("warning", "minor"),
        ("major", "major"),
        ("minor", "major"),
        ("critical", "critical"),
        ("warning", "critical"),
    ];
    for (given, want) in seq {
        let out = store
            .raise_alarm(&raise("outage", given, "feeder:f1", T0))
            .unwrap();
        assert_eq!(out.alarm().severity, want, "after {given}");
    }
}

#[test]
fn evidence_keeps_the_first_ten_and_the_last_forty_entries() {
    let store = SqliteStore::open_in_memory().unwrap();
    for i in 0..100 {
        let mut r = raise("refusal_burst", "major", "source:10.0.0.7", T0);
        r.evidence_json = format!("[{{\"n\":{i}}}]");
        store.raise_alarm(&r).unwrap();
    }
    let a = &store.alarms(&AlarmQuery::default()).unwrap()[0];
    assert_eq!(a.count, 100);
    let kept: Vec<i64> = evidence(a)
        .iter()
        .map(|e| e["n"].as_i64().unwrap())
        .collect();
    let want: Vec<i64> = (0..10).chain(60..100).collect();
    assert_eq!(kept, want);

    // A single raise with more than fifty entries is cut the same way.
    let mut r = raise("refusal_burst", "major", "source:10.0.0.8", T0);
    r.evidence_json = serde_json::to_string(&(0..60).collect::<Vec<i64>>()).unwrap();
    let a = new_alarm(&store, &r);
    let kept: Vec<i64> = serde_json::from_str(&a.evidence_json).unwrap();
    assert_eq!(kept, (0..10).chain(20..60).collect::<Vec<_>>());
}

#[test]
fn evidence_that_is_not_a_json_array_is_kept_as_entries_without_failing() {
    let store = SqliteStore::open_in_memory().unwrap();
    let mut r = raise("cloned_meter", "critical", "meter:m-1", T0);
    r.evidence_json = "not json [".to_owned();
    let a = new_alarm(&store, &r);
    assert_eq!(evidence(&a), vec![Value::String("not json [".to_owned())]);
    r.evidence_json = r#"{"addr":"10.0.0.1"}"#.to_owned();
    let a = updated_alarm(&store, &r);
    r.evidence_json = String::new();
    let a2 = updated_alarm(&store, &r);
    assert_eq!(evidence(&a), evidence(&a2));
    assert_eq!(
        evidence(&a2),
        vec![
            Value::String("not json [".to_owned()),
            serde_json::json!({"addr": "10.0.0.1"})
        ]
    );
    // A stored value damaged outside Gridward does not block the next raise.
    store
        .writer()
        .execute(
            "UPDATE alarms SET evidence_json = 'garbage' WHERE id = ?1",
            [a.id],
        )
        .unwrap();
    r.evidence_json = "[1]".to_owned();
    let a3 = updated_alarm(&store, &r);
    assert_eq!(evidence(&a3), vec![Value::from("garbage"), Value::from(1)]);
}

#[test]
fn invalid_raises_are_refused_and_store_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    for r in [
        raise("tamper", "Critical", "meter:m-1", T0),
        raise("tamper", "severe", "meter:m-1", T0),
        raise("", "major", "meter:m-1", T0),
        raise("tamper", "major", "", T0),
    ] {
        let err = store.raise_alarm(&r).unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidRequest(_)),
            "{r:?}: {err:?}"
        );
    }
    assert!(store.alarms(&AlarmQuery::default()).unwrap().is_empty());
}

#[test]
fn different_originators_or_types_are_different_alarms() {
    let store = SqliteStore::open_in_memory().unwrap();
    let a = new_alarm(&store, &raise("tamper", "major", "meter:m-1", T0));
    let b = new_alarm(&store, &raise("tamper", "major", "meter:m-2", T0));
    let c = new_alarm(&store, &raise("power_failure", "minor", "meter:m-1", T0));
    assert!(a.id < b.id && b.id < c.id);
    assert_eq!(store.alarms(&AlarmQuery::default()).unwrap().len(), 3);
}

#[test]
fn after_a_clear_the_next_raise_opens_a_new_alarm() {
    for (store, _dir) in stores() {
        let a = new_alarm(&*store, &raise("tamper", "major", "meter:m-1", T0));
        store
            .clear_alarm(a.id, "user:alice", T0 + Duration::minutes(1), "inspected")
            .unwrap();
        let b = new_alarm(
            &*store,
            &raise("tamper", "minor", "meter:m-1", T0 + Duration::minutes(2)),
        );
        assert!(b.id > a.id);
        assert_eq!((b.count, b.severity.as_str()), (1, "minor"));
        // The cleared one did not change.
        let old = store.alarm(a.id).unwrap().unwrap();
        assert_eq!((old.state, old.count), (AlarmState::Cleared, 1));
        let active = store
            .alarms(&AlarmQuery {
                active_only: true,
                ..AlarmQuery::default()
            })
            .unwrap();
        assert_eq!(active, vec![b]);
    }
}

#[test]
fn acknowledge_only_an_active_unacknowledged_alarm() {
    for (store, _dir) in stores() {
        let a = new_alarm(&*store, &raise("tamper", "major", "meter:m-1", T0));
        let at = T0 + Duration::minutes(3);
        let acked = store.acknowledge_alarm(a.id, "user:alice", at).unwrap();
        assert_eq!(acked.state, AlarmState::ActiveAcknowledged);
        assert_eq!(acked.acknowledged, Some(("user:alice".to_owned(), at)));
        assert_eq!(store.alarm(a.id).unwrap(), Some(acked.clone()));

        let err = store.acknowledge_alarm(a.id, "user:bob", at).unwrap_err();
        assert!(matches!(err, AlarmChangeError::AlreadyAcknowledged(id) if id == a.id));
        let err = store.acknowledge_alarm(9999, "user:bob", at).unwrap_err();
        assert!(matches!(err, AlarmChangeError::NotFound(9999)));
        let err = store.acknowledge_alarm(a.id, " ", at).unwrap_err();
        assert!(matches!(
            err,
            AlarmChangeError::Store(StoreError::InvalidRequest(_))
        ));

        // A repeat keeps the acknowledgement (still the same, active alarm).
        let r = updated_alarm(&*store, &raise("tamper", "major", "meter:m-1", at));
        assert_eq!(r.state, AlarmState::ActiveAcknowledged);
        assert_eq!(r.acknowledged, acked.acknowledged);

        store.clear_alarm(a.id, "user:alice", at, "done").unwrap();
        let err = store.acknowledge_alarm(a.id, "user:bob", at).unwrap_err();
        assert!(matches!(err, AlarmChangeError::Cleared(id) if id == a.id));
        // The refused changes left the alarm as it was.
        let now = store.alarm(a.id).unwrap().unwrap();
        assert_eq!(now.acknowledged, acked.acknowledged);
    }
}

#[test]
fn clear_from_either_active_state_and_cleared_is_final() {
    for (store, _dir) in stores() {
        let at = T0 + Duration::hours(1);
        let unacked = new_alarm(&*store, &raise("tamper", "major", "meter:m-1", T0));
        let c = store
            .clear_alarm(unacked.id, "user:alice", at, "false alarm")
            .unwrap();
        assert_eq!(c.state, AlarmState::Cleared);
        assert_eq!(
            c.cleared,
            Some(("user:alice".to_owned(), at, "false alarm".to_owned()))
        );
        assert_eq!(c.acknowledged, None);

        let acked = new_alarm(&*store, &raise("tamper", "major", "meter:m-2", T0));
        store.acknowledge_alarm(acked.id, "user:bob", T0).unwrap();
        let c2 = store
            .clear_alarm(acked.id, "user:alice", at, "repaired")
            .unwrap();
        assert_eq!(c2.state, AlarmState::Cleared);
        assert_eq!(c2.acknowledged, Some(("user:bob".to_owned(), T0)));

        let err = store
            .clear_alarm(acked.id, "user:carol", at, "again")
            .unwrap_err();
        assert!(matches!(err, AlarmChangeError::Cleared(id) if id == acked.id));
        let err = store.clear_alarm(4242, "user:carol", at, "x").unwrap_err();
        assert!(matches!(err, AlarmChangeError::NotFound(4242)));
        assert_eq!(store.alarm(acked.id).unwrap(), Some(c2));
    }
}

#[test]
fn clear_active_alarm_by_type_and_originator() {
    for (store, _dir) in stores() {
        let at = T0 + Duration::minutes(10);
        assert_eq!(
            store
                .clear_active_alarm("outage", "feeder:f1", "detector", at, "restored")
                .unwrap(),
            None
        );
        let a = new_alarm(&*store, &raise("outage", "critical", "feeder:f1", T0));
        let other = new_alarm(&*store, &raise("outage", "critical", "feeder:f2", T0));
        let c = store
            .clear_active_alarm("outage", "feeder:f1", "detector", at, "restored")
            .unwrap()
            .unwrap();
        assert_eq!(c.id, a.id);
        assert_eq!(c.state, AlarmState::Cleared);
        assert_eq!(
            c.cleared,
            Some(("detector".to_owned(), at, "restored".to_owned()))
        );
        // Nothing active any more under that key; the other key is untouched.
        assert_eq!(
            store
                .clear_active_alarm("outage", "feeder:f1", "detector", at, "restored")
                .unwrap(),
            None
        );
        assert_eq!(store.alarm(other.id).unwrap(), Some(other));
    }
}

#[test]
fn alarm_queries_filter_page_and_list_newest_first() {
    for (store, _dir) in stores() {
        let mut ids = Vec::new();
        for i in 0..10 {
            let (t, sev) = if i % 2 == 0 {
                ("tamper", "major")
            } else {
                ("power_failure", "minor")
            };
            let a = new_alarm(
                &*store,
                &raise(t, sev, &format!("meter:m-{i}"), T0 + Duration::minutes(i)),
            );
            ids.push(a.id);
        }
        store.clear_alarm(ids[0], "user:alice", T0, "ok").unwrap();
        store.clear_alarm(ids[1], "user:alice", T0, "ok").unwrap();
        let q = |f: &dyn Fn(&mut AlarmQuery)| -> Vec<i64> {
            let mut query = AlarmQuery::default();
            f(&mut query);
            store
                .alarms(&query)
                .unwrap()
                .into_iter()
                .map(|a| a.id)
                .collect()
        };
        let mut all = ids.clone();
        all.reverse();
        assert_eq!(q(&|_| {}), all);
        assert_eq!(q(&|q| q.active_only = true), all[..8].to_vec());
        assert_eq!(
            q(&|q| q.alarm_type = Some("tamper".into())),
            vec![ids[8], ids[6], ids[4], ids[2], ids[0]]
        );
        assert_eq!(
            q(&|q| {
                q.alarm_type = Some("tamper".into());
                q.active_only = true;
            }),
            vec![ids[8], ids[6], ids[4], ids[2]]
        );
        assert_eq!(
            q(&|q| q.severity = Some("minor".into())),
            vec![ids[9], ids[7], ids[5], ids[3], ids[1]]
        );
        assert_eq!(
            q(&|q| q.originator = Some("meter:m-3".into())),
            vec![ids[3]]
        );
        assert_eq!(
            q(&|q| q.originator = Some("meter:nobody".into())),
            Vec::<i64>::new()
        );
        // Paging: pages of three, each continuing below the last id seen.
        let mut pages = Vec::new();
        let mut before = None;
        loop {
            let page = q(&|q| {
                q.limit = 3;
                q.before = before;
            });
            if page.is_empty() {
                break;
            }
            before = page.last().copied();
            pages.push(page);
        }
        assert_eq!(pages.len(), 4);
        assert_eq!(pages.concat(), all);
        assert_eq!(q(&|q| q.limit = 0), Vec::<i64>::new());
    }
}

#[test]
fn active_alarm_counts_per_severity_most_severe_first() {
    let store = SqliteStore::open_in_memory().unwrap();
    assert_eq!(store.active_alarm_counts().unwrap(), vec![]);
    new_alarm(&store, &raise("power_failure", "minor", "meter:m-1", T0));
    new_alarm(&store, &raise("power_failure", "minor", "meter:m-2", T0));
    new_alarm(&store, &raise("outage", "critical", "feeder:f1", T0));
    let gone = new_alarm(&store, &raise("tamper", "major", "meter:m-1", T0));
    new_alarm(&store, &raise("tamper", "warning", "meter:m-3", T0));
    // Repeats do not count twice.
    updated_alarm(&store, &raise("power_failure", "minor", "meter:m-1", T0));
    store.clear_alarm(gone.id, "detector", T0, "ended").unwrap();
    assert_eq!(
        store.active_alarm_counts().unwrap(),
        vec![
            ("critical".to_owned(), 1),
            ("minor".to_owned(), 2),
            ("warning".to_owned(), 1)
        ]
    );
}

#[test]
fn topology_attach_move_detach_and_list() {
    for (store, _dir) in stores() {
        let dc1 = mid("dc-1");
        let dc2 = mid("dc-2");
        assert_eq!(
            store
                .attach_meters(&dc1, &mids(&["m-2", "m-1", "m-3"]), T0)
                .unwrap(),
            3
        );
        // Attaching meters already there changes nothing, listing one twice neither.
        assert_eq!(
            store
                .attach_meters(&dc1, &mids(&["m-1", "m-2", "m-2"]), T0)
                .unwrap(),
            0
        );
        assert_eq!(
            store.concentrator_meters(&dc1).unwrap(),
            mids(&["m-1", "m-2", "m-3"])
        );
        assert_eq!(
            store.concentrator_of(&mid("m-2")).unwrap(),
            Some(dc1.clone())
        );
        assert_eq!(store.concentrator_of(&mid("m-9")).unwrap(), None);

        // m-3 moves to dc-2 (one change), m-4 is new (one change).
        assert_eq!(
            store
                .attach_meters(&dc2, &mids(&["m-3", "m-4"]), T0)
                .unwrap(),
            2
        );
        assert_eq!(
            store.concentrator_meters(&dc1).unwrap(),
            mids(&["m-1", "m-2"])
        );
        assert_eq!(
            store.concentrator_meters(&dc2).unwrap(),
            mids(&["m-3", "m-4"])
        );
        assert_eq!(
            store.concentrator_of(&mid("m-3")).unwrap(),
            Some(dc2.clone())
        );
        assert_eq!(
            store.topology().unwrap(),
            vec![
                (dc1.clone(), mid("m-1")),
                (dc1.clone(), mid("m-2")),
                (dc2.clone(), mid("m-3")),
                (dc2.clone(), mid("m-4")),
            ]
        );

        // Detaching counts only the meters that were behind that concentrator.
        assert_eq!(
            store
                .detach_meters(&dc1, &mids(&["m-1", "m-3", "m-9"]))
                .unwrap(),
            1
        );
        assert_eq!(store.detach_meters(&dc1, &mids(&["m-1"])).unwrap(), 0);
        assert_eq!(store.concentrator_of(&mid("m-1")).unwrap(), None);
        assert_eq!(
            store.concentrator_of(&mid("m-3")).unwrap(),
            Some(dc2.clone())
        );
        assert_eq!(store.attach_meters(&dc1, &[], T0).unwrap(), 0);
        assert_eq!(store.detach_meters(&dc1, &[]).unwrap(), 0);
        assert_eq!(store.concentrator_meters(&mid("dc-9")).unwrap(), vec![]);

        // A concentrator is not behind itself.
        let err = store
            .attach_meters(&dc1, &mids(&["m-5", "dc-1"]), T0)
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
        assert_eq!(store.concentrator_of(&mid("m-5")).unwrap(), None);
    }
}

#[test]
fn a_moved_meter_gets_a_new_attach_time_an_unchanged_one_keeps_its_own() {
    let store = SqliteStore::open_in_memory().unwrap();
    let attached_at = |m: &str| -> i64 {
        store
            .writer()
            .query_row(
                "SELECT attached_at FROM concentrator_meters WHERE meter_id = ?1",
                [m],
                |r| r.get(0),
            )
            .unwrap()
    };
    store
        .attach_meters(&mid("dc-1"), &mids(&["m-1", "m-2"]), T0)
        .unwrap();
    let t0 = attached_at("m-1");
    let later = T0 + Duration::hours(1);
    store
        .attach_meters(&mid("dc-1"), &mids(&["m-1"]), later)
        .unwrap();
    assert_eq!(attached_at("m-1"), t0);
    store
        .attach_meters(&mid("dc-2"), &mids(&["m-2"]), later)
        .unwrap();
    assert_eq!(attached_at("m-2"), t0 + 3_600_000_000);
}

#[test]
fn alarms_and_topology_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gridward.db");
    let (acked, cleared, active) = {
        let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
        let acked = new_alarm(&store, &raise("tamper", "major", "meter:m-1", T0));
        updated_alarm(
            &store,
            &raise("tamper", "critical", "meter:m-1", T0 + Duration::seconds(1)),
        );
        let acked = store.acknowledge_alarm(acked.id, "user:alice", T0).unwrap();
        let cleared = new_alarm(&store, &raise("outage", "critical", "feeder:f1", T0));
        let cleared = store
            .clear_alarm(cleared.id, "detector", T0, "restored")
            .unwrap();
        let active = new_alarm(&store, &raise("cloned_meter", "critical", "meter:m-2", T0));
        store
            .attach_meters(&mid("dc-1"), &mids(&["m-1", "m-2"]), T0)
            .unwrap();
        (acked, cleared, active)
    };
    let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
    assert_eq!(
        store.alarms(&AlarmQuery::default()).unwrap(),
        vec![active.clone(), cleared, acked.clone()]
    );
    assert_eq!(acked.count, 2);
    assert_eq!(
        store.topology().unwrap(),
        vec![(mid("dc-1"), mid("m-1")), (mid("dc-1"), mid("m-2"))]
    );
    // The reopened store keeps folding into the same active alarms.
    let again = updated_alarm(&store, &raise("cloned_meter", "critical", "meter:m-2", T0));
    assert_eq!((again.id, again.count), (active.id, 2));
}

#[test]
fn a_version_3_database_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.db");
    {
        let mut conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        assert_eq!(
            schema::migrate(&mut conn, &schema::MIGRATIONS[..3]).unwrap(),
            3
        );
        // Data as version 3 wrote it: a security event and a reserved command counter.
        conn.execute_batch(
            "INSERT INTO security_events (id, at, meter_id, source, reason, detail)
             VALUES (1, 0, 'm-1', '10.0.0.7:4444', 'bad_signature', 'x');
             INSERT INTO command_counters (meter_id, last) VALUES ('m-1', 7);",
        )
        .unwrap();
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name IN ('alarms', 'concentrator_meters')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
    }
    let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
    let version: i64 = store
        .writer()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 5);
    let events = store
        .security_events(&SecurityEventQuery::default())
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event.reason, "bad_signature");
    let last: i64 = store
        .writer()
        .query_row(
            "SELECT last FROM command_counters WHERE meter_id = 'm-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(last, 7);
    // The new tables work at once, and after reopening the upgraded file.
    let a = new_alarm(&store, &raise("tamper", "major", "meter:m-1", T0));
    store
        .attach_meters(&mid("dc-1"), &mids(&["m-1"]), T0)
        .unwrap();
    drop(store);
    let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
    assert_eq!(store.alarm(a.id).unwrap(), Some(a));
    assert_eq!(
        store.concentrator_of(&mid("m-1")).unwrap(),
        Some(mid("dc-1"))
    );
}

#[test]
fn one_active_alarm_per_key_is_a_constraint() {
    let store = SqliteStore::open_in_memory().unwrap();
    new_alarm(&store, &raise("tamper", "major", "meter:m-1", T0));
    let err = store
        .writer()
        .execute(
            "INSERT INTO alarms (alarm_type, severity, originator, first_seen, last_seen, count,
                                 summary, evidence_json)
             VALUES ('tamper', 'major', 'meter:m-1', 0, 0, 1, 's', '[]')",
            [],
        )
        .unwrap_err();
    assert!(err.to_string().contains("UNIQUE"), "{err}");
}

#[test]
fn concurrent_raises_of_one_key_leave_exactly_one_active_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gridward.db");
    let shared = Arc::new(SqliteStore::open(&path, super::tests::key_for(&path)).unwrap());
    // Two threads on one store, and a third on its own connection to the same file (as another
    // process would be).
    let stores: Vec<Arc<SqliteStore>> = vec![
        Arc::clone(&shared),
        Arc::clone(&shared),
        Arc::new(SqliteStore::open(&path, super::tests::key_for(&path)).unwrap()),
    ];
    const RAISES: u64 = 25;
    let barrier = Arc::new(Barrier::new(stores.len()));
    let threads: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(t, store)| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let mut new = 0;
                for i in 0..RAISES {
                    let mut r = raise("refusal_burst", "major", "source:10.0.0.7", T0);
                    r.evidence_json = format!("[{{\"thread\":{t},\"i\":{i}}}]");
                    if let RaiseOutcome::New(_) = store.raise_alarm(&r).unwrap() {
                        new += 1;
                    }
                }
                new
            })
        })
        .collect();
    let new: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(new, 1);
    let all = shared.alarms(&AlarmQuery::default()).unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, AlarmState::ActiveUnacknowledged);
    assert_eq!(all[0].count, 3 * RAISES);
    assert_eq!(evidence(&all[0]).len(), 50);
}

#[test]
fn alarm_queries_use_their_indexes() {
    let store = SqliteStore::open_in_memory().unwrap();
    let conn = store.writer();
    let plan = |sql: &str| -> String {
        conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .join("; ")
    };
    let cases = [
        (
            "SELECT id FROM alarms WHERE alarm_type = 't' AND originator = 'o' AND state <> 'cleared'",
            "alarms_active",
        ),
        (
            "SELECT severity, count(*) FROM alarms WHERE state <> 'cleared' GROUP BY severity",
            "alarms_open",
        ),
        (
            "SELECT id FROM alarms WHERE 1 AND alarm_type = 't' ORDER BY id DESC LIMIT 5",
            "alarms_type",
        ),
        (
            "SELECT id FROM alarms WHERE 1 AND originator = 'o' ORDER BY id DESC LIMIT 5",
            "alarms_originator",
        ),
        (
            "SELECT meter_id FROM concentrator_meters WHERE concentrator_id = 'c' ORDER BY meter_id",
            "concentrator_meters_by_concentrator",
        ),
    ];
    for (sql, index) in cases {
        let p = plan(sql);
        assert!(p.contains(index), "{sql}: {p}");
        assert!(!p.contains("TEMP B-TREE"), "{sql}: {p}");
    }
}
