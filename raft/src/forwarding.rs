//! Forwarding batches on followers: the writes a follower passes on to the leader while
//! earlier ones are still on the way travel together, as one `Forward` RPC carrying an
//! [`Op::Batch`], and the leader answers them with one [`CommandReply::Batch`]. Under load most
//! writes arrive at followers (a load balancer spreads clients over every node, and executors
//! report from every node), and one RPC per write cost the leader more than applying them.
//!
//! What a caller sees is unchanged: its own reply, or the error the whole batch met (a transport
//! failure leaves every command of the batch with the same unknown outcome it would have had
//! alone).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use runtimeai_model::Actor;
use runtimeai_proto::cluster_client::ClusterClient;
use runtimeai_proto::ForwardRequest;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::Channel;

use crate::coalesce::{holding, next_write_group, WriteGroups, WriteItem};
use crate::codec;
use crate::command::{Command, CommandReply, Op};
use crate::error::ClusterError;
use crate::limits;
use crate::types::NodeId;

/// At most this many commands share one RPC (and so one entry of the leader's log), and no
/// more once they hold [`limits::BATCH_BYTES`].
pub(crate) const MAX_FORWARD_BATCH: usize = 64;
/// RPCs on the way at once, at most; writes arriving meanwhile wait and form the next batch,
/// which leaves when the RPCs on their way are done or once it is full.
const MAX_IN_FLIGHT: usize = 4;

/// What the leader answered, or why it could not be asked.
pub(crate) type Forwarded = Result<CommandReply, ClusterError>;

struct Pending {
    leader: NodeId,
    client: ClusterClient<Channel>,
    hops_left: u32,
    command: Command,
    /// Its encoded size.
    bytes: usize,
    reply: oneshot::Sender<Forwarded>,
}

impl WriteItem for Pending {
    fn weight(&self) -> usize {
        limits::batch_weight(self.bytes, 1, MAX_FORWARD_BATCH)
    }

    fn is_background(&self) -> bool {
        self.command.is_background()
    }
}

/// The sending side; cheap to clone. Clients' writes and the node's own commands (see
/// [`Command::is_background`]) travel in lanes of their own, so that a client's write never
/// waits for a report on its way (which lingers at the leader for a client's write to join it).
#[derive(Clone)]
pub(crate) struct Forwarder {
    clients: mpsc::UnboundedSender<Pending>,
    background: mpsc::UnboundedSender<Pending>,
}

impl Forwarder {
    /// Starts the forwarding tasks, one per lane (they end when every `Forwarder` is dropped).
    pub(crate) fn start(from: crate::types::NodeId, cluster: String, deadline: Duration, at_once: u32) -> Forwarder {
        let link = Link { from, cluster, deadline, at_once, background: false };
        let (clients, clients_queue) = mpsc::unbounded_channel();
        let (background, background_queue) = mpsc::unbounded_channel();
        tokio::spawn(run(Arc::new(Link { background: true, ..link.clone() }), background_queue));
        tokio::spawn(run(Arc::new(link), clients_queue));
        Forwarder { clients, background }
    }

    /// Sends `command` (`bytes` long, encoded) to `leader` (through `client`), with others bound
    /// there if any wait.
    pub(crate) async fn forward(
        &self,
        leader: NodeId,
        client: ClusterClient<Channel>,
        hops_left: u32,
        command: Command,
        bytes: usize,
    ) -> Forwarded {
        let (reply, answer) = oneshot::channel();
        let stopped = || ClusterError::Stopped("the node is shutting down".into());
        let lane = if command.is_background() { &self.background } else { &self.clients };
        if lane.send(Pending { leader, client, hops_left, command, bytes, reply }).is_err() {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// What every RPC of a lane carries.
#[derive(Clone)]
struct Link {
    /// This node: a forward says who sends it (its certificate must agree).
    from: crate::types::NodeId,
    cluster: String,
    deadline: Duration,
    /// Batches that leave as soon as they form (see [`crate::coalesce::next_write_group`]).
    at_once: u32,
    /// The lane of the node's own commands, which linger at the leader: their hops are not
    /// what a client waits, and the `forward` stage leaves them out.
    background: bool,
}

async fn run(link: Arc<Link>, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let rule = WriteGroups {
        slots: MAX_IN_FLIGHT as u32,
        at_once: link.at_once,
        max: limits::BATCH_BYTES,
        // The leader lingers (`coalesce::BACKGROUND_LINGER`); here a lane holds one kind.
        linger: Duration::ZERO,
    };
    while let Some((permit, waiting)) = next_write_group(&mut queue, &in_flight, rule).await {
        // Almost always one group: every write goes to the one leader with the same hop budget.
        let mut groups: BTreeMap<(NodeId, u32), Vec<Pending>> = BTreeMap::new();
        for pending in waiting {
            groups.entry((pending.leader, pending.hops_left)).or_default().push(pending);
        }
        let link = link.clone();
        tokio::spawn(holding(permit, async move {
            for ((leader, hops_left), group) in groups {
                send(&link, leader, hops_left, group).await;
            }
        }));
    }
}

async fn send(link: &Link, leader: NodeId, hops_left: u32, mut group: Vec<Pending>) {
    let mut client = group[0].client.clone();
    let alone = group.len() == 1;
    let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<Forwarded>>) = if alone {
        let pending = group.remove(0);
        (vec![pending.command], vec![pending.reply])
    } else {
        group.into_iter().map(|p| (p.command, p.reply)).unzip()
    };
    let command = if alone {
        commands.into_iter().next().expect("one command")
    } else {
        Command { at: commands[0].at, actor: Actor::System, idempotency: None, op: Op::Batch(commands) }
    };
    let count = replies.len();
    let answer = ask(link, leader, hops_left, &mut client, &command).await;
    match answer {
        Ok(CommandReply::Batch(answers)) if !alone && answers.len() == count => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Ok(answer) if alone => {
            let _ = replies.into_iter().next().expect("one reply").send(Ok(answer));
        }
        Ok(other) => {
            // The leader answers a batch with a batch of the same length; anything else is a bug.
            tracing::error!(reply = ?other, "a forwarded batch got an unexpected reply");
            for reply in replies {
                let _ = reply.send(Err(ClusterError::Internal("unexpected reply to a forwarded batch".into())));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// One `Forward` RPC.
async fn ask(
    link: &Link,
    leader: NodeId,
    hops_left: u32,
    client: &mut ClusterClient<Channel>,
    command: &Command,
) -> Forwarded {
    let payload = codec::encode("command", command).map_err(|e| ClusterError::Internal(e.to_string()))?;
    let mut request = tonic::Request::new(ForwardRequest {
        cluster: link.cluster.clone(),
        hops_left,
        command: payload,
        from: link.from,
    });
    request.set_timeout(link.deadline);
    let started = std::time::Instant::now();
    let reply = client.forward(request).await;
    if !link.background {
        crate::metrics::observe_since(&crate::metrics::stages().forward, started);
    }
    let reply = reply.map_err(|s| crate::error::transport_error(leader, s, link.deadline))?;
    codec::decode::<Forwarded>("forwarded reply", &reply.into_inner().payload)
        .map_err(|e| ClusterError::Internal(e.to_string()))?
}
