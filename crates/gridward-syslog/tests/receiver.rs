//! Sends to a real, strict RFC 5424 receiver (`tests/py/syslog_receiver.py`, Python standard
//! library only) over UDP, TCP and mutual TLS, and checks that every field came through.
//!
//! `python3` is required: without it these tests fail with a message saying so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gridward_pki::{InitOptions, IssueOptions, LeafKind, Pki};
use gridward_syslog::{
    DEFAULT_SD_ID, Facility, Formatter, Sender, SenderConfig, Severity, SyslogHandle,
    SyslogMessage, Transport,
};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const HOSTNAME: &str = "hes-1.example.net";
const PROCID: &str = "4242";
const WAIT: Duration = Duration::from_secs(20);

// ----- the Python receiver -----------------------------------------------------------------

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/syslog_receiver.py")
}

/// A running `syslog_receiver.py`, killed when dropped.
struct Receiver {
    child: Child,
    port: u16,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Receiver {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(script())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run python3 ({e}): the syslog receiver tests need python3 \
                     (standard library only) on PATH; install it, these tests are not optional"
                )
            });
        let stdout = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let (tx, mut lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let collected = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                collected
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let first = lines.blocking_recv_timeout(WAIT);
        let port = match first.as_deref().and_then(|l| l.strip_prefix("LISTENING ")) {
            Some(p) => p.parse().unwrap(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "receiver did not start: {first:?}; stderr: {}",
                    stderr.lock().unwrap()
                );
            }
        };
        Self {
            child,
            port,
            lines,
            stderr,
        }
    }

    fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    /// The next parsed message; panics (with the receiver's stderr) on timeout or exit.
    async fn next(&mut self) -> Value {
        match tokio::time::timeout(WAIT, self.lines.recv()).await {
            Ok(Some(line)) => serde_json::from_str(&line).unwrap(),
            other => {
                // Let the stderr reader catch up.
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "no message from the receiver ({other:?}); exit: {:?}; stderr: {}",
                    self.child.try_wait(),
                    self.stderr.lock().unwrap()
                )
            }
        }
    }

    async fn take(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Waits for the receiver to exit (it does after `--count` messages, or on an invalid one).
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the stderr reader catch up.
                std::thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("receiver did not exit");
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

trait BlockingRecvTimeout {
    fn blocking_recv_timeout(&mut self, timeout: Duration) -> Option<String>;
}

impl BlockingRecvTimeout for mpsc::UnboundedReceiver<String> {
    fn blocking_recv_timeout(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_recv() {
                Ok(line) => return Some(line),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) if Instant::now() >= deadline => {
                    return None;
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

// ----- messages and what the receiver must see ---------------------------------------------

fn formatter() -> Formatter {
    Formatter::new(Facility::AUTH, HOSTNAME).with_procid(PROCID)
}

fn messages() -> Vec<SyslogMessage> {
    vec![
        SyslogMessage::new(
            datetime!(2025-03-04 05:06:07.123456789 UTC),
            Severity::Warning,
            "signature_invalid",
            "envelope signature does not verify",
        )
        .with_param("meter", "m000001")
        .with_param("peer", "127.0.0.1:40000"),
        SyslogMessage::new(
            datetime!(2025-03-04 05:06:08 +01:00),
            Severity::Error,
            "replayed",
            r#"quote " backslash \ bracket ] and [ = too"#,
        )
        .with_param("detail", r#"a"b\c]d [e=f] \"#)
        .with_param("counter", "42"),
        SyslogMessage::new(
            datetime!(2025-12-31 23:59:59.999999 UTC),
            Severity::Notice,
            "",
            "Zähler Nr. 7 — 電力量計 ✓ 🔌",
        ),
        SyslogMessage::new(
            datetime!(2025-06-01 00:00:00.5 UTC),
            Severity::Critical,
            "x".repeat(40),
            "",
        )
        .with_param("ort", "Zürich")
        .with_param("bad name=\"]", "v"),
    ]
}

/// The JSON the receiver prints for `m` (transport and peer aside).
fn expected(m: &SyslogMessage, f: &Formatter) -> Value {
    let utc = m.time.to_offset(time::UtcOffset::UTC);
    let timestamp = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second(),
        utc.microsecond()
    );
    let msgid = if m.msgid.is_empty() {
        "-".to_owned()
    } else {
        m.msgid.chars().take(32).collect()
    };
    let sd = if m.structured.is_empty() {
        json!([])
    } else {
        let params: Vec<Value> = m
            .structured
            .iter()
            .map(|(k, v)| {
                let k: String = k
                    .chars()
                    .map(|c| {
                        if matches!(c, ' ' | '=' | ']' | '"') {
                            '_'
                        } else {
                            c
                        }
                    })
                    .collect();
                json!([k, v])
            })
            .collect();
        json!([[f.sd_id(), params]])
    };
    let pri = f.facility().code() * 8 + m.severity.code();
    json!({
        "pri": pri,
        "facility": f.facility().code(),
        "severity": m.severity.code(),
        "timestamp": timestamp,
        "hostname": HOSTNAME,
        "app": "gridward",
        "procid": PROCID,
        "msgid": msgid,
        "sd": sd,
        "msg": if m.msg.is_empty() { Value::Null } else { Value::from(m.msg.clone()) },
        "bom": !m.msg.is_empty(),
    })
}

fn without_transport(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    o.remove("transport");
    o.remove("peer_cn");
    v
}

fn config(addr: SocketAddr, transport: Transport) -> SenderConfig {
    let mut c = SenderConfig::new(addr, transport, formatter());
    c.backoff_initial = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c.flush_timeout = Duration::from_secs(5);
    c
}

async fn stop(handle: &SyslogHandle, shutdown: &CancellationToken) {
    shutdown.cancel();
    tokio::time::timeout(WAIT, handle.stopped())
        .await
        .expect("sender stopped in time");
}

/// Sends [`messages`] over a stream transport, stops (flushing), and checks the receiver got
/// them all, in order, intact.
async fn stream_round_trip(rx: &mut Receiver, transport: Transport, name: &str) -> Vec<Value> {
    let shutdown = CancellationToken::new();
    let handle = Sender::start(config(rx.addr(), transport), shutdown.clone());
    let msgs = messages();
    for m in &msgs {
        assert!(handle.send(m.clone()));
    }
    // Stopping at once: the graceful shutdown must flush the queue.
    stop(&handle, &shutdown).await;
    let got = rx.take(msgs.len()).await;
    for (m, g) in msgs.iter().zip(&got) {
        assert_eq!(g["transport"], name);
        assert_eq!(without_transport(g.clone()), expected(m, &formatter()));
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.sent, stats.dropped, stats.failed),
        (4, 0, 0),
        "{stats:?}"
    );
    assert_eq!(rx.exit_code(), Some(0), "{}", rx.stderr());
    assert!(!handle.send(msgs[0].clone()), "a stopped sender refuses");
    got
}

// ----- the tests ---------------------------------------------------------------------------

#[tokio::test]
async fn udp_messages_arrive_intact_and_long_ones_are_cut_to_2048_bytes() {
    let msgs = messages();
    let mut rx = Receiver::start(&[
        "--proto",
        "udp",
        "--max-size",
        "2048",
        "--count",
        &(msgs.len() + 1).to_string(),
    ]);
    let shutdown = CancellationToken::new();
    let handle = Sender::start(config(rx.addr(), Transport::Udp), shutdown.clone());
    for m in &msgs {
        assert!(handle.send(m.clone()));
    }
    let long = "ü€".repeat(1000);
    let long_msg = SyslogMessage::new(
        datetime!(2025-03-04 05:06:07 UTC),
        Severity::Informational,
        "long",
        long.clone(),
    )
    .with_param("k", "v");
    assert!(handle.send(long_msg));
    let got = rx.take(msgs.len() + 1).await;
    stop(&handle, &shutdown).await;

    // Datagrams may be reordered in principle: match by content.
    let mut got: Vec<Value> = got.into_iter().map(without_transport).collect();
    for m in &msgs {
        let want = expected(m, &formatter());
        let i = got
            .iter()
            .position(|g| *g == want)
            .unwrap_or_else(|| panic!("missing {want}\nin {got:#?}"));
        got.remove(i);
    }
    let cut = &got[0];
    assert_eq!(cut["msgid"], "long");
    assert_eq!(cut["sd"], json!([[DEFAULT_SD_ID, [["k", "v"]]]]));
    let text = cut["msg"].as_str().unwrap();
    assert!(long.starts_with(text), "a prefix of the message");
    assert!(
        text.len() > 1900 && text.len() < long.len(),
        "{}",
        text.len()
    );
    assert_eq!(handle.stats().sent, 5);
    assert_eq!(rx.exit_code(), Some(0), "{}", rx.stderr());
}

#[tokio::test]
async fn tcp_octet_counted_messages_arrive_intact_and_shutdown_flushes() {
    let mut rx = Receiver::start(&["--proto", "tcp", "--count", "4"]);
    stream_round_trip(&mut rx, Transport::Tcp, "tcp").await;
}

struct TestPki {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
}

fn test_pki() -> TestPki {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let now = OffsetDateTime::now_utc();
    let pki = Pki::init(&dir, &InitOptions::new("test", now)).unwrap();
    let opts = IssueOptions::new("test");
    pki.issue_server("syslog", &["127.0.0.1".to_owned()], &opts, now)
        .unwrap();
    pki.issue_client("gridward-hes", &opts, now).unwrap();
    TestPki {
        _tmp: tmp,
        dir,
        pki,
    }
}

fn tls_receiver(p: &TestPki, count: &str) -> Receiver {
    let chain = p.dir.join("servers/syslog/chain.pem");
    let key = p.dir.join("servers/syslog/key.pem");
    let ca = p.dir.join("ca/root.crt.pem");
    Receiver::start(&[
        "--proto",
        "tcp",
        "--tls-cert",
        chain.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-ca",
        ca.to_str().unwrap(),
        "--require-client-cert",
        "--count",
        count,
    ])
}

/// The Gridward TLS profile (gridward_pki::tls::client_config), with the client certificate.
fn tls_transport(p: &TestPki) -> Transport {
    let material = p
        .pki
        .tls_material(LeafKind::Client, "gridward-hes")
        .unwrap();
    Transport::Tls {
        config: gridward_pki::tls::client_config(&material).unwrap(),
        server_name: ServerName::IpAddress(std::net::IpAddr::from(Ipv4Addr::LOCALHOST).into()),
    }
}

#[tokio::test]
async fn tls_with_client_certificate_messages_arrive_intact() {
    let p = test_pki();
    let mut rx = tls_receiver(&p, "4");
    let got = stream_round_trip(&mut rx, tls_transport(&p), "tls").await;
    for g in got {
        assert_eq!(
            g["peer_cn"], "gridward-hes",
            "the client certificate was presented"
        );
    }
}

#[tokio::test]
async fn tls_collector_of_another_ca_is_refused() {
    let ours = test_pki();
    let theirs = test_pki();
    // The receiver presents a certificate of `theirs`; we trust `ours` only.
    let mut rx = tls_receiver(&theirs, "1");
    let shutdown = CancellationToken::new();
    let mut c = config(rx.addr(), tls_transport(&ours));
    c.flush_timeout = Duration::from_millis(300);
    let handle = Sender::start(c, shutdown.clone());
    assert!(handle.send(messages().remove(0)));
    let deadline = Instant::now() + WAIT;
    while handle.stats().connection_errors < 2 {
        assert!(Instant::now() < deadline, "handshakes must fail");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(&handle, &shutdown).await;
    let stats = handle.stats();
    assert_eq!((stats.sent, stats.failed), (0, 1), "{stats:?}");
    assert!(rx.lines.try_recv().is_err(), "nothing received");
    assert_eq!(rx.child.try_wait().unwrap(), None, "receiver still running");
}

#[tokio::test]
async fn tcp_collector_down_at_first_gets_the_queued_messages_when_it_comes_up() {
    let port = {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let addr: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let shutdown = CancellationToken::new();
    let handle = Sender::start(config(addr, Transport::Tcp), shutdown.clone());
    let msgs = messages();
    for m in &msgs {
        assert!(handle.send(m.clone()));
    }
    let deadline = Instant::now() + WAIT;
    while handle.stats().connection_errors < 3 {
        assert!(
            Instant::now() < deadline,
            "connects must fail while nobody listens"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handle.stats().sent, 0);
    let mut rx = Receiver::start(&[
        "--proto",
        "tcp",
        "--port",
        &port.to_string(),
        "--count",
        "4",
    ]);
    let got = rx.take(4).await;
    for (m, g) in msgs.iter().zip(got) {
        assert_eq!(without_transport(g), expected(m, &formatter()));
    }
    stop(&handle, &shutdown).await;
    assert_eq!(handle.stats().sent, 4);
}

#[tokio::test]
async fn tcp_collector_closing_the_connection_is_noticed_and_reconnected() {
    let mut rx = Receiver::start(&["--proto", "tcp", "--close-after", "2", "--count", "6"]);
    let shutdown = CancellationToken::new();
    let handle = Sender::start(config(rx.addr(), Transport::Tcp), shutdown.clone());
    let msgs = messages();
    let mut want = Vec::new();
    for round in 0..3 {
        for m in &msgs[..2] {
            let mut m = m.clone();
            m.msg = format!("round {round}: {}", m.msg);
            want.push(expected(&m, &formatter()));
            assert!(handle.send(m));
        }
        // The receiver closes after two messages; the sender notices while idle.
        let deadline = Instant::now() + WAIT;
        while handle.stats().connection_errors <= round {
            assert!(Instant::now() < deadline, "the close must be noticed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let got: Vec<Value> = rx
        .take(6)
        .await
        .into_iter()
        .map(without_transport)
        .collect();
    assert_eq!(got, want);
    stop(&handle, &shutdown).await;
    let stats = handle.stats();
    assert_eq!(
        (stats.sent, stats.failed, stats.connection_errors),
        (6, 0, 3),
        "{stats:?}"
    );
}

#[tokio::test]
async fn full_queue_drops_and_never_blocks_the_caller() {
    // Nobody listens on this port.
    let addr = {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap()
    };
    let shutdown = CancellationToken::new();
    let mut c = config(addr, Transport::Tcp);
    c.queue = 2;
    c.backoff_initial = Duration::from_secs(10);
    c.flush_timeout = Duration::from_millis(200);
    let handle = Sender::start(c, shutdown.clone());
    let m = messages().remove(0);
    let started = Instant::now();
    let accepted = (0..1000).filter(|_| handle.send(m.clone())).count();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "send never waits"
    );
    assert!(accepted <= 3, "{accepted}");
    let stats = handle.stats();
    assert_eq!(stats.dropped, 1000 - accepted as u64);
    assert_eq!(stats.sent, 0);
    stop(&handle, &shutdown).await;
    let stats = handle.stats();
    assert_eq!(
        stats.failed, accepted as u64,
        "what could not be flushed is counted"
    );
}

/// The receiver is the judge of the other tests: it must refuse what RFC 5424 refuses.
#[test]
fn receiver_rejects_invalid_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let check = |bytes: &[u8]| {
        let file = tmp.path().join("m");
        std::fs::write(&file, bytes).unwrap();
        Command::new("python3")
            .arg(script())
            .args(["--proto", "udp", "--check"])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}): these tests need python3"))
    };
    // What we format passes.
    let ok = formatter().format(&messages()[1]);
    let out = check(&ok);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad: &[&[u8]] = &[
        b"<192>1 - - - - - -",
        b"<036>1 - - - - - -",
        b"<1>2 - - - - - -",
        b"<1>1 2025-03-04T05:06:07.1234567Z - - - - -",
        b"<1>1 2025-03-04T05:06:60Z - - - - -",
        b"<1>1 2025-02-30T05:06:07Z - - - - -",
        b"<1>1 2025-03-04 05:06:07Z - - - - -",
        b"<1>1 - h\xc3\xa9 - - - -",
        b"<1>1 - - - - 012345678901234567890123456789012 -",
        b"<1>1 - - - - - [gridward v=\"a\"]",
        b"<1>1 - - - - - [x@1 v=\"a]\"]",
        b"<1>1 - - - - - [x@1 v=\"a\"",
        b"<1>1 - - - - - [x@1 v=a]",
        b"<1>1 - - - - - [x@1][x@1]",
        b"<1>1 - - - - - [x@1 v=\"\xff\"]",
        b"<1>1 - - - - - - no BOM",
        b"<1>1 - - - - - - \xEF\xBB\xBF\xff",
        b"<1>1 - - - - -",
    ];
    for b in bad {
        let out = check(b);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{:?} accepted: {}",
            String::from_utf8_lossy(b),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[tokio::test]
async fn receiver_rejects_bad_octet_counting() {
    use tokio::io::AsyncWriteExt;
    for frame in [
        &b"016 <1>1 - - - - - -"[..],
        b"<1>1 - - - - - -\n",
        b"99 <1>1 - - - - - -",
    ] {
        let mut rx = Receiver::start(&["--proto", "tcp", "--count", "1"]);
        let mut s = tokio::net::TcpStream::connect(rx.addr()).await.unwrap();
        s.write_all(frame).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(
            rx.exit_code(),
            Some(2),
            "{:?}",
            String::from_utf8_lossy(frame)
        );
        assert!(rx.stderr().contains("INVALID"), "{}", rx.stderr());
    }
}
