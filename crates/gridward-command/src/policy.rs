//! [`Policy`]: the rules the command service applies, with safe defaults.

use gridward_core::command::CommandKind;

/// The rules of the command service. [`Policy::default`] is what the head-end runs with unless
/// configured otherwise; [`Policy::validate`] refuses values that would switch a safeguard off.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Kinds that need a second operator's approval when sent to more than
    /// [`Policy::four_eyes_threshold`] meters at once. Default: `[Disconnect]`.
    pub critical_kinds: Vec<CommandKind>,
    /// A critical command to more meters than this needs four eyes. Default 10.
    pub four_eyes_threshold: usize,
    /// How long a proposal waits for its approval. Default 30 min.
    pub approval_window: time::Duration,
    /// A command's lifetime when the request names none. Default 1 h.
    pub default_ttl: time::Duration,
    /// The longest lifetime a request may ask for. Default 7 days.
    pub max_ttl: time::Duration,
    /// The lifetime of a campaign's firmware-update commands. Default 7 days.
    pub firmware_ttl: time::Duration,
    /// The most meters one request may address. Default 100 000.
    pub max_meters_per_request: usize,
    /// Commands published per second, fleet-wide (token bucket rate). Default 50.
    pub dispatch_rate_per_sec: u32,
    /// Commands that may leave at once after a quiet period (token bucket size). Default 50.
    pub dispatch_burst: u32,
    /// How long the dispatcher waits for a meter's PUBACK before it counts the publication as
    /// lost. Default 30 s.
    pub delivery_timeout: std::time::Duration,
    /// How often the dispatcher looks at everything (expiry, campaigns, queued commands of
    /// reachable meters). Default 1 s.
    pub tick: std::time::Duration,
    /// Firmware images transferred at once (each to one meter). Default 8.
    pub max_concurrent_transfers: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            critical_kinds: vec![CommandKind::Disconnect],
            four_eyes_threshold: 10,
            approval_window: time::Duration::minutes(30),
            default_ttl: time::Duration::hours(1),
            max_ttl: time::Duration::days(7),
            firmware_ttl: time::Duration::days(7),
            max_meters_per_request: 100_000,
            dispatch_rate_per_sec: 50,
            dispatch_burst: 50,
            delivery_timeout: std::time::Duration::from_secs(30),
            tick: std::time::Duration::from_secs(1),
            max_concurrent_transfers: 8,
        }
    }
}

/// A [`Policy`] value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A duration that must be positive is not.
    #[error("{0} must be positive")]
    NotPositive(&'static str),
    /// A count that must be at least one is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// The default lifetime (or the firmware lifetime) is longer than the maximum.
    #[error("{0} is longer than max_ttl; raise max_ttl or shorten it")]
    AboveMaxTtl(&'static str),
}

impl Policy {
    /// Checks that every safeguard stays on: positive durations, a non-zero rate and burst.
    ///
    /// # Errors
    ///
    /// The first [`PolicyError`] found.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (name, d) in [
            ("approval_window", self.approval_window),
            ("default_ttl", self.default_ttl),
            ("max_ttl", self.max_ttl),
            ("firmware_ttl", self.firmware_ttl),
        ] {
            if !d.is_positive() {
                return Err(PolicyError::NotPositive(name));
            }
        }
        for (name, d) in [
            ("delivery_timeout", self.delivery_timeout),
            ("tick", self.tick),
        ] {
            if d.is_zero() {
                return Err(PolicyError::NotPositive(name));
            }
        }
        for (name, n) in [
            ("dispatch_rate_per_sec", self.dispatch_rate_per_sec as usize),
            ("dispatch_burst", self.dispatch_burst as usize),
            ("max_meters_per_request", self.max_meters_per_request),
            ("max_concurrent_transfers", self.max_concurrent_transfers),
        ] {
            if n == 0 {
                return Err(PolicyError::Zero(name));
            }
        }
        if self.default_ttl > self.max_ttl {
            return Err(PolicyError::AboveMaxTtl("default_ttl"));
        }
        if self.firmware_ttl > self.max_ttl {
            return Err(PolicyError::AboveMaxTtl("firmware_ttl"));
        }
        Ok(())
    }

    /// Whether `kind` to `meters` meters needs a second operator's approval.
    pub fn needs_four_eyes(&self, kind: CommandKind, meters: usize) -> bool {
        self.critical_kinds.contains(&kind) && meters > self.four_eyes_threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(Policy::default().validate(), Ok(()));
    }

    #[test]
    fn four_eyes_rule() {
        let p = Policy::default();
        assert!(!p.needs_four_eyes(CommandKind::Disconnect, 10));
        assert!(p.needs_four_eyes(CommandKind::Disconnect, 11));
        assert!(!p.needs_four_eyes(CommandKind::ReadNow, 11));
        assert!(!p.needs_four_eyes(CommandKind::FirmwareUpdate, 1000));
    }

    #[test]
    fn refuses_switched_off_safeguards() {
        let bad = |f: fn(&mut Policy)| {
            let mut p = Policy::default();
            f(&mut p);
            p.validate()
        };
        assert_eq!(
            bad(|p| p.dispatch_rate_per_sec = 0),
            Err(PolicyError::Zero("dispatch_rate_per_sec"))
        );
        assert_eq!(
            bad(|p| p.dispatch_burst = 0),
            Err(PolicyError::Zero("dispatch_burst"))
        );
        assert_eq!(
            bad(|p| p.approval_window = time::Duration::ZERO),
            Err(PolicyError::NotPositive("approval_window"))
        );
        assert_eq!(
            bad(|p| p.tick = std::time::Duration::ZERO),
            Err(PolicyError::NotPositive("tick"))
        );
        assert_eq!(
            bad(|p| p.default_ttl = time::Duration::days(8)),
            Err(PolicyError::AboveMaxTtl("default_ttl"))
        );
    }
}
