//! Hostile clients the load scenarios set loose beside the workload: a flood (one principal as
//! fast as it can), slow-loris connections (a TLS handshake, then a request's headers a byte a
//! second) and a list storm (hundreds of list calls at once). Each runs on a thread of its own,
//! with its own runtime, at nice 19: an attacker's CPU is its own machine's, and on the one
//! machine a test has, the hostile client takes only what the cluster and the workload leave
//! (what it costs the *nodes* to answer it is what a scenario measures). It runs until stopped
//! and counts what it got.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};

/// Concurrent loops of one hostile call, counting each call's outcome.
pub struct Hostile<K> {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeMap<K, u64>>,
}

impl<K: Ord + Send + 'static> Hostile<K> {
    /// Runs `loops` loops of `call` (given the loop's number, and the flag [`Hostile::stop`]
    /// sets, for a call that lasts) until [`Hostile::stop`].
    pub fn start<F, Fut>(loops: usize, call: F) -> Hostile<K>
    where
        F: Fn(usize, Arc<AtomicBool>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = K> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: setpriority takes integers only and touches no memory of ours. Best
            // effort: at normal priority the attack is only harder on the cluster.
            let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(run_loops(loops, Arc::new(call), stopped))
        });
        Hostile { stop, thread }
    }

    /// Stops the loops (each finishes its call) and returns how often each outcome came.
    pub fn stop(self) -> BTreeMap<K, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

async fn run_loops<K, F, Fut>(loops: usize, call: Arc<F>, stopped: Arc<AtomicBool>) -> BTreeMap<K, u64>
where
    K: Ord + Send + 'static,
    F: Fn(usize, Arc<AtomicBool>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = K> + Send + 'static,
{
    let outcomes = Arc::new(Mutex::new(BTreeMap::new()));
    let mut running = tokio::task::JoinSet::new();
    for i in 0..loops {
        let (call, outcomes, stopped) = (call.clone(), outcomes.clone(), stopped.clone());
        running.spawn(async move {
            while !stopped.load(Ordering::Relaxed) {
                let outcome = call(i, stopped.clone()).await;
                *outcomes.lock().expect("outcomes").entry(outcome).or_insert(0) += 1;
            }
        });
    }
    while running.join_next().await.is_some() {}
    let counted = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    counted
}

/// The status of `request`'s answer, read whole (so that its connection serves the next); 0 if
/// none came.
pub async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    match request.send().await {
        Ok(answer) => {
            let status = answer.status().as_u16();
            answer.bytes().await.map_or(0, |_| status)
        }
        Err(_) => 0,
    }
}

/// Raises this process's limit of open files to the most it may have: a thousand slow-loris
/// connections are past a shell's default of 1024.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// How a slow-loris connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SlowEnd {
    /// The server closed it this many seconds after the handshake.
    ClosedAfter(u64),
    /// Still open when the attack stopped.
    Open,
    /// No TCP connection or no TLS handshake.
    Refused,
}

/// A client TLS configuration that trusts the CA in `ca_pem` (a file).
pub fn tls_client(ca_pem: &std::path::Path) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca_pem).map_err(Error::io(format!("read {}", ca_pem.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| Error::Cluster(format!("{}: {e}", ca_pem.display())))?;
        roots.add(cert).map_err(|e| Error::Cluster(format!("{}: {e}", ca_pem.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Cluster(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One slow-loris connection to `addr` (`127.0.0.1:port`): a TLS handshake (counted in
/// `handshaken`), then a request's headers a byte every second, never ending, until the server
/// closes it or `stopped` is set.
pub async fn slow_loris(
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    handshaken: Arc<AtomicUsize>,
    stopped: Arc<AtomicBool>,
) -> SlowEnd {
    let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else { return SlowEnd::Refused };
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = ServerName::try_from("127.0.0.1").expect("an IP address is a server name");
    let Ok(tls) = connector.connect(name, tcp).await else { return SlowEnd::Refused };
    handshaken.fetch_add(1, Ordering::Relaxed);
    let (mut read, mut write) = tokio::io::split(tls);
    let started = Instant::now();
    let headers = b"GET /v1/cluster HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a'));
    let mut buf = [0u8; 512];
    for byte in headers {
        if stopped.load(Ordering::Relaxed) {
            return SlowEnd::Open;
        }
        if write.write_all(&[*byte]).await.is_err() || write.flush().await.is_err() {
            break;
        }
        // A second of waiting, ended early if the server answers or closes.
        match tokio::time::timeout(Duration::from_secs(1), read.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => break,
            // An answer (a 408, say) and then the close.
            Ok(Ok(_)) => {}
        }
    }
    SlowEnd::ClosedAfter(started.elapsed().as_secs())
}
