//! The outbox tables of [`SqliteStore`](super::SqliteStore) (schema version 2).
//!
//! `outbox.state` is 0 for a pending row, 1 for a delivered one, 2 for a dead letter.

use gridward_vault::{Field, Keyring};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use time::OffsetDateTime;

use super::keys;
use super::{corrupt, counter_from_sql, meter_id, micros, sql_limit, time_from_micros};
use crate::error::StoreError;
use crate::outbox::{DeadLetter, OutboxItem, OutboxStats, Settlement, TargetId};

/// Longest error text kept per row: a target's answer may be large.
const MAX_ERROR_LEN: usize = 500;

/// Queues the stored message `message` for every target (inside the commit's transaction).
pub(super) fn enqueue(
    tx: &Transaction<'_>,
    message: i64,
    targets: &[TargetId],
) -> Result<(), StoreError> {
    let mut insert = tx.prepare_cached("INSERT INTO outbox (target, message) VALUES (?1, ?2)")?;
    for target in targets {
        insert.execute(params![target.0, message])?;
    }
    Ok(())
}

pub(super) fn register_target(tx: &Transaction<'_>, name: &str) -> Result<TargetId, StoreError> {
    tx.prepare_cached(
        "INSERT INTO outbox_targets (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
    )?
    .execute([name])?;
    let id = tx
        .prepare_cached("SELECT id FROM outbox_targets WHERE name = ?1")?
        .query_row([name], |r| r.get(0))?;
    Ok(TargetId(id))
}

pub(super) fn pending(
    conn: &Connection,
    target: TargetId,
    limit: usize,
    ring: &Keyring,
) -> Result<Vec<OutboxItem>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.id, o.message, o.attempts, mt.meter_id, m.counter, m.taken_at, m.energy_kwh,
                m.received_at, m.envelope, m.key_id, m.sealed_value
         FROM outbox AS o INDEXED BY outbox_pending
              JOIN messages AS m ON m.id = o.message
              JOIN meters AS mt ON mt.id = m.meter
         WHERE o.target = ?1 AND o.state = 0
         ORDER BY o.id LIMIT ?2",
    )?;
    let raw = stmt
        .query_map(params![target.0, sql_limit(limit)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, Option<f64>>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, Vec<u8>>(8)?,
                r.get::<_, Option<i64>>(9)?,
                r.get::<_, Option<Vec<u8>>>(10)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    raw.into_iter()
        .map(
            |(
                id,
                message,
                attempts,
                meter,
                counter,
                taken_at,
                kwh,
                received_at,
                envelope,
                key,
                sealed,
            )| {
                let counter = counter_from_sql(counter);
                let (kwh, envelope) = match (key, sealed) {
                    (None, _) => (kwh, envelope),
                    (Some(_), Some(sealed)) => {
                        let open = |field, bytes: &[u8]| match keys::open(
                            ring, "messages", message, field, &meter, counter, bytes,
                        )? {
                            keys::Opened::Value(v) => Ok(v),
                            keys::Opened::Shredded => Err(StoreError::KeyDestroyed {
                                key_id: Keyring::key_id_of(bytes).unwrap_or(0),
                            }),
                        };
                        let value = open(Field::ReadingValue, &sealed)?;
                        let value = <[u8; 8]>::try_from(value.as_slice()).map_err(|_| {
                            corrupt(
                                "messages",
                                format!("sealed value of {message} is not 8 bytes"),
                            )
                        })?;
                        (
                            Some(f64::from_le_bytes(value)),
                            open(Field::Envelope, &envelope)?.to_vec(),
                        )
                    }
                    (Some(_), None) => {
                        return Err(corrupt(
                            "messages",
                            format!("sealed reading {message} has no value"),
                        ));
                    }
                };
                Ok(OutboxItem {
                    id,
                    target,
                    message_id: message,
                    meter_id: meter_id("meters", &meter)?,
                    counter,
                    taken_at: time_from_micros("messages", taken_at)?,
                    energy_kwh: kwh.ok_or_else(|| {
                        corrupt(
                            "outbox",
                            format!("row {id} points to a message without energy"),
                        )
                    })?,
                    queued_at: time_from_micros("messages", received_at)?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    envelope,
                })
            },
        )
        .collect()
}

pub(super) fn settle(
    tx: &Transaction<'_>,
    settlement: &Settlement,
    at: OffsetDateTime,
) -> Result<(), StoreError> {
    let at = micros(at)?;
    {
        let mut delivered = tx.prepare_cached(
            "UPDATE outbox SET state = 1, settled_at = ?2, last_error = NULL
             WHERE id = ?1 AND state = 0",
        )?;
        for id in &settlement.delivered {
            delivered.execute(params![id, at])?;
        }
    }
    {
        let mut failed = tx.prepare_cached(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE id = ?1 AND state = 0",
        )?;
        for (id, error) in &settlement.failed {
            failed.execute(params![id, truncate(error)])?;
        }
    }
    let mut dead = tx.prepare_cached(
        "UPDATE outbox SET state = 2, attempts = attempts + 1, settled_at = ?2, last_error = ?3
         WHERE id = ?1 AND state = 0",
    )?;
    for (id, reason) in &settlement.dead {
        dead.execute(params![id, at, truncate(reason)])?;
    }
    Ok(())
}

pub(super) fn stats(tx: &Transaction<'_>) -> Result<Vec<OutboxStats>, StoreError> {
    let targets: Vec<(i64, String)> = tx
        .prepare_cached("SELECT id, name FROM outbox_targets ORDER BY name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(targets.len());
    for (id, name) in targets {
        let mut counts = [0u64; 3];
        let mut stmt = tx.prepare_cached(
            "SELECT state, COUNT(*) FROM outbox WHERE target = ?1 GROUP BY state",
        )?;
        let rows = stmt.query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            if let Some(slot) = usize::try_from(state).ok().and_then(|s| counts.get_mut(s)) {
                *slot = u64::try_from(n).unwrap_or(0);
            }
        }
        let oldest: Option<i64> = tx
            .prepare_cached(
                "SELECT m.received_at FROM outbox AS o INDEXED BY outbox_pending
                 JOIN messages AS m ON m.id = o.message
                 WHERE o.target = ?1 AND o.state = 0 ORDER BY o.id LIMIT 1",
            )?
            .query_row([id], |r| r.get(0))
            .optional()?;
        out.push(OutboxStats {
            target: name,
            pending: counts[0],
            delivered: counts[1],
            dead: counts[2],
            oldest_pending: oldest
                .map(|t| time_from_micros("messages", t))
                .transpose()?,
        });
    }
    Ok(out)
}

pub(super) fn dead(
    conn: &Connection,
    target: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.id, t.name, mt.meter_id, m.counter, o.attempts, o.settled_at, o.last_error
         FROM outbox AS o INDEXED BY outbox_dead
              JOIN outbox_targets AS t ON t.id = o.target
              JOIN messages AS m ON m.id = o.message
              JOIN meters AS mt ON mt.id = m.meter
         WHERE o.state = 2 AND (?1 IS NULL OR t.name = ?1)
         ORDER BY o.id LIMIT ?2",
    )?;
    let raw = stmt
        .query_map(params![target, sql_limit(limit)], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    raw.into_iter()
        .map(|(id, target, meter, counter, attempts, at, reason)| {
            let at = at.ok_or_else(|| corrupt("outbox", format!("dead row {id} has no time")))?;
            Ok(DeadLetter {
                id,
                target,
                meter_id: meter_id("meters", &meter)?,
                counter: counter_from_sql(counter),
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                dead_at: time_from_micros("outbox", at)?,
                reason: reason.unwrap_or_default(),
            })
        })
        .collect()
}

pub(super) fn retry(
    tx: &Transaction<'_>,
    target: Option<&str>,
    ids: &[i64],
) -> Result<u64, StoreError> {
    let mut n = 0usize;
    if ids.is_empty() {
        n += tx
            .prepare_cached(
                "UPDATE outbox SET state = 0, attempts = 0, settled_at = NULL
                 WHERE state = 2
                   AND (?1 IS NULL OR target = (SELECT id FROM outbox_targets WHERE name = ?1))",
            )?
            .execute([target])?;
    } else {
        let mut stmt = tx.prepare_cached(
            "UPDATE outbox SET state = 0, attempts = 0, settled_at = NULL
             WHERE id = ?1 AND state = 2
               AND (?2 IS NULL OR target = (SELECT id FROM outbox_targets WHERE name = ?2))",
        )?;
        for id in ids {
            n += stmt.execute(params![id, target])?;
        }
    }
    Ok(u64::try_from(n).unwrap_or(u64::MAX))
}

/// `s` cut to [`MAX_ERROR_LEN`] bytes at a character boundary.
fn truncate(s: &str) -> &str {
    if s.len() <= MAX_ERROR_LEN {
        return s;
    }
    let mut end = MAX_ERROR_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
