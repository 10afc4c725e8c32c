//! Fuzzes the sink's reading of a request body (JSON from the forwarder, or from anyone who got
//! past TLS): it must refuse or accept, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gridward_sink::check::parse_reading(data);
});
