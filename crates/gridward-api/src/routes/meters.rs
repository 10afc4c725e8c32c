//! Meters, their readings and their events.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gridward_access::Action;
use gridward_core::MeterId;
use gridward_store::{MeterEventQuery, MeterRow, ReadingQuery};
use http::{HeaderValue, header};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::{Ctx, internal, rfc3339};
use crate::auth::Gate;
use crate::extract::{Json, Path, Query};
use crate::problem::Problem;

/// Largest page a listing returns.
pub const MAX_PAGE: usize = 1000;
/// Page size when none is asked for.
pub const DEFAULT_PAGE: usize = 100;

/// One meter as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MeterView {
    /// The meter id.
    pub meter_id: String,
    /// The last accepted envelope counter.
    pub last_counter: Option<u64>,
    /// The last stored register (kWh); only for roles that may read readings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_kwh: Option<f64>,
    /// When its last stored message was received (RFC 3339).
    pub last_seen: Option<String>,
    /// Whether it is connected now.
    pub connected: bool,
    /// When it last connected or disconnected (RFC 3339).
    pub connection_changed_at: Option<String>,
    /// Its certificate (one meter only; absent in listings or when unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateView>,
}

/// A meter's current certificate.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CertificateView {
    /// Serial number (hex).
    pub serial: String,
    /// valid, expiring, expired, revoked or superseded.
    pub status: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// SHA-256 of the certificate (hex).
    pub fingerprint: String,
}

fn meter_view(row: &MeterRow, with_register: bool) -> MeterView {
    MeterView {
        meter_id: row.meter_id.to_string(),
        last_counter: row.last_counter,
        last_kwh: row.last_kwh.filter(|_| with_register),
        last_seen: row.last_seen.map(rfc3339),
        connected: row.connected,
        connection_changed_at: row.connection_changed_at.map(rfc3339),
        certificate: None,
    }
}

/// Whether the caller may see register values (the roles that may read readings).
fn sees_register(gate: &Gate, meter: &MeterId) -> bool {
    gridward_access::authorize(
        gate.caller.as_ref().map(|c| &c.principal),
        Action::ReadReadings(meter.clone()),
    )
    .is_allowed()
}

/// Parses a meter id from the path; a malformed one is simply not found.
fn meter_id(raw: &str) -> Result<MeterId, Problem> {
    MeterId::new(raw).map_err(|_| Problem::not_found("meter"))
}

/// Lists the meters the caller may see.
#[utoipa::path(get, path = "/api/v1/meters", tag = "meters",
    responses(
        (status = 200, description = "The meters the caller may see, by id", body = Vec<MeterView>),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role may not list meters", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_meters(
    State(_): State<Ctx>,
    gate: Gate,
) -> Result<Json2<Vec<MeterView>>, Problem> {
    let caller = gate.require(Action::ListMeters)?;
    let rows = gate.ctx.store.meters().map_err(internal)?;
    Ok(Json2(
        rows.iter()
            .filter(|r| caller.principal.sees_meter(&r.meter_id))
            .map(|r| meter_view(r, sees_register(&gate, &r.meter_id)))
            .collect(),
    ))
}

/// One meter, with its certificate.
#[utoipa::path(get, path = "/api/v1/meters/{meter_id}", tag = "meters",
    params(("meter_id" = String, Path, description = "The meter id")),
    responses(
        (status = 200, description = "The meter", body = MeterView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role may not read meters", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such meter (or not the caller's)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_meter(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<MeterView>, Problem> {
    let id = meter_id(&raw);
    let id = match id {
        Ok(id) => id,
        Err(p) => {
            gate.require(Action::ListMeters)?;
            return Err(p);
        }
    };
    gate.require(Action::ReadMeter(id.clone()))?;
    let rows = gate.ctx.store.meters().map_err(internal)?;
    let row = rows
        .iter()
        .find(|r| r.meter_id == id)
        .ok_or_else(|| Problem::not_found("meter"))?;
    let mut view = meter_view(row, sees_register(&gate, &id));
    view.certificate = certificate_of(&gate, &id);
    Ok(Json2(view))
}

fn certificate_of(gate: &Gate, id: &MeterId) -> Option<CertificateView> {
    let dir = gate.ctx.pki_dir.as_ref()?;
    let pki = gridward_pki::Pki::open(dir, None)
        .map_err(
            |e| tracing::warn!(error = %e, "PKI directory unreadable for a meter's certificate"),
        )
        .ok()?;
    let records = pki.list(gate.ctx.now()).ok()?;
    records
        .into_iter()
        .filter(|r| r.entry.kind == gridward_pki::CertKind::Meter && r.entry.name == id.as_str())
        .max_by_key(|r| r.entry.issued_at)
        .map(|r| CertificateView {
            serial: r.entry.serial.clone(),
            status: r.status.as_str().to_owned(),
            not_after: rfc3339(r.entry.not_after),
            fingerprint: r.entry.fingerprint.clone(),
        })
}

/// How readings are asked for.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadingsParams {
    /// Only readings signed at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only readings signed at or before this time (RFC 3339).
    pub until: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page: the page before it in time.
    pub cursor: Option<String>,
    /// `json` (default) or `csv`.
    pub format: Option<String>,
}

/// One reading.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadingView {
    /// `{MeterID}-{Counter}`, unique, what downstream systems de-duplicate on.
    pub reading_id: String,
    /// The envelope counter.
    pub counter: u64,
    /// The reading's time (RFC 3339), as the meter signed it.
    pub timestamp: String,
    /// The cumulative register, kWh.
    pub energy_kwh: f64,
    /// When the head-end received it (RFC 3339).
    pub received_at: String,
}

/// A page of readings, oldest first; `next_cursor` asks for the page before it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadingsPage {
    /// The meter.
    pub meter_id: String,
    /// The readings, oldest first.
    pub readings: Vec<ReadingView>,
    /// Pass as `cursor` for the older page; `null` when there is none.
    pub next_cursor: Option<String>,
}

/// Parses an RFC 3339 query parameter.
pub(crate) fn time_param(
    value: Option<&str>,
    name: &str,
) -> Result<Option<OffsetDateTime>, Problem> {
    value
        .map(|v| {
            OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).map_err(|_| {
                Problem::bad_request(format!(
                    "{name} must be an RFC 3339 time such as 2026-12-03T10:00:00Z"
                ))
            })
        })
        .transpose()
}

/// Checks a page size.
pub(crate) fn page_size(limit: Option<usize>) -> Result<usize, Problem> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(_) => Err(Problem::bad_request(format!(
            "limit must be 1 to {MAX_PAGE}"
        ))),
    }
}

/// Parses a cursor.
pub(crate) fn cursor(value: Option<&str>) -> Result<Option<i64>, Problem> {
    value
        .map(|c| {
            c.parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Problem::bad_request("cursor must be a next_cursor the API gave"))
        })
        .transpose()
}

/// One meter's readings, a page at a time, newest page first; JSON or CSV.
#[utoipa::path(get, path = "/api/v1/meters/{meter_id}/readings", tag = "meters",
    params(("meter_id" = String, Path, description = "The meter id"), ReadingsParams),
    responses(
        (status = 200, description = "A page of readings (JSON, or CSV with `format=csv` and the next cursor in `Link`)", content(
            (ReadingsPage = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role may not read readings", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such meter (or not the caller's)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn readings(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
    Query(p): Query<ReadingsParams>,
) -> Result<Response, Problem> {
    let id = match meter_id(&raw) {
        Ok(id) => id,
        Err(problem) => {
            gate.require(Action::ListMeters)?;
            return Err(problem);
        }
    };
    gate.require(Action::ReadReadings(id.clone()))?;
    let csv = match p.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(Problem::bad_request("format must be json or csv")),
    };
    let limit = page_size(p.limit)?;
    let mut q = ReadingQuery::new(id.clone()).limit(limit);
    q.since = time_param(p.since.as_deref(), "since")?;
    q.until = time_param(p.until.as_deref(), "until")?;
    q.before = cursor(p.cursor.as_deref())?;
    let rows = gate.ctx.store.readings(&q).map_err(internal)?;
    let next_cursor = (rows.len() == limit)
        .then(|| rows.first().map(|r| r.id.to_string()))
        .flatten();
    let readings: Vec<ReadingView> = rows
        .iter()
        .map(|r| ReadingView {
            reading_id: format!("{}-{}", r.meter_id, r.counter),
            counter: r.counter,
            timestamp: rfc3339(r.taken_at),
            energy_kwh: r.energy_kwh,
            received_at: rfc3339(r.received_at),
        })
        .collect();
    if !csv {
        return Ok(Json2(ReadingsPage {
            meter_id: id.to_string(),
            readings,
            next_cursor,
        })
        .into_response());
    }
    let mut body = String::from("reading_id,meter_id,counter,timestamp,energy_kwh,received_at\r\n");
    for r in &readings {
        // Meter ids are [A-Za-z0-9._-]: nothing to quote.
        let _ = write!(
            body,
            "{},{},{},{},{},{}\r\n",
            r.reading_id, id, r.counter, r.timestamp, r.energy_kwh, r.received_at
        );
    }
    let mut response = ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response();
    if let Some(c) = next_cursor {
        let link = format!(
            "</api/v1/meters/{id}/readings?format=csv&limit={limit}&cursor={c}>; rel=\"next\""
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            response.headers_mut().insert(header::LINK, v);
        }
    }
    Ok(response)
}

/// How meter events are asked for.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Only events signed at or after this time (RFC 3339).
    pub since: Option<String>,
    /// At most this many, the newest (1 to 1000, default 100).
    pub limit: Option<usize>,
}

/// A meter's own event (tamper, power).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MeterEventView {
    /// The envelope counter.
    pub counter: u64,
    /// When it happened (RFC 3339), as the meter signed it.
    pub timestamp: String,
    /// The event type, e.g. `TamperDetected`.
    pub event_type: String,
    /// When the head-end received it (RFC 3339).
    pub received_at: String,
}

/// One meter's events, oldest first.
#[utoipa::path(get, path = "/api/v1/meters/{meter_id}/events", tag = "meters",
    params(("meter_id" = String, Path, description = "The meter id"), EventsParams),
    responses(
        (status = 200, description = "The newest events, oldest first", body = Vec<MeterEventView>),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role may not read meter events", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such meter (or not the caller's)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn meter_events(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
    Query(p): Query<EventsParams>,
) -> Result<Json2<Vec<MeterEventView>>, Problem> {
    let id = match meter_id(&raw) {
        Ok(id) => id,
        Err(problem) => {
            gate.require(Action::ListMeters)?;
            return Err(problem);
        }
    };
    gate.require(Action::ReadMeterEvents(id.clone()))?;
    let q = MeterEventQuery {
        meter: Some(id),
        since: time_param(p.since.as_deref(), "since")?,
        limit: page_size(p.limit)?,
    };
    let rows = gate.ctx.store.meter_events(&q).map_err(internal)?;
    Ok(Json2(
        rows.iter()
            .map(|e| MeterEventView {
                counter: e.counter,
                timestamp: rfc3339(e.taken_at),
                event_type: e.kind.as_str().to_owned(),
                received_at: rfc3339(e.received_at),
            })
            .collect(),
    ))
}

/// A JSON response body (`application/json`).
#[derive(Debug, Clone)]
pub struct Json2<T>(pub T);

impl<T: Serialize> IntoResponse for Json2<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[allow(dead_code)]
fn _assert_json_is_used(_: Json<()>) {}
