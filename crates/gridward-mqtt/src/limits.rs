//! Sans-IO abuse limits: a per-connection [`TokenBucket`] and the per-source [`BanList`].
//! Both take the (monotonic) time as an argument.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

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
/// missing CONNECTs).
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
