//! Users, for administrators.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gridward_access::{AccessError, Action, NewUser, Role, Secret, StoreError, TotpEnrolment};
use gridward_audit::Outcome;
use gridward_core::MeterId;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::meters::Json2;
use super::{Ctx, rfc3339};
use crate::auth::Gate;
use crate::extract::{Json, Path};
use crate::problem::Problem;

/// A user as administrators see it (never a secret).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserView {
    /// The name.
    pub username: String,
    /// consumer, operator, auditor or admin.
    pub role: String,
    /// The meters a consumer is bound to.
    pub meters: Vec<String>,
    /// Whether the user may not log in.
    pub disabled: bool,
    /// Whether a TOTP second factor is enrolled.
    pub totp_enrolled: bool,
    /// Unused recovery codes.
    pub recovery_codes_left: u32,
    /// The end of the current lockout (RFC 3339), if one is running.
    pub locked_until: Option<String>,
    /// Created (RFC 3339).
    pub created_at: String,
}

/// A new user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUserBody {
    /// The name: lowercase letters, digits, `.`, `_`, `-`, up to 64.
    pub username: String,
    /// consumer, operator, auditor or admin.
    pub role: String,
    /// For a consumer: the meters it may see (at least one).
    #[serde(default)]
    pub meters: Vec<String>,
    /// The initial password (12 characters or more, not a common one).
    pub password: String,
}

impl std::fmt::Debug for NewUserBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewUserBody")
            .field("username", &self.username)
            .field("role", &self.role)
            .field("meters", &self.meters)
            .finish_non_exhaustive()
    }
}

/// A new password.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    /// The new password.
    pub password: String,
}

impl std::fmt::Debug for PasswordBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordBody { [redacted] }")
    }
}

/// A new role.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    /// consumer, operator, auditor or admin.
    pub role: String,
    /// For a consumer: its meters.
    #[serde(default)]
    pub meters: Vec<String>,
}

/// A TOTP enrolment, shown once: put the URI (or the secret) into an authenticator app and
/// keep the recovery codes somewhere safe.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EnrolmentView {
    /// The `otpauth://` URI.
    pub otpauth_uri: String,
    /// The secret in base32.
    pub secret: String,
    /// Single-use recovery codes.
    pub recovery_codes: Vec<String>,
}

/// A user created or changed, with the enrolment when one was made.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserChanged {
    /// The user now.
    pub username: String,
    /// The second factor, when this call enrolled one.
    pub totp: Option<EnrolmentView>,
}

fn enrolment(e: TotpEnrolment) -> EnrolmentView {
    EnrolmentView {
        otpauth_uri: e.uri,
        secret: e.secret_base32,
        recovery_codes: e.recovery_codes,
    }
}

fn role(raw: &str) -> Result<Role, Problem> {
    raw.parse::<Role>()
        .map_err(|_| Problem::bad_request("role must be consumer, operator, auditor or admin"))
}

fn meters(raw: &[String]) -> Result<Vec<MeterId>, Problem> {
    raw.iter()
        .map(|m| MeterId::new(m).map_err(|e| Problem::bad_request(format!("meter {m:?}: {e}"))))
        .collect()
}

/// Maps a user-management error onto a problem: the caller's mistakes with what to do, the
/// rest as an internal error (logged).
fn problem(e: &AccessError) -> Problem {
    match e {
        AccessError::Store(StoreError::UserExists(_)) => Problem::new(
            StatusCode::CONFLICT,
            "user_exists",
            "a user of that name exists already",
        ),
        AccessError::Store(StoreError::NoSuchUser(_)) => Problem::not_found("user"),
        AccessError::Username(e) => Problem::bad_request(e.to_string()),
        AccessError::Password(e) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "weak_password",
            e.to_string(),
        ),
        AccessError::MetersRequired | AccessError::MetersNotAllowed(_) => {
            Problem::bad_request(e.to_string())
        }
        other => {
            tracing::error!(error = %other, "user management failed");
            Problem::internal()
        }
    }
}

/// Runs a user-management call off the async workers (Argon2id hashing is slow on purpose),
/// audits it, and maps its error.
async fn managed<T: Send + 'static>(
    gate: &Gate,
    action: &str,
    target: &str,
    detail: String,
    f: impl FnOnce(&gridward_access::Access) -> Result<T, AccessError> + Send + 'static,
) -> Result<T, Problem> {
    let caller = gate.require(Action::ManageUsers)?.clone();
    let access = gate.ctx.access.clone();
    let result = tokio::task::spawn_blocking(move || f(&access))
        .await
        .map_err(|_| Problem::internal())?;
    let outcome = if result.is_ok() {
        Outcome::Success
    } else {
        Outcome::Failure
    };
    let detail = match &result {
        Ok(_) => detail,
        Err(e) => format!("{detail} refused: {e}"),
    };
    gate.ctx
        .audit(caller.actor(), action, target, outcome, gate.source, detail);
    result.map_err(|e| problem(&e))
}

/// Lists users.
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses(
        (status = 200, description = "Every user", body = Vec<UserView>),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only administrators list users", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(State(_): State<Ctx>, gate: Gate) -> Result<Json2<Vec<UserView>>, Problem> {
    gate.require(Action::ListUsers)?;
    let now = gate.ctx.now();
    let users = gate.ctx.access.list_users().map_err(|e| problem(&e))?;
    Ok(Json2(
        users
            .into_iter()
            .map(|u| UserView {
                username: u.username,
                role: u.role.as_str().to_owned(),
                meters: u.meters.iter().map(ToString::to_string).collect(),
                disabled: u.disabled,
                totp_enrolled: u.totp_enrolled,
                recovery_codes_left: u.recovery_codes_left,
                locked_until: u.locked_until.filter(|t| *t > now).map(rfc3339),
                created_at: rfc3339(u.created_at),
            })
            .collect(),
    ))
}

/// Creates a user; operators, auditors and administrators get their TOTP enrolment here.
#[utoipa::path(post, path = "/api/v1/users", tag = "users",
    request_body = NewUserBody,
    responses(
        (status = 201, description = "Created", body = UserChanged),
        (status = 400, description = "Bad name, role or meters", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only administrators manage users", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The user exists", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The password is too weak", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(_): State<Ctx>,
    gate: Gate,
    Json(body): Json<NewUserBody>,
) -> Result<Response, Problem> {
    gate.require(Action::ManageUsers)?;
    let role = role(&body.role)?;
    let meters = meters(&body.meters)?;
    let now = gate.ctx.now();
    let username = body.username.clone();
    let detail = format!("role {}", role.as_str());
    let user = NewUser {
        username: body.username,
        role,
        meters,
        password: Secret::new(body.password),
    };
    let totp = managed(&gate, "user.add", &username, detail, move |a| {
        a.add_user(user, now)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json2(UserChanged {
            username,
            totp: totp.map(enrolment),
        }),
    )
        .into_response())
}

/// Disables a user (its sessions end).
#[utoipa::path(post, path = "/api/v1/users/{username}/disable", tag = "users",
    params(("username" = String, Path, description = "The user")),
    responses(
        (status = 204, description = "Disabled"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only administrators manage users", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn disable(
    State(_): State<Ctx>,
    gate: Gate,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    let now = gate.ctx.now();
    let n = name.clone();
    managed(&gate, "user.disable", &name, String::new(), move |a| {
        a.disable_user(&n, now)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Enables a disabled user and lifts a lockout.
#[utoipa::path(post, path = "/api/v1/users/{username}/enable", tag = "users",
    params(("username" = String, Path, description = "The user")),
    responses(
        (status = 204, description = "Enabled"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only administrators manage users", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn enable(
    State(_): State<Ctx>,
    gate: Gate,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    let now = gate.ctx.now();
    let n = name.clone();
    managed(&gate, "user.enable", &name, String::new(), move |a| {
        a.enable_user(&n, now)?;
        a.unlock_user(&n, now)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets a new password (the user's sessions end).
#[utoipa::path(put, path = "/api/v1/users/{username}/password", tag = "users",
    params(("username" = String, Path, description = "The user")),
    request_body = PasswordBody,
    responses(
        (status = 204, description = "Changed"),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only administrators manage users", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The password is too weak", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn reset_password(
    State(_): State<Ctx>,
    gate: Gate,
    Path(name): Path<String>,
    Json(body): Json<PasswordBody>,
) -> Result<StatusCode, Problem> {
    let now = gate.ctx.now();
    let n = name.clone();
    let pw = Secret::new(body.password);
    managed(
        &gate,
        "user.reset-password",
        &name,
        String::new(),
        move |a| a.reset_password(&n, &pw, now),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes a user's role (its sessions end); a new privileged role without TOTP enrols it.
#[utoipa::path(put, path = "/api/v1/users/{username}/role", tag = "users",
    params(("username" = String, Path, description = "The user")),
    request_body = RoleBody,
    responses(
        (status = 200, description = "Changed", body = UserChanged),
        (status = 400, description = "Bad role or meters", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only administrators manage users", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_role(
    State(_): State<Ctx>,
    gate: Gate,
    Path(name): Path<String>,
    Json(body): Json<RoleBody>,
) -> Result<Json2<UserChanged>, Problem> {
    gate.require(Action::ManageUsers)?;
    let role = role(&body.role)?;
    let meters = meters(&body.meters)?;
    let now = gate.ctx.now();
    let n = name.clone();
    let detail = format!("role {}", role.as_str());
    let totp = managed(&gate, "user.set-role", &name, detail, move |a| {
        a.set_role(&n, role, meters, now)
    })
    .await?;
    Ok(Json2(UserChanged {
        username: name,
        totp: totp.map(enrolment),
    }))
}

/// Enrols a new TOTP secret and recovery codes (the old ones stop working, sessions end).
#[utoipa::path(post, path = "/api/v1/users/{username}/totp", tag = "users",
    params(("username" = String, Path, description = "The user")),
    responses(
        (status = 200, description = "Enrolled", body = UserChanged),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only administrators manage users", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn enroll_totp(
    State(_): State<Ctx>,
    gate: Gate,
    Path(name): Path<String>,
) -> Result<Json2<UserChanged>, Problem> {
    let now = gate.ctx.now();
    let n = name.clone();
    let e = managed(&gate, "user.enroll-totp", &name, String::new(), move |a| {
        a.enroll_totp(&n, now)
    })
    .await?;
    Ok(Json2(UserChanged {
        username: name,
        totp: Some(enrolment(e)),
    }))
}
