//! Fuzzes the concentrator relay batch decoder and the meter-topic parser applied to each item:
//! they must never panic, and whatever is accepted has exactly one encoding.
#![no_main]

use gridward_core::relay::{decode_batch, encode_batch, meter_topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = decode_batch(data) {
        assert_eq!(encode_batch(&items), data);
        for item in &items {
            let _ = meter_topic(&item.topic);
        }
    }
});
