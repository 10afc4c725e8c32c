//! [`Commands::on_ack`]: what follows a meter's acknowledgement once the head-end stored it.
//!
//! The store has already moved the command to `acknowledged` or `refused` in the
//! acknowledgement's own transaction; here the act is audited, the command's campaign advances,
//! and the head-end learns what it needs for a `command_refused` security event.

use gridward_audit::{Actor, Outcome};
use gridward_core::MeterId;
use gridward_core::command::{AckOutcome, CommandId, CommandKind, Refusal};
use gridward_store::{CommandStatus, StoreError};

use crate::issue::Commands;

/// The command an acknowledgement settled, as the head-end needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedCommand {
    /// The command.
    pub id: CommandId,
    /// The meter that acknowledged it.
    pub meter_id: MeterId,
    /// Its kind.
    pub kind: CommandKind,
    /// Its counter.
    pub counter: u64,
    /// Who issued it.
    pub issued_by: String,
    /// Who approved it (four eyes).
    pub approved_by: Option<String>,
    /// Its campaign.
    pub campaign_id: Option<i64>,
}

/// What [`Commands::on_ack`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckEffect {
    /// The meter executed the command.
    Done(AckedCommand),
    /// The meter refused it: raise a `command_refused` security event with `refusal` as detail.
    Refused {
        /// The command.
        command: AckedCommand,
        /// The meter's reason.
        refusal: Refusal,
    },
    /// No command of this meter was settled by this acknowledgement (unknown id, another
    /// meter's command, or already final before it): nothing changed.
    Unmatched,
}

impl Commands {
    /// Called after the head-end stored `meter`'s acknowledgement of `command_id`: audits it
    /// (`command.ack`), advances the command's campaign, wakes the dispatcher (the next command
    /// of a campaign may be due) and says whether it was a refusal.
    ///
    /// # Errors
    ///
    /// The store's error reading the command. A campaign that cannot advance now is logged and
    /// retried on the next sweep.
    pub fn on_ack(
        &self,
        meter: &MeterId,
        command_id: &CommandId,
        outcome: &AckOutcome,
    ) -> Result<AckEffect, StoreError> {
        let Some(cmd) = self.store.command(command_id)? else {
            return Ok(AckEffect::Unmatched);
        };
        let expected = match outcome {
            AckOutcome::Done { .. } => CommandStatus::Acknowledged,
            AckOutcome::Refused(_) => CommandStatus::Refused,
        };
        if cmd.meter_id != *meter || cmd.status != expected {
            return Ok(AckEffect::Unmatched);
        }
        let acked = AckedCommand {
            id: cmd.id,
            meter_id: cmd.meter_id.clone(),
            kind: cmd.kind,
            counter: cmd.counter,
            issued_by: cmd.issued_by.clone(),
            approved_by: cmd.approved_by.clone(),
            campaign_id: cmd.campaign_id,
        };
        let (effect, result, detail) = match outcome {
            AckOutcome::Done { detail } => (
                AckEffect::Done(acked),
                Outcome::Success,
                format!(
                    "command {} {} counter {} executed{}",
                    cmd.id,
                    cmd.kind,
                    cmd.counter,
                    detail
                        .as_deref()
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ),
            ),
            AckOutcome::Refused(r) => (
                AckEffect::Refused {
                    command: acked,
                    refusal: *r,
                },
                Outcome::Failure,
                format!(
                    "command {} {} counter {} refused by the meter: {r}",
                    cmd.id, cmd.kind, cmd.counter
                ),
            ),
        };
        self.record(
            Actor::System,
            "command.ack",
            meter.as_str(),
            result,
            format!("{detail} (issued by {})", cmd.issued_by),
        );
        if let Some(c) = cmd.campaign_id
            && let Err(e) = self.advance_campaign(c)
        {
            tracing::warn!(campaign = c, error = %e, "could not advance campaign");
        }
        self.wake.hint([meter]);
        Ok(effect)
    }
}
