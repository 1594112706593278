//! Asynchronous operations: follow one, cancel one, approve or reject one a policy parked in
//! `pending_approval`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use runtimeai_model::Operation;
use runtimeai_raft::{CommandReply, Op};

use crate::extract::{tenant, Body, Consistency, OptionalBody, PathParam, QueryParams};
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
        .route("/v1/operations/{operation_id}/approve", post(approve_operation))
        .route("/v1/operations/{operation_id}/reject", post(reject_operation))
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
    let op = Op::CancelOperation { operation_id: operation_id.clone() };
    match propose(&state, &headers, &format!("POST /v1/operations/{operation_id}/cancel"), &(), op).await? {
        CommandReply::Operation(operation) => Ok(Json(OperationView::from(&operation))),
        other => Err(Problem::unexpected_reply(other)),
    }
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    /// Why (required to reject; recorded with the decision and its event).
    #[serde(default)]
    pub reason: Option<String>,
}

async fn decide(
    state: &AppState,
    headers: &HeaderMap,
    operation_id: &str,
    approve: bool,
    request: &ApprovalRequest,
) -> Result<Json<OperationView>, Problem> {
    read_operation(state, headers, operation_id, Consistency::Linearizable).await?;
    let verb = if approve { "approve" } else { "reject" };
    let op = Op::DecideApproval { operation_id: operation_id.to_string(), approve, reason: request.reason.clone() };
    match propose(state, headers, &format!("POST /v1/operations/{operation_id}/{verb}"), request, op).await? {
        CommandReply::Operation(operation) => Ok(Json(OperationView::from(&operation))),
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// Approves an operation in `pending_approval`: it is queued and runs (after the policies are
/// checked once more). The approver is the `X-Actor`; an agent cannot approve its own request
/// (403).
#[utoipa::path(post, path = "/v1/operations/{operation_id}/approve", tag = "Operations",
    params(("operation_id" = String, Path), IdempotencyKey, TenantId, XActor),
    request_body(content = Option<ApprovalRequest>),
    responses((status = 200, description = "Approved: queued", body = OperationView), ProblemResponses))]
pub(crate) async fn approve_operation(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(operation_id): PathParam<String>,
    OptionalBody(request): OptionalBody<ApprovalRequest>,
) -> Result<Json<OperationView>, Problem> {
    decide(&state, &headers, &operation_id, true, &request).await
}

/// Rejects an operation in `pending_approval`, with a reason: it ends `cancelled` and the
/// runtime stays as it was.
#[utoipa::path(post, path = "/v1/operations/{operation_id}/reject", tag = "Operations",
    params(("operation_id" = String, Path), IdempotencyKey, TenantId, XActor),
    request_body = ApprovalRequest,
    responses((status = 200, description = "Rejected: cancelled", body = OperationView), ProblemResponses))]
pub(crate) async fn reject_operation(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(operation_id): PathParam<String>,
    Body(request): Body<ApprovalRequest>,
) -> Result<Json<OperationView>, Problem> {
    if request.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return Err(Problem::invalid_field("$.reason", "a rejection needs a reason"));
    }
    decide(&state, &headers, &operation_id, false, &request).await
}
