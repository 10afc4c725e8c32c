//! Staged firmware campaigns.
//!
//! A campaign rolls one stored firmware out to a list of meters in two stages: the pilot
//! (stage 1, the first `first_stage` meters, default `min(3, n)`) and the rest (stage 2).
//!
//! - Stage 1 issues one `firmware_update` command (body: the stored, manufacturer-signed
//!   manifest) per pilot meter. When every pilot command is final, the campaign moves on to
//!   stage 2 if the acknowledged share reaches `success_threshold` (default 0.9), and pauses with
//!   a note otherwise.
//! - Stage 2 issues the commands for the rest, pauses as soon as more than `max_failures`
//!   (default 1) of them failed (refused, expired, failed), and completes when all are final.
//! - A pause (automatic or [`Commands::pause_campaign`]) settles the campaign's commands that
//!   were not sent yet as failed ("campaign paused"), so they do not hold back later commands to
//!   those meters (per-meter counters are strictly ordered).
//!   [`Commands::resume_campaign`] issues new commands for every member of the current and
//!   earlier stages whose command did not succeed, and runs on; [`Commands::cancel_campaign`]
//!   stops for good.
//!
//! [`next_step`] is the decision, sans-IO; [`Commands::advance_campaign`] applies it, called
//! from the dispatcher's sweep and from [`Commands::on_ack`]. Campaign commands skip four eyes
//! (creating the campaign is the deliberate act); if the policy makes `firmware_update` critical,
//! a campaign larger than the four-eyes threshold is refused ([`CampaignError::NeedsFourEyes`]).
//!
//! If the process stops between issuing a stage's commands and recording them on the members,
//! those members get a second command when the campaign advances again; the meter refuses the
//! second one by its sequence number and the campaign counts that member as failed.

use std::sync::PoisonError;

use gridward_audit::{Actor, Outcome};
use gridward_core::MeterId;
use gridward_core::command::{CommandBody, CommandKind};
use gridward_store::{
    CampaignMember, CampaignState, CommandQuery, CommandStatus, NewCampaign, StoreError,
    StoredCampaign,
};

use crate::issue::{CommandError, Commands, Origin, check_meters};

/// A request to roll a stored firmware out.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignRequest {
    /// The stored firmware ([`Commands::upload_firmware`]'s id).
    pub firmware_id: i64,
    /// The meters, in order; the first `first_stage` are the pilot.
    pub meters: Vec<MeterId>,
    /// Pilot size; `None`: `min(3, meters)`.
    pub first_stage: Option<u32>,
    /// Share of the pilot that must succeed (0..=1); `None`: 0.9.
    pub success_threshold: Option<f64>,
    /// Stage-2 failures tolerated before pausing; `None`: 1.
    pub max_failures: Option<u32>,
    /// The operator's user name.
    pub actor: String,
}

/// What a campaign should do next ([`next_step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Issue firmware commands to these meters of this stage (and record the stage).
    IssueStage(u32, Vec<MeterId>),
    /// Pause, for this reason.
    Pause(String),
    /// Every stage done.
    Complete,
    /// Nothing to do until commands settle (or the campaign is not running).
    Wait,
}

/// Why a campaign operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CampaignError {
    /// The request names no operator.
    #[error("the request names no operator")]
    NoActor,
    /// The meter list is empty, too long or has a meter twice.
    #[error("{0}")]
    Meters(CommandError),
    /// No firmware has this id.
    #[error("no firmware {0}; upload it first")]
    FirmwareNotFound(i64),
    /// The pilot size is not within 1..=meters.
    #[error("pilot of {first_stage} meters is not within 1..={meters}")]
    InvalidFirstStage {
        /// What was asked for.
        first_stage: u32,
        /// Meters in the campaign.
        meters: usize,
    },
    /// The success threshold is not a number within 0..=1.
    #[error("success threshold {0} is not within 0..=1")]
    InvalidThreshold(f64),
    /// The policy makes `firmware_update` critical and the campaign is larger than the
    /// four-eyes threshold; issue it through a proposal instead.
    #[error(
        "firmware_update needs four eyes for more than {threshold} meters; split the campaign or issue through a proposal"
    )]
    NeedsFourEyes {
        /// [`Policy::four_eyes_threshold`](crate::Policy::four_eyes_threshold).
        threshold: usize,
    },
    /// No campaign has this id.
    #[error("no campaign {0}")]
    NotFound(i64),
    /// The operation does not apply in the campaign's state (resume a paused one; pause a
    /// running one; cancel one that is not completed or cancelled).
    #[error("the campaign is {0}; this operation does not apply")]
    WrongState(CampaignState),
    /// Issuing the stage's commands failed.
    #[error("issuing the campaign's commands: {0}")]
    Issue(#[from] CommandError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Counts of one stage.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    members: usize,
    acknowledged: usize,
    failed: usize,
    pending: usize,
}

fn tally(members: &[CampaignMember], stage: u32) -> (Tally, Vec<MeterId>) {
    let mut t = Tally::default();
    let mut missing = Vec::new();
    for m in members.iter().filter(|m| m.stage == stage) {
        t.members += 1;
        match (m.command_id, m.status) {
            (None, _) => missing.push(m.meter_id.clone()),
            (Some(_), Some(CommandStatus::Acknowledged)) => t.acknowledged += 1,
            (Some(_), Some(s)) if !s.is_final() => t.pending += 1,
            // Refused, expired, failed, or a command the store no longer knows.
            (Some(_), _) => t.failed += 1,
        }
    }
    (t, missing)
}

/// Decides what `campaign` does next given its `members` (sans-IO; see the
/// [module documentation](self)).
pub fn next_step(campaign: &StoredCampaign, members: &[CampaignMember]) -> Step {
    if campaign.state != CampaignState::Running {
        return Step::Wait;
    }
    let (pilot, pilot_missing) = tally(members, 1);
    let (rest, rest_missing) = tally(members, 2);
    if campaign.stage <= 1 {
        if !pilot_missing.is_empty() {
            return Step::IssueStage(1, pilot_missing);
        }
        if pilot.pending > 0 {
            return Step::Wait;
        }
        if pilot.members > 0 {
            let share = pilot.acknowledged as f64 / pilot.members as f64;
            if share + 1e-9 < campaign.success_threshold {
                return Step::Pause(format!(
                    "pilot: {} of {} meters installed the firmware ({:.0}%), below the {:.0}% threshold; \
                     resume retries the failed meters, cancel stops the campaign",
                    pilot.acknowledged,
                    pilot.members,
                    share * 100.0,
                    campaign.success_threshold * 100.0
                ));
            }
        }
        if !rest_missing.is_empty() {
            return Step::IssueStage(2, rest_missing);
        }
        if rest.members == 0 {
            return Step::Complete;
        }
    }
    if rest.failed > campaign.max_failures as usize {
        return Step::Pause(format!(
            "stage 2: {} meters failed, more than the {} tolerated; resume retries them, cancel stops the campaign",
            rest.failed, campaign.max_failures
        ));
    }
    if !rest_missing.is_empty() {
        return Step::IssueStage(2, rest_missing);
    }
    if rest.pending > 0 {
        return Step::Wait;
    }
    Step::Complete
}

impl Commands {
    /// Creates a campaign and issues its pilot stage. Audited as `campaign.create`.
    ///
    /// # Errors
    ///
    /// A [`CampaignError`] naming what is wrong with the request, or what failed.
    pub fn create_campaign(&self, req: CampaignRequest) -> Result<i64, CampaignError> {
        let result = self.create_checked(&req);
        let actor = if req.actor.is_empty() {
            Actor::System
        } else {
            crate::audit::actor(&req.actor)
        };
        match &result {
            Ok(id) => self.record(
                actor,
                "campaign.create",
                format!("campaign:{id}"),
                Outcome::Success,
                format!(
                    "firmware {} to {} meters",
                    req.firmware_id,
                    req.meters.len()
                ),
            ),
            Err(e) => self.record(
                actor,
                "campaign.create",
                "",
                Outcome::Failure,
                format!(
                    "firmware {} to {} meters refused: {e}",
                    req.firmware_id,
                    req.meters.len()
                ),
            ),
        }
        if let Ok(id) = result
            && let Err(e) = self.advance_campaign(id)
        {
            tracing::warn!(campaign = id, error = %e, "could not start campaign; the sweep retries");
        }
        result
    }

    fn create_checked(&self, req: &CampaignRequest) -> Result<i64, CampaignError> {
        if req.actor.is_empty() {
            return Err(CampaignError::NoActor);
        }
        check_meters(&req.meters, self.policy.max_meters_per_request)
            .map_err(CampaignError::Meters)?;
        let n = req.meters.len();
        if self.policy.needs_four_eyes(CommandKind::FirmwareUpdate, n) {
            return Err(CampaignError::NeedsFourEyes {
                threshold: self.policy.four_eyes_threshold,
            });
        }
        if self.store.firmware(req.firmware_id)?.is_none() {
            return Err(CampaignError::FirmwareNotFound(req.firmware_id));
        }
        let default_pilot = u32::try_from(n.min(3)).unwrap_or(3);
        let first_stage = req.first_stage.unwrap_or(default_pilot);
        if first_stage == 0 || first_stage as usize > n {
            return Err(CampaignError::InvalidFirstStage {
                first_stage,
                meters: n,
            });
        }
        let threshold = req.success_threshold.unwrap_or(0.9);
        if !(0.0..=1.0).contains(&threshold) {
            return Err(CampaignError::InvalidThreshold(threshold));
        }
        let _guard = self
            .campaign_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(self.store.insert_campaign(&NewCampaign {
            firmware_id: req.firmware_id,
            meters: req.meters.clone(),
            first_stage,
            success_threshold: threshold,
            max_failures: req.max_failures.unwrap_or(1),
            created_by: req.actor.clone(),
            created_at: (self.clock)(),
        })?)
    }

    /// Applies [`next_step`] to campaign `id` once; returns the step taken. Called by the sweep
    /// and by [`Commands::on_ack`]; safe to call at any time.
    ///
    /// # Errors
    ///
    /// [`CampaignError::NotFound`], or what failed while issuing or storing.
    pub fn advance_campaign(&self, id: i64) -> Result<Step, CampaignError> {
        let _guard = self
            .campaign_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.advance_locked(id)
    }

    /// Advances every running campaign.
    ///
    /// # Errors
    ///
    /// The store's error listing campaigns; a campaign that cannot advance is logged.
    pub fn advance_campaigns(&self) -> Result<(), StoreError> {
        for c in self.store.campaigns()? {
            if c.state == CampaignState::Running
                && let Err(e) = self.advance_campaign(c.id)
            {
                tracing::warn!(campaign = c.id, error = %e, "could not advance campaign");
            }
        }
        Ok(())
    }

    fn advance_locked(&self, id: i64) -> Result<Step, CampaignError> {
        let c = self
            .store
            .campaign(id)?
            .ok_or(CampaignError::NotFound(id))?;
        let members = self.store.campaign_members(id)?;
        let step = next_step(&c, &members);
        let now = (self.clock)();
        match &step {
            Step::Wait => {}
            Step::IssueStage(stage, meters) => {
                self.issue_for_campaign(&c, meters)?;
                let note = format!("stage {stage}: {} meters", meters.len());
                if *stage != c.stage {
                    self.store.set_campaign_state(
                        id,
                        CampaignState::Running,
                        *stage,
                        now,
                        Some(&note),
                    )?;
                }
                self.record(
                    Actor::System,
                    "campaign.stage",
                    format!("campaign:{id}"),
                    Outcome::Success,
                    format!("{note} issued (created by {})", c.created_by),
                );
            }
            Step::Pause(reason) => {
                self.store.set_campaign_state(
                    id,
                    CampaignState::Paused,
                    c.stage,
                    now,
                    Some(reason),
                )?;
                let settled = self.settle_queued(id, "campaign paused")?;
                self.record(
                    Actor::System,
                    "campaign.pause",
                    format!("campaign:{id}"),
                    Outcome::Failure,
                    format!("{reason} ({settled} unsent commands withdrawn)"),
                );
            }
            Step::Complete => {
                self.store.set_campaign_state(
                    id,
                    CampaignState::Completed,
                    c.stage,
                    now,
                    Some("every stage done"),
                )?;
                let (t1, _) = tally(&members, 1);
                let (t2, _) = tally(&members, 2);
                self.record(
                    Actor::System,
                    "campaign.complete",
                    format!("campaign:{id}"),
                    Outcome::Success,
                    format!(
                        "{} of {} meters installed the firmware",
                        t1.acknowledged + t2.acknowledged,
                        t1.members + t2.members
                    ),
                );
            }
        }
        Ok(step)
    }

    fn issue_for_campaign(
        &self,
        c: &StoredCampaign,
        meters: &[MeterId],
    ) -> Result<(), CampaignError> {
        let fw = self
            .store
            .firmware(c.firmware_id)?
            .ok_or(CampaignError::FirmwareNotFound(c.firmware_id))?;
        let body = CommandBody::FirmwareUpdate {
            manifest: fw.manifest.clone(),
        };
        let origin = Origin {
            issued_by: c.created_by.clone(),
            approved_by: None,
            proposal_id: None,
            campaign_id: Some(c.id),
            actor: Actor::System,
        };
        let ids =
            self.issue_commands(meters, &body, Some(&fw), &origin, self.policy.firmware_ttl)?;
        for (meter, cmd) in meters.iter().zip(&ids) {
            self.store.set_campaign_member_command(c.id, meter, cmd)?;
        }
        Ok(())
    }

    /// Settles the campaign's commands not sent yet as failed; returns how many.
    fn settle_queued(&self, campaign: i64, detail: &str) -> Result<usize, StoreError> {
        let mut settled = 0;
        loop {
            let page = self.store.commands(&CommandQuery {
                campaign_id: Some(campaign),
                status: Some(CommandStatus::Queued),
                limit: 1000,
                ..CommandQuery::default()
            })?;
            let mut progress = false;
            for cmd in &page {
                if self.store.settle_command(
                    &cmd.id,
                    CommandStatus::Failed,
                    (self.clock)(),
                    detail,
                )? {
                    progress = true;
                    settled += 1;
                }
            }
            if !progress {
                return Ok(settled);
            }
        }
    }

    /// Takes the campaign lock and reads campaign `id`, which must be in a state `allowed`
    /// accepts: what every operator change starts with.
    fn locked_campaign(
        &self,
        id: i64,
        allowed: impl Fn(CampaignState) -> bool,
    ) -> Result<(std::sync::MutexGuard<'_, ()>, StoredCampaign), CampaignError> {
        let guard = self
            .campaign_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let c = self
            .store
            .campaign(id)?
            .ok_or(CampaignError::NotFound(id))?;
        if !allowed(c.state) {
            return Err(CampaignError::WrongState(c.state));
        }
        Ok((guard, c))
    }

    /// Pauses a running campaign (its unsent commands are withdrawn). Audited.
    ///
    /// # Errors
    ///
    /// [`CampaignError::NotFound`], [`CampaignError::WrongState`] unless running, the store's.
    pub fn pause_campaign(&self, id: i64, actor: &str) -> Result<(), CampaignError> {
        let result = self.pause_checked(id, actor);
        self.record_operator("campaign.pause", id, actor, &result);
        result.map(|_| ())
    }

    fn pause_checked(&self, id: i64, actor: &str) -> Result<String, CampaignError> {
        let (_guard, c) = self.locked_campaign(id, |s| s == CampaignState::Running)?;
        let note = format!("paused by {actor}");
        self.store.set_campaign_state(
            id,
            CampaignState::Paused,
            c.stage,
            (self.clock)(),
            Some(&note),
        )?;
        let settled = self.settle_queued(id, "campaign paused")?;
        Ok(format!("{note}; {settled} unsent commands withdrawn"))
    }

    /// Resumes a paused campaign: new commands for every member of the current and earlier
    /// stages whose command did not succeed, then on as before. Audited as `campaign.resume`.
    ///
    /// # Errors
    ///
    /// [`CampaignError::NotFound`], [`CampaignError::WrongState`] unless paused, issuing or
    /// store errors.
    pub fn resume_campaign(&self, id: i64, actor: &str) -> Result<(), CampaignError> {
        let result = self.resume_checked(id, actor);
        self.record_operator("campaign.resume", id, actor, &result);
        result.map(|_| ())
    }

    fn resume_checked(&self, id: i64, actor: &str) -> Result<String, CampaignError> {
        let (_guard, c) = self.locked_campaign(id, |s| s == CampaignState::Paused)?;
        let retry: Vec<MeterId> = self
            .store
            .campaign_members(id)?
            .into_iter()
            .filter(|m| {
                m.stage <= c.stage.max(1)
                    && m.command_id.is_some()
                    && m.status
                        .is_none_or(|s| s.is_final() && s != CommandStatus::Acknowledged)
            })
            .map(|m| m.meter_id)
            .collect();
        if !retry.is_empty() {
            self.issue_for_campaign(&c, &retry)?;
        }
        let note = format!("resumed by {actor}; {} meters retried", retry.len());
        self.store.set_campaign_state(
            id,
            CampaignState::Running,
            c.stage.max(1),
            (self.clock)(),
            Some(&note),
        )?;
        self.advance_locked(id)?;
        Ok(note)
    }

    /// Cancels a running or paused campaign for good (its unsent commands are withdrawn; sent
    /// ones cannot be recalled). Audited as `campaign.cancel`.
    ///
    /// # Errors
    ///
    /// [`CampaignError::NotFound`], [`CampaignError::WrongState`] if completed or cancelled,
    /// the store's.
    pub fn cancel_campaign(&self, id: i64, actor: &str) -> Result<(), CampaignError> {
        let result = self.cancel_checked(id, actor);
        self.record_operator("campaign.cancel", id, actor, &result);
        result.map(|_| ())
    }

    fn cancel_checked(&self, id: i64, actor: &str) -> Result<String, CampaignError> {
        let (_guard, c) = self.locked_campaign(id, |s| {
            !matches!(s, CampaignState::Completed | CampaignState::Cancelled)
        })?;
        let note = format!("cancelled by {actor}");
        self.store.set_campaign_state(
            id,
            CampaignState::Cancelled,
            c.stage.max(1),
            (self.clock)(),
            Some(&note),
        )?;
        let settled = self.settle_queued(id, "campaign cancelled")?;
        Ok(format!("{note}; {settled} unsent commands withdrawn"))
    }

    fn record_operator(
        &self,
        action: &str,
        id: i64,
        actor: &str,
        result: &Result<String, CampaignError>,
    ) {
        let who = if actor.is_empty() {
            Actor::System
        } else {
            crate::audit::actor(actor)
        };
        let (outcome, detail) = match result {
            Ok(note) => (Outcome::Success, note.clone()),
            Err(CampaignError::WrongState(s)) => {
                (Outcome::Denied, format!("refused: campaign is {s}"))
            }
            Err(e) => (Outcome::Failure, format!("failed: {e}")),
        };
        self.record(who, action, format!("campaign:{id}"), outcome, detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gridward_core::command::CommandId;
    use time::macros::datetime;

    fn campaign(state: CampaignState, stage: u32) -> StoredCampaign {
        StoredCampaign {
            id: 1,
            firmware_id: 1,
            first_stage: 3,
            success_threshold: 0.9,
            max_failures: 1,
            created_by: "alice".into(),
            created_at: datetime!(2025-01-01 0:00 UTC),
            state,
            stage,
            updated_at: datetime!(2025-01-01 0:00 UTC),
            note: None,
        }
    }

    fn member(i: u8, stage: u32, status: Option<CommandStatus>) -> CampaignMember {
        CampaignMember {
            meter_id: MeterId::new(&format!("M{i}")).unwrap_or_else(|_| unreachable!()),
            stage,
            command_id: status.map(|_| CommandId([i; 16])),
            status,
            outcome: None,
        }
    }

    use CommandStatus::{Acknowledged as Ack, Failed, Queued, Refused, Sent};

    fn ids(v: &[u8]) -> Vec<MeterId> {
        v.iter()
            .map(|i| MeterId::new(&format!("M{i}")).unwrap_or_else(|_| unreachable!()))
            .collect()
    }

    #[test]
    fn a_new_campaign_issues_its_pilot() {
        let ms = [member(1, 1, None), member(2, 1, None), member(3, 2, None)];
        assert_eq!(
            next_step(&campaign(CampaignState::Running, 1), &ms),
            Step::IssueStage(1, ids(&[1, 2]))
        );
    }

    #[test]
    fn the_pilot_waits_until_every_command_is_final() {
        let ms = [
            member(1, 1, Some(Ack)),
            member(2, 1, Some(Sent)),
            member(3, 2, None),
        ];
        assert_eq!(
            next_step(&campaign(CampaignState::Running, 1), &ms),
            Step::Wait
        );
        let ms = [
            member(1, 1, Some(Ack)),
            member(2, 1, Some(Queued)),
            member(3, 2, None),
        ];
        assert_eq!(
            next_step(&campaign(CampaignState::Running, 1), &ms),
            Step::Wait
        );
    }

    #[test]
    fn a_successful_pilot_starts_stage_two() {
        let ms = [
            member(1, 1, Some(Ack)),
            member(2, 1, Some(Ack)),
            member(3, 2, None),
            member(4, 2, None),
        ];
        assert_eq!(
            next_step(&campaign(CampaignState::Running, 1), &ms),
            Step::IssueStage(2, ids(&[3, 4]))
        );
    }

    #[test]
    fn a_failed_pilot_pauses() {
        let ms = [
            member(1, 1, Some(Ack)),
            member(2, 1, Some(Refused)),
            member(3, 2, None),
        ];
        let Step::Pause(reason) = next_step(&campaign(CampaignState::Running, 1), &ms) else {
            panic!("expected a pause");
        };
        assert!(reason.contains("1 of 2"), "{reason}");
        // A threshold the pilot meets exactly passes.
        let mut c = campaign(CampaignState::Running, 1);
        c.success_threshold = 0.5;
        assert_eq!(next_step(&c, &ms), Step::IssueStage(2, ids(&[3])));
    }

    #[test]
    fn stage_two_pauses_beyond_max_failures_and_completes_otherwise() {
        let c = campaign(CampaignState::Running, 2);
        let pilot = [member(1, 1, Some(Ack))];
        let with = |rest: &[CampaignMember]| {
            let mut v = pilot.to_vec();
            v.extend_from_slice(rest);
            next_step(&c, &v)
        };
        assert_eq!(
            with(&[member(2, 2, Some(Failed)), member(3, 2, Some(Sent))]),
            Step::Wait
        );
        assert!(matches!(
            with(&[
                member(2, 2, Some(Failed)),
                member(3, 2, Some(Refused)),
                member(4, 2, Some(Sent))
            ]),
            Step::Pause(_)
        ));
        assert_eq!(
            with(&[member(2, 2, Some(Failed)), member(3, 2, Some(Ack))]),
            Step::Complete
        );
        assert_eq!(
            with(&[member(2, 2, Some(Ack)), member(3, 2, None)]),
            Step::IssueStage(2, ids(&[3]))
        );
    }

    #[test]
    fn a_pilot_only_campaign_completes_after_the_pilot() {
        let ms = [member(1, 1, Some(Ack))];
        assert_eq!(
            next_step(&campaign(CampaignState::Running, 1), &ms),
            Step::Complete
        );
    }

    #[test]
    fn a_campaign_that_is_not_running_waits() {
        let ms = [member(1, 1, None)];
        for s in [
            CampaignState::Paused,
            CampaignState::Completed,
            CampaignState::Cancelled,
        ] {
            assert_eq!(next_step(&campaign(s, 1), &ms), Step::Wait);
        }
    }

    #[test]
    fn a_member_whose_command_is_gone_counts_as_failed() {
        let mut gone = member(1, 1, None);
        gone.command_id = Some(CommandId([1; 16]));
        assert!(matches!(
            next_step(&campaign(CampaignState::Running, 1), &[gone]),
            Step::Pause(_)
        ));
    }
}
