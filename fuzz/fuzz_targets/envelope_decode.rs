//! Fuzzes the COSE_Sign1 envelope decoder, the first thing to touch a meter's bytes:
//! it must never panic, whatever arrives.
#![no_main]

use gridward_core::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::decode(data);
});
