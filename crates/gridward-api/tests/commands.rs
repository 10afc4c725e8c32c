//! The downward path over real TLS: commands, four-eyes proposals, firmware and campaigns. Each
//! refusal sends the bad request and checks the problem, the security event and the audit
//! entries; the genuine request then works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use gridward_access::Role;
use support::{Fixture, HttpsClient, Response, anonymous, cert_client, firmware_body, start};

/// One request with a bearer token.
async fn call(
    f: &Fixture,
    client: &HttpsClient,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    f.request(client, method, path, &headers, body)
        .await
        .unwrap()
}

fn eleven_meters() -> String {
    let meters: Vec<String> = (1..=11).map(|i| format!("\"m-{i}\"")).collect();
    meters.join(",")
}

fn mass_disconnect() -> String {
    format!(
        r#"{{"meters":[{}],"kind":"disconnect","reason":"feeder 7 maintenance"}}"#,
        eleven_meters()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_send_auditors_read_consumers_neither() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        "/api/v1/meters/m-1/commands",
        Some(r#"{"kind":"disconnect","reason":"unpaid bills"}"#),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "queued");
    let id = v["commands"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!(v["commands"][0]["meter_id"], "m-1");

    let r = call(
        &f,
        &anon,
        Some(&otto),
        "GET",
        "/api/v1/commands?meter=m-1",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.json();
    let c = &list["commands"][0];
    assert_eq!(c["id"], id.as_str());
    assert_eq!(c["status"], "queued");
    assert_eq!(c["kind"], "disconnect");
    assert_eq!(c["issued_by"], "otto");
    assert_eq!(c["approved_by"], serde_json::Value::Null);
    assert_eq!(c["counter"], 1);
    assert_eq!(c["attempts"], 0);
    assert_eq!(c["envelope_sha256"].as_str().unwrap().len(), 64);
    assert!(
        c.get("envelope").is_none(),
        "the signed bytes only by digest"
    );
    // The request is in the audit log with its source and credential, beside the act.
    let api = f.audit_entries("api.command.send");
    assert_eq!(api.len(), 1);
    assert_eq!(api[0].outcome, gridward_audit::Outcome::Success);
    assert_eq!(api[0].target, "m-1");
    assert_eq!(api[0].source.as_deref(), Some("127.0.0.1"));
    assert!(
        api[0].detail.contains("session (bearer)"),
        "{}",
        api[0].detail
    );
    let acts = f.audit_entries("command.issue");
    assert_eq!(acts.len(), 1);
    assert!(acts[0].detail.contains(&id), "{}", acts[0].detail);

    // An auditor reads, but cannot send.
    let (alice, _) = f.login(&f.user(Role::Auditor)).await;
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "POST",
        "/api/v1/meters/m-1/commands",
        Some(r#"{"kind":"reconnect"}"#),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        &format!("/api/v1/commands/{id}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["issued_by"], "otto");

    // A consumer does neither, not even for its own meter.
    let (carol, _) = f.login(&f.user(Role::Consumer)).await;
    let r = call(
        &f,
        &anon,
        Some(&carol),
        "POST",
        "/api/v1/meters/m-1/commands",
        Some(r#"{"kind":"reconnect"}"#),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call(&f, &anon, Some(&carol), "GET", "/api/v1/commands", None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        f.events("access_denied")
            .iter()
            .any(|e| e.event.detail.contains("SendCommand"))
    );

    // An operator certificate sends, and is recorded by its subject.
    let ops = cert_client(&f.pki(), "ops-cert");
    let r = call(
        &f,
        &ops,
        None,
        "POST",
        "/api/v1/meters/m-2/commands",
        Some(r#"{"kind":"set_reporting_interval","seconds":900,"ttl_secs":600}"#),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let cid = r.json()["commands"][0]["id"].as_str().unwrap().to_owned();
    let r = call(
        &f,
        &ops,
        None,
        "GET",
        &format!("/api/v1/commands/{cid}"),
        None,
    )
    .await;
    let c = r.json();
    assert_eq!(
        c["issued_by"], "cert:ops-cert",
        "a certificate acts under a name no user can have"
    );
    assert_eq!(c["args"]["seconds"], 900);
    // An auditor certificate cannot.
    let audit_cert = cert_client(&f.pki(), "audit-cert");
    let r = call(
        &f,
        &audit_cert,
        None,
        "POST",
        "/api/v1/meters/m-2/commands",
        Some(r#"{"kind":"read_now"}"#),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // Only the two genuine commands were queued.
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "GET",
        "/api/v1/commands?status=queued",
        None,
    )
    .await;
    assert_eq!(r.json()["commands"].as_array().unwrap().len(), 2);
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_requests_are_problems_and_queue_nothing() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let one = "/api/v1/meters/m-1/commands";
    let bulk = "/api/v1/commands";
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            one,
            r#"{"kind":"firmware_update"}"#.into(),
            422,
            "invalid_command",
        ),
        (
            one,
            r#"{"kind":"set_tariff"}"#.into(),
            422,
            "invalid_command",
        ),
        (
            one,
            r#"{"kind":"set_tariff","tariff":"no spaces"}"#.into(),
            422,
            "invalid_command",
        ),
        (
            one,
            r#"{"kind":"disconnect","seconds":5}"#.into(),
            422,
            "invalid_command",
        ),
        (
            one,
            r#"{"kind":"set_reporting_interval","seconds":0}"#.into(),
            422,
            "invalid_command",
        ),
        (
            one,
            r#"{"kind":"read_now","ttl_secs":0}"#.into(),
            422,
            "invalid_command",
        ),
        (
            one,
            r#"{"kind":"read_now","ttl_secs":999999999}"#.into(),
            422,
            "invalid_command",
        ),
        (
            one,
            r#"{"kind":"read_now","ttl_secs":18446744073709551615}"#.into(),
            422,
            "invalid_command",
        ),
        (
            one,
            format!(r#"{{"kind":"read_now","reason":"{}"}}"#, "x".repeat(1001)),
            422,
            "text_too_long",
        ),
        (
            one,
            r#"{"kind":"self_destruct"}"#.into(),
            400,
            "bad_request",
        ),
        (
            one,
            r#"{"kind":"read_now","meter":"m-2"}"#.into(),
            400,
            "bad_request",
        ),
        (one, "{not json".into(), 400, "bad_request"),
        (
            bulk,
            r#"{"meters":["m-1","m 2"],"kind":"read_now","reason":"x"}"#.into(),
            422,
            "invalid_command",
        ),
        (
            bulk,
            r#"{"meters":["m-1","m-1"],"kind":"read_now","reason":"x"}"#.into(),
            422,
            "invalid_command",
        ),
        (
            bulk,
            r#"{"meters":[],"kind":"read_now","reason":"x"}"#.into(),
            422,
            "invalid_command",
        ),
        (
            bulk,
            r#"{"meters":["m-1"],"kind":"read_now","reason":"  "}"#.into(),
            422,
            "invalid_command",
        ),
        (
            bulk,
            r#"{"meters":["m-1"],"kind":"read_now"}"#.into(),
            400,
            "bad_request",
        ),
    ];
    for (path, body, status, code) in &cases {
        let r = call(&f, &anon, Some(&otto), "POST", path, Some(body)).await;
        assert_eq!(r.status, *status, "{path} {body}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert_eq!(
            r.json()["type"],
            format!("urn:gridward:problem:{code}"),
            "{body}"
        );
    }
    // Refusals after the gate are audited as failures of the request.
    let refused = f.audit_entries("api.command.send");
    assert!(refused.len() >= 10, "{}", refused.len());
    assert!(
        refused
            .iter()
            .all(|e| e.outcome == gridward_audit::Outcome::Failure)
    );
    // Reads with bad parameters.
    for (path, status) in [
        ("/api/v1/commands?status=lost", 400),
        ("/api/v1/commands?meter=m%202", 400),
        ("/api/v1/commands?before=-3", 400),
        ("/api/v1/commands?limit=0", 400),
        ("/api/v1/commands/not-an-id", 404),
        ("/api/v1/commands/00112233445566778899aabbccddeeff", 404),
        ("/api/v1/proposals?status=maybe", 400),
        ("/api/v1/proposals/x", 404),
        ("/api/v1/proposals/77", 404),
    ] {
        let r = call(&f, &anon, Some(&otto), "GET", path, None).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
    }
    let r = call(&f, &anon, Some(&otto), "GET", "/api/v1/commands", None).await;
    assert_eq!(
        r.json()["commands"],
        serde_json::json!([]),
        "nothing was queued"
    );
    // The genuine request works.
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        one,
        Some(r#"{"kind":"set_tariff","tariff":"night"}"#),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_commands_pages_back_in_time() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let meters: Vec<String> = (1..=5).map(|i| format!("\"p-{i}\"")).collect();
    let body = format!(
        r#"{{"meters":[{}],"kind":"read_now","reason":"morning reads"}}"#,
        meters.join(",")
    );
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        "/api/v1/commands",
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(
        r.json()["status"],
        "queued",
        "read_now never needs four eyes"
    );
    let mut seen = Vec::new();
    let mut path = "/api/v1/commands?limit=2".to_owned();
    loop {
        let v = call(&f, &anon, Some(&otto), "GET", &path, None)
            .await
            .json();
        for c in v["commands"].as_array().unwrap() {
            seen.push(c["meter_id"].as_str().unwrap().to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/api/v1/commands?limit=2&before={c}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["p-5", "p-4", "p-3", "p-2", "p-1"],
        "newest first, each once"
    );
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_disconnect_needs_a_second_operator() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        "/api/v1/commands",
        Some(&mass_disconnect()),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "proposed");
    let pid = v["proposal"]["id"].as_i64().unwrap();
    assert!(v["proposal"]["expires_at"].as_str().unwrap().ends_with('Z'));
    let r = call(&f, &anon, Some(&otto), "GET", "/api/v1/commands", None).await;
    assert_eq!(
        r.json()["commands"],
        serde_json::json!([]),
        "nothing queued yet"
    );
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "GET",
        "/api/v1/proposals?status=pending",
        None,
    )
    .await;
    let list = r.json();
    assert_eq!(list[0]["id"], pid);
    assert_eq!(list[0]["proposed_by"], "otto");
    assert_eq!(list[0]["meters"].as_array().unwrap().len(), 11);
    assert_eq!(list[0]["reason"], "feeder 7 maintenance");

    // The proposer cannot approve their own proposal.
    let approve = format!("/api/v1/proposals/{pid}/approve");
    let r = call(&f, &anon, Some(&otto), "POST", &approve, Some("{}")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["type"], "urn:gridward:problem:four_eyes");
    let events = f.events("four_eyes_violation");
    assert_eq!(events.len(), 1);
    assert!(
        events[0].event.detail.contains("user:otto"),
        "{}",
        events[0].event.detail
    );
    let denied = f.audit_entries("api.proposal.approve");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].outcome, gridward_audit::Outcome::Denied);
    assert_eq!(denied[0].target, format!("proposal:{pid}"));
    assert!(
        f.audit_entries("proposal.approve")
            .iter()
            .any(|e| e.outcome == gridward_audit::Outcome::Denied)
    );
    // An auditor reads it but cannot approve.
    let (alice, _) = f.login(&f.user(Role::Auditor)).await;
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        &format!("/api/v1/proposals/{pid}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(&f, &anon, Some(&alice), "POST", &approve, Some("{}")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["type"], "urn:gridward:problem:forbidden");

    // A second operator approves: the commands are queued with both identities.
    let (olga, _) = f.login(&f.olga).await;
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "POST",
        &approve,
        Some(r#"{"note":"checked with the grid control room"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["proposal"]["status"], "approved");
    assert_eq!(v["proposal"]["decided_by"], "olga");
    assert_eq!(v["proposal"]["note"], "checked with the grid control room");
    assert_eq!(v["commands"].as_array().unwrap().len(), 11);
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "GET",
        &format!("/api/v1/commands?proposal={pid}"),
        None,
    )
    .await;
    let cmds = r.json()["commands"].as_array().unwrap().clone();
    assert_eq!(cmds.len(), 11);
    for c in &cmds {
        assert_eq!(c["status"], "queued");
        assert_eq!(c["issued_by"], "otto");
        assert_eq!(c["approved_by"], "olga");
        assert_eq!(c["proposal_id"], pid);
    }
    let ok = f.audit_entries("api.proposal.approve");
    assert_eq!(ok.last().unwrap().outcome, gridward_audit::Outcome::Success);
    // The first decision stands.
    let r = call(&f, &anon, Some(&olga), "POST", &approve, Some("{}")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["type"], "urn:gridward:problem:proposal_closed");
    // A proposal that does not exist.
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "POST",
        "/api/v1/proposals/999/approve",
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_and_expired_proposals_cannot_be_approved() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let (olga, _) = f.login(&f.olga).await;
    let propose = || async {
        let r = call(
            &f,
            &anon,
            Some(&otto),
            "POST",
            "/api/v1/commands",
            Some(&mass_disconnect()),
        )
        .await;
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()["proposal"]["id"].as_i64().unwrap()
    };

    let pid = propose().await;
    // The proposer cannot reject it either (four eyes both ways), but without a security event.
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        &format!("/api/v1/proposals/{pid}/reject"),
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "POST",
        &format!("/api/v1/proposals/{pid}/reject"),
        Some(r#"{"note":"wrong feeder"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "rejected");
    assert_eq!(r.json()["note"], "wrong feeder");
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "POST",
        &format!("/api/v1/proposals/{pid}/approve"),
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(f.audit_entries("api.proposal.reject").len(), 2);

    // Not approved within its 30-minute window.
    let pid = propose().await;
    f.advance(31 * 60);
    let (olga, _) = f.login(&f.olga).await;
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "POST",
        &format!("/api/v1/proposals/{pid}/approve"),
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["type"], "urn:gridward:problem:proposal_closed");
    assert!(r.json()["detail"].as_str().unwrap().contains("expired"));
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "GET",
        &format!("/api/v1/proposals/{pid}"),
        None,
    )
    .await;
    assert_eq!(r.json()["status"], "expired");
    let r = call(&f, &anon, Some(&olga), "GET", "/api/v1/commands", None).await;
    assert_eq!(
        r.json()["commands"],
        serde_json::json!([]),
        "nothing was ever queued"
    );
    assert!(f.events("four_eyes_violation").is_empty());
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_after_the_proposer_was_disabled_is_refused() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        "/api/v1/commands",
        Some(&mass_disconnect()),
    )
    .await;
    let pid = r.json()["proposal"]["id"].as_i64().unwrap();
    f.access.disable_user("otto", f.now()).unwrap();
    let (olga, _) = f.login(&f.olga).await;
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "POST",
        &format!("/api/v1/proposals/{pid}/approve"),
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.json()["type"],
        "urn:gridward:problem:proposer_not_eligible"
    );
    assert_eq!(f.events("four_eyes_proposer_ineligible").len(), 1);
    let r = call(
        &f,
        &anon,
        Some(&olga),
        "GET",
        &format!("/api/v1/proposals/{pid}"),
        None,
    )
    .await;
    assert_eq!(r.json()["status"], "rejected");
    assert_eq!(r.json()["note"], "proposer disabled");
    let r = call(&f, &anon, Some(&olga), "GET", "/api/v1/commands", None).await;
    assert_eq!(r.json()["commands"], serde_json::json!([]));
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_is_accepted_only_from_the_manufacturer_and_rolls_out_in_campaigns() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let upload = |body: String| {
        let anon = &anon;
        let otto = &otto;
        let f = &f;
        async move { call(f, anon, Some(otto), "POST", "/api/v1/firmware", Some(&body)).await }
    };

    // Signed by a key that is no manufacturer's, or by the head-end's own command key.
    let stranger = support::new_key();
    for key in [&stranger, &*f.signer] {
        let r = upload(firmware_body(key, 1, 40_000)).await;
        assert_eq!(r.status, 422, "{}", r.body);
        assert_eq!(r.json()["type"], "urn:gridward:problem:firmware_refused");
    }
    let refused = f.events("firmware_refused");
    assert_eq!(refused.len(), 2);
    assert!(
        refused[0].event.detail.contains("user:otto"),
        "{}",
        refused[0].event.detail
    );
    // The image swapped under a genuine manifest.
    let mut body: serde_json::Value =
        serde_json::from_str(&firmware_body(&f.manufacturer, 1, 40_000)).unwrap();
    let other: serde_json::Value =
        serde_json::from_str(&firmware_body(&f.manufacturer, 2, 40_000)).unwrap();
    body["image"] = other["image"].clone();
    let r = upload(body.to_string()).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(f.events("firmware_refused").len(), 3);
    // Not base64.
    let r = upload(r#"{"manifest":"***","image":"AAAA"}"#.to_owned()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = upload(r#"{"manifest":"AAAA"}"#.to_owned()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let refusals = f.audit_entries("api.firmware.upload");
    assert_eq!(
        refusals.len(),
        4,
        "the body without an image never reached the handler"
    );
    assert!(
        refusals
            .iter()
            .all(|e| e.outcome == gridward_audit::Outcome::Failure)
    );
    // An auditor cannot upload.
    let (alice, _) = f.login(&f.user(Role::Auditor)).await;
    let good = firmware_body(&f.manufacturer, 1, 40_000);
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "POST",
        "/api/v1/firmware",
        Some(&good),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // The genuine upload (40 kB of image: above the API's usual body limit).
    let r = upload(good.clone()).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let fw = r.json();
    assert_eq!(fw["vendor"], "acme");
    assert_eq!(fw["class"], "em-100");
    assert_eq!(fw["version"], "1.2.0");
    assert_eq!(fw["sequence"], 6);
    assert_eq!(fw["size"], 40_000);
    assert_eq!(fw["digest"].as_str().unwrap().len(), 64);
    assert_eq!(fw["uploaded_by"], "otto");
    let fid = fw["id"].as_i64().unwrap();
    let r = upload(good).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = call(&f, &anon, Some(&alice), "GET", "/api/v1/firmware", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        &format!("/api/v1/firmware/{fid}"),
        None,
    )
    .await;
    assert_eq!(r.json()["digest"], fw["digest"]);
    let r = call(&f, &anon, Some(&alice), "GET", "/api/v1/firmware/99", None).await;
    assert_eq!(r.status, 404);

    // A campaign: the pilot's commands are queued at once.
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        "/api/v1/campaigns",
        Some(&format!(
            r#"{{"firmware_id":{fid},"meters":["m-1","m-2","m-3","m-4"],"first_stage":2}}"#
        )),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let c = r.json();
    let cid = c["id"].as_i64().unwrap();
    assert_eq!(c["state"], "running");
    assert_eq!(c["stage"], 1);
    assert_eq!(c["created_by"], "otto");
    let members = c["members"].as_array().unwrap();
    assert_eq!(members.len(), 4);
    assert_eq!(members[0]["command_status"], "queued");
    assert_eq!(members[1]["stage"], 1);
    assert_eq!(members[2]["command_id"], serde_json::Value::Null);
    let pilot_cmd = members[0]["command_id"].as_str().unwrap();
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        &format!("/api/v1/commands/{pilot_cmd}"),
        None,
    )
    .await;
    assert_eq!(r.json()["kind"], "firmware_update");
    assert_eq!(r.json()["campaign_id"], cid);
    assert_eq!(r.json()["args"]["firmware_id"], fid);
    let r = call(&f, &anon, Some(&alice), "GET", "/api/v1/campaigns", None).await;
    assert_eq!(r.json()[0]["id"], cid);
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        &format!("/api/v1/campaigns/{cid}"),
        None,
    )
    .await;
    assert_eq!(r.json()["members"].as_array().unwrap().len(), 4);
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "POST",
        &format!("/api/v1/campaigns/{cid}/pause"),
        None,
    )
    .await;
    assert_eq!(r.status, 403, "an auditor changes nothing");

    // Pause, resume, cancel, each once.
    for (verb, state) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("cancel", "cancelled"),
    ] {
        let path = format!("/api/v1/campaigns/{cid}/{verb}");
        let r = call(&f, &anon, Some(&otto), "POST", &path, None).await;
        assert_eq!(r.status, 200, "{verb}: {}", r.body);
        assert_eq!(r.json()["state"], state);
        let r = call(&f, &anon, Some(&otto), "POST", &path, None).await;
        assert_eq!(r.status, 409, "{verb} twice: {}", r.body);
        assert_eq!(r.json()["type"], "urn:gridward:problem:campaign_state");
    }
    assert_eq!(f.audit_entries("api.campaign.").len(), 7);
    for (body, status) in [
        (r#"{"firmware_id":99,"meters":["m-1"]}"#.to_owned(), 422),
        (format!(r#"{{"firmware_id":{fid},"meters":[]}}"#), 422),
        (
            format!(r#"{{"firmware_id":{fid},"meters":["m-1"],"first_stage":2}}"#),
            422,
        ),
        (
            format!(r#"{{"firmware_id":{fid},"meters":["m-1"],"success_threshold":1.5}}"#),
            422,
        ),
        (
            format!(r#"{{"firmware_id":{fid},"meters":["bad id"]}}"#),
            422,
        ),
        (format!(r#"{{"firmware_id":{fid}}}"#), 400),
    ] {
        let r = call(
            &f,
            &anon,
            Some(&otto),
            "POST",
            "/api/v1/campaigns",
            Some(&body),
        )
        .await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
    }
    for path in ["/api/v1/campaigns/99/pause", "/api/v1/campaigns/x/resume"] {
        let r = call(&f, &anon, Some(&otto), "POST", path, None).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
    }
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_command_signer_the_downward_path_answers_503() {
    let f = support::start_without_commands().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    for (method, path, body) in [
        (
            "POST",
            "/api/v1/meters/m-1/commands",
            Some(r#"{"kind":"read_now"}"#),
        ),
        ("GET", "/api/v1/commands", None),
        ("GET", "/api/v1/proposals", None),
        ("POST", "/api/v1/proposals/1/approve", Some("{}")),
        ("GET", "/api/v1/firmware", None),
        ("POST", "/api/v1/campaigns/1/pause", None),
    ] {
        let r = call(&f, &anon, Some(&otto), method, path, body).await;
        assert_eq!(r.status, 503, "{method} {path}: {}", r.body);
        let v = r.json();
        assert_eq!(v["type"], "urn:gridward:problem:commands_off");
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("gridward pki issue command-signer headend"),
            "{v}"
        );
    }
    // The gate still comes first.
    let (carol, _) = f.login(&f.user(Role::Consumer)).await;
    let r = call(&f, &anon, Some(&carol), "GET", "/api/v1/commands", None).await;
    assert_eq!(r.status, 403);
    f.api.shutdown().await;
}
