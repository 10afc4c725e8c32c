//! The [`Store`] trait: what the head-end needs from durable storage, independent of the engine.

use gridward_core::MeterId;
use time::OffsetDateTime;

use crate::error::StoreError;
use crate::model::{
    Accepted, Counts, MeterEventQuery, MeterRow, Outcome, ReadingQuery, SecurityEvent,
    SecurityEventQuery, StoredMeterEvent, StoredReading, StoredSecurityEvent,
};
use crate::outbox::{DeadLetter, OutboxItem, OutboxStats, Settlement, TargetId};

/// Durable storage for the head-end: meters, readings, meter events, security events and the
/// raw accepted envelopes.
///
/// Implementations are shared between threads (`Arc<dyn Store>`); writes are serialised inside
/// the implementation. Every write method is atomic: on `Err`, nothing of it was stored.
///
/// ## Contract of [`commit`](Store::commit)
///
/// The batch is stored in **one transaction that is durable when `commit` returns `Ok`**
/// (it survives a process crash and a power loss), so the caller may acknowledge (MQTT PUBACK)
/// every item whose outcome is [`Outcome::Stored`], [`Outcome::StoredUnmatchedAck`] or
/// [`Outcome::Duplicate`] right after.
/// Items are decided in order; later items see the effects of earlier ones, also for the same
/// meter. For each item:
///
/// 1. counter ≤ the meter's last accepted counter: [`Outcome::Duplicate`] if the message
///    stored under that meter and counter has a byte-identical envelope (same SHA-256),
///    otherwise [`Outcome::Replay`];
/// 2. a reading whose register is lower than the meter's last stored reading:
///    [`Outcome::RegisterWentBackwards`];
/// 3. otherwise the message is appended ([`Outcome::Stored`]) and becomes the meter's last
///    counter, last register (readings only) and last-seen time.
///
/// Only [`Outcome::Stored`] and [`Outcome::StoredUnmatchedAck`] write anything; the other
/// outcomes leave the store unchanged.
///
/// A command acknowledgement ([`AcceptedBody::CommandAck`](crate::AcceptedBody::CommandAck)) is
/// decided like an event (same counter sequence, same duplicate and replay rules). When stored,
/// the same transaction settles the command it names if that command is this meter's and not
/// final: acknowledged (executed) or refused (the refusal code as outcome), settled at the
/// message's `received_at`, with the message as its acknowledgement ([`Outcome::Stored`]).
/// Otherwise no command changes ([`Outcome::StoredUnmatchedAck`]). Acknowledgements never go
/// to the outbox and are not meter events.
///
/// ## The outbox
///
/// [`commit_with_outbox`](Store::commit_with_outbox) also queues every stored reading for each
/// downstream target in the same transaction (see [`crate::outbox`]); the forwarder reads
/// [`outbox_pending`](Store::outbox_pending) in commit order and writes back what became of
/// each row with [`outbox_settle`](Store::outbox_settle).
pub trait Store: Send + Sync + 'static {
    /// Decides and stores a batch of accepted messages in one durable transaction (see the
    /// trait documentation); returns one outcome per item, in order. Queues nothing downstream.
    fn commit(&self, batch: &[Accepted]) -> Result<Vec<Outcome>, StoreError> {
        self.commit_with_outbox(batch, &[])
    }

    /// Like [`commit`](Store::commit), and in the same transaction adds one pending outbox row
    /// per target for every reading whose outcome is [`Outcome::Stored`] (meter events are not
    /// forwarded). The targets must have been registered with
    /// [`register_outbox_target`](Store::register_outbox_target).
    fn commit_with_outbox(
        &self,
        batch: &[Accepted],
        targets: &[TargetId],
    ) -> Result<Vec<Outcome>, StoreError>;

    /// Registers a downstream target by name (idempotent) and returns its id.
    fn register_outbox_target(&self, name: &str) -> Result<TargetId, StoreError>;

    /// The first `limit` pending rows of `target`, in commit order (oldest first).
    fn outbox_pending(&self, target: TargetId, limit: usize)
    -> Result<Vec<OutboxItem>, StoreError>;

    /// Writes what became of pending rows (delivered, failed for now, dead) in one transaction;
    /// rows that are no longer pending are left alone. Not necessarily fsync'd: after a power
    /// loss a delivered row may be pending again and is delivered a second time, which
    /// receivers absorb by de-duplicating on the reading id.
    fn outbox_settle(&self, settlement: &Settlement, at: OffsetDateTime) -> Result<(), StoreError>;

    /// Pending, delivered and dead counts and the oldest pending reading, per registered target.
    fn outbox_stats(&self) -> Result<Vec<OutboxStats>, StoreError>;

    /// Dead letters, of one target or all, oldest first, at most `limit`.
    fn outbox_dead(
        &self,
        target: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Puts dead letters back to pending (attempts reset): those listed in `ids`, or all of
    /// them when `ids` is empty; only of `target` if given. Returns how many were put back.
    fn outbox_retry(&self, target: Option<&str>, ids: &[i64]) -> Result<u64, StoreError>;

    /// Records security events in one durable transaction; returns their ids, in order.
    fn record_security_events(&self, events: &[SecurityEvent]) -> Result<Vec<i64>, StoreError>;

    /// The last accepted counter of every meter that has one (to warm the head-end's
    /// replay guard at start-up).
    fn last_counters(&self) -> Result<Vec<(MeterId, u64)>, StoreError>;

    /// One meter's readings (see [`ReadingQuery`]), oldest first.
    fn readings(&self, query: &ReadingQuery) -> Result<Vec<StoredReading>, StoreError>;

    /// Meter events (tamper, power), see [`MeterEventQuery`], oldest first. Command
    /// acknowledgements, although they share the events topic and counter, are not listed.
    fn meter_events(&self, query: &MeterEventQuery) -> Result<Vec<StoredMeterEvent>, StoreError>;

    /// Security events (see [`SecurityEventQuery`]), oldest first.
    fn security_events(
        &self,
        query: &SecurityEventQuery,
    ) -> Result<Vec<StoredSecurityEvent>, StoreError>;

    /// The raw envelope of a stored message (reading or meter event), for audit.
    fn envelope(&self, id: i64) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every known meter (seen in a stored message or a connection), ordered by meter id.
    fn meters(&self) -> Result<Vec<MeterRow>, StoreError>;

    /// Records that `meter` connected or disconnected at `at`, registering it if unknown.
    ///
    /// Connection state is not accounting data: this write is atomic but need not be durable
    /// (a crash may lose the latest changes; [`disconnect_all`](Store::disconnect_all) at
    /// start-up resets the state anyway), so a wave of reconnects does not cost one disk flush each.
    fn set_connected(
        &self,
        meter: &MeterId,
        connected: bool,
        at: OffsetDateTime,
    ) -> Result<(), StoreError>;

    /// Marks every connected meter disconnected at `at` (at start-up: no session survives a
    /// restart); returns how many were connected.
    fn disconnect_all(&self, at: OffsetDateTime) -> Result<u64, StoreError>;

    /// How many meters, readings, meter events and security events are stored. May scan the
    /// tables: for reports and tests, not for hot paths.
    fn counts(&self) -> Result<Counts, StoreError>;
}
