//! MQTT clients not written here — Mosquitto's `mosquitto_pub` / `mosquitto_sub` (MQTT 3.1.1
//! and 5) and Eclipse Paho for Python — against a real `gridward serve`, with certificates from
//! `gridward pki` and envelopes from `gridward meter sign`.
//!
//! Genuine messages are stored; every attack (foreign CA, no certificate, revoked and expired
//! certificates, another meter's ClientID or topic, a subscription to `#`, a replay, a tampered
//! byte) is refused with its security-event reason and stores nothing, while a genuine fleet
//! (`gridward meter run`) keeps getting readings stored undisturbed.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use gridward_core::MeterId;
use gridward_pki::{IssueOptions, Pki};

use crate::headend::{
    ChildGuard, EventRow, FleetProcess, Headend, MOSQUITTO_HINT, MeterFiles, PAHO_HINT,
    issue_meter, new_pki, reading_json, reasons, run_with_timeout, show, sign, wait_for,
};
use crate::support::gridward_ok;

/// Deadline of one external client run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The Paho client script.
fn paho_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/mqtt_client.py")
}

/// How an external client connects: the head-end, its CA, and optionally a meter's credentials.
struct Peer<'a> {
    h: &'a Headend,
    cafile: String,
}

/// MQTT protocol version of a client run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V {
    V311,
    V5,
}

impl<'a> Peer<'a> {
    fn new(h: &'a Headend, pki: &Path) -> Self {
        Self {
            h,
            cafile: pki
                .join("ca/root.crt.pem")
                .to_str()
                .expect("utf-8")
                .to_owned(),
        }
    }

    fn mosquitto_common(
        &self,
        program: &str,
        v: V,
        creds: Option<&MeterFiles>,
        client_id: &str,
    ) -> Command {
        let mut c = Command::new(program);
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.h.port.to_string(),
            "--cafile",
            &self.cafile,
        ]);
        c.args(["-i", client_id, "-d"]);
        c.args(["-V", if v == V::V5 { "mqttv5" } else { "mqttv311" }]);
        if let Some(m) = creds {
            c.args(["--cert", &m.chain, "--key", &m.key]);
        }
        c
    }

    /// `mosquitto_pub` of the file `payload` to `topic` at QoS 1.
    fn mosquitto_pub(
        &self,
        v: V,
        creds: Option<&MeterFiles>,
        client_id: &str,
        topic: &str,
        payload: &Path,
    ) -> Output {
        let mut c = self.mosquitto_common("mosquitto_pub", v, creds, client_id);
        c.args(["-t", topic, "-q", "1", "-f"]).arg(payload);
        run_with_timeout(&mut c, CLIENT_TIMEOUT, MOSQUITTO_HINT)
    }

    /// `mosquitto_sub` to `filter`, waiting at most 2 s for one message.
    fn mosquitto_sub(&self, v: V, creds: &MeterFiles, filter: &str) -> Output {
        let mut c = self.mosquitto_common("mosquitto_sub", v, Some(creds), &creds.id);
        c.args(["-t", filter, "-C", "1", "-W", "2"]);
        run_with_timeout(&mut c, CLIENT_TIMEOUT, MOSQUITTO_HINT)
    }

    /// The Paho script; returns its exit status success and its JSON report.
    fn paho(
        &self,
        v: V,
        creds: Option<&MeterFiles>,
        client_id: &str,
        topic: &str,
        payload: &Path,
    ) -> (bool, serde_json::Value, Output) {
        let mut c = Command::new("python3");
        c.arg(paho_script());
        c.args(["--port", &self.h.port.to_string(), "--cafile", &self.cafile]);
        c.args(["--client-id", client_id, "--topic", topic, "--mqtt"]);
        c.arg(if v == V::V5 { "5" } else { "3.1.1" });
        c.arg("--file").arg(payload);
        if let Some(m) = creds {
            c.args(["--cert", &m.chain, "--key", &m.key]);
        }
        let out = run_with_timeout(&mut c, CLIENT_TIMEOUT, PAHO_HINT);
        assert_ne!(out.status.code(), Some(3), "{PAHO_HINT}\n{}", show(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "the Paho client printed no JSON report ({e}); {PAHO_HINT}\n{}",
                show(&out)
            )
        });
        (out.status.success(), report, out)
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Requires a publish acknowledged with success.
fn assert_published(what: &str, out: &Output) {
    let t = text(out);
    assert!(
        out.status.success() && t.contains("received PUBACK") && !t.contains("failed"),
        "{what}: not acknowledged\n{}",
        show(out)
    );
}

fn assert_one_event(h: &Headend, before: usize, what: &str, reason: &str) -> EventRow {
    let new = h.new_events(before, what);
    assert_eq!(reasons(&new), [reason], "{what}: security events {new:#?}");
    new.into_iter().next().expect("one event")
}

#[test]
fn genuine_envelopes_from_mosquitto_and_paho_are_stored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    let ids = ["g-mosq311", "g-mosq5", "g-paho311", "g-paho5"];
    for id in ids {
        issue_meter(&pki, id);
    }
    let h = Headend::start(tmp.path(), &pki, &[]);
    let peer = Peer::new(&h, &pki);

    for (i, id) in ids.iter().enumerate() {
        let m = MeterFiles::new(&pki, id);
        let topic = format!("meters/{id}/readings");
        let kwh = format!("{}.25", 1000 + i);
        let env = tmp.path().join(format!("{id}.cose"));
        sign(&m.key, id, 1, None, &reading_json(id, &kwh), &env);
        let v = if id.ends_with('5') { V::V5 } else { V::V311 };
        if id.starts_with("g-mosq") {
            assert_published(id, &peer.mosquitto_pub(v, Some(&m), id, &topic, &env));
        } else {
            let (ok, report, out) = peer.paho(v, Some(&m), id, &topic, &env);
            assert!(
                ok && report["puback"] == 0,
                "{id}: Paho publish not acknowledged: {report}\n{}",
                show(&out)
            );
        }
        assert_eq!(h.stored_kwh(id), [kwh], "{id}: stored documents");
        assert_eq!(h.stored_counters(id), [1], "{id}: stored counters");
    }

    // Subscribing to its own command topic is allowed (the positive control of the `#` test).
    for v in [V::V311, V::V5] {
        let m = MeterFiles::new(&pki, "g-mosq5");
        let out = peer.mosquitto_sub(v, &m, "meters/g-mosq5/commands");
        let t = text(&out);
        assert!(
            t.contains("received SUBACK")
                && !t.contains("denied")
                && !t.contains(": 128")
                && !t.contains(": 135"),
            "{v:?}: subscription to the meter's own command topic not granted\n{}",
            show(&out)
        );
    }

    let events = h.events();
    assert!(
        events.is_empty(),
        "genuine clients caused security events: {events:#?}"
    );
}

/// Issues meter `id` whose certificate expired 9 days ago (validity one day from 10 days ago),
/// through the library with an injected `now`: the CLI only issues from the present.
fn issue_expired_meter(pki: &Path, id: &str) {
    let p = Pki::open(pki, None).expect("open the PKI");
    let mut opts = IssueOptions::new("mqtt-peers-test");
    opts.validity_days = Some(1);
    let then = time::OffsetDateTime::now_utc() - time::Duration::days(10);
    let issued = p
        .issue_meter(&MeterId::new(id).expect("meter id"), &opts, then)
        .expect("issue a meter certificate in the past");
    assert!(issued.not_after < time::OffsetDateTime::now_utc());
}

/// The readings stored for the fleet's meters `f000001..=f{n}`.
fn fleet_stored(h: &Headend, n: usize) -> usize {
    (1..=n)
        .map(|i| h.stored_counters(&format!("f{i:06}")).len())
        .sum()
}

#[test]
fn attacks_are_refused_with_their_reason_while_a_fleet_keeps_reporting() {
    const FLEET: usize = 20;
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        pki.to_str().expect("utf-8"),
        "--count",
        &FLEET.to_string(),
        "--prefix",
        "f",
    ]);
    for id in ["a-ok", "a-rev"] {
        issue_meter(&pki, id);
    }
    issue_expired_meter(&pki, "a-exp");
    // A foreign CA with the same names as ours (same issuer DN: only the signature differs),
    // which issued its own "a-ok".
    let foreign = work.join("foreign");
    new_pki(&foreign, "Gridward");
    issue_meter(&foreign, "a-ok");

    // Every attack comes from 127.0.0.1, like the fleet: the temporary ban of a source address
    // (its own tests) would otherwise ban the fleet too.
    let h = Headend::start(
        work,
        &pki,
        &[("ban_after_failures = 10", "ban_after_failures = 0")],
    );
    let peer = Peer::new(&h, &pki);
    let port = h.port.to_string();
    let state = work.join("fleet-state");
    let mut fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            pki.to_str().expect("utf-8"),
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--prefix",
            "f",
            "--count",
            &FLEET.to_string(),
            "--interval",
            "0.2",
            "--duration",
            "300",
            "--drain",
            "15",
            "--format",
            "json",
            "--state",
            state.to_str().expect("utf-8"),
        ],
    );
    // The fleet is up: every meter has stored readings.
    wait_for(
        Duration::from_secs(60),
        "every fleet meter to have readings stored",
        || {
            (1..=FLEET)
                .all(|i| !h.stored_counters(&format!("f{i:06}")).is_empty())
                .then_some(())
        },
        || format!("server log:\n{}", h.log()),
    );
    let fleet_before = fleet_stored(&h, FLEET);
    assert!(
        h.events().is_empty(),
        "the genuine fleet caused security events: {:#?}",
        h.events()
    );

    let ok = MeterFiles::new(&pki, "a-ok");
    let env = |name: &str| work.join(format!("{name}.cose"));
    let mut expected: Vec<&str> = Vec::new();

    // 0. Baseline: a genuine reading of a-ok (mosquitto_pub, MQTT 3.1.1) is stored.
    sign(
        &ok.key,
        "a-ok",
        1,
        None,
        &reading_json("a-ok", "100.5"),
        &env("ok1"),
    );
    assert_published(
        "a-ok genuine",
        &peer.mosquitto_pub(
            V::V311,
            Some(&ok),
            "a-ok",
            "meters/a-ok/readings",
            &env("ok1"),
        ),
    );
    assert_eq!(h.stored_kwh("a-ok"), ["100.5"]);

    // 1. A certificate from a foreign CA claiming to be a-ok, with an envelope signed by its key.
    let forged = MeterFiles::new(&foreign, "a-ok");
    sign(
        &forged.key,
        "a-ok",
        10,
        None,
        &reading_json("a-ok", "110.5"),
        &env("foreign"),
    );
    let before = h.events().len();
    let out = peer.mosquitto_pub(
        V::V311,
        Some(&forged),
        "a-ok",
        "meters/a-ok/readings",
        &env("foreign"),
    );
    assert!(
        !out.status.success(),
        "foreign CA accepted:\n{}",
        show(&out)
    );
    assert!(
        !text(&out).contains("CONNACK"),
        "foreign CA got a CONNACK:\n{}",
        show(&out)
    );
    assert_one_event(&h, before, "a foreign CA", "tls_handshake_failed");
    expected.push("tls_handshake_failed");

    // 2. No client certificate, with a genuine (captured) envelope of a-ok.
    sign(
        &ok.key,
        "a-ok",
        11,
        None,
        &reading_json("a-ok", "111.5"),
        &env("nocert"),
    );
    let before = h.events().len();
    let out = peer.mosquitto_pub(V::V5, None, "a-ok", "meters/a-ok/readings", &env("nocert"));
    assert!(
        !out.status.success(),
        "no certificate accepted:\n{}",
        show(&out)
    );
    assert_one_event(&h, before, "no client certificate", "tls_handshake_failed");
    expected.push("tls_handshake_failed");

    // 3. A revoked certificate: a-rev works (Paho, MQTT 5), holds a subscription, is revoked,
    //    the head-end reloads on SIGHUP: the open connection is closed and new ones are refused.
    let rev = MeterFiles::new(&pki, "a-rev");
    sign(
        &rev.key,
        "a-rev",
        1,
        None,
        &reading_json("a-rev", "200.5"),
        &env("rev1"),
    );
    let (sent, report, out) = peer.paho(
        V::V5,
        Some(&rev),
        "a-rev",
        "meters/a-rev/readings",
        &env("rev1"),
    );
    assert!(
        sent,
        "a-rev genuine (before revocation) refused: {report}\n{}",
        show(&out)
    );
    assert_eq!(h.stored_kwh("a-rev"), ["200.5"]);
    let sub_log = work.join("a-rev-sub.log");
    let mut sub = ChildGuard(
        peer.mosquitto_common("mosquitto_sub", V::V5, Some(&rev), "a-rev")
            .args(["-t", "meters/a-rev/commands", "-W", "60"])
            .stdin(Stdio::null())
            .stdout(File::create(&sub_log).expect("create the log"))
            .stderr(File::create(work.join("a-rev-sub.err")).expect("create the log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run mosquitto_sub ({e}): {MOSQUITTO_HINT}")),
    );
    let sub_text = || {
        format!(
            "{}{}",
            fs::read_to_string(&sub_log).unwrap_or_default(),
            fs::read_to_string(work.join("a-rev-sub.err")).unwrap_or_default()
        )
    };
    wait_for(
        Duration::from_secs(15),
        "a-rev to be connected (gridward meters)",
        || h.is_connected("a-rev").then_some(()),
        sub_text,
    );
    gridward_ok(&[
        "pki",
        "revoke",
        "--dir",
        pki.to_str().expect("utf-8"),
        "--id",
        "a-rev",
        "--reason",
        "keyCompromise",
    ]);
    let before = h.events().len();
    h.reload();
    wait_for(
        Duration::from_secs(10),
        "the revoked meter's open connection to be closed",
        || sub.0.try_wait().expect("poll mosquitto_sub"),
        || format!("{}\nserver log:\n{}", sub_text(), h.log()),
    );
    let ev = assert_one_event(
        &h,
        before,
        "a connected meter revoked",
        "certificate_revoked",
    );
    assert_eq!(ev.meter, "a-rev", "{ev:?}");
    expected.push("certificate_revoked");
    sign(
        &rev.key,
        "a-rev",
        2,
        None,
        &reading_json("a-rev", "201.5"),
        &env("rev2"),
    );
    let before = h.events().len();
    let out = peer.mosquitto_pub(
        V::V311,
        Some(&rev),
        "a-rev",
        "meters/a-rev/readings",
        &env("rev2"),
    );
    assert!(
        !out.status.success(),
        "revoked certificate accepted:\n{}",
        show(&out)
    );
    assert_one_event(&h, before, "a revoked certificate", "certificate_revoked");
    expected.push("certificate_revoked");

    // 4. An expired certificate (Paho, MQTT 3.1.1).
    let exp = MeterFiles::new(&pki, "a-exp");
    sign(
        &exp.key,
        "a-exp",
        1,
        None,
        &reading_json("a-exp", "300.5"),
        &env("exp"),
    );
    let before = h.events().len();
    let (sent, report, out) = peer.paho(
        V::V311,
        Some(&exp),
        "a-exp",
        "meters/a-exp/readings",
        &env("exp"),
    );
    assert!(
        !sent && report["connack"].is_null(),
        "expired certificate accepted: {report}\n{}",
        show(&out)
    );
    assert_one_event(&h, before, "an expired certificate", "certificate_expired");
    expected.push("certificate_expired");

    // 5. a-ok's certificate with the ClientID of a connected fleet meter: CONNACK refused, and the
    //    genuine f000001 is not taken over (checked with the fleet's "lost" count at the end).
    sign(
        &ok.key,
        "a-ok",
        12,
        None,
        &reading_json("a-ok", "112.5"),
        &env("cid"),
    );
    let before = h.events().len();
    let out = peer.mosquitto_pub(
        V::V311,
        Some(&ok),
        "f000001",
        "meters/a-ok/readings",
        &env("cid"),
    );
    assert!(
        !out.status.success() && text(&out).contains("CONNACK (5)"),
        "another meter's ClientID not refused with CONNACK 5 (not authorised):\n{}",
        show(&out)
    );
    let ev = assert_one_event(&h, before, "another meter's ClientID", "client_id_mismatch");
    assert_eq!(ev.meter, "a-ok", "{ev:?}");
    expected.push("client_id_mismatch");

    // 6. A publish to another meter's topic (MQTT 5: PUBACK 0x87, then DISCONNECT).
    sign(
        &ok.key,
        "a-ok",
        13,
        Some("meters/f000001/readings"),
        &reading_json("a-ok", "113.5"),
        &env("topic"),
    );
    let before = h.events().len();
    let out = peer.mosquitto_pub(
        V::V5,
        Some(&ok),
        "a-ok",
        "meters/f000001/readings",
        &env("topic"),
    );
    assert!(
        !out.status.success() && text(&out).contains("RC:135"),
        "publish to another meter's topic not refused with PUBACK 135:\n{}",
        show(&out)
    );
    assert_one_event(&h, before, "another meter's topic", "topic_not_authorized");
    expected.push("topic_not_authorized");

    // 7. A subscription to everything.
    let before = h.events().len();
    let out = peer.mosquitto_sub(V::V311, &ok, "#");
    assert!(
        text(&out).contains("All subscription requests were denied"),
        "subscription to # not denied:\n{}",
        show(&out)
    );
    assert_one_event(
        &h,
        before,
        "a subscription to #",
        "subscribe_not_authorized",
    );
    expected.push("subscribe_not_authorized");

    // 8. A replay: counter 1 again, with other bytes (Paho, MQTT 5: PUBACK with a failure code).
    sign(
        &ok.key,
        "a-ok",
        1,
        None,
        &reading_json("a-ok", "150.5"),
        &env("replay"),
    );
    let before = h.events().len();
    let (sent, report, out) = peer.paho(
        V::V5,
        Some(&ok),
        "a-ok",
        "meters/a-ok/readings",
        &env("replay"),
    );
    assert!(
        !sent && report["puback"].as_u64().is_some_and(|c| c >= 0x80),
        "replay not refused with a PUBACK failure code: {report}\n{}",
        show(&out)
    );
    assert_one_event(&h, before, "a replay", "replay");
    expected.push("replay");

    // 9. A tampered byte: one digit of the energy value changed after signing (MQTT 3.1.1: the
    //    message is acknowledged and dropped).
    let mut bytes = sign(
        &ok.key,
        "a-ok",
        14,
        None,
        &reading_json("a-ok", "120.345"),
        &env("tamper"),
    );
    let at = bytes
        .windows(7)
        .position(|w| w == b"120.345")
        .expect("the value in the envelope");
    bytes[at + 1] = b'9';
    fs::write(env("tamper"), &bytes).expect("write the tampered envelope");
    let before = h.events().len();
    let out = peer.mosquitto_pub(
        V::V311,
        Some(&ok),
        "a-ok",
        "meters/a-ok/readings",
        &env("tamper"),
    );
    assert!(
        out.status.success(),
        "tampered publish: MQTT 3.1.1 acknowledges and drops\n{}",
        show(&out)
    );
    assert_one_event(&h, before, "a tampered byte", "bad_signature");
    expected.push("bad_signature");

    // 10. a-ok still works (Paho, MQTT 3.1.1).
    sign(
        &ok.key,
        "a-ok",
        15,
        None,
        &reading_json("a-ok", "130.5"),
        &env("ok2"),
    );
    let (sent, report, out) = peer.paho(
        V::V311,
        Some(&ok),
        "a-ok",
        "meters/a-ok/readings",
        &env("ok2"),
    );
    assert!(
        sent,
        "a-ok genuine after the attacks refused: {report}\n{}",
        show(&out)
    );

    // Nothing refused was stored; the genuine ones were.
    assert_eq!(
        h.stored_kwh("a-ok"),
        ["100.5", "130.5"],
        "a-ok's stored readings"
    );
    assert_eq!(h.stored_counters("a-ok"), [1, 15], "a-ok's stored counters");
    assert_eq!(h.stored_kwh("a-rev"), ["200.5"], "a-rev's stored readings");
    assert!(
        h.stored_kwh("a-exp").is_empty(),
        "the expired meter's reading was stored"
    );

    // The fleet kept reporting during the attacks, and lost nothing.
    fleet.assert_running();
    let fleet_during = fleet_stored(&h, FLEET);
    assert!(
        fleet_during > fleet_before + FLEET,
        "the fleet's readings stopped being stored during the attacks: {fleet_before} before, {fleet_during} after"
    );
    let summary = fleet.interrupt(Duration::from_secs(60));
    assert!(
        summary.readings > 0 && summary.events == 0,
        "{}",
        summary.text
    );
    assert_eq!(
        summary.refused, 0,
        "genuine fleet readings refused:\n{}",
        summary.text
    );
    assert_eq!(
        summary.unacked, 0,
        "fleet readings unacknowledged at the end:\n{}",
        summary.text
    );
    assert_eq!(
        summary.acked, summary.readings,
        "fleet readings not acknowledged:\n{}",
        summary.text
    );
    assert_eq!(
        summary.lost, 0,
        "an attack disturbed a fleet connection:\n{}",
        summary.text
    );
    assert_eq!(
        summary.connect_failures, 0,
        "fleet connections failed:\n{}",
        summary.text
    );
    assert_eq!(
        summary.connects, FLEET as u64,
        "fleet meters reconnected:\n{}",
        summary.text
    );
    let fleet_after = fleet_stored(&h, FLEET);
    assert_eq!(
        fleet_after as u64, summary.acked,
        "acknowledged fleet readings vs stored:\n{}",
        summary.text
    );

    // Exactly one security event per attack, none about the fleet.
    let events = h.events();
    assert_eq!(
        reasons(&events),
        expected,
        "all security events: {events:#?}"
    );
    assert!(
        events.iter().all(|e| !e.meter.starts_with('f')),
        "a security event names a fleet meter: {events:#?}"
    );
}
