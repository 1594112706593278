//! The multi-process tests' harness: real `runtimeai` processes on loopback, from
//! [`runtimeai_chaos::cluster`] (the chaos tool drives clusters with the same code), and the
//! waits the tests share.

pub use runtimeai_chaos::cluster::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a test waits for what happens eventually (a leader, a write through an election, a
/// report). Generous, for a slow and loaded machine; it only matters when the test fails, as
/// every wait ends as soon as its condition holds.
pub const EVENTUALLY: Duration = Duration::from_secs(60);

/// Pause between two tries of a wait.
const POLL: Duration = Duration::from_millis(200);

/// Prints a test phase, so a failing test's output shows how far it got.
pub fn phase(text: &str) {
    eprintln!("--- {text}");
}

/// Requests that ride out a leader election. A 503 with Retry-After is a legal answer while a
/// loaded cluster elects a leader; a test not about elections asks again instead of failing.
#[allow(async_fn_in_trait)]
pub trait Eventually {
    /// [`Cluster::call`], tried again while the answer is a 503 with Retry-After or the request
    /// fails in transport, for up to [`EVENTUALLY`]; then the last answer (or error) is returned
    /// for the caller's assertion to show. Any other answer, a 500 included, returns at once.
    ///
    /// A write without an idempotency key (header, or `idempotency_key` in the body) is sent
    /// with one of its own: a 503 may mean the outcome is unknown, and then only the key makes
    /// the retry get the first reply instead of applying the write twice.
    async fn call_eventually(
        &self,
        via: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Response>;

    /// [`Eventually::call_eventually`] with the credentials of `token` instead of the admin's.
    async fn call_eventually_as(
        &self,
        token: &str,
        via: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Response>;

    /// `GET path` through `via`, as [`Eventually::call_eventually`].
    async fn get_eventually(&self, via: u64, path: &str) -> anyhow::Result<Response>;

    /// Node `id`'s `GET /v1/cluster` once it satisfies `condition`, polled for up to
    /// [`EVENTUALLY`] (transport errors and timeouts of a loaded node are polled through too).
    async fn wait_view(&self, id: u64, what: &str, condition: impl Fn(&Value) -> bool) -> anyhow::Result<Value>;
}

impl Eventually for Cluster {
    async fn call_eventually(
        &self,
        via: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Response> {
        call_retrying(self, None, via, method, path, body, headers).await
    }

    async fn call_eventually_as(
        &self,
        token: &str,
        via: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Response> {
        call_retrying(self, Some(token), via, method, path, body, headers).await
    }

    async fn get_eventually(&self, via: u64, path: &str) -> anyhow::Result<Response> {
        self.call_eventually(via, reqwest::Method::GET, path, None, &[]).await
    }

    async fn wait_view(&self, id: u64, what: &str, condition: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let view = self.cluster_view(id).await;
            match &view {
                Ok(view) if condition(view) => return Ok(view.clone()),
                _ if Instant::now() > deadline => {
                    anyhow::bail!("node {id}: {what} not within {EVENTUALLY:?}; last view: {view:?}")
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }
}

/// The retry loop of [`Eventually::call_eventually`], as the admin (`token` none) or as `token`.
async fn call_retrying(
    cluster: &Cluster,
    token: Option<&str>,
    via: u64,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    let has_key = headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("idempotency-key"))
        || body.is_some_and(|b| b.get("idempotency_key").is_some());
    let key = (![reqwest::Method::GET, reqwest::Method::HEAD].contains(&method) && !has_key).then(fresh_key);
    let mut headers = headers.to_vec();
    if let Some(key) = &key {
        headers.push(("idempotency-key", key));
    }
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let outcome = match token {
            None => cluster.call(via, method.clone(), path, body, &headers).await,
            Some(token) => cluster.call_as(Some(token), via, method.clone(), path, body, &headers).await,
        };
        let retry = match &outcome {
            Ok(response) => response.status == 503 && response.header("retry-after").is_some(),
            Err(_) => true,
        };
        if !retry || Instant::now() > deadline {
            return Ok(outcome?);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// An idempotency key no other request of this test process uses.
fn fresh_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("it-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}

/// Makes an API key through node `via` (as the admin) and returns its token: a principal
/// `name` of `kind` (`human`, `agent`, `service`) in `tenants` with `roles`, and for an agent a
/// `mode`.
pub async fn key_for(
    cluster: &Cluster,
    via: u64,
    name: &str,
    kind: &str,
    tenants: &[&str],
    roles: &[&str],
    mode: Option<&str>,
) -> anyhow::Result<String> {
    let mut body = serde_json::json!({"name": name, "kind": kind, "tenants": tenants, "roles": roles});
    if let Some(mode) = mode {
        body["agent_mode"] = mode.into();
    }
    let made = cluster.call_eventually(via, reqwest::Method::POST, "/v1/keys", Some(&body), &[]).await?;
    anyhow::ensure!(made.status == 201, "cannot make a key for {name}: {made:?}");
    Ok(made.body["token"].as_str().unwrap_or_default().to_string())
}
