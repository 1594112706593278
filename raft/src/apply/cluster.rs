//! The cluster's own records: settings, API keys, members' announcements, and the audit of
//! membership changes.

use runtimeai_model::{ApiKey, ClusterSettings, EventSeverity, EventType, MembershipChange, NodeInfo};

use super::events::{audit_data, EventWriter, AUDIT_STREAM};
use crate::command::{CommandReply, Rejection};
use crate::keys::SETTINGS_KEY;
use crate::store::{CF_API_KEYS, CF_NODES, CF_SETTINGS};
use crate::txn::Txn;
use crate::types::StorageError;

/// Stores a new API key, revoking the one it replaces (a rotation) in the same entry.
pub(crate) fn create_api_key(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    key: ApiKey,
    replaces: Option<String>,
) -> Result<CommandReply, StorageError> {
    if txn.get::<ApiKey>(CF_API_KEYS, key.id.as_bytes())?.is_some() {
        return Ok(CommandReply::Rejected(Rejection::AlreadyExists { kind: "API key".into(), id: key.id }));
    }
    if let Some(old_id) = &replaces {
        let Some(mut old) = txn.get::<ApiKey>(CF_API_KEYS, old_id.as_bytes())? else {
            return Ok(CommandReply::Rejected(Rejection::NotFound { kind: "API key".into(), id: old_id.clone() }));
        };
        if old.revoked_at.is_some() {
            return Ok(CommandReply::Rejected(Rejection::IllegalOperationStatus {
                id: old_id.clone(),
                from: "revoked".into(),
                to: "rotated".into(),
            }));
        }
        old.revoked_at = Some(events.at);
        txn.put(CF_API_KEYS, old_id.as_bytes().to_vec(), &old)?;
    }
    txn.put(CF_API_KEYS, key.id.as_bytes().to_vec(), &key)?;
    txn.api_keys_written = true;
    let roles = key.principal.roles.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join(",");
    let mut fields = vec![("key_id", key.id.as_str()), ("principal", &key.principal.name), ("roles", &roles)];
    if let Some(old_id) = &replaces {
        fields.push(("replaces", old_id));
    }
    events.write(txn, AUDIT_STREAM, EventType::ApiKeyCreated, EventSeverity::Info, &audit_data(&fields, None))?;
    Ok(CommandReply::ApiKey(key))
}

pub(crate) fn set_settings(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    settings: ClusterSettings,
) -> Result<CommandReply, StorageError> {
    txn.put(CF_SETTINGS, SETTINGS_KEY.to_vec(), &settings)?;
    let retention = format!("{} events, {} days", settings.event_retention_count, settings.event_retention_days);
    let data = audit_data(&[("event_retention", &retention)], None);
    events.write(txn, AUDIT_STREAM, EventType::SettingsChanged, EventSeverity::Warning, &data)?;
    Ok(CommandReply::Settings(settings))
}

/// Puts a membership change on the audit feed (before it is made).
pub(crate) fn audit_membership(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    change: MembershipChange,
    node_id: u64,
    grpc_addr: Option<String>,
) -> Result<CommandReply, StorageError> {
    let node = node_id.to_string();
    let mut fields = vec![("node_id", node.as_str())];
    if let Some(addr) = &grpc_addr {
        fields.push(("grpc", addr));
    }
    let severity = EventSeverity::Warning;
    events.write(txn, AUDIT_STREAM, EventType::Member(change), severity, &audit_data(&fields, None))?;
    Ok(CommandReply::Audited)
}

pub(crate) fn revoke_api_key(
    txn: &mut Txn<'_>,
    events: &mut EventWriter<'_>,
    id: String,
) -> Result<CommandReply, StorageError> {
    let Some(mut key) = txn.get::<ApiKey>(CF_API_KEYS, id.as_bytes())? else {
        return Ok(CommandReply::Rejected(Rejection::NotFound { kind: "API key".into(), id }));
    };
    if key.revoked_at.is_none() {
        key.revoked_at = Some(events.at);
        txn.put(CF_API_KEYS, id.as_bytes().to_vec(), &key)?;
        txn.api_keys_written = true;
        let data = audit_data(&[("key_id", &key.id), ("principal", &key.principal.name)], None);
        events.write(txn, AUDIT_STREAM, EventType::ApiKeyRevoked, EventSeverity::Warning, &data)?;
    }
    Ok(CommandReply::ApiKey(key))
}

/// A member's announcement of itself (what it serves, where).
pub(crate) fn register_node(txn: &mut Txn<'_>, info: NodeInfo) -> Result<CommandReply, StorageError> {
    txn.put(CF_NODES, info.node_id.to_be_bytes().to_vec(), &info)?;
    Ok(CommandReply::NodeRegistered)
}
