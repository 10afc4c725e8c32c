//! Logging in and out, and who am I.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gridward_access::{Action, FailureKind, LoginRequest, Secret};
use gridward_audit::{Actor, Outcome};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::meters::Json2;
use super::{Ctx, rfc3339};
use crate::auth::{Gate, SESSION_COOKIE, Via};
use crate::extract::Json;
use crate::problem::Problem;

/// A login.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    /// The username.
    pub username: String,
    /// The password.
    pub password: String,
    /// The 6-digit code of the authenticator app, or a recovery code (required for operators,
    /// auditors and administrators).
    pub totp: Option<String>,
}

impl std::fmt::Debug for LoginBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginBody")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A session, given once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionCreated {
    /// The session token: send it as `Authorization: Bearer …` (also set as an HttpOnly cookie).
    pub token: String,
    /// The CSRF token: send it as `X-CSRF-Token` with every state-changing request that
    /// authenticates with the cookie.
    pub csrf_token: String,
    /// Who logged in (`user:NAME`).
    pub actor: String,
    /// The role.
    pub role: String,
    /// When the session ends unless used again (idle limit, RFC 3339).
    pub expires_at: String,
}

/// Who the caller is.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WhoAmI {
    /// `user:NAME` or `cert:NAME`.
    pub actor: String,
    /// The role.
    pub role: String,
    /// The meters a consumer is bound to.
    pub meters: Vec<String>,
    /// `bearer`, `cookie` or `certificate`.
    pub credential: String,
}

/// Logs in with a password (and a TOTP or recovery code where the role requires one).
#[utoipa::path(post, path = "/api/v1/session", tag = "session",
    request_body = LoginBody,
    responses(
        (status = 201, description = "Logged in; the token is also set as the gw_session cookie", body = SessionCreated),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Login failed (never says why)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many attempts from this address", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn login(
    State(_): State<Ctx>,
    gate: Gate,
    Json(body): Json<LoginBody>,
) -> Result<Response, Problem> {
    let ctx = gate.ctx.clone();
    let source = gate.source;
    let now = ctx.now();
    let request = LoginRequest {
        username: body.username,
        password: Secret::new(body.password),
        totp: body.totp.map(Secret::new),
        source,
    };
    let access = ctx.access.clone();
    // Argon2id takes tens of milliseconds of CPU: off the async workers.
    let result = tokio::task::spawn_blocking(move || access.login(request, now))
        .await
        .map_err(|_| Problem::internal())?;
    match result {
        Ok(ok) => {
            if let Some(o) = &ctx.observer {
                o.login(true);
            }
            let actor = Actor::User(
                ok.principal
                    .actor_string()
                    .trim_start_matches("user:")
                    .to_owned(),
            );
            ctx.audit(
                actor,
                "login.success",
                "",
                Outcome::Success,
                source,
                if ok.used_recovery_code {
                    "with a recovery code"
                } else {
                    ""
                },
            );
            let created = SessionCreated {
                token: ok.token.expose().to_owned(),
                csrf_token: ok.csrf_token.expose().to_owned(),
                actor: ok.principal.actor_string(),
                role: ok.principal.role.as_str().to_owned(),
                expires_at: rfc3339(ok.expires_at),
            };
            let cookie = format!(
                "{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
                ok.token.expose(),
                8 * 3600
            );
            let mut response = (StatusCode::CREATED, Json2(created)).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(response)
        }
        Err(failure) => {
            if let Some(o) = &ctx.observer {
                o.login(false);
                if failure.locked_now {
                    o.lockout();
                }
            }
            if failure.kind == FailureKind::Internal {
                tracing::error!(detail = ?failure.detail, "login failed inside");
            }
            let detail = format!(
                "login as {:?} refused: {}",
                failure.username,
                failure.kind.reason()
            );
            ctx.security_event(failure.kind.reason(), None, source, detail.clone());
            let actor = Actor::User(failure.username.clone());
            ctx.audit(
                actor.clone(),
                "login.failure",
                &failure.username,
                Outcome::Failure,
                source,
                failure.kind.reason(),
            );
            if failure.locked_now {
                ctx.security_event(
                    "account_locked",
                    None,
                    source,
                    format!(
                        "account {:?} locked for 30 minutes after repeated failed logins",
                        failure.username
                    ),
                );
                ctx.audit(
                    Actor::System,
                    "login.lockout",
                    &failure.username,
                    Outcome::Success,
                    source,
                    "30 minutes",
                );
            }
            let status =
                StatusCode::from_u16(failure.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let code = match status {
                StatusCode::TOO_MANY_REQUESTS => "rate_limited",
                StatusCode::INTERNAL_SERVER_ERROR => "internal",
                _ => "login_failed",
            };
            Err(Problem::new(status, code, failure.public_message()))
        }
    }
}

/// Who the caller is, by its credential.
#[utoipa::path(get, path = "/api/v1/session", tag = "session",
    responses(
        (status = 200, description = "The caller", body = WhoAmI),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn whoami(State(_): State<Ctx>, gate: Gate) -> Result<Json2<WhoAmI>, Problem> {
    let caller = gate.require(Action::ReadSelf)?;
    Ok(Json2(WhoAmI {
        actor: caller.principal.actor_string(),
        role: caller.principal.role.as_str().to_owned(),
        meters: caller
            .principal
            .meters
            .iter()
            .map(ToString::to_string)
            .collect(),
        credential: match caller.via {
            Via::Bearer(_) => "bearer",
            Via::Cookie(_) => "cookie",
            Via::Certificate => "certificate",
        }
        .to_owned(),
    }))
}

/// Logs out: the session is revoked at once.
#[utoipa::path(delete, path = "/api/v1/session", tag = "session",
    responses(
        (status = 204, description = "Logged out"),
        (status = 400, description = "A certificate has no session to end", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Cookie without the CSRF token", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn logout(
    State(_): State<Ctx>,
    gate: Gate,
    headers: http::HeaderMap,
) -> Result<Response, Problem> {
    let caller = gate.require(Action::Logout)?;
    if caller.session().is_none() {
        return Err(Problem::bad_request(
            "a client certificate has no session to end",
        ));
    }
    let token = bearer_or_cookie(&headers).ok_or_else(Problem::unauthenticated)?;
    let now = gate.ctx.now();
    gate.ctx.access.logout(&token, now).map_err(|e| {
        tracing::error!(error = %e, "logout failed");
        Problem::internal()
    })?;
    gate.ctx.audit(
        caller.actor(),
        "logout",
        "",
        Outcome::Success,
        gate.source,
        "",
    );
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "gw_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(response)
}

fn bearer_or_cookie(headers: &http::HeaderMap) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return v
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
            .map(|t| t.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_owned())
}
