//! A node's view of the cluster (role, term, leader, log positions, members and their
//! replication progress) and of its own health (PostgreSQL, applier), and the PostgreSQL
//! identity every member must share.

use openraft::async_runtime::WatchReceiver;
use std::time::Duration;

use openraft::ServerState;

use super::error::{ErrorKind, ServiceError};
use super::membership::members;
use super::node::Service;
use super::types::{Health, NodeStatus, PgIdentity};
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
            .with_raft_state(|st| st.local_committed().map(|l| l.index))
            .await
            .map_err(|e| ServiceError::unavailable(format!("raft stopped: {e}"), None))?;
        let m = self.raft.metrics().borrow_watched().clone();
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
            snapshot_progress: self
                .snapshots
                .progress()
                .map(|p| p.describe())
                .unwrap_or_default(),
        })
    }

    /// Sets the state gauges of the node's metrics (`metrics`) from its current status:
    /// term, role, log positions, per-peer lag on the leader, PostgreSQL health, divergence.
    pub fn observe_metrics(&self) {
        let m = crate::metrics::get();
        let raft = self.raft.metrics().borrow_watched().clone();
        m.term.set(raft.current_term as i64);
        for (role, state) in [
            ("leader", ServerState::Leader),
            ("follower", ServerState::Follower),
            ("candidate", ServerState::Candidate),
            ("learner", ServerState::Learner),
            ("shutdown", ServerState::Shutdown),
        ] {
            m.role
                .with_label_values(&[role])
                .set(i64::from(raft.state == state));
        }
        let index = |l: Option<u64>| l.unwrap_or(0) as i64;
        let last = index(raft.last_log_index);
        for (position, value) in [
            ("last", last),
            ("applied", index(raft.last_applied.map(|l| l.index))),
            ("snapshot", index(raft.snapshot.map(|l| l.index))),
            ("purged", index(raft.purged.map(|l| l.index))),
        ] {
            m.log_index.with_label_values(&[position]).set(value);
        }
        m.peer_matched_index.reset();
        m.peer_lag.reset();
        if let Some(replication) = &raft.replication {
            for (peer, matched) in replication {
                let matched = index(matched.map(|l| l.index));
                let peer = peer.to_string();
                m.peer_matched_index
                    .with_label_values(&[&peer])
                    .set(matched);
                m.peer_lag
                    .with_label_values(&[&peer])
                    .set((last - matched).max(0));
            }
        }
        m.postgres_up
            .set(i64::from(*self.pg_health.borrow() == PgHealth::Up));
        m.diverged.set(i64::from(self.diverged().is_some()));
        m.fast_runs_abandoned
            .set(self.applier.fast_runs_abandoned() as i64);
        let snapshots = self.data_dir.join("snapshots");
        m.disk_bytes
            .with_label_values(&["log"])
            .set(dir_bytes(&self.data_dir.join("raft-log")) as i64);
        m.disk_bytes
            .with_label_values(&["snapshots"])
            .set(dir_bytes(&snapshots) as i64);
        let current = std::fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("snap-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0);
        m.snapshot_bytes.set(current as i64);
    }

    /// Counts leader changes into the node's metrics until shutdown.
    pub async fn count_leader_changes(
        self: std::sync::Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut rx = self.raft.metrics();
        let mut leader = rx.borrow_watched().current_leader;
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
            let now = rx.borrow_watched().current_leader;
            if now != leader {
                if now.is_some() {
                    crate::metrics::get().leader_changes.inc();
                }
                leader = now;
            }
        }
    }

    /// What a load balancer or an orchestrator asks (the HTTP frontend's `/health`, `/ready`,
    /// `/leader`; the gRPC health service): whether the node lives (its PostgreSQL is up and
    /// it was not removed), is ready to serve (also: it applies the log, knows a leader, is a
    /// member, and its copy is not known to differ), and leads. Each with the reason when not.
    pub fn health(&self) -> Health {
        let raft = self.raft.metrics().borrow_watched().clone();
        let pg_up = *self.pg_health.borrow() == PgHealth::Up;
        let live = if self.is_removed() {
            Err("removed from the cluster".to_string())
        } else if !pg_up {
            Err(format!("PostgreSQL is {:?}", *self.pg_health.borrow()))
        } else {
            Ok(())
        };
        let applier = self.applier.get();
        let member = raft
            .membership_config
            .membership()
            .get_node(&self.id)
            .is_some();
        let ready = live.clone().and_then(|()| {
            if applier != "applying" {
                Err(format!("applier: {applier}"))
            } else if raft.current_leader.is_none() {
                Err("no leader known".to_string())
            } else if !member {
                Err("not a member".to_string())
            } else if let Some(why) = self.diverged() {
                Err(format!("copy differs from the majority's: {why}"))
            } else {
                Ok(())
            }
        });
        let leader = ready.clone().and_then(|()| {
            if self.is_leader() {
                Ok(())
            } else {
                Err(format!(
                    "not the leader (the leader is node {})",
                    raft.current_leader.unwrap_or(0)
                ))
            }
        });
        Health {
            live,
            ready,
            leader,
        }
    }

    /// Another member's status, asked of it.
    async fn peer_status(&self, node_id: NodeId) -> Result<NodeStatus, ServiceError> {
        let addr = {
            let m = self.raft.metrics().borrow_watched().clone();
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
                    .base_client()
                .await
                .map_err(|e| ServiceError::unavailable(format!("PostgreSQL: {e}"), None))?
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

/// Bytes in the files of `dir` (one level: the log store's and the snapshot store's
/// directories are flat).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
