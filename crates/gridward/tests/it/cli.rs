//! The CLI as a user meets it: the README's quick start, help texts, errors.

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

#[test]
fn demo_runs_and_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");
    let dir = dir.to_str().expect("utf-8");
    let out = gridward_ok(&["demo", "--dir", dir, "--meters", "10", "--duration", "3"]);
    for needle in [
        "Gridward demo report",
        "meters connected (peak)",
        "replay",
        "bad_signature",
        "certificate_revoked",
        "acknowledged as duplicates",
        "gridward readings --db",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    let db = format!("{dir}/gridward.db");
    let readings = gridward_ok(&[
        "readings", "--db", &db, "--meter", "m000001", "--format", "json",
    ]);
    assert!(
        readings.lines().count() >= 1 && readings.contains("\"MeterID\":\"m000001\""),
        "{readings}"
    );
    // A second run clears the first one's directory (it carries the demo's marker).
    gridward_ok(&["demo", "--dir", dir, "--meters", "2", "--duration", "1"]);
}
