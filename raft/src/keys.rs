//! How the state machine's records are keyed: the layouts apply writes and the reads page
//! through (a runtime's events and operations under `runtime id \0`, names under `tenant \0`,
//! runtimes per node, the settings' own records, an event's id and its key).

/// `runtime id \0`: what a runtime's events and operations are keyed under.
pub(crate) fn event_prefix(runtime_id: &str) -> Vec<u8> {
    // Room for what follows in a key (an event's position, an operation's id), so that
    // completing the key does not reallocate it.
    let mut key = Vec::with_capacity(runtime_id.len() + 1 + 32);
    key.extend_from_slice(runtime_id.as_bytes());
    key.push(0);
    key
}

/// `tenant \0 name` (`CF_RUNTIME_NAMES`): a runtime's name is unique in its tenant.
pub(crate) fn name_key(tenant: Option<&str>, name: &str) -> Vec<u8> {
    let mut key = tenant.unwrap_or("").as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

/// The cluster settings' record in `CF_SETTINGS`.
pub(crate) const SETTINGS_KEY: &[u8] = b"cluster";

/// The webhook delivery lease's record in `CF_SETTINGS`.
pub(crate) const DELIVERY_LEASE_KEY: &[u8] = b"delivery-lease";

/// The state machine's own records in `CF_SM_META`: the last entry it applied and the
/// membership in force.
pub(crate) const KEY_LAST_APPLIED: &[u8] = b"last_applied";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"membership";
/// Present while a snapshot is being installed: the log position it installs (see
/// `StateMachineStore::install`).
pub(crate) const KEY_INSTALLING: &[u8] = b"installing";

/// Runtimes placed on each node (in `CF_SETTINGS`), kept by apply so that placing a new runtime
/// reads one record instead of every runtime.
pub(crate) const PLACEMENT_COUNTS_KEY: &[u8] = b"placement-counts";

/// The key of a runtime in `CF_RUNTIMES_BY_NODE`.
pub(crate) fn by_node_key(node_id: u64, runtime_id: &str) -> Vec<u8> {
    [&node_id.to_be_bytes()[..], runtime_id.as_bytes()].concat()
}

/// The key of an operation in its runtime's index (`CF_RUNTIME_OPERATIONS`).
pub(crate) fn runtime_operation_key(runtime_id: &str, operation_id: &str) -> Vec<u8> {
    let mut key = event_prefix(runtime_id);
    key.extend_from_slice(operation_id.as_bytes());
    key
}

/// Bytes after a runtime's id in an event's key: `\0`, the entry's index, the event's number in it.
pub(crate) const EVENT_KEY_SUFFIX: usize = 1 + 8 + 4;

/// An event's id: the log index of the entry that wrote it and its number within the entry.
pub(crate) fn event_id(seq: u64, sub: u32) -> String {
    format!("ev_{seq:016x}_{sub}")
}

/// Where the event with id `id` sits in its runtime's feed (the key suffix after the `\0`):
/// its entry's index and its number in the entry. `None` if `id` is not an event id.
pub(crate) fn event_position(id: &str) -> Option<[u8; 12]> {
    let (seq, sub) = id.strip_prefix("ev_")?.split_once('_')?;
    if seq.len() != 16 {
        return None;
    }
    let (seq, sub) = (u64::from_str_radix(seq, 16).ok()?, sub.parse::<u32>().ok()?);
    let mut position = [0; 12];
    position[..8].copy_from_slice(&seq.to_be_bytes());
    position[8..].copy_from_slice(&sub.to_be_bytes());
    Some(position)
}
