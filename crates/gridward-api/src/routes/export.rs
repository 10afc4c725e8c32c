//! A consumer's export of their own data: `GET /api/v1/me/export`.
//!
//! All the meters bound to the caller, not pseudonymised (it is their own data), per meter and
//! bucket, in the formats of `gridward-export` (the same writer as `gridward export`, so the two
//! agree). Only consumers may call it ([`Action::ExportOwnReadings`]): the other roles have no
//! meters of their own, and exports for third parties are made with `gridward export`,
//! pseudonymised. A meter that is not the caller's is never in it: the meters come from the
//! caller's principal, and each is authorised again as [`Action::ReadReadings`].

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gridward_access::Action;
use gridward_core::MeterId;
use gridward_export::{ExportSpec, Exporter, OutputFormat, Resolution};
use gridward_store::{ReadingQuery, Store, StoreError};
use http::header;
use serde::Deserialize;
use time::{Duration, OffsetDateTime};
use utoipa::IntoParams;

use super::meters::time_param;
use super::{Ctx, internal};
use crate::auth::Gate;
use crate::extract::Query;
use crate::problem::Problem;

/// Days exported when `from` is not given.
pub const DEFAULT_DAYS: i64 = 31;

/// Most buckets one export may hold (a leap year of quarter hours; four years of hours).
pub const MAX_BUCKETS: i64 = 366 * 96;

/// Readings read from the store per query while exporting.
pub const READ_PAGE: usize = 10_000;

/// How an export is asked for.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportParams {
    /// Start (RFC 3339, on a bucket boundary in UTC); default: `to` minus 31 days.
    pub from: Option<String>,
    /// End, excluded (RFC 3339, on a bucket boundary in UTC); default: the start of the
    /// current bucket.
    pub to: Option<String>,
    /// Bucket length: `15m`, `1h` (default) or `1d`.
    pub resolution: Option<String>,
    /// `json` (default: `{"metadata": {...}, "rows": [...]}`) or `csv` (`#` metadata lines,
    /// a header row, then the rows).
    pub format: Option<String>,
}

/// `meter`'s readings taken in `[from, to)`, oldest first, preceded by its last reading before
/// `from` (the baseline of the first bucket) when it has readings in the range: what
/// [`Exporter::add_meter`] takes. Pages through the store [`READ_PAGE`] readings at a time.
///
/// # Errors
///
/// The store's.
pub fn meter_readings<S: Store + ?Sized>(
    store: &S,
    meter: &MeterId,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<Vec<(OffsetDateTime, f64)>, StoreError> {
    let mut pages = Vec::new();
    let mut oldest: Option<i64> = None;
    loop {
        let mut q = ReadingQuery::new(meter.clone())
            .since(from)
            .until(to - Duration::microseconds(1))
            .limit(READ_PAGE);
        q.before = oldest;
        let page = store.readings(&q)?;
        let full = page.len() == READ_PAGE;
        if let Some(first) = page.first() {
            oldest = Some(first.id);
            pages.push(page);
        }
        if !full {
            break;
        }
    }
    let Some(oldest) = oldest else {
        return Ok(Vec::new());
    };
    let baseline = ReadingQuery::new(meter.clone())
        .until(from - Duration::microseconds(1))
        .before(oldest)
        .limit(1);
    let mut out: Vec<(OffsetDateTime, f64)> = store
        .readings(&baseline)?
        .iter()
        .map(|r| (r.taken_at, r.energy_kwh))
        .collect();
    for page in pages.iter().rev() {
        out.extend(page.iter().map(|r| (r.taken_at, r.energy_kwh)));
    }
    Ok(out)
}

/// The caller's own readings, all their meters, per bucket (CSV or JSON).
#[utoipa::path(get, path = "/api/v1/me/export", tag = "meters",
    params(ExportParams),
    responses(
        (status = 200, description = "The export of the caller's meters, not pseudonymised: \
            JSON `{metadata, rows}` or CSV with `#` metadata lines; `kwh` is the energy consumed \
            in the bucket, `register_kwh` the register at the bucket's last reading", content(
            (String = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "Bad parameter (unaligned or empty range, too many buckets, unknown resolution or format)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a consumer (only consumers have meters of their own)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn my_export(
    State(_): State<Ctx>,
    gate: Gate,
    Query(p): Query<ExportParams>,
) -> Result<Response, Problem> {
    let caller = gate.require(Action::ExportOwnReadings)?;
    let format = match p.format.as_deref() {
        None | Some("json") => OutputFormat::Json,
        Some("csv") => OutputFormat::Csv,
        Some(_) => return Err(Problem::bad_request("format must be json or csv")),
    };
    let resolution: Resolution = match p.resolution.as_deref() {
        None => Resolution::Hour,
        Some(r) => r
            .parse()
            .map_err(|_| Problem::bad_request("resolution must be 15m, 1h or 1d"))?,
    };
    let now = gate.ctx.now();
    let to = time_param(p.to.as_deref(), "to")?.unwrap_or_else(|| resolution.bucket_start(now));
    let from =
        time_param(p.from.as_deref(), "from")?.unwrap_or_else(|| to - Duration::days(DEFAULT_DAYS));
    let spec = ExportSpec::new(from, to, resolution)
        .and_then(|s| s.check_buckets(MAX_BUCKETS).map(|()| s))
        .map_err(|e| Problem::bad_request(e.to_string()))?;
    let meters = caller.principal.meters.clone();
    let mut exporter = Exporter::new(spec);
    for meter in &meters {
        gate.require(Action::ReadReadings(meter.clone()))?;
        let readings = meter_readings(&*gate.ctx.store, meter, from, to).map_err(internal)?;
        exporter.add_meter(meter, &readings).map_err(internal)?;
    }
    let export = exporter.finish(now);
    let mut body = Vec::new();
    gridward_export::write(&export, format, &mut body).map_err(internal)?;
    let filename = format!("attachment; filename=\"gridward-export.{}\"", format.code());
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_owned()),
            (header::CONTENT_DISPOSITION, filename),
        ],
        body,
    )
        .into_response())
}
