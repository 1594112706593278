//! Intents: a goal plus constraints becomes a checked plan, then one operation.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use runtimeai_model::{Intent, JsonObject, LifecycleAction, OperationStatus, PolicyDecision, PolicyMode};
use runtimeai_raft::command::SubmitIntent;
use runtimeai_raft::{CommandReply, Op};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Caller, Permission};
use crate::doc_types::{ConsistencyParam, IdempotencyKey, ProblemResponses, TenantId};
use crate::extract::{Body, Consistency, PathParam, QueryParams};
use crate::mutation::{new_id, propose};
use crate::planning::{plan_for, planned, preview_decisions, Ask};
use crate::problem::Problem;
use crate::runtimes::{new_operation, read_runtime, ReadParams};
use crate::views::{ActionResultView, OperationView, PlannedAction};
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(submit_intent)).routes(routes!(get_intent))
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntentRequest {
    pub goal: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub constraints: Map<String, Value>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub context: Map<String, Value>,
    /// How cautiously to plan, and how policies treat actions no rule covers.
    #[serde(default)]
    pub policy_mode: PolicyMode,
    /// Plan only: nothing runs.
    #[serde(default)]
    pub dry_run: bool,
}

/// Where an intent stands, in the words of the seed (a client generated from it knows no
/// others): one waiting for a human's approval is still `accepted`, and says so in
/// `approval_pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IntentStatus {
    /// A dry run, or nothing to do: nothing runs.
    Planned,
    /// Its operation is queued, or waits for approval.
    Accepted,
    Executing,
    Succeeded,
    Failed,
    /// Its operation was cancelled or refused at approval (only in `IntentRecord`).
    Cancelled,
}

impl IntentStatus {
    /// The status of an intent whose plan runs as `operation` (none: a dry run or an empty plan).
    fn of(operation: Option<OperationStatus>) -> IntentStatus {
        match operation {
            None => IntentStatus::Planned,
            Some(OperationStatus::Queued | OperationStatus::PendingApproval) => IntentStatus::Accepted,
            Some(OperationStatus::Running) => IntentStatus::Executing,
            Some(OperationStatus::Succeeded) => IntentStatus::Succeeded,
            Some(OperationStatus::Failed) => IntentStatus::Failed,
            Some(OperationStatus::Cancelled) => IntentStatus::Cancelled,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IntentResponse {
    pub intent_id: String,
    /// The operation carrying the plan out; empty for a dry run or an empty plan (the seed
    /// makes the field a required string).
    pub operation_id: String,
    /// `planned` (dry run or nothing to do) or `accepted`.
    pub status: IntentStatus,
    /// A policy wants a human's approval before anything runs (`POST
    /// /v1/operations/{operation_id}/approve`).
    pub approval_pending: bool,
    pub planned_actions: Vec<PlannedAction>,
    pub rationale: Vec<String>,
    /// Options the constraints ruled out, each naming the constraint.
    pub blocked: Vec<String>,
    pub recommendations: Vec<String>,
    /// The policy decision on each planned action: as made when the operation was accepted, or,
    /// for a dry run, what the policies would decide now.
    pub decisions: Vec<PolicyDecision>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IntentResult {
    pub summary: String,
    pub executed_actions: Vec<ActionResultView>,
    pub rationale: Vec<String>,
    pub blocked: Vec<String>,
    pub recommendations: Vec<String>,
    pub decisions: Vec<PolicyDecision>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IntentRecord {
    pub intent_id: String,
    pub runtime_id: String,
    #[schema(value_type = Object)]
    pub request: Value,
    pub status: IntentStatus,
    /// Its operation waits for a human's approval.
    pub approval_pending: bool,
    pub result: IntentResult,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Submit an intent: planned now, executed as one operation.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/intent", tag = "Intent",
    params(("runtime_id" = String, Path), IdempotencyKey, TenantId), request_body = IntentRequest,
    responses((status = 202, description = "Accepted (planned + executed async)", body = IntentResponse), ProblemResponses))]
pub(crate) async fn submit_intent(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    Body(request): Body<IntentRequest>,
) -> Result<Response, Problem> {
    if !request.dry_run {
        caller.require(Permission::Operate)?;
    }
    let no_signals = Map::new();
    let ask = Ask {
        goal: &request.goal,
        constraints: &request.constraints,
        context: &request.context,
        signals: &no_signals,
        mode: request.policy_mode,
    };
    let (runtime, plan) = plan_for(&state, &caller, &runtime_id, ask).await?;
    let now = chrono::Utc::now();
    let actor = caller.actor();
    let operation = (!request.dry_run && !plan.actions.is_empty()).then(|| {
        let action = LifecycleAction::Sequence { actions: plan.actions.clone() };
        new_operation(&runtime_id, action, runtime.state, now, actor, request.policy_mode)
    });
    let intent = Intent {
        id: new_id("int"),
        runtime_id: runtime_id.clone(),
        operation_id: operation.as_ref().map(|o| o.id.clone()),
        goal: request.goal.clone(),
        constraints: JsonObject(request.constraints.clone()),
        context: JsonObject(request.context.clone()),
        policy_mode: request.policy_mode,
        dry_run: request.dry_run,
        planned: plan.actions.clone(),
        rationale: plan.rationale.clone(),
        blocked: plan.blocked.clone(),
        recommendations: plan.recommendations.clone(),
        created_at: now,
        version: 1,
    };
    match propose(&state, &caller, &request, Op::SubmitIntent(SubmitIntent { intent, operation })).await? {
        CommandReply::Intent { intent, operation } => {
            let operation_status = operation.as_ref().map(|o| o.status);
            let decisions = match &operation {
                Some(operation) => operation.decisions.clone(),
                None => preview_decisions(&state, &caller, &runtime, &intent.planned, intent.policy_mode)?,
            };
            let response = IntentResponse {
                intent_id: intent.id,
                status: IntentStatus::of(operation_status),
                approval_pending: operation_status == Some(OperationStatus::PendingApproval),
                decisions,
                operation_id: operation.map(|o| o.id).unwrap_or_default(),
                planned_actions: planned(&intent.planned),
                rationale: intent.rationale,
                blocked: intent.blocked,
                recommendations: intent.recommendations,
            };
            Ok((StatusCode::ACCEPTED, Json(response)).into_response())
        }
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// An intent with what ran and what to consider next.
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/intent/{intent_id}", tag = "Intent",
    params(("runtime_id" = String, Path), ("intent_id" = String, Path), ConsistencyParam, TenantId),
    responses((status = 200, description = "OK", body = IntentRecord), ProblemResponses))]
pub(crate) async fn get_intent(
    State(state): State<AppState>,
    caller: Caller,
    PathParam((runtime_id, intent_id)): PathParam<(String, String)>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<IntentRecord>, Problem> {
    params.consistency.prepare(&state.replica).await?;
    // Another tenant's runtime hides its intents; a deleted runtime's intents stay readable.
    if let Err(hidden) = read_runtime(&state, &caller, &runtime_id, Consistency::Stale).await {
        if state.replica.state().get_runtime(&runtime_id)?.is_some() {
            return Err(hidden);
        }
    }
    let not_found = || Problem::not_found(format!("intent {intent_id} not found on runtime {runtime_id}"));
    let intent =
        state.replica.state().get_intent(&intent_id)?.filter(|i| i.runtime_id == runtime_id).ok_or_else(not_found)?;
    let operation = match &intent.operation_id {
        Some(id) => state.replica.state().get_operation(id)?,
        None => None,
    };
    let view = operation.as_ref().map(OperationView::from);
    let operation_status = operation.as_ref().map(|o| o.status);
    let planned = intent.planned.len();
    let summary = match operation_status {
        // Retention removes an intent before its operation; this is for safety's sake.
        None if intent.operation_id.is_some() => format!("{planned} action(s) planned; operation gone"),
        None if planned == 0 => "nothing to do".to_string(),
        None => format!("{planned} action(s) planned, not executed (dry run)"),
        Some(OperationStatus::Succeeded) => format!("{planned} action(s) executed"),
        Some(other) => format!("{planned} action(s) planned; operation {}", other.as_str()),
    };
    let request = serde_json::json!({
        "goal": intent.goal, "constraints": intent.constraints.0, "context": intent.context.0,
        "policy_mode": intent.policy_mode, "dry_run": intent.dry_run,
    });
    let decisions = operation.as_ref().map(|o| o.decisions.clone()).unwrap_or_default();
    Ok(Json(IntentRecord {
        intent_id: intent.id,
        runtime_id: intent.runtime_id,
        request,
        status: IntentStatus::of(operation_status),
        approval_pending: operation_status == Some(OperationStatus::PendingApproval),
        result: IntentResult {
            summary,
            executed_actions: view.and_then(|v| v.results).unwrap_or_default(),
            rationale: intent.rationale,
            blocked: intent.blocked,
            recommendations: intent.recommendations,
            decisions,
        },
        created_at: intent.created_at,
        finished_at: operation.and_then(|o| o.finished_at),
    }))
}
