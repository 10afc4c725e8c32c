//! The outbox: what must still be delivered downstream, per target.
//!
//! Every reading stored by [`Store::commit_with_outbox`](crate::Store::commit_with_outbox)
//! gets one outbox row per target **in the same transaction**, so a reading is never stored
//! without its rows, and nothing is forwarded that was not stored. A row is `pending` until
//! the forwarder settles it: `delivered` (the target answered 2xx) or `dead` (the target refused
//! it for good; an operator may put it back with [`Store::outbox_retry`](crate::Store::outbox_retry)).
//!
//! ```text
//!  commit ──► pending ──2xx──► delivered
//!                │  ▲
//!       4xx ─────┘  └── outbox retry (operator)
//!         ▼
//!        dead
//! ```

use gridward_core::MeterId;
use time::OffsetDateTime;

/// A downstream target as registered in the store; the id is stable across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(pub i64);

/// One pending delivery: the reading and how often delivery was tried.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    /// The outbox row (increasing in commit order; settle by this id).
    pub id: i64,
    /// The target it is for.
    pub target: TargetId,
    /// The stored reading's id.
    pub message_id: i64,
    /// The meter.
    pub meter_id: MeterId,
    /// The reading's envelope counter.
    pub counter: u64,
    /// The reading's time (the document's `Timestamp`).
    pub taken_at: OffsetDateTime,
    /// The register, in kWh.
    pub energy_kwh: f64,
    /// When the head-end received (and queued) the reading.
    pub queued_at: OffsetDateTime,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    /// The reading's envelope (COSE_Sign1) as the meter signed it, for targets that forward it.
    pub envelope: Vec<u8>,
}

impl OutboxItem {
    /// The stable id of the reading downstream, `{MeterID}-{Counter}`: unique per meter and
    /// counter (counters are never reused), the same on every retry, so receivers de-duplicate
    /// on it.
    pub fn reading_id(&self) -> String {
        gridward_core::downstream::reading_id(self.meter_id.as_str(), self.counter)
    }
}

/// How the forwarder settled outbox rows, written in one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Rows the target accepted (2xx).
    pub delivered: Vec<i64>,
    /// Rows whose delivery failed for now (network, timeout, 5xx, 408, 429), with the error:
    /// they stay pending and their attempt count grows.
    pub failed: Vec<(i64, String)>,
    /// Rows the target refused for good (a 4xx other than 408/429), with the reason: they move
    /// to the dead letters.
    pub dead: Vec<(i64, String)>,
}

impl Settlement {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.delivered.is_empty() && self.failed.is_empty() && self.dead.is_empty()
    }
}

/// The state of one target's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    /// The target's name.
    pub target: String,
    /// Rows waiting for delivery.
    pub pending: u64,
    /// Rows delivered.
    pub delivered: u64,
    /// Dead letters.
    pub dead: u64,
    /// When the oldest pending reading was received: the delivery lag is now minus this.
    pub oldest_pending: Option<OffsetDateTime>,
}

/// A dead letter: a row the target refused for good.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The outbox row.
    pub id: i64,
    /// The target's name.
    pub target: String,
    /// The meter.
    pub meter_id: MeterId,
    /// The reading's counter.
    pub counter: u64,
    /// Delivery attempts, including the refused one.
    pub attempts: u32,
    /// When it was refused.
    pub dead_at: OffsetDateTime,
    /// Why (the target's status and answer).
    pub reason: String,
}
