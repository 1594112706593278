//! The named scenarios and the run that drives one: start a cluster, run the workload, inject the
//! scenario's faults in the middle of it, heal everything, check that the cluster accepts writes
//! again (liveness), then judge the history and the cluster's state ([`crate::checks`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

use crate::checks::{self, CheckResult, Violation};
use crate::cluster::{Cluster, ClusterOptions};
use crate::error::{Error, Result};
use crate::workload::{self, Call, History, Outcome, Record, Targets, WorkloadOptions};

mod load;
mod network;

/// What a scenario needs of the cluster it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    /// Links between nodes through the harness's proxies.
    Network,
    /// Data directories on disks the harness can fill.
    Disks,
}

/// A named fault schedule.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    /// What it injects, for `runtimeai-chaos list` and the README.
    pub injects: &'static str,
    needs: Needs,
    /// Extra node flags.
    node_args: &'static [&'static str],
}

/// How soon every member must take writes again after its connections stall: an election
/// (up to 1 s with the default timing) plus the keep-alive that finds a dead connection (3 s),
/// and a forwarded write that may take 5 s to fail, with ample room for a loaded machine. The
/// members are tried in turn against this one bound; the report shows how long it really took.
const RECOVER_WITHIN: Duration = Duration::from_secs(30);

/// How long the harness waits for the cluster to get somewhere it reaches in seconds when
/// healthy (a leader, a ready node, a finished operation); the waits end as soon as it does,
/// so the bound only matters when something is really broken, and a loaded machine is slow.
const SETTLE: Duration = Duration::from_secs(60);

/// Raft timing for links with round trips up to ~250 ms: openraft gives each replication RPC one
/// heartbeat interval, so the interval must exceed the worst round trip (etcd's tuning guide says
/// the same of its heartbeat).
const WAN_TUNING: &[&str] = &["--heartbeat-ms", "300", "--election-timeout-ms", "1500"];

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "kill-leader",
        injects: "SIGKILL the leader; restart it after the fault window",
        needs: Needs::Nothing,
        node_args: &[],
    },
    Scenario {
        name: "pause-leader",
        injects: "SIGSTOP the leader for the fault window, then SIGCONT (a leader that wakes up deposed)",
        needs: Needs::Nothing,
        node_args: &[],
    },
    Scenario {
        name: "rolling-restart",
        injects: "SIGKILL and restart every node in turn, each back and ready before the next",
        needs: Needs::Nothing,
        node_args: &[],
    },
    Scenario {
        name: "kill-during-snapshot-install",
        injects: "stop a follower until the leader's log is purged past it, restart it, SIGKILL it as the \
                  snapshot's first chunk arrives, restart it again",
        needs: Needs::Nothing,
        node_args: &["--snapshot-count", "100", "--snapshot-catchup-entries", "100", "--snapshot-chunk-bytes", "8192"],
    },
    Scenario {
        name: "partition-leader",
        injects: "cut the leader off from every other node (both directions)",
        needs: Needs::Network,
        node_args: &[],
    },
    Scenario {
        name: "partition-minority",
        injects: "cut a minority of followers off from the majority, which keeps the leader",
        needs: Needs::Network,
        node_args: &[],
    },
    Scenario {
        name: "bridge",
        injects: "split the cluster in two sides that cannot reach each other, with one node (the bridge) \
                  reaching both; the leader on one side",
        needs: Needs::Network,
        node_args: &[],
    },
    Scenario {
        name: "one-way-leader",
        injects: "nothing the leader sends arrives anywhere; what others send to it still arrives",
        needs: Needs::Network,
        node_args: &[],
    },
    Scenario {
        name: "lossy-network",
        injects: "every link loses 50 % of its packets (retransmitted after 200 ms, doubling); nodes tuned \
                  for such links (heartbeat 300 ms, election timeout 1.5 s)",
        needs: Needs::Network,
        node_args: WAN_TUNING,
    },
    Scenario {
        name: "slow-network",
        injects: "every link delays every packet 75 ± 50 ms; nodes tuned for such links (heartbeat 300 ms, \
                  election timeout 1.5 s)",
        needs: Needs::Network,
        node_args: WAN_TUNING,
    },
    Scenario {
        name: "stalled-connections",
        injects: "the connections the followers opened to the leader (forwarded writes, read indexes) stop \
                  delivering, as TCP connections left in retransmission backoff by a bad spell do; the links \
                  are fine, so new connections get through",
        needs: Needs::Network,
        node_args: &[],
    },
    Scenario {
        name: "large-writes",
        injects: "bursts of 30 creates of ~900 kB each through every member at once, for the fault window: \
                  each is created or shed with Retry-After, and the leader stays",
        needs: Needs::Nothing,
        node_args: &[],
    },
    Scenario {
        name: "flood",
        injects: "one principal sends creates to the leader as fast as 32 connections allow, for the fault \
                  window (nodes limit a principal to 40 requests/s): it gets 429s, and the workload's calls \
                  through the other nodes keep their p99 within 2x of the quiet run's",
        needs: Needs::Nothing,
        node_args: &["--rate-limit-principal", load::FLOOD_RATE],
    },
    Scenario {
        name: "slow-loris",
        injects: "1,000 TLS connections spread over the members send a request's headers a byte a second \
                  (a new one for each the server closes) for 15 s once all are open: the nodes close every \
                  one on their 10 s header-read timeout, and the workload keeps its p99 within 2x of the quiet run's",
        needs: Needs::Nothing,
        node_args: &[],
    },
    Scenario {
        name: "list-storm",
        injects: "300 clients list at once (every page, by state, by type, by a selector nothing matches, \
                  from random places) over 1,000 runtimes per second of --duration (5,000 to 100,000), \
                  for the fault window: each node's memory grows less than 256 MiB, and writes go on",
        needs: Needs::Nothing,
        node_args: &[],
    },
    Scenario {
        name: "membership-change",
        injects: "add a new node, then remove the leader from the cluster, while clients write",
        needs: Needs::Nothing,
        node_args: &[],
    },
    Scenario {
        name: "disk-full",
        injects: "fill a follower's data disk; the node must stop with a clear error and recover once space \
                  is back",
        needs: Needs::Disks,
        node_args: &["--snapshot-count", "40"],
    },
    Scenario {
        name: "disk-read-only",
        injects: "restart a follower on a read-only data disk; it must refuse to start with a clear error, \
                  and start and catch up once the disk is writable",
        needs: Needs::Disks,
        node_args: &[],
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// How to run a scenario.
#[derive(Debug, Clone, Serialize)]
pub struct RunOptions {
    pub scenario: String,
    #[serde(with = "humantime_serde_compat")]
    pub duration: Duration,
    pub seed: u64,
    pub nodes: u64,
    pub clients: usize,
    /// Where the run's files go; the nodes' logs are copied there at the end.
    #[serde(skip)]
    pub dir: PathBuf,
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub fault: String,
    pub start_us: u64,
    pub end_us: u64,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub options: RunOptions,
    pub faults: Vec<FaultRecord>,
    pub checks: Vec<CheckResult>,
    pub violation: Option<Violation>,
    /// Per node: how long after the faults ended its first write succeeded.
    pub heal_ms: BTreeMap<u64, u64>,
    pub records: Vec<Record>,
    pub passed: bool,
}

/// What a fault schedule works with.
struct FaultContext {
    cluster: Cluster,
    history: History,
    targets: Targets,
    /// Current voting members.
    members: Vec<u64>,
    faults: Vec<FaultRecord>,
    /// How long each fault lasts.
    hold: Duration,
    rng: rand::rngs::StdRng,
    /// Checks a scenario adds (e.g. that a node with a full disk stopped).
    checks: Vec<CheckResult>,
    /// Bounds on the workload while a hostile client was at it, judged once the run is over.
    slowdowns: Vec<load::SlowdownBound>,
}

impl FaultContext {
    fn begin(&self) -> u64 {
        self.history.now()
    }

    fn end(&mut self, fault: String, start_us: u64) {
        eprintln!("  fault: {fault} ({:.1}s)", (self.history.now() - start_us) as f64 / 1e6);
        self.faults.push(FaultRecord { fault, start_us, end_us: self.history.now() });
    }

    async fn leader(&self) -> Result<u64> {
        self.cluster.wait_leader_among(&self.members, SETTLE).await
    }

    async fn followers(&self) -> Result<(u64, Vec<u64>)> {
        let leader = self.leader().await?;
        Ok((leader, self.members.iter().copied().filter(|n| *n != leader).collect()))
    }

    fn network(&self) -> Result<Arc<crate::proxy::Network>> {
        self.cluster.network.clone().ok_or_else(|| Error::Cluster("the cluster has no proxied network".into()))
    }

    /// A follower picked by the run's seed, and the leader.
    async fn random_follower(&mut self) -> Result<(u64, u64)> {
        let (leader, followers) = self.followers().await?;
        Ok((followers[self.rng.gen_range(0..followers.len())], leader))
    }

    /// Restarts node `node` and records the time until it is ready as the fault `what`.
    async fn restart_recorded(&mut self, node: u64, what: String) -> Result<()> {
        let start = self.begin();
        self.restart(node).await?;
        self.end(what, start);
        Ok(())
    }

    async fn restart(&mut self, node: u64) -> Result<()> {
        self.cluster.spawn(node)?;
        self.cluster.wait_ready(node, SETTLE).await
    }

    fn add_check(&mut self, name: &'static str, passed: bool, detail: String) {
        self.checks.push(CheckResult { name, passed, detail });
    }
}

/// Starts the cluster, runs workload and faults, heals, checks. An `Err` is a harness failure
/// (the run could not be made), not a verdict.
pub async fn run(scenario: &Scenario, options: RunOptions) -> Result<RunResult> {
    let infra = tempfile::Builder::new().prefix("runtimeai-chaos-infra-").tempdir().map_err(Error::io("temp dir"))?;
    let mut args: Vec<String> = vec![
        "--backends".into(),
        "vcluster=simulated".into(),
        "--simulated-step-ms".into(),
        "50".into(),
        "--operation-lease-ms".into(),
        "1500".into(),
        "--simulated-infra-dir".into(),
        infra.path().display().to_string(),
    ];
    args.extend(scenario.node_args.iter().map(|a| a.to_string()));
    let cluster_options = ClusterOptions {
        extra_args: args,
        proxied: (scenario.needs == Needs::Network).then_some(options.seed),
        isolated_disk_bytes: (scenario.needs == Needs::Disks).then_some(512 << 20),
        plaintext: false,
    };
    let cluster = Cluster::start(options.nodes, cluster_options).await?;
    let members: Vec<u64> = (1..=options.nodes).collect();

    if scenario.name == "list-storm" {
        load::populate(&cluster, load::storm_runtimes(options.duration)).await?;
    }
    let mut registers = Vec::new();
    for i in 0..3 {
        registers.push(create_register(&cluster, &format!("register-{i}")).await?);
    }

    let history = History::new(Instant::now());
    // Each register's value when the run starts, as a completed read at time 0.
    for register in &registers {
        let now = get_eventually(&cluster, 1, &format!("/v1/runtimes/{register}"), SETTLE).await?;
        history.push(register_read(1, register, &now, 0, history.now()));
    }
    let targets: Targets = Arc::new(Mutex::new(members.iter().map(|n| (*n, cluster.node(*n).base_url())).collect()));
    let workload_options = WorkloadOptions {
        clients: options.clients,
        duration: options.duration,
        seed: options.seed,
        request_timeout: Duration::from_secs(3),
        create_retries: 3,
    };
    let workload = {
        let (targets, registers, history) = (targets.clone(), registers.clone(), history.clone());
        tokio::spawn(async move { workload::run(&workload_options, targets, registers, history).await })
    };

    let mut cx = FaultContext {
        cluster,
        history: history.clone(),
        targets,
        members,
        faults: Vec::new(),
        hold: (options.duration / 2).max(Duration::from_secs(2)),
        rng: rand::rngs::StdRng::seed_from_u64(options.seed),
        checks: Vec::new(),
        slowdowns: Vec::new(),
    };
    tokio::time::sleep(options.duration / 5).await;
    let injected = inject(scenario.name, &mut cx).await;
    let _ = workload.await;
    heal_everything(&mut cx).await;
    injected?;
    let faults_over = Instant::now();

    let (heal_ms, liveness) = heals(&cx, faults_over).await;
    close_history(&cx, &registers, &history).await;

    let records = history.records();
    let (linearizable, violation) = checks::linearizable(&records);
    let mut results = vec![linearizable];
    results.push(checks::acknowledged_writes(&cx.cluster, &cx.members, &records, SETTLE).await);
    results.push(checks::backend_at_most_once(&infra.path().join("journal")));
    results.push(checks::idempotency(&records));
    results.push(checks::events_in_order(&cx.cluster, &cx.members, &records).await);
    results.push(liveness);
    results.append(&mut cx.checks);
    results.extend(cx.slowdowns.iter().map(|bound| bound.judge(&records, &cx.faults)));
    let progress = records.iter().filter(|r| r.outcome == Outcome::Ok && !matches!(r.call, Call::ReadRegister)).count();
    results.push(CheckResult {
        name: "progress",
        passed: progress > 0,
        detail: format!("{progress} writes and reads succeeded during the run"),
    });
    let passed = results.iter().all(|c| c.passed);
    std::fs::create_dir_all(&options.dir).map_err(Error::io(format!("create {}", options.dir.display())))?;
    for (id, node) in &cx.cluster.nodes {
        let _ = std::fs::copy(&node.log, options.dir.join(format!("node-{id}.log")));
    }
    Ok(RunResult { options, faults: cx.faults, checks: results, violation, heal_ms, records, passed })
}

/// Liveness: every member takes a write again within [`HEAL_WITHIN`] of `faults_over`; when
/// each took its first (ms), and the verdict.
async fn heals(cx: &FaultContext, faults_over: Instant) -> (BTreeMap<u64, u64>, CheckResult) {
    let (heal_ms, stuck) =
        writes_through_every_member(&cx.cluster, &cx.members, "heal", faults_over, HEAL_WITHIN).await;
    let liveness = CheckResult {
        name: "heals",
        passed: stuck.is_empty(),
        detail: if stuck.is_empty() {
            format!("every member took a write within {} ms of the faults ending", heal_ms.values().max().unwrap_or(&0))
        } else {
            format!("{} s after the faults ended, {}", HEAL_WITHIN.as_secs(), refusals(&stuck))
        },
    };
    (heal_ms, liveness)
}

/// A final linearizable read of each register through every member closes the history: an
/// acknowledged write that was lost shows up as a read no order explains.
async fn close_history(cx: &FaultContext, registers: &[String], history: &History) {
    for register in registers {
        for &node in &cx.members {
            let invoke = history.now();
            if let Ok(now) =
                cx.cluster.call(node, reqwest::Method::GET, &format!("/v1/runtimes/{register}"), None, &[]).await
            {
                if now.status == 200 {
                    history.push(register_read(node, register, &now.body, invoke, history.now()));
                }
            }
        }
    }
}

/// How soon after the faults end every member must take writes again: a deadline for the
/// members in turn, generous for a loaded machine; the report shows how long it really took.
const HEAL_WITHIN: Duration = Duration::from_secs(60);

/// A member that took no write in time: its id, how many writes it refused, and the last
/// refusal (what a client would have seen).
struct Refusing {
    node: u64,
    refused: usize,
    last: String,
}

/// Writes through each of `members` in turn until it takes one or `within` has passed since
/// `since`: when each took its first (ms after `since`), and the members that took none.
async fn writes_through_every_member(
    cluster: &Cluster,
    members: &[u64],
    prefix: &str,
    since: Instant,
    within: Duration,
) -> (BTreeMap<u64, u64>, Vec<Refusing>) {
    let mut took = BTreeMap::new();
    let mut stuck = Vec::new();
    for &node in members {
        let mut refused = 0;
        loop {
            let name = format!("{prefix}-{node}-{refused}");
            match create_vcluster(cluster, node, &name).await {
                Ok(_) => {
                    took.insert(node, since.elapsed().as_millis() as u64);
                    break;
                }
                Err(refusal) => {
                    refused += 1;
                    if since.elapsed() > within {
                        stuck.push(Refusing { node, refused, last: refusal.to_string() });
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (took, stuck)
}

fn refusals(stuck: &[Refusing]) -> String {
    let nodes: Vec<u64> = stuck.iter().map(|r| r.node).collect();
    let why: Vec<String> = stuck
        .iter()
        .map(|r| format!("node {} refused {} writes, the last with: {}", r.node, r.refused, r.last))
        .collect();
    format!("nodes {nodes:?} still refuse writes; {}", why.join("; "))
}

/// Creates a register (a runtime only the workload's If-Match writes change) through node 1 and
/// waits for its create operation; returns its id. Refusals while the cluster settles (5xx, no
/// answer) are retried with one idempotency key, so an attempt that did apply is not repeated.
async fn create_register(cluster: &Cluster, name: &str) -> Result<String> {
    let body = json!({"name": name, "type": "vcluster", "labels": {"chaos": "harness"}});
    let key = format!("chaos-{name}");
    let deadline = Instant::now() + SETTLE;
    let created = loop {
        let last = match cluster
            .call(1, reqwest::Method::POST, "/v1/runtimes", Some(&body), &[("idempotency-key", &key)])
            .await
        {
            Ok(created) if created.status == 201 => break created,
            Ok(refused) if refused.status < 500 => {
                return Err(Error::Cluster(format!("create {name}: {} {}", refused.status, refused.body)))
            }
            Ok(refused) => format!("{} {}", refused.status, refused.body),
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            return Err(Error::Cluster(format!("create {name}: still refused after {SETTLE:?}: {last}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(operation) = created.body["active_operation"].as_str() {
        cluster.wait_operation(1, operation, SETTLE).await?;
    }
    Ok(created.body["id"].as_str().unwrap_or_default().to_string())
}

/// `GET path` through `via` until it answers 200 or `within` has passed ([`Cluster::get_ok`]).
async fn get_eventually(cluster: &Cluster, via: u64, path: &str, within: Duration) -> Result<serde_json::Value> {
    let last = cluster.get_ok(via, path, Instant::now() + within).await;
    last.map_err(|last| Error::Cluster(format!("GET {path} through node {via} after {within:?}: {last}")))
}

/// Creates a runtime of the type every chaos node serves, through `via`.
async fn create_vcluster(cluster: &Cluster, via: u64, name: &str) -> Result<crate::cluster::Response> {
    let body = json!({"name": name, "type": "vcluster", "labels": {"chaos": "harness"}});
    let created = cluster.call(via, reqwest::Method::POST, "/v1/runtimes", Some(&body), &[]).await?;
    match created.status {
        201 => Ok(created),
        status => Err(Error::Cluster(format!("create {name} through node {via}: {status} {}", created.body))),
    }
}

fn register_read(node: u64, register: &str, body: &serde_json::Value, invoke_us: u64, complete_us: u64) -> Record {
    Record {
        client: usize::MAX,
        node,
        call: Call::ReadRegister,
        runtime: Some(register.to_string()),
        invoke_us,
        complete_us,
        outcome: Outcome::Ok,
        status: Some(200),
        detail: workload::register_value(body).unwrap_or_default(),
    }
}

/// Undoes whatever a fault left behind: links healed, paused nodes resumed, stopped members
/// started again, disks given back their space.
async fn heal_everything(cx: &mut FaultContext) {
    if let Some(network) = &cx.cluster.network {
        network.heal();
    }
    for node in cx.members.clone() {
        cx.cluster.signal(node, Signal::SIGCONT);
        if let Some(disk) = cx.cluster.disk(node) {
            let _ = disk.set_read_only(false);
            let _ = disk.free();
        }
        if cx.cluster.exited(node).is_some() || !cx.cluster.node(node).is_running() {
            let _ = cx.restart(node).await;
        }
    }
}

async fn inject(name: &str, cx: &mut FaultContext) -> Result<()> {
    let hold = cx.hold;
    match name {
        "kill-leader" => {
            let leader = cx.leader().await?;
            let start = cx.begin();
            cx.cluster.kill(leader);
            tokio::time::sleep(hold).await;
            cx.restart(leader).await?;
            cx.end(format!("SIGKILL leader {leader}, restarted"), start);
        }
        "pause-leader" => {
            let leader = cx.leader().await?;
            let start = cx.begin();
            cx.cluster.signal(leader, Signal::SIGSTOP);
            tokio::time::sleep(hold).await;
            cx.cluster.signal(leader, Signal::SIGCONT);
            cx.end(format!("SIGSTOP leader {leader}, then SIGCONT"), start);
        }
        "rolling-restart" => {
            for node in cx.members.clone() {
                let start = cx.begin();
                cx.cluster.kill(node);
                cx.restart(node).await?;
                cx.end(format!("restart node {node}"), start);
            }
        }
        "kill-during-snapshot-install" => kill_during_snapshot_install(cx).await?,
        "large-writes" => load::large_writes(cx).await?,
        "flood" => load::flood(cx).await?,
        "slow-loris" => load::slow_loris(cx).await?,
        "list-storm" => load::list_storm(cx).await?,
        "partition-leader"
        | "partition-minority"
        | "bridge"
        | "one-way-leader"
        | "lossy-network"
        | "slow-network"
        | "stalled-connections" => network::inject(name, cx).await?,
        "membership-change" => membership_change(cx).await?,
        "disk-full" => disk_full(cx).await?,
        "disk-read-only" => disk_read_only(cx).await?,
        other => return Err(Error::Cluster(format!("unknown scenario {other}"))),
    }
    Ok(())
}

async fn kill_during_snapshot_install(cx: &mut FaultContext) -> Result<()> {
    let (follower, leader) = cx.random_follower().await?;
    let start = cx.begin();
    cx.cluster.kill(follower);
    // The follower's log may hold entries it had not applied yet, but none the leader lacks:
    // once the leader has purged past its own last index of this moment, only a snapshot helps.
    let behind =
        get_eventually(&cx.cluster, leader, "/v1/cluster", SETTLE).await?["last_log_index"].as_u64().unwrap_or(0);
    purge_past(&cx.cluster, leader, behind).await?;
    let log = cx.cluster.node(follower).log.clone();
    let marker = "receiving a snapshot: first chunk";
    let count = || std::fs::read_to_string(&log).unwrap_or_default().matches(marker).count();
    let before = count();
    cx.cluster.spawn(follower)?;
    let deadline = Instant::now() + SETTLE;
    while count() == before {
        if Instant::now() > deadline {
            return Err(Error::Cluster(format!("node {follower} never started installing a snapshot")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cx.cluster.kill(follower);
    cx.end(format!("node {follower} SIGKILLed while installing a snapshot"), start);
    cx.restart_recorded(follower, format!("node {follower} restarted, catches up")).await
}

/// How long the leader may take to purge its log past a stopped follower. The harness writes
/// while it waits, so this only matters when purging is broken.
const PURGE_WITHIN: Duration = Duration::from_secs(120);

/// Waits until `leader` has purged its log past index `behind`. Purging needs a few hundred new
/// entries and the workload may have stopped, so the harness writes filler runtimes meanwhile.
async fn purge_past(cluster: &Cluster, leader: u64, behind: u64) -> Result<()> {
    let deadline = Instant::now() + PURGE_WITHIN;
    let mut filler = 0;
    loop {
        let purged = cluster.cluster_view(leader).await.ok().and_then(|v| v["purged_index"].as_u64());
        if purged.is_some_and(|p| p > behind) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Cluster(format!(
                "leader {leader} never purged its log past index {behind} (purged: {purged:?}) within {PURGE_WITHIN:?}"
            )));
        }
        // A refused filler (e.g. during an election) is no matter: the next round writes again.
        if create_vcluster(cluster, leader, &format!("filler-{filler}")).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        filler += 1;
    }
}

/// How long a membership change may take to be taken, retried meanwhile (see
/// [`change_membership`]); and how long one attempt may block while a joiner catches up (the
/// node answers within a minute, 409 if the joiner is still behind).
const MEMBERSHIP_WITHIN: Duration = Duration::from_secs(300);
const MEMBERSHIP_ATTEMPT: Duration = Duration::from_secs(120);

/// A membership change (`POST` or `DELETE` of `/v1/cluster/members...`) through `via`, retried
/// while the cluster cannot take it yet (409: a joiner still catching up, 503: an election, or
/// no answer) until [`MEMBERSHIP_WITHIN`]. Both requests are safe to repeat; a 404 to a repeated
/// `DELETE` means an earlier attempt whose answer was lost removed the member.
async fn change_membership(
    cluster: &Cluster,
    via: u64,
    method: reqwest::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<crate::cluster::Response> {
    let deadline = Instant::now() + MEMBERSHIP_WITHIN;
    let mut repeated = false;
    loop {
        let answer = cluster.call_within(via, method.clone(), path, body, &[], Some(MEMBERSHIP_ATTEMPT)).await;
        let last = match answer {
            Ok(done) if (200..300).contains(&done.status) => return Ok(done),
            Ok(gone) if gone.status == 404 && repeated && method == reqwest::Method::DELETE => return Ok(gone),
            Ok(refused) if [409, 503].contains(&refused.status) => format!("{} {}", refused.status, refused.body),
            Ok(refused) => return Err(Error::Cluster(format!("{method} {path}: {} {}", refused.status, refused.body))),
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            return Err(Error::Cluster(format!("{method} {path}: still refused after {MEMBERSHIP_WITHIN:?}: {last}")));
        }
        repeated = true;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn membership_change(cx: &mut FaultContext) -> Result<()> {
    let new = cx.cluster.nodes.keys().max().copied().unwrap_or(0) + 1;
    let start = cx.begin();
    cx.cluster.start_joiner(new)?;
    let (leader, followers) = cx.followers().await?;
    let via = followers.first().copied().unwrap_or(leader);
    let body = json!({"id": new, "grpc": cx.cluster.node(new).grpc});
    change_membership(&cx.cluster, via, reqwest::Method::POST, "/v1/cluster/members", Some(&body)).await?;
    cx.members.push(new);
    cx.targets.lock().expect("targets").insert(new, cx.cluster.node(new).base_url());
    cx.end(format!("node {new} added"), start);

    tokio::time::sleep(cx.hold / 2).await;
    let leader = cx.leader().await?;
    let via = cx.members.iter().copied().find(|n| *n != leader).unwrap_or(new);
    let start = cx.begin();
    // Clients stop sending to the node before it leaves, as a load balancer drains it.
    cx.targets.lock().expect("targets").remove(&leader);
    change_membership(&cx.cluster, via, reqwest::Method::DELETE, &format!("/v1/cluster/members/{leader}"), None)
        .await?;
    cx.members.retain(|n| *n != leader);
    cx.cluster.signal(leader, Signal::SIGTERM);
    cx.end(format!("leader {leader} removed"), start);
    Ok(())
}

async fn disk_full(cx: &mut FaultContext) -> Result<()> {
    let (node, _) = cx.random_follower().await?;
    let start = cx.begin();
    cx.cluster.disk(node).ok_or_else(|| Error::Cluster("no isolated disk".into()))?.fill()?;
    // The write that hits the full disk may be a snapshot at nice 19, late on a loaded machine.
    let within = cx.hold.max(EXIT_WITHIN);
    let (exit, reason) = exit_and_reason(cx, node, within, "No space left on device").await;
    let stopped_cleanly = exit.is_some_and(|s| !s.success()) && !reason.is_empty();
    cx.add_check(
        "full-disk-stops-the-node",
        stopped_cleanly,
        match exit {
            Some(status) => format!("node {node} stopped ({status}) saying: {}", tail(&reason)),
            None => format!("node {node} still runs on a full disk after {within:?}"),
        },
    );
    cx.cluster.kill(node);
    cx.cluster.disk(node).expect("disk").free()?;
    cx.end(format!("node {node}'s disk full"), start);
    cx.restart_recorded(node, format!("node {node} restarted with space")).await
}

async fn disk_read_only(cx: &mut FaultContext) -> Result<()> {
    let (node, _) = cx.random_follower().await?;
    let start = cx.begin();
    cx.cluster.kill(node);
    let disk = cx.cluster.disk(node).ok_or_else(|| Error::Cluster("no isolated disk".into()))?;
    disk.set_read_only(true)?;
    cx.cluster.spawn(node)?;
    let (exit, reason) = exit_and_reason(cx, node, EXIT_WITHIN, "Read-only file system").await;
    cx.add_check(
        "read-only-disk-refused",
        exit.is_some_and(|s| !s.success()) && !reason.is_empty(),
        match exit {
            Some(status) => format!("node {node} refused to start ({status}): {}", tail(&reason)),
            None => format!("node {node} still runs on a read-only disk after {EXIT_WITHIN:?}"),
        },
    );
    cx.cluster.kill(node);
    tokio::time::sleep(cx.hold.saturating_sub(Duration::from_secs(1))).await;
    cx.cluster.disk(node).expect("disk").set_read_only(false)?;
    cx.end(format!("node {node}'s disk read-only"), start);
    cx.restart_recorded(node, format!("node {node} restarted on a writable disk")).await
}

/// How long a node on a broken disk may take to stop: the wait ends as soon as it does.
const EXIT_WITHIN: Duration = Duration::from_secs(60);

/// Waits up to `within` for node `node` to exit; returns its exit status and the last line of
/// its log that mentions `error` (the reason it gave).
async fn exit_and_reason(
    cx: &mut FaultContext,
    node: u64,
    within: Duration,
    error: &str,
) -> (Option<std::process::ExitStatus>, String) {
    let deadline = Instant::now() + within;
    let mut exit = None;
    while exit.is_none() && Instant::now() < deadline {
        exit = cx.cluster.exited(node);
        if exit.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let log = std::fs::read_to_string(&cx.cluster.node(node).log).unwrap_or_default();
    (exit, log.lines().rev().find(|l| l.contains(error)).unwrap_or("").to_string())
}

/// The end of a long log line, enough to show the error.
fn tail(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    chars[chars.len().saturating_sub(160)..].iter().collect()
}

/// Where the files of a run of `scenario` with `seed` go, under `base`.
pub fn run_dir(base: &std::path::Path, scenario: &str, seed: u64) -> PathBuf {
    base.join(format!("{scenario}-seed{seed}"))
}
