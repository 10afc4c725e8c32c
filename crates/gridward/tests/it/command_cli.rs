//! `gridward command ...`: signed commands from the command line, queued in the store of a
//! configuration; end to end through a running `gridward serve` and `gridward meter run`; and a
//! small `gridward bench commands`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::headend::{FleetProcess, Headend, issue_meter, new_pki, show};
use crate::support::gridward_ok;

/// The OS user the tests run the CLI as: the audit actor is `cli:` + this.
const USER: &str = "it-tester";

/// Runs `gridward ARGS` as [`USER`].
fn cli<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gridward"))
        .args(args)
        .env("USER", USER)
        .output()
        .expect("run the gridward binary")
}

fn cli_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = cli(args);
    assert!(out.status.success(), "gridward {args:?}:\n{}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `gridward ARGS` must fail with exit code 1 (an error, not a panic) and `needle` in stderr.
fn cli_fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needle: &str) -> String {
    let out = cli(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "gridward {args:?} should fail cleanly:\n{}",
        show(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A work directory with a PKI (server `localhost`, meter `k-1`, optionally the command signer
/// `headend` issued through the binary) and a configuration from `gridward config init`.
struct Setup {
    /// Removed when the test ends.
    _tmp: tempfile::TempDir,
    config: PathBuf,
    db: PathBuf,
}

impl Setup {
    fn new(signer: bool, edits: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = tmp.path().join("pki");
        new_pki(&pki, "Gridward");
        issue_meter(&pki, "k-1");
        if signer {
            let out = gridward_ok(&[
                "pki",
                "issue",
                "command-signer",
                "--dir",
                pki.to_str().expect("utf-8"),
                "headend",
            ]);
            assert!(out.contains("command-signer"), "{out}");
        }
        let config = tmp.path().join("gridward.toml");
        let db = tmp.path().join("gridward.db");
        gridward_ok(&[
            "config",
            "init",
            "--config",
            config.to_str().expect("utf-8"),
        ]);
        let mut text = std::fs::read_to_string(&config).expect("read the config");
        let pki_line = format!("dir = {:?}", pki.to_str().expect("utf-8"));
        let db_line = format!("path = {:?}", db.to_str().expect("utf-8"));
        let mut all = vec![
            ("dir = \"pki\"", pki_line.as_str()),
            ("path = \"gridward.db\"", db_line.as_str()),
        ];
        all.extend_from_slice(edits);
        for (from, to) in all {
            assert!(text.contains(from), "no line {from:?} in:\n{text}");
            text = text.replacen(from, to, 1);
        }
        std::fs::write(&config, text).expect("write the config");
        Self {
            _tmp: tmp,
            config,
            db,
        }
    }

    /// Creates the database as `gridward serve` does when it starts.
    fn create_db(&self) {
        gridward_store::SqliteStore::open(
            &self.db,
            gridward_store::KeySource::file(self.db.with_extension("key")),
        )
        .expect("create the database");
    }

    fn c(&self) -> &str {
        self.config.to_str().expect("utf-8")
    }
}

/// The 32-hex-digit command ids in `stdout`.
fn ids(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.len() == 32 && l.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn command_send_queues_and_list_and_show_report_it_with_the_cli_actor() {
    let s = Setup::new(true, &[]);
    s.create_db();
    let out = cli(&[
        "command",
        "send",
        "--config",
        s.c(),
        "--meter",
        "k-1",
        "set-tariff",
        "--tariff",
        "night",
        "--reason",
        "it test",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let [id] = &ids(&stdout)[..] else {
        panic!("one command id expected:\n{}", show(&out))
    };
    assert!(
        stderr.contains("will be sent when the meter is connected"),
        "{stderr}"
    );
    assert!(stderr.contains("counter 1"), "{stderr}");

    // list: text and JSON.
    let list = cli_ok(&["command", "list", "--config", s.c()]);
    let row = list
        .lines()
        .find(|l| l.starts_with(id.as_str()))
        .unwrap_or_else(|| panic!("{id} not listed:\n{list}"));
    for word in ["k-1", "set_tariff", "queued", &format!("cli:{USER}")] {
        assert!(row.contains(word), "{word:?} not in {row:?}");
    }
    let json = cli_ok(&[
        "command",
        "list",
        "--config",
        s.c(),
        "--meter",
        "k-1",
        "--status",
        "queued",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["issued_by"], format!("cli:{USER}"));
    assert_eq!(v["status"], "queued");
    assert_eq!(v["args"]["tariff"], "night", "{v}");
    assert_eq!(v["attempts"], 0);
    assert_eq!(v["counter"], 1);
    // Filters: nothing acknowledged yet, nothing for another meter.
    let none = cli_ok(&[
        "command",
        "list",
        "--config",
        s.c(),
        "--status",
        "acknowledged",
        "--format",
        "json",
    ]);
    assert!(none.trim().is_empty(), "{none}");

    // show: every field, and the envelope's digest.
    let shown = cli_ok(&["command", "show", "--config", s.c(), id]);
    for needle in [
        "status         queued",
        &format!("issued by      cli:{USER}"),
        "counter        1",
        "attempts       0",
        "kind           set_tariff",
        "SHA-256 ",
    ] {
        assert!(shown.contains(needle), "{needle:?} not in:\n{shown}");
    }
    let j: serde_json::Value = serde_json::from_str(
        cli_ok(&["command", "show", "--config", s.c(), id, "--format", "json"]).trim(),
    )
    .expect("JSON");
    let digest = j["envelope_sha256"].as_str().expect("digest");
    assert_eq!(digest.len(), 64, "{j}");
    assert!(shown.contains(digest), "{shown}");

    // A second command to the same meter gets the next counter.
    let again = cli_ok(&[
        "command",
        "send",
        "--config",
        s.c(),
        "--meter",
        "k-1",
        "read-now",
    ]);
    let [id2] = &ids(&again)[..] else {
        panic!("{again}")
    };
    let j2: serde_json::Value = serde_json::from_str(
        cli_ok(&[
            "command",
            "show",
            "--config",
            s.c(),
            id2,
            "--format",
            "json",
        ])
        .trim(),
    )
    .expect("JSON");
    assert_eq!(j2["counter"], 2, "{j2}");

    // The audit log names the command-line actor.
    let audit = gridward_ok(&[
        "audit",
        "show",
        "--config",
        s.c(),
        "--action",
        "command.issue",
        "--json",
    ]);
    let entries: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(entries.len(), 2, "{audit}");
    assert!(
        entries
            .iter()
            .all(|e| e["actor"] == format!("user:cli:{USER}") && e["outcome"] == "success"),
        "{audit}"
    );
    assert!(audit.contains(id.as_str()), "{audit}");

    // No proposals (these kinds and counts never need four eyes).
    let p = cli(&[
        "command",
        "proposals",
        "--config",
        s.c(),
        "--status",
        "pending",
    ]);
    assert!(p.status.success(), "{}", show(&p));
    assert!(String::from_utf8_lossy(&p.stderr).contains("0 proposal(s)"));
    assert!(String::from_utf8_lossy(&p.stderr).contains("HTTPS API"));
}

#[test]
fn command_send_refuses_bad_input_cleanly() {
    let s = Setup::new(true, &[]);
    s.create_db();
    let c = s.c();
    let send = |extra: &[&'static str]| -> Vec<String> {
        ["command", "send", "--config", c]
            .iter()
            .chain(extra)
            .map(|a| (*a).to_owned())
            .collect()
    };
    cli_fails(
        &send(&["--meter", "not a meter!", "read-now"]),
        "is not a meter id",
    );
    cli_fails(
        &send(&["--meter", "k-1", "read-now", "--seconds", "60"]),
        "--seconds goes with set-reporting-interval only",
    );
    cli_fails(
        &send(&["--meter", "k-1", "set-reporting-interval"]),
        "needs --seconds",
    );
    cli_fails(
        &send(&["--meter", "k-1", "set-reporting-interval", "--seconds", "0"]),
        "invalid arguments",
    );
    cli_fails(
        &send(&["--meter", "k-1", "--meter", "k-1", "read-now"]),
        "listed twice",
    );
    cli_fails(
        &send(&["--meter", "k-1", "read-now", "--ttl", "99999999"]),
        "lifetime",
    );
    // A mass disconnect needs four eyes: the command line refuses it and says where to go.
    let many: Vec<String> = (0..11).map(|i| format!("k-{i}")).collect();
    let mut args = send(&[]);
    for m in &many {
        args.extend(["--meter".to_owned(), m.clone()]);
    }
    args.push("disconnect".to_owned());
    cli_fails(&args, "four eyes");
    // clap refuses an unknown kind (firmware goes through campaigns) and status.
    let out = cli(&send(&["--meter", "k-1", "firmware-update"]));
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let out = cli(&["command", "list", "--config", s.c(), "--status", "lost"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queued, sent, acknowledged"));
    cli_fails(
        &["command", "show", "--config", s.c(), "xyz"],
        "not 32 hex digits",
    );
    cli_fails(
        &["command", "show", "--config", s.c(), &"ab".repeat(16)],
        "no command",
    );
    // Nothing was queued by any of these.
    let list = cli_ok(&["command", "list", "--config", s.c(), "--format", "json"]);
    assert!(list.trim().is_empty(), "{list}");
}

#[test]
fn command_send_without_a_signer_says_how_to_issue_one() {
    let s = Setup::new(false, &[]);
    s.create_db();
    let err = cli_fails(
        &[
            "command",
            "send",
            "--config",
            s.c(),
            "--meter",
            "k-1",
            "read-now",
        ],
        "gridward pki issue command-signer",
    );
    assert!(err.contains("headend"), "{err}");

    // Commands switched off in the configuration.
    let off = Setup::new(true, &[("signer = \"headend\"", "signer = \"off\"")]);
    off.create_db();
    cli_fails(
        &[
            "command",
            "send",
            "--config",
            off.c(),
            "--meter",
            "k-1",
            "read-now",
        ],
        "commands are off",
    );

    // A configuration whose database does not exist yet (no head-end ran with it).
    let nodb = Setup::new(true, &[]);
    cli_fails(
        &[
            "command",
            "send",
            "--config",
            nodb.c(),
            "--meter",
            "k-1",
            "read-now",
        ],
        "no database at",
    );
    cli_fails(&["command", "list", "--config", nodb.c()], "no database at");
    assert!(!nodb.db.exists(), "no empty database was created");

    // A database file that is not one.
    let bad = Setup::new(true, &[]);
    std::fs::write(&bad.db, b"this is not an SQLite database, not at all").expect("write");
    cli_fails(
        &[
            "command",
            "send",
            "--config",
            bad.c(),
            "--meter",
            "k-1",
            "read-now",
        ],
        "opening the database",
    );
}

#[test]
fn command_sent_from_the_cli_is_executed_by_a_meter_run_fleet_and_acknowledged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    issue_meter(&pki, "k-1");
    gridward_ok(&[
        "pki",
        "issue",
        "command-signer",
        "--dir",
        pki.to_str().expect("utf-8"),
        "headend",
    ]);
    let h = Headend::start(tmp.path(), &pki, &[]);
    assert!(h.log().contains("commands on"), "{}", h.log());
    let port = h.port.to_string();
    let fleet = FleetProcess::start(
        tmp.path(),
        &[
            "--dir",
            pki.to_str().expect("utf-8"),
            "--port",
            &port,
            "--prefix",
            "k-",
            "--interval",
            "3600",
            "--duration",
            "60",
            "--drain",
            "1",
        ],
    );
    crate::headend::wait_for(
        Duration::from_secs(30),
        "the meter to connect",
        || h.is_connected("k-1").then_some(()),
        || h.log(),
    );
    let out = cli(&[
        "command",
        "send",
        "--config",
        h.config.to_str().expect("utf-8"),
        "--meter",
        "k-1",
        "set-reporting-interval",
        "--seconds",
        "900",
        "--wait",
        "45",
    ]);
    assert!(
        out.status.success(),
        "{}\nserver log:\n{}",
        show(&out),
        h.log()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let [id] = &ids(&stdout)[..] else {
        panic!("{stdout}")
    };
    assert!(
        stdout.contains(&format!("{id}: acknowledged: meter k-1 executed it")),
        "{stdout}"
    );
    let j: serde_json::Value = serde_json::from_str(
        cli_ok(&[
            "command",
            "show",
            "--config",
            h.config.to_str().expect("utf-8"),
            id,
            "--format",
            "json",
        ])
        .trim(),
    )
    .expect("JSON");
    assert_eq!(j["status"], "acknowledged", "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    assert!(j["ack_message_id"].is_i64(), "{j}");
    let summary = fleet.interrupt(Duration::from_secs(30));
    assert!(
        summary.text.contains(
            "commands          1 received, 1 executed, 0 refused, 1 acknowledgements signed"
        ),
        "{}",
        summary.text
    );
}

#[test]
fn bench_commands_small_run_acknowledges_every_command() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let json_path = tmp.path().join("commands.json");
    let out = gridward_ok(&[
        "bench",
        "commands",
        "--meters",
        "20",
        "--commands-per-meter",
        "2",
        "--batch",
        "7",
        "--dir",
        tmp.path().join("work").to_str().expect("utf-8"),
        "--json",
        json_path.to_str().expect("utf-8"),
    ]);
    assert!(out.contains("all 40 commands acknowledged"), "{out}");
    assert!(out.contains("commands / events"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("the JSON results"))
            .expect("valid JSON");
    assert_eq!(v["all_acknowledged"], true, "{v:#}");
    assert_eq!(v["outcomes"]["acknowledged"], 40, "{v:#}");
    assert!(
        v["issue_to_ack"]["per_s"].as_f64().expect("rate") > 0.0,
        "{v:#}"
    );
    assert!(
        v["baseline_events"]["per_s"].as_f64().expect("rate") > 0.0,
        "{v:#}"
    );
}
