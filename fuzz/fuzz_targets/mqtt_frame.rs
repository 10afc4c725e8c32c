//! Fuzzes the MQTT framing and packet decoder of the device endpoint: the first bytes a meter
//! sends after the TLS handshake. Framing (`frame_len`) must bound a frame before any
//! buffering; decoding must never panic, for either protocol version.
#![no_main]

use gridward_mqtt::codec::{Protocol, connect_protocol, decode, frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(len)) = frame_len(data, 65_536) {
        assert!(len <= data.len() && len <= 65_536);
        let frame = &data[..len];
        let _ = connect_protocol(frame);
        let _ = decode(Protocol::V311, frame);
        let _ = decode(Protocol::V5, frame);
    }
});
