//! Envelope tests across the public API: the test vectors of `docs/wire-format.md`, and
//! property tests (round trip, any single-byte mutation fails).

use std::collections::BTreeMap;
use std::path::PathBuf;

use gridward_core::MeterId;
use gridward_core::document::{Format, Limits, Reading};
use gridward_core::envelope::{
    self, EnvelopeHeader, EnvelopeParams, SigningKey, UnsignedEnvelope, VerifyingKey,
};
use proptest::prelude::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo_root().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

const XML: &str = "<EnergyUsageReport><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>";
const JSON: &str =
    r#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":350.5}"#;

/// The vectors the spec publishes: (algorithm file stem, content type, topic, counter, payload).
fn vector_inputs() -> Vec<(&'static str, Format, &'static str, u64, &'static str)> {
    vec![
        ("es256", Format::Xml, "meters/123456789/readings", 42, XML),
        ("eddsa", Format::Json, "meters/123456789/readings", 43, JSON),
        ("rs256", Format::Xml, "meters/123456789/readings", 44, XML),
    ]
}

fn key_paths(stem: &str) -> (String, String) {
    (
        format!("crates/gridward-core/tests/fixtures/{stem}.key.pem"),
        format!("crates/gridward-core/tests/fixtures/{stem}.pub.pem"),
    )
}

fn hex(b: &[u8]) -> String {
    hex::encode(b)
}

/// Prints the vector blocks for `docs/wire-format.md`.
#[test]
#[ignore = "generator: run with --ignored --nocapture to regenerate the spec's vectors"]
fn print_vectors() {
    let meter = MeterId::new("123456789").unwrap();
    for (stem, format, topic, counter, payload) in vector_inputs() {
        let (key_path, pub_path) = key_paths(stem);
        let key = SigningKey::from_pkcs8_pem(&fixture(&key_path)).unwrap();
        let header = EnvelopeHeader {
            alg: key.algorithm(),
            kid: key.kid().to_vec(),
            content_type: format,
            meter_id: meter.clone(),
            counter,
            timestamp: 1_707_220_800,
        };
        let unsigned = UnsignedEnvelope::new(header, payload.as_bytes().to_vec(), topic).unwrap();
        let protected = hex(unsigned.protected_bytes());
        let tbs = hex(&unsigned.to_be_signed());
        let params = EnvelopeParams {
            meter_id: &meter,
            counter,
            timestamp: 1_707_220_800,
            content_type: format,
            topic,
        };
        let env = envelope::sign(&key, &params, payload.as_bytes()).unwrap();
        println!("```vector");
        println!("alg: {}", key.algorithm());
        println!("private_key: {key_path}");
        println!("public_key: {pub_path}");
        println!("kid: {}", hex(key.kid()));
        println!("meter_id: {meter}");
        println!("counter: {counter}");
        println!("timestamp: 1707220800");
        println!("topic: {topic}");
        println!("content_type: {}", format.content_type());
        println!("payload: {payload}");
        println!("protected: {protected}");
        println!("to_be_signed: {tbs}");
        println!("envelope: {}", hex(&env));
        println!("```\n");
    }
}

fn parse_vectors(spec: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut current: Option<BTreeMap<String, String>> = None;
    for line in spec.lines() {
        match (&mut current, line.trim()) {
            (None, "```vector") => current = Some(BTreeMap::new()),
            (Some(_), "```") => out.extend(current.take()),
            (Some(map), l) => {
                let (k, v) = l
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("bad vector line {l:?}"));
                map.insert(k.to_owned(), v.to_owned());
            }
            (None, _) => {}
        }
    }
    out
}

#[test]
fn spec_vectors_verify_and_reproduce() {
    let spec = fixture("docs/wire-format.md");
    let vectors = parse_vectors(&spec);
    assert_eq!(
        vectors.len(),
        3,
        "docs/wire-format.md must carry one vector per algorithm"
    );
    let mut algs = Vec::new();
    for v in vectors {
        let key = SigningKey::from_pkcs8_pem(&fixture(&v["private_key"])).unwrap();
        let public = VerifyingKey::from_spki_pem(&fixture(&v["public_key"])).unwrap();
        assert_eq!(key.algorithm().name(), v["alg"]);
        assert_eq!(hex(public.kid()), v["kid"]);
        let meter = MeterId::new(&v["meter_id"]).unwrap();
        let format = Format::from_content_type(&v["content_type"]).unwrap();
        let counter: u64 = v["counter"].parse().unwrap();
        let timestamp: i64 = v["timestamp"].parse().unwrap();
        let header = EnvelopeHeader {
            alg: key.algorithm(),
            kid: key.kid().to_vec(),
            content_type: format,
            meter_id: meter.clone(),
            counter,
            timestamp,
        };
        let unsigned =
            UnsignedEnvelope::new(header, v["payload"].as_bytes().to_vec(), &v["topic"]).unwrap();
        assert_eq!(
            hex(unsigned.protected_bytes()),
            v["protected"],
            "{}: protected header",
            v["alg"]
        );
        assert_eq!(
            hex(&unsigned.to_be_signed()),
            v["to_be_signed"],
            "{}: Sig_structure",
            v["alg"]
        );

        let env = hex::decode(&v["envelope"]).unwrap();
        let verified = envelope::verify(&env, &public, &meter, &v["topic"]).unwrap();
        assert_eq!(verified.header().counter, counter);
        assert_eq!(verified.payload(), v["payload"].as_bytes());
        verified.into_document(&Limits::default()).unwrap();
        assert!(envelope::verify(&env, &public, &meter, "meters/123456789/events").is_err());

        // EdDSA and RSASSA-PKCS1-v1_5 are deterministic: signing again gives the same bytes.
        if v["alg"] != "ES256" {
            let params = EnvelopeParams {
                meter_id: &meter,
                counter,
                timestamp,
                content_type: format,
                topic: &v["topic"],
            };
            let again = envelope::sign(&key, &params, v["payload"].as_bytes()).unwrap();
            assert_eq!(hex(&again), v["envelope"], "{}: envelope", v["alg"]);
        }
        algs.push(v["alg"].clone());
    }
    algs.sort();
    assert_eq!(algs, ["ES256", "EdDSA", "RS256"]);
}

fn keys() -> Vec<SigningKey> {
    ["es256", "eddsa", "rs256"]
        .iter()
        .map(|stem| SigningKey::from_pkcs8_pem(&fixture(&key_paths(stem).0)).expect("fixture key"))
        .collect()
}

fn reading_strategy() -> impl Strategy<Value = (String, i64, f64)> {
    (
        "[0-9A-Za-z][0-9A-Za-z._-]{0,20}",
        946_684_800i64..4_102_444_800,
        0.0f64..1e9,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn sign_verify_round_trip((id, ts, kwh) in reading_strategy(), counter in any::<u64>(), k in 0usize..3, json in any::<bool>()) {
        let keys = keys();
        let key = &keys[k];
        let meter = MeterId::new(&id).unwrap();
        let timestamp = time::OffsetDateTime::from_unix_timestamp(ts).unwrap();
        let reading = Reading { meter_id: meter.clone(), timestamp, energy_kwh: kwh };
        let format = if json { Format::Json } else { Format::Xml };
        let payload = if json { reading.to_json() } else { reading.to_xml() };
        let topic = meter.readings_topic();
        let params = EnvelopeParams { meter_id: &meter, counter, timestamp: ts, content_type: format, topic: &topic };
        let env = envelope::sign(key, &params, payload.as_bytes()).unwrap();
        let verified = envelope::verify(&env, &key.verifying_key().unwrap(), &meter, &topic).unwrap();
        prop_assert_eq!(verified.header().counter, counter);
        let doc = verified.into_document(&Limits::default()).unwrap();
        prop_assert_eq!(doc.document(), &gridward_core::document::Document::Reading(reading));
    }

    #[test]
    fn any_single_byte_mutation_fails(pos in any::<prop::sample::Index>(), xor in 1u8..=255, k in 0usize..3, counter in any::<u64>()) {
        let keys = keys();
        let key = &keys[k];
        let meter = MeterId::new("123456789").unwrap();
        let topic = meter.readings_topic();
        let params = EnvelopeParams { meter_id: &meter, counter, timestamp: 1_707_220_800, content_type: Format::Xml, topic: &topic };
        let mut env = envelope::sign(key, &params, XML.as_bytes()).unwrap();
        let i = pos.index(env.len());
        env[i] ^= xor;
        prop_assert!(envelope::verify(&env, &key.verifying_key().unwrap(), &meter, &topic).is_err());
    }
}
