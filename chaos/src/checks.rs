//! What a run must show once its faults are over: the register histories are linearizable, no
//! acknowledged write is lost, every backend step ran at most once, idempotency keys were
//! honoured across failover, and every runtime's events are in order and complete on every node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::cluster::Cluster;
use crate::linearizability::{
    check, minimal_window, Operation, RegisterFromAnyState, RegisterInput, RegisterOutput, Verdict,
};
use crate::workload::{register_history, Call, Outcome, Record};

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

impl CheckResult {
    fn new(name: &'static str, problems: Vec<String>, fine: String) -> CheckResult {
        match problems.is_empty() {
            true => CheckResult { name, passed: true, detail: fine },
            false => {
                let more =
                    if problems.len() > 5 { format!(" (and {} more)", problems.len() - 5) } else { String::new() };
                CheckResult {
                    name,
                    passed: false,
                    detail: format!("{}{more}", problems[..problems.len().min(5)].join("; ")),
                }
            }
        }
    }
}

/// A register history no order explains, cut down to the smallest stretch that shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub key: String,
    pub operations: usize,
    pub window: Vec<Operation<RegisterInput, RegisterOutput>>,
}

/// Linearizability of every register, judged by the Wing–Gong–Lowe search. A run starts each
/// register's history with a read of its value, so the model needs no initial value.
pub fn linearizable(records: &[Record]) -> (CheckResult, Option<Violation>) {
    let history = register_history(records);
    let writes = history.iter().filter(|o| o.output == RegisterOutput::Swapped(true)).count();
    match check(&RegisterFromAnyState, &history) {
        Verdict::Linearizable => {
            let detail = format!("{} register operations ({writes} writes won) are linearizable", history.len());
            (CheckResult { name: "linearizable", passed: true, detail }, None)
        }
        Verdict::NotLinearizable { key, linearized, operations, stuck } => {
            let ops: Vec<_> = history.iter().filter(|o| o.key == key).cloned().collect();
            let window = minimal_window(&ops, stuck);
            let detail = format!(
                "runtime {key}: no order explains its {operations} operations (at most {linearized} fit); the \
                 smallest failing window has {} operations",
                window.len()
            );
            (CheckResult { name: "linearizable", passed: false, detail }, Some(Violation { key, operations, window }))
        }
    }
}

/// Every answer for one idempotency key names the same runtime, and a retry is never refused
/// as a new request (409: the name is taken, i.e. the first attempt applied and the key was
/// forgotten).
pub fn idempotency(records: &[Record]) -> CheckResult {
    let mut by_key: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for record in records {
        if let Call::Create { idempotency_key, .. } = &record.call {
            by_key.entry(idempotency_key).or_default().push(record);
        }
    }
    let mut problems = Vec::new();
    let mut retried = 0;
    for (key, attempts) in &by_key {
        let ids: BTreeSet<&str> = attempts.iter().filter_map(|r| r.runtime.as_deref()).collect();
        if ids.len() > 1 {
            problems.push(format!("key {key} created {} runtimes: {ids:?}", ids.len()));
        }
        if attempts.len() > 1 {
            retried += 1;
            if let Some(refused) = attempts.iter().find(|r| r.status == Some(409)) {
                problems.push(format!("key {key}: retry refused with 409 ({})", refused.detail));
            }
        }
    }
    CheckResult::new(
        "idempotency",
        problems,
        format!("{} keys, {retried} retried after an unknown outcome, each answered with one runtime", by_key.len()),
    )
}

/// Every backend step ran at most once: the simulated driver's journal has one line per step
/// it applied (a call that found its step already applied writes nothing).
pub fn backend_at_most_once(journal: &Path) -> CheckResult {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for line in text.lines() {
        let field = |name: &str| {
            line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).unwrap_or("").to_string()
        };
        *seen.entry((field("operation"), field("step"))).or_default() += 1;
    }
    let problems: Vec<String> = seen
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|((operation, step), count)| format!("operation {operation} step {step} ran {count} times"))
        .collect();
    CheckResult::new("backend-at-most-once", problems, format!("{} backend steps, each applied once", seen.len()))
}

/// The runtimes and operations the clients were told exist, and the label writes they were
/// told took effect.
struct Acknowledged {
    runtimes: BTreeSet<String>,
    operations: BTreeMap<String, String>,
    /// runtime → (label writes acknowledged, label writes with unknown outcome)
    label_writes: BTreeMap<String, (usize, usize)>,
}

fn acknowledged(records: &[Record]) -> Acknowledged {
    let mut ack =
        Acknowledged { runtimes: BTreeSet::new(), operations: BTreeMap::new(), label_writes: BTreeMap::new() };
    for record in records {
        let Some(runtime) = &record.runtime else { continue };
        match (&record.call, record.outcome) {
            (Call::Create { .. }, Outcome::Ok) => {
                ack.runtimes.insert(runtime.clone());
            }
            (Call::Lifecycle { .. }, Outcome::Ok) => {
                ack.operations.insert(record.detail.clone(), runtime.clone());
            }
            (Call::WriteRegister { .. }, outcome) => {
                let entry = ack.label_writes.entry(runtime.clone()).or_default();
                match outcome {
                    Outcome::Ok => entry.0 += 1,
                    Outcome::Unknown => entry.1 += 1,
                    Outcome::Fail => {}
                }
            }
            _ => {}
        }
    }
    ack
}

async fn get(cluster: &Cluster, via: u64, path: &str) -> Option<(u16, Value)> {
    let response = cluster.call(via, reqwest::Method::GET, path, None, &[]).await.ok()?;
    Some((response.status, response.body))
}

/// How long a check waits for each thing it looks at to become true (a runtime replicated, a
/// runtime's events the same everywhere), until one never does; after that, one look at each of
/// the rest: the check has failed already, and a node that is down would otherwise make it wait
/// that long for every runtime.
struct Patience {
    wait: Duration,
    spent: bool,
}

impl Patience {
    fn new(wait: Duration) -> Patience {
        Patience { wait, spent: false }
    }

    /// When the wait for the next thing ends.
    fn deadline(&self) -> Instant {
        Instant::now() + if self.spent { Duration::ZERO } else { self.wait }
    }

    /// One thing never became true.
    fn give_up(&mut self) {
        self.spent = true;
    }
}

/// No acknowledged write is lost: every acknowledged runtime is in every member's own replica,
/// every acknowledged operation exists there and has finished.
pub async fn acknowledged_writes(
    cluster: &Cluster,
    members: &[u64],
    records: &[Record],
    wait: Duration,
) -> CheckResult {
    let ack = acknowledged(records);
    let mut patience = Patience::new(wait);
    let mut problems = Vec::new();
    for &node in members {
        for runtime in &ack.runtimes {
            let path = format!("/v1/runtimes/{runtime}?consistency=stale");
            if let Err(answer) = cluster.get_ok(node, &path, patience.deadline()).await {
                problems.push(format!("node {node} lost acknowledged runtime {runtime}: {answer}"));
                patience.give_up();
            }
        }
    }
    let via = members.first().copied().unwrap_or(1);
    for operation in ack.operations.keys() {
        let deadline = patience.deadline();
        loop {
            let answer = get(cluster, via, &format!("/v1/operations/{operation}")).await;
            let status = answer.as_ref().and_then(|(_, body)| body["status"].as_str().map(str::to_string));
            match (answer.as_ref().map(|a| a.0), status.as_deref()) {
                (Some(200), Some("succeeded" | "failed" | "cancelled")) => break,
                (Some(404), _) => {
                    problems.push(format!("acknowledged operation {operation} is gone"));
                    break;
                }
                _ if Instant::now() > deadline => {
                    problems.push(format!("operation {operation} did not finish: {status:?}"));
                    patience.give_up();
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    CheckResult::new(
        "no-acknowledged-write-lost",
        problems,
        format!(
            "{} acknowledged runtimes on all {} members, {} acknowledged operations finished",
            ack.runtimes.len(),
            members.len(),
            ack.operations.len()
        ),
    )
}

/// Events a runtime keeps (the clusters' default `event_retention_count`); also the most one
/// events page holds.
const EVENT_RETENTION_COUNT: u64 = 1000;

/// How long the members may take to serve the same events of a runtime: events of operations
/// still in flight may be arriving, and a loaded node answers slowly. Only a failure waits this.
const EVENTS_AGREE_WITHIN: Duration = Duration::from_secs(60);

/// Every runtime's events are in order (`seq` never decreasing, ids unique), the same on every member, and
/// complete: each acknowledged operation has its events, and the label events number at least
/// the acknowledged label writes and at most those plus the unanswered ones (a runtime whose
/// events reached the retention count has dropped its oldest: none is then missed but in number).
pub async fn events_in_order(cluster: &Cluster, members: &[u64], records: &[Record]) -> CheckResult {
    let ack = acknowledged(records);
    let mut runtimes: BTreeSet<String> = ack.runtimes.clone();
    runtimes.extend(ack.label_writes.keys().cloned());
    let mut problems = Vec::new();
    let mut checked = 0;
    let mut patience = Patience::new(EVENTS_AGREE_WITHIN);
    for runtime in &runtimes {
        let (streams, disagreement) = agreed_events(cluster, members, runtime, patience.deadline()).await;
        if let Some(disagreement) = disagreement {
            problems.push(disagreement);
            patience.give_up();
        }
        let Some((&first_node, first)) = streams.iter().next() else { continue };
        checked += 1;
        // In log order: `seq` (the log index that wrote an event) never decreases; events of one
        // entry (one command, or a batch of them) share it and no id repeats.
        let seqs: Vec<u64> = first.iter().filter_map(|e| e["seq"].as_u64()).collect();
        let unique: BTreeSet<&str> = first.iter().filter_map(|e| e["id"].as_str()).collect();
        if seqs.windows(2).any(|w| w[0] > w[1]) || unique.len() != first.len() {
            problems.push(format!("events of {runtime} out of order or repeated on node {first_node}: {seqs:?}"));
        }
        // A runtime keeps its newest events only (the cluster's default retention): a stream that
        // long may have dropped its oldest.
        let pruned = first.len() as u64 >= EVENT_RETENTION_COUNT;
        let operations: BTreeSet<&str> = first.iter().filter_map(|e| e["data"]["operation_id"].as_str()).collect();
        for (operation, _) in ack.operations.iter().filter(|(_, r)| *r == runtime && !pruned) {
            if !operations.contains(operation.as_str()) {
                problems.push(format!("acknowledged operation {operation} has no event on {runtime}"));
            }
        }
        if let Some((acked, unknown)) = ack.label_writes.get(runtime) {
            let labels = first.iter().filter(|e| e["type"] == "runtime.labels").count();
            if (labels < *acked && !pruned) || labels > acked + unknown {
                problems.push(format!(
                    "{runtime} has {labels} label events for {acked} acknowledged and {unknown} unanswered writes"
                ));
            }
        }
    }
    CheckResult::new(
        "events-in-order",
        problems,
        format!("events of {checked} runtimes in order, identical on {} members, none missing", members.len()),
    )
}

/// Each member's events of `runtime`, read again until every member answers and all serve the
/// same ones or `deadline` passes: the streams last read, and what was wrong with them if the
/// members never agreed.
async fn agreed_events(
    cluster: &Cluster,
    members: &[u64],
    runtime: &str,
    deadline: Instant,
) -> (BTreeMap<u64, Vec<Value>>, Option<String>) {
    let path = format!("/v1/runtimes/{runtime}/events?limit={EVENT_RETENTION_COUNT}");
    loop {
        let mut streams = BTreeMap::new();
        let mut problems = Vec::new();
        for &node in members {
            match cluster.get_ok(node, &path, deadline).await {
                Ok(body) => {
                    streams.insert(node, body["items"].as_array().cloned().unwrap_or_default());
                }
                Err(answer) => problems.push(format!("node {node}: events of {runtime}: {answer}")),
            }
        }
        problems.extend(differences(runtime, &streams));
        if problems.is_empty() {
            return (streams, None);
        }
        if Instant::now() > deadline {
            return (streams, Some(problems.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The members whose events of `runtime` (their ids, in order) differ from the first member's.
fn differences(runtime: &str, streams: &BTreeMap<u64, Vec<Value>>) -> Vec<String> {
    let ids = |events: &Vec<Value>| events.iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    let Some((first_node, first)) = streams.iter().next() else { return Vec::new() };
    streams
        .iter()
        .filter(|(_, events)| ids(events) != ids(first))
        .map(|(node, events)| {
            format!(
                "events of {runtime} differ: node {first_node} has {}, node {node} has {}",
                first.len(),
                events.len()
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(key: &str, attempt: u32, status: Option<u16>, runtime: Option<&str>) -> Record {
        Record {
            client: 0,
            node: 1,
            call: Call::Create { name: "n".into(), idempotency_key: key.into(), attempt },
            runtime: runtime.map(str::to_string),
            invoke_us: attempt as u64 * 10,
            complete_us: attempt as u64 * 10 + 5,
            outcome: match status {
                Some(201) => Outcome::Ok,
                Some(409) => Outcome::Fail,
                _ => Outcome::Unknown,
            },
            status,
            detail: String::new(),
        }
    }

    #[test]
    fn a_retry_refused_as_a_new_request_breaks_idempotency() {
        let fine = vec![create("k", 1, None, None), create("k", 2, Some(201), Some("r1"))];
        assert!(idempotency(&fine).passed);
        let forgotten = vec![create("k", 1, None, None), create("k", 2, Some(409), None)];
        let verdict = idempotency(&forgotten);
        assert!(!verdict.passed && verdict.detail.contains("409"), "{verdict:?}");
        let twice = vec![create("k", 1, Some(201), Some("r1")), create("k", 2, Some(201), Some("r2"))];
        assert!(!idempotency(&twice).passed);
    }

    #[test]
    fn a_step_in_the_journal_twice_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        std::fs::write(&journal, "applied operation=a step=0 action=start\napplied operation=a step=1 action=x\n")
            .unwrap();
        assert!(backend_at_most_once(&journal).passed);
        std::fs::write(&journal, "applied operation=a step=0 action=start\napplied operation=a step=0 action=start\n")
            .unwrap();
        let verdict = backend_at_most_once(&journal);
        assert!(!verdict.passed && verdict.detail.contains("ran 2 times"), "{verdict:?}");
    }

    #[test]
    fn a_stale_register_read_is_reported_with_its_window() {
        let read = |value: &str, at: u64| Record {
            client: 0,
            node: 1,
            call: Call::ReadRegister,
            runtime: Some("r".into()),
            invoke_us: at,
            complete_us: at + 1,
            outcome: Outcome::Ok,
            status: Some(200),
            detail: value.into(),
        };
        let write = |from: &str, to: &str, at: u64| Record {
            call: Call::WriteRegister { from: from.into(), to: to.into() },
            ..read("", at)
        };
        let history = vec![read("1:", 0), write("1:", "2:a", 10), read("1:", 20)];
        let (verdict, violation) = linearizable(&history);
        assert!(!verdict.passed, "{verdict:?}");
        let violation = violation.unwrap();
        assert_eq!(violation.window.len(), 2, "{violation:?}");
        assert!(linearizable(&history[..2]).0.passed);
    }
}
