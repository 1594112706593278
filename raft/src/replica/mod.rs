//! A node's handle on the replicated state: propose commands, read linearizably, change
//! membership — from any node. When this node is not the leader, the request goes to the leader
//! over gRPC with a hop budget ([`at_leader`]); a leader change on the way is retried within a
//! deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{BasicNode, ServerState};
use runtimeai_model::Actor;
use runtimeai_proto::cluster_client::ClusterClient;
use runtimeai_proto::PeerStatusRequest;
use tonic::transport::Channel;

use crate::batcher::{Assigner, Batcher};
use crate::build_priority::BuildPriority;
use crate::codec;
use crate::command::{Command, CommandReply};
use crate::error::{transport_error, ClusterError};
use crate::forwarding::Forwarder;
use crate::limits;
use crate::network::{PeerChannels, PeerHealth, PeerRoutes};
use crate::read_index::{ReadIndexBatcher, ReadIndexSource};
use crate::state_machine::StateMachineStore;
use crate::state_reader::StateReader;
use crate::types::{NodeId, Raft, RaftMetrics};

mod at_leader;

use at_leader::{AddMember, ReadIndex, RemoveMember, Write};

/// How many times a request may be passed on between nodes before it gives up.
pub const MAX_FORWARD_HOPS: u32 = 3;

/// Tunables of request handling.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// How long a write or read may keep retrying across leader changes.
    pub request_deadline: Duration,
    /// A peer counts as reachable when the leader heard from it within this window.
    pub reachable_window: Duration,
    /// How long adding a member waits for the new node to catch up before promoting it.
    pub catch_up_deadline: Duration,
    /// A new member is sent the latest snapshot, then the log since: when the snapshot is this
    /// many entries behind or more, the leader first builds a fresh one (at normal priority).
    pub stale_snapshot_entries: u64,
    /// Write groups (log entries on the leader, forwarded batches on a follower) that leave as
    /// soon as they form; past this many on their way, new writes wait for one to be done and
    /// go together (fewer entries, a longer wait). 1 to 4.
    pub write_groups_at_once: u32,
}

/// See [`ReplicaOptions::write_groups_at_once`].
pub const DEFAULT_WRITE_GROUPS_AT_ONCE: u32 = 1;

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            request_deadline: Duration::from_secs(5),
            reachable_window: Duration::from_secs(1),
            catch_up_deadline: Duration::from_secs(60),
            stale_snapshot_entries: 5_000,
            write_groups_at_once: DEFAULT_WRITE_GROUPS_AT_ONCE,
        }
    }
}

/// One member's view as reported by `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: NodeId,
    pub grpc_addr: String,
    pub voter: bool,
    /// Whether the leader currently reaches this member; `None` when that is unknown (no leader,
    /// or the leader could not be asked).
    pub reachable: Option<bool>,
}

/// The handle shared by the REST API and the gRPC services of one node.
pub struct Replica {
    pub id: NodeId,
    pub(crate) raft: Raft,
    state: StateReader,
    /// At what priority this node builds snapshots (a leader hurries one for a joining member).
    build_priority: Arc<BuildPriority>,
    cluster: String,
    health: Arc<PeerHealth>,
    routes: Arc<PeerRoutes>,
    options: ReplicaOptions,
    /// The members' own calls (forwarded writes, read indexes, host calls), a channel per peer.
    channels: PeerChannels,
    /// When this node last received an AppendEntries (heartbeat or entries) from a leader.
    leader_contact: Mutex<Option<Instant>>,
    batcher: Batcher,
    forwarder: Forwarder,
    read_indexes: ReadIndexBatcher,
    /// Client writes taken in and not yet answered.
    pending_writes: limits::PendingWrites,
    /// What serves the calls members pass here about runtimes this node hosts, once set.
    host_calls: std::sync::OnceLock<Arc<dyn HostCalls>>,
}

/// Serves a call another member's API took about a runtime this node hosts (a command in a
/// sandbox, its logs): the payload says what and for whom, and the answer comes back line by
/// line as it is made. (The API crate gives both their meaning; the replica only carries them
/// between members, as it carries writes to the leader.)
#[async_trait::async_trait]
pub trait HostCalls: Send + Sync {
    async fn call(&self, payload: Vec<u8>) -> Result<tokio::sync::mpsc::Receiver<Vec<u8>>, String>;
}

impl Replica {
    /// Proposes `op()` as the system once this node is a member and a leader is known, until
    /// `stored` finds it in the replicated state or a reply `settles` it (other replies and
    /// errors are tried again, backing off from 100 ms to 2 s): how a node writes what it owns
    /// (its announcement, the bootstrap admin key). The settling reply; none when the state
    /// already held it.
    pub async fn propose_until_stored(
        &self,
        what: &str,
        stored: impl Fn(&Replica) -> bool,
        op: impl Fn() -> crate::Op,
        settles: impl Fn(&CommandReply) -> bool,
    ) -> Option<CommandReply> {
        let mut delay = Duration::from_millis(100);
        loop {
            let metrics = self.metrics();
            let member = metrics.membership_config.nodes().any(|(id, _)| *id == self.id);
            if member && metrics.current_leader.is_some() {
                if stored(self) {
                    return None;
                }
                let command = Command { at: chrono::Utc::now(), actor: Actor::System, idempotency: None, op: op() };
                match self.propose(command).await {
                    Ok(reply) if settles(&reply) => return Some(reply),
                    Ok(other) => tracing::warn!(what, reply = ?other, "unexpected reply; trying again"),
                    Err(e) => tracing::debug!(what, error = %e, "cannot propose yet"),
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    pub fn new(
        id: NodeId,
        raft: Raft,
        state: &StateMachineStore,
        cluster: String,
        health: Arc<PeerHealth>,
        routes: Arc<PeerRoutes>,
        options: ReplicaOptions,
    ) -> Arc<Replica> {
        let at_once = options.write_groups_at_once;
        let forwarder = Forwarder::start(id, cluster.clone(), options.request_deadline, at_once);
        Arc::new_cyclic(|replica| Replica {
            forwarder,
            read_indexes: ReadIndexBatcher::start(replica.clone()),
            id,
            state: state.reader().clone(),
            build_priority: state.build_priority().clone(),
            cluster,
            health,
            channels: PeerChannels::new(routes.clone()),
            routes,
            options,
            leader_contact: Mutex::new(None),
            batcher: Batcher::start(raft.clone(), at_once),
            pending_writes: limits::PendingWrites::default(),
            host_calls: std::sync::OnceLock::new(),
            raft,
        })
    }

    /// Sets what serves the calls other members pass here (once; later calls are ignored).
    pub fn set_host_calls(&self, host: Arc<dyn HostCalls>) {
        let _ = self.host_calls.set(host);
    }

    pub(crate) fn host_calls(&self) -> Option<Arc<dyn HostCalls>> {
        self.host_calls.get().cloned()
    }

    /// Passes a call (`payload`, for [`HostCalls::call`]) to member `node`, which hosts the
    /// runtime, over the members' channel; the answer's lines as they come.
    pub async fn call_on_host(
        &self,
        node: NodeId,
        payload: Vec<u8>,
    ) -> Result<tokio::sync::mpsc::Receiver<Vec<u8>>, ClusterError> {
        let metrics = self.metrics();
        let Some(addr) = metrics.membership_config.nodes().find(|(id, _)| **id == node).map(|(_, n)| n.addr.clone())
        else {
            return Err(ClusterError::NotFound(format!("node {node} is not a member")));
        };
        let mut client = self.client(node, &addr)?;
        let request = runtimeai_proto::HostRequest { cluster: self.cluster.clone(), from: self.id, payload };
        let answer = client.on_host(request).await.map_err(|status| match status.code() {
            // The host refused the call (the sandbox is not running there, say): its reason.
            tonic::Code::FailedPrecondition => ClusterError::Invalid(status.message().to_string()),
            _ => self.transport_error(node, status),
        });
        let mut chunks = answer?.into_inner();
        let (lines, answer) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(Some(chunk)) = chunks.message().await {
                if lines.send(chunk.payload).await.is_err() {
                    return;
                }
            }
        });
        Ok(answer)
    }

    /// Lets the leader's scheduler hand operations to executors in the entries that queue them.
    pub fn set_assigner(&self, assigner: Arc<dyn Assigner>) {
        self.batcher.set_assigner(assigner);
    }

    /// The replicated state as this node has applied it (a linearizable read first waits on
    /// [`Replica::read_barrier`]).
    pub fn state(&self) -> &StateReader {
        &self.state
    }

    /// Changes when this node's raft role or leader changes.
    pub fn server_metrics(
        &self,
    ) -> tokio::sync::watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, BasicNode>> {
        self.raft.server_metrics()
    }

    pub fn cluster_name(&self) -> &str {
        &self.cluster
    }

    /// Records that a leader's AppendEntries arrived.
    pub(crate) fn heard_from_leader(&self) {
        *self.leader_contact.lock().expect("leader contact lock") = Some(Instant::now());
    }

    /// Time since a leader's AppendEntries last arrived.
    pub(crate) fn since_leader_contact(&self) -> Option<Duration> {
        self.leader_contact.lock().expect("leader contact lock").map(|at| at.elapsed())
    }

    /// Whether this node's log reaches at least as far as every other member's that answers
    /// (ties go to the lowest id), leaving out `except`: the node best placed to win an election.
    pub(crate) async fn has_longest_log(&self, except: NodeId) -> bool {
        let metrics = self.metrics();
        let mine = (metrics.last_log_index, std::cmp::Reverse(self.id));
        for (id, node) in metrics.membership_config.nodes() {
            if *id == self.id || *id == except {
                continue;
            }
            let Ok(mut client) = self.client(*id, &node.addr) else { continue };
            let mut request = tonic::Request::new(PeerStatusRequest { cluster: self.cluster.clone() });
            request.set_timeout(Duration::from_millis(200));
            if let Ok(reply) = client.peer_status(request).await {
                if (reply.into_inner().last_log_index, std::cmp::Reverse(*id)) > mine {
                    return false;
                }
            }
        }
        true
    }

    /// The address this node dials `node` at (its announced address through [`PeerRoutes`]).
    pub(crate) fn dial_address(&self, node: NodeId, metrics: &RaftMetrics) -> Option<String> {
        let announced = metrics.membership_config.nodes().find(|(id, _)| **id == node).map(|(_, n)| n.addr.clone())?;
        Some(self.routes.dial(node, &announced).to_string())
    }

    /// How many members (voters and learners) the cluster has, read in place.
    pub fn member_count(&self) -> usize {
        self.raft.metrics().borrow().membership_config.nodes().count()
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// Proposes `command` through the leader and returns the state machine's reply once the
    /// entry is committed on a quorum and applied.
    ///
    /// A command larger than [`limits::MAX_COMMAND_BYTES`] is refused before anything is sent,
    /// and so is a client's while the node has [`limits::MAX_PENDING_BYTES`] of them in flight
    /// (the node's own commands, executor reports and the like, always go: they are small, and
    /// what finishes work).
    pub async fn propose(&self, command: Command) -> Result<CommandReply, ClusterError> {
        let bytes = codec::encoded_len("command", &command).map_err(internal)?;
        if bytes > limits::MAX_COMMAND_BYTES {
            return Err(ClusterError::TooLarge { bytes, max: limits::MAX_COMMAND_BYTES });
        }
        let _admitted = match command.actor {
            Actor::System => None,
            _ => Some(
                self.pending_writes.admit(bytes).map_err(|pending_bytes| ClusterError::Overloaded { pending_bytes })?,
            ),
        };
        self.propose_sized(command, bytes, MAX_FORWARD_HOPS).await
    }

    /// [`Self::propose`] for a command a follower forwarded (`bytes` long: one client's, or a
    /// batch of them).
    pub(crate) async fn propose_sized(
        &self,
        command: Command,
        bytes: usize,
        hops_left: u32,
    ) -> Result<CommandReply, ClusterError> {
        let write = Write { command: &command, bytes };
        self.retry_until_deadline(ClusterError::never_applied, || self.at_leader(&write, hops_left)).await
    }

    /// Waits until this node's state machine reflects every write acknowledged before the call
    /// (read index: the leader confirms its leadership with a quorum and names the commit index).
    pub async fn read_barrier(&self) -> Result<(), ClusterError> {
        // Reads change nothing, so every transient failure may be retried.
        let index = self.retry_until_deadline(ClusterError::is_retryable, || self.read_index(MAX_FORWARD_HOPS)).await?;
        let remaining = self.options.request_deadline;
        self.raft.wait(Some(remaining)).applied_index_at_least(Some(index), "linearizable read").await.map_err(
            |e| match e {
                openraft::metrics::WaitError::Timeout(..) => ClusterError::Timeout(remaining.as_millis() as u64),
                openraft::metrics::WaitError::ShuttingDown => ClusterError::Stopped("raft is shutting down".into()),
            },
        )?;
        Ok(())
    }

    /// The log index a linearizable read that begins now must wait for, obtained from the
    /// leader in a round shared with the reads waiting alongside (see [`crate::read_index`]).
    pub(crate) async fn read_index(&self, hops_left: u32) -> Result<u64, ClusterError> {
        self.read_indexes.read_index(hops_left).await
    }

    /// Adds a node: first as a learner (it catches up from the log or a snapshot), then, once
    /// caught up, as a voter.
    pub async fn add_member(&self, id: NodeId, grpc_addr: String) -> Result<(), ClusterError> {
        self.add_member_with_hops(id, grpc_addr, MAX_FORWARD_HOPS).await
    }

    pub(crate) async fn add_member_with_hops(
        &self,
        id: NodeId,
        grpc_addr: String,
        hops_left: u32,
    ) -> Result<(), ClusterError> {
        self.at_leader(&AddMember { id, grpc_addr }, hops_left).await
    }

    /// Removes a voter or learner from the cluster.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), ClusterError> {
        self.remove_member_with_hops(id, MAX_FORWARD_HOPS).await
    }

    pub(crate) async fn remove_member_with_hops(&self, id: NodeId, hops_left: u32) -> Result<(), ClusterError> {
        self.at_leader(&RemoveMember { id }, hops_left).await
    }

    /// Every member with its role and whether the leader reaches it.
    pub async fn members(&self) -> Vec<MemberStatus> {
        let metrics = self.metrics();
        let membership = metrics.membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.membership().voter_ids().collect();
        let reachability = self.reachability(&metrics).await;
        membership
            .nodes()
            .map(|(id, node)| MemberStatus {
                id: *id,
                grpc_addr: node.addr.clone(),
                voter: voters.contains(id),
                reachable: reachability.as_ref().map(|r| r.get(id).copied().unwrap_or(false)),
            })
            .collect()
    }

    /// The leader's view of which members it reaches (itself included), asked of the leader
    /// when this node is not it.
    pub(crate) async fn reachability(&self, metrics: &RaftMetrics) -> Option<BTreeMap<NodeId, bool>> {
        let leader = metrics.current_leader?;
        if leader == self.id && metrics.state == ServerState::Leader {
            let window = self.options.reachable_window;
            let map = metrics
                .membership_config
                .nodes()
                .map(|(id, _)| (*id, *id == self.id || self.health.reachable(*id, window)))
                .collect();
            return Some(map);
        }
        let addr = metrics.membership_config.nodes().find(|(id, _)| **id == leader).map(|(_, n)| n.addr.clone())?;
        let mut client = self.client(leader, &addr).ok()?;
        let mut request = tonic::Request::new(PeerStatusRequest { cluster: self.cluster.clone() });
        request.set_timeout(Duration::from_millis(500));
        let reply = client.peer_status(request).await.ok()?.into_inner();
        Some(reply.peers.into_iter().map(|p| (p.node_id, p.reachable)).collect())
    }

    /// This node's own record of its peers, for the `PeerStatus` RPC.
    pub(crate) fn peer_contacts(&self) -> Vec<(NodeId, bool, Option<Duration>)> {
        let metrics = self.metrics();
        let window = self.options.reachable_window;
        metrics
            .membership_config
            .nodes()
            .map(|(id, _)| {
                if *id == self.id {
                    (*id, true, Some(Duration::ZERO))
                } else {
                    (*id, self.health.reachable(*id, window), self.health.since_last_contact(*id))
                }
            })
            .collect()
    }

    /// A client for `node`, announced at `addr` (dialled through this node's [`PeerRoutes`]).
    fn client(&self, node: NodeId, addr: &str) -> Result<ClusterClient<Channel>, ClusterError> {
        let channel = self.channels.get(node, addr).1.map_err(ClusterError::Invalid)?;
        Ok(ClusterClient::new(channel).max_decoding_message_size(limits::MAX_MESSAGE_BYTES))
    }

    /// A transport failure talking to the leader. Whether the request reached it is unknown
    /// unless the connection was never made, so only that case counts as "never applied".
    fn transport_error(&self, leader: NodeId, status: tonic::Status) -> ClusterError {
        transport_error(leader, status, self.options.request_deadline)
    }

    /// Runs `attempt` until it succeeds, fails with an error `retry_on` does not accept, or the
    /// request deadline passes.
    async fn retry_until_deadline<T, F, Fut>(
        &self,
        retry_on: fn(&ClusterError) -> bool,
        mut attempt: F,
    ) -> Result<T, ClusterError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClusterError>>,
    {
        let deadline = Instant::now() + self.options.request_deadline;
        let mut backoff = Duration::from_millis(20);
        loop {
            let leader_before = self.raft.metrics().borrow().current_leader;
            match attempt().await {
                Err(e) if retry_on(&e) && Instant::now() + backoff < deadline => {
                    tracing::debug!(error = %e, backoff_ms = backoff.as_millis() as u64, "retrying request");
                    // Retry as soon as this node learns of another leader (a failover ends), or
                    // after the backoff, whichever comes first.
                    let mut metrics = self.raft.metrics();
                    let new_leader =
                        metrics.wait_for(|m| m.current_leader.is_some() && m.current_leader != leader_before);
                    let _ = tokio::time::timeout(backoff, new_leader).await;
                    backoff = (backoff * 2).min(Duration::from_millis(400));
                }
                other => return other,
            }
        }
    }
}

fn internal(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Internal(e.to_string())
}

impl ReadIndexSource for Replica {
    fn read_index_now(&self, hops_left: u32) -> impl std::future::Future<Output = Result<u64, ClusterError>> + Send {
        self.at_leader(&ReadIndex, hops_left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::never_sent;
    use crate::network::channel;

    #[tokio::test]
    async fn a_refused_connection_counts_as_never_sent() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut client = ClusterClient::new(channel(&format!("127.0.0.1:{port}"), None).unwrap());
        let status = client.peer_status(PeerStatusRequest { cluster: "c".into() }).await.unwrap_err();
        assert!(never_sent(&status), "{status:?}");
        assert!(!never_sent(&tonic::Status::unavailable("connection reset by peer")));
        assert!(!never_sent(&tonic::Status::deadline_exceeded("slow")));
        let error = transport_error(2, status, Duration::from_secs(5));
        assert!(error.never_applied(), "{error:?}");
    }

    /// A peer that accepts connections and then never sends a byte, as a connection stuck in
    /// retransmission backoff looks from this end.
    async fn silent_peer() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_has_an_unknown_outcome_not_an_internal_error() {
        let mut client = ClusterClient::new(channel(&silent_peer().await, None).unwrap());
        let mut request = tonic::Request::new(PeerStatusRequest { cluster: "c".into() });
        request.set_timeout(Duration::from_millis(200));
        let status = client.peer_status(request).await.unwrap_err();
        let error = transport_error(2, status, Duration::from_millis(200));
        assert!(matches!(error, ClusterError::Timeout(200)), "{error:?}");
        assert!(error.is_retryable() && !error.never_applied());
        // What a tonic server sends when the `grpc-timeout` it was given passes first.
        let enforced_by_the_server = tonic::Status::cancelled("Timeout expired");
        let error = transport_error(2, enforced_by_the_server, Duration::from_millis(200));
        assert!(matches!(error, ClusterError::Timeout(200)), "{error:?}");
    }

    #[tokio::test]
    async fn a_dead_connection_is_found_by_keep_alive_and_the_call_fails_as_connection_lost() {
        let mut client = ClusterClient::new(channel(&silent_peer().await, None).unwrap());
        let started = Instant::now();
        // No deadline: only the keep-alive can end this call.
        let status = client.peer_status(PeerStatusRequest { cluster: "c".into() }).await.unwrap_err();
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(10), "the keep-alive gave up after {waited:?}");
        let error = transport_error(2, status, Duration::from_secs(5));
        assert!(matches!(error, ClusterError::ConnectionLost { leader: 2, .. }), "{error:?}");
        assert!(error.is_retryable() && !error.never_applied());
        assert!(error.to_string().contains("may or may not have been applied"), "{error}");
    }
}
