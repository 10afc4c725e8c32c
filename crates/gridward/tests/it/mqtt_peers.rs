//! MQTT clients not written here — Mosquitto's `mosquitto_pub` / `mosquitto_sub` and Eclipse
//! Paho for Python, each under MQTT 3.1.1 and 5 — against a real `gridward serve`, with
//! certificates from `gridward pki` and envelopes from `gridward meter sign`.
//!
//! Genuine messages are stored. Every attack (foreign CA, no certificate, a certificate for
//! another purpose, revoked, expired and not yet valid certificates, another meter's ClientID or
//! topic, a subscription to `#`, a replay, a tampered byte) is made by every client in both
//! protocol versions ([`CLIENTS`] × [`attacks`]), and a meter is revoked while connected with
//! each client. Each run must be refused the way that client and version can see it
//! ([`Outcome`]), with exactly one security event of the attack's reason, and store nothing,
//! while a genuine fleet (`gridward meter run`) keeps getting readings stored undisturbed.

use std::fmt;
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

/// An MQTT client family not written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// `mosquitto_pub` / `mosquitto_sub` (libmosquitto, OpenSSL).
    Mosquitto,
    /// Eclipse Paho for Python (`py/mqtt_client.py`, Python's `ssl`).
    Paho,
}

/// MQTT protocol version of a client run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V {
    V311,
    V5,
}

/// Every client family in both protocol versions: each case runs with all of them.
const CLIENTS: [(Client, V); 4] = [
    (Client::Mosquitto, V::V311),
    (Client::Mosquitto, V::V5),
    (Client::Paho, V::V311),
    (Client::Paho, V::V5),
];

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mosquitto => "mosquitto",
            Self::Paho => "paho",
        })
    }
}

impl fmt::Display for V {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V311 => "311",
            Self::V5 => "5",
        })
    }
}

/// What a client does once connected.
#[derive(Debug, Clone)]
enum Op {
    /// Publish the file at QoS 1 to the topic.
    Publish { topic: String, payload: PathBuf },
    /// Subscribe to the filter.
    Subscribe(String),
}

/// What a client saw, in the same terms for both families (MQTT 5 reason codes throughout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// No CONNACK: the connection was refused before MQTT (TLS).
    NoConnack,
    /// A CONNACK with this failure code (a 3.1.1 return code translated: 5 → 0x87).
    ConnackRefused(u8),
    /// The publish or subscription acknowledged with success (a 3.1.1 PUBACK always is).
    Acked,
    /// A PUBACK with this failure code.
    PubackRefused(u8),
    /// A SUBACK with this failure code.
    SubackRefused(u8),
    /// Connected, then closed by the server without an acknowledgement.
    Closed,
}

/// The MQTT 5 reason code of an MQTT 3.1.1 CONNACK return code.
fn v5_connack(v311: u8) -> u8 {
    match v311 {
        1 => 0x84,
        2 => 0x85,
        3 => 0x88,
        4 => 0x86,
        5 => 0x87,
        other => other,
    }
}

/// The number at the start of `s`.
fn leading_number(s: &str) -> Option<u8> {
    s.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// The number right after the first `needle` in `t`.
fn number_after(t: &str, needle: &str) -> Option<u8> {
    leading_number(&t[t.find(needle)? + needle.len()..])
}

/// Reads the outcome from the debug output (`-d`) of `mosquitto_pub` / `mosquitto_sub`.
fn mosquitto_outcome(t: &str, v: V, op: &Op) -> Outcome {
    let Some(connack) = number_after(t, "received CONNACK (") else {
        return Outcome::NoConnack;
    };
    if connack != 0 {
        return Outcome::ConnackRefused(if v == V::V311 {
            v5_connack(connack)
        } else {
            connack
        });
    }
    let ack = match op {
        // "Client a-ok received PUBACK (Mid: 1, RC:135)"; RC:0 under 3.1.1.
        Op::Publish { .. } => t
            .find("received PUBACK")
            .map(|at| number_after(&t[at..], "RC:").unwrap_or(0))
            .map(|rc| (rc, Outcome::PubackRefused(rc))),
        // "Subscribed (mid: 1): 128"
        Op::Subscribe(_) => t
            .find("Subscribed (mid: ")
            .and_then(|at| number_after(&t[at..], "): "))
            .map(|rc| (rc, Outcome::SubackRefused(rc))),
    };
    match ack {
        None => Outcome::Closed,
        Some((rc, _)) if rc < 0x80 => Outcome::Acked,
        Some((_, refused)) => refused,
    }
}

/// Reads the outcome from the Paho script's JSON report.
fn paho_outcome(report: &serde_json::Value, op: &Op) -> Outcome {
    let code = |v: &serde_json::Value| v.as_u64().and_then(|c| u8::try_from(c).ok());
    match code(&report["connack"]) {
        None => return Outcome::NoConnack,
        Some(0) => {}
        Some(c) => return Outcome::ConnackRefused(c),
    }
    let ack = match op {
        Op::Publish { .. } => code(&report["puback"]).map(|rc| (rc, Outcome::PubackRefused(rc))),
        Op::Subscribe(_) => report["suback"]
            .get(0)
            .and_then(code)
            .map(|rc| (rc, Outcome::SubackRefused(rc))),
    };
    match ack {
        None => Outcome::Closed,
        Some((rc, _)) if rc < 0x80 => Outcome::Acked,
        Some((_, refused)) => refused,
    }
}

/// How external clients reach the head-end: its port and CA.
struct Peer<'a> {
    h: &'a Headend,
    cafile: String,
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

    /// The command line of `client` doing `op` as `client_id` with `creds` (none: no client
    /// certificate). With `hold`, a subscriber stays connected until the server closes the
    /// connection (at most 60 s).
    fn command(
        &self,
        (client, v): (Client, V),
        creds: Option<&MeterFiles>,
        client_id: &str,
        op: &Op,
        hold: bool,
    ) -> Command {
        let port = self.h.port.to_string();
        let mut c;
        match client {
            Client::Mosquitto => {
                let program = match op {
                    Op::Publish { .. } => "mosquitto_pub",
                    Op::Subscribe(_) => "mosquitto_sub",
                };
                c = Command::new(program);
                c.args(["-h", "127.0.0.1", "-p", &port, "--cafile", &self.cafile]);
                c.args(["-i", client_id, "-d"]);
                c.args(["-V", if v == V::V5 { "mqttv5" } else { "mqttv311" }]);
                if let Some(m) = creds {
                    c.args(["--cert", &m.chain, "--key", &m.key]);
                }
                match op {
                    Op::Publish { topic, payload } => {
                        c.args(["-t", topic, "-q", "1", "-f"]).arg(payload);
                    }
                    Op::Subscribe(filter) if hold => {
                        c.args(["-t", filter, "-W", "60"]);
                    }
                    // Waits at most 2 s for a message after the SUBACK.
                    Op::Subscribe(filter) => {
                        c.args(["-t", filter, "-C", "1", "-W", "2"]);
                    }
                }
            }
            Client::Paho => {
                c = Command::new("python3");
                c.arg(paho_script());
                c.args(["--port", &port, "--cafile", &self.cafile]);
                c.args(["--client-id", client_id, "--mqtt"]);
                c.arg(if v == V::V5 { "5" } else { "3.1.1" });
                if let Some(m) = creds {
                    c.args(["--cert", &m.chain, "--key", &m.key]);
                }
                match op {
                    Op::Publish { topic, payload } => {
                        c.args(["--topic", topic, "--file"]).arg(payload);
                    }
                    Op::Subscribe(filter) => {
                        c.args(["--topic", filter, "--subscribe"]);
                    }
                }
                if hold {
                    c.args(["--hold", "60"]);
                }
            }
        }
        c
    }

    /// Runs `client` doing `op`; returns what it saw and its output for failure messages.
    fn run(
        &self,
        client: (Client, V),
        creds: Option<&MeterFiles>,
        client_id: &str,
        op: &Op,
    ) -> (Outcome, String) {
        let mut c = self.command(client, creds, client_id, op, false);
        match client.0 {
            Client::Mosquitto => {
                let out = run_with_timeout(&mut c, CLIENT_TIMEOUT, MOSQUITTO_HINT);
                (mosquitto_outcome(&text(&out), client.1, op), show(&out))
            }
            Client::Paho => {
                let out = run_with_timeout(&mut c, CLIENT_TIMEOUT, PAHO_HINT);
                let report = paho_report(&out);
                (paho_outcome(&report, op), show(&out))
            }
        }
    }
}

/// The Paho script's JSON report; fails the test with the install hint if Paho is missing.
fn paho_report(out: &Output) -> serde_json::Value {
    assert_ne!(out.status.code(), Some(3), "{PAHO_HINT}\n{}", show(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the Paho client printed no JSON report ({e}); {PAHO_HINT}\n{}",
            show(out)
        )
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `client` doing `op` and requires `expected`.
fn assert_outcome(
    peer: &Peer<'_>,
    client: (Client, V),
    creds: Option<&MeterFiles>,
    client_id: &str,
    op: &Op,
    expected: Outcome,
    what: &str,
) {
    let (seen, transcript) = peer.run(client, creds, client_id, op);
    assert_eq!(
        seen, expected,
        "{what} ({} MQTT {}): the client saw {seen:?}, expected {expected:?}\n{transcript}",
        client.0, client.1
    );
}

fn assert_one_event(h: &Headend, before: usize, what: &str, reason: &str) -> EventRow {
    let new = h.new_events(before, what);
    assert_eq!(reasons(&new), [reason], "{what}: security events {new:#?}");
    new.into_iter().next().expect("one event")
}

/// `client` publishes meter `m`'s first reading (counter 1, `kwh`), signed by `gridward meter
/// sign` into `work`; it must be acknowledged and be the meter's only stored reading.
fn publish_one_reading(
    peer: &Peer<'_>,
    client: (Client, V),
    m: &MeterFiles,
    kwh: &str,
    work: &Path,
    what: &str,
) {
    let id = &m.id;
    let payload = work.join(format!("{id}.cose"));
    sign(&m.key, id, 1, None, &reading_json(id, kwh), &payload);
    let topic = format!("meters/{id}/readings");
    let publish = Op::Publish { topic, payload };
    assert_outcome(peer, client, Some(m), id, &publish, Outcome::Acked, what);
    assert_eq!(peer.h.stored_kwh(id), [kwh], "{id}: stored documents");
    assert_eq!(peer.h.stored_counters(id), [1], "{id}: stored counters");
}

#[test]
fn genuine_envelopes_from_mosquitto_and_paho_are_stored() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    let id = |(client, v): (Client, V)| format!("g-{client}-{v}");
    for client in CLIENTS {
        issue_meter(&pki, &id(client));
    }
    let h = Headend::start(tmp.path(), &pki, &[]);
    let peer = Peer::new(&h, &pki);

    for (i, client) in CLIENTS.into_iter().enumerate() {
        let id = id(client);
        let m = MeterFiles::new(&pki, &id);
        let kwh = format!("{}.25", 1000 + i);
        publish_one_reading(&peer, client, &m, &kwh, tmp.path(), "a genuine reading");
        // Subscribing to its own command topic is allowed (the positive control of the `#` case).
        let own = Op::Subscribe(format!("meters/{id}/commands"));
        assert_outcome(
            &peer,
            client,
            Some(&m),
            &id,
            &own,
            Outcome::Acked,
            "its own commands",
        );
    }

    let events = h.events();
    assert!(
        events.is_empty(),
        "genuine clients caused security events: {events:#?}"
    );
}

/// Issue 17: `gridward pki issue meter --alg ed25519` wrote key.pem as PKCS#8 version 2, which
/// OpenSSL 3.0 (`openssl pkey`: "unsupported"), Python's `ssl` (and so Paho) and
/// pyca/cryptography refused, so the README's `mosquitto_pub --key` recipe failed for Ed25519
/// meters. Every one of them now reads the key, and each client's EdDSA envelope is stored.
#[test]
fn ed25519_meter_keys_work_with_openssl_cryptography_mosquitto_and_paho() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    let id = |(client, v): (Client, V)| format!("ed-{client}-{v}");
    let pki_s = pki.to_str().expect("utf-8");
    for client in CLIENTS {
        gridward_ok(&[
            "pki",
            "issue",
            "meter",
            "--dir",
            pki_s,
            "--id",
            &id(client),
            "--alg",
            "ed25519",
        ]);
    }
    let first = MeterFiles::new(&pki, &id(CLIENTS[0]));

    // OpenSSL reads the key, and it is the certificate's.
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl (Debian: openssl)");
        assert!(out.status.success(), "openssl {args:?}:\n{}", show(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = openssl(&["pkey", "-in", &first.key, "-noout", "-text"]);
    assert!(text.contains("ED25519 Private-Key"), "{text}");
    let from_key = openssl(&["pkey", "-in", &first.key, "-pubout"]);
    // The chain's first certificate is the meter's.
    let from_cert = openssl(&["x509", "-in", &first.chain, "-noout", "-pubkey"]);
    assert_eq!(from_key, from_cert, "key.pem is not the certificate's key");

    // pyca/cryptography and Python's ssl (what Paho uses) load it.
    let script = "import sys, ssl\n\
        from cryptography.hazmat.primitives.serialization import load_pem_private_key\n\
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey\n\
        k = load_pem_private_key(open(sys.argv[2], 'rb').read(), None)\n\
        assert isinstance(k, Ed25519PrivateKey), type(k)\n\
        ssl.create_default_context().load_cert_chain(sys.argv[1], sys.argv[2])\n\
        print('ok')\n";
    let out = Command::new("python3")
        .args(["-c", script, &first.chain, &first.key])
        .output()
        .expect("run python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "Python refused the Ed25519 key ({PAHO_HINT}):\n{}",
        show(&out)
    );

    // mosquitto_pub (the README's recipe) and Paho, MQTT 3.1.1 and 5, publish EdDSA envelopes.
    let h = Headend::start(tmp.path(), &pki, &[]);
    let peer = Peer::new(&h, &pki);
    for (i, client) in CLIENTS.into_iter().enumerate() {
        let m = MeterFiles::new(&pki, &id(client));
        let kwh = format!("{}.5", 2000 + i);
        publish_one_reading(&peer, client, &m, &kwh, tmp.path(), "an EdDSA reading");
    }
    let events = h.events();
    assert!(
        events.is_empty(),
        "Ed25519 meters caused security events: {events:#?}"
    );
}

/// Issues meter `id` valid for one day from `days` days from now (negative: in the past),
/// through the library with an injected `now`: the CLI only issues from the present.
fn issue_meter_at(pki: &Path, id: &str, days: i64) {
    let p = Pki::open(pki, None).expect("open the PKI");
    let mut opts = IssueOptions::new("mqtt-peers-test");
    opts.validity_days = Some(1);
    let then = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    p.issue_meter(&MeterId::new(id).expect("meter id"), &opts, then)
        .expect("issue a meter certificate at another time");
}

/// The fleet's meters are `f000001..`; this one is the victim of impersonation attempts.
const VICTIM: &str = "f000001";

/// The sum of the fleet meters' last stored counters: grows while the fleet's readings are
/// stored (one `gridward meters` call, cheap enough to take around every case).
fn fleet_progress(h: &Headend) -> u64 {
    h.last_counters()
        .iter()
        .filter(|(m, _)| m.starts_with('f'))
        .map(|(_, c)| c)
        .sum()
}

/// The readings stored for the fleet's meters `f000001..=f{n}`.
fn fleet_stored(h: &Headend, n: usize) -> usize {
    (1..=n)
        .map(|i| h.stored_counters(&format!("f{i:06}")).len())
        .sum()
}

/// The message an attack publishes: a reading of `signer`'s meter, signed with its key.
struct Message<'a> {
    signer: &'a MeterFiles,
    /// Published to.
    topic: String,
    /// The topic the envelope is bound to, when not `topic`.
    bound_to: Option<String>,
    /// A counter already used (a replay); otherwise a fresh one.
    counter: Option<u64>,
    /// One digit of the signed energy value changed after signing.
    tamper: bool,
}

impl<'a> Message<'a> {
    /// A fresh, genuine-looking reading of `signer` to its own readings topic.
    fn of(signer: &'a MeterFiles) -> Self {
        Self {
            signer,
            topic: format!("meters/{}/readings", signer.id),
            bound_to: None,
            counter: None,
            tamper: false,
        }
    }
}

/// What an attack does once connected.
enum Action<'a> {
    Publish(Message<'a>),
    Subscribe(&'static str),
}

/// One attack, run by every client of [`CLIENTS`].
struct Attack<'a> {
    name: &'static str,
    /// The certificate and key presented (`None`: no client certificate).
    creds: Option<&'a MeterFiles>,
    /// The MQTT ClientID.
    client_id: &'a str,
    action: Action<'a>,
    /// What the client sees under MQTT 3.1.1 and MQTT 5.
    expect: [Outcome; 2],
    /// The reason code of the one security event.
    reason: &'static str,
    /// The meter the event names (`-`: the TLS handshake failed, nothing was proven).
    event_meter: &'a str,
}

/// The credentials an attack can present.
struct Creds {
    /// A genuine meter.
    ok: MeterFiles,
    /// A meter of the same name from a foreign CA with the same CA names.
    forged: MeterFiles,
    /// Meters whose certificates are revoked, expired, not valid yet.
    revoked: MeterFiles,
    expired: MeterFiles,
    not_yet_valid: MeterFiles,
    /// The head-end's own server certificate (EKU serverAuth only).
    server: MeterFiles,
}

/// The attacks.
fn attacks<'a>(c: &'a Creds) -> Vec<Attack<'a>> {
    let ok = &c.ok;
    use Outcome::{Acked, Closed, ConnackRefused, NoConnack, PubackRefused, SubackRefused};
    // Refused in the TLS handshake: `creds` presented, a message of `signer` as its ClientID.
    let tls_refused =
        |name, creds: Option<&'a MeterFiles>, signer: &'a MeterFiles, reason| Attack {
            name,
            creds,
            client_id: &signer.id,
            action: Action::Publish(Message::of(signer)),
            expect: [NoConnack, NoConnack],
            reason,
            event_meter: "-",
        };
    let by_ok = |name, action, expect, reason| Attack {
        name,
        creds: Some(ok),
        client_id: &ok.id,
        action,
        expect,
        reason,
        event_meter: &ok.id,
    };
    vec![
        // Same CA names as ours: the chain names our issuing CA, its signature does not verify.
        tls_refused(
            "a certificate from a foreign CA",
            Some(&c.forged),
            &c.forged,
            "certificate_untrusted",
        ),
        // A genuine, captured envelope of `ok`, without a client certificate (or with a
        // certificate of ours made for another purpose).
        tls_refused("no client certificate", None, ok, "certificate_missing"),
        tls_refused(
            "the server's certificate as a client's",
            Some(&c.server),
            ok,
            "certificate_wrong_purpose",
        ),
        tls_refused(
            "a revoked certificate",
            Some(&c.revoked),
            &c.revoked,
            "certificate_revoked",
        ),
        tls_refused(
            "an expired certificate",
            Some(&c.expired),
            &c.expired,
            "certificate_expired",
        ),
        tls_refused(
            "a certificate not valid yet",
            Some(&c.not_yet_valid),
            &c.not_yet_valid,
            "certificate_not_yet_valid",
        ),
        // The genuine VICTIM must not be taken over (the fleet's "lost" count at the end).
        Attack {
            client_id: VICTIM,
            ..by_ok(
                "another meter's ClientID",
                Action::Publish(Message::of(ok)),
                [ConnackRefused(0x87), ConnackRefused(0x87)],
                "client_id_mismatch",
            )
        },
        // An envelope bound to the victim's topic: only the ACL refuses it. 3.1.1 has no
        // refusing PUBACK: the connection is closed; MQTT 5: PUBACK 0x87, then DISCONNECT.
        by_ok(
            "a publish to another meter's topic",
            Action::Publish(Message {
                topic: format!("meters/{VICTIM}/readings"),
                bound_to: Some(format!("meters/{VICTIM}/readings")),
                ..Message::of(ok)
            }),
            [Closed, PubackRefused(0x87)],
            "topic_not_authorized",
        ),
        by_ok(
            "a subscription to #",
            Action::Subscribe("#"),
            [SubackRefused(0x80), SubackRefused(0x87)],
            "subscribe_not_authorized",
        ),
        // Counter 1 again, with other bytes. 3.1.1: acknowledged and dropped.
        by_ok(
            "a replay",
            Action::Publish(Message {
                counter: Some(1),
                ..Message::of(ok)
            }),
            [Acked, PubackRefused(0x83)],
            "replay",
        ),
        by_ok(
            "a tampered byte",
            Action::Publish(Message {
                tamper: true,
                ..Message::of(ok)
            }),
            [Acked, PubackRefused(0x87)],
            "bad_signature",
        ),
    ]
}

/// Signs `m` as `file` with register value `kwh` and counter `fresh` unless it replays one;
/// applies its tampering. Returns the meters under which `kwh` must never be stored.
fn write_message(m: &Message<'_>, kwh: &str, fresh: u64, file: &Path) -> Vec<String> {
    let id = &m.signer.id;
    let mut bytes = sign(
        &m.signer.key,
        id,
        m.counter.unwrap_or(fresh),
        m.bound_to.as_deref(),
        &reading_json(id, kwh),
        file,
    );
    if m.tamper {
        let at = bytes
            .windows(kwh.len())
            .position(|w| w == kwh.as_bytes())
            .expect("the value in the envelope");
        bytes[at + 1] = if bytes[at + 1] == b'9' { b'8' } else { b'9' };
        fs::write(file, &bytes).expect("write the tampered envelope");
    }
    let topic_meter = m.topic.split('/').nth(1).expect("meters/{id}/...");
    let mut meters = vec![id.clone(), topic_meter.to_owned()];
    meters.dedup();
    meters
}

/// A client's stdout and stderr files, for failure messages.
fn transcript(out: &Path, err: &Path) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        fs::read_to_string(out).unwrap_or_default(),
        fs::read_to_string(err).unwrap_or_default()
    )
}

/// A subscriber left connected (`--hold`) until the server closes its connection.
struct Held {
    child: ChildGuard,
    client: Client,
    out: PathBuf,
    err: PathBuf,
}

impl Held {
    fn start(peer: &Peer<'_>, client: (Client, V), m: &MeterFiles, work: &Path) -> Self {
        let own = Op::Subscribe(format!("meters/{}/commands", m.id));
        let out = work.join(format!("{}-held.out", m.id));
        let err = work.join(format!("{}-held.err", m.id));
        let hint = match client.0 {
            Client::Mosquitto => MOSQUITTO_HINT,
            Client::Paho => PAHO_HINT,
        };
        let child = peer
            .command(client, Some(m), &m.id, &own, true)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("create the log"))
            .stderr(File::create(&err).expect("create the log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({e}): {hint}", client.0));
        Self {
            child: ChildGuard(child),
            client: client.0,
            out,
            err,
        }
    }

    fn transcript(&self) -> String {
        transcript(&self.out, &self.err)
    }

    /// Waits until the client has exited because the server closed its connection.
    fn wait_closed(mut self, h: &Headend) {
        wait_for(
            Duration::from_secs(10),
            "the revoked meter's open connection to be closed",
            || self.child.0.try_wait().expect("poll the client"),
            || {
                format!(
                    "{}\nserver log:\n{}",
                    transcript(&self.out, &self.err),
                    h.log()
                )
            },
        );
        if self.client == Client::Paho {
            let report: serde_json::Value =
                serde_json::from_str(fs::read_to_string(&self.out).unwrap_or_default().trim())
                    .unwrap_or_else(|e| panic!("no Paho report ({e}):\n{}", self.transcript()));
            assert!(
                report["suback"][0].as_u64().is_some_and(|c| c < 0x80)
                    && !report["disconnected"].is_null(),
                "Paho was not subscribed and then disconnected by the server: {report}"
            );
        }
    }
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
    // a-rev-mosquitto / a-rev-paho: revoked while connected with that client. mosquitto_sub
    // under MQTT 5, where the head-end closes with DISCONNECT 0x98 and it exits: under 3.1.1
    // the connection just ends and it reconnects once (a second, TLS-level refusal).
    let live_revoked = [(Client::Mosquitto, V::V5), (Client::Paho, V::V311)]
        .map(|client| (client, format!("a-rev-{}", client.0)));
    issue_meter(&pki, "a-ok");
    for (_, id) in &live_revoked {
        issue_meter(&pki, id);
    }
    issue_meter_at(&pki, "a-exp", -10);
    issue_meter_at(&pki, "a-nyv", 10);
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
            "600",
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

    let server = pki.join("servers/localhost");
    let creds = Creds {
        ok: MeterFiles::new(&pki, "a-ok"),
        forged: MeterFiles::new(&foreign, "a-ok"),
        revoked: MeterFiles::new(&pki, &live_revoked[0].1),
        expired: MeterFiles::new(&pki, "a-exp"),
        not_yet_valid: MeterFiles::new(&pki, "a-nyv"),
        server: MeterFiles {
            id: "localhost".into(),
            chain: server.join("chain.pem").to_str().expect("utf-8").to_owned(),
            key: server.join("key.pem").to_str().expect("utf-8").to_owned(),
        },
    };
    let ok = &creds.ok;
    let file = |name: &str| work.join(format!("{name}.cose"));
    let mut expected: Vec<&str> = Vec::new();
    let publish = |m: &Message<'_>, file: PathBuf| Op::Publish {
        topic: m.topic.clone(),
        payload: file,
    };
    // A genuine reading of `m` with `counter` and `kwh`, published by `client`, acknowledged.
    let genuine = |client, m: &MeterFiles, counter: u64, kwh: &str| {
        let f = file(&format!("{}-{counter}", m.id));
        sign(&m.key, &m.id, counter, None, &reading_json(&m.id, kwh), &f);
        let op = publish(&Message::of(m), f);
        let what = format!("{} genuine, counter {counter}", m.id);
        assert_outcome(&peer, client, Some(m), &m.id, &op, Outcome::Acked, &what);
    };

    // Baseline: a genuine reading of a-ok, counter 1, is stored.
    genuine(CLIENTS[0], ok, 1, "100.5");
    assert_eq!(h.stored_kwh("a-ok"), ["100.5"]);

    // A meter revoked while connected, with each client: it works (a genuine reading stored),
    // holds a subscription, is revoked, the head-end reloads on SIGHUP: the open connection is
    // closed with one `certificate_revoked` event naming the meter.
    let mut genuine_of_revoked = Vec::new();
    for (i, (client, id)) in live_revoked.iter().enumerate() {
        let m = MeterFiles::new(&pki, id);
        let kwh = format!("{}.5", 200 + i);
        genuine(*client, &m, 1, &kwh);
        assert_eq!(h.stored_kwh(id), [kwh.as_str()], "{id}: stored readings");
        genuine_of_revoked.push((id.clone(), kwh));
        let held = Held::start(&peer, *client, &m, work);
        wait_for(
            Duration::from_secs(15),
            &format!("{id} to be connected (gridward meters)"),
            || h.is_connected(id).then_some(()),
            || held.transcript(),
        );
        let pki_s = pki.to_str().expect("utf-8");
        gridward_ok(&[
            "pki",
            "revoke",
            "--dir",
            pki_s,
            "--id",
            id,
            "--reason",
            "keyCompromise",
        ]);
        let before = h.events().len();
        h.reload();
        held.wait_closed(&h);
        let what = format!("{id} revoked while connected ({client:?})");
        let ev = assert_one_event(&h, before, &what, "certificate_revoked");
        assert_eq!(&ev.meter, id, "{what}: {ev:?}");
        expected.push("certificate_revoked");
    }

    // The matrix: every attack with every client and protocol version.
    let mut runs = 0u64;
    for attack in attacks(&creds) {
        let progress = fleet_progress(&h);
        for client in CLIENTS {
            runs += 1;
            let what = format!("{} ({} MQTT {})", attack.name, client.0, client.1);
            // A value no genuine reading has, and a counter no genuine reading of a-ok uses.
            let kwh = format!("{}.345", 900_000 + runs);
            let (op, not_under) = match &attack.action {
                Action::Publish(m) => {
                    let f = file(&format!("run{runs}"));
                    let meters = write_message(m, &kwh, 100 + runs, &f);
                    (publish(m, f), meters)
                }
                Action::Subscribe(filter) => (Op::Subscribe((*filter).to_owned()), Vec::new()),
            };
            let expect = attack.expect[usize::from(client.1 == V::V5)];
            let before = h.events().len();
            assert_outcome(
                &peer,
                client,
                attack.creds,
                attack.client_id,
                &op,
                expect,
                &what,
            );
            let ev = assert_one_event(&h, before, &what, attack.reason);
            assert_eq!(ev.meter, attack.event_meter, "{what}: {ev:?}");
            expected.push(attack.reason);
            for meter in not_under {
                assert!(
                    !h.stored_kwh(&meter).contains(&kwh),
                    "{what}: the refused reading {kwh} was stored under {meter}"
                );
            }
        }
        let now = fleet_progress(&h);
        assert!(
            now > progress,
            "{}: the fleet's readings stopped being stored ({progress} before, {now} after)",
            attack.name
        );
    }

    // a-ok still works.
    genuine(CLIENTS[3], ok, 1000, "130.5");

    // Nothing refused was stored; the genuine ones were.
    assert_eq!(
        h.stored_kwh("a-ok"),
        ["100.5", "130.5"],
        "a-ok's stored readings"
    );
    assert_eq!(
        h.stored_counters("a-ok"),
        [1, 1000],
        "a-ok's stored counters"
    );
    for (id, kwh) in &genuine_of_revoked {
        assert_eq!(h.stored_kwh(id), [kwh.as_str()], "{id}'s stored readings");
    }
    for id in ["a-exp", "a-nyv"] {
        assert!(h.stored_kwh(id).is_empty(), "{id}: a reading was stored");
    }

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

    // Exactly one security event per attack run, none about the fleet.
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
