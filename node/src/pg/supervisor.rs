//! The node's PostgreSQL: either an embedded server that this module creates and supervises, or
//! an existing server reached by URL.
//!
//! Owns the PostgreSQL process (embedded mode): `initdb` on first start (fixed encoding and
//! locale, so that every node sorts and compares text the same way), the `postgres` child
//! process on a private Unix socket (no TCP listener), its restart when it dies, and its
//! shutdown. When the node runs as root, PostgreSQL runs as an unprivileged OS user
//! (`postgres` by default), as PostgreSQL itself requires.
//!
//! Invariant 4 (only the log writes): the applier connects as the superuser `raftpg`; reads
//! connect as `raftpg_reader`, which holds only `pg_read_all_data`. The socket directory is
//! private to the PostgreSQL OS user (and root).

use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// The database holding the user's tables and raftpg's bookkeeping schema `raftpg`.
pub const DATABASE: &str = "raftpg";
/// Superuser used by the applier (embedded mode).
pub const APPLIER_ROLE: &str = "raftpg";
/// Read-only role used by the read API (embedded mode).
pub const READER_ROLE: &str = "raftpg_reader";
/// Longest wait for a starting PostgreSQL to accept connections.
const START_WAIT_MAX: Duration = Duration::from_secs(120);
/// Longest wait for an orphaned or stopping postmaster to exit before it is killed.
const STOP_WAIT_MAX: Duration = Duration::from_secs(30);

/// Errors of the PostgreSQL layer.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Binaries not found.
    #[error("PostgreSQL binaries not found: {0}. Install the Debian package postgresql-15 or pass --pg-bin-dir")]
    Binaries(String),
    /// The unprivileged OS user does not exist.
    #[error("running as root, PostgreSQL must run as an unprivileged OS user, but user {0:?} does not exist (create it or pass --pg-os-user)")]
    NoOsUser(String),
    /// A path the PostgreSQL user must reach is not accessible.
    #[error("the PostgreSQL OS user cannot reach {0}: every parent directory of the data directory must be searchable (chmod o+x) by it")]
    Unreachable(String),
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// `initdb` failed.
    #[error("initdb failed (exit {status}); see {log}")]
    Initdb {
        /// Exit status.
        status: String,
        /// Log file path.
        log: String,
    },
    /// PostgreSQL did not come up.
    #[error("PostgreSQL did not accept connections within {secs} s; see {log}")]
    StartTimeout {
        /// Seconds waited.
        secs: u64,
        /// Log file path.
        log: String,
    },
    /// A SQL error while preparing the database.
    #[error("preparing the raftpg database failed: {0}")]
    Sql(#[from] tokio_postgres::Error),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let context = context.into();
    move |source| PgError::Io { context, source }
}

/// How the node reaches PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgEndpoints {
    /// Connection used by the applier (the only writer).
    pub applier: tokio_postgres::Config,
    /// Connections used by reads.
    pub reader: tokio_postgres::Config,
    /// Human-readable description (socket path or URL) for logs and docs.
    pub describe: String,
}

/// Health of the node's PostgreSQL as the supervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgHealth {
    /// Being started (or restarted).
    Starting,
    /// Accepting connections.
    Up,
    /// Died; a restart is pending.
    Down(String),
    /// Stopped for node shutdown.
    Stopped,
}

/// Settings of the embedded PostgreSQL.
#[derive(Clone, Debug)]
pub struct EmbeddedSettings {
    /// Directory of this node's data; PostgreSQL lives in `<dir>/postgres`.
    pub node_data_dir: PathBuf,
    /// Directory with `initdb` and `postgres`; found automatically when `None`.
    pub bin_dir: Option<PathBuf>,
    /// OS user PostgreSQL runs as when the node runs as root.
    pub os_user: String,
    /// Port number (names the Unix socket file; no TCP listener is opened).
    pub port: u16,
    /// `shared_buffers` setting.
    pub shared_buffers: String,
}

/// Finds the directory holding `initdb` and `postgres`: `$PATH` first, then the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir(explicit: Option<&Path>) -> Result<PathBuf, PgError> {
    let has_both = |d: &Path| d.join("postgres").is_file() && d.join("initdb").is_file();
    if let Some(d) = explicit {
        return if has_both(d) {
            Ok(d.to_path_buf())
        } else {
            Err(PgError::Binaries(format!(
                "{} has no postgres/initdb",
                d.display()
            )))
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            // Resolve symlinks (Debian links initdb into /usr/local/bin on some machines).
            if d.join("postgres").is_file() {
                if let Ok(real) = std::fs::canonicalize(d.join("postgres")) {
                    if let Some(parent) = real.parent() {
                        if has_both(parent) {
                            return Ok(parent.to_path_buf());
                        }
                    }
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|(_, d)| d)
        .find(|d| has_both(d))
        .ok_or_else(|| PgError::Binaries("not on PATH and no /usr/lib/postgresql/*/bin".into()))
}

/// (uid, gid) PostgreSQL must run as, or `None` when the node is not root.
fn os_identity(user: &str) -> Result<Option<(u32, u32)>, PgError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new(user).map_err(|_| PgError::NoOsUser(user.to_string()))?;
    // SAFETY: `name` is a valid C string; getpwnam returns a pointer into static storage that we
    // read immediately, before any other call could overwrite it.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(PgError::NoOsUser(user.to_string()));
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn signal(pid: i32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: sending a signal to a pid has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The embedded PostgreSQL server and its supervisor.
pub struct EmbeddedPostgres {
    settings: EmbeddedSettings,
    bin_dir: PathBuf,
    identity: Option<(u32, u32)>,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
}

impl EmbeddedPostgres {
    /// Resolves binaries and the OS user and creates the directories (does not start anything).
    pub fn new(settings: EmbeddedSettings) -> Result<Self, PgError> {
        let bin_dir = find_bin_dir(settings.bin_dir.as_deref())?;
        let identity = os_identity(&settings.os_user)?;
        let root = settings.node_data_dir.join("postgres");
        Ok(EmbeddedPostgres {
            pgdata: root.join("data"),
            socket_dir: root.join("run"),
            log_path: root.join("postgres.log"),
            settings,
            bin_dir,
            identity,
        })
    }

    /// The directory with PostgreSQL's programs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Connection settings for the applier and the readers.
    pub fn endpoints(&self) -> PgEndpoints {
        let mut applier = tokio_postgres::Config::new();
        applier
            .host_path(&self.socket_dir)
            .port(self.settings.port)
            .user(APPLIER_ROLE)
            .dbname(DATABASE)
            .application_name("raftpg-applier")
            .connect_timeout(Duration::from_secs(5));
        let mut reader = applier.clone();
        reader.user(READER_ROLE).application_name("raftpg-reader");
        PgEndpoints {
            applier,
            reader,
            describe: format!(
                "psql -h {} -p {} -U {} {}",
                self.socket_dir.display(),
                self.settings.port,
                READER_ROLE,
                DATABASE
            ),
        }
    }

    fn own(&self, path: &Path, mode: u32) -> Result<(), PgError> {
        std::fs::create_dir_all(path).map_err(io(format!("creating {}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {}", path.display())))?;
        if let Some((uid, gid)) = self.identity {
            chown(path, Some(uid), Some(gid)).map_err(io(format!("chown {}", path.display())))?;
        }
        Ok(())
    }

    fn check_reachable(&self) -> Result<(), PgError> {
        if self.identity.is_none() {
            return Ok(());
        }
        let abs = std::fs::canonicalize(&self.settings.node_data_dir).map_err(io(format!(
            "resolving {}",
            self.settings.node_data_dir.display()
        )))?;
        for dir in abs.ancestors() {
            let meta = std::fs::metadata(dir).map_err(io(format!("stat {}", dir.display())))?;
            if meta.permissions().mode() & 0o001 == 0 {
                return Err(PgError::Unreachable(dir.display().to_string()));
            }
        }
        Ok(())
    }

    fn command(&self, program: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.identity {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.settings.node_data_dir);
        cmd.env("LC_ALL", "C.UTF-8");
        // Own process group: a Ctrl-C in the terminal reaches the node, which stops PostgreSQL
        // in order, instead of reaching PostgreSQL directly.
        cmd.process_group(0);
        cmd
    }

    fn log_file(&self) -> Result<std::fs::File, PgError> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io(format!("opening {}", self.log_path.display())))
    }

    /// Creates the cluster with `initdb` if it does not exist yet. Crash-safe: initdb runs in a
    /// scratch directory that is renamed into place only when complete.
    pub fn init_if_needed(&self) -> Result<(), PgError> {
        std::fs::create_dir_all(&self.settings.node_data_dir).map_err(io(format!(
            "creating {}",
            self.settings.node_data_dir.display()
        )))?;
        if self.identity.is_some() {
            // PostgreSQL must be able to traverse the node's directory.
            let dir = &self.settings.node_data_dir;
            let mode = std::fs::metadata(dir)
                .map_err(io("stat data dir"))?
                .permissions()
                .mode();
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))
                .map_err(io("chmod data dir"))?;
        }
        self.check_reachable()?;
        let root = self.settings.node_data_dir.join("postgres");
        std::fs::create_dir_all(&root).map_err(io("creating postgres dir"))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
            .map_err(io("chmod postgres dir"))?;
        self.own(&self.socket_dir, 0o700)?;
        let log = self.log_file()?;
        if let Some((uid, gid)) = self.identity {
            chown(&self.log_path, Some(uid), Some(gid)).map_err(io("chown log"))?;
        }
        if self.pgdata.join("PG_VERSION").is_file() {
            return Ok(());
        }
        let scratch = root.join("data.initdb");
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).map_err(io("removing an interrupted initdb"))?;
        }
        self.own(&scratch, 0o700)?;
        info!(dir = %self.pgdata.display(), "initializing PostgreSQL (initdb)");
        let status = self
            .command("initdb")
            .arg("-D")
            .arg(&scratch)
            .args([
                "-U",
                APPLIER_ROLE,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ])
            .stdout(log.try_clone().map_err(io("log fd"))?)
            .stderr(log)
            .status()
            .map_err(io("running initdb"))?;
        if !status.success() {
            return Err(PgError::Initdb {
                status: status.to_string(),
                log: self.log_path.display().to_string(),
            });
        }
        std::fs::rename(&scratch, &self.pgdata)
            .map_err(io("renaming the new cluster into place"))?;
        Ok(())
    }

    /// A postmaster left running by a previous node process (killed with -9) holds the data
    /// directory; stop it (fast shutdown, then harder) so that this node owns PostgreSQL.
    async fn stop_orphan(&self) {
        let Ok(text) = std::fs::read_to_string(self.pgdata.join("postmaster.pid")) else {
            return;
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !pid_alive(pid) || comm.trim() != "postgres" {
            return;
        }
        warn!(
            pid,
            "stopping a PostgreSQL left running by an earlier node process"
        );
        stop_pid(pid).await;
    }

    fn spawn(&self) -> Result<Child, PgError> {
        let log = self.log_file()?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.pgdata)
            .arg("-c")
            .arg("listen_addresses=")
            .arg("-c")
            // Quoted: the setting is a comma-separated list, and data directories may
            // contain commas or spaces.
            .arg(format!(
                "unix_socket_directories=\"{}\"",
                self.socket_dir.display().to_string().replace('"', "\"\"")
            ))
            .arg("-c")
            .arg(format!("port={}", self.settings.port))
            .arg("-c")
            .arg(format!("shared_buffers={}", self.settings.shared_buffers))
            .args(["-c", "max_connections=100"])
            .args(["-c", "fsync=on", "-c", "full_page_writes=on"])
            .args(["-c", "max_prepared_transactions=0"])
            .args([
                "-c",
                "log_min_messages=warning",
                "-c",
                "log_line_prefix=%m [%p] ",
            ])
            .stdout(log.try_clone().map_err(io("log fd"))?)
            .stderr(log)
            .stdin(std::process::Stdio::null());
        let child = Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(io("starting postgres"))?;
        Ok(child)
    }

    async fn wait_ready(&self, child: &mut Child) -> Result<(), PgError> {
        let deadline = tokio::time::Instant::now() + START_WAIT_MAX;
        let mut admin = self.endpoints().applier;
        admin.dbname("postgres");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(PgError::Io {
                    context: format!(
                        "postgres exited at start ({status}); see {}",
                        self.log_path.display()
                    ),
                    source: std::io::Error::other("exited"),
                });
            }
            if let Ok((client, conn)) = admin.connect(tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                self.prepare_database(&client).await?;
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(PgError::StartTimeout {
                    secs: START_WAIT_MAX.as_secs(),
                    log: self.log_path.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn prepare_database(&self, admin: &tokio_postgres::Client) -> Result<(), PgError> {
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
            .await?
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!("CREATE DATABASE {DATABASE} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C.UTF-8'"))
                .await?;
        }
        admin
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
                     CREATE ROLE {READER_ROLE} LOGIN;
                   END IF;
                 END $$;
                 GRANT pg_read_all_data TO {READER_ROLE};"
            ))
            .await?;
        Ok(())
    }

    /// Resolves once the server's socket file is missing (checked every 2 s).
    async fn socket_lost(&self) {
        let socket = self
            .socket_dir
            .join(format!(".s.PGSQL.{}", self.settings.port));
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if !tokio::fs::try_exists(&socket).await.unwrap_or(true) {
                return;
            }
        }
    }

    /// Starts PostgreSQL and supervises it until `shutdown` turns true: restarts it whenever it
    /// dies, publishing its health on `health`. Returns once PostgreSQL has stopped (or, when
    /// the very first start cannot even spawn the server, right after reporting that error on
    /// `started`).
    pub async fn run(
        self,
        health: watch::Sender<PgHealth>,
        mut shutdown: watch::Receiver<bool>,
        started: tokio::sync::oneshot::Sender<Result<(), PgError>>,
    ) {
        let mut started = Some(started);
        let mut backoff = RESTART_BACKOFF_MIN;
        while !is_set(&shutdown) {
            let _ = health.send(PgHealth::Starting);
            self.stop_orphan().await;
            let child = match self.start(&mut started).await {
                Ok(child) => child,
                Err(StartFailure::Reported) => return,
                Err(StartFailure::Retry(why)) => {
                    let _ = health.send(PgHealth::Down(why));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
                    continue;
                }
            };
            info!(socket = %self.socket_dir.display(), "PostgreSQL is up");
            let _ = health.send(PgHealth::Up);
            backoff = RESTART_BACKOFF_MIN;
            if let Some(tx) = started.take() {
                let _ = tx.send(Ok(()));
            }
            if let Supervised::ShutDown =
                self.supervise(child, &health, &mut shutdown, backoff).await
            {
                break;
            }
        }
        let _ = health.send(PgHealth::Stopped);
    }

    /// Spawns the server and waits until it accepts connections. A spawn failure of the very
    /// first start is sent on `started` (the node cannot start without PostgreSQL); any other
    /// failure is logged, the half-started server stopped, and the caller retries.
    async fn start(
        &self,
        started: &mut Option<tokio::sync::oneshot::Sender<Result<(), PgError>>>,
    ) -> Result<Child, StartFailure> {
        let mut child = match self.spawn() {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "cannot start PostgreSQL");
                if let Some(tx) = started.take() {
                    let _ = tx.send(Err(e));
                    return Err(StartFailure::Reported);
                }
                return Err(StartFailure::Retry(e.to_string()));
            }
        };
        if let Err(e) = self.wait_ready(&mut child).await {
            warn!(error = %e, "PostgreSQL did not come up; retrying");
            stop_child(&mut child).await;
            return Err(StartFailure::Retry(e.to_string()));
        }
        Ok(child)
    }

    /// Watches a running server until it dies (then waits `backoff` before the restart), its
    /// socket file vanishes (then stops it for a restart) or `shutdown` turns true (then stops
    /// it for good).
    async fn supervise(
        &self,
        mut child: Child,
        health: &watch::Sender<PgHealth>,
        shutdown: &mut watch::Receiver<bool>,
        backoff: Duration,
    ) -> Supervised {
        tokio::select! {
            status = child.wait() => {
                let why = match status {
                    Ok(s) => format!("PostgreSQL exited: {s}"),
                    Err(e) => format!("PostgreSQL lost: {e}"),
                };
                error!(reason = %why, "PostgreSQL died; restarting it");
                crate::metrics::get().postgres_restarts.inc();
                let _ = health.send(PgHealth::Down(why));
                tokio::time::sleep(backoff).await;
                Supervised::Restart
            }
            _ = self.socket_lost() => {
                // Something unlinked the socket (e.g. another server that used this path
                // before): nothing can connect any more. A restart creates it again.
                error!(socket = %self.socket_dir.display(), "PostgreSQL's socket file vanished; restarting PostgreSQL");
                crate::metrics::get().postgres_restarts.inc();
                let _ = health.send(PgHealth::Down("socket file vanished".into()));
                stop_child(&mut child).await;
                Supervised::Restart
            }
            _ = wait_set(shutdown) => {
                if child.id().is_some() {
                    info!("stopping PostgreSQL (fast shutdown)");
                }
                stop_child(&mut child).await;
                Supervised::ShutDown
            }
        }
    }
}

/// Shortest and longest wait before PostgreSQL is started again after a failed start (doubling
/// in between; back to the shortest once it is up).
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(200);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why [`EmbeddedPostgres::start`] did not produce a running server.
enum StartFailure {
    /// The error went to the node's start-up, which gives up: supervision ends.
    Reported,
    /// Logged; retry after a back-off (the text is published as the health).
    Retry(String),
}

/// How [`EmbeddedPostgres::supervise`] ended.
enum Supervised {
    /// The server is gone; start it again.
    Restart,
    /// The node is shutting down; the server has stopped.
    ShutDown,
}

/// Stops a child server (fast shutdown, see [`stop_pid`]) and reaps it.
async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        stop_pid(pid as i32).await;
    }
    let _ = child.wait().await;
}

async fn wait_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

fn is_set(flag: &watch::Receiver<bool>) -> bool {
    *flag.borrow()
}

/// Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL, waiting between steps.
async fn stop_pid(pid: i32) {
    for (sig, wait) in [
        (libc::SIGINT, STOP_WAIT_MAX),
        (libc::SIGQUIT, Duration::from_secs(5)),
        (libc::SIGKILL, Duration::from_secs(5)),
    ] {
        signal(pid, sig);
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            if !pid_alive(pid) || is_zombie(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// Settings for an existing PostgreSQL reached by URL (`--pg-url`): both the applier and the
/// readers use it; reads are still READ ONLY transactions.
pub fn external_endpoints(url: &str) -> Result<PgEndpoints, PgError> {
    let applier: tokio_postgres::Config = url.parse().map_err(PgError::Sql)?;
    Ok(PgEndpoints {
        reader: applier.clone(),
        applier,
        describe: "the server given by --pg-url".to_string(),
    })
}
