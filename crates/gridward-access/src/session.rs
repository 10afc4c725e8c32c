//! Sessions: tokens, CSRF tokens, lifetimes.
//!
//! A session token is 256 random bits handed to the client once as `gws_` + base64url; the
//! store keeps only its SHA-256. Each session also has a CSRF token (`gwc_` + 256 random bits,
//! stored as SHA-256) that state-changing requests present; [`check_csrf`] compares the hashes
//! in constant time. A session ends [`IDLE_TIMEOUT`] after its last use, [`ABSOLUTE_TIMEOUT`]
//! after its creation, or when revoked (logout; the user's password, role, second factor changed,
//! or the user disabled).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::{Duration, OffsetDateTime};

use crate::principal::Principal;
use crate::secret::Secret;
use crate::store::StoreError;

/// Prefix of session tokens.
pub const TOKEN_PREFIX: &str = "gws_";

/// Prefix of CSRF tokens.
pub const CSRF_PREFIX: &str = "gwc_";

/// A session ends this long after its last use.
pub const IDLE_TIMEOUT: Duration = Duration::minutes(15);

/// A session ends this long after its creation, however busy.
pub const ABSOLUTE_TIMEOUT: Duration = Duration::hours(8);

/// Random bytes per token (256 bits).
const TOKEN_BYTES: usize = 32;

/// A session's number in the store (shown in "my sessions"; not a credential).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub i64);

/// A live session, as [`crate::Access::authenticate`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Its number.
    pub id: SessionId,
    /// Who it belongs to, with the user's current role and meters.
    pub principal: Principal,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was last used (this use included).
    pub last_used_at: OffsetDateTime,
    /// When it ends unless used again (idle or absolute limit, whichever comes first).
    pub expires_at: OffsetDateTime,
    /// SHA-256 of its CSRF token.
    pub(crate) csrf_hash: [u8; 32],
}

impl Session {
    /// SHA-256 of the session's CSRF token.
    pub fn csrf_hash(&self) -> &[u8; 32] {
        &self.csrf_hash
    }
}

/// Why a session token is not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No session has this token (never issued, malformed, or purged).
    #[error("unknown session")]
    Unknown,
    /// The session was not used for [`IDLE_TIMEOUT`].
    #[error("session expired after {IDLE_TIMEOUT} without use")]
    ExpiredIdle,
    /// The session is older than [`ABSOLUTE_TIMEOUT`].
    #[error("session expired {ABSOLUTE_TIMEOUT} after login")]
    ExpiredAbsolute,
    /// The session was revoked (logout, password, role or second factor changed).
    #[error("session revoked")]
    Revoked,
    /// The session's user is disabled.
    #[error("user disabled")]
    UserDisabled,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SessionError {
    /// HTTP status for the client: 401 for every refusal (the client logs in again), 500 for a
    /// store failure.
    pub fn http_status(&self) -> u16 {
        match self {
            SessionError::Store(_) => 500,
            _ => 401,
        }
    }
}

/// A fresh token with `prefix` and the SHA-256 of the whole token.
pub(crate) fn new_token(
    prefix: &str,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(Secret, [u8; 32]), rand::Error> {
    let mut bytes = [0u8; TOKEN_BYTES];
    rng.try_fill_bytes(&mut bytes)?;
    let token = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = sha256(&token);
    Ok((Secret::new(token), hash))
}

/// SHA-256 of a token as presented.
pub(crate) fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `presented` is `session`'s CSRF token (constant-time comparison of the hashes).
pub fn check_csrf(session: &Session, presented: &str) -> bool {
    bool::from(sha256(presented).ct_eq(&session.csrf_hash))
}

/// Decides whether a session created at `created`, last used at `last_used`, revoked or not, is
/// still alive at `now`.
///
/// # Errors
///
/// [`SessionError::Revoked`], [`SessionError::ExpiredAbsolute`], [`SessionError::ExpiredIdle`].
pub fn check_lifetime(
    created: OffsetDateTime,
    last_used: OffsetDateTime,
    revoked: bool,
    now: OffsetDateTime,
) -> Result<(), SessionError> {
    if revoked {
        return Err(SessionError::Revoked);
    }
    if now >= created + ABSOLUTE_TIMEOUT {
        return Err(SessionError::ExpiredAbsolute);
    }
    if now >= last_used + IDLE_TIMEOUT {
        return Err(SessionError::ExpiredIdle);
    }
    Ok(())
}

/// When a session created at `created` and last used at `last_used` ends unless used again.
pub fn expires_at(created: OffsetDateTime, last_used: OffsetDateTime) -> OffsetDateTime {
    (last_used + IDLE_TIMEOUT).min(created + ABSOLUTE_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-01 08:00 UTC);

    #[test]
    fn tokens_are_prefixed_256_bit_base64url() {
        let (t, h) = new_token(TOKEN_PREFIX, &mut OsRng).unwrap();
        let body = t.expose().strip_prefix(TOKEN_PREFIX).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap().len(), 32);
        assert_eq!(sha256(t.expose()), h);
        let (t2, _) = new_token(TOKEN_PREFIX, &mut OsRng).unwrap();
        assert_ne!(t, t2);
        assert_eq!(format!("{t:?}"), "[redacted]");
    }

    #[test]
    fn lifetimes() {
        let min = Duration::minutes(1);
        assert!(check_lifetime(T0, T0, false, T0 + 14 * min).is_ok());
        assert!(matches!(
            check_lifetime(T0, T0, false, T0 + 15 * min),
            Err(SessionError::ExpiredIdle)
        ));
        assert!(check_lifetime(T0, T0 + 470 * min, false, T0 + 479 * min).is_ok());
        assert!(matches!(
            check_lifetime(T0, T0 + 470 * min, false, T0 + 480 * min),
            Err(SessionError::ExpiredAbsolute)
        ));
        assert!(matches!(
            check_lifetime(T0, T0, true, T0),
            Err(SessionError::Revoked)
        ));
        assert_eq!(expires_at(T0, T0), T0 + 15 * min);
        assert_eq!(expires_at(T0, T0 + 470 * min), T0 + 480 * min);
    }
}
