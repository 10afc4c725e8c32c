//! Firmware images (signed by their manufacturer, never by the head-end) and staged firmware
//! campaigns.
//!
//! Every request that changes something leaves one audit entry of its own (`api.firmware.upload`,
//! `api.campaign.create`, `api.campaign.pause`, `api.campaign.resume`, `api.campaign.cancel`),
//! beside the command service's entries for the acts themselves. A manifest or image that does
//! not verify leaves a `firmware_refused` security event.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gridward_access::Action;
use gridward_command::{CampaignError, CampaignRequest, FirmwareUploadError};
use gridward_core::MeterId;
use gridward_core::firmware::MAX_IMAGE_BYTES;
use gridward_store::{CampaignMember, StoredCampaign, StoredFirmware};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::commands::{
    audit_request, blocking, numeric_id, reader, service, unprocessable, username,
};
use super::meters::Json2;
use super::{Ctx, internal, rfc3339};
use crate::auth::{Caller, Gate};
use crate::extract::{Json, Path};
use crate::problem::Problem;

/// Largest body of a firmware upload: a 16 MiB image and a 4 KiB manifest in base64, with room
/// for the JSON around them.
pub const MAX_FIRMWARE_BODY: usize = 22 * 1024 * 1024 + 64 * 1024;

/// A firmware upload.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FirmwareUploadBody {
    /// The manufacturer-signed manifest (COSE_Sign1), base64 (standard alphabet, padded).
    #[schema(
        content_encoding = "base64",
        pattern = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
    )]
    pub manifest: String,
    /// The image, base64 (standard alphabet, padded), at most 16 MiB decoded.
    #[schema(
        content_encoding = "base64",
        pattern = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
    )]
    pub image: String,
}

impl std::fmt::Debug for FirmwareUploadBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirmwareUploadBody")
            .field("manifest_chars", &self.manifest.len())
            .field("image_chars", &self.image.len())
            .finish()
    }
}

/// A stored firmware image.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FirmwareView {
    /// Its id (what a campaign names).
    pub id: i64,
    /// The manifest's vendor id.
    pub vendor: String,
    /// The manifest's device class id.
    pub class: String,
    /// The version.
    pub version: String,
    /// The manifest's sequence number (meters refuse anything not above the installed one).
    pub sequence: u64,
    /// The image's size in bytes.
    pub size: u64,
    /// SHA-256 of the image (hex).
    pub digest: String,
    /// Who uploaded it.
    pub uploaded_by: String,
    /// When (RFC 3339).
    pub uploaded_at: String,
}

fn firmware_view(f: &StoredFirmware) -> FirmwareView {
    FirmwareView {
        id: f.id,
        vendor: f.vendor_id.clone(),
        class: f.class_id.clone(),
        version: f.version.clone(),
        sequence: f.sequence,
        size: f.size,
        digest: hex::encode(f.digest),
        uploaded_by: f.uploaded_by.clone(),
        uploaded_at: rfc3339(f.uploaded_at),
    }
}

fn decode(name: &str, value: &str) -> Result<Vec<u8>, Problem> {
    STANDARD.decode(value).map_err(|_| {
        Problem::bad_request(format!(
            "{name} must be base64 (standard alphabet with padding)"
        ))
    })
}

/// Maps a refused upload onto a problem; a manifest or image that does not verify is a
/// `firmware_refused` security event.
fn upload_problem(gate: &Gate, caller: &Caller, e: &FirmwareUploadError) -> Problem {
    let refused = |detail: String| {
        gate.ctx.security_event(
            "firmware_refused",
            None,
            gate.source,
            format!(
                "{} uploaded firmware that was refused: {detail}",
                caller.principal.actor_string()
            ),
        );
        unprocessable("firmware_refused", detail)
    };
    match e {
        FirmwareUploadError::Manifest(_) if gate.ctx.manufacturers.is_empty() => refused(format!(
            "{e}; no manufacturer key is configured: add the manufacturer's public key to \
             [firmware] manufacturers and restart"
        )),
        e if e.is_security_refusal() => refused(e.to_string()),
        FirmwareUploadError::Expired(_) | FirmwareUploadError::NoActor => {
            unprocessable("firmware_refused", e.to_string())
        }
        FirmwareUploadError::AlreadyStored => Problem::new(
            StatusCode::CONFLICT,
            "firmware_exists",
            "this image is already uploaded; GET /api/v1/firmware lists it",
        ),
        FirmwareUploadError::Store(e) => internal(e),
        other => {
            tracing::error!(error = %other, "firmware upload failed");
            Problem::internal()
        }
    }
}

/// Uploads a firmware image with its manufacturer-signed manifest: the signature (by a
/// configured manufacturer key, never the head-end's), expiry, size and digest are checked.
#[utoipa::path(post, path = "/api/v1/firmware", tag = "firmware",
    request_body = FirmwareUploadBody,
    responses(
        (status = 201, description = "Stored", body = FirmwareView),
        (status = 400, description = "Malformed body or not base64", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators upload firmware", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "This image is already uploaded", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Manifest not signed by a manufacturer key, expired, or not this image's", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn upload(
    State(_): State<Ctx>,
    gate: Gate,
    Json(body): Json<FirmwareUploadBody>,
) -> Result<Response, Problem> {
    let caller = gate.require(Action::ManageFirmware)?.clone();
    let result = async {
        let commands = service(&gate)?;
        let store = reader(&gate)?;
        let manifest = decode("manifest", &body.manifest)?;
        let image = decode("image", &body.image)?;
        if image.len() as u64 > MAX_IMAGE_BYTES {
            return Err(unprocessable(
                "firmware_refused",
                format!(
                    "the image is {} bytes; at most {MAX_IMAGE_BYTES} are accepted",
                    image.len()
                ),
            ));
        }
        let keys = gate.ctx.manufacturers.clone();
        let actor = username(&caller);
        let stored = blocking(move || {
            let id = commands.upload_firmware(&manifest, &image, &keys, &actor)?;
            Ok::<_, FirmwareUploadError>(store.firmware(id))
        })
        .await?
        .map_err(|e| upload_problem(&gate, &caller, &e))?;
        let view = match stored {
            Ok(Some(f)) => firmware_view(&f),
            Ok(None) => return Err(Problem::internal()),
            Err(e) => return Err(internal(e)),
        };
        let detail = format!(
            "uploaded firmware {}: {}/{} {} sequence {}",
            view.id, view.vendor, view.class, view.version, view.sequence
        );
        Ok((view, detail))
    }
    .await;
    let target = match &result {
        Ok((v, _)) => format!("firmware:{}", v.id),
        Err(_) => String::new(),
    };
    audit_request(&gate, &caller, "api.firmware.upload", &target, &result);
    result.map(|(v, _)| (StatusCode::CREATED, Json2(v)).into_response())
}

/// Every stored firmware image, oldest first.
#[utoipa::path(get, path = "/api/v1/firmware", tag = "firmware",
    responses(
        (status = 200, description = "The stored images", body = Vec<FirmwareView>),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read firmware", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_firmware(
    State(_): State<Ctx>,
    gate: Gate,
) -> Result<Json2<Vec<FirmwareView>>, Problem> {
    gate.require(Action::ReadFirmware)?;
    let store = reader(&gate)?;
    let rows = store.firmwares().map_err(internal)?;
    Ok(Json2(rows.iter().map(firmware_view).collect()))
}

/// One stored firmware image.
#[utoipa::path(get, path = "/api/v1/firmware/{firmware_id}", tag = "firmware",
    params(("firmware_id" = i64, Path, description = "The firmware's id")),
    responses(
        (status = 200, description = "The image's description", body = FirmwareView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read firmware", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such firmware", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_firmware(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<FirmwareView>, Problem> {
    gate.require(Action::ReadFirmware)?;
    let store = reader(&gate)?;
    let id = numeric_id(&raw, "firmware")?;
    let f = store
        .firmware(id)
        .map_err(internal)?
        .ok_or_else(|| Problem::not_found("firmware"))?;
    Ok(Json2(firmware_view(&f)))
}

/// A new campaign.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignBody {
    /// The stored firmware to install.
    pub firmware_id: i64,
    /// The meters, in order, each once; the first `first_stage` are the pilot.
    #[schema(value_type = Vec<super::commands::MeterIdText>, min_items = 1)]
    pub meters: Vec<String>,
    /// Pilot size, 1 to the number of meters (default: 3, or fewer meters).
    #[schema(minimum = 1)]
    pub first_stage: Option<u32>,
    /// Share of the pilot that must install it before the rest follow, 0 to 1 (default 0.9).
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub success_threshold: Option<f64>,
    /// Stage-2 failures tolerated before the campaign pauses (default 1).
    pub max_failures: Option<u32>,
}

/// A campaign member.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MemberView {
    /// The meter.
    pub meter_id: String,
    /// 1 (pilot) or 2 (the rest).
    pub stage: u32,
    /// Its firmware-update command, once issued.
    pub command_id: Option<String>,
    /// That command's status.
    pub command_status: Option<String>,
    /// That command's outcome (refusal code or failure detail).
    pub outcome: Option<String>,
}

/// A campaign, with its members when one campaign is asked for.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CampaignView {
    /// Its id.
    pub id: i64,
    /// The firmware it installs.
    pub firmware_id: i64,
    /// running, paused, completed or cancelled.
    pub state: String,
    /// The current stage: 1 (pilot) or 2 (the rest).
    pub stage: u32,
    /// Pilot size.
    pub first_stage: u32,
    /// Share of the pilot that must succeed.
    pub success_threshold: f64,
    /// Stage-2 failures tolerated.
    pub max_failures: u32,
    /// Who created it.
    pub created_by: String,
    /// When (RFC 3339).
    pub created_at: String,
    /// When its state or stage last changed (RFC 3339).
    pub updated_at: String,
    /// Why it is where it is (e.g. the pause reason).
    pub note: Option<String>,
    /// The members in order (only for one campaign; empty in the list).
    pub members: Vec<MemberView>,
}

fn campaign_view(c: &StoredCampaign, members: &[CampaignMember]) -> CampaignView {
    CampaignView {
        id: c.id,
        firmware_id: c.firmware_id,
        state: c.state.as_str().to_owned(),
        stage: c.stage,
        first_stage: c.first_stage,
        success_threshold: c.success_threshold,
        max_failures: c.max_failures,
        created_by: c.created_by.clone(),
        created_at: rfc3339(c.created_at),
        updated_at: rfc3339(c.updated_at),
        note: c.note.clone(),
        members: members
            .iter()
            .map(|m| MemberView {
                meter_id: m.meter_id.to_string(),
                stage: m.stage,
                command_id: m.command_id.map(|c| c.to_string()),
                command_status: m.status.map(|s| s.as_str().to_owned()),
                outcome: m.outcome.clone(),
            })
            .collect(),
    }
}

/// Campaign `id` with its members, or 404.
fn campaign_with_members(gate: &Gate, id: i64) -> Result<CampaignView, Problem> {
    let store = reader(gate)?;
    let c = store
        .campaign(id)
        .map_err(internal)?
        .ok_or_else(|| Problem::not_found("campaign"))?;
    let members = store.campaign_members(id).map_err(internal)?;
    Ok(campaign_view(&c, &members))
}

fn campaign_problem(e: &CampaignError) -> Problem {
    match e {
        CampaignError::NotFound(_) => Problem::not_found("campaign"),
        CampaignError::WrongState(_) => {
            Problem::new(StatusCode::CONFLICT, "campaign_state", e.to_string())
        }
        CampaignError::NoActor
        | CampaignError::Meters(_)
        | CampaignError::FirmwareNotFound(_)
        | CampaignError::InvalidFirstStage { .. }
        | CampaignError::InvalidThreshold(_)
        | CampaignError::NeedsFourEyes { .. } => unprocessable("invalid_campaign", e.to_string()),
        CampaignError::Store(e) => internal(e),
        other => {
            tracing::error!(error = %other, "a campaign operation failed");
            Problem::internal()
        }
    }
}

/// Creates a campaign and issues its pilot stage at once.
#[utoipa::path(post, path = "/api/v1/campaigns", tag = "firmware",
    request_body = CampaignBody,
    responses(
        (status = 201, description = "Created; the pilot's commands are queued", body = CampaignView),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators run campaigns", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown firmware, bad meter list, pilot size or threshold", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_campaign(
    State(_): State<Ctx>,
    gate: Gate,
    Json(body): Json<CampaignBody>,
) -> Result<Response, Problem> {
    let caller = gate.require(Action::ManageFirmware)?.clone();
    let result = async {
        let commands = service(&gate)?;
        let meters = body
            .meters
            .iter()
            .map(|m| {
                MeterId::new(m).map_err(|e| {
                    unprocessable(
                        "invalid_campaign",
                        format!("meter {:?}: {e}", m.chars().take(70).collect::<String>()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if body
            .success_threshold
            .is_some_and(|t| !(0.0..=1.0).contains(&t))
        {
            return Err(unprocessable(
                "invalid_campaign",
                "success_threshold must be within 0 to 1",
            ));
        }
        let req = CampaignRequest {
            firmware_id: body.firmware_id,
            meters,
            first_stage: body.first_stage,
            success_threshold: body.success_threshold,
            max_failures: body.max_failures,
            actor: username(&caller),
        };
        let id = blocking(move || commands.create_campaign(req))
            .await?
            .map_err(|e| campaign_problem(&e))?;
        let view = campaign_with_members(&gate, id)?;
        let detail = format!(
            "created campaign {id}: firmware {} to {} meters",
            view.firmware_id,
            view.members.len()
        );
        Ok((view, detail))
    }
    .await;
    let target = match &result {
        Ok((v, _)) => format!("campaign:{}", v.id),
        Err(_) => String::new(),
    };
    audit_request(&gate, &caller, "api.campaign.create", &target, &result);
    result.map(|(v, _)| (StatusCode::CREATED, Json2(v)).into_response())
}

/// Every campaign, oldest first (without members: ask for one campaign for those).
#[utoipa::path(get, path = "/api/v1/campaigns", tag = "firmware",
    responses(
        (status = 200, description = "The campaigns", body = Vec<CampaignView>),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read campaigns", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_campaigns(
    State(_): State<Ctx>,
    gate: Gate,
) -> Result<Json2<Vec<CampaignView>>, Problem> {
    gate.require(Action::ReadFirmware)?;
    let store = reader(&gate)?;
    let rows = store.campaigns().map_err(internal)?;
    Ok(Json2(rows.iter().map(|c| campaign_view(c, &[])).collect()))
}

/// One campaign, with its members and their commands' status.
#[utoipa::path(get, path = "/api/v1/campaigns/{campaign_id}", tag = "firmware",
    params(("campaign_id" = i64, Path, description = "The campaign's id")),
    responses(
        (status = 200, description = "The campaign", body = CampaignView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read campaigns", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such campaign", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_campaign(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<CampaignView>, Problem> {
    gate.require(Action::ReadFirmware)?;
    let id = numeric_id(&raw, "campaign")?;
    campaign_with_members(&gate, id).map(Json2)
}

/// What an operator does to a campaign.
#[derive(Debug, Clone, Copy)]
enum Change {
    Pause,
    Resume,
    Cancel,
}

async fn change(gate: Gate, raw: String, what: Change) -> Result<Json2<CampaignView>, Problem> {
    let caller = gate.require(Action::ManageFirmware)?.clone();
    let id = numeric_id(&raw, "campaign")?;
    let (action, verb) = match what {
        Change::Pause => ("api.campaign.pause", "paused"),
        Change::Resume => ("api.campaign.resume", "resumed"),
        Change::Cancel => ("api.campaign.cancel", "cancelled"),
    };
    let result = async {
        let commands = service(&gate)?;
        let actor = username(&caller);
        blocking(move || match what {
            Change::Pause => commands.pause_campaign(id, &actor),
            Change::Resume => commands.resume_campaign(id, &actor),
            Change::Cancel => commands.cancel_campaign(id, &actor),
        })
        .await?
        .map_err(|e| campaign_problem(&e))?;
        let view = campaign_with_members(&gate, id)?;
        Ok((view, format!("{verb} campaign {id}")))
    }
    .await;
    audit_request(&gate, &caller, action, &format!("campaign:{id}"), &result);
    result.map(|(v, _)| Json2(v))
}

/// Pauses a running campaign; its commands not sent yet are withdrawn.
#[utoipa::path(post, path = "/api/v1/campaigns/{campaign_id}/pause", tag = "firmware",
    params(("campaign_id" = i64, Path, description = "The campaign's id")),
    responses(
        (status = 200, description = "Paused", body = CampaignView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators run campaigns", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such campaign", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not running", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn pause_campaign(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<CampaignView>, Problem> {
    change(gate, raw, Change::Pause).await
}

/// Resumes a paused campaign: the members whose command did not succeed get a new one.
#[utoipa::path(post, path = "/api/v1/campaigns/{campaign_id}/resume", tag = "firmware",
    params(("campaign_id" = i64, Path, description = "The campaign's id")),
    responses(
        (status = 200, description = "Running again", body = CampaignView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators run campaigns", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such campaign", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not paused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resume_campaign(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<CampaignView>, Problem> {
    change(gate, raw, Change::Resume).await
}

/// Cancels a running or paused campaign for good; commands not sent yet are withdrawn (sent ones
/// cannot be recalled).
#[utoipa::path(post, path = "/api/v1/campaigns/{campaign_id}/cancel", tag = "firmware",
    params(("campaign_id" = i64, Path, description = "The campaign's id")),
    responses(
        (status = 200, description = "Cancelled", body = CampaignView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators run campaigns", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such campaign", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already completed or cancelled", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Commands are off", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel_campaign(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<CampaignView>, Problem> {
    change(gate, raw, Change::Cancel).await
}
