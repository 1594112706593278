//! Types that exist to describe the API in its OpenAPI document: the headers and query
//! parameters many endpoints share, and the errors any endpoint may answer with. Handlers name
//! them in their `#[utoipa::path]`; `openapi.rs` gathers the handlers.

use utoipa::{IntoParams, IntoResponses};

use crate::problem::Problem;

/// `If-Match`: the ETag (version) a change expects; 412 when the resource moved on.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatch {
    /// An ETag such as `"3"`, or `*` (or empty) for any version.
    #[param(rename = "If-Match", nullable = false, pattern = r#"^(|\*|(W/)?"[0-9]{1,19}")$"#)]
    pub if_match: Option<String>,
}

/// `Idempotency-Key`: a retry with the same key and request gets the first reply, on any node.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// 1 to 255 characters, unique per intended change; remembered for 24 hours.
    #[param(rename = "Idempotency-Key", nullable = false, pattern = "^[!-~]{1,255}$")]
    pub idempotency_key: Option<String>,
}

/// `tenant_id`: scopes reads and lists to one tenant.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
pub struct TenantId {
    /// Optional tenant identifier for multi-tenancy (visible ASCII, as every header we read).
    #[param(nullable = false, pattern = "^[!-~]{1,255}$")]
    pub tenant_id: Option<String>,
}

/// `consistency`: `linearizable` (default) or `stale` (this node's replica as it is).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsistencyParam {
    #[param(inline, value_type = Option<String>, pattern = "^(linearizable|stale)$")]
    pub consistency: Option<String>,
}

/// The errors any endpoint may answer with, as RFC 9457 problems.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ProblemResponses {
    /// Malformed JSON or a schema violation (with the JSON path of the field).
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No such resource (or another tenant's).
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// Illegal state transition, name clash, operation in progress; what the runtime as it is
    /// cannot do (an action its backend lacks, a call only sandboxes take, a plan the
    /// constraints block).
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(Problem),
    /// `If-Match` does not match the current version.
    #[response(status = 412, content_type = "application/problem+json")]
    PreconditionFailed(Problem),
    /// No credentials, or credentials that are not valid (with `WWW-Authenticate`).
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The principal may not: no role grants it, an agent's mode forbids it, a tenant not
    /// granted, or a policy denies the action.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// The body is over the size limit.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// The body is not JSON.
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Problem),
    /// Semantically invalid value (unknown size, negative replicas, reused idempotency key).
    #[response(status = 422, content_type = "application/problem+json")]
    Unprocessable(Problem),
    /// Past the client's request rate; retry after `Retry-After` seconds.
    #[response(status = 429, content_type = "application/problem+json")]
    TooManyRequests(Problem),
    /// No leader or no quorum right now, or the node is shedding load; retry after
    /// `Retry-After` seconds.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
    /// Not answered within the node's request timeout (a write may still take effect: retry it
    /// with the same `Idempotency-Key`).
    #[response(status = 504, content_type = "application/problem+json")]
    Timeout(Problem),
}

/// A file's bytes as they are (`application/octet-stream`): a binary string, not a JSON array.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct FileBytes(Vec<u8>);
