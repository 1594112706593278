//! Moving runtimes between nodes: a sandbox migrates with what it wrote and its snapshots; a
//! lost node's runtimes are rebuilt elsewhere on request, and that node, back, runs no second
//! copy.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use runtimeai_tests::{phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

/// Where node `node` keeps sandbox `id`.
fn sandbox_dir(cluster: &Cluster, node: u64, id: &str) -> PathBuf {
    PathBuf::from(format!("{}.sandboxes", cluster.node(node).data_dir.display())).join(id)
}

/// Whether process `pid` runs (a zombie, which nobody may reap here, does not).
fn alive(pid: nix::unistd::Pid) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    state.is_some_and(|state| state != "Z")
}

/// Waits until `done` holds, or fails saying `what`.
async fn until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + EVENTUALLY;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "not within {EVENTUALLY:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A file of the sandbox, read through node `via`: its status and text.
async fn read_file(cluster: &Cluster, via: u64, id: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let url = cluster.node(via).url(&format!("/v1/runtimes/{id}/files/{path}"));
    let answer = cluster.client.get(url).send().await?;
    Ok((answer.status().as_u16(), answer.text().await?))
}

/// Runs a lifecycle call and waits for its operation; the operation as it ended.
async fn lifecycle(cluster: &Cluster, via: u64, id: &str, what: &str, body: Value) -> anyhow::Result<Value> {
    let path = format!("/v1/runtimes/{id}/lifecycle/{what}");
    let begun = cluster.call_eventually(via, Method::POST, &path, Some(&body), &[]).await?;
    anyhow::ensure!(begun.status == 202, "{what}: {begun:?}");
    Ok(cluster.wait_operation(via, begun.body["id"].as_str().unwrap_or_default(), EVENTUALLY).await?)
}

/// The `runtime.migrated` events of runtime `id`.
async fn moves(cluster: &Cluster, via: u64, id: &str) -> anyhow::Result<Vec<Value>> {
    let path = format!("/v1/runtimes/{id}/events?limit=1000");
    let events = cluster.call_eventually(via, Method::GET, &path, None, &[]).await?;
    let events = events.body["items"].as_array().cloned().unwrap_or_default();
    Ok(events.into_iter().filter(|e| e["type"] == "runtime.migrated").collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_moves_with_its_data_and_a_lost_nodes_sandboxes_are_rebuilt_elsewhere() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("RUNTIMEAI_REQUIRE_SANDBOXES").is_none(), "sandboxes need root");
        eprintln!("skipped: sandboxes need root");
        return Ok(());
    }
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let created = json!({"name": "mover", "type": "sandbox"});
    let created = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&created), &[]).await?;
    assert_eq!(created.status, 201, "{created:?}");
    assert!(created.body["capabilities"].as_array().unwrap().contains(&json!("migrate")), "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    let from = created.body["placement"]["node_id"].as_u64().unwrap();
    let (to, third) = (from % 3 + 1, (from + 1) % 3 + 1);
    cluster.wait_operation(1, created.body["active_operation"].as_str().unwrap(), EVENTUALLY).await?;

    phase("what it wrote, and a snapshot of it");
    let notes = |via: u64| cluster.node(via).url(&format!("/v1/runtimes/{id}/files/%2Fwork%2Fnotes.txt"));
    let put = cluster.client.put(notes(to)).body(format!("written on node {from}")).send().await?;
    assert_eq!(put.status(), 204);
    let snapshot = lifecycle(&cluster, to, &id, "snapshot", json!({"name": "before-the-move"})).await?;
    assert_eq!(snapshot["status"], "succeeded", "{snapshot}");
    let snapshot_id = snapshot["params"]["snapshot_id"].as_str().unwrap().to_string();
    let put = cluster.client.put(notes(third)).body("changed after the snapshot").send().await?;
    assert_eq!(put.status(), 204);

    phase("refused: to its own node, to no node, with another action, a target on another action, a VM");
    let migrate = format!("/v1/runtimes/{id}/lifecycle/migrate");
    for node in [from, 99] {
        let refused = cluster.call(to, Method::POST, &migrate, Some(&json!({"node_id": node})), &[]).await?;
        assert_eq!(
            (refused.status, refused.body["type"].as_str()),
            (409, Some("https://runtimeai.dev/problems/no-destination")),
            "{refused:?}"
        );
    }
    let execute = format!("/v1/runtimes/{id}/actions/execute");
    let with_another = json!({"actions": [{"type": "migrate"}, {"type": "restart"}]});
    let refused = cluster.call(to, Method::POST, &execute, Some(&with_another), &[]).await?;
    assert_eq!(refused.status, 400, "{refused:?}");
    let aimed = json!({"actions": [{"type": "restart", "target": {"node": to}}]});
    let refused = cluster.call(to, Method::POST, &execute, Some(&aimed), &[]).await?;
    assert_eq!(
        (refused.status, refused.body["errors"][0]["path"].as_str()),
        (400, Some("$.actions[0].target")),
        "{refused:?}"
    );
    let vcluster = json!({"name": "vc", "type": "vcluster"});
    let vcluster = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&vcluster), &[]).await?;
    let vcluster_migrate = format!("/v1/runtimes/{}/lifecycle/migrate", vcluster.body["id"].as_str().unwrap());
    let refused = cluster.call(1, Method::POST, &vcluster_migrate, None, &[]).await?;
    assert_eq!(refused.status, 409, "a vcluster lives in the host cluster, not on a node: {refused:?}");

    phase("a VM (libvirt's test hypervisor) moves with its snapshot, to a node the cluster picks");
    let vm = json!({"name": "vm", "type": "vm"});
    let vm = cluster.call_eventually(1, Method::POST, "/v1/runtimes", Some(&vm), &[]).await?;
    cluster.wait_operation(1, vm.body["active_operation"].as_str().unwrap(), EVENTUALLY).await?;
    let (vm_id, vm_from) = (vm.body["id"].as_str().unwrap().to_string(), vm.body["placement"]["node_id"].as_u64());
    let vm_to = if vm_from == Some(third) { from } else { third };
    let vm_snapshot = lifecycle(&cluster, 1, &vm_id, "snapshot", json!({})).await?;
    let vm_moved = lifecycle(&cluster, 1, &vm_id, "migrate", json!({"node_id": vm_to})).await?;
    assert_eq!(vm_moved["status"], "succeeded", "{vm_moved}");
    let vm_snapshot_id = vm_snapshot["params"]["snapshot_id"].clone();
    let reverted = lifecycle(&cluster, 1, &vm_id, "restore", json!({"snapshot_id": vm_snapshot_id})).await?;
    assert_eq!(reverted["status"], "succeeded", "the destination's hypervisor has its snapshot: {reverted}");

    phase("moved by an agent's action aimed at a node, through the third node: stopped, moved, started");
    let aimed = json!({"actions": [{"type": "migrate", "target": {"node": to}}]});
    let begun = cluster.call_eventually(third, Method::POST, &execute, Some(&aimed), &[]).await?;
    assert_eq!(begun.status, 202, "{begun:?}");
    let done = cluster.wait_operation(third, begun.body["id"].as_str().unwrap(), EVENTUALLY).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["results"][0]["action"]["target"], json!({"node": to}), "{done}");
    let (_, record) = cluster.get_runtime(third, &id, false).await?;
    assert_eq!((record["placement"]["node_id"].as_u64(), record["state"].as_str()), (Some(to), Some("running")));
    let moved = moves(&cluster, third, &id).await?;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!((moved[0]["data"]["from_node"].as_u64(), moved[0]["data"]["to_node"].as_u64()), (Some(from), Some(to)));
    assert_eq!(moved[0]["data"]["mode"], "cold");
    assert_eq!(
        read_file(&cluster, from, &id, "%2Fwork%2Fnotes.txt").await?,
        (200, "changed after the snapshot".into())
    );
    assert!(sandbox_dir(&cluster, to, &id).join("layer.img").exists(), "it lives on node {to} now");
    until("the old node removes what it held of the sandbox", || !sandbox_dir(&cluster, from, &id).exists()).await?;
    let restored = lifecycle(&cluster, from, &id, "restore", json!({"snapshot_id": snapshot_id})).await?;
    assert_eq!(restored["status"], "succeeded", "its snapshot came along: {restored}");
    let text = read_file(&cluster, third, &id, "%2Fwork%2Fnotes.txt").await?;
    assert_eq!(text, (200, format!("written on node {from}")));

    phase("a lost node: refused while the leader reaches it; rebuilt elsewhere once it is down");
    let evacuate = format!("/v1/cluster/members/{to}/evacuate");
    let refused = cluster.call_eventually(third, Method::POST, &evacuate, None, &[]).await?;
    assert_eq!(refused.status, 409, "{refused:?}");
    let launch: Value = serde_json::from_str(&std::fs::read_to_string(sandbox_dir(&cluster, to, &id).join("pid"))?)?;
    let orphan = nix::unistd::Pid::from_raw(launch["pid"].as_i64().unwrap() as i32);
    cluster.kill(to);
    let deadline = Instant::now() + EVENTUALLY;
    let report = loop {
        let answer = cluster.call_eventually(third, Method::POST, &evacuate, None, &[]).await?;
        if answer.status == 202 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(report.status, 202, "{report:?}");
    let begun = report.body["begun"].as_array().unwrap();
    assert_eq!((begun.len(), begun[0]["runtime_id"].as_str()), (1, Some(id.as_str())), "{report:?}");
    let done = cluster.wait_operation(third, begun[0]["id"].as_str().unwrap(), EVENTUALLY).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, record) = cluster.get_runtime(third, &id, false).await?;
    let now_on = record["placement"]["node_id"].as_u64().unwrap();
    assert!(now_on != to && record["state"] == "running", "{record}");
    assert_eq!(record["snapshots"], json!([]), "its snapshots stayed on the lost node: {record}");
    let moved = moves(&cluster, third, &id).await?;
    assert_eq!((moved[1]["data"]["mode"].as_str(), moved[1]["severity"].as_str()), (Some("rebuild"), Some("warning")));
    assert_eq!(read_file(&cluster, third, &id, "%2Fwork%2Fnotes.txt").await?.0, 404, "made afresh from its spec");
    let (exec, command) = (format!("/v1/runtimes/{id}/exec"), json!({"command": ["true"]}));
    let ran = cluster.call(third, Method::POST, &exec, Some(&command), &[]).await?;
    assert_eq!(ran.status, 200, "it runs on node {now_on}: {ran:?}");

    phase("the lost node comes back: it ends and removes its copy");
    assert!(alive(orphan), "its sandbox outlived the node's SIGKILL");
    cluster.spawn(to)?;
    cluster.wait_ready(to, EVENTUALLY).await?;
    until(&format!("node {to} removes its copy"), || !sandbox_dir(&cluster, to, &id).exists()).await?;
    until("its copy's processes end", || !alive(orphan)).await?;
    Ok(())
}
