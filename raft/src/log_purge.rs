//! When the raft log is purged: `keep` entries behind the latest snapshot, as openraft would,
//! except that a leader sending a snapshot keeps what its members still lack (etcd pauses its
//! log compaction for in-flight snapshots the same way).
//!
//! openraft purges at once when a snapshot is built. At a million runtimes a snapshot takes
//! ~10 s to send and ~20 s to install, and a build takes about a minute: a build that ended
//! while a new member installed the previous snapshot purged the entries after that snapshot,
//! so the member, done installing, lacked them and was sent the whole state again. openraft is
//! therefore told to keep everything (`max_in_snapshot_log_to_keep` = `u64::MAX`) and this
//! task asks it to purge.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::types::{NodeId, Raft};

/// How long after a snapshot reached a member the leader still keeps what members lack: the
/// member then catches up from the log, which at a million runtimes takes seconds.
pub const AFTER_A_SNAPSHOT: Duration = Duration::from_secs(60);

/// The snapshots this node is sending: how many are on their way, and when the last one ended.
#[derive(Debug, Default)]
pub struct SnapshotSends {
    on_their_way: AtomicUsize,
    last_ended: Mutex<Option<Instant>>,
}

/// One snapshot chunk on its way; it counts as sending until dropped.
pub struct Sending(Arc<SnapshotSends>);

impl SnapshotSends {
    /// Counts a chunk as on its way until the returned guard is dropped.
    pub fn start(self: &Arc<Self>) -> Sending {
        self.on_their_way.fetch_add(1, Ordering::SeqCst);
        Sending(self.clone())
    }

    /// Whether a snapshot is on its way, or one ended less than `within` ago.
    pub fn recent(&self, within: Duration) -> bool {
        self.on_their_way.load(Ordering::SeqCst) > 0
            || self.last_ended.lock().expect("snapshot sends lock").is_some_and(|at| at.elapsed() < within)
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        *self.0.last_ended.lock().expect("snapshot sends lock") = Some(Instant::now());
        self.0.on_their_way.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the purge decision reads of openraft's metrics.
#[derive(Debug, Clone, Default)]
pub struct LogPositions {
    /// The index the latest snapshot covers.
    pub snapshot: Option<u64>,
    /// The last index purged.
    pub purged: Option<u64>,
    /// On a leader, the last index each member (itself included) is known to have; `None` for a
    /// member that has nothing yet.
    pub matched: Option<Vec<Option<u64>>>,
}

impl LogPositions {
    fn of(metrics: &openraft::RaftMetrics<NodeId, openraft::BasicNode>) -> LogPositions {
        LogPositions {
            snapshot: metrics.snapshot.map(|id| id.index),
            purged: metrics.purged.map(|id| id.index),
            matched: metrics
                .replication
                .as_ref()
                .map(|members| members.values().map(|matched| matched.map(|id| id.index)).collect()),
        }
    }
}

/// The index to purge up to (inclusive) now, if it is past what is purged: `keep` entries behind
/// the snapshot, and, while `holding` (a snapshot on its way or just arrived), nothing a member
/// still lacks.
pub fn purge_upto(positions: &LogPositions, keep: u64, holding: bool) -> Option<u64> {
    let mut upto = positions.snapshot?.checked_sub(keep)?;
    if holding {
        if let Some(matched) = &positions.matched {
            let least = matched.iter().copied().min().flatten()?;
            upto = upto.min(least);
        }
    }
    (positions.purged.is_none_or(|purged| upto > purged)).then_some(upto)
}

/// Asks openraft to purge as [`purge_upto`] says, once a second (a purge is a range delete, and
/// openraft logs each request), until `stop` turns true.
pub async fn run(raft: Raft, sends: Arc<SnapshotSends>, keep: u64, mut stop: watch::Receiver<bool>) {
    let metrics = raft.metrics();
    let mut asked = None;
    loop {
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if *stop.borrow() {
            return;
        }
        let positions = LogPositions::of(&metrics.borrow());
        let Some(upto) = purge_upto(&positions, keep, sends.recent(AFTER_A_SNAPSHOT)) else { continue };
        if asked.is_some_and(|asked| upto <= asked) {
            continue;
        }
        tracing::debug!(upto, "purging the raft log");
        if raft.trigger().purge_log(upto).await.is_err() {
            return;
        }
        asked = Some(upto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(snapshot: u64, purged: Option<u64>, matched: Option<Vec<Option<u64>>>) -> LogPositions {
        LogPositions { snapshot: Some(snapshot), purged, matched }
    }

    #[test]
    fn the_log_is_purged_keep_entries_behind_the_snapshot_once_past_what_is_purged() {
        assert_eq!(purge_upto(&at(10_000, None, None), 5_000, false), Some(5_000));
        assert_eq!(purge_upto(&at(10_000, Some(4_000), None), 5_000, false), Some(5_000));
        assert_eq!(purge_upto(&at(10_000, Some(5_000), None), 5_000, false), None, "purged already");
        assert_eq!(purge_upto(&at(3_000, None, None), 5_000, false), None, "not enough behind the snapshot");
        assert_eq!(purge_upto(&LogPositions::default(), 0, false), None, "no snapshot, nothing to purge");
    }

    #[test]
    fn while_a_snapshot_is_sent_the_leader_keeps_what_a_member_lacks() {
        let members = Some(vec![Some(30_000), Some(29_990), Some(20_001)]);
        assert_eq!(purge_upto(&at(30_000, Some(19_900), members.clone()), 100, true), Some(20_001));
        assert_eq!(purge_upto(&at(30_000, Some(19_900), members.clone()), 100, false), Some(29_900), "no hold");
        // A new member that has nothing yet holds everything.
        let new_member = Some(vec![Some(30_000), None]);
        assert_eq!(purge_upto(&at(30_000, Some(19_900), new_member), 100, true), None);
        // Caught up: the hold stops nothing.
        let caught_up = Some(vec![Some(30_050), Some(30_040)]);
        assert_eq!(purge_upto(&at(30_000, Some(19_900), caught_up), 100, true), Some(29_900));
        // A follower (no replication metrics) purges as usual.
        assert_eq!(purge_upto(&at(30_000, Some(19_900), None), 100, true), Some(29_900));
    }

    #[test]
    fn a_send_counts_while_a_chunk_is_on_its_way_and_for_a_while_after() {
        let sends = Arc::new(SnapshotSends::default());
        assert!(!sends.recent(Duration::from_secs(60)), "nothing sent yet");
        let chunk = sends.start();
        assert!(sends.recent(Duration::ZERO), "on its way");
        drop(chunk);
        assert!(sends.recent(Duration::from_secs(60)), "just ended");
        assert!(!sends.recent(Duration::ZERO), "ended longer ago than that");
    }
}
