//! # gridward-command
//!
//! The head-end's side of commands: issuing signed commands, four-eyes proposals, dispatch to
//! meters, firmware uploads and staged firmware campaigns.
//!
//! ```text
//!  operator ──IssueRequest──► Commands::issue ──┬─ critical kind to many meters ──► proposal (pending)
//!                                               │     Commands::approve (another operator) ─┐
//!                                               └─ reserve counters (durable) ◄─────────────┘
//!                                                   sign (command key) ──► insert (queued) ──► Notify
//!  Dispatcher::run ◄── Notify / meter_reachable / 1 s tick
//!     expire, token bucket, one in flight per meter ──► Transport::send (stored bytes, unchanged)
//!     Delivery::Acked ──► mark_sent  (firmware_update: then the image chunks)
//!     Delivery::Lost  ──► stays queued, the same bytes go again when the meter is reachable
//!  head-end stores the meter's signed ack ──► Commands::on_ack ──► campaigns advance
//!  upload_firmware (manufacturer signature) ──► create_campaign ──► stage 1 ──► stage 2 | pause
//! ```
//!
//! - [`issue`]: [`Commands`], the service: [`Commands::issue`], the signer, the clock, the
//!   policy; the shared state the dispatcher reads.
//! - [`policy`]: [`Policy`]: critical kinds, four-eyes threshold, expiry bounds, dispatch rate.
//! - [`proposal`]: four eyes: [`Commands::approve`], [`Commands::reject`],
//!   [`Commands::expire_due`]; [`ProposerCheck`].
//! - [`dispatch`]: [`Dispatcher`], the task that sends queued commands; [`TokenBucket`]
//!   (sans-IO rate limit); [`DispatchStats`].
//! - [`ack`]: [`Commands::on_ack`], what follows a meter's stored acknowledgement.
//! - [`firmware`]: [`Commands::upload_firmware`]: the manufacturer's signature, digest, size.
//! - [`campaign`]: staged firmware campaigns: [`campaign::next_step`] (sans-IO) and the glue.
//! - [`transport`]: the [`Transport`] trait the head-end implements over its MQTT endpoint.
//! - [`audit`]: the [`AuditRecorder`] trait every act is recorded through.
//! - [`args`]: the JSON form of a command's arguments stored beside the signed bytes.
//!
//! This crate knows nothing of MQTT sockets, HTTP or SQL: it reaches the store through
//! [`gridward_store::CommandStore`], meters through [`Transport`], the audit log through
//! [`AuditRecorder`]. Who may issue commands at all is decided by `gridward-access` before a
//! request arrives here; this crate enforces the rules of the commands themselves (four eyes,
//! expiry bounds, the manufacturer's signature, the order of counters).

#![forbid(unsafe_code)]

pub mod ack;
pub mod args;
pub mod audit;
pub mod campaign;
pub mod dispatch;
pub mod firmware;
pub mod issue;
pub mod policy;
pub mod proposal;
pub mod transport;

pub use ack::{AckEffect, AckedCommand};
pub use audit::AuditRecorder;
pub use campaign::{CampaignError, CampaignRequest, Step};
pub use dispatch::{DispatchStats, Dispatcher, Swept, TokenBucket};
pub use firmware::FirmwareUploadError;
pub use issue::{Clock, CommandError, Commands, IssueRequest, Issued};
pub use policy::{Policy, PolicyError};
pub use proposal::{Approval, Approver, ProposalError, ProposerCheck};
pub use transport::{Delivery, NotReachable, Transport};
