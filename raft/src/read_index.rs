//! Linearizable reads that wait together share one read index. A read may use a read index
//! the leader obtained *after* the read began (etcd's ReadIndex batching, raft thesis §6.4):
//! so every read queued before a round starts is answered by that round, and reads arriving
//! while it runs wait for the next. On a follower a round is one `ReadIndex` RPC to the leader;
//! on the leader, one leadership confirmation by a quorum. One round per read cost a leader
//! round trip (and a heartbeat to every follower) each.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::coalesce::{holding, next_group};
use crate::error::ClusterError;

/// What runs a round: obtains a read index now (the replica: from the leader, or as the leader
/// with a quorum's confirmation).
pub(crate) trait ReadIndexSource: Send + Sync + 'static {
    fn read_index_now(&self, hops_left: u32) -> impl std::future::Future<Output = Result<u64, ClusterError>> + Send;
}

/// Rounds running at once; reads arriving meanwhile wait and form the next one.
const MAX_IN_FLIGHT: usize = 4;

struct Waiting {
    hops_left: u32,
    reply: oneshot::Sender<Result<u64, ClusterError>>,
}

/// The asking side; cheap to clone.
#[derive(Clone)]
pub(crate) struct ReadIndexBatcher {
    waiting: mpsc::UnboundedSender<Waiting>,
}

impl ReadIndexBatcher {
    /// Starts the task that runs rounds for `replica` (it ends with the replica).
    pub(crate) fn start(replica: Weak<impl ReadIndexSource>) -> ReadIndexBatcher {
        let (waiting, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(replica, queue));
        ReadIndexBatcher { waiting }
    }

    /// The log index a read that begins now must wait for.
    pub(crate) async fn read_index(&self, hops_left: u32) -> Result<u64, ClusterError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || ClusterError::Stopped("the node is shutting down".into());
        self.waiting.send(Waiting { hops_left, reply }).map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

async fn run(replica: Weak<impl ReadIndexSource>, mut queue: mpsc::UnboundedReceiver<Waiting>) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // Everything queued by now began before the round below starts.
    while let Some((permit, waiting)) = next_group(&mut queue, &in_flight, usize::MAX, |_| 1).await {
        let mut rounds: BTreeMap<u32, Vec<oneshot::Sender<Result<u64, ClusterError>>>> = BTreeMap::new();
        for read in waiting {
            rounds.entry(read.hops_left).or_default().push(read.reply);
        }
        let Some(replica) = replica.upgrade() else { return };
        tokio::spawn(holding(permit, async move {
            for (hops_left, replies) in rounds {
                let index = replica.read_index_now(hops_left).await;
                for reply in replies {
                    let _ = reply.send(index.clone());
                }
            }
        }));
    }
}
