//! The whole harness against an in-process head-end and sink: every case must pass, the
//! genuine fleet must get through, and the report must say so.
//!
//! `GRIDWARD_ATTACK_ONLY=commands,firmware` runs only those scenarios (while working on them);
//! unset, all run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use gridward_attack::{InProcess, Options, run, scenarios};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_is_stopped_and_leaves_its_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let target = InProcess::start(tmp.path(), 20)
        .await
        .expect("start a head-end and a sink");
    let only: Vec<String> = std::env::var("GRIDWARD_ATTACK_ONLY")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let report = run(
        target.target.clone(),
        &tmp.path().join("attack"),
        &Options {
            only: only.clone(),
            ..Options::default()
        },
        &|name| eprintln!("attack: {name}"),
    )
    .await
    .expect("run the harness");
    target.shutdown().await;
    let table = report.table();
    eprintln!("{table}");
    for c in report.failures() {
        eprintln!("FAILED {} / {}: {}", c.scenario, c.case, c.observed);
    }
    assert!(report.passed(), "failures:\n{table}");
    // Every scenario ran and produced cases.
    for s in scenarios::ALL {
        if !only.is_empty() && !only.iter().any(|o| o == s.name) {
            continue;
        }
        assert!(
            report.checks.iter().any(|c| c.scenario == s.name),
            "scenario {} produced no case",
            s.name
        );
    }
    // Every refusal case names the event it left.
    for c in &report.checks {
        if c.expected.contains("event") && !c.expected.contains("no alarm") {
            assert!(
                c.event_id.is_some() || c.scenario == "replay" && c.case.contains("sink"),
                "{c:?}"
            );
        }
    }
    assert!(
        report.fleet.acked > 0 && report.fleet.refused == 0,
        "{:?}",
        report.fleet
    );
    let json = report.to_json();
    assert_eq!(
        json["checks"].as_array().unwrap().len(),
        report.checks.len()
    );
}
