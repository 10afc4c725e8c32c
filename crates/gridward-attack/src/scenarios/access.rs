//! Unauthorised access: people and programs at the HTTPS API (`/api/v1`) trying what their
//! credential does not allow, or presenting a credential that does not hold. Every request
//! of a case comes from that case's own source address, and its security event must name it.
//!
//! The harness sets up what an operator would: users in the head-end's users database, opened
//! as `gridward user add` opens it ([`Access::open`]; operators, auditors and administrators
//! get their TOTP enrolment there, whose secret the harness keeps to log in), and API client
//! certificates with a role in its PKI (`gridward pki issue client --role operator`). Names
//! carry a random tag, so that runs against one external head-end never collide.
//!
//! 1. Brute force: five wrong passwords for an operator from one source: 401 each,
//!    `login_bad_password` ×5 and `account_locked`.
//! 2. ... then the right password and TOTP code from another source: 401, `login_locked` (the
//!    lockout is the account's, not the source's).
//! 3. TOTP replay: an operator logs in with a code (201); the same code again from another
//!    source: 401, `login_totp_replayed`.
//! 4. A consumer reads another meter's readings: 404 (never 403, so that meter ids cannot be
//!    probed), `access_probe` about that meter.
//! 5. A consumer calls an operator action (`GET /api/v1/security-events`): 403,
//!    `access_denied`.
//! 6. An auditor calls an administrator's action (`POST /api/v1/users`, creating an admin):
//!    403, `access_denied`, and no such user afterwards.
//! 7. A session token after logout: 401, `session_rejected` (revoked).
//! 8. A forged session cookie (`gw_session=gws_forged…`): 401, `session_rejected` (unknown).
//! 9. An expired session: one created in the users database 20 minutes ago and idle since,
//!    the way the revocation scenario gets an expired certificate by backdating its issue in
//!    the PKI: 401, `session_rejected` (expired). The head-end's clock cannot be moved instead:
//!    it is the ingest's clock too, and moving it 15 minutes would refuse the genuine fleet's
//!    readings. (`crates/gridward-api/tests/access_table.rs` moves the API's own clock.)
//! 10. CSRF: an administrator's session cookie on `POST /api/v1/users/{victim}/disable`
//!     without `X-CSRF-Token`: 403, `csrf_rejected`, the victim still enabled.
//! 11. ... with a wrong `X-CSRF-Token`: the same.
//! 12. A certificate of the CA that grants no API role (a meter's): 401,
//!     `certificate_without_role`.
//! 13. A revoked operator client certificate, after the head-end reloads its CRLs: the TLS
//!     handshake is refused, `certificate_revoked`.
//!
//! Then genuine access, each from a fresh source that must leave no refusal at all:
//! 14. the operator's right login (201) and a request with its session (200);
//! 15. the consumer reading its own meter (a genuine one): 200, its readings there;
//! 16. the administrator's cookie with its CSRF token: the request of case 10 is accepted
//!     (204), so cases 10 and 11 were refused for the token alone;
//! 17. the operator certificate that was not revoked: 200.
//!
//! A target without an API (an external head-end whose configuration has `[api] listen =
//! "off"`) fails every case with "not run"; cases 13 and 17 need the head-end to reload its
//! CRLs and fail with "cannot reload" when the harness cannot ask it to (an external target
//! without a pid).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gridward_access::{Access, Argon2Params, LoginRequest, NewUser, Role, Secret};
use gridward_core::MeterId;
use gridward_pki::{IssueOptions, LeafKind, RevocationReason, RevokeTarget};
use http_body_util::{BodyExt, Full};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio_rustls::TlsConnector;

use super::dos::anonymous_config;
use super::revocation::{event_ip, from_source};
use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx};
use crate::target::{ApiTarget, FLEET_PREFIX};

/// The scenario's name.
pub const NAME: &str = "access";

/// Who the PKI operations are recorded for.
const ACTOR: &str = "gridward-attack";

/// Every harness user's password (passes the policy: long, not common, not the username).
pub(crate) const PASSWORD: &str = "harness only: quartz lantern meadow 7402";

/// A request must be answered within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long ago the expired session was created (the idle limit is 15 minutes).
const EXPIRED_AGO: time::Duration = time::Duration::minutes(20);

const CASE_BRUTE: &str = "brute force: 5 wrong passwords for an operator";
const CASE_LOCKED: &str = "then its right password and TOTP code, from another address";
const CASE_REPLAY: &str = "TOTP replay: a code that logged in, again from another address";
const CASE_PROBE: &str = "a consumer reads another meter's readings";
const CASE_CONSUMER_OP: &str = "a consumer calls an operator action (GET security-events)";
const CASE_AUDITOR_ADMIN: &str = "an auditor calls an admin action (POST /users, an admin)";
const CASE_LOGOUT: &str = "a session token after logout";
const CASE_FORGED: &str = "a forged session cookie (gw_session=gws_forged…)";
const CASE_EXPIRED: &str = "an expired session (created 20 min ago, idle since)";
const CASE_CSRF: &str = "a session cookie disabling a user without X-CSRF-Token";
const CASE_CSRF_WRONG: &str = "a session cookie disabling a user with a wrong X-CSRF-Token";
const CASE_NO_ROLE: &str = "a certificate without an API role (a meter's)";
const CASE_REVOKED: &str = "a revoked operator client certificate (after the reload)";
const CASE_OP: &str = "genuine: the operator's right login from a fresh address";
const CASE_OWN: &str = "genuine: the consumer reads its own meter";
const CASE_CSRF_OK: &str = "genuine: the admin's cookie with its CSRF token";
const CASE_CERT_OK: &str = "genuine: the operator certificate not revoked";
const EXPECT_OP: &str = "201, and its session works (200), nothing refused";
const EXPECT_OWN: &str = "200 with its readings, nothing refused";
const EXPECT_CSRF_OK: &str = "204, the user disabled, nothing refused";
const EXPECT_CERT_OK: &str = "200, nothing refused";

/// Every case and what it expects, for a target the scenario cannot run against.
const CASES: &[(&str, &str)] = &[
    (CASE_BRUTE, "401 ×5, event account_locked"),
    (CASE_LOCKED, "refused, event login_locked"),
    (CASE_REPLAY, "refused, event login_totp_replayed"),
    (CASE_PROBE, "refused, event access_probe"),
    (CASE_CONSUMER_OP, "refused, event access_denied"),
    (CASE_AUDITOR_ADMIN, "refused, event access_denied"),
    (CASE_LOGOUT, "refused, event session_rejected"),
    (CASE_FORGED, "refused, event session_rejected"),
    (CASE_EXPIRED, "refused, event session_rejected"),
    (CASE_CSRF, "refused, event csrf_rejected"),
    (CASE_CSRF_WRONG, "refused, event csrf_rejected"),
    (CASE_NO_ROLE, "refused, event certificate_without_role"),
    (CASE_REVOKED, "refused, event certificate_revoked"),
    (CASE_OP, EXPECT_OP),
    (CASE_OWN, EXPECT_OWN),
    (CASE_CSRF_OK, EXPECT_CSRF_OK),
    (CASE_CERT_OK, EXPECT_CERT_OK),
];

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let Some(api) = ctx.target.api.clone() else {
        let why = "the target runs no HTTPS API (its [api] listen is \"off\"): not run";
        return CASES
            .iter()
            .map(|(case, expected)| Check::new(NAME, *case, *expected).observed(why))
            .collect();
    };
    let s = match Setup::new(ctx, api).await {
        Ok(s) => s,
        Err(e) => return vec![Check::broken(NAME, "users and API certificates", e)],
    };
    // Sessions several cases use (each request still from its own source).
    let consumer = login(ctx, &s, &s.consumer).await.map_err(|e| e.to_string());
    let admin = login(ctx, &s, &s.admin).await.map_err(|e| e.to_string());

    let mut checks = brute_force(ctx, &s).await;
    checks.push(or_broken(CASE_REPLAY, totp_replay(ctx, &s).await));
    checks.append(&mut consumer_cases(ctx, &s, &consumer).await);
    checks.push(or_broken(CASE_AUDITOR_ADMIN, auditor_admin(ctx, &s).await));
    checks.push(or_broken(CASE_LOGOUT, after_logout(ctx, &s).await));
    checks.push(forged_cookie(ctx, &s).await);
    checks.push(or_broken(CASE_EXPIRED, expired(ctx, &s).await));
    checks.append(&mut csrf(ctx, &s, &admin).await);
    checks.push(or_broken(CASE_NO_ROLE, without_role(ctx, &s).await));
    let (check, cert_ok) = revoked_certificate(ctx, &s).await;
    checks.push(check);

    // Genuine access, after the attacks.
    checks.push(or_broken(CASE_OP, genuine_operator(ctx, &s).await));
    checks.push(match &consumer {
        Ok(session) => own_meter(ctx, &s, session).await,
        Err(e) => Check::broken(NAME, CASE_OWN, e),
    });
    checks.push(match &admin {
        Ok(session) => csrf_token(ctx, &s, session).await,
        Err(e) => Check::broken(NAME, CASE_CSRF_OK, e),
    });
    checks.push(match cert_ok {
        Ok(config) => certificate_ok(ctx, &s, &config).await,
        Err(why) => Check::new(NAME, CASE_CERT_OK, EXPECT_CERT_OK).observed(why),
    });
    checks
}

fn or_broken(case: &str, result: Result<Check, AttackError>) -> Check {
    result.unwrap_or_else(|e| Check::broken(NAME, case, e))
}

/// A user of the harness, with what logging in takes.
pub(crate) struct User {
    pub(crate) name: String,
    /// The TOTP generator of its enrolment (operators, auditors, administrators).
    pub(crate) totp: Option<totp_rs::Totp>,
}

impl User {
    /// Its TOTP code at `at`.
    fn code_at(&self, at: OffsetDateTime) -> Option<String> {
        let t = u64::try_from(at.unix_timestamp()).unwrap_or(0);
        self.totp.as_ref().map(|totp| totp.generate(t).to_string())
    }

    /// Its TOTP code now.
    pub(crate) fn code(&self) -> Option<String> {
        self.code_at(OffsetDateTime::now_utc())
    }
}

/// What the cases share: the API, the users database, the users and certificates.
struct Setup {
    api: ApiTarget,
    access: Arc<Access>,
    /// A client that presents no certificate (people with a password or a session).
    anonymous: Arc<ClientConfig>,
    /// Locked by case 1.
    brute: User,
    /// Its code replayed by case 3.
    replay: User,
    /// Logs in once, after the attacks.
    operator: User,
    consumer: User,
    auditor: User,
    admin: User,
    /// The user case 10 tries to disable.
    victim: User,
    /// The consumer's meter, and one that is not its own (both of the genuine fleet).
    own_meter: MeterId,
    other_meter: MeterId,
    /// Operator client certificates: one to revoke, one to keep.
    cert_revoked: Creds,
    cert_ok: Creds,
    /// A name for the user the auditor tries to create.
    intruder: String,
}

impl Setup {
    async fn new(ctx: &Ctx, api: ApiTarget) -> Result<Self, AttackError> {
        let tag = format!("{:06x}", rand::random::<u32>() & 0x00ff_ffff);
        let own_meter = MeterId::new(&format!("{FLEET_PREFIX}000001"))?;
        let other_meter = MeterId::new(&format!("{FLEET_PREFIX}000002"))?;
        let users = api.users.clone();
        let meter = own_meter.clone();
        let t = tag.clone();
        // Argon2id hashing (one per user, and the database's dummy hash) is slow on purpose.
        let (access, [brute, replay, operator, consumer, auditor, admin, victim]) =
            tokio::task::spawn_blocking(move || create_users(&users, &t, &meter))
                .await
                .map_err(|e| AttackError::Setup(format!("creating users: {e}")))??;

        let now = OffsetDateTime::now_utc();
        let mut opts = IssueOptions::new(ACTOR);
        opts.role = Some("operator".to_owned());
        opts.replace = true;
        let mut certs = Vec::new();
        for name in [
            format!("x-acc-op-revoked-{tag}"),
            format!("x-acc-op-ok-{tag}"),
        ] {
            ctx.pki().issue_client(&name, &opts, now)?;
            certs.push(Creds::in_pki(&ctx.target.pki_dir, "clients", &name));
        }
        let [cert_revoked, cert_ok]: [Creds; 2] = certs
            .try_into()
            .map_err(|_| AttackError::Setup("two client certificates".into()))?;
        Ok(Self {
            api,
            access: Arc::new(access),
            anonymous: anonymous_config(ctx)?,
            brute,
            replay,
            operator,
            consumer,
            auditor,
            admin,
            victim,
            own_meter,
            other_meter,
            cert_revoked,
            cert_ok,
            intruder: format!("x-acc-intruder-{tag}"),
        })
    }
}

/// Opens the users database and adds the harness's users (brute, replay, operator, consumer,
/// auditor, admin, victim), as `gridward user add` would.
fn create_users(
    path: &std::path::Path,
    tag: &str,
    meter: &MeterId,
) -> Result<(Access, [User; 7]), AttackError> {
    let setup = |e: &dyn std::fmt::Display| AttackError::Setup(format!("{}: {e}", path.display()));
    let access = Access::open(path, Argon2Params::OWASP).map_err(|e| setup(&e))?;
    let now = OffsetDateTime::now_utc();
    let specs = [
        ("brute", Role::Operator),
        ("replay", Role::Operator),
        ("operator", Role::Operator),
        ("consumer", Role::Consumer),
        ("auditor", Role::Auditor),
        ("admin", Role::Admin),
        ("victim", Role::Consumer),
    ];
    let mut users = Vec::with_capacity(specs.len());
    for (what, role) in specs {
        let name = format!("x-acc-{what}-{tag}");
        let meters = if role == Role::Consumer {
            vec![meter.clone()]
        } else {
            Vec::new()
        };
        let enrolment = access
            .add_user(
                NewUser {
                    username: name.clone(),
                    role,
                    meters,
                    password: Secret::new(PASSWORD),
                },
                now,
            )
            .map_err(|e| setup(&format_args!("adding {name}: {e}")))?;
        let totp = match enrolment {
            Some(e) => Some(
                totp_of(&e.secret_base32)
                    .map_err(|e| setup(&format_args!("the TOTP of {name}: {e}")))?,
            ),
            None => None,
        };
        users.push(User { name, totp });
    }
    let users: [User; 7] = users
        .try_into()
        .map_err(|_| AttackError::Setup("seven users".into()))?;
    Ok((access, users))
}

/// The code generator of an enrolment's base32 secret (an authenticator app's view of it).
pub(crate) fn totp_of(secret_base32: &str) -> Result<totp_rs::Totp, String> {
    let secret = totp_rs::Secret::try_from_base32(secret_base32).map_err(|e| e.to_string())?;
    totp_rs::Builder::new()
        .with_secret(secret)
        .build()
        .map_err(|e| e.to_string())
}

// ---- The cases ------------------------------------------------------------------------------

/// Cases 1 and 2.
async fn brute_force(ctx: &Ctx, s: &Setup) -> Vec<Check> {
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let mut statuses = Vec::new();
    for i in 1..=5 {
        let body = login_body(&s.brute, &format!("wrong guess number {i}"), Some("000000"));
        statuses.push(status_text(
            &request(
                ctx,
                s,
                source,
                &s.anonymous,
                "POST",
                "/api/v1/session",
                &[],
                Some(body),
            )
            .await,
        ));
    }
    let all_refused = statuses.iter().all(|st| st == "401");
    let bad = events_from(ctx, before, source, "login_bad_password");
    let observed = format!(
        "answers {}; {} login_bad_password events",
        statuses.join(", "),
        bad.len()
    );
    let check = ctx
        .refusal(
            NAME,
            CASE_BRUTE,
            "account_locked",
            None,
            before,
            all_refused && bad.len() == 5,
            observed,
        )
        .await;
    let mut checks = vec![from_source(ctx, check, before, source)];
    checks[0].expected = "401 ×5, login_bad_password ×5, event account_locked".to_owned();

    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let body = login_body(&s.brute, PASSWORD, s.brute.code().as_deref());
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "POST",
        "/api/v1/session",
        &[],
        Some(body),
    )
    .await;
    let check = ctx
        .refusal(
            NAME,
            CASE_LOCKED,
            "login_locked",
            None,
            before,
            status_is(&answer, 401),
            describe(&answer),
        )
        .await;
    checks.push(from_source(ctx, check, before, source));
    checks
}

/// Case 3.
async fn totp_replay(ctx: &Ctx, s: &Setup) -> Result<Check, AttackError> {
    let code = s
        .replay
        .code()
        .ok_or_else(|| AttackError::Setup("the replay user has no TOTP".into()))?;
    let body = login_body(&s.replay, PASSWORD, Some(&code));
    let first = request(
        ctx,
        s,
        ctx.fresh_source(),
        &s.anonymous,
        "POST",
        "/api/v1/session",
        &[],
        Some(body.clone()),
    )
    .await;
    if !status_is(&first, 201) {
        return Err(AttackError::Setup(format!(
            "the first login with the code was not accepted: {}",
            describe(&first)
        )));
    }
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let again = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "POST",
        "/api/v1/session",
        &[],
        Some(body),
    )
    .await;
    let check = ctx
        .refusal(
            NAME,
            CASE_REPLAY,
            "login_totp_replayed",
            None,
            before,
            status_is(&again, 401),
            format!("first login 201; the same code again: {}", describe(&again)),
        )
        .await;
    Ok(from_source(ctx, check, before, source))
}

/// Cases 4 and 5, with the consumer's session.
async fn consumer_cases(ctx: &Ctx, s: &Setup, session: &Result<Session, String>) -> Vec<Check> {
    let session = match session {
        Ok(session) => session,
        Err(e) => {
            return [CASE_PROBE, CASE_CONSUMER_OP]
                .into_iter()
                .map(|case| Check::broken(NAME, case, e))
                .collect();
        }
    };
    let path = format!("/api/v1/meters/{}/readings", s.other_meter);
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "GET",
        &path,
        &[session.bearer()],
        None,
    )
    .await;
    let check = ctx
        .refusal(
            NAME,
            CASE_PROBE,
            "access_probe",
            Some(s.other_meter.as_str()),
            before,
            status_is(&answer, 404),
            format!("GET {path}: {}", describe(&answer)),
        )
        .await;
    let mut checks = vec![from_source(ctx, check, before, source)];

    let path = "/api/v1/security-events";
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "GET",
        path,
        &[session.bearer()],
        None,
    )
    .await;
    let check = ctx
        .refusal(
            NAME,
            CASE_CONSUMER_OP,
            "access_denied",
            None,
            before,
            status_is(&answer, 403),
            format!("GET {path}: {}", describe(&answer)),
        )
        .await;
    checks.push(from_source(ctx, check, before, source));
    checks
}

/// Case 6.
async fn auditor_admin(ctx: &Ctx, s: &Setup) -> Result<Check, AttackError> {
    let session = login(ctx, s, &s.auditor).await?;
    let body = serde_json::json!({
        "username": s.intruder,
        "role": "admin",
        "password": PASSWORD,
    })
    .to_string();
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "POST",
        "/api/v1/users",
        &[session.bearer()],
        Some(body),
    )
    .await;
    let created = user_state(s, &s.intruder).is_some();
    let check = ctx
        .refusal(
            NAME,
            CASE_AUDITOR_ADMIN,
            "access_denied",
            None,
            before,
            status_is(&answer, 403) && !created,
            format!(
                "POST /api/v1/users (role admin): {}; {}",
                describe(&answer),
                if created {
                    "THE USER WAS CREATED"
                } else {
                    "no such user"
                }
            ),
        )
        .await;
    Ok(from_source(ctx, check, before, source))
}

/// Case 7.
async fn after_logout(ctx: &Ctx, s: &Setup) -> Result<Check, AttackError> {
    let session = login(ctx, s, &s.consumer).await?;
    let logout = request(
        ctx,
        s,
        ctx.fresh_source(),
        &s.anonymous,
        "DELETE",
        "/api/v1/session",
        &[session.bearer()],
        None,
    )
    .await;
    if !status_is(&logout, 204) {
        return Err(AttackError::Setup(format!(
            "logout was not accepted: {}",
            describe(&logout)
        )));
    }
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "GET",
        "/api/v1/session",
        &[session.bearer()],
        None,
    )
    .await;
    let check = ctx
        .refusal(
            NAME,
            CASE_LOGOUT,
            "session_rejected",
            None,
            before,
            status_is(&answer, 401),
            format!(
                "logged out (204); GET /api/v1/session: {}",
                describe(&answer)
            ),
        )
        .await;
    Ok(because(
        ctx,
        from_source(ctx, check, before, source),
        before,
        "revoked",
    ))
}

/// Case 8.
async fn forged_cookie(ctx: &Ctx, s: &Setup) -> Check {
    let forged = format!(
        "gw_session=gws_forged{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "GET",
        "/api/v1/session",
        &[("cookie", forged)],
        None,
    )
    .await;
    let check = ctx
        .refusal(
            NAME,
            CASE_FORGED,
            "session_rejected",
            None,
            before,
            status_is(&answer, 401),
            format!("GET /api/v1/session: {}", describe(&answer)),
        )
        .await;
    because(
        ctx,
        from_source(ctx, check, before, source),
        before,
        "unknown session",
    )
}

/// Case 9: the session is created in the users database with a login 20 minutes ago.
async fn expired(ctx: &Ctx, s: &Setup) -> Result<Check, AttackError> {
    let access = Arc::clone(&s.access);
    let request_login = LoginRequest {
        username: s.consumer.name.clone(),
        password: Secret::new(PASSWORD),
        totp: None,
        source: ctx.fresh_source(),
    };
    let at = OffsetDateTime::now_utc() - EXPIRED_AGO;
    let token = tokio::task::spawn_blocking(move || access.login(request_login, at))
        .await
        .map_err(|e| AttackError::Setup(format!("logging in: {e}")))?
        .map_err(|e| {
            AttackError::Setup(format!(
                "a login 20 minutes ago was refused: {}",
                e.kind.reason()
            ))
        })?
        .token;
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "GET",
        "/api/v1/session",
        &[("authorization", format!("Bearer {}", token.expose()))],
        None,
    )
    .await;
    let check = ctx
        .refusal(
            NAME,
            CASE_EXPIRED,
            "session_rejected",
            None,
            before,
            status_is(&answer, 401),
            format!("GET /api/v1/session: {}", describe(&answer)),
        )
        .await;
    Ok(because(
        ctx,
        from_source(ctx, check, before, source),
        before,
        "expired",
    ))
}

/// Cases 10 and 11, with the administrator's session cookie.
async fn csrf(ctx: &Ctx, s: &Setup, session: &Result<Session, String>) -> Vec<Check> {
    let session = match session {
        Ok(session) => session,
        Err(e) => {
            return [CASE_CSRF, CASE_CSRF_WRONG]
                .into_iter()
                .map(|case| Check::broken(NAME, case, e))
                .collect();
        }
    };
    let path = disable_path(s);
    let mut checks = Vec::new();
    let wrong = format!("gwc_wrong{:016x}", rand::random::<u64>());
    for (case, token) in [(CASE_CSRF, None), (CASE_CSRF_WRONG, Some(wrong))] {
        let mut headers = vec![session.cookie()];
        if let Some(t) = token {
            headers.push(("x-csrf-token", t));
        }
        let source = ctx.fresh_source();
        let before = ctx.last_event_id();
        let answer = request(ctx, s, source, &s.anonymous, "POST", &path, &headers, None).await;
        let disabled = user_state(s, &s.victim.name).unwrap_or(false);
        let check = ctx
            .refusal(
                NAME,
                case,
                "csrf_rejected",
                None,
                before,
                status_is(&answer, 403) && !disabled,
                format!(
                    "POST {path}: {}; {}",
                    describe(&answer),
                    if disabled {
                        "THE USER WAS DISABLED"
                    } else {
                        "the user still enabled"
                    }
                ),
            )
            .await;
        checks.push(from_source(ctx, check, before, source));
    }
    checks
}

fn disable_path(s: &Setup) -> String {
    format!("/api/v1/users/{}/disable", s.victim.name)
}

/// Case 12.
async fn without_role(ctx: &Ctx, s: &Setup) -> Result<Check, AttackError> {
    let meter = ctx.attack_meter("acc-norole")?;
    let config = ctx.client_config(&meter)?;
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(ctx, s, source, &config, "GET", "/api/v1/session", &[], None).await;
    let check = ctx
        .refusal(
            NAME,
            CASE_NO_ROLE,
            "certificate_without_role",
            None,
            before,
            status_is(&answer, 401),
            format!("{}: GET /api/v1/session: {}", meter.id, describe(&answer)),
        )
        .await;
    Ok(from_source(ctx, check, before, source))
}

/// Case 13: one operator certificate revoked, the head-end reloaded. Returns the client
/// configuration of the other certificate for case 17, or why that case cannot run.
async fn revoked_certificate(ctx: &Ctx, s: &Setup) -> (Check, Result<Arc<ClientConfig>, String>) {
    if !ctx.target.can_reload() {
        let why = "cannot reload the head-end (an external target without a pid): not run";
        return (
            Check::new(NAME, CASE_REVOKED, "refused, event certificate_revoked").observed(why),
            Err(why.to_owned()),
        );
    }
    let configs = ctx
        .client_config(&s.cert_revoked)
        .and_then(|revoked| Ok((revoked, ctx.client_config(&s.cert_ok)?)));
    let (revoked_config, ok_config) = match configs {
        Ok(c) => c,
        Err(e) => {
            let why = format!("could not run: {e}");
            return (Check::broken(NAME, CASE_REVOKED, e), Err(why));
        }
    };
    let revoked = ctx
        .pki()
        .revoke(
            &RevokeTarget::Identity {
                kind: Some(LeafKind::Client),
                name: s.cert_revoked.id.clone(),
            },
            RevocationReason::KeyCompromise,
            ACTOR,
            OffsetDateTime::now_utc(),
        )
        .map_err(|e| e.to_string())
        .and_then(|_| ctx.target.reload());
    if let Err(e) = revoked {
        let why = format!("revoking and reloading: {e}");
        return (
            Check::broken(NAME, CASE_REVOKED, &why),
            Err(format!("could not run: {why}")),
        );
    }

    let path = "/api/v1/security-events";
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(ctx, s, source, &revoked_config, "GET", path, &[], None).await;
    let check = ctx
        .refusal(
            NAME,
            CASE_REVOKED,
            "certificate_revoked",
            None,
            before,
            answer.is_err(),
            format!("{}: GET {path}: {}", s.cert_revoked.id, describe(&answer)),
        )
        .await;
    (from_source(ctx, check, before, source), Ok(ok_config))
}

/// Case 14.
async fn genuine_operator(ctx: &Ctx, s: &Setup) -> Result<Check, AttackError> {
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let body = login_body(&s.operator, PASSWORD, s.operator.code().as_deref());
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "POST",
        "/api/v1/session",
        &[],
        Some(body),
    )
    .await;
    let (ok, observed) = match Session::from_answer(&answer) {
        Some(session) => {
            let path = "/api/v1/security-events";
            let used = request(
                ctx,
                s,
                source,
                &s.anonymous,
                "GET",
                path,
                &[session.bearer()],
                None,
            )
            .await;
            (
                status_is(&used, 200),
                format!(
                    "login 201; GET {path} with its session: {}",
                    status_text(&used)
                ),
            )
        }
        None => (false, format!("login: {}", describe(&answer))),
    };
    Ok(genuine(
        ctx, CASE_OP, EXPECT_OP, source, before, ok, observed,
    ))
}

/// Case 15.
async fn own_meter(ctx: &Ctx, s: &Setup, session: &Session) -> Check {
    let path = format!("/api/v1/meters/{}/readings", s.own_meter);
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(
        ctx,
        s,
        source,
        &s.anonymous,
        "GET",
        &path,
        &[session.bearer()],
        None,
    )
    .await;
    let readings = match &answer {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["readings"].as_array().map(Vec::len))
            .unwrap_or(0),
        _ => 0,
    };
    let observed = format!("GET {path}: {}, {readings} readings", status_text(&answer));
    genuine(
        ctx,
        CASE_OWN,
        EXPECT_OWN,
        source,
        before,
        status_is(&answer, 200) && readings > 0,
        observed,
    )
}

/// Case 16: the request of case 10, with the CSRF token.
async fn csrf_token(ctx: &Ctx, s: &Setup, session: &Session) -> Check {
    let path = disable_path(s);
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let headers = [session.cookie(), ("x-csrf-token", session.csrf.clone())];
    let answer = request(ctx, s, source, &s.anonymous, "POST", &path, &headers, None).await;
    let disabled = user_state(s, &s.victim.name).unwrap_or(false);
    genuine(
        ctx,
        CASE_CSRF_OK,
        EXPECT_CSRF_OK,
        source,
        before,
        status_is(&answer, 204) && disabled,
        format!(
            "POST {path} with X-CSRF-Token: {}; the user {}",
            status_text(&answer),
            if disabled { "disabled" } else { "NOT disabled" }
        ),
    )
}

/// Case 17: the operator certificate that was not revoked, after the reload.
async fn certificate_ok(ctx: &Ctx, s: &Setup, config: &Arc<ClientConfig>) -> Check {
    let path = "/api/v1/security-events";
    let source = ctx.fresh_source();
    let before = ctx.last_event_id();
    let answer = request(ctx, s, source, config, "GET", path, &[], None).await;
    genuine(
        ctx,
        CASE_CERT_OK,
        EXPECT_CERT_OK,
        source,
        before,
        status_is(&answer, 200),
        format!("{}: GET {path}: {}", s.cert_ok.id, status_text(&answer)),
    )
}

// ---- Helpers --------------------------------------------------------------------------------

/// A session the API handed out.
pub(crate) struct Session {
    token: String,
    csrf: String,
}

impl Session {
    /// The session of a 201 answer to a login.
    pub(crate) fn from_answer(answer: &Result<(u16, String), String>) -> Option<Self> {
        let Ok((201, body)) = answer else {
            return None;
        };
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        Some(Self {
            token: v["token"].as_str()?.to_owned(),
            csrf: v["csrf_token"].as_str()?.to_owned(),
        })
    }

    /// Its `Authorization` header.
    pub(crate) fn bearer(&self) -> (&'static str, String) {
        ("authorization", format!("Bearer {}", self.token))
    }

    /// Its session cookie, as a browser sends it.
    fn cookie(&self) -> (&'static str, String) {
        ("cookie", format!("gw_session={}", self.token))
    }
}

/// Logs `user` in (with its TOTP code now) from a fresh source.
async fn login(ctx: &Ctx, s: &Setup, user: &User) -> Result<Session, AttackError> {
    let body = login_body(user, PASSWORD, user.code().as_deref());
    let answer = request(
        ctx,
        s,
        ctx.fresh_source(),
        &s.anonymous,
        "POST",
        "/api/v1/session",
        &[],
        Some(body),
    )
    .await;
    Session::from_answer(&answer).ok_or_else(|| {
        AttackError::Setup(format!(
            "{} cannot log in: {}",
            user.name,
            describe(&answer)
        ))
    })
}

pub(crate) fn login_body(user: &User, password: &str, code: Option<&str>) -> String {
    let mut body = serde_json::json!({ "username": user.name, "password": password });
    if let Some(code) = code {
        body["totp"] = serde_json::Value::from(code);
    }
    body.to_string()
}

/// Whether `name` is disabled (`None`: no such user), from the users database.
fn user_state(s: &Setup, name: &str) -> Option<bool> {
    s.access
        .list_users()
        .ok()?
        .into_iter()
        .find(|u| u.username == name)
        .map(|u| u.disabled)
}

/// [`api_request`] to the scenario's API.
#[allow(clippy::too_many_arguments)]
async fn request(
    ctx: &Ctx,
    s: &Setup,
    source: IpAddr,
    config: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<String>,
) -> Result<(u16, String), String> {
    api_request(ctx, &s.api, source, config, method, path, headers, body).await
}

/// One HTTP/1.1 request to `api` over TLS with `config` from `source`, on a connection of
/// its own (a JSON body if any); the status and body, or why there was none (a refused
/// handshake among them).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn api_request(
    ctx: &Ctx,
    api: &ApiTarget,
    source: IpAddr,
    config: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<String>,
) -> Result<(u16, String), String> {
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let tcp = ctx
            .tcp_from(source, api.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut config = (**config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(ctx.target.server_name.clone())
            .map_err(|e| format!("server name: {e}"))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS refused ({})", chain(&e)))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP: {}", chain(&e)))?;
        let conn = tokio::spawn(conn);
        let mut builder = hyper::Request::builder().method(method).uri(path).header(
            "host",
            format!("{}:{}", ctx.target.server_name, api.addr.port()),
        );
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        for (name, value) in headers {
            builder = builder.header(*name, value.as_str());
        }
        let req = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let response = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                // What ended the connection (a TLS alert after the handshake, as TLS 1.3
                // refuses a client certificate) is the connection's error, not the request's.
                let why = match tokio::time::timeout(Duration::from_secs(1), conn).await {
                    Ok(Ok(Err(c))) => chain(&c),
                    _ => chain(&e),
                };
                return Err(format!("no answer ({why})"));
            }
        };
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer in {} s", REQUEST_TIMEOUT.as_secs())))
}

/// An error and its causes, each once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = c.source();
    }
    parts.join(": ")
}

fn status_is(answer: &Result<(u16, String), String>, status: u16) -> bool {
    matches!(answer, Ok((s, _)) if *s == status)
}

fn status_text(answer: &Result<(u16, String), String>) -> String {
    match answer {
        Ok((status, _)) => status.to_string(),
        Err(e) => e.clone(),
    }
}

/// The status and the problem's title or code, or why there was no answer.
pub(crate) fn describe(answer: &Result<(u16, String), String>) -> String {
    match answer {
        Ok((status, body)) => {
            let v: Option<serde_json::Value> = serde_json::from_str(body).ok();
            let code = v.as_ref().and_then(|v| {
                v["type"]
                    .as_str()
                    .map(|t| t.trim_start_matches("urn:gridward:problem:"))
            });
            match code {
                Some(code) => format!("{status} {code}"),
                None => status.to_string(),
            }
        }
        Err(e) => e.clone(),
    }
}

/// Events with `reason` recorded after `after` from `source`.
fn events_from(
    ctx: &Ctx,
    after: i64,
    source: IpAddr,
    reason: &str,
) -> Vec<gridward_store::StoredSecurityEvent> {
    ctx.events_after(after)
        .into_iter()
        .filter(|e| e.event.reason == reason && event_ip(e.event.source.as_deref()) == Some(source))
        .collect()
}

/// Fails `check` unless its event's detail says `cause` (which refusal of a session it was).
fn because(ctx: &Ctx, mut check: Check, after: i64, cause: &str) -> Check {
    let Some(id) = check.event_id else {
        return check;
    };
    let detail = ctx
        .events_after(after)
        .into_iter()
        .find(|e| e.id == id)
        .map(|e| e.event.detail)
        .unwrap_or_default();
    if detail.contains(cause) {
        check.observed.push_str(&format!(" ({cause})"));
    } else {
        check.pass = false;
        check
            .observed
            .push_str(&format!(" (the event says {detail:?}, not {cause:?})"));
    }
    check
}

/// The verdict on genuine access: `ok`, and no refusal of any kind recorded from `source`.
fn genuine(
    ctx: &Ctx,
    case: &str,
    expected: &str,
    source: IpAddr,
    before: i64,
    ok: bool,
    observed: String,
) -> Check {
    let refusals: Vec<String> = ctx
        .events_after(before)
        .into_iter()
        .filter(|e| event_ip(e.event.source.as_deref()) == Some(source))
        .map(|e| e.event.reason)
        .collect();
    let observed = if refusals.is_empty() {
        observed
    } else {
        format!("{observed}; refusals recorded: {refusals:?}")
    };
    Check::new(NAME, case, expected)
        .observed(observed)
        .pass(ok && refusals.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use gridward_access::totp::{CodeCheck, check_code};

    use super::*;

    #[test]
    fn the_harness_computes_the_codes_the_head_end_accepts() {
        let secret = [0x5a_u8; 20];
        let base32 = totp_rs::Secret::from(secret.to_vec()).to_base32();
        let user = User {
            name: "x-acc-test".into(),
            totp: Some(totp_of(&base32).unwrap()),
        };
        let now = 1_800_000_000_u64;
        let code = user
            .code_at(OffsetDateTime::from_unix_timestamp(now as i64).unwrap())
            .unwrap();
        assert!(matches!(
            check_code(&secret, &code, now, None),
            CodeCheck::Accepted { .. }
        ));
        assert_eq!(
            check_code(&secret, &code, now, Some(now / 30)),
            CodeCheck::Replayed
        );
    }

    #[test]
    fn genuine_cases_expect_no_event_and_every_case_is_listed() {
        for (case, expected) in CASES {
            if case.starts_with("genuine") {
                // The harness test demands an event id of every case that expects one.
                assert!(!expected.contains("event"), "{case}: {expected}");
            } else {
                assert!(expected.contains("event"), "{case}: {expected}");
            }
        }
        assert_eq!(CASES.len(), 17);
    }

    #[test]
    fn answers_are_described_by_status_and_problem_code() {
        let body = r#"{"type":"urn:gridward:problem:csrf","title":"Forbidden","status":403}"#;
        assert_eq!(describe(&Ok((403, body.to_owned()))), "403 csrf");
        assert_eq!(describe(&Ok((204, String::new()))), "204");
        assert_eq!(describe(&Err("TLS refused".into())), "TLS refused");
        let b: serde_json::Value = serde_json::from_str(&login_body(
            &User {
                name: "u".into(),
                totp: None,
            },
            "p",
            None,
        ))
        .unwrap();
        assert!(b.get("totp").is_none() && b["username"] == "u");
    }
}
