//! Fuzzes a meter's command check (`docs/wire-format.md` §8), the first thing to touch the bytes
//! on `meters/{id}/commands`: it must never panic, whatever arrives.
#![no_main]

use std::sync::OnceLock;

use gridward_core::MeterId;
use gridward_core::command::{self, CommandKind, TrustedSigner, VerifyContext};
use gridward_core::envelope::VerifyingKey;
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;

/// The public key of the §8.3 test vector (RFC 8032 test 1), so the seed gets past the signature.
const SIGNER_SPKI: &str = "302a300506032b6570032100d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn signers() -> &'static [TrustedSigner] {
    static SIGNERS: OnceLock<Vec<TrustedSigner>> = OnceLock::new();
    SIGNERS.get_or_init(|| {
        let spki: Vec<u8> = (0..SIGNER_SPKI.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&SIGNER_SPKI[i..i + 2], 16).unwrap())
            .collect();
        vec![TrustedSigner {
            key: VerifyingKey::from_spki_der(&spki).unwrap(),
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: OffsetDateTime::from_unix_timestamp(4_102_444_800).unwrap(),
        }]
    })
}

fuzz_target!(|data: &[u8]| {
    let meter = MeterId::new("123456789").unwrap();
    let topic = meter.commands_topic();
    let ctx = VerifyContext {
        meter_id: &meter,
        topic: &topic,
        signers: signers(),
        last_counter: None,
        now: OffsetDateTime::from_unix_timestamp(1_707_220_800).unwrap(),
        allowed: &CommandKind::ALL,
        max_skew_secs: 300,
    };
    let _ = command::verify(data, &ctx);
    let _ = command::unverified_id(data);
});
