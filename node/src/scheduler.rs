//! The leader's scheduler: hands each queued operation to a live executor node, and takes an
//! operation back from an executor whose lease ran out.
//!
//! An assignment is a raft command; its log index is the fencing token. Most operations never
//! need one of their own: the leader offers an executor in the very entry that queues the
//! operation ([`LeaderAssigner`], called by the leader's proposal batcher), and the rounds here
//! pick up the rest (no live executor then, a lease expired, a leader change in between). The
//! leader prefers the node the runtime is placed on; if that node is unreachable, another live
//! node that serves the runtime's type in the same site. A lease is only judged expired by a
//! leader that has led for at least one lease period, so a fresh leader does not take
//! operations from executors that could not renew during the election.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use openraft::ServerState;
use runtimeai_model::{Assignment, NodeInfo, Operation, OperationStatus, Runtime};
use runtimeai_raft::command::{AssignOperation, BeginOperation, CreateRuntime};
use runtimeai_raft::StateReader;
use runtimeai_raft::{Assigner, Command, CommandReply, Op, Replica};
use tokio::sync::watch;
use tokio::time::Instant;

/// Assignments of one scheduling round proposed at once.
const MAX_ASSIGNMENTS_IN_FLIGHT: usize = 256;

#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    pub lease: Duration,
}

/// What the leader knows of the executors: who serves what, and whom it reaches.
struct ExecutorView {
    nodes: Arc<Vec<NodeInfo>>,
    reachable: Vec<u64>,
    taken: Instant,
}

/// Offers an executor for the operation a command queues, from the leader's latest view (kept
/// by [`run`] while this node leads; no offer without a fresh one).
pub struct LeaderAssigner {
    state: StateReader,
    lease: Duration,
    /// How old a view may be and still be offered from.
    fresh_for: Duration,
    view: RwLock<Option<ExecutorView>>,
}

impl Assigner for LeaderAssigner {
    fn offer(&self, command: &mut Command) {
        let view = self.view.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(view) = view.as_ref().filter(|view| view.taken.elapsed() <= self.fresh_for) else { return };
        let lease_until = command.at + self.lease;
        let offer = |runtime: &Runtime, operation: &mut Operation| {
            if let Some(node_id) = choose(runtime, operation, &view.nodes, &view.reachable) {
                operation.assignment = Some(Assignment { node_id, token: 0, lease_until });
            }
        };
        match &mut command.op {
            Op::CreateRuntime(CreateRuntime { runtime, operation }) => offer(runtime, operation),
            Op::BeginOperation(BeginOperation { operation, .. }) => {
                if let Ok(Some(runtime)) = self.state.get_runtime(&operation.runtime_id) {
                    offer(&runtime, operation);
                }
            }
            _ => {}
        }
    }
}

/// Runs until `stop` turns true; acts only while this node leads.
pub async fn run(replica: Arc<Replica>, options: SchedulerOptions, mut stop: watch::Receiver<bool>) {
    // A round runs when the unfinished operations change (a new one is queued at once), and
    // on a tick, which notices leases running out.
    let tick = (options.lease / 6).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let assigner = Arc::new(LeaderAssigner {
        state: replica.state().clone(),
        lease: options.lease,
        fresh_for: tick * 4,
        view: RwLock::new(None),
    });
    replica.set_assigner(assigner.clone());
    let mut changed = replica.state().watch_active_operations();
    // A follower waits for leadership, not for every applied batch.
    let mut server = replica.server_metrics();
    let mut leading_since: Option<(u64, Instant)> = None;
    loop {
        let leading = server.borrow_and_update().state == ServerState::Leader;
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = changed.changed(), if leading => {}
            leadership = server.changed() => {
                if leadership.is_err() {
                    return; // raft has stopped
                }
            }
            _ = tokio::time::sleep(tick) => {}
        }
        changed.mark_unchanged();
        let metrics = replica.metrics();
        if metrics.state != ServerState::Leader {
            leading_since = None;
            *assigner.view.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
            continue;
        }
        let term = metrics.current_term;
        if leading_since.is_none_or(|(t, _)| t != term) {
            leading_since = Some((term, Instant::now()));
        }
        let stale =
            assigner.view.read().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(|v| v.taken.elapsed() >= tick);
        if stale {
            match look_at_executors(&replica).await {
                Ok(view) => *assigner.view.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(view),
                Err(e) => tracing::debug!(error = %e, "cannot read the executors now"),
            }
        }
        let settled = leading_since.is_some_and(|(_, since)| since.elapsed() >= options.lease);
        if let Err(e) = schedule(&replica, &assigner, &options, settled).await {
            tracing::debug!(error = %e, "scheduling round failed");
        }
    }
}

async fn look_at_executors(replica: &Replica) -> anyhow::Result<ExecutorView> {
    let nodes = replica.state().nodes();
    let reachable = replica.members().await.into_iter().filter(|m| m.reachable == Some(true)).map(|m| m.id).collect();
    Ok(ExecutorView { nodes, reachable, taken: Instant::now() })
}

async fn schedule(
    replica: &Replica,
    assigner: &LeaderAssigner,
    options: &SchedulerOptions,
    settled: bool,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let unassigned = replica.state().active_operations_where(|operation| {
        matches!(operation.status, OperationStatus::Queued | OperationStatus::Running)
            && operation.assignment.as_ref().is_none_or(|a| settled && a.lease_until < now)
    });
    if unassigned.is_empty() {
        return Ok(());
    }
    let mut assignments = Vec::new();
    {
        let view = assigner.view.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(view) = view.as_ref() else { return Ok(()) };
        for operation in unassigned {
            let Some(runtime) = replica.state().get_runtime(&operation.runtime_id)? else { continue };
            let Some(node) = choose(&runtime, &operation, &view.nodes, &view.reachable) else {
                tracing::debug!(operation = %operation.id, "no live executor for it yet");
                continue;
            };
            let expected_token = operation.assignment.as_ref().map(|a| a.token);
            if let Some(previous) = &operation.assignment {
                tracing::warn!(operation = %operation.id, from = previous.node_id, to = node, "lease expired; reassigning");
            }
            assignments.push(Command {
                at: chrono::Utc::now(),
                actor: runtimeai_model::Actor::System,
                idempotency: None,
                op: Op::AssignOperation(AssignOperation {
                    operation_id: operation.id.clone(),
                    node_id: node,
                    lease_ms: options.lease.as_millis() as u64,
                    expected_token,
                }),
            });
        }
    }
    // Proposed together, the assignments of one round share log entries (the leader batches
    // concurrent proposals); one at a time, a backlog drains at one commit per assignment.
    let outcomes = futures::stream::iter(assignments)
        .map(|command| replica.propose(command))
        .buffer_unordered(MAX_ASSIGNMENTS_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
    for outcome in outcomes {
        match outcome? {
            CommandReply::Operation(op) => {
                tracing::debug!(operation = %op.id, status = op.status.as_str(), "assigned")
            }
            other => tracing::debug!(reply = ?other, "assignment refused"),
        }
    }
    Ok(())
}

/// The executor for an operation: the runtime's node if it is live and still serves the
/// runtime's type, else (when that backend is shared, so other nodes reach the same
/// infrastructure) the live node serving that type in the runtime's site with the lowest id,
/// preferring one other than the executor whose lease expired. A node-local runtime waits for
/// its node; a migration, for its destination.
fn choose(runtime: &Runtime, operation: &Operation, nodes: &[NodeInfo], reachable: &[u64]) -> Option<u64> {
    // A migration is carried out by its destination, and waits for it.
    if let Some(to) = operation.action.migration_destination() {
        let serves = nodes.iter().any(|n| {
            n.node_id == to.node_id && n.backends.iter().any(|b| b.runtime_type == runtime.runtime_type.as_str())
        });
        return (serves && reachable.contains(&to.node_id)).then_some(to.node_id);
    }
    let placed = runtime.placement.as_ref();
    let site = placed.and_then(|p| p.site.clone());
    let previous = operation.assignment.as_ref().map(|a| a.node_id);
    let mut candidates: Vec<u64> = nodes
        .iter()
        .filter(|n| reachable.contains(&n.node_id))
        .filter(|n| {
            n.backends.iter().any(|b| {
                b.runtime_type == runtime.runtime_type.as_str()
                    && (b.shared || Some(n.node_id) == placed.map(|p| p.node_id))
            })
        })
        .filter(|n| site.is_none() || n.site == site)
        .map(|n| n.node_id)
        .collect();
    // Order: the runtime's own node first, then by id; the executor that let its lease expire last.
    candidates.sort_by_key(|id| (Some(*id) == previous, Some(*id) != placed.map(|p| p.node_id), *id));
    candidates.first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtimeai_model::{Placement, RuntimeType};

    fn node(id: u64, backends: &[&str], site: Option<&str>) -> NodeInfo {
        NodeInfo {
            node_id: id,
            grpc_addr: String::new(),
            http_addr: String::new(),
            version: String::new(),
            backends: backends
                .iter()
                .map(|b| runtimeai_model::BackendInfo {
                    runtime_type: b.to_string(),
                    driver: "simulated".into(),
                    shared: true,
                    capabilities: vec![],
                })
                .collect(),
            site: site.map(String::from),
            zone: None,
        }
    }

    #[test]
    fn the_runtimes_node_first_then_a_live_peer_in_its_site() {
        let epoch = chrono::DateTime::UNIX_EPOCH;
        let mut runtime = Runtime::new("rt", "r", RuntimeType::Vm, epoch);
        runtime.placement = Some(Placement { node_id: 2, site: Some("eu".into()), zone: None });
        let nodes = [
            node(1, &["vm"], Some("eu")),
            node(2, &["vm"], Some("eu")),
            node(3, &["vm"], Some("us")),
            node(4, &["sandbox"], Some("eu")),
        ];
        let json = serde_json::json!({
            "id": "op", "runtime_id": "rt", "action": "restart", "prior_state": "running", "status": "queued",
            "created_at": epoch, "requested_by": "system", "policy_mode": "balanced", "version": 1
        });
        let mut operation: Operation = serde_json::from_value(json).unwrap();
        assert_eq!(choose(&runtime, &operation, &nodes, &[1, 2, 3, 4]), Some(2), "its own node");
        assert_eq!(choose(&runtime, &operation, &nodes, &[1, 3, 4]), Some(1), "a live peer in its site");
        assert_eq!(choose(&runtime, &operation, &nodes, &[3, 4]), None, "nobody in its site serves vm");
        operation.assignment = Some(Assignment { node_id: 2, token: 7, lease_until: epoch });
        assert_eq!(choose(&runtime, &operation, &nodes, &[1, 2]), Some(1), "not the one whose lease expired");
        assert_eq!(choose(&runtime, &operation, &nodes, &[2]), Some(2), "unless it is the only one");
        let local: Vec<NodeInfo> = nodes
            .iter()
            .cloned()
            .map(|mut n| {
                n.backends.iter_mut().for_each(|b| b.shared = false);
                n
            })
            .collect();
        assert_eq!(choose(&runtime, &operation, &local, &[1, 2]), Some(2), "node-local: only its own node");
        assert_eq!(choose(&runtime, &operation, &local, &[1, 3]), None, "node-local: it waits for its node");
        let to = Placement { node_id: 1, site: Some("eu".into()), zone: None };
        operation.action = runtimeai_model::LifecycleAction::Migrate { to, rebuild: false };
        assert_eq!(choose(&runtime, &operation, &local, &[1, 2]), Some(1), "a migration: its destination");
        assert_eq!(choose(&runtime, &operation, &local, &[2, 3]), None, "which it waits for");
    }
}
