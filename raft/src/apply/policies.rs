//! Policies: stored within their limits, and judged against every operation in apply.

use runtimeai_engine::policy;
use runtimeai_model::{
    ClusterSettings, EventSeverity, EventType, Operation, OperationStatus, Policy, PolicyDecision, Runtime, Verdict,
};

use super::events::{audit_data, decision_data, EventWriter, AUDIT_STREAM};
use crate::command::{CommandReply, Rejection};
use crate::store::CF_POLICIES;
use crate::txn::Txn;
use crate::types::StorageError;

/// The policy decisions on an operation's actions, for the runtime as it was before it.
pub(crate) fn evaluate_policies(
    txn: &Txn<'_>,
    settings: &ClusterSettings,
    runtime: &Runtime,
    operation: &Operation,
) -> Result<Vec<PolicyDecision>, StorageError> {
    let policies = txn.policies()?;
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

/// Records the decisions on the operation and acts on the overall verdict: a denial is a
/// rejection (with its event), approval parks the operation in `pending_approval`.
pub(crate) fn judge(
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
                EventType::PolicyDenied,
                EventSeverity::Warning,
                &decision_data(operation, &decision),
            )?;
            Ok(Some(Rejection::PolicyDenied { decision }))
        }
        Verdict::RequireApproval => {
            operation.status = OperationStatus::PendingApproval;
            let data = decision_data(operation, &decision);
            events.write(txn, runtime_id, EventType::PolicyApprovalRequired, EventSeverity::Warning, &data)?;
            Ok(None)
        }
    }
}

pub(crate) fn create_policy(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    policy: Policy,
) -> Result<CommandReply, StorageError> {
    if txn.get::<Policy>(CF_POLICIES, policy.id.as_bytes())?.is_some() {
        return Ok(CommandReply::Rejected(Rejection::AlreadyExists { kind: "policy".into(), id: policy.id }));
    }
    let count = txn.policies()?.len() + 1;
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
    events.write(txn, AUDIT_STREAM, EventType::PolicyCreated, EventSeverity::Info, &data)?;
    Ok(CommandReply::Policy(policy))
}

pub(crate) fn delete_policy(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    id: String,
) -> Result<CommandReply, StorageError> {
    let Some(policy) = txn.get::<Policy>(CF_POLICIES, id.as_bytes())? else {
        return Ok(CommandReply::Rejected(Rejection::NotFound { kind: "policy".into(), id }));
    };
    txn.delete(CF_POLICIES, id.as_bytes().to_vec());
    let data = audit_data(&[("policy_id", &id), ("name", &policy.name)], policy.tenant_id.as_deref());
    events.write(txn, AUDIT_STREAM, EventType::PolicyDeleted, EventSeverity::Warning, &data)?;
    Ok(CommandReply::Deleted { id })
}
