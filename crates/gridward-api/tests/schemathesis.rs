//! The API against its own OpenAPI document, checked by an independent tool: the
//! `schemathesis` CLI (PyPI, `.ci/requirements.txt`) generates requests from the committed
//! `docs/openapi.json`, sends them over real TLS (verified against the fixture PKI's CA chain)
//! with an operator's session, and checks every answer: no 5xx, and status code, content type
//! and body as the document says.
//!
//! Deterministic (fixed seed, no example database), bounded (a few examples per operation),
//! loopback only. Only `DELETE /api/v1/session` is left out: it would end the operator's
//! session and with it the run. The administrators' routes stay in (an operator gets 403,
//! which the document lists).
//!
//! Without schemathesis the test fails and says how to install it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Output;

use gridward_access::Role;

/// Test cases per operation and phase; enough to hit every documented answer, small enough
/// for well under a minute on two cores.
const MAX_EXAMPLES: &str = "15";
/// The hypothesis seed: the same requests every run.
const SEED: &str = "20261203";
/// The checks. `not_a_server_error` and `response_schema_conformance` are the issue's; the
/// status code and the content type must be documented too.
const CHECKS: &str = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance";

/// Values the generator mixes in, so that most requests reach the fixture's data (meters m-1
/// and m-2 have readings) instead of stopping at a 404 or a 400, and both formats of a
/// readings page are asked for.
const CONFIG: &str = r#"
[dictionaries.meters]
values = ["m-1", "m-2", "m-999"]
[dictionaries.formats]
values = ["json", "csv"]
[dictionaries.limits]
values = [1, 2, 5, 100, 1000]

[parameters]
"path.meter_id" = { dictionary = "meters", probability = 0.9 }
"query.format" = { dictionary = "formats", probability = 0.7 }
"query.limit" = { dictionary = "limits", probability = 0.7 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let st = support::schemathesis();
    let f = support::start().await;
    let (token, _csrf) = f.login(&f.user(Role::Operator)).await;
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let ca = f.pki().join("ca/chain.pem");
    assert!(ca.exists(), "the fixture PKI has {}", ca.display());
    let work = f.dir.path().join("schemathesis");
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("schemathesis.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let report = work.join("report.json");

    let mut cmd = st.command();
    cmd.current_dir(&work)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&schema)
        .args(["--url", &f.base])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .arg("--tls-verify")
        .arg(&ca)
        .args(["--checks", CHECKS])
        .args(["--exclude-operation-id", "logout"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", SEED])
        .args(["--generation-database", "none"])
        .args(["--workers", "1"])
        .args(["--request-timeout", "10"])
        .args(["--max-failures", "20"])
        .args(["--no-color", "--output-truncate", "false"])
        .args(["--report", "json", "--report-json-path"])
        .arg(&report)
        .env("NO_COLOR", "1")
        .env("HYPOTHESIS_STORAGE_DIRECTORY", work.join(".hypothesis"));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("running schemathesis");
    let text = transcript(&out);
    eprintln!("{} {}\n{text}", st.version, out.status);
    assert!(
        out.status.success(),
        "schemathesis found answers that break the OpenAPI document ({}):\n{text}",
        out.status
    );
    // It really ran: every selected operation tested, and the readings page answered with
    // data (not only 400s and 404s), so its 200 schema was checked.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("the JSON report"))
            .expect("a JSON report");
    assert_eq!(report["complete"], true, "{text}");
    let ops = &report["operations"];
    assert!(ops["selected"].as_u64().unwrap() >= 19, "{ops}");
    assert_eq!(ops["tested"], ops["selected"], "{ops}");
    assert_eq!(report["test_cases"]["with_failures"], 0, "{report:#}");
    let rates = &report["valid_rates"];
    let accepted = |op: &str| -> u64 {
        ["coverage", "fuzzing"]
            .iter()
            .filter_map(|phase| rates[op][phase]["accepted"].as_u64())
            .sum()
    };
    for op in [
        "GET /api/v1/meters/{meter_id}/readings",
        "GET /api/v1/meters/{meter_id}",
        "GET /api/v1/security-events",
        "GET /api/v1/session",
    ] {
        assert!(accepted(op) > 0, "no 2xx answer for {op}: {rates:#}");
    }
    assert!(
        rates.get("DELETE /api/v1/session").is_none(),
        "logout was excluded: {rates:#}"
    );

    // The session survived the run: nothing logged the operator out.
    let r = f
        .request(
            &support::anonymous(&f.pki()),
            "GET",
            "/api/v1/session",
            &[("authorization", &format!("Bearer {token}"))],
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

fn transcript(out: &Output) -> String {
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
