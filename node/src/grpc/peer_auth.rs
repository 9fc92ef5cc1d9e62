//! Who may call what on which port.
//!
//! The peer port serves the `Peer` service (Raft's AppendEntries, Vote and InstallSnapshot,
//! StartElection, ReadIndex, Retire, TableChecksums, PublishAddress) and the public services
//! for requests other nodes forward. [`PeerPortGate`] admits a request there only from a
//! caller [`PeerAuth::caller`] accepts. The client port serves only the public services and
//! drops the forwarded mark ([`client_port_gate`]): only nodes may say a request was forwarded.
//!
//! [`PeerAuth::caller`]: with TLS on (`--tls-dir`), only a node certificate of
//! the cluster CA (TLS verified the chain) that names a current member
//! ([`Service::is_peer`]: in the membership last appended or last applied here, the leader
//! this node follows — a node catching up appends old memberships that may not hold its
//! leader —, or any node while this node has no membership yet and waits to be added) — and, for a message that
//! claims a sender (the leader of an AppendEntries or InstallSnapshot, the candidate of a
//! Vote, the node publishing its address), the node the certificate names. A removed node's
//! certificate is refused once its removal is applied. Without TLS every caller is accepted (`--tls-dir` not
//! given: plaintext, for trusted networks only).

use std::sync::Arc;

use raftpg_proto::identity::node_id_of;
use raftpg_proto::{FORWARDED_METADATA, PRINCIPAL_ADMIN_METADATA};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::command::NodeId;
use crate::service::Service;

/// Whether peer RPCs require a node certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerAuth {
    /// TLS is off: every caller is accepted.
    Open,
    /// TLS is on: see the module doc.
    NodeCertificate,
}

impl PeerAuth {
    /// The node calling a peer RPC (`None` when TLS is off), refused unless it holds a node
    /// certificate naming a current member (see the module doc).
    pub fn caller<T>(self, svc: &Service, req: &Request<T>) -> Result<Option<NodeId>, Status> {
        if self == PeerAuth::Open {
            return Ok(None);
        }
        let node = req
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| node_id_of(c.as_ref())))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "peer RPCs need a node certificate of this cluster's CA (raftpg cert node)",
                )
            })?;
        if !svc.is_peer(node) {
            return Err(Status::permission_denied(format!(
                "node {node} is not a member of this cluster"
            )));
        }
        Ok(Some(node))
    }
}

/// Refuses a message whose claimed sender is not the calling node (`caller` `None`: TLS off).
pub fn speaks_for(caller: Option<NodeId>, claimed: Option<NodeId>) -> Result<(), Status> {
    match (caller, claimed) {
        (Some(node), Some(claimed)) if node != claimed => Err(Status::permission_denied(format!(
            "the certificate of node {node} cannot speak for node {claimed}"
        ))),
        _ => Ok(()),
    }
}

/// The peer port's gate: every request needs a caller [`PeerAuth::caller`] accepts.
#[derive(Clone)]
pub struct PeerPortGate {
    svc: Arc<Service>,
    auth: PeerAuth,
}

impl PeerPortGate {
    /// The gate of `svc`'s peer port.
    pub fn new(svc: Arc<Service>, auth: PeerAuth) -> Self {
        PeerPortGate { svc, auth }
    }
}

/// Marks a request that came in through the peer port's gate: a member node sent it.
#[derive(Clone, Copy, Debug)]
pub struct FromPeer;

impl Interceptor for PeerPortGate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        self.auth.caller(&self.svc, &req)?;
        req.extensions_mut().insert(FromPeer);
        Ok(req)
    }
}

/// The client port's gate: drops the forwarded mark and the forwarded role, which only nodes
/// may set.
pub fn client_port_gate(mut req: Request<()>) -> Result<Request<()>, Status> {
    let meta = req.metadata_mut();
    meta.remove(FORWARDED_METADATA);
    raftpg_proto::metadata::remove(meta, raftpg_proto::metadata::PRINCIPAL);
    meta.remove(PRINCIPAL_ADMIN_METADATA);
    Ok(req)
}
