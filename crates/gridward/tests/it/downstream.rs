//! Downstream delivery end to end: the head-end's forwarder, the reference receiver
//! (`gridward sink`), curl, and an independent RFC 9421 implementation (the Python package
//! `http-message-signatures`).
//!
//! 1. Simulated meters send XML; the head-end stores and forwards; the sink holds the JSON of
//!    every reading exactly once, in per-meter order, through a 60 s outage of the sink and a
//!    `kill -9` of the head-end while a backlog drains.
//! 2. curl against the sink: no signature, a replay, a tampered body (with the old digest and
//!    with a new one), old and expired signatures, another signer's key, a certificate of another
//!    CA and none at all are each refused; only the genuine reading is stored.
//! 3. Python verifies what the head-end signs (Ed25519, over mutual TLS), and the sink verifies
//!    what Python signs (ECDSA P-256).
//!
//! These tests fail, never skip, when curl, python3 or the Python packages are missing: run
//! `python3 -m pip install -r .ci/requirements.txt` (CI does) and install curl.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use gridward_core::MeterId;
use gridward_core::document::{Format, format_timestamp, parse_timestamp};
use gridward_core::httpsig::{self, HttpSigningKey};
use gridward_hes::forward::body::{SignedRequest, signed_request};
use gridward_sink::SinkStore;
use gridward_store::{OutboxItem, ReadingQuery, SqliteStore, Store, TargetId};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::headend::{
    FleetProcess, FleetSummary, GRIDWARD, Headend, new_pki, run_with_timeout, show, signal,
    wait_for,
};
use crate::support::gridward_ok;

/// What to install when curl is missing.
const CURL_HINT: &str =
    "install curl (Debian: apt-get install curl), or run `bash .ci/run`, which installs it";
/// What to install when python3 or its packages are missing.
const PYTHON_HINT: &str = "install Python 3 as python3, then run `python3 -m pip install -r .ci/requirements.txt` \
     from the repository root (http-message-signatures 3.x, requests, cryptography; CI does this)";
/// The last line of `gridward config init`'s settings: `[[forward]]` sections go after it.
const LAST_DEFAULT_LINE: &str = "queue_depth = 8192";

// ----- small helpers ------------------------------------------------------------------------

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    let mut out = String::new();
    if from > 0 {
        out.push_str(&format!("[... {from} earlier line(s)]\n"));
    }
    out.push_str(&lines[from..].join("\n"));
    out
}

/// Issues the sink's server certificate (`DIR/servers/sink`, SANs 127.0.0.1 and localhost).
fn issue_sink_server(pki: &Path) {
    gridward_ok(&[
        "pki",
        "issue",
        "server",
        "--dir",
        s(pki),
        "--name",
        "sink",
        "--san",
        "127.0.0.1",
        "--san",
        "localhost",
    ]);
}

/// Issues client certificate `name` (`DIR/clients/NAME`) with key algorithm `alg`.
fn issue_client(pki: &Path, name: &str, alg: &str) {
    gridward_ok(&[
        "pki",
        "issue",
        "client",
        "--dir",
        s(pki),
        "--name",
        name,
        "--alg",
        alg,
    ]);
}

/// `DIR/clients/NAME/FILE`.
fn client_file(pki: &Path, name: &str, file: &str) -> PathBuf {
    pki.join("clients").join(name).join(file)
}

/// A `[[forward]]` section appended to the default configuration (an edit for
/// [`Headend::start`]).
fn forward_edit(name: &str, url: &str, extra: &str) -> String {
    format!("{LAST_DEFAULT_LINE}\n\n[[forward]]\nname = {name:?}\nurl = {url:?}\n{extra}\n")
}

/// A child process killed (SIGKILL) when dropped, with its combined output in a log file.
struct Guarded {
    child: Option<Child>,
    log: PathBuf,
}

impl Guarded {
    fn spawn(cmd: &mut Command, log: PathBuf, hint: &str) -> Self {
        let file = File::create(&log).expect("create a log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup the log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?} ({e}): {hint}", cmd.get_program()));
        Self {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the process has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Waits for `file` to hold a complete line written by the process once it listens.
    fn wait_ready(&mut self, file: &Path, what: &str, on_exit: &dyn Fn(i32) -> String) -> String {
        let log = self.log.clone();
        wait_for(
            Duration::from_secs(30),
            what,
            || {
                if let Some(status) = self.exited() {
                    panic!(
                        "{what}: the process exited ({status}){}:\n{}",
                        on_exit(status.code().unwrap_or(-1)),
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                let text = fs::read_to_string(file).ok()?;
                text.ends_with('\n').then(|| text.trim().to_owned())
            },
            || fs::read_to_string(&log).unwrap_or_default(),
        )
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ----- the sink -----------------------------------------------------------------------------

/// A `gridward sink` child process on 127.0.0.1 (a free port below the ephemeral range the first
/// time, the same one on restarts), its store kept across restarts. Killed when dropped.
struct SinkProcess {
    work: PathBuf,
    args: Vec<String>,
    store: PathBuf,
    addr: Option<SocketAddr>,
    run: Option<Guarded>,
    logs: Vec<PathBuf>,
}

impl SinkProcess {
    /// Starts `gridward sink` with the server certificate `sink` of `pki` and the signer keys
    /// `keys` (key id, PEM file).
    fn start(work: &Path, pki: &Path, store: &Path, keys: &[(&str, &Path)]) -> Self {
        let mut args: Vec<String> = [
            "sink",
            "--dir",
            s(pki),
            "--name",
            "sink",
            "--store",
            s(store),
            "--stats-every",
            "5",
        ]
        .map(String::from)
        .to_vec();
        for (id, path) in keys {
            args.push("--key".into());
            args.push(format!("{id}={}", s(path)));
        }
        let mut sink = Self {
            work: work.to_owned(),
            args,
            store: store.to_owned(),
            addr: None,
            run: None,
            logs: Vec::new(),
        };
        sink.spawn();
        sink
    }

    fn spawn(&mut self) {
        assert!(self.run.is_none(), "the sink is already running");
        let n = self.logs.len() + 1;
        let log = self.work.join(format!("sink-{n}.log"));
        let ready = self.work.join(format!("sink-{n}.addr"));
        let listen = self.addr.map_or_else(
            || format!("127.0.0.1:{}", crate::support::restartable_port()),
            |a| a.to_string(),
        );
        let mut cmd = Command::new(GRIDWARD);
        cmd.args(&self.args)
            .args(["--listen", &listen, "--ready-file", s(&ready)]);
        self.logs.push(log.clone());
        let mut run = Guarded::spawn(&mut cmd, log, "the gridward binary");
        let line = run.wait_ready(&ready, "gridward sink to listen", &|_| String::new());
        let addr: SocketAddr = line
            .parse()
            .unwrap_or_else(|e| panic!("bad --ready-file contents {line:?}: {e}"));
        if let Some(before) = self.addr {
            assert_eq!(addr, before, "the sink restarted on another address");
        }
        self.addr = Some(addr);
        self.run = Some(run);
    }

    /// `https://127.0.0.1:PORT/readings`.
    fn url(&self) -> String {
        format!(
            "https://{}/readings",
            self.addr.expect("the sink has started")
        )
    }

    /// SIGTERM, then waits (at most 30 s) for a clean exit.
    fn stop(&mut self) {
        let mut run = self.run.take().expect("the sink is running");
        let mut child = run.child.take().expect("a child");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll the sink") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "gridward sink did not stop within 30 s of SIGTERM:\n{}",
                    run.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "gridward sink exited with {status} after SIGTERM:\n{}",
            run.log()
        );
    }

    /// Starts it again on the same address and store.
    fn restart(&mut self) {
        self.spawn();
    }

    /// Every run's log.
    fn log(&self) -> String {
        self.logs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "--- sink run {} ---\n{}",
                    i + 1,
                    fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How many readings the store holds (it may be running).
    fn count(&self) -> u64 {
        SinkStore::open_existing(&self.store)
            .and_then(|st| st.counts())
            .map_or(0, |c| c.readings)
    }

    /// `gridward sink show --store FILE --format json`: the bodies, in arrival order.
    fn show_json(&self) -> Vec<Value> {
        gridward_ok(&[
            "sink",
            "show",
            "--store",
            s(&self.store),
            "--format",
            "json",
        ])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("`gridward sink show` printed non-JSON ({e}): {l}"))
        })
        .collect()
    }
}

// ----- the head-end's store and outbox ------------------------------------------------------

/// One row of `gridward outbox`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct OutboxRow {
    pending: u64,
    delivered: u64,
    dead: u64,
}

/// `gridward outbox --db DB`, the row of `target`.
fn outbox(db: &Path, target: &str) -> OutboxRow {
    let out = gridward_ok(&["outbox", "--db", s(db)]);
    let row = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&target))
        .unwrap_or_else(|| panic!("no row for target {target:?} in `gridward outbox`:\n{out}"));
    let n = |i: usize| -> u64 {
        row.get(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("cannot read `gridward outbox` row {row:?}"))
    };
    OutboxRow {
        pending: n(1),
        delivered: n(2),
        dead: n(3),
    }
}

/// Readings the head-end has stored (it may be running).
fn stored_count(db: &Path) -> u64 {
    SqliteStore::open_existing(
        db,
        gridward_store::KeySource::existing_file(db.with_extension("key")),
    )
    .and_then(|st| st.counts())
    .map_or(0, |c| c.readings)
}

/// Every stored reading of meters `ids`, keyed by (meter, counter).
fn stored_readings(
    db: &Path,
    ids: &[String],
) -> BTreeMap<(String, u64), gridward_store::StoredReading> {
    let store = SqliteStore::open_existing(
        db,
        gridward_store::KeySource::existing_file(db.with_extension("key")),
    )
    .expect("open the head-end's database");
    let mut all = BTreeMap::new();
    for id in ids {
        let meter = MeterId::new(id).expect("a valid meter id");
        for r in store
            .readings(&ReadingQuery::new(meter).limit(10_000_000))
            .expect("read the head-end's readings")
        {
            let key = (id.clone(), r.counter);
            assert!(
                all.insert(key.clone(), r).is_none(),
                "the head-end stored {key:?} twice"
            );
        }
    }
    all
}

/// Every `serve-*.log` in `work` (one per run of the head-end), the last lines of each.
fn serve_logs(work: &Path) -> String {
    let mut logs: Vec<PathBuf> = fs::read_dir(work)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("serve-") && n.ends_with(".log"))
                })
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    logs.iter()
        .map(|p| {
            format!(
                "--- {} ---\n{}",
                p.display(),
                tail(&fs::read_to_string(p).unwrap_or_default(), 80)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Everything useful when a test fails: the sink's and the head-end's logs, the fleet's output.
fn context(work: &Path, sink: &SinkProcess) -> String {
    let file = |name: &str| tail(&fs::read_to_string(work.join(name)).unwrap_or_default(), 40);
    format!(
        "===== sink =====\n{}\n===== head-end =====\n{}\n===== fleet stdout =====\n{}\n===== fleet stderr =====\n{}",
        tail(&sink.log(), 120),
        serve_logs(work),
        file("fleet.out"),
        file("fleet.err"),
    )
}

// ----- curl ---------------------------------------------------------------------------------

/// What curl did: its exit code, the HTTP status (0: none), the answer's body.
#[derive(Debug)]
struct CurlResult {
    exit: Option<i32>,
    status: u16,
    answer: String,
    stderr: String,
}

impl CurlResult {
    /// The `error` member of a JSON answer.
    fn error(&self) -> String {
        serde_json::from_str::<Value>(&self.answer)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// The client certificate curl presents: (chain, key) or none.
type ClientCert<'a> = Option<(&'a Path, &'a Path)>;

/// `curl -X POST URL --data-binary @BODY -H ...` over TLS checked against `ca`.
fn curl(
    work: &Path,
    url: &str,
    ca: &Path,
    cert: ClientCert<'_>,
    headers: &[(&str, String)],
    body: &[u8],
) -> CurlResult {
    let body_file = work.join("curl-body.json");
    let answer_file = work.join("curl-answer.json");
    fs::write(&body_file, body).expect("write the body");
    let _ = fs::remove_file(&answer_file);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--cacert", s(ca)])
        .args(["-o", s(&answer_file), "-w", "%{http_code}"])
        .args(["--data-binary", &format!("@{}", s(&body_file))]);
    if let Some((chain, key)) = cert {
        cmd.args(["--cert", s(chain), "--key", s(key)]);
    }
    for (name, value) in headers {
        cmd.args(["-H", &format!("{name}: {value}")]);
    }
    cmd.arg(url);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30), CURL_HINT);
    CurlResult {
        exit: out.status.code(),
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        answer: fs::read_to_string(&answer_file).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An outbox row for reading `counter` of `meter`, as the forwarder would send it.
fn item(meter: &str, counter: u64, kwh: f64) -> OutboxItem {
    // One reading time for the whole run: a reading signed twice must be the same reading, even
    // when a second boundary falls between the two calls (the sink answered 409 then).
    static TAKEN_AT: std::sync::OnceLock<OffsetDateTime> = std::sync::OnceLock::new();
    let t = *TAKEN_AT.get_or_init(now);
    OutboxItem {
        id: counter as i64,
        target: TargetId(1),
        message_id: counter as i64,
        meter_id: MeterId::new(meter).expect("a valid meter id"),
        counter,
        taken_at: t,
        energy_kwh: kwh,
        queued_at: t,
        attempts: 0,
        envelope: Vec::new(),
    }
}

/// Now, whole seconds (signature times are whole seconds).
fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 ns is valid")
}

/// Signs the POST of `item` to `url` with `key`, created `age` ago, valid for `validity`.
fn sign(
    url: &str,
    key: &HttpSigningKey,
    item: &OutboxItem,
    age: Duration,
    validity: Duration,
    nonce: &str,
) -> SignedRequest {
    signed_request(
        url,
        key,
        item,
        false,
        now() - age,
        validity,
        nonce.to_owned(),
    )
    .expect("the forwarder's signing code signs")
}

/// The headers of a signed request, with `content-digest` replaced if `digest` is given.
fn headers_of(req: &SignedRequest, digest: Option<String>) -> Vec<(&'static str, String)> {
    req.headers
        .iter()
        .map(|(n, v)| match (*n, &digest) {
            ("content-digest", Some(d)) => (*n, d.clone()),
            _ => (*n, v.clone()),
        })
        .collect()
}

/// `body` with its `EnergyConsumed` changed.
fn tamper(body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(body.to_vec()).expect("a UTF-8 body");
    let tampered = text.replacen("\"EnergyConsumed\":", "\"EnergyConsumed\":9", 1);
    assert_ne!(tampered, text, "nothing to tamper with in {text}");
    tampered.into_bytes()
}

// ----- Python -------------------------------------------------------------------------------

fn py_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/py")
        .join(name)
}

/// The exit code 3 of the Python scripts: a package is missing.
fn python_exit_hint(code: i32) -> String {
    if code == 3 {
        format!(" — a Python package is missing: {PYTHON_HINT}")
    } else {
        String::new()
    }
}

// ----- 1. meters → head-end → sink ----------------------------------------------------------

/// Meters in the fleet.
const METERS: usize = 20;
/// Seconds between two readings of a meter: 40 readings a second in all.
const INTERVAL: &str = "0.5";
/// How long the sink is down.
const OUTAGE: Duration = Duration::from_secs(60);

#[test]
fn meters_xml_to_sink_json_exactly_once_through_a_60s_outage_and_a_kill_9() {
    let test_start = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    issue_sink_server(&pki);
    issue_client(&pki, "hes", "p256");
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        s(&pki),
        "--count",
        &METERS.to_string(),
        "--prefix",
        "m",
    ]);
    let ids: Vec<String> = (1..=METERS).map(|i| format!("m{i:06}")).collect();

    let mut sink = SinkProcess::start(
        work,
        &pki,
        &work.join("sink.db"),
        &[("hes", &client_file(&pki, "hes", "cert.pem"))],
    );
    let forward = forward_edit(
        "billing",
        &sink.url(),
        "client = \"hes\"\nretry_initial_ms = 100\nretry_max_secs = 2",
    );
    let mut h = Headend::start(work, &pki, &[(LAST_DEFAULT_LINE, &forward)]);
    let db = h.db.clone();
    let fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            s(&pki),
            "--host",
            "127.0.0.1",
            "--port",
            &h.port.to_string(),
            "--prefix",
            "m",
            "--count",
            &METERS.to_string(),
            "--interval",
            INTERVAL,
            "--format",
            "xml",
            "--drain",
            "60",
            "--state",
            s(&work.join("meter-state")),
        ],
    );

    // The stream flows all the way to the sink.
    wait_for(
        Duration::from_secs(60),
        "100 readings at the sink",
        || (sink.count() >= 100).then_some(()),
        || context(work, &sink),
    );

    // Outage: the sink stops (SIGTERM) for 60 s while the meters go on.
    sink.stop();
    let down_at = Instant::now();
    let down_wall = OffsetDateTime::now_utc();
    let at_sink_stop = sink.count();
    let stored_at_stop = stored_count(&db);
    while down_at.elapsed() < OUTAGE {
        thread::sleep(Duration::from_millis(500).min(OUTAGE.saturating_sub(down_at.elapsed())));
    }
    let stored_at_up = stored_count(&db);
    let backlog = outbox(&db, "billing");
    let up_wall = OffsetDateTime::now_utc();
    let outage = down_at.elapsed();
    sink.restart();
    let up_at = Instant::now();
    eprintln!(
        "outage: {outage:?}; head-end stored {stored_at_stop} → {stored_at_up} meanwhile; \
         backlog {backlog:?}; sink held {at_sink_stop}"
    );
    assert!(outage >= OUTAGE, "the sink was down for {outage:?} only");
    assert!(
        stored_at_up >= stored_at_stop + 1000,
        "the meters' stream did not go on during the outage: the head-end stored {stored_at_stop} \
         readings when the sink stopped, {stored_at_up} 60 s later\n{}",
        context(work, &sink)
    );
    assert!(
        backlog.pending >= stored_at_up - stored_at_stop,
        "the readings stored during the outage are not all pending: {backlog:?}, \
         {stored_at_stop} → {stored_at_up} stored"
    );

    // Deliveries resume; while the backlog drains, kill -9 the head-end and start it again.
    wait_for(
        Duration::from_secs(30),
        "deliveries to resume after the sink's restart",
        || (sink.count() >= at_sink_stop + 100).then_some(()),
        || context(work, &sink),
    );
    let resumed_after = up_at.elapsed();
    h.kill9();
    let at_kill = outbox(&db, "billing");
    let sink_at_kill = sink.count();
    thread::sleep(Duration::from_millis(300));
    h.restart();
    eprintln!(
        "deliveries resumed {resumed_after:?} after the sink's restart; killed the head-end with \
         {at_kill:?} in its outbox, the sink holding {sink_at_kill}"
    );
    assert!(
        at_kill.pending >= 100,
        "the kill did not hit a draining backlog: {at_kill:?} (the sink held {sink_at_kill})\n{}",
        context(work, &sink)
    );

    // The stream goes on after the restart (the meters reconnect and resend), then stops.
    let stored_at_restart = stored_count(&db);
    wait_for(
        Duration::from_secs(30),
        "the meters to reconnect and the head-end to store more readings",
        || (stored_count(&db) >= stored_at_restart + 200).then_some(()),
        || context(work, &sink),
    );
    let summary: FleetSummary = fleet.interrupt(Duration::from_secs(90));
    eprintln!("fleet summary:\n{}", summary.text);
    assert!(
        summary.refused == 0
            && summary.unacked == 0
            && summary.acked == summary.readings
            && summary.events == 0,
        "the fleet's readings were not all stored:\n{}\n{}",
        summary.text,
        context(work, &sink)
    );

    // Everything is delivered.
    let last = wait_for(
        Duration::from_secs(60),
        "the outbox to drain (0 pending)",
        || {
            let o = outbox(&db, "billing");
            (o.pending == 0).then_some(o)
        },
        || {
            format!(
                "outbox: {:?}\n{}",
                outbox(&db, "billing"),
                context(work, &sink)
            )
        },
    );

    // Compare the head-end's store with the sink's.
    let hes = stored_readings(&db, &ids);
    let arrived = sink.show_json();
    let mut problems = Vec::new();
    let mut at_sink: BTreeMap<(String, u64), Vec<&Value>> = BTreeMap::new();
    let mut last_counter: BTreeMap<String, u64> = BTreeMap::new();
    for (i, v) in arrived.iter().enumerate() {
        let fields: BTreeSet<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let expected_fields = BTreeSet::from([
            "ReadingID",
            "MeterID",
            "Counter",
            "Timestamp",
            "EnergyConsumed",
        ]);
        let (Some(meter), Some(counter)) = (v["MeterID"].as_str(), v["Counter"].as_u64()) else {
            problems.push(format!(
                "sink reading #{} has no MeterID/Counter: {v}",
                i + 1
            ));
            continue;
        };
        if fields != expected_fields {
            problems.push(format!("sink reading #{}: fields {fields:?}: {v}", i + 1));
        }
        if v["ReadingID"].as_str() != Some(format!("{meter}-{counter}").as_str()) {
            problems.push(format!("sink reading #{}: ReadingID: {v}", i + 1));
        }
        if let Some(&prev) = last_counter.get(meter)
            && counter <= prev
        {
            problems.push(format!(
                "{meter}: counter {counter} arrived at the sink after {prev} (arrival #{})",
                i + 1
            ));
        }
        last_counter.insert(meter.to_owned(), counter);
        at_sink
            .entry((meter.to_owned(), counter))
            .or_default()
            .push(v);
    }
    // When the sink received each reading (whole seconds), to see how fast the backlog drained.
    let sink_received: BTreeMap<(String, u64), OffsetDateTime> =
        SinkStore::open_existing(&sink.store)
            .and_then(|st| st.readings(None))
            .expect("read the sink's store")
            .into_iter()
            .map(|r| {
                (
                    (r.reading.meter_id.as_str().to_owned(), r.reading.counter),
                    r.received_at,
                )
            })
            .collect();
    let mut backlog_delivered_by = up_wall;
    let mut during_outage = 0;
    for ((meter, counter), r) in &hes {
        if r.content_type != Format::Xml {
            problems.push(format!(
                "{meter}-{counter}: stored as {:?}, the meters sent XML",
                r.content_type
            ));
        }
        if r.received_at > down_wall && r.received_at < up_wall {
            during_outage += 1;
            if let Some(&t) = sink_received.get(&(meter.clone(), *counter)) {
                backlog_delivered_by = backlog_delivered_by.max(t);
            }
        }
        match at_sink.get(&(meter.clone(), *counter)).map(Vec::as_slice) {
            None | Some([]) => problems.push(format!("{meter}-{counter}: not at the sink")),
            Some([v]) => {
                let ts = v["Timestamp"].as_str().unwrap_or_default();
                if ts != format_timestamp(r.taken_at)
                    || parse_timestamp(ts).ok() != Some(r.taken_at)
                {
                    problems.push(format!(
                        "{meter}-{counter}: Timestamp {ts:?} at the sink, {} at the head-end",
                        format_timestamp(r.taken_at)
                    ));
                }
                if v["EnergyConsumed"].as_f64() != Some(r.energy_kwh) {
                    problems.push(format!(
                        "{meter}-{counter}: EnergyConsumed {} at the sink, {} at the head-end",
                        v["EnergyConsumed"], r.energy_kwh
                    ));
                }
            }
            Some(many) => problems.push(format!(
                "{meter}-{counter}: {} times at the sink",
                many.len()
            )),
        }
    }
    for (meter, counter) in at_sink.keys() {
        if !hes.contains_key(&(meter.clone(), *counter)) {
            problems.push(format!(
                "{meter}-{counter}: at the sink but not stored by the head-end"
            ));
        }
    }
    sink.stop();
    let elapsed = test_start.elapsed();
    eprintln!(
        "{} readings stored by the head-end ({during_outage} of them during the outage, all \
         delivered within {} s of the sink's restart, the kill included), {} at the sink; outbox \
         {last:?}; {elapsed:?} in all\nsink's last lines:\n{}",
        hes.len(),
        (backlog_delivered_by - up_wall).whole_seconds() + 1,
        arrived.len(),
        tail(&sink.log(), 6)
    );
    assert!(
        problems.is_empty(),
        "{} problem(s) between the head-end's store and the sink's:\n{}\n{}",
        problems.len(),
        problems
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        context(work, &sink)
    );
    assert_eq!(
        hes.len() as u64,
        summary.readings,
        "readings stored by the head-end vs signed by the meters:\n{}",
        summary.text
    );
    assert_eq!(arrived.len(), hes.len(), "readings at the sink vs stored");
    assert_eq!(
        last,
        OutboxRow {
            pending: 0,
            delivered: hes.len() as u64,
            dead: 0
        },
        "the outbox at the end: every reading delivered once, no dead letter"
    );
    assert!(
        during_outage >= 1000,
        "the head-end stored only {during_outage} readings while the sink was down"
    );
    assert!(
        h.events().iter().all(|e| e.reason != "downstream_rejected"),
        "deliveries refused: {:#?}",
        h.events()
    );
}

// ----- 2. curl and forged requests ----------------------------------------------------------

#[test]
fn curl_and_forged_requests_are_refused_by_the_sink() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    issue_sink_server(&pki);
    issue_client(&pki, "hes", "p256");
    issue_client(&pki, "other", "p256");
    // A second CA, with a client of the same name.
    let foreign = work.join("foreign");
    new_pki(&foreign, "Foreign");
    issue_client(&foreign, "hes", "p256");

    let mut sink = SinkProcess::start(
        work,
        &pki,
        &work.join("sink.db"),
        &[("hes", &client_file(&pki, "hes", "cert.pem"))],
    );
    let url = sink.url();
    let ca = pki.join("ca/root.crt.pem");
    let chain = client_file(&pki, "hes", "chain.pem");
    let key_pem = client_file(&pki, "hes", "key.pem");
    let hes_cert: ClientCert<'_> = Some((&chain, &key_pem));
    let key = HttpSigningKey::from_pkcs8_pem(
        &fs::read_to_string(&key_pem).expect("read the hes key"),
        "hes",
    )
    .expect("the hes key is a signing key");
    let other_pem = fs::read_to_string(client_file(&pki, "other", "key.pem")).expect("read");
    let minute = Duration::from_secs(60);
    let fresh = Duration::ZERO;
    let ctx = |what: &str, r: &CurlResult| format!("{what}: {r:#?}\nsink log:\n{}", sink.log());
    let post = |cert: ClientCert<'_>, headers: &[(&str, String)], body: &[u8]| {
        curl(work, &url, &ca, cert, headers, body)
    };

    // A valid client certificate, a correct digest, no signature: 401 signature_missing.
    let genuine = sign(&url, &key, &item("m000001", 1, 350.5), fresh, minute, "n-1");
    let unsigned: Vec<(&str, String)> = genuine
        .headers
        .iter()
        .filter(|(n, _)| *n == "content-type" || *n == "content-digest")
        .cloned()
        .collect();
    let r = post(hes_cert, &unsigned, &genuine.body);
    assert!(
        r.status == 401 && r.error() == "signature_missing",
        "{}",
        ctx("no signature", &r)
    );

    // The genuine request: 201 stored.
    let r = post(hes_cert, &headers_of(&genuine, None), &genuine.body);
    assert!(
        r.status == 201 && r.answer.contains("stored"),
        "{}",
        ctx("a genuine request", &r)
    );
    // The same bytes again: a replay.
    let r = post(hes_cert, &headers_of(&genuine, None), &genuine.body);
    assert!(
        r.status == 401 && r.error() == "nonce_replayed",
        "{}",
        ctx("the genuine request replayed", &r)
    );
    // The same reading signed again (a retry after a lost answer): 200 duplicate.
    let again = sign(&url, &key, &item("m000001", 1, 350.5), fresh, minute, "n-2");
    let r = post(hes_cert, &headers_of(&again, None), &again.body);
    assert!(
        r.status == 200 && r.answer.contains("duplicate"),
        "{}",
        ctx("the same reading re-signed", &r)
    );

    // A tampered body with the signed digest: 400 content_digest_mismatch.
    let second = sign(&url, &key, &item("m000001", 2, 351.0), fresh, minute, "n-3");
    let r = post(hes_cert, &headers_of(&second, None), &tamper(&second.body));
    assert!(
        r.status == 400 && r.error() == "content_digest_mismatch",
        "{}",
        ctx("a tampered body, the signed digest", &r)
    );
    // A tampered body with a digest that matches it: the signature no longer verifies.
    let third = sign(&url, &key, &item("m000001", 3, 352.0), fresh, minute, "n-4");
    let body = tamper(&third.body);
    let digest = httpsig::content_digest(&body);
    let r = post(hes_cert, &headers_of(&third, Some(digest)), &body);
    assert!(
        r.status == 401 && r.error() == "bad_signature",
        "{}",
        ctx("a tampered body, a new digest", &r)
    );

    // A signature created 10 minutes ago (valid for an hour): too old. One created 2 minutes
    // ago, valid for one: expired.
    let old = sign(
        &url,
        &key,
        &item("m000001", 4, 353.0),
        Duration::from_secs(600),
        Duration::from_secs(3600),
        "n-5",
    );
    let r = post(hes_cert, &headers_of(&old, None), &old.body);
    assert!(
        r.status == 401 && r.error() == "signature_too_old",
        "{}",
        ctx("a signature created 10 minutes ago", &r)
    );
    let expired = sign(
        &url,
        &key,
        &item("m000001", 5, 354.0),
        Duration::from_secs(120),
        minute,
        "n-6",
    );
    let r = post(hes_cert, &headers_of(&expired, None), &expired.body);
    assert!(
        r.status == 401 && r.error() == "signature_expired",
        "{}",
        ctx("an expired signature", &r)
    );

    // Another client of the same CA signs: under its own key id it is unknown, under "hes" the
    // signature does not verify.
    for (key_id, code) in [("other", "unknown_key"), ("hes", "bad_signature")] {
        let other = HttpSigningKey::from_pkcs8_pem(&other_pem, key_id).expect("a signing key");
        let forged = sign(
            &url,
            &other,
            &item("m000001", 6, 355.0),
            fresh,
            minute,
            &format!("n-7-{key_id}"),
        );
        let r = post(hes_cert, &headers_of(&forged, None), &forged.body);
        assert!(
            r.status == 401 && r.error() == code,
            "{}",
            ctx(&format!("signed by another key, keyid {key_id}"), &r)
        );
    }

    // Genuinely signed new readings over TLS with a certificate of another CA, or with none:
    // the handshake is refused, no HTTP answer.
    let foreign_chain = client_file(&foreign, "hes", "chain.pem");
    let foreign_key = client_file(&foreign, "hes", "key.pem");
    let refused_before = sink.log().matches("TLS handshake refused").count();
    for (n, (what, cert)) in [
        (
            "a client certificate of another CA",
            Some((foreign_chain.as_path(), foreign_key.as_path())),
        ),
        ("no client certificate", None),
    ]
    .into_iter()
    .enumerate()
    {
        let req = sign(
            &url,
            &key,
            &item("m000001", 7 + n as u64, 356.0),
            fresh,
            minute,
            &format!("n-8-{n}"),
        );
        let r = post(cert, &headers_of(&req, None), &req.body);
        assert!(
            r.status == 0 && r.exit.is_some_and(|c| c != 0) && !r.stderr.is_empty(),
            "{}",
            ctx(what, &r)
        );
    }
    wait_for(
        Duration::from_secs(10),
        "the sink to log the two refused handshakes",
        || {
            (sink.log().matches("TLS handshake refused").count() >= refused_before + 2)
                .then_some(())
        },
        || sink.log(),
    );

    // Only the genuine reading was stored, once, exactly as sent.
    let shown = sink.show_json();
    let sent: Value = serde_json::from_slice(&genuine.body).expect("the body is JSON");
    assert_eq!(shown, vec![sent], "sink show:\n{}", sink.log());
    let stored = SinkStore::open_existing(&work.join("sink.db"))
        .and_then(|st| st.readings(None))
        .expect("read the sink's store");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].body.as_bytes(), genuine.body.as_slice());
    assert_eq!(stored[0].key_id, "hes");
    sink.stop();
}

// ----- 3. Python ⇄ Gridward -----------------------------------------------------------------

/// The Python receiver (`py/httpsig_server.py`): TLS with the sink's certificate, client
/// certificates of the PKI required, every request's signature checked.
struct PySink {
    run: Guarded,
    port: u16,
    results: PathBuf,
}

impl PySink {
    fn start(work: &Path, pki: &Path, keys: &[(&str, &str, &Path)]) -> Self {
        let ready = work.join("pysink.port");
        let results = work.join("pysink.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(py_script("httpsig_server.py"))
            .args(["--cert", s(&pki.join("servers/sink/chain.pem"))])
            .args(["--key", s(&pki.join("servers/sink/key.pem"))])
            .args(["--ca", s(&pki.join("ca/root.crt.pem"))])
            .args(["--ready-file", s(&ready), "--results", s(&results)]);
        for (id, alg, cert) in keys {
            cmd.args(["--key-id", &format!("{id}={alg}:{}", s(cert))]);
        }
        let mut run = Guarded::spawn(&mut cmd, work.join("pysink.log"), PYTHON_HINT);
        let line = run.wait_ready(&ready, "the Python receiver to listen", &python_exit_hint);
        let port = line
            .parse()
            .unwrap_or_else(|e| panic!("bad port {line:?} from the Python receiver: {e}"));
        Self { run, port, results }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/readings", self.port)
    }

    /// The recorded verdicts, one per request.
    fn results(&self) -> Vec<Value> {
        fs::read_to_string(&self.results)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line from the Python receiver"))
            .collect()
    }
}

#[test]
fn python_verifies_what_gridward_signs_and_the_sink_verifies_what_python_signs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    issue_sink_server(&pki);
    issue_client(&pki, "hes", "p256");
    issue_client(&pki, "hes-ed", "ed25519");
    issue_client(&pki, "pyclient", "p256");
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        s(&pki),
        "--count",
        "3",
        "--prefix",
        "p",
    ]);

    // (a) The head-end forwards to the Python receiver: TLS with client certificate hes,
    // signatures with the Ed25519 key of hes-ed.
    let py = PySink::start(
        work,
        &pki,
        &[(
            "hes-ed",
            "ed25519",
            &client_file(&pki, "hes-ed", "cert.pem"),
        )],
    );
    let extra = format!(
        "client = \"hes\"\nsigning_key = {:?}\nkey_id = \"hes-ed\"\nretry_initial_ms = 100\nretry_max_secs = 2",
        s(&client_file(&pki, "hes-ed", "key.pem"))
    );
    let h = Headend::start(
        work,
        &pki,
        &[(LAST_DEFAULT_LINE, &forward_edit("py", &py.url(), &extra))],
    );
    let ctx = || {
        format!(
            "Python receiver:\n{}\nverdicts: {:#?}\nhead-end:\n{}",
            tail(&py.run.log(), 60),
            py.results(),
            tail(&h.log(), 60)
        )
    };
    let fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            s(&pki),
            "--port",
            &h.port.to_string(),
            "--prefix",
            "p",
            "--interval",
            "0.5",
            "--duration",
            "3",
            "--format",
            "xml",
            "--state",
            s(&work.join("meter-state")),
        ],
    );
    let summary = fleet.wait(Duration::from_secs(60));
    assert!(
        summary.readings >= 9 && summary.acked == summary.readings,
        "{}",
        summary.text
    );
    let ids: Vec<String> = (1..=3).map(|i| format!("p{i:06}")).collect();
    wait_for(
        Duration::from_secs(60),
        "the outbox to drain",
        || (outbox(&h.db, "py").pending == 0).then_some(()),
        || format!("outbox: {:?}\n{}", outbox(&h.db, "py"), ctx()),
    );
    let stored = stored_readings(&h.db, &ids);
    assert_eq!(stored.len() as u64, summary.readings, "{}", summary.text);
    let verdicts = py.results();
    let refused: Vec<&Value> = verdicts.iter().filter(|v| v["ok"] != json!(true)).collect();
    assert!(
        refused.is_empty(),
        "the Python implementation refused Gridward's signatures:\n{refused:#?}\n{}",
        ctx()
    );
    let verified: BTreeSet<&str> = verdicts
        .iter()
        .filter_map(|v| v["reading_id"].as_str())
        .collect();
    for (meter, counter) in stored.keys() {
        let id = format!("{meter}-{counter}");
        assert!(
            verified.contains(id.as_str()),
            "reading {id} was not verified by Python\n{}",
            ctx()
        );
    }
    for v in &verdicts {
        assert_eq!(v["keyid"], "hes-ed", "{v}");
        assert_eq!(v["alg"], "ed25519", "{v}");
        assert_eq!(v["label"], "gridward", "{v}");
        assert_eq!(v["client_cn"], "hes", "{v}");
        assert_eq!(
            v["covered"],
            json!(["@method", "@target-uri", "content-digest", "content-type"]),
            "{v}"
        );
        assert_eq!(v["target_uri"], py.url(), "{v}");
    }
    assert_eq!(
        outbox(&h.db, "py"),
        OutboxRow {
            pending: 0,
            delivered: stored.len() as u64,
            dead: 0
        }
    );
    // The Python check is not vacuous: a body tampered after signing (with the signed digest,
    // or with a matching one) is refused.
    let ed_key = HttpSigningKey::from_pkcs8_pem(
        &fs::read_to_string(client_file(&pki, "hes-ed", "key.pem")).expect("read"),
        "hes-ed",
    )
    .expect("an Ed25519 signing key");
    let hes_chain = client_file(&pki, "hes", "chain.pem");
    let hes_key = client_file(&pki, "hes", "key.pem");
    for (n, recompute) in [(900u64, false), (901, true)] {
        let req = sign(
            &py.url(),
            &ed_key,
            &item("p000001", n, 1.5),
            Duration::ZERO,
            Duration::from_secs(60),
            &format!("t-{n}"),
        );
        let body = tamper(&req.body);
        let digest = recompute.then(|| httpsig::content_digest(&body));
        let r = curl(
            work,
            &py.url(),
            &pki.join("ca/root.crt.pem"),
            Some((&hes_chain, &hes_key)),
            &headers_of(&req, digest),
            &body,
        );
        assert_eq!(r.status, 401, "a tampered body: {r:#?}\n{}", ctx());
    }
    let verdicts = py.results();
    let tampered: Vec<&Value> = verdicts.iter().filter(|v| v["ok"] != json!(true)).collect();
    assert_eq!(
        tampered.len(),
        2,
        "two refusals expected: {verdicts:#?}\n{}",
        ctx()
    );
    let reason = |i: usize| tampered[i]["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason(0).contains("Content-Digest") && reason(1).contains("InvalidSignature"),
        "{tampered:#?}"
    );
    eprintln!(
        "Python verified {} deliveries of {} readings (Ed25519, keyid hes-ed); refused the \
         tampered ones: {:?}, {:?}",
        verdicts.len() - 2,
        stored.len(),
        reason(0),
        reason(1)
    );
    drop(h);

    // (b) Python signs (ECDSA P-256, key pyclient) and posts to the sink over mutual TLS.
    let mut sink = SinkProcess::start(
        work,
        &pki,
        &work.join("sink.db"),
        &[("pyclient", &client_file(&pki, "pyclient", "cert.pem"))],
    );
    let reading = |counter: u64, kwh: f64| {
        json!({
            "ReadingID": format!("m000001-{counter}"),
            "MeterID": "m000001",
            "Counter": counter,
            "Timestamp": format_timestamp(now()),
            "EnergyConsumed": kwh,
        })
        .to_string()
    };
    let first = reading(1, 12.5);
    let job = json!({
        "url": sink.url(),
        "ca": s(&pki.join("ca/root.crt.pem")),
        "cert": s(&client_file(&pki, "pyclient", "chain.pem")),
        "key": s(&client_file(&pki, "pyclient", "key.pem")),
        "signing_key": s(&client_file(&pki, "pyclient", "key.pem")),
        "key_id": "pyclient",
        "alg": "ecdsa-p256-sha256",
        "requests": [
            {"body": first, "nonce": "py-1", "send_twice": true},
            {"body": reading(2, 13.0), "nonce": "py-2", "tamper_body": true},
        ],
    });
    let job_file = work.join("pypost.json");
    fs::write(&job_file, job.to_string()).expect("write the job");
    let out = run_with_timeout(
        Command::new("python3")
            .arg(py_script("httpsig_post.py"))
            .arg(&job_file),
        Duration::from_secs(60),
        PYTHON_HINT,
    );
    assert!(
        out.status.success(),
        "httpsig_post.py failed{}:\n{}",
        python_exit_hint(out.status.code().unwrap_or(-1)),
        show(&out)
    );
    let answers: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("httpsig_post.py printed no JSON ({e}):\n{}", show(&out)));
    let a = &answers["results"];
    let why = || format!("{answers:#}\nsink log:\n{}", sink.log());
    assert_eq!(a[0]["status"], 201, "Python-signed request: {}", why());
    assert_eq!(a[0]["again"]["status"], 401, "replayed: {}", why());
    assert!(
        a[0]["again"]["answer"]
            .as_str()
            .is_some_and(|t| t.contains("nonce_replayed")),
        "{}",
        why()
    );
    assert_eq!(a[1]["status"], 400, "tampered after signing: {}", why());
    assert!(
        a[1]["answer"]
            .as_str()
            .is_some_and(|t| t.contains("content_digest_mismatch")),
        "{}",
        why()
    );
    let stored = SinkStore::open_existing(&work.join("sink.db"))
        .and_then(|st| st.readings(None))
        .expect("read the sink's store");
    assert_eq!(stored.len(), 1, "{}", why());
    assert_eq!(stored[0].body, first);
    assert_eq!(stored[0].key_id, "pyclient");
    sink.stop();
}

/// An operator's mistake and its repair: the sink has the wrong key under the head-end's key id,
/// so it refuses every reading (401); each becomes a dead letter with a `downstream_rejected`
/// event, `gridward outbox dead` shows them with the answer; once the sink has the right key,
/// `gridward outbox retry` sends them again and every one is delivered, once.
#[test]
fn dead_letters_are_listed_and_delivered_after_outbox_retry() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    issue_sink_server(&pki);
    issue_client(&pki, "hes", "p256");
    issue_client(&pki, "other", "p256");
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        s(&pki),
        "--count",
        "2",
        "--prefix",
        "d",
    ]);
    // The sink's idea of the key "hes": another client's certificate, for now.
    let key_file = work.join("hes-as-configured.pem");
    fs::copy(client_file(&pki, "other", "cert.pem"), &key_file).expect("copy");
    let mut sink = SinkProcess::start(work, &pki, &work.join("sink.db"), &[("hes", &key_file)]);
    let forward = forward_edit(
        "billing",
        &sink.url(),
        "client = \"hes\"\nretry_initial_ms = 100\nretry_max_secs = 2",
    );
    let h = Headend::start(work, &pki, &[(LAST_DEFAULT_LINE, &forward)]);
    let db = h.db.clone();
    let fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            s(&pki),
            "--port",
            &h.port.to_string(),
            "--server-name",
            "localhost",
            "--prefix",
            "d",
            "--interval",
            "0.3",
            "--duration",
            "1.5",
            "--drain",
            "10",
        ],
    );
    let _ = fleet.wait(Duration::from_secs(60));
    let stored = stored_count(&db);
    assert!(stored >= 4, "only {stored} readings stored");
    wait_for(
        Duration::from_secs(30),
        "every reading to be a dead letter",
        || {
            let o = outbox(&db, "billing");
            (o.dead == stored && o.pending == 0).then_some(())
        },
        || context(work, &sink),
    );
    assert_eq!(
        sink.count(),
        0,
        "the sink stored a reading it should have refused"
    );
    let dead = gridward_ok(&["outbox", "dead", "--db", s(&db), "--target", "billing"]);
    let rows: Vec<&str> = dead.lines().skip(1).collect();
    assert_eq!(rows.len() as u64, stored, "{dead}");
    assert!(
        rows.iter()
            .all(|r| r.contains("HTTP 401") && r.contains("bad_signature")),
        "{dead}"
    );
    let events = h.events();
    let rejected = events
        .iter()
        .filter(|e| e.reason == "downstream_rejected")
        .count() as u64;
    assert_eq!(rejected, stored, "{events:#?}");

    // The repair: the right key, a restart of the sink, a retry.
    fs::copy(client_file(&pki, "hes", "cert.pem"), &key_file).expect("copy");
    sink.stop();
    sink.restart();
    let out = gridward_ok(&["outbox", "retry", "--db", s(&db), "--target", "billing"]);
    assert!(
        out.contains(&format!("{stored} dead letter(s) back to pending")),
        "{out}"
    );
    wait_for(
        Duration::from_secs(30),
        "the retried readings to be delivered",
        || {
            let o = outbox(&db, "billing");
            (o.delivered == stored && o.dead == 0 && o.pending == 0).then_some(())
        },
        || context(work, &sink),
    );
    assert_eq!(sink.count(), stored, "{}", sink.log());
    let status = gridward_ok(&["outbox", "--db", s(&db)]);
    assert!(status.lines().any(|l| l.starts_with("billing")), "{status}");
    // Nothing left to retry.
    let out = gridward_ok(&["outbox", "retry", "--db", s(&db)]);
    assert!(out.starts_with("0 dead letter(s)"), "{out}");
}

/// Issue 11: a concentrator relays its PLC meters' own envelopes; the head-end verifies each
/// with the meter's key, stores it and forwards it to a target configured with
/// `envelope = true`; the sink receives the meter's envelope byte for byte, and pycose (an
/// independent COSE implementation) verifies the meter's signature over the meter's topic with
/// the public key OpenSSL takes from the meter's certificate: the concentrator could neither
/// forge nor alter it.
#[test]
fn a_plc_meters_reading_reaches_the_sink_with_the_meters_own_signature() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    issue_sink_server(&pki);
    issue_client(&pki, "hes", "p256");
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        s(&pki),
        "--count",
        "3",
        "--prefix",
        "p",
    ]);
    gridward_ok(&[
        "pki",
        "issue",
        "concentrator",
        "--dir",
        s(&pki),
        "--name",
        "dc-1",
    ]);
    let meters = ["p000001", "p000002", "p000003"];

    let sink = SinkProcess::start(
        work,
        &pki,
        &work.join("sink.db"),
        &[("hes", &client_file(&pki, "hes", "cert.pem"))],
    );
    let forward = forward_edit(
        "billing",
        &sink.url(),
        "client = \"hes\"\nretry_initial_ms = 100\nretry_max_secs = 2\nenvelope = true",
    );
    let h = Headend::start(work, &pki, &[(LAST_DEFAULT_LINE, &forward)]);
    let config = s(&h.config).to_owned();
    let mut attach = vec!["concentrator", "--config", &config, "attach", "dc-1"];
    attach.extend(meters);
    gridward_ok(&attach);

    let fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            s(&pki),
            "--host",
            "127.0.0.1",
            "--port",
            &h.port.to_string(),
            "--prefix",
            "p",
            "--count",
            "3",
            "--interval",
            "1",
            "--concentrator",
            "dc-1",
            "--plc-meters",
            "3",
            "--state",
            s(&work.join("meter-state")),
        ],
    );
    wait_for(
        Duration::from_secs(60),
        "two relayed readings of each PLC meter at the sink",
        || {
            let bodies = sink.show_json();
            meters
                .iter()
                .all(|m| bodies.iter().filter(|b| b["MeterID"] == *m).count() >= 2)
                .then_some(())
        },
        || context(work, &sink),
    );
    let summary = fleet.interrupt(Duration::from_secs(60));

    let checker =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../gridward-core/tests/interop/cose_check.py");
    let mut verified = 0;
    for body in sink.show_json() {
        let reading: gridward_core::downstream::ForwardedReading =
            serde_json::from_value(body.clone())
                .unwrap_or_else(|e| panic!("not a forwarded reading ({e}): {body}"));
        let cose = reading
            .envelope_bytes()
            .unwrap_or_else(|| panic!("no Envelope although the target asks for it: {body}"))
            .unwrap_or_else(|e| panic!("{e}: {body}"));
        let meter = reading.meter_id.as_str();
        let pubkey = work.join(format!("{meter}.pub.pem"));
        if !pubkey.exists() {
            let out = run_with_timeout(
                Command::new("openssl")
                    .args(["x509", "-pubkey", "-noout", "-in"])
                    .arg(pki.join("meters").join(meter).join("chain.pem"))
                    .arg("-out")
                    .arg(&pubkey),
                Duration::from_secs(30),
                "install openssl",
            );
            assert!(
                out.status.success(),
                "openssl x509 -pubkey:\n{}",
                show(&out)
            );
        }
        let file = work.join(format!("{}.cose", reading.reading_id));
        fs::write(&file, &cose).expect("write the envelope");
        let out = run_with_timeout(
            Command::new("python3")
                .arg(&checker)
                .arg("verify")
                .arg(&file)
                .arg(format!("meters/{meter}/readings"))
                .arg(&pubkey),
            Duration::from_secs(60),
            PYTHON_HINT,
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && stdout.contains(&format!("meter={meter} "))
                && stdout.contains(&format!("counter={} ", reading.counter)),
            "pycose does not verify {}'s relayed envelope with the meter's key:\n{}",
            reading.reading_id,
            show(&out)
        );
        verified += 1;
    }
    eprintln!(
        "{verified} relayed readings verified by pycose at the sink\nfleet summary:\n{}",
        summary.text
    );
    assert!(verified >= 6, "only {verified} readings at the sink");
}
