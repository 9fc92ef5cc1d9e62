//! A cluster of `raftpg-node` processes on this machine, each with its own embedded PostgreSQL.
//!
//! Owns the node child processes: starts them with the same `--peers` list, kills them
//! (SIGKILL, for fault tests), stops them (SIGTERM), restarts them, and on drop stops every node
//! and any PostgreSQL a killed node left behind. Node `i` (1-based) serves clients on
//! `<host_i>:<port_i>` and its peers on `<host_i>:<port_i + 1000>` ([`peer_addr_of`]), and
//! keeps its data in `<data_dir>/node<i>`; its log is `node<i>.log`.
//!
//! Secure by default: the cluster's certificates (`raftpg cert`: a CA, a certificate per node,
//! a client certificate `admin`) are made in `<data_dir>/certs` and every node gets
//! `--tls-dir`, and the first administrator's password (role `admin`, random) is kept in
//! `<data_dir>/certs/admin.password` and given to every node (`--admin-password-file`);
//! [`LocalCluster::client_config`] gives clients that verify the nodes, present the client
//! certificate and authenticate as `admin`. `LocalClusterSpec::tls = false` starts plaintext
//! nodes (`--insecure`) that take anonymous requests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to start.
#[derive(Clone, Debug)]
pub struct LocalClusterSpec {
    /// Number of nodes.
    pub nodes: usize,
    /// Parent directory of the node data directories.
    pub data_dir: PathBuf,
    /// Address of node `i` is `addrs[i-1]`.
    pub addrs: Vec<String>,
    /// The `raftpg-node` binary.
    pub node_bin: PathBuf,
    /// Extra flags for every node.
    pub extra_args: Vec<String>,
    /// Environment variables per node: node `i` gets `node_env[i-1]` (if present).
    pub node_env: Vec<Vec<(String, String)>>,
    /// TLS between nodes and to clients (certificates in `<data_dir>/certs`); `false` starts
    /// the nodes with `--insecure`.
    pub tls: bool,
    /// Seed every founding node from this backup file (`raftpg-node --restore-from`).
    pub restore_from: Option<PathBuf>,
}

impl LocalClusterSpec {
    /// `nodes` nodes on `127.0.0.1:(base_port + i - 1)`.
    pub fn new(nodes: usize, data_dir: impl Into<PathBuf>, base_port: u16) -> Self {
        let addrs = (0..nodes)
            .map(|i| format!("127.0.0.1:{}", base_port + i as u16))
            .collect();
        LocalClusterSpec {
            nodes,
            data_dir: data_dir.into(),
            addrs,
            node_bin: default_node_bin(),
            extra_args: Vec::new(),
            node_env: Vec::new(),
            tls: true,
            restore_from: None,
        }
    }
}

/// Where a cluster's certificates live.
fn certs_dir(spec: &LocalClusterSpec) -> PathBuf {
    spec.data_dir.join("certs")
}

/// The file with the first administrator's password, in the certificates' directory.
pub const ADMIN_PASSWORD_FILE: &str = "admin.password";

/// The first administrator of a local cluster.
pub const ADMIN_USER: &str = "admin";

/// The password in `dir`'s [`ADMIN_PASSWORD_FILE`], made (random, readable by the owner only)
/// when missing.
fn ensure_admin_password(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(ADMIN_PASSWORD_FILE);
    if let Ok(p) = std::fs::read_to_string(&path) {
        return Ok(p.trim().to_string());
    }
    let password = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(&path, format!("{password}\n"))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(password)
}

/// How far above a node's client port its peer port is (the node's own default).
pub const PEER_PORT_OFFSET: u16 = 1000;

/// The peer address of the node whose client address is `addr` (same host, port +
/// [`PEER_PORT_OFFSET`]).
pub fn peer_addr_of(addr: &str) -> String {
    port_plus(addr, PEER_PORT_OFFSET)
}

/// How far above a node's client port its PostgreSQL wire protocol port is (the node's own
/// default).
pub const PG_PORT_OFFSET: u16 = 2000;

/// The wire protocol address of the node whose client address is `addr` (same host, port +
/// [`PG_PORT_OFFSET`]).
pub fn pg_addr_of(addr: &str) -> String {
    port_plus(addr, PG_PORT_OFFSET)
}

/// The metrics/health HTTP address of a node whose client address is `addr` (the node's
/// default `--metrics-listen`: port + 3000).
pub fn metrics_addr_of(addr: &str) -> String {
    port_plus(addr, 3000)
}

/// `host:port` with the port `offset` higher (`addr` unchanged when it has no port).
fn port_plus(addr: &str, offset: u16) -> String {
    match addr.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(p) => format!("{host}:{}", p.saturating_add(offset)),
            Err(_) => addr.to_string(),
        },
        None => addr.to_string(),
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Finds `raftpg-node`: `$RAFTPG_NODE_BIN`, next to the running executable (or its parent, for
/// test binaries in `target/*/deps`), then `$PATH`.
pub fn default_node_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RAFTPG_NODE_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let cand = dir.join("raftpg-node");
            if cand.is_file() {
                return cand;
            }
        }
    }
    PathBuf::from("raftpg-node")
}

/// The directory with PostgreSQL's programs: the newest `/usr/lib/postgresql/*/bin`.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").is_file())
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, p)| p)
}

/// One node process.
pub struct LocalNode {
    /// Node id (1-based).
    pub id: u64,
    /// Client address.
    pub addr: String,
    /// Data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
    /// Started with `--join` instead of `--peers`.
    joining: bool,
    /// Flags for this node only.
    extra_args: Vec<String>,
    /// Environment variables for this node only (e.g. libfaketime's).
    env: Vec<(String, String)>,
}

impl LocalNode {
    /// Peer address.
    pub fn peer_addr(&self) -> String {
        peer_addr_of(&self.addr)
    }

    /// Address of the node's PostgreSQL wire protocol port.
    pub fn pg_addr(&self) -> String {
        pg_addr_of(&self.addr)
    }

    /// The node's wire protocol host and port, for libpq's `host=` and `port=`.
    pub fn pg_host_port(&self) -> (String, u16) {
        let addr = self.pg_addr();
        let (host, port) = addr.rsplit_once(':').unwrap_or((&addr, "5432"));
        (
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port.parse().unwrap_or(5432),
        )
    }

    /// Directory of the node's PostgreSQL Unix socket.
    pub fn pg_socket_dir(&self) -> PathBuf {
        self.data_dir.join("postgres").join("run")
    }

    /// The pid of the node's postmaster, if running.
    pub fn postgres_pid(&self) -> Option<i32> {
        let text =
            std::fs::read_to_string(self.data_dir.join("postgres/data/postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    /// The node process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the node process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn send(pid: i32, sig: libc::c_int) {
    // SAFETY: sending a signal has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits (up to 10 s) until every thread of process `pid` is stopped (state `T` in
/// `/proc/<pid>/task/*/stat`), or the process is gone.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let all_stopped = || -> bool {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return true;
        };
        tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .map(|stat| {
                    // The state follows the command name, which is in parentheses.
                    let state = stat
                        .rsplit_once(") ")
                        .and_then(|(_, rest)| rest.chars().next());
                    matches!(state, Some('T' | 't' | 'Z' | 'X') | None)
                })
                .unwrap_or(true)
        })
    };
    while !all_stopped() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A running local cluster.
pub struct LocalCluster {
    spec: LocalClusterSpec,
    nodes: Vec<LocalNode>,
}

impl LocalCluster {
    /// Starts every node.
    pub fn start(spec: LocalClusterSpec) -> std::io::Result<Self> {
        if !spec.node_bin.is_file() && spec.node_bin.components().count() > 1 {
            return Err(std::io::Error::other(format!(
                "raftpg-node binary not found at {} (build it with `cargo build -p raftpg-node`, or set RAFTPG_NODE_BIN)",
                spec.node_bin.display()
            )));
        }
        std::fs::create_dir_all(&spec.data_dir)?;
        make_searchable(&spec.data_dir)?;
        if spec.tls {
            let hosts: Vec<String> = spec.addrs.iter().map(|a| host_of(a).to_string()).collect();
            crate::cert::ensure_cluster(&certs_dir(&spec), spec.nodes as u64, &hosts, "raftpg")
                .map_err(std::io::Error::other)?;
            ensure_admin_password(&certs_dir(&spec))?;
        }
        let nodes = (1..=spec.nodes)
            .map(|i| LocalNode {
                id: i as u64,
                addr: spec.addrs[i - 1].clone(),
                data_dir: spec.data_dir.join(format!("node{i}")),
                child: None,
                joining: false,
                extra_args: Vec::new(),
                env: spec.node_env.get(i - 1).cloned().unwrap_or_default(),
            })
            .collect();
        let mut cluster = LocalCluster { spec, nodes };
        for id in 1..=cluster.nodes.len() as u64 {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    /// The directory of the cluster's certificates (`None` for a plaintext cluster).
    pub fn certs(&self) -> Option<PathBuf> {
        self.spec.tls.then(|| certs_dir(&self.spec))
    }

    /// Client settings for this cluster: default timeouts, and TLS and authentication as the
    /// nodes run them (verifying them with the cluster CA, presenting the client certificate
    /// `admin`, authenticating as the first administrator).
    pub fn client_config(&self) -> std::io::Result<crate::ClientConfig> {
        let (tls, credentials) = match self.certs() {
            Some(dir) => (
                Some(crate::ClientTls::from_dir(&dir, Some("admin"))?),
                Some(crate::Credentials {
                    user: ADMIN_USER.into(),
                    password: ensure_admin_password(&dir)?,
                }),
            ),
            None => (None, None),
        };
        Ok(crate::ClientConfig {
            tls,
            credentials,
            ..Default::default()
        })
    }

    /// A client of the nodes at `addrs` with [`LocalCluster::client_config`].
    pub fn client_of<S: AsRef<str>>(&self, addrs: &[S]) -> std::io::Result<crate::Client> {
        crate::Client::with_config(addrs, self.client_config()?).map_err(std::io::Error::other)
    }

    /// A client of every node of the cluster.
    pub fn client(&self) -> std::io::Result<crate::Client> {
        self.client_of(&self.addrs())
    }

    /// The `--peers` value (the founding members' peer addresses).
    pub fn peers_arg(&self) -> String {
        self.nodes
            .iter()
            .take(self.spec.nodes)
            .map(|n| format!("{}={}", n.id, n.peer_addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node addresses in id order.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// The nodes.
    pub fn nodes(&self) -> &[LocalNode] {
        &self.nodes
    }

    /// Node `id` (1-based).
    pub fn node(&self, id: u64) -> &LocalNode {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: u64) -> &mut LocalNode {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Adds node `id` at client address `addr` to this process set and starts it with `--join`
    /// (it waits to be added to the cluster with `Cluster.AddLearner` at its peer address,
    /// [`peer_addr_of`]). Its data directory is wiped first.
    pub fn start_joining_node(&mut self, id: u64, addr: &str) -> std::io::Result<()> {
        let data_dir = self.spec.data_dir.join(format!("node{id}"));
        self.ensure_slot(id);
        self.kill_orphan_postgres(id);
        if data_dir.exists() {
            std::fs::remove_dir_all(&data_dir)?;
        }
        if let Some(certs) = self.certs() {
            let hosts = [host_of(addr).to_string()];
            let exists = certs.join(crate::cert::node_cert_file(id)).exists();
            if !exists {
                crate::cert::issue_node(&certs, id, &hosts, 825, false)
                    .map_err(std::io::Error::other)?;
            }
        }
        let node = self.node_mut(id);
        node.addr = addr.to_string();
        node.data_dir = data_dir;
        node.joining = true;
        self.start_node(id)
    }

    /// Makes room for node `id` (a node joining later).
    fn ensure_slot(&mut self, id: u64) {
        while self.nodes.len() < id as usize {
            let n = self.nodes.len() as u64 + 1;
            self.nodes.push(LocalNode {
                id: n,
                addr: String::new(),
                data_dir: self.spec.data_dir.join(format!("node{n}")),
                child: None,
                joining: true,
                extra_args: Vec::new(),
                env: Vec::new(),
            });
        }
    }

    /// Extra flags for node `id` only (applied at its next start); creates the slot if needed.
    pub fn add_extra_args(&mut self, id: u64, args: Vec<String>) {
        self.ensure_slot(id);
        self.node_mut(id).extra_args.extend(args);
    }

    /// Wipes node `id`'s data directory (it must be stopped) so that it starts empty.
    pub fn wipe_node(&mut self, id: u64) -> std::io::Result<()> {
        self.kill_orphan_postgres(id);
        let dir = self.node(id).data_dir.clone();
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        self.node_mut(id).joining = true;
        Ok(())
    }

    /// SIGKILLs the postmaster a killed node left running, and waits for it to be gone, before
    /// its files are deleted: a PostgreSQL whose data directory vanished shuts itself down
    /// later and, on the way out, unlinks its socket path — by then the socket of the
    /// node's *new* PostgreSQL, which would become unreachable.
    fn kill_orphan_postgres(&mut self, id: u64) {
        let Some(pid) = self.node(id).postgres_pid() else {
            return;
        };
        send(pid, libc::SIGKILL);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts node `id` (it must not be running).
    pub fn start_node(&mut self, id: u64) -> std::io::Result<()> {
        let peers = self.peers_arg();
        let bin = self.spec.node_bin.clone();
        let restore_from = self.spec.restore_from.clone();
        let mut extra = match self.certs() {
            Some(dir) => vec![
                "--tls-dir".to_string(),
                dir.display().to_string(),
                "--admin-password-file".to_string(),
                dir.join(ADMIN_PASSWORD_FILE).display().to_string(),
            ],
            None => vec!["--insecure".to_string()],
        };
        extra.extend(self.spec.extra_args.iter().cloned());
        extra.extend(self.node(id).extra_args.iter().cloned());
        let log_path = self.spec.data_dir.join(format!("node{id}.log"));
        let node = self.node_mut(id);
        std::fs::create_dir_all(&node.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(&bin)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--listen")
            .arg(&node.addr)
            .arg("--peer-listen")
            .arg(peer_addr_of(&node.addr))
            .arg("--pg-listen")
            .arg(pg_addr_of(&node.addr))
            .args(if node.joining {
                vec!["--join".to_string()]
            } else {
                vec!["--peers".to_string(), peers]
            })
            .args(match (&restore_from, node.joining) {
                (Some(f), false) => vec!["--restore-from".to_string(), f.display().to_string()],
                _ => Vec::new(),
            })
            .args(&extra)
            .env(
                "RUST_LOG",
                std::env::var("RAFTPG_NODE_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| std::io::Error::other(format!("starting {}: {e}", bin.display())))?;
        node.child = Some(child);
        Ok(())
    }

    /// SIGKILLs node `id` (its PostgreSQL keeps running until the node restarts).
    pub fn kill_node(&mut self, id: u64) {
        if let Some(mut c) = self.node_mut(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` to node `id`'s process (SIGSTOP/SIGCONT pause and resume it). SIGSTOP
    /// returns once every thread of the process has stopped: the kernel stops a process's
    /// threads one by one, after one of them is scheduled, and on a loaded machine the others
    /// can keep answering RPCs for tens of milliseconds after `kill` returned.
    pub fn signal_node(&self, id: u64, sig: libc::c_int) -> bool {
        match self.node(id).pid() {
            Some(pid) => {
                send(pid as i32, sig);
                if sig == libc::SIGSTOP {
                    wait_stopped(pid);
                }
                true
            }
            None => false,
        }
    }

    /// SIGTERMs node `id` and waits (up to 60 s) for it to stop.
    pub fn stop_node(&mut self, id: u64) {
        if let Some(mut c) = self.node_mut(id).child.take() {
            // A node that already failed (it should not have) says how, for the logs.
            if let Ok(Some(status)) = c.try_wait() {
                if !status.success() {
                    eprintln!("node {id} had exited before it was stopped: {status}");
                }
                return;
            }
            send(c.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs node `id`'s PostgreSQL postmaster (not the node).
    pub fn kill_postgres(&self, id: u64) -> bool {
        match self.node(id).postgres_pid() {
            Some(pid) => {
                send(pid, libc::SIGKILL);
                true
            }
            None => false,
        }
    }

    /// Sends `sig` to node `id`'s postmaster and every process it started (PostgreSQL's children
    /// run in their own sessions, so a process-group signal would miss them). SIGSTOP/SIGCONT
    /// freeze and resume the whole server.
    pub fn signal_postgres(&self, id: u64, sig: libc::c_int) -> bool {
        let Some(pid) = self.node(id).postgres_pid() else {
            return false;
        };
        send(pid, sig);
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let stat =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                // Fields after the ")" ending the command name: state, ppid, ...
                let ppid = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<i32>().ok());
                if ppid == Some(pid) {
                    send(child, sig);
                }
            }
        }
        true
    }

    /// Stops every node, then any PostgreSQL left behind by a killed node.
    pub fn shutdown(&mut self) {
        let ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        for id in &ids {
            if let Some(c) = self.node_mut(*id).child.as_ref() {
                send(c.id() as i32, libc::SIGTERM);
            }
        }
        for id in ids {
            self.stop_node(id);
            if let Some(pid) = self.node(id).postgres_pid() {
                send(pid, libc::SIGINT);
                let deadline = Instant::now() + Duration::from_secs(20);
                while alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if alive(pid) {
                    send(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// The directory holding the nodes' data.
    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// PostgreSQL runs as an unprivileged user when we are root: it must be able to traverse the
/// data directory and its parents.
fn make_searchable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let abs = std::fs::canonicalize(dir)?;
    let mode = std::fs::metadata(&abs)?.permissions().mode();
    std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode | 0o711))?;
    for d in abs.ancestors().skip(1) {
        if std::fs::metadata(d)?.permissions().mode() & 0o001 == 0 {
            return Err(std::io::Error::other(format!(
                "{} is not searchable by other users, so the PostgreSQL OS user cannot reach {}; choose a data directory under /tmp or /var/tmp",
                d.display(),
                abs.display()
            )));
        }
    }
    Ok(())
}
