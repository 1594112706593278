//! API keys (`/v1/keys`: create, list, revoke, rotate; admins only), who am I
//! (`/v1/auth/whoami`), and the cluster's audit feed (`/v1/audit`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use runtimeai_model::{AgentMode, ApiKey, Principal, PrincipalKind, Role, ALL_TENANTS};
use runtimeai_raft::command::{CreateApiKey, RevokeApiKey};
use runtimeai_raft::{CommandReply, Op};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{new_key, Caller};
use crate::doc_types::{IdempotencyKey, ProblemResponses};
use crate::extract::{Body, OptionalBody, PathParam, QueryParams};
use crate::mutation::propose;
use crate::problem::Problem;
use crate::runtimes::{EventList, EventParams};
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(audit))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(get_key, revoke_key))
        .routes(routes!(rotate_key))
}

/// Who the credentials of this request are, and the tenant it acts in.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    pub principal: Principal,
    /// `human:<name>`, `agent:<name>` or `service:<name>`: what events record.
    pub actor: String,
    /// The tenant the `tenant_id` header chose, if any.
    pub tenant_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/auth/whoami", tag = "Auth",
    responses((status = 200, description = "OK", body = WhoAmI), ProblemResponses))]
pub(crate) async fn whoami(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        principal: Principal::clone(&caller.principal),
        actor: caller.actor().to_string(),
        tenant_id: caller.tenant,
    })
}

/// A new API key's principal.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyCreateRequest {
    /// The principal's name (1 to 128 characters: letters, digits, `.-_@`).
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,128}$")]
    pub name: String,
    pub kind: PrincipalKind,
    /// Tenants it acts in (`*` for all).
    #[schema(min_items = 1)]
    pub tenants: Vec<String>,
    /// An agent takes the roles `agent` or `viewer` only.
    #[schema(min_items = 1)]
    pub roles: Vec<Role>,
    /// For agents: `read_only`, `suggest_only` (default) or `act`.
    #[serde(default)]
    pub agent_mode: Option<AgentMode>,
    /// When it stops authenticating (RFC 3339, in the future); never when absent.
    #[serde(default)]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// An API key as admins see it: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub principal: Principal,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub created_by: String,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<ApiKey> for KeyView {
    fn from(key: ApiKey) -> Self {
        KeyView {
            id: key.id,
            principal: key.principal,
            created_at: key.created_at,
            created_by: key.created_by,
            expires_at: key.expires_at,
            revoked_at: key.revoked_at,
        }
    }
}

/// A key just created: its bearer token is shown here once and stored nowhere.
#[derive(Debug, Serialize, ToSchema)]
pub struct NewKey {
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    pub key: KeyView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub items: Vec<KeyView>,
}

fn check_principal(request: &KeyCreateRequest) -> Result<(), Problem> {
    let name_ok = !request.name.is_empty()
        && request.name.len() <= 128
        && request.name.chars().all(|c| c.is_ascii_alphanumeric() || ".-_@".contains(c));
    if !name_ok {
        return Err(Problem::invalid_field("$.name", "1 to 128 characters: letters, digits, . - _ @"));
    }
    if request.tenants.is_empty() {
        return Err(Problem::invalid_field("$.tenants", "give at least one tenant (or \"*\" for all)"));
    }
    if let Some(i) =
        request.tenants.iter().position(|t| t.is_empty() || t.len() > 63 || (t.contains('*') && t != ALL_TENANTS))
    {
        return Err(Problem::invalid_field(format!("$.tenants[{i}]"), "a tenant id (1 to 63 characters) or \"*\""));
    }
    if request.roles.is_empty() {
        return Err(Problem::invalid_field("$.roles", "give at least one role"));
    }
    let agent = request.kind == PrincipalKind::Agent;
    if agent {
        if let Some(i) = request.roles.iter().position(|r| !matches!(r, Role::Agent | Role::Viewer)) {
            return Err(Problem::invalid_field(
                format!("$.roles[{i}]"),
                "an agent takes the roles agent or viewer only",
            ));
        }
    } else if request.agent_mode.is_some() {
        return Err(Problem::invalid_field("$.agent_mode", "only agents have a mode"));
    }
    if request.expires_at.is_some_and(|at| at <= chrono::Utc::now()) {
        return Err(Problem::invalid_field("$.expires_at", "must be in the future"));
    }
    Ok(())
}

/// Create an API key for a principal; the reply holds its token, shown only this once.
#[utoipa::path(post, path = "/v1/keys", tag = "Auth", params(IdempotencyKey), request_body = KeyCreateRequest,
    responses((status = 201, description = "Created", body = NewKey), ProblemResponses))]
pub(crate) async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<KeyCreateRequest>,
) -> Result<Response, Problem> {
    check_principal(&request)?;
    let principal = Principal {
        name: request.name.clone(),
        kind: request.kind,
        tenants: request.tenants.clone(),
        roles: request.roles.clone(),
        agent_mode: (request.kind == PrincipalKind::Agent).then(|| request.agent_mode.unwrap_or_default()),
    };
    let (key, token) = new_key(principal, &caller.actor(), request.expires_at);
    store_key(&state, &caller, &request, key, token, None).await
}

/// Proposes a new key (revoking `replaces`); 201 with its token.
async fn store_key(
    state: &AppState,
    caller: &Caller,
    body: &impl Serialize,
    key: ApiKey,
    token: String,
    replaces: Option<String>,
) -> Result<Response, Problem> {
    // An idempotent retry gets the first reply, whose key has another secret: it must not be
    // shown a token that authenticates nothing.
    let id = key.id.clone();
    match propose(state, caller, body, Op::CreateApiKey(CreateApiKey { key, replaces })).await? {
        CommandReply::ApiKey(key) if key.id == id => {
            Ok((StatusCode::CREATED, Json(NewKey { token, key: key.into() })).into_response())
        }
        CommandReply::ApiKey(key) => Err(Problem::new(
            StatusCode::CONFLICT,
            "key-already-created",
            format!("this request already created key {}; its token was shown then and cannot be shown again", key.id),
        )),
        other => Err(Problem::unexpected_reply(other)),
    }
}

#[utoipa::path(get, path = "/v1/keys", tag = "Auth",
    responses((status = 200, description = "OK", body = KeyList), ProblemResponses))]
pub(crate) async fn list_keys(State(state): State<AppState>) -> Result<Json<KeyList>, Problem> {
    state.replica.read_barrier().await?;
    let mut items: Vec<KeyView> = state.replica.state().api_keys().values().cloned().map(KeyView::from).collect();
    items.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(KeyList { items }))
}

async fn read_key(state: &AppState, id: &str) -> Result<ApiKey, Problem> {
    state.replica.read_barrier().await?;
    state.replica.state().api_key(id).ok_or_else(|| Problem::not_found(format!("API key {id} not found")))
}

#[utoipa::path(get, path = "/v1/keys/{key_id}", tag = "Auth", params(("key_id" = String, Path)),
    responses((status = 200, description = "OK", body = KeyView), ProblemResponses))]
pub(crate) async fn get_key(
    State(state): State<AppState>,
    PathParam(key_id): PathParam<String>,
) -> Result<Json<KeyView>, Problem> {
    Ok(Json(read_key(&state, &key_id).await?.into()))
}

/// Revoke a key: from the entry that records it on, it authenticates nothing on any node.
#[utoipa::path(delete, path = "/v1/keys/{key_id}", tag = "Auth", params(("key_id" = String, Path), IdempotencyKey),
    responses((status = 200, description = "Revoked", body = KeyView), ProblemResponses))]
pub(crate) async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(key_id): PathParam<String>,
) -> Result<Json<KeyView>, Problem> {
    let op = Op::RevokeApiKey(RevokeApiKey { id: key_id.clone() });
    match propose(&state, &caller, &(), op).await? {
        CommandReply::ApiKey(key) => Ok(Json(key.into())),
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// A rotation's options.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRotateRequest {
    /// The new key's expiry (in the future); the old key's when absent.
    #[serde(default)]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Rotate a key: a new key for the same principal, and the old one revoked in the same entry.
#[utoipa::path(post, path = "/v1/keys/{key_id}/rotate", tag = "Auth", params(("key_id" = String, Path), IdempotencyKey),
    request_body(content = Option<KeyRotateRequest>),
    responses((status = 201, description = "Created", body = NewKey), ProblemResponses))]
pub(crate) async fn rotate_key(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(key_id): PathParam<String>,
    OptionalBody(request): OptionalBody<KeyRotateRequest>,
) -> Result<Response, Problem> {
    let old = read_key(&state, &key_id).await?;
    if request.expires_at.is_some_and(|at| at <= chrono::Utc::now()) {
        return Err(Problem::invalid_field("$.expires_at", "must be in the future"));
    }
    let (key, token) = new_key(old.principal, &caller.actor(), request.expires_at.or(old.expires_at));
    store_key(&state, &caller, &request, key, token, Some(key_id)).await
}

/// The cluster's audit feed: policy, key and settings changes, oldest first, a page at a time
/// (`after` the last event's id for the next).
#[utoipa::path(get, path = "/v1/audit", tag = "Auth", params(EventParams),
    responses((status = 200, description = "OK", body = EventList), ProblemResponses))]
pub(crate) async fn audit(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<EventParams>,
) -> Result<Json<EventList>, Problem> {
    params.consistency.prepare(&state.replica).await?;
    Ok(Json(EventList { items: params.page(&state, runtimeai_raft::AUDIT_STREAM)? }))
}
