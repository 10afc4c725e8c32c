//! The access service end to end: every rejection path with its typed error, and genuine logins
//! still working afterwards. Argon2 runs with the explicitly insecure test parameters.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use gridward_access::password::PasswordError;
use gridward_access::ratelimit::RateLimit;
use gridward_access::service::{GENERIC_LOGIN_FAILURE, LOCKOUT};
use gridward_access::session::{ABSOLUTE_TIMEOUT, IDLE_TIMEOUT};
use gridward_access::username::UsernameError;
use gridward_access::{
    Access, AccessError, Action, Argon2Params, Decision, FailureKind, LoginFailure, LoginRequest,
    LoginSuccess, NewUser, Role, Secret, SessionError, StoreError, TotpEnrolment, authorize,
};
use gridward_core::MeterId;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};
use totp_rs::{Algorithm, Totp};

const T0: OffsetDateTime = datetime!(2026-03-02 09:00:10 UTC);
const PASSWORD: &str = "violet-anchor-gravel-minute";
const OTHER_PASSWORD: &str = "copper-lantern-meadow-oblique";

struct Fixture {
    _dir: tempfile::TempDir,
    access: Access,
}

/// A service whose login rate limit is out of the way (tests log in many times from one
/// address); `rate_limit_is_per_source` uses the default one.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let limit = RateLimit {
        burst: 1000,
        ..RateLimit::default()
    };
    let access = Access::open_with_rate_limit(
        &dir.path().join("access.db"),
        Argon2Params::insecure_test_params(),
        limit,
    )
    .unwrap();
    Fixture { _dir: dir, access }
}

fn fixture_default_rate_limit() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let access = Access::open(
        &dir.path().join("access.db"),
        Argon2Params::insecure_test_params(),
    )
    .unwrap();
    Fixture { _dir: dir, access }
}

fn meter(s: &str) -> MeterId {
    MeterId::new(s).unwrap()
}

fn ip(n: u8) -> IpAddr {
    IpAddr::from([192, 0, 2, n])
}

fn new_user(name: &str, role: Role) -> NewUser {
    NewUser {
        username: name.into(),
        role,
        meters: if role == Role::Consumer {
            vec![meter("m-1")]
        } else {
            vec![]
        },
        password: Secret::new(PASSWORD),
    }
}

fn code(e: &TotpEnrolment, at: OffsetDateTime) -> String {
    let t = Totp::from_url(&e.uri).unwrap();
    assert_eq!(t.algorithm(), Algorithm::SHA1);
    assert_eq!((t.digits(), t.step()), (6, 30));
    t.generate(u64::try_from(at.unix_timestamp()).unwrap())
        .to_string()
}

/// A 6-digit code that is wrong for every step of the window around `at`.
fn wrong_code(e: &TotpEnrolment, at: OffsetDateTime) -> String {
    let window: Vec<String> = [-30, 0, 30]
        .iter()
        .map(|d| code(e, at + Duration::seconds(*d)))
        .collect();
    (0..4u32)
        .map(|n| format!("{n:06}"))
        .find(|c| !window.contains(c))
        .unwrap()
}

fn req(name: &str, password: &str, totp: Option<&str>, source: IpAddr) -> LoginRequest {
    LoginRequest {
        username: name.into(),
        password: Secret::new(password),
        totp: totp.map(Secret::new),
        source,
    }
}

fn login(
    a: &Access,
    name: &str,
    password: &str,
    totp: Option<&str>,
    now: OffsetDateTime,
) -> Result<LoginSuccess, LoginFailure> {
    a.login(req(name, password, totp, ip(1)), now)
}

fn kind(r: Result<LoginSuccess, LoginFailure>) -> FailureKind {
    r.map(|_| ()).unwrap_err().kind
}

// ---- user management -------------------------------------------------------------------

#[test]
fn short_password_is_refused() {
    let f = fixture();
    let mut u = new_user("carol", Role::Consumer);
    u.password = Secret::new("Sh0rt!pw");
    let e = f.access.add_user(u, T0).unwrap_err();
    assert!(
        matches!(
            e,
            AccessError::Password(PasswordError::TooShort { min: 12, actual: 8 })
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("at least 12"), "{e}");
}

#[test]
fn common_password_is_refused() {
    let f = fixture();
    let mut u = new_user("carol", Role::Consumer);
    u.password = Secret::new("password1234");
    let e = f.access.add_user(u, T0).unwrap_err();
    assert!(
        matches!(e, AccessError::Password(PasswordError::Common { .. })),
        "{e:?}"
    );
}

#[test]
fn weak_password_is_refused() {
    let f = fixture();
    let mut u = new_user("carol", Role::Consumer);
    u.password = Secret::new("carolcarol12");
    let e = f.access.add_user(u, T0).unwrap_err();
    assert!(
        matches!(
            e,
            AccessError::Password(PasswordError::Weak { .. } | PasswordError::Common { .. })
        ),
        "{e:?}"
    );
    let mut u = new_user("carol", Role::Consumer);
    u.password = Secret::new("abcdefghijklmnop");
    let e = f.access.add_user(u, T0).unwrap_err();
    assert!(
        matches!(e, AccessError::Password(PasswordError::Weak { .. })),
        "{e:?}"
    );
    assert!(f.access.list_users().unwrap().is_empty());
}

#[test]
fn bad_username_is_refused() {
    let f = fixture();
    for (name, want) in [
        ("", UsernameError::Empty),
        ("Carol", UsernameError::InvalidChar('C')),
        ("carol smith", UsernameError::InvalidChar(' ')),
        ("-carol", UsernameError::BadStart),
    ] {
        let e = f
            .access
            .add_user(new_user(name, Role::Consumer), T0)
            .unwrap_err();
        assert!(
            matches!(&e, AccessError::Username(u) if *u == want),
            "{name:?}: {e:?}"
        );
    }
    let e = f
        .access
        .add_user(new_user(&"c".repeat(65), Role::Consumer), T0)
        .unwrap_err();
    assert!(
        matches!(e, AccessError::Username(UsernameError::TooLong(65))),
        "{e:?}"
    );
}

#[test]
fn duplicate_user_and_meter_rules() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let e = f
        .access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap_err();
    assert!(
        matches!(e, AccessError::Store(StoreError::UserExists(_))),
        "{e:?}"
    );
    let mut u = new_user("dave", Role::Consumer);
    u.meters.clear();
    assert!(matches!(
        f.access.add_user(u, T0),
        Err(AccessError::MetersRequired)
    ));
    let mut u = new_user("olga", Role::Operator);
    u.meters.push(meter("m-1"));
    assert!(matches!(
        f.access.add_user(u, T0),
        Err(AccessError::MetersNotAllowed(Role::Operator))
    ));
    assert!(matches!(
        f.access.disable_user("nobody", T0),
        Err(AccessError::Store(StoreError::NoSuchUser(_)))
    ));
}

#[test]
fn privileged_users_are_enrolled_at_creation_and_listing_shows_no_secret() {
    let f = fixture();
    assert!(
        f.access
            .add_user(new_user("carol", Role::Consumer), T0)
            .unwrap()
            .is_none()
    );
    for (name, role) in [
        ("olga", Role::Operator),
        ("audrey", Role::Auditor),
        ("adam", Role::Admin),
    ] {
        let e = f
            .access
            .add_user(new_user(name, role), T0)
            .unwrap()
            .expect("enrolment");
        assert!(
            e.uri
                .starts_with(&format!("otpauth://totp/Gridward:{name}?")),
            "{}",
            e.uri
        );
        assert_eq!(e.recovery_codes.len(), 10);
        assert!(!e.qr.is_empty());
    }
    let users = f.access.list_users().unwrap();
    assert_eq!(
        users
            .iter()
            .map(|u| (
                u.username.as_str(),
                u.role,
                u.totp_enrolled,
                u.recovery_codes_left
            ))
            .collect::<Vec<_>>(),
        vec![
            ("adam", Role::Admin, true, 10),
            ("audrey", Role::Auditor, true, 10),
            ("carol", Role::Consumer, false, 0),
            ("olga", Role::Operator, true, 10),
        ]
    );
    let dbg = format!("{users:?}");
    assert!(!dbg.contains("argon2"), "{dbg}");
}

// ---- login -------------------------------------------------------------------------------

#[test]
fn consumer_logs_in_and_is_authorised_for_own_meter_only() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let ok = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    assert!(ok.token.expose().starts_with("gws_"));
    assert!(ok.csrf_token.expose().starts_with("gwc_"));
    assert_eq!(ok.expires_at, T0 + IDLE_TIMEOUT);
    assert!(!format!("{ok:?}").contains(ok.token.expose()));
    let s = f
        .access
        .authenticate(ok.token.expose(), T0 + Duration::minutes(1))
        .unwrap();
    assert_eq!(s.principal.actor_string(), "user:carol");
    assert_eq!(s.principal.meters, vec![meter("m-1")]);
    assert_eq!(
        authorize(Some(&s.principal), Action::ReadReadings(meter("m-1"))),
        Decision::Allow
    );
    let probe = authorize(Some(&s.principal), Action::ReadReadings(meter("m-2")));
    assert!(probe.is_probe());
    assert_eq!(probe.http_status(), 404);
}

#[test]
fn wrong_password_and_unknown_user_look_the_same() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let wrong = login(&f.access, "carol", OTHER_PASSWORD, None, T0).unwrap_err();
    assert_eq!(wrong.kind, FailureKind::BadPassword);
    assert!(!wrong.locked_now);
    let unknown = login(&f.access, "nobody", PASSWORD, None, T0).unwrap_err();
    assert_eq!(unknown.kind, FailureKind::UnknownUser);
    assert_eq!(unknown.username, "nobody");
    let malformed = login(&f.access, "No Body", PASSWORD, None, T0).unwrap_err();
    assert_eq!(malformed.kind, FailureKind::UnknownUser);
    for m in [&wrong, &unknown, &malformed] {
        assert_eq!(m.public_message(), GENERIC_LOGIN_FAILURE);
        assert_eq!(m.http_status(), 401);
    }
    login(&f.access, "carol", PASSWORD, None, T0).unwrap();
}

#[test]
fn privileged_login_needs_totp_and_refuses_wrong_code() {
    let f = fixture();
    let e = f
        .access
        .add_user(new_user("olga", Role::Operator), T0)
        .unwrap()
        .unwrap();
    let r = login(&f.access, "olga", PASSWORD, None, T0).unwrap_err();
    assert_eq!(r.kind, FailureKind::TotpRequired);
    assert_ne!(r.public_message(), GENERIC_LOGIN_FAILURE);
    let right = code(&e, T0);
    let wrong = wrong_code(&e, T0);
    let r = login(&f.access, "olga", PASSWORD, Some(&wrong), T0).unwrap_err();
    assert_eq!(r.kind, FailureKind::BadTotp);
    assert_eq!(r.public_message(), GENERIC_LOGIN_FAILURE);
    assert_eq!(
        kind(login(&f.access, "olga", PASSWORD, Some("12345"), T0)),
        FailureKind::BadTotp
    );
    // Wrong password with the right code: a password failure.
    assert_eq!(
        kind(login(&f.access, "olga", OTHER_PASSWORD, Some(&right), T0)),
        FailureKind::BadPassword
    );
    let ok = login(&f.access, "olga", PASSWORD, Some(&right), T0).unwrap();
    assert_eq!(ok.principal.role, Role::Operator);
    assert!(!ok.used_recovery_code);
    // The failures were reset by the success.
    assert_eq!(f.access.list_users().unwrap()[0].failures, 0);
}

#[test]
fn totp_code_is_accepted_once_and_skew_is_one_step() {
    let f = fixture();
    let e = f
        .access
        .add_user(new_user("olga", Role::Operator), T0)
        .unwrap()
        .unwrap();
    let c = code(&e, T0);
    login(&f.access, "olga", PASSWORD, Some(&c), T0).unwrap();
    // The same code again, within its window: a replay.
    let r = login(
        &f.access,
        "olga",
        PASSWORD,
        Some(&c),
        T0 + Duration::seconds(5),
    )
    .unwrap_err();
    assert_eq!(r.kind, FailureKind::TotpReplayed);
    assert_eq!(r.public_message(), GENERIC_LOGIN_FAILURE);
    // The previous step's code is older than the accepted one: also refused.
    let prev = code(&e, T0 - Duration::seconds(30));
    assert_eq!(
        kind(login(
            &f.access,
            "olga",
            PASSWORD,
            Some(&prev),
            T0 + Duration::seconds(5)
        )),
        FailureKind::TotpReplayed
    );
    // The next step's code, presented early (clock skew): accepted.
    let next = code(&e, T0 + Duration::seconds(30));
    login(
        &f.access,
        "olga",
        PASSWORD,
        Some(&next),
        T0 + Duration::seconds(6),
    )
    .unwrap();
    // Two steps ahead: outside the window.
    let far = code(&e, T0 + Duration::seconds(120));
    assert_eq!(
        kind(login(
            &f.access,
            "olga",
            PASSWORD,
            Some(&far),
            T0 + Duration::seconds(7)
        )),
        FailureKind::BadTotp
    );
    // A later step's code works.
    let later = T0 + Duration::seconds(90);
    login(&f.access, "olga", PASSWORD, Some(&code(&e, later)), later).unwrap();
}

#[test]
fn recovery_code_is_accepted_once() {
    let f = fixture();
    let e = f
        .access
        .add_user(new_user("adam", Role::Admin), T0)
        .unwrap()
        .unwrap();
    let rc = &e.recovery_codes[3];
    let ok = login(&f.access, "adam", PASSWORD, Some(rc), T0).unwrap();
    assert!(ok.used_recovery_code);
    assert_eq!(
        kind(login(&f.access, "adam", PASSWORD, Some(rc), T0)),
        FailureKind::BadTotp
    );
    assert_eq!(
        kind(login(
            &f.access,
            "adam",
            PASSWORD,
            Some("0123ab-0123ab-0123ab-0123ab"),
            T0
        )),
        FailureKind::BadTotp
    );
    // Another code, typed in upper case without dashes, still works.
    let other = e.recovery_codes[4].to_uppercase().replace('-', "");
    login(&f.access, "adam", PASSWORD, Some(&other), T0).unwrap();
    assert_eq!(f.access.list_users().unwrap()[0].recovery_codes_left, 8);
}

#[test]
fn five_failures_lock_for_thirty_minutes() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    for i in 1..=4 {
        let r = login(&f.access, "carol", OTHER_PASSWORD, None, T0).unwrap_err();
        assert_eq!(
            (r.kind, r.locked_now),
            (FailureKind::BadPassword, false),
            "failure {i}"
        );
    }
    let fifth = login(&f.access, "carol", OTHER_PASSWORD, None, T0).unwrap_err();
    assert_eq!(
        (fifth.kind, fifth.locked_now),
        (FailureKind::BadPassword, true)
    );
    // The sixth, with the right password, is refused.
    let sixth = login(
        &f.access,
        "carol",
        PASSWORD,
        None,
        T0 + Duration::minutes(1),
    )
    .unwrap_err();
    assert_eq!(sixth.kind, FailureKind::Locked);
    assert_eq!(sixth.public_message(), GENERIC_LOGIN_FAILURE);
    assert_eq!(
        kind(login(
            &f.access,
            "carol",
            PASSWORD,
            None,
            T0 + LOCKOUT - Duration::seconds(1)
        )),
        FailureKind::Locked
    );
    // After 30 minutes the right password works again.
    login(&f.access, "carol", PASSWORD, None, T0 + LOCKOUT).unwrap();
    // ... and the count started again: four more failures do not lock.
    for _ in 0..4 {
        login(&f.access, "carol", OTHER_PASSWORD, None, T0 + LOCKOUT).unwrap_err();
    }
    login(&f.access, "carol", PASSWORD, None, T0 + LOCKOUT).unwrap();
}

#[test]
fn totp_failures_count_towards_lockout_and_expired_lock_restarts_count() {
    let f = fixture();
    let e = f
        .access
        .add_user(new_user("olga", Role::Operator), T0)
        .unwrap()
        .unwrap();
    // TotpRequired does not count.
    for _ in 0..6 {
        assert_eq!(
            kind(login(&f.access, "olga", PASSWORD, None, T0)),
            FailureKind::TotpRequired
        );
    }
    for _ in 0..4 {
        let r = login(&f.access, "olga", PASSWORD, Some(&wrong_code(&e, T0)), T0).unwrap_err();
        assert_eq!((r.kind, r.locked_now), (FailureKind::BadTotp, false));
    }
    let r = login(&f.access, "olga", OTHER_PASSWORD, None, T0).unwrap_err();
    assert!(r.locked_now);
    let c = code(&e, T0);
    assert_eq!(
        kind(login(&f.access, "olga", PASSWORD, Some(&c), T0)),
        FailureKind::Locked
    );
    // Lock ran out; one failure does not lock again.
    let later = T0 + LOCKOUT + Duration::minutes(1);
    let r = login(&f.access, "olga", OTHER_PASSWORD, None, later).unwrap_err();
    assert_eq!((r.kind, r.locked_now), (FailureKind::BadPassword, false));
    login(&f.access, "olga", PASSWORD, Some(&code(&e, later)), later).unwrap();
}

#[test]
fn admin_unlock_and_password_reset_clear_lockout() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    for _ in 0..5 {
        login(&f.access, "carol", OTHER_PASSWORD, None, T0).unwrap_err();
    }
    assert_eq!(
        kind(login(&f.access, "carol", PASSWORD, None, T0)),
        FailureKind::Locked
    );
    f.access.unlock_user("carol", T0).unwrap();
    login(&f.access, "carol", PASSWORD, None, T0).unwrap();
}

#[test]
fn disabled_user_is_refused_and_enabled_again() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let ok = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    f.access.disable_user("carol", T0).unwrap();
    let r = login(&f.access, "carol", PASSWORD, None, T0).unwrap_err();
    assert_eq!(r.kind, FailureKind::Disabled);
    assert_eq!(r.public_message(), GENERIC_LOGIN_FAILURE);
    // Disabling revoked the session.
    assert!(matches!(
        f.access.authenticate(ok.token.expose(), T0),
        Err(SessionError::Revoked)
    ));
    f.access.enable_user("carol", T0).unwrap();
    let ok = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    f.access.authenticate(ok.token.expose(), T0).unwrap();
}

#[test]
fn rate_limit_is_per_source() {
    let f = fixture_default_rate_limit();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    for _ in 0..10 {
        let r = f
            .access
            .login(req("nobody", PASSWORD, None, ip(66)), T0)
            .unwrap_err();
        assert_eq!(r.kind, FailureKind::UnknownUser);
    }
    // The eleventh attempt from that source is refused before anything is checked, even with
    // the right password.
    let r = f
        .access
        .login(req("carol", PASSWORD, None, ip(66)), T0)
        .unwrap_err();
    assert_eq!(r.kind, FailureKind::RateLimited);
    assert_eq!(r.http_status(), 429);
    // Another source is unaffected.
    f.access
        .login(req("carol", PASSWORD, None, ip(67)), T0)
        .unwrap();
    // A token comes back after 6 s.
    f.access
        .login(
            req("carol", PASSWORD, None, ip(66)),
            T0 + Duration::seconds(6),
        )
        .unwrap();
}

// ---- sessions ----------------------------------------------------------------------------

#[test]
fn session_idle_expiry_and_touch() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let ok = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    let t = ok.token.expose();
    // Used every 14 minutes, it lives on.
    let mut now = T0;
    for _ in 0..4 {
        now += Duration::minutes(14);
        let s = f.access.authenticate(t, now).unwrap();
        assert_eq!(s.expires_at, now + IDLE_TIMEOUT);
    }
    assert!(matches!(
        f.access.authenticate(t, now + IDLE_TIMEOUT),
        Err(SessionError::ExpiredIdle)
    ));
}

#[test]
fn session_absolute_expiry() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let ok = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    let t = ok.token.expose();
    let mut now = T0;
    while now + Duration::minutes(10) < T0 + ABSOLUTE_TIMEOUT {
        now += Duration::minutes(10);
        f.access.authenticate(t, now).unwrap();
    }
    let s = f.access.authenticate(t, now).unwrap();
    assert_eq!(s.expires_at, T0 + ABSOLUTE_TIMEOUT);
    assert!(matches!(
        f.access.authenticate(t, T0 + ABSOLUTE_TIMEOUT),
        Err(SessionError::ExpiredAbsolute)
    ));
}

#[test]
fn unknown_and_malformed_tokens() {
    let f = fixture();
    for t in ["", "gws_", "gws_AAAA", "Bearer x", "gwc_abc"] {
        assert!(
            matches!(f.access.authenticate(t, T0), Err(SessionError::Unknown)),
            "{t:?}"
        );
    }
}

#[test]
fn logout_revokes_only_that_session() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let a = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    let b = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    assert!(f.access.logout(a.token.expose(), T0).unwrap());
    assert!(!f.access.logout(a.token.expose(), T0).unwrap());
    assert!(matches!(
        f.access.authenticate(a.token.expose(), T0),
        Err(SessionError::Revoked)
    ));
    f.access.authenticate(b.token.expose(), T0).unwrap();
}

#[test]
fn password_change_revokes_sessions() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let ok = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    let e = f
        .access
        .reset_password("carol", &Secret::new("password1234"), T0)
        .unwrap_err();
    assert!(
        matches!(e, AccessError::Password(PasswordError::Common { .. })),
        "{e:?}"
    );
    f.access.authenticate(ok.token.expose(), T0).unwrap();
    f.access
        .reset_password("carol", &Secret::new(OTHER_PASSWORD), T0)
        .unwrap();
    assert!(matches!(
        f.access.authenticate(ok.token.expose(), T0),
        Err(SessionError::Revoked)
    ));
    assert_eq!(
        kind(login(&f.access, "carol", PASSWORD, None, T0)),
        FailureKind::BadPassword
    );
    login(&f.access, "carol", OTHER_PASSWORD, None, T0).unwrap();
}

#[test]
fn role_change_revokes_sessions_and_enrols_totp() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let ok = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    let e = f
        .access
        .set_role("carol", Role::Operator, vec![], T0)
        .unwrap()
        .expect("enrolment");
    assert!(matches!(
        f.access.authenticate(ok.token.expose(), T0),
        Err(SessionError::Revoked)
    ));
    assert_eq!(
        kind(login(&f.access, "carol", PASSWORD, None, T0)),
        FailureKind::TotpRequired
    );
    let ok = login(&f.access, "carol", PASSWORD, Some(&code(&e, T0)), T0).unwrap();
    let s = f.access.authenticate(ok.token.expose(), T0).unwrap();
    assert_eq!(s.principal.role, Role::Operator);
    assert!(s.principal.meters.is_empty());
    // Moving between privileged roles keeps the enrolled factor.
    assert!(
        f.access
            .set_role("carol", Role::Auditor, vec![], T0)
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        f.access.set_role("carol", Role::Consumer, vec![], T0),
        Err(AccessError::MetersRequired)
    ));
}

#[test]
fn reenrolment_replaces_secret_and_revokes_sessions() {
    let f = fixture();
    let old = f
        .access
        .add_user(new_user("adam", Role::Admin), T0)
        .unwrap()
        .unwrap();
    let ok = login(&f.access, "adam", PASSWORD, Some(&code(&old, T0)), T0).unwrap();
    let new = f.access.enroll_totp("adam", T0).unwrap();
    assert_ne!(new.secret_base32, old.secret_base32);
    assert!(matches!(
        f.access.authenticate(ok.token.expose(), T0),
        Err(SessionError::Revoked)
    ));
    let later = T0 + Duration::seconds(60);
    assert_eq!(
        kind(login(
            &f.access,
            "adam",
            PASSWORD,
            Some(&code(&old, later)),
            later
        )),
        FailureKind::BadTotp
    );
    assert_eq!(
        kind(login(
            &f.access,
            "adam",
            PASSWORD,
            Some(&old.recovery_codes[0]),
            later
        )),
        FailureKind::BadTotp
    );
    login(&f.access, "adam", PASSWORD, Some(&code(&new, later)), later).unwrap();
}

#[test]
fn consumer_may_enrol_totp_optionally() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let e = f.access.enroll_totp("carol", T0).unwrap();
    assert_eq!(
        kind(login(&f.access, "carol", PASSWORD, None, T0)),
        FailureKind::TotpRequired
    );
    login(&f.access, "carol", PASSWORD, Some(&code(&e, T0)), T0).unwrap();
}

#[test]
fn csrf_mismatch_is_refused() {
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let a = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    let b = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    let s = f.access.authenticate(a.token.expose(), T0).unwrap();
    assert!(f.access.check_csrf(&s, a.csrf_token.expose()));
    assert!(!f.access.check_csrf(&s, b.csrf_token.expose()));
    assert!(!f.access.check_csrf(&s, ""));
    assert!(!f.access.check_csrf(&s, a.token.expose()));
}

#[test]
fn disabled_user_sessions_are_refused_even_if_not_revoked() {
    // A session that escaped revocation (e.g. a row restored from backup) is still refused.
    let f = fixture();
    f.access
        .add_user(new_user("carol", Role::Consumer), T0)
        .unwrap();
    let ok = login(&f.access, "carol", PASSWORD, None, T0).unwrap();
    f.access.disable_user("carol", T0).unwrap();
    rusqlite::Connection::open(f.access.store().path())
        .unwrap()
        .execute("UPDATE sessions SET revoked_at = NULL", [])
        .unwrap();
    assert!(matches!(
        f.access.authenticate(ok.token.expose(), T0),
        Err(SessionError::UserDisabled)
    ));
}

#[test]
fn state_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.db");
    let token;
    {
        let a = Access::open(&path, Argon2Params::insecure_test_params()).unwrap();
        a.add_user(new_user("carol", Role::Consumer), T0).unwrap();
        token = login(&a, "carol", PASSWORD, None, T0).unwrap().token;
    }
    let a = Access::open(&path, Argon2Params::insecure_test_params()).unwrap();
    a.authenticate(token.expose(), T0 + Duration::minutes(1))
        .unwrap();
    assert_eq!(a.purge_sessions(T0 + ABSOLUTE_TIMEOUT).unwrap(), 1);
}

#[test]
fn access_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Access>();
}
