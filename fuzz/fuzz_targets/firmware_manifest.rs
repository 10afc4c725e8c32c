//! Fuzzes the firmware manifest verifier (`docs/wire-format.md` §10.1): it must never panic,
//! and a manifest that verifies also decodes unverified to the same manifest.
#![no_main]

use std::sync::OnceLock;

use gridward_core::envelope::VerifyingKey;
use gridward_core::firmware;
use libfuzzer_sys::fuzz_target;

/// The manufacturer key of the §10.4 test vector (RFC 8032 test 2).
const MANUFACTURER_SPKI: &str = "302a300506032b65700321003d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";

fn manufacturers() -> &'static [VerifyingKey] {
    static KEYS: OnceLock<Vec<VerifyingKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let spki: Vec<u8> = (0..MANUFACTURER_SPKI.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&MANUFACTURER_SPKI[i..i + 2], 16).unwrap())
            .collect();
        vec![VerifyingKey::from_spki_der(&spki).unwrap()]
    })
}

fuzz_target!(|data: &[u8]| {
    let unverified = firmware::decode_unverified(data);
    if let Ok(v) = firmware::verify_manifest(data, manufacturers()) {
        assert_eq!(unverified.as_ref(), Ok(v.manifest()));
    }
});
