//! The routes, registered once with [`utoipa_axum`] so the router and the OpenAPI document
//! cannot drift apart: every route the router serves is in the document, and the access table
//! test walks the document.

pub mod alarms;
pub mod audit;
pub mod commands;
pub mod export;
pub mod firmware;
pub mod meters;
pub mod ops;
pub mod session;
pub mod topology;
pub mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use http::StatusCode;
use time::OffsetDateTime;
use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use crate::problem::Problem;
use crate::state::ApiContext;

/// The state every handler gets.
pub type Ctx = Arc<ApiContext>;

/// Largest request body the API reads (but see [`MAX_BULK_BODY`] and
/// [`firmware::MAX_FIRMWARE_BODY`]).
pub const MAX_BODY: usize = 16 * 1024;

/// Largest body of a command to many meters (`POST /api/v1/commands`, `POST
/// /api/v1/campaigns`): room for tens of thousands of meter ids.
pub const MAX_BULK_BODY: usize = 2 * 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Gridward head-end API",
        description = "Meters, readings, security events, commands, four-eyes proposals, firmware, \
                       campaigns, alarms, the concentrator topology, users and the audit log of a Gridward head-end. Authenticate with a session (POST /api/v1/session, then \
                       `Authorization: Bearer`) or an API client certificate; see docs/access-table.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&Security),
    tags(
        (name = "health", description = "Liveness and readiness, no credential"),
        (name = "session", description = "Logging in and out"),
        (name = "meters", description = "Meters, readings, meter events"),
        (name = "security", description = "Security events and the outbox"),
        (name = "commands", description = "Signed commands to meters and four-eyes proposals (operators send and decide, auditors read)"),
        (name = "firmware", description = "Manufacturer-signed firmware and staged campaigns (operators manage, auditors read)"),
        (name = "alarms", description = "Alarms of the detectors: tamper, outages, theft suspicion, intrusion (operators acknowledge and clear, auditors read)"),
        (name = "topology", description = "Which meters are registered behind which data concentrator (operators change, auditors read)"),
        (name = "users", description = "Users (administrators)"),
        (name = "audit", description = "The tamper-evident audit log (auditors)"),
    )
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(
                crate::auth::SESSION_COOKIE,
            ))),
        );
        components.add_security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "A client certificate with an API role (gridward pki issue client --role)"
                        .into(),
                ),
                extensions: None,
                deprecated: None,
            },
        );
    }
}

/// Every route, with its OpenAPI description.
fn api_router() -> OpenApiRouter<Ctx> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(session::login, session::whoami, session::logout))
        .routes(routes!(meters::list_meters))
        .routes(routes!(meters::get_meter))
        .routes(routes!(meters::readings))
        .routes(routes!(meters::meter_events))
        .routes(routes!(export::my_export))
        .routes(routes!(commands::send_to_meter))
        .routes(
            routes!(commands::list_commands, commands::send_bulk)
                .layer(DefaultBodyLimit::max(MAX_BULK_BODY)),
        )
        .routes(routes!(commands::get_command))
        .routes(routes!(commands::list_proposals))
        .routes(routes!(commands::get_proposal))
        .routes(routes!(commands::approve))
        .routes(routes!(commands::reject))
        .routes(
            routes!(firmware::list_firmware, firmware::upload)
                .layer(DefaultBodyLimit::max(firmware::MAX_FIRMWARE_BODY)),
        )
        .routes(routes!(firmware::get_firmware))
        .routes(
            routes!(firmware::list_campaigns, firmware::create_campaign)
                .layer(DefaultBodyLimit::max(MAX_BULK_BODY)),
        )
        .routes(routes!(firmware::get_campaign))
        .routes(routes!(firmware::pause_campaign))
        .routes(routes!(firmware::resume_campaign))
        .routes(routes!(firmware::cancel_campaign))
        .routes(routes!(alarms::list_alarms))
        .routes(routes!(alarms::get_alarm))
        .routes(routes!(alarms::acknowledge))
        .routes(routes!(alarms::clear))
        .routes(routes!(topology::list_concentrators))
        .routes(
            routes!(topology::concentrator_meters, topology::change_meters)
                .layer(DefaultBodyLimit::max(MAX_BULK_BODY)),
        )
        .routes(routes!(ops::security_events))
        .routes(routes!(ops::outbox))
        .routes(routes!(users::list, users::create))
        .routes(routes!(users::disable))
        .routes(routes!(users::enable))
        .routes(routes!(users::reset_password))
        .routes(routes!(users::set_role))
        .routes(routes!(users::enroll_totp))
        .routes(routes!(audit::entries))
        .routes(routes!(audit::checkpoint))
}

/// The router and its OpenAPI document.
pub fn router_and_doc(ctx: Ctx) -> (Router, utoipa::openapi::OpenApi) {
    let (router, doc) = api_router().split_for_parts();
    let json = openapi_text(&doc);
    let router = router
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let json = json.clone();
                async move { ([(http::header::CONTENT_TYPE, "application/json")], json) }
            }),
        )
        .fallback(|| async { Problem::not_found("route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
            .into_response()
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn(request_span))
        .with_state(ctx);
    (router, doc)
}

/// One span per request (method, route, peer) and one event with its status and duration; the
/// path is the route template (`/api/v1/meters/{meter_id}`), never the query, which may hold a
/// meter id, and never a header (credentials).
async fn request_span(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "(no route)".to_owned(), |p| p.as_str().to_owned());
    let peer = request
        .extensions()
        .get::<crate::auth::ConnInfo>()
        .map(|c| c.peer.to_string())
        .unwrap_or_default();
    let span = tracing::info_span!("api_request", method = %request.method(), route = %route, peer = %peer);
    async move {
        let started = std::time::Instant::now();
        let response = next.run(request).await;
        tracing::debug!(
            status = response.status().as_u16(),
            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "answered"
        );
        response
    }
    .instrument(span)
    .await
}

/// Headers on every answer: HTTPS only from now on (HSTS), no content sniffing, no framing,
/// and nothing cached unless a handler says otherwise (answers carry personal data).
async fn security_headers(mut response: axum::response::Response) -> axum::response::Response {
    use http::HeaderValue;
    use http::header;
    let h = response.headers_mut();
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// The OpenAPI document as served and as committed in `docs/openapi.json`.
pub fn openapi_json() -> String {
    openapi_text(&api_router().split_for_parts().1)
}

fn openapi_text(doc: &utoipa::openapi::OpenApi) -> String {
    let mut json = doc.to_pretty_json().unwrap_or_default();
    json.push('\n');
    json
}

/// A store failure: logged, answered as 503.
pub(crate) fn internal(e: impl std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "store failed while serving the API");
    Problem::unavailable()
}

/// RFC 3339 in UTC.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
