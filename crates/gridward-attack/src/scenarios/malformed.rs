//! Malformed input: garbage, truncated and oversized frames, hostile XML.
//!
//! Each case comes from a fresh source; those inside a TLS session use an attack meter of their
//! own (`x-mal-…`), so each event is told apart by its meter or source. The genuine fleet keeps
//! sending throughout (the run's final fleet check covers it).
//!
//! 1. Random bytes on the TLS port, before any TLS: `tls_handshake_failed`, connection closed.
//!    (The first byte is kept off the five TLS record types, so the bytes never look like the
//!    start of a record the server would wait to complete.)
//! 2. Random bytes instead of CONNECT, inside an established mutual-TLS session: a frame with a
//!    short, well-formed length and a random type and body, so the decoder (not the framer)
//!    must refuse it: `malformed_packet`, closed.
//! 3. A truncated CONNECT (its first half), then silence: the framer waits for the announced
//!    bytes and the connect deadline ends it: `timeout` (10 s by default, so this case runs
//!    alongside the others).
//! 4. A truncated PUBLISH (its first half) after a good CONNECT with a 1 s keep-alive, then
//!    silence: a partial frame is no packet, so the keep-alive expires: `timeout`, DISCONNECT
//!    0x8D after 1.5 s.
//! 5. A complete PUBLISH frame whose remaining length ends inside its topic: `malformed_packet`,
//!    DISCONNECT 0x81.
//! 6. A PUBLISH whose topic is not UTF-8, MQTT 5 and 3.1.1: `malformed_packet`.
//! 7. A fixed header announcing the largest remaining length (0xff 0xff 0xff 0x7f, 256 MiB)
//!    and no body: `packet_too_large` at once, before any byte of body was sent (so nothing was
//!    waited for or buffered), memory stable.
//! 8. An over-long, 5-byte remaining length: `malformed_packet`.
//! 9. An XML reading with a DTD declaring nested entities ("billion laughs"), signed by the
//!    meter: `invalid_document` because DTDs are refused outright (the event says so), fast,
//!    nothing stored.
//! 10. An XML reading with an external entity (XXE, `SYSTEM "file:///etc/passwd"`):
//!     `invalid_document`, nothing stored.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gridward_mqtt::client::{Client, ClientOptions, Packet, Protocol, QoS};
use gridward_mqtt::codec;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dos::{about, from_source, remaining_length, wait_events};
use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx};

/// The scenario's name.
pub const NAME: &str = "malformed";

/// The head-end's default connect timeout (TCP accept to complete CONNECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much later than a deadline of the head-end's a connection may be closed and still pass.
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// How long a case waits for the head-end's answer to a frame it must refuse at once.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// The keep-alive the truncated-PUBLISH case asks for (the head-end allows 1.5 × it of silence).
const SHORT_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A huge remaining length must be refused within this (it is refused on its 5 header bytes).
const HUGE_ANSWER: Duration = Duration::from_secs(1);
/// Largest growth of resident memory allowed across the huge-remaining-length case: far below
/// the 256 MiB announced. In-process the figure includes the harness and the fleet, so it
/// allows for their noise.
const HUGE_RSS_GROWTH: u64 = 16 << 20;
/// A hostile XML document must be refused within this.
const XML_ANSWER: Duration = Duration::from_secs(1);

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    // The truncated CONNECT waits for the connect timeout: it runs alongside the other cases.
    let (slow, mut checks) = tokio::join!(truncated_connect(ctx), quick_cases(ctx));
    checks.insert(2.min(checks.len()), slow);
    checks
}

async fn quick_cases(ctx: &Ctx) -> Vec<Check> {
    const RANDOM_TLS: &str = "random bytes on the TLS port, before TLS";
    const RANDOM_MQTT: &str = "random bytes instead of CONNECT, inside mutual TLS";
    const TRUNC_PUB: &str = "a truncated PUBLISH, then silence (keep-alive 1 s)";
    const CUT_PUB: &str = "a PUBLISH whose remaining length ends inside its topic";
    const UTF8_5: &str = "a PUBLISH with a topic that is not UTF-8 (MQTT 5)";
    const UTF8_4: &str = "a PUBLISH with a topic that is not UTF-8 (MQTT 3.1.1)";
    const HUGE: &str = "a remaining length of 256 MiB (0xff 0xff 0xff 0x7f), no body";
    const VARINT: &str = "an over-long remaining length (5 bytes)";
    const LAUGHS: &str = "signed XML with entity expansion (billion laughs)";
    const XXE: &str = "signed XML with an external entity (XXE)";
    let mut checks = Vec::new();
    checks.push(
        random_before_tls(ctx, RANDOM_TLS)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, RANDOM_TLS, e)),
    );
    checks.push(
        random_instead_of_connect(ctx, RANDOM_MQTT)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, RANDOM_MQTT, e)),
    );
    checks.push(
        truncated_publish(ctx, TRUNC_PUB)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, TRUNC_PUB, e)),
    );
    // Topic length 32, then only 3 bytes of topic: the frame is complete, its content is not.
    let cut = [0x30, 0x05, 0x00, 0x20, b'm', b'e', b't'];
    checks.push(
        bad_frame(ctx, CUT_PUB, "mal-cut", Protocol::V5, &cut)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, CUT_PUB, e)),
    );
    for (case, name, protocol) in [
        (UTF8_5, "mal-utf8", Protocol::V5),
        (UTF8_4, "mal-utf8-v4", Protocol::V311),
    ] {
        let frame = publish_with_raw_topic(
            protocol,
            format!("meters/x-{name}/").as_bytes(),
            b"\xff\xfe/readings",
        );
        checks.push(
            bad_frame(ctx, case, name, protocol, &frame)
                .await
                .unwrap_or_else(|e| Check::broken(NAME, case, e)),
        );
    }
    checks.push(
        huge_remaining_length(ctx, HUGE)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, HUGE, e)),
    );
    let varint = [0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
    checks.push(
        bad_frame(ctx, VARINT, "mal-varint", Protocol::V5, &varint)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, VARINT, e)),
    );
    match hostile_xml(ctx, LAUGHS, XXE).await {
        Ok(mut c) => checks.append(&mut c),
        Err(e) => checks.push(Check::broken(NAME, "hostile XML", e)),
    }
    checks
}

/// What the head-end answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// CONNACK with this code.
    ConnAck(u8),
    /// DISCONNECT with this reason code.
    Disconnect(u8),
    /// Closed the connection without a word.
    Closed,
    /// Nothing within the wait.
    Silent,
}

impl Answer {
    /// The head-end refused: closed, DISCONNECT, or a failed CONNACK.
    fn refused(self) -> bool {
        !matches!(self, Self::Silent | Self::ConnAck(0))
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ConnAck(c) => write!(f, "CONNACK {c:#04x}"),
            Self::Disconnect(c) => write!(f, "DISCONNECT {c:#04x}"),
            Self::Closed => f.write_str("connection closed"),
            Self::Silent => f.write_str("no answer"),
        }
    }
}

/// Reads until the head-end answers CONNACK or DISCONNECT, closes, or `wait` passes; returns
/// the answer and when it came (from `started`).
async fn answer(client: &mut Client, wait: Duration, started: Instant) -> (Answer, Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, client.recv()).await {
            Ok(Ok(Packet::ConnAck { code, .. })) => {
                return (Answer::ConnAck(code), started.elapsed());
            }
            Ok(Ok(Packet::Disconnect { reason_code })) => {
                return (Answer::Disconnect(reason_code), started.elapsed());
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return (Answer::Closed, started.elapsed()),
            Err(_) => return (Answer::Silent, started.elapsed()),
        }
    }
}

/// A TLS session of attack meter `x-{name}` from a fresh source, no CONNECT sent.
async fn raw_session(
    ctx: &Ctx,
    name: &str,
    protocol: Protocol,
) -> Result<(Client, Creds, IpAddr), AttackError> {
    let meter = ctx.attack_meter(name)?;
    let config = ctx.client_config(&meter)?;
    let source = ctx.fresh_source();
    let tls = ctx
        .tls_from(source, config)
        .await
        .map_err(|e| AttackError::Setup(format!("{}: {e}", meter.id)))?;
    Ok((Client::new(tls, protocol), meter, source))
}

/// An MQTT session (CONNECT accepted) of attack meter `x-{name}` from a fresh source.
async fn session(
    ctx: &Ctx,
    name: &str,
    protocol: Protocol,
    keep_alive: Duration,
) -> Result<(Client, Creds), AttackError> {
    let meter = ctx.attack_meter(name)?;
    let config = ctx.client_config(&meter)?;
    let source = ctx.fresh_source();
    let mut opts = ClientOptions::new(meter.id.clone());
    opts.protocol = protocol;
    opts.keep_alive = keep_alive;
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        let tls = ctx.tls_from(source, config).await?;
        Client::handshake(tls, &opts).await
    })
    .await;
    match connected {
        Ok(Ok((client, _))) => Ok((client, meter)),
        Ok(Err(e)) => Err(AttackError::Setup(format!(
            "{} cannot connect: {e}",
            meter.id
        ))),
        Err(_) => Err(AttackError::Setup(format!(
            "{} cannot connect: timeout",
            meter.id
        ))),
    }
}

// ---------------------------------------------------------------------------------------------

async fn random_before_tls(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let source = ctx.fresh_source();
    let mut bytes = vec![0u8; 512];
    rand::thread_rng().fill_bytes(&mut bytes);
    // Not one of the TLS record types (change_cipher_spec .. heartbeat, 0x14..=0x18).
    if (0x14..=0x18).contains(&bytes[0]) {
        bytes[0] ^= 0x80;
    }
    let before = ctx.last_event_id();
    let started = Instant::now();
    let mut tcp = ctx
        .tcp_from(source, ctx.target.mqtt)
        .await
        .map_err(|e| AttackError::Setup(format!("connect: {e}")))?;
    // The head-end may close before it read everything: a failed write is part of the answer.
    let _ = tcp.write_all(&bytes).await;
    let mut got = 0usize;
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(ANSWER_WAIT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await
    .is_ok();
    let elapsed = started.elapsed();
    let events = wait_events(ctx, before, 1, |e| {
        e.event.reason == "tls_handshake_failed" && from_source(e, source)
    })
    .await;
    Ok(Check::new(NAME, case, "closed, event tls_handshake_failed")
        .observed(format!(
            "512 random bytes (first {:#04x}) from {source}: {} after {:.2} s ({got} bytes \
             answered{}); {}",
            bytes[0],
            if closed {
                "connection closed"
            } else {
                "still open"
            },
            elapsed.as_secs_f64(),
            if got == 7 { ": a TLS alert" } else { "" },
            event_note(&events, "tls_handshake_failed")
        ))
        .pass(closed && !events.is_empty())
        .event(events.first().map(|e| e.id)))
}

async fn random_instead_of_connect(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let (mut client, meter, _) = raw_session(ctx, "mal-garbage", Protocol::V5).await?;
    let mut frame = vec![0u8; 102];
    rand::thread_rng().fill_bytes(&mut frame);
    frame[1] = 100;
    let before = ctx.last_event_id();
    let started = Instant::now();
    let _ = client.send_raw(&frame).await;
    let (ans, at) = answer(&mut client, ANSWER_WAIT, started).await;
    let events = wait_events(ctx, before, 1, |e| {
        e.event.reason == "malformed_packet" && about(e, &meter.id)
    })
    .await;
    Ok(Check::new(
        NAME,
        case,
        "closed, no CONNACK success, event malformed_packet",
    )
    .observed(format!(
        "a 102-byte frame of type {} with random content: {ans} after {:.2} s; {}",
        frame[0] >> 4,
        at.as_secs_f64(),
        event_note(&events, "malformed_packet")
    ))
    .pass(ans.refused() && !events.is_empty())
    .event(events.first().map(|e| e.id)))
}

/// Case 3: half a CONNECT, then silence, until the connect deadline.
async fn truncated_connect(ctx: &Ctx) -> Check {
    const CASE: &str = "a truncated CONNECT, then silence";
    match truncated_connect_inner(ctx, CASE).await {
        Ok(c) => c,
        Err(e) => Check::broken(NAME, CASE, e),
    }
}

async fn truncated_connect_inner(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let started = Instant::now();
    let (mut client, meter, _) = raw_session(ctx, "mal-trunc-connect", Protocol::V5).await?;
    let mut connect = BytesMut::new();
    codec::encode_connect(&mut connect, Protocol::V5, &meter.id, 60, true)
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let half = &connect[..connect.len() / 2];
    let before = ctx.last_event_id();
    let _ = client.send_raw(half).await;
    let (ans, at) = answer(&mut client, CONNECT_TIMEOUT + CLOSE_SLACK * 2, started).await;
    let events = wait_events(ctx, before, 1, |e| {
        e.event.reason == "timeout" && about(e, &meter.id)
    })
    .await;
    Ok(Check::new(
        NAME,
        case,
        format!(
            "closed at the connect deadline ({} s), event timeout",
            CONNECT_TIMEOUT.as_secs()
        ),
    )
    .observed(format!(
        "{} of {} CONNECT bytes: {ans} {:.1} s after TCP connect; {}",
        half.len(),
        connect.len(),
        at.as_secs_f64(),
        event_note(&events, "timeout")
    ))
    .pass(ans == Answer::Closed && at <= CONNECT_TIMEOUT + CLOSE_SLACK && !events.is_empty())
    .event(events.first().map(|e| e.id)))
}

async fn truncated_publish(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let (mut client, meter) =
        session(ctx, "mal-trunc-publish", Protocol::V5, SHORT_KEEP_ALIVE).await?;
    let topic = format!("meters/{}/readings", meter.id);
    let mut publish = BytesMut::new();
    codec::encode_publish(
        &mut publish,
        Protocol::V5,
        &topic,
        QoS::AtLeastOnce,
        1,
        false,
        Ctx::genuine(&meter, 1, 1.0)?.into(),
    )
    .map_err(|e| AttackError::Setup(e.to_string()))?;
    let half = &publish[..publish.len() / 2];
    let before = ctx.last_event_id();
    let started = Instant::now();
    let _ = client.send_raw(half).await;
    let (ans, at) = answer(&mut client, ANSWER_WAIT, started).await;
    let events = wait_events(ctx, before, 1, |e| {
        e.event.reason == "timeout" && about(e, &meter.id)
    })
    .await;
    let stored = ctx.stored_counters(&meter.id);
    let allowed = SHORT_KEEP_ALIVE.mul_f64(1.5) + CLOSE_SLACK;
    Ok(Check::new(
        NAME,
        case,
        "DISCONNECT 0x8d after 1.5 × keep-alive, event timeout, nothing stored",
    )
    .observed(format!(
        "{} of {} PUBLISH bytes: {ans} after {:.1} s; {} reading(s) stored; {}",
        half.len(),
        publish.len(),
        at.as_secs_f64(),
        stored.len(),
        event_note(&events, "timeout")
    ))
    .pass(
        ans == Answer::Disconnect(0x8D) && at <= allowed && stored.is_empty() && !events.is_empty(),
    )
    .event(events.first().map(|e| e.id)))
}

/// Sends `frame` after a good CONNECT of `x-{name}` and expects `malformed_packet` (MQTT 5:
/// DISCONNECT 0x81; 3.1.1: the connection closed).
async fn bad_frame(
    ctx: &Ctx,
    case: &str,
    name: &str,
    protocol: Protocol,
    frame: &[u8],
) -> Result<Check, AttackError> {
    let (mut client, meter) = session(ctx, name, protocol, Duration::from_secs(60)).await?;
    let (reason, code) = ("malformed_packet", 0x81);
    let before = ctx.last_event_id();
    let started = Instant::now();
    let _ = client.send_raw(frame).await;
    let (ans, at) = answer(&mut client, ANSWER_WAIT, started).await;
    let events = wait_events(ctx, before, 1, |e| {
        e.event.reason == reason && about(e, &meter.id)
    })
    .await;
    let (expected_answer, answered) = match protocol {
        Protocol::V5 => (
            format!("DISCONNECT {code:#04x}"),
            ans == Answer::Disconnect(code),
        ),
        // A 3.1.1 server has no DISCONNECT to send: it closes.
        Protocol::V311 => ("closed".to_owned(), ans == Answer::Closed),
    };
    Ok(
        Check::new(NAME, case, format!("{expected_answer}, event {reason}"))
            .observed(format!(
                "{}: {ans} after {:.2} s; {}",
                hex_head(frame),
                at.as_secs_f64(),
                event_note(&events, reason)
            ))
            .pass(answered && !events.is_empty())
            .event(events.first().map(|e| e.id)),
    )
}

async fn huge_remaining_length(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let (mut client, meter) =
        session(ctx, "mal-huge", Protocol::V5, Duration::from_secs(60)).await?;
    let header = [vec![0x30], remaining_length(codec::MAX_REMAINING_LENGTH)].concat();
    let rss_before = ctx.target.rss();
    let before = ctx.last_event_id();
    let started = Instant::now();
    let _ = client.send_raw(&header).await;
    let (ans, at) = answer(&mut client, ANSWER_WAIT, started).await;
    let rss_after = ctx.target.rss();
    let events = wait_events(ctx, before, 1, |e| {
        e.event.reason == "packet_too_large" && about(e, &meter.id)
    })
    .await;
    let growth = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let memory = match growth {
        Some(g) => format!("memory +{:.1} MiB", g as f64 / f64::from(1u32 << 20)),
        None => "memory not measured (no pid)".to_owned(),
    };
    Ok(Check::new(
        NAME,
        case,
        format!(
            "DISCONNECT 0x95 within {} s on the header alone, event packet_too_large, memory \
             +≤ {} MiB",
            HUGE_ANSWER.as_secs(),
            HUGE_RSS_GROWTH >> 20
        ),
    )
    .observed(format!(
        "{}: {ans} after {:.2} s, no body byte sent; {memory}; {}",
        hex_head(&header),
        at.as_secs_f64(),
        event_note(&events, "packet_too_large")
    ))
    .pass(
        ans == Answer::Disconnect(0x95)
            && at <= HUGE_ANSWER
            && growth.is_none_or(|g| g <= HUGE_RSS_GROWTH)
            && !events.is_empty(),
    )
    .event(events.first().map(|e| e.id)))
}

async fn hostile_xml(ctx: &Ctx, laughs: &str, xxe: &str) -> Result<Vec<Check>, AttackError> {
    let (mut client, meter) =
        session(ctx, "mal-xml", Protocol::V5, Duration::from_secs(60)).await?;
    let key = meter.signing_key()?;
    let topic = format!("meters/{}/readings", meter.id);
    let reading = Ctx::reading_xml(&meter.id, 1.0)?;
    let mut checks = Vec::new();
    for (case, counter, doc) in [
        (laughs, 1, billion_laughs(&reading, &meter.id)),
        (xxe, 2, external_entity(&reading, &meter.id)),
    ] {
        let envelope = Ctx::sign(&key, &meter.id, counter, &topic, &doc)?;
        let before = ctx.last_event_id();
        let started = Instant::now();
        let out = Ctx::publish(&mut client, &topic, envelope, counter as u16).await;
        let elapsed = started.elapsed();
        let events = wait_events(ctx, before, 1, |e| {
            e.event.reason == "invalid_document" && about(e, &meter.id)
        })
        .await;
        // The parser must refuse the DTD itself, not stumble later on what it expanded to.
        let dtd_refused = events.iter().any(|e| e.event.detail.contains("DTD"));
        let stored = ctx.stored_counters(&meter.id).contains(&counter);
        checks.push(
            Check::new(
                NAME,
                case,
                format!(
                    "refused within {} s (DTD refused outright), event invalid_document, \
                     nothing stored",
                    XML_ANSWER.as_secs()
                ),
            )
            .observed(format!(
                "{} bytes of XML: {out} after {:.3} s; {}; {}{}",
                doc.len(),
                elapsed.as_secs_f64(),
                if stored { "STORED" } else { "not stored" },
                event_note(&events, "invalid_document"),
                match events.first() {
                    Some(e) => format!(" ({})", e.event.detail),
                    None => String::new(),
                }
            ))
            .pass(
                out.refused()
                    && elapsed <= XML_ANSWER
                    && !stored
                    && !events.is_empty()
                    && dtd_refused,
            )
            .event(events.first().map(|e| e.id)),
        );
    }
    let _ = client.disconnect().await;
    Ok(checks)
}

/// `reading` with a DTD of ten levels of tenfold entities (10^9 "lol"s, some 3 GB expanded)
/// and the meter id replaced by the outermost entity.
fn billion_laughs(reading: &str, meter: &str) -> String {
    let mut dtd = String::from("<!DOCTYPE EnergyUsageReport [<!ENTITY lol0 \"lol\">");
    for i in 1..=9 {
        dtd.push_str(&format!(
            "<!ENTITY lol{i} \"{}\">",
            format!("&lol{};", i - 1).repeat(10)
        ));
    }
    dtd.push_str("]>");
    format!(
        "<?xml version=\"1.0\"?>{dtd}{}",
        reading.replace(
            &format!("<MeterID>{meter}</MeterID>"),
            "<MeterID>&lol9;</MeterID>"
        )
    )
}

/// `reading` with a DTD declaring an external entity and the meter id replaced by it.
fn external_entity(reading: &str, meter: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?><!DOCTYPE EnergyUsageReport [<!ENTITY xxe SYSTEM \
         \"file:///etc/passwd\">]>{}",
        reading.replace(
            &format!("<MeterID>{meter}</MeterID>"),
            "<MeterID>&xxe;</MeterID>"
        )
    )
}

/// A QoS 0 PUBLISH whose topic is `prefix` followed by `raw` (any bytes), with a one-byte
/// payload.
fn publish_with_raw_topic(protocol: Protocol, prefix: &[u8], raw: &[u8]) -> Vec<u8> {
    let topic = [prefix, raw].concat();
    let mut body = Vec::new();
    body.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(u16::MAX).to_be_bytes());
    body.extend_from_slice(&topic);
    if protocol == Protocol::V5 {
        body.push(0); // no properties
    }
    body.push(b'x');
    let mut frame = vec![0x30];
    frame.extend(remaining_length(body.len()));
    frame.extend(body);
    frame
}

/// The first bytes of `frame` in hex, for the observed column.
fn hex_head(frame: &[u8]) -> String {
    let head: Vec<String> = frame.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}{} ({} bytes)",
        head.join(" "),
        if frame.len() > 8 { " …" } else { "" },
        frame.len()
    )
}

fn event_note(events: &[gridward_store::StoredSecurityEvent], reason: &str) -> String {
    if events.is_empty() {
        format!("no {reason} event")
    } else {
        format!("event {reason}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_documents_carry_their_dtd() {
        let reading = "<EnergyUsageReport><MeterID>x-m</MeterID><Timestamp>t</Timestamp>\
                       <EnergyConsumed>1</EnergyConsumed></EnergyUsageReport>";
        let laughs = billion_laughs(reading, "x-m");
        assert!(laughs.contains("<!DOCTYPE") && laughs.contains("<MeterID>&lol9;</MeterID>"));
        assert!(laughs.contains("<!ENTITY lol9 \"&lol8;&lol8;"));
        let xxe = external_entity(reading, "x-m");
        assert!(xxe.contains("SYSTEM \"file:///etc/passwd\"") && xxe.contains("&xxe;"));
    }

    #[test]
    fn raw_topic_frames_are_complete_frames() {
        for protocol in [Protocol::V5, Protocol::V311] {
            let f = publish_with_raw_topic(protocol, b"meters/x/", b"\xff");
            assert_eq!(codec::frame_len(&f, 1 << 16), Ok(Some(f.len())));
            assert!(codec::decode(protocol, &f).is_err());
        }
        let cut = [0x30, 0x05, 0x00, 0x20, b'm', b'e', b't'];
        assert_eq!(codec::frame_len(&cut, 1 << 16), Ok(Some(cut.len())));
        assert!(codec::decode(Protocol::V5, &cut).is_err());
    }
}
