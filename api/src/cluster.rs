//! Cluster administration and load-balancer probes.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use runtimeai_model::{ClusterSettings, MembershipChange, SettingsUsage};
use runtimeai_raft::command::{AuditMembership, SetSettings};
use runtimeai_raft::{CommandReply, NodeId, Op};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Caller;
use crate::doc_types::ProblemResponses;
use crate::extract::{Body, PathParam};
use crate::problem::Problem;
use crate::{AppState, VERSION};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(health))
        .routes(routes!(cluster_status))
        .routes(routes!(add_member))
        .routes(routes!(remove_member))
        .routes(routes!(get_settings, put_settings))
}

/// The process is alive and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "Health", security(()), responses((status = 200, description = "alive", body = Object)))]
pub(crate) async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// The seed API's health check.
#[utoipa::path(get, path = "/v1/health", tag = "Health",
    responses((status = 200, description = "OK", body = Object), ProblemResponses))]
pub(crate) async fn health() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok", "version": VERSION }))
}

/// Ready for traffic: a leader is known, this node has applied everything the leader had
/// committed when asked (a read-index round trip, bounded to two seconds), and it has announced
/// itself (addresses, backends) in the replicated state.
#[utoipa::path(get, path = "/readyz", tag = "Health", security(()),
    responses((status = 200, description = "ready", body = Object), ProblemResponses))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, Problem> {
    let metrics = state.replica.metrics();
    let Some(leader) = metrics.current_leader else {
        return Err(Problem::unavailable("no leader is known yet"));
    };
    match tokio::time::timeout(Duration::from_secs(2), state.replica.read_barrier()).await {
        Err(_) => Err(Problem::unavailable("has not caught up with the leader's commit index within 2s")),
        Ok(Err(e)) => Err(Problem::unavailable(format!("not ready: {e}"))),
        Ok(Ok(())) if !state.replica.state().nodes().iter().any(|n| n.node_id == state.replica.id) => {
            Err(Problem::unavailable("has not announced its addresses and backends to the cluster yet"))
        }
        Ok(Ok(())) => Ok(Json(serde_json::json!({ "status": "ready", "leader_id": leader }))),
    }
}

/// One member of the cluster as `GET /v1/cluster` shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberView {
    pub id: NodeId,
    pub grpc: String,
    /// REST address the member announced; absent until it has registered.
    pub http: Option<String>,
    /// `voter` or `learner`.
    pub role: String,
    /// Whether the leader currently reaches the member (`null` when no leader answers).
    pub reachable: Option<bool>,
    /// The backends the member's executor drives (empty until it has registered).
    #[serde(default)]
    pub backends: Vec<runtimeai_model::BackendInfo>,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    pub cluster_name: String,
    pub node_id: NodeId,
    /// This node's raft role: `leader`, `follower`, `candidate` or `learner`.
    pub state: String,
    pub leader_id: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// Log index covered by this node's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Log entries up to this index have been purged behind a snapshot.
    pub purged_index: Option<u64>,
    pub members: Vec<MemberView>,
    /// This node's log writes since it started: one fsync per append, and under load many
    /// entries per append on a follower and many writes per entry on the leader.
    pub storage: StorageView,
    /// Requests this node refused as unauthenticated since it started.
    pub auth_failures: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StorageView {
    pub log_appends: u64,
    pub log_entries: u64,
    pub log_syncs: u64,
}

/// The cluster as this node sees it: leader, term, members and whether the leader reaches each.
#[utoipa::path(get, path = "/v1/cluster", tag = "Cluster",
    responses((status = 200, description = "OK", body = ClusterView), ProblemResponses))]
pub(crate) async fn cluster_status(State(state): State<AppState>) -> Result<Json<ClusterView>, Problem> {
    Ok(Json(cluster_view(&state).await?))
}

async fn cluster_view(state: &AppState) -> Result<ClusterView, Problem> {
    let metrics = state.replica.metrics();
    let announced: HashMap<NodeId, runtimeai_model::NodeInfo> =
        state.replica.state().nodes().iter().map(|info| (info.node_id, info.clone())).collect();
    let members = state
        .replica
        .members()
        .await
        .into_iter()
        .map(|m| {
            let info = announced.get(&m.id);
            MemberView {
                id: m.id,
                http: if m.id == state.replica.id {
                    Some(state.http_addr.to_string())
                } else {
                    info.map(|i| i.http_addr.clone())
                },
                grpc: m.grpc_addr,
                role: if m.voter { "voter" } else { "learner" }.to_string(),
                reachable: m.reachable,
                backends: info.map(|i| i.backends.clone()).unwrap_or_default(),
                site: info.and_then(|i| i.site.clone()),
                zone: info.and_then(|i| i.zone.clone()),
            }
        })
        .collect();
    let role = match metrics.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    };
    Ok(ClusterView {
        cluster_name: state.replica.cluster_name().to_string(),
        node_id: state.replica.id,
        state: role.to_string(),
        leader_id: metrics.current_leader,
        term: metrics.current_term,
        last_log_index: metrics.last_log_index,
        last_applied: metrics.last_applied.map(|id| id.index),
        snapshot_index: metrics.snapshot.map(|id| id.index),
        purged_index: metrics.purged.map(|id| id.index),
        members,
        storage: {
            let (log_appends, log_entries, log_syncs) = state.log_stats.get();
            StorageView { log_appends, log_entries, log_syncs }
        },
        auth_failures: state.auth_failures.total(),
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    pub id: NodeId,
    /// The new node's gRPC address (`host:port`), as given to its `--grpc`.
    pub grpc: String,
}

/// Adds a node: it joins as a learner, catches up, and is promoted to voter. Answers when the
/// node is a voter.
#[utoipa::path(post, path = "/v1/cluster/members", tag = "Cluster", request_body = AddMemberRequest,
    responses((status = 201, description = "Added and promoted to voter", body = ClusterView), ProblemResponses))]
pub(crate) async fn add_member(
    State(state): State<AppState>,
    caller: Caller,
    Body(request): Body<AddMemberRequest>,
) -> Result<impl IntoResponse, Problem> {
    if request.grpc.parse::<std::net::SocketAddr>().is_err() && !request.grpc.contains(':') {
        return Err(Problem::invalid_field("$.grpc", "expected host:port"));
    }
    audit_membership(&state, &caller, MembershipChange::Add, request.id, Some(request.grpc.clone())).await?;
    let replica = state.replica.clone();
    // Run to completion even if the client goes away: a half-done change helps nobody.
    tokio::spawn(async move { replica.add_member(request.id, request.grpc).await })
        .await
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    // The change was committed by the leader; show it as this node sees it once caught up.
    state.replica.read_barrier().await?;
    Ok((StatusCode::CREATED, Json(cluster_view(&state).await?)))
}

/// Removes a voter or learner.
#[utoipa::path(delete, path = "/v1/cluster/members/{node_id}", tag = "Cluster",
    params(("node_id" = u64, Path)),
    responses((status = 200, description = "Removed", body = ClusterView), ProblemResponses))]
pub(crate) async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(node_id): PathParam<NodeId>,
) -> Result<impl IntoResponse, Problem> {
    audit_membership(&state, &caller, MembershipChange::Remove, node_id, None).await?;
    let replica = state.replica.clone();
    tokio::spawn(async move { replica.remove_member(node_id).await })
        .await
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    state.replica.read_barrier().await?;
    Ok(Json(cluster_view(&state).await?))
}

/// Puts the membership change the caller asks for on the audit feed, before it is made.
async fn audit_membership(
    state: &AppState,
    caller: &Caller,
    change: MembershipChange,
    node_id: NodeId,
    grpc_addr: Option<String>,
) -> Result<(), Problem> {
    let op = Op::AuditMembership(AuditMembership { change, node_id, grpc_addr });
    crate::mutation::propose(state, caller, &(change, node_id), op).await.map(|_| ())
}

/// Cluster-wide settings (event retention, the size catalogue, the limits) and the usage
/// against the limits.
#[utoipa::path(get, path = "/v1/cluster/settings", tag = "Cluster",
    responses((status = 200, description = "OK", body = ClusterSettings), ProblemResponses))]
pub(crate) async fn get_settings(State(state): State<AppState>) -> Result<Json<ClusterSettings>, Problem> {
    state.replica.read_barrier().await?;
    Ok(Json(with_usage(&state, ClusterSettings::clone(&state.replica.state().settings()))?))
}

/// `settings` with what the cluster holds against their limits.
fn with_usage(state: &AppState, settings: ClusterSettings) -> Result<ClusterSettings, Problem> {
    let store = &state.replica.state();
    let usage = SettingsUsage {
        runtimes: store.runtime_total()?,
        runtimes_per_tenant: store.runtimes_per_tenant()?,
        policies: store.list_policies()?.len() as u64,
    };
    Ok(ClusterSettings { usage: Some(usage), ..settings })
}

/// Replace the cluster-wide settings; every node applies them from the next change on.
#[utoipa::path(put, path = "/v1/cluster/settings", tag = "Cluster", request_body = ClusterSettings,
    responses((status = 200, description = "OK", body = ClusterSettings), ProblemResponses))]
pub(crate) async fn put_settings(
    State(state): State<AppState>,
    caller: Caller,
    Body(mut settings): Body<ClusterSettings>,
) -> Result<Json<ClusterSettings>, Problem> {
    // What a `GET` reported; not a setting.
    settings.usage = None;
    // The floor keeps the audit trail: no caller, admins included, can have it wiped.
    let (count_floor, days_floor) =
        (runtimeai_model::EVENT_RETENTION_FLOOR_COUNT, runtimeai_model::EVENT_RETENTION_FLOOR_DAYS);
    if !(count_floor..=1_000_000).contains(&settings.event_retention_count) {
        return Err(crate::validate::invalid(
            "$.event_retention_count",
            format!("must be between {count_floor} and 1000000"),
        ));
    }
    if !(days_floor..=36_500).contains(&settings.event_retention_days) {
        return Err(crate::validate::invalid(
            "$.event_retention_days",
            format!("must be between {days_floor} and 36500"),
        ));
    }
    runtimeai_engine::Catalogue::validate(&settings.sizes)
        .map_err(|(path, message)| crate::validate::invalid(&path, message))?;
    for (i, size) in settings.sizes.iter().enumerate() {
        if crate::validate::quantity_bytes(&size.memory).is_none_or(|b| b == 0) {
            return Err(crate::validate::invalid(&format!("$.sizes[{i}].memory"), "not a quantity such as 4Gi"));
        }
    }
    for (name, value, range) in settings.limits.ranges() {
        if !range.contains(&value) {
            let message = format!("must be between {} and {}", range.start(), range.end());
            return Err(crate::validate::invalid(&format!("$.limits.{name}"), message));
        }
    }
    crate::webhooks::check_allowed_destinations(&settings.webhook_allowed_destinations)?;
    let op = Op::SetSettings(SetSettings { settings: settings.clone() });
    match crate::mutation::propose(&state, &caller, &settings, op).await? {
        CommandReply::Settings(settings) => Ok(Json(with_usage(&state, settings)?)),
        other => Err(Problem::unexpected_reply(other)),
    }
}
