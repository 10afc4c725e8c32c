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
//!
//! testssl runs once per port. Two of its answers depend on a race inside the scanner, and
//! there OpenSSL settles the point directly.
//! testssl (3.0.x, `determine_optimal_proto` / `sclient_auth`) decides that a port requires a
//! client certificate only if `openssl s_client -msg </dev/null` exits non-zero after a
//! handshake with a CertificateRequest.
//! In TLS 1.3 the server's `certificate_required` alert comes after the client's Finished: when
//! the server answers late (a loaded machine), s_client has already read EOF on stdin and
//! exited 0, and testssl believes no client certificate is needed.
//! Its service detection (a GET over s_client) then gets the alert instead of HTTP ("Couldn't
//! determine service"), and its TLS 1.2 probe (its own ClientHello, without a client
//! certificate and without extended_master_secret, which the profile requires; the API port
//! has the same) is refused and reads "TLS1_2 not offered".
//! Neither is a finding. testssl's other results do not depend on it (protocols refused at the
//! ServerHello, the cipher suites the server picks, HIGH/CRITICAL ratings) and are always
//! checked. Where testssl could not tell:
//! - TLS 1.2 "not offered": `openssl s_client -tls1_2` (its ClientHello has
//!   extended_master_secret), with a valid client certificate where the port requires one (a
//!   meter's for MQTT, `hes` for the sink), must complete a TLS 1.2 handshake with an allowed
//!   ECDHE + AES-GCM suite, and on an HTTP port get an answer to a request;
//! - no "certificate-based authentication" on a port that must require it: `openssl s_client`
//!   without a client certificate, with TLS 1.3 and with TLS 1.2, must receive an alert from the
//!   server (certificate required or handshake failure) and no application data. It runs with
//!   `-ign_eof`, so it waits for the server to end the connection instead of racing it.
//!
//! The log (`--nocapture`) says which path was taken on each port, and how long testssl took.
//! Afterwards a few meters send through the same head-end to the same sink: certificates with
//! a CRL distribution point work end to end with the CRL checks of both servers.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// A port under audit.
struct Port<'a> {
    /// For messages: "MQTT port".
    name: &'a str,
    /// `host:port`, for OpenSSL.
    addr: String,
    /// What testssl is pointed at (`host:port` or a URL).
    testssl_target: String,
    /// The path of an HTTP request to send over OpenSSL's connection; `None` for MQTT.
    http_path: Option<&'a str>,
    /// The port must refuse a client without certificate.
    client_certificate_required: bool,
    /// A valid client certificate (chain: leaf then issuing CA) and its key, for OpenSSL's
    /// TLS 1.2 handshake on a port that requires one.
    client: Option<(PathBuf, PathBuf)>,
}

/// testssl's findings (id, severity, finding) and the service it detected.
struct Audit {
    findings: Vec<(String, String, String)>,
    service: String,
    seconds: f64,
}

/// Runs testssl once against the port.
fn audit(bin: &str, port: &Port<'_>, ca: &Path, json: &Path) -> Audit {
    let started = Instant::now();
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
        .arg(&port.testssl_target)
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
    Audit {
        findings,
        service: scan["service"].as_str().unwrap_or_default().to_owned(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// The problems with a port's audit; where testssl's answer depends on its client-auth
/// detection (see the module doc), OpenSSL settles it.
fn check(port: &Port<'_>, audit: &Audit, ca: &Path, work: &Path) -> Vec<String> {
    let name = port.name;
    let findings = &audit.findings;
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
    if !finding("TLS1_3").starts_with("offered") {
        problems.push(format!("{name}: TLS1_3 is {:?}", finding("TLS1_3")));
    }
    if finding("TLS1_2").starts_with("offered") {
        eprintln!("{name}: testssl found TLS 1.2 offered");
    } else if finding("TLS1_2").starts_with("not offered") {
        // testssl's own TLS 1.2 ClientHello carries no extended_master_secret extension, which
        // the profile requires (RFC 7627, BSI TR-02102-2), and no client certificate: it is
        // refused and reads "not offered". OpenSSL's ClientHello has the extension.
        eprintln!(
            "{name}: testssl says TLS1_2 {:?}; proving TLS 1.2 with openssl s_client -tls1_2{}",
            finding("TLS1_2"),
            if port.client.is_some() {
                " and a client certificate"
            } else {
                ""
            }
        );
        problems.extend(tls12_with_openssl(port, ca, work));
    } else {
        problems.push(format!("{name}: TLS1_2 is {:?}", finding("TLS1_2")));
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
    if port.client_certificate_required {
        if audit.service.contains("certificate-based authentication") {
            eprintln!("{name}: testssl found a client certificate required");
        } else {
            eprintln!(
                "{name}: testssl did not find a client certificate required (service {:?}); \
                 proving it with openssl s_client -tls1_3 and -tls1_2 without a certificate",
                audit.service
            );
            problems.extend(client_certificate_refused(port, ca, work));
        }
    }
    problems
}

/// TLS 1.2 suites (OpenSSL's names) Gridward may negotiate.
const ALLOWED_TLS12: [&str; 4] = [
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
];

/// What `openssl s_client` printed (stdout and stderr, in order) and whether it exited 0.
struct SClient {
    success: bool,
    text: String,
}

/// Runs `openssl s_client -connect ADDR -CAfile CA ARGS`, writes `input` to it and closes its
/// stdin. Gives up (a problem, not a hang) after a minute.
fn s_client(addr: &str, ca: &Path, args: &[&str], input: &[u8], out_file: &Path) -> SClient {
    let out = fs::File::create(out_file).expect("s_client output file");
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-CAfile"])
        .arg(ca)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .expect("run openssl s_client");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        // A server that closed early makes this fail; what it said is in the output.
        let _ = stdin.write_all(input);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for openssl") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::from_utf8_lossy(&fs::read(out_file).unwrap_or_default()).into_owned();
    if status.is_none() {
        text.push_str("\n(killed after 60 s)");
    }
    SClient {
        success: status.is_some_and(|s| s.success()),
        text,
    }
}

/// An HTTP request that asks the server to close the connection after its answer.
fn http_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A TLS 1.2 handshake with `openssl s_client` (which sends extended_master_secret), with the
/// port's client certificate if it has one. In TLS 1.2 the server's Finished follows its check
/// of the client's certificate, so a handshake that completes (exit 0, no alert) was accepted.
/// On an HTTP port the request must be answered as well.
fn tls12_with_openssl(port: &Port<'_>, ca: &Path, work: &Path) -> Vec<String> {
    let name = port.name;
    let mut args = vec!["-tls1_2".to_owned()];
    if let Some((chain, key)) = &port.client {
        let chain = chain.to_str().expect("utf-8 path").to_owned();
        // `-cert` sends only the first certificate of the file; the issuing CA goes in
        // `-cert_chain`.
        args.extend([
            "-cert".to_owned(),
            chain.clone(),
            "-cert_chain".to_owned(),
            chain,
        ]);
        args.extend(["-key".to_owned(), key.to_str().expect("utf-8").to_owned()]);
    }
    let input = match port.http_path {
        Some(path) => {
            // Wait for the answer: the server closes after it (Connection: close).
            args.push("-ign_eof".to_owned());
            http_request(path)
        }
        // Stdin is read only after the handshake: EOF then ends the session.
        None => Vec::new(),
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let file = work.join(format!("s_client-tls12-{}.txt", name.replace(' ', "-")));
    let r = s_client(&port.addr, ca, &args, &input, &file);
    let protocol = r
        .text
        .lines()
        .any(|l| l.trim_start().starts_with("Protocol") && l.contains("TLSv1.2"));
    let suite = ALLOWED_TLS12.iter().find(|s| {
        r.text
            .lines()
            .any(|l| l.contains("Cipher") && l.contains(*s))
    });
    let alert = r.text.to_lowercase().contains("alert");
    let answered = port.http_path.is_none() || r.text.lines().any(|l| l.starts_with("HTTP/1.1 "));
    if r.success
        && protocol
        && !alert
        && answered
        && let Some(suite) = suite
    {
        eprintln!("{name}: openssl s_client completed TLS 1.2 with {suite}");
        Vec::new()
    } else {
        vec![format!(
            "{name}: openssl s_client -tls1_2 completed no TLS 1.2 handshake with ECDHE + \
             AES-GCM (exit ok {}, protocol {protocol}, suite {suite:?}, alert {alert}, \
             answered {answered}):\n{}",
            r.success, r.text
        )]
    }
}

/// Without a client certificate, OpenSSL with TLS 1.3 and with TLS 1.2 must be refused by the
/// server with an alert (OpenSSL reports a received alert as "... alert certificate required"
/// or "... alert handshake failure" with "SSL alert number N"), and no application data may come
/// back. `-ign_eof` makes s_client wait until the server ends the connection, so a slow
/// server's late alert in TLS 1.3 (after the client's Finished) is not missed.
fn client_certificate_refused(port: &Port<'_>, ca: &Path, work: &Path) -> Vec<String> {
    let name = port.name;
    let mut problems = Vec::new();
    for version in ["-tls1_3", "-tls1_2"] {
        // Send a request as a client would; the server must answer it with nothing but the
        // alert.
        let input = port.http_path.map(http_request).unwrap_or_default();
        let file = work.join(format!(
            "s_client-nocert{version}-{}.txt",
            name.replace(' ', "-")
        ));
        let r = s_client(&port.addr, ca, &[version, "-ign_eof"], &input, &file);
        let lower = r.text.to_lowercase();
        let alert = r.text.lines().find(|l| {
            let l = l.to_lowercase();
            l.contains("ssl alert number")
                && (l.contains("alert certificate required")
                    || l.contains("alert handshake failure"))
        });
        let http = r.text.lines().any(|l| l.starts_with("HTTP/"));
        if !r.success
            && !http
            && let Some(alert) = alert
        {
            let alert = alert
                .rsplit_once("ssl3_read_bytes:")
                .map_or(alert, |(_, a)| a);
            eprintln!("{name}: openssl s_client {version} without certificate refused: {alert}");
        } else {
            problems.push(format!(
                "{name}: openssl s_client {version} without a client certificate was not refused \
                 with an alert (exit ok {}, alert {}, HTTP answer {http}):\n{}",
                r.success,
                lower.contains("alert"),
                r.text
            ));
        }
    }
    problems
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
    let mqtt_addr = format!("127.0.0.1:{}", h.port);
    let sink_addr = format!("127.0.0.1:{sink_port}");
    let api_addr = format!("127.0.0.1:{}", h.api_port());
    let ports = [
        Port {
            name: "MQTT port",
            testssl_target: mqtt_addr.clone(),
            addr: mqtt_addr,
            http_path: None,
            client_certificate_required: true,
            client: Some((
                pki.join("meters/t000001/chain.pem"),
                pki.join("meters/t000001/key.pem"),
            )),
        },
        Port {
            name: "HTTPS port",
            testssl_target: format!("https://{sink_addr}"),
            addr: sink_addr,
            http_path: Some("/"),
            client_certificate_required: true,
            client: Some((
                pki.join("clients/hes/chain.pem"),
                pki.join("clients/hes/key.pem"),
            )),
        },
        // The API: the same profile, a client certificate optional (people log in with a
        // session).
        Port {
            name: "API port",
            testssl_target: format!("https://{api_addr}/healthz"),
            addr: api_addr,
            http_path: Some("/healthz"),
            client_certificate_required: false,
            client: None,
        },
    ];
    let mut problems = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let result = audit(bin, port, &ca, &work.join(format!("testssl-{i}.json")));
        // The summary for the record (visible with --nocapture).
        let findings = &result.findings;
        let count = |sev: &str| findings.iter().filter(|(_, s, _)| s == sev).count();
        eprintln!(
            "testssl {}: {:.0} s, {} findings: CRITICAL {}, HIGH {}, MEDIUM {}, LOW {}, WARN {}; service: {}",
            port.name,
            result.seconds,
            findings.len(),
            count("CRITICAL"),
            count("HIGH"),
            count("MEDIUM"),
            count("LOW"),
            count("WARN"),
            result.service
        );
        for (id, sev, f) in findings
            .iter()
            .filter(|(_, s, _)| s == "MEDIUM" || s == "LOW")
        {
            eprintln!("  {sev} {id}: {f}");
        }
        problems.extend(check(port, &result, &ca, work));
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
