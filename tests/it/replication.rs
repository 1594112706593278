//! The replicated core under process failures and membership changes.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use runtimeai_tests::{phase, Cluster, ClusterOptions, Eventually, EVENTUALLY};

const SETTLE: Duration = EVENTUALLY;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_any_node_is_visible_through_every_node() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, ClusterOptions::default()).await?;
    phase("create one runtime through each node");
    let mut ids = Vec::new();
    for via in 1..=3 {
        let created = create(&cluster, via, &format!("rt-via-{via}")).await?;
        assert_eq!(created.status, 201, "create through node {via}: {created:?}");
        assert_eq!(created.body["state"], "creating");
        assert_eq!(created.body["version"], 1);
        ids.push(created.body["id"].as_str().unwrap().to_string());
    }
    phase("read every runtime through every node, linearizably");
    for via in 1..=3 {
        for (n, id) in ids.iter().enumerate() {
            let read = cluster.get_eventually(via, &format!("/v1/runtimes/{id}")).await?;
            assert_eq!(read.status, 200, "read {id} through node {via}: {read:?}");
            assert_eq!(read.body["name"], format!("rt-via-{}", n + 1));
        }
    }
    phase("a name is unique: the same name again is a conflict, whichever node is asked");
    let again = create(&cluster, 2, "rt-via-1").await?;
    assert_eq!(again.status, 409, "{again:?}");
    assert_eq!(again.body["status"], 409);
    phase("an unknown id is 404 problem+json");
    let unknown = cluster.get_eventually(3, "/v1/runtimes/rt_doesnotexist").await?;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["status"], 404);
    Ok(())
}

/// `POST /v1/runtimes` through `via` with the body [`Cluster::create_runtime`] sends, riding
/// out an election (see [`Eventually::call_eventually`]).
async fn create(cluster: &Cluster, via: u64, name: &str) -> anyhow::Result<runtimeai_tests::Response> {
    let body = json!({ "name": name, "type": "vm", "labels": { "test": "true" } });
    cluster.call_eventually(via, Method::POST, "/v1/runtimes", Some(&body), &[]).await
}

/// `GET /v1/runtimes/{id}` through `via`, linearizably, riding out an election.
async fn read_status(cluster: &Cluster, via: u64, id: &str) -> anyhow::Result<u16> {
    Ok(cluster.get_eventually(via, &format!("/v1/runtimes/{id}")).await?.status)
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
    assert_eq!(read_status(&cluster, follower, &ids[19]).await?, 200);
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

    phase("restart the old leader: it follows the leader and has every write");
    cluster.spawn(old_leader)?;
    cluster.wait_ready(old_leader, SETTLE).await?;
    cluster.wait_replicated(old_leader, &ids, SETTLE).await?;
    // A late election on a loaded machine may move leadership on from `new_leader`; what
    // matters is that the old leader did not take it back and follows whoever leads.
    let leader = cluster.wait_leader(SETTLE).await?;
    assert_ne!(leader, old_leader, "the restarted old leader took leadership back");
    cluster
        .wait_view(old_leader, &format!("following node {leader}"), |view| {
            view["state"] == "follower" && view["leader_id"] == leader
        })
        .await?;
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
    let list = cluster.get_eventually(2, "/v1/runtimes").await?;
    assert_eq!(list.body["items"].as_array().map(Vec::len), Some(30), "{list:?}");
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
    phase("write until the leader's snapshot is half a --snapshot-count (10 entries) behind");
    let applied = loop {
        let view = cluster.cluster_view(leader).await?;
        let applied = view["last_applied"].as_u64().unwrap_or(0);
        if applied >= view["snapshot_index"].as_u64().unwrap_or(0) + 10 {
            break applied;
        }
        anyhow::ensure!(ids.len() < 200, "the leader's snapshot never fell 10 entries behind: {view}");
        let i = ids.len() as u64;
        ids.push(cluster.create_runtime_eventually(1 + i % 3, &format!("snap-{i}"), SETTLE).await?);
    };

    phase("start node 4 and add it through a follower");
    cluster.start_joiner(4)?;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // The answer comes once node 4 has caught up (the node allows 60 s for that); a 503 (no
    // leader for a moment) is asked again: adding a member again at the same address is allowed.
    let deadline = std::time::Instant::now() + SETTLE;
    let (status, body) = loop {
        let response = cluster
            .client
            .post(cluster.node(follower).url("/v1/cluster/members"))
            .json(&json!({ "id": 4, "grpc": cluster.node(4).grpc }))
            .timeout(Duration::from_secs(120))
            .send()
            .await?;
        let (status, retry_after) = (response.status(), response.headers().contains_key("retry-after"));
        let body: serde_json::Value = response.json().await?;
        if status != 503 || !retry_after || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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
    // The leader built a fresh one for it rather than send one 10 entries old, to be replayed.
    let sent: u64 = last_chunk
        .split("snapshot_id: ")
        .nth(1)
        .and_then(|rest| rest.split([',', ' ']).next())
        .and_then(|id| id.rsplit('-').next())
        .and_then(|index| index.parse().ok())
        .unwrap_or_else(|| panic!("no snapshot id in {last_chunk:?}"));
    assert!(sent >= applied, "node 4 was sent a snapshot at {sent}, the leader had applied {applied} when it joined");
    cluster.wait_view(4, "a snapshot", |view| view["snapshot_index"].as_u64().unwrap_or(0) > 0).await?;

    phase("the four-node cluster takes writes through node 4");
    let id = cluster.create_runtime_eventually(4, "through-node-4", SETTLE).await?;
    assert_eq!(read_status(&cluster, 1, &id).await?, 200);
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
    let member_ids = |view: &serde_json::Value| -> Vec<u64> {
        view["members"].as_array().map(|m| m.iter().filter_map(|m| m["id"].as_u64()).collect()).unwrap_or_default()
    };
    // `via` may not have the entry that removed the leader yet when it names the new leader.
    let view = cluster.wait_view(via, "two members", |view| member_ids(view).len() == 2).await?;
    let members = member_ids(&view);
    assert!(!members.contains(&leader), "{view}");

    phase("writes and linearizable reads keep working with two members");
    for survivor in members.iter().copied() {
        let id = cluster.create_runtime_eventually(survivor, &format!("after-removal-{survivor}"), SETTLE).await?;
        for reader in members.iter().copied() {
            assert_eq!(read_status(&cluster, reader, &id).await?, 200);
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
    // "reachable" means the leader heard from the member lately: on a loaded machine a
    // heartbeat can be late, so wait until the leader reaches all three.
    let all_reachable = |view: &serde_json::Value| {
        view["members"].as_array().is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["reachable"] == true))
    };
    let view = cluster.wait_view(follower, "every member reachable", all_reachable).await?;
    assert_eq!(view["node_id"], follower);
    assert_eq!(view["leader_id"], leader);
    assert!(view["term"].as_u64().unwrap() >= 1, "{view}");
    assert!(view["last_applied"].as_u64().is_some(), "{view}");
    let members = view["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for member in members {
        assert_eq!(member["role"], "voter");
        assert!(member["grpc"].as_str().unwrap().starts_with("127.0.0.1:"));
    }

    phase("a killed node shows as unreachable and its peers stay ready");
    let down = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    cluster.kill(down);
    let unreachable = |view: &serde_json::Value| {
        view["members"].as_array().is_some_and(|m| m.iter().any(|m| m["id"] == down && m["reachable"] == false))
    };
    cluster.wait_view(follower, &format!("node {down} unreachable"), unreachable).await?;
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

/// Every runtime of `ids` reads (linearizably) through every node. Right after a restart a late
/// election may answer 503 for a while: each read rides it out.
async fn assert_readable_through_every_node(cluster: &Cluster, ids: &[String]) -> anyhow::Result<()> {
    for via in 1..=3 {
        for id in ids {
            let read = cluster.get_eventually(via, &format!("/v1/runtimes/{id}")).await?;
            assert_eq!(read.status, 200, "runtime {id} through node {via}: {read:?}");
        }
    }
    Ok(())
}

/// Waits until `node` has purged (some of) its log behind a snapshot.
async fn wait_purged(cluster: &Cluster, node: u64) -> anyhow::Result<()> {
    let view = cluster.wait_view(node, "a purged log", |view| view["purged_index"].as_u64().unwrap_or(0) > 0).await?;
    eprintln!("node {node} purged its log up to {}", view["purged_index"]);
    Ok(())
}
