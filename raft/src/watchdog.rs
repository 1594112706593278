//! Fast failover when the leader's process is gone.
//!
//! openraft 0.9 protects a leader with a lease as long as the longest election timeout: a
//! follower refuses to vote while it heard from its leader within that time, so the first
//! candidate after a leader dies is usually refused and the election takes two rounds
//! (1–2 s with a 500 ms election timeout). When the leader's gRPC port *refuses connections*,
//! its process is not running (a partition or a pause gives timeouts, never a refusal), so
//! waiting out the lease protects nothing: every follower that sees this starts an election at
//! once. A candidate's vote is no longer bound by the lease. Followers that start at once split
//! the vote, and one with a shorter log is refused anyway; so the follower with the longest log
//! (asked of the others over gRPC; ties go to the lowest id) asks again a heartbeat later, in a
//! new term the others have not voted in (at most three times), and the others wait for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::replica::Replica;

/// Watches this node's leader while it is a follower, until `stop` turns true.
pub async fn run(replica: Arc<Replica>, heartbeat: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    // When this node started an election, how often it asked again, and whether it is the one
    // to ask again.
    let mut triggered: Option<(Instant, u32, bool)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(heartbeat) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let metrics = replica.metrics();
        match (metrics.state, metrics.current_leader, triggered) {
            // Our election did not produce a leader yet (we are still a candidate, or a higher
            // term's candidate with a shorter log turned us back into a follower): ask again,
            // in a new term.
            (ServerState::Candidate, _, Some((at, retries, true)))
            | (ServerState::Follower, None, Some((at, retries, true)))
                if retries < 3 && at.elapsed() >= heartbeat =>
            {
                tracing::info!(retries, "no leader yet after the election the watchdog started: asking again");
                triggered = Some((Instant::now(), retries + 1, true));
                let _ = replica.raft.trigger().elect().await;
            }
            (ServerState::Follower, Some(leader), _) if leader != replica.id => {
                if triggered.is_some_and(|(at, _, _)| at.elapsed() < heartbeat * 20) {
                    continue;
                }
                triggered = None;
                // Quiet for two heartbeats: is anybody home?
                if replica.since_leader_contact().is_some_and(|since| since <= heartbeat * 2) {
                    continue;
                }
                let Some(addr) = replica.dial_address(leader, &metrics) else { continue };
                let probe = tokio::time::timeout(heartbeat, tokio::net::TcpStream::connect(&addr)).await;
                if let Ok(Err(e)) = probe {
                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                        tracing::warn!(
                            leader,
                            addr,
                            "the leader refuses connections (its process is down): starting an election"
                        );
                        let _ = replica.raft.trigger().elect().await;
                        let best = replica.has_longest_log(leader).await;
                        triggered = Some((Instant::now(), 0, best));
                    }
                }
            }
            _ => {}
        }
    }
}
