//! [`Service`]: the shared handles of a running node that every operation uses, its limits,
//! and the routing of requests to the leader ([`Service::route`]).
//!
//! Owns the removed marker (`<data-dir>/removed`): a removed node serves no reads or writes.

use openraft::async_runtime::WatchReceiver;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tokio::sync::{watch, Semaphore};
use tracing::warn;

use super::error::{LeaderHint, ServiceError};
use super::peers::PeerLink;
use super::types::{Origin, PgIdentity};
use crate::apply::snapshot::SnapshotStore;
use crate::apply::state_machine::Raft;
use crate::apply::state_machine::TxnRunner;
use crate::apply::state_machine::{ApplierStatus, Rebuilder};
use crate::auth::authenticator::Authenticator;
use crate::command::{NodeAddr, NodeId};
use crate::pg::read_pool::ReadPool;
use crate::pg::supervisor::PgHealth;
use crate::raft::proposer::Proposer;
use crate::raft::read_index::{ReadIndexBatcher, Rounds};
use crate::sql::gate::PreparedWrites;

/// Limits the services enforce on requests.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request in bytes.
    pub request_bytes_max: usize,
    /// Most statements per write.
    pub statements_max: usize,
    /// Most rows a read returns.
    pub read_rows_max: usize,
    /// Most rows a streamed read returns.
    pub read_stream_rows_max: usize,
    /// Longest wait of a read for its consistency level.
    pub read_wait_max: Duration,
    /// Longest wait of a write for commit and apply.
    pub write_timeout: Duration,
}

/// Limits of interactive transactions.
#[derive(Clone, Debug)]
pub struct TxnLimits {
    /// Longest a transaction may wait for the client between two statements.
    pub idle_max: Duration,
    /// Longest a transaction may hold the writer, from `BEGIN` to `COMMIT`.
    pub time_max: Duration,
    /// Most steps (statements and savepoint commands) in one transaction.
    pub steps_max: usize,
    /// Most bytes of steps in one transaction, as its log entry encodes them.
    pub bytes_max: usize,
}

impl Default for TxnLimits {
    fn default() -> Self {
        TxnLimits {
            idle_max: Duration::from_secs(5),
            time_max: Duration::from_secs(30),
            steps_max: 10_000,
            bytes_max: 32 * 1024 * 1024,
        }
    }
}

/// Where a request that must run on the leader runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node leads: run it here.
    Here,
    /// Forward it to this leader.
    Leader(LeaderHint),
}

/// What a [`Service`] is built from.
pub struct ServiceParts {
    /// This node's id.
    pub id: NodeId,
    /// The Raft core.
    pub raft: Raft,
    /// Request limits.
    pub limits: Limits,
    /// Read connections.
    pub reads: Arc<ReadPool>,
    /// PostgreSQL health (embedded mode: from the supervisor).
    pub pg_health: watch::Receiver<PgHealth>,
    /// What the applier is doing.
    pub applier: Arc<ApplierStatus>,
    /// Most writes in flight on this node.
    pub write_inflight_max: usize,
    /// Groups this node's writes into Raft entries (when it leads).
    pub proposer: Proposer,
    /// How this node reaches the others.
    pub peers: Arc<dyn PeerLink>,
    /// Self-test only (hidden flag): LINEARIZABLE reads skip the read index.
    pub unsafe_local_linearizable_reads: bool,
    /// This node's data directory (holds the removed marker).
    pub data_dir: PathBuf,
    /// The node runs without TLS (`--insecure`), reported in its status.
    pub insecure: bool,
    /// This node's advertised client and peer addresses.
    pub addrs: NodeAddr,
    /// Checks credentials against this node's roles.
    pub authenticator: Authenticator,
    /// Refuse requests without credentials (see `service::auth`).
    pub auth_required: bool,
    /// This node's snapshots (a donor streams one to a node that rebuilds).
    pub snapshots: SnapshotStore,
    /// Rebuilds this node's copy from a donor's snapshot (see `service::repair`).
    pub rebuilder: Rebuilder,
    /// Rebuild as soon as a check finds this node's copy different.
    pub auto_rebuild: bool,
    /// Runs interactive transactions on the applier session (`None`: this node runs none).
    pub txns: Option<TxnRunner>,
    /// Limits of interactive transactions.
    pub txn_limits: TxnLimits,
}

/// A node's services: the shared handles every operation uses. See the module doc.
pub struct Service {
    pub(super) id: NodeId,
    pub(super) raft: Raft,
    pub(super) limits: Limits,
    pub(super) reads: Arc<ReadPool>,
    pub(super) pg_health: watch::Receiver<PgHealth>,
    pub(super) applier: Arc<ApplierStatus>,
    /// Bounds writes in flight on this node.
    pub(super) write_permits: Arc<Semaphore>,
    pub(super) proposer: Proposer,
    /// Coalesced leadership confirmations for linearizable reads.
    pub(super) read_index: Arc<ReadIndexBatcher>,
    /// On a follower: requests to the leader for a read index, coalesced.
    pub(super) leader_read_index: Arc<Rounds<u64, ServiceError>>,
    pub(super) peers: Arc<dyn PeerLink>,
    pub(super) unsafe_local_linearizable_reads: bool,
    pub(super) data_dir: PathBuf,
    /// The node runs without TLS (`--insecure`).
    pub(super) insecure: bool,
    /// This node's advertised client and peer addresses.
    pub(super) addrs: NodeAddr,
    pub(super) authenticator: Authenticator,
    /// Refuse requests without credentials.
    pub(super) auth_required: bool,
    /// Set when the cluster removed this node: it serves no more reads or writes.
    pub(super) removed: AtomicBool,
    /// Why a check found this node's copy different from the majority's (see
    /// `service::repair`, which owns it and its marker file).
    pub(super) diverged: std::sync::Mutex<Option<String>>,
    pub(super) snapshots: SnapshotStore,
    pub(super) rebuilder: Rebuilder,
    /// One rebuild at a time.
    pub(super) rebuilding: tokio::sync::Mutex<()>,
    /// Rebuild as soon as a check finds this node's copy different.
    pub(super) auto_rebuild: bool,
    /// Memo of the leader-side SQL check and rewrite.
    pub(super) prepared_writes: PreparedWrites,
    /// PostgreSQL version, encoding and collation (read once).
    pub(super) pg_identity: tokio::sync::OnceCell<PgIdentity>,
    /// Runs interactive transactions (see `service::txn`).
    pub(super) txns: Option<TxnRunner>,
    pub(super) txn_limits: TxnLimits,
}

/// The file in the data directory that marks a removed node.
const REMOVED_MARKER: &str = "removed";

/// The file in the data directory that marks a node whose copy differs (see
/// `service::repair`).
pub(super) const DIVERGED_MARKER: &str = "diverged";

impl Service {
    /// Builds the services of a node; a node removed earlier (its marker exists) stays removed.
    pub fn new(parts: ServiceParts) -> Arc<Self> {
        let removed = parts.data_dir.join(REMOVED_MARKER).exists();
        // Written and removed by service::repair.
        let diverged = std::fs::read_to_string(parts.data_dir.join(DIVERGED_MARKER)).ok();
        Arc::new(Service {
            id: parts.id,
            raft: parts.raft,
            limits: parts.limits,
            reads: parts.reads,
            pg_health: parts.pg_health,
            applier: parts.applier,
            write_permits: Arc::new(Semaphore::new(parts.write_inflight_max.max(1))),
            proposer: parts.proposer,
            read_index: Default::default(),
            leader_read_index: Default::default(),
            peers: parts.peers,
            unsafe_local_linearizable_reads: parts.unsafe_local_linearizable_reads,
            data_dir: parts.data_dir,
            insecure: parts.insecure,
            addrs: parts.addrs,
            authenticator: parts.authenticator,
            auth_required: parts.auth_required,
            removed: AtomicBool::new(removed),
            diverged: std::sync::Mutex::new(diverged),
            snapshots: parts.snapshots,
            rebuilder: parts.rebuilder,
            rebuilding: Default::default(),
            auto_rebuild: parts.auto_rebuild,
            prepared_writes: Default::default(),
            pg_identity: tokio::sync::OnceCell::new(),
            txns: parts.txns,
            txn_limits: parts.txn_limits,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The Raft core (for the Raft transport's receiving side).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The membership as openraft last reported it (the last one appended to the log).
    pub fn membership_config(&self) -> std::sync::Arc<crate::command::StoredMembership> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone()
    }

    /// Hands a chunk of a snapshot the leader sends to Raft, noting how far the transfer is
    /// (status shows it).
    pub async fn install_snapshot_chunk(
        &self,
        chunk: crate::raft::network::SnapshotChunk,
        data: &[u8],
    ) -> Result<
        openraft::raft::SnapshotResponse<crate::command::TypeConfig>,
        crate::raft::network::RemoteSnapshotError,
    > {
        let err = |e: String| crate::raft::network::RemoteSnapshotError(e);
        // A leader behind this node's vote is told so and stops sending.
        let mine = self.raft.metrics().borrow_watched().vote;
        if mine > chunk.vote {
            return Ok(openraft::raft::SnapshotResponse::new(mine));
        }
        let id = chunk.meta.snapshot_id.clone();
        let received = self
            .snapshots
            .receive(&id, chunk.offset, data, chunk.done)
            .await
            .map_err(|e| err(e.to_string()))?;
        let Some(file) = received else {
            return Ok(openraft::raft::SnapshotResponse::new(chunk.vote));
        };
        let snapshot = crate::apply::snapshot::Snapshot {
            meta: chunk.meta.openraft(),
            snapshot: crate::apply::snapshot::SnapshotFile { id, file },
        };
        self.raft
            .install_full_snapshot(chunk.vote, snapshot)
            .await
            .map_err(|e| err(e.to_string()))
    }

    /// The request limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The current term (for request spans).
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow_watched().current_term
    }

    /// The current leader, if known.
    pub fn leader(&self) -> Option<LeaderHint> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some(LeaderHint {
            id,
            addr: node.client.clone(),
            peer_addr: node.peer.clone(),
        })
    }

    /// Whether node `node` may talk to this one as a peer: while this node has no membership
    /// yet (it waits to be added), any node; then a node of the effective membership (the last
    /// in the log) or of the last membership applied here — a node being removed stays a peer
    /// until its removal is applied, so the outgoing leader can finish the change — and the
    /// leader this node currently follows.
    pub fn is_peer(&self, node: NodeId) -> bool {
        {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            let membership = m.membership_config.membership();
            // The leader this node follows is accepted too: a node catching up appends old
            // entries first, and the membership of the last one it appended may be one the
            // leader was not in then (removed and added again since). Refusing the leader there
            // stranded the node for good (seen in the jepsen membership run; test:
            // membership.rs, a_node_catching_up_from_the_log_follows_a_leader_its_old_entries_
            // exclude). It was accepted as leader by this rule to begin with, and stops being
            // followed when a new leader is elected.
            if membership.nodes().next().is_none()
                || membership.get_node(&node).is_some()
                || m.current_leader == Some(node)
            {
                return true;
            }
        }
        self.applier.applied_members().contains(&node)
    }

    /// Whether this node currently leads.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// Waits (at most `wait_max`) until some node is known to lead.
    pub async fn wait_for_leader(&self, wait_max: Duration) -> Option<LeaderHint> {
        let deadline = tokio::time::Instant::now() + wait_max;
        let mut rx = self.raft.metrics();
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Where a request that must run on the leader runs: here when this node leads; else on
    /// the leader, once one is known (waiting at most `wait`). A forwarded request is refused
    /// rather than forwarded again. A removed node routes nothing (its certificate no longer
    /// opens the members' peer ports): it answers UNAVAILABLE, so clients go elsewhere.
    pub async fn route(&self, origin: Origin, wait: Duration) -> Result<Route, ServiceError> {
        self.refuse_if_removed()?;
        if self.is_leader() {
            return Ok(Route::Here);
        }
        if origin == Origin::Forwarded {
            return Err(ServiceError::unavailable(
                "this node is not the leader",
                self.leader(),
            ));
        }
        match self.wait_for_leader(wait).await {
            None => Err(ServiceError::unavailable(
                "no leader is known (election in progress or no quorum); retry",
                None,
            )),
            Some(l) if l.id == self.id => Ok(Route::Here),
            Some(l) => Ok(Route::Leader(l)),
        }
    }

    /// A leader hint naming another node (for refusals that send the client elsewhere).
    fn other_leader(&self) -> Option<LeaderHint> {
        self.leader().filter(|l| l.id != self.id)
    }

    /// Whether the cluster removed this node.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// Refuses reads and writes on a removed node.
    pub fn refuse_if_removed(&self) -> Result<(), ServiceError> {
        if self.is_removed() {
            // Unavailable: nothing was done, and clients should use another node.
            return Err(ServiceError::unavailable(
                format!(
                    "node {} was removed from the cluster and no longer serves reads, writes or cluster changes; use another node",
                    self.id
                ),
                self.other_leader(),
            ));
        }
        Ok(())
    }

    /// Marks this node removed (persistently) and stops it from starting elections.
    pub fn retire(&self, log_index: u64) {
        self.removed.store(true, Ordering::Relaxed);
        if let Err(e) = std::fs::write(
            self.data_dir.join(REMOVED_MARKER),
            format!("removed at log index {log_index}\n"),
        ) {
            warn!(error = %e, "cannot persist the removed marker");
        }
        self.raft.runtime_config().elect(false);
        self.raft.runtime_config().heartbeat(false);
        warn!(
            node = self.id,
            log_index, "this node was removed from the cluster; it stops serving"
        );
    }
}
