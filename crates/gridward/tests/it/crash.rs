//! Crash safety.
//!
//! 1. A stream of at least 10,000 readings from 100 meters (`gridward meter run`, which resends
//!    what was not acknowledged), and the head-end is killed with SIGKILL twice mid-stream and
//!    restarted on the same port and database. In the end every reading the meters signed is
//!    stored exactly once: no counter missing, none twice.
//! 2. Head-end and meters killed together (a power cut): the meters' outbox (their persistent
//!    `--state`) holds what was published and not acknowledged; after both restart, every
//!    message published before the cut is stored exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::headend::{FleetProcess, Headend, new_pki, wait_for};
use crate::support::gridward_ok;

/// Meters in the fleet.
const METERS: usize = 100;
/// Seconds between two readings of a meter.
const INTERVAL: &str = "0.1";
/// Readings the stream of the kill test must reach: 100 per meter.
const STREAM: u64 = 10_000;
/// Seconds the fleet of the kill test takes readings. Readings follow the wall clock, whatever
/// the connection does: a meter takes its first within one interval of the start, then one
/// every interval, catching up if it was late, until it is told to stop. In 10.3 s that is at
/// least 102 readings, or 101 if the stop overtakes one just due: every meter reaches
/// `STREAM / METERS` with a margin, however the two cores are scheduled.
const DURATION: &str = "10.3";

/// The sum of the meters' last stored counters (the number stored, as counters start at 1 and
/// a meter that never restarts uses them without gaps).
fn stored_estimate(h: &Headend) -> u64 {
    h.last_counters().iter().map(|(_, c)| c).sum()
}

#[test]
fn kill_9_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    let pki_s = pki.to_str().expect("utf-8 path");
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        pki_s,
        "--count",
        &METERS.to_string(),
        "--prefix",
        "c",
    ]);
    let mut h = Headend::start(work, &pki, &[]);
    let port = h.port.to_string();
    let state = work.join("meter-state");
    let fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            pki_s,
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--prefix",
            "c",
            "--count",
            &METERS.to_string(),
            "--interval",
            INTERVAL,
            "--duration",
            DURATION,
            "--drain",
            "90",
            "--mqtt",
            "5",
            "--state",
            state.to_str().expect("utf-8 path"),
        ],
    );

    // First crash once the stream is flowing, second one three seconds after the restart, that
    // one after the head-end hung for 300 ms (so that many messages are in flight, unacknowledged,
    // some of them stored).
    let mut at_kill = Vec::new();
    for (after, hang, down) in [
        (2500, false, Duration::from_secs(1)),
        (0, true, Duration::from_millis(300)),
    ] {
        let started = Instant::now();
        wait_for(
            Duration::from_secs(60),
            "readings to be stored",
            || {
                (stored_estimate(&h) >= after && started.elapsed() >= Duration::from_secs(3))
                    .then_some(())
            },
            || format!("server log:\n{}", h.log()),
        );
        at_kill.push(stored_estimate(&h));
        if hang {
            h.freeze();
            thread::sleep(Duration::from_millis(300));
        }
        h.kill9();
        thread::sleep(down);
        h.restart();
    }

    let summary = fleet.wait(Duration::from_secs(150));
    let s = &summary;
    eprintln!(
        "fleet summary (stored at the kills: {at_kill:?}):\n{}",
        s.text
    );
    assert!(
        s.readings >= STREAM,
        "the stream had {} readings, fewer than the {STREAM} this test is about:\n{}",
        s.readings,
        s.text
    );
    assert_eq!(s.events, 0, "{}", s.text);
    assert_eq!(s.skipped, 0, "readings skipped:\n{}", s.text);
    assert_eq!(s.refused, 0, "genuine readings refused:\n{}", s.text);
    assert_eq!(
        s.unacked, 0,
        "readings unacknowledged at the end:\n{}",
        s.text
    );
    assert_eq!(
        s.acked, s.readings,
        "readings not acknowledged:\n{}",
        s.text
    );
    assert!(
        s.lost >= METERS as u64,
        "the meters did not lose their connections to the crashes:\n{}",
        s.text
    );
    assert_eq!(s.restored, 0, "{}", s.text);
    assert_eq!(s.published, s.readings + s.resent, "{}", s.text);
    assert!(
        s.resent > 0,
        "no reading was resent after a crash, so the crash did not hit messages in flight:\n{}",
        s.text
    );
    assert!(
        at_kill.iter().all(|&n| n > 0 && n < s.readings),
        "the crashes were not mid-stream: {at_kill:?} stored at the kills, {} in all",
        s.readings
    );

    // What the meters signed: each meter, with a fresh state and one run, uses its counters
    // 1..=k without gaps, one per reading, and the k add up to `s.readings`. What is stored, per
    // meter: each counter once, and no gap below the highest (so 1..=n with n <= k). Then the
    // stored totals adding up to `s.readings` means n = k for every meter: every reading signed
    // is stored exactly once.
    let mut problems = Vec::new();
    let mut stored = 0u64;
    for i in 1..=METERS {
        let id = format!("c{i:06}");
        let mut times: BTreeMap<u64, usize> = BTreeMap::new();
        for c in h.stored_counters(&id) {
            *times.entry(c).or_default() += 1;
        }
        let twice: BTreeMap<u64, usize> = times
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(c, n)| (*c, *n))
            .collect();
        let last = times.keys().next_back().copied().unwrap_or(0);
        let lost: Vec<u64> = (1..=last).filter(|c| !times.contains_key(c)).collect();
        if !twice.is_empty() {
            problems.push(format!(
                "{id}: stored more than once (counter: times): {twice:?}"
            ));
        }
        if !lost.is_empty() {
            problems.push(format!(
                "{id}: lost (missing below its last stored counter {last}): {lost:?}"
            ));
        }
        if last == 0 {
            problems.push(format!("{id}: nothing stored"));
        }
        stored += times.len() as u64;
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with the stored readings ({stored} stored of {} signed):\n{}\n{}",
        problems.len(),
        s.readings,
        problems.join("\n"),
        s.text
    );
    assert_eq!(
        stored, s.readings,
        "readings stored vs readings the meters signed (fewer stored: the last readings of some \
         meters were lost; more: counters stored that no meter signed):\n{}",
        s.text
    );
}

/// The unacknowledged (meter, counter) pairs of a fleet's outbox (`STATE/outbox`: `S meter
/// counter topic hex` when published, `D meter counter` when acknowledged; a torn last line was
/// never published).
fn outbox_pending(state: &Path) -> BTreeSet<(String, u64)> {
    let text = fs::read_to_string(state.join("outbox")).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    let mut pending = BTreeSet::new();
    for line in complete.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let key = |f: &[&str]| {
            (
                f[1].to_owned(),
                f[2].parse::<u64>()
                    .unwrap_or_else(|_| panic!("outbox line {line:?}")),
            )
        };
        match f.first() {
            Some(&"S") if f.len() == 5 => {
                pending.insert(key(&f));
            }
            Some(&"D") if f.len() == 3 => {
                pending.remove(&key(&f));
            }
            _ => panic!("unexpected outbox line {line:?}"),
        }
    }
    pending
}

/// The persisted counter marks of a fleet (`STATE/counters`: a header, then `meter mark` and,
/// since v2, optional device-state fields after it).
fn counter_marks(state: &Path) -> BTreeMap<String, u64> {
    let text = fs::read_to_string(state.join("counters")).expect("read the fleet's counters file");
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("gridward-meter counters v2"),
        "counters file:\n{text}"
    );
    lines
        .map(|l| {
            let mut fields = l.split(' ');
            let (Some(id), Some(mark)) = (fields.next(), fields.next()) else {
                panic!("counters line {l:?}")
            };
            (
                id.to_owned(),
                mark.parse()
                    .unwrap_or_else(|_| panic!("counters line {l:?}")),
            )
        })
        .collect()
}

#[test]
fn power_cut_of_head_end_and_meters_loses_no_published_reading() {
    const N: usize = 50;
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    let pki_s = pki.to_str().expect("utf-8 path");
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        pki_s,
        "--count",
        &N.to_string(),
        "--prefix",
        "p",
    ]);
    let mut h = Headend::start(work, &pki, &[]);
    let port = h.port.to_string();
    let state = work.join("meter-state");
    let state_s = state.to_str().expect("utf-8 path");
    let args = |duration: &'static str| -> Vec<String> {
        [
            "--dir",
            pki_s,
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--prefix",
            "p",
            "--count",
            &N.to_string(),
            "--interval",
            INTERVAL,
            "--duration",
            duration,
            "--drain",
            "90",
            "--state",
            state_s,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
    };
    let run1 = args("120");
    let run1: Vec<&str> = run1.iter().map(String::as_str).collect();
    let fleet = FleetProcess::start_named(work, "fleet1", &run1);
    let started = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "readings to be stored",
        || {
            (stored_estimate(&h) >= 1000 && started.elapsed() >= Duration::from_secs(3))
                .then_some(())
        },
        || format!("server log:\n{}", h.log()),
    );

    // The cut: the head-end hangs for 300 ms (messages pile up in flight, unacknowledged), then
    // the meters and the head-end die.
    h.freeze();
    thread::sleep(Duration::from_millis(300));
    fleet.kill9();
    h.kill9();
    let pending = outbox_pending(&state);
    let marks = counter_marks(&state);
    assert_eq!(marks.len(), N, "counter marks: {marks:?}");

    h.restart();
    let already: usize = pending
        .iter()
        .map(|(m, _)| m.clone())
        .collect::<BTreeSet<_>>()
        .iter()
        .map(|m| {
            let stored = h.stored_counters(m);
            pending
                .iter()
                .filter(|(pm, c)| pm == m && stored.contains(c))
                .count()
        })
        .sum();
    eprintln!(
        "{} messages unacknowledged at the cut, {already} of them already stored (their resend is a duplicate)",
        pending.len()
    );
    let run2 = args("3");
    let run2: Vec<&str> = run2.iter().map(String::as_str).collect();
    let s = FleetProcess::start_named(work, "fleet2", &run2).wait(Duration::from_secs(150));
    eprintln!(
        "{} messages pending in the outbox at the cut; second run:\n{}",
        pending.len(),
        s.text
    );
    assert!(
        !pending.is_empty(),
        "nothing was in flight at the cut: the test proves nothing"
    );
    assert_eq!(
        s.restored,
        pending.len() as u64,
        "restored from the outbox:\n{}",
        s.text
    );
    assert_eq!(s.refused, 0, "genuine readings refused:\n{}", s.text);
    assert_eq!(
        s.unacked, 0,
        "readings unacknowledged at the end:\n{}",
        s.text
    );
    assert_eq!(
        s.acked,
        s.readings + s.restored,
        "readings not acknowledged:\n{}",
        s.text
    );

    // Per meter: the first run's counters 1..=k (what it published, a prefix of what it signed)
    // and the second run's mark..mark+n (it resumes at the persisted mark), each without gap or
    // repeat, and everything pending at the cut among them.
    let mut second_total = 0u64;
    for i in 1..=N {
        let id = format!("p{i:06}");
        let mark = marks[&id];
        let mut counters = h.stored_counters(&id);
        counters.sort_unstable();
        let all = counters.len();
        counters.dedup();
        assert_eq!(counters.len(), all, "{id}: a counter stored twice");
        let (first, second): (Vec<u64>, Vec<u64>) = counters.iter().partition(|&&c| c < mark);
        assert!(!first.is_empty(), "{id}: nothing of the first run stored");
        assert_eq!(
            first,
            (1..=first.len() as u64).collect::<Vec<_>>(),
            "{id}: first-run counters missing"
        );
        assert_eq!(
            second,
            (mark..mark + second.len() as u64).collect::<Vec<_>>(),
            "{id}: second-run counters missing (mark {mark})"
        );
        for (m, c) in pending.iter().filter(|(m, _)| *m == id) {
            assert!(
                first.contains(c),
                "{m}: counter {c}, published before the cut and unacknowledged, not stored"
            );
        }
        second_total += second.len() as u64;
    }
    assert_eq!(
        second_total, s.readings,
        "second-run readings stored vs signed:\n{}",
        s.text
    );
}
