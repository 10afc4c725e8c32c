//! Who is asking: the credential of a request, turned into a [`Principal`], and the one gate
//! every handler passes, [`Gate::require`], which asks [`gridward_access::authorize`].
//!
//! Credentials, in the order they are looked at:
//! 1. `Authorization: Bearer <token>`: a session token (programs, scripts, curl);
//! 2. the `gw_session` cookie (browsers): for every state-changing method the request must
//!    also carry the session's CSRF token in `X-CSRF-Token`;
//! 3. the connection's verified client certificate, when it carries an API role
//!    (`urn:gridward:role:{role}`); the role comes from the certificate, never the request.
//!
//! A credential that is presented but not valid is a 401 (never "no credential, carry on")
//! and a security event.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::FromRequestParts;
use gridward_access::{Action, Decision, DenyReason, Principal, Role, Session, authorize};
use gridward_audit::{Actor, Outcome};
use http::request::Parts;
use http::{Method, header};

use crate::problem::Problem;
use crate::state::ApiContext;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "gw_session";
/// The header that carries the CSRF token with a cookie session.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// What the TLS layer learnt about a connection; put in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer.
    pub peer: SocketAddr,
    /// The verified client certificate's credential, if one was presented.
    pub cert: Option<CertCredential>,
}

/// A verified client certificate, as a credential for the API.
#[derive(Debug, Clone)]
pub enum CertCredential {
    /// A client certificate with an API role.
    Api(Principal),
    /// A certificate that grants no API role (a meter's, a forwarder's without role): it
    /// proves who the peer is but lets it do nothing here.
    NoRole(String),
}

/// How the caller authenticated.
#[derive(Debug, Clone)]
pub enum Via {
    /// A session token in the `Authorization` header.
    Bearer(Session),
    /// A session cookie.
    Cookie(Session),
    /// A client certificate.
    Certificate,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who.
    pub principal: Principal,
    /// With what.
    pub via: Via,
}

impl Caller {
    /// The audit actor.
    pub fn actor(&self) -> Actor {
        match &self.principal.id {
            gridward_access::PrincipalId::User(name) => Actor::User(name.clone()),
            gridward_access::PrincipalId::Certificate { subject, .. } => {
                Actor::Certificate(subject.clone())
            }
        }
    }

    /// The session, when the caller has one.
    pub fn session(&self) -> Option<&Session> {
        match &self.via {
            Via::Bearer(s) | Via::Cookie(s) => Some(s),
            Via::Certificate => None,
        }
    }
}

/// The extractor every handler takes: the caller (if any), the source address and the
/// context, and the gate to pass.
#[derive(Debug, Clone)]
pub struct Gate {
    /// The authenticated caller, or `None` for no credential.
    pub caller: Option<Caller>,
    /// The peer's IP address.
    pub source: IpAddr,
    /// The shared context.
    pub ctx: Arc<ApiContext>,
}

impl Gate {
    /// Passes the gate for `action` or returns the refusal. A consumer asking for another
    /// meter gets a 404 and leaves an `access_probe` security event; a 403 leaves an
    /// `access_denied` security event and an audit entry.
    pub fn require(&self, action: Action) -> Result<&Caller, Problem> {
        let decision = authorize(self.caller.as_ref().map(|c| &c.principal), action.clone());
        match (decision, &self.caller) {
            (Decision::Allow, Some(caller)) => Ok(caller),
            // Only `Health` is allowed without a caller, and health handlers do not call this.
            (Decision::Allow, None) => Err(Problem::unauthenticated()),
            (Decision::Deny(DenyReason::Unauthenticated), _) => Err(Problem::unauthenticated()),
            (Decision::Deny(DenyReason::NotFound), caller) => {
                let (who, meter) = (actor_text(caller), meter_of(&action));
                self.ctx.security_event(
                    "access_probe",
                    meter,
                    self.source,
                    format!("{who} asked for a meter that is not theirs ({action:?})"),
                );
                Err(Problem::not_found("meter"))
            }
            (Decision::Deny(_), caller) => {
                let who = actor_text(caller);
                self.ctx.security_event(
                    "access_denied",
                    meter_of(&action),
                    self.source,
                    format!("{who} may not {action:?}"),
                );
                if let Some(c) = caller {
                    self.ctx.audit(
                        c.actor(),
                        "access.denied",
                        &format!("{action:?}"),
                        Outcome::Denied,
                        self.source,
                        "",
                    );
                }
                Err(Problem::forbidden())
            }
        }
    }
}

fn actor_text(caller: &Option<Caller>) -> String {
    caller
        .as_ref()
        .map_or_else(|| "anonymous".to_owned(), |c| c.principal.actor_string())
}

fn meter_of(action: &Action) -> Option<&gridward_core::MeterId> {
    match action {
        Action::ReadMeter(m) | Action::ReadReadings(m) | Action::ReadMeterEvents(m) => Some(m),
        _ => None,
    }
}

impl FromRequestParts<Arc<ApiContext>> for Gate {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &Arc<ApiContext>,
    ) -> Result<Self, Self::Rejection> {
        let conn = parts.extensions.get::<ConnInfo>().cloned();
        let source = conn
            .as_ref()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.peer.ip());
        let caller = authenticate(ctx, parts, conn.as_ref(), source)?;
        Ok(Self {
            caller,
            source,
            ctx: Arc::clone(ctx),
        })
    }
}

/// The caller of a request, or the refusal of a credential that does not hold.
fn authenticate(
    ctx: &ApiContext,
    parts: &Parts,
    conn: Option<&ConnInfo>,
    source: IpAddr,
) -> Result<Option<Caller>, Problem> {
    let now = ctx.now();
    let refuse = |reason: &str, detail: String| {
        ctx.security_event(reason, None, source, detail);
        Problem::unauthenticated()
    };

    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                refuse(
                    "session_rejected",
                    "Authorization header is not `Bearer <token>`".into(),
                )
            })?;
        let session = ctx
            .access
            .authenticate(token, now)
            .map_err(|e| refuse("session_rejected", format!("bearer token refused: {e}")))?;
        return Ok(Some(Caller {
            principal: session.principal.clone(),
            via: Via::Bearer(session),
        }));
    }

    if let Some(token) = cookie(parts, SESSION_COOKIE) {
        let session = ctx
            .access
            .authenticate(&token, now)
            .map_err(|e| refuse("session_rejected", format!("session cookie refused: {e}")))?;
        if !is_safe(&parts.method) {
            let presented = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !ctx.access.check_csrf(&session, presented) {
                ctx.security_event(
                    "csrf_rejected",
                    None,
                    source,
                    format!(
                        "{} {} with a session cookie but {}",
                        parts.method,
                        parts.uri.path(),
                        if presented.is_empty() {
                            "no X-CSRF-Token"
                        } else {
                            "a wrong X-CSRF-Token"
                        }
                    ),
                );
                return Err(Problem::new(
                    http::StatusCode::FORBIDDEN,
                    "csrf",
                    "a request with a session cookie that changes something must carry the \
                     session's CSRF token in X-CSRF-Token",
                ));
            }
        }
        return Ok(Some(Caller {
            principal: session.principal.clone(),
            via: Via::Cookie(session),
        }));
    }

    match conn.and_then(|c| c.cert.as_ref()) {
        Some(CertCredential::Api(principal)) => Ok(Some(Caller {
            principal: principal.clone(),
            via: Via::Certificate,
        })),
        Some(CertCredential::NoRole(who)) => Err(refuse(
            "certificate_without_role",
            format!("{who} presented a certificate that grants no API role"),
        )),
        None => Ok(None),
    }
}

/// GET, HEAD and OPTIONS change nothing; everything else needs the CSRF token with a cookie.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The value of cookie `name`, if the request carries it.
fn cookie(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The credential a verified client certificate gives (`None` if it is not one at all).
pub fn cert_credential(cert_der: &[u8]) -> CertCredential {
    let identity = gridward_pki::identity_of(cert_der);
    let who = identity
        .as_ref()
        .map_or_else(|e| format!("a certificate ({e})"), ToString::to_string);
    let role = gridward_pki::client_role_of(cert_der)
        .ok()
        .flatten()
        .and_then(|r| r.parse::<Role>().ok())
        .filter(|r| *r != Role::Consumer);
    match (identity, role) {
        (Ok(gridward_pki::Identity::Client(name)), Some(role)) => {
            let serial = serial_hex(cert_der).unwrap_or_default();
            CertCredential::Api(gridward_access::principal_for_certificate(
                name, serial, role,
            ))
        }
        _ => CertCredential::NoRole(who),
    }
}

fn serial_hex(cert_der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der).ok()?;
    Some(cert.raw_serial_as_string().replace(':', ""))
}
