//! The one path every write takes: stamp the command (time, actor, idempotency claim), propose
//! it through the cluster, and turn a rejection into its problem.

use axum::http::HeaderMap;
use serde::Serialize;
use sha2::{Digest, Sha256};

use runtimeai_raft::{Command, CommandReply, IdempotencyClaim, Op};

use crate::extract::{actor, idempotency_key, tenant};
use crate::problem::Problem;
use crate::AppState;

/// Proposes `op` on behalf of the request identified by `route` (method and path) and `body`.
///
/// With an `Idempotency-Key` header the reply is remembered in the replicated state: a retry
/// of the same request — on any node, after any failover — gets the first reply; another
/// request reusing the key gets 422.
pub async fn propose(
    state: &AppState,
    headers: &HeaderMap,
    route: &str,
    body: &impl Serialize,
    op: Op,
) -> Result<CommandReply, Problem> {
    let idempotency = match idempotency_key(headers)? {
        None => None,
        Some(key) => {
            let tenant = tenant(headers)?.unwrap_or_default();
            let mut digest = Sha256::new();
            digest.update(route.as_bytes());
            digest.update([0]);
            digest.update(serde_json::to_vec(body).unwrap_or_default());
            let fingerprint = digest.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Some(IdempotencyClaim { key: format!("{tenant}/{key}"), fingerprint })
        }
    };
    let command = Command { at: chrono::Utc::now(), actor: actor(headers)?, idempotency, op };
    match state.replica.propose(command).await? {
        CommandReply::Rejected(rejection) => Err(rejection.into()),
        reply => Ok(reply),
    }
}

/// A fresh, time-ordered id with a type prefix (`rt_…`, `op_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase())
}
