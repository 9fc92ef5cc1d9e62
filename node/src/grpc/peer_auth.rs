//! Who may call the peer RPCs (Raft's AppendEntries, Vote and InstallSnapshot, StartElection,
//! ReadIndex, Retire, TableChecksums): with TLS on (`--tls-dir`), only a node certificate of
//! the cluster CA (TLS verified the chain) that names a current member — or any node while
//! this node has no membership yet (it waits to be added) — and, for a message that claims a
//! sender (the leader of an AppendEntries or InstallSnapshot, the candidate of a Vote), the
//! node the certificate names. A removed node's certificate names a node that is no longer a
//! member and is refused from then on. Without TLS every caller is accepted (`--tls-dir` not
//! given: plaintext, for trusted networks only).

use raftpg_proto::identity::node_id_of;
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
        let is_member = {
            let m = svc.raft().metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let no_membership_yet = membership.nodes().next().is_none();
            no_membership_yet || membership.get_node(&node).is_some()
        };
        if !is_member {
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
