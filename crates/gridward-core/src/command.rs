//! Commands from the head-end to a meter, and the meter's signed acknowledgement (sans-IO).
//!
//! A command is a tagged COSE_Sign1 (RFC 9052) signed by the head-end's *command key* (its own
//! certificate with the Gridward command-signing EKU, never a TLS key). The external AAD is the
//! command topic `meters/{id}/commands`, so a command published on another meter's topic fails.
//! The protected header carries `alg`, `kid` and the content type
//! [`CONTENT_TYPE`]; the payload is a CBOR map (see `docs/wire-format.md` §8).
//!
//! The meter decides with [`verify`]: signature by one of its pinned command signers (valid at
//! `now`), target = itself, counter strictly greater than the last executed, not expired, issued
//! not in the future, kind allowed. Each refusal is a [`Refusal`] with a stable code, which the
//! meter puts into its acknowledgement ([`CommandAck`], a document in the meter's own envelope
//! on its events topic), and which the head-end turns into a `command_refused` security event.

use std::fmt;
use std::str::FromStr;

use ciborium::Value;
use rand::RngCore;
use time::OffsetDateTime;

use crate::MeterId;
use crate::cose;
use crate::document::{self, DocumentError};
use crate::envelope::{SigningKey, VerifyingKey, hex_string};
use crate::firmware::MAX_MANIFEST_BYTES;

/// Payload key: the command id (bstr, 16 bytes).
const KEY_ID: &str = "id";
/// Payload key: the target meter (tstr).
const KEY_METER: &str = "meter";
/// Payload key: the kind (tstr, [`CommandKind::as_str`]).
const KEY_KIND: &str = "kind";
/// Payload key: the arguments (map).
const KEY_ARGS: &str = "args";
/// Payload key: the counter (uint).
const KEY_COUNTER: &str = "counter";
/// Payload key: issued at (int, seconds since the epoch).
const KEY_IAT: &str = "iat";
/// Payload key: expires at (int, seconds since the epoch).
const KEY_EXP: &str = "exp";
/// Argument key of `set_reporting_interval` (uint).
const ARG_SECONDS: &str = "seconds";
/// Argument key of `set_tariff` (tstr).
const ARG_TARIFF: &str = "tariff";
/// Argument key of `firmware_update` (bstr).
const ARG_MANIFEST: &str = "manifest";

/// Content type (COSE header 3) of a command.
pub const CONTENT_TYPE: &str = "application/vnd.gridward.command+cbor";

/// Largest encoded command accepted by [`verify`], in bytes (a firmware manifest fits).
pub const MAX_COMMAND_BYTES: usize = 8 * 1024;

/// Longest tariff name, in bytes.
pub const MAX_TARIFF_LEN: usize = 32;

/// Reporting interval bounds, in seconds.
pub const MIN_REPORTING_INTERVAL_SECS: u32 = 1;
/// Reporting interval bounds, in seconds (one week).
pub const MAX_REPORTING_INTERVAL_SECS: u32 = 7 * 24 * 3600;

/// Longest `Detail` in an acknowledgement, in characters.
pub const MAX_ACK_DETAIL_CHARS: usize = 200;

/// A command's id: 16 random bytes, shown as 32 lower-case hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandId(pub [u8; 16]);

impl CommandId {
    /// A fresh random id from the operating system's generator (which, as `rand`'s `OsRng`,
    /// panics only if the operating system cannot supply randomness at all).
    pub fn random() -> Self {
        let mut id = [0; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        Self(id)
    }

    /// The all-zero id, acknowledged for a command that did not decode.
    pub const UNKNOWN: CommandId = CommandId([0; 16]);
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_string(&self.0))
    }
}

impl FromStr for CommandId {
    type Err = CommandError;
    /// Exactly 32 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            CommandError::new(
                Refusal::Malformed,
                format!("command id {:?} is not 32 hex digits", cose::snippet(s)),
            )
        };
        let bytes = s.as_bytes();
        if bytes.len() != 32 {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (out, pair) in id.iter_mut().zip(bytes.chunks_exact(2)) {
            let hi = hex_digit(pair[0]).ok_or_else(bad)?;
            let lo = hex_digit(pair[1]).ok_or_else(bad)?;
            *out = hi << 4 | lo;
        }
        Ok(Self(id))
    }
}

/// The value of one hex digit (either case).
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// What a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CommandKind {
    /// Open the supply relay.
    Disconnect,
    /// Close the supply relay.
    Reconnect,
    /// Change how often the meter reports.
    SetReportingInterval,
    /// Switch the active tariff.
    SetTariff,
    /// Send a reading now.
    ReadNow,
    /// Install firmware described by a manufacturer-signed manifest.
    FirmwareUpdate,
}

impl CommandKind {
    /// Every kind.
    pub const ALL: [CommandKind; 6] = [
        Self::Disconnect,
        Self::Reconnect,
        Self::SetReportingInterval,
        Self::SetTariff,
        Self::ReadNow,
        Self::FirmwareUpdate,
    ];

    /// `disconnect`, `reconnect`, `set_reporting_interval`, `set_tariff`, `read_now`,
    /// `firmware_update`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disconnect => "disconnect",
            Self::Reconnect => "reconnect",
            Self::SetReportingInterval => "set_reporting_interval",
            Self::SetTariff => "set_tariff",
            Self::ReadNow => "read_now",
            Self::FirmwareUpdate => "firmware_update",
        }
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandKind {
    type Err = CommandError;
    /// Exactly one of the names of [`CommandKind::as_str`]; anything else is
    /// [`Refusal::Malformed`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                CommandError::new(
                    Refusal::Malformed,
                    format!("unknown command kind {:?}", cose::snippet(s)),
                )
            })
    }
}

/// A command's kind with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandBody {
    /// Open the relay.
    Disconnect,
    /// Close the relay.
    Reconnect,
    /// Report every `seconds` ([`MIN_REPORTING_INTERVAL_SECS`]..=[`MAX_REPORTING_INTERVAL_SECS`]).
    SetReportingInterval {
        /// The new interval.
        seconds: u32,
    },
    /// Switch to tariff `tariff` (1..=[`MAX_TARIFF_LEN`] bytes of `[A-Za-z0-9_.-]`).
    SetTariff {
        /// The tariff's name.
        tariff: String,
    },
    /// Send a reading now.
    ReadNow,
    /// Install the firmware of `manifest` (a manufacturer-signed COSE_Sign1, see
    /// [`crate::firmware`]); the image follows in [`crate::firmware::Chunk`]s on
    /// `meters/{id}/firmware`.
    FirmwareUpdate {
        /// The signed manifest, as the manufacturer produced it.
        manifest: Vec<u8>,
    },
}

impl CommandBody {
    /// The kind.
    pub fn kind(&self) -> CommandKind {
        match self {
            Self::Disconnect => CommandKind::Disconnect,
            Self::Reconnect => CommandKind::Reconnect,
            Self::SetReportingInterval { .. } => CommandKind::SetReportingInterval,
            Self::SetTariff { .. } => CommandKind::SetTariff,
            Self::ReadNow => CommandKind::ReadNow,
            Self::FirmwareUpdate { .. } => CommandKind::FirmwareUpdate,
        }
    }

    /// Checks the arguments' bounds (what [`verify`] and [`sign`] check): the interval within
    /// its bounds, the tariff name's length and alphabet, the manifest 1..=
    /// [`MAX_MANIFEST_BYTES`] bytes (its signature is checked by the meter's firmware step,
    /// [`crate::firmware::verify_manifest`]).
    ///
    /// # Errors
    ///
    /// [`Refusal::InvalidArguments`] naming the argument.
    pub fn validate(&self) -> Result<(), CommandError> {
        let invalid = |detail: String| Err(CommandError::new(Refusal::InvalidArguments, detail));
        match self {
            Self::SetReportingInterval { seconds }
                if !(MIN_REPORTING_INTERVAL_SECS..=MAX_REPORTING_INTERVAL_SECS)
                    .contains(seconds) =>
            {
                invalid(format!(
                    "reporting interval {seconds} s is outside \
                     {MIN_REPORTING_INTERVAL_SECS}..={MAX_REPORTING_INTERVAL_SECS} s"
                ))
            }
            Self::SetTariff { tariff } if tariff.is_empty() || tariff.len() > MAX_TARIFF_LEN => {
                invalid(format!(
                    "tariff name is {} bytes; 1 to {MAX_TARIFF_LEN} are allowed",
                    tariff.len()
                ))
            }
            Self::SetTariff { tariff }
                if !tariff
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) =>
            {
                invalid(format!(
                    "tariff name {:?} has characters outside A-Z a-z 0-9 _ . -",
                    cose::snippet(tariff)
                ))
            }
            Self::FirmwareUpdate { manifest }
                if manifest.is_empty() || manifest.len() > MAX_MANIFEST_BYTES =>
            {
                invalid(format!(
                    "firmware manifest is {} bytes; 1 to {MAX_MANIFEST_BYTES} are allowed",
                    manifest.len()
                ))
            }
            _ => Ok(()),
        }
    }

    /// The CBOR `args` map of this body.
    fn args(&self) -> Value {
        let arg = |k: &str, v| Value::Map(vec![(Value::Text(k.to_owned()), v)]);
        match self {
            Self::Disconnect | Self::Reconnect | Self::ReadNow => Value::Map(vec![]),
            Self::SetReportingInterval { seconds } => {
                arg(ARG_SECONDS, Value::Integer((*seconds).into()))
            }
            Self::SetTariff { tariff } => arg(ARG_TARIFF, Value::Text(tariff.clone())),
            Self::FirmwareUpdate { manifest } => arg(ARG_MANIFEST, Value::Bytes(manifest.clone())),
        }
    }

    /// The body of kind `kind` from its CBOR `args` map; bounds are checked by
    /// [`Self::validate`].
    fn from_args(kind: CommandKind, args: Value) -> Result<Self, CommandError> {
        let malformed = |d: String| CommandError::new(Refusal::Malformed, d);
        let mut args = cose::text_map(args, "args").map_err(malformed)?;
        let mut required = |key: &str| {
            cose::take(&mut args, key)
                .ok_or_else(|| malformed(format!("{kind} needs the argument {key:?}")))
        };
        let body = match kind {
            CommandKind::Disconnect => Self::Disconnect,
            CommandKind::Reconnect => Self::Reconnect,
            CommandKind::ReadNow => Self::ReadNow,
            CommandKind::SetReportingInterval => {
                let v = required(ARG_SECONDS)?;
                let n = v.as_integer().ok_or_else(|| {
                    malformed(format!("argument {ARG_SECONDS:?} is not an integer"))
                })?;
                let seconds = u32::try_from(n).map_err(|_| {
                    CommandError::new(
                        Refusal::InvalidArguments,
                        format!(
                            "reporting interval {} s is outside \
                             {MIN_REPORTING_INTERVAL_SECS}..={MAX_REPORTING_INTERVAL_SECS} s",
                            i128::from(n)
                        ),
                    )
                })?;
                Self::SetReportingInterval { seconds }
            }
            CommandKind::SetTariff => Self::SetTariff {
                tariff: cose::text(required(ARG_TARIFF)?, "argument \"tariff\"")
                    .map_err(malformed)?,
            },
            CommandKind::FirmwareUpdate => match required(ARG_MANIFEST)? {
                Value::Bytes(manifest) => Self::FirmwareUpdate { manifest },
                _ => {
                    return Err(malformed(format!(
                        "argument {ARG_MANIFEST:?} is not a byte string"
                    )));
                }
            },
        };
        cose::no_other_keys(&args, &format!("args of {kind}")).map_err(malformed)?;
        Ok(body)
    }
}

/// A command, before signing or after verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Unique id.
    pub id: CommandId,
    /// The target meter.
    pub meter_id: MeterId,
    /// What to do.
    pub body: CommandBody,
    /// Per-meter command counter, strictly increasing; persisted by the head-end before sending.
    pub counter: u64,
    /// When the head-end signed it (whole seconds, UTC).
    pub issued_at: OffsetDateTime,
    /// After this instant the meter refuses it, and the head-end no longer sends it.
    pub expires_at: OffsetDateTime,
}

/// Signs `cmd` with the head-end's command key into a tagged COSE_Sign1 whose external AAD is
/// `meters/{id}/commands`.
///
/// # Errors
///
/// [`CommandError`] with [`Refusal::InvalidArguments`] if the body does not validate or
/// `expires_at <= issued_at`; [`Refusal::Malformed`] if encoding or signing fails.
///
/// `issued_at` and `expires_at` are signed in whole seconds: sub-second parts are dropped.
pub fn sign(key: &SigningKey, cmd: &Command) -> Result<Vec<u8>, CommandError> {
    cmd.body.validate()?;
    let (iat, exp) = (
        cmd.issued_at.unix_timestamp(),
        cmd.expires_at.unix_timestamp(),
    );
    if exp <= iat {
        return Err(CommandError::new(
            Refusal::InvalidArguments,
            format!("expiry {exp} is not after issue time {iat} (seconds since the epoch)"),
        ));
    }
    let payload = to_payload(cmd);
    let malformed = |d: String| CommandError::new(Refusal::Malformed, d);
    let payload = cose::encode_cbor(&payload).map_err(malformed)?;
    let topic = cmd.meter_id.commands_topic();
    let signed = cose::sign(key, CONTENT_TYPE, topic.as_bytes(), payload)
        .map_err(|e| malformed(format!("signing failed: {e}")))?;
    if signed.len() > MAX_COMMAND_BYTES {
        return Err(malformed(format!(
            "the signed command is {} bytes; meters accept at most {MAX_COMMAND_BYTES}",
            signed.len()
        )));
    }
    Ok(signed)
}

/// The CBOR payload map of `cmd` (times in whole seconds).
fn to_payload(cmd: &Command) -> Value {
    let text = |s: &str| Value::Text(s.to_owned());
    Value::Map(vec![
        (text(KEY_ID), Value::Bytes(cmd.id.0.to_vec())),
        (text(KEY_METER), text(cmd.meter_id.as_str())),
        (text(KEY_KIND), text(cmd.body.kind().as_str())),
        (text(KEY_ARGS), cmd.body.args()),
        (text(KEY_COUNTER), Value::Integer(cmd.counter.into())),
        (
            text(KEY_IAT),
            Value::Integer(cmd.issued_at.unix_timestamp().into()),
        ),
        (
            text(KEY_EXP),
            Value::Integer(cmd.expires_at.unix_timestamp().into()),
        ),
    ])
}

/// A command signer a meter trusts: the public key of a pinned command-signer certificate and
/// that certificate's validity window. Several may be pinned at once (rotation: the new signer is
/// pinned before the old one is retired).
#[derive(Debug, Clone)]
pub struct TrustedSigner {
    /// The signer's key.
    pub key: VerifyingKey,
    /// Certificate notBefore.
    pub not_before: OffsetDateTime,
    /// Certificate notAfter.
    pub not_after: OffsetDateTime,
}

/// What the meter knows when a command arrives.
#[derive(Debug, Clone, Copy)]
pub struct VerifyContext<'a> {
    /// The meter itself.
    pub meter_id: &'a MeterId,
    /// The topic the command arrived on (the external AAD).
    pub topic: &'a str,
    /// The pinned command signers.
    pub signers: &'a [TrustedSigner],
    /// The counter of the last command executed (or refused after a valid signature), if any.
    pub last_counter: Option<u64>,
    /// The meter's clock.
    pub now: OffsetDateTime,
    /// Kinds the meter executes.
    pub allowed: &'a [CommandKind],
    /// Tolerated clock skew for `issued_at` in the future, in seconds.
    pub max_skew_secs: i64,
}

/// A command whose signature, target, counter and time were checked; only [`verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCommand {
    command: Command,
}

impl VerifiedCommand {
    /// The command.
    pub fn command(&self) -> &Command {
        &self.command
    }

    /// Takes the command out.
    pub fn into_command(self) -> Command {
        self.command
    }
}

/// Decodes and checks a command received by the meter `ctx.meter_id`.
///
/// Order: size, structure and header (`Malformed`), key id among the signers (`UnknownSigner`),
/// signer valid at `now` (`SignerNotValid`), signature with the topic as AAD (`BadSignature`),
/// payload (`Malformed`, `InvalidArguments`), target (`WrongMeter`), counter (`CounterNotFresh`),
/// issued in the future (`NotYetValid`), expired (`Expired`), kind (`KindNotAllowed`).
///
/// # Errors
///
/// A [`CommandError`] naming the first failed check.
pub fn verify(bytes: &[u8], ctx: &VerifyContext<'_>) -> Result<VerifiedCommand, CommandError> {
    let fail = |reason, detail: String| Err(CommandError::new(reason, detail));
    let signed = cose::decode(bytes, MAX_COMMAND_BYTES, CONTENT_TYPE)
        .map_err(|d| CommandError::new(Refusal::Malformed, format!("command: {d}")))?;
    let kid = hex_string(&signed.kid);
    let pinned: Vec<&TrustedSigner> = ctx
        .signers
        .iter()
        .filter(|s| s.key.kid() == signed.kid.as_slice())
        .collect();
    if pinned.is_empty() {
        return fail(
            Refusal::UnknownSigner,
            format!(
                "key id {kid} is not one of the {} pinned command signers \
                 (signed by another key: a meter, TLS or unknown key)",
                ctx.signers.len()
            ),
        );
    }
    let valid: Vec<&TrustedSigner> = pinned
        .iter()
        .copied()
        .filter(|s| s.not_before <= ctx.now && ctx.now <= s.not_after)
        .collect();
    let Some(first) = valid.first() else {
        let windows: Vec<String> = pinned
            .iter()
            .map(|s| {
                format!(
                    "{} to {}",
                    document::format_timestamp(s.not_before),
                    document::format_timestamp(s.not_after)
                )
            })
            .collect();
        return fail(
            Refusal::SignerNotValid,
            format!(
                "command signer {kid} is valid {}, not at {}: pin its successor",
                windows.join(", "),
                document::format_timestamp(ctx.now)
            ),
        );
    };
    if !valid
        .iter()
        .any(|s| signed.verifies(&s.key, ctx.topic.as_bytes()))
    {
        let detail = if signed.alg == first.key.algorithm() {
            format!(
                "signature does not verify over topic {:?} (changed bytes, or a command for another topic)",
                cose::snippet(ctx.topic)
            )
        } else {
            format!(
                "command names algorithm {}, the signer's key is {}",
                signed.alg,
                first.key.algorithm()
            )
        };
        return fail(Refusal::BadSignature, detail);
    }
    let command = decode_payload(signed.payload())?;
    command.body.validate()?;
    if command.expires_at <= command.issued_at {
        return fail(
            Refusal::InvalidArguments,
            format!(
                "expiry {} is not after issue time {}",
                document::format_timestamp(command.expires_at),
                document::format_timestamp(command.issued_at)
            ),
        );
    }
    if &command.meter_id != ctx.meter_id {
        return fail(
            Refusal::WrongMeter,
            format!(
                "command is for meter {}, this is meter {}",
                command.meter_id, ctx.meter_id
            ),
        );
    }
    if let Some(last) = ctx.last_counter.filter(|l| command.counter <= *l) {
        return fail(
            Refusal::CounterNotFresh,
            format!(
                "counter {} is not greater than the last executed {last} (a replay or a lowered counter)",
                command.counter
            ),
        );
    }
    let latest = ctx
        .now
        .unix_timestamp()
        .saturating_add(ctx.max_skew_secs.max(0));
    if command.issued_at.unix_timestamp() > latest {
        return fail(
            Refusal::NotYetValid,
            format!(
                "issued at {}, more than {} s after the meter's clock {}: check the clocks",
                document::format_timestamp(command.issued_at),
                ctx.max_skew_secs.max(0),
                document::format_timestamp(ctx.now)
            ),
        );
    }
    if ctx.now >= command.expires_at {
        return fail(
            Refusal::Expired,
            format!(
                "expired at {} (now {})",
                document::format_timestamp(command.expires_at),
                document::format_timestamp(ctx.now)
            ),
        );
    }
    let kind = command.body.kind();
    if !ctx.allowed.contains(&kind) {
        return fail(
            Refusal::KindNotAllowed,
            format!("this meter does not execute {kind}"),
        );
    }
    Ok(VerifiedCommand { command })
}

/// Decodes the CBOR payload of a command (checks types and keys; not bounds).
fn decode_payload(bytes: &[u8]) -> Result<Command, CommandError> {
    let malformed = |d: String| CommandError::new(Refusal::Malformed, format!("payload: {d}"));
    let value = cose::decode_cbor(bytes).map_err(malformed)?;
    let mut entries = cose::text_map(value, "payload").map_err(malformed)?;
    let mut required = |key: &str| {
        cose::take(&mut entries, key).ok_or_else(|| malformed(format!("lacks {key:?}")))
    };
    let id = CommandId(cose::fixed_bytes(required(KEY_ID)?, KEY_ID).map_err(malformed)?);
    let meter = cose::text(required(KEY_METER)?, KEY_METER).map_err(malformed)?;
    let meter_id = MeterId::new(&meter).map_err(|e| malformed(format!("{KEY_METER:?}: {e}")))?;
    let kind = cose::text(required(KEY_KIND)?, KEY_KIND).map_err(malformed)?;
    let kind: CommandKind = kind
        .parse()
        .map_err(|e: CommandError| malformed(e.detail))?;
    let args = required(KEY_ARGS)?;
    let counter = cose::uint(&required(KEY_COUNTER)?, KEY_COUNTER).map_err(malformed)?;
    let time = |v: Value, key: &str| {
        let secs = cose::int(&v, key).map_err(malformed)?;
        OffsetDateTime::from_unix_timestamp(secs)
            .map_err(|_| malformed(format!("{key:?} {secs} is out of range")))
    };
    let issued_at = time(required(KEY_IAT)?, KEY_IAT)?;
    let expires_at = time(required(KEY_EXP)?, KEY_EXP)?;
    cose::no_other_keys(&entries, "payload").map_err(malformed)?;
    let body = CommandBody::from_args(kind, args)?;
    Ok(Command {
        id,
        meter_id,
        body,
        counter,
        issued_at,
        expires_at,
    })
}

/// Reads the id of a command *without* verifying it, for logging and for the meter's
/// acknowledgement of a command it refused; `None` if the structure or the payload's `id` does
/// not decode (acknowledge with [`CommandId::UNKNOWN`] then).
pub fn unverified_id(bytes: &[u8]) -> Option<CommandId> {
    if bytes.len() > MAX_COMMAND_BYTES {
        return None;
    }
    let sign1 = cose::decode_structure(bytes).ok()?;
    let value = cose::decode_cbor(sign1.payload.as_deref()?).ok()?;
    let mut entries = cose::text_map(value, "payload").ok()?;
    let id = cose::take(&mut entries, KEY_ID)?;
    cose::fixed_bytes(id, KEY_ID).ok().map(CommandId)
}

/// Why a meter refused a command. The code goes into the acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// Not a well-formed command (size, CBOR, header, payload fields).
    Malformed,
    /// Signed by a key that is not a pinned command signer (another key, a meter key, the TLS key).
    UnknownSigner,
    /// The signer's certificate is not valid now.
    SignerNotValid,
    /// The signature does not verify (changed byte, other topic).
    BadSignature,
    /// Addressed to another meter.
    WrongMeter,
    /// Counter not greater than the last executed: a replay or a lowered counter.
    CounterNotFresh,
    /// Past its expiry.
    Expired,
    /// Issued in the future beyond the tolerated skew.
    NotYetValid,
    /// The meter does not execute this kind.
    KindNotAllowed,
    /// Arguments out of bounds.
    InvalidArguments,
    /// Firmware refused: see [`crate::firmware::FirmwareError::refusal`] for the finer codes.
    FirmwareBadSignature,
    /// Firmware manifest for another vendor or device class.
    FirmwareWrongClass,
    /// Image digest or size differs from the manifest.
    FirmwareDigestMismatch,
    /// Sequence number not greater than the installed one (rollback).
    FirmwareRollback,
    /// Manifest expired.
    FirmwareExpired,
    /// Image incomplete (truncated transfer) when the transfer ended.
    FirmwareIncomplete,
    /// The new image did not confirm after reboot; the meter fell back to the other slot.
    FirmwareNotConfirmed,
}

impl Refusal {
    /// Every refusal.
    pub const ALL: [Refusal; 17] = [
        Self::Malformed,
        Self::UnknownSigner,
        Self::SignerNotValid,
        Self::BadSignature,
        Self::WrongMeter,
        Self::CounterNotFresh,
        Self::Expired,
        Self::NotYetValid,
        Self::KindNotAllowed,
        Self::InvalidArguments,
        Self::FirmwareBadSignature,
        Self::FirmwareWrongClass,
        Self::FirmwareDigestMismatch,
        Self::FirmwareRollback,
        Self::FirmwareExpired,
        Self::FirmwareIncomplete,
        Self::FirmwareNotConfirmed,
    ];

    /// Stable code: `malformed`, `unknown_signer`, `signer_not_valid`, `bad_signature`,
    /// `wrong_meter`, `counter_not_fresh`, `expired`, `not_yet_valid`, `kind_not_allowed`,
    /// `invalid_arguments`, `firmware_bad_signature`, `firmware_wrong_class`,
    /// `firmware_digest_mismatch`, `firmware_rollback`, `firmware_expired`,
    /// `firmware_incomplete`, `firmware_not_confirmed`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownSigner => "unknown_signer",
            Self::SignerNotValid => "signer_not_valid",
            Self::BadSignature => "bad_signature",
            Self::WrongMeter => "wrong_meter",
            Self::CounterNotFresh => "counter_not_fresh",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::KindNotAllowed => "kind_not_allowed",
            Self::InvalidArguments => "invalid_arguments",
            Self::FirmwareBadSignature => "firmware_bad_signature",
            Self::FirmwareWrongClass => "firmware_wrong_class",
            Self::FirmwareDigestMismatch => "firmware_digest_mismatch",
            Self::FirmwareRollback => "firmware_rollback",
            Self::FirmwareExpired => "firmware_expired",
            Self::FirmwareIncomplete => "firmware_incomplete",
            Self::FirmwareNotConfirmed => "firmware_not_confirmed",
        }
    }

    /// The refusal with code `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refusal with detail for operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct CommandError {
    /// The stable reason.
    pub reason: Refusal,
    /// What exactly was wrong.
    pub detail: String,
}

impl CommandError {
    /// A refusal with `detail`.
    pub fn new(reason: Refusal, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The outcome a meter reports for one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Executed. `detail` is optional, e.g. `relay open`, `firmware 1.2.0 (sequence 5) confirmed`.
    Done {
        /// At most [`MAX_ACK_DETAIL_CHARS`] printable characters.
        detail: Option<String>,
    },
    /// Refused.
    Refused(Refusal),
}

/// A meter's acknowledgement of a command: a document (JSON only) that travels in the meter's own
/// envelope (its counter, its key) on its events topic, e.g.
/// `{"MeterID":"…","Timestamp":"…","CommandID":"<32 hex>","Outcome":"done","Detail":"relay open"}`
/// or `{"MeterID":"…","Timestamp":"…","CommandID":"…","Outcome":"refused","Reason":"expired"}`.
/// A command that did not decode is acknowledged with the all-zero id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandAck {
    /// The acknowledging meter.
    pub meter_id: MeterId,
    /// When (whole seconds, UTC).
    pub timestamp: OffsetDateTime,
    /// The command acknowledged.
    pub command_id: CommandId,
    /// What happened.
    pub outcome: AckOutcome,
}

impl AckOutcome {
    /// `done` or `refused`, as in the acknowledgement's `Outcome`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Done { .. } => "done",
            Self::Refused(_) => "refused",
        }
    }
}

impl CommandAck {
    /// A validated acknowledgement: the timestamp is normalised to UTC and must be in whole
    /// seconds within the years documents accept; a `Done` detail must be 1 to
    /// [`MAX_ACK_DETAIL_CHARS`] characters without control characters.
    ///
    /// # Errors
    ///
    /// The [`DocumentError`] that parsing the acknowledgement's JSON would give.
    pub fn new(
        meter_id: MeterId,
        timestamp: OffsetDateTime,
        command_id: CommandId,
        outcome: AckOutcome,
    ) -> Result<Self, DocumentError> {
        let timestamp = document::check_timestamp(timestamp)?;
        if let AckOutcome::Done {
            detail: Some(detail),
        } = &outcome
        {
            check_ack_detail(detail)?;
        }
        Ok(Self {
            meter_id,
            timestamp,
            command_id,
            outcome,
        })
    }

    /// The canonical JSON form (keys in the order `MeterID`, `Timestamp`, `CommandID`,
    /// `Outcome`, then `Detail` or `Reason`), e.g.
    /// `{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","CommandID":"000102030405060708090a0b0c0d0e0f","Outcome":"refused","Reason":"expired"}`.
    pub fn to_json(&self) -> String {
        let tail = match &self.outcome {
            AckOutcome::Done { detail: None } => String::new(),
            AckOutcome::Done {
                detail: Some(detail),
            } => format!(r#","Detail":{}"#, serde_json::Value::String(detail.clone())),
            AckOutcome::Refused(reason) => format!(r#","Reason":"{}""#, reason.code()),
        };
        format!(
            r#"{{"MeterID":"{}","Timestamp":"{}","CommandID":"{}","Outcome":"{}"{tail}}}"#,
            self.meter_id,
            document::format_timestamp(self.timestamp),
            self.command_id,
            self.outcome.as_str(),
        )
    }
}

/// The rules of an acknowledgement's `Detail`.
pub(crate) fn check_ack_detail(detail: &str) -> Result<(), DocumentError> {
    if detail.is_empty() {
        return Err(DocumentError::InvalidDetail("empty (omit Detail instead)"));
    }
    if detail.chars().count() > MAX_ACK_DETAIL_CHARS {
        return Err(DocumentError::InvalidDetail("too long"));
    }
    if detail.chars().any(char::is_control) {
        return Err(DocumentError::InvalidDetail("contains a control character"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
    use coset::{
        CborSerializable, CoseSign1, HeaderBuilder, ProtectedHeader, RegisteredLabelWithPrivate,
        TaggedCborSerializable, iana,
    };
    use proptest::prelude::*;
    use time::Duration;

    use super::*;
    use crate::document::{Format, Limits};
    use crate::envelope::{self, EnvelopeParams};

    const NOW_TS: i64 = 1_707_220_800; // 2024-02-06T12:00:00Z
    const OTHER_TOPIC: &str = "meters/987654321/commands";

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(NOW_TS).unwrap()
    }

    fn es256() -> SigningKey {
        let der =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        SigningKey::from_pkcs8_der(der.as_ref()).unwrap()
    }

    fn eddsa() -> SigningKey {
        let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        SigningKey::from_pkcs8_der(der.as_ref()).unwrap()
    }

    /// The committed key of the test meter (what a meter signs its envelopes with).
    fn meter_key() -> SigningKey {
        SigningKey::from_pkcs8_pem(include_str!("../tests/fixtures/es256.key.pem")).unwrap()
    }

    fn meter() -> MeterId {
        MeterId::new("123456789").unwrap()
    }

    fn bodies() -> Vec<CommandBody> {
        vec![
            CommandBody::Disconnect,
            CommandBody::Reconnect,
            CommandBody::SetReportingInterval { seconds: 900 },
            CommandBody::SetTariff {
                tariff: "night-2.low_rate".into(),
            },
            CommandBody::ReadNow,
            CommandBody::FirmwareUpdate {
                manifest: vec![0xd2, 0x84, 1, 2, 3],
            },
        ]
    }

    fn command(body: CommandBody) -> Command {
        Command {
            id: CommandId([7; 16]),
            meter_id: meter(),
            body,
            counter: 10,
            issued_at: now(),
            expires_at: now() + Duration::minutes(10),
        }
    }

    fn pinned(key: &SigningKey) -> TrustedSigner {
        TrustedSigner {
            key: key.verifying_key().unwrap(),
            not_before: now() - Duration::days(1),
            not_after: now() + Duration::days(365),
        }
    }

    /// Verifies `bytes` as meter 123456789 on its own topic, last counter 9, at `now()`, every
    /// kind allowed, 60 s skew; `edit` changes the context first.
    fn check(
        bytes: &[u8],
        signers: &[TrustedSigner],
        edit: impl FnOnce(&mut VerifyContext<'_>),
    ) -> Result<VerifiedCommand, CommandError> {
        let m = meter();
        let topic = m.commands_topic();
        let mut ctx = VerifyContext {
            meter_id: &m,
            topic: &topic,
            signers,
            last_counter: Some(9),
            now: now(),
            allowed: &CommandKind::ALL,
            max_skew_secs: 60,
        };
        edit(&mut ctx);
        verify(bytes, &ctx)
    }

    fn refusal(r: Result<VerifiedCommand, CommandError>) -> Refusal {
        match r {
            Ok(v) => panic!("accepted {v:?}"),
            Err(e) => {
                assert!(!e.detail.is_empty());
                e.reason
            }
        }
    }

    fn good_protected(key: &SigningKey) -> HeaderBuilder {
        HeaderBuilder::new()
            .algorithm(key.algorithm().iana())
            .key_id(key.kid().to_vec())
            .content_type(CONTENT_TYPE.to_owned())
    }

    /// A hand-made COSE_Sign1 over the test meter's topic, for what `sign` never produces.
    fn craft(
        key: &SigningKey,
        protected: coset::Header,
        unprotected: coset::Header,
        payload: Vec<u8>,
    ) -> Vec<u8> {
        let mut sign1 = CoseSign1 {
            protected: ProtectedHeader {
                original_data: None,
                header: protected,
            },
            unprotected,
            payload: Some(payload),
            signature: vec![],
        };
        sign1.signature = key
            .sign_bytes(&sign1.tbs_data(meter().commands_topic().as_bytes()))
            .unwrap();
        sign1.to_tagged_vec().unwrap()
    }

    /// The standard command's payload map, changed by `edit`, signed properly by `key`.
    fn with_payload(key: &SigningKey, edit: impl FnOnce(&mut Vec<(Value, Value)>)) -> Vec<u8> {
        let Value::Map(mut map) =
            to_payload(&command(CommandBody::SetReportingInterval { seconds: 900 }))
        else {
            unreachable!()
        };
        edit(&mut map);
        let payload = cose::encode_cbor(&Value::Map(map)).unwrap();
        craft(
            key,
            good_protected(key).build(),
            coset::Header::default(),
            payload,
        )
    }

    fn set(map: &mut [(Value, Value)], key: &str, value: Value) {
        for (k, v) in map.iter_mut() {
            if k.as_text() == Some(key) {
                *v = value;
                return;
            }
        }
        panic!("no {key}");
    }

    #[test]
    fn round_trip_every_kind_es256_and_eddsa() {
        for key in [es256(), eddsa()] {
            let signers = [pinned(&key)];
            for body in bodies() {
                let cmd = command(body);
                let bytes = sign(&key, &cmd).unwrap();
                assert_eq!(bytes[0], 0xd2, "tagged COSE_Sign1");
                let verified = check(&bytes, &signers, |_| {}).unwrap();
                assert_eq!(verified.command(), &cmd);
                assert_eq!(verified.into_command(), cmd);
                assert_eq!(unverified_id(&bytes), Some(cmd.id));
                // Untagged is accepted too.
                assert!(check(&bytes[1..], &signers, |_| {}).is_ok());
            }
        }
    }

    #[test]
    fn sub_second_times_are_signed_whole() {
        let key = eddsa();
        let mut cmd = command(CommandBody::ReadNow);
        cmd.issued_at += Duration::milliseconds(900);
        let bytes = sign(&key, &cmd).unwrap();
        let got = check(&bytes, &[pinned(&key)], |_| {})
            .unwrap()
            .into_command();
        assert_eq!(got.issued_at, now());
    }

    #[test]
    fn command_id_text_form() {
        let id = CommandId([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xa, 0xb, 0xc, 0xd, 0xe, 0xff]);
        assert_eq!(id.to_string(), "000102030405060708090a0b0c0d0eff");
        assert_eq!(
            "000102030405060708090A0B0C0D0EFF".parse::<CommandId>(),
            Ok(id)
        );
        for bad in [
            "",
            "000102030405060708090a0b0c0d0e",
            "000102030405060708090a0b0c0d0eff00",
            "000102030405060708090a0b0c0d0eg0",
            "+00102030405060708090a0b0c0d0eff",
            "é00102030405060708090a0b0c0d0ef",
        ] {
            let err = bad.parse::<CommandId>().unwrap_err();
            assert_eq!(err.reason, Refusal::Malformed, "{bad:?}");
        }
        assert_ne!(CommandId::random(), CommandId::random());
        assert_eq!(CommandId::UNKNOWN.to_string(), "0".repeat(32));
    }

    #[test]
    fn kinds_and_refusal_codes_round_trip() {
        for k in CommandKind::ALL {
            assert_eq!(k.as_str().parse::<CommandKind>(), Ok(k));
            assert_eq!(k.to_string(), k.as_str());
        }
        assert_eq!(
            "Disconnect".parse::<CommandKind>().unwrap_err().reason,
            Refusal::Malformed
        );
        let mut codes: Vec<_> = Refusal::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Refusal::ALL.len());
        for r in Refusal::ALL {
            assert_eq!(Refusal::from_code(r.code()), Some(r));
            assert_eq!(r.to_string(), r.code());
        }
        assert_eq!(Refusal::from_code("Expired"), None);
        for body in bodies() {
            assert_eq!(command(body.clone()).body.kind(), body.kind());
        }
    }

    #[test]
    fn another_key_or_a_meter_key_is_an_unknown_signer() {
        let hes = es256();
        let signers = [pinned(&hes)];
        for key in [es256(), eddsa(), meter_key()] {
            let bytes = sign(&key, &command(CommandBody::Disconnect)).unwrap();
            assert_eq!(
                refusal(check(&bytes, &signers, |_| {})),
                Refusal::UnknownSigner
            );
        }
        let bytes = sign(&hes, &command(CommandBody::Disconnect)).unwrap();
        assert_eq!(refusal(check(&bytes, &[], |_| {})), Refusal::UnknownSigner);
    }

    #[test]
    fn signer_outside_its_validity_is_refused() {
        let key = es256();
        let bytes = sign(&key, &command(CommandBody::Disconnect)).unwrap();
        let expired = TrustedSigner {
            not_after: now() - Duration::seconds(1),
            ..pinned(&key)
        };
        assert_eq!(
            refusal(check(&bytes, std::slice::from_ref(&expired), |_| {})),
            Refusal::SignerNotValid
        );
        let future = TrustedSigner {
            not_before: now() + Duration::seconds(1),
            ..pinned(&key)
        };
        assert_eq!(
            refusal(check(&bytes, &[future], |_| {})),
            Refusal::SignerNotValid
        );
        // Rotation: an expired and a current certificate of the same key.
        assert!(check(&bytes, &[expired, pinned(&key)], |_| {}).is_ok());
    }

    #[test]
    fn a_flipped_byte_or_another_topic_is_a_bad_signature() {
        let key = es256();
        let signers = [pinned(&key)];
        let mut bytes = sign(&key, &command(CommandBody::Disconnect)).unwrap();
        assert_eq!(
            refusal(check(&bytes, &signers, |c| c.topic = OTHER_TOPIC)),
            Refusal::BadSignature
        );
        assert_eq!(
            refusal(check(&bytes, &signers, |c| c.topic = "meters/123456789/events")),
            Refusal::BadSignature
        );
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            refusal(check(&bytes, &signers, |_| {})),
            Refusal::BadSignature
        );
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let key = eddsa();
        let signers = [pinned(&key)];
        let bytes = sign(&key, &command(CommandBody::ReadNow)).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(check(&bad, &signers, |_| {}).is_err(), "byte {i}");
        }
    }

    #[test]
    fn forged_signatures_under_the_pinned_kid_are_refused() {
        let victim = es256();
        let signers = [pinned(&victim)];
        let attacker = es256();
        let payload = cose::encode_cbor(&to_payload(&command(CommandBody::Disconnect))).unwrap();
        let forged = craft(
            &attacker,
            good_protected(&victim).build(),
            coset::Header::default(),
            payload.clone(),
        );
        assert_eq!(
            refusal(check(&forged, &signers, |_| {})),
            Refusal::BadSignature
        );
        // The right kid but another algorithm (an Ed25519 signature claimed for a P-256 key).
        let ed = eddsa();
        let header = coset::Header {
            alg: Some(RegisteredLabelWithPrivate::Assigned(iana::Algorithm::EdDSA)),
            ..good_protected(&victim).build()
        };
        let forged = craft(&ed, header, coset::Header::default(), payload);
        let err = check(&forged, &signers, |_| {}).unwrap_err();
        assert_eq!(err.reason, Refusal::BadSignature);
        assert!(err.detail.contains("EdDSA"), "{}", err.detail);
    }

    #[test]
    fn a_command_for_another_meter_is_refused() {
        let key = es256();
        let signers = [pinned(&key)];
        let cmd = Command {
            meter_id: MeterId::new("987654321").unwrap(),
            ..command(CommandBody::Disconnect)
        };
        let bytes = sign(&key, &cmd).unwrap();
        // Re-published on our topic, its signature (over the other meter's topic) fails.
        assert_eq!(
            refusal(check(&bytes, &signers, |_| {})),
            Refusal::BadSignature
        );
        // Delivered on the topic it was signed for, the target is not us.
        assert_eq!(
            refusal(check(&bytes, &signers, |c| c.topic = OTHER_TOPIC)),
            Refusal::WrongMeter
        );
    }

    #[test]
    fn replayed_or_lowered_counters_are_refused() {
        let key = es256();
        let signers = [pinned(&key)];
        let bytes = sign(&key, &command(CommandBody::Disconnect)).unwrap();
        for last in [10, 11, u64::MAX] {
            assert_eq!(
                refusal(check(&bytes, &signers, |c| c.last_counter = Some(last))),
                Refusal::CounterNotFresh,
                "last {last}"
            );
        }
        assert!(check(&bytes, &signers, |c| c.last_counter = None).is_ok());
        assert!(check(&bytes, &signers, |c| c.last_counter = Some(9)).is_ok());
    }

    #[test]
    fn expired_and_future_commands_are_refused() {
        let key = es256();
        let signers = [pinned(&key)];
        let bytes = sign(&key, &command(CommandBody::Disconnect)).unwrap();
        let exp = now() + Duration::minutes(10);
        assert_eq!(
            refusal(check(&bytes, &signers, |c| c.now = exp)),
            Refusal::Expired
        );
        assert!(check(&bytes, &signers, |c| c.now = exp - Duration::seconds(1)).is_ok());
        assert_eq!(
            refusal(check(&bytes, &signers, |c| c.now = now() - Duration::seconds(61))),
            Refusal::NotYetValid
        );
        assert!(check(&bytes, &signers, |c| c.now = now() - Duration::seconds(60)).is_ok());
        assert_eq!(
            refusal(check(&bytes, &signers, |c| {
                c.now = now() - Duration::seconds(1);
                c.max_skew_secs = 0;
            })),
            Refusal::NotYetValid
        );
    }

    #[test]
    fn kinds_the_meter_does_not_execute_are_refused() {
        let key = es256();
        let signers = [pinned(&key)];
        let bytes = sign(&key, &command(CommandBody::Disconnect)).unwrap();
        assert_eq!(
            refusal(check(&bytes, &signers, |c| c.allowed = &[CommandKind::ReadNow])),
            Refusal::KindNotAllowed
        );
        assert_eq!(
            refusal(check(&bytes, &signers, |c| c.allowed = &[])),
            Refusal::KindNotAllowed
        );
    }

    #[test]
    fn arguments_out_of_bounds_are_refused_by_sign_and_verify() {
        let key = es256();
        let signers = [pinned(&key)];
        let bad_bodies = [
            CommandBody::SetReportingInterval { seconds: 0 },
            CommandBody::SetReportingInterval {
                seconds: MAX_REPORTING_INTERVAL_SECS + 1,
            },
            CommandBody::SetTariff { tariff: "".into() },
            CommandBody::SetTariff {
                tariff: "t".repeat(MAX_TARIFF_LEN + 1),
            },
            CommandBody::SetTariff {
                tariff: "night rate".into(),
            },
            CommandBody::SetTariff {
                tariff: "nuit/é".into(),
            },
            CommandBody::FirmwareUpdate { manifest: vec![] },
            CommandBody::FirmwareUpdate {
                manifest: vec![0; MAX_MANIFEST_BYTES + 1],
            },
        ];
        for body in bad_bodies {
            assert_eq!(
                sign(&key, &command(body.clone())).unwrap_err().reason,
                Refusal::InvalidArguments,
                "{body:?}"
            );
        }
        assert!(
            CommandBody::SetTariff {
                tariff: "t".repeat(MAX_TARIFF_LEN)
            }
            .validate()
            .is_ok()
        );
        let backwards = Command {
            expires_at: now(),
            ..command(CommandBody::ReadNow)
        };
        assert_eq!(
            sign(&key, &backwards).unwrap_err().reason,
            Refusal::InvalidArguments
        );

        // The same, signed by hand: the meter refuses them after the signature.
        let seconds = |v: Value| {
            move |m: &mut Vec<(Value, Value)>| {
                set(
                    m,
                    KEY_ARGS,
                    Value::Map(vec![(Value::Text(ARG_SECONDS.into()), v)]),
                );
            }
        };
        for v in [
            Value::Integer(0.into()),
            Value::Integer((u64::from(u32::MAX) + 1).into()),
            Value::Integer((-5).into()),
        ] {
            let bytes = with_payload(&key, seconds(v.clone()));
            assert_eq!(
                refusal(check(&bytes, &signers, |_| {})),
                Refusal::InvalidArguments,
                "{v:?}"
            );
        }
        let bytes = with_payload(&key, |m| set(m, KEY_EXP, Value::Integer(NOW_TS.into())));
        assert_eq!(
            refusal(check(&bytes, &signers, |_| {})),
            Refusal::InvalidArguments
        );
        // Wrong types are malformed, not out of bounds.
        let bytes = with_payload(&key, seconds(Value::Text("900".into())));
        assert_eq!(refusal(check(&bytes, &signers, |_| {})), Refusal::Malformed);
        // The crafted good payload verifies (the helpers do not break it on their own).
        assert!(check(&with_payload(&key, |_| {}), &signers, |_| {}).is_ok());
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let key = es256();
        let signers = [pinned(&key)];
        type Edit = Box<dyn FnOnce(&mut Vec<(Value, Value)>)>;
        let t = |s: &str| Value::Text(s.to_owned());
        let cases: Vec<(&str, Edit)> = vec![
            (
                "unknown key",
                Box::new(move |m| m.push((t("priority"), Value::Integer(1.into())))),
            ),
            (
                "duplicate key",
                Box::new(move |m| m.push((t(KEY_COUNTER), Value::Integer(11.into())))),
            ),
            (
                "missing key",
                Box::new(|m| m.retain(|(k, _)| k.as_text() != Some(KEY_IAT))),
            ),
            (
                "non-text key",
                Box::new(|m| m.push((Value::Integer(1.into()), Value::Null))),
            ),
            (
                "short id",
                Box::new(|m| set(m, KEY_ID, Value::Bytes(vec![1; 15]))),
            ),
            (
                "unknown kind",
                Box::new(move |m| set(m, KEY_KIND, t("self_destruct"))),
            ),
            (
                "bad meter id",
                Box::new(move |m| set(m, KEY_METER, t("a/b"))),
            ),
            (
                "negative counter",
                Box::new(|m| set(m, KEY_COUNTER, Value::Integer((-1).into()))),
            ),
            (
                "float iat",
                Box::new(|m| set(m, KEY_IAT, Value::Float(1.5))),
            ),
            (
                "exp out of range",
                Box::new(|m| set(m, KEY_EXP, Value::Integer(i64::MAX.into()))),
            ),
            (
                "unknown argument",
                Box::new(move |m| {
                    set(
                        m,
                        KEY_ARGS,
                        Value::Map(vec![
                            (t(ARG_SECONDS), Value::Integer(900.into())),
                            (t("jitter"), Value::Integer(1.into())),
                        ]),
                    )
                }),
            ),
            (
                "missing argument",
                Box::new(|m| set(m, KEY_ARGS, Value::Map(vec![]))),
            ),
            (
                "args not a map",
                Box::new(|m| set(m, KEY_ARGS, Value::Array(vec![]))),
            ),
        ];
        for (name, edit) in cases {
            let bytes = with_payload(&key, edit);
            assert_eq!(
                refusal(check(&bytes, &signers, |_| {})),
                Refusal::Malformed,
                "{name}"
            );
        }
        // An argument on a kind that takes none.
        let bytes = with_payload(&key, move |m| {
            set(m, KEY_KIND, Value::Text("disconnect".into()));
        });
        assert_eq!(refusal(check(&bytes, &signers, |_| {})), Refusal::Malformed);
        // Not a map, and trailing bytes after the map.
        for payload in [vec![0x80], {
            let mut p = cose::encode_cbor(&to_payload(&command(CommandBody::ReadNow))).unwrap();
            p.push(0);
            p
        }] {
            let bytes = craft(
                &key,
                good_protected(&key).build(),
                coset::Header::default(),
                payload,
            );
            assert_eq!(refusal(check(&bytes, &signers, |_| {})), Refusal::Malformed);
        }
    }

    #[test]
    fn malformed_structures_and_headers_are_refused() {
        let key = es256();
        let signers = [pinned(&key)];
        let payload = cose::encode_cbor(&to_payload(&command(CommandBody::ReadNow))).unwrap();
        let crafted = |protected: coset::Header, unprotected: coset::Header| {
            craft(&key, protected, unprotected, payload.clone())
        };
        let cases = [
            (
                "unprotected kid",
                crafted(
                    good_protected(&key).build(),
                    HeaderBuilder::new().key_id(key.kid().to_vec()).build(),
                ),
            ),
            (
                "unprotected alg",
                crafted(
                    good_protected(&key).build(),
                    HeaderBuilder::new()
                        .algorithm(iana::Algorithm::ES256)
                        .build(),
                ),
            ),
            (
                "unprotected private label",
                crafted(
                    good_protected(&key).build(),
                    HeaderBuilder::new().value(-70000, Value::Null).build(),
                ),
            ),
            (
                "unknown critical header",
                crafted(
                    good_protected(&key)
                        .add_critical_label(RegisteredLabelWithPrivate::PrivateUse(-70000))
                        .value(-70000, Value::Bool(true))
                        .build(),
                    coset::Header::default(),
                ),
            ),
            (
                "extra protected label",
                crafted(
                    good_protected(&key).value(-70001, Value::Null).build(),
                    coset::Header::default(),
                ),
            ),
            (
                "envelope content type",
                crafted(
                    good_protected(&key)
                        .content_type("application/json".to_owned())
                        .build(),
                    coset::Header::default(),
                ),
            ),
            (
                "manifest content type",
                crafted(
                    good_protected(&key)
                        .content_type(crate::firmware::CONTENT_TYPE.to_owned())
                        .build(),
                    coset::Header::default(),
                ),
            ),
            (
                "no content type",
                crafted(
                    coset::Header {
                        content_type: None,
                        ..good_protected(&key).build()
                    },
                    coset::Header::default(),
                ),
            ),
            (
                "no alg",
                crafted(
                    coset::Header {
                        alg: None,
                        ..good_protected(&key).build()
                    },
                    coset::Header::default(),
                ),
            ),
            (
                "HMAC alg",
                crafted(
                    coset::Header {
                        alg: Some(RegisteredLabelWithPrivate::Assigned(
                            iana::Algorithm::HMAC_256_256,
                        )),
                        ..good_protected(&key).build()
                    },
                    coset::Header::default(),
                ),
            ),
            (
                "short kid",
                crafted(
                    good_protected(&key).key_id(vec![1; 8]).build(),
                    coset::Header::default(),
                ),
            ),
            ("empty", vec![]),
            ("garbage", b"disconnect now".to_vec()),
            ("COSE_Sign tag", vec![0xd8, 0x62, 0x80]),
            ("too large", vec![0; MAX_COMMAND_BYTES + 1]),
            ("trailing byte", {
                let mut b = sign(&key, &command(CommandBody::ReadNow)).unwrap();
                b.push(0);
                b
            }),
            ("no payload", {
                let mut s1 = CoseSign1::from_tagged_slice(
                    &sign(&key, &command(CommandBody::ReadNow)).unwrap(),
                )
                .unwrap();
                s1.payload = None;
                s1.to_tagged_vec().unwrap()
            }),
        ];
        for (name, bytes) in cases {
            assert_eq!(
                refusal(check(&bytes, &signers, |_| {})),
                Refusal::Malformed,
                "{name}"
            );
        }
        // The crafted good header verifies.
        let good = crafted(good_protected(&key).build(), coset::Header::default());
        assert!(check(&good, &signers, |_| {}).is_ok());
        assert!(CoseSign1::from_slice(&good[1..]).is_ok());
    }

    #[test]
    fn unverified_id_reads_refused_commands_and_nothing_else() {
        let key = es256();
        let bytes = sign(&key, &command(CommandBody::ReadNow)).unwrap();
        let mut tampered = bytes.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(unverified_id(&tampered), Some(CommandId([7; 16])));
        assert_eq!(unverified_id(b"junk"), None);
        assert_eq!(unverified_id(&[]), None);
        let no_id = with_payload(&key, |m| m.retain(|(k, _)| k.as_text() != Some(KEY_ID)));
        assert_eq!(unverified_id(&no_id), None);
        assert_eq!(unverified_id(&vec![0; MAX_COMMAND_BYTES + 1]), None);
    }

    fn ack_json(s: &str) -> Result<document::Document, DocumentError> {
        document::parse(s.as_bytes(), Format::Json, &Limits::default())
    }

    fn ack(outcome: AckOutcome) -> CommandAck {
        CommandAck::new(meter(), now(), CommandId([0xab; 16]), outcome).unwrap()
    }

    #[test]
    fn acknowledgements_round_trip() {
        let mut outcomes = vec![
            AckOutcome::Done { detail: None },
            AckOutcome::Done {
                detail: Some("relay open".into()),
            },
            AckOutcome::Done {
                detail: Some("firmware \"1.2.0\" \\ ünïcode ✓".into()),
            },
            AckOutcome::Done {
                detail: Some("x".repeat(MAX_ACK_DETAIL_CHARS)),
            },
        ];
        outcomes.extend(Refusal::ALL.map(AckOutcome::Refused));
        for outcome in outcomes {
            let a = ack(outcome);
            let json = a.to_json();
            let doc = ack_json(&json).unwrap();
            assert_eq!(doc, document::Document::CommandAck(a.clone()), "{json}");
            assert_eq!(doc.to_json(), json);
            assert_eq!(doc.kind_name(), "command_ack");
            assert_eq!(doc.meter_id(), &meter());
            assert_eq!(doc.timestamp(), now());
            // No XML form: encode gives JSON, and says so.
            assert!(!doc.has_xml_form());
            assert_eq!(doc.encoding_format(Format::Xml), Format::Json);
            assert_eq!(doc.encode(Format::Xml), json);
            assert_eq!(doc.to_xml(), json);
        }
        assert_eq!(
            ack(AckOutcome::Refused(Refusal::Expired)).to_json(),
            r#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","CommandID":"abababababababababababababababab","Outcome":"refused","Reason":"expired"}"#
        );
        // Any key order and spacing.
        let doc = ack_json(r#"{ "Outcome": "done", "CommandID": "ABABABABABABABABABABABABABABABAB", "Timestamp": "2024-02-06T13:00:00+01:00", "MeterID": "123456789" }"#).unwrap();
        assert_eq!(
            doc,
            document::Document::CommandAck(ack(AckOutcome::Done { detail: None }))
        );
        // Readings and events still have an XML form.
        let reading =
            ack_json(r#"{"MeterID":"1","Timestamp":"2024-02-06T12:00:00Z","EnergyConsumed":1}"#)
                .unwrap();
        assert!(reading.has_xml_form());
        assert_eq!(reading.encoding_format(Format::Xml), Format::Xml);
        assert_eq!(
            document::parse_reading(
                ack(AckOutcome::Done { detail: None }).to_json().as_bytes(),
                Format::Json,
                &Limits::default()
            ),
            Err(DocumentError::WrongDocumentKind {
                expected: "reading",
                found: "command_ack"
            })
        );
    }

    #[test]
    fn ack_constructor_checks_like_the_parser() {
        assert!(matches!(
            CommandAck::new(
                meter(),
                now() + Duration::milliseconds(5),
                CommandId::UNKNOWN,
                AckOutcome::Done { detail: None }
            ),
            Err(DocumentError::InvalidTimestamp { .. })
        ));
        for (detail, reason) in [
            (String::new(), "empty (omit Detail instead)"),
            ("x".repeat(MAX_ACK_DETAIL_CHARS + 1), "too long"),
            ("line\nbreak".to_owned(), "contains a control character"),
        ] {
            assert_eq!(
                CommandAck::new(
                    meter(),
                    now(),
                    CommandId::UNKNOWN,
                    AckOutcome::Done {
                        detail: Some(detail)
                    }
                ),
                Err(DocumentError::InvalidDetail(reason))
            );
        }
    }

    #[test]
    fn malformed_acknowledgements_are_refused() {
        let base = r#""MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","CommandID":"abababababababababababababababab""#;
        let doc = |rest: &str| ack_json(&format!("{{{base}{rest}}}"));
        let wt = |field, expected, found| DocumentError::WrongType {
            field,
            expected,
            found,
        };
        let cases: Vec<(&str, DocumentError)> = vec![
            (
                r#","Outcome":"done","Note":"x""#,
                DocumentError::UnknownField("Note".into()),
            ),
            (
                r#","Outcome":"done","Outcome":"done""#,
                DocumentError::DuplicateField("Outcome"),
            ),
            (
                r#","Outcome":"done","CommandID":"abababababababababababababababab""#,
                DocumentError::DuplicateField("CommandID"),
            ),
            ("", DocumentError::MissingField("Outcome")),
            (
                r#","Outcome":"refused""#,
                DocumentError::MissingField("Reason"),
            ),
            (
                r#","Outcome":"done","Reason":"expired""#,
                DocumentError::FieldNotAllowed {
                    field: "Reason",
                    outcome: "done",
                },
            ),
            (
                r#","Outcome":"refused","Detail":"x","Reason":"expired""#,
                DocumentError::FieldNotAllowed {
                    field: "Detail",
                    outcome: "refused",
                },
            ),
            (
                r#","Outcome":"failed""#,
                DocumentError::UnknownOutcome("failed".into()),
            ),
            (
                r#","Outcome":"Done""#,
                DocumentError::UnknownOutcome("Done".into()),
            ),
            (
                r#","Outcome":"refused","Reason":"Expired""#,
                DocumentError::UnknownRefusal("Expired".into()),
            ),
            (
                r#","Outcome":"refused","Reason":"replay""#,
                DocumentError::UnknownRefusal("replay".into()),
            ),
            (r#","Outcome":1"#, wt("Outcome", "string", "number")),
            (
                r#","Outcome":"done","Detail":null"#,
                wt("Detail", "string", "null"),
            ),
            (
                r#","Outcome":"refused","Reason":["expired"]"#,
                wt("Reason", "string", "array"),
            ),
            (
                r#","Outcome":"done","Detail":"""#,
                DocumentError::InvalidDetail("empty (omit Detail instead)"),
            ),
            (
                r#","Outcome":"done","Detail":"a\u0007b""#,
                DocumentError::InvalidDetail("contains a control character"),
            ),
            (
                r#","Outcome":"done","EnergyConsumed":1"#,
                DocumentError::AmbiguousKind,
            ),
            (
                r#","Outcome":"done","EventType":"PowerFail""#,
                DocumentError::AmbiguousKind,
            ),
        ];
        for (rest, expected) in cases {
            assert_eq!(doc(rest), Err(expected), "{rest}");
        }
        let long = format!(
            r#","Outcome":"done","Detail":"{}""#,
            "é".repeat(MAX_ACK_DETAIL_CHARS + 1)
        );
        assert_eq!(doc(&long), Err(DocumentError::InvalidDetail("too long")));
        for (id, expected) in [
            (
                r#""abab""#,
                Err(DocumentError::InvalidCommandId("abab".into())),
            ),
            (r#"7"#, Err(wt("CommandID", "string", "number"))),
        ] {
            let json = format!(
                r#"{{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","CommandID":{id},"Outcome":"done"}}"#
            );
            assert_eq!(ack_json(&json), expected, "{id}");
        }
        assert_eq!(
            ack_json(
                r#"{"MeterID":"123456789","Timestamp":"2024-02-06T12:00:00Z","Outcome":"done"}"#
            ),
            Err(DocumentError::MissingField("CommandID"))
        );
        assert_eq!(
            ack_json(r#"{"MeterID":"1/2","Timestamp":"x","Outcome":"bogus","CommandID":"?"}"#),
            Err(DocumentError::InvalidMeterId(
                crate::MeterIdError::InvalidChar('/')
            )),
            "the first bad value in document order"
        );
        // The XML parser knows no acknowledgement.
        assert!(matches!(
            document::parse(
                b"<CommandAck><MeterID>1</MeterID></CommandAck>",
                Format::Xml,
                &Limits::default()
            ),
            Err(DocumentError::UnknownRoot(_))
        ));
    }

    #[test]
    fn an_ack_travels_in_the_meters_envelope() {
        let key = meter_key();
        let m = meter();
        let topic = m.events_topic();
        let a = ack(AckOutcome::Refused(Refusal::CounterNotFresh));
        let env = envelope::sign(
            &key,
            &EnvelopeParams {
                meter_id: &m,
                counter: 3,
                timestamp: NOW_TS,
                content_type: Format::Json,
                topic: &topic,
            },
            a.to_json().as_bytes(),
        )
        .unwrap();
        let verified = envelope::verify(&env, &key.verifying_key().unwrap(), &m, &topic)
            .unwrap()
            .into_document(&Limits::default())
            .unwrap();
        assert_eq!(verified.document(), &document::Document::CommandAck(a));
    }

    /// The `key: value` lines of the first fenced block named `name` in `docs/wire-format.md`.
    pub(crate) fn spec_block(name: &str) -> HashMap<&'static str, &'static str> {
        let spec = include_str!("../../../docs/wire-format.md");
        spec.split(&format!("```{name}\n"))
            .nth(1)
            .and_then(|rest| rest.split("\n```").next())
            .unwrap_or_else(|| panic!("docs/wire-format.md has no {name} block"))
            .lines()
            .map(|l| l.split_once(": ").expect("key: value"))
            .collect()
    }

    /// The Ed25519 command key of the §8 vector: PKCS#8 v1 of the RFC 8032 test 1 seed.
    const VECTOR_KEY: &str = "302e020100300506032b6570042204209d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

    fn vector_command() -> Command {
        Command {
            id: "000102030405060708090a0b0c0d0e0f".parse().unwrap(),
            meter_id: meter(),
            body: CommandBody::SetReportingInterval { seconds: 900 },
            counter: 1,
            issued_at: now(),
            expires_at: now() + Duration::minutes(5),
        }
    }

    fn vector_ack() -> CommandAck {
        CommandAck::new(
            meter(),
            now() + Duration::seconds(2),
            "000102030405060708090a0b0c0d0e0f".parse().unwrap(),
            AckOutcome::Done {
                detail: Some("reporting every 900 s".into()),
            },
        )
        .unwrap()
    }

    /// The ack vector's envelope: the committed Ed25519 meter fixture, counter 45, events topic.
    fn vector_ack_envelope() -> Vec<u8> {
        let key =
            SigningKey::from_pkcs8_pem(include_str!("../tests/fixtures/eddsa.key.pem")).unwrap();
        let m = meter();
        envelope::sign(
            &key,
            &EnvelopeParams {
                meter_id: &m,
                counter: 45,
                timestamp: NOW_TS + 2,
                content_type: Format::Json,
                topic: &m.events_topic(),
            },
            vector_ack().to_json().as_bytes(),
        )
        .unwrap()
    }

    #[test]
    #[ignore = "generator: run with --ignored --nocapture to print the §8 and §9 vectors"]
    fn print_wire_format_vectors() {
        let key = SigningKey::from_pkcs8_der(&hex::decode(VECTOR_KEY).unwrap()).unwrap();
        let cmd = vector_command();
        let bytes = sign(&key, &cmd).unwrap();
        let sign1 = CoseSign1::from_tagged_slice(&bytes).unwrap();
        println!("```command-vector");
        println!("private_key_pkcs8: {VECTOR_KEY}");
        println!("public_key_spki: {}", hex::encode(key.public_key_spki()));
        println!("kid: {}", hex::encode(key.kid()));
        println!("topic: {}", cmd.meter_id.commands_topic());
        println!("payload: {}", hex::encode(sign1.payload.as_ref().unwrap()));
        println!(
            "protected: {}",
            hex::encode(sign1.protected.original_data.as_ref().unwrap())
        );
        println!("command: {}", hex::encode(&bytes));
        println!("```");
        println!("```ack-vector");
        println!("document: {}", vector_ack().to_json());
        println!("envelope: {}", hex::encode(vector_ack_envelope()));
        println!("```");
    }

    #[test]
    fn wire_format_command_vector_is_reproduced() {
        let mut block = spec_block("command-vector");
        let key = SigningKey::from_pkcs8_der(
            &hex::decode(block.remove("private_key_pkcs8").unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(key.algorithm(), envelope::Algorithm::EdDsa);
        let cmd = vector_command();
        let bytes = sign(&key, &cmd).unwrap();
        let sign1 = CoseSign1::from_tagged_slice(&bytes).unwrap();
        let expected = [
            ("public_key_spki", hex::encode(key.public_key_spki())),
            ("kid", hex::encode(key.kid())),
            ("topic", cmd.meter_id.commands_topic()),
            ("payload", hex::encode(sign1.payload.as_ref().unwrap())),
            (
                "protected",
                hex::encode(sign1.protected.original_data.as_ref().unwrap()),
            ),
            ("command", hex::encode(&bytes)),
        ];
        for (name, value) in expected {
            assert_eq!(block.remove(name), Some(value.as_str()), "{name}");
        }
        assert!(block.is_empty(), "unchecked vector lines: {block:?}");
        // A meter verifies it with the public key alone.
        let signer = TrustedSigner {
            key: VerifyingKey::from_spki_der(key.public_key_spki()).unwrap(),
            not_before: now() - Duration::days(1),
            not_after: now() + Duration::days(1),
        };
        let got = check(&bytes, &[signer], |c| c.last_counter = None).unwrap();
        assert_eq!(got.into_command(), cmd);
    }

    #[test]
    fn wire_format_ack_vector_is_reproduced() {
        let mut block = spec_block("ack-vector");
        assert_eq!(
            block.remove("document"),
            Some(vector_ack().to_json().as_str())
        );
        assert_eq!(
            block.remove("envelope"),
            Some(hex::encode(vector_ack_envelope()).as_str())
        );
        assert!(block.is_empty(), "unchecked vector lines: {block:?}");
    }

    proptest! {
        #[test]
        fn verify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let key = eddsa();
            let _ = check(&bytes, &[pinned(&key)], |_| {});
            let _ = unverified_id(&bytes);
        }

        #[test]
        fn verify_never_panics_on_mutated_commands(
            i in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            static KEY: std::sync::OnceLock<(SigningKey, Vec<u8>)> = std::sync::OnceLock::new();
            let (key, bytes) = KEY.get_or_init(|| {
                let k = eddsa();
                let b = sign(&k, &command(CommandBody::SetTariff { tariff: "day".into() })).unwrap();
                (k, b)
            });
            let mut bad = bytes.clone();
            let at = i.index(bad.len());
            bad[at] = byte;
            bad.truncate(cut.index(bad.len() + 1));
            let _ = check(&bad, &[pinned(key)], |_| {});
            let _ = unverified_id(&bad);
        }
    }
}
