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
    Some(format!("{}:{}", body["version"].as_u64()?, body["labels"]["v"].as_str().unwrap_or("")))
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

/// Runs the clients until `options.duration` is over, against `registers` (runtime ids that
/// only this workload writes).
pub async fn run(options: &WorkloadOptions, targets: Targets, registers: Vec<String>, history: History) {
    let client = crate::cluster::admin_client_builder()
        .expect("the harness CA")
        .timeout(options.request_timeout)
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client");
    let deadline = Instant::now() + options.duration;
    let mut tasks = Vec::new();
    for index in 0..options.clients {
        let worker = Worker {
            index,
            client: client.clone(),
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
    client: reqwest::Client,
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

/// A call that got no answer.
#[derive(Debug, Clone)]
struct NoAnswer {
    /// The connection was never made: the request was not sent.
    never_sent: bool,
    message: String,
}

/// An answer: status and body, or why none came.
type Answer = Result<(u16, Value), NoAnswer>;

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

    /// A node to send the next call to, and its base URL.
    fn pick_node(&mut self) -> Option<(u64, String)> {
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
        Some((*id, url.clone()))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> Answer {
        let mut request = self.client.request(method, url);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let no_answer = |e: reqwest::Error| NoAnswer { never_sent: e.is_connect(), message: e.to_string() };
        let response = request.send().await.map_err(no_answer)?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(no_answer)?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    fn record(&mut self, node: u64, call: Call, runtime: Option<String>, invoke_us: u64, answer: &Answer, ok: Outcome) {
        if matches!(answer, Err(_) | Ok((503, _))) {
            self.ejected.insert(node, Instant::now() + EJECTION);
        }
        let (status, detail) = match answer {
            Ok((status, body)) => {
                (Some(*status), body["detail"].as_str().or(body["title"].as_str()).unwrap_or("").into())
            }
            Err(error) => (None, error.message.clone()),
        };
        self.history.push(Record {
            client: self.index,
            node,
            call,
            runtime,
            invoke_us,
            complete_us: self.history.now(),
            outcome: ok,
            status,
            detail,
        });
    }

    async fn read_then_write_register(&mut self) {
        let register = self.registers[self.rng.gen_range(0..self.registers.len())].clone();
        let Some((node, base)) = self.pick_node() else { return };
        let url = format!("{base}/v1/runtimes/{register}");
        let invoke = self.history.now();
        let answer = self.send(reqwest::Method::GET, url.clone(), None, &[]).await;
        let seen = match &answer {
            Ok((200, body)) => register_value(body).map(|value| (value, body["version"].as_u64().unwrap_or(0))),
            _ => None,
        };
        let Some((value, version)) = seen else {
            // A failed read tells the checker nothing; it is kept for the timeline.
            self.record(node, Call::ReadRegister, Some(register), invoke, &answer, read_outcome(&answer));
            return;
        };
        self.history.push(Record {
            client: self.index,
            node,
            call: Call::ReadRegister,
            runtime: Some(register.clone()),
            invoke_us: invoke,
            complete_us: self.history.now(),
            outcome: Outcome::Ok,
            status: Some(200),
            detail: value.clone(),
        });
        let label = format!("c{}-{}", self.index, self.sequence);
        let to = format!("{}:{label}", version + 1);
        let Some((node, base)) = self.pick_node() else { return };
        let url = format!("{base}/v1/runtimes/{register}");
        let invoke = self.history.now();
        let answer = self
            .send(
                reqwest::Method::PATCH,
                url,
                Some(json!({"labels": {"v": label}})),
                &[("if-match", format!("\"{version}\""))],
            )
            .await;
        let outcome = match &answer {
            Ok((200, _)) => Outcome::Ok,
            Ok((412, _)) => Outcome::Fail,
            other => write_outcome(other),
        };
        self.record(node, Call::WriteRegister { from: value, to }, Some(register), invoke, &answer, outcome);
    }

    async fn create(&mut self) {
        let name = format!("c{}-{}", self.index, self.sequence);
        let key = format!("chaos-{}-{}-{}", self.seed, self.index, self.sequence);
        let body = json!({"name": name, "type": "vcluster", "labels": {"chaos": "workload"}});
        for attempt in 1..=self.create_retries + 1 {
            let Some((node, base)) = self.pick_node() else { return };
            let invoke = self.history.now();
            let answer = self
                .send(
                    reqwest::Method::POST,
                    format!("{base}/v1/runtimes"),
                    Some(body.clone()),
                    &[("idempotency-key", key.clone())],
                )
                .await;
            let outcome = match &answer {
                Ok((201, _)) => Outcome::Ok,
                other => write_outcome(other),
            };
            let runtime = match &answer {
                Ok((201, body)) => body["id"].as_str().map(str::to_string),
                _ => None,
            };
            let call = Call::Create { name: name.clone(), idempotency_key: key.clone(), attempt };
            self.record(node, call, runtime.clone(), invoke, &answer, outcome);
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
        let action = ["stop", "start", "restart"][self.rng.gen_range(0..3)];
        let Some((node, base)) = self.pick_node() else { return };
        let key = format!("chaos-{}-{}-{}-{action}", self.seed, self.index, self.sequence);
        let invoke = self.history.now();
        let answer = self
            .send(
                reqwest::Method::POST,
                format!("{base}/v1/runtimes/{runtime}/lifecycle/{action}"),
                Some(json!({})),
                &[("idempotency-key", key)],
            )
            .await;
        let outcome = match &answer {
            Ok((202, _)) => Outcome::Ok,
            other => write_outcome(other),
        };
        let mut answer = answer;
        if let Ok((202, body)) = &answer {
            // Keep the queued operation's id as the detail: the checks follow it to the end.
            let id = body["id"].as_str().unwrap_or("").to_string();
            answer = Ok((202, json!({"detail": id})));
        }
        self.record(node, Call::Lifecycle { action: action.into() }, Some(runtime), invoke, &answer, outcome);
    }

    async fn read_runtime(&mut self) {
        let runtime = self.created[self.rng.gen_range(0..self.created.len())].clone();
        let Some((node, base)) = self.pick_node() else { return };
        let invoke = self.history.now();
        let answer = self.send(reqwest::Method::GET, format!("{base}/v1/runtimes/{runtime}"), None, &[]).await;
        self.record(node, Call::ReadRuntime, Some(runtime), invoke, &answer, read_outcome(&answer));
    }
}

fn read_outcome(answer: &Answer) -> Outcome {
    match answer {
        Ok((200, _)) => Outcome::Ok,
        _ => Outcome::Fail,
    }
}

/// A write's outcome from an answer that is not its success status: a 4xx, or a connection
/// that was never made, is a definite refusal; 5xx and other transport errors leave the outcome
/// unknown.
fn write_outcome(answer: &Answer) -> Outcome {
    match answer {
        Ok((status, _)) if (400..500).contains(status) => Outcome::Fail,
        Err(NoAnswer { never_sent: true, .. }) => Outcome::Fail,
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
