//! How records look on the wire where that differs from how they are stored.

use serde::Serialize;
use serde_json::Value;

use runtimeai_model::{
    Approval, Assignment, LifecycleAction, Operation, OperationError, OperationProgress, OperationStatus,
    PolicyDecision,
};

/// An operation as the API shows it: the seed's fields plus what it acts on.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OperationView {
    pub id: String,
    pub runtime_id: String,
    /// The action: `create`, `start`, `stop`, `restart`, `scale`, `snapshot`, `restore`,
    /// `delete`, `relabel` (a change of labels waiting for approval), or `execute` (a list of
    /// actions).
    pub kind: runtimeai_model::ActionKind,
    #[schema(value_type = Object)]
    pub params: Value,
    /// How each action went (one entry, or one per action of an `execute`), with what the
    /// backend said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<ActionResultView>>,
    /// `queued → running → succeeded | failed | cancelled` (or `pending_approval`).
    pub status: &'static str,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub progress: Option<OperationProgress>,
    pub error: Option<OperationError>,
    /// Who asked for it (`human:<name>`, `agent:<name>`).
    pub requested_by: String,
    /// The policy mode its actions were judged in.
    pub policy_mode: runtimeai_model::PolicyMode,
    /// One policy decision per action, naming the deciding policy and rule.
    pub decisions: Vec<PolicyDecision>,
    pub approval: Option<Approval>,
    /// The executor running it (node, fencing token, lease).
    pub assignment: Option<Assignment>,
    /// How many times it was handed to an executor (more than one: taken over).
    pub attempts: u32,
    pub version: u64,
}

/// One action, in the shape `actions/execute` takes (the seed's `Action`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlannedAction {
    #[serde(rename = "type")]
    pub action_type: runtimeai_model::ActionKind,
    /// What the action is aimed at besides the runtime: for `migrate`, `{"node": <node id>}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub target: Option<Value>,
    #[schema(value_type = Object)]
    pub params: Value,
}

impl PlannedAction {
    pub(crate) fn of(action: &LifecycleAction) -> PlannedAction {
        let target = match action {
            LifecycleAction::Migrate { to, .. } => Some(serde_json::json!({ "node": to.node_id })),
            _ => None,
        };
        PlannedAction { action_type: action.kind(), target, params: action_params(action) }
    }
}

/// How an action that has run (or will not) went: the seed's `ActionResult`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActionResultView {
    pub action: PlannedAction,
    pub status: ActionOutcome,
    pub message: Option<String>,
}

/// How an action ended: `skipped` after an earlier action failed, or when its operation was
/// cancelled or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionOutcome {
    Succeeded,
    Failed,
    Skipped,
}

pub(crate) fn action_params(action: &LifecycleAction) -> Value {
    match action {
        LifecycleAction::Stop { force, timeout_seconds } => {
            serde_json::json!({ "force": force, "timeout_seconds": timeout_seconds })
        }
        LifecycleAction::Scale { size, resources } => serde_json::json!({ "size": size, "resources": resources }),
        LifecycleAction::Snapshot { snapshot_id, name, description } => {
            serde_json::json!({ "snapshot_id": snapshot_id, "name": name, "description": description })
        }
        LifecycleAction::Restore { snapshot_id } => serde_json::json!({ "snapshot_id": snapshot_id }),
        LifecycleAction::Relabel { labels } => serde_json::json!({ "labels": labels }),
        LifecycleAction::Exec { request } => serde_json::to_value(request).unwrap_or_default(),
        LifecycleAction::TunePolicy { policy } => serde_json::to_value(policy).unwrap_or_default(),
        LifecycleAction::Migrate { to, rebuild } => {
            serde_json::json!({ "to_node": to.node_id, "site": to.site, "rebuild": rebuild })
        }
        // Never its secret: `GET /v1/webhooks/{id}/secret` shows it to those who may.
        LifecycleAction::AttachObserver { webhook } => serde_json::json!({
            "webhook_id": webhook.id, "url": webhook.url, "event_types": webhook.filter.event_types,
            "min_severity": webhook.filter.min_severity, "description": webhook.description,
        }),
        LifecycleAction::DetachObserver { webhook_id } => serde_json::json!({ "webhook_id": webhook_id }),
        LifecycleAction::Sequence { actions } => serde_json::json!({
            "actions": actions.iter().map(|a| serde_json::json!({"type": a.kind(), "params": action_params(a)})).collect::<Vec<_>>()
        }),
        _ => serde_json::json!({}),
    }
}

/// The results of the actions that have ended (an action still waiting or running has none
/// yet: the operation's `status` and `progress` say where it is), derived from the operation's
/// status and what the backend said.
fn action_results(operation: &Operation) -> Option<Vec<ActionResultView>> {
    let failed = operation.failed_action.map(|i| i as usize);
    let completed = operation.completed_actions as usize;
    let outcome = |i: usize| -> Option<(ActionOutcome, Option<String>)> {
        let said = operation.action_messages.get(i).filter(|m| !m.is_empty()).cloned();
        let error = || operation.error.as_ref().map(|e| e.message.clone());
        Some(match operation.status {
            OperationStatus::Succeeded => (ActionOutcome::Succeeded, said),
            OperationStatus::Failed if failed == Some(i) => (ActionOutcome::Failed, error()),
            _ if i < completed => (ActionOutcome::Succeeded, said),
            OperationStatus::Failed => {
                let why = match (failed, error()) {
                    (Some(f), _) => format!("skipped: action {f} failed"),
                    (None, Some(error)) => format!("skipped: {error}"),
                    (None, None) => "skipped".to_string(),
                };
                (ActionOutcome::Skipped, Some(why))
            }
            OperationStatus::Cancelled => {
                let why = error().unwrap_or_else(|| "operation cancelled".to_string());
                (ActionOutcome::Skipped, Some(format!("skipped: {why}")))
            }
            _ => return None,
        })
    };
    let steps = operation.action.steps().iter().enumerate();
    let results = steps
        .filter_map(|(i, action)| {
            let (status, message) = outcome(i)?;
            Some(ActionResultView { action: PlannedAction::of(action), status, message })
        })
        .collect();
    Some(results)
}

impl From<&Operation> for OperationView {
    fn from(operation: &Operation) -> Self {
        OperationView {
            id: operation.id.clone(),
            runtime_id: operation.runtime_id.clone(),
            kind: operation.action.kind(),
            params: action_params(&operation.action),
            results: action_results(operation),
            status: operation.status.as_str(),
            created_at: operation.created_at,
            finished_at: operation.finished_at,
            progress: operation.progress.clone(),
            error: operation.error.clone(),
            requested_by: operation.requested_by.to_string(),
            policy_mode: operation.policy_mode,
            decisions: operation.decisions.clone(),
            approval: operation.approval.clone(),
            assignment: operation.assignment.clone(),
            attempts: operation.attempts,
            version: operation.version,
        }
    }
}
