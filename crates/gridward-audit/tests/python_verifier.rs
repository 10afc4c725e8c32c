//! The independent Python verifier (`tests/py/audit_verify.py`, written from
//! `docs/audit-format.md`) accepts a real log and names the same first problem as the Rust
//! verifier for each kind of tampering.
//!
//! Nothing is skipped: without `python3` and its `cryptography` package this test fails (CI
//! installs both).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{build, renumber, row, write_row};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/audit_verify.py");

fn python() -> &'static str {
    let probe = Command::new("python3")
        .args([
            "-c",
            "import cryptography.hazmat.primitives.asymmetric.ed25519",
        ])
        .output();
    match probe {
        Err(e) => {
            panic!("python3 is required by this test (and installed in CI) but cannot be run: {e}")
        }
        Ok(out) if !out.status.success() => panic!(
            "python3's `cryptography` package is required by this test (pip install \
             cryptography; CI installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => "python3",
    }
}

/// Runs the Python verifier; returns its exit code and stdout.
fn run(db: &Path, vkey: &str) -> (i32, String) {
    let out = Command::new(python())
        .arg(SCRIPT)
        .arg(db)
        .arg(vkey)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.is_empty() || out.status.code() == Some(2),
        "stderr: {stderr}"
    );
    (out.status.code().unwrap_or(-1), stdout)
}

#[test]
fn python_verifier_accepts_a_real_log() {
    let fx = build();
    let (code, out) = run(&fx.path, &fx.verifier.to_string());
    assert_eq!((code, out.trim()), (0, "ok 20 entries, 2 checkpoints"));
}

#[test]
fn python_verifier_refuses_a_wrong_key() {
    let fx = build();
    let other = gridward_audit::AuditKey::generate()
        .unwrap()
        .verifier(common::ORIGIN)
        .unwrap();
    let (code, out) = run(&fx.path, &other.to_string());
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("FAIL bad-checkpoint"), "{out}");
}

/// A direct edit of the database.
type Tamper = dyn Fn(&rusqlite::Connection);

#[test]
fn python_verifier_names_the_same_first_problem() {
    // (tampering, the Python verifier's expected output prefix)
    let cases: &[(&str, &Tamper, &str)] = &[
        (
            "changed",
            &|c| {
                c.execute("UPDATE entries SET target = 'x' WHERE seq = 7", [])
                    .unwrap();
            },
            "FAIL changed seq=7",
        ),
        (
            "changed, hash recomputed",
            &|c| {
                let mut e = row(c, 7);
                e.target = "x".into();
                e.hash = e.compute_hash().unwrap();
                write_row(c, &e);
            },
            "FAIL changed seq=7",
        ),
        (
            "deleted",
            &|c| {
                c.execute("DELETE FROM entries WHERE seq = 12", []).unwrap();
            },
            "FAIL deleted seq=12",
        ),
        (
            "truncated",
            &|c| {
                c.execute("DELETE FROM entries WHERE seq >= 18", [])
                    .unwrap();
            },
            "FAIL truncated seq=18",
        ),
        (
            "inserted",
            &|c| {
                let before = row(c, 12);
                renumber(c, 12, 1);
                let mut forged = row(c, 14);
                forged.seq = 13;
                forged.prev = before.hash;
                forged.target = "forged".into();
                forged.hash = forged.compute_hash().unwrap();
                write_row(c, &forged);
            },
            "FAIL inserted seq=13",
        ),
        (
            "reordered",
            &|c| {
                c.execute_batch(
                    "UPDATE entries SET seq = -1 WHERE seq = 5;
                     UPDATE entries SET seq = 5 WHERE seq = 6;
                     UPDATE entries SET seq = 6 WHERE seq = -1;",
                )
                .unwrap();
            },
            "FAIL reordered seq=5",
        ),
        (
            "rewritten",
            &|c| {
                let mut prev = row(c, 3).hash;
                for seq in 4..=20 {
                    let mut e = row(c, seq);
                    e.detail = format!("rewritten {seq}");
                    e.prev = prev;
                    e.hash = e.compute_hash().unwrap();
                    prev = e.hash;
                    write_row(c, &e);
                }
            },
            "FAIL checkpoint-mismatch seq=10",
        ),
        (
            "forged checkpoint",
            &|c| {
                c.execute(
                    "UPDATE checkpoints SET note = replace(note, char(10) || '20' || char(10), char(10) || '15' || char(10)) WHERE id = 2",
                    [],
                )
                .unwrap();
            },
            "FAIL bad-checkpoint",
        ),
    ];
    for (name, tamper, want) in cases {
        let fx = build();
        tamper(&fx.attacker());
        let rust = fx.log().verify(&fx.verifier).unwrap();
        assert!(!rust.is_ok(), "{name}: Rust found nothing");
        let (code, out) = run(&fx.path, &fx.verifier.to_string());
        assert_eq!(code, 1, "{name}: {out}");
        assert!(
            out.starts_with(want),
            "{name}: Python said {out:?}, want {want:?}; Rust: {rust}"
        );
    }
}
