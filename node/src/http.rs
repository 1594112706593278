//! Serving the REST API on established connections, with the bounds a hostile client meets:
//! a request's headers must arrive within [`HttpLimits::header_read_timeout`] (slow-loris), its
//! answer within [`HttpLimits::request_timeout`] (a slow body, a stuck handler), a node holds at
//! most [`HttpLimits::max_connections`] (the next is closed at once, and counted), an HTTP/2
//! connection carries at most [`HttpLimits::max_streams`] requests at once, and a node works on
//! at most [`HttpLimits::max_inflight`] requests at once (the next is shed with 503 and
//! `Retry-After` before it costs anything, as the Kubernetes API server's
//! `--max-requests-inflight`). `axum::serve` sets none of these (hyper reads headers
//! without a deadline unless given a timer), so connections are served here with hyper's own
//! builder.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use futures::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use runtimeai_api::auth::ClientCertificate;

/// The bounds of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub max_streams: u32,
    pub max_inflight: usize,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_streams: 256,
            max_inflight: 1_024,
        }
    }
}

/// `app`, shedding requests past `max_inflight` at once and ending those that take longer than
/// `request_timeout` once admitted. Such a request's body may be unread, so its connection
/// cannot carry another request: the answer says so (`Connection: close`), or the client would
/// send its next request on a connection the server is closing.
fn bounded(app: axum::Router, limits: HttpLimits) -> axum::Router {
    let refuse = move |error: tower::BoxError| async move {
        use runtimeai_api::problem::Problem;
        let problem = if error.is::<tower::timeout::error::Elapsed>() {
            let ms = limits.request_timeout.as_millis();
            Problem::new(
                axum::http::StatusCode::GATEWAY_TIMEOUT,
                "request-timeout",
                format!(
                    "the request took longer than {ms} ms (--request-timeout-ms) and was abandoned; a write may \
                     still take effect: retry it with the same Idempotency-Key"
                ),
            )
        } else {
            Problem::unavailable("this node is working on as many requests as it takes (--max-inflight); retry shortly")
        };
        ([(axum::http::header::CONNECTION, "close")], problem)
    };
    app.layer(axum::middleware::from_fn(close_when_body_unread)).layer(
        tower::ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(refuse))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(limits.max_inflight))
            .timeout(limits.request_timeout),
    )
}

/// Marks the answer to an HTTP/1 request whose body was not read to its end (refused before it:
/// 401, 413, 429...) `Connection: close`. Hyper does not read the rest either and closes the
/// connection after answering; without the header a pooled client would send its next request
/// on a connection the server is closing, and get "connection closed before message completed".
async fn close_when_body_unread(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use hyper::body::Body as _;
    if request.version() >= axum::http::Version::HTTP_2 || request.body().is_end_stream() {
        return next.run(request).await;
    }
    let read = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| axum::body::Body::new(ReadToEnd { body, read: read.clone() }));
    let mut response = next.run(request).await;
    if !read.load(Ordering::Relaxed) {
        let close = axum::http::HeaderValue::from_static("close");
        response.headers_mut().insert(axum::http::header::CONNECTION, close);
    }
    response
}

/// A request body that notes when it has been read to its end.
struct ReadToEnd {
    body: axum::body::Body,
    read: Arc<AtomicBool>,
}

impl hyper::body::Body for ReadToEnd {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.body.is_end_stream() {
            self.read.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Raises this process's limit of open files to the most it may have (the soft limit to the
/// hard one, as a systemd unit's `LimitNOFILE` would): a node holds a file per connection, and
/// a shell's default of 1024 would refuse connections long before `max_connections`. Says so if
/// even the hard limit is short of it.
pub fn raise_open_files_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let open_files = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() { hard } else { soft };
    // Beside the connections: the store's files, peers, the executors' children.
    let needed = max_connections as u64 + 1024;
    if open_files < needed {
        tracing::warn!(
            open_files,
            max_connections,
            "this process may open only {open_files} files; --max-connections {max_connections} needs about \
             {needed} (raise the hard limit: LimitNOFILE in the systemd unit, ulimit -Hn)"
        );
    }
}

/// Connections a node closed at once because it held [`HttpLimits::max_connections`].
pub static REFUSED_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Serves `app` on each connection of `incoming` (with the client's address and the certificate
/// it presented; requests see both as `ConnectInfo`) until `incoming` ends or `stop` turns
/// true; then lets the open connections finish what they are doing, for at most `drain`.
pub async fn serve<IO>(
    mut incoming: impl Stream<Item = (IO, SocketAddr, ClientCertificate)> + Unpin,
    app: axum::Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = bounded(app, limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, _) = watch::channel(false);
    loop {
        let accepted = tokio::select! {
            _ = turned_true(&mut stop) => break,
            accepted = incoming.next() => accepted,
        };
        let Some((io, remote, certificate)) = accepted else { break };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let refused = REFUSED_CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max = limits.max_connections,
                    "connection limit reached; closing new connections"
                );
            }
            continue;
        };
        let app = app.clone();
        let mut closing = closing.subscribe();
        tokio::spawn(async move {
            let certificate = ConnectInfo(certificate);
            let service = app.map_request(move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(certificate.clone());
                request.extensions_mut().insert(ConnectInfo(remote));
                request.map(axum::body::Body::new)
            });
            let builder = builder(limits);
            let connection =
                builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => {}
                _ = turned_true(&mut closing) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(slot);
        });
    }
    let _ = closing.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(drain, slots.acquire_many(all)).await;
}

async fn turned_true(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

fn builder(limits: HttpLimits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
