//! Security events, the outbox, and the service's health.

use std::sync::atomic::Ordering;

use axum::extract::State;
use gridward_access::Action;
use gridward_core::MeterId;
use gridward_store::SecurityEventQuery;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::meters::{Json2, cursor, page_size, time_param};
use super::{Ctx, internal, rfc3339};
use crate::auth::Gate;
use crate::extract::Query;
use crate::problem::Problem;

/// The health answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `starting` while not ready.
    pub status: String,
}

/// Liveness: the process answers. No credential, no data.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The API answers", body = Health)))]
pub async fn healthz() -> Json2<Health> {
    Json2(Health {
        status: "ok".into(),
    })
}

/// Readiness: the head-end ingests and its store answers. No credential, no data.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(State(ctx): State<Ctx>) -> Result<Json2<Health>, Problem> {
    if !ctx.ready.load(Ordering::Acquire) || ctx.store.outbox_stats().is_err() {
        return Err(Problem::unavailable());
    }
    Ok(Json2(Health {
        status: "ok".into(),
    }))
}

/// How security events are asked for.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SecurityEventsParams {
    /// Only this reason code (e.g. `replay`, `bad_signature`, `login_failed`).
    pub reason: Option<String>,
    /// Only events about this meter.
    pub meter: Option<String>,
    /// Only events from this source (an IP address, or `ip:port`).
    pub source: Option<String>,
    /// Only events at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only events at or before this time (RFC 3339).
    pub until: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One security event.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SecurityEventView {
    /// Its id (increasing).
    pub id: i64,
    /// When (RFC 3339).
    pub at: String,
    /// The stable reason code.
    pub reason: String,
    /// The meter concerned, if known.
    pub meter_id: Option<String>,
    /// The source address, if known.
    pub source: Option<String>,
    /// What happened.
    pub detail: String,
}

/// A page of security events, oldest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SecurityEventsPage {
    /// The events, oldest first.
    pub events: Vec<SecurityEventView>,
    /// Pass as `cursor` for the older page; `null` when there is none.
    pub next_cursor: Option<String>,
}

/// Security events, newest page first.
#[utoipa::path(get, path = "/api/v1/security-events", tag = "security",
    params(SecurityEventsParams),
    responses(
        (status = 200, description = "A page of security events", body = SecurityEventsPage),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role may not read security events", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn security_events(
    State(_): State<Ctx>,
    gate: Gate,
    Query(p): Query<SecurityEventsParams>,
) -> Result<Json2<SecurityEventsPage>, Problem> {
    gate.require(Action::ReadSecurityEvents)?;
    let limit = page_size(p.limit)?;
    let meter = p
        .meter
        .as_deref()
        .map(|m| MeterId::new(m).map_err(|e| Problem::bad_request(format!("meter: {e}"))))
        .transpose()?;
    let q = SecurityEventQuery {
        since: time_param(p.since.as_deref(), "since")?,
        until: time_param(p.until.as_deref(), "until")?,
        before: cursor(p.cursor.as_deref())?,
        reason: p.reason,
        meter,
        source: p.source,
        limit,
    };
    let rows = gate.ctx.store.security_events(&q).map_err(internal)?;
    let next_cursor = (rows.len() == limit)
        .then(|| rows.first().map(|r| r.id.to_string()))
        .flatten();
    Ok(Json2(SecurityEventsPage {
        events: rows
            .into_iter()
            .map(|e| SecurityEventView {
                id: e.id,
                at: rfc3339(e.event.at),
                reason: e.event.reason,
                meter_id: e.event.meter_id.map(|m| m.to_string()),
                source: e.event.source,
                detail: e.event.detail,
            })
            .collect(),
        next_cursor,
    }))
}

/// One downstream target's outbox.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutboxView {
    /// The target's name.
    pub target: String,
    /// Readings waiting for delivery.
    pub pending: u64,
    /// Readings delivered.
    pub delivered: u64,
    /// Dead letters (refused for good).
    pub dead: u64,
    /// When the oldest pending reading was received (RFC 3339).
    pub oldest_pending: Option<String>,
    /// How far delivery lags, in seconds (now minus the oldest pending reading's arrival).
    pub lag_seconds: Option<i64>,
}

/// The downstream outbox, per target.
#[utoipa::path(get, path = "/api/v1/outbox", tag = "security",
    responses(
        (status = 200, description = "Per target", body = Vec<OutboxView>),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Role may not read the outbox", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn outbox(State(_): State<Ctx>, gate: Gate) -> Result<Json2<Vec<OutboxView>>, Problem> {
    gate.require(Action::ReadOutbox)?;
    let now = gate.ctx.now();
    let stats = gate.ctx.store.outbox_stats().map_err(internal)?;
    Ok(Json2(
        stats
            .into_iter()
            .map(|s| OutboxView {
                target: s.target,
                pending: s.pending,
                delivered: s.delivered,
                dead: s.dead,
                oldest_pending: s.oldest_pending.map(rfc3339),
                lag_seconds: s.oldest_pending.map(|t| (now - t).whole_seconds().max(0)),
            })
            .collect(),
    ))
}

/// The service's metrics in the Prometheus text exposition (operators).
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "OpenMetrics text", body = String, content_type = "application/openmetrics-text"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators read the metrics", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "This API runs without metrics", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn metrics(
    State(_): State<Ctx>,
    gate: Gate,
) -> Result<axum::response::Response, Problem> {
    use axum::response::IntoResponse;
    gate.require(gridward_access::Action::ReadMetrics)?;
    let observer = gate
        .ctx
        .observer
        .as_ref()
        .ok_or_else(|| Problem::not_found("metrics"))?;
    let (text, content_type) = observer.exposition();
    Ok(([(http::header::CONTENT_TYPE, content_type)], text).into_response())
}
