//! The one path every write takes: stamp the command (time, actor, idempotency claim), propose
//! it through the cluster, and turn a rejection into its problem.

use serde::Serialize;
use sha2::{Digest, Sha256};

use runtimeai_raft::{Command, CommandReply, IdempotencyClaim, Op};

use crate::auth::Caller;
use crate::extract::idempotency_key;
use crate::problem::Problem;
use crate::AppState;

/// Proposes `op` on behalf of the caller's request, identified by its method and path (as the
/// client sent them) and `body` (what the request asks, beyond its path).
///
/// With an `Idempotency-Key` header the reply is remembered in the replicated state: a retry
/// of the same request — on any node, after any failover — gets the first reply; another
/// request reusing the key gets 422.
pub async fn propose(
    state: &AppState,
    caller: &Caller,
    body: &impl Serialize,
    op: Op,
) -> Result<CommandReply, Problem> {
    let idempotency = claim(caller, body)?;
    let command = Command { at: chrono::Utc::now(), actor: caller.actor(), idempotency, op };
    match state.replica.propose(command).await? {
        CommandReply::Rejected(rejection) => Err(rejection.into()),
        reply => Ok(reply),
    }
}

/// For a handler that reads what a write changes before it proposes the write, when that read
/// found nothing (`gone`, a 404): the reply already given to this very request under its
/// idempotency key, if its first attempt was applied (a delete that is done: the retry must
/// still get the first answer, not 404); else `gone`. The handler's read came after a read
/// barrier, so this node's state holds the remembered reply if the cluster does.
pub fn replayed_when_gone(
    state: &AppState,
    caller: &Caller,
    body: &impl Serialize,
    gone: Problem,
) -> Result<CommandReply, Problem> {
    let claim = match claim(caller, body)? {
        Some(claim) if gone.status == 404 => claim,
        _ => return Err(gone),
    };
    match state.replica.state().idempotent_reply(&claim)? {
        Some(CommandReply::Rejected(rejection)) => Err(rejection.into()),
        Some(reply) => Ok(reply),
        None => Err(gone),
    }
}

/// The caller's idempotency claim: its key (scoped to the principal) and a fingerprint of the
/// request's method, path and `body`.
fn claim(caller: &Caller, body: &impl Serialize) -> Result<Option<IdempotencyClaim>, Problem> {
    let Some(key) = idempotency_key(&caller.headers)? else { return Ok(None) };
    let mut digest = Sha256::new();
    digest.update(caller.request.as_bytes());
    digest.update([0]);
    digest.update(serde_json::to_vec(body).unwrap_or_default());
    let fingerprint = hex::encode(digest.finalize());
    Ok(Some(IdempotencyClaim { key: format!("{}/{key}", caller.idempotency_scope()), fingerprint }))
}

/// A fresh, time-ordered id with a type prefix (`rt_…`, `op_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase())
}
