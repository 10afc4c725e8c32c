//! The message counter: handed out from blocks reserved in advance, never reused.
//!
//! Persisting the counter before every message would cost an fsync per message per meter, far
//! too much for a fleet. Instead a meter persists a *high-water mark* `limit` and hands out
//! counters below it without touching the disk:
//!
//! ```text
//!   persisted mark ──► limit = next + block          (one fsync per block, batched per fleet)
//!   take()         ──► next, next+1, ... , limit−1   (no IO)
//!   remaining ≤ block/2 ──► ask for a new mark in the background; take() fails only at limit
//!   crash, restart ──► next = persisted limit        (counters between skipped, never reused)
//! ```
//!
//! [`CounterBlock`] is the in-memory half; [`crate::state::CounterStore`] persists the marks.

/// The first counter a meter with no persisted state uses.
pub const FIRST_COUNTER: u64 = 1;

/// Default number of counters reserved per persisted mark.
pub const DEFAULT_BLOCK: u64 = 1024;

/// Why no counter could be handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CounterError {
    /// Every counter below the persisted mark is used; a new mark must be persisted first.
    #[error("counter block exhausted at {next}: persist a new high-water mark before sending")]
    Exhausted {
        /// The next counter, equal to the persisted limit.
        next: u64,
    },
}

/// The counters a meter may use: `next..limit`, where `limit` is already persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterBlock {
    next: u64,
    limit: u64,
}

impl CounterBlock {
    /// The state after a (re)start: the next counter is the persisted mark (or
    /// [`FIRST_COUNTER`] for a meter never run), and nothing is reserved yet.
    pub fn resume(persisted_mark: Option<u64>) -> Self {
        let next = persisted_mark.unwrap_or(FIRST_COUNTER).max(FIRST_COUNTER);
        Self { next, limit: next }
    }

    /// The next counter [`take`](Self::take) will return.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The persisted high-water mark: every counter handed out is below it.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// How many counters may still be handed out without persisting a new mark.
    pub fn remaining(&self) -> u64 {
        self.limit - self.next
    }

    /// Hands out the next counter, or [`CounterError::Exhausted`] at the persisted limit.
    pub fn take(&mut self) -> Result<u64, CounterError> {
        if self.next >= self.limit {
            return Err(CounterError::Exhausted { next: self.next });
        }
        let c = self.next;
        self.next += 1;
        Ok(c)
    }

    /// Whether a new mark should be reserved now: half the block or less remains.
    pub fn wants_reservation(&self, block: u64) -> bool {
        self.remaining() <= block / 2
    }

    /// The mark to persist for a fresh block of `block` counters past the next one.
    pub fn reservation(&self, block: u64) -> u64 {
        self.next.saturating_add(block.max(1))
    }

    /// Records that `mark` is now durably persisted. A mark below the current limit (an older
    /// reservation completing late) changes nothing.
    pub fn granted(&mut self, mark: u64) {
        self.limit = self.limit.max(mark);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn nothing_is_handed_out_before_a_mark_is_persisted() {
        let mut b = CounterBlock::resume(None);
        assert_eq!(
            b.take(),
            Err(CounterError::Exhausted {
                next: FIRST_COUNTER
            })
        );
        assert!(b.wants_reservation(10));
        b.granted(b.reservation(10));
        assert_eq!((b.take(), b.take()), (Ok(1), Ok(2)));
        assert_eq!(b.remaining(), 8);
    }

    #[test]
    fn block_is_exhausted_exactly_at_the_limit() {
        let mut b = CounterBlock::resume(Some(100));
        b.granted(b.reservation(4));
        assert_eq!(b.limit(), 104);
        let taken: Vec<u64> = (0..4).map(|_| b.take().unwrap()).collect();
        assert_eq!(taken, [100, 101, 102, 103]);
        assert_eq!(b.take(), Err(CounterError::Exhausted { next: 104 }));
    }

    #[test]
    fn reservation_is_wanted_at_half_block() {
        let mut b = CounterBlock::resume(Some(1));
        b.granted(b.reservation(10));
        for _ in 0..4 {
            b.take().unwrap();
        }
        assert!(!b.wants_reservation(10)); // 6 remain
        b.take().unwrap();
        assert!(b.wants_reservation(10)); // 5 remain
        // Prefetching extends the limit without disturbing the sequence.
        b.granted(b.reservation(10));
        assert_eq!(b.limit(), 16);
        assert_eq!(b.take(), Ok(6));
    }

    #[test]
    fn late_grant_never_lowers_the_limit() {
        let mut b = CounterBlock::resume(Some(1));
        b.granted(50);
        b.granted(20);
        assert_eq!(b.limit(), 50);
    }

    #[test]
    fn counter_zero_is_never_used() {
        let b = CounterBlock::resume(Some(0));
        assert_eq!(b.next(), FIRST_COUNTER);
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        let mut b = CounterBlock::resume(Some(u64::MAX - 1));
        b.granted(b.reservation(1024));
        assert_eq!(b.limit(), u64::MAX);
        assert_eq!(b.take(), Ok(u64::MAX - 1));
        assert_eq!(b.take(), Err(CounterError::Exhausted { next: u64::MAX }));
    }
}
