//! The read side of the replicated state machine: what this node has applied, as the API, the
//! scheduler and the executors read it. Nothing here writes: the state changes only through
//! raft's apply ([`crate::state_machine`]), which also keeps the in-memory parts below current.
//!
//! Most reads go to RocksDB; what every request or executor step reads (the unfinished
//! operations, the members' announcements, the settings, the placement counts, the API keys) is
//! kept in memory, loaded at open, followed by apply and reloaded by a snapshot install.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use rocksdb::{IteratorMode, DB};
use tokio::sync::watch;

use runtimeai_model::{ApiKey, ClusterSettings, Event, NodeInfo, Operation, Policy, Runtime};

use crate::apply::events::event_from_stored;
use crate::codec;
use crate::command::CommandReply;
use crate::keys::{event_position, event_prefix, KEY_LAST_APPLIED, KEY_MEMBERSHIP};
use crate::runtime_index::{RuntimeField, TENANT_COUNT_PREFIX, TYPE_COUNT_PREFIX};
use crate::store::{
    cf, CF_ACTIVE_OPERATIONS, CF_API_KEYS, CF_EVENTS, CF_EVENT_FEED, CF_NODES, CF_OPERATIONS, CF_POLICIES, CF_RUNTIMES,
    CF_RUNTIMES_BY_FIELD, CF_RUNTIMES_BY_NODE, CF_RUNTIME_COUNTS, CF_RUNTIME_OPERATIONS, CF_SM_META,
};
use crate::txn::{OperationWritten, Txn};
use crate::types::{read_err, LogId, StorageError, StoredMembership};

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

/// The applied state, read only. Clones share the store and what is kept in memory.
#[derive(Clone)]
pub struct StateReader {
    pub(crate) db: Arc<DB>,
    /// The operations not finished yet, by id: what `CF_ACTIVE_OPERATIONS` indexes, in memory.
    pub(crate) active_operations: Arc<RwLock<BTreeMap<String, Operation>>>,
    /// Bumped whenever an unfinished operation is written or one finishes.
    active_operations_changed: Arc<watch::Sender<u64>>,
    /// The index of the last entry applied, changed by every apply and snapshot install (event
    /// streams wait on it).
    applied_changed: Arc<watch::Sender<u64>>,
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

impl StateReader {
    /// Opens the read side of the state in `db`, loading what is kept in memory.
    pub(crate) fn open(db: Arc<DB>) -> Result<StateReader, StorageError> {
        let reader = StateReader {
            db,
            active_operations: Arc::default(),
            active_operations_changed: Arc::new(watch::channel(0).0),
            applied_changed: Arc::new(watch::channel(0).0),
            nodes: Arc::default(),
            settings: Arc::default(),
            placement: Arc::default(),
            api_keys: Arc::default(),
        };
        reader.reload()?;
        Ok(reader)
    }

    /// Reads again everything kept in memory (at open and after a snapshot install).
    pub(crate) fn reload(&self) -> Result<(), StorageError> {
        self.reload_active_operations()?;
        self.reload_nodes()?;
        self.reload_settings()?;
        self.reload_placement()?;
        self.applied_changed.send_modify(|index| *index += 1);
        self.reload_api_keys()
    }

    /// Reads the unfinished operations from the store (at open and after a snapshot install).
    pub(crate) fn reload_active_operations(&self) -> Result<(), StorageError> {
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
    pub(crate) fn follow_operations(&self, written: Vec<OperationWritten>) {
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
    /// the API reads a page at a time ([`StateReader::runtimes_page`]).
    #[cfg(test)]
    pub(crate) fn list_runtimes(&self) -> Result<Vec<Runtime>, StorageError> {
        self.scan(CF_RUNTIMES, b"")
    }

    /// The runtimes placed on node `node_id`, in id order: read through the node's index, not
    /// by decoding every runtime (an executor's rounds).
    pub fn runtimes_on(&self, node_id: u64) -> Result<Vec<Runtime>, StorageError> {
        self.runtimes_on_page(node_id, "", usize::MAX)
    }

    /// At most `limit` of the runtimes placed on node `node_id` whose ids come after `after`, in
    /// id order: a node holding many is gone through a page at a time.
    pub fn runtimes_on_page(&self, node_id: u64, after: &str, limit: usize) -> Result<Vec<Runtime>, StorageError> {
        let mut runtimes = Vec::new();
        for id in self.index_ids(CF_RUNTIMES_BY_NODE, node_id.to_be_bytes().to_vec(), after).take(limit) {
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

    /// A page of the runtimes [`StateReader::runtimes_where`] yields that `keep` keeps, and
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

    /// Every stream's events in their one global order (the log's) after `after` (from the
    /// first if `None`), each read only when the caller takes it.
    pub fn events_after(&self, after: Option<EventCursor>) -> impl Iterator<Item = Result<Event, StorageError>> + '_ {
        let start = after.map(|EventCursor(position)| position.to_vec()).unwrap_or_default();
        let skip = after.is_some().then(|| start.clone());
        self.db
            .iterator_cf(cf(&self.db, CF_EVENT_FEED), IteratorMode::From(&start, rocksdb::Direction::Forward))
            .filter(move |item| item.as_ref().map_or(true, |(key, _)| skip.as_deref() != Some(&key[..])))
            .filter_map(move |item| {
                let read = || -> Result<Option<Event>, StorageError> {
                    let (position, stream) = item.map_err(read_err)?;
                    let stream: String = crate::codec::decode("event stream", &stream).map_err(read_err)?;
                    let mut key = event_prefix(&stream);
                    key.extend_from_slice(&position);
                    // Gone if retention dropped it between the two reads.
                    let value = self.db.get_cf(cf(&self.db, CF_EVENTS), &key).map_err(read_err)?;
                    value.map(|value| event_from_stored(&key, &value)).transpose()
                };
                read().transpose()
            })
    }

    pub fn get_webhook(&self, id: &str) -> Result<Option<runtimeai_model::Webhook>, StorageError> {
        self.get(crate::store::CF_WEBHOOKS, id.as_bytes())
    }

    /// Every webhook subscription, ordered by id.
    pub fn list_webhooks(&self) -> Result<Vec<runtimeai_model::Webhook>, StorageError> {
        self.scan(crate::store::CF_WEBHOOKS, b"")
    }

    /// A subscription's latest delivery attempts, oldest first.
    pub fn webhook_deliveries(&self, id: &str) -> Result<Vec<runtimeai_model::WebhookDelivery>, StorageError> {
        Ok(self.get(crate::store::CF_WEBHOOK_DELIVERIES, id.as_bytes())?.unwrap_or_default())
    }

    /// Who holds the webhook delivery lease, if anyone ever did.
    pub fn delivery_lease(&self) -> Result<Option<runtimeai_model::DeliveryLease>, StorageError> {
        self.get(crate::store::CF_SETTINGS, crate::keys::DELIVERY_LEASE_KEY)
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
    /// Changes whenever entries are applied (or a snapshot installed).
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied_changed.subscribe()
    }

    /// Tells those who follow the applied state that entries up to `index` are applied.
    pub(crate) fn applied_up_to(&self, index: u64) {
        self.applied_changed.send_replace(index);
    }

    pub fn watch_active_operations(&self) -> watch::Receiver<u64> {
        self.active_operations_changed.subscribe()
    }

    /// A runtime's operations, oldest first. For tests: the API reads a page at a time
    /// ([`StateReader::runtime_operations_after`]).
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

    pub(crate) fn reload_settings(&self) -> Result<(), StorageError> {
        let settings = self.get(crate::store::CF_SETTINGS, crate::keys::SETTINGS_KEY)?.unwrap_or_default();
        *self.settings.write().expect("settings lock") = Arc::new(settings);
        Ok(())
    }

    /// How many runtimes are placed on each node (kept in memory, read from the store when
    /// written).
    pub fn placement_counts(&self) -> Arc<BTreeMap<u64, u64>> {
        self.placement.read().expect("placement lock").clone()
    }

    pub(crate) fn reload_placement(&self) -> Result<(), StorageError> {
        let counts = crate::apply::runtimes::placement_counts(&Txn::new(&self.db))?;
        *self.placement.write().expect("placement lock") = Arc::new(counts);
        Ok(())
    }

    /// What members announced about themselves (`RegisterNode`).
    /// The members' announcements (kept in memory, read from the store when one is written).
    pub fn nodes(&self) -> Arc<Vec<NodeInfo>> {
        self.nodes.read().expect("nodes lock").clone()
    }

    pub(crate) fn reload_nodes(&self) -> Result<(), StorageError> {
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

    pub(crate) fn reload_api_keys(&self) -> Result<(), StorageError> {
        let keys: Vec<ApiKey> = self.scan(CF_API_KEYS, b"")?;
        *self.api_keys.write().expect("api keys lock") =
            Arc::new(keys.into_iter().map(|k| (k.id.clone(), k)).collect());
        Ok(())
    }

    pub fn last_applied(&self) -> Result<Option<LogId>, StorageError> {
        self.get(CF_SM_META, KEY_LAST_APPLIED)
    }

    pub(crate) fn membership(&self) -> Result<StoredMembership, StorageError> {
        Ok(self.get(CF_SM_META, KEY_MEMBERSHIP)?.unwrap_or_default())
    }
}
