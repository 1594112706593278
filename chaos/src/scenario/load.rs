//! The load scenarios: hostile clients beside the workload (`large-writes`, `flood`,
//! `slow-loris`, `list-storm`), each judged by what the workload's clients saw meanwhile and
//! by what the hostile client got.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;

use super::{tail, FaultContext, FaultRecord, SETTLE};
use crate::checks::CheckResult;
use crate::cluster::{Cluster, Response};
use crate::error::{Error, Result};
use crate::hostile::{self, Hostile, SlowEnd};
use crate::workload::{Call, Outcome, Record, Window};

/// How much slower the workload's p99 may get while a hostile client is at it (issue 20: "within
/// 2× of the quiet run").
const SLOWDOWN_ALLOWED: f64 = 2.0;

/// The least share of the workload's calls the cluster must answer while a hostile client is at
/// it, in percent.
const AVAILABILITY_KEPT: f64 = 99.0;
/// The quiet p99 the slowdown is measured against is at least this: below it, the quiet run is
/// faster than this 2-core machine holds under any extra load at all (the flood's own allowed
/// creates cost two replicated writes each), and the bound would judge the baseline's luck.
const QUIET_P99_FLOOR_MS: f64 = 100.0;

/// A bound on the workload while a hostile client was at it, judged once the run is over against
/// the workload's calls outside every fault window (the quiet run).
pub(super) struct SlowdownBound {
    pub name: &'static str,
    /// When the hostile client was at it (µs since the run started).
    pub during: (u64, u64),
    /// A node whose calls are left out (the one the hostile client hit).
    pub except: Option<u64>,
}

impl SlowdownBound {
    /// The verdict on the run's `records`, with `faults` marking what was not quiet.
    pub(super) fn judge(&self, records: &[Record], faults: &[FaultRecord]) -> CheckResult {
        let counted = |r: &&Record| self.except != Some(r.node) && r.client != usize::MAX;
        let during = Window::of(
            records.iter().filter(counted).filter(|r| r.invoke_us >= self.during.0 && r.invoke_us <= self.during.1),
        );
        let quiet = Window::of(
            records
                .iter()
                .filter(counted)
                .filter(|r| faults.iter().all(|f| r.invoke_us < f.start_us || r.invoke_us > f.end_us)),
        );
        let baseline = quiet.p99_ms.max(QUIET_P99_FLOOR_MS);
        let passed =
            during.ok > 0 && during.p99_ms <= SLOWDOWN_ALLOWED * baseline && during.availability >= AVAILABILITY_KEPT;
        let whose = match self.except {
            Some(node) => format!("calls through the nodes other than {node}"),
            None => "calls".to_string(),
        };
        let detail = format!(
            "the workload's {whose}: p99 {:.1} ms and availability {:.1} % under attack ({} ok), p99 {:.1} ms \
             quiet ({} ok); allowed: p99 within {SLOWDOWN_ALLOWED}× of the quiet one (at least \
             {QUIET_P99_FLOOR_MS} ms) and availability at least {AVAILABILITY_KEPT} %",
            during.p99_ms, during.availability, during.ok, quiet.p99_ms, quiet.ok
        );
        CheckResult { name: self.name, passed, detail }
    }
}

/// Creates per burst of [`large_writes`], and the size of each one's environment.
const LARGE_BURST: u64 = 30;
const LARGE_ENV_BYTES: usize = 900_000;

/// Bursts of large creates through every member for the fault window, beside the workload. Each
/// must be created, or refused with 503/429 and `Retry-After` (shed); nothing else, and the
/// leader (and its term) must stay.
pub(super) async fn large_writes(cx: &mut FaultContext) -> Result<()> {
    let leader = cx.leader().await?;
    let term_before = cx.cluster.cluster_view(leader).await?["term"].as_u64();
    let start = cx.begin();
    let deadline = Instant::now() + cx.hold;
    let blob = "y".repeat(LARGE_ENV_BYTES);
    let (mut created, mut shed, mut wrong, mut bursts) = (0, 0, Vec::new(), 0);
    while Instant::now() < deadline {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..LARGE_BURST {
            let via = cx.members[i as usize % cx.members.len()];
            let request = cx.cluster.client.post(cx.cluster.node(via).url("/v1/runtimes")).timeout(SETTLE).json(
                &json!({"name": format!("large-{bursts}-{i}"), "type": "vcluster", "spec": {"env": {"BLOB": blob}}}),
            );
            calls.spawn(async move { request.send().await });
        }
        while let Some(answer) = calls.join_next().await {
            match answer.map_err(|e| Error::Cluster(e.to_string()))? {
                Ok(response) if response.status() == 201 => created += 1,
                Ok(response)
                    if matches!(response.status().as_u16(), 429 | 503)
                        && response.headers().contains_key("retry-after") =>
                {
                    shed += 1
                }
                Ok(response) => {
                    wrong.push(format!("{}: {}", response.status(), response.text().await.unwrap_or_default()))
                }
                Err(error) => wrong.push(error.to_string()),
            }
        }
        bursts += 1;
    }
    cx.end(format!("{bursts} bursts of {LARGE_BURST} creates of {LARGE_ENV_BYTES} B"), start);
    let answered = format!("{created} created, {shed} shed with Retry-After, {} otherwise", wrong.len());
    cx.add_check(
        "large-writes-created-or-shed",
        wrong.is_empty() && created > 0,
        match wrong.first() {
            Some(first) => format!("{answered}; first: {}", tail(first)),
            None => answered,
        },
    );
    let after = cx.leader().await?;
    let term_after = cx.cluster.cluster_view(after).await?["term"].as_u64();
    cx.add_check(
        "large-writes-keep-the-leader",
        after == leader && term_after == term_before,
        format!("leader {leader} in term {term_before:?} before, {after} in term {term_after:?} after"),
    );
    Ok(())
}

/// Connections the flooding principal keeps busy, and the rate it is allowed per node
/// (`--rate-limit-principal` of the scenario's nodes): well below what 32 connections reach on a
/// loaded 2-core machine (about 90 creates/s), so that the check tests the limit, not the
/// machine's speed; the workload's principal stays far below it.
const FLOOD_CONNECTIONS: usize = 32;
pub(super) const FLOOD_RATE: &str = "40";

/// One principal sends creates to the leader as fast as [`FLOOD_CONNECTIONS`] connections
/// allow, for the fault window: it must be held to its rate (429 with Retry-After), and the
/// workload through the other nodes must not notice.
pub(super) async fn flood(cx: &mut FaultContext) -> Result<()> {
    let token = make_key(&cx.cluster, "flooder").await?;
    let leader = cx.leader().await?;
    let url = cx.cluster.node(leader).url("/v1/runtimes");
    let client = token_client(&token)?;
    let counter = Arc::new(AtomicU64::new(0));
    let start = cx.begin();
    let flood = Hostile::start(FLOOD_CONNECTIONS, move |_, _| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let body = json!({"name": format!("flood-{n}"), "type": "vcluster"});
        hostile::status_of(client.post(&url).timeout(Duration::from_secs(10)).json(&body))
    });
    tokio::time::sleep(cx.hold).await;
    let statuses = flood.stop();
    let end = cx.history.now();
    cx.end(format!("flood of creates against leader {leader}"), start);
    let sent: u64 = statuses.values().sum();
    let secs = (end - start) as f64 / 1e6;
    let detail = format!("{sent} requests in {secs:.1} s ({:.0}/s), by status: {statuses:?}", sent as f64 / secs);
    let limited = statuses.get(&429).copied().unwrap_or(0);
    let unexpected = statuses.keys().any(|status| ![201, 429, 503].contains(status));
    cx.add_check("flood-held-to-its-rate", limited > 0 && !unexpected, detail);
    cx.slowdowns.push(SlowdownBound { name: "flood-others-unaffected", during: (start, end), except: Some(leader) });
    Ok(())
}

/// Slow-loris connections, spread over the members.
const SLOW_CONNECTIONS: usize = 1000;
/// How long the attacker may take to open them all: at nice 19 on a busy machine, a thousand TLS
/// handshakes can take seconds.
const SLOW_HANDSHAKES_WITHIN: Duration = Duration::from_secs(30);
/// How long the attack goes on once they are open: the default header-read timeout (10 s), and
/// time for the closes to reach a starved attacker.
const SLOW_LORIS_FOR: Duration = Duration::from_secs(15);
/// How long after the handshake a node must have closed a slow-loris connection, as the attacker
/// sees it: its header-read timeout (10 s), and two seconds for the close to reach the attacker
/// (who measures in whole seconds).
const SLOW_CLOSED_WITHIN_SECS: u64 = 12;

/// [`SLOW_CONNECTIONS`] connections send a request's headers a byte a second (a new one when the
/// server closes one): the nodes must close every one of them on their header-read timeout, and
/// the workload must not notice.
pub(super) async fn slow_loris(cx: &mut FaultContext) -> Result<()> {
    hostile::raise_open_files_limit();
    let tls = hostile::tls_client(&crate::cluster::harness_ca()?.join("ca.pem"))?;
    let addresses: Vec<String> = cx.members.iter().map(|id| cx.cluster.node(*id).http.clone()).collect();
    let handshaken = Arc::new(AtomicUsize::new(0));
    let start = cx.begin();
    let counter = handshaken.clone();
    let attack = Hostile::start(SLOW_CONNECTIONS, move |i, stopped| {
        hostile::slow_loris(addresses[i % addresses.len()].clone(), tls.clone(), counter.clone(), stopped)
    });
    let opening = Instant::now();
    while handshaken.load(Ordering::Relaxed) < SLOW_CONNECTIONS && opening.elapsed() < SLOW_HANDSHAKES_WITHIN {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened = handshaken.load(Ordering::Relaxed) as u64;
    let opened_in = opening.elapsed();
    tokio::time::sleep(cx.hold.max(SLOW_LORIS_FOR)).await;
    let ends = attack.stop();
    let end = cx.history.now();
    cx.end(format!("{SLOW_CONNECTIONS} slow-loris connections"), start);
    let count = |wanted: fn(&SlowEnd) -> bool| ends.iter().filter(|(end, _)| wanted(end)).map(|(_, n)| n).sum::<u64>();
    let closed = count(|end| matches!(end, SlowEnd::ClosedAfter(_)));
    let late = count(|end| matches!(end, SlowEnd::ClosedAfter(s) if *s > SLOW_CLOSED_WITHIN_SECS));
    let refused = count(|end| matches!(end, SlowEnd::Refused));
    cx.add_check(
        "slow-loris-closed",
        opened > 0 && closed >= opened && late == 0 && refused == 0,
        format!(
            "{opened} open after {:.1} s; {closed} closed by the nodes ({late} later than \
             {SLOW_CLOSED_WITHIN_SECS} s after the handshake), {} open at the end, {refused} refused; by end: {ends:?}",
            opened_in.as_secs_f64(),
            count(|end| matches!(end, SlowEnd::Open))
        ),
    );
    cx.slowdowns.push(SlowdownBound { name: "slow-loris-others-unaffected", during: (start, end), except: None });
    Ok(())
}

/// Runtimes the cluster holds before a list storm: 1,000 per second of the run, from 5,000 to
/// 100,000.
pub(super) fn storm_runtimes(duration: Duration) -> u64 {
    (duration.as_secs() * 1000).clamp(5_000, 100_000)
}

/// Concurrent list calls of a list storm, and how much a node's memory may grow meanwhile.
const STORM_CLIENTS: usize = 300;
const STORM_MEMORY_GROWTH_MIB: u64 = 256;

/// Creates `count` runtimes through every member, 64 at a time, before the workload starts.
pub(super) async fn populate(cluster: &Cluster, count: u64) -> Result<()> {
    let started = Instant::now();
    let urls: Vec<String> = cluster.nodes.values().map(|node| node.url("/v1/runtimes")).collect();
    let next = Arc::new(AtomicU64::new(0));
    let mut creators: tokio::task::JoinSet<Result<()>> = tokio::task::JoinSet::new();
    for worker in 0..64 {
        let (client, next, urls) = (cluster.client.clone(), next.clone(), urls.clone());
        creators.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return Ok(());
                }
                let body = json!({"name": format!("stored-{n}"), "type": "vcluster", "labels": {"storm": "stored"}});
                let key = format!("populate-{n}");
                create_until_taken(&client, &urls[(worker + n as usize) % urls.len()], &body, &key).await?;
            }
        });
    }
    while let Some(done) = creators.join_next().await {
        done.map_err(|e| Error::Cluster(e.to_string()))??;
    }
    eprintln!("  populated {count} runtimes in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `POST` of `body` to `url` with idempotency key `key`, again while the answer is a 429/503
/// or none, for up to [`SETTLE`].
async fn create_until_taken(client: &reqwest::Client, url: &str, body: &serde_json::Value, key: &str) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let answer = client.post(url).header("idempotency-key", key).json(body).send().await;
        let last = match answer {
            Ok(taken) if taken.status().is_success() => return Ok(()),
            Ok(refused) if ![429, 503].contains(&refused.status().as_u16()) => {
                return Err(Error::Cluster(format!("create: {} {}", refused.status(), refused.text().await?)))
            }
            Ok(refused) => refused.status().to_string(),
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            return Err(Error::Cluster(format!("create: still refused after {SETTLE:?}: {last}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The list calls of a storm, by the loop that sends them: every page, filtered by an index, by
/// a label selector nothing matches (the scan budget), from a random place.
fn storm_query(i: usize) -> String {
    match i % 5 {
        0 => "page_size=200".into(),
        1 => "state=running&page_size=200".into(),
        2 => "type=vcluster&page_size=100".into(),
        3 => "label_selector=storm%3Dnone&page_size=200".into(),
        _ => {
            let place: String = (0..2)
                .map(|_| char::from(b"0123456789abcdefghjkmnpqrstvwxyz"[rand::thread_rng().gen_range(0..32)]))
                .collect();
            format!("page_size=200&page_token=rt_01{place}")
        }
    }
}

/// [`STORM_CLIENTS`] clients list the runtimes a [`populate`] made, all at once, for the fault
/// window: each node's memory must stay within [`STORM_MEMORY_GROWTH_MIB`] of what it was, the
/// lists must be answered (or shed), and the workload's writes must go on.
pub(super) async fn list_storm(cx: &mut FaultContext) -> Result<()> {
    let urls: Vec<String> = cx.members.iter().map(|id| cx.cluster.node(*id).url("/v1/runtimes")).collect();
    let client = cx.cluster.client.clone();
    let before = resident_mib(&cx.cluster, &cx.members);
    let start = cx.begin();
    let storm = Hostile::start(STORM_CLIENTS, move |i, _| {
        let url = format!("{}?{}", urls[i % urls.len()], storm_query(i));
        hostile::status_of(client.get(url).timeout(Duration::from_secs(30)))
    });
    let mut peak = before.clone();
    let deadline = Instant::now() + cx.hold;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        for (node, mib) in resident_mib(&cx.cluster, &cx.members) {
            let highest = peak.entry(node).or_insert(mib);
            *highest = (*highest).max(mib);
        }
    }
    let statuses = storm.stop();
    let end = cx.history.now();
    cx.end(format!("{STORM_CLIENTS} clients listing at once"), start);
    let growth: BTreeMap<u64, u64> =
        peak.iter().map(|(node, mib)| (*node, mib.saturating_sub(before.get(node).copied().unwrap_or(0)))).collect();
    cx.add_check(
        "list-storm-memory-bounded",
        growth.values().all(|mib| *mib < STORM_MEMORY_GROWTH_MIB),
        format!("resident MiB per node before {before:?}, at most {peak:?} during (allowed growth {STORM_MEMORY_GROWTH_MIB} MiB)"),
    );
    let listed: u64 = statuses.values().sum();
    let secs = (end - start) as f64 / 1e6;
    let unexpected = statuses.keys().any(|status| ![200, 429, 503].contains(status));
    cx.add_check(
        "list-storm-answered",
        statuses.get(&200).is_some_and(|ok| *ok > 0) && !unexpected,
        format!("{listed} list calls in {secs:.1} s ({:.0}/s), by status: {statuses:?}", listed as f64 / secs),
    );
    let writes = cx
        .history
        .records()
        .into_iter()
        .filter(|r| r.invoke_us >= start && r.invoke_us <= end && r.outcome == Outcome::Ok)
        .filter(|r| matches!(r.call, Call::WriteRegister { .. } | Call::Create { .. } | Call::Lifecycle { .. }))
        .count();
    cx.add_check(
        "list-storm-writes-go-on",
        writes > 0,
        format!("{writes} of the workload's writes succeeded during the storm"),
    );
    Ok(())
}

/// Each node's resident memory in MiB (from `/proc`).
fn resident_mib(cluster: &Cluster, members: &[u64]) -> BTreeMap<u64, u64> {
    members
        .iter()
        .filter_map(|id| {
            let status = std::fs::read_to_string(format!("/proc/{}/status", cluster.node(*id).pid()?)).ok()?;
            let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
            Some((*id, kib / 1024))
        })
        .collect()
}

/// An API key for a principal `name` that may create runtimes in every tenant; its token. The
/// harness calls as the admin, whom the workload keeps busy too: a 429 or 503 is asked again.
async fn make_key(cluster: &Cluster, name: &str) -> Result<String> {
    let body = json!({"name": name, "kind": "service", "tenants": ["*"], "roles": ["operator"]});
    let key = format!("harness-key-{name}-{}", rand::random::<u64>());
    let mut attempts = 0;
    loop {
        attempts += 1;
        let headers = [("idempotency-key", key.as_str())];
        let made: Response = cluster.call(1, reqwest::Method::POST, "/v1/keys", Some(&body), &headers).await?;
        match made.body["token"].as_str() {
            Some(token) if made.status == 201 => return Ok(token.to_string()),
            _ if matches!(made.status, 429 | 503) && attempts < 50 => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            _ => return Err(Error::Cluster(format!("make a key for {name}: {} {}", made.status, made.body))),
        }
    }
}

/// A client that trusts the harness's CA and authenticates with `token`.
fn token_client(token: &str) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|e| Error::Cluster(format!("a token is a header value: {e}")))?;
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(crate::cluster::client_builder()?.default_headers(headers).build()?)
}
