//! The network between nodes, under the harness's control: one TCP proxy per ordered pair of
//! nodes (node `from` dials node `to` through it, by `--peer-routes`), as etcd's robustness
//! tests put a proxy in front of every member. No root is needed.
//!
//! A proxy moves bytes in two directions: forward (from the dialling node to the dialled one)
//! and backward (the answers). Each direction can be
//! - **cut**: bytes are held back, not delivered, until the direction heals — what a partition
//!   does to a TCP stream (segments are retransmitted until they get through or an endpoint's
//!   own timeout gives up on the connection);
//! - **lossy**: each chunk is lost with probability `loss` and retransmitted after a
//!   retransmission timeout that doubles with each loss of the same chunk (200 ms, 400 ms, ...),
//!   as TCP recovers from dropped segments; the stream stays intact and in order;
//! - **delayed**: each chunk is held `delay ± jitter`, order kept.
//!
//! One-way faults cut one direction of a pair's traffic: "`a` cannot reach `b`" cuts the
//! forward direction of `a → b` and the backward direction of `b → a`.
//!
//! Apart from faults of links, the connections open at one moment can be **stalled**: they
//! deliver nothing more, in either direction, until an endpoint closes them, while connections
//! opened later work. That is what a TCP connection left deep in retransmission backoff by a bad
//! spell looks like once the network is fine again (Linux backs off to 120 s between
//! retransmissions and gives up only after ~15 minutes): only a new connection gets through.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// What happens to the bytes of one direction of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DirectionFaults {
    /// Nothing gets through until healed.
    pub cut: bool,
    /// Probability that a chunk is lost (and retransmitted later).
    pub loss: f64,
    /// Added latency per chunk, and its uniform jitter (± this much).
    pub delay: Duration,
    pub jitter: Duration,
}

impl DirectionFaults {
    pub fn is_clear(&self) -> bool {
        *self == DirectionFaults::default()
    }
}

/// Both directions of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LinkFaults {
    pub forward: DirectionFaults,
    pub backward: DirectionFaults,
}

/// The first retransmission timeout after a lost chunk (Linux's minimum RTO).
const FIRST_RETRANSMISSION: Duration = Duration::from_millis(200);
/// The longest retransmission timeout (doubling stops here).
const MAX_RETRANSMISSION: Duration = Duration::from_secs(3);

/// One proxy: listens on a loopback port and forwards to a node's gRPC address.
struct LinkProxy {
    listen: SocketAddr,
    faults: watch::Sender<LinkFaults>,
    /// Connections are numbered from 1 as they are accepted; this many have been.
    accepted: Arc<AtomicU64>,
    /// Connections numbered up to this one are stalled (see the module's documentation).
    stalled_through: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

/// What one proxied connection obeys: its link's faults, and whether it has been stalled.
#[derive(Clone)]
struct ConnectionFaults {
    link: watch::Receiver<LinkFaults>,
    stalled_through: watch::Receiver<u64>,
    number: u64,
}

impl ConnectionFaults {
    fn stalled(&self) -> bool {
        *self.stalled_through.borrow() >= self.number
    }
}

impl LinkProxy {
    async fn start(listen: SocketAddr, target: SocketAddr, seed: u64) -> Result<LinkProxy> {
        let listener = TcpListener::bind(listen).await.map_err(Error::io(format!("proxy listen on {listen}")))?;
        let listen = listener.local_addr().map_err(Error::io("proxy address"))?;
        let (faults, link) = watch::channel(LinkFaults::default());
        let (stalled_through, stalls) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let faults = ConnectionFaults { link: link.clone(), stalled_through: stalls.clone(), number };
                let seed = seed ^ number.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                tokio::spawn(async move {
                    // A node that is down refuses; so does its proxy (the dialler sees a reset).
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    let forward = pump(in_read, out_write, faults.clone(), |f| f.forward, seed);
                    let backward = pump(out_read, in_write, faults, |f| f.backward, seed.rotate_left(17));
                    // When either side closes, the whole connection goes.
                    tokio::select! { _ = forward => {}, _ = backward => {} }
                });
            }
        });
        Ok(LinkProxy { listen, faults, accepted, stalled_through, task })
    }

    /// Stalls every connection accepted so far.
    fn stall_open_connections(&self) {
        self.stalled_through.send_replace(self.accepted.load(Ordering::SeqCst));
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction of a connection, applying that direction's faults: a reader stamps each
/// chunk with the time it may be delivered, a writer delivers chunks in order at those times.
/// A stalled connection's bytes go nowhere (the stream never resumes, so holding them would be
/// the same), and it still ends when its sender closes it.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    connection: ConnectionFaults,
    direction: fn(&LinkFaults) -> DirectionFaults,
    seed: u64,
) {
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let faults = connection.link.clone();
    let mut cut_watch = faults.clone();
    let writer_sees = connection.clone();
    let reader = async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut last_release = Instant::now();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if connection.stalled() {
                continue;
            }
            let now = Instant::now();
            let f = direction(&faults.borrow());
            let mut hold = f.delay;
            if !f.jitter.is_zero() {
                let jitter = rng.gen_range(0..=2 * f.jitter.as_micros() as u64);
                hold = (hold + Duration::from_micros(jitter)).saturating_sub(f.jitter);
            }
            let mut timeout = FIRST_RETRANSMISSION;
            while f.loss > 0.0 && rng.gen_bool(f.loss.min(0.99)) {
                hold += timeout;
                timeout = (timeout * 2).min(MAX_RETRANSMISSION);
            }
            // TCP delivers in order: a chunk is never released before the one ahead of it.
            let release = (now + hold).max(last_release);
            last_release = release;
            if chunks.send((release, buffer[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((release, chunk)) = due.recv().await {
            tokio::time::sleep_until(release).await;
            // A cut direction holds everything back until it heals.
            if cut_watch.wait_for(|f| !direction(f).cut).await.is_err() {
                return;
            }
            if writer_sees.stalled() {
                continue;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Every link between the nodes of a cluster.
pub struct Network {
    /// (from, to) → the proxy `from` dials `to` through.
    links: BTreeMap<(u64, u64), LinkProxy>,
    /// What is in force now, for the report.
    state: Mutex<BTreeMap<(u64, u64), LinkFaults>>,
}

impl Network {
    /// Starts one proxy per ordered pair of `nodes` (id → gRPC address), listening on the
    /// addresses `listen` hands out.
    pub async fn start(
        nodes: &BTreeMap<u64, SocketAddr>,
        mut listen: impl FnMut() -> SocketAddr,
        seed: u64,
    ) -> Result<Network> {
        let mut links = BTreeMap::new();
        for &from in nodes.keys() {
            for (&to, &target) in nodes {
                if from != to {
                    let link_seed = seed ^ (from << 32 | to);
                    links.insert((from, to), LinkProxy::start(listen(), target, link_seed).await?);
                }
            }
        }
        Ok(Network { links, state: Mutex::new(BTreeMap::new()) })
    }

    /// The `--peer-routes` value for node `from`: every peer through its proxy.
    pub fn routes_of(&self, from: u64) -> String {
        self.links
            .iter()
            .filter(|((f, _), _)| *f == from)
            .map(|((_, to), proxy)| format!("{to}={}", proxy.listen))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn set(&self, from: u64, to: u64, faults: LinkFaults) {
        if let Some(proxy) = self.links.get(&(from, to)) {
            proxy.faults.send_replace(faults);
            let mut state = self.state.lock().expect("network state");
            if faults == LinkFaults::default() {
                state.remove(&(from, to));
            } else {
                state.insert((from, to), faults);
            }
        }
    }

    fn update(&self, from: u64, to: u64, change: impl FnOnce(&mut LinkFaults)) {
        let mut faults = self.links.get(&(from, to)).map(|p| *p.faults.borrow()).unwrap_or_default();
        change(&mut faults);
        self.set(from, to, faults);
    }

    fn nodes(&self) -> Vec<u64> {
        let mut nodes: Vec<u64> = self.links.keys().map(|(from, _)| *from).collect();
        nodes.dedup();
        nodes
    }

    /// Traffic from `a` to `b` no longer arrives (the reverse still does).
    pub fn cut_one_way(&self, a: u64, b: u64) {
        self.update(a, b, |f| f.forward.cut = true);
        self.update(b, a, |f| f.backward.cut = true);
    }

    /// Nodes in different groups no longer reach each other; nodes in no group keep every link.
    pub fn partition(&self, groups: &[Vec<u64>]) {
        let group_of = |node: u64| groups.iter().position(|g| g.contains(&node));
        for a in self.nodes() {
            for b in self.nodes() {
                if a != b && group_of(a).is_some() && group_of(b).is_some() && group_of(a) != group_of(b) {
                    self.cut_one_way(a, b);
                }
            }
        }
    }

    /// Every direction of every link gets `faults` (loss, delay) on top of what it has.
    pub fn degrade_all(&self, faults: DirectionFaults) {
        for (from, to) in self.links.keys().copied().collect::<Vec<_>>() {
            self.update(from, to, |f| {
                for direction in [&mut f.forward, &mut f.backward] {
                    direction.loss = faults.loss;
                    direction.delay = faults.delay;
                    direction.jitter = faults.jitter;
                }
            });
        }
    }

    /// Every link back to normal.
    pub fn heal(&self) {
        for (from, to) in self.links.keys().copied().collect::<Vec<_>>() {
            self.set(from, to, LinkFaults::default());
        }
    }

    /// Every connection open now from another node to `to` delivers nothing more until an
    /// endpoint closes it; links stay healthy, so connections opened from now on work.
    pub fn stall_open_connections_to(&self, to: u64) {
        for ((_, dialled), proxy) in &self.links {
            if *dialled == to {
                proxy.stall_open_connections();
            }
        }
    }

    /// The faults in force, link by link (`"1->2"` → faults).
    pub fn faults(&self) -> BTreeMap<String, LinkFaults> {
        let state = self.state.lock().expect("network state");
        state.iter().map(|((from, to), faults)| (format!("{from}->{to}"), *faults)).collect()
    }
}

/// Shared handle, as scenarios hold it.
pub type SharedNetwork = Arc<Network>;

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server and a network of one link (1 → 2) in front of it.
    async fn echo_link() -> (Network, SocketAddr) {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = server.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let mut nodes = BTreeMap::new();
        nodes.insert(1, "127.0.0.1:1".parse().unwrap());
        nodes.insert(2, target);
        // Port 0: each proxy's listener picks its own free port and keeps it, so no other
        // process can take it between picking and binding.
        let network = Network::start(&nodes, || "127.0.0.1:0".parse().unwrap(), 7).await.unwrap();
        let route = network.routes_of(1);
        let addr = route.strip_prefix("2=").unwrap().parse().unwrap();
        (network, addr)
    }

    /// The most a loopback round trip through a healthy proxy may take. Generous: a loaded
    /// machine may not run the proxy's tasks for a while; only the lower bounds measure faults.
    const HEALTHY: Duration = Duration::from_secs(2);

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> Duration {
        let started = Instant::now();
        stream.write_all(text).await.unwrap();
        let mut got = vec![0u8; text.len()];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, text, "the stream arrives intact and in order");
        started.elapsed()
    }

    #[tokio::test]
    async fn a_cut_holds_bytes_back_until_it_heals_and_the_stream_stays_intact() {
        let (network, addr) = echo_link().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(round_trip(&mut stream, b"before").await < HEALTHY);
        network.cut_one_way(1, 2);
        assert_eq!(network.faults().len(), 2, "{:?}", network.faults());
        stream.write_all(b"during").await.unwrap();
        let mut got = [0u8; 6];
        let early = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut got)).await;
        assert!(early.is_err(), "nothing gets through a cut");
        network.heal();
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"during");
        assert!(network.faults().is_empty());
    }

    #[tokio::test]
    async fn delay_and_loss_slow_chunks_down_in_order() {
        let (network, addr) = echo_link().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        network.degrade_all(DirectionFaults {
            delay: Duration::from_millis(60),
            jitter: Duration::from_millis(20),
            ..Default::default()
        });
        let took = round_trip(&mut stream, b"slow").await;
        // Both directions: at least 2 × (60 − 20) ms.
        assert!(took >= Duration::from_millis(80), "{took:?}");
        network.degrade_all(DirectionFaults { loss: 0.5, ..Default::default() });
        let mut slowest = Duration::ZERO;
        for i in 0..5u8 {
            slowest = slowest.max(round_trip(&mut stream, &[b'a' + i; 3]).await);
        }
        assert!(slowest >= FIRST_RETRANSMISSION, "a 50 % lossy link retransmits: {slowest:?}");
        network.heal();
        assert!(round_trip(&mut stream, b"fast").await < HEALTHY);
    }

    #[tokio::test]
    async fn a_stalled_connection_delivers_nothing_more_while_new_connections_work() {
        let (network, addr) = echo_link().await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        assert!(round_trip(&mut stalled, b"before").await < HEALTHY);
        network.stall_open_connections_to(2);
        stalled.write_all(b"during").await.unwrap();
        let mut got = [0u8; 6];
        let answer = tokio::time::timeout(Duration::from_millis(500), stalled.read_exact(&mut got)).await;
        assert!(answer.is_err(), "a stalled connection delivers nothing: {answer:?}");
        assert!(network.faults().is_empty(), "the links themselves are healthy");
        let mut fresh = TcpStream::connect(addr).await.unwrap();
        assert!(round_trip(&mut fresh, b"after").await < HEALTHY);
        network.heal();
        let late = tokio::time::timeout(Duration::from_millis(300), stalled.read_exact(&mut got)).await;
        assert!(late.is_err(), "healing the links does not revive a stalled connection: {late:?}");
    }

    #[tokio::test]
    async fn partitions_cut_only_links_between_groups() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let nodes: BTreeMap<u64, SocketAddr> = (1..=3).map(|id| (id, target)).collect();
        let network = Network::start(&nodes, || "127.0.0.1:0".parse().unwrap(), 1).await;
        // Port 0 proxies bind fine; only the fault table matters here.
        let network = network.unwrap();
        network.partition(&[vec![1], vec![2]]);
        let faults = network.faults();
        assert!(faults["1->2"].forward.cut && faults["1->2"].backward.cut, "{faults:?}");
        assert!(faults["2->1"].forward.cut && faults["2->1"].backward.cut);
        assert!(!faults.contains_key("1->3") && !faults.contains_key("3->2"), "node 3 is in no group: a bridge");
    }
}
