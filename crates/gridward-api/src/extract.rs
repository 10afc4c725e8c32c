//! axum's JSON, query and path extractors with their rejections as problem documents, so a
//! malformed request gets the same `application/problem+json` as every other refusal.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use http::StatusCode;
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// A JSON body (`Content-Type: application/json`); unknown fields are refused by the types
/// (`#[serde(deny_unknown_fields)]`), the size by the router's body limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => Err(json_problem(&e)),
        }
    }
}

fn json_problem(e: &JsonRejection) -> Problem {
    match e {
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        JsonRejection::BytesRejection(_) => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than the API accepts",
        ),
        other => Problem::bad_request(format!("the JSON body is not valid: {}", other.body_text())),
    }
}

/// A query string.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(e) => Err(query_problem(&e)),
        }
    }
}

fn query_problem(e: &QueryRejection) -> Problem {
    Problem::bad_request(format!("the query string is not valid: {}", e.body_text()))
}

/// Path parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Self(v)),
            Err(e) => Err(path_problem(&e)),
        }
    }
}

fn path_problem(e: &PathRejection) -> Problem {
    Problem::bad_request(format!("the path is not valid: {}", e.body_text()))
}

/// An optional JSON body: no body at all (or `null`) is `None`; a body must be JSON
/// (`Content-Type: application/json`) and is refused like [`Json`]'s otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalJson<T>(pub Option<T>);

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim();
                v.eq_ignore_ascii_case("application/json")
                    || (v.starts_with("application/") && v.ends_with("+json"))
            });
        let body = bytes::Bytes::from_request(req, state).await.map_err(|_| {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is larger than the API accepts",
            )
        })?;
        if body.is_empty() {
            return Ok(Self(None));
        }
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json, or send no body",
            ));
        }
        serde_json::from_slice::<Option<T>>(&body)
            .map(Self)
            .map_err(|e| Problem::bad_request(format!("the JSON body is not valid: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        reason: Option<String>,
    }

    async fn optional(content_type: Option<&str>, body: &str) -> Result<Option<Body>, Problem> {
        let mut req = http::Request::builder().method("POST").uri("/x");
        if let Some(ct) = content_type {
            req = req.header(http::header::CONTENT_TYPE, ct);
        }
        let req = req.body(axum::body::Body::from(body.to_owned())).unwrap();
        OptionalJson::<Body>::from_request(req, &())
            .await
            .map(|b| b.0)
    }

    #[tokio::test]
    async fn an_optional_body_is_absent_null_or_json() {
        assert!(optional(None, "").await.unwrap().is_none());
        assert!(
            optional(Some("application/json"), "")
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            optional(Some("application/json"), "null")
                .await
                .unwrap()
                .is_none()
        );
        let b = optional(Some("application/json; charset=utf-8"), r#"{"reason":"r"}"#)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.reason.as_deref(), Some("r"));
        assert_eq!(
            optional(Some("text/plain"), "because")
                .await
                .unwrap_err()
                .status,
            415
        );
        assert_eq!(optional(None, "{}").await.unwrap_err().status, 415);
        assert_eq!(
            optional(Some("application/json"), "{")
                .await
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            optional(Some("application/json"), r#"{"force":true}"#)
                .await
                .unwrap_err()
                .status,
            400
        );
    }
}
