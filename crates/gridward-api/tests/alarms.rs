//! Issue 11: alarms and the concentrator topology over real TLS, from a real SQLite store:
//! listing and filtering, acknowledging and clearing (who and when, audited), the refusals
//! (auditors and consumers 403 with their security events, a second acknowledgement 409), and
//! topology changes (attach, move, detach, audited; bad meter ids 400).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use gridward_access::Role;
use gridward_audit::Outcome;
use gridward_core::MeterId;
use gridward_store::AlarmStore;
use support::{Fixture, HttpsClient, Response, anonymous, cert_client, start};

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

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_are_listed_filtered_acknowledged_and_cleared_by_operators() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let tamper = f.raise("tamper", "major", "meter:m-1");
    f.advance(60);
    let outage = f.raise("outage", "critical", "concentrator:dc-1");
    f.advance(60);
    let burst = f.raise("refusal_burst", "major", "source:192.0.2.9");
    // A repeat folds into the active tamper alarm.
    assert_eq!(f.raise("tamper", "major", "meter:m-1"), tamper);

    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let r = call(&f, &anon, Some(&otto), "GET", "/api/v1/alarms", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(ids(&v), vec![burst, outage, tamper], "newest first");
    assert_eq!(v["next_before"], serde_json::Value::Null);
    let t = &v["alarms"][2];
    assert_eq!(t["type"], "tamper");
    assert_eq!(t["severity"], "major");
    assert_eq!(t["originator"], "meter:m-1");
    assert_eq!(t["state"], "active_unacknowledged");
    assert_eq!(t["count"], 2);
    assert_eq!(t["evidence"][0]["event"], "CoverOpened", "{t}");
    assert_eq!(t["acknowledged"], serde_json::Value::Null);
    assert_eq!(t["cleared"], serde_json::Value::Null);
    assert!(t["first_seen"].as_str().unwrap() < t["last_seen"].as_str().unwrap());

    for (query, want) in [
        ("?severity=critical", vec![outage]),
        ("?type=tamper", vec![tamper]),
        ("?originator=source:192.0.2.9", vec![burst]),
        ("?type=outage&severity=major", vec![]),
        (&format!("?before={burst}") as &str, vec![outage, tamper]),
    ] {
        let r = call(
            &f,
            &anon,
            Some(&otto),
            "GET",
            &format!("/api/v1/alarms{query}"),
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{query}: {}", r.body);
        assert_eq!(ids(&r.json()), want, "{query}");
    }
    // Paging: a full page points at the next one.
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "GET",
        "/api/v1/alarms?limit=2",
        None,
    )
    .await;
    let v = r.json();
    assert_eq!(ids(&v), vec![burst, outage]);
    assert_eq!(v["next_before"], outage);
    for bad in [
        "?severity=huge",
        "?limit=0",
        "?active=perhaps",
        "?type=Tamper",
        "?x=1",
    ] {
        let r = call(
            &f,
            &anon,
            Some(&otto),
            "GET",
            &format!("/api/v1/alarms{bad}"),
            None,
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }

    // Acknowledged by the operator: who and when, on the alarm and in the audit log.
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        &format!("/api/v1/alarms/{tamper}/ack"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let a = r.json();
    assert_eq!(a["state"], "active_acknowledged");
    assert_eq!(a["acknowledged"]["by"], "user:otto");
    assert!(
        a["acknowledged"]["at"]
            .as_str()
            .unwrap()
            .starts_with("2026-12-03T08:"),
        "{a}"
    );
    let stored = f.store.alarm(tamper).unwrap().unwrap();
    assert_eq!(stored.acknowledged.as_ref().unwrap().0, "user:otto");
    assert_eq!(stored.acknowledged.as_ref().unwrap().1, f.now());
    let audit = f.audit_entries("alarm.acknowledge");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].actor.to_string(), "user:otto");
    assert_eq!(audit[0].target, format!("alarm:{tamper}"));
    assert_eq!(audit[0].outcome, Outcome::Success);
    assert_eq!(audit[0].time, f.now());
    assert_eq!(audit[0].source.as_deref(), Some("127.0.0.1"));
    assert!(audit[0].detail.contains("tamper"), "{}", audit[0].detail);

    // A second acknowledgement is a conflict, audited as a failure.
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        &format!("/api/v1/alarms/{tamper}/ack"),
        None,
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["type"], "urn:gridward:problem:alarm_acknowledged");
    let audit = f.audit_entries("alarm.acknowledge");
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[1].outcome, Outcome::Failure);
    // Unknown and non-numeric ids are not found.
    for path in ["/api/v1/alarms/999/ack", "/api/v1/alarms/x/ack"] {
        let r = call(&f, &anon, Some(&otto), "POST", path, None).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
    }
    let r = call(&f, &anon, Some(&otto), "GET", "/api/v1/alarms/999", None).await;
    assert_eq!(r.status, 404);

    // Cleared with a reason; then only active alarms are listed without it.
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        &format!("/api/v1/alarms/{tamper}/clear"),
        Some(r#"{"reason":"cover closed, seal replaced"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert_eq!(c["state"], "cleared");
    assert_eq!(c["cleared"]["by"], "user:otto");
    assert_eq!(c["cleared"]["reason"], "cover closed, seal replaced");
    assert_eq!(c["acknowledged"]["by"], "user:otto", "kept");
    let audit = f.audit_entries("alarm.clear");
    assert_eq!(audit.len(), 1);
    assert!(
        audit[0].detail.contains("seal replaced"),
        "{}",
        audit[0].detail
    );
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "GET",
        "/api/v1/alarms?active=true",
        None,
    )
    .await;
    assert_eq!(ids(&r.json()), vec![burst, outage]);
    // Clearing again, or acknowledging a cleared alarm: 409.
    for action in ["clear", "ack"] {
        let r = call(
            &f,
            &anon,
            Some(&otto),
            "POST",
            &format!("/api/v1/alarms/{tamper}/{action}"),
            None,
        )
        .await;
        assert_eq!(r.status, 409, "{action}: {}", r.body);
        assert_eq!(r.json()["type"], "urn:gridward:problem:alarm_cleared");
    }
    // The next raise of the key opens a new alarm.
    let again = f.raise("tamper", "major", "meter:m-1");
    assert!(again > burst);

    // Clearing without a body (unacknowledged alarm), by an operator certificate.
    let ops = cert_client(&f.pki(), "ops-cert");
    let r = call(
        &f,
        &ops,
        None,
        "POST",
        &format!("/api/v1/alarms/{outage}/clear"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert_eq!(c["cleared"]["by"], "cert:ops-cert");
    assert_eq!(c["cleared"]["reason"], "cleared by an operator");
    assert_eq!(c["acknowledged"], serde_json::Value::Null);
    // A body that says more than a reason (a non-JSON body is 415: unit-tested in extract).
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        &format!("/api/v1/alarms/{burst}/clear"),
        Some(r#"{"reason":"x","force":true}"#),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let long = "x".repeat(1001);
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "POST",
        &format!("/api/v1/alarms/{burst}/clear"),
        Some(&format!(r#"{{"reason":"{long}"}}"#)),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(f.store.alarm(burst).unwrap().unwrap().state.is_active());
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_read_but_do_not_act_consumers_and_admins_see_nothing() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let id = f.raise("cloned_meter", "critical", "meter:m-1");

    let (alice, _) = f.login(&f.user(Role::Auditor)).await;
    let r = call(&f, &anon, Some(&alice), "GET", "/api/v1/alarms", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ids(&r.json()), vec![id]);
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        &format!("/api/v1/alarms/{id}"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["type"], "cloned_meter");

    let denied_before = f.events("access_denied").len();
    for action in ["ack", "clear"] {
        let r = call(
            &f,
            &anon,
            Some(&alice),
            "POST",
            &format!("/api/v1/alarms/{id}/{action}"),
            None,
        )
        .await;
        assert_eq!(r.status, 403, "{action}: {}", r.body);
        assert_eq!(r.json()["type"], "urn:gridward:problem:forbidden");
    }
    let denied = f.events("access_denied");
    assert_eq!(denied.len(), denied_before + 2);
    assert!(
        denied.iter().any(|e| e.event.detail.contains("user:alice")
            && e.event.detail.contains("AcknowledgeAlarms")),
        "{denied:?}"
    );
    let audit = f.audit_entries("access.denied");
    assert!(
        audit
            .iter()
            .any(|e| e.target == "AcknowledgeAlarms" && e.actor.to_string() == "user:alice"),
        "{audit:?}"
    );
    assert!(
        f.audit_entries("alarm.acknowledge").is_empty(),
        "nothing happened"
    );
    let stored = f.store.alarm(id).unwrap().unwrap();
    assert!(stored.acknowledged.is_none() && stored.cleared.is_none());

    // Consumers (even for their own meter's alarm) and administrators: 403.
    for role in [Role::Consumer, Role::Admin] {
        let (token, _) = f.login(&f.user(role)).await;
        for (method, path) in [
            ("GET", "/api/v1/alarms".to_owned()),
            ("GET", format!("/api/v1/alarms/{id}")),
            ("POST", format!("/api/v1/alarms/{id}/ack")),
            ("GET", "/api/v1/concentrators".to_owned()),
            ("GET", "/api/v1/concentrators/dc-1/meters".to_owned()),
        ] {
            let r = call(&f, &anon, Some(&token), method, &path, None).await;
            assert_eq!(r.status, 403, "{role:?} {method} {path}: {}", r.body);
        }
    }
    // Nobody without a credential.
    let r = call(&f, &anon, None, "GET", "/api/v1/alarms", None).await;
    assert_eq!(r.status, 401);
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_attach_move_and_detach_meters_audited() {
    let f = start().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let put = |path: &'static str, body: &'static str| {
        let f = &f;
        let anon = &anon;
        let otto = &otto;
        async move { call(f, anon, Some(otto), "PUT", path, Some(body)).await }
    };

    let r = put(
        "/api/v1/concentrators/dc-1/meters",
        r#"{"attach":["m-1","m-2","m-3"]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["concentrator_id"], "dc-1");
    assert_eq!(v["attached"], 3);
    assert_eq!(v["detached"], 0);
    assert_eq!(v["meters"], serde_json::json!(["m-1", "m-2", "m-3"]));
    let audit = f.audit_entries("concentrator.topology");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].target, "concentrator:dc-1");
    assert_eq!(audit[0].actor.to_string(), "user:otto");
    assert_eq!(audit[0].outcome, Outcome::Success);
    assert!(
        audit[0].detail.contains("attach 3 (3 changed)"),
        "{}",
        audit[0].detail
    );

    // m-3 moves to dc-2.
    let r = put("/api/v1/concentrators/dc-2/meters", r#"{"attach":["m-3"]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["meters"], serde_json::json!(["m-3"]));
    let m3 = MeterId::new("m-3").unwrap();
    assert_eq!(
        f.store.concentrator_of(&m3).unwrap(),
        Some(MeterId::new("dc-2").unwrap())
    );
    // Detach m-2 (and m-3, which is no longer there) from dc-1, attach m-4.
    let r = put(
        "/api/v1/concentrators/dc-1/meters",
        r#"{"attach":["m-4"],"detach":["m-2","m-3"]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["attached"], 1);
    assert_eq!(v["detached"], 1);
    assert_eq!(v["meters"], serde_json::json!(["m-1", "m-4"]));
    let audit = f.audit_entries("concentrator.topology");
    assert_eq!(audit.len(), 3);
    assert!(
        audit[2].detail.contains("detach 2 (1 were there)"),
        "{}",
        audit[2].detail
    );

    // Reading: the whole topology, and one concentrator (an auditor may read).
    let (alice, _) = f.login(&f.user(Role::Auditor)).await;
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        "/api/v1/concentrators",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        serde_json::json!([
            {"concentrator_id": "dc-1", "meters": ["m-1", "m-4"]},
            {"concentrator_id": "dc-2", "meters": ["m-3"]},
        ])
    );
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        "/api/v1/concentrators/dc-2/meters",
        None,
    )
    .await;
    assert_eq!(r.json()["meters"], serde_json::json!(["m-3"]));
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "GET",
        "/api/v1/concentrators/dc-9/meters",
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["meters"], serde_json::json!([]));
    // ... but not change it.
    let r = call(
        &f,
        &anon,
        Some(&alice),
        "PUT",
        "/api/v1/concentrators/dc-1/meters",
        Some(r#"{"detach":["m-1"]}"#),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        f.events("access_denied")
            .iter()
            .any(|e| e.event.detail.contains("ManageTopology"))
    );

    // Bad meter ids: 400, and nothing changes (audited as a failure).
    for body in [
        r#"{"attach":["m-5","not a meter"]}"#,
        r#"{"detach":[".hidden"]}"#,
        r#"{"attach":[""]}"#,
    ] {
        let r = put("/api/v1/concentrators/dc-1/meters", body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
    let audit = f.audit_entries("concentrator.topology");
    assert_eq!(audit.len(), 6);
    assert!(audit[3..].iter().all(|e| e.outcome == Outcome::Failure));
    // Nothing to change, a meter both ways, the concentrator itself: 422.
    for body in [
        r#"{}"#,
        r#"{"attach":["m-1"],"detach":["m-1"]}"#,
        r#"{"attach":["dc-1"]}"#,
    ] {
        let r = put("/api/v1/concentrators/dc-1/meters", body).await;
        assert_eq!(r.status, 422, "{body}: {}", r.body);
    }
    // A bad concentrator id is not found; an unknown field is refused.
    let r = put(
        "/api/v1/concentrators/bad%20id/meters",
        r#"{"attach":["m-1"]}"#,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = put("/api/v1/concentrators/dc-1/meters", r#"{"add":["m-1"]}"#).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let dc1 = MeterId::new("dc-1").unwrap();
    assert_eq!(f.store.concentrator_meters(&dc1).unwrap().len(), 2);

    // 10,000 meters in one request are taken; 10,001 are not.
    let many = |n: usize| {
        let ids: Vec<String> = (0..n).map(|i| format!("\"b{i:05}\"")).collect();
        format!(r#"{{"attach":[{}]}}"#, ids.join(","))
    };
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "PUT",
        "/api/v1/concentrators/dc-3/meters",
        Some(&many(10_000)),
    )
    .await;
    assert_eq!(r.status, 200, "{}", &r.body[..r.body.len().min(300)]);
    assert_eq!(r.json()["attached"], 10_000);
    let r = call(
        &f,
        &anon,
        Some(&otto),
        "PUT",
        "/api/v1/concentrators/dc-4/meters",
        Some(&many(10_001)),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["type"], "urn:gridward:problem:too_many_meters");
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_alarm_store_the_routes_say_so() {
    let f = support::start_without_alarms().await;
    let anon = anonymous(&f.pki());
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    for (method, path, body) in [
        ("GET", "/api/v1/alarms", None),
        ("GET", "/api/v1/alarms/1", None),
        ("POST", "/api/v1/alarms/1/ack", None),
        ("POST", "/api/v1/alarms/1/clear", None),
        ("GET", "/api/v1/concentrators", None),
        ("GET", "/api/v1/concentrators/dc-1/meters", None),
        (
            "PUT",
            "/api/v1/concentrators/dc-1/meters",
            Some(r#"{"attach":["m-1"]}"#),
        ),
    ] {
        let r = call(&f, &anon, Some(&otto), method, path, body).await;
        assert_eq!(r.status, 503, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["type"], "urn:gridward:problem:alarms_off");
    }
    // Authorisation still comes first: a consumer is refused, not told about the store.
    let (carol, _) = f.login(&f.user(Role::Consumer)).await;
    let r = call(&f, &anon, Some(&carol), "GET", "/api/v1/alarms", None).await;
    assert_eq!(r.status, 403);
    f.api.shutdown().await;
}
