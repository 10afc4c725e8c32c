//! The body of a reading forwarded downstream (`docs/wire-format.md` §7): what the head-end's
//! forwarder writes and what a receiver such as `gridward sink` reads, one type for both so
//! they cannot drift apart.
//!
//! ```json
//! {"ReadingID":"m000001-42","MeterID":"m000001","Counter":42,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":350.5}
//! ```
//!
//! A target configured with `envelope = true` also receives `Envelope`: the meter's own COSE_Sign1
//! (§2), base64, byte for byte as the meter signed it (relayed by a concentrator or not), so the
//! receiver can verify the meter's signature itself over `meters/{MeterID}/readings`.
//!
//! This is the shape only; a receiver still checks the values (meter id, timestamp, energy,
//! `ReadingID = {MeterID}-{Counter}`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::MeterId;
use crate::document::format_timestamp;

/// One forwarded reading, exactly these five members in this order, then `Envelope` if the target
/// asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardedReading {
    /// `{MeterID}-{Counter}`: the same on every retry; receivers de-duplicate on it.
    #[serde(rename = "ReadingID")]
    pub reading_id: String,
    /// The meter.
    #[serde(rename = "MeterID")]
    pub meter_id: String,
    /// The envelope counter the meter signed.
    #[serde(rename = "Counter")]
    pub counter: u64,
    /// When the reading was taken (RFC 3339, UTC, whole seconds).
    #[serde(rename = "Timestamp")]
    pub timestamp: String,
    /// The cumulative register in kWh.
    #[serde(rename = "EnergyConsumed")]
    pub energy_consumed: f64,
    /// The meter's envelope (COSE_Sign1), standard base64 with padding; absent unless the
    /// target is configured with `envelope = true`.
    #[serde(rename = "Envelope", default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<String>,
}

impl ForwardedReading {
    /// Reading `counter` of `meter`, taken at `taken_at`, with the register at `energy_kwh`.
    pub fn new(meter: &MeterId, counter: u64, taken_at: OffsetDateTime, energy_kwh: f64) -> Self {
        Self {
            reading_id: reading_id(meter.as_str(), counter),
            meter_id: meter.to_string(),
            counter,
            timestamp: format_timestamp(taken_at),
            energy_consumed: energy_kwh,
            envelope: None,
        }
    }

    /// The same reading carrying the meter's envelope `cose` (see [`ForwardedReading::envelope`]).
    pub fn with_envelope(mut self, cose: &[u8]) -> Self {
        self.envelope = Some(BASE64.encode(cose));
        self
    }

    /// The envelope's bytes, if the body carries one: `Err` if it is not base64.
    pub fn envelope_bytes(&self) -> Option<Result<Vec<u8>, String>> {
        self.envelope.as_deref().map(|text| {
            BASE64
                .decode(text)
                .map_err(|e| format!("Envelope is not base64: {e}"))
        })
    }

    /// The JSON text, members in the order above.
    pub fn to_json(&self) -> String {
        // A struct of strings and numbers always serialises; a non-finite energy (which the
        // store never holds) would become `null`, which receivers refuse.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The stable id of a meter's reading downstream: `{meter}-{counter}`.
pub fn reading_id(meter: &str, counter: u64) -> String {
    format!("{meter}-{counter}")
}
