//! The agents' deterministic contract: `POST /v1/runtimes/{id}/actions/plan` proposes a list of
//! actions for a goal (nothing runs), `POST /v1/runtimes/{id}/actions/execute` runs a list of
//! actions, in order, as one operation. Every action is checked before anything is queued:
//! its parameters against its schema, its type against the runtime's capabilities, the whole
//! sequence against the transition table, each action against the policies (in apply).

use axum::extract::State;
use axum::http::HeaderValue;
use axum::response::Response;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use runtimeai_model::{
    ActionKind, Capability, LifecycleAction, Placement, PolicyDecision, PolicyMode, RuntimePolicy, SizeEntry, Webhook,
};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::doc_types::{IdempotencyKey, IfMatch, ProblemResponses, TenantId};
use crate::extract::{Body, Consistency, PathParam};
use crate::migration::{can_migrate, Destinations, LifecycleMigrateRequest};
use crate::planning::{plan_for, planned, preview_decisions, Ask};
use crate::problem::Problem;
use crate::runtimes::{
    begin_in_mode, read_runtime, sizes, LifecycleRestoreRequest, LifecycleScaleRequest, LifecycleSnapshotRequest,
    LifecycleStartRequest, LifecycleStopRequest,
};
use crate::views::{OperationView, PlannedAction};
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(plan_actions)).routes(routes!(execute_actions))
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
    let no_context = Map::new();
    let ask = Ask {
        goal: &request.goal,
        constraints: &request.constraints,
        context: &no_context,
        signals: &request.signals,
        mode: request.policy_mode,
    };
    let (runtime, plan) = plan_for(&state, &caller, &runtime_id, ask).await?;
    let decisions = preview_decisions(&state, &caller, &runtime, &plan.actions, request.policy_mode)?;
    Ok(Json(ActionPlan {
        decisions,
        actions: planned(&plan.actions),
        rationale: plan.rationale,
        blocked: plan.blocked,
        recommendations: plan.recommendations,
    }))
}

/// The seed's action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionType {
    Start,
    Stop,
    Restart,
    Scale,
    Snapshot,
    Restore,
    Migrate,
    /// A rolling restart of a vcluster's control plane.
    RolloutRestart,
    /// Sets the runtime's own policy: a floor on the mode its actions are judged in, a budget
    /// (`params`: `{"mode": "safe_first", "max_cost_per_hour": 0.2}`; an absent field clears it).
    TunePolicy,
    AttachObserver,
    DetachObserver,
    /// Beside the seed's: freeze a running runtime with its memory, and thaw it.
    Pause,
    Resume,
}

impl ActionType {
    /// The lifecycle action of a type whose only parameter is a reason, as for `start`.
    fn plain(self) -> Option<LifecycleAction> {
        Some(match self {
            ActionType::Start => LifecycleAction::Start,
            ActionType::Restart => LifecycleAction::Restart,
            ActionType::RolloutRestart => LifecycleAction::RolloutRestart,
            ActionType::Pause => LifecycleAction::Pause,
            ActionType::Resume => LifecycleAction::Resume,
            _ => return None,
        })
    }
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Action {
    #[serde(rename = "type")]
    pub action_type: ActionType,
    /// What the action is aimed at besides the runtime: `migrate` takes `{"node": <node id>}`
    /// (its destination; by default the cluster chooses); other actions take none.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub target: Option<serde_json::Map<String, serde_json::Value>>,
    /// The action's parameters, as the matching lifecycle call takes them.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionExecutionRequest {
    /// 1 to 20 actions, run in order; a failure skips the rest. A `migrate` runs alone.
    #[schema(min_items = 1, max_items = 20)]
    pub actions: Vec<Action>,
    /// Same as the `Idempotency-Key` header.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// How policies treat actions no rule covers; by default `safe_first` for agents and
    /// `balanced` for humans.
    #[serde(default)]
    pub policy_mode: Option<PolicyMode>,
}

/// Parses an action's parameters as the schema of its lifecycle call.
fn params<T: DeserializeOwned + Default>(action: &Action, index: usize) -> Result<T, Problem> {
    match &action.params {
        None => Ok(T::default()),
        Some(map) => {
            let mut params = serde_json::Value::Object(map.clone());
            // As for a body: `30.0` is the integer 30.
            crate::extract::whole_numbers_as_integers(&mut params);
            serde_path_to_error::deserialize(params).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." { String::new() } else { format!(".{path}") };
                Problem::invalid_field(format!("$.actions[{index}].params{field}"), e.into_inner().to_string())
            })
        }
    }
}

/// An action the runtime cannot take (409: the request is well formed, the runtime's backend
/// lacks the capability).
fn unsupported(index: usize, what: &str) -> Problem {
    Problem::unsupported_action(format!("$.actions[{index}].type"), what)
}

/// Where a `migrate` action may take the runtime: the destination for a requested node (or
/// the cluster's choice), or why there is none.
pub(crate) type Destination<'a> = &'a dyn Fn(Option<u64>, &str) -> Result<Placement, Problem>;

/// The subscription an `attach_observer` action makes (at `path`), or why it cannot.
pub(crate) type Observer<'a> = &'a dyn Fn(ObserverAttachRequest, &str) -> Result<Webhook, Problem>;

/// `attach_observer`'s parameters: a webhook scoped to the runtime (see `POST /v1/webhooks`).
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObserverAttachRequest {
    /// Where its events are POSTed, signed (as for `POST /v1/webhooks`).
    #[schema(max_length = 2048, pattern = "^https?://[^\\s]+$")]
    pub url: String,
    /// Event types or families (`operation.*`), at most 32; all of the runtime's when empty.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub event_types: Vec<String>,
    #[serde(default)]
    pub min_severity: Option<runtimeai_model::EventSeverity>,
    #[serde(default)]
    #[schema(max_length = 256)]
    pub description: Option<String>,
    /// The signing secret (`whsec_` and the base64 of 24 to 64 bytes); made when absent, and
    /// read with `GET /v1/webhooks/{id}/secret`.
    #[serde(default)]
    #[schema(pattern = "^whsec_[A-Za-z0-9+/]{32,88}={0,2}$")]
    pub secret: Option<String>,
}

/// `detach_observer`'s parameters.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObserverDetachRequest {
    /// The observer's webhook id (`attach_observer`'s operation names it).
    pub webhook_id: String,
}

/// Turns one requested action into what the operation will run.
pub(crate) fn lifecycle_action(
    action: &Action,
    index: usize,
    capabilities: &[Capability],
    sizes: &[SizeEntry],
    destination: Destination<'_>,
    observer: Observer<'_>,
) -> Result<LifecycleAction, Problem> {
    let kind =
        serde_json::to_value(action.action_type).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    let record_only = ActionKind::named(&kind).is_some_and(ActionKind::record_only);
    if !record_only && !capabilities.iter().any(|c| *c == kind) {
        return Err(unsupported(
            index,
            &format!("this runtime cannot {kind} (capabilities: {})", capabilities.join(", ")),
        ));
    }
    if action.target.is_some() && action.action_type != ActionType::Migrate {
        return Err(Problem::invalid_field(
            format!("$.actions[{index}].target"),
            format!("{kind} takes no target (only migrate does: {{\"node\": <node id>}})"),
        ));
    }
    let path = format!("$.actions[{index}].params");
    if let Some(plain) = action.action_type.plain() {
        params::<LifecycleStartRequest>(action, index)?;
        return Ok(plain);
    }
    Ok(match action.action_type {
        ActionType::Stop => {
            let p: LifecycleStopRequest = params(action, index)?;
            LifecycleAction::Stop { force: p.force, timeout_seconds: p.timeout_seconds }
        }
        ActionType::Scale => params::<LifecycleScaleRequest>(action, index)?.to_action(&path, sizes)?,
        ActionType::Snapshot => params::<LifecycleSnapshotRequest>(action, index)?.to_action(&path)?,
        ActionType::Restore => {
            let p: LifecycleRestoreRequest = match &action.params {
                None => {
                    return Err(Problem::invalid_field(format!("{path}.snapshot_id"), "restore needs the snapshot_id"))
                }
                Some(_) => params(action, index)?,
            };
            LifecycleAction::Restore { snapshot_id: p.snapshot_id }
        }
        ActionType::TunePolicy => {
            let policy: RuntimePolicy = params(action, index)?;
            if policy.max_cost_per_hour.is_some_and(|b| !(b.is_finite() && b >= 0.0)) {
                return Err(Problem::invalid_field(format!("{path}.max_cost_per_hour"), "a cost of at least 0"));
            }
            LifecycleAction::TunePolicy { policy }
        }
        ActionType::Migrate => {
            let node = migration_target(action, index)?;
            let to = destination(node, &format!("$.actions[{index}]"))?;
            LifecycleAction::Migrate { to, rebuild: false }
        }
        ActionType::AttachObserver => {
            let Some(_) = &action.params else {
                return Err(Problem::invalid_field(format!("{path}.url"), "attach_observer needs the url"));
            };
            LifecycleAction::AttachObserver { webhook: Box::new(observer(params(action, index)?, &path)?) }
        }
        ActionType::DetachObserver => {
            let Some(_) = &action.params else {
                return Err(Problem::invalid_field(
                    format!("{path}.webhook_id"),
                    "detach_observer needs the webhook_id",
                ));
            };
            let p: ObserverDetachRequest = params(action, index)?;
            LifecycleAction::DetachObserver { webhook_id: p.webhook_id }
        }
        plain => unreachable!("{plain:?} is taken above"),
    })
}

/// The node a `migrate` action names: `target.node`, or `params.node_id` as the lifecycle
/// call takes it (the same if both); none lets the cluster choose.
fn migration_target(action: &Action, index: usize) -> Result<Option<u64>, Problem> {
    let by_params = params::<LifecycleMigrateRequest>(action, index)?.node_id;
    let mut by_target = None;
    for (key, value) in action.target.iter().flatten() {
        let path = format!("$.actions[{index}].target.{key}");
        match (key.as_str(), value.as_u64()) {
            ("node", Some(node)) => by_target = Some(node),
            ("node", None) => return Err(Problem::invalid_field(path, "a node id (an integer of at least 0)")),
            _ => return Err(Problem::invalid_field(path, "migrate's target is {\"node\": <node id>}")),
        }
    }
    match (by_target, by_params) {
        (Some(target), Some(param)) if target != param => Err(Problem::invalid_field(
            format!("$.actions[{index}].target.node"),
            format!("names node {target}, params.node_id node {param}"),
        )),
        (target, param) => Ok(target.or(param)),
    }
}

/// Execute a deterministic list of actions (the agent tool-call contract).
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/actions/execute", tag = "Actions",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    request_body = ActionExecutionRequest,
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn execute_actions(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    Body(request): Body<ActionExecutionRequest>,
) -> Result<Response, Problem> {
    if request.actions.is_empty() || request.actions.len() > 20 {
        return Err(Problem::invalid_field("$.actions", "give 1 to 20 actions"));
    }
    let runtime = read_runtime(&state, &caller, &runtime_id, Consistency::Linearizable).await?;
    let sizes = sizes(&state);
    let migrates = request.actions.iter().any(|a| a.action_type == ActionType::Migrate);
    if migrates && request.actions.len() > 1 {
        return Err(Problem::invalid_field(
            "$.actions",
            "migrate runs alone: its destination's executor carries it out",
        ));
    }
    let destinations = match migrates && can_migrate(&runtime, "$.actions[0].type").is_ok() {
        true => Some(Destinations::read(&state).await?),
        false => None,
    };
    let destination = |node: Option<u64>, path: &str| match &destinations {
        Some(destinations) => destinations.choose(&runtime, node, path),
        // Read whenever the runtime can migrate: without them, it cannot.
        None => can_migrate(&runtime, path).and(Err(Problem::unsupported_action(path, "this runtime cannot migrate"))),
    };
    let settings = state.replica.state().settings();
    let observer = |request: ObserverAttachRequest, path: &str| {
        crate::webhooks::observer_of(&caller, &runtime, &settings, request, path)
    };
    let actions = request
        .actions
        .iter()
        .enumerate()
        .map(|(i, action)| lifecycle_action(action, i, &runtime.capabilities, &sizes, &destination, &observer))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, action) in actions.iter().enumerate() {
        if let LifecycleAction::Restore { snapshot_id } = action {
            if !runtime.has_snapshot(snapshot_id) {
                return Err(Problem::not_found(format!(
                    "$.actions[{i}]: runtime {runtime_id} has no snapshot {snapshot_id}"
                )));
            }
        }
    }
    let mut caller = caller;
    if let Some(key) = &request.idempotency_key {
        match caller.headers.get("idempotency-key").map(|v| v.to_str().unwrap_or_default().to_string()) {
            Some(header) if header != *key => {
                return Err(Problem::invalid_field("$.idempotency_key", "differs from the Idempotency-Key header"))
            }
            _ => {
                let value = HeaderValue::from_str(key)
                    .map_err(|_| Problem::invalid_field("$.idempotency_key", "must be visible ASCII"))?;
                caller.headers.insert("idempotency-key", value);
            }
        }
    }
    let action = LifecycleAction::Sequence { actions };
    begin_in_mode(&state, &caller, &runtime_id, action, &request, request.policy_mode).await
}
