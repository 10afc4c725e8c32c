//! Encryption at rest against the real binary: after 1,000 simulated meters have sent through
//! `gridward serve` (killed with SIGKILL so the WAL stays as it was), neither the database
//! file nor its WAL holds a stored reading value or a document element name in clear; the
//! values read back through `gridward readings` with the key, and `gridward keys` rotates and
//! lists while the data stays readable.

use std::path::Path;
use std::time::Duration;

use crate::headend::{FleetProcess, Headend, new_pki};
use crate::support::gridward_ok;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn bytes_of(db: &Path) -> Vec<u8> {
    let mut all = std::fs::read(db).expect("read the database");
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    if let Ok(w) = std::fs::read(&wal) {
        all.extend_from_slice(&w);
    }
    all
}

#[test]
fn a_fleets_readings_are_not_in_the_database_or_its_wal_in_clear() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    let dir = pki.to_str().expect("utf-8");
    gridward_ok(&[
        "pki", "issue", "meter", "--dir", dir, "--count", "1000", "--prefix", "ar",
    ]);
    let mut h = Headend::start(tmp.path(), &pki, &[]);
    let port = h.port.to_string();
    let fleet = FleetProcess::start(
        tmp.path(),
        &[
            "--dir",
            dir,
            "--port",
            &port,
            "--prefix",
            "ar",
            "--interval",
            "2",
            "--duration",
            "10",
            "--format",
            "xml",
        ],
    );
    let summary = fleet.wait(Duration::from_secs(120));
    assert!(
        summary.acked >= 2000 && summary.refused == 0,
        "the fleet did not get through:\n{}",
        summary.text
    );
    h.kill9();
    let key = tmp.path().join("gridward.key");
    assert!(key.exists(), "gridward serve made no key file");
    let bytes = bytes_of(&h.db);
    let mut wal = h.db.as_os_str().to_owned();
    wal.push("-wal");
    assert!(
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0,
        "the WAL is part of the scan"
    );
    for name in [
        "EnergyUsageReport",
        "EnergyConsumed",
        "MeterEvent",
        "<MeterID>",
    ] {
        assert!(
            !contains(&bytes, name.as_bytes()),
            "{name} is in the database in clear"
        );
    }
    // The values themselves, as the meters wrote them and as IEEE doubles.
    let mut checked = 0;
    for n in (1..=1000).step_by(50) {
        let meter = format!("ar{n:06}");
        for doc in h.readings_json(&meter) {
            let v = doc["EnergyConsumed"].as_f64().expect("a number");
            let text = doc["EnergyConsumed"].to_string();
            assert!(!contains(&bytes, &v.to_le_bytes()), "{meter}: {v} as f64");
            assert!(!contains(&bytes, &v.to_be_bytes()), "{meter}: {v} as f64");
            // Short strings occur by chance in ciphertext; six characters and more do not.
            if text.len() >= 6 {
                assert!(!contains(&bytes, text.as_bytes()), "{meter}: {text}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} readings checked");

    // Keys: rotate and list, the data stays readable; a missing key file is named.
    let config = h.config.to_str().expect("utf-8").to_owned();
    let rotated = gridward_ok(&["keys", "rotate", "--config", &config]);
    assert!(rotated.contains("started data key 2"), "{rotated}");
    let list = gridward_ok(&["keys", "--config", &config]);
    assert!(list.contains("key-encryption key"), "{list}");
    assert!(list.contains("active"), "{list}");
    let before = h.readings_json("ar000001").len();
    assert!(before > 0);
    std::fs::rename(&key, tmp.path().join("elsewhere.key")).expect("move the key away");
    let out = crate::support::gridward(&["meters", "--config", &config]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key file") && err.contains("is missing"),
        "{err}"
    );
    std::fs::rename(tmp.path().join("elsewhere.key"), &key).expect("put the key back");
    h.restart();
    assert_eq!(h.readings_json("ar000001").len(), before);
}
