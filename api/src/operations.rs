//! Asynchronous operations: list the unfinished ones (what waits for approval), follow one,
//! cancel one, approve or reject one a policy parked in `pending_approval`.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use runtimeai_model::{Operation, OperationStatus};
use runtimeai_raft::command::{CancelOperation, DecideApproval};
use runtimeai_raft::{CommandReply, Op};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::doc_types::{ConsistencyParam, IdempotencyKey, ProblemResponses, TenantId};
use crate::extract::{Body, Consistency, OptionalBody, PathParam, QueryParams};
use crate::mutation::propose;
use crate::problem::Problem;
use crate::runtimes::ReadParams;
use crate::views::OperationView;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_operations))
        .routes(routes!(get_operation))
        .routes(routes!(cancel_operation))
        .routes(routes!(approve_operation))
        .routes(routes!(reject_operation))
        .routes(routes!(operation_stream))
}

/// Reads an operation, hidden (404) from another tenant: its runtime's, or, once the runtime is
/// deleted, visible to principals of every tenant only.
pub(crate) async fn read_operation(
    state: &AppState,
    caller: &Caller,
    id: &str,
    consistency: Consistency,
) -> Result<Operation, Problem> {
    consistency.prepare(&state.replica).await?;
    let not_found = || Problem::not_found(format!("operation {id} not found"));
    let operation = state.replica.state().get_operation(id)?.ok_or_else(not_found)?;
    let runtime = state.replica.state().get_runtime(&operation.runtime_id)?;
    let tenant = runtime.as_ref().and_then(|r| r.tenant_id.as_deref());
    if !caller.sees(tenant) {
        return Err(not_found());
    }
    Ok(operation)
}

/// Which unfinished operations to list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OperationListParams {
    /// Only operations in this status: `pending_approval` is what waits for a decision.
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(queued|pending_approval|running)$")]
    pub status: Option<OperationStatus>,
    /// Only this runtime's.
    #[serde(default)]
    pub runtime_id: Option<String>,
    /// At most this many, oldest first (1 to 1000, default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(linearizable|stale)$")]
    pub consistency: Consistency,
}

/// Unfinished operations (named apart from a runtime's paged `OperationList`).
#[derive(Debug, Serialize, ToSchema)]
pub struct UnfinishedOperations {
    pub items: Vec<OperationView>,
}

/// The operations not finished yet (queued, waiting for approval, running) that the caller
/// sees, oldest first: `?status=pending_approval` is what waits for someone to approve or
/// reject it (nobody decides on their own request).
#[utoipa::path(get, path = "/v1/operations", tag = "Operations", params(OperationListParams, TenantId),
    responses((status = 200, description = "OK", body = UnfinishedOperations), ProblemResponses))]
pub(crate) async fn list_operations(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<OperationListParams>,
) -> Result<Json<UnfinishedOperations>, Problem> {
    let limit = crate::events::page_limit(params.limit)?;
    if params.status.is_some_and(|status| status.is_terminal()) {
        return Err(Problem::invalid_field(
            "status",
            "only unfinished operations are listed: queued, pending_approval or running",
        ));
    }
    params.consistency.prepare(&state.replica).await?;
    let reader = state.replica.state();
    let mut unfinished = reader.active_operations_where(|operation| {
        params.status.is_none_or(|status| operation.status == status)
            && params.runtime_id.as_ref().is_none_or(|id| *id == operation.runtime_id)
    });
    unfinished.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let mut items = Vec::new();
    for operation in unfinished {
        let runtime = reader.get_runtime(&operation.runtime_id)?;
        if caller.sees(runtime.as_ref().and_then(|r| r.tenant_id.as_deref())) {
            items.push(OperationView::from(&operation));
            if items.len() == limit {
                break;
            }
        }
    }
    Ok(Json(UnfinishedOperations { items }))
}

/// Follow an operation: `queued → running → succeeded | failed | cancelled`, with progress.
#[utoipa::path(get, path = "/v1/operations/{operation_id}", tag = "Operations",
    params(("operation_id" = String, Path), ConsistencyParam, TenantId),
    responses((status = 200, description = "OK", body = OperationView), ProblemResponses))]
pub(crate) async fn get_operation(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(operation_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<OperationView>, Problem> {
    let operation = read_operation(&state, &caller, &operation_id, params.consistency).await?;
    Ok(Json(OperationView::from(&operation)))
}

/// Follow an operation as server-sent events: the operation (as `GET` shows it) each time it
/// changes, its `id` the operation's version, until it has ended. Resumes after
/// `Last-Event-ID` on any node; a comment every 15 s keeps the connection alive.
#[utoipa::path(get, path = "/v1/operations/{operation_id}/stream", tag = "Operations",
    params(("operation_id" = String, Path), StreamParams, TenantId),
    responses((status = 200, description = "Server-sent events", content_type = "text/event-stream", body = String),
        ProblemResponses))]
pub(crate) async fn operation_stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    PathParam(operation_id): PathParam<String>,
    QueryParams(params): QueryParams<StreamParams>,
) -> Result<
    axum::response::sse::Sse<impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>>,
    Problem,
> {
    read_operation(&state, &caller, &operation_id, Consistency::Linearizable).await?;
    let deadline = crate::events::stream_deadline(params.timeout_seconds)?;
    let seen = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let applied = state.replica.state().watch_applied();
    let follow = (state, operation_id, seen.unwrap_or(0), applied, false);
    let stream = futures::stream::unfold(follow, move |(state, id, seen, mut applied, ended)| async move {
        if ended {
            return None;
        }
        loop {
            applied.mark_unchanged();
            let operation = state.replica.state().get_operation(&id).ok()??;
            if operation.version > seen {
                let ended = operation.status.is_terminal();
                let data = serde_json::to_string(&OperationView::from(&operation)).unwrap_or_default();
                let event = axum::response::sse::Event::default()
                    .id(operation.version.to_string())
                    .event(operation.status.as_str())
                    .data(data);
                return Some((Ok(event), (state, id, operation.version, applied, ended)));
            }
            if operation.status.is_terminal() {
                return None;
            }
            crate::events::more_applied(&mut applied, deadline).await?;
        }
    });
    Ok(crate::events::sse(stream))
}

/// A stream's parameters.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamParams {
    /// End the stream after this many seconds (1 to 86400; by default when the operation ends).
    #[serde(default)]
    #[param(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<u64>,
}

/// Cancels a queued or running operation; the runtime returns to the state it had. A finished
/// operation cannot be cancelled (409).
#[utoipa::path(post, path = "/v1/operations/{operation_id}/cancel", tag = "Operations",
    params(("operation_id" = String, Path), IdempotencyKey, TenantId),
    responses((status = 200, description = "Cancelled", body = OperationView), ProblemResponses))]
pub(crate) async fn cancel_operation(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(operation_id): PathParam<String>,
) -> Result<Json<OperationView>, Problem> {
    read_operation(&state, &caller, &operation_id, Consistency::Linearizable).await?;
    let op = Op::CancelOperation(CancelOperation { operation_id: operation_id.clone() });
    match propose(&state, &caller, &(), op).await? {
        CommandReply::Operation(operation) => Ok(Json(OperationView::from(&operation))),
        other => Err(Problem::unexpected_reply(other)),
    }
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    /// Why (recorded with the decision and its event).
    #[serde(default)]
    pub reason: Option<String>,
}

/// A rejection, which always says why.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectionRequest {
    /// Why (recorded with the decision and its event): not blank.
    #[schema(min_length = 1, pattern = r"\S")]
    pub reason: String,
}

async fn decide(
    state: &AppState,
    caller: &Caller,
    operation_id: &str,
    approve: bool,
    request: &ApprovalRequest,
) -> Result<Json<OperationView>, Problem> {
    read_operation(state, caller, operation_id, Consistency::Linearizable).await?;
    let op = Op::DecideApproval(DecideApproval {
        operation_id: operation_id.to_string(),
        approve,
        reason: request.reason.clone(),
    });
    match propose(state, caller, request, op).await? {
        CommandReply::Operation(operation) => Ok(Json(OperationView::from(&operation))),
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// Approves an operation in `pending_approval`: it is queued and runs (after the policies are
/// checked once more). The approver is the `X-Actor`; an agent cannot approve its own request
/// (403).
#[utoipa::path(post, path = "/v1/operations/{operation_id}/approve", tag = "Operations",
    params(("operation_id" = String, Path), IdempotencyKey, TenantId),
    request_body(content = Option<ApprovalRequest>),
    responses((status = 200, description = "Approved: queued", body = OperationView), ProblemResponses))]
pub(crate) async fn approve_operation(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(operation_id): PathParam<String>,
    OptionalBody(request): OptionalBody<ApprovalRequest>,
) -> Result<Json<OperationView>, Problem> {
    decide(&state, &caller, &operation_id, true, &request).await
}

/// Rejects an operation in `pending_approval`, with a reason: it ends `cancelled` and the
/// runtime stays as it was.
#[utoipa::path(post, path = "/v1/operations/{operation_id}/reject", tag = "Operations",
    params(("operation_id" = String, Path), IdempotencyKey, TenantId),
    request_body = RejectionRequest,
    responses((status = 200, description = "Rejected: cancelled", body = OperationView), ProblemResponses))]
pub(crate) async fn reject_operation(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(operation_id): PathParam<String>,
    Body(request): Body<RejectionRequest>,
) -> Result<Json<OperationView>, Problem> {
    if request.reason.trim().is_empty() {
        return Err(Problem::invalid_field("$.reason", "a rejection needs a reason"));
    }
    decide(&state, &caller, &operation_id, false, &ApprovalRequest { reason: Some(request.reason) }).await
}
