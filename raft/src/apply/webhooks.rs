//! Webhook subscriptions, their delivery log, and the lease that lets one node at a time
//! deliver them.
//!
//! Delivery happens outside the state machine (`runtimeai_node::webhooks`); what is replicated is
//! how far each subscription has been delivered and the attempts made, both written only by the
//! lease's holder: a node that lost the lease (it paused, another took over) has its records
//! refused, so two nodes never move a subscription's cursor.

use runtimeai_model::{
    within_limit, ClusterSettings, DeliveryLease, EventSeverity, EventType, Timestamp, Webhook, WebhookDelivery,
};

use super::events::{audit_data, EventWriter, AUDIT_STREAM};
use super::operations::lease_until;
use crate::command::{CommandReply, RecordDeliveries, Rejection};
use crate::keys::{event_id, DELIVERY_LEASE_KEY};
use crate::store::{CF_SETTINGS, CF_WEBHOOKS, CF_WEBHOOK_DELIVERIES};
use crate::txn::Txn;
use crate::types::StorageError;

/// Delivery attempts kept per subscription (the oldest go first).
pub const DELIVERIES_KEPT: usize = 100;

pub(crate) fn create_webhook(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: &ClusterSettings,
    mut webhook: Webhook,
) -> Result<CommandReply, StorageError> {
    if txn.get::<Webhook>(CF_WEBHOOKS, webhook.id.as_bytes())?.is_some() {
        return Ok(CommandReply::Rejected(Rejection::AlreadyExists { kind: "webhook".into(), id: webhook.id }));
    }
    let count = txn.scan::<Webhook>(CF_WEBHOOKS)?.len() + 1;
    if let Err(exceeded) = within_limit("webhooks", settings.limits.webhooks, count, "the number of webhooks") {
        return Ok(CommandReply::Rejected(exceeded.into()));
    }
    let data = audit_data(&[("webhook_id", &webhook.id), ("url", &webhook.url)], webhook.tenant_id.as_deref());
    events.write(txn, AUDIT_STREAM, EventType::WebhookCreated, EventSeverity::Info, &data)?;
    // It delivers what is written after it: from the event after its own creation's.
    webhook.delivered_through = event_id(events.index, txn.events_in_entry - 1);
    txn.put(CF_WEBHOOKS, webhook.id.as_bytes().to_vec(), &webhook)?;
    Ok(CommandReply::Webhook(webhook))
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
    txn.delete(CF_WEBHOOKS, id.as_bytes().to_vec());
    txn.delete(CF_WEBHOOK_DELIVERIES, id.as_bytes().to_vec());
    let data = audit_data(&[("webhook_id", &id), ("url", &webhook.url)], webhook.tenant_id.as_deref());
    events.write(txn, AUDIT_STREAM, EventType::WebhookDeleted, EventSeverity::Info, &data)?;
    Ok(CommandReply::Deleted { id })
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

pub(crate) fn record_deliveries(txn: &mut Txn<'_>, record: RecordDeliveries) -> Result<CommandReply, StorageError> {
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
    Ok(CommandReply::Webhook(webhook))
}

/// Whether event id `a` comes after `b` in the feed (ids that do not parse never do).
fn later(a: &str, b: &str) -> bool {
    match (crate::keys::event_position(a), crate::keys::event_position(b)) {
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}
