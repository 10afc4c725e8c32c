//! Signed checkpoints: C2SP `tlog-checkpoint` bodies in C2SP `signed-note`s (sans-IO).
//!
//! ```text
//! gridward.example/audit                            origin (= the key name)
//! 20                                                size: entries 1..=20
//! 3q2+7w...=                                        base64 of the hash of entry 20
//! time 2026-03-01T12:00:00.000000Z                  when it was signed
//!
//! — gridward.example/audit AAAAAQ...==              base64(key id || Ed25519 signature)
//! ```
//!
//! The "root hash" of a hash chain is the hash of its last entry (entry `size`), not a Merkle
//! root; a checkpoint of size 0 has 32 zero bytes as its head.
//! The signature is over the body: every byte up to and including the newline of the `time`
//! line. Signatures by other keys (a witness's cosignature) are allowed and ignored.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use time::OffsetDateTime;

use crate::entry::{format_time, normalize_time, parse_time};
use crate::key::{AuditKey, VerifierKey, check_name};

/// The most signature lines a note may carry (as in `golang.org/x/mod/sumdb/note`).
pub const MAX_SIGNATURES: usize = 100;

/// The longest note accepted, in bytes.
pub const MAX_NOTE: usize = 64 * 1024;

/// Why a checkpoint cannot be signed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The note is longer than [`MAX_NOTE`].
    #[error("the note is longer than {MAX_NOTE} bytes")]
    TooLong,
    /// The note has no blank line followed by signature lines.
    #[error("the note has no signatures (no blank line followed by signature lines)")]
    NoSignatures,
    /// A signature line is not `— NAME BASE64` followed by a newline.
    #[error("signature line {line} is malformed")]
    MalformedSignature {
        /// Its 1-based position among the signature lines.
        line: usize,
    },
    /// The note has more than [`MAX_SIGNATURES`] signature lines.
    #[error("the note has more than {MAX_SIGNATURES} signatures")]
    TooManySignatures,
    /// The verifier key signed the note more than once.
    #[error("the note carries more than one signature by the verifier key")]
    DuplicateSignature,
    /// No signature line is by the verifier key (its name and key id).
    #[error("the note is not signed by {key}")]
    UnknownKey {
        /// The verifier key's name.
        key: String,
    },
    /// The verifier key's signature does not verify: the note or its signature was altered.
    #[error("the signature by {key} does not verify")]
    BadSignature {
        /// The verifier key's name.
        key: String,
    },
    /// The signed text is not a checkpoint body of this log.
    #[error("the checkpoint body is malformed: {0}")]
    MalformedBody(&'static str),
    /// The checkpoint's origin is not the verifier key's name.
    #[error("the checkpoint's origin {origin:?} is not the key name {key:?}")]
    OriginMismatch {
        /// The origin line.
        origin: String,
        /// The verifier key's name.
        key: String,
    },
    /// The origin cannot be a key name (empty, whitespace or `+`).
    #[error("origin {0:?} is empty or holds whitespace or '+'")]
    BadOrigin(String),
    /// The time cannot be written (years 0000 to 9999 only).
    #[error("the checkpoint time is outside the years 0000 to 9999")]
    TimeOutOfRange,
}

/// A checkpoint: the log had `size` entries, the last with hash `head`, at `time`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name, which is also the signing key's name.
    pub origin: String,
    /// Number of entries covered (entries 1 to `size`).
    pub size: u64,
    /// The hash of entry `size` (32 zero bytes if `size` is 0).
    pub head: [u8; 32],
    /// When the checkpoint was made (UTC, whole microseconds).
    pub time: OffsetDateTime,
}

impl Checkpoint {
    /// The signed text: `origin\nsize\nbase64(head)\ntime TIME\n`.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::BadOrigin`], [`CheckpointError::TimeOutOfRange`].
    pub fn body(&self) -> Result<String, CheckpointError> {
        check_name(&self.origin).map_err(|_| CheckpointError::BadOrigin(self.origin.clone()))?;
        let time = format_time(self.time).map_err(|_| CheckpointError::TimeOutOfRange)?;
        Ok(format!(
            "{}\n{}\n{}\ntime {time}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.head)
        ))
    }

    /// The signed note: the body, a blank line and `— ORIGIN BASE64(keyid || signature)`.
    ///
    /// # Errors
    ///
    /// Those of [`Checkpoint::body`].
    pub fn sign(&self, key: &AuditKey) -> Result<String, CheckpointError> {
        let body = self.body()?;
        let id = crate::key::key_id(&self.origin, &key.public_key());
        let mut blob = Vec::with_capacity(68);
        blob.extend_from_slice(&id);
        blob.extend_from_slice(&key.sign(body.as_bytes()));
        Ok(format!(
            "{body}\n\u{2014} {} {}\n",
            self.origin,
            STANDARD.encode(blob)
        ))
    }

    /// Verifies `note`'s signature by `key` and parses the checkpoint it carries.
    ///
    /// # Errors
    ///
    /// Every [`CheckpointError`] except [`CheckpointError::BadOrigin`] and
    /// [`CheckpointError::TimeOutOfRange`].
    pub fn open(note: &str, key: &VerifierKey) -> Result<Self, CheckpointError> {
        let body = open_note(note, key)?;
        let cp = parse_body(body)?;
        if cp.origin != key.name() {
            return Err(CheckpointError::OriginMismatch {
                origin: cp.origin,
                key: key.name().to_owned(),
            });
        }
        Ok(cp)
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} size {} head {}",
            self.origin,
            self.size,
            hex::encode(self.head)
        )?;
        if let Ok(t) = format_time(self.time) {
            write!(f, " at {t}")?;
        }
        Ok(())
    }
}

/// Checks `note`'s signature by `key`; returns the signed text.
fn open_note<'a>(note: &'a str, key: &VerifierKey) -> Result<&'a str, CheckpointError> {
    if note.len() > MAX_NOTE {
        return Err(CheckpointError::TooLong);
    }
    let split = note.rfind("\n\n").ok_or(CheckpointError::NoSignatures)?;
    let (text, sigs) = (&note[..=split], &note[split + 2..]);
    if sigs.is_empty() {
        return Err(CheckpointError::NoSignatures);
    }
    let sigs = sigs
        .strip_suffix('\n')
        .ok_or(CheckpointError::MalformedSignature { line: 1 })?;
    let mut ours = None;
    for (i, line) in sigs.split('\n').enumerate() {
        if i >= MAX_SIGNATURES {
            return Err(CheckpointError::TooManySignatures);
        }
        let malformed = CheckpointError::MalformedSignature { line: i + 1 };
        let rest = line.strip_prefix("\u{2014} ").ok_or(malformed.clone())?;
        let (name, b64) = rest.split_once(' ').ok_or(malformed.clone())?;
        if check_name(name).is_err() {
            return Err(malformed);
        }
        let blob = STANDARD.decode(b64).map_err(|_| malformed.clone())?;
        if blob.len() < 5 {
            return Err(malformed);
        }
        let (id, sig) = blob.split_at(4);
        if name == key.name() && id == key.key_id() {
            if ours.is_some() {
                return Err(CheckpointError::DuplicateSignature);
            }
            ours = Some(sig.to_vec());
        }
    }
    let sig = ours.ok_or_else(|| CheckpointError::UnknownKey {
        key: key.name().to_owned(),
    })?;
    if sig.len() != 64 || !key.verify(text.as_bytes(), &sig) {
        return Err(CheckpointError::BadSignature {
            key: key.name().to_owned(),
        });
    }
    Ok(text)
}

fn parse_body(body: &str) -> Result<Checkpoint, CheckpointError> {
    let bad = CheckpointError::MalformedBody;
    let lines: Vec<&str> = body
        .strip_suffix('\n')
        .ok_or(bad("no final newline"))?
        .split('\n')
        .collect();
    let [origin, size, head, time] = lines[..] else {
        return Err(bad("not exactly four lines (origin, size, hash, time)"));
    };
    if origin.is_empty() {
        return Err(bad("empty origin"));
    }
    if size.is_empty()
        || !size.bytes().all(|b| b.is_ascii_digit())
        || (size.len() > 1 && size.starts_with('0'))
    {
        return Err(bad("size is not a decimal number without leading zeros"));
    }
    let size: u64 = size.parse().map_err(|_| bad("size is too large"))?;
    let head: [u8; 32] = STANDARD
        .decode(head)
        .ok()
        .and_then(|h| h.try_into().ok())
        .ok_or(bad("hash is not the base64 of 32 bytes"))?;
    let time = time
        .strip_prefix("time ")
        .ok_or(bad("fourth line is not 'time TIME'"))?;
    let time = parse_time(time).map_err(|_| bad("time is not in the log's RFC 3339 form"))?;
    Ok(Checkpoint {
        origin: origin.to_owned(),
        size,
        head,
        time: normalize_time(time).map_err(|_| bad("time out of range"))?,
    })
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::key::tests::{PETER_VKEY, peter};

    #[test]
    fn go_note_vector_signature_is_reproduced() {
        // golang.org/x/mod/sumdb/note: Ed25519 is deterministic, so signing the example text
        // with the example key gives the published signature.
        let key = peter();
        let v = VerifierKey::parse(PETER_VKEY).unwrap();
        let text = "If you think cryptography is the answer to your problem,\n\
                    then you don't know what your problem is.\n";
        let mut blob = v.key_id().to_vec();
        blob.extend_from_slice(&key.sign(text.as_bytes()));
        assert_eq!(
            STANDARD.encode(blob),
            "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
        );
        let note = format!(
            "{text}\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
        );
        assert_eq!(open_note(&note, &v).unwrap(), text);
    }

    #[test]
    fn the_documented_example_checkpoint_holds() {
        let doc = include_str!("../../../docs/audit-format.md");
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        let key = AuditKey::from_seed(&seed).unwrap();
        let v = key.verifier("gridward.example/audit").unwrap();
        let vkey = "gridward.example/audit+54b03272+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4";
        assert_eq!(v.to_string(), vkey);
        assert!(doc.contains(vkey));
        let cp = Checkpoint {
            origin: "gridward.example/audit".into(),
            size: 1,
            head: hex::decode("8cd095dfba702fe2e612625e2b5c1ca01904d4219b2074c8ff2a806554622ec0")
                .unwrap()
                .try_into()
                .unwrap(),
            time: datetime!(2026-03-01 12:00:05 UTC),
        };
        let note = cp.sign(&key).unwrap();
        assert!(doc.contains(&format!("```\n{note}```")), "{note}");
        assert_eq!(
            Checkpoint::open(&note, &VerifierKey::parse(vkey).unwrap()).unwrap(),
            cp
        );
    }

    fn sample() -> (AuditKey, VerifierKey, Checkpoint) {
        let key = peter();
        let v = key.verifier("gridward.test/audit").unwrap();
        let cp = Checkpoint {
            origin: "gridward.test/audit".into(),
            size: 20,
            head: [0xab; 32],
            time: datetime!(2026-03-01 12:00:00.5 UTC),
        };
        (key, v, cp)
    }

    #[test]
    fn sign_and_open_round_trip() {
        let (key, v, cp) = sample();
        let note = cp.sign(&key).unwrap();
        assert!(note.starts_with(
            "gridward.test/audit\n20\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\ntime 2026-03-01T12:00:00.500000Z\n\n\u{2014} gridward.test/audit "
        ));
        assert_eq!(Checkpoint::open(&note, &v).unwrap(), cp);
        // A witness's cosignature after ours is ignored.
        let other = AuditKey::generate().unwrap();
        let extra = cp.sign(&other).unwrap();
        let cosig = extra
            .rsplit_once("\n\n")
            .unwrap()
            .1
            .replace("gridward.test/audit", "witness.example");
        let cosigned = format!("{note}{cosig}");
        assert_eq!(Checkpoint::open(&cosigned, &v).unwrap(), cp);
    }

    #[test]
    fn every_open_error_path() {
        let (key, v, cp) = sample();
        let note = cp.sign(&key).unwrap();
        let (body, sig_line) = note.rsplit_once("\n\n").unwrap();
        let body = format!("{body}\n");
        let resign = |body: &str| {
            let id = crate::key::key_id("gridward.test/audit", &key.public_key());
            let mut blob = id.to_vec();
            blob.extend_from_slice(&key.sign(body.as_bytes()));
            format!(
                "{body}\n\u{2014} gridward.test/audit {}\n",
                STANDARD.encode(blob)
            )
        };
        let open = |n: &str| Checkpoint::open(n, &v);

        assert_eq!(
            open(&"x".repeat(MAX_NOTE + 1)),
            Err(CheckpointError::TooLong)
        );
        assert_eq!(open(&body), Err(CheckpointError::NoSignatures));
        assert_eq!(
            open(&format!("{body}\n")),
            Err(CheckpointError::NoSignatures)
        );
        assert_eq!(
            open(note.trim_end_matches('\n')),
            Err(CheckpointError::MalformedSignature { line: 1 })
        );
        assert_eq!(
            open(&note.replace('\u{2014}', "-")),
            Err(CheckpointError::MalformedSignature { line: 1 })
        );
        assert_eq!(
            open(&format!("{note}\u{2014} nospace\n")),
            Err(CheckpointError::MalformedSignature { line: 2 })
        );
        assert_eq!(
            open(&format!("{note}\u{2014} w !!notbase64\n")),
            Err(CheckpointError::MalformedSignature { line: 2 })
        );
        assert_eq!(
            open(&format!("{note}\u{2014} w AAAA\n")),
            Err(CheckpointError::MalformedSignature { line: 2 })
        );
        let many = format!("{note}{}", "\u{2014} w AAAAAAA=\n".repeat(MAX_SIGNATURES));
        assert_eq!(open(&many), Err(CheckpointError::TooManySignatures));
        assert_eq!(
            open(&format!("{note}{sig_line}")),
            Err(CheckpointError::DuplicateSignature)
        );
        let stranger = AuditKey::generate()
            .unwrap()
            .verifier("gridward.test/audit")
            .unwrap();
        assert_eq!(
            Checkpoint::open(&note, &stranger),
            Err(CheckpointError::UnknownKey {
                key: "gridward.test/audit".into()
            })
        );
        let bad_sig = CheckpointError::BadSignature {
            key: "gridward.test/audit".into(),
        };
        assert_eq!(
            open(&note.replacen("\n20\n", "\n21\n", 1)),
            Err(bad_sig.clone())
        );
        // A signature blob of the right key id but wrong length.
        let mut short = v.key_id().to_vec();
        short.extend_from_slice(&[0; 10]);
        let short_note = format!(
            "{body}\n\u{2014} gridward.test/audit {}\n",
            STANDARD.encode(short)
        );
        assert_eq!(open(&short_note), Err(bad_sig));

        let malformed = |b: &str| match open(&resign(b)) {
            Err(CheckpointError::MalformedBody(_)) => {}
            other => panic!("{b:?}: {other:?}"),
        };
        malformed("gridward.test/audit\n20\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\n");
        malformed(
            "gridward.test/audit\n20\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\ntime 2026-03-01T12:00:00.500000Z\nextra\n",
        );
        malformed(
            "gridward.test/audit\n020\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\ntime 2026-03-01T12:00:00.500000Z\n",
        );
        malformed(
            "gridward.test/audit\n-1\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\ntime 2026-03-01T12:00:00.500000Z\n",
        );
        malformed(
            "gridward.test/audit\n99999999999999999999\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\ntime 2026-03-01T12:00:00.500000Z\n",
        );
        malformed(
            "gridward.test/audit\n20\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urqw==\ntime 2026-03-01T12:00:00.500000Z\n",
        );
        malformed(
            "gridward.test/audit\n20\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\nwhen 2026-03-01T12:00:00.500000Z\n",
        );
        malformed(
            "gridward.test/audit\n20\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\ntime 2026-03-01T12:00:00Z\n",
        );
        malformed(
            "\n20\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\ntime 2026-03-01T12:00:00.500000Z\n",
        );
        assert_eq!(
            open(&resign(
                "other.origin\n20\nq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s=\ntime 2026-03-01T12:00:00.500000Z\n"
            )),
            Err(CheckpointError::OriginMismatch {
                origin: "other.origin".into(),
                key: "gridward.test/audit".into()
            })
        );
    }

    #[test]
    fn signing_refuses_bad_origins_and_times() {
        let (key, _, cp) = sample();
        for origin in ["", "a b", "a+b"] {
            let bad = Checkpoint {
                origin: origin.into(),
                ..cp.clone()
            };
            assert_eq!(
                bad.sign(&key),
                Err(CheckpointError::BadOrigin(origin.into()))
            );
        }
        let late = Checkpoint {
            time: datetime!(-0001-01-01 0:00 UTC),
            ..cp
        };
        assert_eq!(late.sign(&key), Err(CheckpointError::TimeOutOfRange));
    }
}
