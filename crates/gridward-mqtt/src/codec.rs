//! MQTT framing and packet (de)serialisation on top of the `rumqttc` codec: one frame at a time,
//! size-limited, never panicking on hostile input.
//!
//! Parsing of the variable parts (properties, filters, strings) is left to `rumqttc`'s
//! `mqttbytes` (3.1.1) and `v5::mqttbytes` (5) modules; this module adds what a server needs on
//! top: a frame-length check *before* a frame is buffered completely, protocol-level detection
//! from the CONNECT packet, one [`Packet`] type for both protocol versions, and hand-written
//! encoders for the small server-to-client packets (CONNACK, PUBACK, SUBACK, UNSUBACK, PINGRESP,
//! DISCONNECT) whose every byte we want to control.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

impl Protocol {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Self::V311 => 4,
            Self::V5 => 5,
        }
    }
}

/// Quality of service of a PUBLISH or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QoS {
    /// QoS 0: at most once, no acknowledgement.
    AtMostOnce = 0,
    /// QoS 1: at least once, acknowledged by PUBACK.
    AtLeastOnce = 1,
    /// QoS 2: exactly once (refused by the Gridward endpoint; the client can send it for tests).
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS with number `n` (0, 1 or 2).
    pub fn from_u8(n: u8) -> Option<Self> {
        match n {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }

    fn v4(self) -> rumqttc::mqttbytes::QoS {
        match self {
            Self::AtMostOnce => rumqttc::mqttbytes::QoS::AtMostOnce,
            Self::AtLeastOnce => rumqttc::mqttbytes::QoS::AtLeastOnce,
            Self::ExactlyOnce => rumqttc::mqttbytes::QoS::ExactlyOnce,
        }
    }

    fn v5(self) -> rumqttc::v5::mqttbytes::QoS {
        match self {
            Self::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            Self::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            Self::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
        }
    }
}

/// The parts of a CONNECT packet the endpoint looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// Protocol version from the protocol level byte.
    pub protocol: Protocol,
    /// The ClientID.
    pub client_id: String,
    /// Keep-alive in seconds (0 = disabled by the client).
    pub keep_alive: u16,
    /// Clean session (3.1.1) / clean start (5).
    pub clean_start: bool,
    /// Whether a will message was given.
    pub has_will: bool,
    /// The user name, if one was given.
    pub username: Option<String>,
    /// MQTT 5 Request Problem Information: whether the client accepts a Reason String on a
    /// PUBACK (absent means yes). Always false for 3.1.1, which has no properties.
    pub problem_information: bool,
    /// MQTT 5 Maximum Packet Size the client accepts (absent: no limit but the protocol's).
    pub max_packet_size: Option<u32>,
    /// MQTT 5 Receive Maximum: QoS 1 publishes the client is willing to have unacknowledged from
    /// the server at once (absent: 65,535; 0 is a protocol error). Always `None` for 3.1.1.
    pub receive_maximum: Option<u16>,
}

/// One MQTT control packet, either protocol version, reduced to the fields Gridward uses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Packet {
    /// CONNECT.
    Connect(ConnectInfo),
    /// CONNACK: session-present flag and return code (3.1.1) / reason code (5).
    ConnAck {
        /// Session present flag.
        session_present: bool,
        /// 3.1.1 return code or MQTT 5 reason code; 0 is success.
        code: u8,
    },
    /// PUBLISH.
    Publish {
        /// DUP flag.
        dup: bool,
        /// QoS.
        qos: QoS,
        /// RETAIN flag.
        retain: bool,
        /// Topic name (empty for an MQTT 5 topic-alias-only publish).
        topic: String,
        /// Packet identifier (0 for QoS 0).
        pkid: u16,
        /// Application payload.
        payload: Bytes,
    },
    /// PUBACK.
    PubAck {
        /// Packet identifier.
        pkid: u16,
        /// MQTT 5 reason code (0 success); always 0 for 3.1.1.
        reason_code: u8,
    },
    /// PUBREC (QoS 2 flow).
    PubRec {
        /// Packet identifier.
        pkid: u16,
    },
    /// PUBREL (QoS 2 flow).
    PubRel {
        /// Packet identifier.
        pkid: u16,
    },
    /// PUBCOMP (QoS 2 flow).
    PubComp {
        /// Packet identifier.
        pkid: u16,
    },
    /// SUBSCRIBE.
    Subscribe {
        /// Packet identifier.
        pkid: u16,
        /// Topic filters with the requested QoS.
        filters: Vec<(String, QoS)>,
    },
    /// SUBACK.
    SubAck {
        /// Packet identifier.
        pkid: u16,
        /// One return / reason code per filter (0..=2 granted QoS, >= 0x80 failure).
        return_codes: Vec<u8>,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Packet identifier.
        pkid: u16,
        /// Topic filters.
        filters: Vec<String>,
    },
    /// UNSUBACK.
    UnsubAck {
        /// Packet identifier.
        pkid: u16,
    },
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect {
        /// MQTT 5 reason code (0 normal); always 0 for 3.1.1.
        reason_code: u8,
    },
    /// AUTH (MQTT 5 only).
    Auth,
}

impl Packet {
    /// The packet's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connect(_) => "CONNECT",
            Self::ConnAck { .. } => "CONNACK",
            Self::Publish { .. } => "PUBLISH",
            Self::PubAck { .. } => "PUBACK",
            Self::PubRec { .. } => "PUBREC",
            Self::PubRel { .. } => "PUBREL",
            Self::PubComp { .. } => "PUBCOMP",
            Self::Subscribe { .. } => "SUBSCRIBE",
            Self::SubAck { .. } => "SUBACK",
            Self::Unsubscribe { .. } => "UNSUBSCRIBE",
            Self::UnsubAck { .. } => "UNSUBACK",
            Self::PingReq => "PINGREQ",
            Self::PingResp => "PINGRESP",
            Self::Disconnect { .. } => "DISCONNECT",
            Self::Auth => "AUTH",
        }
    }
}

/// Errors framing or decoding a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The frame announces more bytes than the maximum packet size.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    TooLarge {
        /// The announced frame size (fixed header included).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The remaining-length field is longer than 4 bytes.
    #[error("malformed remaining length")]
    MalformedLength,
    /// The first packet is not a CONNECT.
    #[error("expected CONNECT, got packet type {0}")]
    NotConnect(u8),
    /// The CONNECT names a protocol other than MQTT 3.1.1 or 5.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// The protocol name.
        name: String,
        /// The protocol level.
        level: u8,
    },
    /// The packet does not decode.
    #[error("malformed {packet} packet: {detail}")]
    Malformed {
        /// The packet type name (or "unknown").
        packet: &'static str,
        /// What the decoder reported.
        detail: String,
    },
}

/// Largest value of the 4-byte remaining-length field.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Looks for one complete frame at the start of `buf`.
///
/// Returns `Ok(Some(len))` when the first `len` bytes are one frame, `Ok(None)` when more bytes
/// are needed. The size limit is checked as soon as the fixed header is complete, so an
/// oversize packet is refused before its body is read.
///
/// # Errors
///
/// [`CodecError::TooLarge`], [`CodecError::MalformedLength`].
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, CodecError> {
    let mut remaining: usize = 0;
    let mut shift = 0;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << shift;
        if byte & 0x80 == 0 {
            let size = 1 + (i + 1) + remaining;
            if size > max {
                return Err(CodecError::TooLarge { size, max });
            }
            return Ok((buf.len() >= size).then_some(size));
        }
        shift += 7;
    }
    if buf.len() >= 5 {
        return Err(CodecError::MalformedLength);
    }
    Ok(None)
}

fn malformed(packet: &'static str, detail: impl ToString) -> CodecError {
    CodecError::Malformed {
        packet,
        detail: detail.to_string(),
    }
}

fn type_name(byte1: u8) -> &'static str {
    match byte1 >> 4 {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        15 => "AUTH",
        _ => "unknown",
    }
}

/// Runs a decoder, turning a panic inside it (a codec bug on hostile input) into an error.
fn guarded<T>(
    packet: &'static str,
    f: impl FnOnce() -> Result<T, CodecError>,
) -> Result<T, CodecError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(malformed(packet, "decoder panicked")))
}

/// Checks the fixed-header flag bits that MQTT reserves (3.1.1 §2.2.2, 5 §2.1.3).
fn check_flags(byte1: u8) -> Result<(), CodecError> {
    let flags = byte1 & 0x0F;
    let ok = match byte1 >> 4 {
        3 => true,                // PUBLISH: dup/qos/retain, QoS checked by the decoder
        6 | 8 | 10 => flags == 2, // PUBREL, SUBSCRIBE, UNSUBSCRIBE
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(malformed(
            type_name(byte1),
            format!("reserved flags {flags:#x}"),
        ))
    }
}

/// Reads the protocol name and level of a CONNECT frame (`frame` = one complete frame).
///
/// # Errors
///
/// [`CodecError::NotConnect`] if the frame is not a CONNECT, [`CodecError::Malformed`] if the
/// variable header is cut short, [`CodecError::UnsupportedProtocol`] for anything but
/// `MQTT` level 4 or 5 (MQTT 3.1 `MQIsdp` included).
pub fn connect_protocol(frame: &[u8]) -> Result<Protocol, CodecError> {
    let first = frame.first().copied().unwrap_or(0);
    if first >> 4 != 1 {
        return Err(CodecError::NotConnect(first >> 4));
    }
    let header_len = 1
        + frame
            .iter()
            .skip(1)
            .take(4)
            .take_while(|b| *b & 0x80 != 0)
            .count()
        + 1;
    let rest = frame.get(header_len..).unwrap_or(&[]);
    let short = || malformed("CONNECT", "variable header cut short");
    let name_len = match rest {
        [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
        _ => return Err(short()),
    };
    let name = rest.get(2..2 + name_len).ok_or_else(short)?;
    let level = *rest.get(2 + name_len).ok_or_else(short)?;
    match (name, level) {
        (b"MQTT", 4) => Ok(Protocol::V311),
        (b"MQTT", 5) => Ok(Protocol::V5),
        _ => Err(CodecError::UnsupportedProtocol {
            name: String::from_utf8_lossy(name).into_owned(),
            level,
        }),
    }
}

/// Decodes one complete frame (as delimited by [`frame_len`]) of protocol `protocol`.
///
/// A CONNECT is decoded with the codec of the protocol level it names, whatever `protocol` is.
///
/// # Errors
///
/// [`CodecError::Malformed`] for anything the codec refuses (never a panic),
/// [`CodecError::UnsupportedProtocol`] for a CONNECT of another protocol.
pub fn decode(protocol: Protocol, frame: &[u8]) -> Result<Packet, CodecError> {
    let Some(&byte1) = frame.first() else {
        return Err(malformed("unknown", "empty frame"));
    };
    let name = type_name(byte1);
    check_flags(byte1)?;
    let protocol = if byte1 >> 4 == 1 {
        connect_protocol(frame)?
    } else {
        protocol
    };
    guarded(name, || match protocol {
        Protocol::V311 => decode_v4(frame, name),
        Protocol::V5 => decode_v5(frame, name),
    })
}

fn decode_v4(frame: &[u8], name: &'static str) -> Result<Packet, CodecError> {
    let mut buf = BytesMut::from(frame);
    let packet = v4::Packet::read(&mut buf, usize::MAX).map_err(|e| malformed(name, e))?;
    if !buf.is_empty() {
        return Err(malformed(name, "trailing bytes"));
    }
    Ok(match packet {
        v4::Packet::Connect(c) => {
            // The 3.1.1 decoder also accepts level 5; the caller chose V311 from the level byte.
            Packet::Connect(ConnectInfo {
                protocol: Protocol::V311,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                clean_start: c.clean_session,
                has_will: c.last_will.is_some(),
                username: c.login.map(|l| l.username),
                problem_information: false,
                max_packet_size: None,
                receive_maximum: None,
            })
        }
        v4::Packet::ConnAck(c) => Packet::ConnAck {
            session_present: c.session_present,
            code: c.code as u8,
        },
        v4::Packet::Publish(p) => Packet::Publish {
            dup: p.dup,
            qos: qos_v4(p.qos),
            retain: p.retain,
            topic: p.topic,
            pkid: p.pkid,
            payload: p.payload,
        },
        v4::Packet::PubAck(p) => Packet::PubAck {
            pkid: p.pkid,
            reason_code: 0,
        },
        v4::Packet::PubRec(p) => Packet::PubRec { pkid: p.pkid },
        v4::Packet::PubRel(p) => Packet::PubRel { pkid: p.pkid },
        v4::Packet::PubComp(p) => Packet::PubComp { pkid: p.pkid },
        v4::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos_v4(f.qos)))
                .collect(),
        },
        v4::Packet::SubAck(s) => Packet::SubAck {
            pkid: s.pkid,
            return_codes: s
                .return_codes
                .into_iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => q as u8,
                    v4::SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::UnsubAck(u) => Packet::UnsubAck { pkid: u.pkid },
        v4::Packet::PingReq => Packet::PingReq,
        v4::Packet::PingResp => Packet::PingResp,
        v4::Packet::Disconnect => Packet::Disconnect { reason_code: 0 },
    })
}

fn qos_v4(q: rumqttc::mqttbytes::QoS) -> QoS {
    match q {
        rumqttc::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_v5(q: rumqttc::v5::mqttbytes::QoS) -> QoS {
    match q {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn decode_v5(frame: &[u8], name: &'static str) -> Result<Packet, CodecError> {
    // rumqttc refuses a DISCONNECT without reason code (remaining length 0), which MQTT 5
    // allows (§3.14.2.1: reason 0x00, normal disconnection).
    if frame == [0xE0, 0x00] {
        return Ok(Packet::Disconnect { reason_code: 0 });
    }
    // Nor one with a reason code and no properties (remaining length 1, §3.14.2.2.1), as
    // `mosquitto_sub -V 5` sends on its timeout.
    if let [0xE0, 0x01, rc] = frame {
        return Ok(Packet::Disconnect { reason_code: *rc });
    }
    let mut buf = BytesMut::from(frame);
    let packet = v5::Packet::read(&mut buf, None).map_err(|e| malformed(name, e))?;
    if !buf.is_empty() {
        return Err(malformed(name, "trailing bytes"));
    }
    Ok(match packet {
        v5::Packet::Connect(c, will, login) => Packet::Connect(ConnectInfo {
            protocol: Protocol::V5,
            problem_information: c.properties.as_ref().and_then(|p| p.request_problem_info)
                != Some(0),
            max_packet_size: c.properties.as_ref().and_then(|p| p.max_packet_size),
            receive_maximum: c.properties.as_ref().and_then(|p| p.receive_maximum),
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean_start: c.clean_start,
            has_will: will.is_some(),
            username: login.map(|l| l.username),
        }),
        v5::Packet::ConnAck(c) => Packet::ConnAck {
            session_present: c.session_present,
            code: connack_code_v5(c.code),
        },
        v5::Packet::Publish(p) => Packet::Publish {
            dup: p.dup,
            qos: qos_v5(p.qos),
            retain: p.retain,
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| malformed(name, "topic is not UTF-8"))?,
            pkid: p.pkid,
            payload: p.payload,
        },
        v5::Packet::PubAck(p) => Packet::PubAck {
            pkid: p.pkid,
            reason_code: puback_code_v5(p.reason),
        },
        v5::Packet::PubRec(p) => Packet::PubRec { pkid: p.pkid },
        v5::Packet::PubRel(p) => Packet::PubRel { pkid: p.pkid },
        v5::Packet::PubComp(p) => Packet::PubComp { pkid: p.pkid },
        v5::Packet::Subscribe(s) => Packet::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos_v5(f.qos)))
                .collect(),
        },
        v5::Packet::SubAck(s) => Packet::SubAck {
            pkid: s.pkid,
            return_codes: s.return_codes.into_iter().map(suback_code_v5).collect(),
        },
        v5::Packet::Unsubscribe(u) => Packet::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::UnsubAck(u) => Packet::UnsubAck { pkid: u.pkid },
        v5::Packet::PingReq(_) => Packet::PingReq,
        v5::Packet::PingResp(_) => Packet::PingResp,
        v5::Packet::Disconnect(d) => Packet::Disconnect {
            reason_code: d.reason_code as u8,
        },
        v5::Packet::Auth(_) => Packet::Auth,
    })
}

fn connack_code_v5(c: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode as C;
    match c {
        C::Success => 0,
        C::RefusedProtocolVersion => 1,
        C::BadClientId => 2,
        C::ServiceUnavailable => 3,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::UnsupportedProtocolVersion => 0x84,
        C::ClientIdentifierNotValid => 0x85,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerUnavailable => 0x88,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

fn puback_code_v5(r: v5::PubAckReason) -> u8 {
    use v5::PubAckReason as R;
    match r {
        R::Success => 0,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn suback_code_v5(c: v5::SubscribeReasonCode) -> u8 {
    use v5::SubscribeReasonCode as S;
    match c {
        S::Success(q) => q as u8,
        S::Failure | S::Unspecified => 0x80,
        S::ImplementationSpecific => 0x83,
        S::NotAuthorized => 0x87,
        S::TopicFilterInvalid => 0x8F,
        S::PkidInUse => 0x91,
        S::QuotaExceeded => 0x97,
        S::SharedSubscriptionsNotSupported => 0x9E,
        S::SubscriptionIdNotSupported => 0xA1,
        S::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

// ---------------------------------------------------------------------------------------------
// Encoders.

/// Appends the remaining-length field. `len` is at most a few hundred bytes for every packet
/// encoded by hand here; larger values (up to [`MAX_REMAINING_LENGTH`]) are still encoded right.
fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        // Truncation intended: the low 7 bits.
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// MQTT 5 CONNACK properties the endpoint announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnAckProperties {
    /// Receive Maximum (0x21): QoS 1 publishes the client may have unacknowledged.
    pub receive_maximum: Option<u16>,
    /// Maximum QoS (0x24).
    pub maximum_qos: Option<u8>,
    /// Retain Available (0x25).
    pub retain_available: Option<bool>,
    /// Maximum Packet Size (0x27).
    pub maximum_packet_size: Option<u32>,
    /// Wildcard Subscription Available (0x28).
    pub wildcard_subscription_available: Option<bool>,
    /// Subscription Identifiers Available (0x29).
    pub subscription_identifiers_available: Option<bool>,
    /// Shared Subscription Available (0x2A).
    pub shared_subscription_available: Option<bool>,
    /// Server Keep Alive (0x13), seconds.
    pub server_keep_alive: Option<u16>,
}

impl ConnAckProperties {
    fn encode(&self) -> BytesMut {
        let mut p = BytesMut::new();
        if let Some(v) = self.server_keep_alive {
            p.put_u8(0x13);
            p.put_u16(v);
        }
        if let Some(v) = self.receive_maximum {
            p.put_u8(0x21);
            p.put_u16(v);
        }
        if let Some(v) = self.maximum_qos {
            p.put_u8(0x24);
            p.put_u8(v);
        }
        if let Some(v) = self.retain_available {
            p.put_u8(0x25);
            p.put_u8(u8::from(v));
        }
        if let Some(v) = self.maximum_packet_size {
            p.put_u8(0x27);
            p.put_u32(v);
        }
        if let Some(v) = self.wildcard_subscription_available {
            p.put_u8(0x28);
            p.put_u8(u8::from(v));
        }
        if let Some(v) = self.subscription_identifiers_available {
            p.put_u8(0x29);
            p.put_u8(u8::from(v));
        }
        if let Some(v) = self.shared_subscription_available {
            p.put_u8(0x2A);
            p.put_u8(u8::from(v));
        }
        p
    }
}

/// Appends a CONNACK. For MQTT 5 the properties are included; for 3.1.1 they are ignored.
pub fn encode_connack(
    buf: &mut BytesMut,
    protocol: Protocol,
    session_present: bool,
    code: u8,
    props: &ConnAckProperties,
) {
    buf.put_u8(0x20);
    match protocol {
        Protocol::V311 => {
            buf.put_u8(2);
            buf.put_u8(u8::from(session_present));
            buf.put_u8(code);
        }
        Protocol::V5 => {
            let p = props.encode();
            let mut props_len = BytesMut::new();
            put_remaining_length(&mut props_len, p.len());
            put_remaining_length(buf, 2 + props_len.len() + p.len());
            buf.put_u8(u8::from(session_present));
            buf.put_u8(code);
            buf.put_slice(&props_len);
            buf.put_slice(&p);
        }
    }
}

/// Appends a PUBACK. MQTT 5 carries `reason_code` (omitted when 0); 3.1.1 has none.
pub fn encode_puback(buf: &mut BytesMut, protocol: Protocol, pkid: u16, reason_code: u8) {
    buf.put_u8(0x40);
    if protocol == Protocol::V5 && reason_code != 0 {
        buf.put_u8(3);
        buf.put_u16(pkid);
        buf.put_u8(reason_code);
    } else {
        buf.put_u8(2);
        buf.put_u16(pkid);
    }
}

/// MQTT 5 property identifier of a Reason String.
const REASON_STRING: u8 = 0x1F;

/// Appends an MQTT 5 PUBACK with `reason_code` and a Reason String property `reason` (a
/// diagnostic for the client: Gridward sends the refusal's stable reason code, e.g. `replay`).
///
/// The caller checks that the client asked for problem information and that the packet fits the
/// client's Maximum Packet Size.
pub fn encode_puback_with_reason(buf: &mut BytesMut, pkid: u16, reason_code: u8, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(usize::from(u16::MAX))];
    // Property: identifier, two-byte length, the UTF-8 string.
    let props_len = 1 + 2 + reason.len();
    let mut props_len_bytes = BytesMut::new();
    put_remaining_length(&mut props_len_bytes, props_len);
    buf.put_u8(0x40);
    put_remaining_length(buf, 2 + 1 + props_len_bytes.len() + props_len);
    buf.put_u16(pkid);
    buf.put_u8(reason_code);
    buf.put_slice(&props_len_bytes);
    buf.put_u8(REASON_STRING);
    buf.put_u16(u16::try_from(reason.len()).unwrap_or(u16::MAX));
    buf.put_slice(reason);
}

/// Appends a SUBACK with one return / reason code per filter.
pub fn encode_suback(buf: &mut BytesMut, protocol: Protocol, pkid: u16, codes: &[u8]) {
    buf.put_u8(0x90);
    let props = usize::from(protocol == Protocol::V5);
    put_remaining_length(buf, 2 + props + codes.len());
    buf.put_u16(pkid);
    if props == 1 {
        buf.put_u8(0);
    }
    buf.put_slice(codes);
}

/// Appends an UNSUBACK for `count` filters (MQTT 5: every reason 0x11 "no subscription existed"
/// or `code`).
pub fn encode_unsuback(buf: &mut BytesMut, protocol: Protocol, pkid: u16, count: usize, code: u8) {
    encode_unsuback_codes(buf, protocol, pkid, &vec![code; count]);
}

/// Appends an UNSUBACK with one MQTT 5 reason code per filter (0x00 success, 0x11 no
/// subscription existed, ...); a 3.1.1 UNSUBACK carries no codes.
pub fn encode_unsuback_codes(buf: &mut BytesMut, protocol: Protocol, pkid: u16, codes: &[u8]) {
    buf.put_u8(0xB0);
    match protocol {
        Protocol::V311 => {
            buf.put_u8(2);
            buf.put_u16(pkid);
        }
        Protocol::V5 => {
            put_remaining_length(buf, 3 + codes.len());
            buf.put_u16(pkid);
            buf.put_u8(0);
            buf.put_slice(codes);
        }
    }
}

/// Appends a PINGRESP.
pub fn encode_pingresp(buf: &mut BytesMut) {
    buf.put_slice(&[0xD0, 0x00]);
}

/// Appends a PINGREQ.
pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0x00]);
}

/// Appends a DISCONNECT. MQTT 5 carries `reason_code` (omitted when 0); a 3.1.1 DISCONNECT has none
/// (and is only ever sent by clients: a 3.1.1 server just closes the connection).
pub fn encode_disconnect(buf: &mut BytesMut, protocol: Protocol, reason_code: u8) {
    buf.put_u8(0xE0);
    if protocol == Protocol::V5 && reason_code != 0 {
        buf.put_u8(2);
        buf.put_u8(reason_code);
        buf.put_u8(0);
    } else {
        buf.put_u8(0);
    }
}

/// Appends a CONNECT without will, user name or properties.
///
/// # Errors
///
/// [`CodecError::Malformed`] if the client id is longer than 65,535 bytes.
pub fn encode_connect(
    buf: &mut BytesMut,
    protocol: Protocol,
    client_id: &str,
    keep_alive: u16,
    clean_start: bool,
) -> Result<(), CodecError> {
    if client_id.len() > usize::from(u16::MAX) {
        return Err(malformed("CONNECT", "client id longer than 65535 bytes"));
    }
    match protocol {
        Protocol::V311 => {
            let mut c = v4::Connect::new(client_id);
            c.keep_alive = keep_alive;
            c.clean_session = clean_start;
            c.write(buf).map_err(|e| malformed("CONNECT", e))?;
        }
        Protocol::V5 => {
            let c = v5::Connect {
                keep_alive,
                client_id: client_id.to_owned(),
                clean_start,
                properties: None,
            };
            c.write(&None, &None, buf)
                .map_err(|e| malformed("CONNECT", e))?;
        }
    }
    Ok(())
}

/// Appends a PUBLISH. `pkid` is ignored for QoS 0 and must be non-zero otherwise.
///
/// # Errors
///
/// [`CodecError::Malformed`] for a zero packet id with QoS > 0, a topic longer than 65,535 bytes
/// or a packet longer than [`MAX_REMAINING_LENGTH`].
pub fn encode_publish(
    buf: &mut BytesMut,
    protocol: Protocol,
    topic: &str,
    qos: QoS,
    pkid: u16,
    retain: bool,
    payload: Bytes,
) -> Result<(), CodecError> {
    if topic.len() > usize::from(u16::MAX) {
        return Err(malformed("PUBLISH", "topic longer than 65535 bytes"));
    }
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid };
    if qos != QoS::AtMostOnce && pkid == 0 {
        return Err(malformed("PUBLISH", "packet id 0 with QoS > 0"));
    }
    match protocol {
        Protocol::V311 => {
            let mut p = v4::Publish::from_bytes(topic, qos.v4(), payload);
            p.pkid = pkid;
            p.retain = retain;
            p.write(buf).map_err(|e| malformed("PUBLISH", e))?;
        }
        Protocol::V5 => {
            let mut p = v5::Publish::new(topic, qos.v5(), payload, None);
            p.pkid = pkid;
            p.retain = retain;
            p.write(buf).map_err(|e| malformed("PUBLISH", e))?;
        }
    }
    Ok(())
}

/// Appends a SUBSCRIBE of `filters`.
///
/// # Errors
///
/// [`CodecError::Malformed`] for a zero packet id, no filter, or a filter longer than 65,535 bytes.
pub fn encode_subscribe(
    buf: &mut BytesMut,
    protocol: Protocol,
    pkid: u16,
    filters: &[(&str, QoS)],
) -> Result<(), CodecError> {
    if pkid == 0 || filters.is_empty() {
        return Err(malformed("SUBSCRIBE", "packet id 0 or no filter"));
    }
    if filters.iter().any(|(f, _)| f.len() > usize::from(u16::MAX)) {
        return Err(malformed("SUBSCRIBE", "filter longer than 65535 bytes"));
    }
    match protocol {
        Protocol::V311 => {
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(f, q)| v4::SubscribeFilter::new((*f).to_owned(), q.v4())),
            );
            s.pkid = pkid;
            s.write(buf).map_err(|e| malformed("SUBSCRIBE", e))?;
        }
        Protocol::V5 => {
            let mut s = v5::Subscribe::new_many(
                filters.iter().map(|(f, q)| v5::Filter::new(*f, q.v5())),
                None,
            );
            s.pkid = pkid;
            s.write(buf).map_err(|e| malformed("SUBSCRIBE", e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn one(protocol: Protocol, bytes: &[u8]) -> Result<Packet, CodecError> {
        let n = frame_len(bytes, 1 << 20)?.expect("complete frame");
        assert_eq!(n, bytes.len());
        decode(protocol, bytes)
    }

    #[test]
    fn frame_len_waits_and_limits() {
        assert_eq!(frame_len(&[], 100), Ok(None));
        assert_eq!(frame_len(&[0x30], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x03, 0, 1], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 0x03, 0, 1, b'a'], 100), Ok(Some(5)));
        assert_eq!(frame_len(&[0x30, 0x80], 100), Ok(None));
        // 200 bytes announced, limit 100: refused before the body arrives.
        assert_eq!(
            frame_len(&[0x30, 0xC8, 0x01], 100),
            Err(CodecError::TooLarge {
                size: 203,
                max: 100
            })
        );
        assert_eq!(
            frame_len(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], usize::MAX),
            Err(CodecError::MalformedLength)
        );
    }

    #[test]
    fn connect_round_trip_both_versions() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut buf = BytesMut::new();
            encode_connect(&mut buf, protocol, "MTR-1", 30, true).unwrap();
            assert_eq!(connect_protocol(&buf), Ok(protocol));
            // Decoding picks the codec from the level byte, whatever the caller assumed.
            let p = one(Protocol::V311, &buf).unwrap();
            assert_eq!(
                p,
                Packet::Connect(ConnectInfo {
                    protocol,
                    client_id: "MTR-1".into(),
                    keep_alive: 30,
                    clean_start: true,
                    has_will: false,
                    username: None,
                    problem_information: protocol == Protocol::V5,
                    max_packet_size: None,
                    receive_maximum: None,
                })
            );
        }
    }

    #[test]
    fn other_protocols_are_named() {
        // MQTT 3.1: "MQIsdp" level 3.
        let mut f = vec![0x10, 0];
        let body = [&[0u8, 6][..], b"MQIsdp", &[3, 2, 0, 10, 0, 1, b'a']].concat();
        f[1] = u8::try_from(body.len()).unwrap();
        f.extend_from_slice(&body);
        assert_eq!(
            connect_protocol(&f),
            Err(CodecError::UnsupportedProtocol {
                name: "MQIsdp".into(),
                level: 3
            })
        );
        assert_eq!(connect_protocol(&[0x30, 0]), Err(CodecError::NotConnect(3)));
        assert!(matches!(
            connect_protocol(&[0x10, 1, 0]),
            Err(CodecError::Malformed { .. })
        ));
    }

    #[test]
    fn publish_puback_subscribe_round_trip() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut buf = BytesMut::new();
            encode_publish(
                &mut buf,
                protocol,
                "meters/M/readings",
                QoS::AtLeastOnce,
                7,
                false,
                Bytes::from_static(b"x"),
            )
            .unwrap();
            assert_eq!(
                one(protocol, &buf).unwrap(),
                Packet::Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: "meters/M/readings".into(),
                    pkid: 7,
                    payload: Bytes::from_static(b"x"),
                }
            );
            let mut buf = BytesMut::new();
            encode_puback(&mut buf, protocol, 7, 0);
            assert_eq!(
                one(protocol, &buf).unwrap(),
                Packet::PubAck {
                    pkid: 7,
                    reason_code: 0
                }
            );
            let mut buf = BytesMut::new();
            encode_subscribe(&mut buf, protocol, 3, &[("#", QoS::AtLeastOnce)]).unwrap();
            assert_eq!(
                one(protocol, &buf).unwrap(),
                Packet::Subscribe {
                    pkid: 3,
                    filters: vec![("#".into(), QoS::AtLeastOnce)]
                }
            );
            let mut buf = BytesMut::new();
            encode_suback(&mut buf, protocol, 3, &[1, 0x80]);
            assert_eq!(
                one(protocol, &buf).unwrap(),
                Packet::SubAck {
                    pkid: 3,
                    return_codes: vec![1, 0x80]
                }
            );
            let mut buf = BytesMut::new();
            encode_connack(
                &mut buf,
                protocol,
                false,
                0,
                &ConnAckProperties {
                    receive_maximum: Some(32),
                    maximum_qos: Some(1),
                    maximum_packet_size: Some(65536),
                    ..Default::default()
                },
            );
            assert_eq!(
                one(protocol, &buf).unwrap(),
                Packet::ConnAck {
                    session_present: false,
                    code: 0
                }
            );
            let mut buf = BytesMut::new();
            encode_disconnect(&mut buf, protocol, 0);
            assert_eq!(
                one(protocol, &buf).unwrap(),
                Packet::Disconnect { reason_code: 0 }
            );
            let mut buf = BytesMut::new();
            encode_pingresp(&mut buf);
            assert_eq!(one(protocol, &buf).unwrap(), Packet::PingResp);
            let mut buf = BytesMut::new();
            encode_unsuback(&mut buf, protocol, 9, 1, 0x11);
            assert_eq!(one(protocol, &buf).unwrap(), Packet::UnsubAck { pkid: 9 });
        }
    }

    #[test]
    fn puback_with_reason_string_decodes_with_rumqttc() {
        let mut buf = BytesMut::new();
        encode_puback_with_reason(&mut buf, 9, 0x83, "replay");
        // Fixed header 2, packet id 2, reason code 1, property length 1, 0x1F, length 2, "replay".
        assert_eq!(buf.len(), 15);
        assert_eq!(
            one(Protocol::V5, &buf).unwrap(),
            Packet::PubAck {
                pkid: 9,
                reason_code: 0x83
            }
        );
        let p = v5::Packet::read(&mut buf.clone(), None).unwrap();
        let v5::Packet::PubAck(ack) = p else {
            panic!("a PUBACK: {p:?}")
        };
        assert_eq!(ack.pkid, 9);
        assert_eq!(ack.reason, v5::PubAckReason::ImplementationSpecificError);
        let reason = ack.properties.and_then(|p| p.reason_string);
        assert_eq!(reason.as_deref(), Some("replay"));
    }

    #[test]
    fn v5_connect_problem_information_packet_size_and_receive_maximum() {
        let mut buf = BytesMut::new();
        let props = v5::ConnectProperties {
            request_problem_info: Some(0),
            max_packet_size: Some(128),
            receive_maximum: Some(4),
            ..v5::ConnectProperties::new()
        };
        let c = v5::Connect {
            keep_alive: 30,
            client_id: "MTR-1".into(),
            clean_start: true,
            properties: Some(props),
        };
        c.write(&None, &None, &mut buf).unwrap();
        let Packet::Connect(info) = one(Protocol::V5, &buf).unwrap() else {
            panic!("a CONNECT")
        };
        assert!(!info.problem_information);
        assert_eq!(info.max_packet_size, Some(128));
        assert_eq!(info.receive_maximum, Some(4));
    }

    #[test]
    fn v5_failure_codes_decode() {
        let mut buf = BytesMut::new();
        encode_puback(&mut buf, Protocol::V5, 9, 0x87);
        assert_eq!(
            one(Protocol::V5, &buf).unwrap(),
            Packet::PubAck {
                pkid: 9,
                reason_code: 0x87
            }
        );
        let mut buf = BytesMut::new();
        encode_connack(
            &mut buf,
            Protocol::V5,
            false,
            0x87,
            &ConnAckProperties::default(),
        );
        assert_eq!(
            one(Protocol::V5, &buf).unwrap(),
            Packet::ConnAck {
                session_present: false,
                code: 0x87
            }
        );
        let mut buf = BytesMut::new();
        encode_disconnect(&mut buf, Protocol::V5, 0x96);
        assert_eq!(
            one(Protocol::V5, &buf).unwrap(),
            Packet::Disconnect { reason_code: 0x96 }
        );
        let mut buf = BytesMut::new();
        encode_suback(&mut buf, Protocol::V5, 1, &[0x87]);
        assert_eq!(
            one(Protocol::V5, &buf).unwrap(),
            Packet::SubAck {
                pkid: 1,
                return_codes: vec![0x87]
            }
        );
    }

    #[test]
    fn v5_disconnect_without_properties_decodes() {
        // What `mosquitto_sub -V 5` sends on its -W timeout: reason 0x04, no property length.
        assert_eq!(
            one(Protocol::V5, &[0xE0, 0x01, 0x04]).unwrap(),
            Packet::Disconnect { reason_code: 0x04 }
        );
        assert_eq!(
            one(Protocol::V5, &[0xE0, 0x00]).unwrap(),
            Packet::Disconnect { reason_code: 0 }
        );
    }

    #[test]
    fn reserved_flags_and_bad_qos_are_malformed() {
        // SUBSCRIBE with flags 0 instead of 2.
        assert!(matches!(
            decode(Protocol::V311, &[0x80, 6, 0, 1, 0, 1, b'a', 0]),
            Err(CodecError::Malformed {
                packet: "SUBSCRIBE",
                ..
            })
        ));
        // PUBLISH with QoS 3.
        assert!(matches!(
            decode(Protocol::V311, &[0x36, 5, 0, 1, b'a', 0, 1]),
            Err(CodecError::Malformed {
                packet: "PUBLISH",
                ..
            })
        ));
        // QoS 1 with packet id 0.
        assert!(matches!(
            decode(Protocol::V5, &[0x32, 6, 0, 1, b'a', 0, 0, 0]),
            Err(CodecError::Malformed { .. })
        ));
        assert!(matches!(
            decode(Protocol::V5, &[0xF0, 0]),
            Err(CodecError::Malformed { .. })
        ));
        assert!(matches!(
            decode(Protocol::V311, &[0x00, 0]),
            Err(CodecError::Malformed { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Arbitrary bytes never make the decoder panic (panics would abort the test).
        #[test]
        fn decode_never_panics(first in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut frame = vec![first];
            put_remaining_length_vec(&mut frame, body.len());
            frame.extend_from_slice(&body);
            for p in [Protocol::V311, Protocol::V5] {
                let _ = decode(p, &frame);
            }
            let _ = connect_protocol(&frame);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// Same, with a valid-looking CONNECT / PUBLISH prefix so the decoder goes deeper.
        #[test]
        fn decode_deep_never_panics(kind in 0usize..4, tail in proptest::collection::vec(any::<u8>(), 0..48)) {
            let prefix: &[u8] = match kind {
                0 => &[0, 4, b'M', b'Q', b'T', b'T', 5],
                1 => &[0, 4, b'M', b'Q', b'T', b'T', 4],
                2 => &[0, 3, b'a', b'/', b'b'],
                _ => &[0, 1],
            };
            let first = match kind { 0 | 1 => 0x10, 2 => 0x32, _ => 0x82 };
            let body = [prefix, &tail].concat();
            let mut frame = vec![first];
            put_remaining_length_vec(&mut frame, body.len());
            frame.extend_from_slice(&body);
            for p in [Protocol::V311, Protocol::V5] {
                let _ = decode(p, &frame);
            }
        }
    }

    fn put_remaining_length_vec(v: &mut Vec<u8>, len: usize) {
        let mut b = BytesMut::new();
        put_remaining_length(&mut b, len);
        v.extend_from_slice(&b);
    }
}
