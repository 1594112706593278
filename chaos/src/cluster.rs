//! Real `runtimeai` processes on loopback: each cluster gets a temporary directory and free
//! ports, is talked to over HTTP, and its nodes are killed with real signals. Optionally every
//! link between nodes runs through the harness's proxies ([`crate::proxy`]) and every node's
//! data directory sits on a disk the harness can fill ([`crate::disk`]).
//!
//! The binary is found through `RUNTIMEAI_BIN`, or next to the running executable in cargo's
//! target directory (build it first: `cargo build --bin runtimeai`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::disk::IsolatedDisk;
use crate::error::{Error, Result};
use crate::proxy::Network;

/// The `runtimeai` executable under test.
///
/// # Panics
/// When it cannot be found (see [`find_binary`] for the fallible form).
pub fn binary() -> PathBuf {
    find_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// `RUNTIMEAI_BIN`, else `runtimeai` next to this executable (for `runtimeai-chaos`) or one
/// directory up (for a test binary in `target/<profile>/deps`).
pub fn find_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("RUNTIMEAI_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(Error::io("locate this executable"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    [dir.join("runtimeai"), dir.parent().unwrap_or(dir).join("runtimeai")]
        .into_iter()
        .find(|path| path.exists())
        .ok_or_else(|| {
            Error::Cluster(format!(
                "runtimeai binary not found near {}; run `cargo build --bin runtimeai` or set RUNTIMEAI_BIN",
                exe.display()
            ))
        })
}

/// Ports the harness hands out lie below Linux's ephemeral range (32768–60999 by default), so a
/// killed node's port is never taken by some client's outgoing connection before the node comes
/// back on it; and no port is handed out twice in one test process.
const HARNESS_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// The first of `count` consecutive ports on 127.0.0.1 that are free now and were never handed
/// out before in this process.
pub fn free_port_range(count: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = HARNESS_PORTS.end - HARNESS_PORTS.start;
    // Start where another test process (another binary) is unlikely to be.
    let _ = NEXT.compare_exchange(0, (std::process::id() % span as u32) as u16 + 1, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let offset = NEXT.fetch_add(count, Ordering::SeqCst) % span;
        let base = HARNESS_PORTS.start + offset;
        if base + count > HARNESS_PORTS.end {
            continue;
        }
        let held: Vec<_> = (0..count).filter_map(|i| TcpListener::bind(("127.0.0.1", base + i)).ok()).collect();
        if held.len() == count as usize {
            return base;
        }
    }
    panic!("no {count} consecutive free ports in {HARNESS_PORTS:?}");
}

/// A free TCP port on 127.0.0.1 (see [`free_port_range`]).
pub fn free_port() -> u16 {
    free_port_range(1)
}

/// A response as tests look at it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Status, headers and the JSON body (`null` when there is none, a string when not JSON).
    async fn read(response: reqwest::Response) -> Result<Response> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        let body =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Ok(Response { status, headers, body })
    }
}

/// Options every node of a cluster gets.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `runtimeai node` flags, e.g. `["--snapshot-count", "20"]`. Without a
    /// `--backends` among them, nodes get [`TEST_BACKENDS`] (sandboxes simulated where they cannot run).
    pub extra_args: Vec<String>,
    /// Route every link between founding members through a proxy the harness controls
    /// ([`Cluster::network`]); the seed drives its random losses and delays.
    pub proxied: Option<u64>,
    /// Give every node a data directory on a tmpfs of this many bytes that the harness can
    /// fill or remount read-only ([`Cluster::disk`]).
    pub isolated_disk_bytes: Option<u64>,
    /// Run the nodes `--insecure`: plain HTTP and gRPC, no certificates (the benchmark's
    /// baseline for what TLS costs). Off: TLS on both ports, as in production.
    pub plaintext: bool,
}

const RATE_LIMITS_OFF: [&str; 4] = ["--rate-limit-principal", "0", "--rate-limit-address", "0"];

/// The drivers test nodes use unless a test names its own: libvirt's built-in test hypervisor
/// for VMs, containers under crun for sandboxes and agents, the simulated driver for vClusters.
pub const TEST_BACKENDS: &str = "vm=libvirt:test:///default,sandbox=process,agent_runtime=process,vcluster=simulated";
/// [`TEST_BACKENDS`] where sandboxes cannot run (not root, no crun): simulated sandboxes.
const TEST_BACKENDS_WITHOUT_SANDBOXES: &str =
    "vm=libvirt:test:///default,sandbox=simulated,agent_runtime=simulated,vcluster=simulated";

/// The test backends this machine can run.
fn test_backends() -> &'static str {
    let sandboxes = nix::unistd::geteuid().is_root() && Path::new("/usr/bin/crun").exists();
    if sandboxes {
        TEST_BACKENDS
    } else {
        TEST_BACKENDS_WITHOUT_SANDBOXES
    }
}

pub struct Node {
    pub id: u64,
    pub http: String,
    pub grpc: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    initial_cluster: Option<String>,
    peer_routes: Option<String>,
    disk: Option<IsolatedDisk>,
    /// Whether it serves TLS (with its member certificate) or runs `--insecure`.
    tls: bool,
}

impl Node {
    /// `https://host:port` (a certificate of the harness's CA), or `http://` for a cluster
    /// started [`ClusterOptions::plaintext`].
    pub fn base_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.http)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Whether `args` give `flag` (as `--flag value` or `--flag=value`).
pub(crate) fn gives(args: &[String], flag: &str) -> bool {
    args.iter().any(|arg| arg == flag || arg.strip_prefix(flag).is_some_and(|rest| rest.starts_with('=')))
}

/// Whether process `pid`, a child of ours, has exited (a zombie until it is waited for).
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// The API key of the first admin of every cluster this process starts (given to each node
/// with `--bootstrap-admin-key-file`): random per process, so one client serves every cluster.
pub fn admin_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let secret: String = (0..4).map(|_| format!("{:016x}", rand::random::<u64>())).collect();
        format!("rai_harness_{secret}")
    })
}

/// The CA every cluster of this process gets its certificates from (made once per process with
/// `runtimeai certs ca`, in a directory of its own under the system's temporary directory).
pub fn harness_ca() -> Result<&'static Path> {
    static CA: std::sync::OnceLock<std::result::Result<PathBuf, String>> = std::sync::OnceLock::new();
    let made = CA.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("runtimeai-harness-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        certs(&["ca", "--dir", &dir.display().to_string()])?;
        Ok(dir)
    });
    made.as_deref().map_err(|e| Error::Cluster(e.clone()))
}

/// Runs `runtimeai certs <args>`.
pub(crate) fn certs(args: &[&str]) -> std::result::Result<(), String> {
    let binary = find_binary().map_err(|e| e.to_string())?;
    let output = Command::new(binary).arg("certs").args(args).output().map_err(|e| format!("runtimeai certs: {e}"))?;
    if !output.status.success() {
        return Err(format!("runtimeai certs {args:?}: {}", String::from_utf8_lossy(&output.stderr)));
    }
    Ok(())
}

/// Sends `request` with `headers` and `body` (as JSON), and reads the answer.
async fn send(
    mut request: reqwest::RequestBuilder,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> Result<Response> {
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    Response::read(request.send().await?).await
}

/// The TLS flags of node `id` of the cluster in `dir`: its member certificate on both ports,
/// and client certificates of the harness's CA taken on the REST port.
fn tls_args(dir: &Path, id: u64) -> Result<Vec<String>> {
    let cert = dir.join("certs").join(format!("node-{id}.pem")).display().to_string();
    let key = dir.join("certs").join(format!("node-{id}-key.pem")).display().to_string();
    let ca = harness_ca()?.join("ca.pem").display().to_string();
    let flags = ["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca];
    Ok(flags
        .into_iter()
        .chain(["--peer-cert", &cert, "--peer-key", &key, "--peer-ca", &ca])
        .map(str::to_string)
        .collect())
}

/// A client builder that trusts the harness's CA: for requests of anyone, credentials apart.
pub fn client_builder() -> Result<reqwest::ClientBuilder> {
    let pem = std::fs::read(harness_ca()?.join("ca.pem")).map_err(Error::io("read the harness CA"))?;
    let ca = reqwest::Certificate::from_pem(&pem)?;
    Ok(reqwest::Client::builder().add_root_certificate(ca).tls_built_in_root_certs(false))
}

/// A client builder that trusts the harness's CA and authenticates as the clusters' admin.
pub fn admin_client_builder() -> Result<reqwest::ClientBuilder> {
    Ok(client_builder()?.default_headers(admin_headers()))
}

/// The SDK's configuration for `servers` (none yet: fill them in), trusting the harness's CA
/// and authenticating as the clusters' first admin; each call may take `timeout`.
pub fn admin_client_config(servers: Vec<String>, timeout: Duration) -> Result<runtimeai_client::ClientConfig> {
    let pem = std::fs::read(harness_ca()?.join("ca.pem")).map_err(Error::io("read the harness CA"))?;
    Ok(runtimeai_client::ClientConfig {
        servers,
        token: Some(admin_token().to_string()),
        ca_pem: Some(pem),
        tenant: None,
        timeout: Some(timeout),
    })
}

/// An SDK client of the one member at `url`, from `config` (made by [`admin_client_config`]):
/// no failover, so each call goes to the member it is sent to.
pub fn member_client(config: &runtimeai_client::ClientConfig, url: &str) -> Result<runtimeai_client::Client> {
    let config = runtimeai_client::ClientConfig { servers: vec![url.to_string()], ..config.clone() };
    runtimeai_client::Client::new(config).map_err(|e| Error::Cluster(e.to_string()))
}

/// Default headers that authenticate a client as the clusters' first admin.
pub fn admin_headers() -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", admin_token())).expect("ASCII token");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    headers
}

/// A cluster of real processes. Dropping it kills them all.
///
/// Its [`Cluster::client`] authenticates as the admin; [`Cluster::call_as`] as anyone else.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Node>,
    pub options: ClusterOptions,
    pub client: reqwest::Client,
    /// A client that trusts the harness's CA and sends no credentials of its own.
    anonymous: reqwest::Client,
    /// The proxies between founding members, when the cluster was started `proxied`.
    pub network: Option<Arc<Network>>,
}

impl Cluster {
    /// Starts `size` founding members and waits until every one is ready.
    pub async fn start(size: u64, options: ClusterOptions) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("runtimeai-it-")
            .tempdir()
            .map_err(Error::io("create a temporary directory"))?;
        let client = admin_client_builder()?.timeout(Duration::from_secs(15)).build()?;
        let anonymous = client_builder()?.timeout(Duration::from_secs(15)).build()?;
        std::fs::write(dir.path().join("admin.key"), admin_token()).map_err(Error::io("write the admin key"))?;
        let mut cluster = Cluster { dir, nodes: BTreeMap::new(), options, client, anonymous, network: None };
        let mut initial = Vec::new();
        for id in 1..=size {
            let node = cluster.new_node(id)?;
            initial.push(format!("{id}={}", node.grpc));
            cluster.nodes.insert(id, node);
        }
        if let Some(seed) = cluster.options.proxied {
            let targets: BTreeMap<u64, SocketAddr> =
                cluster.nodes.iter().map(|(id, node)| (*id, node.grpc.parse().expect("harness address"))).collect();
            // Port 0: each proxy binds a port the kernel picks and holds it, so nothing can take
            // it between picking and binding (nodes' ports cannot be held: their process binds).
            let network = Network::start(&targets, || SocketAddr::from(([127, 0, 0, 1], 0)), seed).await?;
            for (id, node) in cluster.nodes.iter_mut() {
                node.peer_routes = Some(network.routes_of(*id));
            }
            cluster.network = Some(Arc::new(network));
        }
        let initial = initial.join(",");
        for id in 1..=size {
            cluster.nodes.get_mut(&id).expect("node").initial_cluster = Some(initial.clone());
            cluster.spawn(id)?;
        }
        for id in 1..=size {
            cluster.wait_ready(id, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    fn new_node(&self, id: u64) -> Result<Node> {
        let data_dir = self.dir.path().join(format!("node-{id}"));
        // Its member certificate, for both ports, from the harness's CA.
        let tls = !self.options.plaintext;
        if tls {
            let ca = harness_ca()?.display().to_string();
            let out = self.dir.path().join("certs").display().to_string();
            certs(&["node", "--dir", &ca, "--out", &out, "--id", &id.to_string(), "--hosts", "127.0.0.1,localhost"])
                .map_err(Error::Cluster)?;
        }
        let disk = match self.options.isolated_disk_bytes {
            Some(bytes) => Some(IsolatedDisk::mount(&data_dir, bytes)?),
            None => None,
        };
        Ok(Node {
            id,
            http: format!("127.0.0.1:{}", free_port()),
            grpc: format!("127.0.0.1:{}", free_port()),
            data_dir,
            log: self.dir.path().join(format!("node-{id}.log")),
            child: None,
            initial_cluster: None,
            peer_routes: None,
            disk,
            tls,
        })
    }

    /// Adds a node process that is not (yet) a member: it waits to be added. It is reached
    /// directly, not through the proxies.
    pub fn start_joiner(&mut self, id: u64) -> Result<()> {
        let node = self.new_node(id)?;
        self.nodes.insert(id, node);
        self.spawn(id)
    }

    /// The disk under node `id`'s data directory, when the cluster has isolated disks.
    pub fn disk(&self, id: u64) -> Option<&IsolatedDisk> {
        self.nodes.get(&id).and_then(|n| n.disk.as_ref())
    }

    /// Starts (or restarts) node `id`'s process.
    pub fn spawn(&mut self, id: u64) -> Result<()> {
        let extra = self.options.extra_args.clone();
        let binary = find_binary()?;
        let node = self.nodes.get_mut(&id).ok_or_else(|| Error::Cluster(format!("no node {id}")))?;
        if node.child.is_some() {
            return Err(Error::Cluster(format!("node {id} is already running")));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(Error::io(format!("open {}", node.log.display())))?;
        let mut command = match &node.disk {
            Some(disk) => disk.command(&binary),
            None => Command::new(&binary),
        };
        command
            .arg("node")
            .args(["--id", &id.to_string(), "--http", &node.http, "--grpc", &node.grpc])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--bootstrap-admin-key-file")
            .arg(self.dir.path().join("admin.key"))
            .args(if node.tls { tls_args(self.dir.path(), id)? } else { vec!["--insecure".to_string()] })
            .args(&extra)
            .args(if gives(&extra, "--backends") { vec![] } else { vec!["--backends", test_backends()] })
            // Rate limits off unless asked for: tests and benchmarks send from one address, as
            // one admin, faster than a client should (`tests/it/load.rs` tests the limits).
            .args(if extra.iter().any(|a| a.starts_with("--rate-limit")) { vec![] } else { RATE_LIMITS_OFF.to_vec() })
            .env("RUST_LOG", "info,openraft=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(initial) = &node.initial_cluster {
            command.args(["--initial-cluster", initial]);
        }
        if let Some(routes) = &node.peer_routes {
            command.args(["--peer-routes", routes]);
        }
        node.child = Some(command.spawn().map_err(Error::io(format!("start node {id}")))?);
        Ok(())
    }

    /// Whether node `id`'s process has exited on its own, and with which status.
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let node = self.nodes.get_mut(&id)?;
        let status = node.child.as_mut()?.try_wait().ok()??;
        node.child = None;
        Some(status)
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Sends `signal` to node `id`'s process (SIGSTOP pauses it, SIGCONT resumes it).
    pub fn signal(&self, id: u64, signal: nix::sys::signal::Signal) {
        if let Some(child) = self.nodes.get(&id).and_then(|n| n.child.as_ref()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
        }
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes.get(&id).unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes.values().filter(|n| n.is_running()).map(|n| n.id).collect()
    }

    /// Waits until `GET /readyz` on node `id` answers 200 and the node takes the admin's key
    /// (the bootstrap key is stored once there is a leader, possibly after the first readiness).
    pub async fn wait_ready(&self, id: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let ok = |path: &str| {
            let request = self.client.get(self.node(id).url(path)).timeout(Duration::from_secs(3));
            async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
        };
        loop {
            if ok("/readyz").await && ok("/v1/auth/whoami").await {
                return Ok(());
            }
            if self.node(id).pid().is_some_and(has_exited) {
                return Err(Error::Cluster(format!("node {id} exited before it was ready\n{}", self.log_tail(id, 30))));
            }
            if Instant::now() > deadline {
                return Err(Error::Cluster(format!(
                    "node {id} not ready after {timeout:?}\n{}",
                    self.log_tail(id, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn cluster_view(&self, id: u64) -> Result<Value> {
        let response = self.client.get(self.node(id).url("/v1/cluster")).timeout(Duration::from_secs(3)).send().await?;
        Ok(response.error_for_status()?.json().await?)
    }

    /// Waits until every running node names the same leader, which is itself running, and
    /// returns it.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        self.wait_leader_among(&self.running(), timeout).await
    }

    /// Waits until every node of `nodes` that runs names the same leader, which is itself
    /// running, and returns it (nodes outside `nodes`, e.g. one waiting to join, are not asked).
    pub async fn wait_leader_among(&self, nodes: &[u64], timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<u64> = self.running().into_iter().filter(|n| nodes.contains(n)).collect();
            let mut leaders = Vec::new();
            for id in &running {
                let leader = self.cluster_view(*id).await.ok().and_then(|v| v["leader_id"].as_u64());
                leaders.push(leader);
            }
            if let Some(Some(first)) = leaders.first() {
                if leaders.iter().all(|l| *l == Some(*first)) && running.contains(first) {
                    return Ok(*first);
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Cluster(format!("no agreed leader after {timeout:?}: {leaders:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `POST /v1/runtimes` through node `via`; returns the status and body.
    pub async fn create_runtime(&self, via: u64, name: &str) -> Result<(u16, Value)> {
        self.create_runtime_keyed(via, name, None).await
    }

    /// [`Cluster::create_runtime`], with an `Idempotency-Key` when given.
    async fn create_runtime_keyed(&self, via: u64, name: &str, key: Option<&str>) -> Result<(u16, Value)> {
        let mut request = self
            .client
            .post(self.node(via).url("/v1/runtimes"))
            .json(&serde_json::json!({ "name": name, "type": "vm", "labels": { "test": "true" } }));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Creates a runtime through `via`, retrying on 503 (e.g. during an election) or a lost
    /// answer until `timeout`; returns the created runtime's id. Every attempt carries one
    /// idempotency key, so a retry of an attempt that did apply gets its answer, not a 409.
    pub async fn create_runtime_eventually(&self, via: u64, name: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let key = format!("eventually-{name}-{}", rand::random::<u64>());
        loop {
            match self.create_runtime_keyed(via, name, Some(&key)).await {
                Ok((201, body)) => {
                    return body["id"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::Cluster(format!("create {name}: no id in {body}")))
                }
                Ok((503, _)) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return Err(Error::Cluster(format!("create {name} through node {via}: {other:?}"))),
            }
        }
    }

    /// Any request through node `via`: returns status, headers and the JSON body (`null` when
    /// there is none). `body` is sent as JSON when given.
    pub async fn call(
        &self,
        via: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Response> {
        self.call_within(via, method, path, body, headers, None).await
    }

    /// [`Cluster::call`] with the credentials of `token` (none: no `Authorization` header).
    pub async fn call_as(
        &self,
        token: Option<&str>,
        via: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Response> {
        let mut request = self.anonymous.request(method, self.node(via).url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        send(request, body, headers).await
    }

    /// [`Cluster::call`] with its own timeout instead of the client's 15 s, for requests that
    /// block while the cluster works (adding a member answers once it has caught up).
    pub async fn call_within(
        &self,
        via: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
        timeout: Option<Duration>,
    ) -> Result<Response> {
        let mut request = self.client.request(method, self.node(via).url(path));
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        send(request, body, headers).await
    }

    /// `GET path` through `via` until it answers 200 or `deadline` passes (one try at least): the
    /// body, or the last answer. A failed request or another status (e.g. 503 during an
    /// election) is only "not yet".
    pub async fn get_ok(&self, via: u64, path: &str, deadline: Instant) -> std::result::Result<Value, String> {
        loop {
            let last = match self.call(via, reqwest::Method::GET, path, None, &[]).await {
                Ok(response) if response.status == 200 => return Ok(response.body),
                Ok(response) => format!("{} {}", response.status, response.body),
                Err(error) => error.to_string(),
            };
            if Instant::now() > deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `GET /v1/operations/{id}` through `via` until the operation has finished. A failed
    /// request or an error status (e.g. 503 during an election) means "not finished yet": only
    /// the deadline ends the wait, and the last answer is what its error shows.
    pub async fn wait_operation(&self, via: u64, id: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.call(via, reqwest::Method::GET, &format!("/v1/operations/{id}"), None, &[]).await {
                Ok(response) => {
                    let status = response.body["status"].as_str().unwrap_or("");
                    if response.status == 200 && ["succeeded", "failed", "cancelled"].contains(&status) {
                        return Ok(response.body);
                    }
                    format!("{} {}", response.status, response.body)
                }
                Err(error) => error.to_string(),
            };
            if Instant::now() > deadline {
                return Err(Error::Cluster(format!("operation {id} did not finish within {timeout:?}: {last}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /v1/runtimes/{id}` through node `via`; `stale` reads the local replica.
    pub async fn get_runtime(&self, via: u64, id: &str, stale: bool) -> Result<(u16, Value)> {
        let query = if stale { "?consistency=stale" } else { "" };
        let response = self.client.get(self.node(via).url(&format!("/v1/runtimes/{id}{query}"))).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Waits until node `via` holds every runtime in `ids` in its local replica.
    pub async fn wait_replicated(&self, via: u64, ids: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for id in ids {
            loop {
                if let Ok((200, _)) = self.get_runtime(via, id, true).await {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(Error::Cluster(format!(
                        "node {via} does not hold runtime {id} after {timeout:?}\n{}",
                        self.log_tail(via, 30)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.node(id).log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!("--- node {id} log (last {lines} lines)\n{}", all[start..].join("\n"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        if std::thread::panicking() {
            for id in &ids {
                eprintln!("{}", self.log_tail(*id, 40));
            }
        }
        for id in ids {
            self.kill(id);
        }
        kill_processes_under(self.dir.path());
        end_sandboxes_under(self.dir.path());
        unmount_under(self.dir.path());
    }
}

/// Kills and removes the sandboxes of every node below `dir` (their `<data-dir>.sandboxes/.crun`
/// state): nodes killed with SIGKILL leave them running, and a container's processes, in a
/// mount namespace of their own, do not show where their files are.
pub fn end_sandboxes_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let state = entry.path().join(".crun");
        if !state.is_dir() {
            continue;
        }
        let crun = |args: &[&str]| {
            std::process::Command::new("/usr/bin/crun").arg("--root").arg(&state).args(args).output().ok()
        };
        let Some(listed) = crun(&["list", "--quiet"]) else { continue };
        for id in String::from_utf8_lossy(&listed.stdout).lines().map(str::trim).filter(|id| !id.is_empty()) {
            crun(&["kill", "--all", id, "KILL"]);
            crun(&["delete", "--force", id]);
        }
    }
}

/// Unmounts (lazily, innermost first) every file system mounted below `dir`: the layers and
/// roots of sandboxes that nodes killed with SIGKILL left mounted.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    for point in points {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// SIGKILLs every process working in a directory below `dir`: the sandboxes that nodes killed
/// with SIGKILL left behind (a node stops its sandboxes only when it shuts down cleanly).
pub fn kill_processes_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else { continue };
        if cwd.starts_with(dir) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_is_given_alone_or_with_its_value_and_a_child_that_ended_is_seen_as_exited() {
        let args = ["--backends=vm=simulated", "--zone", "a"].map(String::from);
        assert!(gives(&args, "--backends") && gives(&args, "--zone"));
        assert!(!gives(&args, "--back") && !gives(&args, "--site"));

        let mut running = Command::new("sleep").arg("5").spawn().unwrap();
        let mut ended = Command::new("true").spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !has_exited(ended.id()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(has_exited(ended.id()), "a child that ended (not yet waited for)");
        assert!(!has_exited(running.id()), "a child still running");
        let _ = running.kill();
        let _ = running.wait();
        let _ = ended.wait();
    }
}
