//! Errors as RFC 9457 problem details (`application/problem+json`).
//!
//! Every refusal the API gives is a [`Problem`]: a stable `type` URI per kind of problem, the
//! HTTP status, a short `title`, and a `detail` written for the caller. Internal causes (a store
//! error, a file path) are logged, never sent.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;

/// The media type of a problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The prefix of every problem `type` URI; the suffix is the problem's code.
pub const TYPE_PREFIX: &str = "urn:gridward:problem:";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Problem {
    /// `urn:gridward:problem:{code}`, stable per kind of problem.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request and what to do next.
    pub detail: String,
}

impl Problem {
    /// A problem with a status, a stable code and a detail for the caller.
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            type_uri: format!("{TYPE_PREFIX}{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
        }
    }

    /// The code: the `type` URI without its prefix.
    pub fn code(&self) -> &str {
        self.type_uri
            .strip_prefix(TYPE_PREFIX)
            .unwrap_or(&self.type_uri)
    }

    /// 401: no credential, or one that is not valid (never says which part was wrong).
    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "log in (POST /api/v1/session) and send the session token as \
             `Authorization: Bearer …`, or present an API client certificate",
        )
    }

    /// 403: authenticated, but the role may not do this.
    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "your role may not do this; ask an administrator if you need it",
        )
    }

    /// 404: no such resource (also what a consumer sees for another consumer's meter).
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such {what}"),
        )
    }

    /// 400 with a detail about the request.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    /// 500: something failed inside; the cause is logged, not sent.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the head-end could not complete the request; it was logged, try again later",
        )
    }

    /// 503: a dependency (the store) is unavailable.
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the head-end cannot serve this now; try again later",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(self)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"gridward\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_problem_is_rfc_9457_json() {
        let response = Problem::forbidden().into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "urn:gridward:problem:forbidden");
        assert_eq!(v["status"], 403);
        assert_eq!(v["title"], "Forbidden");
        assert!(v["detail"].as_str().unwrap().contains("administrator"));
    }
}
