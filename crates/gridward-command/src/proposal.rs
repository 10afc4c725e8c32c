//! Four eyes: a critical command to many meters waits as a proposal until a second, different
//! operator approves it.
//!
//! The rules of [`Commands::approve`], in order, each refusal typed and audited as denied:
//!
//! 1. the approver must be an operator ([`ProposalError::NotOperator`]; an auditor may look, not
//!    approve);
//! 2. the proposal must exist ([`ProposalError::NotFound`]);
//! 3. the approver must not be the proposer ([`ProposalError::SameUser`]; the store checks this
//!    again inside its transaction);
//! 4. the proposer must still be an enabled operator ([`ProposerCheck`]); otherwise the proposal
//!    is rejected with the note `proposer disabled` ([`ProposalError::ProposerNotEligible`]);
//! 5. the proposal must be pending and inside its window (the store decides atomically:
//!    [`ProposalError::NotPending`], [`ProposalError::Expired`]).
//!
//! Then the commands are issued with `issued_by` = the proposer, `approved_by` = the approver and
//! the proposal's id, with [`Policy::default_ttl`](crate::Policy::default_ttl) from the moment of
//! approval.

use gridward_audit::{Actor, Outcome};
use gridward_core::command::CommandId;
use gridward_store::{DecideError, Decision, ProposalStatus, StoreError, StoredProposal};

use crate::args::{ArgsError, body_from_args};
use crate::issue::{CommandError, Commands, Origin};

/// Who decides a proposal, as the API authenticated them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    /// The user name.
    pub username: String,
    /// Whether their role is operator (or stronger). Auditors and consumers are refused.
    pub role_is_operator: bool,
}

/// Whether a proposer may still have their proposal approved: their account is enabled and
/// still has the operator role. The head-end wires it to `gridward-access`.
pub trait ProposerCheck: Send + Sync {
    /// `true` if `username` is an enabled operator now.
    fn is_enabled_operator(&self, username: &str) -> bool;
}

impl<F> ProposerCheck for F
where
    F: Fn(&str) -> bool + Send + Sync,
{
    fn is_enabled_operator(&self, username: &str) -> bool {
        self(username)
    }
}

/// An approved proposal and the commands issued for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// The proposal as decided.
    pub proposal: StoredProposal,
    /// The queued commands, one per meter in the proposal's order.
    pub ids: Vec<CommandId>,
}

/// Why a decision on a proposal was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProposalError {
    /// Only operators decide proposals.
    #[error("{0} is not an operator; only another operator can decide a proposal")]
    NotOperator(String),
    /// No proposal has this id.
    #[error("no proposal {0}")]
    NotFound(i64),
    /// The approver proposed it themselves.
    #[error("the proposer cannot decide their own proposal; another operator must")]
    SameUser,
    /// The proposer's account is disabled or no longer an operator: the proposal was rejected.
    #[error("the proposer {0} is disabled or no longer an operator; the proposal was rejected")]
    ProposerNotEligible(String),
    /// Already approved, rejected or expired: the first decision stands.
    #[error("the proposal is already {0}; the first decision stands")]
    NotPending(ProposalStatus),
    /// The window closed before the decision; the proposal is now expired. Propose it again.
    #[error("the proposal expired before it was decided; propose it again")]
    Expired,
    /// The proposal's stored arguments cannot be rebuilt (e.g. its firmware was removed).
    #[error("the proposal's arguments: {0}")]
    Arguments(#[from] ArgsError),
    /// Approved, but issuing its commands failed; the approval stands, no command was queued.
    #[error("the proposal was approved but its commands could not be issued: {0}")]
    Issue(#[from] CommandError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl ProposalError {
    fn from_decide(e: DecideError, id: i64) -> Self {
        match e {
            DecideError::NotFound => Self::NotFound(id),
            DecideError::NotPending(s) => Self::NotPending(s),
            DecideError::Expired => Self::Expired,
            DecideError::SameUser => Self::SameUser,
            DecideError::Store(e) => Self::Store(e),
            other => Self::Store(StoreError::InvalidRequest(other.to_string())),
        }
    }

    /// Whether the refusal is a policy decision (audited as denied) rather than a failure.
    fn is_denial(&self) -> bool {
        matches!(
            self,
            Self::NotOperator(_)
                | Self::SameUser
                | Self::ProposerNotEligible(_)
                | Self::NotPending(_)
                | Self::Expired
        )
    }
}

impl Commands {
    /// Approves proposal `id` as `approver` and issues its commands (see the
    /// [module documentation](self) for the rules). Audited as `proposal.approve` with both
    /// identities, success or denied.
    ///
    /// # Errors
    ///
    /// A [`ProposalError`] naming the rule that refused it, or what failed.
    pub fn approve(
        &self,
        id: i64,
        approver: &Approver,
        note: Option<&str>,
    ) -> Result<Approval, ProposalError> {
        let result = self.approve_checked(id, approver, note);
        match &result {
            Ok(a) => self.record(
                crate::audit::actor(&approver.username),
                "proposal.approve",
                format!("proposal:{id}"),
                Outcome::Success,
                format!(
                    "{} to {} meters proposed by {}, approved by {}: {} commands queued",
                    a.proposal.kind,
                    a.proposal.meters.len(),
                    a.proposal.proposed_by,
                    approver.username,
                    a.ids.len()
                ),
            ),
            Err(e) => self.record_refusal("proposal.approve", id, approver, e),
        }
        result
    }

    fn approve_checked(
        &self,
        id: i64,
        approver: &Approver,
        note: Option<&str>,
    ) -> Result<Approval, ProposalError> {
        if !approver.role_is_operator {
            return Err(ProposalError::NotOperator(approver.username.clone()));
        }
        let proposal = self
            .store
            .proposal(id)?
            .ok_or(ProposalError::NotFound(id))?;
        if proposal.proposed_by == approver.username {
            return Err(ProposalError::SameUser);
        }
        let now = (self.clock)();
        if !self.proposers.is_enabled_operator(&proposal.proposed_by) {
            let rejected = self
                .store
                .decide_proposal(
                    id,
                    Decision::Reject,
                    &approver.username,
                    now,
                    Some("proposer disabled"),
                )
                .map_err(|e| ProposalError::from_decide(e, id))?;
            self.record(
                Actor::System,
                "proposal.reject",
                format!("proposal:{id}"),
                Outcome::Success,
                format!(
                    "proposer {} disabled or no longer an operator; rejected when {} tried to approve",
                    rejected.proposed_by, approver.username
                ),
            );
            return Err(ProposalError::ProposerNotEligible(proposal.proposed_by));
        }
        let decided = self
            .store
            .decide_proposal(id, Decision::Approve, &approver.username, now, note)
            .map_err(|e| ProposalError::from_decide(e, id))?;
        let body = body_from_args(decided.kind, &decided.args_json, |digest| {
            self.store
                .firmwares()
                .ok()?
                .into_iter()
                .find(|f| f.digest == *digest)
                .map(|f| f.manifest)
        })?;
        let firmware = self.firmware_of(&body)?;
        let origin = Origin {
            issued_by: decided.proposed_by.clone(),
            approved_by: Some(approver.username.clone()),
            proposal_id: Some(id),
            campaign_id: None,
            actor: crate::audit::actor(&approver.username),
        };
        let ids = self.issue_commands(
            &decided.meters,
            &body,
            firmware.as_ref(),
            &origin,
            self.policy.default_ttl,
        )?;
        Ok(Approval {
            proposal: decided,
            ids,
        })
    }

    /// Rejects proposal `id` as `approver` (an operator other than the proposer). Audited as
    /// `proposal.reject`.
    ///
    /// # Errors
    ///
    /// [`ProposalError::NotOperator`], [`ProposalError::NotFound`], [`ProposalError::SameUser`],
    /// [`ProposalError::NotPending`], [`ProposalError::Expired`], [`ProposalError::Store`].
    pub fn reject(
        &self,
        id: i64,
        approver: &Approver,
        note: Option<&str>,
    ) -> Result<StoredProposal, ProposalError> {
        let result = if approver.role_is_operator {
            self.store
                .decide_proposal(
                    id,
                    Decision::Reject,
                    &approver.username,
                    (self.clock)(),
                    note,
                )
                .map_err(|e| ProposalError::from_decide(e, id))
        } else {
            Err(ProposalError::NotOperator(approver.username.clone()))
        };
        match &result {
            Ok(p) => self.record(
                crate::audit::actor(&approver.username),
                "proposal.reject",
                format!("proposal:{id}"),
                Outcome::Success,
                format!(
                    "{} to {} meters proposed by {}, rejected by {}{}",
                    p.kind,
                    p.meters.len(),
                    p.proposed_by,
                    approver.username,
                    note.map(|n| format!(": {n}")).unwrap_or_default()
                ),
            ),
            Err(e) => self.record_refusal("proposal.reject", id, approver, e),
        }
        result
    }

    /// Marks every pending proposal past its window expired; returns their ids. Audited as
    /// `proposal.expire` each. The dispatcher calls it on every tick.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub fn expire_due(&self) -> Result<Vec<i64>, StoreError> {
        let ids = self.store.expire_proposals((self.clock)())?;
        for id in &ids {
            let detail = match self.store.proposal(*id) {
                Ok(Some(p)) => format!(
                    "{} to {} meters proposed by {} was not approved before {}",
                    p.kind,
                    p.meters.len(),
                    p.proposed_by,
                    p.expires_at
                ),
                _ => "not approved within its window".to_owned(),
            };
            self.record(
                Actor::System,
                "proposal.expire",
                format!("proposal:{id}"),
                Outcome::Failure,
                detail,
            );
        }
        Ok(ids)
    }

    fn record_refusal(&self, action: &str, id: i64, approver: &Approver, e: &ProposalError) {
        let proposer = match self.store.proposal(id) {
            Ok(Some(p)) => format!("proposed by {}", p.proposed_by),
            _ => "proposer unknown".to_owned(),
        };
        let outcome = if e.is_denial() {
            Outcome::Denied
        } else {
            Outcome::Failure
        };
        self.record(
            crate::audit::actor(&approver.username),
            action,
            format!("proposal:{id}"),
            outcome,
            format!("{proposer}; refused: {e}"),
        );
    }
}
