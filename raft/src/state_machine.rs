//! The replicated state machine on RocksDB: applies committed commands, builds and installs
//! snapshots, and answers reads for the API.
//!
//! Apply is deterministic: it reads only the command and the store. The writes of one `apply`
//! call go into one RocksDB batch together with the new `last_applied`, so a crash leaves the
//! state either before or after that batch. They skip the write-ahead log (the entries they
//! come from are in it, synced) and reach disk by atomic memtable flushes: a crash takes the
//! batches applied since the last flush, and `last applied` with them, and the node re-applies
//! those entries from its log before it serves. The log store flushes the state machine before
//! it purges entries (see `store.rs`).
//!
//! The unfinished operations are also kept in memory (loaded at open, followed by apply,
//! reloaded by a snapshot install): the scheduler and every executor read them on each change,
//! and scanning RocksDB's index of them, full of the tombstones finished operations leave,
//! cost more than applying.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{AnyError, EntryPayload, OptionalSend, StorageIOError};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use runtimeai_model::{ApiKey, ClusterSettings, Event, NodeInfo, Operation, Policy, Runtime};

use crate::apply::apply_entry;
use crate::apply::events::event_from_stored;
use crate::codec;
use crate::command::CommandReply;
use crate::error::DataDirError;
use crate::keys::{event_position, event_prefix};
use crate::runtime_index::{RuntimeField, TENANT_COUNT_PREFIX, TYPE_COUNT_PREFIX};
use crate::snapshot_file::{self, SnapshotFormatError, SnapshotReader, SnapshotWriter};
use crate::store::{
    cf, write_atomically_with, CF_ACTIVE_OPERATIONS, CF_API_KEYS, CF_EVENTS, CF_NODES, CF_OPERATIONS, CF_POLICIES,
    CF_RUNTIMES, CF_RUNTIMES_BY_FIELD, CF_RUNTIMES_BY_NODE, CF_RUNTIME_COUNTS, CF_RUNTIME_OPERATIONS, CF_SM_META,
    STATE_MACHINE_CFS,
};
use crate::txn::{OperationWritten, Txn};
use crate::types::{
    read_err, write_err, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
/// Upper bound for range deletes: every key we write sorts below it.
const KEY_MAX: [u8; 32] = [0xff; 32];

/// Which page of a list: after which id, how many items, how many records read at most.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    pub after: &'a str,
    pub size: usize,
    pub budget: usize,
}

/// A place in a runtime's events: just after the event whose id it was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventCursor([u8; 12]);

impl std::str::FromStr for EventCursor {
    type Err = NotAnEventId;

    fn from_str(id: &str) -> Result<EventCursor, NotAnEventId> {
        event_position(id).map(EventCursor).ok_or_else(|| NotAnEventId(id.to_string()))
    }
}

/// A cursor that names no event.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an event id (ev_<16 hex digits>_<number>)")]
pub struct NotAnEventId(pub String);

/// RocksDB-backed [`RaftStateMachine`], also the read side for the API. Clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<DB>,
    /// The latest snapshot (`snapshot_file.rs`), read when a follower needs it; nothing of it
    /// is kept in memory.
    snapshot_path: PathBuf,
    /// The operations not finished yet, by id: what `CF_ACTIVE_OPERATIONS` indexes, in memory.
    active_operations: Arc<RwLock<BTreeMap<String, Operation>>>,
    /// Bumped whenever an unfinished operation is written or one finishes.
    active_operations_changed: Arc<watch::Sender<u64>>,
    /// What `CF_NODES` holds (every create reads it to place the runtime), in memory.
    nodes: Arc<RwLock<Arc<Vec<NodeInfo>>>>,
    /// The cluster settings (every create validates against their sizes, every executor step
    /// reads them), in memory.
    settings: Arc<RwLock<Arc<ClusterSettings>>>,
    /// Runtimes per node (every create reads them to place the runtime), in memory.
    placement: Arc<RwLock<Arc<BTreeMap<u64, u64>>>>,
    /// Every API key by id (every request is authenticated against them), in memory: checking
    /// a key reads no disk and writes nothing.
    api_keys: Arc<RwLock<Arc<HashMap<String, ApiKey>>>>,
}

/// Writing a snapshot fails on I/O; reading one, on bytes that are not one.
impl From<SnapshotFormatError> for StorageError {
    fn from(e: SnapshotFormatError) -> Self {
        match e {
            SnapshotFormatError::Io(_) | SnapshotFormatError::TooLarge { .. } => {
                StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
            }
            _ => StorageIOError::read_snapshot(None, AnyError::new(&e)).into(),
        }
    }
}

/// The snapshot file is the one file the state machine writes itself.
impl From<DataDirError> for StorageError {
    fn from(e: DataDirError) -> Self {
        StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
    }
}

impl StateMachineStore {
    pub fn new(db: Arc<DB>, snapshot_path: PathBuf) -> Result<StateMachineStore, StorageError> {
        let store = StateMachineStore {
            db,
            snapshot_path,
            active_operations: Arc::default(),
            active_operations_changed: Arc::new(watch::channel(0).0),
            nodes: Arc::default(),
            settings: Arc::default(),
            placement: Arc::default(),
            api_keys: Arc::default(),
        };
        // A snapshot this build cannot read is refused now, not when a follower needs it.
        store.current()?;
        store.reload_active_operations()?;
        store.reload_nodes()?;
        store.reload_settings()?;
        store.reload_placement()?;
        store.reload_api_keys()?;
        Ok(store)
    }

    /// Reads the unfinished operations from the store (at open and after a snapshot install).
    fn reload_active_operations(&self) -> Result<(), StorageError> {
        let mut active = BTreeMap::new();
        for item in self.db.iterator_cf(cf(&self.db, CF_ACTIVE_OPERATIONS), IteratorMode::Start) {
            let (key, _) = item.map_err(read_err)?;
            let id = String::from_utf8_lossy(&key).into_owned();
            if let Some(operation) = self.get_operation(&id)? {
                active.insert(id, operation);
            }
        }
        *self.active_operations.write().expect("active operations lock") = active;
        self.active_operations_changed.send_modify(|version| *version += 1);
        Ok(())
    }

    /// Follows the operations an applied batch wrote, in the order it wrote them.
    fn follow_operations(&self, written: Vec<OperationWritten>) {
        if written.is_empty() {
            return;
        }
        let mut active = self.active_operations.write().expect("active operations lock");
        for operation in written {
            match operation {
                OperationWritten::Unfinished(operation) => active.insert(operation.id.clone(), *operation),
                OperationWritten::Finished(id) => active.remove(&id),
            };
        }
        drop(active);
        self.active_operations_changed.send_modify(|version| *version += 1);
    }

    fn get<T: serde::de::DeserializeOwned>(&self, cf_name: &str, key: &[u8]) -> Result<Option<T>, StorageError> {
        let bytes = self.db.get_cf(cf(&self.db, cf_name), key).map_err(read_err)?;
        bytes.map(|b| codec::decode("state record", &b)).transpose().map_err(read_err)
    }

    fn scan<T: serde::de::DeserializeOwned>(&self, cf_name: &str, prefix: &[u8]) -> Result<Vec<T>, StorageError> {
        let iter = self.db.iterator_cf(cf(&self.db, cf_name), IteratorMode::From(prefix, rocksdb::Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(read_err)?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push(codec::decode("state record", &value).map_err(read_err)?);
        }
        Ok(out)
    }

    pub fn get_runtime(&self, id: &str) -> Result<Option<Runtime>, StorageError> {
        self.get(CF_RUNTIMES, id.as_bytes())
    }

    /// Every runtime, ordered by id (ids are time-ordered, so this is creation order). For tests:
    /// the API reads a page at a time ([`StateMachineStore::runtimes_page`]).
    #[cfg(test)]
    pub(crate) fn list_runtimes(&self) -> Result<Vec<Runtime>, StorageError> {
        self.scan(CF_RUNTIMES, b"")
    }

    /// The runtimes placed on node `node_id`, in id order: read through the node's index, not
    /// by decoding every runtime (an executor's rounds).
    pub fn runtimes_on(&self, node_id: u64) -> Result<Vec<Runtime>, StorageError> {
        let mut runtimes = Vec::new();
        for id in self.index_ids(CF_RUNTIMES_BY_NODE, node_id.to_be_bytes().to_vec(), "") {
            runtimes.extend(self.get_runtime(&id?)?);
        }
        Ok(runtimes)
    }

    /// The ids an index family holds under `prefix` (`prefix id` → ()), in key order, from the
    /// first after `after` on.
    fn index_ids<'a>(
        &'a self,
        cf_name: &str,
        prefix: Vec<u8>,
        after: &'a str,
    ) -> impl Iterator<Item = Result<String, StorageError>> + 'a {
        let start = [&prefix, after.as_bytes()].concat();
        self.db
            .iterator_cf(cf(&self.db, cf_name), IteratorMode::From(&start, rocksdb::Direction::Forward))
            .map(move |item| {
                let (key, _) = item.map_err(read_err)?;
                Ok(key.strip_prefix(prefix.as_slice()).map(|id| String::from_utf8_lossy(id).into_owned()))
            })
            .map_while(Result::transpose)
            .filter(move |id| id.as_ref().map_or(true, |id| after.is_empty() || id != after))
    }

    /// The runtimes with ids after `after`, in id order, each read and decoded only when the
    /// caller takes it: a page reads what it shows (and what its filters pass over), not every
    /// runtime.
    pub fn runtimes_after<'a>(&'a self, after: &str) -> impl Iterator<Item = Result<Runtime, StorageError>> + 'a {
        let after = after.as_bytes().to_vec();
        self.db
            .iterator_cf(cf(&self.db, CF_RUNTIMES), IteratorMode::From(&after, rocksdb::Direction::Forward))
            .filter(move |item| item.as_ref().map_or(true, |(key, _)| key.as_ref() != after.as_slice()))
            .map(|item| {
                let (_, value) = item.map_err(read_err)?;
                codec::decode("state record", &value).map_err(read_err)
            })
    }

    /// The runtimes with ids after `after` that have every value of `fields`, in id order,
    /// read through the index of whichever value has the fewest runtimes (every runtime if
    /// `fields` is empty): a filtered page reads the runtimes of that set, not all of them.
    pub fn runtimes_where<'a>(
        &'a self,
        fields: &'a [RuntimeField],
        after: &'a str,
    ) -> Result<Box<dyn Iterator<Item = Result<Runtime, StorageError>> + 'a>, StorageError> {
        let mut smallest: Option<(u64, &RuntimeField)> = None;
        for field in fields {
            let count = self.runtime_count(field)?;
            if smallest.is_none_or(|(fewest, _)| count < fewest) {
                smallest = Some((count, field));
            }
        }
        let Some((_, chosen)) = smallest else { return Ok(Box::new(self.runtimes_after(after))) };
        let runtimes = self
            .index_ids(CF_RUNTIMES_BY_FIELD, chosen.index_prefix(), after)
            .filter_map(|id| id.and_then(|id| self.get_runtime(&id)).transpose())
            .filter(move |runtime| runtime.as_ref().map_or(true, |r| fields.iter().all(|field| field.matches(r))));
        Ok(Box::new(runtimes))
    }

    /// A page of the runtimes [`StateMachineStore::runtimes_where`] yields that `keep` keeps, and
    /// the token of the next page (`None`: the list has ended). It reads at most `page.budget`
    /// runtimes: past that it ends early, with fewer items, even none, and a token to go on from.
    pub fn runtimes_page(
        &self,
        fields: &[RuntimeField],
        page: PageRequest<'_>,
        keep: impl Fn(&Runtime) -> bool,
    ) -> Result<(Vec<Runtime>, Option<String>), StorageError> {
        let mut items: Vec<Runtime> = Vec::new();
        let mut last_read = None;
        for (read, runtime) in self.runtimes_where(fields, page.after)?.enumerate() {
            if read == page.budget {
                return Ok((items, last_read));
            }
            let runtime = runtime?;
            last_read = Some(runtime.id.clone());
            if !keep(&runtime) {
                continue;
            }
            if items.len() == page.size {
                let next = items.last().map(|r| r.id.clone());
                return Ok((items, next));
            }
            items.push(runtime);
        }
        Ok((items, None))
    }

    /// The reply a command with `claim`'s idempotency key was answered with, if one was applied
    /// (a refusal if it was another request): what a retry gets without proposing again.
    pub fn idempotent_reply(&self, claim: &crate::IdempotencyClaim) -> Result<Option<CommandReply>, StorageError> {
        crate::apply::idempotency::replay(&Txn::new(&self.db), claim)
    }

    /// How many runtimes have `field`'s value.
    pub fn runtime_count(&self, field: &RuntimeField) -> Result<u64, StorageError> {
        Ok(self.get::<u64>(CF_RUNTIME_COUNTS, &field.count_key())?.unwrap_or(0))
    }

    /// How many runtimes each tenant has (tenants with none are left out).
    pub fn runtimes_per_tenant(&self) -> Result<BTreeMap<String, u64>, StorageError> {
        self.counts_under(TENANT_COUNT_PREFIX)
    }

    /// How many runtimes there are (every runtime has one type).
    pub fn runtime_total(&self) -> Result<u64, StorageError> {
        Ok(self.counts_under(TYPE_COUNT_PREFIX)?.values().sum())
    }

    /// The counts of [`CF_RUNTIME_COUNTS`] whose keys begin with `prefix`, by the rest of the key.
    fn counts_under(&self, prefix: &str) -> Result<BTreeMap<String, u64>, StorageError> {
        let prefix = prefix.as_bytes();
        let mut counts = BTreeMap::new();
        let start = IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(cf(&self.db, CF_RUNTIME_COUNTS), start) {
            let (key, value) = item.map_err(read_err)?;
            let Some(tenant) = key.strip_prefix(prefix) else { break };
            let count: u64 = codec::decode("state record", &value).map_err(read_err)?;
            counts.insert(String::from_utf8_lossy(tenant).into_owned(), count);
        }
        Ok(counts)
    }

    /// A runtime's events in the order they were written.
    pub fn runtime_events(&self, runtime_id: &str) -> Result<Vec<Event>, StorageError> {
        self.runtime_events_after(runtime_id, None).collect()
    }

    /// A runtime's events after `after` (from the first if `None`), in the order they were
    /// written, each read only when the caller takes it.
    pub fn runtime_events_after<'a>(
        &'a self,
        runtime_id: &str,
        after: Option<EventCursor>,
    ) -> impl Iterator<Item = Result<Event, StorageError>> + 'a {
        let prefix = event_prefix(runtime_id);
        let mut start = prefix.clone();
        if let Some(EventCursor(position)) = after {
            start.extend_from_slice(&position);
        }
        let skip = after.is_some().then(|| start.clone());
        self.db
            .iterator_cf(cf(&self.db, CF_EVENTS), IteratorMode::From(&start, rocksdb::Direction::Forward))
            .map(move |item| {
                let (key, value) = item.map_err(read_err)?;
                Ok(key.starts_with(&prefix).then_some((key, value)))
            })
            .map_while(Result::transpose)
            .filter(move |item| item.as_ref().map_or(true, |(key, _)| skip.as_deref() != Some(key)))
            .map(|item| item.and_then(|(key, value)| event_from_stored(&key, &value)))
    }

    pub fn get_operation(&self, id: &str) -> Result<Option<Operation>, StorageError> {
        self.get(CF_OPERATIONS, id.as_bytes())
    }

    pub fn get_intent(&self, id: &str) -> Result<Option<runtimeai_model::Intent>, StorageError> {
        self.get(crate::store::CF_INTENTS, id.as_bytes())
    }

    pub fn get_policy(&self, id: &str) -> Result<Option<Policy>, StorageError> {
        self.get(CF_POLICIES, id.as_bytes())
    }

    /// Every policy, ordered by id.
    pub fn list_policies(&self) -> Result<Vec<Policy>, StorageError> {
        self.scan(CF_POLICIES, b"")
    }

    /// Operations not finished yet (queued, pending approval or running), oldest first.
    pub fn active_operations(&self) -> Vec<Operation> {
        self.active_operations_where(|_| true)
    }

    /// The unfinished operations `keep` keeps, ordered by id (only those are copied).
    pub fn active_operations_where(&self, keep: impl Fn(&Operation) -> bool) -> Vec<Operation> {
        let active = self.active_operations.read().expect("active operations lock");
        active.values().filter(|operation| keep(operation)).cloned().collect()
    }

    /// An unfinished operation, from memory (`None` once it has finished).
    pub fn active_operation(&self, id: &str) -> Option<Operation> {
        self.active_operations.read().expect("active operations lock").get(id).cloned()
    }

    /// Changes whenever the set of unfinished operations or one of them changes: the scheduler
    /// and the executors wait on it instead of polling.
    pub fn watch_active_operations(&self) -> watch::Receiver<u64> {
        self.active_operations_changed.subscribe()
    }

    /// A runtime's operations, oldest first. For tests: the API reads a page at a time
    /// ([`StateMachineStore::runtime_operations_after`]).
    #[cfg(test)]
    pub(crate) fn runtime_operations(&self, runtime_id: &str) -> Result<Vec<Operation>, StorageError> {
        self.runtime_operations_after(runtime_id, "", usize::MAX)
    }

    /// Up to `limit` of a runtime's operations with ids after `after` (ids are time-ordered:
    /// creation order), read through the runtime's index: a page reads what it shows.
    pub fn runtime_operations_after(
        &self,
        runtime_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Operation>, StorageError> {
        let prefix = event_prefix(runtime_id);
        let mut operations = Vec::new();
        for id in self.index_ids(CF_RUNTIME_OPERATIONS, prefix, after) {
            if operations.len() >= limit {
                break;
            }
            operations.extend(self.get_operation(&id?)?);
        }
        Ok(operations)
    }

    /// The cluster-wide settings in force (kept in memory, read from the store when written).
    pub fn settings(&self) -> Arc<ClusterSettings> {
        self.settings.read().expect("settings lock").clone()
    }

    fn reload_settings(&self) -> Result<(), StorageError> {
        let settings = self.get(crate::store::CF_SETTINGS, crate::keys::SETTINGS_KEY)?.unwrap_or_default();
        *self.settings.write().expect("settings lock") = Arc::new(settings);
        Ok(())
    }

    /// How many runtimes are placed on each node (kept in memory, read from the store when
    /// written).
    pub fn placement_counts(&self) -> Arc<BTreeMap<u64, u64>> {
        self.placement.read().expect("placement lock").clone()
    }

    fn reload_placement(&self) -> Result<(), StorageError> {
        let counts = crate::apply::runtimes::placement_counts(&Txn::new(&self.db))?;
        *self.placement.write().expect("placement lock") = Arc::new(counts);
        Ok(())
    }

    /// What members announced about themselves (`RegisterNode`).
    /// The members' announcements (kept in memory, read from the store when one is written).
    pub fn nodes(&self) -> Arc<Vec<NodeInfo>> {
        self.nodes.read().expect("nodes lock").clone()
    }

    fn reload_nodes(&self) -> Result<(), StorageError> {
        *self.nodes.write().expect("nodes lock") = Arc::new(self.scan(CF_NODES, b"")?);
        Ok(())
    }

    /// The API key with this id, revoked or not.
    pub fn api_key(&self, id: &str) -> Option<ApiKey> {
        self.api_keys.read().expect("api keys lock").get(id).cloned()
    }

    /// Every API key, revoked ones included.
    pub fn api_keys(&self) -> Arc<HashMap<String, ApiKey>> {
        self.api_keys.read().expect("api keys lock").clone()
    }

    fn reload_api_keys(&self) -> Result<(), StorageError> {
        let keys: Vec<ApiKey> = self.scan(CF_API_KEYS, b"")?;
        *self.api_keys.write().expect("api keys lock") =
            Arc::new(keys.into_iter().map(|k| (k.id.clone(), k)).collect());
        Ok(())
    }

    pub fn last_applied(&self) -> Result<Option<LogId>, StorageError> {
        self.get(CF_SM_META, KEY_LAST_APPLIED)
    }

    fn membership(&self) -> Result<StoredMembership, StorageError> {
        Ok(self.get(CF_SM_META, KEY_MEMBERSHIP)?.unwrap_or_default())
    }

    /// Writes the state machine, as of one RocksDB snapshot, to the snapshot file as it reads
    /// it: no copy of the state is held in memory.
    fn build(&self) -> Result<Snapshot, StorageError> {
        let view = self.db.snapshot();
        let decode_meta = |key: &[u8]| -> Result<Option<Vec<u8>>, StorageError> {
            view.get_cf(cf(&self.db, CF_SM_META), key).map_err(read_err)
        };
        let last_applied: Option<LogId> =
            decode_meta(KEY_LAST_APPLIED)?.map(|b| codec::decode("state record", &b)).transpose().map_err(read_err)?;
        let membership: StoredMembership = decode_meta(KEY_MEMBERSHIP)?
            .map(|b| codec::decode("state record", &b))
            .transpose()
            .map_err(read_err)?
            .unwrap_or_default();
        let snapshot_id = match &last_applied {
            Some(id) => format!("{}-{}", id.leader_id.term, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        let write = |out: &mut dyn std::io::Write| -> Result<(), StorageError> {
            let mut writer = SnapshotWriter::new(out, &meta)?;
            for name in STATE_MACHINE_CFS.iter().filter(|n| **n != CF_SM_META) {
                let records = view.iterator_cf(cf(&self.db, name), IteratorMode::Start).map(|r| r.map_err(read_err));
                writer.family(name, records)?;
            }
            writer.finish()?;
            Ok(())
        };
        write_atomically_with(&self.snapshot_path, write)?;
        // The file itself, open: openraft reads it only to send it; nothing is read back.
        let file = std::fs::File::open(&self.snapshot_path).map_err(read_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }

    /// The latest snapshot, open, with the metadata of that very file (a concurrent build
    /// replaces the path, not what an open file reads). Its checksum is checked first (at a
    /// node's start and before it is sent): a corrupt file is set aside (`.corrupt`) and a new
    /// snapshot built from the state, which is intact in the store.
    fn current(&self) -> Result<Option<Snapshot>, StorageError> {
        let mut file = match std::fs::File::open(&self.snapshot_path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let meta = snapshot_file::read_meta(std::io::BufReader::new(&mut file))?;
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        if let Err(corrupt) = snapshot_file::verify(std::io::BufReader::new(&mut file)) {
            let aside = self.snapshot_path.with_extension("corrupt");
            tracing::error!(
                path = %self.snapshot_path.display(),
                set_aside = %aside.display(),
                error = %corrupt,
                "the snapshot file is corrupt; setting it aside and building a new one from the state"
            );
            std::fs::rename(&self.snapshot_path, &aside).map_err(write_err)?;
            return self.build().map(Some);
        }
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }

    fn install(&self, meta: &SnapshotMeta, bytes: Vec<u8>) -> Result<(), StorageError> {
        let reader = SnapshotReader::open(&bytes)?;
        if reader.meta.last_log_id != meta.last_log_id {
            return Err(read_err(AnyError::error(format!(
                "snapshot content is at {:?} but its metadata says {:?}",
                reader.meta.last_log_id, meta.last_log_id
            ))));
        }
        let mut batch = WriteBatch::default();
        for name in STATE_MACHINE_CFS {
            batch.delete_range_cf(cf(&self.db, name), b"".as_slice(), KEY_MAX.as_slice());
        }
        reader.for_each(|name, key, value| {
            if !STATE_MACHINE_CFS.contains(&name) || name == CF_SM_META {
                return Err(read_err(AnyError::error(format!("snapshot holds unknown column family {name:?}"))));
            }
            batch.put_cf(cf(&self.db, name), key, value);
            Ok(())
        })?;
        let meta_cf = cf(&self.db, CF_SM_META);
        if let Some(last_log_id) = &meta.last_log_id {
            batch.put_cf(meta_cf, KEY_LAST_APPLIED, codec::encode("state record", last_log_id).map_err(write_err)?);
        }
        batch.put_cf(meta_cf, KEY_MEMBERSHIP, codec::encode("state record", &meta.last_membership).map_err(write_err)?);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(write_err)?;
        self.reload_active_operations()?;
        self.reload_nodes()?;
        self.reload_settings()?;
        self.reload_placement()?;
        self.reload_api_keys()?;
        write_atomically_with(&self.snapshot_path, |out| out.write_all(&bytes).map_err(write_err))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied()?, self.membership()?))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandReply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let unfinished = self.active_operations.read().expect("active operations lock");
        let mut txn = Txn::new(&self.db).reading_unfinished(&unfinished);
        let mut replies = Vec::new();
        let mut last_applied = None;
        for entry in entries {
            last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => CommandReply::Empty,
                EntryPayload::Normal(command) => apply_entry(&mut txn, entry.log_id.index, command.into_command())?,
                EntryPayload::Membership(membership) => {
                    txn.put(
                        CF_SM_META,
                        KEY_MEMBERSHIP.to_vec(),
                        &StoredMembership::new(Some(entry.log_id), membership),
                    )?;
                    CommandReply::Empty
                }
            };
            replies.push(reply);
        }
        if let Some(last_applied) = last_applied {
            txn.put(CF_SM_META, KEY_LAST_APPLIED.to_vec(), &last_applied)?;
        }
        // No write-ahead log: the log entries are in it already; see the module's docs.
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        let (operations_written, nodes_written, settings_written, placement_written, api_keys_written) = (
            std::mem::take(&mut txn.operations_written),
            txn.nodes_written,
            txn.settings_written,
            txn.placement_written,
            txn.api_keys_written,
        );
        self.db.write_opt(txn.into_batch(), &opts).map_err(write_err)?;
        drop(unfinished);
        self.follow_operations(operations_written);
        if nodes_written {
            self.reload_nodes()?;
        }
        if settings_written {
            self.reload_settings()?;
        }
        if placement_written {
            self.reload_placement()?;
        }
        if api_keys_written {
            self.reload_api_keys()?;
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    /// An unnamed file beside the snapshot (gone with its last handle, so an interrupted
    /// transfer leaves nothing behind); the chunks are written to it as they arrive.
    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let dir = self.snapshot_path.parent().map(PathBuf::from).unwrap_or_default();
        let file = tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir)).await.map_err(write_err)?;
        Ok(Box::new(tokio::fs::File::from_std(file.map_err(write_err)?)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let this = self.clone();
        let meta = meta.clone();
        // Chunks still on their way to the file land (or fail) before it is read.
        let mut snapshot = snapshot;
        snapshot.flush().await.map_err(write_err)?;
        let mut file = snapshot.into_std().await;
        tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_end(&mut bytes)).map_err(read_err)?;
            this.install(&meta, bytes)
        })
        .await
        .map_err(write_err)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.current()).await.map_err(read_err)?
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    /// Builds on a thread of its own at low CPU priority, like RocksDB's flushes: a build reads
    /// the whole state, and on a busy node it should take the idle CPU, not the requests'.
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let this = self.clone();
        let (done, built) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("snapshot-build".into())
            .spawn(move || {
                lower_this_threads_priority();
                let _ = done.send(this.build());
            })
            .map_err(write_err)?;
        built.await.map_err(write_err)?
    }
}

/// Nice 19 for the calling thread (on Linux a thread's nice value is its own). Best effort: a
/// build at normal priority is slower for requests, not wrong.
fn lower_this_threads_priority() {
    // SAFETY: setpriority takes integers only and touches no memory of ours.
    let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0;
    if failed {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the snapshot build's priority");
    }
}

#[cfg(test)]
#[path = "state_machine_tests.rs"]
mod tests;
