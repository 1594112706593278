//! The Runtime resource and its lifecycle: create, list, read, label, delete, and the VM-style
//! calls (start, stop, restart, scale, snapshot, restore) that each become an operation.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use runtimeai_engine::placement;
use runtimeai_model::{
    capability, ActionKind, Actor, BackendInfo, BackendKind, BackendRef, ClusterSettings, Event, LifecycleAction,
    Operation, Placement, PolicyMode, ResourceProfile, Runtime, RuntimeSnapshot, RuntimeSpec, RuntimeState,
    RuntimeType, SizeEntry, Timestamp,
};
use runtimeai_raft::command::{BeginOperation, CreateRuntime, PatchLabels};
use runtimeai_raft::{CommandReply, Op, RuntimeField};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::doc_types::{ConsistencyParam, IdempotencyKey, IfMatch, ProblemResponses, TenantId};
use crate::extract::{if_match, Body, Consistency, OptionalBody, PathParam, QueryParams};
use crate::mutation::{new_id, propose};
use crate::problem::Problem;
use crate::views::OperationView;
use crate::{validate, AppState};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_runtimes, create_runtime))
        .routes(routes!(get_runtime, patch_runtime, delete_runtime))
        .routes(routes!(runtime_status))
        .routes(routes!(runtime_operations))
        .routes(routes!(runtime_snapshots))
        .routes(routes!(runtime_events))
        .routes(routes!(runtime_kubeconfig))
        .routes(routes!(start_runtime))
        .routes(routes!(stop_runtime))
        .routes(routes!(restart_runtime))
        .routes(routes!(pause_runtime))
        .routes(routes!(resume_runtime))
        .routes(routes!(scale_runtime))
        .routes(routes!(snapshot_runtime))
        .routes(routes!(restore_runtime))
}

/// The seed's backend kinds, by driver.
fn backend_kind(driver: &str) -> BackendKind {
    match driver {
        "libvirt" => BackendKind::VmBackend,
        "kubernetes" => BackendKind::VclusterBackend,
        _ => BackendKind::Custom,
    }
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimeCreateRequest {
    /// A DNS label, unique per tenant.
    #[schema(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(rename = "type")]
    pub runtime_type: RuntimeType,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub spec: RuntimeSpec,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReadParams {
    #[serde(default)]
    pub consistency: Consistency,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default, rename = "type")]
    pub runtime_type: Option<RuntimeType>,
    #[serde(default)]
    pub state: Option<RuntimeState>,
    #[serde(default)]
    #[param(minimum = 1, maximum = 200)]
    pub page_size: Option<usize>,
    #[serde(default)]
    pub page_token: Option<String>,
    /// Kubernetes equality selector: `env=prod,tier!=gold,team,!legacy`.
    #[serde(default)]
    #[param(
        pattern = r"^[\t ]*(![^,]*|[^,]*=[^,]*|[A-Za-z0-9._/-]*)[\t ]*(,[\t ]*(![^,]*|[^,]*=[^,]*|[A-Za-z0-9._/-]*)[\t ]*)*$"
    )]
    pub label_selector: Option<String>,
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(linearizable|stale)$")]
    pub consistency: Consistency,
}

/// A page of a list that has no filters: its size and where it starts.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    #[serde(default)]
    #[param(minimum = 1, maximum = 200)]
    pub page_size: Option<usize>,
    /// The `next_page_token` of the page before.
    #[serde(default)]
    pub page_token: Option<String>,
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(linearizable|stale)$")]
    pub consistency: Consistency,
}

/// A page's size from `page_size`: 50 unless given, and 1 to 200.
fn page_size(asked: Option<usize>) -> Result<usize, Problem> {
    let size = asked.unwrap_or(50);
    if !(1..=200).contains(&size) {
        return Err(Problem::invalid_field("page_size", "must be between 1 and 200"));
    }
    Ok(size)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuntimeList {
    #[serde(serialize_with = "runtimes_as_json")]
    pub items: Vec<Runtime>,
    pub next_page_token: Option<String>,
}

/// A runtime as its JSON answers show it: a field without a value is left out, not `null`.
/// The user's draft (the seed) types `backend` and the spec's profiles as objects that are never
/// null, so a client generated from it fails on `null`; an absent field is valid for the seed's
/// schema and for ours (none of them is required).
struct RuntimeJson<'a>(&'a Runtime);

impl Serialize for RuntimeJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut value = serde_json::to_value(self.0).map_err(serde::ser::Error::custom)?;
        drop_nulls(&mut value);
        value.serialize(serializer)
    }
}

fn drop_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            fields.retain(|_, field| !field.is_null());
            fields.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

fn runtimes_as_json<S: serde::Serializer>(runtimes: &[Runtime], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(runtimes.iter().map(RuntimeJson))
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

fn runtime_response(status: StatusCode, runtime: &Runtime) -> Response {
    let mut response = (status, Json(RuntimeJson(runtime))).into_response();
    response.headers_mut().insert(header::ETAG, etag(runtime.version));
    if status == StatusCode::CREATED {
        if let Ok(value) = HeaderValue::from_str(&format!("/v1/runtimes/{}", runtime.id)) {
            response.headers_mut().insert(header::LOCATION, value);
        }
    }
    response
}

/// 202 with the operation, and where to follow it.
pub(crate) fn operation_response(operation: &Operation) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(OperationView::from(operation))).into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("/v1/operations/{}", operation.id)) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Reads a runtime as the request's consistency and tenant allow; 404 otherwise.
pub(crate) async fn read_runtime(
    state: &AppState,
    caller: &Caller,
    id: &str,
    consistency: Consistency,
) -> Result<Runtime, Problem> {
    consistency.prepare(&state.replica).await?;
    match state.replica.state().get_runtime(id)? {
        Some(runtime) if caller.sees(runtime.tenant_id.as_deref()) => Ok(runtime),
        _ => Err(Problem::not_found(format!("runtime {id} not found"))),
    }
}

/// A new operation, queued (apply decides whether policies park it for approval).
pub(crate) fn new_operation(
    runtime_id: &str,
    action: LifecycleAction,
    prior_state: RuntimeState,
    at: Timestamp,
    requested_by: Actor,
    policy_mode: PolicyMode,
) -> Operation {
    Operation::queued(new_id("op"), runtime_id, action, prior_state, at, requested_by, policy_mode)
}

/// The cluster's size catalogue, as replicated.
pub(crate) fn sizes(state: &AppState) -> SizeCatalogue {
    SizeCatalogue(state.replica.state().settings())
}

/// Runs `check` against the cluster settings (the size catalogue, the limits). A refusal is
/// confirmed against the settings as the cluster has them now (after a read barrier): this
/// node's replica may not yet have applied a settings change acknowledged through another node,
/// and a client behind a load balancer must not have a size refused that the cluster has.
pub(crate) async fn check_settings<T>(
    state: &AppState,
    check: impl Fn(&ClusterSettings) -> Result<T, Problem>,
) -> Result<T, Problem> {
    if let Ok(checked) = check(&state.replica.state().settings()) {
        return Ok(checked);
    }
    state.replica.read_barrier().await?;
    check(&state.replica.state().settings())
}

/// The size catalogue inside the settings in force (shared, not copied per request).
pub(crate) struct SizeCatalogue(std::sync::Arc<runtimeai_model::ClusterSettings>);

impl std::ops::Deref for SizeCatalogue {
    type Target = [SizeEntry];

    fn deref(&self) -> &[SizeEntry] {
        &self.0.sizes
    }
}

/// Where a new runtime goes (`runtimeai_engine::placement`), or why nowhere: 503 while members
/// have not announced what they serve (one of them may), else 422 listing what the cluster has.
fn place(
    state: &AppState,
    runtime_type: RuntimeType,
    labels: &BTreeMap<String, String>,
) -> Result<(Placement, BackendInfo), Problem> {
    let site = labels.get("site").map(String::as_str);
    let nodes = state.replica.state().nodes();
    let counts = state.replica.state().placement_counts();
    if let Some((placement, backend)) = placement::place(&nodes, &counts, runtime_type, site) {
        return Ok((placement, backend.clone()));
    }
    let where_ = site.map(|s| format!(" in site {s:?}")).unwrap_or_default();
    if state.replica.member_count() > nodes.len() {
        // A member that has not announced itself yet may serve it: ask to retry.
        return Err(Problem::unavailable(format!(
            "no announced node executes {} runtimes{where_} yet; some members have not announced themselves",
            runtime_type.as_str()
        )));
    }
    let offered = placement::offered(&nodes);
    let available = if offered.is_empty() { "nothing".to_string() } else { offered.join(", ") };
    Err(validate::invalid(
        "$.type",
        format!("no node of the cluster executes {} runtimes{where_}; available: {available}", runtime_type.as_str()),
    ))
}

/// Create a runtime. It starts in `creating`; its create operation is `active_operation`.
#[utoipa::path(post, path = "/v1/runtimes", tag = "Runtimes",
    params(IdempotencyKey, TenantId), request_body = RuntimeCreateRequest,
    responses((status = 201, description = "Created", body = Runtime), ProblemResponses))]
pub(crate) async fn create_runtime(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<RuntimeCreateRequest>,
) -> Result<Response, Problem> {
    validate::name(&request.name, "$.name")?;
    validate::image(request.spec.image.as_deref(), request.runtime_type, "$.spec.image")?;
    validate::lifetimes(&request.spec, request.runtime_type, "$.spec")?;
    validate::cloud_init(&request.spec, request.runtime_type, "$.spec")?;
    check_settings(&state, |settings| validate::spec(&request.spec, "$.spec", &settings.sizes)).await?;
    let labels = request.labels.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect();
    validate::labels(&labels, "$.labels")?;
    let tenant_id = caller.tenant_for_new(request.tenant_id.as_deref(), "$.tenant_id")?;
    let now = chrono::Utc::now();
    let id = new_id("rt");
    let actor = caller.actor();
    let mode = caller.policy_mode(None)?;
    let operation = new_operation(&id, LifecycleAction::Create, RuntimeState::Creating, now, actor, mode);
    let (placement, backend) = place(&state, request.runtime_type, &request.labels)?;
    let runtime = Runtime {
        tenant_id,
        labels: request.labels.clone(),
        capabilities: backend.capabilities.iter().map(|c| capability(c)).collect(),
        backend: Some(BackendRef {
            kind: backend_kind(&backend.driver),
            reference: format!("{}/{id}", backend.driver),
        }),
        spec: request.spec.clone(),
        active_operation: Some(operation.id.clone()),
        placement: Some(placement),
        expires_at: request.spec.ttl_seconds.map(|ttl| now + chrono::Duration::seconds(ttl as i64)),
        last_activity_at: Some(now),
        ..Runtime::new(id.clone(), request.name.clone(), request.runtime_type, now)
    };
    // Refused here, before it costs the log anything; apply checks again (and the quota).
    check_settings(&state, |settings| settings.limits.check_runtime(&runtime).map_err(Problem::from)).await?;
    match propose(&state, &caller, &request, Op::CreateRuntime(CreateRuntime { runtime: Arc::new(runtime), operation }))
        .await?
    {
        CommandReply::Created { runtime, .. } => Ok(runtime_response(StatusCode::CREATED, &runtime)),
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// Get a runtime (with its `ETag`).
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}", tag = "Runtimes",
    params(("runtime_id" = String, Path), ConsistencyParam, TenantId),
    responses((status = 200, description = "OK", body = Runtime), ProblemResponses))]
pub(crate) async fn get_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Response, Problem> {
    let runtime = read_runtime(&state, &caller, &runtime_id, params.consistency).await?;
    Ok(runtime_response(StatusCode::OK, &runtime))
}

/// One term of a label selector.
enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

fn parse_selector(text: &str) -> Result<Vec<LabelTerm>, Problem> {
    let bad = || {
        Problem::invalid_field(
            "label_selector",
            format!("cannot parse {text:?}; expected e.g. env=prod,tier!=gold,team,!legacy"),
        )
    };
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                Ok(LabelTerm::NotEquals(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Ok(LabelTerm::Equals(k.trim().into(), v.trim().into()))
            } else if let Some(k) = term.strip_prefix('!') {
                Ok(LabelTerm::Absent(k.trim().into()))
            } else if term.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
                Ok(LabelTerm::Exists(term.into()))
            } else {
                Err(bad())
            }
        })
        .collect()
}

fn selects(terms: &[LabelTerm], labels: &BTreeMap<String, String>) -> bool {
    terms.iter().all(|term| match term {
        LabelTerm::Equals(k, v) => labels.get(k) == Some(v),
        LabelTerm::NotEquals(k, v) => labels.get(k) != Some(v),
        LabelTerm::Exists(k) => labels.contains_key(k),
        LabelTerm::Absent(k) => !labels.contains_key(k),
    })
}

/// Runtimes a list page reads at most (after the indexes narrowed it): a page whose filters pass
/// over more ends there, with fewer items (even none) and a `next_page_token`, as a Kubernetes
/// list with a selector may. Every list call costs at most this much, whatever it asks.
pub const LIST_SCAN_BUDGET: usize = 2000;

/// List runtimes, oldest first, a page at a time. A page may hold fewer than `page_size` items,
/// even none, when its filters pass over many runtimes: the list has ended only when
/// `next_page_token` is absent.
#[utoipa::path(get, path = "/v1/runtimes", tag = "Runtimes", params(ListParams, TenantId),
    responses((status = 200, description = "OK", body = RuntimeList), ProblemResponses))]
pub(crate) async fn list_runtimes(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<RuntimeList>, Problem> {
    let page_size = page_size(params.page_size)?;
    let selector = parse_selector(params.label_selector.as_deref().unwrap_or(""))?;
    params.consistency.prepare(&state.replica).await?;
    let after = params.page_token.unwrap_or_default();
    // The indexes narrow the read to the runtimes of one tenant, type or state; what is read is
    // still checked against the caller and the selector.
    let mut fields = Vec::new();
    fields.extend(caller.only_tenant().map(RuntimeField::Tenant));
    fields.extend(params.runtime_type.map(RuntimeField::Type));
    fields.extend(params.state.map(RuntimeField::State));
    let keep = |runtime: &Runtime| caller.sees(runtime.tenant_id.as_deref()) && selects(&selector, &runtime.labels);
    let page = runtimeai_raft::state_reader::PageRequest { after: &after, size: page_size, budget: LIST_SCAN_BUDGET };
    let (items, next_page_token) = state.replica.state().runtimes_page(&fields, page, keep)?;
    Ok(Json(RuntimeList { items, next_page_token }))
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimePatch {
    /// JSON merge patch of the labels: a value sets a label, `null` removes it.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub labels: BTreeMap<String, Option<String>>,
}

/// Change a runtime's labels (JSON merge patch; `null` removes a label). Labels decide which
/// policies apply, so the policies judge the change as the action `relabel`: 200 with the
/// runtime when allowed, 202 with an operation in `pending_approval` when a human must approve
/// it (a relabel that would leave a policy's scope, such as its `env`), 403 when denied.
#[utoipa::path(patch, path = "/v1/runtimes/{runtime_id}", tag = "Runtimes",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId), request_body = RuntimePatch,
    responses((status = 200, description = "OK", body = Runtime),
        (status = 202, description = "Waits for approval", body = OperationView), ProblemResponses))]
pub(crate) async fn patch_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    Body(patch): Body<RuntimePatch>,
) -> Result<Response, Problem> {
    validate::labels(&patch.labels, "$.labels")?;
    let runtime = read_runtime(&state, &caller, &runtime_id, Consistency::Linearizable).await?;
    let action = LifecycleAction::Relabel { labels: patch.labels.clone() };
    let mode = caller.policy_mode(None)?;
    let operation = new_operation(&runtime_id, action, runtime.state, chrono::Utc::now(), caller.actor(), mode);
    let op = Op::PatchLabels(PatchLabels { operation, expected_version: if_match(&caller.headers)? });
    match propose(&state, &caller, &patch, op).await? {
        CommandReply::Runtime(runtime) => Ok(runtime_response(StatusCode::OK, &runtime)),
        CommandReply::Operation(operation) => Ok(operation_response(&operation)),
        other => Err(Problem::unexpected_reply(other)),
    }
}

/// Delete a runtime (asynchronous: `deleting`, then gone).
#[utoipa::path(delete, path = "/v1/runtimes/{runtime_id}", tag = "Runtimes",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    responses((status = 202, description = "Accepted (async delete)", body = OperationView), ProblemResponses))]
pub(crate) async fn delete_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
) -> Result<Response, Problem> {
    begin(&state, &caller, &runtime_id, LifecycleAction::Delete, &()).await
}

/// Queues `action` on a runtime: 202 with the operation, or why not.
pub(crate) async fn begin(
    state: &AppState,
    caller: &Caller,
    runtime_id: &str,
    action: LifecycleAction,
    body: &impl Serialize,
) -> Result<Response, Problem> {
    begin_in_mode(state, caller, runtime_id, action, body, None).await
}

/// [`begin`] in a given policy mode (none: the actor's default).
pub(crate) async fn begin_in_mode(
    state: &AppState,
    caller: &Caller,
    runtime_id: &str,
    action: LifecycleAction,
    body: &impl Serialize,
    mode: Option<PolicyMode>,
) -> Result<Response, Problem> {
    let runtime = match read_runtime(state, caller, runtime_id, Consistency::Linearizable).await {
        Ok(runtime) => runtime,
        // A retried delete whose first attempt is done finds no runtime: it gets that answer.
        Err(gone) => match crate::mutation::replayed_when_gone(state, caller, body, gone)? {
            CommandReply::Operation(operation) => return Ok(operation_response(&operation)),
            other => return Err(Problem::unexpected_reply(other)),
        },
    };
    for (i, step) in action.steps().iter().enumerate() {
        let kind = step.kind();
        if kind != ActionKind::Delete && !kind.record_only() && !runtime.capabilities.iter().any(|c| c == kind.as_str())
        {
            let path = if matches!(action, LifecycleAction::Sequence { .. }) {
                format!("$.actions[{i}].type")
            } else {
                "$".into()
            };
            return Err(Problem::unsupported_action(
                path,
                format!("this runtime's backend cannot {kind} (capabilities: {})", runtime.capabilities.join(", ")),
            ));
        }
    }
    let actor = caller.actor();
    let mode = caller.policy_mode(mode)?;
    let operation = new_operation(runtime_id, action, runtime.state, chrono::Utc::now(), actor, mode);
    let op = Op::BeginOperation(BeginOperation { operation, expected_version: if_match(&caller.headers)? });
    match propose(state, caller, body, op).await? {
        CommandReply::Operation(operation) => Ok(operation_response(&operation)),
        other => Err(Problem::unexpected_reply(other)),
    }
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleStartRequest {
    /// Why (recorded with the operation's event).
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleStopRequest {
    /// Power off without waiting for a clean shutdown.
    #[serde(default)]
    pub force: bool,
    /// How long a clean shutdown may take.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleScaleRequest {
    /// A size from the cluster's catalogue (`GET /v1/cluster/settings`; by default small,
    /// medium, large, xlarge).
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9-]{1,63}$")]
    pub size: Option<String>,
    /// Explicit resources.
    #[serde(default)]
    pub resources: Option<ResourceProfile>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSnapshotRequest {
    #[serde(default)]
    #[schema(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

impl LifecycleScaleRequest {
    /// The scale action this request asks for; `path` locates the request in the body.
    pub(crate) fn to_action(&self, path: &str, sizes: &[SizeEntry]) -> Result<LifecycleAction, Problem> {
        if self.size.is_none() && self.resources.is_none() {
            return Err(Problem::invalid_field(path, "scale needs a size or resources"));
        }
        if let Some(size) = &self.size {
            validate::size(size, &format!("{path}.size"), sizes)?;
        }
        if let Some(resources) = &self.resources {
            validate::resources(resources, &format!("{path}.resources"))?;
        }
        Ok(LifecycleAction::Scale { size: self.size.clone(), resources: self.resources.clone() })
    }
}

impl LifecycleSnapshotRequest {
    /// The snapshot action this request asks for, with a fresh snapshot id.
    pub(crate) fn to_action(&self, path: &str) -> Result<LifecycleAction, Problem> {
        let name = match &self.name {
            Some(name) => {
                validate::name(name, &format!("{path}.name"))?;
                name.clone()
            }
            None => format!("snapshot-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S")),
        };
        Ok(LifecycleAction::Snapshot { snapshot_id: new_id("snap"), name, description: self.description.clone() })
    }
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleRestoreRequest {
    /// The snapshot to go back to (from `GET /v1/runtimes/{id}/snapshots`).
    pub snapshot_id: String,
}

/// Start a stopped runtime.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/start", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    request_body(content = Option<LifecycleStartRequest>),
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn start_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    OptionalBody(request): OptionalBody<LifecycleStartRequest>,
) -> Result<Response, Problem> {
    begin(&state, &caller, &runtime_id, LifecycleAction::Start, &request).await
}

/// Stop a running runtime (cleanly, or forced).
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/stop", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    request_body(content = Option<LifecycleStopRequest>),
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn stop_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    OptionalBody(request): OptionalBody<LifecycleStopRequest>,
) -> Result<Response, Problem> {
    let action = LifecycleAction::Stop { force: request.force, timeout_seconds: request.timeout_seconds };
    begin(&state, &caller, &runtime_id, action, &request).await
}

/// Restart a running runtime.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/restart", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn restart_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
) -> Result<Response, Problem> {
    begin(&state, &caller, &runtime_id, LifecycleAction::Restart, &()).await
}

/// Pause a running runtime: its processes frozen with their memory kept (a sandbox's cgroup
/// freezer, a VM suspended), using no CPU until resumed.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/pause", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn pause_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
) -> Result<Response, Problem> {
    begin(&state, &caller, &runtime_id, LifecycleAction::Pause, &()).await
}

/// Resume a paused runtime where it was.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/resume", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn resume_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
) -> Result<Response, Problem> {
    begin(&state, &caller, &runtime_id, LifecycleAction::Resume, &()).await
}

/// Scale a runtime to a size or explicit resources.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/scale", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    request_body = LifecycleScaleRequest,
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn scale_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    Body(request): Body<LifecycleScaleRequest>,
) -> Result<Response, Problem> {
    let action = check_settings(&state, |settings| request.to_action("$", &settings.sizes)).await?;
    begin(&state, &caller, &runtime_id, action, &request).await
}

/// Take a snapshot (VM snapshot / vCluster backup).
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/snapshot", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    request_body(content = Option<LifecycleSnapshotRequest>),
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn snapshot_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    OptionalBody(request): OptionalBody<LifecycleSnapshotRequest>,
) -> Result<Response, Problem> {
    let action = request.to_action("$")?;
    begin(&state, &caller, &runtime_id, action, &request).await
}

/// Restore a runtime from one of its snapshots.
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/restore", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    request_body = LifecycleRestoreRequest,
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn restore_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    Body(request): Body<LifecycleRestoreRequest>,
) -> Result<Response, Problem> {
    let runtime = read_runtime(&state, &caller, &runtime_id, Consistency::Linearizable).await?;
    if !runtime.has_snapshot(&request.snapshot_id) {
        return Err(Problem::not_found(format!("runtime {runtime_id} has no snapshot {}", request.snapshot_id)));
    }
    let action = LifecycleAction::Restore { snapshot_id: request.snapshot_id.clone() };
    begin(&state, &caller, &runtime_id, action, &request).await
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RuntimeStatus {
    pub runtime_id: String,
    pub state: RuntimeState,
    /// `ok`, `warning`, `critical` or `unknown` (from the state, and the executor's health signal).
    pub health: &'static str,
    /// What the runtime's executor last observed, by name, each with its unit and time (the
    /// seed's shape): `cpu` (`vCPU` measured in use, or `vCPU allocated` where the backend
    /// measures nothing), `memory` (bytes), `disk` (bytes of a sandbox's writable layer in
    /// use), `health` (`healthy`, `degraded`,
    /// `unhealthy`, `stopped`, `paused`), `cost_per_hour` (in the catalogue's currency per
    /// hour), `latency_ms` (ms, when the backend knows it), `node_id`. Empty until it reports.
    pub signals: BTreeMap<&'static str, Signal>,
    /// The node (and site) whose executor serves the runtime.
    pub placement: Option<Placement>,
    pub active_operation: Option<String>,
    /// When the signals were observed (now, when there are none yet).
    pub observed_at: chrono::DateTime<chrono::Utc>,
}

/// One measured value.
#[derive(Debug, Serialize, ToSchema)]
pub struct Signal {
    /// A number, or text (`health`).
    pub value: serde_json::Value,
    pub unit: Option<&'static str>,
    pub ts: chrono::DateTime<chrono::Utc>,
}

/// A runtime's signals in the seed's shape: name → value, unit, time.
fn signal_map(signals: Option<&runtimeai_model::RuntimeSignals>) -> BTreeMap<&'static str, Signal> {
    let Some(signals) = signals else { return BTreeMap::new() };
    let ts = signals.observed_at;
    let memory = runtimeai_engine::catalogue::quantity_bytes(&signals.memory);
    let entries: [(&'static str, Option<serde_json::Value>, Option<&'static str>); 7] = [
        ("cpu", Some(signals.cpu.into()), Some(if signals.cpu_measured { "vCPU" } else { "vCPU allocated" })),
        ("memory", memory.map(Into::into), Some("bytes")),
        ("disk", signals.disk_bytes.map(Into::into), Some("bytes")),
        ("health", Some(signals.health.clone().into()), None),
        ("cost_per_hour", Some(signals.cost_per_hour.into()), Some("per hour")),
        ("latency_ms", signals.latency_ms.map(Into::into), Some("ms")),
        ("node_id", Some(signals.node_id.into()), None),
    ];
    entries.into_iter().filter_map(|(name, value, unit)| Some((name, Signal { value: value?, unit, ts }))).collect()
}

/// A runtime's state, health and signals.
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/status", tag = "Runtimes",
    params(("runtime_id" = String, Path), ConsistencyParam, TenantId),
    responses((status = 200, description = "OK", body = RuntimeStatus), ProblemResponses))]
pub(crate) async fn runtime_status(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<RuntimeStatus>, Problem> {
    let runtime = read_runtime(&state, &caller, &runtime_id, params.consistency).await?;
    let reported = runtime.signals.as_ref().map(|s| s.health.as_str());
    let health = match (runtime.state, reported) {
        (RuntimeState::Error, _) | (_, Some("unhealthy")) => "critical",
        (RuntimeState::Degraded, _) | (_, Some("degraded")) => "warning",
        (RuntimeState::Running, _) => "ok",
        _ => "unknown",
    };
    let observed_at = runtime.signals.as_ref().map_or_else(chrono::Utc::now, |s| s.observed_at);
    let signals = signal_map(runtime.signals.as_ref());
    Ok(Json(RuntimeStatus {
        runtime_id: runtime.id,
        state: runtime.state,
        health,
        signals,
        placement: runtime.placement,
        active_operation: runtime.active_operation,
        observed_at,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OperationList {
    pub items: Vec<OperationView>,
    /// Where the next page starts, when there is one.
    pub next_page_token: Option<String>,
}

/// A runtime's operations, oldest first, a page at a time.
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/operations", tag = "Operations",
    params(("runtime_id" = String, Path), PageParams, TenantId),
    responses((status = 200, description = "OK", body = OperationList), ProblemResponses))]
pub(crate) async fn runtime_operations(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<OperationList>, Problem> {
    let page_size = page_size(params.page_size)?;
    read_runtime(&state, &caller, &runtime_id, params.consistency).await?;
    let after = params.page_token.unwrap_or_default();
    let mut operations = state.replica.state().runtime_operations_after(&runtime_id, &after, page_size + 1)?;
    let next_page_token = if operations.len() > page_size {
        operations.truncate(page_size);
        operations.last().map(|o| o.id.clone())
    } else {
        None
    };
    Ok(Json(OperationList { items: operations.iter().map(OperationView::from).collect(), next_page_token }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotList {
    pub items: Vec<RuntimeSnapshot>,
}

/// A runtime's snapshots, oldest first.
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/snapshots", tag = "Lifecycle",
    params(("runtime_id" = String, Path), ConsistencyParam, TenantId),
    responses((status = 200, description = "OK", body = SnapshotList), ProblemResponses))]
pub(crate) async fn runtime_snapshots(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<SnapshotList>, Problem> {
    let runtime = read_runtime(&state, &caller, &runtime_id, params.consistency).await?;
    Ok(Json(SnapshotList { items: runtime.snapshots }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    /// Only events after the event with this id (the `id` of the last one you have): the next
    /// page, read from there.
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^ev_[0-9a-f]{16}_[0-9]{1,9}$")]
    pub after: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// At most this many, oldest first (1 to 1000, default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    #[serde(default)]
    #[param(value_type = Option<String>, pattern = "^(linearizable|stale)$")]
    pub consistency: Consistency,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub id: String,
    pub runtime_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub severity: runtimeai_model::EventSeverity,
    pub ts: chrono::DateTime<chrono::Utc>,
    /// `human`, `agent`, `service` or `system`.
    pub actor: &'static str,
    /// The actor's name (`alice`, `planner`), absent for the system.
    pub actor_name: Option<String>,
    #[schema(value_type = Object)]
    pub data: serde_json::Map<String, serde_json::Value>,
    /// Position in the runtime's event stream (the raft log index that wrote it).
    pub seq: u64,
}

impl From<Event> for EventView {
    fn from(event: Event) -> Self {
        let actor_name = event.actor.name().map(str::to_string);
        EventView {
            id: event.id,
            runtime_id: event.runtime_id,
            event_type: event.event_type,
            severity: event.severity,
            ts: event.ts,
            actor: event.actor.kind(),
            actor_name,
            data: event.data.0,
            seq: event.seq,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub items: Vec<EventView>,
}

/// The runtime's audit trail. Events of a deleted runtime stay readable.
/// A runtime's events (audit trail and feedback), in order.
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/events", tag = "Events",
    params(("runtime_id" = String, Path), EventParams, TenantId),
    responses((status = 200, description = "OK", body = EventList), ProblemResponses))]
pub(crate) async fn runtime_events(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<EventParams>,
) -> Result<Json<EventList>, Problem> {
    params.consistency.prepare(&state.replica).await?;
    // The audit feed is stored as events too, but is not a runtime's (`GET /v1/audit`).
    if runtime_id == runtimeai_raft::AUDIT_STREAM {
        return Err(Problem::not_found(format!("runtime {runtime_id} not found")));
    }
    let store = &state.replica.state();
    // A deleted runtime's tenant is gone with it: its events are for principals of every tenant.
    let visible = match store.get_runtime(&runtime_id)? {
        Some(runtime) => caller.sees(runtime.tenant_id.as_deref()),
        None => caller.sees(None) && store.runtime_events_after(&runtime_id, None).next().is_some(),
    };
    if !visible {
        return Err(Problem::not_found(format!("runtime {runtime_id} not found")));
    }
    Ok(Json(EventList { items: params.page(&state, &runtime_id)? }))
}

impl EventParams {
    /// The page of `stream`'s events these parameters ask for, read from the cursor on: the
    /// events it shows and those `since` passes over, not the whole feed.
    pub(crate) fn page(&self, state: &AppState, stream: &str) -> Result<Vec<EventView>, Problem> {
        let limit = crate::events::page_limit(self.limit)?;
        let after = crate::events::event_cursor(self.after.as_deref())?;
        let events = state.replica.state().runtime_events_after(stream, after);
        let mut items = Vec::new();
        for event in events {
            let event = event?;
            if self.since.is_none_or(|since| event.ts >= since) {
                items.push(EventView::from(event));
            }
            if items.len() == limit {
                break;
            }
        }
        Ok(items)
    }
}

/// A vcluster's kubeconfig, as its control plane published it (`application/yaml`).
#[utoipa::path(get, path = "/v1/runtimes/{runtime_id}/kubeconfig", tag = "Runtimes",
    params(("runtime_id" = String, Path), TenantId),
    responses((status = 200, description = "The virtual cluster's kubeconfig", content_type = "application/yaml", body = String),
        ProblemResponses))]
pub(crate) async fn runtime_kubeconfig(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
) -> Result<Response, Problem> {
    let runtime = read_runtime(&state, &caller, &runtime_id, Consistency::Linearizable).await?;
    if runtime.runtime_type != RuntimeType::Vcluster {
        return Err(Problem::not_found(format!(
            "runtime {runtime_id} is a {}, not a vcluster: it has no kubeconfig",
            runtime.runtime_type.as_str()
        )));
    }
    let Some(source) = &state.kubeconfigs else {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "no-kubernetes-backend",
            "this node has no Kubernetes backend (--backends vcluster=kubernetes:<kubeconfig>); its vclusters have no kubeconfig to give",
        ));
    };
    match source.kubeconfig(&runtime).await {
        Ok(Some(kubeconfig)) => Ok(([(header::CONTENT_TYPE, "application/yaml")], kubeconfig).into_response()),
        Ok(None) => {
            Err(Problem::unavailable(format!("vcluster {} has not published its kubeconfig yet", runtime.name)))
        }
        Err(e) => Err(Problem::new(StatusCode::BAD_GATEWAY, "kubernetes-error", e)),
    }
}
