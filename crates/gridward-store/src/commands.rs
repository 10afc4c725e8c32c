//! The downward path: signed commands and their lifecycle, per-meter command counters,
//! dual-authorisation (four-eyes) proposals, firmware images and staged firmware campaigns,
//! behind the [`CommandStore`] trait.
//!
//! ```text
//!   operator ──► insert_proposal ──► decide_proposal (another operator) ──┐
//!   operator / campaign ──► reserve_command_counters ──► sign ──► insert_commands (queued)
//!   dispatcher ──► dispatchable ──► publish ──► mark_sent (sent, attempts + 1)
//!   meter ack (events topic) ──► Store::commit ──► acknowledged | refused   (same transaction)
//!   sweeper ──► expire_commands / expire_proposals;  settle_command (failed)
//! ```
//!
//! A command's lifecycle is `queued → sent → acknowledged | refused | expired | failed`; the last
//! four are final and never change again. The signed envelope is stored once, at insertion, so
//! every resend is byte-identical and a meter that already executed it refuses the copy by its
//! counter.
//!
//! The acknowledgement is not written here: it is a signed meter message and goes through
//! [`Store::commit`](crate::Store::commit) like an event (see
//! [`AcceptedBody::CommandAck`](crate::AcceptedBody::CommandAck)), which settles the command in
//! the message's own transaction.

use std::fmt;
use std::str::FromStr;

use gridward_core::MeterId;
use gridward_core::command::{CommandId, CommandKind};
use time::OffsetDateTime;

use crate::error::StoreError;
use crate::model::DEFAULT_QUERY_LIMIT;

/// Where a command is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandStatus {
    /// Signed and stored, not published yet.
    Queued,
    /// Published at least once, no acknowledgement yet.
    Sent,
    /// The meter executed it (signed acknowledgement `done`). Final.
    Acknowledged,
    /// The meter refused it (signed acknowledgement `refused`, the code in
    /// [`StoredCommand::outcome`]). Final.
    Refused,
    /// Not acknowledged before its expiry. Final.
    Expired,
    /// Given up by the head-end (e.g. the meter is decommissioned), the reason in
    /// [`StoredCommand::outcome`]. Final.
    Failed,
}

impl CommandStatus {
    /// Every status.
    pub const ALL: [CommandStatus; 6] = [
        Self::Queued,
        Self::Sent,
        Self::Acknowledged,
        Self::Refused,
        Self::Expired,
        Self::Failed,
    ];

    /// `queued`, `sent`, `acknowledged`, `refused`, `expired`, `failed` (also the stored form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Acknowledged => "acknowledged",
            Self::Refused => "refused",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }

    /// Whether the status never changes again (everything but queued and sent).
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Sent)
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`CommandStatus::as_str`], [`ProposalStatus::as_str`] or
/// [`CampaignState::as_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?} (expected one of: {expected})")]
pub struct UnknownStatus {
    /// Which kind of status was parsed (`command status`, `proposal status`, `campaign state`).
    pub what: &'static str,
    /// The text that was given.
    pub value: String,
    /// The accepted names, comma-separated.
    pub expected: &'static str,
}

impl FromStr for CommandStatus {
    type Err = UnknownStatus;
    /// The names of [`CommandStatus::as_str`], exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownStatus {
                what: "command status",
                value: s.to_owned(),
                expected: "queued, sent, acknowledged, refused, expired, failed",
            })
    }
}

/// A signed command to store, as [`CommandStore::insert_commands`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCommand {
    /// The command's id (unique).
    pub id: CommandId,
    /// The target meter.
    pub meter_id: MeterId,
    /// What it asks for.
    pub kind: CommandKind,
    /// Its arguments as JSON text, for operators (the authoritative form is in `envelope`).
    pub args_json: String,
    /// The per-meter command counter, from [`CommandStore::reserve_command_counters`]
    /// (unique per meter).
    pub counter: u64,
    /// When it was signed.
    pub issued_at: OffsetDateTime,
    /// When it expires: the meter refuses it after, and the dispatcher stops sending it.
    pub expires_at: OffsetDateTime,
    /// The signed COSE_Sign1 bytes, exactly as published: a resend is byte-identical.
    pub envelope: Vec<u8>,
    /// The operator (user name) or system component that issued it.
    pub issued_by: String,
    /// The second operator who approved it (four eyes), if it needed approval.
    pub approved_by: Option<String>,
    /// The proposal it came from, if any.
    pub proposal_id: Option<i64>,
    /// The firmware campaign it belongs to, if any.
    pub campaign_id: Option<i64>,
}

/// A stored command with its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCommand {
    /// The row number: increases in insertion order; the cursor of [`CommandQuery::before`].
    /// (Not in the brief's shape; needed because the cursor is a row number.)
    pub row: i64,
    /// The command's id.
    pub id: CommandId,
    /// The target meter.
    pub meter_id: MeterId,
    /// What it asks for.
    pub kind: CommandKind,
    /// Its arguments as JSON text.
    pub args_json: String,
    /// The per-meter command counter.
    pub counter: u64,
    /// When it was signed (to the microsecond).
    pub issued_at: OffsetDateTime,
    /// When it expires.
    pub expires_at: OffsetDateTime,
    /// The signed bytes, as stored at insertion (every send publishes exactly these).
    pub envelope: Vec<u8>,
    /// Who issued it.
    pub issued_by: String,
    /// Who approved it, if it needed approval.
    pub approved_by: Option<String>,
    /// The proposal it came from, if any.
    pub proposal_id: Option<i64>,
    /// The campaign it belongs to, if any.
    pub campaign_id: Option<i64>,
    /// Where it is in its lifecycle.
    pub status: CommandStatus,
    /// When it was last published, if ever.
    pub sent_at: Option<OffsetDateTime>,
    /// How many times it was published.
    pub attempts: u32,
    /// When it reached its final status, if it did.
    pub settled_at: Option<OffsetDateTime>,
    /// The refusal code (refused), or the head-end's detail (failed, expired).
    pub outcome: Option<String>,
    /// The stored message id of the meter's acknowledgement (its envelope is
    /// [`Store::envelope`](crate::Store::envelope) of this id).
    pub ack_message_id: Option<i64>,
}

/// Which commands [`CommandStore::commands`] returns: those matching every filter given, with a
/// row below `before`, the newest `limit`, **newest first**.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandQuery {
    /// Only commands to this meter.
    pub meter_id: Option<MeterId>,
    /// Only commands in this status.
    pub status: Option<CommandStatus>,
    /// Only commands of this campaign.
    pub campaign_id: Option<i64>,
    /// Only commands from this proposal.
    pub proposal_id: Option<i64>,
    /// Only commands with a [`StoredCommand::row`] below this (the paging cursor: pass the
    /// smallest row of one page to get the next, older page).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

impl Default for CommandQuery {
    /// Every command, [`DEFAULT_QUERY_LIMIT`].
    fn default() -> Self {
        Self {
            meter_id: None,
            status: None,
            campaign_id: None,
            proposal_id: None,
            before: None,
            limit: DEFAULT_QUERY_LIMIT,
        }
    }
}

/// Where a four-eyes proposal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProposalStatus {
    /// Waiting for a second operator.
    Pending,
    /// Approved by a second operator: its commands may be issued.
    Approved,
    /// Rejected by a second operator.
    Rejected,
    /// Not decided before its expiry.
    Expired,
}

impl ProposalStatus {
    /// Every status.
    pub const ALL: [ProposalStatus; 4] =
        [Self::Pending, Self::Approved, Self::Rejected, Self::Expired];

    /// `pending`, `approved`, `rejected`, `expired` (also the stored form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for ProposalStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProposalStatus {
    type Err = UnknownStatus;
    /// The names of [`ProposalStatus::as_str`], exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownStatus {
                what: "proposal status",
                value: s.to_owned(),
                expected: "pending, approved, rejected, expired",
            })
    }
}

/// A command proposed for many meters, waiting for a second operator's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProposal {
    /// What the commands would ask for.
    pub kind: CommandKind,
    /// The arguments as JSON text.
    pub args_json: String,
    /// The target meters, in order (a meter at most once).
    pub meters: Vec<MeterId>,
    /// The proposing operator; a different one must decide.
    pub proposed_by: String,
    /// When it was proposed.
    pub created_at: OffsetDateTime,
    /// After this instant it can no longer be approved.
    pub expires_at: OffsetDateTime,
    /// Why (shown to the approver).
    pub reason: String,
}

/// A stored proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProposal {
    /// The proposal's id.
    pub id: i64,
    /// What the commands would ask for.
    pub kind: CommandKind,
    /// The arguments as JSON text.
    pub args_json: String,
    /// The target meters, in the order proposed.
    pub meters: Vec<MeterId>,
    /// The proposing operator.
    pub proposed_by: String,
    /// When it was proposed.
    pub created_at: OffsetDateTime,
    /// When it expires.
    pub expires_at: OffsetDateTime,
    /// Why.
    pub reason: String,
    /// Where it is.
    pub status: ProposalStatus,
    /// Who approved or rejected it (`None` while pending and when it expired).
    pub decided_by: Option<String>,
    /// When it was decided or found expired.
    pub decided_at: Option<OffsetDateTime>,
    /// The decider's note.
    pub note: Option<String>,
}

/// A second operator's decision on a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Approve: the commands may be issued.
    Approve,
    /// Reject.
    Reject,
}

/// Why [`CommandStore::decide_proposal`] decided nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecideError {
    /// No proposal has that id.
    #[error("no such proposal")]
    NotFound,
    /// The proposal was already decided (or expired): the first decision stands.
    #[error("the proposal is already {0}; the first decision stands")]
    NotPending(ProposalStatus),
    /// The proposal expired before the decision; it is now marked expired. Propose it again.
    #[error("the proposal expired before it was decided; propose it again")]
    Expired,
    /// The proposer cannot decide their own proposal (four eyes): another operator must.
    #[error("the proposer cannot decide their own proposal; another operator must")]
    SameUser,
    /// The store failed; nothing was decided.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A firmware image to store (uploaded by an operator, signed by the manufacturer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFirmware {
    /// SHA-256 of the image (unique: an image is stored once).
    pub digest: [u8; 32],
    /// The manufacturer-signed manifest (COSE_Sign1), as uploaded.
    pub manifest: Vec<u8>,
    /// The image.
    pub image: Vec<u8>,
    /// The manifest's vendor id.
    pub vendor_id: String,
    /// The manifest's device class id.
    pub class_id: String,
    /// The version text, for operators.
    pub version: String,
    /// The manifest's sequence number (anti-rollback).
    pub sequence: u64,
    /// Who uploaded it.
    pub uploaded_by: String,
    /// When.
    pub uploaded_at: OffsetDateTime,
}

/// A stored firmware image's description (the image itself is
/// [`CommandStore::firmware_image`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFirmware {
    /// The firmware's id.
    pub id: i64,
    /// SHA-256 of the image.
    pub digest: [u8; 32],
    /// The signed manifest.
    pub manifest: Vec<u8>,
    /// The vendor id.
    pub vendor_id: String,
    /// The device class id.
    pub class_id: String,
    /// The version text.
    pub version: String,
    /// The sequence number.
    pub sequence: u64,
    /// Who uploaded it.
    pub uploaded_by: String,
    /// When.
    pub uploaded_at: OffsetDateTime,
    /// The image's size in bytes.
    pub size: u64,
}

/// Where a firmware campaign is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CampaignState {
    /// Dispatching its current stage.
    Running,
    /// Stopped (too many failures, or by an operator); may be resumed.
    Paused,
    /// Every stage done.
    Completed,
    /// Stopped for good by an operator.
    Cancelled,
}

impl CampaignState {
    /// Every state.
    pub const ALL: [CampaignState; 4] = [
        Self::Running,
        Self::Paused,
        Self::Completed,
        Self::Cancelled,
    ];

    /// `running`, `paused`, `completed`, `cancelled` (also the stored form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for CampaignState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CampaignState {
    type Err = UnknownStatus;
    /// The names of [`CampaignState::as_str`], exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownStatus {
                what: "campaign state",
                value: s.to_owned(),
                expected: "running, paused, completed, cancelled",
            })
    }
}

/// A firmware campaign to store: the image, the meters, and the rules of its stages.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCampaign {
    /// The firmware to roll out (must be stored).
    pub firmware_id: i64,
    /// The meters, in order (a meter at most once); the first `first_stage` are the pilot.
    pub meters: Vec<MeterId>,
    /// How many meters the pilot stage (1) has; the rest are stage 2.
    pub first_stage: u32,
    /// The fraction (0..=1) of a stage that must succeed before the next starts.
    pub success_threshold: f64,
    /// Failures after which the campaign pauses.
    pub max_failures: u32,
    /// Who created it.
    pub created_by: String,
    /// When (the campaign starts `running` at stage 1).
    pub created_at: OffsetDateTime,
}

/// A stored campaign (its members are [`CommandStore::campaign_members`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCampaign {
    /// The campaign's id.
    pub id: i64,
    /// The firmware.
    pub firmware_id: i64,
    /// Size of the pilot stage.
    pub first_stage: u32,
    /// The success fraction required per stage.
    pub success_threshold: f64,
    /// Failures after which it pauses.
    pub max_failures: u32,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: OffsetDateTime,
    /// Where it is.
    pub state: CampaignState,
    /// The current stage: 1 = pilot, 2 = the rest.
    pub stage: u32,
    /// When the state or stage last changed.
    pub updated_at: OffsetDateTime,
    /// Why (e.g. the pause reason).
    pub note: Option<String>,
}

/// One meter of a campaign, with its command's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignMember {
    /// The meter.
    pub meter_id: MeterId,
    /// Its stage: 1 = pilot, 2 = the rest.
    pub stage: u32,
    /// Its firmware-update command, once issued.
    pub command_id: Option<CommandId>,
    /// That command's status.
    pub status: Option<CommandStatus>,
    /// That command's outcome (refusal code or failure detail).
    pub outcome: Option<String>,
}

/// Durable storage for the downward path (see the [module documentation](self)).
///
/// Implementations are shared between threads; every write method is atomic (on `Err` nothing
/// of it was stored) and durable when it returns `Ok`.
pub trait CommandStore: Send + Sync {
    /// Reserves the next command counter of each meter, in order (a meter listed twice gets two
    /// increasing counters): strictly greater than any counter reserved before for that meter,
    /// starting at 1. One transaction for all, committed durably before returning, so a counter
    /// is persisted before any command using it is sent and is never handed out twice, also
    /// across restarts.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidRequest`] if a meter's counter would pass `i64::MAX` (never in
    /// practice: one command a second for 292 billion years).
    fn reserve_command_counters(&self, meters: &[MeterId]) -> Result<Vec<u64>, StoreError>;

    /// Inserts signed commands as `queued`, all in one transaction.
    ///
    /// # Errors
    ///
    /// Nothing is inserted on any error: [`StoreError::Conflict`] if an id or a (meter,
    /// counter) is already stored; [`StoreError::InvalidRequest`] if a counter was not reserved
    /// with [`reserve_command_counters`](CommandStore::reserve_command_counters) (so a counter
    /// is always persisted before its command can be sent) or `expires_at <= issued_at`;
    /// [`StoreError::NotFound`] if `proposal_id` or `campaign_id` names no stored proposal or
    /// campaign.
    fn insert_commands(&self, cmds: &[NewCommand]) -> Result<(), StoreError>;

    /// The command with id `id`.
    fn command(&self, id: &CommandId) -> Result<Option<StoredCommand>, StoreError>;

    /// Commands matching `q` (see [`CommandQuery`]), newest first.
    fn commands(&self, q: &CommandQuery) -> Result<Vec<StoredCommand>, StoreError>;

    /// The commands the dispatcher (re)sends: queued or sent (so not acknowledged, refused or
    /// settled), with `expires_at > now`, of `meter` or of all meters; ordered by meter id, then
    /// counter (oldest counter first per meter, so a meter never receives a higher counter
    /// before a lower one it still has to execute); at most `limit`.
    fn dispatchable(
        &self,
        meter: Option<&MeterId>,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<StoredCommand>, StoreError>;

    /// Records one publication: queued or sent → sent, `sent_at = at`, `attempts += 1`.
    /// Returns `false` (and changes nothing) if the command is final or unknown.
    fn mark_sent(&self, id: &CommandId, at: OffsetDateTime) -> Result<bool, StoreError>;

    /// Settles a command that is not final yet as `status` (only [`CommandStatus::Failed`] or
    /// [`CommandStatus::Expired`]; acknowledgements arrive through
    /// [`Store::commit`](crate::Store::commit)), with `settled_at = at` and `detail` as outcome.
    /// Returns `false` (and changes nothing) if the command is already final or unknown.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidRequest`] for any other `status`.
    fn settle_command(
        &self,
        id: &CommandId,
        status: CommandStatus,
        at: OffsetDateTime,
        detail: &str,
    ) -> Result<bool, StoreError>;

    /// Marks every queued or sent command with `expires_at <= now` expired (settled at `now`);
    /// returns their ids.
    fn expire_commands(&self, now: OffsetDateTime) -> Result<Vec<CommandId>, StoreError>;

    /// Stores a proposal as `pending`; returns its id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] if a meter is listed twice.
    fn insert_proposal(&self, p: &NewProposal) -> Result<i64, StoreError>;

    /// The proposal with id `id`.
    fn proposal(&self, id: i64) -> Result<Option<StoredProposal>, StoreError>;

    /// Proposals (in `status`, or all), newest first, at most `limit`.
    fn proposals(
        &self,
        status: Option<ProposalStatus>,
        limit: usize,
    ) -> Result<Vec<StoredProposal>, StoreError>;

    /// Decides a proposal, atomically and conditionally: it must exist ([`DecideError::NotFound`]),
    /// be pending ([`DecideError::NotPending`]), not be expired at `at`, i.e. `at < expires_at`
    /// (otherwise it is marked expired, durably, and [`DecideError::Expired`] is returned), and
    /// `by` must not be its proposer ([`DecideError::SameUser`], for approval and rejection
    /// alike). Of two operators deciding at once, exactly one succeeds; the other gets
    /// [`DecideError::NotPending`]. Returns the decided proposal.
    fn decide_proposal(
        &self,
        id: i64,
        decision: Decision,
        by: &str,
        at: OffsetDateTime,
        note: Option<&str>,
    ) -> Result<StoredProposal, DecideError>;

    /// Marks every pending proposal with `expires_at <= now` expired; returns their ids.
    fn expire_proposals(&self, now: OffsetDateTime) -> Result<Vec<i64>, StoreError>;

    /// Stores a firmware image and its manifest; returns its id.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] if an image with the same digest is stored already.
    fn insert_firmware(&self, f: &NewFirmware) -> Result<i64, StoreError>;

    /// The description of firmware `id`.
    fn firmware(&self, id: i64) -> Result<Option<StoredFirmware>, StoreError>;

    /// The image of firmware `id`.
    fn firmware_image(&self, id: i64) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every stored firmware, oldest first.
    fn firmwares(&self) -> Result<Vec<StoredFirmware>, StoreError>;

    /// Stores a campaign (`running`, stage 1) and its members: the first `first_stage` meters
    /// in stage 1, the rest in stage 2. Returns its id.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the firmware is not stored; [`StoreError::Conflict`] if a
    /// meter is listed twice; [`StoreError::InvalidRequest`] if `success_threshold` is not
    /// within 0..=1.
    fn insert_campaign(&self, c: &NewCampaign) -> Result<i64, StoreError>;

    /// The campaign with id `id`.
    fn campaign(&self, id: i64) -> Result<Option<StoredCampaign>, StoreError>;

    /// Every campaign, oldest first.
    fn campaigns(&self) -> Result<Vec<StoredCampaign>, StoreError>;

    /// The members of campaign `id`, in the order given at creation, each with its command's
    /// status and outcome (empty if the campaign does not exist).
    fn campaign_members(&self, id: i64) -> Result<Vec<CampaignMember>, StoreError>;

    /// Records the firmware-update command issued to `meter` in `campaign`.
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if the meter is not a member of the campaign.
    fn set_campaign_member_command(
        &self,
        campaign: i64,
        meter: &MeterId,
        command: &CommandId,
    ) -> Result<(), StoreError>;

    /// Sets a campaign's state and stage (`updated_at = at`, `note`).
    ///
    /// # Errors
    ///
    /// [`StoreError::NotFound`] if there is no such campaign; [`StoreError::InvalidRequest`] if
    /// `stage` is not 1 or 2.
    fn set_campaign_state(
        &self,
        id: i64,
        state: CampaignState,
        stage: u32,
        at: OffsetDateTime,
        note: Option<&str>,
    ) -> Result<(), StoreError>;
}
