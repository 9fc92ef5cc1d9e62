//! openraft's storage test suite (`openraft::testing::Suite`) against the real [`LogStore`]
//! (RocksDB in a temporary directory).
//!
//! The suite tests a log store and a state machine together. raftpg's real state machine
//! applies entries to PostgreSQL, so this file brings [`MemStateMachine`]: **test scaffolding
//! for the log store only**, not a model of `PgStateMachine`. It applies `Command` entries
//! trivially (counting writes), tracks the last applied log id and the membership, and
//! snapshots that tiny state as JSON in a file.
//!
//! Purge limit: in a node, purges wait until a durable snapshot covers them ([`PurgeLimit`],
//! tested in `log_store.rs`'s unit tests). The suite purges without building snapshots first,
//! so each store built here gets a limit that is released from the start (it covers every
//! index); purges still go through the limit check.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use openraft::errors::ErrorSource;
use openraft::impls::BoxedErrorSource;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf};
use openraft::vote::RaftLeaderId;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageError};
use raftpg_node::command::{
    ApplyOutcome, Command, CommittedLeaderId, Entry, LogId, NodeId, StoredMembership, TypeConfig,
};

type SnapshotMeta = SnapshotMetaOf<TypeConfig>;
type Snapshot = SnapshotOf<TypeConfig, tokio::fs::File>;
use raftpg_node::raft::log_store::{LogStore, PurgeLimit};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

/// The whole state of [`MemStateMachine`]; also its snapshot format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct MemState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Writes applied (a `Sql` entry is one, a `Batch` entry one per write).
    writes: u64,
}

/// The published snapshot: its metadata and the file holding its data.
#[derive(Clone)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    path: PathBuf,
}

/// An in-memory state machine for the suite (see the module doc). Clones share their state.
#[derive(Clone)]
struct MemStateMachine {
    dir: PathBuf,
    state: Arc<Mutex<MemState>>,
    current: Arc<Mutex<Option<CurrentSnapshot>>>,
    files: Arc<std::sync::atomic::AtomicU64>,
}

fn io_error(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl MemStateMachine {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("create the snapshot directory");
        MemStateMachine {
            dir,
            state: Arc::default(),
            current: Arc::default(),
            files: Arc::default(),
        }
    }

    fn next_path(&self, what: &str) -> PathBuf {
        let n = self
            .files
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dir.join(format!("{what}-{n}"))
    }

    /// Writes `state` into a new snapshot file and makes it the current snapshot.
    fn publish(&self, meta: SnapshotMeta, state: &MemState) -> std::io::Result<()> {
        let path = self.next_path("snapshot");
        std::fs::write(&path, serde_json::to_vec(state)?)?;
        *self.current.lock().unwrap() = Some(CurrentSnapshot { meta, path });
        Ok(())
    }

    fn apply_one(state: &mut MemState, entry: Entry) -> ApplyOutcome {
        state.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => ApplyOutcome::Internal,
            EntryPayload::Membership(m) => {
                state.membership = StoredMembership::new(Some(entry.log_id), m);
                ApplyOutcome::Internal
            }
            EntryPayload::Normal(Command::Sql(_) | Command::Transaction(_)) => {
                state.writes += 1;
                ApplyOutcome::Applied(Vec::new())
            }
            EntryPayload::Normal(Command::Batch(writes)) => {
                state.writes += writes.len() as u64;
                ApplyOutcome::Batch(vec![ApplyOutcome::Applied(Vec::new()); writes.len()])
            }
            EntryPayload::Normal(Command::Checksum) => ApplyOutcome::Checksums(Vec::new()),
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MemStateMachine {
    type SnapshotData = tokio::fs::File;

    async fn build_snapshot(&mut self) -> std::io::Result<Snapshot> {
        let state = self.state.lock().unwrap().clone();
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
        };
        self.publish(meta, &state)?;
        Ok(self
            .get_current_snapshot()
            .await?
            .expect("the snapshot just published"))
    }
}

impl RaftStateMachine<TypeConfig> for MemStateMachine {
    type SnapshotData = tokio::fs::File;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        let state = self.state.lock().unwrap();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> std::io::Result<()>
    where
        Strm: futures::Stream<Item = std::io::Result<EntryResponder<TypeConfig>>>
            + Unpin
            + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let outcome = Self::apply_one(&mut self.state.lock().unwrap(), entry);
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: tokio::fs::File,
    ) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        snapshot.seek(std::io::SeekFrom::Start(0)).await?;
        snapshot.read_to_end(&mut bytes).await?;
        let state: MemState = serde_json::from_slice(&bytes).map_err(io_error)?;
        assert_eq!(
            state.last_applied, meta.last_log_id,
            "snapshot data and meta differ"
        );
        self.publish(meta.clone(), &state)?;
        *self.state.lock().unwrap() = state;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> std::io::Result<Option<Snapshot>> {
        let Some(current) = self.current.lock().unwrap().clone() else {
            return Ok(None);
        };
        let file = tokio::fs::File::open(&current.path).await?;
        Ok(Some(Snapshot {
            meta: current.meta,
            snapshot: file,
        }))
    }
}

/// Keeps a store's directory and its purge limit alive for one suite test; the directory goes
/// when the test ends.
struct Guard {
    _dir: tempfile::TempDir,
    _purge_limit: watch::Sender<PurgeLimit>,
}

/// Builds a fresh [`LogStore`] (RocksDB in a new temporary directory, purges released) and a
/// fresh [`MemStateMachine`] for each suite test.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, MemStateMachine, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, LogStore, MemStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::Builder::new()
            .prefix("raftpg-log-suite-")
            .tempdir()
            .map_err(|e| StorageError::write(BoxedErrorSource::from_error(&e)))?;
        let store = LogStore::open(&dir.path().join("raft-log"))
            .map_err(|e| StorageError::write(BoxedErrorSource::from_error(&io_error(e))))?;
        // Released: the suite purges without snapshots (see the module doc).
        let everything = LogId::new(CommittedLeaderId::new(u64::MAX, NodeId::MAX), u64::MAX);
        let purge_limit = watch::Sender::new(PurgeLimit {
            covered: Some(everything),
            failed: None,
        });
        store.limit_purges(purge_limit.subscribe());
        let sm = MemStateMachine::new(dir.path().join("snapshots"));
        let guard = Guard {
            _dir: dir,
            _purge_limit: purge_limit,
        };
        Ok((guard, store, sm))
    }
}

#[tokio::test]
async fn log_store_passes_the_openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder).await {
        panic!("openraft storage suite: {e}");
    }
}
