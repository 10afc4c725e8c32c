//! The CLI as a user meets it: the README's quick start, help texts, errors.

use std::collections::BTreeMap;

use gridward_core::security::Reason;

use crate::headend::{events_in, line_numbers, numbers, stored_counters_in};
use crate::support::{gridward, gridward_ok};

#[test]
fn pki_quickstart_builds_a_usable_pki() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pki");
    let dir = dir.to_str().expect("utf-8");
    let out = gridward_ok(&["pki", "quickstart", "--dir", dir, "--meters", "5"]);
    assert!(out.contains("5 meters, 1 server, 1 client"), "{out}");
    let list = gridward_ok(&["pki", "list", "--dir", dir]);
    assert_eq!(
        list.lines().filter(|l| l.contains("revoked")).count(),
        1,
        "{list}"
    );
    assert!(
        list.contains("m000005") && list.contains("billing") && list.contains("localhost"),
        "{list}"
    );
    // Running it again must not overwrite the CA.
    let again = gridward(&["pki", "quickstart", "--dir", dir]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("another --dir"));
}

#[test]
fn every_pki_command_has_help() {
    for cmd in [
        "init",
        "issue",
        "sign-csr",
        "revoke",
        "crl",
        "renew",
        "list",
        "log",
        "export",
        "import",
        "quickstart",
    ] {
        let out = gridward_ok(&["pki", cmd, "--help"]);
        assert!(out.contains("Usage: gridward pki"), "{cmd}: {out}");
    }
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope");
    let missing = missing.to_str().expect("utf-8");
    let out = gridward(&["pki", "list", "--dir", missing]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gridward pki init"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = gridward(&["pki", "issue", "meter", "--dir", missing, "--id", "a/b"]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// Issue 17: `config check` accepted a store in a directory that does not exist; `serve` then
/// exited 1 with the cause three times and no key named.
#[test]
fn a_store_in_a_missing_directory_is_refused_by_config_check_and_serve_naming_store_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("gridward.toml");
    let cfg_s = cfg.to_str().expect("utf-8");
    gridward_ok(&["config", "init", "--config", cfg_s]);
    let text = std::fs::read_to_string(&cfg).expect("read");
    let text = text.replace(
        "path = \"gridward.db\"",
        "path = \"no/such/dir/gridward.db\"",
    );
    assert!(
        text.contains("no/such/dir"),
        "the default file names its store path"
    );
    std::fs::write(&cfg, text).expect("write");
    for command in ["config check", "serve"] {
        let mut args: Vec<&str> = command.split(' ').collect();
        args.extend(["--config", cfg_s]);
        let out = gridward(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "gridward {command}: {err}");
        assert!(
            err.contains("store.path")
                && err.contains("does not exist")
                && err.contains("mkdir -p"),
            "gridward {command}: {err}"
        );
        assert_eq!(err.matches("does not exist").count(), 1, "said once: {err}");
    }
    // The error chain says each cause once (a missing file's cause was printed twice).
    let missing = tmp.path().join("missing.toml");
    let out = gridward(&[
        "config",
        "check",
        "--config",
        missing.to_str().expect("utf-8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn config_init_writes_a_valid_file_and_bad_config_exits_2() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("gridward.toml");
    let cfg_s = cfg.to_str().expect("utf-8");
    gridward_ok(&["config", "init", "--config", cfg_s]);
    let check = gridward_ok(&["config", "check", "--config", cfg_s]);
    assert!(check.contains("127.0.0.1:8883"), "{check}");
    // Refuses to overwrite.
    assert!(
        !gridward(&["config", "init", "--config", cfg_s])
            .status
            .success()
    );

    for (text, needle) in [
        ("[mqtt]\nlisten = \"not an address\"\n", "mqtt.listen"),
        ("[mqtt]\nlsten = \"127.0.0.1:1\"\n", "lsten"),
        ("[ingest]\nbatch_size = 0\n", "ingest.batch_size"),
        ("[store\n", "gridward.toml"),
    ] {
        std::fs::write(&cfg, text).expect("write");
        let out = gridward(&["serve", "--config", cfg_s]);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{text:?}: {err}"
        );
    }
    let missing = tmp.path().join("missing.toml");
    let out = gridward(&["serve", "--config", missing.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gridward config init"));
}

/// The numbers of `gridward demo`'s report.
#[derive(Debug, Default)]
struct DemoReport {
    peak_connected: u64,
    sent: u64,
    accepted: u64,
    /// Readings in the store.
    stored: u64,
    /// Meter events stored (0 when the report has no such line).
    meter_events: u64,
    /// Command acknowledgements stored.
    command_acks: u64,
    duplicates: u64,
    refused: u64,
    /// The per-reason lines under "refused": (code, count).
    by_reason: BTreeMap<String, u64>,
    /// The misbehaving devices' lines: (device, count).
    by_device: BTreeMap<String, u64>,
}

impl DemoReport {
    fn parse(out: &str) -> Self {
        let body = &out[out
            .find("== Gridward demo report ==")
            .unwrap_or_else(|| panic!("no report in:\n{out}"))..];
        let field = |label: &str, n: usize| line_numbers(body, label, n, "the report", out);
        let sent = field("readings and events sent", 2);
        let accepted = field("accepted and stored", 2);
        let mut r = Self {
            peak_connected: field("meters connected (peak)", 1)[0],
            sent: sent[0],
            accepted: accepted[0],
            stored: accepted[1],
            meter_events: if body.lines().any(|l| l.starts_with("meter events stored")) {
                field("meter events stored", 1)[0]
            } else {
                0
            },
            command_acks: field("command acknowledgements", 1)[0],
            duplicates: field("duplicates (acknowledged)", 1)[0],
            refused: field("refused", 1)[0],
            ..Self::default()
        };
        let section = |title: &'static str| {
            body.lines()
                .skip_while(move |l| !l.starts_with(title))
                .skip(1)
                .take_while(|l| l.starts_with("  "))
        };
        for l in section("refused") {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 2, "bad reason line {l:?}");
            let n = f[1]
                .parse()
                .unwrap_or_else(|_| panic!("bad count in {l:?}"));
            r.by_reason.insert(f[0].to_owned(), n);
        }
        for l in section("the misbehaving devices") {
            let device = l.split_whitespace().next().unwrap_or_default();
            let after = &l[l.find('→').unwrap_or_else(|| panic!("no count in {l:?}"))..];
            r.by_device.insert(device.to_owned(), numbers(after)[0]);
        }
        r
    }

    fn reason(&self, code: &str) -> u64 {
        self.by_reason.get(code).copied().unwrap_or(0)
    }
}

#[test]
fn demo_runs_and_reports_consistent_numbers() {
    const METERS: usize = 10;
    let tmp = tempfile::tempdir().expect("tempdir");
    // A relative --dir, as in the README's `cargo run --release -- demo` (regression: the
    // configuration resolved it twice, gridward-demo/gridward-demo/pki).
    // 4 s: every misbehaving device misbehaves after its third reading (one a second), with a
    // second to spare.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_gridward"))
        .args([
            "demo",
            "--dir",
            "demo",
            "--meters",
            &METERS.to_string(),
            "--duration",
            "4",
        ])
        .current_dir(tmp.path())
        .output()
        .expect("run gridward demo");
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    let dir = tmp.path().join("demo");
    let dir = dir.to_str().expect("utf-8");
    assert!(
        run.status.success(),
        "gridward demo failed ({}):\n{out}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    let r = DemoReport::parse(&out);
    let ctx = format!("{r:#?}\n{out}");

    // The genuine meters, the feeder's four (issue 11: they lose power for a while), the
    // three misbehaving devices that can connect (not the revoked one) and the concentrator.
    let meters = METERS as u64;
    assert!(
        (meters..=meters + 4 + 3 + 1).contains(&r.peak_connected),
        "peak connections: {ctx}"
    );
    assert!(r.accepted > 0, "nothing accepted: {ctx}");
    // Everything accepted is stored: a reading, a meter event or a command acknowledgement
    // (disconnect, reconnect, the forged command's refusal, five firmware installs).
    assert_eq!(
        r.accepted,
        r.stored + r.meter_events + r.command_acks,
        "accepted vs stored readings, meter events and acknowledgements: {ctx}"
    );
    assert_eq!(r.command_acks, 8, "the demo's commands: {ctx}");
    assert_eq!(
        r.refused,
        r.by_reason.values().sum::<u64>(),
        "refused vs the sum of its reasons: {ctx}"
    );
    for code in r.by_reason.keys() {
        assert!(
            Reason::from_code(code).is_some(),
            "{code:?} is not a reason code: {ctx}"
        );
    }
    // Each misbehaving device shows up, non-zero, under its reason, and causes nothing else.
    for (device, code) in [
        ("bad-replay", "replay"),
        ("bad-tamper", "bad_signature"),
        ("bad-revoked", "certificate_revoked"),
    ] {
        assert!(r.reason(code) > 0, "no {code} refusal: {ctx}");
        assert_eq!(
            r.by_device.get(device),
            Some(&r.reason(code)),
            "{device}'s line vs the {code} count: {ctx}"
        );
    }
    // The forged command, refused by the meter, is the one other refusal.
    assert_eq!(r.reason("command_refused"), 1, "the forged command: {ctx}");
    assert_eq!(
        r.by_reason.len(),
        4,
        "refusals other than the misbehaving devices' and the forged command: {ctx}"
    );
    assert!(
        r.duplicates > 0,
        "the retrying device got no duplicate: {ctx}"
    );
    assert_eq!(
        r.by_device.get("retrying"),
        Some(&r.duplicates),
        "retrying's line vs duplicates: {ctx}"
    );
    // Every publish got at most one verdict (refused handshakes are not publishes, nor is the
    // meter's refusal of the forged command, which arrived as an accepted acknowledgement); the
    // ones unacknowledged when the fleet stopped got none. The report's "sent" counts readings
    // and events, not acknowledgements.
    let refused_publishes =
        r.refused - r.reason("certificate_revoked") - r.reason("command_refused");
    assert!(
        r.sent >= (r.accepted - r.command_acks) + r.duplicates + refused_publishes,
        "more verdicts than publishes: {ctx}"
    );

    // The database agrees: the same security events, each refused message naming its device
    // (a refused handshake proves no identity, so it names none) ...
    let db = format!("{dir}/gridward.db");
    let events = events_in(&db, &[]);
    // The tour of the API (issue 9) leaves its refusals too: a consumer asking for another
    // meter (404) and callers beyond their role (403). They are not ingest refusals, so the
    // report's table does not count them.
    let (api_events, events): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|e| e.reason.starts_with("access_"));
    let api_reasons: Vec<&str> = api_events.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        api_reasons.contains(&"access_probe"),
        "{api_reasons:?}\n{ctx}"
    );
    assert!(
        api_reasons.contains(&"access_denied"),
        "{api_reasons:?}\n{ctx}"
    );
    for (line, status) in [
        ("/api/v1/meters/m000001/readings?limit=3", "# 200"),
        ("/api/v1/meters/m000002/readings", "# 404"),
        ("/api/v1/audit?action=login.&limit=5", "# 200"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(line) && l.contains(status) && l.contains("curl")),
            "the demo's API tour shows {line} {status}: {out}"
        );
    }
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    for e in &events {
        *counted.entry(e.reason.clone()).or_default() += 1;
        let meter = match e.reason.as_str() {
            "replay" => "bad-replay",
            "bad_signature" => "bad-tamper",
            // The meter the forged command was delivered to, which refused it.
            "command_refused" => "m000001",
            _ => "-",
        };
        assert_eq!(e.meter, meter, "{e:?}");
    }
    assert_eq!(
        counted, r.by_reason,
        "events in the database vs the report: {events:#?}\n{ctx}"
    );
    // ... and the stored readings: as many as reported, none of the revoked device, no counter
    // twice (the retrying device's resends were acknowledged as duplicates, not stored).
    let mut stored = 0;
    let ids = (1..=METERS)
        .map(|i| format!("m{i:06}"))
        .chain(["bad-replay", "bad-tamper", "bad-revoked", "retrying"].map(String::from))
        .chain((1..=4).map(|i| format!("north-{i:06}")))
        .chain((1..=3).map(|i| format!("plc-{i:06}")));
    for id in ids {
        let mut counters = stored_counters_in(&db, &id);
        let n = counters.len();
        counters.sort_unstable();
        counters.dedup();
        assert_eq!(counters.len(), n, "{id}: a counter stored twice");
        if id == "bad-revoked" {
            assert_eq!(n, 0, "the revoked device has stored readings");
        }
        stored += n as u64;
    }
    assert_eq!(
        stored, r.stored,
        "readings in the database vs the report: {ctx}"
    );

    let readings = gridward_ok(&[
        "readings", "--db", &db, "--meter", "m000001", "--format", "json",
    ]);
    assert!(
        readings.lines().count() >= 1 && readings.contains("\"MeterID\":\"m000001\""),
        "{readings}"
    );
    // The commands the report shows work from anywhere: its paths are absolute.
    assert!(out.contains(&format!("--db {db}")), "{out}");

    // Issue 11: the detectors' alarms, listed from the store (type, severity, originator,
    // count, state), the opened terminal cover among them ...
    let body = &out[out.find("== Gridward demo report ==").unwrap_or(0)..];
    let alarms: Vec<Vec<&str>> = body
        .lines()
        .skip_while(|l| !l.starts_with("Alarms"))
        .skip(2)
        .take_while(|l| l.starts_with("  ") && !l.trim_start().starts_with(char::is_numeric))
        .map(|l| l.split_whitespace().collect())
        .collect();
    for a in &alarms {
        assert_eq!(a.len(), 5, "bad alarm line {a:?}: {ctx}");
        assert!(
            ["active_unacknowledged", "active_acknowledged", "cleared"].contains(&a[4]),
            "bad state in {a:?}: {ctx}"
        );
        assert!(
            a[3].parse::<u64>().is_ok_and(|n| n >= 1),
            "bad count: {a:?}"
        );
    }
    assert!(
        alarms
            .iter()
            .any(|a| a[0] == "tamper" && a[2] == "meter:m000002"),
        "no tamper alarm for m000002's terminal cover: {ctx}"
    );
    let total = body
        .lines()
        .find(|l| l.trim_start().ends_with(" alarms") && l.starts_with("  "))
        .map(numbers)
        .unwrap_or_else(|| panic!("no alarm count: {ctx}"));
    assert_eq!(total, vec![alarms.len() as u64], "alarm count line: {ctx}");
    // ... the same as `gridward alarms` shows with the demo's configuration ...
    let toml = format!("{dir}/gridward.toml");
    let json = gridward_ok(&["alarms", "--config", &toml, "--json"]);
    assert_eq!(json.lines().count(), alarms.len(), "{json}\n{ctx}");
    assert!(json.contains("meter:m000002"), "{json}");
    // ... and the concentrator's PLC meters' readings, stored under their own ids.
    let c = line_numbers(body, "concentrator dc-1:", 4, "the report", &out);
    assert_eq!(c[0], 3, "PLC meters: {ctx}");
    assert!(c[1] > 0 && c[3] > 0, "nothing relayed or stored: {ctx}");
    let plc: u64 = (1..=3)
        .map(|i| stored_counters_in(&db, &format!("plc-{i:06}")).len() as u64)
        .sum();
    assert_eq!(
        plc, c[3],
        "PLC readings in the database vs the report: {ctx}"
    );

    // A second run clears the first one's directory (it carries the demo's marker).
    gridward_ok(&["demo", "--dir", dir, "--meters", "2", "--duration", "1"]);
}

/// Issue 9: users and the audit log from the command line: a user with a second factor, a
/// weak password refused, and `audit verify` catching an entry edited in the SQLite file.
#[test]
fn users_and_the_audit_log_from_the_command_line() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = tmp.path().join("gridward.toml");
    let cfg_s = cfg.to_str().expect("utf-8");
    gridward_ok(&["config", "init", "--config", cfg_s]);
    let with_password = |args: &[&str], password: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gridward"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run gridward");
        writeln!(child.stdin.take().expect("stdin"), "{password}").expect("write");
        child.wait_with_output().expect("wait")
    };
    let out = with_password(
        &[
            "user", "add", "otto", "--role", "operator", "--config", cfg_s,
        ],
        "correct horse battery staple 42",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("otpauth://totp/Gridward:otto?"), "{stdout}");
    assert!(stdout.contains("Recovery codes"), "{stdout}");
    assert!(
        stdout.contains('█') || stdout.contains('▀') || stdout.contains('▄'),
        "a QR code: {stdout}"
    );

    let out = with_password(
        &[
            "user", "add", "eve", "--role", "consumer", "--meter", "m000001", "--config", cfg_s,
        ],
        "password1234",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a common password was accepted");
    assert!(
        err.contains("password") && !err.contains("panicked"),
        "{err}"
    );

    let list = gridward_ok(&["user", "list", "--config", cfg_s]);
    assert!(
        list.contains("otto") && list.contains("operator") && !list.contains("eve"),
        "{list}"
    );

    gridward_ok(&["audit", "checkpoint", "--sign", "--config", cfg_s]);
    let ok = gridward_ok(&["audit", "verify", "--config", cfg_s]);
    assert!(ok.starts_with("ok"), "{ok}");
    let shown = gridward_ok(&["audit", "show", "--action", "user.", "--config", cfg_s]);
    assert!(
        shown.contains("user.add") && shown.contains("otto"),
        "{shown}"
    );
    assert!(
        shown.contains("failure"),
        "the refused user is an entry too: {shown}"
    );
    let vkey = gridward_ok(&["audit", "key", "--config", cfg_s]);
    assert!(vkey.starts_with("gridward.local/audit+"), "{vkey}");

    // Someone edits the first entry in the database file.
    let db = rusqlite::Connection::open(tmp.path().join("audit.db")).expect("open audit.db");
    db.execute_batch(
        "DROP TRIGGER entries_no_update; UPDATE entries SET target = 'mallory' WHERE seq = 1;",
    )
    .expect("tamper");
    drop(db);
    let out = gridward(&[
        "audit",
        "verify",
        "--verifier",
        vkey.trim(),
        "--config",
        cfg_s,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("TAMPERED") && err.contains("entry 1"), "{err}");
}
