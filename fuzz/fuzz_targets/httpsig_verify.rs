//! Fuzzes the verification of a downstream request: `Signature-Input`, `Signature` and
//! `Content-Digest` are attacker-controlled Structured Fields. Whatever arrives, verification
//! must return an error or a verified signature, never panic.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use gridward_core::httpsig::{
    HttpSigningKey, HttpVerifyingKey, Request, VerifyPolicy, verify_content_digest,
    verify_request,
};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

/// RFC 8032 test key 1 (private key bytes 9d61b1...), as PKCS#8.
const ED25519_PKCS8: [u8; 48] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
    0x20, 0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec,
    0x2c, 0xc4, 0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c,
    0xae, 0x7f, 0x60,
];

fn keys() -> &'static HashMap<String, HttpVerifyingKey> {
    static KEYS: OnceLock<HashMap<String, HttpVerifyingKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = HttpSigningKey::from_pkcs8_der(&ED25519_PKCS8, "hes").expect("test key");
        HashMap::from([("hes".to_owned(), key.verifying_key())])
    })
}

fuzz_target!(|data: &[u8]| {
    // Split the input into header values at 0xff bytes: Signature-Input, Signature,
    // Content-Digest, Content-Type, then the body.
    let mut parts = data.split(|&b| b == 0xff);
    let mut next = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (input, signature, digest, content_type) = (next(), next(), next(), next());
    let body = next();
    let headers = [
        ("signature-input", input.as_str()),
        ("signature", signature.as_str()),
        ("content-digest", digest.as_str()),
        ("content-type", content_type.as_str()),
    ];
    let req = Request {
        method: "POST",
        target_uri: "https://127.0.0.1:8443/readings",
        headers: &headers,
    };
    let now = OffsetDateTime::from_unix_timestamp(1_707_220_800).expect("constant time");
    let _ = verify_request(&req, keys(), &VerifyPolicy::default(), now);
    let _ = verify_content_digest(&digest, body.as_bytes());
});
