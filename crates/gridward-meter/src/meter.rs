//! One simulated meter as a state machine: `now` in, signed messages and packet ids out.
//!
//! Nothing here touches a socket, a file or the clock (signing draws randomness, nothing else):
//! the caller drives it.
//!
//! ```text
//!   handle_timeout(now)     take due readings and requested events: counter → sign → queue
//!   counter_reservation()   a new counter mark to persist (then counters_granted(mark))
//!   on_connected()          publishing may start
//!   poll_publish()          next message to write, with a packet id; it is now in flight
//!   on_puback(pid, code)    acknowledged (or refused): it leaves the meter for good
//!   on_disconnected()       everything in flight goes back to the front of the queue, to be
//!                           resent byte for byte, with the same counter, after the reconnect
//!   poll_timeout()          when handle_timeout wants to be called next
//!   poll_subscribe()        after a connect: SUBSCRIBE to the command and firmware topics
//!   on_command(..)          a command arrived (see crate::command); its acknowledgement is
//!   on_firmware_chunk(..)   signed by handle_timeout once device_record() is persisted
//! ```
//!
//! A genuine message is only ever forgotten when the head-end acknowledged it or refused it
//! with a reason code (MQTT 5); everything else is resent. The deliberately broken messages of
//! [`Misbehaviour`] are sent once and never resent.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use gridward_core::MeterId;
use gridward_core::command::{AckOutcome, Refusal};
use gridward_core::document::{Document, DocumentError, Event, EventKind, Format, Reading};
use gridward_core::envelope::{self, EnvelopeError, EnvelopeParams, SigningKey};
use time::{Duration, OffsetDateTime};

use crate::command::{Device, DeviceConfig};
use crate::counter::{CounterBlock, DEFAULT_BLOCK};
use crate::profile::{LoadProfile, MeteredShare};

/// The shortest interval between readings; shorter ones are raised to it.
pub const MIN_INTERVAL: Duration = Duration::MILLISECOND;

/// The longest interval between readings; longer ones are lowered to it.
pub const MAX_INTERVAL: Duration = Duration::WEEK;

/// The time after which nothing is scheduled (the end of the years a document may carry).
const NEVER: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59 UTC);

/// A deliberately broken message a meter can be told to send, for demonstrations and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Misbehaviour {
    /// A new, correctly signed reading that reuses the counter of an already acknowledged one
    /// (what a captured-and-modified or a reset meter would send): the head-end must refuse it
    /// as a replay.
    Replay,
    /// The last acknowledged envelope again, byte for byte: the head-end must acknowledge it as
    /// a duplicate without storing it twice (not an alarm).
    ReplayVerbatim,
    /// A genuine reading whose payload is changed after signing (one digit of the energy value
    /// raised): the head-end must refuse it for its signature.
    Tamper,
    /// The meter's certificate has been revoked (by the caller, with `gridward_pki::Pki::revoke`,
    /// before the head-end loaded its CRL). The meter itself behaves genuinely; its connections
    /// must be refused. In a fleet it gives up after
    /// [`REVOKED_GIVE_UP`](crate::fleet::REVOKED_GIVE_UP) failed connects in a row, so its refused
    /// handshakes do not get a shared source address banned.
    Revoked,
    /// Every new firmware image fails its self-test after the reboot: the meter falls back to
    /// the old slot and acknowledges `firmware_not_confirmed`. Its messages are genuine.
    FirmwareFailsBoot,
}

impl Misbehaviour {
    /// Every misbehaviour.
    pub const ALL: [Misbehaviour; 5] = [
        Self::Replay,
        Self::ReplayVerbatim,
        Self::Tamper,
        Self::Revoked,
        Self::FirmwareFailsBoot,
    ];

    /// A short name: `replay`, `replay-verbatim`, `tamper`, `revoked`, `firmware-fails-boot`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::ReplayVerbatim => "replay-verbatim",
            Self::Tamper => "tamper",
            Self::Revoked => "revoked",
            Self::FirmwareFailsBoot => "firmware-fails-boot",
        }
    }

    /// Whether the meter sends deliberately broken messages (as opposed to being refused at
    /// connect, [`Misbehaviour::Revoked`], or failing firmware, [`Misbehaviour::FirmwareFailsBoot`]).
    pub fn sends_bad_messages(self) -> bool {
        !matches!(self, Self::Revoked | Self::FirmwareFailsBoot)
    }
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A reading.
    Reading,
    /// An event.
    Event(EventKind),
    /// The acknowledgement of a command: `None` done, else the refusal.
    CommandAck(Option<Refusal>),
    /// An unacknowledged message restored from the outbox after a crash of the meter process.
    Restored,
    /// A deliberately broken message (sent once, never resent).
    Misbehaviour(Misbehaviour),
}

impl MessageKind {
    /// Whether this is a genuine message, kept until acknowledged.
    pub fn is_genuine(self) -> bool {
        !matches!(self, Self::Misbehaviour(_))
    }
}

/// A signed message held by the meter until it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The envelope counter (for [`Misbehaviour::Replay`], a reused one).
    pub counter: u64,
    /// The MQTT topic.
    pub topic: Arc<str>,
    /// The envelope bytes, identical on every resend.
    pub envelope: Bytes,
    /// What it is.
    pub kind: MessageKind,
    /// How often it was written to a connection so far.
    pub sends: u32,
}

/// A PUBLISH to write now (QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The packet id chosen for it on this connection.
    pub packet_id: u16,
    /// The topic.
    pub topic: Arc<str>,
    /// The envelope.
    pub payload: Bytes,
    /// The envelope counter.
    pub counter: u64,
    /// What it is.
    pub kind: MessageKind,
    /// Whether it was written before, on an earlier connection (set the MQTT DUP flag).
    pub resend: bool,
}

/// The result of a PUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    /// The message it acknowledges, no longer held by the meter.
    pub message: Message,
    /// The PUBACK reason code: 0 success (always with MQTT 3.1.1), ≥ 0x80 refused (MQTT 5).
    pub reason_code: u8,
}

impl Acked {
    /// Whether the head-end accepted it (reason code below 0x80).
    pub fn accepted(&self) -> bool {
        self.reason_code < 0x80
    }
}

/// What one [`Meter::handle_timeout`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Produced {
    /// Readings signed.
    pub readings: u32,
    /// Events signed.
    pub events: u32,
    /// Misbehaviour messages made.
    pub misbehaviours: u32,
    /// Command acknowledgements signed.
    pub acks: u32,
    /// Readings not taken because the queue was full.
    pub skipped: u32,
    /// Work left undone because no counter was available: persist the reservation, then call
    /// `handle_timeout` again.
    pub starved: bool,
}

/// Why a meter could not make a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MeterError {
    /// Signing the envelope failed.
    #[error("signing failed: {0}")]
    Sign(#[from] EnvelopeError),
    /// The document could not be built (a clock outside the years a document may carry).
    #[error("document: {0}")]
    Document(#[from] DocumentError),
}

/// A meter's settings.
#[derive(Debug, Clone)]
pub struct MeterConfig {
    /// Time between readings, within [`MIN_INTERVAL`]..=[`MAX_INTERVAL`] (clamped).
    pub interval: Duration,
    /// Document format.
    pub format: Format,
    /// The consumption model.
    pub profile: LoadProfile,
    /// Most messages in flight (published, not acknowledged) at once on a connection.
    pub max_inflight: usize,
    /// Most messages held (queued and in flight); readings due beyond it are skipped, not taken.
    pub max_held: usize,
    /// Counters reserved per persisted mark.
    pub counter_block: u64,
    /// A deliberate misbehaviour, if any.
    pub misbehaviour: Option<Misbehaviour>,
    /// Misbehave after every this many genuine readings (once an acknowledgement has been seen).
    pub misbehave_every: u32,
    /// Command signers, allowed kinds, manufacturer keys and factory firmware.
    pub device: DeviceConfig,
}

impl MeterConfig {
    /// Defaults: readings every `interval`, XML, 8 in flight, 4096 held, blocks of
    /// [`DEFAULT_BLOCK`], well-behaved, [`DeviceConfig::default`] (no command signer pinned).
    pub fn new(interval: Duration, profile: LoadProfile) -> Self {
        Self {
            interval,
            format: Format::Xml,
            profile,
            max_inflight: 8,
            max_held: 4096,
            counter_block: DEFAULT_BLOCK,
            misbehaviour: None,
            misbehave_every: 3,
            device: DeviceConfig::default(),
        }
    }
}

/// Counts of what happened to one meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MeterCounts {
    /// Readings signed.
    pub readings: u64,
    /// Events signed.
    pub events: u64,
    /// Misbehaviour messages made.
    pub misbehaviours: u64,
    /// Genuine messages acknowledged with success.
    pub acked: u64,
    /// Genuine messages refused with a reason code.
    pub rejected: u64,
    /// Messages written again after a reconnect.
    pub resent: u64,
    /// Readings skipped because the queue was full.
    pub skipped: u64,
    /// Commands executed (firmware: installed and confirmed).
    pub commands_executed: u64,
    /// Commands refused (by verification, or a firmware failure after it).
    pub commands_refused: u64,
    /// Command acknowledgements signed.
    pub acks: u64,
    /// Readings not taken because the meter had no power ([`Meter::power_fail`]).
    pub unpowered: u64,
}

/// One simulated meter. See the module documentation for the driving loop.
pub struct Meter {
    pub(crate) id: MeterId,
    key: SigningKey,
    pub(crate) config: MeterConfig,
    readings_topic: Arc<str>,
    events_topic: Arc<str>,
    commands_topic: Arc<str>,
    firmware_topic: Arc<str>,
    counter: CounterBlock,
    reservation_pending: Option<u64>,
    next_reading: OffsetDateTime,
    requested_events: VecDeque<EventKind>,
    queue: VecDeque<Message>,
    inflight: VecDeque<(u16, Message)>,
    connected: bool,
    next_packet_id: u16,
    last_acked_reading: Option<Message>,
    readings_since_misbehaviour: u32,
    /// Genuine messages at the back of the queue not yet returned by `take_new`.
    unreported: usize,
    pub(crate) counts: MeterCounts,
    /// Topics to subscribe to on this connection, and SUBSCRIBEs awaiting their SUBACK.
    subscribe_due: Vec<Arc<str>>,
    subacks_pending: Vec<u16>,
    pub(crate) device: Device,
    /// The metered share of the load over time (thief, outage).
    metered: MeteredShare,
    /// The share metered while powered (1, or less once a thief bypasses the meter).
    bypass_share: f64,
    powered: bool,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("id", &self.id)
            .field("counter", &self.counter)
            .field("next_reading", &self.next_reading)
            .field("queued", &self.queue.len())
            .field("inflight", &self.inflight.len())
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

impl Meter {
    /// A meter that resumes with `counter` (see [`CounterBlock::resume`]) and takes its first
    /// reading at `first_reading`.
    pub fn new(
        id: MeterId,
        key: SigningKey,
        config: MeterConfig,
        counter: CounterBlock,
        first_reading: OffsetDateTime,
    ) -> Self {
        let device = Device::new(config.device.clone());
        Self {
            readings_topic: id.readings_topic().into(),
            events_topic: id.events_topic().into(),
            commands_topic: id.commands_topic().into(),
            firmware_topic: id.firmware_topic().into(),
            id,
            key,
            config,
            counter,
            reservation_pending: None,
            next_reading: first_reading,
            requested_events: VecDeque::new(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            connected: false,
            next_packet_id: 1,
            last_acked_reading: None,
            readings_since_misbehaviour: 0,
            unreported: 0,
            counts: MeterCounts::default(),
            subscribe_due: Vec::new(),
            subacks_pending: Vec::new(),
            device,
            metered: MeteredShare::new(),
            bypass_share: 1.0,
            powered: true,
        }
    }

    /// A thief at `now`: signs `event` (e.g. [`EventKind::CoverOpened`], at the next
    /// [`handle_timeout`](Self::handle_timeout)) if one is given, then from `now` on only
    /// `metered_share` (0..=1, e.g. 0.5) of the load passes through the meter: the register
    /// grows that much slower for good.
    pub fn start_bypass(
        &mut self,
        now: OffsetDateTime,
        event: Option<EventKind>,
        metered_share: f64,
    ) {
        if let Some(kind) = event {
            self.request_event(kind);
        }
        self.bypass_share = if metered_share.is_nan() {
            1.0
        } else {
            metered_share.clamp(0.0, 1.0)
        };
        if self.powered {
            self.metered.set(whole_second(now), self.bypass_share);
        }
    }

    /// The power fails at `now`: the meter signs its last gasp ([`EventKind::PowerFail`], sent
    /// at the next [`handle_timeout`](Self::handle_timeout) like any event), then takes no
    /// readings and its register stands still until [`power_restore`](Self::power_restore).
    /// Messages already signed stay held and are sent as usual. Nothing if already unpowered.
    pub fn power_fail(&mut self, now: OffsetDateTime) {
        if !self.powered {
            return;
        }
        self.powered = false;
        self.request_event(EventKind::PowerFail);
        self.metered.set(whole_second(now), 0.0);
    }

    /// The power is back at `now`: the meter signs [`EventKind::PowerRestore`], its register
    /// grows again and readings resume on their schedule (those missed are not made up).
    /// Nothing if powered.
    pub fn power_restore(&mut self, now: OffsetDateTime) {
        if self.powered {
            return;
        }
        self.powered = true;
        self.request_event(EventKind::PowerRestore);
        self.metered.set(whole_second(now), self.bypass_share);
    }

    /// Whether the meter has power (see [`power_fail`](Self::power_fail)).
    pub fn is_powered(&self) -> bool {
        self.powered
    }

    /// The metered share of the load over time.
    pub fn metered_share(&self) -> &MeteredShare {
        &self.metered
    }

    /// The profile's register at `t` as this meter's register counts it (bypass and outages
    /// applied; the relay is applied on top by the device).
    pub(crate) fn metered_kwh(&self, t: OffsetDateTime) -> f64 {
        self.metered.register_kwh(&self.config.profile, t)
    }

    /// The topic commands arrive on (`meters/{id}/commands`).
    pub fn commands_topic(&self) -> &str {
        &self.commands_topic
    }

    /// The topic firmware chunks arrive on (`meters/{id}/firmware`).
    pub fn firmware_topic(&self) -> &str {
        &self.firmware_topic
    }

    /// The reporting interval in force (set by a command, else configured), clamped to
    /// [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
    pub fn interval(&self) -> Duration {
        self.device
            .interval_override()
            .unwrap_or(self.config.interval)
            .clamp(MIN_INTERVAL, MAX_INTERVAL)
    }

    /// The next reading one interval from `now` (after a change of the interval).
    pub(crate) fn reschedule(&mut self, now: OffsetDateTime) {
        self.next_reading = now.checked_add(self.interval()).unwrap_or(NEVER);
    }

    /// The meter id.
    pub fn id(&self) -> &MeterId {
        &self.id
    }

    /// The settings.
    pub fn config(&self) -> &MeterConfig {
        &self.config
    }

    /// The counter state.
    pub fn counter(&self) -> &CounterBlock {
        &self.counter
    }

    /// What happened so far.
    pub fn counts(&self) -> MeterCounts {
        self.counts
    }

    /// Whether [`on_connected`](Self::on_connected) was called since the last disconnect.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Messages not yet acknowledged: in flight first (in send order), then queued.
    pub fn unacknowledged(&self) -> impl Iterator<Item = &Message> {
        self.inflight
            .iter()
            .map(|(_, m)| m)
            .chain(self.queue.iter())
    }

    /// The genuine messages signed since the last call, oldest first: record them (e.g. in the
    /// [`crate::outbox::Outbox`]) before they are published. Call it after every
    /// [`handle_timeout`](Self::handle_timeout), before [`poll_publish`](Self::poll_publish).
    pub fn take_new(&mut self) -> impl Iterator<Item = &Message> {
        let n = std::mem::take(&mut self.unreported).min(self.queue.len());
        self.queue
            .range(self.queue.len() - n..)
            .filter(|m| m.kind.is_genuine())
    }

    /// Number of messages held (queued and in flight).
    pub fn held(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    /// Asks for an event to be signed and sent at the next [`handle_timeout`](Self::handle_timeout).
    pub fn request_event(&mut self, kind: EventKind) {
        self.requested_events.push_back(kind);
    }

    /// Puts messages restored from the outbox (after a crash of the meter process) at the front
    /// of the queue, to be resent before anything new.
    pub fn restore(&mut self, restored: impl IntoIterator<Item = (u64, Arc<str>, Bytes)>) {
        let mut front: Vec<Message> = restored
            .into_iter()
            .map(|(counter, topic, envelope)| Message {
                counter,
                topic,
                envelope,
                kind: MessageKind::Restored,
                sends: 1,
            })
            .collect();
        front.sort_by_key(|m| m.counter);
        for m in front.into_iter().rev() {
            self.queue.push_front(m);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next: the next reading
    /// or the deadline of a firmware transfer; the Unix epoch (a past instant: call it now)
    /// while a requested reading or a releasable acknowledgement waits.
    pub fn poll_timeout(&self) -> OffsetDateTime {
        if self.device.read_now || self.device.ack_ready() {
            return OffsetDateTime::UNIX_EPOCH;
        }
        match self.device.transfer_deadline() {
            Some(d) => d.min(self.next_reading),
            None => self.next_reading,
        }
    }

    /// Whether events (or command acknowledgements, or a requested reading) are waiting to be
    /// signed (call [`handle_timeout`](Self::handle_timeout) now).
    pub fn has_requested_events(&self) -> bool {
        !self.requested_events.is_empty() || self.device.read_now || self.device.ack_ready()
    }

    /// A new high-water mark to persist, if half the block is used and none is being persisted.
    /// Persist it durably, then call [`counters_granted`](Self::counters_granted).
    pub fn counter_reservation(&mut self) -> Option<u64> {
        if self.reservation_pending.is_some()
            || !self.counter.wants_reservation(self.config.counter_block)
        {
            return None;
        }
        let mark = self.counter.reservation(self.config.counter_block);
        self.reservation_pending = Some(mark);
        Some(mark)
    }

    /// Records that `mark` is durably persisted.
    pub fn counters_granted(&mut self, mark: u64) {
        self.counter.granted(mark);
        if self.reservation_pending.is_some_and(|p| p <= mark) {
            self.reservation_pending = None;
        }
    }

    /// Records that persisting the pending reservation failed; it will be asked for again.
    pub fn reservation_failed(&mut self) {
        self.reservation_pending = None;
    }

    /// Signs what is due at `now`: requested events first, then the reading if its time has
    /// come (readings whose slots passed meanwhile are not made up: one reading, then the
    /// schedule moves past `now`).
    pub fn handle_timeout(&mut self, now: OffsetDateTime) -> Result<Produced, MeterError> {
        let mut out = Produced::default();
        let ts = whole_second(now);
        self.expire_transfer(now);
        while self.device.ack_ready() {
            let Ok(counter) = self.counter.take() else {
                out.starved = true;
                return Ok(out);
            };
            let Some((_, ack)) = self.device.acks.pop_front() else {
                break;
            };
            let refusal = match ack.outcome {
                AckOutcome::Done { .. } => None,
                AckOutcome::Refused(r) => Some(r),
            };
            let body = Document::CommandAck(ack).to_json();
            let envelope = self.sign_as(
                counter,
                ts,
                &self.events_topic,
                Format::Json,
                body.as_bytes(),
            )?;
            self.queue.push_back(Message {
                counter,
                topic: self.events_topic.clone(),
                envelope,
                kind: MessageKind::CommandAck(refusal),
                sends: 0,
            });
            self.unreported += 1;
            out.acks += 1;
            self.counts.acks += 1;
        }
        while let Some(&kind) = self.requested_events.front() {
            let Ok(counter) = self.counter.take() else {
                out.starved = true;
                return Ok(out);
            };
            self.requested_events.pop_front();
            let doc = Event::new(self.id.clone(), ts, kind)?;
            let body = encode_event(&doc, self.config.format);
            let envelope = self.sign(counter, ts, &self.events_topic, body.as_bytes())?;
            self.queue.push_back(Message {
                counter,
                topic: self.events_topic.clone(),
                envelope,
                kind: MessageKind::Event(kind),
                sends: 0,
            });
            self.unreported += 1;
            out.events += 1;
            self.counts.events += 1;
        }
        let read_now = self.device.read_now;
        if now < self.next_reading && !read_now {
            return Ok(out);
        }
        if !self.powered {
            self.counts.unpowered += 1;
        } else if self.held() >= self.config.max_held {
            out.skipped += 1;
            self.counts.skipped += 1;
        } else {
            let Ok(counter) = self.counter.take() else {
                out.starved = true;
                return Ok(out);
            };
            let body = self.reading_body(ts)?;
            let envelope = self.sign(counter, ts, &self.readings_topic, body.as_bytes())?;
            self.queue.push_back(Message {
                counter,
                topic: self.readings_topic.clone(),
                envelope,
                kind: MessageKind::Reading,
                sends: 0,
            });
            self.unreported += 1;
            out.readings += 1;
            self.counts.readings += 1;
            self.readings_since_misbehaviour += 1;
            if self.misbehave(ts)? {
                out.misbehaviours += 1;
            }
        }
        self.device.read_now = false;
        // A reading asked for by a command does not move the schedule.
        if now >= self.next_reading {
            self.advance_schedule(now);
        }
        Ok(out)
    }

    fn advance_schedule(&mut self, now: OffsetDateTime) {
        let interval = self.interval();
        // Both fit an i64 of nanoseconds: the interval is at most a week.
        let step = interval.whole_nanoseconds() as i64;
        self.next_reading = match self.next_reading.checked_add(interval) {
            Some(next) if next > now => next,
            // Behind by more than one slot: skip the missed slots, keep the phase.
            Some(next) => {
                let rem = ((now - next).whole_nanoseconds() % i128::from(step)) as i64;
                now.checked_add(Duration::nanoseconds(step - rem))
                    .unwrap_or(NEVER)
            }
            None => NEVER,
        };
    }

    fn reading_body(&self, ts: OffsetDateTime) -> Result<String, MeterError> {
        let kwh = self.device.register(ts, |t| self.metered_kwh(t));
        let reading = Reading::new(self.id.clone(), ts, kwh)?;
        Ok(match self.config.format {
            Format::Xml => reading.to_xml(),
            Format::Json => reading.to_json(),
        })
    }

    fn sign(
        &self,
        counter: u64,
        ts: OffsetDateTime,
        topic: &str,
        payload: &[u8],
    ) -> Result<Bytes, MeterError> {
        self.sign_as(counter, ts, topic, self.config.format, payload)
    }

    fn sign_as(
        &self,
        counter: u64,
        ts: OffsetDateTime,
        topic: &str,
        format: Format,
        payload: &[u8],
    ) -> Result<Bytes, MeterError> {
        let params = EnvelopeParams {
            meter_id: &self.id,
            counter,
            timestamp: ts.unix_timestamp(),
            content_type: format,
            topic,
        };
        Ok(Bytes::from(envelope::sign(&self.key, &params, payload)?))
    }

    /// Queues the configured misbehaviour if it is time; returns whether it did.
    fn misbehave(&mut self, ts: OffsetDateTime) -> Result<bool, MeterError> {
        let Some(kind) = self.config.misbehaviour.filter(|k| k.sends_bad_messages()) else {
            return Ok(false);
        };
        if self.readings_since_misbehaviour < self.config.misbehave_every.max(1) {
            return Ok(false);
        }
        let message = match kind {
            Misbehaviour::Replay => {
                let Some(old) = &self.last_acked_reading else {
                    return Ok(false);
                };
                let counter = old.counter;
                let body = self.reading_body(ts)?;
                let envelope = self.sign(counter, ts, &self.readings_topic, body.as_bytes())?;
                Message {
                    counter,
                    topic: self.readings_topic.clone(),
                    envelope,
                    kind: MessageKind::Misbehaviour(kind),
                    sends: 0,
                }
            }
            Misbehaviour::ReplayVerbatim => {
                let Some(old) = &self.last_acked_reading else {
                    return Ok(false);
                };
                Message {
                    kind: MessageKind::Misbehaviour(kind),
                    sends: 0,
                    ..old.clone()
                }
            }
            Misbehaviour::Tamper => {
                let Ok(counter) = self.counter.take() else {
                    return Ok(false);
                };
                let body = self.reading_body(ts)?;
                let signed = self.sign(counter, ts, &self.readings_topic, body.as_bytes())?;
                Message {
                    counter,
                    topic: self.readings_topic.clone(),
                    envelope: tamper(&signed, body.as_bytes()),
                    kind: MessageKind::Misbehaviour(kind),
                    sends: 0,
                }
            }
            Misbehaviour::Revoked | Misbehaviour::FirmwareFailsBoot => return Ok(false),
        };
        self.queue.push_back(message);
        self.unreported += 1;
        self.readings_since_misbehaviour = 0;
        self.counts.misbehaviours += 1;
        Ok(true)
    }

    /// The connection is up (CONNACK accepted): publishing may start.
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.next_packet_id = 1;
        self.subscribe_due = vec![self.commands_topic.clone(), self.firmware_topic.clone()];
        self.subacks_pending.clear();
    }

    /// The next SUBSCRIBE to write after a connect (QoS 1, the command topic, then the firmware
    /// topic), with a packet id no PUBLISH in flight uses until its SUBACK.
    pub fn poll_subscribe(&mut self) -> Option<(u16, Arc<str>)> {
        if !self.connected || self.subscribe_due.is_empty() {
            return None;
        }
        let topic = self.subscribe_due.remove(0);
        let pkid = self.allocate_packet_id();
        self.subacks_pending.push(pkid);
        Some((pkid, topic))
    }

    /// A SUBACK for `packet_id`: `Some(granted)` if it answers one of ours (granted: every
    /// return code below 0x80), `None` otherwise.
    pub fn on_suback(&mut self, packet_id: u16, return_codes: &[u8]) -> Option<bool> {
        let pos = self.subacks_pending.iter().position(|p| *p == packet_id)?;
        self.subacks_pending.remove(pos);
        Some(!return_codes.is_empty() && return_codes.iter().all(|c| *c < 0x80))
    }

    /// The connection is gone: every genuine message in flight goes back to the front of the
    /// queue, in its original order, to be resent unchanged; misbehaviour in flight is dropped.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.subscribe_due.clear();
        self.subacks_pending.clear();
        while let Some((_, m)) = self.inflight.pop_back() {
            if m.kind.is_genuine() {
                self.queue.push_front(m);
            }
        }
    }

    /// The next PUBLISH to write, if connected and the in-flight window has room.
    /// The message stays in flight until [`on_puback`](Self::on_puback) or a disconnect.
    pub fn poll_publish(&mut self) -> Option<Publish> {
        if !self.connected || self.inflight.len() >= self.config.max_inflight.max(1) {
            return None;
        }
        let mut message = self.queue.pop_front()?;
        let packet_id = self.allocate_packet_id();
        let resend = message.sends > 0;
        if resend && message.kind.is_genuine() {
            self.counts.resent += 1;
        }
        message.sends = message.sends.saturating_add(1);
        let publish = Publish {
            packet_id,
            topic: message.topic.clone(),
            payload: message.envelope.clone(),
            counter: message.counter,
            kind: message.kind,
            resend,
        };
        self.inflight.push_back((packet_id, message));
        Some(publish)
    }

    fn allocate_packet_id(&mut self) -> u16 {
        // The window is far below 65,535, so a free id is always found.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if id != 0
                && !self.inflight.iter().any(|(p, _)| *p == id)
                && !self.subacks_pending.contains(&id)
            {
                return id;
            }
        }
    }

    /// A PUBACK for `packet_id` with `reason_code` (0 for MQTT 3.1.1). Returns the message it
    /// acknowledges, or `None` for a packet id not in flight (a protocol error by the peer).
    pub fn on_puback(&mut self, packet_id: u16, reason_code: u8) -> Option<Acked> {
        let pos = self.inflight.iter().position(|(p, _)| *p == packet_id)?;
        let (_, message) = self.inflight.remove(pos)?;
        let acked = Acked {
            message,
            reason_code,
        };
        if acked.message.kind.is_genuine() {
            if acked.accepted() {
                self.counts.acked += 1;
                if acked.message.kind == MessageKind::Reading {
                    self.last_acked_reading = Some(acked.message.clone());
                }
            } else {
                self.counts.rejected += 1;
            }
        }
        Some(acked)
    }
}

/// `now` truncated to whole seconds, in UTC (the envelope carries whole seconds).
pub fn whole_second(now: OffsetDateTime) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(now.unix_timestamp()).unwrap_or(now)
}

fn encode_event(e: &Event, f: Format) -> String {
    match f {
        Format::Xml => e.to_xml(),
        Format::Json => e.to_json(),
    }
}

/// `envelope` with one digit of the energy value in its payload `body` changed (the last digit
/// of its integer part goes up by one, a 9 down), as an attacker changing a reading would.
/// The CBOR structure and the document stay well-formed; only the signature no longer fits.
pub fn tamper(envelope: &[u8], body: &[u8]) -> Bytes {
    let mut out = envelope.to_vec();
    let body_at = out.windows(body.len().max(1)).position(|w| w == body);
    let marker = b"EnergyConsumed";
    let digit_at = body
        .windows(marker.len())
        .position(|w| w == marker)
        .and_then(|m| {
            let after = m + marker.len();
            let first = body.get(after..)?.iter().position(u8::is_ascii_digit)? + after;
            let run = body
                .get(first..)?
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            Some(first + run - 1)
        });
    match (body_at, digit_at) {
        (Some(b), Some(d)) => {
            if let Some(x) = out.get_mut(b + d) {
                *x = if *x == b'9' { b'8' } else { *x + 1 };
            }
        }
        // No document found (cannot happen for the meter's own messages): flip the last byte,
        // which is part of the signature.
        _ => {
            if let Some(x) = out.last_mut() {
                *x ^= 0x01;
            }
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use gridward_core::document::{self, Document, Limits};
    use gridward_core::envelope::{EnvelopeError, verify};
    use time::macros::datetime;

    use super::*;

    const T0: OffsetDateTime = datetime!(2025-03-10 06:00 UTC);

    fn key() -> SigningKey {
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .unwrap();
        SigningKey::from_pkcs8_der(pkcs8.as_ref()).unwrap()
    }

    fn meter_with(config: MeterConfig) -> Meter {
        let mut m = Meter::new(
            MeterId::new("M-000001").unwrap(),
            key(),
            config,
            CounterBlock::resume(None),
            T0,
        );
        let mark = m.counter_reservation().unwrap();
        m.counters_granted(mark);
        m
    }

    fn meter() -> Meter {
        meter_with(MeterConfig::new(
            Duration::seconds(10),
            LoadProfile::from_seed(1),
        ))
    }

    fn verify_msg(m: &Meter, msg: &Message) -> Result<Document, EnvelopeError> {
        let vk = m.key.verifying_key().unwrap();
        Ok(verify(&msg.envelope, &vk, m.id(), &msg.topic)?
            .into_document(&Limits::default())?
            .document()
            .clone())
    }

    /// Drives `m` from `from` for `steps` intervals while connected, acking everything.
    fn run_connected(m: &mut Meter, from: OffsetDateTime, steps: i32) -> Vec<Message> {
        let mut acked = Vec::new();
        for i in 0..steps {
            m.handle_timeout(from + m.config.interval * i).unwrap();
            while let Some(p) = m.poll_publish() {
                acked.push(m.on_puback(p.packet_id, 0).unwrap().message);
            }
        }
        acked
    }

    #[test]
    fn readings_are_signed_verifiable_and_rising() {
        let mut m = meter();
        m.on_connected();
        let acked = run_connected(&mut m, T0, 30);
        assert_eq!(acked.len(), 30);
        let mut last = -1.0;
        for (i, msg) in acked.iter().enumerate() {
            assert_eq!(msg.counter, i as u64 + 1);
            assert_eq!(&*msg.topic, "meters/M-000001/readings");
            let Document::Reading(r) = verify_msg(&m, msg).unwrap() else {
                panic!()
            };
            assert_eq!(r.timestamp, T0 + Duration::seconds(10 * i as i64));
            assert!(r.energy_kwh >= last);
            last = r.energy_kwh;
        }
        assert_eq!(m.counts().acked, 30);
    }

    #[test]
    fn json_format_and_sub_second_clock() {
        let mut cfg = MeterConfig::new(Duration::seconds(10), LoadProfile::from_seed(2));
        cfg.format = Format::Json;
        let mut m = meter_with(cfg);
        m.handle_timeout(T0 + Duration::milliseconds(700)).unwrap();
        let msg = m.unacknowledged().next().unwrap().clone();
        let env = gridward_core::envelope::Envelope::decode(&msg.envelope).unwrap();
        assert_eq!(env.unverified_header().content_type, Format::Json);
        assert_eq!(env.unverified_header().timestamp, T0.unix_timestamp());
        assert!(verify_msg(&m, &msg).is_ok());
    }

    #[test]
    fn schedule_skips_missed_slots() {
        let mut m = meter();
        assert_eq!(
            m.handle_timeout(T0 - Duration::SECOND).unwrap(),
            Produced::default()
        );
        let p = m.handle_timeout(T0 + Duration::seconds(95)).unwrap();
        assert_eq!(p.readings, 1);
        assert_eq!(m.poll_timeout(), T0 + Duration::seconds(100));
        let p = m.handle_timeout(T0 + Duration::seconds(99)).unwrap();
        assert_eq!(p.readings, 0);
    }

    #[test]
    fn schedule_survives_clock_jumps_and_extreme_intervals() {
        let mut m = meter();
        // The clock jumps ten years ahead: one reading, then the next slot in phase.
        let later = T0 + Duration::days(3653) + Duration::seconds(3);
        assert_eq!(m.handle_timeout(later).unwrap().readings, 1);
        assert_eq!(m.poll_timeout(), later + Duration::seconds(7));
        let mut cfg = MeterConfig::new(Duration::MAX, LoadProfile::from_seed(1));
        cfg.max_held = 100;
        let mut m = meter_with(cfg);
        m.handle_timeout(T0).unwrap();
        assert_eq!(m.poll_timeout(), T0 + MAX_INTERVAL);
        let mut cfg = MeterConfig::new(Duration::ZERO, LoadProfile::from_seed(1));
        cfg.max_held = 100;
        let mut m = meter_with(cfg);
        m.handle_timeout(T0).unwrap();
        assert_eq!(m.poll_timeout(), T0 + MIN_INTERVAL);
        let mut m = meter();
        m.handle_timeout(NEVER).unwrap();
        assert_eq!(m.poll_timeout(), NEVER);
    }

    #[test]
    fn events_go_to_the_events_topic_first() {
        let mut m = meter();
        m.request_event(EventKind::CoverOpened);
        m.request_event(EventKind::PowerFail);
        let p = m.handle_timeout(T0).unwrap();
        assert_eq!((p.events, p.readings), (2, 1));
        let msgs: Vec<Message> = m.unacknowledged().cloned().collect();
        assert_eq!(&*msgs[0].topic, "meters/M-000001/events");
        let Document::Event(e) = verify_msg(&m, &msgs[1]).unwrap() else {
            panic!()
        };
        assert_eq!(e.kind, EventKind::PowerFail);
        assert_eq!(msgs[2].kind, MessageKind::Reading);
        assert_eq!(
            msgs.iter().map(|m| m.counter).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    fn register_of(m: &Meter, msg: &Message) -> f64 {
        let Document::Reading(r) = verify_msg(m, msg).unwrap() else {
            panic!("not a reading")
        };
        r.energy_kwh
    }

    #[test]
    fn a_thief_opens_the_cover_then_half_the_load_is_metered() {
        let mut cfg = MeterConfig::new(Duration::minutes(15), LoadProfile::from_seed(4));
        cfg.format = Format::Json;
        let mut m = meter_with(cfg);
        m.on_connected();
        let before = run_connected(&mut m, T0, 4); // 06:00 .. 06:45
        let t1 = T0 + Duration::hours(1);
        m.start_bypass(t1, Some(EventKind::TerminalCoverOpened), 0.5);
        let after = run_connected(&mut m, t1, 9); // 07:00 .. 09:00
        let Document::Event(e) = verify_msg(&m, &after[0]).unwrap() else {
            panic!()
        };
        assert_eq!(e.kind, EventKind::TerminalCoverOpened);
        assert_eq!(&*after[0].topic, "meters/M-000001/events");
        let profile = m.config().profile.clone();
        let t9 = t1 + Duration::hours(2);
        let metered = register_of(&m, &after[9]) - register_of(&m, &after[1]);
        let full = profile.register_exact(t9) - profile.register_exact(t1);
        assert!((metered - full / 2.0).abs() < 0.002, "{metered} vs {full}");
        // Before the bypass the register is the profile's.
        assert_eq!(
            register_of(&m, &before[3]),
            profile.register_kwh(T0 + Duration::minutes(45))
        );
        assert_eq!(m.metered_share().share_at(t9), 0.5);
    }

    #[test]
    fn without_power_a_meter_sends_its_last_gasp_and_takes_no_readings() {
        let mut m = meter();
        m.on_connected();
        run_connected(&mut m, T0, 3);
        let t_fail = T0 + Duration::seconds(30);
        m.power_fail(t_fail);
        m.power_fail(t_fail); // once
        assert!(!m.is_powered());
        let during = run_connected(&mut m, t_fail, 6);
        assert_eq!(during.len(), 1);
        let Document::Event(e) = verify_msg(&m, &during[0]).unwrap() else {
            panic!()
        };
        assert_eq!(e.kind, EventKind::PowerFail);
        assert_eq!(m.counts().unpowered, 6);
        let t_back = t_fail + Duration::seconds(60);
        m.power_restore(t_back);
        let after = run_connected(&mut m, t_back, 2);
        let kinds: Vec<MessageKind> = after.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [
                MessageKind::Event(EventKind::PowerRestore),
                MessageKind::Reading,
                MessageKind::Reading
            ]
        );
        // The register stood still while the power was off.
        let profile = m.config().profile.clone();
        let lost = profile.register_exact(t_back) - profile.register_exact(t_fail);
        let expected = profile.register_exact(t_back) - lost;
        assert!((register_of(&m, &after[1]) - expected).abs() < 0.002);
        // Counters stay unique and increasing across it all.
        assert!(after.windows(2).all(|w| w[0].counter < w[1].counter));
    }

    #[test]
    fn unacknowledged_messages_are_resent_unchanged_after_reconnect() {
        let mut cfg = MeterConfig::new(Duration::seconds(10), LoadProfile::from_seed(1));
        cfg.max_inflight = 3;
        let mut m = meter_with(cfg);
        for i in 0..5 {
            m.handle_timeout(T0 + Duration::seconds(10 * i)).unwrap();
        }
        // Nothing is published while disconnected.
        assert_eq!(m.poll_publish(), None);
        m.on_connected();
        let first: Vec<Publish> = std::iter::from_fn(|| m.poll_publish()).collect();
        assert_eq!(first.len(), 3); // the window
        assert!(first.iter().all(|p| !p.resend));
        // Only the second is acknowledged, out of order; then the connection drops.
        assert_eq!(
            m.on_puback(first[1].packet_id, 0).unwrap().message.counter,
            2
        );
        assert_eq!(m.on_puback(999, 0), None);
        m.on_disconnected();
        let held: Vec<u64> = m.unacknowledged().map(|m| m.counter).collect();
        assert_eq!(held, [1, 3, 4, 5]);
        m.on_connected();
        let again: Vec<Publish> = std::iter::from_fn(|| m.poll_publish()).collect();
        assert_eq!(
            again.iter().map(|p| p.counter).collect::<Vec<_>>(),
            [1, 3, 4]
        );
        assert_eq!(
            again.iter().map(|p| p.resend).collect::<Vec<_>>(),
            [true, true, false]
        );
        // Byte for byte the same envelopes.
        assert_eq!(again[0].payload, first[0].payload);
        assert_eq!(again[1].payload, first[2].payload);
        for p in &again {
            m.on_puback(p.packet_id, 0).unwrap();
        }
        let last = m.poll_publish().unwrap();
        assert_eq!(last.counter, 5);
        m.on_puback(last.packet_id, 0).unwrap();
        assert_eq!(m.held(), 0);
        assert_eq!(m.counts().resent, 2);
    }

    #[test]
    fn refused_messages_are_not_resent() {
        let mut m = meter();
        m.handle_timeout(T0).unwrap();
        m.on_connected();
        let p = m.poll_publish().unwrap();
        let a = m.on_puback(p.packet_id, 0x87).unwrap();
        assert!(!a.accepted());
        m.on_disconnected();
        m.on_connected();
        assert_eq!(m.poll_publish(), None);
        assert_eq!(m.counts().rejected, 1);
    }

    #[test]
    fn packet_ids_are_unique_in_flight_and_wrap() {
        let mut cfg = MeterConfig::new(Duration::seconds(1), LoadProfile::from_seed(1));
        cfg.max_inflight = 4;
        let mut m = meter_with(cfg);
        m.on_connected();
        m.next_packet_id = 65_534;
        for i in 0..4 {
            m.handle_timeout(T0 + Duration::seconds(i)).unwrap();
        }
        let ids: Vec<u16> = std::iter::from_fn(|| m.poll_publish())
            .map(|p| p.packet_id)
            .collect();
        assert_eq!(ids, [65_534, 65_535, 1, 2]);
    }

    #[test]
    fn starves_without_counters_and_asks_for_more() {
        let mut cfg = MeterConfig::new(Duration::seconds(1), LoadProfile::from_seed(1));
        cfg.counter_block = 4;
        let mut m = Meter::new(
            MeterId::new("M1").unwrap(),
            key(),
            cfg,
            CounterBlock::resume(Some(50)),
            T0,
        );
        let p = m.handle_timeout(T0).unwrap();
        assert!(p.starved && p.readings == 0);
        let mark = m.counter_reservation().unwrap();
        assert_eq!(mark, 54);
        assert_eq!(m.counter_reservation(), None); // already pending
        m.counters_granted(mark);
        assert_eq!(m.handle_timeout(T0).unwrap().readings, 1);
        m.handle_timeout(T0 + Duration::seconds(1)).unwrap();
        // Half the block used: the next reservation is wanted while counters remain.
        let next = m.counter_reservation().unwrap();
        assert_eq!(next, 56);
        m.reservation_failed();
        assert_eq!(m.counter_reservation(), Some(56));
        let counters: Vec<u64> = m.unacknowledged().map(|m| m.counter).collect();
        assert_eq!(counters, [50, 51]);
    }

    #[test]
    fn new_genuine_messages_are_reported_once() {
        let mut cfg = MeterConfig::new(Duration::seconds(10), LoadProfile::from_seed(1));
        cfg.misbehaviour = Some(Misbehaviour::Tamper);
        cfg.misbehave_every = 1;
        let mut m = meter_with(cfg);
        m.request_event(EventKind::PowerFail);
        m.handle_timeout(T0).unwrap();
        let new: Vec<u64> = m.take_new().map(|m| m.counter).collect();
        assert_eq!(new, [1, 2]); // the event and the reading, not the tampered copy (3)
        assert_eq!(m.take_new().count(), 0);
        m.on_connected();
        m.poll_publish().unwrap();
        m.handle_timeout(T0 + Duration::seconds(10)).unwrap();
        let new: Vec<u64> = m.take_new().map(|m| m.counter).collect();
        assert_eq!(new, [4]);
    }

    #[test]
    fn full_queue_skips_readings_without_using_counters() {
        let mut cfg = MeterConfig::new(Duration::seconds(1), LoadProfile::from_seed(1));
        cfg.max_held = 2;
        let mut m = meter_with(cfg);
        for i in 0..5 {
            m.handle_timeout(T0 + Duration::seconds(i)).unwrap();
        }
        assert_eq!(m.held(), 2);
        assert_eq!(m.counts().skipped, 3);
        assert_eq!(m.counter().next(), 3);
    }

    #[test]
    fn restored_messages_go_first() {
        let mut m = meter();
        m.handle_timeout(T0).unwrap();
        m.restore([
            (
                9,
                Arc::from("meters/M-000001/readings"),
                Bytes::from_static(b"b"),
            ),
            (
                7,
                Arc::from("meters/M-000001/readings"),
                Bytes::from_static(b"a"),
            ),
        ]);
        m.on_connected();
        let p: Vec<Publish> = std::iter::from_fn(|| m.poll_publish()).collect();
        assert_eq!(p.iter().map(|p| p.counter).collect::<Vec<_>>(), [7, 9, 1]);
        assert!(p[0].resend && p[1].resend && !p[2].resend);
    }

    fn misbehaving(kind: Misbehaviour) -> (Meter, Vec<Message>) {
        let mut cfg = MeterConfig::new(Duration::seconds(10), LoadProfile::from_seed(1));
        cfg.misbehaviour = Some(kind);
        cfg.misbehave_every = 2;
        let mut m = meter_with(cfg);
        m.on_connected();
        let sent = run_connected(&mut m, T0, 6);
        (m, sent)
    }

    #[test]
    fn replay_reuses_an_acknowledged_counter_with_a_new_signature() {
        let (m, sent) = misbehaving(Misbehaviour::Replay);
        let bad: Vec<&Message> = sent.iter().filter(|s| !s.kind.is_genuine()).collect();
        assert_eq!(bad.len(), 3);
        let genuine: Vec<&Message> = sent.iter().filter(|s| s.kind.is_genuine()).collect();
        for b in bad {
            // Correctly signed, but with a counter already used by a different envelope.
            assert!(verify_msg(&m, b).is_ok());
            let original = genuine.iter().find(|g| g.counter == b.counter).unwrap();
            assert_ne!(original.envelope, b.envelope);
        }
        // Genuine counters stay unique and increasing.
        let c: Vec<u64> = genuine.iter().map(|g| g.counter).collect();
        assert_eq!(c, [1, 2, 3, 4, 5, 6]);
        assert_eq!(m.counts().misbehaviours, 3);
    }

    #[test]
    fn verbatim_replay_repeats_acknowledged_bytes() {
        let (_, sent) = misbehaving(Misbehaviour::ReplayVerbatim);
        for b in sent.iter().filter(|s| !s.kind.is_genuine()) {
            assert!(
                sent.iter()
                    .any(|g| g.kind.is_genuine() && g.envelope == b.envelope)
            );
        }
    }

    #[test]
    fn tampered_messages_fail_verification_but_stay_well_formed() {
        let (m, sent) = misbehaving(Misbehaviour::Tamper);
        let bad: Vec<&Message> = sent.iter().filter(|s| !s.kind.is_genuine()).collect();
        assert_eq!(bad.len(), 3);
        for b in bad {
            assert_eq!(verify_msg(&m, b).unwrap_err(), EnvelopeError::BadSignature);
            // The payload still parses: only the signature betrays the change.
            let env = gridward_core::envelope::Envelope::decode(&b.envelope).unwrap();
            assert_eq!(env.unverified_header().counter, b.counter);
        }
        // A tampered message consumes a counter of its own.
        let c: Vec<u64> = sent.iter().map(|s| s.counter).collect();
        assert_eq!(c, (1..=9).collect::<Vec<_>>());
    }

    #[test]
    fn misbehaviour_in_flight_is_not_resent() {
        let mut cfg = MeterConfig::new(Duration::seconds(10), LoadProfile::from_seed(1));
        cfg.misbehaviour = Some(Misbehaviour::Tamper);
        cfg.misbehave_every = 1;
        let mut m = meter_with(cfg);
        m.handle_timeout(T0).unwrap();
        m.on_connected();
        let p: Vec<Publish> = std::iter::from_fn(|| m.poll_publish()).collect();
        assert_eq!(p.len(), 2);
        m.on_disconnected();
        m.on_connected();
        let again: Vec<Publish> = std::iter::from_fn(|| m.poll_publish()).collect();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].kind, MessageKind::Reading);
    }

    #[test]
    fn a_revoked_meter_sends_only_genuine_messages() {
        let (m, sent) = misbehaving(Misbehaviour::Revoked);
        assert!(sent.iter().all(|s| s.kind == MessageKind::Reading));
        assert_eq!(m.counts().misbehaviours, 0);
        assert_eq!(
            Misbehaviour::ALL
                .iter()
                .filter(|k| k.sends_bad_messages())
                .count(),
            3
        );
    }

    #[test]
    fn tamper_changes_exactly_one_payload_digit() {
        let body =
            br#"{"MeterID":"1","Timestamp":"2025-01-01T00:00:00Z","EnergyConsumed":1234.569}"#;
        let env = [b"\xd2\x84hdr".as_slice(), body, b"sig"].concat();
        let t = tamper(&env, body);
        let diff: Vec<usize> = (0..env.len()).filter(|&i| env[i] != t[i]).collect();
        assert_eq!(diff.len(), 1);
        assert_eq!(t[diff[0]], b'5'); // 1234.569 → 1235.569
        let doc = &t[5..5 + body.len()];
        assert!(document::parse(doc, Format::Json, &Limits::default()).is_ok());
        // Without a document the signature is hit.
        let t = tamper(b"abc", b"zzz");
        assert_eq!(t.as_ref(), b"abb");
    }
}
