//! What a delivery sends and how an answer is read: pure functions.
//!
//! The body is the reading's JSON document plus what receivers need to de-duplicate:
//!
//! ```json
//! {"ReadingID":"m000001-42","MeterID":"m000001","Counter":42,"Timestamp":"2026-12-02T10:15:00Z","EnergyConsumed":350.5}
//! ```
//!
//! The request carries `Content-Type: application/json`, `Content-Digest` (RFC 9530, sha-256)
//! and an RFC 9421 signature labelled `gridward` over [`COVERED_COMPONENTS`] with `created`,
//! `expires`, `nonce`, `keyid` and `alg`.

use gridward_core::downstream::ForwardedReading;
use gridward_core::httpsig::{self, HttpSigError, HttpSigningKey, Request, SignParams};
use gridward_store::OutboxItem;
use time::OffsetDateTime;

/// The components every delivery signs, in order.
pub const COVERED_COMPONENTS: [&str; 4] =
    ["@method", "@target-uri", "content-digest", "content-type"];

/// The signature's label in `Signature-Input` and `Signature`.
pub const SIGNATURE_LABEL: &str = "gridward";

/// The body's media type.
pub const CONTENT_TYPE: &str = "application/json";

/// The JSON body for `item` (see the module documentation), with the meter's envelope if
/// `envelope`.
pub fn reading_json(item: &OutboxItem, envelope: bool) -> Vec<u8> {
    let reading =
        ForwardedReading::new(&item.meter_id, item.counter, item.taken_at, item.energy_kwh);
    let reading = if envelope {
        reading.with_envelope(&item.envelope)
    } else {
        reading
    };
    reading.to_json().into_bytes()
}

/// A request ready to send: the body and the header fields to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// The JSON body.
    pub body: Vec<u8>,
    /// `content-type`, `content-digest`, `signature-input`, `signature`.
    pub headers: Vec<(&'static str, String)>,
}

/// Builds and signs the `POST` of `item` (with its envelope if `envelope`) to `url`: signed at
/// `created`, valid for `validity`, with `nonce` (fresh and unpredictable for every attempt).
pub fn signed_request(
    url: &str,
    key: &HttpSigningKey,
    item: &OutboxItem,
    envelope: bool,
    created: OffsetDateTime,
    validity: std::time::Duration,
    nonce: String,
) -> Result<SignedRequest, HttpSigError> {
    let body = reading_json(item, envelope);
    let digest = httpsig::content_digest(&body);
    let fields = [("content-type", CONTENT_TYPE), ("content-digest", &digest)];
    let validity = time::Duration::try_from(validity).unwrap_or(time::Duration::MINUTE);
    let signature = httpsig::sign_request(
        &Request {
            method: "POST",
            target_uri: url,
            headers: &fields,
        },
        key,
        &SignParams {
            label: SIGNATURE_LABEL.to_owned(),
            components: COVERED_COMPONENTS.map(String::from).to_vec(),
            created,
            expires: created + validity.max(time::Duration::SECOND),
            nonce,
        },
    )?;
    Ok(SignedRequest {
        body,
        headers: vec![
            ("content-type", CONTENT_TYPE.to_owned()),
            ("content-digest", digest),
            ("signature-input", signature.signature_input),
            ("signature", signature.signature),
        ],
    })
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The target answered 2xx: delivered.
    Delivered,
    /// Failed for now (no connection, timeout, 1xx/3xx/5xx, 408, 429): retry later.
    Retry(String),
    /// Refused for good (a 4xx other than 408 and 429): a dead letter.
    Dead(String),
}

/// Classifies an HTTP answer; `excerpt` is the start of the answer's body, for the record.
pub fn classify(status: u16, excerpt: &str) -> Disposition {
    let what = if excerpt.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {excerpt}")
    };
    match status {
        200..=299 => Disposition::Delivered,
        408 | 429 => Disposition::Retry(what),
        400..=499 => Disposition::Dead(what),
        _ => Disposition::Retry(what),
    }
}

/// The printable start (at most `max` bytes) of an answer's body, on one line.
pub fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(max)]);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use gridward_core::MeterId;
    use gridward_core::httpsig::{HttpVerifyingKey, VerifyPolicy, verify_request};
    use gridward_store::TargetId;
    use time::macros::datetime;

    use super::*;

    const ED25519_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF
-----END PRIVATE KEY-----
";

    fn item() -> OutboxItem {
        OutboxItem {
            id: 7,
            target: TargetId(1),
            message_id: 99,
            meter_id: MeterId::new("m000001").unwrap(),
            counter: 42,
            taken_at: datetime!(2026-12-02 10:15:00 UTC),
            energy_kwh: 350.5,
            queued_at: datetime!(2026-12-02 10:15:01 UTC),
            attempts: 0,
            envelope: Vec::new(),
        }
    }

    #[test]
    fn body_is_the_reading_with_its_ids() {
        let v: serde_json::Value = serde_json::from_slice(&reading_json(&item(), false)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ReadingID": "m000001-42",
                "MeterID": "m000001",
                "Counter": 42,
                "Timestamp": "2026-12-02T10:15:00Z",
                "EnergyConsumed": 350.5
            })
        );
    }

    #[test]
    fn a_target_with_envelope_gets_the_meters_bytes_back() {
        let mut it = item();
        it.envelope = vec![0xd2, 0x84, 0x43, 0x00, 0xff];
        let body = reading_json(&it, true);
        let r: ForwardedReading = serde_json::from_slice(&body).unwrap();
        assert_eq!(r.envelope.as_deref(), Some("0oRDAP8="));
        assert_eq!(r.envelope_bytes(), Some(Ok(it.envelope.clone())));
        assert!(
            !String::from_utf8(reading_json(&it, false))
                .unwrap()
                .contains("Envelope")
        );
    }

    #[test]
    fn signed_request_verifies_and_binds_the_body() {
        let key = HttpSigningKey::from_pkcs8_pem(ED25519_PKCS8, "hes").unwrap();
        let url = "https://127.0.0.1:8443/readings";
        let now = datetime!(2026-12-02 10:15:02 UTC);
        let req = signed_request(
            url,
            &key,
            &item(),
            false,
            now,
            std::time::Duration::from_secs(60),
            "n1".into(),
        )
        .unwrap();
        let headers: Vec<(&str, &str)> =
            req.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let keys: HashMap<String, HttpVerifyingKey> =
            HashMap::from([("hes".to_owned(), key.verifying_key())]);
        let r = Request {
            method: "POST",
            target_uri: url,
            headers: &headers,
        };
        let v = verify_request(&r, &keys, &VerifyPolicy::default(), now).unwrap();
        assert_eq!(v.key_id, "hes");
        assert_eq!(v.nonce.as_deref(), Some("n1"));
        assert_eq!(v.expires, Some(now + time::Duration::minutes(1)));
        let digest = &req.headers[1].1;
        httpsig::verify_content_digest(digest, &req.body).unwrap();
        assert!(httpsig::verify_content_digest(digest, b"{}").is_err());
        // Another target URI does not verify.
        let other = Request {
            target_uri: "https://127.0.0.1:8443/other",
            ..r
        };
        assert!(verify_request(&other, &keys, &VerifyPolicy::default(), now).is_err());
    }

    #[test]
    fn answers_are_classified_as_the_issue_says() {
        assert_eq!(classify(200, ""), Disposition::Delivered);
        assert_eq!(classify(201, "stored"), Disposition::Delivered);
        assert_eq!(classify(204, ""), Disposition::Delivered);
        assert_eq!(classify(408, ""), Disposition::Retry("HTTP 408".into()));
        assert_eq!(
            classify(429, "slow down"),
            Disposition::Retry("HTTP 429: slow down".into())
        );
        assert_eq!(classify(500, ""), Disposition::Retry("HTTP 500".into()));
        assert_eq!(classify(503, ""), Disposition::Retry("HTTP 503".into()));
        assert_eq!(classify(302, ""), Disposition::Retry("HTTP 302".into()));
        assert_eq!(
            classify(400, "bad"),
            Disposition::Dead("HTTP 400: bad".into())
        );
        assert_eq!(classify(401, ""), Disposition::Dead("HTTP 401".into()));
        assert_eq!(classify(403, ""), Disposition::Dead("HTTP 403".into()));
        assert_eq!(classify(422, ""), Disposition::Dead("HTTP 422".into()));
    }

    #[test]
    fn excerpts_are_short_single_lines() {
        assert_eq!(excerpt(b"bad\r\nthing\x00", 100), "bad  thing");
        assert_eq!(excerpt(&[b'a'; 1000], 10), "aaaaaaaaaa");
        assert_eq!(excerpt(&[0xff, b'x'], 10), "\u{fffd}x");
    }
}
