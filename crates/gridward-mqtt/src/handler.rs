//! The endpoint ↔ pipeline contract: what the endpoint hands over for each accepted PUBLISH
//! ([`InboundPublish`] to a [`PublishHandler`]), what it expects back ([`Verdict`]), and where
//! security events and connection notifications go ([`EventSink`]).
//!
//! Two kinds of device connect ([`DeviceKind`]): meters, and data concentrators that relay for
//! the meters behind them. Both are identified by their certificate; a concentrator's id has
//! the syntax of a meter id (a [`MeterId`]) and is never also a meter's.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use gridward_core::MeterId;
use gridward_core::security::{Reason, SecurityEvent};
use time::OffsetDateTime;

use crate::codec::Protocol;

/// What kind of device a peer's certificate proves (`gridward_pki::identity_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A meter (`Identity::Meter`): publishes to `meters/{id}/readings` and `meters/{id}/events`,
    /// subscribes to `meters/{id}/commands` and `meters/{id}/firmware`.
    Meter,
    /// A data concentrator (`Identity::Concentrator`): publishes to `concentrators/{id}/relay`
    /// (relay batches of its meters' envelopes) and `concentrators/{id}/events` (its own signed
    /// events), subscribes to nothing.
    Concentrator,
}

impl DeviceKind {
    /// `meter` or `concentrator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Meter => "meter",
            Self::Concentrator => "concentrator",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One PUBLISH that passed the endpoint's checks: the sender's certificate proved `meter_id`
/// (a meter's or a concentrator's, see `device`), the ClientID equals it, and the topic is one
/// that device may publish to.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundPublish {
    /// The sending device's id, from the client certificate (`identity_of`), already equal to
    /// the ClientID: the meter's id for a meter, **the concentrator's own id** for a concentrator
    /// (the meters it relays for are named inside the relay batch, not here).
    pub meter_id: MeterId,
    /// What kind of device sent it: [`DeviceKind::Meter`] (topic `meters/{id}/readings` or
    /// `meters/{id}/events`) or [`DeviceKind::Concentrator`] (topic `concentrators/{id}/relay`
    /// or `concentrators/{id}/events`).
    pub device: DeviceKind,
    /// DER SubjectPublicKeyInfo of the client certificate (to build the envelope's `VerifyingKey`).
    pub cert_spki: Arc<[u8]>,
    /// Serial of the client certificate: lowercase hex without leading zero bytes
    /// (the `gridward-pki` inventory form).
    pub cert_serial: String,
    /// The topic: `meters/{id}/readings` or `meters/{id}/events` for a meter,
    /// `concentrators/{id}/relay` or `concentrators/{id}/events` for a concentrator.
    pub topic: String,
    /// The application payload (the signed envelope).
    pub payload: Bytes,
    /// 0 or 1.
    pub qos: u8,
    /// The peer's address.
    pub source: SocketAddr,
    /// When the endpoint read the packet (the injected clock).
    pub received_at: OffsetDateTime,
}

/// The pipeline's decision on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Durably stored.
    Accepted,
    /// A byte-identical resend of a message already stored: acknowledged, not stored again.
    Duplicate,
    /// Refused (the pipeline records the security event itself).
    Rejected(Reason),
    /// Not decided: the store failed, nothing was stored. The message gets no PUBACK; the
    /// connection is closed once the PUBACKs before it are sent (MQTT 5: DISCONNECT 0x89
    /// server busy), so the meter resends it, and everything after it, on its next connection.
    Unavailable,
}

impl Verdict {
    /// The PUBACK reason code for this verdict under `protocol`.
    ///
    /// Accepted / Duplicate → 0x00. Rejected under MQTT 5: 0x87 (not authorized) for signature and
    /// identity problems, 0x99 (payload format invalid) for envelope and document problems, 0x83
    /// (implementation specific error: "the PUBLISH is valid but the receiver is not willing to
    /// accept it") for freshness (replay, stale, from the future), 0x97 (quota exceeded) for the
    /// rate limit, 0x80 (unspecified) otherwise. The session adds the reason's code as Reason
    /// String where the client allows it. Under MQTT 3.1.1 a PUBACK has no reason code: always
    /// 0x00 (the message is consumed and dropped). `docs/wire-format.md` §4.1 lists them.
    pub fn puback_code(self, protocol: Protocol) -> u8 {
        match (self, protocol) {
            // Never sent: the session closes instead (see `Verdict::Unavailable`).
            (Self::Unavailable, _) => 0x80,
            (Self::Accepted | Self::Duplicate, _) | (Self::Rejected(_), Protocol::V311) => 0x00,
            (Self::Rejected(reason), Protocol::V5) => match reason {
                Reason::BadSignature
                | Reason::KeyMismatch
                | Reason::BadIdentity
                | Reason::ClientIdMismatch
                | Reason::TopicNotAuthorized
                | Reason::CertificateMissing
                | Reason::CertificateUntrusted
                | Reason::CertificateWrongPurpose
                | Reason::CertificateRevoked
                | Reason::CertificateExpired
                | Reason::CertificateNotYetValid => 0x87,
                Reason::MalformedEnvelope
                | Reason::InvalidDocument
                | Reason::RegisterWentBackwards => 0x99,
                Reason::Replay | Reason::Stale | Reason::FromTheFuture => 0x83,
                Reason::RateLimited => 0x97,
                _ => 0x80,
            },
        }
    }
}

/// The ingest pipeline, seen from the endpoint.
///
/// Ordering and concurrency, per connection:
/// - `handle` is called on the connection's task, in PUBLISH order. Its synchronous part must not
///   block (no I/O, no locks held for long); it is the place for work that must happen in order,
///   e.g. enqueueing the message for the meter's replay guard.
/// - The returned futures are polled on the connection's task, first in PUBLISH order, then
///   concurrently: up to `EndpointConfig::max_inflight` of one connection at once. An `async`
///   block that awaits a FIFO-fair queue (e.g. a bounded tokio `mpsc::Sender::send`) as its first
///   step therefore also enqueues in order.
/// - A future is never dropped unfinished: if the connection ends first, the endpoint finishes
///   it in a task of its own (the message is stored; only its PUBACK is lost, the meter resends,
///   the pipeline sees a duplicate). Hence the `'static` bound: clone what the future needs.
pub trait PublishHandler: Send + Sync + 'static {
    /// Resolves once the message is durably stored ([`Verdict::Accepted`]), recognised as a
    /// duplicate, or refused. For QoS 1 the PUBACK is sent only then, in PUBLISH order.
    fn handle(&self, msg: InboundPublish) -> impl Future<Output = Verdict> + Send + 'static;
}

/// Where the endpoint reports refusals and connection changes. Implementations must not block
/// (e.g. push into a bounded channel and count what does not fit).
pub trait EventSink: Send + Sync + 'static {
    /// One refusal (TLS, identity, ACL, limits, malformed packets, timeouts, revocation).
    /// For a concentrator the event's `meter_id` is the concentrator's id.
    fn security_event(&self, event: SecurityEvent);
    /// `meter` completed CONNECT (`connected = true`) or its connection ended (`false`).
    /// A connection taken over by a newer one of the same device reports no `false`.
    /// Also reported for concentrators: `meter` is then the concentrator's id (implement
    /// [`EventSink::device_connection`] to tell them apart).
    fn connection(&self, meter: &MeterId, connected: bool, at: OffsetDateTime);
    /// What the endpoint calls for every connect / disconnect: the device's id, its kind and
    /// the peer's address. The default calls [`EventSink::connection`]`(device, connected, at)`;
    /// a sink that overrides this one gets no `connection` calls (unless it forwards them).
    fn device_connection(
        &self,
        device: &MeterId,
        kind: DeviceKind,
        source: SocketAddr,
        connected: bool,
        at: OffsetDateTime,
    ) {
        let _ = (kind, source);
        self.connection(device, connected, at);
    }
    /// A new connection of `device` (a meter or concentrator id) completed CONNECT while an
    /// older one was live: the older one, from `previous`, is taken over (MQTT 5: DISCONNECT
    /// 0x8E) by the one from `current`. Reported after the new connection's
    /// `connection(.., true, ..)`; the older one reports no `false`. Two addresses taking turns
    /// with one certificate may be a cloned device. The default does nothing.
    fn session_replaced(
        &self,
        device: &MeterId,
        previous: SocketAddr,
        current: SocketAddr,
        at: OffsetDateTime,
    ) {
        let _ = (device, previous, current, at);
    }
    /// `meter` subscribed to `topic`, its `meters/{id}/commands` or `meters/{id}/firmware`
    /// topic, on its current connection: head-end messages for that topic reach it from now on
    /// (`Endpoint::publish`). Reported once per topic and connection, after the SUBACK.
    /// The default does nothing.
    fn subscribed(&self, meter: &MeterId, topic: &str, at: OffsetDateTime) {
        let _ = (meter, topic, at);
    }
}

impl<T: EventSink + ?Sized> EventSink for Arc<T> {
    fn security_event(&self, event: SecurityEvent) {
        (**self).security_event(event);
    }

    fn connection(&self, meter: &MeterId, connected: bool, at: OffsetDateTime) {
        (**self).connection(meter, connected, at);
    }

    fn device_connection(
        &self,
        device: &MeterId,
        kind: DeviceKind,
        source: SocketAddr,
        connected: bool,
        at: OffsetDateTime,
    ) {
        (**self).device_connection(device, kind, source, connected, at);
    }

    fn session_replaced(
        &self,
        device: &MeterId,
        previous: SocketAddr,
        current: SocketAddr,
        at: OffsetDateTime,
    ) {
        (**self).session_replaced(device, previous, current, at);
    }

    fn subscribed(&self, meter: &MeterId, topic: &str, at: OffsetDateTime) {
        (**self).subscribed(meter, topic, at);
    }
}

impl<T: PublishHandler> PublishHandler for Arc<T> {
    fn handle(&self, msg: InboundPublish) -> impl Future<Output = Verdict> + Send + 'static {
        (**self).handle(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: `docs/wire-format.md` did not say that a register going backwards is refused,
    /// nor with which PUBACK code. §4.1 must list every refusal of a message with the code
    /// [`Verdict::puback_code`] sends, and name every other reason of the endpoint.
    #[test]
    fn wire_format_lists_every_refusal_with_its_puback_code() {
        let spec = include_str!("../../../docs/wire-format.md");
        let section = spec
            .split("### 4.1 ")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/wire-format.md has a §4.1");
        let mut documented = Vec::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let code = cells[1].trim_matches('`');
            let reason = Reason::from_code(code).unwrap_or_else(|| panic!("unknown reason {code}"));
            let puback = cells[3]
                .get(2..4)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            assert_eq!(
                puback,
                Some(Verdict::Rejected(reason).puback_code(Protocol::V5)),
                "§4.1 row {code}: {row}"
            );
            documented.push(reason);
        }
        let message_refusals = [
            Reason::TopicNotAuthorized,
            Reason::MalformedEnvelope,
            Reason::KeyMismatch,
            Reason::BadSignature,
            Reason::Replay,
            Reason::Stale,
            Reason::FromTheFuture,
            Reason::InvalidDocument,
            Reason::RegisterWentBackwards,
            Reason::RelayNotAuthorized,
        ];
        assert_eq!(
            documented, message_refusals,
            "the rows of §4.1, in check order"
        );
        for reason in Reason::ALL {
            if reason != Reason::DownstreamRejected {
                assert!(
                    section.contains(&format!("`{}`", reason.code())),
                    "§4.1 does not name {reason}"
                );
            }
        }
    }

    #[test]
    fn puback_codes() {
        use Protocol::{V5, V311};
        assert_eq!(Verdict::Accepted.puback_code(V5), 0);
        assert_eq!(Verdict::Duplicate.puback_code(V5), 0);
        assert_eq!(
            Verdict::Rejected(Reason::BadSignature).puback_code(V5),
            0x87
        );
        assert_eq!(Verdict::Rejected(Reason::KeyMismatch).puback_code(V5), 0x87);
        assert_eq!(
            Verdict::Rejected(Reason::InvalidDocument).puback_code(V5),
            0x99
        );
        assert_eq!(
            Verdict::Rejected(Reason::MalformedEnvelope).puback_code(V5),
            0x99
        );
        // Issue 17: a replay had the generic 0x80.
        for fresh in [Reason::Replay, Reason::Stale, Reason::FromTheFuture] {
            assert_eq!(Verdict::Rejected(fresh).puback_code(V5), 0x83);
        }
        assert_eq!(Verdict::Rejected(Reason::RateLimited).puback_code(V5), 0x97);
        assert_eq!(
            Verdict::Rejected(Reason::DownstreamRejected).puback_code(V5),
            0x80
        );
        for certificate in [
            Reason::CertificateMissing,
            Reason::CertificateUntrusted,
            Reason::CertificateWrongPurpose,
            Reason::CertificateNotYetValid,
        ] {
            assert_eq!(Verdict::Rejected(certificate).puback_code(V5), 0x87);
        }
        assert_eq!(Verdict::Rejected(Reason::BadSignature).puback_code(V311), 0);
    }
}
