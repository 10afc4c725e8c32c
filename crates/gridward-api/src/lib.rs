//! # gridward-api
//!
//! The HTTPS REST API of the head-end, for people and their programs: `/api/v1`.
//!
//! ```text
//!  client ── TLS 1.3/1.2 (gridward_pki::tls, client certificate optional, CRLs enforced)
//!    │          server: tokio-rustls + hyper (HTTP/1.1, HTTP/2), axum router
//!    ▼
//!  auth::Gate   credential → Principal: Bearer session │ cookie + X-CSRF-Token │ client
//!    │          certificate with urn:gridward:role:{role}
//!    ▼
//!  Gate::require(Action) ──► gridward_access::authorize   (the one decision; deny by default)
//!    │  401 / 403 / 404 (another's meter) ──► security event + audit entry
//!    ▼
//!  handler ──► gridward-store (read) │ gridward-access (users) │ gridward-audit (read)
//!          ├─► gridward-command (commands, four eyes, firmware, campaigns; 503 when off)
//!          └─► gridward_store::AlarmStore (alarms: ack, clear; concentrator topology; 503 when off)
//!    ▼
//!  JSON, CSV, or an RFC 9457 problem
//! ```
//!
//! - [`routes`]: every route, registered with `utoipa-axum` so the router and the OpenAPI
//!   document ([`routes::openapi_json`], committed as `docs/openapi.json`) are one source.
//! - [`auth`]: credentials and the gate.
//! - [`problem`]: `application/problem+json`, never an internal detail.
//! - [`extract`]: JSON/query/path extractors whose rejections are problems.
//! - [`state`]: [`ApiContext`], and the security-event and audit records every refusal leaves.
//! - [`server`]: TLS, HTTP, [`start`] and [`RunningApi`].
//!
//! **Boundary:** this crate decides nothing about who may do what (that is
//! `gridward_access::authorize`) and writes nothing itself but security events, audit
//! entries, alarm acknowledgements and clears, and topology changes (through
//! `gridward_store::AlarmStore`, each audited); it reads the store, and changes the downward
//! path only through `gridward_command::Commands`, which enforces four eyes, expiry bounds
//! and the manufacturer's signature.

pub mod auth;
pub mod extract;
pub mod problem;
pub mod routes;
pub mod server;
pub mod state;

pub use problem::Problem;
pub use routes::{openapi_json, router_and_doc};
pub use server::{ApiConfig, ApiError, RunningApi, start};
pub use state::{ApiContext, Clock, Observer, SecurityHook};
