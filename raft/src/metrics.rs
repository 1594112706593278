//! Where a write's time goes, stage by stage, as Prometheus histograms (served at `/metrics`
//! with the API's own): how long proposals wait to be batched, the leader's commit of a batch
//! (log append, fsync, replication to a quorum, apply), each fsync of the log, each replication
//! round trip to a follower, each apply, and each forwarding hop from a follower to the leader.
//!
//! Beside them, read at each scrape, the store's memory and background work per column family
//! (memtables, table readers, block caches, live data, compactions and flushes) and the
//! process's resident memory: what a node's memory is made of, and whether RocksDB is busy
//! when a write's tail grows.
//!
//! One set per process: a process is one node, and the stages are deep inside openraft's
//! callbacks, where passing a handle down would touch every signature on the way.

use std::sync::{LazyLock, RwLock, Weak};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use rocksdb::DB;

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
    /// One fsync of the raft log (one per append).
    pub log_sync: Histogram,
    /// One AppendEntries round trip with entries, leader to follower (the follower's fsync in it).
    pub replicate: Histogram,
    /// An append until it is durable: from the log store's `append` until its flush callback
    /// has run (the entries' encoding and write, the hand-off to the syncer thread, its fsync).
    pub log_flush: Histogram,
    /// A follower's AppendEntries with entries, from its gRPC handler's entry to its answer:
    /// `replicate` less the transport.
    pub append_served: Histogram,
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
    log_flush: Histogram::new(latency_buckets()),
    append_served: Histogram::new(latency_buckets()),
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
        ("batch_wait", "Time a client's write waits at the leader before its batch is proposed", &s.batch_wait),
        ("commit", "A batch's commit on the leader: append, fsync, quorum replication, apply", &s.commit),
        ("log_sync", "One fsync of the raft log", &s.log_sync),
        ("replicate", "One AppendEntries round trip with entries to a follower", &s.replicate),
        (
            "log_flush",
            "An append until it is durable: the entries' encoding and write, the syncer's hand-off and fsync",
            &s.log_flush,
        ),
        (
            "append_served",
            "A follower's AppendEntries with entries, from its gRPC handler's entry to its answer",
            &s.append_served,
        ),
        ("apply", "One apply of committed entries to the state machine", &s.apply),
        ("forward", "One forwarding hop of clients' writes from a follower to the leader", &s.forward),
    ];
    for (name, help, histogram) in seconds {
        raft.register_with_unit(name, help, Unit::Seconds, histogram.clone());
    }
    raft.register("batch_commands", "Commands per proposed batch", s.batch_commands.clone());
    registry.register_collector(Box::new(StorageCollector));
}

/// The store this process's node opened last (a weak handle: the metrics keep nothing open),
/// and the block cache its column families share.
static STORE: LazyLock<RwLock<(Weak<DB>, Option<rocksdb::Cache>)>> = LazyLock::new(RwLock::default);

/// Makes `db` (whose families share `cache`) the store whose figures the metrics show.
pub(crate) fn watch_store(db: &std::sync::Arc<DB>, cache: rocksdb::Cache) {
    *STORE.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = (std::sync::Arc::downgrade(db), Some(cache));
}

/// Per column family, in bytes: `(metric, help, RocksDB property)`.
const FAMILY_BYTES: [(&str, &str, &str); 4] = [
    ("storage_memtable", "Memtables of the column family not yet flushed", "rocksdb.cur-size-all-mem-tables"),
    (
        "storage_memtable_held",
        "Memtables of the column family, flushed ones that readers still hold included",
        "rocksdb.size-all-mem-tables",
    ),
    ("storage_table_readers", "Index and filter blocks of open table files", "rocksdb.estimate-table-readers-mem"),
    ("storage_live_data", "Live data on disk (estimate)", "rocksdb.estimate-live-data-size"),
];

/// Per column family, counts: `(metric, help, RocksDB property)`.
const FAMILY_COUNTS: [(&str, &str, &str); 1] = [(
    "storage_level0_files",
    "Table files in level 0 of the column family, which a read looks in one by one; they pile up when compactions lag",
    "rocksdb.num-files-at-level0",
)];

/// Store-wide: `(metric, help, RocksDB property)`.
const STORE_COUNTS: [(&str, &str, &str); 4] = [
    ("storage_running_compactions", "Compactions running", "rocksdb.num-running-compactions"),
    ("storage_running_flushes", "Memtable flushes running", "rocksdb.num-running-flushes"),
    (
        "storage_pending_compaction_bytes",
        "Bytes compaction has yet to rewrite",
        "rocksdb.estimate-pending-compaction-bytes",
    ),
    (
        "storage_delayed_write_rate",
        "Bytes per second RocksDB slows writes to while compactions lag behind (0: writes are not slowed)",
        "rocksdb.actual-delayed-write-rate",
    ),
];

/// Reads the store's properties and the process's resident memory at each scrape.
#[derive(Debug)]
struct StorageCollector;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct FamilyLabel {
    family: &'static str,
}

impl Collector for StorageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(resident) = resident_bytes() {
            let help = "Resident memory of the node's process";
            bytes_gauge(&mut encoder, "runtimeai_process_resident", help, resident)?;
        }
        let (db, cache) = STORE.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        if let Some(cache) = cache {
            let help = "The block cache the column families share, in use";
            bytes_gauge(&mut encoder, "runtimeai_storage_block_cache", help, cache.get_usage() as u64)?;
        }
        let Some(db) = db.upgrade() else { return Ok(()) };
        let families: Vec<&'static str> =
            crate::store::LOG_CFS.iter().chain(crate::store::STATE_MACHINE_CFS).copied().collect();
        for (name, help, property) in FAMILY_BYTES {
            per_family(&mut encoder, &db, &families, (name, help, property), Some(&Unit::Bytes))?;
        }
        for (name, help, property) in FAMILY_COUNTS {
            per_family(&mut encoder, &db, &families, (name, help, property), None)?;
        }
        for (name, help, property) in STORE_COUNTS {
            let Ok(Some(value)) = db.property_int_value(property) else { continue };
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(
                &format!("runtimeai_{name}"),
                help,
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Encodes a gauge per column family of `families`: a RocksDB property's value, as
/// `runtimeai_<name>{family="…"}`.
fn per_family(
    encoder: &mut DescriptorEncoder,
    db: &DB,
    families: &[&'static str],
    (name, help, property): (&str, &str, &str),
    unit: Option<&Unit>,
) -> Result<(), std::fmt::Error> {
    let name = format!("runtimeai_{name}");
    let mut family_encoder =
        encoder.encode_descriptor(&name, help, unit, prometheus_client::metrics::MetricType::Gauge)?;
    for family in families {
        let Some(handle) = db.cf_handle(family) else { continue };
        let Ok(Some(value)) = db.property_int_value_cf(&handle, property) else { continue };
        ConstGauge::new(value as i64).encode(family_encoder.encode_family(&FamilyLabel { family })?)?;
    }
    Ok(())
}

/// Encodes one gauge of `bytes` without labels.
fn bytes_gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, bytes: u64) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(bytes as i64);
    gauge.encode(encoder.encode_descriptor(name, help, Some(&Unit::Bytes), gauge.metric_type())?)
}

/// The process's resident memory, from `/proc/self/statm` (Linux).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
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
