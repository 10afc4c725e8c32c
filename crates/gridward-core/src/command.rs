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

use time::OffsetDateTime;

use crate::MeterId;
use crate::envelope::{SigningKey, VerifyingKey};

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
    /// A fresh random id.
    pub fn random() -> Self {
        todo!()
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!("32 lower-case hex digits {f:p}")
    }
}

impl FromStr for CommandId {
    type Err = CommandError;
    /// Exactly 32 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        todo!("{s}")
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
        todo!()
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandKind {
    type Err = CommandError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        todo!("{s}")
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
        todo!()
    }

    /// Checks the arguments' bounds (what [`verify`] and [`sign`] check).
    pub fn validate(&self) -> Result<(), CommandError> {
        todo!()
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
pub fn sign(key: &SigningKey, cmd: &Command) -> Result<Vec<u8>, CommandError> {
    todo!("{key:?} {cmd:?}")
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
    todo!("{bytes:?} {ctx:?}")
}

/// Reads the id and counter of a command *without* verifying it, for logging and for the
/// meter's acknowledgement of a command it refused; `None` if it does not decode.
pub fn unverified_id(bytes: &[u8]) -> Option<CommandId> {
    todo!("{bytes:?}")
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
        todo!()
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
