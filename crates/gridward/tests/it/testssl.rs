//! An independent TLS audit: testssl.sh (Debian package `testssl.sh`) against the head-end's
//! MQTT port, the sink's HTTPS port and the head-end's HTTPS API. No finding may be rated HIGH
//! or CRITICAL, only TLS 1.2 and 1.3 with ECDHE + AES-GCM may be offered, and the MQTT and sink
//! ports must demand a client certificate (the API accepts one, and sessions).
//!
//! The PKI is made with `--crl-url`, so the certificates name where their CRL is published
//! (testssl rates a certificate without CRL distribution point or OCSP URI as HIGH), and
//! testssl is given the CA (`--add-ca`) so it can check the chain.
//! The scanner's address is exempt from the head-end's bans (its hundreds of handshakes without
//! a client certificate would get it banned, and a banned scanner sees nothing).
//! Afterwards a few meters send through the same head-end to the same sink: certificates with
//! a CRL distribution point work end to end with the CRL checks of both servers.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::headend::{FleetProcess, Headend, wait_for};
use crate::support::gridward_ok;

/// Cipher suites Gridward may offer (testssl's hexcodes): TLS 1.3 AES-GCM, TLS 1.2 ECDHE with
/// AES-GCM.
const ALLOWED_SUITES: [&str; 6] = ["x1301", "x1302", "xc02b", "xc02c", "xc02f", "xc030"];

fn testssl_binary() -> &'static str {
    for candidate in ["testssl", "testssl.sh"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {candidate}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate;
        }
    }
    panic!(
        "testssl.sh is not installed: install the Debian package `testssl.sh` (bash .ci/run does)"
    );
}

/// Runs testssl against `host:port`; returns the findings (id, severity, finding) and the
/// detected service.
fn audit(
    bin: &str,
    target: &str,
    ca: &Path,
    json: &Path,
) -> (Vec<(String, String, String)>, String) {
    // The whole suite runs beside this audit on two cores: give testssl's service detection
    // (5 s by default) and socket replies (10 s) room, so a slow answer is not read as "no
    // service" or "not offered".
    let out = Command::new(bin)
        .env("HEADER_MAXSLEEP", "20")
        .env("MAX_WAITSOCK", "30")
        .args(["--quiet", "--color", "0", "--warnings", "off", "--add-ca"])
        .arg(ca)
        .arg("--jsonfile-pretty")
        .arg(json)
        .arg(target)
        .output()
        .expect("run testssl");
    let text = fs::read_to_string(json).unwrap_or_else(|e| {
        panic!(
            "testssl wrote no JSON ({e}); its output:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v: serde_json::Value = serde_json::from_str(&text).expect("testssl JSON");
    let scan = &v["scanResult"][0];
    let mut findings = Vec::new();
    if let Some(sections) = scan.as_object() {
        for section in sections.values() {
            for f in section.as_array().into_iter().flatten() {
                findings.push((
                    f["id"].as_str().unwrap_or_default().to_owned(),
                    f["severity"].as_str().unwrap_or_default().to_owned(),
                    f["finding"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    (
        findings,
        scan["service"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Runs [`audit`] until testssl could tell what runs on the port (up to 4 times). On a loaded
/// machine its first probe of a port sometimes times out; it then reports "Couldn't determine
/// service" and, from the same timed-out probes, TLS 1.2 as "not offered" — a scanner that saw
/// nothing, not a finding. A HIGH or CRITICAL finding is never retried away.
fn audit_conclusively(
    bin: &str,
    target: &str,
    ca: &Path,
    json: &Path,
) -> (Vec<(String, String, String)>, String) {
    let mut attempt = 1;
    loop {
        let _ = fs::remove_file(json);
        let (findings, service) = audit(bin, target, ca, json);
        let severe = findings
            .iter()
            .any(|(_, s, _)| s == "HIGH" || s == "CRITICAL");
        if severe || !service.starts_with("Couldn't determine") || attempt == 4 {
            return (findings, service);
        }
        eprintln!("testssl could not determine the service on {target} (attempt {attempt}); again");
        attempt += 1;
    }
}

fn check(
    name: &str,
    findings: &[(String, String, String)],
    service: &str,
    client_certificate_required: bool,
    tls12_by_openssl: Option<&str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, severity, finding) in findings {
        if severity == "HIGH" || severity == "CRITICAL" {
            problems.push(format!("{name}: {severity} {id}: {finding}"));
        }
    }
    let finding = |id: &str| {
        findings
            .iter()
            .find(|(i, _, _)| i == id)
            .map(|(_, _, f)| f.as_str())
            .unwrap_or("(missing)")
    };
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        if !finding(id).starts_with("not offered") {
            problems.push(format!("{name}: {id} is {:?}", finding(id)));
        }
    }
    for id in ["TLS1_2", "TLS1_3"] {
        if !finding(id).starts_with("offered") {
            // On an HTTP service testssl probes TLS 1.2 with its own ClientHello, which carries
            // no extended_master_secret extension; the profile requires it (RFC 7627, BSI
            // TR-02102-2), so the probe is refused and reads "not offered". Then OpenSSL, whose
            // ClientHello has it, must complete a TLS 1.2 handshake with an allowed suite.
            if id == "TLS1_2"
                && let Some(target) = tls12_by_openssl
            {
                problems.extend(tls12_with_openssl(name, target));
                continue;
            }
            problems.push(format!("{name}: {id} is {:?}", finding(id)));
        }
    }
    let offered: BTreeSet<&str> = findings
        .iter()
        .filter_map(|(id, _, _)| id.strip_prefix("cipher_"))
        .filter(|hex| hex.starts_with('x'))
        .collect();
    if offered.is_empty() {
        problems.push(format!("{name}: testssl listed no cipher suites"));
    }
    for hex in &offered {
        if !ALLOWED_SUITES.contains(hex) {
            problems.push(format!("{name}: suite {hex} is offered"));
        }
    }
    if client_certificate_required && !service.contains("certificate-based authentication") {
        problems.push(format!(
            "{name}: testssl did not find a client certificate required (service {service:?})"
        ));
    }
    problems
}

/// A TLS 1.2 handshake with `openssl s_client` (which sends extended_master_secret).
fn tls12_with_openssl(name: &str, target: &str) -> Vec<String> {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("echo | openssl s_client -connect {target} -tls1_2 2>&1"),
        ])
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = text
        .lines()
        .any(|l| l.contains("Protocol") && l.contains("TLSv1.2"))
        && [
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES128-GCM-SHA256",
        ]
        .iter()
        .any(|s| text.contains(s));
    if ok {
        Vec::new()
    } else {
        vec![format!(
            "{name}: openssl s_client -tls1_2 found no TLS 1.2 with ECDHE + AES-GCM:\n{text}"
        )]
    }
}

fn ready_port(file: &Path) -> Option<u16> {
    fs::read_to_string(file)
        .ok()?
        .trim()
        .rsplit_once(':')?
        .1
        .parse()
        .ok()
}

#[test]
fn testssl_finds_nothing_high_or_critical_on_the_mqtt_and_https_ports() {
    let bin = testssl_binary();
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path();
    let pki = work.join("pki");
    let d = pki.to_str().expect("utf-8 path");
    gridward_ok(&[
        "pki",
        "init",
        "--dir",
        d,
        "--crl-url",
        "http://pki.gridward.test/crl",
    ]);
    for (name, sans) in [
        ("localhost", ["localhost", "127.0.0.1"]),
        ("sink", ["localhost", "127.0.0.1"]),
    ] {
        gridward_ok(&[
            "pki", "issue", "server", "--dir", d, "--name", name, "--san", sans[0], "--san",
            sans[1],
        ]);
    }
    gridward_ok(&["pki", "issue", "client", "--dir", d, "--name", "hes"]);
    gridward_ok(&[
        "pki", "issue", "meter", "--dir", d, "--count", "3", "--prefix", "t",
    ]);

    // The sink, then the head-end forwarding to it.
    let ready = work.join("sink.addr");
    let sink_log = work.join("sink.log");
    let mut sink = Command::new(env!("CARGO_BIN_EXE_gridward"))
        .args([
            "sink",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            d,
            "--stats-every",
            "0",
        ])
        .arg("--store")
        .arg(work.join("sink.db"))
        .arg("--key")
        .arg(format!(
            "hes={}",
            pki.join("clients/hes/cert.pem").display()
        ))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(fs::File::create(&sink_log).expect("log"))
        .stderr(fs::File::create(work.join("sink.err")).expect("log"))
        .spawn()
        .expect("start gridward sink");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let sink = Kill(&mut sink);
    let sink_port = wait_for(
        Duration::from_secs(30),
        "the sink to listen",
        || ready_port(&ready),
        || fs::read_to_string(work.join("sink.err")).unwrap_or_default(),
    );
    let forward = format!(
        "queue_depth = 8192\n\n[[forward]]\nname = \"billing\"\nurl = \"https://127.0.0.1:{sink_port}/readings\"\nclient = \"hes\"\n"
    );
    // testssl makes hundreds of handshakes without a client certificate: each is a failure that
    // counts towards a ban of its address, and a banned scanner sees nothing. An auditor's
    // address is exempted, as it would be in a real audit.
    let h = Headend::start(
        work,
        &pki,
        &[
            ("queue_depth = 8192", forward.as_str()),
            ("ban_exempt = []", "ban_exempt = [\"127.0.0.1\"]"),
        ],
    );

    // One audit after the other: testssl runs hundreds of openssl processes, and two at once on
    // two cores starve each other into timeouts that read as "not offered".
    let ca: PathBuf = pki.join("ca/root.crt.pem");
    let mqtt = format!("127.0.0.1:{}", h.port);
    let https = format!("https://127.0.0.1:{sink_port}");
    // The API: the same profile, a client certificate optional (people log in with a session).
    let api_addr = format!("127.0.0.1:{}", h.api_port());
    let api = format!("https://{api_addr}/healthz");
    let mqtt_result = audit_conclusively(bin, &mqtt, &ca, &work.join("mqtt.json"));
    let https_result = audit_conclusively(bin, &https, &ca, &work.join("https.json"));
    let api_result = audit_conclusively(bin, &api, &ca, &work.join("api.json"));
    let mut problems = check("MQTT port", &mqtt_result.0, &mqtt_result.1, true, None);
    problems.extend(check(
        "HTTPS port",
        &https_result.0,
        &https_result.1,
        true,
        None,
    ));
    problems.extend(check(
        "API port",
        &api_result.0,
        &api_result.1,
        false,
        Some(&api_addr),
    ));
    // The summary for the record (visible with --nocapture).
    for (name, (findings, service)) in [
        ("MQTT", &mqtt_result),
        ("HTTPS", &https_result),
        ("API", &api_result),
    ] {
        let count = |sev: &str| findings.iter().filter(|(_, s, _)| s == sev).count();
        eprintln!(
            "testssl {name}: {} findings: CRITICAL {}, HIGH {}, MEDIUM {}, LOW {}, WARN {}; service: {service}",
            findings.len(),
            count("CRITICAL"),
            count("HIGH"),
            count("MEDIUM"),
            count("LOW"),
            count("WARN")
        );
        for (id, sev, f) in findings
            .iter()
            .filter(|(_, s, _)| s == "MEDIUM" || s == "LOW")
        {
            eprintln!("  {sev} {id}: {f}");
        }
    }
    assert!(
        problems.is_empty(),
        "testssl findings:\n{}",
        problems.join("\n")
    );

    // Meters with CRL distribution points in their certificates get through, and so do the
    // deliveries to the sink.
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
            "t",
            "--interval",
            "0.2",
            "--duration",
            "2",
            "--drain",
            "10",
        ],
    );
    let _ = fleet.wait(Duration::from_secs(60));
    let stored: usize = (1..=3)
        .map(|i| h.stored_counters(&format!("t{i:06}")).len())
        .sum();
    assert!(
        stored >= 3,
        "meters with CDP certificates stored only {stored} readings"
    );
    wait_for(
        Duration::from_secs(30),
        "the readings to reach the sink",
        || {
            let out = gridward_ok(&["outbox", "--db", h.db.to_str().expect("utf-8")]);
            out.lines()
                .find(|l| l.starts_with("billing"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
                .filter(|pending| pending == "0")
        },
        || gridward_ok(&["outbox", "--db", h.db.to_str().expect("utf-8")]),
    );
    drop(sink);
}
