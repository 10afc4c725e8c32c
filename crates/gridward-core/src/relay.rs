//! Data concentrators: the relay batch that carries meters' own envelopes unchanged.
//!
//! A concentrator publishes on `concentrators/{id}/relay` a CBOR array of 1 to
//! [`MAX_RELAY_ITEMS`] items, each a two-element array `[topic, envelope]`: the meter topic the
//! envelope was signed for (`meters/{meter}/readings` or `meters/{meter}/events`, the envelope's
//! external AAD) and the meter's COSE_Sign1 envelope as a byte string, exactly as the meter made
//! it. The head-end verifies each envelope with that meter's key, so a concentrator can neither
//! forge nor alter one; it may only relay for the meters registered behind it.
//! `docs/wire-format.md` §11 specifies the format.

use ciborium::Value;

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

/// Encodes a relay batch in the deterministic encoding [`decode_batch`] requires.
///
/// The limits are the caller's to keep (at most [`MAX_RELAY_ITEMS`] items, at most
/// [`MAX_RELAY_BYTES`] in all; [`encoded_item_len`] tells what an item adds): a batch beyond
/// them is encoded all the same and refused by [`decode_batch`].
pub fn encode_batch(items: &[RelayItem]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + items.iter().map(encoded_item_len).sum::<usize>());
    head(&mut out, MAJOR_ARRAY, items.len());
    for item in items {
        head(&mut out, MAJOR_ARRAY, 2);
        head(&mut out, MAJOR_TEXT, item.topic.len());
        out.extend_from_slice(item.topic.as_bytes());
        head(&mut out, MAJOR_BYTES, item.envelope.len());
        out.extend_from_slice(&item.envelope);
    }
    out
}

/// How many bytes `item` adds to an encoded batch (the batch's own array head, 1 to 9 bytes,
/// comes on top).
pub fn encoded_item_len(item: &RelayItem) -> usize {
    1 + head_len(item.topic.len())
        + item.topic.len()
        + head_len(item.envelope.len())
        + item.envelope.len()
}

/// Decodes a relay batch strictly (see the module documentation).
///
/// Checked in this order: the size (at most [`MAX_RELAY_BYTES`], before anything is read),
/// that the input is exactly one CBOR item with nothing after it, that it is an array of 1 to
/// [`MAX_RELAY_ITEMS`] items, each a two-element array of a text string and a byte string,
/// with no tags anywhere, and that it is in the deterministic encoding [`encode_batch`] writes
/// (definite lengths, shortest heads; RFC 8949 §4.2.1), so indefinite-length items are
/// refused. The topics are not checked here: each item is decided on its own
/// ([`meter_topic`]), so one bad item does not cost the others.
///
/// # Errors
///
/// [`RelayError`] for anything but a well-formed batch.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<RelayItem>, RelayError> {
    if bytes.len() > MAX_RELAY_BYTES {
        return Err(RelayError::TooLarge {
            size: bytes.len(),
            max: MAX_RELAY_BYTES,
        });
    }
    let malformed = |m: &str| RelayError::Malformed(m.to_owned());
    if bytes.is_empty() {
        return Err(malformed("empty input"));
    }
    let value = crate::cose::decode_cbor(bytes).map_err(RelayError::Malformed)?;
    let Value::Array(entries) = value else {
        return Err(malformed("not a CBOR array"));
    };
    if entries.is_empty() {
        return Err(malformed("no envelopes"));
    }
    if entries.len() > MAX_RELAY_ITEMS {
        return Err(RelayError::TooManyItems {
            count: entries.len(),
            max: MAX_RELAY_ITEMS,
        });
    }
    let mut items = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let Value::Array(pair) = entry else {
            return Err(RelayError::Malformed(format!("item {i} is not an array")));
        };
        let [topic, envelope]: [Value; 2] = pair.try_into().map_err(|_: Vec<Value>| {
            RelayError::Malformed(format!("item {i} is not a two-element array"))
        })?;
        let Value::Text(topic) = topic else {
            return Err(RelayError::Malformed(format!(
                "item {i}: the topic is not a text string"
            )));
        };
        let Value::Bytes(envelope) = envelope else {
            return Err(RelayError::Malformed(format!(
                "item {i}: the envelope is not a byte string"
            )));
        };
        items.push(RelayItem { topic, envelope });
    }
    // Only the deterministic encoding reads back to the same bytes: this refuses indefinite
    // lengths and over-long heads, so one batch has one encoding.
    if encode_batch(&items) != bytes {
        return Err(malformed(
            "not in the deterministic encoding (indefinite length or over-long head)",
        ));
    }
    Ok(items)
}

/// The meter and topic kind of `meters/{id}/readings` or `meters/{id}/events`; `None` for any
/// other topic.
pub fn meter_topic(topic: &str) -> Option<(MeterId, MeterTopic)> {
    let rest = topic.strip_prefix("meters/")?;
    let (id, kind) = rest.split_once('/')?;
    let kind = match kind {
        "readings" => MeterTopic::Readings,
        "events" => MeterTopic::Events,
        _ => return None,
    };
    Some((MeterId::new(id).ok()?, kind))
}

impl MeterTopic {
    /// The topic of this kind for `meter`: `meters/{id}/readings` or `meters/{id}/events`.
    pub fn topic(self, meter: &MeterId) -> String {
        match self {
            MeterTopic::Readings => meter.readings_topic(),
            MeterTopic::Events => meter.events_topic(),
        }
    }
}

/// CBOR major type 2: byte string.
const MAJOR_BYTES: u8 = 2;
/// CBOR major type 3: text string.
const MAJOR_TEXT: u8 = 3;
/// CBOR major type 4: array.
const MAJOR_ARRAY: u8 = 4;

/// Writes the shortest CBOR head of `major` with argument `len`.
fn head(out: &mut Vec<u8>, major: u8, len: usize) {
    let m = major << 5;
    let len = len as u64;
    if len < 24 {
        out.push(m | len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[m | 24, len as u8]);
    } else if len <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else if len <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&len.to_be_bytes());
    }
}

/// The length of the shortest CBOR head with argument `len`.
fn head_len(len: usize) -> usize {
    match len as u64 {
        0..24 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// `concentrators/{id}/relay`.
pub fn relay_topic(concentrator: &MeterId) -> String {
    format!("concentrators/{concentrator}/relay")
}

/// `concentrators/{id}/events`: the concentrator's own signed events.
pub fn concentrator_events_topic(concentrator: &MeterId) -> String {
    format!("concentrators/{concentrator}/events")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn item(topic: &str, envelope: &[u8]) -> RelayItem {
        RelayItem {
            topic: topic.to_owned(),
            envelope: envelope.to_vec(),
        }
    }

    fn malformed(bytes: &[u8]) -> bool {
        matches!(decode_batch(bytes), Err(RelayError::Malformed(_)))
    }

    #[test]
    fn encodes_the_documented_shape() {
        let b = encode_batch(&[item("meters/m1/readings", b"\x01\x02")]);
        let mut want = vec![0x81, 0x82, 0x60 | 18];
        want.extend_from_slice(b"meters/m1/readings");
        want.extend_from_slice(&[0x42, 1, 2]);
        assert_eq!(b, want);
        assert_eq!(
            decode_batch(&b).unwrap(),
            [item("meters/m1/readings", b"\x01\x02")]
        );
        assert_eq!(
            b.len(),
            1 + encoded_item_len(&item("meters/m1/readings", b"\x01\x02"))
        );
    }

    #[test]
    fn heads_are_shortest() {
        for len in [0usize, 23, 24, 255, 256, 65535, 65536] {
            let mut out = Vec::new();
            head(&mut out, MAJOR_BYTES, len);
            assert_eq!(out.len(), head_len(len), "{len}");
            let v: Value =
                ciborium::de::from_reader([out.as_slice(), &vec![0; len]].concat().as_slice())
                    .unwrap();
            assert_eq!(v, Value::Bytes(vec![0; len]));
        }
        assert_eq!(head_len(1 << 32), 9);
    }

    #[test]
    fn limits_are_enforced() {
        let one = item("meters/m1/events", &[7; 10]);
        let full = vec![one.clone(); MAX_RELAY_ITEMS];
        assert_eq!(decode_batch(&encode_batch(&full)).unwrap(), full);
        let over = vec![one; MAX_RELAY_ITEMS + 1];
        assert_eq!(
            decode_batch(&encode_batch(&over)),
            Err(RelayError::TooManyItems {
                count: MAX_RELAY_ITEMS + 1,
                max: MAX_RELAY_ITEMS
            })
        );
        assert!(malformed(&encode_batch(&[])));
        // The size is checked before anything is parsed: even junk of that size says TooLarge.
        assert_eq!(
            decode_batch(&vec![0xff; MAX_RELAY_BYTES + 1]),
            Err(RelayError::TooLarge {
                size: MAX_RELAY_BYTES + 1,
                max: MAX_RELAY_BYTES
            })
        );
        // Exactly at the limit is accepted.
        let head_and_pair = 1 + 1 + 1 + "meters/m1/events".len() + 5;
        let big = item(
            "meters/m1/events",
            &vec![0; MAX_RELAY_BYTES - head_and_pair],
        );
        let b = encode_batch(std::slice::from_ref(&big));
        assert_eq!(b.len(), MAX_RELAY_BYTES);
        assert_eq!(decode_batch(&b).unwrap(), [big]);
    }

    #[test]
    fn malformed_batches_are_refused() {
        let good = encode_batch(&[item("meters/m1/readings", b"env")]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("not CBOR", vec![0xff]),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("trailing byte", [good.as_slice(), &[0]].concat()),
            ("a map", vec![0xa0]),
            ("a bstr", vec![0x41, 0]),
            ("item not an array", vec![0x81, 0x01]),
            ("item of one", vec![0x81, 0x81, 0x60]),
            ("item of three", vec![0x81, 0x83, 0x60, 0x40, 0x40]),
            ("topic as bstr", vec![0x81, 0x82, 0x40, 0x40]),
            ("envelope as tstr", vec![0x81, 0x82, 0x60, 0x60]),
            ("swapped", vec![0x81, 0x82, 0x40, 0x60]),
            ("topic not UTF-8", vec![0x81, 0x82, 0x61, 0xff, 0x40]),
            ("tagged batch", [&[0xd8, 0x18][..], &good].concat()),
            ("tagged item", vec![0x81, 0xc1, 0x82, 0x60, 0x40]),
            ("tagged envelope", vec![0x81, 0x82, 0x60, 0xd2, 0x40]),
            ("indefinite batch", vec![0x9f, 0x82, 0x60, 0x40, 0xff]),
            ("indefinite item", vec![0x81, 0x9f, 0x60, 0x40, 0xff]),
            (
                "indefinite bstr",
                vec![0x81, 0x82, 0x60, 0x5f, 0x41, 0, 0xff],
            ),
            (
                "indefinite tstr",
                vec![0x81, 0x82, 0x7f, 0x61, b'a', 0xff, 0x40],
            ),
            ("long array head", vec![0x98, 0x01, 0x82, 0x60, 0x40]),
            ("long bstr head", vec![0x81, 0x82, 0x60, 0x58, 0x01, 0]),
            (
                "huge declared length",
                vec![0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
            (
                "huge bstr length",
                vec![0x81, 0x82, 0x60, 0x5b, 0, 0, 0, 1, 0, 0, 0, 0],
            ),
        ];
        for (name, bytes) in cases {
            assert!(malformed(&bytes), "{name}: {:?}", decode_batch(&bytes));
        }
        // Deep nesting is stopped by the recursion limit, not the stack.
        let deep = [vec![0x81; 10_000], vec![0x80]].concat();
        assert!(malformed(&deep));
    }

    #[test]
    fn meter_topics() {
        let m = MeterId::new("m-1.a_B").unwrap();
        assert_eq!(
            meter_topic("meters/m-1.a_B/readings"),
            Some((m.clone(), MeterTopic::Readings))
        );
        assert_eq!(
            meter_topic("meters/m-1.a_B/events"),
            Some((m.clone(), MeterTopic::Events))
        );
        assert_eq!(MeterTopic::Readings.topic(&m), "meters/m-1.a_B/readings");
        assert_eq!(MeterTopic::Events.topic(&m), "meters/m-1.a_B/events");
        for bad in [
            "",
            "meters//readings",
            "meters/m1/commands",
            "meters/m1/readings/",
            "meters/m1/readings/x",
            "meters/m1",
            "meters/-m/readings",
            "meters/a+b/events",
            "meters/#/events",
            "Meters/m1/readings",
            "/meters/m1/readings",
            "concentrators/m1/relay",
            "meters/m1/Events",
        ] {
            assert_eq!(meter_topic(bad), None, "{bad:?}");
        }
        assert_eq!(
            meter_topic(&format!("meters/{}/events", "a".repeat(65))),
            None
        );
        assert_eq!(relay_topic(&m), "concentrators/m-1.a_B/relay");
        assert_eq!(
            concentrator_events_topic(&m),
            "concentrators/m-1.a_B/events"
        );
    }

    fn items() -> impl Strategy<Value = Vec<RelayItem>> {
        prop::collection::vec(
            (".{0,40}", prop::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(topic, envelope)| RelayItem { topic, envelope }),
            1..=MAX_RELAY_ITEMS,
        )
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(items in items()) {
            prop_assert_eq!(decode_batch(&encode_batch(&items)).unwrap(), items);
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(items) = decode_batch(&bytes) {
                // Whatever is accepted has exactly one encoding.
                prop_assert_eq!(encode_batch(&items), bytes);
            }
        }

        #[test]
        fn mutated_batches_decode_canonically_or_not_at_all(items in items(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut b = encode_batch(&items);
            let i = pos.index(b.len());
            b[i] = byte;
            if let Ok(decoded) = decode_batch(&b) {
                prop_assert_eq!(encode_batch(&decoded), b);
            }
        }
    }

    /// The `key: value` lines of the `relay-vector` block in `docs/wire-format.md`.
    fn spec_block() -> std::collections::HashMap<&'static str, &'static str> {
        let spec = include_str!("../../../docs/wire-format.md");
        spec.split("```relay-vector\n")
            .nth(1)
            .and_then(|rest| rest.split("\n```").next())
            .expect("docs/wire-format.md has a relay-vector block")
            .lines()
            .map(|l| l.split_once(": ").expect("key: value"))
            .collect()
    }

    /// The §11.5 vector: two envelopes of meter 123456789 (the committed Ed25519 fixture of
    /// §5), a reading and an event, relayed in one batch.
    fn vector_items() -> Vec<RelayItem> {
        use crate::document::Format;
        use crate::envelope::{EnvelopeParams, SigningKey, sign};
        let key =
            SigningKey::from_pkcs8_pem(include_str!("../tests/fixtures/eddsa.key.pem")).unwrap();
        let m = MeterId::new("123456789").unwrap();
        let block = spec_block();
        [(1, 46, 1_707_221_700), (2, 47, 1_707_221_760)]
            .into_iter()
            .map(|(n, counter, timestamp)| {
                let topic = block[format!("topic_{n}").as_str()];
                let payload = block[format!("payload_{n}").as_str()];
                let envelope = sign(
                    &key,
                    &EnvelopeParams {
                        meter_id: &m,
                        counter,
                        timestamp,
                        content_type: Format::Json,
                        topic,
                    },
                    payload.as_bytes(),
                )
                .unwrap();
                item(topic, &envelope)
            })
            .collect()
    }

    #[test]
    #[ignore = "generator: run with --ignored --nocapture to print the spec's relay batch"]
    fn print_relay_vector() {
        println!("batch: {}", hex::encode(encode_batch(&vector_items())));
    }

    #[test]
    fn wire_format_relay_vector_is_reproduced() {
        use crate::document::{Document, Limits};
        use crate::envelope::{VerifyingKey, verify};
        let block = spec_block();
        let items = vector_items();
        // Ed25519 is deterministic: the batch is reproduced byte for byte.
        assert_eq!(hex::encode(encode_batch(&items)), block["batch"]);
        let decoded = decode_batch(&hex::decode(block["batch"]).unwrap()).unwrap();
        assert_eq!(decoded, items);
        assert_eq!(block["concentrator"], "dc-1");
        assert_eq!(
            block["relay_topic"],
            relay_topic(&MeterId::new(block["concentrator"]).unwrap())
        );
        let public =
            VerifyingKey::from_spki_pem(include_str!("../tests/fixtures/eddsa.pub.pem")).unwrap();
        for (n, it) in decoded.iter().enumerate() {
            // Each envelope verifies exactly as if its meter had sent it on its topic.
            let (meter, kind) = meter_topic(&it.topic).unwrap();
            assert_eq!(meter.as_str(), "123456789");
            let doc = verify(&it.envelope, &public, &meter, &it.topic)
                .unwrap()
                .into_document(&Limits::default())
                .unwrap();
            assert_eq!(
                doc.payload(),
                block[format!("payload_{}", n + 1).as_str()].as_bytes()
            );
            match (kind, doc.document()) {
                (MeterTopic::Readings, Document::Reading(_))
                | (MeterTopic::Events, Document::Event(_)) => {}
                other => panic!("{other:?}"),
            }
            // The topic is the AAD: relayed as the other topic, the signature fails.
            let other = match kind {
                MeterTopic::Readings => MeterTopic::Events,
                MeterTopic::Events => MeterTopic::Readings,
            };
            assert!(verify(&it.envelope, &public, &meter, &other.topic(&meter)).is_err());
            // An altered envelope fails.
            let mut bad = it.envelope.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(verify(&bad, &public, &meter, &it.topic).is_err());
        }
    }
}
