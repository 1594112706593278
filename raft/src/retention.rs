//! How long history is kept: finished operations, intents and the events of deleted runtimes go
//! once they are older than the cluster's event retention (`event_retention_days`, at least 7).
//! Without it both grew for ever: a runtime's events are pruned as it writes new ones, but a
//! deleted runtime writes none, and operations were never removed.
//!
//! What ends is recorded in [`CF_HISTORY_BY_TIME`] under the time it ended; every
//! [`PRUNE_EVERY`]th log entry, apply removes what that index says has expired, at most
//! [`PRUNE_BATCH`] records (deterministically: every replica prunes the same at the same entry).

use rocksdb::IteratorMode;

use runtimeai_model::Timestamp;

use crate::keys::{event_prefix, runtime_operation_key};
use crate::store::{
    cf, CF_EVENTS, CF_EVENT_COUNTS, CF_HISTORY_BY_TIME, CF_INTENTS, CF_OPERATIONS, CF_RUNTIME_OPERATIONS,
};
use crate::txn::Txn;
use crate::types::{read_err, StorageError};

/// Log entries between two prunes.
pub(crate) const PRUNE_EVERY: u64 = 64;
/// Records removed per prune, at most.
const PRUNE_BATCH: usize = 256;

/// What a history record is of (the byte after its time in the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// A finished operation; the record's value is its runtime's id.
    Operation = 1,
    /// A deleted runtime, whose events remain.
    Runtime = 2,
    /// An intent, recorded when it is submitted (a dry run never finishes).
    Intent = 3,
}

impl Ended {
    fn from_byte(byte: u8) -> Option<Ended> {
        [Ended::Operation, Ended::Runtime, Ended::Intent].into_iter().find(|ended| *ended as u8 == byte)
    }
}

fn key(at: Timestamp, ended: Ended, id: &str) -> Vec<u8> {
    let ms = at.timestamp_millis().max(0) as u64;
    [&ms.to_be_bytes()[..], &[ended as u8], id.as_bytes()].concat()
}

/// Records that an operation of `runtime_id` finished, or that a runtime was deleted, at `at`.
pub(crate) fn ended(
    txn: &mut Txn<'_>,
    at: Timestamp,
    ended: Ended,
    id: &str,
    runtime_id: &str,
) -> Result<(), StorageError> {
    txn.put(CF_HISTORY_BY_TIME, key(at, ended, id), &runtime_id)
}

/// Removes history older than `days` before `now`, up to [`PRUNE_BATCH`] records.
pub(crate) fn prune(txn: &mut Txn<'_>, now: Timestamp, days: u64) -> Result<(), StorageError> {
    let cutoff = (now - chrono::Duration::days(days.min(100_000) as i64)).timestamp_millis().max(0) as u64;
    let mut expired = Vec::new();
    for item in txn.db.iterator_cf(cf(txn.db, CF_HISTORY_BY_TIME), IteratorMode::Start) {
        let (key, value) = item.map_err(read_err)?;
        let (Some(time), Some(kind)) = (key.get(..8), key.get(8).copied().and_then(Ended::from_byte)) else {
            continue;
        };
        if u64::from_be_bytes(time.try_into().expect("eight bytes")) >= cutoff || expired.len() >= PRUNE_BATCH {
            break;
        }
        if txn.deleted(CF_HISTORY_BY_TIME, &key) {
            continue;
        }
        let runtime_id: String = crate::codec::decode("history record", &value).map_err(read_err)?;
        expired.push((key.to_vec(), kind, String::from_utf8_lossy(&key[9..]).into_owned(), runtime_id));
    }
    for (key, kind, id, runtime_id) in expired {
        let done = match kind {
            Ended::Operation => {
                txn.delete(CF_OPERATIONS, id.as_bytes().to_vec());
                txn.delete(CF_RUNTIME_OPERATIONS, runtime_operation_key(&runtime_id, &id));
                true
            }
            Ended::Intent => {
                txn.delete(CF_INTENTS, id.as_bytes().to_vec());
                true
            }
            Ended::Runtime => drop_events(txn, &id)?,
        };
        if done {
            txn.delete(CF_HISTORY_BY_TIME, key);
        }
    }
    Ok(())
}

/// Drops a deleted runtime's events, [`PRUNE_BATCH`] at most: whether none are left.
fn drop_events(txn: &mut Txn<'_>, runtime_id: &str) -> Result<bool, StorageError> {
    let prefix = event_prefix(runtime_id);
    let mut keys = Vec::new();
    let mut more = false;
    let iter = txn.db.iterator_cf(cf(txn.db, CF_EVENTS), IteratorMode::From(&prefix, rocksdb::Direction::Forward));
    for item in iter {
        let (key, _) = item.map_err(read_err)?;
        if !key.starts_with(&prefix) {
            break;
        }
        if txn.deleted(CF_EVENTS, &key) {
            continue;
        }
        if keys.len() >= PRUNE_BATCH {
            more = true;
            break;
        }
        keys.push(key.to_vec());
    }
    keys.into_iter().for_each(|key| crate::apply::events::drop_event(txn, key));
    if !more {
        txn.delete(CF_EVENT_COUNTS, runtime_id.as_bytes().to_vec());
    }
    Ok(!more)
}
