//! What each command does to the state: the deterministic heart of the state machine.
//!
//! Every function here reads only the command and the store (through [`Txn`]), so every
//! replica computes the same result. Refusals are [`Rejection`] replies, not errors. This
//! module dispatches; each concern has its own: runtimes, operations (lifecycle, approvals,
//! assignment), policies, the cluster's own records (settings, keys, members), events, and the
//! replies kept for idempotency keys.

mod cluster;
pub(crate) mod events;
pub(crate) mod idempotency;
pub(crate) mod operations;
mod policies;
pub(crate) mod runtimes;
pub mod webhooks;

use runtimeai_model::{Actor, Assignment, Operation};

use crate::command::{
    AdvanceOperation, AssignOperation, AuditMembership, BeginOperation, CancelOperation, CreateApiKey, CreatePolicy,
    CreateRuntime, DecideApproval, DeletePolicy, PatchLabels, RecordDrift, RegisterNode, RenewLease, ReportSignals,
    RevokeApiKey, SetSettings, SubmitIntent,
};
use crate::command::{Command, CommandReply, Op, Rejection};
use crate::retention;
use crate::txn::Txn;
use crate::types::StorageError;
use events::EventWriter;
use operations::Report;

pub use events::AUDIT_STREAM;

/// Applies the command of the log entry at `index`. Rejections are replies; only store failures
/// are errors (and stop the node: a replica must not skip an entry).
pub(crate) fn apply_entry(txn: &mut Txn<'_>, index: u64, command: Command) -> Result<CommandReply, StorageError> {
    txn.events_in_entry = 0;
    let at = command.at;
    let reply = apply_command(txn, index, command)?;
    if index.is_multiple_of(retention::PRUNE_EVERY) {
        let days = txn.settings()?.event_retention_days;
        retention::prune(txn, at, days)?;
    }
    Ok(reply)
}

fn apply_command(txn: &mut Txn<'_>, index: u64, command: Command) -> Result<CommandReply, StorageError> {
    if let Some(claim) = &command.idempotency {
        if let Some(reply) = idempotency::replay(txn, claim)? {
            return Ok(reply);
        }
    }
    let Command { at, actor, idempotency, op } = command;
    if op.is_node_only() && actor != Actor::System {
        let what = format!("send {} (only nodes do)", op.name());
        return Ok(CommandReply::Rejected(Rejection::NotPermitted { actor: actor.to_string(), what }));
    }
    let reply = apply_op(txn, index, at, &actor, op)?;
    idempotency::finish(txn, at, idempotency, reply)
}

/// One command's effect (a batch's: each of its commands' in turn), by `actor` at `at`.
fn apply_op(
    txn: &mut Txn<'_>,
    index: u64,
    at: runtimeai_model::Timestamp,
    actor: &Actor,
    op: Op,
) -> Result<CommandReply, StorageError> {
    let settings = txn.settings()?;
    let mut events = EventWriter { index, at, actor, retention: settings.clone() };
    let events = &mut events;
    let by_actor = |operation: Operation| Operation { requested_by: actor.clone(), ..operation };
    Ok(match op {
        Op::Batch(commands) => {
            let mut replies = Vec::with_capacity(commands.len());
            for command in commands {
                replies.push(apply_command(txn, index, command)?);
            }
            CommandReply::Batch(replies)
        }
        Op::CreateRuntime(CreateRuntime { runtime, operation }) => {
            runtimes::create_runtime(txn, events, &settings, runtime, by_actor(operation))?
        }
        Op::PatchLabels(PatchLabels { operation, expected_version }) => {
            runtimes::patch_labels(txn, events, &settings, by_actor(operation), expected_version)?
        }
        Op::RecordDrift(RecordDrift { runtime_id, observed, action, state }) => {
            runtimes::record_drift(txn, events, runtime_id, observed, action, state)?
        }
        Op::ReportSignals(ReportSignals { signals }) => runtimes::report_signals(txn, signals)?,
        Op::BeginOperation(BeginOperation { operation, expected_version }) => {
            operations::begin_operation(txn, events, &settings, by_actor(operation), expected_version)?
        }
        Op::AdvanceOperation(AdvanceOperation {
            operation_id,
            status,
            progress,
            error,
            token,
            completed_actions,
            failed_action,
        }) => {
            let report = Report { status, progress, error, token: Some(token), completed_actions, failed_action };
            operations::advance_operation(txn, events, &operation_id, report)?
        }
        Op::CancelOperation(CancelOperation { operation_id }) => {
            operations::advance_operation(txn, events, &operation_id, Report::cancel())?
        }
        Op::DecideApproval(DecideApproval { operation_id, approve, reason }) => {
            operations::decide_approval(txn, events, actor, &operation_id, approve, reason)?
        }
        Op::AssignOperation(AssignOperation { operation_id, node_id, lease_ms, expected_token }) => {
            let assignment = Assignment { node_id, token: index, lease_until: operations::lease_until(at, lease_ms) };
            operations::assign_operation(txn, events, &settings, &operation_id, assignment, expected_token)?
        }
        Op::RenewLease(RenewLease { operation_id, token, lease_ms }) => {
            operations::renew_lease(txn, at, &operation_id, token, lease_ms)?
        }
        Op::SubmitIntent(SubmitIntent { intent, operation }) => {
            operations::submit_intent(txn, events, &settings, intent, operation.map(by_actor))?
        }
        Op::CreatePolicy(CreatePolicy { policy }) => policies::create_policy(txn, events, &settings, policy)?,
        Op::DeletePolicy(DeletePolicy { id }) => policies::delete_policy(txn, events, id)?,
        Op::RegisterNode(RegisterNode { info }) => cluster::register_node(txn, info)?,
        Op::SetSettings(SetSettings { settings }) => cluster::set_settings(txn, events, settings)?,
        Op::CreateApiKey(CreateApiKey { key, replaces }) => cluster::create_api_key(txn, events, key, replaces)?,
        Op::AuditMembership(AuditMembership { change, node_id, grpc_addr }) => {
            cluster::audit_membership(txn, events, change, node_id, grpc_addr)?
        }
        Op::RevokeApiKey(RevokeApiKey { id }) => cluster::revoke_api_key(txn, events, id)?,
        Op::RecordExec(exec) => runtimes::record_exec(txn, events, exec)?,
        Op::ExpireRuntime(expire) => operations::expire_runtime(txn, events, &settings, expire)?,
        Op::CreateWebhook(create) => webhooks::create_webhook(txn, events, &settings, create.webhook)?,
        Op::DeleteWebhook(delete) => webhooks::delete_webhook(txn, events, delete.id, delete.tenant_id)?,
        Op::ClaimDeliveries(claim) => webhooks::claim_deliveries(txn, index, at, claim.node_id, claim.lease_ms)?,
        Op::RecordDeliveries(record) => webhooks::record_deliveries(txn, events, record)?,
    })
}
