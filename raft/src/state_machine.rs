//! The replicated state machine on RocksDB: applies committed commands, builds and installs
//! snapshots, and answers reads for the API.
//!
//! Apply is deterministic: it reads only the command and the store. The writes of one `apply`
//! call go into one RocksDB batch together with the new `last_applied`, so a crash leaves the
//! state either before or after that batch. They are not synced on their own: they sit in the
//! same write-ahead log as the raft log, after the entries they come from, so whatever a crash
//! takes from them is re-applied from the log on restart. Before a snapshot lets the log be
//! purged, the write-ahead log is synced.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{AnyError, EntryPayload, OptionalSend, StorageIOError};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use runtimeai_model::{Event, EventSeverity, JsonObject, NodeInfo, Operation, Policy, Runtime};

use crate::codec::{self, FORMAT_VERSION};
use crate::command::{Command, CommandReply, Op, Rejection};
use crate::store::{
    cf, write_atomically, CF_EVENTS, CF_IDEMPOTENCY, CF_INTENTS, CF_NODES, CF_OPERATIONS, CF_POLICIES, CF_RUNTIMES,
    CF_RUNTIME_NAMES, CF_SM_META, STATE_MACHINE_CFS,
};
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
/// Upper bound for range deletes: every key we write sorts below it.
const KEY_MAX: [u8; 32] = [0xff; 32];

/// One column family's key-value pairs, in key order.
type ColumnFamilyDump = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// A snapshot as stored on disk and sent to followers: the state machine's column families at
/// one log position.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    format_version: u32,
    meta: SnapshotMeta,
    column_families: Vec<ColumnFamilyDump>,
}

/// The latest snapshot, kept in memory to serve followers without re-reading the file.
#[derive(Clone)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    bytes: Arc<Vec<u8>>,
}

/// RocksDB-backed [`RaftStateMachine`], also the read side for the API. Clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<DB>,
    snapshot_path: PathBuf,
    current_snapshot: Arc<Mutex<Option<CurrentSnapshot>>>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

impl StateMachineStore {
    pub fn new(db: Arc<DB>, snapshot_path: PathBuf) -> Result<StateMachineStore, StorageError> {
        let current = match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                let file: SnapshotFile = codec::decode("snapshot", &bytes).map_err(read_err)?;
                check_snapshot_version(&file)?;
                Some(CurrentSnapshot { meta: file.meta, bytes: Arc::new(bytes) })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(read_err(e)),
        };
        Ok(StateMachineStore { db, snapshot_path, current_snapshot: Arc::new(Mutex::new(current)) })
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

    /// Every runtime, ordered by id (ids are time-ordered, so this is creation order).
    pub fn list_runtimes(&self) -> Result<Vec<Runtime>, StorageError> {
        self.scan(CF_RUNTIMES, b"")
    }

    /// A runtime's events in the order they were written.
    pub fn runtime_events(&self, runtime_id: &str) -> Result<Vec<Event>, StorageError> {
        self.scan(CF_EVENTS, &event_prefix(runtime_id))
    }

    pub fn get_operation(&self, id: &str) -> Result<Option<Operation>, StorageError> {
        self.get(CF_OPERATIONS, id.as_bytes())
    }

    pub fn get_policy(&self, id: &str) -> Result<Option<Policy>, StorageError> {
        self.get(CF_POLICIES, id.as_bytes())
    }

    /// What members announced about themselves (`RegisterNode`).
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, StorageError> {
        self.scan(CF_NODES, b"")
    }

    pub fn last_applied(&self) -> Result<Option<LogId>, StorageError> {
        self.get(CF_SM_META, KEY_LAST_APPLIED)
    }

    fn membership(&self) -> Result<StoredMembership, StorageError> {
        Ok(self.get(CF_SM_META, KEY_MEMBERSHIP)?.unwrap_or_default())
    }

    fn build(&self) -> Result<Snapshot, StorageError> {
        // The state about to be captured must be on disk before the log behind it is purged.
        self.db.flush_wal(true).map_err(write_err)?;
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
        let mut column_families = Vec::new();
        for name in STATE_MACHINE_CFS.iter().filter(|n| **n != CF_SM_META) {
            let mut pairs = Vec::new();
            for item in view.iterator_cf(cf(&self.db, name), IteratorMode::Start) {
                let (k, v) = item.map_err(read_err)?;
                pairs.push((k.to_vec(), v.to_vec()));
            }
            column_families.push((name.to_string(), pairs));
        }
        let snapshot_id = match &last_applied {
            Some(id) => format!("{}-{}", id.leader_id.term, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        let file = SnapshotFile { format_version: FORMAT_VERSION, meta: meta.clone(), column_families };
        let bytes = codec::encode("snapshot", &file).map_err(write_err)?;
        self.save_snapshot(&meta, bytes.clone())?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }

    fn save_snapshot(&self, meta: &SnapshotMeta, bytes: Vec<u8>) -> Result<(), StorageError> {
        write_atomically(&self.snapshot_path, &bytes)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        *self.current_snapshot.lock().expect("snapshot lock") =
            Some(CurrentSnapshot { meta: meta.clone(), bytes: Arc::new(bytes) });
        Ok(())
    }

    fn install(&self, meta: &SnapshotMeta, bytes: Vec<u8>) -> Result<(), StorageError> {
        let file: SnapshotFile = codec::decode("snapshot", &bytes).map_err(read_err)?;
        check_snapshot_version(&file)?;
        if file.meta.last_log_id != meta.last_log_id {
            return Err(read_err(AnyError::error(format!(
                "snapshot content is at {:?} but its metadata says {:?}",
                file.meta.last_log_id, meta.last_log_id
            ))));
        }
        let mut batch = WriteBatch::default();
        for name in STATE_MACHINE_CFS {
            batch.delete_range_cf(cf(&self.db, name), b"".as_slice(), KEY_MAX.as_slice());
        }
        for (name, pairs) in &file.column_families {
            if !STATE_MACHINE_CFS.contains(&name.as_str()) || name == CF_SM_META {
                return Err(read_err(AnyError::error(format!("snapshot holds unknown column family {name:?}"))));
            }
            let handle = cf(&self.db, name);
            for (k, v) in pairs {
                batch.put_cf(handle, k, v);
            }
        }
        let meta_cf = cf(&self.db, CF_SM_META);
        if let Some(last_log_id) = &meta.last_log_id {
            batch.put_cf(meta_cf, KEY_LAST_APPLIED, codec::encode("state record", last_log_id).map_err(write_err)?);
        }
        batch.put_cf(meta_cf, KEY_MEMBERSHIP, codec::encode("state record", &meta.last_membership).map_err(write_err)?);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(write_err)?;
        self.save_snapshot(meta, bytes)
    }
}

fn check_snapshot_version(file: &SnapshotFile) -> Result<(), StorageError> {
    if file.format_version != FORMAT_VERSION {
        return Err(read_err(AnyError::error(format!(
            "snapshot format version {} is not supported (this build reads {})",
            file.format_version, FORMAT_VERSION
        ))));
    }
    Ok(())
}

fn event_prefix(runtime_id: &str) -> Vec<u8> {
    let mut key = runtime_id.as_bytes().to_vec();
    key.push(0);
    key
}

fn name_key(tenant: Option<&str>, name: &str) -> Vec<u8> {
    let mut key = tenant.unwrap_or("").as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

/// The writes of one `apply` call: a RocksDB batch plus an overlay, so that a command sees the
/// effects of the commands before it in the same batch.
struct Txn<'a> {
    db: &'a DB,
    batch: WriteBatch,
    overlay: HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
}

impl<'a> Txn<'a> {
    fn new(db: &'a DB) -> Self {
        Txn { db, batch: WriteBatch::default(), overlay: HashMap::new() }
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        cf_name: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let bytes = match self.overlay.get(&(cf_name, key.to_vec())) {
            Some(value) => value.clone(),
            None => self.db.get_cf(cf(self.db, cf_name), key).map_err(read_err)?,
        };
        bytes.map(|b| codec::decode("state record", &b)).transpose().map_err(read_err)
    }

    fn put<T: Serialize>(&mut self, cf_name: &'static str, key: Vec<u8>, value: &T) -> Result<(), StorageError> {
        let bytes = codec::encode("state record", value).map_err(write_err)?;
        self.batch.put_cf(cf(self.db, cf_name), &key, &bytes);
        self.overlay.insert((cf_name, key), Some(bytes));
        Ok(())
    }

    fn delete(&mut self, cf_name: &'static str, key: Vec<u8>) {
        self.batch.delete_cf(cf(self.db, cf_name), &key);
        self.overlay.insert((cf_name, key), None);
    }
}

/// Applies one command at log index `index`. Rejections are replies; only store failures are
/// errors (and stop the node: a replica must not skip an entry).
fn apply_command(txn: &mut Txn<'_>, index: u64, command: Command) -> Result<CommandReply, StorageError> {
    if let Some(claim) = &command.idempotency {
        let record: Option<runtimeai_model::IdempotencyRecord> = txn.get(CF_IDEMPOTENCY, claim.key.as_bytes())?;
        if let Some(record) = record {
            if record.fingerprint != claim.fingerprint {
                return Ok(CommandReply::Rejected(Rejection::IdempotencyKeyReused { key: claim.key.clone() }));
            }
            return codec::decode("idempotent reply", &record.reply).map_err(read_err);
        }
    }
    let mut events = EventWriter { index, at: command.at, actor: command.actor.clone(), written: 0 };
    let reply = match command.op {
        Op::CreateRuntime { runtime } => {
            let existing: Option<Runtime> = txn.get(CF_RUNTIMES, runtime.id.as_bytes())?;
            if let Some(existing) = existing {
                // Ids are fresh per request: the same id with the same content is a retry of a
                // create whose reply was lost, and gets the same answer.
                if existing == runtime {
                    return Ok(CommandReply::Runtime(existing));
                }
                CommandReply::Rejected(Rejection::AlreadyExists { kind: "runtime".into(), id: runtime.id })
            } else {
                let name = name_key(runtime.tenant_id.as_deref(), &runtime.name);
                if let Some(existing_id) = txn.get::<String>(CF_RUNTIME_NAMES, &name)? {
                    CommandReply::Rejected(Rejection::NameTaken { name: runtime.name, existing_id })
                } else {
                    txn.put(CF_RUNTIME_NAMES, name, &runtime.id)?;
                    txn.put(CF_RUNTIMES, runtime.id.as_bytes().to_vec(), &runtime)?;
                    events.write(txn, &runtime.id, "runtime.created", EventSeverity::Info)?;
                    CommandReply::Runtime(runtime)
                }
            }
        }
        Op::UpdateRuntime { mut runtime, expected_version } => {
            match txn.get::<Runtime>(CF_RUNTIMES, runtime.id.as_bytes())? {
                None => CommandReply::Rejected(Rejection::NotFound { kind: "runtime".into(), id: runtime.id }),
                Some(current) => match check_version(expected_version, current.version) {
                    Err(rejection) => CommandReply::Rejected(rejection),
                    Ok(()) => {
                        let old_name = name_key(current.tenant_id.as_deref(), &current.name);
                        let new_name = name_key(runtime.tenant_id.as_deref(), &runtime.name);
                        let clash =
                            if old_name != new_name { txn.get::<String>(CF_RUNTIME_NAMES, &new_name)? } else { None };
                        if let Some(existing_id) = clash {
                            CommandReply::Rejected(Rejection::NameTaken { name: runtime.name, existing_id })
                        } else {
                            if old_name != new_name {
                                txn.delete(CF_RUNTIME_NAMES, old_name);
                                txn.put(CF_RUNTIME_NAMES, new_name, &runtime.id)?;
                            }
                            runtime.version = current.version + 1;
                            runtime.created_at = current.created_at;
                            runtime.updated_at = Some(command.at);
                            txn.put(CF_RUNTIMES, runtime.id.as_bytes().to_vec(), &runtime)?;
                            events.write(txn, &runtime.id, "runtime.updated", EventSeverity::Info)?;
                            CommandReply::Runtime(runtime)
                        }
                    }
                },
            }
        }
        Op::DeleteRuntime { id, expected_version } => match txn.get::<Runtime>(CF_RUNTIMES, id.as_bytes())? {
            None => CommandReply::Rejected(Rejection::NotFound { kind: "runtime".into(), id }),
            Some(current) => match check_version(expected_version, current.version) {
                Err(rejection) => CommandReply::Rejected(rejection),
                Ok(()) => {
                    txn.delete(CF_RUNTIME_NAMES, name_key(current.tenant_id.as_deref(), &current.name));
                    txn.delete(CF_RUNTIMES, id.as_bytes().to_vec());
                    events.write(txn, &id, "runtime.deleted", EventSeverity::Info)?;
                    CommandReply::Deleted { id }
                }
            },
        },
        Op::PutOperation { mut operation } => {
            let current: Option<Operation> = txn.get(CF_OPERATIONS, operation.id.as_bytes())?;
            operation.version = current.map_or(1, |c| c.version + 1);
            txn.put(CF_OPERATIONS, operation.id.as_bytes().to_vec(), &operation)?;
            let kind = format!(
                "operation.{}",
                serde_json::to_value(operation.status)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            );
            events.write(txn, &operation.runtime_id, &kind, EventSeverity::Info)?;
            CommandReply::Operation(operation)
        }
        Op::PutIntent { mut intent } => {
            let current: Option<runtimeai_model::Intent> = txn.get(CF_INTENTS, intent.id.as_bytes())?;
            intent.version = current.map_or(1, |c| c.version + 1);
            txn.put(CF_INTENTS, intent.id.as_bytes().to_vec(), &intent)?;
            events.write(txn, &intent.runtime_id, "intent.updated", EventSeverity::Info)?;
            CommandReply::Intent(intent)
        }
        Op::PutPolicy { mut policy } => {
            let current: Option<Policy> = txn.get(CF_POLICIES, policy.id.as_bytes())?;
            policy.version = current.map_or(1, |c| c.version + 1);
            txn.put(CF_POLICIES, policy.id.as_bytes().to_vec(), &policy)?;
            CommandReply::Policy(policy)
        }
        Op::DeletePolicy { id } => {
            if txn.get::<Policy>(CF_POLICIES, id.as_bytes())?.is_none() {
                CommandReply::Rejected(Rejection::NotFound { kind: "policy".into(), id })
            } else {
                txn.delete(CF_POLICIES, id.as_bytes().to_vec());
                CommandReply::Deleted { id }
            }
        }
        Op::RegisterNode { info } => {
            txn.put(CF_NODES, info.node_id.to_be_bytes().to_vec(), &info)?;
            CommandReply::NodeRegistered
        }
    };
    if let Some(claim) = command.idempotency {
        let record = runtimeai_model::IdempotencyRecord {
            key: claim.key.clone(),
            fingerprint: claim.fingerprint,
            reply: codec::encode("idempotent reply", &reply).map_err(write_err)?,
            created_at: command.at,
        };
        txn.put(CF_IDEMPOTENCY, claim.key.into_bytes(), &record)?;
    }
    Ok(reply)
}

fn check_version(expected: Option<u64>, actual: u64) -> Result<(), Rejection> {
    match expected {
        Some(expected) if expected != actual => Err(Rejection::VersionMismatch { expected, actual }),
        _ => Ok(()),
    }
}

/// Writes the events of one command, keyed so that a runtime's events sort in log order.
struct EventWriter {
    index: u64,
    at: runtimeai_model::Timestamp,
    actor: runtimeai_model::Actor,
    written: u32,
}

impl EventWriter {
    fn write(
        &mut self,
        txn: &mut Txn<'_>,
        runtime_id: &str,
        event_type: &str,
        severity: EventSeverity,
    ) -> Result<(), StorageError> {
        let sub = self.written;
        self.written += 1;
        let event = Event {
            id: format!("ev_{:016x}_{sub}", self.index),
            runtime_id: runtime_id.to_string(),
            event_type: event_type.to_string(),
            severity,
            ts: self.at,
            actor: self.actor.clone(),
            data: JsonObject::default(),
            seq: self.index,
        };
        let mut key = event_prefix(runtime_id);
        key.extend_from_slice(&self.index.to_be_bytes());
        key.extend_from_slice(&sub.to_be_bytes());
        txn.put(CF_EVENTS, key, &event)
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
        let mut txn = Txn::new(&self.db);
        let mut replies = Vec::new();
        let mut last_applied = None;
        for entry in entries {
            last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => CommandReply::Empty,
                EntryPayload::Normal(command) => apply_command(&mut txn, entry.log_id.index, command)?,
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
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        self.db.write_opt(txn.batch, &opts).map_err(write_err)?;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || this.install(&meta, snapshot.into_inner())).await.map_err(write_err)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = self.current_snapshot.lock().expect("snapshot lock").clone();
        Ok(current.map(|c| Snapshot { meta: c.meta, snapshot: Box::new(Cursor::new(c.bytes.as_ref().clone())) }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build()).await.map_err(write_err)?
    }
}

#[cfg(test)]
#[path = "state_machine_tests.rs"]
mod tests;
