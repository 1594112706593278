//! Benchmarks: a RuntimeAI cluster and an etcd cluster side by side on this machine, driven by
//! the same HTTP client at the same concurrency with the same payload size, plus the failover gap
//! of each and how RuntimeAI copes with many runtimes.
//!
//! RuntimeAI: `POST /v1/runtimes` (a vcluster on the simulated driver, so every create also
//! schedules and runs its operation, as in production), `GET /v1/runtimes/{id}` linearizable
//! and `?consistency=stale`. etcd: its v3 JSON gateway, `POST /v3/kv/put` with a value the size
//! of a runtime's record, `POST /v3/kv/range` linearizable and `serializable`. Calls go to every
//! member in turn, as through a round-robin load balancer.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plotters::prelude::*;
use runtimeai_client::{Client, ClientError, Consistency, Runtime};
use serde::Serialize;
use serde_json::json;

use crate::cluster::{Cluster, ClusterOptions};
use crate::error::{Error, Result};
use crate::etcd::{base64, EtcdCluster};

/// How long the harness waits for a cluster to elect a leader between measurements: the wait
/// ends as soon as one is agreed, so the bound matters only on a failure or a loaded machine.
const SETTLE: Duration = Duration::from_secs(60);

/// What to measure.
#[derive(Debug, Clone, Serialize)]
pub struct BenchOptions {
    pub concurrency: Vec<usize>,
    #[serde(serialize_with = "as_secs")]
    pub duration: Duration,
    /// Runtimes created for the scale measurements (0 skips them).
    pub runtimes: usize,
    /// Extra `runtimeai node` flags for every node (a tuning to measure).
    pub node_args: Vec<String>,
    /// How many times each system's leader is SIGKILLed for the failover gap.
    pub failover_rounds: usize,
    /// How the levels reach the systems.
    pub mode: Mode,
    /// How many times each system runs each level through the load balancer (interleaved).
    #[serde(default)]
    pub rounds: usize,
    /// Both systems without TLS (RuntimeAI `--insecure`, etcd on http): the baseline that shows
    /// what TLS costs. API keys are checked either way.
    #[serde(default)]
    pub plaintext: bool,
    /// Only the scale measurement: no etcd, no levels, no failover.
    #[serde(default)]
    pub scale_only: bool,
    /// Where the RuntimeAI nodes' logs are copied at the end.
    #[serde(skip)]
    pub log_dir: Option<std::path::PathBuf>,
}

/// How the benchmark's levels reach the systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// wrk through a haproxy per system ([`crate::balanced`]): as users send traffic.
    Balanced,
    /// Each system's members directly, ours with the SDK, etcd with the same HTTP stack:
    /// for profiling.
    Direct,
    /// Both, one after the other.
    Both,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// One system, one kind of call, one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub system: &'static str,
    pub workload: &'static str,
    pub clients: usize,
    pub ok: usize,
    pub errors: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Which run of the level these figures are from (1-based), when each system ran it more
    /// than once ([`crate::balanced`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<usize>,
    /// CPU time (user + system) the system's three members spent per successful call, from
    /// `/proc`: for RuntimeAI's writes until the operations they queued had run. The figure that
    /// moves least between runs on a shared machine: throughput is cores over this.
    pub cpu_ms_per_op: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub system: &'static str,
    /// From the leader's SIGKILL to the first write acknowledged after it, per round.
    pub gaps_ms: Vec<f64>,
    pub median_ms: f64,
    pub max_ms: f64,
}

impl Failover {
    fn new(system: &'static str, mut gaps_ms: Vec<f64>) -> Failover {
        gaps_ms.sort_by(f64::total_cmp);
        let median_ms = gaps_ms.get(gaps_ms.len() / 2).copied().unwrap_or(f64::NAN);
        let max_ms = gaps_ms.last().copied().unwrap_or(f64::NAN);
        Failover { system, gaps_ms, median_ms, max_ms }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Scale {
    pub runtimes: usize,
    pub create_seconds: f64,
    pub creates_per_second: f64,
    /// Per node, the most resident memory while creating.
    pub peak_rss_mib: BTreeMap<u64, f64>,
    /// Per node, resident memory once all are created.
    pub rss_mib: BTreeMap<u64, f64>,
    /// Per node, how much resident memory grew while creating, scaled to 100 000 runtimes.
    pub growth_mib_per_100k: BTreeMap<u64, f64>,
    /// What the store holds of the largest node's memory once all are created (MiB, each
    /// `runtimeai_storage_*_bytes` gauge summed over the column families): memtables, table
    /// readers, block caches; and its live data on disk.
    pub store_mib: BTreeMap<String, f64>,
    /// From the first create until every runtime created runs (its create operation run and
    /// recorded): what "created" means to a user.
    pub settled_seconds: f64,
    /// CPU time of all three members per create, its operation run and recorded included: the
    /// figure to compare builds by, steadier on a shared machine than throughput.
    pub cpu_ms_per_create: f64,
    /// List pages at this size, each asked [`LIST_SAMPLES`] times in a row through a follower.
    pub list_pages: Vec<ListPage>,
    /// That follower's table files in level 0 (all families) as the lists began: a read looks
    /// in each, and they pile up while compactions lag behind the creates.
    pub level0_files_at_lists: Option<f64>,
    /// A new node added with `POST /v1/cluster/members` until it is a caught-up voter.
    pub catch_up_seconds: f64,
    /// Why adding it failed, if it did.
    pub catch_up_error: Option<String>,
    /// A node SIGKILLed and started again until `/readyz`.
    pub restart_seconds: f64,
}

/// Latencies of one kind of list page (50 runtimes, linearizable) at the scale measured.
#[derive(Debug, Clone, Serialize)]
pub struct ListPage {
    /// `first`, `middle` (after a page token halfway through) or `state=running` (filtered).
    pub page: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// How many times each list page is asked for.
const LIST_SAMPLES: usize = 300;

#[derive(Debug, Clone, Serialize)]
pub struct BenchResults {
    pub options: BenchOptions,
    /// Bytes of a runtime's record as the API returns it: the etcd value size.
    pub payload_bytes: usize,
    /// Per system, workload and concurrency, one level: through the load balancer, the median
    /// of its runs.
    pub levels: Vec<Level>,
    /// Every run through the load balancer, in the order they ran.
    pub runs: Vec<Level>,
    /// Where our creates' time went, per write level (its first run through the load balancer).
    pub stages: Vec<crate::stages::Stage>,
    pub failover: Vec<Failover>,
    pub failover_error: Option<String>,
    pub scale: Option<Scale>,
    pub scale_error: Option<String>,
}

/// Latencies of one load run.
struct Load {
    latencies_us: Vec<u64>,
    errors: usize,
    elapsed: Duration,
}

/// Runs `clients` concurrent loops for `duration`, each calling `call(target)` on the `targets`
/// members in turn; a call that returns true counts as done.
async fn drive<F, Fut>(targets: usize, clients: usize, duration: Duration, call: F) -> Load
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut i = 0usize;
            while Instant::now() < deadline {
                let sent = Instant::now();
                let ok = call((client + i) % targets).await;
                if ok {
                    latencies.push(sent.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
                i += 1;
            }
            (latencies, errors)
        }));
    }
    let mut load = Load { latencies_us: Vec::new(), errors: 0, elapsed: Duration::ZERO };
    for task in tasks {
        if let Ok((latencies, errors)) = task.await {
            load.latencies_us.extend(latencies);
            load.errors += errors;
        }
    }
    load.elapsed = started.elapsed();
    load
}

fn level(
    system: &'static str,
    workload: &'static str,
    clients: usize,
    mut load: Load,
    members_cpu_seconds: f64,
) -> Level {
    load.latencies_us.sort_unstable();
    let at = |q: f64| quantile_ms(&load.latencies_us, q);
    Level {
        system,
        workload,
        clients,
        ok: load.latencies_us.len(),
        errors: load.errors,
        per_second: load.latencies_us.len() as f64 / load.elapsed.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        run: None,
        cpu_ms_per_op: members_cpu_seconds * 1000.0 / load.latencies_us.len().max(1) as f64,
    }
}

/// An HTTPS client for either system (both serve certificates of the harness's CA); for ours
/// it authenticates as the admin (etcd's gateway reads `Authorization` as an etcd token, so its
/// client sends none). Ours is called through the SDK ([`members`]) but for the probes.
fn http_client(clients: usize, ours: bool) -> Result<reqwest::Client> {
    let builder = if ours { crate::cluster::admin_client_builder()? } else { crate::cluster::client_builder()? };
    Ok(builder.timeout(Duration::from_secs(10)).pool_max_idle_per_host(clients.max(1)).tcp_nodelay(true).build()?)
}

/// One SDK client (`runtimeai-client`) per member at `urls`, as the admin, each call taking at
/// most `timeout`: the benchmark calls RuntimeAI as its users' programs do.
fn members(urls: &[String], timeout: Duration) -> Result<Arc<Vec<Client>>> {
    let config = crate::cluster::admin_client_config(Vec::new(), timeout)?;
    let clients: Result<Vec<Client>> = urls.iter().map(|url| crate::cluster::member_client(&config, url)).collect();
    Ok(Arc::new(clients?))
}

/// Unique names across every load run of a process.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A create of the next benchmark runtime.
fn create(client: &Client) -> impl Future<Output = Result<Runtime, ClientError>> + Send + 'static {
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let client = client.clone();
    async move {
        let body =
            json!({"name": format!("bench-{n}"), "type": "vcluster", "labels": {"bench": "true", "team": "platform"}});
        client.create_runtime(&body).await
    }
}

fn put_request(http: &reqwest::Client, base: &str, value: &str) -> reqwest::RequestBuilder {
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    http.post(format!("{base}/v3/kv/put"))
        .json(&json!({"key": base64(format!("bench/{n}").as_bytes()), "value": value}))
}

/// Whether `request` is answered with a 2xx (its body read to the end).
async fn succeeds(request: reqwest::RequestBuilder) -> bool {
    match request.send().await {
        Ok(response) => {
            let ok = response.status().is_success();
            let _ = response.bytes().await;
            ok
        }
        Err(_) => false,
    }
}

/// Node flags of the benchmarked cluster: fsync'd storage is the default; the simulated driver
/// runs each create's operation without infrastructure. A flag given with --node-arg replaces
/// the default here (a node refuses the same flag twice).
fn runtimeai_options(node_args: &[String], plaintext: bool) -> ClusterOptions {
    let defaults =
        [("--backends", "vcluster=simulated"), ("--simulated-step-ms", "1"), ("--signals-interval-ms", "60000")];
    let extra_args = with_defaults(&defaults, node_args);
    ClusterOptions { extra_args, plaintext, ..Default::default() }
}

/// `node_args` after each of `defaults` (`flag=value`) that none of them gives.
fn with_defaults(defaults: &[(&str, &str)], node_args: &[String]) -> Vec<String> {
    let mut args: Vec<String> = defaults
        .iter()
        .filter(|(flag, _)| !crate::cluster::gives(node_args, flag))
        .map(|(flag, value)| format!("{flag}={value}"))
        .collect();
    args.extend(node_args.iter().cloned());
    args
}

/// Runs every measurement; `progress` hears what is going on.
pub async fn run(options: BenchOptions, progress: impl Fn(&str)) -> Result<BenchResults> {
    if options.scale_only {
        return scale_only(options, progress).await;
    }
    let max_clients = options.concurrency.iter().copied().max().unwrap_or(1);
    let (http, etcd_http) = (http_client(max_clients, true)?, http_client(max_clients, false)?);

    progress("starting a 3-node RuntimeAI cluster and a 3-member etcd cluster");
    let runtimeai = Cluster::start(3, runtimeai_options(&options.node_args, options.plaintext)).await?;
    let etcd = EtcdCluster::start(3, !options.plaintext).await?;
    let ours: Vec<String> = (1..=3).map(|n| runtimeai.node(n).base_url()).collect();
    let theirs: Vec<String> = etcd.members.iter().map(|m| m.client_url.clone()).collect();
    let sdk = members(&ours, Duration::from_secs(10))?;

    // The payload: a runtime's record as the API returns it (as sent, not as a typed record
    // would encode it again).
    let sample = create(&sdk[0]).await.map_err(|e| Error::Cluster(format!("the sample create: {e}")))?;
    let path = format!("/v1/runtimes/{}", sample.id);
    let (_, record) =
        sdk[0].request_raw(reqwest::Method::GET, &path, None).await.map_err(|e| Error::Cluster(e.to_string()))?;
    let payload_bytes = serde_json::to_vec(&record)?.len();
    // Reads read the sample and etcd's key of the same size.
    let etcd_key = base64(b"bench/read");
    let value = base64(&vec![b'x'; payload_bytes]);
    etcd_http.post(format!("{}/v3/kv/put", theirs[0])).json(&json!({"key": etcd_key, "value": value})).send().await?;
    let mut systems = Systems { runtimeai, etcd, ours, theirs, sdk, etcd_http, value, etcd_key, sample_id: sample.id };

    // The sample's operation; each level then waits for its own.
    quiesce(&systems.runtimeai, &progress).await;
    let mut measured = crate::balanced::Measured::default();
    if options.mode != Mode::Direct {
        measured = crate::balanced::levels(&systems, &options, &progress).await?;
    }
    let crate::balanced::Measured { mut levels, runs, stages } = measured;
    if options.mode != Mode::Balanced {
        levels.extend(direct_levels(&systems, &options, &progress).await);
    }
    let runtimeai = &systems.runtimeai;
    levels.extend(
        authentication_cost(&http, &systems.ours, runtimeai, max_clients, options.duration / 2, &progress).await,
    );

    let (failover, failover_error) = match options.failover_rounds {
        0 => (Vec::new(), None),
        rounds => match failover_rounds(&mut systems, rounds, &progress).await {
            Ok(failover) => (failover, None),
            Err(e) => {
                progress(&format!("failover measurement failed: {e}"));
                (Vec::new(), Some(e.to_string()))
            }
        },
    };
    let Systems { mut runtimeai, etcd, .. } = systems;
    drop(etcd);

    // A failed scale measurement is reported, not allowed to lose the figures above.
    let (scale, scale_error) = match options.runtimes {
        0 => (None, None),
        _ => match measure_scale(&options, &http, &mut runtimeai, &progress).await? {
            Ok(scale) => (Some(scale), None),
            Err(e) => (None, Some(e)),
        },
    };
    save_logs(&runtimeai, options.log_dir.as_deref(), if options.runtimes == 0 { "levels" } else { "scale" })?;
    Ok(BenchResults { options, payload_bytes, levels, runs, stages, failover, failover_error, scale, scale_error })
}

/// The two systems under measurement and how to reach them.
pub(crate) struct Systems {
    pub runtimeai: Cluster,
    pub etcd: EtcdCluster,
    /// Our members' base URLs.
    pub ours: Vec<String>,
    /// etcd's members' client URLs.
    pub theirs: Vec<String>,
    /// An SDK client per member of ours.
    sdk: Arc<Vec<Client>>,
    etcd_http: reqwest::Client,
    /// etcd's value (base64): as many bytes as a runtime's record.
    pub value: String,
    /// The etcd key the reads read (base64).
    pub etcd_key: String,
    /// The runtime the reads read.
    pub sample_id: String,
}

/// Writes, then linearizable and stale reads, at every concurrency, each client calling the
/// members in turn directly: ours through the SDK, etcd through its JSON gateway. For
/// profiling; what users see goes through a load balancer ([`crate::balanced`]).
async fn direct_levels(systems: &Systems, options: &BenchOptions, progress: &impl Fn(&str)) -> Vec<Level> {
    let Systems { runtimeai, etcd, ours, theirs, sdk, etcd_http, value, etcd_key, sample_id } = systems;
    let mut levels = Vec::new();
    for &clients in &options.concurrency {
        progress(&format!("writes, {clients} clients, {:?} each system", options.duration));
        let cpu = runtimeai_cpu(runtimeai);
        let members = sdk.clone();
        let load = drive(ours.len(), clients, options.duration, move |t| {
            let created = create(&members[t]);
            async move { created.await.is_ok() }
        })
        .await;
        // The operations the creates queued are part of their cost.
        quiesce(runtimeai, progress).await;
        levels.push(level("runtimeai", "write", clients, load, runtimeai_cpu(runtimeai) - cpu));
        let cpu = etcd_cpu(etcd);
        let (h, t, v) = (etcd_http.clone(), theirs.clone(), value.clone());
        let load = drive(theirs.len(), clients, options.duration, move |i| succeeds(put_request(&h, &t[i], &v))).await;
        levels.push(level("etcd", "write", clients, load, etcd_cpu(etcd) - cpu));
    }
    for &clients in &options.concurrency {
        quiesce(runtimeai, progress).await;
        progress(&format!("reads, {clients} clients"));
        for (workload, consistency) in
            [("read-linearizable", Consistency::Linearizable), ("read-stale", Consistency::Stale)]
        {
            let cpu = runtimeai_cpu(runtimeai);
            let (members, id) = (sdk.clone(), sample_id.clone());
            let load = drive(ours.len(), clients, options.duration / 2, move |t| {
                let (client, id) = (members[t].clone(), id.clone());
                async move { client.get_runtime_at(&id, consistency).await.is_ok() }
            })
            .await;
            levels.push(level("runtimeai", workload, clients, load, runtimeai_cpu(runtimeai) - cpu));
            let body = json!({"key": etcd_key, "serializable": workload == "read-stale"});
            let cpu = etcd_cpu(etcd);
            let (h, t) = (etcd_http.clone(), theirs.clone());
            let load = drive(theirs.len(), clients, options.duration / 2, move |i| {
                succeeds(h.post(format!("{}/v3/kv/range", t[i])).json(&body))
            })
            .await;
            levels.push(level("etcd", workload, clients, load, etcd_cpu(etcd) - cpu));
        }
    }
    levels
}

/// The scale measurement, on a fresh cluster that replaces `runtimeai` (so that its time and
/// memory are those of the runtimes it creates, not of what the levels left behind). `Err` of
/// the outer result: the harness failed; of the inner: the measurement did, and why.
async fn measure_scale(
    options: &BenchOptions,
    http: &reqwest::Client,
    runtimeai: &mut Cluster,
    progress: &impl Fn(&str),
) -> Result<std::result::Result<Scale, String>> {
    progress("scale: starting a fresh 3-node RuntimeAI cluster");
    save_logs(runtimeai, options.log_dir.as_deref(), "levels")?;
    // The levels' cluster stops before the fresh one starts (and goes once it is replaced).
    for node in runtimeai.running() {
        runtimeai.kill(node);
    }
    *runtimeai = Cluster::start(3, runtimeai_options(&scale_args(options), options.plaintext)).await?;
    Ok(scale(http, runtimeai, options.runtimes, progress).await.map_err(|e| {
        progress(&format!("scale measurement failed: {e}"));
        e.to_string()
    }))
}

/// The scale cluster's `--snapshot-count` for `runtimes` (see [`scale_args`]).
fn scale_snapshot_count(runtimes: usize) -> usize {
    (runtimes / 100).clamp(1_000, 10_000)
}

/// `--scale-only`: the scale measurement alone, on a cluster of its own.
async fn scale_only(options: BenchOptions, progress: impl Fn(&str)) -> Result<BenchResults> {
    let http = http_client(16, true)?;
    progress("scale: starting a 3-node RuntimeAI cluster");
    let mut runtimeai = Cluster::start(3, runtimeai_options(&scale_args(&options), options.plaintext)).await?;
    let measured = scale(&http, &mut runtimeai, options.runtimes, &progress).await;
    save_logs(&runtimeai, options.log_dir.as_deref(), "scale")?;
    let (scale, scale_error) = match measured {
        Ok(scale) => (Some(scale), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let (levels, runs, stages, failover) = Default::default();
    Ok(BenchResults {
        options,
        payload_bytes: 0,
        levels,
        runs,
        stages,
        failover,
        failover_error: None,
        scale,
        scale_error,
    })
}

/// The scale cluster's node flags: snapshots often enough, and little log kept behind them,
/// that the fourth node catches up by snapshot (at the defaults, 100 000 runtimes fit in fewer
/// entries than a snapshot waits for, and it would replay the log), yet no more than the
/// default's one per 10 000 entries (each build streams the whole state: at a million runtimes,
/// one per 1 000 entries would build back to back). A flag given with --node-arg wins: a node
/// refuses the same flag twice.
fn scale_args(options: &BenchOptions) -> Vec<String> {
    let snapshot_count = scale_snapshot_count(options.runtimes).to_string();
    let defaults = [("--snapshot-count", snapshot_count.as_str()), ("--snapshot-catchup-entries", "100")];
    with_defaults(&defaults, &options.node_args)
}

/// Copies the nodes' logs into `dir` (if given), named `runtimeai-<phase>-node-<id>.log`.
fn save_logs(cluster: &Cluster, dir: Option<&Path>, phase: &str) -> Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    for (id, node) in &cluster.nodes {
        let _ = std::fs::copy(&node.log, dir.join(format!("runtimeai-{phase}-node-{id}.log")));
    }
    Ok(())
}

/// Waits (up to a minute) until the cluster has finished the work earlier levels queued: every
/// create schedules an operation that executors run afterwards, and a level should not pay for
/// the one before it. Quiet = the leader applied nothing new for half a second.
pub(crate) async fn quiesce(cluster: &Cluster, progress: &impl Fn(&str)) {
    let started = Instant::now();
    let mut last = None;
    let mut quiet_since = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let Ok(leader) = cluster.wait_leader(Duration::from_secs(5)).await else { return };
        let applied = cluster.cluster_view(leader).await.ok().and_then(|v| v["last_applied"].as_u64());
        if applied != last {
            last = applied;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_millis(500) {
            if started.elapsed() > Duration::from_secs(1) {
                progress(&format!("(waited {:.1} s for queued operations to finish)", started.elapsed().as_secs_f64()));
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress("(operations still running after 60 s; measuring anyway)");
}

/// What authentication costs a request: the same trivial answer without a key check
/// (`/healthz`, public) and with one (`/v1/health`), at `clients` clients, through every node.
async fn authentication_cost(
    http: &reqwest::Client,
    ours: &[String],
    runtimeai: &Cluster,
    clients: usize,
    duration: Duration,
    progress: &impl Fn(&str),
) -> Vec<Level> {
    progress(&format!("authentication: /healthz (no key checked) against /v1/health (key checked), {clients} clients"));
    let mut levels = Vec::new();
    for (workload, path) in [(PROBE_WITHOUT_KEY, "/healthz"), (PROBE_WITH_KEY, "/v1/health")] {
        let cpu = runtimeai_cpu(runtimeai);
        let (h, targets) = (http.clone(), ours.to_vec());
        let load =
            drive(ours.len(), clients, duration, move |t| succeeds(h.get(format!("{}{path}", targets[t])))).await;
        levels.push(level("runtimeai", workload, clients, load, runtimeai_cpu(runtimeai) - cpu));
    }
    levels
}

/// The two workloads of [`authentication_cost`].
const PROBE_WITHOUT_KEY: &str = "probe without a key check (/healthz)";
const PROBE_WITH_KEY: &str = "probe with a key check (/v1/health)";

/// SIGKILLs each system's leader `rounds` times under a steady write load.
async fn failover_rounds(systems: &mut Systems, rounds: usize, progress: &impl Fn(&str)) -> Result<Vec<Failover>> {
    let Systems { runtimeai, etcd, ours, theirs, etcd_http, value, .. } = systems;
    let mut failover = Vec::new();
    progress(&format!("failover: SIGKILL each system's leader under a steady write load, {rounds} times"));
    let mut gaps = Vec::new();
    for _ in 0..rounds {
        let leader = runtimeai.wait_leader(SETTLE).await?;
        let sdk = members(ours, FAILOVER_CALL_TIMEOUT)?;
        let call = move |t: usize| {
            let created = create(&sdk[t]);
            async move { created.await.is_ok() }
        };
        gaps.push(failover_gap(ours.len(), || runtimeai.kill(leader), call).await);
        runtimeai.spawn(leader)?;
        runtimeai.wait_ready(leader, Duration::from_secs(120)).await?;
    }
    failover.push(Failover::new("runtimeai", gaps));
    let mut gaps = Vec::new();
    for _ in 0..rounds {
        let leader = etcd.wait_leader(SETTLE).await?;
        let (h, t, v) = (etcd_http.clone(), theirs.clone(), value.clone());
        let call = move |i: usize| succeeds(put_request(&h, &t[i], &v).timeout(FAILOVER_CALL_TIMEOUT));
        gaps.push(failover_gap(theirs.len(), || etcd.kill(leader), call).await);
        etcd.restart(leader)?;
        etcd.wait_leader(SETTLE).await?;
    }
    failover.push(Failover::new("etcd", gaps));
    Ok(failover)
}

/// How long a write of the failover measurement waits for its answer.
const FAILOVER_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes with 16 clients, `call(member)` on the `targets` members in turn, SIGKILLs the leader
/// after 2 s, and returns the time from the kill to the first write acknowledged after it, in
/// milliseconds.
async fn failover_gap<K, F, Fut>(targets: usize, kill: K, call: F) -> f64
where
    K: FnOnce(),
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let started = Instant::now();
    let killed_at_us = Arc::new(AtomicU64::new(u64::MAX));
    let first_after_us = Arc::new(AtomicU64::new(u64::MAX));
    let call = Arc::new(call);
    let mut tasks = Vec::new();
    for client in 0..16usize {
        let call = call.clone();
        let (killed_at_us, first_after_us) = (killed_at_us.clone(), first_after_us.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = client;
            while started.elapsed() < Duration::from_secs(12) {
                i += 1;
                let sent = started.elapsed().as_micros() as u64;
                let ok = call(i % targets).await;
                let done = started.elapsed().as_micros() as u64;
                if ok && sent > killed_at_us.load(Ordering::SeqCst) {
                    first_after_us.fetch_min(done, Ordering::SeqCst);
                    return;
                }
                if !ok {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    killed_at_us.store(started.elapsed().as_micros() as u64, Ordering::SeqCst);
    kill();
    for task in tasks {
        let _ = task.await;
    }
    let (killed, first) = (killed_at_us.load(Ordering::SeqCst), first_after_us.load(Ordering::SeqCst));
    if first == u64::MAX {
        f64::INFINITY
    } else {
        (first - killed) as f64 / 1000.0
    }
}

/// VmRSS and VmHWM of a process, in MiB.
fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()
            .map(|kib| kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time the RuntimeAI cluster's members have used so far, in seconds.
pub(crate) fn runtimeai_cpu(cluster: &Cluster) -> f64 {
    cluster.nodes.values().filter_map(|node| node.pid().and_then(cpu_seconds)).sum()
}

/// CPU time the etcd cluster's members have used so far, in seconds.
pub(crate) fn etcd_cpu(etcd: &EtcdCluster) -> f64 {
    (0..etcd.members.len()).filter_map(|i| etcd.pid(i).and_then(cpu_seconds)).sum()
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime, fields 14 and 15 of proc(5), in clock ticks (USER_HZ, 100 on Linux).
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

async fn scale(
    http: &reqwest::Client,
    cluster: &mut Cluster,
    runtimes: usize,
    progress: &impl Fn(&str),
) -> Result<Scale> {
    progress(&format!("scale: create {runtimes} runtimes with 128 clients"));
    let targets: Vec<String> = (1..=3).map(|n| cluster.node(n).base_url()).collect();
    let before: BTreeMap<u64, f64> =
        (1..=3).filter_map(|n| Some((n, cluster.node(n).pid().and_then(memory_mib)?.0))).collect();
    let cpu_before = runtimeai_cpu(cluster);
    let remaining = Arc::new(AtomicU64::new(runtimes as u64));
    // A runtime created halfway: its id is the page token of a page in the middle.
    let halfway = Arc::new(std::sync::OnceLock::new());
    let started = Instant::now();
    let mut tasks = Vec::new();
    let sdk = members(&targets, Duration::from_secs(10))?;
    for client in 0..128usize {
        let (sdk, remaining, halfway) = (sdk.clone(), remaining.clone(), halfway.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = client;
            while let Ok(left) = remaining.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
                loop {
                    i += 1;
                    if let Ok(runtime) = create(&sdk[i % sdk.len()]).await {
                        if left == runtimes as u64 / 2 {
                            let _ = halfway.set(runtime.id);
                        }
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let create_seconds = started.elapsed().as_secs_f64();
    progress(&format!("scale: {runtimes} created in {create_seconds:.1} s; waiting until every one runs"));
    let settled_seconds = settled(&sdk[0], started).await?;
    quiesce(cluster, progress).await;
    let cpu_ms_per_create = (runtimeai_cpu(cluster) - cpu_before) * 1000.0 / runtimes as f64;
    let mut result = Scale {
        runtimes,
        create_seconds,
        creates_per_second: runtimes as f64 / create_seconds,
        settled_seconds,
        cpu_ms_per_create,
        ..Default::default()
    };
    for node in 1..=3 {
        if let Some((rss, peak)) = cluster.node(node).pid().and_then(memory_mib) {
            result.peak_rss_mib.insert(node, peak);
            result.rss_mib.insert(node, rss);
            let growth = rss - before.get(&node).copied().unwrap_or(0.0);
            result.growth_mib_per_100k.insert(node, growth * 100_000.0 / runtimes as f64);
        }
    }

    if let Some((&largest, _)) = result.rss_mib.iter().max_by(|a, b| a.1.total_cmp(b.1)) {
        result.store_mib = store_mib(cluster, largest).await;
    }

    progress("scale: list pages through a follower");
    let middle = halfway.get().cloned().unwrap_or_default();
    let lister = 2;
    result.level0_files_at_lists = storage_gauge(cluster, lister, "runtimeai_storage_level0_files").await;
    result.list_pages = list_pages(&sdk[lister as usize - 1], &middle).await?;

    progress("scale: add a fourth node; it catches up by snapshot");
    match add_fourth_node(http, cluster, &targets[0], progress).await {
        Ok(seconds) => result.catch_up_seconds = seconds,
        // Reported with the figures above, which stand without it.
        Err(e) => result.catch_up_error = Some(e.to_string()),
    }

    progress("scale: restart a node with that state");
    cluster.kill(3);
    let started = Instant::now();
    cluster.spawn(3)?;
    cluster.wait_ready(3, Duration::from_secs(600)).await?;
    result.restart_seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

/// Adds node 4 through `leader_url`'s node until it is a voter; the seconds it took. The API
/// waits a while for the learner to catch up, then answers 409 and leaves it a learner; asking
/// again resumes the wait (and so does a 503 while there is no leader).
async fn add_fourth_node(
    http: &reqwest::Client,
    cluster: &mut Cluster,
    leader_url: &str,
    progress: &impl Fn(&str),
) -> Result<f64> {
    cluster.start_joiner(4)?;
    let started = Instant::now();
    loop {
        let added = http
            .post(format!("{leader_url}/v1/cluster/members"))
            .json(&json!({"id": 4, "grpc": cluster.node(4).grpc}))
            .timeout(Duration::from_secs(120))
            .send()
            .await?;
        let in_time = started.elapsed() < Duration::from_secs(900);
        match added.status().as_u16() {
            201 => return Ok(started.elapsed().as_secs_f64()),
            409 if in_time => {
                progress(&format!("(node 4 still catching up after {:.0} s)", started.elapsed().as_secs_f64()))
            }
            // No leader for a moment (an election): asked again, as a client would.
            503 if in_time && added.headers().contains_key("retry-after") => {
                let body = added.text().await.unwrap_or_default();
                progress(&format!("(no leader after {:.0} s, asking again: {body})", started.elapsed().as_secs_f64()));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            status => {
                let body = added.text().await.unwrap_or_default();
                return Err(Error::Cluster(format!("adding node 4: {status} {body}")));
            }
        }
    }
}

/// The `q` quantile of latencies `sorted_us` (ascending, microseconds), in milliseconds.
fn quantile_ms(sorted_us: &[u64], q: f64) -> f64 {
    let index = ((sorted_us.len() as f64 * q) as usize).min(sorted_us.len().saturating_sub(1));
    sorted_us.get(index).copied().unwrap_or(0) as f64 / 1000.0
}

/// Node `id`'s store figures from its `/metrics`, in MiB, by gauge (`memtable`, `live_data`...).
async fn store_mib(cluster: &Cluster, id: u64) -> BTreeMap<String, f64> {
    let Ok(response) = cluster.call(id, reqwest::Method::GET, "/metrics", None, &[]).await else {
        return BTreeMap::new();
    };
    let text = response.body.as_str().unwrap_or_default();
    let sums = crate::stages::gauge_sums(text, "runtimeai_storage_");
    let bytes = sums.into_iter().filter_map(|(name, value)| {
        let part = name.strip_prefix("runtimeai_storage_")?.strip_suffix("_bytes")?.to_string();
        Some((part, value / (1024.0 * 1024.0)))
    });
    bytes.collect()
}

/// Node `id`'s gauge `name`, summed over its labels (column families), if it answers.
async fn storage_gauge(cluster: &Cluster, id: u64, name: &str) -> Option<f64> {
    let response = cluster.call(id, reqwest::Method::GET, "/metrics", None, &[]).await.ok()?;
    crate::stages::gauge_sums(response.body.as_str()?, name).remove(name)
}

/// Waits until no runtime is still being created; the time since `started`.
async fn settled(client: &Client, started: Instant) -> Result<f64> {
    loop {
        let (status, page) = client
            .request_raw(reqwest::Method::GET, "/v1/runtimes?state=creating&page_size=1", None)
            .await
            .map_err(|e| Error::Cluster(e.to_string()))?;
        let creating =
            page["items"].as_array().is_none_or(|items| !items.is_empty()) || page["next_page_token"].is_string();
        if status == 200 && !creating {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(3600) {
            return Err(Error::Cluster("runtimes still creating after an hour".into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each kind of list page [`LIST_SAMPLES`] times in a row; `middle` is the page token of one
/// halfway through.
async fn list_pages(client: &Client, middle: &str) -> Result<Vec<ListPage>> {
    let mut pages = Vec::new();
    let kinds = [
        ("first", "page_size=50".to_string()),
        ("middle", format!("page_size=50&page_token={middle}")),
        ("state=running", "page_size=50&state=running".to_string()),
    ];
    for (page, query) in kinds {
        let path = format!("/v1/runtimes?{query}");
        let mut latencies_us = Vec::with_capacity(LIST_SAMPLES);
        for _ in 0..LIST_SAMPLES {
            let asked = Instant::now();
            let (status, body) = client
                .request_raw(reqwest::Method::GET, &path, None)
                .await
                .map_err(|e| Error::Cluster(e.to_string()))?;
            latencies_us.push(asked.elapsed().as_micros() as u64);
            let items = body["items"].as_array().map_or(0, Vec::len);
            if status != 200 || items != 50 {
                return Err(Error::Cluster(format!("list page {page}: {status}, {items} items")));
            }
        }
        latencies_us.sort_unstable();
        let (p50_ms, p99_ms, max_ms) =
            (quantile_ms(&latencies_us, 0.5), quantile_ms(&latencies_us, 0.99), quantile_ms(&latencies_us, 1.0));
        pages.push(ListPage { page, p50_ms, p99_ms, max_ms });
    }
    Ok(pages)
}

/// `bench-results.json`, `bench-results.md` and `bench.png` in `dir`; returns the markdown.
pub fn write(results: &BenchResults, dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let json_path = dir.join("bench-results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(results)?)
        .map_err(Error::io(format!("write {}", json_path.display())))?;
    let markdown = markdown(results);
    let md_path = dir.join("bench-results.md");
    std::fs::write(&md_path, &markdown).map_err(Error::io(format!("write {}", md_path.display())))?;
    if results.levels.is_empty() {
        return Ok(markdown);
    }
    if let Err(e) = plot(results, &dir.join("bench.png")) {
        return Ok(format!("{markdown}\n(no plot: {e})\n"));
    }
    Ok(markdown)
}

fn markdown(results: &BenchResults) -> String {
    let mut text = String::new();
    if !results.levels.is_empty() {
        text.push_str(&levels_markdown(results));
    }
    text.push_str(&more_markdown(results));
    if let Some(error) = &results.failover_error {
        text.push_str(&format!("\nFailover measurement failed: {error}\n"));
    }
    if let Some(error) = &results.scale_error {
        text.push_str(&format!("\nScale measurement failed: {error}\n"));
    }
    if let Some(scale) = &results.scale {
        text.push_str(&scale_markdown(scale));
    }
    text
}

/// The levels' table, side by side.
fn levels_markdown(results: &BenchResults) -> String {
    let mut text = String::new();
    let transport = if results.options.plaintext {
        "Both systems in plain text (`--plaintext`)"
    } else {
        "Both systems with TLS for clients and mutual TLS between members"
    };
    let rounds = results.options.rounds.max(1);
    let balanced = match results.options.mode {
        Mode::Direct => String::new(),
        _ => format!(
            "Rows without \"direct\": wrk through a haproxy per system (round robin per request, keep-alive), \
             each level run {rounds} times per system interleaved (etcd, ours, ...); the figures are each \
             system's median run, named in the last column. "
        ),
    };
    text.push_str(&format!(
        "Payload {} bytes (a runtime's record). {:.0} s per write level, half that per read level. {balanced}\
         {transport}; every RuntimeAI request carries an API key.\n\n",
        results.payload_bytes,
        results.options.duration.as_secs_f64()
    ));
    text.push_str("| workload | clients | RuntimeAI ops/s | etcd ops/s | ratio | RuntimeAI p50 / p99 / p999 ms | etcd p50 / p99 / p999 ms | members' CPU ms per op (ours / etcd) | errors (ours / etcd) | run (ours / etcd) |\n");
    text.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for ours in results.levels.iter().filter(|l| l.system == "runtimeai") {
        let Some(theirs) = results.levels.iter().find(|l| {
            l.system == "etcd"
                && l.workload == ours.workload
                && l.clients == ours.clients
                && l.run.is_some() == ours.run.is_some()
        }) else {
            continue;
        };
        let (workload, run) = match (ours.run, theirs.run) {
            (Some(a), Some(b)) => (ours.workload.to_string(), format!("{a} / {b} of {rounds}")),
            _ => (format!("{}, direct", ours.workload), "–".to_string()),
        };
        text.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {:.3} / {:.3} | {} / {} | {run} |\n",
            workload,
            ours.clients,
            ours.per_second,
            theirs.per_second,
            ours.per_second / theirs.per_second.max(f64::MIN_POSITIVE),
            ours.p50_ms,
            ours.p99_ms,
            ours.p999_ms,
            theirs.p50_ms,
            theirs.p99_ms,
            theirs.p999_ms,
            ours.cpu_ms_per_op,
            theirs.cpu_ms_per_op,
            ours.errors,
            theirs.errors
        ));
    }
    text
}

/// The stages of our creates, what authentication costs, and failover.
fn more_markdown(results: &BenchResults) -> String {
    let mut text = String::new();
    if !results.stages.is_empty() {
        text.push_str("\n| where our creates' time went (first run of each write level, all members) | clients | count | mean ms | p99 ms (bucket bound) |\n|---|---|---|---|---|\n");
        for stage in &results.stages {
            text.push_str(&format!(
                "| {} | {} | {} | {:.2} | {:.2} |\n",
                stage.stage, stage.clients, stage.count, stage.mean_ms, stage.p99_ms
            ));
        }
    }
    let probes: Vec<&Level> =
        results.levels.iter().filter(|l| [PROBE_WITHOUT_KEY, PROBE_WITH_KEY].contains(&l.workload)).collect();
    if !probes.is_empty() {
        text.push_str("\n| what authentication costs (RuntimeAI alone) | clients | ops/s | p50 / p99 ms | members' CPU ms per request |\n|---|---|---|---|---|\n");
        for l in probes {
            text.push_str(&format!(
                "| {} | {} | {:.0} | {:.1} / {:.1} | {:.3} |\n",
                l.workload, l.clients, l.per_second, l.p50_ms, l.p99_ms, l.cpu_ms_per_op
            ));
        }
    }
    if !results.failover.is_empty() {
        text.push_str(
            "\n| failover (SIGKILL the leader under 16 writing clients) | gap to the first acknowledged write: median | max | every round |\n|---|---|---|---|\n",
        );
        for f in &results.failover {
            let rounds: Vec<String> = f.gaps_ms.iter().map(|g| format!("{g:.0}")).collect();
            text.push_str(&format!(
                "| {} | {:.0} ms | {:.0} ms | {} |\n",
                f.system,
                f.median_ms,
                f.max_ms,
                rounds.join(", ")
            ));
        }
    }
    text
}

fn scale_markdown(s: &Scale) -> String {
    let max = |m: &BTreeMap<u64, f64>| m.values().copied().fold(0.0, f64::max);
    let mut rows = vec![
        format!("| create through the API (128 clients) | {:.1} s ({:.0}/s) |", s.create_seconds, s.creates_per_second),
        format!("| ... until every runtime runs (its create operation run) | {:.1} s |", s.settled_seconds),
        format!("| peak resident memory, largest node | {:.0} MiB |", max(&s.peak_rss_mib)),
        format!("| resident memory at the end, largest node | {:.0} MiB |", max(&s.rss_mib)),
        format!(
            "| resident memory growth per 100 000 runtimes, largest node | {:.0} MiB |",
            max(&s.growth_mib_per_100k)
        ),
        format!(
            "| CPU time of the three members per create (its operation included) | {:.2} ms |",
            s.cpu_ms_per_create
        ),
    ];
    if !s.store_mib.is_empty() {
        let parts: Vec<String> = s.store_mib.iter().map(|(part, mib)| format!("{part} {mib:.0}")).collect();
        rows.push(format!("| of the largest node, its store (MiB) | {} |", parts.join(", ")));
    }
    for page in &s.list_pages {
        rows.push(format!(
            "| a list page of 50 ({}, through a follower), p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
            page.page, page.p50_ms, page.p99_ms, page.max_ms
        ));
    }
    if let Some(files) = s.level0_files_at_lists {
        rows.push(format!("| level-0 table files of that follower as its lists began (all families) | {files:.0} |"));
    }
    let caught_up = match &s.catch_up_error {
        Some(error) => format!("failed: {error}"),
        None => format!("{:.1} s", s.catch_up_seconds),
    };
    rows.push(format!(
        "| a new node catches up by snapshot (this cluster: `--snapshot-count={}`) and becomes a voter | {caught_up} |",
        scale_snapshot_count(s.runtimes),
    ));
    rows.push(format!("| a node restarts with that state until ready | {:.1} s |", s.restart_seconds));
    format!("\n| scale | {} runtimes |\n|---|---|\n{}\n", s.runtimes, rows.join("\n"))
}

/// A plotted quantity: its title and how to read it off a level.
type Metric = (&'static str, fn(&Level) -> f64);

fn plot(results: &BenchResults, path: &Path) -> std::result::Result<(), String> {
    crate::report::register_font()?;
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(700);
        // Through the load balancer when measured so (levels with a run), else direct.
        let balanced = results.levels.iter().any(|l| l.run.is_some());
        let writes: Vec<&Level> =
            results.levels.iter().filter(|l| l.workload == "write" && l.run.is_some() == balanced).collect();
        let max_clients = writes.iter().map(|l| l.clients).max().unwrap_or(1) as f64 * 1.5;
        let metrics: [Metric; 2] = [("writes per second", |l| l.per_second), ("p99 write latency (ms)", |l| l.p99_ms)];
        for (area, (title, value)) in [&left, &right].into_iter().zip(metrics) {
            let max_y = writes.iter().map(|l| value(l)).fold(1.0, f64::max) * 1.2;
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{title} vs clients"), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((0.8f64..max_clients).log_scale(), 0f64..max_y)?;
            chart.configure_mesh().x_desc("concurrent clients").y_desc(title).draw()?;
            for (system, color) in [("runtimeai", RGBColor(30, 90, 200)), ("etcd", RGBColor(220, 110, 0))] {
                let points: Vec<(f64, f64)> =
                    writes.iter().filter(|l| l.system == system).map(|l| (l.clients as f64, value(l))).collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(system)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
                chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("drawing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU time the kernel has charged this process, user and system, from `getrusage`.
    fn rusage_seconds() -> f64 {
        use nix::sys::resource::{getrusage, UsageWho};
        let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
        let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        seconds(usage.user_time()) + seconds(usage.system_time())
    }

    /// Spinning grows the figure: the test spins until it has grown by 0.2 s, however long a
    /// loaded machine takes to give it that much CPU (wall time bounds only a figure that never
    /// grows). The figure agrees with the kernel's own account from `getrusage`.
    #[test]
    fn a_process_cpu_time_is_read_and_grows_with_work() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).expect("our own /proc/<pid>/stat");
        let started = Instant::now();
        let mut spin = 0u64;
        let mut used = 0.0;
        while used < 0.2 {
            assert!(started.elapsed() < Duration::from_secs(30), "30 s of spinning counted as only {used} s of CPU");
            for _ in 0..1_000_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
            used = cpu_seconds(pid).unwrap() - before;
        }
        // /proc cuts user and system time each down to whole clock ticks (10 ms), so it lags
        // getrusage by less than two ticks and never leads it.
        let (stat_before, rusage, stat_after) =
            (cpu_seconds(pid).unwrap(), rusage_seconds(), cpu_seconds(pid).unwrap());
        assert!(
            stat_before <= rusage + 1e-6 && rusage <= stat_after + 0.02 + 1e-6,
            "/proc says {stat_before} s then {stat_after} s, getrusage {rusage} s"
        );
        assert_eq!(cpu_seconds(u32::MAX), None, "no such process");
    }

    #[test]
    fn a_level_reports_cpu_per_successful_call_and_the_table_shows_both_systems() {
        let load = |latencies_us: Vec<u64>| Load { latencies_us, errors: 1, elapsed: Duration::from_secs(2) };
        let ours = level("runtimeai", "write", 4, load(vec![3000, 1000, 2000, 4000]), 0.010);
        assert_eq!((ours.ok, ours.errors, ours.per_second), (4, 1, 2.0));
        assert_eq!(ours.cpu_ms_per_op, 2.5, "10 ms of CPU over 4 successful calls; the failed one is not a call done");
        let theirs = level("etcd", "write", 4, load(vec![1000, 1000]), 0.003);
        assert_eq!(theirs.cpu_ms_per_op, 1.5);
        let options = BenchOptions {
            concurrency: vec![4],
            duration: Duration::from_secs(2),
            runtimes: 0,
            failover_rounds: 0,
            mode: Mode::Direct,
            rounds: 1,
            node_args: Vec::new(),
            plaintext: false,
            scale_only: false,
            log_dir: None,
        };
        let stage = crate::stages::Stage { clients: 4, stage: "one apply", count: 9, mean_ms: 0.5, p99_ms: 1.6 };
        let results = BenchResults {
            options,
            payload_bytes: 600,
            levels: vec![ours, theirs],
            runs: Vec::new(),
            stages: vec![stage],
            failover: Vec::new(),
            failover_error: None,
            scale: None,
            scale_error: None,
        };
        let table = markdown(&results);
        assert!(table.contains("| write, direct | 4 | 2 | 1 | 2.00 |"), "{table}");
        assert!(table.contains("| 2.500 / 1.500 | 1 / 1 | – |"), "{table}");
        assert!(table.contains("| one apply | 4 | 9 | 0.50 | 1.60 |"), "{table}");
    }

    #[test]
    fn a_node_arg_replaces_the_benchs_default_for_its_flag_in_either_form() {
        let defaults = [("--signals-interval-ms", "60000"), ("--simulated-step-ms", "1")];
        let given = |args: &[&str]| with_defaults(&defaults, &args.iter().map(|a| a.to_string()).collect::<Vec<_>>());
        assert_eq!(given(&[]), ["--signals-interval-ms=60000", "--simulated-step-ms=1"]);
        assert_eq!(given(&["--signals-interval-ms=900000"]), ["--simulated-step-ms=1", "--signals-interval-ms=900000"]);
        assert_eq!(
            given(&["--simulated-step-ms", "5"]),
            ["--signals-interval-ms=60000", "--simulated-step-ms", "5"],
            "the flag and its value as two arguments"
        );
        assert_eq!(
            given(&["--simulated-step-ms-extra=1"]),
            ["--signals-interval-ms=60000", "--simulated-step-ms=1", "--simulated-step-ms-extra=1"],
            "a longer flag is another flag"
        );
    }

    #[test]
    fn the_scale_table_names_every_target_and_the_snapshot_interval_it_ran_with() {
        let page = |page, p99_ms| ListPage { page, p50_ms: 1.0, p99_ms, max_ms: 9.0 };
        let scale = Scale {
            runtimes: 1_000_000,
            create_seconds: 150.0,
            creates_per_second: 6_666.7,
            settled_seconds: 170.0,
            peak_rss_mib: [(1, 900.0), (2, 1500.0)].into(),
            list_pages: vec![page("first", 2.5), page("state=running", 4.0)],
            level0_files_at_lists: Some(7.0),
            catch_up_seconds: 12.0,
            restart_seconds: 1.5,
            ..Default::default()
        };
        let table = scale_markdown(&scale);
        for row in [
            "| scale | 1000000 runtimes |",
            "| ... until every runtime runs (its create operation run) | 170.0 s |",
            "| peak resident memory, largest node | 1500 MiB |",
            "| a list page of 50 (state=running, through a follower), p50 / p99 / max | 1.0 / 4.0 / 9.0 ms |",
            "| level-0 table files of that follower as its lists began (all families) | 7 |",
            "(this cluster: `--snapshot-count=10000`) and becomes a voter | 12.0 s |",
            "| a node restarts with that state until ready | 1.5 s |",
        ] {
            assert!(table.contains(row), "{row} in {table}");
        }
        assert_eq!(scale_snapshot_count(100_000), 1_000);
    }
}
