//! A simulated data concentrator: one MQTT/mTLS connection with its own certificate, and PLC
//! meters behind it that do not connect themselves.
//!
//! ```text
//!   PLC meter (crate::meter::Meter, own key and counter, topic AAD meters/{id}/readings|events)
//!        │ poll_publish: the envelope, byte for byte           (the meter stays "connected")
//!        ▼
//!   RelayQueue::push ─► batch of ≤ `max_items` (or after `linger`) ─► concentrators/{id}/relay
//!        PUBACK of a batch ─► every envelope in it acknowledged (Meter::on_puback, outbox done)
//!        disconnect         ─► batches in flight go back to the front, resent unchanged
//!   ConcentratorSigner ─► its own events (PowerFail, PowerRestore, MeterLost, MeterFound),
//!        signed with its key, meter-id header = its id, AAD concentrators/{id}/events
//! ```
//!
//! [`RelayQueue`] and [`ConcentratorSigner`] are sans-IO (`now` in, bytes out); the task that
//! drives them over MQTT is `crate::plc`, started by
//! [`Fleet::start_with`](crate::fleet::Fleet::start_with).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use gridward_core::MeterId;
use gridward_core::document::{ConcentratorEvent, ConcentratorEventKind, DocumentError, Format};
use gridward_core::envelope::{self, EnvelopeParams, SigningKey};
use gridward_core::relay::{self, MAX_RELAY_BYTES, MAX_RELAY_ITEMS, RelayItem};
use gridward_pki::tls::TlsOptions;
use rustls::ClientConfig;
use time::{Duration, OffsetDateTime};

use crate::counter::CounterBlock;
use crate::fleet::MeterSpec;
use crate::identity::{self, LoadError, MeterIdentity, Trust};
use crate::meter::{MessageKind, MeterError, Publish, whole_second};

/// Default most envelopes per relay batch.
pub const DEFAULT_BATCH: usize = 16;

/// Default time an envelope may wait for its batch to fill.
pub const DEFAULT_LINGER: Duration = Duration::milliseconds(200);

/// Default relay batches (and own events) in flight at once.
pub const DEFAULT_BATCHES_IN_FLIGHT: usize = 4;

/// Room left in a batch for its CBOR framing (array heads, byte-string heads).
const FRAMING: usize = 16;

/// How a concentrator batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayConfig {
    /// Most envelopes per batch (1..=[`MAX_RELAY_ITEMS`], clamped).
    pub max_items: usize,
    /// An envelope waits at most this long for its batch to fill.
    pub linger: Duration,
    /// Publishes (batches and own events) in flight at once on the connection.
    pub max_inflight: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            max_items: DEFAULT_BATCH,
            linger: DEFAULT_LINGER,
            max_inflight: DEFAULT_BATCHES_IN_FLIGHT,
        }
    }
}

/// An envelope a PLC meter handed to its concentrator: the meter's own publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The meter's index behind the concentrator.
    pub meter: usize,
    /// The meter's packet id for it (its PUBACK goes back to the meter under this id).
    pub packet_id: u16,
    /// The meter topic the envelope is bound to.
    pub topic: Arc<str>,
    /// The envelope, unchanged.
    pub envelope: Bytes,
    /// What it is (a misbehaviour is relayed once, never resent).
    pub kind: MessageKind,
}

impl Handover {
    /// The meter's publish `p`, from meter `meter`.
    pub fn of(meter: usize, p: &Publish) -> Self {
        Self {
            meter,
            packet_id: p.packet_id,
            topic: Arc::clone(&p.topic),
            envelope: p.payload.clone(),
            kind: p.kind,
        }
    }

    fn size(&self) -> usize {
        self.topic.len() + self.envelope.len() + FRAMING
    }
}

/// What an outgoing publish of a concentrator carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A relay batch of the PLC meters' envelopes (resent until acknowledged).
    Batch(Vec<Handover>),
    /// One of the concentrator's own events, with its counter (resent until acknowledged).
    Own {
        /// Its counter.
        counter: u64,
        /// What it reports.
        kind: OwnEventKind,
    },
    /// A deliberately bad relay batch (an altered envelope, a foreign meter's): sent once,
    /// never resent.
    Probe(ProbeKind),
}

impl Outgoing {
    fn is_genuine(&self) -> bool {
        !matches!(self, Self::Probe(_))
    }
}

/// Which deliberately bad relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// A copy of a relayed envelope with one byte flipped.
    Altered,
    /// An envelope of a meter not registered behind the concentrator.
    Foreign,
}

/// A PUBLISH a concentrator writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutPublish {
    /// Packet id on this connection.
    pub packet_id: u16,
    /// `concentrators/{id}/relay` or `concentrators/{id}/events`.
    pub topic: Arc<str>,
    /// The batch or the envelope.
    pub payload: Bytes,
    /// Whether it was written before, on an earlier connection.
    pub resend: bool,
    /// What it carries.
    pub what: Outgoing,
}

/// A publish held until acknowledged.
#[derive(Debug, Clone)]
struct Held {
    topic: Arc<str>,
    payload: Bytes,
    what: Outgoing,
    sends: u32,
}

/// The sans-IO batching and resend logic of a concentrator.
#[derive(Debug)]
pub struct RelayQueue {
    relay_topic: Arc<str>,
    config: RelayConfig,
    pending: Vec<Handover>,
    pending_bytes: usize,
    pending_since: Option<OffsetDateTime>,
    ready: VecDeque<Held>,
    inflight: VecDeque<(u16, Held)>,
    connected: bool,
    next_packet_id: u16,
}

impl RelayQueue {
    /// An empty queue publishing batches on `relay_topic`.
    pub fn new(relay_topic: impl Into<Arc<str>>, config: RelayConfig) -> Self {
        Self {
            relay_topic: relay_topic.into(),
            config: RelayConfig {
                max_items: config.max_items.clamp(1, MAX_RELAY_ITEMS),
                max_inflight: config.max_inflight.max(1),
                linger: config.linger.max(Duration::ZERO),
            },
            pending: Vec::new(),
            pending_bytes: 0,
            pending_since: None,
            ready: VecDeque::new(),
            inflight: VecDeque::new(),
            connected: false,
            next_packet_id: 1,
        }
    }

    /// Adds a PLC meter's envelope to the open batch at `now`; a full batch is closed.
    pub fn push(&mut self, h: Handover, now: OffsetDateTime) {
        if !self.pending.is_empty() && self.pending_bytes + h.size() > MAX_RELAY_BYTES - FRAMING {
            self.close_batch();
        }
        self.pending_bytes += h.size();
        self.pending.push(h);
        if self.pending_since.is_none() {
            self.pending_since = Some(now);
        }
        if self.pending.len() >= self.config.max_items {
            self.close_batch();
        }
    }

    /// Queues a publish of its own: an event envelope on `topic` (resent until acknowledged),
    /// or a probe batch (sent once).
    pub fn push_other(&mut self, topic: Arc<str>, payload: Bytes, what: Outgoing) {
        self.ready.push_back(Held {
            topic,
            payload,
            what,
            sends: 0,
        });
    }

    /// Closes the open batch if it waited `linger` by `now`.
    pub fn handle_timeout(&mut self, now: OffsetDateTime) {
        if self
            .pending_since
            .is_some_and(|since| now >= since + self.config.linger)
        {
            self.close_batch();
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) closes the open batch, if one is open.
    pub fn poll_timeout(&self) -> Option<OffsetDateTime> {
        self.pending_since.map(|since| since + self.config.linger)
    }

    /// Closes the open batch now (at the end of a run).
    pub fn flush(&mut self) {
        self.close_batch();
    }

    fn close_batch(&mut self) {
        self.pending_since = None;
        self.pending_bytes = 0;
        if self.pending.is_empty() {
            return;
        }
        let items = std::mem::take(&mut self.pending);
        let wire: Vec<RelayItem> = items
            .iter()
            .map(|h| RelayItem {
                topic: h.topic.to_string(),
                envelope: h.envelope.to_vec(),
            })
            .collect();
        let payload = Bytes::from(relay::encode_batch(&wire));
        self.ready.push_back(Held {
            topic: Arc::clone(&self.relay_topic),
            payload,
            what: Outgoing::Batch(items),
            sends: 0,
        });
    }

    /// The connection is up.
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.next_packet_id = 1;
    }

    /// The connection is gone: what is in flight goes back to the front, in order, to be resent
    /// unchanged (probes are dropped).
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        while let Some((_, h)) = self.inflight.pop_back() {
            if h.what.is_genuine() {
                self.ready.push_front(h);
            }
        }
    }

    /// The next PUBLISH to write, if connected and the window has room.
    pub fn poll_publish(&mut self) -> Option<OutPublish> {
        if !self.connected || self.inflight.len() >= self.config.max_inflight {
            return None;
        }
        let mut h = self.ready.pop_front()?;
        let packet_id = self.allocate_packet_id();
        let resend = h.sends > 0;
        h.sends = h.sends.saturating_add(1);
        let p = OutPublish {
            packet_id,
            topic: Arc::clone(&h.topic),
            payload: h.payload.clone(),
            resend,
            what: h.what.clone(),
        };
        self.inflight.push_back((packet_id, h));
        Some(p)
    }

    fn allocate_packet_id(&mut self) -> u16 {
        // The window is far below 65,535, so a free id is always found.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.inflight.iter().any(|(p, _)| *p == id) {
                return id;
            }
        }
    }

    /// A PUBACK: what it acknowledges (for a batch, every envelope in it, under the reason
    /// code of the batch), or `None` for a packet id not in flight.
    pub fn on_puback(&mut self, packet_id: u16) -> Option<Outgoing> {
        let pos = self.inflight.iter().position(|(p, _)| *p == packet_id)?;
        self.inflight.remove(pos).map(|(_, h)| h.what)
    }

    /// Envelopes and events held (open batch, ready, in flight).
    pub fn held(&self) -> usize {
        self.pending.len() + self.ready.len() + self.inflight.len()
    }

    /// Publishes in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether nothing waits for a batch to fill.
    pub fn pending_is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A concentrator event kind (the `EventType` of its event document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnEventKind {
    /// The concentrator lost power (last gasp).
    PowerFail,
    /// Its power is back.
    PowerRestore,
    /// These PLC meters no longer answer.
    MeterLost(Vec<MeterId>),
    /// These PLC meters answer again.
    MeterFound(Vec<MeterId>),
}

impl OwnEventKind {
    /// `PowerFail`, `PowerRestore`, `MeterLost`, `MeterFound`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::PowerFail => "PowerFail",
            Self::PowerRestore => "PowerRestore",
            Self::MeterLost(_) => "MeterLost",
            Self::MeterFound(_) => "MeterFound",
        }
    }

    fn meters(&self) -> &[MeterId] {
        match self {
            Self::MeterLost(m) | Self::MeterFound(m) => m,
            Self::PowerFail | Self::PowerRestore => &[],
        }
    }
}

/// The concentrator event document (JSON, `docs/wire-format.md` §11), e.g.
/// `{"ConcentratorID":"dc-1","Timestamp":"…","EventType":"MeterLost","Meters":["m1"]}`.
pub fn event_json(
    concentrator: &MeterId,
    ts: OffsetDateTime,
    kind: &OwnEventKind,
) -> Result<String, DocumentError> {
    let k = match kind {
        OwnEventKind::PowerFail => ConcentratorEventKind::PowerFail,
        OwnEventKind::PowerRestore => ConcentratorEventKind::PowerRestore,
        OwnEventKind::MeterLost(_) => ConcentratorEventKind::MeterLost,
        OwnEventKind::MeterFound(_) => ConcentratorEventKind::MeterFound,
    };
    let e = ConcentratorEvent::new(
        concentrator.clone(),
        whole_second(ts),
        k,
        kind.meters().to_vec(),
    )?;
    Ok(e.to_json())
}

/// The concentrator's own signer: its key and counter, its events topic.
pub struct ConcentratorSigner {
    id: MeterId,
    key: SigningKey,
    counter: CounterBlock,
    block: u64,
    reservation_pending: Option<u64>,
    events_topic: Arc<str>,
    relay_topic: Arc<str>,
}

impl std::fmt::Debug for ConcentratorSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcentratorSigner")
            .field("id", &self.id)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl ConcentratorSigner {
    /// A signer for concentrator `id` resuming with `counter`, reserving `block` counters a time.
    pub fn new(id: MeterId, key: SigningKey, counter: CounterBlock, block: u64) -> Self {
        Self {
            events_topic: relay::concentrator_events_topic(&id).into(),
            relay_topic: relay::relay_topic(&id).into(),
            id,
            key,
            counter,
            block,
            reservation_pending: None,
        }
    }

    /// The concentrator id.
    pub fn id(&self) -> &MeterId {
        &self.id
    }

    /// `concentrators/{id}/events`.
    pub fn events_topic(&self) -> &Arc<str> {
        &self.events_topic
    }

    /// `concentrators/{id}/relay`.
    pub fn relay_topic(&self) -> &Arc<str> {
        &self.relay_topic
    }

    /// Signs `kind` at `now`: `Ok(None)` when no counter is left (persist
    /// [`counter_reservation`](Self::counter_reservation) first).
    pub fn sign(
        &mut self,
        now: OffsetDateTime,
        kind: &OwnEventKind,
    ) -> Result<Option<(u64, Bytes)>, MeterError> {
        // A document that cannot be built uses no counter.
        let ts = whole_second(now);
        let body = event_json(&self.id, ts, kind)?;
        let Ok(counter) = self.counter.take() else {
            return Ok(None);
        };
        let params = EnvelopeParams {
            meter_id: &self.id,
            counter,
            timestamp: ts.unix_timestamp(),
            content_type: Format::Json,
            topic: &self.events_topic,
        };
        let env = envelope::sign(&self.key, &params, body.as_bytes()).map_err(MeterError::Sign)?;
        Ok(Some((counter, Bytes::from(env))))
    }

    /// A new high-water mark to persist, if half the block is used and none is pending.
    pub fn counter_reservation(&mut self) -> Option<u64> {
        if self.reservation_pending.is_some() || !self.counter.wants_reservation(self.block) {
            return None;
        }
        let mark = self.counter.reservation(self.block);
        self.reservation_pending = Some(mark);
        Some(mark)
    }

    /// `mark` is persisted (`ok`), or persisting it failed.
    pub fn reservation_done(&mut self, mark: u64, ok: bool) {
        if ok {
            self.counter.granted(mark);
        }
        if self.reservation_pending.is_some_and(|p| p <= mark) || !ok {
            self.reservation_pending = None;
        }
    }
}

/// `envelope` with one byte flipped: the last one, part of the signature, so the envelope still
/// decodes but no longer verifies.
pub fn alter(envelope: &[u8]) -> Bytes {
    let mut out = envelope.to_vec();
    if let Some(x) = out.last_mut() {
        *x ^= 0x01;
    }
    Bytes::from(out)
}

/// A concentrator ready to connect and sign: id, TLS client configuration, envelope key.
pub struct ConcentratorIdentity {
    id: MeterId,
    client_config: Arc<ClientConfig>,
    signing_key: SigningKey,
}

impl std::fmt::Debug for ConcentratorIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcentratorIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ConcentratorIdentity {
    /// Loads concentrator `id` from `DIR/concentrators/{id}/` (chain.pem, key.pem), checking
    /// that the certificate identifies concentrator `id`.
    pub fn load(
        pki_dir: &Path,
        id: &MeterId,
        trust: &Trust,
        opts: &TlsOptions,
    ) -> Result<Self, LoadError> {
        let dir = pki_dir.join("concentrators").join(id.as_str());
        let (client_config, signing_key) = identity::load_concentrator(
            id,
            &dir.join("chain.pem"),
            &dir.join("key.pem"),
            trust,
            opts,
        )?;
        Ok(Self {
            id: id.clone(),
            client_config,
            signing_key,
        })
    }

    /// The concentrator id (certified by its certificate; its MQTT ClientID).
    pub fn id(&self) -> &MeterId {
        &self.id
    }

    /// Splits into id, TLS configuration and signing key.
    pub fn into_parts(self) -> (MeterId, Arc<ClientConfig>, SigningKey) {
        (self.id, self.client_config, self.signing_key)
    }
}

/// A PLC meter the concentrator stops hearing `after` the start, for `duration` (`None`: for
/// the rest of the run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlcLoss {
    /// The PLC meter.
    pub meter: MeterId,
    /// When, from the start of the fleet.
    pub after: std::time::Duration,
    /// For how long.
    pub duration: Option<std::time::Duration>,
}

/// A meter not registered behind the concentrator, whose envelope it relays once (to prove
/// the head-end refuses it).
#[derive(Debug)]
pub struct ForeignRelay {
    /// The foreign meter's identity (the concentrator process holds its key: a simulation).
    pub identity: MeterIdentity,
    /// When, from the start of the fleet.
    pub after: std::time::Duration,
}

/// A concentrator of a fleet ([`Fleet::start_with`](crate::fleet::Fleet::start_with)).
#[derive(Debug)]
pub struct ConcentratorSpec {
    /// Its identity.
    pub identity: ConcentratorIdentity,
    /// The PLC meters behind it (they never connect themselves).
    pub meters: Vec<MeterSpec>,
    /// Batching.
    pub relay: RelayConfig,
    /// PLC meters it loses for a while (reported as MeterLost, then MeterFound).
    pub plc_losses: Vec<PlcLoss>,
    /// Relay, this long after the start, a copy of a relayed envelope with one byte flipped.
    pub alter_relay_after: Option<std::time::Duration>,
    /// Relay an envelope of a meter not behind it.
    pub relay_for: Option<ForeignRelay>,
}

impl ConcentratorSpec {
    /// A well-behaved concentrator with default batching.
    pub fn new(identity: ConcentratorIdentity, meters: Vec<MeterSpec>) -> Self {
        Self {
            identity,
            meters,
            relay: RelayConfig::default(),
            plc_losses: Vec::new(),
            alter_relay_after: None,
            relay_for: None,
        }
    }
}

macro_rules! concentrator_counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters of one concentrator.
        #[derive(Debug, Default)]
        pub struct ConcentratorStats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A plain copy of [`ConcentratorStats`] at one instant.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct ConcentratorSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl ConcentratorStats {
            /// Reads every counter.
            pub fn snapshot(&self) -> ConcentratorSnapshot {
                ConcentratorSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

concentrator_counters! {
    /// Whether the concentrator is connected now (a gauge, 0 or 1).
    connected,
    /// Successful connections.
    connects,
    /// Connection attempts that failed.
    connect_failures,
    /// Established connections that were lost.
    disconnects,
    /// Envelopes handed over by the PLC meters.
    envelopes_relayed,
    /// Relay batches written (first sends and resends).
    batches_sent,
    /// Relay batches written again after a reconnect.
    batches_resent,
    /// Relay batches acknowledged with success.
    batches_acked,
    /// Relay batches refused (PUBACK with a failure reason code).
    batches_refused,
    /// Envelopes in acknowledged batches.
    envelopes_acked,
    /// Envelopes in refused batches.
    envelopes_refused,
    /// Own events signed.
    own_events,
    /// Own events acknowledged with success.
    own_acked,
    /// Own events refused.
    own_refused,
    /// Deliberately bad relays (altered, foreign) sent.
    probes_sent,
    /// Deliberately bad relays refused.
    probes_refused,
    /// Deliberately bad relays acknowledged with success.
    probes_acked,
}

/// What a concentrator did, at the end of a run.
#[derive(Debug, Clone)]
pub struct ConcentratorOutcome {
    /// The concentrator.
    pub id: MeterId,
    /// Its counters.
    pub stats: ConcentratorSnapshot,
    /// Its PLC meters.
    pub meters: Vec<crate::fleet::MeterOutcome>,
    /// Envelopes and events still unacknowledged at the end.
    pub held: usize,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use time::macros::datetime;

    use super::*;

    const T0: OffsetDateTime = datetime!(2026-12-03 10:00 UTC);

    fn h(meter: usize, packet_id: u16, n: u8) -> Handover {
        Handover {
            meter,
            packet_id,
            topic: Arc::from(format!("meters/m{meter}/readings")),
            envelope: Bytes::from(vec![n; 40]),
            kind: MessageKind::Reading,
        }
    }

    fn queue(max_items: usize) -> RelayQueue {
        RelayQueue::new(
            "concentrators/dc-1/relay",
            RelayConfig {
                max_items,
                linger: Duration::milliseconds(200),
                max_inflight: 2,
            },
        )
    }

    fn items(p: &OutPublish) -> Vec<RelayItem> {
        relay::decode_batch(&p.payload).unwrap()
    }

    #[test]
    fn a_full_batch_closes_at_once_a_partial_one_after_the_linger() {
        let mut q = queue(3);
        q.on_connected();
        for i in 0..4 {
            q.push(h(i, 1, i as u8), T0);
        }
        let p = q.poll_publish().unwrap();
        assert_eq!(&*p.topic, "concentrators/dc-1/relay");
        let it = items(&p);
        assert_eq!(it.len(), 3);
        assert_eq!(it[1].topic, "meters/m1/readings");
        assert_eq!(it[1].envelope, vec![1u8; 40]);
        // The fourth waits for the linger.
        assert_eq!(q.poll_publish(), None);
        assert_eq!(q.poll_timeout(), Some(T0 + Duration::milliseconds(200)));
        q.handle_timeout(T0 + Duration::milliseconds(199));
        assert_eq!(q.poll_publish(), None);
        q.handle_timeout(T0 + Duration::milliseconds(200));
        let p2 = q.poll_publish().unwrap();
        assert_eq!(items(&p2).len(), 1);
        assert_eq!(q.poll_timeout(), None);
        // A PUBACK acknowledges every envelope of its batch, under the meters' packet ids.
        let Some(Outgoing::Batch(acked)) = q.on_puback(p.packet_id) else {
            panic!()
        };
        assert_eq!(
            acked
                .iter()
                .map(|a| (a.meter, a.packet_id))
                .collect::<Vec<_>>(),
            [(0, 1), (1, 1), (2, 1)]
        );
        assert_eq!(q.on_puback(p.packet_id), None);
        assert_eq!(q.held(), 1);
    }

    #[test]
    fn unacknowledged_batches_are_resent_unchanged_after_a_reconnect() {
        let mut q = queue(2);
        for i in 0..6 {
            q.push(h(0, i + 1, i as u8), T0);
        }
        assert_eq!(q.poll_publish(), None); // not connected
        q.on_connected();
        let first: Vec<OutPublish> = std::iter::from_fn(|| q.poll_publish()).collect();
        assert_eq!(first.len(), 2); // the window
        q.on_puback(first[1].packet_id).unwrap();
        q.on_disconnected();
        q.on_connected();
        let again: Vec<OutPublish> = std::iter::from_fn(|| q.poll_publish()).collect();
        assert_eq!(again.len(), 2);
        assert!(again[0].resend && !again[1].resend);
        assert_eq!(again[0].payload, first[0].payload);
        let envs: Vec<u8> = items(&again[1]).iter().map(|i| i.envelope[0]).collect();
        assert_eq!(envs, [4, 5]);
    }

    #[test]
    fn probes_go_once_and_own_events_are_resent() {
        let mut q = queue(4);
        let ev: Arc<str> = Arc::from("concentrators/dc-1/events");
        q.push_other(
            Arc::clone(&ev),
            Bytes::from_static(b"own"),
            Outgoing::Own {
                counter: 7,
                kind: OwnEventKind::PowerFail,
            },
        );
        q.push_other(
            Arc::from("concentrators/dc-1/relay"),
            Bytes::from_static(b"probe"),
            Outgoing::Probe(ProbeKind::Altered),
        );
        q.on_connected();
        assert_eq!(std::iter::from_fn(|| q.poll_publish()).count(), 2);
        q.on_disconnected();
        q.on_connected();
        let again: Vec<OutPublish> = std::iter::from_fn(|| q.poll_publish()).collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].topic, ev);
        assert!(again[0].resend);
    }

    #[test]
    fn batches_stay_below_the_size_limit() {
        let mut q = queue(64);
        q.on_connected();
        for i in 0..10u16 {
            q.push(
                Handover {
                    envelope: Bytes::from(vec![0u8; 60 * 1024]),
                    ..h(0, i + 1, 0)
                },
                T0,
            );
        }
        q.flush();
        let mut sizes = Vec::new();
        while let Some(p) = q.poll_publish() {
            assert!(p.payload.len() <= MAX_RELAY_BYTES);
            sizes.push(items(&p).len());
            q.on_puback(p.packet_id);
        }
        assert_eq!(sizes, [4, 4, 2]);
    }

    #[test]
    fn own_events_are_signed_for_the_events_topic() {
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        let key = SigningKey::from_pkcs8_der(pkcs8.as_ref()).unwrap();
        let vk = key.verifying_key().unwrap();
        let id = MeterId::new("dc-1").unwrap();
        let mut s = ConcentratorSigner::new(id.clone(), key, CounterBlock::resume(None), 4);
        let lost = OwnEventKind::MeterLost(vec![MeterId::new("m1").unwrap()]);
        assert_eq!(s.sign(T0, &lost).unwrap(), None); // no counter yet
        let mark = s.counter_reservation().unwrap();
        assert_eq!(s.counter_reservation(), None);
        s.reservation_done(mark, true);
        let (counter, env) = s.sign(T0, &lost).unwrap().unwrap();
        assert_eq!(counter, 1);
        let v = envelope::verify(&env, &vk, &id, "concentrators/dc-1/events").unwrap();
        assert_eq!(v.header().counter, 1);
        let body: serde_json::Value = serde_json::from_slice(v.payload()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"ConcentratorID":"dc-1","Timestamp":"2026-12-03T10:00:00Z",
                "EventType":"MeterLost","Meters":["m1"]})
        );
        let power = event_json(&id, T0, &OwnEventKind::PowerFail).unwrap();
        assert!(power.contains(r#""EventType":"PowerFail""#));
        // Meters are required for MeterLost: refused without using a counter.
        assert!(s.sign(T0, &OwnEventKind::MeterLost(Vec::new())).is_err());
        assert_eq!(s.sign(T0, &lost).unwrap().unwrap().0, 2);
        // An altered envelope no longer verifies.
        let bad = alter(&env);
        assert_eq!(bad.len(), env.len());
        assert!(envelope::verify(&bad, &vk, &id, "concentrators/dc-1/events").is_err());
    }
}
