//! `raftpg`: command-line client and local-cluster launcher.
//!
//! `raftpg exec` writes, `raftpg query` reads, `raftpg status` shows every node, `raftpg cluster`
//! runs a local N-node cluster until Ctrl-C, and `raftpg demo` does that and walks through
//! replication, a node failure and its recovery. `raftpg cert` creates the TLS certificates
//! (cluster CA, nodes, clients) into a directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use raftpg_client::cert;
use raftpg_client::v1::{Consistency, QueryResponse, Statement};
use raftpg_client::{values, Client, LocalCluster, LocalClusterSpec};

#[derive(Parser)]
#[command(
    name = "raftpg",
    version,
    about = "raftpg: PostgreSQL replicated through Raft"
)]
struct Cli {
    /// Node addresses (host:port), comma-separated; any node will do.
    #[arg(
        long,
        env = "RAFTPG_NODES",
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    nodes: Vec<String>,
    /// Directory of the cluster's certificates (`raftpg cert`; a local cluster's is
    /// `<data-dir>/certs`): the client verifies the nodes with its `ca.crt` and presents the
    /// client certificate `--cert-name`. Without it the client speaks plaintext, which only
    /// nodes started with `--insecure` accept.
    #[arg(long, env = "RAFTPG_CERTS", global = true)]
    certs: Option<PathBuf>,
    /// The client certificate to present (`client-<name>.crt` in `--certs`).
    #[arg(long, env = "RAFTPG_CERT_NAME", global = true, default_value = "admin")]
    cert_name: String,
    /// The PostgreSQL role to authenticate as; its password comes from RAFTPG_PASSWORD, or is
    /// asked for on the terminal.
    #[arg(long, env = "RAFTPG_USER", global = true)]
    user: Option<String>,
    /// The longest a command may keep retrying, in seconds (each attempt at most 10 s); then
    /// it fails with the last error, the nodes it could not reach and, for a write whose
    /// outcome is unknown, the request id to send it again with. Commands that ask for a
    /// longer wait themselves (`check`, `member add`, `member rebuild`) get that wait.
    #[arg(long, env = "RAFTPG_TIMEOUT", global = true, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

/// After a failed call in plaintext: nodes with TLS (the default) answer a plaintext client
/// only with a transport error, so say what is likely missing.
fn tls_hint(e: &raftpg_client::ClientError, certs: Option<&std::path::Path>) {
    if certs.is_none() && e.code() == tonic::Code::Internal {
        eprintln!(
            "hint: nodes run with TLS unless started with --insecure; pass the cluster's certificates with --certs DIR (RAFTPG_CERTS)"
        );
    }
}

/// A client of `nodes`, with TLS when `certs` (`--certs`) is given, authenticating as `user`
/// when given.
fn cli_client(
    nodes: &[String],
    certs: Option<&std::path::Path>,
    cert_name: &str,
    user: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Client> {
    let tls = match certs {
        Some(dir) => Some(
            raftpg_client::ClientTls::from_dir(dir, Some(cert_name))
                .with_context(|| format!("reading the certificates in {}", dir.display()))?,
        ),
        None => None,
    };
    let config = raftpg_client::ClientConfig {
        tls,
        credentials: credentials(user)?,
        total_timeout: timeout,
        attempt_timeout: timeout.min(Duration::from_secs(10)),
        ..Default::default()
    };
    Ok(Client::with_config(nodes, config)?)
}

/// `--user`'s credentials: the password from RAFTPG_PASSWORD, else asked for on the terminal.
fn credentials(user: Option<&str>) -> anyhow::Result<Option<raftpg_client::Credentials>> {
    let Some(user) = user else {
        return Ok(None);
    };
    let password = match std::env::var("RAFTPG_PASSWORD") {
        Ok(p) => p,
        Err(_) => rpassword::prompt_password(format!("password for {user}: "))
            .context("reading the password (or set RAFTPG_PASSWORD)")?,
    };
    Ok(Some(raftpg_client::Credentials {
        user: user.to_string(),
        password,
    }))
}

#[derive(Subcommand)]
enum Cmd {
    /// Execute statements as one atomic write (each argument is one statement).
    Exec {
        /// SQL statements.
        #[arg(required = true)]
        sql: Vec<String>,
        /// Parameters for a single statement: type:value (int:5, text:bob, null, bool:true,
        /// float:1.5, numeric:1.20, uuid:..., jsonb:{...}, bytes:<hex>).
        #[arg(short, long = "param")]
        params: Vec<String>,
    },
    /// Run a query (read-only) on one node.
    Query {
        /// SQL query.
        sql: String,
        /// Parameters (see exec).
        #[arg(short, long = "param")]
        params: Vec<String>,
        /// local | linearizable | at-least:<index>
        #[arg(short, long, default_value = "local")]
        consistency: String,
    },
    /// Show every node's status.
    Status,
    /// Benchmark the write path (and point reads) against PostgreSQL synchronous replication
    /// and a standalone PostgreSQL, measured in the same run.
    Bench {
        /// raftpg cluster size.
        #[arg(long = "size", default_value_t = 3)]
        size: usize,
        /// Client counts, one point each.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
        clients: Vec<usize>,
        /// Seconds per point.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Peers to measure in the same run: sr, solo, insecure (raftpg with --insecure: no
        /// TLS, no authentication; writes only), etcd (etcd 3.4, three members, 100-byte puts,
        /// through the baseline script etcd.sh; needs etcd-server and etcd-client)
        /// (comma-separated; empty for none).
        #[arg(long, value_delimiter = ',', default_value = "sr,solo")]
        peer: Vec<String>,
        /// The baseline scripts' folder (the `etcd` peer runs its etcd.sh).
        #[arg(long, env = "RAFTPG_BASELINES", default_value = "../shared/baselines")]
        baselines: PathBuf,
        /// Scratch directory.
        #[arg(long, default_value = "/tmp/raftpg-bench")]
        dir: PathBuf,
        /// Port of raftpg node 1; peers use base+100...
        #[arg(long, default_value_t = 7101)]
        base_port: u16,
        /// Skip the read workload.
        #[arg(long)]
        no_reads: bool,
        /// Also time a follower catching up after missing this many entries (0: skip).
        #[arg(long, default_value_t = 0)]
        catchup: u64,
        /// Also run pgbench's built-in TPC-B-like transaction (BEGIN, three UPDATEs, a SELECT,
        /// an INSERT, END: an interactive transaction) through the wire protocol, on raftpg's
        /// leader and on the sr primary (with --peer sr), at every client count.
        #[arg(long)]
        tpcb: bool,
        /// Write the points as JSON lines to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Draw throughput and p99 against clients, raftpg and each peer, as an SVG file.
        #[arg(long)]
        chart: Option<PathBuf>,
        /// Draw --chart from the JSON lines of an earlier run (`--out`) instead of measuring.
        #[arg(long, requires = "chart")]
        chart_from: Option<PathBuf>,
        /// Protocols raftpg is measured through: grpc, pg (the PostgreSQL wire protocol with
        /// tokio-postgres over TLS, clients spread over every node; the gRPC points are
        /// measured too, in the same run, for the ratio).
        #[arg(long, value_delimiter = ',', default_value = "grpc")]
        protocol: Vec<String>,
    },
    /// Change the cluster's membership.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Compare every node's copy at one log position; exit 1 if any table differs, 3 if a node
    /// did not answer.
    Check {
        /// Longest wait for every node, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Write a backup of the user database to FILE: a consistent copy holding every write
    /// committed when it was asked for, with its log index and a SHA-256, taken from the most
    /// caught-up follower (not loading the leader) unless --from. With --every, FILE is a
    /// directory that gets a backup each interval, keeping the newest --keep.
    Backup {
        /// The backup file (a directory with --every).
        path: PathBuf,
        /// The member to take the copy from.
        #[arg(long)]
        from: Option<u64>,
        /// Take a backup every this long (90s, 30m, 6h, 1d) until stopped.
        #[arg(long, value_parser = raftpg_client::backup::parse_every)]
        every: Option<Duration>,
        /// With --every: how many backups to keep (older ones are deleted after a new one
        /// succeeded).
        #[arg(long, default_value_t = 7)]
        keep: usize,
        /// Longest time the node may take to prepare the copy (catch up, build a snapshot), in
        /// seconds.
        #[arg(long, default_value_t = 600)]
        prepare_secs: u64,
    },
    /// Verify a backup file (header, size, SHA-256), say what it holds and how to start a new
    /// cluster from it (`raftpg-node --restore-from FILE`, or `raftpg cluster --restore FILE`
    /// for a local one). Exits 1 if the file is not a complete, intact backup.
    Restore {
        /// The backup file.
        file: PathBuf,
    },
    /// Run a local cluster (each node with its own PostgreSQL) until Ctrl-C.
    Cluster(ClusterArgs),
    /// Run a local cluster and demonstrate replication, failure and recovery; keeps running
    /// until Ctrl-C (or exits with --exit).
    Demo {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Stop the cluster when the demo is done.
        #[arg(long)]
        exit: bool,
    },
    /// Create TLS certificates into a directory: the cluster CA (ca.crt, ca.key), node
    /// certificates (node-N.crt/.key) and client certificates (client-NAME.crt/.key).
    /// Keys are ECDSA P-256, PEM, mode 0600. A node is identified by the URI SAN
    /// raftpg://node/N of its certificate, a client by raftpg://client/NAME.
    #[command(subcommand)]
    Cert(CertCmd),
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create the cluster CA: DIR/ca.crt (the trust anchor every node and client is given) and
    /// DIR/ca.key (keep it secret; only `cert node`/`cert client` need it).
    Init {
        /// Certificate directory (created with mode 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Cluster name, in the CA's name "raftpg cluster CA NAME".
        #[arg(long, default_value = cert::DEFAULT_CLUSTER_NAME)]
        cluster_name: String,
        /// Validity in days.
        #[arg(long, default_value_t = cert::DEFAULT_CA_DAYS)]
        days: u32,
        /// Replace an existing CA (certificates it signed are then no longer trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue node N's certificate from the CA in DIR: DIR/node-N.crt, DIR/node-N.key. Server
    /// and client authentication (peer port), SANs: each host (IP address or DNS name) and
    /// raftpg://node/N.
    Node {
        /// Certificate directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Node id (> 0).
        #[arg(long)]
        id: u64,
        /// Hosts the node is reached at (IP addresses or DNS names), comma-separated.
        #[arg(long = "host", value_delimiter = ',', required = true)]
        hosts: Vec<String>,
        /// Validity in days (never past the CA's end).
        #[arg(long, default_value_t = cert::DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate from the CA in DIR: DIR/client-NAME.crt/.key. Client
    /// authentication only; CN NAME, SAN raftpg://client/NAME.
    Client {
        /// Certificate directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// Client name: 1 to 64 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
        /// Validity in days (never past the CA's end).
        #[arg(long, default_value_t = cert::DEFAULT_LEAF_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Everything a local cluster needs: the CA if missing, node-1..N for the hosts and the
    /// client "admin". Keeps files that are still good (signed by this CA, right identity and
    /// hosts, valid for another day) and issues the rest again.
    Cluster {
        /// Certificate directory.
        #[arg(long)]
        dir: PathBuf,
        /// Number of nodes (as `raftpg cluster --size`).
        #[arg(long = "size", default_value_t = 3)]
        size: u64,
        /// Hosts of every node, comma-separated.
        #[arg(
            long = "host",
            value_delimiter = ',',
            default_value = "127.0.0.1,localhost"
        )]
        hosts: Vec<String>,
        /// Cluster name, for a new CA.
        #[arg(long, default_value = cert::DEFAULT_CLUSTER_NAME)]
        cluster_name: String,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Add a running node (started with `raftpg-node --join`) as a learner.
    Add {
        /// The new node's id.
        id: u64,
        /// Its peer address (host:port, its --peer-advertise: by default its client port +
        /// 1000). Its client address is taken from the node itself.
        addr: String,
        /// Return at once instead of waiting for it to catch up.
        #[arg(long)]
        no_wait: bool,
    },
    /// Make learners voters: each must have applied the log up to the commit index (waits up
    /// to 15 s for it), unless --force.
    Promote {
        /// Node ids.
        #[arg(required = true)]
        ids: Vec<u64>,
        /// Promote even a learner that lags behind.
        #[arg(long)]
        force: bool,
    },
    /// Remove members (voters or learners).
    Remove {
        /// Node ids.
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Move leadership to a voter.
    Transfer {
        /// Node id.
        id: u64,
    },
    /// Wait until a member's PostgreSQL has applied the log up to the cluster's commit index
    /// (after a restart or an upgrade, before touching the next node), showing its progress.
    Wait {
        /// Node id.
        id: u64,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Re-seed a member whose copy differs (as `raftpg check` reports) from a fresh snapshot
    /// of the leader while the cluster keeps serving, then check again. The member must not
    /// be the leader (transfer the leadership first).
    Rebuild {
        /// Node id.
        id: u64,
        /// Longest time the rebuild may take, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

#[derive(clap::Args, Clone)]
struct ClusterArgs {
    /// Number of nodes.
    #[arg(long = "size", default_value_t = 3)]
    size: usize,
    /// Directory for the nodes' data (logs and PostgreSQL data).
    #[arg(long, default_value = "/tmp/raftpg-cluster")]
    data_dir: PathBuf,
    /// Port of node 1; node i listens on 127.0.0.1:(base_port + i - 1).
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    /// Start from empty data directories (deletes --data-dir).
    #[arg(long)]
    fresh: bool,
    /// Start a new cluster from this backup file (`raftpg backup`): deletes the nodes' data in
    /// --data-dir (keeping its certificates and admin password unless --fresh), then every node
    /// is seeded from the file. The backup's roles keep their passwords.
    #[arg(long)]
    restore: Option<PathBuf>,
}

fn parse_params(params: &[String]) -> anyhow::Result<Vec<raftpg_client::v1::Value>> {
    params
        .iter()
        .map(|p| values::parse_param(p).map_err(anyhow::Error::msg))
        .collect()
}

fn print_rows(columns: &[String], rows: &[Vec<String>]) {
    if columns.is_empty() {
        return;
    }
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for r in rows {
        for (i, v) in r.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!(" {:w$} ", c, w = widths[i]))
            .collect::<Vec<_>>()
            .join("|")
    };
    println!("{}", line(columns));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    for r in rows {
        println!("{}", line(r));
    }
}

/// Prints typed result rows as a table.
fn print_result(columns: &[raftpg_client::v1::Column], rows: &[raftpg_client::v1::Row]) {
    let cols: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.values.iter().map(values::display).collect())
        .collect();
    print_rows(&cols, &rows);
}

fn print_query(r: &QueryResponse) {
    print_result(&r.columns, &r.rows);
    println!(
        "({} rows; node {} applied index {})",
        r.rows.len(),
        r.node_id,
        r.applied_index
    );
}

/// Prints a check report; returns the exit status.
fn print_check(r: &raftpg_client::v1::CheckResponse) -> i32 {
    println!("checksums at log index {}", r.log_index);
    let mut names: Vec<String> = r
        .nodes
        .iter()
        .flat_map(|n| n.tables.iter().map(|t| t.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    let mut header = vec!["table".to_string()];
    header.extend(r.nodes.iter().map(|n| format!("node {}", n.node_id)));
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|name| {
            let mut row = vec![name.clone()];
            for n in &r.nodes {
                row.push(match n.tables.iter().find(|t| &t.name == name) {
                    Some(t) if t.rows > 0 || !name.starts_with("sequence") => {
                        format!("{} rows {}", t.rows, &t.hash[..t.hash.len().min(12)])
                    }
                    Some(t) => t.hash.clone(),
                    None if n.ok => "absent".into(),
                    None => "?".into(),
                });
            }
            row
        })
        .collect();
    print_rows(&header, &rows);
    for n in r.nodes.iter().filter(|n| !n.ok) {
        println!(
            "node {} ({}) did not answer: {}",
            n.node_id, n.addr, n.error
        );
    }
    for d in &r.differences {
        println!("DIVERGENCE {d}");
    }
    for d in &r.unsafe_definitions {
        println!("UNSAFE DEFINITION {d}");
    }
    for id in &r.diverged_nodes {
        println!(
            "node {id}'s copy differs from the majority's: it serves no reads until it is rebuilt (raftpg member rebuild {id})"
        );
    }
    if !r.differences.is_empty() {
        1
    } else if !r.missing_nodes.is_empty() {
        3
    } else {
        println!("all {} copies are identical", r.nodes.len());
        0
    }
}

/// A member's client address, or why there is none.
fn shown(addr: &str) -> String {
    match addr {
        "" => "(not published yet)".into(),
        a => a.to_string(),
    }
}

/// Prints every member's status (asked through the first node that answers), with its
/// replication lag as the leader sees it.
async fn print_status(client: &Client) {
    let header = [
        "node",
        "addr",
        "peer addr",
        "role",
        "term",
        "leader",
        "last log",
        "committed",
        "applied",
        "lag",
        "postgres",
        "applier",
    ];
    let mut via = None;
    let mut members = Vec::new();
    for (i, st) in client.status_all().await.into_iter().enumerate() {
        if let Ok(st) = st {
            via = Some(i);
            members = st.members.clone();
            break;
        }
    }
    let Some(via) = via else {
        println!("no node answers at {}", client.addrs().join(", "));
        return;
    };
    let mut statuses = Vec::new();
    for m in &members {
        statuses.push((m.clone(), client.member_status(via, m.node_id).await));
    }
    let leader_view = statuses
        .iter()
        .find_map(|(_, s)| s.as_ref().ok().filter(|s| s.role == "leader").cloned());
    let warnings = status_warnings(&statuses, leader_view.as_ref());
    let rows: Vec<Vec<String>> = statuses
        .into_iter()
        .map(|(m, st)| match st {
            Ok(s) => {
                let lag = leader_view.as_ref().and_then(|l| {
                    l.members
                        .iter()
                        .find(|x| x.node_id == m.node_id && x.has_matched)
                        .map(|x| l.last_log_index.saturating_sub(x.matched_index).to_string())
                });
                vec![
                    format!("{}{}", s.node_id, if m.voter { "" } else { " (learner)" }),
                    shown(&m.addr),
                    m.peer_addr.clone(),
                    if s.removed { "removed".into() } else { s.role },
                    s.term.to_string(),
                    if s.has_leader {
                        s.leader_id.to_string()
                    } else {
                        "-".into()
                    },
                    s.last_log_index.to_string(),
                    s.committed_index.to_string(),
                    s.applied_index.to_string(),
                    lag.unwrap_or_else(|| "-".into()),
                    if s.postgres_up {
                        format!("up {}", pg_version_words(&s.postgres_version))
                    } else {
                        "DOWN".into()
                    },
                    s.applier_state,
                ]
            }
            Err(e) => {
                let mut row = vec![
                    m.node_id.to_string(),
                    shown(&m.addr),
                    m.peer_addr.clone(),
                    format!("unreachable ({:?})", e.code()),
                ];
                row.resize(header.len(), String::new());
                row
            }
        })
        .collect();
    print_rows(&header.map(String::from), &rows);
    for w in warnings {
        println!("WARNING {w}");
    }
}

/// A chart's title when it is drawn from a file of points.
fn chart_title(from: &std::path::Path) -> String {
    format!(
        "raftpg and its peers ({})",
        from.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    )
}

/// PostgreSQL's `server_version_num` in words (`150018` → `15.18`).
fn pg_version_words(num: &str) -> String {
    match num.parse::<u32>() {
        Ok(n) => raftpg_client::pg_version_words(n),
        _ => num.to_string(),
    }
}

/// What in a cluster's status needs an operator's attention, one line each.
fn status_warnings(
    statuses: &[(
        raftpg_client::v1::Member,
        Result<raftpg_client::v1::StatusResponse, raftpg_client::ClientError>,
    )],
    leader: Option<&raftpg_client::v1::StatusResponse>,
) -> Vec<String> {
    let mut out = Vec::new();
    if leader.is_none() {
        out.push("no member says it leads: writes and linearizable reads are unavailable".into());
    }
    for (m, st) in statuses {
        let id = m.node_id;
        let s = match st {
            Ok(s) => s,
            Err(e) => {
                out.push(format!("node {id} does not answer: {e}"));
                continue;
            }
        };
        if !s.postgres_up {
            out.push(format!("node {id}: its PostgreSQL is down"));
        }
        if s.applier_state != "applying" && !s.applier_state.is_empty() {
            out.push(format!("node {id}: applier {}", s.applier_state));
        }
        if s.insecure {
            out.push(format!(
                "node {id} runs --insecure: anyone who reaches its ports can read and change every copy"
            ));
        }
        if !s.diverged.is_empty() {
            out.push(format!(
                "node {id}'s copy differs from the majority's ({}); rebuild it: raftpg member rebuild {id}",
                s.diverged
            ));
        }
        if s.removed {
            out.push(format!("node {id} was removed from the cluster"));
        }
        if !s.snapshot_progress.is_empty() {
            out.push(format!("node {id}: {}", s.snapshot_progress));
        }
        if let Some(l) = leader {
            let lag = l
                .members
                .iter()
                .find(|x| x.node_id == id && x.has_matched)
                .map(|x| l.last_log_index.saturating_sub(x.matched_index));
            match lag {
                Some(n) if n > 1_000 => {
                    out.push(format!("node {id} lags {n} entries behind the leader"))
                }
                None if l.node_id != id => out.push(format!(
                    "node {id} has not acknowledged any entry of the leader's term"
                )),
                _ => {}
            }
            if l.applied_index.saturating_sub(s.applied_index) > 10_000 {
                out.push(format!(
                    "node {id} has applied {} entries fewer than the leader",
                    l.applied_index - s.applied_index
                ));
            }
        }
    }
    out
}

fn start_cluster(args: &ClusterArgs) -> anyhow::Result<LocalCluster> {
    if let Some(file) = &args.restore {
        let h = raftpg_client::backup::verify(file)?;
        println!(
            "restoring {}: {}",
            file.display(),
            raftpg_client::backup::describe(&h)
        );
    }
    if args.restore.is_some() && !args.fresh && args.data_dir.exists() {
        // The nodes' data goes; the certificates and the admin password stay (the backup's
        // roles keep their passwords: a backup of this cluster restores with the same login).
        for e in std::fs::read_dir(&args.data_dir)?.flatten() {
            if e.file_name() != "certs" {
                let p = e.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                }
                .with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("removing {}", args.data_dir.display()))?;
    }
    let mut spec = LocalClusterSpec::new(args.size, &args.data_dir, args.base_port);
    spec.restore_from = args.restore.as_ref().map(std::path::absolute).transpose()?;
    println!(
        "starting {} nodes ({}) with data in {}",
        args.size,
        spec.addrs.join(", "),
        args.data_dir.display()
    );
    let cluster = LocalCluster::start(spec)?;
    Ok(cluster)
}

fn connect_hint(cluster: &LocalCluster) {
    let me = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "raftpg".into());
    let nodes = match cluster.certs() {
        Some(certs) => {
            println!(
                "\nThe cluster is running (TLS, authentication as role {}; certificates and its password in {}).",
                raftpg_client::local_cluster::ADMIN_USER,
                certs.display()
            );
            println!("Connect with psql (or any PostgreSQL client) to any node:");
            println!(
                "  export PGPASSWORD=$(cat {})",
                certs
                    .join(raftpg_client::local_cluster::ADMIN_PASSWORD_FILE)
                    .display()
            );
            for n in cluster.nodes() {
                let (host, port) = n.pg_host_port();
                println!(
                    "  node {}: psql \"host={host} port={port} user={} dbname=raftpg sslmode=verify-full sslrootcert={}\"",
                    n.id,
                    raftpg_client::local_cluster::ADMIN_USER,
                    certs.join("ca.crt").display()
                );
            }
            println!("Or with the gRPC API:");
            println!(
                "  export RAFTPG_USER={} RAFTPG_PASSWORD=$(cat {})",
                raftpg_client::local_cluster::ADMIN_USER,
                certs
                    .join(raftpg_client::local_cluster::ADMIN_PASSWORD_FILE)
                    .display()
            );
            format!("{} --certs {}", cluster.addrs().join(","), certs.display())
        }
        None => {
            println!(
                "\nThe cluster is running (plaintext, --insecure). Connect with psql to any node:"
            );
            for n in cluster.nodes() {
                let (host, port) = n.pg_host_port();
                println!(
                    "  node {}: psql \"host={host} port={port} user=raftpg dbname=raftpg\"",
                    n.id
                );
            }
            println!("Or with the gRPC API:");
            cluster.addrs().join(",")
        }
    };
    println!(
        "  {me} --nodes {nodes} exec \"INSERT INTO players (name) VALUES ('you') RETURNING id\""
    );
    println!("  {me} --nodes {nodes} query --consistency linearizable \"SELECT * FROM players ORDER BY id\"");
    println!("  {me} --nodes {nodes} status");
    println!("  {me} --nodes {nodes} check");
    println!("Each node's own PostgreSQL copy (read-only role):");
    for n in cluster.nodes() {
        println!(
            "  node {}: psql -h {} -U raftpg_reader raftpg",
            n.id,
            n.pg_socket_dir().display()
        );
    }
    println!("Node logs: {}/node<i>.log", cluster.data_dir().display());
}

async fn wait_ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Rows and checksum of `players` read from one node's own copy.
/// Retries while the node is still starting (up to a minute).
async fn node_copy(client: &Client, node: usize, at_least: u64) -> anyhow::Result<(i64, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let r = loop {
        let attempt = client
            .query_node(
                node,
                raftpg_client::v1::QueryRequest {
                    sql: "SELECT count(*), coalesce(md5(string_agg(id || ':' || name, ',' ORDER BY id)), '') FROM players".into(),
                    consistency: Consistency::AtLeast as i32,
                    min_index: at_least,
                    timeout_ms: 10_000,
                    ..Default::default()
                },
            )
            .await;
        match attempt {
            Ok(r) => break r,
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let row = r.rows.first().context("no row")?;
    Ok((
        values::as_i64(&row.values[0]).unwrap_or(-1),
        values::as_str(&row.values[1]).unwrap_or("").to_string(),
    ))
}

async fn demo(cluster: &mut LocalCluster) -> anyhow::Result<()> {
    let client = cluster.client()?;
    let leader = client.wait_for_leader(Duration::from_secs(60)).await?;
    println!("\n1. A leader is elected: node {leader}.");
    client
        .execute_one("CREATE TABLE IF NOT EXISTS players (id serial PRIMARY KEY, name text NOT NULL UNIQUE, via_node int)", vec![])
        .await?;
    println!("\n2. Inserting players through every node (followers forward to the leader):");
    let names = ["ada", "grace", "linus", "barbara", "ken", "margaret"];
    let mut last_index = 0;
    for (i, name) in names.iter().enumerate() {
        let node = i % cluster.addrs().len();
        let one = cluster.client_of(&[cluster.addrs()[node].clone()])?;
        let r = one
            .execute_one(
                "INSERT INTO players (name, via_node) VALUES ($1, $2) RETURNING id",
                vec![values::text(*name), values::int(node as i64 + 1)],
            )
            .await?;
        let id = r.results[0].rows[0]
            .values
            .first()
            .map(values::display)
            .unwrap_or_default();
        println!(
            "   via node {} -> {name} got id {id} (log index {})",
            node + 1,
            r.log_index
        );
        last_index = r.log_index;
    }
    println!("\n3. Every node's own PostgreSQL holds the same rows (count, md5 of all rows):");
    for i in 0..cluster.addrs().len() {
        let (n, sum) = node_copy(&client, i, last_index).await?;
        println!("   node {}: {n} rows, {sum}", i + 1);
    }
    println!("\n4. A duplicate name is refused with its SQLSTATE, on every node the same way:");
    match client
        .execute_one("INSERT INTO players (name) VALUES ('ada')", vec![])
        .await
    {
        Err(e) => println!("   {} (SQLSTATE {})", e, e.sqlstate().unwrap_or_default()),
        Ok(_) => bail!("duplicate insert was accepted"),
    }
    let victim = client.wait_for_leader(Duration::from_secs(30)).await?;
    println!("\n5. Killing the leader, node {victim}, with SIGKILL ...");
    cluster.kill_node(victim);
    let survivors: Vec<String> = cluster
        .nodes()
        .iter()
        .filter(|n| n.id != victim)
        .map(|n| n.addr.clone())
        .collect();
    let client2 = cluster.client_of(&survivors)?;
    let new_leader = client2.wait_for_leader(Duration::from_secs(60)).await?;
    println!("   node {new_leader} took over; writing on without node {victim}:");
    for name in ["dennis", "frances", "edsger"] {
        let r = client2
            .execute_one(
                "INSERT INTO players (name) VALUES ($1) RETURNING id",
                vec![values::text(name)],
            )
            .await?;
        let id = r.results[0].rows[0]
            .values
            .first()
            .map(values::display)
            .unwrap_or_default();
        println!("   {name} got id {id} (log index {})", r.log_index);
        last_index = r.log_index;
    }
    println!("\n6. Restarting node {victim}; it catches up from the log:");
    cluster.start_node(victim)?;
    let t0 = std::time::Instant::now();
    let mut sums = Vec::new();
    for i in 0..cluster.addrs().len() {
        let (n, sum) = node_copy(&client, i, last_index).await?;
        println!("   node {}: {n} rows, {sum}", i + 1);
        sums.push(sum);
    }
    println!(
        "   (node {victim} caught up in {:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    if sums.windows(2).any(|w| w[0] != w[1]) {
        bail!("copies differ!");
    }
    println!("\nAll {} copies are identical.", sums.len());
    print_status(&client).await;
    Ok(())
}

fn run_cert(cmd: CertCmd) -> anyhow::Result<()> {
    let wrote = |(c, k): (PathBuf, PathBuf)| println!("wrote {} and {}", c.display(), k.display());
    match cmd {
        CertCmd::Init {
            dir,
            cluster_name,
            days,
            force,
        } => wrote(cert::init_ca(&dir, &cluster_name, days, force)?),
        CertCmd::Node {
            dir,
            id,
            hosts,
            days,
            force,
        } => wrote(cert::issue_node(&dir, id, &hosts, days, force)?),
        CertCmd::Client {
            dir,
            name,
            days,
            force,
        } => wrote(cert::issue_client(&dir, &name, days, force)?),
        CertCmd::Cluster {
            dir,
            size,
            hosts,
            cluster_name,
        } => {
            let r = cert::ensure_cluster(&dir, size, &hosts, &cluster_name)?;
            if r.created_ca {
                println!("created CA {}", dir.join(cert::CA_CERT).display());
            }
            for p in &r.issued {
                println!("issued {}", p.display());
            }
            for p in &r.kept {
                println!("kept {}", p.display());
            }
        }
    }
    Ok(())
}

/// mimalloc, as in raftpg-node: the benchmark's client allocates a request and its buffers per
/// call, which mimalloc serves with less CPU than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A client of --nodes with this invocation's certificates and role.
    let connect = {
        let (nodes, certs, cert_name, user) = (
            cli.nodes.clone(),
            cli.certs.clone(),
            cli.cert_name.clone(),
            cli.user.clone(),
        );
        let timeout = Duration::from_secs(cli.timeout.max(1));
        move || {
            cli_client(
                &nodes,
                certs.as_deref(),
                &cert_name,
                user.as_deref(),
                timeout,
            )
        }
    };
    match cli.command {
        Cmd::Exec { sql, params } => {
            let client = connect()?;
            let params = parse_params(&params)?;
            if !params.is_empty() && sql.len() > 1 {
                bail!("--param applies to a single statement");
            }
            let mut params = Some(params);
            let statements = sql
                .into_iter()
                .map(|s| Statement {
                    sql: s,
                    params: params.take().unwrap_or_default(),
                })
                .collect();
            match client.execute(statements).await {
                Ok(r) => {
                    for (i, res) in r.results.iter().enumerate() {
                        print_result(&res.columns, &res.rows);
                        println!("statement {i}: {} row(s) affected", res.rows_affected);
                    }
                    println!(
                        "committed at log index {} (term {}, leader {})",
                        r.log_index, r.term, r.leader_id
                    );
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    tls_hint(&e, cli.certs.as_deref());
                    if let Some(s) = e.sqlstate() {
                        eprintln!("SQLSTATE {s}");
                    }
                    std::process::exit(1);
                }
            }
        }
        Cmd::Query {
            sql,
            params,
            consistency,
        } => {
            let client = connect()?;
            let (level, min_index) = match consistency.as_str() {
                "local" => (Consistency::Local, 0),
                "linearizable" => (Consistency::Linearizable, 0),
                s if s.starts_with("at-least:") => {
                    (Consistency::AtLeast, s["at-least:".len()..].parse()?)
                }
                other => {
                    bail!("unknown consistency {other:?} (local | linearizable | at-least:<index>)")
                }
            };
            let req = raftpg_client::v1::QueryRequest {
                sql,
                params: parse_params(&params)?,
                consistency: level as i32,
                min_index,
                ..Default::default()
            };
            match client.query(req).await {
                Ok(r) => print_query(&r),
                Err(e) => {
                    eprintln!("error: {e}");
                    tls_hint(&e, cli.certs.as_deref());
                    std::process::exit(1);
                }
            }
        }
        Cmd::Status => print_status(&connect()?).await,
        Cmd::Bench {
            size,
            clients,
            seconds,
            peer,
            baselines,
            dir,
            base_port,
            no_reads,
            catchup,
            tpcb,
            out,
            chart,
            chart_from,
            protocol,
        } => {
            if let (Some(chart), Some(from)) = (&chart, &chart_from) {
                let points = raftpg_client::chart::read_points(from)?;
                raftpg_client::chart::write_svg(&points, chart, &chart_title(from))?;
                println!("wrote {}", chart.display());
                return Ok(());
            }
            if let Some(p) = protocol
                .iter()
                .find(|p| !matches!(p.as_str(), "grpc" | "pg"))
            {
                anyhow::bail!("unknown protocol {p:?} (grpc, pg)");
            }
            let points = raftpg_client::bench::run(raftpg_client::bench::BenchSpec {
                nodes: size,
                clients,
                seconds,
                peers: peer.into_iter().filter(|p| !p.is_empty()).collect(),
                baselines,
                dir,
                base_port,
                reads: !no_reads,
                catchup_entries: catchup,
                tpcb,
                out,
                wire: protocol.iter().any(|p| p == "pg"),
            })
            .await?;
            if let Some(chart) = &chart {
                raftpg_client::chart::write_svg(
                    &points,
                    chart,
                    &format!("raftpg ({size} nodes) and its peers, {seconds} s per point"),
                )?;
                println!("wrote {}", chart.display());
            }
        }
        Cmd::Member(MemberCmd::Wait { id, timeout_secs }) => {
            let client = connect()?;
            match raftpg_client::progress::wait_caught_up(
                &client,
                id,
                Duration::from_secs(timeout_secs),
            )
            .await
            {
                Ok(index) => println!("node {id} has applied the log up to index {index}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::Member(MemberCmd::Rebuild { id, timeout_secs }) => {
            let client = connect()?;
            let rebuild = client.rebuild(id, Duration::from_secs(timeout_secs));
            match raftpg_client::progress::follow(&client, id, rebuild).await {
                Ok(r) => println!(
                    "node {} rebuilt from node {}'s snapshot at log index {} ({} bytes, {} ms)",
                    r.node_id, r.donor_id, r.log_index, r.bytes, r.millis
                ),
                Err(e) => {
                    eprintln!("error: {e}");
                    tls_hint(&e, cli.certs.as_deref());
                    std::process::exit(1);
                }
            }
            let r = client
                .check(Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| {
                    eprintln!("error: the check after the rebuild failed: {e}");
                    std::process::exit(1);
                });
            std::process::exit(print_check(&r));
        }
        Cmd::Member(m) => {
            let client = connect()?;
            let r = match m {
                MemberCmd::Add {
                    id,
                    addr,
                    no_wait: true,
                } => client.add_learner(id, &addr, false).await,
                MemberCmd::Add { id, addr, .. } => {
                    raftpg_client::progress::follow(
                        &client,
                        id,
                        client.add_learner(id, &addr, true),
                    )
                    .await
                }
                MemberCmd::Promote { ids, force } => client.promote_with(&ids, force).await,
                MemberCmd::Remove { ids } => client.remove(&ids).await,
                MemberCmd::Transfer { id } => client.transfer_leader(id).await,
                MemberCmd::Rebuild { .. } | MemberCmd::Wait { .. } => {
                    unreachable!("handled above")
                }
            };
            match r {
                Ok(r) => {
                    println!(
                        "{}{}",
                        r.message,
                        if r.log_index > 0 {
                            format!(" (log index {})", r.log_index)
                        } else {
                            String::new()
                        }
                    );
                    for m in &r.members {
                        println!(
                            "  node {} {} (peer {}) {}",
                            m.node_id,
                            shown(&m.addr),
                            m.peer_addr,
                            if m.voter { "voter" } else { "learner" }
                        );
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    tls_hint(&e, cli.certs.as_deref());
                    std::process::exit(1);
                }
            }
        }
        Cmd::Check { timeout } => {
            let client = connect()?;
            let r = client.check(Duration::from_secs(timeout)).await?;
            std::process::exit(print_check(&r));
        }
        Cmd::Backup {
            path,
            from,
            every,
            keep,
            prepare_secs,
        } => {
            let client = connect()?;
            let prepare = Duration::from_secs(prepare_secs);
            if let Some(every) = every {
                raftpg_client::backup::run_schedule(
                    &client, &path, every, keep, from, prepare, None,
                )
                .await?;
            }
            match client.backup(&path, from, prepare).await {
                Ok(h) => println!(
                    "{}: {}",
                    path.display(),
                    raftpg_client::backup::describe(&h)
                ),
                Err(e) => {
                    eprintln!("error: {e}");
                    tls_hint(&e, cli.certs.as_deref());
                    std::process::exit(1);
                }
            }
        }
        Cmd::Restore { file } => match raftpg_client::backup::verify(&file) {
            Ok(h) => {
                println!(
                    "{}: intact; {}",
                    file.display(),
                    raftpg_client::backup::describe(&h)
                );
                println!(
                    "start a new cluster from it: give every founding node the same file and --peers,\n  raftpg-node --id N --data-dir <empty dir> --peers 1=host1:8001,2=host2:8001,3=host3:8001 --restore-from {f} ...\nor seed one node (without --peers) and add the others with `raftpg member add`; a local cluster: raftpg cluster --restore {f}",
                    f = file.display()
                );
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        Cmd::Cluster(args) => {
            let cluster = start_cluster(&args)?;
            let client = cluster.client()?;
            let leader = client.wait_for_leader(Duration::from_secs(60)).await?;
            println!("leader: node {leader}");
            connect_hint(&cluster);
            println!("\nPress Ctrl-C to stop the cluster.");
            wait_ctrl_c().await;
            println!("stopping ...");
        }
        Cmd::Demo {
            cluster: args,
            exit,
        } => {
            let mut cluster = start_cluster(&ClusterArgs {
                fresh: true,
                ..args
            })?;
            demo(&mut cluster).await?;
            connect_hint(&cluster);
            if !exit {
                println!("\nPress Ctrl-C to stop the cluster.");
                wait_ctrl_c().await;
            }
            println!("stopping ...");
        }
        Cmd::Cert(c) => {
            if let Err(e) = run_cert(c) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// `raftpg cert ...` as typed, on a scratch directory.
    #[test]
    fn cert_commands() {
        let dir = std::env::temp_dir().join(format!("raftpg-cli-cert-{}", std::process::id()));
        let d = dir.to_str().unwrap();
        let run = |args: &[&str]| {
            let cli = Cli::try_parse_from(["raftpg", "cert"].iter().chain(args)).unwrap();
            let Cmd::Cert(c) = cli.command else {
                panic!("not a cert command")
            };
            run_cert(c)
        };
        run(&["init", "--dir", d, "--cluster-name", "t", "--days", "30"]).unwrap();
        let again = run(&["init", "--dir", d]).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        run(&["init", "--dir", d, "--force"]).unwrap();
        run(&[
            "node",
            "--dir",
            d,
            "--id",
            "4",
            "--host",
            "10.0.0.4,db4.example",
        ])
        .unwrap();
        run(&["client", "--dir", d, "--name", "app", "--days", "10"]).unwrap();
        run(&["cluster", "--dir", d, "--size", "2"]).unwrap();
        let pem = std::fs::read_to_string(dir.join("node-4.crt")).unwrap();
        let der = cert::pem_to_der(&pem).unwrap();
        assert_eq!(cert::node_id_of(&der), Some(4));
        for f in [
            "node-1.key",
            "node-2.key",
            "client-admin.key",
            "client-app.key",
        ] {
            assert!(dir.join(f).exists(), "{f}");
        }
        assert!(Cli::try_parse_from(["raftpg", "cert", "node", "--dir", d, "--id", "1"]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
