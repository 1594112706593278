//! How records look on the wire where that differs from how they are stored.

use serde::Serialize;
use serde_json::Value;

use runtimeai_model::{LifecycleAction, Operation, OperationError, OperationProgress, OperationStatus};

/// An operation as the API shows it: the seed's fields plus what it acts on.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OperationView {
    pub id: String,
    pub runtime_id: String,
    /// The action: `create`, `start`, `stop`, `restart`, `scale`, `snapshot`, `restore`,
    /// `delete`, or `execute` (a list of actions).
    pub kind: &'static str,
    #[schema(value_type = Object)]
    pub params: Value,
    /// For `execute`: how each action went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<ActionResultView>>,
    /// `queued → running → succeeded | failed | cancelled` (or `pending_approval`).
    pub status: &'static str,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub progress: Option<OperationProgress>,
    pub error: Option<OperationError>,
    pub version: u64,
}

/// How one action of an `actions/execute` operation went.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActionResultView {
    /// The action's type (`stop`, `scale`, ...).
    pub action: &'static str,
    #[schema(value_type = Object)]
    pub params: Value,
    /// `pending`, `succeeded`, `failed` or `skipped` (after a failure, or when cancelled).
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
        LifecycleAction::Sequence { actions } => serde_json::json!({
            "actions": actions.iter().map(|a| serde_json::json!({"type": a.kind(), "params": action_params(a)})).collect::<Vec<_>>()
        }),
        _ => serde_json::json!({}),
    }
}

/// Per-action results of a sequence, derived from the operation's status.
fn action_results(operation: &Operation) -> Option<Vec<ActionResultView>> {
    let LifecycleAction::Sequence { actions } = &operation.action else { return None };
    let failed = operation.failed_action.map(|i| i as usize);
    let results = actions
        .iter()
        .enumerate()
        .map(|(i, action)| {
            let (status, message) = match operation.status {
                OperationStatus::Succeeded => ("succeeded", None),
                OperationStatus::Failed if failed == Some(i) => {
                    ("failed", operation.error.as_ref().map(|e| e.message.clone()))
                }
                OperationStatus::Failed if failed.is_some_and(|f| i < f) => ("succeeded", None),
                OperationStatus::Failed | OperationStatus::Cancelled => ("skipped", None),
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
            version: operation.version,
        }
    }
}
