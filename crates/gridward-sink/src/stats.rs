//! Counters of a running sink: requests received, readings stored, duplicates, refusals per
//! reason code, refused TLS handshakes, store failures.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// The live counters (shared by every connection).
#[derive(Debug, Default)]
pub struct Stats {
    received: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    tls_refused: AtomicU64,
    store_failures: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl Stats {
    pub(crate) fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stored(&self) {
        self.stored.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_refused(&self) {
        self.tls_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn store_failure(&self) {
        self.store_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refused(&self, code: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(code)
            .or_insert(0) += 1;
    }

    /// A copy of the current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            tls_refused: self.tls_refused.load(Ordering::Relaxed),
            store_failures: self.store_failures.load(Ordering::Relaxed),
            refused: self
                .refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        }
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// HTTP requests received.
    pub received: u64,
    /// Readings stored (201).
    pub stored: u64,
    /// Readings already stored, answered 200.
    pub duplicates: u64,
    /// Connections whose TLS handshake failed (no or untrusted client certificate, ...).
    pub tls_refused: u64,
    /// Requests answered 503 because the store failed.
    pub store_failures: u64,
    /// Refused requests per reason code.
    pub refused: BTreeMap<String, u64>,
}

impl StatsSnapshot {
    /// Refused requests, all reasons.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// Refused requests with this reason code.
    pub fn refused(&self, code: &str) -> u64 {
        self.refused.get(code).copied().unwrap_or(0)
    }
}

/// `received 5, stored 3, duplicates 1, refused 1 (bad_signature 1), tls refused 0`.
impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {}, stored {}, duplicates {}, refused {}",
            self.received,
            self.stored,
            self.duplicates,
            self.refused_total()
        )?;
        if !self.refused.is_empty() {
            let reasons: Vec<String> = self
                .refused
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            write!(f, " ({})", reasons.join(", "))?;
        }
        write!(f, ", tls refused {}", self.tls_refused)?;
        if self.store_failures > 0 {
            write!(f, ", store failures {}", self.store_failures)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counts_line_names_every_reason() {
        let s = Stats::default();
        s.received();
        s.received();
        s.stored();
        s.refused("bad_signature");
        assert_eq!(
            s.snapshot().to_string(),
            "received 2, stored 1, duplicates 0, refused 1 (bad_signature 1), tls refused 0"
        );
        s.store_failure();
        assert!(s.snapshot().to_string().ends_with(", store failures 1"));
        assert_eq!(s.snapshot().refused("bad_signature"), 1);
        assert_eq!(s.snapshot().refused("other"), 0);
    }
}
