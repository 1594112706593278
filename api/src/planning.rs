//! Planning a goal for a runtime, shared by intents and `actions/plan`: the deterministic
//! planner (or the external one for goals it does not understand), the planned actions in the
//! shape `actions/execute` takes, and what the policies would decide on them.

use axum::http::StatusCode;
use serde_json::Value;

use runtimeai_engine::planner::{self, PlanError, PlanInput, UNDERSTOOD_GOALS};
use runtimeai_model::{LifecycleAction, PolicyDecision, PolicyMode};

use crate::auth::Caller;
use crate::extract::Consistency;
use crate::mutation::new_id;
use crate::problem::{FieldError, Problem};
use crate::runtimes::{read_runtime, sizes};
use crate::views::PlannedAction;
use crate::AppState;

/// What the policies would decide on `actions` now: a preview for plans that do not run.
pub(crate) fn preview_decisions(
    state: &AppState,
    caller: &Caller,
    runtime: &runtimeai_model::Runtime,
    actions: &[LifecycleAction],
    mode: PolicyMode,
) -> Result<Vec<PolicyDecision>, Problem> {
    let policies = state.replica.state().list_policies()?;
    let sizes = sizes(state);
    let actor = caller.actor();
    let request = runtimeai_engine::policy::Request { runtime, actions, actor: &actor, mode, sizes: &sizes };
    Ok(runtimeai_engine::policy::evaluate(&policies, request))
}

pub(crate) fn planned(actions: &[LifecycleAction]) -> Vec<PlannedAction> {
    actions.iter().map(PlannedAction::of).collect()
}

/// A planner error as the client sees it: 422 naming the goal or constraint at fault; 409 when
/// the request is sound but no way from the runtime as it is now meets the constraints.
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
                StatusCode::CONFLICT,
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
pub(crate) async fn plan_goal(state: &AppState, input: PlanInput<'_>) -> Result<planner::Plan, Problem> {
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

/// What a planning request asks for a runtime: the parts intents and `actions/plan` share.
pub(crate) struct Ask<'a> {
    pub goal: &'a str,
    pub constraints: &'a serde_json::Map<String, Value>,
    /// An intent's context (none for a plan request).
    pub context: &'a serde_json::Map<String, Value>,
    /// A plan request's signals (none for an intent: the runtime's own are used).
    pub signals: &'a serde_json::Map<String, Value>,
    pub mode: PolicyMode,
}

/// The runtime `runtime_id` as the caller may see it now, and the plan for `ask` on it (after
/// checking the caller may ask for that policy mode).
pub(crate) async fn plan_for(
    state: &AppState,
    caller: &Caller,
    runtime_id: &str,
    ask: Ask<'_>,
) -> Result<(runtimeai_model::Runtime, planner::Plan), Problem> {
    caller.policy_mode(Some(ask.mode))?;
    let runtime = read_runtime(state, caller, runtime_id, Consistency::Linearizable).await?;
    let sizes = sizes(state);
    let input = PlanInput {
        runtime: &runtime,
        goal: ask.goal,
        constraints: ask.constraints,
        context: ask.context,
        signals: ask.signals,
        mode: ask.mode,
        sizes: &sizes,
    };
    let plan = plan_goal(state, input).await?;
    Ok((runtime, plan))
}
