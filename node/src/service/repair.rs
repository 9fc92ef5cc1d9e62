//! Repairing a copy that differs from the majority's (issue 18).
//!
//! Owns the diverged marker (`<data-dir>/diverged`: the check's log index and the differences)
//! and the rebuild. A check on the leader names the members whose copy differs from the one a
//! majority of *all* members hold and tells them ([`Service::mark_diverged`]). Such a node
//! knows its copy is bad: it refuses reads (FAILED_PRECONDITION, SQLSTATE XX001) unless a read
//! asks for them anyway, and says so in its status, until it is rebuilt. [`Service::rebuild`]
//! re-seeds its database from a fresh snapshot of the leader while the cluster keeps serving:
//! the state machine is held (openraft applies nothing meanwhile), the leader streams a
//! snapshot covering at least this node's applied index, and it is installed exactly like a
//! snapshot the leader sends a new member (`apply::snapshot`: verify, publish, restore into a
//! fresh database, swap). Entries up to the snapshot are then skipped, later ones applied as
//! usual; the marker is removed.
//!
//! Invariant: a node with the marker answers no read that did not ask for a diverged copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::error::{ErrorKind, ServiceError};
use super::node::{Service, DIVERGED_MARKER};
use super::types::RebuildReport;
use crate::auth::authenticator::Principal;

/// How long a rebuild may take when the request does not say.
const REBUILD_WAIT_DEFAULT: Duration = Duration::from_secs(600);

/// The longest a request may ask for.
const REBUILD_WAIT_MAX: Duration = Duration::from_secs(3600);

/// The SQLSTATE of reads refused on a diverged node (PostgreSQL's `data_corrupted`).
pub const DIVERGED_SQLSTATE: &str = "XX001";

/// The wait of a rebuild request's `timeout_ms` (0: the default).
pub fn rebuild_wait(timeout_ms: u32) -> Duration {
    match timeout_ms {
        0 => REBUILD_WAIT_DEFAULT,
        ms => Duration::from_millis(ms.into()).min(REBUILD_WAIT_MAX),
    }
}

impl Service {
    /// Why a check found this node's copy different from the majority's, if it did.
    pub fn diverged(&self) -> Option<String> {
        self.diverged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Told by the leader that the check at `log_index` found this node's copy different:
    /// records it, and with `--auto-rebuild` starts a rebuild (unless this node leads).
    pub fn mark_diverged(
        self: &Arc<Self>,
        log_index: u64,
        differences: &[String],
    ) -> Result<(), ServiceError> {
        self.record_diverged(log_index, differences)?;
        if self.auto_rebuild && !self.is_leader() {
            let svc = self.clone();
            tokio::spawn(async move {
                info!(node = svc.id, "rebuilding automatically (--auto-rebuild)");
                if let Err(e) = svc.rebuild_self(REBUILD_WAIT_DEFAULT).await {
                    warn!(node = svc.id, error = %e.message, "the automatic rebuild failed; run raftpg member rebuild");
                }
            });
        }
        Ok(())
    }

    /// Records (durably) that the check at `log_index` found this node's copy different.
    pub(super) fn record_diverged(
        &self,
        log_index: u64,
        differences: &[String],
    ) -> Result<(), ServiceError> {
        let why = format!(
            "the check at log index {log_index} found: {}",
            differences.join("; ")
        );
        let path = self.data_dir.join(DIVERGED_MARKER);
        let write = || -> std::io::Result<()> {
            std::fs::write(&path, &why)?;
            std::fs::File::open(&path)?.sync_all()?;
            std::fs::File::open(&self.data_dir)?.sync_all()
        };
        write().map_err(|e| ServiceError::internal(format!("writing {}: {e}", path.display())))?;
        warn!(node = self.id, %why, "this node's copy differs from the majority's; it serves no reads until it is rebuilt (raftpg member rebuild)");
        *self.diverged.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        Ok(())
    }

    /// Refuses a read on a node whose copy is known to differ, unless the read asked for it.
    pub(super) fn refuse_if_diverged(&self, allow: bool) -> Result<(), ServiceError> {
        match self.diverged() {
            Some(why) if !allow => Err(ServiceError::refused(
                ErrorKind::FailedPrecondition,
                DIVERGED_SQLSTATE,
                format!(
                    "node {id}'s copy of the database differs from the majority's ({why}); it serves no reads until it is rebuilt with `raftpg member rebuild {id}`: read from another node, or ask for this copy anyway (allow_diverged)",
                    id = self.id
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Rebuilds this node's copy (`node_id` must be this node) from a fresh snapshot of the
    /// leader, waiting at most `wait`. See the module doc.
    pub async fn rebuild(
        &self,
        principal: Option<&Principal>,
        node_id: u64,
        wait: Duration,
    ) -> Result<RebuildReport, ServiceError> {
        self.require_admin(principal, "rebuild a node")?;
        if node_id != self.id {
            return Err(ServiceError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "this is node {}; send the rebuild of node {node_id} to that node",
                    self.id
                ),
            ));
        }
        self.rebuild_self(wait).await
    }

    /// [`Self::rebuild`] of this node, without the caller's checks.
    async fn rebuild_self(&self, wait: Duration) -> Result<RebuildReport, ServiceError> {
        self.refuse_if_removed()?;
        let Ok(_one) = self.rebuilding.try_lock() else {
            return Err(ServiceError::new(
                ErrorKind::FailedPrecondition,
                format!("node {} is already rebuilding", self.id),
            ));
        };
        if self.is_leader() {
            return Err(ServiceError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "node {id} leads the cluster; transfer the leadership to another member first (raftpg member transfer <id>), then rebuild node {id}",
                    id = self.id
                ),
            ));
        }
        let leader = self
            .leader()
            .filter(|l| !l.peer_addr.is_empty())
            .ok_or_else(|| ServiceError::unavailable("no leader to take a snapshot from", None))?;
        let started = Instant::now();
        let peers = self.peers.clone();
        let donor = leader.clone();
        let rebuilt = tokio::time::timeout(
            wait,
            self.rebuilder.rebuild(move |min_index, file| async move {
                peers
                    .fetch_snapshot(&donor.peer_addr, min_index, file, wait)
                    .await
                    .map_err(|e| {
                        format!("fetching a snapshot from node {}: {}", donor.id, e.message)
                    })
            }),
        )
        .await
        .map_err(|_| ServiceError::deadline(format!("the rebuild did not finish within {wait:?}")))?
        .map_err(|e| ServiceError::unavailable(format!("rebuild failed: {e}"), None))?;
        let path = self.data_dir.join(DIVERGED_MARKER);
        if path.exists() {
            std::fs::remove_file(&path)
                .map_err(|e| ServiceError::internal(format!("removing {}: {e}", path.display())))?;
        }
        *self.diverged.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let bytes = rebuilt
            .snapshot_id
            .rsplit('-')
            .next()
            .and_then(|b| b.parse().ok())
            .unwrap_or(0);
        let report = RebuildReport {
            node_id: self.id,
            donor_id: leader.id,
            log_index: rebuilt.last_log_id.map(|l| l.index).unwrap_or(0),
            bytes,
            duration: started.elapsed(),
        };
        info!(
            node = self.id,
            donor = leader.id,
            index = report.log_index,
            bytes,
            ms = report.duration.as_millis() as u64,
            "rebuilt from the leader's snapshot"
        );
        Ok(report)
    }

    /// A snapshot of this node covering at least `min_index` (for a node that rebuilds):
    /// waits until this node applied it, then uses the current snapshot or has openraft build
    /// a new one. Bounded by `wait`.
    pub async fn snapshot_covering(
        &self,
        min_index: u64,
        wait: Duration,
    ) -> Result<crate::apply::snapshot::Snapshot, ServiceError> {
        let deadline = tokio::time::Instant::now() + wait;
        self.raft
            .wait(Some(wait))
            .applied_index_at_least(Some(min_index), "snapshot for a rebuild")
            .await
            .map_err(|e| {
                ServiceError::deadline(format!(
                    "node {} did not apply index {min_index} in time: {e}",
                    self.id
                ))
            })?;
        let covers = |s: &Option<crate::apply::snapshot::Snapshot>| {
            s.as_ref()
                .and_then(|s| s.meta.last_log_id)
                .is_some_and(|l| l.index >= min_index)
        };
        let current = self.snapshots.current().await.map_err(|e| {
            ServiceError::unavailable(format!("reading the current snapshot: {e}"), None)
        })?;
        if covers(&current) {
            return current.ok_or_else(|| ServiceError::internal("snapshot vanished"));
        }
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ServiceError::unavailable(format!("raft stopped: {e}"), None))?;
        loop {
            let current = self.snapshots.current().await.map_err(|e| {
                ServiceError::unavailable(format!("reading the current snapshot: {e}"), None)
            })?;
            if covers(&current) {
                return current.ok_or_else(|| ServiceError::internal("snapshot vanished"));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ServiceError::deadline(format!(
                    "node {} built no snapshot covering index {min_index} within {wait:?}",
                    self.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
