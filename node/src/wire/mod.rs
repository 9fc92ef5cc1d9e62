//! The PostgreSQL wire protocol frontend (`--pg-listen`): psql, pgbench, libpq, JDBC,
//! psycopg, tokio-postgres and every other PostgreSQL client connect to any node unchanged.
//!
//! A thin adapter over the service layer, like `grpc`: writes go through
//! [`Service::write`] (routed to the leader, one log entry per query string or `Execute`),
//! queries through [`Service::admit_read`] at the session's read consistency, descriptions
//! through [`Service::describe`]. pgwire supplies the message codec, TLS negotiation and the
//! SCRAM exchange; raftpg's own session logic drives them.
//!
//! - [`connection`]: TLS, startup, authentication, the message loop.
//! - [`stream`]: a connection's message stream and its message size limit.
//! - [`session`]: simple and extended query protocols over the service.
//! - [`statement`]: splitting and classifying statements; command tags.
//! - [`copy`]: `COPY … FROM STDIN` options and rows.
//! - [`settings`]: what a session may `SET` and what it reports.
//! - [`values`]: text and binary forms of values.
//! - [`error`]: service errors as PostgreSQL error responses.
//! - [`cancel`]: cancel requests.
//!
//! This module owns the listener and its connection limit: a connection beyond
//! `connections_max` is answered `53300 too many connections` and closed.

pub mod cancel;
pub mod connection;
pub mod copy;
pub mod error;
pub mod session;
pub mod settings;
pub mod statement;
pub mod stream;
pub mod values;

use std::sync::Arc;

use pgwire::api::auth::sasl::scram::ScramServerAuth;
use pgwire::messages::PgWireBackendMessage as B;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::service::Service;

/// The listener's settings.
pub struct WireConfig {
    /// TLS (`None`: plaintext only, an `--insecure` node).
    pub tls: Option<pgwire::tokio::TlsAcceptor>,
    /// The SCRAM exchange over TLS (with channel binding to the node's certificate when it
    /// could be set up).
    pub scram_tls: ScramServerAuth,
    /// Most connections at once.
    pub connections_max: usize,
    /// Largest message a client may send, in bytes.
    pub message_bytes_max: usize,
    /// What the node reports as `server_version`.
    pub server_version: String,
}

impl WireConfig {
    /// The settings of a node with this TLS material (PEM of the node's certificate and key;
    /// `None`: `--insecure`).
    pub fn new(
        tls_pem: Option<(&str, &str)>,
        connections_max: usize,
        message_bytes_max: usize,
        server_version: String,
    ) -> anyhow::Result<Self> {
        let mut scram_tls = ScramServerAuth::new();
        let tls = match tls_pem {
            None => None,
            Some((cert, key)) => {
                if let Err(e) = scram_tls.configure_certificate(cert.as_bytes()) {
                    warn!(error = %e, "SCRAM channel binding is off: the node certificate's signature algorithm is not supported");
                }
                Some(acceptor(cert, key)?)
            }
        };
        Ok(WireConfig {
            tls,
            scram_tls,
            connections_max,
            message_bytes_max,
            server_version,
        })
    }
}

/// A TLS acceptor presenting the node's certificate (clients verify it with the cluster CA:
/// `sslmode=verify-full sslrootcert=ca.crt`).
fn acceptor(cert_pem: &str, key_pem: &str) -> anyhow::Result<pgwire::tokio::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("node certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("node key: {e}"))?;
    // ring, the provider tonic's TLS uses on this node (post-quantum key exchange would need
    // aws-lc-rs, which raftpg does not build).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(pgwire::tokio::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections on `listener` until shutdown.
pub async fn serve(
    svc: Arc<Service>,
    listener: TcpListener,
    cfg: Arc<WireConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(cfg.connections_max.max(1)));
    let registry = Arc::new(cancel::Registry::default());
    info!(addr = ?listener.local_addr().ok(), tls = cfg.tls.is_some(), "serving the PostgreSQL wire protocol");
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                warn!(error = %e, "accepting a wire connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(?peer, "too many wire connections");
            tokio::spawn(refuse_busy(tcp, cfg.connections_max));
            continue;
        };
        let (svc, cfg, registry) = (svc.clone(), cfg.clone(), registry.clone());
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = connection::serve(svc, cfg, registry, tcp) => {
                    if let Err(e) = r {
                        debug!(?peer, error = %e, "wire connection ended");
                    }
                }
                _ = stop.changed() => {}
            }
            drop(permit);
        });
    }
}

/// Tells a client over the connection limit so (as PostgreSQL does) and closes.
async fn refuse_busy(mut tcp: tokio::net::TcpStream, max: usize) {
    let msg = B::ErrorResponse(error::fatal(
        "53300",
        format!("sorry, too many clients already (this node accepts {max} wire connections)"),
    ));
    let mut buf = bytes::BytesMut::new();
    if msg.encode(&mut buf).is_ok() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), tcp.write_all(&buf)).await;
    }
}
