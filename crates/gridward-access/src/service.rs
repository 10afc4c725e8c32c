//! [`Access`]: the service the API and the CLI call.
//!
//! ## Login
//!
//! [`Access::login`] decides in this order, and every refusal is a [`LoginFailure`] whose
//! [`FailureKind`] the caller writes as a security event and an audit entry:
//!
//! 1. the source's rate limit ([`RateLimit`]; every attempt takes a token) → `RateLimited`;
//! 2. one Argon2id verification, always: against the user's hash, or against a dummy hash made
//!    at start-up for unknown (or malformed) usernames, so that timing does not tell whether a
//!    user exists → `UnknownUser`;
//! 3. `Disabled`, then `Locked` (a lockout started by [`MAX_FAILURES`] consecutive failures and
//!    lasting [`LOCKOUT`]), whatever the password;
//! 4. `BadPassword`;
//! 5. for users with a second factor (every operator, auditor and admin; consumers who enrolled):
//!    no code → `TotpRequired`; a 6-digit code for a step not later than the last accepted one
//!    → `TotpReplayed`; a wrong code or an unknown or used recovery code → `BadTotp`.
//!
//! `BadPassword`, `BadTotp` and `TotpReplayed` count towards the lockout (and the failure that
//! reaches [`MAX_FAILURES`] has `locked_now`); a success resets the count.
//! `TotpRequired` does not count: it is not a guess, the password was right and the client is
//! asked for the code. (This does tell the client that the password was right, as any two-step
//! login does; a client that always sends the code with the password never sees it, and
//! password guessing is still bounded by the lockout and the rate limit.)
//! `UnknownUser`, `Locked`, `Disabled` and `RateLimited` do not count either (there is no user
//! to count for, or the user cannot log in anyway).
//!
//! [`LoginFailure::public_message`] is one sentence for every refusal except `RateLimited` and
//! `TotpRequired`, so a client cannot tell an unknown user from a wrong password, a wrong code,
//! a locked or a disabled account.
//!
//! ## Sessions
//!
//! A login returns a session token and a CSRF token, each shown once; [`Access::authenticate`]
//! turns a token into a [`Session`] with the user's *current* role and meters. Sessions end
//! after [`crate::session::IDLE_TIMEOUT`] idle, [`crate::session::ABSOLUTE_TIMEOUT`] in all, on
//! [`Access::logout`], and for all of a user's sessions when the password, the role or the
//! second factor changes or the user is disabled.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

use gridward_core::MeterId;
use rand::rngs::OsRng;
use time::{Duration, OffsetDateTime};

use crate::password::{self, Argon2Params, PasswordError};
use crate::principal::{Principal, PrincipalId, Role};
use crate::ratelimit::{RateLimit, RateLimiter};
use crate::secret::Secret;
use crate::session::{self, CSRF_PREFIX, Session, SessionError, SessionId, TOKEN_PREFIX};
use crate::store::{AccessStore, NewTotp, StoreError, UserRow};
use crate::totp::{self, CodeCheck, TotpEnrolment, TotpError};
use crate::username::{UsernameError, validate_username};

/// Consecutive failed logins that lock an account.
pub const MAX_FAILURES: u32 = 5;

/// How long a lockout lasts.
pub const LOCKOUT: Duration = Duration::minutes(30);

/// Why a user-management call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The store failed, or the user exists already / does not exist.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The username breaks the username rule.
    #[error(transparent)]
    Username(#[from] UsernameError),
    /// The password breaks the password policy (or hashing failed).
    #[error(transparent)]
    Password(#[from] PasswordError),
    /// The second factor could not be set up.
    #[error(transparent)]
    Totp(#[from] TotpError),
    /// A consumer must be bound to at least one meter.
    #[error("a consumer must be bound to at least one meter")]
    MetersRequired,
    /// Only consumers are bound to meters.
    #[error("only consumers are bound to meters; a {0} sees the fleet as its role allows")]
    MetersNotAllowed(Role),
    /// The random number generator failed.
    #[error("random number generator failed: {0}")]
    Rng(String),
}

/// A user to create. `Debug` redacts the password.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Name (see [`crate::username`]).
    pub username: String,
    /// Role.
    pub role: Role,
    /// Meters, for a consumer (at least one); empty for other roles.
    pub meters: Vec<MeterId>,
    /// Initial password.
    pub password: Secret,
}

/// What [`Access::list_users`] shows of a user: no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// Name.
    pub username: String,
    /// Role.
    pub role: Role,
    /// Bound meters (consumers).
    pub meters: Vec<MeterId>,
    /// Whether the user may not log in.
    pub disabled: bool,
    /// Whether a TOTP second factor is enrolled.
    pub totp_enrolled: bool,
    /// Unused recovery codes.
    pub recovery_codes_left: u32,
    /// The end of a lockout, if one was started (it may have run out).
    pub locked_until: Option<OffsetDateTime>,
    /// Consecutive failed logins.
    pub failures: u32,
    /// Created.
    pub created_at: OffsetDateTime,
    /// Last changed.
    pub changed_at: OffsetDateTime,
}

/// A login attempt. `Debug` redacts the password and the code.
#[derive(Debug, Clone)]
pub struct LoginRequest {
    /// The name typed.
    pub username: String,
    /// The password typed.
    pub password: Secret,
    /// A TOTP code or a recovery code, if given.
    pub totp: Option<Secret>,
    /// The client's address (for the rate limit and the security event).
    pub source: IpAddr,
}

/// A successful login. The tokens are shown to the client once and stored only hashed.
#[derive(Debug, Clone)]
pub struct LoginSuccess {
    /// The session token (`gws_...`), for the `Authorization` header or a cookie.
    pub token: Secret,
    /// The CSRF token (`gwc_...`), for state-changing requests.
    pub csrf_token: Secret,
    /// The session's number.
    pub session_id: SessionId,
    /// Who logged in.
    pub principal: Principal,
    /// When the session ends unless used (the idle limit).
    pub expires_at: OffsetDateTime,
    /// Whether a recovery code was used instead of a TOTP code (the caller may warn how many
    /// are left).
    pub used_recovery_code: bool,
}

/// Why a login was refused: for security events and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// The source made too many attempts; nothing else was checked.
    RateLimited,
    /// No such user (or a malformed name).
    UnknownUser,
    /// Wrong password. Counts towards the lockout.
    BadPassword,
    /// The password was right but the user needs a second factor and gave none. Not counted.
    TotpRequired,
    /// Wrong TOTP code, or an unknown or used recovery code. Counts towards the lockout.
    BadTotp,
    /// A right TOTP code for a step already used. Counts towards the lockout.
    TotpReplayed,
    /// The account is locked after repeated failures.
    Locked,
    /// The account is disabled.
    Disabled,
    /// The store or the random number generator failed: not the client's fault.
    Internal,
}

impl FailureKind {
    /// A stable reason code for security events: `login_rate_limited`, `login_unknown_user`, ...
    pub fn reason(self) -> &'static str {
        match self {
            FailureKind::RateLimited => "login_rate_limited",
            FailureKind::UnknownUser => "login_unknown_user",
            FailureKind::BadPassword => "login_bad_password",
            FailureKind::TotpRequired => "login_totp_required",
            FailureKind::BadTotp => "login_bad_totp",
            FailureKind::TotpReplayed => "login_totp_replayed",
            FailureKind::Locked => "login_locked",
            FailureKind::Disabled => "login_disabled",
            FailureKind::Internal => "login_internal_error",
        }
    }

    /// Whether this kind counts towards the lockout.
    pub fn counts_towards_lockout(self) -> bool {
        matches!(
            self,
            FailureKind::BadPassword | FailureKind::BadTotp | FailureKind::TotpReplayed
        )
    }
}

/// A refused login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginFailure {
    /// Why (for the security event; never shown to the client).
    pub kind: FailureKind,
    /// The name that was typed (possibly no user's).
    pub username: String,
    /// The client's address.
    pub source: IpAddr,
    /// Whether this failure started a lockout (the caller records a lockout event).
    pub locked_now: bool,
    /// For [`FailureKind::Internal`]: what failed, for the log (never for the client).
    pub detail: Option<String>,
}

/// The one message for every refusal that must not reveal whether the user exists.
pub const GENERIC_LOGIN_FAILURE: &str =
    "Login failed: the username, password or code is wrong, or this account cannot log in now.";

impl LoginFailure {
    /// The message for the client. The same for an unknown user, a wrong password, a wrong or
    /// replayed code, a locked and a disabled account.
    pub fn public_message(&self) -> &'static str {
        match self.kind {
            FailureKind::RateLimited => {
                "Too many login attempts from your address; wait a minute and try again."
            }
            FailureKind::TotpRequired => {
                "Enter the code from your authenticator app, or a recovery code."
            }
            FailureKind::Internal => "Login is unavailable; try again later.",
            FailureKind::UnknownUser
            | FailureKind::BadPassword
            | FailureKind::BadTotp
            | FailureKind::TotpReplayed
            | FailureKind::Locked
            | FailureKind::Disabled => GENERIC_LOGIN_FAILURE,
        }
    }

    /// The HTTP status for the client: 429 when rate-limited, 500 for an internal failure, 401
    /// otherwise (the same for every refusal that must not reveal anything).
    pub fn http_status(&self) -> u16 {
        match self.kind {
            FailureKind::RateLimited => 429,
            FailureKind::Internal => 500,
            _ => 401,
        }
    }
}

/// The access service: users, logins, sessions. `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct Access {
    store: AccessStore,
    params: Argon2Params,
    /// A hash of a random password under `params`, verified for unknown users.
    dummy_hash: String,
    limiter: Mutex<RateLimiter>,
}

impl Access {
    /// Opens (or creates) the access database at `path`; new password hashes use `params`.
    ///
    /// # Errors
    ///
    /// [`AccessError::Store`], [`AccessError::Password`] (hashing the dummy password).
    pub fn open(path: &Path, params: Argon2Params) -> Result<Access, AccessError> {
        Self::open_with_rate_limit(path, params, RateLimit::default())
    }

    /// [`Access::open`] with another login rate limit.
    ///
    /// # Errors
    ///
    /// Those of [`Access::open`].
    pub fn open_with_rate_limit(
        path: &Path,
        params: Argon2Params,
        limit: RateLimit,
    ) -> Result<Access, AccessError> {
        let store = AccessStore::open(path)?;
        let mut random = [0u8; 32];
        rand::RngCore::try_fill_bytes(&mut OsRng, &mut random)
            .map_err(|e| AccessError::Rng(e.to_string()))?;
        let dummy_hash = password::hash_password(&params, &hex::encode(random), &mut OsRng)?;
        Ok(Access {
            store,
            params,
            dummy_hash,
            limiter: Mutex::new(RateLimiter::new(limit)),
        })
    }

    /// The store underneath (for inspection and maintenance).
    pub fn store(&self) -> &AccessStore {
        &self.store
    }

    /// Creates a user. For an operator, auditor or admin the TOTP second factor is enrolled at
    /// once and its enrolment returned (show it to the user once); for a consumer `None` (a
    /// consumer may call [`Access::enroll_totp`]).
    ///
    /// # Errors
    ///
    /// [`AccessError::Username`], [`AccessError::MetersRequired`],
    /// [`AccessError::MetersNotAllowed`], [`AccessError::Password`], [`AccessError::Totp`],
    /// [`AccessError::Store`] ([`StoreError::UserExists`] among them).
    pub fn add_user(
        &self,
        user: NewUser,
        now: OffsetDateTime,
    ) -> Result<Option<TotpEnrolment>, AccessError> {
        validate_username(&user.username)?;
        let meters = check_meters(user.role, user.meters)?;
        password::check_policy(&user.username, user.password.expose())?;
        let hash = password::hash_password(&self.params, user.password.expose(), &mut OsRng)?;
        let totp = if user.role.requires_totp() {
            Some(new_totp(&user.username)?)
        } else {
            None
        };
        self.store.insert_user(
            &user.username,
            user.role,
            &meters,
            &hash,
            totp.as_ref().map(|(t, _)| t),
            now,
        )?;
        Ok(totp.map(|(_, e)| e))
    }

    /// Every user, by name, without secrets.
    ///
    /// # Errors
    ///
    /// [`AccessError::Store`].
    pub fn list_users(&self) -> Result<Vec<UserInfo>, AccessError> {
        self.store
            .users()?
            .into_iter()
            .map(|u| {
                Ok(UserInfo {
                    recovery_codes_left: self.store.recovery_codes_left(u.id)?,
                    totp_enrolled: u.totp_secret.is_some(),
                    username: u.username,
                    role: u.role,
                    meters: u.meters,
                    disabled: u.disabled,
                    locked_until: u.locked_until,
                    failures: u.failures,
                    created_at: u.created_at,
                    changed_at: u.changed_at,
                })
            })
            .collect()
    }

    /// Disables `username` and revokes its sessions.
    ///
    /// # Errors
    ///
    /// [`AccessError::Store`] ([`StoreError::NoSuchUser`] among them).
    pub fn disable_user(&self, username: &str, now: OffsetDateTime) -> Result<(), AccessError> {
        Ok(self.store.set_disabled(username, true, now)?)
    }

    /// Enables `username` again.
    ///
    /// # Errors
    ///
    /// [`AccessError::Store`] ([`StoreError::NoSuchUser`] among them).
    pub fn enable_user(&self, username: &str, now: OffsetDateTime) -> Result<(), AccessError> {
        Ok(self.store.set_disabled(username, false, now)?)
    }

    /// Ends a lockout of `username` early (an administrator's decision).
    ///
    /// # Errors
    ///
    /// [`AccessError::Store`] ([`StoreError::NoSuchUser`] among them).
    pub fn unlock_user(&self, username: &str, now: OffsetDateTime) -> Result<(), AccessError> {
        Ok(self.store.unlock(username, now)?)
    }

    /// Sets a new password for `username` (policy checked), clears its lockout, revokes its
    /// sessions.
    ///
    /// # Errors
    ///
    /// [`AccessError::Password`], [`AccessError::Store`] ([`StoreError::NoSuchUser`] among them).
    pub fn reset_password(
        &self,
        username: &str,
        new_password: &Secret,
        now: OffsetDateTime,
    ) -> Result<(), AccessError> {
        if self.store.user(username)?.is_none() {
            return Err(StoreError::NoSuchUser(username.to_owned()).into());
        }
        password::check_policy(username, new_password.expose())?;
        let hash = password::hash_password(&self.params, new_password.expose(), &mut OsRng)?;
        Ok(self.store.set_password(username, &hash, now)?)
    }

    /// Gives `username` a new role (and meters, for a consumer) and revokes its sessions. A user
    /// moved to a role that needs a second factor and has none is enrolled, and the enrolment
    /// returned.
    ///
    /// # Errors
    ///
    /// [`AccessError::MetersRequired`], [`AccessError::MetersNotAllowed`],
    /// [`AccessError::Totp`], [`AccessError::Store`] ([`StoreError::NoSuchUser`] among them).
    pub fn set_role(
        &self,
        username: &str,
        role: Role,
        meters: Vec<MeterId>,
        now: OffsetDateTime,
    ) -> Result<Option<TotpEnrolment>, AccessError> {
        let meters = check_meters(role, meters)?;
        let user = self
            .store
            .user(username)?
            .ok_or_else(|| StoreError::NoSuchUser(username.to_owned()))?;
        let totp = if role.requires_totp() && user.totp_secret.is_none() {
            Some(new_totp(username)?)
        } else {
            None
        };
        self.store
            .set_role(username, role, &meters, totp.as_ref().map(|(t, _)| t), now)?;
        Ok(totp.map(|(_, e)| e))
    }

    /// Enrols (or replaces) the TOTP second factor of `username`, with fresh recovery codes;
    /// revokes its sessions.
    ///
    /// # Errors
    ///
    /// [`AccessError::Totp`], [`AccessError::Store`] ([`StoreError::NoSuchUser`] among them).
    pub fn enroll_totp(
        &self,
        username: &str,
        now: OffsetDateTime,
    ) -> Result<TotpEnrolment, AccessError> {
        if self.store.user(username)?.is_none() {
            return Err(StoreError::NoSuchUser(username.to_owned()).into());
        }
        let (totp, enrolment) = new_totp(username)?;
        self.store.set_totp(username, &totp, now)?;
        Ok(enrolment)
    }

    /// Logs a user in (see the module documentation for the order of checks).
    ///
    /// # Errors
    ///
    /// A [`LoginFailure`] saying why, for the security event and the audit log.
    pub fn login(
        &self,
        req: LoginRequest,
        now: OffsetDateTime,
    ) -> Result<LoginSuccess, LoginFailure> {
        let fail = |kind: FailureKind, locked_now: bool, detail: Option<String>| LoginFailure {
            kind,
            username: req.username.clone(),
            source: req.source,
            locked_now,
            detail,
        };
        let internal =
            |e: &dyn std::fmt::Display| fail(FailureKind::Internal, false, Some(e.to_string()));

        let allowed = match self.limiter.lock() {
            Ok(mut limiter) => limiter.try_acquire(req.source, now),
            Err(_) => return Err(internal(&"rate limiter lock poisoned")),
        };
        if !allowed {
            return Err(fail(FailureKind::RateLimited, false, None));
        }

        let user = if validate_username(&req.username).is_ok() {
            self.store.user(&req.username).map_err(|e| internal(&e))?
        } else {
            None
        };
        let Some(user) = user else {
            // The same work as for a real user.
            let _ = password::verify_password(&self.dummy_hash, req.password.expose());
            return Err(fail(FailureKind::UnknownUser, false, None));
        };
        let password_ok = password::verify_password(&user.password_hash, req.password.expose())
            .map_err(|e| internal(&e))?;

        if user.disabled {
            return Err(fail(FailureKind::Disabled, false, None));
        }
        if user.locked_until.is_some_and(|until| now < until) {
            return Err(fail(FailureKind::Locked, false, None));
        }
        let counted = |kind: FailureKind| -> LoginFailure {
            match self
                .store
                .record_failure(user.id, now, MAX_FAILURES, LOCKOUT)
            {
                Ok(locked_now) => fail(kind, locked_now, None),
                Err(e) => internal(&e),
            }
        };
        if !password_ok {
            return Err(counted(FailureKind::BadPassword));
        }

        let mut used_recovery_code = false;
        if let Some(secret) = &user.totp_secret {
            let Some(code) = &req.totp else {
                return Err(fail(FailureKind::TotpRequired, false, None));
            };
            let code = code.expose();
            if totp::looks_like_totp(code) {
                let now_unix = u64::try_from(now.unix_timestamp()).unwrap_or(0);
                match totp::check_code(secret, code, now_unix, user.totp_last_step) {
                    CodeCheck::Accepted { step } => {
                        // Atomic: of two logins racing with one code, one wins.
                        if !self
                            .store
                            .accept_totp_step(user.id, step)
                            .map_err(|e| internal(&e))?
                        {
                            return Err(counted(FailureKind::TotpReplayed));
                        }
                    }
                    CodeCheck::Replayed => return Err(counted(FailureKind::TotpReplayed)),
                    CodeCheck::Wrong => return Err(counted(FailureKind::BadTotp)),
                }
            } else {
                let used = match totp::recovery_code_hash(code) {
                    Some(hash) => self
                        .store
                        .use_recovery_code(user.id, &hash, now)
                        .map_err(|e| internal(&e))?,
                    None => false,
                };
                if !used {
                    return Err(counted(FailureKind::BadTotp));
                }
                used_recovery_code = true;
            }
        }

        self.store
            .reset_failures(user.id)
            .map_err(|e| internal(&e))?;
        let (token, token_hash) =
            session::new_token(TOKEN_PREFIX, &mut OsRng).map_err(|e| internal(&e))?;
        let (csrf_token, csrf_hash) =
            session::new_token(CSRF_PREFIX, &mut OsRng).map_err(|e| internal(&e))?;
        let id = self
            .store
            .insert_session(user.id, &token_hash, &csrf_hash, now)
            .map_err(|e| internal(&e))?;
        Ok(LoginSuccess {
            token,
            csrf_token,
            session_id: SessionId(id),
            principal: principal_of(&user),
            expires_at: session::expires_at(now, now),
            used_recovery_code,
        })
    }

    /// The session of `token` at `now`, with its user's current role and meters; marks it used.
    ///
    /// # Errors
    ///
    /// [`SessionError::Unknown`], [`SessionError::Revoked`], [`SessionError::ExpiredAbsolute`],
    /// [`SessionError::ExpiredIdle`], [`SessionError::UserDisabled`], [`SessionError::Store`].
    pub fn authenticate(&self, token: &str, now: OffsetDateTime) -> Result<Session, SessionError> {
        if !token.starts_with(TOKEN_PREFIX) {
            return Err(SessionError::Unknown);
        }
        let Some((s, user)) = self.store.session(&session::sha256(token))? else {
            return Err(SessionError::Unknown);
        };
        session::check_lifetime(s.created_at, s.last_used_at, s.revoked, now)?;
        if user.disabled {
            return Err(SessionError::UserDisabled);
        }
        self.store.touch_session(s.id, now)?;
        let last_used_at = s.last_used_at.max(now);
        Ok(Session {
            id: SessionId(s.id),
            principal: principal_of(&user),
            created_at: s.created_at,
            last_used_at,
            expires_at: session::expires_at(s.created_at, last_used_at),
            csrf_hash: s.csrf_hash,
        })
    }

    /// Whether `presented` is the CSRF token of `session` (constant time).
    pub fn check_csrf(&self, session: &Session, presented: &str) -> bool {
        session::check_csrf(session, presented)
    }

    /// Ends the session of `token`; `false` if there was no live one.
    ///
    /// # Errors
    ///
    /// [`AccessError::Store`].
    pub fn logout(&self, token: &str, now: OffsetDateTime) -> Result<bool, AccessError> {
        if !token.starts_with(TOKEN_PREFIX) {
            return Ok(false);
        }
        Ok(self.store.revoke_session(&session::sha256(token), now)?)
    }

    /// Deletes the sessions that have ended by `now`; returns how many.
    ///
    /// # Errors
    ///
    /// [`AccessError::Store`].
    pub fn purge_sessions(&self, now: OffsetDateTime) -> Result<usize, AccessError> {
        Ok(self
            .store
            .purge_sessions(now - session::ABSOLUTE_TIMEOUT, now - session::IDLE_TIMEOUT)?)
    }
}

fn principal_of(user: &UserRow) -> Principal {
    Principal {
        id: PrincipalId::User(user.username.clone()),
        role: user.role,
        meters: if user.role == Role::Consumer {
            user.meters.clone()
        } else {
            Vec::new()
        },
    }
}

/// Consumers need meters, other roles must have none; duplicates are dropped.
fn check_meters(role: Role, mut meters: Vec<MeterId>) -> Result<Vec<MeterId>, AccessError> {
    meters.sort();
    meters.dedup();
    match (role, meters.is_empty()) {
        (Role::Consumer, true) => Err(AccessError::MetersRequired),
        (Role::Consumer, false) | (_, true) => Ok(meters),
        (other, false) => Err(AccessError::MetersNotAllowed(other)),
    }
}

/// A fresh second factor for `username`: what to store and what to show.
fn new_totp(username: &str) -> Result<(NewTotp, TotpEnrolment), AccessError> {
    let secret = totp::new_secret(&mut OsRng)?;
    let codes = totp::new_recovery_codes(&mut OsRng)?;
    let recovery_hashes = codes
        .iter()
        .filter_map(|c| totp::recovery_code_hash(c))
        .collect();
    let enrolment = totp::enrolment(&secret, username, codes)?;
    Ok((
        NewTotp {
            secret,
            recovery_hashes,
        },
        enrolment,
    ))
}
