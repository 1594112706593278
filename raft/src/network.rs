//! The client side of raft over gRPC: openraft's [`RaftNetworkFactory`] on tonic channels, plus
//! a record of which peers this node currently reaches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use runtimeai_proto::raft_client::RaftClient;
use runtimeai_proto::{RaftRequest, SnapshotChunk};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::codec;
use crate::limits;
use crate::log_purge::SnapshotSends;
use crate::tls::ClientTls;
use crate::types::{NodeId, SnapshotMeta, TypeConfig, Vote};

/// The parts of a snapshot chunk other than its data, as sent in [`SnapshotChunk::header`].
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotChunkHeader {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub offset: u64,
    pub done: bool,
}

/// A connection to a peer that has delivered nothing for this long is sent an HTTP/2 PING…
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// …and is closed if the answer does not arrive within this; the next call dials a new one.
/// Without it a TCP connection left in retransmission backoff by a lossy spell holds every call
/// on it until its next retransmission (Linux backs off to 120 s), long after the network is
/// fine again: the chaos scenarios `lossy-network` and `stalled-connections` showed followers
/// refusing forwarded writes for 10–20 s with the 5 s + 5 s this had been.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens a lazily connecting channel to a peer's gRPC address (`host:port`): over TLS as a
/// member when `tls` is given (the configuration in force at each connection: replaced
/// certificates are used without a restart), else in plain text.
pub fn channel(addr: &str, tls: Option<Arc<ClientTls>>) -> Result<Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("invalid peer address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        // Idle channels too: a follower's channel to the leader may sit unused between writes,
        // and a dead one should be found before a write needs it.
        .keep_alive_while_idle(true);
    let Some(tls) = tls else { return Ok(endpoint.connect_lazy()) };
    let addr = addr.to_string();
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let (tls, addr) = (tls.clone(), addr.clone());
        async move { crate::tls::connect(&tls, &addr).await.map(hyper_util::rt::TokioIo::new) }
    })))
}

/// Where this node dials each peer. By default a peer is reached at the gRPC address it
/// announced to the cluster (its membership entry); a route overrides that for this node only:
/// a port forward, a NAT, or the fault-injecting proxy of the chaos tests, which puts its own
/// listener between every ordered pair of nodes.
///
/// It also holds how this node proves who it is to them: its member certificate, when the
/// cluster runs with peer TLS.
#[derive(Clone, Default)]
pub struct PeerRoutes {
    routes: HashMap<NodeId, String>,
    tls: Option<Arc<ClientTls>>,
}

impl PeerRoutes {
    pub fn new(routes: impl IntoIterator<Item = (NodeId, String)>, tls: Option<Arc<ClientTls>>) -> PeerRoutes {
        PeerRoutes { routes: routes.into_iter().collect(), tls }
    }

    /// The address to dial `peer` at, given the one it announced.
    pub fn dial<'a>(&'a self, peer: NodeId, announced: &'a str) -> &'a str {
        self.routes.get(&peer).map(String::as_str).unwrap_or(announced)
    }
}

/// One channel per peer, made on first use and dialled where [`PeerRoutes`] says: an HTTP/2
/// connection that tonic dials again when it breaks, shared by every client made from it. A
/// client per call would cost a TCP connection and a mutual TLS handshake on both ends each
/// time. Raft RPCs and the members' own calls (forwarded writes, read indexes) keep a cache each,
/// so that a large AppendEntries never queues a small forwarded write behind it on one TCP
/// stream.
pub struct PeerChannels {
    routes: Arc<PeerRoutes>,
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
}

impl PeerChannels {
    pub fn new(routes: Arc<PeerRoutes>) -> PeerChannels {
        PeerChannels { routes, channels: Mutex::default() }
    }

    /// The channel to `peer` at its announced address `announced` (as routed), and the address
    /// dialled. A peer that moved gets a new channel; its old address is not dialled again.
    pub fn get(&self, peer: NodeId, announced: &str) -> (String, Result<Channel, String>) {
        let dialled = self.routes.dial(peer, announced);
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some((addr, channel)) = channels.get(&peer).filter(|(addr, _)| addr == dialled) {
            return (addr.clone(), Ok(channel.clone()));
        }
        let made = channel(dialled, self.routes.tls.clone());
        if let Ok(channel) = &made {
            channels.insert(peer, (dialled.to_string(), channel.clone()));
        }
        (dialled.to_string(), made)
    }

    /// Each peer with a channel, and the address it dials.
    #[cfg(test)]
    fn dialled(&self) -> Vec<(NodeId, String)> {
        let channels = self.channels.lock().expect("channels lock");
        channels.iter().map(|(peer, (addr, _))| (*peer, addr.clone())).collect()
    }
}

/// What this node last saw of each peer it sends raft RPCs to.
#[derive(Default)]
pub struct PeerHealth {
    peers: Mutex<HashMap<NodeId, PeerContact>>,
}

#[derive(Clone, Default)]
struct PeerContact {
    last_ok: Option<Instant>,
    failing_since: Option<Instant>,
}

impl PeerHealth {
    fn record(&self, peer: NodeId, addr: &str, result: Result<(), &str>) {
        let mut peers = self.peers.lock().expect("peer health lock");
        let contact = peers.entry(peer).or_default();
        match result {
            Ok(()) => {
                if let Some(since) = contact.failing_since.take() {
                    tracing::info!(
                        peer,
                        addr,
                        down_for_ms = since.elapsed().as_millis() as u64,
                        "peer reachable again"
                    );
                }
                contact.last_ok = Some(Instant::now());
            }
            Err(reason) => {
                if contact.failing_since.is_none() {
                    // Logged once per outage: peers that are not up yet are normal at start.
                    tracing::warn!(peer, addr, reason, "peer unreachable; retrying with backoff");
                    contact.failing_since = Some(Instant::now());
                }
            }
        }
    }

    /// Time since the last successful RPC to `peer`, if there ever was one.
    pub fn since_last_contact(&self, peer: NodeId) -> Option<Duration> {
        let peers = self.peers.lock().expect("peer health lock");
        peers.get(&peer).and_then(|c| c.last_ok).map(|t| t.elapsed())
    }

    /// Whether the last RPC to `peer` succeeded and was recent (within `window`).
    pub fn reachable(&self, peer: NodeId, window: Duration) -> bool {
        let peers = self.peers.lock().expect("peer health lock");
        peers.get(&peer).is_some_and(|c| c.failing_since.is_none() && c.last_ok.is_some_and(|t| t.elapsed() <= window))
    }
}

/// Builds the [`PeerClient`]s openraft asks for: one per replication stream, and one per
/// follower for every leadership confirmation (each linearizable read round), all on the
/// peer's one channel ([`PeerChannels`]).
#[derive(Clone)]
pub struct Network {
    cluster: String,
    health: Arc<PeerHealth>,
    channels: Arc<PeerChannels>,
    snapshot_sends: Arc<SnapshotSends>,
}

impl Network {
    pub fn new(cluster: String, health: Arc<PeerHealth>, routes: Arc<PeerRoutes>) -> Network {
        let snapshot_sends = Arc::default();
        Network { cluster, health, channels: Arc::new(PeerChannels::new(routes)), snapshot_sends }
    }

    /// The snapshots this node sends through this network (the log purge holds for them).
    pub fn snapshot_sends(&self) -> Arc<SnapshotSends> {
        self.snapshot_sends.clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let (addr, channel) = self.channels.get(target, &node.addr);
        PeerClient {
            target,
            client: channel.map(|c| RaftClient::new(c).max_decoding_message_size(limits::MAX_MESSAGE_BYTES)),
            addr,
            cluster: self.cluster.clone(),
            health: self.health.clone(),
            snapshot_sends: self.snapshot_sends.clone(),
        }
    }
}

/// Raft RPCs to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    client: Result<RaftClient<Channel>, String>,
    cluster: String,
    health: Arc<PeerHealth>,
    snapshot_sends: Arc<SnapshotSends>,
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, Unreachable> {
        self.client.clone().map_err(|reason| Unreachable::new(&std::io::Error::other(reason)))
    }

    /// A request without a deadline of its own: openraft bounds every RPC with its own
    /// (`hard_ttl`) and drops the call when it passes, which cancels the request. A deadline
    /// here would race it, and when a busy node polls both late this one wins: the slow RPC
    /// then reaches openraft as "unreachable", which backs replication off for half a second
    /// with no heartbeat, long enough for the follower to call an election; as a timeout it is
    /// sent again at once. (Snapshot chunks, which openraft leaves to the transport, keep one.)
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        tonic::Request::new(message)
    }

    /// Turns a transport outcome into openraft's terms, and keeps the peer's health current.
    fn finish<T, E>(
        &self,
        outcome: Result<tonic::Response<runtimeai_proto::RaftReply>, tonic::Status>,
    ) -> RpcResult<T, E>
    where
        T: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let reply = match outcome {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                self.health.record(self.target, &self.addr, Err(status.message()));
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
        };
        self.health.record(self.target, &self.addr, Ok(()));
        let result: Result<T, RaftError<NodeId, E>> =
            codec::decode("raft reply", &reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// For an AppendEntries of `entries` entries that encodes to more than one gRPC message may
/// hold: about how many entries would fit, which openraft sends next. (The log store's reads for
/// replication stay far below the limit: this is the guard should one ever not.)
fn entries_that_fit(entries: usize, payload: usize) -> Option<u64> {
    (payload > limits::MAX_MESSAGE_BYTES && entries > 1)
        .then(|| (entries as u64 * limits::MAX_MESSAGE_BYTES as u64 / payload as u64).max(1))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let payload = codec::encode("append entries", &rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if let Some(fits) = entries_that_fit(rpc.entries.len(), payload.len()) {
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fits)));
        }
        let request = self.request(RaftRequest { cluster: self.cluster.clone(), payload });
        let started = std::time::Instant::now();
        let outcome = self.client()?.append_entries(request).await;
        if !rpc.entries.is_empty() {
            crate::metrics::observe_since(&crate::metrics::stages().replicate, started);
        }
        self.finish(outcome)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let header = SnapshotChunkHeader { vote: rpc.vote, meta: rpc.meta, offset: rpc.offset, done: rpc.done };
        let header = codec::encode("snapshot chunk", &header).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let chunk = SnapshotChunk { cluster: self.cluster.clone(), header, data: rpc.data };
        let mut request = self.request(chunk);
        request.set_timeout(option.hard_ttl());
        let _sending = self.snapshot_sends.start();
        let outcome = self.client()?.install_snapshot(request).await;
        self.finish(outcome)
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, _option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let payload = codec::encode("vote", &rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = self.request(RaftRequest { cluster: self.cluster.clone(), payload });
        let outcome = self.client()?.vote(request).await;
        self.finish(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_too_large_for_one_message_asks_for_fewer_entries() {
        let max = limits::MAX_MESSAGE_BYTES;
        assert_eq!(entries_that_fit(64, max), None);
        assert_eq!(entries_that_fit(64, 2 * max), Some(32));
        assert_eq!(entries_that_fit(3, 100 * max), Some(1), "at least one");
        assert_eq!(entries_that_fit(1, 2 * max), None, "one entry cannot be split");
    }

    #[tokio::test]
    async fn the_clients_openraft_asks_for_share_one_channel_per_peer_and_address() {
        let routes = Arc::new(PeerRoutes::new([(3, "127.0.0.1:9003".to_string())], None));
        let mut network = Network::new("c".into(), Arc::default(), routes);
        let node = |addr: &str| BasicNode { addr: addr.into() };
        // A replication stream, then a leadership confirmation per read round, to the same peer.
        for _ in 0..3 {
            network.new_client(2, &node("127.0.0.1:9002")).await;
        }
        network.new_client(3, &node("10.0.0.3:7100")).await;
        let dialled: Vec<(NodeId, String)> = network.channels.dialled();
        assert_eq!(dialled.len(), 2, "one channel per peer: {dialled:?}");
        assert!(dialled.contains(&(3, "127.0.0.1:9003".to_string())), "dialled as routed: {dialled:?}");
        // A peer that moved gets a channel to its new address, in place of the old one.
        network.new_client(2, &node("127.0.0.1:9102")).await;
        let dialled: Vec<(NodeId, String)> = network.channels.dialled();
        assert_eq!(dialled.len(), 2, "{dialled:?}");
        assert!(dialled.contains(&(2, "127.0.0.1:9102".to_string())), "{dialled:?}");
    }
}
