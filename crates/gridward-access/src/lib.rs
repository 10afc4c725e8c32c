//! Users, passwords, second factors, lockout, sessions, and the one authorisation function.
//!
//! ## Module map
//!
//! - [`authz`]: [`authorize`], the one function that decides every request, deny by default,
//!   from a [`Principal`] (or none) and an [`Action`].
//! - [`principal`]: [`Role`], [`Principal`] and [`PrincipalId`]: who is asking, as the
//!   credential (session or client certificate) says, never the request.
//! - [`secret`]: [`Secret`], a string whose `Debug` prints `[redacted]` (passwords, tokens).
//! - [`password`]: the password policy (length, zxcvbn strength with the username as user
//!   input) and Argon2id hashing with [`Argon2Params`] (OWASP's parameters by default).
//! - [`totp`]: RFC 6238 codes (SHA-1, 6 digits, 30 s, ±1 step, each step accepted once),
//!   enrolment (`otpauth://` URI and a terminal QR code) and recovery codes.
//! - [`ratelimit`]: a sans-IO token bucket per source address for login attempts.
//! - [`session`]: session and CSRF tokens (256 bits, stored as SHA-256) and their lifetimes.
//! - [`username`]: the username rule.
//! - [`store`]: [`AccessStore`], users, recovery codes and sessions in SQLite.
//! - [`service`]: [`Access`], the service the API calls: user management, [`Access::login`],
//!   [`Access::authenticate`], [`Access::logout`].
//!
//! ## Design overview
//!
//! ```text
//!  LoginRequest ──► rate limit (source) ──► user? ──► Argon2id verify (a dummy hash for unknown users)
//!                                                     ──► disabled? locked? ──► TOTP / recovery code
//!                                                     ──► session: token + CSRF token, stored hashed
//!  token ──► Access::authenticate ──► Session { principal } ──► authorize(principal, action) ──► Decision
//! ```
//!
//! Time is always passed in (`now`); nothing here reads a clock.
//! Randomness comes from the operating system ([`rand::rngs::OsRng`]) at the service's edge;
//! the functions below it take the generator as a parameter.
//! Every login failure is typed ([`FailureKind`]) so the caller can write a security event and
//! an audit entry, while [`LoginFailure::public_message`] never says whether a user exists.

#![forbid(unsafe_code)]

pub mod authz;
pub mod password;
pub mod principal;
pub mod ratelimit;
pub mod secret;
pub mod service;
pub mod session;
pub mod store;
pub mod totp;
pub mod username;

pub use authz::{Action, Decision, DenyReason, authorize};
pub use password::{Argon2Params, PasswordError};
pub use principal::{Principal, PrincipalId, Role, principal_for_certificate};
pub use secret::Secret;
pub use service::{
    Access, AccessError, FailureKind, LoginFailure, LoginRequest, LoginSuccess, NewUser, UserInfo,
};
pub use session::{Session, SessionError, SessionId};
pub use store::{AccessStore, StoreError};
pub use totp::TotpEnrolment;
