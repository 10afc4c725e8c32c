//! The concentrator topology: which meters are registered behind which data concentrator (a
//! concentrator relays only for those). Operators and auditors read it; operators change it,
//! and every change leaves an audit entry (`concentrator.topology`, target
//! `concentrator:{id}`, with the counts).

use std::collections::BTreeSet;

use axum::extract::State;
use gridward_access::Action;
use gridward_core::MeterId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::alarms::alarm_store;
use super::commands::{MeterIdText, audit_request, blocking, unprocessable};
use super::meters::Json2;
use super::{Ctx, internal};
use crate::auth::Gate;
use crate::extract::{Json, Path};
use crate::problem::Problem;

/// Most meter ids one change may name (attach and detach together).
pub const MAX_TOPOLOGY_CHANGE: usize = 10_000;

/// A concentrator and the meters registered behind it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConcentratorView {
    /// The concentrator's id (its certificate's `urn:gridward:concentrator:{id}`).
    pub concentrator_id: String,
    /// Its meters, by id.
    pub meters: Vec<String>,
}

/// A change of the meters behind a concentrator. A meter attached here that is registered
/// behind another concentrator moves; detaching a meter that is not here changes nothing.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopologyChange {
    /// Meters to register behind the concentrator.
    #[serde(default)]
    #[schema(value_type = Vec<MeterIdText>)]
    pub attach: Vec<String>,
    /// Meters to remove from behind it.
    #[serde(default)]
    #[schema(value_type = Vec<MeterIdText>)]
    pub detach: Vec<String>,
}

/// What a change did, and the meters behind the concentrator after it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopologyChanged {
    /// The concentrator's id.
    pub concentrator_id: String,
    /// Attached meters that were not behind it before (new or moved from another one).
    pub attached: u64,
    /// Detached meters that were behind it.
    pub detached: u64,
    /// Its meters now, by id.
    pub meters: Vec<String>,
}

/// Parses a concentrator id from the path; a malformed one is simply not found.
fn concentrator_id(raw: &str) -> Result<MeterId, Problem> {
    MeterId::new(raw).map_err(|_| Problem::not_found("concentrator"))
}

/// The checked meter lists of a change: every id valid (400 naming the first that is not),
/// each once, none both attached and detached, not the concentrator itself, not empty, at most
/// [`MAX_TOPOLOGY_CHANGE`].
fn checked(
    concentrator: &MeterId,
    change: TopologyChange,
) -> Result<(Vec<MeterId>, Vec<MeterId>), Problem> {
    let total = change.attach.len().saturating_add(change.detach.len());
    if total > MAX_TOPOLOGY_CHANGE {
        return Err(unprocessable(
            "too_many_meters",
            format!("the change names {total} meters; at most {MAX_TOPOLOGY_CHANGE} per request"),
        ));
    }
    if total == 0 {
        return Err(unprocessable(
            "nothing_to_change",
            "name the meters to attach and/or detach",
        ));
    }
    let parse = |field: &str, ids: Vec<String>| -> Result<BTreeSet<MeterId>, Problem> {
        ids.iter()
            .map(|raw| {
                MeterId::new(raw).map_err(|e| {
                    Problem::bad_request(format!("{field}: {raw:?} is not a meter id: {e}"))
                })
            })
            .collect()
    };
    let attach = parse("attach", change.attach)?;
    let detach = parse("detach", change.detach)?;
    if let Some(both) = attach.intersection(&detach).next() {
        return Err(unprocessable(
            "conflicting_change",
            format!("meter {both} is both attached and detached"),
        ));
    }
    if attach.contains(concentrator) || detach.contains(concentrator) {
        return Err(unprocessable(
            "conflicting_change",
            format!("{concentrator} is the concentrator itself, not a meter behind it"),
        ));
    }
    Ok((attach.into_iter().collect(), detach.into_iter().collect()))
}

/// Every concentrator with at least one meter registered behind it, by id.
#[utoipa::path(get, path = "/api/v1/concentrators", tag = "topology",
    responses(
        (status = 200, description = "The concentrators and their meters", body = Vec<ConcentratorView>),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read the topology", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No alarm store", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_concentrators(
    State(_): State<Ctx>,
    gate: Gate,
) -> Result<Json2<Vec<ConcentratorView>>, Problem> {
    gate.require(Action::ReadTopology)?;
    let store = alarm_store(&gate)?;
    let pairs = blocking(move || store.topology())
        .await?
        .map_err(internal)?;
    let mut out: Vec<ConcentratorView> = Vec::new();
    for (concentrator, meter) in pairs {
        match out.last_mut() {
            Some(last) if last.concentrator_id == concentrator.as_str() => {
                last.meters.push(meter.to_string());
            }
            _ => out.push(ConcentratorView {
                concentrator_id: concentrator.to_string(),
                meters: vec![meter.to_string()],
            }),
        }
    }
    Ok(Json2(out))
}

/// The meters registered behind one concentrator (none for an unknown one).
#[utoipa::path(get, path = "/api/v1/concentrators/{concentrator_id}/meters", tag = "topology",
    params(("concentrator_id" = String, Path, description = "The concentrator's id")),
    responses(
        (status = 200, description = "Its meters, by id", body = ConcentratorView),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators and auditors read the topology", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a concentrator id", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No alarm store", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn concentrator_meters(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
) -> Result<Json2<ConcentratorView>, Problem> {
    gate.require(Action::ReadTopology)?;
    let store = alarm_store(&gate)?;
    let id = concentrator_id(&raw)?;
    let c = id.clone();
    let meters = blocking(move || store.concentrator_meters(&c))
        .await?
        .map_err(internal)?;
    Ok(Json2(ConcentratorView {
        concentrator_id: id.to_string(),
        meters: meters.iter().map(ToString::to_string).collect(),
    }))
}

/// Attaches meters to a concentrator and detaches others; answers with its meters after the
/// change.
#[utoipa::path(put, path = "/api/v1/concentrators/{concentrator_id}/meters", tag = "topology",
    params(("concentrator_id" = String, Path, description = "The concentrator's id")),
    request_body = TopologyChange,
    responses(
        (status = 200, description = "Changed; the meters behind it now", body = TopologyChanged),
        (status = 400, description = "Malformed body, or a meter id that is not one", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid credential", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Only operators change the topology", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not a concentrator id", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Nothing to change, more than 10,000 meters, or a meter both attached and detached", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No alarm store", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn change_meters(
    State(_): State<Ctx>,
    gate: Gate,
    Path(raw): Path<String>,
    Json(body): Json<TopologyChange>,
) -> Result<Json2<TopologyChanged>, Problem> {
    let caller = gate.require(Action::ManageTopology)?.clone();
    let id = concentrator_id(&raw)?;
    let result = async {
        let store = alarm_store(&gate)?;
        let (attach, detach) = checked(&id, body)?;
        let (asked_attach, asked_detach) = (attach.len(), detach.len());
        let at = gate.ctx.now();
        let c = id.clone();
        let (attached, detached, meters) = blocking(move || {
            let detached = if detach.is_empty() {
                0
            } else {
                store.detach_meters(&c, &detach)?
            };
            let attached = if attach.is_empty() {
                0
            } else {
                store.attach_meters(&c, &attach, at)?
            };
            Ok::<_, gridward_store::StoreError>((
                attached,
                detached,
                store.concentrator_meters(&c)?,
            ))
        })
        .await?
        .map_err(internal)?;
        let detail = format!(
            "attach {asked_attach} ({attached} changed), detach {asked_detach} ({detached} were \
             there); {} meters behind it now",
            meters.len()
        );
        let view = TopologyChanged {
            concentrator_id: id.to_string(),
            attached,
            detached,
            meters: meters.iter().map(ToString::to_string).collect(),
        };
        Ok((view, detail))
    }
    .await;
    audit_request(
        &gate,
        &caller,
        "concentrator.topology",
        &format!("concentrator:{id}"),
        &result,
    );
    result.map(|(v, _)| Json2(v))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn change(attach: &[&str], detach: &[&str]) -> TopologyChange {
        TopologyChange {
            attach: attach.iter().map(|s| (*s).to_owned()).collect(),
            detach: detach.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn changes_are_checked() {
        let dc = MeterId::new("dc-1").unwrap();
        let (a, d) = checked(&dc, change(&["m2", "m1", "m1"], &["m3"])).unwrap();
        assert_eq!(a.len(), 2, "each once");
        assert_eq!(d.len(), 1);
        assert_eq!(
            checked(&dc, change(&["bad id"], &[])).unwrap_err().status,
            400
        );
        assert_eq!(checked(&dc, change(&[], &[".x"])).unwrap_err().status, 400);
        assert_eq!(checked(&dc, change(&[], &[])).unwrap_err().status, 422);
        assert_eq!(
            checked(&dc, change(&["m1"], &["m1"])).unwrap_err().status,
            422
        );
        assert_eq!(
            checked(&dc, change(&["dc-1"], &[])).unwrap_err().status,
            422
        );
        let many: Vec<String> = (0..=MAX_TOPOLOGY_CHANGE).map(|i| format!("m{i}")).collect();
        let too_many = TopologyChange {
            attach: many,
            detach: vec![],
        };
        assert_eq!(checked(&dc, too_many).unwrap_err().status, 422);
    }
}
