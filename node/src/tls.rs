//! The node's certificates (made by `raftpg cert`): loading them and the TLS settings of the
//! node's server and of its connections to other nodes.
//!
//! Layout of `--tls-dir`: `ca.crt` (the cluster CA), `node-<id>.crt` and `node-<id>.key` (this
//! node's certificate, naming it in the URI SAN `raftpg://node/<id>`). The server presents the
//! node certificate and asks every caller for a certificate of the cluster CA — optional on
//! the client port, required on the peer port (`grpc::peer_auth` checks which node it names). Connections to peers present the node
//! certificate and accept only servers whose certificate the cluster CA signed.

use std::path::{Path, PathBuf};

use raftpg_proto::identity::{node_id_of, pem_to_der};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::command::NodeId;

/// Why the node's certificates cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The node certificate does not name this node.
    #[error(
        "{path} does not name node {id} (its URI SAN must be raftpg://node/{id}); make it with `raftpg cert node --id {id}`"
    )]
    WrongNode {
        /// The certificate file.
        path: PathBuf,
        /// This node's id.
        id: NodeId,
    },
}

/// This node's certificates, in PEM.
#[derive(Clone, Debug)]
pub struct NodeTls {
    ca: String,
    cert: String,
    key: String,
}

impl NodeTls {
    /// Loads node `id`'s certificates from `dir`, checking that the certificate names `id`.
    pub fn load(dir: &Path, id: NodeId) -> Result<Self, TlsError> {
        let read = |name: String| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
        };
        let tls = NodeTls {
            ca: read("ca.crt".into())?,
            cert: read(format!("node-{id}.crt"))?,
            key: read(format!("node-{id}.key"))?,
        };
        let named = pem_to_der(&tls.cert).and_then(|der| node_id_of(&der));
        if named != Some(id) {
            return Err(TlsError::WrongNode {
                path: dir.join(format!("node-{id}.crt")),
                id,
            });
        }
        Ok(tls)
    }

    /// The node's certificate and key, in PEM (the wire protocol's TLS presents them).
    pub fn cert_and_key(&self) -> (&str, &str) {
        (&self.cert, &self.key)
    }

    /// The client port's settings: present the node certificate; ask callers for a
    /// certificate of the cluster CA (clients may have none).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
    }

    /// The peer port's settings: present the node certificate; require a certificate of the
    /// cluster CA from every caller (which one is checked per request, `grpc::peer_auth`).
    pub fn peer_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// The settings of connections to other nodes: present the node certificate; accept only
    /// servers certified by the cluster CA.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
    }
}
