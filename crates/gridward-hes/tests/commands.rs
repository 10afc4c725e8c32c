//! The downward path end to end, in process: the head-end's command service signs and queues,
//! its dispatcher publishes over the real MQTT endpoint, simulated meters (`gridward-meter`'s
//! fleet, mutual TLS) verify and execute, and their signed acknowledgements come back through
//! the ingest pipeline into the command's lifecycle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gridward_command::{IssueRequest, Issued};
use gridward_core::MeterId;
use gridward_core::command::{self, Command, CommandBody, CommandId};
use gridward_core::envelope::SigningKey;
use gridward_hes::config::Config;
use gridward_hes::pipeline::system_clock;
use gridward_hes::service::{self, Running};
use gridward_meter::command::Relay;
use gridward_meter::fleet::{Fleet, FleetConfig, MeterSpec};
use gridward_meter::identity::{MeterIdentity, Trust};
use gridward_pki::tls::TlsOptions;
use gridward_pki::{InitOptions, IssueOptions, Pki};
use gridward_store::{
    CommandStatus, CommandStore, ReadingQuery, SecurityEventQuery, Store, StoredCommand,
};
use time::OffsetDateTime;

struct Fixture {
    tmp: tempfile::TempDir,
    pki_dir: PathBuf,
    running: Running,
}

fn meter(n: usize) -> MeterId {
    MeterId::new(&format!("T-{n:06}")).unwrap()
}

async fn start(meters: usize) -> Fixture {
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
    pki.issue_meters("T-", meters, &opts, now, &mut |_| {})
        .unwrap();
    pki.issue_command_signer("headend", &opts, now).unwrap();
    let text = format!(
        "[pki]\ndir = {:?}\n[mqtt]\nlisten = \"127.0.0.1:0\"\nban_exempt = [\"127.0.0.1\"]\n\
         [store]\npath = {:?}\n[api]\nlisten = \"off\"\n[commands]\ndispatch_rate_per_sec = 1000.0\n",
        pki_dir,
        tmp.path().join("gridward.db"),
    );
    let config =
        Config::parse(&text, std::path::Path::new("test.toml"), tmp.path()).expect("config");
    let running = service::start(&config, system_clock()).await.unwrap();
    assert!(running.commands.is_some(), "commands are on with a signer");
    Fixture {
        tmp,
        pki_dir,
        running,
    }
}

impl Fixture {
    async fn fleet(&self, ids: &[MeterId]) -> Fleet {
        let trust = Trust::load_at(&self.pki_dir, OffsetDateTime::now_utc()).unwrap();
        let mut c = FleetConfig::new(
            "127.0.0.1",
            self.running.local_addr.port(),
            self.tmp.path().join("state"),
            Arc::new(OffsetDateTime::now_utc),
        );
        c.server_name = "localhost".into();
        c.interval = time::Duration::milliseconds(300);
        c.backoff_base = Duration::from_millis(50);
        c.backoff_cap = Duration::from_millis(500);
        c.command_signers = trust.command_signers().to_vec();
        let specs = ids
            .iter()
            .map(|id| {
                MeterSpec::from(
                    MeterIdentity::load(&self.pki_dir, id, &trust, &TlsOptions::default()).unwrap(),
                )
            })
            .collect();
        let fleet = Fleet::start(specs, c).await.unwrap();
        for id in ids {
            self.wait("meter connected", || {
                self.running.endpoint.is_connected(id).then_some(())
            })
            .await;
        }
        fleet
    }

    fn issue(
        &self,
        meters: &[MeterId],
        body: CommandBody,
        ttl: Option<time::Duration>,
    ) -> Vec<CommandId> {
        let commands = &self.running.commands.as_ref().unwrap().commands;
        match commands
            .issue(IssueRequest {
                meters: meters.to_vec(),
                body,
                actor: "alice".into(),
                ttl,
                reason: "test".into(),
            })
            .unwrap()
        {
            Issued::Queued { ids } => ids,
            other => panic!("not queued: {other:?}"),
        }
    }

    fn command(&self, id: &CommandId) -> StoredCommand {
        self.running.store.command(id).unwrap().unwrap()
    }

    async fn settled(&self, id: &CommandId) -> StoredCommand {
        self.wait("command final", || {
            let c = self.command(id);
            c.status.is_final().then_some(c)
        })
        .await
    }

    async fn wait<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        for _ in 0..400 {
            if let Some(v) = f() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn events(&self, reason: &str) -> Vec<gridward_store::SecurityEvent> {
        self.running
            .store
            .security_events(&SecurityEventQuery {
                reason: Some(reason.into()),
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect()
    }

    fn readings(&self, m: &MeterId) -> usize {
        self.running
            .store
            .readings(&ReadingQuery::new(m.clone()))
            .unwrap()
            .len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_reconnect_are_signed_sent_executed_and_acknowledged() {
    let f = start(2).await;
    let (m1, m2) = (meter(1), meter(2));
    let fleet = f.fleet(&[m1.clone(), m2.clone()]).await;

    let [id] = f.issue(std::slice::from_ref(&m1), CommandBody::Disconnect, None)[..] else {
        panic!("one command")
    };
    let c = f.settled(&id).await;
    assert_eq!(c.status, CommandStatus::Acknowledged, "{c:?}");
    assert_eq!(c.issued_by, "alice");
    assert_eq!(c.attempts, 1);
    assert!(c.sent_at.is_some() && c.ack_message_id.is_some());
    assert_eq!(fleet.relay_state(&m1), Some(Relay::Disconnected));
    assert_eq!(
        fleet.relay_state(&m2),
        Some(Relay::Connected),
        "only the target"
    );
    // The stored envelope is what the meter verified: the head-end's signature over the topic.
    let signer = f.running.commands.as_ref().unwrap().commands.signer();
    assert_eq!(&c.envelope[..1], &[0xd2], "a tagged COSE_Sign1");
    assert!(
        command::unverified_id(&c.envelope) == Some(id),
        "the envelope carries the id"
    );
    drop(signer);

    let [id] = f.issue(std::slice::from_ref(&m1), CommandBody::Reconnect, None)[..] else {
        panic!("one command")
    };
    let c = f.settled(&id).await;
    assert_eq!(c.status, CommandStatus::Acknowledged);
    assert_eq!(fleet.relay_state(&m1), Some(Relay::Connected));
    assert!(c.counter > 1, "the per-meter counter grows");

    // Readings kept flowing through all of it.
    let before = f.readings(&m1);
    f.wait("more readings", || (f.readings(&m1) > before).then_some(()))
        .await;
    assert!(f.events("command_refused").is_empty());
    // Every command is an audit entry: issued (by whom) and acknowledged (by the meter).
    f.running.audit.flush();
    let entries = f
        .running
        .audit
        .log()
        .entries(&gridward_audit::Query {
            action: Some("command.".into()),
            ..Default::default()
        })
        .unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions.iter().filter(|a| **a == "command.issue").count(),
        2,
        "{actions:?}"
    );
    assert!(actions.contains(&"command.ack"), "{actions:?}");
    assert!(
        entries
            .iter()
            .any(|e| e.action == "command.issue" && e.target.contains(m1.as_str())),
        "{entries:?}"
    );
    fleet.stop(Duration::from_secs(2)).await;
    f.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_command_is_refused_by_the_meter_and_reported_at_the_head_end() {
    let f = start(1).await;
    let m1 = meter(1);
    let fleet = f.fleet(std::slice::from_ref(&m1)).await;
    // A key that is not the head-end's command key (here: a fresh one; the attack harness also
    // tries a meter's key), delivered as a compromised broker would.
    let pkcs8 =
        aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .unwrap();
    let forger = SigningKey::from_pkcs8_der(pkcs8.as_ref()).unwrap();
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let forged = Command {
        id: CommandId::random(),
        meter_id: m1.clone(),
        body: CommandBody::Disconnect,
        counter: 1_000,
        issued_at: now,
        expires_at: now + time::Duration::minutes(5),
    };
    let bytes = command::sign(&forger, &forged).unwrap();
    assert!(fleet.inject_command(&m1, &m1.commands_topic(), bytes));
    let event = f
        .wait("command_refused event", || {
            f.events("command_refused").into_iter().next()
        })
        .await;
    assert_eq!(event.meter_id.as_ref(), Some(&m1));
    assert!(event.detail.contains("unknown_signer"), "{}", event.detail);
    assert!(
        event.detail.contains(&forged.id.to_string()),
        "{}",
        event.detail
    );
    assert_eq!(
        fleet.relay_state(&m1),
        Some(Relay::Connected),
        "not executed"
    );

    // A genuine command still goes through afterwards.
    let [id] = f.issue(std::slice::from_ref(&m1), CommandBody::ReadNow, None)[..] else {
        panic!("one command")
    };
    assert_eq!(f.settled(&id).await.status, CommandStatus::Acknowledged);
    fleet.stop(Duration::from_secs(2)).await;
    f.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_an_offline_meter_wait_and_expired_ones_never_leave() {
    let f = start(2).await;
    let (m1, m2) = (meter(1), meter(2));
    let waiting = f.issue(
        std::slice::from_ref(&m1),
        CommandBody::SetTariff {
            tariff: "night-2".into(),
        },
        None,
    )[0];
    let expiring = f.issue(
        std::slice::from_ref(&m2),
        CommandBody::ReadNow,
        Some(time::Duration::seconds(1)),
    )[0];
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        f.command(&waiting).status,
        CommandStatus::Queued,
        "nobody to send to"
    );
    let expired = f
        .wait("expiry", || {
            let c = f.command(&expiring);
            (c.status == CommandStatus::Expired).then_some(c)
        })
        .await;
    assert_eq!(expired.attempts, 0, "never sent");

    // Both meters connect: the waiting command goes out on reconnection, the expired one never.
    let fleet = f.fleet(&[m1.clone(), m2.clone()]).await;
    let c = f.settled(&waiting).await;
    assert_eq!(c.status, CommandStatus::Acknowledged);
    assert_eq!(
        fleet.device_state(&m1).map(|s| s.tariff),
        Some(Some("night-2".to_owned()))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(f.command(&expiring).attempts, 0);
    assert_eq!(f.command(&expiring).status, CommandStatus::Expired);
    fleet.stop(Duration::from_secs(2)).await;
    f.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_key_rotates_on_reload_and_queued_commands_keep_their_signature() {
    let f = start(1).await;
    let m1 = meter(1);
    let commands = &f.running.commands.as_ref().unwrap().commands;
    let old_kid = commands.signer().kid().to_vec();
    // Queued under the old key while the meter is offline.
    let before = f.issue(std::slice::from_ref(&m1), CommandBody::ReadNow, None)[0];
    // A new command-signer certificate (and key) replaces the old one; the head-end picks it up
    // on reload, as on SIGHUP.
    let mut opts = IssueOptions::new("test");
    opts.replace = true;
    Pki::open(&f.pki_dir, None)
        .unwrap()
        .issue_command_signer("headend", &opts, OffsetDateTime::now_utc())
        .unwrap();
    f.running.reload().unwrap();
    assert_ne!(commands.signer().kid(), &old_kid[..], "rotated");
    let after = f.issue(std::slice::from_ref(&m1), CommandBody::ReadNow, None)[0];
    // The meter pins both during the rotation (the superseded certificate is still valid).
    let fleet = f.fleet(std::slice::from_ref(&m1)).await;
    for id in [before, after] {
        let c = f.settled(&id).await;
        assert_eq!(c.status, CommandStatus::Acknowledged, "{c:?}");
    }
    assert!(f.events("command_refused").is_empty());
    fleet.stop(Duration::from_secs(2)).await;
    f.running.shutdown().await;
}
