//! Audit entries and their byte encoding (sans-IO).
//!
//! An [`Entry`] is hashed as `SHA-256(encode(entry))`, where the encoding is, in order
//! (see `docs/audit-format.md` for the byte-by-byte description and a test vector):
//!
//! ```text
//! field("gridward-audit-entry-v1")
//! seq                       u64, big-endian, 8 bytes
//! field(time)               RFC 3339 UTC, always 6 fractional digits: 2026-03-01T12:00:00.000000Z
//! field(actor)              user:NAME | cert:TEXT | system
//! field(action)
//! field(target)
//! field(outcome)            success | failure | denied
//! 0x00                      if there is no source address, or
//! 0x01 field(source)        if there is one
//! field(detail)
//! prev                      32 bytes: the hash of entry seq-1 (32 zero bytes for entry 1)
//!
//! field(s) = u32 big-endian byte length of s || the UTF-8 bytes of s
//! ```
//!
//! Times are truncated to whole microseconds and converted to UTC before they are stored, so
//! the text form stored in SQLite is exactly the one that is hashed.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use time::format_description::FormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

/// The first field of every encoded entry (domain separation and format version).
pub const ENTRY_TAG: &str = "gridward-audit-entry-v1";

/// `prev` of entry 1.
pub const GENESIS: [u8; 32] = [0; 32];

/// Longest `actor`, `action`, `target` or `source`, in bytes.
pub const MAX_FIELD: usize = 1024;

/// Longest `detail`, in bytes.
pub const MAX_DETAIL: usize = 16 * 1024;

/// The one time format of the log: RFC 3339, UTC, microseconds.
const TIME_FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Why an entry cannot be built, encoded or read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// A field that must not be empty is empty (`action`, an actor's name).
    #[error("{field} is empty")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// A field holds a control character (only `detail` may hold newlines and tabs).
    #[error("{field} contains a control character")]
    ControlCharacter {
        /// The field.
        field: &'static str,
    },
    /// A field is longer than allowed.
    #[error("{field} is longer than {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The limit.
        max: usize,
    },
    /// The action is not dotted lowercase words (`login.failure`).
    #[error("action {0:?} is not dotted lowercase words like login.failure")]
    BadAction(String),
    /// The actor text is not `user:NAME`, `cert:TEXT` or `system`.
    #[error("actor {0:?} is not user:NAME, cert:TEXT or system")]
    BadActor(String),
    /// The outcome text is not `success`, `failure` or `denied`.
    #[error("outcome {0:?} is not success, failure or denied")]
    BadOutcome(String),
    /// The time text is not in the log's format (`2026-03-01T12:00:00.000000Z`).
    #[error("time {0:?} is not RFC 3339 UTC with 6 fractional digits")]
    BadTime(String),
    /// The time cannot be written with a four-digit year.
    #[error("time is outside the years 0000 to 9999")]
    TimeOutOfRange,
    /// A stored hash or prev is not 32 bytes.
    #[error("{field} is {len} bytes, not 32")]
    BadHashLength {
        /// `hash` or `prev`.
        field: &'static str,
        /// Its length.
        len: usize,
    },
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Actor {
    /// A logged-in user (`user:NAME`).
    User(String),
    /// A client certificate (`cert:TEXT`, its subject or serial).
    Certificate(String),
    /// The head-end itself (`system`).
    System,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(name) => write!(f, "user:{name}"),
            Self::Certificate(text) => write!(f, "cert:{text}"),
            Self::System => f.write_str("system"),
        }
    }
}

impl FromStr for Actor {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EntryError::BadActor(s.to_owned());
        if s == "system" {
            Ok(Self::System)
        } else if let Some(name) = s.strip_prefix("user:") {
            (!name.is_empty())
                .then(|| Self::User(name.to_owned()))
                .ok_or_else(bad)
        } else if let Some(text) = s.strip_prefix("cert:") {
            (!text.is_empty())
                .then(|| Self::Certificate(text.to_owned()))
                .ok_or_else(bad)
        } else {
            Err(bad())
        }
    }
}

/// How the act ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It was done.
    Success,
    /// It was attempted and failed (wrong password, bad input, error).
    Failure,
    /// It was refused by policy (missing role, locked out).
    Denied,
}

impl Outcome {
    /// `success`, `failure` or `denied`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Denied => "denied",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "success" => Ok(Self::Success),
            "failure" => Ok(Self::Failure),
            "denied" => Ok(Self::Denied),
            _ => Err(EntryError::BadOutcome(s.to_owned())),
        }
    }
}

/// An entry to append; the log assigns `seq`, `prev` and `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// When it happened (stored in UTC, truncated to whole microseconds).
    pub time: OffsetDateTime,
    /// Who.
    pub actor: Actor,
    /// What, as dotted lowercase words: `login.failure`, `user.add`, `pki.issue`.
    pub action: String,
    /// To what (a user name, a meter id, a certificate serial); may be empty.
    pub target: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The peer's address, if the act came over the network.
    pub source: Option<String>,
    /// Free text; may be empty. Never put secrets here.
    pub detail: String,
}

impl NewEntry {
    /// An entry without source address or detail.
    pub fn new(
        time: OffsetDateTime,
        actor: Actor,
        action: impl Into<String>,
        target: impl Into<String>,
        outcome: Outcome,
    ) -> Self {
        Self {
            time,
            actor,
            action: action.into(),
            target: target.into(),
            outcome,
            source: None,
            detail: String::new(),
        }
    }

    /// With the peer's address.
    #[must_use]
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// With free text.
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// Checks the fields and returns the entry with its time normalised (UTC, microseconds).
    ///
    /// # Errors
    ///
    /// [`EntryError::Empty`], [`EntryError::ControlCharacter`], [`EntryError::TooLong`],
    /// [`EntryError::BadAction`], [`EntryError::TimeOutOfRange`].
    pub fn validated(&self) -> Result<Self, EntryError> {
        let time = normalize_time(self.time)?;
        format_time(time)?;
        match &self.actor {
            Actor::User(name) | Actor::Certificate(name) => {
                if name.is_empty() {
                    return Err(EntryError::Empty { field: "actor" });
                }
                check_text("actor", name, MAX_FIELD, false)?;
            }
            Actor::System => {}
        }
        check_action(&self.action)?;
        check_text("target", &self.target, MAX_FIELD, false)?;
        if let Some(source) = &self.source {
            check_text("source", source, MAX_FIELD, false)?;
        }
        check_text("detail", &self.detail, MAX_DETAIL, true)?;
        Ok(Self {
            time,
            ..self.clone()
        })
    }
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When it happened (UTC, whole microseconds).
    pub time: OffsetDateTime,
    /// Who.
    pub actor: Actor,
    /// What.
    pub action: String,
    /// To what; may be empty.
    pub target: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The peer's address.
    pub source: Option<String>,
    /// Free text; may be empty.
    pub detail: String,
    /// The hash of entry `seq - 1` ([`GENESIS`] for entry 1).
    pub prev: [u8; 32],
    /// The hash of this entry, as stored.
    pub hash: [u8; 32],
}

impl Entry {
    /// Builds entry `seq` from a (validated) new entry chained to `prev`, computing its hash.
    ///
    /// # Errors
    ///
    /// Those of [`NewEntry::validated`].
    pub fn seal(seq: u64, new: &NewEntry, prev: [u8; 32]) -> Result<Self, EntryError> {
        let new = new.validated()?;
        let mut entry = Self {
            seq,
            time: new.time,
            actor: new.actor,
            action: new.action,
            target: new.target,
            outcome: new.outcome,
            source: new.source,
            detail: new.detail,
            prev,
            hash: [0; 32],
        };
        entry.hash = entry.compute_hash()?;
        Ok(entry)
    }

    /// The encoding that is hashed (see the module documentation).
    ///
    /// # Errors
    ///
    /// [`EntryError::TimeOutOfRange`], or [`EntryError::TooLong`] for a field of 4 GiB or more.
    pub fn encode(&self) -> Result<Vec<u8>, EntryError> {
        let time = format_time(self.time)?;
        let actor = self.actor.to_string();
        encode_parts(&Parts {
            seq: self.seq,
            time: &time,
            actor: &actor,
            action: &self.action,
            target: &self.target,
            outcome: self.outcome.as_str(),
            source: self.source.as_deref(),
            detail: &self.detail,
            prev: &self.prev,
        })
    }

    /// SHA-256 of [`Entry::encode`]: what `hash` must be.
    ///
    /// # Errors
    ///
    /// Those of [`Entry::encode`].
    pub fn compute_hash(&self) -> Result<[u8; 32], EntryError> {
        Ok(Sha256::digest(self.encode()?).into())
    }

    /// Whether the stored fields hash to the stored hash.
    pub fn hash_ok(&self) -> bool {
        self.compute_hash().is_ok_and(|h| h == self.hash)
    }
}

/// The text fields of an entry as they are encoded.
struct Parts<'a> {
    seq: u64,
    time: &'a str,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    outcome: &'a str,
    source: Option<&'a str>,
    detail: &'a str,
    prev: &'a [u8; 32],
}

fn encode_parts(p: &Parts<'_>) -> Result<Vec<u8>, EntryError> {
    let mut out = Vec::with_capacity(
        64 + p.time.len() + p.actor.len() + p.action.len() + p.target.len() + p.detail.len(),
    );
    field(&mut out, "tag", ENTRY_TAG)?;
    out.extend_from_slice(&p.seq.to_be_bytes());
    field(&mut out, "time", p.time)?;
    field(&mut out, "actor", p.actor)?;
    field(&mut out, "action", p.action)?;
    field(&mut out, "target", p.target)?;
    field(&mut out, "outcome", p.outcome)?;
    match p.source {
        None => out.push(0),
        Some(source) => {
            out.push(1);
            field(&mut out, "source", source)?;
        }
    }
    field(&mut out, "detail", p.detail)?;
    out.extend_from_slice(p.prev);
    Ok(out)
}

fn field(out: &mut Vec<u8>, name: &'static str, s: &str) -> Result<(), EntryError> {
    let len = u32::try_from(s.len()).map_err(|_| EntryError::TooLong {
        field: name,
        max: u32::MAX as usize,
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn check_text(field: &'static str, s: &str, max: usize, multiline: bool) -> Result<(), EntryError> {
    if s.len() > max {
        return Err(EntryError::TooLong { field, max });
    }
    if s.chars()
        .any(|c| c.is_control() && !(multiline && (c == '\n' || c == '\t')))
    {
        return Err(EntryError::ControlCharacter { field });
    }
    Ok(())
}

fn check_action(action: &str) -> Result<(), EntryError> {
    if action.is_empty() {
        return Err(EntryError::Empty { field: "action" });
    }
    if action.len() > MAX_FIELD {
        return Err(EntryError::TooLong {
            field: "action",
            max: MAX_FIELD,
        });
    }
    let word_ok = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    if action.split('.').all(word_ok) {
        Ok(())
    } else {
        Err(EntryError::BadAction(action.to_owned()))
    }
}

/// `time` in UTC, truncated to whole microseconds.
///
/// # Errors
///
/// [`EntryError::TimeOutOfRange`].
pub fn normalize_time(time: OffsetDateTime) -> Result<OffsetDateTime, EntryError> {
    let utc = time
        .checked_to_offset(UtcOffset::UTC)
        .ok_or(EntryError::TimeOutOfRange)?;
    utc.replace_nanosecond(utc.nanosecond() / 1000 * 1000)
        .map_err(|_| EntryError::TimeOutOfRange)
}

/// The log's text form of `time` (which must be UTC; see [`normalize_time`]):
/// `2026-03-01T12:00:00.000000Z`.
///
/// # Errors
///
/// [`EntryError::TimeOutOfRange`].
pub fn format_time(time: OffsetDateTime) -> Result<String, EntryError> {
    let utc = normalize_time(time)?;
    if !(0..=9999).contains(&utc.year()) {
        return Err(EntryError::TimeOutOfRange);
    }
    utc.format(TIME_FORMAT)
        .map_err(|_| EntryError::TimeOutOfRange)
}

/// Parses the log's text form of a time; anything else (another offset, other precision) is
/// refused, so that a parsed time formats back to the same text.
///
/// # Errors
///
/// [`EntryError::BadTime`].
pub fn parse_time(s: &str) -> Result<OffsetDateTime, EntryError> {
    let bad = || EntryError::BadTime(s.to_owned());
    let t = time::PrimitiveDateTime::parse(s, TIME_FORMAT)
        .map_err(|_| bad())?
        .assume_utc();
    if format_time(t).ok().as_deref() == Some(s) {
        Ok(t)
    } else {
        Err(bad())
    }
}

/// Converts a stored hash or prev to 32 bytes.
///
/// # Errors
///
/// [`EntryError::BadHashLength`].
pub fn hash_from_slice(field: &'static str, bytes: &[u8]) -> Result<[u8; 32], EntryError> {
    bytes.try_into().map_err(|_| EntryError::BadHashLength {
        field,
        len: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    /// The test vector of `docs/audit-format.md`.
    fn vector_entry() -> Entry {
        Entry::seal(
            1,
            &NewEntry::new(
                datetime!(2026-03-01 12:00:00.123456789 UTC),
                Actor::User("alice".into()),
                "login.failure",
                "alice",
                Outcome::Failure,
            )
            .source("192.0.2.7")
            .detail("bad password"),
            GENESIS,
        )
        .unwrap()
    }

    #[test]
    fn the_documented_test_vector_holds() {
        let e = vector_entry();
        let encoded = e.encode().unwrap();
        let doc = include_str!("../../../docs/audit-format.md");
        let hex_block = doc
            .split("<!-- vector-encoding -->")
            .nth(1)
            .and_then(|s| s.split("```").nth(1))
            .unwrap();
        let doc_hex: String = hex_block.chars().filter(char::is_ascii_hexdigit).collect();
        assert_eq!(hex::encode(&encoded), doc_hex);
        let doc_hash = doc
            .split("<!-- vector-hash -->")
            .nth(1)
            .and_then(|s| s.split('`').nth(1))
            .unwrap();
        assert_eq!(hex::encode(e.hash), doc_hash);
        assert_eq!(format_time(e.time).unwrap(), "2026-03-01T12:00:00.123456Z");
    }

    #[test]
    fn encoding_is_exact() {
        let e = vector_entry();
        let enc = e.encode().unwrap();
        let mut want = Vec::new();
        let f = |v: &mut Vec<u8>, s: &str| {
            v.extend_from_slice(&(s.len() as u32).to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        };
        f(&mut want, "gridward-audit-entry-v1");
        want.extend_from_slice(&1u64.to_be_bytes());
        f(&mut want, "2026-03-01T12:00:00.123456Z");
        f(&mut want, "user:alice");
        f(&mut want, "login.failure");
        f(&mut want, "alice");
        f(&mut want, "failure");
        want.push(1);
        f(&mut want, "192.0.2.7");
        f(&mut want, "bad password");
        want.extend_from_slice(&[0; 32]);
        assert_eq!(enc, want);
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&enc)), e.hash);
    }

    #[test]
    fn no_source_and_empty_source_differ() {
        let base = NewEntry::new(
            datetime!(2026-03-01 12:00 UTC),
            Actor::System,
            "config.reload",
            "",
            Outcome::Success,
        );
        let a = Entry::seal(1, &base, GENESIS).unwrap();
        let b = Entry::seal(1, &base.clone().source(""), GENESIS).unwrap();
        assert_ne!(a.hash, b.hash);
        assert!(a.hash_ok() && b.hash_ok());
    }

    #[test]
    fn actor_and_outcome_round_trip() {
        for a in [
            Actor::User("bob".into()),
            Actor::Certificate("CN=ops,serial=0a".into()),
            Actor::System,
        ] {
            assert_eq!(a.to_string().parse::<Actor>().unwrap(), a);
        }
        for bad in ["", "user:", "cert:", "root", "System", "user"] {
            assert_eq!(bad.parse::<Actor>(), Err(EntryError::BadActor(bad.into())));
        }
        for o in [Outcome::Success, Outcome::Failure, Outcome::Denied] {
            assert_eq!(o.as_str().parse::<Outcome>().unwrap(), o);
        }
        assert_eq!(
            "ok".parse::<Outcome>(),
            Err(EntryError::BadOutcome("ok".into()))
        );
    }

    #[test]
    fn times_are_normalised_and_parsed_strictly() {
        let t = datetime!(2026-03-01 13:00:00.9999999 +01:00);
        let n = normalize_time(t).unwrap();
        assert_eq!(format_time(n).unwrap(), "2026-03-01T12:00:00.999999Z");
        assert_eq!(parse_time("2026-03-01T12:00:00.999999Z").unwrap(), n);
        for bad in [
            "2026-03-01T12:00:00Z",
            "2026-03-01T12:00:00.999999+00:00",
            "2026-03-01T12:00:00.9999990Z",
            "2026-03-01 12:00:00.999999Z",
            "2026-02-30T12:00:00.000000Z",
        ] {
            assert_eq!(parse_time(bad), Err(EntryError::BadTime(bad.into())));
        }
        let far = datetime!(9999-12-31 23:59 -01:00);
        assert_eq!(format_time(far), Err(EntryError::TimeOutOfRange));
        let early = datetime!(-0001-01-01 0:00 UTC);
        assert_eq!(format_time(early), Err(EntryError::TimeOutOfRange));
    }

    #[test]
    fn bad_fields_are_refused() {
        let t = datetime!(2026-03-01 12:00 UTC);
        let new = |actor: Actor, action: &str| {
            NewEntry::new(t, actor, action, "x", Outcome::Success).validated()
        };
        assert_eq!(
            new(Actor::System, ""),
            Err(EntryError::Empty { field: "action" })
        );
        for bad in ["Login", "login.", ".login", "login..failure", "log in"] {
            assert_eq!(
                new(Actor::System, bad),
                Err(EntryError::BadAction(bad.into()))
            );
        }
        assert_eq!(
            new(Actor::User(String::new()), "a"),
            Err(EntryError::Empty { field: "actor" })
        );
        assert_eq!(
            new(Actor::User("a\u{1b}[31m".into()), "a"),
            Err(EntryError::ControlCharacter { field: "actor" })
        );
        let base = NewEntry::new(t, Actor::System, "a.b", "x", Outcome::Success);
        assert_eq!(
            base.clone().source("1.2.3.4\n").validated(),
            Err(EntryError::ControlCharacter { field: "source" })
        );
        assert_eq!(
            NewEntry {
                target: "t\0".into(),
                ..base.clone()
            }
            .validated(),
            Err(EntryError::ControlCharacter { field: "target" })
        );
        assert!(base.clone().detail("two\nlines\tok").validated().is_ok());
        assert_eq!(
            base.clone().detail("bell\u{7}").validated(),
            Err(EntryError::ControlCharacter { field: "detail" })
        );
        assert_eq!(
            base.clone().detail("x".repeat(MAX_DETAIL + 1)).validated(),
            Err(EntryError::TooLong {
                field: "detail",
                max: MAX_DETAIL
            })
        );
        assert_eq!(
            new(Actor::System, &"a".repeat(MAX_FIELD + 1)),
            Err(EntryError::TooLong {
                field: "action",
                max: MAX_FIELD
            })
        );
        assert_eq!(
            NewEntry {
                time: datetime!(-0001-01-01 0:00 UTC),
                ..base
            }
            .validated(),
            Err(EntryError::TimeOutOfRange)
        );
        assert_eq!(
            hash_from_slice("prev", &[0; 31]),
            Err(EntryError::BadHashLength {
                field: "prev",
                len: 31
            })
        );
    }
}
