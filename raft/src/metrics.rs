//! Where a write's time goes, stage by stage, as Prometheus histograms (served at `/metrics`
//! with the API's own): how long proposals wait to be batched, the leader's commit of a batch
//! (log append, fsync, replication to a quorum, apply), each fsync of the log, each replication
//! round trip to a follower, each apply, and each forwarding hop from a follower to the leader.
//!
//! One set per process: a process is one node, and the stages are deep inside openraft's
//! callbacks, where passing a handle down would touch every signature on the way.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// 50 µs to about 3.3 s, doubling: from a warm apply to a write stuck behind an election.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 17)
}

/// The stage histograms (seconds).
pub struct WriteStages {
    /// From a proposal's arrival at the leader's batcher until its batch is proposed.
    pub batch_wait: Histogram,
    /// A batch's `client_write`: appended, fsynced, replicated to a quorum, applied.
    pub commit: Histogram,
    /// Commands per proposed batch.
    pub batch_commands: Histogram,
    /// One fsync of the raft log, serving every append that waited for it.
    pub log_sync: Histogram,
    /// One AppendEntries round trip with entries, leader to follower (the follower's fsync in it).
    pub replicate: Histogram,
    /// One apply of a run of committed entries to the state machine.
    pub apply: Histogram,
    /// One forwarding hop: a follower's batch of writes sent to the leader and answered.
    pub forward: Histogram,
}

static STAGES: LazyLock<WriteStages> = LazyLock::new(|| WriteStages {
    batch_wait: Histogram::new(latency_buckets()),
    commit: Histogram::new(latency_buckets()),
    batch_commands: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
    log_sync: Histogram::new(latency_buckets()),
    replicate: Histogram::new(latency_buckets()),
    apply: Histogram::new(latency_buckets()),
    forward: Histogram::new(latency_buckets()),
});

/// This process's stage histograms.
pub fn stages() -> &'static WriteStages {
    &STAGES
}

/// Records the seconds since `started` in `histogram`.
pub fn observe_since(histogram: &Histogram, started: Instant) {
    histogram.observe(started.elapsed().as_secs_f64());
}

/// Adds the stage histograms to `registry` (`runtimeai_raft_*`).
pub fn register(registry: &mut Registry) {
    let raft = registry.sub_registry_with_prefix("runtimeai_raft");
    let s = stages();
    let seconds = [
        ("batch_wait", "Time a write waits at the leader before its batch is proposed", &s.batch_wait),
        ("commit", "A batch's commit on the leader: append, fsync, quorum replication, apply", &s.commit),
        ("log_sync", "One fsync of the raft log (group commit)", &s.log_sync),
        ("replicate", "One AppendEntries round trip with entries to a follower", &s.replicate),
        ("apply", "One apply of committed entries to the state machine", &s.apply),
        ("forward", "One forwarding hop of writes from a follower to the leader", &s.forward),
    ];
    for (name, help, histogram) in seconds {
        raft.register_with_unit(name, help, Unit::Seconds, histogram.clone());
    }
    raft.register("batch_commands", "Commands per proposed batch", s.batch_commands.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stages_are_exposed_in_seconds_and_count_what_is_observed() {
        stages().apply.observe(0.001);
        let mut registry = Registry::default();
        register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# UNIT runtimeai_raft_apply_seconds seconds"), "{text}");
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix("runtimeai_raft_apply_seconds_count "))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(count.is_some_and(|c| c >= 1), "{text}");
        assert!(text.contains("runtimeai_raft_batch_commands_bucket"), "{text}");
    }
}
