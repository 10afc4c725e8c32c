//! Issue 9: every route × every kind of caller, against the table committed in
//! `docs/access-table.md`. The routes come from the OpenAPI document, which is generated from
//! the same registrations as the router, so a route added without a table row fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashMap};

use gridward_access::Role;
use gridward_command::{CampaignRequest, IssueRequest, Issued};
use gridward_core::MeterId;
use gridward_core::command::CommandBody;
use support::{Fixture, HttpsClient, PASSWORD, anonymous, cert_client, firmware_body};

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

/// Things of the downward path for the requests to name: one of each to read, and, for the
/// requests that change one, a fresh one per caller (so an allowed cell shows 2xx).
struct Downward {
    command: String,
    proposal: i64,
    firmware: i64,
    campaign: i64,
    /// Per column: a pending proposal (of `olga`) to approve, another to reject.
    approve: HashMap<&'static str, i64>,
    reject: HashMap<&'static str, i64>,
    /// Per column: a running campaign to pause, a paused one to resume, a running one to cancel.
    pause: HashMap<&'static str, i64>,
    resume: HashMap<&'static str, i64>,
    cancel: HashMap<&'static str, i64>,
    /// An alarm to read, and per column an active one to acknowledge and another to clear.
    alarm: i64,
    ack: HashMap<&'static str, i64>,
    clear: HashMap<&'static str, i64>,
}

fn mid(s: &str) -> MeterId {
    MeterId::new(s).unwrap()
}

/// Made through the command service, as the second operator `olga`.
fn downward(f: &Fixture) -> Downward {
    let cmds = f.commands();
    let Issued::Queued { ids } = cmds
        .issue(IssueRequest {
            meters: vec![mid("m-1")],
            body: CommandBody::ReadNow,
            actor: "olga".into(),
            ttl: None,
            reason: String::new(),
        })
        .unwrap()
    else {
        panic!("one read_now is queued")
    };
    let propose = || {
        let Issued::Proposed { proposal_id, .. } = cmds
            .issue(IssueRequest {
                meters: (1..=11).map(|i| mid(&format!("m-{i}"))).collect(),
                body: CommandBody::Disconnect,
                actor: "olga".into(),
                ttl: None,
                reason: "access table".into(),
            })
            .unwrap()
        else {
            panic!("a mass disconnect is proposed")
        };
        proposal_id
    };
    let (manifest, image) = support::firmware(&f.manufacturer, 0, 64);
    let firmware = cmds
        .upload_firmware(
            &manifest,
            &image,
            &[f.manufacturer.verifying_key().unwrap()],
            "olga",
        )
        .unwrap();
    let campaign = || {
        cmds.create_campaign(CampaignRequest {
            firmware_id: firmware,
            meters: vec![mid("m-2")],
            first_stage: None,
            success_threshold: None,
            max_failures: None,
            actor: "olga".into(),
        })
        .unwrap()
    };
    let per_column = |make: &dyn Fn() -> i64| COLUMNS.iter().map(|c| (*c, make())).collect();
    let alarms = std::sync::atomic::AtomicUsize::new(0);
    let alarm = || {
        let n = alarms.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        f.raise("tamper", "major", &format!("meter:a-{n}"))
    };
    Downward {
        command: ids[0].to_string(),
        proposal: propose(),
        firmware,
        campaign: campaign(),
        approve: per_column(&propose),
        reject: per_column(&propose),
        pause: per_column(&campaign),
        resume: per_column(&|| {
            let id = campaign();
            cmds.pause_campaign(id, "olga").unwrap();
            id
        }),
        cancel: per_column(&campaign),
        alarm: alarm(),
        ack: per_column(&alarm),
        clear: per_column(&alarm),
    }
}

/// The path of `path` for `column`, with the ids of the downward path filled in.
fn downward_path(path: &str, column: &'static str, d: &Downward) -> String {
    let per = |m: &HashMap<&'static str, i64>| m[column].to_string();
    let proposal = match path.rsplit('/').next() {
        Some("approve") => per(&d.approve),
        Some("reject") => per(&d.reject),
        _ => d.proposal.to_string(),
    };
    let campaign = match path.rsplit('/').next() {
        Some("pause") => per(&d.pause),
        Some("resume") => per(&d.resume),
        Some("cancel") => per(&d.cancel),
        _ => d.campaign.to_string(),
    };
    let alarm = match path.rsplit('/').next() {
        Some("ack") => per(&d.ack),
        Some("clear") => per(&d.clear),
        _ => d.alarm.to_string(),
    };
    path.replace("{command_id}", &d.command)
        .replace("{alarm_id}", &alarm)
        .replace("{concentrator_id}", "dc-1")
        .replace("{proposal_id}", &proposal)
        .replace("{firmware_id}", &d.firmware.to_string())
        .replace("{campaign_id}", &campaign)
}

/// A body that succeeds where the caller is allowed (so an allowed cell shows 2xx).
fn body_for(f: &Fixture, d: &Downward, method: &str, path: &str, n: usize) -> Option<String> {
    match (method, path) {
        ("POST", "/api/v1/meters/{meter_id}/commands") => Some(r#"{"kind":"read_now"}"#.to_owned()),
        ("POST", "/api/v1/commands") => {
            Some(r#"{"meters":["m-1","m-2"],"kind":"read_now","reason":"access table"}"#.to_owned())
        }
        ("POST", "/api/v1/proposals/{proposal_id}/approve")
        | ("POST", "/api/v1/proposals/{proposal_id}/reject") => Some("{}".to_owned()),
        ("POST", "/api/v1/firmware") => Some(firmware_body(&f.manufacturer, 100 + n, 64)),
        ("POST", "/api/v1/campaigns") => Some(format!(
            r#"{{"firmware_id":{},"meters":["m-1"]}}"#,
            d.firmware
        )),
        ("PUT", "/api/v1/concentrators/{concentrator_id}/meters") => {
            Some(r#"{"attach":["m-1"]}"#.to_owned())
        }
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

    let down = downward(&f);
    let mut actual: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut n = 0;
    for (method, path) in routes() {
        let key = format!("{method} {path}");
        let mut row = Vec::new();
        for column in COLUMNS {
            let caller = &callers.iter().find(|(c, _)| *c == column).unwrap().1;
            n += 1;
            let url = downward_path(&path, column, &down)
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
            let body = body_for(&f, &down, &method, &path, n);
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
