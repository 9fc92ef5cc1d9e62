//! Seeding a new node from a backup (`--restore-from`, issue 19).
//!
//! Owns `<data-dir>/restored-from.json`, the record that this data directory was seeded from a
//! backup (its SHA-256 and log index). A node started with `--restore-from FILE` and an empty
//! data directory:
//!
//! 1. verifies the backup (`raftpg_proto::backup`: header, size, SHA-256) while copying its
//!    archive into the snapshot directory;
//! 2. publishes the archive as its current snapshot at the backup's log id, with a new
//!    membership: the founding members of `--peers` (or this node alone), all voters;
//! 3. records a vote in the backup's term, so that the new cluster's first election is in a
//!    later term and its log ids keep growing after the backup's;
//! 4. writes the record.
//!
//! Raft then starts as after an interrupted snapshot install: the state machine restores the
//! current snapshot into PostgreSQL (`snapshot::SnapshotStore::restore_if_ahead`, which also
//! writes the new membership into `raftpg.applied`) and openraft purges its empty log up to the
//! backup's index. Every founding member given the same file and the same `--peers` starts at
//! the same log id with the same database and membership, exactly like members initialized
//! together; a node may also be seeded alone and the others added with `raftpg member add`.
//!
//! Invariants: a data directory holding Raft state is never seeded (a restore cannot roll back a
//! live node); a crash anywhere before the record is written leaves a directory that is seeded
//! again at the next start; starting again with the same flag and file is a no-op.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::command::{CommittedLeaderId, Vote};
use anyhow::{bail, Context};
use openraft::storage::{RaftLogReader, RaftLogStorage};
use openraft::vote::RaftLeaderId;
use raftpg_proto::backup::{self, BackupHeader};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::snapshot::SnapshotStore;
use crate::command::{LogId, NodeAddr, NodeId};
use crate::raft::log_store::LogStore;

/// The record of a seeded data directory.
const RECORD: &str = "restored-from.json";

/// What [`RECORD`] holds.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    file: PathBuf,
    sha256: String,
    log_index: u64,
}

/// Seeds this node from `backup_file` unless its data directory was seeded from it already (see
/// the module doc). `members` are the founding members' peer addresses (this node included).
pub async fn seed_if_new(
    node_id: NodeId,
    data_dir: &Path,
    backup_file: &Path,
    members: &BTreeMap<NodeId, String>,
    log: &LogStore,
    snapshots: &SnapshotStore,
) -> anyhow::Result<()> {
    let record_path = data_dir.join(RECORD);
    if let Ok(bytes) = std::fs::read(&record_path) {
        let record: Record = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading {}", record_path.display()))?;
        // Seeded already: the file is not needed any more (it may have been pruned).
        let Ok(header) = backup::read_header(backup_file) else {
            info!(node = node_id, index = record.log_index, file = %backup_file.display(),
                  "seeded from a backup already; the file given now is not readable, and not needed");
            return Ok(());
        };
        if record.sha256 != header.sha256 {
            bail!(
                "{} was seeded from another backup ({}, log index {}); --restore-from seeds only a new node: start it without --restore-from, or with an empty --data-dir",
                data_dir.display(),
                record.file.display(),
                record.log_index
            );
        }
        info!(
            node = node_id,
            index = record.log_index,
            "seeded from this backup already; starting as usual"
        );
        return Ok(());
    }
    let header = backup::read_header(backup_file)?;
    let mut log = log.clone();
    let state = log.get_log_state().await?;
    // A vote in the backup's term for this node and an empty log: an earlier seeding from this
    // file stopped before its record was written; it is done again.
    let own_seed_vote = Vote::new(header.log_term, node_id);
    let vote = log.read_vote().await?;
    if state.last_log_id.is_some() || vote.is_some_and(|v| v != own_seed_vote) {
        bail!(
            "{} holds a node's Raft state already; --restore-from seeds only a new node (a restore cannot roll back a live one): start it without --restore-from, or with an empty --data-dir",
            data_dir.display()
        );
    }
    info!(node = node_id, file = %backup_file.display(), index = header.log_index,
          bytes = header.bytes, "seeding this node from a backup");
    let archive = snapshots.dir().join("restore.dump");
    let (file, to) = (backup_file.to_path_buf(), archive.clone());
    let verified: BackupHeader =
        tokio::task::spawn_blocking(move || backup::verify(&file, Some(&to))).await??;
    let last = LogId::new(
        CommittedLeaderId::new(verified.log_term, verified.log_leader),
        verified.log_index,
    );
    let nodes: BTreeMap<NodeId, NodeAddr> = members
        .iter()
        .map(|(id, addr)| (*id, NodeAddr::peer_only(addr.clone())))
        .collect();
    snapshots
        .seed(last, nodes, &archive)
        .await
        .context("publishing the backup as this node's snapshot")?;
    log.save_vote(&Vote::new(verified.log_term, node_id))
        .await?;
    let record = Record {
        file: backup_file.to_path_buf(),
        sha256: verified.sha256,
        log_index: verified.log_index,
    };
    let tmp = data_dir.join(format!("{RECORD}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &record_path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    info!(node = node_id, index = verified.log_index, members = ?members.keys().collect::<Vec<_>>(),
          "seeded from the backup; PostgreSQL is restored from it next");
    Ok(())
}
