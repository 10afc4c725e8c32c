//! The API against its own OpenAPI document, checked by an independent tool: the
//! `schemathesis` CLI (PyPI, `.ci/requirements.txt`) generates requests from the committed
//! `docs/openapi.json`, sends them over real TLS (verified against the fixture PKI's CA chain)
//! with an operator's session, and checks every answer: no 5xx, and status code, content type
//! and body as the document says.
//!
//! Deterministic (fixed seed, no example database), bounded (a few examples per operation),
//! loopback only. The downward path is seeded (a command, proposals of a second operator, a
//! firmware image, a campaign, alarms, a concentrator) so that sending, approving and reading
//! reach their 2xx answers.
//! Only `DELETE /api/v1/session` is left out: it would end the operator's
//! session and with it the run. The administrators' routes stay in (an operator gets 403,
//! which the document lists).
//!
//! Without schemathesis the test fails and says how to install it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Output;

use gridward_access::Role;
use gridward_command::{CampaignRequest, IssueRequest, Issued};
use gridward_core::MeterId;
use gridward_core::command::CommandBody;

/// Test cases per operation and phase; enough to hit every documented answer, small enough
/// for well under a minute on two cores.
const MAX_EXAMPLES: &str = "15";
/// The hypothesis seed: the same requests every run.
const SEED: &str = "20261203";
/// The checks. `not_a_server_error` and `response_schema_conformance` are the issue's; the
/// status code and the content type must be documented too.
const CHECKS: &str = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance";

/// Values the generator mixes in, so that most requests reach the fixture's data (meters m-1
/// and m-2 have readings; a command, proposals of another operator, a firmware image, a
/// campaign, alarms and concentrator dc-1 with two meters exist) instead of stopping at a 404 or a 400, and both formats of a readings page
/// are asked for.
fn config(d: &Downward) -> String {
    format!(
        r#"
[dictionaries.commands]
values = ["{command}", "00000000000000000000000000000000"]
[dictionaries.proposals]
values = {proposals:?}
[dictionaries.firmware]
values = [{firmware}, 999]
[dictionaries.campaigns]
values = [{campaign}, 999]
[dictionaries.alarms]
values = {alarms:?}
[dictionaries.concentrators]
values = ["dc-1", "dc-9"]
[dictionaries.meters]
values = ["m-1", "m-2", "m-999"]
[dictionaries.formats]
values = ["json", "csv"]
[dictionaries.limits]
values = [1, 2, 5, 100, 1000]

[parameters]
"path.meter_id" = {{ dictionary = "meters", probability = 0.9 }}
"path.command_id" = {{ dictionary = "commands", probability = 0.9 }}
"path.proposal_id" = {{ dictionary = "proposals", probability = 0.9 }}
"path.firmware_id" = {{ dictionary = "firmware", probability = 0.9 }}
"path.campaign_id" = {{ dictionary = "campaigns", probability = 0.9 }}
"path.alarm_id" = {{ dictionary = "alarms", probability = 0.9 }}
"path.concentrator_id" = {{ dictionary = "concentrators", probability = 0.9 }}
"query.format" = {{ dictionary = "formats", probability = 0.7 }}
"query.limit" = {{ dictionary = "limits", probability = 0.7 }}
"#,
        command = d.command,
        proposals = d.proposals,
        firmware = d.firmware,
        campaign = d.campaign,
        alarms = d.alarms,
    )
}

/// What the downward path holds before the run.
struct Downward {
    command: String,
    proposals: Vec<i64>,
    firmware: i64,
    campaign: i64,
    /// Alarms to read, acknowledge and clear (and 999, which does not exist).
    alarms: Vec<i64>,
}

/// A command, three proposals of the second operator `olga` (so the operator of the run may
/// decide them), a firmware image and a running campaign.
fn downward(f: &support::Fixture) -> Downward {
    let cmds = f.commands();
    let meter = |s: &str| MeterId::new(s).unwrap();
    let issue = |meters: Vec<MeterId>, body| {
        cmds.issue(IssueRequest {
            meters,
            body,
            actor: "olga".into(),
            ttl: None,
            reason: "schemathesis".into(),
        })
        .unwrap()
    };
    let Issued::Queued { ids } = issue(vec![meter("m-1")], CommandBody::ReadNow) else {
        panic!("a read_now is queued")
    };
    let proposals = (0..3)
        .map(|_| {
            let meters = (1..=11).map(|i| meter(&format!("m-{i}"))).collect();
            match issue(meters, CommandBody::Disconnect) {
                Issued::Proposed { proposal_id, .. } => proposal_id,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    let (manifest, image) = support::firmware(&f.manufacturer, 0, 64);
    let firmware = cmds
        .upload_firmware(
            &manifest,
            &image,
            &[f.manufacturer.verifying_key().unwrap()],
            "olga",
        )
        .unwrap();
    let campaign = cmds
        .create_campaign(CampaignRequest {
            firmware_id: firmware,
            meters: vec![meter("m-2")],
            first_stage: None,
            success_threshold: None,
            max_failures: None,
            actor: "olga".into(),
        })
        .unwrap();
    let mut alarms: Vec<i64> = [
        ("tamper", "major", "meter:m-1"),
        ("outage", "critical", "concentrator:dc-1"),
        ("refusal_burst", "major", "source:192.0.2.9"),
    ]
    .iter()
    .map(|(t, s, o)| f.raise(t, s, o))
    .collect();
    alarms.push(999);
    {
        use gridward_store::AlarmStore;
        f.store
            .attach_meters(&meter("dc-1"), &[meter("m-1"), meter("m-2")], f.now())
            .unwrap();
    }
    Downward {
        command: ids[0].to_string(),
        proposals,
        firmware,
        campaign,
        alarms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let st = support::schemathesis();
    let f = support::start().await;
    let (token, _csrf) = f.login(&f.user(Role::Operator)).await;
    let config_text = config(&downward(&f));
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let ca = f.pki().join("ca/chain.pem");
    assert!(ca.exists(), "the fixture PKI has {}", ca.display());
    let work = f.dir.path().join("schemathesis");
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("schemathesis.toml");
    std::fs::write(&config, config_text).unwrap();
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
    assert!(ops["selected"].as_u64().unwrap() >= 37, "{ops}");
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
        "GET /api/v1/commands",
        "GET /api/v1/commands/{command_id}",
        "POST /api/v1/meters/{meter_id}/commands",
        "POST /api/v1/commands",
        "POST /api/v1/proposals/{proposal_id}/approve",
        "GET /api/v1/firmware/{firmware_id}",
        "GET /api/v1/campaigns/{campaign_id}",
        "GET /api/v1/alarms",
        "GET /api/v1/alarms/{alarm_id}",
        "GET /api/v1/concentrators",
        "GET /api/v1/concentrators/{concentrator_id}/meters",
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
