//! The writes of one `apply` call as an overlay on the store: a command sees what the commands
//! before it in the same batch wrote, and everything goes to RocksDB as one batch. Apply, the
//! indexes it keeps (`runtime_index`, `retention`) and the state machine all work through it.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rocksdb::{IteratorMode, WriteBatch, DB};
use serde::Serialize;

use runtimeai_model::{ClusterSettings, Operation, Policy};

use crate::codec;
use crate::keys::{PLACEMENT_COUNTS_KEY, SETTINGS_KEY};
use crate::store::{cf, CF_NODES, CF_OPERATIONS, CF_POLICIES, CF_SETTINGS};
use crate::types::{read_err, write_err, StorageError};

/// The writes of one `apply` call, so that a command sees the effects of the commands before it
/// in the same batch; they go to RocksDB as one batch ([`Txn::into_batch`]), each key once with
/// its last value (a batch of creates rewrites the placement counts and each runtime's event
/// tally several times).
pub(crate) struct Txn<'a> {
    pub(crate) db: &'a DB,
    /// Per column family, what this batch wrote (`None`: deleted). Kept per family so that a
    /// scan of one (the policies, on every evaluation) does not walk every key of the batch.
    pub(crate) overlay: HashMap<&'static str, BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// Events written so far by the log entry being applied (all its commands, if it is a
    /// batch): numbers them within the entry.
    pub(crate) events_in_entry: u32,
    /// Every operation written, in order: once the batch is on disk, the state machine's
    /// in-memory set of unfinished operations follows them.
    pub(crate) operations_written: Vec<OperationWritten>,
    /// Whether a member's announcement was written: the state machine then reads them again.
    pub(crate) nodes_written: bool,
    /// Whether the cluster settings were written: the state machine then reads them again.
    pub(crate) settings_written: bool,
    /// Whether the runtimes per node were written: the state machine then reads them again.
    pub(crate) placement_written: bool,
    /// Whether an API key was written: the state machine then reads them again.
    pub(crate) api_keys_written: bool,
    /// The settings and the policies, decoded once per apply call (every command reads the
    /// settings, every lifecycle command the policies) until a command writes them.
    pub(crate) settings: RefCell<Option<Arc<ClusterSettings>>>,
    pub(crate) policies: RefCell<Option<Arc<Vec<Policy>>>>,
    /// The unfinished operations as the store holds them before this batch (the state machine
    /// keeps them in memory): an executor's report or lease renewal finds its operation here
    /// instead of reading and decoding it from the store.
    pub(crate) unfinished: Option<&'a BTreeMap<String, Operation>>,
}

/// An operation written by apply, as the in-memory set of unfinished operations follows it: a
/// finished one only leaves the set, so only its id is kept.
pub(crate) enum OperationWritten {
    Unfinished(Box<Operation>),
    Finished(String),
}

impl<'a> Txn<'a> {
    pub(crate) fn new(db: &'a DB) -> Self {
        Txn {
            db,
            overlay: HashMap::new(),
            events_in_entry: 0,
            operations_written: Vec::new(),
            nodes_written: false,
            settings_written: false,
            placement_written: false,
            api_keys_written: false,
            settings: RefCell::new(None),
            policies: RefCell::new(None),
            unfinished: None,
        }
    }

    /// Lets reads of operations start from `unfinished`, which must be exactly the unfinished
    /// operations the store holds when this batch begins.
    pub(crate) fn reading_unfinished(self, unfinished: &'a BTreeMap<String, Operation>) -> Self {
        Txn { unfinished: Some(unfinished), ..self }
    }

    /// An operation as this batch sees it: as written earlier in the batch, else as the store
    /// holds it (from memory if it is unfinished).
    pub(crate) fn operation(&self, id: &str) -> Result<Option<Operation>, StorageError> {
        let written_here = self.overlay.get(CF_OPERATIONS).is_some_and(|written| written.contains_key(id.as_bytes()));
        match self.unfinished.and_then(|unfinished| unfinished.get(id)) {
            Some(operation) if !written_here => Ok(Some(operation.clone())),
            _ => self.get(CF_OPERATIONS, id.as_bytes()),
        }
    }

    pub(crate) fn get<T: serde::de::DeserializeOwned>(
        &self,
        cf_name: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let decode = |bytes: &[u8]| codec::decode("state record", bytes).map_err(read_err);
        match self.overlay.get(cf_name).and_then(|written| written.get(key)) {
            Some(written) => written.as_deref().map(decode).transpose(),
            None => {
                self.db.get_pinned_cf(cf(self.db, cf_name), key).map_err(read_err)?.as_deref().map(decode).transpose()
            }
        }
    }

    pub(crate) fn put<T: Serialize>(
        &mut self,
        cf_name: &'static str,
        key: Vec<u8>,
        value: &T,
    ) -> Result<(), StorageError> {
        let bytes = codec::encode("state record", value).map_err(write_err)?;
        self.forget_cached(cf_name, &key);
        self.overlay.entry(cf_name).or_default().insert(key, Some(bytes));
        Ok(())
    }

    /// Everything written, as one RocksDB batch: each key once, with its last value.
    pub(crate) fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::default();
        for (cf_name, written) in self.overlay {
            let family = cf(self.db, cf_name);
            for (key, value) in written {
                match value {
                    Some(value) => batch.put_cf(family, key, value),
                    None => batch.delete_cf(family, key),
                }
            }
        }
        batch
    }

    pub(crate) fn forget_cached(&mut self, cf_name: &'static str, key: &[u8]) {
        match cf_name {
            // The placement counts live beside the settings and change with every create.
            CF_SETTINGS if key == SETTINGS_KEY => {
                *self.settings.get_mut() = None;
                self.settings_written = true;
            }
            CF_SETTINGS if key == PLACEMENT_COUNTS_KEY => self.placement_written = true,
            CF_POLICIES => *self.policies.get_mut() = None,
            CF_NODES => self.nodes_written = true,
            _ => {}
        }
    }

    /// Whether `key` was deleted earlier in this batch.
    pub(crate) fn deleted(&self, cf_name: &'static str, key: &[u8]) -> bool {
        matches!(self.overlay.get(cf_name).and_then(|written| written.get(key)), Some(None))
    }

    /// Every record of a column family, as this batch sees it.
    pub(crate) fn scan<T: serde::de::DeserializeOwned>(&self, cf_name: &'static str) -> Result<Vec<T>, StorageError> {
        let mut records = BTreeMap::new();
        for item in self.db.iterator_cf(cf(self.db, cf_name), IteratorMode::Start) {
            let (key, value) = item.map_err(read_err)?;
            records.insert(key.to_vec(), Some(value.to_vec()));
        }
        for (key, value) in self.overlay.get(cf_name).into_iter().flatten() {
            records.insert(key.clone(), value.clone());
        }
        records.into_values().flatten().map(|b| codec::decode("state record", &b).map_err(read_err)).collect()
    }

    pub(crate) fn delete(&mut self, cf_name: &'static str, key: Vec<u8>) {
        self.forget_cached(cf_name, &key);
        self.overlay.entry(cf_name).or_default().insert(key, None);
    }
}

impl Txn<'_> {
    /// The cluster-wide settings in force.
    pub(crate) fn settings(&self) -> Result<Arc<ClusterSettings>, StorageError> {
        if let Some(settings) = self.settings.borrow().as_ref() {
            return Ok(settings.clone());
        }
        let settings = Arc::new(self.get::<ClusterSettings>(CF_SETTINGS, SETTINGS_KEY)?.unwrap_or_default());
        *self.settings.borrow_mut() = Some(settings.clone());
        Ok(settings)
    }

    /// Every policy, as this batch sees them (decoded once per batch until one is written).
    pub(crate) fn policies(&self) -> Result<Arc<Vec<Policy>>, StorageError> {
        if let Some(policies) = self.policies.borrow().as_ref() {
            return Ok(policies.clone());
        }
        let policies = Arc::new(self.scan::<Policy>(CF_POLICIES)?);
        *self.policies.borrow_mut() = Some(policies.clone());
        Ok(policies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DataDir;

    #[test]
    fn a_batch_sees_its_own_writes_and_stores_each_key_once_with_its_last_value() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(&dir.path().join("data"), 1, "test").unwrap();
        let db = &data.db;
        db.put_cf(cf(db, CF_SETTINGS), b"gone", codec::encode("test", &7u64).unwrap()).unwrap();

        let mut txn = Txn::new(db);
        txn.put(CF_SETTINGS, b"counts".to_vec(), &1u64).unwrap();
        txn.put(CF_SETTINGS, b"counts".to_vec(), &2u64).unwrap();
        assert_eq!(txn.get::<u64>(CF_SETTINGS, b"counts").unwrap(), Some(2), "a later command sees the last value");
        assert_eq!(txn.get::<u64>(CF_SETTINGS, b"gone").unwrap(), Some(7), "unwritten keys come from the store");
        txn.delete(CF_SETTINGS, b"gone".to_vec());
        assert_eq!(txn.get::<u64>(CF_SETTINGS, b"gone").unwrap(), None);
        txn.put(CF_SETTINGS, b"back".to_vec(), &3u64).unwrap();
        txn.delete(CF_SETTINGS, b"back".to_vec());
        txn.put(CF_SETTINGS, b"back".to_vec(), &4u64).unwrap();

        let batch = txn.into_batch();
        assert_eq!(batch.len(), 3, "one write per key, however often the batch wrote it");
        db.write(batch).unwrap();
        let stored = |key: &[u8]| {
            db.get_cf(cf(db, CF_SETTINGS), key).unwrap().map(|b| codec::decode::<u64>("test", &b).unwrap())
        };
        assert_eq!(stored(b"counts"), Some(2));
        assert_eq!(stored(b"gone"), None);
        assert_eq!(stored(b"back"), Some(4));
    }
}
