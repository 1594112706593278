//! A node's two ports as its configuration asks: HTTPS for REST and mutual TLS between members
//! (both reloaded from their files without a restart), or plain text with `--insecure`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use runtimeai_api::auth::ClientCertificate;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use runtimeai_raft::limits;
use runtimeai_raft::service::{ClusterService, PeerCheck, RaftService};
use runtimeai_raft::tls::{self, ClientTls, Reload, ServerTls};
use runtimeai_raft::Replica;

use crate::config::NodeConfig;
use crate::http::{self, HttpLimits};

/// The TLS configurations this node serves and dials with.
#[derive(Clone, Default)]
pub struct Transport {
    pub rest: Option<Arc<ServerTls>>,
    pub peer_server: Option<Arc<ServerTls>>,
    pub peer_client: Option<Arc<ClientTls>>,
}

impl Transport {
    /// Reads the certificates the configuration names (a bad file refuses the start).
    pub fn load(config: &NodeConfig) -> anyhow::Result<Transport> {
        let rest = match &config.rest_tls {
            None => None,
            Some(files) => Some(tls::rest_server(files.clone()).context("cannot set up HTTPS (--tls-*)")?),
        };
        let (peer_server, peer_client) = match &config.peer_tls {
            None => (None, None),
            Some(files) => (
                Some(tls::peer_server(files.clone()).context("cannot set up peer TLS (--peer-*)")?),
                Some(tls::client(files.clone()).context("cannot set up peer TLS (--peer-*)")?),
            ),
        };
        if rest.is_none() || peer_server.is_none() {
            tracing::warn!(
                rest_tls = rest.is_some(),
                peer_tls = peer_server.is_some(),
                "--insecure: a port runs in plain text; whoever reaches it can read it, and the gRPC port believes \
                 whoever calls it. Use only on a trusted test network"
            );
        }
        Ok(Transport { rest, peer_server, peer_client })
    }

    /// Reloads the certificates (and the OIDC keys) when their files change or on SIGHUP,
    /// until `stop`.
    pub fn watch(&self, oidc: Option<Arc<runtimeai_api::oidc::Oidc>>, stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let mut configs: Vec<Arc<dyn Reload>> = Vec::new();
        if let Some(oidc) = oidc {
            configs.push(oidc);
        }
        if let Some(rest) = &self.rest {
            configs.push(rest.clone());
        }
        if let (Some(server), Some(client)) = (&self.peer_server, &self.peer_client) {
            configs.push(server.clone());
            configs.push(client.clone());
        }
        tokio::spawn(tls::watch(configs, stop))
    }

    /// Serves the raft and cluster services on `listener` until `stopped`.
    pub fn serve_peers(
        &self,
        listener: TcpListener,
        replica: Arc<Replica>,
        stop: watch::Receiver<bool>,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<Result<(), tonic::transport::Error>> {
        let check = if self.peer_server.is_some() { PeerCheck::MutualTls } else { PeerCheck::Trusting };
        let router = tonic::transport::Server::builder()
            // What a peer may send before this node acknowledges it: a whole AppendEntries
            // (2 MiB) or snapshot chunk (3 MiB) at once, where HTTP/2's window (hyper's 1 MiB
            // per stream and per connection) made the sender wait for window updates midway.
            .initial_stream_window_size(limits::PEER_STREAM_WINDOW)
            .initial_connection_window_size(limits::PEER_CONNECTION_WINDOW)
            .add_service(RaftService::new(replica.clone(), check))
            .add_service(ClusterService::new(replica, check));
        match &self.peer_server {
            Some(server) => {
                let connections = tls::accept(listener, server.clone(), stop);
                let incoming = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::ReceiverStream::new(connections),
                    Ok::<_, std::io::Error>,
                );
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
            None => {
                // Small raft messages and replies must leave at once: with Nagle's algorithm on,
                // a reply waits for the peer's delayed ACK (40 ms) and so does every commit.
                let incoming =
                    tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |stream| {
                        if let Ok(stream) = &stream {
                            let _ = stream.set_nodelay(true);
                        }
                        stream
                    });
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
            }
        }
    }

    /// Serves the REST API on `listener` until `stop`, within `limits`.
    pub fn serve_rest(
        &self,
        listener: TcpListener,
        app: axum::Router,
        limits: HttpLimits,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        // Connections still open at shutdown get this long to finish their requests.
        let drain = Duration::from_secs(4);
        match &self.rest {
            Some(server) => {
                let connections = tls::accept(listener, server.clone(), stop.clone());
                // Each request learns the client certificate of its connection, if any.
                let incoming = tokio_stream::wrappers::ReceiverStream::new(connections).map(|connection| {
                    let (remote, certificate) = (connection.peer.remote, connection.peer.certificate.clone());
                    (connection, remote, ClientCertificate(certificate))
                });
                tokio::spawn(http::serve(incoming, app, limits, stop, drain))
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(|accepted| async {
                    match accepted {
                        Ok(tcp) => {
                            let _ = tcp.set_nodelay(true);
                            let remote = tcp.peer_addr().ok()?;
                            Some((tls::PlainConnection::new(tcp), remote, ClientCertificate(None)))
                        }
                        Err(e) => {
                            // Out of file descriptors and the like: back off instead of spinning.
                            tracing::warn!(error = %e, "cannot accept a connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            None
                        }
                    }
                });
                tokio::spawn(http::serve(Box::pin(incoming), app, limits, stop, drain))
            }
        }
    }
}
