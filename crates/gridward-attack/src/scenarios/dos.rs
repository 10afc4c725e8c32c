//! Denial of service: floods, oversize packets, slow and half-open connections.
//!
//! Every case measures the genuine fleet's acknowledged readings per second over [`BASELINE`]
//! just before the attack and over the attack itself (which lasts at least [`MIN_WINDOW`]),
//! samples the head-end's resident memory before, during and after, and demands three things:
//! the defence's security event, the genuine throughput during the attack at least
//! [`MIN_SHARE`] of before, and the memory growth during the attack under [`MAX_RSS_GROWTH`].
//! Each attack comes from a fresh source of its own (one source per case: "from one source" is
//! the point of the floods).
//!
//! 1. Connection flood: at least [`FLOOD_CONNECTIONS`] TCP connections from one source, each
//!    starting a TLS handshake without a client certificate, [`FLOOD_CONCURRENCY`] at a time:
//!    the first ones fail (`certificate_missing`), the tenth failure bans the source
//!    (`source_banned`), and from then on connections are closed at accept, before any TLS.
//!    Pass: the ban event, and at least [`FLOOD_MIN_REFUSED`] of the connections refused at
//!    accept (they got no TLS answer at all).
//! 2. Publish flood: a meter (`x-dos-flood`) re-sends one valid, stored reading as fast as it
//!    can, QoS 1 and QoS 0 alternating; every copy is signature-checked and acknowledged as a
//!    duplicate, so only the meter's rate limit stops it: `rate_limited`, DISCONNECT 0x96.
//!    It reconnects and floods again until the window is over. Pass: every flood connection
//!    cut by the head-end, one `rate_limited` event each, no more acknowledged than the meter's
//!    bucket allows over the whole attack (burst + rate × duration, the head-end's defaults:
//!    reconnecting must not refill the bucket), and the source banned after 10 cuts, its
//!    reconnections refused.
//! 3. Oversize packets: a meter (`x-dos-oversize`) announces a 1 MiB PUBLISH and streams its
//!    body; the head-end refuses at the fixed header (`packet_too_large`, DISCONNECT 0x95).
//!    Again and again until the window is over. Pass: every attempt cut, one event each, and
//!    the source banned after 10 (a session cut for abuse counts like a failed CONNECT), its
//!    reconnections refused.
//! 4. Slow CONNECTs: [`SLOW_CONNECTIONS`] TLS sessions of `x-dos-slow` from one source drip
//!    their CONNECT one byte every [`DRIP`]; the connect deadline (10 s by default, counted from
//!    TCP accept, not from the last byte) ends each: `timeout`, connection closed.
//! 5. Half-open TLS handshakes: [`HALF_OPEN`] TCP connections from one source send the first
//!    half of a ClientHello, then nothing: `timeout` each when the connect deadline passes,
//!    connection closed (the slot is freed).
//!
//! Cases 4 and 5 both take the connect timeout to resolve, so they run together (one
//! throughput and memory measurement covers both); each must also end in a ban of its source,
//! since each exceeds the ban threshold of 10 failures. What the head-end cannot show here:
//! its global `connection_limit` (20,000 connections by default) is out of reach of one test
//! process, and there is no per-source connection limit to hit.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gridward_mqtt::client::{Packet, Protocol, QoS};
use gridward_mqtt::codec;
use gridward_store::StoredSecurityEvent;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Ctx, EVENT_WAIT, PubOutcome};

/// The scenario's name.
pub const NAME: &str = "dos";

/// Genuine throughput is measured over this long just before each attack. The fleet sends
/// 5 readings/s per meter (100/s for 20 meters): 3 s hold some 300 acknowledgements, so one
/// reading more or less moves the rate by well under 1 %, and a stall of the shared machine
/// (a store commit waiting for the disk, another process's burst) weighs less than over 2 s.
const BASELINE: Duration = Duration::from_secs(3);

/// Each attack lasts at least this long (the floods start over until it has passed), so the
/// throughput during the attack is measured over at least as long as the baseline.
const MIN_WINDOW: Duration = Duration::from_secs(3);

/// The genuine throughput during an attack must be at least this share of the throughput just
/// before. Not 100 %: the harness runs on shared 2-core machines (CI, debug build) where the
/// attacker, the head-end and the fleet share the cores, and one scheduling hiccup can shift a
/// few readings' acknowledgements across a window edge. An attack that starves the fleet shows
/// up far below this floor.
const MIN_SHARE: f64 = 0.8;

/// Largest growth of resident memory allowed during an attack (peak during minus before).
/// For an in-process head-end the figure is this process's RSS, which includes the harness's
/// own attack connections (buffers, TLS state, tasks: a few MiB at the concurrency used here),
/// so the bound is generous; a head-end that buffered the flood (1 MiB per oversize packet,
/// a task and buffer per refused connection, unbounded queues) would exceed it quickly.
const MAX_RSS_GROWTH: u64 = 64 << 20;

/// How often memory is sampled during an attack.
const RSS_SAMPLE: Duration = Duration::from_millis(100);

/// Connection flood: at least this many connections (then more until [`MIN_WINDOW`] is over).
const FLOOD_CONNECTIONS: usize = 1_000;
/// Connection flood: never more than this many (ephemeral ports of one source are finite).
const FLOOD_MAX_CONNECTIONS: usize = 5_000;
/// Connection flood: connections in progress at once.
const FLOOD_CONCURRENCY: usize = 32;
/// Connection flood: new connections per second at most. Unpaced, loopback takes some 5,000
/// connections per second and [`FLOOD_MAX_CONNECTIONS`] would be over in under a second, too
/// short a window to measure the fleet over; 1,500/s (150 times the ban threshold each second)
/// is still a flood and lasts the whole [`MIN_WINDOW`] (4,500 connections).
const FLOOD_RATE: f64 = 1_500.0;
/// Connection flood: the share of connections that must be refused at accept (no TLS answer).
/// The ban comes after 10 failures; the handshakes admitted before it (at most a few dozen at
/// this concurrency) are all that may get an answer.
const FLOOD_MIN_REFUSED: f64 = 0.9;
/// Connection flood: a handshake that neither completes nor fails within this is counted as
/// stalled.
const FLOOD_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Publish flood: publishes written per flush.
const PUBLISH_BATCH: usize = 16;
/// The head-end's default rate limit of one meter: sustained packets per second ...
const RATE_PER_SECOND: f64 = 50.0;
/// ... and the burst above it. The flood's meter may get at most burst + rate × duration
/// packets through, however often it reconnects.
const RATE_BURST: f64 = 200.0;

/// Oversize packets: the size announced in the fixed header (16 × the default limit of 64 KiB).
const OVERSIZE_BYTES: usize = 1 << 20;
/// Oversize packets: the body is streamed in chunks of this size.
const OVERSIZE_CHUNK: usize = 16 << 10;

/// The head-end's default connect timeout (TCP accept to complete CONNECT), which ends slow
/// CONNECTs and half-open handshakes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much later than [`CONNECT_TIMEOUT`] a slow connection may be closed and still pass.
const CLOSE_SLACK: Duration = Duration::from_secs(3);
/// Slow CONNECTs: how many (from one source; more than the ban threshold of 10).
const SLOW_CONNECTIONS: usize = 12;
/// Slow CONNECTs: one byte of CONNECT every this often. The CONNECT of `x-dos-slow` has 25
/// bytes: 25 s to send it all, well beyond the connect timeout.
const DRIP: Duration = Duration::from_secs(1);
/// Half-open TLS handshakes: how many (from one source).
const HALF_OPEN: usize = 50;

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    const FLOOD: &str =
        "a connection flood from one source (1,000+ TLS handshakes, no certificate)";
    const PUBLISH: &str = "a publish flood from one meter (QoS 1/0, as fast as it can)";
    const OVERSIZE: &str = "oversize packets (PUBLISH announcing 1 MiB, body streamed)";
    let mut checks = vec![
        connection_flood(ctx, FLOOD)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, FLOOD, e)),
        publish_flood(ctx, PUBLISH)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, PUBLISH, e)),
        oversize(ctx, OVERSIZE)
            .await
            .unwrap_or_else(|e| Check::broken(NAME, OVERSIZE, e)),
    ];
    match slow(ctx).await {
        Ok(mut c) => checks.append(&mut c),
        Err(e) => checks.push(Check::broken(
            NAME,
            "slow CONNECTs and half-open TLS handshakes",
            e,
        )),
    }
    checks
}

/// The genuine fleet and the head-end's memory around one attack.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// Acknowledged genuine readings per second just before.
    before: f64,
    /// ... and during the attack.
    during: f64,
    /// How long the attack ran, seconds.
    seconds: f64,
    rss_before: Option<u64>,
    rss_peak: Option<u64>,
    rss_after: Option<u64>,
}

impl Load {
    fn share(&self) -> f64 {
        if self.before > 0.0 {
            self.during / self.before
        } else {
            0.0
        }
    }

    fn growth(&self) -> Option<u64> {
        Some(self.rss_peak?.saturating_sub(self.rss_before?))
    }

    /// Throughput held and memory stayed bounded. Without a memory figure (a head-end in
    /// another process whose pid was not given) only the throughput is judged.
    fn held(&self) -> bool {
        self.before > 0.0
            && self.share() >= MIN_SHARE
            && self.growth().is_none_or(|g| g <= MAX_RSS_GROWTH)
    }

    fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let memory = match (self.rss_before, self.rss_peak, self.rss_after) {
            (Some(b), Some(p), Some(a)) => format!(
                "memory +{:.1} MiB at peak ({:.0} → {:.0} MiB, {:.0} MiB after)",
                mib(p.saturating_sub(b)),
                mib(b),
                mib(p),
                mib(a)
            ),
            _ => "memory not measured (no pid)".to_owned(),
        };
        format!(
            "genuine throughput during: {:.0} % of before ({:.1}/s over {:.1} s vs {:.1}/s); {memory}",
            self.share() * 100.0,
            self.during,
            self.seconds,
            self.before
        )
    }
}

/// What every case expects of the fleet and the memory, for the `expected` column.
fn load_expected() -> String {
    format!(
        "genuine ≥ {:.0} % of before, memory +≤ {} MiB",
        MIN_SHARE * 100.0,
        MAX_RSS_GROWTH >> 20
    )
}

/// Measures the fleet for [`BASELINE`], then runs `attack` while measuring the fleet and
/// sampling memory; returns what the attack returned and the [`Load`].
async fn under_attack<T>(ctx: &Ctx, attack: impl Future<Output = T>) -> (T, Load) {
    let before = ctx.fleet.rate_over(BASELINE).await;
    let rss_before = ctx.target.rss();
    let acked_before = ctx.fleet.snapshot().acked;
    let started = Instant::now();
    let done = AtomicBool::new(false);
    let sampler = async {
        let mut peak = rss_before;
        while !done.load(Ordering::Relaxed) {
            peak = peak.max(ctx.target.rss());
            tokio::time::sleep(RSS_SAMPLE).await;
        }
        peak.max(ctx.target.rss())
    };
    let attack = async {
        let out = attack.await;
        done.store(true, Ordering::Relaxed);
        out
    };
    let (rss_peak, out) = tokio::join!(sampler, attack);
    let seconds = started.elapsed().as_secs_f64().max(1e-3);
    let during = (ctx.fleet.snapshot().acked.saturating_sub(acked_before)) as f64 / seconds;
    // Let what the attack left behind (closing sockets, queued events) settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let load = Load {
        before,
        during,
        seconds,
        rss_before,
        rss_peak,
        rss_after: ctx.target.rss(),
    };
    (out, load)
}

// ---------------------------------------------------------------------------------------------
// 1. Connection flood

/// What became of one flood connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// The head-end answered the handshake (it was admitted: before the ban).
    Answered,
    /// Closed without a TLS answer: refused at accept.
    Refused,
    /// TCP connect itself failed (the attacker's side: ports, descriptors).
    ConnectFailed,
    /// Neither answered nor closed in time.
    Stalled,
}

#[derive(Debug, Default)]
struct FloodTally {
    answered: usize,
    refused: usize,
    connect_failed: usize,
    stalled: usize,
}

impl FloodTally {
    fn total(&self) -> usize {
        self.answered + self.refused + self.connect_failed + self.stalled
    }

    fn add(&mut self, c: Conn) {
        match c {
            Conn::Answered => self.answered += 1,
            Conn::Refused => self.refused += 1,
            Conn::ConnectFailed => self.connect_failed += 1,
            Conn::Stalled => self.stalled += 1,
        }
    }
}

async fn connection_flood(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let config = anonymous_config(ctx)?;
    let name = server_name(ctx)?;
    let source = ctx.fresh_source();
    let addr = ctx.target.mqtt;
    let before = ctx.last_event_id();
    let flood = async move {
        let started = Instant::now();
        let mut tally = FloodTally::default();
        let mut set = JoinSet::new();
        let mut launched = 0;
        loop {
            let more = launched < FLOOD_MAX_CONNECTIONS
                && (launched < FLOOD_CONNECTIONS || started.elapsed() < MIN_WINDOW);
            if more && set.len() < FLOOD_CONCURRENCY {
                let due = started + Duration::from_secs_f64(launched as f64 / FLOOD_RATE);
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                launched += 1;
                let (config, name) = (Arc::clone(&config), name.clone());
                set.spawn(flood_one(source, addr, config, name));
                continue;
            }
            match set.join_next().await {
                Some(Ok(c)) => tally.add(c),
                Some(Err(_)) => tally.add(Conn::Stalled),
                None => break,
            }
        }
        tally
    };
    let (tally, load) = under_attack(ctx, flood).await;
    let ban = banned(ctx, before, source).await;
    let missing = wait_events(ctx, before, 0, |e| {
        e.event.reason == "certificate_missing" && from_source(e, source)
    })
    .await
    .len();
    let total = tally.total();
    let refused_share = tally.refused as f64 / total.max(1) as f64;
    let observed = format!(
        "{total} connections from {source}: {} answered by TLS ({missing} certificate_missing \
         events), {} refused at accept ({:.1} %), {} TCP connects failed, {} stalled; {}; {}",
        tally.answered,
        tally.refused,
        refused_share * 100.0,
        tally.connect_failed,
        tally.stalled,
        ban_note(&ban),
        load.describe()
    );
    Ok(Check::new(
        NAME,
        case,
        format!(
            "source banned after 10 failed handshakes (event source_banned), ≥ {:.0} % refused at \
             accept; {}",
            FLOOD_MIN_REFUSED * 100.0,
            load_expected()
        ),
    )
    .observed(observed)
    .pass(
        ban.is_some()
            && total >= FLOOD_CONNECTIONS
            && refused_share >= FLOOD_MIN_REFUSED
            && load.held(),
    )
    .event(ban.map(|e| e.id)))
}

/// One flood connection: TCP from `source`, a TLS handshake without a client certificate.
async fn flood_one(
    source: IpAddr,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Conn {
    let Ok(tcp) = tcp_from(source, addr).await else {
        return Conn::ConnectFailed;
    };
    match tokio::time::timeout(
        FLOOD_HANDSHAKE_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    {
        // TLS 1.3: the client is done before the server has checked (and refused) the missing
        // certificate, so Ok means "the head-end took part in a handshake".
        Ok(Ok(_)) => Conn::Answered,
        Ok(Err(_)) => Conn::Refused,
        Err(_) => Conn::Stalled,
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Publish flood

/// How a flood connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The head-end sent DISCONNECT with this reason code.
    Disconnect(u8),
    /// The head-end closed (or reset) the connection.
    Closed,
    /// Still open when the attacker gave up.
    StillOpen,
}

#[derive(Debug)]
struct FloodConn {
    sent: u64,
    acked: u64,
    cut: Cut,
}

async fn publish_flood(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let meter = ctx.attack_meter("dos-flood")?;
    let config = ctx.client_config(&meter)?;
    let source = ctx.fresh_source();
    let topic = format!("meters/{}/readings", meter.id);
    // One genuine reading, stored once; the flood re-sends it byte for byte.
    let envelope = Bytes::from(Ctx::genuine(&meter, 1, 1.0)?);
    let (mut client, _) = ctx
        .mqtt_from(source, Arc::clone(&config), &meter.id, Protocol::V5)
        .await
        .map_err(|e| AttackError::Setup(format!("{} cannot connect: {e}", meter.id)))?;
    let first = Ctx::publish(&mut client, &topic, envelope.to_vec(), 1).await;
    let _ = client.disconnect().await;
    if first != PubOutcome::Acked(0) {
        return Err(AttackError::Setup(format!(
            "the flood's reading was not accepted: {first}"
        )));
    }

    let before = ctx.last_event_id();
    let flood = async {
        let started = Instant::now();
        let hard_stop = started + MIN_WINDOW + Duration::from_secs(10);
        let mut conns = Vec::new();
        let mut errors = Vec::new();
        while started.elapsed() < MIN_WINDOW {
            match flood_connection(
                ctx, source, &config, &meter.id, &topic, &envelope, hard_stop,
            )
            .await
            {
                Ok(c) => conns.push(c),
                Err(e) => {
                    errors.push(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        (conns, errors)
    };
    let ((conns, errors), load) = under_attack(ctx, flood).await;
    let limited = wait_events(ctx, before, conns.len(), |e| {
        e.event.reason == "rate_limited" && about(e, &meter.id)
    })
    .await;
    let ban = banned(ctx, before, source).await;
    let sent: u64 = conns.iter().map(|c| c.sent).sum();
    let acked: u64 = conns.iter().map(|c| c.acked).sum();
    let max_acked = conns.iter().map(|c| c.acked).max().unwrap_or(0);
    let with_0x96 = conns
        .iter()
        .filter(|c| c.cut == Cut::Disconnect(0x96))
        .count();
    let not_cut = conns.iter().filter(|c| c.cut == Cut::StillOpen).count();
    let other: Vec<String> = conns
        .iter()
        .filter_map(|c| match c.cut {
            Cut::Disconnect(code) if code != 0x96 => Some(format!("DISCONNECT {code:#04x}")),
            _ => None,
        })
        .collect();
    let stored = ctx.stored_counters(&meter.id);
    // Every acknowledged publish took a token of the meter's bucket.
    let allowed = (RATE_BURST + RATE_PER_SECOND * load.seconds).floor() as u64;
    let observed = format!(
        "{} flood connections from {source}: {sent} publishes written to the socket, {acked} QoS \
         1 acknowledged ({:.0}/s; at most {allowed} may pass in {:.1} s; {max_acked} on one \
         connection at most); {with_0x96} ended with DISCONNECT 0x96, {} closed, {not_cut} not \
         cut{}; {} rate_limited events; {}{}; {} reading(s) of {} stored; {}",
        conns.len(),
        acked as f64 / load.seconds,
        load.seconds,
        conns.iter().filter(|c| c.cut == Cut::Closed).count(),
        if other.is_empty() {
            String::new()
        } else {
            format!(", others: {other:?}")
        },
        limited.len(),
        ban_note(&ban),
        reconnects_note(&errors),
        stored.len(),
        meter.id,
        load.describe()
    );
    Ok(Check::new(
        NAME,
        case,
        format!(
            "each flood connection cut (rate_limited event, DISCONNECT 0x96), reconnecting \
             refills nothing (≤ {RATE_BURST} + {RATE_PER_SECOND}/s acknowledged), source banned \
             after 10 cuts (source_banned), nothing new stored; {}",
            load_expected()
        ),
    )
    .observed(observed)
    .pass(
        !conns.is_empty()
            && not_cut == 0
            && other.is_empty()
            && limited.len() >= conns.len()
            && acked <= allowed
            && ban.is_some()
            && !errors.is_empty()
            && stored == [1]
            && load.held(),
    )
    .event(limited.first().map(|e| e.id)))
}

/// One connection of the publish flood: connects, writes `envelope` as fast as the socket takes
/// it (QoS 1 and 0 alternating) until the head-end cuts the connection or `hard_stop`.
async fn flood_connection(
    ctx: &Ctx,
    source: IpAddr,
    config: &Arc<ClientConfig>,
    id: &str,
    topic: &str,
    envelope: &Bytes,
    hard_stop: Instant,
) -> Result<FloodConn, String> {
    let (client, _) = ctx
        .mqtt_from(source, Arc::clone(config), id, Protocol::V5)
        .await
        .map_err(|e| e.to_string())?;
    let (mut reader, mut writer) = client.into_split();
    let sent = AtomicU64::new(0);
    let acked = AtomicU64::new(0);
    let read = async {
        loop {
            match reader.recv().await {
                Ok(Packet::PubAck { reason_code: 0, .. }) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Packet::Disconnect { reason_code }) => return Cut::Disconnect(reason_code),
                Ok(_) => {}
                Err(_) => return Cut::Closed,
            }
        }
    };
    let write = async {
        let mut pkid: u16 = 0;
        while Instant::now() < hard_stop {
            for _ in 0..PUBLISH_BATCH {
                let n = sent.load(Ordering::Relaxed);
                let qos = if n.is_multiple_of(2) {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                pkid = pkid.checked_add(1).unwrap_or(1);
                if writer
                    .queue_publish(topic, envelope.clone(), qos, pkid)
                    .is_err()
                {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    };
    tokio::pin!(read);
    let cut = tokio::select! {
        cut = &mut read => cut,
        () = write => {
            // The socket failed (the head-end closed it) or the attacker gave up: what did the
            // head-end say?
            let wait = hard_stop.saturating_duration_since(Instant::now()).max(Duration::from_secs(2));
            tokio::time::timeout(wait, &mut read).await.unwrap_or(Cut::StillOpen)
        }
    };
    Ok(FloodConn {
        sent: sent.load(Ordering::Relaxed),
        acked: acked.load(Ordering::Relaxed),
        cut,
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Oversize packets

async fn oversize(ctx: &Ctx, case: &str) -> Result<Check, AttackError> {
    let meter = ctx.attack_meter("dos-oversize")?;
    let config = ctx.client_config(&meter)?;
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let attack = async {
        let started = Instant::now();
        let mut attempts: Vec<(Cut, Duration)> = Vec::new();
        let mut errors = Vec::new();
        while started.elapsed() < MIN_WINDOW {
            match oversize_attempt(ctx, source, &config, &meter.id).await {
                Ok(a) => attempts.push(a),
                Err(e) => {
                    errors.push(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        (attempts, errors)
    };
    let ((attempts, errors), load) = under_attack(ctx, attack).await;
    let events = wait_events(ctx, before, attempts.len(), |e| {
        e.event.reason == "packet_too_large" && about(e, &meter.id)
    })
    .await;
    let ban = banned(ctx, before, source).await;
    let count = |cut: Cut| attempts.iter().filter(|(c, _)| *c == cut).count();
    let (with_0x95, closed, not_cut) = (
        count(Cut::Disconnect(0x95)),
        count(Cut::Closed),
        count(Cut::StillOpen),
    );
    let slowest = attempts.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let observed = format!(
        "{} packets announcing {} KiB from {source}: {with_0x95} answered DISCONNECT 0x95, \
         {closed} closed, {not_cut} not cut; the cut came at most {} ms after the header (a \
         full body takes the attacker's socket buffers, not the head-end's memory); {} \
         packet_too_large events; {}{}; {}",
        attempts.len(),
        OVERSIZE_BYTES >> 10,
        slowest.as_millis(),
        events.len(),
        ban_note(&ban),
        reconnects_note(&errors),
        load.describe()
    );
    Ok(Check::new(
        NAME,
        case,
        format!(
            "refused at the fixed header (packet_too_large, DISCONNECT 0x95) each time, source \
             banned after 10 (source_banned); {}",
            load_expected()
        ),
    )
    .observed(observed)
    .pass(
        !attempts.is_empty()
            && not_cut == 0
            && with_0x95 + closed == attempts.len()
            && events.len() >= attempts.len()
            && ban.is_some()
            && !errors.is_empty()
            && load.held(),
    )
    .event(events.first().map(|e| e.id)))
}

/// One oversize packet: connects, sends a PUBLISH header announcing [`OVERSIZE_BYTES`], then
/// streams zeros; returns how the head-end ended it and how long after the header.
async fn oversize_attempt(
    ctx: &Ctx,
    source: IpAddr,
    config: &Arc<ClientConfig>,
    id: &str,
) -> Result<(Cut, Duration), String> {
    let (client, _) = ctx
        .mqtt_from(source, Arc::clone(config), id, Protocol::V5)
        .await
        .map_err(|e| e.to_string())?;
    let (mut reader, mut writer) = client.into_split();
    let started = Instant::now();
    let read = async {
        loop {
            match reader.recv().await {
                Ok(Packet::Disconnect { reason_code }) => return Cut::Disconnect(reason_code),
                Ok(_) => {}
                Err(_) => return Cut::Closed,
            }
        }
    };
    let write = async {
        let mut header = vec![0x30];
        header.extend(remaining_length(OVERSIZE_BYTES));
        if writer.send_raw(&header).await.is_err() {
            return;
        }
        let chunk = vec![0u8; OVERSIZE_CHUNK];
        for _ in 0..OVERSIZE_BYTES / OVERSIZE_CHUNK {
            if writer.send_raw(&chunk).await.is_err() {
                return;
            }
        }
        // All written: wait for the head-end's answer.
        std::future::pending::<()>().await;
    };
    tokio::pin!(read);
    let cut = tokio::select! {
        cut = &mut read => cut,
        () = write => tokio::time::timeout(Duration::from_secs(5), &mut read)
            .await
            .unwrap_or(Cut::StillOpen),
        () = tokio::time::sleep(Duration::from_secs(10)) => Cut::StillOpen,
    };
    Ok((cut, started.elapsed()))
}

/// The `source_banned` event of `source` after event `before`, waiting for it if need be.
async fn banned(ctx: &Ctx, before: i64, source: IpAddr) -> Option<StoredSecurityEvent> {
    wait_events(ctx, before, 1, |e| {
        e.event.reason == "source_banned" && from_source(e, source)
    })
    .await
    .into_iter()
    .next()
}

fn ban_note(ban: &Option<StoredSecurityEvent>) -> &'static str {
    if ban.is_some() {
        "event source_banned"
    } else {
        "no source_banned event"
    }
}

/// What became of the attacker's reconnections once banned.
fn reconnects_note(errors: &[String]) -> String {
    match errors.first() {
        None => ", no reconnect refused".to_owned(),
        Some(e) => format!(", then {} reconnects refused ({e})", errors.len()),
    }
}

/// The MQTT variable-length encoding of `n` (at most 268,435,455).
pub(super) fn remaining_length(mut n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4);
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 || out.len() == 4 {
            return out;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4 and 5. Slow CONNECTs and half-open TLS handshakes

async fn slow(ctx: &Ctx) -> Result<Vec<Check>, AttackError> {
    const SLOW: &str = "slow CONNECTs: 12 TLS sessions from one source, CONNECT 1 byte/s";
    const HALF: &str = "half-open TLS handshakes: 50 from one source, half a ClientHello";
    let meter = ctx.attack_meter("dos-slow")?;
    let config = ctx.client_config(&meter)?;
    let name = server_name(ctx)?;
    let addr = ctx.target.mqtt;
    let mut connect = BytesMut::new();
    codec::encode_connect(&mut connect, Protocol::V5, &meter.id, 60, true)
        .map_err(|e| AttackError::Setup(e.to_string()))?;
    let connect = connect.freeze();
    let hello = client_hello(anonymous_config(ctx)?, name.clone())?;
    let half_hello = Bytes::from(hello[..hello.len() / 2].to_vec());
    let slow_source = ctx.fresh_source();
    let half_source = ctx.fresh_source();
    let before = ctx.last_event_id();

    let attack = async {
        let mut slow = JoinSet::new();
        for _ in 0..SLOW_CONNECTIONS {
            let (config, name, connect) = (Arc::clone(&config), name.clone(), connect.clone());
            slow.spawn(async move {
                let started = Instant::now();
                let tls = tls_from(slow_source, addr, name, config).await?;
                drip(tls, &connect, started).await
            });
        }
        let mut half = JoinSet::new();
        for _ in 0..HALF_OPEN {
            let hello = half_hello.clone();
            half.spawn(async move {
                let started = Instant::now();
                let mut tcp = tcp_from(half_source, addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                tcp.write_all(&hello)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                closed_within(&mut tcp, started).await
            });
        }
        (join_all(slow).await, join_all(half).await)
    };
    let ((slow, half), load) = under_attack(ctx, attack).await;

    let slow_events = wait_events(ctx, before, SLOW_CONNECTIONS, |e| {
        e.event.reason == "timeout" && about(e, &meter.id) && from_source(e, slow_source)
    })
    .await;
    let half_events = wait_events(ctx, before, HALF_OPEN, |e| {
        e.event.reason == "timeout" && from_source(e, half_source)
    })
    .await;
    let banned = |source: IpAddr| {
        ctx.events_after(before)
            .into_iter()
            .find(|e| e.event.reason == "source_banned" && from_source(e, source))
    };
    let (slow_ban, half_ban) = (banned(slow_source), banned(half_source));
    let limit = CONNECT_TIMEOUT + CLOSE_SLACK;
    let expected = |what: &str| {
        format!(
            "each closed by the connect timeout ({} s, + {} s slack) with event timeout{what}, the \
             source banned (source_banned); {}",
            CONNECT_TIMEOUT.as_secs(),
            CLOSE_SLACK.as_secs(),
            load_expected()
        )
    };

    let (slow_closed, slow_latest, slow_errors) = summarize(&slow, limit);
    let slow_check = Check::new(NAME, SLOW, expected(" (meter x-dos-slow), no CONNACK"))
        .observed(format!(
            "{slow_closed}/{SLOW_CONNECTIONS} closed by the head-end, the last after {:.1} s \
             ({}); {} timeout events; {}; {}",
            slow_latest.as_secs_f64(),
            describe_errors(&slow_errors),
            slow_events.len(),
            if slow_ban.is_some() {
                "source banned"
            } else {
                "no source_banned event"
            },
            load.describe()
        ))
        .pass(
            slow_closed == SLOW_CONNECTIONS
                && slow_events.len() >= SLOW_CONNECTIONS
                && slow_ban.is_some()
                && load.held(),
        )
        .event(slow_events.first().map(|e| e.id));

    let (half_closed, half_latest, half_errors) = summarize(&half, limit);
    let half_check = Check::new(NAME, HALF, expected(""))
        .observed(format!(
            "{half_closed}/{HALF_OPEN} closed by the head-end (slots freed), the last after {:.1} \
             s ({}); {} timeout events; {}; {} (measured with the slow CONNECTs)",
            half_latest.as_secs_f64(),
            describe_errors(&half_errors),
            half_events.len(),
            if half_ban.is_some() {
                "source banned"
            } else {
                "no source_banned event"
            },
            load.describe()
        ))
        .pass(
            half_closed == HALF_OPEN
                && half_events.len() >= HALF_OPEN
                && half_ban.is_some()
                && load.held(),
        )
        .event(half_events.first().map(|e| e.id));
    Ok(vec![slow_check, half_check])
}

/// Sends `connect` one byte every [`DRIP`] on `tls` until the head-end closes the connection;
/// returns how long after `started` (TCP connect) it did. An answer (CONNACK) is an error.
async fn drip(
    tls: TlsStream<TcpStream>,
    connect: &[u8],
    started: Instant,
) -> Result<Duration, String> {
    let (mut r, mut w) = tokio::io::split(tls);
    let read = async {
        let mut buf = [0u8; 64];
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => Ok(started.elapsed()),
            Ok(n) => Err(format!("the head-end answered {n} bytes")),
        }
    };
    let write = async {
        for byte in connect {
            tokio::time::sleep(DRIP).await;
            if w.write_all(&[*byte]).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        r = read => r,
        () = write => Err("unreachable".to_owned()),
        () = tokio::time::sleep(CONNECT_TIMEOUT + CLOSE_SLACK * 2) => {
            Err("still open".to_owned())
        }
    }
}

/// Waits until the head-end closes `tcp` (without sending anything meaningful); returns how
/// long after `started` it did.
async fn closed_within(tcp: &mut TcpStream, started: Instant) -> Result<Duration, String> {
    let mut buf = [0u8; 1024];
    let wait = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                // A TLS alert before the close is fine; keep reading until the close.
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT + CLOSE_SLACK * 2, wait)
        .await
        .map_err(|_| "still open".to_owned())
}

async fn join_all(mut set: JoinSet<Result<Duration, String>>) -> Vec<Result<Duration, String>> {
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap_or_else(|e| Err(format!("task: {e}"))));
    }
    out
}

/// How many closed within `limit`, the latest close, and the failures.
fn summarize(
    results: &[Result<Duration, String>],
    limit: Duration,
) -> (usize, Duration, Vec<String>) {
    let mut closed = 0;
    let mut latest = Duration::ZERO;
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(d) if *d <= limit => {
                closed += 1;
                latest = latest.max(*d);
            }
            Ok(d) => {
                latest = latest.max(*d);
                errors.push(format!("closed only after {:.1} s", d.as_secs_f64()));
            }
            Err(e) => errors.push(e.clone()),
        }
    }
    (closed, latest, errors)
}

fn describe_errors(errors: &[String]) -> String {
    match errors.first() {
        None => "no failures".to_owned(),
        Some(first) => format!("{} failed, e.g. {first}", errors.len()),
    }
}

/// The first flight of a TLS handshake as a client with `config` sends it.
fn client_hello(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<Vec<u8>, AttackError> {
    let mut conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| AttackError::Setup(format!("ClientHello: {e}")))?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello)
        .map_err(|e| AttackError::Setup(format!("ClientHello: {e}")))?;
    if hello.len() < 10 {
        return Err(AttackError::Setup("ClientHello too short".to_owned()));
    }
    Ok(hello)
}

// ---------------------------------------------------------------------------------------------
// Helpers (the `pub(super)` ones are shared with `malformed`)

/// A TCP connection to `addr` from `source` (like [`Ctx::tcp_from`], without borrowing the
/// context, for spawned tasks).
async fn tcp_from(source: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// TCP + TLS from `source` (for spawned tasks).
async fn tls_from(
    source: IpAddr,
    addr: SocketAddr,
    name: ServerName<'static>,
    config: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let tcp = tcp_from(source, addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

/// The head-end's server name.
fn server_name(ctx: &Ctx) -> Result<ServerName<'static>, AttackError> {
    ServerName::try_from(ctx.target.server_name.clone())
        .map_err(|e| AttackError::Setup(format!("server name: {e}")))
}

/// A client configuration of the Gridward TLS profile that trusts the target's CA but presents
/// no certificate: an outsider.
pub(crate) fn anonymous_config(ctx: &Ctx) -> Result<Arc<ClientConfig>, AttackError> {
    let root = ctx.target.pki_dir.join("ca/root.crt.pem");
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&root)
        .map_err(|e| AttackError::Setup(format!("{}: {e}", root.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| AttackError::Setup(format!("{}: {e}", root.display())))?;
        roots
            .add(cert)
            .map_err(|e| AttackError::Setup(format!("{}: {e}", root.display())))?;
    }
    let config = ClientConfig::builder_with_provider(gridward_pki::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| AttackError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether `e` came from `source`.
pub(super) fn from_source(e: &StoredSecurityEvent, source: IpAddr) -> bool {
    e.event
        .source
        .as_deref()
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .is_some_and(|a| a.ip() == source)
}

/// Whether `e` is about `meter`.
pub(super) fn about(e: &StoredSecurityEvent, meter: &str) -> bool {
    e.event
        .meter_id
        .as_ref()
        .is_some_and(|m| m.as_str() == meter)
}

/// Waits (up to [`EVENT_WAIT`]) until at least `want` events after `after` match `pred`;
/// returns the matching events (fewer if they did not come).
pub(super) async fn wait_events(
    ctx: &Ctx,
    after: i64,
    want: usize,
    pred: impl Fn(&StoredSecurityEvent) -> bool,
) -> Vec<StoredSecurityEvent> {
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        let found: Vec<_> = ctx
            .events_after(after)
            .into_iter()
            .filter(|e| pred(e))
            .collect();
        if found.len() >= want || tokio::time::Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_is_mqtts_varint() {
        assert_eq!(remaining_length(0), vec![0]);
        assert_eq!(remaining_length(127), vec![0x7f]);
        assert_eq!(remaining_length(128), vec![0x80, 0x01]);
        assert_eq!(remaining_length(1 << 20), vec![0x80, 0x80, 0x40]);
        assert_eq!(remaining_length(268_435_455), vec![0xff, 0xff, 0xff, 0x7f]);
        let frame = [vec![0x30], remaining_length(OVERSIZE_BYTES)].concat();
        assert!(matches!(
            codec::frame_len(&frame, 64 << 10),
            Err(codec::CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_floor_and_bound_judge_the_load() {
        let mut l = Load {
            before: 100.0,
            during: 85.0,
            seconds: 2.5,
            rss_before: Some(100 << 20),
            rss_peak: Some(110 << 20),
            rss_after: Some(105 << 20),
        };
        assert!(l.held(), "{}", l.describe());
        l.during = 70.0;
        assert!(!l.held());
        l.during = 100.0;
        l.rss_peak = Some(200 << 20);
        assert!(!l.held());
        l.before = 0.0;
        assert!(!l.held(), "no genuine traffic before proves nothing");
    }
}
