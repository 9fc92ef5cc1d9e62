//! What a snapshot is as it travels: openraft's metadata plus raftpg's id of the archive
//! ([`SnapMeta`]), and the archive itself ([`SnapshotFile`], openraft's `SnapshotData`).
//!
//! Owned here, below both users: the state machine (`apply::snapshot`) builds, publishes and
//! installs snapshots; the transport (`network`) sends them piece by piece. Invariant: a
//! snapshot's id (`term-index-crc-len`) travels with its archive everywhere, so a receiver can
//! check the archive before installing it.

use serde::{Deserialize, Serialize};

use crate::command::{LogId, StoredMembership, TypeConfig};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};

/// A snapshot's metadata as raftpg keeps it (in `current.json`, and on the wire to other
/// nodes): openraft's (last log id, last membership) and raftpg's own id `term-index-crc-len`,
/// whose CRC-32 and length of the archive are checked before an install. The serialized shape
/// is openraft 0.9's `SnapshotMeta`, which raftpg stored before openraft 0.10 dropped the id.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SnapMeta {
    /// The last log id the snapshot covers.
    pub last_log_id: Option<LogId>,
    /// The last membership it holds.
    pub last_membership: StoredMembership,
    /// `term-index-crc-len`.
    pub snapshot_id: String,
}

impl SnapMeta {
    /// openraft's part.
    pub fn openraft(&self) -> SnapshotMetaOf<TypeConfig> {
        SnapshotMetaOf::<TypeConfig> {
            last_log_id: self.last_log_id,
            last_membership: self.last_membership.clone(),
        }
    }

    /// raftpg's metadata for openraft's `meta` and the id a snapshot file carries.
    pub fn of(meta: &SnapshotMetaOf<TypeConfig>, snapshot_id: &str) -> Self {
        SnapMeta {
            last_log_id: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            snapshot_id: snapshot_id.to_string(),
        }
    }
}

/// A snapshot's data as openraft passes it around (`RaftStateMachine::SnapshotData`): the
/// archive, open, and raftpg's id of it (openraft 0.10's metadata has no id).
pub struct SnapshotFile {
    /// `term-index-crc-len` (see [`SnapMeta`]).
    pub id: String,
    /// The archive.
    pub file: tokio::fs::File,
}

/// A snapshot as openraft sees it.
pub type Snapshot = SnapshotOf<TypeConfig, SnapshotFile>;
