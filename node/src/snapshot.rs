//! Snapshots of the user database, for log compaction and for nodes that are too far behind
//! (new or wiped members).
//!
//! Owns `<data-dir>/snapshots`: the current snapshot (`snap-<id>.dump`, a `pg_dump` custom-format
//! archive, and `current.json`, its Raft metadata), a file being built and a file being received.
//!
//! - **Build**: a `REPEATABLE READ READ ONLY` transaction exports its snapshot and reads
//!   `raftpg.applied` in it, so the dump (`pg_dump --snapshot`) and its log id agree. Writes go on
//!   meanwhile. Before the snapshot is published, a synchronously committed transaction makes
//!   PostgreSQL flush its WAL: everything in the snapshot is durable before openraft may purge
//!   the log entries it covers (design.md, `synchronous_commit` trap).
//! - **Transfer**: openraft sends the file in chunks; its id carries a CRC-32 of the whole file,
//!   checked before installing.
//! - **Install**: restore into a fresh database, check its applied log id, then swap it in with
//!   two renames in one transaction; the old database is dropped afterwards. A failure before
//!   the swap leaves the node's database untouched; the install is retried.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openraft::storage::Snapshot;
use openraft::{BasicNode, SnapshotMeta, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::command::{LogId, NodeId, StoredMembership, TypeConfig};

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
}

#[derive(Serialize, Deserialize)]
struct CurrentSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    file: String,
}

/// Where snapshots live and how to reach PostgreSQL for them.
#[derive(Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
    bin_dir: PathBuf,
    db: tokio_postgres::Config,
    shutdown: watch::Receiver<bool>,
}

fn storage_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &std::io::Error::other(e.to_string())).into()
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
    /// Opens the snapshot directory, removing leftovers of interrupted builds and receives.
    pub fn open(
        dir: PathBuf,
        bin_dir: PathBuf,
        db: tokio_postgres::Config,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("building-") || name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(SnapshotStore {
            dir,
            bin_dir,
            db,
            shutdown,
        })
    }

    fn dbname(&self) -> String {
        self.db.get_dbname().unwrap_or("raftpg").to_string()
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
    pub async fn current(&self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let path = self.dir.join("current.json");
        let text = match tokio::fs::read(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(storage_err(e)),
        };
        let cur: CurrentSnapshot = serde_json::from_slice(&text).map_err(storage_err)?;
        let file = tokio::fs::File::open(self.dir.join(&cur.file))
            .await
            .map_err(storage_err)?;
        Ok(Some(Snapshot {
            meta: cur.meta,
            snapshot: Box::new(file),
        }))
    }

    /// A file to receive a snapshot into (one receive at a time).
    pub async fn begin_receiving(&self) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(self.dir.join("incoming.dump"))
            .await
            .map_err(storage_err)?;
        Ok(Box::new(f))
    }

    /// Makes `file` (in the snapshot directory) the current snapshot, atomically, and removes
    /// older snapshot files.
    async fn publish(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        file: &Path,
    ) -> Result<PathBuf, SnapshotError> {
        let name = format!("snap-{}.dump", meta.snapshot_id);
        let dest = self.dir.join(&name);
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
        std::fs::rename(&tmp, self.dir.join("current.json"))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("snap-") && n != name {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(dest)
    }

    /// Builds a snapshot, retrying environmental failures until it succeeds or the node stops
    /// (a failed build must not stop Raft).
    pub async fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
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

    async fn try_build(&self) -> Result<Snapshot<TypeConfig>, SnapshotError> {
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
        let meta = SnapshotMeta {
            last_log_id: log_id,
            last_membership: membership,
            snapshot_id: format!("{term}-{index}-{crc:08x}-{len}"),
        };
        let path = self.publish(&meta, &building).await?;
        info!(id = %meta.snapshot_id, bytes = len, ms = started.elapsed().as_millis() as u64, "built snapshot");
        let file = tokio::fs::File::open(path).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }

    /// Installs the received snapshot (`incoming.dump`): verify it, make it the current snapshot
    /// (so that a crash from here on restores it at restart, see [`Self::restore_if_ahead`]),
    /// then restore it into the database.
    pub async fn install(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
    ) -> Result<(), SnapshotError> {
        let incoming = self.dir.join("incoming.dump");
        if tokio::fs::try_exists(&incoming).await? {
            let (crc, len) = crc_of(&incoming).await?;
            let want = format!("{:08x}-{len}", crc);
            if !meta.snapshot_id.ends_with(&want) {
                return Err(SnapshotError::Corrupt {
                    id: meta.snapshot_id.clone(),
                    why: format!("received file has crc-len {want}"),
                });
            }
            self.publish(meta, &incoming).await?;
        }
        let current = self.dir.join(format!("snap-{}.dump", meta.snapshot_id));
        self.restore(meta, &current).await
    }

    /// At start-up: if the current snapshot is ahead of what the database has applied (the node
    /// stopped while installing it), restore it. Returns whether it did.
    pub async fn restore_if_ahead(&self, applied: Option<LogId>) -> Result<bool, SnapshotError> {
        let Ok(text) = tokio::fs::read(self.dir.join("current.json")).await else {
            return Ok(false);
        };
        let cur: CurrentSnapshot =
            serde_json::from_slice(&text).map_err(|e| SnapshotError::Tool(e.to_string()))?;
        if cur.meta.last_log_id <= applied {
            return Ok(false);
        }
        warn!(id = %cur.meta.snapshot_id, applied = ?applied.map(|l| l.index),
              "the database is behind the current snapshot (an install was interrupted); restoring it");
        self.restore(&cur.meta, &self.dir.join(&cur.file)).await?;
        Ok(true)
    }

    /// Restores the archive `file` into a fresh database and swaps it in.
    async fn restore(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        file: &Path,
    ) -> Result<(), SnapshotError> {
        let started = std::time::Instant::now();
        info!(id = %meta.snapshot_id, "installing snapshot");
        let db = self.dbname();
        let restore_db = format!("{db}_restore");
        let replaced_db = format!("{db}_replaced");
        let admin = Self::connect(&self.admin()).await?;
        let locale = admin
            .query_one(
                "SELECT datcollate, datctype FROM pg_database WHERE datname = $1",
                &[&db],
            )
            .await?;
        let (collate, ctype): (String, String) = (locale.get(0), locale.get(1));
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {restore_db} WITH (FORCE)"
            ))
            .await?;
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
        // The restored database must be at exactly the snapshot's log position.
        let mut restored_cfg = self.db.clone();
        restored_cfg.dbname(&restore_db);
        let restored = Self::connect(&restored_cfg).await?;
        let got: Option<serde_json::Value> = restored
            .query_one("SELECT log_id FROM raftpg.applied", &[])
            .await?
            .get(0);
        drop(restored);
        let got: Option<LogId> = got
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| SnapshotError::Tool(e.to_string()))?;
        if got != meta.last_log_id {
            return Err(SnapshotError::Corrupt {
                id: meta.snapshot_id.clone(),
                why: format!(
                    "restored database is at {got:?}, expected {:?}",
                    meta.last_log_id
                ),
            });
        }
        // Swap: no connections to either database, then both renames in one transaction.
        admin
            .batch_execute(&format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false"))
            .await?;
        let mut attempt = 0;
        loop {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ANY($1) AND pid <> pg_backend_pid()",
                    &[&vec![db.clone(), restore_db.clone()]],
                )
                .await?;
            let swap = admin
                .batch_execute(&format!(
                    "BEGIN; ALTER DATABASE {db} RENAME TO {replaced_db}; ALTER DATABASE {restore_db} RENAME TO {db}; COMMIT;"
                ))
                .await;
            match swap {
                Ok(()) => break,
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
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {replaced_db} WITH (FORCE)"
            ))
            .await?;
        info!(id = %meta.snapshot_id, ms = started.elapsed().as_millis() as u64, "installed snapshot");
        Ok(())
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
        for leftover in [format!("{db}_restore"), format!("{db}_replaced")] {
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {leftover} WITH (FORCE)"))
                .await?;
        }
        Ok(())
    }
}

/// The cause of a PostgreSQL error (tokio-postgres does not print it: "error connecting to
/// server" alone hides whether the socket was missing, refused, ...).
fn source_text(e: &tokio_postgres::Error) -> String {
    use std::error::Error;
    match e.source() {
        Some(s) if e.as_db_error().is_none() => format!(": {s}"),
        _ => String::new(),
    }
}
