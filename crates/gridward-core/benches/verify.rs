//! Envelope verification per algorithm: the whole `decode + verify` of a reading envelope,
//! and the bare signature primitive on the same key, so the envelope's own overhead shows.
//!
//! `scripts/bench-verify.sh` runs this next to `openssl speed` and prints the ratios.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gridward_core::MeterId;
use gridward_core::document::Format;
use gridward_core::envelope::{self, EnvelopeHeader, EnvelopeParams, SigningKey, UnsignedEnvelope};

const XML: &str = "<EnergyUsageReport><MeterID>123456789</MeterID><Timestamp>2024-02-06T12:00:00Z</Timestamp><EnergyConsumed>350.5</EnergyConsumed></EnergyUsageReport>";
const TOPIC: &str = "meters/123456789/readings";

fn keys() -> [(&'static str, SigningKey); 3] {
    let load = |pem: &str| SigningKey::from_pkcs8_pem(pem).expect("fixture key");
    [
        (
            "es256",
            load(include_str!("../tests/fixtures/es256.key.pem")),
        ),
        (
            "eddsa",
            load(include_str!("../tests/fixtures/eddsa.key.pem")),
        ),
        (
            "rs256",
            load(include_str!("../tests/fixtures/rs256.key.pem")),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let meter = MeterId::new("123456789").expect("meter id");
    let mut group = c.benchmark_group("envelope_verify");
    group.throughput(Throughput::Elements(1));
    for (name, key) in keys() {
        let params = EnvelopeParams {
            meter_id: &meter,
            counter: 1,
            timestamp: 1_707_220_800,
            content_type: Format::Xml,
            topic: TOPIC,
        };
        let env = envelope::sign(&key, &params, XML.as_bytes()).expect("sign");
        let vk = key.verifying_key().expect("verifying key");
        group.bench_function(name, |b| {
            b.iter(|| {
                envelope::verify(std::hint::black_box(&env), &vk, &meter, TOPIC).expect("verifies")
            })
        });
    }
    group.finish();

    // The same signatures checked by aws-lc-rs directly over the Sig_structure bytes.
    let mut group = c.benchmark_group("primitive_verify");
    group.throughput(Throughput::Elements(1));
    for (name, key) in keys() {
        let header = EnvelopeHeader {
            alg: key.algorithm(),
            kid: key.kid().to_vec(),
            content_type: Format::Xml,
            meter_id: meter.clone(),
            counter: 1,
            timestamp: 1_707_220_800,
        };
        let tbs = UnsignedEnvelope::new(header, XML.as_bytes().to_vec(), TOPIC)
            .expect("header")
            .to_be_signed();
        let params = EnvelopeParams {
            meter_id: &meter,
            counter: 1,
            timestamp: 1_707_220_800,
            content_type: Format::Xml,
            topic: TOPIC,
        };
        let env = envelope::sign(&key, &params, XML.as_bytes()).expect("sign");
        // The signature is the last field of the array: the envelope's trailing bytes.
        let sig_len = match name {
            "rs256" => 256,
            _ => 64,
        };
        let sig = env[env.len() - sig_len..].to_vec();
        let alg: &'static dyn aws_lc_rs::signature::VerificationAlgorithm = match name {
            "es256" => &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            "eddsa" => &aws_lc_rs::signature::ED25519,
            _ => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        };
        let pk = aws_lc_rs::signature::ParsedPublicKey::new(alg, key.public_key_spki())
            .expect("public key");
        pk.verify_sig(&tbs, &sig).expect("primitive verifies");
        group.bench_function(name, |b| {
            b.iter(|| {
                pk.verify_sig(std::hint::black_box(&tbs), &sig)
                    .expect("verifies")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
