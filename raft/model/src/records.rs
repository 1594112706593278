use serde::{Deserialize, Serialize};

use crate::{JsonObject, LifecycleAction, RuntimeState};

/// Who asked for a change: recorded on every event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    Human(String),
    Agent(String),
    System,
}

impl Actor {
    /// The seed's coarse actor kind: `human`, `agent` or `system`.
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::Human(_) => "human",
            Actor::Agent(_) => "agent",
            Actor::System => "system",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventSeverity {
    #[default]
    Info,
    Warning,
    Critical,
}

/// An entry of the audit trail, written in the same raft entry as the change it records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub runtime_id: String,
    /// Dotted type such as `runtime.created` or `lifecycle.scale`.
    #[serde(rename = "type")]
    pub event_type: String,
    pub severity: EventSeverity,
    pub ts: chrono::DateTime<chrono::Utc>,
    pub actor: Actor,
    #[serde(default)]
    pub data: JsonObject,
    /// Raft log index of the entry that wrote the event: orders a runtime's events.
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    Queued,
    PendingApproval,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperationProgress {
    #[schema(maximum = 100)]
    pub percent: u8,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OperationError {
    pub code: String,
    pub message: String,
}

impl OperationStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, OperationStatus::Succeeded | OperationStatus::Failed | OperationStatus::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OperationStatus::Queued => "queued",
            OperationStatus::PendingApproval => "pending_approval",
            OperationStatus::Running => "running",
            OperationStatus::Succeeded => "succeeded",
            OperationStatus::Failed => "failed",
            OperationStatus::Cancelled => "cancelled",
        }
    }
}

/// An asynchronous piece of work on a runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    pub runtime_id: String,
    /// What the operation does, with its parameters.
    pub action: LifecycleAction,
    /// The runtime's state when the operation was accepted (restored if it fails or is
    /// cancelled while the runtime is in a transitional state).
    pub prior_state: RuntimeState,
    pub status: OperationStatus,
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    pub progress: Option<OperationProgress>,
    #[serde(default)]
    pub error: Option<OperationError>,
    /// For a sequence that failed: the index of the action that failed (later ones were skipped).
    #[serde(default)]
    pub failed_action: Option<u32>,
    pub version: u64,
}

/// A goal plus constraints submitted for a runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    pub id: String,
    pub runtime_id: String,
    /// The operation that carries the plan out; none for a dry run or an empty plan.
    pub operation_id: Option<String>,
    pub goal: String,
    #[serde(default)]
    pub constraints: JsonObject,
    #[serde(default)]
    pub context: JsonObject,
    /// `safe_first`, `balanced` or `aggressive`.
    pub policy_mode: String,
    pub dry_run: bool,
    /// The planned actions, in order.
    pub planned: Vec<LifecycleAction>,
    /// Why each action was chosen, and which options constraints ruled out.
    pub rationale: Vec<String>,
    /// What the operator or agent should consider next.
    pub recommendations: Vec<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub version: u64,
}

/// One rule of a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyRule {
    /// `deny_action`, `allow_action`, `require_approval`, `budget_guardrail` or `data_egress`.
    pub kind: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub selector: JsonObject,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: JsonObject,
}

/// A set of safety rules, scoped by tenant and environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Policy {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub scope_env: Option<String>,
    pub rules: Vec<PolicyRule>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub version: u64,
}

/// The remembered answer to a request made with an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub key: String,
    /// A digest of the request, so that a different request reusing the key is refused.
    pub fingerprint: String,
    /// The codec-encoded reply of the original request.
    pub reply: Vec<u8>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What the cluster knows of a member beyond its raft address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: u64,
    pub grpc_addr: String,
    pub http_addr: String,
    pub version: String,
}

/// Cluster-wide settings, replicated so that every node applies the same rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Events kept per runtime; older ones are dropped first.
    #[schema(minimum = 1)]
    pub event_retention_count: u64,
    /// Events older than this many days are dropped.
    #[schema(minimum = 1)]
    pub event_retention_days: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings { event_retention_count: 1000, event_retention_days: 30 }
    }
}
