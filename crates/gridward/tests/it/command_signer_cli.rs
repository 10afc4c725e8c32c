//! `gridward pki issue command-signer NAME`: the head-end's command-signing certificate, as
//! OpenSSL sees it, and refused for TLS.

use crate::support::{TempPki, gridward, gridward_ok, tool, tool_ok};

#[test]
fn pki_issues_a_command_signer_that_openssl_shows_without_tls_ekus() {
    let pki = TempPki::new(&[]);
    let out = gridward_ok(&["pki", "issue", "command-signer", "--dir", pki.dir(), "hes"]);
    assert!(
        out.contains("issued command-signer certificate for hes"),
        "{out}"
    );
    assert!(out.contains(gridward_pki::COMMAND_SIGNING_EKU), "{out}");
    let cert = pki.path("command-signers/hes/cert.pem");
    let text = tool_ok(
        "openssl",
        &["x509", "-in", &cert, "-noout", "-text"],
        pki.work(),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("X509v3 Extended Key Usage: critical"),
        "{text}"
    );
    assert!(text.contains(gridward_pki::COMMAND_SIGNING_EKU), "{text}");
    assert!(!text.contains("TLS Web"), "{text}");
    // The chain is good, but not for TLS.
    let verify = |purpose: &str| {
        tool(
            "openssl",
            &[
                "verify",
                "-CAfile",
                &pki.path("ca/root.crt.pem"),
                "-untrusted",
                &pki.path("ca/issuing.crt.pem"),
                "-purpose",
                purpose,
                &cert,
            ],
            pki.work(),
        )
    };
    assert!(verify("any").status.success());
    assert!(!verify("sslclient").status.success());
    assert!(!verify("sslserver").status.success());

    // --name works too; a second certificate of the same name needs --replace.
    gridward_ok(&[
        "pki",
        "issue",
        "command-signer",
        "--dir",
        pki.dir(),
        "--name",
        "hes-2",
    ]);
    let again = gridward(&["pki", "issue", "command-signer", "--dir", pki.dir(), "hes"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--replace"));
    gridward_ok(&[
        "pki",
        "issue",
        "command-signer",
        "--dir",
        pki.dir(),
        "hes",
        "--replace",
    ]);
    let list = gridward_ok(&["pki", "list", "--dir", pki.dir()]);
    assert_eq!(list.matches("command-signer").count(), 3, "{list}");

    // Revocation and PKCS#12 export by kind.
    gridward_ok(&[
        "pki",
        "revoke",
        "--dir",
        pki.dir(),
        "--kind",
        "command-signer",
        "--id",
        "hes-2",
        "--reason",
        "superseded",
    ]);
    let pw = pki.work().join("pw");
    std::fs::write(&pw, "changeit\n").unwrap();
    gridward_ok(&[
        "pki",
        "export",
        "--dir",
        pki.dir(),
        "--kind",
        "command-signer",
        "--id",
        "hes",
        "--p12",
        pki.work().join("hes.p12").to_str().unwrap(),
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    let help = gridward_ok(&["pki", "issue", "--help"]);
    assert!(help.contains("command-signer"), "{help}");
}
