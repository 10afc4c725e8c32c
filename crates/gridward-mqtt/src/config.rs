//! [`EndpointConfig`]: every limit of the MQTT endpoint, with safe defaults.

use std::net::IpAddr;
use std::time::Duration;

use crate::handler::DeviceKind;

/// Default [`EndpointConfig::concentrator_max_packet_size`]: a relay batch of
/// `gridward_core::relay::MAX_RELAY_BYTES` (256 KiB) plus room for the PUBLISH header,
/// topic and properties.
pub const DEFAULT_CONCENTRATOR_MAX_PACKET_SIZE: usize =
    gridward_core::relay::MAX_RELAY_BYTES + 4096;

/// Limits and timeouts of the endpoint. `EndpointConfig::default()` is safe for production;
/// each field documents its default.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EndpointConfig {
    /// Largest MQTT packet accepted, fixed header included (default 64 KiB). A bigger packet is
    /// refused as soon as its fixed header is read: security event `packet_too_large`, disconnect.
    /// Announced to MQTT 5 clients as Maximum Packet Size. Meters only: concentrators have
    /// [`Self::concentrator_max_packet_size`].
    pub max_packet_size: usize,
    /// [`Self::max_packet_size`] for data concentrators, whose relay batches carry up to
    /// `gridward_core::relay::MAX_RELAY_BYTES` (256 KiB) of their meters' envelopes
    /// (default [`DEFAULT_CONCENTRATOR_MAX_PACKET_SIZE`], 256 KiB + 4 KiB).
    pub concentrator_max_packet_size: usize,
    /// Most simultaneous connections, TLS handshakes in progress included (default 20,000).
    /// Beyond it a new connection is closed at once: security event `connection_limit`.
    pub max_connections: usize,
    /// Time from TCP accept to a complete CONNECT: TLS handshake + CONNECT (default 10 s).
    /// Exceeded: security event `timeout`, disconnect, counts as a failure for the source ban.
    pub connect_timeout: Duration,
    /// Upper bound on the keep-alive a client may ask for (default 20 min). A client asking for
    /// 0 (none) or more gets this one (announced as Server Keep Alive under MQTT 5).
    /// A connection silent for 1.5 × its keep-alive is closed: security event `timeout`.
    pub max_keep_alive: Duration,
    /// QoS 1 / QoS 0 messages of one connection handed to the pipeline and not yet decided
    /// (default 32). At the limit the endpoint stops reading from that connection (back-pressure);
    /// announced to MQTT 5 clients as Receive Maximum.
    pub max_inflight: u16,
    /// Head-end → meter QoS 1 publishes (commands, firmware) of one connection sent and not yet
    /// acknowledged by the meter's PUBACK (default 16). Lowered further to an MQTT 5 client's
    /// Receive Maximum; further messages wait in the session's queue.
    pub max_outbound_inflight: u16,
    /// Head-end → meter publishes one connection holds while they wait for the meter's
    /// subscription or for room in the in-flight window (default 256). Beyond it a publish is
    /// refused at once (`OutboundRefusal::QueueFull`).
    pub max_outbound_queue: usize,
    /// Sustained packet rate of one meter, packets per second (default 50).
    /// Exceeded beyond the burst: security event `rate_limited`, disconnect. The bucket is the
    /// meter's, not the connection's: a reconnecting meter continues with what its last
    /// connection left (for up to [`Self::max_connections`] meters at once; beyond, meters that
    /// are not quiet get a full bucket per connection).
    pub rate_per_second: f64,
    /// Token-bucket depth of the per-meter rate limit, packets (default 200).
    pub rate_burst: u32,
    /// A data concentrator relays for many meters: its rate limit is [`Self::rate_per_second`]
    /// and [`Self::rate_burst`] times this factor (default 64: 3,200 packets/s, burst 12,800).
    /// Its bucket is kept per concentrator like a meter's.
    pub concentrator_rate_multiplier: f64,
    /// Failed TLS handshakes / CONNECTs, and sessions cut for abuse (`rate_limited`,
    /// `packet_too_large`, `malformed_packet`), from one source IP within [`Self::ban_window`]
    /// that trigger a ban (default 10; 0 disables banning).
    pub ban_after_failures: u32,
    /// Window over which failures are counted (default 60 s).
    pub ban_window: Duration,
    /// How long a banned source is refused at accept (default 5 min). The ban raises one security
    /// event `source_banned`; connections refused during it raise none.
    pub ban_duration: Duration,
    /// Sources never banned (e.g. a concentrator or NAT gateway in front of many meters);
    /// default empty.
    pub ban_exempt: Vec<IpAddr>,
    /// Most source addresses tracked for banning at once (default 100,000); beyond it new sources
    /// are not tracked (memory stays bounded under a spoofed-address flood).
    pub ban_max_tracked: usize,
    /// Bound on writing one batch of packets to a client that does not read (default 30 s);
    /// exceeded, the connection is closed.
    pub write_timeout: Duration,
    /// Longest a connection may live (default 48 h, the design's bound); then it is closed
    /// (MQTT 5: DISCONNECT 0xA0 maximum connect time) and the meter reconnects with a fresh
    /// handshake, so certificate expiry and revocation are re-checked.
    pub max_connection_lifetime: Duration,
    /// On shutdown, how long a connection may wait for the verdicts of messages in flight before
    /// it is closed without their PUBACKs (default 5 s).
    pub shutdown_grace: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 64 * 1024,
            concentrator_max_packet_size: DEFAULT_CONCENTRATOR_MAX_PACKET_SIZE,
            max_connections: 20_000,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: Duration::from_secs(20 * 60),
            max_inflight: 32,
            max_outbound_inflight: 16,
            max_outbound_queue: 256,
            rate_per_second: 50.0,
            rate_burst: 200,
            concentrator_rate_multiplier: 64.0,
            ban_after_failures: 10,
            ban_window: Duration::from_secs(60),
            ban_duration: Duration::from_secs(5 * 60),
            ban_exempt: Vec::new(),
            ban_max_tracked: 100_000,
            write_timeout: Duration::from_secs(30),
            max_connection_lifetime: Duration::from_secs(48 * 3600),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Why a configuration is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field that must be positive is zero (or not a positive finite number).
    #[error("{0} must be positive")]
    NotPositive(&'static str),
    /// The maximum packet size is below what a CONNECT needs or above MQTT's limit.
    #[error("max_packet_size must be between 128 bytes and 268,435,460 bytes, got {0}")]
    PacketSize(usize),
    /// The concentrators' maximum packet size is below what a CONNECT needs or above MQTT's
    /// limit.
    #[error(
        "concentrator_max_packet_size must be between 128 bytes and 268,435,460 bytes, got {0}"
    )]
    ConcentratorPacketSize(usize),
}

impl EndpointConfig {
    /// Checks that every limit is usable.
    ///
    /// # Errors
    ///
    /// [`ConfigError::NotPositive`] naming the field, [`ConfigError::PacketSize`],
    /// [`ConfigError::ConcentratorPacketSize`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let packet_sizes = 128..=crate::codec::MAX_REMAINING_LENGTH + 5;
        if !packet_sizes.contains(&self.max_packet_size) {
            return Err(ConfigError::PacketSize(self.max_packet_size));
        }
        if !packet_sizes.contains(&self.concentrator_max_packet_size) {
            return Err(ConfigError::ConcentratorPacketSize(
                self.concentrator_max_packet_size,
            ));
        }
        let positive = [
            ("max_connections", self.max_connections > 0),
            ("connect_timeout", !self.connect_timeout.is_zero()),
            ("max_keep_alive", self.max_keep_alive.as_secs() > 0),
            ("max_inflight", self.max_inflight > 0),
            ("max_outbound_inflight", self.max_outbound_inflight > 0),
            ("max_outbound_queue", self.max_outbound_queue > 0),
            (
                "rate_per_second",
                self.rate_per_second.is_finite() && self.rate_per_second > 0.0,
            ),
            ("rate_burst", self.rate_burst > 0),
            (
                "concentrator_rate_multiplier",
                self.concentrator_rate_multiplier.is_finite()
                    && self.concentrator_rate_multiplier > 0.0,
            ),
            ("ban_window", !self.ban_window.is_zero()),
            ("ban_duration", !self.ban_duration.is_zero()),
            ("write_timeout", !self.write_timeout.is_zero()),
            (
                "max_connection_lifetime",
                !self.max_connection_lifetime.is_zero(),
            ),
        ];
        match positive.iter().find(|(_, ok)| !ok) {
            Some((name, _)) => Err(ConfigError::NotPositive(name)),
            None => Ok(()),
        }
    }
}

impl EndpointConfig {
    /// The largest packet accepted from a device of `kind`:
    /// [`Self::max_packet_size`] or [`Self::concentrator_max_packet_size`].
    pub fn max_packet_size_of(&self, kind: DeviceKind) -> usize {
        match kind {
            DeviceKind::Meter => self.max_packet_size,
            DeviceKind::Concentrator => self.concentrator_max_packet_size,
        }
    }

    /// The rate limit of a device of `kind`: (packets per second, burst). A concentrator's is
    /// the meters' times [`Self::concentrator_rate_multiplier`] (the burst rounded, at least 1).
    pub fn rate_of(&self, kind: DeviceKind) -> (f64, u32) {
        match kind {
            DeviceKind::Meter => (self.rate_per_second, self.rate_burst),
            DeviceKind::Concentrator => {
                let m = self.concentrator_rate_multiplier;
                let burst = (f64::from(self.rate_burst) * m)
                    .round()
                    .clamp(1.0, f64::from(u32::MAX));
                // In range after the clamp; `as` saturates anyway.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let burst = burst as u32;
                (self.rate_per_second * m, burst)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(EndpointConfig::default().validate(), Ok(()));
        let c = EndpointConfig {
            max_inflight: 0,
            ..EndpointConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::NotPositive("max_inflight")));
        let c = EndpointConfig {
            max_outbound_inflight: 0,
            ..EndpointConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::NotPositive("max_outbound_inflight"))
        );
        let c = EndpointConfig {
            max_outbound_queue: 0,
            ..EndpointConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::NotPositive("max_outbound_queue"))
        );
        let c = EndpointConfig {
            rate_per_second: f64::NAN,
            ..EndpointConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::NotPositive("rate_per_second"))
        );
        let c = EndpointConfig {
            max_packet_size: 10,
            ..EndpointConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::PacketSize(10)));
        let c = EndpointConfig {
            concentrator_max_packet_size: 10,
            ..EndpointConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::ConcentratorPacketSize(10)));
        let c = EndpointConfig {
            concentrator_rate_multiplier: 0.0,
            ..EndpointConfig::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::NotPositive("concentrator_rate_multiplier"))
        );
    }

    #[test]
    fn concentrators_get_their_own_packet_size_and_a_multiplied_rate() {
        let c = EndpointConfig::default();
        assert_eq!(c.max_packet_size_of(DeviceKind::Meter), 64 * 1024);
        assert!(
            c.max_packet_size_of(DeviceKind::Concentrator) > gridward_core::relay::MAX_RELAY_BYTES
        );
        assert_eq!(c.rate_of(DeviceKind::Meter), (50.0, 200));
        assert_eq!(c.rate_of(DeviceKind::Concentrator), (3200.0, 12_800));
        let c = EndpointConfig {
            concentrator_rate_multiplier: 0.001,
            ..EndpointConfig::default()
        };
        assert_eq!(c.rate_of(DeviceKind::Concentrator).1, 1);
    }
}
