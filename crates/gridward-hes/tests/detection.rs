//! Detection end to end (issue 11), in process: a PKI on disk, the head-end on 127.0.0.1:0 with
//! its SQLite store and detection thread, and `gridward-meter`'s simulated meters and data
//! concentrators over mutual TLS. Alarms are read back from the store ([`AlarmStore`]).
//!
//! Every wait polls the store with a deadline; nothing asserts how long anything took.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gridward_core::MeterId;
use gridward_core::document::{EventKind, Format, Reading};
use gridward_core::envelope::{self, EnvelopeParams, SigningKey};
use gridward_core::relay::{self, RelayItem};
use gridward_hes::config::Config;
use gridward_hes::pipeline::system_clock;
use gridward_hes::service::{self, Running};
use gridward_meter::concentrator::{ConcentratorIdentity, ConcentratorSpec, RelayConfig};
use gridward_meter::fleet::{Fleet, FleetConfig, MeterSpec};
use gridward_meter::identity::{MeterIdentity, Trust};
use gridward_mqtt::client::{self, Client, ClientOptions, Packet, QoS};
use gridward_pki::tls::TlsOptions;
use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki};
use gridward_store::{
    AlarmQuery, AlarmState, AlarmStore, ReadingQuery, SecurityEventQuery, Store, StoredAlarm,
};
use time::OffsetDateTime;

/// How long any condition is waited for before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// Detection thresholds small enough for a test: two takeovers make a clone, three last gasps on
/// the feeder `feeder-1` (every meter `F-…`) make an outage.
const DETECTION: &str = "\
[detection.outage]
min_meters = 3
window_secs = 120
[detection.intrusion]
clone_takeovers = 2
clone_window_secs = 600
[[detection.feeder]]
name = \"feeder-1\"
prefix = \"F-\"
";

fn id(s: &str) -> MeterId {
    MeterId::new(s).unwrap()
}

/// The on-disk part that survives a restart: PKI, store, meters' counter state.
struct Env {
    tmp: tempfile::TempDir,
    pki_dir: PathBuf,
    text: String,
}

impl Env {
    /// A PKI with a server certificate, `meters` per prefix (`("T-", 2)` → T-000001, T-000002)
    /// and the concentrators `concentrators`.
    fn new(meters: &[(&str, usize)], concentrators: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki_dir = tmp.path().join("pki");
        let now = OffsetDateTime::now_utc();
        let pki = Pki::init(&pki_dir, &InitOptions::new("test", now)).unwrap();
        let opts = IssueOptions::new("test");
        pki.issue_server(
            "localhost",
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
            &opts,
            now,
        )
        .unwrap();
        for (prefix, n) in meters {
            pki.issue_meters(prefix, *n, &opts, now, &mut |_| {})
                .unwrap();
        }
        for c in concentrators {
            pki.issue_concentrator(&id(c), &opts, now).unwrap();
        }
        let text = format!(
            "[pki]\ndir = {:?}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
             ban_exempt = [\"127.0.0.1\", \"127.0.0.2\", \"127.0.0.3\"]\n\
             [store]\npath = {:?}\n[api]\nlisten = \"off\"\n{DETECTION}",
            pki_dir,
            tmp.path().join("gridward.db"),
        );
        Self { tmp, pki_dir, text }
    }

    async fn start(self) -> Fixture {
        let config =
            Config::parse(&self.text, Path::new("test.toml"), self.tmp.path()).expect("config");
        let running = service::start(&config, system_clock()).await.unwrap();
        Fixture { env: self, running }
    }
}

struct Fixture {
    env: Env,
    running: Running,
}

impl Fixture {
    fn store(&self) -> &gridward_store::SqliteStore {
        &self.running.store
    }

    /// Stops the head-end and starts it again on the same PKI and store.
    async fn restart(self) -> Self {
        let Self { env, running } = self;
        running.shutdown().await;
        env.start().await
    }

    fn fleet_config(&self) -> FleetConfig {
        let mut c = FleetConfig::new(
            "127.0.0.1",
            self.running.local_addr.port(),
            self.env.tmp.path().join("state"),
            Arc::new(OffsetDateTime::now_utc),
        );
        c.server_name = "localhost".into();
        c.interval = time::Duration::milliseconds(300);
        c.backoff_base = Duration::from_millis(50);
        c.backoff_cap = Duration::from_millis(500);
        c.format = Format::Json;
        c
    }

    fn trust(&self) -> Trust {
        Trust::load_at(&self.env.pki_dir, OffsetDateTime::now_utc()).unwrap()
    }

    fn meter_spec(&self, trust: &Trust, m: &MeterId) -> MeterSpec {
        MeterSpec::from(
            MeterIdentity::load(&self.env.pki_dir, m, trust, &TlsOptions::default()).unwrap(),
        )
    }

    /// A fleet of directly connected meters, once every one is connected.
    async fn fleet(&self, ids: &[MeterId]) -> Fleet {
        let trust = self.trust();
        let specs = ids.iter().map(|m| self.meter_spec(&trust, m)).collect();
        let fleet = Fleet::start(specs, self.fleet_config()).await.unwrap();
        for m in ids {
            wait(&format!("{m} connected"), || {
                self.running.endpoint.is_connected(m).then_some(())
            })
            .await;
        }
        fleet
    }

    /// Alarms of `alarm_type` (every originator when `originator` is None).
    fn alarms(&self, alarm_type: &str, originator: Option<&str>) -> Vec<StoredAlarm> {
        self.store()
            .alarms(&AlarmQuery {
                alarm_type: Some(alarm_type.into()),
                originator: originator.map(str::to_owned),
                ..AlarmQuery::default()
            })
            .unwrap()
    }

    fn alarm_by_id(&self, alarm: i64) -> Option<StoredAlarm> {
        self.store().alarm(alarm).unwrap()
    }

    fn all_alarms(&self) -> Vec<StoredAlarm> {
        self.store().alarms(&AlarmQuery::default()).unwrap()
    }

    fn events(&self, reason: &str) -> Vec<gridward_store::SecurityEvent> {
        self.store()
            .security_events(&SecurityEventQuery {
                reason: Some(reason.into()),
                ..SecurityEventQuery::default()
            })
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect()
    }

    fn readings(&self, m: &MeterId) -> Vec<gridward_store::StoredReading> {
        self.store()
            .readings(&ReadingQuery::new(m.clone()))
            .unwrap()
    }

    /// The envelope signing key of meter `m`, from the PKI.
    fn meter_key(&self, m: &MeterId) -> SigningKey {
        let pem =
            std::fs::read_to_string(self.env.pki_dir.join(format!("meters/{m}/key.pem"))).unwrap();
        SigningKey::from_pkcs8_pem(&pem).unwrap()
    }

    /// An MQTT/mTLS connection as `kind` `name` whose TCP socket is bound to `local`
    /// (127.0.0.0/8 is all loopback: different local addresses look like different devices).
    async fn connect_from(
        &self,
        kind: LeafKind,
        name: &str,
        local: IpAddr,
    ) -> Result<Client, client::ClientError> {
        let material = Pki::open(&self.env.pki_dir, None)
            .unwrap()
            .tls_material(kind, name)
            .unwrap();
        let config = gridward_pki::tls::client_config(&material).unwrap();
        let socket = tokio::net::TcpSocket::new_v4().map_err(client::ClientError::Connect)?;
        socket
            .bind(SocketAddr::new(local, 0))
            .map_err(client::ClientError::Connect)?;
        let tcp = socket
            .connect(self.running.local_addr)
            .await
            .map_err(client::ClientError::Connect)?;
        let server_name =
            tokio_rustls::rustls::pki_types::ServerName::try_from("localhost".to_owned()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(client::ClientError::Handshake)?;
        let opts = ClientOptions::new(name);
        let (client, _ack) = tokio::time::timeout(DEADLINE, Client::handshake(tls, &opts))
            .await
            .map_err(|_| client::ClientError::Timeout)??;
        Ok(client)
    }
}

/// Polls `f` every 50 ms until it gives a value; fails the test after [`DEADLINE`].
async fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes QoS 1 and waits for the PUBACK; returns its reason code.
async fn publish(client: &mut Client, topic: &str, payload: Vec<u8>, pkid: u16) -> u8 {
    client
        .publish(topic, payload, QoS::AtLeastOnce, pkid)
        .await
        .expect("publish");
    loop {
        match tokio::time::timeout(DEADLINE, client.recv()).await {
            Ok(Ok(Packet::PubAck {
                pkid: p,
                reason_code,
            })) if p == pkid => return reason_code,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => panic!("connection ended before PUBACK {pkid}: {e}"),
            Err(_) => panic!("no PUBACK for {pkid}"),
        }
    }
}

/// A genuine JSON reading of `meter` signed with `key` for its readings topic.
fn signed_reading(key: &SigningKey, meter: &MeterId, counter: u64, kwh: f64) -> RelayItem {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let doc = Reading {
        meter_id: meter.clone(),
        timestamp: OffsetDateTime::from_unix_timestamp(now).unwrap(),
        energy_kwh: kwh,
    }
    .to_json();
    let topic = meter.readings_topic();
    let params = EnvelopeParams {
        meter_id: meter,
        counter,
        timestamp: now,
        content_type: Format::Json,
        topic: &topic,
    };
    RelayItem {
        envelope: envelope::sign(key, &params, doc.as_bytes()).unwrap(),
        topic,
    }
}

/// A terminal-cover tamper event makes one active tamper alarm on its meter; the same event
/// again updates that alarm (count 2) instead of opening a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tamper_event_raises_one_alarm_and_a_repeat_updates_it() {
    let f = Env::new(&[("T-", 2)], &[]).start().await;
    let (m1, m2) = (id("T-000001"), id("T-000002"));
    let fleet = f.fleet(&[m1.clone(), m2.clone()]).await;
    let originator = format!("meter:{m1}");

    assert!(fleet.request_event(&m1, EventKind::TerminalCoverOpened));
    let first = wait("a tamper alarm", || {
        f.alarms("tamper", Some(&originator)).into_iter().next()
    })
    .await;
    assert_eq!(first.state, AlarmState::ActiveUnacknowledged, "{first:?}");
    assert_eq!(first.count, 1, "{first:?}");
    assert!(
        first.summary.contains("TerminalCoverOpened"),
        "{}",
        first.summary
    );
    assert!(
        first.evidence_json.contains("TerminalCoverOpened"),
        "{}",
        first.evidence_json
    );

    assert!(fleet.request_event(&m1, EventKind::TerminalCoverOpened));
    let second = wait("the tamper alarm counted twice", || {
        f.alarm_by_id(first.id).filter(|a| a.count >= 2)
    })
    .await;
    assert_eq!(second.count, 2, "{second:?}");
    assert_eq!(second.state, AlarmState::ActiveUnacknowledged);
    assert!(second.last_seen >= first.last_seen);
    let tamper = f.alarms("tamper", None);
    assert_eq!(
        tamper.iter().map(|a| a.id).collect::<Vec<_>>(),
        [first.id],
        "one tamper alarm, on {m1} only: {tamper:?}"
    );
    // Both events were stored as meter events of m1.
    let stored = f
        .store()
        .meter_events(&gridward_store::MeterEventQuery {
            meter: Some(m1.clone()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        stored
            .iter()
            .filter(|e| e.kind == EventKind::TerminalCoverOpened)
            .count(),
        2,
        "{stored:?}"
    );

    fleet.stop(Duration::from_secs(5)).await;
    f.running.shutdown().await;
}

/// Alarms are in the store, not in the detector: after a restart on the same data directory the
/// alarm raised (and acknowledged) before is there with the same id and state, and a new tamper
/// event of the same meter folds into it instead of opening another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_survive_a_restart_of_the_head_end() {
    let f = Env::new(&[("T-", 1)], &[]).start().await;
    let m1 = id("T-000001");
    let originator = format!("meter:{m1}");
    let fleet = f.fleet(std::slice::from_ref(&m1)).await;
    assert!(fleet.request_event(&m1, EventKind::CoverOpened));
    let raised = wait("a tamper alarm", || {
        f.alarms("tamper", Some(&originator)).into_iter().next()
    })
    .await;
    let acked = f
        .store()
        .acknowledge_alarm(raised.id, "user:alice", OffsetDateTime::now_utc())
        .unwrap();
    assert_eq!(acked.state, AlarmState::ActiveAcknowledged);
    fleet.stop(Duration::from_secs(5)).await;
    let before = f.all_alarms();

    let f = f.restart().await;
    let after = f.alarm_by_id(raised.id).expect("the alarm is still stored");
    assert_eq!(after, acked, "same alarm, same state, after the restart");
    assert_eq!(f.all_alarms(), before, "every alarm kept as it was");

    // The next tamper event of the meter updates the stored alarm, acknowledgement kept.
    let fleet = f.fleet(std::slice::from_ref(&m1)).await;
    assert!(fleet.request_event(&m1, EventKind::CoverOpened));
    let updated = wait("the stored alarm updated", || {
        f.alarm_by_id(raised.id).filter(|a| a.count >= 2)
    })
    .await;
    assert_eq!(updated.state, AlarmState::ActiveAcknowledged, "{updated:?}");
    assert_eq!(updated.acknowledged, acked.acknowledged);
    assert_eq!(
        f.alarms("tamper", None).len(),
        1,
        "{:?}",
        f.alarms("tamper", None)
    );
    fleet.stop(Duration::from_secs(5)).await;
    f.running.shutdown().await;
}

/// The same meter certificate connecting from two more addresses, each connection taking over
/// the live session: a cloned-meter alarm for that meter. A meter that merely reconnects from
/// its own address (a new port) is not a clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_takeovers_from_other_addresses_raise_a_cloned_meter_alarm() {
    let f = Env::new(&[("T-", 2)], &[]).start().await;
    let lo = |n: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n));

    // T-000002 reconnects three times from 127.0.0.1: takeovers, same address.
    let mut same = Vec::new();
    for _ in 0..3 {
        same.push(
            f.connect_from(LeafKind::Meter, "T-000002", lo(1))
                .await
                .expect("T-000002 connects"),
        );
    }
    // T-000001's certificate from 127.0.0.1, then .2, then .3: two takeovers from new addresses.
    let mut clones = Vec::new();
    for n in 1..=3 {
        clones.push(
            f.connect_from(LeafKind::Meter, "T-000001", lo(n))
                .await
                .expect("T-000001 connects"),
        );
    }
    let alarm = wait("a cloned_meter alarm", || {
        f.alarms("cloned_meter", Some("meter:T-000001"))
            .into_iter()
            .next()
    })
    .await;
    assert!(alarm.state.is_active(), "{alarm:?}");
    assert!(
        alarm.summary.contains("127.0.0.2") && alarm.summary.contains("127.0.0.3"),
        "{}",
        alarm.summary
    );
    // The detection thread decides in order: T-000002's takeovers came first and made nothing.
    let all = f.alarms("cloned_meter", None);
    assert_eq!(all.len(), 1, "only the cloned meter: {all:?}");
    drop((same, clones));
    f.running.shutdown().await;
}

/// Three meters of feeder `feeder-1` lose supply at once (each signs its last gasp): one outage
/// alarm for the feeder, and the per-meter power failures folded into it (cleared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_gasps_of_a_feeder_make_one_outage_alarm() {
    let f = Env::new(&[("F-", 3), ("T-", 1)], &[]).start().await;
    let feeder: Vec<MeterId> = (1..=3).map(|n| id(&format!("F-{n:06}"))).collect();
    let other = id("T-000001");
    let mut all = feeder.clone();
    all.push(other.clone());
    let fleet = f.fleet(&all).await;

    for m in &feeder {
        assert!(fleet.power_fail(m), "{m}");
    }
    let outage = wait("one outage and no active per-meter power failure", || {
        let outages = f.alarms("outage", None);
        let power_active = f
            .alarms("power_failure", None)
            .into_iter()
            .any(|a| a.state.is_active());
        (!outages.is_empty() && !power_active).then_some(outages)
    })
    .await;
    assert_eq!(outage.len(), 1, "one alarm for the group: {outage:?}");
    let o = &outage[0];
    assert_eq!(o.originator, "feeder:feeder-1");
    assert!(o.state.is_active(), "{o:?}");
    assert!(o.summary.contains("3 meters"), "{}", o.summary);
    for m in &feeder {
        assert!(
            o.evidence_json.contains(m.as_str()),
            "{m} in {}",
            o.evidence_json
        );
    }
    // Nothing about the meter that kept its supply.
    let about_other = format!("meter:{other}");
    assert!(
        f.all_alarms().iter().all(|a| a.originator != about_other),
        "{:?}",
        f.all_alarms()
    );
    fleet.stop(Duration::from_secs(5)).await;
    f.running.shutdown().await;
}

/// A data concentrator relays its PLC meters' own envelopes: each reading is stored under its
/// meter's id with the meter's envelope (it verifies with the meter's key over the meter's
/// topic); the concentrator's probes (an altered envelope, a meter not behind it) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concentrator_s_relayed_readings_keep_each_meter_s_signature() {
    let f = Env::new(&[("P-", 3), ("X-", 1)], &["dc-1"]).start().await;
    let dc = id("dc-1");
    let plc: Vec<MeterId> = (1..=3).map(|n| id(&format!("P-{n:06}"))).collect();
    let foreign = id("X-000001");
    assert_eq!(
        f.store()
            .attach_meters(&dc, &plc, OffsetDateTime::now_utc())
            .unwrap(),
        3
    );

    let trust = f.trust();
    let identity =
        ConcentratorIdentity::load(&f.env.pki_dir, &dc, &trust, &TlsOptions::default()).unwrap();
    let mut spec = ConcentratorSpec::new(
        identity,
        plc.iter().map(|m| f.meter_spec(&trust, m)).collect(),
    );
    spec.relay = RelayConfig {
        max_items: 4,
        linger: time::Duration::milliseconds(100),
        ..RelayConfig::default()
    };
    spec.alter_relay_after = Some(Duration::from_millis(800));
    spec.relay_for = Some(gridward_meter::concentrator::ForeignRelay {
        identity: MeterIdentity::load(&f.env.pki_dir, &foreign, &trust, &TlsOptions::default())
            .unwrap(),
        after: Duration::from_millis(1200),
    });
    let mut config = f.fleet_config();
    config.interval = time::Duration::milliseconds(200);
    let fleet = Fleet::start_with(Vec::new(), vec![spec], Vec::new(), config)
        .await
        .unwrap();
    wait(
        "three readings of every PLC meter and both probes refused",
        || {
            let enough = plc.iter().all(|m| f.readings(m).len() >= 3);
            let refused = !f.events("relay_not_authorized").is_empty()
                && !f.events("bad_signature").is_empty();
            (enough && refused).then_some(())
        },
    )
    .await;
    let report = fleet.stop(Duration::from_secs(10)).await;
    let c = &report.concentrators[0];
    assert_eq!(c.held, 0, "{:?}", c.stats);

    for m in &plc {
        let key = f.meter_key(m).verifying_key().unwrap();
        let readings = f.readings(m);
        let outcome = c.meters.iter().find(|o| o.id == *m).unwrap();
        assert_eq!(readings.len() as u64, outcome.counts.acked, "{m}");
        for r in &readings {
            assert_eq!(r.meter_id, *m);
            let env = f.store().envelope(r.id).unwrap().expect("envelope kept");
            let verified = envelope::verify(&env, &key, m, &m.readings_topic())
                .unwrap_or_else(|e| panic!("{m}'s stored envelope is not its own: {e}"));
            assert_eq!(verified.header().counter, r.counter);
            // Not the concentrator's signature, and not valid for another meter.
            let other = plc.iter().find(|o| *o != m).unwrap();
            assert!(envelope::verify(&env, &key, other, &other.readings_topic()).is_err());
        }
    }
    assert!(
        f.readings(&dc).is_empty(),
        "nothing stored as the concentrator"
    );
    assert!(
        f.readings(&foreign).is_empty(),
        "the foreign meter's reading refused"
    );
    let refused = f.events("relay_not_authorized");
    assert!(
        refused
            .iter()
            .any(|e| e.meter_id.as_ref() == Some(&dc) && e.detail.contains(foreign.as_str())),
        "{refused:?}"
    );
    let bad = f.events("bad_signature");
    assert!(
        bad.iter()
            .any(|e| e.meter_id.as_ref().is_some_and(|m| plc.contains(m))
                && e.detail.contains("dc-1")),
        "{bad:?}"
    );
    // Detection: the refused relay is an alarm on the concentrator.
    wait("a relay_refused alarm on dc-1", || {
        f.alarms("relay_refused", Some("concentrator:dc-1"))
            .into_iter()
            .next()
    })
    .await;
    f.running.shutdown().await;
}

/// One batch holding genuine envelopes of the two meters behind `dc-2`, one of a meter that is
/// not behind it and one altered in transit: the genuine ones are stored byte for byte, the
/// foreign one is `relay_not_authorized` (naming the concentrator) and the altered one
/// `bad_signature`; neither is stored, and the batch is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_relay_batch_stores_the_genuine_items_and_refuses_the_rest() {
    let f = Env::new(&[("Q-", 2), ("X-", 1)], &["dc-2"]).start().await;
    let dc = id("dc-2");
    let (q1, q2, x) = (id("Q-000001"), id("Q-000002"), id("X-000001"));
    f.store()
        .attach_meters(&dc, &[q1.clone(), q2.clone()], OffsetDateTime::now_utc())
        .unwrap();
    let (k1, k2, kx) = (f.meter_key(&q1), f.meter_key(&q2), f.meter_key(&x));

    let genuine_1 = signed_reading(&k1, &q1, 1, 10.0);
    let not_behind = signed_reading(&kx, &x, 1, 5.0);
    let genuine_2 = signed_reading(&k2, &q2, 1, 20.0);
    let mut altered = signed_reading(&k1, &q1, 2, 11.0);
    altered.envelope = gridward_meter::concentrator::alter(&altered.envelope).to_vec();
    let batch = relay::encode_batch(&[genuine_1.clone(), not_behind, genuine_2.clone(), altered]);

    let mut client = f
        .connect_from(
            LeafKind::Concentrator,
            "dc-2",
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )
        .await
        .expect("dc-2 connects");
    assert_eq!(
        publish(&mut client, &relay::relay_topic(&dc), batch, 1).await,
        0,
        "the batch is acknowledged whatever its items' outcomes"
    );

    let (refused, bad) = wait("both refusals recorded", || {
        let refused = f.events("relay_not_authorized");
        let bad = f.events("bad_signature");
        (!refused.is_empty() && !bad.is_empty()).then_some((refused, bad))
    })
    .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        refused[0].meter_id.as_ref(),
        Some(&dc),
        "names the concentrator"
    );
    assert!(
        refused[0].detail.contains(x.as_str()),
        "{}",
        refused[0].detail
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].meter_id.as_ref(), Some(&q1));
    assert!(bad[0].detail.contains("dc-2"), "{}", bad[0].detail);

    for (m, item) in [(&q1, &genuine_1), (&q2, &genuine_2)] {
        let stored = f.readings(m);
        assert_eq!(
            stored.iter().map(|r| r.counter).collect::<Vec<_>>(),
            [1],
            "{m}: only the genuine reading"
        );
        let env = f.store().envelope(stored[0].id).unwrap().expect("envelope");
        assert_eq!(env, item.envelope, "{m}'s envelope stored as it signed it");
    }
    assert!(f.readings(&x).is_empty());
    assert!(f.readings(&dc).is_empty());
    wait("a relay_refused alarm on dc-2", || {
        f.alarms("relay_refused", Some("concentrator:dc-2"))
            .into_iter()
            .next()
    })
    .await;
    drop(client);
    f.running.shutdown().await;
}
