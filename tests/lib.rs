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
        let has_key = headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("idempotency-key"))
            || body.is_some_and(|b| b.get("idempotency_key").is_some());
        let key = (![reqwest::Method::GET, reqwest::Method::HEAD].contains(&method) && !has_key).then(fresh_key);
        let mut headers = headers.to_vec();
        if let Some(key) = &key {
            headers.push(("idempotency-key", key));
        }
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let outcome = self.call(via, method.clone(), path, body, &headers).await;
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

/// An idempotency key no other request of this test process uses.
fn fresh_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("it-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}
