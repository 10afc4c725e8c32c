//! Fuzzes the firmware chunk decoder (`docs/wire-format.md` §10.2), which reads unsigned bytes
//! on `meters/{id}/firmware`: it must never panic, and an accepted chunk re-encodes to a chunk
//! that decodes to itself.
#![no_main]

use gridward_core::firmware::Chunk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(chunk) = Chunk::decode(data) {
        assert_eq!(Chunk::decode(&chunk.encode()), Ok(chunk));
    }
});
