//! [`RateLimiter`]: a sans-IO token bucket per source address, for login attempts.
//!
//! Each source starts with [`RateLimit::burst`] tokens; an attempt takes one; tokens come back
//! at [`RateLimit::per_minute`] a minute up to the burst. IPv6 sources are keyed by their /64
//! prefix (one host usually holds a whole /64). The table is bounded
//! ([`RateLimit::max_sources`]): when it is full, sources whose bucket has refilled are
//! forgotten, and if none has, a new source is refused (fail closed) until one has.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use time::OffsetDateTime;

/// The limits of a [`RateLimiter`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Attempts a source may make at once.
    pub burst: u32,
    /// Attempts a source regains per minute.
    pub per_minute: u32,
    /// Sources remembered at most.
    pub max_sources: usize,
}

impl Default for RateLimit {
    /// 10 attempts a minute, bursts of 10, 100 000 sources.
    fn default() -> Self {
        Self {
            burst: 10,
            per_minute: 10,
            max_sources: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: OffsetDateTime,
}

/// Token buckets keyed by source address. Time is passed in.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    /// A limiter with `limit`.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `source` at `now`; `false` if it has none left (refused).
    pub fn try_acquire(&mut self, source: IpAddr, now: OffsetDateTime) -> bool {
        let key = key_of(source);
        let limit = self.limit;
        if !self.buckets.contains_key(&key) && self.buckets.len() >= limit.max_sources {
            self.buckets
                .retain(|_, b| refilled(limit, b, now) < f64::from(limit.burst));
            if self.buckets.len() >= limit.max_sources {
                return false;
            }
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: f64::from(limit.burst),
            updated: now,
        });
        bucket.tokens = refilled(limit, bucket, now);
        if bucket.updated < now {
            bucket.updated = now;
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sources remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// The tokens `b` holds at `now` (a clock going backwards refills nothing).
fn refilled(limit: RateLimit, b: &Bucket, now: OffsetDateTime) -> f64 {
    let elapsed = (now - b.updated).as_seconds_f64().max(0.0);
    (b.tokens + elapsed * f64::from(limit.per_minute) / 60.0).min(f64::from(limit.burst))
}

fn key_of(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::{Duration, macros::datetime};

    const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_refill_per_source() {
        let mut rl = RateLimiter::new(RateLimit::default());
        for i in 0..10 {
            assert!(rl.try_acquire(ip("192.0.2.1"), T0), "attempt {i}");
        }
        assert!(!rl.try_acquire(ip("192.0.2.1"), T0));
        // Another source is not affected.
        assert!(rl.try_acquire(ip("192.0.2.2"), T0));
        // One token back every 6 s.
        assert!(!rl.try_acquire(ip("192.0.2.1"), T0 + Duration::seconds(5)));
        assert!(rl.try_acquire(ip("192.0.2.1"), T0 + Duration::seconds(6)));
        assert!(!rl.try_acquire(ip("192.0.2.1"), T0 + Duration::seconds(7)));
        // A full minute later the burst is back, not more.
        let later = T0 + Duration::minutes(10);
        for _ in 0..10 {
            assert!(rl.try_acquire(ip("192.0.2.1"), later));
        }
        assert!(!rl.try_acquire(ip("192.0.2.1"), later));
    }

    #[test]
    fn ipv6_is_keyed_by_slash_64() {
        let mut rl = RateLimiter::new(RateLimit {
            burst: 2,
            per_minute: 1,
            max_sources: 10,
        });
        assert!(rl.try_acquire(ip("2001:db8::1"), T0));
        assert!(rl.try_acquire(ip("2001:db8::2"), T0));
        assert!(!rl.try_acquire(ip("2001:db8::ffff:3"), T0));
        assert!(rl.try_acquire(ip("2001:db8:0:1::1"), T0));
        assert!(rl.try_acquire(ip("::ffff:192.0.2.9"), T0));
        assert!(rl.try_acquire(ip("192.0.2.9"), T0));
        assert!(!rl.try_acquire(ip("192.0.2.9"), T0));
    }

    #[test]
    fn table_is_bounded_and_forgets_refilled_sources() {
        let limit = RateLimit {
            burst: 1,
            per_minute: 60,
            max_sources: 2,
        };
        let mut rl = RateLimiter::new(limit);
        assert!(rl.try_acquire(ip("192.0.2.1"), T0));
        assert!(rl.try_acquire(ip("192.0.2.2"), T0));
        // Full, nobody refilled: a new source is refused.
        assert!(!rl.try_acquire(ip("192.0.2.3"), T0));
        assert_eq!(rl.len(), 2);
        // A second later both have refilled and are forgotten.
        assert!(rl.try_acquire(ip("192.0.2.3"), T0 + Duration::seconds(1)));
        assert_eq!(rl.len(), 1);
    }

    #[test]
    fn clock_going_backwards_refills_nothing() {
        let mut rl = RateLimiter::new(RateLimit {
            burst: 1,
            per_minute: 1,
            max_sources: 10,
        });
        assert!(rl.try_acquire(ip("192.0.2.1"), T0));
        assert!(!rl.try_acquire(ip("192.0.2.1"), T0 - Duration::hours(1)));
    }
}
