//! The server side of node-to-node gRPC: raft RPCs into openraft, and the cluster service that
//! executes forwarded requests on (or towards) the leader.

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use runtimeai_proto as pb;
use tonic::{Request, Response, Status};

use crate::codec;
use crate::command::Command;
use crate::error::ClusterError;
use crate::limits;
use crate::network::SnapshotChunkHeader;
use crate::replica::Replica;
use crate::snapshot_file;
use crate::types::{NodeId, TypeConfig};

fn check_cluster(replica: &Replica, cluster: &str) -> Result<(), Status> {
    if cluster != replica.cluster_name() {
        tracing::warn!(theirs = cluster, ours = replica.cluster_name(), "refusing a request from another cluster");
        return Err(Status::failed_precondition(format!(
            "cluster name mismatch: this node belongs to {:?}, the request to {cluster:?}",
            replica.cluster_name()
        )));
    }
    Ok(())
}

/// With peer TLS, who may call: only a member's certificate (checked against the cluster's CA
/// in the handshake) gets past this, and when the request claims to come from a member (a
/// leader's or candidate's vote, a forward's sender) the claim must be the certificate's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerCheck {
    /// Plain-text gRPC (`--insecure`): whoever reaches the port is believed.
    Trusting,
    MutualTls,
}

impl PeerCheck {
    /// The member the caller's certificate names (`None` when trusting); refused without one.
    fn caller<T>(self, request: &Request<T>) -> Result<Option<NodeId>, Status> {
        if self == PeerCheck::Trusting {
            return Ok(None);
        }
        let identity = request.extensions().get::<crate::tls::PeerIdentity>();
        match identity.and_then(|peer| peer.member_id()) {
            Some(member) => Ok(Some(member)),
            None => {
                tracing::warn!(remote = ?identity.map(|p| p.remote), "refusing a peer RPC without a member certificate");
                Err(Status::unauthenticated("a member certificate of this cluster is required"))
            }
        }
    }
}

/// A request's claim to come from member `claimed` must be its certificate's.
fn check_claim(caller: Option<NodeId>, claimed: Option<NodeId>) -> Result<(), Status> {
    match (caller, claimed) {
        (Some(member), Some(claimed)) if member != claimed => {
            tracing::warn!(member, claimed, "refusing a peer RPC that claims another member's id");
            Err(Status::permission_denied(format!(
                "the certificate is member {member}'s; the request claims {claimed}"
            )))
        }
        _ => Ok(()),
    }
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, Status> {
    codec::encode(what, value).map_err(|e| Status::internal(e.to_string()))
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, Status> {
    codec::decode(what, bytes).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// openraft's RPCs, received.
pub struct RaftService {
    replica: Arc<Replica>,
    peers: PeerCheck,
    /// The snapshot being received, checked chunk by chunk.
    transfer: std::sync::Mutex<Option<Transfer>>,
}

/// A snapshot transfer under way: which snapshot, where its next chunk starts, and the checksum
/// of what has arrived.
struct Transfer {
    snapshot_id: String,
    next_offset: u64,
    checksum: snapshot_file::Checksum,
}

impl RaftService {
    pub fn new(replica: Arc<Replica>, peers: PeerCheck) -> pb::raft_server::RaftServer<RaftService> {
        pb::raft_server::RaftServer::new(RaftService { replica, peers, transfer: Default::default() })
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
    }

    /// Follows a snapshot's chunks as they arrive and refuses the last one when the whole does
    /// not match its checksum, before openraft installs it: the leader's send fails and it
    /// sends the snapshot again. (A chunk sent again, or out of order, is left to openraft.)
    fn check_transfer(&self, rpc: &InstallSnapshotRequest<TypeConfig>) -> Result<(), Status> {
        let mut transfer = self.transfer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        follow(&mut transfer, rpc).map_err(|corrupt| {
            tracing::error!(snapshot = %rpc.meta, error = %corrupt, "refusing a corrupt snapshot; the leader will send it again");
            Status::data_loss(format!("snapshot {}: {corrupt}", rpc.meta.snapshot_id))
        })
    }
}

/// Takes one chunk into the transfer under way (a chunk at offset 0 starts one); at the last,
/// whether the whole matches its checksum.
fn follow(
    transfer: &mut Option<Transfer>,
    rpc: &InstallSnapshotRequest<TypeConfig>,
) -> Result<(), snapshot_file::SnapshotFormatError> {
    if rpc.offset == 0 {
        let snapshot_id = rpc.meta.snapshot_id.clone();
        *transfer = Some(Transfer { snapshot_id, next_offset: 0, checksum: Default::default() });
    }
    let Some(under_way) =
        transfer.as_mut().filter(|t| t.snapshot_id == rpc.meta.snapshot_id && t.next_offset == rpc.offset)
    else {
        return Ok(());
    };
    under_way.checksum.update(&rpc.data);
    under_way.next_offset += rpc.data.len() as u64;
    if !rpc.done {
        return Ok(());
    }
    transfer.take().map_or(Ok(()), |done| done.checksum.check())
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let started = std::time::Instant::now();
        let caller = self.peers.caller(&request)?;
        let request = request.into_inner();
        check_cluster(&self.replica, &request.cluster)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode("append entries", &request.payload)?;
        check_claim(caller, rpc.vote.leader_id().voted_for())?;
        self.replica.heard_from_leader();
        let carries_entries = !rpc.entries.is_empty();
        let result = self.replica.raft.append_entries(rpc).await;
        let reply = pb::RaftReply { payload: encode("raft reply", &result)? };
        if carries_entries {
            crate::metrics::observe_since(&crate::metrics::stages().append_served, started);
        }
        Ok(Response::new(reply))
    }

    async fn vote(&self, request: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let caller = self.peers.caller(&request)?;
        let request = request.into_inner();
        check_cluster(&self.replica, &request.cluster)?;
        let rpc: VoteRequest<NodeId> = decode("vote", &request.payload)?;
        check_claim(caller, rpc.vote.leader_id().voted_for())?;
        let result = self.replica.raft.vote(rpc).await;
        Ok(Response::new(pb::RaftReply { payload: encode("raft reply", &result)? }))
    }

    async fn install_snapshot(&self, request: Request<pb::SnapshotChunk>) -> Result<Response<pb::RaftReply>, Status> {
        let caller = self.peers.caller(&request)?;
        let chunk = request.into_inner();
        check_cluster(&self.replica, &chunk.cluster)?;
        let header: SnapshotChunkHeader = decode("snapshot chunk", &chunk.header)?;
        check_claim(caller, header.vote.leader_id().voted_for())?;
        let rpc = InstallSnapshotRequest::<TypeConfig> {
            vote: header.vote,
            meta: header.meta,
            offset: header.offset,
            data: chunk.data,
            done: header.done,
        };
        if rpc.offset == 0 {
            tracing::info!(snapshot = %rpc.meta, bytes = rpc.data.len(), done = rpc.done, "receiving a snapshot: first chunk");
        } else if rpc.done {
            tracing::info!(snapshot = %rpc.meta, offset = rpc.offset, bytes = rpc.data.len(), "receiving the last chunk of a snapshot");
        } else {
            tracing::debug!(snapshot = %rpc.meta, offset = rpc.offset, bytes = rpc.data.len(), "receiving a snapshot chunk");
        }
        self.check_transfer(&rpc)?;
        let result = self.replica.raft.install_snapshot(rpc).await;
        Ok(Response::new(pb::RaftReply { payload: encode("raft reply", &result)? }))
    }
}

/// Requests served by (or passed on towards) the leader.
pub struct ClusterService {
    replica: Arc<Replica>,
    peers: PeerCheck,
}

impl ClusterService {
    pub fn new(replica: Arc<Replica>, peers: PeerCheck) -> pb::cluster_server::ClusterServer<ClusterService> {
        pb::cluster_server::ClusterServer::new(ClusterService { replica, peers })
            .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    type OnHostStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::HostChunk, Status>> + Send>>;

    async fn on_host(&self, request: Request<pb::HostRequest>) -> Result<Response<Self::OnHostStream>, Status> {
        let caller = self.peers.caller(&request)?;
        let request = request.into_inner();
        check_claim(caller, Some(request.from))?;
        check_cluster(&self.replica, &request.cluster)?;
        let host =
            self.replica.host_calls().ok_or_else(|| Status::unavailable("this node serves no host calls yet"))?;
        let output = host.call(request.payload).await.map_err(Status::failed_precondition)?;
        let chunks = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(output), |payload| {
            Ok(pb::HostChunk { payload })
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn forward(&self, request: Request<pb::ForwardRequest>) -> Result<Response<pb::ForwardReply>, Status> {
        let caller = self.peers.caller(&request)?;
        let request = request.into_inner();
        check_claim(caller, Some(request.from))?;
        check_cluster(&self.replica, &request.cluster)?;
        let command: Command = decode("command", &request.command)?;
        let result = self.replica.propose_sized(command, request.command.len(), request.hops_left).await;
        Ok(Response::new(pb::ForwardReply { payload: encode("forwarded reply", &result)? }))
    }

    async fn read_index(&self, request: Request<pb::ReadIndexRequest>) -> Result<Response<pb::ReadIndexReply>, Status> {
        self.peers.caller(&request)?;
        let request = request.into_inner();
        check_cluster(&self.replica, &request.cluster)?;
        let result: Result<u64, ClusterError> = self.replica.read_index(request.hops_left).await;
        Ok(Response::new(pb::ReadIndexReply { payload: encode("read index", &result)? }))
    }

    async fn add_member(&self, request: Request<pb::AddMemberRequest>) -> Result<Response<pb::AdminReply>, Status> {
        self.peers.caller(&request)?;
        let request = request.into_inner();
        check_cluster(&self.replica, &request.cluster)?;
        let replica = self.replica.clone();
        // Run to completion even if the caller goes away: a half-done change helps nobody.
        let result = tokio::spawn(async move {
            replica.add_member_with_hops(request.node_id, request.grpc_addr, request.hops_left).await
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::AdminReply { payload: encode("admin reply", &result)? }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        self.peers.caller(&request)?;
        let request = request.into_inner();
        check_cluster(&self.replica, &request.cluster)?;
        let replica = self.replica.clone();
        let result =
            tokio::spawn(async move { replica.remove_member_with_hops(request.node_id, request.hops_left).await })
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::AdminReply { payload: encode("admin reply", &result)? }))
    }

    async fn peer_status(
        &self,
        request: Request<pb::PeerStatusRequest>,
    ) -> Result<Response<pb::PeerStatusReply>, Status> {
        self.peers.caller(&request)?;
        let request = request.into_inner();
        check_cluster(&self.replica, &request.cluster)?;
        let peers = self
            .replica
            .peer_contacts()
            .into_iter()
            .map(|(node_id, reachable, since)| pb::PeerStatus {
                node_id,
                reachable,
                last_contact_ms: since.map(|d| d.as_millis() as u64),
            })
            .collect();
        let last_log_index = self.replica.metrics().last_log_index;
        Ok(Response::new(pb::PeerStatusReply { leader_id: self.replica.id, peers, last_log_index }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::SnapshotMeta;

    fn chunks(bytes: &[u8], size: usize) -> Vec<InstallSnapshotRequest<TypeConfig>> {
        let meta = SnapshotMeta { snapshot_id: "1-9".into(), ..Default::default() };
        let count = bytes.len().div_ceil(size);
        (0..count)
            .map(|i| InstallSnapshotRequest {
                vote: Default::default(),
                meta: meta.clone(),
                offset: (i * size) as u64,
                data: bytes[i * size..((i + 1) * size).min(bytes.len())].to_vec(),
                done: i + 1 == count,
            })
            .collect()
    }

    #[test]
    fn a_transfer_is_checked_chunk_by_chunk_and_a_chunk_sent_again_counts_once() {
        let mut bytes = b"any snapshot bytes".to_vec();
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let mut transfer = None;
        let sent = chunks(&bytes, 5);
        for (i, chunk) in sent.iter().enumerate() {
            follow(&mut transfer, chunk).unwrap();
            if i == 1 {
                follow(&mut transfer, chunk).expect("the same chunk again changes nothing");
            }
        }
        assert!(transfer.is_none(), "done");
        let mut flipped = bytes.clone();
        flipped[7] ^= 0x04;
        let results: Vec<_> = chunks(&flipped, 5).iter().map(|chunk| follow(&mut transfer, chunk)).collect();
        let last = results.last().unwrap();
        assert!(matches!(last, Err(snapshot_file::SnapshotFormatError::Checksum { .. })), "{last:?}");
        assert!(results[..results.len() - 1].iter().all(Result::is_ok), "refused at the last chunk");
    }
}
