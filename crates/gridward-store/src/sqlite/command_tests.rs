//! Tests of [`SqliteStore`] through the [`CommandStore`] trait, and of command acknowledgements
//! through [`Store::commit`].

use std::sync::{Arc, Barrier};

use gridward_core::MeterId;
use gridward_core::command::{CommandId, CommandKind, Refusal};
use gridward_core::document::{EventKind, Format};
use rusqlite::Connection;
use sha2::{Digest, Sha256};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use super::{SqliteStore, schema};
use crate::commands::{
    CampaignState, CommandQuery, CommandStatus, CommandStore, DecideError, Decision, NewCampaign,
    NewCommand, NewFirmware, NewProposal, ProposalStatus,
};
use crate::error::StoreError;
use crate::model::{Accepted, AcceptedBody, MeterEventQuery, Outcome};
use crate::store::Store;

const T0: OffsetDateTime = datetime!(2024-02-06 12:00:00 UTC);

fn mid(s: &str) -> MeterId {
    MeterId::new(s).unwrap()
}

fn cid(n: u8) -> CommandId {
    CommandId([n; 16])
}

/// A command `n` to `meter` with `counter`, valid for an hour from T0; the envelope is derived
/// from `n`.
fn cmd(n: u8, meter: &str, counter: u64) -> NewCommand {
    NewCommand {
        id: cid(n),
        meter_id: mid(meter),
        kind: CommandKind::Disconnect,
        args_json: "{}".to_owned(),
        counter,
        issued_at: T0,
        expires_at: T0 + Duration::hours(1),
        envelope: format!("COSE-command-{n}").into_bytes(),
        issued_by: "alice".to_owned(),
        approved_by: None,
        proposal_id: None,
        campaign_id: None,
    }
}

/// Reserves counters and inserts `cmds` (whose counters must be the next ones per meter).
fn reserve_and_insert(store: &SqliteStore, cmds: &[NewCommand]) {
    let meters: Vec<MeterId> = cmds.iter().map(|c| c.meter_id.clone()).collect();
    let counters = store.reserve_command_counters(&meters).unwrap();
    let got: Vec<u64> = cmds.iter().map(|c| c.counter).collect();
    assert_eq!(
        counters, got,
        "test commands must use the reserved counters"
    );
    store.insert_commands(cmds).unwrap();
}

/// A meter's acknowledgement of `command` under the meter's message `counter`.
fn ack(meter: &str, counter: u64, command: CommandId, refused: Option<Refusal>) -> Accepted {
    Accepted {
        meter_id: mid(meter),
        counter,
        taken_at: T0 + Duration::minutes(5),
        received_at: T0 + Duration::minutes(5) + Duration::microseconds(123_456),
        body: AcceptedBody::CommandAck {
            command_id: command,
            refused,
        },
        envelope: format!("COSE-ack:{meter}:{counter}:{command:?}:{refused:?}").into_bytes(),
        content_type: Format::Json,
        source: None,
    }
}

fn event(meter: &str, counter: u64) -> Accepted {
    Accepted {
        meter_id: mid(meter),
        counter,
        taken_at: T0,
        received_at: T0,
        body: AcceptedBody::Event {
            kind: EventKind::CoverOpened,
        },
        envelope: format!("COSE-event:{meter}:{counter}").into_bytes(),
        content_type: Format::Json,
        source: None,
    }
}

fn status_of(store: &SqliteStore, n: u8) -> CommandStatus {
    store.command(&cid(n)).unwrap().unwrap().status
}

fn proposal(meters: &[&str]) -> NewProposal {
    NewProposal {
        kind: CommandKind::Disconnect,
        args_json: "{}".to_owned(),
        meters: meters.iter().map(|m| mid(m)).collect(),
        proposed_by: "alice".to_owned(),
        created_at: T0,
        expires_at: T0 + Duration::minutes(30),
        reason: "unpaid bills, court order 17".to_owned(),
    }
}

fn firmware(image: &[u8]) -> NewFirmware {
    NewFirmware {
        digest: Sha256::digest(image).into(),
        manifest: b"COSE-manifest".to_vec(),
        image: image.to_vec(),
        vendor_id: "acme".to_owned(),
        class_id: "em-100".to_owned(),
        version: "1.2.0".to_owned(),
        sequence: 5,
        uploaded_by: "alice".to_owned(),
        uploaded_at: T0,
    }
}

fn campaign(firmware_id: i64, meters: &[&str], first_stage: u32) -> NewCampaign {
    NewCampaign {
        firmware_id,
        meters: meters.iter().map(|m| mid(m)).collect(),
        first_stage,
        success_threshold: 0.9,
        max_failures: 2,
        created_by: "alice".to_owned(),
        created_at: T0,
    }
}

#[test]
fn command_counters_strictly_increase_per_meter_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gridward.db");
    {
        let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
        assert_eq!(
            store
                .reserve_command_counters(&[mid("m-1"), mid("m-2"), mid("m-1")])
                .unwrap(),
            vec![1, 1, 2]
        );
        assert_eq!(
            store.reserve_command_counters(&[]).unwrap(),
            Vec::<u64>::new()
        );
        assert_eq!(
            store.reserve_command_counters(&[mid("m-1")]).unwrap(),
            vec![3]
        );
    }
    let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
    assert_eq!(
        store
            .reserve_command_counters(&[mid("m-2"), mid("m-1"), mid("m-3")])
            .unwrap(),
        vec![2, 4, 1]
    );
}

#[test]
fn an_exhausted_command_counter_is_a_typed_error_and_reserves_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    store
        .writer()
        .execute(
            "INSERT INTO command_counters (meter_id, last) VALUES ('m-1', ?1)",
            [i64::MAX],
        )
        .unwrap();
    let err = store
        .reserve_command_counters(&[mid("m-2"), mid("m-1")])
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    // m-2's reservation in the same call was rolled back.
    assert_eq!(
        store.reserve_command_counters(&[mid("m-2")]).unwrap(),
        vec![1]
    );
}

#[test]
fn commands_insert_get_and_list_with_filters_and_cursor() {
    let store = SqliteStore::open_in_memory().unwrap();
    let fw = store.insert_firmware(&firmware(b"image")).unwrap();
    let campaign_id = store.insert_campaign(&campaign(fw, &["m-2"], 1)).unwrap();
    let proposal_id = store.insert_proposal(&proposal(&["m-1"])).unwrap();
    let mut c3 = cmd(3, "m-2", 1);
    c3.campaign_id = Some(campaign_id);
    let mut c4 = cmd(4, "m-1", 3);
    c4.proposal_id = Some(proposal_id);
    c4.approved_by = Some("bob".to_owned());
    c4.kind = CommandKind::SetTariff;
    c4.args_json = r#"{"tariff":"night"}"#.to_owned();
    reserve_and_insert(
        &store,
        &[cmd(1, "m-1", 1), cmd(2, "m-1", 2), c3, c4.clone()],
    );

    let got = store.command(&cid(4)).unwrap().unwrap();
    assert_eq!(got.id, cid(4));
    assert_eq!(got.meter_id, mid("m-1"));
    assert_eq!(got.kind, CommandKind::SetTariff);
    assert_eq!(got.args_json, c4.args_json);
    assert_eq!(got.counter, 3);
    assert_eq!(
        (got.issued_at, got.expires_at),
        (c4.issued_at, c4.expires_at)
    );
    assert_eq!(got.envelope, c4.envelope);
    assert_eq!(got.issued_by, "alice");
    assert_eq!(got.approved_by.as_deref(), Some("bob"));
    assert_eq!(got.proposal_id, Some(proposal_id));
    assert_eq!(got.campaign_id, None);
    assert_eq!(got.status, CommandStatus::Queued);
    assert_eq!((got.sent_at, got.attempts, got.settled_at), (None, 0, None));
    assert_eq!((got.outcome, got.ack_message_id), (None, None));
    assert!(store.command(&cid(99)).unwrap().is_none());

    let ids = |q: &CommandQuery| -> Vec<u8> {
        store
            .commands(q)
            .unwrap()
            .iter()
            .map(|c| c.id.0[0])
            .collect()
    };
    assert_eq!(
        ids(&CommandQuery::default()),
        vec![4, 3, 2, 1],
        "newest first"
    );
    let by_meter = CommandQuery {
        meter_id: Some(mid("m-1")),
        ..CommandQuery::default()
    };
    assert_eq!(ids(&by_meter), vec![4, 2, 1]);
    let page = CommandQuery {
        limit: 2,
        ..by_meter.clone()
    };
    let first = store.commands(&page).unwrap();
    assert_eq!(first.iter().map(|c| c.id.0[0]).collect::<Vec<_>>(), [4, 2]);
    let next = CommandQuery {
        before: first.last().map(|c| c.row),
        ..page.clone()
    };
    assert_eq!(ids(&next), vec![1]);
    assert_eq!(
        ids(&CommandQuery {
            campaign_id: Some(campaign_id),
            ..CommandQuery::default()
        }),
        vec![3]
    );
    assert_eq!(
        ids(&CommandQuery {
            proposal_id: Some(proposal_id),
            ..CommandQuery::default()
        }),
        vec![4]
    );
    store.mark_sent(&cid(2), T0).unwrap();
    assert_eq!(
        ids(&CommandQuery {
            status: Some(CommandStatus::Sent),
            ..CommandQuery::default()
        }),
        vec![2]
    );
    assert_eq!(
        ids(&CommandQuery {
            status: Some(CommandStatus::Queued),
            meter_id: Some(mid("m-1")),
            ..CommandQuery::default()
        }),
        vec![4, 1]
    );
    assert!(
        ids(&CommandQuery {
            limit: 0,
            ..CommandQuery::default()
        })
        .is_empty()
    );
}

#[test]
fn conflicting_or_invalid_commands_are_refused_and_insert_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    reserve_and_insert(&store, &[cmd(1, "m-1", 1)]);
    store
        .reserve_command_counters(&[mid("m-1"), mid("m-1")])
        .unwrap(); // 2, 3
    // Same id again (with a fresh counter), after a valid command of the same batch.
    let err = store
        .insert_commands(&[cmd(2, "m-1", 2), cmd(1, "m-1", 3)])
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("commands.id")),
        "{err:?}"
    );
    assert!(
        store.command(&cid(2)).unwrap().is_none(),
        "batch rolled back"
    );
    // Same meter and counter under another id.
    let err = store.insert_commands(&[cmd(5, "m-1", 1)]).unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("counter")),
        "{err:?}"
    );
    // A counter that was never reserved: for this meter, or for a meter without counters.
    let err = store.insert_commands(&[cmd(6, "m-1", 4)]).unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("not reserved")),
        "{err:?}"
    );
    let err = store.insert_commands(&[cmd(7, "m-9", 1)]).unwrap_err();
    assert!(matches!(&err, StoreError::InvalidRequest(_)), "{err:?}");
    // Counters no reservation hands out.
    for bad in [0, u64::MAX] {
        let err = store.insert_commands(&[cmd(8, "m-1", bad)]).unwrap_err();
        assert!(
            matches!(&err, StoreError::InvalidRequest(_)),
            "{bad}: {err:?}"
        );
    }
    // A proposal or campaign that does not exist.
    let mut c = cmd(10, "m-1", 2);
    c.campaign_id = Some(404);
    let err = store.insert_commands(&[c]).unwrap_err();
    assert!(matches!(&err, StoreError::NotFound(_)), "{err:?}");
    let mut c = cmd(10, "m-1", 2);
    c.proposal_id = Some(404);
    let err = store.insert_commands(&[c]).unwrap_err();
    assert!(matches!(&err, StoreError::NotFound(_)), "{err:?}");
    // Expiry not after issue.
    let mut c = cmd(9, "m-1", 2);
    c.expires_at = c.issued_at;
    let err = store.insert_commands(&[c]).unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("expires")),
        "{err:?}"
    );
    assert_eq!(store.commands(&CommandQuery::default()).unwrap().len(), 1);
    store.insert_commands(&[]).unwrap();
}

#[test]
fn dispatchable_excludes_expired_and_final_and_orders_by_counter() {
    let store = SqliteStore::open_in_memory().unwrap();
    let mut short = cmd(5, "m-1", 4);
    short.expires_at = T0 + Duration::minutes(10);
    reserve_and_insert(
        &store,
        &[
            cmd(1, "m-1", 1),
            cmd(2, "m-1", 2),
            cmd(3, "m-1", 3),
            short,
            cmd(6, "m-0", 1),
        ],
    );
    // Inserted out of counter order.
    store
        .reserve_command_counters(&[mid("m-1"), mid("m-1")])
        .unwrap();
    store
        .insert_commands(&[cmd(8, "m-1", 6), cmd(7, "m-1", 5)])
        .unwrap();
    assert!(store.mark_sent(&cid(2), T0).unwrap());
    assert!(
        store
            .settle_command(&cid(3), CommandStatus::Failed, T0, "meter removed")
            .unwrap()
    );
    let ids = |meter: Option<&MeterId>, now, limit| -> Vec<u8> {
        store
            .dispatchable(meter, now, limit)
            .unwrap()
            .iter()
            .map(|c| c.id.0[0])
            .collect()
    };
    assert_eq!(ids(None, T0, 100), vec![6, 1, 2, 5, 7, 8]);
    assert_eq!(ids(Some(&mid("m-1")), T0, 100), vec![1, 2, 5, 7, 8]);
    assert_eq!(ids(Some(&mid("m-1")), T0, 2), vec![1, 2]);
    // At its expiry instant a command is no longer sent.
    assert_eq!(
        ids(Some(&mid("m-1")), T0 + Duration::minutes(10), 100),
        vec![1, 2, 7, 8]
    );
    assert!(ids(None, T0 + Duration::hours(1), 100).is_empty());
    assert!(ids(None, T0, 0).is_empty());
}

#[test]
fn mark_sent_twice_counts_attempts_and_resends_the_same_bytes() {
    let store = SqliteStore::open_in_memory().unwrap();
    reserve_and_insert(&store, &[cmd(1, "m-1", 1)]);
    let before = store.command(&cid(1)).unwrap().unwrap().envelope;
    assert!(store.mark_sent(&cid(1), T0).unwrap());
    let first = store.dispatchable(None, T0, 10).unwrap();
    assert!(
        store
            .mark_sent(&cid(1), T0 + Duration::seconds(30))
            .unwrap()
    );
    let c = store.command(&cid(1)).unwrap().unwrap();
    assert_eq!(c.status, CommandStatus::Sent);
    assert_eq!(c.attempts, 2);
    assert_eq!(c.sent_at, Some(T0 + Duration::seconds(30)));
    assert_eq!(first[0].envelope, before);
    assert_eq!(c.envelope, before, "a resend is byte-identical");
    // Final or unknown commands are not marked.
    assert!(
        store
            .settle_command(&cid(1), CommandStatus::Expired, T0, "gave up")
            .unwrap()
    );
    assert!(!store.mark_sent(&cid(1), T0).unwrap());
    assert_eq!(store.command(&cid(1)).unwrap().unwrap().attempts, 2);
    assert!(!store.mark_sent(&cid(42), T0).unwrap());
}

#[test]
fn settle_command_only_fails_or_expires_open_commands() {
    let store = SqliteStore::open_in_memory().unwrap();
    reserve_and_insert(&store, &[cmd(1, "m-1", 1)]);
    for status in [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::Acknowledged,
        CommandStatus::Refused,
    ] {
        let err = store.settle_command(&cid(1), status, T0, "x").unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidRequest(_)),
            "{status}: {err:?}"
        );
    }
    assert_eq!(status_of(&store, 1), CommandStatus::Queued);
    let at = T0 + Duration::minutes(2);
    assert!(
        store
            .settle_command(&cid(1), CommandStatus::Failed, at, "meter decommissioned")
            .unwrap()
    );
    let c = store.command(&cid(1)).unwrap().unwrap();
    assert_eq!(c.status, CommandStatus::Failed);
    assert_eq!(c.settled_at, Some(at));
    assert_eq!(c.outcome.as_deref(), Some("meter decommissioned"));
    assert!(
        !store
            .settle_command(&cid(1), CommandStatus::Expired, at, "again")
            .unwrap()
    );
    assert_eq!(status_of(&store, 1), CommandStatus::Failed);
    assert!(
        !store
            .settle_command(&cid(9), CommandStatus::Failed, at, "unknown")
            .unwrap()
    );
}

#[test]
fn expire_commands_settles_open_commands_past_their_expiry() {
    let store = SqliteStore::open_in_memory().unwrap();
    let mut early = cmd(1, "m-1", 1);
    early.expires_at = T0 + Duration::minutes(5);
    let mut early_sent = cmd(2, "m-2", 1);
    early_sent.expires_at = T0 + Duration::minutes(5);
    let mut early_failed = cmd(3, "m-3", 1);
    early_failed.expires_at = T0 + Duration::minutes(5);
    reserve_and_insert(&store, &[early, early_sent, early_failed, cmd(4, "m-1", 2)]);
    store.mark_sent(&cid(2), T0).unwrap();
    store
        .settle_command(&cid(3), CommandStatus::Failed, T0, "x")
        .unwrap();
    assert!(
        store
            .expire_commands(T0 + Duration::minutes(4))
            .unwrap()
            .is_empty()
    );
    let at = T0 + Duration::minutes(5);
    assert_eq!(store.expire_commands(at).unwrap(), vec![cid(1), cid(2)]);
    let c = store.command(&cid(2)).unwrap().unwrap();
    assert_eq!(c.status, CommandStatus::Expired);
    assert_eq!(c.settled_at, Some(at));
    assert!(c.outcome.is_some());
    assert_eq!(status_of(&store, 3), CommandStatus::Failed);
    assert_eq!(status_of(&store, 4), CommandStatus::Queued);
    assert!(store.expire_commands(at).unwrap().is_empty());
}

#[test]
fn an_acknowledgement_settles_its_command_in_the_commit_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gridward.db");
    let (done_id, refused_id, received_at);
    {
        let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
        reserve_and_insert(&store, &[cmd(1, "m-1", 1), cmd(2, "m-1", 2)]);
        store.mark_sent(&cid(1), T0).unwrap();
        store.commit(&[event("m-1", 1)]).unwrap();
        let done = ack("m-1", 2, cid(1), None);
        let refused = ack("m-1", 3, cid(2), Some(Refusal::KindNotAllowed));
        received_at = done.received_at;
        let out = store.commit(&[done.clone(), refused]).unwrap();
        let [Outcome::Stored { id: a }, Outcome::Stored { id: b }] = out[..] else {
            panic!("{out:?}");
        };
        (done_id, refused_id) = (a, b);
        // A byte-identical resend of the acknowledgement is a duplicate; other bytes under the
        // same counter a replay. Neither changes anything.
        let out = store
            .commit(&[done, ack("m-1", 2, cid(1), Some(Refusal::Expired))])
            .unwrap();
        assert_eq!(out, [Outcome::Duplicate, Outcome::Replay { last: 3 }]);
    }
    // Reopened: what the commit promised is on disk.
    let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
    let c1 = store.command(&cid(1)).unwrap().unwrap();
    assert_eq!(c1.status, CommandStatus::Acknowledged);
    assert_eq!(c1.settled_at, Some(received_at), "to the microsecond");
    assert_eq!(c1.ack_message_id, Some(done_id));
    assert_eq!(c1.outcome, None);
    let c2 = store.command(&cid(2)).unwrap().unwrap();
    assert_eq!(c2.status, CommandStatus::Refused);
    assert_eq!(c2.outcome.as_deref(), Some("kind_not_allowed"));
    assert_eq!(c2.ack_message_id, Some(refused_id));
    // Command 2's answer came before its PUBACK was recorded (a race the dispatcher can lose):
    // the answer proves delivery, and the late mark changes nothing.
    assert_eq!((c2.attempts, c2.sent_at), (1, c2.settled_at), "{c2:?}");
    assert!(!store.mark_sent(&cid(2), T0).unwrap());
    assert_eq!(store.command(&cid(2)).unwrap().unwrap().attempts, 1);
    assert_eq!(
        (c1.attempts, c1.sent_at),
        (1, Some(T0)),
        "the recorded send stays"
    );
    // The acknowledgement is stored with its envelope, consumed the counter, is not a meter
    // event and is not forwarded.
    assert_eq!(
        store.envelope(done_id).unwrap().unwrap(),
        ack("m-1", 2, cid(1), None).envelope
    );
    assert_eq!(store.last_counters().unwrap(), vec![(mid("m-1"), 3)]);
    let events = store.meter_events(&MeterEventQuery::default()).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::CoverOpened);
    assert_eq!(store.counts().unwrap().meter_events, 1);
    let t = store.register_outbox_target("billing").unwrap();
    assert!(store.outbox_pending(t, 10).unwrap().is_empty());
    // A final command is not dispatched again.
    assert!(store.dispatchable(None, T0, 10).unwrap().is_empty());
}

#[test]
fn an_acknowledgement_matching_no_open_command_is_stored_and_changes_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    reserve_and_insert(&store, &[cmd(1, "m-1", 1), cmd(2, "m-2", 1)]);
    store
        .settle_command(&cid(2), CommandStatus::Expired, T0, "too late")
        .unwrap();
    let out = store
        .commit(&[
            // Unknown id.
            ack("m-1", 1, cid(77), None),
            // Another meter's command.
            ack("m-2", 1, cid(1), Some(Refusal::WrongMeter)),
            // A command already final.
            ack("m-2", 2, cid(2), None),
        ])
        .unwrap();
    assert!(
        out.iter()
            .all(|o| matches!(o, Outcome::StoredUnmatchedAck { .. })),
        "{out:?}"
    );
    let Outcome::StoredUnmatchedAck { id } = out[0] else {
        unreachable!()
    };
    assert!(store.envelope(id).unwrap().is_some());
    let c1 = store.command(&cid(1)).unwrap().unwrap();
    assert_eq!(
        (c1.status, c1.ack_message_id),
        (CommandStatus::Queued, None)
    );
    let c2 = store.command(&cid(2)).unwrap().unwrap();
    assert_eq!(c2.status, CommandStatus::Expired);
    assert_eq!(c2.outcome.as_deref(), Some("too late"));
    // The counters were consumed like events'.
    assert_eq!(
        store.last_counters().unwrap(),
        vec![(mid("m-1"), 1), (mid("m-2"), 2)]
    );
    assert_eq!(
        store.commit(&[event("m-1", 1)]).unwrap(),
        [Outcome::Replay { last: 1 }]
    );
}

#[test]
fn a_batch_failing_after_an_acknowledgement_leaves_the_command_open() {
    let store = SqliteStore::open_in_memory().unwrap();
    reserve_and_insert(&store, &[cmd(1, "m-1", 1)]);
    store.mark_sent(&cid(1), T0).unwrap();
    store
        .writer()
        .execute_batch(
            "CREATE TRIGGER fail BEFORE INSERT ON messages WHEN NEW.counter = 666
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        )
        .unwrap();
    let err = store
        .commit(&[ack("m-1", 1, cid(1), None), event("m-2", 666)])
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Sqlite(e) if e.to_string().contains("injected")),
        "{err:?}"
    );
    let c = store.command(&cid(1)).unwrap().unwrap();
    assert_eq!((c.status, c.ack_message_id), (CommandStatus::Sent, None));
    assert!(store.last_counters().unwrap().is_empty());
    // The meter's retry then settles it.
    let out = store.commit(&[ack("m-1", 1, cid(1), None)]).unwrap();
    assert!(matches!(out[..], [Outcome::Stored { .. }]), "{out:?}");
    assert_eq!(status_of(&store, 1), CommandStatus::Acknowledged);
}

#[test]
fn a_proposal_is_approved_by_another_operator_once() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = store.insert_proposal(&proposal(&["m-2", "m-1"])).unwrap();
    let p = store.proposal(id).unwrap().unwrap();
    assert_eq!(p.status, ProposalStatus::Pending);
    assert_eq!(
        p.meters,
        vec![mid("m-2"), mid("m-1")],
        "in the order proposed"
    );
    assert_eq!(p.reason, "unpaid bills, court order 17");
    assert_eq!((p.decided_by, p.decided_at, p.note), (None, None, None));

    let err = store
        .decide_proposal(id, Decision::Approve, "alice", T0, None)
        .unwrap_err();
    assert!(matches!(err, DecideError::SameUser), "{err:?}");
    let err = store
        .decide_proposal(id, Decision::Reject, "alice", T0, None)
        .unwrap_err();
    assert!(matches!(err, DecideError::SameUser), "{err:?}");
    assert_eq!(
        store.proposal(id).unwrap().unwrap().status,
        ProposalStatus::Pending
    );

    let at = T0 + Duration::minutes(1);
    let p = store
        .decide_proposal(id, Decision::Approve, "bob", at, Some("checked the order"))
        .unwrap();
    assert_eq!(p.status, ProposalStatus::Approved);
    assert_eq!(p.decided_by.as_deref(), Some("bob"));
    assert_eq!(p.decided_at, Some(at));
    assert_eq!(p.note.as_deref(), Some("checked the order"));
    assert_eq!(store.proposal(id).unwrap().unwrap(), p);

    let err = store
        .decide_proposal(id, Decision::Reject, "carol", at, None)
        .unwrap_err();
    assert!(
        matches!(err, DecideError::NotPending(ProposalStatus::Approved)),
        "{err:?}"
    );
    let err = store
        .decide_proposal(id + 100, Decision::Approve, "bob", at, None)
        .unwrap_err();
    assert!(matches!(err, DecideError::NotFound), "{err:?}");

    let rejected = store.insert_proposal(&proposal(&["m-3"])).unwrap();
    let p = store
        .decide_proposal(rejected, Decision::Reject, "bob", at, None)
        .unwrap();
    assert_eq!(p.status, ProposalStatus::Rejected);
    let ids = |s| -> Vec<i64> {
        store
            .proposals(s, 10)
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect()
    };
    assert_eq!(ids(None), vec![rejected, id], "newest first");
    assert_eq!(ids(Some(ProposalStatus::Approved)), vec![id]);
    assert!(ids(Some(ProposalStatus::Pending)).is_empty());
    assert_eq!(store.proposals(None, 1).unwrap().len(), 1);
}

#[test]
fn deciding_an_expired_proposal_marks_it_expired() {
    let store = SqliteStore::open_in_memory().unwrap();
    let id = store.insert_proposal(&proposal(&["m-1"])).unwrap();
    // At the expiry instant it is expired; even the proposer's attempt records that.
    let at = T0 + Duration::minutes(30);
    let err = store
        .decide_proposal(id, Decision::Approve, "bob", at, None)
        .unwrap_err();
    assert!(matches!(err, DecideError::Expired), "{err:?}");
    let p = store.proposal(id).unwrap().unwrap();
    assert_eq!(p.status, ProposalStatus::Expired);
    assert_eq!((p.decided_by, p.decided_at), (None, Some(at)));
    let err = store
        .decide_proposal(id, Decision::Approve, "bob", T0, None)
        .unwrap_err();
    assert!(
        matches!(err, DecideError::NotPending(ProposalStatus::Expired)),
        "{err:?}"
    );
}

#[test]
fn expire_proposals_marks_only_pending_ones_past_expiry() {
    let store = SqliteStore::open_in_memory().unwrap();
    let a = store.insert_proposal(&proposal(&["m-1"])).unwrap();
    let b = store.insert_proposal(&proposal(&["m-2"])).unwrap();
    let mut later = proposal(&["m-3"]);
    later.expires_at = T0 + Duration::hours(2);
    let c = store.insert_proposal(&later).unwrap();
    store
        .decide_proposal(b, Decision::Approve, "bob", T0, None)
        .unwrap();
    assert!(store.expire_proposals(T0).unwrap().is_empty());
    assert_eq!(
        store.expire_proposals(T0 + Duration::hours(1)).unwrap(),
        vec![a]
    );
    assert_eq!(
        store.proposal(b).unwrap().unwrap().status,
        ProposalStatus::Approved
    );
    assert_eq!(
        store.proposal(c).unwrap().unwrap().status,
        ProposalStatus::Pending
    );
}

#[test]
fn invalid_proposals_are_refused() {
    let store = SqliteStore::open_in_memory().unwrap();
    let err = store
        .insert_proposal(&proposal(&["m-1", "m-2", "m-1"]))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("m-1")),
        "{err:?}"
    );
    let err = store.insert_proposal(&proposal(&[])).unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    let mut p = proposal(&["m-1"]);
    p.expires_at = p.created_at;
    let err = store.insert_proposal(&p).unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    assert!(store.proposals(None, 10).unwrap().is_empty());
}

#[test]
fn two_approvers_racing_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(
            &dir.path().join("gridward.db"),
            super::tests::key_for(&dir.path().join("gridward.db")),
        )
        .unwrap(),
    );
    for round in 0..20 {
        let id = store.insert_proposal(&proposal(&["m-1"])).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = ["bob", "carol"]
            .into_iter()
            .map(|who| {
                let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    store.decide_proposal(id, Decision::Approve, who, T0, None)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let loser = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(
            matches!(loser, DecideError::NotPending(ProposalStatus::Approved)),
            "round {round}: {loser:?}"
        );
        let stored = store.proposal(id).unwrap().unwrap();
        assert_eq!(stored.decided_by, winners[0].decided_by);
    }
}

#[test]
fn firmware_is_stored_once_with_its_image() {
    let store = SqliteStore::open_in_memory().unwrap();
    let image: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let f = firmware(&image);
    let id = store.insert_firmware(&f).unwrap();
    let got = store.firmware(id).unwrap().unwrap();
    assert_eq!(got.id, id);
    assert_eq!(got.digest, f.digest);
    assert_eq!(got.manifest, f.manifest);
    assert_eq!(
        (
            got.vendor_id.as_str(),
            got.class_id.as_str(),
            got.version.as_str()
        ),
        ("acme", "em-100", "1.2.0")
    );
    assert_eq!(got.sequence, 5);
    assert_eq!((got.uploaded_by.as_str(), got.uploaded_at), ("alice", T0));
    assert_eq!(got.size, 100_000);
    assert_eq!(store.firmware_image(id).unwrap().unwrap(), image);
    assert!(store.firmware(id + 1).unwrap().is_none());
    assert!(store.firmware_image(id + 1).unwrap().is_none());

    let err = store.insert_firmware(&f).unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("digest")),
        "{err:?}"
    );
    let mut wrong = firmware(b"other image");
    wrong.digest = f.digest;
    let err = store.insert_firmware(&wrong).unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidRequest(m) if m.contains("SHA-256")),
        "{err:?}"
    );

    let second = store.insert_firmware(&firmware(b"version 2")).unwrap();
    let all: Vec<i64> = store.firmwares().unwrap().iter().map(|f| f.id).collect();
    assert_eq!(all, vec![id, second]);
}

#[test]
fn a_campaign_splits_its_meters_into_stages_and_tracks_commands() {
    let store = SqliteStore::open_in_memory().unwrap();
    let fw = store.insert_firmware(&firmware(b"image")).unwrap();
    let id = store
        .insert_campaign(&campaign(fw, &["m-3", "m-1", "m-2", "m-4"], 2))
        .unwrap();
    let c = store.campaign(id).unwrap().unwrap();
    assert_eq!((c.firmware_id, c.first_stage, c.max_failures), (fw, 2, 2));
    assert_eq!((c.state, c.stage), (CampaignState::Running, 1));
    assert_eq!((c.updated_at, c.note.as_deref()), (T0, None));
    assert!((c.success_threshold - 0.9).abs() < f64::EPSILON);
    let members = store.campaign_members(id).unwrap();
    let stages: Vec<(&str, u32)> = members
        .iter()
        .map(|m| (m.meter_id.as_str(), m.stage))
        .collect();
    assert_eq!(stages, [("m-3", 1), ("m-1", 1), ("m-2", 2), ("m-4", 2)]);
    assert!(
        members
            .iter()
            .all(|m| m.command_id.is_none() && m.status.is_none())
    );

    let mut c1 = cmd(1, "m-3", 1);
    c1.kind = CommandKind::FirmwareUpdate;
    c1.campaign_id = Some(id);
    reserve_and_insert(&store, &[c1]);
    store
        .set_campaign_member_command(id, &mid("m-3"), &cid(1))
        .unwrap();
    store
        .commit(&[ack("m-3", 1, cid(1), Some(Refusal::FirmwareRollback))])
        .unwrap();
    let m = &store.campaign_members(id).unwrap()[0];
    assert_eq!(m.command_id, Some(cid(1)));
    assert_eq!(m.status, Some(CommandStatus::Refused));
    assert_eq!(m.outcome.as_deref(), Some("firmware_rollback"));
    // A member whose command was recorded but is not stored (yet) has no status.
    store
        .set_campaign_member_command(id, &mid("m-1"), &cid(2))
        .unwrap();
    let m = &store.campaign_members(id).unwrap()[1];
    assert_eq!((m.command_id, m.status), (Some(cid(2)), None));

    let later = T0 + Duration::hours(1);
    store
        .set_campaign_state(id, CampaignState::Paused, 1, later, Some("2 failures"))
        .unwrap();
    let c = store.campaign(id).unwrap().unwrap();
    assert_eq!(
        (c.state, c.stage, c.updated_at),
        (CampaignState::Paused, 1, later)
    );
    assert_eq!(c.note.as_deref(), Some("2 failures"));

    let err = store
        .set_campaign_member_command(id, &mid("m-9"), &cid(3))
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    let err = store
        .set_campaign_state(id + 1, CampaignState::Running, 2, later, None)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    for stage in [0, 3] {
        let err = store
            .set_campaign_state(id, CampaignState::Running, stage, later, None)
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidRequest(_)),
            "{stage}: {err:?}"
        );
    }
    assert!(store.campaign(id + 1).unwrap().is_none());
    assert!(store.campaign_members(id + 1).unwrap().is_empty());

    // A pilot larger than the fleet puts everyone in stage 1.
    let all_pilot = store
        .insert_campaign(&campaign(fw, &["m-1", "m-2"], 10))
        .unwrap();
    assert!(
        store
            .campaign_members(all_pilot)
            .unwrap()
            .iter()
            .all(|m| m.stage == 1)
    );
    let ids: Vec<i64> = store.campaigns().unwrap().iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![id, all_pilot]);
}

#[test]
fn invalid_campaigns_are_refused() {
    let store = SqliteStore::open_in_memory().unwrap();
    let err = store
        .insert_campaign(&campaign(1, &["m-1"], 1))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m.contains("firmware")),
        "{err:?}"
    );
    let fw = store.insert_firmware(&firmware(b"image")).unwrap();
    let err = store
        .insert_campaign(&campaign(fw, &["m-1", "m-1"], 1))
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = store.insert_campaign(&campaign(fw, &[], 1)).unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    for threshold in [-0.1, 1.5, f64::NAN] {
        let mut c = campaign(fw, &["m-1"], 1);
        c.success_threshold = threshold;
        let err = store.insert_campaign(&c).unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidRequest(_)),
            "{threshold}: {err:?}"
        );
    }
    assert!(store.campaigns().unwrap().is_empty());
}

#[test]
fn a_version_2_database_is_migrated_with_its_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    {
        let mut conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        assert_eq!(
            schema::migrate(&mut conn, &schema::MIGRATIONS[..2]).unwrap(),
            2
        );
        // A meter with one stored event, as version 2 wrote it.
        conn.execute_batch(
            "INSERT INTO meters (id, meter_id, last_counter, last_message) VALUES (1, 'm-1', 1, 1);
             INSERT INTO messages (id, meter, counter, kind, event_kind, taken_at, received_at,
                                   content_type, envelope, envelope_sha256)
             VALUES (1, 1, 1, 1, 'CoverOpened', 0, 0, 'application/json', x'00', zeroblob(32));",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, super::tests::key_for(&path)).unwrap();
    let version: i64 = store
        .writer()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::SCHEMA_VERSION);
    assert_eq!(
        store
            .meter_events(&MeterEventQuery::default())
            .unwrap()
            .len(),
        1
    );
    reserve_and_insert(&store, &[cmd(1, "m-1", 1)]);
    let out = store.commit(&[ack("m-1", 2, cid(1), None)]).unwrap();
    assert!(matches!(out[..], [Outcome::Stored { .. }]), "{out:?}");
    assert_eq!(status_of(&store, 1), CommandStatus::Acknowledged);
}

#[test]
fn command_queries_use_their_indexes() {
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
            "SELECT seq FROM commands INDEXED BY commands_open
             WHERE status IN ('queued', 'sent') AND expires_at > 0
             ORDER BY meter_id, counter LIMIT 5",
            "commands_open",
        ),
        (
            "SELECT seq FROM commands INDEXED BY commands_open
             WHERE status IN ('queued', 'sent') AND meter_id = 'm'
             AND expires_at > 0 ORDER BY meter_id, counter LIMIT 5",
            "commands_open",
        ),
        (
            "SELECT id FROM commands INDEXED BY commands_expiry
             WHERE status IN ('queued', 'sent') AND expires_at <= 0 ORDER BY seq",
            "commands_expiry",
        ),
        (
            "SELECT seq FROM commands WHERE 1 AND meter_id = 'm' ORDER BY seq DESC LIMIT 5",
            "commands_meter",
        ),
        (
            "SELECT seq FROM commands WHERE 1 AND status = 'sent' ORDER BY seq DESC LIMIT 5",
            "commands_status",
        ),
        (
            "SELECT seq FROM commands WHERE 1 AND campaign_id = 1 ORDER BY seq DESC LIMIT 5",
            "commands_campaign",
        ),
        (
            "SELECT id FROM proposals INDEXED BY proposals_pending
             WHERE status = 'pending' AND expires_at <= 0 ORDER BY id",
            "proposals_pending",
        ),
    ];
    for (sql, index) in cases {
        let p = plan(sql);
        assert!(p.contains(index), "{sql}: {p}");
        // Pages are read in index order; the sweeps sort only what expired.
        if sql.contains("LIMIT") {
            assert!(!p.contains("TEMP B-TREE"), "{sql}: {p}");
        }
    }
}
