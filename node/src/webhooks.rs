//! The webhook deliverer every node runs; the one holding the delivery lease delivers.
//!
//! Each subscription is delivered in the feed's order from its replicated cursor
//! (`delivered_through`): up to [`BATCH`] events POSTed one after the other, then one command
//! records the attempts and moves the cursor. A receiver that fails (no 2xx in
//! [`REQUEST_TIMEOUT`], or no answer) holds its subscription at that event, retried after 1 s,
//! 2 s, 4 s ... (at most [`MAX_BACKOFF`]) until [`MAX_ATTEMPTS`], then given up on. A node that
//! dies after POSTing and before recording leaves the cursor behind: the next holder posts
//! those events again (at least once; `webhook-id` lets a receiver drop repeats). A node that
//! lost the lease has its records refused, so it never moves a cursor another node moves.
//! Events a filter passes over move the cursor at most every [`SKIP_RECORD_EVERY`] (the holder
//! remembers how far it looked in between; a new holder looks through them again).
//!
//! Destinations are checked at every delivery, on the addresses the name resolves to then, and
//! the request goes to exactly those addresses (no second lookup a DNS rebinding could turn
//! toward the node), without following redirects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtimeai_model::{ClusterSettings, DeliveryOutcome, Event, Webhook, WebhookDelivery};
use runtimeai_raft::command::{ClaimDeliveries, RecordDeliveries};
use runtimeai_raft::state_reader::EventCursor;
use runtimeai_raft::{CommandReply, Op, Rejection, Replica, AUDIT_STREAM};

/// How long a lease lasts; its holder renews it a third of the way through.
pub const LEASE: Duration = Duration::from_secs(6);
/// Events POSTed to one subscription before their attempts are recorded.
const BATCH: usize = 20;
/// Events looked at per subscription and round (filters may pass over many).
const SCAN: usize = 2_000;
/// Attempts per event before the subscription goes on without it.
pub const MAX_ATTEMPTS: u32 = 15;
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds are at least this far apart (every applied entry wakes the deliverer).
const ROUND_GAP: Duration = Duration::from_millis(100);
/// How often a subscription's cursor is moved past events its filter passes over (in between,
/// the holder remembers it): a busy cluster's events do not cost every subscription a write.
const SKIP_RECORD_EVERY: Duration = Duration::from_secs(5);

/// A subscription whose current event failed: when to try again, and how often it was tried.
struct Retry {
    event_id: String,
    attempts: u32,
    at: Instant,
}

/// Where the holder has looked through a subscription's events, and when it last recorded it.
struct Scanned {
    through: String,
    recorded_at: Instant,
}

/// How one subscription's round went.
struct Outcome {
    retry: Option<Retry>,
    /// Looked through (and delivered or passed over) this far.
    through: Option<String>,
    recorded: bool,
}

struct Deliverer {
    replica: Arc<Replica>,
    node_id: u64,
    /// The lease this node holds: its token and when to renew it.
    held: Option<(u64, Instant)>,
    retries: HashMap<String, Retry>,
    /// Valid while this node holds the lease (only the holder moves cursors).
    scanned: HashMap<String, Scanned>,
}

/// Delivers webhooks whenever this node holds the lease, until `stop`.
pub async fn run(replica: Arc<Replica>, node_id: u64, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut applied = replica.state().watch_applied();
    let mut deliverer = Deliverer { replica, node_id, held: None, retries: HashMap::new(), scanned: HashMap::new() };
    loop {
        let wait = deliverer.round().await;
        tokio::time::sleep(ROUND_GAP).await;
        tokio::select! {
            _ = stop.changed() => return,
            _ = applied.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}

impl Deliverer {
    /// Delivers what is due if this node holds (or can take) the lease; returns how long to
    /// wait at most before the next round.
    async fn round(&mut self) -> Duration {
        let webhooks = match self.replica.state().list_webhooks() {
            Ok(webhooks) => webhooks,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the webhook subscriptions");
                return Duration::from_secs(1);
            }
        };
        self.retries.retain(|id, _| webhooks.iter().any(|w| w.id == *id));
        self.scanned.retain(|id, _| webhooks.iter().any(|w| w.id == *id));
        // A cluster without subscriptions costs no lease traffic.
        if webhooks.is_empty() {
            return Duration::from_secs(1);
        }
        let Some(token) = self.lease().await else {
            self.retries.clear();
            self.scanned.clear();
            return Duration::from_secs(1);
        };
        let settings = self.replica.state().settings();
        let now = Instant::now();
        let due: Vec<Webhook> =
            webhooks.into_iter().filter(|w| self.retries.get(&w.id).is_none_or(|retry| retry.at <= now)).collect();
        let deliveries = due.iter().map(|webhook| {
            let scanned = self.scanned.get(&webhook.id);
            let from = scanned.map_or(webhook.delivered_through.as_str(), |s| s.through.as_str());
            let record_skips = scanned.is_none_or(|s| s.recorded_at.elapsed() >= SKIP_RECORD_EVERY);
            self.deliver(webhook, &settings, token, from, record_skips)
        });
        let outcomes = futures::future::join_all(deliveries).await;
        for (webhook, outcome) in due.iter().zip(outcomes) {
            match outcome {
                Ok(Outcome { retry, through, recorded }) => {
                    match retry {
                        Some(retry) => self.retries.insert(webhook.id.clone(), retry),
                        None => self.retries.remove(&webhook.id),
                    };
                    if let Some(through) = through {
                        let recorded_at = match self.scanned.get(&webhook.id) {
                            Some(scanned) if !recorded => scanned.recorded_at,
                            _ => Instant::now(),
                        };
                        self.scanned.insert(webhook.id.clone(), Scanned { through, recorded_at });
                    }
                }
                Err(e) => {
                    // Perhaps the lease was lost: start again from the replicated cursors.
                    self.scanned.clear();
                    tracing::warn!(webhook = %webhook.id, error = %e, "cannot record webhook deliveries");
                }
            }
        }
        let earliest = self.retries.values().map(|r| r.at.saturating_duration_since(Instant::now())).min();
        earliest.unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1))
    }

    /// The lease's token if this node holds it (claiming or renewing it when due).
    async fn lease(&mut self) -> Option<u64> {
        if let Some((token, renew_at)) = self.held {
            if Instant::now() < renew_at {
                return Some(token);
            }
        }
        let current = self.replica.state().delivery_lease().ok().flatten();
        if current.is_some_and(|l| l.node_id != self.node_id && l.until > chrono::Utc::now()) {
            self.held = None;
            return None;
        }
        let op = Op::ClaimDeliveries(ClaimDeliveries { node_id: self.node_id, lease_ms: LEASE.as_millis() as u64 });
        self.held = match self.replica.propose(crate::executor::system_command(op)).await {
            Ok(CommandReply::DeliveryLease(lease)) if lease.node_id == self.node_id => {
                if self.held.is_none_or(|(token, _)| token != lease.token) {
                    tracing::info!(token = lease.token, "this node delivers webhooks now");
                }
                Some((lease.token, Instant::now() + LEASE / 3))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot claim the webhook delivery lease");
                None
            }
        };
        self.held.map(|(token, _)| token)
    }

    /// Delivers what `webhook` has pending after event `from`, and records it (and, if
    /// `record_skips`, the events its filter passed over).
    async fn deliver(
        &self,
        webhook: &Webhook,
        settings: &ClusterSettings,
        token: u64,
        from: &str,
        record_skips: bool,
    ) -> Result<Outcome, String> {
        let (events, scanned_through) = self.pending(webhook, from)?;
        let mut attempts = Vec::new();
        let mut delivered_through = None;
        let mut retry = None;
        for event in events {
            let id = event.id.clone();
            let attempt = self.attempts_before(webhook, &id) + 1;
            let mut delivery = post(webhook, event, settings, self.node_id).await;
            delivery.attempt = attempt;
            match delivery.outcome {
                DeliveryOutcome::Delivered => delivered_through = Some(id),
                _ if attempt >= MAX_ATTEMPTS => {
                    delivery.outcome = DeliveryOutcome::GaveUp;
                    tracing::warn!(webhook = %webhook.id, event = %id, "gave up delivering an event");
                    delivered_through = Some(id);
                }
                _ => {
                    let at = Instant::now() + backoff(attempt);
                    retry = Some(Retry { event_id: id, attempts: attempt, at });
                }
            }
            attempts.push(delivery);
            if retry.is_some() {
                break;
            }
        }
        // Nothing selected among what was looked at, now or in an earlier round (remembered,
        // not yet recorded: with no new events since, nothing else would record it): the
        // cursor passes over it.
        if attempts.is_empty() {
            let remembered = (from != webhook.delivered_through).then(|| from.to_string());
            let through = scanned_through.or(remembered);
            if through.is_none() || !record_skips {
                return Ok(Outcome { retry, through, recorded: false });
            }
            delivered_through = through;
        }
        let through = delivered_through.clone();
        let record = RecordDeliveries { token, webhook_id: webhook.id.clone(), attempts, delivered_through };
        match self.replica.propose(crate::executor::system_command(Op::RecordDeliveries(record))).await {
            Ok(CommandReply::Webhook(_)) => Ok(Outcome { retry, through, recorded: true }),
            // Deleted meanwhile: nothing more to deliver.
            Ok(CommandReply::Rejected(Rejection::NotFound { .. })) => {
                Ok(Outcome { retry: None, through: None, recorded: true })
            }
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The next events for `webhook` after event `from` (at most [`BATCH`]), and the last event
    /// looked at (for the cursor to pass over when none is selected).
    fn pending(&self, webhook: &Webhook, from: &str) -> Result<(Vec<Event>, Option<String>), String> {
        let state = self.replica.state();
        let cursor: EventCursor = from.parse().map_err(|e| format!("{e}"))?;
        let mut selected = Vec::new();
        let mut last = None;
        let mut tenants: HashMap<String, Option<String>> = HashMap::new();
        for event in state.events_after(Some(cursor)).take(SCAN) {
            let event = event.map_err(|e| e.to_string())?;
            last = Some(event.id.clone());
            if webhook.filter.selects(&event) && self.sees(webhook, &event, &mut tenants) {
                selected.push(event);
                if selected.len() == BATCH {
                    break;
                }
            }
        }
        Ok((selected, last))
    }

    /// Whether the subscription's creator could see `event`: its tenant's, the audit stream's
    /// only if it manages the cluster.
    fn sees(&self, webhook: &Webhook, event: &Event, tenants: &mut HashMap<String, Option<String>>) -> bool {
        let recorded = || event.data.0.get("tenant_id").and_then(|t| t.as_str()).map(str::to_string);
        let tenant = if event.runtime_id == AUDIT_STREAM {
            if !webhook.audit {
                return false;
            }
            recorded()
        } else {
            tenants
                .entry(event.runtime_id.clone())
                .or_insert_with(|| match self.replica.state().get_runtime(&event.runtime_id) {
                    Ok(Some(runtime)) => runtime.tenant_id,
                    // Deleted: its last event says whose it was.
                    _ => recorded(),
                })
                .clone()
        };
        webhook.tenant_id.is_none() || webhook.tenant_id == tenant
    }

    /// Attempts already made at `event_id` (this node's count, else the delivery log's, as
    /// another node left it).
    fn attempts_before(&self, webhook: &Webhook, event_id: &str) -> u32 {
        if let Some(retry) = self.retries.get(&webhook.id).filter(|r| r.event_id == event_id) {
            return retry.attempts;
        }
        let log = self.replica.state().webhook_deliveries(&webhook.id).unwrap_or_default();
        log.iter().rev().find(|d| d.event_id == event_id).map_or(0, |d| d.attempt)
    }
}

/// The wait after failed attempt number `attempt`: 1 s, 2 s, 4 s, ... at most an hour.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(12)).min(MAX_BACKOFF)
}

/// One attempt: resolve, check, POST, signed. Never fails: how it went is the delivery.
async fn post(webhook: &Webhook, event: Event, settings: &ClusterSettings, node_id: u64) -> WebhookDelivery {
    let started = Instant::now();
    let mut delivery = WebhookDelivery {
        event_id: event.id.clone(),
        attempt: 1,
        at: chrono::Utc::now(),
        node_id,
        outcome: DeliveryOutcome::Failed,
        status: None,
        error: None,
        duration_ms: 0,
    };
    // The lookup has no timeout of its own.
    let sent = tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), send(webhook, event, settings));
    match sent.await.unwrap_or_else(|_| Err("no answer in time".to_string())) {
        Ok(status) if (200..300).contains(&status) => {
            delivery.outcome = DeliveryOutcome::Delivered;
            delivery.status = Some(status);
        }
        Ok(status) => {
            delivery.status = Some(status);
            delivery.error = Some(format!("the receiver answered {status}"));
        }
        Err(why) => delivery.error = Some(why),
    }
    delivery.duration_ms = started.elapsed().as_millis() as u64;
    delivery
}

async fn send(webhook: &Webhook, event: Event, settings: &ClusterSettings) -> Result<u16, String> {
    let url = runtimeai_api::webhooks::check_destination_url(&webhook.url, settings, "url").map_err(|p| p.detail)?;
    let host = url.host_str().ok_or("the URL has no host")?.trim_matches(['[', ']']).to_string();
    let port = url.port_or_known_default().ok_or("the URL has no port")?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if let Some((addr, why)) =
        addrs.iter().find_map(|a| runtimeai_api::webhooks::refused_destination(a.ip(), settings).map(|why| (a, why)))
    {
        return Err(format!("refused: {host} resolves to {}, {why}", addr.ip()));
    }
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .resolve_to_addrs(&host, &addrs)
        .user_agent(concat!("runtimeai-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let id = event.id.clone();
    let body = runtimeai_api::webhooks::delivery_body(event);
    let timestamp = chrono::Utc::now().timestamp();
    let signature = runtimeai_api::webhooks::signature(&webhook.secret, &id, timestamp, &body)?;
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("no answer: {}", error_chain(&e)))?;
    Ok(response.status().as_u16())
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let waits: Vec<u64> = (1..=MAX_ATTEMPTS).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(&waits[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(*waits.last().unwrap(), 3600);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }
}
