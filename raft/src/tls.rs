//! Transport security for both of a node's ports, with rustls: configurations built from PEM
//! files and rebuilt when the files change (polled) or on SIGHUP, so replaced certificates are
//! used by new connections without a restart; the member id a peer's certificate names; the
//! accept loop both servers share (handshakes run concurrently, each bounded in time); and the
//! connector peers dial each other with.
//!
//! A member's certificate names it with the URI SAN `urn:runtimeai:member:<id>` and is signed by
//! the cluster's CA (`--peer-ca`): a node accepts a peer only with such a certificate, and a Raft
//! or Forward RPC only when the id it claims is the certificate's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closed connection still reads (and drops) what the client sends, at most, and how
/// long it waits for more when nothing comes: see [`TlsConnection`]'s `poll_shutdown`.
const LINGER: Duration = Duration::from_secs(5);
const LINGER_QUIET: Duration = Duration::from_secs(2);
/// How often the certificate files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// A certificate that expires within this is logged at every reload check (once an hour).
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("invalid CA bundle: {0}")]
    Verifier(String),
}

/// The URI SAN that names member `id` in its certificate.
pub fn member_uri(id: u64) -> String {
    format!("urn:runtimeai:member:{id}")
}

/// The member id a certificate names, if it names one.
pub fn member_id_of(cert: &CertificateDer<'_>) -> Option<u64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let sans = parsed.subject_alternative_name().ok()??;
    sans.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri.strip_prefix("urn:runtimeai:member:")?.parse().ok(),
        _ => None,
    })
}

/// The common name of a certificate's subject (a client certificate's principal).
pub fn common_name_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}

/// When a certificate stops being valid.
fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

/// The certificates of a PEM file, in order.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_path_buf(), reason: "no certificate in it".into() });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem { path: path.to_path_buf(), reason: e.to_string() })
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::Pem { path: path.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM files of one side of a TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA whose certificates the other side must present (required of clients by a
    /// server; trusted by a client); `None` on a server: client certificates are not asked for.
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        [Some(self.cert.as_path()), Some(self.key.as_path()), self.ca.as_deref()].into_iter().flatten().collect()
    }

    fn modified(&self) -> Vec<Option<SystemTime>> {
        self.paths().iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
    }
}

/// A rustls configuration built from files, rebuilt by [`watch`] when they change.
pub struct Reloading<T> {
    name: &'static str,
    files: TlsFiles,
    build: fn(&TlsFiles) -> Result<T, TlsError>,
    current: RwLock<Arc<T>>,
    seen: Mutex<(Vec<Option<SystemTime>>, Option<SystemTime>)>,
}

/// A server's configuration (REST, or peers with client certificates required).
pub type ServerTls = Reloading<rustls::ServerConfig>;
/// A peer's configuration when it dials another member.
pub type ClientTls = Reloading<rustls::ClientConfig>;

impl<T> Reloading<T> {
    fn load(
        name: &'static str,
        files: TlsFiles,
        build: fn(&TlsFiles) -> Result<T, TlsError>,
    ) -> Result<Arc<Self>, TlsError> {
        let seen = files.modified();
        let config = build(&files)?;
        let reloading =
            Reloading { name, build, current: RwLock::new(Arc::new(config)), seen: Mutex::new((seen, None)), files };
        reloading.warn_if_expiring();
        Ok(Arc::new(reloading))
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<T> {
        self.current.read().expect("tls config lock").clone()
    }

    /// Rebuilds the configuration if a file changed since the last build (or `force`). A file
    /// that does not make a valid configuration is logged and the previous one stays.
    pub fn reload(&self, force: bool) -> bool {
        let modified = self.files.modified();
        let mut seen = self.seen.lock().expect("tls reload lock");
        if !force && modified == seen.0 {
            return false;
        }
        seen.0 = modified;
        match (self.build)(&self.files) {
            Ok(config) => {
                *self.current.write().expect("tls config lock") = Arc::new(config);
                tracing::info!(what = self.name, cert = %self.files.cert.display(), "reloaded TLS certificates");
                drop(seen);
                self.warn_if_expiring();
                true
            }
            Err(e) => {
                tracing::error!(what = self.name, error = %e, "cannot reload TLS certificates; keeping the previous ones");
                false
            }
        }
    }

    /// Logs (at most hourly) when the certificate expires within two weeks.
    fn warn_if_expiring(&self) {
        let Ok(certs) = certificates(&self.files.cert) else { return };
        let Some(expiry) = certs.first().and_then(not_after) else { return };
        let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
        let mut seen = self.seen.lock().expect("tls reload lock");
        let due = seen.1.is_none_or(|last| last.elapsed().unwrap_or_default() >= Duration::from_secs(3600));
        if left < EXPIRY_WARNING && due {
            seen.1 = Some(SystemTime::now());
            tracing::warn!(what = self.name, cert = %self.files.cert.display(), days_left = left.as_secs() / 86_400, "certificate expires soon");
        }
    }
}

/// A peer server: every client must present a certificate of the CA.
fn build_peer_server(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    build_server(files, true)
}

/// A REST server: a client certificate is checked when sent, but not required (keys still work).
fn build_rest_server(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    build_server(files, false)
}

fn build_server(files: &TlsFiles, require_client_cert: bool) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider());
            let verifier = if require_client_cert { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| TlsError::Verifier(e.to_string()))?)
        }
    };
    let mut config = builder.with_single_cert(certificates(&files.cert)?, private_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn build_client(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let ca = files.ca.as_deref().ok_or_else(|| TlsError::Verifier("a peer needs the cluster's CA".into()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certificates(&files.cert)?, private_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The REST port's configuration: client certificates of `files.ca`, if set, are checked when
/// sent and not required.
pub fn rest_server(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
    Reloading::load("REST", files, build_rest_server)
}

/// The peer port's configuration: every caller must present a certificate of `files.ca`.
pub fn peer_server(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
    Reloading::load("peer server", files, build_peer_server)
}

/// A peer's dialing configuration: its certificate, and the cluster's CA to check others by.
pub fn client(files: TlsFiles) -> Result<Arc<ClientTls>, TlsError> {
    Reloading::load("peer client", files, build_client)
}

/// Anything [`watch`] reloads.
pub trait Reload: Send + Sync {
    fn reload(&self, force: bool) -> bool;
}

impl<T: Send + Sync> Reload for Reloading<T> {
    fn reload(&self, force: bool) -> bool {
        Reloading::reload(self, force)
    }
}

/// Reloads every configuration when its files change (checked every two seconds) and on
/// SIGHUP, until `stop`.
pub async fn watch(configs: Vec<Arc<dyn Reload>>, mut stop: watch::Receiver<bool>) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    loop {
        let force = tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tick.tick() => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading TLS certificates");
                true
            }
        };
        for config in &configs {
            config.reload(force);
        }
    }
}

/// Completes once `stop` is set (the guard `wait_for` returns is not held across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Who is at the other end of an accepted TLS connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub remote: SocketAddr,
    /// The leaf certificate the client presented, if any.
    pub certificate: Option<CertificateDer<'static>>,
}

impl PeerIdentity {
    /// The member its certificate names.
    pub fn member_id(&self) -> Option<u64> {
        self.certificate.as_ref().and_then(member_id_of)
    }
}

/// An established server-side TLS connection, with who is at the other end.
///
/// Closing it lingers, as nginx's `lingering_close` does: a server that answers before it has
/// read the whole request (413 for a body over the limit, 400 for a malformed header) and then
/// closes its socket with the rest unread makes the kernel send a reset, which can destroy the
/// answer before the client reads it; the client sees "connection reset" or "EOF in violation of
/// protocol" instead of the status. So after `close_notify` and the TCP half-close, the
/// connection reads and drops whatever still arrives, until the client closes, nothing has come
/// for [`LINGER_QUIET`] (an idle client holds a shutdown no longer), or [`LINGER`] has passed.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    pub peer: PeerIdentity,
    /// Set once the TLS session is shut down.
    linger: Option<Linger>,
}

/// The deadlines of a lingering close: the whole of it, and the wait for the next bytes.
struct Linger {
    total: Pin<Box<tokio::time::Sleep>>,
    quiet: Pin<Box<tokio::time::Sleep>>,
}

impl TlsConnection {
    fn new(stream: tokio_rustls::server::TlsStream<TcpStream>, peer: PeerIdentity) -> Self {
        TlsConnection { stream, peer, linger: None }
    }
}

/// Reads and drops raw bytes from `tcp` (whose sending side is shut down) until the client
/// closes it, an error, or one of `linger`'s deadlines (set on the first call).
fn poll_linger(tcp: &mut TcpStream, linger: &mut Option<Linger>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
    use std::future::Future;
    let linger = linger.get_or_insert_with(|| Linger {
        total: Box::pin(tokio::time::sleep(LINGER)),
        quiet: Box::pin(tokio::time::sleep(LINGER_QUIET)),
    });
    let mut scratch = [0u8; 8192];
    loop {
        if linger.total.as_mut().poll(cx).is_ready() || linger.quiet.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *tcp).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                linger.quiet.as_mut().reset(tokio::time::Instant::now() + LINGER_QUIET);
            }
            // The client closed (or the socket failed): nothing more to wait for.
            Poll::Ready(_) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// A plain-text connection (`--insecure`) whose close lingers as a [`TlsConnection`]'s does.
pub struct PlainConnection {
    tcp: TcpStream,
    /// Set once the sending side is shut down.
    linger: Option<Linger>,
}

impl PlainConnection {
    pub fn new(tcp: TcpStream) -> Self {
        PlainConnection { tcp, linger: None }
    }
}

impl AsyncRead for PlainConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            std::task::ready!(Pin::new(&mut this.tcp).poll_shutdown(cx))?;
        }
        poll_linger(&mut this.tcp, &mut this.linger, cx)
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            // `close_notify`, then the TCP half-close.
            std::task::ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
        }
        poll_linger(this.stream.get_mut().0, &mut this.linger, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

/// Accepts connections on `listener` and completes their handshakes with the configuration in
/// force at the time, each in a task of its own bounded by [`HANDSHAKE_TIMEOUT`] (a client that
/// never finishes holds nothing but its own task). Established connections come out of the
/// returned channel until `stop`.
pub fn accept(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    mut stop: watch::Receiver<bool>,
) -> mpsc::Receiver<TlsConnection> {
    let (established, connections) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stopped(&mut stop) => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let established = established.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let certificate = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.clone().into_owned());
                        let _ =
                            established.send(TlsConnection::new(stream, PeerIdentity { remote, certificate })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    connections
}

/// Dials `addr` (`host:port`) and completes a TLS handshake as a member, checking the other
/// side's certificate against the cluster's CA and `addr`'s host.
pub async fn connect(tls: &ClientTls, addr: &str) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host =
        addr.rsplit_once(':').map(|(host, _)| host).unwrap_or(addr).trim_start_matches('[').trim_end_matches(']');
    let name =
        ServerName::try_from(host.to_string()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(tls.config()).connect(name, tcp).await
}
