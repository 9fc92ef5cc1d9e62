//! Node configuration: command-line flags, each also settable as a `RAFTPG_*` environment
//! variable. Defaults run a local cluster given only `--id` and `--data-dir`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// raftpg node: one member of a raftpg cluster. Replicates SQL writes through Raft and applies
/// them in log order to this node's PostgreSQL.
#[derive(Parser, Debug, Clone)]
#[command(name = "raftpg-node", version)]
pub struct NodeConfig {
    /// This node's id (unique in the cluster, > 0).
    #[arg(long, env = "RAFTPG_NODE_ID")]
    pub id: u64,

    /// Directory for this node's Raft log and (embedded mode) its PostgreSQL.
    #[arg(long, env = "RAFTPG_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Address of the client port: the Write, Read and Cluster APIs for applications and
    /// operators. Default: 127.0.0.1:(7000 + id).
    #[arg(long, env = "RAFTPG_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Address clients use to reach the client port (what leader hints name). Default: the
    /// listen address.
    #[arg(long, env = "RAFTPG_ADVERTISE")]
    pub advertise: Option<String>,

    /// Address of the peer port: everything node-to-node (Raft, snapshots, read index,
    /// forwarded requests). Only other nodes need to reach it; with TLS it accepts only node
    /// certificates of the cluster's members. Default: the listen address's IP, port + 1000
    /// (127.0.0.1:(8000 + id) by default).
    #[arg(long, env = "RAFTPG_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,

    /// Address of the PostgreSQL wire protocol port: psql, pgbench and PostgreSQL drivers
    /// connect here (with TLS and SCRAM-SHA-256 unless --insecure). Default: the listen
    /// address's IP, port + 2000 (127.0.0.1:(9000 + id) by default).
    #[arg(long, env = "RAFTPG_PG_LISTEN")]
    pub pg_listen: Option<SocketAddr>,

    /// Address of the HTTP port for operators (plain HTTP, no secrets): Prometheus metrics at
    /// `/metrics`, and `/health`, `/ready`, `/leader` for load balancers and orchestrators.
    /// Default: the listen address's IP, port + 3000 (127.0.0.1:(10000 + id) by default).
    #[arg(long, env = "RAFTPG_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Most wire protocol connections at once; more are refused (53300).
    #[arg(long, env = "RAFTPG_PG_CONNECTIONS_MAX", default_value_t = 256)]
    pub pg_connections_max: usize,

    /// Largest wire protocol message a client may send, in bytes; a larger one ends its
    /// connection (54000).
    #[arg(long, env = "RAFTPG_PG_MESSAGE_BYTES_MAX", default_value_t = 64 * 1024 * 1024)]
    pub pg_message_bytes_max: usize,

    /// Address other nodes use to reach the peer port (what the membership stores). Default:
    /// the host of --advertise with the peer port's port.
    #[arg(long, env = "RAFTPG_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,

    /// Directory with the cluster's certificates (`raftpg cert`): `ca.crt`, `node-<id>.crt`,
    /// `node-<id>.key`. With it the node serves TLS, accepts peer RPCs (Raft, snapshots, read
    /// index, retire) only from a node certificate of the cluster CA naming a current member
    /// and the node the message claims to come from, and presents its own to peers. Without
    /// it the node refuses to start, unless `--insecure`.
    #[arg(long, env = "RAFTPG_TLS_DIR", conflicts_with = "insecure")]
    pub tls_dir: Option<PathBuf>,

    /// File holding the password of the cluster's first administrator (`--admin-user`: a role
    /// that may log in, create roles and administer the cluster as a member of raftpg_admin).
    /// The first leader creates the role when it does not exist yet; give every founding node
    /// the same file. With TLS every client must authenticate, so this is how the first role
    /// comes to be; change its password afterwards with ALTER ROLE. The password itself never
    /// enters the log (only its SCRAM-SHA-256 verifier).
    #[arg(long, env = "RAFTPG_ADMIN_PASSWORD_FILE")]
    pub admin_password_file: Option<PathBuf>,

    /// Name of the first administrator (see --admin-password-file).
    #[arg(long, env = "RAFTPG_ADMIN_USER", default_value = "admin")]
    pub admin_user: String,

    /// Run without TLS: plaintext, anyone who reaches the ports can call every RPC, including
    /// the nodes' own (Raft), and requests without credentials run as raftpg itself. Only for
    /// a network nobody else can reach.
    #[arg(long, env = "RAFTPG_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,

    /// Initial voters, `id=host:port` comma-separated, including this node, where `host:port`
    /// is each node's *peer* address (--peer-advertise). Used once, when the node starts with
    /// an empty log. Without it the node starts a single-node cluster. Each node publishes its
    /// own client address into the membership once it is a member.
    #[arg(long, env = "RAFTPG_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Start without forming a cluster: wait to be added to an existing one as a learner
    /// (`raftpg member add`). Ignores --peers.
    #[arg(long, env = "RAFTPG_JOIN", value_parser = clap::builder::BoolishValueParser::new())]
    pub join: bool,

    /// Seed this new node from a backup file (`raftpg backup`): its database becomes the
    /// backup's, at the backup's log index, in a new cluster whose founding members are
    /// `--peers` (give every founding member the same file) or this node alone (then add the
    /// others with `raftpg member add`). Refused when the data directory holds Raft state;
    /// ignored when it was seeded from this file already.
    #[arg(long, env = "RAFTPG_RESTORE_FROM", conflicts_with = "join")]
    pub restore_from: Option<PathBuf>,

    /// Use an existing PostgreSQL instead of the embedded one (e.g. postgres://u@host/db).
    #[arg(long, env = "RAFTPG_PG_URL")]
    pub pg_url: Option<String>,

    /// Directory with PostgreSQL's `postgres` and `initdb` (default: PATH, then
    /// /usr/lib/postgresql/*/bin).
    #[arg(long, env = "RAFTPG_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// OS user the embedded PostgreSQL runs as when the node runs as root.
    #[arg(long, env = "RAFTPG_PG_OS_USER", default_value = "postgres")]
    pub pg_os_user: String,

    /// Port number of the embedded PostgreSQL (names its private Unix socket; no TCP).
    #[arg(long, env = "RAFTPG_PG_PORT", default_value_t = 5432)]
    pub pg_port: u16,

    /// shared_buffers of the embedded PostgreSQL.
    #[arg(long, env = "RAFTPG_PG_SHARED_BUFFERS", default_value = "128MB")]
    pub pg_shared_buffers: String,

    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "RAFTPG_HEARTBEAT_MS", default_value_t = 100)]
    pub heartbeat_ms: u64,

    /// Minimum election timeout in milliseconds (the maximum is twice this).
    #[arg(long, env = "RAFTPG_ELECTION_TIMEOUT_MS", default_value_t = 1000)]
    pub election_timeout_ms: u64,

    /// Most writes in flight on this node; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "RAFTPG_WRITE_INFLIGHT_MAX", default_value_t = 1024)]
    pub write_inflight_max: usize,

    /// Most writes proposed together as one Raft entry (group commit; 1 turns it off).
    #[arg(long, env = "RAFTPG_PROPOSAL_BATCH_MAX", default_value_t = 256)]
    pub proposal_batch_max: usize,

    /// Most bytes of writes proposed together as one Raft entry.
    #[arg(long, env = "RAFTPG_PROPOSAL_BATCH_BYTES_MAX", default_value_t = 4 * 1024 * 1024)]
    pub proposal_batch_bytes_max: usize,

    /// Most Raft entries of writes proposed by this node and not yet applied; writes arriving
    /// meanwhile wait and are proposed together. 1 gives the largest entries (best when the
    /// nodes share a few cores, as in `raftpg bench`); more overlaps replication and apply.
    #[arg(long, env = "RAFTPG_PROPOSALS_IN_FLIGHT", default_value_t = 1)]
    pub proposals_in_flight: usize,

    /// Largest write or read request in bytes.
    #[arg(long, env = "RAFTPG_REQUEST_BYTES_MAX", default_value_t = 4 * 1024 * 1024)]
    pub request_bytes_max: usize,

    /// Most statements in one write request.
    #[arg(long, env = "RAFTPG_STATEMENTS_MAX", default_value_t = 1000)]
    pub statements_max: usize,

    /// Most rows one statement of a write may return; more is a deterministic error (54000).
    #[arg(long, env = "RAFTPG_WRITE_RESULT_ROWS_MAX", default_value_t = 10_000)]
    pub write_result_rows_max: usize,

    /// Most bytes (approximate, as encoded) of the rows one write may return, all statements
    /// together; more is a deterministic error (54000). The outcome of a write is also stored
    /// for retries, so it must stay well below PostgreSQL's 255 MiB jsonb limit.
    #[arg(long, env = "RAFTPG_WRITE_RESULT_BYTES_MAX", default_value_t = 16 * 1024 * 1024)]
    pub write_result_bytes_max: usize,

    /// Most rows a read may return (a request may ask for fewer).
    #[arg(long, env = "RAFTPG_READ_ROWS_MAX", default_value_t = 100_000)]
    pub read_rows_max: usize,

    /// Most rows a streamed read (Read.QueryStream) may return.
    #[arg(
        long,
        env = "RAFTPG_READ_STREAM_ROWS_MAX",
        default_value_t = 10_000_000
    )]
    pub read_stream_rows_max: usize,

    /// Most PostgreSQL connections used by reads.
    #[arg(long, env = "RAFTPG_READ_CONNECTIONS_MAX", default_value_t = 16)]
    pub read_connections_max: usize,

    /// Longest wait of a read for its consistency level, in milliseconds (default and cap).
    #[arg(long, env = "RAFTPG_READ_WAIT_MS", default_value_t = 10_000)]
    pub read_wait_ms: u64,

    /// Longest time a write waits for commit and apply, in milliseconds.
    #[arg(long, env = "RAFTPG_WRITE_TIMEOUT_MS", default_value_t = 30_000)]
    pub write_timeout_ms: u64,

    /// For how many later writes the result of a write with a request id is kept, so that a
    /// retry is answered with it instead of being applied again (one row each in
    /// raftpg.requests).
    #[arg(
        long,
        env = "RAFTPG_REQUEST_RETENTION_WRITES",
        default_value_t = 1_000_000
    )]
    pub request_retention_writes: u64,

    /// Take a snapshot (and compact the log) after this many applied entries; 0 never.
    #[arg(long, env = "RAFTPG_SNAPSHOT_EVERY_ENTRIES", default_value_t = 20_000)]
    pub snapshot_every_entries: u64,

    /// Log entries kept before the snapshot's position when compacting (lets slightly lagging
    /// followers catch up from the log instead of a snapshot).
    #[arg(long, env = "RAFTPG_SNAPSHOT_KEEP_ENTRIES", default_value_t = 2_000)]
    pub snapshot_keep_entries: u64,

    /// Apply the leader's own entries only once Raft committed them, instead of executing them
    /// while they replicate (and committing them in PostgreSQL once Raft did). For comparisons.
    #[arg(long, env = "RAFTPG_NO_SPECULATION", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_speculation: bool,

    /// Longest the leader keeps an entry it executed open, waiting for Raft to commit it, before
    /// rolling it back (it is then applied when committed), in milliseconds.
    #[arg(long, env = "RAFTPG_SPECULATION_WAIT_MAX_MS", default_value_t = 2_000)]
    pub speculation_wait_max_ms: u64,

    /// Most entries applied in one PostgreSQL transaction.
    #[arg(long, env = "RAFTPG_APPLY_BATCH_MAX", default_value_t = 256)]
    pub apply_batch_max: usize,

    /// Async worker threads; 0 means one per core, 1 runs everything on one thread (fewest
    /// wake-ups; good when several nodes share a small host).
    #[arg(long, env = "RAFTPG_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Longest an interactive transaction may wait for its client between two statements
    /// before it is rolled back (other writes wait behind an open transaction), in
    /// milliseconds.
    #[arg(long, env = "RAFTPG_TXN_IDLE_MAX_MS", default_value_t = 5_000)]
    pub txn_idle_max_ms: u64,

    /// Longest an interactive transaction may stay open, from BEGIN to COMMIT, in
    /// milliseconds.
    #[arg(long, env = "RAFTPG_TXN_TIME_MAX_MS", default_value_t = 30_000)]
    pub txn_time_max_ms: u64,

    /// Most bytes of statements (their SQL and parameters, as the log entry encodes them) one
    /// interactive transaction may run: a committed transaction is one log entry, which the
    /// leader holds in memory and sends to every follower in one message.
    #[arg(long, env = "RAFTPG_TXN_BYTES_MAX", default_value_t = 32 * 1024 * 1024)]
    pub txn_bytes_max: usize,

    /// Rebuild this node from the leader's snapshot as soon as a check finds its copy different
    /// from the majority's (instead of waiting for `raftpg member rebuild`).
    #[arg(long, env = "RAFTPG_AUTO_REBUILD", value_parser = clap::builder::BoolishValueParser::new())]
    pub auto_rebuild: bool,

    /// DELIBERATELY BROKEN, for the jepsen self-test only: serve LINEARIZABLE reads from the
    /// local copy without asking the leader (stale reads become possible).
    #[arg(long, hide = true)]
    pub unsafe_local_linearizable_reads: bool,
}

/// A configuration error.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl NodeConfig {
    /// The listen address, defaulting to 127.0.0.1:(7000 + id).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        match self.listen {
            Some(a) => Ok(a),
            None => {
                let port = u16::try_from(7000 + self.id).map_err(|_| {
                    ConfigError(format!(
                        "no default port for node id {}; pass --listen",
                        self.id
                    ))
                })?;
                Ok(SocketAddr::from(([127, 0, 0, 1], port)))
            }
        }
    }

    /// The address advertised to peers and clients.
    pub fn advertise_addr(&self) -> Result<String, ConfigError> {
        Ok(match &self.advertise {
            Some(a) => a.clone(),
            None => self.listen_addr()?.to_string(),
        })
    }

    /// The wire protocol port's listen address, defaulting to the listen address's IP with
    /// port + 2000.
    pub fn pg_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        match self.pg_listen {
            Some(a) => Ok(a),
            None => self.listen_addr_plus(2000, "wire protocol", "--pg-listen"),
        }
    }

    /// The operators' HTTP port, defaulting to the listen address's IP with port + 3000.
    pub fn metrics_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        match self.metrics_listen {
            Some(a) => Ok(a),
            None => self.listen_addr_plus(3000, "metrics", "--metrics-listen"),
        }
    }

    /// The listen address's IP with its port `offset` higher (the default of another port).
    fn listen_addr_plus(
        &self,
        offset: u16,
        what: &str,
        flag: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let listen = self.listen_addr()?;
        let port = listen.port().checked_add(offset).ok_or_else(|| {
            ConfigError(format!(
                "no default {what} port for --listen {listen}; pass {flag}"
            ))
        })?;
        Ok(SocketAddr::new(listen.ip(), port))
    }

    /// The peer port's listen address, defaulting to the listen address's IP with port + 1000.
    pub fn peer_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        match self.peer_listen {
            Some(a) => Ok(a),
            None => self.listen_addr_plus(1000, "peer", "--peer-listen"),
        }
    }

    /// The peer address advertised to other nodes: --peer-advertise, or the host of
    /// --advertise with the peer port's port.
    pub fn peer_advertise_addr(&self) -> Result<String, ConfigError> {
        if let Some(a) = &self.peer_advertise {
            return Ok(a.clone());
        }
        let port = self.peer_listen_addr()?.port();
        let advertise = self.advertise_addr()?;
        let host = advertise
            .rsplit_once(':')
            .map(|(h, _)| h)
            .ok_or_else(|| ConfigError(format!("--advertise {advertise:?} is not host:port")))?;
        Ok(format!("{host}:{port}"))
    }

    /// Parses `--peers` into id → peer address, checking that this node is listed.
    pub fn initial_members(&self) -> Result<BTreeMap<u64, String>, ConfigError> {
        let mut out = BTreeMap::new();
        for p in self.peers.iter().filter(|p| !p.trim().is_empty()) {
            let (id, addr) = p
                .split_once('=')
                .ok_or_else(|| ConfigError(format!("peer {p:?} must look like id=host:port")))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| ConfigError(format!("peer {p:?}: id must be a number")))?;
            if out.insert(id, addr.trim().to_string()).is_some() {
                return Err(ConfigError(format!("peer id {id} is listed twice")));
            }
        }
        if out.is_empty() {
            out.insert(self.id, self.peer_advertise_addr()?);
        }
        if !out.contains_key(&self.id) {
            return Err(ConfigError(format!(
                "--peers must include this node (id {})",
                self.id
            )));
        }
        if self.id == 0 {
            return Err(ConfigError("node id must be > 0".into()));
        }
        Ok(out)
    }
}
