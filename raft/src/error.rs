//! Errors of the replicated core, one enum per concern. Each knows whether a retry may help.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Why a data directory cannot be used. Every variant reads as one line for an operator.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "data directory {path} belongs to node {found}, not node {wanted}; use --id {found} or another --data-dir"
    )]
    OtherNode { path: PathBuf, found: NodeId, wanted: NodeId },
    #[error("data directory {path} belongs to cluster {found:?}, not {wanted:?}; use another --data-dir")]
    OtherCluster { path: PathBuf, found: String, wanted: String },
    #[error("data directory {path} was written in format version {found}; this build reads version {supported}")]
    FormatVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("data directory {path} is not empty and has no RuntimeAI IDENTITY file; refusing to use it")]
    Foreign { path: PathBuf },
    #[error("identity file {path} is unreadable: {reason}")]
    CorruptIdentity { path: PathBuf, reason: String },
    #[error("database {path} is missing although the data directory has an identity; the store is incomplete")]
    MissingDatabase { path: PathBuf },
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a command or a read could not be served by the cluster. Crosses the wire between nodes
/// (forwarding), so it is plain serializable data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ClusterError {
    /// No leader is known (election in progress, or no quorum).
    #[error("no leader is available: {0}")]
    NoLeader(String),
    /// The leader could not confirm itself with a quorum in time.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// Forwarding went through more hops than allowed (leadership moving around quickly).
    #[error("request forwarded too many times without reaching the leader")]
    TooManyHops,
    /// The leader could not be reached over the network.
    #[error("cannot reach the leader (node {leader}): {reason}")]
    LeaderUnreachable { leader: NodeId, reason: String },
    /// The request was refused for a reason a retry will not change.
    #[error("{0}")]
    Invalid(String),
    /// The request names something that does not exist (e.g. a member id).
    #[error("{0}")]
    NotFound(String),
    /// This node is shutting down or its raft stopped.
    #[error("node is shutting down: {0}")]
    Stopped(String),
    /// The node has as many writes in flight as it takes ([`crate::limits::MAX_PENDING_BYTES`]);
    /// this one was not proposed.
    #[error("this node has {pending_bytes} bytes of writes in flight and takes no more for now; retry shortly")]
    Overloaded { pending_bytes: usize },
    /// The command is larger than any log entry may hold; it was not proposed.
    #[error("the request makes a command of {bytes} bytes; a command holds at most {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    /// A store or codec failure on the serving node.
    #[error("internal error: {0}")]
    Internal(String),
    /// The cluster did not answer within the request's deadline; the outcome is unknown.
    #[error("timed out after {0} ms; the request may or may not have been applied")]
    Timeout(u64),
    /// The connection to the leader broke after the request was sent; the outcome is unknown.
    #[error("lost the connection to the leader (node {leader}) mid-request ({reason}); the request may or may not have been applied")]
    ConnectionLost { leader: NodeId, reason: String },
}

impl ClusterError {
    /// True when the request certainly took no effect, so a node may retry it on the client's
    /// behalf without risking applying it twice.
    pub fn never_applied(&self) -> bool {
        matches!(
            self,
            ClusterError::NoLeader(_)
                | ClusterError::NoQuorum(_)
                | ClusterError::TooManyHops
                | ClusterError::LeaderUnreachable { .. }
                | ClusterError::Overloaded { .. }
        )
    }

    /// Whether the same request may succeed if the client tries again shortly (for a write
    /// whose outcome is unknown, with an idempotency key).
    pub fn is_retryable(&self) -> bool {
        self.never_applied() || matches!(self, ClusterError::Timeout(_) | ClusterError::ConnectionLost { .. })
    }
}

/// A failure talking to the leader. Whether the request reached it is unknown unless the
/// connection was never made, so only that case counts as "never applied"; a deadline that
/// passed (on either side) and a connection that broke mid-request both leave the outcome
/// unknown; anything else the leader answered with is an internal error.
///
/// A deadline the leader's gRPC server enforced arrives as `Cancelled` ("Timeout expired"): the
/// server starts its clock when the request's headers arrive, before a large body has, so it
/// can pass before the leader's own deadline does.
pub(crate) fn transport_error(leader: NodeId, status: tonic::Status, deadline: Duration) -> ClusterError {
    let timed_out = matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
        || caused_by::<tonic::TimeoutExpired>(&status);
    if never_sent(&status) {
        ClusterError::LeaderUnreachable { leader, reason: status.message().to_string() }
    } else if timed_out {
        ClusterError::Timeout(deadline.as_millis() as u64)
    } else if caused_by::<tonic::transport::Error>(&status) {
        ClusterError::ConnectionLost { leader, reason: status.message().to_string() }
    } else {
        ClusterError::Internal(format!("leader {leader} failed the request: {}", status.message()))
    }
}

/// Whether an error of type `E` is among the causes of `status`.
fn caused_by<E: std::error::Error + 'static>(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<E>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// True when the request certainly did not reach the peer: the connection could not be made.
/// A connection that broke mid-request does not count: the peer may have acted on it.
pub(crate) fn never_sent(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && caused_by::<tonic::ConnectError>(status)
}
