//! A running raftpg node: wires the log store, the state machine, the Raft core, the
//! PostgreSQL supervisor and the gRPC server, and shuts them down in order.
//!
//! Owns [`NodeContext`], the shared handles the API services use. Start-up order: PostgreSQL
//! (so the state machine can read its applied index), then Raft, then the gRPC server; the
//! cluster is initialized with `--peers` only when this node's log is empty. Shutdown order
//! (SIGTERM/SIGINT): stop serving, stop Raft, stop PostgreSQL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use raftpg_proto::v1::cluster_server::ClusterServer;
use raftpg_proto::v1::raft_server::RaftServer;
use raftpg_proto::v1::read_server::ReadServer;
use raftpg_proto::v1::write_server::WriteServer;
use tokio::sync::{watch, Semaphore};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::api;
use crate::clock::EntryClock;
use crate::command::{NodeId, Raft};
use crate::config::NodeConfig;
use crate::log_store::LogStore;
use crate::network::{self, Network};
use crate::postgres::{self, EmbeddedPostgres, EmbeddedSettings, PgHealth};
use crate::read_pool::ReadPool;
use crate::snapshot::SnapshotStore;
use crate::state_machine::{ApplierStatus, ApplyLimits, PgStateMachine, StateMachineParts};

/// Limits enforced by the API services.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    /// Largest request in bytes.
    pub request_bytes_max: usize,
    /// Most statements per write.
    pub statements_max: usize,
    /// Most rows a read returns.
    pub read_rows_max: usize,
    /// Most rows a streamed read returns.
    pub read_stream_rows_max: usize,
    /// Longest wait of a read for its consistency level.
    pub read_wait_max: Duration,
    /// Longest wait of a write for commit and apply.
    pub write_timeout: Duration,
}

/// Shared handles of a running node, used by the API services.
pub struct NodeContext {
    /// This node's id.
    pub id: NodeId,
    /// The Raft core.
    pub raft: Raft,
    /// API limits.
    pub limits: ApiLimits,
    /// Read connections.
    pub reads: Arc<ReadPool>,
    /// PostgreSQL health (embedded mode: from the supervisor).
    pub pg_health: watch::Receiver<PgHealth>,
    /// What the applier is doing.
    pub applier: Arc<ApplierStatus>,
    /// Bounds writes in flight on this node.
    pub write_permits: Arc<Semaphore>,
    /// Groups this node's writes into Raft entries (when it leads).
    pub proposer: crate::proposer::Proposer,
    /// Coalesced leadership confirmations for linearizable reads.
    pub read_index: Arc<crate::read_index::ReadIndexBatcher>,
    /// gRPC channels to other nodes (shared with Raft's network).
    peer_channels: network::PeerChannels,
    /// Self-test only (hidden flag): LINEARIZABLE reads skip the read index.
    pub unsafe_local_linearizable_reads: bool,
    /// This node's data directory.
    pub data_dir: PathBuf,
    /// Set when the cluster removed this node: it serves no more reads or writes.
    removed: AtomicBool,
    /// Memo of the leader-side SQL check and rewrite.
    pub prepared_writes: crate::determinism::PreparedWrites,
    /// PostgreSQL version, encoding and collation (read once).
    pg_identity: tokio::sync::OnceCell<PgIdentity>,
}

/// What must match between members' PostgreSQL servers.
#[derive(Clone, Debug)]
pub struct PgIdentity {
    /// server_version_num.
    pub version: String,
    /// Database encoding.
    pub encoding: String,
    /// Database collation.
    pub collation: String,
}

const REMOVED_MARKER: &str = "removed";

impl NodeContext {
    /// A channel to another node's gRPC address (cached).
    pub fn channel_to(&self, addr: &str) -> Result<Channel, tonic::Status> {
        self.peer_channels
            .get(addr)
            .map_err(|e| tonic::Status::internal(format!("bad peer address {addr}: {e}")))
    }

    /// The current leader and its address, if known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// Waits (bounded) until some node is known to lead.
    pub async fn wait_for_leader(&self, wait_max: Duration) -> Option<(NodeId, String)> {
        let deadline = tokio::time::Instant::now() + wait_max;
        let mut rx = self.raft.metrics();
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Whether the cluster removed this node.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// The refusal for a removed node.
    pub fn refuse_if_removed(&self) -> Result<(), tonic::Status> {
        if self.is_removed() {
            // UNAVAILABLE: nothing was done, and clients should use another node.
            return Err(crate::api::not_leader(
                format!(
                    "node {} was removed from the cluster and no longer serves reads or writes; use another node",
                    self.id
                ),
                self.leader().filter(|(id, _)| *id != self.id),
            ));
        }
        Ok(())
    }

    /// Marks this node removed (persistently) and stops it from starting elections.
    pub fn retire(&self, log_index: u64) {
        self.removed.store(true, Ordering::Relaxed);
        if let Err(e) = std::fs::write(
            self.data_dir.join(REMOVED_MARKER),
            format!("removed at log index {log_index}\n"),
        ) {
            warn!(error = %e, "cannot persist the removed marker");
        }
        self.raft.runtime_config().elect(false);
        self.raft.runtime_config().heartbeat(false);
        warn!(
            node = self.id,
            log_index, "this node was removed from the cluster; it stops serving"
        );
    }

    /// This node's PostgreSQL version, encoding and collation.
    pub async fn pg_identity(&self) -> Result<PgIdentity, tonic::Status> {
        self.pg_identity
            .get_or_try_init(|| async {
                let mut pooled = self.reads.get().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let row = pooled
                    .client()
                    .query_one(
                        "SELECT current_setting('server_version_num'), pg_encoding_to_char(encoding), datcollate
                         FROM pg_database WHERE datname = current_database()",
                        &[],
                    )
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("reading PostgreSQL's identity: {e}")))?;
                Ok(PgIdentity {
                    version: row.get(0),
                    encoding: row.get(1),
                    collation: row.get(2),
                })
            })
            .await
            .cloned()
    }

    /// Whether this node currently leads.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }
}

/// Runs a node until SIGTERM/SIGINT.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let listen = cfg.listen_addr()?;
    let advertise = cfg.advertise_addr()?;
    let members = cfg.initial_members()?;
    check_entry_bytes_max(&cfg)?;
    if cfg.pg_url.is_none() && cfg.data_dir.to_string_lossy().contains(',') {
        // libpq (pg_dump, pg_restore) reads a comma in a socket path as a list of hosts.
        anyhow::bail!(
            "--data-dir {} contains a comma; the embedded PostgreSQL's socket lives under it and \
             libpq cannot name such a path; choose a directory without commas",
            cfg.data_dir.display()
        );
    }
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Signal handlers first: a SIGTERM during start-up must still stop PostgreSQL in order.
    let shutdown_tx = Arc::new(shutdown_tx);
    spawn_signal_listener(shutdown_tx.clone())?;

    // 1. PostgreSQL.
    let (health_tx, health_rx) = watch::channel(PgHealth::Starting);
    let mut pg_task = None;
    let (endpoints, bin_dir) = match &cfg.pg_url {
        Some(url) => {
            let _ = health_tx.send(PgHealth::Up);
            (
                postgres::external_endpoints(url)?,
                postgres::find_bin_dir(cfg.pg_bin_dir.as_deref())?,
            )
        }
        None => {
            let pg = EmbeddedPostgres::new(EmbeddedSettings {
                node_data_dir: cfg.data_dir.clone(),
                bin_dir: cfg.pg_bin_dir.clone(),
                os_user: cfg.pg_os_user.clone(),
                port: cfg.pg_port,
                shared_buffers: cfg.pg_shared_buffers.clone(),
            })?;
            pg.init_if_needed()?;
            let endpoints = pg.endpoints();
            let bin_dir = pg.bin_dir().to_path_buf();
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            pg_task = Some(tokio::spawn(pg.run(
                health_tx,
                shutdown_rx.clone(),
                started_tx,
            )));
            started_rx
                .await
                .context("PostgreSQL supervisor ended before starting")?
                .context("starting the embedded PostgreSQL")?;
            (endpoints, bin_dir)
        }
    };
    let served = serve(
        &cfg,
        endpoints,
        bin_dir,
        health_rx,
        shutdown_rx,
        listen,
        advertise,
        members,
    )
    .await;
    // Whatever happened, stop PostgreSQL before exiting.
    let _ = shutdown_tx.send(true);
    if let Some(t) = pg_task {
        let _ = t.await;
    }
    info!(node = cfg.id, "stopped");
    served
}

/// Starts Raft and the gRPC server on a running PostgreSQL and serves until shutdown.
#[allow(clippy::too_many_arguments)]
async fn serve(
    cfg: &NodeConfig,
    endpoints: postgres::PgEndpoints,
    bin_dir: PathBuf,
    health_rx: watch::Receiver<PgHealth>,
    shutdown_rx: watch::Receiver<bool>,
    listen: std::net::SocketAddr,
    advertise: String,
    members: BTreeMap<NodeId, String>,
) -> anyhow::Result<()> {
    info!(node = cfg.id, connect = %endpoints.describe, "PostgreSQL ready");

    // 2. Raft. Connections to peers leave from the listen address when it names one.
    let peer_channels =
        network::PeerChannels::new(Some(listen.ip()).filter(|ip| !ip.is_unspecified()));
    let log_store = LogStore::open(&cfg.data_dir.join("raft-log"))?;
    let log_for_clock = log_store.clone();
    let applier = Arc::new(ApplierStatus::default());
    let clock = Arc::new(EntryClock::default());
    let snapshots = SnapshotStore::open(
        cfg.data_dir.join("snapshots"),
        bin_dir,
        endpoints.applier.clone(),
        shutdown_rx.clone(),
    )
    .context("opening the snapshot directory")?;
    let state_machine = PgStateMachine::new(StateMachineParts {
        node_id: cfg.id,
        log: log_store.clone(),
        snapshots,
        conn_config: endpoints.applier.clone(),
        limits: ApplyLimits {
            batch_entries_max: cfg.apply_batch_max,
            result_rows_max: cfg.write_result_rows_max,
            result_bytes_max: cfg.write_result_bytes_max,
            request_retention_writes: cfg.request_retention_writes,
            ..ApplyLimits::default()
        },
        status: applier.clone(),
        clock: clock.clone(),
        shutdown: shutdown_rx.clone(),
    });
    let raft_config = openraft::Config {
        cluster_name: "raftpg".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_timeout_ms,
        election_timeout_max: cfg.election_timeout_ms * 2,
        snapshot_policy: match cfg.snapshot_every_entries {
            0 => SnapshotPolicy::Never,
            n => SnapshotPolicy::LogsSinceLast(n),
        },
        max_in_snapshot_log_to_keep: cfg.snapshot_keep_entries,
        // Snapshots travel in 4 MiB chunks; installing one restores a database.
        snapshot_max_chunk_size: 4 * 1024 * 1024,
        install_snapshot_timeout: 60_000,
        // Fewer when the entries are large (network::PeerConnection::append_entries).
        max_payload_entries: 512,
        ..Default::default()
    }
    .validate()
    .context("raft configuration")?;
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_config),
        Network {
            channels: peer_channels.clone(),
        },
        log_store.clone(),
        state_machine,
    )
    .await
    .context("starting raft")?;
    if raft.is_initialized().await.unwrap_or(false) {
        info!(node = cfg.id, "raft state found; rejoining the cluster");
    } else if cfg.join {
        info!(
            node = cfg.id,
            "empty log: waiting to be added to a cluster (Cluster.AddLearner)"
        );
    } else {
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
            .collect();
        info!(node = cfg.id, members = ?members, "empty log: initializing the cluster");
        if let Err(e) = raft.initialize(nodes).await {
            warn!(error = %e, "initialize refused (another member may have initialized first)");
        }
    }

    // 3. gRPC.
    let ctx = Arc::new(NodeContext {
        id: cfg.id,
        raft: raft.clone(),
        limits: ApiLimits {
            request_bytes_max: cfg.request_bytes_max,
            statements_max: cfg.statements_max,
            read_rows_max: cfg.read_rows_max,
            read_stream_rows_max: cfg.read_stream_rows_max,
            read_wait_max: Duration::from_millis(cfg.read_wait_ms),
            write_timeout: Duration::from_millis(cfg.write_timeout_ms),
        },
        reads: Arc::new(ReadPool::new(
            endpoints.reader.clone(),
            cfg.read_connections_max,
            Duration::from_millis(cfg.read_wait_ms),
        )),
        pg_health: health_rx,
        applier,
        write_permits: Arc::new(Semaphore::new(cfg.write_inflight_max.max(1))),
        proposer: crate::proposer::Proposer::start(
            raft.clone(),
            log_for_clock,
            clock,
            crate::proposer::ProposerLimits {
                batch_max: cfg.proposal_batch_max.max(1),
                batch_bytes_max: cfg.proposal_batch_bytes_max,
                in_flight_max: cfg.proposals_in_flight.max(1),
                queue_max: cfg.write_inflight_max.max(1),
            },
        ),
        peer_channels: peer_channels.clone(),
        read_index: Default::default(),
        unsafe_local_linearizable_reads: cfg.unsafe_local_linearizable_reads,
        data_dir: cfg.data_dir.clone(),
        removed: AtomicBool::new(cfg.data_dir.join(REMOVED_MARKER).exists()),
        pg_identity: tokio::sync::OnceCell::new(),
        prepared_writes: Default::default(),
    });
    if ctx.is_removed() {
        warn!(node = cfg.id, "this node was removed from its cluster; it serves status only (wipe the data directory to reuse it)");
        raft.runtime_config().elect(false);
    }
    // Decoding limit above the API limit, so that the services can answer an oversized request
    // with a precise RESOURCE_EXHAUSTED instead of a transport error.
    let decode_max = cfg
        .request_bytes_max
        .saturating_mul(4)
        .max(network::RAFT_MESSAGE_BYTES_MAX);
    let write = WriteServer::new(api::write::WriteService::new(ctx.clone()))
        .max_decoding_message_size(decode_max);
    let read = ReadServer::new(api::read::ReadService::new(ctx.clone()))
        .max_decoding_message_size(decode_max);
    let cluster = ClusterServer::new(api::cluster::ClusterService::new(ctx.clone()));
    let raft_svc = RaftServer::new(api::raft::RaftService::new(ctx.clone()))
        .max_decoding_message_size(network::RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(network::RAFT_MESSAGE_BYTES_MAX);

    info!(node = cfg.id, %listen, %advertise, "serving gRPC");
    let mut stop = shutdown_rx.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(4096)
        // Peers share one connection for replication, heartbeats and leadership checks, and
        // cancel calls that time out (partitions, pauses). h2's default of 20 cancelled streams
        // before GOAWAY would then drop the connection replication also runs on.
        .http2_max_pending_accept_reset_streams(Some(1024))
        .add_service(write)
        .add_service(read)
        .add_service(cluster)
        .add_service(raft_svc)
        .serve_with_shutdown(listen, async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    let server = tokio::spawn(server);

    let mut stop = shutdown_rx.clone();
    let _ = stop.wait_for(|s| *s).await;
    info!(node = cfg.id, "shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if let Err(e) = raft.shutdown().await {
        warn!(error = %e, "raft shutdown");
    }
    Ok(())
}

/// Refuses limits under which one log entry (a batch of writes, or one large write) might not
/// fit in one Raft message once encoded (JSON can take up to 6 bytes for a byte of a
/// parameter): replication of such an entry could never succeed. Several entries that do not
/// fit together are sent in smaller AppendEntries (`network`).
fn check_entry_bytes_max(cfg: &NodeConfig) -> anyhow::Result<()> {
    let entry_bytes_max = cfg
        .proposal_batch_bytes_max
        .max(cfg.request_bytes_max)
        .saturating_mul(6);
    anyhow::ensure!(
        entry_bytes_max <= network::APPEND_BYTES_MAX,
        "--request-bytes-max and --proposal-batch-bytes-max must be at most {} bytes (an encoded log entry must fit in one Raft message)",
        network::APPEND_BYTES_MAX / 6
    );
    Ok(())
}

/// Turns SIGTERM/SIGINT into the shutdown signal. Handlers are installed before this returns.
fn spawn_signal_listener(shutdown: Arc<watch::Sender<bool>>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = shutdown.send(true);
    });
    Ok(())
}
