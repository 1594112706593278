//! The byte budgets that keep replication moving whatever clients write.
//!
//! openraft 0.9 gives every AppendEntries one heartbeat interval (100 ms by default) to be sent,
//! appended and fsynced by the follower, reports a slower one as a timeout, and sends the same
//! range again: a message that cannot make it in that time never will, and the follower, hearing
//! nothing, calls an election. Counting entries (64 per message) and commands (64 per entry) is
//! not enough when a command may be a megabyte. So what an entry, a replication message and a
//! forwarded batch hold is bounded in bytes too, and what crosses between members is allowed on
//! both ends of every gRPC link (tonic's default of 4 MiB on the receiving side had turned large
//! forwarded replies into internal errors). A node also bounds the bytes of writes it has
//! taken in and not answered ([`MAX_PENDING_BYTES`]).

use std::sync::atomic::{AtomicUsize, Ordering};

/// A command (one client request) larger than this, encoded, is refused before it is proposed:
/// the API answers 413. At this size a command still travels alone in one AppendEntries well
/// within a heartbeat on the machines we measure.
pub const MAX_COMMAND_BYTES: usize = 2 << 20;

/// A batch of proposals (one log entry) or of forwarded writes (one `Forward` RPC) takes no more
/// commands once it holds this many bytes; it may end one command above it.
pub const BATCH_BYTES: usize = 1 << 20;

/// An AppendEntries carries entries up to this many bytes, and always at least one.
pub const APPEND_BYTES: usize = 2 << 20;

/// What one gRPC message between members may hold, on both ends: above the largest
/// AppendEntries (`APPEND_BYTES` + one entry of `BATCH_BYTES` + `MAX_COMMAND_BYTES`), forwarded
/// batch and its reply, and snapshot chunk.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How many bytes a peer may send on one gRPC stream before the receiver acknowledges them
/// (HTTP/2 flow control): a whole snapshot chunk, of the default size or a few times it.
pub const PEER_STREAM_WINDOW: u32 = 16 << 20;

/// The same, for all streams of one connection together: replication, forwarded writes and a
/// snapshot transfer share a connection.
pub const PEER_CONNECTION_WINDOW: u32 = 64 << 20;

/// Bytes of client commands one node may have taken in and not yet answered. Past it the node
/// sheds writes (503 with `Retry-After`, certainly not applied) instead of queueing them: a
/// backlog no deadline can drain only turns into timeouts with unknown outcomes, and into
/// memory. A command arriving while none wait is always taken.
pub const MAX_PENDING_BYTES: usize = 16 << 20;

/// The bytes of client commands a node has in flight (see [`MAX_PENDING_BYTES`]).
#[derive(Debug, Default)]
pub(crate) struct PendingWrites {
    bytes: AtomicUsize,
}

impl PendingWrites {
    /// Takes in a command of `bytes` until the returned guard is dropped; or, when the node
    /// is full, how many bytes it has in flight.
    pub(crate) fn admit(&self, bytes: usize) -> Result<Admitted<'_>, usize> {
        let before = self.bytes.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before + bytes > MAX_PENDING_BYTES {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(before);
        }
        Ok(Admitted { pending: self, bytes })
    }
}

/// A command's place among a node's [`PendingWrites`], given back when dropped.
pub(crate) struct Admitted<'a> {
    pending: &'a PendingWrites,
    bytes: usize,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.pending.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The weight of `commands` commands of `bytes` in all in a batch of at most `max_commands`
/// commands and [`BATCH_BYTES`]: their size, but at least the share of `commands` of
/// `max_commands`, so that small commands close a batch by count and large ones by size,
/// against one budget.
pub(crate) fn batch_weight(bytes: usize, commands: usize, max_commands: usize) -> usize {
    bytes.max(commands * (BATCH_BYTES / max_commands))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_commands_close_a_batch_by_count_large_ones_by_size() {
        assert_eq!(BATCH_BYTES / batch_weight(600, 1, 64), 64);
        assert_eq!(BATCH_BYTES.div_ceil(batch_weight(300 << 10, 1, 64)), 4);
        assert_eq!(batch_weight(64 * 600, 64, 64), BATCH_BYTES, "a forwarded batch of 64 fills one");
        const { assert!(APPEND_BYTES + BATCH_BYTES + MAX_COMMAND_BYTES < MAX_MESSAGE_BYTES) };
        const { assert!(MAX_COMMAND_BYTES <= APPEND_BYTES) };
    }

    #[test]
    fn a_full_node_sheds_writes_until_some_are_answered_but_always_takes_one() {
        let pending = PendingWrites::default();
        let huge = pending.admit(MAX_PENDING_BYTES * 2).expect("alone, any size goes");
        assert_eq!(pending.admit(1).err(), Some(MAX_PENDING_BYTES * 2));
        drop(huge);
        let first = pending.admit(MAX_PENDING_BYTES - 10).unwrap();
        let _second = pending.admit(10).expect("fits exactly");
        assert!(pending.admit(1).is_err());
        drop(first);
        assert!(pending.admit(1).is_ok(), "room again once answered");
    }
}
