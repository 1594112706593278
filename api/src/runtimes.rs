//! The Runtime resource (create and read; the full lifecycle API builds on this).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use runtimeai_model::{Actor, Runtime, RuntimeSpec, RuntimeState, RuntimeType};
use runtimeai_raft::{Command, CommandReply, Op};

use crate::extract::{Body, Consistency, PathParam, QueryParams};
use crate::problem::Problem;
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/runtimes", get(list_runtimes).post(create_runtime))
        .route("/v1/runtimes/{runtime_id}", get(get_runtime))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeCreateRequest {
    pub name: String,
    #[serde(rename = "type")]
    pub runtime_type: RuntimeType,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub spec: RuntimeSpec,
}

#[derive(Debug, Deserialize, Default)]
pub struct ReadParams {
    #[serde(default)]
    pub consistency: Consistency,
}

#[derive(Debug, Serialize)]
pub struct RuntimeList {
    pub items: Vec<Runtime>,
    pub next_page_token: Option<String>,
}

/// The `tenant_id` header, which scopes list and get (a principal's tenant replaces it once
/// authentication lands).
fn tenant_header(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    match headers.get("tenant_id") {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| Problem::invalid_field("tenant_id", "header must be visible ASCII")),
    }
}

/// Names follow Kubernetes' DNS label rule, so a runtime's name can name its backend objects.
fn validate_name(name: &str) -> Result<(), Problem> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(Problem::invalid_field(
            "$.name",
            "must be 1-63 characters of lowercase letters, digits and '-', starting and ending with a letter or digit",
        ))
    }
}

fn with_etag(status: StatusCode, runtime: Runtime) -> Response {
    let mut response = (status, Json(&runtime)).into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("\"{}\"", runtime.version)) {
        response.headers_mut().insert(header::ETAG, value);
    }
    if status == StatusCode::CREATED {
        if let Ok(value) = HeaderValue::from_str(&format!("/v1/runtimes/{}", runtime.id)) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    response
}

async fn create_runtime(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(request): Body<RuntimeCreateRequest>,
) -> Result<Response, Problem> {
    validate_name(&request.name)?;
    let tenant_id = request.tenant_id.or(tenant_header(&headers)?);
    let now = chrono::Utc::now();
    let runtime = Runtime {
        id: format!("rt_{}", ulid::Ulid::new().to_string().to_lowercase()),
        name: request.name,
        runtime_type: request.runtime_type,
        state: RuntimeState::Creating,
        tenant_id,
        labels: request.labels,
        capabilities: Vec::new(),
        backend: None,
        spec: request.spec,
        created_at: now,
        updated_at: None,
        version: 1,
    };
    let command =
        Command { at: now, actor: Actor::Human("api".into()), idempotency: None, op: Op::CreateRuntime { runtime } };
    match state.replica.propose(command).await? {
        CommandReply::Runtime(runtime) => Ok(with_etag(StatusCode::CREATED, runtime)),
        CommandReply::Rejected(rejection) => Err(rejection.into()),
        other => {
            Err(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected reply {other:?}")))
        }
    }
}

async fn get_runtime(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Response, Problem> {
    let tenant = tenant_header(&headers)?;
    if params.consistency == Consistency::Linearizable {
        state.replica.read_barrier().await?;
    }
    match state.replica.state.get_runtime(&runtime_id)? {
        Some(runtime) if tenant.is_none() || runtime.tenant_id == tenant => Ok(with_etag(StatusCode::OK, runtime)),
        _ => Err(Problem::not_found(format!("runtime {runtime_id} not found"))),
    }
}

async fn list_runtimes(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<RuntimeList>, Problem> {
    let tenant = tenant_header(&headers)?;
    if params.consistency == Consistency::Linearizable {
        state.replica.read_barrier().await?;
    }
    let items = state
        .replica
        .state
        .list_runtimes()?
        .into_iter()
        .filter(|r| tenant.is_none() || r.tenant_id == tenant)
        .collect();
    Ok(Json(RuntimeList { items, next_page_token: None }))
}
