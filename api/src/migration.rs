//! Moving runtimes between nodes: `POST /v1/runtimes/{id}/lifecycle/migrate` (cold: stopped,
//! its data moved, started on the destination) and `POST /v1/cluster/members/{node_id}/evacuate`
//! (every runtime of a node that is down, rebuilt from its spec elsewhere). The destination is
//! chosen here, before anything is proposed, so that the operation (and whoever approves it)
//! says where the runtime goes; the destination's executor carries the migration out.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use runtimeai_engine::placement;
use runtimeai_model::{ActionKind, LifecycleAction, NodeInfo, Placement, Runtime};
use runtimeai_raft::command::BeginOperation;
use runtimeai_raft::{Command, CommandReply, NodeId, Op};

use crate::auth::Caller;
use crate::doc_types::{IdempotencyKey, IfMatch, ProblemResponses, TenantId};
use crate::extract::{OptionalBody, PathParam};
use crate::problem::Problem;
use crate::runtimes::{begin, new_operation};
use crate::views::OperationView;
use crate::AppState;

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(migrate_runtime)).routes(routes!(evacuate_member))
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LifecycleMigrateRequest {
    /// The node to move it to: a live member, in the runtime's site, whose backend for its type
    /// can take it. By default the one of them with the fewest runtimes.
    #[serde(default)]
    pub node_id: Option<u64>,
}

/// Move a runtime to another node of its site (cold migration). The runtime's node stops it
/// and hands over what only it holds (a sandbox's writable layer and snapshots); the
/// destination makes it from that and starts it if it ran. For node-local backends; a
/// destructive action for the policies (it stops the runtime).
#[utoipa::path(post, path = "/v1/runtimes/{runtime_id}/lifecycle/migrate", tag = "Lifecycle",
    params(("runtime_id" = String, Path), IfMatch, IdempotencyKey, TenantId),
    request_body(content = Option<LifecycleMigrateRequest>),
    responses((status = 202, description = "Accepted", body = OperationView), ProblemResponses))]
pub(crate) async fn migrate_runtime(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(runtime_id): PathParam<String>,
    OptionalBody(request): OptionalBody<LifecycleMigrateRequest>,
) -> Result<Response, Problem> {
    let runtime =
        crate::runtimes::read_runtime(&state, &caller, &runtime_id, crate::extract::Consistency::Linearizable).await?;
    can_migrate(&runtime, "$")?;
    let to = Destinations::read(&state).await?.choose(&runtime, request.node_id, "$.node_id")?;
    begin(&state, &caller, &runtime_id, LifecycleAction::Migrate { to, rebuild: false }, &request).await
}

/// 409 unless the runtime's backend can migrate it.
pub(crate) fn can_migrate(runtime: &Runtime, path: &str) -> Result<(), Problem> {
    if runtime.capabilities.iter().any(|c| c == ActionKind::Migrate.as_str()) {
        return Ok(());
    }
    Err(Problem::unsupported_action(
        path,
        format!("this runtime's backend cannot migrate (capabilities: {})", runtime.capabilities.join(", ")),
    ))
}

/// Where runtimes can be moved now: the announced nodes, which of them the leader reaches, and
/// how many runtimes each has.
pub(crate) struct Destinations {
    nodes: Arc<Vec<NodeInfo>>,
    reachable: BTreeMap<NodeId, bool>,
    counts: BTreeMap<u64, u64>,
}

impl Destinations {
    pub(crate) async fn read(state: &AppState) -> Result<Destinations, Problem> {
        let members = state.replica.members().await;
        let mut reachable = BTreeMap::new();
        for member in members {
            let Some(reached) = member.reachable else {
                return Err(Problem::unavailable("no leader to say which members are live; retry"));
            };
            reachable.insert(member.id, reached);
        }
        let counts = state.replica.state().placement_counts().as_ref().clone();
        Ok(Destinations { nodes: state.replica.state().nodes(), reachable, counts })
    }

    /// Whether the leader reaches member `node` (`None`: not a member).
    fn reached(&self, node: NodeId) -> Option<bool> {
        self.reachable.get(&node).copied()
    }

    /// Why `runtime` cannot move to `node`, if it cannot.
    fn why_not(&self, runtime: &Runtime, node: u64) -> Option<String> {
        let Some(info) = self.nodes.iter().find(|n| n.node_id == node) else {
            return Some(format!("node {node} is not a member that has announced what it runs"));
        };
        let site = runtime.placement.as_ref().and_then(|p| p.site.clone());
        let backend = info.backends.iter().find(|b| b.runtime_type == runtime.runtime_type.as_str());
        Some(match backend {
            _ if runtime.placement.as_ref().is_some_and(|p| p.node_id == node) => {
                format!("the runtime is on node {node} already")
            }
            None => format!("node {node} runs no {} runtimes", runtime.runtime_type.as_str()),
            Some(b) if !b.capabilities.iter().any(|c| c == ActionKind::Migrate.as_str()) => {
                format!("node {node}'s {} backend cannot take a migrated runtime", b.driver)
            }
            _ if site.is_some() && info.site != site => format!(
                "node {node} is in site {}, the runtime in site {} (a migration stays in its site)",
                info.site.as_deref().unwrap_or("none"),
                site.as_deref().unwrap_or_default()
            ),
            _ if self.reached(node) != Some(true) => format!("node {node} is not reachable from the leader"),
            _ => return None,
        })
    }

    /// The destination for `runtime`: `requested` if it can go there (409 saying why not), else
    /// the node with the fewest runtimes among those it can go to (409 if there is none).
    pub(crate) fn choose(&self, runtime: &Runtime, requested: Option<u64>, path: &str) -> Result<Placement, Problem> {
        let refused = |why: String| Problem::new(StatusCode::CONFLICT, "no-destination", format!("{path}: {why}"));
        if let Some(node) = requested {
            if let Some(why) = self.why_not(runtime, node) {
                return Err(refused(why));
            }
        }
        let candidates: Vec<NodeInfo> = self
            .nodes
            .iter()
            .filter(|n| requested.is_none_or(|node| n.node_id == node) && self.why_not(runtime, n.node_id).is_none())
            .cloned()
            .collect();
        placement::place(&candidates, &self.counts, runtime.runtime_type, None).map(|(to, _)| to).ok_or_else(|| {
            let site = runtime.placement.as_ref().and_then(|p| p.site.as_deref()).map(|s| format!(" in site {s}"));
            refused(format!(
                "no other live node{} can take a {} runtime",
                site.unwrap_or_default(),
                runtime.runtime_type.as_str()
            ))
        })
    }

    /// Counts a runtime placed on `node` (so that an evacuation spreads what it moves).
    fn count(&mut self, node: u64) {
        *self.counts.entry(node).or_default() += 1;
    }
}

/// What an evacuation did.
#[derive(Debug, Serialize, ToSchema)]
pub struct EvacuationReport {
    pub node_id: u64,
    /// One migration per runtime of the node (each rebuilds its runtime elsewhere; follow them
    /// at `/v1/operations/{id}`, approve those the policies hold).
    pub begun: Vec<OperationView>,
    /// The runtimes not moved, and why.
    pub refused: Vec<EvacuationRefusal>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EvacuationRefusal {
    pub runtime_id: String,
    pub reason: String,
}

/// Rebuild every runtime of a member that is down on other nodes of its site. For a node that
/// is lost: each runtime is made afresh from its spec, and what only that node held (its data,
/// its snapshots) is gone. Refused (409) while the leader reaches the node: move the runtimes
/// of a live node with `lifecycle/migrate`. Should the node come back, it removes what it still
/// holds of runtimes placed elsewhere, so no runtime runs twice once it has caught up.
#[utoipa::path(post, path = "/v1/cluster/members/{node_id}/evacuate", tag = "Cluster",
    params(("node_id" = u64, Path)),
    responses((status = 202, description = "Migrations begun", body = EvacuationReport), ProblemResponses))]
pub(crate) async fn evacuate_member(
    State(state): State<AppState>,
    caller: Caller,
    PathParam(node_id): PathParam<NodeId>,
) -> Result<Response, Problem> {
    let mut destinations = Destinations::read(&state).await?;
    match destinations.reached(node_id) {
        None => return Err(Problem::not_found(format!("node {node_id} is not a member"))),
        Some(true) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "member-alive",
                format!(
                    "the leader reaches node {node_id}: evacuation rebuilds runtimes and is for a lost node; \
                     move a live node's runtimes with POST /v1/runtimes/{{id}}/lifecycle/migrate"
                ),
            ))
        }
        Some(false) => {}
    }
    state.replica.read_barrier().await?;
    let runtimes = state.replica.state().runtimes_on(node_id).map_err(|e| Problem::unavailable(e.to_string()))?;
    let mut report = EvacuationReport { node_id, begun: Vec::new(), refused: Vec::new() };
    let mode = caller.policy_mode(None)?;
    for runtime in runtimes {
        let to = can_migrate(&runtime, "$").and_then(|()| destinations.choose(&runtime, None, "$"));
        let to = match to {
            Ok(to) => to,
            Err(problem) => {
                report.refused.push(EvacuationRefusal { runtime_id: runtime.id, reason: problem.detail });
                continue;
            }
        };
        let action = LifecycleAction::Migrate { to: to.clone(), rebuild: true };
        let at = chrono::Utc::now();
        let operation = new_operation(&runtime.id, action, runtime.state, at, caller.actor(), mode);
        let op = Op::BeginOperation(BeginOperation { operation, expected_version: None });
        let command = Command { at, actor: caller.actor(), idempotency: None, op };
        match state.replica.propose(command).await? {
            CommandReply::Operation(operation) => {
                destinations.count(to.node_id);
                report.begun.push(OperationView::from(&operation));
            }
            CommandReply::Rejected(rejection) => {
                report.refused.push(EvacuationRefusal { runtime_id: runtime.id, reason: rejection.to_string() })
            }
            other => return Err(Problem::unexpected_reply(other)),
        }
    }
    tracing::warn!(node = node_id, begun = report.begun.len(), refused = report.refused.len(), "evacuation");
    Ok((StatusCode::ACCEPTED, Json(report)).into_response())
}
