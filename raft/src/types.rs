//! openraft's type configuration for RuntimeAI.

use crate::command::{CommandReply, LoggedCommand};

/// A member's id, as given by `--id`.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The raft types of a RuntimeAI cluster: typed commands in (shared and encoded once, see
    /// [`LoggedCommand`]), typed replies out, members addressed by their gRPC endpoint,
    /// snapshots as files (`snapshot_file.rs`: built, sent and received without a copy in memory).
    pub TypeConfig:
        D = LoggedCommand,
        R = CommandReply,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, openraft::BasicNode>;

/// A failure to read the state machine's store, as openraft reports it.
pub(crate) fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    openraft::StorageIOError::read_state_machine(&e).into()
}

/// A failure to write the state machine's store, as openraft reports it.
pub(crate) fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    openraft::StorageIOError::write_state_machine(&e).into()
}
