//! # gridward-mqtt
//!
//! Gridward's device-facing MQTT side. It knows nothing about storage or HTTP: accepted messages
//! go to a [`handler::PublishHandler`], refusals, connection changes, session takeovers and
//! subscriptions to a [`handler::EventSink`]; head-end messages for a meter (commands, firmware)
//! come in through [`Endpoint::publish`] and go out as QoS 1 PUBLISHes, the meter's PUBACK
//! reported back.
//!
//! Two kinds of device connect ([`DeviceKind`]), each identified by its certificate:
//!
//! | device | publishes (QoS 0/1) to | subscribes to | max packet | rate |
//! | --- | --- | --- | --- | --- |
//! | meter | `meters/{id}/readings`, `meters/{id}/events` | `meters/{id}/commands`, `meters/{id}/firmware` | `max_packet_size` | `rate_per_second` |
//! | concentrator | `concentrators/{id}/relay`, `concentrators/{id}/events` | nothing | `concentrator_max_packet_size` | × `concentrator_rate_multiplier` |
//!
//! Everything else (ClientID = id, bans, connection limit, keep-alive, takeover, revocation) is
//! the same for both.
//!
//! - [`endpoint`]: the MQTT 3.1.1 / 5 endpoint over mutual TLS — certificate-bound identity,
//!   topic ACL, QoS 0/1 with PUBACK after the pipeline's verdict, keep-alive, packet size,
//!   connection and rate limits, source bans, certificate/CRL reload, graceful shutdown, and
//!   head-end → meter publishes ([`Endpoint::publish`]).
//! - [`session`]: the sans-IO session state machine the endpoint runs for each device.
//! - [`handler`]: the endpoint ↔ pipeline contract.
//! - [`config`]: [`config::EndpointConfig`], every limit with a safe default.
//! - [`limits`]: token bucket and source ban list (sans-IO).
//! - [`peer`]: certificate identity, TLS failure reasons, revocation sets.
//! - [`client`]: a minimal async MQTT client over TLS, used by simulated meters, tests and the
//!   attack harness.
//! - [`codec`]: framing and packet (de)serialisation on top of the `rumqttc` packet codec.

#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod config;
pub mod endpoint;
pub mod handler;
pub mod limits;
pub mod peer;
pub mod session;

pub use config::EndpointConfig;
pub use endpoint::{Clock, Endpoint, EndpointError, EndpointStats, PublishError};
pub use handler::{DeviceKind, EventSink, InboundPublish, PublishHandler, Verdict};
pub use peer::Revocations;
pub use session::{OutboundRefusal, OutboundResult};
