//! The Raft log, kept in RocksDB: vote, entries, committed log id and purge point.
//!
//! Owns the RocksDB instance under `<data-dir>/raft-log`. Invariants:
//! - every write that openraft must be able to rely on after a crash is durable before it is
//!   acknowledged: votes, truncations and purge points are written with `sync = true`; appended
//!   entries are written at once and reported flushed only after the flusher thread fsynced the
//!   write-ahead log (one fsync for all appends queued meanwhile: group commit);
//! - entries are contiguous: a truncate removes a suffix, a purge removes a prefix and records the
//!   purged log id first, so there is never a hole.
//!
//! RocksDB is reached only through this module.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageError, StorageIOError, Vote};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::command::{Entry, LogId, NodeId, TypeConfig};

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

/// The RocksDB-backed Raft log. Cheap to clone: clones share one RocksDB handle.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// Appends waiting for the next fsync of the write-ahead log.
    flusher: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// Fsyncs the write-ahead log for every batch of waiting appends, then reports them flushed,
/// in order. Ends when every `LogStore` clone is gone.
fn run_flusher(db: Arc<DB>, queue: std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = queue.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = queue.try_recv() {
            waiting.push(more);
        }
        let synced = db.flush_wal(true).map_err(|e| e.to_string());
        for callback in waiting {
            callback.log_io_completed(synced.clone().map_err(io_err));
        }
    }
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

type StoreResult<T> = Result<T, StorageError<NodeId>>;

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
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flusher".into())
            .spawn(move || run_flusher(flush_db, queue))
            .map_err(LogStoreError::Thread)?;
        Ok(LogStore { db, flusher })
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
        let mut it = self
            .db
            .iterator_cf(self.cf_logs(), rocksdb::IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok((_, value))) => {
                let entry: Entry = serde_json::from_slice(&value).map_err(|e| e.to_string())?;
                Ok(Some(entry.log_id))
            }
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
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
            let index = key_index(&key);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = serde_json::from_slice(&value)
                .map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self
            .get_meta(KEY_PURGED)
            .map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
        let last = self
            .last_entry_log_id()
            .map_err(|e| StorageIOError::read_logs(&io_err(e)))?
            .or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        let store = self.clone();
        let vote = *vote;
        tokio::task::spawn_blocking(move || store.put_meta(KEY_VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&io_err(e)))?
            .map_err(|e| StorageIOError::write_vote(&io_err(e)).into())
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        self.get_meta(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(&io_err(e)).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StoreResult<()> {
        // Not synced: a lost committed id only makes a restarted node wait for the leader.
        let bytes =
            serde_json::to_vec(&committed).map_err(|e| StorageIOError::write(&io_err(e)))?;
        self.db
            .put_cf(self.cf_meta(), KEY_COMMITTED, bytes)
            .map_err(|e| StorageIOError::write(&io_err(e)).into())
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId>> {
        Ok(self
            .get_meta::<Option<LogId>>(KEY_COMMITTED)
            .map_err(|e| StorageIOError::read(&io_err(e)))?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes =
                serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
            batch.put_cf(self.cf_logs(), index_key(entry.log_id.index), bytes);
        }
        // Written now (readable at once, in order), made durable by the flusher thread, which
        // fsyncs the write-ahead log once for every append queued meanwhile (group commit)
        // and only then reports the entries flushed to openraft.
        if let Err(e) = self.db.write_opt(batch, &WriteOptions::default()) {
            callback.log_io_completed(Err(io_err(&e)));
            return Err(StorageIOError::write_logs(&io_err(e)).into());
        }
        if let Err(std::sync::mpsc::SendError(callback)) = self.flusher.send(callback) {
            callback.log_io_completed(Err(io_err("the log flusher stopped")));
            return Err(StorageIOError::write_logs(&io_err("the log flusher stopped")).into());
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> StoreResult<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_logs(), index_key(log_id.index), index_key(u64::MAX));
        // delete_range excludes the end key; u64::MAX is never a real index.
        self.db
            .write_opt(batch, &sync_opts())
            .map_err(|e| StorageIOError::write_logs(&io_err(e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> StoreResult<()> {
        // Record the purge point first so that a crash in between leaves no hole.
        self.put_meta(KEY_PURGED, &log_id)
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf_logs(),
            index_key(0),
            index_key(log_id.index.saturating_add(1)),
        );
        self.db
            .write_opt(batch, &sync_opts())
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
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
