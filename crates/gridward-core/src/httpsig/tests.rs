//! Tests of `httpsig`: the RFC 9421 Appendix B and RFC 9530 vectors, round trips, one test per
//! refusal, and property tests.

use std::collections::HashMap;
use std::time::Duration;

use aws_lc_rs::digest::{SHA512, digest};
use proptest::prelude::*;
use sfv::{BareItem, DictSerializer, Dictionary, Item, ListEntry, Parser};
use time::OffsetDateTime;
use time::macros::datetime;

use super::*;

// ---------------------------------------------------------------------------------------------
// RFC 9421 Appendix B: test keys (B.1) and messages (B.2), typed in from the RFC text.

/// B.1.4 `test-key-ed25519`, private key.
const RFC_ED25519_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF
-----END PRIVATE KEY-----
";
/// B.1.4 `test-key-ed25519`, public key.
const RFC_ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=
-----END PUBLIC KEY-----
";
/// B.1.3 `test-key-ecc-p256`, public key.
const RFC_P256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEqIVYZVLCrPZHGHjP17CTW0/+D9Lf
w0EkjqF7xB4FivAxzic30tMM4GF+hR6Dxh71Z50VGGdldkkDXZCnTNnoXQ==
-----END PUBLIC KEY-----
";
/// B.1.3 `test-key-ecc-p256`, private key (SEC1 `EC PRIVATE KEY`, as the RFC prints it).
const RFC_P256_PRIVATE_SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIFKbhfNZfpDsW43+0+JjUr9K+bTeuxopu653+hBaXGA7oAoGCCqGSM49
AwEHoUQDQgAEqIVYZVLCrPZHGHjP17CTW0/+D9Lfw0EkjqF7xB4FivAxzic30tMM
4GF+hR6Dxh71Z50VGGdldkkDXZCnTNnoXQ==
-----END EC PRIVATE KEY-----
";

/// B.2 `test-request`: `POST /foo?param=Value&Pet=dog` to `example.com`, body
/// `{"hello": "world"}`.
const RFC_REQUEST_HEADERS: [(&str, &str); 5] = [
    ("Host", "example.com"),
    ("Date", "Tue, 20 Apr 2021 02:07:55 GMT"),
    ("Content-Type", "application/json"),
    (
        "Content-Digest",
        "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
    ),
    ("Content-Length", "18"),
];
const RFC_REQUEST_BODY: &[u8] = br#"{"hello": "world"}"#;
const RFC_CREATED: i64 = 1_618_884_473;

/// B.2.6: the signature base, `Signature-Input` and `Signature` (the RFC's line wrapping undone).
const B26_BASE: &str = r#""date": Tue, 20 Apr 2021 02:07:55 GMT
"@method": POST
"@path": /foo
"@authority": example.com
"content-type": application/json
"content-length": 18
"@signature-params": ("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519""#;
const B26_SIGNATURE_INPUT: &str = r#"sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519""#;
const B26_SIGNATURE: &str = "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:";

/// B.2.4: a response (`200`, body `{"message": "good dog"}`) signed with `test-key-ecc-p256`.
const B24_BASE: &str = r#""@status": 200
"content-type": application/json
"content-digest": sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:
"content-length": 23
"@signature-params": ("@status" "content-type" "content-digest" "content-length");created=1618884473;keyid="test-key-ecc-p256""#;
const B24_SIGNATURE_INPUT: &str = r#"sig-b24=("@status" "content-type" "content-digest" "content-length");created=1618884473;keyid="test-key-ecc-p256""#;
const B24_SIGNATURE: &str = "sig-b24=:wNmSUAhwb5LxtOtOpNa6W5xj067m5hFrj0XQ4fvpaCLx0NKocgPquLgyahnzDnDAUy5eCdlYUEkLIj+32oiasw==:";
const B24_RESPONSE_BODY: &[u8] = br#"{"message": "good dog"}"#;

// ---------------------------------------------------------------------------------------------
// Gridward's profile, with the committed test keys.

const NOW: OffsetDateTime = datetime!(2024-02-06 12:00:00 UTC);
const URI: &str = "https://127.0.0.1:8443/readings";
const BODY: &[u8] =
    br#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":350.5}"#;
const ED_KEY_ID: &str = "hes-ed25519";
const EC_KEY_ID: &str = "hes-p256";

fn ed_key() -> HttpSigningKey {
    HttpSigningKey::from_pkcs8_pem(
        include_str!("../../tests/fixtures/eddsa.key.pem"),
        ED_KEY_ID,
    )
    .unwrap()
}

fn ec_key() -> HttpSigningKey {
    HttpSigningKey::from_pkcs8_pem(
        include_str!("../../tests/fixtures/es256.key.pem"),
        EC_KEY_ID,
    )
    .unwrap()
}

fn rfc_ed_key() -> HttpSigningKey {
    HttpSigningKey::from_pkcs8_pem(RFC_ED25519_PRIVATE, "test-key-ed25519").unwrap()
}

fn keys() -> HashMap<String, HttpVerifyingKey> {
    [ed_key(), ec_key()]
        .iter()
        .map(|k| (k.key_id().to_owned(), k.verifying_key()))
        .collect()
}

fn sign_params() -> SignParams {
    SignParams {
        label: "gridward".to_owned(),
        components: ["@method", "@target-uri", "content-digest", "content-type"]
            .map(String::from)
            .to_vec(),
        created: NOW,
        expires: NOW + Duration::from_secs(60),
        nonce: "n-0123456789abcdef".to_owned(),
    }
}

/// A request with owned parts, so tests can change it.
#[derive(Debug, Clone)]
struct Msg {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Msg {
    fn new(method: &str, uri: &str, headers: &[(&str, &str)], body: &[u8]) -> Self {
        Self {
            method: method.to_owned(),
            uri: uri.to_owned(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.to_vec(),
        }
    }

    /// The Gridward test request, unsigned.
    fn reading() -> Self {
        Self::new(
            "POST",
            URI,
            &[
                ("Content-Type", "application/json"),
                ("Content-Digest", &content_digest(BODY)),
            ],
            BODY,
        )
    }

    fn with<R>(&self, f: impl FnOnce(&Request<'_>) -> R) -> R {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        f(&Request {
            method: &self.method,
            target_uri: &self.uri,
            headers: &headers,
        })
    }

    fn get(&self, name: &str) -> String {
        self.with(|r| r.field_value(name).unwrap().unwrap_or_default())
    }

    fn set(&mut self, name: &str, value: &str) {
        self.remove(name);
        self.headers.push((name.to_owned(), value.to_owned()));
    }

    fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    fn add_signature(&mut self, headers: &SignatureHeaders) {
        self.headers.push((
            "Signature-Input".to_owned(),
            headers.signature_input.clone(),
        ));
        self.headers
            .push(("Signature".to_owned(), headers.signature.clone()));
    }

    fn signed(mut self, key: &HttpSigningKey, params: &SignParams) -> Self {
        let headers = self.with(|r| sign_request(r, key, params)).unwrap();
        self.add_signature(&headers);
        self
    }

    fn signed_with(mut self, key: &HttpSigningKey, components: &[&str], params: SigParams) -> Self {
        let components: Vec<String> = components.iter().map(|c| (*c).to_owned()).collect();
        let (headers, _) = self
            .with(|r| sign_with(r, key, "gridward", &components, params))
            .unwrap();
        self.add_signature(&headers);
        self
    }

    fn verify(&self) -> Result<VerifiedSignature, HttpSigError> {
        self.verify_with(&VerifyPolicy::default(), NOW)
    }

    fn verify_with(
        &self,
        policy: &VerifyPolicy,
        now: OffsetDateTime,
    ) -> Result<VerifiedSignature, HttpSigError> {
        self.with(|r| verify_request(r, &keys(), policy, now))
    }

    fn verify_body(&self) -> Result<(), HttpSigError> {
        self.with(|r| verify_request_content_digest(r, &self.body))
    }
}

/// The full Gridward parameter list for `key`, for `sign_with`.
fn full_params(key: &HttpSigningKey) -> SigParams {
    vec![
        (
            CREATED,
            BareItem::Integer(NOW.unix_timestamp().try_into().unwrap()),
        ),
        (
            EXPIRES,
            BareItem::Integer((NOW.unix_timestamp() + 60).try_into().unwrap()),
        ),
        (NONCE, sf_string("nonce", "n-1").unwrap()),
        (KEYID, sf_string("keyid", key.key_id()).unwrap()),
        (ALG, sf_string("alg", key.alg().name()).unwrap()),
    ]
}

fn without(mut params: SigParams, name: &KeyRef) -> SigParams {
    params.retain(|(k, _)| *k != name);
    params
}

fn replaced(mut params: SigParams, name: &'static KeyRef, value: BareItem) -> SigParams {
    for (k, v) in &mut params {
        if *k == name {
            *v = value.clone();
        }
    }
    params
}

const FOUR: [&str; 4] = ["@method", "@target-uri", "content-digest", "content-type"];

/// Applies `change` to the decoded signature bytes of label `label` in a `Signature` value.
fn change_signature(value: &str, label: &str, change: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut dict: Dictionary = Parser::new(value).parse().unwrap();
    let Some(ListEntry::Item(Item {
        bare_item: BareItem::ByteSequence(bytes),
        ..
    })) = dict.get_mut(label)
    else {
        panic!("no byte sequence for {label} in {value}")
    };
    change(bytes);
    let mut ser = DictSerializer::new();
    ser.members(dict.iter());
    ser.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------
// RFC 9421 Appendix B

#[test]
fn rfc9421_b1_test_keys_load_and_match() {
    let from_private = rfc_ed_key().verifying_key();
    let from_public = HttpVerifyingKey::from_pem(RFC_ED25519_PUBLIC, "test-key-ed25519").unwrap();
    assert_eq!(from_private.alg(), HttpSigAlg::Ed25519);
    assert_eq!(from_private.spki_der(), from_public.spki_der());

    let p256 = HttpVerifyingKey::from_pem(RFC_P256_PUBLIC, "test-key-ecc-p256").unwrap();
    assert_eq!(p256.alg(), HttpSigAlg::EcdsaP256Sha256);
    // The RFC prints the P-256 private key in SEC1 form; Gridward takes PKCS#8 only, but the
    // key is the public key's pair: convert it with aws-lc-rs and compare.
    assert!(matches!(
        HttpSigningKey::from_pkcs8_pem(RFC_P256_PRIVATE_SEC1, "test-key-ecc-p256"),
        Err(HttpSigError::BadKey(_))
    ));
    let sec1 = pem::parse(RFC_P256_PRIVATE_SEC1).unwrap();
    let pair = aws_lc_rs::signature::EcdsaKeyPair::from_private_key_der(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        sec1.contents(),
    )
    .unwrap();
    let pkcs8 = pair.to_pkcs8v1().unwrap();
    let signing = HttpSigningKey::from_pkcs8_der(pkcs8.as_ref(), "test-key-ecc-p256").unwrap();
    assert_eq!(signing.verifying_key().spki_der(), p256.spki_der());
}

#[test]
fn rfc9421_b26_ed25519_signature_base_and_signature_are_exact() {
    let key = rfc_ed_key();
    let msg = Msg::new(
        "POST",
        "https://example.com/foo?param=Value&Pet=dog",
        &RFC_REQUEST_HEADERS,
        RFC_REQUEST_BODY,
    );
    let components = [
        "date",
        "@method",
        "@path",
        "@authority",
        "content-type",
        "content-length",
    ]
    .map(String::from);
    let params: SigParams = vec![
        (CREATED, BareItem::Integer(RFC_CREATED.try_into().unwrap())),
        (KEYID, sf_string("keyid", "test-key-ed25519").unwrap()),
    ];
    let (headers, base) = msg
        .with(|r| sign_with(r, &key, "sig-b26", &components, params))
        .unwrap();
    assert_eq!(base, B26_BASE);
    assert_eq!(headers.signature_input, B26_SIGNATURE_INPUT);
    // Ed25519 is deterministic: the same bytes as the RFC.
    assert_eq!(headers.signature, B26_SIGNATURE);
}

#[test]
fn rfc9421_b26_verifies_with_verify_request() {
    let mut msg = Msg::new(
        "POST",
        "https://example.com/foo?param=Value&Pet=dog",
        &RFC_REQUEST_HEADERS,
        RFC_REQUEST_BODY,
    );
    msg.set("Signature-Input", B26_SIGNATURE_INPUT);
    msg.set("Signature", B26_SIGNATURE);
    let public = HttpVerifyingKey::from_pem(RFC_ED25519_PUBLIC, "test-key-ed25519").unwrap();
    // B.2.6 has neither expires nor nonce, and was made in 2021.
    let policy = VerifyPolicy {
        required_components: ["@method", "@authority", "@path", "content-type"]
            .map(String::from)
            .to_vec(),
        require_expires: false,
        require_nonce: false,
        ..VerifyPolicy::default()
    };
    let now = OffsetDateTime::from_unix_timestamp(RFC_CREATED + 10).unwrap();
    let verified = msg
        .with(|r| verify_request(r, &public, &policy, now))
        .unwrap();
    assert_eq!(verified.label, "sig-b26");
    assert_eq!(verified.key_id, "test-key-ed25519");
    assert_eq!(verified.created.unix_timestamp(), RFC_CREATED);
    assert_eq!((verified.expires, verified.nonce), (None, None));
    assert_eq!(verified.remember_until.unix_timestamp(), RFC_CREATED + 300);
    // A covered field changed: refused.
    msg.set("Content-Length", "19");
    assert_eq!(
        msg.with(|r| verify_request(r, &public, &policy, now)),
        Err(HttpSigError::BadSignature)
    );
}

#[test]
fn rfc9421_b24_ecdsa_p256_signature_verifies() {
    // B.2.4 signs a response (`@status`); Gridward verifies requests only, so the base is the
    // RFC's text, the parameters line is re-serialised from the RFC's Signature-Input, and the
    // RFC's signature is checked with the RFC's key.
    let inputs: Dictionary = Parser::new(B24_SIGNATURE_INPUT).parse().unwrap();
    let Some(ListEntry::InnerList(list)) = inputs.get("sig-b24") else {
        panic!("sig-b24 is an inner list")
    };
    let params_line = serialize_inner_list(list).unwrap();
    assert!(B24_BASE.ends_with(&format!("\"@signature-params\": {params_line}")));
    assert_eq!(
        digest(&SHA512, B24_RESPONSE_BODY).as_ref(),
        Parser::new("sha-512=:mEWXIS7MaLRuGgxOBdODa3xqM1XdEvxoYhvlCFJ41QJgJc4GTsPp29l5oGX69wWdXymyU0rjJuahq4l5aGgfLQ==:")
            .parse::<Dictionary>()
            .unwrap()
            .get("sha-512")
            .and_then(|e| match e {
                ListEntry::Item(i) => i.bare_item.as_byte_sequence().map(<[u8]>::to_vec),
                ListEntry::InnerList(_) => None,
            })
            .unwrap(),
        "the response's Content-Digest is the body's SHA-512"
    );

    let signature: Dictionary = Parser::new(B24_SIGNATURE).parse().unwrap();
    let Some(ListEntry::Item(Item {
        bare_item: BareItem::ByteSequence(sig),
        ..
    })) = signature.get("sig-b24")
    else {
        panic!("sig-b24 is a byte sequence")
    };
    assert_eq!(sig.len(), 64, "raw r || s");
    let key = HttpVerifyingKey::from_pem(RFC_P256_PUBLIC, "test-key-ecc-p256").unwrap();
    key.verify(B24_BASE.as_bytes(), sig).unwrap();

    let mut bad = sig.clone();
    bad[10] ^= 0x01;
    assert_eq!(
        key.verify(B24_BASE.as_bytes(), &bad),
        Err(HttpSigError::BadSignature)
    );
    let changed = B24_BASE.replace("200", "201");
    assert_eq!(
        key.verify(changed.as_bytes(), sig),
        Err(HttpSigError::BadSignature)
    );
    // The Ed25519 test key does not verify it.
    assert_eq!(
        rfc_ed_key()
            .verifying_key()
            .verify(B24_BASE.as_bytes(), sig),
        Err(HttpSigError::BadSignature)
    );
}

#[test]
fn response_signatures_are_refused_as_unsupported() {
    let mut msg = Msg::reading();
    msg.set("Signature-Input", B24_SIGNATURE_INPUT);
    msg.set("Signature", B24_SIGNATURE);
    let policy = VerifyPolicy {
        required_components: vec![],
        ..VerifyPolicy::default()
    };
    assert_eq!(
        msg.verify_with(&policy, NOW),
        Err(HttpSigError::ComponentUnsupported("\"@status\"".into()))
    );
}

// ---------------------------------------------------------------------------------------------
// RFC 9530 Content-Digest

#[test]
fn rfc9530_content_digest_examples() {
    // RFC 9530 Appendix B.1: `{"hello": "world"}` followed by LF.
    let hello_lf = b"{\"hello\": \"world\"}\n";
    assert_eq!(
        content_digest(hello_lf),
        "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:"
    );
    // B.2: empty content.
    assert_eq!(
        content_digest(b""),
        "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    );
    // B.3: the partial content `"world"}` followed by LF.
    assert_eq!(
        content_digest(b"\"world\"}\n"),
        "sha-256=:jjcgBDWNAtbYUXI37CVG3gRuGOAjaaDRGpIUFsdyepQ=:"
    );
    // §2's sha-512 example, next to the matching sha-256.
    let both = "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:, \
                sha-512=:YMAam51Jz/jOATT6/zvHrLVgOYTGFy1d6GJiOHTohq4yP+pgk4vf2aCsyRZOtw8MjkM7iw7yZ/WkppmM44T3qg==:";
    verify_content_digest(both, hello_lf).unwrap();
    // §2's two-member example itself: its sha-256 member is not the digest of the content its
    // sha-512 member describes, so a verifier checking both refuses it.
    let section2 = "sha-256=:d435Qo+nKZ+gLcUHn7GQtQ72hiBVAgqoLsZnZPiTGPk=:, \
                    sha-512=:YMAam51Jz/jOATT6/zvHrLVgOYTGFy1d6GJiOHTohq4yP+pgk4vf2aCsyRZOtw8MjkM7iw7yZ/WkppmM44T3qg==:";
    assert_eq!(
        verify_content_digest(section2, hello_lf),
        Err(HttpSigError::ContentDigestMismatch("sha-256"))
    );
    // RFC 9421 B.2's request digest (sha-512 of `{"hello": "world"}`) is checked when a
    // sha-256 member comes with it.
    let rfc9421 = format!(
        "{}, sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
        content_digest(RFC_REQUEST_BODY)
    );
    verify_content_digest(&rfc9421, RFC_REQUEST_BODY).unwrap();
    assert_eq!(
        verify_content_digest(&rfc9421.replace("WZD", "WZE"), RFC_REQUEST_BODY),
        Err(HttpSigError::ContentDigestMismatch("sha-512"))
    );
    // Unknown algorithms beside sha-256 are ignored.
    verify_content_digest(
        &format!("md5=:AAAA:, {}, unixsum=42", content_digest(BODY)),
        BODY,
    )
    .unwrap();
}

#[test]
fn content_digest_refusals() {
    assert_eq!(
        verify_content_digest("", BODY),
        Err(HttpSigError::ContentDigestMissing)
    );
    for malformed in [
        "sha-256",
        "sha-256=abc",
        "sha-256=:AAAA:",
        "sha-256=(:AAAA:)",
        "sha-256=:not base64!:",
        "SHA-256=:AAAA:",
        "sha-256=:@:",
    ] {
        assert!(
            matches!(
                verify_content_digest(malformed, BODY),
                Err(HttpSigError::ContentDigestMalformed(_))
            ),
            "{malformed:?}"
        );
    }
    let sha512_only = "sha-512=:YMAam51Jz/jOATT6/zvHrLVgOYTGFy1d6GJiOHTohq4yP+pgk4vf2aCsyRZOtw8MjkM7iw7yZ/WkppmM44T3qg==:";
    assert_eq!(
        verify_content_digest(sha512_only, b"{\"hello\": \"world\"}\n"),
        Err(HttpSigError::ContentDigestUnsupported("sha-512".into()))
    );
    assert!(matches!(
        verify_content_digest("md5=:AAAA:", BODY),
        Err(HttpSigError::ContentDigestUnsupported(_))
    ));
    assert_eq!(
        verify_content_digest(&content_digest(b"other"), BODY),
        Err(HttpSigError::ContentDigestMismatch("sha-256"))
    );
    let huge = format!(
        "{}, x={}",
        content_digest(BODY),
        "1".repeat(MAX_FIELD_VALUE_LEN)
    );
    assert!(matches!(
        verify_content_digest(&huge, BODY),
        Err(HttpSigError::FieldTooLarge { .. })
    ));
    let mut msg = Msg::reading();
    msg.remove("content-digest");
    assert_eq!(msg.verify_body(), Err(HttpSigError::ContentDigestMissing));
}

// ---------------------------------------------------------------------------------------------
// Round trips

#[test]
fn round_trip_both_algorithms() {
    for key in [ed_key(), ec_key()] {
        let msg = Msg::reading().signed(&key, &sign_params());
        let verified = msg.verify().unwrap();
        assert_eq!(verified.label, "gridward");
        assert_eq!(verified.key_id, key.key_id());
        assert_eq!(verified.alg, key.alg());
        assert_eq!(verified.components, FOUR.map(String::from).to_vec());
        assert_eq!(verified.created, NOW);
        assert_eq!(verified.expires, Some(NOW + Duration::from_secs(60)));
        assert_eq!(verified.nonce.as_deref(), Some("n-0123456789abcdef"));
        // The earlier of expires (60 s) and created + max_age (300 s).
        assert_eq!(verified.remember_until, NOW + Duration::from_secs(60));
        msg.verify_body().unwrap();

        assert_eq!(
            msg.get("signature-input"),
            format!(
                "gridward=(\"@method\" \"@target-uri\" \"content-digest\" \"content-type\");\
                 created=1707220800;expires=1707220860;nonce=\"n-0123456789abcdef\";keyid=\"{}\";alg=\"{}\"",
                key.key_id(),
                key.alg().name()
            )
        );
    }
}

#[test]
fn header_names_are_case_insensitive_and_other_fields_do_not_matter() {
    let mut msg = Msg::reading().signed(&ed_key(), &sign_params());
    for (name, _) in &mut msg.headers {
        *name = name.to_ascii_uppercase();
    }
    msg.headers.push(("X-Uncovered".into(), "anything".into()));
    msg.verify().unwrap();
}

#[test]
fn signature_without_alg_parameter_verifies() {
    let key = ec_key();
    let msg = Msg::reading().signed_with(&key, &FOUR, without(full_params(&key), ALG));
    msg.verify().unwrap();
}

#[test]
fn the_first_label_covering_the_required_components_is_verified() {
    let key = ed_key();
    let mut msg = Msg::reading();
    let only_method = msg
        .with(|r| {
            sign_with(
                r,
                &key,
                "partial",
                &["@method".to_owned()],
                full_params(&key),
            )
        })
        .unwrap()
        .0;
    msg.add_signature(&only_method);
    let full = msg.with(|r| sign_request(r, &key, &sign_params())).unwrap();
    msg.add_signature(&full);
    // Two Signature-Input and two Signature fields, combined into two-member dictionaries.
    assert_eq!(msg.verify().unwrap().label, "gridward");

    // A broken label that is not chosen does not matter; a broken chosen one does.
    let mut broken = msg.clone();
    broken
        .headers
        .push(("Signature-Input".into(), "junk=?1".into()));
    assert_eq!(broken.verify().unwrap().label, "gridward");
    broken.set(
        "Signature",
        &change_signature(&msg.get("signature"), "gridward", |b| b[0] ^= 1),
    );
    assert_eq!(broken.verify(), Err(HttpSigError::BadSignature));
}

#[test]
fn key_lookup_by_single_key_and_map() {
    let key = ed_key();
    let msg = Msg::reading().signed(&key, &sign_params());
    let single = key.verifying_key();
    msg.with(|r| verify_request(r, &single, &VerifyPolicy::default(), NOW))
        .unwrap();
    assert!(single.key("someone-else").is_none());
}

// ---------------------------------------------------------------------------------------------
// One test per refusal

#[test]
fn tampered_body_fails_the_digest() {
    let mut msg = Msg::reading().signed(&ed_key(), &sign_params());
    msg.body = BODY.to_vec();
    msg.body[50] ^= 0x01;
    // The signature covers the digest field, which is unchanged...
    msg.verify().unwrap();
    // ...and the digest refuses the body.
    assert_eq!(
        msg.verify_body(),
        Err(HttpSigError::ContentDigestMismatch("sha-256"))
    );
}

#[test]
fn tampered_digest_fails_the_signature() {
    let mut msg = Msg::reading().signed(&ed_key(), &sign_params());
    msg.body = b"{\"forged\":true}".to_vec();
    msg.set("Content-Digest", &content_digest(&msg.body));
    msg.verify_body().unwrap();
    assert_eq!(msg.verify(), Err(HttpSigError::BadSignature));
}

#[test]
fn tampered_header_fails() {
    for key in [ed_key(), ec_key()] {
        let mut msg = Msg::reading().signed(&key, &sign_params());
        msg.set("Content-Type", "application/xml");
        assert_eq!(msg.verify(), Err(HttpSigError::BadSignature));
    }
}

#[test]
fn wrong_method_fails() {
    let mut msg = Msg::reading().signed(&ed_key(), &sign_params());
    msg.method = "PUT".into();
    assert_eq!(msg.verify(), Err(HttpSigError::BadSignature));
}

#[test]
fn wrong_target_uri_fails() {
    for uri in [
        "https://127.0.0.1:8443/other",
        "https://127.0.0.1:9443/readings",
        "http://127.0.0.1:8443/readings",
        "https://127.0.0.1:8443/readings?x=1",
    ] {
        let mut msg = Msg::reading().signed(&ec_key(), &sign_params());
        msg.uri = uri.into();
        assert_eq!(msg.verify(), Err(HttpSigError::BadSignature), "{uri}");
    }
}

#[test]
fn signature_by_another_key_under_the_right_keyid_fails() {
    // The attacker knows the victim's key id (it is public) and signs with their own key.
    let attacker = HttpSigningKey::from_pkcs8_pem(RFC_ED25519_PRIVATE, ED_KEY_ID).unwrap();
    let msg = Msg::reading().signed(&attacker, &sign_params());
    assert_eq!(msg.verify(), Err(HttpSigError::BadSignature));
}

#[test]
fn unknown_keyid_is_refused() {
    let key = HttpSigningKey::from_pkcs8_pem(RFC_ED25519_PRIVATE, "stranger").unwrap();
    let msg = Msg::reading().signed(&key, &sign_params());
    assert_eq!(
        msg.verify(),
        Err(HttpSigError::UnknownKey("stranger".into()))
    );
}

#[test]
fn missing_keyid_is_refused() {
    let key = ed_key();
    let msg = Msg::reading().signed_with(&key, &FOUR, without(full_params(&key), KEYID));
    assert_eq!(msg.verify(), Err(HttpSigError::KeyIdMissing));
}

#[test]
fn alg_mismatch_is_refused() {
    // The signature says ed25519; the key registered under its key id is P-256.
    let ed = ed_key();
    let msg = Msg::reading().signed(&ed, &sign_params());
    let lookup: HashMap<String, HttpVerifyingKey> = [(
        ED_KEY_ID.to_owned(),
        HttpVerifyingKey::from_spki_der(ec_key().verifying_key().spki_der(), ED_KEY_ID).unwrap(),
    )]
    .into();
    assert_eq!(
        msg.with(|r| verify_request(r, &lookup, &VerifyPolicy::default(), NOW)),
        Err(HttpSigError::AlgMismatch {
            signature: "ed25519".into(),
            key: HttpSigAlg::EcdsaP256Sha256
        })
    );
    // An alg Gridward does not know.
    let params = replaced(
        full_params(&ed),
        ALG,
        sf_string("alg", "rsa-pss-sha512").unwrap(),
    );
    let msg = Msg::reading().signed_with(&ed, &FOUR, params);
    assert!(matches!(
        msg.verify(),
        Err(HttpSigError::AlgMismatch { .. })
    ));
}

#[test]
fn expired_signature_is_refused() {
    let msg = Msg::reading().signed(&ed_key(), &sign_params());
    let at_expiry = NOW + Duration::from_secs(60);
    assert_eq!(
        msg.verify_with(&VerifyPolicy::default(), at_expiry),
        Err(HttpSigError::SignatureExpired {
            expires: NOW.unix_timestamp() + 60,
            now: at_expiry.unix_timestamp()
        })
    );
    msg.verify_with(&VerifyPolicy::default(), at_expiry - Duration::from_secs(1))
        .unwrap();
}

#[test]
fn too_old_signature_is_refused() {
    let params = SignParams {
        expires: NOW + Duration::from_secs(3600),
        ..sign_params()
    };
    let msg = Msg::reading().signed(&ed_key(), &params);
    let policy = VerifyPolicy::default();
    msg.verify_with(&policy, NOW + Duration::from_secs(300))
        .unwrap();
    assert_eq!(
        msg.verify_with(&policy, NOW + Duration::from_secs(301)),
        Err(HttpSigError::SignatureTooOld {
            created: NOW.unix_timestamp(),
            now: NOW.unix_timestamp() + 301
        })
    );
}

#[test]
fn created_in_the_future_is_refused() {
    let msg = Msg::reading().signed(&ed_key(), &sign_params());
    // Within the 5 s skew: accepted.
    msg.verify_with(&VerifyPolicy::default(), NOW - Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        msg.verify_with(&VerifyPolicy::default(), NOW - Duration::from_secs(6)),
        Err(HttpSigError::CreatedInFuture {
            created: NOW.unix_timestamp(),
            now: NOW.unix_timestamp() - 6
        })
    );
}

#[test]
fn missing_created_is_refused() {
    let key = ed_key();
    let msg = Msg::reading().signed_with(&key, &FOUR, without(full_params(&key), CREATED));
    assert_eq!(msg.verify(), Err(HttpSigError::CreatedMissing));
}

#[test]
fn missing_expires_is_refused_when_required() {
    let key = ed_key();
    let msg = Msg::reading().signed_with(&key, &FOUR, without(full_params(&key), EXPIRES));
    assert_eq!(msg.verify(), Err(HttpSigError::ExpiresMissing));
    let lenient = VerifyPolicy {
        require_expires: false,
        ..VerifyPolicy::default()
    };
    let verified = msg.verify_with(&lenient, NOW).unwrap();
    assert_eq!(verified.expires, None);
    assert_eq!(verified.remember_until, NOW + Duration::from_secs(300));
}

#[test]
fn missing_nonce_is_refused_when_required() {
    let key = ec_key();
    let msg = Msg::reading().signed_with(&key, &FOUR, without(full_params(&key), NONCE));
    assert_eq!(msg.verify(), Err(HttpSigError::NonceMissing));
    let empty = replaced(full_params(&key), NONCE, sf_string("nonce", "").unwrap());
    let msg_empty = Msg::reading().signed_with(&key, &FOUR, empty);
    assert_eq!(msg_empty.verify(), Err(HttpSigError::NonceMissing));
    let lenient = VerifyPolicy {
        require_nonce: false,
        ..VerifyPolicy::default()
    };
    assert_eq!(msg.verify_with(&lenient, NOW).unwrap().nonce, None);
}

#[test]
fn missing_signature_is_refused() {
    let signed = Msg::reading().signed(&ed_key(), &sign_params());
    let mut msg = signed.clone();
    msg.remove("signature");
    assert!(matches!(
        msg.verify(),
        Err(HttpSigError::SignatureMissing(_))
    ));
    let mut msg = signed.clone();
    msg.remove("signature-input");
    assert!(matches!(
        msg.verify(),
        Err(HttpSigError::SignatureMissing(_))
    ));
    let mut msg = signed.clone();
    msg.set("Signature", "other=:AAAA:");
    assert_eq!(
        msg.verify(),
        Err(HttpSigError::SignatureMissing(
            "Signature has no gridward".into()
        ))
    );
    let mut msg = signed;
    msg.set("Signature-Input", "");
    assert!(matches!(
        msg.verify(),
        Err(HttpSigError::SignatureMissing(_))
    ));
    assert!(matches!(
        Msg::reading().verify(),
        Err(HttpSigError::SignatureMissing(_))
    ));
}

#[test]
fn malformed_signature_input_is_refused() {
    let signed = Msg::reading().signed(&ed_key(), &sign_params());
    let input = signed.get("signature-input");
    let lenient = VerifyPolicy {
        required_components: vec![],
        ..VerifyPolicy::default()
    };
    let cases = [
        "gridward=(\"@method\"".to_owned(),
        "gridward=:AAAA:".to_owned(),
        "gridward=(1 2);created=1".to_owned(),
        "Gridward=(\"@method\")".to_owned(),
        input.replace("created=1707220800", "created=\"1707220800\""),
        input.replace("created=1707220800", "created=1707220800.5"),
        input.replace("keyid=\"", "keyid=?1;x=\""),
        input.replace("nonce=\"n-0123456789abcdef\"", "nonce=token"),
        input.replace(";alg=", ";foo=1;alg="),
        input.replace("expires=1707220860", "expires=1707220000"),
        input.replace("created=1707220800", "created=999999999999999"),
        input.replace("\"content-type\"", "\"Content-Type\""),
        input.replace("created=1707220800", "created=@1707220800"),
        format!(
            "gridward=({});created=1",
            (0..=MAX_COVERED_COMPONENTS)
                .map(|i| format!("\"x-{i}\""))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    ];
    for bad in cases {
        let mut msg = signed.clone();
        msg.set("Signature-Input", &bad);
        assert!(
            matches!(
                msg.verify_with(&lenient, NOW),
                Err(HttpSigError::SignatureInputMalformed(_))
            ),
            "{bad:?}: {:?}",
            msg.verify_with(&lenient, NOW)
        );
    }
}

#[test]
fn malformed_signature_is_refused() {
    let signed = Msg::reading().signed(&ed_key(), &sign_params());
    for bad in [
        "gridward=(",
        "gridward=\"abc\"",
        "gridward=(:AAAA:)",
        "gridward=:AA",
    ] {
        let mut msg = signed.clone();
        msg.set("Signature", bad);
        assert!(
            matches!(msg.verify(), Err(HttpSigError::SignatureMalformed(_))),
            "{bad:?}"
        );
    }
    // A well-formed byte sequence of the wrong length is simply a bad signature.
    let mut msg = signed;
    msg.set("Signature", "gridward=:AAAA:");
    assert_eq!(msg.verify(), Err(HttpSigError::BadSignature));
}

#[test]
fn required_component_not_covered_is_refused() {
    let key = ed_key();
    let msg = Msg::reading().signed_with(
        &key,
        &["@method", "@target-uri", "content-digest"],
        full_params(&key),
    );
    assert_eq!(
        msg.verify(),
        Err(HttpSigError::ComponentNotCovered("content-type".into()))
    );
}

#[test]
fn covered_component_absent_from_request_is_refused() {
    let key = ed_key();
    let mut msg = Msg::reading();
    msg.set("X-Meter", "123456789");
    let mut msg = msg.signed_with(
        &key,
        &[
            "@method",
            "@target-uri",
            "content-digest",
            "content-type",
            "x-meter",
        ],
        full_params(&key),
    );
    msg.verify().unwrap();
    msg.remove("x-meter");
    assert_eq!(
        msg.verify(),
        Err(HttpSigError::ComponentMissing("x-meter".into()))
    );
    let mut msg = Msg::reading().signed(&key, &sign_params());
    msg.remove("content-digest");
    assert_eq!(
        msg.verify(),
        Err(HttpSigError::ComponentMissing("content-digest".into()))
    );
}

#[test]
fn duplicate_unknown_and_parameterised_components_are_refused() {
    let signed = Msg::reading().signed(&ed_key(), &sign_params());
    let input = signed.get("signature-input");
    let cases = [
        (
            input.replace("(\"@method\"", "(\"@method\" \"@method\""),
            HttpSigError::DuplicateComponent("@method".into()),
        ),
        (
            input.replace("(\"@method\"", "(\"@method\" \"@foo\""),
            HttpSigError::ComponentUnsupported("\"@foo\"".into()),
        ),
        (
            input.replace("(\"@method\"", "(\"@method\" \"@query-param\";name=\"a\""),
            HttpSigError::ComponentUnsupported(
                "\"@query-param\";name (component parameters are not supported)".into(),
            ),
        ),
        (
            input.replace("\"content-type\"", "\"content-type\";sf"),
            HttpSigError::ComponentUnsupported(
                "\"content-type\";sf (component parameters are not supported)".into(),
            ),
        ),
        (
            input.replace("\"content-digest\"", "\"content-digest\";key=\"sha-256\""),
            HttpSigError::ComponentUnsupported(
                "\"content-digest\";key (component parameters are not supported)".into(),
            ),
        ),
    ];
    for (bad, expected) in cases {
        let mut msg = signed.clone();
        msg.set("Signature-Input", &bad);
        assert_eq!(msg.verify(), Err(expected), "{bad}");
    }
}

#[test]
fn oversized_and_invalid_fields_are_refused() {
    let signed = Msg::reading().signed(&ed_key(), &sign_params());
    let mut msg = signed.clone();
    msg.headers
        .push(("Signature".into(), "x".repeat(MAX_FIELD_VALUE_LEN)));
    assert!(matches!(
        msg.verify(),
        Err(HttpSigError::FieldTooLarge { name, .. }) if name == "signature"
    ));
    let mut msg = signed.clone();
    msg.headers
        .push(("Signature-Input".into(), "x".repeat(MAX_FIELD_VALUE_LEN)));
    assert!(matches!(
        msg.verify(),
        Err(HttpSigError::FieldTooLarge { name, .. }) if name == "signature-input"
    ));
    let mut msg = signed;
    msg.set("Content-Type", "application/json\r\nX-Injected: 1");
    assert_eq!(
        msg.verify(),
        Err(HttpSigError::FieldValueInvalid("content-type".into()))
    );
}

#[test]
fn invalid_requests_are_refused_on_both_sides() {
    let key = ed_key();
    let mut msg = Msg::reading();
    msg.uri = "https://user@127.0.0.1:8443/readings".into();
    assert!(matches!(
        msg.with(|r| sign_request(r, &key, &sign_params())),
        Err(HttpSigError::InvalidRequest(_))
    ));
    let mut msg = Msg::reading().signed(&key, &sign_params());
    msg.uri = "/readings".into();
    assert!(matches!(msg.verify(), Err(HttpSigError::InvalidRequest(_))));
    let mut msg = Msg::reading().signed(&key, &sign_params());
    msg.method = "PO ST".into();
    assert!(matches!(msg.verify(), Err(HttpSigError::InvalidRequest(_))));
}

#[test]
fn invalid_sign_params_are_refused() {
    let key = ed_key();
    let msg = Msg::reading();
    let sign = |params: &SignParams| msg.with(|r| sign_request(r, &key, params));
    let with_components = |c: &[&str]| SignParams {
        components: c.iter().map(|s| (*s).to_owned()).collect(),
        ..sign_params()
    };
    for params in [
        SignParams {
            label: "Gridward".into(),
            ..sign_params()
        },
        SignParams {
            label: String::new(),
            ..sign_params()
        },
        SignParams {
            expires: NOW,
            ..sign_params()
        },
        SignParams {
            nonce: String::new(),
            ..sign_params()
        },
        SignParams {
            nonce: "caf\u{e9}".into(),
            ..sign_params()
        },
        with_components(&["Content-Type"]),
        with_components(&vec!["x"; MAX_COVERED_COMPONENTS + 1]),
    ] {
        assert!(
            matches!(sign(&params), Err(HttpSigError::InvalidSignParams(_))),
            "{params:?}: {:?}",
            sign(&params)
        );
    }
    assert_eq!(
        sign(&with_components(&["@method", "@method"])),
        Err(HttpSigError::DuplicateComponent("@method".into()))
    );
    assert_eq!(
        sign(&with_components(&["@status"])),
        Err(HttpSigError::ComponentUnsupported("\"@status\"".into()))
    );
    assert_eq!(
        sign(&with_components(&["@method", "x-absent"])),
        Err(HttpSigError::ComponentMissing("x-absent".into()))
    );
}

#[test]
fn bad_keys_are_refused() {
    let junk = [
        "",
        "junk",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ];
    for pem in junk {
        assert!(matches!(
            HttpSigningKey::from_pkcs8_pem(pem, "k"),
            Err(HttpSigError::BadKey(_))
        ));
        assert!(matches!(
            HttpVerifyingKey::from_pem(pem, "k"),
            Err(HttpSigError::BadKey(_))
        ));
    }
    // RSA is not an algorithm of this profile.
    let rsa_private = include_str!("../../tests/fixtures/rs256.key.pem");
    let rsa_public = include_str!("../../tests/fixtures/rs256.pub.pem");
    assert!(matches!(
        HttpSigningKey::from_pkcs8_pem(rsa_private, "k"),
        Err(HttpSigError::BadKey(_))
    ));
    assert!(matches!(
        HttpVerifyingKey::from_pem(rsa_public, "k"),
        Err(HttpSigError::BadKey(_))
    ));
    // Raw Ed25519 key bytes are not a SubjectPublicKeyInfo.
    let spki = ed_key().verifying_key().spki_der().to_vec();
    assert!(matches!(
        HttpVerifyingKey::from_spki_der(&spki[12..], "k"),
        Err(HttpSigError::BadKey(_))
    ));
    // Key ids must be usable as a Structured Field string.
    for key_id in ["", "caf\u{e9}", "a\nb"] {
        assert!(matches!(
            HttpSigningKey::from_pkcs8_pem(RFC_ED25519_PRIVATE, key_id),
            Err(HttpSigError::BadKey(_))
        ));
    }
}

#[test]
fn verifying_keys_load_from_certificate_public_and_private_pem() {
    for (stem, alg) in [
        ("eddsa", HttpSigAlg::Ed25519),
        ("es256", HttpSigAlg::EcdsaP256Sha256),
    ] {
        let pems = match stem {
            "eddsa" => [
                include_str!("../../tests/fixtures/eddsa.cert.pem"),
                include_str!("../../tests/fixtures/eddsa.pub.pem"),
                include_str!("../../tests/fixtures/eddsa.key.pem"),
            ],
            _ => [
                include_str!("../../tests/fixtures/es256.cert.pem"),
                include_str!("../../tests/fixtures/es256.pub.pem"),
                include_str!("../../tests/fixtures/es256.key.pem"),
            ],
        };
        let loaded: Vec<HttpVerifyingKey> = pems
            .iter()
            .map(|pem| HttpVerifyingKey::from_pem(pem, stem).unwrap())
            .collect();
        for key in &loaded {
            assert_eq!(key.alg(), alg);
            assert_eq!(key.key_id(), stem);
            assert_eq!(key.spki_der(), loaded[0].spki_der());
        }
        // A certificate verifies what the private key signed.
        let signer = HttpSigningKey::from_pkcs8_pem(pems[2], stem).unwrap();
        let msg = Msg::reading().signed(&signer, &sign_params());
        msg.with(|r| verify_request(r, &loaded[0], &VerifyPolicy::default(), NOW))
            .unwrap();
    }
}

#[test]
fn debug_output_shows_no_key_material() {
    let key = ed_key();
    let debug = format!("{key:?}");
    assert_eq!(
        debug,
        "HttpSigningKey { alg: Ed25519, key_id: \"hes-ed25519\", .. }"
    );
    let verifying = format!("{:?}", key.verifying_key());
    assert_eq!(
        verifying,
        "HttpVerifyingKey { alg: Ed25519, key_id: \"hes-ed25519\", .. }"
    );
}

#[test]
fn error_codes_are_distinct_snake_case() {
    let all = [
        HttpSigError::SignatureMissing(String::new()),
        HttpSigError::SignatureInputMalformed(String::new()),
        HttpSigError::SignatureMalformed(String::new()),
        HttpSigError::FieldTooLarge {
            name: String::new(),
            len: 0,
        },
        HttpSigError::FieldValueInvalid(String::new()),
        HttpSigError::InvalidRequest(String::new()),
        HttpSigError::ComponentUnsupported(String::new()),
        HttpSigError::DuplicateComponent(String::new()),
        HttpSigError::ComponentNotCovered(String::new()),
        HttpSigError::ComponentMissing(String::new()),
        HttpSigError::KeyIdMissing,
        HttpSigError::UnknownKey(String::new()),
        HttpSigError::AlgMismatch {
            signature: String::new(),
            key: HttpSigAlg::Ed25519,
        },
        HttpSigError::CreatedMissing,
        HttpSigError::SignatureTooOld { created: 0, now: 0 },
        HttpSigError::CreatedInFuture { created: 0, now: 0 },
        HttpSigError::ExpiresMissing,
        HttpSigError::SignatureExpired { expires: 0, now: 0 },
        HttpSigError::NonceMissing,
        HttpSigError::BadSignature,
        HttpSigError::ContentDigestMissing,
        HttpSigError::ContentDigestMalformed(String::new()),
        HttpSigError::ContentDigestUnsupported(String::new()),
        HttpSigError::ContentDigestMismatch("sha-256"),
        HttpSigError::BadKey(String::new()),
        HttpSigError::InvalidSignParams(String::new()),
        HttpSigError::SigningFailed,
    ];
    let mut codes: Vec<&str> = all.iter().map(HttpSigError::code).collect();
    for code in &codes {
        assert!(
            code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{code}"
        );
    }
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), all.len());
}

#[test]
fn algorithm_names() {
    for alg in [HttpSigAlg::Ed25519, HttpSigAlg::EcdsaP256Sha256] {
        assert_eq!(HttpSigAlg::from_name(alg.name()), Some(alg));
        assert_eq!(alg.to_string(), alg.name());
    }
    assert_eq!(HttpSigAlg::from_name("hmac-sha256"), None);
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any single-byte change to the signature fails verification.
    #[test]
    fn any_changed_signature_byte_fails(ecdsa in any::<bool>(), index in 0usize..64, flip in 1u8..=255) {
        let key = if ecdsa { ec_key() } else { ed_key() };
        let mut msg = Msg::reading().signed(&key, &sign_params());
        prop_assert!(msg.verify().is_ok());
        let changed = change_signature(&msg.get("signature"), "gridward", |b| b[index] ^= flip);
        msg.set("Signature", &changed);
        prop_assert_eq!(msg.verify(), Err(HttpSigError::BadSignature));
    }

    /// Any single-byte change to a covered header value fails verification.
    #[test]
    fn any_changed_covered_header_byte_fails(
        ecdsa in any::<bool>(),
        digest_field in any::<bool>(),
        index in any::<prop::sample::Index>(),
        replacement in 0x20u8..0x7f,
    ) {
        let key = if ecdsa { ec_key() } else { ed_key() };
        let mut msg = Msg::reading().signed(&key, &sign_params());
        let name = if digest_field { "content-digest" } else { "content-type" };
        let mut value = msg.get(name).into_bytes();
        let at = index.index(value.len());
        prop_assume!(value[at] != replacement);
        value[at] = replacement;
        msg.set(name, &String::from_utf8(value).unwrap());
        prop_assert!(msg.verify().is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// The vector in docs/wire-format.md §6.6

/// The `docs/wire-format.md` vector's request, signed with the committed Ed25519 test key.
fn wire_format_vector() -> (Msg, String, SignatureHeaders) {
    let key = HttpSigningKey::from_pkcs8_pem(
        include_str!("../../tests/fixtures/eddsa.key.pem"),
        "gridward-test-ed25519",
    )
    .unwrap();
    let params = SignParams {
        nonce: "b3f1c2d4e5a6978812345678".to_owned(),
        ..sign_params()
    };
    let msg = Msg::reading();
    let (headers, base) = msg
        .with(|r| {
            let sig_params: SigParams = vec![
                (CREATED, sf_integer(params.created.unix_timestamp())?),
                (EXPIRES, sf_integer(params.expires.unix_timestamp())?),
                (NONCE, sf_string("nonce", &params.nonce)?),
                (KEYID, sf_string("keyid", key.key_id())?),
                (ALG, sf_string("alg", key.alg().name())?),
            ];
            sign_with(r, &key, &params.label, &params.components, sig_params)
        })
        .unwrap();
    assert_eq!(
        msg.with(|r| sign_request(r, &key, &params)).unwrap(),
        headers,
        "sign_request signs exactly these parameters"
    );
    (msg, base, headers)
}

/// Prints the `httpsig-vector` block and the signature base for `docs/wire-format.md`.
#[test]
#[ignore = "prints the docs/wire-format.md vector"]
fn print_wire_format_vector() {
    let (msg, base, headers) = wire_format_vector();
    println!("```httpsig-vector");
    println!("alg: ed25519");
    println!("private_key: crates/gridward-core/tests/fixtures/eddsa.key.pem");
    println!("public_key: crates/gridward-core/tests/fixtures/eddsa.pub.pem");
    println!("keyid: gridward-test-ed25519");
    println!("method: {}", msg.method);
    println!("target_uri: {}", msg.uri);
    println!("body: {}", String::from_utf8_lossy(&msg.body));
    println!("content-type: {}", msg.get("content-type"));
    println!("content-digest: {}", msg.get("content-digest"));
    println!("signature-input: {}", headers.signature_input);
    println!("signature: {}", headers.signature);
    println!("```\n\n```text\n{base}\n```");
}

/// `docs/wire-format.md` §6.6 holds exactly what Gridward produces, and it verifies.
#[test]
fn wire_format_vector_is_reproduced() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let spec = std::fs::read_to_string(root.join("docs/wire-format.md")).unwrap();
    let mut block = spec
        .split("```httpsig-vector\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("docs/wire-format.md has an httpsig-vector block")
        .lines()
        .map(|l| l.split_once(": ").expect("key: value"))
        .collect::<HashMap<_, _>>();
    let (msg, base, headers) = wire_format_vector();
    let expected = [
        ("alg", "ed25519".to_owned()),
        ("keyid", "gridward-test-ed25519".to_owned()),
        ("method", msg.method.clone()),
        ("target_uri", msg.uri.clone()),
        ("body", String::from_utf8(msg.body.clone()).unwrap()),
        ("content-type", msg.get("content-type")),
        ("content-digest", msg.get("content-digest")),
        ("signature-input", headers.signature_input.clone()),
        ("signature", headers.signature.clone()),
    ];
    for (name, value) in expected {
        assert_eq!(block.remove(name), Some(value.as_str()), "{name}");
    }
    assert!(
        spec.contains(&format!("```text\n{base}\n```")),
        "the signature base in docs/wire-format.md §6.6"
    );

    // The keys named in the block are the committed fixtures, and the vector verifies.
    let private = std::fs::read_to_string(root.join(block.remove("private_key").unwrap())).unwrap();
    assert_eq!(private, include_str!("../../tests/fixtures/eddsa.key.pem"));
    let public = std::fs::read_to_string(root.join(block.remove("public_key").unwrap())).unwrap();
    let public = HttpVerifyingKey::from_pem(&public, "gridward-test-ed25519").unwrap();
    assert!(block.is_empty(), "unchecked vector lines: {block:?}");
    let mut signed = msg;
    signed.add_signature(&headers);
    let verified = signed
        .with(|r| verify_request(r, &public, &VerifyPolicy::default(), NOW))
        .unwrap();
    assert_eq!(verified.nonce.as_deref(), Some("b3f1c2d4e5a6978812345678"));
    signed.verify_body().unwrap();
}
