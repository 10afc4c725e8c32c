//! Interop test of `gridward_core::httpsig` against an independent RFC 9421 implementation: the
//! Python package `http-message-signatures` (pyauth), driven by `tests/py/httpsig_check.py`.
//!
//! Both directions, both algorithms (`ed25519`, `ecdsa-p256-sha256`), request
//! `POST https://127.0.0.1:8443/readings` with a JSON body, covering `@method`, `@target-uri`,
//! `content-digest` and `content-type`, with `created`, `expires`, `nonce`, `keyid`, `alg`:
//!
//! - Gridward signs, Python verifies (and checks the body against Content-Digest); Python refuses
//!   a tampered body and a tampered header.
//! - Python signs (and writes Content-Digest), Gridward verifies; Gridward refuses a tampered
//!   body, header and digest.
//!
//! This test fails, never skips, when `python3` or the packages are missing: run
//! `python3 -m pip install -r .ci/requirements.txt` (CI does).
//!
//! Python checks times against the real clock, so this test signs at the real time.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use gridward_core::httpsig::{
    self, HttpSigError, HttpSigningKey, HttpVerifyingKey, Request, SignParams, VerifyPolicy,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

const PYTHON_HINT: &str = "run `python3 -m pip install -r .ci/requirements.txt` from the repository root \
     (it installs http-message-signatures and requests; CI does this)";
const URI: &str = "https://127.0.0.1:8443/readings";
const BODY: &str =
    r#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":350.5}"#;
const TAMPERED_BODY: &str =
    r#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":950.5}"#;
const COMPONENTS: [&str; 4] = ["@method", "@target-uri", "content-digest", "content-type"];

/// The two algorithms with the committed test keys.
const KEYS: [(&str, &str, &str); 2] = [
    ("ed25519", "eddsa", "gridward-test-ed25519"),
    ("ecdsa-p256-sha256", "es256", "gridward-test-p256"),
];

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `httpsig_check.py MODE` with `job` on stdin. A missing interpreter or package is a
/// test failure that says how to install it.
fn python(mode: &str, job: &Value) -> Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/httpsig_check.py");
    let mut child = match Command::new("python3")
        .arg(&script)
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("python3 not found ({e}): install Python 3, then {PYTHON_HINT}")
        }
        Err(e) => panic!("cannot run python3 {}: {e}", script.display()),
    };
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(job.to_string().as_bytes())
        .expect("write the job to python3");
    let output = child.wait_with_output().expect("python3 runs");
    assert_ne!(
        output.status.code(),
        Some(3),
        "a Python package is missing: {PYTHON_HINT}\n{}",
        describe(&output)
    );
    output
}

/// Runs `mode` and expects success; returns the JSON it printed.
fn python_ok(mode: &str, job: &Value, what: &str) -> Value {
    let output = python(mode, job);
    assert!(
        output.status.success(),
        "{what}: http-message-signatures failed: {}\nIf a package is missing: {PYTHON_HINT}",
        describe(&output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", describe(&output)))
}

/// Runs `mode` and expects a refusal (exit 1, `FAIL`); returns stderr.
fn python_refuses(mode: &str, job: &Value, what: &str) -> String {
    let output = python(mode, job);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.code() == Some(1) && stderr.starts_with("FAIL"),
        "{what}: http-message-signatures should refuse (exit 1, FAIL), got {}",
        describe(&output)
    );
    stderr
}

/// Now, in whole seconds (signature times are whole seconds).
fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn nonce(alg: &str) -> String {
    format!("{alg}-{}", OffsetDateTime::now_utc().unix_timestamp_nanos())
}

/// Verifies with Gridward's default policy (the downstream profile).
fn gridward_verify(
    headers: &[(String, String)],
    body: &str,
    key: &HttpVerifyingKey,
    now: OffsetDateTime,
) -> Result<httpsig::VerifiedSignature, HttpSigError> {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let req = Request {
        method: "POST",
        target_uri: URI,
        headers: &headers,
    };
    let keys: HashMap<String, HttpVerifyingKey> = [(key.key_id().to_owned(), key.clone())]
        .into_iter()
        .collect();
    let verified = httpsig::verify_request(&req, &keys, &VerifyPolicy::default(), now)?;
    httpsig::verify_request_content_digest(&req, body.as_bytes())?;
    Ok(verified)
}

fn set(headers: &mut [(String, String)], name: &str, value: &str) {
    for (n, v) in headers.iter_mut() {
        if n.eq_ignore_ascii_case(name) {
            *v = value.to_owned();
        }
    }
}

#[test]
fn python_verifies_gridward_signatures() {
    for (alg, stem, key_id) in KEYS {
        let key = HttpSigningKey::from_pkcs8_pem(&fixture(&format!("{stem}.key.pem")), key_id)
            .expect("fixture key loads");
        assert_eq!(key.alg().name(), alg);
        let created = now();
        let nonce = nonce(alg);
        let digest = httpsig::content_digest(BODY.as_bytes());
        let unsigned = [
            ("Content-Type", "application/json"),
            ("Content-Digest", digest.as_str()),
        ];
        let params = SignParams {
            label: "gridward".to_owned(),
            components: COMPONENTS.map(String::from).to_vec(),
            created,
            expires: created + Duration::from_secs(60),
            nonce: nonce.clone(),
        };
        let signed = httpsig::sign_request(
            &Request {
                method: "POST",
                target_uri: URI,
                headers: &unsigned,
            },
            &key,
            &params,
        )
        .expect("Gridward signs");
        let headers = json!([
            ["Content-Type", "application/json"],
            ["Content-Digest", digest],
            ["Signature-Input", signed.signature_input],
            ["Signature", signed.signature],
        ]);
        let job = |body: &str, headers: &Value| {
            json!({
                "alg": alg,
                "key_id": key_id,
                "public_key_pem": fixture(&format!("{stem}.pub.pem")),
                "method": "POST",
                "url": URI,
                "headers": headers,
                "body": body,
                "required": COMPONENTS,
                "max_age_seconds": 300,
            })
        };

        let out = python_ok("verify", &job(BODY, &headers), &format!("{alg}: verify"));
        assert_eq!(out["label"], "gridward", "{alg}: {out}");
        assert_eq!(out["body_verified"], true, "{alg}: {out}");
        assert_eq!(out["nonce"], nonce.as_str(), "{alg}: {out}");
        let p = &out["parameters"];
        assert_eq!(p["keyid"], key_id, "{alg}: {out}");
        assert_eq!(p["alg"], alg, "{alg}: {out}");
        assert_eq!(p["created"], created.unix_timestamp(), "{alg}: {out}");
        assert_eq!(p["expires"], created.unix_timestamp() + 60, "{alg}: {out}");
        let covered: Vec<&str> = out["covered"]
            .as_array()
            .expect("covered is a list")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            covered,
            [
                "\"@method\"",
                "\"@target-uri\"",
                "\"content-digest\"",
                "\"content-type\"",
                "\"@signature-params\""
            ],
            "{alg}"
        );

        // Tampered body: the signature still holds (it covers the digest), the digest does not.
        let stderr = python_refuses(
            "verify",
            &job(TAMPERED_BODY, &headers),
            &format!("{alg}: tampered body"),
        );
        assert!(
            stderr.contains("Content-Digest"),
            "{alg}: the digest should refuse the body: {stderr}"
        );
        // Tampered covered header: the signature fails.
        let mut tampered = headers.clone();
        tampered[0][1] = json!("text/plain");
        let stderr = python_refuses(
            "verify",
            &job(BODY, &tampered),
            &format!("{alg}: tampered header"),
        );
        assert!(
            !stderr.contains("Content-Digest"),
            "{alg}: the signature should refuse the header: {stderr}"
        );
    }
}

#[test]
fn gridward_verifies_python_signatures() {
    for (alg, stem, key_id) in KEYS {
        let created = now();
        let nonce = nonce(alg);
        let job = json!({
            "alg": alg,
            "key_id": key_id,
            "private_key_pem": fixture(&format!("{stem}.key.pem")),
            "method": "POST",
            "url": URI,
            "headers": [["Content-Type", "application/json"]],
            "body": BODY,
            "label": "python",
            "components": COMPONENTS,
            "created": created.unix_timestamp(),
            "expires": created.unix_timestamp() + 60,
            "nonce": nonce,
        });
        let out = python_ok("sign", &job, &format!("{alg}: sign"));
        let headers: Vec<(String, String)> = out["headers"]
            .as_array()
            .expect("headers is a list")
            .iter()
            .map(|pair| {
                (
                    pair[0].as_str().expect("name").to_owned(),
                    pair[1].as_str().expect("value").to_owned(),
                )
            })
            .collect();
        let field = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{alg}: Python wrote no {name}: {headers:?}"))
        };
        assert_eq!(
            field("Content-Digest"),
            httpsig::content_digest(BODY.as_bytes()),
            "{alg}: Python's Content-Digest is Gridward's"
        );

        let key = HttpVerifyingKey::from_pem(&fixture(&format!("{stem}.pub.pem")), key_id)
            .expect("fixture public key loads");
        let verified = gridward_verify(&headers, BODY, &key, created).unwrap_or_else(|e| {
            panic!(
                "{alg}: Gridward must verify Python's signature ({}): {e}\nSignature-Input: {}",
                e.code(),
                field("Signature-Input")
            )
        });
        assert_eq!(verified.label, "python");
        assert_eq!(verified.key_id, key_id);
        assert_eq!(verified.alg.name(), alg);
        assert_eq!(verified.created, created);
        assert_eq!(verified.expires, Some(created + Duration::from_secs(60)));
        assert_eq!(verified.nonce.as_deref(), Some(nonce.as_str()));
        assert_eq!(verified.components, COMPONENTS.map(String::from).to_vec());

        // Tampered body: refused by the digest.
        assert_eq!(
            gridward_verify(&headers, TAMPERED_BODY, &key, created).err(),
            Some(HttpSigError::ContentDigestMismatch("sha-256")),
            "{alg}: tampered body"
        );
        // Tampered body with a matching digest: refused by the signature.
        let mut forged = headers.clone();
        set(
            &mut forged,
            "Content-Digest",
            &httpsig::content_digest(TAMPERED_BODY.as_bytes()),
        );
        assert_eq!(
            gridward_verify(&forged, TAMPERED_BODY, &key, created).err(),
            Some(HttpSigError::BadSignature),
            "{alg}: forged digest"
        );
        // Tampered covered header.
        let mut tampered = headers.clone();
        set(&mut tampered, "Content-Type", "text/plain");
        assert_eq!(
            gridward_verify(&tampered, BODY, &key, created).err(),
            Some(HttpSigError::BadSignature),
            "{alg}: tampered header"
        );
    }
}
