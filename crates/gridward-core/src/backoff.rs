//! Retry delays: exponential backoff with full jitter (meters reconnecting, the forwarder retrying).
//!
//! After the `n`-th failure in a row the delay is drawn uniformly from `[0, min(cap, base · 2ⁿ)]`
//! ("full jitter"): 10,000 meters that lose the head-end at the same instant come back spread
//! over the whole window instead of in synchronised waves.

use std::time::Duration;

use rand::Rng;

/// The backoff state of one meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `cap` (a zero base is raised to 1 ms,
    /// a cap below the base is raised to it).
    pub fn new(base: Duration, cap: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// Failures in a row since the last [`reset`](Self::reset).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The upper bound of the next delay: `min(cap, base · 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=nanos))
    }

    /// Records a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_stay_within_bounds_and_spread() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut max_seen = Duration::ZERO;
        let mut below_half = 0;
        for _ in 0..2000 {
            let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
            for _ in 0..6 {
                b.next_delay(&mut rng);
            }
            let ceiling = b.ceiling();
            let d = b.next_delay(&mut rng);
            assert!(d <= ceiling && ceiling == Duration::from_secs(2));
            max_seen = max_seen.max(d);
            if d < ceiling / 2 {
                below_half += 1;
            }
        }
        // Full jitter: about half the delays fall in the lower half of the window.
        assert!((800..1200).contains(&below_half), "{below_half}");
        assert!(max_seen > Duration::from_millis(1900));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..1000 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(60));
        }
        assert_eq!(b.failures(), 1000);
    }

    #[test]
    fn degenerate_parameters_are_raised() {
        let b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.ceiling(), Duration::from_millis(1));
    }
}
