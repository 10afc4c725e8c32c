//! HTTP Message Signatures (RFC 9421) for requests, and `Content-Digest` (RFC 9530, sha-256).
//!
//! Gridward signs the requests it forwards downstream (billing, MDM) and can verify requests
//! signed the same way. Like the rest of the crate this module is sans-IO: a [`Request`] is a
//! method, an absolute target URI and the header fields; the caller passes `now`.
//!
//! ```text
//!  sender:   body ──► content_digest ──► Content-Digest header
//!            Request ──► sign_request(key, SignParams) ──► Signature-Input + Signature headers
//!
//!  receiver: Request ──► verify_request(keys, policy, now) ──► VerifiedSignature ──► replay check
//!                                                                  (nonce, remember_until) (caller)
//!            Request + body ──► verify_request_content_digest ──► the body is the signed body
//! ```
//!
//! Both checks must pass before the body is used: the signature covers the `Content-Digest`
//! field, and the digest covers the body.
//!
//! The profile (`docs/wire-format.md`, "Downstream request signatures"): covered components
//! `@method`, `@target-uri`, `content-digest`, `content-type` (more may be added); parameters
//! `created`, `expires`, `nonce`, `keyid`, `alg`; algorithms `ed25519` and `ecdsa-p256-sha256`.
//!
//! Deliberately not supported, and refused with a typed error when seen: component parameters
//! (`;sf`, `;key`, `;bs`, `;req`, `;name`, `;tr`), response components (`@status`),
//! `@query-param`, other algorithms (RSA, HMAC), and signature parameters other than the six
//! RFC 9421 registers (`created`, `expires`, `nonce`, `alg`, `keyid`, `tag`).
//! Every field value read is bounded by [`MAX_FIELD_VALUE_LEN`], so hostile input costs little;
//! at most one signature is verified per request.

mod digest;
mod keys;
mod message;
#[cfg(test)]
mod tests;

use std::fmt;

use sfv::{
    BareItem, DictSerializer, Dictionary, InnerList, Item, Key, KeyRef, ListEntry, ListSerializer,
    Parser, Version,
};
use time::OffsetDateTime;

pub use digest::{content_digest, verify_content_digest, verify_request_content_digest};
pub use keys::{HttpSigningKey, HttpVerifyingKey, KeyLookup};
pub use message::Request;

use message::Component;

/// Largest field value accepted, in bytes, after repeated fields are combined (RFC 9421 §2.1):
/// `Signature-Input`, `Signature`, `Content-Digest` and every covered field. Also the largest
/// target URI.
pub const MAX_FIELD_VALUE_LEN: usize = 8 * 1024;

/// Most components one signature may cover.
pub const MAX_COVERED_COMPONENTS: usize = 32;

/// The derived components a request signature may cover (RFC 9421 §2.2).
pub const DERIVED_COMPONENTS: [&str; 7] = [
    "@method",
    "@target-uri",
    "@authority",
    "@scheme",
    "@request-target",
    "@path",
    "@query",
];

/// A signature algorithm (RFC 9421 §3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpSigAlg {
    /// `ed25519`: EdDSA over Curve25519 (RFC 8032), 64-byte signatures. RFC 9421 §3.3.6.
    Ed25519,
    /// `ecdsa-p256-sha256`: ECDSA over P-256 with SHA-256, the signature being the 64 bytes
    /// `r ‖ s` (not DER). RFC 9421 §3.3.4.
    EcdsaP256Sha256,
}

impl HttpSigAlg {
    /// The algorithm's name in the HTTP Signature Algorithms registry (the `alg` parameter).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::EcdsaP256Sha256 => "ecdsa-p256-sha256",
        }
    }

    /// The algorithm registered as `name`, if Gridward supports it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "ed25519" => Some(Self::Ed25519),
            "ecdsa-p256-sha256" => Some(Self::EcdsaP256Sha256),
            _ => None,
        }
    }
}

impl fmt::Display for HttpSigAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a request signature, a `Content-Digest` or a key was refused.
///
/// [`HttpSigError::code`] is a stable reason code for logs, metrics and security events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpSigError {
    /// The request has no `Signature-Input` or no `Signature` field, or `Signature` has no
    /// value for the label being verified.
    #[error("signature missing: {0}")]
    SignatureMissing(String),
    /// `Signature-Input` is not a Structured Field dictionary, or the chosen label is not an
    /// inner list of strings, or one of its parameters is unknown, of the wrong type or
    /// inconsistent (`expires` before `created`), or it covers too many components.
    #[error("malformed Signature-Input: {0}")]
    SignatureInputMalformed(String),
    /// `Signature` is not a Structured Field dictionary, or the chosen label's value is not a
    /// byte sequence.
    #[error("malformed Signature: {0}")]
    SignatureMalformed(String),
    /// A field value (combined over repeated fields) or the target URI is longer than
    /// [`MAX_FIELD_VALUE_LEN`].
    #[error("{name} is {len} bytes; at most {MAX_FIELD_VALUE_LEN} are accepted")]
    FieldTooLarge {
        /// The field name (lowercase), or `@target-uri`.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A covered field's value contains a character that cannot appear in a signature base
    /// (a control character other than tab, CR, LF, or a non-ASCII character).
    #[error("field {0} contains a control or non-ASCII character")]
    FieldValueInvalid(String),
    /// The request's method is not an HTTP token, or its target URI is not an absolute
    /// `http`/`https` URI without user info and fragment.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A covered component Gridward does not support: an unknown or response-only derived
    /// component, `@query-param`, or a component with parameters (`;sf`, `;key`, `;bs`,
    /// `;req`, `;name`, `;tr`).
    #[error("unsupported component {0}")]
    ComponentUnsupported(String),
    /// A component is listed twice among the covered components.
    #[error("component {0} is covered twice")]
    DuplicateComponent(String),
    /// No signature on the request covers this component, which the policy requires.
    #[error("required component {0} is not covered by the signature")]
    ComponentNotCovered(String),
    /// A covered field is absent from the request.
    #[error("covered component {0} is absent from the request")]
    ComponentMissing(String),
    /// The signature has no `keyid` parameter.
    #[error("signature has no keyid parameter")]
    KeyIdMissing,
    /// No verifying key is known under the signature's `keyid`.
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    /// The signature's `alg` parameter is not the algorithm of the key named by `keyid`.
    #[error("signature claims alg {signature:?}, but key is {key}")]
    AlgMismatch {
        /// The `alg` parameter of the signature.
        signature: String,
        /// The algorithm of the verifying key.
        key: HttpSigAlg,
    },
    /// The signature has no `created` parameter.
    #[error("signature has no created parameter")]
    CreatedMissing,
    /// `created` is more than the policy's `max_age` before `now`.
    #[error("signature created at {created} is too old at {now}")]
    SignatureTooOld {
        /// `created`, seconds since the Unix epoch.
        created: i64,
        /// `now`, seconds since the Unix epoch.
        now: i64,
    },
    /// `created` is more than the policy's `max_skew` after `now`.
    #[error("signature created at {created} is in the future at {now}")]
    CreatedInFuture {
        /// `created`, seconds since the Unix epoch.
        created: i64,
        /// `now`, seconds since the Unix epoch.
        now: i64,
    },
    /// The signature has no `expires` parameter, which the policy requires.
    #[error("signature has no expires parameter")]
    ExpiresMissing,
    /// `expires` is not after `now`.
    #[error("signature expired at {expires} (now {now})")]
    SignatureExpired {
        /// `expires`, seconds since the Unix epoch.
        expires: i64,
        /// `now`, seconds since the Unix epoch.
        now: i64,
    },
    /// The signature has no (or an empty) `nonce` parameter, which the policy requires.
    #[error("signature has no nonce parameter")]
    NonceMissing,
    /// The signature does not verify: a covered component, a parameter or the signature was
    /// changed, or it was made with another key.
    #[error("signature verification failed")]
    BadSignature,
    /// The request has no `Content-Digest` field, or it is empty.
    #[error("Content-Digest is missing")]
    ContentDigestMissing,
    /// `Content-Digest` is not a Structured Field dictionary, or a supported member is not a
    /// byte sequence of the algorithm's length.
    #[error("malformed Content-Digest: {0}")]
    ContentDigestMalformed(String),
    /// `Content-Digest` has no `sha-256` member (it names only other algorithms).
    #[error("Content-Digest has no sha-256 member (found: {0})")]
    ContentDigestUnsupported(String),
    /// A supported digest in `Content-Digest` does not match the body.
    #[error("Content-Digest {0} does not match the body")]
    ContentDigestMismatch(&'static str),
    /// A key could not be loaded: not PEM/DER, not Ed25519 or P-256, encrypted, or an
    /// unusable key id.
    #[error("unusable key: {0}")]
    BadKey(String),
    /// The signer's parameters are invalid: label not a Structured Field key, a component
    /// name not lowercase, `expires` not after `created`, an empty nonce, too many components.
    #[error("invalid signing parameters: {0}")]
    InvalidSignParams(String),
    /// The signing operation itself failed (random generator failure).
    #[error("signing failed")]
    SigningFailed,
}

impl HttpSigError {
    /// The stable, snake_case reason code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::SignatureMissing(_) => "signature_missing",
            Self::SignatureInputMalformed(_) => "signature_input_malformed",
            Self::SignatureMalformed(_) => "signature_malformed",
            Self::FieldTooLarge { .. } => "field_too_large",
            Self::FieldValueInvalid(_) => "field_value_invalid",
            Self::InvalidRequest(_) => "request_invalid",
            Self::ComponentUnsupported(_) => "component_unsupported",
            Self::DuplicateComponent(_) => "component_duplicate",
            Self::ComponentNotCovered(_) => "component_not_covered",
            Self::ComponentMissing(_) => "component_missing",
            Self::KeyIdMissing => "keyid_missing",
            Self::UnknownKey(_) => "unknown_key",
            Self::AlgMismatch { .. } => "alg_mismatch",
            Self::CreatedMissing => "created_missing",
            Self::SignatureTooOld { .. } => "signature_too_old",
            Self::CreatedInFuture { .. } => "created_in_future",
            Self::ExpiresMissing => "expires_missing",
            Self::SignatureExpired { .. } => "signature_expired",
            Self::NonceMissing => "nonce_missing",
            Self::BadSignature => "bad_signature",
            Self::ContentDigestMissing => "content_digest_missing",
            Self::ContentDigestMalformed(_) => "content_digest_malformed",
            Self::ContentDigestUnsupported(_) => "content_digest_unsupported",
            Self::ContentDigestMismatch(_) => "content_digest_mismatch",
            Self::BadKey(_) => "bad_key",
            Self::InvalidSignParams(_) => "sign_params_invalid",
            Self::SigningFailed => "signing_failed",
        }
    }
}

/// What the signer puts into a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignParams {
    /// The signature's label in `Signature-Input` and `Signature`, e.g. `gridward`: a
    /// Structured Field key (lowercase letters, digits, `_ - . *`, starting with a letter or `*`).
    pub label: String,
    /// The covered components in order, e.g. `["@method", "@target-uri", "content-digest",
    /// "content-type"]`: derived components from [`DERIVED_COMPONENTS`] and lowercase field
    /// names, each at most once.
    pub components: Vec<String>,
    /// Signing time (`created`); sub-second precision is dropped.
    pub created: OffsetDateTime,
    /// Expiry (`expires`); must be after `created`.
    pub expires: OffsetDateTime,
    /// A fresh, unpredictable value (`nonce`) the verifier remembers to refuse replays; printable
    /// ASCII, not empty.
    pub nonce: String,
}

/// The two header fields a signed request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    /// The `Signature-Input` field value.
    pub signature_input: String,
    /// The `Signature` field value.
    pub signature: String,
}

/// What a verifier demands of a request signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// Components every accepted signature must cover, written as in `Signature-Input`
    /// (derived components with `@`, field names lowercase).
    pub required_components: Vec<String>,
    /// Largest accepted `now - created`.
    pub max_age: std::time::Duration,
    /// How far `created` may lie after `now` (the signer's clock being ahead).
    pub max_skew: std::time::Duration,
    /// Refuse signatures without `expires`.
    pub require_expires: bool,
    /// Refuse signatures without `nonce`.
    pub require_nonce: bool,
}

impl Default for VerifyPolicy {
    /// Required `@method`, `@target-uri`, `content-digest`, `content-type`; `max_age` 300 s;
    /// `max_skew` 5 s; `expires` and `nonce` required.
    fn default() -> Self {
        Self {
            required_components: ["@method", "@target-uri", "content-digest", "content-type"]
                .map(String::from)
                .to_vec(),
            max_age: std::time::Duration::from_secs(300),
            max_skew: std::time::Duration::from_secs(5),
            require_expires: true,
            require_nonce: true,
        }
    }
}

/// A request signature that verified. Only [`verify_request`] makes one.
///
/// The caller's replay check: refuse the request if `(key_id, nonce)` was seen before, else
/// remember it until `remember_until`, after which the signature is refused as expired or too
/// old anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedSignature {
    /// The label that was verified.
    pub label: String,
    /// The `keyid` parameter: the key that verified it.
    pub key_id: String,
    /// The algorithm of that key.
    pub alg: HttpSigAlg,
    /// The covered components, in signed order.
    pub components: Vec<String>,
    /// The `created` parameter.
    pub created: OffsetDateTime,
    /// The `expires` parameter, if any.
    pub expires: Option<OffsetDateTime>,
    /// The `nonce` parameter, if any.
    pub nonce: Option<String>,
    /// Until when the nonce must be remembered: the earlier of `expires` and
    /// `created + max_age`.
    pub remember_until: OffsetDateTime,
}

/// The parameters of one signature, in the order they are serialized.
type SigParams = Vec<(&'static KeyRef, BareItem)>;

const CREATED: &KeyRef = sfv::key_ref("created");
const EXPIRES: &KeyRef = sfv::key_ref("expires");
const NONCE: &KeyRef = sfv::key_ref("nonce");
const KEYID: &KeyRef = sfv::key_ref("keyid");
const ALG: &KeyRef = sfv::key_ref("alg");

/// Signs `req` with `key`: builds the signature base (RFC 9421 §2.5) over
/// `params.components` with the parameters `created`, `expires`, `nonce`, `keyid` and `alg`, in
/// that order, and returns the `Signature-Input` and `Signature` values to add to the request.
///
/// Every covered field must be present in `req` (add `Content-Digest` first).
pub fn sign_request(
    req: &Request<'_>,
    key: &HttpSigningKey,
    params: &SignParams,
) -> Result<SignatureHeaders, HttpSigError> {
    let created = params.created.unix_timestamp();
    let expires = params.expires.unix_timestamp();
    if expires <= created {
        return Err(HttpSigError::InvalidSignParams(format!(
            "expires ({expires}) must be after created ({created})"
        )));
    }
    if params.nonce.is_empty() {
        return Err(HttpSigError::InvalidSignParams("empty nonce".to_owned()));
    }
    let sig_params: SigParams = vec![
        (CREATED, sf_integer(created)?),
        (EXPIRES, sf_integer(expires)?),
        (NONCE, sf_string("nonce", &params.nonce)?),
        (KEYID, sf_string("keyid", key.key_id())?),
        (ALG, sf_string("alg", key.alg().name())?),
    ];
    sign_with(req, key, &params.label, &params.components, sig_params).map(|(headers, _)| headers)
}

/// Signs with arbitrary parameters; returns the headers and the signature base.
fn sign_with(
    req: &Request<'_>,
    key: &HttpSigningKey,
    label: &str,
    components: &[String],
    sig_params: SigParams,
) -> Result<(SignatureHeaders, String), HttpSigError> {
    let label = KeyRef::from_str(label).map_err(|e| {
        HttpSigError::InvalidSignParams(format!(
            "label {label:?} is not a Structured Field key: {e}"
        ))
    })?;
    if components.len() > MAX_COVERED_COMPONENTS {
        return Err(HttpSigError::InvalidSignParams(format!(
            "{} components; at most {MAX_COVERED_COMPONENTS}",
            components.len()
        )));
    }
    let mut parsed: Vec<Component> = Vec::with_capacity(components.len());
    let mut items = Vec::with_capacity(components.len());
    for name in components {
        let component = Component::parse(name).map_err(|e| match e {
            HttpSigError::SignatureInputMalformed(m) => HttpSigError::InvalidSignParams(m),
            other => other,
        })?;
        if parsed.contains(&component) {
            return Err(HttpSigError::DuplicateComponent(name.clone()));
        }
        parsed.push(component);
        items.push(Item::new(sf_string("component", name)?));
    }
    let mut list = InnerList::new(items);
    for (name, value) in sig_params {
        list.params.insert(name.to_owned(), value);
    }
    let serialized = serialize_inner_list(&list)?;
    let base = message::signature_base(req, &parsed, &serialized)?;
    let signature = key.sign(base.as_bytes())?;

    let mut input = DictSerializer::new();
    input.members([(label, &ListEntry::InnerList(list))]);
    let mut sig = DictSerializer::new();
    sig.bare_item(label, signature.as_slice());
    let headers = SignatureHeaders {
        signature_input: input.finish().unwrap_or_default(),
        signature: sig.finish().unwrap_or_default(),
    };
    Ok((headers, base))
}

/// A label of `Signature-Input`, parsed and checked.
struct SignatureInput {
    components: Vec<Component>,
    names: Vec<String>,
    created: Option<i64>,
    expires: Option<i64>,
    nonce: Option<String>,
    keyid: Option<String>,
    alg: Option<String>,
    /// The inner list with its parameters, serialized: the `@signature-params` value.
    serialized: String,
}

impl SignatureInput {
    fn parse(label: &str, entry: &ListEntry) -> Result<Self, HttpSigError> {
        let malformed = |m: String| HttpSigError::SignatureInputMalformed(format!("{label}: {m}"));
        let ListEntry::InnerList(list) = entry else {
            return Err(malformed("not an inner list".to_owned()));
        };
        if list.items.len() > MAX_COVERED_COMPONENTS {
            return Err(malformed(format!(
                "{} components; at most {MAX_COVERED_COMPONENTS}",
                list.items.len()
            )));
        }
        let mut components = Vec::with_capacity(list.items.len());
        let mut names = Vec::with_capacity(list.items.len());
        for item in &list.items {
            let BareItem::String(name) = &item.bare_item else {
                return Err(malformed(
                    "a component identifier is not a string".to_owned(),
                ));
            };
            let name = name.as_str();
            if let Some((param, _)) = item.params.first() {
                return Err(HttpSigError::ComponentUnsupported(format!(
                    "{name:?};{} (component parameters are not supported)",
                    param.as_str()
                )));
            }
            let component = Component::parse(name)?;
            if components.contains(&component) {
                return Err(HttpSigError::DuplicateComponent(name.to_owned()));
            }
            components.push(component);
            names.push(name.to_owned());
        }
        let mut input = Self {
            components,
            names,
            created: None,
            expires: None,
            nonce: None,
            keyid: None,
            alg: None,
            serialized: serialize_inner_list(list)?,
        };
        for (key, value) in &list.params {
            match (key.as_str(), value) {
                ("created", BareItem::Integer(i)) => input.created = Some(i64::from(*i)),
                ("expires", BareItem::Integer(i)) => input.expires = Some(i64::from(*i)),
                ("nonce", BareItem::String(s)) => input.nonce = Some(s.as_str().to_owned()),
                ("keyid", BareItem::String(s)) => input.keyid = Some(s.as_str().to_owned()),
                ("alg", BareItem::String(s)) => input.alg = Some(s.as_str().to_owned()),
                ("tag", BareItem::String(_)) => {}
                (name @ ("created" | "expires"), _) => {
                    return Err(malformed(format!("parameter {name} is not an integer")));
                }
                (name @ ("nonce" | "keyid" | "alg" | "tag"), _) => {
                    return Err(malformed(format!("parameter {name} is not a string")));
                }
                (other, _) => {
                    return Err(malformed(format!("unknown signature parameter {other}")));
                }
            }
        }
        if let (Some(created), Some(expires)) = (input.created, input.expires)
            && expires < created
        {
            return Err(malformed(format!(
                "expires ({expires}) is before created ({created})"
            )));
        }
        Ok(input)
    }
}

/// The names of the components a `Signature-Input` member covers, if it is an inner list.
fn covered_names(entry: &ListEntry) -> Option<Vec<&str>> {
    match entry {
        ListEntry::InnerList(list) => Some(
            list.items
                .iter()
                .filter_map(|item| match &item.bare_item {
                    BareItem::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
        ),
        ListEntry::Item(_) => None,
    }
}

/// Verifies the signature of `req`.
///
/// Parses `Signature-Input` and `Signature` (both may hold several labels) and verifies the
/// first label whose covered components include every one the policy requires. Checks, in
/// order: `keyid` present and known to `keys`; `alg` (if present) is the key's algorithm;
/// `created` present, not older than `max_age` and not beyond `now + max_skew`; `expires` (if
/// present, or required) after `now`; `nonce` present if required; every covered component
/// present in the request; then the signature over the signature base.
///
/// The nonce replay check is the caller's: see [`VerifiedSignature`]. The body is checked
/// separately by [`verify_request_content_digest`].
pub fn verify_request(
    req: &Request<'_>,
    keys: &dyn KeyLookup,
    policy: &VerifyPolicy,
    now: OffsetDateTime,
) -> Result<VerifiedSignature, HttpSigError> {
    let input_value = req
        .field_value("signature-input")?
        .ok_or_else(|| HttpSigError::SignatureMissing("no Signature-Input field".to_owned()))?;
    let signature_value = req
        .field_value("signature")?
        .ok_or_else(|| HttpSigError::SignatureMissing("no Signature field".to_owned()))?;
    let inputs: Dictionary = Parser::new(&input_value)
        .with_version(Version::Rfc8941)
        .parse()
        .map_err(|e| HttpSigError::SignatureInputMalformed(e.to_string()))?;
    if inputs.is_empty() {
        return Err(HttpSigError::SignatureMissing(
            "empty Signature-Input field".to_owned(),
        ));
    }

    // The first label covering every required component.
    let mut first_uncovered: Option<&str> = None;
    let mut chosen: Option<(&Key, &ListEntry)> = None;
    for (label, entry) in &inputs {
        let names = covered_names(entry).unwrap_or_default();
        match policy
            .required_components
            .iter()
            .find(|r| !names.contains(&r.as_str()))
        {
            None => {
                chosen = Some((label, entry));
                break;
            }
            Some(missing) => {
                first_uncovered.get_or_insert(missing.as_str());
            }
        }
    }
    let Some((label, entry)) = chosen else {
        return Err(HttpSigError::ComponentNotCovered(
            first_uncovered.unwrap_or_default().to_owned(),
        ));
    };
    let label = label.as_str();
    let input = SignatureInput::parse(label, entry)?;

    let signatures: Dictionary = Parser::new(&signature_value)
        .with_version(Version::Rfc8941)
        .parse()
        .map_err(|e| HttpSigError::SignatureMalformed(e.to_string()))?;
    let signature = match signatures.get(label) {
        None => {
            return Err(HttpSigError::SignatureMissing(format!(
                "Signature has no {label}"
            )));
        }
        Some(ListEntry::Item(Item {
            bare_item: BareItem::ByteSequence(bytes),
            ..
        })) => bytes.as_slice(),
        Some(_) => {
            return Err(HttpSigError::SignatureMalformed(format!(
                "{label} is not a byte sequence"
            )));
        }
    };

    let key_id = input.keyid.clone().ok_or(HttpSigError::KeyIdMissing)?;
    let key = keys
        .key(&key_id)
        .ok_or_else(|| HttpSigError::UnknownKey(key_id.clone()))?;
    if let Some(alg) = &input.alg
        && HttpSigAlg::from_name(alg) != Some(key.alg())
    {
        return Err(HttpSigError::AlgMismatch {
            signature: alg.clone(),
            key: key.alg(),
        });
    }

    let created_ts = input.created.ok_or(HttpSigError::CreatedMissing)?;
    let created = timestamp(created_ts)?;
    if now - created > policy.max_age {
        return Err(HttpSigError::SignatureTooOld {
            created: created_ts,
            now: now.unix_timestamp(),
        });
    }
    if created - now > policy.max_skew {
        return Err(HttpSigError::CreatedInFuture {
            created: created_ts,
            now: now.unix_timestamp(),
        });
    }
    let expires = match input.expires {
        Some(ts) => {
            let expires = timestamp(ts)?;
            if expires <= now {
                return Err(HttpSigError::SignatureExpired {
                    expires: ts,
                    now: now.unix_timestamp(),
                });
            }
            Some(expires)
        }
        None if policy.require_expires => return Err(HttpSigError::ExpiresMissing),
        None => None,
    };
    let nonce = input.nonce.clone().filter(|n| !n.is_empty());
    if policy.require_nonce && nonce.is_none() {
        return Err(HttpSigError::NonceMissing);
    }

    let base = message::signature_base(req, &input.components, &input.serialized)?;
    key.verify(base.as_bytes(), signature)?;

    let by_age = time::Duration::try_from(policy.max_age)
        .ok()
        .and_then(|age| created.checked_add(age));
    let remember_until = match (expires, by_age) {
        (Some(e), Some(a)) => e.min(a),
        (Some(e), None) => e,
        (None, Some(a)) => a,
        (None, None) => time::PrimitiveDateTime::MAX.assume_utc(),
    };
    Ok(VerifiedSignature {
        label: label.to_owned(),
        key_id,
        alg: key.alg(),
        components: input.names,
        created,
        expires,
        nonce,
        remember_until,
    })
}

fn timestamp(ts: i64) -> Result<OffsetDateTime, HttpSigError> {
    OffsetDateTime::from_unix_timestamp(ts).map_err(|_| {
        HttpSigError::SignatureInputMalformed(format!("timestamp {ts} is out of range"))
    })
}

fn sf_integer(value: i64) -> Result<BareItem, HttpSigError> {
    sfv::Integer::try_from(value)
        .map(BareItem::Integer)
        .map_err(|_| HttpSigError::InvalidSignParams(format!("{value} is out of range")))
}

fn sf_string(what: &str, value: &str) -> Result<BareItem, HttpSigError> {
    sfv::String::from_string(value.to_owned())
        .map(BareItem::String)
        .map_err(|_| {
            HttpSigError::InvalidSignParams(format!("{what} {value:?} is not printable ASCII"))
        })
}

/// `("a" "b");p=1`: an inner list with its parameters, as in `@signature-params`.
fn serialize_inner_list(list: &InnerList) -> Result<String, HttpSigError> {
    let mut ser = ListSerializer::new();
    ser.members([&ListEntry::InnerList(list.clone())]);
    ser.finish().ok_or_else(|| {
        HttpSigError::SignatureInputMalformed("empty signature parameters".to_owned())
    })
}
