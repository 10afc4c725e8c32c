//! Sans-IO abuse limits: the per-meter [`TokenBucket`] (kept across a meter's connections in
//! [`MeterBuckets`]) and the per-source [`BanList`]. All take the (monotonic) time as an
//! argument.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use gridward_core::MeterId;

/// A token bucket: `burst` tokens, refilled at `rate` tokens per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token; `false` when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now` (its owner has been quiet long enough that
    /// forgetting the bucket changes nothing).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// The rate-limit buckets of meters, kept across their connections: a meter that reconnects
/// continues with the bucket its last connection left, so reconnecting does not refill it.
///
/// Bounded: at most `max` meters are tracked. When the table is full, meters whose bucket has
/// refilled (quiet for `burst / rate` seconds) are forgotten; if none has, a new meter is not
/// tracked and its connections each start with a full bucket (the per-connection limit still
/// holds).
#[derive(Debug, Clone)]
pub struct MeterBuckets {
    max: usize,
    buckets: HashMap<MeterId, TokenBucket>,
}

impl MeterBuckets {
    /// An empty table of at most `max` meters.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            buckets: HashMap::new(),
        }
    }

    /// The bucket `meter`'s connections left, if it is tracked.
    pub fn get(&self, meter: &MeterId) -> Option<TokenBucket> {
        self.buckets.get(meter).cloned()
    }

    /// Records `bucket` as `meter`'s at `now`.
    pub fn put(&mut self, meter: &MeterId, bucket: &TokenBucket, now: Instant) {
        if let Some(b) = self.buckets.get_mut(meter) {
            *b = bucket.clone();
            return;
        }
        if self.buckets.len() >= self.max {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max {
                return;
            }
        }
        self.buckets.insert(meter.clone(), bucket.clone());
    }

    /// Number of meters tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no meter is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// What [`BanList::admit`] says about a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Allowed,
    /// The source is banned until the given instant.
    Banned {
        /// End of the ban.
        until: Instant,
    },
}

/// Settings of a [`BanList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanPolicy {
    /// Failures within `window` that trigger a ban; 0 disables banning.
    pub threshold: u32,
    /// Counting window.
    pub window: Duration,
    /// Ban length.
    pub duration: Duration,
    /// Never banned.
    pub exempt: Vec<IpAddr>,
    /// Most sources tracked at once.
    pub max_tracked: usize,
}

/// Temporary bans of source addresses after repeated failures (failed TLS handshakes, refused or
/// missing CONNECTs, sessions cut for abuse).
#[derive(Debug, Clone)]
pub struct BanList {
    policy: BanPolicy,
    failures: HashMap<IpAddr, VecDeque<Instant>>,
    banned: HashMap<IpAddr, Instant>,
}

impl BanList {
    /// An empty list.
    pub fn new(policy: BanPolicy) -> Self {
        Self {
            policy,
            failures: HashMap::new(),
            banned: HashMap::new(),
        }
    }

    /// Whether a connection from `ip` may proceed at `now`.
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Admission {
        match self.banned.get(&ip) {
            Some(&until) if now < until => Admission::Banned { until },
            Some(_) => {
                self.banned.remove(&ip);
                Admission::Allowed
            }
            None => Admission::Allowed,
        }
    }

    /// Records one failure of `ip`. Returns `Some(until)` when this failure starts a ban.
    pub fn record_failure(&mut self, ip: IpAddr, now: Instant) -> Option<Instant> {
        let p = &self.policy;
        if p.threshold == 0 || p.exempt.contains(&ip) {
            return None;
        }
        if self.banned.get(&ip).is_some_and(|until| now < *until) {
            return None;
        }
        if !self.failures.contains_key(&ip) && self.failures.len() >= p.max_tracked {
            self.purge(now);
            if self.failures.len() >= self.policy.max_tracked {
                return None;
            }
        }
        let window = self.policy.window;
        let threshold = self.policy.threshold;
        let q = self.failures.entry(ip).or_default();
        while q
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            q.pop_front();
        }
        q.push_back(now);
        if q.len() >= usize::try_from(threshold).unwrap_or(usize::MAX) {
            self.failures.remove(&ip);
            let until = now + self.policy.duration;
            self.banned.insert(ip, until);
            Some(until)
        } else {
            None
        }
    }

    /// Forgets failures older than the window and bans that ended.
    pub fn purge(&mut self, now: Instant) {
        let window = self.policy.window;
        self.failures.retain(|_, q| {
            q.back()
                .is_some_and(|t| now.saturating_duration_since(*t) <= window)
        });
        self.banned.retain(|_, until| now < *until);
    }

    /// Number of sources currently tracked (failures or bans).
    pub fn tracked(&self) -> usize {
        self.failures.len() + self.banned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(150)));
        // Refill is capped at the burst.
        let later = t0 + Duration::from_secs(100);
        assert!(b.take(later) && b.take(later) && b.take(later));
        assert!(!b.take(later));
    }

    #[test]
    fn a_bucket_is_full_again_after_burst_over_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5, t0);
        assert!(b.is_full(t0));
        assert!(b.take(t0) && b.take(t0));
        assert!(!b.is_full(t0));
        assert!(!b.is_full(t0 + Duration::from_millis(150)));
        assert!(b.is_full(t0 + Duration::from_millis(200)));
    }

    #[test]
    fn meter_buckets_keep_state_and_stay_bounded() {
        let t0 = Instant::now();
        let m = |s: &str| MeterId::new(s).unwrap_or_else(|e| panic!("{e}"));
        let mut t = MeterBuckets::new(2);
        let mut b = TokenBucket::new(1.0, 2, t0);
        assert!(b.take(t0) && b.take(t0));
        t.put(&m("M-1"), &b, t0);
        // The next connection of M-1 continues with an empty bucket.
        let mut again = t.get(&m("M-1")).unwrap_or_else(|| panic!("tracked"));
        assert!(!again.take(t0));
        assert!(t.get(&m("M-2")).is_none());
        let full = TokenBucket::new(1.0, 2, t0);
        t.put(&m("M-2"), &full, t0);
        assert_eq!(t.len(), 2);
        // Full table: M-2's bucket is full, so it makes room for M-3; M-1's is not.
        t.put(&m("M-3"), &full, t0);
        assert_eq!(t.len(), 2);
        assert!(t.get(&m("M-1")).is_some() && t.get(&m("M-2")).is_none());
        // Nothing can go: M-4 is not tracked.
        let mut busy = TokenBucket::new(1.0, 2, t0);
        assert!(busy.take(t0));
        t.put(&m("M-3"), &busy, t0);
        t.put(&m("M-4"), &busy, t0);
        assert!(t.get(&m("M-4")).is_none());
        // Later every bucket has refilled and M-4 finds room.
        t.put(&m("M-4"), &busy, t0 + Duration::from_secs(5));
        assert!(t.get(&m("M-4")).is_some());
    }

    fn policy(threshold: u32) -> BanPolicy {
        BanPolicy {
            threshold,
            window: Duration::from_secs(60),
            duration: Duration::from_secs(300),
            exempt: vec![ip("10.0.0.9")],
            max_tracked: 2,
        }
    }

    #[test]
    fn ban_after_threshold_within_window() {
        let t0 = Instant::now();
        let mut l = BanList::new(policy(3));
        let a = ip("10.0.0.1");
        assert_eq!(l.record_failure(a, t0), None);
        assert_eq!(l.record_failure(a, t0 + Duration::from_secs(1)), None);
        assert_eq!(l.admit(a, t0 + Duration::from_secs(1)), Admission::Allowed);
        let until = l.record_failure(a, t0 + Duration::from_secs(2));
        assert_eq!(until, Some(t0 + Duration::from_secs(302)));
        assert_eq!(
            l.admit(a, t0 + Duration::from_secs(3)),
            Admission::Banned {
                until: t0 + Duration::from_secs(302)
            }
        );
        // No second ban event while banned.
        assert_eq!(l.record_failure(a, t0 + Duration::from_secs(4)), None);
        // The ban ends.
        assert_eq!(
            l.admit(a, t0 + Duration::from_secs(302)),
            Admission::Allowed
        );
    }

    #[test]
    fn old_failures_expire_and_exempt_is_never_banned() {
        let t0 = Instant::now();
        let mut l = BanList::new(policy(2));
        let a = ip("10.0.0.1");
        assert_eq!(l.record_failure(a, t0), None);
        assert_eq!(l.record_failure(a, t0 + Duration::from_secs(61)), None);
        assert!(l.record_failure(a, t0 + Duration::from_secs(62)).is_some());
        let e = ip("10.0.0.9");
        for i in 0..10 {
            assert_eq!(l.record_failure(e, t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(l.admit(e, t0), Admission::Allowed);
        assert_eq!(BanList::new(policy(0)).record_failure(a, t0), None);
    }

    #[test]
    fn tracking_is_bounded() {
        let t0 = Instant::now();
        let mut l = BanList::new(policy(2));
        assert_eq!(l.record_failure(ip("1.1.1.1"), t0), None);
        assert_eq!(l.record_failure(ip("1.1.1.2"), t0), None);
        // Table full: a third source is not tracked...
        assert_eq!(l.record_failure(ip("1.1.1.3"), t0), None);
        assert_eq!(l.record_failure(ip("1.1.1.3"), t0), None);
        assert_eq!(l.tracked(), 2);
        // ...until old entries expire.
        let later = t0 + Duration::from_secs(120);
        assert_eq!(l.record_failure(ip("1.1.1.3"), later), None);
        assert!(l.record_failure(ip("1.1.1.3"), later).is_some());
    }
}
