//! The MQTT endpoint end to end: real sockets on 127.0.0.1, a real Gridward PKI in a temporary
//! directory, real TLS with the `gridward-pki` profile, the crate's own client, and
//! `mosquitto_pub` / `mosquitto_sub` (Debian mosquitto-clients) as clients not written here.
//!
//! The recording `PublishHandler` / `EventSink` below is the endpoint's real interface to the
//! ingest pipeline, not a stand-in for a network peer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gridward_core::MeterId;
use gridward_core::security::{Reason, SecurityEvent};
use gridward_mqtt::client::{
    Client, ClientError, ClientOptions, ConnAck, Packet, Protocol, QoS, connect_tls, tls_connect,
};
use gridward_mqtt::{
    DeviceKind, Endpoint, EndpointConfig, EventSink, InboundPublish, OutboundRefusal,
    OutboundResult, PublishError, PublishHandler, Verdict,
};
use gridward_pki::tls::{TlsMaterial, client_config, server_config};
use gridward_pki::{
    CrlIssuer, InitOptions, IssueOptions, LeafKind, Pki, RevocationReason, RevokeTarget,
};
use rustls::ClientConfig;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

const ACTOR: &str = "test";

// ----------------------------------------------------------------------------------------------
// PKI fixture

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    now: OffsetDateTime,
}

impl Fixture {
    /// Root + issuing CA (created 400 days ago), server "hes" (localhost, 127.0.0.1),
    /// meters M-1..M-3 and an expired meter EXP-1, fresh CRLs.
    fn new() -> Self {
        let now = OffsetDateTime::now_utc();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let pki = Pki::init(
            &dir,
            &InitOptions::new(ACTOR, now - time::Duration::days(400)),
        )
        .unwrap();
        let opts = IssueOptions::new(ACTOR);
        pki.issue_server("hes", &["localhost".into(), "127.0.0.1".into()], &opts, now)
            .unwrap();
        for id in ["M-1", "M-2", "M-3"] {
            pki.issue_meter(&MeterId::new(id).unwrap(), &opts, now)
                .unwrap();
        }
        let mut short = IssueOptions::new(ACTOR);
        short.validity_days = Some(1);
        pki.issue_meter(
            &MeterId::new("EXP-1").unwrap(),
            &short,
            now - time::Duration::days(100),
        )
        .unwrap();
        pki.write_crls(now, 30, ACTOR).unwrap();
        Self {
            _tmp: tmp,
            dir,
            pki,
            now,
        }
    }

    fn server_material(&self) -> TlsMaterial {
        self.pki.tls_material(LeafKind::Server, "hes").unwrap()
    }

    fn meter_tls(&self, id: &str) -> Arc<ClientConfig> {
        client_config(&self.pki.tls_material(LeafKind::Meter, id).unwrap()).unwrap()
    }

    fn meter_dir(&self, id: &str) -> PathBuf {
        self.dir.join("meters").join(id)
    }
}

// ----------------------------------------------------------------------------------------------
// Recording pipeline

#[derive(Default)]
struct Recorder {
    publishes: Mutex<Vec<InboundPublish>>,
    events: Mutex<Vec<SecurityEvent>>,
    conns: Mutex<Vec<(String, bool)>>,
    /// (meter, topic) of every `EventSink::subscribed`.
    subs: Mutex<Vec<(String, String)>>,
    /// (id, kind, source, connected) of every `EventSink::device_connection`.
    devices: Mutex<Vec<(String, DeviceKind, SocketAddr, bool)>>,
    /// (id, previous, current) of every `EventSink::session_replaced`.
    replaced: Mutex<Vec<(String, SocketAddr, SocketAddr)>>,
    verdict: Mutex<Option<Verdict>>,
    /// When set, each message waits for one permit before its verdict.
    gate: Option<Arc<Semaphore>>,
    /// When set, a message whose payload is a number n waits (100 - n) ms: later messages are
    /// decided first.
    reverse_delays: bool,
}

impl Recorder {
    fn gated() -> (Arc<Self>, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        (
            Arc::new(Self {
                gate: Some(Arc::clone(&gate)),
                ..Self::default()
            }),
            gate,
        )
    }

    fn count(&self, reason: Reason) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.reason == reason)
            .count()
    }

    fn event(&self, reason: Reason) -> Option<SecurityEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.reason == reason)
            .cloned()
    }

    fn reasons(&self) -> Vec<Reason> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.reason)
            .collect()
    }

    fn publishes(&self) -> Vec<InboundPublish> {
        self.publishes.lock().unwrap().clone()
    }

    fn conns(&self) -> Vec<(String, bool)> {
        self.conns.lock().unwrap().clone()
    }

    fn subs(&self) -> Vec<(String, String)> {
        self.subs.lock().unwrap().clone()
    }

    fn devices(&self) -> Vec<(String, DeviceKind, SocketAddr, bool)> {
        self.devices.lock().unwrap().clone()
    }

    fn replaced(&self) -> Vec<(String, SocketAddr, SocketAddr)> {
        self.replaced.lock().unwrap().clone()
    }
}

impl PublishHandler for Recorder {
    fn handle(&self, msg: InboundPublish) -> impl Future<Output = Verdict> + Send + 'static {
        // The synchronous part runs in PUBLISH order.
        self.publishes.lock().unwrap().push(msg);
        let gate = self.gate.clone();
        let verdict = self.verdict.lock().unwrap().unwrap_or(Verdict::Accepted);
        let delay = self
            .reverse_delays
            .then(|| {
                std::str::from_utf8(&self.publishes.lock().unwrap().last().unwrap().payload)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .map(|n| Duration::from_millis(100 - n));
        async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            verdict
        }
    }
}

impl EventSink for Recorder {
    fn security_event(&self, event: SecurityEvent) {
        self.events.lock().unwrap().push(event);
    }

    fn connection(&self, meter: &MeterId, connected: bool, _at: OffsetDateTime) {
        self.conns
            .lock()
            .unwrap()
            .push((meter.to_string(), connected));
    }

    fn device_connection(
        &self,
        device: &MeterId,
        kind: DeviceKind,
        source: SocketAddr,
        connected: bool,
        at: OffsetDateTime,
    ) {
        self.devices
            .lock()
            .unwrap()
            .push((device.to_string(), kind, source, connected));
        // What the default does: the tests below that read `conns` see every device.
        self.connection(device, connected, at);
    }

    fn session_replaced(
        &self,
        device: &MeterId,
        previous: SocketAddr,
        current: SocketAddr,
        _at: OffsetDateTime,
    ) {
        self.replaced
            .lock()
            .unwrap()
            .push((device.to_string(), previous, current));
    }

    fn subscribed(&self, meter: &MeterId, topic: &str, _at: OffsetDateTime) {
        self.subs
            .lock()
            .unwrap()
            .push((meter.to_string(), topic.to_owned()));
    }
}

// ----------------------------------------------------------------------------------------------
// Helpers

struct Server {
    ep: Endpoint<Recorder>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

async fn start(fx: &Fixture, cfg: EndpointConfig, rec: &Arc<Recorder>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = server_config(&fx.server_material()).unwrap();
    let ep = Endpoint::new(
        cfg,
        tls,
        Arc::clone(rec),
        Arc::clone(rec) as Arc<dyn EventSink>,
        Arc::new(OffsetDateTime::now_utc),
    )
    .unwrap();
    let runner = ep.clone();
    let task = tokio::spawn(async move {
        runner.run(listener, std::future::pending()).await.unwrap();
    });
    Server { ep, addr, task }
}

fn opts(id: &str, protocol: Protocol) -> ClientOptions {
    ClientOptions {
        client_id: id.into(),
        keep_alive: Duration::from_secs(30),
        clean_session: true,
        protocol,
        connect_timeout: Duration::from_secs(5),
    }
}

async fn connect_as(
    srv: &Server,
    fx: &Fixture,
    cert: &str,
    client_id: &str,
    protocol: Protocol,
) -> Result<(Client, ConnAck), ClientError> {
    connect_tls(
        srv.addr,
        "localhost",
        fx.meter_tls(cert),
        &opts(client_id, protocol),
    )
    .await
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Next packet, or None if the connection ended (closed, reset, TLS alert).
async fn next(c: &mut Client) -> Option<Packet> {
    match tokio::time::timeout(Duration::from_secs(10), c.recv()).await {
        Ok(Ok(p)) => Some(p),
        Ok(Err(_)) => None,
        Err(_) => panic!("no packet and no close within 10 s"),
    }
}

async fn expect_closed(c: &mut Client) {
    loop {
        match next(c).await {
            None => return,
            Some(Packet::Disconnect { .. }) => {}
            Some(p) => panic!("expected the connection to close, got {p:?}"),
        }
    }
}

fn readings(id: &str) -> String {
    format!("meters/{id}/readings")
}

// ----------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genuine_meter_gets_puback_only_after_the_verdict() {
    let fx = Fixture::new();
    let (rec, gate) = Recorder::gated();
    let srv = start(&fx, EndpointConfig::default(), &rec).await;

    let (client, ack) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V311)
        .await
        .unwrap();
    assert_eq!(
        ack,
        ConnAck {
            session_present: false,
            code: 0
        }
    );
    wait_until("connect notification", || {
        rec.conns() == vec![("M-1".into(), true)]
    })
    .await;
    assert!(srv.ep.is_connected(&MeterId::new("M-1").unwrap()));

    let (mut reader, mut writer) = client.into_split();
    writer
        .publish(
            &readings("M-1"),
            b"envelope-1".to_vec(),
            QoS::AtLeastOnce,
            1,
        )
        .await
        .unwrap();
    writer
        .publish(
            "meters/M-1/events",
            b"envelope-2".to_vec(),
            QoS::AtLeastOnce,
            2,
        )
        .await
        .unwrap();
    writer
        .publish(&readings("M-1"), b"envelope-3".to_vec(), QoS::AtMostOnce, 0)
        .await
        .unwrap();
    wait_until("three messages handed over", || rec.publishes().len() == 3).await;

    // Both QoS 1 messages are in flight at once, and no PUBACK goes out before a verdict.
    let early = tokio::time::timeout(Duration::from_millis(300), reader.recv()).await;
    assert!(early.is_err(), "PUBACK before the verdict: {early:?}");

    gate.add_permits(3);
    assert_eq!(
        reader.recv().await.unwrap(),
        Packet::PubAck {
            pkid: 1,
            reason_code: 0
        }
    );
    assert_eq!(
        reader.recv().await.unwrap(),
        Packet::PubAck {
            pkid: 2,
            reason_code: 0
        }
    );

    let msgs = rec.publishes();
    let issued = fx.pki.tls_material(LeafKind::Meter, "M-1").unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
    assert_eq!(msgs[0].meter_id.as_str(), "M-1");
    assert_eq!(msgs[0].topic, "meters/M-1/readings");
    assert_eq!(msgs[0].payload, Bytes::from_static(b"envelope-1"));
    assert_eq!(msgs[0].qos, 1);
    assert_eq!(&*msgs[0].cert_spki, cert.public_key().raw);
    assert_eq!(
        msgs[0].cert_serial,
        hex::encode(cert.raw_serial()).trim_start_matches("00")
    );
    assert_eq!(msgs[0].source.ip(), srv.addr.ip());
    assert_eq!(msgs[1].topic, "meters/M-1/events");
    assert_eq!(msgs[2].qos, 0);
    assert!((msgs[0].received_at - fx.now).abs() < time::Duration::minutes(5));

    writer.disconnect().await.unwrap();
    wait_until("disconnect notification", || {
        rec.conns() == vec![("M-1".into(), true), ("M-1".into(), false)]
    })
    .await;
    assert!(rec.reasons().is_empty(), "{:?}", rec.reasons());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_are_handed_over_and_acknowledged_in_order() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder {
        reverse_delays: true,
        ..Recorder::default()
    });
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let (client, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    let (mut reader, mut writer) = client.into_split();
    // 64 publishes in one write: twice the in-flight window, so back-pressure is exercised too.
    for n in 1..=64u16 {
        writer
            .queue_publish(
                &readings("M-1"),
                (n % 100).to_string().into_bytes(),
                QoS::AtLeastOnce,
                n,
            )
            .unwrap();
    }
    writer.flush().await.unwrap();
    for n in 1..=64u16 {
        assert_eq!(
            reader.recv().await.unwrap(),
            Packet::PubAck {
                pkid: n,
                reason_code: 0
            }
        );
    }
    let order: Vec<String> = rec
        .publishes()
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    let expected: Vec<String> = (1..=64).map(|n: u16| n.to_string()).collect();
    assert_eq!(
        order, expected,
        "the pipeline sees one connection's messages in PUBLISH order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_connect_and_rejected_verdict_codes() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;

    let (mut c, _) = connect_as(&srv, &fx, "M-2", "M-2", Protocol::V5)
        .await
        .unwrap();
    c.publish(&readings("M-2"), b"ok".to_vec(), QoS::AtLeastOnce, 7)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 7,
            reason_code: 0
        })
    );
    *rec.verdict.lock().unwrap() = Some(Verdict::Rejected(Reason::BadSignature));
    c.publish(&readings("M-2"), b"tampered".to_vec(), QoS::AtLeastOnce, 8)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 8,
            reason_code: 0x87
        })
    );
    *rec.verdict.lock().unwrap() = Some(Verdict::Rejected(Reason::InvalidDocument));
    c.publish(&readings("M-2"), b"bad doc".to_vec(), QoS::AtLeastOnce, 9)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 9,
            reason_code: 0x99
        })
    );
    *rec.verdict.lock().unwrap() = Some(Verdict::Duplicate);
    c.publish(&readings("M-2"), b"resend".to_vec(), QoS::AtLeastOnce, 10)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 10,
            reason_code: 0
        })
    );
    c.ping().await.unwrap();
    assert_eq!(next(&mut c).await, Some(Packet::PingResp));
    assert_eq!(rec.publishes().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_of_another_meter_is_refused() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;

    for (protocol, code) in [(Protocol::V311, 5), (Protocol::V5, 0x87)] {
        let err = connect_as(&srv, &fx, "M-1", "M-2", protocol)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Refused(ConnAck { code: c, .. }) if c == code),
            "{err}"
        );
    }
    wait_until("two events", || rec.count(Reason::ClientIdMismatch) == 2).await;
    let e = rec.event(Reason::ClientIdMismatch).unwrap();
    assert_eq!(e.meter_id.as_ref().map(MeterId::as_str), Some("M-1"));
    assert!(e.detail.contains("M-2"), "{}", e.detail);
    assert!(e.source.is_some());
    assert!(rec.conns().is_empty());
    assert!(rec.publishes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_another_meters_topic_is_refused() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;

    // 3.1.1: the connection is closed.
    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V311)
        .await
        .unwrap();
    c.publish(&readings("M-2"), b"spoof".to_vec(), QoS::AtLeastOnce, 1)
        .await
        .unwrap();
    expect_closed(&mut c).await;
    // 5: PUBACK 0x87, then DISCONNECT 0x87.
    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    c.publish(
        "meters/M-1/commands",
        b"spoof".to_vec(),
        QoS::AtLeastOnce,
        1,
    )
    .await
    .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 1,
            reason_code: 0x87
        })
    );
    assert_eq!(
        next(&mut c).await,
        Some(Packet::Disconnect { reason_code: 0x87 })
    );

    wait_until("two events", || rec.count(Reason::TopicNotAuthorized) == 2).await;
    let e = rec.event(Reason::TopicNotAuthorized).unwrap();
    assert_eq!(e.meter_id.as_ref().map(MeterId::as_str), Some("M-1"));
    assert!(e.detail.contains("meters/M-2/readings"), "{}", e.detail);
    assert!(
        rec.publishes().is_empty(),
        "nothing refused reaches the pipeline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_verdicts_before_a_refusal_is_bounded() {
    let fx = Fixture::new();
    let (rec, gate) = Recorder::gated();
    let mut cfg = EndpointConfig::default();
    cfg.shutdown_grace = Duration::from_millis(300);
    let srv = start(&fx, cfg, &rec).await;
    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    c.publish(&readings("M-1"), b"slow".to_vec(), QoS::AtLeastOnce, 1)
        .await
        .unwrap();
    c.publish(&readings("M-2"), b"spoof".to_vec(), QoS::AtLeastOnce, 2)
        .await
        .unwrap();
    // The pipeline never answers: after the grace period the session ends without the PUBACKs.
    let t = std::time::Instant::now();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::Disconnect { reason_code: 0x87 })
    );
    assert!(t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(3));
    expect_closed(&mut c).await;
    // The message handed over is still being processed (not cancelled); releasing it is harmless.
    gate.add_permits(1);
    assert_eq!(rec.publishes().len(), 1);
    assert_eq!(rec.count(Reason::TopicNotAuthorized), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_other_than_own_commands_fail() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    for (protocol, fail) in [(Protocol::V311, 0x80), (Protocol::V5, 0x87)] {
        let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", protocol).await.unwrap();
        c.subscribe(1, "#", QoS::AtLeastOnce).await.unwrap();
        assert_eq!(
            next(&mut c).await,
            Some(Packet::SubAck {
                pkid: 1,
                return_codes: vec![fail]
            })
        );
        c.subscribe(2, "meters/M-2/commands", QoS::AtMostOnce)
            .await
            .unwrap();
        assert_eq!(
            next(&mut c).await,
            Some(Packet::SubAck {
                pkid: 2,
                return_codes: vec![fail]
            })
        );
        c.subscribe(3, "meters/M-1/commands", QoS::AtLeastOnce)
            .await
            .unwrap();
        assert_eq!(
            next(&mut c).await,
            Some(Packet::SubAck {
                pkid: 3,
                return_codes: vec![1]
            })
        );
        c.disconnect().await.unwrap();
    }
    wait_until("four events", || {
        rec.count(Reason::SubscribeNotAuthorized) == 4
    })
    .await;
    assert!(
        rec.event(Reason::SubscribeNotAuthorized)
            .unwrap()
            .detail
            .contains("\"#\"")
    );
}

/// A client TLS configuration with `chain`/`key` from `leaf` and this PKI's roots and CRLs (so
/// the client trusts the server and only the server's verdict on `leaf` matters).
fn client_presenting(fx: &Fixture, leaf: TlsMaterial) -> Arc<ClientConfig> {
    let ours = fx.server_material();
    client_config(&TlsMaterial {
        chain: leaf.chain,
        key: leaf.key,
        roots: ours.roots,
        crls: ours.crls,
    })
    .unwrap()
}

/// A foreign PKI (organisation `org`) that issued its own meter `id`.
fn foreign_meter(fx: &Fixture, org: &str, id: &str) -> (tempfile::TempDir, TlsMaterial) {
    let tmp = tempfile::tempdir().unwrap();
    let mut init = InitOptions::new(ACTOR, fx.now);
    init.org = org.into();
    let foreign = Pki::init(&tmp.path().join("pki"), &init).unwrap();
    foreign
        .issue_meter(
            &MeterId::new(id).unwrap(),
            &IssueOptions::new(ACTOR),
            fx.now,
        )
        .unwrap();
    let m = foreign.tls_material(LeafKind::Meter, id).unwrap();
    (tmp, m)
}

/// Connects with `cfg` as ClientID `id`, requires the connection to be refused, and waits for
/// exactly one more event, which must carry `reason` and `detail` (e.g. the rustls error).
async fn assert_tls_refused(
    srv: &Server,
    rec: &Recorder,
    cfg: Arc<ClientConfig>,
    id: &str,
    reason: Reason,
    detail: &str,
) {
    let before = rec.reasons().len();
    let r = connect_tls(srv.addr, "localhost", cfg, &opts(id, Protocol::V311)).await;
    assert!(r.is_err(), "{reason}: the handshake succeeded");
    wait_until(&format!("a {reason} event"), || {
        rec.reasons().len() > before
    })
    .await;
    let events = rec.events.lock().unwrap()[before..].to_vec();
    assert_eq!(
        events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        [reason],
        "{events:#?}"
    );
    assert!(
        events[0].detail.contains(detail),
        "{reason}: the detail does not name {detail:?}: {events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals_carry_the_right_reason() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    // Every refusal below comes from 127.0.0.1; banning (its own tests) would end the list early.
    let mut cfg = EndpointConfig::default();
    cfg.ban_after_failures = 0;
    let srv = start(&fx, cfg, &rec).await;
    let ours = fx.server_material();

    // No client certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ours.roots[0].clone()).unwrap();
    let anon = Arc::new(
        ClientConfig::builder_with_provider(gridward_pki::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    // Certificate-path refusals, each with its own reason (and the rustls error in the detail).
    // A foreign CA with other names (same meter id): unknown issuer.
    let (_t1, other) = foreign_meter(&fx, "Elsewhere", "M-1");
    // A foreign CA with the same names as ours: the chain names our issuing CA, but its
    // signature does not verify with our issuing CA's key.
    let (_t2, twin) = foreign_meter(&fx, "Gridward", "M-1");
    // A meter certificate that becomes valid in ten days.
    fx.pki
        .issue_meter(
            &MeterId::new("NYV-1").unwrap(),
            &IssueOptions::new(ACTOR),
            fx.now + time::Duration::days(10),
        )
        .unwrap();
    let refusals = [
        (anon, "M-1", Reason::CertificateMissing, "no certificates"),
        (
            client_presenting(&fx, other),
            "M-1",
            Reason::CertificateUntrusted,
            "UnknownIssuer",
        ),
        (
            client_presenting(&fx, twin),
            "M-1",
            Reason::CertificateUntrusted,
            "BadSignature",
        ),
        // The head-end's own server certificate (EKU serverAuth only) as a client certificate.
        (
            client_presenting(&fx, fx.server_material()),
            "hes",
            Reason::CertificateWrongPurpose,
            "extended key usage",
        ),
        (
            fx.meter_tls("EXP-1"),
            "EXP-1",
            Reason::CertificateExpired,
            "certificate expired",
        ),
        (
            fx.meter_tls("NYV-1"),
            "NYV-1",
            Reason::CertificateNotYetValid,
            "not valid yet",
        ),
    ];
    for (cfg, id, reason, detail) in refusals {
        assert_tls_refused(&srv, &rec, cfg, id, reason, detail).await;
    }

    // A valid certificate of this PKI that is not a meter's (a downstream client).
    fx.pki
        .issue_client("billing", &IssueOptions::new(ACTOR), fx.now)
        .unwrap();
    let billing =
        client_config(&fx.pki.tls_material(LeafKind::Client, "billing").unwrap()).unwrap();
    assert_tls_refused(
        &srv,
        &rec,
        billing,
        "billing",
        Reason::BadIdentity,
        "client billing",
    )
    .await;

    // A revoked one: revoke, then reload the server's material.
    fx.pki
        .revoke(
            &RevokeTarget::Identity {
                kind: Some(LeafKind::Meter),
                name: "M-3".into(),
            },
            RevocationReason::KeyCompromise,
            ACTOR,
            fx.now,
        )
        .unwrap();
    assert_eq!(srv.ep.reload_from_pki(&fx.dir, "hes").unwrap(), 0);
    assert_tls_refused(
        &srv,
        &rec,
        fx.meter_tls("M-3"),
        "M-3",
        Reason::CertificateRevoked,
        "Revoked",
    )
    .await;

    // An expired CRL: every handshake fails closed. (The meter keeps its fresh CRLs, or it
    // would refuse the server first.)
    let m1 = fx.meter_tls("M-1");
    fx.pki
        .write_crl(
            CrlIssuer::Issuing,
            fx.now - time::Duration::days(10),
            fx.now - time::Duration::days(1),
            ACTOR,
        )
        .unwrap();
    srv.ep.reload_from_pki(&fx.dir, "hes").unwrap();
    assert_tls_refused(
        &srv,
        &rec,
        m1,
        "M-1",
        Reason::CrlUnavailable,
        "revocation list expired",
    )
    .await;

    // TLS failures carry the source, never a meter id (nothing was proven).
    for e in rec.events.lock().unwrap().iter() {
        assert!(e.source.is_some() && e.meter_id.is_none(), "{e:?}");
    }
    assert!(rec.conns().is_empty());
    assert!(srv.ep.stats().handshake_failures >= 9);
    assert_eq!(
        rec.reasons(),
        [
            Reason::CertificateMissing,
            Reason::CertificateUntrusted,
            Reason::CertificateUntrusted,
            Reason::CertificateWrongPurpose,
            Reason::CertificateExpired,
            Reason::CertificateNotYetValid,
            Reason::BadIdentity,
            Reason::CertificateRevoked,
            Reason::CrlUnavailable,
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_a_revoked_serial_disconnects_the_live_session() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;

    let (mut m3, _) = connect_as(&srv, &fx, "M-3", "M-3", Protocol::V5)
        .await
        .unwrap();
    let (mut m1, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V311)
        .await
        .unwrap();
    wait_until("two sessions", || srv.ep.connected_meters().len() == 2).await;

    let revoked = fx
        .pki
        .revoke(
            &RevokeTarget::Identity {
                kind: Some(LeafKind::Meter),
                name: "M-3".into(),
            },
            RevocationReason::KeyCompromise,
            ACTOR,
            fx.now,
        )
        .unwrap();
    assert_eq!(srv.ep.reload_from_pki(&fx.dir, "hes").unwrap(), 1);
    assert_eq!(
        next(&mut m3).await,
        Some(Packet::Disconnect { reason_code: 0x87 })
    );
    expect_closed(&mut m3).await;
    wait_until("revocation event", || {
        rec.count(Reason::CertificateRevoked) == 1
    })
    .await;
    let e = rec.event(Reason::CertificateRevoked).unwrap();
    assert_eq!(e.meter_id.as_ref().map(MeterId::as_str), Some("M-3"));
    wait_until("disconnect notification", || {
        rec.conns().contains(&("M-3".into(), false))
    })
    .await;

    // The other meter is untouched.
    m1.ping().await.unwrap();
    assert_eq!(next(&mut m1).await, Some(Packet::PingResp));
    // And the revoked certificate cannot come back.
    assert!(
        connect_as(&srv, &fx, "M-3", "M-3", Protocol::V5)
            .await
            .is_err()
    );
    wait_until("handshake refusal", || {
        rec.count(Reason::CertificateRevoked) == 2
    })
    .await;
    assert_eq!(
        srv.ep.connected_meters(),
        vec![MeterId::new("M-1").unwrap()]
    );

    // Reload with an explicit serial set works the same way.
    let (_m2, _) = connect_as(&srv, &fx, "M-2", "M-2", Protocol::V311)
        .await
        .unwrap();
    wait_until("M-2 session", || srv.ep.connected_meters().len() == 2).await;
    let m2_serial = fx
        .pki
        .list(fx.now)
        .unwrap()
        .into_iter()
        .find(|r| r.entry.name == "M-2")
        .unwrap()
        .entry
        .serial;
    let tls = server_config(&fx.server_material()).unwrap();
    assert_eq!(
        srv.ep.reload(
            tls,
            gridward_mqtt::Revocations::from_serials([m2_serial, revoked.serial])
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_connection_of_the_same_meter_takes_over() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let (mut first, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    wait_until("first session", || rec.conns().len() == 1).await;
    let (mut second, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    assert_eq!(
        next(&mut first).await,
        Some(Packet::Disconnect { reason_code: 0x8E })
    );
    expect_closed(&mut first).await;
    second.ping().await.unwrap();
    assert_eq!(next(&mut second).await, Some(Packet::PingResp));
    // The taken-over session reports no disconnect: the meter is still connected.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        rec.conns(),
        vec![("M-1".into(), true), ("M-1".into(), true)]
    );
    second.disconnect().await.unwrap();
    wait_until("final disconnect", || rec.conns().len() == 3).await;
    assert_eq!(rec.conns()[2], ("M-1".into(), false));
    assert!(rec.reasons().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_packet_is_refused() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let mut cfg = EndpointConfig::default();
    cfg.max_packet_size = 1024;
    let srv = start(&fx, cfg, &rec).await;
    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    c.publish(&readings("M-1"), vec![b'x'; 2000], QoS::AtLeastOnce, 1)
        .await
        .ok();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::Disconnect { reason_code: 0x95 })
    );
    wait_until("event", || rec.count(Reason::PacketTooLarge) == 1).await;
    assert!(rec.publishes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_limit_disconnects() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let mut cfg = EndpointConfig::default();
    cfg.rate_per_second = 1.0;
    cfg.rate_burst = 5;
    let srv = start(&fx, cfg, &rec).await;
    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V311)
        .await
        .unwrap();
    for i in 1..=20u16 {
        if c.publish(&readings("M-1"), b"r".to_vec(), QoS::AtLeastOnce, i)
            .await
            .is_err()
        {
            break;
        }
    }
    let mut acks = 0;
    while let Some(p) = next(&mut c).await {
        assert!(matches!(p, Packet::PubAck { .. }), "{p:?}");
        acks += 1;
    }
    assert_eq!(
        acks, 5,
        "the burst is served, then the connection is closed"
    );
    wait_until("event", || rec.count(Reason::RateLimited) == 1).await;
    assert_eq!(rec.publishes().len(), 5);
}

/// Found by the attack harness (dos, publish flood): the bucket was the connection's, so a
/// meter that reconnected after each `rate_limited` got a full burst again and pushed some
/// 2,800 messages/s through a limit of 50/s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_refill_the_rate_limit() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let mut cfg = EndpointConfig::default();
    cfg.rate_per_second = 1.0;
    cfg.rate_burst = 5;
    let srv = start(&fx, cfg, &rec).await;
    let mut acks = Vec::new();
    for round in 1..=3 {
        let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
            .await
            .unwrap();
        for i in 1..=10u16 {
            if c.publish(&readings("M-1"), b"r".to_vec(), QoS::AtLeastOnce, i)
                .await
                .is_err()
            {
                break;
            }
        }
        let mut n = 0;
        loop {
            match next(&mut c).await {
                Some(Packet::PubAck { .. }) => n += 1,
                Some(Packet::Disconnect { reason_code }) => {
                    assert_eq!(reason_code, 0x96, "round {round}");
                }
                Some(p) => panic!("{p:?}"),
                None => break,
            }
        }
        acks.push(n);
    }
    // The burst on the first connection; the reconnections find the bucket (nearly) empty:
    // at 1/s, a reconnection within a second or so earns at most a token or two.
    assert_eq!(acks[0], 5, "{acks:?}");
    assert!(acks[1] + acks[2] <= 4, "{acks:?}");
    wait_until("events", || rec.count(Reason::RateLimited) == 3).await;
    // Another meter has a bucket of its own.
    let (mut c, _) = connect_as(&srv, &fx, "M-2", "M-2", Protocol::V5)
        .await
        .unwrap();
    c.publish(&readings("M-2"), b"r".to_vec(), QoS::AtLeastOnce, 1)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut c).await,
        Some(Packet::PubAck { pkid: 1, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_ban_the_source() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let mut cfg = EndpointConfig::default();
    cfg.ban_after_failures = 3;
    let srv = start(&fx, cfg, &rec).await;
    // Three refused CONNECTs (ClientID of another meter).
    for _ in 0..3 {
        assert!(
            connect_as(&srv, &fx, "M-1", "M-2", Protocol::V311)
                .await
                .is_err()
        );
    }
    wait_until("ban event", || rec.count(Reason::SourceBanned) == 1).await;
    let ban = rec.event(Reason::SourceBanned).unwrap();
    assert_eq!(
        ban.source.as_deref().map(|s| s.starts_with("127.0.0.1")),
        Some(true)
    );
    // Now even a genuine meter from that address is refused at accept, without further events.
    for _ in 0..2 {
        assert!(
            connect_as(&srv, &fx, "M-1", "M-1", Protocol::V311)
                .await
                .is_err()
        );
    }
    wait_until("refusals counted", || srv.ep.stats().refused_banned == 2).await;
    assert_eq!(rec.count(Reason::SourceBanned), 1, "one event per ban");
    assert_eq!(rec.count(Reason::ClientIdMismatch), 3);
    assert_eq!(rec.reasons().len(), 4, "{:?}", rec.reasons());
}

/// Found by the attack harness (dos, oversize packets and publish flood): a meter cut for
/// abuse could reconnect at once and abuse again, some 500 times a second from one source, each
/// time a full mutual-TLS handshake and a security event, never banned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cut_for_abuse_count_towards_a_ban() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let mut cfg = EndpointConfig::default();
    cfg.ban_after_failures = 3;
    cfg.max_packet_size = 1024;
    let srv = start(&fx, cfg, &rec).await;
    // Oversize, malformed (QoS 2 is refused as malformed), oversize again.
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce, QoS::AtLeastOnce] {
        let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
            .await
            .unwrap();
        let size = if qos == QoS::ExactlyOnce { 10 } else { 2000 };
        c.publish(&readings("M-1"), vec![b'x'; size], qos, 1)
            .await
            .ok();
        assert!(matches!(
            next(&mut c).await,
            Some(Packet::Disconnect { .. })
        ));
    }
    wait_until("ban", || rec.count(Reason::SourceBanned) == 1).await;
    assert_eq!(rec.count(Reason::PacketTooLarge), 2);
    assert_eq!(rec.count(Reason::MalformedPacket), 1);
    assert!(
        connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
            .await
            .is_err(),
        "banned"
    );
    assert_eq!(srv.ep.stats().refused_banned, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_also_count_towards_a_ban() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let mut cfg = EndpointConfig::default();
    cfg.ban_after_failures = 2;
    let srv = start(&fx, cfg, &rec).await;
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = tcp.read(&mut buf).await;
    }
    wait_until("ban", || rec.count(Reason::SourceBanned) == 1).await;
    assert_eq!(rec.count(Reason::TlsHandshakeFailed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_beyond_the_maximum() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let mut cfg = EndpointConfig::default();
    cfg.max_connections = 2;
    let srv = start(&fx, cfg, &rec).await;
    let (mut a, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V311)
        .await
        .unwrap();
    let (_b, _) = connect_as(&srv, &fx, "M-2", "M-2", Protocol::V311)
        .await
        .unwrap();
    assert!(
        connect_as(&srv, &fx, "M-3", "M-3", Protocol::V311)
            .await
            .is_err()
    );
    wait_until("event", || rec.count(Reason::ConnectionLimit) == 1).await;
    assert_eq!(srv.ep.stats().refused_limit, 1);
    // A freed slot can be used again.
    a.disconnect().await.unwrap();
    wait_until("slot freed", || srv.ep.stats().open == 1).await;
    connect_as(&srv, &fx, "M-3", "M-3", Protocol::V311)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_and_connect_timeouts() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let mut cfg = EndpointConfig::default();
    cfg.connect_timeout = Duration::from_millis(500);
    let srv = start(&fx, cfg, &rec).await;

    // Keep-alive 1 s: silent for 1.5 s → DISCONNECT 0x8D.
    let mut o = opts("M-1", Protocol::V5);
    o.keep_alive = Duration::from_secs(1);
    let (mut c, _) = connect_tls(srv.addr, "localhost", fx.meter_tls("M-1"), &o)
        .await
        .unwrap();
    let t = std::time::Instant::now();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::Disconnect { reason_code: 0x8D })
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    wait_until("keep-alive event", || rec.count(Reason::Timeout) == 1).await;
    assert_eq!(
        rec.event(Reason::Timeout)
            .unwrap()
            .meter_id
            .as_ref()
            .map(MeterId::as_str),
        Some("M-1")
    );

    // TLS done, no CONNECT.
    let stream = tls_connect(srv.addr, "localhost", fx.meter_tls("M-2"))
        .await
        .unwrap();
    let mut raw = Client::new(stream, Protocol::V311);
    expect_closed(&mut raw).await;
    wait_until("CONNECT timeout", || rec.count(Reason::Timeout) == 2).await;

    // Not even TLS.
    let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    wait_until("handshake timeout", || rec.count(Reason::Timeout) == 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_refused_without_harm() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;

    // After CONNECT: a PUBLISH whose topic length crosses the packet boundary.
    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    c.send_raw(&[0x32, 0x04, 0x00, 0x09, b'a', b'b'])
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::Disconnect { reason_code: 0x81 })
    );
    // Instead of CONNECT: garbage; and an MQTT 3.1 CONNECT.
    let stream = tls_connect(srv.addr, "localhost", fx.meter_tls("M-1"))
        .await
        .unwrap();
    let mut raw = Client::new(stream, Protocol::V311);
    raw.send_raw(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F])
        .await
        .unwrap();
    expect_closed(&mut raw).await;
    let stream = tls_connect(srv.addr, "localhost", fx.meter_tls("M-1"))
        .await
        .unwrap();
    let mut raw = Client::new(stream, Protocol::V311);
    let mut connect31 = vec![0x10, 17, 0, 6];
    connect31.extend_from_slice(b"MQIsdp");
    connect31.extend_from_slice(&[3, 2, 0, 30, 0, 3]);
    connect31.extend_from_slice(b"M-1");
    raw.send_raw(&connect31).await.unwrap();
    assert_eq!(
        next(&mut raw).await,
        Some(Packet::ConnAck {
            session_present: false,
            code: 1
        })
    );
    wait_until("three events", || rec.count(Reason::MalformedPacket) == 3).await;

    // The endpoint still serves genuine meters.
    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V311)
        .await
        .unwrap();
    c.publish(&readings("M-1"), b"ok".to_vec(), QoS::AtLeastOnce, 1)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 1,
            reason_code: 0
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_acknowledges_what_is_in_flight() {
    let fx = Fixture::new();
    let (rec, gate) = Recorder::gated();
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    c.publish(&readings("M-1"), b"last".to_vec(), QoS::AtLeastOnce, 42)
        .await
        .unwrap();
    wait_until("in flight", || rec.publishes().len() == 1).await;
    srv.ep.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 42,
            reason_code: 0
        })
    );
    assert_eq!(
        next(&mut c).await,
        Some(Packet::Disconnect { reason_code: 0x8B })
    );
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(srv.addr).await.is_err(),
        "listener closed"
    );
    assert_eq!(
        rec.conns(),
        vec![("M-1".into(), true), ("M-1".into(), false)]
    );
}

// ----------------------------------------------------------------------------------------------
// The downward path: head-end → meter publishes.

fn m(id: &str) -> MeterId {
    MeterId::new(id).unwrap()
}

async fn outcome(rx: tokio::sync::oneshot::Receiver<OutboundResult>) -> OutboundResult {
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("an outcome within 10 s")
        .expect("the endpoint always answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_end_publish_reaches_the_subscribed_meter_and_its_puback_comes_back() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let meter = m("M-1");
    // Every byte value: the payload (a signed command) must arrive byte-identical.
    let firmware: Bytes = (0..=255u8).cycle().take(5000).collect::<Vec<u8>>().into();
    for protocol in [Protocol::V311, Protocol::V5] {
        rec.subs.lock().unwrap().clear();
        let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", protocol).await.unwrap();
        wait_until("session", || srv.ep.is_connected(&meter)).await;
        // Before the subscription: accepted, and waits in the session.
        let command = srv
            .ep
            .publish(
                &meter,
                meter.commands_topic(),
                Bytes::from_static(b"signed command 1"),
            )
            .unwrap();
        c.subscribe(1, &meter.commands_topic(), QoS::AtLeastOnce)
            .await
            .unwrap();
        assert_eq!(
            next(&mut c).await,
            Some(Packet::SubAck {
                pkid: 1,
                return_codes: vec![1]
            })
        );
        let Some(Packet::Publish {
            dup,
            qos,
            retain,
            topic,
            pkid,
            payload,
        }) = next(&mut c).await
        else {
            panic!("{protocol:?}: the waiting command after the SUBACK");
        };
        assert!(!dup && !retain && qos == QoS::AtLeastOnce);
        assert_eq!(topic, "meters/M-1/commands");
        assert_eq!(payload, Bytes::from_static(b"signed command 1"));
        assert_eq!(
            rec.subs(),
            vec![("M-1".to_owned(), "meters/M-1/commands".to_owned())]
        );
        c.writer().puback(pkid).await.unwrap();
        assert_eq!(
            outcome(command).await,
            OutboundResult::Acked { reason_code: 0 }
        );

        // The firmware topic, subscribed first this time.
        c.subscribe(2, &meter.firmware_topic(), QoS::AtLeastOnce)
            .await
            .unwrap();
        assert!(matches!(
            next(&mut c).await,
            Some(Packet::SubAck { pkid: 2, .. })
        ));
        wait_until("firmware subscription", || rec.subs().len() == 2).await;
        let image = srv
            .ep
            .publish(&meter, meter.firmware_topic(), firmware.clone())
            .unwrap();
        let Some(Packet::Publish {
            topic,
            pkid: second,
            payload,
            ..
        }) = next(&mut c).await
        else {
            panic!("the firmware image");
        };
        assert_eq!(topic, "meters/M-1/firmware");
        assert_eq!(payload, firmware);
        assert_ne!(second, pkid, "a new packet id for the next message");
        c.writer().puback(second).await.unwrap();
        assert_eq!(
            outcome(image).await,
            OutboundResult::Acked { reason_code: 0 }
        );

        // Refused by the session, never sent: another meter's topic.
        let foreign = srv
            .ep
            .publish(&meter, "meters/M-2/commands".into(), Bytes::new())
            .unwrap();
        assert_eq!(
            outcome(foreign).await,
            OutboundResult::Refused(OutboundRefusal::TopicNotAllowed {
                topic: "meters/M-2/commands".into()
            })
        );
        c.disconnect().await.unwrap();
        wait_until("session end", || !srv.ep.is_connected(&meter)).await;
    }
    assert!(rec.events.lock().unwrap().is_empty(), "{:?}", rec.reasons());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_meter_without_a_session_is_not_connected() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let meter = m("M-2");
    assert_eq!(
        srv.ep
            .publish(&meter, meter.commands_topic(), Bytes::from_static(b"x"))
            .unwrap_err(),
        PublishError::NotConnected
    );
    // Connected, then gone: not connected again.
    let (mut c, _) = connect_as(&srv, &fx, "M-2", "M-2", Protocol::V5)
        .await
        .unwrap();
    wait_until("session", || srv.ep.is_connected(&meter)).await;
    assert!(
        srv.ep
            .publish(&meter, meter.commands_topic(), Bytes::from_static(b"x"))
            .is_ok()
    );
    c.disconnect().await.unwrap();
    wait_until("session end", || !srv.ep.is_connected(&meter)).await;
    assert_eq!(
        srv.ep
            .publish(&meter, meter.commands_topic(), Bytes::from_static(b"x"))
            .unwrap_err(),
        PublishError::NotConnected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_leaving_with_unacknowledged_messages_ends_them_disconnected() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let meter = m("M-3");
    for how in ["connection dropped", "DISCONNECT", "taken over"] {
        let (mut c, _) = connect_as(&srv, &fx, "M-3", "M-3", Protocol::V5)
            .await
            .unwrap();
        wait_until("session", || srv.ep.is_connected(&meter)).await;
        c.subscribe(1, &meter.commands_topic(), QoS::AtLeastOnce)
            .await
            .unwrap();
        assert!(matches!(next(&mut c).await, Some(Packet::SubAck { .. })));
        let sent = srv
            .ep
            .publish(&meter, meter.commands_topic(), Bytes::from_static(b"c1"))
            .unwrap();
        // Never subscribed: waits in the session until it ends.
        let queued = srv
            .ep
            .publish(&meter, meter.firmware_topic(), Bytes::from_static(b"f1"))
            .unwrap();
        assert!(matches!(next(&mut c).await, Some(Packet::Publish { .. })));
        // No PUBACK; the connection ends.
        let newer = match how {
            "connection dropped" => {
                drop(c);
                None
            }
            "DISCONNECT" => {
                c.disconnect().await.unwrap();
                None
            }
            _ => Some(
                connect_as(&srv, &fx, "M-3", "M-3", Protocol::V5)
                    .await
                    .unwrap(),
            ),
        };
        assert_eq!(outcome(sent).await, OutboundResult::Disconnected, "{how}");
        assert_eq!(outcome(queued).await, OutboundResult::Disconnected, "{how}");
        if let Some((mut newer, _)) = newer {
            // The newer connection is the meter's now: messages go to it (after it subscribes).
            let again = srv
                .ep
                .publish(&meter, meter.commands_topic(), Bytes::from_static(b"c1"))
                .unwrap();
            newer
                .subscribe(1, &meter.commands_topic(), QoS::AtLeastOnce)
                .await
                .unwrap();
            assert!(matches!(
                next(&mut newer).await,
                Some(Packet::SubAck { .. })
            ));
            let Some(Packet::Publish { pkid, payload, .. }) = next(&mut newer).await else {
                panic!("the resent command on the newer connection");
            };
            assert_eq!(payload, Bytes::from_static(b"c1"));
            newer.writer().puback(pkid).await.unwrap();
            assert_eq!(
                outcome(again).await,
                OutboundResult::Acked { reason_code: 0 }
            );
            newer.disconnect().await.unwrap();
        }
        wait_until("session end", || !srv.ep.is_connected(&meter)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_larger_than_the_meter_accepts_is_refused() {
    // The crate's client announces no Maximum Packet Size (nor can an MQTT 3.1.1 client): a raw
    // MQTT 5 CONNECT announces 256 bytes.
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let meter = m("M-1");
    let stream = tls_connect(srv.addr, "localhost", fx.meter_tls("M-1"))
        .await
        .unwrap();
    let mut c = Client::new(stream, Protocol::V5);
    // CONNECT, MQTT 5, clean start, keep-alive 30, properties: Maximum Packet Size (0x27) 256.
    let mut connect = vec![0x10, 0];
    let body = [
        &[0, 4][..],
        b"MQTT",
        &[5, 0x02, 0, 30, 5, 0x27, 0, 0, 1, 0],
        &[0, 3],
        b"M-1",
    ]
    .concat();
    connect[1] = u8::try_from(body.len()).unwrap();
    connect.extend_from_slice(&body);
    c.send_raw(&connect).await.unwrap();
    assert!(matches!(
        next(&mut c).await,
        Some(Packet::ConnAck { code: 0, .. })
    ));
    c.subscribe(1, &meter.commands_topic(), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(next(&mut c).await, Some(Packet::SubAck { .. })));
    let big = srv
        .ep
        .publish(&meter, meter.commands_topic(), vec![0u8; 300].into())
        .unwrap();
    assert!(matches!(
        outcome(big).await,
        OutboundResult::Refused(OutboundRefusal::TooLarge { max: 256, .. })
    ));
    // A small one still goes: the big one was never sent.
    let small = srv
        .ep
        .publish(&meter, meter.commands_topic(), Bytes::from_static(b"ok"))
        .unwrap();
    let Some(Packet::Publish { pkid, payload, .. }) = next(&mut c).await else {
        panic!("the small message");
    };
    assert_eq!(payload, Bytes::from_static(b"ok"));
    c.writer().puback(pkid).await.unwrap();
    assert_eq!(
        outcome(small).await,
        OutboundResult::Acked { reason_code: 0 }
    );
}

// ----------------------------------------------------------------------------------------------
// A client not written here: mosquitto_pub (Debian mosquitto-clients).

fn mosquitto_pub(
    fx: &Fixture,
    port: u16,
    cert: &str,
    client_id: &str,
    topic: &str,
    version: &str,
) -> std::process::Output {
    let dir = fx.meter_dir(cert);
    std::process::Command::new("mosquitto_pub")
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .arg("--cafile")
        .arg(fx.dir.join("ca").join("root.crt.pem"))
        .arg("--cert")
        .arg(dir.join("chain.pem"))
        .arg("--key")
        .arg(dir.join("key.pem"))
        .arg("-i")
        .arg(client_id)
        .arg("-t")
        .arg(topic)
        .arg("-q")
        .arg("1")
        .arg("-V")
        .arg(version)
        .arg("-m")
        .arg(format!("hello from mosquitto {version}"))
        .output()
        .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_reaches_the_handler() {
    let fx = Arc::new(Fixture::new());
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let port = srv.addr.port();

    for version in ["mqttv311", "mqttv5"] {
        let f = Arc::clone(&fx);
        let out = tokio::task::spawn_blocking(move || {
            mosquitto_pub(&f, port, "M-1", "M-1", "meters/M-1/readings", version)
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let msgs = rec.publishes();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        msgs[0].payload,
        Bytes::from_static(b"hello from mosquitto mqttv311")
    );
    assert_eq!(
        msgs[1].payload,
        Bytes::from_static(b"hello from mosquitto mqttv5")
    );
    assert!(
        msgs.iter()
            .all(|m| m.meter_id.as_str() == "M-1" && m.qos == 1)
    );

    // The same tool, misbehaving: another meter's ClientID, another meter's topic.
    let f = Arc::clone(&fx);
    let out = tokio::task::spawn_blocking(move || {
        mosquitto_pub(&f, port, "M-1", "M-2", "meters/M-2/readings", "mqttv311")
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let f = Arc::clone(&fx);
    let out = tokio::task::spawn_blocking(move || {
        mosquitto_pub(&f, port, "M-1", "M-1", "meters/M-2/readings", "mqttv5")
    })
    .await
    .unwrap();
    assert!(!out.status.success() || !String::from_utf8_lossy(&out.stderr).is_empty());
    wait_until("events", || {
        rec.count(Reason::ClientIdMismatch) == 1 && rec.count(Reason::TopicNotAuthorized) == 1
    })
    .await;
    assert_eq!(rec.publishes().len(), 2);
}

// ----------------------------------------------------------------------------------------------
// A subscriber not written here: mosquitto_sub (Debian mosquitto-clients).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_receives_what_the_head_end_publishes() {
    if std::process::Command::new("mosquitto_sub")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED: mosquitto_sub not found; install Debian package mosquitto-clients to run this test"
        );
        return;
    }
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let meter = m("M-1");
    let dir = fx.meter_dir("M-1");
    for version in ["mqttv311", "mqttv5"] {
        rec.subs.lock().unwrap().clear();
        let child = std::process::Command::new("mosquitto_sub")
            .arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(srv.addr.port().to_string())
            .arg("--cafile")
            .arg(fx.dir.join("ca").join("root.crt.pem"))
            .arg("--cert")
            .arg(dir.join("chain.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .arg("-i")
            .arg("M-1")
            .arg("-t")
            .arg(meter.commands_topic())
            .arg("-q")
            .arg("1")
            .arg("-C")
            .arg("1")
            .arg("-N")
            .arg("-W")
            .arg("20")
            .arg("-V")
            .arg(version)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
        // mosquitto_sub is reachable once its subscription is in.
        wait_until("mosquitto_sub's subscription", || {
            rec.subs() == vec![("M-1".to_owned(), "meters/M-1/commands".to_owned())]
        })
        .await;
        let payload = format!("signed command for mosquitto_sub {version}");
        let rx = srv
            .ep
            .publish(&meter, meter.commands_topic(), payload.clone().into())
            .unwrap();
        // mosquitto_sub sends its PUBACK before it prints and exits.
        assert_eq!(
            outcome(rx).await,
            OutboundResult::Acked { reason_code: 0 },
            "{version}"
        );
        let out = waiter.await.unwrap().unwrap();
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, payload.as_bytes(), "{version}: byte-identical");
    }
    wait_until("both sessions over", || !srv.ep.is_connected(&meter)).await;
    assert!(rec.events.lock().unwrap().is_empty(), "{:?}", rec.reasons());
}

// ----------------------------------------------------------------------------------------------
// Data concentrators (issue 11)

/// A client configuration presenting a concentrator certificate `id` from the fixture's issuing
/// CA: URI SAN `urn:gridward:concentrator:{id}`, CN id, EKU clientAuth (the profile of
/// `docs/wire-format.md` §11), made here with rcgen and the PKI's issuing key.
fn concentrator_tls(fx: &Fixture, id: &str) -> Arc<ClientConfig> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_pem = std::fs::read_to_string(fx.dir.join("ca/issuing.key.pem")).unwrap();
    let issuing = fx.pki.issuing_certificate().clone();
    let issuer = Issuer::from_ca_cert_der(&issuing, KeyPair::from_pem(&ca_pem).unwrap()).unwrap();
    let mut params = CertificateParams::default();
    params.not_before = fx.now - time::Duration::days(1);
    params.not_after = fx.now + time::Duration::days(30);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![SanType::URI(
        format!("urn:gridward:concentrator:{id}")
            .try_into()
            .unwrap(),
    )];
    let mut serial = vec![0x5c];
    serial.extend_from_slice(&rand_serial());
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ours = fx.server_material();
    client_config(&TlsMaterial {
        chain: vec![cert.der().clone(), issuing],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        roots: ours.roots,
        crls: ours.crls,
    })
    .unwrap()
}

/// Eight bytes that differ between calls (distinct serials for the certificates made here).
fn rand_serial() -> [u8; 8] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (nanos ^ N.fetch_add(1, Ordering::Relaxed).rotate_left(40)).to_be_bytes()
}

async fn connect_concentrator(
    srv: &Server,
    fx: &Fixture,
    id: &str,
    client_id: &str,
    protocol: Protocol,
) -> Result<(Client, ConnAck), ClientError> {
    connect_tls(
        srv.addr,
        "localhost",
        concentrator_tls(fx, id),
        &opts(client_id, protocol),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concentrator_publishes_to_its_relay_and_events_topics() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let dc = m("DC-1");

    let (mut c, ack) = connect_concentrator(&srv, &fx, "DC-1", "DC-1", Protocol::V5)
        .await
        .unwrap();
    assert_eq!(ack.code, 0);
    wait_until("connect notification", || rec.devices().len() == 1).await;
    let (id, kind, _, connected) = rec.devices()[0].clone();
    assert_eq!(
        (id.as_str(), kind, connected),
        ("DC-1", DeviceKind::Concentrator, true)
    );
    assert_eq!(rec.conns(), vec![("DC-1".into(), true)]);
    assert!(srv.ep.is_device_connected(DeviceKind::Concentrator, &dc));
    assert!(!srv.ep.is_connected(&dc), "is_connected is for meters");
    assert_eq!(srv.ep.connected_concentrators(), vec![dc.clone()]);
    assert!(srv.ep.connected_meters().is_empty());

    c.publish(
        "concentrators/DC-1/relay",
        b"batch".to_vec(),
        QoS::AtLeastOnce,
        1,
    )
    .await
    .unwrap();
    c.publish(
        "concentrators/DC-1/events",
        b"event".to_vec(),
        QoS::AtLeastOnce,
        2,
    )
    .await
    .unwrap();
    for pkid in [1, 2] {
        assert_eq!(
            next(&mut c).await,
            Some(Packet::PubAck {
                pkid,
                reason_code: 0
            })
        );
    }
    let got = rec.publishes();
    assert_eq!(got.len(), 2);
    for (msg, topic) in got
        .iter()
        .zip(["concentrators/DC-1/relay", "concentrators/DC-1/events"])
    {
        assert_eq!(msg.device, DeviceKind::Concentrator);
        assert_eq!(msg.meter_id, dc);
        assert_eq!(msg.topic, topic);
        assert_eq!(msg.qos, 1);
    }

    // No downward path: no subscription, and the head-end cannot publish to it.
    c.subscribe(3, "meters/DC-1/commands", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::SubAck {
            pkid: 3,
            return_codes: vec![0x87]
        })
    );
    c.subscribe(4, "concentrators/DC-1/relay", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::SubAck {
            pkid: 4,
            return_codes: vec![0x87]
        })
    );
    assert_eq!(
        srv.ep
            .publish(&dc, "meters/DC-1/commands".into(), Bytes::from_static(b"x"))
            .unwrap_err(),
        PublishError::NotConnected
    );
    assert!(rec.subs().is_empty());
    c.ping().await.unwrap();
    assert_eq!(next(&mut c).await, Some(Packet::PingResp));
    c.disconnect().await.unwrap();
    wait_until("disconnect", || rec.devices().len() == 2).await;
    assert_eq!(rec.conns()[1], ("DC-1".into(), false));
    assert_eq!(
        rec.reasons(),
        vec![
            Reason::SubscribeNotAuthorized,
            Reason::SubscribeNotAuthorized
        ]
    );
    let e = rec.event(Reason::SubscribeNotAuthorized).unwrap();
    assert_eq!(e.meter_id.as_ref(), Some(&dc));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concentrator_is_refused_on_meter_topics_and_other_concentrators_topics() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;

    // 5: PUBACK 0x87, then DISCONNECT 0x87, exactly as for a meter.
    let (mut c, _) = connect_concentrator(&srv, &fx, "DC-1", "DC-1", Protocol::V5)
        .await
        .unwrap();
    c.publish(&readings("M-1"), b"spoof".to_vec(), QoS::AtLeastOnce, 1)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 1,
            reason_code: 0x87
        })
    );
    assert_eq!(
        next(&mut c).await,
        Some(Packet::Disconnect { reason_code: 0x87 })
    );
    // 3.1.1, another concentrator's relay topic: the connection is closed.
    let (mut c, _) = connect_concentrator(&srv, &fx, "DC-1", "DC-1", Protocol::V311)
        .await
        .unwrap();
    c.publish(
        "concentrators/DC-2/relay",
        b"spoof".to_vec(),
        QoS::AtLeastOnce,
        1,
    )
    .await
    .unwrap();
    expect_closed(&mut c).await;
    // The ClientID must be the concentrator's id.
    let err = connect_concentrator(&srv, &fx, "DC-1", "M-1", Protocol::V311)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Refused(ConnAck { code: 5, .. })),
        "{err}"
    );

    wait_until("three events", || rec.reasons().len() == 3).await;
    assert_eq!(
        rec.reasons(),
        vec![
            Reason::TopicNotAuthorized,
            Reason::TopicNotAuthorized,
            Reason::ClientIdMismatch
        ]
    );
    let events = rec.events.lock().unwrap().clone();
    assert!(events[0].detail.contains("meters/M-1/readings"));
    assert!(events[1].detail.contains("concentrators/DC-2/relay"));
    for e in &events {
        assert_eq!(e.meter_id.as_ref().map(MeterId::as_str), Some("DC-1"));
    }
    assert!(
        rec.publishes().is_empty(),
        "nothing refused reaches the pipeline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_cannot_publish_to_concentrator_topics() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    for (n, topic) in ["concentrators/M-1/relay", "concentrators/DC-1/events"]
        .into_iter()
        .enumerate()
    {
        let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
            .await
            .unwrap();
        c.publish(topic, b"spoof".to_vec(), QoS::AtLeastOnce, 1)
            .await
            .unwrap();
        assert_eq!(
            next(&mut c).await,
            Some(Packet::PubAck {
                pkid: 1,
                reason_code: 0x87
            })
        );
        assert_eq!(
            next(&mut c).await,
            Some(Packet::Disconnect { reason_code: 0x87 })
        );
        wait_until("event", || rec.count(Reason::TopicNotAuthorized) == n + 1).await;
    }
    assert!(rec.publishes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_reports_session_replaced_with_both_addresses() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;

    for (n, (id, kind)) in [
        ("M-1", DeviceKind::Meter),
        ("DC-1", DeviceKind::Concentrator),
    ]
    .into_iter()
    .enumerate()
    {
        let connect = || async {
            match kind {
                DeviceKind::Meter => connect_as(&srv, &fx, id, id, Protocol::V5).await,
                DeviceKind::Concentrator => {
                    connect_concentrator(&srv, &fx, id, id, Protocol::V5).await
                }
            }
            .unwrap()
            .0
        };
        let base = rec.devices().len();
        let mut first = connect().await;
        wait_until("first session", || rec.devices().len() == base + 1).await;
        let mut second = connect().await;
        assert_eq!(
            next(&mut first).await,
            Some(Packet::Disconnect { reason_code: 0x8E })
        );
        expect_closed(&mut first).await;
        wait_until("takeover report", || rec.replaced().len() == n + 1).await;
        let devices = rec.devices();
        let (a, b) = (&devices[base], &devices[base + 1]);
        assert_eq!((a.0.as_str(), a.1, a.3), (id, kind, true));
        assert_eq!((b.0.as_str(), b.1, b.3), (id, kind, true));
        assert_ne!(a.2, b.2, "two connections, two source ports");
        assert_eq!(rec.replaced()[n], (id.to_owned(), a.2, b.2));
        // The taken-over session reports no disconnect; the newer one lives on.
        second.ping().await.unwrap();
        assert_eq!(next(&mut second).await, Some(Packet::PingResp));
        assert_eq!(rec.devices().len(), base + 2);
        second.disconnect().await.unwrap();
        wait_until("final disconnect", || rec.devices().len() == base + 3).await;
        assert!(!rec.devices()[base + 2].3);
    }
    // A meter's and a concentrator's sessions never replace each other.
    let (_m1, _) = connect_as(&srv, &fx, "M-2", "M-2", Protocol::V5)
        .await
        .unwrap();
    let (_dc, _) = connect_concentrator(&srv, &fx, "DC-2", "DC-2", Protocol::V5)
        .await
        .unwrap();
    wait_until("both sessions", || {
        srv.ep.is_connected(&m("M-2"))
            && srv
                .ep
                .is_device_connected(DeviceKind::Concentrator, &m("DC-2"))
    })
    .await;
    assert_eq!(rec.replaced().len(), 2);
    assert!(rec.reasons().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concentrator_may_send_a_200_kib_relay_batch_a_meter_may_not() {
    let fx = Fixture::new();
    let rec = Arc::new(Recorder::default());
    let srv = start(&fx, EndpointConfig::default(), &rec).await;
    let big = vec![b'x'; 200 * 1024];

    let (mut c, _) = connect_concentrator(&srv, &fx, "DC-1", "DC-1", Protocol::V5)
        .await
        .unwrap();
    c.publish("concentrators/DC-1/relay", big.clone(), QoS::AtLeastOnce, 1)
        .await
        .unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::PubAck {
            pkid: 1,
            reason_code: 0
        })
    );
    let got = rec.publishes();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload.len(), 200 * 1024);
    assert_eq!(got[0].device, DeviceKind::Concentrator);

    let (mut c, _) = connect_as(&srv, &fx, "M-1", "M-1", Protocol::V5)
        .await
        .unwrap();
    c.publish(&readings("M-1"), big, QoS::AtLeastOnce, 1)
        .await
        .ok();
    assert_eq!(
        next(&mut c).await,
        Some(Packet::Disconnect { reason_code: 0x95 })
    );
    wait_until("event", || rec.count(Reason::PacketTooLarge) == 1).await;
    let e = rec.event(Reason::PacketTooLarge).unwrap();
    assert_eq!(e.meter_id.as_ref().map(MeterId::as_str), Some("M-1"));
    assert_eq!(rec.publishes().len(), 1);
}
