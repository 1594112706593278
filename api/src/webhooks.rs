//! Webhooks (`/v1/webhooks`): subscriptions that have the cluster POST the events they select
//! to a URL, and what a delivery looks like on the wire — the body, the Standard Webhooks
//! signature, and which destinations are refused — for the node that delivers them.
//!
//! A subscription sees what its creator saw: its tenant's runtimes (the `tenant_id` header, or
//! the principal's only tenant), the audit stream only if the creator manages the cluster.

use std::net::IpAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use runtimeai_model::{ClusterSettings, Event, EventSeverity, Runtime, Webhook, WebhookDelivery, WebhookFilter};
use runtimeai_raft::command::{CreateWebhook, DeleteWebhook};
use runtimeai_raft::{CommandReply, Op};

use crate::actions::ObserverAttachRequest;
use crate::auth::{may, Caller, Permission};
use crate::doc_types::{IdempotencyKey, ProblemResponses, TenantId};
use crate::extract::{Body, PathParam};
use crate::mutation::{new_id, propose};
use crate::problem::Problem;
use crate::runtimes::EventView;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_webhooks, create_webhook))
        .routes(routes!(get_webhook, delete_webhook))
        .routes(routes!(webhook_deliveries))
        .routes(routes!(webhook_secret))
}

/// A new subscription.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookCreateRequest {
    /// Where deliveries are POSTed: `http` or `https`, at most 2048 bytes, no credentials in it.
    #[schema(max_length = 2048, pattern = "^https?://[^\\s]+$")]
    pub url: String,
    #[serde(default)]
    #[schema(max_length = 256)]
    pub description: Option<String>,
    /// Event types (`runtime.created`) or families (`operation.*`), at most 32; every type when
    /// absent or empty.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub event_types: Vec<String>,
    /// Only this runtime's events.
    #[serde(default)]
    pub runtime_id: Option<String>,
    /// Only events at least this severe.
    #[serde(default)]
    pub min_severity: Option<EventSeverity>,
}

/// A subscription as clients see it: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    pub description: Option<String>,
    pub filter: WebhookFilter,
    /// The tenant whose runtimes' events it receives (absent: every tenant's).
    pub tenant_id: Option<String>,
    /// Whether it receives the audit stream (policies, keys, settings, members, webhooks).
    pub audit: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub created_by: String,
    /// The last event delivered (or given up on); the next delivery is of a later one.
    pub delivered_through: String,
    /// Present once the runtime it observes is deleted: its `runtime.deleted` event. The
    /// subscription is removed when delivered through it.
    pub ends_with: Option<String>,
}

impl From<Webhook> for WebhookView {
    fn from(webhook: Webhook) -> Self {
        WebhookView {
            id: webhook.id,
            url: webhook.url,
            description: webhook.description,
            filter: webhook.filter,
            tenant_id: webhook.tenant_id,
            audit: webhook.audit,
            created_at: webhook.created_at,
            created_by: webhook.created_by.to_string(),
            delivered_through: webhook.delivered_through,
            ends_with: webhook.ends_with,
        }
    }
}

/// A subscription just created, with the secret its deliveries are signed with (shown once).
#[derive(Debug, Serialize, ToSchema)]
pub struct NewWebhook {
    /// `whsec_` and the base64 of the HMAC-SHA256 key, as Standard Webhooks libraries take it.
    pub secret: String,
    pub webhook: WebhookView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub items: Vec<WebhookView>,
}

/// A subscription's latest delivery attempts (up to 100), oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub items: Vec<WebhookDelivery>,
}

/// Subscribe a URL to events. Deliveries are POSTs of `{"type", "timestamp", "data": <event>}`
/// signed as Standard Webhooks says (`webhook-id` = the event's id, the same on every retry;
/// `webhook-timestamp`; `webhook-signature: v1,<base64 HMAC-SHA256>`), in the feed's order, at
/// least once: a receiver that does not answer 2xx within 10 s gets the event again after 1 s,
/// 2 s, 4 s, ... (at most an hour apart), 15 attempts in all. Destinations on loopback,
/// link-local, metadata and unspecified addresses are refused (422 here for an address in the
/// URL, at delivery for a name that resolves to one) unless the setting
/// `webhook_allowed_destinations` names their network; redirects are not followed.
#[utoipa::path(post, path = "/v1/webhooks", tag = "Webhooks", params(IdempotencyKey, TenantId),
    request_body = WebhookCreateRequest,
    responses((status = 201, description = "Created", body = NewWebhook), ProblemResponses))]
pub(crate) async fn create_webhook(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<WebhookCreateRequest>,
) -> Result<Response, Problem> {
    state.replica.read_barrier().await?;
    let settings = state.replica.state().settings();
    check_destination_url(&request.url, &settings, "$.url")?;
    check_filter(request.description.as_deref(), &request.event_types, "$")?;
    if let Some(id) = &request.runtime_id {
        crate::runtimes::read_runtime(&state, &caller, id, Default::default()).await?;
    }
    let webhook = new_webhook(&caller, request)?;
    let secret = webhook.secret.clone();
    let id = webhook.id.clone();
    match propose(&state, &caller, &webhook_body(&webhook), Op::CreateWebhook(CreateWebhook { webhook })).await? {
        CommandReply::Webhook(webhook) if webhook.id == id => {
            Ok((StatusCode::CREATED, Json(NewWebhook { secret, webhook: webhook.into() })).into_response())
        }
        CommandReply::Webhook(webhook) => Err(Problem::new(
            StatusCode::CONFLICT,
            "webhook-already-created",
            format!("this request already created webhook {}; its secret was shown then", webhook.id),
        )),
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// What an idempotency key's fingerprint covers: the request, not the fresh id and secret.
fn webhook_body(webhook: &Webhook) -> serde_json::Value {
    serde_json::json!({ "url": webhook.url, "description": webhook.description, "filter": webhook.filter })
}

/// A new signing secret: `whsec_` and the base64 of 32 random bytes.
fn new_secret() -> String {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("the OS gives random bytes");
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key))
}

/// The observer `attach_observer` (its params at `path`) subscribes to `runtime`'s events: a
/// webhook of the runtime's tenant, filtered to the runtime, without the audit stream.
pub(crate) fn observer_of(
    caller: &Caller,
    runtime: &Runtime,
    settings: &ClusterSettings,
    request: ObserverAttachRequest,
    path: &str,
) -> Result<Webhook, Problem> {
    check_destination_url(&request.url, settings, &format!("{path}.url"))?;
    check_filter(request.description.as_deref(), &request.event_types, path)?;
    let secret = match request.secret {
        Some(secret) => {
            let key = secret.strip_prefix("whsec_").map(|k| base64::engine::general_purpose::STANDARD.decode(k));
            if !key.is_some_and(|k| k.is_ok_and(|k| (24..=64).contains(&k.len()))) {
                let message = "whsec_ and the base64 of 24 to 64 bytes";
                return Err(Problem::invalid_field(format!("{path}.secret"), message));
            }
            secret
        }
        None => new_secret(),
    };
    Ok(Webhook {
        id: new_id("wh"),
        url: request.url,
        description: request.description,
        filter: WebhookFilter {
            event_types: request.event_types,
            runtime_id: Some(runtime.id.clone()),
            min_severity: request.min_severity,
        },
        tenant_id: runtime.tenant_id.clone(),
        audit: false,
        secret,
        created_at: chrono::Utc::now(),
        created_by: caller.actor(),
        delivered_through: String::new(),
        ends_with: None,
    })
}

/// The subscription `request` asks for, seeing what `caller` sees, with a new id and secret.
pub(crate) fn new_webhook(caller: &Caller, request: WebhookCreateRequest) -> Result<Webhook, Problem> {
    let tenant_id = caller.tenant_for_new(None, "tenant_id")?;
    Ok(Webhook {
        id: new_id("wh"),
        url: request.url,
        description: request.description,
        filter: WebhookFilter {
            event_types: request.event_types,
            runtime_id: request.runtime_id,
            min_severity: request.min_severity,
        },
        tenant_id,
        audit: may(&caller.principal, Permission::ManageCluster),
        secret: new_secret(),
        created_at: chrono::Utc::now(),
        created_by: caller.actor(),
        // Apply sets it: the subscription starts after the entry that creates it.
        delivered_through: String::new(),
        ends_with: None,
    })
}

/// A subscription's description and event types (the fields under `path`).
fn check_filter(description: Option<&str>, event_types: &[String], path: &str) -> Result<(), Problem> {
    if description.is_some_and(|d| d.len() > 256) {
        return Err(Problem::invalid_field(format!("{path}.description"), "at most 256 bytes"));
    }
    if event_types.len() > 32 {
        return Err(Problem::invalid_field(format!("{path}.event_types"), "at most 32 types"));
    }
    for (i, wanted) in event_types.iter().enumerate() {
        let name = wanted.strip_suffix(".*").unwrap_or(wanted);
        let well_formed = !name.is_empty()
            && name.len() <= 64
            && name.split('.').all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        if !well_formed {
            let message = "an event type such as runtime.created, or a family such as operation.*";
            return Err(Problem::invalid_field(format!("{path}.event_types[{i}]"), message));
        }
    }
    Ok(())
}

/// 400 (naming `field`) for a URL that is not an `http(s)` URL without credentials, 422 for one
/// whose host is an address deliveries may not go to.
pub fn check_destination_url(url: &str, settings: &ClusterSettings, field: &str) -> Result<reqwest::Url, Problem> {
    let invalid = |message: &str| Problem::invalid_field(field, message);
    if url.len() > 2048 {
        return Err(invalid("at most 2048 bytes"));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(&format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("must be http or https"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid("must not carry credentials"));
    }
    match parsed.host() {
        None => Err(invalid("has no host")),
        Some(url::Host::Ipv4(ip)) => refuse(IpAddr::V4(ip), settings).map(|()| parsed.clone()),
        Some(url::Host::Ipv6(ip)) => refuse(IpAddr::V6(ip), settings).map(|()| parsed.clone()),
        Some(url::Host::Domain(_)) => Ok(parsed.clone()),
    }
}

fn refuse(ip: IpAddr, settings: &ClusterSettings) -> Result<(), Problem> {
    match refused_destination(ip, settings) {
        Some(why) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "destination-refused",
            format!(
                "webhooks are not delivered to {ip}: {why} (allow it with the setting webhook_allowed_destinations)"
            ),
        )),
        None => Ok(()),
    }
}

/// Why deliveries may not go to `ip`, unless the settings allow its network: addresses that
/// reach the node itself or its cloud's metadata service rather than a receiver.
pub fn refused_destination(ip: IpAddr, settings: &ClusterSettings) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let allowed = settings.webhook_allowed_destinations.iter().filter_map(|net| net.parse::<ipnet::IpNet>().ok());
    if allowed.into_iter().any(|net| net.contains(&ip)) {
        return None;
    }
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4 == std::net::Ipv4Addr::new(100, 100, 100, 200) => Some("a metadata service's address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address (where metadata services live)"),
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
            Some("not an address of one host")
        }
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.segments() == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254] => {
            Some("a metadata service's address")
        }
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => Some("not an address of one host"),
        _ => None,
    }
}

/// Checks the setting's networks (422 naming the first that is not a CIDR).
pub(crate) fn check_allowed_destinations(networks: &[String]) -> Result<(), Problem> {
    if networks.len() > 64 {
        return Err(Problem::invalid_field("$.webhook_allowed_destinations", "at most 64 networks"));
    }
    for (i, net) in networks.iter().enumerate() {
        if net.parse::<ipnet::IpNet>().is_err() {
            let message = "a network in CIDR notation, such as 127.0.0.1/32 or fd00::/8";
            return Err(Problem::invalid_field(format!("$.webhook_allowed_destinations[{i}]"), message));
        }
    }
    Ok(())
}

/// A delivery's body: the event as the REST API shows it, in the Standard Webhooks envelope.
pub fn delivery_body(event: Event) -> Vec<u8> {
    let (event_type, timestamp) = (event.event_type.clone(), event.ts);
    let envelope = serde_json::json!({ "type": event_type, "timestamp": timestamp, "data": EventView::from(event) });
    serde_json::to_vec(&envelope).expect("an event serializes")
}

/// The `webhook-signature` header for a delivery: `v1,` and the base64 of the HMAC-SHA256 of
/// `<id>.<timestamp>.<body>` under the key `secret` (`whsec_<base64>`) encodes.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|e| format!("bad secret: {e}"))?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(format!("{id}.{timestamp}.").as_bytes());
    context.update(body);
    Ok(format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(context.sign().as_ref())))
}

/// The subscriptions the caller sees (those of its tenant, or all of its tenants').
#[utoipa::path(get, path = "/v1/webhooks", tag = "Webhooks", params(TenantId),
    responses((status = 200, description = "OK", body = WebhookList), ProblemResponses))]
pub(crate) async fn list_webhooks(State(state): State<AppState>, caller: Caller) -> Result<Json<WebhookList>, Problem> {
    state.replica.read_barrier().await?;
    let webhooks = state.replica.state().list_webhooks()?;
    let items = webhooks.into_iter().filter(|w| caller.sees(w.tenant_id.as_deref())).map(WebhookView::from).collect();
    Ok(Json(WebhookList { items }))
}

async fn read_webhook(state: &AppState, caller: &Caller, id: &str) -> Result<Webhook, Problem> {
    state.replica.read_barrier().await?;
    match state.replica.state().get_webhook(id)? {
        Some(webhook) if caller.sees(webhook.tenant_id.as_deref()) => Ok(webhook),
        _ => Err(Problem::not_found(format!("webhook {id} not found"))),
    }
}

#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}", tag = "Webhooks",
    params(("webhook_id" = String, Path), TenantId),
    responses((status = 200, description = "OK", body = WebhookView), ProblemResponses))]
pub(crate) async fn get_webhook(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(webhook_id): PathParam<String>,
) -> Result<Json<WebhookView>, Problem> {
    Ok(Json(read_webhook(&state, &caller, &webhook_id).await?.into()))
}

/// Unsubscribe: nothing more is delivered from the entry that removes it on.
#[utoipa::path(delete, path = "/v1/webhooks/{webhook_id}", tag = "Webhooks",
    params(("webhook_id" = String, Path), IdempotencyKey, TenantId),
    responses((status = 204, description = "Deleted"), ProblemResponses))]
pub(crate) async fn delete_webhook(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(webhook_id): PathParam<String>,
) -> Result<StatusCode, Problem> {
    let webhook = read_webhook(&state, &caller, &webhook_id).await?;
    let op = Op::DeleteWebhook(DeleteWebhook { id: webhook.id, tenant_id: webhook.tenant_id });
    match propose(&state, &caller, &(), op).await? {
        CommandReply::Deleted { .. } => Ok(StatusCode::NO_CONTENT),
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// The subscription's latest delivery attempts (up to 100), oldest first: which event, which
/// attempt, the receiver's status or the error, and whether it will be retried.
#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}/deliveries", tag = "Webhooks",
    params(("webhook_id" = String, Path), TenantId),
    responses((status = 200, description = "OK", body = DeliveryList), ProblemResponses))]
pub(crate) async fn webhook_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(webhook_id): PathParam<String>,
) -> Result<Json<DeliveryList>, Problem> {
    let webhook = read_webhook(&state, &caller, &webhook_id).await?;
    Ok(Json(DeliveryList { items: state.replica.state().webhook_deliveries(&webhook.id)? }))
}

/// The key a subscription's deliveries are signed with.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookSecret {
    /// `whsec_` and the base64 of the HMAC-SHA256 key.
    pub secret: String,
}

/// The subscription's signing secret (for an observer whose secret the cluster made, or a
/// receiver set up again); for those who may create subscriptions.
#[utoipa::path(get, path = "/v1/webhooks/{webhook_id}/secret", tag = "Webhooks",
    params(("webhook_id" = String, Path), TenantId),
    responses((status = 200, description = "OK", body = WebhookSecret), ProblemResponses))]
pub(crate) async fn webhook_secret(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(webhook_id): PathParam<String>,
) -> Result<Json<WebhookSecret>, Problem> {
    Ok(Json(WebhookSecret { secret: read_webhook(&state, &caller, &webhook_id).await?.secret }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (spec/standard-webhooks.md).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let signed = signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(signed, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_ne!(signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body).unwrap(), signed);
    }

    #[test]
    fn internal_destinations_are_refused_unless_allowed() {
        let mut settings = ClusterSettings::default();
        for refused in [
            "127.0.0.1",
            "127.8.9.1",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "0.0.0.0",
            "::ffff:127.0.0.1",
            "100.100.100.200",
        ] {
            assert!(refused_destination(refused.parse().unwrap(), &settings).is_some(), "{refused}");
        }
        for fine in ["10.1.2.3", "192.168.0.10", "203.0.113.7", "2001:db8::1"] {
            assert_eq!(refused_destination(fine.parse().unwrap(), &settings), None, "{fine}");
        }
        settings.webhook_allowed_destinations = vec!["127.0.0.1/32".into()];
        assert_eq!(refused_destination("127.0.0.1".parse().unwrap(), &settings), None);
        assert!(refused_destination("127.0.0.2".parse().unwrap(), &settings).is_some());
        let check = |url: &str| check_destination_url(url, &settings, "$.url");
        assert!(check("http://[::1]:9/x").is_err());
        assert!(check("http://user:pw@example.com/").is_err());
        assert!(check("file:///etc/passwd").is_err());
        assert!(check("https://hooks.example.com/in").is_ok());
        assert!(check_allowed_destinations(&["10.0.0.0/8".into()]).is_ok());
        assert!(check_allowed_destinations(&["localhost".into()]).is_err());
    }
}
