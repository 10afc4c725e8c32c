//! Commands and four-eyes proposals: sending a command to one meter or many, reading their
//! lifecycle, and a second operator's decision on a proposal.
//!
//! Every request that changes something leaves one audit entry of its own (`api.command.send`,
//! `api.proposal.approve`, `api.proposal.reject`: who, with which credential, from where, and
//! the answer), beside the entries the command service writes for the acts themselves
//! (`command.issue` per command, `proposal.create`, `proposal.approve`, ...). Refusals that
//! matter for security also leave a security event (`four_eyes_violation`,
//! `four_eyes_proposer_ineligible`).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use gridward_access::{Action, PrincipalId, Role};
use gridward_audit::Outcome;
use gridward_command::{Approver, CommandError, Commands, IssueRequest, Issued, ProposalError};
use gridward_core::MeterId;
use gridward_core::command::{CommandBody, CommandId};
use gridward_store::{
    CommandQuery, CommandStatus, CommandStore, ProposalStatus, StoredCommand, StoredProposal,
};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::meters::{Json2, cursor, page_size};
use super::{Ctx, internal, rfc3339};
use crate::auth::{Caller, Gate, Via};
use crate::extract::{Json, Path, Query};
use crate::problem::Problem;

/// Longest `reason` or `note`, in characters.
pub const MAX_TEXT_CHARS: usize = 1000;

/// 503: the head-end runs without a command key.
pub(crate) fn commands_off() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "commands_off",
        "commands are off: issue a command signer with gridward pki issue command-signer \
         headend and restart",
    )
}

/// The command service, or the 503 that says how to turn it on.
pub(crate) fn service(gate: &Gate) -> Result<Arc<Commands>, Problem> {
    gate.ctx.commands.clone().ok_or_else(commands_off)
}

/// The store commands are read from, or 503.
pub(crate) fn reader(gate: &Gate) -> Result<Arc<dyn CommandStore>, Problem> {
    gate.ctx.command_store.clone().ok_or_else(commands_off)
}

/// The name an act is recorded under: a user's name, or `cert:` and a certificate's subject
/// (user names cannot contain `:`, so a certificate and a user never share a name, and a
/// person holding both cannot approve their own proposal under the other one).
pub(crate) fn username(caller: &Caller) -> String {
    match &caller.principal.id {
        PrincipalId::User(name) => name.clone(),
        PrincipalId::Certificate { subject, .. } => format!("cert:{subject}"),
    }
}

/// Runs a command-service call off the async workers (it writes SQLite).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "a command-service task failed");
        Problem::internal()
    })
}

/// The API's own audit entry for one state-changing request: success with `detail`, or the
/// problem it was answered with (403 as denied, the rest as failure).
pub(crate) fn audit_request<T>(
    gate: &Gate,
    caller: &Caller,
    action: &str,
    target: &str,
    result: &Result<(T, String), Problem>,
) {
    let via = match caller.via {
        Via::Bearer(_) => "session (bearer)",
        Via::Cookie(_) => "session (cookie)",
        Via::Certificate => "client certificate",
    };
    let (outcome, detail) = match result {
        Ok((_, detail)) => (Outcome::Success, format!("{detail}; via {via}")),
        Err(p) => (
            if p.status == StatusCode::FORBIDDEN.as_u16() {
                Outcome::Denied
            } else {
                Outcome::Failure
            },
            format!(
                "answered {} {}: {}; via {via}",
                p.status,
                p.code(),
                p.detail
            ),
        ),
    };
    gate.ctx
        .audit(caller.actor(), action, target, outcome, gate.source, detail);
}

/// A 422 about the request's content.
pub(crate) fn unprocessable(code: &str, detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
}

/// Checks the length of a free text field.
pub(crate) fn text(name: &str, value: Option<String>) -> Result<Option<String>, Problem> {
    match value {
        Some(v) if v.chars().count() > MAX_TEXT_CHARS => Err(unprocessable(
            "text_too_long",
            format!(
                "{name} is {} characters; at most {MAX_TEXT_CHARS} are allowed",
                v.chars().count()
            ),
        )),
        other => Ok(other),
    }
}

/// A command kind as requests name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KindName {
    /// Open the supply relay.
    Disconnect,
    /// Close the supply relay.
    Reconnect,
    /// Change how often the meter reports (`seconds`).
    SetReportingInterval,
    /// Switch the active tariff (`tariff`).
    SetTariff,
    /// Send a reading now.
    ReadNow,
    /// Refused here (422): firmware is installed by campaigns (`POST /api/v1/campaigns`).
    FirmwareUpdate,
}

/// The command body of a kind and its arguments; each kind takes exactly its own arguments.
fn body_of(
    kind: KindName,
    seconds: Option<u32>,
    tariff: Option<String>,
) -> Result<CommandBody, Problem> {
    let invalid = |d: &str| unprocessable("invalid_command", d);
    match (kind, seconds, tariff) {
        (KindName::FirmwareUpdate, _, _) => Err(invalid(
            "firmware_update is sent by firmware campaigns: upload the image with POST \
             /api/v1/firmware, then start a campaign with POST /api/v1/campaigns",
        )),
        (KindName::Disconnect, None, None) => Ok(CommandBody::Disconnect),
        (KindName::Reconnect, None, None) => Ok(CommandBody::Reconnect),
        (KindName::ReadNow, None, None) => Ok(CommandBody::ReadNow),
        (KindName::Disconnect | KindName::Reconnect | KindName::ReadNow, _, _) => Err(invalid(
            "disconnect, reconnect and read_now take no arguments: leave out seconds and tariff",
        )),
        (KindName::SetReportingInterval, Some(seconds), None) => {
            Ok(CommandBody::SetReportingInterval { seconds })
        }
        (KindName::SetReportingInterval, _, _) => Err(invalid(
            "set_reporting_interval takes `seconds` (the new interval) and nothing else",
        )),
        (KindName::SetTariff, None, Some(tariff)) => Ok(CommandBody::SetTariff { tariff }),
        (KindName::SetTariff, _, _) => Err(invalid(
            "set_tariff takes `tariff` (the tariff's name) and nothing else",
        )),
    }
}

/// A lifetime in seconds as the command service takes it.
fn ttl_of(ttl_secs: Option<u64>) -> Result<Option<time::Duration>, Problem> {
    ttl_secs
        .map(|s| {
            i64::try_from(s).map(time::Duration::seconds).map_err(|_| {
                unprocessable(
                    "invalid_command",
                    "ttl_secs is far longer than any command may live",
                )
            })
        })
        .transpose()
}

/// A refused or failed issue as a problem.
fn issue_problem(e: &CommandError) -> Problem {
    match e {
        CommandError::Store(e) => internal(e),
        CommandError::Signing(_) | CommandError::CounterMismatch { .. } => {
            tracing::error!(error = %e, "issuing a command failed");
            Problem::internal()
        }
        other => unprocessable("invalid_command", other.to_string()),
    }
}

/// A meter id, as request bodies carry it: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.`
/// or `-`.
#[derive(Debug, Clone, ToSchema)]
#[schema(value_type = String, pattern = "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")]
pub struct MeterIdText(pub String);

/// A command to one meter.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MeterCommandBody {
    /// What to do.
    pub kind: KindName,
    /// For `set_reporting_interval`: the new interval in seconds (1 to 604800).
    #[schema(minimum = 1, maximum = 604800)]
    pub seconds: Option<u32>,
    /// For `set_tariff`: the tariff's name (1 to 32 of `[A-Za-z0-9_.-]`).
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,32}$")]
    pub tariff: Option<String>,
    /// How long the command may wait for the meter, in seconds (default 1 h, at most 7 days).
    #[schema(minimum = 1, maximum = 604800)]
    pub ttl_secs: Option<u64>,
    /// Why (kept in the audit log), up to 1000 characters.
    #[schema(max_length = 1000)]
    pub reason: Option<String>,
}

/// A command to many meters; a critical kind (disconnect) to more than the four-eyes threshold
/// (10) becomes a proposal another operator must approve.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkCommandBody {
    /// The meters, each once.
    #[schema(value_type = Vec<MeterIdText>, min_items = 1)]
    pub meters: Vec<String>,
    /// What to do.
    pub kind: KindName,
    /// For `set_reporting_interval`: the new interval in seconds (1 to 604800).
    #[schema(minimum = 1, maximum = 604800)]
    pub seconds: Option<u32>,
    /// For `set_tariff`: the tariff's name (1 to 32 of `[A-Za-z0-9_.-]`).
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,32}$")]
    pub tariff: Option<String>,
    /// How long the commands may wait for their meters, in seconds (default 1 h, at most 7
    /// days; an approved proposal's commands get the default from the approval on).
    #[schema(minimum = 1, maximum = 604800)]
    pub ttl_secs: Option<u64>,
    /// Why: shown to the approver and kept in the audit log (required, up to 1000 characters).
    #[schema(min_length = 1, max_length = 1000)]
    pub reason: String,
}

/// A command just queued.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueuedCommand {
    /// The command's id (32 hex digits).
    pub id: String,
    /// Its meter.
    pub meter_id: String,
}

/// A proposal just made.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProposalRef {
    /// The proposal's id.
    pub id: i64,
    /// It must be approved before this (RFC 3339).
    pub expires_at: String,
}

/// What a command request did.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum IssueAnswer {
    /// Signed and queued: one command per meter, in the request's order.
    Queued {
        /// The commands.
        commands: Vec<QueuedCommand>,
    },
    /// Needs a second operator's approval (`POST /api/v1/proposals/{id}/approve`).
    Proposed {
        /// The proposal.
        proposal: ProposalRef,
    },
}

fn answer(meters: &[MeterId], issued: Issued) -> (IssueAnswer, String) {
    match issued {
        Issued::Queued { ids } => {
            let detail = match ids.as_slice() {
                [one] => format!("queued command {one}"),
                many => format!("queued {} commands", many.len()),
            };
            (
                IssueAnswer::Queued {
                    commands: meters
                        .iter()
                        .zip(ids)
                        .map(|(m, id)| QueuedCommand {
                            id: id.to_string(),
                            meter_id: m.to_string(),
                        })
                        .collect(),
                },
                detail,
            )
        }
        Issued::Proposed {
            proposal_id,
            expires_at,
        } => (
            IssueAnswer::Proposed {
                proposal: ProposalRef {
                    id: proposal_id,
                    expires_at: rfc3339(expires_at),
                },
            },
            format!("proposal {proposal_id} waits for a second operator"),
        ),
    }
}

async fn issue(
    gate: &Gate,
    caller: &Caller,
    meters: Vec<MeterId>,
    body: CommandBody,
    ttl: Option<time::Duration>,
    reason: String,
) -> Result<(IssueAnswer, String), Problem> {
    let commands = service(gate)?;
    let req = IssueRequest {
        meters: meters.clone(),
        body,
        actor: username(caller),
        ttl,
        reason,
    };
    let issued = blocking(move || commands.issue(req))
        .await?
        .map_err(|e| issue_problem(&e))?;
    Ok(answer(&meters, issued))
}

fn accepted(answer: IssueAnswer) -> Response {
    (StatusCode::ACCEPTED, Json2(answer)).into_response()
}

/// Sends a command to one meter (never four eyes: one meter is below every threshold).
#[utoipa::path(post, path = "/api/v1/meters/{meter_id}/commands", tag = "commands",
    params(("meter_id" = String, Path, description = "The meter id")),
    request_body = MeterCommandBody,
    responses(
        (status = 202, description = "Signed and queued; the dispatcher sends it when the meter is reachable", body = IssueAnswer),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators send commands", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a meter id", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Arguments that do not fit the kind, out of bounds, or firmware_update", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off (no command signer)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn send_to_meter(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
    Json(body): Json<MeterCommandBody>,
) -> Result<Response, Problem> {
    let caller = gate.require(Action::SendCommand)?.clone();
    let meter = MeterId::new(&raw).map_err(|_| Problem::not_found("meter"))?;
    let target = meter.to_string();
    let result = async {
        let reason = text("reason", body.reason)?.unwrap_or_default();
        let ttl = ttl_of(body.ttl_secs)?;
        let cmd = body_of(body.kind, body.seconds, body.tariff)?;
        issue(&gate, &caller, vec![meter], cmd, ttl, reason).await
    }
    .await;
    audit_request(&gate, &caller, "api.command.send", &target, &result);
    result.map(|(a, _)| accepted(a))
}

/// Sends a command to many meters: queued at once, or (a critical kind to more meters than the
/// four-eyes threshold) a proposal that waits for a second operator.
#[utoipa::path(post, path = "/api/v1/commands", tag = "commands",
    request_body = BulkCommandBody,
    responses(
        (status = 202, description = "Queued, or proposed for a second operator's approval", body = IssueAnswer),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators send commands", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad meter list, arguments, lifetime or reason", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off (no command signer)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn send_bulk(
    State(_): State<Ctx>,
    gate: Gate,
    Json(body): Json<BulkCommandBody>,
) -> Result<Response, Problem> {
    let caller = gate.require(Action::SendCommand)?.clone();
    let target = match body.meters.as_slice() {
        // Not validated yet: at most a meter id's length of it goes into the audit log.
        [one] => one.chars().take(64).collect(),
        many => format!("{} meters", many.len()),
    };
    let result = async {
        let meters = body
            .meters
            .iter()
            .map(|m| {
                MeterId::new(m).map_err(|e| {
                    unprocessable(
                        "invalid_command",
                        format!("meter {:?}: {e}", m.chars().take(70).collect::<String>()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let reason = text("reason", Some(body.reason))?.unwrap_or_default();
        if reason.trim().is_empty() {
            return Err(unprocessable(
                "invalid_command",
                "say why in `reason`: the approver and the audit log read it",
            ));
        }
        let ttl = ttl_of(body.ttl_secs)?;
        let cmd = body_of(body.kind, body.seconds, body.tariff)?;
        issue(&gate, &caller, meters, cmd, ttl, reason).await
    }
    .await;
    audit_request(&gate, &caller, "api.command.send", &target, &result);
    result.map(|(a, _)| accepted(a))
}

/// One command and where it is in its lifecycle (never the signing key; the signed bytes only
/// by their SHA-256).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CommandView {
    /// The command's id (32 hex digits).
    pub id: String,
    /// The target meter.
    pub meter_id: String,
    /// disconnect, reconnect, set_reporting_interval, set_tariff, read_now or firmware_update.
    pub kind: String,
    /// Its arguments (`{}`, `{"seconds":900}`, `{"tariff":"night"}`, or the firmware's id,
    /// digest, version and sequence).
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// The per-meter command counter.
    pub counter: u64,
    /// queued, sent, acknowledged, refused, expired or failed.
    pub status: String,
    /// When it was signed (RFC 3339).
    pub issued_at: String,
    /// When it expires (RFC 3339).
    pub expires_at: String,
    /// When it was last published (RFC 3339), if ever.
    pub sent_at: Option<String>,
    /// When it reached its final status (RFC 3339), if it did.
    pub settled_at: Option<String>,
    /// The meter's refusal code, or the head-end's reason for expired or failed.
    pub outcome: Option<String>,
    /// Who issued it (the proposer, for an approved proposal).
    pub issued_by: String,
    /// The second operator who approved it (four eyes).
    pub approved_by: Option<String>,
    /// The proposal it came from.
    pub proposal_id: Option<i64>,
    /// The firmware campaign it belongs to.
    pub campaign_id: Option<i64>,
    /// How many times it was published.
    pub attempts: u32,
    /// SHA-256 of the signed COSE_Sign1 bytes (hex): every send publishes exactly these.
    pub envelope_sha256: String,
}

/// JSON arguments as an object (stored text that is not one shows as `{}`).
pub(crate) fn args_value(args_json: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(args_json) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => serde_json::Value::Object(serde_json::Map::new()),
    }
}

pub(crate) fn command_view(c: &StoredCommand) -> CommandView {
    CommandView {
        id: c.id.to_string(),
        meter_id: c.meter_id.to_string(),
        kind: c.kind.as_str().to_owned(),
        args: args_value(&c.args_json),
        counter: c.counter,
        status: c.status.as_str().to_owned(),
        issued_at: rfc3339(c.issued_at),
        expires_at: rfc3339(c.expires_at),
        sent_at: c.sent_at.map(rfc3339),
        settled_at: c.settled_at.map(rfc3339),
        outcome: c.outcome.clone(),
        issued_by: c.issued_by.clone(),
        approved_by: c.approved_by.clone(),
        proposal_id: c.proposal_id,
        campaign_id: c.campaign_id,
        attempts: c.attempts,
        envelope_sha256: hex::encode(Sha256::digest(&c.envelope)),
    }
}

/// How commands are asked for.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CommandsParams {
    /// Only commands to this meter.
    pub meter: Option<String>,
    /// Only commands in this status (queued, sent, acknowledged, refused, expired, failed).
    pub status: Option<String>,
    /// Only the commands of this proposal.
    pub proposal: Option<i64>,
    /// Only the commands of this campaign.
    pub campaign: Option<i64>,
    /// The `next_cursor` of the previous page: the older commands.
    pub before: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<usize>,
}

/// A page of commands, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CommandsPage {
    /// The commands, newest first.
    pub commands: Vec<CommandView>,
    /// Pass as `before` for the older page; `null` when there is none.
    pub next_cursor: Option<String>,
}

/// Commands, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/commands", tag = "commands",
    params(CommandsParams),
    responses(
        (status = 200, description = "A page of commands", body = CommandsPage),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read commands", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_commands(
    State(_): State<Ctx>,
    gate: Gate,
    Query(p): Query<CommandsParams>,
) -> Result<Json2<CommandsPage>, Problem> {
    gate.require(Action::ReadCommands)?;
    let store = reader(&gate)?;
    let limit = page_size(p.limit)?;
    let meter_id = p
        .meter
        .as_deref()
        .map(|m| MeterId::new(m).map_err(|e| Problem::bad_request(format!("meter: {e}"))))
        .transpose()?;
    let status = p
        .status
        .as_deref()
        .map(|s| {
            s.parse::<CommandStatus>()
                .map_err(|e| Problem::bad_request(e.to_string()))
        })
        .transpose()?;
    let q = CommandQuery {
        meter_id,
        status,
        campaign_id: p.campaign,
        proposal_id: p.proposal,
        before: cursor(p.before.as_deref())?,
        limit,
    };
    let rows = store.commands(&q).map_err(internal)?;
    let next_cursor = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.row.to_string()))
        .flatten();
    Ok(Json2(CommandsPage {
        commands: rows.iter().map(command_view).collect(),
        next_cursor,
    }))
}

/// One command.
#[utoipa::path(get, path = "/api/v1/commands/{command_id}", tag = "commands",
    params(("command_id" = String, Path, description = "The command's id (32 hex digits)")),
    responses(
        (status = 200, description = "The command", body = CommandView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read commands", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such command", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_command(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<CommandView>, Problem> {
    gate.require(Action::ReadCommands)?;
    let store = reader(&gate)?;
    let id: CommandId = raw.parse().map_err(|_| Problem::not_found("command"))?;
    let c = store
        .command(&id)
        .map_err(internal)?
        .ok_or_else(|| Problem::not_found("command"))?;
    Ok(Json2(command_view(&c)))
}

/// A four-eyes proposal.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProposalView {
    /// Its id.
    pub id: i64,
    /// The kind of command proposed.
    pub kind: String,
    /// Its arguments.
    #[schema(value_type = Object)]
    pub args: serde_json::Value,
    /// The target meters, in order.
    pub meters: Vec<String>,
    /// The proposing operator.
    pub proposed_by: String,
    /// When it was proposed (RFC 3339).
    pub created_at: String,
    /// It must be decided before this (RFC 3339).
    pub expires_at: String,
    /// Why, as the proposer said.
    pub reason: String,
    /// pending, approved, rejected or expired.
    pub status: String,
    /// Who approved or rejected it.
    pub decided_by: Option<String>,
    /// When it was decided or found expired (RFC 3339).
    pub decided_at: Option<String>,
    /// The decider's note.
    pub note: Option<String>,
}

fn proposal_view(p: &StoredProposal) -> ProposalView {
    ProposalView {
        id: p.id,
        kind: p.kind.as_str().to_owned(),
        args: args_value(&p.args_json),
        meters: p.meters.iter().map(ToString::to_string).collect(),
        proposed_by: p.proposed_by.clone(),
        created_at: rfc3339(p.created_at),
        expires_at: rfc3339(p.expires_at),
        reason: p.reason.clone(),
        status: p.status.as_str().to_owned(),
        decided_by: p.decided_by.clone(),
        decided_at: p.decided_at.map(rfc3339),
        note: p.note.clone(),
    }
}

/// How proposals are asked for.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ProposalsParams {
    /// Only proposals in this status (pending, approved, rejected, expired).
    pub status: Option<String>,
    /// At most this many, the newest (1 to 1000, default 100).
    pub limit: Option<usize>,
}

/// Proposals, newest first.
#[utoipa::path(get, path = "/api/v1/proposals", tag = "commands",
    params(ProposalsParams),
    responses(
        (status = 200, description = "The newest proposals", body = Vec<ProposalView>),
        (status = 400, description = "Bad parameter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read proposals", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_proposals(
    State(_): State<Ctx>,
    gate: Gate,
    Query(p): Query<ProposalsParams>,
) -> Result<Json2<Vec<ProposalView>>, Problem> {
    gate.require(Action::ReadCommands)?;
    let store = reader(&gate)?;
    let limit = page_size(p.limit)?;
    let status = p
        .status
        .as_deref()
        .map(|s| {
            s.parse::<ProposalStatus>()
                .map_err(|e| Problem::bad_request(e.to_string()))
        })
        .transpose()?;
    let rows = store.proposals(status, limit).map_err(internal)?;
    Ok(Json2(rows.iter().map(proposal_view).collect()))
}

/// Parses a numeric id from the path; anything else is simply not found.
pub(crate) fn numeric_id(raw: &str, what: &str) -> Result<i64, Problem> {
    raw.parse::<i64>().map_err(|_| Problem::not_found(what))
}

/// One proposal.
#[utoipa::path(get, path = "/api/v1/proposals/{proposal_id}", tag = "commands",
    params(("proposal_id" = i64, Path, description = "The proposal's id")),
    responses(
        (status = 200, description = "The proposal", body = ProposalView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read proposals", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such proposal", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_proposal(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<ProposalView>, Problem> {
    gate.require(Action::ReadCommands)?;
    let store = reader(&gate)?;
    let id = numeric_id(&raw, "proposal")?;
    let p = store
        .proposal(id)
        .map_err(internal)?
        .ok_or_else(|| Problem::not_found("proposal"))?;
    Ok(Json2(proposal_view(&p)))
}

/// A decision on a proposal.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// A note for the record, up to 1000 characters.
    #[schema(max_length = 1000)]
    pub note: Option<String>,
}

/// An approved proposal and its queued commands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ApprovalView {
    /// The proposal, now approved.
    pub proposal: ProposalView,
    /// Its commands, one per meter, issued by the proposer and approved by the caller.
    pub commands: Vec<QueuedCommand>,
}

/// Maps a refused decision onto a problem, and leaves a security event where four eyes were
/// at stake.
fn decision_problem(
    gate: &Gate,
    caller: &Caller,
    id: i64,
    approving: bool,
    e: &ProposalError,
) -> Problem {
    let who = caller.principal.actor_string();
    match e {
        ProposalError::NotFound(_) => Problem::not_found("proposal"),
        ProposalError::NotOperator(_) => {
            Problem::new(StatusCode::FORBIDDEN, "not_operator", e.to_string())
        }
        ProposalError::SameUser => {
            if approving {
                gate.ctx.security_event(
                    "four_eyes_violation",
                    None,
                    gate.source,
                    format!("{who} tried to approve their own proposal {id}"),
                );
            }
            Problem::new(StatusCode::FORBIDDEN, "four_eyes", e.to_string())
        }
        ProposalError::ProposerNotEligible(proposer) => {
            gate.ctx.security_event(
                "four_eyes_proposer_ineligible",
                None,
                gate.source,
                format!(
                    "{who} tried to approve proposal {id} of {proposer}, who is disabled or no \
                     longer an operator; the proposal was rejected"
                ),
            );
            Problem::new(
                StatusCode::FORBIDDEN,
                "proposer_not_eligible",
                e.to_string(),
            )
        }
        ProposalError::NotPending(_) | ProposalError::Expired => {
            Problem::new(StatusCode::CONFLICT, "proposal_closed", e.to_string())
        }
        ProposalError::Arguments(_) | ProposalError::Issue(CommandError::FirmwareNotStored) => {
            Problem::new(StatusCode::CONFLICT, "proposal_unusable", e.to_string())
        }
        ProposalError::Issue(e) => issue_problem(e),
        ProposalError::Store(e) => internal(e),
        other => {
            tracing::error!(error = %other, "deciding a proposal failed");
            Problem::internal()
        }
    }
}

fn approver(caller: &Caller) -> Approver {
    Approver {
        username: username(caller),
        role_is_operator: caller.principal.role == Role::Operator,
    }
}

/// Approves a proposal: its commands are signed and queued, issued by the proposer and approved
/// by the caller. The caller must be an operator other than the proposer, and the proposer still
/// an enabled operator.
#[utoipa::path(post, path = "/api/v1/proposals/{proposal_id}/approve", tag = "commands",
    params(("proposal_id" = i64, Path, description = "The proposal's id")),
    request_body = DecisionBody,
    responses(
        (status = 200, description = "Approved; the commands are queued", body = ApprovalView),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an operator, the proposer themselves, or the proposer is no longer an enabled operator (the proposal is then rejected)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such proposal", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already decided, or expired", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Note too long", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn approve(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
    Json(body): Json<DecisionBody>,
) -> Result<Json2<ApprovalView>, Problem> {
    let caller = gate.require(Action::ApproveCommands)?.clone();
    let id = numeric_id(&raw, "proposal")?;
    let result = async {
        let commands = service(&gate)?;
        let note = text("note", body.note)?;
        let who = approver(&caller);
        let approval = blocking(move || commands.approve(id, &who, note.as_deref()))
            .await?
            .map_err(|e| decision_problem(&gate, &caller, id, true, &e))?;
        let meters = &approval.proposal.meters;
        let view = ApprovalView {
            proposal: proposal_view(&approval.proposal),
            commands: meters
                .iter()
                .zip(&approval.ids)
                .map(|(m, c)| QueuedCommand {
                    id: c.to_string(),
                    meter_id: m.to_string(),
                })
                .collect(),
        };
        let detail = format!(
            "approved proposal {id} of {}: {} commands queued",
            approval.proposal.proposed_by,
            approval.ids.len()
        );
        Ok((view, detail))
    }
    .await;
    audit_request(
        &gate,
        &caller,
        "api.proposal.approve",
        &format!("proposal:{id}"),
        &result,
    );
    result.map(|(v, _)| Json2(v))
}

/// Rejects a proposal (an operator other than the proposer).
#[utoipa::path(post, path = "/api/v1/proposals/{proposal_id}/reject", tag = "commands",
    params(("proposal_id" = i64, Path, description = "The proposal's id")),
    request_body = DecisionBody,
    responses(
        (status = 200, description = "Rejected", body = ProposalView),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an operator, or the proposer themselves", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such proposal", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already decided, or expired", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Note too long", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn reject(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
    Json(body): Json<DecisionBody>,
) -> Result<Json2<ProposalView>, Problem> {
    let caller = gate.require(Action::ApproveCommands)?.clone();
    let id = numeric_id(&raw, "proposal")?;
    let result = async {
        let commands = service(&gate)?;
        let note = text("note", body.note)?;
        let who = approver(&caller);
        let p = blocking(move || commands.reject(id, &who, note.as_deref()))
            .await?
            .map_err(|e| decision_problem(&gate, &caller, id, false, &e))?;
        let detail = format!("rejected proposal {id} of {}", p.proposed_by);
        Ok((proposal_view(&p), detail))
    }
    .await;
    audit_request(
        &gate,
        &caller,
        "api.proposal.reject",
        &format!("proposal:{id}"),
        &result,
    );
    result.map(|(v, _)| Json2(v))
}
