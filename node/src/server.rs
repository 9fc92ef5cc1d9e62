//! A running raftpg node: wires the log store, the state machine, the Raft core, the
//! PostgreSQL supervisor and the gRPC servers of its two ports, and shuts them down in order.
//!
//! The client port (`--listen`) serves Write, Read and Cluster to applications and operators;
//! the peer port (`--peer-listen`) serves the node-to-node Peer service, plus Write, Read and
//! Cluster for requests other nodes forward, and with TLS requires a member's node
//! certificate for all of it (`grpc::peer_auth`). A firewall can expose the client port alone.
//!
//! Builds the [`Service`] every frontend calls. Start-up order: PostgreSQL
//! (so the state machine can read its applied index), then Raft, then the gRPC server; the
//! cluster is initialized with `--peers` only when this node's log is empty. Shutdown order
//! (SIGTERM/SIGINT): stop serving, stop Raft, stop PostgreSQL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use openraft::SnapshotPolicy;
use raftpg_proto::v1::cluster_server::ClusterServer;
use raftpg_proto::v1::peer_server::PeerServer;
use raftpg_proto::v1::read_server::ReadServer;
use raftpg_proto::v1::transaction_server::TransactionServer;
use raftpg_proto::v1::write_server::WriteServer;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::apply::restore;
use crate::apply::snapshot::SnapshotStore;
use crate::apply::state_machine::Raft;
use crate::apply::state_machine::{
    ApplierStatus, ApplyLimits, PgStateMachine, Rebuilder, StateMachineParts, TxnRunner,
};
use crate::auth::authenticator::{Authenticator, Credentials};
use crate::command::{NodeAddr, NodeId};
use crate::config::NodeConfig;
use crate::grpc;
use crate::grpc::peer_auth::{client_port_gate, PeerAuth, PeerPortGate};
use crate::grpc::peers::GrpcPeers;
use crate::pg::read_pool::ReadPool;
use crate::pg::supervisor::{self as postgres, EmbeddedPostgres, EmbeddedSettings, PgHealth};
use crate::raft::clock::EntryClock;
use crate::raft::log_store::LogStore;
use crate::raft::network::{self, Network, PeerChannels};
use crate::raft::proposer::{Proposer, ProposerLimits};
use crate::service::{Limits, Service, ServiceParts, TxnLimits};
use crate::tls::NodeTls;
use crate::wire;

/// Runs a node until SIGTERM/SIGINT.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let listen = cfg.listen_addr()?;
    let advertise = cfg.advertise_addr()?;
    let peer_listen = cfg.peer_listen_addr()?;
    let peer_advertise = cfg.peer_advertise_addr()?;
    anyhow::ensure!(
        peer_listen != listen,
        "--peer-listen and --listen are both {listen}; the peer port needs its own"
    );
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
    let tls = match (&cfg.tls_dir, cfg.insecure) {
        (Some(dir), _) => Some(NodeTls::load(dir, cfg.id)?),
        (None, true) => {
            warn!(
                node = cfg.id,
                "--insecure: no TLS; anyone who reaches this node's port can call every RPC, the nodes' own included; use only on a network nobody else can reach"
            );
            None
        }
        (None, false) => anyhow::bail!(
            "no --tls-dir: give the directory of the cluster's certificates (make them with `raftpg cert cluster --dir DIR`), or --insecure for a network nobody else can reach"
        ),
    };

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
    let started = Started {
        tls,
        endpoints,
        bin_dir,
        health_rx,
        shutdown_rx,
        listen,
        peer_listen,
        addrs: NodeAddr {
            peer: peer_advertise,
            client: advertise,
        },
        members,
    };
    let served = serve(&cfg, started).await;
    // Whatever happened, stop PostgreSQL before exiting.
    let _ = shutdown_tx.send(true);
    if let Some(t) = pg_task {
        let _ = t.await;
    }
    info!(node = cfg.id, "stopped");
    served
}

/// What `run` hands to `serve`: the running PostgreSQL and where to listen.
struct Started {
    /// This node's certificates (`None`: plaintext).
    tls: Option<NodeTls>,
    endpoints: postgres::PgEndpoints,
    bin_dir: PathBuf,
    health_rx: watch::Receiver<PgHealth>,
    shutdown_rx: watch::Receiver<bool>,
    /// The client port.
    listen: std::net::SocketAddr,
    /// The peer port.
    peer_listen: std::net::SocketAddr,
    /// This node's advertised addresses.
    addrs: NodeAddr,
    /// The founding members' peer addresses (`--peers`).
    members: BTreeMap<NodeId, String>,
}

/// The Raft side of a node, as `start_raft` builds it.
struct RaftParts {
    raft: Raft,
    log_store: LogStore,
    applier: Arc<ApplierStatus>,
    clock: Arc<EntryClock>,
    peer_channels: PeerChannels,
    snapshots: SnapshotStore,
    rebuilder: Rebuilder,
    txns: TxnRunner,
}

/// Starts Raft and the gRPC server on a running PostgreSQL and serves until shutdown.
async fn serve(cfg: &NodeConfig, started: Started) -> anyhow::Result<()> {
    info!(node = cfg.id, connect = %started.endpoints.describe, "PostgreSQL ready");
    // 2. Raft.
    let parts = start_raft(cfg, &started).await?;
    let raft = parts.raft.clone();
    // 3. The services and the gRPC server.
    let svc = build_service(cfg, &started, parts);
    if svc.is_removed() {
        warn!(node = cfg.id, "this node was removed from its cluster; it serves status only (wipe the data directory to reuse it)");
        raft.runtime_config().elect(false);
    }
    let servers = grpc_servers(cfg, svc.clone(), &started)?;
    let wire_server = wire_server(cfg, svc.clone(), &started).await?;
    let metrics_addr = cfg.metrics_listen_addr()?;
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| format!("listening for HTTP on {metrics_addr} (--metrics-listen)"))?;
    info!(node = cfg.id, metrics_listen = %metrics_addr, "serving metrics and health probes");
    let http_server = tokio::spawn(crate::http::serve(
        svc.clone(),
        metrics_listener,
        started.shutdown_rx.clone(),
    ));
    tokio::spawn(
        svc.clone()
            .count_leader_changes(started.shutdown_rx.clone()),
    );
    tokio::spawn(svc.clone().publish_own_address(started.shutdown_rx.clone()));
    if let Some(admin) = first_admin(cfg)? {
        tokio::spawn(svc.create_first_admin(admin, started.shutdown_rx.clone()));
    }
    let mut stop = started.shutdown_rx.clone();
    let _ = stop.wait_for(|s| *s).await;
    info!(node = cfg.id, "shutting down");
    for server in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), wire_server).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), http_server).await;
    if let Err(e) = raft.shutdown().await {
        warn!(error = %e, "raft shutdown");
    }
    Ok(())
}

/// Opens the log store and the snapshot store, builds the state machine, starts Raft, and
/// initializes the cluster when this node's log is empty and it was not told to join.
/// Connections to peers leave from the peer listen address when it names one.
async fn start_raft(cfg: &NodeConfig, started: &Started) -> anyhow::Result<RaftParts> {
    let listen_ip = Some(started.peer_listen.ip()).filter(|ip| !ip.is_unspecified());
    let peer_channels = PeerChannels::new(listen_ip, started.tls.as_ref().map(NodeTls::client));
    let log_store = LogStore::open(&cfg.data_dir.join("raft-log"))?;
    let applier = Arc::new(ApplierStatus::default());
    let clock = Arc::new(EntryClock::default());
    let snapshots = SnapshotStore::open(
        cfg.data_dir.join("snapshots"),
        started.bin_dir.clone(),
        started.endpoints.applier.clone(),
        started.shutdown_rx.clone(),
    )
    .context("opening the snapshot directory")?;
    let state_machine = PgStateMachine::new(StateMachineParts {
        node_id: cfg.id,
        log: log_store.clone(),
        snapshots: snapshots.clone(),
        conn_config: started.endpoints.applier.clone(),
        limits: ApplyLimits {
            batch_entries_max: cfg.apply_batch_max,
            result_rows_max: cfg.write_result_rows_max,
            result_bytes_max: cfg.write_result_bytes_max,
            request_retention_writes: cfg.request_retention_writes,
            no_speculation: cfg.no_speculation,
            speculation_wait_max: Duration::from_millis(cfg.speculation_wait_max_ms.max(1)),
            ..ApplyLimits::default()
        },
        status: applier.clone(),
        clock: clock.clone(),
        shutdown: started.shutdown_rx.clone(),
    });
    if let Some(file) = &cfg.restore_from {
        restore::seed_if_new(
            cfg.id,
            &cfg.data_dir,
            file,
            &started.members,
            &log_store,
            &snapshots,
        )
        .await
        .with_context(|| format!("--restore-from {}", file.display()))?;
    }
    let rebuilder = state_machine.rebuilder();
    let txns = state_machine.txn_runner();
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_config(cfg)?),
        Network {
            channels: peer_channels.clone(),
        },
        log_store.clone(),
        state_machine,
    )
    .await
    .context("starting raft")?;
    initialize_if_new(cfg, &raft, &started.members).await;
    Ok(RaftParts {
        raft,
        log_store,
        applier,
        clock,
        peer_channels,
        snapshots,
        rebuilder,
        txns,
    })
}

/// openraft's configuration from the node's flags.
fn raft_config(cfg: &NodeConfig) -> anyhow::Result<openraft::Config> {
    openraft::Config {
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
    .context("raft configuration")
}

/// Initializes the cluster with `--peers` when this node's log is empty, unless it was
/// started with `--join` (then it waits to be added).
async fn initialize_if_new(cfg: &NodeConfig, raft: &Raft, members: &BTreeMap<NodeId, String>) {
    if raft.is_initialized().await.unwrap_or(false) {
        info!(node = cfg.id, "raft state found; rejoining the cluster");
    } else if cfg.join {
        info!(
            node = cfg.id,
            "empty log: waiting to be added to a cluster (Cluster.AddLearner)"
        );
    } else {
        // Every founding member writes this membership at log index 0 itself, so it must be
        // the same on every node: peer addresses only (from `--peers`). Client addresses are
        // published afterwards, through the log.
        let nodes: BTreeMap<NodeId, NodeAddr> = members
            .iter()
            .map(|(id, addr)| (*id, NodeAddr::peer_only(addr.clone())))
            .collect();
        info!(node = cfg.id, members = ?members, "empty log: initializing the cluster");
        if let Err(e) = raft.initialize(nodes).await {
            warn!(error = %e, "initialize refused (another member may have initialized first)");
        }
    }
}

/// The node's services over its Raft core, read pool and proposer.
fn build_service(cfg: &NodeConfig, started: &Started, parts: RaftParts) -> Arc<Service> {
    let raft = parts.raft;
    let reads = Arc::new(ReadPool::new(
        started.endpoints.reader.clone(),
        cfg.read_connections_max,
        Duration::from_millis(cfg.read_wait_ms),
    ));
    let authenticator = Authenticator::new(reads.clone());
    if cfg.admin_password_file.is_some() {
        // Created through the log shortly (`Service::create_first_admin`): until then, "retry".
        authenticator.expect_first_admin(&cfg.admin_user);
    }
    Service::new(ServiceParts {
        id: cfg.id,
        raft: raft.clone(),
        limits: Limits {
            request_bytes_max: cfg.request_bytes_max,
            statements_max: cfg.statements_max,
            read_rows_max: cfg.read_rows_max,
            read_stream_rows_max: cfg.read_stream_rows_max,
            read_wait_max: Duration::from_millis(cfg.read_wait_ms),
            write_timeout: Duration::from_millis(cfg.write_timeout_ms),
        },
        reads: reads.clone(),
        authenticator,
        // With TLS every request authenticates; --insecure lets anonymous requests run as
        // raftpg.
        auth_required: started.tls.is_some(),
        pg_health: started.health_rx.clone(),
        applier: parts.applier,
        write_inflight_max: cfg.write_inflight_max,
        proposer: Proposer::start(
            raft.clone(),
            parts.log_store,
            parts.clock,
            ProposerLimits {
                batch_max: cfg.proposal_batch_max.max(1),
                batch_bytes_max: cfg.proposal_batch_bytes_max,
                in_flight_max: cfg.proposals_in_flight.max(1),
                queue_max: cfg.write_inflight_max.max(1),
            },
        ),
        peers: Arc::new(GrpcPeers::new(cfg.id, parts.peer_channels)),
        unsafe_local_linearizable_reads: cfg.unsafe_local_linearizable_reads,
        data_dir: cfg.data_dir.clone(),
        insecure: started.tls.is_none(),
        addrs: started.addrs.clone(),
        snapshots: parts.snapshots,
        rebuilder: parts.rebuilder,
        auto_rebuild: cfg.auto_rebuild,
        txns: Some(parts.txns),
        txn_limits: TxnLimits {
            idle_max: Duration::from_millis(cfg.txn_idle_max_ms.max(1)),
            time_max: Duration::from_millis(cfg.txn_time_max_ms.max(1)),
            bytes_max: cfg.txn_bytes_max,
            ..TxnLimits::default()
        },
    })
}

/// Starts the PostgreSQL wire protocol listener (`--pg-listen`); it serves until shutdown.
async fn wire_server(
    cfg: &NodeConfig,
    svc: Arc<Service>,
    started: &Started,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr = cfg.pg_listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for the wire protocol on {addr} (--pg-listen)"))?;
    let server_version = match svc.pg_identity().await {
        Ok(id) => server_version(&id.version),
        Err(_) => "15".to_string(),
    };
    let wire_cfg = wire::WireConfig::new(
        started.tls.as_ref().map(NodeTls::cert_and_key),
        cfg.pg_connections_max,
        cfg.pg_message_bytes_max,
        server_version,
    )?;
    info!(node = cfg.id, pg_listen = %addr, "serving the PostgreSQL wire protocol");
    Ok(tokio::spawn(wire::serve(
        svc,
        listener,
        Arc::new(wire_cfg),
        started.shutdown_rx.clone(),
    )))
}

/// `server_version` as PostgreSQL shows it, from `server_version_num` (`150010` → `15.10`).
fn server_version(num: &str) -> String {
    match num.parse::<u32>() {
        Ok(n) => raftpg_proto::pg_version_words(n),
        Err(_) => num.to_string(),
    }
}

/// A running gRPC server.
type ServerTask = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// Starts the gRPC servers of the client port and the peer port; they serve until shutdown.
fn grpc_servers(
    cfg: &NodeConfig,
    svc: Arc<Service>,
    started: &Started,
) -> anyhow::Result<Vec<ServerTask>> {
    let tls = started.tls.as_ref();
    let auth = match tls {
        Some(_) => PeerAuth::NodeCertificate,
        None => PeerAuth::Open,
    };
    // Decoding limit above the API limit, so that the services can answer an oversized request
    // with a precise RESOURCE_EXHAUSTED instead of a transport error.
    let decode_max = cfg
        .request_bytes_max
        .saturating_mul(4)
        .max(network::RAFT_MESSAGE_BYTES_MAX);
    let write = WriteServer::new(grpc::write::WriteService::new(svc.clone()))
        .max_decoding_message_size(decode_max);
    let read = ReadServer::new(grpc::read::ReadService::new(svc.clone()))
        .max_decoding_message_size(decode_max);
    let cluster = ClusterServer::new(grpc::cluster::ClusterService::new(svc.clone()));
    let transaction =
        TransactionServer::new(grpc::transaction::TransactionService::new(svc.clone()))
            .max_decoding_message_size(decode_max);
    let peer = PeerServer::new(grpc::peer::PeerService::new(svc.clone(), auth))
        .max_decoding_message_size(network::RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(network::RAFT_MESSAGE_BYTES_MAX);
    info!(
        node = cfg.id,
        listen = %started.listen,
        advertise = %started.addrs.client,
        peer_listen = %started.peer_listen,
        peer_advertise = %started.addrs.peer,
        tls = tls.is_some(),
        "serving gRPC"
    );
    let (health_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(grpc::health::keep_updated(
        svc.clone(),
        health_reporter,
        started.shutdown_rx.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(raftpg_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(raftpg_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;
    let client_port = server_builder(tls.map(NodeTls::server))?
        .layer(tonic::service::InterceptorLayer::new(client_port_gate))
        .add_service(write.clone())
        .add_service(read.clone())
        .add_service(cluster.clone())
        .add_service(transaction.clone())
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .serve_with_shutdown(started.listen, stopped(started.shutdown_rx.clone()));
    let peer_port = server_builder(tls.map(NodeTls::peer_server))?
        .layer(tonic::service::InterceptorLayer::new(PeerPortGate::new(
            svc, auth,
        )))
        .add_service(write)
        .add_service(read)
        .add_service(cluster)
        .add_service(transaction)
        .add_service(peer)
        .serve_with_shutdown(started.peer_listen, stopped(started.shutdown_rx.clone()));
    Ok(vec![tokio::spawn(client_port), tokio::spawn(peer_port)])
}

/// A server builder with the node's transport settings and `tls`.
fn server_builder(
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> anyhow::Result<tonic::transport::Server> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("TLS settings")?;
    }
    Ok(builder
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(4096)
        // Peers share one connection for replication, heartbeats and leadership checks, and
        // cancel calls that time out (partitions, pauses). h2's default of 20 cancelled streams
        // before GOAWAY would then drop the connection replication also runs on.
        .http2_max_pending_accept_reset_streams(Some(1024)))
}

/// Resolves at shutdown.
async fn stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// The first administrator's credentials (`--admin-user`, `--admin-password-file`).
fn first_admin(cfg: &NodeConfig) -> anyhow::Result<Option<Credentials>> {
    let Some(path) = &cfg.admin_password_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --admin-password-file {}", path.display()))?;
    let password = text.trim_end_matches(['\n', '\r']).to_string();
    anyhow::ensure!(
        !password.is_empty(),
        "--admin-password-file {} is empty",
        path.display()
    );
    Ok(Some(Credentials {
        user: cfg.admin_user.clone(),
        password,
    }))
}

/// Largest `--txn-bytes-max`: room is left in a Raft message for the rest of the entry (its
/// request id, user, timestamps: small) and the AppendEntries around it.
const TXN_BYTES_MAX_LIMIT: usize = network::APPEND_BYTES_MAX - 4 * 1024 * 1024;

/// Refuses limits under which one log entry (a batch of writes, or one large write) might not
/// fit in one Raft message once encoded (JSON can take up to 6 bytes for a byte of a
/// parameter): replication of such an entry could never succeed. Several entries that do not
/// fit together are sent in smaller AppendEntries (`raft::network`).
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
    // A transaction's limit counts its steps as encoded (the rest of its entry is small).
    anyhow::ensure!(
        cfg.txn_bytes_max <= TXN_BYTES_MAX_LIMIT,
        "--txn-bytes-max must be at most {TXN_BYTES_MAX_LIMIT} bytes (a transaction's encoded log entry must fit in one Raft message)"
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
