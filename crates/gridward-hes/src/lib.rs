//! # gridward-hes
//!
//! The head-end service: what happens to a meter message between the MQTT endpoint and the
//! store, and the process that runs it all.
//!
//! ```text
//!  endpoint ──InboundPublish──► Pipeline::check ──► batch writer thread ──► Store::commit
//!   (mqtt)                       verify envelope        one transaction          │
//!      ▲                         freshness              per batch                │
//!      └────────── Verdict ◄──────── outcome ◄───────────────────────────────────┘
//!                 (PUBACK)      rejections ──► security events (batched) + metrics
//! ```
//!
//! - [`pipeline`]: the checks, in order, and the verdict; sans-IO apart from the channel to the writer.
//! - [`writer`]: the batch writer thread that owns durable writes (group commit, bounded queue).
//! - [`metrics`]: counters per outcome and reason, latency and batch histograms, outbox gauges;
//!   the OpenMetrics exposition for `/metrics` ([`metrics::Metrics::encode_prometheus`]).
//! - [`service`]: the running head-end ([`service::start`]): endpoint, pipeline, writer, store.
//! - [`config`]: `gridward.toml`: raw TOML → validated [`config::Config`]; the commented default.
//! - [`detection`]: the detection thread: signals (stored messages, connections, takeovers,
//!   security events) through `gridward-detect`'s pure detectors into alarms in the store.
//! - [`relay`]: data concentrators: a relay batch split into its meters' own envelopes, each
//!   verified with its meter's key, only for the meters registered behind the concentrator.

#![forbid(unsafe_code)]

pub mod audit;
pub mod commands;
pub mod config;
pub mod detection;
pub mod forward;
pub mod metrics;
pub mod pipeline;
pub mod relay;
pub mod service;
pub mod writer;
