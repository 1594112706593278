//! The replicated core under process failures and membership changes.

use std::time::Duration;

use runtimeai_tests::{phase, Cluster, ClusterOptions};

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_any_node_is_visible_through_every_node() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    phase("create one runtime through each node");
    let mut ids = Vec::new();
    for via in 1..=3 {
        let (status, body) = cluster.create_runtime(via, &format!("rt-via-{via}")).await?;
        assert_eq!(status, 201, "create through node {via}: {body}");
        assert_eq!(body["state"], "creating");
        assert_eq!(body["version"], 1);
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    phase("read every runtime through every node, linearizably");
    for via in 1..=3 {
        for (n, id) in ids.iter().enumerate() {
            let (status, body) = cluster.get_runtime(via, id, false).await?;
            assert_eq!(status, 200, "read {id} through node {via}: {body}");
            assert_eq!(body["name"], format!("rt-via-{}", n + 1));
        }
    }
    phase("a name is unique: the same name again is a conflict, whichever node is asked");
    let (status, body) = cluster.create_runtime(2, "rt-via-1").await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["status"], 409);
    phase("an unknown id is 404 problem+json");
    let (status, body) = cluster.get_runtime(3, "rt_doesnotexist", false).await?;
    assert_eq!(status, 404);
    assert_eq!(body["status"], 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_follower_misses_nothing_once_restarted() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let leader = cluster.wait_leader(SETTLE).await?;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != follower).unwrap();

    phase(&format!("SIGKILL follower {follower}; writes continue through the others"));
    cluster.kill(follower);
    let mut ids = Vec::new();
    for i in 0..20 {
        let via = if i % 2 == 0 { leader } else { other };
        ids.push(cluster.create_runtime_eventually(via, &format!("while-down-{i}"), SETTLE).await?);
    }

    phase("restart the follower: it catches up");
    cluster.spawn(follower)?;
    cluster.wait_ready(follower, SETTLE).await?;
    cluster.wait_replicated(follower, &ids, SETTLE).await?;
    let (status, _) = cluster.get_runtime(follower, &ids[19], false).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_rejoins_as_follower() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let old_leader = cluster.wait_leader(SETTLE).await?;
    let before = cluster.create_runtime_eventually(old_leader, "before-failover", SETTLE).await?;

    phase(&format!("SIGKILL leader {old_leader}"));
    cluster.kill(old_leader);
    let new_leader = cluster.wait_leader(SETTLE).await?;
    assert_ne!(new_leader, old_leader);
    let survivor = (1..=3).find(|id| *id != old_leader && *id != new_leader).unwrap();

    phase(&format!("node {new_leader} leads; writes continue through both survivors"));
    let mut ids = vec![before];
    ids.push(cluster.create_runtime_eventually(new_leader, "after-failover-1", SETTLE).await?);
    ids.push(cluster.create_runtime_eventually(survivor, "after-failover-2", SETTLE).await?);

    phase("restart the old leader: it follows the new one and has every write");
    cluster.spawn(old_leader)?;
    cluster.wait_ready(old_leader, SETTLE).await?;
    cluster.wait_replicated(old_leader, &ids, SETTLE).await?;
    let view = cluster.cluster_view(old_leader).await?;
    assert_eq!(view["state"], "follower", "{view}");
    assert_eq!(view["leader_id"], new_leader, "{view}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_killing_all_nodes() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    phase("write 30 runtimes through all nodes");
    let mut ids = Vec::new();
    for i in 0..30u64 {
        ids.push(cluster.create_runtime_eventually(1 + i % 3, &format!("durable-{i}"), SETTLE).await?);
    }
    phase("SIGKILL all three at once, then restart them");
    kill_all_and_restart(&mut cluster).await?;
    phase("every acknowledged write is there, through every node");
    assert_readable_through_every_node(&cluster, &ids).await?;
    let list: serde_json::Value = cluster.client.get(cluster.node(2).url("/v1/runtimes")).send().await?.json().await?;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(30), "{list}");
    Ok(())
}

/// The state machine's writes skip the write-ahead log; what a crash takes from them is applied
/// again from the log. So each node must have its state on disk before it purges its log, or a
/// crash after a purge leaves a hole that no log fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_killing_all_nodes_after_they_purged_their_logs() -> anyhow::Result<()> {
    let options = ClusterOptions {
        extra_args: ["--snapshot-count", "20", "--snapshot-catchup-entries", "0"].map(String::from).to_vec(),
        ..Default::default()
    };
    let mut cluster = Cluster::start(3, options).await?;
    phase("write until every node has snapshotted and purged its log");
    let mut ids = Vec::new();
    for i in 0..60u64 {
        ids.push(cluster.create_runtime_eventually(1 + i % 3, &format!("purged-{i}"), SETTLE).await?);
    }
    for node in 1..=3 {
        wait_purged(&cluster, node).await?;
    }
    phase("a few writes more, then SIGKILL all three at once and restart them");
    for i in 60..70u64 {
        ids.push(cluster.create_runtime_eventually(1 + i % 3, &format!("purged-{i}"), SETTLE).await?);
    }
    kill_all_and_restart(&mut cluster).await?;
    phase("every acknowledged write is there, through every node");
    assert_readable_through_every_node(&cluster, &ids).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_catches_up_by_snapshot_and_becomes_a_voter() -> anyhow::Result<()> {
    let options = ClusterOptions {
        extra_args: ["--snapshot-count", "20", "--snapshot-catchup-entries", "0", "--snapshot-chunk-bytes", "1024"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let mut cluster = Cluster::start(3, options).await?;
    phase("write enough for the leader to snapshot and purge its log");
    let mut ids = Vec::new();
    for i in 0..60u64 {
        ids.push(cluster.create_runtime_eventually(1 + i % 3, &format!("snap-{i}"), SETTLE).await?);
    }
    let leader = cluster.wait_leader(SETTLE).await?;
    wait_purged(&cluster, leader).await?;

    phase("start node 4 and add it through a follower");
    cluster.start_joiner(4)?;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let response = cluster
        .client
        .post(cluster.node(follower).url("/v1/cluster/members"))
        .json(&serde_json::json!({ "id": 4, "grpc": cluster.node(4).grpc }))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    assert_eq!(status, 201, "{body}");
    let member = body["members"].as_array().unwrap().iter().find(|m| m["id"] == 4).cloned();
    assert_eq!(member.as_ref().map(|m| m["role"].clone()), Some("voter".into()), "{body}");

    phase("node 4 installed a snapshot and serves every write");
    cluster.wait_ready(4, SETTLE).await?;
    cluster.wait_replicated(4, &ids, SETTLE).await?;
    let log = std::fs::read_to_string(&cluster.node(4).log)?;
    let last_chunk = log
        .lines()
        .find(|l| l.contains("receiving the last chunk of a snapshot"))
        .unwrap_or_else(|| panic!("node 4 installed no snapshot\n{}", cluster.log_tail(4, 40)));
    let offset: u64 = last_chunk
        .split("offset=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {last_chunk:?}"));
    assert!(offset >= 1024, "the snapshot came in one chunk ({last_chunk}); expected several of 1 KiB");
    let view = cluster.cluster_view(4).await?;
    assert!(view["snapshot_index"].as_u64().unwrap_or(0) > 0, "{view}");

    phase("the four-node cluster takes writes through node 4");
    let id = cluster.create_runtime_eventually(4, "through-node-4", SETTLE).await?;
    let (status, _) = cluster.get_runtime(1, &id, false).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_member_shrinks_the_cluster_and_the_rest_keeps_serving() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let leader = cluster.wait_leader(SETTLE).await?;
    phase(&format!("remove the leader, node {leader}, through another node"));
    let via = (1..=3).find(|id| *id != leader).unwrap();
    let response =
        cluster.client.delete(cluster.node(via).url(&format!("/v1/cluster/members/{leader}"))).send().await?;
    assert_eq!(response.status(), 200, "{}", response.text().await?);

    phase("the remaining two elect a leader among themselves and report two members");
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(SETTLE).await?;
    assert_ne!(new_leader, leader);
    let view = cluster.cluster_view(via).await?;
    let members: Vec<u64> = view["members"].as_array().unwrap().iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert_eq!(members.len(), 2, "{view}");
    assert!(!members.contains(&leader), "{view}");

    phase("writes and linearizable reads keep working with two members");
    for survivor in members.iter().copied() {
        let id = cluster.create_runtime_eventually(survivor, &format!("after-removal-{survivor}"), SETTLE).await?;
        for reader in members.iter().copied() {
            let (status, _) = cluster.get_runtime(reader, &id, false).await?;
            assert_eq!(status, 200);
        }
    }

    phase("removing a node that is not a member is 404");
    let response = cluster.client.delete(cluster.node(via).url("/v1/cluster/members/42")).send().await?;
    assert_eq!(response.status(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_reports_roles_and_reachability() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, ClusterOptions::default()).await?;
    let leader = cluster.wait_leader(SETTLE).await?;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let view = cluster.cluster_view(follower).await?;
    assert_eq!(view["node_id"], follower);
    assert_eq!(view["leader_id"], leader);
    assert!(view["term"].as_u64().unwrap() >= 1, "{view}");
    assert!(view["last_applied"].as_u64().is_some(), "{view}");
    let members = view["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for member in members {
        assert_eq!(member["role"], "voter");
        assert!(member["grpc"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert_eq!(member["reachable"], true, "{view}");
    }

    phase("a killed node shows as unreachable and its peers stay ready");
    let down = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    cluster.kill(down);
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let view = cluster.cluster_view(follower).await?;
        let member = view["members"].as_array().unwrap().iter().find(|m| m["id"] == down).cloned().unwrap();
        if member["reachable"] == false {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "node {down} still reachable: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.wait_ready(follower, SETTLE).await?;
    let health: serde_json::Value =
        cluster.client.get(cluster.node(follower).url("/healthz")).send().await?.json().await?;
    assert_eq!(health["status"], "ok");
    Ok(())
}

/// SIGKILLs all three nodes at once, then starts them again and waits until they are ready.
async fn kill_all_and_restart(cluster: &mut Cluster) -> anyhow::Result<()> {
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.spawn(id)?;
    }
    for id in 1..=3 {
        cluster.wait_ready(id, SETTLE).await?;
    }
    Ok(())
}

/// Every runtime of `ids` reads (linearizably) through every node.
async fn assert_readable_through_every_node(cluster: &Cluster, ids: &[String]) -> anyhow::Result<()> {
    for via in 1..=3 {
        for id in ids {
            let (status, body) = cluster.get_runtime(via, id, false).await?;
            assert_eq!(status, 200, "runtime {id} through node {via}: {body}");
        }
    }
    Ok(())
}

/// Waits until `node` has purged (some of) its log behind a snapshot.
async fn wait_purged(cluster: &Cluster, node: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + SETTLE;
    loop {
        let view = cluster.cluster_view(node).await?;
        if view["purged_index"].as_u64().unwrap_or(0) > 0 {
            eprintln!("node {node} purged its log up to {}", view["purged_index"]);
            return Ok(());
        }
        assert!(std::time::Instant::now() < deadline, "node {node} never purged its log: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
