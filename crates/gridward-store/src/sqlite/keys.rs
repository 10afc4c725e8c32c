//! The store's side of encryption at rest: the `vault` and `data_keys` tables, the keys in
//! memory, and sealing and opening the columns that hold readings (see [`crate::keys`]).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use gridward_vault::{
    Context, DataKey, Field, Fingerprint, Kdf, KdfParams, Kek, Keyring, OpenError,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;

use super::{micros, time_from_micros};
use crate::error::StoreError;
use crate::keys::{DataKeyInfo, KeySource, KeyStatus};

/// Messages sealed per transaction when sealing rows written before version 5.
const LEGACY_BATCH: usize = 2000;

/// A message written before version 5: id, meter, counter, kind, register, envelope.
type LegacyRow = (i64, String, i64, i64, Option<f64>, Vec<u8>);

/// The `vault` row.
#[derive(Debug)]
struct VaultRow {
    fingerprint: Vec<u8>,
    kdf: String,
    salt: Option<Vec<u8>>,
    params: Option<(i64, i64, i64)>,
    generation: i64,
}

/// The keys in memory.
#[derive(Debug)]
pub(super) struct Keys {
    kek: Arc<Kek>,
    pub(super) ring: Keyring,
    generation: i64,
    /// When the active key was made (µs).
    active_created: i64,
    /// The keys were re-wrapped by another process under a key-encryption key this process
    /// cannot get (a new passphrase): it keeps the data keys it holds and starts none.
    kek_stale: bool,
}

/// The keys of an open store, reloaded when another process changes them.
#[derive(Debug)]
pub(super) struct Vault {
    source: KeySource,
    keys: RwLock<Keys>,
    /// The data key period in µs.
    period: AtomicI64,
}

fn read_row(conn: &Connection) -> Result<Option<VaultRow>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT kek_fingerprint, kdf, salt, m_kib, t, p, generation FROM vault WHERE id = 1",
        )?
        .query_row([], |r| {
            let params = match (r.get::<_, Option<i64>>(3)?, r.get(4)?, r.get(5)?) {
                (Some(m), Some(t), Some(p)) => Some((m, t, p)),
                _ => None,
            };
            Ok(VaultRow {
                fingerprint: r.get(0)?,
                kdf: r.get(1)?,
                salt: r.get(2)?,
                params,
                generation: r.get(6)?,
            })
        })
        .optional()?)
}

/// The `vault` row of a database whose keys are loaded already.
fn existing_row(conn: &Connection) -> Result<VaultRow, StoreError> {
    read_row(conn)?.ok_or_else(|| super::corrupt("vault", "the vault row is gone".into()))
}

/// The key-encryption key `source` names, given the database's `vault` row (if any).
fn resolve(source: &KeySource, row: Option<&VaultRow>) -> Result<Arc<Kek>, StoreError> {
    match source {
        KeySource::File { path, create } => {
            if row.is_some_and(|r| r.kdf == "argon2id") {
                return Err(StoreError::KeyKindMismatch(
                    "this database's keys are wrapped by a passphrase, not a key file: give the passphrase (`[store] passphrase_env`)",
                ));
            }
            if path.exists() {
                Ok(Arc::new(Kek::load(path)?))
            } else if row.is_none() && *create {
                Ok(Arc::new(Kek::create_file(path)?))
            } else {
                Err(StoreError::KeyFileMissing { path: path.clone() })
            }
        }
        KeySource::Passphrase { passphrase, params } => {
            let (salt, params) = match row {
                None => (Kek::new_salt()?, *params),
                Some(r) if r.kdf == "argon2id" => {
                    let salt = r
                        .salt
                        .as_deref()
                        .and_then(|s| <[u8; 16]>::try_from(s).ok())
                        .ok_or_else(|| super::corrupt("vault", "salt is not 16 bytes".into()))?;
                    let (m, t, p) = r
                        .params
                        .ok_or_else(|| super::corrupt("vault", "no Argon2id parameters".into()))?;
                    let int = |v: i64| {
                        u32::try_from(v)
                            .map_err(|_| super::corrupt("vault", format!("Argon2id parameter {v}")))
                    };
                    (
                        salt,
                        KdfParams {
                            m_kib: int(m)?,
                            t: int(t)?,
                            p: int(p)?,
                        },
                    )
                }
                Some(_) => {
                    return Err(StoreError::KeyKindMismatch(
                        "this database's keys are wrapped by a key file, not a passphrase: give the key file (`[store] key_file`)",
                    ));
                }
            };
            Ok(Arc::new(Kek::from_passphrase(passphrase, salt, params)?))
        }
        KeySource::Memory(kek) => Ok(Arc::clone(kek)),
    }
}

fn check_fingerprint(row: &VaultRow, kek: &Kek) -> Result<(), StoreError> {
    let expected = <[u8; 16]>::try_from(row.fingerprint.as_slice())
        .map(Fingerprint)
        .map_err(|_| super::corrupt("vault", "fingerprint is not 16 bytes".into()))?;
    if expected != kek.fingerprint() {
        return Err(StoreError::KeyMismatch {
            expected,
            given: kek.fingerprint(),
        });
    }
    Ok(())
}

/// Writes the `vault` row for `kek` (insert or replace), keeping `generation` + 1.
fn write_row(conn: &Connection, kek: &Kek, generation: i64) -> Result<(), StoreError> {
    let (kdf, salt, params) = match kek.kdf() {
        Kdf::KeyFile => ("key_file", None, None),
        Kdf::Argon2id { salt, params } => ("argon2id", Some(salt.to_vec()), Some(params)),
    };
    conn.prepare_cached(
        "INSERT INTO vault (id, kek_fingerprint, kdf, salt, m_kib, t, p, generation)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (id) DO UPDATE SET kek_fingerprint = excluded.kek_fingerprint,
             kdf = excluded.kdf, salt = excluded.salt, m_kib = excluded.m_kib, t = excluded.t,
             p = excluded.p, generation = excluded.generation",
    )?
    .execute(params![
        kek.fingerprint().0.to_vec(),
        kdf,
        salt,
        params.map(|p| p.m_kib),
        params.map(|p| p.t),
        params.map(|p| p.p),
        generation
    ])?;
    Ok(())
}

fn bump_generation(conn: &Connection) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE vault SET generation = generation + 1 WHERE id = 1",
        [],
    )?;
    Ok(())
}

/// Makes data key `max(id) + 1`, stores it wrapped, and returns its id.
fn new_data_key(conn: &Connection, kek: &Kek, now: i64) -> Result<u32, StoreError> {
    let last: Option<i64> = conn.query_row("SELECT max(id) FROM data_keys", [], |r| r.get(0))?;
    let id = u32::try_from(last.unwrap_or(0) + 1)
        .map_err(|_| StoreError::InvalidRequest("no data key ids left".into()))?;
    let (_, wrapped) = DataKey::generate(id, kek)?;
    conn.prepare_cached("INSERT INTO data_keys (id, created_at, wrapped) VALUES (?1, ?2, ?3)")?
        .execute(params![id, now, wrapped])?;
    Ok(id)
}

/// Loads and unwraps every live data key, and notes the destroyed ones.
fn load_keys(conn: &Connection, kek: Arc<Kek>, generation: i64) -> Result<Keys, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT id, created_at, wrapped FROM data_keys ORDER BY id")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut ring = Keyring::new();
    let mut active_created = 0;
    for (id, created, wrapped) in rows {
        let id =
            u32::try_from(id).map_err(|_| super::corrupt("data_keys", format!("key id {id}")))?;
        match wrapped {
            Some(wrapped) => {
                ring.insert(kek.unwrap_key(id, &wrapped)?);
                active_created = created;
            }
            None => ring.mark_destroyed(id),
        }
    }
    Ok(Keys {
        kek,
        ring,
        generation,
        active_created,
        kek_stale: false,
    })
}

impl Vault {
    /// Resolves the key-encryption key for the database on `conn`, creating the `vault` row
    /// and the first data key for a database that has none, and loads the data keys.
    pub(super) fn open(conn: &mut Connection, source: KeySource) -> Result<Self, StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = read_row(&tx)?;
        let kek = resolve(&source, row.as_ref())?;
        let generation = match &row {
            Some(row) => {
                check_fingerprint(row, &kek)?;
                row.generation
            }
            None => {
                write_row(&tx, &kek, 0)?;
                0
            }
        };
        let has_live_key: Option<i64> = tx
            .query_row(
                "SELECT id FROM data_keys WHERE wrapped IS NOT NULL LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if has_live_key.is_none() {
            new_data_key(&tx, &kek, micros(OffsetDateTime::now_utc())?)?;
        }
        let keys = load_keys(&tx, kek, generation)?;
        tx.commit()?;
        let vault = Self {
            source,
            keys: RwLock::new(keys),
            period: AtomicI64::new(duration_micros(crate::keys::DEFAULT_KEY_PERIOD)),
        };
        vault.seal_legacy(conn)?;
        Ok(vault)
    }

    pub(super) fn set_period(&self, period: Duration) {
        self.period
            .store(duration_micros(period), Ordering::Relaxed);
    }

    /// The keys, reloaded first if another process changed them (`vault.generation`).
    pub(super) fn keys(&self, conn: &Connection) -> Result<RwLockReadGuard<'_, Keys>, StoreError> {
        let generation: i64 = conn
            .prepare_cached("SELECT generation FROM vault WHERE id = 1")?
            .query_row([], |r| r.get(0))?;
        {
            let keys = self.read();
            if keys.generation == generation {
                return Ok(keys);
            }
        }
        self.reload(conn)?;
        Ok(self.read())
    }

    fn read(&self) -> RwLockReadGuard<'_, Keys> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reload(&self, conn: &Connection) -> Result<(), StoreError> {
        let row = existing_row(conn)?;
        let current = Arc::clone(&self.read().kek);
        // Re-wrapped by another process: the key file may hold the new key by now.
        let kek = if check_fingerprint(&row, &current).is_ok() {
            current
        } else {
            match resolve(&self.source, Some(&row)) {
                Ok(kek) if check_fingerprint(&row, &kek).is_ok() => kek,
                _ => {
                    // Keep sealing and opening with the data keys held; start no new one.
                    let mut keys = self
                        .keys
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    keys.generation = row.generation;
                    keys.kek_stale = true;
                    return Ok(());
                }
            }
        };
        let keys = load_keys(conn, kek, row.generation)?;
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        Ok(())
    }

    /// Starts a new data key if the active one is older than the period (its own durable
    /// transaction, before a batch's: a rolled-back batch never leaves a key only in memory).
    pub(super) fn rotate_if_due(&self, conn: &mut Connection, now: i64) -> Result<(), StoreError> {
        let due = {
            let keys = self.keys(conn)?;
            !keys.kek_stale
                && now.saturating_sub(keys.active_created) > self.period.load(Ordering::Relaxed)
        };
        if due {
            self.rotate(conn, now)?;
        }
        Ok(())
    }

    /// Starts a new data key now; returns its id.
    pub(super) fn rotate(&self, conn: &mut Connection, now: i64) -> Result<u32, StoreError> {
        conn.pragma_update(None, "synchronous", "FULL")?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let kek = {
            let keys = self.keys(&tx)?;
            if keys.kek_stale {
                let row = existing_row(&tx)?;
                check_fingerprint(&row, &keys.kek)?;
            }
            Arc::clone(&keys.kek)
        };
        let id = new_data_key(&tx, &kek, now)?;
        bump_generation(&tx)?;
        self.reload(&tx)?;
        tx.commit()?;
        Ok(id)
    }

    /// Wraps every live data key under `new` and records it; returns the new fingerprint.
    pub(super) fn rewrap(
        &self,
        conn: &mut Connection,
        new: &KeySource,
    ) -> Result<Fingerprint, StoreError> {
        conn.pragma_update(None, "synchronous", "FULL")?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let old = self.keys(&tx)?;
        let row = existing_row(&tx)?;
        let kek = resolve(new, None)?;
        if kek.fingerprint() == old.kek.fingerprint() {
            return Err(StoreError::InvalidRequest(
                "the new key-encryption key is the current one".into(),
            ));
        }
        let wrapped: Vec<(i64, Vec<u8>)> = tx
            .prepare("SELECT id, wrapped FROM data_keys WHERE wrapped IS NOT NULL")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (id, w) in wrapped {
            let id32 = u32::try_from(id)
                .map_err(|_| super::corrupt("data_keys", format!("key id {id}")))?;
            let raw = old.kek.unwrap_raw(id32, &w)?;
            tx.execute(
                "UPDATE data_keys SET wrapped = ?2 WHERE id = ?1",
                params![id, kek.wrap(id32, &raw)?],
            )?;
        }
        drop(old);
        write_row(&tx, &kek, row.generation + 1)?;
        let keys = load_keys(&tx, Arc::clone(&kek), row.generation + 1)?;
        tx.commit()?;
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        Ok(kek.fingerprint())
    }

    /// Destroys data key `id` (not the active one, nor one with deliveries pending).
    pub(super) fn destroy(
        &self,
        conn: &mut Connection,
        id: u32,
        now: i64,
    ) -> Result<u64, StoreError> {
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Overwrite the wrapped key's bytes in the file, not only unlink them.
        conn.pragma_update(None, "secure_delete", true)?;
        let result = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let active = self.keys(&tx)?.ring.active();
            let live: Option<Option<Vec<u8>>> = tx
                .query_row("SELECT wrapped FROM data_keys WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()?;
            match live {
                None => return Err(StoreError::NotFound(format!("data key {id}"))),
                Some(None) => return Err(StoreError::KeyDestroyed { key_id: id }),
                Some(Some(_)) => {}
            }
            if active == Some(id) {
                return Err(StoreError::InvalidRequest(format!(
                    "data key {id} is the active key: rotate first (`gridward keys rotate`)"
                )));
            }
            let pending: i64 = tx.query_row(
                "SELECT COUNT(*) FROM outbox AS o INDEXED BY outbox_pending
                 JOIN messages AS m ON m.id = o.message WHERE o.state = 0 AND m.key_id = ?1",
                [id],
                |r| r.get(0),
            )?;
            if pending > 0 {
                return Err(StoreError::InvalidRequest(format!(
                    "{pending} deliveries of readings under data key {id} are still pending: let them be delivered first (`gridward outbox`)"
                )));
            }
            let rows: i64 = tx.query_row(
                "SELECT COUNT(*) FROM messages WHERE key_id = ?1",
                [id],
                |r| r.get(0),
            )?;
            tx.execute(
                "UPDATE data_keys SET wrapped = NULL, destroyed_at = ?2 WHERE id = ?1",
                params![id, now],
            )?;
            bump_generation(&tx)?;
            self.reload(&tx)?;
            tx.commit()?;
            Ok(u64::try_from(rows).unwrap_or(0))
        })();
        conn.pragma_update(None, "secure_delete", false)?;
        result
    }

    /// The keys, for `gridward keys list`.
    pub(super) fn status(&self, conn: &Connection) -> Result<KeyStatus, StoreError> {
        let keys = self.keys(conn)?;
        let row = existing_row(conn)?;
        let mut counts = std::collections::HashMap::new();
        let mut plaintext = 0u64;
        {
            let mut stmt = conn.prepare("SELECT key_id, COUNT(*) FROM messages GROUP BY key_id")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (k, n) = row?;
                let n = u64::try_from(n).unwrap_or(0);
                match k {
                    Some(k) => {
                        counts.insert(k, n);
                    }
                    None => plaintext = n,
                }
            }
        }
        let mut stmt =
            conn.prepare("SELECT id, created_at, destroyed_at FROM data_keys ORDER BY id")?;
        let raw = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::new();
        for (id, created, destroyed) in raw {
            let id32 = u32::try_from(id)
                .map_err(|_| super::corrupt("data_keys", format!("key id {id}")))?;
            out.push(DataKeyInfo {
                id: id32,
                created_at: time_from_micros("data_keys", created)?,
                destroyed_at: destroyed
                    .map(|d| time_from_micros("data_keys", d))
                    .transpose()?,
                messages: counts.get(&id).copied().unwrap_or(0),
                active: keys.ring.active() == Some(id32),
            });
        }
        Ok(KeyStatus {
            kek_fingerprint: keys.kek.fingerprint(),
            kdf: row.kdf,
            keys: out,
            plaintext_messages: plaintext,
        })
    }

    /// Seals the rows written before version 5 (plaintext), a batch per transaction, with
    /// `secure_delete` on so the plaintext is overwritten in the pages, then truncates the WAL.
    fn seal_legacy(&self, conn: &mut Connection) -> Result<(), StoreError> {
        let any: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM messages WHERE key_id IS NULL LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let meters: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM meters WHERE last_kwh IS NOT NULL LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if any.is_none() && meters.is_none() {
            return Ok(());
        }
        conn.pragma_update(None, "secure_delete", true)?;
        let result = self.seal_legacy_rows(conn);
        conn.pragma_update(None, "secure_delete", false)?;
        result?;
        // Old page images with plaintext may remain in the WAL until it is checkpointed.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .optional()?;
        Ok(())
    }

    fn seal_legacy_rows(&self, conn: &mut Connection) -> Result<(), StoreError> {
        loop {
            conn.pragma_update(None, "synchronous", "FULL")?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let keys = self.keys(&tx)?;
            let key_id =
                keys.ring
                    .active()
                    .ok_or(StoreError::Key(gridward_vault::VaultError::Crypto(
                        "no data key",
                    )))?;
            let rows: Vec<LegacyRow> = tx
                .prepare_cached(
                    "SELECT m.id, mt.meter_id, m.counter, m.kind, m.energy_kwh, m.envelope
                     FROM messages AS m JOIN meters AS mt ON mt.id = m.meter
                     WHERE m.key_id IS NULL LIMIT ?1",
                )?
                .query_map([LEGACY_BATCH as i64], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            let done = rows.len() < LEGACY_BATCH;
            {
                let mut update = tx.prepare_cached(
                    "UPDATE messages SET key_id = ?2, energy_kwh = ?3, sealed_value = ?4,
                                         envelope = ?5 WHERE id = ?1",
                )?;
                for (id, meter, counter, kind, kwh, envelope) in rows {
                    let counter = super::counter_from_sql(counter);
                    let (placeholder, value) = match (kind, kwh) {
                        (super::KIND_READING, Some(kwh)) => (
                            Some(0.0),
                            Some(seal(
                                &keys.ring,
                                Field::ReadingValue,
                                &meter,
                                counter,
                                &kwh.to_le_bytes(),
                            )?),
                        ),
                        _ => (None, None),
                    };
                    let envelope = seal(&keys.ring, Field::Envelope, &meter, counter, &envelope)?;
                    update.execute(params![id, key_id, placeholder, value, envelope])?;
                }
            }
            if done {
                let meters: Vec<(i64, String, f64)> = tx
                    .prepare(
                        "SELECT id, meter_id, last_kwh FROM meters WHERE last_kwh IS NOT NULL",
                    )?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<_, _>>()?;
                for (id, meter, kwh) in meters {
                    let sealed = seal(
                        &keys.ring,
                        Field::LastRegister,
                        &meter,
                        0,
                        &kwh.to_le_bytes(),
                    )?;
                    tx.execute(
                        "UPDATE meters SET last_kwh = NULL, last_kwh_sealed = ?2 WHERE id = ?1",
                        params![id, sealed],
                    )?;
                }
            }
            drop(keys);
            tx.commit()?;
            if done {
                return Ok(());
            }
        }
    }
}

fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Seals `plain` as `field` of `meter`'s message `counter`.
pub(super) fn seal(
    ring: &Keyring,
    field: Field,
    meter: &str,
    counter: u64,
    plain: &[u8],
) -> Result<Vec<u8>, StoreError> {
    ring.seal(&Context::message(field, meter, counter), plain)
        .map_err(|e| match e {
            OpenError::Seal(why) => StoreError::Key(gridward_vault::VaultError::Crypto(why)),
            reason => StoreError::Tampered {
                table: "messages",
                row: 0,
                reason,
            },
        })
}

/// What opening a sealed column gave.
pub(super) enum Opened<T> {
    /// The value.
    Value(T),
    /// Its data key was destroyed.
    Shredded,
}

/// Opens `sealed` as `field` of `meter`'s message `counter` (row `row` of `table`).
pub(super) fn open(
    ring: &Keyring,
    table: &'static str,
    row: i64,
    field: Field,
    meter: &str,
    counter: u64,
    sealed: &[u8],
) -> Result<Opened<zeroize::Zeroizing<Vec<u8>>>, StoreError> {
    match ring.open(&Context::message(field, meter, counter), sealed) {
        Ok(v) => Ok(Opened::Value(v)),
        Err(OpenError::Destroyed(_)) => Ok(Opened::Shredded),
        Err(reason) => Err(StoreError::Tampered { table, row, reason }),
    }
}

/// Opens a sealed f64.
pub(super) fn open_f64(
    ring: &Keyring,
    table: &'static str,
    row: i64,
    field: Field,
    meter: &str,
    counter: u64,
    sealed: &[u8],
) -> Result<Opened<f64>, StoreError> {
    Ok(
        match open(ring, table, row, field, meter, counter, sealed)? {
            Opened::Value(v) => {
                let bytes =
                    <[u8; 8]>::try_from(v.as_slice()).map_err(|_| StoreError::Tampered {
                        table,
                        row,
                        reason: OpenError::Malformed("not an 8-byte number"),
                    })?;
                Opened::Value(f64::from_le_bytes(bytes))
            }
            Opened::Shredded => Opened::Shredded,
        },
    )
}
