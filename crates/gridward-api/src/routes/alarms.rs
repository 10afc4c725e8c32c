//! Alarms: listing and reading them (operators and auditors), acknowledging and clearing them
//! (operators).
//!
//! Every acknowledgement and clear leaves one audit entry (`alarm.acknowledge`, `alarm.clear`,
//! target `alarm:{id}`): who, with which credential, from where, and the answer. The alarm
//! itself records the caller's actor (`user:NAME` or `cert:SUBJECT`) as `by`.

use std::sync::Arc;

use axum::extract::State;
use gridward_access::Action;
use gridward_store::{AlarmChangeError, AlarmQuery, AlarmStore, StoredAlarm};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::commands::{audit_request, blocking, numeric_id, text};
use super::meters::{Json2, page_size};
use super::{Ctx, internal, rfc3339};
use crate::auth::Gate;
use crate::extract::{OptionalJson, Path, Query};
use crate::problem::Problem;

/// The severity codes, highest first.
pub const SEVERITIES: [&str; 4] = ["critical", "major", "minor", "warning"];

/// Longest `type` or `originator` filter, in characters.
pub const MAX_FILTER_CHARS: usize = 128;

/// The reason recorded when a clear gives none.
pub const DEFAULT_CLEAR_REASON: &str = "cleared by an operator";

/// 503: the head-end serves no alarm store.
pub(crate) fn alarms_off() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "alarms_off",
        "alarms and the concentrator topology are not served by this head-end (it runs \
         without an alarm store)",
    )
}

/// The alarm store, or the 503 that says there is none.
pub(crate) fn alarm_store(gate: &Gate) -> Result<Arc<dyn AlarmStore>, Problem> {
    gate.ctx.alarms.clone().ok_or_else(alarms_off)
}

/// Who acknowledged an alarm, and when.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AcknowledgedView {
    /// The actor: `user:NAME`, `cert:SUBJECT`, or `user:cli:UNIXUSER` from the command line.
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
}

/// Who cleared an alarm, when and why.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClearedView {
    /// The actor, or `detector` when the condition ended by itself.
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
    /// Why.
    pub reason: String,
}

/// One alarm.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AlarmView {
    /// Its id (increasing).
    pub id: i64,
    /// The type code: tamper, power_failure, outage, theft_suspected, register_stalled,
    /// refusal_burst, refusal_burst_fleet, cloned_meter, silent_after_revocation,
    /// plc_meter_lost, relay_refused.
    #[serde(rename = "type")]
    pub alarm_type: String,
    /// critical, major, minor or warning.
    pub severity: String,
    /// Who or what raised it: `meter:ID`, `concentrator:ID`, `feeder:NAME`, `source:IP`,
    /// `user:NAME` or `fleet`.
    pub originator: String,
    /// active_unacknowledged, active_acknowledged or cleared.
    pub state: String,
    /// The first raise (RFC 3339).
    pub first_seen: String,
    /// The latest raise (RFC 3339).
    pub last_seen: String,
    /// How many raises were folded into it.
    pub count: u64,
    /// One line for people.
    pub summary: String,
    /// The events that triggered it (the first 10 and the last 40).
    #[schema(value_type = Vec<serde_json::Value>)]
    pub evidence: Vec<serde_json::Value>,
    /// Who acknowledged it, and when (`null`: nobody yet).
    pub acknowledged: Option<AcknowledgedView>,
    /// Who cleared it, when and why (`null`: still active).
    pub cleared: Option<ClearedView>,
}

/// The evidence array of a stored alarm; anything else is logged and shown as no evidence.
fn evidence(a: &StoredAlarm) -> Vec<serde_json::Value> {
    match serde_json::from_str::<Vec<serde_json::Value>>(&a.evidence_json) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(alarm = a.id, error = %e, "stored alarm evidence is not a JSON array");
            Vec::new()
        }
    }
}

/// The API's view of a stored alarm.
pub fn alarm_view(a: &StoredAlarm) -> AlarmView {
    AlarmView {
        id: a.id,
        alarm_type: a.alarm_type.clone(),
        severity: a.severity.clone(),
        originator: a.originator.clone(),
        state: a.state.code().to_owned(),
        first_seen: rfc3339(a.first_seen),
        last_seen: rfc3339(a.last_seen),
        count: a.count,
        summary: a.summary.clone(),
        evidence: evidence(a),
        acknowledged: a.acknowledged.as_ref().map(|(by, at)| AcknowledgedView {
            by: by.clone(),
            at: rfc3339(*at),
        }),
        cleared: a.cleared.as_ref().map(|(by, at, reason)| ClearedView {
            by: by.clone(),
            at: rfc3339(*at),
            reason: reason.clone(),
        }),
    }
}

/// How alarms are asked for.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AlarmsParams {
    /// Only active (not cleared) alarms.
    pub active: Option<bool>,
    /// Only this type (a type code such as `tamper`).
    #[serde(rename = "type")]
    #[param(rename = "type", pattern = "^[a-z_]{1,128}$")]
    pub alarm_type: Option<String>,
    /// Only this severity: critical, major, minor or warning.
    #[param(pattern = "^(critical|major|minor|warning)$")]
    pub severity: Option<String>,
    /// Only this originator (such as `meter:m000001`, `concentrator:dc-1`, `fleet`).
    #[param(min_length = 1, max_length = 128)]
    pub originator: Option<String>,
    /// Only alarms with an id below this one: the `next_before` of the previous page.
    pub before: Option<i64>,
    /// At most this many, the newest (1 to 1000, default 100).
    pub limit: Option<usize>,
}

/// A page of alarms, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AlarmsPage {
    /// The alarms, newest first.
    pub alarms: Vec<AlarmView>,
    /// Pass as `before` for the older page; `null` when there is none.
    pub next_before: Option<i64>,
}

/// The store query of the parameters, or the 400 that says which one is wrong.
fn query_of(p: AlarmsParams) -> Result<AlarmQuery, Problem> {
    let limit = page_size(p.limit)?;
    if let Some(t) = &p.alarm_type
        && (t.is_empty()
            || t.len() > MAX_FILTER_CHARS
            || !t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    {
        return Err(Problem::bad_request(
            "type must be an alarm type code such as tamper or outage",
        ));
    }
    if let Some(s) = &p.severity
        && !SEVERITIES.contains(&s.as_str())
    {
        return Err(Problem::bad_request(
            "severity must be critical, major, minor or warning",
        ));
    }
    if let Some(o) = &p.originator
        && (o.is_empty() || o.chars().count() > MAX_FILTER_CHARS)
    {
        return Err(Problem::bad_request(format!(
            "originator must be 1 to {MAX_FILTER_CHARS} characters, such as meter:m000001"
        )));
    }
    Ok(AlarmQuery {
        active_only: p.active.unwrap_or(false),
        alarm_type: p.alarm_type,
        severity: p.severity,
        originator: p.originator,
        before: p.before,
        limit,
    })
}

/// Alarms, newest first.
#[utoipa::path(get, path = "/api/v1/alarms", tag = "alarms",
    params(AlarmsParams),
    responses(
        (status = 200, description = "The newest alarms matching every filter given", body = AlarmsPage),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read alarms", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No alarm store", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_alarms(
    State(_): State<Ctx>,
    gate: Gate,
    Query(p): Query<AlarmsParams>,
) -> Result<Json2<AlarmsPage>, Problem> {
    gate.require(Action::ReadAlarms)?;
    let store = alarm_store(&gate)?;
    let q = query_of(p)?;
    let limit = q.limit;
    let rows = blocking(move || store.alarms(&q))
        .await?
        .map_err(internal)?;
    let next_before = (rows.len() == limit)
        .then(|| rows.last().map(|a| a.id))
        .flatten();
    Ok(Json2(AlarmsPage {
        alarms: rows.iter().map(alarm_view).collect(),
        next_before,
    }))
}

/// One alarm, with its evidence.
#[utoipa::path(get, path = "/api/v1/alarms/{alarm_id}", tag = "alarms",
    params(("alarm_id" = i64, Path, description = "The alarm's id")),
    responses(
        (status = 200, description = "The alarm", body = AlarmView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read alarms", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such alarm", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No alarm store", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_alarm(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<AlarmView>, Problem> {
    gate.require(Action::ReadAlarms)?;
    let store = alarm_store(&gate)?;
    let id = numeric_id(&raw, "alarm")?;
    let a = blocking(move || store.alarm(id))
        .await?
        .map_err(internal)?
        .ok_or_else(|| Problem::not_found("alarm"))?;
    Ok(Json2(alarm_view(&a)))
}

/// A refused acknowledgement or clear as a problem.
fn change_problem(e: &AlarmChangeError) -> Problem {
    match e {
        AlarmChangeError::NotFound(_) => Problem::not_found("alarm"),
        AlarmChangeError::AlreadyAcknowledged(_) => {
            Problem::new(StatusCode::CONFLICT, "alarm_acknowledged", e.to_string())
        }
        AlarmChangeError::Cleared(_) => Problem::new(
            StatusCode::CONFLICT,
            "alarm_cleared",
            format!("{e}: a cleared alarm is final; a new raise opens a new alarm"),
        ),
        AlarmChangeError::Store(e) => internal(e),
    }
}

/// Acknowledges an active alarm: the caller is recorded as who acknowledged it, and when.
#[utoipa::path(post, path = "/api/v1/alarms/{alarm_id}/ack", tag = "alarms",
    params(("alarm_id" = i64, Path, description = "The alarm's id")),
    responses(
        (status = 200, description = "Acknowledged", body = AlarmView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators acknowledge alarms", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such alarm", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already acknowledged, or cleared", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No alarm store", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn acknowledge(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<AlarmView>, Problem> {
    let caller = gate.require(Action::AcknowledgeAlarms)?.clone();
    let id = numeric_id(&raw, "alarm")?;
    let result = async {
        let store = alarm_store(&gate)?;
        let by = caller.principal.actor_string();
        let at = gate.ctx.now();
        let a = blocking(move || store.acknowledge_alarm(id, &by, at))
            .await?
            .map_err(|e| change_problem(&e))?;
        let detail = format!(
            "acknowledged alarm {id} ({} {} of {})",
            a.severity, a.alarm_type, a.originator
        );
        Ok((alarm_view(&a), detail))
    }
    .await;
    audit_request(
        &gate,
        &caller,
        "alarm.acknowledge",
        &format!("alarm:{id}"),
        &result,
    );
    result.map(|(v, _)| Json2(v))
}

/// Why an alarm is cleared.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClearBody {
    /// Why (kept with the alarm and in the audit log), up to 1000 characters; default
    /// "cleared by an operator".
    #[schema(max_length = 1000)]
    pub reason: Option<String>,
}

/// Clears an active alarm (acknowledged or not): final; the next raise of its type and
/// originator opens a new alarm. The body is optional.
#[utoipa::path(post, path = "/api/v1/alarms/{alarm_id}/clear", tag = "alarms",
    params(("alarm_id" = i64, Path, description = "The alarm's id")),
    request_body(content = Option<ClearBody>, description = "Optional: why", content_type = "application/json"),
    responses(
        (status = 200, description = "Cleared", body = AlarmView),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators clear alarms", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such alarm", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already cleared", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "A body that is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Reason too long", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No alarm store", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn clear(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
    OptionalJson(body): OptionalJson<ClearBody>,
) -> Result<Json2<AlarmView>, Problem> {
    let caller = gate.require(Action::AcknowledgeAlarms)?.clone();
    let id = numeric_id(&raw, "alarm")?;
    let result = async {
        let store = alarm_store(&gate)?;
        let reason = text("reason", body.and_then(|b| b.reason))?
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_CLEAR_REASON.to_owned());
        let by = caller.principal.actor_string();
        let at = gate.ctx.now();
        let why = reason.clone();
        let a = blocking(move || store.clear_alarm(id, &by, at, &why))
            .await?
            .map_err(|e| change_problem(&e))?;
        let detail = format!(
            "cleared alarm {id} ({} {} of {}): {reason}",
            a.severity, a.alarm_type, a.originator
        );
        Ok((alarm_view(&a), detail))
    }
    .await;
    audit_request(
        &gate,
        &caller,
        "alarm.clear",
        &format!("alarm:{id}"),
        &result,
    );
    result.map(|(v, _)| Json2(v))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn params() -> AlarmsParams {
        AlarmsParams {
            active: None,
            alarm_type: None,
            severity: None,
            originator: None,
            before: None,
            limit: None,
        }
    }

    #[test]
    fn filters_are_checked() {
        let q = query_of(AlarmsParams {
            active: Some(true),
            alarm_type: Some("theft_suspected".into()),
            severity: Some("critical".into()),
            originator: Some("meter:m-1".into()),
            before: Some(7),
            limit: Some(5),
        })
        .unwrap();
        assert!(q.active_only);
        assert_eq!(q.limit, 5);
        assert_eq!(q.before, Some(7));
        for bad in [
            AlarmsParams {
                severity: Some("huge".into()),
                ..params()
            },
            AlarmsParams {
                alarm_type: Some("Tamper!".into()),
                ..params()
            },
            AlarmsParams {
                originator: Some(String::new()),
                ..params()
            },
            AlarmsParams {
                limit: Some(0),
                ..params()
            },
        ] {
            assert_eq!(query_of(bad).unwrap_err().status, 400);
        }
    }

    #[test]
    fn conflicts_are_409_and_unknown_is_404() {
        assert_eq!(
            change_problem(&AlarmChangeError::AlreadyAcknowledged(1)).status,
            409
        );
        assert_eq!(change_problem(&AlarmChangeError::Cleared(1)).status, 409);
        assert_eq!(change_problem(&AlarmChangeError::NotFound(1)).status, 404);
    }
}
