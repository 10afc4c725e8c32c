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
use gridward_core::document::{ConcentratorEvent, Document, EventKind, Format, Limits};
use gridward_core::envelope::{EnvelopeError, SigningKey, VerifyingKey, verify};
use gridward_core::firmware::{self, Manifest};
use gridward_core::relay;
use gridward_core::security::{Reason, SecurityEvent};
use gridward_meter::command::Relay;
use gridward_meter::concentrator::{
    ConcentratorIdentity, ConcentratorSpec, ForeignRelay, PlcLoss, RelayConfig,
};
use gridward_meter::fleet::{Clock, Fleet, FleetConfig, MeterSpec};
use gridward_meter::identity::{self, MeterIdentity, Trust};
use gridward_meter::meter::Misbehaviour;
use gridward_meter::scenario::{Behaviour, GroundTruth};
use gridward_mqtt::client::Protocol;
use gridward_mqtt::{
    DeviceKind, Endpoint, EndpointConfig, EventSink, InboundPublish, OutboundResult,
    PublishHandler, Verdict,
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
    /// What was stored, in arrival order: the meter and `Reading` or the event kind.
    log: Vec<(MeterId, String)>,
    /// Concentrators' own events.
    concentrator_events: Vec<ConcentratorEvent>,
    /// Relay batches received.
    batches: u64,
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
    /// The topology: meter → the concentrator it is registered behind.
    behind: HashMap<MeterId, MeterId>,
    /// The meters' envelope keys, for relayed envelopes.
    keys: HashMap<MeterId, VerifyingKey>,
}

impl Pipeline {
    fn decide(&self, msg: &InboundPublish) -> Verdict {
        let mut s = self.stored.lock().unwrap();
        if msg.device == DeviceKind::Concentrator {
            return self.decide_concentrator(&mut s, msg);
        }
        let key = VerifyingKey::from_spki_der(&msg.cert_spki).unwrap();
        Self::decide_envelope(&mut s, &msg.meter_id, &msg.topic, &msg.payload, &key)
    }

    /// A concentrator's publish: its own event (its certificate's key), or a relay batch whose
    /// every envelope is verified with its meter's key, for the meters registered behind it.
    fn decide_concentrator(&self, s: &mut Stored, msg: &InboundPublish) -> Verdict {
        let refuse = |s: &mut Stored, reason| {
            s.refused.push((msg.meter_id.clone(), reason));
            Verdict::Rejected(reason)
        };
        if msg.topic == relay::concentrator_events_topic(&msg.meter_id) {
            let key = VerifyingKey::from_spki_der(&msg.cert_spki).unwrap();
            let Ok(v) = verify(&msg.payload, &key, &msg.meter_id, &msg.topic) else {
                return refuse(s, Reason::BadSignature);
            };
            let Ok(doc) = v.into_document(&Limits::default()) else {
                return refuse(s, Reason::InvalidDocument);
            };
            let Document::ConcentratorEvent(e) = doc.document() else {
                return refuse(s, Reason::InvalidDocument);
            };
            s.log
                .push((msg.meter_id.clone(), e.kind.as_str().to_owned()));
            s.concentrator_events.push(e.clone());
            return Verdict::Accepted;
        }
        let Ok(items) = relay::decode_batch(&msg.payload) else {
            return refuse(s, Reason::MalformedEnvelope);
        };
        s.batches += 1;
        let mut verdict = Verdict::Accepted;
        for item in items {
            let registered = relay::meter_topic(&item.topic)
                .map(|(m, _)| m)
                .filter(|m| self.behind.get(m) == Some(&msg.meter_id));
            let Some(meter) = registered else {
                verdict = refuse(s, Reason::RelayNotAuthorized);
                continue;
            };
            let key = self.keys[&meter].clone();
            let v = Self::decide_envelope(s, &meter, &item.topic, &item.envelope, &key);
            if matches!(v, Verdict::Rejected(_)) {
                verdict = v;
            }
        }
        verdict
    }

    fn decide_envelope(
        s: &mut Stored,
        meter: &MeterId,
        topic: &str,
        payload: &[u8],
        key: &VerifyingKey,
    ) -> Verdict {
        let refuse = |s: &mut Stored, reason| {
            s.refused.push((meter.clone(), reason));
            Verdict::Rejected(reason)
        };
        let verified = match verify(payload, key, meter, topic) {
            Ok(v) => v,
            Err(EnvelopeError::BadSignature) => return refuse(s, Reason::BadSignature),
            Err(_) => return refuse(s, Reason::MalformedEnvelope),
        };
        let counter = verified.header().counter;
        let last = s.last.get(meter).copied();
        if last.is_some_and(|l| counter <= l) {
            let same = s
                .readings
                .get(meter)
                .and_then(|r| r.get(&counter))
                .is_some_and(|stored| stored[..] == payload[..]);
            if same {
                s.duplicates += 1;
                return Verdict::Duplicate;
            }
            return refuse(s, Reason::Replay);
        }
        let Ok(doc) = verified.into_document(&Limits::default()) else {
            return refuse(s, Reason::InvalidDocument);
        };
        let what = match doc.document() {
            Document::Event(e) => e.kind.as_str().to_owned(),
            Document::Reading(_) => "Reading".to_owned(),
            _ => "other".to_owned(),
        };
        s.log.push((meter.clone(), what));
        match doc.document() {
            Document::Event(e) => s.events.push((meter.clone(), e.kind)),
            Document::CommandAck(a) => s.acks.push(a.clone()),
            Document::Reading(r) => s
                .registers
                .entry(meter.clone())
                .or_default()
                .push(r.energy_kwh),
            Document::ConcentratorEvent(_) => {}
        }
        s.last.insert(meter.clone(), counter);
        s.readings
            .entry(meter.clone())
            .or_default()
            .insert(counter, payload.to_vec());
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
struct Events(Mutex<Vec<SecurityEvent>>, Mutex<Vec<MeterId>>);

impl EventSink for Events {
    fn security_event(&self, event: SecurityEvent) {
        self.0.lock().unwrap().push(event);
    }
    fn connection(&self, _: &MeterId, _: bool, _: OffsetDateTime) {}
    fn session_replaced(
        &self,
        device: &MeterId,
        _: std::net::SocketAddr,
        _: std::net::SocketAddr,
        _: OffsetDateTime,
    ) {
        self.1.lock().unwrap().push(device.clone());
    }
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

/// The live behaviours, with their ground truth: a thief (cover opened, then half the load), a
/// feeder outage of three meters (last gasps, no readings, restores), and a cloned meter (the
/// endpoint's takeover rule drops the two in turn; the clone's counters are refused as replays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thief_outage_and_clone_behave_and_record_ground_truth() {
    let s = setup(6);
    let pipeline = Arc::new(Pipeline::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (endpoint, events, _task) = start_endpoint(&s.pki, &pipeline, listener).await;

    let specs = (1..=6).map(|n| MeterSpec::from(load(&s, n))).collect();
    let behaviours = vec![
        Behaviour::theft(id(1), Duration::from_millis(800)),
        Behaviour::Outage {
            name: "feeder-a".into(),
            meters: vec![id(2), id(3), id(4)],
            after: Duration::from_millis(1000),
            duration: Some(Duration::from_millis(1500)),
            spread: Duration::from_millis(300),
        },
        Behaviour::Clone {
            identity: load(&s, 5),
            after: Duration::from_millis(600),
        },
    ];
    let mut config = fleet_config(&s, port);
    config.format = Format::Json;
    let started = OffsetDateTime::now_utc();
    let fleet = Fleet::start_with(specs, Vec::new(), behaviours, config)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let report = fleet.stop(Duration::from_secs(5)).await;
    let stored = pipeline.stored.lock().unwrap();

    // Ground truth: the theft, one outage of three meters (restored), the clone.
    let kinds: Vec<&str> = report.ground_truth.iter().map(GroundTruth::kind).collect();
    assert_eq!(
        kinds,
        ["clone", "theft", "outage"],
        "{:?}",
        report.ground_truth
    );
    match &report.ground_truth[2] {
        GroundTruth::Outage {
            meters,
            failed_at,
            restored_at: Some(restored_at),
            ..
        } => {
            assert_eq!(meters, &[id(2), id(3), id(4)]);
            assert!(*failed_at >= started + time::Duration::milliseconds(1000));
            let off = *restored_at - *failed_at;
            assert!(off >= time::Duration::milliseconds(1200), "{off}");
        }
        other => panic!("{other:?}"),
    }

    // The thief's cover event, then its readings go on.
    let log = &stored.log;
    let cover = log
        .iter()
        .position(|(m, k)| *m == id(1) && k == "CoverOpened")
        .expect("cover opened");
    assert!(
        log[cover..]
            .iter()
            .any(|(m, k)| *m == id(1) && k == "Reading")
    );
    let regs = &stored.registers[&id(1)];
    assert!(regs.windows(2).all(|w| w[0] <= w[1]));
    // Each meter of the outage: PowerFail, no reading, PowerRestore, readings again.
    for n in 2..=4 {
        let mine: Vec<&str> = log
            .iter()
            .filter(|(m, _)| *m == id(n))
            .map(|(_, k)| k.as_str())
            .collect();
        let fail = mine.iter().position(|k| *k == "PowerFail").unwrap();
        let back = mine.iter().position(|k| *k == "PowerRestore").unwrap();
        assert!(fail < back);
        let held_before = mine[fail + 1..back]
            .iter()
            .filter(|k| **k == "Reading")
            .count();
        // At most the readings signed before the power failed and still in flight.
        assert!(held_before <= 1, "{mine:?}");
        assert!(mine[back..].contains(&"Reading"), "{mine:?}");
        let outcome = report.meters.iter().find(|m| m.id == id(n)).unwrap();
        assert!(outcome.counts.unpowered >= 5, "{:?}", outcome.counts);
    }
    // Meter 6 is undisturbed.
    assert!(!log.iter().any(|(m, k)| *m == id(6) && k != "Reading"));

    // The clone: taken over in turns with the genuine meter, its reused counters refused.
    assert_eq!(report.clones.len(), 1);
    assert!(report.clone_stats.connects >= 1, "{:?}", report.clone_stats);
    let replaced = events
        .1
        .lock()
        .unwrap()
        .iter()
        .filter(|m| **m == id(5))
        .count();
    assert!(replaced >= 2, "{replaced}");
    assert!(
        stored.refused.iter().any(|r| *r == (id(5), Reason::Replay)),
        "{:?}",
        stored.refused
    );
    assert!(stored.refused.iter().all(|(m, _)| *m == id(5)));
    // Only the cloned meter's messages were refused (the genuine one's too, when the clone was
    // ahead): the rest of the fleet lost nothing.
    for m in report.meters.iter().filter(|m| m.id != id(5)) {
        assert_eq!((m.counts.rejected, m.held), (0, 0), "{m:?}");
    }
    endpoint.shutdown();
}

/// A data concentrator with four PLC meters behind it, over the real endpoint: each meter's
/// own envelopes arrive in relay batches and verify with that meter's key; batches in flight
/// when the endpoint goes away are resent after the reconnect and every reading is stored once;
/// a PLC meter lost for a while is reported (MeterLost, MeterFound, signed by the
/// concentrator); an altered envelope and one of a meter not behind it are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concentrator_relays_its_meters_envelopes_in_batches() {
    let s = setup(6);
    let dc = MeterId::new("dc-1").unwrap();
    Pki::open(&s.pki, None)
        .unwrap()
        .issue_concentrator(&dc, &IssueOptions::new("test"), OffsetDateTime::now_utc())
        .unwrap();
    let trust = Trust::load(&s.pki).unwrap();
    let plc: Vec<MeterId> = (1..=4).map(id).collect();
    let mut pipeline = Pipeline::default();
    for n in 1..=6 {
        let m = load(&s, n);
        pipeline
            .keys
            .insert(id(n), m.signing_key().verifying_key().unwrap());
    }
    for m in &plc {
        pipeline.behind.insert(m.clone(), dc.clone());
    }
    // A slow store: batches are in flight when the endpoint goes away.
    *pipeline.delay.lock().unwrap() = Duration::from_millis(250);
    let pipeline = Arc::new(pipeline);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (endpoint, _, task) = start_endpoint(&s.pki, &pipeline, listener).await;

    let identity = ConcentratorIdentity::load(&s.pki, &dc, &trust, &TlsOptions::default()).unwrap();
    let mut spec = ConcentratorSpec::new(
        identity,
        (1..=4).map(|n| MeterSpec::from(load(&s, n))).collect(),
    );
    spec.relay = RelayConfig {
        max_items: 5,
        linger: time::Duration::milliseconds(150),
        ..RelayConfig::default()
    };
    spec.plc_losses.push(PlcLoss {
        meter: id(2),
        after: Duration::from_millis(600),
        duration: Some(Duration::from_millis(800)),
    });
    spec.alter_relay_after = Some(Duration::from_millis(900));
    spec.relay_for = Some(ForeignRelay {
        identity: load(&s, 6),
        after: Duration::from_millis(1100),
    });
    let mut config = fleet_config(&s, addr.port());
    config.interval = time::Duration::milliseconds(100);
    config.format = Format::Json;
    let fleet = Fleet::start_with(
        vec![MeterSpec::from(load(&s, 5))],
        vec![spec],
        Vec::new(),
        config,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let live = fleet.concentrator_stats(&dc).unwrap().snapshot();
    assert_eq!(live.connected, 1, "{live:?}");
    // The endpoint goes away with batches in flight, and comes back.
    endpoint.shutdown();
    task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let (endpoint, _, _task) = start_endpoint(&s.pki, &pipeline, listener).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = fleet.stop(Duration::from_secs(10)).await;
    let stored = pipeline.stored.lock().unwrap();

    assert_eq!(report.concentrators.len(), 1);
    let c = &report.concentrators[0];
    let cs = c.stats;
    assert_eq!(c.held, 0, "{cs:?}");
    assert!(cs.connects >= 2 && cs.batches_resent >= 1, "{cs:?}");
    // Every PLC meter's readings stored exactly once, with consecutive counters, its own.
    for outcome in &c.meters {
        assert_eq!(outcome.held, 0, "{outcome:?}");
        assert_eq!(outcome.counts.rejected, 0, "{outcome:?}");
        let counters: Vec<u64> = stored.readings[&outcome.id].keys().copied().collect();
        assert_eq!(counters, (1..=outcome.counts.readings).collect::<Vec<_>>());
    }
    let plc_readings: u64 = c.meters.iter().map(|m| m.counts.readings).sum();
    assert!(plc_readings >= 4 * 20, "{plc_readings}");
    assert_eq!(cs.envelopes_acked, cs.envelopes_relayed, "{cs:?}");
    assert!(
        stored.batches >= plc_readings / 5,
        "{} batches",
        stored.batches
    );
    // The directly connected meter is unaffected.
    assert_eq!(report.meters.len(), 1);
    assert_eq!(report.meters[0].held, 0);
    // MeterLost then MeterFound, signed by the concentrator; the lost meter's readings waited.
    let kinds: Vec<(&str, Vec<MeterId>)> = stored
        .concentrator_events
        .iter()
        .map(|e| (e.kind.as_str(), e.meters.clone()))
        .collect();
    assert_eq!(
        kinds,
        [("MeterLost", vec![id(2)]), ("MeterFound", vec![id(2)])]
    );
    assert!(
        stored
            .concentrator_events
            .iter()
            .all(|e| e.concentrator_id == dc)
    );
    let lost = stored
        .log
        .iter()
        .position(|(_, k)| k == "MeterLost")
        .unwrap();
    let found = stored
        .log
        .iter()
        .position(|(_, k)| k == "MeterFound")
        .unwrap();
    let during = stored.log[lost..found]
        .iter()
        .filter(|(m, _)| *m == id(2))
        .count();
    assert!(
        during <= 2,
        "{during} readings of the lost meter got through"
    );
    assert!(stored.log[found..].iter().any(|(m, _)| *m == id(2)));
    // The tamper tests: refused, nothing else.
    assert_eq!((cs.probes_sent, cs.probes_refused), (2, 2), "{cs:?}");
    assert!(
        stored
            .refused
            .iter()
            .any(|(_, r)| *r == Reason::BadSignature),
        "{:?}",
        stored.refused
    );
    assert!(
        stored
            .refused
            .contains(&(dc.clone(), Reason::RelayNotAuthorized)),
        "{:?}",
        stored.refused
    );
    assert_eq!(stored.refused.len(), 2, "{:?}", stored.refused);
    assert!(!stored.readings.contains_key(&id(6)));
    // Ground truth of all three.
    let kinds: Vec<&str> = report.ground_truth.iter().map(GroundTruth::kind).collect();
    assert_eq!(kinds, ["plc_loss", "altered_relay", "unauthorized_relay"]);
    assert!(matches!(
        &report.ground_truth[0],
        GroundTruth::PlcLoss { meter, found_at: Some(_), .. } if *meter == id(2)
    ));
    assert!(matches!(
        &report.ground_truth[2],
        GroundTruth::UnauthorizedRelay { meter, concentrator, .. } if *meter == id(6) && *concentrator == dc
    ));
    endpoint.shutdown();
}
