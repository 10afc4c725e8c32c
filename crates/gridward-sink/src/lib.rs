//! # gridward-sink
//!
//! The reference downstream service: what a billing or MDM integrator runs (or copies) to
//! receive the readings a Gridward head-end forwards. It accepts `POST /readings` over HTTPS
//! with a client certificate required, believes a reading only if its RFC 9421 signature, its
//! `Content-Digest` and its freshness check out, refuses a reused nonce, and stores each
//! reading once.
//!
//! ```text
//!  head-end forwarder ── TLS 1.3/1.2, client certificate required, CRLs (gridward_pki::tls)
//!        │                                  server: tokio-rustls + hyper (HTTP/1.1, HTTP/2)
//!        ▼
//!  request ──► check::check(method, path, target URI, headers, body, keys, now)   sans-IO
//!        │       405/404 ─ 415 ─ 413 ─ signature 401 ─ digest 400 ─ body 400
//!        ▼
//!  Incoming ──► writer (one thread, group commit) ──► store::SinkStore::record   SQLite
//!        │          nonce seen? 401 nonce_replayed ─ ReadingID stored? 200 duplicate
//!        ▼
//!  201 {"status":"stored","reading_id":"m000001-42"}
//! ```
//!
//! - [`check`]: the decision on one request, sans-IO, with the typed [`Refusal`] (HTTP status
//!   and stable reason code). Only [`check::check`] makes an [`Incoming`].
//! - [`store`]: [`SinkStore`], readings and nonces in SQLite (WAL, `synchronous = FULL`),
//!   de-duplicated on `ReadingID`; nonces survive restarts.
//! - [`writer`]: the thread that owns the store and commits batches.
//! - [`server`]: TLS, HTTP, limits, logging and graceful shutdown; [`start`] returns a
//!   [`RunningSink`].
//! - [`config`]: [`SinkConfig`], [`Keys`], and [`tls_from_pki`].
//! - [`stats`]: counters (received, stored, duplicates, refused per reason).
//!
//! Every refusal is answered with `{"error": "<reason code>"}` and nothing else, and logged
//! as one `tracing` event with the status, the code and the detail, in the connection's span
//! (the peer address, the client certificate's identity). Nothing refused is stored.
//!
//! Starting a sink in-process (tests, demos):
//!
//! ```no_run
//! # async fn example() -> Result<(), gridward_sink::SinkError> {
//! use gridward_sink::{Keys, SinkConfig, tls_from_pki};
//! let tls = tls_from_pki("pki".as_ref(), "sink", &[], &[])?;
//! let mut keys = Keys::new();
//! keys.insert(Keys::load("hes", "pki/clients/hes/cert.pem".as_ref())?);
//! let config = SinkConfig::new("127.0.0.1:0".parse().unwrap(), tls, keys, "sink.db".into());
//! let sink = gridward_sink::start(config).await?;
//! println!("listening on {}", sink.local_addr());
//! let stats = sink.shutdown().await;
//! println!("{stats}");
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod check;
pub mod config;
pub mod server;
pub mod stats;
pub mod store;
pub mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use check::{Incoming, Reading, Refusal, Rules};
pub use config::{Clock, Keys, SinkConfig, system_clock, tls_from_pki};
pub use server::{RunningSink, start};
pub use stats::StatsSnapshot;
pub use store::{Outcome, SinkStore, StoreError, StoredReading};

/// Why a sink cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The PKI directory cannot be opened, or it has no usable server certificate, key or CRL.
    #[error("PKI: {0}")]
    Pki(#[from] gridward_pki::PkiError),
    /// rustls refused the TLS material (no roots, no CRLs, a key that does not match, ...).
    #[error("TLS: {0}")]
    Tls(#[from] gridward_pki::tls::TlsError),
    /// An extra trust anchor or CRL file cannot be read or holds no PEM block of its kind.
    #[error("{}: {reason}", path.display())]
    TrustFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A signer's key cannot be read or is not an Ed25519 or P-256 key.
    #[error("key {key_id:?} from {}: {reason}", path.display())]
    Key {
        /// The key id it was given.
        key_id: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No signer's key: every request would be refused.
    #[error("no signer key configured: every request would be refused")]
    NoKeys,
    /// The store cannot be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The listening socket cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The writer thread cannot be started.
    #[error("cannot start the writer thread: {0}")]
    Thread(std::io::Error),
}
