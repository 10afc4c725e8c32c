//! The head-end end to end, in process: a PKI on disk, the service on 127.0.0.1:0, meters that
//! connect over mutual TLS with `gridward_mqtt::client` and publish signed envelopes.

use std::sync::Arc;
use std::time::Duration;

use gridward_core::MeterId;
use gridward_core::document::{Event, EventKind, Format, Reading};
use gridward_core::envelope::{self, EnvelopeParams, SigningKey};
use gridward_core::security::Reason;
use gridward_hes::config::Config;
use gridward_hes::pipeline::system_clock;
use gridward_hes::service::{self, Running};
use gridward_mqtt::client::{self, Client, ClientOptions, Packet, QoS};
use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki, RevocationReason, RevokeTarget};
use gridward_store::{ReadingQuery, SecurityEventQuery, Store};
use time::OffsetDateTime;

struct Fixture {
    _tmp: tempfile::TempDir,
    pki_dir: std::path::PathBuf,
    running: Running,
}

async fn start(meters: &[&str]) -> Fixture {
    start_with(meters, "").await
}

/// [`start`] with more configuration (whole sections).
async fn start_with(meters: &[&str], extra: &str) -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki_dir = tmp.path().join("pki");
    let now = OffsetDateTime::now_utc();
    let pki = Pki::init(&pki_dir, &InitOptions::new("test", now)).expect("init");
    let opts = IssueOptions::new("test");
    pki.issue_server(
        "localhost",
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        &opts,
        now,
    )
    .expect("server");
    for id in meters {
        pki.issue_meter(&MeterId::new(id).expect("id"), &opts, now)
            .expect("meter");
    }
    let text = format!(
        "[pki]\ndir = {:?}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[store]\npath = {:?}\n[api]\nlisten = \"127.0.0.1:0\"\n{}",
        pki_dir,
        tmp.path().join("gridward.db"),
        extra
    );
    let config =
        Config::parse(&text, std::path::Path::new("test.toml"), tmp.path()).expect("config");
    let running = service::start(&config, system_clock())
        .await
        .expect("start");
    Fixture {
        _tmp: tmp,
        pki_dir,
        running,
    }
}

struct Meter {
    id: MeterId,
    key: SigningKey,
    client: Client,
}

impl Fixture {
    async fn connect(&self, id: &str) -> Result<Meter, client::ClientError> {
        let id = MeterId::new(id).expect("id");
        let material = Pki::open(&self.pki_dir, None)
            .expect("open")
            .tls_material(LeafKind::Meter, id.as_str())
            .expect("material");
        let config = gridward_pki::tls::client_config(&material).expect("client config");
        let key_pem = std::fs::read_to_string(self.pki_dir.join(format!("meters/{id}/key.pem")))
            .expect("key");
        let key = SigningKey::from_pkcs8_pem(&key_pem).expect("signing key");
        let (client, _ack) = client::connect_tls(
            self.running.local_addr,
            "localhost",
            config,
            &ClientOptions::new(id.as_str()),
        )
        .await?;
        Ok(Meter { id, key, client })
    }

    fn store(&self) -> &gridward_store::SqliteStore {
        &self.running.store
    }

    fn reasons(&self) -> Vec<String> {
        self.store()
            .security_events(&SecurityEventQuery::default())
            .expect("events")
            .into_iter()
            .map(|e| e.event.reason)
            .collect()
    }
}

impl Meter {
    fn reading(&self, counter: u64, kwh: f64, format: Format) -> Vec<u8> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let at = OffsetDateTime::from_unix_timestamp(now).expect("time");
        let reading = Reading {
            meter_id: self.id.clone(),
            timestamp: at,
            energy_kwh: kwh,
        };
        let doc = match format {
            Format::Xml => reading.to_xml(),
            Format::Json => reading.to_json(),
        };
        let topic = self.id.readings_topic();
        let params = EnvelopeParams {
            meter_id: &self.id,
            counter,
            timestamp: now,
            content_type: format,
            topic: &topic,
        };
        envelope::sign(&self.key, &params, doc.as_bytes()).expect("sign")
    }

    /// Publishes QoS 1 and waits for the PUBACK; returns its reason code.
    async fn publish(&mut self, topic: &str, payload: Vec<u8>, pkid: u16) -> u8 {
        self.client
            .publish(topic, payload, QoS::AtLeastOnce, pkid)
            .await
            .expect("publish");
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.client.recv()).await {
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
}

async fn settle() {
    // Security events are written by their own thread; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn genuine_readings_are_stored_and_refusals_leave_events() {
    let f = start(&["m1", "m2"]).await;
    let mut m1 = f.connect("m1").await.expect("m1 connects");
    let topic = m1.id.readings_topic();

    // Genuine XML and JSON readings: stored, acknowledged.
    let first = m1.reading(1, 100.5, Format::Xml);
    assert_eq!(m1.publish(&topic, first.clone(), 1).await, 0);
    let second = m1.reading(2, 101.0, Format::Json);
    assert_eq!(m1.publish(&topic, second, 2).await, 0);

    // A byte-identical resend: acknowledged as a duplicate, not stored again, no event.
    assert_eq!(m1.publish(&topic, first.clone(), 3).await, 0);

    // A replay: a different envelope under a used counter.
    let replay = m1.reading(2, 102.0, Format::Xml);
    m1.publish(&topic, replay, 4).await;

    // A tampered envelope: one byte of the payload changed.
    let mut tampered = m1.reading(3, 103.0, Format::Xml);
    let i = tampered.len() - 80;
    tampered[i] ^= 0x01;
    m1.publish(&topic, tampered, 5).await;

    // A reading whose register went backwards.
    let backwards = m1.reading(4, 50.0, Format::Xml);
    m1.publish(&topic, backwards, 6).await;

    // Genuine data still flows after all that.
    let third = m1.reading(5, 104.0, Format::Xml);
    assert_eq!(m1.publish(&topic, third, 7).await, 0);

    settle().await;
    let stored = f
        .store()
        .readings(&ReadingQuery::new(m1.id.clone()))
        .expect("readings");
    let counters: Vec<u64> = stored.iter().map(|r| r.counter).collect();
    assert_eq!(
        counters,
        [1, 2, 5],
        "only genuine, fresh, valid readings are stored, once"
    );
    let reasons = f.reasons();
    for expected in [
        Reason::Replay,
        Reason::BadSignature,
        Reason::RegisterWentBackwards,
    ] {
        assert!(
            reasons.contains(&expected.code().to_owned()),
            "no {expected} event in {reasons:?}"
        );
    }
    let m = f.running.metrics.snapshot();
    assert_eq!((m.accepted, m.duplicates), (3, 1));
    assert_eq!(m.rejected_for(Reason::Replay), 1);

    // A signature by m1's key on a message claiming m2, published on m1's own topic.
    let m2 = MeterId::new("m2").expect("id");
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let doc = Reading {
        meter_id: m2.clone(),
        timestamp: OffsetDateTime::from_unix_timestamp(now).expect("t"),
        energy_kwh: 1.0,
    }
    .to_xml();
    let params = EnvelopeParams {
        meter_id: &m2,
        counter: 10,
        timestamp: now,
        content_type: Format::Xml,
        topic: &topic,
    };
    let spoof = envelope::sign(&m1.key, &params, doc.as_bytes()).expect("sign");
    m1.publish(&topic, spoof, 8).await;
    settle().await;
    assert!(
        f.reasons().contains(&Reason::KeyMismatch.code().to_owned()),
        "{:?}",
        f.reasons()
    );
    assert!(
        f.store()
            .readings(&ReadingQuery::new(m2))
            .expect("readings")
            .is_empty()
    );

    f.running.shutdown().await;
}

#[tokio::test]
async fn events_topic_takes_events_only_and_old_messages_are_stale() {
    let f = start(&["m1"]).await;
    let mut m1 = f.connect("m1").await.expect("connect");
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let at = OffsetDateTime::from_unix_timestamp(now).expect("t");
    let event = Event {
        meter_id: m1.id.clone(),
        timestamp: at,
        kind: EventKind::CoverOpened,
    }
    .to_json();
    let topic = m1.id.events_topic();
    let params = EnvelopeParams {
        meter_id: &m1.id,
        counter: 1,
        timestamp: now,
        content_type: Format::Json,
        topic: &topic,
    };
    let env = envelope::sign(&m1.key, &params, event.as_bytes()).expect("sign");
    assert_eq!(m1.publish(&topic, env, 1).await, 0);

    // A reading signed for the readings topic, published on the events topic: bad signature.
    let reading = m1.reading(2, 1.0, Format::Xml);
    m1.publish(&topic, reading, 2).await;
    // A reading signed for the events topic: the signature holds, the kind does not belong there.
    let doc = Reading {
        meter_id: m1.id.clone(),
        timestamp: at,
        energy_kwh: 1.0,
    }
    .to_xml();
    let params = EnvelopeParams {
        meter_id: &m1.id,
        counter: 2,
        timestamp: now,
        content_type: Format::Xml,
        topic: &topic,
    };
    let misplaced = envelope::sign(&m1.key, &params, doc.as_bytes()).expect("sign");
    m1.publish(&topic, misplaced, 4).await;

    // A message signed an hour ago with a new counter: stale.
    let old = now - 3600;
    let doc = Reading {
        meter_id: m1.id.clone(),
        timestamp: OffsetDateTime::from_unix_timestamp(old).expect("t"),
        energy_kwh: 1.0,
    }
    .to_xml();
    let rt = m1.id.readings_topic();
    let params = EnvelopeParams {
        meter_id: &m1.id,
        counter: 3,
        timestamp: old,
        content_type: Format::Xml,
        topic: &rt,
    };
    let stale = envelope::sign(&m1.key, &params, doc.as_bytes()).expect("sign");
    m1.publish(&rt, stale, 3).await;
    settle().await;
    let reasons = f.reasons();
    for r in ["bad_signature", "stale", "invalid_document"] {
        assert!(reasons.contains(&r.to_owned()), "no {r} in {reasons:?}");
    }
    assert_eq!(f.store().counts().expect("counts").meter_events, 1);
    f.running.shutdown().await;
}

#[tokio::test]
async fn revocation_takes_effect_on_reload_and_disconnects_the_meter() {
    let f = start(&["m1", "m2"]).await;
    let mut m1 = f.connect("m1").await.expect("connect");
    let topic = m1.id.readings_topic();
    let r = m1.reading(1, 1.0, Format::Xml);
    assert_eq!(m1.publish(&topic, r, 1).await, 0);

    let pki = Pki::open(&f.pki_dir, None).expect("open");
    pki.revoke(
        &RevokeTarget::Identity {
            kind: Some(LeafKind::Meter),
            name: "m1".into(),
        },
        RevocationReason::KeyCompromise,
        "test",
        OffsetDateTime::now_utc(),
    )
    .expect("revoke");
    assert_eq!(
        f.running.reload().expect("reload"),
        1,
        "the live session of m1 is closed"
    );
    // The old connection ends.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if m1.client.recv().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "revoked meter still connected");
    // A new handshake is refused; another meter still connects.
    assert!(f.connect("m1").await.is_err(), "revoked meter reconnected");
    let mut m2 = f.connect("m2").await.expect("m2 still connects");
    let r = m2.reading(1, 1.0, Format::Xml);
    assert_eq!(m2.publish(&m2.id.readings_topic(), r, 1).await, 0);
    settle().await;
    assert!(
        f.reasons()
            .contains(&Reason::CertificateRevoked.code().to_owned()),
        "{:?}",
        f.reasons()
    );
    let _ = Arc::clone(&f.running.metrics);
    f.running.shutdown().await;
}
