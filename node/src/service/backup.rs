//! Backups (issue 19): a consistent copy of the user database at a known log index, taken from
//! this node.
//!
//! Owns the recipe, not a file: [`Service::backup`] finds the cluster's commit index (a read
//! index confirmed by the leader's quorum, as for a linearizable read), waits until this node
//! applied it, and hands out this node's snapshot covering it (`apply::snapshot`: a `pg_dump`
//! archive made inside one `REPEATABLE READ` transaction, so the copy is exactly the database
//! after the entry at its log index). Building that snapshot is also log compaction, so a
//! backup costs no more than the snapshot openraft would take anyway. The frontend streams the
//! archive with a SHA-256; the file format is `raftpg_proto::backup`.
//!
//! Invariants: a backup holds every write acknowledged before it was asked for (its index is at
//! least the commit index at that moment); a node whose copy was found to differ from the
//! majority's gives no backup.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use raftpg_proto::backup::{BackupHeader, FORMAT};
use tracing::info;

use super::error::{ErrorKind, ServiceError};
use super::node::Service;
use crate::auth::authenticator::Principal;

/// A backup ready to stream: its header (without the checksum, computed while streaming) and
/// the archive, positioned at its start.
pub struct BackupSource {
    /// What the copy holds; `sha256` empty.
    pub header: BackupHeader,
    /// The `pg_dump` archive (this node's snapshot file).
    pub archive: tokio::fs::File,
}

impl Service {
    /// A copy of the user database covering every write committed when this was called, from
    /// this node, preparing it within `wait`. Administrators only.
    pub async fn backup(
        &self,
        principal: Option<&Principal>,
        wait: Duration,
    ) -> Result<BackupSource, ServiceError> {
        self.require_admin(principal, "take a backup")?;
        self.refuse_if_removed()?;
        if let Some(why) = self.diverged() {
            return Err(ServiceError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "node {}'s copy differs from the majority's ({why}); take the backup from another node",
                    self.id
                ),
            ));
        }
        let started = Instant::now();
        let commit = self.read_index(wait).await?;
        let left = wait.saturating_sub(started.elapsed());
        let snapshot = self.snapshot_covering(commit, left).await?;
        let last = snapshot
            .meta
            .last_log_id
            .ok_or_else(|| ServiceError::internal("the snapshot has no log id"))?;
        let archive = snapshot.snapshot.file;
        let bytes = archive
            .metadata()
            .await
            .map_err(|e| ServiceError::internal(format!("reading the snapshot's size: {e}")))?
            .len();
        let version = self.pg_identity().await?.version;
        let header = BackupHeader {
            format: FORMAT,
            node_id: self.id,
            log_index: last.index,
            log_term: last.leader_id.term,
            log_leader: last.leader_id.node_id,
            voters: snapshot
                .meta
                .last_membership
                .membership()
                .voter_ids()
                .collect(),
            postgres_version_num: version.parse().unwrap_or(0),
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            bytes,
            sha256: String::new(),
        };
        info!(
            node = self.id,
            index = last.index,
            commit,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "backup ready to stream"
        );
        Ok(BackupSource { header, archive })
    }
}
