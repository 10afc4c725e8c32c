//! Data concentrators: the relay batch that carries meters' own envelopes unchanged.
//!
//! A concentrator publishes on `concentrators/{id}/relay` a CBOR array of 1 to
//! [`MAX_RELAY_ITEMS`] items, each a two-element array `[topic, envelope]`: the meter topic the
//! envelope was signed for (`meters/{meter}/readings` or `meters/{meter}/events`, the envelope's
//! external AAD) and the meter's COSE_Sign1 envelope as a byte string, exactly as the meter made
//! it. The head-end verifies each envelope with that meter's key, so a concentrator can neither
//! forge nor alter one; it may only relay for the meters registered behind it.
//! `docs/wire-format.md` §11 specifies the format.

use crate::meter_id::MeterId;

/// Most envelopes in one relay batch.
pub const MAX_RELAY_ITEMS: usize = 64;

/// Largest relay batch, in bytes.
pub const MAX_RELAY_BYTES: usize = 256 * 1024;

/// One relayed envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayItem {
    /// The meter topic the envelope was signed for (its external AAD).
    pub topic: String,
    /// The meter's envelope, unchanged.
    pub envelope: Vec<u8>,
}

/// Which of a meter's topics a relayed envelope was signed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterTopic {
    /// `meters/{id}/readings`.
    Readings,
    /// `meters/{id}/events`.
    Events,
}

/// Why a relay batch was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Larger than [`MAX_RELAY_BYTES`].
    #[error("relay batch is {size} bytes; at most {max} are accepted")]
    TooLarge {
        /// Size of the input.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not a CBOR array of `[tstr, bstr]` pairs, trailing bytes, or an empty array.
    #[error("relay batch is malformed: {0}")]
    Malformed(String),
    /// More than [`MAX_RELAY_ITEMS`] items.
    #[error("relay batch has {count} envelopes; at most {max} are accepted")]
    TooManyItems {
        /// Items in the batch.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Encodes a relay batch.
pub fn encode_batch(items: &[RelayItem]) -> Vec<u8> {
    let _ = items;
    todo!("SKELETON (issue 11, core helper)")
}

/// Decodes a relay batch strictly (see the module documentation).
///
/// # Errors
///
/// [`RelayError`] for anything but a well-formed batch.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<RelayItem>, RelayError> {
    let _ = bytes;
    todo!("SKELETON (issue 11, core helper)")
}

/// The meter and topic kind of `meters/{id}/readings` or `meters/{id}/events`; `None` for any
/// other topic.
pub fn meter_topic(topic: &str) -> Option<(MeterId, MeterTopic)> {
    let _ = topic;
    todo!("SKELETON (issue 11, core helper)")
}

/// `concentrators/{id}/relay`.
pub fn relay_topic(concentrator: &MeterId) -> String {
    format!("concentrators/{concentrator}/relay")
}

/// `concentrators/{id}/events`: the concentrator's own signed events.
pub fn concentrator_events_topic(concentrator: &MeterId) -> String {
    format!("concentrators/{concentrator}/events")
}
