use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ActionKind, JsonObject, LifecycleAction, PolicyRule, RuleKind, RuntimeState};

/// Who asked for a change: recorded on every event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    Human(String),
    Agent(String),
    /// An automation acting under a service principal (a pipeline, another control plane).
    Service(String),
    System,
}

impl Actor {
    /// The coarse actor kind: `human`, `agent`, `service` or `system`.
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::Human(_) => "human",
            Actor::Agent(_) => "agent",
            Actor::Service(_) => "service",
            Actor::System => "system",
        }
    }

    /// The principal's name; `None` for the system.
    pub fn name(&self) -> Option<&str> {
        match self {
            Actor::Human(name) | Actor::Agent(name) | Actor::Service(name) => Some(name),
            Actor::System => None,
        }
    }
}

impl std::fmt::Display for Actor {
    /// `human:<name>`, `agent:<name>`, `service:<name>` or `system`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Human(name) => write!(f, "human:{name}"),
            Actor::Agent(name) => write!(f, "agent:{name}"),
            Actor::Service(name) => write!(f, "service:{name}"),
            Actor::System => f.write_str("system"),
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
    #[serde(with = "crate::timestamp")]
    pub ts: chrono::DateTime<chrono::Utc>,
    pub actor: Actor,
    #[serde(default)]
    pub data: JsonObject,
    /// Raft log index of the entry that wrote the event: orders a runtime's events.
    pub seq: u64,
}

/// What an event records. Apply writes events by their type; they are stored and shown by its
/// dotted name ([`EventType::name`]: `runtime.created`, `lifecycle.stop`, `member.add`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    RuntimeCreated,
    RuntimeUpdated,
    RuntimeLabels,
    RuntimeDrift,
    RuntimeDeleted,
    /// A command ran in the runtime (who, what, how it ended).
    RuntimeExec,
    /// An operation of this kind began.
    Lifecycle(ActionKind),
    /// An operation ended so (succeeded, failed, cancelled).
    Operation(OperationStatus),
    OperationApproved,
    OperationRejected,
    OperationAssigned,
    PolicyDenied,
    PolicyApprovalRequired,
    PolicyCreated,
    PolicyDeleted,
    ApiKeyCreated,
    ApiKeyRevoked,
    SettingsChanged,
    /// A membership change, audited before it is made.
    Member(MembershipChange),
    /// Its spec's `ttl_seconds` or `idle_timeout_seconds` ran out: the cluster acted on it.
    RuntimeExpired,
    /// A migration moved it to another node (from, to, cold or rebuilt).
    RuntimeMigrated,
    WebhookCreated,
    WebhookDeleted,
}

impl EventType {
    /// The dotted name events carry.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow::{Borrowed, Owned};
        match self {
            EventType::RuntimeCreated => Borrowed("runtime.created"),
            EventType::RuntimeUpdated => Borrowed("runtime.updated"),
            EventType::RuntimeLabels => Borrowed("runtime.labels"),
            EventType::RuntimeDrift => Borrowed("runtime.drift"),
            EventType::RuntimeDeleted => Borrowed("runtime.deleted"),
            EventType::RuntimeExec => Borrowed("runtime.exec"),
            EventType::Lifecycle(kind) => Owned(format!("lifecycle.{kind}")),
            EventType::Operation(status) => Owned(format!("operation.{}", status.as_str())),
            EventType::OperationApproved => Borrowed("operation.approved"),
            EventType::OperationRejected => Borrowed("operation.rejected"),
            EventType::OperationAssigned => Borrowed("operation.assigned"),
            EventType::PolicyDenied => Borrowed("policy.denied"),
            EventType::PolicyApprovalRequired => Borrowed("policy.approval_required"),
            EventType::PolicyCreated => Borrowed("policy.created"),
            EventType::PolicyDeleted => Borrowed("policy.deleted"),
            EventType::ApiKeyCreated => Borrowed("apikey.created"),
            EventType::ApiKeyRevoked => Borrowed("apikey.revoked"),
            EventType::SettingsChanged => Borrowed("settings.changed"),
            EventType::Member(change) => Owned(format!("member.{}", change.as_str())),
            EventType::RuntimeExpired => Borrowed("runtime.expired"),
            EventType::RuntimeMigrated => Borrowed("runtime.migrated"),
            EventType::WebhookCreated => Borrowed("webhook.created"),
            EventType::WebhookDeleted => Borrowed("webhook.deleted"),
        }
    }
}

/// A change of the cluster's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipChange {
    Add,
    Remove,
}

impl MembershipChange {
    pub fn as_str(self) -> &'static str {
        match self {
            MembershipChange::Add => "add",
            MembershipChange::Remove => "remove",
        }
    }
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
    #[serde(with = "crate::timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    #[serde(default, with = "crate::timestamp::option")]
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(default)]
    pub progress: Option<OperationProgress>,
    #[serde(default)]
    pub error: Option<OperationError>,
    /// For a sequence that failed: the index of the action that failed (later ones were skipped).
    #[serde(default)]
    pub failed_action: Option<u32>,
    /// How many of the operation's actions the backend has completed (a taken-over operation
    /// resumes from here).
    #[serde(default)]
    pub completed_actions: u32,
    /// What the backend said about each completed action, in order.
    #[serde(default)]
    pub action_messages: Vec<String>,
    /// Who asked for it: an agent may not approve its own request.
    pub requested_by: Actor,
    /// The mode its policies were evaluated in (again right before it runs).
    pub policy_mode: PolicyMode,
    /// One policy decision per action, naming the rule that made it.
    #[serde(default)]
    pub decisions: Vec<PolicyDecision>,
    /// Who approved or rejected it, when a policy required approval.
    #[serde(default)]
    pub approval: Option<Approval>,
    /// The executor running it, with its fencing token and lease.
    #[serde(default)]
    pub assignment: Option<Assignment>,
    /// How many times the operation was assigned to an executor.
    #[serde(default)]
    pub attempts: u32,
    pub version: u64,
}

impl Operation {
    /// A new operation as it is first proposed: queued, nothing done, version 1.
    pub fn queued(
        id: String,
        runtime_id: &str,
        action: LifecycleAction,
        prior_state: RuntimeState,
        at: crate::Timestamp,
        requested_by: Actor,
        policy_mode: PolicyMode,
    ) -> Operation {
        Operation {
            id,
            runtime_id: runtime_id.to_string(),
            action,
            prior_state,
            status: OperationStatus::Queued,
            created_at: at,
            finished_at: None,
            progress: None,
            error: None,
            failed_action: None,
            completed_actions: 0,
            action_messages: Vec::new(),
            requested_by,
            policy_mode,
            decisions: Vec::new(),
            approval: None,
            assignment: None,
            attempts: 0,
            version: 1,
        }
    }
}

/// How the engine treats an action that no policy rule matches (and how cautiously the planner
/// plans). See `runtimeai_engine::policy` for the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    #[default]
    SafeFirst,
    Balanced,
    Aggressive,
}

impl PolicyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::SafeFirst => "safe_first",
            PolicyMode::Balanced => "balanced",
            PolicyMode::Aggressive => "aggressive",
        }
    }
}

/// What a policy decision lets happen; ordered from least to most restrictive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    RequireApproval,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::RequireApproval => "require_approval",
            Verdict::Deny => "deny",
        }
    }
}

/// The policy engine's decision on one action, naming the rule that made it (or the mode, when
/// no rule matched).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyDecision {
    /// The action's kind.
    pub action: ActionKind,
    /// Its position in the operation's list of actions.
    pub action_index: u32,
    pub verdict: Verdict,
    /// The deciding policy; none when the policy mode decided.
    pub policy_id: Option<String>,
    pub policy_name: Option<String>,
    /// The deciding rule's position in its policy, and its kind.
    pub rule_index: Option<u32>,
    pub rule_kind: Option<RuleKind>,
    pub reason: String,
}

/// A human's (or another agent's) answer to a `require_approval` decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Approval {
    pub approved: bool,
    /// `human:<name>` or `agent:<name>`.
    pub by: String,
    #[serde(with = "crate::timestamp")]
    pub at: chrono::DateTime<chrono::Utc>,
    pub reason: Option<String>,
}

/// Which executor runs an operation. The token is the raft log index of the assignment: every
/// later assignment has a larger one, and reports or backend calls with a smaller one are
/// refused (fencing). The lease ends at `lease_until` unless the executor renews it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Assignment {
    pub node_id: u64,
    pub token: u64,
    #[serde(with = "crate::timestamp")]
    pub lease_until: chrono::DateTime<chrono::Utc>,
}

/// One entry of the size catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SizeEntry {
    /// The size's name, e.g. `medium`.
    #[schema(pattern = "^[a-z0-9-]{1,63}$")]
    pub name: String,
    /// vCPUs per replica (listed sizes never get smaller).
    #[schema(exclusive_minimum = 0.0, maximum = 1024.0)]
    pub cpu: f64,
    /// Memory per replica, as a Kubernetes quantity (`4Gi`).
    #[schema(
        pattern = "^0*([1-9][0-9]{0,17}|[1-9][0-9]{0,14}(Ki|k|K)|[1-9][0-9]{0,11}(Mi|M)|[1-9][0-9]{0,8}(Gi|G)|[1-9][0-9]{0,5}(Ti|T))$"
    )]
    pub memory: String,
    /// Replicas the size runs with.
    #[schema(minimum = 1, maximum = 1000)]
    pub replicas: i64,
    /// What the size costs per hour (any currency, used consistently; listed sizes never get
    /// cheaper).
    #[schema(minimum = 0.0)]
    pub cost_per_hour: f64,
}

/// Where a runtime is placed: the node whose executor serves it, and that node's site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Placement {
    pub node_id: u64,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

/// What the executor last observed of a runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuntimeSignals {
    /// vCPUs in use: measured when `cpu_measured`, else the allocation.
    pub cpu: f64,
    /// Whether `cpu` was measured (a sandbox's cgroup, a domain's CPU time) rather than taken
    /// from the allocation.
    #[serde(default)]
    pub cpu_measured: bool,
    /// Bytes of its own storage in use (a sandbox's writable layer), where measured.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Memory in use, as a Kubernetes quantity.
    pub memory: String,
    /// `healthy`, `degraded`, `unhealthy` or `stopped`.
    pub health: String,
    pub cost_per_hour: f64,
    /// Request latency, when the backend knows it.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    #[serde(with = "crate::timestamp")]
    pub observed_at: chrono::DateTime<chrono::Utc>,
    /// The node that observed them.
    pub node_id: u64,
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
    pub policy_mode: PolicyMode,
    pub dry_run: bool,
    /// The planned actions, in order.
    pub planned: Vec<LifecycleAction>,
    /// Why each action was chosen.
    pub rationale: Vec<String>,
    /// Options the constraints ruled out, each naming the constraint.
    #[serde(default)]
    pub blocked: Vec<String>,
    /// What the operator or agent should consider next.
    pub recommendations: Vec<String>,
    #[serde(with = "crate::timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub version: u64,
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
    #[serde(with = "crate::timestamp")]
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
    #[serde(with = "crate::timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What the cluster knows of a member beyond its raft address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: u64,
    pub grpc_addr: String,
    pub http_addr: String,
    pub version: String,
    /// The backends this node's executor drives, one per runtime type it serves.
    #[serde(default)]
    pub backends: Vec<BackendInfo>,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

/// A backend a node drives: which runtime type, with which driver, what it can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackendInfo {
    /// `vm`, `vcluster`, `sandbox` or `agent_runtime`.
    pub runtime_type: String,
    /// `libvirt`, `kubernetes`, `process` or `simulated`.
    pub driver: String,
    /// Whether other nodes reach the same infrastructure (a runtime's operations may then run
    /// on any node with the same backend); a node-local backend's runtimes are driven only by
    /// the node they are placed on.
    pub shared: bool,
    /// The actions it supports; a runtime placed on it gets these as its `capabilities`.
    pub capabilities: Vec<String>,
}

/// Cluster-wide settings, replicated so that every node applies the same rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// Events kept per runtime (and in the audit feed); older ones are dropped first. At least
    /// [`EVENT_RETENTION_FLOOR_COUNT`]: no API call wipes the audit trail.
    #[schema(minimum = 100, maximum = 1000000)]
    pub event_retention_count: u64,
    /// Events older than this many days are dropped; at least [`EVENT_RETENTION_FLOOR_DAYS`].
    #[schema(minimum = 7, maximum = 36500)]
    pub event_retention_days: u64,
    /// The size catalogue, smallest first (each size's `cpu` and `cost_per_hour` at least the
    /// previous one's): what `size` names mean and what they cost.
    #[serde(default = "default_sizes")]
    #[schema(min_items = 1)]
    pub sizes: Vec<SizeEntry>,
    /// What one runtime, policy or tenant may hold: every create and change is checked against
    /// them (422 `limit-exceeded` naming the setting).
    #[serde(default)]
    pub limits: Limits,
    /// What the cluster holds against [`Limits`], as `GET /v1/cluster/settings` reports it;
    /// ignored in a `PUT`.
    #[serde(default)]
    #[schema(read_only)]
    pub usage: Option<SettingsUsage>,
    /// Networks (CIDR, e.g. `127.0.0.1/32`) webhooks may be delivered to although they are
    /// loopback, link-local, metadata or otherwise internal to a host: refused by default.
    #[serde(default)]
    pub webhook_allowed_destinations: Vec<String>,
}

/// Caps on what a client may store, so that no request and no tenant costs the cluster
/// without bound (etcd's `--max-request-bytes` and quota, Kubernetes' ResourceQuota).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Labels per runtime.
    #[schema(minimum = 1, maximum = 1024)]
    pub labels_per_runtime: u64,
    /// Bytes of a label key.
    #[schema(minimum = 1, maximum = 253)]
    pub label_key_bytes: u64,
    /// Bytes of a label value.
    #[schema(minimum = 1, maximum = 253)]
    pub label_value_bytes: u64,
    /// Bytes of a runtime's `spec.env`, names and values together.
    #[schema(minimum = 0, maximum = 1048576)]
    pub env_bytes: u64,
    /// Bytes of a runtime's `spec.command`, every argument together.
    #[schema(minimum = 0, maximum = 1048576)]
    pub command_bytes: u64,
    /// Snapshots one runtime keeps.
    #[schema(minimum = 0, maximum = 10000)]
    pub snapshots_per_runtime: u64,
    /// Policies in the cluster.
    #[schema(minimum = 1, maximum = 100000)]
    pub policies: u64,
    /// Rules in one policy.
    #[schema(minimum = 1, maximum = 1000)]
    pub rules_per_policy: u64,
    /// Runtimes one tenant may have (runtimes of no tenant are not counted).
    #[schema(minimum = 0, maximum = 10000000)]
    pub runtimes_per_tenant: u64,
    /// Webhook subscriptions in the cluster.
    #[schema(minimum = 0, maximum = 10000)]
    pub webhooks: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            labels_per_runtime: 64,
            label_key_bytes: 63,
            label_value_bytes: 63,
            env_bytes: 1 << 20,
            command_bytes: 64 << 10,
            snapshots_per_runtime: 100,
            policies: 1000,
            rules_per_policy: 100,
            runtimes_per_tenant: 10_000,
            webhooks: 100,
        }
    }
}

/// A limit a request would pass: which setting, its value, and what the request needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error, utoipa::ToSchema)]
#[error("{what} is {actual}, over the limit of {limit} (setting limits.{setting})")]
pub struct LimitExceeded {
    /// The field of [`Limits`].
    pub setting: String,
    pub limit: u64,
    pub actual: u64,
    /// What was measured, for the message.
    pub what: String,
}

impl Limits {
    /// Each limit by its setting's name with the range it may be set to.
    pub fn ranges(&self) -> [(&'static str, u64, std::ops::RangeInclusive<u64>); 10] {
        [
            ("labels_per_runtime", self.labels_per_runtime, 1..=1024),
            ("label_key_bytes", self.label_key_bytes, 1..=253),
            ("label_value_bytes", self.label_value_bytes, 1..=253),
            ("env_bytes", self.env_bytes, 0..=1 << 20),
            ("command_bytes", self.command_bytes, 0..=1 << 20),
            ("snapshots_per_runtime", self.snapshots_per_runtime, 0..=10_000),
            ("policies", self.policies, 1..=100_000),
            ("rules_per_policy", self.rules_per_policy, 1..=1000),
            ("runtimes_per_tenant", self.runtimes_per_tenant, 0..=10_000_000),
            ("webhooks", self.webhooks, 0..=10_000),
        ]
    }

    /// A runtime's labels and spec against the limits on one runtime.
    pub fn check_runtime(&self, runtime: &crate::Runtime) -> Result<(), LimitExceeded> {
        self.check_labels(&runtime.labels)?;
        let env = runtime.spec.env.iter().flatten().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        within_limit("env_bytes", self.env_bytes, env, "the size of spec.env in bytes")?;
        let command = runtime.spec.command.iter().flatten().map(String::len).sum::<usize>();
        within_limit("command_bytes", self.command_bytes, command, "the size of spec.command in bytes")?;
        let snapshots = runtime.snapshots.len();
        within_limit("snapshots_per_runtime", self.snapshots_per_runtime, snapshots, "the number of snapshots")
    }

    /// Labels against their count and sizes.
    pub fn check_labels(&self, labels: &BTreeMap<String, String>) -> Result<(), LimitExceeded> {
        within_limit("labels_per_runtime", self.labels_per_runtime, labels.len(), "the number of labels")?;
        for (key, value) in labels {
            within_limit("label_key_bytes", self.label_key_bytes, key.len(), &format!("label key {key:?}'s size"))?;
            within_limit(
                "label_value_bytes",
                self.label_value_bytes,
                value.len(),
                &format!("label {key:?}'s value size"),
            )?;
        }
        Ok(())
    }

    /// A policy's rules against their cap.
    pub fn check_policy(&self, policy: &Policy) -> Result<(), LimitExceeded> {
        within_limit("rules_per_policy", self.rules_per_policy, policy.rules.len(), "the number of rules")
    }
}

/// `Err` if `actual` is over `limit`.
pub fn within_limit(setting: &str, limit: u64, actual: usize, what: &str) -> Result<(), LimitExceeded> {
    let actual = actual as u64;
    if actual <= limit {
        return Ok(());
    }
    Err(LimitExceeded { setting: setting.into(), limit, actual, what: what.into() })
}

/// What the cluster holds against its [`Limits`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SettingsUsage {
    /// Runtimes in the cluster.
    pub runtimes: u64,
    /// Runtimes per tenant (tenants with none are left out).
    pub runtimes_per_tenant: BTreeMap<String, u64>,
    /// Policies in the cluster.
    pub policies: u64,
}

/// The fewest events per runtime the API lets a cluster keep.
pub const EVENT_RETENTION_FLOOR_COUNT: u64 = 100;
/// The shortest event retention, in days, the API lets a cluster set.
pub const EVENT_RETENTION_FLOOR_DAYS: u64 = 7;

/// The catalogue a new cluster starts with.
pub fn default_sizes() -> Vec<SizeEntry> {
    let entry = |name: &str, cpu: f64, memory: &str, replicas: i64, cost_per_hour: f64| SizeEntry {
        name: name.into(),
        cpu,
        memory: memory.into(),
        replicas,
        cost_per_hour,
    };
    vec![
        entry("small", 1.0, "2Gi", 1, 0.05),
        entry("medium", 2.0, "4Gi", 1, 0.10),
        entry("large", 4.0, "8Gi", 2, 0.40),
        entry("xlarge", 8.0, "16Gi", 3, 1.20),
    ]
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            event_retention_count: 1000,
            event_retention_days: 30,
            sizes: default_sizes(),
            limits: Limits::default(),
            usage: None,
            webhook_allowed_destinations: Vec::new(),
        }
    }
}

#[cfg(test)]
mod event_type_tests {
    use super::*;

    #[test]
    fn event_types_keep_the_names_clients_see() {
        assert_eq!(EventType::RuntimeCreated.name(), "runtime.created");
        assert_eq!(EventType::Lifecycle(ActionKind::Stop).name(), "lifecycle.stop");
        assert_eq!(EventType::Operation(OperationStatus::Succeeded).name(), "operation.succeeded");
        assert_eq!(EventType::Member(MembershipChange::Remove).name(), "member.remove");
        assert_eq!(EventType::PolicyApprovalRequired.name(), "policy.approval_required");
    }
}
