//! Security events leave the head-end twice: as entries of the audit chain (which verifies,
//! with a signed checkpoint at shutdown) and as RFC 5424 syslog to a collector, here the strict
//! Python receiver of gridward-syslog's tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use gridward_audit::{AuditKey, AuditLog, Query};
use gridward_hes::config::Config;
use gridward_hes::pipeline::system_clock;
use gridward_hes::service;
use gridward_pki::{InitOptions, IssueOptions, Pki};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_events_reach_the_audit_chain_and_syslog() {
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    let now = OffsetDateTime::now_utc();
    let pki = Pki::init(&pki_dir, &InitOptions::new("test", now)).unwrap();
    pki.issue_server(
        "localhost",
        &["127.0.0.1".to_owned()],
        &IssueOptions::new("test"),
        now,
    )
    .unwrap();

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gridward-syslog/tests/py/syslog_receiver.py");
    let mut receiver = Command::new("python3")
        .arg(&script)
        .args(["--proto", "udp", "--count", "1", "--timeout", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): this test needs python3 on PATH"));
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let port: u16 = first.strip_prefix("LISTENING ").unwrap().parse().unwrap();

    let text = format!(
        "[pki]\ndir = {pki_dir:?}\n[mqtt]\nlisten = \"127.0.0.1:0\"\n[store]\npath = {:?}\n\
         [api]\nlisten = \"off\"\n[audit]\norigin = \"test.example/audit\"\ncheckpoint_secs = 3600\n\
         [syslog]\naddress = \"127.0.0.1:{port}\"\ntransport = \"udp\"\nfacility = \"auth\"\n",
        tmp.path().join("gridward.db"),
    );
    let config = Config::parse(&text, std::path::Path::new("test.toml"), tmp.path()).unwrap();
    let running = service::start(&config, system_clock()).await.unwrap();

    // Not TLS at all: a refused handshake, a security event.
    let mut tcp = tokio::net::TcpStream::connect(running.local_addr)
        .await
        .unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    drop(tcp);

    // The collector gets it as strict RFC 5424.
    let line = tokio::task::spawn_blocking(move || lines.next())
        .await
        .unwrap()
        .expect("a syslog message")
        .unwrap();
    let msg: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(msg["msgid"], "tls_handshake_failed", "{line}");
    assert_eq!(msg["app"], "gridward");
    assert_eq!(
        msg["pri"],
        4 * 8 + 4,
        "facility auth, severity warning: {line}"
    );
    assert!(line.contains("127.0.0.1"), "the source address: {line}");
    let status = receiver.wait().unwrap();
    assert!(status.success(), "the receiver refused a message");

    tokio::time::timeout(Duration::from_secs(30), running.shutdown())
        .await
        .expect("shutdown");

    // The audit chain holds it, between the start and the stop, and verifies with the
    // checkpoint signed at shutdown.
    let log = AuditLog::open(&tmp.path().join("audit.db")).unwrap();
    let entries = log.entries(&Query::default()).unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.iter().any(|a| a.starts_with("pki.init")),
        "the PKI log joined: {actions:?}"
    );
    let start = actions.iter().position(|a| *a == "service.start").unwrap();
    let event = actions
        .iter()
        .position(|a| *a == "security.tls_handshake_failed")
        .unwrap();
    let stop = actions.iter().position(|a| *a == "service.stop").unwrap();
    assert!(start < event && event < stop, "{actions:?}");
    let pem = std::fs::read_to_string(tmp.path().join("audit.key")).unwrap();
    let key = AuditKey::from_pkcs8_pem(&pem).unwrap();
    let report = log
        .verify(&key.verifier("test.example/audit").unwrap())
        .unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(
        report.covered,
        entries.len() as u64,
        "the last checkpoint covers everything: {report}"
    );
}
