//! Helpers for the tests that run the head-end for real: a `gridward serve` child process on a
//! free loopback port (killed when dropped), a `gridward meter run` fleet, genuine envelopes from
//! `gridward meter sign`, external MQTT clients with timeouts, and parsers of the operator views
//! (`gridward readings`, `gridward events`, the fleet's summary).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::support::gridward_ok;

/// The `gridward` binary under test.
pub const GRIDWARD: &str = env!("CARGO_BIN_EXE_gridward");

/// What to install when an external MQTT peer is missing.
pub const MOSQUITTO_HINT: &str = "install the Debian package mosquitto-clients (apt-get install mosquitto-clients), or run `bash .ci/run`";
/// What to install when Python or paho-mqtt is missing.
pub const PAHO_HINT: &str = "install Python 3 as python3 and the pip package paho-mqtt 2.x (pip install 'paho-mqtt>=2,<3'), or run `bash .ci/run`";

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` with `what` and the
/// last `context()`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` (e.g. "HUP", "INT", "KILL") to `pid` with the shell's `kill`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("sh")
        .args(["-c", &format!("kill -{signal} {pid}")])
        .status()
        .expect("run sh -c kill");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// Runs `cmd` with a deadline; on timeout the child is killed and the test fails.
/// `hint` says what to install if the program cannot be started.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration, hint: &str) -> Output {
    let program = format!("{:?}", cmd.get_program());
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): {hint}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for the child"),
        Err(_) => {
            signal(pid, "KILL");
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
    }
}

/// stdout and stderr of `out`, for failure messages.
pub fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ----- PKI ----------------------------------------------------------------------------------

/// Creates a CA in `dir` and the head-end's server certificate `localhost` (SANs localhost and
/// 127.0.0.1), with the CLI. `org` names the CA (a second, foreign CA uses another).
pub fn new_pki(dir: &Path, org: &str) {
    let d = dir.to_str().expect("utf-8 path");
    gridward_ok(&["pki", "init", "--dir", d, "--org", org]);
    gridward_ok(&[
        "pki",
        "issue",
        "server",
        "--dir",
        d,
        "--name",
        "localhost",
        "--san",
        "localhost",
        "--san",
        "127.0.0.1",
    ]);
}

/// Issues meter `id` in the PKI at `dir` with the CLI.
pub fn issue_meter(dir: &Path, id: &str) {
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        dir.to_str().expect("utf-8 path"),
        "--id",
        id,
    ]);
}

/// Paths of a meter's credentials in a PKI directory.
pub struct MeterFiles {
    /// The meter id.
    pub id: String,
    /// Leaf then issuing CA.
    pub chain: String,
    /// PKCS#8 private key.
    pub key: String,
}

impl MeterFiles {
    /// The files of meter `id` under `pki/meters/{id}/`.
    pub fn new(pki: &Path, id: &str) -> Self {
        let d = pki.join("meters").join(id);
        Self {
            id: id.to_owned(),
            chain: d.join("chain.pem").to_str().expect("utf-8").to_owned(),
            key: d.join("key.pem").to_str().expect("utf-8").to_owned(),
        }
    }
}

// ----- envelopes ----------------------------------------------------------------------------

/// Now, to the second, as RFC 3339 (the documents' timestamps must be within the head-end's
/// freshness window).
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 ns is valid")
        .format(&Rfc3339)
        .expect("format RFC 3339")
}

/// A JSON reading document of `meter`, taken now, with register value `kwh`.
pub fn reading_json(meter: &str, kwh: &str) -> String {
    format!(
        r#"{{"MeterID":"{meter}","Timestamp":"{}","EnergyConsumed":{kwh}}}"#,
        now_rfc3339()
    )
}

/// Signs `doc` with `gridward meter sign` for `meter` (key `key`) and `counter`, bound to `topic`
/// if given; writes the envelope to `out` and returns its bytes.
pub fn sign(
    key: &str,
    meter: &str,
    counter: u64,
    topic: Option<&str>,
    doc: &str,
    out: &Path,
) -> Vec<u8> {
    let counter = counter.to_string();
    let out_s = out.to_str().expect("utf-8 path");
    let mut args = vec![
        "meter",
        "sign",
        "--key",
        key,
        "--meter",
        meter,
        "--counter",
        &counter,
        "--out",
        out_s,
    ];
    if let Some(t) = topic {
        args.extend(["--topic", t]);
    }
    let mut child = Command::new(GRIDWARD)
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run gridward meter sign");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(doc.as_bytes())
        .expect("write the document");
    let o = child
        .wait_with_output()
        .expect("wait for gridward meter sign");
    assert!(
        o.status.success(),
        "gridward {args:?} failed:\n{}",
        show(&o)
    );
    fs::read(out).expect("read the envelope")
}

// ----- the head-end -------------------------------------------------------------------------

/// A `gridward serve` child process with its own configuration and database in a work
/// directory. Killed (SIGKILL) when dropped.
pub struct Headend {
    /// The configuration file.
    pub config: PathBuf,
    /// The SQLite database.
    pub db: PathBuf,
    /// The MQTT/TLS port on 127.0.0.1.
    pub port: u16,
    work: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Headend {
    /// Writes a configuration with `gridward config init` into `work` (PKI `pki_dir`, database
    /// `work/gridward.db`, a free port chosen by the OS), applies `edits` (pairs of a default
    /// line and its replacement) and starts the head-end.
    pub fn start(work: &Path, pki_dir: &Path, edits: &[(&str, &str)]) -> Self {
        let config = work.join("gridward.toml");
        let db = work.join("gridward.db");
        gridward_ok(&[
            "config",
            "init",
            "--config",
            config.to_str().expect("utf-8 path"),
        ]);
        let mut text = fs::read_to_string(&config).expect("read the config");
        let pki_line = format!("dir = {:?}", pki_dir.to_str().expect("utf-8 path"));
        let db_line = format!("path = {:?}", db.to_str().expect("utf-8 path"));
        // MQTT on a port `restart` can come back to (see `restartable_port`).
        let mqtt_line = format!(
            "listen = \"127.0.0.1:{}\"",
            crate::support::restartable_port()
        );
        let mut all = vec![
            ("listen = \"127.0.0.1:8883\"", mqtt_line.as_str()),
            ("listen = \"127.0.0.1:9443\"", "listen = \"127.0.0.1:0\""),
            ("dir = \"pki\"", pki_line.as_str()),
            ("path = \"gridward.db\"", db_line.as_str()),
        ];
        all.extend_from_slice(edits);
        for (from, to) in all {
            assert!(
                text.contains(from),
                "the default configuration from `gridward config init` has no line {from:?}:\n{text}"
            );
            text = text.replacen(from, to, 1);
        }
        fs::write(&config, text).expect("write the config");
        let mut h = Self {
            config,
            db,
            port: 0,
            work: work.to_owned(),
            child: None,
            log: PathBuf::new(),
            starts: 0,
        };
        h.spawn();
        h
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the head-end is already running");
        self.starts += 1;
        self.log = self.work.join(format!("serve-{}.log", self.starts));
        let log = File::create(&self.log).expect("create the server log");
        let child = Command::new(GRIDWARD)
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log)
            .spawn()
            .expect("start gridward serve");
        self.child = Some(child);
        let needle = "MQTT over mutual TLS listen=127.0.0.1:";
        let log_path = self.log.clone();
        let read_log = move || fs::read_to_string(&log_path).unwrap_or_default();
        let child = self.child.as_mut().expect("just started");
        let port = wait_for(
            Duration::from_secs(30),
            "gridward serve to listen",
            || {
                if let Some(status) = child.try_wait().ok().flatten() {
                    panic!("gridward serve exited ({status}):\n{}", read_log());
                }
                let log = read_log();
                let rest = &log[log.find(needle)? + needle.len()..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u16>().ok()
            },
            &read_log,
        );
        if self.port != 0 {
            assert_eq!(port, self.port, "restarted on another port");
        }
        self.port = port;
    }

    /// The HTTPS API's port of the current run (from its start-up line).
    pub fn api_port(&self) -> u16 {
        let needle = "HTTPS API";
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no API start-up line in the log:\n{log}"));
        let rest =
            &line[line.find("listen=127.0.0.1:").expect("listen=") + "listen=127.0.0.1:".len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("the API port")
    }

    /// The log (stdout and stderr) of the current run.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id of the current run.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the head-end is running").id()
    }

    /// SIGSTOP: the head-end hangs (reads nothing, acknowledges nothing) until killed.
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    /// SIGKILL: no shutdown, nothing flushed.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the head-end is running");
        signal(child.id(), "KILL");
        let status: ExitStatus = child.wait().expect("reap gridward serve");
        assert!(
            !status.success(),
            "gridward serve survived SIGKILL: {status}"
        );
    }

    /// Starts the head-end again, on the same MQTT port (fixed in the configuration by
    /// [`Headend::start`]), configuration and database.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// SIGHUP (reload certificates and CRLs), then waits for the log to confirm the reload.
    pub fn reload(&self) {
        let before = self.log().matches("reloaded certificates and CRLs").count();
        signal(self.pid(), "HUP");
        wait_for(
            Duration::from_secs(10),
            "gridward serve to reload after SIGHUP",
            || {
                (self.log().matches("reloaded certificates and CRLs").count() > before)
                    .then_some(())
            },
            || self.log(),
        );
    }

    /// `--db` and the database path, for the operator commands.
    fn db(&self) -> String {
        self.db.to_str().expect("utf-8 path").to_owned()
    }

    /// `gridward readings --meter ID --format json`: the stored documents.
    pub fn readings_json(&self, meter: &str) -> Vec<serde_json::Value> {
        let out = gridward_ok(&[
            "readings",
            "--db",
            &self.db(),
            "--meter",
            meter,
            "--format",
            "json",
            "--limit",
            "1000000",
        ]);
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// The stored `EnergyConsumed` values of `meter`, as written in the JSON documents.
    pub fn stored_kwh(&self, meter: &str) -> Vec<String> {
        self.readings_json(meter)
            .iter()
            .map(|d| d["EnergyConsumed"].to_string())
            .collect()
    }

    /// The stored counters of `meter` (see [`stored_counters_in`]).
    pub fn stored_counters(&self, meter: &str) -> Vec<u64> {
        stored_counters_in(&self.db(), meter)
    }

    /// Whether `gridward meters` shows `meter` as connected.
    pub fn is_connected(&self, meter: &str) -> bool {
        let out = gridward_ok(&["meters", "--db", &self.db()]);
        out.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&meter) && f.last() == Some(&"yes")
        })
    }

    /// `gridward meters`: each meter's last stored counter (0 for none).
    pub fn last_counters(&self) -> Vec<(String, u64)> {
        let out = gridward_ok(&["meters", "--db", &self.db()]);
        let mut lines = out.lines();
        let header = lines.next().unwrap_or_default();
        assert!(
            header.split_whitespace().collect::<Vec<_>>()[..4] == ["METER", "LAST", "SEEN", "LAST"],
            "unexpected `gridward meters` header {header:?}"
        );
        lines
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                // METER  LAST SEEN  LAST COUNTER  LAST KWH  CONNECTED; "-" when none.
                let f: Vec<&str> = l.split_whitespace().collect();
                assert!(f.len() >= 3, "bad `gridward meters` row {l:?}");
                (f[0].to_owned(), f[2].parse().unwrap_or(0))
            })
            .collect()
    }

    /// `gridward events`, parsed.
    pub fn events(&self) -> Vec<EventRow> {
        events_in(&self.db(), &[])
    }

    /// Waits until there are more than `before` security events and returns the new ones.
    pub fn new_events(&self, before: usize, what: &str) -> Vec<EventRow> {
        wait_for(
            Duration::from_secs(10),
            &format!("a security event for {what}"),
            || {
                let all = self.events();
                (all.len() > before).then(|| all[before..].to_vec())
            },
            || format!("events: {:#?}\nserver log:\n{}", self.events(), self.log()),
        )
    }
}

/// The stored counters of `meter` in the database `db`, in the order `gridward readings` lists
/// them (the table format; the JSON documents do not carry the envelope's counter).
pub fn stored_counters_in(db: &str, meter: &str) -> Vec<u64> {
    let out = gridward_ok(&[
        "readings", "--db", db, "--meter", meter, "--format", "table", "--limit", "1000000",
    ]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let col = header
        .iter()
        .position(|h| *h == "COUNTER")
        .unwrap_or_else(|| panic!("no COUNTER column in `gridward readings`:\n{out}"));
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .nth(col)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("no counter in row {l:?}"))
        })
        .collect()
}

/// `gridward events --db DB ARGS`, parsed.
pub fn events_in(db: &str, args: &[&str]) -> Vec<EventRow> {
    let mut all = vec!["events", "--db", db, "--limit", "1000000"];
    all.extend_from_slice(args);
    let out = gridward_ok(&all);
    out.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(EventRow::parse)
        .collect()
}

/// A child process killed when dropped (a client left running by a failed test).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Headend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One row of `gridward events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// Stable reason code, e.g. `client_id_mismatch`.
    pub reason: String,
    /// The meter, or `-`.
    pub meter: String,
    /// The source address, or `-`.
    pub source: String,
    /// Free text.
    pub detail: String,
}

impl EventRow {
    fn parse(line: &str) -> Self {
        // ID  TIME  REASON  METER  SOURCE  DETAIL (the detail may hold spaces).
        let mut rest = line.trim_start();
        let mut fields = Vec::new();
        for _ in 0..5 {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            fields.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
        assert_eq!(fields.len(), 5, "bad `gridward events` row {line:?}");
        Self {
            reason: fields[2].to_owned(),
            meter: fields[3].to_owned(),
            source: fields[4].to_owned(),
            detail: rest.to_owned(),
        }
    }
}

/// The reasons of `events`.
pub fn reasons(events: &[EventRow]) -> Vec<&str> {
    events.iter().map(|e| e.reason.as_str()).collect()
}

// ----- the fleet ----------------------------------------------------------------------------

/// A `gridward meter run` child process (stdout and stderr to files). Killed when dropped.
pub struct FleetProcess {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl FleetProcess {
    /// Starts `gridward meter run ARGS`, logging to `work/fleet.{out,err}`.
    pub fn start(work: &Path, args: &[&str]) -> Self {
        Self::start_named(work, "fleet", args)
    }

    /// Starts `gridward meter run ARGS`, logging to `work/{name}.{out,err}`.
    pub fn start_named(work: &Path, name: &str, args: &[&str]) -> Self {
        let out = work.join(format!("{name}.out"));
        let err = work.join(format!("{name}.err"));
        let child = Command::new(GRIDWARD)
            .args(["meter", "run"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("create fleet.out"))
            .stderr(File::create(&err).expect("create fleet.err"))
            .spawn()
            .expect("start gridward meter run");
        Self {
            child: Some(child),
            out,
            err,
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            fs::read_to_string(&self.out).unwrap_or_default(),
            fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    /// Fails the test if the fleet has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("the fleet is running");
        if let Some(status) = child.try_wait().expect("poll the fleet") {
            panic!(
                "gridward meter run exited early ({status}):\n{}",
                self.output()
            );
        }
    }

    /// SIGKILL: the fleet dies without a summary; only its state directory remains.
    pub fn kill9(mut self) {
        self.assert_running();
        let mut child = self.child.take().expect("running");
        signal(child.id(), "KILL");
        let _ = child.wait();
    }

    /// SIGINT (the fleet stops and drains), then waits for it and parses its summary.
    pub fn interrupt(mut self, timeout: Duration) -> FleetSummary {
        self.assert_running();
        signal(self.child.as_ref().expect("running").id(), "INT");
        self.wait(timeout)
    }

    /// Waits for the fleet to exit on its own (at most `timeout`) and parses its summary.
    pub fn wait(mut self, timeout: Duration) -> FleetSummary {
        let mut child = self.child.take().expect("the fleet is running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().expect("poll the fleet") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "gridward meter run did not finish within {timeout:?}:\n{}",
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.success(),
            "gridward meter run failed ({status}):\n{}",
            self.output()
        );
        FleetSummary::parse(
            &fs::read_to_string(&self.out).expect("read fleet.out"),
            &self.output(),
        )
    }
}

impl Drop for FleetProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The numbers of the summary `gridward meter run` prints when it stops.
#[derive(Debug, Clone, Default)]
pub struct FleetSummary {
    /// Successful connections, reconnects included.
    pub connects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Established connections that were lost.
    pub lost: u64,
    /// Readings signed (each with a new counter).
    pub readings: u64,
    /// Events signed.
    pub events: u64,
    /// Readings not taken because a meter's queue was full.
    pub skipped: u64,
    /// Publishes written, resends included.
    pub published: u64,
    /// Resends after a reconnect.
    pub resent: u64,
    /// Unacknowledged messages of an earlier run, restored from the outbox and sent again.
    pub restored: u64,
    /// Acknowledged with success.
    pub acked: u64,
    /// Refused with a reason code.
    pub refused: u64,
    /// Still unacknowledged when the fleet stopped.
    pub unacked: u64,
    /// The whole output, for failure messages.
    pub text: String,
}

/// The unsigned integers in `s`, in order.
pub fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// The (at least `n`) numbers after `prefix` on the first line of `text` that starts with it;
/// `what` names `text` in the failure message, which shows `all`.
pub fn line_numbers(text: &str, prefix: &str, n: usize, what: &str, all: &str) -> Vec<u64> {
    let l = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {what}:\n{all}"));
    let v = numbers(&l[prefix.len()..]);
    assert!(v.len() >= n, "cannot read {prefix:?} line {l:?}");
    v
}

impl FleetSummary {
    fn parse(stdout: &str, all: &str) -> Self {
        let line =
            |prefix: &str, n: usize| line_numbers(stdout, prefix, n, "the fleet's summary", all);
        let c = line("connections", 3);
        let r = line("readings / events", 3);
        let p = line("published", 2);
        let a = line("acknowledged", 3);
        Self {
            connects: c[0],
            connect_failures: c[1],
            lost: c[2],
            readings: r[0],
            events: r[1],
            skipped: r[2],
            published: p[0],
            resent: p[1],
            restored: p.get(2).copied().unwrap_or(0),
            acked: a[0],
            refused: a[1],
            unacked: a[2],
            text: all.to_owned(),
        }
    }
}

// ----- the operator views -------------------------------------------------------------------

/// `T` as the CLI's `--since` takes it: RFC 3339, whole seconds.
fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("format RFC 3339")
}

/// `gridward readings --meter METER --format FORMAT [--since SINCE]`: the output lines.
fn readings_lines(h: &Headend, meter: &str, format: &str, since: Option<&str>) -> Vec<String> {
    let db = h.db();
    let mut args = vec![
        "readings", "--db", &db, "--meter", meter, "--format", format,
    ];
    if let Some(s) = since {
        args.extend(["--since", s]);
    }
    gridward_ok(&args)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// `gridward events --since SINCE`, parsed.
fn events_since(h: &Headend, since: &str) -> Vec<EventRow> {
    events_in(&h.db(), &["--since", since])
}

#[test]
fn readings_as_xml_and_since_filters_of_readings_and_events() {
    use gridward_core::document::{Format, Limits, parse_reading};
    use gridward_core::downstream::ForwardedReading;

    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    new_pki(&pki, "Gridward");
    issue_meter(&pki, "v-1");
    let h = Headend::start(tmp.path(), &pki, &[]);
    let m = MeterFiles::new(&pki, "v-1");

    // Three readings taken two minutes, one minute and zero seconds ago (inside the freshness
    // window), all received now: `--since` filters on when a reading was taken. The first is
    // sent as JSON, the others as XML; the XML view shows every one as XML.
    let base = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 ns is valid");
    let taken = [
        base - time::Duration::minutes(2),
        base - time::Duration::minutes(1),
        base,
    ];
    let kwh = [10.5, 11.25, 12.0];
    for (i, (t, e)) in taken.iter().zip(kwh).enumerate() {
        let ts = rfc3339(*t);
        let doc = if i == 0 {
            format!(r#"{{"MeterID":"v-1","Timestamp":"{ts}","EnergyConsumed":{e}}}"#)
        } else {
            format!(
                "<EnergyUsageReport><MeterID>v-1</MeterID><Timestamp>{ts}</Timestamp>\
                 <EnergyConsumed>{e}</EnergyConsumed></EnergyUsageReport>"
            )
        };
        let file = tmp.path().join(format!("r{i}.cose"));
        sign(&m.key, "v-1", i as u64 + 1, None, &doc, &file);
        let mut pubc = Command::new("mosquitto_pub");
        pubc.args(["-h", "127.0.0.1", "-p", &h.port.to_string()])
            .args(["--cafile", &pki.join("ca/root.crt.pem").to_string_lossy()])
            .args(["--cert", &m.chain, "--key", &m.key, "-i", "v-1", "-d"])
            .args(["-t", "meters/v-1/readings", "-q", "1", "-f"])
            .arg(&file);
        let out = run_with_timeout(&mut pubc, Duration::from_secs(30), MOSQUITTO_HINT);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("PUBACK"),
            "reading {i} not acknowledged:\n{}",
            show(&out)
        );
    }

    // Every line of the XML view is an EnergyUsageReport document, the ones stored, oldest
    // first, and the same readings as the JSON view.
    let parse_xml = |lines: &[String]| -> Vec<(OffsetDateTime, f64)> {
        lines
            .iter()
            .map(|l| {
                let r = parse_reading(l.as_bytes(), Format::Xml, &Limits::default())
                    .unwrap_or_else(|e| panic!("not an EnergyUsageReport document ({e}): {l}"));
                assert_eq!(r.meter_id.as_str(), "v-1", "{l}");
                (r.timestamp, r.energy_kwh)
            })
            .collect()
    };
    let expected = |from: usize| -> Vec<(OffsetDateTime, f64)> {
        taken[from..]
            .iter()
            .copied()
            .zip(kwh[from..].iter().copied())
            .collect()
    };
    let xml = readings_lines(&h, "v-1", "xml", None);
    assert_eq!(
        parse_xml(&xml),
        expected(0),
        "gridward readings --format xml:\n{xml:#?}"
    );
    // The JSON view is what goes downstream, with the counter and the ReadingID (issue 17:
    // it had neither).
    let json_lines = readings_lines(&h, "v-1", "json", None);
    let forwarded: Vec<ForwardedReading> = json_lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a forwarded reading ({e}): {l}"))
        })
        .collect();
    let json: Vec<(OffsetDateTime, f64)> = forwarded
        .iter()
        .map(|r| {
            let t = OffsetDateTime::parse(&r.timestamp, &Rfc3339).expect("RFC 3339");
            (t, r.energy_consumed)
        })
        .collect();
    assert_eq!(json, expected(0), "the JSON view differs from the XML view");
    let ids: Vec<(u64, &str)> = forwarded
        .iter()
        .map(|r| (r.counter, r.reading_id.as_str()))
        .collect();
    assert_eq!(
        ids,
        [(1, "v-1-1"), (2, "v-1-2"), (3, "v-1-3")],
        "{json_lines:#?}"
    );

    // --since T keeps the readings taken at or after T, in every format and whatever the
    // offset T is written in.
    let second = rfc3339(taken[1]);
    let second_cet = taken[1]
        .to_offset(time::UtcOffset::from_hms(1, 0, 0).expect("+01:00"))
        .format(&Rfc3339)
        .expect("format RFC 3339");
    for since in [&second, &second_cet] {
        let xml = readings_lines(&h, "v-1", "xml", Some(since));
        assert_eq!(parse_xml(&xml), expected(1), "--since {since}:\n{xml:#?}");
    }
    let just_after = rfc3339(taken[1] + time::Duration::seconds(1));
    let xml = readings_lines(&h, "v-1", "xml", Some(&just_after));
    assert_eq!(
        parse_xml(&xml),
        expected(2),
        "--since {just_after}:\n{xml:#?}"
    );
    let table = readings_lines(&h, "v-1", "table", Some(&just_after));
    assert_eq!(
        table.len(),
        2,
        "--since {just_after}, table: a header and one row:\n{table:#?}"
    );
    let later = rfc3339(base + time::Duration::seconds(1));
    let none = readings_lines(&h, "v-1", "xml", Some(&later));
    assert!(
        none.is_empty(),
        "--since {later} (after every reading):\n{none:#?}"
    );
    let out = crate::support::gridward(&[
        "readings",
        "--db",
        &h.db(),
        "--meter",
        "v-1",
        "--since",
        "yesterday",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("RFC 3339") && !err.contains("panicked"),
        "a bad --since: {}",
        show(&out)
    );

    // `gridward events --since`: a refused connection, then, from a later whole second T on,
    // another; `--since T` lists only the second one.
    let refused_connection = |n: usize| {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", h.port)).expect("connect");
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        let _ = std::io::Read::read_to_end(&mut tcp, &mut Vec::new());
        wait_for(
            Duration::from_secs(10),
            &format!("{n} security event(s)"),
            || {
                let all = h.events();
                (all.len() >= n).then_some(all)
            },
            || h.log(),
        )
    };
    let first = refused_connection(1);
    let start = rfc3339(base - time::Duration::minutes(10));
    assert_eq!(
        events_since(&h, &start),
        first,
        "--since before every event"
    );
    thread::sleep(Duration::from_millis(1100));
    let t = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 ns is valid");
    let both = refused_connection(2);
    assert_eq!(
        reasons(&both),
        ["tls_handshake_failed", "tls_handshake_failed"],
        "{both:#?}"
    );
    assert_eq!(events_since(&h, &start), both, "--since before every event");
    assert_eq!(
        events_since(&h, &rfc3339(t)),
        both[1..],
        "--since {} (between the two events)",
        rfc3339(t)
    );
    let future = rfc3339(OffsetDateTime::now_utc() + time::Duration::minutes(1));
    assert!(events_since(&h, &future).is_empty(), "--since {future}");
}

/// `gridward pki revoke` with no signal: the running head-end sees the new CRL on disk within
/// seconds, reloads, and closes the revoked meter's open session; a new connection of that
/// meter is refused while the other meter keeps sending.
#[test]
fn a_revocation_on_disk_takes_effect_without_a_signal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    new_pki(&pki, "Gridward");
    let d = pki.to_str().expect("utf-8 path");
    gridward_ok(&[
        "pki", "issue", "meter", "--dir", d, "--count", "2", "--prefix", "w",
    ]);
    let h = Headend::start(work, &pki, &[]);
    let port = h.port.to_string();
    let fleet = FleetProcess::start(
        work,
        &[
            "--dir",
            d,
            "--port",
            &port,
            "--server-name",
            "localhost",
            "--prefix",
            "w",
            "--interval",
            "0.2",
            "--duration",
            "30",
            "--drain",
            "5",
        ],
    );
    wait_for(
        Duration::from_secs(30),
        "both meters to connect",
        || (h.is_connected("w000001") && h.is_connected("w000002")).then_some(()),
        || h.log(),
    );
    let before = h.events().len();
    gridward_ok(&[
        "pki",
        "revoke",
        "--dir",
        d,
        "--id",
        "w000001",
        "--reason",
        "keyCompromise",
    ]);
    wait_for(
        Duration::from_secs(20),
        "the head-end to notice the new CRL and close w000001's session",
        || {
            (h.log().contains("changed on disk: reloaded") && !h.is_connected("w000001"))
                .then_some(())
        },
        || h.log(),
    );
    // Its reconnection attempts are refused; the other meter keeps getting through.
    let stored = h.stored_counters("w000002").len();
    wait_for(
        Duration::from_secs(20),
        "w000001's reconnection to be refused and w000002 to keep sending",
        || {
            let refused = h
                .events()
                .iter()
                .skip(before)
                .any(|e| e.reason == "certificate_revoked");
            (refused && h.stored_counters("w000002").len() > stored + 5).then_some(())
        },
        || format!("{:#?}\n{}", h.events(), h.log()),
    );
    drop(fleet);
}
