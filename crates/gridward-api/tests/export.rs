//! Issue 12 §2: `GET /api/v1/me/export`, a consumer's export of their own data over real TLS:
//! only their meters, not pseudonymised, in the formats of `gridward-export`; another
//! consumer's meter is never in it; other roles are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use gridward_access::{NewUser, Role, Secret};
use gridward_core::MeterId;
use support::{Fixture, PASSWORD, User, anonymous, start};

async fn get(f: &Fixture, token: &str, path: &str) -> support::Response {
    let auth = format!("Bearer {token}");
    f.request(
        &anonymous(&f.pki()),
        "GET",
        path,
        &[("authorization", &auth)],
        None,
    )
    .await
    .unwrap()
}

/// A second consumer, bound to `m-2` only.
async fn dora(f: &Fixture) -> String {
    f.access
        .add_user(
            NewUser {
                username: "dora".into(),
                role: Role::Consumer,
                meters: vec![MeterId::new("m-2").unwrap()],
                password: Secret::new(PASSWORD),
            },
            f.now(),
        )
        .unwrap();
    f.login(&User {
        name: "dora".into(),
        totp_secret: None,
    })
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_exports_only_their_own_meters() {
    let f = start().await;
    let (carol, _) = f.login(&f.user(Role::Consumer)).await;

    // Defaults: JSON, hourly, the 31 days up to the current hour. m-1 has 12 readings every
    // 15 minutes from 2026-12-02T08:15Z, register 0.25 kWh per reading.
    let r = get(&f, &carol, "/api/v1/me/export").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers.get("content-type").unwrap().to_str().unwrap(),
        "application/json"
    );
    assert!(
        !r.body.contains("m-2"),
        "another consumer's meter: {}",
        r.body
    );
    let v = r.json();
    let meta = &v["metadata"];
    assert_eq!(meta["pseudonymised"], false, "{meta}");
    assert_eq!(meta["resolution"], "1h");
    assert_eq!(meta["to"], "2026-12-03T08:00:00Z");
    assert_eq!(meta["from"], "2026-11-02T08:00:00Z");
    assert_eq!(meta["meters"], 1);
    assert_eq!(meta["aggregation"], "none");
    let rows = v["rows"].as_array().unwrap();
    let got: Vec<(&str, &str, f64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["meter"].as_str().unwrap(),
                r["bucket_start"].as_str().unwrap(),
                r["kwh"].as_f64().unwrap(),
                r["register_kwh"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("m-1", "2026-12-02T08:00:00Z", 0.5, 0.75),
            ("m-1", "2026-12-02T09:00:00Z", 1.0, 1.75),
            ("m-1", "2026-12-02T10:00:00Z", 1.0, 2.75),
            ("m-1", "2026-12-02T11:00:00Z", 0.25, 3.0),
        ]
    );

    // CSV, quarter hours, a range of one hour: the reading before it is the baseline.
    let r = get(
        &f,
        &carol,
        "/api/v1/me/export?format=csv&resolution=15m&from=2026-12-02T09:00:00Z&to=2026-12-02T10:00:00Z",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers.get("content-type").unwrap().to_str().unwrap(),
        "text/csv; charset=utf-8"
    );
    assert!(
        r.headers
            .get("content-disposition")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("gridward-export.csv")
    );
    let lines: Vec<&str> = r.body.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        vec![
            "meter,bucket_start,kwh,register_kwh",
            "m-1,2026-12-02T09:00:00Z,0.25,1",
            "m-1,2026-12-02T09:15:00Z,0.25,1.25",
            "m-1,2026-12-02T09:30:00Z,0.25,1.5",
            "m-1,2026-12-02T09:45:00Z,0.25,1.75",
        ]
    );
    assert!(r.body.contains("# pseudonymised: no\r\n"), "{}", r.body);

    // The other consumer gets their meter and not carol's.
    let dora = dora(&f).await;
    let r = get(&f, &dora, "/api/v1/me/export?format=csv").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("m-1"), "{}", r.body);
    assert!(
        r.body.contains("\r\nm-2,2026-12-02T08:00:00Z,"),
        "{}",
        r.body
    );
    // And carol's meter stays a 404 for her on the per-meter route.
    let r = get(&f, &dora, "/api/v1/meters/m-1/readings").await;
    assert_eq!(r.status, 404);
    f.api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_exports_are_refused_with_a_reason() {
    let f = start().await;
    let (carol, _) = f.login(&f.user(Role::Consumer)).await;
    for (query, says) in [
        ("resolution=5m", "resolution"),
        ("format=parquet", "format"),
        ("format=xml", "format"),
        (
            "from=2026-12-02T09:10:00Z&to=2026-12-02T10:00:00Z",
            "boundary",
        ),
        ("from=2026-12-02T10:00:00Z&to=2026-12-02T09:00:00Z", "empty"),
        ("from=yesterday", "RFC 3339"),
        ("resolution=15m&from=2020-01-01T00:00:00Z", "buckets"),
        ("meters=m-2", "meters"),
    ] {
        let r = get(&f, &carol, &format!("/api/v1/me/export?{query}")).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.body.contains(says), "{query}: {}", r.body);
        assert!(!r.body.contains("m-2,"), "{query}");
    }
    // Operators have no meters of their own: their exports are pseudonymised, on the CLI.
    let (otto, _) = f.login(&f.user(Role::Operator)).await;
    let r = get(&f, &otto, "/api/v1/me/export").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(!f.events("access_denied").is_empty());
    f.api.shutdown().await;
}
