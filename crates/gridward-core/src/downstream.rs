//! The body of a reading forwarded downstream (`docs/wire-format.md` §7): what the head-end's
//! forwarder writes and what a receiver such as `gridward sink` reads, one type for both so
//! they cannot drift apart.
//!
//! ```json
//! {"ReadingID":"m000001-42","MeterID":"m000001","Counter":42,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":350.5}
//! ```
//!
//! This is the shape only; a receiver still checks the values (meter id, timestamp, energy,
//! `ReadingID = {MeterID}-{Counter}`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::MeterId;
use crate::document::format_timestamp;

/// One forwarded reading, exactly these five members in this order.
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
        }
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
