//! Issue 9: every route × every kind of caller, against the table committed in
//! `docs/access-table.md`. The routes come from the OpenAPI document, which is generated from
//! the same registrations as the router, so a route added without a table row fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use gridward_access::Role;
use support::{HttpsClient, PASSWORD, anonymous, cert_client};

/// The callers, in the table's column order.
const COLUMNS: [&str; 12] = [
    "none",
    "consumer",
    "consumer-other",
    "operator",
    "auditor",
    "admin",
    "cert-operator",
    "cert-auditor",
    "cert-norole",
    "expired",
    "locked",
    "revoked-cert",
];

/// A caller: how it connects and what it sends.
struct Caller {
    client: HttpsClient,
    token: Option<String>,
    /// Whose session to make afresh for `DELETE /api/v1/session` (logging out ends it).
    relogin: Option<Role>,
    /// Path parameter values.
    meter: &'static str,
}

fn table_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/access-table.md")
}

/// The committed table: `METHOD path` → column → expected result.
fn committed() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(table_path()).expect("docs/access-table.md");
    let mut rows = BTreeMap::new();
    let mut header_seen = false;
    for line in text.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('`').to_owned())
            .collect();
        if !header_seen {
            assert_eq!(cells[0], "route");
            assert_eq!(
                &cells[1..],
                COLUMNS.map(String::from).as_slice(),
                "column order"
            );
            header_seen = true;
            continue;
        }
        if cells[0].starts_with("---") {
            continue;
        }
        assert_eq!(cells.len(), COLUMNS.len() + 1, "row {line}");
        assert!(
            rows.insert(cells[0].clone(), cells[1..].to_vec()).is_none(),
            "duplicate row {}",
            cells[0]
        );
    }
    rows
}

/// Every route the API serves: the OpenAPI document's operations, and the document itself.
fn routes() -> Vec<(String, String)> {
    let doc: serde_json::Value = serde_json::from_str(&gridward_api::openapi_json()).unwrap();
    let mut out = vec![("GET".to_owned(), "/api/v1/openapi.json".to_owned())];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                out.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    out.sort();
    out
}

/// A body that succeeds where the caller is allowed (so an allowed cell shows 2xx).
fn body_for(method: &str, path: &str, n: usize) -> Option<String> {
    match (method, path) {
        ("POST", "/api/v1/session") => {
            Some(r#"{"username":"nobody","password":"not the password 1"}"#.to_owned())
        }
        ("POST", "/api/v1/users") => Some(format!(
            r#"{{"username":"new-{n}","role":"consumer","meters":["m-2"],"password":"{PASSWORD}"}}"#
        )),
        ("PUT", "/api/v1/users/{username}/password") => {
            Some(format!(r#"{{"password":"{PASSWORD} again"}}"#))
        }
        ("PUT", "/api/v1/users/{username}/role") => {
            Some(r#"{"role":"consumer","meters":["m-1"]}"#.to_owned())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_and_caller_matches_the_committed_table() {
    let f = support::start().await;
    let pki = f.pki();
    // A user for the admin routes to act on, and one locked by five failed logins.
    for name in ["victim", "locky"] {
        f.access
            .add_user(
                gridward_access::NewUser {
                    username: name.into(),
                    role: Role::Consumer,
                    meters: vec![gridward_core::MeterId::new("m-2").unwrap()],
                    password: gridward_access::Secret::new(PASSWORD),
                },
                f.now(),
            )
            .unwrap();
    }
    let anon = anonymous(&pki);
    for _ in 0..5 {
        let r = f
            .request(
                &anon,
                "POST",
                "/api/v1/session",
                &[],
                Some(r#"{"username":"locky","password":"wrong password here"}"#),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401);
    }
    // The locked account's right password is refused too: it has no credential to present.
    let r = f
        .request(
            &anon,
            "POST",
            "/api/v1/session",
            &[],
            Some(&format!(
                r#"{{"username":"locky","password":"{PASSWORD}"}}"#
            )),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401, "a locked account cannot log in");
    assert!(!f.events("account_locked").is_empty());

    // An expired session: made first, then the clock passes its idle limit.
    let (expired, _) = f.login(&f.user(Role::Operator)).await;
    f.advance(16 * 60);

    let mut callers: Vec<(&str, Caller)> = Vec::new();
    for (column, role, meter) in [
        ("consumer", Role::Consumer, "m-1"),
        ("consumer-other", Role::Consumer, "m-2"),
        ("operator", Role::Operator, "m-1"),
        ("auditor", Role::Auditor, "m-1"),
        ("admin", Role::Admin, "m-1"),
    ] {
        let (token, _) = f.login(&f.user(role)).await;
        callers.push((
            column,
            Caller {
                client: anonymous(&pki),
                token: Some(token),
                relogin: Some(role),
                meter,
            },
        ));
    }
    let plain = |client, token: Option<String>| Caller {
        client,
        token,
        relogin: None,
        meter: "m-1",
    };
    callers.push(("none", plain(anonymous(&pki), None)));
    callers.push(("cert-operator", plain(cert_client(&pki, "ops-cert"), None)));
    callers.push(("cert-auditor", plain(cert_client(&pki, "audit-cert"), None)));
    callers.push(("cert-norole", plain(cert_client(&pki, "forwarder"), None)));
    callers.push(("expired", plain(anonymous(&pki), Some(expired))));
    callers.push(("locked", plain(anonymous(&pki), None)));
    callers.push((
        "revoked-cert",
        plain(cert_client(&pki, "ops-revoked"), None),
    ));

    let mut actual: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut n = 0;
    for (method, path) in routes() {
        let key = format!("{method} {path}");
        let mut row = Vec::new();
        for column in COLUMNS {
            let caller = &callers.iter().find(|(c, _)| *c == column).unwrap().1;
            n += 1;
            let url = path
                .replace("{meter_id}", caller.meter)
                .replace("{username}", "victim");
            let mut token = caller.token.clone();
            if method == "DELETE"
                && path == "/api/v1/session"
                && let Some(role) = caller.relogin
            {
                token = Some(f.login(&f.user(role)).await.0);
            }
            let auth = token.as_ref().map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            let body = body_for(&method, &path, n);
            let result = match f
                .request(&caller.client, &method, &url, &headers, body.as_deref())
                .await
            {
                Ok(r) => {
                    if r.status >= 400 {
                        assert_eq!(
                            r.headers.get("content-type").map(|v| v.to_str().unwrap()),
                            Some("application/problem+json"),
                            "{key} as {column}: {}",
                            r.body
                        );
                    }
                    assert!(r.status < 500, "{key} as {column}: {} {}", r.status, r.body);
                    r.status.to_string()
                }
                Err(_) => "tls".to_owned(),
            };
            row.push(result);
        }
        actual.insert(key, row);
    }

    let expected = committed();
    let render = |rows: &BTreeMap<String, Vec<String>>| {
        let mut s = format!(
            "| route | {} |\n|---|{}\n",
            COLUMNS.join(" | "),
            "---|".repeat(COLUMNS.len())
        );
        for (k, v) in rows {
            s.push_str(&format!("| `{k}` | {} |\n", v.join(" | ")));
        }
        s
    };
    let missing: Vec<&String> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "routes without a row in docs/access-table.md: {missing:?}\nactual:\n{}",
        render(&actual)
    );
    let stale: Vec<&String> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    assert!(
        stale.is_empty(),
        "rows for routes that do not exist: {stale:?}"
    );
    assert_eq!(
        render(&actual),
        render(&expected),
        "the access matrix differs from docs/access-table.md"
    );

    // Refusals left their traces.
    assert!(!f.events("access_denied").is_empty());
    assert!(
        !f.events("access_probe").is_empty(),
        "a consumer asking for m-2 is a probe"
    );
    assert!(
        !f.events("session_rejected").is_empty(),
        "the expired session"
    );
    assert!(!f.events("certificate_without_role").is_empty());
    assert!(!f.audit_entries("access.denied").is_empty());
    assert!(
        !f.events("certificate_revoked").is_empty(),
        "the revoked operator certificate's handshake"
    );
    f.api.shutdown().await;
}
