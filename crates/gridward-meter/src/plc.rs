//! The IO around a concentrator: one tokio task, one MQTT/TLS connection (ClientID = its id),
//! the PLC meters behind it driven in the same task.
//!
//! ```text
//!  loop { every PLC meter: handle_timeout(now) ─► take_new ─► outbox ─► poll_publish ─►
//!           RelayQueue::push (unless the meter is lost or the concentrator unpowered)
//!         own events ─► ConcentratorSigner::sign ─► RelayQueue::push_other
//!         RelayQueue::poll_publish ─► PUBLISH (QoS 1) on concentrators/{id}/relay | events
//!         PUBACK ─► RelayQueue::on_puback ─► each envelope's Meter::on_puback, outbox done
//!         disconnect ─► RelayQueue::on_disconnected (resend after the reconnect) }
//! ```
//!
//! A PLC meter never sees the MQTT connection: for it, the concentrator is its link, always up;
//! what it handed over stays in its in-flight window until the batch's PUBACK.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gridward_core::MeterId;
use gridward_core::relay::{self, RelayItem};
use gridward_mqtt::client::{
    self, ClientError, ClientOptions, ClientReader, ClientWriter, Packet, QoS,
};
use rustls::ClientConfig;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::concentrator::{
    ConcentratorOutcome, ConcentratorSigner, ConcentratorStats, Handover, Outgoing, OwnEventKind,
    ProbeKind, RelayConfig, RelayQueue, alter,
};
use crate::fleet::{
    ConcControl, Control, FAR, MeterOutcome, Phase, Reservation, Shared, Truth, WRITE_TIMEOUT,
    instant_of,
};
use crate::meter::Meter;
use crate::outbox::OutboxEntry;
use crate::scenario::GroundTruth;

/// Everything a concentrator task is started with.
pub(crate) struct ConcentratorTask {
    pub(crate) signer: ConcentratorSigner,
    pub(crate) meters: Vec<Meter>,
    pub(crate) foreign: Option<Meter>,
    pub(crate) relay: RelayConfig,
    pub(crate) tls: Arc<ClientConfig>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stats: Arc<ConcentratorStats>,
    pub(crate) controls: mpsc::UnboundedReceiver<ConcControl>,
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) connect_at: Instant,
    pub(crate) give_up_after: Option<u32>,
    pub(crate) truth: Arc<Mutex<Truth>>,
}

struct Plc {
    m: Meter,
    lost: bool,
    grant_pending: bool,
}

struct CConn {
    reader: ClientReader,
    writer: ClientWriter,
    last_read: Instant,
    last_write: Instant,
}

/// A counter grant: for a PLC meter (its index) or the concentrator itself (`None`).
type Grant = (Option<usize>, u64, bool);

enum Wake {
    Timer,
    Packet(Result<Packet, ClientError>),
    Control(Option<ConcControl>),
    Granted(Option<Grant>),
    Phase,
}

async fn next_packet(conn: &mut Option<CConn>) -> Result<Packet, ClientError> {
    match conn {
        Some(c) => c.reader.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_control(
    rx: &mut mpsc::UnboundedReceiver<ConcControl>,
    open: bool,
) -> Option<ConcControl> {
    if open {
        rx.recv().await
    } else {
        std::future::pending().await
    }
}

/// Asks the counter service to persist `mark` for `meter`; the answer arrives on `grants`.
fn reserve(
    sh: &Shared,
    meter: &MeterId,
    who: Option<usize>,
    mark: u64,
    grants: &mpsc::UnboundedSender<Grant>,
) -> bool {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let req = Reservation {
        meter: meter.clone(),
        mark: Some(mark),
        device: None,
        reply: tx,
    };
    if sh.reservations.send(req).is_err() {
        return false;
    }
    let grants = grants.clone();
    tokio::spawn(async move {
        let ok = rx.await.unwrap_or(false);
        let _ = grants.send((who, mark, ok));
    });
    true
}

pub(crate) async fn run_concentrator(t: ConcentratorTask) -> ConcentratorOutcome {
    let ConcentratorTask {
        mut signer,
        meters,
        mut foreign,
        relay,
        tls,
        shared: sh,
        stats: cs,
        controls: mut controls_rx,
        mut phase,
        connect_at,
        give_up_after,
        truth,
    } = t;
    let fs = &sh.stats;
    let cid = signer.id().clone();
    let index: HashMap<MeterId, usize> = meters
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id().clone(), i))
        .collect();
    let mut plcs: Vec<Plc> = meters
        .into_iter()
        .map(|mut m| {
            // The PLC link is always up: what the meter hands over stays in its window until
            // the concentrator's batch is acknowledged.
            m.on_connected();
            Plc {
                m,
                lost: false,
                grant_pending: false,
            }
        })
        .collect();
    let (grant_tx, mut grant_rx) = mpsc::unbounded_channel::<Grant>();
    let mut own_grant_pending = false;
    let mut q = RelayQueue::new(Arc::clone(signer.relay_topic()), relay);
    let mut own_due: VecDeque<OwnEventKind> = VecDeque::new();
    let mut powered = true;
    let mut alter_pending = false;
    let mut foreign_pending = false;
    let mut last_handover: Option<Handover> = None;
    let mut conn: Option<CConn> = None;
    let mut retry_at = connect_at;
    let mut backoff = Backoff::new(sh.backoff_base, sh.backoff_cap);
    let mut controls_open = true;
    let (ping_after, dead_after) = if sh.keep_alive.is_zero() {
        (FAR, FAR)
    } else {
        (
            (sh.keep_alive / 2).max(Duration::from_millis(100)),
            sh.keep_alive.saturating_mul(3) / 2,
        )
    };

    loop {
        let current = *phase.borrow();
        if current == Phase::Stop {
            break;
        }
        let draining = current == Phase::Draining;
        let now = (sh.clock)();

        // 1. The PLC meters produce what is due; signed messages are on disk before relaying.
        for (i, p) in plcs.iter_mut().enumerate() {
            if !draining {
                match p.m.handle_timeout(now) {
                    Ok(out) => {
                        fs.readings
                            .fetch_add(u64::from(out.readings), Ordering::Relaxed);
                        fs.events
                            .fetch_add(u64::from(out.events), Ordering::Relaxed);
                        fs.skipped
                            .fetch_add(u64::from(out.skipped), Ordering::Relaxed);
                    }
                    Err(_) => {
                        fs.sign_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            record_new(&mut p.m, &sh);
            if !p.grant_pending
                && let Some(mark) = p.m.counter_reservation()
            {
                if reserve(&sh, p.m.id(), Some(i), mark, &grant_tx) {
                    p.grant_pending = true;
                } else {
                    p.m.reservation_failed();
                }
            }
        }
        // The concentrator's own events.
        while let Some(kind) = own_due.front() {
            match signer.sign(now, kind) {
                Ok(Some((counter, env))) => {
                    let kind = own_due.pop_front().unwrap_or(OwnEventKind::PowerRestore);
                    q.push_other(
                        Arc::clone(signer.events_topic()),
                        env,
                        Outgoing::Own { counter, kind },
                    );
                    cs.own_events.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => break,
                Err(_) => {
                    own_due.pop_front();
                    fs.sign_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !own_grant_pending && let Some(mark) = signer.counter_reservation() {
            if reserve(&sh, &cid, None, mark, &grant_tx) {
                own_grant_pending = true;
            } else {
                signer.reservation_done(mark, false);
            }
        }

        // 2. Hand over what the reachable meters publish.
        if powered {
            for (i, p) in plcs.iter_mut().enumerate() {
                if p.lost {
                    continue;
                }
                while let Some(pb) = p.m.poll_publish() {
                    let h = Handover::of(i, &pb);
                    cs.envelopes_relayed.fetch_add(1, Ordering::Relaxed);
                    if !pb.kind.is_genuine() {
                        fs.misbehaviour_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    last_handover = Some(h.clone());
                    q.push(h, now);
                }
            }
        }
        if alter_pending && let Some(h) = &last_handover {
            alter_pending = false;
            let item = RelayItem {
                topic: h.topic.to_string(),
                envelope: alter(&h.envelope).to_vec(),
            };
            q.push_other(
                Arc::clone(signer.relay_topic()),
                Bytes::from(relay::encode_batch(&[item])),
                Outgoing::Probe(ProbeKind::Altered),
            );
            if let (Ok(mut t), Some(p)) = (truth.lock(), plcs.get(h.meter)) {
                t.push(GroundTruth::AlteredRelay {
                    concentrator: cid.clone(),
                    meter: p.m.id().clone(),
                    at: now,
                });
            }
        }
        if foreign_pending && let Some(f) = foreign.as_mut() {
            foreign_pending = false;
            f.device.read_now = true;
            f.on_connected();
            let made = f.handle_timeout(now).is_ok();
            if let (true, Some(pb)) = (made, f.poll_publish()) {
                let item = RelayItem {
                    topic: pb.topic.to_string(),
                    envelope: pb.payload.to_vec(),
                };
                q.push_other(
                    Arc::clone(signer.relay_topic()),
                    Bytes::from(relay::encode_batch(&[item])),
                    Outgoing::Probe(ProbeKind::Foreign),
                );
                if let Ok(mut t) = truth.lock() {
                    t.push(GroundTruth::UnauthorizedRelay {
                        concentrator: cid.clone(),
                        meter: f.id().clone(),
                        at: now,
                    });
                }
            }
        }
        q.handle_timeout(now);
        if draining {
            q.flush();
            let idle = plcs.iter().all(|p| p.lost || p.m.held() == 0);
            if idle && q.held() == 0 && own_due.is_empty() {
                break;
            }
        }

        // 3. Connect when it is time.
        if conn.is_none() && Instant::now() >= retry_at {
            let opts = ClientOptions {
                client_id: cid.to_string(),
                keep_alive: sh.keep_alive,
                clean_session: true,
                protocol: sh.protocol,
                connect_timeout: sh.connect_timeout,
            };
            let attempt = Box::pin(client::connect_tls(
                sh.addr,
                &sh.server_name,
                Arc::clone(&tls),
                &opts,
            ));
            let result = tokio::select! {
                r = attempt => Some(r),
                _ = phase.wait_for(|p| *p == Phase::Stop) => None,
            };
            match result {
                None => break,
                Some(Ok((client, _ack))) => {
                    let (reader, writer) = client.into_split();
                    q.on_connected();
                    let now = Instant::now();
                    conn = Some(CConn {
                        reader,
                        writer,
                        last_read: now,
                        last_write: now,
                    });
                    backoff.reset();
                    cs.connects.fetch_add(1, Ordering::Relaxed);
                    cs.connected.store(1, Ordering::Relaxed);
                }
                Some(Err(_)) => {
                    cs.connect_failures.fetch_add(1, Ordering::Relaxed);
                    if give_up_after.is_some_and(|n| backoff.failures().saturating_add(1) >= n) {
                        break;
                    }
                    retry_at = Instant::now() + backoff.next_delay(&mut rand::thread_rng());
                }
            }
            continue;
        }

        // 4. Write what may be written.
        let mut lost = false;
        if let Some(c) = conn.as_mut() {
            let mut wrote = false;
            while let Some(p) = q.poll_publish() {
                if c.writer
                    .queue_publish(&p.topic, p.payload.clone(), QoS::AtLeastOnce, p.packet_id)
                    .is_err()
                {
                    lost = true;
                    break;
                }
                match &p.what {
                    Outgoing::Batch(_) => {
                        cs.batches_sent.fetch_add(1, Ordering::Relaxed);
                        if p.resend {
                            cs.batches_resent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Outgoing::Probe(_) => {
                        cs.probes_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Outgoing::Own { .. } => {}
                }
                wrote = true;
            }
            if wrote && !lost {
                let flushed = tokio::time::timeout(WRITE_TIMEOUT, c.writer.flush()).await;
                if flushed.is_ok_and(|r| r.is_ok()) {
                    c.last_write = Instant::now();
                } else {
                    lost = true;
                }
            }
        }

        // 5. Wait for the next thing to happen.
        if !lost {
            let mut wake_wall = q.poll_timeout();
            if !draining {
                for p in &plcs {
                    let t = p.m.poll_timeout();
                    wake_wall = Some(wake_wall.map_or(t, |w| w.min(t)));
                }
            }
            let mut wake_at = match wake_wall {
                Some(t) => instant_of(t, &sh.clock),
                None => Instant::now() + FAR,
            };
            match &conn {
                None => wake_at = wake_at.min(retry_at),
                Some(c) => {
                    wake_at = wake_at
                        .min(c.last_write + ping_after)
                        .min(c.last_read + dead_after);
                }
            }
            if draining {
                // Re-check the drain condition now and then.
                wake_at = wake_at.min(Instant::now() + Duration::from_millis(100));
            }
            let wake = tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => Wake::Timer,
                p = next_packet(&mut conn) => Wake::Packet(p),
                c = next_control(&mut controls_rx, controls_open) => Wake::Control(c),
                g = grant_rx.recv() => Wake::Granted(g),
                r = phase.changed() => {
                    if r.is_err() {
                        break;
                    }
                    Wake::Phase
                }
            };
            match wake {
                Wake::Timer => {
                    if let Some(c) = conn.as_mut() {
                        let now = Instant::now();
                        if now >= c.last_read + dead_after {
                            lost = true;
                        } else if now >= c.last_write + ping_after {
                            let pinged = tokio::time::timeout(WRITE_TIMEOUT, c.writer.ping()).await;
                            if pinged.is_ok_and(|r| r.is_ok()) {
                                c.last_write = Instant::now();
                            } else {
                                lost = true;
                            }
                        }
                    }
                }
                Wake::Packet(Ok(packet)) => {
                    if let Some(c) = conn.as_mut() {
                        c.last_read = Instant::now();
                        match packet {
                            Packet::PubAck { pkid, reason_code } => {
                                on_puback(&mut q, &mut plcs, &sh, &cs, pkid, reason_code);
                            }
                            Packet::Publish { qos, pkid, .. } => {
                                fs.unexpected_publishes.fetch_add(1, Ordering::Relaxed);
                                if qos == QoS::AtLeastOnce {
                                    let acked =
                                        tokio::time::timeout(WRITE_TIMEOUT, c.writer.puback(pkid))
                                            .await;
                                    if !acked.is_ok_and(|r| r.is_ok()) {
                                        lost = true;
                                    }
                                }
                            }
                            Packet::Disconnect { .. } => lost = true,
                            _ => {}
                        }
                    }
                }
                Wake::Packet(Err(_)) => lost = true,
                Wake::Control(Some(c)) => {
                    let now = (sh.clock)();
                    match c {
                        ConcControl::Meter(id, control) => {
                            if let Some(p) = index.get(&id).and_then(|&i| plcs.get_mut(i)) {
                                match control {
                                    Control::Event(kind) => p.m.request_event(kind),
                                    Control::Theft(kind, share) => {
                                        p.m.start_bypass(now, Some(kind), share);
                                    }
                                    Control::PowerFail => p.m.power_fail(now),
                                    Control::PowerRestore => p.m.power_restore(now),
                                    // Commands do not reach PLC meters in this simulation.
                                    Control::Command(..) | Control::Chunk(_) => {
                                        fs.unexpected_publishes.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        ConcControl::Own(Control::PowerFail) => {
                            if powered {
                                powered = false;
                                own_due.push_back(OwnEventKind::PowerFail);
                            }
                        }
                        ConcControl::Own(Control::PowerRestore) => {
                            if !powered {
                                powered = true;
                                own_due.push_back(OwnEventKind::PowerRestore);
                            }
                        }
                        ConcControl::Own(_) => {}
                        ConcControl::Plc(id, lose) => {
                            if let Some(p) = index.get(&id).and_then(|&i| plcs.get_mut(i))
                                && p.lost != lose
                            {
                                p.lost = lose;
                                own_due.push_back(if lose {
                                    OwnEventKind::MeterLost(vec![id])
                                } else {
                                    OwnEventKind::MeterFound(vec![id])
                                });
                            }
                        }
                        ConcControl::Alter => alter_pending = true,
                        ConcControl::RelayFor => foreign_pending = foreign.is_some(),
                    }
                }
                Wake::Control(None) => controls_open = false,
                Wake::Granted(Some((who, mark, ok))) => match who {
                    Some(i) => {
                        if let Some(p) = plcs.get_mut(i) {
                            p.grant_pending = false;
                            if ok {
                                p.m.counters_granted(mark);
                            } else {
                                p.m.reservation_failed();
                            }
                        }
                    }
                    None => {
                        own_grant_pending = false;
                        signer.reservation_done(mark, ok);
                    }
                },
                Wake::Granted(None) | Wake::Phase => {}
            }
        }
        if lost {
            conn = None;
            q.on_disconnected();
            cs.connected.store(0, Ordering::Relaxed);
            cs.disconnects.fetch_add(1, Ordering::Relaxed);
            retry_at = Instant::now() + backoff.next_delay(&mut rand::thread_rng());
        }
    }

    if let Some(mut c) = conn.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.writer.disconnect()).await;
        cs.connected.store(0, Ordering::Relaxed);
    }
    ConcentratorOutcome {
        id: cid,
        stats: cs.snapshot(),
        held: q.held(),
        meters: plcs
            .into_iter()
            .map(|p| MeterOutcome {
                id: p.m.id().clone(),
                counts: p.m.counts(),
                held: p.m.held(),
                gave_up: false,
            })
            .collect(),
    }
}

/// Records `m`'s newly signed genuine messages in the outbox before they are relayed.
fn record_new(m: &mut Meter, sh: &Shared) {
    let new: Vec<(u64, Arc<str>, Bytes)> = m
        .take_new()
        .map(|msg| (msg.counter, Arc::clone(&msg.topic), msg.envelope.clone()))
        .collect();
    if new.is_empty() {
        return;
    }
    let Some(ob) = &sh.outbox else {
        return;
    };
    let recorded = ob.lock().map_err(|_| ()).and_then(|mut o| {
        new.into_iter().try_for_each(|(counter, topic, envelope)| {
            let entry = OutboxEntry {
                meter: m.id().clone(),
                counter,
                topic: topic.to_string(),
                envelope,
            };
            o.record_sent(&entry).map_err(|_| ())
        })
    });
    if recorded.is_err() {
        sh.stats.state_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// A PUBACK on the concentrator's connection: a batch's acknowledges every envelope in it.
fn on_puback(
    q: &mut RelayQueue,
    plcs: &mut [Plc],
    sh: &Shared,
    cs: &ConcentratorStats,
    pkid: u16,
    reason_code: u8,
) {
    let fs = &sh.stats;
    let accepted = reason_code < 0x80;
    match q.on_puback(pkid) {
        None => {
            fs.unexpected_acks.fetch_add(1, Ordering::Relaxed);
        }
        Some(Outgoing::Batch(items)) => {
            let n = items.len() as u64;
            if accepted {
                cs.batches_acked.fetch_add(1, Ordering::Relaxed);
                cs.envelopes_acked.fetch_add(n, Ordering::Relaxed);
            } else {
                cs.batches_refused.fetch_add(1, Ordering::Relaxed);
                cs.envelopes_refused.fetch_add(n, Ordering::Relaxed);
            }
            for h in items {
                let Some(p) = plcs.get_mut(h.meter) else {
                    continue;
                };
                let Some(acked) = p.m.on_puback(h.packet_id, reason_code) else {
                    fs.unexpected_acks.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let kind = acked.message.kind;
                if !kind.is_genuine() {
                    let c = if acked.accepted() {
                        &fs.misbehaviour_acked
                    } else {
                        &fs.misbehaviour_rejected
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let c = if acked.accepted() {
                    &fs.acked
                } else {
                    &fs.rejected
                };
                c.fetch_add(1, Ordering::Relaxed);
                if let Some(ob) = &sh.outbox {
                    let done = ob.lock().map_err(|_| ()).and_then(|mut o| {
                        o.record_done(p.m.id(), acked.message.counter)
                            .map_err(|_| ())
                    });
                    if done.is_err() {
                        fs.state_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Some(Outgoing::Own { .. }) => {
            let c = if accepted {
                &cs.own_acked
            } else {
                &cs.own_refused
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
        Some(Outgoing::Probe(_)) => {
            let c = if accepted {
                &cs.probes_acked
            } else {
                &cs.probes_refused
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}
