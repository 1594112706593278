//! Runtime records: create, update, relabel, drift and signals, with the counts and indexes
//! each write keeps (placement per node, tenant, type and state) and the limits it checks.

use std::collections::BTreeMap;
use std::sync::Arc;

use runtimeai_engine::policy;
use runtimeai_model::{
    ClusterSettings, EventSeverity, EventType, JsonObject, JsonText, Operation, OperationStatus, Runtime, RuntimeState,
    Timestamp, Verdict,
};

use super::events::{labels_data, CreatedData, EventWriter};
use super::operations::{hand_over_offered, put_new_operation};
use super::policies::{evaluate_policies, judge};
use crate::command::{CommandReply, RecordExec, Rejection};
use crate::keys::{by_node_key, name_key, PLACEMENT_COUNTS_KEY};
use crate::runtime_index::{self, RuntimeField};
use crate::store::{CF_OPERATIONS, CF_RUNTIMES, CF_RUNTIMES_BY_NODE, CF_RUNTIME_NAMES, CF_SETTINGS};
use crate::txn::Txn;
use crate::types::StorageError;

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
pub(crate) fn count_placement(txn: &mut Txn<'_>, runtime: &Runtime, added: bool) -> Result<(), StorageError> {
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

/// Loads a runtime and checks an `If-Match` version.
pub(crate) fn load_runtime(
    txn: &Txn<'_>,
    id: &str,
    expected_version: Option<u64>,
) -> Result<Result<Runtime, Rejection>, StorageError> {
    Ok(match txn.get::<Runtime>(CF_RUNTIMES, id.as_bytes())? {
        None => Err(Rejection::NotFound { kind: "runtime".into(), id: id.to_string() }),
        Some(runtime) => check_version(expected_version, runtime.version).map(|()| runtime),
    })
}

pub(crate) fn check_version(expected: Option<u64>, actual: u64) -> Result<(), Rejection> {
    match expected {
        Some(expected) if expected != actual => Err(Rejection::VersionMismatch { expected, actual }),
        _ => Ok(()),
    }
}

/// Writes a changed runtime; `was` is what it was indexed under before the change.
pub(crate) fn save_runtime(
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
pub(crate) fn check_new_runtime(
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

pub(crate) fn create_runtime(
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
    events.write(txn, &runtime.id, EventType::RuntimeCreated, EventSeverity::Info, &data)?;
    hand_over_offered(txn, events, &mut operation, offered)?;
    put_new_operation(txn, &operation)?;
    Ok(CommandReply::Created { runtime, operation })
}

/// The refusal of a new operation on a runtime that has one on its way.
pub(crate) fn busy(runtime: &Runtime) -> Option<Rejection> {
    let active = runtime.active_operation.as_ref()?;
    Some(Rejection::OperationInProgress { runtime_id: runtime.id.clone(), operation_id: active.clone() })
}

/// See [`crate::command::Op::PatchLabels`].
pub(crate) fn patch_labels(
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
    events.write(txn, &runtime.id, EventType::RuntimeLabels, EventSeverity::Info, &labels_data(&runtime))?;
    Ok(CommandReply::Runtime(runtime))
}

/// See [`crate::command::Op::RecordDrift`].
/// Writes the `runtime.exec` event of a command that ran in the runtime (see [`RecordExec`]).
pub(crate) fn record_exec(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    exec: RecordExec,
) -> Result<CommandReply, StorageError> {
    let mut runtime = match load_runtime(txn, &exec.runtime_id, None)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(runtime) => runtime,
    };
    // A command run in it is activity: its idle timeout counts from here.
    let was = RuntimeField::of(&runtime);
    runtime.last_activity_at = Some(events.at);
    save_runtime(txn, events.at, &mut runtime, &was)?;
    let data = serde_json::json!({
        "command": exec.command,
        "exit_code": exec.exit_code,
        "duration_ms": exec.duration_ms,
        "node_id": exec.node_id,
    });
    let data = JsonObject(data.as_object().cloned().unwrap_or_default());
    let severity = if exec.exit_code == Some(0) { EventSeverity::Info } else { EventSeverity::Warning };
    events.write(txn, &runtime.id, EventType::RuntimeExec, severity, &data)?;
    Ok(CommandReply::Audited)
}

pub(crate) fn record_drift(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    runtime_id: String,
    observed: String,
    action: String,
    state: Option<RuntimeState>,
) -> Result<CommandReply, StorageError> {
    let mut runtime = match load_runtime(txn, &runtime_id, None)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(runtime) => runtime,
    };
    if let Some(operation_id) = runtime.active_operation.clone() {
        return Ok(CommandReply::Rejected(Rejection::OperationInProgress { operation_id, runtime_id }));
    }
    let from = runtime.state;
    let was = RuntimeField::of(&runtime);
    if let Some(state) = state {
        runtime.state = state;
    }
    save_runtime(txn, events.at, &mut runtime, &was)?;
    let mut data = serde_json::Map::new();
    data.insert("observed".into(), observed.into());
    data.insert("action".into(), action.into());
    data.insert("from_state".into(), from.as_str().into());
    data.insert("to_state".into(), runtime.state.as_str().into());
    let severity = match runtime.state {
        RuntimeState::Error => EventSeverity::Critical,
        _ => EventSeverity::Warning,
    };
    events.write(txn, &runtime.id, EventType::RuntimeDrift, severity, &JsonObject(data))?;
    Ok(CommandReply::Runtime(runtime))
}

/// See [`crate::command::Op::ReportSignals`]: observations are not changes (no version bump, no event).
pub(crate) fn report_signals(
    txn: &mut Txn<'_>,
    signals: Vec<(String, runtimeai_model::RuntimeSignals)>,
) -> Result<CommandReply, StorageError> {
    let mut recorded = 0;
    for (runtime_id, observed) in signals {
        if let Some(mut runtime) = txn.get::<Runtime>(CF_RUNTIMES, runtime_id.as_bytes())? {
            runtime.signals = Some(observed);
            txn.put(CF_RUNTIMES, runtime_id.into_bytes(), &runtime)?;
            recorded += 1;
        }
    }
    Ok(CommandReply::SignalsRecorded(recorded))
}
