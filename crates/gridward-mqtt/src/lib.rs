//! # gridward-mqtt
//!
//! Gridward's device-facing MQTT side. It knows nothing about storage or HTTP: accepted messages
//! go to a [`handler::PublishHandler`], refusals, connection changes and subscriptions to a
//! [`handler::EventSink`]; head-end messages for a meter (commands, firmware) come in through
//! [`Endpoint::publish`] and go out as QoS 1 PUBLISHes, the meter's PUBACK reported back.
//!
//! - [`endpoint`]: the MQTT 3.1.1 / 5 endpoint over mutual TLS — certificate-bound identity,
//!   topic ACL, QoS 0/1 with PUBACK after the pipeline's verdict, keep-alive, packet size,
//!   connection and rate limits, source bans, certificate/CRL reload, graceful shutdown, and
//!   head-end → meter publishes ([`Endpoint::publish`]).
//! - [`session`]: the sans-IO session state machine the endpoint runs for each meter.
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
pub use handler::{EventSink, InboundPublish, PublishHandler, Verdict};
pub use peer::Revocations;
pub use session::{OutboundRefusal, OutboundResult};
