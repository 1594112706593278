//! The network scenarios: partitions, one-way cuts, loss, delay and stalled connections, made by
//! the proxies between the nodes (`crate::proxy`), each held for the fault window and healed.

use std::time::{Duration, Instant};

use rand::Rng;

use super::{refusals, writes_through_every_member, FaultContext, RECOVER_WITHIN};
use crate::error::{Error, Result};
use crate::proxy::{DirectionFaults, Network};

/// Injects the network fault `name` for the fault window.
pub(super) async fn inject(name: &str, cx: &mut FaultContext) -> Result<()> {
    match name {
        "partition-leader" => {
            let (leader, followers) = cx.followers().await?;
            let what = format!("partition: leader {leader} alone");
            held(cx, what, |network| network.partition(&[vec![leader], followers])).await
        }
        "partition-minority" => {
            let (leader, mut followers) = cx.followers().await?;
            let minority_size = (cx.members.len() - 1) / 2;
            let minority: Vec<u64> = followers.drain(..minority_size).collect();
            followers.push(leader);
            let what = format!("partition: {minority:?} | {followers:?}");
            held(cx, what, |network| network.partition(&[minority, followers])).await
        }
        "bridge" => {
            let (leader, mut followers) = cx.followers().await?;
            let bridge = followers.remove(cx.rng.gen_range(0..followers.len()));
            let what = format!("bridge: {leader} | {followers:?}, node {bridge} sees both");
            held(cx, what, |network| network.partition(&[vec![leader], followers])).await
        }
        "one-way-leader" => {
            let (leader, followers) = cx.followers().await?;
            let what = format!("one way: nothing from leader {leader} arrives");
            held(cx, what, |network| followers.iter().for_each(|follower| network.cut_one_way(leader, *follower))).await
        }
        "lossy-network" => {
            let loss = DirectionFaults { loss: 0.5, ..Default::default() };
            held(cx, "50 % packet loss on every link".into(), |network| network.degrade_all(loss)).await
        }
        "slow-network" => {
            let delay = DirectionFaults {
                delay: Duration::from_millis(75),
                jitter: Duration::from_millis(50),
                ..Default::default()
            };
            held(cx, "75 ± 50 ms delay on every link".into(), |network| network.degrade_all(delay)).await
        }
        "stalled-connections" => stalled_connections(cx).await,
        other => Err(Error::Cluster(format!("{other} is not a network scenario"))),
    }
}

/// Applies `fault` to the network, holds it for the fault window, heals it, and records it as
/// `what`.
async fn held(cx: &mut FaultContext, what: String, fault: impl FnOnce(&Network)) -> Result<()> {
    let network = cx.network()?;
    let start = cx.begin();
    fault(&network);
    tokio::time::sleep(cx.hold).await;
    network.heal();
    cx.end(what, start);
    Ok(())
}

/// The connections the followers opened to the leader stop delivering; every member must take
/// writes again within [`RECOVER_WITHIN`].
async fn stalled_connections(cx: &mut FaultContext) -> Result<()> {
    let leader = cx.leader().await?;
    let network = cx.network()?;
    let start = cx.begin();
    let stalled = Instant::now();
    network.stall_open_connections_to(leader);
    // Nothing heals a stalled connection but closing it: the nodes must notice and dial again,
    // in about the time an election takes, not when the kernel gives up.
    let (took, stuck) = writes_through_every_member(&cx.cluster, &cx.members, "unstall", stalled, RECOVER_WITHIN).await;
    let detail = if stuck.is_empty() {
        format!("every member took a write within {} ms of its connections stalling", took.values().max().unwrap_or(&0))
    } else {
        format!("{} s after the connections stalled, {}", RECOVER_WITHIN.as_secs(), refusals(&stuck))
    };
    cx.add_check("recovers", stuck.is_empty(), detail);
    tokio::time::sleep(cx.hold.saturating_sub(stalled.elapsed())).await;
    cx.end(format!("connections to leader {leader} stalled"), start);
    Ok(())
}
