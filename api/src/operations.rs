//! Asynchronous operations: follow one, cancel one.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};

use runtimeai_model::{Operation, OperationStatus};
use runtimeai_raft::{CommandReply, Op};

use crate::extract::{tenant, Consistency, PathParam, QueryParams};
use crate::mutation::propose;
use crate::openapi::{ConsistencyParam, IdempotencyKey, ProblemResponses, TenantId, XActor};
use crate::problem::Problem;
use crate::runtimes::ReadParams;
use crate::views::OperationView;
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/operations/{operation_id}", get(get_operation))
        .route("/v1/operations/{operation_id}/cancel", post(cancel_operation))
}

/// Reads an operation, hidden (404) from another tenant when its runtime still exists.
async fn read_operation(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    consistency: Consistency,
) -> Result<Operation, Problem> {
    consistency.prepare(&state.replica).await?;
    let not_found = || Problem::not_found(format!("operation {id} not found"));
    let operation = state.replica.state.get_operation(id)?.ok_or_else(not_found)?;
    if let Some(tenant) = tenant(headers)? {
        if let Some(runtime) = state.replica.state.get_runtime(&operation.runtime_id)? {
            if runtime.tenant_id.as_deref() != Some(tenant.as_str()) {
                return Err(not_found());
            }
        }
    }
    Ok(operation)
}

/// Follow an operation: `queued → running → succeeded | failed | cancelled`, with progress.
#[utoipa::path(get, path = "/v1/operations/{operation_id}", tag = "Operations",
    params(("operation_id" = String, Path), ConsistencyParam, TenantId),
    responses((status = 200, description = "OK", body = OperationView), ProblemResponses))]
pub(crate) async fn get_operation(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(operation_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<OperationView>, Problem> {
    let operation = read_operation(&state, &headers, &operation_id, params.consistency).await?;
    Ok(Json(OperationView::from(&operation)))
}

/// Cancels a queued or running operation; the runtime returns to the state it had. A finished
/// operation cannot be cancelled (409).
#[utoipa::path(post, path = "/v1/operations/{operation_id}/cancel", tag = "Operations",
    params(("operation_id" = String, Path), IdempotencyKey, TenantId, XActor),
    responses((status = 200, description = "Cancelled", body = OperationView), ProblemResponses))]
pub(crate) async fn cancel_operation(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(operation_id): PathParam<String>,
) -> Result<Json<OperationView>, Problem> {
    read_operation(&state, &headers, &operation_id, Consistency::Linearizable).await?;
    let op = Op::AdvanceOperation {
        operation_id: operation_id.clone(),
        status: OperationStatus::Cancelled,
        progress: None,
        error: None,
    };
    match propose(&state, &headers, &format!("POST /v1/operations/{operation_id}/cancel"), &(), op).await? {
        CommandReply::Operation(operation) => Ok(Json(OperationView::from(&operation))),
        other => Err(Problem::unexpected_reply(other)),
    }
}
