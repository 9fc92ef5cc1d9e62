//! Snapshots of the user database, for log compaction and for nodes that are too far behind
//! (new or wiped members).
//!
//! Owns `<data-dir>/snapshots`: the current snapshot (`snap-<id>.dump`, a `pg_dump` custom-format
//! archive, and `current.json`, its Raft metadata), a file being built and a file being received,
//! and the [`PurgeLimit`] it reports to the Raft log.
//!
//! - **Build**: a `REPEATABLE READ READ ONLY` transaction exports its snapshot and reads
//!   `raftpg.applied` in it, so the dump (`pg_dump --snapshot`) and its log id agree. Writes go on
//!   meanwhile. Before the snapshot is published, a synchronously committed transaction makes
//!   PostgreSQL flush its WAL: everything in the snapshot is durable before openraft may purge
//!   the log entries it covers (design.md, `synchronous_commit` trap).
//! - **Transfer**: openraft sends the file in chunks; its id carries a CRC-32 of the whole file,
//!   checked before installing.
//! - **Install**: verify, publish, restore into a fresh database, check its applied log id, then
//!   swap it in with two renames in one transaction; the old database is dropped afterwards. A
//!   failure before the swap leaves the node's database untouched; the install is retried.
//!
//! ## Crash safety of an install (issue 14)
//!
//! The invariant: **after any crash, the database's applied log id, the current snapshot and
//! the Raft log together hold every committed entry** — each entry is either in PostgreSQL, in
//! the current snapshot (restored at restart when it is ahead of the database), or still in the
//! log. openraft persists the purge of the log up to a received snapshot right after it
//! hands the snapshot to the state machine, without waiting for the install (0.9 did; 0.10 also
//! purges up to the applied index at start-up). Before this module
//! gated purges, a crash between that purge and [`SnapshotStore::publish`] left a node whose
//! database was behind the first entry of its log and whose current snapshot did not cover the
//! gap: it could not start (openraft's state check panics; a release build would stop applying).
//! Each crash point, and what makes it safe:
//!
//! | crash while / after | on restart |
//! |---|---|
//! | receiving chunks (`incoming.dump` partial) | openraft recorded nothing; the file is removed at open, the leader sends the snapshot again |
//! | the file is complete, not yet published | the log purge is still waiting for [`PurgeLimit::covered`] (log_store), so the log is intact and the leader sends the snapshot again |
//! | publishing (`snap-*` renamed, `current.json` not yet) | same as above; the stray `snap-*` file is removed at open |
//! | published, before or during `pg_restore` | [`SnapshotStore::recover`] drops the half-restored database, [`SnapshotStore::restore_if_ahead`] restores the current snapshot before openraft reads the applied state |
//! | between `ALLOW_CONNECTIONS false` and the swap | `recover` allows connections again; the restore is redone |
//! | after the swap (one transaction), before the old database is dropped | `recover` drops it; the database is at the snapshot's log id, nothing to restore |
//! | after the install, openraft's purge done or not | the database is at the snapshot; entries after it are in the log (openraft appends them after the purge, and applies them only after the install) |
//!
//! A crash of PostgreSQL during an install makes the install fail and retry: every attempt
//! first repairs what an interrupted attempt left ([`SnapshotStore::recover`]) and skips the
//! restore if the swap already happened. Publishing is serialized and never goes back: a build
//! that finishes after a newer snapshot was published (a follower building while it installs)
//! returns the newer one instead of replacing it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::command::NodeAddr;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::command::{LogId, NodeId, StoredMembership};
use crate::raft::log_store::PurgeLimit;
pub use crate::raft::snapshot_data::{SnapMeta, Snapshot, SnapshotFile};

/// Errors of building or installing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File system.
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    /// PostgreSQL.
    #[error("snapshot: PostgreSQL: {err}{src}", err = .0, src = source_text(.0))]
    Pg(#[from] tokio_postgres::Error),
    /// pg_dump/pg_restore failed.
    #[error("snapshot: {0}")]
    Tool(String),
    /// The received file does not match its id (never installed).
    #[error("snapshot {id} is corrupt: {why}")]
    Corrupt {
        /// Snapshot id.
        id: String,
        /// What does not match.
        why: String,
    },
    /// `current.json` cannot be read.
    #[error("snapshot metadata {path}: {why}")]
    Metadata {
        /// Path of the file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// An install would take the current snapshot back (openraft installs only snapshots newer
    /// than its own and a build never gets ahead of the database; a rebuild may have installed
    /// a newer one meanwhile, which [`SnapshotStore::install`] accepts when the database is past
    /// the snapshot).
    #[error("snapshot {id} is older than the current snapshot {current}")]
    Stale {
        /// The snapshot to install.
        id: String,
        /// The current snapshot.
        current: String,
    },
}

/// `current.json`: the published snapshot.
#[derive(Serialize, Deserialize)]
struct CurrentSnapshot {
    meta: SnapMeta,
    file: String,
}

impl CurrentSnapshot {
    async fn open(self, dir: &Path) -> std::io::Result<Snapshot> {
        let file = tokio::fs::File::open(dir.join(&self.file)).await?;
        Ok(Snapshot {
            meta: self.meta.openraft(),
            snapshot: SnapshotFile {
                id: self.meta.snapshot_id,
                file,
            },
        })
    }
}

/// Name of the file a snapshot is received into.
const INCOMING: &str = "incoming.dump";
/// Name of the current snapshot's metadata.
const CURRENT: &str = "current.json";

/// Reads `current.json` in `dir` (`None` if there is none).
fn load_current(dir: &Path) -> Result<Option<CurrentSnapshot>, SnapshotError> {
    let path = dir.join(CURRENT);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| SnapshotError::Metadata {
            path: path.display().to_string(),
            why: e.to_string(),
        })
}

/// Where snapshots live and how to reach PostgreSQL for them. Clones share the purge limit and
/// the publish lock.
#[derive(Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
    bin_dir: PathBuf,
    db: tokio_postgres::Config,
    shutdown: watch::Receiver<bool>,
    /// What the published snapshot covers; the Raft log purges no further (see [`PurgeLimit`]).
    limit: Arc<watch::Sender<PurgeLimit>>,
    /// Serializes [`SnapshotStore::publish`] (a build and an install can finish together).
    publishing: Arc<tokio::sync::Mutex<()>>,
    /// How far the snapshot being received or restored is (for status).
    progress: Arc<std::sync::Mutex<Option<InstallProgress>>>,
    /// The snapshot being received from the leader, piece by piece ([`SnapshotStore::receive`]).
    receiving: Arc<tokio::sync::Mutex<Option<Receiving>>>,
}

/// A snapshot being received: its id, the receiving file and the offset the next piece must
/// start at.
struct Receiving {
    id: String,
    file: tokio::fs::File,
    next: u64,
}

/// How far a snapshot being received or restored is.
#[derive(Clone, Debug)]
pub struct InstallProgress {
    /// The snapshot's id (`term-index-crc-len`).
    pub snapshot_id: String,
    /// `receiving` (chunks arriving from the leader), `received` (waiting to be installed) or
    /// `restoring` (pg_restore into a fresh database).
    pub phase: &'static str,
    /// Bytes received so far (receiving) or the archive's size (restoring).
    pub bytes_done: u64,
    /// The archive's size (from the snapshot id).
    pub bytes_total: u64,
    /// When this phase began.
    pub since: std::time::Instant,
}

impl InstallProgress {
    /// One line for an operator: phase, bytes, rate and time left while receiving.
    pub fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let secs = self.since.elapsed().as_secs_f64();
        match self.phase {
            "receiving" => {
                let rate = self.bytes_done as f64 / secs.max(0.001);
                let left = self.bytes_total.saturating_sub(self.bytes_done) as f64 / rate.max(1.0);
                format!(
                    "receiving snapshot {}: {:.1} of {:.1} MiB ({:.0}%), {:.1} MiB/s, about {:.0} s left",
                    self.snapshot_id,
                    mib(self.bytes_done),
                    mib(self.bytes_total),
                    100.0 * self.bytes_done as f64 / (self.bytes_total.max(1) as f64),
                    rate / (1024.0 * 1024.0),
                    left
                )
            }
            phase => format!(
                "{phase} snapshot {} ({:.1} MiB) for {secs:.1} s",
                self.snapshot_id,
                mib(self.bytes_total)
            ),
        }
    }
}

/// The archive size a snapshot id ends with (`term-index-crc-len`).
fn size_of_id(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn storage_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// CRC-32 of a file.
async fn crc_of(path: &Path) -> std::io::Result<(u32, u64)> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(path).await?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        len += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hasher.finalize(), len))
}

impl SnapshotStore {
    /// Opens the snapshot directory, removing leftovers of interrupted builds, receives and
    /// publishes (a receive never survives a restart: openraft starts a transfer over), and
    /// reads what the current snapshot covers.
    pub fn open(
        dir: PathBuf,
        bin_dir: PathBuf,
        db: tokio_postgres::Config,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let current = load_current(&dir).map_err(std::io::Error::other)?;
        let current_file = current.as_ref().map(|c| c.file.as_str());
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let stray_snapshot = name.starts_with("snap-") && Some(name.as_str()) != current_file;
            if name.starts_with("building-")
                || name.ends_with(".tmp")
                || name == INCOMING
                || stray_snapshot
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let limit = PurgeLimit {
            covered: current.and_then(|c| c.meta.last_log_id),
            failed: None,
        };
        Ok(SnapshotStore {
            dir,
            bin_dir,
            db,
            shutdown,
            limit: Arc::new(watch::Sender::new(limit)),
            publishing: Arc::new(tokio::sync::Mutex::new(())),
            progress: Arc::new(std::sync::Mutex::new(None)),
            receiving: Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    /// How far the snapshot being received or restored is, if any.
    pub fn progress(&self) -> Option<InstallProgress> {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_progress(&self, p: Option<InstallProgress>) {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = p;
    }

    /// Records a chunk of snapshot `snapshot_id` received from the leader, ending at byte
    /// `upto` (`done`: the last chunk).
    pub fn note_received(&self, snapshot_id: &str, upto: u64, done: bool) {
        let mut g = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let phase = if done { "received" } else { "receiving" };
        match g.as_mut() {
            Some(p) if p.snapshot_id == snapshot_id && p.phase == "receiving" => {
                p.bytes_done = upto;
                if done {
                    p.phase = phase;
                    p.since = std::time::Instant::now();
                }
            }
            _ => {
                *g = Some(InstallProgress {
                    snapshot_id: snapshot_id.to_string(),
                    phase,
                    bytes_done: upto,
                    bytes_total: size_of_id(snapshot_id),
                    since: std::time::Instant::now(),
                })
            }
        }
    }

    /// What the published snapshot covers, for [`crate::raft::log_store::LogStore::limit_purges`].
    pub fn purge_limit(&self) -> watch::Receiver<PurgeLimit> {
        self.limit.subscribe()
    }

    /// Records that installing the snapshot up to `last` failed for good, so that a purge
    /// waiting for it fails (and the node stops) instead of waiting forever.
    pub fn install_failed(&self, last: Option<LogId>) {
        self.limit.send_modify(|l| l.failed = last.max(l.failed));
    }

    fn dbname(&self) -> String {
        self.db.get_dbname().unwrap_or("raftpg").to_string()
    }

    fn on_database(&self, name: &str) -> tokio_postgres::Config {
        let mut c = self.db.clone();
        c.dbname(name);
        c
    }

    fn admin(&self) -> tokio_postgres::Config {
        let mut c = self.db.clone();
        c.dbname("postgres");
        c
    }

    async fn connect(
        cfg: &tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// libpq connection arguments for pg_dump/pg_restore.
    fn libpq_args(&self, dbname: &str) -> (Vec<String>, Option<String>) {
        let mut args = Vec::new();
        if let Some(h) = self.db.get_hosts().first() {
            match h {
                tokio_postgres::config::Host::Tcp(name) => args.extend(["-h".into(), name.clone()]),
                tokio_postgres::config::Host::Unix(p) => {
                    args.extend(["-h".into(), p.display().to_string()])
                }
            }
        }
        if let Some(p) = self.db.get_ports().first() {
            args.extend(["-p".into(), p.to_string()]);
        }
        if let Some(u) = self.db.get_user() {
            args.extend(["-U".into(), u.to_string()]);
        }
        args.extend(["-d".into(), dbname.to_string()]);
        let password = self
            .db
            .get_password()
            .map(|p| String::from_utf8_lossy(p).to_string());
        (args, password)
    }

    /// Runs `pg_dump`/`pg_restore` against database `dbname`.
    async fn run_tool(
        &self,
        tool: &str,
        dbname: &str,
        args: &[String],
    ) -> Result<(), SnapshotError> {
        let (conn_args, password) = self.libpq_args(dbname);
        let mut cmd = tokio::process::Command::new(self.bin_dir.join(tool));
        cmd.args(&conn_args)
            .args(args)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(std::process::Stdio::null());
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        let out = cmd
            .output()
            .await
            .map_err(|e| SnapshotError::Tool(format!("running {tool}: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(SnapshotError::Tool(format!(
                "{tool} failed ({}): {}",
                out.status,
                err.trim()
            )));
        }
        Ok(())
    }

    /// The current snapshot, if any.
    pub async fn current(&self) -> std::io::Result<Option<Snapshot>> {
        // A publish meanwhile would remove the file between reading its name and opening it.
        let _publishing = self.publishing.lock().await;
        let path = self.dir.join(CURRENT);
        let text = match tokio::fs::read(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(storage_err(e)),
        };
        let cur: CurrentSnapshot = serde_json::from_slice(&text).map_err(storage_err)?;
        Ok(Some(cur.open(&self.dir).await?))
    }

    /// Writes a piece of the snapshot `id` received from the leader, starting at byte `offset`:
    /// a piece at offset 0 starts a new receive (truncating the receiving file), any other must
    /// continue the current receive of the same id where it stopped. Returns the file, synced,
    /// after the last piece (`done`).
    pub async fn receive(
        &self,
        id: &str,
        offset: u64,
        data: &[u8],
        done: bool,
    ) -> std::io::Result<Option<tokio::fs::File>> {
        use tokio::io::AsyncWriteExt;
        let mut receiving = self.receiving.lock().await;
        if offset == 0 {
            *receiving = Some(Receiving {
                id: id.to_string(),
                file: self.begin_receiving().await?,
                next: 0,
            });
        }
        let Some(r) = receiving
            .as_mut()
            .filter(|r| r.id == id && r.next == offset)
        else {
            return Err(std::io::Error::other(format!(
                "snapshot piece {id} at {offset} does not continue the snapshot being received; the leader starts over"
            )));
        };
        r.file.write_all(data).await?;
        r.next += data.len() as u64;
        self.note_received(id, r.next, done);
        if !done {
            return Ok(None);
        }
        let Some(Receiving { mut file, .. }) = receiving.take() else {
            return Err(std::io::Error::other("no snapshot is being received"));
        };
        file.flush().await?;
        file.sync_all().await?;
        Ok(Some(file))
    }

    /// A file to receive a snapshot into (one receive at a time).
    pub async fn begin_receiving(&self) -> std::io::Result<tokio::fs::File> {
        info!("receiving a snapshot");
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(self.dir.join(INCOMING))
            .await?;
        Ok(f)
    }

    /// Makes `file` (in the snapshot directory) the current snapshot, durably (file, metadata and
    /// directory fsynced), removes older snapshot files, and raises the purge limit to it.
    /// Callers hold the publish lock.
    async fn publish(&self, meta: &SnapMeta, file: &Path) -> Result<PathBuf, SnapshotError> {
        let name = format!("snap-{}.dump", meta.snapshot_id);
        let dest = self.dir.join(&name);
        tokio::fs::File::open(file).await?.sync_all().await?;
        tokio::fs::rename(file, &dest).await?;
        let cur = CurrentSnapshot {
            meta: meta.clone(),
            file: name.clone(),
        };
        let tmp = self.dir.join("current.json.tmp");
        let bytes = serde_json::to_vec(&cur).map_err(|e| SnapshotError::Tool(e.to_string()))?;
        {
            let f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut &f, &bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(CURRENT))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        // Durable from here on: the log may be purged up to the snapshot.
        self.limit
            .send_modify(|l| l.covered = meta.last_log_id.max(l.covered));
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("snap-") && n != name {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(dest)
    }

    /// Publishes a snapshot this node built, unless a newer one was published meanwhile (an
    /// install finished during the build): then the built file is dropped and the newer
    /// snapshot returned. The current snapshot never goes back.
    async fn publish_built(
        &self,
        meta: SnapMeta,
        building: &Path,
    ) -> Result<Snapshot, SnapshotError> {
        let _publishing = self.publishing.lock().await;
        if let Some(cur) = load_current(&self.dir)? {
            if cur.meta.last_log_id > meta.last_log_id {
                let _ = tokio::fs::remove_file(building).await;
                info!(built = %meta.snapshot_id, current = %cur.meta.snapshot_id,
                      "a newer snapshot was published during the build; keeping it");
                return Ok(cur.open(&self.dir).await?);
            }
        }
        let path = self.publish(&meta, building).await?;
        let file = tokio::fs::File::open(path).await?;
        Ok(Snapshot {
            meta: meta.openraft(),
            snapshot: SnapshotFile {
                id: meta.snapshot_id,
                file,
            },
        })
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Publishes the archive `archive` (from a backup, see `apply::restore`) as the current
    /// snapshot at log id `last` with the membership `members` (all voters): a new node starts
    /// from it as it would after an interrupted install (`restore_if_ahead`), and its database
    /// takes this membership ([`Self::restore`]).
    pub async fn seed(
        &self,
        last: LogId,
        members: std::collections::BTreeMap<NodeId, NodeAddr>,
        archive: &Path,
    ) -> Result<SnapMeta, SnapshotError> {
        let _publishing = self.publishing.lock().await;
        let (crc, len) = crc_of(archive).await?;
        let voters = members.keys().copied().collect();
        let meta = SnapMeta {
            last_log_id: Some(last),
            last_membership: StoredMembership::new(
                Some(last),
                openraft::Membership::new(vec![voters], members)
                    .map_err(|e| SnapshotError::Tool(format!("the backup's membership: {e}")))?,
            ),
            snapshot_id: format!("{}-{}-{crc:08x}-{len}", last.leader_id.term, last.index),
        };
        self.publish(&meta, archive).await?;
        Ok(meta)
    }

    /// Builds a snapshot, retrying environmental failures until it succeeds or the node stops
    /// (a failed build must not stop Raft).
    pub async fn build(&self) -> std::io::Result<Snapshot> {
        let mut backoff = Duration::from_millis(200);
        let mut shutdown = self.shutdown.clone();
        loop {
            match self.try_build().await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    warn!(error = %e, "building a snapshot failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|s| *s) => return Err(storage_err("node is shutting down")),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn try_build(&self) -> Result<Snapshot, SnapshotError> {
        let started = std::time::Instant::now();
        let mut exporter = Self::connect(&self.db).await?;
        let tx = exporter
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let snapshot_name: String = tx
            .query_one("SELECT pg_export_snapshot()", &[])
            .await?
            .get(0);
        let row = tx
            .query_one("SELECT log_id, membership FROM raftpg.applied", &[])
            .await?;
        let log_id: Option<LogId> = row
            .get::<_, Option<serde_json::Value>>(0)
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| SnapshotError::Tool(format!("raftpg.applied.log_id: {e}")))?;
        let membership: StoredMembership = row
            .get::<_, Option<serde_json::Value>>(1)
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| SnapshotError::Tool(format!("raftpg.applied.membership: {e}")))?
            .unwrap_or_default();
        // Flush rule: a synchronous commit started after the export flushes the WAL of every
        // transaction the snapshot sees.
        let flusher = Self::connect(&self.db).await?;
        flusher
            .batch_execute(
                "SET synchronous_commit = on; BEGIN; SELECT pg_current_xact_id(); COMMIT;",
            )
            .await?;
        let building = self
            .dir
            .join(format!("building-{}.dump", uuid::Uuid::new_v4()));
        let dump = self
            .run_tool(
                "pg_dump",
                &self.dbname(),
                &[
                    "--format=custom".into(),
                    format!("--snapshot={snapshot_name}"),
                    "--compress=1".into(),
                    // A node's own incarnation token (state_machine::Held) never travels.
                    "--exclude-table-data=raftpg.incarnation".into(),
                    "-f".into(),
                    building.display().to_string(),
                ],
            )
            .await;
        tx.commit().await?;
        if let Err(e) = dump {
            let _ = tokio::fs::remove_file(&building).await;
            return Err(e);
        }
        let (crc, len) = crc_of(&building).await?;
        let (term, index) = log_id
            .map(|l| (l.leader_id.term, l.index))
            .unwrap_or((0, 0));
        let meta = SnapMeta {
            last_log_id: log_id,
            last_membership: membership,
            snapshot_id: format!("{term}-{index}-{crc:08x}-{len}"),
        };
        let id = meta.snapshot_id.clone();
        let snapshot = self.publish_built(meta, &building).await?;
        info!(id = %id, bytes = len, ms = started.elapsed().as_millis() as u64, "built snapshot");
        crate::metrics::get()
            .snapshot_build_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(snapshot)
    }

    /// Installs the received snapshot (`incoming.dump`): verify it, publish it (durable, and the
    /// log may be purged up to it from then on; a crash from here on restores it at restart, see
    /// [`Self::restore_if_ahead`]), then restore it into the database — unless an earlier attempt
    /// already swapped it in (not when `replace`: a rebuild replaces a database that is at the
    /// snapshot's log id but differs). Safe to call again after any failure.
    pub async fn install(&self, meta: &SnapMeta, replace: bool) -> Result<(), SnapshotError> {
        let current = match self.publish_received(meta).await {
            // A rebuild (service::repair) installed a newer snapshot while openraft was
            // sending this one: the database is past it already (openraft then applies from
            // this snapshot on, and the state machine skips what the database holds).
            Err(SnapshotError::Stale { .. })
                if !replace && self.database_log_id(&self.dbname()).await? >= meta.last_log_id =>
            {
                info!(id = %meta.snapshot_id, "the database is past this snapshot already (a rebuild installed a newer one)");
                return Ok(());
            }
            other => other?,
        };
        // Leftovers of an attempt interrupted by a PostgreSQL crash: the database refusing
        // connections, a half-restored or a replaced database.
        self.recover().await?;
        if !replace && self.database_log_id(&self.dbname()).await? == meta.last_log_id {
            info!(id = %meta.snapshot_id, "the database already holds the snapshot (an earlier attempt swapped it in)");
            return Ok(());
        }
        self.restore(meta, &current).await
    }

    /// Verifies `incoming.dump` against the snapshot id (CRC-32 and length) and publishes it.
    /// Returns the published file (on a retry, `incoming.dump` is gone: an earlier attempt
    /// published it).
    async fn publish_received(&self, meta: &SnapMeta) -> Result<PathBuf, SnapshotError> {
        let _publishing = self.publishing.lock().await;
        let current = self.dir.join(format!("snap-{}.dump", meta.snapshot_id));
        let incoming = self.dir.join(INCOMING);
        if !tokio::fs::try_exists(&incoming).await? {
            return Ok(current);
        }
        if let Some(cur) = load_current(&self.dir)? {
            if cur.meta.last_log_id > meta.last_log_id {
                return Err(SnapshotError::Stale {
                    id: meta.snapshot_id.clone(),
                    current: cur.meta.snapshot_id,
                });
            }
        }
        let (crc, len) = crc_of(&incoming).await?;
        let want = format!("{:08x}-{len}", crc);
        if !meta.snapshot_id.ends_with(&want) {
            return Err(SnapshotError::Corrupt {
                id: meta.snapshot_id.clone(),
                why: format!("received file has crc-len {want}"),
            });
        }
        self.publish(meta, &incoming).await
    }

    /// At start-up: if the current snapshot is ahead of what the database has applied (the node
    /// stopped while installing it), restore it. Returns whether it did.
    pub async fn restore_if_ahead(&self, applied: Option<LogId>) -> Result<bool, SnapshotError> {
        let Some(cur) = load_current(&self.dir)? else {
            return Ok(false);
        };
        if cur.meta.last_log_id <= applied {
            return Ok(false);
        }
        warn!(id = %cur.meta.snapshot_id, applied = ?applied.map(|l| l.index),
              "the database is behind the current snapshot (an install was interrupted); restoring it");
        self.restore(&cur.meta, &self.dir.join(&cur.file)).await?;
        Ok(true)
    }

    /// The applied log id stored in database `dbname`.
    async fn database_log_id(&self, dbname: &str) -> Result<Option<LogId>, SnapshotError> {
        let mut cfg = self.db.clone();
        cfg.dbname(dbname);
        let client = Self::connect(&cfg).await?;
        let got: Option<serde_json::Value> = client
            .query_one("SELECT log_id FROM raftpg.applied", &[])
            .await?
            .get(0);
        got.map(serde_json::from_value)
            .transpose()
            .map_err(|e| SnapshotError::Tool(format!("{dbname}: raftpg.applied.log_id: {e}")))
    }

    /// Restores the archive `file` into a fresh database, checks it is at the snapshot's log id,
    /// and swaps it in. Starts by repairing what an interrupted attempt left behind, so it can
    /// be called again after any failure.
    async fn restore(&self, meta: &SnapMeta, file: &Path) -> Result<(), SnapshotError> {
        let started = std::time::Instant::now();
        info!(id = %meta.snapshot_id, "installing snapshot");
        self.set_progress(Some(InstallProgress {
            snapshot_id: meta.snapshot_id.clone(),
            phase: "restoring",
            bytes_done: size_of_id(&meta.snapshot_id),
            bytes_total: size_of_id(&meta.snapshot_id),
            since: started,
        }));
        let restored = self.restore_and_swap(meta, file, started).await;
        self.set_progress(None);
        restored
    }

    /// [`Self::restore`] without the progress bookkeeping.
    async fn restore_and_swap(
        &self,
        meta: &SnapMeta,
        file: &Path,
        started: std::time::Instant,
    ) -> Result<(), SnapshotError> {
        self.recover().await?;
        let admin = Self::connect(&self.admin()).await?;
        self.create_roles_of(&admin, file).await?;
        let restore_db = self.restore_into_fresh_database(&admin, file).await?;
        // The restored database must be at exactly the snapshot's log position.
        let got = self.database_log_id(&restore_db).await?;
        if got != meta.last_log_id {
            return Err(SnapshotError::Corrupt {
                id: meta.snapshot_id.clone(),
                why: format!(
                    "restored database is at {got:?}, expected {:?}",
                    meta.last_log_id
                ),
            });
        }
        // The database takes the snapshot's membership: the same one for a snapshot this
        // cluster built, the new cluster's for a backup a new node was seeded from (`seed`).
        let membership = serde_json::to_value(&meta.last_membership)
            .map_err(|e| SnapshotError::Tool(format!("encoding the membership: {e}")))?;
        Self::connect(&self.on_database(&restore_db))
            .await?
            .execute("UPDATE raftpg.applied SET membership = $1", &[&membership])
            .await?;
        self.swap_in(&admin, &restore_db).await?;
        info!(id = %meta.snapshot_id, "swapped the restored database in");
        let replaced_db = format!("{}_replaced", self.dbname());
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {replaced_db} WITH (FORCE)"
            ))
            .await?;
        info!(id = %meta.snapshot_id, ms = started.elapsed().as_millis() as u64, "installed snapshot");
        crate::metrics::get()
            .snapshot_install_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Creates and updates the roles the archive `file` recorded (`raftpg.applied.roles`, see
    /// `apply::roles`), so that its owners and grants exist when it is restored: restores that
    /// one table into a scratch database `<db>_roles`, reads the state, drops the scratch
    /// database. Roles the archive does not have are dropped later, when the applier connects
    /// to the restored database.
    async fn create_roles_of(
        &self,
        admin: &tokio_postgres::Client,
        file: &Path,
    ) -> Result<(), SnapshotError> {
        let scratch = format!("{}_roles", self.dbname());
        // Two commands: DROP/CREATE DATABASE cannot run in the implicit transaction of one.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"))
            .await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {scratch} TEMPLATE template0"))
            .await?;
        let state = async {
            {
                let db = Self::connect(&self.on_database(&scratch)).await?;
                db.batch_execute("CREATE SCHEMA raftpg").await?;
            }
            self.run_tool(
                "pg_restore",
                &scratch,
                &[
                    "--schema=raftpg".into(),
                    "--table=applied".into(),
                    "--exit-on-error".into(),
                    file.display().to_string(),
                ],
            )
            .await?;
            let db = Self::connect(&self.on_database(&scratch)).await?;
            let row = db
                .query_opt(
                    "SELECT roles FROM raftpg.applied WHERE roles IS NOT NULL",
                    &[],
                )
                .await?;
            Ok::<_, SnapshotError>(row.map(|r| r.get::<_, serde_json::Value>(0)))
        }
        .await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"))
            .await?;
        if let Some(state) = state? {
            // raftpg's functions live in the node's database (the applier created them).
            let db = Self::connect(&self.db).await?;
            db.execute("SELECT raftpg.apply_roles($1, false)", &[&state])
                .await?;
        }
        Ok(())
    }

    /// Creates `<db>_restore` (same locale as the node's database; [`Self::recover`] dropped
    /// any earlier one) and restores `file` into it in one transaction. Returns its name. The
    /// node's database is not touched.
    async fn restore_into_fresh_database(
        &self,
        admin: &tokio_postgres::Client,
        file: &Path,
    ) -> Result<String, SnapshotError> {
        let db = self.dbname();
        let restore_db = format!("{db}_restore");
        let locale = admin
            .query_one(
                "SELECT datcollate, datctype FROM pg_database WHERE datname = $1",
                &[&db],
            )
            .await?;
        let (collate, ctype): (String, String) = (locale.get(0), locale.get(1));
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {restore_db} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE '{collate}' LC_CTYPE '{ctype}'"
            ))
            .await?;
        self.run_tool(
            "pg_restore",
            &restore_db,
            &[
                "--single-transaction".into(),
                "--exit-on-error".into(),
                file.display().to_string(),
            ],
        )
        .await?;
        Ok(restore_db)
    }

    /// Swaps `restore_db` in as the node's database: no connections to either, then both
    /// renames in one transaction (the node's database becomes `<db>_replaced`). Atomic: a
    /// crash leaves either the old or the new database under the node's database name.
    async fn swap_in(
        &self,
        admin: &tokio_postgres::Client,
        restore_db: &str,
    ) -> Result<(), SnapshotError> {
        let db = self.dbname();
        let replaced_db = format!("{db}_replaced");
        admin
            .batch_execute(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false"))
            .await?;
        let mut attempt = 0;
        loop {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
                    &[&vec![db.clone(), restore_db.to_string()]],
                )
                .await?;
            let swap = admin
                .batch_execute(&format!(
                    "BEGIN; ALTER DATABASE {db} RENAME TO {replaced_db}; ALTER DATABASE {restore_db} RENAME TO {db}; COMMIT;"
                ))
                .await;
            match swap {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 50 => {
                    let _ = admin.batch_execute("ROLLBACK").await;
                    attempt += 1;
                    warn!(error = %e, "database swap refused; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let _ = admin.batch_execute("ROLLBACK").await;
                    let _ = admin
                        .batch_execute(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true"))
                        .await;
                    return Err(e.into());
                }
            }
        }
    }

    /// Repairs what an interrupted install can leave behind: the node's database refusing
    /// connections, or leftover restore/replaced databases.
    pub async fn recover(&self) -> Result<(), SnapshotError> {
        let db = self.dbname();
        let admin = Self::connect(&self.admin()).await?;
        let exists = |name: String| {
            let admin = &admin;
            async move {
                Ok::<bool, tokio_postgres::Error>(
                    admin
                        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                        .await?
                        .is_some(),
                )
            }
        };
        if !exists(db.clone()).await? && exists(format!("{db}_replaced")).await? {
            admin
                .batch_execute(&format!("ALTER DATABASE {db}_replaced RENAME TO {db}"))
                .await?;
        }
        if exists(db.clone()).await? {
            admin
                .batch_execute(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true"))
                .await?;
        }
        for leftover in [
            format!("{db}_restore"),
            format!("{db}_replaced"),
            format!("{db}_roles"),
        ] {
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {leftover} WITH (FORCE)"))
                .await?;
        }
        Ok(())
    }
}

/// The cause of a PostgreSQL error (tokio-postgres does not print it: "error connecting to
/// server" alone hides whether the socket was missing, refused, ...; "db error" hides the
/// server's message, e.g. that it is still starting up).
fn source_text(e: &tokio_postgres::Error) -> String {
    use std::error::Error;
    match e.source() {
        Some(s) => format!(": {s}"),
        None => String::new(),
    }
}
