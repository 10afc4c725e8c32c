//! The command service against the real SQLite store and an in-memory double of the MQTT link
//! (a channel that records every publication and lets the test answer it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use bytes::Bytes;
use gridward_audit::{Actor, NewEntry, Outcome as AuditOutcome};
use gridward_command::{
    AckEffect, Approver, CampaignError, CampaignRequest, CommandError, Commands, Delivery,
    Dispatcher, FirmwareUploadError, IssueRequest, Issued, NotReachable, Policy, ProposalError,
    Transport,
};
use gridward_core::MeterId;
use gridward_core::command::{
    self, AckOutcome, CommandBody, CommandId, CommandKind, Refusal, TrustedSigner, VerifyContext,
};
use gridward_core::document::Format;
use gridward_core::envelope::{SigningKey, VerifyingKey};
use gridward_core::firmware::{self, Chunk, FirmwareError, Manifest};
use gridward_store::{
    Accepted, AcceptedBody, CampaignState, CommandQuery, CommandStatus, CommandStore,
    ProposalStatus, SqliteStore, Store,
};
use sha2::{Digest, Sha256};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const T0: OffsetDateTime = datetime!(2025-03-01 12:00:00 UTC);

fn m(i: usize) -> MeterId {
    MeterId::new(&format!("MTR-{i:05}")).unwrap()
}

fn meters(n: usize) -> Vec<MeterId> {
    (0..n).map(m).collect()
}

fn new_key() -> SigningKey {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    SigningKey::from_pkcs8_der(doc.as_ref()).unwrap()
}

/// A clock at `T0 + offset`, plus the tokio time elapsed since `start` when the test runs on
/// tokio's paused clock.
struct TestClock {
    offset: Mutex<Duration>,
    start: Option<Instant>,
}

impl TestClock {
    fn now(&self) -> OffsetDateTime {
        let mut t = T0 + *self.offset.lock().unwrap();
        if let Some(start) = self.start {
            t += Instant::now() - start;
        }
        t
    }

    fn advance(&self, d: Duration) {
        *self.offset.lock().unwrap() += d;
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: Arc<SqliteStore>,
    commands: Arc<Commands>,
    key: Arc<SigningKey>,
    clock: Arc<TestClock>,
    audit: Arc<Mutex<Vec<NewEntry>>>,
    disabled: Arc<Mutex<HashSet<String>>>,
    /// The meter's own message counter for acknowledgements, per harness.
    ack_counter: AtomicU64,
}

impl Harness {
    fn new() -> Self {
        Self::build(Policy::default(), false)
    }

    fn build(policy: Policy, tokio_clock: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gridward.db");
        let store = Arc::new(
            SqliteStore::open(
                &path,
                gridward_store::KeySource::file(path.with_extension("key")),
            )
            .unwrap(),
        );
        let key = Arc::new(new_key());
        let clock = Arc::new(TestClock {
            offset: Mutex::new(Duration::ZERO),
            start: tokio_clock.then(Instant::now),
        });
        let audit = Arc::new(Mutex::new(Vec::new()));
        let disabled: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
        let recorder = {
            let audit = Arc::clone(&audit);
            move |e: NewEntry| audit.lock().unwrap().push(e)
        };
        let proposers = {
            let disabled = Arc::clone(&disabled);
            move |u: &str| !disabled.lock().unwrap().contains(u)
        };
        let c = Arc::clone(&clock);
        let commands = Arc::new(
            Commands::new(
                store.clone() as Arc<dyn CommandStore>,
                Arc::clone(&key),
                Arc::new(move || c.now()),
                Arc::new(recorder),
                Arc::new(proposers),
                policy,
            )
            .unwrap(),
        );
        Self {
            _dir: dir,
            path,
            store,
            commands,
            key,
            clock,
            audit,
            disabled,
            ack_counter: AtomicU64::new(1),
        }
    }

    fn issue(
        &self,
        meters: Vec<MeterId>,
        body: CommandBody,
        actor: &str,
    ) -> Result<Issued, CommandError> {
        self.commands.issue(IssueRequest {
            meters,
            body,
            actor: actor.to_owned(),
            ttl: None,
            reason: "test".to_owned(),
        })
    }

    fn queued(&self, meters: Vec<MeterId>, body: CommandBody) -> Vec<CommandId> {
        match self.issue(meters, body, "alice").unwrap() {
            Issued::Queued { ids } => ids,
            other => panic!("expected queued, got {other:?}"),
        }
    }

    fn status(&self, id: &CommandId) -> CommandStatus {
        self.store.command(id).unwrap().unwrap().status
    }

    /// The meter's signed acknowledgement, stored as the head-end would, then reported.
    fn ack(&self, meter: &MeterId, id: &CommandId, refused: Option<Refusal>) -> AckEffect {
        let counter = self.ack_counter.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now();
        let outcome = self
            .store
            .commit(&[Accepted {
                meter_id: meter.clone(),
                counter,
                taken_at: now,
                received_at: now,
                body: AcceptedBody::CommandAck {
                    command_id: *id,
                    refused,
                },
                envelope: format!("ack:{meter}:{counter}").into_bytes(),
                content_type: Format::Json,
                source: None,
            }])
            .unwrap();
        assert!(
            matches!(outcome[0], gridward_store::Outcome::Stored { .. }),
            "{outcome:?}"
        );
        let outcome = match refused {
            None => AckOutcome::Done { detail: None },
            Some(r) => AckOutcome::Refused(r),
        };
        self.commands.on_ack(meter, id, &outcome).unwrap()
    }

    fn entries(&self, action: &str) -> Vec<NewEntry> {
        self.audit
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.action == action)
            .cloned()
            .collect()
    }

    fn operator(name: &str) -> Approver {
        Approver {
            username: name.to_owned(),
            role_is_operator: true,
        }
    }

    fn verify(&self, bytes: &[u8], meter: &MeterId, last: Option<u64>) -> command::Command {
        let signer = TrustedSigner {
            key: self.key.verifying_key().unwrap(),
            not_before: T0 - Duration::days(1),
            not_after: T0 + Duration::days(365),
        };
        let topic = meter.commands_topic();
        command::verify(
            bytes,
            &VerifyContext {
                meter_id: meter,
                topic: &topic,
                signers: &[signer],
                last_counter: last,
                now: self.clock.now(),
                allowed: &CommandKind::ALL,
                max_skew_secs: 60,
            },
        )
        .unwrap()
        .into_command()
    }
}

// ---------------------------------------------------------------- fake transport

#[derive(Debug)]
struct Publication {
    meter: MeterId,
    topic: String,
    payload: Bytes,
    reply: Option<oneshot::Sender<Delivery>>,
}

/// The MQTT link's double: reachable meters are a set; every publication is logged and either
/// answered at once (`auto`) or handed to the test through a channel.
struct FakeTransport {
    reachable: Mutex<HashSet<MeterId>>,
    auto: Mutex<Option<Delivery>>,
    tx: mpsc::UnboundedSender<Publication>,
    log: Mutex<Vec<(Instant, MeterId, String, Bytes)>>,
}

impl FakeTransport {
    fn new(auto: Option<Delivery>) -> (Arc<Self>, mpsc::UnboundedReceiver<Publication>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                reachable: Mutex::new(HashSet::new()),
                auto: Mutex::new(auto),
                tx,
                log: Mutex::new(Vec::new()),
            }),
            rx,
        )
    }

    fn set_reachable(&self, meter: &MeterId, yes: bool) {
        let mut r = self.reachable.lock().unwrap();
        if yes {
            r.insert(meter.clone());
        } else {
            r.remove(meter);
        }
    }

    fn sends(&self) -> Vec<(Instant, MeterId, String, Bytes)> {
        self.log.lock().unwrap().clone()
    }
}

impl Transport for FakeTransport {
    fn is_reachable(&self, meter: &MeterId) -> bool {
        self.reachable.lock().unwrap().contains(meter)
    }

    fn send(
        &self,
        meter: &MeterId,
        topic: String,
        payload: Bytes,
    ) -> Result<oneshot::Receiver<Delivery>, NotReachable> {
        if !self.is_reachable(meter) {
            return Err(NotReachable);
        }
        let (reply, rx) = oneshot::channel();
        let at = Instant::now();
        self.log
            .lock()
            .unwrap()
            .push((at, meter.clone(), topic.clone(), payload.clone()));
        let reply = match *self.auto.lock().unwrap() {
            Some(d) => {
                let _ = reply.send(d);
                None
            }
            None => Some(reply),
        };
        let _ = self.tx.send(Publication {
            meter: meter.clone(),
            topic,
            payload,
            reply,
        });
        Ok(rx)
    }
}

fn start_dispatcher(
    h: &Harness,
    t: &Arc<FakeTransport>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let d = Dispatcher::new(Arc::clone(&h.commands), Arc::clone(t) as Arc<dyn Transport>);
    let handle = tokio::spawn(d.run(stop.clone()));
    (stop, handle)
}

async fn next_publication(rx: &mut mpsc::UnboundedReceiver<Publication>) -> Publication {
    tokio::time::timeout(StdDuration::from_secs(120), rx.recv())
        .await
        .expect("a publication within two minutes")
        .expect("transport alive")
}

/// Lets the dispatcher run (virtual time) for `secs` seconds.
async fn idle(secs: u64) {
    tokio::time::sleep(StdDuration::from_secs(secs)).await;
}

// ---------------------------------------------------------------- issuing

#[test]
fn counters_are_durable_before_sending_and_strictly_increase() {
    let h = Harness::new();
    let a = m(1);
    let ids = h.queued(vec![a.clone()], CommandBody::ReadNow);
    let more = h.queued(vec![a.clone(), m(2)], CommandBody::ReadNow);
    let again = h.queued(
        vec![a.clone()],
        CommandBody::SetReportingInterval { seconds: 900 },
    );
    let counters: Vec<u64> = [ids[0], more[0], again[0]]
        .iter()
        .map(|id| h.store.command(id).unwrap().unwrap().counter)
        .collect();
    assert_eq!(counters, vec![1, 2, 3]);
    assert_eq!(h.store.command(&more[1]).unwrap().unwrap().counter, 1);

    // Nothing was sent (no dispatcher), yet every counter is in the file: a second process
    // opening it sees the commands, and the next counter continues after them.
    let reopened = SqliteStore::open(
        &h.path,
        gridward_store::KeySource::file(h.path.with_extension("key")),
    )
    .unwrap();
    let stored = reopened.command(&again[0]).unwrap().unwrap();
    assert_eq!(stored.status, CommandStatus::Queued);
    assert_eq!(
        reopened
            .reserve_command_counters(std::slice::from_ref(&a))
            .unwrap(),
        vec![4]
    );
    // The counter reserved by the other process is never reused.
    let after = h.queued(vec![a.clone()], CommandBody::ReadNow);
    assert_eq!(h.store.command(&after[0]).unwrap().unwrap().counter, 5);

    // The signed bytes carry the same counter, target, whole-second times and the key.
    let cmd = h.verify(&stored.envelope, &a, Some(2));
    assert_eq!(cmd.counter, 3);
    assert_eq!(cmd.meter_id, a);
    assert_eq!(cmd.body, CommandBody::SetReportingInterval { seconds: 900 });
    assert_eq!(cmd.issued_at, T0);
    assert_eq!(cmd.expires_at, T0 + Duration::hours(1));
    assert_eq!(stored.issued_by, "alice");
    assert_eq!(stored.approved_by, None);
    assert_eq!(h.entries("command.issue").len(), 5);
}

#[test]
fn issue_times_are_whole_seconds() {
    let h = Harness::new();
    h.clock.advance(Duration::milliseconds(1_750));
    let ids = h.queued(vec![m(1)], CommandBody::ReadNow);
    let c = h.store.command(&ids[0]).unwrap().unwrap();
    assert_eq!(c.issued_at, T0 + Duration::seconds(1));
    assert_eq!(c.expires_at, T0 + Duration::seconds(1) + Duration::hours(1));
}

#[test]
fn invalid_requests_are_refused_typed_and_audited() {
    let h = Harness::new();
    let req = |meters: Vec<MeterId>, body: CommandBody, actor: &str, ttl: Option<Duration>| {
        IssueRequest {
            meters,
            body,
            actor: actor.to_owned(),
            ttl,
            reason: String::new(),
        }
    };
    let e = h
        .commands
        .issue(req(vec![], CommandBody::ReadNow, "alice", None));
    assert!(matches!(e, Err(CommandError::NoMeters)), "{e:?}");
    let e = h
        .commands
        .issue(req(vec![m(1), m(1)], CommandBody::ReadNow, "alice", None));
    assert!(
        matches!(&e, Err(CommandError::DuplicateMeter(x)) if *x == m(1)),
        "{e:?}"
    );
    let e = h
        .commands
        .issue(req(vec![m(1)], CommandBody::ReadNow, "", None));
    assert!(matches!(e, Err(CommandError::NoActor)), "{e:?}");
    let e = h.commands.issue(req(
        vec![m(1)],
        CommandBody::ReadNow,
        "alice",
        Some(Duration::ZERO),
    ));
    assert!(
        matches!(
            e,
            Err(CommandError::InvalidTtl {
                requested_secs: 0,
                ..
            })
        ),
        "{e:?}"
    );
    let e = h.commands.issue(req(
        vec![m(1)],
        CommandBody::ReadNow,
        "alice",
        Some(Duration::days(8)),
    ));
    assert!(matches!(e, Err(CommandError::InvalidTtl { .. })), "{e:?}");
    let e = h.commands.issue(req(
        vec![m(1)],
        CommandBody::SetTariff {
            tariff: "no spaces allowed".into(),
        },
        "alice",
        None,
    ));
    assert!(matches!(e, Err(CommandError::InvalidArguments(_))), "{e:?}");
    let e = h.commands.issue(req(
        vec![m(1)],
        CommandBody::SetReportingInterval { seconds: 0 },
        "alice",
        None,
    ));
    assert!(matches!(e, Err(CommandError::InvalidArguments(_))), "{e:?}");
    let e = h.commands.issue(req(
        vec![m(1)],
        CommandBody::FirmwareUpdate {
            manifest: b"not uploaded".to_vec(),
        },
        "alice",
        None,
    ));
    assert!(matches!(e, Err(CommandError::FirmwareNotStored)), "{e:?}");
    let policy = Policy {
        max_meters_per_request: 3,
        ..Policy::default()
    };
    let small = Harness::build(policy, false);
    let e = small.issue(meters(4), CommandBody::ReadNow, "alice");
    assert!(
        matches!(e, Err(CommandError::TooManyMeters { count: 4, max: 3 })),
        "{e:?}"
    );

    // Nothing was stored, everything was audited as a failure.
    assert!(
        h.store
            .commands(&CommandQuery::default())
            .unwrap()
            .is_empty()
    );
    let failures = h.entries("command.issue");
    assert_eq!(failures.len(), 8);
    assert!(failures.iter().all(|e| e.outcome == AuditOutcome::Failure));
    assert_eq!(failures[0].actor, Actor::User("alice".into()));
}

#[test]
fn signer_rotation_signs_new_commands_with_the_new_key_only() {
    let h = Harness::new();
    let old = h.queued(vec![m(1)], CommandBody::ReadNow);
    let new_key = Arc::new(new_key());
    h.commands
        .set_signer(Arc::clone(&new_key), Actor::User("root".into()));
    let new = h.queued(vec![m(1)], CommandBody::ReadNow);
    let kid = |id: &CommandId| h.store.command(id).unwrap().unwrap().envelope;
    // The old command verifies under the old key, the new one under the new key only.
    assert_eq!(h.verify(&kid(&old[0]), &m(1), None).counter, 1);
    let signer = TrustedSigner {
        key: new_key.verifying_key().unwrap(),
        not_before: T0 - Duration::days(1),
        not_after: T0 + Duration::days(1),
    };
    let topic = m(1).commands_topic();
    let ctx = VerifyContext {
        meter_id: &m(1),
        topic: &topic,
        signers: std::slice::from_ref(&signer),
        last_counter: None,
        now: T0,
        allowed: &CommandKind::ALL,
        max_skew_secs: 60,
    };
    assert_eq!(
        command::verify(&kid(&new[0]), &ctx)
            .unwrap()
            .command()
            .counter,
        2
    );
    assert_eq!(
        command::verify(&kid(&old[0]), &ctx).unwrap_err().reason,
        Refusal::UnknownSigner
    );
    assert_eq!(h.entries("command.signer_rotate").len(), 1);
}

// ---------------------------------------------------------------- four eyes

#[test]
fn ten_disconnects_or_eleven_read_now_are_queued_directly() {
    let h = Harness::new();
    let ids = h.queued(meters(10), CommandBody::Disconnect);
    assert_eq!(ids.len(), 10);
    let ids = h.queued(meters(11), CommandBody::ReadNow);
    assert_eq!(ids.len(), 11);
    assert!(h.store.proposals(None, 10).unwrap().is_empty());
}

#[test]
fn eleven_disconnects_need_a_second_operator() {
    let h = Harness::new();
    let targets = meters(11);
    let Issued::Proposed {
        proposal_id,
        expires_at,
    } = h
        .issue(targets.clone(), CommandBody::Disconnect, "alice")
        .unwrap()
    else {
        panic!("expected a proposal");
    };
    assert_eq!(expires_at, T0 + Duration::minutes(30));
    assert!(
        h.store
            .commands(&CommandQuery::default())
            .unwrap()
            .is_empty()
    );
    assert_eq!(h.entries("proposal.create").len(), 1);

    // The proposer cannot approve their own proposal.
    let e = h
        .commands
        .approve(proposal_id, &Harness::operator("alice"), None);
    assert!(matches!(e, Err(ProposalError::SameUser)), "{e:?}");
    // An auditor cannot approve.
    let auditor = Approver {
        username: "carol".into(),
        role_is_operator: false,
    };
    let e = h.commands.approve(proposal_id, &auditor, None);
    assert!(
        matches!(&e, Err(ProposalError::NotOperator(u)) if u == "carol"),
        "{e:?}"
    );
    let e = h.commands.reject(proposal_id, &auditor, None);
    assert!(matches!(e, Err(ProposalError::NotOperator(_))), "{e:?}");
    let e = h.commands.approve(999, &Harness::operator("bob"), None);
    assert!(matches!(e, Err(ProposalError::NotFound(999))), "{e:?}");
    assert!(
        h.store
            .commands(&CommandQuery::default())
            .unwrap()
            .is_empty()
    );

    // A second operator approves: eleven commands with both identities.
    let approval = h
        .commands
        .approve(proposal_id, &Harness::operator("bob"), Some("checked"))
        .unwrap();
    assert_eq!(approval.ids.len(), 11);
    assert_eq!(approval.proposal.status, ProposalStatus::Approved);
    for (id, meter) in approval.ids.iter().zip(&targets) {
        let c = h.store.command(id).unwrap().unwrap();
        assert_eq!(c.status, CommandStatus::Queued);
        assert_eq!(&c.meter_id, meter);
        assert_eq!(c.kind, CommandKind::Disconnect);
        assert_eq!(c.issued_by, "alice");
        assert_eq!(c.approved_by.as_deref(), Some("bob"));
        assert_eq!(c.proposal_id, Some(proposal_id));
        assert_eq!(
            h.verify(&c.envelope, meter, None).body,
            CommandBody::Disconnect
        );
    }
    // Deciding again: the first decision stands.
    let e = h
        .commands
        .approve(proposal_id, &Harness::operator("dave"), None);
    assert!(
        matches!(e, Err(ProposalError::NotPending(ProposalStatus::Approved))),
        "{e:?}"
    );

    // Audit: denials with outcome denied, the approval with both names.
    let approvals = h.entries("proposal.approve");
    let denied: Vec<_> = approvals
        .iter()
        .filter(|e| e.outcome == AuditOutcome::Denied)
        .collect();
    assert_eq!(denied.len(), 3, "{approvals:#?}"); // same user, auditor, not pending
    let ok: Vec<_> = approvals
        .iter()
        .filter(|e| e.outcome == AuditOutcome::Success)
        .collect();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].actor, Actor::User("bob".into()));
    assert!(
        ok[0].detail.contains("proposed by alice"),
        "{}",
        ok[0].detail
    );
    let issued = h.entries("command.issue");
    assert_eq!(issued.len(), 11);
    assert!(
        issued
            .iter()
            .all(|e| e.detail.contains("issued by alice") && e.detail.contains("approved by bob"))
    );
}

#[test]
fn approval_after_the_window_is_refused() {
    let h = Harness::new();
    let Issued::Proposed { proposal_id, .. } = h
        .issue(meters(11), CommandBody::Disconnect, "alice")
        .unwrap()
    else {
        panic!()
    };
    h.clock.advance(Duration::minutes(30));
    let e = h
        .commands
        .approve(proposal_id, &Harness::operator("bob"), None);
    assert!(matches!(e, Err(ProposalError::Expired)), "{e:?}");
    assert_eq!(
        h.store.proposal(proposal_id).unwrap().unwrap().status,
        ProposalStatus::Expired
    );
    assert!(
        h.store
            .commands(&CommandQuery::default())
            .unwrap()
            .is_empty()
    );
    let denied = h.entries("proposal.approve");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].outcome, AuditOutcome::Denied);
}

#[test]
fn expire_due_expires_and_audits_pending_proposals() {
    let h = Harness::new();
    let Issued::Proposed { proposal_id, .. } = h
        .issue(meters(12), CommandBody::Disconnect, "alice")
        .unwrap()
    else {
        panic!()
    };
    assert!(h.commands.expire_due().unwrap().is_empty());
    h.clock.advance(Duration::minutes(31));
    assert_eq!(h.commands.expire_due().unwrap(), vec![proposal_id]);
    let e = h.entries("proposal.expire");
    assert_eq!(e.len(), 1);
    assert!(e[0].detail.contains("proposed by alice"), "{}", e[0].detail);
}

#[test]
fn approval_after_the_proposer_was_disabled_is_refused_and_rejects() {
    let h = Harness::new();
    let Issued::Proposed { proposal_id, .. } = h
        .issue(meters(11), CommandBody::Disconnect, "alice")
        .unwrap()
    else {
        panic!()
    };
    h.disabled.lock().unwrap().insert("alice".into());
    let e = h
        .commands
        .approve(proposal_id, &Harness::operator("bob"), None);
    assert!(
        matches!(&e, Err(ProposalError::ProposerNotEligible(u)) if u == "alice"),
        "{e:?}"
    );
    let p = h.store.proposal(proposal_id).unwrap().unwrap();
    assert_eq!(p.status, ProposalStatus::Rejected);
    assert_eq!(p.note.as_deref(), Some("proposer disabled"));
    assert!(
        h.store
            .commands(&CommandQuery::default())
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        h.entries("proposal.approve")[0].outcome,
        AuditOutcome::Denied
    );
    assert_eq!(h.entries("proposal.reject").len(), 1);
}

#[test]
fn reject_by_a_second_operator() {
    let h = Harness::new();
    let Issued::Proposed { proposal_id, .. } = h
        .issue(meters(11), CommandBody::Disconnect, "alice")
        .unwrap()
    else {
        panic!()
    };
    let e = h
        .commands
        .reject(proposal_id, &Harness::operator("alice"), None);
    assert!(matches!(e, Err(ProposalError::SameUser)), "{e:?}");
    let p = h
        .commands
        .reject(proposal_id, &Harness::operator("bob"), Some("wrong feeder"))
        .unwrap();
    assert_eq!(p.status, ProposalStatus::Rejected);
    assert_eq!(p.decided_by.as_deref(), Some("bob"));
    let e = h
        .commands
        .approve(proposal_id, &Harness::operator("dave"), None);
    assert!(
        matches!(e, Err(ProposalError::NotPending(ProposalStatus::Rejected))),
        "{e:?}"
    );
    let r = h.entries("proposal.reject");
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].outcome, AuditOutcome::Denied);
    assert_eq!(r[1].outcome, AuditOutcome::Success);
    assert!(r[1].detail.contains("proposed by alice") && r[1].detail.contains("rejected by bob"));
}

// ---------------------------------------------------------------- dispatch

#[tokio::test(start_paused = true)]
async fn resend_after_lost_is_byte_identical() {
    let h = Harness::build(Policy::default(), true);
    let (t, mut rx) = FakeTransport::new(None);
    let meter = m(1);
    t.set_reachable(&meter, true);
    let (stop, task) = start_dispatcher(&h, &t);
    let ids = h.queued(vec![meter.clone()], CommandBody::Disconnect);
    let stored = h.store.command(&ids[0]).unwrap().unwrap().envelope;

    let first = next_publication(&mut rx).await;
    assert_eq!(first.topic, "meters/MTR-00001/commands");
    assert_eq!(&first.payload[..], &stored[..]);
    t.set_reachable(&meter, false);
    first.reply.unwrap().send(Delivery::Lost).unwrap();
    idle(5).await;
    assert_eq!(h.status(&ids[0]), CommandStatus::Queued);
    assert_eq!(
        t.sends().len(),
        1,
        "nothing is sent to an unreachable meter"
    );

    t.set_reachable(&meter, true);
    h.commands.meter_reachable(&meter);
    let second = next_publication(&mut rx).await;
    assert_eq!(second.payload, first.payload, "a resend is byte-identical");
    second.reply.unwrap().send(Delivery::Acked).unwrap();
    idle(2).await;
    let c = h.store.command(&ids[0]).unwrap().unwrap();
    assert_eq!(c.status, CommandStatus::Sent);
    assert_eq!(c.attempts, 1);
    assert_eq!(c.envelope, stored, "never re-signed");
    let stats = h.commands.dispatch_stats();
    assert_eq!(
        (stats.sent, stats.acked, stats.lost, stats.issued),
        (2, 1, 1, 1)
    );
    idle(5).await;
    assert_eq!(t.sends().len(), 2, "a sent command is not sent again");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_meter_gets_its_commands_one_at_a_time_in_counter_order() {
    let h = Harness::build(Policy::default(), true);
    let (t, mut rx) = FakeTransport::new(None);
    let meter = m(7);
    let mut ids = Vec::new();
    for s in [60, 120, 180] {
        ids.extend(h.queued(
            vec![meter.clone()],
            CommandBody::SetReportingInterval { seconds: s },
        ));
    }
    t.set_reachable(&meter, true);
    let (stop, task) = start_dispatcher(&h, &t);
    let mut last = None;
    for expected in 1..=3u64 {
        let p = next_publication(&mut rx).await;
        idle(3).await;
        assert!(rx.try_recv().is_err(), "one in flight per meter");
        let cmd = h.verify(&p.payload, &meter, last);
        assert_eq!(cmd.counter, expected);
        last = Some(cmd.counter);
        p.reply.unwrap().send(Delivery::Acked).unwrap();
    }
    idle(2).await;
    for id in &ids {
        assert_eq!(h.status(id), CommandStatus::Sent);
    }
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn expired_commands_are_not_sent() {
    let h = Harness::build(Policy::default(), true);
    let (t, mut rx) = FakeTransport::new(Some(Delivery::Acked));
    let meter = m(3);
    let (stop, task) = start_dispatcher(&h, &t);
    let Issued::Queued { ids } = h
        .commands
        .issue(IssueRequest {
            meters: vec![meter.clone()],
            body: CommandBody::ReadNow,
            actor: "alice".into(),
            ttl: Some(Duration::seconds(10)),
            reason: String::new(),
        })
        .unwrap()
    else {
        panic!()
    };
    idle(11).await;
    assert_eq!(h.status(&ids[0]), CommandStatus::Expired);
    t.set_reachable(&meter, true);
    h.commands.meter_reachable(&meter);
    idle(5).await;
    assert!(rx.try_recv().is_err(), "an expired command is never sent");
    assert!(t.sends().is_empty());
    let e = h.entries("command.expire");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].target, "MTR-00003");
    assert!(e[0].detail.contains("never sent"), "{}", e[0].detail);
    assert_eq!(h.commands.dispatch_stats().expired, 1);

    // A sent command that is not acknowledged before its expiry expires too.
    let Issued::Queued { ids } = h
        .commands
        .issue(IssueRequest {
            meters: vec![meter.clone()],
            body: CommandBody::ReadNow,
            actor: "alice".into(),
            ttl: Some(Duration::seconds(30)),
            reason: String::new(),
        })
        .unwrap()
    else {
        panic!()
    };
    idle(2).await;
    assert_eq!(h.status(&ids[0]), CommandStatus::Sent);
    idle(30).await;
    assert_eq!(h.status(&ids[0]), CommandStatus::Expired);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn dispatch_is_rate_limited_fleet_wide() {
    let h = Harness::build(Policy::default(), true); // 50/s, burst 50
    let (t, _rx) = FakeTransport::new(Some(Delivery::Acked));
    let targets = meters(200);
    for meter in &targets {
        t.set_reachable(meter, true);
    }
    let ids = h.queued(targets.clone(), CommandBody::ReadNow);
    let start = Instant::now();
    let (stop, task) = start_dispatcher(&h, &t);
    for _ in 0..60 {
        if t.sends().len() == 200 {
            break;
        }
        idle(1).await;
    }
    let sends = t.sends();
    assert_eq!(sends.len(), 200);
    // Over any window of length w seconds at most burst + rate * w publications.
    let times: Vec<f64> = sends
        .iter()
        .map(|(at, ..)| (*at - start).as_secs_f64())
        .collect();
    for (i, &a) in times.iter().enumerate() {
        let in_window = times[i..].iter().filter(|&&b| b - a < 1.0).count();
        assert!(
            in_window <= 100,
            "{in_window} sends within one second from {a}"
        );
    }
    let last = times.iter().cloned().fold(0.0, f64::max);
    assert!(
        last >= 2.9,
        "150 sends past the burst take 3 s at 50/s, took {last}"
    );
    assert!(last < 4.5, "took {last}");
    let stats = h.commands.dispatch_stats();
    assert!(stats.rate_limited_waits >= 140, "{stats:?}");
    assert_eq!(stats.acked, 200);
    idle(2).await;
    for id in &ids {
        assert_eq!(h.status(id), CommandStatus::Sent);
    }
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn commands_queued_before_a_restart_are_sent_after_it() {
    let h = Harness::build(Policy::default(), true);
    let meter = m(9);
    let ids = h.queued(vec![meter.clone()], CommandBody::Reconnect);
    let (t, mut rx) = FakeTransport::new(None);
    t.set_reachable(&meter, true);
    let (stop, task) = start_dispatcher(&h, &t);
    let p = next_publication(&mut rx).await;
    assert_eq!(
        &p.payload[..],
        &h.store.command(&ids[0]).unwrap().unwrap().envelope[..]
    );
    // Shut down with the publication unanswered: the command stays queued.
    stop.cancel();
    task.await.unwrap();
    drop(p);
    assert_eq!(h.status(&ids[0]), CommandStatus::Queued);
    let (stop, task) = start_dispatcher(&h, &t);
    let again = next_publication(&mut rx).await;
    again.reply.unwrap().send(Delivery::Acked).unwrap();
    idle(2).await;
    assert_eq!(h.status(&ids[0]), CommandStatus::Sent);
    stop.cancel();
    task.await.unwrap();
}

// ---------------------------------------------------------------- acknowledgements

#[test]
fn on_ack_reports_refusals_and_unmatched_acks() {
    let h = Harness::new();
    let ids = h.queued(vec![m(1), m(2)], CommandBody::ReadNow);
    match h.ack(&m(1), &ids[0], None) {
        AckEffect::Done(c) => {
            assert_eq!(c.id, ids[0]);
            assert_eq!(c.issued_by, "alice");
        }
        other => panic!("{other:?}"),
    }
    match h.ack(&m(2), &ids[1], Some(Refusal::CounterNotFresh)) {
        AckEffect::Refused { command, refusal } => {
            assert_eq!(refusal, Refusal::CounterNotFresh);
            assert_eq!(command.meter_id, m(2));
            assert_eq!(command.kind, CommandKind::ReadNow);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.status(&ids[1]), CommandStatus::Refused);
    // Another meter's command, or an unknown one: unmatched.
    let other = h.queued(vec![m(3)], CommandBody::ReadNow);
    assert_eq!(
        h.commands
            .on_ack(&m(1), &other[0], &AckOutcome::Done { detail: None })
            .unwrap(),
        AckEffect::Unmatched
    );
    assert_eq!(
        h.commands
            .on_ack(
                &m(1),
                &CommandId([9; 16]),
                &AckOutcome::Done { detail: None }
            )
            .unwrap(),
        AckEffect::Unmatched
    );
    let acks = h.entries("command.ack");
    assert_eq!(acks.len(), 2);
    assert_eq!(acks[0].outcome, AuditOutcome::Success);
    assert_eq!(acks[1].outcome, AuditOutcome::Failure);
    assert!(
        acks[1].detail.contains("counter_not_fresh"),
        "{}",
        acks[1].detail
    );
}

// ---------------------------------------------------------------- firmware

struct Firmware {
    manufacturer: SigningKey,
    image: Vec<u8>,
    manifest: Vec<u8>,
}

fn manifest_for(
    key: &SigningKey,
    image: &[u8],
    sequence: u64,
    expires_at: Option<OffsetDateTime>,
) -> Vec<u8> {
    firmware::sign_manifest(
        key,
        &Manifest {
            manifest_version: firmware::MANIFEST_VERSION,
            sequence,
            vendor_id: "acme".into(),
            class_id: "em-100".into(),
            version: "1.2.0".into(),
            digest: Sha256::digest(image).into(),
            size: image.len() as u64,
            expires_at,
            rollback_from: None,
        },
    )
    .unwrap()
}

fn firmware_fixture(size: usize) -> Firmware {
    let manufacturer = new_key();
    let image: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let manifest = manifest_for(&manufacturer, &image, 5, None);
    Firmware {
        manufacturer,
        image,
        manifest,
    }
}

fn upload(h: &Harness, fw: &Firmware) -> i64 {
    h.commands
        .upload_firmware(
            &fw.manifest,
            &fw.image,
            &[fw.manufacturer.verifying_key().unwrap()],
            "alice",
        )
        .unwrap()
}

#[test]
fn firmware_upload_checks_the_manufacturer_signature_digest_and_size() {
    let h = Harness::new();
    let fw = firmware_fixture(40_000);
    let vendor: Vec<VerifyingKey> = vec![fw.manufacturer.verifying_key().unwrap()];

    // Signed by the head-end's command key: not a manufacturer key.
    let by_head_end = manifest_for(&h.key, &fw.image, 5, None);
    let e = h
        .commands
        .upload_firmware(&by_head_end, &fw.image, &vendor, "alice");
    assert!(
        matches!(
            e,
            Err(FirmwareUploadError::Manifest(FirmwareError::UnknownSigner(
                _
            )))
        ),
        "{e:?}"
    );
    // Even if someone configured the head-end key as a manufacturer key.
    let with_head_end = vec![vendor[0].clone(), h.key.verifying_key().unwrap()];
    let e = h
        .commands
        .upload_firmware(&by_head_end, &fw.image, &with_head_end, "alice");
    assert!(
        matches!(e, Err(FirmwareUploadError::SignedByHeadEnd)),
        "{e:?}"
    );
    // Another image under a good manifest.
    let mut other = fw.image.clone();
    other[17] ^= 1;
    let e = h
        .commands
        .upload_firmware(&fw.manifest, &other, &vendor, "alice");
    assert!(
        matches!(e, Err(FirmwareUploadError::DigestMismatch)),
        "{e:?}"
    );
    let e = h
        .commands
        .upload_firmware(&fw.manifest, &fw.image[..100], &vendor, "alice");
    assert!(
        matches!(
            e,
            Err(FirmwareUploadError::SizeMismatch {
                expected: 40_000,
                actual: 100
            })
        ),
        "{e:?}"
    );
    // A changed manifest byte.
    let mut tampered = fw.manifest.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let e = h
        .commands
        .upload_firmware(&tampered, &fw.image, &vendor, "alice");
    assert!(matches!(e, Err(FirmwareUploadError::Manifest(_))), "{e:?}");
    // Expired.
    let expired = manifest_for(
        &fw.manufacturer,
        &fw.image,
        5,
        Some(T0 - Duration::hours(1)),
    );
    let e = h
        .commands
        .upload_firmware(&expired, &fw.image, &vendor, "alice");
    assert!(matches!(e, Err(FirmwareUploadError::Expired(_))), "{e:?}");
    let e = h
        .commands
        .upload_firmware(&fw.manifest, &fw.image, &vendor, "");
    assert!(matches!(e, Err(FirmwareUploadError::NoActor)), "{e:?}");
    assert!(h.store.firmwares().unwrap().is_empty());

    let id = upload(&h, &fw);
    let stored = h.store.firmware(id).unwrap().unwrap();
    assert_eq!(stored.size, 40_000);
    assert_eq!(stored.sequence, 5);
    assert_eq!(stored.manifest, fw.manifest);
    let e = h
        .commands
        .upload_firmware(&fw.manifest, &fw.image, &vendor, "alice");
    assert!(
        matches!(e, Err(FirmwareUploadError::AlreadyStored)),
        "{e:?}"
    );

    let entries = h.entries("firmware.upload");
    let outcomes: Vec<AuditOutcome> = entries.iter().map(|e| e.outcome).collect();
    use AuditOutcome::{Denied, Failure, Success};
    assert_eq!(
        outcomes,
        vec![
            Denied, Denied, Failure, Failure, Denied, Failure, Failure, Success, Failure
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn firmware_command_is_followed_by_its_image_chunks() {
    let h = Harness::build(Policy::default(), true);
    let fw = firmware_fixture(40_000);
    upload(&h, &fw);
    let meter = m(4);
    let ids = h.queued(
        vec![meter.clone()],
        CommandBody::FirmwareUpdate {
            manifest: fw.manifest.clone(),
        },
    );
    let c = h.store.command(&ids[0]).unwrap().unwrap();
    assert!(
        c.args_json
            .contains(&hex::encode(Sha256::digest(&fw.image))),
        "{}",
        c.args_json
    );
    let (t, mut rx) = FakeTransport::new(None);
    t.set_reachable(&meter, true);
    let (stop, task) = start_dispatcher(&h, &t);
    let cmd = next_publication(&mut rx).await;
    assert_eq!(cmd.topic, "meters/MTR-00004/commands");
    let verified = h.verify(&cmd.payload, &meter, None);
    assert_eq!(
        verified.body,
        CommandBody::FirmwareUpdate {
            manifest: fw.manifest.clone()
        }
    );
    cmd.reply.unwrap().send(Delivery::Acked).unwrap();
    let mut image = Vec::new();
    for _ in 0..3 {
        let p = next_publication(&mut rx).await;
        assert_eq!(p.topic, "meters/MTR-00004/firmware");
        let chunk = Chunk::decode(&p.payload).unwrap();
        assert_eq!(chunk.offset, image.len() as u64);
        image.extend_from_slice(&chunk.data);
        p.reply.unwrap().send(Delivery::Acked).unwrap();
    }
    assert_eq!(image, fw.image);
    idle(2).await;
    assert_eq!(h.commands.dispatch_stats().transfers_completed, 1);
    assert_eq!(h.status(&ids[0]), CommandStatus::Sent);
    assert!(matches!(h.ack(&meter, &ids[0], None), AckEffect::Done(_)));

    // A second update whose transfer is interrupted fails.
    let fw2 = firmware_fixture(20_000);
    upload(&h, &fw2);
    let ids = h.queued(
        vec![meter.clone()],
        CommandBody::FirmwareUpdate {
            manifest: fw2.manifest.clone(),
        },
    );
    let cmd = next_publication(&mut rx).await;
    cmd.reply.unwrap().send(Delivery::Acked).unwrap();
    let chunk = next_publication(&mut rx).await;
    t.set_reachable(&meter, false);
    chunk.reply.unwrap().send(Delivery::Lost).unwrap();
    idle(2).await;
    let c = h.store.command(&ids[0]).unwrap().unwrap();
    assert_eq!(c.status, CommandStatus::Failed);
    assert_eq!(c.outcome.as_deref(), Some("transfer interrupted"));
    assert_eq!(h.commands.dispatch_stats().transfers_failed, 1);
    assert_eq!(h.entries("command.fail").len(), 1);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_meter_that_refuses_the_manifest_gets_no_more_chunks() {
    let h = Harness::build(Policy::default(), true);
    let fw = firmware_fixture(100_000); // 7 chunks
    upload(&h, &fw);
    let meter = m(5);
    let ids = h.queued(
        vec![meter.clone()],
        CommandBody::FirmwareUpdate {
            manifest: fw.manifest.clone(),
        },
    );
    let (t, mut rx) = FakeTransport::new(None);
    t.set_reachable(&meter, true);
    let (stop, task) = start_dispatcher(&h, &t);
    next_publication(&mut rx)
        .await
        .reply
        .unwrap()
        .send(Delivery::Acked)
        .unwrap();
    let first_chunk = next_publication(&mut rx).await;
    assert!(matches!(
        h.ack(&meter, &ids[0], Some(Refusal::FirmwareRollback)),
        AckEffect::Refused {
            refusal: Refusal::FirmwareRollback,
            ..
        }
    ));
    first_chunk.reply.unwrap().send(Delivery::Acked).unwrap();
    idle(3).await;
    assert!(rx.try_recv().is_err(), "no chunk after the refusal");
    assert_eq!(h.status(&ids[0]), CommandStatus::Refused);
    stop.cancel();
    task.await.unwrap();
}

// ---------------------------------------------------------------- campaigns

fn members_commands(h: &Harness, campaign: i64, stage: u32) -> Vec<(MeterId, CommandId)> {
    h.store
        .campaign_members(campaign)
        .unwrap()
        .into_iter()
        .filter(|mm| mm.stage == stage)
        .filter_map(|mm| mm.command_id.map(|c| (mm.meter_id, c)))
        .collect()
}

fn campaign_request(firmware_id: i64, n: usize) -> CampaignRequest {
    CampaignRequest {
        firmware_id,
        meters: meters(n),
        first_stage: None,
        success_threshold: None,
        max_failures: None,
        actor: "alice".into(),
    }
}

#[test]
fn campaign_pilot_success_starts_stage_two_then_completes() {
    let h = Harness::new();
    let fw = firmware_fixture(1000);
    let fid = upload(&h, &fw);
    let id = h
        .commands
        .create_campaign(campaign_request(fid, 6))
        .unwrap();
    let pilot = members_commands(&h, id, 1);
    assert_eq!(pilot.len(), 3, "the pilot is min(3, n)");
    assert!(members_commands(&h, id, 2).is_empty());
    for (meter, cmd) in &pilot {
        let c = h.store.command(cmd).unwrap().unwrap();
        assert_eq!(c.kind, CommandKind::FirmwareUpdate);
        assert_eq!(c.campaign_id, Some(id));
        assert_eq!(c.issued_by, "alice");
        assert_eq!(
            h.verify(&c.envelope, meter, None).body,
            CommandBody::FirmwareUpdate {
                manifest: fw.manifest.clone()
            }
        );
    }
    h.ack(&pilot[0].0, &pilot[0].1, None);
    h.ack(&pilot[1].0, &pilot[1].1, None);
    assert!(
        members_commands(&h, id, 2).is_empty(),
        "stage 2 waits for the whole pilot"
    );
    h.ack(&pilot[2].0, &pilot[2].1, None);
    let c = h.store.campaign(id).unwrap().unwrap();
    assert_eq!((c.state, c.stage), (CampaignState::Running, 2));
    let rest = members_commands(&h, id, 2);
    assert_eq!(rest.len(), 3);
    // One failure is tolerated (max_failures 1).
    h.ack(&rest[0].0, &rest[0].1, Some(Refusal::FirmwareWrongClass));
    h.ack(&rest[1].0, &rest[1].1, None);
    h.ack(&rest[2].0, &rest[2].1, None);
    let c = h.store.campaign(id).unwrap().unwrap();
    assert_eq!(c.state, CampaignState::Completed);
    assert_eq!(h.entries("campaign.create").len(), 1);
    assert_eq!(h.entries("campaign.stage").len(), 2);
    let done = h.entries("campaign.complete");
    assert_eq!(done.len(), 1);
    assert!(done[0].detail.contains("5 of 6"), "{}", done[0].detail);
}

#[test]
fn campaign_pilot_failure_pauses_and_resume_retries() {
    let h = Harness::new();
    let fw = firmware_fixture(1000);
    let fid = upload(&h, &fw);
    let id = h
        .commands
        .create_campaign(campaign_request(fid, 5))
        .unwrap();
    let pilot = members_commands(&h, id, 1);
    h.ack(&pilot[0].0, &pilot[0].1, None);
    h.ack(
        &pilot[1].0,
        &pilot[1].1,
        Some(Refusal::FirmwareDigestMismatch),
    );
    h.ack(&pilot[2].0, &pilot[2].1, None);
    let c = h.store.campaign(id).unwrap().unwrap();
    assert_eq!((c.state, c.stage), (CampaignState::Paused, 1));
    assert!(
        c.note.as_deref().unwrap().contains("2 of 3"),
        "{:?}",
        c.note
    );
    assert!(
        members_commands(&h, id, 2).is_empty(),
        "no stage 2 after a failed pilot"
    );
    let pauses = h.entries("campaign.pause");
    assert_eq!(pauses.len(), 1);
    assert_eq!(pauses[0].actor, Actor::System);

    // Resume retries the failed pilot meter only.
    let e = h.commands.pause_campaign(id, "bob");
    assert!(
        matches!(e, Err(CampaignError::WrongState(CampaignState::Paused))),
        "{e:?}"
    );
    h.commands.resume_campaign(id, "bob").unwrap();
    let retried = members_commands(&h, id, 1);
    assert_ne!(
        retried[1].1, pilot[1].1,
        "a new command for the failed meter"
    );
    assert_eq!(retried[0].1, pilot[0].1);
    assert_eq!(h.store.command(&retried[1].1).unwrap().unwrap().counter, 2);
    let e = h.commands.resume_campaign(id, "bob");
    assert!(
        matches!(e, Err(CampaignError::WrongState(CampaignState::Running))),
        "{e:?}"
    );
    h.ack(&retried[1].0, &retried[1].1, None);
    let c = h.store.campaign(id).unwrap().unwrap();
    assert_eq!((c.state, c.stage), (CampaignState::Running, 2));

    // Cancel withdraws the commands not sent yet.
    h.commands.cancel_campaign(id, "bob").unwrap();
    assert_eq!(
        h.store.campaign(id).unwrap().unwrap().state,
        CampaignState::Cancelled
    );
    for (_, cmd) in members_commands(&h, id, 2) {
        let c = h.store.command(&cmd).unwrap().unwrap();
        assert_eq!(c.status, CommandStatus::Failed);
        assert_eq!(c.outcome.as_deref(), Some("campaign cancelled"));
    }
    let e = h.commands.cancel_campaign(id, "bob");
    assert!(
        matches!(e, Err(CampaignError::WrongState(CampaignState::Cancelled))),
        "{e:?}"
    );
    assert_eq!(
        h.entries("campaign.resume")[0].actor,
        Actor::User("bob".into())
    );
    assert_eq!(h.entries("campaign.cancel").len(), 2);
}

#[test]
fn campaign_stage_two_pauses_after_too_many_failures() {
    let h = Harness::new();
    let fw = firmware_fixture(1000);
    let fid = upload(&h, &fw);
    let mut req = campaign_request(fid, 8);
    req.first_stage = Some(2);
    req.max_failures = Some(1);
    let id = h.commands.create_campaign(req).unwrap();
    for (meter, cmd) in members_commands(&h, id, 1) {
        h.ack(&meter, &cmd, None);
    }
    let rest = members_commands(&h, id, 2);
    assert_eq!(rest.len(), 6);
    h.ack(&rest[0].0, &rest[0].1, Some(Refusal::FirmwareRollback));
    assert_eq!(
        h.store.campaign(id).unwrap().unwrap().state,
        CampaignState::Running
    );
    h.ack(&rest[1].0, &rest[1].1, Some(Refusal::Expired));
    let c = h.store.campaign(id).unwrap().unwrap();
    assert_eq!((c.state, c.stage), (CampaignState::Paused, 2));
    // The four not sent yet were withdrawn so they hold back nothing else for their meters.
    for (_, cmd) in &rest[2..] {
        let c = h.store.command(cmd).unwrap().unwrap();
        assert_eq!(
            (c.status, c.outcome.as_deref()),
            (CommandStatus::Failed, Some("campaign paused"))
        );
    }
}

#[test]
fn campaign_requests_are_validated() {
    let h = Harness::new();
    let fw = firmware_fixture(1000);
    let fid = upload(&h, &fw);
    let e = h.commands.create_campaign(campaign_request(fid + 100, 3));
    assert!(
        matches!(e, Err(CampaignError::FirmwareNotFound(_))),
        "{e:?}"
    );
    let e = h.commands.create_campaign(campaign_request(fid, 0));
    assert!(
        matches!(e, Err(CampaignError::Meters(CommandError::NoMeters))),
        "{e:?}"
    );
    let mut r = campaign_request(fid, 3);
    r.first_stage = Some(4);
    assert!(matches!(
        h.commands.create_campaign(r),
        Err(CampaignError::InvalidFirstStage {
            first_stage: 4,
            meters: 3
        })
    ));
    let mut r = campaign_request(fid, 3);
    r.first_stage = Some(0);
    assert!(matches!(
        h.commands.create_campaign(r),
        Err(CampaignError::InvalidFirstStage { .. })
    ));
    let mut r = campaign_request(fid, 3);
    r.success_threshold = Some(1.5);
    assert!(matches!(
        h.commands.create_campaign(r),
        Err(CampaignError::InvalidThreshold(_))
    ));
    let mut r = campaign_request(fid, 3);
    r.success_threshold = Some(f64::NAN);
    assert!(matches!(
        h.commands.create_campaign(r),
        Err(CampaignError::InvalidThreshold(_))
    ));
    let mut r = campaign_request(fid, 3);
    r.actor = String::new();
    assert!(matches!(
        h.commands.create_campaign(r),
        Err(CampaignError::NoActor)
    ));
    assert!(matches!(
        h.commands.resume_campaign(77, "bob"),
        Err(CampaignError::NotFound(77))
    ));

    let mut policy = Policy::default();
    policy.critical_kinds.push(CommandKind::FirmwareUpdate);
    let strict = Harness::build(policy, false);
    let fid = upload(&strict, &fw);
    let e = strict.commands.create_campaign(campaign_request(fid, 11));
    assert!(
        matches!(e, Err(CampaignError::NeedsFourEyes { threshold: 10 })),
        "{e:?}"
    );
    assert!(h.store.campaigns().unwrap().is_empty());
    assert_eq!(h.entries("campaign.create").len(), 7);
}

#[tokio::test(start_paused = true)]
async fn campaign_runs_through_the_dispatcher() {
    let h = Harness::build(Policy::default(), true);
    let fw = firmware_fixture(1000);
    let fid = upload(&h, &fw);
    let (t, mut rx) = FakeTransport::new(Some(Delivery::Acked));
    let targets = meters(4);
    for meter in &targets {
        t.set_reachable(meter, true);
    }
    let (stop, task) = start_dispatcher(&h, &t);
    let id = h
        .commands
        .create_campaign(campaign_request(fid, 4))
        .unwrap();
    // Each pilot meter gets the command, then one chunk.
    let mut seen = Vec::new();
    for _ in 0..6 {
        let p = next_publication(&mut rx).await;
        seen.push((p.meter, p.topic));
    }
    assert_eq!(
        seen.iter()
            .filter(|(_, topic)| topic.ends_with("/commands"))
            .count(),
        3
    );
    for (meter, cmd) in members_commands(&h, id, 1) {
        h.ack(&meter, &cmd, None);
    }
    let p = next_publication(&mut rx).await;
    assert_eq!(p.meter, m(3));
    assert_eq!(p.topic, "meters/MTR-00003/commands");
    assert_eq!(
        h.verify(&p.payload, &m(3), None).body.kind(),
        CommandKind::FirmwareUpdate
    );
    stop.cancel();
    task.await.unwrap();
}
