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

/// How one action of an `actions/execute` operation went.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActionResultView {
    /// The action's type (`stop`, `scale`, ...).
    pub action: runtimeai_model::ActionKind,
    #[schema(value_type = Object)]
    pub params: Value,
    /// `pending`, `running`, `succeeded`, `failed` or `skipped` (after a failure, or when
    /// cancelled or denied).
    pub status: &'static str,
    pub message: Option<String>,
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
        LifecycleAction::Sequence { actions } => serde_json::json!({
            "actions": actions.iter().map(|a| serde_json::json!({"type": a.kind(), "params": action_params(a)})).collect::<Vec<_>>()
        }),
        _ => serde_json::json!({}),
    }
}

/// Per-action results, derived from the operation's status and what the backend said.
fn action_results(operation: &Operation) -> Option<Vec<ActionResultView>> {
    let actions = operation.action.steps();
    let failed = operation.failed_action.map(|i| i as usize);
    let completed = operation.completed_actions as usize;
    let results = actions
        .iter()
        .enumerate()
        .map(|(i, action)| {
            let said = operation.action_messages.get(i).filter(|m| !m.is_empty()).cloned();
            let (status, message) = match operation.status {
                OperationStatus::Succeeded => ("succeeded", said),
                OperationStatus::Failed if failed == Some(i) => {
                    ("failed", operation.error.as_ref().map(|e| e.message.clone()))
                }
                _ if i < completed => ("succeeded", said),
                OperationStatus::Failed => {
                    let why = match (failed, &operation.error) {
                        (Some(f), _) => format!("skipped: action {f} failed"),
                        (None, Some(error)) => format!("skipped: {}", error.message),
                        (None, None) => "skipped".to_string(),
                    };
                    ("skipped", Some(why))
                }
                OperationStatus::Cancelled => {
                    let why = operation.error.as_ref().map_or("operation cancelled".to_string(), |e| e.message.clone());
                    ("skipped", Some(format!("skipped: {why}")))
                }
                OperationStatus::Running if i == completed => ("running", None),
                _ => ("pending", None),
            };
            ActionResultView { action: action.kind(), params: action_params(action), status, message }
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
