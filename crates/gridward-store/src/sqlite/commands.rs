//! [`CommandStore`] for [`SqliteStore`]: the tables of schema version 3 (see [`super::schema`]).
//!
//! Every write takes the writer connection and a durable (`synchronous = FULL`, `BEGIN
//! IMMEDIATE`) transaction, so conditional updates (a proposal decided once, a command settled
//! once) are serialised also against other processes opening the same file. Command counters are
//! reserved from 1 in steps of 1 and never pass `i64::MAX`, so, unlike message counters, they
//! order correctly in SQL.

use std::collections::HashSet;

use gridward_core::MeterId;
use gridward_core::command::{CommandId, CommandKind, Refusal};
use rusqlite::{ErrorCode, OptionalExtension, Row, Transaction, params};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{
    SqliteStore, corrupt, counter_from_sql, counter_to_sql, meter_id, micros, sql_limit,
    time_from_micros,
};
use crate::commands::{
    CampaignMember, CampaignState, CommandQuery, CommandStatus, CommandStore, DecideError,
    Decision, NewCampaign, NewCommand, NewFirmware, NewProposal, ProposalStatus, StoredCampaign,
    StoredCommand, StoredFirmware, StoredProposal,
};
use crate::error::StoreError;

/// The columns of `commands`, in the order [`command_from_row`] reads them.
const COMMAND_COLUMNS: &str = "seq, id, meter_id, kind, args_json, counter, issued_at, expires_at,
    envelope, issued_by, approved_by, proposal_id, campaign_id, status, sent_at, attempts,
    settled_at, outcome, ack_message";

/// The columns of `proposals`, in the order [`ProposalRow`] reads them.
const PROPOSAL_COLUMNS: &str = "id, kind, args_json, proposed_by, created_at, expires_at, reason,
    status, decided_by, decided_at, note";

/// The columns of `firmware` but the image.
const FIRMWARE_COLUMNS: &str = "id, digest, manifest, vendor_id, class_id, version, sequence,
    uploaded_by, uploaded_at, size";

/// The columns of `campaigns`.
const CAMPAIGN_COLUMNS: &str = "id, firmware_id, first_stage, success_threshold, max_failures,
    created_by, created_at, state, stage, updated_at, note";

/// The outcome recorded for a command that expired without acknowledgement.
const EXPIRED_DETAIL: &str = "not acknowledged before its expiry";

/// Settles the command an acknowledgement names, inside the acknowledgement's commit
/// transaction: if `command` is `meter`'s and not final, it becomes acknowledged (`refused` is
/// `None`) or refused (the code as outcome), settled at `at`, acknowledged by message `message`.
/// The acknowledgement proves delivery: a command still `queued` (its PUBACK raced the meter's
/// answer, which can be committed first) gets `sent_at` and one attempt too.
/// Returns whether a command changed.
pub(super) fn apply_ack(
    tx: &Transaction<'_>,
    meter: &MeterId,
    command: &CommandId,
    refused: Option<Refusal>,
    at: i64,
    message: i64,
) -> Result<bool, StoreError> {
    let (status, outcome) = match refused {
        None => (CommandStatus::Acknowledged, None),
        Some(r) => (CommandStatus::Refused, Some(r.code())),
    };
    let n = tx
        .prepare_cached(
            "UPDATE commands SET status = ?1, outcome = ?2, settled_at = ?3, ack_message = ?4,
                 sent_at = COALESCE(sent_at, ?3), attempts = MAX(attempts, 1)
             WHERE id = ?5 AND meter_id = ?6 AND status IN ('queued', 'sent')",
        )?
        .execute(params![
            status.as_str(),
            outcome,
            at,
            message,
            &command.0[..],
            meter.as_str()
        ])?;
    Ok(n == 1)
}

impl CommandStore for SqliteStore {
    fn reserve_command_counters(&self, meters: &[MeterId]) -> Result<Vec<u64>, StoreError> {
        if meters.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let mut out = Vec::with_capacity(meters.len());
        {
            let mut get =
                tx.prepare_cached("SELECT last FROM command_counters WHERE meter_id = ?1")?;
            let mut put = tx.prepare_cached(
                "INSERT INTO command_counters (meter_id, last) VALUES (?1, ?2)
                 ON CONFLICT (meter_id) DO UPDATE SET last = excluded.last",
            )?;
            for meter in meters {
                let last: i64 = get
                    .query_row([meter.as_str()], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                let next = last.checked_add(1).ok_or_else(|| {
                    StoreError::InvalidRequest(format!(
                        "the command counter of meter {meter} is exhausted"
                    ))
                })?;
                put.execute(params![meter.as_str(), next])?;
                out.push(counter_from_sql(next));
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn insert_commands(&self, cmds: &[NewCommand]) -> Result<(), StoreError> {
        if cmds.is_empty() {
            return Ok(());
        }
        let mut rows = Vec::with_capacity(cmds.len());
        for c in cmds {
            let counter = i64::try_from(c.counter)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    StoreError::InvalidRequest(format!(
                        "command {} has counter {}, which no reservation hands out",
                        hex::encode(c.id.0),
                        c.counter
                    ))
                })?;
            let (issued, expires) = (micros(c.issued_at)?, micros(c.expires_at)?);
            if expires <= issued {
                return Err(StoreError::InvalidRequest(format!(
                    "command {} expires at or before it is issued",
                    hex::encode(c.id.0)
                )));
            }
            rows.push((counter, issued, expires));
        }
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        {
            let mut reserved =
                tx.prepare_cached("SELECT last FROM command_counters WHERE meter_id = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO commands (id, meter_id, kind, args_json, counter, issued_at,
                                       expires_at, envelope, issued_by, approved_by, proposal_id,
                                       campaign_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for (c, (counter, issued, expires)) in cmds.iter().zip(rows) {
                // The counter must be persisted before the command can be sent.
                let last: Option<i64> = reserved
                    .query_row([c.meter_id.as_str()], |r| r.get(0))
                    .optional()?;
                if last.is_none_or(|last| counter > last) {
                    return Err(StoreError::InvalidRequest(format!(
                        "command {} uses counter {counter} of meter {}, which was not reserved \
                         (reserve it with reserve_command_counters first)",
                        hex::encode(c.id.0),
                        c.meter_id
                    )));
                }
                insert
                    .execute(params![
                        &c.id.0[..],
                        c.meter_id.as_str(),
                        c.kind.as_str(),
                        c.args_json,
                        counter,
                        issued,
                        expires,
                        c.envelope,
                        c.issued_by,
                        c.approved_by,
                        c.proposal_id,
                        c.campaign_id,
                    ])
                    .map_err(|e| {
                        conflict(
                            e,
                            format!(
                                "command {} (meter {}, counter {counter})",
                                hex::encode(c.id.0),
                                c.meter_id
                            ),
                        )
                    })?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn command(&self, id: &CommandId) -> Result<Option<StoredCommand>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?1"
            ))?
            .query_row([&id.0[..]], CommandRow::read)
            .optional()?;
        raw.map(CommandRow::into_stored).transpose()
    }

    fn commands(&self, q: &CommandQuery) -> Result<Vec<StoredCommand>, StoreError> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        // Only the filters given, so the planner picks the matching index.
        let mut sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE 1");
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if let Some(m) = &q.meter_id {
            args.push(Box::new(m.as_str().to_owned()));
            sql.push_str(&format!(" AND meter_id = ?{}", args.len()));
        }
        if let Some(s) = q.status {
            args.push(Box::new(s.as_str()));
            sql.push_str(&format!(" AND status = ?{}", args.len()));
        }
        if let Some(c) = q.campaign_id {
            args.push(Box::new(c));
            sql.push_str(&format!(" AND campaign_id = ?{}", args.len()));
        }
        if let Some(p) = q.proposal_id {
            args.push(Box::new(p));
            sql.push_str(&format!(" AND proposal_id = ?{}", args.len()));
        }
        if let Some(b) = q.before {
            args.push(Box::new(b));
            sql.push_str(&format!(" AND seq < ?{}", args.len()));
        }
        args.push(Box::new(sql_limit(q.limit)));
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT ?{}", args.len()));
        let conn = self.reader();
        let raw = conn
            .prepare_cached(&sql)?
            .query_map(
                rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())),
                CommandRow::read,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter().map(CommandRow::into_stored).collect()
    }

    fn dispatchable(
        &self,
        meter: Option<&MeterId>,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<StoredCommand>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = micros(now)?;
        let conn = self.reader();
        let raw = match meter {
            Some(m) => conn
                .prepare_cached(&format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands INDEXED BY commands_open
                     WHERE status IN ('queued', 'sent') AND meter_id = ?1 AND expires_at > ?2
                     ORDER BY meter_id, counter LIMIT ?3"
                ))?
                .query_map(params![m.as_str(), now, sql_limit(limit)], CommandRow::read)?
                .collect::<Result<Vec<_>, _>>()?,
            None => conn
                .prepare_cached(&format!(
                    "SELECT {COMMAND_COLUMNS} FROM commands INDEXED BY commands_open
                     WHERE status IN ('queued', 'sent') AND expires_at > ?1
                     ORDER BY meter_id, counter LIMIT ?2"
                ))?
                .query_map(params![now, sql_limit(limit)], CommandRow::read)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        raw.into_iter().map(CommandRow::into_stored).collect()
    }

    fn mark_sent(&self, id: &CommandId, at: OffsetDateTime) -> Result<bool, StoreError> {
        let at = micros(at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let n = tx
            .prepare_cached(
                "UPDATE commands SET status = 'sent', sent_at = ?2, attempts = attempts + 1
                 WHERE id = ?1 AND status IN ('queued', 'sent')",
            )?
            .execute(params![&id.0[..], at])?;
        tx.commit()?;
        Ok(n == 1)
    }

    fn settle_command(
        &self,
        id: &CommandId,
        status: CommandStatus,
        at: OffsetDateTime,
        detail: &str,
    ) -> Result<bool, StoreError> {
        if !matches!(status, CommandStatus::Failed | CommandStatus::Expired) {
            return Err(StoreError::InvalidRequest(format!(
                "a command is settled only as failed or expired, not {status} \
                 (acknowledgements arrive through Store::commit)"
            )));
        }
        let at = micros(at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let n = tx
            .prepare_cached(
                "UPDATE commands SET status = ?2, settled_at = ?3, outcome = ?4
                 WHERE id = ?1 AND status IN ('queued', 'sent')",
            )?
            .execute(params![&id.0[..], status.as_str(), at, detail])?;
        tx.commit()?;
        Ok(n == 1)
    }

    fn expire_commands(&self, now: OffsetDateTime) -> Result<Vec<CommandId>, StoreError> {
        let now = micros(now)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let ids = tx
            .prepare_cached(
                "SELECT id FROM commands INDEXED BY commands_expiry
                 WHERE status IN ('queued', 'sent') AND expires_at <= ?1 ORDER BY seq",
            )?
            .query_map([now], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        tx.prepare_cached(
            "UPDATE commands SET status = 'expired', settled_at = ?1, outcome = ?2
             WHERE status IN ('queued', 'sent') AND expires_at <= ?1",
        )?
        .execute(params![now, EXPIRED_DETAIL])?;
        tx.commit()?;
        ids.iter().map(|b| command_id_from_sql(b)).collect()
    }

    fn insert_proposal(&self, p: &NewProposal) -> Result<i64, StoreError> {
        if p.meters.is_empty() {
            return Err(StoreError::InvalidRequest(
                "a proposal needs at least one meter".to_owned(),
            ));
        }
        check_distinct(&p.meters, "proposal")?;
        let (created, expires) = (micros(p.created_at)?, micros(p.expires_at)?);
        if expires <= created {
            return Err(StoreError::InvalidRequest(
                "a proposal must expire after it is created".to_owned(),
            ));
        }
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        tx.prepare_cached(
            "INSERT INTO proposals (kind, args_json, proposed_by, created_at, expires_at, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            p.kind.as_str(),
            p.args_json,
            p.proposed_by,
            created,
            expires,
            p.reason
        ])?;
        let id = tx.last_insert_rowid();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO proposal_meters (proposal, position, meter_id) VALUES (?1, ?2, ?3)",
            )?;
            for (pos, m) in p.meters.iter().enumerate() {
                insert.execute(params![id, position(pos), m.as_str()])?;
            }
        }
        tx.commit()?;
        Ok(id)
    }

    fn proposal(&self, id: i64) -> Result<Option<StoredProposal>, StoreError> {
        let mut conn = self.reader();
        let tx = conn.transaction()?;
        load_proposal(&tx, id)
    }

    fn proposals(
        &self,
        status: Option<ProposalStatus>,
        limit: usize,
    ) -> Result<Vec<StoredProposal>, StoreError> {
        let mut conn = self.reader();
        let tx = conn.transaction()?;
        let ids = match status {
            Some(s) => tx
                .prepare_cached(
                    "SELECT id FROM proposals WHERE status = ?1 ORDER BY id DESC LIMIT ?2",
                )?
                .query_map(params![s.as_str(), sql_limit(limit)], |r| {
                    r.get::<_, i64>(0)
                })?
                .collect::<Result<Vec<_>, _>>()?,
            None => tx
                .prepare_cached("SELECT id FROM proposals ORDER BY id DESC LIMIT ?1")?
                .query_map([sql_limit(limit)], |r| r.get::<_, i64>(0))?
                .collect::<Result<Vec<_>, _>>()?,
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(load_proposal(&tx, id)?);
        }
        Ok(out)
    }

    fn decide_proposal(
        &self,
        id: i64,
        decision: Decision,
        by: &str,
        at: OffsetDateTime,
        note: Option<&str>,
    ) -> Result<StoredProposal, DecideError> {
        let at = micros(at)?;
        let mut conn = self.writer();
        // IMMEDIATE: the write lock is held from the read of the status to the update, so two
        // deciders (threads or processes) are serialised and the second sees the first's result.
        let tx = Self::durable_tx(&mut conn)?;
        let found = tx
            .prepare_cached("SELECT status, proposed_by, expires_at FROM proposals WHERE id = ?1")
            .map_err(StoreError::from)?
            .query_row([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .optional()
            .map_err(StoreError::from)?;
        let Some((status, proposed_by, expires_at)) = found else {
            return Err(DecideError::NotFound);
        };
        let status = proposal_status_from_sql(&status)?;
        if status != ProposalStatus::Pending {
            return Err(DecideError::NotPending(status));
        }
        if at >= expires_at {
            tx.prepare_cached(
                "UPDATE proposals SET status = 'expired', decided_at = ?2
                 WHERE id = ?1 AND status = 'pending'",
            )
            .map_err(StoreError::from)?
            .execute(params![id, at])
            .map_err(StoreError::from)?;
            tx.commit().map_err(StoreError::from)?;
            return Err(DecideError::Expired);
        }
        if by == proposed_by {
            return Err(DecideError::SameUser);
        }
        let new = match decision {
            Decision::Approve => ProposalStatus::Approved,
            Decision::Reject => ProposalStatus::Rejected,
        };
        let n = tx
            .prepare_cached(
                "UPDATE proposals SET status = ?2, decided_by = ?3, decided_at = ?4, note = ?5
                 WHERE id = ?1 AND status = 'pending'",
            )
            .map_err(StoreError::from)?
            .execute(params![id, new.as_str(), by, at, note])
            .map_err(StoreError::from)?;
        if n != 1 {
            // Unreachable under the write lock; kept so a broken lock never decides twice.
            return Err(DecideError::NotPending(status));
        }
        let decided = load_proposal(&tx, id)?.ok_or(DecideError::NotFound)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(decided)
    }

    fn expire_proposals(&self, now: OffsetDateTime) -> Result<Vec<i64>, StoreError> {
        let now = micros(now)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let ids = tx
            .prepare_cached(
                "SELECT id FROM proposals INDEXED BY proposals_pending
                 WHERE status = 'pending' AND expires_at <= ?1 ORDER BY id",
            )?
            .query_map([now], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        if !ids.is_empty() {
            tx.prepare_cached(
                "UPDATE proposals SET status = 'expired', decided_at = ?1
                 WHERE status = 'pending' AND expires_at <= ?1",
            )?
            .execute([now])?;
            tx.commit()?;
        }
        Ok(ids)
    }

    fn insert_firmware(&self, f: &NewFirmware) -> Result<i64, StoreError> {
        let actual: [u8; 32] = Sha256::digest(&f.image).into();
        if actual != f.digest {
            return Err(StoreError::InvalidRequest(format!(
                "the firmware digest {} is not the SHA-256 of the image ({})",
                hex::encode(f.digest),
                hex::encode(actual)
            )));
        }
        let size = i64::try_from(f.image.len())
            .map_err(|_| StoreError::InvalidRequest("the image is too large".to_owned()))?;
        let uploaded = micros(f.uploaded_at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        tx.prepare_cached(
            "INSERT INTO firmware (digest, manifest, vendor_id, class_id, version, sequence,
                                   uploaded_by, uploaded_at, size, image)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            &f.digest[..],
            f.manifest,
            f.vendor_id,
            f.class_id,
            f.version,
            counter_to_sql(f.sequence),
            f.uploaded_by,
            uploaded,
            size,
            f.image,
        ])
        .map_err(|e| conflict(e, format!("firmware with digest {}", hex::encode(f.digest))))?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    fn firmware(&self, id: i64) -> Result<Option<StoredFirmware>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {FIRMWARE_COLUMNS} FROM firmware WHERE id = ?1"
            ))?
            .query_row([id], FirmwareRow::read)
            .optional()?;
        raw.map(FirmwareRow::into_stored).transpose()
    }

    fn firmware_image(&self, id: i64) -> Result<Option<Vec<u8>>, StoreError> {
        let conn = self.reader();
        Ok(conn
            .prepare_cached("SELECT image FROM firmware WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }

    fn firmwares(&self) -> Result<Vec<StoredFirmware>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {FIRMWARE_COLUMNS} FROM firmware ORDER BY id"
            ))?
            .query_map([], FirmwareRow::read)?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter().map(FirmwareRow::into_stored).collect()
    }

    fn insert_campaign(&self, c: &NewCampaign) -> Result<i64, StoreError> {
        if c.meters.is_empty() {
            return Err(StoreError::InvalidRequest(
                "a campaign needs at least one meter".to_owned(),
            ));
        }
        if !(0.0..=1.0).contains(&c.success_threshold) {
            return Err(StoreError::InvalidRequest(format!(
                "success threshold {} is not a fraction between 0 and 1",
                c.success_threshold
            )));
        }
        check_distinct(&c.meters, "campaign")?;
        let created = micros(c.created_at)?;
        let first_stage = usize::try_from(c.first_stage).unwrap_or(usize::MAX);
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let firmware_exists = tx
            .prepare_cached("SELECT 1 FROM firmware WHERE id = ?1")?
            .query_row([c.firmware_id], |r| r.get::<_, i64>(0))
            .optional()?
            .is_some();
        if !firmware_exists {
            return Err(StoreError::NotFound(format!(
                "firmware {} (upload it first)",
                c.firmware_id
            )));
        }
        tx.prepare_cached(
            "INSERT INTO campaigns (firmware_id, first_stage, success_threshold, max_failures,
                                    created_by, created_at, state, stage, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', 1, ?6)",
        )?
        .execute(params![
            c.firmware_id,
            c.first_stage,
            c.success_threshold,
            c.max_failures,
            c.created_by,
            created
        ])?;
        let id = tx.last_insert_rowid();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO campaign_members (campaign, position, meter_id, stage)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (pos, m) in c.meters.iter().enumerate() {
                let stage: i64 = if pos < first_stage { 1 } else { 2 };
                insert.execute(params![id, position(pos), m.as_str(), stage])?;
            }
        }
        tx.commit()?;
        Ok(id)
    }

    fn campaign(&self, id: i64) -> Result<Option<StoredCampaign>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE id = ?1"
            ))?
            .query_row([id], CampaignRow::read)
            .optional()?;
        raw.map(CampaignRow::into_stored).transpose()
    }

    fn campaigns(&self) -> Result<Vec<StoredCampaign>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(&format!(
                "SELECT {CAMPAIGN_COLUMNS} FROM campaigns ORDER BY id"
            ))?
            .query_map([], CampaignRow::read)?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter().map(CampaignRow::into_stored).collect()
    }

    fn campaign_members(&self, id: i64) -> Result<Vec<CampaignMember>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(
                "SELECT m.meter_id, m.stage, m.command_id, c.status, c.outcome
                 FROM campaign_members AS m LEFT JOIN commands AS c ON c.id = m.command_id
                 WHERE m.campaign = ?1 ORDER BY m.position",
            )?
            .query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter()
            .map(|(meter, stage, command, status, outcome)| {
                Ok(CampaignMember {
                    meter_id: meter_id("campaign_members", &meter)?,
                    stage,
                    command_id: command.as_deref().map(command_id_from_sql).transpose()?,
                    status: status.as_deref().map(command_status_from_sql).transpose()?,
                    outcome,
                })
            })
            .collect()
    }

    fn set_campaign_member_command(
        &self,
        campaign: i64,
        meter: &MeterId,
        command: &CommandId,
    ) -> Result<(), StoreError> {
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let n = tx
            .prepare_cached(
                "UPDATE campaign_members SET command_id = ?3 WHERE campaign = ?1 AND meter_id = ?2",
            )?
            .execute(params![campaign, meter.as_str(), &command.0[..]])?;
        if n != 1 {
            return Err(StoreError::NotFound(format!(
                "meter {meter} in campaign {campaign}"
            )));
        }
        tx.commit()?;
        Ok(())
    }

    fn set_campaign_state(
        &self,
        id: i64,
        state: CampaignState,
        stage: u32,
        at: OffsetDateTime,
        note: Option<&str>,
    ) -> Result<(), StoreError> {
        if !(1..=2).contains(&stage) {
            return Err(StoreError::InvalidRequest(format!(
                "campaign stage {stage} does not exist (1 = pilot, 2 = the rest)"
            )));
        }
        let at = micros(at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let n = tx
            .prepare_cached(
                "UPDATE campaigns SET state = ?2, stage = ?3, updated_at = ?4, note = ?5
                 WHERE id = ?1",
            )?
            .execute(params![id, state.as_str(), stage, at, note])?;
        if n != 1 {
            return Err(StoreError::NotFound(format!("campaign {id}")));
        }
        tx.commit()?;
        Ok(())
    }
}

/// A `commands` row as read from SQL, before decoding.
struct CommandRow {
    seq: i64,
    id: Vec<u8>,
    meter_id: String,
    kind: String,
    args_json: String,
    counter: i64,
    issued_at: i64,
    expires_at: i64,
    envelope: Vec<u8>,
    issued_by: String,
    approved_by: Option<String>,
    proposal_id: Option<i64>,
    campaign_id: Option<i64>,
    status: String,
    sent_at: Option<i64>,
    attempts: u32,
    settled_at: Option<i64>,
    outcome: Option<String>,
    ack_message: Option<i64>,
}

impl CommandRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            seq: r.get(0)?,
            id: r.get(1)?,
            meter_id: r.get(2)?,
            kind: r.get(3)?,
            args_json: r.get(4)?,
            counter: r.get(5)?,
            issued_at: r.get(6)?,
            expires_at: r.get(7)?,
            envelope: r.get(8)?,
            issued_by: r.get(9)?,
            approved_by: r.get(10)?,
            proposal_id: r.get(11)?,
            campaign_id: r.get(12)?,
            status: r.get(13)?,
            sent_at: r.get(14)?,
            attempts: r.get(15)?,
            settled_at: r.get(16)?,
            outcome: r.get(17)?,
            ack_message: r.get(18)?,
        })
    }

    fn into_stored(self) -> Result<StoredCommand, StoreError> {
        const T: &str = "commands";
        let time = |t: i64| time_from_micros(T, t);
        Ok(StoredCommand {
            row: self.seq,
            id: command_id_from_sql(&self.id)?,
            meter_id: meter_id(T, &self.meter_id)?,
            kind: kind_from_sql(T, &self.kind)?,
            args_json: self.args_json,
            counter: counter_from_sql(self.counter),
            issued_at: time(self.issued_at)?,
            expires_at: time(self.expires_at)?,
            envelope: self.envelope,
            issued_by: self.issued_by,
            approved_by: self.approved_by,
            proposal_id: self.proposal_id,
            campaign_id: self.campaign_id,
            status: command_status_from_sql(&self.status)?,
            sent_at: self.sent_at.map(time).transpose()?,
            attempts: self.attempts,
            settled_at: self.settled_at.map(time).transpose()?,
            outcome: self.outcome,
            ack_message_id: self.ack_message,
        })
    }
}

/// Reads a proposal and its meters in `tx`.
fn load_proposal(tx: &Transaction<'_>, id: i64) -> Result<Option<StoredProposal>, StoreError> {
    const T: &str = "proposals";
    let Some(p) = tx
        .prepare_cached(&format!(
            "SELECT {PROPOSAL_COLUMNS} FROM proposals WHERE id = ?1"
        ))?
        .query_row([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, Option<i64>>(9)?,
                r.get::<_, Option<String>>(10)?,
            ))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let (id, kind, args_json, proposed_by, created, expires, reason, status, by, at, note) = p;
    let meters = tx
        .prepare_cached(
            "SELECT meter_id FROM proposal_meters WHERE proposal = ?1 ORDER BY position",
        )?
        .query_map([id], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .map(|m| meter_id("proposal_meters", m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(StoredProposal {
        id,
        kind: kind_from_sql(T, &kind)?,
        args_json,
        meters,
        proposed_by,
        created_at: time_from_micros(T, created)?,
        expires_at: time_from_micros(T, expires)?,
        reason,
        status: proposal_status_from_sql(&status)?,
        decided_by: by,
        decided_at: at.map(|t| time_from_micros(T, t)).transpose()?,
        note,
    }))
}

/// A `firmware` row (without the image) as read from SQL.
struct FirmwareRow {
    id: i64,
    digest: Vec<u8>,
    manifest: Vec<u8>,
    vendor_id: String,
    class_id: String,
    version: String,
    sequence: i64,
    uploaded_by: String,
    uploaded_at: i64,
    size: i64,
}

impl FirmwareRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            digest: r.get(1)?,
            manifest: r.get(2)?,
            vendor_id: r.get(3)?,
            class_id: r.get(4)?,
            version: r.get(5)?,
            sequence: r.get(6)?,
            uploaded_by: r.get(7)?,
            uploaded_at: r.get(8)?,
            size: r.get(9)?,
        })
    }

    fn into_stored(self) -> Result<StoredFirmware, StoreError> {
        const T: &str = "firmware";
        Ok(StoredFirmware {
            id: self.id,
            digest: super::sha_from_sql(T, &self.digest)?,
            manifest: self.manifest,
            vendor_id: self.vendor_id,
            class_id: self.class_id,
            version: self.version,
            sequence: counter_from_sql(self.sequence),
            uploaded_by: self.uploaded_by,
            uploaded_at: time_from_micros(T, self.uploaded_at)?,
            size: u64::try_from(self.size)
                .map_err(|_| corrupt(T, format!("firmware {} has size {}", self.id, self.size)))?,
        })
    }
}

/// A `campaigns` row as read from SQL.
struct CampaignRow {
    id: i64,
    firmware_id: i64,
    first_stage: u32,
    success_threshold: f64,
    max_failures: u32,
    created_by: String,
    created_at: i64,
    state: String,
    stage: u32,
    updated_at: i64,
    note: Option<String>,
}

impl CampaignRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            firmware_id: r.get(1)?,
            first_stage: r.get(2)?,
            success_threshold: r.get(3)?,
            max_failures: r.get(4)?,
            created_by: r.get(5)?,
            created_at: r.get(6)?,
            state: r.get(7)?,
            stage: r.get(8)?,
            updated_at: r.get(9)?,
            note: r.get(10)?,
        })
    }

    fn into_stored(self) -> Result<StoredCampaign, StoreError> {
        const T: &str = "campaigns";
        Ok(StoredCampaign {
            id: self.id,
            firmware_id: self.firmware_id,
            first_stage: self.first_stage,
            success_threshold: self.success_threshold,
            max_failures: self.max_failures,
            created_by: self.created_by,
            created_at: time_from_micros(T, self.created_at)?,
            state: self
                .state
                .parse()
                .map_err(|e: crate::commands::UnknownStatus| corrupt(T, e.to_string()))?,
            stage: self.stage,
            updated_at: time_from_micros(T, self.updated_at)?,
            note: self.note,
        })
    }
}

/// A stored command id (16 bytes).
fn command_id_from_sql(b: &[u8]) -> Result<CommandId, StoreError> {
    <[u8; 16]>::try_from(b)
        .map(CommandId)
        .map_err(|_| corrupt("commands", format!("command id of {} bytes", b.len())))
}

fn kind_from_sql(table: &'static str, s: &str) -> Result<CommandKind, StoreError> {
    s.parse()
        .map_err(|_| corrupt(table, format!("unknown command kind {s:?}")))
}

fn command_status_from_sql(s: &str) -> Result<CommandStatus, StoreError> {
    s.parse()
        .map_err(|e: crate::commands::UnknownStatus| corrupt("commands", e.to_string()))
}

fn proposal_status_from_sql(s: &str) -> Result<ProposalStatus, StoreError> {
    s.parse()
        .map_err(|e: crate::commands::UnknownStatus| corrupt("proposals", e.to_string()))
}

/// A list position as SQL's integer.
fn position(pos: usize) -> i64 {
    i64::try_from(pos).unwrap_or(i64::MAX)
}

/// [`StoreError::Conflict`] if `meters` lists a meter twice.
fn check_distinct(meters: &[MeterId], what: &str) -> Result<(), StoreError> {
    let mut seen = HashSet::with_capacity(meters.len());
    for m in meters {
        if !seen.insert(m.as_str()) {
            return Err(StoreError::Conflict(format!(
                "meter {m} is listed twice in the {what}"
            )));
        }
    }
    Ok(())
}

/// A foreign-key violation (the bundled SQLite enforces them) as [`StoreError::NotFound`], a
/// unique-constraint violation as [`StoreError::Conflict`], both naming `what`; other errors as
/// they are.
fn conflict(e: rusqlite::Error, what: String) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
        {
            StoreError::NotFound(format!(
                "the proposal or campaign that {what} refers to (store it first)"
            ))
        }
        rusqlite::Error::SqliteFailure(f, msg) if f.code == ErrorCode::ConstraintViolation => {
            StoreError::Conflict(match msg {
                Some(m) => format!("{what} ({m})"),
                None => what,
            })
        }
        _ => StoreError::Sqlite(e),
    }
}
