//! # gridward-syslog
//!
//! Security events as syslog: RFC 5424 messages sent to one configured collector over UDP
//! (RFC 5426), TCP with octet-counting framing (RFC 6587 §3.4.1) or TLS (RFC 5425, with the
//! Gridward TLS profile of `gridward_pki::tls`).
//!
//! ```text
//!  security event ──► SyslogMessage { time, severity, msgid = reason code, SD params, msg }
//!        │                                                                     sans-IO
//!        ▼
//!  Formatter::format ──► <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD-ID k="v"] BOM MSG
//!        │
//!        ▼                                                                     IO
//!  SyslogHandle::send ── bounded queue (full: dropped, counted) ──► Sender task
//!        UDP: one datagram ≤ 2048 bytes │ TCP/TLS: "LEN SP MSG", reconnect with backoff
//! ```
//!
//! ## Modules
//!
//! - [`message`]: [`Severity`], [`Facility`], [`SyslogMessage`], [`Formatter`] (exact RFC 5424
//!   bytes; the time is in the message, no clock is read) and [`octet_counted`] framing.
//!   Pure functions, tested byte for byte.
//! - [`sender`]: [`Sender::start`] spawns the one task that owns the socket; [`SyslogHandle`]
//!   queues without ever waiting ([`SyslogHandle::send`]), reports [`SyslogStats`], and tells
//!   when a graceful shutdown has flushed the queue ([`SyslogHandle::stopped`]).
//!
//! ## Rules this crate keeps
//!
//! - The caller never waits on the collector: the ingest path must not slow down because a
//!   SIEM is slow or gone. Messages that do not fit in the queue are dropped and counted.
//! - Every byte sent is valid RFC 5424: values that do not fit the grammar are replaced,
//!   escaped or cut (see [`message`]), and the SD-ID, which is configuration, is validated.
//! - TLS is only what the caller's `rustls::ClientConfig` allows; this crate never builds a
//!   configuration of its own, so certificate verification is that of `gridward_pki::tls`.
//!
//! The integration tests send to a strict RFC 5424 receiver written in Python
//! (`tests/py/syslog_receiver.py`) over UDP, TCP and mutual TLS.

#![forbid(unsafe_code)]

pub mod message;
pub mod sender;

pub use message::{
    DEFAULT_APP_NAME, DEFAULT_SD_ID, Facility, Formatter, MessageError, Severity, SyslogMessage,
    octet_counted,
};
pub use sender::{Sender, SenderConfig, SyslogHandle, SyslogStats, Transport};
