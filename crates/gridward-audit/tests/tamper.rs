//! Tampering with a real audit database through SQL, each way the issue lists; every one must
//! be caught and named at the right entry.

#![allow(clippy::unwrap_used)]

mod common;

use common::{ORIGIN, build, nth, renumber, row, t, write_row};
use gridward_audit::{AuditError, AuditKey, Checkpoint, CheckpointError, Finding, GENESIS, Report};

fn finding(fx: &common::Fixture) -> Option<Finding> {
    let report = fx.log().verify(&fx.verifier).unwrap();
    report.finding
}

#[test]
fn an_untouched_log_verifies_clean() {
    let fx = build();
    let log = fx.log();
    let report = log.verify(&fx.verifier).unwrap();
    assert_eq!(
        report,
        Report {
            entries_checked: 20,
            checkpoints_checked: 2,
            covered: 20,
            finding: None
        }
    );
    let entries = log.all_entries().unwrap();
    assert_eq!(entries.len(), 20);
    assert_eq!(entries[0].prev, GENESIS);
    let sizes: Vec<u64> = log
        .checkpoints()
        .unwrap()
        .iter()
        .map(|n| Checkpoint::open(n, &fx.verifier).unwrap().size)
        .collect();
    assert_eq!(sizes, [10, 20]);
}

#[test]
fn changed_target_is_named() {
    let fx = build();
    fx.attacker()
        .execute("UPDATE entries SET target = 'nobody' WHERE seq = 7", [])
        .unwrap();
    assert_eq!(finding(&fx), Some(Finding::Changed { seq: 7 }));
}

#[test]
fn changed_target_with_recomputed_hash_is_named() {
    let fx = build();
    let conn = fx.attacker();
    let mut e = row(&conn, 7);
    e.target = "nobody".into();
    e.hash = e.compute_hash().unwrap();
    write_row(&conn, &e);
    assert_eq!(finding(&fx), Some(Finding::Changed { seq: 7 }));
}

#[test]
fn changed_last_entry_is_named() {
    let fx = build();
    fx.attacker()
        .execute("UPDATE entries SET outcome = 'denied' WHERE seq = 20", [])
        .unwrap();
    assert_eq!(finding(&fx), Some(Finding::Changed { seq: 20 }));
}

#[test]
fn unparsable_row_is_a_changed_entry() {
    let fx = build();
    fx.attacker()
        .execute("UPDATE entries SET actor = 'root' WHERE seq = 9", [])
        .unwrap();
    assert_eq!(finding(&fx), Some(Finding::Changed { seq: 9 }));
    let fx = build();
    fx.attacker()
        .execute(
            "UPDATE entries SET time = '2026-03-01 12:00:00' WHERE seq = 4",
            [],
        )
        .unwrap();
    assert_eq!(finding(&fx), Some(Finding::Changed { seq: 4 }));
}

#[test]
fn deleted_middle_row_is_named() {
    let fx = build();
    fx.attacker()
        .execute("DELETE FROM entries WHERE seq = 12", [])
        .unwrap();
    assert_eq!(finding(&fx), Some(Finding::Deleted { seq: 12 }));
}

#[test]
fn deleted_rows_renumbered_to_close_the_gap_are_named() {
    let fx = build();
    let conn = fx.attacker();
    conn.execute("DELETE FROM entries WHERE seq IN (5, 6)", [])
        .unwrap();
    renumber(&conn, 6, -2);
    assert_eq!(finding(&fx), Some(Finding::Deleted { seq: 5 }));
}

#[test]
fn deleted_last_rows_are_truncation() {
    let fx = build();
    fx.attacker()
        .execute("DELETE FROM entries WHERE seq >= 18", [])
        .unwrap();
    assert_eq!(
        finding(&fx),
        Some(Finding::Truncated {
            expected: 20,
            found: 17
        })
    );
}

#[test]
fn inserted_forged_row_is_named() {
    let fx = build();
    let conn = fx.attacker();
    let before = row(&conn, 12);
    renumber(&conn, 12, 1);
    let mut forged = row(&conn, 14); // the original entry 13, now at 14
    forged.seq = 13;
    forged.target = "forged".into();
    forged.prev = before.hash;
    forged.hash = forged.compute_hash().unwrap();
    write_row(&conn, &forged);
    assert_eq!(fx.log().all_entries().unwrap().len(), 21);
    assert_eq!(finding(&fx), Some(Finding::Inserted { seq: 13 }));
}

#[test]
fn swapped_rows_are_reordered() {
    let fx = build();
    fx.attacker()
        .execute_batch(
            "UPDATE entries SET seq = -1 WHERE seq = 5;
             UPDATE entries SET seq = 5 WHERE seq = 6;
             UPDATE entries SET seq = 6 WHERE seq = -1;",
        )
        .unwrap();
    assert_eq!(finding(&fx), Some(Finding::Reordered { seq: 5 }));

    let fx = build();
    fx.attacker()
        .execute_batch(
            "UPDATE entries SET seq = -1 WHERE seq = 3;
             UPDATE entries SET seq = 3 WHERE seq = 15;
             UPDATE entries SET seq = 15 WHERE seq = -1;",
        )
        .unwrap();
    assert_eq!(finding(&fx), Some(Finding::Reordered { seq: 3 }));
}

#[test]
fn consistent_rewrite_is_caught_by_the_checkpoints() {
    let fx = build();
    let conn = fx.attacker();
    let mut prev = row(&conn, 3).hash;
    for seq in 4..=20 {
        let mut e = row(&conn, seq);
        if seq == 4 {
            e.detail = "nothing happened".into();
        }
        e.prev = prev;
        e.hash = e.compute_hash().unwrap();
        prev = e.hash;
        write_row(&conn, &e);
    }
    // The chain itself is consistent again ...
    let log = fx.log();
    let no_checkpoints = gridward_audit::verify(&log.all_entries().unwrap(), &[], &fx.verifier);
    assert!(no_checkpoints.is_ok());
    // ... but not with what was signed.
    assert_eq!(finding(&fx), Some(Finding::CheckpointMismatch { size: 10 }));
    // And no new checkpoint is signed over it.
    log.append(&nth(21)).unwrap();
    assert!(matches!(
        log.checkpoint(&fx.key, ORIGIN, t(300)),
        Err(AuditError::Tampered(Finding::CheckpointMismatch {
            size: 20
        }))
    ));
}

#[test]
fn forged_checkpoint_signature_is_named() {
    let fx = build();
    let conn = fx.attacker();
    let note: String = conn
        .query_row("SELECT note FROM checkpoints WHERE id = 2", [], |r| {
            r.get(0)
        })
        .unwrap();
    // Claim the log had only 15 entries at the second checkpoint, keeping the signature.
    let forged = note.replacen("\n20\n", "\n15\n", 1);
    conn.execute("UPDATE checkpoints SET note = ?1 WHERE id = 2", [&forged])
        .unwrap();
    assert_eq!(
        finding(&fx),
        Some(Finding::BadCheckpoint {
            index: 2,
            error: CheckpointError::BadSignature { key: ORIGIN.into() }
        })
    );

    // A checkpoint signed by the attacker's own key under the log's name.
    let fx = build();
    let conn = fx.attacker();
    let mallory = AuditKey::generate().unwrap();
    let head = row(&conn, 15).hash;
    let fake = Checkpoint {
        origin: ORIGIN.into(),
        size: 15,
        head,
        time: t(150),
    }
    .sign(&mallory)
    .unwrap();
    conn.execute("UPDATE checkpoints SET note = ?1 WHERE id = 1", [&fake])
        .unwrap();
    assert_eq!(
        finding(&fx),
        Some(Finding::BadCheckpoint {
            index: 1,
            error: CheckpointError::UnknownKey { key: ORIGIN.into() }
        })
    );
}

#[test]
fn appends_after_tampering_do_not_heal_the_log() {
    let fx = build();
    fx.attacker()
        .execute("UPDATE entries SET target = 'nobody' WHERE seq = 7", [])
        .unwrap();
    let log = fx.log();
    log.append(&nth(21)).unwrap();
    assert_eq!(finding(&fx), Some(Finding::Changed { seq: 7 }));

    // Cut off the end, then keep logging: the entries after the cut are new ones, and the
    // second checkpoint still records the original entry 20.
    let fx = build();
    fx.attacker()
        .execute("DELETE FROM entries WHERE seq >= 18", [])
        .unwrap();
    let log = fx.log();
    log.append_all(&(118..=122).map(nth).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(finding(&fx), Some(Finding::CheckpointMismatch { size: 20 }));
    assert!(matches!(
        log.checkpoint(&fx.key, ORIGIN, t(300)),
        Err(AuditError::Tampered(Finding::CheckpointMismatch {
            size: 20
        }))
    ));

    // An edited hash of the last row: the next append chains from what is stored.
    let fx = build();
    fx.attacker()
        .execute("UPDATE entries SET hash = X'00' WHERE seq = 20", [])
        .unwrap();
    let log = fx.log();
    log.append(&nth(21)).unwrap();
    assert_eq!(finding(&fx), Some(Finding::Changed { seq: 20 }));
}

#[test]
fn the_log_keeps_working_across_reopen() {
    let fx = build();
    let log = fx.log();
    let e = log.append(&nth(21)).unwrap();
    assert_eq!(e.seq, 21);
    assert!(log.checkpoint(&fx.key, ORIGIN, t(300)).unwrap().is_some());
    assert!(log.verify(&fx.verifier).unwrap().is_ok());
}
