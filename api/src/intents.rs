//! Intents (a goal plus constraints becomes a checked plan, then an operation) and
//! `actions/plan` (the same planner, without execution).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use runtimeai_engine::planner::{self, PlanError, PlanInput, UNDERSTOOD_GOALS};
use runtimeai_model::{Intent, JsonObject, LifecycleAction, OperationStatus, PolicyDecision, PolicyMode};
use runtimeai_raft::{CommandReply, Op};

use crate::auth::{Caller, Permission};
use crate::doc_types::{ConsistencyParam, IdempotencyKey, ProblemResponses, TenantId};
use crate::extract::{Body, Consistency, PathParam, QueryParams};
use crate::mutation::{new_id, propose};
use crate::problem::{FieldError, Problem};
use crate::runtimes::{new_operation, read_runtime, sizes, ReadParams};
use crate::views::{ActionResultView, OperationView};
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/runtimes/{runtime_id}/intent", post(submit_intent))
        .route("/v1/runtimes/{runtime_id}/intent/{intent_id}", get(get_intent))
        .route("/v1/runtimes/{runtime_id}/actions/plan", post(plan_actions))
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

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionPlanRequest {
    pub goal: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub signals: Map<String, Value>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub constraints: Map<String, Value>,
    #[serde(default)]
    pub policy_mode: PolicyMode,
}

/// One planned action, in the shape `actions/execute` takes.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlannedAction {
    #[serde(rename = "type")]
    pub action_type: &'static str,
    #[schema(value_type = Object)]
    pub params: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActionPlan {
    pub actions: Vec<PlannedAction>,
    pub rationale: Vec<String>,
    /// Options the constraints ruled out, each naming the constraint.
    pub blocked: Vec<String>,
    pub recommendations: Vec<String>,
    /// What the policies would decide on each action if it were executed now (by the same
    /// actor, in the same mode).
    pub decisions: Vec<PolicyDecision>,
}

/// What the policies would decide on `actions` now: a preview for plans that do not run.
fn preview_decisions(
    state: &AppState,
    caller: &Caller,
    runtime: &runtimeai_model::Runtime,
    actions: &[LifecycleAction],
    mode: PolicyMode,
) -> Result<Vec<PolicyDecision>, Problem> {
    let policies = state.replica.state.list_policies()?;
    let sizes = sizes(state);
    let actor = caller.actor();
    let request = runtimeai_engine::policy::Request { runtime, actions, actor: &actor, mode, sizes: &sizes };
    Ok(runtimeai_engine::policy::evaluate(&policies, request))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IntentResponse {
    pub intent_id: String,
    /// The operation carrying the plan out; absent for a dry run or an empty plan.
    pub operation_id: Option<String>,
    /// `planned` (dry run or nothing to do), `accepted`, or `pending_approval` (a policy wants
    /// a human: `POST /v1/operations/{id}/approve`).
    pub status: &'static str,
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
    /// `planned`, `pending_approval`, `accepted`, `executing`, `succeeded`, `failed` or
    /// `cancelled`.
    pub status: &'static str,
    pub result: IntentResult,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn planned(actions: &[LifecycleAction]) -> Vec<PlannedAction> {
    actions.iter().map(|a| PlannedAction { action_type: a.kind(), params: crate::views::action_params(a) }).collect()
}

/// A planner error as the client sees it: 422 naming the goals or constraints at fault.
fn plan_problem(error: PlanError, goal: &str) -> Problem {
    match error {
        PlanError::NotUnderstood => {
            let mut problem = Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "goal-not-understood",
                format!("the planner does not understand {goal:?}; it understands: {}", UNDERSTOOD_GOALS.join("; ")),
            );
            problem.errors.push(FieldError { path: "$.goal".into(), message: "not understood".into() });
            problem
        }
        PlanError::BadConstraint(path, message) => Problem::invalid_field(path, message),
        PlanError::Blocked(reasons) => {
            let mut problem = Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "blocked-by-constraint",
                format!("no plan satisfies the constraints: {}", reasons.join("; ")),
            );
            problem.errors.push(FieldError { path: "$.constraints".into(), message: reasons.join("; ") });
            problem
        }
    }
}

/// Plans a goal: the deterministic planner, or, for a goal it does not understand, the
/// external planner when one is configured (its plan checked against the same constraints).
async fn plan_goal(state: &AppState, input: PlanInput<'_>) -> Result<planner::Plan, Problem> {
    let mut plan = match (planner::plan(input), &state.external_planner) {
        (Err(PlanError::NotUnderstood), Some(external)) => {
            let proposed =
                external.plan(input.runtime, input.goal, input.constraints, input.context, input.sizes).await?;
            let violations = planner::check_plan(input, &proposed.actions).map_err(|e| plan_problem(e, input.goal))?;
            if !violations.is_empty() {
                return Err(plan_problem(PlanError::Blocked(violations), input.goal));
            }
            let model = external.model();
            planner::Plan {
                actions: proposed.actions,
                rationale: proposed.rationale.into_iter().map(|r| format!("external planner ({model}): {r}")).collect(),
                blocked: Vec::new(),
                recommendations: vec![format!(
                    "this plan came from the external planner ({model}); review it, the policies still apply"
                )],
            }
        }
        (result, _) => result.map_err(|e| plan_problem(e, input.goal))?,
    };
    // Snapshots get their ids here, where ids are made.
    for action in &mut plan.actions {
        if let LifecycleAction::Snapshot { snapshot_id, .. } = action {
            *snapshot_id = new_id("snap");
        }
    }
    Ok(plan)
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
    caller.policy_mode(Some(request.policy_mode))?;
    let runtime = read_runtime(&state, &caller, &runtime_id, Consistency::Linearizable).await?;
    let sizes = sizes(&state);
    let no_signals = Map::new();
    let plan = plan_goal(
        &state,
        PlanInput {
            runtime: &runtime,
            goal: &request.goal,
            constraints: &request.constraints,
            context: &request.context,
            signals: &no_signals,
            mode: request.policy_mode,
            sizes: &sizes,
        },
    )
    .await?;
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
    match propose(&state, &caller, &request, Op::SubmitIntent { intent, operation }).await? {
        CommandReply::Intent { intent, operation } => {
            let status = match operation.as_ref().map(|o| o.status) {
                None => "planned",
                Some(OperationStatus::PendingApproval) => "pending_approval",
                Some(_) => "accepted",
            };
            let decisions = match &operation {
                Some(operation) => operation.decisions.clone(),
                None => preview_decisions(&state, &caller, &runtime, &intent.planned, intent.policy_mode)?,
            };
            let response = IntentResponse {
                intent_id: intent.id,
                status,
                decisions,
                operation_id: operation.map(|o| o.id),
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
        if state.replica.state.get_runtime(&runtime_id)?.is_some() {
            return Err(hidden);
        }
    }
    let not_found = || Problem::not_found(format!("intent {intent_id} not found on runtime {runtime_id}"));
    let intent =
        state.replica.state.get_intent(&intent_id)?.filter(|i| i.runtime_id == runtime_id).ok_or_else(not_found)?;
    let operation = match &intent.operation_id {
        Some(id) => state.replica.state.get_operation(id)?,
        None => None,
    };
    let view = operation.as_ref().map(OperationView::from);
    let status = match operation.as_ref().map(|o| o.status) {
        // Its operation is past the cluster's retention.
        None if intent.operation_id.is_some() => "expired",
        None => "planned",
        Some(OperationStatus::PendingApproval) => "pending_approval",
        Some(OperationStatus::Queued) => "accepted",
        Some(OperationStatus::Running) => "executing",
        Some(s) => s.as_str(),
    };
    let summary = match status {
        "planned" if intent.planned.is_empty() => "nothing to do".to_string(),
        "planned" => format!("{} action(s) planned, not executed (dry run)", intent.planned.len()),
        "succeeded" => format!("{} action(s) executed", intent.planned.len()),
        other => format!("{} action(s) planned; operation {other}", intent.planned.len()),
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
        status,
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

/// Ask for a plan (no execution).
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/actions/plan", tag = "Actions",
    params(("runtime_id" = String, Path), TenantId), request_body = ActionPlanRequest,
    responses((status = 200, description = "Action plan", body = ActionPlan), ProblemResponses))]
pub(crate) async fn plan_actions(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    Body(request): Body<ActionPlanRequest>,
) -> Result<Json<ActionPlan>, Problem> {
    caller.policy_mode(Some(request.policy_mode))?;
    let runtime = read_runtime(&state, &caller, &runtime_id, Consistency::Linearizable).await?;
    let sizes = sizes(&state);
    let no_context = Map::new();
    let plan = plan_goal(
        &state,
        PlanInput {
            runtime: &runtime,
            goal: &request.goal,
            constraints: &request.constraints,
            context: &no_context,
            signals: &request.signals,
            mode: request.policy_mode,
            sizes: &sizes,
        },
    )
    .await?;
    let decisions = preview_decisions(&state, &caller, &runtime, &plan.actions, request.policy_mode)?;
    Ok(Json(ActionPlan {
        decisions,
        actions: planned(&plan.actions),
        rationale: plan.rationale,
        blocked: plan.blocked,
        recommendations: plan.recommendations,
    }))
}
