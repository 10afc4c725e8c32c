//! Alarms and the concentrator topology from the command line beside a running `gridward serve`:
//! a meter's signed terminal-cover event sent with mosquitto_pub becomes a tamper alarm that
//! `gridward alarms` lists, `ack` acknowledges and `clear` clears, each an audit entry; bad ids
//! get clear errors; `gridward concentrator attach|list|detach` changes what a concentrator may
//! relay for, audited.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::headend::{
    Headend, MOSQUITTO_HINT, MeterFiles, issue_meter, new_pki, run_with_timeout, show, sign,
    wait_for,
};
use crate::support::{gridward, gridward_ok};

/// `gridward alarms --config CFG ARGS --json`, one object per line.
fn alarms_json(config: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["alarms", "--config", config, "--json"];
    all.extend(args);
    gridward_ok(&all)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn a_tamper_alarm_is_listed_acknowledged_and_cleared_from_the_cli_and_audited() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    issue_meter(&pki, "t-1");
    let h = Headend::start(tmp.path(), &pki, &[]);
    let config = h.config.to_str().expect("utf-8").to_owned();
    let m = MeterFiles::new(&pki, "t-1");

    let ts = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 ns")
        .format(&Rfc3339)
        .expect("RFC 3339");
    let doc =
        format!(r#"{{"MeterID":"t-1","Timestamp":"{ts}","EventType":"TerminalCoverOpened"}}"#);
    let file = tmp.path().join("cover.cose");
    sign(&m.key, "t-1", 1, Some("meters/t-1/events"), &doc, &file);
    let out = run_with_timeout(
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &h.port.to_string()])
            .args(["--cafile", &pki.join("ca/root.crt.pem").to_string_lossy()])
            .args(["--cert", &m.chain, "--key", &m.key, "-i", "t-1", "-d"])
            .args(["-t", "meters/t-1/events", "-q", "1", "-f"])
            .arg(&file),
        Duration::from_secs(30),
        MOSQUITTO_HINT,
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("PUBACK"),
        "the event was not acknowledged:\n{}",
        show(&out)
    );

    let alarm = wait_for(
        Duration::from_secs(30),
        "a tamper alarm for meter t-1",
        || {
            alarms_json(&config, &["--active", "--type", "tamper"])
                .into_iter()
                .find(|a| a["originator"] == "meter:t-1")
        },
        || gridward_ok(&["alarms", "--config", &config]),
    );
    assert_eq!(alarm["state"], "active_unacknowledged", "{alarm}");
    assert_eq!(alarm["severity"], "major", "{alarm}");
    assert_eq!(alarm["count"], 1, "{alarm}");
    let id = alarm["id"].as_i64().expect("an id").to_string();
    let table = gridward_ok(&["alarms", "--config", &config, "--active"]);
    assert!(
        table.contains("tamper") && table.contains("meter:t-1"),
        "{table}"
    );

    gridward_ok(&["alarms", "--config", &config, "ack", &id]);
    let shown: Value = serde_json::from_str(&gridward_ok(&[
        "alarms", "--config", &config, "show", &id, "--json",
    ]))
    .expect("show --json prints JSON");
    assert_eq!(shown["state"], "active_acknowledged", "{shown}");
    let by = shown["acknowledged"]["by"].as_str().unwrap_or_default();
    assert!(by.starts_with("user:cli:"), "{shown}");
    assert!(
        !shown["evidence"].as_array().is_none_or(Vec::is_empty),
        "the alarm carries no evidence: {shown}"
    );

    gridward_ok(&[
        "alarms",
        "--config",
        &config,
        "clear",
        &id,
        "--reason",
        "seal replaced on site",
    ]);
    let shown: Value = serde_json::from_str(&gridward_ok(&[
        "alarms", "--config", &config, "show", &id, "--json",
    ]))
    .expect("show --json prints JSON");
    assert_eq!(shown["state"], "cleared", "{shown}");
    assert!(
        alarms_json(&config, &["--active"]).is_empty(),
        "an alarm is still active after clear"
    );

    // A cleared alarm is final, and an unknown id or a bad argument is a clear error.
    for (args, says) in [
        (vec!["ack", id.as_str()], "cleared"),
        (vec!["show", "999999"], "999999"),
        (vec!["ack", "x"], "invalid"),
        (vec!["--severity", "loud"], "loud"),
    ] {
        let mut all = vec!["alarms", "--config", config.as_str()];
        all.extend(&args);
        let out = gridward(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says) && !err.contains("panicked"),
            "gridward alarms {args:?}:\n{}",
            show(&out)
        );
    }

    let audit = gridward_ok(&["audit", "show", "--action", "alarm.", "--config", &config]);
    for action in ["alarm.raise", "alarm.acknowledge", "alarm.clear"] {
        assert!(
            audit.contains(action),
            "no {action} in the audit log:\n{audit}"
        );
    }
    assert!(audit.contains("seal replaced on site"), "{audit}");
}

#[test]
fn the_concentrator_topology_is_changed_from_the_cli_and_audited() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    let h = Headend::start(tmp.path(), &pki, &[]);
    let config = h.config.to_str().expect("utf-8").to_owned();
    let cfg = ["concentrator", "--config", config.as_str()];
    let run = |args: &[&str]| {
        let mut all = cfg.to_vec();
        all.extend(args);
        gridward_ok(&all)
    };

    run(&["attach", "dc-1", "m1", "m2", "m3"]);
    run(&["attach", "dc-2", "m3"]);
    run(&["detach", "dc-1", "m2"]);
    let listed: Vec<Value> = run(&["list", "--json"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let meters_of = |c: &str| -> Vec<String> {
        listed
            .iter()
            .find(|v| v["concentrator_id"] == c)
            .and_then(|v| v["meters"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(meters_of("dc-1"), ["m1"], "{listed:?}");
    assert_eq!(meters_of("dc-2"), ["m3"], "m3 moved to dc-2: {listed:?}");

    for args in [
        vec!["attach", "dc-1", "dc-1"],
        vec!["attach", "bad id!", "m1"],
        vec!["attach", "dc-1"],
    ] {
        let mut all = cfg.to_vec();
        all.extend(&args);
        let out = gridward(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && !err.trim().is_empty() && !err.contains("panicked"),
            "gridward concentrator {args:?}:\n{}",
            show(&out)
        );
    }
    let audit = gridward_ok(&[
        "audit",
        "show",
        "--action",
        "concentrator.",
        "--config",
        &config,
    ]);
    assert!(audit.contains("dc-1") && audit.contains("dc-2"), "{audit}");
}

/// `gridward meter run --brute-force 127.0.0.9`: a device without a certificate tries twelve
/// connections from 127.0.0.9 while two genuine meters send from 127.0.0.1. Every attempt is
/// refused, the head-end bans the source (`source_banned`) and raises a `refusal_burst` alarm on
/// `source:127.0.0.9`; the genuine meters' readings all get through, and the fleet's ground
/// truth and summary name the source.
#[test]
fn a_brute_forcing_source_of_the_simulator_is_refused_banned_and_alarmed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    issue_meter(&pki, "bf000001");
    issue_meter(&pki, "bf000002");
    let h = Headend::start(tmp.path(), &pki, &[]);
    let config = h.config.to_str().expect("utf-8").to_owned();
    let truth = tmp.path().join("truth.jsonl");
    let port = h.port.to_string();
    let fleet = crate::headend::FleetProcess::start(
        tmp.path(),
        &[
            "--dir",
            pki.to_str().expect("utf-8"),
            "--port",
            &port,
            "--prefix",
            "bf",
            "--interval",
            "1",
            "--duration",
            "12",
            "--brute-force",
            "127.0.0.9@1",
            "--brute-force-attempts",
            "12",
            "--brute-force-interval",
            "0.2",
            "--ground-truth",
            truth.to_str().expect("utf-8"),
        ],
    );
    let summary = fleet.wait(Duration::from_secs(60));
    assert!(
        summary.acked > 0 && summary.refused == 0 && summary.unacked == 0,
        "the genuine meters did not all get through:\n{}",
        summary.text
    );
    assert!(
        summary
            .text
            .contains("brute force       127.0.0.9: 12 connections tried, 0 accepted"),
        "{}",
        summary.text
    );
    let truth = std::fs::read_to_string(&truth).expect("the ground truth");
    let line: Value = truth
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON"))
        .find(|v| v["kind"] == "brute_force")
        .unwrap_or_else(|| panic!("no brute_force ground truth:\n{truth}"));
    assert_eq!(line["source"], "127.0.0.9", "{line}");
    assert_eq!(line["attempts"], 12, "{line}");

    let alarm = wait_for(
        Duration::from_secs(30),
        "a refusal_burst alarm on source:127.0.0.9",
        || {
            alarms_json(&config, &["--active", "--type", "refusal_burst"])
                .into_iter()
                .find(|a| a["originator"] == "source:127.0.0.9")
        },
        || gridward_ok(&["alarms", "--config", &config]),
    );
    assert!(
        alarm["summary"].as_str().is_some_and(|s| !s.is_empty()),
        "{alarm}"
    );
    let events = h.events();
    assert!(
        events
            .iter()
            .any(|e| e.reason == "source_banned" && e.source.starts_with("127.0.0.9")),
        "no source_banned event for 127.0.0.9: {:?}",
        crate::headend::reasons(&events)
    );
    assert!(
        events
            .iter()
            .any(|e| e.reason == "certificate_missing" && e.source.starts_with("127.0.0.9")),
        "{:?}",
        crate::headend::reasons(&events)
    );
    // Nothing about the genuine meters' source.
    assert!(
        alarms_json(&config, &["--active"])
            .iter()
            .all(|a| a["originator"] != "source:127.0.0.1"),
        "{:?}",
        alarms_json(&config, &["--active"])
    );
}
