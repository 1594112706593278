use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What kind of execution environment a runtime is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeType {
    Vm,
    Vcluster,
    Sandbox,
    AgentRuntime,
}

/// Lifecycle state: `creating → running ⇄ stopped`, `degraded`, `deleting → deleted`, `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeState {
    Creating,
    Running,
    Stopped,
    Degraded,
    Deleting,
    Deleted,
    Error,
}

impl RuntimeState {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeState::Creating => "creating",
            RuntimeState::Running => "running",
            RuntimeState::Stopped => "stopped",
            RuntimeState::Degraded => "degraded",
            RuntimeState::Deleting => "deleting",
            RuntimeState::Deleted => "deleted",
            RuntimeState::Error => "error",
        }
    }
}

impl Runtime {
    /// Whether the runtime has a snapshot with this id (what `restore` needs).
    pub fn has_snapshot(&self, snapshot_id: &str) -> bool {
        self.snapshots.iter().any(|s| s.id == snapshot_id)
    }
}

impl RuntimeType {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeType::Vm => "vm",
            RuntimeType::Vcluster => "vcluster",
            RuntimeType::Sandbox => "sandbox",
            RuntimeType::AgentRuntime => "agent_runtime",
        }
    }
}

/// A point-in-time copy of a runtime, to restore later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeSnapshot {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(with = "crate::timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    VmBackend,
    VclusterBackend,
    K8sBackend,
    Custom,
}

/// Where a runtime lives in its backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendRef {
    pub kind: BackendKind,
    /// Backend-specific identifier (opaque).
    #[serde(rename = "ref")]
    pub reference: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResourceProfile {
    #[serde(default)]
    pub cpu: Option<f64>,
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub gpu: Option<String>,
    #[serde(default)]
    /// Signed so that a negative count is refused as invalid (422), not as malformed.
    pub replicas: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Exposure {
    #[default]
    Private,
    Internal,
    Public,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EgressPolicy {
    #[default]
    Restricted,
    Open,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkingProfile {
    #[serde(default)]
    pub exposure: Exposure,
    #[serde(default)]
    pub egress_policy: EgressPolicy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    Basic,
    #[default]
    Strong,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecurityProfile {
    #[serde(default)]
    pub isolation: Isolation,
    #[serde(default)]
    pub compliance: Vec<String>,
    #[serde(default = "default_true")]
    pub audit: bool,
}

impl Default for SecurityProfile {
    fn default() -> Self {
        SecurityProfile { isolation: Isolation::Strong, compliance: Vec::new(), audit: true }
    }
}

fn default_true() -> bool {
    true
}

/// The desired shape of a runtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeSpec {
    /// T-shirt size from the cluster's catalogue (by default small, medium, large or xlarge).
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9-]{1,63}$")]
    pub size: Option<String>,
    #[serde(default)]
    pub resources: Option<ResourceProfile>,
    #[serde(default)]
    pub networking: Option<NetworkingProfile>,
    #[serde(default)]
    pub security: Option<SecurityProfile>,
    /// For `sandbox` and `agent_runtime`: the program to run and its arguments (default: an
    /// idle process). It runs in the sandbox's private work directory.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Environment variables for `command` (nothing else of the node's environment is passed
    /// on but `PATH`).
    #[serde(default)]
    pub env: Option<BTreeMap<String, String>>,
}

/// A manageable execution environment with lifecycle, intent and feedback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Runtime {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub runtime_type: RuntimeType,
    pub state: RuntimeState,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub backend: Option<BackendRef>,
    #[serde(default)]
    pub spec: RuntimeSpec,
    #[serde(with = "crate::timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(default, with = "crate::timestamp::option")]
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Bumped by every change; the API's `ETag` and `If-Match` are built on it.
    pub version: u64,
    /// The operation currently working on this runtime; one at a time.
    #[serde(default)]
    pub active_operation: Option<String>,
    /// Snapshots taken, oldest first.
    #[serde(default)]
    pub snapshots: Vec<RuntimeSnapshot>,
    /// The node (and site) whose executor serves this runtime.
    #[serde(default)]
    pub placement: Option<crate::Placement>,
    /// What its executor last observed.
    #[serde(default)]
    pub signals: Option<crate::RuntimeSignals>,
}

impl Runtime {
    /// A runtime as it is first recorded: `creating`, version 1, nothing else set yet.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        runtime_type: RuntimeType,
        created_at: crate::Timestamp,
    ) -> Runtime {
        Runtime {
            id: id.into(),
            name: name.into(),
            runtime_type,
            state: RuntimeState::Creating,
            tenant_id: None,
            labels: BTreeMap::new(),
            capabilities: Vec::new(),
            backend: None,
            spec: RuntimeSpec::default(),
            created_at,
            updated_at: None,
            version: 1,
            active_operation: None,
            snapshots: Vec::new(),
            placement: None,
            signals: None,
        }
    }

    /// The environment policies are scoped by: the `env` label.
    pub fn env(&self) -> Option<&str> {
        self.labels.get("env").map(String::as_str)
    }
}
