//! `gridward bench ingest`, tiny and without the Mosquitto baseline: proves that the command
//! creates its PKI, starts the head-end, drives meters from its load-generator child process,
//! measures the verify-only ceiling, and reports (table on stdout, JSON file).

use crate::support::gridward_ok;

#[test]
fn bench_ingest_tiny_without_baseline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let json_path = tmp.path().join("bench.json");
    let work = tmp.path().join("work");
    let out = gridward_ok(&[
        "bench",
        "ingest",
        "--meters",
        "5",
        "--duration",
        "2",
        "--alg",
        "eddsa",
        "--no-baseline",
        "--ceiling-secs",
        "0.5",
        "--dir",
        work.to_str().expect("utf-8 path"),
        "--json",
        json_path.to_str().expect("utf-8 path"),
    ]);
    assert!(out.contains("acknowledged messages/s"), "{out}");
    assert!(out.contains("verify-only ceiling (EdDSA"), "{out}");
    assert!(
        !out.contains("Mosquitto"),
        "no baseline was asked for:\n{out}"
    );

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("the JSON results"))
            .expect("valid JSON");
    let gw = &v["gridward"];
    let acked = gw["client"]["acked_total"].as_u64().expect("acked_total");
    assert!(acked > 0, "no message was acknowledged: {v:#}");
    // Every acknowledged message was accepted and stored: nothing refused, nothing lost.
    assert_eq!(gw["client"]["refused"], 0, "{v:#}");
    assert_eq!(gw["client"]["errors"], 0, "{v:#}");
    assert_eq!(
        gw["extra"]["readings_in_store"].as_u64(),
        Some(acked),
        "{v:#}"
    );
    assert!(gw["server_cpu_s"].as_f64().expect("cpu") > 0.0, "{v:#}");
    assert!(
        gw["server_peak_rss_bytes"].as_u64().expect("rss") > 0,
        "{v:#}"
    );
    assert!(
        v["verify_ceiling"]["per_s"].as_f64().expect("ceiling") > 0.0,
        "{v:#}"
    );
    assert!(v["mosquitto"].is_null(), "{v:#}");

    // A second run in the same work directory reuses its PKI and starts from a fresh database.
    let again = gridward_ok(&[
        "bench",
        "ingest",
        "--meters",
        "2",
        "--duration",
        "1",
        "--alg",
        "eddsa",
        "--no-baseline",
        "--ceiling-secs",
        "0.2",
        "--dir",
        work.to_str().expect("utf-8 path"),
    ]);
    assert!(again.contains("acknowledged messages/s"), "{again}");
}

#[test]
fn bench_refuses_a_foreign_work_directory_and_a_bad_rate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("precious.txt"), "keep me").expect("write");
    let out = crate::support::gridward(&[
        "bench",
        "ingest",
        "--meters",
        "1",
        "--no-baseline",
        "--dir",
        tmp.path().to_str().expect("utf-8 path"),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was not made by `gridward bench`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tmp.path().join("precious.txt").exists());

    let out = crate::support::gridward(&["bench", "ingest", "--rate", "fast", "--no-baseline"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a rate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `gridward bench api` with tiny numbers: the code path runs (store, both APIs, the
/// operator's TOTP login, readings pages and health checks over TLS, logins with production
/// and insecure Argon2id, verification alone) and reports; nothing is asserted about time.
#[test]
fn bench_api_tiny() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let json_path = tmp.path().join("bench-api.json");
    let out = gridward_ok(&[
        "bench",
        "api",
        "--readings",
        "120",
        "--meters",
        "3",
        "--requests",
        "6",
        "--connections",
        "2",
        "--rounds",
        "1",
        "--logins",
        "1",
        "--dir",
        tmp.path().join("work").to_str().expect("utf-8 path"),
        "--json",
        json_path.to_str().expect("utf-8 path"),
    ]);
    assert!(out.contains("readings / healthz"), "{out}");
    assert!(out.contains("login production / baseline"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("the JSON results"))
            .expect("valid JSON");
    assert_eq!(v["readings"]["requests"], 6, "{v:#}");
    assert_eq!(v["healthz"]["requests"], 6, "{v:#}");
    // Three meters of 40 readings: a page of 100 holds all 40 of one meter.
    assert!(
        v["readings"]["bytes_per_response"].as_u64().expect("bytes") > 40 * 50,
        "{v:#}"
    );
    assert_eq!(v["argon2id_owasp"]["m_kib"], 19_456, "{v:#}");
    for key in ["owasp", "insecure_baseline"] {
        assert!(
            v["login_ms"][key].as_f64().expect("login ms") > 0.0,
            "{v:#}"
        );
        assert!(
            v["argon2id_verify_ms"][key].as_f64().expect("verify ms") > 0.0,
            "{v:#}"
        );
    }
}
