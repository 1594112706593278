//! Webhook subscriptions, their delivery log, and the lease that lets one node at a time
//! deliver them.
//!
//! Delivery happens outside the state machine (`runtimeai_node::webhooks`); what is replicated is
//! how far each subscription has been delivered and the attempts made, both written only by the
//! lease's holder: a node that lost the lease (it paused, another took over) has its records
//! refused, so two nodes never move a subscription's cursor.

use runtimeai_model::{
    within_limit, ClusterSettings, DeliveryLease, EventSeverity, EventType, LifecycleAction, OperationError, Runtime,
    Timestamp, Webhook, WebhookDelivery,
};

use super::events::{audit_data, EventWriter, AUDIT_STREAM};
use super::operations::lease_until;
use crate::command::{CommandReply, RecordDeliveries, Rejection};
use crate::keys::{event_id, DELIVERY_LEASE_KEY};
use crate::store::{CF_RUNTIMES, CF_SETTINGS, CF_WEBHOOKS, CF_WEBHOOK_DELIVERIES};
use crate::txn::Txn;
use crate::types::StorageError;

/// Delivery attempts kept per subscription (the oldest go first).
pub const DELIVERIES_KEPT: usize = 100;

pub(crate) fn create_webhook(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    webhook: Webhook,
) -> Result<CommandReply, StorageError> {
    if let Some(refused) = refuse_new(txn, settings, &webhook, 1)? {
        return Ok(CommandReply::Rejected(refused));
    }
    // Checked here too, not only by the API: a runtime deleted meanwhile would leave a
    // subscription that nothing selects and nothing removes.
    if let Some(runtime_id) = &webhook.filter.runtime_id {
        if txn.get::<Runtime>(CF_RUNTIMES, runtime_id.as_bytes())?.is_none() {
            return Ok(CommandReply::Rejected(Rejection::NotFound { kind: "runtime".into(), id: runtime_id.clone() }));
        }
    }
    Ok(CommandReply::Webhook(store_new(txn, events, webhook)?))
}

/// Why `webhook` (one of `adding` new ones) cannot be stored, if it cannot.
fn refuse_new(
    txn: &Txn<'_>,
    settings: &ClusterSettings,
    webhook: &Webhook,
    adding: usize,
) -> Result<Option<Rejection>, StorageError> {
    if txn.get::<Webhook>(CF_WEBHOOKS, webhook.id.as_bytes())?.is_some() {
        return Ok(Some(Rejection::AlreadyExists { kind: "webhook".into(), id: webhook.id.clone() }));
    }
    let count = txn.scan::<Webhook>(CF_WEBHOOKS)?.len() + adding;
    let within = within_limit("webhooks", settings.limits.webhooks, count, "the number of webhooks");
    Ok(within.err().map(Rejection::from))
}

/// Stores a new subscription, on the audit feed; it delivers what is written after that.
fn store_new(txn: &mut Txn<'_>, events: &mut EventWriter<'_>, mut webhook: Webhook) -> Result<Webhook, StorageError> {
    webhook.ends_with = None;
    events.write(txn, AUDIT_STREAM, EventType::WebhookCreated, EventSeverity::Info, &audit(&webhook))?;
    // From the event after its own creation's.
    webhook.delivered_through = last_event_id(txn, events);
    txn.put(CF_WEBHOOKS, webhook.id.as_bytes().to_vec(), &webhook)?;
    Ok(webhook)
}

/// Attaches and detaches the observers a succeeded operation on `runtime_id` names (its
/// `attach_observer` / `detach_observer` steps), all or none: the first step that cannot be
/// carried out fails the operation (its index within a sequence).
pub(crate) fn observe(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    runtime_id: &str,
    action: &LifecycleAction,
) -> Result<Result<(), (Option<u32>, OperationError)>, StorageError> {
    let steps = action.steps();
    let step_index = |i: usize| matches!(action, LifecycleAction::Sequence { .. }).then_some(i as u32);
    let settings = txn.settings()?;
    let attaching = steps.iter().filter(|s| matches!(s, LifecycleAction::AttachObserver { .. })).count();
    for (i, step) in steps.iter().enumerate() {
        let why = match step {
            LifecycleAction::AttachObserver { webhook } => {
                refuse_new(txn, &settings, webhook, attaching)?.map(|refused| refused.to_string())
            }
            LifecycleAction::DetachObserver { webhook_id } => {
                let observer = txn.get::<Webhook>(CF_WEBHOOKS, webhook_id.as_bytes())?;
                let observes = observer.is_some_and(|w| w.filter.runtime_id.as_deref() == Some(runtime_id));
                (!observes).then(|| format!("webhook {webhook_id} is no observer of runtime {runtime_id}"))
            }
            _ => None,
        };
        if let Some(message) = why {
            return Ok(Err((step_index(i), OperationError { code: "observer_refused".into(), message })));
        }
    }
    for step in steps {
        match step {
            LifecycleAction::AttachObserver { webhook } => {
                store_new(txn, events, Webhook::clone(webhook))?;
            }
            LifecycleAction::DetachObserver { webhook_id } => {
                if let Some(webhook) = txn.get::<Webhook>(CF_WEBHOOKS, webhook_id.as_bytes())? {
                    remove(txn, events, &webhook)?;
                }
            }
            _ => {}
        }
    }
    Ok(Ok(()))
}

/// The runtime `runtime_id` was deleted, its last event written: the subscriptions that
/// observe it end with that event (removed once delivered through it, see
/// [`record_deliveries`]).
pub(crate) fn runtime_deleted(
    txn: &mut Txn<'_>,
    events: &EventWriter<'_>,
    runtime_id: &str,
) -> Result<(), StorageError> {
    let last = last_event_id(txn, events);
    for mut webhook in txn.scan::<Webhook>(CF_WEBHOOKS)? {
        if webhook.filter.runtime_id.as_deref() == Some(runtime_id) {
            webhook.ends_with = Some(last.clone());
            txn.put(CF_WEBHOOKS, webhook.id.as_bytes().to_vec(), &webhook)?;
        }
    }
    Ok(())
}

pub(crate) fn delete_webhook(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    id: String,
    tenant_id: Option<String>,
) -> Result<CommandReply, StorageError> {
    let found = txn.get::<Webhook>(CF_WEBHOOKS, id.as_bytes())?;
    let Some(webhook) = found.filter(|w| tenant_id.is_none() || w.tenant_id == tenant_id) else {
        return Ok(CommandReply::Rejected(Rejection::NotFound { kind: "webhook".into(), id }));
    };
    remove(txn, events, &webhook)?;
    Ok(CommandReply::Deleted { id })
}

/// Removes a subscription and its delivery log, on the audit feed.
fn remove(txn: &mut Txn<'_>, events: &mut EventWriter<'_>, webhook: &Webhook) -> Result<(), StorageError> {
    txn.delete(CF_WEBHOOKS, webhook.id.as_bytes().to_vec());
    txn.delete(CF_WEBHOOK_DELIVERIES, webhook.id.as_bytes().to_vec());
    events.write(txn, AUDIT_STREAM, EventType::WebhookDeleted, EventSeverity::Info, &audit(webhook))
}

/// The id of the event this entry wrote last.
fn last_event_id(txn: &Txn<'_>, events: &EventWriter<'_>) -> String {
    event_id(events.index, txn.events_in_entry - 1)
}

/// What the audit stream says of a subscription.
fn audit(webhook: &Webhook) -> runtimeai_model::JsonObject {
    let mut fields = vec![("webhook_id", webhook.id.as_str()), ("url", &webhook.url)];
    if let Some(runtime_id) = &webhook.filter.runtime_id {
        fields.push(("runtime_id", runtime_id));
    }
    audit_data(&fields, webhook.tenant_id.as_deref())
}

/// See [`crate::command::ClaimDeliveries`]; `index` is the entry's, the token of a new lease.
pub(crate) fn claim_deliveries(
    txn: &mut Txn<'_>,
    index: u64,
    at: Timestamp,
    node_id: u64,
    lease_ms: u64,
) -> Result<CommandReply, StorageError> {
    let current = txn.get::<DeliveryLease>(CF_SETTINGS, DELIVERY_LEASE_KEY)?;
    let lease = match current {
        Some(held) if held.node_id != node_id && held.until > at => return Ok(CommandReply::DeliveryLease(held)),
        Some(mine) if mine.node_id == node_id && mine.until > at => {
            DeliveryLease { until: lease_until(at, lease_ms), ..mine }
        }
        _ => DeliveryLease { node_id, token: index, until: lease_until(at, lease_ms) },
    };
    txn.put(CF_SETTINGS, DELIVERY_LEASE_KEY.to_vec(), &lease)?;
    Ok(CommandReply::DeliveryLease(lease))
}

pub(crate) fn record_deliveries(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    record: RecordDeliveries,
) -> Result<CommandReply, StorageError> {
    let RecordDeliveries { token, webhook_id, attempts, delivered_through } = record;
    let lease = txn.get::<DeliveryLease>(CF_SETTINGS, DELIVERY_LEASE_KEY)?;
    if lease.as_ref().map(|l| l.token) != Some(token) {
        return Ok(CommandReply::Rejected(Rejection::LeaseLost { token, holder: lease.map(|l| l.node_id) }));
    }
    let Some(mut webhook) = txn.get::<Webhook>(CF_WEBHOOKS, webhook_id.as_bytes())? else {
        return Ok(CommandReply::Rejected(Rejection::NotFound { kind: "webhook".into(), id: webhook_id }));
    };
    let key = webhook_id.as_bytes().to_vec();
    if !attempts.is_empty() {
        let mut log = txn.get::<Vec<WebhookDelivery>>(CF_WEBHOOK_DELIVERIES, &key)?.unwrap_or_default();
        log.extend(attempts);
        let over = log.len().saturating_sub(DELIVERIES_KEPT);
        log.drain(..over);
        txn.put(CF_WEBHOOK_DELIVERIES, key.clone(), &log)?;
    }
    if let Some(through) = delivered_through {
        if later(&through, &webhook.delivered_through) {
            webhook.delivered_through = through;
            txn.put(CF_WEBHOOKS, key, &webhook)?;
        }
    }
    if webhook.ends_with.as_deref().is_some_and(|last| !later(last, &webhook.delivered_through)) {
        remove(txn, events, &webhook)?;
    }
    Ok(CommandReply::Webhook(webhook))
}

/// Whether event id `a` comes after `b` in the feed (ids that do not parse never do).
fn later(a: &str, b: &str) -> bool {
    match (crate::keys::event_position(a), crate::keys::event_position(b)) {
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}
