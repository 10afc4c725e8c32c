//! The sans-IO MQTT session of one authenticated device — a meter or a data concentrator
//! ([`DeviceKind`]): packets and time in, [`Action`]s out.
//!
//! The endpoint's I/O loop owns the socket; it feeds every decoded packet (or decoding error),
//! every verdict from the pipeline, every head-end → meter message and every timer tick into a
//! [`Session`] and carries out the actions: write bytes, hand a message to the pipeline, raise a
//! security event, report a subscription or the end of an outbound message, close.
//! Everything the endpoint decides about MQTT — identity binding of the ClientID, the topic ACL,
//! QoS, keep-alive, rate limit, PUBACK ordering, the downward path — is decided here and tested
//! in memory.
//!
//! ## The topic ACL
//!
//! | device | may publish (QoS 0/1) to | may subscribe to |
//! | --- | --- | --- |
//! | meter `id` | `meters/{id}/readings`, `meters/{id}/events` | `meters/{id}/commands`, `meters/{id}/firmware` |
//! | concentrator `id` | `concentrators/{id}/relay`, `concentrators/{id}/events` | nothing |
//!
//! A PUBLISH to any other topic (another device's, the other kind's, a downward topic) is
//! refused with `topic_not_authorized`: MQTT 5 QoS 1 gets PUBACK 0x87 in its turn, then
//! DISCONNECT 0x87; otherwise the connection closes (DISCONNECT 0x87 under MQTT 5). A refused
//! subscription gets a SUBACK failure and `subscribe_not_authorized`; the session goes on.
//! For both kinds the ClientID must be the certificate's id (`client_id_mismatch`), and the
//! rate limit and largest packet are the device kind's (see [`EndpointConfig::rate_of`],
//! [`EndpointConfig::max_packet_size_of`]). The PUBACK contract ([`Verdict`]) is the same.
//!
//! ## The downward path (head-end → meter)
//!
//! ```text
//! Session::publish(topic, payload, tag) ─► queue (≤ max_outbound_queue) ─► meter subscribed to the
//!   topic and room in the window? ─► PUBLISH QoS 1, own packet id ─► meter's PUBACK ─► OutboundDone
//! ```
//!
//! - A meter may subscribe (QoS 0 or 1) to its own `meters/{id}/commands` and
//!   `meters/{id}/firmware` only; [`Action::Subscribed`] follows the SUBACK of a new one.
//!   A concentrator has no downward path: every [`Session::publish`] to it is refused
//!   ([`OutboundRefusal::TopicNotAllowed`]).
//! - A message goes only to the meter's commands or firmware topic, and only once the meter has
//!   subscribed to it; until then it waits in the session's queue. A full queue, another topic or
//!   a PUBLISH larger than the client's Maximum Packet Size end it at once with
//!   [`OutboundResult::Refused`]: it is never sent.
//! - Packet ids are the server's own space (1..=65,535, never one still unacknowledged);
//!   at most `max_outbound_inflight` messages, lowered to an MQTT 5 client's Receive Maximum,
//!   are unacknowledged at once.
//! - Each message is sent at most once per connection and never with DUP set: the session keeps
//!   no state across connections (clean sessions), the head-end resends a byte-identical payload
//!   on the meter's next connection. When the session closes, for whatever cause, every message
//!   not yet acknowledged (sent or still queued) ends with [`OutboundResult::Disconnected`].
//! - A meter subscribed at QoS 0 gets the message at QoS 0 (MQTT: the lower of the two), which
//!   ends with [`OutboundResult::SentUnacknowledged`] once handed to the connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gridward_core::MeterId;
use gridward_core::security::Reason;

use crate::codec::{self, CodecError, ConnAckProperties, ConnectInfo, Packet, Protocol, QoS};
use crate::config::EndpointConfig;
use crate::handler::{DeviceKind, Verdict};
use crate::limits::TokenBucket;

/// MQTT 5 reason codes used by the endpoint.
pub mod reason_code {
    /// 0x80 Unspecified error.
    pub const UNSPECIFIED: u8 = 0x80;
    /// 0x81 Malformed Packet.
    pub const MALFORMED_PACKET: u8 = 0x81;
    /// 0x82 Protocol Error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// 0x87 Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// 0x89 Server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// 0x8B Server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// 0x8D Keep Alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// 0x8E Session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// 0x95 Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// 0x96 Message rate too high.
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    /// 0x98 Administrative action.
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    /// 0x9B QoS not supported.
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    /// 0xA0 Maximum connect time.
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    /// 0x11 No subscription existed (UNSUBACK).
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    /// 3.1.1 CONNACK return code 1: unacceptable protocol version.
    pub const V311_UNACCEPTABLE_PROTOCOL: u8 = 1;
    /// 3.1.1 CONNACK return code 5: not authorized.
    pub const V311_NOT_AUTHORIZED: u8 = 5;
    /// 3.1.1 SUBACK failure.
    pub const V311_SUBACK_FAILURE: u8 = 0x80;
}

use reason_code as rc;

/// One message handed to the pipeline; its verdict comes back through [`Session::on_verdict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Sequence number within the session (the key for [`Session::on_verdict`]).
    pub seq: u64,
    /// The topic (already ACL-checked).
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// QoS 0 or 1.
    pub qos: QoS,
}

/// How one head-end → meter message given to [`Session::publish`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OutboundResult {
    /// The meter answered the QoS 1 PUBLISH with PUBACK. `reason_code` is the MQTT 5 reason code
    /// (0x00 success, 0x10 no matching subscribers, >= 0x80 failure); always 0 under 3.1.1.
    /// The meter's own signed acknowledgement, not this, proves that a command was executed.
    Acked {
        /// The PUBACK's reason code.
        reason_code: u8,
    },
    /// Sent at QoS 0 because the meter subscribed at QoS 0: handed to the connection, no
    /// acknowledgement will come.
    SentUnacknowledged,
    /// Never sent, and it will not be on this connection.
    Refused(OutboundRefusal),
    /// The session ended (or is ending) before the meter acknowledged the message, sent or not:
    /// resend the byte-identical payload on the meter's next connection.
    Disconnected,
}

/// Why [`Session::publish`] refused a message without sending it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundRefusal {
    /// The topic is neither the meter's commands topic nor its firmware topic.
    #[error(
        "topic {topic:?} is not this meter's meters/{{id}}/commands or meters/{{id}}/firmware topic"
    )]
    TopicNotAllowed {
        /// The topic asked for.
        topic: String,
    },
    /// The PUBLISH would be larger than the meter accepts (its MQTT 5 Maximum Packet Size, or
    /// MQTT's own limit): split the payload or send a smaller one.
    #[error("a PUBLISH of {size} bytes exceeds the {max} bytes the meter accepts")]
    TooLarge {
        /// Size of the PUBLISH packet, fixed header included.
        size: usize,
        /// What the meter accepts.
        max: usize,
    },
    /// `max_outbound_queue` messages already wait for this meter: retry once some are
    /// acknowledged.
    #[error(
        "{max} messages already wait for this meter (max_outbound_queue): retry after some are acknowledged"
    )]
    QueueFull {
        /// The queue's bound.
        max: usize,
    },
    /// The PUBLISH cannot be encoded.
    #[error("the PUBLISH cannot be encoded: {0}")]
    Encoding(String),
}

/// What the I/O loop must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    Send(Bytes),
    /// Hand this message to the pipeline.
    Deliver(Delivery),
    /// Raise a security event about this meter.
    Event {
        /// Why.
        reason: Reason,
        /// Detail for operators.
        detail: String,
    },
    /// CONNECT accepted (CONNACK success queued before this action).
    Connected {
        /// Protocol version of the session.
        protocol: Protocol,
        /// The keep-alive in force.
        keep_alive: Duration,
    },
    /// The meter subscribed to `topic` (its commands or firmware topic; the SUBACK was queued
    /// before this action): it is now reachable there.
    Subscribed {
        /// The topic.
        topic: String,
    },
    /// The head-end → meter message `tag` (see [`Session::publish`]) is over.
    OutboundDone {
        /// The caller's id of the message.
        tag: u64,
        /// How it ended.
        result: OutboundResult,
    },
    /// Flush what was sent, then close the connection. Nothing follows.
    Close,
}

/// Why the endpoint ends a session from outside (see [`Session::on_cancel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// A newer connection of the same meter took over.
    TakenOver,
    /// The meter's certificate was revoked while connected.
    Revoked,
    /// The endpoint is shutting down: in-flight verdicts are awaited first.
    Shutdown,
    /// An operator disconnected the meter.
    Admin,
    /// The connection reached `max_connection_lifetime`.
    Lifetime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    Connected,
    /// No more reading; once every in-flight verdict is in, send DISCONNECT (v5, if the code is
    /// `Some`) and close.
    Draining(Option<u8>),
    Closed,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: u64,
    /// `Some` for QoS 1 (a PUBACK is due), `None` for QoS 0.
    pkid: Option<u16>,
    /// The PUBACK reason code once decided.
    code: Option<u8>,
    /// The refusal's reason, sent as the PUBACK's Reason String where the client allows it.
    refused: Option<Reason>,
    /// Decided as [`Verdict::Unavailable`]: no PUBACK; the session closes when it reaches the front.
    unavailable: bool,
}

/// The two topics a meter may subscribe to, and the head-end publish to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Downlink {
    Commands = 0,
    Firmware = 1,
}

/// A head-end → meter message waiting to be sent.
#[derive(Debug, Clone)]
struct Outbound {
    tag: u64,
    to: Downlink,
    payload: Bytes,
}

/// The MQTT session of one device (meter or concentrator) whose certificate has been verified.
#[derive(Debug)]
pub struct Session {
    meter: MeterId,
    kind: DeviceKind,
    /// The topics the device may publish to: readings + events (meter), relay + events
    /// (concentrator).
    uplinks: [String; 2],
    /// The topics a meter may subscribe to and the head-end publish to (indexed by
    /// [`Downlink`]); `None` for a concentrator.
    downlinks: Option<[String; 2]>,
    /// The granted QoS of the meter's subscription to its commands / firmware topic
    /// (indexed by [`Downlink`]).
    subscriptions: [Option<QoS>; 2],
    /// Messages waiting for a subscription or room in the window, oldest first.
    outbound_queue: VecDeque<Outbound>,
    /// QoS 1 messages sent and not yet acknowledged: (packet id, tag), oldest first.
    outbound_sent: VecDeque<(u16, u64)>,
    next_pkid: u16,
    max_outbound_queue: usize,
    max_outbound_inflight: usize,
    /// The window in force: `max_outbound_inflight`, lowered to the client's Receive Maximum.
    outbound_window: usize,
    state: State,
    protocol: Protocol,
    inflight: VecDeque<InFlight>,
    next_seq: u64,
    bucket: TokenBucket,
    keep_alive: Duration,
    last_packet: Instant,
    connect_deadline: Instant,
    max_inflight: usize,
    max_keep_alive: Duration,
    max_packet_size: usize,
    /// MQTT 5 client that accepts Reason Strings (Request Problem Information not 0).
    reason_strings: bool,
    /// The largest packet the client accepts (MQTT 5 Maximum Packet Size).
    client_max_packet_size: usize,
}

impl Session {
    /// A session for `meter` (from its certificate) whose connection was accepted at `now`.
    pub fn new(meter: MeterId, config: &EndpointConfig, now: Instant) -> Self {
        Self::for_device(meter, DeviceKind::Meter, config, now)
    }

    /// A session for the device `id` of `kind` (both from its certificate) whose connection was
    /// accepted at `now`: the topic ACL, rate limit and largest packet are that kind's.
    pub fn for_device(
        id: MeterId,
        kind: DeviceKind,
        config: &EndpointConfig,
        now: Instant,
    ) -> Self {
        let (uplinks, downlinks) = match kind {
            DeviceKind::Meter => (
                [id.readings_topic(), id.events_topic()],
                Some([id.commands_topic(), id.firmware_topic()]),
            ),
            DeviceKind::Concentrator => (
                [
                    gridward_core::relay::relay_topic(&id),
                    gridward_core::relay::concentrator_events_topic(&id),
                ],
                None,
            ),
        };
        let (rate, burst) = config.rate_of(kind);
        Self {
            kind,
            uplinks,
            downlinks,
            subscriptions: [None; 2],
            outbound_queue: VecDeque::new(),
            outbound_sent: VecDeque::new(),
            next_pkid: 1,
            max_outbound_queue: config.max_outbound_queue.max(1),
            max_outbound_inflight: usize::from(config.max_outbound_inflight.max(1)),
            outbound_window: usize::from(config.max_outbound_inflight.max(1)),
            meter: id,
            state: State::AwaitingConnect,
            protocol: Protocol::V311,
            inflight: VecDeque::new(),
            next_seq: 0,
            bucket: TokenBucket::new(rate, burst, now),
            keep_alive: config.max_keep_alive,
            last_packet: now,
            connect_deadline: now + config.connect_timeout,
            max_inflight: usize::from(config.max_inflight.max(1)),
            max_keep_alive: config.max_keep_alive,
            max_packet_size: config.max_packet_size_of(kind),
            reason_strings: false,
            client_max_packet_size: usize::MAX,
        }
    }

    /// The device's id (a meter's or a concentrator's, see [`Session::kind`]).
    pub fn meter(&self) -> &MeterId {
        &self.meter
    }

    /// Meter or concentrator.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// The largest packet accepted from the device, fixed header included (the I/O loop frames
    /// with it; announced to MQTT 5 clients as Maximum Packet Size).
    pub fn max_packet_size(&self) -> usize {
        self.max_packet_size
    }

    /// The rate-limit bucket (the endpoint keeps it per meter across connections).
    pub fn bucket(&self) -> &TokenBucket {
        &self.bucket
    }

    /// Continues with `bucket`: the one the meter's earlier connections left, so that
    /// reconnecting does not refill it.
    pub fn set_bucket(&mut self, bucket: TokenBucket) {
        self.bucket = bucket;
    }

    /// The protocol (3.1.1 until a CONNECT says otherwise).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Whether CONNECT was accepted (and the session has not been closed).
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected | State::Draining(_))
    }

    /// Whether the session is over ([`Action::Close`] was emitted).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether the I/O loop should read (and feed) more packets: false while the in-flight window
    /// is full (back-pressure) and once the session is draining or closed.
    pub fn wants_read(&self) -> bool {
        matches!(self.state, State::AwaitingConnect | State::Connected)
            && self.inflight.len() < self.max_inflight
    }

    /// Whether the session stopped reading and waits for in-flight verdicts before it closes
    /// (the I/O loop bounds that wait).
    pub fn is_draining(&self) -> bool {
        matches!(self.state, State::Draining(_))
    }

    /// Messages handed to the pipeline and not yet decided.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Head-end → meter QoS 1 messages sent and not yet acknowledged.
    pub fn outbound_inflight(&self) -> usize {
        self.outbound_sent.len()
    }

    /// Head-end → meter messages waiting for a subscription or room in the window.
    pub fn outbound_queued(&self) -> usize {
        self.outbound_queue.len()
    }

    /// Whether the meter is subscribed to `topic` (its commands or firmware topic).
    pub fn is_subscribed(&self, topic: &str) -> bool {
        self.downlink(topic)
            .is_some_and(|d| self.subscriptions[d as usize].is_some())
    }

    /// When [`Session::on_tick`] must next be called (CONNECT deadline or keep-alive expiry).
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingConnect => Some(self.connect_deadline),
            State::Connected => Some(self.last_packet + self.keep_alive.mul_f64(1.5)),
            State::Draining(_) | State::Closed => None,
        }
    }

    /// Time passes: closes the session if CONNECT or keep-alive traffic is overdue.
    pub fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        match self.deadline() {
            Some(d) if now >= d => {}
            _ => return,
        }
        if self.state == State::AwaitingConnect {
            self.event(
                out,
                Reason::Timeout,
                "no CONNECT within the connect timeout".to_owned(),
            );
            self.close(out);
        } else {
            self.event(
                out,
                Reason::Timeout,
                format!(
                    "no packet within 1.5 x keep-alive ({} s)",
                    self.keep_alive.as_secs()
                ),
            );
            self.disconnect(out, rc::KEEP_ALIVE_TIMEOUT);
        }
    }

    /// A frame that did not decode (or was too large).
    pub fn on_decode_error(&mut self, err: &CodecError, out: &mut Vec<Action>) {
        if self.state == State::Closed {
            return;
        }
        let connected = self.state != State::AwaitingConnect;
        match err {
            CodecError::TooLarge { .. } => {
                self.event(out, Reason::PacketTooLarge, err.to_string());
                if connected {
                    self.disconnect(out, rc::PACKET_TOO_LARGE);
                } else {
                    self.close(out);
                }
            }
            CodecError::UnsupportedProtocol { .. } if !connected => {
                self.event(out, Reason::MalformedPacket, err.to_string());
                let mut buf = BytesMut::new();
                codec::encode_connack(
                    &mut buf,
                    Protocol::V311,
                    false,
                    rc::V311_UNACCEPTABLE_PROTOCOL,
                    &ConnAckProperties::default(),
                );
                out.push(Action::Send(buf.freeze()));
                self.close(out);
            }
            _ => {
                self.event(out, Reason::MalformedPacket, err.to_string());
                if connected {
                    self.disconnect(out, rc::MALFORMED_PACKET);
                } else {
                    self.close(out);
                }
            }
        }
    }

    /// One decoded packet from the client, received at `now`.
    pub fn on_packet(&mut self, packet: Packet, now: Instant, out: &mut Vec<Action>) {
        match self.state {
            State::Closed | State::Draining(_) => {}
            State::AwaitingConnect => match packet {
                Packet::Connect(info) => self.on_connect(info, now, out),
                other => {
                    self.event(
                        out,
                        Reason::MalformedPacket,
                        format!("expected CONNECT, got {}", other.name()),
                    );
                    self.close(out);
                }
            },
            State::Connected => {
                self.last_packet = now;
                // A PUBACK for one of our own publishes was asked for by the head-end: it does
                // not count against the meter's rate (a firmware transfer must not trip it).
                let solicited = matches!(&packet, Packet::PubAck { pkid, .. }
                    if self.outbound_sent.iter().any(|(p, _)| p == pkid));
                if !solicited && !self.bucket.take(now) {
                    // Stop reading; what is already in flight still gets its PUBACK, then close.
                    self.event(
                        out,
                        Reason::RateLimited,
                        format!("message rate of the {} exceeded", self.kind),
                    );
                    self.state = State::Draining(Some(rc::MESSAGE_RATE_TOO_HIGH));
                    self.flush_ready(out);
                    return;
                }
                self.on_connected_packet(packet, out);
            }
        }
    }

    fn on_connect(&mut self, info: ConnectInfo, now: Instant, out: &mut Vec<Action>) {
        self.protocol = info.protocol;
        self.reason_strings = info.protocol == Protocol::V5 && info.problem_information;
        self.client_max_packet_size = info
            .max_packet_size
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        self.last_packet = now;
        let mut buf = BytesMut::new();
        if info.client_id != self.meter.as_str() {
            self.event(
                out,
                Reason::ClientIdMismatch,
                format!(
                    "ClientID {:?} is not the certificate's {} id {}",
                    info.client_id, self.kind, self.meter
                ),
            );
            let code = match self.protocol {
                Protocol::V311 => rc::V311_NOT_AUTHORIZED,
                Protocol::V5 => rc::NOT_AUTHORIZED,
            };
            codec::encode_connack(
                &mut buf,
                self.protocol,
                false,
                code,
                &ConnAckProperties::default(),
            );
            out.push(Action::Send(buf.freeze()));
            self.close(out);
            return;
        }
        if info.receive_maximum == Some(0) {
            // MQTT 5 §3.1.2.11.3: a Receive Maximum of 0 is a Protocol Error.
            self.event(
                out,
                Reason::MalformedPacket,
                "CONNECT with Receive Maximum 0 (a protocol error)".to_owned(),
            );
            codec::encode_connack(
                &mut buf,
                self.protocol,
                false,
                rc::PROTOCOL_ERROR,
                &ConnAckProperties::default(),
            );
            out.push(Action::Send(buf.freeze()));
            self.close(out);
            return;
        }
        self.outbound_window = self
            .max_outbound_inflight
            .min(info.receive_maximum.map_or(usize::MAX, usize::from));
        let asked = Duration::from_secs(u64::from(info.keep_alive));
        let overridden = asked.is_zero() || asked > self.max_keep_alive;
        self.keep_alive = if overridden {
            self.max_keep_alive
        } else {
            asked
        };
        let props = ConnAckProperties {
            receive_maximum: Some(u16::try_from(self.max_inflight).unwrap_or(u16::MAX)),
            maximum_qos: Some(1),
            maximum_packet_size: Some(u32::try_from(self.max_packet_size).unwrap_or(u32::MAX)),
            wildcard_subscription_available: Some(false),
            subscription_identifiers_available: Some(false),
            shared_subscription_available: Some(false),
            server_keep_alive: overridden
                .then(|| u16::try_from(self.keep_alive.as_secs()).unwrap_or(u16::MAX)),
            ..ConnAckProperties::default()
        };
        // No session state is kept between connections: session present is always 0.
        codec::encode_connack(&mut buf, self.protocol, false, 0, &props);
        out.push(Action::Send(buf.freeze()));
        self.state = State::Connected;
        out.push(Action::Connected {
            protocol: self.protocol,
            keep_alive: self.keep_alive,
        });
    }

    fn on_connected_packet(&mut self, packet: Packet, out: &mut Vec<Action>) {
        match packet {
            Packet::Publish {
                qos,
                topic,
                pkid,
                payload,
                ..
            } => self.on_publish(qos, topic, pkid, payload, out),
            Packet::Subscribe { pkid, filters } => {
                let mut codes = Vec::with_capacity(filters.len());
                let mut new = Vec::new();
                for (filter, qos) in &filters {
                    if let Some(to) = self.downlink(filter)
                        && *qos != QoS::ExactlyOnce
                    {
                        codes.push(*qos as u8);
                        if self.subscriptions[to as usize].replace(*qos).is_none() {
                            new.push(to);
                        }
                    } else {
                        self.event(
                            out,
                            Reason::SubscribeNotAuthorized,
                            format!("subscription to {filter:?} (QoS {}) refused", *qos as u8),
                        );
                        codes.push(match self.protocol {
                            Protocol::V311 => rc::V311_SUBACK_FAILURE,
                            Protocol::V5 => rc::NOT_AUTHORIZED,
                        });
                    }
                }
                let mut buf = BytesMut::new();
                codec::encode_suback(&mut buf, self.protocol, pkid, &codes);
                out.push(Action::Send(buf.freeze()));
                for to in new {
                    out.push(Action::Subscribed {
                        topic: self.topic(to).to_owned(),
                    });
                }
                // What waited for this subscription goes out after the SUBACK.
                self.send_outbound(out);
            }
            Packet::Unsubscribe { pkid, filters } => {
                let codes: Vec<u8> = filters
                    .iter()
                    .map(|f| match self.downlink(f) {
                        Some(to) if self.subscriptions[to as usize].take().is_some() => 0,
                        _ => rc::NO_SUBSCRIPTION_EXISTED,
                    })
                    .collect();
                let mut buf = BytesMut::new();
                codec::encode_unsuback_codes(&mut buf, self.protocol, pkid, &codes);
                out.push(Action::Send(buf.freeze()));
            }
            Packet::PingReq => {
                let mut buf = BytesMut::new();
                codec::encode_pingresp(&mut buf);
                out.push(Action::Send(buf.freeze()));
            }
            Packet::Disconnect { .. } => self.close(out),
            Packet::PubAck { pkid, reason_code } => {
                // A PUBACK for a packet id not in flight (stray or repeated) is harmless.
                if let Some(i) = self.outbound_sent.iter().position(|(p, _)| *p == pkid)
                    && let Some((_, tag)) = self.outbound_sent.remove(i)
                {
                    out.push(Action::OutboundDone {
                        tag,
                        result: OutboundResult::Acked { reason_code },
                    });
                    self.send_outbound(out);
                }
            }
            other => {
                self.event(
                    out,
                    Reason::MalformedPacket,
                    format!("unexpected {} from a client", other.name()),
                );
                self.disconnect(out, rc::PROTOCOL_ERROR);
            }
        }
    }

    fn on_publish(
        &mut self,
        qos: QoS,
        topic: String,
        pkid: u16,
        payload: Bytes,
        out: &mut Vec<Action>,
    ) {
        if qos == QoS::ExactlyOnce {
            self.event(
                out,
                Reason::MalformedPacket,
                format!("QoS 2 publish to {topic:?} refused (maximum QoS is 1)"),
            );
            self.disconnect(out, rc::QOS_NOT_SUPPORTED);
            return;
        }
        if !self.uplinks.contains(&topic) {
            self.event(
                out,
                Reason::TopicNotAuthorized,
                format!(
                    "publish to {topic:?} refused ({} {})",
                    self.kind, self.meter
                ),
            );
            match (self.protocol, qos) {
                (Protocol::V5, QoS::AtLeastOnce) => {
                    // PUBACK 0x87 in its turn (after earlier messages' PUBACKs), then DISCONNECT.
                    self.inflight.push_back(InFlight {
                        seq: self.next_seq,
                        pkid: Some(pkid),
                        code: Some(rc::NOT_AUTHORIZED),
                        refused: Some(Reason::TopicNotAuthorized),
                        unavailable: false,
                    });
                    self.next_seq += 1;
                    self.state = State::Draining(Some(rc::NOT_AUTHORIZED));
                    self.flush_ready(out);
                }
                (Protocol::V5, _) => self.disconnect(out, rc::NOT_AUTHORIZED),
                (Protocol::V311, _) => self.close(out),
            }
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let pkid = (qos == QoS::AtLeastOnce).then_some(pkid);
        self.inflight.push_back(InFlight {
            seq,
            pkid,
            code: None,
            refused: None,
            unavailable: false,
        });
        out.push(Action::Deliver(Delivery {
            seq,
            topic,
            payload,
            qos,
        }));
    }

    /// The pipeline's verdict on delivery `seq`. PUBACKs go out in PUBLISH order: a verdict that
    /// overtakes an earlier one waits.
    pub fn on_verdict(&mut self, seq: u64, verdict: Verdict, out: &mut Vec<Action>) {
        if self.state == State::Closed {
            return;
        }
        let code = verdict.puback_code(self.protocol);
        if let Some(entry) = self
            .inflight
            .iter_mut()
            .find(|e| e.seq == seq && e.code.is_none())
        {
            entry.code = Some(code);
            entry.refused = match verdict {
                Verdict::Rejected(reason) => Some(reason),
                _ => None,
            };
            entry.unavailable = verdict == Verdict::Unavailable;
        }
        self.flush_ready(out);
    }

    /// A head-end → meter message: `payload` for the meter's `topic` (its commands or firmware
    /// topic), `tag` the caller's id for it. It is sent as a QoS 1 PUBLISH once the meter has
    /// subscribed to `topic` and the in-flight window has room; [`Action::OutboundDone`] with
    /// `tag` reports how it ended (at once for a refusal or a session that is ending).
    pub fn publish(&mut self, topic: &str, payload: Bytes, tag: u64, out: &mut Vec<Action>) {
        let done = |result| Action::OutboundDone { tag, result };
        if matches!(self.state, State::Draining(_) | State::Closed) {
            out.push(done(OutboundResult::Disconnected));
            return;
        }
        let Some(to) = self.downlink(topic) else {
            out.push(done(OutboundResult::Refused(
                OutboundRefusal::TopicNotAllowed {
                    topic: topic.to_owned(),
                },
            )));
            return;
        };
        if self.state == State::Connected {
            let size = publish_len(self.protocol, topic.len(), payload.len());
            let max = self
                .client_max_packet_size
                .min(codec::MAX_REMAINING_LENGTH + 5);
            if size > max {
                out.push(done(OutboundResult::Refused(OutboundRefusal::TooLarge {
                    size,
                    max,
                })));
                return;
            }
        }
        if self.outbound_queue.len() >= self.max_outbound_queue {
            out.push(done(OutboundResult::Refused(OutboundRefusal::QueueFull {
                max: self.max_outbound_queue,
            })));
            return;
        }
        self.outbound_queue.push_back(Outbound { tag, to, payload });
        self.send_outbound(out);
    }

    /// The connection ended under the session (the peer closed it, a read or write failed):
    /// closes without sending anything; every message not yet acknowledged ends with
    /// [`OutboundResult::Disconnected`].
    pub fn on_connection_lost(&mut self, out: &mut Vec<Action>) {
        self.close(out);
    }

    /// Ends the session from outside.
    pub fn on_cancel(&mut self, cause: Cancel, out: &mut Vec<Action>) {
        match self.state {
            State::Closed => {}
            State::AwaitingConnect => self.close(out),
            State::Connected | State::Draining(_) => match cause {
                Cancel::Shutdown => {
                    self.state = State::Draining(Some(rc::SERVER_SHUTTING_DOWN));
                    self.flush_ready(out);
                }
                Cancel::TakenOver => self.disconnect(out, rc::SESSION_TAKEN_OVER),
                Cancel::Revoked => {
                    self.event(
                        out,
                        Reason::CertificateRevoked,
                        "certificate revoked while connected".to_owned(),
                    );
                    self.disconnect(out, rc::NOT_AUTHORIZED);
                }
                Cancel::Admin => self.disconnect(out, rc::ADMINISTRATIVE_ACTION),
                Cancel::Lifetime => self.disconnect(out, rc::MAXIMUM_CONNECT_TIME),
            },
        }
    }

    /// Gives up waiting for in-flight verdicts (drain deadline passed): closes at once.
    pub fn force_close(&mut self, out: &mut Vec<Action>) {
        match self.state {
            State::Closed => {}
            State::Draining(code) => self.disconnect(out, code.unwrap_or(rc::UNSPECIFIED)),
            _ => self.close(out),
        }
    }

    /// Sends the PUBACKs that are due, in order; finishes a drain.
    fn flush_ready(&mut self, out: &mut Vec<Action>) {
        let mut buf = BytesMut::new();
        while let Some(InFlight {
            pkid,
            code: Some(code),
            refused,
            unavailable,
            ..
        }) = self.inflight.front().copied()
        {
            if unavailable {
                // Acknowledge nothing from here on: the meter resends this message and the
                // ones after it on its next connection.
                if !buf.is_empty() {
                    out.push(Action::Send(buf.freeze()));
                }
                self.inflight.clear();
                self.disconnect(out, rc::SERVER_BUSY);
                return;
            }
            self.inflight.pop_front();
            if let Some(pkid) = pkid {
                match refused.map(Reason::code) {
                    // MQTT 5: the refusal names its reason (`replay`, `stale`, ...) to the meter,
                    // unless that makes the PUBACK larger than the client accepts.
                    Some(reason) if self.reason_strings => {
                        let start = buf.len();
                        codec::encode_puback_with_reason(&mut buf, pkid, code, reason);
                        if buf.len() - start > self.client_max_packet_size {
                            buf.truncate(start);
                            codec::encode_puback(&mut buf, self.protocol, pkid, code);
                        }
                    }
                    _ => codec::encode_puback(&mut buf, self.protocol, pkid, code),
                }
            }
        }
        if !buf.is_empty() {
            out.push(Action::Send(buf.freeze()));
        }
        if let State::Draining(code) = self.state
            && self.inflight.is_empty()
        {
            match code {
                Some(code) => self.disconnect(out, code),
                None => self.close(out),
            }
        }
    }

    /// Which of the meter's downward topics `topic` is, if any (never any for a concentrator).
    fn downlink(&self, topic: &str) -> Option<Downlink> {
        let [commands, firmware] = self.downlinks.as_ref()?;
        if topic == commands {
            Some(Downlink::Commands)
        } else if topic == firmware {
            Some(Downlink::Firmware)
        } else {
            None
        }
    }

    /// The topic of `to` (only called for a `Downlink` that [`Self::downlink`] returned).
    fn topic(&self, to: Downlink) -> &str {
        self.downlinks
            .as_ref()
            .map_or("", |topics| topics[to as usize].as_str())
    }

    /// An unused packet id for a server → client PUBLISH (1..=65,535, round robin).
    fn allocate_pkid(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let pkid = self.next_pkid;
            self.next_pkid = pkid.checked_add(1).unwrap_or(1);
            if !self.outbound_sent.iter().any(|(p, _)| *p == pkid) {
                return Some(pkid);
            }
        }
        None
    }

    /// Sends every queued message whose topic the meter has subscribed to, oldest first, as far
    /// as the window allows (QoS 0 deliveries need no room in it). Per topic, order is kept.
    fn send_outbound(&mut self, out: &mut Vec<Action>) {
        if self.state != State::Connected {
            return;
        }
        let mut buf = BytesMut::new();
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.outbound_queue.len() {
            let to = self.outbound_queue[i].to;
            let Some(qos) = self.subscriptions[to as usize] else {
                i += 1;
                continue;
            };
            let pkid = if qos == QoS::AtMostOnce {
                0
            } else if self.outbound_sent.len() >= self.outbound_window {
                i += 1;
                continue;
            } else {
                match self.allocate_pkid() {
                    Some(pkid) => pkid,
                    None => break,
                }
            };
            let Some(msg) = self.outbound_queue.remove(i) else {
                break;
            };
            let start = buf.len();
            let encoded = codec::encode_publish(
                &mut buf,
                self.protocol,
                self.topic(to),
                qos,
                pkid,
                false,
                msg.payload,
            );
            let size = buf.len() - start;
            let result = match encoded {
                Ok(()) if size <= self.client_max_packet_size => {
                    if qos == QoS::AtMostOnce {
                        done.push(Action::OutboundDone {
                            tag: msg.tag,
                            result: OutboundResult::SentUnacknowledged,
                        });
                    } else {
                        self.outbound_sent.push_back((pkid, msg.tag));
                    }
                    continue;
                }
                Ok(()) => OutboundRefusal::TooLarge {
                    size,
                    max: self.client_max_packet_size,
                },
                Err(e) => OutboundRefusal::Encoding(e.to_string()),
            };
            buf.truncate(start);
            done.push(Action::OutboundDone {
                tag: msg.tag,
                result: OutboundResult::Refused(result),
            });
        }
        if !buf.is_empty() {
            out.push(Action::Send(buf.freeze()));
        }
        out.extend(done);
    }

    fn event(&self, out: &mut Vec<Action>, reason: Reason, detail: String) {
        out.push(Action::Event { reason, detail });
    }

    /// MQTT 5: DISCONNECT with `code`, then close; 3.1.1: close (servers send no DISCONNECT).
    fn disconnect(&mut self, out: &mut Vec<Action>, code: u8) {
        if self.protocol == Protocol::V5 && self.state != State::AwaitingConnect {
            let mut buf = BytesMut::new();
            codec::encode_disconnect(&mut buf, Protocol::V5, code);
            out.push(Action::Send(buf.freeze()));
        }
        self.close(out);
    }

    fn close(&mut self, out: &mut Vec<Action>) {
        if self.state != State::Closed {
            self.state = State::Closed;
            let sent = self.outbound_sent.drain(..).map(|(_, tag)| tag);
            let queued = self.outbound_queue.drain(..).map(|m| m.tag);
            for tag in sent.chain(queued) {
                out.push(Action::OutboundDone {
                    tag,
                    result: OutboundResult::Disconnected,
                });
            }
            out.push(Action::Close);
        }
    }
}

/// Size of a PUBLISH packet without properties, fixed header included.
fn publish_len(protocol: Protocol, topic_len: usize, payload_len: usize) -> usize {
    let properties = usize::from(protocol == Protocol::V5);
    let remaining = 2 + topic_len + 2 + properties + payload_len;
    let length_field = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_field + remaining
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cfg() -> EndpointConfig {
        EndpointConfig {
            max_inflight: 3,
            rate_burst: 5,
            rate_per_second: 1.0,
            ..EndpointConfig::default()
        }
    }

    fn meter() -> MeterId {
        MeterId::new("MTR-1").unwrap()
    }

    fn connect(protocol: Protocol, id: &str, keep_alive: u16) -> Packet {
        Packet::Connect(ConnectInfo {
            protocol,
            client_id: id.into(),
            keep_alive,
            clean_start: true,
            has_will: false,
            username: None,
            problem_information: protocol == Protocol::V5,
            max_packet_size: None,
            receive_maximum: None,
        })
    }

    fn publish(topic: &str, qos: QoS, pkid: u16) -> Packet {
        Packet::Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            pkid,
            payload: Bytes::from_static(b"p"),
        }
    }

    /// Decodes every Send in `out` as server→client packets.
    fn sent(protocol: Protocol, out: &[Action]) -> Vec<Packet> {
        let mut v = Vec::new();
        for a in out {
            if let Action::Send(b) = a {
                let mut rest = &b[..];
                while !rest.is_empty() {
                    let n = codec::frame_len(rest, usize::MAX).unwrap().unwrap();
                    v.push(codec::decode(protocol, &rest[..n]).unwrap());
                    rest = &rest[n..];
                }
            }
        }
        v
    }

    fn events(out: &[Action]) -> Vec<Reason> {
        out.iter()
            .filter_map(|a| match a {
                Action::Event { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    fn connected(protocol: Protocol) -> (Session, Instant) {
        let t0 = Instant::now();
        let mut s = Session::new(meter(), &cfg(), t0);
        let mut out = Vec::new();
        s.on_packet(connect(protocol, "MTR-1", 30), t0, &mut out);
        assert!(s.is_connected());
        (s, t0)
    }

    #[test]
    fn genuine_connect_gets_connack_and_properties() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let t0 = Instant::now();
            let mut s = Session::new(meter(), &cfg(), t0);
            let mut out = Vec::new();
            s.on_packet(connect(protocol, "MTR-1", 30), t0, &mut out);
            assert_eq!(
                sent(protocol, &out),
                vec![Packet::ConnAck {
                    session_present: false,
                    code: 0
                }]
            );
            assert_eq!(
                out.last(),
                Some(&Action::Connected {
                    protocol,
                    keep_alive: Duration::from_secs(30)
                })
            );
            assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(45)));
        }
    }

    #[test]
    fn client_id_of_another_meter_is_refused() {
        for (protocol, code) in [(Protocol::V311, 5), (Protocol::V5, 0x87)] {
            let t0 = Instant::now();
            let mut s = Session::new(meter(), &cfg(), t0);
            let mut out = Vec::new();
            s.on_packet(connect(protocol, "MTR-2", 30), t0, &mut out);
            assert_eq!(events(&out), vec![Reason::ClientIdMismatch]);
            assert_eq!(
                sent(protocol, &out),
                vec![Packet::ConnAck {
                    session_present: false,
                    code
                }]
            );
            assert_eq!(out.last(), Some(&Action::Close));
            assert!(s.is_closed() && !s.is_connected());
        }
    }

    #[test]
    fn first_packet_must_be_connect() {
        let t0 = Instant::now();
        let mut s = Session::new(meter(), &cfg(), t0);
        let mut out = Vec::new();
        s.on_packet(Packet::PingReq, t0, &mut out);
        assert_eq!(events(&out), vec![Reason::MalformedPacket]);
        assert_eq!(out.last(), Some(&Action::Close));
    }

    #[test]
    fn unsupported_protocol_gets_connack_1() {
        let t0 = Instant::now();
        let mut s = Session::new(meter(), &cfg(), t0);
        let mut out = Vec::new();
        s.on_decode_error(
            &CodecError::UnsupportedProtocol {
                name: "MQIsdp".into(),
                level: 3,
            },
            &mut out,
        );
        assert_eq!(events(&out), vec![Reason::MalformedPacket]);
        assert_eq!(
            sent(Protocol::V311, &out),
            vec![Packet::ConnAck {
                session_present: false,
                code: 1
            }]
        );
        assert!(s.is_closed());
    }

    #[test]
    fn unavailable_verdict_acknowledges_nothing_from_there_and_closes() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let (mut s, t0) = connected(protocol);
            let mut out = Vec::new();
            for pkid in 1..=3 {
                s.on_packet(
                    publish("meters/MTR-1/readings", QoS::AtLeastOnce, pkid),
                    t0,
                    &mut out,
                );
            }
            let mut out = Vec::new();
            s.on_verdict(2, Verdict::Accepted, &mut out);
            s.on_verdict(0, Verdict::Accepted, &mut out);
            s.on_verdict(1, Verdict::Unavailable, &mut out);
            let acked: Vec<u16> = sent(protocol, &out)
                .into_iter()
                .filter_map(|p| match p {
                    Packet::PubAck { pkid, .. } => Some(pkid),
                    _ => None,
                })
                .collect();
            assert_eq!(
                acked,
                vec![1],
                "only the message before the undecided one is acknowledged"
            );
            assert!(out.iter().any(|a| matches!(a, Action::Close)));
            if protocol == Protocol::V5 {
                assert!(sent(protocol, &out).contains(&Packet::Disconnect {
                    reason_code: rc::SERVER_BUSY
                }));
            }
        }
    }

    /// Issue 17: a replay got the generic PUBACK 0x80; under MQTT 5 it now gets 0x83 and the
    /// refusal's reason code as Reason String, unless the client declined problem information
    /// or the PUBACK would exceed its Maximum Packet Size.
    #[test]
    fn refused_puback_names_its_reason_when_the_client_allows() {
        let replay_puback = |problem_information: bool, max_packet_size: Option<u32>| {
            let t0 = Instant::now();
            let mut s = Session::new(meter(), &cfg(), t0);
            let mut out = Vec::new();
            let Packet::Connect(info) = connect(Protocol::V5, "MTR-1", 30) else {
                unreachable!()
            };
            let info = ConnectInfo {
                problem_information,
                max_packet_size,
                ..info
            };
            s.on_packet(Packet::Connect(info), t0, &mut out);
            s.on_packet(
                publish("meters/MTR-1/readings", QoS::AtLeastOnce, 7),
                t0,
                &mut out,
            );
            let mut out = Vec::new();
            s.on_verdict(0, Verdict::Rejected(Reason::Replay), &mut out);
            let [Action::Send(bytes)] = &out[..] else {
                panic!("one PUBACK: {out:?}")
            };
            bytes.to_vec()
        };
        let mut with_reason = BytesMut::new();
        codec::encode_puback_with_reason(&mut with_reason, 7, 0x83, "replay");
        assert_eq!(replay_puback(true, None), with_reason.to_vec());
        let bare = vec![0x40, 3, 0, 7, 0x83];
        assert_eq!(
            replay_puback(false, None),
            bare,
            "problem information declined"
        );
        assert_eq!(replay_puback(true, Some(8)), bare, "would exceed 8 bytes");
    }

    #[test]
    fn pubacks_wait_for_verdicts_and_keep_order() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let (mut s, t0) = connected(protocol);
            let mut out = Vec::new();
            s.on_packet(
                publish("meters/MTR-1/readings", QoS::AtLeastOnce, 10),
                t0,
                &mut out,
            );
            s.on_packet(
                publish("meters/MTR-1/events", QoS::AtLeastOnce, 11),
                t0,
                &mut out,
            );
            s.on_packet(
                publish("meters/MTR-1/readings", QoS::AtMostOnce, 0),
                t0,
                &mut out,
            );
            let seqs: Vec<u64> = out
                .iter()
                .filter_map(|a| match a {
                    Action::Deliver(d) => Some(d.seq),
                    _ => None,
                })
                .collect();
            assert_eq!(seqs, vec![0, 1, 2]);
            assert!(
                sent(protocol, &out).is_empty(),
                "no PUBACK before a verdict"
            );
            assert!(!s.wants_read(), "window of 3 is full");
            // The second verdict first: nothing may go out yet.
            let mut out = Vec::new();
            s.on_verdict(1, Verdict::Rejected(Reason::BadSignature), &mut out);
            assert!(out.is_empty());
            s.on_verdict(2, Verdict::Accepted, &mut out);
            assert!(out.is_empty());
            s.on_verdict(0, Verdict::Duplicate, &mut out);
            let second = if protocol == Protocol::V5 { 0x87 } else { 0 };
            assert_eq!(
                sent(protocol, &out),
                vec![
                    Packet::PubAck {
                        pkid: 10,
                        reason_code: 0
                    },
                    Packet::PubAck {
                        pkid: 11,
                        reason_code: second
                    }
                ]
            );
            assert!(s.wants_read() && s.inflight() == 0);
            // An unknown or repeated verdict changes nothing.
            let mut out = Vec::new();
            s.on_verdict(0, Verdict::Accepted, &mut out);
            s.on_verdict(99, Verdict::Accepted, &mut out);
            assert!(out.is_empty());
        }
    }

    #[test]
    fn publish_to_another_meters_topic_is_refused() {
        // 3.1.1: close.
        let (mut s, t0) = connected(Protocol::V311);
        let mut out = Vec::new();
        s.on_packet(
            publish("meters/MTR-2/readings", QoS::AtLeastOnce, 1),
            t0,
            &mut out,
        );
        assert_eq!(events(&out), vec![Reason::TopicNotAuthorized]);
        assert!(sent(Protocol::V311, &out).is_empty());
        assert_eq!(out.last(), Some(&Action::Close));
        // 5: PUBACK 0x87 after the earlier message's PUBACK, then DISCONNECT 0x87.
        let (mut s, t0) = connected(Protocol::V5);
        let mut out = Vec::new();
        s.on_packet(
            publish("meters/MTR-1/readings", QoS::AtLeastOnce, 1),
            t0,
            &mut out,
        );
        s.on_packet(
            publish("meters/MTR-1/commands", QoS::AtLeastOnce, 2),
            t0,
            &mut out,
        );
        assert_eq!(events(&out), vec![Reason::TopicNotAuthorized]);
        assert!(!s.wants_read());
        assert!(sent(Protocol::V5, &out).is_empty());
        let mut out = Vec::new();
        s.on_verdict(0, Verdict::Accepted, &mut out);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![
                Packet::PubAck {
                    pkid: 1,
                    reason_code: 0
                },
                Packet::PubAck {
                    pkid: 2,
                    reason_code: 0x87
                },
                Packet::Disconnect { reason_code: 0x87 },
            ]
        );
        assert_eq!(out.last(), Some(&Action::Close));
    }

    #[test]
    fn wildcard_and_foreign_subscriptions_fail() {
        for (protocol, fail) in [(Protocol::V311, 0x80), (Protocol::V5, 0x87)] {
            let (mut s, t0) = connected(protocol);
            let mut out = Vec::new();
            s.on_packet(
                Packet::Subscribe {
                    pkid: 4,
                    filters: vec![
                        ("#".into(), QoS::AtLeastOnce),
                        ("meters/MTR-1/commands".into(), QoS::AtLeastOnce),
                        ("meters/+/commands".into(), QoS::AtMostOnce),
                        ("meters/MTR-1/commands".into(), QoS::ExactlyOnce),
                    ],
                },
                t0,
                &mut out,
            );
            assert_eq!(events(&out), vec![Reason::SubscribeNotAuthorized; 3]);
            assert_eq!(
                sent(protocol, &out),
                vec![Packet::SubAck {
                    pkid: 4,
                    return_codes: vec![fail, 1, fail, fail]
                }]
            );
            assert!(s.is_connected());
        }
    }

    #[test]
    fn qos2_is_refused() {
        let (mut s, t0) = connected(Protocol::V5);
        let mut out = Vec::new();
        s.on_packet(
            publish("meters/MTR-1/readings", QoS::ExactlyOnce, 1),
            t0,
            &mut out,
        );
        assert_eq!(events(&out), vec![Reason::MalformedPacket]);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![Packet::Disconnect { reason_code: 0x9B }]
        );
        assert!(s.is_closed());
    }

    #[test]
    fn a_session_continues_with_the_bucket_it_is_given() {
        // The first connection spends the burst (5) ...
        let (mut first, t0) = connected(Protocol::V5);
        let mut out = Vec::new();
        for _ in 0..5 {
            first.on_packet(Packet::PingReq, t0, &mut out);
        }
        assert!(events(&out).is_empty());
        // ... and the next one, given that bucket, is refused at once.
        let mut next = Session::new(meter(), &cfg(), t0);
        next.on_packet(connect(Protocol::V5, "MTR-1", 30), t0, &mut out);
        next.set_bucket(first.bucket().clone());
        let mut out = Vec::new();
        next.on_packet(Packet::PingReq, t0, &mut out);
        assert_eq!(events(&out), vec![Reason::RateLimited]);
        assert!(next.is_closed());
    }

    #[test]
    fn rate_limit_disconnects() {
        let (mut s, t0) = connected(Protocol::V5);
        let mut out = Vec::new();
        for _ in 0..5 {
            s.on_packet(Packet::PingReq, t0, &mut out);
        }
        assert!(events(&out).is_empty());
        s.on_packet(Packet::PingReq, t0, &mut out);
        assert_eq!(events(&out), vec![Reason::RateLimited]);
        assert_eq!(
            sent(Protocol::V5, &out).last(),
            Some(&Packet::Disconnect { reason_code: 0x96 })
        );
        assert!(s.is_closed());
        // Messages in flight still get their PUBACKs before the DISCONNECT.
        let (mut s, t0) = connected(Protocol::V5);
        let mut out = Vec::new();
        for pkid in 1..=6 {
            s.on_packet(
                publish("meters/MTR-1/readings", QoS::AtLeastOnce, pkid),
                t0,
                &mut out,
            );
            if pkid == 3 {
                for seq in 0..3 {
                    s.on_verdict(seq, Verdict::Accepted, &mut out);
                }
            }
        }
        assert_eq!(events(&out), vec![Reason::RateLimited]);
        assert!(s.is_draining() && !s.wants_read());
        let mut out = Vec::new();
        s.on_verdict(3, Verdict::Accepted, &mut out);
        s.on_verdict(4, Verdict::Accepted, &mut out);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![
                Packet::PubAck {
                    pkid: 4,
                    reason_code: 0
                },
                Packet::PubAck {
                    pkid: 5,
                    reason_code: 0
                },
                Packet::Disconnect { reason_code: 0x96 }
            ]
        );
        assert!(s.is_closed());
        // Refilled after a second: allowed again (on a fresh session).
        let (mut s, t0) = connected(Protocol::V311);
        let mut out = Vec::new();
        for i in 0..8u64 {
            s.on_packet(Packet::PingReq, t0 + Duration::from_secs(i), &mut out);
        }
        assert!(events(&out).is_empty());
    }

    #[test]
    fn keep_alive_and_connect_timeouts() {
        let t0 = Instant::now();
        let mut s = Session::new(meter(), &cfg(), t0);
        let mut out = Vec::new();
        s.on_tick(t0 + Duration::from_secs(9), &mut out);
        assert!(out.is_empty());
        s.on_tick(t0 + Duration::from_secs(10), &mut out);
        assert_eq!(events(&out), vec![Reason::Timeout]);
        assert!(s.is_closed());

        let (mut s, t0) = connected(Protocol::V5);
        let mut out = Vec::new();
        s.on_packet(Packet::PingReq, t0 + Duration::from_secs(40), &mut out);
        s.on_tick(t0 + Duration::from_secs(84), &mut out);
        assert!(events(&out).is_empty());
        s.on_tick(t0 + Duration::from_secs(85), &mut out);
        assert_eq!(events(&out), vec![Reason::Timeout]);
        assert_eq!(
            sent(Protocol::V5, &out).last(),
            Some(&Packet::Disconnect { reason_code: 0x8D })
        );
    }

    #[test]
    fn zero_keep_alive_gets_the_maximum() {
        let t0 = Instant::now();
        let mut s = Session::new(meter(), &cfg(), t0);
        let mut out = Vec::new();
        s.on_packet(connect(Protocol::V5, "MTR-1", 0), t0, &mut out);
        let max = cfg().max_keep_alive;
        assert_eq!(
            out.last(),
            Some(&Action::Connected {
                protocol: Protocol::V5,
                keep_alive: max
            })
        );
        assert_eq!(s.deadline(), Some(t0 + max.mul_f64(1.5)));
    }

    #[test]
    fn decode_errors_and_protocol_violations_close() {
        let (mut s, _) = connected(Protocol::V5);
        let mut out = Vec::new();
        s.on_decode_error(
            &CodecError::TooLarge {
                size: 1 << 20,
                max: 65536,
            },
            &mut out,
        );
        assert_eq!(events(&out), vec![Reason::PacketTooLarge]);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![Packet::Disconnect { reason_code: 0x95 }]
        );

        let (mut s, t0) = connected(Protocol::V311);
        let mut out = Vec::new();
        s.on_decode_error(
            &CodecError::Malformed {
                packet: "PUBLISH",
                detail: "x".into(),
            },
            &mut out,
        );
        assert_eq!(events(&out), vec![Reason::MalformedPacket]);
        assert_eq!(out.last(), Some(&Action::Close));
        // Nothing more happens after close.
        let mut out = Vec::new();
        s.on_packet(Packet::PingReq, t0, &mut out);
        s.on_decode_error(&CodecError::MalformedLength, &mut out);
        assert!(out.is_empty());

        let (mut s, t0) = connected(Protocol::V311);
        let mut out = Vec::new();
        s.on_packet(connect(Protocol::V311, "MTR-1", 30), t0, &mut out);
        assert_eq!(events(&out), vec![Reason::MalformedPacket]);
        assert!(s.is_closed());
    }

    #[test]
    fn shutdown_drains_then_disconnects() {
        let (mut s, t0) = connected(Protocol::V5);
        let mut out = Vec::new();
        s.on_packet(
            publish("meters/MTR-1/readings", QoS::AtLeastOnce, 7),
            t0,
            &mut out,
        );
        let mut out = Vec::new();
        s.on_cancel(Cancel::Shutdown, &mut out);
        assert!(out.is_empty() && !s.wants_read() && !s.is_closed());
        s.on_verdict(0, Verdict::Accepted, &mut out);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![
                Packet::PubAck {
                    pkid: 7,
                    reason_code: 0
                },
                Packet::Disconnect { reason_code: 0x8B }
            ]
        );
        assert!(s.is_closed());

        // Drain deadline: force close without the PUBACK.
        let (mut s, t0) = connected(Protocol::V311);
        let mut out = Vec::new();
        s.on_packet(
            publish("meters/MTR-1/readings", QoS::AtLeastOnce, 7),
            t0,
            &mut out,
        );
        s.on_cancel(Cancel::Shutdown, &mut out);
        let mut out = Vec::new();
        s.force_close(&mut out);
        assert_eq!(out, vec![Action::Close]);
    }

    #[test]
    fn revocation_and_takeover() {
        let (mut s, _) = connected(Protocol::V5);
        let mut out = Vec::new();
        s.on_cancel(Cancel::Revoked, &mut out);
        assert_eq!(events(&out), vec![Reason::CertificateRevoked]);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![Packet::Disconnect { reason_code: 0x87 }]
        );
        let (mut s, _) = connected(Protocol::V5);
        let mut out = Vec::new();
        s.on_cancel(Cancel::TakenOver, &mut out);
        assert!(events(&out).is_empty());
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![Packet::Disconnect { reason_code: 0x8E }]
        );
    }

    // ------------------------------------------------------------------------------------------
    // The downward path: head-end → meter publishes.

    const COMMANDS: &str = "meters/MTR-1/commands";
    const FIRMWARE: &str = "meters/MTR-1/firmware";

    /// Connected with CONNECT properties changed by `f`.
    fn connected_with(protocol: Protocol, f: impl FnOnce(&mut ConnectInfo)) -> Session {
        let t0 = Instant::now();
        let mut s = Session::new(meter(), &cfg(), t0);
        let Packet::Connect(mut info) = connect(protocol, "MTR-1", 30) else {
            unreachable!()
        };
        f(&mut info);
        let mut out = Vec::new();
        s.on_packet(Packet::Connect(info), t0, &mut out);
        assert!(s.is_connected(), "{out:?}");
        s
    }

    fn subscribe(s: &mut Session, pkid: u16, topic: &str, qos: QoS) -> Vec<Action> {
        let mut out = Vec::new();
        s.on_packet(
            Packet::Subscribe {
                pkid,
                filters: vec![(topic.into(), qos)],
            },
            Instant::now(),
            &mut out,
        );
        out
    }

    fn payload(n: u64) -> Bytes {
        Bytes::from(format!("command {n}").into_bytes())
    }

    /// The PUBLISHes among the Sends of `out`: (pkid, topic, payload), checking the flags.
    fn publishes(protocol: Protocol, out: &[Action]) -> Vec<(u16, String, Bytes)> {
        sent(protocol, out)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish {
                    dup,
                    qos,
                    retain,
                    topic,
                    pkid,
                    payload,
                } => {
                    assert!(!dup, "a first send never has DUP set");
                    assert!(!retain);
                    assert_eq!(qos, QoS::AtLeastOnce);
                    Some((pkid, topic, payload))
                }
                _ => None,
            })
            .collect()
    }

    fn done(out: &[Action]) -> Vec<(u64, OutboundResult)> {
        out.iter()
            .filter_map(|a| match a {
                Action::OutboundDone { tag, result } => Some((*tag, result.clone())),
                _ => None,
            })
            .collect()
    }

    fn puback(s: &mut Session, pkid: u16, reason_code: u8) -> Vec<Action> {
        let mut out = Vec::new();
        s.on_packet(
            Packet::PubAck { pkid, reason_code },
            Instant::now(),
            &mut out,
        );
        out
    }

    #[test]
    fn publish_before_subscribe_waits_then_goes_out_after_the_suback() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let (mut s, _) = connected(protocol);
            let mut out = Vec::new();
            s.publish(COMMANDS, payload(1), 41, &mut out);
            assert!(out.is_empty(), "nothing before the subscription: {out:?}");
            assert_eq!((s.outbound_queued(), s.outbound_inflight()), (1, 0));
            assert!(!s.is_subscribed(COMMANDS));

            let out = subscribe(&mut s, 9, COMMANDS, QoS::AtLeastOnce);
            assert!(s.is_subscribed(COMMANDS) && !s.is_subscribed(FIRMWARE));
            // SUBACK, then the notification, then the waiting PUBLISH.
            assert!(matches!(&out[..], [
                Action::Send(_),
                Action::Subscribed { topic },
                Action::Send(_),
            ] if topic == COMMANDS));
            assert_eq!(
                sent(protocol, &out[..1]),
                vec![Packet::SubAck {
                    pkid: 9,
                    return_codes: vec![1]
                }]
            );
            assert_eq!(
                publishes(protocol, &out),
                vec![(1, COMMANDS.to_owned(), payload(1))]
            );
            assert_eq!((s.outbound_queued(), s.outbound_inflight()), (0, 1));

            // Subscribed: the next one goes out at once, with the next packet id.
            let mut out = Vec::new();
            s.publish(COMMANDS, payload(2), 42, &mut out);
            assert_eq!(
                publishes(protocol, &out),
                vec![(2, COMMANDS.to_owned(), payload(2))]
            );
            // Subscribing again is granted, but is no news.
            let out = subscribe(&mut s, 10, COMMANDS, QoS::AtLeastOnce);
            assert!(!out.iter().any(|a| matches!(a, Action::Subscribed { .. })));
        }
    }

    #[test]
    fn each_topic_waits_for_its_own_subscription() {
        let (mut s, _) = connected(Protocol::V5);
        let mut out = Vec::new();
        s.publish(COMMANDS, payload(1), 1, &mut out);
        s.publish(FIRMWARE, payload(2), 2, &mut out);
        s.publish(COMMANDS, payload(3), 3, &mut out);
        assert!(out.is_empty());
        let out = subscribe(&mut s, 1, FIRMWARE, QoS::AtLeastOnce);
        assert_eq!(
            publishes(Protocol::V5, &out),
            vec![(1, FIRMWARE.to_owned(), payload(2))]
        );
        let out = subscribe(&mut s, 2, COMMANDS, QoS::AtLeastOnce);
        assert_eq!(
            publishes(Protocol::V5, &out),
            vec![
                (2, COMMANDS.to_owned(), payload(1)),
                (3, COMMANDS.to_owned(), payload(3))
            ],
            "in order"
        );
    }

    #[test]
    fn puback_ends_the_message_and_unknown_pkids_are_ignored() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let (mut s, _) = connected(protocol);
            subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
            let mut out = Vec::new();
            s.publish(COMMANDS, payload(1), 7, &mut out);
            s.publish(COMMANDS, payload(2), 8, &mut out);
            // An id the server never used, and the meter's own (inbound) id space: ignored.
            assert!(puback(&mut s, 99, 0).is_empty());
            // Out of order is fine: each PUBACK names its message.
            let code = if protocol == Protocol::V5 { 0x10 } else { 0 };
            assert_eq!(
                done(&puback(&mut s, 2, code)),
                vec![(8, OutboundResult::Acked { reason_code: code })]
            );
            assert_eq!(
                done(&puback(&mut s, 1, 0)),
                vec![(7, OutboundResult::Acked { reason_code: 0 })]
            );
            // Repeated: nothing more.
            assert!(puback(&mut s, 1, 0).is_empty());
            assert_eq!(s.outbound_inflight(), 0);
            assert!(s.is_connected());
        }
    }

    #[test]
    fn receive_maximum_bounds_the_window() {
        let mut s = connected_with(Protocol::V5, |c| c.receive_maximum = Some(2));
        subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
        let mut out = Vec::new();
        for tag in 0..5 {
            s.publish(COMMANDS, payload(tag), tag, &mut out);
        }
        let first: Vec<u16> = publishes(Protocol::V5, &out).iter().map(|p| p.0).collect();
        assert_eq!(first, vec![1, 2], "two in flight at most");
        assert_eq!((s.outbound_inflight(), s.outbound_queued()), (2, 3));
        // Each PUBACK makes room for exactly one more, in order.
        let out = puback(&mut s, 1, 0);
        assert_eq!(
            publishes(Protocol::V5, &out),
            vec![(3, COMMANDS.to_owned(), payload(2))]
        );
        assert_eq!(
            done(&out),
            vec![(0, OutboundResult::Acked { reason_code: 0 })]
        );
        assert_eq!(s.outbound_inflight(), 2);
    }

    #[test]
    fn window_defaults_to_the_configured_16_and_a_larger_receive_maximum_does_not_raise_it() {
        let config = EndpointConfig {
            max_outbound_queue: 100,
            ..cfg()
        };
        for (protocol, receive_maximum) in [(Protocol::V311, None), (Protocol::V5, Some(1000))] {
            let t0 = Instant::now();
            let mut s = Session::new(meter(), &config, t0);
            let Packet::Connect(mut info) = connect(protocol, "MTR-1", 30) else {
                unreachable!()
            };
            info.receive_maximum = receive_maximum;
            let mut out = Vec::new();
            s.on_packet(Packet::Connect(info), t0, &mut out);
            subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
            let mut out = Vec::new();
            for tag in 0..20 {
                s.publish(COMMANDS, payload(tag), tag, &mut out);
            }
            assert_eq!(publishes(protocol, &out).len(), 16, "{protocol:?}");
            assert_eq!(s.outbound_queued(), 4);
        }
    }

    #[test]
    fn receive_maximum_zero_is_a_protocol_error() {
        let t0 = Instant::now();
        let mut s = Session::new(meter(), &cfg(), t0);
        let Packet::Connect(mut info) = connect(Protocol::V5, "MTR-1", 30) else {
            unreachable!()
        };
        info.receive_maximum = Some(0);
        let mut out = Vec::new();
        s.on_packet(Packet::Connect(info), t0, &mut out);
        assert_eq!(events(&out), vec![Reason::MalformedPacket]);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![Packet::ConnAck {
                session_present: false,
                code: 0x82
            }]
        );
        assert!(s.is_closed() && !s.is_connected());
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap_around() {
        let (mut s, _) = connected(Protocol::V5);
        subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
        let mut out = Vec::new();
        s.publish(COMMANDS, payload(0), 0, &mut out); // pkid 1, left unacknowledged
        s.next_pkid = u16::MAX;
        s.publish(COMMANDS, payload(1), 1, &mut out);
        s.publish(COMMANDS, payload(2), 2, &mut out);
        let ids: Vec<u16> = publishes(Protocol::V5, &out).iter().map(|p| p.0).collect();
        assert_eq!(
            ids,
            vec![1, u16::MAX, 2],
            "0 is never used, 1 is still in flight"
        );
    }

    #[test]
    fn close_ends_every_unacknowledged_message_as_disconnected() {
        type Ending = fn(&mut Session, &mut Vec<Action>);
        let endings: [(&str, Ending); 4] = [
            ("taken over", |s, out| s.on_cancel(Cancel::TakenOver, out)),
            ("connection lost", |s, out| s.on_connection_lost(out)),
            ("keep-alive", |s, out| {
                s.on_tick(Instant::now() + Duration::from_secs(3600), out)
            }),
            ("meter's DISCONNECT", |s, out| {
                s.on_packet(Packet::Disconnect { reason_code: 0 }, Instant::now(), out)
            }),
        ];
        for (name, end) in endings {
            let mut s = connected_with(Protocol::V5, |c| c.receive_maximum = Some(1));
            let mut out = Vec::new();
            s.publish(FIRMWARE, payload(0), 10, &mut out); // waits for a subscription
            subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
            s.publish(COMMANDS, payload(1), 11, &mut out); // sent
            s.publish(COMMANDS, payload(2), 12, &mut out); // waits for the window
            assert_eq!((s.outbound_inflight(), s.outbound_queued()), (1, 2));
            let mut out = Vec::new();
            end(&mut s, &mut out);
            let mut tags: Vec<u64> = done(&out)
                .into_iter()
                .map(|(tag, result)| {
                    assert_eq!(result, OutboundResult::Disconnected, "{name}");
                    tag
                })
                .collect();
            tags.sort_unstable();
            assert_eq!(tags, vec![10, 11, 12], "{name}");
            assert_eq!(out.last(), Some(&Action::Close), "{name}: Close comes last");
            // A PUBACK after the end changes nothing; a new message ends at once.
            assert!(puback(&mut s, 1, 0).is_empty());
            let mut out = Vec::new();
            s.publish(COMMANDS, payload(3), 13, &mut out);
            assert_eq!(done(&out), vec![(13, OutboundResult::Disconnected)]);
        }
    }

    #[test]
    fn a_draining_session_sends_nothing_new() {
        let (mut s, t0) = connected(Protocol::V5);
        subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
        let mut out = Vec::new();
        s.on_packet(
            publish("meters/MTR-1/readings", QoS::AtLeastOnce, 3),
            t0,
            &mut out,
        );
        s.on_cancel(Cancel::Shutdown, &mut out);
        assert!(s.is_draining());
        let mut out = Vec::new();
        s.publish(COMMANDS, payload(1), 5, &mut out);
        assert_eq!(done(&out), vec![(5, OutboundResult::Disconnected)]);
        assert!(publishes(Protocol::V5, &out).is_empty());
    }

    #[test]
    fn subscriptions_to_another_meters_downward_topics_are_refused() {
        for (protocol, fail) in [(Protocol::V311, 0x80), (Protocol::V5, 0x87)] {
            let (mut s, t0) = connected(protocol);
            let mut out = Vec::new();
            s.on_packet(
                Packet::Subscribe {
                    pkid: 4,
                    filters: vec![
                        ("meters/MTR-2/commands".into(), QoS::AtLeastOnce),
                        ("meters/MTR-2/firmware".into(), QoS::AtLeastOnce),
                        ("meters/MTR-1/readings".into(), QoS::AtLeastOnce),
                        ("meters/MTR-1/+".into(), QoS::AtLeastOnce),
                        (FIRMWARE.into(), QoS::ExactlyOnce),
                        (FIRMWARE.into(), QoS::AtMostOnce),
                    ],
                },
                t0,
                &mut out,
            );
            assert_eq!(events(&out), vec![Reason::SubscribeNotAuthorized; 5]);
            assert_eq!(
                sent(protocol, &out),
                vec![Packet::SubAck {
                    pkid: 4,
                    return_codes: vec![fail, fail, fail, fail, fail, 0]
                }]
            );
            let notified: Vec<&Action> = out
                .iter()
                .filter(|a| matches!(a, Action::Subscribed { .. }))
                .collect();
            assert_eq!(
                notified,
                vec![&Action::Subscribed {
                    topic: FIRMWARE.into()
                }]
            );
            assert!(s.is_connected() && !s.is_subscribed(COMMANDS));
        }
    }

    #[test]
    fn publish_to_another_topic_is_refused_unsent() {
        let (mut s, _) = connected(Protocol::V5);
        subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
        for topic in [
            "meters/MTR-2/commands",
            "meters/MTR-1/readings",
            "meters/MTR-1/commands/x",
            "#",
        ] {
            let mut out = Vec::new();
            s.publish(topic, payload(1), 3, &mut out);
            assert_eq!(
                done(&out),
                vec![(
                    3,
                    OutboundResult::Refused(OutboundRefusal::TopicNotAllowed {
                        topic: topic.into()
                    })
                )]
            );
            assert!(sent(Protocol::V5, &out).is_empty());
        }
        assert_eq!(s.outbound_queued() + s.outbound_inflight(), 0);
    }

    #[test]
    fn a_publish_larger_than_the_meter_accepts_is_refused_unsent() {
        let mut s = connected_with(Protocol::V5, |c| c.max_packet_size = Some(200));
        let mut out = Vec::new();
        s.publish(COMMANDS, Bytes::from(vec![7u8; 300]), 1, &mut out);
        let size = publish_len(Protocol::V5, COMMANDS.len(), 300);
        assert_eq!(
            done(&out),
            vec![(
                1,
                OutboundResult::Refused(OutboundRefusal::TooLarge { size, max: 200 })
            )]
        );
        // Not queued: the subscription sends nothing.
        let out = subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
        assert!(publishes(Protocol::V5, &out).is_empty());
        // Exactly at the limit goes.
        let fits = (0..200)
            .rev()
            .find(|n| publish_len(Protocol::V5, COMMANDS.len(), *n) <= 200)
            .unwrap();
        let mut out = Vec::new();
        s.publish(COMMANDS, Bytes::from(vec![7u8; fits]), 2, &mut out);
        assert_eq!(publishes(Protocol::V5, &out).len(), 1);
        let Action::Send(bytes) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(bytes.len(), 200);
    }

    #[test]
    fn a_full_queue_refuses_further_messages() {
        let config = EndpointConfig {
            max_outbound_queue: 2,
            ..cfg()
        };
        let t0 = Instant::now();
        let mut s = Session::new(meter(), &config, t0);
        let mut out = Vec::new();
        s.on_packet(connect(Protocol::V5, "MTR-1", 30), t0, &mut out);
        let mut out = Vec::new();
        for tag in 0..3 {
            s.publish(COMMANDS, payload(tag), tag, &mut out);
        }
        assert_eq!(
            done(&out),
            vec![(
                2,
                OutboundResult::Refused(OutboundRefusal::QueueFull { max: 2 })
            )]
        );
        assert_eq!(s.outbound_queued(), 2);
    }

    #[test]
    fn a_qos0_subscription_gets_qos0_and_no_acknowledgement() {
        let (mut s, _) = connected(Protocol::V5);
        let out = subscribe(&mut s, 1, COMMANDS, QoS::AtMostOnce);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![Packet::SubAck {
                pkid: 1,
                return_codes: vec![0]
            }]
        );
        let mut out = Vec::new();
        s.publish(COMMANDS, payload(1), 4, &mut out);
        assert_eq!(
            sent(Protocol::V5, &out),
            vec![Packet::Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: COMMANDS.into(),
                pkid: 0,
                payload: payload(1),
            }]
        );
        assert!(matches!(out[0], Action::Send(_)), "bytes before the report");
        assert_eq!(done(&out), vec![(4, OutboundResult::SentUnacknowledged)]);
        assert_eq!(s.outbound_inflight(), 0);
    }

    #[test]
    fn unsubscribe_removes_the_subscription() {
        let (mut s, t0) = connected(Protocol::V5);
        subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
        let mut out = Vec::new();
        s.on_packet(
            Packet::Unsubscribe {
                pkid: 2,
                filters: vec![COMMANDS.into(), FIRMWARE.into(), "#".into()],
            },
            t0,
            &mut out,
        );
        let [Action::Send(bytes)] = &out[..] else {
            panic!("{out:?}")
        };
        // UNSUBACK pkid 2, no properties, success / no subscription existed ×2.
        assert_eq!(bytes.to_vec(), vec![0xB0, 6, 0, 2, 0, 0x00, 0x11, 0x11]);
        assert!(!s.is_subscribed(COMMANDS));
        let mut out = Vec::new();
        s.publish(COMMANDS, payload(1), 1, &mut out);
        assert!(out.is_empty(), "waits for a new subscription");
        assert_eq!(s.outbound_queued(), 1);
    }

    #[test]
    fn solicited_pubacks_do_not_count_against_the_rate_limit() {
        // Burst 5: the SUBSCRIBE takes one token; ten PUBACKs for our own publishes take none.
        let mut s = connected_with(Protocol::V5, |c| c.receive_maximum = Some(1));
        subscribe(&mut s, 1, COMMANDS, QoS::AtLeastOnce);
        let mut out = Vec::new();
        for tag in 0..10 {
            s.publish(COMMANDS, payload(tag), tag, &mut out);
        }
        for pkid in 1..=10 {
            let out = puback(&mut s, pkid, 0);
            assert_eq!(done(&out).len(), 1, "PUBACK {pkid}");
        }
        assert!(s.is_connected());
        // Stray PUBACKs still do.
        let mut out = Vec::new();
        for _ in 0..5 {
            out.extend(puback(&mut s, 999, 0));
        }
        assert_eq!(events(&out), vec![Reason::RateLimited]);
    }

    #[test]
    fn publish_len_is_the_encoded_size() {
        for protocol in [Protocol::V311, Protocol::V5] {
            for n in [0, 1, 100, 127, 128, 16_000, 16_400, 70_000, 2_100_000] {
                let mut buf = BytesMut::new();
                codec::encode_publish(
                    &mut buf,
                    protocol,
                    COMMANDS,
                    QoS::AtLeastOnce,
                    1,
                    false,
                    Bytes::from(vec![0u8; n]),
                )
                .unwrap();
                assert_eq!(publish_len(protocol, COMMANDS.len(), n), buf.len(), "{n}");
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Data concentrators (issue 11)

    fn concentrator() -> MeterId {
        MeterId::new("DC-1").unwrap()
    }

    fn concentrator_connected(protocol: Protocol) -> (Session, Instant) {
        let t0 = Instant::now();
        let mut s = Session::for_device(concentrator(), DeviceKind::Concentrator, &cfg(), t0);
        let mut out = Vec::new();
        s.on_packet(connect(protocol, "DC-1", 30), t0, &mut out);
        assert!(s.is_connected(), "{out:?}");
        assert!(events(&out).is_empty());
        (s, t0)
    }

    fn deliveries(out: &[Action]) -> Vec<(String, QoS)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Deliver(d) => Some((d.topic.clone(), d.qos)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_concentrator_publishes_to_its_relay_and_events_topics() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let (mut s, t0) = concentrator_connected(protocol);
            assert_eq!(s.kind(), DeviceKind::Concentrator);
            let mut out = Vec::new();
            s.on_packet(
                publish("concentrators/DC-1/relay", QoS::AtLeastOnce, 1),
                t0,
                &mut out,
            );
            s.on_packet(
                publish("concentrators/DC-1/events", QoS::AtMostOnce, 0),
                t0,
                &mut out,
            );
            s.on_packet(
                publish("concentrators/DC-1/events", QoS::AtLeastOnce, 2),
                t0,
                &mut out,
            );
            assert!(events(&out).is_empty(), "{out:?}");
            assert_eq!(
                deliveries(&out),
                vec![
                    ("concentrators/DC-1/relay".into(), QoS::AtLeastOnce),
                    ("concentrators/DC-1/events".into(), QoS::AtMostOnce),
                    ("concentrators/DC-1/events".into(), QoS::AtLeastOnce),
                ]
            );
            // The PUBACK contract is the meters': in order, after the verdicts.
            let mut out = Vec::new();
            s.on_verdict(2, Verdict::Accepted, &mut out);
            assert!(sent(protocol, &out).is_empty());
            s.on_verdict(1, Verdict::Accepted, &mut out);
            s.on_verdict(0, Verdict::Duplicate, &mut out);
            assert_eq!(
                sent(protocol, &out),
                vec![
                    Packet::PubAck {
                        pkid: 1,
                        reason_code: 0
                    },
                    Packet::PubAck {
                        pkid: 2,
                        reason_code: 0
                    },
                ]
            );
            assert!(s.is_connected());
        }
    }

    #[test]
    fn a_concentrators_client_id_must_be_its_own_id() {
        for (protocol, code) in [(Protocol::V311, 5), (Protocol::V5, 0x87)] {
            let t0 = Instant::now();
            let mut s = Session::for_device(concentrator(), DeviceKind::Concentrator, &cfg(), t0);
            let mut out = Vec::new();
            s.on_packet(connect(protocol, "MTR-1", 30), t0, &mut out);
            assert_eq!(events(&out), vec![Reason::ClientIdMismatch]);
            assert!(matches!(
                &out[0],
                Action::Event { detail, .. } if detail.contains("concentrator id DC-1")
            ));
            assert_eq!(
                sent(protocol, &out),
                vec![Packet::ConnAck {
                    session_present: false,
                    code
                }]
            );
            assert!(s.is_closed());
        }
    }

    #[test]
    fn a_concentrator_is_refused_on_meter_topics_and_other_concentrators_topics() {
        for topic in [
            "meters/DC-1/readings",
            "meters/DC-1/events",
            "meters/MTR-1/readings",
            "concentrators/DC-2/relay",
            "concentrators/DC-2/events",
            "concentrators/DC-1/commands",
            "concentrators/DC-1/relay/x",
            "concentrators/+/relay",
        ] {
            // 3.1.1: close.
            let (mut s, t0) = concentrator_connected(Protocol::V311);
            let mut out = Vec::new();
            s.on_packet(publish(topic, QoS::AtLeastOnce, 1), t0, &mut out);
            assert_eq!(events(&out), vec![Reason::TopicNotAuthorized], "{topic}");
            assert!(deliveries(&out).is_empty());
            assert!(sent(Protocol::V311, &out).is_empty());
            assert_eq!(out.last(), Some(&Action::Close));
            // 5: PUBACK 0x87, then DISCONNECT 0x87, as for a meter.
            let (mut s, t0) = concentrator_connected(Protocol::V5);
            let mut out = Vec::new();
            s.on_packet(publish(topic, QoS::AtLeastOnce, 7), t0, &mut out);
            assert_eq!(events(&out), vec![Reason::TopicNotAuthorized], "{topic}");
            assert!(deliveries(&out).is_empty());
            assert_eq!(
                sent(Protocol::V5, &out),
                vec![
                    Packet::PubAck {
                        pkid: 7,
                        reason_code: 0x87
                    },
                    Packet::Disconnect { reason_code: 0x87 },
                ]
            );
            assert!(s.is_closed());
        }
    }

    #[test]
    fn a_concentrator_cannot_subscribe() {
        for (protocol, fail) in [(Protocol::V311, 0x80), (Protocol::V5, 0x87)] {
            let (mut s, t0) = concentrator_connected(protocol);
            let mut out = Vec::new();
            s.on_packet(
                Packet::Subscribe {
                    pkid: 3,
                    filters: vec![
                        ("meters/DC-1/commands".into(), QoS::AtLeastOnce),
                        ("meters/DC-1/firmware".into(), QoS::AtMostOnce),
                        ("concentrators/DC-1/commands".into(), QoS::AtLeastOnce),
                        ("concentrators/DC-1/relay".into(), QoS::AtLeastOnce),
                        ("#".into(), QoS::AtMostOnce),
                        ("".into(), QoS::AtMostOnce),
                    ],
                },
                t0,
                &mut out,
            );
            assert_eq!(events(&out), vec![Reason::SubscribeNotAuthorized; 6]);
            assert_eq!(
                sent(protocol, &out),
                vec![Packet::SubAck {
                    pkid: 3,
                    return_codes: vec![fail; 6]
                }]
            );
            assert!(!out.iter().any(|a| matches!(a, Action::Subscribed { .. })));
            assert!(s.is_connected());
            assert!(!s.is_subscribed("meters/DC-1/commands"));
        }
    }

    #[test]
    fn head_end_publishes_to_a_concentrator_are_refused_unsent() {
        let (mut s, _) = concentrator_connected(Protocol::V5);
        for (tag, topic) in [
            "meters/DC-1/commands",
            "meters/DC-1/firmware",
            "concentrators/DC-1/relay",
            "",
        ]
        .into_iter()
        .enumerate()
        {
            let mut out = Vec::new();
            s.publish(topic, payload(1), tag as u64, &mut out);
            assert_eq!(
                done(&out),
                vec![(
                    tag as u64,
                    OutboundResult::Refused(OutboundRefusal::TopicNotAllowed {
                        topic: topic.into()
                    })
                )]
            );
            assert!(sent(Protocol::V5, &out).is_empty());
        }
        assert_eq!(s.outbound_queued(), 0);
    }

    #[test]
    fn a_meter_cannot_publish_to_concentrator_topics() {
        for topic in [
            "concentrators/MTR-1/relay",
            "concentrators/MTR-1/events",
            "concentrators/DC-1/relay",
        ] {
            let (mut s, t0) = connected(Protocol::V5);
            let mut out = Vec::new();
            s.on_packet(publish(topic, QoS::AtLeastOnce, 1), t0, &mut out);
            assert_eq!(events(&out), vec![Reason::TopicNotAuthorized], "{topic}");
            assert!(deliveries(&out).is_empty());
            assert_eq!(
                sent(Protocol::V5, &out).last(),
                Some(&Packet::Disconnect { reason_code: 0x87 })
            );
        }
    }

    #[test]
    fn a_concentrator_has_a_larger_packet_size_and_a_multiplied_rate() {
        let config = cfg();
        let t0 = Instant::now();
        let m = Session::new(meter(), &config, t0);
        let c = Session::for_device(concentrator(), DeviceKind::Concentrator, &config, t0);
        assert_eq!(m.kind(), DeviceKind::Meter);
        assert_eq!(m.max_packet_size(), config.max_packet_size);
        assert_eq!(c.max_packet_size(), config.concentrator_max_packet_size);
        assert!(c.max_packet_size() > gridward_core::relay::MAX_RELAY_BYTES);
        // cfg(): burst 5 → 5 × 64 = 320 packets at once for the concentrator.
        let (mut s, t0) = concentrator_connected(Protocol::V5);
        let mut out = Vec::new();
        for _ in 0..320 {
            s.on_packet(Packet::PingReq, t0, &mut out);
        }
        assert!(events(&out).is_empty());
        s.on_packet(Packet::PingReq, t0, &mut out);
        assert_eq!(events(&out), vec![Reason::RateLimited]);
        assert!(matches!(
            out.iter().find(|a| matches!(a, Action::Event { .. })),
            Some(Action::Event { detail, .. }) if detail.contains("concentrator")
        ));
        assert!(s.is_closed());
    }
}
