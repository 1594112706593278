//! Events as apply writes them (keyed by runtime and log position, retention enforced as they
//! are written) and reads them back, and the data each kind carries.

use std::sync::Arc;

use openraft::AnyError;
use rocksdb::IteratorMode;
use serde::{Deserialize, Serialize};

use runtimeai_model::{
    ActionKind, Actor, ClusterSettings, Event, EventSeverity, EventType, JsonObject, JsonText, Operation,
    PolicyDecision, Runtime, RuntimeState, Timestamp,
};

use crate::codec;
use crate::keys::{event_id, event_prefix, EVENT_KEY_SUFFIX};
use crate::store::{cf, CF_EVENTS, CF_EVENT_COUNTS, CF_EVENT_FEED};
use crate::txn::Txn;
use crate::types::{read_err, StorageError};

/// The events stream of changes to the cluster itself (policies, keys, settings): the audit
/// feed admins read at `GET /v1/audit`. Runtime ids start with `rt_`, so it is no runtime's.
pub const AUDIT_STREAM: &str = "cluster";

/// An audit event's data: the named fields and the tenant the change concerns, if any.
pub(crate) fn audit_data(fields: &[(&str, &str)], tenant: Option<&str>) -> JsonObject {
    let mut data: serde_json::Map<String, serde_json::Value> =
        fields.iter().map(|(name, value)| (name.to_string(), (*value).into())).collect();
    data.insert("tenant_id".into(), tenant.into());
    JsonObject(data)
}

pub(crate) fn labels_data(runtime: &Runtime) -> JsonObject {
    let mut data = serde_json::Map::new();
    data.insert("labels".into(), serde_json::to_value(&runtime.labels).unwrap_or_default());
    JsonObject(data)
}

pub(crate) fn operation_data(
    operation: &Operation,
    from: RuntimeState,
    to: RuntimeState,
) -> JsonText<OperationData<'_>> {
    JsonText(OperationData {
        action: operation.action.kind(),
        decisions: None,
        error: operation.error.as_ref().map(|error| format!("{}: {}", error.code, error.message)),
        from_state: from.as_str(),
        operation_id: &operation.id,
        status: operation.status.as_str(),
        to_state: to.as_str(),
    })
}

pub(crate) fn decision_data(operation: &Operation, decision: &PolicyDecision) -> JsonObject {
    let mut data = serde_json::Map::new();
    data.insert("operation_id".into(), operation.id.clone().into());
    data.insert("decision".into(), serde_json::to_value(decision).unwrap_or_default());
    JsonObject(data)
}

/// Writes the events of one command, keyed so that a runtime's events sort in log order.
pub(crate) struct EventWriter<'a> {
    pub(crate) index: u64,
    pub(crate) at: Timestamp,
    pub(crate) actor: &'a runtimeai_model::Actor,
    pub(crate) retention: Arc<ClusterSettings>,
}

/// What `CF_EVENT_COUNTS` keeps per runtime, so that the common case of retention (nothing to
/// drop) reads one record and no event.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub(crate) struct EventTally {
    /// How many events the runtime has.
    pub(crate) count: u64,
    /// The time of its oldest event, when known (unknown after a pruning that stopped at its
    /// batch limit: the next event written looks again).
    #[serde(with = "runtimeai_model::timestamp::option")]
    pub(crate) oldest: Option<Timestamp>,
}

/// At most this many old events are dropped per event written, to bound the work of one apply.
pub(crate) const PRUNE_BATCH: usize = 64;

/// An [`Event`] as apply stores it, borrowed from what apply has at hand. Its id, runtime id and
/// sequence number are not stored: its key holds them (`runtime id \0 seq sub`; see
/// [`event_from_stored`]), so storing them again, and formatting the id, cost every event.
#[derive(Serialize)]
pub(crate) struct EventRecord<'a, D: Serialize + ?Sized> {
    #[serde(rename = "type")]
    pub(crate) event_type: &'a str,
    pub(crate) severity: EventSeverity,
    #[serde(with = "runtimeai_model::timestamp")]
    pub(crate) ts: Timestamp,
    pub(crate) actor: &'a Actor,
    pub(crate) data: &'a D,
}

/// An [`EventRecord`] read back.
#[derive(Deserialize)]
pub(crate) struct StoredEvent {
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    pub(crate) severity: EventSeverity,
    #[serde(with = "runtimeai_model::timestamp")]
    pub(crate) ts: Timestamp,
    pub(crate) actor: Actor,
    pub(crate) data: JsonObject,
}

/// The event stored under `key` as `value`, whole again: id, runtime id and sequence number from
/// the key.
pub(crate) fn event_from_stored(key: &[u8], value: &[u8]) -> Result<Event, StorageError> {
    let malformed = || read_err(AnyError::error(format!("malformed event key {key:?}")));
    let split = key.len().checked_sub(EVENT_KEY_SUFFIX).ok_or_else(malformed)?;
    let (runtime_id, suffix) = key.split_at(split);
    let runtime_id = std::str::from_utf8(runtime_id).map_err(|_| malformed())?;
    let seq = u64::from_be_bytes(suffix[1..9].try_into().map_err(|_| malformed())?);
    let sub = u32::from_be_bytes(suffix[9..13].try_into().map_err(|_| malformed())?);
    let stored: StoredEvent = codec::decode("event", value).map_err(read_err)?;
    Ok(Event {
        id: event_id(seq, sub),
        runtime_id: runtime_id.to_string(),
        event_type: stored.event_type,
        severity: stored.severity,
        ts: stored.ts,
        actor: stored.actor,
        data: stored.data,
        seq,
    })
}

/// Where an event (by its key in [`CF_EVENTS`]) sits in the global feed: its key's last 12
/// bytes, the entry's index and the event's number in it.
pub(crate) fn feed_position(event_key: &[u8]) -> &[u8] {
    &event_key[event_key.len().saturating_sub(12)..]
}

/// Deletes an event and its place in the global feed.
pub(crate) fn drop_event(txn: &mut Txn<'_>, key: Vec<u8>) {
    txn.delete(CF_EVENT_FEED, feed_position(&key).to_vec());
    txn.delete(CF_EVENTS, key);
}

/// `runtime.created`'s data (the event data types list their fields in the order a map would:
/// by name).
#[derive(Serialize)]
pub(crate) struct CreatedData<'a> {
    pub(crate) decisions: &'a [PolicyDecision],
    pub(crate) name: &'a str,
    pub(crate) operation_id: &'a str,
    pub(crate) status: &'a str,
    #[serde(rename = "type")]
    pub(crate) runtime_type: &'a str,
}

/// `operation.assigned`'s data.
#[derive(Serialize)]
pub(crate) struct AssignedData<'a> {
    pub(crate) attempt: u32,
    pub(crate) node_id: u64,
    pub(crate) operation_id: &'a str,
    pub(crate) token: u64,
}

/// The data of an operation's events (`lifecycle.<action>` when it begins, with the policy
/// decisions; `operation.<status>` when it ends).
#[derive(Serialize)]
pub(crate) struct OperationData<'a> {
    pub(crate) action: ActionKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) decisions: Option<&'a [PolicyDecision]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) from_state: &'a str,
    pub(crate) operation_id: &'a str,
    pub(crate) status: &'a str,
    pub(crate) to_state: &'a str,
}

impl EventWriter<'_> {
    pub(crate) fn write<D: Serialize + ?Sized>(
        &mut self,
        txn: &mut Txn<'_>,
        runtime_id: &str,
        event_type: EventType,
        severity: EventSeverity,
        data: &D,
    ) -> Result<(), StorageError> {
        let sub = txn.events_in_entry;
        txn.events_in_entry += 1;
        let name = event_type.name();
        let event = EventRecord { event_type: &name, severity, ts: self.at, actor: self.actor, data };
        let mut key = event_prefix(runtime_id);
        key.extend_from_slice(&self.index.to_be_bytes());
        key.extend_from_slice(&sub.to_be_bytes());
        txn.put(CF_EVENT_FEED, feed_position(&key).to_vec(), &runtime_id)?;
        txn.put(CF_EVENTS, key, &event)?;
        self.enforce_retention(txn, runtime_id)
    }

    /// Drops the runtime's oldest events while it has more than the retention count or they
    /// are older than the retention age (measured from the command's time, not a clock).
    /// The time of the oldest event kept is remembered beside the count, so that the common
    /// case (nothing to drop) reads no event.
    pub(crate) fn enforce_retention(&self, txn: &mut Txn<'_>, runtime_id: &str) -> Result<(), StorageError> {
        let tally_key = runtime_id.as_bytes().to_vec();
        let previous: EventTally = txn.get(CF_EVENT_COUNTS, &tally_key)?.unwrap_or_default();
        let mut count = previous.count + 1;
        let oldest = if previous.count == 0 { Some(self.at) } else { previous.oldest };
        let max_age = chrono::Duration::days(self.retention.event_retention_days.min(100_000) as i64);
        let cutoff = self.at - max_age;
        if count <= self.retention.event_retention_count && oldest.is_some_and(|ts| ts >= cutoff) {
            return txn.put(CF_EVENT_COUNTS, tally_key, &EventTally { count, oldest });
        }
        let prefix = event_prefix(runtime_id);
        let mut expired = Vec::new();
        let mut oldest_kept = Some(self.at);
        let iter = txn.db.iterator_cf(cf(txn.db, CF_EVENTS), IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        for item in iter {
            let (key, value) = item.map_err(read_err)?;
            if !key.starts_with(&prefix) {
                break;
            }
            if expired.len() >= PRUNE_BATCH {
                oldest_kept = None;
                break;
            }
            if txn.deleted(CF_EVENTS, &key) {
                // Dropped earlier in this same batch: the database does not know yet.
                continue;
            }
            let event: StoredEvent = codec::decode("event", &value).map_err(read_err)?;
            if count <= self.retention.event_retention_count && event.ts >= cutoff {
                oldest_kept = Some(event.ts);
                break;
            }
            expired.push(key.to_vec());
            count -= 1;
        }
        for key in expired {
            drop_event(txn, key);
        }
        txn.put(CF_EVENT_COUNTS, tally_key, &EventTally { count, oldest: oldest_kept })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtimeai_model::Verdict;

    #[test]
    fn an_event_reads_back_whole_with_its_id_runtime_and_sequence_from_its_key() {
        let actor = runtimeai_model::Actor::Agent("planner".into());
        let mut data = serde_json::Map::new();
        data.insert("operation_id".into(), "op_1".into());
        let data = JsonObject(data);
        let ts = chrono::DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let record = EventRecord {
            event_type: "runtime.created",
            severity: EventSeverity::Warning,
            ts,
            actor: &actor,
            data: &data,
        };
        let mut key = event_prefix("rt_1");
        key.extend_from_slice(&0x2au64.to_be_bytes());
        key.extend_from_slice(&3u32.to_be_bytes());
        let event = event_from_stored(&key, &codec::encode("test", &record).unwrap()).unwrap();
        assert_eq!(
            event,
            Event {
                id: "ev_000000000000002a_3".into(),
                runtime_id: "rt_1".into(),
                event_type: "runtime.created".into(),
                severity: EventSeverity::Warning,
                ts,
                actor,
                data,
                seq: 42,
            }
        );
        assert!(event_from_stored(b"short", b"").is_err(), "a key too short for an event's is an error");
    }

    #[test]
    fn event_data_built_from_borrowed_fields_reads_back_as_a_json_object() {
        let decision = PolicyDecision {
            action: ActionKind::Create,
            action_index: 0,
            verdict: Verdict::Allow,
            policy_id: None,
            policy_name: None,
            rule_index: None,
            rule_kind: None,
            reason: "balanced: no rule matches create".into(),
        };
        /// The data as a stored event holds it, read back as the API reads it.
        fn stored<T: Serialize>(data: &T) -> serde_json::Value {
            let object: JsonObject = codec::decode("data", &codec::encode("data", data).unwrap()).unwrap();
            serde_json::Value::Object(object.0)
        }
        let created = JsonText(CreatedData {
            decisions: std::slice::from_ref(&decision),
            name: "web",
            operation_id: "op_1",
            status: "queued",
            runtime_type: "vm",
        });
        assert_eq!(
            stored(&created),
            serde_json::json!({"decisions": [serde_json::to_value(&decision).unwrap()], "name": "web",
                "operation_id": "op_1", "status": "queued", "type": "vm"})
        );
        let assigned = JsonText(AssignedData { attempt: 2, node_id: 3, operation_id: "op_1", token: 41 });
        assert_eq!(
            stored(&assigned),
            serde_json::json!({"attempt": 2, "node_id": 3, "operation_id": "op_1", "token": 41})
        );
        let ended = JsonText(OperationData {
            action: ActionKind::Start,
            decisions: None,
            error: Some("backend_failed: no disk".into()),
            from_state: "starting",
            operation_id: "op_1",
            status: "failed",
            to_state: "stopped",
        });
        assert_eq!(
            stored(&ended),
            serde_json::json!({"action": "start", "error": "backend_failed: no disk", "from_state": "starting",
                "operation_id": "op_1", "status": "failed", "to_state": "stopped"})
        );
        // In the API's JSON (human-readable), the data is the object itself.
        assert_eq!(serde_json::to_value(&assigned).unwrap()["token"], 41);
    }
}
