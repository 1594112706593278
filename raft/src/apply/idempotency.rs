//! Replies kept under idempotency keys: replayed for the same request, refused for another,
//! forgotten after [`IDEMPOTENCY_RETENTION_MS`].

use rocksdb::IteratorMode;

use runtimeai_model::{IdempotencyRecord, Timestamp};

use crate::codec;
use crate::command::{CommandReply, IdempotencyClaim, Rejection};
use crate::store::{cf, CF_IDEMPOTENCY, CF_IDEMPOTENCY_BY_TIME};
use crate::txn::Txn;
use crate::types::{read_err, write_err, StorageError};

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_RETENTION_MS: i64 = 24 * 60 * 60 * 1000;

/// Remembers the reply under the command's idempotency key, if it has one.
pub(crate) fn finish(
    txn: &mut Txn<'_>,
    at: Timestamp,
    idempotency: Option<IdempotencyClaim>,
    reply: CommandReply,
) -> Result<CommandReply, StorageError> {
    if let Some(claim) = idempotency {
        remember_reply(txn, at, claim, &reply)?;
    }
    Ok(reply)
}

/// Stores the reply under the idempotency key, and forgets keys past their retention.
pub(crate) fn remember_reply(
    txn: &mut Txn<'_>,
    at: Timestamp,
    claim: IdempotencyClaim,
    reply: &CommandReply,
) -> Result<(), StorageError> {
    let now_ms = at.timestamp_millis().max(0) as u64;
    let cutoff = now_ms.saturating_sub(IDEMPOTENCY_RETENTION_MS as u64);
    let mut expired = Vec::new();
    for item in txn.db.iterator_cf(cf(txn.db, CF_IDEMPOTENCY_BY_TIME), IteratorMode::Start) {
        let (key, _) = item.map_err(read_err)?;
        let ts = key.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
        if ts >= cutoff {
            break;
        }
        expired.push(key.to_vec());
    }
    for key in expired {
        txn.delete(CF_IDEMPOTENCY, key.get(9..).unwrap_or_default().to_vec());
        txn.delete(CF_IDEMPOTENCY_BY_TIME, key);
    }
    let record = IdempotencyRecord {
        key: claim.key.clone(),
        fingerprint: claim.fingerprint,
        reply: codec::encode("idempotent reply", reply).map_err(write_err)?,
        created_at: at,
    };
    let mut by_time = now_ms.to_be_bytes().to_vec();
    by_time.push(0);
    by_time.extend_from_slice(claim.key.as_bytes());
    txn.put(CF_IDEMPOTENCY_BY_TIME, by_time, &())?;
    txn.put(CF_IDEMPOTENCY, claim.key.into_bytes(), &record)
}

/// The reply remembered under `claim`'s key, if a command with it was applied before; a
/// refusal if that command was a different request.
pub(crate) fn replay(txn: &Txn<'_>, claim: &IdempotencyClaim) -> Result<Option<CommandReply>, StorageError> {
    let Some(record) = txn.get::<IdempotencyRecord>(CF_IDEMPOTENCY, claim.key.as_bytes())? else { return Ok(None) };
    if record.fingerprint != claim.fingerprint {
        return Ok(Some(CommandReply::Rejected(Rejection::IdempotencyKeyReused { key: claim.key.clone() })));
    }
    codec::decode("idempotent reply", &record.reply).map(Some).map_err(read_err)
}
