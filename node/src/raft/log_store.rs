//! The Raft log, kept in RocksDB: vote, entries, committed log id and purge point.
//!
//! Owns the RocksDB instance under `<data-dir>/raft-log`. Invariants:
//! - every write that openraft must be able to rely on after a crash is durable before it is
//!   acknowledged: votes, truncations and purge points are written with `sync = true`; appended
//!   entries are written at once and reported flushed only after the flusher thread fsynced the
//!   write-ahead log (one fsync for all appends queued meanwhile: group commit);
//! - entries are contiguous: a truncate removes a suffix, a purge removes a prefix and records the
//!   purged log id first, so there is never a hole;
//! - **no entry is purged before a durable snapshot covers it** ([`PurgeLimit`]): openraft
//!   persists the purge that follows a snapshot install right after handing the snapshot to the
//!   state machine, without waiting for it, so a purge waits here until the snapshot store
//!   reports the snapshot published (file and metadata fsynced). Otherwise a crash in between
//!   leaves a node whose database is behind its log's first entry, with nothing to fill the gap.
//!
//! - **what the state machine applies is durable here first** ([`LogStore::durable`]): openraft
//!   0.10 submits appends without waiting for their flush (replication overlaps the leader's
//!   fsync) and may apply an entry a majority committed before this node's own copy is flushed;
//!   PostgreSQL must never hold an entry this log could lose.
//!
//! RocksDB is reached only through this module.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::VoteOf;
use openraft::{EntryPayload, OptionalSend};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use tokio::sync::watch;

use crate::command::{Command, Entry, LogId, NodeId, TypeConfig};

const CF_LOGS: &str = "logs";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

/// Errors opening the log store.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// RocksDB refused to open the directory.
    #[error("cannot open the Raft log at {path}: {source}")]
    Open {
        /// Path of the RocksDB directory.
        path: String,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// The flusher thread could not start.
    #[error("cannot start the Raft log flusher thread: {0}")]
    Thread(std::io::Error),
}

/// How far the log may be purged: what the durable (published) snapshot covers. Reported by
/// the snapshot store (`snapshot::SnapshotStore::purge_limit`), read by [`LogStore`]'s purges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeLimit {
    /// Last log id of the published snapshot: its file and metadata are fsynced, so after any
    /// crash the node can restore it (`restore_if_ahead`) instead of reading purged entries.
    pub covered: Option<LogId>,
    /// Last log id of a snapshot install that failed for good (the node stops): a purge waiting
    /// for it fails instead of waiting forever.
    pub failed: Option<LogId>,
}

impl PurgeLimit {
    /// Whether entries up to `upto` may be purged.
    pub fn covers(&self, upto: &LogId) -> bool {
        self.covered.is_some_and(|c| c.index >= upto.index)
    }

    /// Whether the install that was to cover `upto` failed.
    fn failed_for(&self, upto: &LogId) -> bool {
        self.failed.is_some_and(|f| f.index >= upto.index)
    }
}

/// Longest wait for an appended entry to be fsynced before it may be applied.
pub const DURABLE_WAIT_MAX: Duration = Duration::from_secs(60);

/// How often a purge still waiting for its snapshot says so.
const PURGE_WAIT_REPORT: Duration = Duration::from_secs(10);

/// The RocksDB-backed Raft log. Cheap to clone: clones share one RocksDB handle.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// Appends waiting for the next fsync of the write-ahead log.
    flusher: std::sync::mpsc::Sender<Flush>,
    /// The highest log index known durable (fsynced) in this log: openraft 0.10 lets the state
    /// machine apply entries that are committed by a majority but only *submitted* to the local
    /// log; the state machine waits for this before applying, so PostgreSQL never holds an entry
    /// this node's log could lose in a crash (see [`LogStore::durable`]).
    flushed: watch::Receiver<Option<u64>>,
    flushed_tx: Arc<watch::Sender<Option<u64>>>,
    /// What purges wait for (set once, by the state machine, before openraft can purge).
    purge_limit: Arc<OnceLock<watch::Receiver<PurgeLimit>>>,
    /// Where this node's own appended writes go (set once, by the state machine): this node's
    /// id and the state machine's speculation queue (see [`LogStore::hand_own_appends`]).
    own_appends: Arc<OnceLock<(NodeId, tokio::sync::mpsc::Sender<Entry>)>>,
    /// One more than the index of the last entry written (0: none), for
    /// [`LogStore::last_written`].
    written: Arc<std::sync::atomic::AtomicU64>,
}

/// Fsyncs the write-ahead log for every batch of waiting appends, then reports them flushed,
/// in order. Ends when every `LogStore` clone is gone.
///
/// It holds the database weakly: the last `LogStore` clone closes RocksDB on the thread that
/// drops it, never this thread (which may still be running while the process exits, and RocksDB
/// closed during exit crashes).
fn run_flusher(
    db: std::sync::Weak<DB>,
    queue: std::sync::mpsc::Receiver<Flush>,
    flushed: Arc<watch::Sender<Option<u64>>>,
) {
    while let Ok(first) = queue.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = queue.try_recv() {
            waiting.push(more);
        }
        let synced = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the Raft log is closed".to_string()),
        };
        if synced.is_ok() {
            // Appends are queued in log order: the last one is the highest durable index.
            if let Some(last) = waiting.iter().filter_map(|f| f.last_index).max() {
                flushed.send_modify(|f| *f = Some(f.map_or(last, |x| x.max(last))));
            }
        }
        for f in waiting {
            f.callback.io_completed(synced.clone().map_err(io_err));
        }
    }
}

/// One append waiting for the flusher: the highest index it wrote and openraft's callback.
struct Flush {
    last_index: Option<u64>,
    callback: IOFlushed<TypeConfig>,
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&key[..8]);
    u64::from_be_bytes(buf)
}

fn sync_opts() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

type StoreResult<T> = Result<T, std::io::Error>;

impl LogStore {
    /// Opens (creating if needed) the log under `path`.
    pub fn open(path: &Path) -> Result<Self, LogStoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Bound the write-ahead log: memtables are flushed once the WAL reaches this size.
        opts.set_max_total_wal_size(64 * 1024 * 1024);
        // RocksDB's own info log: warnings only, rotated, two files kept.
        opts.set_log_level(rocksdb::LogLevel::Warn);
        opts.set_max_log_file_size(1024 * 1024);
        opts.set_keep_log_file_num(2);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOGS, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db =
            DB::open_cf_descriptors(&opts, path, cfs).map_err(|source| LogStoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let db = Arc::new(db);
        let (flusher, queue) = std::sync::mpsc::channel();
        let flush_db = Arc::downgrade(&db);
        // What the log holds at open was recovered from its write-ahead log: durable.
        let last = last_entry_log_id(&db)
            .map_err(|e| LogStoreError::Thread(io_err(e)))?
            .map(|l| l.index);
        let written = Arc::new(std::sync::atomic::AtomicU64::new(last.map_or(0, |l| l + 1)));
        let (flushed_tx, flushed) = watch::channel(last);
        let flushed_tx = Arc::new(flushed_tx);
        let thread_tx = flushed_tx.clone();
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || run_flusher(flush_db, queue, thread_tx))
            .map_err(LogStoreError::Thread)?;
        Ok(LogStore {
            db,
            flusher,
            flushed,
            flushed_tx,
            purge_limit: Arc::new(OnceLock::new()),
            own_appends: Arc::new(OnceLock::new()),
            written,
        })
    }

    /// The index of the last entry written to the log (readable, maybe not durable yet): where
    /// the log ends now.
    pub fn last_written(&self) -> Option<u64> {
        self.written
            .load(std::sync::atomic::Ordering::Acquire)
            .checked_sub(1)
    }

    /// Makes every later purge (of every clone) wait until `limit` covers it. The state machine
    /// calls this with its snapshot store's limit before openraft's first purge (openraft reads
    /// the state machine's applied state before anything else). A second call is ignored.
    pub fn limit_purges(&self, limit: watch::Receiver<PurgeLimit>) {
        let _ = self.purge_limit.set(limit);
    }

    /// From now on, every write entry appended that node `me` created as leader (its log id's
    /// leader is `me`) is also offered to `queue` once written (dropped when the queue is full):
    /// the state machine executes it while it replicates. A second call is ignored.
    pub fn hand_own_appends(&self, me: NodeId, queue: tokio::sync::mpsc::Sender<Entry>) {
        let _ = self.own_appends.set((me, queue));
    }

    /// Waits until this node's log has `index` durable (fsynced; see the field `flushed`). Fails
    /// after [`DURABLE_WAIT_MAX`] (an fsync that fails or never returns: the caller's apply
    /// fails and openraft stops, rather than waiting forever) or when the log store is gone.
    pub async fn durable(&self, index: u64) -> StoreResult<()> {
        let mut flushed = self.flushed.clone();
        let wait = async move {
            flushed
                .wait_for(|f| f.is_some_and(|f| f >= index))
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(DURABLE_WAIT_MAX, wait).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(io_err("the Raft log is closed")),
            Err(_) => Err(io_err(format!(
                "log index {index} was not made durable within {DURABLE_WAIT_MAX:?}"
            ))),
        }
    }

    /// Waits until a durable snapshot covers `upto` (see [`PurgeLimit`]). Immediate for every
    /// purge except the one openraft issues while the state machine is still publishing a
    /// received snapshot; fails if that install failed for good.
    async fn wait_until_covered(&self, upto: &LogId) -> StoreResult<()> {
        let Some(limit) = self.purge_limit.get() else {
            return Ok(());
        };
        let mut limit = limit.clone();
        let refused = |why: String| -> std::io::Error {
            io_err(format!("not purging the log up to {}: {why}", upto.index))
        };
        loop {
            let wait = limit.wait_for(|l| l.covers(upto) || l.failed_for(upto));
            let outcome = tokio::time::timeout(PURGE_WAIT_REPORT, wait)
                .await
                .map(|r| r.map(|l| *l));
            match outcome {
                Ok(Ok(l)) if l.covers(upto) => return Ok(()),
                Ok(Ok(l)) => {
                    return Err(refused(format!(
                        "installing the snapshot up to {:?} failed",
                        l.failed.map(|f| f.index)
                    )))
                }
                Ok(Err(_)) => return Err(refused("the snapshot store is gone".into())),
                Err(_) => tracing::warn!(
                    upto = upto.index,
                    covered = ?limit.borrow().covered.map(|c| c.index),
                    "purging the log waits for a durable snapshot covering it"
                ),
            }
        }
    }

    fn cf_logs(&self) -> &rocksdb::ColumnFamily {
        // The column families are created in `open`; their absence is a programming error.
        self.db
            .cf_handle(CF_LOGS)
            .expect("column family 'logs' is created at open")
    }

    fn cf_meta(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(CF_META)
            .expect("column family 'meta' is created at open")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, String> {
        match self
            .db
            .get_cf(self.cf_meta(), key)
            .map_err(|e| e.to_string())?
        {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), String> {
        let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        self.db
            .put_cf_opt(self.cf_meta(), key, bytes, &sync_opts())
            .map_err(|e| e.to_string())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, String> {
        last_entry_log_id(&self.db)
    }
}

/// The log id of the last entry in the log, if any.
fn last_entry_log_id(db: &DB) -> Result<Option<LogId>, String> {
    let cf = db
        .cf_handle(CF_LOGS)
        .ok_or_else(|| "the logs column family is missing".to_string())?;
    let mut it = db.iterator_cf(cf, rocksdb::IteratorMode::End);
    match it.next() {
        None => Ok(None),
        Some(Err(e)) => Err(e.to_string()),
        Some(Ok((_, value))) => {
            let entry: Entry = serde_json::from_slice(&value).map_err(|e| e.to_string())?;
            Ok(Some(entry.log_id))
        }
    }
}

fn io_err(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf_logs(),
            rocksdb::IteratorMode::From(&index_key(start), rocksdb::Direction::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(io_err)?;
            let index = key_index(&key);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = serde_json::from_slice(&value).map_err(io_err)?;
            out.push(entry);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> StoreResult<Option<VoteOf<TypeConfig>>> {
        self.get_meta(KEY_VOTE).map_err(io_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.get_meta(KEY_PURGED).map_err(io_err)?;
        let last = self.last_entry_log_id().map_err(io_err)?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> StoreResult<()> {
        let store = self.clone();
        let vote = *vote;
        tokio::task::spawn_blocking(move || store.put_meta(KEY_VOTE, &vote))
            .await
            .map_err(io_err)?
            .map_err(io_err)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StoreResult<()> {
        // Not synced: a lost committed id only makes a restarted node wait for the leader.
        let bytes = serde_json::to_vec(&committed).map_err(io_err)?;
        self.db
            .put_cf(self.cf_meta(), KEY_COMMITTED, bytes)
            .map_err(io_err)
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId>> {
        Ok(self
            .get_meta::<Option<LogId>>(KEY_COMMITTED)
            .map_err(io_err)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let own = self.own_appends.get();
        let mut offered = Vec::new();
        let mut last_index = None;
        for entry in entries {
            last_index = Some(entry.log_id.index);
            let bytes = serde_json::to_vec(&entry).map_err(io_err)?;
            batch.put_cf(self.cf_logs(), index_key(entry.log_id.index), bytes);
            let is_write = matches!(
                entry.payload,
                EntryPayload::Normal(Command::Sql(_) | Command::Batch(_) | Command::Transaction(_))
            );
            if own.is_some_and(|(me, _)| entry.log_id.leader_id.node_id == *me) && is_write {
                offered.push(entry);
            }
        }
        // Written now (readable at once, in order), made durable by the flusher thread, which
        // fsyncs the write-ahead log once for every append queued meanwhile (group commit)
        // and only then reports the entries flushed to openraft.
        if let Err(e) = self.db.write_opt(batch, &WriteOptions::default()) {
            callback.io_completed(Err(io_err(&e)));
            return Err(io_err(e));
        }
        if let Some(last) = last_index {
            self.written
                .store(last + 1, std::sync::atomic::Ordering::Release);
        }
        if let Err(std::sync::mpsc::SendError(f)) = self.flusher.send(Flush {
            last_index,
            callback,
        }) {
            f.callback
                .io_completed(Err(io_err("the log flusher stopped")));
            return Err(io_err("the log flusher stopped"));
        }
        if let Some((_, queue)) = own {
            for entry in offered {
                let _ = queue.try_send(entry);
            }
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> StoreResult<()> {
        // Keeps entries up to `last_log_id` (none if None), removes every later one.
        let from = last_log_id.map_or(0, |l| l.index.saturating_add(1));
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_logs(), index_key(from), index_key(u64::MAX));
        // delete_range excludes the end key; u64::MAX is never a real index.
        self.db.write_opt(batch, &sync_opts()).map_err(io_err)?;
        self.written
            .fetch_min(from, std::sync::atomic::Ordering::AcqRel);
        // What was durable beyond the cut is gone.
        let kept = last_log_id.map(|l| l.index);
        self.flushed_tx.send_modify(|f| {
            *f = match (*f, kept) {
                (Some(f), Some(k)) => Some(f.min(k)),
                _ => None,
            }
        });
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> StoreResult<()> {
        // Never purge what no durable snapshot covers (see `PurgeLimit`).
        self.wait_until_covered(&log_id).await?;
        // Record the purge point first so that a crash in between leaves no hole.
        self.put_meta(KEY_PURGED, &log_id).map_err(io_err)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf_logs(),
            index_key(0),
            index_key(log_id.index.saturating_add(1)),
        );
        self.db.write_opt(batch, &sync_opts()).map_err(io_err)?;
        // Reclaim the disk space of the purged range in the background (physical only).
        let store = self.clone();
        let end = index_key(log_id.index.saturating_add(1));
        tokio::task::spawn_blocking(move || {
            // Flushing the memtables releases the write-ahead log files that still hold the
            // purged entries; compaction drops them from the table files.
            for cf in [store.cf_logs(), store.cf_meta()] {
                if let Err(e) = store.db.flush_cf(cf) {
                    tracing::warn!(error = %e, "flushing the raft log after a purge");
                }
            }
            store
                .db
                .compact_range_cf(store.cf_logs(), None::<&[u8]>, Some(&end[..]));
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommittedLeaderId;
    use openraft::vote::RaftLeaderId;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// A log store in a directory removed at the end of the test, after RocksDB is closed.
    struct TempLog {
        dir: std::path::PathBuf,
        store: LogStore,
    }

    impl TempLog {
        fn open() -> Self {
            let dir = std::env::temp_dir().join(format!("raftpg-log-{}", uuid::Uuid::new_v4()));
            let store = LogStore::open(&dir).expect("open a log store in a temp dir");
            TempLog { dir, store }
        }

        /// Closes RocksDB: ends the flusher thread (it stops when the last sender is gone) and
        /// waits for the background compaction of a purge, which hold the other handles.
        async fn close(self) {
            let dir = self.dir.clone();
            let LogStore { db, flusher, .. } = self.store.clone();
            drop(self);
            drop(flusher);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while Arc::strong_count(&db) > 1 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(db);
            let _ = std::fs::remove_dir_all(dir);
        }

        async fn purged(&mut self) -> Option<u64> {
            let state = self.store.get_log_state().await.expect("log state");
            state.last_purged_log_id.map(|l| l.index)
        }
    }

    #[tokio::test]
    async fn a_purge_waits_until_a_durable_snapshot_covers_it() {
        let mut log = TempLog::open();
        let limit = watch::Sender::new(PurgeLimit {
            covered: Some(log_id(2)),
            failed: None,
        });
        log.store.limit_purges(limit.subscribe());
        // Covered: at once.
        log.store.purge(log_id(2)).await.expect("purge up to 2");
        assert_eq!(log.purged().await, Some(2));
        // Not covered yet: waits, and nothing is purged meanwhile.
        let mut store = log.store.clone();
        let purge = tokio::spawn(async move { store.purge(log_id(5)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!purge.is_finished(), "purged past the durable snapshot");
        assert_eq!(log.purged().await, Some(2));
        // Published: the purge goes ahead.
        limit.send_modify(|l| l.covered = Some(log_id(5)));
        purge.await.expect("join").expect("purge up to 5");
        assert_eq!(log.purged().await, Some(5));
        log.close().await;
    }

    #[tokio::test]
    async fn a_purge_fails_when_the_install_covering_it_failed() {
        let mut log = TempLog::open();
        let limit = watch::Sender::new(PurgeLimit::default());
        log.store.limit_purges(limit.subscribe());
        let mut store = log.store.clone();
        let purge = tokio::spawn(async move { store.purge(log_id(7)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        limit.send_modify(|l| l.failed = Some(log_id(7)));
        let result = purge.await.expect("join");
        assert!(result.is_err(), "a purge no snapshot covers went ahead");
        assert_eq!(log.purged().await, None);
        log.close().await;
    }
}
