//! Webhooks: subscriptions that have the cluster POST the events they select to a URL, signed
//! as the Standard Webhooks specification says, and the log of their delivery attempts.

use serde::{Deserialize, Serialize};

use crate::records::{Actor, Event, EventSeverity};
use crate::Timestamp;

/// A subscription: the events it selects go to `url`, in the feed's order, at least once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub description: Option<String>,
    pub filter: WebhookFilter,
    /// What the creator saw, fixed at creation: only this tenant's runtimes (`None`: every
    /// tenant's), and the audit stream only if `audit`.
    pub tenant_id: Option<String>,
    pub audit: bool,
    /// The signing key, `whsec_` and its base64 (shown once, in the create's reply).
    pub secret: String,
    #[serde(with = "crate::timestamp")]
    pub created_at: Timestamp,
    pub created_by: Actor,
    /// Delivered (or given up on) through this event id: the next delivery starts after it.
    pub delivered_through: String,
    /// Set when the runtime its filter names is deleted: that runtime's `runtime.deleted`
    /// event. Once delivered (or passed over) through it, the subscription is removed, since no
    /// event can select it again.
    pub ends_with: Option<String>,
}

/// Which events a subscription selects; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookFilter {
    /// Event types (`runtime.created`), or families (`operation.*`); empty: every type.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Only this runtime's events (an observer attached to it).
    #[serde(default)]
    pub runtime_id: Option<String>,
    /// Only events at least this severe.
    #[serde(default)]
    pub min_severity: Option<EventSeverity>,
}

impl WebhookFilter {
    /// Whether `event` passes the filter (what its tenant may see is decided elsewhere).
    pub fn selects(&self, event: &Event) -> bool {
        let typed = self.event_types.is_empty()
            || self.event_types.iter().any(|wanted| match wanted.strip_suffix(".*") {
                Some(family) => event.event_type.strip_prefix(family).is_some_and(|rest| rest.starts_with('.')),
                None => *wanted == event.event_type,
            });
        typed
            && self.runtime_id.as_ref().is_none_or(|id| *id == event.runtime_id)
            && self.min_severity.is_none_or(|least| severity_rank(event.severity) >= severity_rank(least))
    }
}

fn severity_rank(severity: EventSeverity) -> u8 {
    match severity {
        EventSeverity::Info => 0,
        EventSeverity::Warning => 1,
        EventSeverity::Critical => 2,
    }
}

/// One attempt to deliver one event to a subscription's URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookDelivery {
    /// The event, also the delivery's `webhook-id` (the same on every retry).
    pub event_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    #[serde(with = "crate::timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// The node that made it.
    pub node_id: u64,
    pub outcome: DeliveryOutcome,
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Why it did not succeed.
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// It will be tried again after a backoff.
    Failed,
    /// The last attempt failed: the subscription went on to the next event.
    GaveUp,
}

/// Which node delivers webhooks, until when: one at a time, fenced by `token` (the log index
/// of the entry that granted it), as executors hold operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryLease {
    pub node_id: u64,
    pub token: u64,
    #[serde(with = "crate::timestamp")]
    pub until: Timestamp,
}
