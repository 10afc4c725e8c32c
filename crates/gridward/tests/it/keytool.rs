//! Java keytool as an independent peer: keytool CSRs are signed and the reply installs,
//! gridward PKCS#12 stores list in keytool, and keytool stores import.

use std::fs;

use crate::support::{TempPki, gridward, gridward_ok, tool_ok};

const PASS: &str = "changeit";

fn keytool(pki: &TempPki, args: &[&str]) -> String {
    let out = tool_ok("keytool", args, pki.work());
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn genkeypair(pki: &TempPki, store: &str, alias: &str, cn: &str, keyalg: &[&str]) {
    let dname = format!("CN={cn}");
    let mut args = vec![
        "-genkeypair",
        "-alias",
        alias,
        "-dname",
        &dname,
        "-keystore",
        store,
        "-storetype",
        "PKCS12",
        "-storepass",
        PASS,
        "-keypass",
        PASS,
        "-validity",
        "30",
    ];
    args.extend_from_slice(keyalg);
    keytool(pki, &args);
}

#[test]
fn keytool_csr_is_signed_and_reply_installs_then_imports() {
    let pki = TempPki::new(&[]);
    let pw = pki.work().join("pw.txt");
    fs::write(&pw, format!("{PASS}\n")).expect("write password file");
    let pw = pw.to_str().expect("utf-8");

    for (cn, keyalg) in [
        (
            "kt-rsa",
            vec![
                "-keyalg",
                "RSA",
                "-keysize",
                "2048",
                "-sigalg",
                "SHA256withRSA",
            ],
        ),
        (
            "kt-ec",
            vec![
                "-keyalg",
                "EC",
                "-groupname",
                "secp256r1",
                "-sigalg",
                "SHA256withECDSA",
            ],
        ),
    ] {
        let store = format!("{cn}.p12");
        genkeypair(&pki, &store, "meter", cn, &keyalg);
        let csr = format!("{cn}.csr");
        keytool(
            &pki,
            &[
                "-certreq",
                "-alias",
                "meter",
                "-keystore",
                &store,
                "-storepass",
                PASS,
                "-file",
                &csr,
            ],
        );
        // keytool puts a SubjectKeyIdentifier extension request into the CSR.
        let csr_text = tool_ok(
            "openssl",
            &["req", "-in", &csr, "-noout", "-text"],
            pki.work(),
        );
        assert!(
            String::from_utf8_lossy(&csr_text.stdout).contains("Subject Key Identifier"),
            "keytool CSR without SKI?"
        );

        let reply = format!("{cn}-reply.pem");
        let csr_path = pki.work().join(&csr);
        let reply_path = pki.work().join(&reply);
        gridward_ok(&[
            "pki",
            "sign-csr",
            "--dir",
            pki.dir(),
            "--csr",
            csr_path.to_str().expect("utf-8"),
            "--profile",
            "meter",
            "--out",
            reply_path.to_str().expect("utf-8"),
        ]);

        let root = pki.path("ca/root.crt.pem");
        keytool(
            &pki,
            &[
                "-importcert",
                "-noprompt",
                "-alias",
                "gridward-root",
                "-file",
                &root,
                "-keystore",
                &store,
                "-storepass",
                PASS,
            ],
        );
        let out = keytool(
            &pki,
            &[
                "-importcert",
                "-alias",
                "meter",
                "-file",
                &reply,
                "-keystore",
                &store,
                "-storepass",
                PASS,
                "-keypass",
                PASS,
            ],
        );
        assert!(
            out.contains("Certificate reply was installed"),
            "{cn}: {out}"
        );
        let listing = keytool(
            &pki,
            &[
                "-list",
                "-v",
                "-alias",
                "meter",
                "-keystore",
                &store,
                "-storepass",
                PASS,
            ],
        );
        assert!(
            listing.contains("Certificate chain length: 3"),
            "{cn}: {listing}"
        );
        assert!(
            listing.contains(&format!("urn:gridward:meter:{cn}")),
            "{cn}: meter SAN missing: {listing}"
        );

        // The keytool keystore (key + gridward chain, plus the trusted root) imports back.
        let store_path = pki.work().join(&store);
        gridward_ok(&[
            "pki",
            "import",
            "--dir",
            pki.dir(),
            "--p12",
            store_path.to_str().expect("utf-8"),
            "--password-file",
            pw,
        ]);
        assert!(
            pki.dir.join(format!("meters/{cn}/key.pem")).exists(),
            "{cn}: imported key not stored"
        );
    }
    let list = gridward_ok(&["pki", "list", "--dir", pki.dir()]);
    assert!(list.contains("kt-rsa") && list.contains("kt-ec"), "{list}");
    let log = gridward_ok(&["pki", "log", "--dir", pki.dir()]);
    assert!(log.contains("sign-csr") && log.contains("import"), "{log}");
}

#[test]
fn gridward_p12_lists_in_keytool() {
    let pki = TempPki::new(&[]);
    let pw = pki.work().join("pw.txt");
    fs::write(&pw, format!("{PASS}\n")).expect("write password file");
    let pw = pw.to_str().expect("utf-8");
    gridward_ok(&["pki", "issue", "meter", "--dir", pki.dir(), "--id", "m-1"]);

    let out = pki.work().join("m-1.p12");
    gridward_ok(&[
        "pki",
        "export",
        "--dir",
        pki.dir(),
        "--id",
        "m-1",
        "--p12",
        out.to_str().expect("utf-8"),
        "--password-file",
        pw,
    ]);
    let listing = keytool(
        &pki,
        &[
            "-list",
            "-v",
            "-keystore",
            "m-1.p12",
            "-storetype",
            "PKCS12",
            "-storepass",
            PASS,
        ],
    );
    assert!(listing.contains("PrivateKeyEntry"), "{listing}");
    assert!(
        listing.contains("Certificate chain length: 3")
            || listing.contains("Certificate chain length: 2"),
        "{listing}"
    );

    let trust = pki.work().join("trust.p12");
    gridward_ok(&[
        "pki",
        "export",
        "--dir",
        pki.dir(),
        "--truststore",
        "--p12",
        trust.to_str().expect("utf-8"),
        "--password-file",
        pw,
    ]);
    let listing = keytool(
        &pki,
        &[
            "-list",
            "-keystore",
            "trust.p12",
            "-storetype",
            "PKCS12",
            "-storepass",
            PASS,
        ],
    );
    assert!(listing.contains("trustedCertEntry"), "{listing}");

    // Modern encryption: PBES2 with AES-256 (OpenSSL reads it too).
    let info = tool_ok(
        "openssl",
        &[
            "pkcs12",
            "-info",
            "-noout",
            "-in",
            "m-1.p12",
            "-passin",
            &format!("pass:{PASS}"),
        ],
        pki.work(),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&info.stdout),
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(text.contains("PBES2") && text.contains("AES-256"), "{text}");

    // A wrong password is refused with a clear error, not a panic.
    fs::write(pki.work().join("bad.txt"), "wrong\n").expect("write");
    let bad = pki.work().join("bad.txt");
    let res = gridward(&[
        "pki",
        "import",
        "--dir",
        pki.dir(),
        "--p12",
        out.to_str().expect("utf-8"),
        "--password-file",
        bad.to_str().expect("utf-8"),
    ]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.to_lowercase().contains("password"), "{err}");
}

#[test]
fn keytool_trust_store_imports() {
    let pki = TempPki::new(&[]);
    let pw = pki.work().join("pw.txt");
    fs::write(&pw, format!("{PASS}\n")).expect("write password file");
    // A foreign CA (say, the billing service's) in a keytool trust store.
    genkeypair(
        &pki,
        "foreign.p12",
        "foreign-ca",
        "Foreign CA",
        &["-keyalg", "EC", "-groupname", "secp256r1", "-ext", "bc:c"],
    );
    keytool(
        &pki,
        &[
            "-exportcert",
            "-rfc",
            "-alias",
            "foreign-ca",
            "-keystore",
            "foreign.p12",
            "-storepass",
            PASS,
            "-file",
            "foreign-ca.pem",
        ],
    );
    keytool(
        &pki,
        &[
            "-importcert",
            "-noprompt",
            "-alias",
            "billing-ca",
            "-file",
            "foreign-ca.pem",
            "-keystore",
            "truststore.p12",
            "-storetype",
            "PKCS12",
            "-storepass",
            PASS,
        ],
    );
    let ts = pki.work().join("truststore.p12");
    gridward_ok(&[
        "pki",
        "import",
        "--dir",
        pki.dir(),
        "--p12",
        ts.to_str().expect("utf-8"),
        "--password-file",
        pw.to_str().expect("utf-8"),
    ]);
    assert!(
        pki.dir
            .join("trusted")
            .read_dir()
            .expect("trusted dir")
            .count()
            >= 1
    );
}
