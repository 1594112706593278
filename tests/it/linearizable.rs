//! Reads and conditional writes (`If-Match`) of one runtime, through every node, while a fault
//! hits the cluster (the leader SIGKILLed; the leader SIGSTOPped for a while, then SIGCONT; every
//! node restarted in turn): the history the clients saw
//! must be linearizable (checked with `runtimeai_chaos::linearizability`), and once the fault is
//! over, writes succeed again through every node within a bound.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use runtimeai_chaos::linearizability::{check, Operation, Register, RegisterInput, RegisterOutput, Verdict};
use runtimeai_tests::{phase, Cluster, ClusterOptions};

type History = Arc<Mutex<Vec<Operation<RegisterInput, RegisterOutput>>>>;

/// The register a runtime is for this test: its version and its label `v`.
fn register(body: &serde_json::Value) -> Option<String> {
    Some(format!("{}:{}", body["version"].as_u64()?, body["labels"]["v"].as_str().unwrap_or("")))
}

/// A fault against the leader, run while the workload runs.
enum Fault {
    Kill,
    /// Paused for this long, then resumed.
    Pause(Duration),
    /// Every node in turn SIGKILLed and started again, each waited for until ready.
    RollingRestart,
}

async fn workload_under(fault: Fault) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let created =
        cluster.call(1, Method::POST, "/v1/runtimes", Some(&json!({"name": "reg", "type": "vcluster"})), &[]).await?;
    let id = created.body["id"].as_str().unwrap().to_string();
    cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), Duration::from_secs(20)).await?;
    let start = Instant::now();
    let now = move || start.elapsed().as_micros() as u64;
    let initial = cluster.call(1, Method::GET, &format!("/v1/runtimes/{id}"), None, &[]).await?;
    let history: History = Arc::new(Mutex::new(vec![Operation {
        key: id.clone(),
        input: RegisterInput::Write(register(&initial.body).unwrap()),
        output: RegisterOutput::Written,
        call: 0,
        ret: Some(now()),
    }]));
    let urls: Vec<String> = (1..=3).map(|n| cluster.node(n).url(&format!("/v1/runtimes/{id}"))).collect();
    let duration = match fault {
        Fault::RollingRestart => Duration::from_secs(14),
        _ => Duration::from_secs(8),
    };

    phase(&format!("four clients read and write through every node for {duration:?}; the fault starts at 3 s"));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
    let mut workers = Vec::new();
    for worker in 0..4u64 {
        let (client, history, urls, id) = (client.clone(), history.clone(), urls.clone(), id.clone());
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + duration;
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let url = &urls[((worker + i) % 3) as usize];
                let call = now();
                let read = client.get(url).send().await;
                let seen = match read {
                    Ok(r) if r.status().is_success() => r.json::<serde_json::Value>().await.ok(),
                    _ => None,
                };
                let Some(seen) = seen else { continue };
                let Some(value) = register(&seen) else { continue };
                history.lock().unwrap().push(Operation {
                    key: id.clone(),
                    input: RegisterInput::Read,
                    output: RegisterOutput::Value(Some(value.clone())),
                    call,
                    ret: Some(now()),
                });
                let version = seen["version"].as_u64().unwrap_or(0);
                let label = format!("w{worker}-{i}");
                let call = now();
                let answer = client
                    .patch(url)
                    .header("if-match", format!("\"{version}\""))
                    .json(&json!({"labels": {"v": label}}))
                    .send()
                    .await;
                let (output, ret) = match answer.map(|r| r.status().as_u16()) {
                    Ok(200) => (RegisterOutput::Swapped(true), Some(now())),
                    Ok(412) => (RegisterOutput::Swapped(false), Some(now())),
                    // 503, timeouts, dropped connections: it may or may not have happened.
                    _ => (RegisterOutput::Unknown, None),
                };
                history.lock().unwrap().push(Operation {
                    key: id.clone(),
                    input: RegisterInput::Cas { from: value, to: format!("{}:{label}", version + 1) },
                    output,
                    call,
                    ret,
                });
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.wait_leader(Duration::from_secs(10)).await?;
    match fault {
        Fault::Kill => cluster.kill(leader),
        Fault::Pause(pause) => {
            cluster.signal(leader, nix::sys::signal::Signal::SIGSTOP);
            tokio::time::sleep(pause).await;
            cluster.signal(leader, nix::sys::signal::Signal::SIGCONT);
        }
        Fault::RollingRestart => {
            for node in 1..=3 {
                cluster.kill(node);
                cluster.spawn(node)?;
                cluster.wait_ready(node, Duration::from_secs(20)).await?;
            }
        }
    }
    for worker in workers {
        worker.await?;
    }
    let history = history.lock().unwrap().clone();
    let writes = history.iter().filter(|o| o.output == RegisterOutput::Swapped(true)).count();
    phase(&format!("{} operations recorded, {writes} writes won their compare-and-set", history.len()));
    assert!(writes > 5, "the workload made progress: {writes} writes");
    assert_eq!(check(&Register, &history), Verdict::Linearizable, "history: {history:?}");

    phase("healed: a write through every live node succeeds within 10 s");
    for via in cluster.running() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let patch = json!({"labels": {"healed": via.to_string()}});
            let response = cluster.call(via, Method::PATCH, &format!("/v1/runtimes/{id}"), Some(&patch), &[]).await;
            if response.is_ok_and(|r| r.status == 200) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "node {via} still refuses writes 10 s after the fault");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn if_match_writes_and_reads_stay_linearizable_across_a_leader_kill() -> anyhow::Result<()> {
    workload_under(Fault::Kill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn if_match_writes_and_reads_stay_linearizable_while_the_leader_is_paused() -> anyhow::Result<()> {
    workload_under(Fault::Pause(Duration::from_secs(3))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn if_match_writes_and_reads_stay_linearizable_through_a_rolling_restart() -> anyhow::Result<()> {
    workload_under(Fault::RollingRestart).await
}
