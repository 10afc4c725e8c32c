//! Whole exports, end to end in memory: what the tests ask (no meter id in a
//! pseudonymised export, no join across keys, no aggregate of fewer than k meters) and the
//! formats.

use std::collections::HashSet;

use gridward_core::MeterId;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use crate::*;

const FROM: OffsetDateTime = datetime!(2026-12-01 00:00 UTC);
const TO: OffsetDateTime = datetime!(2026-12-02 00:00 UTC);
const NOW: OffsetDateTime = datetime!(2026-12-04 09:30:12 UTC);

fn m(s: &str) -> MeterId {
    MeterId::new(s).unwrap()
}

/// Meter ids that no hex digit string, time or number can contain.
fn ids(n: usize) -> Vec<MeterId> {
    (1..=n).map(|i| m(&format!("GWX{i:05}"))).collect()
}

/// Readings every 5 minutes from an hour before `FROM` to an hour after `TO`; meter `i`
/// consumes `i` Wh per reading.
fn readings(meters: &[MeterId]) -> Vec<ReadingRow> {
    let mut rows = Vec::new();
    for (i, meter) in meters.iter().enumerate() {
        let mut t = FROM - Duration::hours(1);
        let mut kwh = 100.0 * (i + 1) as f64;
        while t < TO + Duration::hours(1) {
            rows.push(ReadingRow {
                meter: meter.clone(),
                taken_at: t,
                energy_kwh: kwh,
            });
            t += Duration::minutes(5);
            kwh += 0.001 * (i + 1) as f64;
        }
    }
    rows
}

fn key(b: u8) -> ExportKey {
    ExportKey::from_bytes([b; KEY_LEN])
}

fn spec(res: Resolution) -> ExportSpec {
    ExportSpec::new(FROM, TO, res).unwrap()
}

fn all_formats(e: &Export) -> Vec<(OutputFormat, Vec<u8>)> {
    [OutputFormat::Csv, OutputFormat::Json, OutputFormat::Parquet]
        .into_iter()
        .map(|f| {
            let mut out = Vec::new();
            write(e, f, &mut out).unwrap();
            (f, out)
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn meter_names(e: &Export) -> HashSet<String> {
    match &e.rows {
        Rows::Meters(r) => r.iter().map(|r| r.meter.clone()).collect(),
        Rows::Groups(r) => r.iter().map(|r| r.group.clone()).collect(),
    }
}

#[test]
fn a_pseudonymised_export_contains_no_meter_id_in_any_format() {
    let meters = ids(8);
    let e = export(
        spec(Resolution::Hour).pseudonymise(Pseudonymiser::new(&key(1))),
        readings(&meters),
        NOW,
    )
    .unwrap();
    assert_eq!(e.metadata.meters, 8);
    assert_eq!(e.rows.len(), 8 * 24);
    assert!(e.metadata.pseudonymised);
    assert!(
        meter_names(&e)
            .iter()
            .all(|p| p.starts_with("p-") && p.len() == 34)
    );
    for (format, bytes) in all_formats(&e) {
        for id in &meters {
            assert!(
                !contains(&bytes, id.as_str()),
                "{format:?} holds meter id {id}"
            );
        }
        // Not even the shared prefix of the ids.
        assert!(!contains(&bytes, "GWX"), "{format:?}");
    }
    // No register values either: they would join exports.
    let Rows::Meters(rows) = &e.rows else {
        panic!("per meter")
    };
    assert!(rows.iter().all(|r| r.register_kwh.is_none()));
    let (_, csv) = &all_formats(&e)[0];
    assert!(!String::from_utf8_lossy(csv).contains("register_kwh"));
}

#[test]
fn rows_are_ordered_by_pseudonym_not_by_meter_id() {
    let meters = ids(20);
    let p = Pseudonymiser::new(&key(9));
    let e = export(
        spec(Resolution::Day).pseudonymise(Pseudonymiser::new(&key(9))),
        readings(&meters),
        NOW,
    )
    .unwrap();
    let Rows::Meters(rows) = &e.rows else {
        panic!()
    };
    let got: Vec<&str> = rows.iter().map(|r| r.meter.as_str()).collect();
    let mut want: Vec<String> = meters.iter().map(|i| p.meter(i)).collect();
    want.sort();
    assert_eq!(got, want);
    let by_id: Vec<String> = meters.iter().map(|i| p.meter(i)).collect();
    assert_ne!(got, by_id, "the order would give away the ids' order");
}

#[test]
fn two_keys_give_exports_that_cannot_be_joined_on_pseudonyms() {
    let meters = ids(50);
    let a = export(
        spec(Resolution::Day).pseudonymise(Pseudonymiser::new(&key(1))),
        readings(&meters),
        NOW,
    )
    .unwrap();
    let a_again = export(
        spec(Resolution::Day).pseudonymise(Pseudonymiser::new(&key(1))),
        readings(&meters),
        NOW,
    )
    .unwrap();
    let b = export(
        spec(Resolution::Day).pseudonymise(Pseudonymiser::new(&key(2))),
        readings(&meters),
        NOW,
    )
    .unwrap();
    let (pa, pb) = (meter_names(&a), meter_names(&b));
    assert_eq!(pa.len(), 50);
    assert_eq!(pb.len(), 50);
    assert!(pa.is_disjoint(&pb), "a pseudonym is shared across keys");
    assert_eq!(pa, meter_names(&a_again), "stable under one key");
    assert_eq!(a, a_again);
}

#[test]
fn times_are_coarsened_to_the_resolution() {
    let meters = ids(1);
    for (res, n, step) in [
        (Resolution::Minutes15, 96, 15 * 60),
        (Resolution::Hour, 24, 3600),
        (Resolution::Day, 1, 86_400),
    ] {
        let e = export(spec(res), readings(&meters), NOW).unwrap();
        let Rows::Meters(rows) = &e.rows else {
            panic!()
        };
        assert_eq!(rows.len(), n, "{res}");
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.bucket_start, FROM + Duration::seconds(step * i as i64));
            assert!(res.is_aligned(r.bucket_start));
        }
        assert_eq!(e.metadata.resolution, res.code());
        // Nothing finer than the bucket in the text.
        let mut csv = Vec::new();
        write::write_csv(&e, &mut csv).unwrap();
        let csv = String::from_utf8(csv).unwrap();
        for line in csv.lines().filter(|l| !l.starts_with('#')).skip(1) {
            let t: &str = line.split(',').nth(1).unwrap();
            let t =
                OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap();
            assert!(res.is_aligned(t), "{line}");
        }
    }
}

#[test]
fn kwh_is_the_register_increase_within_each_bucket() {
    let g = m("GWX00001");
    let at = |h: i64, min: i64| FROM + Duration::hours(h) + Duration::minutes(min);
    let rows = [
        (FROM - Duration::minutes(10), 10.0), // baseline, before the range
        (at(0, 10), 10.5),
        (at(0, 50), 11.0),
        (at(2, 0), 11.25), // no reading in hour 1
        (at(2, 59), 12.0),
        (TO, 99.0), // at `to`: excluded
    ];
    let e = export(
        spec(Resolution::Hour),
        rows.iter().map(|&(t, kwh)| ReadingRow {
            meter: g.clone(),
            taken_at: t,
            energy_kwh: kwh,
        }),
        NOW,
    )
    .unwrap();
    let Rows::Meters(r) = &e.rows else { panic!() };
    let got: Vec<(OffsetDateTime, f64, Option<f64>)> = r
        .iter()
        .map(|r| (r.bucket_start, r.kwh, r.register_kwh))
        .collect();
    assert_eq!(
        got,
        vec![(at(0, 0), 1.0, Some(11.0)), (at(2, 0), 1.0, Some(12.0))]
    );
    assert_eq!(r[0].meter, "GWX00001", "not pseudonymised: the id");
    // Without the baseline the first bucket counts from its first reading.
    let e = export(
        spec(Resolution::Hour),
        rows[1..].iter().map(|&(t, kwh)| ReadingRow {
            meter: g.clone(),
            taken_at: t,
            energy_kwh: kwh,
        }),
        NOW,
    )
    .unwrap();
    let Rows::Meters(r) = &e.rows else { panic!() };
    assert_eq!(r[0].kwh, 0.5);
    // Rounded to the watt-hour, summed before rounding.
    let e = export(spec(Resolution::Day), readings(&ids(1)), NOW).unwrap();
    let Rows::Meters(r) = &e.rows else { panic!() };
    assert_eq!(r[0].kwh, 0.288, "288 readings of 1 Wh");
}

fn grouped(meters: &[MeterId], sizes: &[usize]) -> Groups {
    let mut text = String::from("meter_id,group\n");
    let mut i = 0;
    for (g, &n) in sizes.iter().enumerate() {
        for _ in 0..n {
            text.push_str(&format!("{},street-{g}\n", meters[i]));
            i += 1;
        }
    }
    Groups::parse_csv(&text).unwrap()
}

#[test]
fn aggregates_of_fewer_than_k_meters_are_absent_and_counted() {
    let meters = ids(12);
    // street-0: 5 meters (shown at k = 5), street-1: 4 (suppressed), street-2: 2 (suppressed),
    // one meter in no group.
    let groups = grouped(&meters, &[5, 4, 2]);
    let e = export(
        spec(Resolution::Hour).aggregate(Aggregation::new(groups.clone(), DEFAULT_K).unwrap()),
        readings(&meters),
        NOW,
    )
    .unwrap();
    let Rows::Groups(rows) = &e.rows else {
        panic!()
    };
    assert_eq!(rows.len(), 24);
    assert!(rows.iter().all(|r| r.group == "street-0" && r.meters == 5));
    // 1+2+3+4+5 Wh per reading, 12 readings an hour.
    assert!(rows.iter().all(|r| (r.kwh - 0.18).abs() < 1e-9), "{rows:?}");
    assert_eq!(e.metadata.suppressed_aggregates, 48);
    assert_eq!(e.metadata.suppressed_groups, 2);
    assert_eq!(e.metadata.ungrouped_meters, 1);
    assert_eq!(e.metadata.meters, 12);
    assert_eq!(e.metadata.k, Some(5));
    assert_eq!(e.metadata.aggregation, "groups_file");
    for (format, bytes) in all_formats(&e) {
        for absent in ["street-1", "street-2"] {
            assert!(!contains(&bytes, absent), "{format:?} shows {absent}");
        }
    }
    // A smaller k shows them.
    let e = export(
        spec(Resolution::Hour).aggregate(Aggregation::new(groups, 2).unwrap()),
        readings(&meters),
        NOW,
    )
    .unwrap();
    assert_eq!(e.rows.len(), 72);
    assert_eq!(e.metadata.suppressed_aggregates, 0);
}

#[test]
fn a_group_is_counted_per_bucket_by_the_meters_with_a_value_there() {
    let meters = ids(5);
    let groups = grouped(&meters, &[5]);
    // The fifth meter only reports in the first hour: from the second hour on, 4 < k.
    let rows: Vec<ReadingRow> = readings(&meters)
        .into_iter()
        .filter(|r| r.meter != meters[4] || r.taken_at < FROM + Duration::hours(1))
        .collect();
    let e = export(
        spec(Resolution::Hour).aggregate(Aggregation::new(groups, 5).unwrap()),
        rows,
        NOW,
    )
    .unwrap();
    assert_eq!(e.rows.len(), 1);
    assert_eq!(e.metadata.suppressed_aggregates, 23);
    assert_eq!(e.metadata.suppressed_groups, 1);
}

#[test]
fn pseudonymised_aggregates_hide_group_names_too() {
    let meters = ids(10);
    let topology: Vec<(MeterId, MeterId)> =
        meters.iter().map(|mm| (m("DCQ-7"), mm.clone())).collect();
    let p = Pseudonymiser::new(&key(4));
    let e = export(
        spec(Resolution::Day)
            .pseudonymise(Pseudonymiser::new(&key(4)))
            .aggregate(Aggregation::new(Groups::from_topology(&topology), 5).unwrap()),
        readings(&meters),
        NOW,
    )
    .unwrap();
    let Rows::Groups(rows) = &e.rows else {
        panic!()
    };
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].group, p.group("DCQ-7"));
    assert_eq!(rows[0].meters, 10);
    assert_eq!(e.metadata.aggregation, "concentrator");
    for (format, bytes) in all_formats(&e) {
        assert!(!contains(&bytes, "DCQ"), "{format:?}");
        assert!(!contains(&bytes, "GWX"), "{format:?}");
    }
}

#[test]
fn k_below_two_is_refused() {
    for k in [0, 1] {
        assert!(matches!(
            Aggregation::new(Groups::from_topology(&[]), k),
            Err(ExportError::KTooSmall(x)) if x == k
        ));
    }
}

#[test]
fn bad_ranges_are_refused() {
    assert!(matches!(
        ExportSpec::new(TO, FROM, Resolution::Hour),
        Err(ExportError::EmptyRange { .. })
    ));
    assert!(matches!(
        ExportSpec::new(FROM, FROM, Resolution::Hour),
        Err(ExportError::EmptyRange { .. })
    ));
    let err = ExportSpec::new(FROM + Duration::minutes(20), TO, Resolution::Minutes15).unwrap_err();
    assert!(
        matches!(err, ExportError::UnalignedRange { which: "from", ref suggestion, .. } if suggestion == "2026-12-01T00:15:00Z"),
        "{err}"
    );
    let err = ExportSpec::new(FROM, TO + Duration::hours(1), Resolution::Day).unwrap_err();
    assert!(
        matches!(err, ExportError::UnalignedRange { which: "to", .. }),
        "{err}"
    );
    let s = ExportSpec::new(FROM, FROM + Duration::days(2), Resolution::Minutes15).unwrap();
    assert_eq!(s.buckets(), 192);
    assert!(s.check_buckets(192).is_ok());
    assert!(matches!(
        s.check_buckets(191),
        Err(ExportError::RangeTooLong { buckets: 192, .. })
    ));
}

#[test]
fn bad_input_rows_are_refused() {
    let g = m("GWX00001");
    let mut ex = Exporter::new(spec(Resolution::Hour));
    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        assert!(matches!(
            ex.add_meter(&g, &[(FROM, bad)]),
            Err(ExportError::BadRegister { .. })
        ));
    }
    assert!(matches!(
        ex.add_meter(&g, &[(FROM, 5.0), (FROM + Duration::minutes(1), 4.0)]),
        Err(ExportError::RegisterWentBackwards {
            before: 5.0,
            after: 4.0,
            ..
        })
    ));
    ex.add_meter(&g, &[(FROM, 5.0)]).unwrap();
    assert!(matches!(
        ex.add_meter(&g, &[(FROM, 5.0)]),
        Err(ExportError::DuplicateMeter(_))
    ));
}

#[test]
fn csv_states_the_metadata_then_a_header() {
    let e = export(
        spec(Resolution::Hour).pseudonymise(Pseudonymiser::new(&key(1))),
        readings(&ids(2)),
        NOW,
    )
    .unwrap();
    let mut out = Vec::new();
    write(&e, OutputFormat::Csv, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.split("\r\n").collect();
    let meta: Vec<&str> = lines
        .iter()
        .take_while(|l| l.starts_with('#'))
        .copied()
        .collect();
    for want in [
        "# format: gridward-export/1",
        "# generated_at: 2026-12-04T09:30:12Z",
        "# from: 2026-12-01T00:00:00Z",
        "# to: 2026-12-02T00:00:00Z",
        "# resolution: 1h",
        "# pseudonymised: yes",
        "# aggregation: none",
        "# k: none",
        "# meters: 2",
        "# rows: 48",
        "# suppressed_aggregates: 0",
    ] {
        assert!(meta.contains(&want), "no {want:?} in\n{}", meta.join("\n"));
    }
    assert!(meta.iter().any(|l| {
        l.starts_with("# pseudonym_scheme: meters: p- then hex(first 16 bytes of HMAC-SHA-256")
    }));
    assert!(meta.iter().any(|l| l.starts_with(&format!(
        "# gridward_version: {}",
        env!("CARGO_PKG_VERSION")
    ))));
    assert_eq!(lines[meta.len()], "meter,bucket_start,kwh");
    assert_eq!(
        lines.len(),
        meta.len() + 1 + 48 + 1,
        "rows and a final CRLF"
    );
    assert_eq!(lines.last(), Some(&""));
    // The key is stated nowhere.
    assert!(!text.contains(&"01".repeat(KEY_LEN)));
}

#[test]
fn json_is_one_object_with_metadata_and_rows() {
    let e = export(spec(Resolution::Day), readings(&ids(2)), NOW).unwrap();
    let mut out = Vec::new();
    write(&e, OutputFormat::Json, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 2);
    assert_eq!(v["metadata"]["pseudonymised"], false);
    assert_eq!(v["metadata"]["pseudonym_scheme"], serde_json::Value::Null);
    assert_eq!(v["metadata"]["resolution"], "1d");
    assert_eq!(v["rows"].as_array().unwrap().len(), 2);
    let row = &v["rows"][0];
    assert_eq!(row["meter"], "GWX00001");
    assert_eq!(row["bucket_start"], "2026-12-01T00:00:00Z");
    assert_eq!(row["kwh"], 0.288);
    assert!(row["register_kwh"].is_f64());
}

#[test]
fn parquet_reads_back_with_its_metadata() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let e = export(
        spec(Resolution::Hour).pseudonymise(Pseudonymiser::new(&key(1))),
        readings(&ids(3)),
        NOW,
    )
    .unwrap();
    let mut out = Vec::new();
    write(&e, OutputFormat::Parquet, &mut out).unwrap();
    assert_eq!(&out[..4], b"PAR1");
    let reader = SerializedFileReader::new(bytes::Bytes::from(out)).unwrap();
    let kv = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .find(|kv| kv.key == write::PARQUET_METADATA_KEY)
        .and_then(|kv| kv.value.clone())
        .unwrap();
    let meta: serde_json::Value = serde_json::from_str(&kv).unwrap();
    assert_eq!(meta["pseudonymised"], true);
    assert_eq!(meta["rows"], 72);
    let rows: Vec<_> = reader
        .get_row_iter(None)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 72);
    let Rows::Meters(want) = &e.rows else {
        panic!()
    };
    for (row, want) in rows.iter().zip(want) {
        let cols: Vec<(&String, &Field)> = row.get_column_iter().collect();
        assert_eq!(cols.len(), 3);
        assert_eq!(cols[0].1, &Field::Str(want.meter.clone()));
        assert_eq!(
            cols[1].1,
            &Field::TimestampMicros(want.bucket_start.unix_timestamp() * 1_000_000)
        );
        assert_eq!(cols[2].1, &Field::Double(want.kwh));
    }
}

#[test]
fn an_empty_export_is_still_a_valid_file() {
    let e = export(spec(Resolution::Hour), Vec::new(), NOW).unwrap();
    assert_eq!(e.metadata.meters, 0);
    for (format, bytes) in all_formats(&e) {
        assert!(!bytes.is_empty(), "{format:?}");
    }
}
