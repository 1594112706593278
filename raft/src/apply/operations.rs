//! Operations: begun against the transition table and the policies, assigned to executors with
//! fencing tokens and leases, advanced by their reports, approved or rejected, finished into
//! the runtime's record; intents that begin one.

use runtimeai_engine::policy;
use runtimeai_model::{
    Actor, Approval, Assignment, ClusterSettings, EventSeverity, EventType, ExpiryReason, JsonObject, JsonText,
    LifecycleAction, Operation, OperationError, OperationProgress, OperationStatus, Placement, PolicyMode, Runtime,
    RuntimeSnapshot, RuntimeState, Timestamp, Verdict,
};
use serde_json::json;

use super::events::{operation_data, AssignedData, EventWriter};
use super::policies::{evaluate_policies, judge};
use super::runtimes::{busy, count_placement, load_runtime, save_runtime};
use crate::command::{CommandReply, ExpireRuntime, Rejection};
use crate::keys::{name_key, runtime_operation_key};
use crate::retention::{self, Ended};
use crate::runtime_index::{self, RuntimeField};
use crate::store::{
    CF_ACTIVE_OPERATIONS, CF_INTENTS, CF_OPERATIONS, CF_RUNTIMES, CF_RUNTIME_NAMES, CF_RUNTIME_OPERATIONS,
};
use crate::txn::{OperationWritten, Txn};
use crate::types::StorageError;

/// Writes an operation that already exists. Its indexes (the runtime's list, the unfinished
/// set) were written with it and do not change, except that a finished one leaves the set.
pub(crate) fn put_operation(txn: &mut Txn<'_>, operation: &Operation) -> Result<(), StorageError> {
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

/// Writes a new operation with its indexes.
pub(crate) fn put_new_operation(txn: &mut Txn<'_>, operation: &Operation) -> Result<(), StorageError> {
    if !operation.status.is_terminal() {
        txn.put(CF_ACTIVE_OPERATIONS, operation.id.as_bytes().to_vec(), &operation.runtime_id)?;
    }
    txn.put(CF_RUNTIME_OPERATIONS, runtime_operation_key(&operation.runtime_id, &operation.id), &())?;
    put_operation(txn, operation)
}

pub(crate) fn begin_operation(
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
    runtime.last_activity_at = Some(at);
    save_runtime(txn, at, &mut runtime, &was)?;
    let mut data = operation_data(&operation, from, during);
    // Every decision, allowing ones included, is on record with the rule that made it.
    data.0.decisions = Some(&operation.decisions);
    events.write(txn, &runtime.id, EventType::Lifecycle(operation.action.kind()), EventSeverity::Info, &data)?;
    hand_over_offered(txn, events, &mut operation, offered)?;
    put_new_operation(txn, &operation)?;
    Ok(CommandReply::Operation(operation))
}

/// See [`crate::command::Op::ExpireRuntime`].
pub(crate) fn expire_runtime(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    expire: ExpireRuntime,
) -> Result<CommandReply, StorageError> {
    let at = events.at;
    let runtime = match load_runtime(txn, &expire.runtime_id, None)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(runtime) => runtime,
    };
    let Some(expiry) = runtime.due(at) else {
        let what = format!("expire runtime {}, which is not due", runtime.id);
        return Ok(CommandReply::Rejected(Rejection::NotPermitted { actor: Actor::System.to_string(), what }));
    };
    if let Some(busy) = busy(&runtime) {
        return Ok(CommandReply::Rejected(busy));
    }
    let operation = Operation::queued(
        expire.operation_id,
        &runtime.id,
        expiry.action.clone(),
        runtime.state,
        at,
        Actor::System,
        PolicyMode::Balanced,
    );
    let reply = begin_operation(txn, events, settings, operation, None)?;
    // Spent, whatever the policies said: a TTL once, an idle timeout once per idle period.
    let Ok(mut runtime) = load_runtime(txn, &expire.runtime_id, None)? else { return Ok(reply) };
    let was = RuntimeField::of(&runtime);
    match expiry.reason {
        ExpiryReason::Ttl => runtime.expires_at = None,
        ExpiryReason::Idle => runtime.last_activity_at = Some(at),
    }
    save_runtime(txn, at, &mut runtime, &was)?;
    let (outcome, severity) = match &reply {
        CommandReply::Operation(operation) => (json!({"operation_id": operation.id}), EventSeverity::Info),
        CommandReply::Rejected(refused @ Rejection::PolicyDenied { decision }) => {
            (json!({"refused": refused.to_string(), "decision": decision}), EventSeverity::Warning)
        }
        CommandReply::Rejected(refused) => (json!({"refused": refused.to_string()}), EventSeverity::Warning),
        _ => (json!({}), EventSeverity::Info),
    };
    let seconds = match expiry.reason {
        ExpiryReason::Ttl => runtime.spec.ttl_seconds,
        ExpiryReason::Idle => runtime.spec.idle_timeout_seconds,
    };
    let mut data = json!({"reason": expiry.reason, "seconds": seconds, "action": expiry.action.kind()});
    if let (Some(data), Some(outcome)) = (data.as_object_mut(), outcome.as_object()) {
        data.extend(outcome.clone());
    }
    let data = JsonObject(data.as_object().cloned().unwrap_or_default());
    events.write(txn, &runtime.id, EventType::RuntimeExpired, severity, &data)?;
    Ok(reply)
}

/// The snapshots a runtime would have once `action` succeeds, against their cap.
pub(crate) fn check_snapshots(
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
pub(crate) struct Report {
    pub(crate) status: OperationStatus,
    pub(crate) progress: Option<OperationProgress>,
    pub(crate) error: Option<OperationError>,
    pub(crate) token: Option<u64>,
    pub(crate) completed_actions: Option<u32>,
    pub(crate) failed_action: Option<u32>,
}

pub(crate) fn load_operation(txn: &Txn<'_>, id: &str) -> Result<Result<Operation, Rejection>, StorageError> {
    Ok(txn.operation(id)?.ok_or_else(|| Rejection::NotFound { kind: "operation".into(), id: id.into() }))
}

/// A report with a fencing token must carry the current assignment's.
pub(crate) fn check_token(operation: &Operation, token: Option<u64>) -> Result<(), Rejection> {
    let current = operation.assignment.as_ref().map(|a| a.token);
    match token {
        Some(token) if current != Some(token) => {
            Err(Rejection::StaleToken { operation_id: operation.id.clone(), token: Some(token), current })
        }
        _ => Ok(()),
    }
}

pub(crate) fn status_rejection(operation: &Operation, to: &str) -> Rejection {
    Rejection::IllegalOperationStatus {
        id: operation.id.clone(),
        from: operation.status.as_str().into(),
        to: to.into(),
    }
}

pub(crate) fn advance_operation(
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
pub(crate) fn finish_operation(
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
    let placed = runtime.placement.clone();
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
        let applied = match applied {
            Ok(()) => super::webhooks::observe(txn, events, &runtime.id, &operation.action)?,
            failed => failed,
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
    events.write(
        txn,
        &runtime.id,
        EventType::Operation(operation.status),
        severity,
        &operation_data(&operation, from, runtime.state),
    )?;
    if runtime.state == RuntimeState::Deleted {
        txn.delete(CF_RUNTIME_NAMES, name_key(runtime.tenant_id.as_deref(), &runtime.name));
        count_placement(txn, &runtime, false)?;
        runtime_index::reindex(txn, &runtime.id, Some(&was), None)?;
        txn.delete(CF_RUNTIMES, runtime.id.as_bytes().to_vec());
        retention::ended(txn, at, Ended::Runtime, &runtime.id, &runtime.id)?;
        // Whose it was, for those who follow a tenant's events once the runtime is gone.
        let data = super::events::audit_data(&[], runtime.tenant_id.as_deref());
        events.write(txn, &runtime.id, EventType::RuntimeDeleted, EventSeverity::Info, &data)?;
        super::webhooks::runtime_deleted(txn, events, &runtime.id)?;
    } else {
        if runtime.placement != placed {
            moved(txn, events, &operation, &mut runtime, placed)?;
        }
        save_runtime(txn, at, &mut runtime, &was)?;
    }
    Ok(CommandReply::Operation(operation))
}

/// A runtime a migration moved: the node index and counts follow it, and a `runtime.migrated`
/// event says from where to where, and what a rebuild lost.
fn moved(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    operation: &Operation,
    runtime: &mut Runtime,
    from: Option<Placement>,
) -> Result<(), StorageError> {
    let to = runtime.placement.clone();
    count_placement(txn, &Runtime { placement: from.clone(), ..runtime.clone() }, false)?;
    count_placement(txn, runtime, true)?;
    let rebuild = operation.action.steps().iter().any(|a| matches!(a, LifecycleAction::Migrate { rebuild: true, .. }));
    let mut data = json!({
        "operation_id": operation.id,
        "from_node": from.map(|p| p.node_id),
        "to_node": to.map(|p| p.node_id),
        "mode": if rebuild { "rebuild" } else { "cold" },
    });
    if let (true, Some(data)) = (rebuild, data.as_object_mut()) {
        data.insert("lost".into(), "what only its node held: its data and its snapshots".into());
    }
    let data = JsonObject(data.as_object().cloned().unwrap_or_default());
    let severity = if rebuild { EventSeverity::Warning } else { EventSeverity::Info };
    events.write(txn, &runtime.id, EventType::RuntimeMigrated, severity, &data)
}

pub(crate) fn decide_approval(
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
        events.write(txn, &runtime_id, EventType::OperationApproved, EventSeverity::Info, &JsonObject(data))?;
        if !operation.action.needs_backend() {
            // Nothing for an executor to do (a relabel): approved is done.
            operation.status = OperationStatus::Succeeded;
            return finish_operation(txn, events, operation);
        }
        operation.status = OperationStatus::Queued;
        put_operation(txn, &operation)?;
        return Ok(CommandReply::Operation(operation));
    }
    events.write(txn, &runtime_id, EventType::OperationRejected, EventSeverity::Info, &JsonObject(data))?;
    operation.status = OperationStatus::Cancelled;
    operation.error = Some(OperationError {
        code: "rejected".into(),
        message: format!("rejected by {actor}: {}", reason.unwrap_or_default()),
    });
    finish_operation(txn, events, operation)
}

pub(crate) fn assign_operation(
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
pub(crate) fn hand_over(
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
    events.write(txn, &operation.runtime_id, EventType::OperationAssigned, EventSeverity::Info, &data)?;
    operation.assignment = Some(assignment);
    Ok(())
}

/// The leader may offer an executor in the entry that queues an operation (see
/// `Replica::set_assigner`), saving an `AssignOperation` entry. The offer is taken if the
/// operation was queued (not parked for approval); the entry's index is its fencing token.
pub(crate) fn hand_over_offered(
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
pub(crate) fn apply_success(
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
pub(crate) fn apply_one(runtime: &mut Runtime, action: &LifecycleAction, at: Timestamp) -> Result<(), OperationError> {
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
pub(crate) fn apply_effect(runtime: &mut Runtime, action: &LifecycleAction, at: Timestamp) {
    action.apply_to_spec(&mut runtime.spec);
    action.apply_to_labels(&mut runtime.labels);
    if let LifecycleAction::TunePolicy { policy } = action {
        runtime.policy = policy.clone();
    }
    if let LifecycleAction::Migrate { to, rebuild } = action {
        runtime.placement = Some(to.clone());
        if *rebuild {
            // Their data stayed on the lost node.
            runtime.snapshots.clear();
        }
    }
    if let LifecycleAction::Snapshot { snapshot_id, name, description } = action {
        runtime.snapshots.push(RuntimeSnapshot {
            id: snapshot_id.clone(),
            name: name.clone(),
            description: description.clone(),
            created_at: at,
        });
    }
}

impl Report {
    /// A client's cancel: no executor's token, nothing else to say.
    pub(crate) fn cancel() -> Report {
        Report {
            status: OperationStatus::Cancelled,
            progress: None,
            error: None,
            token: None,
            completed_actions: None,
            failed_action: None,
        }
    }
}

/// When a lease of `lease_ms` (at most a day) taken at `at` ends.
pub(crate) fn lease_until(at: Timestamp, lease_ms: u64) -> Timestamp {
    at + chrono::Duration::milliseconds(lease_ms.min(86_400_000) as i64)
}

/// See [`crate::command::Op::RenewLease`].
pub(crate) fn renew_lease(
    txn: &mut Txn<'_>,
    at: Timestamp,
    operation_id: &str,
    token: u64,
    lease_ms: u64,
) -> Result<CommandReply, StorageError> {
    let mut operation = match load_operation(txn, operation_id)? {
        Err(rejection) => return Ok(CommandReply::Rejected(rejection)),
        Ok(operation) => operation,
    };
    if let Err(rejection) = check_token(&operation, Some(token)) {
        return Ok(CommandReply::Rejected(rejection));
    }
    if operation.status.is_terminal() {
        return Ok(CommandReply::Rejected(status_rejection(&operation, "running")));
    }
    if let Some(assignment) = &mut operation.assignment {
        assignment.lease_until = lease_until(at, lease_ms);
    }
    put_operation(txn, &operation)?;
    Ok(CommandReply::Operation(operation))
}

/// See [`crate::command::Op::SubmitIntent`]: the intent, with its operation (unless it is a dry run) begun in
/// the same entry; a refused operation refuses the intent.
pub(crate) fn submit_intent(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    intent: runtimeai_model::Intent,
    operation: Option<Operation>,
) -> Result<CommandReply, StorageError> {
    let operation = match operation {
        None => None,
        Some(operation) => match begin_operation(txn, events, settings, operation, None)? {
            CommandReply::Operation(operation) => Some(operation),
            rejected => return Ok(rejected),
        },
    };
    txn.put(CF_INTENTS, intent.id.as_bytes().to_vec(), &intent)?;
    retention::ended(txn, events.at, Ended::Intent, &intent.id, &intent.runtime_id)?;
    Ok(CommandReply::Intent { intent, operation })
}
