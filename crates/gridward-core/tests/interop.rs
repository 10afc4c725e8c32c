//! Interop tests: independent implementations agree with Gridward's envelope (`docs/wire-format.md`).
//!
//! - Java, JDK only (`tests/interop/EnvelopeCheck.java`): its own CBOR reader and Sig_structure
//!   writer verify Gridward's RS256, ES256 and EdDSA envelopes with `java.security`, and refuse a
//!   tampered one and one replayed on another topic; keys made by `keytool` in a PKCS#12 keystore
//!   sign Gridward's `to_be_signed` bytes, and Gridward verifies the assembled envelopes.
//! - pycose (`tests/interop/cose_check.py`): pycose verifies Gridward's envelopes (and refuses a
//!   tampered one), and Gridward verifies envelopes pycose makes from the spec alone.
//!
//! These tests fail, never skip, when a tool is missing: they need `javac`, `java` and `keytool`
//! (JDK 17 or newer) and `python3` with the pip packages `pycose` and `cbor2<6` (pycose 1.1 cannot
//! decode with cbor2 6, which returns tuples: pycose issue #141).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use gridward_core::MeterId;
use gridward_core::document::{Document, Format, Limits, Reading};
use gridward_core::envelope::{
    self, Algorithm, EnvelopeError, EnvelopeHeader, EnvelopeParams, SigningKey, UnsignedEnvelope,
    VerifyingKey,
};

const METER: &str = "123456789";
const TOPIC: &str = "meters/123456789/readings";
const OTHER_TOPIC: &str = "meters/123456789/events";
const TIMESTAMP: i64 = 1_707_220_800; // 2024-02-06T12:00:00Z
const XML: &str = "<EnergyUsageReport><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>";
const JSON: &str =
    r#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":350.5}"#;

const JDK_HINT: &str = "install a JDK 17 or newer with javac, java and keytool on PATH \
                        (Debian/Ubuntu: apt-get install openjdk-17-jdk-headless)";
const PYTHON_HINT: &str =
    "install Python 3 as python3 and the pip packages: pip install pycose 'cbor2<6'";

fn meter() -> MeterId {
    MeterId::new(METER).expect("valid meter id")
}

/// The reading that `XML` and `JSON` carry.
fn reading() -> Document {
    Document::Reading(Reading {
        meter_id: meter(),
        timestamp: time::OffsetDateTime::from_unix_timestamp(TIMESTAMP).expect("valid time"),
        energy_kwh: 350.5,
    })
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn interop_file(name: &str) -> PathBuf {
    manifest_dir().join("tests/interop").join(name)
}

fn fixture_path(name: &str) -> PathBuf {
    manifest_dir().join("tests/fixtures").join(name)
}

fn signing_key(stem: &str) -> SigningKey {
    let pem =
        std::fs::read_to_string(fixture_path(&format!("{stem}.key.pem"))).expect("fixture key");
    SigningKey::from_pkcs8_pem(&pem).expect("fixture key loads")
}

/// Signs `payload` with Gridward for meter `METER` on `TOPIC`.
fn gridward_sign(key: &SigningKey, format: Format, counter: u64, payload: &str) -> Vec<u8> {
    let meter = meter();
    let params = EnvelopeParams {
        meter_id: &meter,
        counter,
        timestamp: TIMESTAMP,
        content_type: format,
        topic: TOPIC,
    };
    envelope::sign(key, &params, payload.as_bytes()).expect("Gridward signs")
}

/// The envelope with the first byte of the reading's value `350.5` changed to `250.5`: still a
/// well-formed envelope and a valid document, but not what was signed.
fn tamper_reading(env: &[u8]) -> Vec<u8> {
    let at = env
        .windows(b"350.5".len())
        .position(|w| w == b"350.5")
        .expect("the envelope carries the reading 350.5");
    let mut bad = env.to_vec();
    bad[at] ^= 0x01;
    bad
}

/// A scratch directory, removed when dropped (std only: the crate has no tempfile dev-dependency).
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "gridward-interop-{label}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    fn read(&self, name: &str) -> Vec<u8> {
        let path = self.0.join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` to completion. A missing program is a test failure that says what to install.
fn run(cmd: &mut Command, install_hint: &str) -> Output {
    match cmd.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{:?} not found ({e}): {install_hint}", cmd.get_program())
        }
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    }
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `cmd` and asserts it succeeds; returns its stdout.
fn run_ok(cmd: &mut Command, install_hint: &str, what: &str) -> String {
    let output = run(cmd, install_hint);
    assert!(
        output.status.success(),
        "{what} failed: {cmd:?}\n{}\nIf a tool or package is missing: {install_hint}",
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts that an independent verifier refused an envelope because of its signature (exit code 1
/// and `FAIL BAD SIGNATURE`), not for a missing tool or a parse error.
fn assert_bad_signature(output: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.code() == Some(1) && stderr.contains("FAIL BAD SIGNATURE"),
        "{what}: expected a refused signature (exit 1, FAIL BAD SIGNATURE), got {}",
        describe(output)
    );
}

// ---------------------------------------------------------------------------------------------
// Java

/// `EnvelopeCheck.java` compiled into a scratch directory, plus a work directory for its files.
struct Java {
    dir: TempDir,
}

impl Java {
    fn compile() -> Self {
        let dir = TempDir::new("java");
        let classes = dir.path().join("classes");
        let source = interop_file("EnvelopeCheck.java");
        run_ok(
            Command::new("javac").arg("-d").arg(&classes).arg(&source),
            JDK_HINT,
            "compiling EnvelopeCheck.java",
        );
        Self { dir }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(self.dir.path().join("classes"))
            .arg("EnvelopeCheck");
        cmd
    }

    /// Runs `EnvelopeCheck verify` on `envelope`; returns the raw output.
    fn verify(&self, envelope: &[u8], topic: &str, spki: &[u8]) -> Output {
        let env = self.dir.write("envelope.cbor", envelope);
        let spki = self.dir.write("verify.spki.der", spki);
        run(
            self.command().arg("verify").arg(env).arg(topic).arg(spki),
            JDK_HINT,
        )
    }

    fn assert_verifies(
        &self,
        envelope: &[u8],
        topic: &str,
        spki: &[u8],
        alg: Algorithm,
        what: &str,
    ) {
        let output = self.verify(envelope, topic, spki);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let expected = format!(
            "OK alg={} kid={}",
            alg.cose_id(),
            hex::encode(envelope::key_id(spki))
        );
        assert!(
            output.status.success() && stdout.trim() == expected,
            "{what}: Java should print {expected:?}, got {}",
            describe(&output)
        );
    }
}

#[test]
fn java_verifies_gridward_envelopes() {
    let java = Java::compile();
    for stem in ["rs256", "es256", "eddsa"] {
        let key = signing_key(stem);
        let alg = key.algorithm();
        let spki = key.public_key_spki().to_vec();
        let env = gridward_sign(&key, Format::Xml, 42, XML);
        java.assert_verifies(
            &env,
            TOPIC,
            &spki,
            alg,
            &format!("{alg} envelope by Gridward"),
        );

        // Untagged is a valid form too.
        java.assert_verifies(
            &env[1..],
            TOPIC,
            &spki,
            alg,
            &format!("{alg} untagged envelope"),
        );

        let tampered = tamper_reading(&env);
        assert_eq!(
            envelope::verify(
                &tampered,
                &key.verifying_key().expect("verifying key"),
                &meter(),
                TOPIC
            )
            .err(),
            Some(EnvelopeError::BadSignature),
            "{alg}: the tampered envelope must still parse, so the signature is what refuses it"
        );
        assert_bad_signature(
            &java.verify(&tampered, TOPIC, &spki),
            &format!("{alg}: Java on a tampered payload"),
        );
        assert_bad_signature(
            &java.verify(&env, OTHER_TOPIC, &spki),
            &format!("{alg}: Java on another topic"),
        );
    }
}

#[test]
fn java_refuses_a_key_that_is_not_the_kid() {
    let java = Java::compile();
    let env = gridward_sign(&signing_key("es256"), Format::Xml, 1, XML);
    let other = signing_key("rs256").public_key_spki().to_vec();
    let output = java.verify(&env, TOPIC, &other);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.code() == Some(1) && stderr.contains("FAIL kid"),
        "Java must refuse an envelope whose kid is not the key's: {}",
        describe(&output)
    );
}

/// Makes a key pair with `keytool` in a PKCS#12 keystore, signs Gridward's `to_be_signed` bytes
/// with it in Java, assembles the envelope with Gridward and verifies it with both.
fn java_keystore_signs(keyalg: &[&str], expected: Algorithm, signature_len: usize) {
    let java = Java::compile();
    let keystore = java.dir.path().join("k.p12");
    let mut keytool = Command::new("keytool");
    keytool
        .args(["-genkeypair"])
        .args(keyalg)
        .args(["-dname", "CN=123456789", "-alias", "meter", "-keystore"])
        .arg(&keystore)
        .args([
            "-storetype",
            "PKCS12",
            "-storepass",
            "changeit",
            "-keypass",
            "changeit",
            "-validity",
            "30",
        ]);
    run_ok(&mut keytool, JDK_HINT, "keytool -genkeypair");

    // Step 1: the certificate's public key, as Java encodes it.
    run_ok(
        java.command()
            .arg("spki")
            .arg(&keystore)
            .args(["changeit", "meter"])
            .arg(java.dir.path().join("cert.spki.der")),
        JDK_HINT,
        "EnvelopeCheck spki",
    );
    let spki = java.dir.read("cert.spki.der");
    let vk = VerifyingKey::from_spki_der(&spki).unwrap_or_else(|e| {
        panic!(
            "Gridward must accept Java's {expected} SPKI {}: {e}",
            hex::encode(&spki)
        )
    });
    assert_eq!(vk.algorithm(), expected);
    assert_eq!(vk.kid(), envelope::key_id(&spki).as_slice());

    // Step 2: Gridward prepares the envelope, Java signs, Gridward assembles and verifies.
    for (format, payload) in [(Format::Xml, XML), (Format::Json, JSON)] {
        let header = EnvelopeHeader {
            alg: expected,
            kid: envelope::key_id(&spki),
            content_type: format,
            meter_id: meter(),
            counter: 7,
            timestamp: TIMESTAMP,
        };
        let unsigned = UnsignedEnvelope::new(header, payload.as_bytes().to_vec(), TOPIC)
            .expect("unsigned envelope");
        let tbs = java.dir.write("tbs.bin", &unsigned.to_be_signed());
        run_ok(
            java.command()
                .arg("sign")
                .arg(tbs)
                .arg(&keystore)
                .args(["changeit", "meter"])
                .arg(java.dir.path().join("sig.bin"))
                .arg(java.dir.path().join("sign.spki.der")),
            JDK_HINT,
            "EnvelopeCheck sign",
        );
        assert_eq!(
            java.dir.read("sign.spki.der"),
            spki,
            "sign and spki modes must report the same key"
        );
        let signature = java.dir.read("sig.bin");
        assert_eq!(
            signature.len(),
            signature_len,
            "{expected} signature length"
        );
        let env = unsigned.assemble(signature).expect("assemble");

        let verified = envelope::verify(&env, &vk, &meter(), TOPIC).unwrap_or_else(|e| {
            panic!("Gridward must verify the Java-signed {expected} {format} envelope: {e}")
        });
        assert_eq!(
            (verified.header().alg, verified.header().counter),
            (expected, 7)
        );
        let document = verified
            .into_document(&Limits::default())
            .unwrap_or_else(|e| panic!("the Java-signed {format} reading must parse: {e}"));
        assert_eq!(document.document(), &reading());
        assert_eq!(
            envelope::verify(&env, &vk, &meter(), OTHER_TOPIC).err(),
            Some(EnvelopeError::BadSignature)
        );
        java.assert_verifies(
            &env,
            TOPIC,
            &spki,
            expected,
            &format!("Java-signed {expected} envelope"),
        );
    }
}

#[test]
fn java_keystore_rsa_signs_envelopes_gridward_verifies() {
    java_keystore_signs(
        &[
            "-keyalg",
            "RSA",
            "-keysize",
            "2048",
            "-sigalg",
            "SHA256withRSA",
        ],
        Algorithm::Rs256,
        256,
    );
}

#[test]
fn java_keystore_ec_signs_envelopes_gridward_verifies() {
    java_keystore_signs(
        &["-keyalg", "EC", "-groupname", "secp256r1"],
        Algorithm::Es256,
        64,
    );
}

#[test]
fn java_keystore_ed25519_signs_envelopes_gridward_verifies() {
    java_keystore_signs(&["-keyalg", "Ed25519"], Algorithm::EdDsa, 64);
}

// ---------------------------------------------------------------------------------------------
// pycose

fn pycose() -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(interop_file("cose_check.py"));
    cmd
}

fn pycose_verify(dir: &TempDir, envelope: &[u8], topic: &str, stem: &str) -> Output {
    let env = dir.write("envelope.cbor", envelope);
    run(
        pycose()
            .arg("verify")
            .arg(env)
            .arg(topic)
            .arg(fixture_path(&format!("{stem}.pub.pem"))),
        PYTHON_HINT,
    )
}

#[test]
fn pycose_verifies_gridward_envelopes() {
    let dir = TempDir::new("pycose-verify");
    for (stem, format, payload) in [
        ("es256", Format::Xml, XML),
        ("eddsa", Format::Json, JSON),
        ("rs256", Format::Xml, XML),
    ] {
        let key = signing_key(stem);
        let alg = key.algorithm();
        let env = gridward_sign(&key, format, 42, payload);
        let output = pycose_verify(&dir, &env, TOPIC, stem);
        let expected = format!(
            "OK alg={} meter={METER} counter=42 timestamp={TIMESTAMP} content_type={}",
            alg.name().to_uppercase(),
            format.content_type()
        );
        assert!(
            output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == expected,
            "{alg}: pycose should print {expected:?}, got {}\nIf a package is missing: {PYTHON_HINT}",
            describe(&output)
        );

        let tampered = tamper_reading(&env);
        assert_bad_signature(
            &pycose_verify(&dir, &tampered, TOPIC, stem),
            &format!("{alg}: pycose on a tampered payload"),
        );
        assert_bad_signature(
            &pycose_verify(&dir, &env, OTHER_TOPIC, stem),
            &format!("{alg}: pycose on another topic"),
        );
    }
}

/// Splits a tagged COSE_Sign1 into (protected header bytes, signature) with ciborium.
fn protected_and_signature(env: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let value: ciborium::Value = ciborium::from_reader(env).expect("envelope is CBOR");
    let ciborium::Value::Tag(18, inner) = value else {
        panic!("not tagged 18: {value:?}")
    };
    let ciborium::Value::Array(parts) = *inner else {
        panic!("not an array")
    };
    match parts.as_slice() {
        [
            ciborium::Value::Bytes(p),
            ciborium::Value::Map(u),
            ciborium::Value::Bytes(_),
            ciborium::Value::Bytes(s),
        ] if u.is_empty() => (p.clone(), s.clone()),
        other => panic!("not a Gridward COSE_Sign1: {other:?}"),
    }
}

#[test]
fn gridward_verifies_pycose_envelopes() {
    let dir = TempDir::new("pycose-sign");
    for (stem, format, payload) in [
        ("es256", Format::Xml, XML),
        ("es256", Format::Json, JSON),
        ("eddsa", Format::Xml, XML),
        ("eddsa", Format::Json, JSON),
        ("rs256", Format::Json, JSON),
    ] {
        let key = signing_key(stem);
        let alg = key.algorithm();
        let counter = 18_446_744_073_709_551_615u64; // u64::MAX: the widest counter the spec allows
        let payload_path = dir.write("payload", payload.as_bytes());
        let out = dir.path().join("pycose.cbor");
        run_ok(
            pycose()
                .arg("sign")
                .arg(fixture_path(&format!("{stem}.key.pem")))
                .args([
                    METER,
                    &counter.to_string(),
                    &TIMESTAMP.to_string(),
                    TOPIC,
                    format.content_type(),
                ])
                .arg(payload_path)
                .arg(&out),
            PYTHON_HINT,
            &format!("pycose signing {alg}"),
        );
        let env = dir.read("pycose.cbor");

        let vk = key.verifying_key().expect("verifying key");
        let verified = envelope::verify(&env, &vk, &meter(), TOPIC).unwrap_or_else(|e| {
            panic!(
                "Gridward must verify pycose's {alg} {format} envelope {}: {e}",
                hex::encode(&env)
            )
        });
        let h = verified.header();
        assert_eq!(
            (h.alg, h.counter, h.timestamp, h.content_type),
            (alg, counter, TIMESTAMP, format)
        );
        let document = verified
            .into_document(&Limits::default())
            .expect("pycose's reading parses");
        assert_eq!(document.document(), &reading());
        assert_eq!(
            envelope::verify(&env, &vk, &meter(), OTHER_TOPIC).err(),
            Some(EnvelopeError::BadSignature)
        );

        // pycose writes the same protected header bytes as Gridward (same label order), so the
        // Sig_structure is identical; EdDSA and RSASSA-PKCS1-v1_5 are deterministic, so the
        // whole envelope is byte for byte Gridward's.
        let header = EnvelopeHeader {
            alg,
            kid: key.kid().to_vec(),
            content_type: format,
            meter_id: meter(),
            counter,
            timestamp: TIMESTAMP,
        };
        let unsigned = UnsignedEnvelope::new(header, payload.as_bytes().to_vec(), TOPIC)
            .expect("unsigned envelope");
        let (protected, signature) = protected_and_signature(&env);
        assert_eq!(
            hex::encode(&protected),
            hex::encode(unsigned.protected_bytes()),
            "{alg}: protected header"
        );
        if alg == Algorithm::Es256 {
            assert_eq!(signature.len(), 64, "ES256 signatures are raw r || s");
        } else {
            assert_eq!(
                hex::encode(&env),
                hex::encode(gridward_sign(&key, format, counter, payload)),
                "{alg}: pycose's envelope should equal Gridward's"
            );
        }
    }
}
