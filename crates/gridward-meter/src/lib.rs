//! # gridward-meter
//!
//! The device side of Gridward: simulated smart meters that hold their own key and certificate,
//! keep a persisted message counter, produce a realistic cumulative kWh register, sign every
//! message into a COSE envelope, and publish it over MQTT with mutual TLS — alone or as a fleet
//! of 10,000 in one process.
//!
//! ```text
//!   profile::LoadProfile ─► meter::Meter (sans-IO: now in, signed Publish out) ─► fleet (tokio, MQTT/TLS)
//!                              ▲        │ counter_reservation()                      │
//!   counter::CounterBlock ─────┘        ▼                                            ▼
//!                           state::CounterStore (fsync'd marks)    outbox::Outbox (unacknowledged, on disk)
//! ```
//!
//! - [`profile`]: the daily load curve and the register it drives (a pure function of time).
//! - [`counter`]: counters handed out from reserved blocks, never reused.
//! - [`state`]: the fleet's persisted counter marks and device state (one atomically rewritten
//!   file).
//! - [`outbox`]: unacknowledged messages on disk, resent after a crash of the meter process.
//! - [`meter`]: one meter as a state machine: readings, events, resend, and the misbehaving
//!   devices of demonstrations ([`meter::Misbehaviour`]: replay, tamper, revoked certificate,
//!   firmware that fails to boot).
//! - [`command`]: signed commands from the head-end, verified and executed by the meter (relay,
//!   interval, tariff, read now, firmware), each answered with a signed acknowledgement.
//! - [`firmware`]: A/B firmware slots and the transfer of a manufacturer-signed image.
//! - [`backoff`]: reconnect delays with exponential backoff and full jitter (the head-end's
//!   forwarder uses the same, from `gridward_core::backoff`).
//! - [`identity`]: a meter's TLS configuration and envelope key from a PKI directory.
//! - [`sign`]: signing a document given on the command line (`gridward meter sign`).
//! - [`fleet`]: N meters in one process over MQTT/TLS, one tokio task each; concentrators with
//!   their PLC meters, one task and one connection each.
//! - [`concentrator`]: a data concentrator: relay batches of its PLC meters' own envelopes,
//!   resent until acknowledged, and its own signed events (sans-IO; its task is `plc`).
//! - [`scenario`]: live behaviours with ground truth (thief, feeder outage, cloned meter, PLC
//!   meter lost, altered or unauthorised relay).
//! - [`stats`]: live fleet counters and the publish → PUBACK latency histogram.
//!
//! Architecture invariants:
//! - the meter logic ([`meter`], [`command`], [`firmware`], [`counter`], [`profile`],
//!   [`backoff`]) reads no clock and
//!   touches no file or socket; `now` is always a parameter. [`fleet`] takes the wall clock as
//!   an injected [`fleet::Clock`];
//! - a counter is used only below a high-water mark that is already fsync'd ([`state`]), so no
//!   crash can make a meter reuse one;
//! - a genuine message leaves a meter only when the head-end acknowledged or refused it; until
//!   then it is resent byte for byte, with the same counter;
//! - a command executes only after `gridward_core::command::verify` against the pinned signers;
//!   its acknowledgement and its PUBACK leave only after the new device state (command counter
//!   included) is fsync'd.
//!
//! Start with [`fleet::Fleet::start`] (or drive a [`meter::Meter`] yourself); the CLI is
//! `gridward meter run` and `gridward meter sign`.

#![forbid(unsafe_code)]

pub use gridward_core::backoff;
pub mod command;
pub mod concentrator;
pub mod counter;
pub mod firmware;
pub mod fleet;
pub mod identity;
pub mod meter;
pub mod outbox;
mod plc;
pub mod profile;
pub mod scenario;
pub mod sign;
pub mod state;
pub mod stats;
