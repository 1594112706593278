//! The Runtime resource and its lifecycle: create, list, read, label, delete, and the VM-style
//! calls (start, stop, restart, scale, snapshot, restore) that each become an operation.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use runtimeai_model::{
    BackendKind, BackendRef, Event, LifecycleAction, Operation, OperationStatus, ResourceProfile, Runtime,
    RuntimeSnapshot, RuntimeSpec, RuntimeState, RuntimeType, Timestamp,
};
use runtimeai_raft::{CommandReply, Op};

use crate::extract::{if_match, tenant, Body, Consistency, OptionalBody, PathParam, QueryParams};
use crate::mutation::{new_id, propose};
use crate::problem::Problem;
use crate::views::OperationView;
use crate::{validate, AppState};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/runtimes", get(list_runtimes).post(create_runtime))
        .route("/v1/runtimes/{runtime_id}", get(get_runtime).patch(patch_runtime).delete(delete_runtime))
        .route("/v1/runtimes/{runtime_id}/status", get(runtime_status))
        .route("/v1/runtimes/{runtime_id}/operations", get(runtime_operations))
        .route("/v1/runtimes/{runtime_id}/snapshots", get(runtime_snapshots))
        .route("/v1/runtimes/{runtime_id}/events", get(runtime_events))
        .route("/v1/runtimes/{runtime_id}/lifecycle/{action}", post(lifecycle))
}

/// Everything a runtime of any type can do today (the in-process simulated backend).
const CAPABILITIES: &[&str] = &["start", "stop", "restart", "scale", "snapshot", "restore", "delete"];

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeCreateRequest {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default, rename = "type")]
    pub runtime_type: Option<RuntimeType>,
    #[serde(default)]
    pub state: Option<RuntimeState>,
    #[serde(default)]
    pub page_size: Option<usize>,
    #[serde(default)]
    pub page_token: Option<String>,
    /// Kubernetes equality selector: `env=prod,tier!=gold,team,!legacy`.
    #[serde(default)]
    pub label_selector: Option<String>,
    #[serde(default)]
    pub consistency: Consistency,
}

#[derive(Debug, Serialize)]
pub struct RuntimeList {
    pub items: Vec<Runtime>,
    pub next_page_token: Option<String>,
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

fn runtime_response(status: StatusCode, runtime: &Runtime) -> Response {
    let mut response = (status, Json(runtime)).into_response();
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

fn unexpected(reply: CommandReply) -> Problem {
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("unexpected reply {reply:?}"))
}

/// Reads a runtime as the request's consistency and tenant allow; 404 otherwise.
pub(crate) async fn read_runtime(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    consistency: Consistency,
) -> Result<Runtime, Problem> {
    let tenant = tenant(headers)?;
    if consistency == Consistency::Linearizable {
        state.replica.read_barrier().await?;
    }
    match state.replica.state.get_runtime(id)? {
        Some(runtime) if tenant.is_none() || runtime.tenant_id == tenant => Ok(runtime),
        _ => Err(Problem::not_found(format!("runtime {id} not found"))),
    }
}

fn new_operation(runtime_id: &str, action: LifecycleAction, prior_state: RuntimeState, at: Timestamp) -> Operation {
    Operation {
        id: new_id("op"),
        runtime_id: runtime_id.to_string(),
        action,
        prior_state,
        status: OperationStatus::Queued,
        created_at: at,
        finished_at: None,
        progress: None,
        error: None,
        version: 1,
    }
}

async fn create_runtime(
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(request): Body<RuntimeCreateRequest>,
) -> Result<Response, Problem> {
    validate::name(&request.name, "$.name")?;
    validate::spec(&request.spec, "$.spec")?;
    let labels = request.labels.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect();
    validate::labels(&labels, "$.labels")?;
    let tenant_id = match (&request.tenant_id, tenant(&headers)?) {
        (Some(body), Some(header)) if *body != header => {
            return Err(Problem::invalid_field("$.tenant_id", "differs from the tenant_id header"))
        }
        (body, header) => body.clone().or(header),
    };
    let now = chrono::Utc::now();
    let id = new_id("rt");
    let operation = new_operation(&id, LifecycleAction::Create, RuntimeState::Creating, now);
    let runtime = Runtime {
        id: id.clone(),
        name: request.name.clone(),
        runtime_type: request.runtime_type,
        state: RuntimeState::Creating,
        tenant_id,
        labels: request.labels.clone(),
        capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
        backend: Some(BackendRef { kind: BackendKind::Custom, reference: format!("simulated/{id}") }),
        spec: request.spec.clone(),
        created_at: now,
        updated_at: None,
        version: 1,
        active_operation: Some(operation.id.clone()),
        snapshots: Vec::new(),
    };
    match propose(&state, &headers, "POST /v1/runtimes", &request, Op::CreateRuntime { runtime, operation }).await? {
        CommandReply::Created { runtime, .. } => Ok(runtime_response(StatusCode::CREATED, &runtime)),
        other => Err(unexpected(other)),
    }
}

async fn get_runtime(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Response, Problem> {
    let runtime = read_runtime(&state, &headers, &runtime_id, params.consistency).await?;
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

async fn list_runtimes(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<RuntimeList>, Problem> {
    let tenant = tenant(&headers)?;
    let page_size = params.page_size.unwrap_or(50);
    if !(1..=200).contains(&page_size) {
        return Err(Problem::invalid_field("page_size", "must be between 1 and 200"));
    }
    let selector = parse_selector(params.label_selector.as_deref().unwrap_or(""))?;
    if params.consistency == Consistency::Linearizable {
        state.replica.read_barrier().await?;
    }
    let after = params.page_token.unwrap_or_default();
    let mut items: Vec<Runtime> = state
        .replica
        .state
        .list_runtimes()?
        .into_iter()
        .filter(|r| r.id > after)
        .filter(|r| tenant.is_none() || r.tenant_id == tenant)
        .filter(|r| params.runtime_type.is_none_or(|t| r.runtime_type == t))
        .filter(|r| params.state.is_none_or(|s| r.state == s))
        .filter(|r| selects(&selector, &r.labels))
        .take(page_size + 1)
        .collect();
    let next_page_token = if items.len() > page_size {
        items.truncate(page_size);
        items.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(RuntimeList { items, next_page_token }))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimePatch {
    /// JSON merge patch of the labels: a value sets a label, `null` removes it.
    #[serde(default)]
    pub labels: BTreeMap<String, Option<String>>,
}

async fn patch_runtime(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
    Body(patch): Body<RuntimePatch>,
) -> Result<Response, Problem> {
    validate::labels(&patch.labels, "$.labels")?;
    read_runtime(&state, &headers, &runtime_id, Consistency::Stale).await?;
    let op = Op::PatchLabels {
        runtime_id: runtime_id.clone(),
        labels: patch.labels.clone(),
        expected_version: if_match(&headers)?,
    };
    match propose(&state, &headers, &format!("PATCH /v1/runtimes/{runtime_id}"), &patch, op).await? {
        CommandReply::Runtime(runtime) => Ok(runtime_response(StatusCode::OK, &runtime)),
        other => Err(unexpected(other)),
    }
}

async fn delete_runtime(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
) -> Result<Response, Problem> {
    begin(&state, &headers, &runtime_id, "delete", LifecycleAction::Delete, &()).await
}

/// Queues `action` on a runtime: 202 with the operation, or why not.
async fn begin(
    state: &AppState,
    headers: &HeaderMap,
    runtime_id: &str,
    route: &str,
    action: LifecycleAction,
    body: &impl Serialize,
) -> Result<Response, Problem> {
    let runtime = read_runtime(state, headers, runtime_id, Consistency::Stale).await?;
    let operation = new_operation(runtime_id, action, runtime.state, chrono::Utc::now());
    let op = Op::BeginOperation { operation, expected_version: if_match(headers)? };
    match propose(state, headers, &format!("POST /v1/runtimes/{runtime_id}/{route}"), body, op).await? {
        CommandReply::Operation(operation) => Ok(operation_response(&operation)),
        other => Err(unexpected(other)),
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleRequest {
    /// start: why (recorded in the event).
    #[serde(default)]
    pub reason: Option<String>,
    /// stop: power off without waiting for a clean shutdown.
    #[serde(default)]
    pub force: Option<bool>,
    /// stop: how long a clean shutdown may take.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// scale: a size from the catalogue.
    #[serde(default)]
    pub size: Option<String>,
    /// scale: explicit resources.
    #[serde(default)]
    pub resources: Option<ResourceProfile>,
    /// snapshot: its name.
    #[serde(default)]
    pub name: Option<String>,
    /// snapshot: a description.
    #[serde(default)]
    pub description: Option<String>,
    /// restore: the snapshot to go back to.
    #[serde(default)]
    pub snapshot_id: Option<String>,
}

/// `POST /v1/runtimes/{id}/lifecycle/{start|stop|restart|scale|snapshot|restore}`.
async fn lifecycle(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam((runtime_id, action)): PathParam<(String, String)>,
    OptionalBody(request): OptionalBody<LifecycleRequest>,
) -> Result<Response, Problem> {
    let action = match action.as_str() {
        "start" => LifecycleAction::Start,
        "restart" => LifecycleAction::Restart,
        "stop" => {
            LifecycleAction::Stop { force: request.force.unwrap_or(false), timeout_seconds: request.timeout_seconds }
        }
        "scale" => {
            if request.size.is_none() && request.resources.is_none() {
                return Err(Problem::invalid_field("$", "scale needs a size or resources"));
            }
            if let Some(size) = &request.size {
                validate::size(size, "$.size")?;
            }
            if let Some(resources) = &request.resources {
                validate::resources(resources, "$.resources")?;
            }
            LifecycleAction::Scale { size: request.size.clone(), resources: request.resources.clone() }
        }
        "snapshot" => {
            let name = request
                .name
                .clone()
                .unwrap_or_else(|| format!("snapshot-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S")));
            LifecycleAction::Snapshot { snapshot_id: new_id("snap"), name, description: request.description.clone() }
        }
        "restore" => match &request.snapshot_id {
            Some(snapshot_id) => LifecycleAction::Restore { snapshot_id: snapshot_id.clone() },
            None => return Err(Problem::invalid_field("$.snapshot_id", "restore needs the snapshot_id to restore")),
        },
        other => {
            return Err(Problem::not_found(format!(
                "no lifecycle action {other:?}; actions are start, stop, restart, scale, snapshot, restore"
            )))
        }
    };
    if let LifecycleAction::Restore { snapshot_id } = &action {
        let runtime = read_runtime(&state, &headers, &runtime_id, Consistency::Stale).await?;
        if !runtime.snapshots.iter().any(|s| &s.id == snapshot_id) {
            return Err(Problem::not_found(format!("runtime {runtime_id} has no snapshot {snapshot_id}")));
        }
    }
    let route = format!("lifecycle/{}", action.kind());
    begin(&state, &headers, &runtime_id, &route, action, &request).await
}

#[derive(Debug, Serialize)]
pub struct RuntimeStatus {
    pub runtime_id: String,
    pub state: RuntimeState,
    /// `ok`, `warning`, `critical` or `unknown`.
    pub health: &'static str,
    pub signals: BTreeMap<String, serde_json::Value>,
    pub active_operation: Option<String>,
    pub observed_at: Timestamp,
}

async fn runtime_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<RuntimeStatus>, Problem> {
    let runtime = read_runtime(&state, &headers, &runtime_id, params.consistency).await?;
    let health = match runtime.state {
        RuntimeState::Running => "ok",
        RuntimeState::Degraded => "warning",
        RuntimeState::Error => "critical",
        _ => "unknown",
    };
    Ok(Json(RuntimeStatus {
        runtime_id: runtime.id,
        state: runtime.state,
        health,
        // Signals come from a real backend; the simulated one reports none.
        signals: BTreeMap::new(),
        active_operation: runtime.active_operation,
        observed_at: chrono::Utc::now(),
    }))
}

#[derive(Debug, Serialize)]
pub struct OperationList {
    pub items: Vec<OperationView>,
}

async fn runtime_operations(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<OperationList>, Problem> {
    read_runtime(&state, &headers, &runtime_id, params.consistency).await?;
    let items = state.replica.state.runtime_operations(&runtime_id)?.iter().map(OperationView::from).collect();
    Ok(Json(OperationList { items }))
}

#[derive(Debug, Serialize)]
pub struct SnapshotList {
    pub items: Vec<RuntimeSnapshot>,
}

async fn runtime_snapshots(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<ReadParams>,
) -> Result<Json<SnapshotList>, Problem> {
    let runtime = read_runtime(&state, &headers, &runtime_id, params.consistency).await?;
    Ok(Json(SnapshotList { items: runtime.snapshots }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    /// Only events at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<Timestamp>,
    /// At most this many, oldest first (1 to 1000, default 100).
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub consistency: Consistency,
}

#[derive(Debug, Serialize)]
pub struct EventView {
    pub id: String,
    pub runtime_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub severity: runtimeai_model::EventSeverity,
    pub ts: Timestamp,
    /// `human`, `agent` or `system`.
    pub actor: &'static str,
    /// The actor's name (`alice`, `planner`), absent for the system.
    pub actor_name: Option<String>,
    pub data: serde_json::Map<String, serde_json::Value>,
    /// Position in the runtime's event stream (the raft log index that wrote it).
    pub seq: u64,
}

impl From<Event> for EventView {
    fn from(event: Event) -> Self {
        let actor_name = match &event.actor {
            runtimeai_model::Actor::Human(n) | runtimeai_model::Actor::Agent(n) => Some(n.clone()),
            runtimeai_model::Actor::System => None,
        };
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

#[derive(Debug, Serialize)]
pub struct EventList {
    pub items: Vec<EventView>,
}

/// The runtime's audit trail. Events of a deleted runtime stay readable.
async fn runtime_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    PathParam(runtime_id): PathParam<String>,
    QueryParams(params): QueryParams<EventParams>,
) -> Result<Json<EventList>, Problem> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::invalid_field("limit", "must be between 1 and 1000"));
    }
    if params.consistency == Consistency::Linearizable {
        state.replica.read_barrier().await?;
    }
    let tenant = tenant(&headers)?;
    let runtime = state.replica.state.get_runtime(&runtime_id)?;
    let events = state.replica.state.runtime_events(&runtime_id)?;
    let visible = match &runtime {
        Some(runtime) => tenant.is_none() || runtime.tenant_id == tenant,
        None => !events.is_empty() && tenant.is_none(),
    };
    if !visible {
        return Err(Problem::not_found(format!("runtime {runtime_id} not found")));
    }
    let items = events
        .into_iter()
        .filter(|e| params.since.is_none_or(|since| e.ts >= since))
        .take(limit)
        .map(EventView::from)
        .collect();
    Ok(Json(EventList { items }))
}
