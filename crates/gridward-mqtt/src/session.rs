//! The sans-IO MQTT session of one authenticated meter: packets and time in, [`Action`]s out.
//!
//! The endpoint's I/O loop owns the socket; it feeds every decoded packet (or decoding error),
//! every verdict from the pipeline and every timer tick into a [`Session`] and carries out the
//! actions: write bytes, hand a message to the pipeline, raise a security event, close.
//! Everything the endpoint decides about MQTT — identity binding of the ClientID, the topic ACL,
//! QoS, keep-alive, rate limit, PUBACK ordering — is decided here and tested in memory.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gridward_core::MeterId;
use gridward_core::security::Reason;

use crate::codec::{self, CodecError, ConnAckProperties, ConnectInfo, Packet, Protocol, QoS};
use crate::config::EndpointConfig;
use crate::handler::Verdict;
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

/// The MQTT session of one meter whose certificate has been verified.
#[derive(Debug)]
pub struct Session {
    meter: MeterId,
    readings_topic: String,
    events_topic: String,
    commands_topic: String,
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
        Self {
            readings_topic: meter.readings_topic(),
            events_topic: meter.events_topic(),
            commands_topic: meter.commands_topic(),
            meter,
            state: State::AwaitingConnect,
            protocol: Protocol::V311,
            inflight: VecDeque::new(),
            next_seq: 0,
            bucket: TokenBucket::new(config.rate_per_second, config.rate_burst, now),
            keep_alive: config.max_keep_alive,
            last_packet: now,
            connect_deadline: now + config.connect_timeout,
            max_inflight: usize::from(config.max_inflight.max(1)),
            max_keep_alive: config.max_keep_alive,
            max_packet_size: config.max_packet_size,
            reason_strings: false,
            client_max_packet_size: usize::MAX,
        }
    }

    /// The meter.
    pub fn meter(&self) -> &MeterId {
        &self.meter
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
                if !self.bucket.take(now) {
                    // Stop reading; what is already in flight still gets its PUBACK, then close.
                    self.event(
                        out,
                        Reason::RateLimited,
                        "message rate of the meter exceeded".to_owned(),
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
                    "ClientID {:?} is not the certificate's meter id {}",
                    info.client_id, self.meter
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
                for (filter, qos) in &filters {
                    if *filter == self.commands_topic && *qos != QoS::ExactlyOnce {
                        codes.push(*qos as u8);
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
            }
            Packet::Unsubscribe { pkid, filters } => {
                let mut buf = BytesMut::new();
                codec::encode_unsuback(
                    &mut buf,
                    self.protocol,
                    pkid,
                    filters.len(),
                    rc::NO_SUBSCRIPTION_EXISTED,
                );
                out.push(Action::Send(buf.freeze()));
            }
            Packet::PingReq => {
                let mut buf = BytesMut::new();
                codec::encode_pingresp(&mut buf);
                out.push(Action::Send(buf.freeze()));
            }
            Packet::Disconnect { .. } => self.close(out),
            // The endpoint sends no QoS 1 publishes yet; a stray PUBACK is harmless.
            Packet::PubAck { .. } => {}
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
        if topic != self.readings_topic && topic != self.events_topic {
            self.event(
                out,
                Reason::TopicNotAuthorized,
                format!("publish to {topic:?} refused"),
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
            out.push(Action::Close);
        }
    }
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
}
