//! Requests only the leader serves: writes, read indexes, membership changes. One path
//! ([`Replica::at_leader`]) serves each here when this node leads and otherwise passes it to the
//! leader, with one hop budget, one leader lookup and one client cache, as databend-meta's
//! handler and forwarder do. A request says only how it is served and how it travels.

use std::collections::BTreeSet;
use std::future::Future;

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use runtimeai_proto::cluster_client::ClusterClient;
use runtimeai_proto::{AddMemberRequest, ReadIndexRequest, RemoveMemberRequest};
use tonic::transport::Channel;

use super::Replica;
use crate::codec;
use crate::command::{Command, CommandReply};
use crate::error::ClusterError;
use crate::types::{LogId, NodeId};

/// Where the leader is, as raft tells a node that is not it.
pub(crate) type LeaderHint = ForwardToLeader<NodeId, BasicNode>;

/// How serving a request here went.
pub(crate) enum Here<T> {
    /// This node leads and served it.
    Served(Result<T, ClusterError>),
    /// Another node leads (or none is known): the request goes there.
    NotLeader(LeaderHint),
}

/// The leader a request is passed to, and what it passes on.
pub(crate) struct Hop {
    pub leader: NodeId,
    pub client: ClusterClient<Channel>,
    /// The budget the leader gets (one less than this node had).
    pub hops_left: u32,
}

/// A request only the leader serves.
pub(crate) trait LeaderRequest: Sync {
    type Reply: Send;

    /// Serves the request if this node leads.
    fn serve_here(&self, replica: &Replica) -> impl Future<Output = Here<Self::Reply>> + Send;

    /// Passes it to the leader.
    fn pass_on(&self, replica: &Replica, hop: Hop) -> impl Future<Output = Result<Self::Reply, ClusterError>> + Send;
}

impl Replica {
    /// Serves `request` here if this node leads, else at the leader (which may pass it on again
    /// while `hops_left` lasts).
    pub(crate) async fn at_leader<R: LeaderRequest>(
        &self,
        request: &R,
        hops_left: u32,
    ) -> Result<R::Reply, ClusterError> {
        let hint = match request.serve_here(self).await {
            Here::Served(reply) => return reply,
            Here::NotLeader(hint) => hint,
        };
        if hops_left == 0 {
            return Err(ClusterError::TooManyHops);
        }
        let (leader, addr) = match (hint.leader_id, hint.leader_node) {
            (Some(leader), _) if leader == self.id => {
                return Err(ClusterError::NoLeader("this node is stepping up or down as leader".into()))
            }
            (Some(leader), Some(node)) => (leader, node.addr),
            (Some(leader), None) => {
                return Err(ClusterError::NoLeader(format!("leader {leader} has no known address")))
            }
            (None, _) => return Err(ClusterError::NoLeader("an election is in progress or there is no quorum".into())),
        };
        let client = self.client(leader, &addr)?;
        request.pass_on(self, Hop { leader, client, hops_left: hops_left - 1 }).await
    }

    /// Where raft says the leader is, read in place; `None` if this node leads.
    fn leader_hint(&self) -> Option<LeaderHint> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.state == ServerState::Leader && metrics.current_leader == Some(self.id) {
            return None;
        }
        let leader_id = metrics.current_leader;
        let leader_node =
            leader_id.and_then(|l| metrics.membership_config.nodes().find(|(id, _)| **id == l).map(|(_, n)| n.clone()));
        Some(ForwardToLeader { leader_id, leader_node })
    }

    fn request<T>(&self, message: T, timeout: std::time::Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        request
    }
}

/// A command to propose, `bytes` long encoded.
pub(crate) struct Write<'a> {
    pub command: &'a Command,
    pub bytes: usize,
}

impl LeaderRequest for Write<'_> {
    type Reply = CommandReply;

    async fn serve_here(&self, replica: &Replica) -> Here<CommandReply> {
        // Read in place: copying the whole metrics on every write showed in profiles.
        let (is_leader, quiet_ms) = {
            let metrics = replica.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.state == ServerState::Leader, metrics.millis_since_quorum_ack)
        };
        if !is_leader {
            // A follower that knows the leader passes the write on at once; one that does not
            // learns where it is from raft below.
            if let Some(hint) = replica.leader_hint().filter(|hint| hint.leader_id.is_some_and(|id| id != replica.id)) {
                return Here::NotLeader(hint);
            }
        } else {
            // A leader cut off from its quorum cannot commit; say so at once instead of making
            // the client wait for the deadline (nothing has been proposed yet).
            let lease = replica.options.reachable_window.as_millis() as u64;
            if let Some(ms) = quiet_ms.filter(|ms| *ms > lease) {
                let error = ClusterError::NoQuorum(format!("the leader has not heard from a quorum for {ms} ms"));
                return Here::Served(Err(error));
            }
        }
        let deadline = replica.options.request_deadline;
        let written = tokio::time::timeout(deadline, replica.batcher.write(self.command.clone(), self.bytes)).await;
        match written {
            Err(_) => Here::Served(Err(ClusterError::Timeout(deadline.as_millis() as u64))),
            Ok(Ok(reply)) => Here::Served(Ok(reply)),
            // Leadership moved between the look at the metrics and the write (rare).
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(hint)))) => Here::NotLeader(hint),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Here::Served(Err(ClusterError::Invalid(e.to_string())))
            }
            Ok(Err(RaftError::Fatal(e))) => Here::Served(Err(ClusterError::Stopped(e.to_string()))),
        }
    }

    /// Batched with the other writes on their way to the leader (`forwarding.rs`); `command`
    /// is copied once, into the forwarder.
    async fn pass_on(&self, replica: &Replica, hop: Hop) -> Result<CommandReply, ClusterError> {
        replica.forwarder.forward(hop.leader, hop.client, hop.hops_left, self.command.clone(), self.bytes).await
    }
}

/// The log index a linearizable read that begins now must wait for.
pub(crate) struct ReadIndex;

impl LeaderRequest for ReadIndex {
    type Reply = u64;

    async fn serve_here(&self, replica: &Replica) -> Here<u64> {
        let outcome = tokio::time::timeout(replica.options.request_deadline, replica.raft.get_read_log_id()).await;
        Here::Served(match outcome {
            Err(_) => Err(ClusterError::NoQuorum("leadership could not be confirmed in time".into())),
            Ok(Ok((read_log_id, _applied))) => Ok(read_log_id.map_or(0, |id| id.index)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(hint)))) => return Here::NotLeader(hint),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                Err(ClusterError::NoQuorum(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(ClusterError::Stopped(e.to_string())),
        })
    }

    async fn pass_on(&self, replica: &Replica, mut hop: Hop) -> Result<u64, ClusterError> {
        let message = ReadIndexRequest { cluster: replica.cluster.clone(), hops_left: hop.hops_left };
        let request = replica.request(message, replica.options.request_deadline);
        let reply = hop.client.read_index(request).await.map_err(|s| replica.transport_error(hop.leader, s))?;
        decode_reply(&reply.into_inner().payload)
    }
}

/// Adds `id` at `grpc_addr`: first as a learner (it catches up from the log or a snapshot),
/// then, once caught up, as a voter.
pub(crate) struct AddMember {
    pub id: NodeId,
    pub grpc_addr: String,
}

impl LeaderRequest for AddMember {
    type Reply = ();

    async fn serve_here(&self, replica: &Replica) -> Here<()> {
        match replica.leader_hint() {
            Some(hint) => Here::NotLeader(hint),
            None => Here::Served(self.add(replica).await),
        }
    }

    async fn pass_on(&self, replica: &Replica, mut hop: Hop) -> Result<(), ClusterError> {
        let message = AddMemberRequest {
            cluster: replica.cluster.clone(),
            hops_left: hop.hops_left,
            node_id: self.id,
            grpc_addr: self.grpc_addr.clone(),
        };
        // Catching up a learner can take a while (snapshot transfer).
        let request = replica.request(message, replica.options.catch_up_deadline + replica.options.request_deadline);
        let reply = hop.client.add_member(request).await.map_err(|s| replica.transport_error(hop.leader, s))?;
        decode_reply(&reply.into_inner().payload)
    }
}

impl AddMember {
    async fn add(&self, replica: &Replica) -> Result<(), ClusterError> {
        let (id, grpc_addr) = (self.id, &self.grpc_addr);
        let membership = replica.metrics().membership_config.clone();
        if let Some(existing) = membership.nodes().find(|(nid, _)| **nid == id).map(|(_, n)| n.addr.clone()) {
            if existing != *grpc_addr {
                return Err(ClusterError::Invalid(format!(
                    "node {id} is already a member at {existing}; remove it first to change its address"
                )));
            }
        }
        // Blocking: returns once the learner has caught up (from the log or a snapshot).
        let catch_up = replica.options.catch_up_deadline;
        let until = tokio::time::Instant::now() + catch_up;
        if !membership.nodes().any(|(nid, _)| *nid == id) {
            self.freshen_the_snapshot(replica, until - catch_up / 2).await;
        }
        let node = BasicNode::new(grpc_addr.clone());
        let Ok(added) = tokio::time::timeout_at(until, replica.raft.add_learner(id, node, true)).await else {
            return Err(ClusterError::Invalid(format!(
                "node {id} was added as a learner but has not caught up within {}s (is it running at {grpc_addr}?); \
                 it stays a learner until this request is repeated",
                catch_up.as_secs()
            )));
        };
        added.map_err(membership_error)?;
        let voter = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
        replica.raft.change_membership(voter, false).await.map_err(membership_error)?;
        Ok(())
    }

    /// A new member is sent the latest snapshot (once the log it needs is purged) and then the
    /// log since. When that snapshot is [`ReplicaOptions::stale_snapshot_entries`] or more behind,
    /// the member would spend its join replaying them (at a million runtimes 14 000 entries were
    /// 21 s of a 29 s join), so the leader first brings it up to date, at normal priority: the
    /// build under way if it is recent enough, else a new one. etcd sends a new member its
    /// current state the same way. Gives up (and sends what it has) at `until`.
    ///
    /// [`ReplicaOptions::stale_snapshot_entries`]: super::ReplicaOptions::stale_snapshot_entries
    async fn freshen_the_snapshot(&self, replica: &Replica, until: tokio::time::Instant) {
        let mut metrics = replica.raft.metrics();
        let (applied, mut snapshot) = {
            let now = metrics.borrow_and_update();
            if now.purged.is_none() {
                return; // the member gets the whole log, no snapshot
            }
            (now.last_applied.map_or(0, |id| id.index), now.snapshot)
        };
        let stale = replica.options.stale_snapshot_entries;
        let fresh = |snapshot: Option<LogId>| applied < snapshot.map_or(0, |id| id.index) + stale;
        if fresh(snapshot) {
            return;
        }
        tracing::info!(member = self.id, applied, ?snapshot, "bringing the snapshot up to date for a new member");
        while !fresh(snapshot) {
            if !replica.build_priority.hurry() {
                return; // a build at nice 19 may take minutes on a busy node: no waiting for it
            }
            // Ignored while a build is under way: its end is waited for, and judged, first.
            let _ = replica.raft.trigger().snapshot().await;
            let built = metrics.wait_for(|now| now.snapshot != snapshot);
            snapshot = match tokio::time::timeout_at(until, built).await {
                Ok(Ok(now)) => now.snapshot,
                Ok(Err(_)) => return, // raft is shutting down
                Err(_) => {
                    tracing::warn!(
                        member = self.id,
                        "no fresher snapshot in time; the new member gets the one there is"
                    );
                    return;
                }
            };
        }
    }
}

/// Removes a voter or learner from the cluster.
pub(crate) struct RemoveMember {
    pub id: NodeId,
}

impl LeaderRequest for RemoveMember {
    type Reply = ();

    async fn serve_here(&self, replica: &Replica) -> Here<()> {
        match replica.leader_hint() {
            Some(hint) => Here::NotLeader(hint),
            None => Here::Served(self.remove(replica).await),
        }
    }

    async fn pass_on(&self, replica: &Replica, mut hop: Hop) -> Result<(), ClusterError> {
        let message =
            RemoveMemberRequest { cluster: replica.cluster.clone(), hops_left: hop.hops_left, node_id: self.id };
        let request = replica.request(message, replica.options.request_deadline);
        let reply = hop.client.remove_member(request).await.map_err(|s| replica.transport_error(hop.leader, s))?;
        decode_reply(&reply.into_inner().payload)
    }
}

impl RemoveMember {
    async fn remove(&self, replica: &Replica) -> Result<(), ClusterError> {
        let id = self.id;
        let membership = replica.metrics().membership_config.clone();
        let voters: BTreeSet<NodeId> = membership.membership().voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ClusterError::Invalid(format!(
                    "node {id} is the last voter; a cluster cannot remove its last voter"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if membership.nodes().any(|(nid, _)| *nid == id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(ClusterError::NotFound(format!("node {id} is not a member")));
        };
        replica.raft.change_membership(change, false).await.map_err(membership_error)?;
        Ok(())
    }
}

/// The leader's answer to a request passed on: its result, encoded.
fn decode_reply<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, ClusterError> {
    codec::decode::<Result<T, ClusterError>>("forwarded reply", payload)
        .map_err(|e| ClusterError::Internal(e.to_string()))?
}

fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            ClusterError::NoLeader("leadership moved during the membership change".into())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => ClusterError::Invalid(e.to_string()),
        RaftError::Fatal(e) => ClusterError::Stopped(e.to_string()),
    }
}
