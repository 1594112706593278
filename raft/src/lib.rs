//! RuntimeAI's replicated core: the control plane's state, kept identical on every member by
//! openraft, stored in RocksDB, carried between nodes by tonic gRPC.
//!
//! - [`types`]: openraft's type configuration.
//! - [`codec`]: the only place that encodes replicated data (serde + bincode, versioned).
//! - [`command`]: the typed commands the state machine applies and its replies.
//! - [`store`]: a node's data directory (identity check, one RocksDB for log and state).
//! - [`log_store`]: the raft log (each append synced before openraft hears of it).
//! - [`log_purge`]: when the log is purged (never past what a member catching up by snapshot
//!   still lacks).
//! - [`state_machine`]: deterministic apply and snapshots.
//! - [`build_priority`]: snapshot builds on idle CPU, unless a joining member waits for one.
//! - [`state_reader`]: the applied state, read only: what the API, scheduler and executors see.
//! - [`network`] / [`service`]: raft and cluster RPCs, client and server.
//! - [`tls`]: mutual TLS between members (and the REST port's TLS), reloaded without a restart.
//! - [`replica`]: propose (batched on the leader), read linearizably and change membership from
//!   any node.
//! - [`metrics`]: where a write's time goes, stage by stage (Prometheus histograms).
//! - [`watchdog`]: an election at once when the leader's process is gone.

// openraft's StorageError and RPCError are large by design, and the storage and network traits
// return them; boxing them at every call would only hide that.
#![allow(clippy::result_large_err)]

mod apply;
mod batcher;
pub mod build_priority;
mod coalesce;
pub mod codec;
pub mod command;
pub mod error;
mod forwarding;
mod keys;
pub mod limits;
pub mod log_purge;
pub mod log_store;
pub mod metrics;
pub mod network;
mod read_index;
mod received_snapshot;
pub mod replica;
mod retention;
pub mod runtime_index;
pub mod service;
mod snapshot_file;
pub mod state_machine;
pub mod state_reader;
pub mod store;
mod table_loader;
pub mod tls;
mod txn;
pub mod types;
pub mod watchdog;

pub use apply::webhooks::DELIVERIES_KEPT;
pub use apply::AUDIT_STREAM;
pub use batcher::Assigner;
pub use command::{Command, CommandReply, IdempotencyClaim, Op, Rejection};
pub use error::{ClusterError, DataDirError};
pub use replica::{MemberStatus, Replica, ReplicaOptions};
pub use runtime_index::RuntimeField;
pub use state_reader::StateReader;
pub use types::{NodeId, Raft, TypeConfig};

#[cfg(test)]
mod storage_suite;
