//! Eavesdropping: reading the traffic between a meter and the head-end.
//!
//! 1. A recording TCP relay on the path (127.0.0.1:0 → the head-end, its upstream socket from a
//!    fresh source) carries a genuine meter's session as meters connect by default (TLS 1.3):
//!    a reading with a distinctive register (73519.25 kWh) is accepted and stored, and neither
//!    the meter id, nor the register in any text or binary form an XML or JSON document or a
//!    CBOR envelope would carry, nor the topic, nor any element name of the document appears in
//!    the bytes recorded in either direction.
//! 2. The same with a meter limited to TLS 1.2 (which the profile still allows): the reading,
//!    its register and topic stay hidden; TLS 1.2 sends certificates in the clear, so the meter
//!    id is visible in the handshake, and only there. The case reports it (a limit of TLS 1.2,
//!    not of the head-end's configuration).
//! 3. A plaintext MQTT CONNECT to the TLS port: no CONNACK, and the head-end records
//!    `tls_handshake_failed` for that source.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gridward_mqtt::client::{Client, ClientOptions, Protocol};
use gridward_pki::LeafKind;
use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, ProtocolVersion, RootCertStore};
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::mitm::{read_answer, records, refusal_from};
use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx, PubOutcome};

/// The scenario's name.
pub const NAME: &str = "eavesdropping";

/// How long the relay waits for a byte in one direction before it gives up on the session.
const IDLE: Duration = Duration::from_secs(5);

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let mut checks = Vec::new();
    const TLS13: &str = "a recording relay between meter and head-end (TLS 1.3, the default)";
    checks.push(
        relayed(ctx, TLS13, Version::Default)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, TLS13, e)),
    );
    const TLS12: &str = "a recording relay, the meter limited to TLS 1.2";
    checks.push(
        relayed(ctx, TLS12, Version::Tls12)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, TLS12, e)),
    );
    const PLAIN: &str = "a plaintext MQTT CONNECT to the TLS port";
    checks.push(
        plaintext_connect(ctx, PLAIN)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, PLAIN, e)),
    );
    checks
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// The Gridward client profile: TLS 1.3 preferred.
    Default,
    /// TLS 1.2 only.
    Tls12,
}

/// The bytes a relay recorded, each direction.
#[derive(Debug, Default)]
struct Capture {
    /// Meter → head-end.
    up: Vec<u8>,
    /// Head-end → meter.
    down: Vec<u8>,
}

/// Copies `from` to `to` until either ends (or [`IDLE`]), recording what passed.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(IDLE, from.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let data = buf.get(..n).unwrap_or_default();
                seen.extend_from_slice(data);
                if to.write_all(data).await.is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = to.shutdown().await;
    seen
}

/// A relay for one connection: accepts on `listener`, connects to the head-end from a fresh
/// source, and records both directions until the session ends.
async fn relay(ctx: &Ctx, listener: TcpListener) -> Result<Capture, String> {
    let (client, _) = tokio::time::timeout(IDLE, listener.accept())
        .await
        .map_err(|_| "the meter never reached the relay".to_owned())?
        .map_err(|e| format!("relay accept: {e}"))?;
    let _ = client.set_nodelay(true);
    let upstream = ctx
        .tcp_from(ctx.fresh_source(), ctx.target.mqtt)
        .await
        .map_err(|e| format!("relay upstream: {e}"))?;
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let (up, down) = tokio::join!(pump(cr, uw), pump(ur, cw));
    Ok(Capture { up, down })
}

/// A client configuration of meter `creds` (target's root and CRLs) allowing TLS 1.2 only,
/// with the Gridward suites.
fn tls12_config(ctx: &Ctx, creds: &Creds) -> Result<Arc<ClientConfig>, AttackError> {
    let m = ctx.pki().tls_material(LeafKind::Meter, &creds.id)?;
    let setup = |e: &dyn std::fmt::Display| AttackError::Setup(format!("TLS 1.2 client: {e}"));
    let mut roots = RootCertStore::empty();
    for root in &m.roots {
        roots.add(root.clone()).map_err(|e| setup(&e))?;
    }
    let provider = gridward_pki::tls::provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(m.crls.clone())
        .build()
        .map_err(|e| setup(&e))?;
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .map_err(|e| setup(&e))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(m.chain, m.key)
        .map_err(|e| setup(&e))?;
    Ok(Arc::new(config))
}

/// The meter's side: TLS through the relay (the real server name), CONNECT, one reading,
/// DISCONNECT. Returns the negotiated version and what happened to the reading.
async fn meter_session(
    relay: SocketAddr,
    server_name: &str,
    config: Arc<ClientConfig>,
    id: &str,
    topic: &str,
    envelope: Vec<u8>,
) -> Result<(Option<ProtocolVersion>, PubOutcome), String> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(relay)
        .await
        .map_err(|e| format!("connect to the relay: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS through the relay: {e}"))?;
    let version = tls.get_ref().1.protocol_version();
    let mut opts = ClientOptions::new(id);
    opts.protocol = Protocol::V5;
    let (mut client, _) = Client::handshake(tls, &opts)
        .await
        .map_err(|e| format!("CONNECT through the relay: {e}"))?;
    let outcome = Ctx::publish(&mut client, topic, envelope, 1).await;
    let _ = client.disconnect().await;
    Ok((version, outcome))
}

/// Every offset at which `needle` occurs in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() {
        return Vec::new();
    }
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// The content type of the TLS record holding byte `pos` of a recorded direction.
fn record_type_at(bytes: &[u8], pos: usize) -> Option<u8> {
    let mut start = 0usize;
    for (ct, payload) in records(bytes) {
        let end = start + 5 + payload.len();
        if pos < end {
            return (pos >= start + 5).then_some(ct);
        }
        start = end;
    }
    None
}

/// What must not be readable on the wire, as the bytes one would search for.
fn secrets(id: &str, topic: &str, kwh: f64) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    // The register as XML and JSON carry it, and in the other usual text forms.
    let text = [
        format!("{kwh}"),
        format!("{kwh:.3}"),
        format!("{kwh:e}"),
        format!("{kwh}").replace('.', ","),
        format!("{kwh}").replace('.', ""),
    ];
    for t in text {
        if !out.iter().any(|(_, b)| b == t.as_bytes()) {
            out.push((format!("register {t:?}"), t.into_bytes()));
        }
    }
    // As a binary double (CBOR, native) either way round.
    out.push(("register as f64 (BE)".into(), kwh.to_be_bytes().to_vec()));
    out.push(("register as f64 (LE)".into(), kwh.to_le_bytes().to_vec()));
    out.push((format!("topic {topic:?}"), topic.as_bytes().to_vec()));
    for tag in ["EnergyUsageReport", "EnergyConsumed", "MeterID"] {
        out.push((format!("element {tag}"), tag.as_bytes().to_vec()));
    }
    out.push((format!("meter id {id:?}"), id.as_bytes().to_vec()));
    out
}

async fn relayed(ctx: &Ctx, case: &str, version: Version) -> Result<Check, AttackError> {
    let (name, kwh) = match version {
        Version::Default => ("eavesdrop", 73519.25),
        Version::Tls12 => ("eavesdrop-tls12", 84620.75),
    };
    let creds = ctx.attack_meter(name)?;
    let config = match version {
        Version::Default => ctx.client_config(&creds)?,
        Version::Tls12 => tls12_config(ctx, &creds)?,
    };
    let topic = format!("meters/{}/readings", creds.id);
    // Strictly above any counter an earlier run against the same head-end used.
    let counter = u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let envelope = Ctx::genuine(&creds, counter, kwh)?;

    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| AttackError::Setup(format!("relay listener: {e}")))?;
    let relay_addr = listener
        .local_addr()
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let (capture, session) = tokio::join!(
        relay(ctx, listener),
        tokio::time::timeout(
            Duration::from_secs(10),
            meter_session(
                relay_addr,
                &ctx.target.server_name,
                config,
                &creds.id,
                &topic,
                envelope
            )
        ),
    );
    let capture = capture.map_err(AttackError::Setup)?;
    let (negotiated, outcome) = session
        .map_err(|_| AttackError::Setup("the relayed session timed out".to_owned()))?
        .map_err(AttackError::Setup)?;
    let stored = ctx.stored_kwh(&creds.id).contains(&kwh);
    let accepted = outcome == PubOutcome::Acked(0) && stored;
    let wanted = match version {
        Version::Default => Some(ProtocolVersion::TLSv1_3),
        Version::Tls12 => Some(ProtocolVersion::TLSv1_2),
    };

    // Search both directions for every secret.
    let mut found = Vec::new();
    let mut id_in_handshake_only = true;
    let mut id_hits = 0usize;
    for (label, needle) in secrets(&creds.id, &topic, kwh) {
        let is_id = label.starts_with("meter id");
        for (dir, bytes) in [("up", &capture.up), ("down", &capture.down)] {
            let hits = find_all(bytes, &needle);
            if hits.is_empty() {
                continue;
            }
            if is_id {
                id_hits += hits.len();
                id_in_handshake_only &= hits.iter().all(|&p| record_type_at(bytes, p) == Some(22));
            }
            found.push(format!("{label} {}× {dir}", hits.len()));
        }
    }
    let app_data = |b: &[u8]| records(b).iter().filter(|(ct, _)| *ct == 23).count();
    let traffic = format!(
        "{} B up / {} B down, {} / {} application-data records",
        capture.up.len(),
        capture.down.len(),
        app_data(&capture.up),
        app_data(&capture.down)
    );
    let relayed_all = app_data(&capture.up) > 0 && app_data(&capture.down) > 0;
    let base = format!(
        "{:?}; reading {outcome}, {}; {traffic}",
        negotiated,
        if stored { "stored" } else { "NOT stored" }
    );
    let check = match version {
        Version::Default => {
            let hidden = found.is_empty();
            Check::new(
                NAME,
                case,
                "accepted and stored; no meter id, register (text or binary), topic or XML \
                 element in the recorded bytes",
            )
            .observed(if hidden {
                format!("{base}; none of them in the recorded bytes")
            } else {
                format!("{base}; visible: {}", found.join(", "))
            })
            .pass(accepted && negotiated == wanted && relayed_all && hidden)
        }
        Version::Tls12 => {
            // Only the meter id may show, and only inside handshake records (its certificate).
            let others: Vec<&String> = found
                .iter()
                .filter(|f| !f.starts_with("meter id"))
                .collect();
            let hidden = others.is_empty() && id_in_handshake_only;
            let id_note = if id_hits == 0 {
                "meter id not visible".to_owned()
            } else if id_in_handshake_only {
                format!(
                    "meter id visible {id_hits}× in the clear handshake (its certificate): \
                     TLS 1.2 does not hide certificates"
                )
            } else {
                format!("meter id visible {id_hits}×, also outside the handshake")
            };
            Check::new(
                NAME,
                case,
                "accepted and stored; no register, topic or XML element in the recorded bytes \
                 (the meter id may show only in TLS 1.2's clear certificate)",
            )
            .observed(if others.is_empty() {
                format!("{base}; no register, topic or element; {id_note}")
            } else {
                format!(
                    "{base}; visible: {}; {id_note}",
                    others
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .pass(accepted && negotiated == wanted && relayed_all && hidden)
        }
    };
    Ok(check)
}

/// An MQTT 3.1.1 CONNECT for `client_id` (clean session, keep-alive 60 s).
fn mqtt_connect(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    // Remaining length (one byte is enough below 128).
    let mut out = vec![0x10, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

async fn plaintext_connect(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let creds = ctx.attack_meter("eavesdrop")?;
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let mut tcp = ctx
        .tcp_from(source, ctx.target.mqtt)
        .await
        .map_err(|e| AttackError::Setup(format!("connect from {source}: {e}")))?;
    tcp.write_all(&mqtt_connect(&creds.id))
        .await
        .map_err(|e| AttackError::Setup(format!("write: {e}")))?;
    let (answer, got) = read_answer(&mut tcp, false)
        .await
        .map_err(|e| AttackError::Setup(format!("read: {e}")))?;
    // A CONNACK starts with 0x20; a TLS record with its content type (21 for an alert).
    let connack = got.first() == Some(&0x20);
    let observed = if connack {
        format!("CONNACK in plaintext: {}", hex::encode(&got))
    } else {
        format!("no CONNACK; {answer}")
    };
    Ok(refusal_from(
        ctx,
        NAME,
        case,
        "tls_handshake_failed",
        source,
        before,
        !connack && answer.refusal(),
        observed,
    )
    .await)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn the_plaintext_connect_is_a_valid_mqtt_connect() {
        let c = mqtt_connect("x-eavesdrop");
        assert_eq!(c[0], 0x10);
        assert_eq!(usize::from(c[1]), c.len() - 2);
        assert_eq!(&c[4..8], b"MQTT");
        assert!(c.ends_with(b"x-eavesdrop"));
    }

    #[test]
    fn secrets_cover_the_text_and_binary_forms_of_the_register() {
        let s = secrets("x-e", "meters/x-e/readings", 73519.25);
        let has = |b: &[u8]| s.iter().any(|(_, n)| n == b);
        assert!(has(b"73519.25"));
        assert!(has(b"73519.250"));
        assert!(has(b"7351925"));
        assert!(has(&73519.25f64.to_be_bytes()));
        assert!(has(b"meters/x-e/readings"));
        assert!(has(b"x-e"));
        // What the document and the JSON downstream actually carry is among the needles.
        let xml = Ctx::reading_xml("x-e", 73519.25).unwrap();
        let json = serde_json::json!({ "EnergyConsumed": 73519.25 }).to_string();
        for doc in [xml.as_bytes(), json.as_bytes()] {
            assert!(
                s.iter()
                    .any(|(l, n)| l.starts_with("register") && !find_all(doc, n).is_empty()),
                "{}",
                String::from_utf8_lossy(doc)
            );
        }
        assert!(
            s.iter()
                .any(|(l, n)| l.starts_with("element") && !find_all(xml.as_bytes(), n).is_empty())
        );
    }

    #[test]
    fn positions_map_to_their_records() {
        let bytes = [22, 3, 3, 0, 2, 9, 9, 23, 3, 3, 0, 1, 7];
        assert_eq!(record_type_at(&bytes, 0), None); // a header
        assert_eq!(record_type_at(&bytes, 5), Some(22));
        assert_eq!(record_type_at(&bytes, 12), Some(23));
        assert_eq!(find_all(&bytes, &[3, 3]), vec![1, 8]);
    }
}
