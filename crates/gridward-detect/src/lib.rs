//! # gridward-detect
//!
//! The alarm model and the detectors of issue 11: tamper, outage, theft suspicion, stalled
//! registers, intrusion (refusal bursts per meter, source, user and fleet-wide; cloned meters;
//! silence after a revocation attempt; refused relays) and PLC meters lost.
//!
//! ## The boundary
//!
//! This crate is **pure** (sans-IO): no sockets, no files, no threads, no clock. The head-end
//! (`gridward-hes`) feeds [`Signal`]s — only what it stored and verified (readings, meter events,
//! concentrator events), plus its security events and session changes — into
//! [`Detector::observe`] with its own `now`, calls [`Detector::tick`] regularly (every minute
//! or so) for the time-driven decisions, and hands the returned [`AlarmAction`]s to
//! `gridward-store`'s `AlarmStore`, which keeps one active alarm per (type, originator) and
//! folds repeats into it. Tests and the [`sim`] drive the same code on a virtual clock.
//!
//! The codes of [`Severity`], [`AlarmType`] and [`Originator`] are **stable strings** (they are
//! stored, shown by the API and the CLI and matched by operators' tooling): never rename one.
//!
//! ## Modules
//!
//! - [`model`]: severities, alarm types, originators, evidence, raise / clear actions.
//! - [`signal`]: the input [`Signal`] and the meter groups ([`Topology`]).
//! - [`config`]: `[detection]` thresholds with defaults and validation.
//! - [`detector`]: the engine ([`Detector`]).
//! - [`sim`]: a deterministic simulated fleet with known ground truth, scoring the detectors.
//!
//! ## Conventions
//!
//! - `relay_not_authorized` security events carry the **concentrator's** id in their `meter`
//!   field; they raise `relay_refused` on `concentrator:ID` (and count for the source and the
//!   fleet, not for a meter).
//! - A meter is in at most one group; a concentrator assignment wins over a feeder.
//! - Repeats of the intrusion alarms (refusal bursts, cloned meter, relay refused) are
//!   rate-limited to one Raise per key per `intrusion.repeat_secs`.

#![forbid(unsafe_code)]

pub mod config;
pub mod detector;
pub mod model;
pub mod signal;
pub mod sim;

pub use config::{
    DetectConfigError, DetectionConfig, FeederConfig, IntrusionConfig, OutageConfig, TheftConfig,
};
pub use detector::{Detector, StateSizes, is_login_failure, is_refusal};
pub use model::{
    AlarmAction, AlarmType, Clear, Evidence, Originator, Raise, Severity, evidence_json,
};
pub use signal::{ConcentratorEventKind, Signal, Topology};
