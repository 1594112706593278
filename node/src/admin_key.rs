//! The first cluster admin. A new cluster has no keys, and every request but the probes needs
//! one: the node that initializes the cluster (or any node given `--bootstrap-admin-key-file`)
//! makes sure the bootstrap admin key exists in the replicated state. Without the flag, the
//! initializing node makes a secret and writes the token to `<data-dir>/admin.key` (0600),
//! saying where in its log, never the secret itself.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use runtimeai_api::auth::{new_secret, parse_token, secret_digest};
use runtimeai_model::{Actor, ApiKey, Principal, PrincipalKind, Role, ALL_TENANTS};
use runtimeai_raft::command::CreateApiKey;
use runtimeai_raft::{CommandReply, Op, Rejection, Replica};

/// The file the initializing node writes a generated admin token to.
pub const GENERATED_FILE: &str = "admin.key";

/// The bootstrap admin's principal: a human of every tenant with the cluster-admin role.
fn admin() -> Principal {
    Principal {
        name: "admin".into(),
        kind: PrincipalKind::Human,
        tenants: vec![ALL_TENANTS.into()],
        roles: vec![Role::ClusterAdmin],
        agent_mode: None,
    }
}

/// The bootstrap key this node is responsible for, if any: the one in `given`, or — on the
/// node that initializes the cluster — the one it generated (now or at an earlier start).
pub fn bootstrap_key(given: Option<&Path>, data_dir: &Path, initializes: bool) -> anyhow::Result<Option<ApiKey>> {
    let generated = data_dir.join(GENERATED_FILE);
    let token = match given {
        Some(path) => read_token(path)?,
        None if generated.exists() => read_token(&generated)?,
        None if initializes => {
            let token = generate_file(&generated)?;
            tracing::warn!(
                file = %generated.display(),
                "made the first cluster admin's API key; keep the file safe (or pass --bootstrap-admin-key-file)"
            );
            token
        }
        None => return Ok(None),
    };
    let parsed = parse_token(&token).expect("checked by read_token");
    Ok(Some(ApiKey {
        id: parsed.id.to_string(),
        principal: admin(),
        secret_sha256: secret_digest(parsed.secret),
        created_at: chrono::Utc::now(),
        created_by: Actor::System.to_string(),
        expires_at: None,
        revoked_at: None,
    }))
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the admin key {}", path.display()))?;
    let token = text.trim().to_string();
    if parse_token(&token).is_none() {
        anyhow::bail!(
            "{} does not hold an API key: expected one line rai_<id>_<secret>, with an id of letters, digits \
             and dashes and a secret of at least 32 characters",
            path.display()
        );
    }
    Ok(token)
}

/// Makes a new admin token and writes it to a new file at `path` that only its owner can read.
pub fn generate_file(path: &Path) -> anyhow::Result<String> {
    let token = format!("rai_admin_{}", new_secret());
    write_private(path, &token)?;
    Ok(token)
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{text}").and_then(|()| file.sync_all()).with_context(|| format!("cannot write {}", path.display()))
}

/// Proposes the key once this node is a member and a leader is known, until it is stored or
/// found there already (a revoked bootstrap key stays revoked: its record exists).
pub async fn ensure(replica: Arc<Replica>, key: ApiKey) {
    let reply = replica
        .propose_until_stored(
            "store the bootstrap admin key",
            |replica| replica.state().api_key(&key.id).is_some(),
            || Op::CreateApiKey(CreateApiKey { key: key.clone(), replaces: None }),
            |reply| matches!(reply, CommandReply::ApiKey(_) | CommandReply::Rejected(Rejection::AlreadyExists { .. })),
        )
        .await;
    if let Some(CommandReply::ApiKey(_)) = reply {
        tracing::info!(key_id = %key.id, "stored the bootstrap admin key");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initializing_node_makes_a_private_key_once_and_others_make_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(bootstrap_key(None, dir.path(), false).unwrap().is_none(), "a joining node makes no key");
        let made = bootstrap_key(None, dir.path(), true).unwrap().expect("made");
        let file = dir.path().join(GENERATED_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let token = std::fs::read_to_string(&file).unwrap();
        let parsed = parse_token(token.trim()).unwrap();
        assert_eq!(secret_digest(parsed.secret), made.secret_sha256, "the file holds the key's secret");
        let again = bootstrap_key(None, dir.path(), true).unwrap().expect("read back");
        assert_eq!(again.secret_sha256, made.secret_sha256, "a restart reuses it");
        assert!(made.principal.all_tenants() && made.principal.roles == [Role::ClusterAdmin]);
    }

    #[test]
    fn a_given_file_that_holds_no_key_is_refused_with_what_is_expected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "hunter2\n").unwrap();
        let error = bootstrap_key(Some(&path), dir.path(), true).unwrap_err().to_string();
        assert!(error.contains("rai_<id>_<secret>"), "{error}");
        std::fs::write(&path, format!("rai_ops_{}\n", "s".repeat(40))).unwrap();
        let key = bootstrap_key(Some(&path), dir.path(), true).unwrap().unwrap();
        assert_eq!(key.id, "ops");
        assert!(!dir.path().join(GENERATED_FILE).exists(), "nothing generated when a key is given");
    }
}
