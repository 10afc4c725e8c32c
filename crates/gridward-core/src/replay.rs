//! Freshness: the per-meter counter must strictly increase and the signing time must fall
//! within a window around `now`.
//!
//! [`check_freshness`] is the pure rule; [`ReplayGuard`] keeps the last accepted counter per
//! meter in memory for callers that have no store (the head-end keeps the same state durably
//! and applies the same rule).

use std::collections::HashMap;

use time::{Duration, OffsetDateTime};

use crate::envelope::VerifiedEnvelope;
use crate::meter_id::MeterId;

/// Default allowed difference between a message's timestamp and `now`: five minutes either way.
pub const DEFAULT_MAX_SKEW: Duration = Duration::minutes(5);

/// The freshness rule's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshnessPolicy {
    /// How far a message's timestamp may lie before or after `now`.
    pub max_skew: Duration,
}

impl Default for FreshnessPolicy {
    fn default() -> Self {
        Self {
            max_skew: DEFAULT_MAX_SKEW,
        }
    }
}

/// Why a message is not fresh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FreshnessError {
    /// The counter is not greater than the last accepted one: a replay (or a meter that reused
    /// a counter, which is as bad).
    #[error("replay: counter {counter} is not greater than the last accepted counter {last}")]
    Replay {
        /// Counter of the refused message.
        counter: u64,
        /// Last counter accepted from this meter.
        last: u64,
    },
    /// The timestamp lies further in the past than the window allows.
    #[error(
        "stale message: signed at {timestamp}, {age_seconds} s before now (window ±{window_seconds} s)"
    )]
    Stale {
        /// Message timestamp, seconds since the epoch.
        timestamp: i64,
        /// How old the message is, in seconds.
        age_seconds: i64,
        /// The window, in seconds.
        window_seconds: i64,
    },
    /// The timestamp lies further in the future than the window allows.
    #[error(
        "message from the future: signed at {timestamp}, {ahead_seconds} s after now (window ±{window_seconds} s)"
    )]
    Future {
        /// Message timestamp, seconds since the epoch.
        timestamp: i64,
        /// How far ahead of now the message is, in seconds.
        ahead_seconds: i64,
        /// The window, in seconds.
        window_seconds: i64,
    },
}

/// The freshness rule: `counter` must be strictly greater than `last` (any counter is fresh
/// for a meter never heard from), and `timestamp` (seconds since the epoch) within
/// `policy.max_skew` of `now`.
pub fn check_freshness(
    last: Option<u64>,
    counter: u64,
    timestamp: i64,
    now: OffsetDateTime,
    policy: &FreshnessPolicy,
) -> Result<(), FreshnessError> {
    if let Some(last) = last
        && counter <= last
    {
        return Err(FreshnessError::Replay { counter, last });
    }
    let window = policy.max_skew.whole_seconds();
    let delta = timestamp.saturating_sub(now.unix_timestamp());
    if delta < -window {
        return Err(FreshnessError::Stale {
            timestamp,
            age_seconds: delta.saturating_neg(),
            window_seconds: window,
        });
    }
    if delta > window {
        return Err(FreshnessError::Future {
            timestamp,
            ahead_seconds: delta,
            window_seconds: window,
        });
    }
    Ok(())
}

/// In-memory replay guard: the last accepted counter of every meter.
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    policy: FreshnessPolicy,
    last: HashMap<MeterId, u64>,
}

impl ReplayGuard {
    /// An empty guard with `policy`.
    pub fn new(policy: FreshnessPolicy) -> Self {
        Self {
            policy,
            last: HashMap::new(),
        }
    }

    /// A guard that resumes from known last counters (for example loaded from a store).
    pub fn with_state(
        policy: FreshnessPolicy,
        last: impl IntoIterator<Item = (MeterId, u64)>,
    ) -> Self {
        Self {
            policy,
            last: last.into_iter().collect(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &FreshnessPolicy {
        &self.policy
    }

    /// The last counter accepted from `meter`.
    pub fn last_counter(&self, meter: &MeterId) -> Option<u64> {
        self.last.get(meter).copied()
    }

    /// Checks freshness without recording anything.
    pub fn check(
        &self,
        meter: &MeterId,
        counter: u64,
        timestamp: i64,
        now: OffsetDateTime,
    ) -> Result<(), FreshnessError> {
        check_freshness(
            self.last_counter(meter),
            counter,
            timestamp,
            now,
            &self.policy,
        )
    }

    /// Checks a verified envelope's freshness and, if fresh, records its counter.
    pub fn accept(
        &mut self,
        envelope: &VerifiedEnvelope,
        now: OffsetDateTime,
    ) -> Result<(), FreshnessError> {
        let h = envelope.header();
        self.check(&h.meter_id, h.counter, h.timestamp, now)?;
        self.last.insert(h.meter_id.clone(), h.counter);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2024-02-06 12:00:00 UTC);

    fn ts(offset: i64) -> i64 {
        NOW.unix_timestamp() + offset
    }

    #[test]
    fn counter_must_strictly_increase() {
        let p = FreshnessPolicy::default();
        assert_eq!(check_freshness(None, 0, ts(0), NOW, &p), Ok(()));
        assert_eq!(check_freshness(Some(4), 5, ts(0), NOW, &p), Ok(()));
        assert_eq!(
            check_freshness(Some(5), 5, ts(0), NOW, &p),
            Err(FreshnessError::Replay {
                counter: 5,
                last: 5
            })
        );
        assert_eq!(
            check_freshness(Some(5), 4, ts(0), NOW, &p),
            Err(FreshnessError::Replay {
                counter: 4,
                last: 5
            })
        );
        assert_eq!(
            check_freshness(Some(u64::MAX), u64::MAX, ts(0), NOW, &p),
            Err(FreshnessError::Replay {
                counter: u64::MAX,
                last: u64::MAX
            })
        );
    }

    #[test]
    fn window_edges_are_inclusive() {
        let p = FreshnessPolicy::default();
        assert_eq!(check_freshness(None, 1, ts(-300), NOW, &p), Ok(()));
        assert_eq!(check_freshness(None, 1, ts(300), NOW, &p), Ok(()));
        assert_eq!(
            check_freshness(None, 1, ts(-301), NOW, &p),
            Err(FreshnessError::Stale {
                timestamp: ts(-301),
                age_seconds: 301,
                window_seconds: 300
            })
        );
        assert_eq!(
            check_freshness(None, 1, ts(301), NOW, &p),
            Err(FreshnessError::Future {
                timestamp: ts(301),
                ahead_seconds: 301,
                window_seconds: 300
            })
        );
    }

    #[test]
    fn configurable_window_and_extreme_timestamps() {
        let p = FreshnessPolicy {
            max_skew: Duration::seconds(10),
        };
        assert!(matches!(
            check_freshness(None, 1, ts(-11), NOW, &p),
            Err(FreshnessError::Stale { .. })
        ));
        assert!(matches!(
            check_freshness(None, 1, i64::MIN, NOW, &p),
            Err(FreshnessError::Stale { .. })
        ));
        assert!(matches!(
            check_freshness(None, 1, i64::MAX, NOW, &p),
            Err(FreshnessError::Future { .. })
        ));
    }

    #[test]
    fn replay_is_checked_before_time() {
        let p = FreshnessPolicy::default();
        assert!(matches!(
            check_freshness(Some(9), 9, ts(-10_000), NOW, &p),
            Err(FreshnessError::Replay { .. })
        ));
    }

    #[test]
    fn guard_keeps_state_per_meter() {
        let a = MeterId::new("a").unwrap();
        let b = MeterId::new("b").unwrap();
        let guard = ReplayGuard::with_state(FreshnessPolicy::default(), [(a.clone(), 10)]);
        assert_eq!(guard.last_counter(&a), Some(10));
        assert_eq!(guard.last_counter(&b), None);
        assert!(guard.check(&a, 10, ts(0), NOW).is_err());
        assert!(guard.check(&b, 10, ts(0), NOW).is_ok());
    }
}
