//! Encryption at rest: nothing readable in the files, tampering detected, rotation, re-wrap,
//! crypto-shredding, passphrases, and sealing a version 4 database's plaintext rows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gridward_core::MeterId;
use gridward_core::document::Format;
use gridward_vault::{KdfParams, OpenError};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::tests::key_for;
use super::*;

const T0: OffsetDateTime = datetime!(2024-02-06 12:00:00 UTC);

/// A reading whose envelope carries the value in XML, as a meter's does.
fn reading(meter: &str, counter: u64, kwh: f64) -> Accepted {
    let taken_at = T0 + Duration::minutes(counter as i64);
    Accepted {
        meter_id: MeterId::new(meter).unwrap(),
        counter,
        taken_at,
        received_at: taken_at,
        body: AcceptedBody::Reading { energy_kwh: kwh },
        envelope: format!(
            "<EnergyUsageReport><MeterID>{meter}</MeterID><EnergyConsumed>{kwh}</EnergyConsumed></EnergyUsageReport>"
        )
        .into_bytes(),
        content_type: Format::Xml,
        source: None,
    }
}

fn values(store: &SqliteStore, meter: &str) -> Vec<(u64, f64)> {
    store
        .readings(&ReadingQuery::new(MeterId::new(meter).unwrap()))
        .unwrap()
        .iter()
        .map(|r| (r.counter, r.energy_kwh))
        .collect()
}

/// The bytes of the database file and its WAL.
fn file_bytes(db: &Path) -> Vec<u8> {
    let mut all = std::fs::read(db).unwrap();
    let mut wal = PathBuf::from(db).into_os_string();
    wal.push("-wal");
    if let Ok(w) = std::fs::read(&wal) {
        all.extend_from_slice(&w);
    }
    all
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Distinctive values: no accidental match in the file's other bytes.
fn value(i: u64) -> f64 {
    123_456.0 + i as f64 * 1.015625
}

#[test]
fn neither_the_file_nor_its_wal_holds_a_reading_value_or_an_element_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gridward.db");
    let store = SqliteStore::open(&db, key_for(&db)).unwrap();
    let target = store.register_outbox_target("billing").unwrap();
    let batch: Vec<Accepted> = (1..=200).map(|i| reading("m-7", i, value(i))).collect();
    store.commit_with_outbox(&batch, &[target]).unwrap();
    // Served in clear to those who hold the key.
    assert_eq!(values(&store, "m-7")[199], (200, value(200)));
    assert_eq!(store.meters().unwrap()[0].last_kwh, Some(value(200)));
    let pending = store.outbox_pending(target, 10).unwrap();
    assert_eq!(pending[0].energy_kwh, value(1));
    assert!(contains(&pending[0].envelope, b"<EnergyConsumed>"));
    let bytes = file_bytes(&db);
    assert!(bytes.len() > 100_000, "the WAL holds the batch");
    for needle in [&b"EnergyUsageReport"[..], b"EnergyConsumed", b"123456"] {
        assert!(
            !contains(&bytes, needle),
            "{}",
            String::from_utf8_lossy(needle)
        );
    }
    for i in 1..=200 {
        let v = value(i);
        assert!(!contains(&bytes, &v.to_le_bytes()), "f64 {v}");
        assert!(!contains(&bytes, &v.to_be_bytes()), "f64 {v}");
        assert!(!contains(&bytes, v.to_string().as_bytes()), "{v}");
    }
    drop(store);
    // Reopened with its key file, everything reads back.
    let store = SqliteStore::open_existing(&db, KeySource::existing_file(db.with_extension("key")))
        .unwrap();
    assert_eq!(values(&store, "m-7").len(), 200);
}

#[test]
fn a_tampered_or_moved_ciphertext_is_reported_and_never_served() {
    let store = SqliteStore::open_in_memory().unwrap();
    let target = store.register_outbox_target("billing").unwrap();
    let ids: Vec<i64> = store
        .commit_with_outbox(
            &[
                reading("m-1", 1, 10.0),
                reading("m-1", 2, 11.0),
                reading("m-2", 1, 99.0),
            ],
            &[target],
        )
        .unwrap()
        .iter()
        .map(|o| match o {
            Outcome::Stored { id } => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    // One flipped ciphertext byte of a register.
    let mut flipped: Vec<u8> = store
        .writer()
        .query_row(
            "SELECT sealed_value FROM messages WHERE id = ?1",
            [ids[0]],
            |r| r.get(0),
        )
        .unwrap();
    flipped[20] ^= 0x01;
    store
        .writer()
        .execute(
            "UPDATE messages SET sealed_value = ?2 WHERE id = ?1",
            rusqlite::params![ids[0], flipped],
        )
        .unwrap();
    assert_eq!(flipped.len(), 8 + 33);
    let err = store
        .readings(&ReadingQuery::new(MeterId::new("m-1").unwrap()))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Tampered { table: "messages", row, reason: OpenError::Authentication { .. } } if row == ids[0]),
        "{err:?}"
    );
    assert!(matches!(
        store.outbox_pending(target, 10),
        Err(StoreError::Tampered { .. })
    ));
    // The other meter's data still flows.
    assert_eq!(values(&store, "m-2"), [(1, 99.0)]);

    // A sealed value copied to another row (m-2's register into m-1's second reading).
    store
        .writer()
        .execute(
            "UPDATE messages SET sealed_value = (SELECT sealed_value FROM messages WHERE id = ?2)
             WHERE id = ?1",
            [ids[1], ids[2]],
        )
        .unwrap();
    store
        .writer()
        .execute(
            "UPDATE messages SET envelope = (SELECT envelope FROM messages WHERE id = ?2)
             WHERE id = ?1",
            [ids[1], ids[2]],
        )
        .unwrap();
    assert!(matches!(
        store.envelope(ids[1]),
        Err(StoreError::Tampered { row, .. }) if row == ids[1]
    ));
    assert!(store.envelope(ids[2]).unwrap().is_some());
    // A header naming a data key nobody made is tampering, not shredding: not skipped.
    let mut renamed: Vec<u8> = store
        .writer()
        .query_row(
            "SELECT envelope FROM messages WHERE id = ?1",
            [ids[2]],
            |r| r.get(0),
        )
        .unwrap();
    renamed[1..5].copy_from_slice(&99u32.to_be_bytes());
    store
        .writer()
        .execute(
            "UPDATE messages SET envelope = ?2 WHERE id = ?1",
            rusqlite::params![ids[2], renamed],
        )
        .unwrap();
    assert!(matches!(
        store.envelope(ids[2]),
        Err(StoreError::Tampered {
            reason: OpenError::UnknownKey(99),
            ..
        })
    ));
    // An altered last register refuses the meter's next batch rather than trusting it.
    store
        .writer()
        .execute(
            "UPDATE meters SET last_kwh_sealed = X'00' WHERE meter_id = 'm-2'",
            [],
        )
        .unwrap();
    assert!(matches!(
        store.commit(&[reading("m-2", 2, 100.0)]),
        Err(StoreError::Tampered {
            table: "meters",
            ..
        })
    ));
    assert!(matches!(
        store.commit(&[reading("m-3", 1, 5.0)]).unwrap()[..],
        [Outcome::Stored { .. }]
    ));
}

#[test]
fn rotation_seals_new_rows_under_a_new_key_and_a_running_store_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gridward.db");
    let serve = SqliteStore::open(&db, key_for(&db)).unwrap();
    serve.commit(&[reading("m-1", 1, 1.0)]).unwrap();
    // `gridward keys rotate` from another process.
    let cli = SqliteStore::open_existing(&db, KeySource::existing_file(db.with_extension("key")))
        .unwrap();
    assert_eq!(cli.rotate_key().unwrap(), 2);
    serve.commit(&[reading("m-1", 2, 2.0)]).unwrap();
    let keys: Vec<Option<i64>> = serve
        .writer()
        .prepare("SELECT key_id FROM messages ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(keys, [Some(1), Some(2)]);
    assert_eq!(values(&cli, "m-1"), [(1, 1.0), (2, 2.0)]);
    let status = cli.key_status().unwrap();
    assert_eq!(status.kdf, "key_file");
    assert_eq!(
        status
            .keys
            .iter()
            .map(|k| (k.id, k.messages, k.active))
            .collect::<Vec<_>>(),
        [(1, 1, false), (2, 1, true)]
    );

    // The period: a key older than it is replaced at the next batch.
    serve.set_key_period(std::time::Duration::ZERO);
    std::thread::sleep(std::time::Duration::from_millis(2));
    serve.commit(&[reading("m-1", 3, 3.0)]).unwrap();
    assert_eq!(cli.key_status().unwrap().keys.len(), 3);
    assert_eq!(values(&serve, "m-1").len(), 3);
}

#[test]
fn rewrap_moves_the_keys_under_a_new_key_encryption_key_and_the_old_one_opens_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gridward.db");
    let old_key = db.with_extension("key");
    let store = SqliteStore::open(&db, key_for(&db)).unwrap();
    store.commit(&[reading("m-1", 1, 7.5)]).unwrap();
    store.rotate_key().unwrap();
    let new_key = dir.path().join("new.key");
    let fp = store.rewrap(&KeySource::file(&new_key)).unwrap();
    assert_eq!(values(&store, "m-1"), [(1, 7.5)]);
    store.commit(&[reading("m-1", 2, 8.0)]).unwrap();
    assert!(matches!(
        store.rewrap(&KeySource::existing_file(&new_key)),
        Err(StoreError::InvalidRequest(_))
    ));
    drop(store);
    let err = SqliteStore::open_existing(&db, KeySource::existing_file(&old_key)).unwrap_err();
    assert!(
        matches!(err, StoreError::KeyMismatch { expected, .. } if expected == fp),
        "{err:?}"
    );
    let store = SqliteStore::open_existing(&db, KeySource::existing_file(&new_key)).unwrap();
    assert_eq!(values(&store, "m-1"), [(1, 7.5), (2, 8.0)]);
    // A missing key file is named, with what to do.
    let err =
        SqliteStore::open_existing(&db, KeySource::existing_file(dir.path().join("gone.key")))
            .unwrap_err();
    assert!(matches!(err, StoreError::KeyFileMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("restore the key file"), "{err}");
    // Nor is a key file created for an existing database.
    let err = SqliteStore::open(&db, KeySource::file(dir.path().join("fresh.key"))).unwrap_err();
    assert!(matches!(err, StoreError::KeyFileMissing { .. }), "{err:?}");
    assert!(!dir.path().join("fresh.key").exists());
}

#[test]
fn a_destroyed_key_makes_its_period_unreadable_and_only_that() {
    let store = SqliteStore::open_in_memory().unwrap();
    let target = store.register_outbox_target("billing").unwrap();
    let first = store
        .commit_with_outbox(&[reading("m-1", 1, 1.0)], &[target])
        .unwrap();
    let Outcome::Stored { id: first } = first[0] else {
        panic!()
    };
    assert!(matches!(
        store.destroy_key(1),
        Err(StoreError::InvalidRequest(m)) if m.contains("active")
    ));
    store.rotate_key().unwrap();
    store
        .commit_with_outbox(&[reading("m-1", 2, 2.0)], &[target])
        .unwrap();
    assert!(matches!(
        store.destroy_key(1),
        Err(StoreError::InvalidRequest(m)) if m.contains("pending")
    ));
    let pending = store.outbox_pending(target, 10).unwrap();
    let mut settlement = Settlement::default();
    settlement.delivered.push(pending[0].id);
    store.outbox_settle(&settlement, T0).unwrap();
    assert_eq!(store.destroy_key(1).unwrap(), 1);
    assert!(matches!(
        store.destroy_key(1),
        Err(StoreError::KeyDestroyed { key_id: 1 })
    ));
    assert!(matches!(store.destroy_key(9), Err(StoreError::NotFound(_))));
    assert_eq!(values(&store, "m-1"), [(2, 2.0)]);
    assert!(matches!(
        store.envelope(first),
        Err(StoreError::KeyDestroyed { key_id: 1 })
    ));
    let wrapped: Option<Vec<u8>> = store
        .writer()
        .query_row("SELECT wrapped FROM data_keys WHERE id = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(wrapped, None);
    // Freshness still holds for the shredded period: its counter is not reusable.
    assert!(matches!(
        store.commit(&[reading("m-1", 1, 1.5)]).unwrap()[..],
        [Outcome::Replay { last: 2 }]
    ));
}

#[test]
fn a_passphrase_database_opens_with_that_passphrase_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gridward.db");
    let params = KdfParams {
        m_kib: 19 * 1024,
        t: 2,
        p: 1,
    };
    let pass = |p: &str| KeySource::Passphrase {
        passphrase: Arc::new(Zeroizing::new(p.as_bytes().to_vec())),
        params,
    };
    let store = SqliteStore::open(&db, pass("long enough passphrase")).unwrap();
    store.commit(&[reading("m-1", 1, 3.25)]).unwrap();
    drop(store);
    assert!(matches!(
        SqliteStore::open_existing(&db, pass("long enough passphrasf")),
        Err(StoreError::KeyMismatch { .. })
    ));
    assert!(matches!(
        SqliteStore::open_existing(&db, key_for(&db)),
        Err(StoreError::KeyKindMismatch(_))
    ));
    let store = SqliteStore::open_existing(&db, pass("long enough passphrase")).unwrap();
    assert_eq!(values(&store, "m-1"), [(1, 3.25)]);
    assert_eq!(store.key_status().unwrap().kdf, "argon2id");
}

#[test]
fn a_version_4_database_has_its_plaintext_sealed_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gridward.db");
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        schema::migrate(&mut conn, &schema::MIGRATIONS[..4]).unwrap();
        conn.execute(
            "INSERT INTO meters (id, meter_id, last_counter, last_message, last_kwh)
             VALUES (1, 'm-1', 2, 2, 654321.5)",
            [],
        )
        .unwrap();
        for (id, kwh) in [(1, 654320.25), (2, 654321.5)] {
            let envelope = format!(
                "<EnergyUsageReport><EnergyConsumed>{kwh}</EnergyConsumed></EnergyUsageReport>"
            );
            conn.execute(
                "INSERT INTO messages (id, meter, counter, prev, kind, energy_kwh, taken_at,
                     received_at, content_type, envelope, envelope_sha256)
                 VALUES (?1, 1, ?1, ?2, 0, ?3, 0, 0, 'application/xml', ?4, zeroblob(32))",
                rusqlite::params![
                    id,
                    if id == 1 { None } else { Some(1) },
                    kwh,
                    envelope.as_bytes()
                ],
            )
            .unwrap();
        }
    }
    assert!(contains(&file_bytes(&db), b"EnergyConsumed"));
    let store = SqliteStore::open(&db, key_for(&db)).unwrap();
    assert_eq!(values(&store, "m-1"), [(1, 654320.25), (2, 654321.5)]);
    assert_eq!(store.meters().unwrap()[0].last_kwh, Some(654321.5));
    assert_eq!(store.key_status().unwrap().plaintext_messages, 0);
    let bytes = file_bytes(&db);
    assert!(!contains(&bytes, b"EnergyConsumed"));
    assert!(!contains(&bytes, b"EnergyUsageReport"));
    for v in [654320.25f64, 654321.5] {
        assert!(!contains(&bytes, &v.to_le_bytes()), "{v}");
        assert!(!contains(&bytes, &v.to_be_bytes()), "{v}");
    }
}

/// What sealing costs at ingest: 200,000 readings of 10,000 meters committed in batches of
/// 1,000 to a file database, and in the same run the sealing work alone for the same items
/// (three seals per reading: register, last register, envelope; one open of the last
/// register). Prints the share of the commit time spent sealing; run by hand in release:
/// `cargo test --release -p gridward-store sealing_cost -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run by hand"]
fn sealing_cost() {
    const METERS: u64 = 10_000;
    const BATCHES: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let store = SqliteStore::open(&db, key_for(&db)).unwrap();
    let batch = |b: u64| -> Vec<Accepted> {
        (0..1000)
            .map(|i| {
                let n = b * 1000 + i;
                let mut r = reading(&format!("m{:05}", n % METERS), n / METERS + 1, n as f64);
                // An envelope of a meter's size (about 330 bytes).
                r.envelope.resize(330, b'x');
                r
            })
            .collect()
    };
    let batches: Vec<Vec<Accepted>> = (0..BATCHES).map(batch).collect();
    let started = std::time::Instant::now();
    for b in &batches {
        store.commit(b).unwrap();
    }
    let commit = started.elapsed();
    let keys = store.vault.keys(&store.reader()).unwrap();
    let started = std::time::Instant::now();
    let mut bytes = 0usize;
    for b in &batches {
        for item in b {
            let row = ItemRow::new(0, item, &keys.ring).unwrap();
            let last = row.sealed_last.as_deref().unwrap();
            let opened = last_register(&keys.ring, 0, item.meter_id.as_str(), last).unwrap();
            bytes += row.envelope.len() + usize::from(opened.is_some());
        }
    }
    let seal = started.elapsed();
    let n = (BATCHES * 1000) as f64;
    println!(
        "commit with sealing: {:.0} readings/s; sealing alone: {:.0} readings/s ({:.2} µs each); \
         sealing is {:.1} % of the commit time, so without it ingest would be at most {:.2}x ({bytes} bytes sealed)",
        n / commit.as_secs_f64(),
        n / seal.as_secs_f64(),
        seal.as_secs_f64() * 1e6 / n,
        100.0 * seal.as_secs_f64() / commit.as_secs_f64(),
        commit.as_secs_f64() / (commit.as_secs_f64() - seal.as_secs_f64()),
    );
}
