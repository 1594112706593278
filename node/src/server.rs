//! `run(config, shutdown)`: the one entry point that starts a node — the binary, `runtimeai dev`
//! and any in-process harness all go through it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::{BasicNode, SnapshotPolicy};
use tokio::net::TcpListener;

use runtimeai_api::{AppContext, AppState};
use runtimeai_model::NodeInfo;
use runtimeai_raft::command::RegisterNode;
use runtimeai_raft::log_store::LogStore;
use runtimeai_raft::network::{Network, PeerHealth, PeerRoutes};
use runtimeai_raft::state_machine::StateMachineStore;
use runtimeai_raft::store::DataDir;
use runtimeai_raft::{Op, Raft, Replica, ReplicaOptions};

use crate::backend::libvirt::LibvirtBackend;
use crate::backend::sandbox::{IdRange, SandboxBackend};
use crate::backend::simulated::SimulatedBackend;
use crate::backend::vcluster::VclusterBackend;
use crate::backend::vm_boot::VmImageStore;
use crate::backend::Backends;
use crate::config::Driver;
use crate::config::NodeConfig;
use crate::executor::ExecutorOptions;

/// Runs a node until `shutdown` completes, then stops it cleanly.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Bind first: a taken port is a clear error before anything touches the store.
    let http_listener =
        TcpListener::bind(config.http).await.with_context(|| format!("cannot listen for HTTP on {}", config.http))?;
    let grpc_listener =
        TcpListener::bind(config.grpc).await.with_context(|| format!("cannot listen for gRPC on {}", config.grpc))?;
    // Drivers next: a libvirt that cannot be reached is refused before the store is touched.
    probe_backends(&config)?;
    // Certificates next: a missing or bad file is refused before the store is touched.
    let transport = crate::transport::Transport::load(&config)?;
    let oidc = match &config.oidc {
        None => None,
        Some(oidc) => Some(Arc::new(runtimeai_api::oidc::Oidc::new(oidc.clone()).context("cannot set up OIDC")?)),
    };
    let data = DataDir::open(&config.data_dir, config.id, &config.cluster_name)?;
    let StartedRaft { raft, replica, log_stats, snapshot_sends } = start_raft(&config, &data, &transport).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let grpc_task = transport.serve_peers(grpc_listener, replica.clone(), stop_rx.clone(), stopped(stop_rx.clone()));
    let tls_watch = transport.watch(oidc.clone(), stop_rx.clone());
    let oidc_keys = oidc.clone().map(|oidc| tokio::spawn(runtimeai_api::oidc::keep_fresh(oidc, stop_rx.clone())));
    let BuiltBackends { backends, sources } = build_backends(&config).await?;
    let app = api_router(&config, &replica, log_stats, sources, oidc)?;
    let http_task = transport.serve_rest(http_listener, app, config.http_limits, stop_rx.clone());
    tracing::info!(
        node = config.id,
        http = %config.http,
        grpc = %config.grpc,
        data_dir = %config.data_dir.display(),
        cluster = %config.cluster_name,
        "node started"
    );

    let initializes = data.fresh && config.initial_cluster.keys().next() == Some(&config.id);
    let admin_key =
        crate::admin_key::bootstrap_key(config.bootstrap_admin_key_file.as_deref(), &config.data_dir, initializes)?;
    bootstrap(&config, &raft, data.fresh).await?;
    let admin_key = admin_key.map(|key| tokio::spawn(crate::admin_key::ensure(replica.clone(), key)));
    let workers = Workers::spawn(&config, &replica, backends, &stop_rx);
    let log_purge = tokio::spawn(runtimeai_raft::log_purge::run(
        raft.clone(),
        snapshot_sends,
        config.snapshot_catchup_entries,
        stop_rx.clone(),
    ));

    // A raft that stopped on a storage error cannot serve; exit so a supervisor restarts the
    // node (recovery replays the log) instead of leaving it up and useless.
    let fatal = raft_stopped(raft.clone());
    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        reason = fatal => Err(anyhow::anyhow!("raft stopped: {reason}")),
    };
    tracing::info!(node = config.id, "shutting down");
    workers.registration.abort();
    if let Some(task) = admin_key {
        task.abort();
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc_task).await;
    workers.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), log_purge).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), tls_watch).await;
    if let Some(task) = oidc_keys {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    let stopped_cleanly = raft.shutdown().await;
    // Stop RocksDB's background threads before the process exits: tearing the library down
    // under a running compaction aborts the process. Everything written is already in the WAL.
    data.db.cancel_all_background_work(true);
    tracing::info!(node = config.id, "stopped");
    outcome?;
    stopped_cleanly.map_err(|e| anyhow::anyhow!("raft did not stop cleanly: {e}"))
}

/// Checks that every driver `--backends` names can be used: libvirt answers, a kubeconfig
/// reads.
fn probe_backends(config: &NodeConfig) -> anyhow::Result<()> {
    for spec in &config.backends {
        match &spec.driver {
            Driver::Libvirt { uri } => LibvirtBackend::probe(uri)
                .map_err(|e| anyhow::anyhow!("cannot use libvirt at {uri} (--backends vm=libvirt:<uri>): {e}"))?,
            Driver::Kubernetes { kubeconfig } => {
                kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read kubeconfig {} (--backends vcluster=kubernetes:<path>): {e}",
                        kubeconfig.display()
                    )
                })?;
            }
            Driver::Simulated | Driver::Process => {}
        }
    }
    Ok(())
}

/// openraft's configuration from the node's flags.
fn raft_config(config: &NodeConfig) -> anyhow::Result<openraft::Config> {
    openraft::Config {
        cluster_name: config.cluster_name.clone(),
        heartbeat_interval: config.heartbeat.as_millis() as u64,
        election_timeout_min: config.election_timeout.as_millis() as u64,
        election_timeout_max: 2 * config.election_timeout.as_millis() as u64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_count),
        // Purged by `log_purge` (`--snapshot-catchup-entries` behind the snapshot), which keeps
        // what a member catching up by snapshot still lacks.
        max_in_snapshot_log_to_keep: u64::MAX,
        // Per snapshot chunk, and the last one's answer waits for the follower's install: at a
        // million runtimes (~1.5 GB) that takes tens of seconds, and at 10 s openraft gave up
        // and sent the whole snapshot again, for ever. A dead peer is found sooner anyway (the
        // channel's keep-alive closes it within seconds).
        install_snapshot_timeout: 300_000,
        snapshot_max_chunk_size: config.snapshot_chunk_bytes,
        // Entries can be batches of up to 64 commands: 64 of them keep one AppendEntries to a few
        // MiB, which a lagging follower takes well within the RPC timeout (one heartbeat).
        max_payload_entries: 64,
        // A learner counts as caught up (and is made a voter) once what it lacks fits in one
        // AppendEntries. openraft's default of 5 000 entries is 5 000 batches here: 100 000
        // runtimes fit in ~3 300 entries, and a learner was promoted before it had any of them.
        replication_lag_threshold: 64,
        ..Default::default()
    }
    .validate()
    .context("invalid raft configuration")
}

/// Raft, started, and what serves and watches it.
struct StartedRaft {
    raft: Raft,
    replica: Arc<Replica>,
    log_stats: Arc<runtimeai_raft::log_store::LogStats>,
    /// The snapshots raft sends to members (the log purge holds for them).
    snapshot_sends: Arc<runtimeai_raft::log_purge::SnapshotSends>,
}

/// Opens the log and the state machine in `data`, and starts raft on them (which re-applies
/// committed entries the state machine had not persisted, so the node never serves a
/// half-restored state).
async fn start_raft(
    config: &NodeConfig,
    data: &DataDir,
    transport: &crate::transport::Transport,
) -> anyhow::Result<StartedRaft> {
    let log_store = LogStore::new(data.db.clone());
    let log_stats = log_store.stats();
    let state = StateMachineStore::new(data.db.clone(), data.snapshot_path())
        .map_err(|e| anyhow::anyhow!("cannot read the snapshot in {}: {e}", config.data_dir.display()))?;
    let health = Arc::new(PeerHealth::default());
    let routes = Arc::new(PeerRoutes::new(config.peer_routes.clone(), transport.peer_client.clone()));
    let network = Network::new(config.cluster_name.clone(), health.clone(), routes.clone());
    let snapshot_sends = network.snapshot_sends();
    let raft = Raft::new(config.id, Arc::new(raft_config(config)?), network, log_store, state.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot start raft from {}: {e}", config.data_dir.display()))?;
    let options = ReplicaOptions {
        reachable_window: (config.heartbeat * 5).max(Duration::from_millis(500)),
        // Adding a member answers "still catching up, ask again" (409) well before the REST
        // request's own timeout would answer 504 and leave the caller guessing.
        catch_up_deadline: config.http_limits.request_timeout.mul_f64(0.75),
        // Halfway to the next build anyway.
        stale_snapshot_entries: config.snapshot_count / 2,
        write_groups_at_once: config.write_groups_at_once,
        ..Default::default()
    };
    let replica = Replica::new(config.id, raft.clone(), &state, config.cluster_name.clone(), health, routes, options);
    Ok(StartedRaft { raft, replica, log_stats, snapshot_sends })
}

/// What this node's backends serve the API: vclusters' kubeconfigs (the Kubernetes backend),
/// commands in sandboxes (the sandbox backend), VMs' consoles (libvirt), exports of the
/// runtimes it hosts for their migration (any node-local backend).
#[derive(Default)]
struct ApiSources {
    kubeconfigs: Option<Arc<dyn runtimeai_api::KubeconfigSource>>,
    sandboxes: Option<Arc<dyn runtimeai_api::sandbox_io::SandboxShell>>,
    consoles: Option<Arc<dyn runtimeai_api::ConsoleSource>>,
    exports: Option<Arc<dyn runtimeai_api::RuntimeExports>>,
}

/// The REST API over `replica`.
fn api_router(
    config: &NodeConfig,
    replica: &Arc<Replica>,
    log_stats: Arc<runtimeai_raft::log_store::LogStats>,
    sources: ApiSources,
    oidc: Option<Arc<runtimeai_api::oidc::Oidc>>,
) -> anyhow::Result<axum::Router> {
    let external_planner = match config.planner.clone() {
        None => None,
        Some(planner) => Some(Arc::new(
            runtimeai_api::external_planner::ExternalPlanner::new(planner)
                .context("cannot set up the external planner")?,
        )),
    };
    let state = AppState::from(AppContext {
        replica: replica.clone(),
        http_addr: config.advertise_http.as_str().into(),
        log_stats,
        max_body_bytes: config.max_body_bytes,
        external_planner,
        kubeconfigs: sources.kubeconfigs,
        sandboxes: sources.sandboxes,
        consoles: sources.consoles,
        exports: sources.exports,
        auth_failures: Arc::default(),
        oidc,
        rate_limits: Arc::new(runtimeai_api::throttle::RateLimits::new(config.rate_limits)),
    });
    // Calls other members take about runtimes this node hosts (exec, logs) are served here.
    replica.set_host_calls(Arc::new(runtimeai_api::on_host::HostCallsServer::new(state.clone())));
    Ok(runtimeai_api::router(state))
}

/// What a node runs beside its servers: its announcement, the scheduler, the watchdog, the
/// webhook deliverer and,
/// with backends, the executor; stopped in order when the node shuts down.
struct Workers {
    registration: tokio::task::JoinHandle<()>,
    scheduler: tokio::task::JoinHandle<()>,
    watchdog: tokio::task::JoinHandle<()>,
    webhooks: tokio::task::JoinHandle<()>,
    executor: Option<tokio::task::JoinHandle<()>>,
    drivers: Backends,
}

impl Workers {
    fn spawn(
        config: &NodeConfig,
        replica: &Arc<Replica>,
        backends: Backends,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Workers {
        let scheduler_options = crate::scheduler::SchedulerOptions { lease: config.operation_lease };
        let drivers = backends.clone();
        let executor = (!backends.is_empty()).then(|| {
            let options = ExecutorOptions {
                node_id: config.id,
                lease: config.operation_lease,
                signals_interval: config.signals_interval,
                staging: crate::migration::staging_dir(&config.data_dir),
            };
            tokio::spawn(crate::executor::run(replica.clone(), backends.clone(), options, stop.clone()))
        });
        Workers {
            registration: tokio::spawn(register(replica.clone(), config.clone(), drivers.info())),
            scheduler: tokio::spawn(crate::scheduler::run(replica.clone(), scheduler_options, stop.clone())),
            watchdog: tokio::spawn(runtimeai_raft::watchdog::run(replica.clone(), config.heartbeat, stop.clone())),
            webhooks: tokio::spawn(crate::webhooks::run(replica.clone(), config.id, stop.clone())),
            executor,
            drivers,
        }
    }

    /// Stops them once the node's stop signal is sent: each gets a bound, then the drivers
    /// release what they hold.
    async fn stop(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.scheduler).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.watchdog).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.webhooks).await;
        if let Some(executor) = self.executor {
            let _ = tokio::time::timeout(Duration::from_secs(5), executor).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.drivers.shutdown()).await;
    }
}

/// The drivers `--backends` asks for, and those of them that also serve the API.
struct BuiltBackends {
    backends: Backends,
    sources: ApiSources,
}

async fn build_backends(config: &NodeConfig) -> anyhow::Result<BuiltBackends> {
    let mut backends = Backends::default();
    let mut sources = ApiSources::default();
    let mut simulated = None;
    let mut sandboxes = None;
    for spec in &config.backends {
        let backend: Arc<dyn crate::backend::RuntimeBackend> = match &spec.driver {
            Driver::Simulated => {
                if simulated.is_none() {
                    let dir = &config.simulated_infra_dir;
                    let driver =
                        SimulatedBackend::new(dir.clone(), config.simulated_step, config.id).with_context(|| {
                            format!("cannot prepare the simulated driver's directory {}", dir.display())
                        })?;
                    simulated = Some(driver);
                }
                Arc::new(simulated.as_ref().expect("just set").serving(spec.runtime_type))
            }
            Driver::Libvirt { uri } => {
                let dir = config.data_dir.join("backends").join("libvirt");
                let driver = LibvirtBackend::connect(uri, dir, &config.libvirt_network)
                    .map_err(|e| anyhow::anyhow!("cannot use libvirt at {uri} (--backends vm=libvirt:<uri>): {e}"))?
                    .with_images(VmImageStore::in_data_dir(&config.data_dir))
                    .with_accel(config.vm_accel);
                let driver = Arc::new(driver);
                sources.consoles = Some(driver.clone());
                driver
            }
            Driver::Kubernetes { kubeconfig } => {
                let driver = VclusterBackend::from_kubeconfig(kubeconfig)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot use the host cluster of {}: {e}", kubeconfig.display()))?;
                let driver = Arc::new(driver);
                sources.kubeconfigs = Some(driver.clone());
                driver
            }
            Driver::Process => {
                if sandboxes.is_none() {
                    let dir = config.sandbox_dir.clone();
                    if !config.insecure_registries.is_empty() {
                        tracing::warn!(
                            registries = ?config.insecure_registries,
                            "pulling sandbox images from these registries without TLS (--insecure-registry)"
                        );
                    }
                    let registries = config.insecure_registries.clone();
                    let driver = SandboxBackend::new(dir.clone(), IdRange::default(), registries)
                        .with_context(|| format!("cannot prepare the sandbox directory {}", dir.display()))?;
                    sandboxes = Some(Arc::new(driver));
                }
                sandboxes.clone().expect("just set")
            }
        };
        backends.insert(spec.runtime_type, backend);
    }
    sources.sandboxes = sandboxes.map(|shell| shell as Arc<dyn runtimeai_api::sandbox_io::SandboxShell>);
    if !backends.is_empty() {
        sources.exports = Some(crate::migration::exports(&backends, &config.data_dir));
    }
    Ok(BuiltBackends { backends, sources })
}

/// Completes with the reason if raft stops on its own (a fatal storage error).
///
/// Looks when the server metrics change (leadership and membership; raft closes them as it
/// stops) and once a second, not on every change of the full metrics: those change several
/// times per log entry, and each change woke this task on a loaded node.
async fn raft_stopped(raft: Raft) -> String {
    let metrics = raft.metrics();
    let mut server = raft.server_metrics();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let closed = tokio::select! {
            changed = server.changed() => changed.is_err(),
            _ = tick.tick() => false,
        };
        if let Err(fatal) = &metrics.borrow().running_state {
            tracing::error!(error = %fatal, "raft stopped");
            return fatal.to_string();
        }
        if closed {
            return "raft metrics closed".to_string();
        }
    }
}

/// etcd-style bootstrap: on a fresh data directory, the founding member with the lowest id
/// initializes the cluster with every founding member; the others wait to be contacted. A node
/// restarted with data ignores `--initial-cluster`.
async fn bootstrap(config: &NodeConfig, raft: &Raft, fresh: bool) -> anyhow::Result<()> {
    if config.initial_cluster.is_empty() {
        if fresh {
            tracing::info!("no --initial-cluster: waiting to be added with POST /v1/cluster/members");
        }
        return Ok(());
    }
    if !fresh {
        tracing::info!("existing data directory: ignoring --initial-cluster");
        return Ok(());
    }
    let first = *config.initial_cluster.keys().next().expect("non-empty");
    if first != config.id {
        tracing::info!(initializer = first, "waiting for node {first} to initialize the cluster");
        return Ok(());
    }
    if raft.is_initialized().await? {
        return Ok(());
    }
    let members: BTreeMap<u64, BasicNode> =
        config.initial_cluster.iter().map(|(id, addr)| (*id, BasicNode::new(addr.clone()))).collect();
    tracing::info!(members = ?config.initial_cluster, "initializing the cluster");
    raft.initialize(members).await.context("cannot initialize the cluster")?;
    Ok(())
}

/// Announces this node's addresses in the replicated state once it is a member and a leader is
/// known, so that every node can show them in `GET /v1/cluster`.
async fn register(replica: Arc<Replica>, config: NodeConfig, backends: Vec<runtimeai_model::BackendInfo>) {
    let info = NodeInfo {
        node_id: config.id,
        grpc_addr: config.advertise_grpc.clone(),
        http_addr: config.advertise_http.clone(),
        version: runtimeai_api::VERSION.to_string(),
        backends,
        site: config.site.clone(),
        zone: config.zone.clone(),
    };
    let reply = replica
        .propose_until_stored(
            "register",
            |replica| replica.state().nodes().contains(&info),
            || Op::RegisterNode(RegisterNode { info: info.clone() }),
            |_| true,
        )
        .await;
    if reply.is_some() {
        tracing::info!(http = %info.http_addr, "registered this node's addresses with the cluster");
    }
}
