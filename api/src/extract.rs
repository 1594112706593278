//! Extractors and request helpers whose failures are problem+json: bodies, paths, queries, and
//! the headers every mutation reads (tenant, `If-Match`, `Idempotency-Key`).

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// A JSON request body. Malformed JSON is 400, a schema violation 400 with the JSON path of the
/// offending field, a body over the limit 413, another media type 415.
pub struct Body<T>(pub T);

/// Like [`Body`], but an empty body, or JSON `null`, means `T::default()` (for optional request
/// bodies).
pub struct OptionalBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let (json, bytes) = read_body(req, state).await?;
        if !json {
            return Err(unsupported_media_type());
        }
        parse(&bytes).map(Body)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let (json, bytes) = read_body(req, state).await?;
        if bytes.is_empty() {
            return Ok(OptionalBody(T::default()));
        }
        if !json {
            return Err(unsupported_media_type());
        }
        parse::<Option<T>>(&bytes).map(|body| OptionalBody(body.unwrap_or_default()))
    }
}

fn unsupported_media_type() -> Problem {
    Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "expected Content-Type: application/json",
    )
}

/// Reads the body (bounded by the router's body limit) and says whether it is declared JSON.
async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<(bool, Bytes), Problem> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || v == "application/merge-patch+json" || v.ends_with("+json")
        })
        .unwrap_or(false);
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "the request body is over the size limit")
        } else {
            Problem::new(StatusCode::BAD_REQUEST, "unreadable-body", e.body_text())
        }
    })?;
    Ok((json, bytes))
}

/// `bytes` as a `T`. A whole number written with a fraction (`30.0`) is the integer it equals, as
/// JSON Schema counts it: only when reading the body as written fails on such a number is it read
/// again with those numbers made integers (so the common case costs one pass).
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let error = match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(value) => return Ok(value),
        Err(error) => error,
    };
    if error.inner().to_string().starts_with("invalid type: floating point") {
        if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(bytes) {
            whole_numbers_as_integers(&mut value);
            return serde_path_to_error::deserialize(value).map_err(refusal);
        }
    }
    Err(refusal(error))
}

fn refusal(error: serde_path_to_error::Error<serde_json::Error>) -> Problem {
    let path = error.path().to_string();
    let inner = error.into_inner();
    if inner.is_syntax() || inner.is_eof() {
        Problem::new(StatusCode::BAD_REQUEST, "malformed-json", format!("malformed JSON: {inner}"))
    } else {
        let path = if path == "." { "$".to_string() } else { format!("$.{path}") };
        Problem::invalid_field(path, inner.to_string())
    }
}

/// Replaces every number in `value` that is a whole number within 64 bits (`30.0`) by the integer.
pub(crate) fn whole_numbers_as_integers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(number) => {
            if let Some(float) = number.as_f64().filter(|f| number.is_f64() && f.fract() == 0.0) {
                if float >= 0.0 && float < u64::MAX as f64 {
                    *number = (float as u64).into();
                } else if float < 0.0 && float >= i64::MIN as f64 {
                    *number = (float as i64).into();
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
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

impl Consistency {
    /// Makes this node's replica fit for the read: for `linearizable`, waits until it reflects
    /// every write acknowledged before the request.
    pub async fn prepare(self, replica: &runtimeai_raft::Replica) -> Result<(), Problem> {
        if self == Consistency::Linearizable {
            replica.read_barrier().await?;
        }
        Ok(())
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Problem> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| Problem::invalid_field(name.to_string(), "header must be visible ASCII")),
    }
}

/// The `tenant_id` header: which of the principal's tenants a request acts in (see
/// [`crate::auth::Caller`]).
pub fn tenant(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    Ok(header_text(headers, "tenant_id")?.or(header_text(headers, "tenant-id")?).map(str::to_string))
}

/// The version an `If-Match` header requires (`"3"`, `W/"3"`; `*` for any, and an empty one, an
/// empty list of tags in RFC 9110's terms, asks for nothing either).
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, Problem> {
    let Some(value) = header_text(headers, "if-match")? else { return Ok(None) };
    let value = value.trim();
    if value == "*" || value.is_empty() {
        return Ok(None);
    }
    value
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map(Some)
        .map_err(|_| Problem::invalid_field("If-Match", "expected an ETag such as \"3\""))
}

/// The `Idempotency-Key` header, if any (1 to 255 visible characters).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    match header_text(headers, "idempotency-key")? {
        None => Ok(None),
        Some(key) if !key.is_empty() && key.len() <= 255 => Ok(Some(key.to_string())),
        Some(_) => Err(Problem::invalid_field("Idempotency-Key", "must be 1 to 255 characters")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Stop {
        #[serde(default)]
        timeout_seconds: Option<u64>,
        #[serde(default)]
        replicas: Option<i64>,
    }

    #[test]
    fn a_whole_number_written_with_a_fraction_is_that_integer() {
        let stop: Stop = parse(br#"{"timeout_seconds": 30.0, "replicas": -2.0}"#).unwrap();
        assert_eq!(stop, Stop { timeout_seconds: Some(30), replicas: Some(-2) });
        for refused in [r#"{"timeout_seconds": 30.5}"#, r#"{"timeout_seconds": -1.0}"#, r#"{"timeout_seconds": 1e300}"#]
        {
            let problem = parse::<Stop>(refused.as_bytes()).unwrap_err();
            assert_eq!((problem.status, problem.errors[0].path.as_str()), (400, "$.timeout_seconds"), "{refused}");
        }
    }

    #[test]
    fn an_optional_body_may_be_null_and_a_required_one_may_not() {
        let none: Option<Stop> = parse(b"null").unwrap();
        assert_eq!(none.unwrap_or_default(), Stop::default());
        assert_eq!(parse::<Stop>(b"null").unwrap_err().status, 400);
    }

    #[test]
    fn an_empty_if_match_asks_for_no_version_and_a_bad_one_is_refused() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("if-match", value.parse().unwrap());
            headers
        };
        assert_eq!(if_match(&headers("")).unwrap(), None);
        assert_eq!(if_match(&headers("*")).unwrap(), None);
        assert_eq!(if_match(&headers("W/\"7\"")).unwrap(), Some(7));
        assert_eq!(if_match(&headers("seven")).unwrap_err().status, 400);
    }
}
