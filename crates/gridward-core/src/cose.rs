//! The COSE_Sign1 profile shared by commands ([`crate::command`]) and firmware manifests
//! ([`crate::firmware`]), and the strict CBOR helpers their payloads use.
//!
//! Protected header: `alg` (ES256, EdDSA or RS256), `kid` (16 bytes), content type (text) and
//! nothing else; no `crit` (no label is critical in these profiles, so any listed one is
//! unknown); the unprotected header is empty; the payload is present. The external AAD is the
//! caller's (the command topic, or the manifest constant).
//!
//! Errors are plain messages: each caller turns them into its own "malformed" variant.

use ciborium::Value;
use coset::{
    CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, RegisteredLabel,
    RegisteredLabelWithPrivate, TaggedCborSerializable,
};

use crate::envelope::{
    self, Algorithm, COSE_SIGN1_TAG_BYTE, KEY_ID_LEN, SigningKey, VerifyingKey, label_string,
};

/// Deepest CBOR nesting read from a payload (a command's `args` map sits at depth 2).
const MAX_CBOR_DEPTH: usize = 8;

/// A decoded COSE_Sign1 whose header follows the profile; the signature is not checked yet.
#[derive(Debug, Clone)]
pub(crate) struct Signed {
    /// The algorithm named by the protected header.
    pub(crate) alg: Algorithm,
    /// The key id named by the protected header ([`KEY_ID_LEN`] bytes).
    pub(crate) kid: Vec<u8>,
    sign1: CoseSign1,
}

impl Signed {
    /// Whether the signature verifies with `key` over `aad`: the header's algorithm must be the
    /// key's, and the signature is checked with the key's algorithm.
    pub(crate) fn verifies(&self, key: &VerifyingKey, aad: &[u8]) -> bool {
        self.alg == key.algorithm()
            && key.verifies(&self.sign1.tbs_data(aad), &self.sign1.signature)
    }

    /// The payload (not authenticated until [`Self::verifies`] said so).
    pub(crate) fn payload(&self) -> &[u8] {
        self.sign1.payload.as_deref().unwrap_or_default()
    }
}

/// Signs `payload` into a tagged COSE_Sign1 with `alg`, `kid` and `content_type` protected.
pub(crate) fn sign(
    key: &SigningKey,
    content_type: &str,
    aad: &[u8],
    payload: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let protected = HeaderBuilder::new()
        .algorithm(key.algorithm().iana())
        .key_id(key.kid().to_vec())
        .content_type(content_type.to_owned())
        .build();
    let mut sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .build();
    let tbs = sign1.tbs_data(aad);
    sign1.signature = key.sign_bytes(&tbs).map_err(|e| e.to_string())?;
    sign1.to_tagged_vec().map_err(|e| e.to_string())
}

/// Decodes a COSE_Sign1 (tag 18 or untagged) of at most `max` bytes and checks its header
/// against the profile with content type `content_type`.
pub(crate) fn decode(bytes: &[u8], max: usize, content_type: &str) -> Result<Signed, String> {
    if bytes.len() > max {
        return Err(format!("{} bytes; at most {max} are accepted", bytes.len()));
    }
    let sign1 = decode_structure(bytes)?;
    envelope::check_unprotected(&sign1.unprotected).map_err(|e| e.to_string())?;
    if sign1.payload.is_none() {
        return Err("payload is missing".to_owned());
    }
    let h = &sign1.protected.header;
    let alg = match &h.alg {
        None => return Err("protected header has no algorithm".to_owned()),
        Some(RegisteredLabelWithPrivate::Assigned(a)) => Algorithm::from_cose_id(*a as i64)
            .ok_or_else(|| {
                format!(
                    "algorithm {a:?} ({}) is not allowed (only ES256, EdDSA, RS256)",
                    *a as i64
                )
            })?,
        Some(other) => return Err(format!("algorithm {other:?} is not allowed")),
    };
    if let Some(c) = h.crit.first() {
        let label = match c {
            RegisteredLabelWithPrivate::PrivateUse(l) => l.to_string(),
            RegisteredLabelWithPrivate::Assigned(a) => (*a as i64).to_string(),
            RegisteredLabelWithPrivate::Text(t) => format!("{t:?}"),
        };
        return Err(format!("unknown critical header {label}"));
    }
    if !h.iv.is_empty() || !h.partial_iv.is_empty() {
        return Err("unexpected protected header label IV (5/6)".to_owned());
    }
    if !h.counter_signatures.is_empty() {
        return Err("unexpected protected header label counter signature (7)".to_owned());
    }
    if let Some((label, _)) = h.rest.first() {
        return Err(format!(
            "unexpected protected header label {}",
            label_string(label)
        ));
    }
    match &h.content_type {
        Some(RegisteredLabel::Text(t)) if t.eq_ignore_ascii_case(content_type) => {}
        Some(RegisteredLabel::Text(t)) => {
            return Err(format!(
                "content type {:?} is not {content_type}",
                snippet(t)
            ));
        }
        Some(RegisteredLabel::Assigned(a)) => {
            return Err(format!(
                "content type is CoAP content format {}, expected {content_type}",
                *a as i64
            ));
        }
        None => return Err("protected header lacks content type (3)".to_owned()),
    }
    if h.key_id.len() != KEY_ID_LEN {
        return Err(format!(
            "kid (4) is {} bytes, expected {KEY_ID_LEN}",
            h.key_id.len()
        ));
    }
    Ok(Signed {
        alg,
        kid: h.key_id.clone(),
        sign1,
    })
}

/// Decodes the COSE_Sign1 structure alone (tag 18 or untagged, no trailing bytes).
pub(crate) fn decode_structure(bytes: &[u8]) -> Result<CoseSign1, String> {
    if bytes.first() == Some(&COSE_SIGN1_TAG_BYTE) {
        CoseSign1::from_tagged_slice(bytes)
    } else if bytes.first().is_some_and(|b| b >> 5 == 6) {
        return Err("not a COSE_Sign1 structure (wrong CBOR tag)".to_owned());
    } else {
        CoseSign1::from_slice(bytes)
    }
    .map_err(|e| format!("not a COSE_Sign1 structure: {e}"))
}

/// Decodes exactly one CBOR item (nesting at most [`MAX_CBOR_DEPTH`], no trailing bytes).
pub(crate) fn decode_cbor(bytes: &[u8]) -> Result<Value, String> {
    let mut rest = bytes;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_CBOR_DEPTH)
        .map_err(|e| format!("not CBOR: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the CBOR item", rest.len()));
    }
    Ok(value)
}

/// Encodes one CBOR item.
pub(crate) fn encode_cbor(value: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The entries of a CBOR map with text keys, each key at most once.
pub(crate) fn text_map(value: Value, what: &str) -> Result<Vec<(String, Value)>, String> {
    let Value::Map(entries) = value else {
        return Err(format!("{what} is not a CBOR map"));
    };
    let mut out: Vec<(String, Value)> = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let Value::Text(k) = k else {
            return Err(format!("{what} has a key that is not a text string"));
        };
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("{what} has key {:?} twice", snippet(&k)));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Takes the value of `key` out of `entries`, if present.
pub(crate) fn take(entries: &mut Vec<(String, Value)>, key: &str) -> Option<Value> {
    let i = entries.iter().position(|(k, _)| k == key)?;
    Some(entries.swap_remove(i).1)
}

/// Refuses the first key left in `entries`: every known key has been taken.
pub(crate) fn no_other_keys(entries: &[(String, Value)], what: &str) -> Result<(), String> {
    match entries.first() {
        Some((k, _)) => Err(format!("{what} has unknown key {:?}", snippet(k))),
        None => Ok(()),
    }
}

/// An unsigned integer.
pub(crate) fn uint(v: &Value, field: &str) -> Result<u64, String> {
    v.as_integer()
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| format!("{field} is not an unsigned 64-bit integer"))
}

/// A signed integer.
pub(crate) fn int(v: &Value, field: &str) -> Result<i64, String> {
    v.as_integer()
        .and_then(|i| i64::try_from(i).ok())
        .ok_or_else(|| format!("{field} is not a 64-bit integer"))
}

/// A text string.
pub(crate) fn text(v: Value, field: &str) -> Result<String, String> {
    match v {
        Value::Text(t) => Ok(t),
        _ => Err(format!("{field} is not a text string")),
    }
}

/// A byte string of exactly `N` bytes.
pub(crate) fn fixed_bytes<const N: usize>(v: Value, field: &str) -> Result<[u8; N], String> {
    match v {
        Value::Bytes(b) => {
            <[u8; N]>::try_from(b.as_slice()).map_err(|_| format!("{field} is not {N} bytes"))
        }
        _ => Err(format!("{field} is not a byte string")),
    }
}

/// At most 32 characters of attacker-supplied text, for error messages.
pub(crate) fn snippet(s: &str) -> String {
    match s.char_indices().nth(32) {
        Some((i, _)) => format!("{}…", s.get(..i).unwrap_or_default()),
        None => s.to_owned(),
    }
}
