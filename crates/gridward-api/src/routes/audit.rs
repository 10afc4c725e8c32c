//! The audit log, for auditors.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gridward_access::Action;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::meters::{Json2, page_size, time_param};
use super::{Ctx, rfc3339};
use crate::auth::Gate;
use crate::extract::Query;
use crate::problem::Problem;

/// How audit entries are asked for.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Only entries at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only this actor (`user:NAME`, `cert:NAME`, `system`), or a prefix such as `user:`.
    pub actor: Option<String>,
    /// Only this action (e.g. `login.failure`), or a prefix such as `login.`.
    pub action: Option<String>,
    /// Only entries after this sequence number (the previous page's `next_after`).
    pub after: Option<u64>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

/// One audit entry, with the hashes that chain it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEntryView {
    /// 1-based position in the log.
    pub seq: u64,
    /// When (RFC 3339).
    pub time: String,
    /// Who: `user:NAME`, `cert:NAME` or `system`.
    pub actor: String,
    /// What, e.g. `login.failure`, `user.add`, `pki.issue`.
    pub action: String,
    /// What it was done to.
    pub target: String,
    /// success, failure or denied.
    pub outcome: String,
    /// The source address, if any.
    pub source: Option<String>,
    /// More about it (never a secret).
    pub detail: String,
    /// SHA-256 of the previous entry (hex).
    pub prev: String,
    /// SHA-256 of this entry (hex); see docs/audit-format.md.
    pub hash: String,
}

/// A page of audit entries, oldest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditPage {
    /// The entries, in log order.
    pub entries: Vec<AuditEntryView>,
    /// Pass as `after` for the next page; `null` when this page was the last.
    pub next_after: Option<u64>,
}

/// Audit entries in log order.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(AuditParams),
    responses(
        (status = 200, description = "A page of entries", body = AuditPage),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only auditors read the audit log", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn entries(
    State(_): State<Ctx>,
    gate: Gate,
    Query(p): Query<AuditParams>,
) -> Result<Json2<AuditPage>, Problem> {
    gate.require(Action::ReadAudit)?;
    let limit = page_size(p.limit)?;
    let q = gridward_audit::Query {
        since: time_param(p.since.as_deref(), "since")?,
        actor: p.actor,
        action: p.action,
        after_seq: p.after,
        limit,
    };
    let rows = gate.ctx.audit.entries(&q).map_err(|e| {
        tracing::error!(error = %e, "audit log unreadable");
        Problem::internal()
    })?;
    let next_after = (rows.len() == limit)
        .then(|| rows.last().map(|e| e.seq))
        .flatten();
    Ok(Json2(AuditPage {
        entries: rows
            .into_iter()
            .map(|e| AuditEntryView {
                seq: e.seq,
                time: rfc3339(e.time),
                actor: e.actor.to_string(),
                action: e.action,
                target: e.target,
                outcome: e.outcome.as_str().to_owned(),
                source: e.source,
                detail: e.detail,
                prev: hex(&e.prev),
                hash: hex(&e.hash),
            })
            .collect(),
        next_after,
    }))
}

/// The latest signed checkpoint (a C2SP signed note), for a third party to keep.
#[utoipa::path(get, path = "/api/v1/audit/checkpoint", tag = "audit",
    responses(
        (status = 200, description = "The signed note", body = String, content_type = "text/plain"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only auditors read the audit log", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No checkpoint yet", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn checkpoint(State(_): State<Ctx>, gate: Gate) -> Result<Response, Problem> {
    gate.require(Action::ReadAudit)?;
    let note = gate.ctx.audit.latest_checkpoint().map_err(|e| {
        tracing::error!(error = %e, "audit log unreadable");
        Problem::internal()
    })?;
    let note = note.ok_or_else(|| Problem::not_found("checkpoint"))?;
    Ok((
        [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        note,
    )
        .into_response())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
