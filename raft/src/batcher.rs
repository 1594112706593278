//! Proposal batching on the leader: proposals that arrive while earlier ones are still being
//! written travel together as one log entry ([`Op::Batch`]): one append, one fsync, one
//! replication message and one apply for all of them, where openraft 0.9 would write and
//! replicate each on its own. A lone proposal is written as it is. A batch a follower forwarded
//! (see [`crate::forwarding`]) is one proposal here, and may share an entry with others.

use std::sync::{Arc, RwLock};

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use runtimeai_model::Actor;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::coalesce::{holding, next_write_group, WriteGroups, WriteItem, BACKGROUND_LINGER};
use crate::command::{Command, CommandReply, LoggedCommand, Op};
use crate::types::{NodeId, Raft};
use crate::{limits, metrics};

/// At most this many commands share an entry, and no more once it holds
/// [`limits::BATCH_BYTES`].
const MAX_BATCH: usize = 64;
/// Entries being written at once, at most; proposals arriving meanwhile wait and form the next
/// batch, which leaves when the entries on their way are done or once it is full.
const MAX_IN_FLIGHT: usize = 4;

pub(crate) type WriteResult = Result<CommandReply, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>;

/// The leader's scheduler, asked about every command before it is proposed: it may hand the
/// operation a command queues to an executor in the same entry ([`Operation::assignment`],
/// whose token apply sets to the entry's index), one `AssignOperation` entry fewer.
///
/// [`Operation::assignment`]: runtimeai_model::Operation::assignment
pub trait Assigner: Send + Sync {
    fn offer(&self, command: &mut Command);
}

type SharedAssigner = Arc<RwLock<Option<Arc<dyn Assigner>>>>;

struct Proposal {
    command: Command,
    /// Its encoded size.
    bytes: usize,
    reply: oneshot::Sender<WriteResult>,
    /// When it reached the batcher.
    queued: std::time::Instant,
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub(crate) struct Batcher {
    proposals: mpsc::UnboundedSender<Proposal>,
    assigner: SharedAssigner,
}

impl Batcher {
    /// Starts the batching task (it ends when every `Batcher` is dropped); `at_once` entries
    /// leave as soon as they form (see [`crate::coalesce::next_write_group`]).
    pub(crate) fn start(raft: Raft, at_once: u32) -> Batcher {
        let (proposals, queue) = mpsc::unbounded_channel();
        let assigner = SharedAssigner::default();
        tokio::spawn(run(raft, queue, assigner.clone(), at_once));
        Batcher { proposals, assigner }
    }

    pub(crate) fn set_assigner(&self, assigner: Arc<dyn Assigner>) {
        *self.assigner.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(assigner);
    }

    /// Writes `command` (`bytes` long, encoded) through raft (with others, if others are
    /// waiting) and returns its reply.
    pub(crate) async fn write(&self, command: Command, bytes: usize) -> WriteResult {
        let (reply, answer) = oneshot::channel();
        if self.proposals.send(Proposal { command, bytes, reply, queued: std::time::Instant::now() }).is_err() {
            return Err(RaftError::Fatal(openraft::error::Fatal::Stopped));
        }
        answer.await.unwrap_or(Err(RaftError::Fatal(openraft::error::Fatal::Stopped)))
    }
}

async fn run(raft: Raft, mut queue: mpsc::UnboundedReceiver<Proposal>, assigner: SharedAssigner, at_once: u32) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let rule =
        WriteGroups { slots: MAX_IN_FLIGHT as u32, at_once, max: limits::BATCH_BYTES, linger: BACKGROUND_LINGER };
    while let Some((permit, mut batch)) = next_write_group(&mut queue, &in_flight, rule).await {
        let assigner = assigner.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if let Some(assigner) = assigner {
            for proposal in &mut batch {
                offer(assigner.as_ref(), &mut proposal.command);
            }
        }
        let raft = raft.clone();
        tokio::spawn(holding(permit, async move { write(&raft, batch).await }));
    }
}

fn offer(assigner: &dyn Assigner, command: &mut Command) {
    match &mut command.op {
        Op::Batch(commands) => commands.iter_mut().for_each(|command| offer(assigner, command)),
        _ => assigner.offer(command),
    }
}

impl WriteItem for Proposal {
    /// Counted in commands and bytes: a follower's forwarded batch is one proposal of many
    /// commands.
    fn weight(&self) -> usize {
        limits::batch_weight(self.bytes, self.command.count(), MAX_BATCH)
    }

    fn is_background(&self) -> bool {
        self.command.is_background()
    }
}

async fn write(raft: &Raft, mut batch: Vec<Proposal>) {
    let stages = metrics::stages();
    let proposed = std::time::Instant::now();
    // What clients wait; a node's own reports may linger on purpose (`BACKGROUND_LINGER`).
    for proposal in batch.iter().filter(|proposal| !proposal.command.is_background()) {
        stages.batch_wait.observe(proposed.duration_since(proposal.queued).as_secs_f64());
    }
    stages.batch_commands.observe(batch.iter().map(|proposal| proposal.command.count()).sum::<usize>() as f64);
    if batch.len() == 1 {
        let proposal = batch.remove(0);
        let written = raft.client_write(LoggedCommand::new(proposal.command)).await;
        metrics::observe_since(&stages.commit, proposed);
        let _ = proposal.reply.send(written.map(|r| r.data));
        return;
    }
    let at = batch[0].command.at;
    let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let entry = Command { at, actor: Actor::System, idempotency: None, op: Op::Batch(commands) };
    let written = raft.client_write(LoggedCommand::new(entry)).await;
    metrics::observe_since(&stages.commit, proposed);
    match written {
        Ok(response) => match response.data {
            CommandReply::Batch(answers) if answers.len() == replies.len() => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            other => {
                // Apply answers a batch with a batch of the same length; anything else is a bug.
                tracing::error!(reply = ?other, "a batch of proposals got an unexpected reply");
                for reply in replies {
                    let _ = reply.send(Err(RaftError::Fatal(openraft::error::Fatal::Panicked)));
                }
            }
        },
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
