//! The clients: a bounded number of them, for a bounded time, each a seeded mix of
//! - reads and `If-Match` label writes of a few shared **register** runtimes (the history the
//!   linearizability checker judges: value = `version:label`),
//! - **creates** with an `Idempotency-Key`, retried with the same key through another node when
//!   the answer is unknown,
//! - **lifecycle** calls (stop / start / restart) on the runtimes the client created,
//! - **reads** of those runtimes through every node,
//!
//! recording each call as invoke / ok / fail / unknown with its times.
//!
//! Clients pick a node at random for every call, as a round-robin load balancer would, and
//! like one with passive health checks (HAProxy's `observe`, Envoy's outlier detection) they
//! leave a node alone for a while after it timed out, refused the connection or answered 503.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use runtimeai_client::{Client, ClientConfig, ClientError, Lifecycle, Relabel};
use serde::Serialize;
use serde_json::{json, Value};

use crate::linearizability::{Operation, RegisterInput, RegisterOutput};

/// What a call's answer says about its effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It took effect (2xx).
    Ok,
    /// It did not take effect (a definite refusal: 4xx, or a 503 that says nothing was done).
    Fail,
    /// It may or may not have (a timeout, a dropped connection, a 5xx after sending).
    Unknown,
}

/// What kind of call a record is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Call {
    /// A linearizable read of a register runtime.
    ReadRegister,
    /// `PATCH` of a register runtime's label `v` with `If-Match`.
    WriteRegister { from: String, to: String },
    /// `POST /v1/runtimes`; `attempt` counts retries of the same idempotency key from 1.
    Create { name: String, idempotency_key: String, attempt: u32 },
    /// A lifecycle call on a created runtime.
    Lifecycle { action: String },
    /// A read of a created runtime.
    ReadRuntime,
}

/// One call as the client saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub client: usize,
    /// The node the call was sent to.
    pub node: u64,
    #[serde(flatten)]
    pub call: Call,
    /// The runtime it concerns (the created one, for a create that succeeded).
    pub runtime: Option<String>,
    /// Microseconds since the run started.
    pub invoke_us: u64,
    /// When the answer came, or when the client gave up.
    pub complete_us: u64,
    pub outcome: Outcome,
    pub status: Option<u16>,
    /// What a read saw (register value), the operation a lifecycle call queued, or an error.
    pub detail: String,
}

/// The history of a run, shared by its clients.
#[derive(Clone)]
pub struct History {
    started: Instant,
    records: Arc<Mutex<Vec<Record>>>,
}

impl History {
    pub fn new(started: Instant) -> History {
        History { started, records: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Microseconds since the run started.
    pub fn now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn push(&self, record: Record) {
        self.records.lock().expect("history lock").push(record);
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.lock().expect("history lock").clone()
    }
}

/// The register a runtime is for the checker: its version and its label `v`.
pub fn register_value(body: &Value) -> Option<String> {
    Some(register_text(body["version"].as_u64()?, body["labels"]["v"].as_str()))
}

/// `version:label`, the value the checker compares.
fn register_text(version: u64, label: Option<&str>) -> String {
    format!("{version}:{}", label.unwrap_or(""))
}

/// The register operations of a history, for [`crate::linearizability::check`]: reads and
/// writes of each register runtime; an unknown write returns at +∞.
pub fn register_history(records: &[Record]) -> Vec<Operation<RegisterInput, RegisterOutput>> {
    records
        .iter()
        .filter_map(|r| {
            let key = r.runtime.clone()?;
            let (input, output) = match (&r.call, r.outcome) {
                (Call::ReadRegister, Outcome::Ok) => {
                    (RegisterInput::Read, RegisterOutput::Value(Some(r.detail.clone())))
                }
                (Call::WriteRegister { from, to }, outcome) => {
                    let input = RegisterInput::Cas { from: from.clone(), to: to.clone() };
                    match (outcome, r.status) {
                        (Outcome::Ok, _) => (input, RegisterOutput::Swapped(true)),
                        // Only 412 says the comparison failed; other refusals (never sent, 4xx)
                        // mean the write had no effect at all, which is no operation.
                        (Outcome::Fail, Some(412)) => (input, RegisterOutput::Swapped(false)),
                        (Outcome::Fail, _) => return None,
                        (Outcome::Unknown, _) => (input, RegisterOutput::Unknown),
                    }
                }
                _ => return None,
            };
            let ret = (r.outcome != Outcome::Unknown).then_some(r.complete_us);
            Some(Operation { key, input, output, call: r.invoke_us, ret })
        })
        .collect()
}

/// How the clients run.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub clients: usize,
    pub duration: Duration,
    pub seed: u64,
    /// Every call gives up after this long (the outcome is then unknown).
    pub request_timeout: Duration,
    /// Retries of a create whose answer was unknown, with the same idempotency key.
    pub create_retries: u32,
}

/// Where the clients send their calls: the nodes serving the API now (a scenario removes a
/// node it takes out of the cluster).
pub type Targets = Arc<Mutex<BTreeMap<u64, String>>>;

/// One SDK client per member (by base URL), shared by the workers: each call goes to the member
/// a worker picked, so each client names one server and never fails over by itself.
#[derive(Clone)]
struct Members {
    config: ClientConfig,
    clients: Arc<Mutex<BTreeMap<String, Client>>>,
}

impl Members {
    fn client(&self, url: &str) -> Option<Client> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(client) = clients.get(url) {
            return Some(client.clone());
        }
        let client = crate::cluster::member_client(&self.config, url).ok()?;
        clients.insert(url.to_string(), client.clone());
        Some(client)
    }
}

/// Runs the clients until `options.duration` is over, against `registers` (runtime ids that
/// only this workload writes). They call the cluster through the SDK, `runtimeai-client`, as
/// the admin.
pub async fn run(options: &WorkloadOptions, targets: Targets, registers: Vec<String>, history: History) {
    let config = crate::cluster::admin_client_config(Vec::new(), options.request_timeout).expect("the harness CA");
    let members = Members { config, clients: Arc::default() };
    let deadline = Instant::now() + options.duration;
    let mut tasks = Vec::new();
    for index in 0..options.clients {
        let worker = Worker {
            index,
            members: members.clone(),
            targets: targets.clone(),
            registers: registers.clone(),
            history: history.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(options.seed.wrapping_mul(1_000_003).wrapping_add(index as u64)),
            created: Vec::new(),
            sequence: 0,
            seed: options.seed,
            create_retries: options.create_retries,
            ejected: BTreeMap::new(),
        };
        tasks.push(tokio::spawn(worker.run(deadline)));
    }
    for task in tasks {
        let _ = task.await;
    }
}

struct Worker {
    index: usize,
    members: Members,
    targets: Targets,
    registers: Vec<String>,
    history: History,
    rng: rand::rngs::StdRng,
    /// Runtimes this client created (acknowledged).
    created: Vec<String>,
    sequence: u64,
    seed: u64,
    create_retries: u32,
    /// Nodes this client avoids until the given time.
    ejected: BTreeMap<u64, Instant>,
}

/// How long a client leaves a node alone after it failed to answer.
const EJECTION: Duration = Duration::from_secs(2);

/// How a call ended, as a record keeps it.
struct Ended {
    outcome: Outcome,
    status: Option<u16>,
    /// What a read saw, the operation a lifecycle call queued, or the error.
    detail: String,
    /// The node did not answer, or answered 503: leave it alone for a while.
    eject: bool,
}

impl Ended {
    fn ok(status: u16, detail: String) -> Ended {
        Ended { outcome: Outcome::Ok, status: Some(status), detail, eject: false }
    }

    /// A failed call; `outcome` is what the error says about its effect.
    fn failed(error: &ClientError, outcome: Outcome) -> Ended {
        match error {
            ClientError::Api { problem } => Ended {
                outcome,
                status: Some(problem.status),
                detail: if problem.detail.is_empty() { problem.title.clone() } else { problem.detail.clone() },
                eject: problem.status == 503,
            },
            other => Ended { outcome, status: None, detail: other.to_string(), eject: true },
        }
    }
}

impl Worker {
    async fn run(mut self, deadline: Instant) {
        while Instant::now() < deadline {
            self.sequence += 1;
            let roll = self.rng.gen_range(0..100);
            match roll {
                0..=44 if !self.registers.is_empty() => self.read_then_write_register().await,
                45..=64 => self.create().await,
                65..=84 if !self.created.is_empty() => self.lifecycle().await,
                _ if !self.created.is_empty() => self.read_runtime().await,
                _ => self.create().await,
            }
            // Clients think a little between calls, so faults meet a steady load, not a flood.
            tokio::time::sleep(Duration::from_millis(self.rng.gen_range(0..20))).await;
        }
    }

    /// A node to send the next call to, and the client that calls it.
    fn pick_node(&mut self) -> Option<(u64, Client)> {
        let targets = self.targets.lock().expect("targets lock").clone();
        let now = Instant::now();
        self.ejected.retain(|_, until| *until > now);
        let healthy: Vec<_> = targets.iter().filter(|(id, _)| !self.ejected.contains_key(id)).collect();
        // With every node ejected, any node is better than none.
        let candidates = if healthy.is_empty() { targets.iter().collect() } else { healthy };
        if candidates.is_empty() {
            return None;
        }
        let (id, url) = candidates[self.rng.gen_range(0..candidates.len())];
        Some((*id, self.members.client(url)?))
    }

    fn record(&mut self, node: u64, call: Call, runtime: Option<String>, invoke_us: u64, ended: Ended) {
        if ended.eject {
            self.ejected.insert(node, Instant::now() + EJECTION);
        }
        self.history.push(Record {
            client: self.index,
            node,
            call,
            runtime,
            invoke_us,
            complete_us: self.history.now(),
            outcome: ended.outcome,
            status: ended.status,
            detail: ended.detail,
        });
    }

    async fn read_then_write_register(&mut self) {
        let register = self.registers[self.rng.gen_range(0..self.registers.len())].clone();
        let Some((node, client)) = self.pick_node() else { return };
        let invoke = self.history.now();
        let (from, version) = match client.get_runtime(&register).await {
            Ok(runtime) => {
                let value = register_text(runtime.version, runtime.labels.get("v").map(String::as_str));
                self.record(node, Call::ReadRegister, Some(register.clone()), invoke, Ended::ok(200, value.clone()));
                (value, runtime.version)
            }
            Err(error) => {
                // A failed read tells the checker nothing; it is kept for the timeline.
                let ended = Ended::failed(&error, Outcome::Fail);
                return self.record(node, Call::ReadRegister, Some(register), invoke, ended);
            }
        };
        let label = format!("c{}-{}", self.index, self.sequence);
        let to = format!("{}:{label}", version + 1);
        let Some((node, client)) = self.pick_node() else { return };
        let invoke = self.history.now();
        let labels = BTreeMap::from([("v".to_string(), Some(label))]);
        let ended = match client.relabel_runtime(&register, &labels, Some(version)).await {
            Ok(Relabel::Done(_)) => Ended::ok(200, String::new()),
            Ok(Relabel::PendingApproval(operation)) => {
                // No policy here asks for approval; a parked write has not taken effect yet.
                Ended { outcome: Outcome::Unknown, status: Some(202), detail: operation.id, eject: false }
            }
            // 412: the comparison failed; the checker tells it from other refusals by status.
            Err(error) => Ended::failed(&error, write_outcome(&error)),
        };
        self.record(node, Call::WriteRegister { from, to }, Some(register), invoke, ended);
    }

    async fn create(&mut self) {
        let name = format!("c{}-{}", self.index, self.sequence);
        let key = format!("chaos-{}-{}-{}", self.seed, self.index, self.sequence);
        let body = json!({"name": name, "type": "vcluster", "labels": {"chaos": "workload"}});
        for attempt in 1..=self.create_retries + 1 {
            let Some((node, client)) = self.pick_node() else { return };
            let invoke = self.history.now();
            let answer = client.with_idempotency_key(&key).create_runtime(&body).await;
            let (ended, runtime) = match answer {
                Ok(runtime) => (Ended::ok(201, String::new()), Some(runtime.id)),
                Err(error) => (Ended::failed(&error, write_outcome(&error)), None),
            };
            let outcome = ended.outcome;
            let call = Call::Create { name: name.clone(), idempotency_key: key.clone(), attempt };
            self.record(node, call, runtime.clone(), invoke, ended);
            match outcome {
                Outcome::Ok => {
                    self.created.extend(runtime);
                    return;
                }
                Outcome::Fail => return,
                // Unknown: try again with the same key, as a careful client does.
                Outcome::Unknown => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn lifecycle(&mut self) {
        let runtime = self.created[self.rng.gen_range(0..self.created.len())].clone();
        let action = [Lifecycle::Stop, Lifecycle::Start, Lifecycle::Restart][self.rng.gen_range(0..3)];
        let Some((node, client)) = self.pick_node() else { return };
        let key = format!("chaos-{}-{}-{}-{}", self.seed, self.index, self.sequence, action.verb());
        let invoke = self.history.now();
        let answer = client.with_idempotency_key(key).lifecycle(&runtime, action, Some(&json!({}))).await;
        let ended = match answer {
            // Keep the queued operation's id as the detail: the checks follow it to the end.
            Ok(operation) => Ended::ok(202, operation.id),
            Err(error) => Ended::failed(&error, write_outcome(&error)),
        };
        self.record(node, Call::Lifecycle { action: action.verb().into() }, Some(runtime), invoke, ended);
    }

    async fn read_runtime(&mut self) {
        let runtime = self.created[self.rng.gen_range(0..self.created.len())].clone();
        let Some((node, client)) = self.pick_node() else { return };
        let invoke = self.history.now();
        let ended = match client.get_runtime(&runtime).await {
            Ok(_) => Ended::ok(200, String::new()),
            Err(error) => Ended::failed(&error, Outcome::Fail),
        };
        self.record(node, Call::ReadRuntime, Some(runtime), invoke, ended);
    }
}

/// A write's outcome from an error: a 4xx, or a connection that was never made, is a definite
/// refusal; 5xx and other transport errors leave the outcome unknown.
fn write_outcome(error: &ClientError) -> Outcome {
    match error {
        ClientError::Api { problem } if (400..500).contains(&problem.status) => Outcome::Fail,
        ClientError::Unreachable(_) => Outcome::Fail,
        _ => Outcome::Unknown,
    }
}

/// Counts and latency of the calls started within a stretch of time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    pub ok: usize,
    pub failed: usize,
    pub indeterminate: usize,
    /// Share of calls the cluster answered (a success, or a definite refusal such as 412 or
    /// 409: the node was up and decided), in percent. Timeouts, resets, refused connections and
    /// 5xx count as unavailable.
    pub availability: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Window {
    pub fn of<'a>(records: impl Iterator<Item = &'a Record>) -> Window {
        let mut window = Window::default();
        let mut latencies = Vec::new();
        let mut answered = 0;
        for record in records {
            if record.outcome == Outcome::Ok || record.status.is_some_and(|s| (400..500).contains(&s)) {
                answered += 1;
            }
            match record.outcome {
                Outcome::Ok => {
                    window.ok += 1;
                    latencies.push((record.complete_us - record.invoke_us) as f64 / 1000.0);
                }
                Outcome::Fail => window.failed += 1,
                Outcome::Unknown => window.indeterminate += 1,
            }
        }
        let total = window.ok + window.failed + window.indeterminate;
        window.availability = if total == 0 { 100.0 } else { 100.0 * answered as f64 / total as f64 };
        latencies.sort_by(f64::total_cmp);
        let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)));
        window.p50_ms = at(0.5).copied().unwrap_or(0.0);
        window.p99_ms = at(0.99).copied().unwrap_or(0.0);
        window
    }
}
