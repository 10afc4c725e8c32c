//! Issue 12 §2 against the real binary: 12 simulated meters send through `gridward serve`, then
//! `gridward export` reads the encrypted store. A pseudonymised export holds no meter id and no
//! certificate serial (scanned byte by byte, in every format); exports under two recipients'
//! keys share no pseudonym; an aggregate of fewer than k meters is absent; the unpseudonymised
//! export does name the meters (so the scan can fail).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::headend::{FleetProcess, Headend, new_pki};
use crate::support::{gridward, gridward_ok};

const METERS: usize = 12;

fn contains(hay: &[u8], needle: &str) -> bool {
    let n = needle.as_bytes();
    hay.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// The first CSV column of each data row (after the `#` metadata lines and the header).
fn first_column(csv: &str) -> Vec<String> {
    csv.lines()
        .filter(|l| !l.starts_with('#'))
        .skip(1)
        .filter_map(|l| l.split(',').next().map(str::to_owned))
        .collect()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("format RFC 3339")
}

#[test]
fn exports_hide_meter_ids_and_serials_and_small_groups() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    let dir = pki.to_str().expect("utf-8");
    let count = METERS.to_string();
    gridward_ok(&[
        "pki", "issue", "meter", "--dir", dir, "--count", &count, "--prefix", "xq",
    ]);
    let mut h = Headend::start(work, &pki, &[]);
    let port = h.port.to_string();
    let fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            dir,
            "--port",
            &port,
            "--prefix",
            "xq",
            "--interval",
            "1",
            "--duration",
            "4",
        ],
    );
    let summary = fleet.wait(Duration::from_secs(60));
    assert!(
        summary.acked >= METERS as u64 && summary.refused == 0,
        "the fleet did not get through:\n{}",
        summary.text
    );
    h.kill9();

    // The meters and their certificate serials, from the CA's own records.
    let list: serde_json::Value =
        serde_json::from_str(&gridward_ok(&["pki", "list", "--dir", dir, "--json"]))
            .expect("pki list --json");
    let mut ids = Vec::new();
    let mut serials = Vec::new();
    for c in list.as_array().expect("an array") {
        let Some(id) = c.get("name").and_then(|v| v.as_str()) else {
            continue;
        };
        if id.starts_with("xq") {
            ids.push(id.to_owned());
            let serial = c.get("serial").and_then(|v| v.as_str()).expect("a serial");
            serials.push(serial.replace(':', ""));
        }
    }
    assert_eq!(ids.len(), METERS, "{list}");

    // A range of quarter hours around now.
    let now = OffsetDateTime::now_utc();
    let q = now.unix_timestamp() - now.unix_timestamp().rem_euclid(900);
    let from = rfc3339(OffsetDateTime::from_unix_timestamp(q - 3600).expect("time"));
    let to = rfc3339(OffsetDateTime::from_unix_timestamp(q + 3600).expect("time"));
    let db = h.db.to_str().expect("utf-8").to_owned();
    let key_file = work.join("gridward.key");
    let store_key = key_file.to_str().expect("utf-8").to_owned();
    let export = |out: &Path, extra: &[&str]| -> Vec<u8> {
        let mut args = vec![
            "export",
            "--db",
            &db,
            "--key-file",
            &store_key,
            "--from",
            &from,
            "--to",
            &to,
            "--resolution",
            "15m",
            "--out",
            out.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        gridward_ok(&args);
        std::fs::read(out).expect("read the export")
    };

    for r in ["a", "b"] {
        let k = work.join(format!("{r}.key"));
        gridward_ok(&["export", "keygen", "--out", k.to_str().expect("utf-8")]);
    }
    // Keygen never overwrites a key.
    let again = gridward(&[
        "export",
        "keygen",
        "--out",
        work.join("a.key").to_str().expect("utf-8"),
    ]);
    assert!(!again.status.success(), "keygen overwrote a key");
    let key_a = work.join("a.key").to_str().expect("utf-8").to_owned();
    let key_b = work.join("b.key").to_str().expect("utf-8").to_owned();

    // In clear: the meters are named (the scan below would see them).
    let clear = export(&work.join("clear.csv"), &[]);
    let clear_text = String::from_utf8(clear.clone()).expect("CSV is UTF-8");
    for id in &ids {
        assert!(contains(&clear, id), "{id} is not in the clear export");
    }
    assert!(clear_text.contains("# pseudonymised: no"), "{clear_text}");

    // Pseudonymised, each format: no meter id, no serial.
    let mut by_recipient = Vec::new();
    for (key, name) in [(&key_a, "a"), (&key_b, "b")] {
        for format in ["csv", "json", "parquet"] {
            let out = work.join(format!("{name}.{format}"));
            let bytes = export(
                &out,
                &["--pseudonymise", "--export-key", key, "--format", format],
            );
            assert!(bytes.len() > 100, "{format} export is empty");
            for needle in ids.iter().chain(&serials) {
                assert!(
                    !contains(&bytes, needle),
                    "{needle} is in the pseudonymised {format} export"
                );
            }
            // Nothing of the store's key either.
            assert!(!contains(&bytes, "gridward-kek"), "{format}");
        }
        let csv = std::fs::read_to_string(work.join(format!("{name}.csv"))).expect("read");
        assert!(csv.contains("# pseudonymised: yes"), "{csv}");
        let names: HashSet<String> = first_column(&csv).into_iter().collect();
        assert_eq!(names.len(), METERS, "one pseudonym per meter:\n{csv}");
        by_recipient.push(names);
    }
    assert!(
        by_recipient[0].is_disjoint(&by_recipient[1]),
        "two recipients' exports share pseudonyms: {by_recipient:?}"
    );

    // Groups of 7 and 5 meters: with k = 6 only the first group is shown.
    let mut groups = String::from("meter_id,group\n");
    for (i, id) in ids.iter().enumerate() {
        let g = if i < 7 { "north" } else { "south" };
        groups.push_str(&format!("{id},{g}\n"));
    }
    let groups_file = work.join("groups.csv");
    std::fs::write(&groups_file, groups).expect("write the groups");
    let agg = export(
        &work.join("agg.csv"),
        &["--groups", groups_file.to_str().expect("utf-8"), "--k", "6"],
    );
    let agg = String::from_utf8(agg).expect("UTF-8");
    let groups_seen: HashSet<String> = first_column(&agg).into_iter().collect();
    assert_eq!(
        groups_seen,
        HashSet::from(["north".to_owned()]),
        "only the group of at least k meters:\n{agg}"
    );
    assert!(agg.contains("# k: 6"), "{agg}");
    assert!(!agg.contains("south"), "{agg}");

    // A bad range is a clear error, not a panic.
    let bad = gridward(&[
        "export",
        "--db",
        &db,
        "--key-file",
        &store_key,
        "--from",
        &to,
        "--to",
        &from,
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!err.contains("panicked"), "{err}");
}
