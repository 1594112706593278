//! `run(config, shutdown)`: the one entry point that starts a node — the binary, `runtimeai dev`
//! and any in-process harness all go through it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::{BasicNode, SnapshotPolicy};
use tokio::net::TcpListener;

use runtimeai_api::AppState;
use runtimeai_model::{Actor, NodeInfo};
use runtimeai_raft::log_store::LogStore;
use runtimeai_raft::network::{Network, PeerHealth, PeerRoutes};
use runtimeai_raft::state_machine::StateMachineStore;
use runtimeai_raft::store::DataDir;
use runtimeai_raft::{Command, Op, Raft, Replica, ReplicaOptions};

use crate::backend::libvirt::LibvirtBackend;
use crate::backend::sandbox::SandboxBackend;
use crate::backend::simulated::SimulatedBackend;
use crate::backend::vcluster::VclusterBackend;
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
    // Certificates next: a missing or bad file is refused before the store is touched.
    let transport = crate::transport::Transport::load(&config)?;
    let oidc = match &config.oidc {
        None => None,
        Some(oidc) => Some(Arc::new(runtimeai_api::oidc::Oidc::new(oidc.clone()).context("cannot set up OIDC")?)),
    };
    let data = DataDir::open(&config.data_dir, config.id, &config.cluster_name)?;
    let log_store = LogStore::new(data.db.clone());
    let log_stats = log_store.stats();
    let state = StateMachineStore::new(data.db.clone(), data.snapshot_path())
        .map_err(|e| anyhow::anyhow!("cannot read the snapshot in {}: {e}", config.data_dir.display()))?;
    let health = Arc::new(PeerHealth::default());
    let routes = Arc::new(PeerRoutes::new(config.peer_routes.clone(), transport.peer_client.clone()));
    let network = Network::new(config.cluster_name.clone(), health.clone(), routes.clone());
    let raft_config = openraft::Config {
        cluster_name: config.cluster_name.clone(),
        heartbeat_interval: config.heartbeat.as_millis() as u64,
        election_timeout_min: config.election_timeout.as_millis() as u64,
        election_timeout_max: 2 * config.election_timeout.as_millis() as u64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_count),
        max_in_snapshot_log_to_keep: config.snapshot_catchup_entries,
        install_snapshot_timeout: 10_000,
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
    .context("invalid raft configuration")?;
    // Raft::new re-applies committed entries the state machine had not persisted, so the node
    // never serves a half-restored state.
    let raft = Raft::new(config.id, Arc::new(raft_config), network, log_store, state.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot start raft from {}: {e}", config.data_dir.display()))?;
    let replica = Replica::new(
        config.id,
        raft.clone(),
        state,
        config.cluster_name.clone(),
        health,
        routes,
        ReplicaOptions {
            reachable_window: (config.heartbeat * 5).max(Duration::from_millis(500)),
            ..Default::default()
        },
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let grpc_task = transport.serve_peers(grpc_listener, replica.clone(), stop_rx.clone(), stopped(stop_rx.clone()));
    let tls_watch = transport.watch(oidc.clone(), stop_rx.clone());
    let oidc_keys = oidc.clone().map(|oidc| tokio::spawn(runtimeai_api::oidc::keep_fresh(oidc, stop_rx.clone())));

    let (backends, kubeconfigs) = build_backends(&config).await?;
    let external_planner = match config.planner.clone() {
        None => None,
        Some(planner) => Some(Arc::new(
            runtimeai_api::external_planner::ExternalPlanner::new(planner)
                .context("cannot set up the external planner")?,
        )),
    };
    let app = runtimeai_api::router(AppState {
        replica: replica.clone(),
        http_addr: config.advertise_http.as_str().into(),
        log_stats,
        max_body_bytes: config.max_body_bytes,
        external_planner,
        kubeconfigs,
        auth_failures: Arc::default(),
        oidc: oidc.clone(),
        rate_limits: Arc::new(runtimeai_api::throttle::RateLimits::new(config.rate_limits)),
    });
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
    let scheduler = tokio::spawn(crate::scheduler::run(
        replica.clone(),
        crate::scheduler::SchedulerOptions { lease: config.operation_lease },
        stop_rx.clone(),
    ));
    let watchdog = tokio::spawn(runtimeai_raft::watchdog::run(replica.clone(), config.heartbeat, stop_rx.clone()));
    let registration = tokio::spawn(register(replica.clone(), config.clone(), backends.info()));
    let drivers = backends.clone();
    let executor = (!backends.is_empty()).then(|| {
        let options = ExecutorOptions {
            node_id: config.id,
            lease: config.operation_lease,
            signals_interval: config.signals_interval,
        };
        tokio::spawn(crate::executor::run(replica.clone(), backends, options, stop_rx.clone()))
    });

    // A raft that stopped on a storage error cannot serve; exit so a supervisor restarts the
    // node (recovery replays the log) instead of leaving it up and useless.
    let fatal = raft_stopped(raft.clone());
    let outcome = tokio::select! {
        _ = shutdown => Ok(()),
        reason = fatal => Err(anyhow::anyhow!("raft stopped: {reason}")),
    };
    tracing::info!(node = config.id, "shutting down");
    registration.abort();
    if let Some(task) = admin_key {
        task.abort();
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), scheduler).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), watchdog).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), tls_watch).await;
    if let Some(task) = oidc_keys {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    if let Some(executor) = executor {
        let _ = tokio::time::timeout(Duration::from_secs(5), executor).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), drivers.shutdown()).await;
    let stopped_cleanly = raft.shutdown().await;
    // Stop RocksDB's background threads before the process exits: tearing the library down
    // under a running compaction aborts the process. Everything written is already in the WAL.
    data.db.cancel_all_background_work(true);
    tracing::info!(node = config.id, "stopped");
    outcome?;
    stopped_cleanly.map_err(|e| anyhow::anyhow!("raft did not stop cleanly: {e}"))
}

/// The drivers `--backends` asks for.
/// Also returns the Kubernetes backend, which serves `GET /v1/runtimes/{id}/kubeconfig`.
async fn build_backends(
    config: &NodeConfig,
) -> anyhow::Result<(Backends, Option<Arc<dyn runtimeai_api::KubeconfigSource>>)> {
    let mut backends = Backends::default();
    let mut kubeconfigs: Option<Arc<dyn runtimeai_api::KubeconfigSource>> = None;
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
                    simulated = Some(Arc::new(driver));
                }
                simulated.clone().expect("just set")
            }
            Driver::Libvirt { uri } => {
                let dir = config.data_dir.join("backends").join("libvirt");
                let driver = LibvirtBackend::connect(uri, dir, &config.libvirt_network)
                    .map_err(|e| anyhow::anyhow!("cannot use libvirt at {uri} (--backends vm=libvirt:<uri>): {e}"))?;
                Arc::new(driver)
            }
            Driver::Kubernetes { kubeconfig } => {
                let driver = VclusterBackend::from_kubeconfig(kubeconfig)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot use the host cluster of {}: {e}", kubeconfig.display()))?;
                let driver = Arc::new(driver);
                kubeconfigs = Some(driver.clone());
                driver
            }
            Driver::Process => {
                if sandboxes.is_none() {
                    let dir = config.data_dir.join("backends").join("sandboxes");
                    let driver = SandboxBackend::new(dir.clone())
                        .with_context(|| format!("cannot prepare the sandbox directory {}", dir.display()))?;
                    sandboxes = Some(Arc::new(driver));
                }
                sandboxes.clone().expect("just set")
            }
        };
        backends.insert(spec.runtime_type, backend);
    }
    Ok((backends, kubeconfigs))
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

/// Proposes `op()` as the system once this node is a member and a leader is known, until
/// `stored` finds it in the replicated state or a reply `settles` it (other replies and errors
/// are tried again, backing off from 100 ms to 2 s). The settling reply; none when the state
/// already held it.
pub(crate) async fn propose_until_stored(
    replica: &Replica,
    what: &str,
    stored: impl Fn(&Replica) -> bool,
    op: impl Fn() -> Op,
    settles: impl Fn(&runtimeai_raft::CommandReply) -> bool,
) -> Option<runtimeai_raft::CommandReply> {
    let mut delay = Duration::from_millis(100);
    loop {
        let metrics = replica.metrics();
        let member = metrics.membership_config.nodes().any(|(id, _)| *id == replica.id);
        if member && metrics.current_leader.is_some() {
            if stored(replica) {
                return None;
            }
            let command = Command { at: chrono::Utc::now(), actor: Actor::System, idempotency: None, op: op() };
            match replica.propose(command).await {
                Ok(reply) if settles(&reply) => return Some(reply),
                Ok(other) => tracing::warn!(what, reply = ?other, "unexpected reply; trying again"),
                Err(e) => tracing::debug!(what, error = %e, "cannot propose yet"),
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
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
    let reply = propose_until_stored(
        &replica,
        "register",
        |replica| replica.state.nodes().contains(&info),
        || Op::RegisterNode { info: info.clone() },
        |_| true,
    )
    .await;
    if reply.is_some() {
        tracing::info!(http = %info.http_addr, "registered this node's addresses with the cluster");
    }
}
