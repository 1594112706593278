//! A node's data directory: its identity file and the RocksDB database that holds both the
//! raft log and the state machine.
//!
//! Layout:
//! ```text
//! <data-dir>/IDENTITY      format version, node id, cluster name (checked before anything opens)
//! <data-dir>/db/           RocksDB: column families below
//! <data-dir>/snapshot      the latest state-machine snapshot, replaced atomically
//! <data-dir>/logs/         RocksDB's diagnostic log
//! ```
//! The raft log is written through RocksDB's write-ahead log and synced at each append. The state
//! machine's writes skip that log: every one of them is the result of log entries already in it,
//! so what a crash takes from them apply re-runs from the log on restart. They reach disk by
//! memtable flushes, which are atomic across column families (`atomic_flush`), so the state on
//! disk is always the state after one apply batch, `last applied` included, never a mix; and
//! before log entries are purged the state machine is flushed ([`flush_state_machine`]), so the
//! log still holds every entry that the state on disk lacks.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, FlushOptions, Options, DB};
use serde::{Deserialize, Serialize};

use crate::codec::FORMAT_VERSION;
use crate::error::DataDirError;
use crate::types::NodeId;

/// Raft log entries, keyed by big-endian index.
pub(crate) const CF_LOG: &str = "log";
/// Vote, committed log id, last purged log id.
pub(crate) const CF_RAFT_META: &str = "raft_meta";
/// Last applied log id and membership of the state machine.
pub(crate) const CF_SM_META: &str = "sm_meta";
pub(crate) const CF_RUNTIMES: &str = "runtimes";
/// `tenant \0 name` → runtime id: keeps names unique per tenant.
pub(crate) const CF_RUNTIME_NAMES: &str = "runtime_names";
pub(crate) const CF_OPERATIONS: &str = "operations";
pub(crate) const CF_INTENTS: &str = "intents";
pub(crate) const CF_POLICIES: &str = "policies";
/// `runtime id \0 seq (BE u64) sub (BE u32)` → event: a runtime's events in order.
pub(crate) const CF_EVENTS: &str = "events";
/// `seq (BE u64) sub (BE u32)` → the stream (runtime id, or the audit stream) the event at that
/// position belongs to: every event in one global order (`GET /v1/events`).
pub(crate) const CF_EVENT_FEED: &str = "event_feed";
pub(crate) const CF_IDEMPOTENCY: &str = "idempotency";
pub(crate) const CF_NODES: &str = "nodes";
/// `operation id` → runtime id, for every operation not yet finished (the executor's queue).
pub(crate) const CF_ACTIVE_OPERATIONS: &str = "active_operations";
/// `runtime id \0 operation id` → (): a runtime's operations in creation order.
pub(crate) const CF_RUNTIME_OPERATIONS: &str = "runtime_operations";
/// Cluster-wide settings (one record).
pub(crate) const CF_SETTINGS: &str = "settings";
/// `runtime id` → how many events the runtime has and when its oldest is from (for retention).
pub(crate) const CF_EVENT_COUNTS: &str = "event_counts";
/// `time (BE ms) \0 key` → (): idempotency records by age, for pruning.
pub(crate) const CF_IDEMPOTENCY_BY_TIME: &str = "idempotency_by_time";
/// `key id` → API key (the principal and the SHA-256 of its secret; revoked keys stay).
pub(crate) const CF_API_KEYS: &str = "api_keys";
/// `time ended (BE u64 ms) kind (u8) id` → runtime id: finished operations, deleted runtimes and
/// intents by age, for their retention (`crate::retention`).
pub(crate) const CF_HISTORY_BY_TIME: &str = "history_by_time";
/// `node id (BE u64) runtime id` → (): the runtimes placed on each node, for its executor.
pub(crate) const CF_RUNTIMES_BY_NODE: &str = "runtimes_by_node";
/// `field=value \0 runtime id` → (): runtimes by tenant, type and state (`crate::runtime_index`).
pub(crate) const CF_RUNTIMES_BY_FIELD: &str = "runtimes_by_field";
/// `field=value` → how many runtimes have it (`crate::runtime_index`).
pub(crate) const CF_RUNTIME_COUNTS: &str = "runtime_counts";
/// `webhook id` → the subscription.
pub(crate) const CF_WEBHOOKS: &str = "webhooks";
/// `webhook id` → its latest delivery attempts, oldest first (`crate::apply::webhooks`).
pub(crate) const CF_WEBHOOK_DELIVERIES: &str = "webhook_deliveries";

/// Column families that make up the state machine, and so a snapshot.
pub(crate) const STATE_MACHINE_CFS: &[&str] = &[
    CF_SM_META,
    CF_RUNTIMES,
    CF_RUNTIME_NAMES,
    CF_OPERATIONS,
    CF_INTENTS,
    CF_POLICIES,
    CF_EVENTS,
    CF_EVENT_FEED,
    CF_IDEMPOTENCY,
    CF_NODES,
    CF_ACTIVE_OPERATIONS,
    CF_RUNTIME_OPERATIONS,
    CF_IDEMPOTENCY_BY_TIME,
    CF_SETTINGS,
    CF_EVENT_COUNTS,
    CF_API_KEYS,
    CF_RUNTIMES_BY_NODE,
    CF_HISTORY_BY_TIME,
    CF_RUNTIMES_BY_FIELD,
    CF_RUNTIME_COUNTS,
    CF_WEBHOOKS,
    CF_WEBHOOK_DELIVERIES,
];

/// Column families of the raft log itself; the rest of the database is the state machine.
pub(crate) const LOG_CFS: &[&str] = &[CF_LOG, CF_RAFT_META];

/// Who a data directory belongs to. Written once, when the directory is first used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format_version: u32,
    pub node_id: NodeId,
    pub cluster_name: String,
}

/// An opened data directory.
pub struct DataDir {
    pub path: PathBuf,
    pub db: Arc<DB>,
    /// True when this start created the directory's contents.
    pub fresh: bool,
}

impl DataDir {
    /// Opens (or creates) the data directory of node `node_id` in cluster `cluster_name`.
    ///
    /// Every check that can refuse the start runs before the database is opened, so a refused
    /// start never modifies the store.
    pub fn open(path: &Path, node_id: NodeId, cluster_name: &str) -> Result<DataDir, DataDirError> {
        let identity_path = path.join("IDENTITY");
        let db_path = path.join("db");
        let fresh = match fs::read_to_string(&identity_path) {
            Ok(text) => {
                let identity: Identity = serde_json::from_str(&text).map_err(|e| DataDirError::CorruptIdentity {
                    path: identity_path.clone(),
                    reason: e.to_string(),
                })?;
                check_identity(&identity, node_id, cluster_name, path)?;
                if !db_path.is_dir() {
                    return Err(DataDirError::MissingDatabase { path: db_path });
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if path.exists() && fs::read_dir(path).map_err(|e| io(path, e))?.next().is_some() {
                    return Err(DataDirError::Foreign { path: path.to_path_buf() });
                }
                fs::create_dir_all(path).map_err(|e| io(path, e))?;
                true
            }
            Err(e) => return Err(io(&identity_path, e)),
        };

        let (db, cache) = open_db(&db_path, &path.join("logs"), fresh)?;
        if fresh {
            let identity = Identity { format_version: FORMAT_VERSION, node_id, cluster_name: cluster_name.to_string() };
            write_atomically(
                &identity_path,
                serde_json::to_string_pretty(&identity).expect("identity serializes").as_bytes(),
            )?;
        }
        let db = Arc::new(db);
        crate::metrics::watch_store(&db, cache);
        Ok(DataDir { path: path.to_path_buf(), db, fresh })
    }

    pub fn snapshot_path(&self) -> PathBuf {
        self.path.join("snapshot")
    }
}

fn check_identity(identity: &Identity, node_id: NodeId, cluster_name: &str, path: &Path) -> Result<(), DataDirError> {
    if identity.format_version != FORMAT_VERSION {
        return Err(DataDirError::FormatVersion {
            path: path.to_path_buf(),
            found: identity.format_version,
            supported: FORMAT_VERSION,
        });
    }
    if identity.node_id != node_id {
        return Err(DataDirError::OtherNode { path: path.to_path_buf(), found: identity.node_id, wanted: node_id });
    }
    if identity.cluster_name != cluster_name {
        return Err(DataDirError::OtherCluster {
            path: path.to_path_buf(),
            found: identity.cluster_name.clone(),
            wanted: cluster_name.to_string(),
        });
    }
    Ok(())
}

/// The store, and the block cache its column families share.
fn open_db(path: &Path, info_log_dir: &Path, create: bool) -> Result<(DB, rocksdb::Cache), DataDirError> {
    let mut opts = Options::default();
    // RocksDB's own diagnostic log lives beside the store, so a refused open leaves `db/` as it was.
    opts.set_db_log_dir(info_log_dir);
    opts.create_if_missing(create);
    opts.create_missing_column_families(create);
    opts.set_paranoid_checks(true);
    opts.set_max_background_jobs(2);
    // Flushes and compactions yield the CPU to requests (nice 19 for RocksDB's two background
    // pools, process-wide): on a busy node a flush of all families took ~250 ms of a core in
    // the middle of requests, and the 99th percentile at 256 clients rose with it. The
    // background threads still run whenever a core is idle, which a node waiting on fsync
    // and the network leaves them.
    let mut env =
        rocksdb::Env::new().map_err(|e| DataDirError::Open { path: path.to_path_buf(), reason: e.into_string() })?;
    env.lower_thread_pool_cpu_priority();
    env.lower_high_priority_thread_pool_cpu_priority();
    opts.set_env(&env);
    opts.set_keep_log_file_num(4);
    // The state machine's writes are not in the write-ahead log: a flush must persist all
    // families as of one moment, or a crash could leave one apply batch half on disk.
    opts.set_atomic_flush(true);
    // A node's store memory is bounded whatever it holds: memtables of every family together,
    // and one block cache they all share (each family had its own 32 MiB cache by default, which
    // a million runtimes filled: ~600 MiB). Reads the cache misses go to the OS page cache.
    opts.set_write_buffer_manager(&rocksdb::WriteBufferManager::new_write_buffer_manager(MEMTABLE_BUDGET, false));
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let log_cfs = LOG_CFS.iter().map(|name| ColumnFamilyDescriptor::new(*name, family_options(&cache)));
    let state_cfs =
        STATE_MACHINE_CFS.iter().map(|name| ColumnFamilyDescriptor::new(*name, state_machine_cf_options(name, &cache)));
    let db = DB::open_cf_descriptors(&opts, path, log_cfs.chain(state_cfs))
        .map_err(|e| DataDirError::Open { path: path.to_path_buf(), reason: e.into_string() })?;
    Ok((db, cache))
}

/// The memtables of all column families together, at most (beyond it, the largest is flushed).
const MEMTABLE_BUDGET: usize = 128 << 20;
/// The block cache every column family shares.
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// What every column family starts from. Memtables are sized per family (a database-wide
/// `write_buffer_size` reaches only the default family): small control-plane records, sixteen
/// families, and a node's memory bounded (at RocksDB's default of 64 MiB, two memtables per
/// family could hold 2 GiB).
fn family_options(cache: &rocksdb::Cache) -> Options {
    let mut opts = Options::default();
    opts.set_write_buffer_size(16 << 20);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    opts.set_block_based_table_factory(&table);
    opts
}

/// Column families apply looks up keys in that are mostly absent: a new runtime's id and name,
/// a new runtime's event tally, a new idempotency key.
const LOOKED_UP_ABSENT_CFS: &[&str] = &[CF_RUNTIMES, CF_RUNTIME_NAMES, CF_EVENT_COUNTS, CF_IDEMPOTENCY];

/// Bloom filters answer a lookup of an absent key without searching every table file (on disk,
/// every family: filters are per table file, so files written without them stay readable) or
/// the memtable's skip list (in memory, only the families of [`LOOKED_UP_ABSENT_CFS`]: a
/// memtable filter costs every insert a hash into it, and the other families are scanned by
/// prefix or looked up by keys that exist — the events family alone takes three inserts per
/// create, and the filter's inserts were 3 % of a loaded node's CPU).
fn state_machine_cf_options(name: &str, cache: &rocksdb::Cache) -> Options {
    let mut table = state_machine_table();
    table.set_block_cache(cache);
    let mut opts = family_options(cache);
    opts.set_block_based_table_factory(&table);
    if LOOKED_UP_ABSENT_CFS.contains(&name) {
        opts.set_memtable_prefix_bloom_ratio(0.02);
        opts.set_memtable_whole_key_filtering(true);
    }
    opts
}

/// The table format of the state machine's families (their bloom filters).
fn state_machine_table() -> rocksdb::BlockBasedOptions {
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_whole_key_filtering(true);
    table
}

/// What a snapshot install writes its table files with: the state machine's table format.
pub(crate) fn table_file_options() -> Options {
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&state_machine_table());
    opts
}

/// Writes the state machine's memtables to table files (all its families as of one moment) and
/// waits until they are on disk. The state machine skips the write-ahead log, so this is what
/// makes the state it reached durable; the log must not be purged past it before this.
pub(crate) fn flush_state_machine(db: &DB) -> Result<(), rocksdb::Error> {
    let families: Vec<_> = STATE_MACHINE_CFS.iter().map(|name| cf(db, name)).collect();
    let mut opts = FlushOptions::default();
    opts.set_wait(true);
    db.flush_cfs_opt(&families, &opts)
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file, never a mix.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    write_atomically_with(path, |out| out.write_all(bytes).map_err(|e| io(path, e)))
}

/// Replaces the file at `path` with what `write` writes (buffered), synced, or leaves it as it
/// was: the new content goes to a temporary file that is renamed over it.
pub(crate) fn write_atomically_with<E: From<DataDirError>>(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    // Beside it, named after all of its name: `snapshot` and `snapshot.installing` are written
    // at the same time (a build and an install), and must not share `snapshot.tmp`.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    write(&mut out)?;
    let file = out.into_inner().map_err(|e| io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    sync_parent_dir(path).map_err(|e| io(path.parent().unwrap_or(path), e))?;
    Ok(())
}

/// Syncs the directory holding `path`, so that a rename into it lasts.
pub(crate) fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => fs::File::open(dir).and_then(|d| d.sync_all()),
        None => Ok(()),
    }
}

fn io(path: &Path, source: std::io::Error) -> DataDirError {
    DataDirError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).unwrap_or_else(|| panic!("column family {name} is created at open"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_another_nodes_or_clusters_directory_without_touching_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        drop(DataDir::open(&path, 1, "alpha").unwrap());
        let before = listing(&path);

        let err = DataDir::open(&path, 2, "alpha").err().unwrap();
        assert!(matches!(err, DataDirError::OtherNode { found: 1, wanted: 2, .. }), "{err}");
        let err = DataDir::open(&path, 1, "beta").err().unwrap();
        assert!(matches!(err, DataDirError::OtherCluster { .. }), "{err}");
        assert_eq!(listing(&path), before, "a refused start must not modify the store");

        let reopened = DataDir::open(&path, 1, "alpha").unwrap();
        assert!(!reopened.fresh);
    }

    #[test]
    fn refuses_a_non_empty_foreign_directory_and_a_corrupt_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("notes.txt"), "not ours").unwrap();
        let err = DataDir::open(dir.path(), 1, "alpha").err().unwrap();
        assert!(matches!(err, DataDirError::Foreign { .. }), "{err}");

        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join("IDENTITY"), "{ not json").unwrap();
        let err = DataDir::open(other.path(), 1, "alpha").err().unwrap();
        assert!(matches!(err, DataDirError::CorruptIdentity { .. }), "{err}");
    }

    fn listing(path: &Path) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let meta = entry.metadata().unwrap();
                if meta.is_dir() {
                    stack.push(entry.path());
                } else {
                    out.push((entry.path(), meta.len()));
                }
            }
        }
        out.sort();
        out
    }
}
