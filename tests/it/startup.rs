//! Starting nodes: in any order, and the `runtimeai dev` cluster.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runtimeai_tests::{binary, free_port_range, phase, Cluster, ClusterOptions, EVENTUALLY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_start_in_any_order_and_stay_not_ready_until_a_quorum_is_up() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    phase("stop every node, then bring back only node 3 (not the initializer)");
    for id in 1..=3 {
        cluster.kill(id);
    }
    // A restart appends to the node's log: only what this start writes counts below.
    let log_before = std::fs::metadata(&cluster.node(3).log)?.len();
    cluster.spawn(3)?;
    // Without a quorum there is no leader: not ready, and writes are 503 with Retry-After.
    let ready = first_answer(&cluster, &cluster.node(3).url("/readyz")).await?;
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.headers()["content-type"], "application/problem+json");
    let write = cluster
        .client
        .post(cluster.node(3).url("/v1/runtimes"))
        .json(&serde_json::json!({"name": "no-quorum", "type": "vm"}))
        .send()
        .await?;
    assert_eq!(write.status(), 503);
    assert!(write.headers().contains_key("retry-after"));
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let log = std::fs::read(&cluster.node(3).log)?;
        let new = String::from_utf8_lossy(log.get(log_before as usize..).unwrap_or_default());
        if new.contains("peer unreachable; retrying with backoff") {
            break;
        }
        assert!(Instant::now() < deadline, "no unreachable peer logged\n{}", cluster.log_tail(3, 20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    phase("start node 2: a quorum forms and both become ready");
    cluster.spawn(2)?;
    cluster.wait_ready(3, EVENTUALLY).await?;
    cluster.wait_ready(2, EVENTUALLY).await?;
    let id = cluster.create_runtime_eventually(3, "after-quorum", EVENTUALLY).await?;
    phase("node 1 comes back last and catches up");
    cluster.spawn(1)?;
    cluster.wait_ready(1, EVENTUALLY).await?;
    cluster.wait_replicated(1, &[id], EVENTUALLY).await?;
    Ok(())
}

/// The first HTTP answer from `url`: a node just started may not listen yet.
async fn first_answer(cluster: &Cluster, url: &str) -> anyhow::Result<reqwest::Response> {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        match cluster.client.get(url).send().await {
            Ok(response) => return Ok(response),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[test]
fn runtimeai_dev_starts_a_ready_cluster_and_stops_it_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let (http, grpc) = (free_port_range(3), free_port_range(3));
    // Its own process group, so that a failing test still takes dev and its nodes down.
    let mut child = DevProcess(
        Command::new(binary())
            .args(["dev", "--http-port", &http.to_string(), "--grpc-port", &grpc.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("dev"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            eprintln!("dev: {line}");
            let _ = lines_tx.send(line);
        }
    });
    // Longer than dev itself waits for its cluster (180 s), so that dev's own message shows.
    let deadline = Instant::now() + Duration::from_secs(200);
    let mut seen = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let ready = line.contains("cluster ready");
        seen.push(line);
        if ready {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("cluster ready")), "dev never reported ready: {seen:?}");
    assert_eq!(seen.iter().filter(|l| l.starts_with("node ") && l.contains("https://")).count(), 3, "{seen:?}");
    assert!(!seen.iter().any(|l| l.contains("exited")), "{seen:?}");

    phase("the printed endpoint serves the cluster over TLS from dev's CA, to the admin's key only");
    let token = std::fs::read_to_string(dir.path().join("dev/admin.key")).unwrap();
    let ca = std::fs::read(dir.path().join("dev/certs/ca.pem")).unwrap();
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{http}/v1/cluster");
    let view = client.get(&url).bearer_auth(token.trim()).send().unwrap().text().unwrap();
    assert!(view.contains("\"leader_id\""), "{view}");
    assert_eq!(client.get(&url).send().unwrap().status(), 401);
    let plain = http_get(&format!("127.0.0.1:{http}"), "/v1/cluster");
    assert!(!plain.starts_with("HTTP/"), "no plain-text HTTP on a TLS port: {plain:?}");

    phase("SIGINT stops the whole cluster cleanly");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "dev exit status {status}");
    for port in [http, http + 1, http + 2] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still served after stop");
    }
}

/// Kills the whole process group of `runtimeai dev` when dropped.
struct DevProcess(std::process::Child);

impl Drop for DevProcess {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A TLS port may close the connection on the first bytes it cannot parse, before the
    // request is all written (a broken pipe): what it answered, if anything, is the point.
    let _ = write!(stream, "GET {path} HTTP/1.0\r\n\r\n");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}
