//! How records look on the wire where that differs from how they are stored.

use serde::Serialize;
use serde_json::Value;

use runtimeai_model::{LifecycleAction, Operation, OperationError, OperationProgress};

/// An operation as the API shows it: the seed's fields plus what it acts on.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OperationView {
    pub id: String,
    pub runtime_id: String,
    /// The action: `create`, `start`, `stop`, `restart`, `scale`, `snapshot`, `restore`, `delete`.
    pub kind: &'static str,
    #[schema(value_type = Object)]
    pub params: Value,
    /// `queued → running → succeeded | failed | cancelled` (or `pending_approval`).
    pub status: &'static str,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub progress: Option<OperationProgress>,
    pub error: Option<OperationError>,
    pub version: u64,
}

impl From<&Operation> for OperationView {
    fn from(operation: &Operation) -> Self {
        let params = match &operation.action {
            LifecycleAction::Stop { force, timeout_seconds } => {
                serde_json::json!({ "force": force, "timeout_seconds": timeout_seconds })
            }
            LifecycleAction::Scale { size, resources } => serde_json::json!({ "size": size, "resources": resources }),
            LifecycleAction::Snapshot { snapshot_id, name, description } => {
                serde_json::json!({ "snapshot_id": snapshot_id, "name": name, "description": description })
            }
            LifecycleAction::Restore { snapshot_id } => serde_json::json!({ "snapshot_id": snapshot_id }),
            _ => serde_json::json!({}),
        };
        OperationView {
            id: operation.id.clone(),
            runtime_id: operation.runtime_id.clone(),
            kind: operation.action.kind(),
            params,
            status: operation.status.as_str(),
            created_at: operation.created_at,
            finished_at: operation.finished_at,
            progress: operation.progress.clone(),
            error: operation.error.clone(),
            version: operation.version,
        }
    }
}
