//! A node's view of the cluster (role, term, leader, log positions, members and their
//! replication progress) and of its own health (PostgreSQL, applier), and the PostgreSQL
//! identity every member must share.

use std::time::Duration;

use openraft::ServerState;

use super::error::{ErrorKind, ServiceError};
use super::membership::members;
use super::node::Service;
use super::types::{NodeStatus, PgIdentity};
use crate::auth::authenticator::Principal;
use crate::command::NodeId;
use crate::pg::supervisor::PgHealth;

/// Longest wait for another node's status.
const PEER_STATUS_WAIT: Duration = Duration::from_secs(2);

impl Service {
    /// The status of node `node_id` (0 or this node's id: this node; another member: asked,
    /// which needs an administrator).
    pub async fn status(
        &self,
        principal: Option<&Principal>,
        node_id: NodeId,
    ) -> Result<NodeStatus, ServiceError> {
        if node_id != 0 && node_id != self.id {
            self.require_admin(principal, "ask for another node's status")?;
            return self.peer_status(node_id).await;
        }
        let committed = self
            .raft
            .with_raft_state(|st| st.committed.map(|l| l.index))
            .await
            .map_err(|e| ServiceError::unavailable(format!("raft stopped: {e}"), None))?;
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let leader_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.client.clone()))
            .unwrap_or_default();
        let health = self.pg_health.borrow().clone();
        Ok(NodeStatus {
            node_id: self.id,
            role: role.into(),
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: committed.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            members: members(self),
            postgres_up: health == PgHealth::Up,
            applier_state: match health {
                PgHealth::Up => self.applier.get(),
                other => format!("postgres {other:?}; applier: {}", self.applier.get()),
            },
            identity: self.pg_identity().await.unwrap_or_default(),
            removed: self.is_removed(),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            insecure: self.insecure,
            client_addr: self.addrs.client.clone(),
            peer_addr: self.addrs.peer.clone(),
            diverged: self.diverged().unwrap_or_default(),
        })
    }

    /// Another member's status, asked of it.
    async fn peer_status(&self, node_id: NodeId) -> Result<NodeStatus, ServiceError> {
        let addr = {
            let m = self.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            match membership.get_node(&node_id) {
                Some(node) => node.peer.clone(),
                None => {
                    let ids: Vec<String> =
                        membership.nodes().map(|(id, _)| id.to_string()).collect();
                    return Err(ServiceError::new(
                        ErrorKind::NotFound,
                        format!(
                            "node {node_id} is not a member of this cluster (members: {})",
                            ids.join(", ")
                        ),
                    ));
                }
            }
        };
        self.peers
            .status(&addr, node_id, PEER_STATUS_WAIT)
            .await
            .map_err(|e| {
                ServiceError::unavailable(
                    format!("node {node_id} at {addr} did not answer: {}", e.message),
                    None,
                )
            })
    }

    /// This node's PostgreSQL version, encoding and collation (read once).
    pub async fn pg_identity(&self) -> Result<PgIdentity, ServiceError> {
        self.pg_identity
            .get_or_try_init(|| async {
                let mut pooled = self
                    .reads
                    .get()
                    .await
                    .map_err(|e| ServiceError::unavailable(e.to_string(), None))?;
                let row = pooled
                    .client()
                    .query_one(
                        "SELECT current_setting('server_version_num'), pg_encoding_to_char(encoding), datcollate
                         FROM pg_database WHERE datname = current_database()",
                        &[],
                    )
                    .await
                    .map_err(|e| {
                        ServiceError::unavailable(format!("reading PostgreSQL's identity: {e}"), None)
                    })?;
                Ok(PgIdentity {
                    version: row.get(0),
                    encoding: row.get(1),
                    collation: row.get(2),
                })
            })
            .await
            .cloned()
    }
}
