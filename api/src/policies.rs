//! Policies: the safety rules agents act under. Stored through raft; the engine
//! (`runtimeai_engine::policy`, run in apply) enforces them when an operation is accepted and
//! again right before it runs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use runtimeai_model::{Policy, PolicyRule};
use runtimeai_raft::command::{CreatePolicy, DeletePolicy};
use runtimeai_raft::{CommandReply, Op};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::doc_types::{ConsistencyParam, IdempotencyKey, ProblemResponses, TenantId};
use crate::extract::{Body, Consistency, PathParam, QueryParams};
use crate::mutation::{new_id, propose};
use crate::problem::Problem;
use crate::{validate, AppState};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_policies, create_policy)).routes(routes!(get_policy, delete_policy))
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyCreateRequest {
    #[schema(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub scope_env: Option<String>,
    #[schema(min_items = 1)]
    pub rules: Vec<PolicyRule>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PolicyListParams {
    #[serde(default)]
    pub scope_env: Option<String>,
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(linearizable|stale)$")]
    pub consistency: Consistency,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyList {
    pub items: Vec<Policy>,
}

#[utoipa::path(post, path = "/v1/policies", tag = "Policies", params(IdempotencyKey, TenantId),
    request_body = PolicyCreateRequest,
    responses((status = 201, description = "Created", body = Policy), ProblemResponses))]
pub(crate) async fn create_policy(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<PolicyCreateRequest>,
) -> Result<Response, Problem> {
    validate::name(&request.name, "$.name")?;
    let policy = Policy {
        id: new_id("pol"),
        name: request.name.clone(),
        tenant_id: caller.tenant_for_new(request.tenant_id.as_deref(), "$.tenant_id")?,
        scope_env: request.scope_env.clone(),
        rules: request.rules.clone(),
        created_at: chrono::Utc::now(),
        version: 1,
    };
    if policy.rules.is_empty() {
        return Err(Problem::invalid_field("$.rules", "a policy needs at least one rule"));
    }
    for (i, rule) in policy.rules.iter().enumerate() {
        rule.check().map_err(|(path, message)| Problem::invalid_field(format!("$.rules[{i}].{path}"), message))?;
    }
    match propose(&state, &caller, &request, Op::CreatePolicy(CreatePolicy { policy })).await? {
        CommandReply::Policy(policy) => Ok((StatusCode::CREATED, Json(policy)).into_response()),
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// A cluster-wide policy (no tenant) applies to every tenant's runtimes, so every reader sees
/// it; a tenant's policy is seen in that tenant only.
fn visible(caller: &Caller, policy: &Policy) -> bool {
    policy.tenant_id.is_none() || caller.sees(policy.tenant_id.as_deref())
}

async fn read_policy(state: &AppState, caller: &Caller, id: &str, consistency: Consistency) -> Result<Policy, Problem> {
    consistency.prepare(&state.replica).await?;
    match state.replica.state().get_policy(id)? {
        Some(policy) if visible(caller, &policy) => Ok(policy),
        _ => Err(Problem::not_found(format!("policy {id} not found"))),
    }
}

#[utoipa::path(get, path = "/v1/policies/{policy_id}", tag = "Policies",
    params(("policy_id" = String, Path), ConsistencyParam, TenantId),
    responses((status = 200, description = "OK", body = Policy), ProblemResponses))]
pub(crate) async fn get_policy(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(policy_id): PathParam<String>,
    QueryParams(params): QueryParams<crate::runtimes::ReadParams>,
) -> Result<Json<Policy>, Problem> {
    Ok(Json(read_policy(&state, &caller, &policy_id, params.consistency).await?))
}

#[utoipa::path(get, path = "/v1/policies", tag = "Policies", params(PolicyListParams, TenantId),
    responses((status = 200, description = "OK", body = PolicyList), ProblemResponses))]
pub(crate) async fn list_policies(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<PolicyListParams>,
) -> Result<Json<PolicyList>, Problem> {
    params.consistency.prepare(&state.replica).await?;
    let items = state
        .replica
        .state()
        .list_policies()?
        .into_iter()
        .filter(|p| visible(&caller, p))
        .filter(|p| params.scope_env.is_none() || p.scope_env == params.scope_env)
        .collect();
    Ok(Json(PolicyList { items }))
}

#[utoipa::path(delete, path = "/v1/policies/{policy_id}", tag = "Policies",
    params(("policy_id" = String, Path), IdempotencyKey, TenantId),
    responses((status = 204, description = "Deleted"), ProblemResponses))]
pub(crate) async fn delete_policy(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(policy_id): PathParam<String>,
) -> Result<StatusCode, Problem> {
    let policy = match read_policy(&state, &caller, &policy_id, Consistency::Linearizable).await {
        Ok(policy) => policy,
        // A retried delete whose first attempt is done finds no policy: it gets that answer.
        Err(gone) => match crate::mutation::replayed_when_gone(&state, &caller, &(), gone)? {
            CommandReply::Deleted { .. } => return Ok(StatusCode::NO_CONTENT),
            other => return Err(Problem::unexpected_reply(other)),
        },
    };
    // A tenant's policy admin reads the cluster-wide policies but removes only its tenants'.
    if !caller.principal.may_see(policy.tenant_id.as_deref()) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may not remove a cluster-wide policy", caller.actor()),
        ));
    }
    let op = Op::DeletePolicy(DeletePolicy { id: policy_id.clone() });
    propose(&state, &caller, &(), op).await?;
    Ok(StatusCode::NO_CONTENT)
}
