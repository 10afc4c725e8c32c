//! Meters publishing to a real Gridward MQTT endpoint over mutual TLS on 127.0.0.1.
//!
//! The endpoint's pipeline is a small in-memory stand-in for the head-end's: it verifies the
//! envelope with the certificate's key, applies the replay rule (counter strictly greater; a
//! byte-identical resend of a stored envelope is a duplicate) and stores readings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gridward_core::MeterId;
use gridward_core::command::{
    self, AckOutcome, Command, CommandAck, CommandBody, CommandId, Refusal,
};
use gridward_core::document::{Document, EventKind, Format, Limits};
use gridward_core::envelope::{EnvelopeError, SigningKey, VerifyingKey, verify};
use gridward_core::firmware::{self, Manifest};
use gridward_core::security::{Reason, SecurityEvent};
use gridward_meter::command::Relay;
use gridward_meter::fleet::{Clock, Fleet, FleetConfig, MeterSpec};
use gridward_meter::identity::{self, MeterIdentity, Trust};
use gridward_meter::meter::Misbehaviour;
use gridward_mqtt::client::Protocol;
use gridward_mqtt::{
    Endpoint, EndpointConfig, EventSink, InboundPublish, OutboundResult, PublishHandler, Verdict,
};
use gridward_pki::tls::{TlsOptions, server_config};
use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki, RevocationReason, RevokeTarget};
use time::OffsetDateTime;
use tokio::net::TcpListener;

fn clock() -> Clock {
    Arc::new(OffsetDateTime::now_utc)
}

#[derive(Default)]
struct Stored {
    /// Per meter: counter → envelope, and the last accepted counter.
    readings: HashMap<MeterId, BTreeMap<u64, Vec<u8>>>,
    last: HashMap<MeterId, u64>,
    duplicates: u64,
    refused: Vec<(MeterId, Reason)>,
    events: Vec<(MeterId, EventKind)>,
    acks: Vec<CommandAck>,
    /// Per meter: the register of each reading, in counter order.
    registers: HashMap<MeterId, Vec<f64>>,
}

/// The stand-in pipeline. It decides (and stores) as each message arrives, in arrival order;
/// the verdict is returned after `delay` (a slow acknowledgement path).
#[derive(Default)]
struct Pipeline {
    stored: Mutex<Stored>,
    delay: Mutex<Duration>,
    /// While set, messages are neither stored nor answered (a head-end that dies before storing);
    /// once cleared, their verdicts come back as refusals to connections long gone.
    blackhole: AtomicBool,
}

impl Pipeline {
    fn decide(&self, msg: &InboundPublish) -> Verdict {
        let mut s = self.stored.lock().unwrap();
        let refuse = |s: &mut Stored, reason| {
            s.refused.push((msg.meter_id.clone(), reason));
            Verdict::Rejected(reason)
        };
        let key = VerifyingKey::from_spki_der(&msg.cert_spki).unwrap();
        let verified = match verify(&msg.payload, &key, &msg.meter_id, &msg.topic) {
            Ok(v) => v,
            Err(EnvelopeError::BadSignature) => return refuse(&mut s, Reason::BadSignature),
            Err(_) => return refuse(&mut s, Reason::MalformedEnvelope),
        };
        let counter = verified.header().counter;
        let last = s.last.get(&msg.meter_id).copied();
        if last.is_some_and(|l| counter <= l) {
            let same = s
                .readings
                .get(&msg.meter_id)
                .and_then(|r| r.get(&counter))
                .is_some_and(|stored| stored[..] == msg.payload[..]);
            if same {
                s.duplicates += 1;
                return Verdict::Duplicate;
            }
            return refuse(&mut s, Reason::Replay);
        }
        let Ok(doc) = verified.into_document(&Limits::default()) else {
            return refuse(&mut s, Reason::InvalidDocument);
        };
        match doc.document() {
            Document::Event(e) => s.events.push((msg.meter_id.clone(), e.kind)),
            Document::CommandAck(a) => s.acks.push(a.clone()),
            Document::Reading(r) => s
                .registers
                .entry(msg.meter_id.clone())
                .or_default()
                .push(r.energy_kwh),
        }
        s.last.insert(msg.meter_id.clone(), counter);
        s.readings
            .entry(msg.meter_id.clone())
            .or_default()
            .insert(counter, msg.payload.to_vec());
        Verdict::Accepted
    }
}

struct Handler(Arc<Pipeline>);

impl PublishHandler for Handler {
    fn handle(
        &self,
        msg: InboundPublish,
    ) -> impl std::future::Future<Output = Verdict> + Send + 'static {
        let p = Arc::clone(&self.0);
        let verdict = if p.blackhole.load(Ordering::SeqCst) {
            None
        } else {
            Some(p.decide(&msg))
        };
        let delay = *p.delay.lock().unwrap();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match verdict {
                Some(v) => v,
                None => {
                    while p.blackhole.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Verdict::Rejected(Reason::Timeout)
                }
            }
        }
    }
}

#[derive(Default)]
struct Events(Mutex<Vec<SecurityEvent>>);

impl EventSink for Events {
    fn security_event(&self, event: SecurityEvent) {
        self.0.lock().unwrap().push(event);
    }
    fn connection(&self, _: &MeterId, _: bool, _: OffsetDateTime) {}
}

struct Setup {
    _tmp: tempfile::TempDir,
    pki: PathBuf,
    state: PathBuf,
}

fn setup(meters: usize) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let now = OffsetDateTime::now_utc();
    let pki = Pki::init(&pki_dir, &InitOptions::new("test", now)).unwrap();
    let opts = IssueOptions::new("test");
    pki.issue_meters("T-", meters, &opts, now, &mut |_| {})
        .unwrap();
    pki.issue_server("hes", &["127.0.0.1".into()], &opts, now)
        .unwrap();
    Setup {
        state: tmp.path().join("state"),
        pki: pki_dir,
        _tmp: tmp,
    }
}

fn id(n: usize) -> MeterId {
    MeterId::new(&format!("T-{n:06}")).unwrap()
}

async fn start_endpoint(
    pki: &Path,
    pipeline: &Arc<Pipeline>,
    listener: TcpListener,
) -> (Endpoint<Handler>, Arc<Events>, tokio::task::JoinHandle<()>) {
    let material = Pki::open(pki, None)
        .unwrap()
        .tls_material(LeafKind::Server, "hes")
        .unwrap();
    let mut config = EndpointConfig::default();
    config.shutdown_grace = Duration::ZERO;
    config.ban_after_failures = 0;
    let events = Arc::new(Events::default());
    let endpoint = Endpoint::new(
        config,
        server_config(&material).unwrap(),
        Arc::new(Handler(Arc::clone(pipeline))),
        Arc::clone(&events) as Arc<dyn EventSink>,
        clock(),
    )
    .unwrap();
    let ep = endpoint.clone();
    let task = tokio::spawn(async move {
        ep.run(listener, std::future::pending()).await.unwrap();
    });
    (endpoint, events, task)
}

fn fleet_config(s: &Setup, port: u16) -> FleetConfig {
    let mut c = FleetConfig::new("127.0.0.1", port, &s.state, clock());
    c.interval = time::Duration::milliseconds(200);
    c.connect_rate = 100.0;
    c.backoff_base = Duration::from_millis(50);
    c.backoff_cap = Duration::from_millis(500);
    c.misbehave_every = 4;
    c
}

fn load(s: &Setup, n: usize) -> MeterIdentity {
    let trust = Trust::load(&s.pki).unwrap();
    MeterIdentity::load(&s.pki, &id(n), &trust, &TlsOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_publishes_genuine_readings_and_misbehaviour_is_refused() {
    let s = setup(5);
    // Meter 5's certificate is revoked before the endpoint loads its CRL.
    Pki::open(&s.pki, None)
        .unwrap()
        .revoke(
            &RevokeTarget::Identity {
                kind: Some(LeafKind::Meter),
                name: id(5).to_string(),
            },
            RevocationReason::KeyCompromise,
            "test",
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    let pipeline = Arc::new(Pipeline::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (endpoint, events, _task) = start_endpoint(&s.pki, &pipeline, listener).await;

    // Loaded as a fleet is: the TLS configuration of meters 2.. shares meter 1's.
    let trust = Trust::load(&s.pki).unwrap();
    let ids: Vec<MeterId> = (1..=5).map(id).collect();
    let misbehaviour = [
        None,
        None,
        Some(Misbehaviour::Replay),
        Some(Misbehaviour::Tamper),
        Some(Misbehaviour::Revoked), // gives up after 3 refused connects
    ];
    let specs = identity::load_many(&s.pki, &ids, &trust, &TlsOptions::default(), &|_| {})
        .unwrap()
        .into_iter()
        .zip(misbehaviour)
        .map(|(identity, misbehaviour)| MeterSpec {
            identity,
            misbehaviour,
        })
        .collect();
    let mut config = fleet_config(&s, port);
    config.format = Format::Json;
    let fleet = Fleet::start(specs, config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(fleet.request_event(&id(2), EventKind::CoverOpened));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let live = fleet.stats().snapshot();
    assert_eq!(live.connected, 4);
    let report = fleet.stop(Duration::from_secs(5)).await;
    let st = report.stats;

    // Every genuine message of the four connected meters was acknowledged and stored once
    // (the revoked meter may have taken a reading before it gave up).
    let signed: u64 = report.meters[..4]
        .iter()
        .map(|m| m.counts.readings + m.counts.events)
        .sum();
    assert_eq!(st.acked, signed, "{st:?} {:?}", report.meters);
    assert_eq!(st.rejected, 0);
    assert!(st.readings >= 4 * 10, "{st:?}");
    let stored = pipeline.stored.lock().unwrap();
    let total: usize = stored.readings.values().map(BTreeMap::len).sum();
    assert_eq!(total as u64, st.acked);
    assert_eq!(stored.events, [(id(2), EventKind::CoverOpened)]);
    for n in 1..=4 {
        let outcome = report.meters.iter().find(|m| m.id == id(n)).unwrap();
        assert_eq!(outcome.held, 0);
        assert_eq!(stored.readings[&id(n)].len() as u64, outcome.counts.acked);
    }
    // Misbehaviour was sent and refused (MQTT 5 reason codes), with the right reasons.
    assert!(st.misbehaviour_sent >= 4, "{st:?}");
    assert_eq!(st.misbehaviour_rejected, st.misbehaviour_sent);
    assert!(stored.refused.iter().any(|r| *r == (id(3), Reason::Replay)));
    assert!(
        stored
            .refused
            .iter()
            .any(|r| *r == (id(4), Reason::BadSignature))
    );
    assert!(
        stored
            .refused
            .iter()
            .all(|(m, _)| *m == id(3) || *m == id(4))
    );
    // The revoked meter never got in, and gave up.
    assert!(!stored.readings.contains_key(&id(5)));
    let revoked = report.meters.iter().find(|m| m.id == id(5)).unwrap();
    assert!(revoked.gave_up);
    assert_eq!(st.connect_failures, 3);
    assert!(
        events
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.reason == Reason::CertificateRevoked),
        "{:?}",
        events.0.lock().unwrap()
    );
    assert!(report.latency.count > 0 && report.latency.p99 >= report.latency.p50);
    endpoint.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_readings_are_resent_after_the_endpoint_restarts() {
    let s = setup(3);
    let pipeline = Arc::new(Pipeline::default());
    // A slow store: at any time some messages are in flight.
    *pipeline.delay.lock().unwrap() = Duration::from_millis(150);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (endpoint, _, task) = start_endpoint(&s.pki, &pipeline, listener).await;

    let specs = (1..=3).map(|n| MeterSpec::from(load(&s, n))).collect();
    let mut config = fleet_config(&s, addr.port());
    config.interval = time::Duration::milliseconds(50);
    config.protocol = Protocol::V311;
    let fleet = Fleet::start(specs, config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // The endpoint goes away with messages in flight (some stored, their PUBACK lost).
    endpoint.shutdown();
    task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let during = fleet.stats().snapshot();
    assert_eq!(during.connected, 0);
    let listener = TcpListener::bind(addr).await.unwrap();
    let (endpoint, _, _task) = start_endpoint(&s.pki, &pipeline, listener).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = fleet.stop(Duration::from_secs(10)).await;
    let st = report.stats;

    assert!(st.disconnects >= 3 && st.connects >= 6, "{st:?}");
    assert!(st.resent > 0, "{st:?}");
    assert_eq!(st.acked, st.readings, "{st:?}");
    let stored = pipeline.stored.lock().unwrap();
    for n in 1..=3 {
        let outcome = report.meters.iter().find(|m| m.id == id(n)).unwrap();
        assert_eq!(outcome.held, 0);
        // Every reading taken is stored exactly once, with consecutive counters.
        let counters: Vec<u64> = stored.readings[&id(n)].keys().copied().collect();
        assert_eq!(counters.len() as u64, outcome.counts.readings);
        assert_eq!(counters, (1..=outcome.counts.readings).collect::<Vec<_>>());
    }
    assert!(stored.refused.is_empty(), "{:?}", stored.refused);
    endpoint.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_readings_survive_a_restart_of_the_meter_process() {
    let s = setup(2);
    let pipeline = Arc::new(Pipeline::default());
    pipeline.blackhole.store(true, Ordering::SeqCst);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (endpoint, _, _task) = start_endpoint(&s.pki, &pipeline, listener).await;

    // First run: the head-end hangs, nothing is acknowledged; the process "dies".
    let specs = (1..=2).map(|n| MeterSpec::from(load(&s, n))).collect();
    let first = Fleet::start(specs, fleet_config(&s, port)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r1 = first.stop(Duration::ZERO).await;
    assert_eq!(r1.stats.acked, 0);
    let held: usize = r1.meters.iter().map(|m| m.held).sum();
    assert!(
        held >= 6 && held as u64 == r1.stats.readings,
        "{:?}",
        r1.stats
    );

    // Second run with the same state directory: the old messages go first, then new ones
    // with counters that were never used.
    pipeline.blackhole.store(false, Ordering::SeqCst);
    let specs = (1..=2).map(|n| MeterSpec::from(load(&s, n))).collect();
    let second = Fleet::start(specs, fleet_config(&s, port)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r2 = second.stop(Duration::from_secs(5)).await;
    assert_eq!(r2.stats.restored, r1.stats.readings);
    assert_eq!(r2.stats.unacknowledged(), 0);
    assert_eq!(
        r2.stats.acked,
        r1.stats.readings + r2.stats.readings,
        "{:?}",
        r2.stats
    );
    let stored = pipeline.stored.lock().unwrap();
    for n in 1..=2 {
        let first_run = r1
            .meters
            .iter()
            .find(|m| m.id == id(n))
            .unwrap()
            .counts
            .readings;
        let counters: Vec<u64> = stored.readings[&id(n)].keys().copied().collect();
        // The first run's counters 1..=k, then the second run's from the persisted mark on.
        assert_eq!(
            counters[..first_run as usize],
            (1..=first_run).collect::<Vec<_>>()[..]
        );
        let resumed = counters[first_run as usize];
        assert_eq!(
            resumed,
            1 + gridward_meter::counter::DEFAULT_BLOCK,
            "skipped, never reused"
        );
    }
    // Nothing was stored twice, nothing refused.
    assert!(stored.refused.is_empty(), "{:?}", stored.refused);
    let total: usize = stored.readings.values().map(BTreeMap::len).sum();
    assert_eq!(total as u64, r2.stats.acked);
    endpoint.shutdown();
}

/// Publishes `payload` to `meter` on `topic` through the endpoint (retrying until the meter is
/// connected and subscribed) and waits for the meter's PUBACK.
async fn deliver(endpoint: &Endpoint<Handler>, meter: &MeterId, topic: String, payload: Vec<u8>) {
    for _ in 0..200 {
        if let Ok(rx) = endpoint.publish(meter, topic.clone(), payload.clone().into())
            && let Ok(OutboundResult::Acked { reason_code: 0 }) = rx.await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{topic} was never acknowledged by {meter}");
}

/// Waits until the pipeline stored an acknowledgement of `cid`.
async fn ack_of(pipeline: &Pipeline, cid: CommandId) -> CommandAck {
    for _ in 0..200 {
        if let Some(a) = pipeline
            .stored
            .lock()
            .unwrap()
            .acks
            .iter()
            .find(|a| a.command_id == cid)
        {
            return a.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no acknowledgement of {cid}");
}

fn ed25519() -> SigningKey {
    let pkcs8 =
        aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .unwrap();
    SigningKey::from_pkcs8_der(pkcs8.as_ref()).unwrap()
}

/// Commands over the real endpoint: a PKI-issued command signer pinned by the fleet, a relay
/// disconnect with readings still flowing, a firmware update in chunks on the firmware topic,
/// a forged command from a "compromised broker", and the state surviving a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_firmware_over_mqtt_survive_a_restart() {
    let s = setup(1);
    let now = OffsetDateTime::now_utc();
    Pki::open(&s.pki, None)
        .unwrap()
        .issue_command_signer("hes-commands", &IssueOptions::new("test"), now)
        .unwrap();
    let signer = SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(s.pki.join("command-signers/hes-commands/key.pem")).unwrap(),
    )
    .unwrap();
    let maker = ed25519();
    let pipeline = Arc::new(Pipeline::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (endpoint, _events, _task) = start_endpoint(&s.pki, &pipeline, listener).await;
    let trust = Trust::load_at(&s.pki, now).unwrap();
    assert_eq!(trust.command_signers().len(), 1);
    let make_config = || {
        let mut c = fleet_config(&s, port);
        c.format = Format::Json;
        c.command_signers = trust.command_signers().to_vec();
        c.manufacturer_keys = vec![maker.verifying_key().unwrap()];
        c
    };
    let meter = id(1);
    let command = |body, counter: u64| {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let c = Command {
            id: CommandId::random(),
            meter_id: meter.clone(),
            body,
            counter,
            issued_at: now,
            expires_at: now + time::Duration::minutes(5),
        };
        (c.id, command::sign(&signer, &c).unwrap())
    };

    let fleet = Fleet::start(vec![MeterSpec::from(load(&s, 1))], make_config())
        .await
        .unwrap();
    assert_eq!(fleet.relay_state(&meter), Some(Relay::Connected));

    // Disconnect: the state is changed (and persisted) before the PUBACK.
    let (cid, bytes) = command(CommandBody::Disconnect, 1);
    deliver(&endpoint, &meter, meter.commands_topic(), bytes).await;
    assert_eq!(fleet.relay_state(&meter), Some(Relay::Disconnected));
    // The PUBACK came after the new state was on disk.
    let file = std::fs::read_to_string(s.state.join("counters")).unwrap();
    let line = file.lines().find(|l| l.starts_with("T-000001 ")).unwrap();
    assert!(line.contains(" cmd=1") && line.contains(" open="), "{file}");
    let a = ack_of(&pipeline, cid).await;
    assert_eq!(
        a.outcome,
        AckOutcome::Done {
            detail: Some("relay open".into())
        }
    );
    let readings_then = pipeline
        .stored
        .lock()
        .unwrap()
        .registers
        .get(&meter)
        .map_or(0, Vec::len);
    tokio::time::sleep(Duration::from_millis(800)).await;
    {
        // Readings keep flowing while disconnected, and the register does not move.
        let stored = pipeline.stored.lock().unwrap();
        let regs = &stored.registers[&meter];
        assert!(regs.len() >= readings_then + 2, "{regs:?}");
        let tail = &regs[readings_then..];
        assert!(tail.windows(2).all(|w| w[0] == w[1]), "{tail:?}");
    }

    // A forged command (another key) delivered by a compromised broker: refused, signed ack.
    let c = Command {
        id: CommandId::random(),
        meter_id: meter.clone(),
        body: CommandBody::Reconnect,
        counter: 100,
        issued_at: now.replace_nanosecond(0).unwrap(),
        expires_at: now + time::Duration::minutes(5),
    };
    let forged = command::sign(&ed25519(), &c).unwrap();
    assert!(fleet.inject_command(&meter, &meter.commands_topic(), forged));
    let a = ack_of(&pipeline, c.id).await;
    assert_eq!(a.outcome, AckOutcome::Refused(Refusal::UnknownSigner));
    assert_eq!(fleet.relay_state(&meter), Some(Relay::Disconnected));

    // Firmware: the manifest in the command, the image in chunks on the firmware topic.
    let image: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
    let digest: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &image)
        .as_ref()
        .try_into()
        .unwrap();
    let manifest = Manifest {
        manifest_version: firmware::MANIFEST_VERSION,
        sequence: 7,
        vendor_id: "gridward-sim".into(),
        class_id: "sim-meter-1".into(),
        version: "1.7.0".into(),
        digest,
        size: image.len() as u64,
        expires_at: None,
        rollback_from: None,
    };
    let signed = firmware::sign_manifest(&maker, &manifest).unwrap();
    let (cid, bytes) = command(CommandBody::FirmwareUpdate { manifest: signed }, 2);
    deliver(&endpoint, &meter, meter.commands_topic(), bytes).await;
    for chunk in firmware::chunks(digest, &image) {
        deliver(&endpoint, &meter, meter.firmware_topic(), chunk.encode()).await;
    }
    let a = ack_of(&pipeline, cid).await;
    assert_eq!(
        a.outcome,
        AckOutcome::Done {
            detail: Some("firmware 1.7.0 (sequence 7) confirmed".into())
        }
    );
    let st = fleet.device_state(&meter).unwrap();
    assert_eq!(
        (st.firmware.version.as_str(), st.firmware.sequence),
        ("1.7.0", 7)
    );
    assert_eq!(st.last_command, Some(2));
    let report = fleet.stop(Duration::from_secs(5)).await;
    assert_eq!(report.stats.unacknowledged(), 0, "{:?}", report.stats);
    assert_eq!(report.stats.command_acks, 3);

    // Restart: relay, firmware and the command counter come back from the state file.
    let fleet = Fleet::start(vec![MeterSpec::from(load(&s, 1))], make_config())
        .await
        .unwrap();
    let st = fleet.device_state(&meter).unwrap();
    assert_eq!(st.relay, Relay::Disconnected);
    assert_eq!(
        (st.firmware.version.as_str(), st.firmware.sequence),
        ("1.7.0", 7)
    );
    assert_eq!(st.last_command, Some(2));
    // The old disconnect again (a replay): refused, counter not fresh.
    let (_, replay) = command(CommandBody::Disconnect, 1);
    let rid = command::unverified_id(&replay).unwrap();
    deliver(&endpoint, &meter, meter.commands_topic(), replay).await;
    assert_eq!(
        ack_of(&pipeline, rid).await.outcome,
        AckOutcome::Refused(Refusal::CounterNotFresh)
    );
    // A genuine reconnect after the restart.
    let (cid, bytes) = command(CommandBody::Reconnect, 3);
    deliver(&endpoint, &meter, meter.commands_topic(), bytes).await;
    assert_eq!(fleet.relay_state(&meter), Some(Relay::Connected));
    assert!(matches!(
        ack_of(&pipeline, cid).await.outcome,
        AckOutcome::Done { .. }
    ));
    fleet.stop(Duration::from_secs(5)).await;
    let stored = pipeline.stored.lock().unwrap();
    assert!(stored.refused.is_empty(), "{:?}", stored.refused);
    endpoint.shutdown();
}
