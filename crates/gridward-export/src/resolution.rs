//! [`Resolution`]: the time buckets an export is coarsened to (UTC).

use std::str::FromStr;

use time::OffsetDateTime;

use crate::error::ExportError;

/// The length of an export's time buckets. Buckets are half-open, `[start, start + length)`,
/// aligned on the Unix epoch, so in UTC: quarter hours, hours, days from midnight UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resolution {
    /// 15 minutes (`15m`).
    Minutes15,
    /// One hour (`1h`).
    Hour,
    /// One UTC day (`1d`).
    Day,
}

impl Resolution {
    /// Every resolution.
    pub const ALL: [Resolution; 3] = [Resolution::Minutes15, Resolution::Hour, Resolution::Day];

    /// The code, as on the command line and in the metadata: `15m`, `1h`, `1d`.
    pub fn code(self) -> &'static str {
        match self {
            Resolution::Minutes15 => "15m",
            Resolution::Hour => "1h",
            Resolution::Day => "1d",
        }
    }

    /// The bucket length in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Resolution::Minutes15 => 15 * 60,
            Resolution::Hour => 3600,
            Resolution::Day => 86_400,
        }
    }

    /// The bucket `t` falls in, as its start's Unix time.
    pub fn bucket_of(self, t: OffsetDateTime) -> i64 {
        let s = self.seconds();
        t.unix_timestamp().div_euclid(s) * s
    }

    /// The start of the bucket `t` falls in.
    pub fn bucket_start(self, t: OffsetDateTime) -> OffsetDateTime {
        // The floor of a valid time is a valid time (the range of `time` is whole days).
        OffsetDateTime::from_unix_timestamp(self.bucket_of(t)).unwrap_or(t)
    }

    /// Whether `t` is a bucket boundary.
    pub fn is_aligned(self, t: OffsetDateTime) -> bool {
        t.nanosecond() == 0 && t.unix_timestamp().rem_euclid(self.seconds()) == 0
    }
}

impl FromStr for Resolution {
    type Err = ExportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Resolution::ALL
            .into_iter()
            .find(|r| r.code() == s)
            .ok_or_else(|| ExportError::BadResolution(s.to_owned()))
    }
}

impl std::fmt::Display for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn buckets_coarsen_to_15m_1h_1d() {
        let t = datetime!(2026-12-03 10:44:59.5 UTC);
        assert_eq!(
            Resolution::Minutes15.bucket_start(t),
            datetime!(2026-12-03 10:30 UTC)
        );
        assert_eq!(
            Resolution::Hour.bucket_start(t),
            datetime!(2026-12-03 10:00 UTC)
        );
        assert_eq!(
            Resolution::Day.bucket_start(t),
            datetime!(2026-12-03 00:00 UTC)
        );
        // Another offset is the same instant: days are UTC days.
        let local = datetime!(2026-12-03 01:30 +03:00);
        assert_eq!(
            Resolution::Day.bucket_start(local),
            datetime!(2026-12-02 00:00 UTC)
        );
        // Before the epoch too.
        assert_eq!(
            Resolution::Hour.bucket_start(datetime!(1969-12-31 23:59 UTC)),
            datetime!(1969-12-31 23:00 UTC)
        );
        // A boundary starts its own bucket.
        let b = datetime!(2026-12-03 11:00 UTC);
        assert_eq!(Resolution::Minutes15.bucket_start(b), b);
        assert!(Resolution::Hour.is_aligned(b));
        assert!(!Resolution::Day.is_aligned(b));
        assert!(!Resolution::Minutes15.is_aligned(datetime!(2026-12-03 11:00:00.1 UTC)));
    }

    #[test]
    fn codes_parse_and_others_are_refused() {
        for r in Resolution::ALL {
            assert_eq!(r.code().parse::<Resolution>().unwrap(), r);
        }
        for bad in ["", "15", "1H", "1w", "30m"] {
            assert!(
                matches!(bad.parse::<Resolution>(), Err(ExportError::BadResolution(s)) if s == bad)
            );
        }
    }
}
