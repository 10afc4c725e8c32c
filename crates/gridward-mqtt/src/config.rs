//! [`EndpointConfig`]: every limit of the MQTT endpoint, with safe defaults.

use std::net::IpAddr;
use std::time::Duration;

/// Limits and timeouts of the endpoint. `EndpointConfig::default()` is safe for production;
/// each field documents its default.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EndpointConfig {
    /// Largest MQTT packet accepted, fixed header included (default 64 KiB). A bigger packet is
    /// refused as soon as its fixed header is read: security event `packet_too_large`, disconnect.
    /// Announced to MQTT 5 clients as Maximum Packet Size.
    pub max_packet_size: usize,
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
            max_connections: 20_000,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive: Duration::from_secs(20 * 60),
            max_inflight: 32,
            max_outbound_inflight: 16,
            max_outbound_queue: 256,
            rate_per_second: 50.0,
            rate_burst: 200,
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
}

impl EndpointConfig {
    /// Checks that every limit is usable.
    ///
    /// # Errors
    ///
    /// [`ConfigError::NotPositive`] naming the field, [`ConfigError::PacketSize`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(128..=crate::codec::MAX_REMAINING_LENGTH + 5).contains(&self.max_packet_size) {
            return Err(ConfigError::PacketSize(self.max_packet_size));
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
    }
}
