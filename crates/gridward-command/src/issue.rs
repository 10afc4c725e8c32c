//! [`Commands`]: issuing signed commands, and the state the rest of the crate shares.
//!
//! [`Commands::issue`] validates a request, turns a critical command to many meters into a
//! four-eyes proposal, and otherwise: reserves one counter per meter (durable before anything is
//! signed or sent), signs one command per meter with the current command key, stores them as
//! `queued`, records one audit entry per command, and wakes the dispatcher.
//!
//! A meter the head-end has never seen may still be addressed: a meter installed but not yet
//! connected must be able to receive, say, its tariff on first contact. Its command waits in the
//! queue until the meter subscribes or the command expires; nothing is sent to anyone else.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use gridward_audit::{Actor, NewEntry, Outcome};
use gridward_core::MeterId;
use gridward_core::command::{self, Command, CommandBody, CommandId};
use gridward_core::envelope::SigningKey;
use gridward_store::{CommandStore, NewCommand, NewProposal, StoreError, StoredFirmware};
use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::args::args_json;
use crate::audit::AuditRecorder;
use crate::dispatch::{Counters, DispatchStats};
use crate::policy::{Policy, PolicyError};
use crate::proposal::ProposerCheck;

/// The clock the service reads (the binary passes the system clock, tests a controlled one).
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// A request to send one command to one or more meters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRequest {
    /// The target meters, each at most once.
    pub meters: Vec<MeterId>,
    /// What to do, with its arguments.
    pub body: CommandBody,
    /// The operator's user name (already authorised by `gridward-access`).
    pub actor: String,
    /// The commands' lifetime; `None`: [`Policy::default_ttl`]. At most [`Policy::max_ttl`].
    pub ttl: Option<time::Duration>,
    /// Why (shown to the approver if the request becomes a proposal, and in the audit log).
    pub reason: String,
}

/// What [`Commands::issue`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issued {
    /// Signed and queued: one command per meter, in the request's order.
    Queued {
        /// The commands' ids.
        ids: Vec<CommandId>,
    },
    /// A critical command to many meters: a proposal now waits for another operator.
    Proposed {
        /// The proposal's id (for [`Commands::approve`] / [`Commands::reject`]).
        proposal_id: i64,
        /// After this instant it can no longer be approved.
        expires_at: OffsetDateTime,
    },
}

/// Why a request was not carried out. Nothing was signed or stored, except where a variant says
/// otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The request names no actor.
    #[error("the request names no operator; every command is issued by someone")]
    NoActor,
    /// The request names no meter.
    #[error("the request names no meter")]
    NoMeters,
    /// More meters than one request may address.
    #[error("{count} meters in one request; at most {max} are allowed: split the request")]
    TooManyMeters {
        /// Meters in the request.
        count: usize,
        /// [`Policy::max_meters_per_request`].
        max: usize,
    },
    /// A meter is listed twice.
    #[error("meter {0} is listed twice; list each meter once")]
    DuplicateMeter(MeterId),
    /// The lifetime is not positive or longer than [`Policy::max_ttl`].
    #[error("lifetime of {requested_secs} s is not within 1..={max_secs} s")]
    InvalidTtl {
        /// What was asked for, in seconds.
        requested_secs: i64,
        /// [`Policy::max_ttl`], in seconds.
        max_secs: i64,
    },
    /// The arguments are out of bounds (see [`CommandBody::validate`]).
    #[error("invalid arguments: {0}")]
    InvalidArguments(command::CommandError),
    /// A firmware update whose manifest is not a stored (verified) firmware's.
    #[error(
        "the manifest is not one of an uploaded firmware; upload the image with its manufacturer-signed manifest first"
    )]
    FirmwareNotStored,
    /// Signing failed (the counters reserved for the request stay unused: counters may have gaps).
    #[error("signing failed: {0}")]
    Signing(command::CommandError),
    /// The store returned fewer counters than meters (a broken store).
    #[error("the store reserved {got} counters for {wanted} meters")]
    CounterMismatch {
        /// Meters.
        wanted: usize,
        /// Counters returned.
        got: usize,
    },
    /// The store failed; nothing of the request was stored (reserved counters may stay unused).
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Who a batch of commands is issued by, for the stored row and the audit entry.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    /// `issued_by` of the stored commands.
    pub issued_by: String,
    /// `approved_by`, with four eyes.
    pub approved_by: Option<String>,
    /// The proposal the commands come from.
    pub proposal_id: Option<i64>,
    /// The campaign the commands belong to.
    pub campaign_id: Option<i64>,
    /// The audit entry's actor.
    pub actor: Actor,
}

/// Meters the dispatcher should look at soon, and the notification that wakes it.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    pub notify: Notify,
    hints: Mutex<HashSet<MeterId>>,
}

impl Wake {
    pub fn hint<'a>(&self, meters: impl IntoIterator<Item = &'a MeterId>) {
        self.hints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(meters.into_iter().cloned());
        self.notify.notify_one();
    }

    pub fn take_hints(&self) -> HashSet<MeterId> {
        std::mem::take(&mut *self.hints.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The command service. Share it as `Arc<Commands>`: the API issues and decides through it, the
/// [`Dispatcher`](crate::Dispatcher) sends what it queued, the head-end reports acknowledgements
/// and reachable meters to it.
///
/// Its methods are synchronous and call the store (SQLite: call them from a blocking context or
/// accept a few milliseconds on the calling thread); signing is in memory.
pub struct Commands {
    pub(crate) store: Arc<dyn CommandStore>,
    signer: RwLock<Arc<SigningKey>>,
    pub(crate) clock: Clock,
    pub(crate) policy: Policy,
    pub(crate) audit: Arc<dyn AuditRecorder>,
    pub(crate) proposers: Arc<dyn ProposerCheck>,
    pub(crate) wake: Wake,
    pub(crate) counters: Counters,
    /// Held while a campaign is advanced or changed, so two callers never issue one stage twice.
    pub(crate) campaign_lock: Mutex<()>,
    issued: AtomicU64,
}

impl fmt::Debug for Commands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Commands")
            .field("signer", &*self.signer())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Commands {
    /// A service over `store`, signing with `signer`, reading `clock`, recording to `audit`,
    /// asking `proposers` whether a proposer may still have their proposal approved.
    ///
    /// # Errors
    ///
    /// [`PolicyError`] if `policy` does not [validate](Policy::validate).
    pub fn new(
        store: Arc<dyn CommandStore>,
        signer: Arc<SigningKey>,
        clock: Clock,
        audit: Arc<dyn AuditRecorder>,
        proposers: Arc<dyn ProposerCheck>,
        policy: Policy,
    ) -> Result<Self, PolicyError> {
        policy.validate()?;
        Ok(Self {
            store,
            signer: RwLock::new(signer),
            clock,
            policy,
            audit,
            proposers,
            wake: Wake::default(),
            counters: Counters::default(),
            campaign_lock: Mutex::new(()),
            issued: AtomicU64::new(0),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The current command key.
    pub fn signer(&self) -> Arc<SigningKey> {
        Arc::clone(&self.signer.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Replaces the command key (rotation): commands signed from now on carry the new key;
    /// queued commands keep their stored bytes (pin the new signer on meters before rotating,
    /// retire the old one after its commands expired). Audited as `command.signer_rotate`.
    pub fn set_signer(&self, signer: Arc<SigningKey>, actor: Actor) {
        let detail = format!(
            "old kid {}, new kid {}",
            hex::encode(self.signer().kid()),
            hex::encode(signer.kid())
        );
        *self.signer.write().unwrap_or_else(PoisonError::into_inner) = signer;
        self.record(actor, "command.signer_rotate", "", Outcome::Success, detail);
    }

    /// The head-end reports that `meter` subscribed to its command topic: the dispatcher sends
    /// its queued commands now.
    pub fn meter_reachable(&self, meter: &MeterId) {
        self.wake.hint([meter]);
    }

    /// The dispatcher's counters (for metrics).
    pub fn dispatch_stats(&self) -> DispatchStats {
        let mut s = self.counters.snapshot();
        s.issued = self.issued.load(Ordering::Relaxed);
        s
    }

    /// Issues `req`: a proposal if it needs four eyes ([`Policy::needs_four_eyes`]), otherwise
    /// one signed, queued command per meter. Audited (`command.issue` per command,
    /// `proposal.create`, or the failure).
    ///
    /// # Errors
    ///
    /// A [`CommandError`] naming what is wrong with the request or what failed.
    pub fn issue(&self, req: IssueRequest) -> Result<Issued, CommandError> {
        let result = self.issue_checked(&req);
        if let Err(e) = &result {
            let actor = if req.actor.is_empty() {
                Actor::System
            } else {
                crate::audit::actor(&req.actor)
            };
            self.record(
                actor,
                "command.issue",
                meters_target(&req.meters),
                Outcome::Failure,
                format!(
                    "{} to {} meters refused: {e}",
                    req.body.kind(),
                    req.meters.len()
                ),
            );
        }
        result
    }

    fn issue_checked(&self, req: &IssueRequest) -> Result<Issued, CommandError> {
        let now = (self.clock)();
        if req.actor.is_empty() {
            return Err(CommandError::NoActor);
        }
        check_meters(&req.meters, self.policy.max_meters_per_request)?;
        let ttl = req.ttl.unwrap_or(self.policy.default_ttl);
        if !ttl.is_positive() || ttl > self.policy.max_ttl {
            return Err(CommandError::InvalidTtl {
                requested_secs: ttl.whole_seconds(),
                max_secs: self.policy.max_ttl.whole_seconds(),
            });
        }
        req.body
            .validate()
            .map_err(CommandError::InvalidArguments)?;
        let firmware = self.firmware_of(&req.body)?;
        let kind = req.body.kind();
        if self.policy.needs_four_eyes(kind, req.meters.len()) {
            let expires_at =
                now.checked_add(self.policy.approval_window)
                    .ok_or(CommandError::InvalidTtl {
                        requested_secs: self.policy.approval_window.whole_seconds(),
                        max_secs: self.policy.max_ttl.whole_seconds(),
                    })?;
            let proposal_id = self.store.insert_proposal(&NewProposal {
                kind,
                args_json: args_json(&req.body, firmware.as_ref()),
                meters: req.meters.clone(),
                proposed_by: req.actor.clone(),
                created_at: now,
                expires_at,
                reason: req.reason.clone(),
            })?;
            self.record(
                crate::audit::actor(&req.actor),
                "proposal.create",
                format!("proposal:{proposal_id}"),
                Outcome::Success,
                format!(
                    "{kind} to {} meters needs a second operator's approval before {expires_at}; reason: {}",
                    req.meters.len(),
                    req.reason
                ),
            );
            return Ok(Issued::Proposed {
                proposal_id,
                expires_at,
            });
        }
        let origin = Origin {
            issued_by: req.actor.clone(),
            approved_by: None,
            proposal_id: None,
            campaign_id: None,
            actor: crate::audit::actor(&req.actor),
        };
        let ids = self.issue_commands(&req.meters, &req.body, firmware.as_ref(), &origin, ttl)?;
        Ok(Issued::Queued { ids })
    }

    /// The stored firmware a `FirmwareUpdate` body's manifest belongs to (`None` for other kinds).
    pub(crate) fn firmware_of(
        &self,
        body: &CommandBody,
    ) -> Result<Option<StoredFirmware>, CommandError> {
        let CommandBody::FirmwareUpdate { manifest } = body else {
            return Ok(None);
        };
        self.store
            .firmwares()?
            .into_iter()
            .find(|f| f.manifest == *manifest)
            .map(Some)
            .ok_or(CommandError::FirmwareNotStored)
    }

    /// Reserves counters, signs, stores as queued, audits, wakes the dispatcher. The caller has
    /// validated the request.
    pub(crate) fn issue_commands(
        &self,
        meters: &[MeterId],
        body: &CommandBody,
        firmware: Option<&StoredFirmware>,
        origin: &Origin,
        ttl: time::Duration,
    ) -> Result<Vec<CommandId>, CommandError> {
        let now = (self.clock)();
        // Durable before anything is signed: a counter is never handed out twice, even if the
        // process dies between here and the insert (the counter then stays unused).
        let counters = self.store.reserve_command_counters(meters)?;
        if counters.len() != meters.len() {
            return Err(CommandError::CounterMismatch {
                wanted: meters.len(),
                got: counters.len(),
            });
        }
        let issued_at = whole_seconds(now);
        let expires_at = issued_at.checked_add(ttl).ok_or(CommandError::InvalidTtl {
            requested_secs: ttl.whole_seconds(),
            max_secs: self.policy.max_ttl.whole_seconds(),
        })?;
        let signer = self.signer();
        let args = args_json(body, firmware);
        let mut rows = Vec::with_capacity(meters.len());
        for (meter, counter) in meters.iter().zip(counters) {
            let cmd = Command {
                id: CommandId::random(),
                meter_id: meter.clone(),
                body: body.clone(),
                counter,
                issued_at,
                expires_at,
            };
            let envelope = command::sign(&signer, &cmd).map_err(CommandError::Signing)?;
            rows.push(NewCommand {
                id: cmd.id,
                meter_id: meter.clone(),
                kind: body.kind(),
                args_json: args.clone(),
                counter,
                issued_at,
                expires_at,
                envelope,
                issued_by: origin.issued_by.clone(),
                approved_by: origin.approved_by.clone(),
                proposal_id: origin.proposal_id,
                campaign_id: origin.campaign_id,
            });
        }
        self.store.insert_commands(&rows)?;
        self.issued.fetch_add(rows.len() as u64, Ordering::Relaxed);
        for row in &rows {
            let mut detail = format!(
                "command {} {} {} counter {} expires {} issued by {}",
                row.id, row.kind, row.args_json, row.counter, row.expires_at, row.issued_by
            );
            if let Some(a) = &row.approved_by {
                detail.push_str(&format!(", approved by {a}"));
            }
            if let Some(p) = row.proposal_id {
                detail.push_str(&format!(", proposal {p}"));
            }
            if let Some(c) = row.campaign_id {
                detail.push_str(&format!(", campaign {c}"));
            }
            self.record(
                origin.actor.clone(),
                "command.issue",
                row.meter_id.as_str(),
                Outcome::Success,
                detail,
            );
        }
        self.wake.hint(meters);
        Ok(rows.iter().map(|r| r.id).collect())
    }

    /// Records one audit entry at the clock's time.
    pub(crate) fn record(
        &self,
        actor: Actor,
        action: &str,
        target: impl Into<String>,
        outcome: Outcome,
        detail: String,
    ) {
        self.audit
            .record(NewEntry::new((self.clock)(), actor, action, target, outcome).detail(detail));
    }
}

/// Non-empty, not too many, each once.
pub(crate) fn check_meters(meters: &[MeterId], max: usize) -> Result<(), CommandError> {
    if meters.is_empty() {
        return Err(CommandError::NoMeters);
    }
    if meters.len() > max {
        return Err(CommandError::TooManyMeters {
            count: meters.len(),
            max,
        });
    }
    let mut seen = HashSet::with_capacity(meters.len());
    for m in meters {
        if !seen.insert(m) {
            return Err(CommandError::DuplicateMeter(m.clone()));
        }
    }
    Ok(())
}

/// The audit target for a set of meters: the meter itself, or `N meters`.
pub(crate) fn meters_target(meters: &[MeterId]) -> String {
    match meters {
        [one] => one.to_string(),
        many => format!("{} meters", many.len()),
    }
}

/// `t` in UTC without its fraction of a second.
pub(crate) fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    t - time::Duration::nanoseconds(i64::from(t.nanosecond()))
}
