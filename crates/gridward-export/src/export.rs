//! From register readings to export rows: [`ExportSpec`] says what is wanted, [`Exporter`]
//! takes one meter's readings at a time, [`Exporter::finish`] gives the [`Export`]: its rows and
//! the [`Metadata`] stating what was done.
//!
//! ## What `kwh` is
//!
//! Readings are cumulative registers. For one meter and one bucket, `kwh` is the increase of the
//! register from the meter's last reading before the bucket to its last reading in the bucket:
//! the energy consumed in the bucket, with consumption between two readings counted in the
//! bucket of the later one. The last reading before `from` (if the caller passes it) is the
//! baseline of the first bucket; without one, a meter's first bucket counts from its first
//! reading in that bucket. A bucket in which a meter sent no reading has no row for it (its
//! consumption shows in its next bucket with a reading). Values are rounded to 0.001 kWh
//! (aggregates are summed first, then rounded).
//!
//! A per-meter export that is not pseudonymised also has `register_kwh`, the register at the
//! meter's last reading in the bucket. A pseudonymised one never has it: a cumulative register is
//! as good as an id for joining two exports.

use std::collections::{BTreeMap, HashMap, HashSet};

use gridward_core::MeterId;
use gridward_core::document::format_timestamp;
use serde::Serialize;
use time::OffsetDateTime;

use crate::error::ExportError;
use crate::groups::Groups;
use crate::pseudonym::{Pseudonymiser, SCHEME};
use crate::resolution::Resolution;

/// The version of this export format, in the metadata.
pub const FORMAT: &str = "gridward-export/1";

/// Gridward's version, in the metadata.
pub const GRIDWARD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The smallest group an aggregate is shown for unless told otherwise.
pub const DEFAULT_K: usize = 5;

/// The smallest `k` accepted.
pub const MIN_K: usize = 2;

/// What `kwh` means, as the metadata states it.
pub const KWH_DEFINITION: &str = "energy consumed in the bucket: increase of the cumulative \
    register from the meter's last reading before the bucket (or, with none, its first in the \
    bucket) to its last reading in the bucket, rounded to 0.001 kWh; consumption between two \
    readings is counted in the bucket of the later one";

/// What `bucket_start` means, as the metadata states it.
pub const TIME_DEFINITION: &str = "bucket_start is the start (RFC 3339, UTC) of the half-open \
    bucket [bucket_start, bucket_start + resolution); no time finer than the bucket is exported";

/// One stored reading, as an export takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingRow {
    /// The meter.
    pub meter: MeterId,
    /// When the reading was taken.
    pub taken_at: OffsetDateTime,
    /// The cumulative register, in kWh.
    pub energy_kwh: f64,
}

/// Aggregation: sums per group and bucket, shown only for at least `k` meters.
#[derive(Debug, Clone)]
pub struct Aggregation {
    groups: Groups,
    k: usize,
}

impl Aggregation {
    /// Sums per group of `groups`, an aggregate shown only when at least `k` distinct meters
    /// of the group have a value in that bucket.
    ///
    /// # Errors
    ///
    /// [`ExportError::KTooSmall`] below [`MIN_K`].
    pub fn new(groups: Groups, k: usize) -> Result<Self, ExportError> {
        if k < MIN_K {
            return Err(ExportError::KTooSmall(k));
        }
        Ok(Self { groups, k })
    }
}

/// What an export is to hold.
#[derive(Debug)]
pub struct ExportSpec {
    from: OffsetDateTime,
    to: OffsetDateTime,
    resolution: Resolution,
    pseudonymiser: Option<Pseudonymiser>,
    aggregation: Option<Aggregation>,
}

impl ExportSpec {
    /// Readings taken in `[from, to)`, in buckets of `resolution`; both ends must be bucket
    /// boundaries, so every bucket is whole. Not pseudonymised and not aggregated until told.
    ///
    /// # Errors
    ///
    /// [`ExportError::EmptyRange`], [`ExportError::UnalignedRange`].
    pub fn new(
        from: OffsetDateTime,
        to: OffsetDateTime,
        resolution: Resolution,
    ) -> Result<Self, ExportError> {
        if to <= from {
            return Err(ExportError::EmptyRange {
                from: format_timestamp(from),
                to: format_timestamp(to),
            });
        }
        for (which, at) in [("from", from), ("to", to)] {
            if !resolution.is_aligned(at) {
                return Err(ExportError::UnalignedRange {
                    which,
                    at: format_timestamp(at),
                    resolution: resolution.code(),
                    suggestion: format_timestamp(resolution.bucket_start(at)),
                });
            }
        }
        Ok(Self {
            from,
            to,
            resolution,
            pseudonymiser: None,
            aggregation: None,
        })
    }

    /// Meter ids (and group names) replaced by pseudonyms of `pseudonymiser`'s key.
    pub fn pseudonymise(mut self, pseudonymiser: Pseudonymiser) -> Self {
        self.pseudonymiser = Some(pseudonymiser);
        self
    }

    /// Sums per group instead of one row per meter.
    pub fn aggregate(mut self, aggregation: Aggregation) -> Self {
        self.aggregation = Some(aggregation);
        self
    }

    /// The number of buckets in the range.
    pub fn buckets(&self) -> i64 {
        (self.to - self.from).whole_seconds() / self.resolution.seconds()
    }

    /// Refuses a range of more than `max` buckets (for callers that bound the work).
    ///
    /// # Errors
    ///
    /// [`ExportError::RangeTooLong`].
    pub fn check_buckets(&self, max: i64) -> Result<(), ExportError> {
        let buckets = self.buckets();
        if buckets > max {
            return Err(ExportError::RangeTooLong {
                buckets,
                resolution: self.resolution.code(),
                max,
            });
        }
        Ok(())
    }

    /// Start of the range.
    pub fn from(&self) -> OffsetDateTime {
        self.from
    }

    /// End of the range (excluded).
    pub fn to(&self) -> OffsetDateTime {
        self.to
    }

    /// The resolution.
    pub fn resolution(&self) -> Resolution {
        self.resolution
    }
}

/// One meter's consumption in one bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeterRow {
    /// The meter id, or its pseudonym.
    pub meter: String,
    /// The bucket's start.
    #[serde(serialize_with = "rfc3339")]
    pub bucket_start: OffsetDateTime,
    /// Energy consumed in the bucket (see the module documentation), kWh.
    pub kwh: f64,
    /// The register at the meter's last reading in the bucket, kWh; only when not
    /// pseudonymised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub register_kwh: Option<f64>,
}

/// One group's consumption in one bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupRow {
    /// The group name, or its pseudonym.
    pub group: String,
    /// The bucket's start.
    #[serde(serialize_with = "rfc3339")]
    pub bucket_start: OffsetDateTime,
    /// Distinct meters of the group with a value in the bucket (at least `k`).
    pub meters: u64,
    /// Their consumption summed, kWh.
    pub kwh: f64,
}

fn rfc3339<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_timestamp(*t))
}

/// The rows of an export: per meter, or per group.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Rows {
    /// One row per meter and bucket, by meter (or pseudonym), then time.
    Meters(Vec<MeterRow>),
    /// One row per group and bucket with at least `k` meters, by group (or pseudonym), then
    /// time.
    Groups(Vec<GroupRow>),
}

impl Rows {
    /// How many rows.
    pub fn len(&self) -> usize {
        match self {
            Rows::Meters(r) => r.len(),
            Rows::Groups(r) => r.len(),
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The column names, in order.
    pub fn columns(&self, pseudonymised: bool) -> &'static [&'static str] {
        match (self, pseudonymised) {
            (Rows::Meters(_), true) => &["meter", "bucket_start", "kwh"],
            (Rows::Meters(_), false) => &["meter", "bucket_start", "kwh", "register_kwh"],
            (Rows::Groups(_), _) => &["group", "bucket_start", "meters", "kwh"],
        }
    }
}

/// What was done, stated in the export (CSV `#` lines, the JSON `metadata` object, the Parquet
/// file's key-value metadata `gridward.export`). Never the key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metadata {
    /// [`FORMAT`].
    pub format: &'static str,
    /// [`GRIDWARD_VERSION`].
    pub gridward_version: &'static str,
    /// When the export was made (RFC 3339).
    pub generated_at: String,
    /// Start of the range (RFC 3339, included).
    pub from: String,
    /// End of the range (RFC 3339, excluded).
    pub to: String,
    /// `15m`, `1h` or `1d`.
    pub resolution: &'static str,
    /// [`TIME_DEFINITION`].
    pub times: &'static str,
    /// [`KWH_DEFINITION`].
    pub kwh: &'static str,
    /// Whether meter ids and group names are pseudonyms.
    pub pseudonymised: bool,
    /// How pseudonyms are made ([`SCHEME`]), when they are.
    pub pseudonym_scheme: Option<&'static str>,
    /// `none`, `concentrator` or `groups_file`.
    pub aggregation: &'static str,
    /// The smallest group shown, when aggregated.
    pub k: Option<usize>,
    /// Meters with at least one reading in the range.
    pub meters: u64,
    /// Rows in the export.
    pub rows: u64,
    /// Group aggregates left out because fewer than `k` meters had a value in that bucket.
    pub suppressed_aggregates: u64,
    /// Groups with at least one aggregate left out.
    pub suppressed_groups: u64,
    /// Meters with readings that are in no group (left out of an aggregated export).
    pub ungrouped_meters: u64,
    /// The column names, in order.
    pub columns: &'static [&'static str],
}

impl Metadata {
    /// The fields as `(name, text)`, in order, for a CSV header (`yes`/`no`, `none`).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
        vec![
            ("format", self.format.to_owned()),
            ("gridward_version", self.gridward_version.to_owned()),
            ("generated_at", self.generated_at.clone()),
            ("from", self.from.clone()),
            ("to", self.to.clone()),
            ("resolution", self.resolution.to_owned()),
            ("times", self.times.to_owned()),
            ("kwh", self.kwh.to_owned()),
            ("pseudonymised", yes_no(self.pseudonymised)),
            (
                "pseudonym_scheme",
                self.pseudonym_scheme.unwrap_or("none").to_owned(),
            ),
            ("aggregation", self.aggregation.to_owned()),
            (
                "k",
                self.k.map_or_else(|| "none".to_owned(), |k| k.to_string()),
            ),
            ("meters", self.meters.to_string()),
            ("rows", self.rows.to_string()),
            (
                "suppressed_aggregates",
                self.suppressed_aggregates.to_string(),
            ),
            ("suppressed_groups", self.suppressed_groups.to_string()),
            ("ungrouped_meters", self.ungrouped_meters.to_string()),
            ("columns", self.columns.join(",")),
        ]
    }
}

/// A finished export.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Export {
    /// What was done.
    pub metadata: Metadata,
    /// The rows.
    pub rows: Rows,
}

/// Builds an export one meter at a time (so the caller holds one meter's readings at a time;
/// the rows are kept until [`Exporter::finish`]).
#[derive(Debug)]
pub struct Exporter {
    spec: ExportSpec,
    seen: HashSet<MeterId>,
    meters: u64,
    ungrouped: u64,
    per_meter: Vec<MeterRow>,
    /// (group as exported, bucket) → (meters, kWh).
    cells: HashMap<(String, i64), (u64, f64)>,
}

/// Rounds to 0.001 kWh.
fn round_wh(kwh: f64) -> f64 {
    (kwh * 1000.0).round() / 1000.0
}

impl Exporter {
    /// An empty export of `spec`.
    pub fn new(spec: ExportSpec) -> Self {
        Self {
            spec,
            seen: HashSet::new(),
            meters: 0,
            ungrouped: 0,
            per_meter: Vec::new(),
            cells: HashMap::new(),
        }
    }

    /// Adds `meter`'s readings: `(taken_at, register kWh)` in any order. Readings before
    /// `from` only serve as the baseline (the last of them); readings at or after `to` are
    /// ignored.
    ///
    /// # Errors
    ///
    /// [`ExportError::DuplicateMeter`], [`ExportError::BadRegister`],
    /// [`ExportError::RegisterWentBackwards`]; nothing of the meter is added then.
    pub fn add_meter(
        &mut self,
        meter: &MeterId,
        readings: &[(OffsetDateTime, f64)],
    ) -> Result<(), ExportError> {
        if self.seen.contains(meter) {
            return Err(ExportError::DuplicateMeter(meter.to_string()));
        }
        if let Some(&(_, value)) = readings.iter().find(|(_, v)| !v.is_finite() || *v < 0.0) {
            return Err(ExportError::BadRegister {
                meter: meter.to_string(),
                value,
            });
        }
        let mut sorted = readings.to_vec();
        sorted.sort_by_key(|(t, _)| *t);
        if let Some(w) = sorted.windows(2).find(|w| w[1].1 < w[0].1) {
            return Err(ExportError::RegisterWentBackwards {
                meter: meter.to_string(),
                before: w[0].1,
                after: w[1].1,
            });
        }
        self.seen.insert(meter.clone());
        let (from, to, res) = (self.spec.from, self.spec.to, self.spec.resolution);
        let baseline = sorted.iter().rev().find(|(t, _)| *t < from).map(|r| r.1);
        // (bucket, first register in it, last register in it)
        let mut buckets: Vec<(i64, f64, f64)> = Vec::new();
        for &(t, kwh) in sorted.iter().filter(|(t, _)| *t >= from && *t < to) {
            let b = res.bucket_of(t);
            match buckets.last_mut() {
                Some(last) if last.0 == b => last.2 = kwh,
                _ => buckets.push((b, kwh, kwh)),
            }
        }
        if buckets.is_empty() {
            return Ok(());
        }
        self.meters += 1;
        let group = match &self.spec.aggregation {
            None => None,
            Some(a) => match a.groups.group_of(meter) {
                None => {
                    self.ungrouped += 1;
                    return Ok(());
                }
                Some(g) => Some(match &self.spec.pseudonymiser {
                    Some(p) => p.group(g),
                    None => g.to_owned(),
                }),
            },
        };
        let name = match (&group, &self.spec.pseudonymiser) {
            (Some(_), _) => String::new(),
            (None, Some(p)) => p.meter(meter),
            (None, None) => meter.to_string(),
        };
        let mut previous = baseline;
        for (bucket, first, last) in buckets {
            let kwh = last - previous.unwrap_or(first);
            previous = Some(last);
            match &group {
                Some(g) => {
                    let cell = self.cells.entry((g.clone(), bucket)).or_insert((0, 0.0));
                    cell.0 += 1;
                    cell.1 += kwh;
                }
                None => self.per_meter.push(MeterRow {
                    meter: name.clone(),
                    bucket_start: OffsetDateTime::from_unix_timestamp(bucket).unwrap_or(from),
                    kwh: round_wh(kwh),
                    register_kwh: self.spec.pseudonymiser.is_none().then_some(last),
                }),
            }
        }
        Ok(())
    }

    /// The export, made at `generated_at`: rows sorted by meter or group as exported (so the
    /// order says nothing about the real ids), then time; small groups left out and counted.
    pub fn finish(self, generated_at: OffsetDateTime) -> Export {
        let spec = self.spec;
        let pseudonymised = spec.pseudonymiser.is_some();
        let (rows, suppressed, suppressed_groups) = match &spec.aggregation {
            None => {
                let mut rows = self.per_meter;
                rows.sort_by(|a, b| {
                    a.meter
                        .cmp(&b.meter)
                        .then(a.bucket_start.cmp(&b.bucket_start))
                });
                (Rows::Meters(rows), 0, 0)
            }
            Some(a) => {
                let mut shown = BTreeMap::new();
                let mut suppressed = 0u64;
                let mut small: HashSet<String> = HashSet::new();
                for ((group, bucket), (meters, kwh)) in self.cells {
                    if meters >= a.k as u64 {
                        shown.insert((group, bucket), (meters, kwh));
                    } else {
                        suppressed += 1;
                        small.insert(group);
                    }
                }
                let rows = shown
                    .into_iter()
                    .map(|((group, bucket), (meters, kwh))| GroupRow {
                        group,
                        bucket_start: OffsetDateTime::from_unix_timestamp(bucket)
                            .unwrap_or(spec.from),
                        meters,
                        kwh: round_wh(kwh),
                    })
                    .collect();
                (Rows::Groups(rows), suppressed, small.len() as u64)
            }
        };
        let metadata = Metadata {
            format: FORMAT,
            gridward_version: GRIDWARD_VERSION,
            generated_at: format_timestamp(generated_at),
            from: format_timestamp(spec.from),
            to: format_timestamp(spec.to),
            resolution: spec.resolution.code(),
            times: TIME_DEFINITION,
            kwh: KWH_DEFINITION,
            pseudonymised,
            pseudonym_scheme: pseudonymised.then_some(SCHEME),
            aggregation: spec
                .aggregation
                .as_ref()
                .map_or("none", |a| a.groups.source().code()),
            k: spec.aggregation.as_ref().map(|a| a.k),
            meters: self.meters,
            rows: rows.len() as u64,
            suppressed_aggregates: suppressed,
            suppressed_groups,
            ungrouped_meters: self.ungrouped,
            columns: rows.columns(pseudonymised),
        };
        Export { metadata, rows }
    }
}

/// Builds an export of `spec` from `rows` of any meters, in any order (see
/// [`Exporter::add_meter`]).
///
/// # Errors
///
/// [`ExportError::BadRegister`], [`ExportError::RegisterWentBackwards`].
pub fn export(
    spec: ExportSpec,
    rows: impl IntoIterator<Item = ReadingRow>,
    generated_at: OffsetDateTime,
) -> Result<Export, ExportError> {
    let mut by_meter: BTreeMap<MeterId, Vec<(OffsetDateTime, f64)>> = BTreeMap::new();
    for r in rows {
        by_meter
            .entry(r.meter)
            .or_default()
            .push((r.taken_at, r.energy_kwh));
    }
    let mut exporter = Exporter::new(spec);
    for (meter, readings) in &by_meter {
        exporter.add_meter(meter, readings)?;
    }
    Ok(exporter.finish(generated_at))
}
