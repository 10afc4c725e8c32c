//! The simulated consumption: a daily load curve and the cumulative kWh register it drives.
//!
//! The register is a pure function of time, so it needs no persistence and never goes
//! backwards, even across a crash of the meter process:
//!
//! ```text
//! register(t) = start + Σ_{days before t} f_k · E_day  +  f_d · mean_kw · ∫₀^{hour(t)} shape  +  noise(t)
//! ```
//!
//! - `shape` is the daily curve (mean 1 over a day): a night base load, a morning peak around
//!   07:30, a daytime plateau and an evening peak around 19:00, built from raised-cosine bumps
//!   whose integrals have a closed form. Each meter shifts its peaks by up to ±45 minutes.
//! - `f_k` is a day-to-day factor in `1 ± day_variation`, chosen as a telescoping difference of
//!   hashed values so the sum over all past days has a closed form (O(1) per reading).
//! - `noise` is piecewise linear between 15-minute grid points, with an amplitude below the
//!   smallest energy the smooth curve adds over one grid step: it changes each interval's
//!   consumption without ever making the register decrease.
//!
//! Everything is derived from a seed, so a meter's curve is reproducible.

use std::f64::consts::PI;

use time::OffsetDateTime;

/// The origin of every register: 2024-01-01T00:00:00Z. Before it the register stands still.
pub const EPOCH_UNIX: i64 = 1_704_067_200;

/// Seconds per day.
const DAY: f64 = 86_400.0;

/// Spacing of the noise grid, in seconds (15 minutes).
const NOISE_GRID: f64 = 900.0;

/// Raw shape before normalisation: night base load, then (amplitude, centre hour, half-width).
const BASE: f64 = 0.35;
const BUMPS: [(f64, f64, f64); 3] = [
    (0.90, 7.5, 1.75),  // morning
    (0.35, 13.0, 4.0),  // daytime plateau
    (1.40, 19.0, 2.75), // evening
];

/// Largest peak shift, in hours, that keeps every bump inside one day.
const MAX_PHASE: f64 = 0.75;

/// One meter's consumption model. Build it with [`LoadProfile::from_seed`] or [`LoadProfile::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoadProfile {
    seed: u64,
    mean_kw: f64,
    start_kwh: f64,
    phase_hours: f64,
    utc_offset_seconds: i32,
    day_variation: f64,
    noise: f64,
}

/// Why a [`LoadProfile`] could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// A parameter is out of its range.
    #[error("load profile parameter {name} = {value} is out of range ({range})")]
    OutOfRange {
        /// Which parameter.
        name: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range, for the message.
        range: &'static str,
    },
}

impl LoadProfile {
    /// A profile with explicit parameters.
    ///
    /// - `mean_kw`: average power over a day, in kW (0 < mean_kw ≤ 10,000);
    /// - `start_kwh`: the register at [`EPOCH_UNIX`] (0 ≤ start_kwh ≤ 1e9);
    /// - `phase_hours`: shift of the peaks (|phase| ≤ 0.75);
    /// - `utc_offset_seconds`: the meter's local time offset, which places the peaks (|offset| ≤ 14 h);
    /// - `day_variation`: day-to-day factor amplitude (0 ≤ v ≤ 0.5);
    /// - `noise`: intra-day noise as a fraction of the most the register may lose (0 ≤ noise < 1).
    pub fn new(
        seed: u64,
        mean_kw: f64,
        start_kwh: f64,
        phase_hours: f64,
        utc_offset_seconds: i32,
        day_variation: f64,
        noise: f64,
    ) -> Result<Self, ProfileError> {
        let check = |name, value: f64, ok: bool, range| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(ProfileError::OutOfRange { name, value, range })
            }
        };
        check(
            "mean_kw",
            mean_kw,
            mean_kw > 0.0 && mean_kw <= 10_000.0,
            "0 < x ≤ 10000",
        )?;
        check(
            "start_kwh",
            start_kwh,
            (0.0..=1e9).contains(&start_kwh),
            "0 ≤ x ≤ 1e9",
        )?;
        check(
            "phase_hours",
            phase_hours,
            phase_hours.abs() <= MAX_PHASE,
            "|x| ≤ 0.75",
        )?;
        check(
            "utc_offset_seconds",
            f64::from(utc_offset_seconds),
            utc_offset_seconds.unsigned_abs() <= 14 * 3600,
            "|x| ≤ 50400",
        )?;
        check(
            "day_variation",
            day_variation,
            (0.0..=0.5).contains(&day_variation),
            "0 ≤ x ≤ 0.5",
        )?;
        check("noise", noise, (0.0..1.0).contains(&noise), "0 ≤ x < 1")?;
        Ok(Self {
            seed,
            mean_kw,
            start_kwh,
            phase_hours,
            utc_offset_seconds,
            day_variation,
            noise,
        })
    }

    /// A household-like profile drawn from `seed`: an annual consumption of 1,500–6,000 kWh,
    /// a register between 1,000 and 30,000 kWh at the epoch, peaks shifted by up to ±45 min,
    /// ±15 % day-to-day variation, noise at half the allowed amplitude, UTC.
    pub fn from_seed(seed: u64) -> Self {
        let u = |salt: u64| unit(mix(seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let annual_kwh = 1_500.0 + 4_500.0 * u(1);
        Self {
            seed,
            mean_kw: annual_kwh / 8_760.0,
            start_kwh: (1_000.0 + 29_000.0 * u(2)).floor(),
            phase_hours: (u(3) * 2.0 - 1.0) * MAX_PHASE,
            utc_offset_seconds: 0,
            day_variation: 0.15,
            noise: 0.5,
        }
    }

    /// The same profile with the peaks placed in local time at `utc_offset_seconds` (|offset| ≤ 14 h).
    pub fn with_utc_offset(mut self, utc_offset_seconds: i32) -> Result<Self, ProfileError> {
        if utc_offset_seconds.unsigned_abs() > 14 * 3600 {
            return Err(ProfileError::OutOfRange {
                name: "utc_offset_seconds",
                value: f64::from(utc_offset_seconds),
                range: "|x| ≤ 50400",
            });
        }
        self.utc_offset_seconds = utc_offset_seconds;
        Ok(self)
    }

    /// Average power over a day, in kW.
    pub fn mean_kw(&self) -> f64 {
        self.mean_kw
    }

    /// The register at [`EPOCH_UNIX`], in kWh.
    pub fn start_kwh(&self) -> f64 {
        self.start_kwh
    }

    /// The deterministic seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Seconds since the epoch in local time, or `None` before the epoch.
    fn local_seconds(&self, t: OffsetDateTime) -> Option<f64> {
        let s = t.unix_timestamp() - EPOCH_UNIX;
        if s < 0 {
            return None;
        }
        // Sub-second precision helps the shape tests; readings use whole seconds anyway.
        let s = s as f64 + f64::from(t.nanosecond()) * 1e-9;
        Some(s + f64::from(self.utc_offset_seconds))
    }

    /// The factor of day `k` (counted from the epoch in local time), in `1 ± day_variation`.
    fn day_factor(&self, k: u64) -> f64 {
        1.0 + self.day_variation * (self.day_unit(k + 1) - self.day_unit(k))
    }

    fn day_unit(&self, k: u64) -> f64 {
        unit(mix(self.seed
            ^ 0xD1B5_4A32_D192_ED03
            ^ k.wrapping_mul(0xA24B_AED4_963E_E407)))
    }

    /// The normalised daily shape at local hour `h` (its mean over a day is 1).
    fn shape(&self, h: f64) -> f64 {
        let raw: f64 = BASE
            + BUMPS
                .iter()
                .map(|&(a, c, w)| a * bump(h, c + self.phase_hours, w))
                .sum::<f64>();
        raw * norm()
    }

    /// `∫₀^h shape`, in hours.
    fn shape_integral(&self, h: f64) -> f64 {
        let raw: f64 = BASE * h
            + BUMPS
                .iter()
                .map(|&(a, c, w)| a * bump_integral(h, c + self.phase_hours, w))
                .sum::<f64>();
        raw * norm()
    }

    /// The instantaneous power at `t`, in kW, without noise (0 before the epoch).
    pub fn power_kw(&self, t: OffsetDateTime) -> f64 {
        let Some(s) = self.local_seconds(t) else {
            return 0.0;
        };
        let day = (s / DAY).floor();
        let h = (s - day * DAY) / 3600.0;
        self.mean_kw * self.day_factor(day as u64) * self.shape(h)
    }

    /// The exact register at `t`, in kWh: continuous and strictly increasing after the epoch.
    pub fn register_exact(&self, t: OffsetDateTime) -> f64 {
        let Some(s) = self.local_seconds(t) else {
            return self.start_kwh;
        };
        let day = (s / DAY).floor();
        let d = day as u64;
        let h = (s - day * DAY) / 3600.0;
        let day_energy = self.mean_kw * 24.0;
        // Σ_{k<d} f_k = d + v · (u_d − u_0): the sum telescopes.
        let past_days = day + self.day_variation * (self.day_unit(d) - self.day_unit(0));
        let smooth = self.start_kwh
            + past_days * day_energy
            + self.day_factor(d) * self.mean_kw * self.shape_integral(h);
        smooth + self.noise_at(s)
    }

    /// The register as the meter displays and reports it: [`register_exact`](Self::register_exact)
    /// rounded down to whole watt-hours (so it never goes backwards).
    pub fn register_kwh(&self, t: OffsetDateTime) -> f64 {
        (self.register_exact(t) * 1000.0).floor() / 1000.0
    }

    /// Noise at local second `s`: linear between grid points, each in `[0, amplitude)`.
    fn noise_at(&self, s: f64) -> f64 {
        // The smooth register grows by at least this much per grid step (lowest day factor,
        // lowest point of the shape), so a noise swing of less than it keeps the register
        // strictly increasing.
        let min_step =
            (1.0 - self.day_variation) * self.mean_kw * BASE * norm() * NOISE_GRID / 3600.0;
        let amplitude = self.noise * min_step;
        let j = (s / NOISE_GRID).floor();
        let frac = s / NOISE_GRID - j;
        let j = j as u64;
        let a = self.noise_unit(j);
        let b = self.noise_unit(j + 1);
        amplitude * (a + (b - a) * frac)
    }

    fn noise_unit(&self, j: u64) -> f64 {
        unit(mix(self.seed
            ^ 0x5851_F42D_4C95_7F2D
            ^ j.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }
}

/// The share of a meter's load that its register counts, over time: 1 normally, less while
/// part of the load bypasses the meter (a thief), 0 while the meter has no power (an outage).
///
/// The metered register is the profile's register minus what the uncounted share consumed:
///
/// ```text
/// metered(t) = register(t) − Σ_i (1 − share_i) · (register(min(t, end_i)) − register(start_i))
/// ```
///
/// over the spans `[start_i, end_i)` of constant share before `t`; it is a pure function of
/// time (given the changes) and never decreases.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeteredShare {
    /// `(from, share)`, in time order; before the first change the share is 1.
    changes: Vec<(OffsetDateTime, f64)>,
}

impl MeteredShare {
    /// The whole load is metered, always.
    pub fn new() -> Self {
        Self::default()
    }

    /// From `from` on, only `share` (clamped to 0..=1; NaN counts as 1) of the load is metered.
    /// A change before the last one takes effect at the last one's time (time never runs
    /// backwards for a register).
    pub fn set(&mut self, from: OffsetDateTime, share: f64) {
        let share = if share.is_nan() {
            1.0
        } else {
            share.clamp(0.0, 1.0)
        };
        let from = match self.changes.last() {
            Some((last, _)) if *last > from => *last,
            _ => from,
        };
        if self.share_at(from) == share {
            return;
        }
        match self.changes.last_mut() {
            Some(last) if last.0 == from => last.1 = share,
            _ => self.changes.push((from, share)),
        }
    }

    /// The metered share at `t`.
    pub fn share_at(&self, t: OffsetDateTime) -> f64 {
        self.changes
            .iter()
            .rev()
            .find(|(from, _)| *from <= t)
            .map_or(1.0, |(_, s)| *s)
    }

    /// Whether the share was ever changed.
    pub fn is_changed(&self) -> bool {
        !self.changes.is_empty()
    }

    /// The exact metered register of `profile` at `t`, in kWh.
    pub fn register_exact(&self, profile: &LoadProfile, t: OffsetDateTime) -> f64 {
        let mut r = profile.register_exact(t);
        for (i, &(start, share)) in self.changes.iter().enumerate() {
            if start >= t {
                break;
            }
            let end = self
                .changes
                .get(i + 1)
                .map_or(t, |(next, _)| (*next).min(t));
            let used = (profile.register_exact(end) - profile.register_exact(start)).max(0.0);
            r -= (1.0 - share) * used;
        }
        r
    }

    /// The metered register as the meter reports it, rounded down to whole watt-hours; exactly
    /// [`LoadProfile::register_kwh`] while the share was never changed.
    pub fn register_kwh(&self, profile: &LoadProfile, t: OffsetDateTime) -> f64 {
        if self.changes.is_empty() {
            return profile.register_kwh(t);
        }
        (self.register_exact(profile, t) * 1000.0).floor() / 1000.0
    }
}

/// `24 / ∫₀²⁴ raw`: scales the raw shape to a daily mean of 1.
fn norm() -> f64 {
    let total: f64 = BASE * 24.0 + BUMPS.iter().map(|&(a, _, w)| a * w).sum::<f64>();
    24.0 / total
}

/// A raised-cosine bump of height 1 centred on `c` with half-width `w` (area `w`).
fn bump(h: f64, c: f64, w: f64) -> f64 {
    if (h - c).abs() >= w {
        0.0
    } else {
        0.5 * (1.0 + (PI * (h - c) / w).cos())
    }
}

/// `∫_{-∞}^h bump(x, c, w) dx`.
fn bump_integral(h: f64, c: f64, w: f64) -> f64 {
    if h <= c - w {
        0.0
    } else if h >= c + w {
        w
    } else {
        0.5 * (h - c + w) + w / (2.0 * PI) * (PI * (h - c) / w).sin()
    }
}

/// SplitMix64 finaliser: a well-mixed 64-bit hash.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A hash mapped to `[0, 1)`.
pub(crate) fn unit(z: u64) -> f64 {
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use time::Duration;
    use time::macros::datetime;

    use super::*;

    const DAY0: OffsetDateTime = datetime!(2025-03-10 00:00 UTC);

    fn at_hour(h: f64) -> OffsetDateTime {
        DAY0 + Duration::seconds_f64(h * 3600.0)
    }

    #[test]
    fn shape_has_night_base_and_two_peaks() {
        let p = LoadProfile::new(1, 0.5, 100.0, 0.0, 0, 0.0, 0.0).unwrap();
        let night = p.power_kw(at_hour(3.0));
        let morning = p.power_kw(at_hour(7.5));
        let midday = p.power_kw(at_hour(13.0));
        let evening = p.power_kw(at_hour(19.0));
        assert!(
            night < midday && midday < morning && morning < evening,
            "{night} {midday} {morning} {evening}"
        );
        // The night is flat and is the day's minimum.
        let min = (0..24 * 4)
            .map(|q| p.power_kw(at_hour(q as f64 / 4.0)))
            .fold(f64::MAX, f64::min);
        assert!((min - night).abs() < 1e-12);
        assert!((p.power_kw(at_hour(1.0)) - p.power_kw(at_hour(4.0))).abs() < 1e-12);
        // Peak-to-base ratios of a household: evening about 5x the night, morning about 3.5x.
        assert!(
            (4.0..6.0).contains(&(evening / night)),
            "{}",
            evening / night
        );
        assert!(
            (3.0..4.0).contains(&(morning / night)),
            "{}",
            morning / night
        );
    }

    #[test]
    fn daily_energy_is_mean_power_times_24h() {
        let p = LoadProfile::new(7, 0.4, 1000.0, 0.3, 0, 0.0, 0.0).unwrap();
        let e = p.register_exact(DAY0 + Duration::DAY) - p.register_exact(DAY0);
        assert!((e - 0.4 * 24.0).abs() < 1e-9, "{e}");
        // Numerical integral of the power agrees with the closed form over a few hours.
        let (a, b) = (at_hour(5.0), at_hour(21.0));
        let steps = 16 * 3600;
        let numeric: f64 = (0..steps)
            .map(|i| p.power_kw(a + Duration::seconds(i) + Duration::milliseconds(500)) / 3600.0)
            .sum();
        let exact = p.register_exact(b) - p.register_exact(a);
        assert!((numeric - exact).abs() < 1e-6, "{numeric} vs {exact}");
    }

    #[test]
    fn day_factors_vary_and_sum_in_closed_form() {
        let p = LoadProfile::new(3, 1.0, 0.0, 0.0, 0, 0.15, 0.0).unwrap();
        let mut sum = 0.0;
        let mut distinct = std::collections::BTreeSet::new();
        for k in 0..500u64 {
            let f = p.day_factor(k);
            assert!((0.85..=1.15).contains(&f));
            distinct.insert((f * 1e6) as i64);
            sum += f;
        }
        assert!(distinct.len() > 400);
        let t = OffsetDateTime::from_unix_timestamp(EPOCH_UNIX + 500 * 86_400).unwrap();
        assert!((p.register_exact(t) - sum * 24.0).abs() < 1e-6);
    }

    #[test]
    fn register_is_strictly_increasing_and_continuous() {
        for seed in 0..20 {
            let p = LoadProfile::from_seed(seed);
            let mut t = datetime!(2025-06-01 22:00 UTC);
            let mut last = p.register_exact(t);
            let mut last_kwh = p.register_kwh(t);
            // Two days in 7-second steps: across midnights, grid points and peaks.
            for _ in 0..(2 * 86_400 / 7) {
                t += Duration::seconds(7);
                let r = p.register_exact(t);
                assert!(r > last, "seed {seed}: {r} <= {last} at {t}");
                // Continuity: at most a few times the peak power over 7 s.
                assert!(r - last < p.mean_kw() * 4.0 * 7.0 / 3600.0 + 1e-9);
                let kwh = p.register_kwh(t);
                assert!(kwh >= last_kwh);
                last = r;
                last_kwh = kwh;
            }
        }
    }

    #[test]
    fn noise_changes_intervals_but_stays_bounded() {
        let quiet = LoadProfile::new(9, 0.5, 10.0, 0.0, 0, 0.0, 0.0).unwrap();
        let noisy = LoadProfile::new(9, 0.5, 10.0, 0.0, 0, 0.0, 0.9).unwrap();
        let mut differs = 0;
        for q in 0..96 {
            let (a, b) = (at_hour(q as f64 / 4.0), at_hour((q + 1) as f64 / 4.0));
            let dq = quiet.register_exact(b) - quiet.register_exact(a);
            let dn = noisy.register_exact(b) - noisy.register_exact(a);
            assert!(dn > 0.0);
            if (dq - dn).abs() > 1e-6 {
                differs += 1;
            }
        }
        assert!(differs > 80);
    }

    #[test]
    fn deterministic_per_seed_and_different_across_seeds() {
        let t = datetime!(2025-05-05 17:45:12 UTC);
        assert_eq!(
            LoadProfile::from_seed(42).register_kwh(t),
            LoadProfile::from_seed(42).register_kwh(t)
        );
        assert_ne!(
            LoadProfile::from_seed(42).register_kwh(t),
            LoadProfile::from_seed(43).register_kwh(t)
        );
        let p = LoadProfile::from_seed(42);
        assert!((1_500.0 / 8_760.0..=6_000.0 / 8_760.0).contains(&p.mean_kw()));
        assert!((1_000.0..=30_000.0).contains(&p.start_kwh()));
    }

    #[test]
    fn utc_offset_moves_the_peaks() {
        let utc = LoadProfile::new(1, 0.5, 0.0, 0.0, 0, 0.0, 0.0).unwrap();
        let cet = utc.clone().with_utc_offset(3600).unwrap();
        // 18:00 UTC is 19:00 local at +01:00: the evening peak.
        assert!((cet.power_kw(at_hour(18.0)) - utc.power_kw(at_hour(19.0))).abs() < 1e-12);
        assert!(matches!(
            utc.with_utc_offset(15 * 3600),
            Err(ProfileError::OutOfRange {
                name: "utc_offset_seconds",
                ..
            })
        ));
    }

    #[test]
    fn metered_share_halves_growth_and_stops_it_without_power() {
        let p = LoadProfile::from_seed(11);
        let mut m = MeteredShare::new();
        let t0 = at_hour(6.0);
        assert_eq!(m.register_kwh(&p, t0), p.register_kwh(t0));
        assert!(!m.is_changed());
        // A thief from 08:00 bypasses half the load.
        m.set(at_hour(8.0), 0.5);
        let (a, b) = (at_hour(8.0), at_hour(12.0));
        let full = p.register_exact(b) - p.register_exact(a);
        let metered = m.register_exact(&p, b) - m.register_exact(&p, a);
        assert!((metered - full / 2.0).abs() < 1e-9, "{metered} vs {full}");
        assert!((m.register_exact(&p, a) - p.register_exact(a)).abs() < 1e-12);
        // An outage from 12:00 to 14:00: the register stands still, then grows at half again.
        m.set(at_hour(12.0), 0.0);
        m.set(at_hour(14.0), 0.5);
        let r12 = m.register_exact(&p, at_hour(12.0));
        assert!((m.register_exact(&p, at_hour(13.5)) - r12).abs() < 1e-12);
        let after = m.register_exact(&p, at_hour(16.0)) - m.register_exact(&p, at_hour(14.0));
        let full = p.register_exact(at_hour(16.0)) - p.register_exact(at_hour(14.0));
        assert!((after - full / 2.0).abs() < 1e-9);
        assert_eq!(m.share_at(at_hour(13.0)), 0.0);
        assert_eq!(m.share_at(at_hour(7.0)), 1.0);
        // Never decreasing, in 37-second steps over the day.
        let mut last = 0.0;
        for i in 0..(86_400 / 37) {
            let r = m.register_kwh(&p, DAY0 + Duration::seconds(37 * i));
            assert!(r >= last);
            last = r;
        }
        // A change back in time takes effect at the last change; out-of-range shares clamp.
        m.set(at_hour(1.0), 2.0);
        assert_eq!(m.share_at(at_hour(14.0)), 1.0);
        assert_eq!(m.share_at(at_hour(13.0)), 0.0);
    }

    #[test]
    fn before_the_epoch_the_register_stands_still() {
        let p = LoadProfile::from_seed(5);
        let t = datetime!(2023-12-31 12:00 UTC);
        assert_eq!(p.register_exact(t), p.start_kwh());
        assert_eq!(p.power_kw(t), 0.0);
    }

    #[test]
    fn out_of_range_parameters_are_refused() {
        let cases = [
            (LoadProfile::new(0, 0.0, 0.0, 0.0, 0, 0.0, 0.0), "mean_kw"),
            (
                LoadProfile::new(0, f64::NAN, 0.0, 0.0, 0, 0.0, 0.0),
                "mean_kw",
            ),
            (
                LoadProfile::new(0, 1.0, -1.0, 0.0, 0, 0.0, 0.0),
                "start_kwh",
            ),
            (
                LoadProfile::new(0, 1.0, 0.0, 0.8, 0, 0.0, 0.0),
                "phase_hours",
            ),
            (
                LoadProfile::new(0, 1.0, 0.0, 0.0, 60_000, 0.0, 0.0),
                "utc_offset_seconds",
            ),
            (
                LoadProfile::new(0, 1.0, 0.0, 0.0, 0, 0.6, 0.0),
                "day_variation",
            ),
            (LoadProfile::new(0, 1.0, 0.0, 0.0, 0, 0.0, 1.0), "noise"),
        ];
        for (result, field) in cases {
            match result {
                Err(ProfileError::OutOfRange { name, .. }) => assert_eq!(name, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
