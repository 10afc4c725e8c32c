//! OpenSSL as an independent peer: it verifies our chains and CRLs, and completes (or is refused)
//! mutual TLS against a rustls server built by `gridward_pki::tls`.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use gridward_pki::{LeafKind, Pki};

use crate::support::{TempPki, gridward_ok, tool, tool_ok};

fn pki_with_leaves() -> TempPki {
    let pki = TempPki::new(&[]);
    gridward_ok(&["pki", "issue", "meter", "--dir", pki.dir(), "--id", "m-ok"]);
    gridward_ok(&[
        "pki",
        "issue",
        "meter",
        "--dir",
        pki.dir(),
        "--id",
        "m-revoked",
    ]);
    gridward_ok(&[
        "pki",
        "issue",
        "server",
        "--dir",
        pki.dir(),
        "--name",
        "localhost",
        "--san",
        "localhost",
        "--san",
        "127.0.0.1",
    ]);
    gridward_ok(&[
        "pki",
        "issue",
        "client",
        "--dir",
        pki.dir(),
        "--name",
        "billing",
    ]);
    gridward_ok(&[
        "pki",
        "revoke",
        "--dir",
        pki.dir(),
        "--id",
        "m-revoked",
        "--reason",
        "keyCompromise",
    ]);
    pki
}

fn openssl_verify(pki: &TempPki, leaf: &str) -> std::process::Output {
    tool(
        "openssl",
        &[
            "verify",
            "-crl_check_all",
            "-CAfile",
            &pki.path("ca/root.crt.pem"),
            "-untrusted",
            &pki.path("ca/issuing.crt.pem"),
            "-CRLfile",
            &pki.path("crl/root.crl.pem"),
            "-CRLfile",
            &pki.path("crl/issuing.crl.pem"),
            &pki.path(leaf),
        ],
        pki.work(),
    )
}

#[test]
fn openssl_verify_accepts_issued_and_rejects_revoked() {
    let pki = pki_with_leaves();
    for leaf in [
        "meters/m-ok/cert.pem",
        "servers/localhost/cert.pem",
        "clients/billing/cert.pem",
        "ca/issuing.crt.pem",
    ] {
        let out = openssl_verify(&pki, leaf);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(": OK"),
            "{leaf}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = openssl_verify(&pki, "meters/m-revoked/cert.pem");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "revoked certificate verified: {all}");
    assert!(all.contains("certificate revoked"), "{all}");
}

#[test]
fn openssl_crl_verify_accepts_both_crls() {
    let pki = pki_with_leaves();
    for (crl, issuer) in [
        ("crl/issuing.crl.pem", "ca/issuing.crt.pem"),
        ("crl/root.crl.pem", "ca/root.crt.pem"),
    ] {
        let out = tool_ok(
            "openssl",
            &[
                "crl",
                "-in",
                &pki.path(crl),
                "-CAfile",
                &pki.path(issuer),
                "-noout",
                "-verify",
                "-nextupdate",
            ],
            pki.work(),
        );
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(all.contains("verify OK"), "{crl}: {all}");
        assert!(all.contains("nextUpdate="), "{crl}: {all}");
    }
    let out = tool_ok(
        "openssl",
        &[
            "crl",
            "-in",
            &pki.path("crl/issuing.crl.pem"),
            "-noout",
            "-text",
        ],
        pki.work(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Key Compromise"),
        "revocation reason missing from CRL:\n{text}"
    );
}

/// A one-shot-per-connection rustls server on 127.0.0.1: for every connection it completes the
/// handshake, writes `hello`, and reports the outcome.
struct Server {
    port: u16,
    results: mpsc::Receiver<Result<String, String>>,
}

fn start_server(pki: &TempPki) -> Server {
    let material = Pki::open(&pki.dir, None)
        .expect("open pki")
        .tls_material(LeafKind::Server, "localhost")
        .expect("server material");
    let config = gridward_pki::tls::server_config(&material).expect("server config");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, results) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let tx = tx.clone();
            let config = Arc::clone(&config);
            thread::spawn(move || {
                let _ = tx.send(serve_one(config, stream));
            });
        }
    });
    Server { port, results }
}

fn serve_one(config: Arc<rustls::ServerConfig>, mut stream: TcpStream) -> Result<String, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut stream).map_err(|e| e.to_string())?;
    }
    let version = format!("{:?}", conn.protocol_version());
    let suite = format!("{:?}", conn.negotiated_cipher_suite().map(|s| s.suite()));
    let mut tls = rustls::Stream::new(&mut conn, &mut stream);
    tls.write_all(b"hello\n").map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    // The client certificate was checked during the handshake (TLS 1.3 included): close.
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(&mut stream).map_err(|e| e.to_string())?;
    }
    Ok(format!("{version} {suite}"))
}

fn s_client(server: &Server, pki: &TempPki, extra: &[&str]) -> (String, Result<String, String>) {
    let connect = format!("127.0.0.1:{}", server.port);
    let root = pki.path("ca/root.crt.pem");
    let mut args = vec![
        "s_client",
        "-connect",
        &connect,
        "-servername",
        "localhost",
        "-CAfile",
        &root,
        "-verify_return_error",
        "-ign_eof",
    ];
    args.extend_from_slice(extra);
    // `-cert` sends only the first certificate of the file; the issuing CA goes in `-cert_chain`.
    if let Some(i) = extra.iter().position(|a| *a == "-cert") {
        args.extend_from_slice(&["-cert_chain", extra[i + 1]]);
    }
    let out = tool("openssl", &args, pki.work());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result = server
        .results
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| Err("no server result".to_owned()));
    (all, result)
}

#[test]
fn s_client_mutual_tls_against_rustls_server() {
    let pki = pki_with_leaves();
    let server = start_server(&pki);
    let client_cert = pki.path("clients/billing/chain.pem");
    let client_key = pki.path("clients/billing/key.pem");

    // A gridward-issued client certificate: handshake completes, with TLS 1.3 and with TLS 1.2.
    for version in ["-tls1_3", "-tls1_2"] {
        let (out, result) = s_client(
            &server,
            &pki,
            &[version, "-cert", &client_cert, "-key", &client_key],
        );
        let negotiated = result
            .unwrap_or_else(|e| panic!("{version}: server refused a valid client: {e}\n{out}"));
        assert!(
            out.contains("hello"),
            "{version}: no application data: {out}"
        );
        assert!(
            negotiated.contains("GCM"),
            "{version}: negotiated {negotiated}"
        );
        assert!(
            out.contains("Verify return code: 0 (ok)"),
            "{version}: server chain not verified by openssl: {out}"
        );
    }

    // No client certificate.
    let (out, result) = s_client(&server, &pki, &[]);
    assert!(
        result.is_err(),
        "accepted a client without certificate: {out}"
    );
    assert!(!out.contains("hello"), "{out}");

    // A revoked meter certificate.
    let (out, result) = s_client(
        &server,
        &pki,
        &[
            "-cert",
            &pki.path("meters/m-revoked/chain.pem"),
            "-key",
            &pki.path("meters/m-revoked/key.pem"),
        ],
    );
    let err = result.expect_err("revoked client accepted");
    assert!(err.to_lowercase().contains("revoked"), "{err}\n{out}");

    // A client certificate from a foreign CA.
    let foreign = TempPki::new(&[]);
    gridward_ok(&[
        "pki",
        "issue",
        "client",
        "--dir",
        foreign.dir(),
        "--name",
        "billing",
    ]);
    let (out, result) = s_client(
        &server,
        &pki,
        &[
            "-cert",
            &foreign.path("clients/billing/chain.pem"),
            "-key",
            &foreign.path("clients/billing/key.pem"),
        ],
    );
    assert!(result.is_err(), "foreign-CA client accepted: {out}");

    // TLS 1.1, even with the client's own security level lowered so it really offers it.
    let (out, result) = s_client(
        &server,
        &pki,
        &[
            "-tls1_1",
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-cert",
            &client_cert,
            "-key",
            &client_key,
        ],
    );
    assert!(result.is_err(), "TLS 1.1 accepted: {out}");
    assert!(!out.contains("hello"), "{out}");

    // A TLS 1.2 CBC suite and RSA key exchange are not offered.
    let (out, result) = s_client(
        &server,
        &pki,
        &[
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES128-SHA256:AES128-GCM-SHA256",
            "-cert",
            &client_cert,
            "-key",
            &client_key,
        ],
    );
    assert!(result.is_err(), "non-allowed TLS 1.2 suite accepted: {out}");
}

#[test]
fn openssl_csr_requests_are_not_honoured() {
    let pki = TempPki::new(&[]);
    // A CSR asking to be a CA with extra EKUs, for a meter.
    tool_ok(
        "openssl",
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "o.key",
            "-subj",
            "/CN=o-1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "extendedKeyUsage=serverAuth,codeSigning",
            "-addext",
            "subjectAltName=DNS:evil.example",
            "-out",
            "o.csr",
        ],
        pki.work(),
    );
    let csr = pki.work().join("o.csr");
    let out = pki.work().join("o.pem");
    gridward_ok(&[
        "pki",
        "sign-csr",
        "--dir",
        pki.dir(),
        "--csr",
        csr.to_str().expect("utf-8"),
        "--profile",
        "meter",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let text = tool_ok(
        "openssl",
        &["x509", "-in", "o.pem", "-noout", "-text"],
        pki.work(),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(
        !text.contains("Code Signing") && !text.contains("TLS Web Server Authentication"),
        "{text}"
    );
    assert!(
        !text.contains("evil.example") && text.contains("URI:urn:gridward:meter:o-1"),
        "{text}"
    );
    let verify = openssl_verify(&pki, "../o.pem");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Ed25519 CSRs from OpenSSL are accepted too.
    tool_ok(
        "openssl",
        &[
            "req", "-new", "-newkey", "ed25519", "-nodes", "-keyout", "e.key", "-subj", "/CN=e-1",
            "-out", "e.csr",
        ],
        pki.work(),
    );
    let csr = pki.work().join("e.csr");
    let out = pki.work().join("e.pem");
    gridward_ok(&[
        "pki",
        "sign-csr",
        "--dir",
        pki.dir(),
        "--csr",
        csr.to_str().expect("utf-8"),
        "--profile",
        "meter",
        "--out",
        out.to_str().expect("utf-8"),
    ]);

    // A CSR whose signature does not match is refused.
    let mut der = tool_ok(
        "openssl",
        &["req", "-in", "o.csr", "-outform", "DER"],
        pki.work(),
    )
    .stdout;
    let last = der.len() - 5;
    der[last] ^= 0x01;
    std::fs::write(pki.work().join("bad.csr"), &der).expect("write");
    let bad = pki.work().join("bad.csr");
    let res = crate::support::gridward(&[
        "pki",
        "sign-csr",
        "--dir",
        pki.dir(),
        "--csr",
        bad.to_str().expect("utf-8"),
        "--profile",
        "meter",
        "--out",
        "/dev/null",
    ]);
    assert!(
        !res.status.success(),
        "CSR with a broken signature was signed"
    );
    let err = String::from_utf8_lossy(&res.stderr).to_lowercase();
    assert!(err.contains("signature"), "{err}");
}
