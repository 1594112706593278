//! Extractors whose rejections are problem+json.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// A JSON request body. Malformed JSON and schema violations are 400 with the offending path.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Body(value)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "expected a body with Content-Type: application/json",
            )),
            Err(JsonRejection::JsonDataError(e)) => {
                let detail = e.body_text();
                // axum reports "…target type: <path>: <message> at line …"; keep the path.
                let text = detail.trim_start_matches("Failed to deserialize the JSON body into the target type: ");
                let (path, message) = match text.split_once(": ") {
                    Some((path, message)) if !path.contains(' ') => (format!("$.{path}"), message.to_string()),
                    _ => ("$".to_string(), text.to_string()),
                };
                Err(Problem::invalid_field(path, message))
            }
            Err(e) => Err(Problem::new(StatusCode::BAD_REQUEST, "malformed-json", e.body_text())),
        }
    }
}

/// Path parameters, with problem+json rejections.
pub struct PathParam<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParam<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| PathParam(v))
            .map_err(|e: PathRejection| Problem::new(StatusCode::BAD_REQUEST, "invalid-path", e.body_text()))
    }
}

/// Query parameters, with problem+json rejections.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| QueryParams(v))
            .map_err(|e: QueryRejection| Problem::new(StatusCode::BAD_REQUEST, "invalid-query", e.body_text()))
    }
}

/// How a read is served: `linearizable` (default, confirmed with the leader) or `stale`
/// (this node's replica as it is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    #[default]
    Linearizable,
    Stale,
}
