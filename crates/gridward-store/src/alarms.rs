//! Alarms and the concentrator topology, behind [`AlarmStore`].
//!
//! An alarm is keyed by (type, originator): at most one is active (not cleared) per key, so a
//! burst updates it (last seen, count, evidence) instead of duplicating it. The lifecycle is
//! `active_unacknowledged → active_acknowledged → cleared` (clearing from unacknowledged is
//! allowed too); a cleared alarm never changes again, and the next raise of its key opens a new
//! one. Types, severities and originators are stored as their stable codes
//! (`gridward-detect` defines them), so this crate stays ignorant of detection.
//!
//! The topology records which meters are registered behind which data concentrator; a meter is
//! behind at most one concentrator at a time.

use gridward_core::MeterId;
use time::OffsetDateTime;

use crate::error::StoreError;

/// Where an alarm is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlarmState {
    /// Active, nobody has acknowledged it yet.
    ActiveUnacknowledged,
    /// Active, an operator acknowledged it.
    ActiveAcknowledged,
    /// Cleared (by an operator, or by the detector when the condition ended): final.
    Cleared,
}

impl AlarmState {
    /// `active_unacknowledged`, `active_acknowledged` or `cleared`.
    pub fn code(self) -> &'static str {
        match self {
            Self::ActiveUnacknowledged => "active_unacknowledged",
            Self::ActiveAcknowledged => "active_acknowledged",
            Self::Cleared => "cleared",
        }
    }

    /// The state named `code`.
    pub fn from_code(code: &str) -> Option<Self> {
        [
            Self::ActiveUnacknowledged,
            Self::ActiveAcknowledged,
            Self::Cleared,
        ]
        .into_iter()
        .find(|s| s.code() == code)
    }

    /// Not cleared.
    pub fn is_active(self) -> bool {
        self != Self::Cleared
    }
}

/// A raise (or repeat) of an alarm condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaiseAlarm {
    /// The alarm type's code, e.g. `tamper`, `outage`, `cloned_meter`.
    pub alarm_type: String,
    /// `critical`, `major`, `minor` or `warning`.
    pub severity: String,
    /// The originator's code, e.g. `meter:m000001`, `concentrator:dc-1`, `feeder:f7`,
    /// `source:10.0.0.7`, `user:alice`, `fleet`.
    pub originator: String,
    /// When the condition was seen (the detector's `now`).
    pub at: OffsetDateTime,
    /// One line for people.
    pub summary: String,
    /// The evidence as a JSON array (the events that triggered it); appended on repeats, the
    /// stored array keeps the first 10 and the last 40 entries. Any other JSON value counts as
    /// one entry, text that is not JSON as one string entry, empty text as none: evidence never
    /// makes a raise fail.
    pub evidence_json: String,
}

/// An alarm as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAlarm {
    /// Its id (increasing).
    pub id: i64,
    /// Type code.
    pub alarm_type: String,
    /// Severity code: the highest any raise of this alarm gave.
    pub severity: String,
    /// Originator code.
    pub originator: String,
    /// Lifecycle state.
    pub state: AlarmState,
    /// First raise.
    pub first_seen: OffsetDateTime,
    /// Latest raise.
    pub last_seen: OffsetDateTime,
    /// How many raises were folded into it (1 for a new alarm).
    pub count: u64,
    /// The latest summary.
    pub summary: String,
    /// The evidence, a JSON array.
    pub evidence_json: String,
    /// Who acknowledged it (an actor such as `user:alice`), and when.
    pub acknowledged: Option<(String, OffsetDateTime)>,
    /// Who cleared it (`detector` when the condition ended), when, and why.
    pub cleared: Option<(String, OffsetDateTime, String)>,
}

/// What a raise did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RaiseOutcome {
    /// No alarm of this type and originator was active: a new one.
    New(StoredAlarm),
    /// The active one was updated (last seen, count, evidence, severity if higher).
    Updated(StoredAlarm),
}

impl RaiseOutcome {
    /// The alarm after the raise.
    pub fn alarm(&self) -> &StoredAlarm {
        match self {
            Self::New(a) | Self::Updated(a) => a,
        }
    }
}

/// Why an acknowledgement or a clear changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum AlarmChangeError {
    /// No alarm has this id.
    #[error("alarm {0} does not exist")]
    NotFound(i64),
    /// Acknowledging an alarm already acknowledged.
    #[error("alarm {0} is already acknowledged")]
    AlreadyAcknowledged(i64),
    /// The alarm is cleared: final.
    #[error("alarm {0} is cleared")]
    Cleared(i64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which alarms to list: every filter given must match; newest first, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmQuery {
    /// Only active (not cleared) alarms.
    pub active_only: bool,
    /// Only this type code.
    pub alarm_type: Option<String>,
    /// Only this severity code.
    pub severity: Option<String>,
    /// Only this originator code.
    pub originator: Option<String>,
    /// Only alarms with an id below this one (paging).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

impl Default for AlarmQuery {
    /// Every alarm, [`crate::DEFAULT_QUERY_LIMIT`].
    fn default() -> Self {
        Self {
            active_only: false,
            alarm_type: None,
            severity: None,
            originator: None,
            before: None,
            limit: crate::DEFAULT_QUERY_LIMIT,
        }
    }
}

/// Alarms and the concentrator topology. Every write is one durable transaction.
pub trait AlarmStore: Send + Sync + 'static {
    /// Raises an alarm: opens a new one, or updates the active one of the same type and
    /// originator (atomically: two raises at once never open two). An update sets last seen to
    /// the later of the stored one and `at` (first seen to the earlier), adds one to the count,
    /// takes this raise's summary, keeps the higher severity (critical > major > minor >
    /// warning) and appends the evidence; an acknowledgement is kept.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidRequest`] for a severity that is not one of the four codes or an
    /// empty type or originator (nothing stored).
    fn raise_alarm(&self, raise: &RaiseAlarm) -> Result<RaiseOutcome, StoreError>;

    /// Acknowledges an active, unacknowledged alarm; `by` (the operator, e.g. `user:alice`)
    /// and `at` are recorded.
    ///
    /// # Errors
    ///
    /// [`AlarmChangeError::NotFound`], [`AlarmChangeError::AlreadyAcknowledged`],
    /// [`AlarmChangeError::Cleared`] (nothing changed); an empty `by` is
    /// [`StoreError::InvalidRequest`].
    fn acknowledge_alarm(
        &self,
        id: i64,
        by: &str,
        at: OffsetDateTime,
    ) -> Result<StoredAlarm, AlarmChangeError>;

    /// Clears an active alarm (acknowledged or not), recording who, when and why; an
    /// acknowledgement is kept.
    ///
    /// # Errors
    ///
    /// [`AlarmChangeError::NotFound`], [`AlarmChangeError::Cleared`] (nothing changed); an
    /// empty `by` is [`StoreError::InvalidRequest`].
    fn clear_alarm(
        &self,
        id: i64,
        by: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<StoredAlarm, AlarmChangeError>;

    /// Clears the active alarm of this type and originator, if there is one (the detector saw
    /// the condition end); returns it.
    fn clear_active_alarm(
        &self,
        alarm_type: &str,
        originator: &str,
        by: &str,
        at: OffsetDateTime,
        reason: &str,
    ) -> Result<Option<StoredAlarm>, StoreError>;

    /// One alarm.
    fn alarm(&self, id: i64) -> Result<Option<StoredAlarm>, StoreError>;

    /// Alarms matching `query`, newest first.
    fn alarms(&self, query: &AlarmQuery) -> Result<Vec<StoredAlarm>, StoreError>;

    /// Active alarms per severity code (every severity with at least one), most severe first.
    fn active_alarm_counts(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// Registers `meters` behind `concentrator` (a meter registered behind another one moves);
    /// returns how many changed (new or moved: a meter already behind `concentrator` changes
    /// nothing, its attach time included).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidRequest`] if `meters` holds `concentrator` itself (nothing stored).
    fn attach_meters(
        &self,
        concentrator: &MeterId,
        meters: &[MeterId],
        at: OffsetDateTime,
    ) -> Result<u64, StoreError>;

    /// Removes `meters` from behind `concentrator`; returns how many were there.
    fn detach_meters(&self, concentrator: &MeterId, meters: &[MeterId]) -> Result<u64, StoreError>;

    /// The meters registered behind `concentrator`, by id.
    fn concentrator_meters(&self, concentrator: &MeterId) -> Result<Vec<MeterId>, StoreError>;

    /// The concentrator `meter` is registered behind.
    fn concentrator_of(&self, meter: &MeterId) -> Result<Option<MeterId>, StoreError>;

    /// The whole topology: (concentrator, meter) pairs ordered by concentrator, then meter.
    fn topology(&self) -> Result<Vec<(MeterId, MeterId)>, StoreError>;
}
