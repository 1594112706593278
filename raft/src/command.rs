//! The typed commands the state machine applies, and its typed replies.
//!
//! A command carries everything apply needs that is not in the state itself: the proposer
//! stamps the time, the actor and any new ids, so that every replica applies the same entry to
//! the same result (no clock, no randomness in apply). Checks that depend on state — unique
//! names, version preconditions, idempotency keys — run in apply and come back as a
//! [`Rejection`], not as an error.

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use runtimeai_model::{
    Actor, ApiKey, ClusterSettings, Intent, NodeInfo, Operation, OperationError, OperationProgress, OperationStatus,
    Policy, PolicyDecision, Runtime, RuntimeSignals, Timestamp, Webhook, WebhookDelivery,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// When the proposing node accepted the request.
    #[serde(with = "runtimeai_model::timestamp")]
    pub at: Timestamp,
    pub actor: Actor,
    /// Makes a retried request return the first reply instead of applying twice.
    pub idempotency: Option<IdempotencyClaim>,
    pub op: Op,
}

impl Command {
    /// Whether no client's request waits on it: a node's own command (an executor's report, a
    /// lease renewal; see [`Op::is_node_only`]), or a batch of only those. Such commands may
    /// wait a little to share a log entry with a client's write.
    pub fn is_background(&self) -> bool {
        match &self.op {
            Op::Batch(commands) => commands.iter().all(Command::is_background),
            op => op.is_node_only(),
        }
    }

    /// How many client or node commands it carries: a batch's, else one.
    pub fn count(&self) -> usize {
        match &self.op {
            Op::Batch(commands) => commands.len(),
            _ => 1,
        }
    }
}

/// An idempotency key and a digest of the request it was first used with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyClaim {
    /// Scoped by the proposer (e.g. `tenant/key`).
    pub key: String,
    pub fingerprint: String,
}

/// What a command does: one variant per kind, each wrapping a struct of the same name that
/// says what it carries and how apply checks it. (A variant wrapping a struct encodes as the
/// struct variant it replaced did: the log's format is unchanged.)
// Commands and replies are built once and moved; boxing variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    CreateRuntime(CreateRuntime),
    PatchLabels(PatchLabels),
    BeginOperation(BeginOperation),
    AdvanceOperation(AdvanceOperation),
    CancelOperation(CancelOperation),
    DecideApproval(DecideApproval),
    AssignOperation(AssignOperation),
    RenewLease(RenewLease),
    RecordDrift(RecordDrift),
    ReportSignals(ReportSignals),
    SubmitIntent(SubmitIntent),
    CreatePolicy(CreatePolicy),
    DeletePolicy(DeletePolicy),
    RegisterNode(RegisterNode),
    SetSettings(SetSettings),
    CreateApiKey(CreateApiKey),
    RevokeApiKey(RevokeApiKey),
    AuditMembership(AuditMembership),
    RecordExec(RecordExec),
    ExpireRuntime(ExpireRuntime),
    CreateWebhook(CreateWebhook),
    DeleteWebhook(DeleteWebhook),
    ClaimDeliveries(ClaimDeliveries),
    RecordDeliveries(RecordDeliveries),
    /// Several commands in one log entry, applied in order as if they were entries of their own
    /// (the leader batches concurrent proposals: one entry, one append, one replication, one
    /// apply for all of them). Replied to with [`CommandReply::Batch`], one reply each.
    Batch(Vec<Command>),
}

impl Op {
    /// Whether only a node's own machinery (executor, scheduler, registration) sends it, as
    /// the system: from anyone else — a client's command carried by a forward — apply refuses it.
    pub fn is_node_only(&self) -> bool {
        matches!(
            self,
            Op::RegisterNode(..)
                | Op::AssignOperation(..)
                | Op::AdvanceOperation(..)
                | Op::RenewLease(..)
                | Op::ReportSignals(..)
                | Op::RecordDrift(..)
                | Op::ExpireRuntime(..)
                | Op::ClaimDeliveries(..)
                | Op::RecordDeliveries(..)
        )
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::CreateRuntime(..) => "create_runtime",
            Op::PatchLabels(..) => "patch_labels",
            Op::BeginOperation(..) => "begin_operation",
            Op::AdvanceOperation(..) => "advance_operation",
            Op::CancelOperation(..) => "cancel_operation",
            Op::DecideApproval(..) => "decide_approval",
            Op::AssignOperation(..) => "assign_operation",
            Op::RenewLease(..) => "renew_lease",
            Op::ReportSignals(..) => "report_signals",
            Op::RecordDrift(..) => "record_drift",
            Op::SubmitIntent(..) => "submit_intent",
            Op::CreatePolicy(..) => "create_policy",
            Op::DeletePolicy(..) => "delete_policy",
            Op::RegisterNode(..) => "register_node",
            Op::SetSettings(..) => "set_settings",
            Op::CreateApiKey(..) => "create_api_key",
            Op::RevokeApiKey(..) => "revoke_api_key",
            Op::AuditMembership(..) => "audit_membership",
            Op::RecordExec(..) => "record_exec",
            Op::ExpireRuntime(..) => "expire_runtime",
            Op::CreateWebhook(..) => "create_webhook",
            Op::DeleteWebhook(..) => "delete_webhook",
            Op::ClaimDeliveries(..) => "claim_deliveries",
            Op::RecordDeliveries(..) => "record_deliveries",
            Op::Batch(..) => "batch",
        }
    }
}

/// Create a runtime (state `creating`) and the operation that brings it up. The proposer
/// filled in ids, timestamps and version 1. The runtime is stored as proposed and comes back
/// in the reply: shared, so that neither apply (on every member) nor the reply copies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateRuntime {
    pub runtime: Arc<Runtime>,
    pub operation: Operation,
}

/// Change a runtime's labels: `operation` carries the [`LifecycleAction::Relabel`], which the
/// policies judge. Allowed, the labels change at once (no operation is stored); needing
/// approval, the operation waits in `pending_approval` and applies them once approved;
/// denied, it is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchLabels {
    pub operation: Operation,
    pub expected_version: Option<u64>,
}

/// Accept a lifecycle operation on a runtime: checks the transition, that no other
/// operation is active, and the policies (deny: refused; require approval: parked in
/// `pending_approval`), then queues it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeginOperation {
    pub operation: Operation,
    pub expected_version: Option<u64>,
}

/// Move an operation on (`running`, progress) or end it (`succeeded`, `failed`,
/// `cancelled`); ending it applies its effect to the runtime.
///
/// Only executors send it: the report carries its fencing token and is refused unless it
/// is the current assignment's. (A client cancels with [`Op::CancelOperation`].)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdvanceOperation {
    pub operation_id: String,
    pub status: OperationStatus,
    pub progress: Option<OperationProgress>,
    pub error: Option<OperationError>,
    pub token: u64,
    /// How many actions the backend has completed so far.
    pub completed_actions: Option<u32>,
    /// For a failure: the index of the action that failed.
    pub failed_action: Option<u32>,
}

/// A client cancels a queued, parked or running operation (→ `cancelled`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelOperation {
    pub operation_id: String,
}

/// Approve (→ `queued`) or reject (→ `cancelled`) an operation a policy parked in
/// `pending_approval`. Nobody decides on their own request, and agents decide nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecideApproval {
    pub operation_id: String,
    pub approve: bool,
    pub reason: Option<String>,
}

/// The leader hands an operation to an executor node. The entry's log index becomes the
/// fencing token; the lease runs `lease_ms` from the command's time. `expected_token` is the
/// assignment the leader saw (none for a first assignment): a stale view is refused.
/// Policies are checked again here, right before the operation runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignOperation {
    pub operation_id: String,
    pub node_id: u64,
    pub lease_ms: u64,
    pub expected_token: Option<u64>,
}

/// The executor holding `token` extends its lease to `lease_ms` from the command's time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewLease {
    pub operation_id: String,
    pub token: u64,
    pub lease_ms: u64,
}

/// An executor found its backend differing from the replicated state: records what differs
/// and what it did (an event), and moves the runtime to `state` if given. Refused while an
/// operation is active on the runtime (the operation owns it then).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordDrift {
    pub runtime_id: String,
    pub observed: String,
    pub action: String,
    pub state: Option<runtimeai_model::RuntimeState>,
}

/// What executors observed of their runtimes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportSignals {
    pub signals: Vec<(String, RuntimeSignals)>,
}

/// Record an intent and, unless it is a dry run or its plan is empty, begin the operation
/// that carries its plan out (checked like any `BeginOperation`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitIntent {
    pub intent: Intent,
    pub operation: Option<Operation>,
}

/// Create a policy (its id must be new).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreatePolicy {
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeletePolicy {
    pub id: String,
}

/// A member announces its addresses (kept in the replicated state for `GET /v1/cluster`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterNode {
    pub info: NodeInfo,
}

/// Replace the cluster-wide settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetSettings {
    pub settings: ClusterSettings,
}

/// Store a new API key (its id must be new); `replaces` (a rotation) is revoked with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateApiKey {
    pub key: ApiKey,
    pub replaces: Option<String>,
}

/// Revoke an API key: it authenticates nothing from this entry on, on every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokeApiKey {
    pub id: String,
}

/// Record in the audit feed that the actor asked for a membership change (before it is
/// made: a change that fails halfway is on record too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditMembership {
    pub change: runtimeai_model::MembershipChange,
    pub node_id: u64,
    pub grpc_addr: Option<String>,
}

/// Record that a command ran in a runtime (`POST /v1/runtimes/{id}/exec`), by the command's
/// actor, on the node that hosts it: an event `runtime.exec` with the command and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordExec {
    pub runtime_id: String,
    pub command: Vec<String>,
    /// `None` when it did not end on its own (timed out, cut off).
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    pub node_id: u64,
}

/// Act on a runtime whose spec's `ttl_seconds` or `idle_timeout_seconds` has run out (see
/// `Runtime::due`, checked again at the command's time): begin its delete or stop as an
/// operation of the system, judged by the policies, and record a `runtime.expired` event. Either
/// way the expiry is then spent: a TTL once, an idle timeout once per idle period, so a refusal
/// is not proposed again every round. Sent by the executor of the runtime's node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpireRuntime {
    pub runtime_id: String,
    /// The id the operation gets.
    pub operation_id: String,
}

/// Store a webhook subscription (its id must be new); it delivers the events written after
/// this entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateWebhook {
    pub webhook: Webhook,
}

/// Remove a webhook subscription and its delivery log. `tenant_id`, when given, must be the
/// subscription's (a tenant's principal removes only its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteWebhook {
    pub id: String,
    pub tenant_id: Option<String>,
}

/// A node asks for the delivery lease (or renews its own): granted when it is free, has run out
/// at the command's time, or is this node's already (then the token stays). The reply says who
/// holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClaimDeliveries {
    pub node_id: u64,
    pub lease_ms: u64,
}

/// The delivering node records attempts on one subscription and how far it has delivered;
/// refused unless `token` is the current lease's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordDeliveries {
    pub token: u64,
    pub webhook_id: String,
    pub attempts: Vec<WebhookDelivery>,
    /// Delivered (or given up on) through this event: never moves back.
    pub delivered_through: Option<String>,
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandReply {
    Runtime(Runtime),
    /// A runtime created together with its first operation.
    Created {
        runtime: Arc<Runtime>,
        operation: Operation,
    },
    Operation(Operation),
    Intent {
        intent: Intent,
        operation: Option<Operation>,
    },
    Policy(Policy),
    Deleted {
        id: String,
    },
    NodeRegistered,
    /// An audit event was written.
    Audited,
    /// Signals recorded (for so many runtimes).
    SignalsRecorded(u32),
    Settings(ClusterSettings),
    ApiKey(ApiKey),
    Webhook(Webhook),
    DeliveryLease(runtimeai_model::DeliveryLease),
    Rejected(Rejection),
    /// Replies to membership and blank entries, which carry no command.
    Empty,
    /// The replies to an [`Op::Batch`], in its order.
    Batch(Vec<CommandReply>),
}

/// Why apply refused a command. Deterministic: every replica refuses the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("{kind} {id} not found")]
    NotFound { kind: String, id: String },
    #[error("a runtime named {name:?} already exists ({existing_id})")]
    NameTaken { name: String, existing_id: String },
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: String, id: String },
    #[error("version mismatch: expected {expected}, current is {actual}")]
    VersionMismatch { expected: u64, actual: u64 },
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyKeyReused { key: String },
    #[error("cannot {action} runtime {runtime_id}: it is {state}")]
    IllegalTransition { runtime_id: String, action: String, state: String },
    #[error("runtime {runtime_id} is busy with operation {operation_id}; wait for it or cancel it")]
    OperationInProgress { runtime_id: String, operation_id: String },
    #[error("operation {id} cannot go from {from} to {to}")]
    IllegalOperationStatus { id: String, from: String, to: String },
    #[error("{}", .decision.reason)]
    PolicyDenied { decision: PolicyDecision },
    #[error("{actor} asked for operation {operation_id} and cannot decide on it; another principal must")]
    SelfApproval { operation_id: String, actor: String },
    #[error("{actor} may not {what}")]
    NotPermitted { actor: String, what: String },
    #[error("operation {operation_id}: fencing token {token:?} is stale (the current assignment's is {current:?})")]
    StaleToken { operation_id: String, token: Option<u64>, current: Option<u64> },
    #[error(transparent)]
    LimitExceeded(#[from] runtimeai_model::LimitExceeded),
    #[error("the delivery lease {token} is no longer held (node {holder:?} holds the current one)")]
    LeaseLost { token: u64, holder: Option<u64> },
}

/// A command as the raft log carries it: shared, and encoded at most once.
///
/// The leader's log tail, each follower's replication stream and apply hold the same one. Its
/// encoding is made the first time it is needed (the leader's log append) and kept: the leader
/// sends each follower those bytes, and a follower keeps the bytes it received and writes them
/// to its own log. Before, the leader encoded every entry once for its log and once per
/// follower, and each follower encoded again what it had just decoded. In an entry the command
/// is its own encoding as a length-prefixed byte string.
#[derive(Clone)]
pub struct LoggedCommand(Arc<Logged>);

struct Logged {
    command: Command,
    encoded: std::sync::OnceLock<Box<[u8]>>,
}

impl LoggedCommand {
    pub fn new(command: Command) -> LoggedCommand {
        LoggedCommand(Arc::new(Logged { command, encoded: std::sync::OnceLock::new() }))
    }

    pub fn command(&self) -> &Command {
        &self.0.command
    }

    /// The command, taken out if this is its last holder, else copied.
    pub fn into_command(self) -> Command {
        match Arc::try_unwrap(self.0) {
            Ok(logged) => logged.command,
            Err(shared) => shared.command.clone(),
        }
    }

    fn encoded(&self) -> Result<&[u8], crate::codec::CodecError> {
        if let Some(bytes) = self.0.encoded.get() {
            return Ok(bytes);
        }
        let bytes = crate::codec::encode("command", &self.0.command)?.into_boxed_slice();
        Ok(self.0.encoded.get_or_init(|| bytes))
    }

    fn decoded(bytes: Box<[u8]>) -> Result<LoggedCommand, crate::codec::CodecError> {
        let command = crate::codec::decode("command", &bytes)?;
        Ok(LoggedCommand(Arc::new(Logged { command, encoded: std::sync::OnceLock::from(bytes) })))
    }
}

impl std::fmt::Debug for LoggedCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.command.fmt(f)
    }
}

impl PartialEq for LoggedCommand {
    fn eq(&self, other: &Self) -> bool {
        self.0.command == other.0.command
    }
}

impl Serialize for LoggedCommand {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.encoded().map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for LoggedCommand {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = LoggedCommand;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an encoded command")
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<LoggedCommand, E> {
                LoggedCommand::decoded(bytes.into()).map_err(E::custom)
            }

            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<LoggedCommand, E> {
                LoggedCommand::decoded(bytes.into_boxed_slice()).map_err(E::custom)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<LoggedCommand, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(byte) = seq.next_element()? {
                    bytes.push(byte);
                }
                self.visit_byte_buf(bytes)
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    type Entry = openraft::Entry<crate::TypeConfig>;

    #[test]
    fn a_variant_wrapping_a_struct_encodes_as_the_struct_variant_it_replaced() {
        #[derive(Serialize)]
        enum Before {
            _First { _n: u8 },
            Second { id: String, approve: bool },
        }
        #[derive(Serialize)]
        struct Second {
            id: String,
            approve: bool,
        }
        #[derive(Serialize)]
        enum After {
            _First(u8),
            Second(Second),
        }
        let before = codec::encode("test", &Before::Second { id: "op_1".into(), approve: true }).unwrap();
        let after = codec::encode("test", &After::Second(Second { id: "op_1".into(), approve: true })).unwrap();
        assert_eq!(before, after);
    }

    fn entry(command: LoggedCommand) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), 7), payload: EntryPayload::Normal(command) }
    }

    fn sample() -> Command {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let report = |id: &str| Command {
            at,
            actor: Actor::System,
            idempotency: None,
            op: Op::AdvanceOperation(AdvanceOperation {
                operation_id: id.into(),
                status: OperationStatus::Succeeded,
                progress: None,
                error: None,
                token: 3,
                completed_actions: Some(1),
                failed_action: None,
            }),
        };
        Command { at, actor: Actor::System, idempotency: None, op: Op::Batch(vec![report("op_a"), report("op_b")]) }
    }

    #[test]
    fn a_follower_writes_the_bytes_the_leader_encoded_once() {
        let leader = entry(LoggedCommand::new(sample()));
        let sent = codec::encode("entry", &leader).unwrap();
        let command_bytes = codec::encode("command", &sample()).unwrap();
        assert!(
            sent.windows(command_bytes.len()).any(|w| w == command_bytes),
            "the entry carries the command's own encoding"
        );
        assert_eq!(codec::encode("entry", &leader).unwrap(), sent, "the second encoding is the first");

        let received: Entry = codec::decode("entry", &sent).unwrap();
        let EntryPayload::Normal(command) = &received.payload else { panic!("{received:?}") };
        assert_eq!(command.command(), &sample());
        assert_eq!(codec::encode("entry", &received).unwrap(), sent, "the follower's log holds the same bytes");
        assert_eq!(command.clone().into_command(), sample(), "a shared command is copied out");
    }

    #[test]
    fn a_damaged_command_inside_an_entry_is_an_error_not_a_panic() {
        let mut sent = codec::encode("entry", &entry(LoggedCommand::new(sample()))).unwrap();
        let last = sent.len() - 1;
        sent[last] = 0xff;
        assert!(codec::decode::<Entry>("entry", &sent).is_err());
        assert!(codec::decode::<Entry>("entry", &sent[..sent.len() / 2]).is_err());
    }
}
