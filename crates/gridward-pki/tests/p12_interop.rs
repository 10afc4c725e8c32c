//! PKCS#12 interoperability with the real tools: Java 17 `keytool` and OpenSSL 3.
//!
//! These tests never skip: if `keytool` or `openssl` is missing they fail and say what to install.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gridward_pki::p12::{self, P12Error};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
    PKCS_RSA_SHA256, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

const PASSWORD: &str = "s3cret-store";

/// Runs a tool and returns its output, failing the test if the tool is absent or exits non-zero.
fn run(tool: &str, args: &[&str]) -> Output {
    let output = match Command::new(tool).args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{tool}` is not installed or not on PATH; this interoperability test needs it \
             (Debian: openjdk-17-jre-headless for keytool, openssl for openssl)"
        ),
        Err(e) => panic!("cannot run `{tool}`: {e}"),
    };
    assert!(
        output.status.success(),
        "`{tool} {}` failed: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

struct Chain {
    key: KeyPair,
    leaf_pem: String,
    ca_pem: String,
    certs: Vec<CertificateDer<'static>>,
}

/// CA -> leaf with `alg`.
fn chain(alg: &'static SignatureAlgorithm) -> Chain {
    let ca_key = KeyPair::generate_for(alg).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "Gridward interop CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(alg).unwrap();
    let mut leaf = CertificateParams::new(vec!["hes.example".to_owned()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "hes");
    let leaf_cert = leaf.signed_by(&key, &issuer).unwrap();
    Chain {
        key,
        leaf_pem: leaf_cert.pem(),
        ca_pem: ca_cert.pem(),
        certs: vec![leaf_cert.der().clone(), ca_cert.der().clone()],
    }
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn keytool_list(store: &Path) -> String {
    text(&run(
        "keytool",
        &[
            "-list",
            "-v",
            "-keystore",
            path_str(store),
            "-storetype",
            "PKCS12",
            "-storepass",
            PASSWORD,
        ],
    ))
}

fn export_key_store(c: &Chain, dir: &Path) -> PathBuf {
    let bytes =
        p12::export_key_store("hes-server", &c.key.serialize_der(), &c.certs, PASSWORD).unwrap();
    write(dir, "keystore.p12", bytes)
}

#[test]
fn keytool_lists_our_key_store_as_a_private_key_entry() {
    let dir = tempfile::tempdir().unwrap();
    for (name, alg) in [("ec", &PKCS_ECDSA_P256_SHA256), ("rsa", &PKCS_RSA_SHA256)] {
        let c = chain(alg);
        let store = export_key_store(&c, dir.path());
        let listing = keytool_list(&store);
        assert!(
            listing.contains("Your keystore contains 1 entry"),
            "{name}: {listing}"
        );
        assert!(
            listing.contains("Alias name: hes-server"),
            "{name}: {listing}"
        );
        assert!(
            listing.contains("Entry type: PrivateKeyEntry"),
            "{name}: {listing}"
        );
        assert!(
            listing.contains("Certificate chain length: 2"),
            "{name}: {listing}"
        );

        // keytool hands back the same end-entity certificate.
        let exported = run(
            "keytool",
            &[
                "-exportcert",
                "-rfc",
                "-alias",
                "hes-server",
                "-keystore",
                path_str(&store),
                "-storetype",
                "PKCS12",
                "-storepass",
                PASSWORD,
            ],
        );
        let cert = CertificateDer::from_pem_slice(&exported.stdout).unwrap();
        assert_eq!(cert, c.certs[0], "{name}");
    }
}

#[test]
fn keytool_decrypts_our_private_key_and_we_read_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(&PKCS_ECDSA_P256_SHA256);
    let store = export_key_store(&c, dir.path());
    let copy = dir.path().join("copy.p12");
    // Copying an entry makes keytool decrypt the key and re-encrypt it with its own settings.
    run(
        "keytool",
        &[
            "-importkeystore",
            "-noprompt",
            "-srckeystore",
            path_str(&store),
            "-srcstoretype",
            "PKCS12",
            "-srcstorepass",
            PASSWORD,
            "-destkeystore",
            path_str(&copy),
            "-deststoretype",
            "PKCS12",
            "-deststorepass",
            PASSWORD,
        ],
    );
    let contents = p12::read(&std::fs::read(&copy).unwrap(), PASSWORD).unwrap();
    let [entry] = &contents.keys[..] else {
        panic!("expected one key entry: {contents:?}");
    };
    assert_eq!(entry.alias, "hes-server");
    assert_eq!(entry.chain, c.certs);
    // Java may re-encode the PKCS#8 structure; the key must still match the certificate.
    p12::export_key_store("again", &entry.key_pkcs8_der, &entry.chain, PASSWORD).unwrap();
}

#[test]
fn openssl_sees_pbes2_aes256_and_a_sha256_mac() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(&PKCS_ECDSA_P256_SHA256);
    let store = export_key_store(&c, dir.path());
    let pass = format!("pass:{PASSWORD}");
    let info = text(&run(
        "openssl",
        &[
            "pkcs12",
            "-info",
            "-nokeys",
            "-in",
            path_str(&store),
            "-passin",
            &pass,
        ],
    ));
    assert!(info.contains("MAC: sha256"), "{info}");
    assert!(
        info.contains("PKCS7 Encrypted data: PBES2, PBKDF2, AES-256-CBC"),
        "{info}"
    );
    assert!(
        info.contains("Shrouded Keybag: PBES2, PBKDF2, AES-256-CBC"),
        "{info}"
    );
    assert!(info.contains("PRF hmacWithSHA256"), "{info}");

    // OpenSSL decrypts the key too, and finds the same one.
    let keys = run(
        "openssl",
        &[
            "pkcs12",
            "-nocerts",
            "-nodes",
            "-in",
            path_str(&store),
            "-passin",
            &pass,
        ],
    );
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&keys.stdout).unwrap();
    assert_eq!(key.secret_der(), c.key.serialize_der());
}

#[test]
fn keytool_lists_our_trust_store_as_trusted_cert_entries() {
    let dir = tempfile::tempdir().unwrap();
    let a = chain(&PKCS_ECDSA_P256_SHA256);
    let b = chain(&PKCS_ECDSA_P256_SHA256);
    let bytes = p12::export_trust_store(
        &[
            ("gridward-root".to_owned(), a.certs[1].clone()),
            ("partner-root".to_owned(), b.certs[1].clone()),
        ],
        PASSWORD,
    )
    .unwrap();
    let store = write(dir.path(), "truststore.p12", bytes);
    let listing = keytool_list(&store);
    assert!(
        listing.contains("Your keystore contains 2 entries"),
        "{listing}"
    );
    assert_eq!(
        listing.matches("Entry type: trustedCertEntry").count(),
        2,
        "{listing}"
    );
    assert!(listing.contains("Alias name: gridward-root"), "{listing}");
    assert!(listing.contains("Alias name: partner-root"), "{listing}");
}

fn keytool_genkeypair(store: &Path, key_args: &[&str]) {
    let mut args = vec![
        "-genkeypair",
        "-alias",
        "meter-7",
        "-dname",
        "CN=meter-7, O=Gridward",
        "-validity",
        "30",
        "-keystore",
        path_str(store),
        "-storetype",
        "PKCS12",
        "-storepass",
        PASSWORD,
        "-keypass",
        PASSWORD,
    ];
    args.extend_from_slice(key_args);
    run("keytool", &args);
}

fn read_keytool_key_store(key_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("meter.p12");
    keytool_genkeypair(&store, key_args);
    let bytes = std::fs::read(&store).unwrap();
    let contents = p12::read(&bytes, PASSWORD).unwrap();
    assert!(contents.trusted.is_empty(), "{contents:?}");
    let [entry] = &contents.keys[..] else {
        panic!("expected one key entry: {contents:?}");
    };
    assert_eq!(entry.alias, "meter-7");
    assert_eq!(
        entry.chain.len(),
        1,
        "keytool makes a self-signed certificate"
    );
    // The key belongs to the certificate (export_key_store checks that).
    p12::export_key_store("meter-7", &entry.key_pkcs8_der, &entry.chain, PASSWORD).unwrap();
    // keytool's certificate is the one we read.
    let exported = run(
        "keytool",
        &[
            "-exportcert",
            "-rfc",
            "-alias",
            "meter-7",
            "-keystore",
            path_str(&store),
            "-storetype",
            "PKCS12",
            "-storepass",
            PASSWORD,
        ],
    );
    assert_eq!(
        CertificateDer::from_pem_slice(&exported.stdout).unwrap(),
        entry.chain[0]
    );

    assert!(matches!(
        p12::read(&bytes, "not-the-password"),
        Err(P12Error::BadPassword)
    ));
}

#[test]
fn reads_a_keytool_ec_p256_key_store() {
    read_keytool_key_store(&["-keyalg", "EC", "-groupname", "secp256r1"]);
}

#[test]
fn reads_a_keytool_rsa_2048_key_store() {
    read_keytool_key_store(&["-keyalg", "RSA", "-keysize", "2048"]);
}

#[test]
fn reads_a_keytool_trust_store() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(&PKCS_ECDSA_P256_SHA256);
    let ca = write(dir.path(), "ca.pem", &c.ca_pem);
    let store = dir.path().join("truststore.p12");
    run(
        "keytool",
        &[
            "-importcert",
            "-noprompt",
            "-trustcacerts",
            "-alias",
            "gridward-root",
            "-file",
            path_str(&ca),
            "-keystore",
            path_str(&store),
            "-storetype",
            "PKCS12",
            "-storepass",
            PASSWORD,
        ],
    );
    let bytes = std::fs::read(&store).unwrap();
    let contents = p12::read(&bytes, PASSWORD).unwrap();
    assert!(contents.keys.is_empty(), "{contents:?}");
    assert_eq!(
        contents.trusted,
        vec![("gridward-root".to_owned(), c.certs[1].clone())]
    );
    assert!(matches!(
        p12::read(&bytes, "not-the-password"),
        Err(P12Error::BadPassword)
    ));
}

#[test]
fn reads_an_openssl_key_store() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(&PKCS_ECDSA_P256_SHA256);
    let key = write(dir.path(), "key.pem", c.key.serialize_pem());
    let certs = write(
        dir.path(),
        "chain.pem",
        format!("{}{}", c.leaf_pem, c.ca_pem),
    );
    let store = dir.path().join("openssl.p12");
    run(
        "openssl",
        &[
            "pkcs12",
            "-export",
            "-name",
            "hes-server",
            "-inkey",
            path_str(&key),
            "-in",
            path_str(&certs),
            "-out",
            path_str(&store),
            "-passout",
            &format!("pass:{PASSWORD}"),
        ],
    );
    let contents = p12::read(&std::fs::read(&store).unwrap(), PASSWORD).unwrap();
    let [entry] = &contents.keys[..] else {
        panic!("expected one key entry: {contents:?}");
    };
    assert_eq!(entry.alias, "hes-server");
    assert_eq!(entry.chain, c.certs);
    assert_eq!(entry.key_pkcs8_der, c.key.serialize_der());
}
