//! `Content-Digest` (RFC 9530): a Structured Field dictionary of algorithm → byte sequence.

use aws_lc_rs::digest::{self, Algorithm, SHA256, SHA512};
use sfv::{BareItem, DictSerializer, Dictionary, Item, KeyRef, ListEntry, Parser, Version};

use super::{HttpSigError, MAX_FIELD_VALUE_LEN, Request};

const SHA_256: &KeyRef = sfv::key_ref("sha-256");

/// The `Content-Digest` value for `body`: `sha-256=:BASE64:`.
pub fn content_digest(body: &[u8]) -> String {
    let digest = digest::digest(&SHA256, body);
    let mut ser = DictSerializer::new();
    ser.bare_item(SHA_256, digest.as_ref());
    ser.finish().unwrap_or_default()
}

/// Checks a `Content-Digest` value against `body`.
///
/// The value must have a `sha-256` member; `sha-512` is checked too when present; other
/// algorithms are ignored (RFC 9530 §2 lets a recipient ignore them). Every checked member
/// must match.
pub fn verify_content_digest(header_value: &str, body: &[u8]) -> Result<(), HttpSigError> {
    if header_value.len() > MAX_FIELD_VALUE_LEN {
        return Err(HttpSigError::FieldTooLarge {
            name: "content-digest".to_owned(),
            len: header_value.len(),
        });
    }
    let members: Dictionary = Parser::new(header_value)
        .with_version(Version::Rfc8941)
        .parse()
        .map_err(|e| HttpSigError::ContentDigestMalformed(e.to_string()))?;
    if members.is_empty() {
        return Err(HttpSigError::ContentDigestMissing);
    }
    let mut checks: Vec<(&'static str, &'static Algorithm, &[u8])> = Vec::new();
    for (name, member) in &members {
        let (name, algorithm): (&'static str, &'static Algorithm) = match name.as_str() {
            "sha-256" => ("sha-256", &SHA256),
            "sha-512" => ("sha-512", &SHA512),
            _ => continue,
        };
        let ListEntry::Item(Item {
            bare_item: BareItem::ByteSequence(expected),
            ..
        }) = member
        else {
            return Err(HttpSigError::ContentDigestMalformed(format!(
                "{name} is not a byte sequence"
            )));
        };
        if expected.len() != algorithm.output_len() {
            return Err(HttpSigError::ContentDigestMalformed(format!(
                "{name} is {} bytes, not {}",
                expected.len(),
                algorithm.output_len()
            )));
        }
        checks.push((name, algorithm, expected));
    }
    if !checks.iter().any(|(name, _, _)| *name == "sha-256") {
        let found: Vec<&str> = members.keys().map(|k| k.as_str()).collect();
        return Err(HttpSigError::ContentDigestUnsupported(found.join(", ")));
    }
    for (name, algorithm, expected) in checks {
        if digest::digest(algorithm, body).as_ref() != expected {
            return Err(HttpSigError::ContentDigestMismatch(name));
        }
    }
    Ok(())
}

/// Checks the request's `Content-Digest` field against `body`: the field must be present, and
/// [`verify_content_digest`] must accept it. Verify the signature (which covers the field)
/// too: a digest alone proves nothing about who sent the body.
pub fn verify_request_content_digest(req: &Request<'_>, body: &[u8]) -> Result<(), HttpSigError> {
    let value = req
        .field_value("content-digest")?
        .ok_or(HttpSigError::ContentDigestMissing)?;
    verify_content_digest(&value, body)
}
