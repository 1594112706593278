//! The one path every write takes: stamp the command (time, actor, idempotency claim), propose
//! it through the cluster, and turn a rejection into its problem.

use serde::Serialize;
use sha2::{Digest, Sha256};

use runtimeai_raft::{Command, CommandReply, IdempotencyClaim, Op};

use crate::auth::Caller;
use crate::extract::idempotency_key;
use crate::problem::Problem;
use crate::AppState;

/// Proposes `op` on behalf of the request identified by `route` (method and path) and `body`.
///
/// With an `Idempotency-Key` header the reply is remembered in the replicated state: a retry
/// of the same request — on any node, after any failover — gets the first reply; another
/// request reusing the key gets 422.
pub async fn propose(
    state: &AppState,
    caller: &Caller,
    route: &str,
    body: &impl Serialize,
    op: Op,
) -> Result<CommandReply, Problem> {
    let idempotency = match idempotency_key(&caller.headers)? {
        None => None,
        Some(key) => {
            let scope = caller.idempotency_scope();
            let mut digest = Sha256::new();
            digest.update(route.as_bytes());
            digest.update([0]);
            digest.update(serde_json::to_vec(body).unwrap_or_default());
            let fingerprint = digest.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Some(IdempotencyClaim { key: format!("{scope}/{key}"), fingerprint })
        }
    };
    let command = Command { at: chrono::Utc::now(), actor: caller.actor(), idempotency, op };
    match state.replica.propose(command).await? {
        CommandReply::Rejected(rejection) => Err(rejection.into()),
        reply => Ok(reply),
    }
}

/// A fresh, time-ordered id with a type prefix (`rt_…`, `op_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase())
}
