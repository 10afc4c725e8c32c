//! [`AlarmStore`] for [`SqliteStore`]: the tables of schema version 4 (see [`super::schema`]).
//!
//! Every write takes the writer connection and a durable (`synchronous = FULL`, `BEGIN
//! IMMEDIATE`) transaction. A raise looks up the active alarm of its key and updates or inserts
//! inside that transaction, so two raises of one key (from two threads, or from two processes
//! on the same file) are serialised and fold into one alarm; the partial unique index
//! `alarms_active` would refuse a second active row anyway. Acknowledgements and clears read
//! the state and change it in one transaction too, so each transition happens once.
//!
//! ## Evidence
//!
//! `evidence_json` is stored as a JSON array. A raise's evidence that is a JSON array
//! contributes its entries; any other JSON value is one entry; text that is not JSON at all is
//! one entry, a JSON string holding that text; empty (or blank) text contributes nothing. On a
//! repeat the entries are appended to the stored ones, and the array keeps the first
//! [`EVIDENCE_HEAD`] and the last [`EVIDENCE_TAIL`] entries (the start of the burst and its
//! latest part; [`StoredAlarm::count`] still counts every raise). A stored value that is not an
//! array (changed outside Gridward) is read by the same rules rather than refused, so a damaged
//! row cannot block its alarm from being raised again.

use gridward_core::MeterId;
use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde_json::Value;
use time::OffsetDateTime;

use super::{SqliteStore, corrupt, meter_id, micros, sql_limit, time_from_micros};
use crate::alarms::{
    AlarmChangeError, AlarmQuery, AlarmState, AlarmStore, RaiseAlarm, RaiseOutcome, StoredAlarm,
};
use crate::error::StoreError;

/// How many of an alarm's first evidence entries are kept.
pub(crate) const EVIDENCE_HEAD: usize = 10;

/// How many of an alarm's latest evidence entries are kept.
pub(crate) const EVIDENCE_TAIL: usize = 40;

/// The severity codes, most severe first.
const SEVERITIES: [&str; 4] = ["critical", "major", "minor", "warning"];

/// The columns of `alarms`, in the order [`AlarmRow::read`] reads them.
const ALARM_COLUMNS: &str = "id, alarm_type, severity, originator, state, first_seen, last_seen,
    count, summary, evidence_json, acked_by, acked_at, cleared_by, cleared_at, clear_reason";

/// The rank of a severity code (0 is the most severe), `None` for an unknown code.
fn severity_rank(code: &str) -> Option<usize> {
    SEVERITIES.iter().position(|s| *s == code)
}

/// The evidence entries `json` contributes (see the [module documentation](self)).
fn evidence_entries(json: &str) -> Vec<Value> {
    if json.trim().is_empty() {
        return Vec::new();
    }
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Array(entries)) => entries,
        Ok(other) => vec![other],
        Err(_) => vec![Value::String(json.to_owned())],
    }
}

/// `entries` cut to the first [`EVIDENCE_HEAD`] and the last [`EVIDENCE_TAIL`], as JSON text.
fn evidence_text(mut entries: Vec<Value>) -> Result<String, StoreError> {
    if entries.len() > EVIDENCE_HEAD + EVIDENCE_TAIL {
        let tail_start = entries.len() - EVIDENCE_TAIL;
        entries.drain(EVIDENCE_HEAD..tail_start);
    }
    serde_json::to_string(&Value::Array(entries))
        .map_err(|e| StoreError::InvalidRequest(format!("evidence cannot be encoded: {e}")))
}

/// Refuses an empty actor (acknowledging and clearing are audited: someone did it).
fn check_actor(by: &str) -> Result<(), StoreError> {
    if by.trim().is_empty() {
        return Err(StoreError::InvalidRequest(
            "the actor of an alarm change must not be empty".to_owned(),
        ));
    }
    Ok(())
}

/// A row of `alarms` as SQLite returns it.
#[derive(Debug)]
struct AlarmRow {
    id: i64,
    alarm_type: String,
    severity: String,
    originator: String,
    state: String,
    first_seen: i64,
    last_seen: i64,
    count: i64,
    summary: String,
    evidence_json: String,
    acked_by: Option<String>,
    acked_at: Option<i64>,
    cleared_by: Option<String>,
    cleared_at: Option<i64>,
    clear_reason: Option<String>,
}

impl AlarmRow {
    fn read(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            alarm_type: r.get(1)?,
            severity: r.get(2)?,
            originator: r.get(3)?,
            state: r.get(4)?,
            first_seen: r.get(5)?,
            last_seen: r.get(6)?,
            count: r.get(7)?,
            summary: r.get(8)?,
            evidence_json: r.get(9)?,
            acked_by: r.get(10)?,
            acked_at: r.get(11)?,
            cleared_by: r.get(12)?,
            cleared_at: r.get(13)?,
            clear_reason: r.get(14)?,
        })
    }

    fn into_stored(self) -> Result<StoredAlarm, StoreError> {
        let id = self.id;
        let bad = |what: &str| corrupt("alarms", format!("alarm {id}: {what}"));
        let state = AlarmState::from_code(&self.state)
            .ok_or_else(|| bad(&format!("unknown state {:?}", self.state)))?;
        let count = u64::try_from(self.count).map_err(|_| bad("negative count"))?;
        let acknowledged = match (self.acked_by, self.acked_at) {
            (Some(by), Some(at)) => Some((by, time_from_micros("alarms", at)?)),
            (None, None) => None,
            _ => return Err(bad("acknowledgement without actor or time")),
        };
        let cleared = match (self.cleared_by, self.cleared_at, self.clear_reason) {
            (Some(by), Some(at), Some(reason)) => {
                Some((by, time_from_micros("alarms", at)?, reason))
            }
            (None, None, None) => None,
            _ => return Err(bad("clearing without actor, time or reason")),
        };
        Ok(StoredAlarm {
            id,
            alarm_type: self.alarm_type,
            severity: self.severity,
            originator: self.originator,
            state,
            first_seen: time_from_micros("alarms", self.first_seen)?,
            last_seen: time_from_micros("alarms", self.last_seen)?,
            count,
            summary: self.summary,
            evidence_json: self.evidence_json,
            acknowledged,
            cleared,
        })
    }
}

/// The alarm `id` as stored, read inside `tx`.
fn alarm_in(tx: &Transaction<'_>, id: i64) -> Result<Option<StoredAlarm>, StoreError> {
    tx.prepare_cached(&format!("SELECT {ALARM_COLUMNS} FROM alarms WHERE id = ?1"))?
        .query_row([id], AlarmRow::read)
        .optional()?
        .map(AlarmRow::into_stored)
        .transpose()
}

/// The alarm `id` after a write that just changed it inside `tx`.
fn changed_alarm(tx: &Transaction<'_>, id: i64) -> Result<StoredAlarm, StoreError> {
    alarm_in(tx, id)?.ok_or_else(|| corrupt("alarms", format!("alarm {id} vanished")))
}

/// Clears alarm `id` (known to be active) inside `tx`.
fn clear_in(
    tx: &Transaction<'_>,
    id: i64,
    by: &str,
    at: i64,
    reason: &str,
) -> Result<StoredAlarm, StoreError> {
    tx.prepare_cached(
        "UPDATE alarms SET state = 'cleared', cleared_by = ?2, cleared_at = ?3, clear_reason = ?4
         WHERE id = ?1 AND state <> 'cleared'",
    )?
    .execute(params![id, by, at, reason])?;
    changed_alarm(tx, id)
}

/// Acknowledges alarm `id` (known to be active and unacknowledged) inside `tx`.
fn acknowledge_in(
    tx: &Transaction<'_>,
    id: i64,
    by: &str,
    at: i64,
) -> Result<StoredAlarm, StoreError> {
    tx.prepare_cached(
        "UPDATE alarms SET state = 'active_acknowledged', acked_by = ?2, acked_at = ?3
         WHERE id = ?1 AND state = 'active_unacknowledged'",
    )?
    .execute(params![id, by, at])?;
    changed_alarm(tx, id)
}

/// The state of alarm `id`, or why it cannot change: missing or cleared.
fn changeable_state(tx: &Transaction<'_>, id: i64) -> Result<AlarmState, AlarmChangeError> {
    let read = || -> Result<Option<String>, StoreError> {
        Ok(tx
            .prepare_cached("SELECT state FROM alarms WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    };
    let state = read()?;
    let state = state.ok_or(AlarmChangeError::NotFound(id))?;
    match AlarmState::from_code(&state) {
        Some(AlarmState::Cleared) => Err(AlarmChangeError::Cleared(id)),
        Some(s) => Ok(s),
        None => Err(corrupt("alarms", format!("alarm {id}: unknown state {state:?}")).into()),
    }
}

impl AlarmStore for SqliteStore {
    fn raise_alarm(&self, raise: &RaiseAlarm) -> Result<RaiseOutcome, StoreError> {
        let rank = severity_rank(&raise.severity).ok_or_else(|| {
            StoreError::InvalidRequest(format!("unknown severity {:?}", raise.severity))
        })?;
        if raise.alarm_type.is_empty() || raise.originator.is_empty() {
            return Err(StoreError::InvalidRequest(
                "an alarm needs a type and an originator".to_owned(),
            ));
        }
        let at = micros(raise.at)?;
        let incoming = evidence_entries(&raise.evidence_json);
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let active: Option<(i64, String, String)> = tx
            .prepare_cached(
                "SELECT id, severity, evidence_json FROM alarms
                 WHERE alarm_type = ?1 AND originator = ?2 AND state <> 'cleared'",
            )?
            .query_row(params![raise.alarm_type, raise.originator], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let outcome = match active {
            Some((id, severity, evidence)) => {
                let stored_rank = severity_rank(&severity).ok_or_else(|| {
                    corrupt(
                        "alarms",
                        format!("alarm {id}: unknown severity {severity:?}"),
                    )
                })?;
                let severity = if rank < stored_rank {
                    raise.severity.as_str()
                } else {
                    severity.as_str()
                };
                let mut entries = evidence_entries(&evidence);
                entries.extend(incoming);
                tx.prepare_cached(
                    "UPDATE alarms SET severity = ?2, first_seen = min(first_seen, ?3),
                         last_seen = max(last_seen, ?3),
                         count = CASE WHEN count < 9223372036854775807 THEN count + 1 ELSE count END,
                         summary = ?4, evidence_json = ?5
                     WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    severity,
                    at,
                    raise.summary,
                    evidence_text(entries)?
                ])?;
                RaiseOutcome::Updated(changed_alarm(&tx, id)?)
            }
            None => {
                tx.prepare_cached(
                    "INSERT INTO alarms (alarm_type, severity, originator, first_seen, last_seen,
                                         count, summary, evidence_json)
                     VALUES (?1, ?2, ?3, ?4, ?4, 1, ?5, ?6)",
                )?
                .execute(params![
                    raise.alarm_type,
                    raise.severity,
                    raise.originator,
                    at,
                    raise.summary,
                    evidence_text(incoming)?
                ])?;
                RaiseOutcome::New(changed_alarm(&tx, tx.last_insert_rowid())?)
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    fn acknowledge_alarm(
        &self,
        id: i64,
        by: &str,
        at: OffsetDateTime,
    ) -> Result<StoredAlarm, AlarmChangeError> {
        check_actor(by)?;
        let at = micros(at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        if changeable_state(&tx, id)? == AlarmState::ActiveAcknowledged {
            return Err(AlarmChangeError::AlreadyAcknowledged(id));
        }
        let alarm = acknowledge_in(&tx, id, by, at)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(alarm)
    }

    fn clear_alarm(
        &self,
        id: i64,
        by: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<StoredAlarm, AlarmChangeError> {
        check_actor(by)?;
        let at = micros(at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        changeable_state(&tx, id)?;
        let alarm = clear_in(&tx, id, by, at, reason)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(alarm)
    }

    fn clear_active_alarm(
        &self,
        alarm_type: &str,
        originator: &str,
        by: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<Option<StoredAlarm>, StoreError> {
        check_actor(by)?;
        let at = micros(at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let active: Option<i64> = tx
            .prepare_cached(
                "SELECT id FROM alarms
                 WHERE alarm_type = ?1 AND originator = ?2 AND state <> 'cleared'",
            )?
            .query_row(params![alarm_type, originator], |r| r.get(0))
            .optional()?;
        let Some(id) = active else {
            return Ok(None);
        };
        let alarm = clear_in(&tx, id, by, at, reason)?;
        tx.commit()?;
        Ok(Some(alarm))
    }

    fn alarm(&self, id: i64) -> Result<Option<StoredAlarm>, StoreError> {
        let conn = self.reader();
        conn.prepare_cached(&format!("SELECT {ALARM_COLUMNS} FROM alarms WHERE id = ?1"))?
            .query_row([id], AlarmRow::read)
            .optional()?
            .map(AlarmRow::into_stored)
            .transpose()
    }

    fn alarms(&self, q: &AlarmQuery) -> Result<Vec<StoredAlarm>, StoreError> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        // Only the filters given, so the planner picks the matching index.
        let mut sql = format!("SELECT {ALARM_COLUMNS} FROM alarms WHERE 1");
        let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        if q.active_only {
            sql.push_str(" AND state <> 'cleared'");
        }
        if let Some(t) = &q.alarm_type {
            args.push(Box::new(t.clone()));
            sql.push_str(&format!(" AND alarm_type = ?{}", args.len()));
        }
        if let Some(s) = &q.severity {
            args.push(Box::new(s.clone()));
            sql.push_str(&format!(" AND severity = ?{}", args.len()));
        }
        if let Some(o) = &q.originator {
            args.push(Box::new(o.clone()));
            sql.push_str(&format!(" AND originator = ?{}", args.len()));
        }
        if let Some(b) = q.before {
            args.push(Box::new(b));
            sql.push_str(&format!(" AND id < ?{}", args.len()));
        }
        args.push(Box::new(sql_limit(q.limit)));
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
        let conn = self.reader();
        let raw = conn
            .prepare_cached(&sql)?
            .query_map(
                rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())),
                AlarmRow::read,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        raw.into_iter().map(AlarmRow::into_stored).collect()
    }

    fn active_alarm_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(
                "SELECT severity, count(*) FROM alarms WHERE state <> 'cleared' GROUP BY severity",
            )?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut counts: Vec<(String, u64)> = raw
            .into_iter()
            .map(|(s, n)| (s, u64::try_from(n).unwrap_or(0)))
            .collect();
        // Most severe first.
        counts.sort_by_key(|(s, _)| severity_rank(s).unwrap_or(usize::MAX));
        Ok(counts)
    }

    fn attach_meters(
        &self,
        concentrator: &MeterId,
        meters: &[MeterId],
        at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        if meters.contains(concentrator) {
            return Err(StoreError::InvalidRequest(format!(
                "concentrator {concentrator} cannot be registered behind itself"
            )));
        }
        if meters.is_empty() {
            return Ok(0);
        }
        let at = micros(at)?;
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let mut changed = 0u64;
        {
            // Unchanged rows (already behind this concentrator) are left alone, attach time too.
            let mut upsert = tx.prepare_cached(
                "INSERT INTO concentrator_meters (meter_id, concentrator_id, attached_at)
                 VALUES (?1, ?2, ?3)
                 ON CONFLICT (meter_id) DO UPDATE
                 SET concentrator_id = excluded.concentrator_id, attached_at = excluded.attached_at
                 WHERE concentrator_id <> excluded.concentrator_id",
            )?;
            for m in meters {
                let n = upsert.execute(params![m.as_str(), concentrator.as_str(), at])?;
                changed += u64::try_from(n).unwrap_or(0);
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    fn detach_meters(&self, concentrator: &MeterId, meters: &[MeterId]) -> Result<u64, StoreError> {
        if meters.is_empty() {
            return Ok(0);
        }
        let mut conn = self.writer();
        let tx = Self::durable_tx(&mut conn)?;
        let mut removed = 0u64;
        {
            let mut delete = tx.prepare_cached(
                "DELETE FROM concentrator_meters WHERE meter_id = ?1 AND concentrator_id = ?2",
            )?;
            for m in meters {
                let n = delete.execute(params![m.as_str(), concentrator.as_str()])?;
                removed += u64::try_from(n).unwrap_or(0);
            }
        }
        tx.commit()?;
        Ok(removed)
    }

    fn concentrator_meters(&self, concentrator: &MeterId) -> Result<Vec<MeterId>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(
                "SELECT meter_id FROM concentrator_meters WHERE concentrator_id = ?1
                 ORDER BY meter_id",
            )?
            .query_map([concentrator.as_str()], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        raw.iter()
            .map(|m| meter_id("concentrator_meters", m))
            .collect()
    }

    fn concentrator_of(&self, meter: &MeterId) -> Result<Option<MeterId>, StoreError> {
        let conn = self.reader();
        let found: Option<String> = conn
            .prepare_cached("SELECT concentrator_id FROM concentrator_meters WHERE meter_id = ?1")?
            .query_row([meter.as_str()], |r| r.get(0))
            .optional()?;
        found
            .map(|c| meter_id("concentrator_meters", &c))
            .transpose()
    }

    fn topology(&self) -> Result<Vec<(MeterId, MeterId)>, StoreError> {
        let conn = self.reader();
        let raw = conn
            .prepare_cached(
                "SELECT concentrator_id, meter_id FROM concentrator_meters
                 ORDER BY concentrator_id, meter_id",
            )?
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        raw.iter()
            .map(|(c, m)| {
                Ok((
                    meter_id("concentrator_meters", c)?,
                    meter_id("concentrator_meters", m)?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn evidence_is_parsed_leniently() {
        assert_eq!(evidence_entries(""), Vec::<Value>::new());
        assert_eq!(evidence_entries("  "), Vec::<Value>::new());
        assert_eq!(
            evidence_entries("[1, \"a\"]"),
            vec![Value::from(1), Value::from("a")]
        );
        assert_eq!(
            evidence_entries("{\"k\": 1}"),
            vec![serde_json::json!({"k": 1})]
        );
        assert_eq!(evidence_entries("[1,"), vec![Value::String("[1,".into())]);
        // Nesting beyond serde_json's recursion limit is an error there, a string here.
        let deep = "[".repeat(10_000);
        assert_eq!(evidence_entries(&deep), vec![Value::String(deep.clone())]);
    }

    #[test]
    fn evidence_keeps_the_first_ten_and_the_last_forty() {
        let text = evidence_text((0..100).map(Value::from).collect()).unwrap();
        let kept: Vec<i64> = serde_json::from_str(&text).unwrap();
        let want: Vec<i64> = (0..10).chain(60..100).collect();
        assert_eq!(kept, want);
        let text = evidence_text((0..50).map(Value::from).collect()).unwrap();
        let kept: Vec<i64> = serde_json::from_str(&text).unwrap();
        assert_eq!(kept, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn severities_rank_critical_first() {
        assert!(severity_rank("critical") < severity_rank("major"));
        assert!(severity_rank("major") < severity_rank("minor"));
        assert!(severity_rank("minor") < severity_rank("warning"));
        assert_eq!(severity_rank("Critical"), None);
    }
}
