//! The values that cross the [`Store`](crate::Store) trait: what is stored, what each item's
//! fate was, and what queries return. Backend-neutral: no SQL here.

use gridward_core::MeterId;
use gridward_core::command::{CommandId, Refusal};
use gridward_core::document::{Event, EventKind, Format, Reading};
use gridward_core::downstream::ForwardedReading;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// Number of rows a query returns when the caller does not say otherwise.
pub const DEFAULT_QUERY_LIMIT: usize = 1000;

/// One verified, fresh and valid meter message, ready to be stored.
///
/// The head-end builds it only after the envelope's signature, the freshness window and the
/// document were checked; the store adds the last, durable checks (counter against the stored
/// last counter, register not going backwards) inside its transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The meter that signed the message.
    pub meter_id: MeterId,
    /// The envelope's counter (strictly increasing per meter).
    pub counter: u64,
    /// The document's `Timestamp`: when the reading was taken or the event happened (whole
    /// seconds, UTC). The envelope's signing time, which may be later (a reading re-signed after
    /// an outage), stays in the raw envelope.
    pub taken_at: OffsetDateTime,
    /// When the head-end received the message (its own clock).
    pub received_at: OffsetDateTime,
    /// What the message says.
    pub body: AcceptedBody,
    /// The raw COSE_Sign1 envelope exactly as received, kept for audit.
    pub envelope: Vec<u8>,
    /// The document's encoding inside the envelope.
    pub content_type: Format,
    /// The peer it came from (e.g. `192.0.2.7:50123`), if known.
    pub source: Option<String>,
}

impl Accepted {
    /// SHA-256 of [`Accepted::envelope`]: what decides whether a resend is byte-identical.
    pub fn envelope_sha256(&self) -> [u8; 32] {
        Sha256::digest(&self.envelope).into()
    }
}

/// The content of an accepted message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AcceptedBody {
    /// A reading: the cumulative register in kWh (finite, not negative).
    Reading {
        /// The register, in kWh.
        energy_kwh: f64,
    },
    /// A meter event (tamper, power).
    Event {
        /// What happened.
        kind: EventKind,
    },
    /// A data concentrator's own signed event (power, PLC meters lost or found). Stored as a
    /// message of the concentrator (its id in the meters table, its own counter sequence)
    /// with `event_kind = 'concentrator:{EventType}'`; the meters it names are in the stored
    /// envelope. Not a meter event: [`Store::meter_events`](crate::Store::meter_events) does
    /// not list it.
    ConcentratorEvent {
        /// What happened.
        kind: gridward_core::document::ConcentratorEventKind,
    },
    /// A meter's signed acknowledgement of a command (it arrives on the events topic and
    /// consumes the meter's counter like an event). Stored as a message of its own kind, which
    /// [`Store::meter_events`](crate::Store::meter_events) does not list; in the same
    /// transaction the acknowledged command, if it is this meter's and not final, becomes
    /// acknowledged or refused (see [`Outcome::StoredUnmatchedAck`]).
    CommandAck {
        /// The command acknowledged.
        command_id: CommandId,
        /// `None`: executed; otherwise why the meter refused it.
        refused: Option<Refusal>,
    },
}

/// What [`Store::commit`](crate::Store::commit) did with one item of a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Stored; `id` identifies the stored message (unique across readings and meter events).
    /// For a [`AcceptedBody::CommandAck`]: stored, and its command settled.
    Stored {
        /// The stored message's id.
        id: i64,
    },
    /// A [`AcceptedBody::CommandAck`] stored (it consumed the meter's counter: acknowledge it
    /// like [`Outcome::Stored`]) but matching no command awaiting it: the id is unknown, the
    /// command is another meter's, or it is already final (expired, settled, acknowledged
    /// before). No command changed; worth a security event if the id is unknown or foreign.
    StoredUnmatchedAck {
        /// The stored message's id.
        id: i64,
    },
    /// A byte-identical resend of a message already stored (the meter's retry after a lost
    /// acknowledgement): acknowledge it, count it, store nothing, raise no alarm.
    Duplicate,
    /// The counter is not above the meter's last one and no byte-identical envelope is stored
    /// under it (or the stored one is further back than the backend searches, e.g.
    /// [`DUPLICATE_SEARCH_DEPTH`](crate::sqlite::DUPLICATE_SEARCH_DEPTH) for SQLite):
    /// a replay. Nothing was stored.
    Replay {
        /// The meter's last accepted counter.
        last: u64,
    },
    /// A reading whose register is lower than the meter's last stored reading. Nothing was
    /// stored and the counter was not consumed.
    RegisterWentBackwards {
        /// The register of the meter's last stored reading, in kWh.
        last_kwh: f64,
    },
}

/// A security event: a rejection or an anomaly, recorded for the operators and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityEvent {
    /// When it happened (the head-end's clock).
    pub at: OffsetDateTime,
    /// The meter concerned, when known (it is not for, e.g., a failed TLS handshake).
    pub meter_id: Option<MeterId>,
    /// The peer address, when known.
    pub source: Option<String>,
    /// A stable machine-readable code, e.g. `replay`, `bad_signature`.
    pub reason: String,
    /// Human-readable detail (the typed error's message).
    pub detail: String,
}

/// A [`SecurityEvent`] as stored, with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSecurityEvent {
    /// The event's id (increasing in the order events were recorded).
    pub id: i64,
    /// The event.
    pub event: SecurityEvent,
}

/// A stored reading.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    /// The stored message's id.
    pub id: i64,
    /// The meter.
    pub meter_id: MeterId,
    /// The envelope's counter.
    pub counter: u64,
    /// The reading's time (the document's `Timestamp`).
    pub taken_at: OffsetDateTime,
    /// When the head-end received it, to the microsecond.
    pub received_at: OffsetDateTime,
    /// The cumulative register, in kWh.
    pub energy_kwh: f64,
    /// The encoding the meter used.
    pub content_type: Format,
    /// The peer it came from, if known.
    pub source: Option<String>,
    /// SHA-256 of the stored envelope.
    pub envelope_sha256: [u8; 32],
}

impl StoredReading {
    /// The reading as a document value.
    pub fn to_reading(&self) -> Reading {
        Reading {
            meter_id: self.meter_id.clone(),
            timestamp: self.taken_at,
            energy_kwh: self.energy_kwh,
        }
    }

    /// The canonical JSON document as the meter signs it:
    /// `{"MeterID":"…","Timestamp":"…","EnergyConsumed":…}` (without the counter; see
    /// [`StoredReading::to_forwarded`] for what goes downstream).
    pub fn to_json(&self) -> String {
        self.to_reading().to_json()
    }

    /// The canonical XML document (`EnergyUsageReport`).
    pub fn to_xml(&self) -> String {
        self.to_reading().to_xml()
    }

    /// The reading as forwarded downstream, with its `ReadingID` and `Counter`
    /// (`docs/wire-format.md` §7): what `gridward readings --format json` prints.
    pub fn to_forwarded(&self) -> ForwardedReading {
        ForwardedReading::new(&self.meter_id, self.counter, self.taken_at, self.energy_kwh)
    }

    /// [`StoredReading::envelope_sha256`] in lower-case hex.
    pub fn envelope_sha256_hex(&self) -> String {
        hex::encode(self.envelope_sha256)
    }
}

/// A stored meter event (tamper, power).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMeterEvent {
    /// The stored message's id.
    pub id: i64,
    /// The meter.
    pub meter_id: MeterId,
    /// The envelope's counter.
    pub counter: u64,
    /// When it happened (the document's `Timestamp`).
    pub taken_at: OffsetDateTime,
    /// When the head-end received it, to the microsecond.
    pub received_at: OffsetDateTime,
    /// What happened.
    pub kind: EventKind,
    /// The encoding the meter used.
    pub content_type: Format,
    /// The peer it came from, if known.
    pub source: Option<String>,
    /// SHA-256 of the stored envelope.
    pub envelope_sha256: [u8; 32],
}

impl StoredMeterEvent {
    /// The event as a document value.
    pub fn to_event(&self) -> Event {
        Event {
            meter_id: self.meter_id.clone(),
            timestamp: self.taken_at,
            kind: self.kind,
        }
    }

    /// The canonical JSON document (`{"MeterID":…,"Timestamp":…,"EventType":…}`).
    pub fn to_json(&self) -> String {
        self.to_event().to_json()
    }
}

/// One meter as the store knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterRow {
    /// The meter.
    pub meter_id: MeterId,
    /// Its last accepted counter; `None` if nothing was accepted from it yet.
    pub last_counter: Option<u64>,
    /// Its last stored register, in kWh; `None` before the first reading.
    pub last_kwh: Option<f64>,
    /// When its last stored message was received (duplicates and refusals do not count).
    pub last_seen: Option<OffsetDateTime>,
    /// Whether it is connected now (as last reported by [`Store::set_connected`](crate::Store::set_connected)).
    pub connected: bool,
    /// When it last connected or disconnected.
    pub connection_changed_at: Option<OffsetDateTime>,
}

/// How many rows each kind of record has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Known meters.
    pub meters: u64,
    /// Stored readings.
    pub readings: u64,
    /// Stored meter events (command acknowledgements are not counted).
    pub meter_events: u64,
    /// Stored command acknowledgements (signed by meters, on their events topic).
    pub command_acks: u64,
    /// Recorded security events.
    pub security_events: u64,
}

/// Which readings [`Store::readings`](crate::Store::readings) returns: one meter's readings
/// signed at or after `since` (and at or before `until`), stored before the message `before`,
/// the newest `limit` of them, oldest first.
///
/// `before` is a cursor for paging back in time: pass the smallest id of one page to get the
/// page before it. An id that is not one of this meter's messages gives an empty page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadingQuery {
    /// The meter.
    pub meter: MeterId,
    /// Only readings signed at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only readings signed at or before this time.
    pub until: Option<OffsetDateTime>,
    /// Only readings stored before the message with this id.
    pub before: Option<i64>,
    /// At most this many (the newest ones).
    pub limit: usize,
}

impl ReadingQuery {
    /// The newest [`DEFAULT_QUERY_LIMIT`] readings of `meter`.
    pub fn new(meter: MeterId) -> Self {
        Self {
            meter,
            since: None,
            until: None,
            before: None,
            limit: DEFAULT_QUERY_LIMIT,
        }
    }

    /// Only readings signed at or before `until`.
    pub fn until(mut self, until: OffsetDateTime) -> Self {
        self.until = Some(until);
        self
    }

    /// Only readings stored before the message `id` (the paging cursor).
    pub fn before(mut self, id: i64) -> Self {
        self.before = Some(id);
        self
    }

    /// Only readings signed at or after `since`.
    pub fn since(mut self, since: OffsetDateTime) -> Self {
        self.since = Some(since);
        self
    }

    /// At most `limit` readings.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

/// Which meter events [`Store::meter_events`](crate::Store::meter_events) returns: those of
/// `meter` (or of all meters) signed at or after `since`, the newest `limit`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEventQuery {
    /// One meter, or all meters.
    pub meter: Option<MeterId>,
    /// Only events signed at or after this time.
    pub since: Option<OffsetDateTime>,
    /// At most this many (the newest ones).
    pub limit: usize,
}

impl Default for MeterEventQuery {
    /// All meters, any time, [`DEFAULT_QUERY_LIMIT`].
    fn default() -> Self {
        Self {
            meter: None,
            since: None,
            limit: DEFAULT_QUERY_LIMIT,
        }
    }
}

/// Which security events [`Store::security_events`](crate::Store::security_events) returns:
/// those that happened at or after `since` (and at or before `until`), with an id below
/// `before`, matching every filter given, the newest `limit`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityEventQuery {
    /// Only events at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only events at or before this time.
    pub until: Option<OffsetDateTime>,
    /// Only events with an id below this one (the paging cursor: the smallest id of a page).
    pub before: Option<i64>,
    /// Only events with this reason code.
    pub reason: Option<String>,
    /// Only events about this meter.
    pub meter: Option<MeterId>,
    /// Only events from this source address (as recorded, e.g. `127.0.0.1:50312`, or its IP
    /// alone, which matches every port).
    pub source: Option<String>,
    /// At most this many (the newest ones).
    pub limit: usize,
}

impl Default for SecurityEventQuery {
    /// Any time, [`DEFAULT_QUERY_LIMIT`].
    fn default() -> Self {
        Self {
            since: None,
            until: None,
            before: None,
            reason: None,
            meter: None,
            source: None,
            limit: DEFAULT_QUERY_LIMIT,
        }
    }
}
