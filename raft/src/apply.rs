//! What each command does to the state: the deterministic heart of the state machine.
//!
//! Every function here reads only the command and the store (through [`Txn`]), so every
//! replica computes the same result. Refusals are [`Rejection`] replies, not errors.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use openraft::AnyError;
use rocksdb::{IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use runtimeai_engine::policy;
use runtimeai_model::{
    Actor, ApiKey, Approval, Assignment, ClusterSettings, Event, EventSeverity, IdempotencyRecord, JsonObject,
    JsonText, LifecycleAction, Operation, OperationError, OperationProgress, OperationStatus, Policy, PolicyDecision,
    Runtime, RuntimeSnapshot, RuntimeState, Timestamp, Verdict,
};

use crate::codec;
use crate::command::{Command, CommandReply, IdempotencyClaim, Op, Rejection};
use crate::retention::{self, Ended};
use crate::runtime_index::{self, RuntimeField};
use crate::state_machine::{event_prefix, name_key, read_err, write_err};
use crate::store::{
    cf, CF_ACTIVE_OPERATIONS, CF_API_KEYS, CF_EVENTS, CF_EVENT_COUNTS, CF_IDEMPOTENCY, CF_IDEMPOTENCY_BY_TIME,
    CF_INTENTS, CF_NODES, CF_OPERATIONS, CF_POLICIES, CF_RUNTIMES, CF_RUNTIMES_BY_NODE, CF_RUNTIME_NAMES,
    CF_RUNTIME_OPERATIONS, CF_SETTINGS,
};
use crate::types::StorageError;

/// The writes of one `apply` call, so that a command sees the effects of the commands before it
/// in the same batch; they go to RocksDB as one batch ([`Txn::into_batch`]), each key once with
/// its last value (a batch of creates rewrites the placement counts and each runtime's event
/// tally several times).
pub(crate) struct Txn<'a> {
    pub(crate) db: &'a DB,
    /// Per column family, what this batch wrote (`None`: deleted). Kept per family so that a
    /// scan of one (the policies, on every evaluation) does not walk every key of the batch.
    overlay: HashMap<&'static str, BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Events written so far by the log entry being applied (all its commands, if it is a
    /// batch): numbers them within the entry.
    events_in_entry: u32,
    /// Every operation written, in order: once the batch is on disk, the state machine's
    /// in-memory set of unfinished operations follows them.
    pub(crate) operations_written: Vec<OperationWritten>,
    /// Whether a member's announcement was written: the state machine then reads them again.
    pub(crate) nodes_written: bool,
    /// Whether the cluster settings were written: the state machine then reads them again.
    pub(crate) settings_written: bool,
    /// Whether the runtimes per node were written: the state machine then reads them again.
    pub(crate) placement_written: bool,
    /// Whether an API key was written: the state machine then reads them again.
    pub(crate) api_keys_written: bool,
    /// The settings and the policies, decoded once per apply call (every command reads the
    /// settings, every lifecycle command the policies) until a command writes them.
    settings: RefCell<Option<Arc<ClusterSettings>>>,
    policies: RefCell<Option<Arc<Vec<Policy>>>>,
    /// The unfinished operations as the store holds them before this batch (the state machine
    /// keeps them in memory): an executor's report or lease renewal finds its operation here
    /// instead of reading and decoding it from the store.
    unfinished: Option<&'a BTreeMap<String, Operation>>,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(db: &'a DB) -> Self {
        Txn {
            db,
            overlay: HashMap::new(),
            events_in_entry: 0,
            operations_written: Vec::new(),
            nodes_written: false,
            settings_written: false,
            placement_written: false,
            api_keys_written: false,
            settings: RefCell::new(None),
            policies: RefCell::new(None),
            unfinished: None,
        }
    }

    /// Lets reads of operations start from `unfinished`, which must be exactly the unfinished
    /// operations the store holds when this batch begins.
    pub(crate) fn reading_unfinished(self, unfinished: &'a BTreeMap<String, Operation>) -> Self {
        Txn { unfinished: Some(unfinished), ..self }
    }

    /// An operation as this batch sees it: as written earlier in the batch, else as the store
    /// holds it (from memory if it is unfinished).
    fn operation(&self, id: &str) -> Result<Option<Operation>, StorageError> {
        let written_here = self.overlay.get(CF_OPERATIONS).is_some_and(|written| written.contains_key(id.as_bytes()));
        match self.unfinished.and_then(|unfinished| unfinished.get(id)) {
            Some(operation) if !written_here => Ok(Some(operation.clone())),
            _ => self.get(CF_OPERATIONS, id.as_bytes()),
        }
    }

    pub(crate) fn get<T: serde::de::DeserializeOwned>(
        &self,
        cf_name: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let decode = |bytes: &[u8]| codec::decode("state record", bytes).map_err(read_err);
        match self.overlay.get(cf_name).and_then(|written| written.get(key)) {
            Some(written) => written.as_deref().map(decode).transpose(),
            None => {
                self.db.get_pinned_cf(cf(self.db, cf_name), key).map_err(read_err)?.as_deref().map(decode).transpose()
            }
        }
    }

    pub(crate) fn put<T: Serialize>(
        &mut self,
        cf_name: &'static str,
        key: Vec<u8>,
        value: &T,
    ) -> Result<(), StorageError> {
        let bytes = codec::encode("state record", value).map_err(write_err)?;
        self.forget_cached(cf_name, &key);
        self.overlay.entry(cf_name).or_default().insert(key, Some(bytes));
        Ok(())
    }

    /// Everything written, as one RocksDB batch: each key once, with its last value.
    pub(crate) fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::default();
        for (cf_name, written) in self.overlay {
            let family = cf(self.db, cf_name);
            for (key, value) in written {
                match value {
                    Some(value) => batch.put_cf(family, key, value),
                    None => batch.delete_cf(family, key),
                }
            }
        }
        batch
    }

    fn forget_cached(&mut self, cf_name: &'static str, key: &[u8]) {
        match cf_name {
            // The placement counts live beside the settings and change with every create.
            CF_SETTINGS if key == SETTINGS_KEY => {
                *self.settings.get_mut() = None;
                self.settings_written = true;
            }
            CF_SETTINGS if key == PLACEMENT_COUNTS_KEY => self.placement_written = true,
            CF_POLICIES => *self.policies.get_mut() = None,
            CF_NODES => self.nodes_written = true,
            _ => {}
        }
    }

    /// Whether `key` was deleted earlier in this batch.
    pub(crate) fn deleted(&self, cf_name: &'static str, key: &[u8]) -> bool {
        matches!(self.overlay.get(cf_name).and_then(|written| written.get(key)), Some(None))
    }

    /// Every record of a column family, as this batch sees it.
    fn scan<T: serde::de::DeserializeOwned>(&self, cf_name: &'static str) -> Result<Vec<T>, StorageError> {
        let mut records = BTreeMap::new();
        for item in self.db.iterator_cf(cf(self.db, cf_name), IteratorMode::Start) {
            let (key, value) = item.map_err(read_err)?;
            records.insert(key.to_vec(), Some(value.to_vec()));
        }
        for (key, value) in self.overlay.get(cf_name).into_iter().flatten() {
            records.insert(key.clone(), value.clone());
        }
        records.into_values().flatten().map(|b| codec::decode("state record", &b).map_err(read_err)).collect()
    }

    pub(crate) fn delete(&mut self, cf_name: &'static str, key: Vec<u8>) {
        self.forget_cached(cf_name, &key);
        self.overlay.entry(cf_name).or_default().insert(key, None);
    }
}

pub(crate) const SETTINGS_KEY: &[u8] = b"cluster";

/// Runtimes placed on each node (in `CF_SETTINGS`), kept by apply so that placing a new runtime
/// reads one record instead of every runtime.
pub(crate) const PLACEMENT_COUNTS_KEY: &[u8] = b"placement-counts";

/// Runtimes per node as this batch sees them (counted from the runtimes themselves the first
/// time, for a store written before the counts were kept).
pub(crate) fn placement_counts(txn: &Txn<'_>) -> Result<BTreeMap<u64, u64>, StorageError> {
    if let Some(counts) = txn.get(CF_SETTINGS, PLACEMENT_COUNTS_KEY)? {
        return Ok(counts);
    }
    let mut counts = BTreeMap::new();
    for runtime in txn.scan::<Runtime>(CF_RUNTIMES)? {
        if let Some(placement) = runtime.placement {
            *counts.entry(placement.node_id).or_default() += 1;
        }
    }
    Ok(counts)
}

/// Records a runtime placed on its node (`added`) or gone from it: the node's count, and its
/// entry in the node's index.
fn count_placement(txn: &mut Txn<'_>, runtime: &Runtime, added: bool) -> Result<(), StorageError> {
    let Some(placement) = &runtime.placement else { return Ok(()) };
    let mut counts = placement_counts(txn)?;
    let count = counts.entry(placement.node_id).or_default();
    *count = if added { *count + 1 } else { count.saturating_sub(1) };
    let key = by_node_key(placement.node_id, &runtime.id);
    if added {
        txn.put(CF_RUNTIMES_BY_NODE, key, &())?;
    } else {
        txn.delete(CF_RUNTIMES_BY_NODE, key);
    }
    txn.put(CF_SETTINGS, PLACEMENT_COUNTS_KEY.to_vec(), &counts)
}

/// The key of a runtime in [`CF_RUNTIMES_BY_NODE`].
fn by_node_key(node_id: u64, runtime_id: &str) -> Vec<u8> {
    [&node_id.to_be_bytes()[..], runtime_id.as_bytes()].concat()
}

/// The cluster-wide settings in force.
pub(crate) fn settings(txn: &Txn<'_>) -> Result<Arc<ClusterSettings>, StorageError> {
    if let Some(settings) = txn.settings.borrow().as_ref() {
        return Ok(settings.clone());
    }
    let settings = Arc::new(txn.get::<ClusterSettings>(CF_SETTINGS, SETTINGS_KEY)?.unwrap_or_default());
    *txn.settings.borrow_mut() = Some(settings.clone());
    Ok(settings)
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_RETENTION_MS: i64 = 24 * 60 * 60 * 1000;

/// Applies the command of the log entry at `index`. Rejections are replies; only store failures
/// are errors (and stop the node: a replica must not skip an entry).
pub(crate) fn apply_entry(txn: &mut Txn<'_>, index: u64, command: Command) -> Result<CommandReply, StorageError> {
    txn.events_in_entry = 0;
    let at = command.at;
    let reply = apply_command(txn, index, command)?;
    if index.is_multiple_of(retention::PRUNE_EVERY) {
        let days = settings(txn)?.event_retention_days;
        retention::prune(txn, at, days)?;
    }
    Ok(reply)
}

fn apply_command(txn: &mut Txn<'_>, index: u64, command: Command) -> Result<CommandReply, StorageError> {
    if let Some(claim) = &command.idempotency {
        let record: Option<IdempotencyRecord> = txn.get(CF_IDEMPOTENCY, claim.key.as_bytes())?;
        if let Some(record) = record {
            if record.fingerprint != claim.fingerprint {
                return Ok(CommandReply::Rejected(Rejection::IdempotencyKeyReused { key: claim.key.clone() }));
            }
            return codec::decode("idempotent reply", &record.reply).map_err(read_err);
        }
    }
    let Command { at, actor, idempotency, op } = command;
    if op.is_node_only() && actor != Actor::System {
        let what = format!("send {} (only nodes do)", op.name());
        return Ok(CommandReply::Rejected(Rejection::NotPermitted { actor: actor.to_string(), what }));
    }
    let settings = settings(txn)?;
    let mut events = EventWriter { index, at, actor: &actor, retention: settings.clone() };
    let reply = match op {
        Op::Batch(commands) => {
            let mut replies = Vec::with_capacity(commands.len());
            for command in commands {
                replies.push(apply_command(txn, index, command)?);
            }
            CommandReply::Batch(replies)
        }
        Op::CreateRuntime { runtime, operation } => create_runtime(
            txn,
            &mut events,
            &settings,
            runtime,
            Operation { requested_by: actor.clone(), ..operation },
        )?,
        Op::UpdateRuntime { runtime, expected_version } => {
            update_runtime(txn, &mut events, at, runtime, expected_version)?
        }
        Op::PatchLabels { operation, expected_version } => {
            let operation = Operation { requested_by: actor.clone(), ..operation };
            patch_labels(txn, &mut events, &settings, operation, expected_version)?
        }
        Op::BeginOperation { operation, expected_version } => {
            let operation = Operation { requested_by: actor.clone(), ..operation };
            begin_operation(txn, &mut events, &settings, operation, expected_version)?
        }
        Op::AdvanceOperation { operation_id, status, progress, error, token, completed_actions, failed_action } => {
            let report = Report { status, progress, error, token: Some(token), completed_actions, failed_action };
            advance_operation(txn, &mut events, &operation_id, report)?
        }
        Op::CancelOperation { operation_id } => {
            let report = Report {
                status: OperationStatus::Cancelled,
                progress: None,
                error: None,
                token: None,
                completed_actions: None,
                failed_action: None,
            };
            advance_operation(txn, &mut events, &operation_id, report)?
        }
        Op::DecideApproval { operation_id, approve, reason } => {
            decide_approval(txn, &mut events, &actor, &operation_id, approve, reason)?
        }
        Op::AssignOperation { operation_id, node_id, lease_ms, expected_token } => {
            let assignment = Assignment {
                node_id,
                token: index,
                lease_until: at + chrono::Duration::milliseconds(lease_ms.min(86_400_000) as i64),
            };
            assign_operation(txn, &mut events, &settings, &operation_id, assignment, expected_token)?
        }
        Op::RenewLease { operation_id, token, lease_ms } => match load_operation(txn, &operation_id)? {
            Err(rejection) => CommandReply::Rejected(rejection),
            Ok(mut operation) => match check_token(&operation, Some(token)) {
                Err(rejection) => CommandReply::Rejected(rejection),
                Ok(()) if operation.status.is_terminal() => {
                    CommandReply::Rejected(status_rejection(&operation, "running"))
                }
                Ok(()) => {
                    if let Some(assignment) = &mut operation.assignment {
                        assignment.lease_until = at + chrono::Duration::milliseconds(lease_ms.min(86_400_000) as i64);
                    }
                    put_operation(txn, &operation)?;
                    CommandReply::Operation(operation)
                }
            },
        },
        Op::RecordDrift { runtime_id, observed, action, state } => match load_runtime(txn, &runtime_id, None)? {
            Err(rejection) => CommandReply::Rejected(rejection),
            Ok(runtime) if runtime.active_operation.is_some() => {
                CommandReply::Rejected(Rejection::OperationInProgress {
                    operation_id: runtime.active_operation.clone().unwrap_or_default(),
                    runtime_id,
                })
            }
            Ok(mut runtime) => {
                let from = runtime.state;
                let was = RuntimeField::of(&runtime);
                if let Some(state) = state {
                    runtime.state = state;
                }
                save_runtime(txn, at, &mut runtime, &was)?;
                let mut data = serde_json::Map::new();
                data.insert("observed".into(), observed.into());
                data.insert("action".into(), action.into());
                data.insert("from_state".into(), from.as_str().into());
                data.insert("to_state".into(), runtime.state.as_str().into());
                let severity = match runtime.state {
                    RuntimeState::Error => EventSeverity::Critical,
                    _ => EventSeverity::Warning,
                };
                events.write(txn, &runtime.id, "runtime.drift", severity, &JsonObject(data))?;
                CommandReply::Runtime(runtime)
            }
        },
        Op::ReportSignals { signals } => {
            let mut recorded = 0;
            for (runtime_id, observed) in signals {
                if let Some(mut runtime) = txn.get::<Runtime>(CF_RUNTIMES, runtime_id.as_bytes())? {
                    // Observations are not changes: no version bump, no event.
                    runtime.signals = Some(observed);
                    txn.put(CF_RUNTIMES, runtime_id.into_bytes(), &runtime)?;
                    recorded += 1;
                }
            }
            CommandReply::SignalsRecorded(recorded)
        }
        Op::SubmitIntent { intent, operation } => {
            let operation = match operation {
                None => None,
                Some(operation) => match begin_operation(
                    txn,
                    &mut events,
                    &settings,
                    Operation { requested_by: actor.clone(), ..operation },
                    None,
                )? {
                    CommandReply::Operation(operation) => Some(operation),
                    rejected => return finish(txn, at, idempotency, rejected),
                },
            };
            txn.put(CF_INTENTS, intent.id.as_bytes().to_vec(), &intent)?;
            retention::ended(txn, at, Ended::Intent, &intent.id, &intent.runtime_id)?;
            CommandReply::Intent { intent, operation }
        }
        Op::CreatePolicy { policy } => create_policy(txn, &mut events, &settings, policy)?,
        Op::DeletePolicy { id } => match txn.get::<Policy>(CF_POLICIES, id.as_bytes())? {
            None => CommandReply::Rejected(Rejection::NotFound { kind: "policy".into(), id }),
            Some(policy) => {
                txn.delete(CF_POLICIES, id.as_bytes().to_vec());
                let data = audit_data(&[("policy_id", &id), ("name", &policy.name)], policy.tenant_id.as_deref());
                events.write(txn, AUDIT_STREAM, "policy.deleted", EventSeverity::Warning, &data)?;
                CommandReply::Deleted { id }
            }
        },
        Op::RegisterNode { info } => {
            txn.put(CF_NODES, info.node_id.to_be_bytes().to_vec(), &info)?;
            CommandReply::NodeRegistered
        }
        Op::SetSettings { settings } => {
            txn.put(CF_SETTINGS, SETTINGS_KEY.to_vec(), &settings)?;
            let retention =
                format!("{} events, {} days", settings.event_retention_count, settings.event_retention_days);
            let data = audit_data(&[("event_retention", &retention)], None);
            events.write(txn, AUDIT_STREAM, "settings.changed", EventSeverity::Warning, &data)?;
            CommandReply::Settings(settings)
        }
        Op::CreateApiKey { key, replaces } => create_api_key(txn, &mut events, key, replaces)?,
        Op::AuditMembership { change, node_id, grpc_addr } => {
            let node = node_id.to_string();
            let mut fields = vec![("node_id", node.as_str())];
            if let Some(addr) = &grpc_addr {
                fields.push(("grpc", addr));
            }
            let severity = EventSeverity::Warning;
            events.write(txn, AUDIT_STREAM, &format!("member.{change}"), severity, &audit_data(&fields, None))?;
            CommandReply::Audited
        }
        Op::RevokeApiKey { id } => match txn.get::<ApiKey>(CF_API_KEYS, id.as_bytes())? {
            None => CommandReply::Rejected(Rejection::NotFound { kind: "API key".into(), id }),
            Some(mut key) => {
                if key.revoked_at.is_none() {
                    key.revoked_at = Some(at);
                    txn.put(CF_API_KEYS, id.as_bytes().to_vec(), &key)?;
                    txn.api_keys_written = true;
                    let data = audit_data(&[("key_id", &key.id), ("principal", &key.principal.name)], None);
                    events.write(txn, AUDIT_STREAM, "apikey.revoked", EventSeverity::Warning, &data)?;
                }
                CommandReply::ApiKey(key)
            }
        },
    };
    finish(txn, at, idempotency, reply)
}

/// The events stream of changes to the cluster itself (policies, keys, settings): the audit
/// feed admins read at `GET /v1/audit`. Runtime ids start with `rt_`, so it is no runtime's.
pub const AUDIT_STREAM: &str = "cluster";

/// An audit event's data: the named fields and the tenant the change concerns, if any.
fn audit_data(fields: &[(&str, &str)], tenant: Option<&str>) -> JsonObject {
    let mut data: serde_json::Map<String, serde_json::Value> =
        fields.iter().map(|(name, value)| (name.to_string(), (*value).into())).collect();
    data.insert("tenant_id".into(), tenant.into());
    JsonObject(data)
}

/// Stores a new API key, revoking the one it replaces (a rotation) in the same entry.
fn create_api_key(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    key: ApiKey,
    replaces: Option<String>,
) -> Result<CommandReply, StorageError> {
    if txn.get::<ApiKey>(CF_API_KEYS, key.id.as_bytes())?.is_some() {
        return Ok(CommandReply::Rejected(Rejection::AlreadyExists { kind: "API key".into(), id: key.id }));
    }
    if let Some(old_id) = &replaces {
        let Some(mut old) = txn.get::<ApiKey>(CF_API_KEYS, old_id.as_bytes())? else {
            return Ok(CommandReply::Rejected(Rejection::NotFound { kind: "API key".into(), id: old_id.clone() }));
        };
        if old.revoked_at.is_some() {
            return Ok(CommandReply::Rejected(Rejection::IllegalOperationStatus {
                id: old_id.clone(),
                from: "revoked".into(),
                to: "rotated".into(),
            }));
        }
        old.revoked_at = Some(events.at);
        txn.put(CF_API_KEYS, old_id.as_bytes().to_vec(), &old)?;
    }
    txn.put(CF_API_KEYS, key.id.as_bytes().to_vec(), &key)?;
    txn.api_keys_written = true;
    let roles = key.principal.roles.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join(",");
    let mut fields = vec![("key_id", key.id.as_str()), ("principal", &key.principal.name), ("roles", &roles)];
    if let Some(old_id) = &replaces {
        fields.push(("replaces", old_id));
    }
    events.write(txn, AUDIT_STREAM, "apikey.created", EventSeverity::Info, &audit_data(&fields, None))?;
    Ok(CommandReply::ApiKey(key))
}

/// Remembers the reply under the command's idempotency key, if it has one.
fn finish(
    txn: &mut Txn<'_>,
    at: Timestamp,
    idempotency: Option<IdempotencyClaim>,
    reply: CommandReply,
) -> Result<CommandReply, StorageError> {
    if let Some(claim) = idempotency {
        remember_reply(txn, at, claim, &reply)?;
    }
    Ok(reply)
}

/// Stores the reply under the idempotency key, and forgets keys past their retention.
fn remember_reply(
    txn: &mut Txn<'_>,
    at: Timestamp,
    claim: IdempotencyClaim,
    reply: &CommandReply,
) -> Result<(), StorageError> {
    let now_ms = at.timestamp_millis().max(0) as u64;
    let cutoff = now_ms.saturating_sub(IDEMPOTENCY_RETENTION_MS as u64);
    let mut expired = Vec::new();
    for item in txn.db.iterator_cf(cf(txn.db, CF_IDEMPOTENCY_BY_TIME), IteratorMode::Start) {
        let (key, _) = item.map_err(read_err)?;
        let ts = key.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
        if ts >= cutoff {
            break;
        }
        expired.push(key.to_vec());
    }
    for key in expired {
        txn.delete(CF_IDEMPOTENCY, key.get(9..).unwrap_or_default().to_vec());
        txn.delete(CF_IDEMPOTENCY_BY_TIME, key);
    }
    let record = IdempotencyRecord {
        key: claim.key.clone(),
        fingerprint: claim.fingerprint,
        reply: codec::encode("idempotent reply", reply).map_err(write_err)?,
        created_at: at,
    };
    let mut by_time = now_ms.to_be_bytes().to_vec();
    by_time.push(0);
    by_time.extend_from_slice(claim.key.as_bytes());
    txn.put(CF_IDEMPOTENCY_BY_TIME, by_time, &())?;
    txn.put(CF_IDEMPOTENCY, claim.key.into_bytes(), &record)
}

fn labels_data(runtime: &Runtime) -> JsonObject {
    let mut data = serde_json::Map::new();
    data.insert("labels".into(), serde_json::to_value(&runtime.labels).unwrap_or_default());
    JsonObject(data)
}

fn operation_data(operation: &Operation, from: RuntimeState, to: RuntimeState) -> JsonText<OperationData<'_>> {
    JsonText(OperationData {
        action: operation.action.kind(),
        decisions: None,
        error: operation.error.as_ref().map(|error| format!("{}: {}", error.code, error.message)),
        from_state: from.as_str(),
        operation_id: &operation.id,
        status: operation.status.as_str(),
        to_state: to.as_str(),
    })
}

/// Loads a runtime and checks an `If-Match` version.
fn load_runtime(
    txn: &Txn<'_>,
    id: &str,
    expected_version: Option<u64>,
) -> Result<Result<Runtime, Rejection>, StorageError> {
    Ok(match txn.get::<Runtime>(CF_RUNTIMES, id.as_bytes())? {
        None => Err(Rejection::NotFound { kind: "runtime".into(), id: id.to_string() }),
        Some(runtime) => check_version(expected_version, runtime.version).map(|()| runtime),
    })
}

fn check_version(expected: Option<u64>, actual: u64) -> Result<(), Rejection> {
    match expected {
        Some(expected) if expected != actual => Err(Rejection::VersionMismatch { expected, actual }),
        _ => Ok(()),
    }
}

/// Writes a changed runtime; `was` is what it was indexed under before the change.
fn save_runtime(
    txn: &mut Txn<'_>,
    at: Timestamp,
    runtime: &mut Runtime,
    was: &[RuntimeField],
) -> Result<(), StorageError> {
    runtime.version += 1;
    runtime.updated_at = Some(at);
    runtime_index::reindex(txn, &runtime.id, Some(was), Some(&RuntimeField::of(runtime)))?;
    txn.put(CF_RUNTIMES, runtime.id.as_bytes().to_vec(), runtime)
}

/// A new runtime against the limits on one runtime and its tenant's quota.
fn check_new_runtime(
    txn: &Txn<'_>,
    settings: &ClusterSettings,
    runtime: &Runtime,
) -> Result<Result<(), Rejection>, StorageError> {
    if let Err(exceeded) = settings.limits.check_runtime(runtime) {
        return Ok(Err(exceeded.into()));
    }
    let Some(tenant) = &runtime.tenant_id else { return Ok(Ok(())) };
    let count = runtime_index::count(txn, &RuntimeField::Tenant(tenant.clone()))? as usize;
    let what = format!("the number of runtimes of tenant {tenant} with this one");
    let quota = settings.limits.runtimes_per_tenant;
    Ok(runtimeai_model::within_limit("runtimes_per_tenant", quota, count + 1, &what).map_err(Rejection::from))
}

/// Writes an operation that already exists. Its indexes (the runtime's list, the unfinished
/// set) were written with it and do not change, except that a finished one leaves the set.
fn put_operation(txn: &mut Txn<'_>, operation: &Operation) -> Result<(), StorageError> {
    txn.put(CF_OPERATIONS, operation.id.as_bytes().to_vec(), operation)?;
    let written = if operation.status.is_terminal() {
        txn.delete(CF_ACTIVE_OPERATIONS, operation.id.as_bytes().to_vec());
        OperationWritten::Finished(operation.id.clone())
    } else {
        OperationWritten::Unfinished(Box::new(operation.clone()))
    };
    txn.operations_written.push(written);
    Ok(())
}

/// An operation written by apply, as the in-memory set of unfinished operations follows it: a
/// finished one only leaves the set, so only its id is kept.
pub(crate) enum OperationWritten {
    Unfinished(Box<Operation>),
    Finished(String),
}

/// Writes a new operation with its indexes.
fn put_new_operation(txn: &mut Txn<'_>, operation: &Operation) -> Result<(), StorageError> {
    if !operation.status.is_terminal() {
        txn.put(CF_ACTIVE_OPERATIONS, operation.id.as_bytes().to_vec(), &operation.runtime_id)?;
    }
    txn.put(CF_RUNTIME_OPERATIONS, runtime_operation_key(&operation.runtime_id, &operation.id), &())?;
    put_operation(txn, operation)
}

/// The key of an operation in its runtime's index ([`CF_RUNTIME_OPERATIONS`]).
pub(crate) fn runtime_operation_key(runtime_id: &str, operation_id: &str) -> Vec<u8> {
    let mut key = event_prefix(runtime_id);
    key.extend_from_slice(operation_id.as_bytes());
    key
}

fn create_runtime(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    runtime: Arc<Runtime>,
    mut operation: Operation,
) -> Result<CommandReply, StorageError> {
    if let Some(existing) = txn.get::<Runtime>(CF_RUNTIMES, runtime.id.as_bytes())? {
        // Ids are fresh per request: the same id and operation again is a retry of a create
        // whose reply was lost, and gets the same answer.
        if let Some(first_operation) = txn.get::<Operation>(CF_OPERATIONS, operation.id.as_bytes())? {
            if existing.created_at == runtime.created_at && first_operation.runtime_id == runtime.id {
                return Ok(CommandReply::Created { runtime: Arc::new(existing), operation: first_operation });
            }
        }
        let id = runtime.id.clone();
        return Ok(CommandReply::Rejected(Rejection::AlreadyExists { kind: "runtime".into(), id }));
    }
    let name = name_key(runtime.tenant_id.as_deref(), &runtime.name);
    if let Some(existing_id) = txn.get::<String>(CF_RUNTIME_NAMES, &name)? {
        return Ok(CommandReply::Rejected(Rejection::NameTaken { name: runtime.name.clone(), existing_id }));
    }
    if let Err(rejection) = check_new_runtime(txn, settings, &runtime)? {
        return Ok(CommandReply::Rejected(rejection));
    }
    let offered = operation.assignment.take();
    let decisions = evaluate_policies(txn, settings, &runtime, &operation)?;
    if let Some(rejection) = judge(txn, events, &runtime.id, &mut operation, decisions)? {
        return Ok(CommandReply::Rejected(rejection));
    }
    // Counted before the runtime is stored: a first count from the runtimes must not see it.
    count_placement(txn, &runtime, true)?;
    runtime_index::reindex(txn, &runtime.id, None, Some(&RuntimeField::of(&runtime)))?;
    txn.put(CF_RUNTIME_NAMES, name, &runtime.id)?;
    txn.put(CF_RUNTIMES, runtime.id.as_bytes().to_vec(), &runtime)?;
    let data = JsonText(CreatedData {
        decisions: &operation.decisions,
        name: &runtime.name,
        operation_id: &operation.id,
        status: operation.status.as_str(),
        runtime_type: runtime.runtime_type.as_str(),
    });
    events.write(txn, &runtime.id, "runtime.created", EventSeverity::Info, &data)?;
    hand_over_offered(txn, events, &mut operation, offered)?;
    put_new_operation(txn, &operation)?;
    Ok(CommandReply::Created { runtime, operation })
}

/// Every policy, as this batch sees them (decoded once per batch until one is written).
fn policies(txn: &Txn<'_>) -> Result<Arc<Vec<Policy>>, StorageError> {
    if let Some(policies) = txn.policies.borrow().as_ref() {
        return Ok(policies.clone());
    }
    let policies = Arc::new(txn.scan::<Policy>(CF_POLICIES)?);
    *txn.policies.borrow_mut() = Some(policies.clone());
    Ok(policies)
}

/// The policy decisions on an operation's actions, for the runtime as it was before it.
fn evaluate_policies(
    txn: &Txn<'_>,
    settings: &ClusterSettings,
    runtime: &Runtime,
    operation: &Operation,
) -> Result<Vec<PolicyDecision>, StorageError> {
    let policies = policies(txn)?;
    let before = if runtime.state == operation.prior_state {
        std::borrow::Cow::Borrowed(runtime)
    } else {
        std::borrow::Cow::Owned(Runtime { state: operation.prior_state, ..runtime.clone() })
    };
    let request = policy::Request {
        runtime: &before,
        actions: operation.action.steps(),
        actor: &operation.requested_by,
        mode: operation.policy_mode,
        sizes: &settings.sizes,
    };
    Ok(policy::evaluate(&policies, request))
}

fn decision_data(operation: &Operation, decision: &PolicyDecision) -> JsonObject {
    let mut data = serde_json::Map::new();
    data.insert("operation_id".into(), operation.id.clone().into());
    data.insert("decision".into(), serde_json::to_value(decision).unwrap_or_default());
    JsonObject(data)
}

/// Records the decisions on the operation and acts on the overall verdict: a denial is a
/// rejection (with its event), approval parks the operation in `pending_approval`.
fn judge(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    runtime_id: &str,
    operation: &mut Operation,
    decisions: Vec<PolicyDecision>,
) -> Result<Option<Rejection>, StorageError> {
    let deciding = policy::deciding(&decisions).cloned();
    operation.decisions = decisions;
    let Some(decision) = deciding else { return Ok(None) };
    match decision.verdict {
        Verdict::Allow => Ok(None),
        Verdict::Deny => {
            events.write(
                txn,
                runtime_id,
                "policy.denied",
                EventSeverity::Warning,
                &decision_data(operation, &decision),
            )?;
            Ok(Some(Rejection::PolicyDenied { decision }))
        }
        Verdict::RequireApproval => {
            operation.status = OperationStatus::PendingApproval;
            let data = decision_data(operation, &decision);
            events.write(txn, runtime_id, "policy.approval_required", EventSeverity::Warning, &data)?;
            Ok(None)
        }
    }
}

fn update_runtime(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    at: Timestamp,
    mut runtime: Runtime,
    expected_version: Option<u64>,
) -> Result<CommandReply, StorageError> {
    let current = match load_runtime(txn, &runtime.id, expected_version)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(current) => current,
    };
    let old_name = name_key(current.tenant_id.as_deref(), &current.name);
    let new_name = name_key(runtime.tenant_id.as_deref(), &runtime.name);
    if old_name != new_name {
        if let Some(existing_id) = txn.get::<String>(CF_RUNTIME_NAMES, &new_name)? {
            return Ok(CommandReply::Rejected(Rejection::NameTaken { name: runtime.name, existing_id }));
        }
        txn.delete(CF_RUNTIME_NAMES, old_name);
        txn.put(CF_RUNTIME_NAMES, new_name, &runtime.id)?;
    }
    runtime.version = current.version;
    runtime.created_at = current.created_at;
    // Where a runtime runs is decided when it is created (and indexed by node): an update
    // does not move it.
    runtime.placement = current.placement.clone();
    if let Err(exceeded) = settings(txn)?.limits.check_runtime(&runtime) {
        return Ok(CommandReply::Rejected(exceeded.into()));
    }
    save_runtime(txn, at, &mut runtime, &RuntimeField::of(&current))?;
    events.write(txn, &runtime.id, "runtime.updated", EventSeverity::Info, &JsonObject::default())?;
    Ok(CommandReply::Runtime(runtime))
}

/// The refusal of a new operation on a runtime that has one on its way.
fn busy(runtime: &Runtime) -> Option<Rejection> {
    let active = runtime.active_operation.as_ref()?;
    Some(Rejection::OperationInProgress { runtime_id: runtime.id.clone(), operation_id: active.clone() })
}

/// See [`Op::PatchLabels`].
fn patch_labels(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    operation: Operation,
    expected_version: Option<u64>,
) -> Result<CommandReply, StorageError> {
    let at = events.at;
    let mut runtime = match load_runtime(txn, &operation.runtime_id, expected_version)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(runtime) => runtime,
    };
    let mut relabeled = runtime.labels.clone();
    operation.action.apply_to_labels(&mut relabeled);
    if let Err(exceeded) = settings.limits.check_labels(&relabeled) {
        return Ok(CommandReply::Rejected(exceeded.into()));
    }
    let was = RuntimeField::of(&runtime);
    let mut operation = Operation { prior_state: runtime.state, assignment: None, ..operation };
    let decisions = evaluate_policies(txn, settings, &runtime, &operation)?;
    if policy::overall(&decisions) == Verdict::RequireApproval {
        // Waiting for approval, the relabel holds the runtime like any operation.
        if let Some(busy) = busy(&runtime) {
            return Ok(CommandReply::Rejected(busy));
        }
    }
    if let Some(rejection) = judge(txn, events, &runtime.id, &mut operation, decisions)? {
        return Ok(CommandReply::Rejected(rejection));
    }
    if operation.status == OperationStatus::PendingApproval {
        runtime.active_operation = Some(operation.id.clone());
        save_runtime(txn, at, &mut runtime, &was)?;
        put_new_operation(txn, &operation)?;
        return Ok(CommandReply::Operation(operation));
    }
    runtime.labels = relabeled;
    save_runtime(txn, at, &mut runtime, &was)?;
    events.write(txn, &runtime.id, "runtime.labels", EventSeverity::Info, &labels_data(&runtime))?;
    Ok(CommandReply::Runtime(runtime))
}

fn begin_operation(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    operation: Operation,
    expected_version: Option<u64>,
) -> Result<CommandReply, StorageError> {
    let at = events.at;
    let mut runtime = match load_runtime(txn, &operation.runtime_id, expected_version)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(runtime) => runtime,
    };
    if let Some(busy) = busy(&runtime) {
        return Ok(CommandReply::Rejected(busy));
    }
    let during = match operation.action.transition(runtime.state) {
        Ok((during, _)) => during,
        Err(illegal) => {
            return Ok(CommandReply::Rejected(Rejection::IllegalTransition {
                runtime_id: runtime.id,
                action: illegal.action.to_string(),
                state: illegal.state.to_string(),
            }))
        }
    };
    if let Err(exceeded) = check_snapshots(settings, &runtime, &operation.action) {
        return Ok(CommandReply::Rejected(exceeded.into()));
    }
    let offered = operation.assignment.clone();
    let mut operation = Operation { prior_state: runtime.state, assignment: None, ..operation };
    let decisions = evaluate_policies(txn, settings, &runtime, &operation)?;
    if let Some(rejection) = judge(txn, events, &runtime.id, &mut operation, decisions)? {
        return Ok(CommandReply::Rejected(rejection));
    }
    let from = runtime.state;
    let was = RuntimeField::of(&runtime);
    runtime.state = during;
    runtime.active_operation = Some(operation.id.clone());
    save_runtime(txn, at, &mut runtime, &was)?;
    let event_type = format!("lifecycle.{}", operation.action.kind());
    let mut data = operation_data(&operation, from, during);
    // Every decision, allowing ones included, is on record with the rule that made it.
    data.0.decisions = Some(&operation.decisions);
    events.write(txn, &runtime.id, &event_type, EventSeverity::Info, &data)?;
    hand_over_offered(txn, events, &mut operation, offered)?;
    put_new_operation(txn, &operation)?;
    Ok(CommandReply::Operation(operation))
}

fn create_policy(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    policy: Policy,
) -> Result<CommandReply, StorageError> {
    if txn.get::<Policy>(CF_POLICIES, policy.id.as_bytes())?.is_some() {
        return Ok(CommandReply::Rejected(Rejection::AlreadyExists { kind: "policy".into(), id: policy.id }));
    }
    let count = policies(txn)?.len() + 1;
    let within = settings.limits.check_policy(&policy).and_then(|()| {
        runtimeai_model::within_limit(
            "policies",
            settings.limits.policies,
            count,
            "the number of policies with this one",
        )
    });
    if let Err(exceeded) = within {
        return Ok(CommandReply::Rejected(exceeded.into()));
    }
    txn.put(CF_POLICIES, policy.id.as_bytes().to_vec(), &policy)?;
    let data = audit_data(&[("policy_id", &policy.id), ("name", &policy.name)], policy.tenant_id.as_deref());
    events.write(txn, AUDIT_STREAM, "policy.created", EventSeverity::Info, &data)?;
    Ok(CommandReply::Policy(policy))
}

/// The snapshots a runtime would have once `action` succeeds, against their cap.
fn check_snapshots(
    settings: &ClusterSettings,
    runtime: &Runtime,
    action: &LifecycleAction,
) -> Result<(), runtimeai_model::LimitExceeded> {
    let taken = action.steps().iter().filter(|step| matches!(step, LifecycleAction::Snapshot { .. })).count();
    if taken == 0 {
        return Ok(());
    }
    let what = "the number of snapshots with this one";
    runtimeai_model::within_limit(
        "snapshots_per_runtime",
        settings.limits.snapshots_per_runtime,
        runtime.snapshots.len() + taken,
        what,
    )
}

/// What an executor (or a client's cancel) reports about an operation.
struct Report {
    status: OperationStatus,
    progress: Option<OperationProgress>,
    error: Option<OperationError>,
    token: Option<u64>,
    completed_actions: Option<u32>,
    failed_action: Option<u32>,
}

fn load_operation(txn: &Txn<'_>, id: &str) -> Result<Result<Operation, Rejection>, StorageError> {
    Ok(txn.operation(id)?.ok_or_else(|| Rejection::NotFound { kind: "operation".into(), id: id.into() }))
}

/// A report with a fencing token must carry the current assignment's.
fn check_token(operation: &Operation, token: Option<u64>) -> Result<(), Rejection> {
    let current = operation.assignment.as_ref().map(|a| a.token);
    match token {
        Some(token) if current != Some(token) => {
            Err(Rejection::StaleToken { operation_id: operation.id.clone(), token: Some(token), current })
        }
        _ => Ok(()),
    }
}

fn status_rejection(operation: &Operation, to: &str) -> Rejection {
    Rejection::IllegalOperationStatus {
        id: operation.id.clone(),
        from: operation.status.as_str().into(),
        to: to.into(),
    }
}

fn advance_operation(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    operation_id: &str,
    report: Report,
) -> Result<CommandReply, StorageError> {
    use OperationStatus::*;
    let mut operation = match load_operation(txn, operation_id)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(operation) => operation,
    };
    if let Err(rejection) = check_token(&operation, report.token) {
        return Ok(CommandReply::Rejected(rejection));
    }
    let status = report.status;
    // An executor whose first step was quick reports its outcome without `running` first.
    let legal = matches!(
        (operation.status, status),
        (Queued | PendingApproval, Running | Failed | Cancelled) | (Running, Running | Succeeded | Failed | Cancelled)
    ) || (operation.status == Queued && status == Succeeded && report.token.is_some());
    if !legal {
        return Ok(CommandReply::Rejected(status_rejection(&operation, status.as_str())));
    }
    operation.status = status;
    let message = report.progress.as_ref().and_then(|p| p.message.clone());
    operation.progress = report.progress.or(operation.progress);
    operation.error = report.error;
    if let Some(completed) = report.completed_actions {
        // An executor reports its last step's outcome with the success itself.
        let says_step = status == OperationStatus::Running
            || (status == OperationStatus::Succeeded && completed > operation.completed_actions);
        operation.completed_actions = completed;
        if let (true, Some(message), Some(index)) = (says_step, message, completed.checked_sub(1)) {
            let index = index as usize;
            if operation.action_messages.len() <= index {
                operation.action_messages.resize(index + 1, String::new());
            }
            operation.action_messages[index] = message;
        }
    }
    if report.failed_action.is_some() {
        operation.failed_action = report.failed_action;
    }
    operation.version += 1;
    if !status.is_terminal() {
        put_operation(txn, &operation)?;
        return Ok(CommandReply::Operation(operation));
    }
    finish_operation(txn, events, operation)
}

/// Ends an operation (its status already terminal): applies a success's effect to the runtime,
/// or puts the runtime back where it was, and frees the runtime for the next operation.
fn finish_operation(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    mut operation: Operation,
) -> Result<CommandReply, StorageError> {
    use OperationStatus::*;
    let at = events.at;
    operation.finished_at = Some(at);
    retention::ended(txn, at, Ended::Operation, &operation.id, &operation.runtime_id)?;
    let Some(mut runtime) = txn.get::<Runtime>(CF_RUNTIMES, operation.runtime_id.as_bytes())? else {
        put_operation(txn, &operation)?;
        return Ok(CommandReply::Operation(operation));
    };
    let from = runtime.state;
    let was = RuntimeField::of(&runtime);
    runtime.active_operation = None;
    if operation.status == Succeeded {
        let applied = match &operation.action {
            // A sequence may fail part way: its actions are applied to a copy.
            LifecycleAction::Sequence { .. } => {
                let mut done = Runtime { state: operation.prior_state, ..runtime.clone() };
                apply_success(&mut done, &operation.action, at).map(|()| runtime = done)
            }
            // A single action changes the runtime only once it cannot fail any more; on a
            // failure the state is set below.
            action => {
                runtime.state = operation.prior_state;
                apply_success(&mut runtime, action, at)
            }
        };
        match applied {
            Ok(()) => {}
            Err((failed_action, error)) => {
                operation.status = Failed;
                operation.error = Some(error);
                operation.failed_action = failed_action;
            }
        }
    }
    match operation.status {
        Succeeded => {}
        // A failed or cancelled create leaves a runtime without a backend: an error state.
        // Anything else returns to the state it had.
        _ if operation.action == LifecycleAction::Create => runtime.state = RuntimeState::Error,
        _ => runtime.state = operation.prior_state,
    }
    put_operation(txn, &operation)?;
    let severity = if operation.status == Failed { EventSeverity::Warning } else { EventSeverity::Info };
    let event_type = format!("operation.{}", operation.status.as_str());
    events.write(txn, &runtime.id, &event_type, severity, &operation_data(&operation, from, runtime.state))?;
    if runtime.state == RuntimeState::Deleted {
        txn.delete(CF_RUNTIME_NAMES, name_key(runtime.tenant_id.as_deref(), &runtime.name));
        count_placement(txn, &runtime, false)?;
        runtime_index::reindex(txn, &runtime.id, Some(&was), None)?;
        txn.delete(CF_RUNTIMES, runtime.id.as_bytes().to_vec());
        retention::ended(txn, at, Ended::Runtime, &runtime.id, &runtime.id)?;
        events.write(txn, &runtime.id, "runtime.deleted", EventSeverity::Info, &JsonObject::default())?;
    } else {
        save_runtime(txn, at, &mut runtime, &was)?;
    }
    Ok(CommandReply::Operation(operation))
}

fn decide_approval(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    actor: &Actor,
    operation_id: &str,
    approve: bool,
    reason: Option<String>,
) -> Result<CommandReply, StorageError> {
    let mut operation = match load_operation(txn, operation_id)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(operation) => operation,
    };
    if operation.status != OperationStatus::PendingApproval {
        let to = if approve { "queued (approve)" } else { "cancelled (reject)" };
        return Ok(CommandReply::Rejected(status_rejection(&operation, to)));
    }
    // Agents decide nothing, and nobody approves their own request (four eyes). Checked here,
    // where every replica agrees, whatever path the command took.
    if matches!(actor, Actor::Agent(_)) {
        let what = format!("{} operation {}", if approve { "approve" } else { "reject" }, operation.id);
        return Ok(CommandReply::Rejected(Rejection::NotPermitted { actor: actor.to_string(), what }));
    }
    if approve && *actor == operation.requested_by {
        return Ok(CommandReply::Rejected(Rejection::SelfApproval {
            operation_id: operation.id,
            actor: actor.to_string(),
        }));
    }
    let at = events.at;
    operation.approval = Some(Approval { approved: approve, by: actor.to_string(), at, reason: reason.clone() });
    operation.version += 1;
    let mut data = serde_json::Map::new();
    data.insert("operation_id".into(), operation.id.clone().into());
    data.insert("by".into(), actor.to_string().into());
    data.insert("reason".into(), reason.clone().into());
    let runtime_id = operation.runtime_id.clone();
    if approve {
        events.write(txn, &runtime_id, "operation.approved", EventSeverity::Info, &JsonObject(data))?;
        if !operation.action.needs_backend() {
            // Nothing for an executor to do (a relabel): approved is done.
            operation.status = OperationStatus::Succeeded;
            return finish_operation(txn, events, operation);
        }
        operation.status = OperationStatus::Queued;
        put_operation(txn, &operation)?;
        return Ok(CommandReply::Operation(operation));
    }
    events.write(txn, &runtime_id, "operation.rejected", EventSeverity::Info, &JsonObject(data))?;
    operation.status = OperationStatus::Cancelled;
    operation.error = Some(OperationError {
        code: "rejected".into(),
        message: format!("rejected by {actor}: {}", reason.unwrap_or_default()),
    });
    finish_operation(txn, events, operation)
}

fn assign_operation(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    operation_id: &str,
    assignment: Assignment,
    expected_token: Option<u64>,
) -> Result<CommandReply, StorageError> {
    let mut operation = match load_operation(txn, operation_id)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(operation) => operation,
    };
    if !matches!(operation.status, OperationStatus::Queued | OperationStatus::Running) {
        return Ok(CommandReply::Rejected(status_rejection(&operation, "assigned")));
    }
    let current = operation.assignment.as_ref().map(|a| a.token);
    if current != expected_token {
        return Ok(CommandReply::Rejected(Rejection::StaleToken {
            operation_id: operation.id,
            token: expected_token,
            current,
        }));
    }
    if operation.status == OperationStatus::Queued {
        // Right before it runs: the policies of now, not of when it was accepted.
        let runtime = txn.get::<Runtime>(CF_RUNTIMES, operation.runtime_id.as_bytes())?;
        if let Some(runtime) = runtime {
            let decisions = evaluate_policies(txn, settings, &runtime, &operation)?;
            let approved = operation.approval.as_ref().is_some_and(|a| a.approved);
            let verdict = policy::overall(&decisions);
            if verdict == Verdict::RequireApproval && approved {
                operation.decisions = decisions;
            } else if let Some(rejection) = judge(txn, events, &runtime.id, &mut operation, decisions)? {
                let Rejection::PolicyDenied { decision } = &rejection else { unreachable!("judge only denies") };
                operation.status = OperationStatus::Failed;
                operation.error =
                    Some(OperationError { code: "policy_denied".into(), message: decision.reason.clone() });
                operation.failed_action = Some(decision.action_index);
                operation.version += 1;
                return finish_operation(txn, events, operation);
            } else if operation.status == OperationStatus::PendingApproval {
                operation.version += 1;
                put_operation(txn, &operation)?;
                return Ok(CommandReply::Operation(operation));
            }
        }
    }
    operation.version += 1;
    hand_over(txn, events, &mut operation, assignment)?;
    put_operation(txn, &operation)?;
    Ok(CommandReply::Operation(operation))
}

/// Hands an operation to an executor (the caller stores the operation).
fn hand_over(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    operation: &mut Operation,
    assignment: Assignment,
) -> Result<(), StorageError> {
    operation.attempts += 1;
    let data = JsonText(AssignedData {
        attempt: operation.attempts,
        node_id: assignment.node_id,
        operation_id: &operation.id,
        token: assignment.token,
    });
    events.write(txn, &operation.runtime_id, "operation.assigned", EventSeverity::Info, &data)?;
    operation.assignment = Some(assignment);
    Ok(())
}

/// The leader may offer an executor in the entry that queues an operation (see
/// `Replica::set_assigner`), saving an `AssignOperation` entry. The offer is taken if the
/// operation was queued (not parked for approval); the entry's index is its fencing token.
fn hand_over_offered(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    operation: &mut Operation,
    offered: Option<Assignment>,
) -> Result<(), StorageError> {
    match offered {
        Some(offer) if operation.status == OperationStatus::Queued => {
            let assignment = Assignment { token: events.index, ..offer };
            hand_over(txn, events, operation, assignment)
        }
        _ => Ok(()),
    }
}

/// Applies a succeeded action (each action of a sequence in turn) to the runtime: its new state
/// and effects. A failure names the failing action's index within a sequence.
fn apply_success(
    runtime: &mut Runtime,
    action: &LifecycleAction,
    at: Timestamp,
) -> Result<(), (Option<u32>, OperationError)> {
    match action {
        LifecycleAction::Sequence { actions } => {
            for (index, action) in actions.iter().enumerate() {
                apply_one(runtime, action, at).map_err(|e| (Some(index as u32), e))?;
            }
            Ok(())
        }
        action => apply_one(runtime, action, at).map_err(|e| (None, e)),
    }
}

/// Applies one succeeded action; it fails, if at all, before it changes the runtime
/// (`finish_operation` relies on that).
fn apply_one(runtime: &mut Runtime, action: &LifecycleAction, at: Timestamp) -> Result<(), OperationError> {
    if let LifecycleAction::Restore { snapshot_id } = action {
        if !runtime.has_snapshot(snapshot_id) {
            return Err(OperationError {
                code: "snapshot_not_found".into(),
                message: format!("runtime {} has no snapshot {snapshot_id}", runtime.id),
            });
        }
    }
    let (_, after) = action
        .transition(runtime.state)
        .map_err(|e| OperationError { code: "illegal_transition".into(), message: e.to_string() })?;
    runtime.state = after;
    apply_effect(runtime, action, at);
    Ok(())
}

/// What a succeeded action changes in the runtime's record besides its state.
fn apply_effect(runtime: &mut Runtime, action: &LifecycleAction, at: Timestamp) {
    action.apply_to_spec(&mut runtime.spec);
    action.apply_to_labels(&mut runtime.labels);
    if let LifecycleAction::Snapshot { snapshot_id, name, description } = action {
        runtime.snapshots.push(RuntimeSnapshot {
            id: snapshot_id.clone(),
            name: name.clone(),
            description: description.clone(),
            created_at: at,
        });
    }
}

/// Writes the events of one command, keyed so that a runtime's events sort in log order.
pub(crate) struct EventWriter<'a> {
    index: u64,
    at: Timestamp,
    actor: &'a runtimeai_model::Actor,
    retention: Arc<ClusterSettings>,
}

/// What `CF_EVENT_COUNTS` keeps per runtime, so that the common case of retention (nothing to
/// drop) reads one record and no event.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
struct EventTally {
    /// How many events the runtime has.
    count: u64,
    /// The time of its oldest event, when known (unknown after a pruning that stopped at its
    /// batch limit: the next event written looks again).
    #[serde(with = "runtimeai_model::timestamp::option")]
    oldest: Option<Timestamp>,
}

/// At most this many old events are dropped per event written, to bound the work of one apply.
const PRUNE_BATCH: usize = 64;

/// An [`Event`] as apply stores it, borrowed from what apply has at hand. Its id, runtime id and
/// sequence number are not stored: its key holds them (`runtime id \0 seq sub`; see
/// [`event_from_stored`]), so storing them again, and formatting the id, cost every event.
#[derive(Serialize)]
struct EventRecord<'a, D: Serialize + ?Sized> {
    #[serde(rename = "type")]
    event_type: &'a str,
    severity: EventSeverity,
    #[serde(with = "runtimeai_model::timestamp")]
    ts: Timestamp,
    actor: &'a Actor,
    data: &'a D,
}

/// An [`EventRecord`] read back.
#[derive(Deserialize)]
struct StoredEvent {
    #[serde(rename = "type")]
    event_type: String,
    severity: EventSeverity,
    #[serde(with = "runtimeai_model::timestamp")]
    ts: Timestamp,
    actor: Actor,
    data: JsonObject,
}

/// Bytes after a runtime's id in an event's key: `\0`, the entry's index, the event's number in it.
const EVENT_KEY_SUFFIX: usize = 1 + 8 + 4;

/// The event stored under `key` as `value`, whole again: id, runtime id and sequence number from
/// the key.
pub(crate) fn event_from_stored(key: &[u8], value: &[u8]) -> Result<Event, StorageError> {
    let malformed = || read_err(AnyError::error(format!("malformed event key {key:?}")));
    let split = key.len().checked_sub(EVENT_KEY_SUFFIX).ok_or_else(malformed)?;
    let (runtime_id, suffix) = key.split_at(split);
    let runtime_id = std::str::from_utf8(runtime_id).map_err(|_| malformed())?;
    let seq = u64::from_be_bytes(suffix[1..9].try_into().map_err(|_| malformed())?);
    let sub = u32::from_be_bytes(suffix[9..13].try_into().map_err(|_| malformed())?);
    let stored: StoredEvent = codec::decode("event", value).map_err(read_err)?;
    Ok(Event {
        id: event_id(seq, sub),
        runtime_id: runtime_id.to_string(),
        event_type: stored.event_type,
        severity: stored.severity,
        ts: stored.ts,
        actor: stored.actor,
        data: stored.data,
        seq,
    })
}

/// An event's id: the log index of the entry that wrote it and its number within the entry.
fn event_id(seq: u64, sub: u32) -> String {
    format!("ev_{seq:016x}_{sub}")
}

/// Where the event with id `id` sits in its runtime's feed (the key suffix after the `\0`):
/// its entry's index and its number in the entry. `None` if `id` is not an event id.
pub(crate) fn event_position(id: &str) -> Option<[u8; 12]> {
    let (seq, sub) = id.strip_prefix("ev_")?.split_once('_')?;
    if seq.len() != 16 {
        return None;
    }
    let (seq, sub) = (u64::from_str_radix(seq, 16).ok()?, sub.parse::<u32>().ok()?);
    let mut position = [0; 12];
    position[..8].copy_from_slice(&seq.to_be_bytes());
    position[8..].copy_from_slice(&sub.to_be_bytes());
    Some(position)
}

/// `runtime.created`'s data (the event data types list their fields in the order a map would:
/// by name).
#[derive(Serialize)]
struct CreatedData<'a> {
    decisions: &'a [PolicyDecision],
    name: &'a str,
    operation_id: &'a str,
    status: &'a str,
    #[serde(rename = "type")]
    runtime_type: &'a str,
}

/// `operation.assigned`'s data.
#[derive(Serialize)]
struct AssignedData<'a> {
    attempt: u32,
    node_id: u64,
    operation_id: &'a str,
    token: u64,
}

/// The data of an operation's events (`lifecycle.<action>` when it begins, with the policy
/// decisions; `operation.<status>` when it ends).
#[derive(Serialize)]
struct OperationData<'a> {
    action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    decisions: Option<&'a [PolicyDecision]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    from_state: &'a str,
    operation_id: &'a str,
    status: &'a str,
    to_state: &'a str,
}

impl EventWriter<'_> {
    fn write<D: Serialize + ?Sized>(
        &mut self,
        txn: &mut Txn<'_>,
        runtime_id: &str,
        event_type: &str,
        severity: EventSeverity,
        data: &D,
    ) -> Result<(), StorageError> {
        let sub = txn.events_in_entry;
        txn.events_in_entry += 1;
        let event = EventRecord { event_type, severity, ts: self.at, actor: self.actor, data };
        let mut key = event_prefix(runtime_id);
        key.extend_from_slice(&self.index.to_be_bytes());
        key.extend_from_slice(&sub.to_be_bytes());
        txn.put(CF_EVENTS, key, &event)?;
        self.enforce_retention(txn, runtime_id)
    }

    /// Drops the runtime's oldest events while it has more than the retention count or they
    /// are older than the retention age (measured from the command's time, not a clock).
    /// The time of the oldest event kept is remembered beside the count, so that the common
    /// case (nothing to drop) reads no event.
    fn enforce_retention(&self, txn: &mut Txn<'_>, runtime_id: &str) -> Result<(), StorageError> {
        let tally_key = runtime_id.as_bytes().to_vec();
        let previous: EventTally = txn.get(CF_EVENT_COUNTS, &tally_key)?.unwrap_or_default();
        let mut count = previous.count + 1;
        let oldest = if previous.count == 0 { Some(self.at) } else { previous.oldest };
        let max_age = chrono::Duration::days(self.retention.event_retention_days.min(100_000) as i64);
        let cutoff = self.at - max_age;
        if count <= self.retention.event_retention_count && oldest.is_some_and(|ts| ts >= cutoff) {
            return txn.put(CF_EVENT_COUNTS, tally_key, &EventTally { count, oldest });
        }
        let prefix = event_prefix(runtime_id);
        let mut expired = Vec::new();
        let mut oldest_kept = Some(self.at);
        let iter = txn.db.iterator_cf(cf(txn.db, CF_EVENTS), IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        for item in iter {
            let (key, value) = item.map_err(read_err)?;
            if !key.starts_with(&prefix) {
                break;
            }
            if expired.len() >= PRUNE_BATCH {
                oldest_kept = None;
                break;
            }
            if txn.deleted(CF_EVENTS, &key) {
                // Dropped earlier in this same batch: the database does not know yet.
                continue;
            }
            let event: StoredEvent = codec::decode("event", &value).map_err(read_err)?;
            if count <= self.retention.event_retention_count && event.ts >= cutoff {
                oldest_kept = Some(event.ts);
                break;
            }
            expired.push(key.to_vec());
            count -= 1;
        }
        for key in expired {
            txn.delete(CF_EVENTS, key);
        }
        txn.put(CF_EVENT_COUNTS, tally_key, &EventTally { count, oldest: oldest_kept })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DataDir;

    #[test]
    fn an_event_reads_back_whole_with_its_id_runtime_and_sequence_from_its_key() {
        let actor = runtimeai_model::Actor::Agent("planner".into());
        let mut data = serde_json::Map::new();
        data.insert("operation_id".into(), "op_1".into());
        let data = JsonObject(data);
        let ts = chrono::DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let record = EventRecord {
            event_type: "runtime.created",
            severity: EventSeverity::Warning,
            ts,
            actor: &actor,
            data: &data,
        };
        let mut key = event_prefix("rt_1");
        key.extend_from_slice(&0x2au64.to_be_bytes());
        key.extend_from_slice(&3u32.to_be_bytes());
        let event = event_from_stored(&key, &codec::encode("test", &record).unwrap()).unwrap();
        assert_eq!(
            event,
            Event {
                id: "ev_000000000000002a_3".into(),
                runtime_id: "rt_1".into(),
                event_type: "runtime.created".into(),
                severity: EventSeverity::Warning,
                ts,
                actor,
                data,
                seq: 42,
            }
        );
        assert!(event_from_stored(b"short", b"").is_err(), "a key too short for an event's is an error");
    }

    #[test]
    fn event_data_built_from_borrowed_fields_reads_back_as_a_json_object() {
        let decision = PolicyDecision {
            action: "create".into(),
            action_index: 0,
            verdict: Verdict::Allow,
            policy_id: None,
            policy_name: None,
            rule_index: None,
            rule_kind: None,
            reason: "balanced: no rule matches create".into(),
        };
        /// The data as a stored event holds it, read back as the API reads it.
        fn stored<T: Serialize>(data: &T) -> serde_json::Value {
            let object: JsonObject = codec::decode("data", &codec::encode("data", data).unwrap()).unwrap();
            serde_json::Value::Object(object.0)
        }
        let created = JsonText(CreatedData {
            decisions: std::slice::from_ref(&decision),
            name: "web",
            operation_id: "op_1",
            status: "queued",
            runtime_type: "vm",
        });
        assert_eq!(
            stored(&created),
            serde_json::json!({"decisions": [serde_json::to_value(&decision).unwrap()], "name": "web",
                "operation_id": "op_1", "status": "queued", "type": "vm"})
        );
        let assigned = JsonText(AssignedData { attempt: 2, node_id: 3, operation_id: "op_1", token: 41 });
        assert_eq!(
            stored(&assigned),
            serde_json::json!({"attempt": 2, "node_id": 3, "operation_id": "op_1", "token": 41})
        );
        let ended = JsonText(OperationData {
            action: "start",
            decisions: None,
            error: Some("backend_failed: no disk".into()),
            from_state: "starting",
            operation_id: "op_1",
            status: "failed",
            to_state: "stopped",
        });
        assert_eq!(
            stored(&ended),
            serde_json::json!({"action": "start", "error": "backend_failed: no disk", "from_state": "starting",
                "operation_id": "op_1", "status": "failed", "to_state": "stopped"})
        );
        // In the API's JSON (human-readable), the data is the object itself.
        assert_eq!(serde_json::to_value(&assigned).unwrap()["token"], 41);
    }

    #[test]
    fn a_batch_sees_its_own_writes_and_stores_each_key_once_with_its_last_value() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(&dir.path().join("data"), 1, "test").unwrap();
        let db = &data.db;
        db.put_cf(cf(db, CF_SETTINGS), b"gone", codec::encode("test", &7u64).unwrap()).unwrap();

        let mut txn = Txn::new(db);
        txn.put(CF_SETTINGS, b"counts".to_vec(), &1u64).unwrap();
        txn.put(CF_SETTINGS, b"counts".to_vec(), &2u64).unwrap();
        assert_eq!(txn.get::<u64>(CF_SETTINGS, b"counts").unwrap(), Some(2), "a later command sees the last value");
        assert_eq!(txn.get::<u64>(CF_SETTINGS, b"gone").unwrap(), Some(7), "unwritten keys come from the store");
        txn.delete(CF_SETTINGS, b"gone".to_vec());
        assert_eq!(txn.get::<u64>(CF_SETTINGS, b"gone").unwrap(), None);
        txn.put(CF_SETTINGS, b"back".to_vec(), &3u64).unwrap();
        txn.delete(CF_SETTINGS, b"back".to_vec());
        txn.put(CF_SETTINGS, b"back".to_vec(), &4u64).unwrap();

        let batch = txn.into_batch();
        assert_eq!(batch.len(), 3, "one write per key, however often the batch wrote it");
        db.write(batch).unwrap();
        let stored = |key: &[u8]| {
            db.get_cf(cf(db, CF_SETTINGS), key).unwrap().map(|b| codec::decode::<u64>("test", &b).unwrap())
        };
        assert_eq!(stored(b"counts"), Some(2));
        assert_eq!(stored(b"gone"), None);
        assert_eq!(stored(b"back"), Some(4));
    }
}
