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
