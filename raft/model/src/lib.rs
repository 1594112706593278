//! RuntimeAI's domain model, defined once for every crate: the Runtime (a VM, a virtual
//! Kubernetes cluster or an agent sandbox) and the records that surround it — operations,
//! intents, policies, events — as the REST API shows them and the replicated state stores them.
//!
//! Types here are plain data: no I/O, no clock. They serialize to JSON for the API and to the
//! raft codec's binary format for the log and snapshots; [`JsonObject`] bridges free-form JSON
//! fields across both.

mod access;
mod exec;
mod json;
mod lifecycle;
mod records;
mod rules;
mod runtime;
pub mod timestamp;
mod webhooks;

pub use access::{strictness, AgentMode, ApiKey, Principal, PrincipalKind, Role, ALL_TENANTS};
pub use exec::{ExecRequest, MAX_EXEC_SECONDS};
pub use json::{JsonObject, JsonText};
pub use lifecycle::{ActionKind, IllegalTransition, LabelPatch, LifecycleAction};
pub use records::{
    default_sizes, within_limit, Actor, Approval, Assignment, BackendInfo, ClusterSettings, Event, EventSeverity,
    EventType, IdempotencyRecord, Intent, LimitExceeded, Limits, MembershipChange, NodeInfo, Operation, OperationError,
    OperationProgress, OperationStatus, Placement, Policy, PolicyDecision, PolicyMode, RuntimeSignals, SettingsUsage,
    SizeEntry, Verdict, EVENT_RETENTION_FLOOR_COUNT, EVENT_RETENTION_FLOOR_DAYS,
};
pub use rules::{ActorPattern, PolicyRule, RuleKind, RuleParams, Selector};
pub use runtime::{
    capability, BackendKind, BackendRef, Capability, EgressPolicy, Expiry, ExpiryReason, Exposure, Isolation,
    NetworkingProfile, ResourceProfile, Runtime, RuntimePolicy, RuntimeSnapshot, RuntimeSpec, RuntimeState,
    RuntimeType, SecurityProfile,
};
pub use webhooks::{DeliveryLease, DeliveryOutcome, Webhook, WebhookDelivery, WebhookFilter};

/// Timestamps are UTC: RFC 3339 in JSON, numbers in the binary codec (see [`timestamp`]).
pub type Timestamp = chrono::DateTime<chrono::Utc>;
