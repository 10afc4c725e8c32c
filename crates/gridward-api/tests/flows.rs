//! The API's refusals one by one, over real TLS: each sends the bad input, checks the problem
//! answer, the security event and the audit entry, and that the genuine request still works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use gridward_access::Role;
use support::{PASSWORD, anonymous, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_locks_the_account_and_says_nothing_about_it() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let otto = f.user(Role::Operator);
    let wrong = r#"{"username":"otto","password":"guess number one!!","totp":"000000"}"#;
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let r = f
            .request(&anon, "POST", "/api/v1/session", &[], Some(wrong))
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        bodies.push(r.json()["detail"].clone());
    }
    // An unknown user gets the very same answer.
    let r = f
        .request(
            &anon,
            "POST",
            "/api/v1/session",
            &[],
            Some(r#"{"username":"nobody","password":"guess number one!!"}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["detail"], bodies[0]);
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    assert_eq!(f.events("login_bad_password").len(), 5);
    assert_eq!(f.events("account_locked").len(), 1);
    assert_eq!(f.audit_entries("login.lockout").len(), 1);
    assert_eq!(f.audit_entries("login.failure").len(), 6);

    // Locked: the right password and code are refused for 30 minutes...
    f.advance(31);
    let right = format!(
        r#"{{"username":"otto","password":"{PASSWORD}","totp":"{}"}}"#,
        f.code(otto.totp_secret.as_deref().unwrap())
    );
    let r = f
        .request(&anon, "POST", "/api/v1/session", &[], Some(&right))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["detail"], bodies[0]);
    assert!(!f.events("login_locked").is_empty());
    // ...and work after.
    f.advance(30 * 60);
    f.login(&otto).await;
    assert_eq!(f.audit_entries("login.success").len(), 1);
    // Counted for the metrics.
    assert_eq!(
        f.observer
            .lockouts
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        f.observer
            .logins_failed
            .load(std::sync::atomic::Ordering::SeqCst),
        7
    );
    assert_eq!(
        f.observer
            .logins_ok
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_totp_code_is_accepted_once() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let otto = f.user(Role::Operator);
    f.advance(31);
    let body = format!(
        r#"{{"username":"otto","password":"{PASSWORD}","totp":"{}"}}"#,
        f.code(otto.totp_secret.as_deref().unwrap())
    );
    let first = f
        .request(&anon, "POST", "/api/v1/session", &[], Some(&body))
        .await
        .unwrap();
    assert_eq!(first.status, 201, "{}", first.body);
    let replay = f
        .request(&anon, "POST", "/api/v1/session", &[], Some(&body))
        .await
        .unwrap();
    assert_eq!(replay.status, 401);
    assert_eq!(f.events("login_totp_replayed").len(), 1);
    // No code at all for an operator: asked for it, not counted as a guess.
    let none = format!(r#"{{"username":"otto","password":"{PASSWORD}"}}"#);
    let r = f
        .request(&anon, "POST", "/api/v1/session", &[], Some(&none))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("authenticator")
    );
    f.login(&otto).await;
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_ends_the_session_and_cookies_need_the_csrf_token() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let adam = f.user(Role::Admin);
    let (token, csrf) = f.login(&adam).await;
    let cookie = format!("gw_session={token}");
    let disable = "/api/v1/users/carol/disable";

    // A state-changing request with the cookie but without the CSRF token, or a wrong one.
    for headers in [
        vec![("cookie", cookie.as_str())],
        vec![("cookie", cookie.as_str()), ("x-csrf-token", "gwc_forged")],
    ] {
        let r = f
            .request(&anon, "POST", disable, &headers, None)
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.json()["type"], "urn:gridward:problem:csrf");
    }
    assert_eq!(f.events("csrf_rejected").len(), 2);
    assert!(
        !f.access
            .list_users()
            .unwrap()
            .iter()
            .find(|u| u.username == "carol")
            .unwrap()
            .disabled
    );
    // A read with the cookie needs no CSRF token; a change with it works.
    let r = f
        .request(&anon, "GET", "/api/v1/users", &[("cookie", &cookie)], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = f
        .request(
            &anon,
            "POST",
            disable,
            &[("cookie", &cookie), ("x-csrf-token", &csrf)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(f.audit_entries("user.disable").len(), 1);

    // A forged cookie is an unknown session.
    let r = f
        .request(
            &anon,
            "GET",
            "/api/v1/session",
            &[("cookie", "gw_session=gws_forged")],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);

    // Logout: the token is dead at once.
    let bearer = format!("Bearer {token}");
    let r = f
        .request(
            &anon,
            "DELETE",
            "/api/v1/session",
            &[("authorization", &bearer)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    assert!(
        r.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let r = f
        .request(
            &anon,
            "GET",
            "/api/v1/session",
            &[("authorization", &bearer)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(
        f.events("session_rejected")
            .iter()
            .any(|e| e.event.detail.contains("revoked")),
        "{:?}",
        f.events("session_rejected")
    );
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sets_a_strict_cookie_and_the_session_shows_who_is_in() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    f.advance(31);
    let r = f
        .request(
            &anon,
            "POST",
            "/api/v1/session",
            &[],
            Some(&format!(
                r#"{{"username":"carol","password":"{PASSWORD}"}}"#
            )),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let cookie = r.headers["set-cookie"].to_str().unwrap();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.headers["strict-transport-security"], "max-age=31536000");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    let token = r.json()["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("gws_"));
    let bearer = format!("Bearer {token}");
    let who = f
        .request(
            &anon,
            "GET",
            "/api/v1/session",
            &[("authorization", &bearer)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(who.json()["actor"], "user:carol");
    assert_eq!(who.json()["role"], "consumer");
    assert_eq!(who.json()["meters"], serde_json::json!(["m-1"]));
    // The token is stored hashed only.
    let db = std::fs::read(f.dir.path().join("users.db")).unwrap();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()));
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_page_back_in_time_as_json_and_csv() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (token, _) = f.login(&f.user(Role::Consumer)).await;
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let mut counters = Vec::new();
    let mut url = "/api/v1/meters/m-1/readings?limit=5".to_owned();
    loop {
        let r = f.request(&anon, "GET", &url, &auth, None).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let page = r.json();
        let mut these: Vec<u64> = page["readings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["counter"].as_u64().unwrap())
            .collect();
        these.reverse();
        counters.extend(these);
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("/api/v1/meters/m-1/readings?limit=5&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(counters, (1..=12).rev().collect::<Vec<u64>>());
    let r = f
        .request(
            &anon,
            "GET",
            "/api/v1/meters/m-1/readings?format=csv&limit=3",
            &auth,
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.headers["content-type"], "text/csv; charset=utf-8");
    let lines: Vec<&str> = r.body.lines().collect();
    assert_eq!(
        lines[0],
        "reading_id,meter_id,counter,timestamp,energy_kwh,received_at"
    );
    assert!(lines[1].starts_with("m-1-10,m-1,10,"), "{}", lines[1]);
    assert!(r.headers["link"].to_str().unwrap().contains("rel=\"next\""));
    // Time range.
    let r = f
        .request(
            &anon,
            "GET",
            "/api/v1/meters/m-1/readings?since=2026-12-02T09:00:00Z&until=2026-12-02T10:00:00Z",
            &auth,
            None,
        )
        .await
        .unwrap();
    let got: Vec<u64> = r.json()["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["counter"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [4, 5, 6, 7, 8]);
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_problems_that_leak_nothing() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (token, _) = f.login(&f.user(Role::Admin)).await;
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("POST", "/api/v1/users", Some(format!(r#"{{"username":"eve","role":"consumer","meters":["m-1"],"password":"{PASSWORD}","admin":true}}"#)), 400, "bad_request"),
        ("POST", "/api/v1/users", Some("{not json".into()), 400, "bad_request"),
        ("POST", "/api/v1/users", Some(format!(r#"{{"username":"eve","role":"consumer","meters":["m-1"],"password":"{}"}}"#, "x".repeat(20_000))), 413, "body_too_large"),
        ("POST", "/api/v1/users", Some(r#"{"username":"eve","role":"consumer","meters":["m-1"],"password":"password1234"}"#.into()), 422, "weak_password"),
        ("POST", "/api/v1/users", Some(format!(r#"{{"username":"Eve!","role":"consumer","meters":["m-1"],"password":"{PASSWORD}"}}"#)), 400, "bad_request"),
        ("POST", "/api/v1/users", Some(format!(r#"{{"username":"eve","role":"root","password":"{PASSWORD}"}}"#)), 400, "bad_request"),
        ("POST", "/api/v1/users", Some(format!(r#"{{"username":"carol","role":"consumer","meters":["m-1"],"password":"{PASSWORD}"}}"#)), 409, "user_exists"),
        ("GET", "/api/v1/nothing-here", None, 404, "not_found"),
        ("PATCH", "/api/v1/users", None, 405, "method_not_allowed"),
        ("GET", "/api/v1/security-events?limit=0", None, 403, "forbidden"),
        ("POST", "/api/v1/users/nobody/disable", None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let r = f
            .request(&anon, method, path, &auth, body.as_deref())
            .await
            .unwrap();
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(
            r.headers["content-type"], "application/problem+json",
            "{method} {path}"
        );
        let p = r.json();
        assert_eq!(
            p["type"],
            format!("urn:gridward:problem:{code}"),
            "{method} {path}: {}",
            r.body
        );
        assert!(
            !r.body.contains("sqlite") && !r.body.contains("/tmp"),
            "{}",
            r.body
        );
    }
    // Nothing refused was created.
    assert!(
        f.access
            .list_users()
            .unwrap()
            .iter()
            .all(|u| u.username != "eve")
    );
    // An operator's bad query parameters.
    let (token, _) = f.login(&f.user(Role::Operator)).await;
    let bearer = format!("Bearer {token}");
    for q in [
        "limit=0",
        "limit=5000",
        "since=yesterday",
        "cursor=-1",
        "meter=..",
        "colour=red",
    ] {
        let r = f
            .request(
                &anon,
                "GET",
                &format!("/api/v1/security-events?{q}"),
                &[("authorization", &bearer)],
                None,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{q}: {}", r.body);
    }
    let r = f
        .request(
            &anon,
            "GET",
            "/api/v1/security-events?reason=access_denied&limit=10",
            &[("authorization", &bearer)],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    f.api.shutdown().await;
}
