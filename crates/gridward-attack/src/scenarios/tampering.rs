//! Tampering in transit: genuine envelopes of meter `x-tamper-a`, changed on the way; and a
//! concentrator `x-tamper-c` that re-signs meter `x-tamper-b`'s reading.
//!
//! The COSE_Sign1 structure (`docs/wire-format.md` §2) of each genuine envelope is decoded with
//! ciborium to find its regions; one bit is flipped in each (every case its own envelope, counter
//! and register, so nothing tampered can hide in the store):
//!
//! 1. payload: the first digit of `EnergyConsumed` (7 → 6): `bad_signature` (the payload is not
//!    parsed before the signature is checked);
//! 2. protected header: the lowest bit of the signed timestamp (the header stays well-formed):
//!    `bad_signature`;
//! 3. protected header: `alg` -7 (ES256) → -8 (EdDSA): `key_mismatch` (the envelope's algorithm
//!    is not the certificate key's, `EnvelopeError::AlgorithmMismatch`);
//! 4. signature: its last bit: `bad_signature`;
//! 5. CBOR structure: the array head 0x84 → 0x85 (five items): `malformed_envelope`.
//!
//! 6. `alg` moved from the protected to the unprotected header, the envelope re-encoded and even
//!    re-signed with the meter's own key (so only the header's place is wrong):
//!    `malformed_envelope` (`EnvelopeError::AlgorithmInUnprotectedHeader`, checked on decoding,
//!    before any signature).
//!
//! A concentrator C takes meter B's genuine reading (before it reaches the head-end) and:
//!
//! 7. re-signs it with C's key claiming B, published on C's connection to C's topic:
//!    `key_mismatch` (`EnvelopeError::MeterMismatch`);
//! 8. re-signs it as its own (header C, B's document): `invalid_document`
//!    (`EnvelopeError::DocumentMeterMismatch`);
//! 9. re-signs it claiming B for B's topic, published to B's topic on C's connection:
//!    `topic_not_authorized`, PUBACK 0x87 and DISCONNECT.
//!
//! Every case checks that its counter and register were stored for no one.

use std::ops::Range;
use std::time::Duration;

use ciborium::Value;
use gridward_core::MeterId;
use gridward_core::envelope;
use gridward_mqtt::client::Client;

use super::revocation::{await_close, next_counter, next_kwh};
use crate::AttackError;
use crate::check::Check;
use crate::ctx::{Creds, Ctx, PubOutcome};

/// The scenario's name.
pub const NAME: &str = "tampering";

/// COSE header label of `alg`.
const ALG: i128 = 1;
/// Protected header label of the signing time.
const TIMESTAMP: i128 = -65539;
/// The element that holds the register in an XML reading.
const ENERGY_TAG: &[u8] = b"<EnergyConsumed>";

/// Runs the scenario.
pub async fn run(ctx: &Ctx) -> Vec<Check> {
    let mut checks = match in_transit(ctx).await {
        Ok(c) => c,
        Err(e) => vec![Check::broken(NAME, "changed envelopes", e)],
    };
    match concentrator(ctx).await {
        Ok(mut c) => checks.append(&mut c),
        Err(e) => checks.push(Check::broken(NAME, "a concentrator re-signing", e)),
    }
    checks
}

/// One changed envelope and what the head-end must say.
struct Tampered {
    case: &'static str,
    reason: &'static str,
    bytes: Vec<u8>,
    counter: u64,
    /// Registers that must not be stored (the genuine one and, for a changed payload, the
    /// changed one).
    kwh: Vec<f64>,
    what: String,
}

/// Cases 1 to 6.
async fn in_transit(ctx: &Ctx) -> Result<Vec<Check>, AttackError> {
    let a = ctx.attack_meter("tamper-a")?;
    let topic = format!("meters/{}/readings", a.id);
    let mut client = ctx.connect_meter(&a).await?;
    // A genuine reading first: the meter, its key and its topic work.
    let counter = next_counter(ctx, &a.id);
    let base_kwh = next_kwh(ctx, &a.id);
    let out = Ctx::publish(&mut client, &topic, Ctx::genuine(&a, counter, base_kwh)?, 1).await;
    if out != PubOutcome::Acked(0) {
        return Err(AttackError::Setup(format!(
            "{}'s genuine reading was not accepted: {out}",
            a.id
        )));
    }
    let cases = tampered(&a, &topic, counter + 1, base_kwh + 7000.0)?;
    let mut client = Some(client);
    let mut checks = Vec::new();
    for (n, t) in cases.into_iter().enumerate() {
        let mut c = match client.take() {
            Some(c) => c,
            None => ctx.connect_meter(&a).await?,
        };
        let before = ctx.last_event_id();
        let out = Ctx::publish(&mut c, &topic, t.bytes, 10 + n as u16).await;
        if out != PubOutcome::Closed {
            client = Some(c);
        }
        let (clean, stored) = stored_nothing(ctx, &a.id, t.counter, &t.kwh);
        checks.push(
            ctx.refusal(
                NAME,
                t.case,
                t.reason,
                Some(&a.id),
                before,
                out.refused() && clean,
                format!("{}: {out}; {stored}", t.what),
            )
            .await,
        );
    }
    if let Some(mut c) = client {
        let _ = c.disconnect().await;
    }
    Ok(checks)
}

/// The envelopes of cases 1 to 6, each from a genuine one of its own with `counter + n` and
/// register `kwh + n`.
fn tampered(a: &Creds, topic: &str, counter: u64, kwh: f64) -> Result<Vec<Tampered>, AttackError> {
    let setup = |e: String| AttackError::Setup(format!("taking a genuine envelope apart: {e}"));
    let genuine = |n: u64| -> Result<(Vec<u8>, u64, f64), AttackError> {
        let kwh = kwh + n as f64;
        Ok((Ctx::genuine(a, counter + n, kwh)?, counter + n, kwh))
    };
    let mut out = Vec::new();

    // 1. Payload: the first digit of the register.
    let (mut env, c, k) = genuine(0)?;
    let r = Regions::of(&env).map_err(setup)?;
    let payload = &env[r.payload.clone()];
    let digit = find(payload, ENERGY_TAG)
        .map(|i| r.payload.start + i + ENERGY_TAG.len())
        .ok_or_else(|| setup("no EnergyConsumed in the payload".to_owned()))?;
    env[digit] ^= 0x01;
    let changed = register(&env[r.payload.clone()]).unwrap_or(f64::NAN);
    out.push(Tampered {
        case: "one bit flipped in the payload",
        reason: "bad_signature",
        bytes: env,
        counter: c,
        kwh: vec![k, changed],
        what: format!("EnergyConsumed {k} → {changed}"),
    });

    // 2. Protected header: the low bit of the signed timestamp, its last field.
    let (mut env, c, k) = genuine(1)?;
    let r = Regions::of(&env).map_err(setup)?;
    let fields = header_map(&env[r.protected.clone()]).map_err(setup)?;
    match fields.last() {
        Some((Value::Integer(l), Value::Integer(_))) if i128::from(*l) == TIMESTAMP => {}
        _ => {
            return Err(setup(
                "the timestamp is not the header's last field".to_owned(),
            ));
        }
    }
    env[r.protected.end - 1] ^= 0x01;
    // Still a well-formed header: only the signature can tell.
    let after = header_map(&env[r.protected.clone()]).map_err(setup)?;
    if after.len() != fields.len() {
        return Err(setup("the flipped header lost its shape".to_owned()));
    }
    out.push(Tampered {
        case: "one bit flipped in the protected header (timestamp)",
        reason: "bad_signature",
        bytes: env,
        counter: c,
        kwh: vec![k],
        what: "signed timestamp changed by one second".to_owned(),
    });

    // 3. Protected header: alg ES256 (-7, 0x26) → EdDSA (-8, 0x27).
    let (mut env, c, k) = genuine(2)?;
    let r = Regions::of(&env).map_err(setup)?;
    let at = r.protected.start + 2;
    if env.get(r.protected.start + 1) != Some(&0x01) || env.get(at) != Some(&0x26) {
        return Err(setup(
            "the header does not start with alg ES256 (a P-256 meter key)".to_owned(),
        ));
    }
    env[at] ^= 0x01;
    out.push(Tampered {
        case: "one bit flipped in the protected header (alg ES256 → EdDSA)",
        reason: "key_mismatch",
        bytes: env,
        counter: c,
        kwh: vec![k],
        what: "alg -7 → -8".to_owned(),
    });

    // 4. Signature: its last bit.
    let (mut env, c, k) = genuine(3)?;
    let r = Regions::of(&env).map_err(setup)?;
    env[r.signature.end - 1] ^= 0x01;
    out.push(Tampered {
        case: "one bit flipped in the signature",
        reason: "bad_signature",
        bytes: env,
        counter: c,
        kwh: vec![k],
        what: "last signature bit".to_owned(),
    });

    // 5. Structure: the array head (four items → five).
    let (mut env, c, k) = genuine(4)?;
    if env.get(..2) != Some(&[0xd2, 0x84][..]) {
        return Err(setup("not a tagged four-item array".to_owned()));
    }
    env[1] ^= 0x01;
    out.push(Tampered {
        case: "one bit flipped in the CBOR structure (array of 4 → 5)",
        reason: "malformed_envelope",
        bytes: env,
        counter: c,
        kwh: vec![k],
        what: "array head 0x84 → 0x85".to_owned(),
    });

    // 6. alg moved to the unprotected header, re-encoded and re-signed with the meter's key.
    let (env, c, k) = genuine(5)?;
    out.push(Tampered {
        case: "alg moved to the unprotected header (re-signed by the meter's own key)",
        reason: "malformed_envelope",
        bytes: alg_unprotected(a, topic, &env).map_err(setup)?,
        counter: c,
        kwh: vec![k],
        what: "protected {2,3,4,…} unprotected {1: -7}".to_owned(),
    });
    Ok(out)
}

/// Cases 7 to 9: concentrator C re-signs meter B's genuine reading.
async fn concentrator(ctx: &Ctx) -> Result<Vec<Check>, AttackError> {
    let b = ctx.attack_meter("tamper-b")?;
    let c = ctx.attack_meter("tamper-c")?;
    let c_key = c.signing_key()?;
    let b_topic = format!("meters/{}/readings", b.id);
    let c_topic = format!("meters/{}/readings", c.id);
    let b_counter = next_counter(ctx, &b.id);
    let c_counter = next_counter(ctx, &c.id);
    let kwh = next_kwh(ctx, &b.id) + 8100.5;
    // B's genuine reading, as it reaches C (and never the head-end).
    let captured = Ctx::genuine(&b, b_counter, kwh)?;
    let r = Regions::of(&captured).map_err(AttackError::Setup)?;
    let doc = String::from_utf8(captured[r.payload].to_vec())
        .map_err(|e| AttackError::Setup(format!("B's document: {e}")))?;

    let cases = [
        (
            "concentrator C re-signs B's reading claiming B (C's topic)",
            "key_mismatch",
            Ctx::sign(&c_key, &b.id, b_counter, &c_topic, &doc)?,
            c_topic.as_str(),
            "header B, C's key",
        ),
        (
            "concentrator C re-signs B's reading as its own (C's topic)",
            "invalid_document",
            Ctx::sign(&c_key, &c.id, c_counter, &c_topic, &doc)?,
            c_topic.as_str(),
            "header C, B's document",
        ),
        (
            "concentrator C re-signs B's reading claiming B (B's topic)",
            "topic_not_authorized",
            Ctx::sign(&c_key, &b.id, b_counter, &b_topic, &doc)?,
            b_topic.as_str(),
            "header B, C's key, on B's topic",
        ),
    ];
    let mut checks = Vec::new();
    let mut client: Option<Client> = None;
    for (n, (case, reason, env, topic, what)) in cases.into_iter().enumerate() {
        let mut conn = match client.take() {
            Some(conn) => conn,
            None => ctx.connect_meter(&c).await?,
        };
        let before = ctx.last_event_id();
        let out = Ctx::publish(&mut conn, topic, env, 1 + n as u16).await;
        let mut observed = format!("{what}: {out}");
        if reason == "topic_not_authorized" {
            let (_, after) = await_close(&mut conn, Duration::from_secs(5)).await;
            observed.push_str(&format!(", then {after}"));
        } else if out != PubOutcome::Closed {
            client = Some(conn);
        }
        let (clean_b, stored_b) = stored_nothing(ctx, &b.id, b_counter, &[kwh]);
        let (clean_c, stored_c) = stored_nothing(ctx, &c.id, c_counter, &[kwh]);
        checks.push(
            ctx.refusal(
                NAME,
                case,
                reason,
                Some(&c.id),
                before,
                out.refused() && clean_b && clean_c,
                format!("{observed}; B: {stored_b}; C: {stored_c}"),
            )
            .await,
        );
    }
    if let Some(mut conn) = client {
        let _ = conn.disconnect().await;
    }
    Ok(checks)
}

/// Whether neither `counter` nor any register of `kwh` is stored for `meter`, and a word on it.
fn stored_nothing(ctx: &Ctx, meter: &str, counter: u64, kwh: &[f64]) -> (bool, String) {
    let by_counter = ctx.stored_counters(meter).contains(&counter);
    let by_kwh = ctx.stored_kwh(meter).iter().any(|k| kwh.contains(k));
    if by_counter || by_kwh {
        (false, "STORED".to_owned())
    } else {
        (true, "nothing stored".to_owned())
    }
}

/// Where the three byte strings of a COSE_Sign1 lie in its encoding.
#[derive(Debug)]
struct Regions {
    protected: Range<usize>,
    payload: Range<usize>,
    signature: Range<usize>,
}

impl Regions {
    /// Decodes `env` (tag 18, `[protected bstr, {}, payload bstr, signature bstr]`) and finds
    /// each byte string's contents in it: in that order, each exactly once, the signature last.
    fn of(env: &[u8]) -> Result<Self, String> {
        let p = parts(env)?;
        let protected = locate(env, &p.protected, 0)?;
        let payload = locate(env, &p.payload, protected.end)?;
        let signature = locate(env, &p.signature, payload.end)?;
        if signature.end != env.len() {
            return Err("bytes after the signature".to_owned());
        }
        Ok(Self {
            protected,
            payload,
            signature,
        })
    }
}

/// The three byte strings of a COSE_Sign1.
struct Parts {
    protected: Vec<u8>,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

/// The byte strings of a tagged COSE_Sign1 with an empty unprotected header.
fn parts(env: &[u8]) -> Result<Parts, String> {
    let value: Value = ciborium::de::from_reader(env).map_err(|e| format!("not CBOR: {e}"))?;
    let Value::Tag(18, inner) = value else {
        return Err("not a COSE_Sign1 (tag 18)".to_owned());
    };
    let Value::Array(items) = *inner else {
        return Err("COSE_Sign1 is not an array".to_owned());
    };
    match <[Value; 4]>::try_from(items) {
        Ok(
            [
                Value::Bytes(protected),
                Value::Map(unprotected),
                Value::Bytes(payload),
                Value::Bytes(signature),
            ],
        ) if unprotected.is_empty() => Ok(Parts {
            protected,
            payload,
            signature,
        }),
        _ => Err("not [protected, {}, payload, signature]".to_owned()),
    }
}

/// The position of `part` in `env`, searched from `from`; it must occur exactly once.
fn locate(env: &[u8], part: &[u8], from: usize) -> Result<Range<usize>, String> {
    let at = env
        .get(from..)
        .and_then(|rest| find(rest, part))
        .map(|i| from + i)
        .ok_or_else(|| "a byte string is not where it should be".to_owned())?;
    if find(&env[at + 1..], part).is_some() || find(&env[..at], part).is_some() {
        return Err("a byte string occurs twice".to_owned());
    }
    Ok(at..at + part.len())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The register of an XML reading.
fn register(payload: &[u8]) -> Option<f64> {
    let start = find(payload, ENERGY_TAG)? + ENERGY_TAG.len();
    let len = find(&payload[start..], b"<")?;
    std::str::from_utf8(&payload[start..start + len])
        .ok()?
        .parse()
        .ok()
}

/// The fields of an encoded header map, in order.
fn header_map(bytes: &[u8]) -> Result<Vec<(Value, Value)>, String> {
    match ciborium::de::from_reader(bytes) {
        Ok(Value::Map(fields)) => Ok(fields),
        Ok(_) => Err("the protected header is not a map".to_owned()),
        Err(e) => Err(format!("the protected header does not decode: {e}")),
    }
}

fn cbor(value: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// `env` with `alg` taken out of the protected header and put in the unprotected one,
/// re-signed with `a`'s key over the new protected header. The same re-encoding without the
/// move must verify (checked here), so the move is the only defect.
fn alg_unprotected(a: &Creds, topic: &str, env: &[u8]) -> Result<Vec<u8>, String> {
    let Parts {
        protected, payload, ..
    } = parts(env)?;
    let fields = header_map(&protected)?;
    let is_alg = |k: &Value| matches!(k, Value::Integer(l) if i128::from(*l) == ALG);
    let alg = fields
        .iter()
        .find(|(k, _)| is_alg(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .ok_or("the protected header has no alg")?;
    let pem = std::fs::read_to_string(&a.key).map_err(|e| format!("{}: {e}", a.key.display()))?;
    let signer = rcgen::KeyPair::from_pem(&pem).map_err(|e| e.to_string())?;
    if signer.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err("re-signing needs a P-256 meter key".to_owned());
    }

    // The same envelope, re-encoded and re-signed here: it must verify.
    let control = resign(&signer, fields.clone(), Vec::new(), &payload, topic)?;
    let key = a
        .signing_key()
        .map_err(|e| e.to_string())?
        .verifying_key()
        .map_err(|e| e.to_string())?;
    let meter = MeterId::new(&a.id).map_err(|e| e.to_string())?;
    envelope::verify(&control, &key, &meter, topic)
        .map_err(|e| format!("the re-signed, unchanged envelope does not verify: {e}"))?;

    let rest: Vec<(Value, Value)> = fields.into_iter().filter(|(k, _)| !is_alg(k)).collect();
    resign(&signer, rest, vec![alg], &payload, topic)
}

/// A tagged COSE_Sign1 with these headers, signed (ES256, raw `r ‖ s`) over its
/// `Sig_structure` with `topic` as external AAD.
fn resign(
    signer: &rcgen::KeyPair,
    protected: Vec<(Value, Value)>,
    unprotected: Vec<(Value, Value)>,
    payload: &[u8],
    topic: &str,
) -> Result<Vec<u8>, String> {
    use rcgen::SigningKey as _;
    let protected = cbor(&Value::Map(protected))?;
    let tbs = cbor(&Value::Array(vec![
        Value::Text("Signature1".to_owned()),
        Value::Bytes(protected.clone()),
        Value::Bytes(topic.as_bytes().to_vec()),
        Value::Bytes(payload.to_vec()),
    ]))?;
    let der = signer.sign(&tbs).map_err(|e| e.to_string())?;
    let signature = ecdsa_raw(&der).ok_or("the ECDSA signature is not DER")?;
    cbor(&Value::Tag(
        18,
        Box::new(Value::Array(vec![
            Value::Bytes(protected),
            Value::Map(unprotected),
            Value::Bytes(payload.to_vec()),
            Value::Bytes(signature),
        ])),
    ))
}

/// `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` (DER, P-256) → 64-byte `r ‖ s`.
fn ecdsa_raw(der: &[u8]) -> Option<Vec<u8>> {
    let (&tag, rest) = der.split_first()?;
    let (&len, mut body) = rest.split_first()?;
    if tag != 0x30 || usize::from(len) != body.len() {
        return None;
    }
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        let (&tag, rest) = body.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let len = usize::from(len);
        if tag != 0x02 || rest.len() < len {
            return None;
        }
        let (int, next) = rest.split_at(len);
        let start = int.iter().position(|b| *b != 0).unwrap_or(int.len());
        let int = &int[start..];
        if int.len() > 32 {
            return None;
        }
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        body = next;
    }
    body.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn der_signatures_become_raw_r_and_s() {
        // r with a leading zero byte (high bit set), s short.
        let mut der = vec![0x30, 0x27, 0x02, 0x21, 0x00];
        der.extend([0x80; 32]);
        der.extend([0x02, 0x02, 0x01, 0x02]);
        let raw = ecdsa_raw(&der).unwrap();
        assert_eq!(raw.len(), 64);
        assert_eq!(&raw[..32], &[0x80; 32]);
        assert_eq!(&raw[32..62], &[0; 30]);
        assert_eq!(&raw[62..], &[1, 2]);
        assert_eq!(ecdsa_raw(&der[..der.len() - 1]), None);
    }

    #[test]
    fn the_regions_of_the_wire_format_vector_are_found() {
        // docs/wire-format.md §5, the EdDSA vector.
        let env = hex::decode(concat!(
            "d2845858a7012702833a000100003a000100013a0001000203706170706c69636174696f6e2f6a",
            "736f6e0450980aa09a681ec3fa059b71f6e8f974523a00010000693132333435363738393a0001",
            "0001182b3a000100021a65c21f40a058517b224d657465724944223a22313233343536373839222c",
            "2254696d657374616d70223a22323032342d30322d30365431323a30303a30305a222c22456e6572",
            "6779436f6e73756d6564223a3335302e357d584040e8b11b2d014b0c78ef3e018d8092d2df29ac78",
            "4a381a1cd8be7a6a90488a51138b3523220ec6007ed047cdf7d67d44e0a611c9d9f282bcdef04a00",
            "c08c2e0a"
        ))
        .unwrap();
        let r = Regions::of(&env).unwrap();
        assert_eq!(r.protected, 4..92);
        assert_eq!(env[r.payload.clone()].first(), Some(&b'{'));
        assert_eq!(r.signature.len(), 64);
        assert_eq!(r.signature.end, env.len());
        let fields = header_map(&env[r.protected]).unwrap();
        assert!(
            matches!(fields.last(), Some((Value::Integer(l), _)) if i128::from(*l) == TIMESTAMP)
        );
    }
}
