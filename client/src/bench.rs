//! `raftpg bench`: measures raftpg's write path (and point reads) and, in the same run, the
//! systems users would pick instead, with the same client code and workload as
//! `../shared/baselines`: one single-row INSERT of a 100-byte payload per transaction.
//!
//! Peers: `sr` = PostgreSQL synchronous streaming replication (primary + 2 standbys on loopback,
//! `synchronous_standby_names = 'ANY 1 (s1, s2)'`, `synchronous_commit = on`), measured with
//! tokio-postgres on the primary; `solo` = one standalone PostgreSQL (`synchronous_commit = on`).
//! `insecure` = raftpg itself started with `--insecure` (no TLS, no authentication, writes
//! run as raftpg instead of the client's role): what the trust boundary costs.
//! `etcd` = etcd 3.4, three members on loopback, 100-byte puts: the reference for the consensus
//! path, measured by the baseline script `etcd.sh` (its own Rust client, one outstanding put
//! per client, against the leader) in the same run.
//! Every raftpg point is printed with its ratio to each peer at the same client count.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::v1::{Consistency, QueryRequest};
use crate::{values, Client, ClientConfig, LocalCluster, LocalClusterSpec};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    /// raftpg cluster size.
    pub nodes: usize,
    /// Client counts (one point each).
    pub clients: Vec<usize>,
    /// Seconds per point.
    pub seconds: u64,
    /// Peers: "sr", "solo", "insecure", "etcd".
    pub peers: Vec<String>,
    /// The baseline scripts (`../shared/baselines`), for the `etcd` peer.
    pub baselines: PathBuf,
    /// Scratch directory.
    pub dir: PathBuf,
    /// Port of raftpg node 1 (others follow); peers use the ports after them.
    pub base_port: u16,
    /// Also measure point reads at each consistency level (at 1 client and at the largest
    /// client count ≤ 32).
    pub reads: bool,
    /// Write results here (JSON lines).
    pub out: Option<PathBuf>,
    /// Entries a stopped follower misses before it is restarted and timed catching up (0: skip).
    pub catchup_entries: u64,
    /// Also measure raftpg through its PostgreSQL wire protocol port (tokio-postgres over TLS,
    /// clients spread over every node), next to the gRPC API in the same run.
    pub wire: bool,
    /// Also run pgbench's TPC-B-like transaction on raftpg's leader and the sr primary
    /// ([`tpcb_point`]).
    pub tpcb: bool,
}

/// One measured point.
#[derive(Clone, Debug, Default)]
pub struct Point {
    /// "raftpg", "sr", "solo", "raftpg-read-local", ...
    pub system: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Failed operations.
    pub errors: u64,
    /// Largest RSS of a server process (a raftpg node; a postmaster for the peers) during the
    /// point (MiB), if known.
    pub rss_mb: f64,
    /// CPU seconds used by the server processes per wall second.
    pub cpu: f64,
    /// CPU microseconds per successful operation, by process group ([`Proc`]'s label), in the
    /// order measured.
    pub cpu_us: Vec<(String, f64)>,
}

/// What CPU of a process counts for a [`Proc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The process itself (all its threads).
    Own,
    /// Everything it started, recursively, not itself (a raftpg node's PostgreSQL).
    Descendants,
    /// The process and everything it started (a postmaster and its backends).
    Tree,
}

/// A process group whose CPU a point reports per operation: a raftpg node, its PostgreSQL, a
/// peer's server, the benchmark's own client. Labels name machines: `node1` and `node1-pg`
/// share one, `s1` is a machine of its own.
#[derive(Clone, Debug)]
pub struct Proc {
    /// `node1`, `node1-pg`, `primary`, `s1`, `client`, ... (`*` marks the leader's node).
    pub label: String,
    pub pid: i32,
    pub scope: Scope,
}

impl Proc {
    fn new(label: impl Into<String>, pid: i32, scope: Scope) -> Self {
        Proc {
            label: label.into(),
            pid,
            scope,
        }
    }

    /// CPU seconds used so far.
    fn cpu(&self) -> f64 {
        let (own, tree) = (proc_cpu(self.pid), proc_usage(self.pid).0);
        match self.scope {
            Scope::Own => own,
            Scope::Descendants => (tree - own).max(0.0),
            Scope::Tree => tree,
        }
    }

    /// The benchmark's own client (this process).
    fn client() -> Self {
        Proc::new("client", std::process::id() as i32, Scope::Own)
    }
}

/// (utime + stime) seconds of `pid` alone (all its threads).
fn proc_cpu(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .map(|stat| {
            let f: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            (ut + st) / 100.0 // USER_HZ on Linux
        })
        .unwrap_or(0.0)
}

/// The busiest machine's CPU microseconds per operation in `cpu_us`, with the machine's name:
/// a machine is a label and its `-pg` companion; the client's machine is not counted.
pub fn busiest_machine(cpu_us: &[(String, f64)]) -> Option<(String, f64)> {
    let mut machines: Vec<(String, f64)> = Vec::new();
    for (label, us) in cpu_us {
        if label == "client" {
            continue;
        }
        let machine = label.trim_end_matches("-pg").to_string();
        match machines.iter_mut().find(|(m, _)| *m == machine) {
            Some((_, total)) => *total += us,
            None => machines.push((machine, *us)),
        }
    }
    machines.into_iter().max_by(|a, b| a.1.total_cmp(&b.1))
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// (utime + stime) seconds of `pid` and its children (recursively), and the RSS MiB of `pid`
/// itself (a raftpg node, or a postmaster: PostgreSQL backends' RSS counts the shared buffers
/// they touched, which says nothing about leaks).
fn proc_usage(pid: i32) -> (f64, f64) {
    let mut cpu = 0.0;
    let mut rss = 0.0f64;
    let mut stack = vec![pid];
    let all: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let ppid = stat
                        .rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse()
                        .ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    while let Some(p) = stack.pop() {
        cpu += proc_cpu(p);
        let status = (p == pid)
            .then(|| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .flatten();
        if let Some(status) = status {
            if let Some(kb) = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            {
                rss = rss.max(kb / 1024.0);
            }
        }
        stack.extend(all.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
    }
    (cpu, rss)
}

/// Runs `clients` workers calling `op` for `seconds`, measuring the CPU of the server
/// processes `procs` (and of this client).
async fn drive<F, Fut>(system: &str, clients: usize, seconds: u64, procs: &[Proc], op: F) -> Point
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let procs: Vec<Proc> = procs.iter().cloned().chain([Proc::client()]).collect();
    let cpu_before: Vec<f64> = procs.iter().map(Proc::cpu).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (op, stop) = (op.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                n += 1;
                if op(c, n).await {
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut rss_mb = 0.0f64;
    let deadline = started + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for p in procs.iter().filter(|p| p.scope != Scope::Descendants) {
            if p.label != "client" {
                rss_mb = rss_mb.max(proc_usage(p.pid).1);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            lat.extend(l);
            errors += e;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let used: Vec<f64> = procs
        .iter()
        .zip(&cpu_before)
        .map(|(p, before)| (p.cpu() - before).max(0.0))
        .collect();
    let server_cpu: f64 = procs
        .iter()
        .zip(&used)
        .filter(|(p, _)| p.label != "client")
        .map(|(_, u)| u)
        .sum();
    let ops = lat.len().max(1) as f64;
    let cpu_us = procs
        .iter()
        .zip(&used)
        .map(|(p, u)| (p.label.clone(), u * 1e6 / ops))
        .collect();
    lat.sort_unstable();
    Point {
        system: system.to_string(),
        clients,
        ops_per_sec: lat.len() as f64 / wall,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        p999_ms: percentile(&lat, 0.999),
        errors,
        rss_mb,
        cpu: server_cpu / wall,
        cpu_us,
    }
}

const INSERT: &str = "INSERT INTO bench_ins(payload) VALUES (lpad($1::bigint::text, 100, 'x'))";

/// The point read of the read workload.
const READ: &str = "SELECT payload FROM bench_ins WHERE id = $1";

/// `clients` wire protocol connections to `cluster` (client `i` to node `i % nodes`, as the
/// cluster's administrator over TLS, or as raftpg on an `--insecure` cluster), each with
/// `sql` prepared.
async fn wire_connections(
    cluster: &LocalCluster,
    clients: usize,
    sql: &str,
) -> anyhow::Result<Vec<(Arc<tokio_postgres::Client>, tokio_postgres::Statement)>> {
    let config = cluster.client_config()?;
    let ca = cluster.certs().map(|d| d.join("ca.crt"));
    let (user, password) = match &config.credentials {
        Some(c) => (c.user.clone(), Some(c.password.clone())),
        None => ("raftpg".to_string(), None),
    };
    let nodes = cluster.nodes();
    let mut out = Vec::with_capacity(clients);
    for i in 0..clients {
        let (host, port) = nodes[i % nodes.len()].pg_host_port();
        let cl = crate::pg_wire::connect(&host, port, &user, password.as_deref(), ca.as_deref())
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let st = cl.prepare(sql).await?;
        out.push((Arc::new(cl), st));
    }
    Ok(out)
}

/// The process groups of a raftpg cluster's nodes (each node, and its PostgreSQL), the leader
/// marked `*`.
fn node_procs(cluster: &LocalCluster, leader: u64) -> Vec<Proc> {
    cluster
        .nodes()
        .iter()
        .filter_map(|n| {
            let pid = n.pid()? as i32;
            let mark = if n.id == leader { "*" } else { "" };
            Some([
                Proc::new(format!("node{}{mark}", n.id), pid, Scope::Own),
                Proc::new(format!("node{}{mark}-pg", n.id), pid, Scope::Descendants),
            ])
        })
        .flatten()
        .collect()
}

/// The raftpg cluster a run measures: the default one (TLS, authentication, writes as the
/// client's role), or the `insecure` peer (writes only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Secure,
    Insecure,
}

impl Variant {
    fn system(self) -> &'static str {
        match self {
            Variant::Secure => "raftpg",
            Variant::Insecure => "raftpg-insecure",
        }
    }
}

async fn bench_raftpg(
    spec: &BenchSpec,
    points: &mut Vec<Point>,
    variant: Variant,
) -> anyhow::Result<()> {
    let dir = spec.dir.join(variant.system());
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let port = match variant {
        Variant::Secure => spec.base_port,
        Variant::Insecure => spec.base_port + 120,
    };
    let mut cs = LocalClusterSpec::new(spec.nodes, &dir, port);
    cs.tls = variant == Variant::Secure;
    cs.extra_args = vec!["--pg-shared-buffers".into(), "256MB".into()];
    let mut cluster = LocalCluster::start(cs)?;
    let admin = cluster.client()?;
    admin.wait_for_leader(Duration::from_secs(120)).await?;
    admin
        .execute_one(
            "CREATE TABLE bench_ins (id bigserial PRIMARY KEY, payload text NOT NULL)",
            vec![],
        )
        .await?;
    let leader = admin.wait_for_leader(Duration::from_secs(30)).await?;
    let pids = node_procs(&cluster, leader);
    let cluster_config = cluster.client_config()?;
    for &c in &spec.clients {
        admin
            .execute_one("TRUNCATE bench_ins RESTART IDENTITY", vec![])
            .await?;
        let clients: Vec<Arc<Client>> = (0..c)
            .map(|_| {
                Client::with_config(
                    &cluster.addrs(),
                    ClientConfig {
                        attempt_timeout: Duration::from_secs(10),
                        ..cluster_config.clone()
                    },
                )
                .map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        for cl in &clients {
            cl.wait_for_leader(Duration::from_secs(30)).await?;
        }
        let p = drive(variant.system(), c, spec.seconds, &pids, move |i, _| {
            let cl = clients[i].clone();
            async move {
                cl.execute_one(INSERT, vec![values::int(i as i64 + 1)])
                    .await
                    .is_ok()
            }
        })
        .await;
        print_point(&p, points);
        points.push(p);
        if spec.wire && variant == Variant::Secure {
            admin
                .execute_one("TRUNCATE bench_ins RESTART IDENTITY", vec![])
                .await?;
            let conns = wire_connections(&cluster, c, INSERT).await?;
            let p = drive("raftpg-pg", c, spec.seconds, &pids, move |i, _| {
                let (cl, st) = conns[i].clone();
                async move { cl.execute(&st, &[&(i as i64 + 1)]).await.is_ok() }
            })
            .await;
            print_point(&p, points);
            points.push(p);
        }
    }
    if variant == Variant::Insecure {
        return Ok(());
    }
    if spec.tpcb {
        bench_raftpg_tpcb(spec, &cluster, leader, points).await?;
    }
    if spec.reads {
        let rows = admin
            .query_sql(
                "SELECT count(*) FROM bench_ins",
                vec![],
                Consistency::Linearizable,
            )
            .await?
            .rows
            .first()
            .and_then(|r| values::as_i64(&r.values[0]))
            .unwrap_or(1)
            .max(1);
        for c in read_client_counts(spec) {
            for (name, level) in [
                ("local", Consistency::Local),
                ("at-least", Consistency::AtLeast),
                ("linearizable", Consistency::Linearizable),
            ] {
                let clients: Vec<Arc<Client>> = (0..c)
                    .map(|_| cluster.client().map(Arc::new))
                    .collect::<Result<_, _>>()?;
                let nodes = cluster.addrs().len();
                let p = drive(
                    &format!("raftpg-read-{name}"),
                    c,
                    spec.seconds.min(10),
                    &pids,
                    move |i, n| {
                        let cl = clients[i].clone();
                        async move {
                            let id = (n * 7919 + i as u64) % rows as u64 + 1;
                            cl.query_node(
                                i % nodes,
                                QueryRequest {
                                    sql: "SELECT payload FROM bench_ins WHERE id = $1".into(),
                                    params: vec![values::int(id as i64)],
                                    consistency: level as i32,
                                    min_index: 1,
                                    ..Default::default()
                                },
                            )
                            .await
                            .is_ok()
                        }
                    },
                )
                .await;
                print_point(&p, points);
                points.push(p);
            }
            if spec.wire {
                for level in ["local", "at_least:1", "linearizable"] {
                    let conns = wire_connections(&cluster, c, READ).await?;
                    for (cl, _) in &conns {
                        cl.batch_execute(&format!("SET raftpg.read_consistency = '{level}'"))
                            .await?;
                    }
                    let name = level.split(':').next().unwrap_or(level).replace('_', "-");
                    let p = drive(
                        &format!("raftpg-pg-read-{name}"),
                        c,
                        spec.seconds.min(10),
                        &pids,
                        move |i, n| {
                            let (cl, st) = conns[i].clone();
                            async move {
                                let id = ((n * 7919 + i as u64) % rows as u64 + 1) as i64;
                                cl.query_opt(&st, &[&id]).await.is_ok()
                            }
                        },
                    )
                    .await;
                    print_point(&p, points);
                    points.push(p);
                }
            }
        }
    }
    if spec.catchup_entries > 0 {
        let p = catch_up(&mut cluster, &admin, spec.catchup_entries).await?;
        print_point(&p, points);
        points.push(p);
    }
    drop(cluster);
    Ok(())
}

/// Stops a follower, writes `entries` entries (64 concurrent writers), restarts it and times
/// how fast it catches up (log entries, or a snapshot and the entries after it).
async fn catch_up(
    cluster: &mut LocalCluster,
    admin: &Client,
    entries: u64,
) -> anyhow::Result<Point> {
    let leader = admin.wait_for_leader(Duration::from_secs(30)).await?;
    let follower = (1..=cluster.nodes().len() as u64)
        .find(|n| *n != leader)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let before = admin
        .status_of((follower - 1) as usize)
        .await?
        .applied_index;
    cluster.stop_node(follower);
    let writers = 64u64;
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let c = cluster.client()?;
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..entries.div_ceil(writers) {
                if c.execute_one(INSERT, vec![values::int(w as i64)])
                    .await
                    .is_ok()
                {
                    written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let target = admin.status_of((leader - 1) as usize).await?.last_log_index;
    let behind = target.saturating_sub(before);
    cluster.start_node(follower)?;
    // Time from the node answering (its PostgreSQL up) to having applied everything.
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while admin.status_of((follower - 1) as usize).await.is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "follower did not come back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = std::time::Instant::now();
    let first = admin
        .status_of((follower - 1) as usize)
        .await?
        .applied_index;
    // Rows the follower holds, read from its own copy: concurrent writes share log entries,
    // so the catch-up rate is counted in writes.
    let on_follower = cluster.client_of(&[cluster.addrs()[(follower - 1) as usize].clone()])?;
    let rows_now = || async {
        let r = on_follower
            .query_sql("SELECT count(*) FROM bench_ins", vec![], Consistency::Local)
            .await?;
        anyhow::Ok(
            r.rows
                .first()
                .and_then(|r| values::as_i64(&r.values[0]))
                .unwrap_or(0),
        )
    };
    let rows_first = rows_now().await?;
    loop {
        let s = admin.status_of((follower - 1) as usize).await?;
        if s.applied_index >= target {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "follower did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = start.elapsed().as_secs_f64().max(0.001);
    let caught = target.saturating_sub(first).max(1);
    let writes = (rows_now().await? - rows_first).max(0);
    println!(
        "catch-up: node {follower} missed {} writes ({behind} entries), caught up {writes} writes ({caught} entries) in {secs:.2} s once it answered: {:.0} writes/s",
        written.load(std::sync::atomic::Ordering::Relaxed),
        writes as f64 / secs
    );
    Ok(Point {
        system: "raftpg-catchup".into(),
        clients: 0,
        ops_per_sec: writes as f64 / secs,
        ..Default::default()
    })
}

/// PostgreSQL servers for the peers, run as the `postgres` OS user when we are root.
struct PgServers {
    dir: PathBuf,
    bin: PathBuf,
    datadirs: Vec<PathBuf>,
}

impl PgServers {
    fn run(&self, cmd: &str) -> anyhow::Result<()> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let status = if root {
            Command::new("su")
                .args(["postgres", "-s", "/bin/sh", "-c", cmd])
                .status()?
        } else {
            Command::new("sh").args(["-c", cmd]).status()?
        };
        if !status.success() {
            bail!("`{cmd}` failed: {status}");
        }
        Ok(())
    }

    fn start(&self, data: &Path, port: u16) -> anyhow::Result<()> {
        self.run(&format!(
            "{bin}/pg_ctl -D {d} -l {d}.log -w -o '-p {port} -c listen_addresses=127.0.0.1 -k {sock} -c shared_buffers=256MB -c max_connections=300' start >/dev/null",
            bin = self.bin.display(),
            d = data.display(),
            sock = self.dir.display()
        ))
    }

    fn initdb(&self, data: &Path) -> anyhow::Result<()> {
        self.run(&format!(
            "{}/initdb -D {} -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null",
            self.bin.display(),
            data.display()
        ))
    }

    fn new(dir: PathBuf) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let bin =
            crate::local_cluster::postgres_bin_dir().context("PostgreSQL binaries not found")?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        Ok(PgServers {
            dir,
            bin,
            datadirs: Vec::new(),
        })
    }
}

impl Drop for PgServers {
    fn drop(&mut self) {
        for d in self.datadirs.iter().rev() {
            let _ = self.run(&format!(
                "{}/pg_ctl -D {} -m fast stop >/dev/null 2>&1",
                self.bin.display(),
                d.display()
            ));
        }
    }
}

fn postmaster_pid(data: &Path) -> Option<i32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

async fn bench_postgres(
    system: &str,
    port: u16,
    pids: &[Proc],
    spec: &BenchSpec,
    points: &mut Vec<Point>,
) -> anyhow::Result<()> {
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute("DROP TABLE IF EXISTS bench_ins; CREATE TABLE bench_ins (id bigserial PRIMARY KEY, payload text NOT NULL)")
        .await?;
    for &c in &spec.clients {
        admin
            .batch_execute("TRUNCATE bench_ins RESTART IDENTITY; CHECKPOINT")
            .await?;
        let mut conns = Vec::new();
        for _ in 0..c {
            let (cl, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            cl.batch_execute("SET synchronous_commit = on").await?;
            let st = cl
                .prepare("INSERT INTO bench_ins(payload) VALUES (lpad($1::bigint::text, 100, 'x'))")
                .await?;
            conns.push(Arc::new((cl, st)));
        }
        let p = drive(system, c, spec.seconds, pids, move |i, _| {
            let cs = conns[i].clone();
            async move { cs.0.execute(&cs.1, &[&(i as i64 + 1)]).await.is_ok() }
        })
        .await;
        print_point(&p, points);
        points.push(p);
    }
    Ok(())
}

async fn bench_sr(spec: &BenchSpec, points: &mut Vec<Point>) -> anyhow::Result<()> {
    let mut s = PgServers::new(spec.dir.join("sr"))?;
    let (p0, p1, p2) = (
        spec.base_port + 100,
        spec.base_port + 101,
        spec.base_port + 102,
    );
    let primary = s.dir.join("primary");
    s.initdb(&primary)?;
    s.run(&format!(
        "printf \"wal_level = replica\\nmax_wal_senders = 10\\nwal_keep_size = 1GB\\nhot_standby = on\\nsynchronous_standby_names = 'ANY 1 (s1, s2)'\\n\" >> {}/postgresql.conf",
        primary.display()
    ))?;
    s.start(&primary, p0)?;
    s.datadirs.push(primary.clone());
    for (name, port) in [("s1", p1), ("s2", p2)] {
        let d = s.dir.join(name);
        s.run(&format!(
            "{bin}/pg_basebackup -h 127.0.0.1 -p {p0} -U postgres -D {d} -X stream -c fast && printf \"primary_conninfo = 'host=127.0.0.1 port={p0} user=postgres application_name={name}'\\n\" >> {d}/postgresql.auto.conf && touch {d}/standby.signal",
            bin = s.bin.display(),
            d = d.display()
        ))?;
        s.start(&d, port)?;
        s.datadirs.push(d);
    }
    // Wait until both standbys stream in quorum mode.
    let url = format!("host=127.0.0.1 port={p0} user=postgres dbname=postgres");
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = admin
            .query_one("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state IN ('quorum', 'sync')", &[])
            .await?
            .get(0);
        if n == 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("standbys did not reach quorum state");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pids: Vec<Proc> = s
        .datadirs
        .iter()
        .zip(["primary", "s1", "s2"])
        .filter_map(|(d, label)| Some(Proc::new(label, postmaster_pid(d)?, Scope::Tree)))
        .collect();
    bench_postgres("sr", p0, &pids, spec, points).await?;
    if spec.tpcb {
        let conninfo = format!("host=127.0.0.1 port={p0} user=postgres dbname=postgres");
        let init = Command::new("pgbench")
            .args(["-i", "-q", "-s", &TPCB_SCALE.to_string(), &conninfo])
            .output()?;
        if !init.status.success() {
            bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
        }
        for &c in &spec.clients {
            let p = tpcb_point("sr-tpcb", &conninfo, &[], c, spec.seconds, &pids).await?;
            print_point(&p, points);
            points.push(p);
        }
    }
    if spec.reads {
        bench_standby_reads(p1, &pids, spec, points).await?;
    }
    Ok(())
}

/// The read a user of streaming replication does: point selects by id, prepared, straight
/// into a standby (`sr-standby-read`), at the client counts raftpg's reads use. raftpg's read
/// points are printed with their ratio to it.
async fn bench_standby_reads(
    port: u16,
    pids: &[Proc],
    spec: &BenchSpec,
    points: &mut Vec<Point>,
) -> anyhow::Result<()> {
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM bench_ins", &[])
        .await?
        .get(0);
    let rows = rows.max(1) as u64;
    for c in read_client_counts(spec) {
        let mut conns = Vec::new();
        for _ in 0..c {
            let (cl, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let st = cl
                .prepare("SELECT payload FROM bench_ins WHERE id = $1")
                .await?;
            conns.push(Arc::new((cl, st)));
        }
        let p = drive(
            "sr-standby-read",
            c,
            spec.seconds.min(10),
            pids,
            move |i, n| {
                let cs = conns[i].clone();
                async move {
                    let id = ((n * 7919 + i as u64) % rows + 1) as i64;
                    cs.0.query_opt(&cs.1, &[&id]).await.is_ok()
                }
            },
        )
        .await;
        print_point(&p, points);
        points.push(p);
    }
    Ok(())
}

/// The client counts of the read points: 1 (latency) and the largest of `--clients` up to 32
/// (throughput), when `--clients` has them.
fn read_client_counts(spec: &BenchSpec) -> Vec<usize> {
    let most = spec
        .clients
        .iter()
        .copied()
        .filter(|c| *c <= 32)
        .max()
        .unwrap_or(8);
    match spec.clients.contains(&1) && most > 1 {
        true => vec![1, most],
        false => vec![most],
    }
}

async fn bench_solo(spec: &BenchSpec, points: &mut Vec<Point>) -> anyhow::Result<()> {
    let mut s = PgServers::new(spec.dir.join("solo"))?;
    let port = spec.base_port + 110;
    let d = s.dir.join("data");
    s.initdb(&d)?;
    s.start(&d, port)?;
    s.datadirs.push(d.clone());
    let pids: Vec<Proc> = postmaster_pid(&d)
        .map(|p| Proc::new("solo", p, Scope::Tree))
        .into_iter()
        .collect();
    bench_postgres("solo", port, &pids, spec, points).await
}

/// The `etcd` peer: runs `etcd.sh` from the baseline scripts (it starts three etcd 3.4 members
/// on free loopback ports from 23790, builds its Rust client on first use, and puts 100-byte
/// values at each client count for `seconds`, one repetition) with its results written under
/// the bench's directory, and reads them back as points named `etcd`. CPU per put is not
/// measured (the script owns the processes).
async fn bench_etcd(spec: &BenchSpec, points: &mut Vec<Point>) -> anyhow::Result<()> {
    let script = spec.baselines.join("etcd.sh");
    if !script.is_file() {
        bail!(
            "{} not found: give the baseline scripts' folder with --baselines (the project's ../shared/baselines)",
            script.display()
        );
    }
    let on_path = |bin: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
    };
    if !on_path("etcd") || !on_path("etcdctl") {
        bail!("the etcd peer needs etcd 3.4 and etcdctl: apt-get install etcd-server etcd-client");
    }
    let results = spec.dir.join("etcd-results");
    let _ = std::fs::remove_dir_all(&results);
    let clients: Vec<String> = spec.clients.iter().map(|c| c.to_string()).collect();
    println!("etcd: {} (3 members, 100-byte puts)", script.display());
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .env("RESULTS_DIR", &results)
        .env("CLIENTS", clients.join(" "))
        .env("REPS", "1")
        .env("ETCD_T", spec.seconds.to_string())
        .env("ETCD_CHECK_PERF", "0")
        .env("VALUE_BYTES", "100")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(spec.dir.join("etcd.log"))?)
        .kill_on_drop(true)
        .status()
        .await
        .context("running etcd.sh")?;
    if !status.success() {
        bail!(
            "etcd.sh failed ({status}); see {}",
            spec.dir.join("etcd.log").display()
        );
    }
    let mut found = 0;
    for entry in std::fs::read_dir(&results)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "tsv") {
            for p in etcd_points(&std::fs::read_to_string(&path)?)? {
                print_point(&p, points);
                points.push(p);
                found += 1;
            }
        }
    }
    if found == 0 {
        bail!("etcd.sh wrote no results into {}", results.display());
    }
    Ok(())
}

/// The points of an `etcd.sh` results file (tab-separated: label, clients, repetition, puts/s,
/// average, p50 and p99 in ms, puts, errors, ...).
fn etcd_points(tsv: &str) -> anyhow::Result<Vec<Point>> {
    let mut out = Vec::new();
    for line in tsv
        .lines()
        .filter(|l| !l.starts_with("label\t") && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 9 {
            bail!("unexpected etcd.sh result line {line:?}");
        }
        let num = |i: usize| -> anyhow::Result<f64> {
            f[i].trim()
                .parse::<f64>()
                .with_context(|| format!("field {i} of {line:?}"))
        };
        out.push(Point {
            system: "etcd".into(),
            clients: num(1)? as usize,
            ops_per_sec: num(3)?,
            p50_ms: num(5)?,
            p99_ms: num(6)?,
            errors: num(8)? as u64,
            ..Point::default()
        });
    }
    Ok(out)
}

/// A raftpg write point (the ones printed with ratios).
fn is_raftpg_write(system: &str) -> bool {
    system == "raftpg" || system == "raftpg-insecure" || system == "raftpg-pg"
}

/// pgbench's scale for the TPC-B-like points (100,000 accounts per unit).
const TPCB_SCALE: u32 = 1;

/// The TPC-B-like points of raftpg: pgbench's tables created and filled through the wire
/// protocol, then its built-in script against the leader at every client count.
async fn bench_raftpg_tpcb(
    spec: &BenchSpec,
    cluster: &LocalCluster,
    leader: u64,
    points: &mut Vec<Point>,
) -> anyhow::Result<()> {
    let config = cluster.client_config()?;
    let node = cluster
        .nodes()
        .iter()
        .find(|n| n.id == leader)
        .context("the leader's node")?;
    let (host, port) = node.pg_host_port();
    let (user, env) = match &config.credentials {
        Some(c) => (
            c.user.clone(),
            vec![("PGPASSWORD".to_string(), c.password.clone())],
        ),
        None => ("raftpg".to_string(), Vec::new()),
    };
    let tls = match cluster.certs() {
        Some(d) => format!(
            " sslmode=verify-full sslrootcert={}",
            d.join("ca.crt").display()
        ),
        None => String::new(),
    };
    let conninfo = format!("host={host} port={port} user={user} dbname=raftpg{tls}");
    // pgbench's own data generation uses COPY with options raftpg refuses: create the tables
    // with it, fill them with one write each.
    let init = Command::new("pgbench")
        .args(["-i", "-I", "dtp", "-s", &TPCB_SCALE.to_string(), &conninfo])
        .envs(env.clone())
        .output()?;
    if !init.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
    }
    let accounts = 100_000 * TPCB_SCALE;
    let load = format!(
        "INSERT INTO pgbench_branches (bid, bbalance) SELECT b, 0 FROM generate_series(1, {s}) b ORDER BY b;
         INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT t, (t - 1) / 10 + 1, 0 FROM generate_series(1, {t}) t ORDER BY t;
         INSERT INTO pgbench_accounts (aid, bid, abalance, filler) SELECT a, (a - 1) / 100000 + 1, 0, '' FROM generate_series(1, {accounts}) a ORDER BY a",
        s = TPCB_SCALE,
        t = 10 * TPCB_SCALE
    );
    let loaded = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conninfo,
            "-c",
            &load,
        ])
        .envs(env.clone())
        .output()?;
    if !loaded.status.success() {
        bail!(
            "loading pgbench's tables: {}",
            String::from_utf8_lossy(&loaded.stderr)
        );
    }
    let pids = node_procs(cluster, leader);
    for &c in &spec.clients {
        let p = tpcb_point("raftpg-tpcb", &conninfo, &env, c, spec.seconds, &pids).await?;
        print_point(&p, points);
        points.push(p);
    }
    Ok(())
}

/// Runs pgbench's built-in TPC-B-like script (prepared statements, `clients` connections,
/// `seconds`) against `conninfo`; the point of its report (transactions per second; p50 is
/// pgbench's average latency, p99 and p999 are not measured).
async fn tpcb_point(
    system: &str,
    conninfo: &str,
    env: &[(String, String)],
    clients: usize,
    seconds: u64,
    procs: &[Proc],
) -> anyhow::Result<Point> {
    let cpu_before: Vec<f64> = procs.iter().map(Proc::cpu).collect();
    let started = Instant::now();
    let out = tokio::process::Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(4).to_string(),
            "-T",
            &seconds.to_string(),
            conninfo,
        ])
        .envs(env.iter().cloned())
        .output()
        .await?;
    let wall = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("pgbench: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let tps = field("tps = ").context("pgbench printed no tps")?;
    let used: f64 = procs
        .iter()
        .zip(&cpu_before)
        .map(|(p, b)| (p.cpu() - b).max(0.0))
        .sum();
    let done = tps * seconds as f64;
    Ok(Point {
        system: system.to_string(),
        clients,
        ops_per_sec: tps,
        p50_ms: field("latency average = ").unwrap_or(0.0),
        errors: field("number of failed transactions: ").unwrap_or(0.0) as u64,
        cpu: used / wall,
        cpu_us: procs
            .iter()
            .zip(&cpu_before)
            .map(|(p, b)| {
                (
                    p.label.clone(),
                    (p.cpu() - b).max(0.0) * 1e6 / done.max(1.0),
                )
            })
            .collect(),
        ..Default::default()
    })
}

/// A system raftpg's write points are compared with.
fn is_peer(system: &str) -> bool {
    !system.starts_with("raftpg") || system == "raftpg-insecure"
}

fn print_point(p: &Point, earlier: &[Point]) {
    let ratios: Vec<String> = earlier
        .iter()
        .filter(|q| {
            q.clients == p.clients
                && q.system != p.system
                && ((is_peer(&q.system) && !q.system.ends_with("-read") && q.system != "sr-tpcb"
                    || (p.system == "raftpg-pg" && q.system == "raftpg"))
                    && is_raftpg_write(&p.system)
                    || (p.system == "raftpg-tpcb" && q.system == "sr-tpcb")
                    || q.system == "sr-standby-read"
                        && p.system.starts_with("raftpg-")
                        && p.system.contains("-read-"))
        })
        .map(|q| {
            format!(
                "{:.2}x {}",
                p.ops_per_sec / q.ops_per_sec.max(1e-9),
                q.system
            )
        })
        .collect();
    println!(
        "{:<24} {:>4} clients {:>9.0} ops/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p999 {:>7.2} ms  errors {:>5}  rss {:>6.0} MiB  cpu {:>4.2}  {}",
        p.system, p.clients, p.ops_per_sec, p.p50_ms, p.p99_ms, p.p999_ms, p.errors, p.rss_mb, p.cpu, ratios.join(", ")
    );
    if !p.cpu_us.is_empty() {
        let parts: Vec<String> = p
            .cpu_us
            .iter()
            .map(|(l, us)| format!("{l} {us:.0}"))
            .collect();
        let busiest = busiest_machine(&p.cpu_us)
            .map(|(m, us)| format!("  busiest machine {m} {us:.0}"))
            .unwrap_or_default();
        println!("    cpu µs/op: {}{busiest}", parts.join(" · "));
    }
}

/// Runs the benchmark and prints the table (peers first, so raftpg's lines carry ratios).
pub async fn run(spec: BenchSpec) -> anyhow::Result<Vec<Point>> {
    let mut points = Vec::new();
    for peer in &spec.peers {
        match peer.as_str() {
            "sr" => bench_sr(&spec, &mut points).await.context("peer sr")?,
            "solo" => bench_solo(&spec, &mut points).await.context("peer solo")?,
            "insecure" => bench_raftpg(&spec, &mut points, Variant::Insecure)
                .await
                .context("peer insecure")?,
            "etcd" => bench_etcd(&spec, &mut points).await.context("peer etcd")?,
            other => bail!("unknown peer {other:?} (sr, solo, insecure, etcd)"),
        }
    }
    bench_raftpg(&spec, &mut points, Variant::Secure).await?;
    println!("\n| system | clients | ops/s | p50 ms | p99 ms | p999 ms | errors | ratio vs sr | ratio vs solo | ratio vs etcd | ratio vs insecure | ratio vs gRPC |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &points {
        let ratio = |peer: &str| {
            points
                .iter()
                .find(|q| q.system == peer && q.clients == p.clients)
                .filter(|_| is_raftpg_write(&p.system) && p.system != peer)
                .map(|q| format!("{:.2}", p.ops_per_sec / q.ops_per_sec.max(1e-9)))
                .unwrap_or_default()
        };
        let vs_grpc = match p.system.as_str() {
            "raftpg-pg" => ratio("raftpg"),
            _ => String::new(),
        };
        // A TPC-B point is compared with the same transactions on sr only.
        let vs_sr = match p.system.as_str() {
            "raftpg-tpcb" => points
                .iter()
                .find(|q| q.system == "sr-tpcb" && q.clients == p.clients)
                .map(|q| format!("{:.2}", p.ops_per_sec / q.ops_per_sec.max(1e-9)))
                .unwrap_or_default(),
            _ => ratio("sr"),
        };
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |",
            p.system,
            p.clients,
            p.ops_per_sec,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            p.errors,
            vs_sr,
            ratio("solo"),
            ratio("etcd"),
            ratio("raftpg-insecure"),
            vs_grpc
        );
    }
    if let Some(out) = &spec.out {
        let mut text = String::new();
        for p in &points {
            text.push_str(&format!(
                "{{\"system\":\"{}\",\"clients\":{},\"ops_per_sec\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"errors\":{},\"rss_mb\":{:.1},\"cpu\":{:.2},\"cpu_us\":{}}}\n",
                p.system, p.clients, p.ops_per_sec, p.p50_ms, p.p99_ms, p.p999_ms, p.errors, p.rss_mb, p.cpu,
                serde_json::Value::Object(
                    p.cpu_us
                        .iter()
                        .map(|(l, us)| (l.clone(), serde_json::json!((us * 10.0).round() / 10.0)))
                        .collect()
                )
            ));
        }
        std::fs::write(out, text)?;
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_is_a_node_and_its_postgres_and_the_client_is_elsewhere() {
        let us = |v: &[(&str, f64)]| -> Vec<(String, f64)> {
            v.iter().map(|(l, u)| (l.to_string(), *u)).collect()
        };
        let raftpg = us(&[
            ("node1*", 80.0),
            ("node1*-pg", 40.0),
            ("node2", 50.0),
            ("node2-pg", 45.0),
            ("client", 500.0),
        ]);
        assert_eq!(busiest_machine(&raftpg), Some(("node1*".into(), 120.0)));
        let sr = us(&[
            ("primary", 70.0),
            ("s1", 30.0),
            ("s2", 31.0),
            ("client", 9.0),
        ]);
        assert_eq!(busiest_machine(&sr), Some(("primary".into(), 70.0)));
        assert_eq!(busiest_machine(&us(&[("client", 1.0)])), None);
    }

    #[test]
    fn etcd_results_become_points() {
        let tsv = "label\tclients\trep\ttps\tlat_avg_ms\tp50_ms\tp99_ms\tn_txn\tfailed\tloadavg1\tfsync_p50_us_before\tfsync_p50_us_after\n\
                   etcd 3-node put 100B\t1\t1\t1212.5\t0.82\t0.80\t1.90\t9700\t0\t0.5\t120\t130\n\
                   etcd 3-node put 100B\t32\t1\t6153\t5.2\t4.9\t12.0\t49224\t2\t1.5\t120\t130\n";
        let points = etcd_points(tsv).unwrap();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].system, "etcd");
        assert_eq!(points[0].clients, 1);
        assert!((points[0].ops_per_sec - 1212.5).abs() < 1e-9);
        assert!((points[1].p99_ms - 12.0).abs() < 1e-9);
        assert_eq!(points[1].errors, 2);
        assert!(etcd_points("etcd\t1\t1\n").is_err());
        assert!(etcd_points("etcd\tx\t1\t5\t1\t1\t1\t1\t0\n").is_err());
    }

    #[test]
    fn this_process_uses_cpu_and_has_no_children() {
        let me = Proc::client();
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(120) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(me.cpu() >= 0.05, "{}", me.cpu());
        let kids = Proc::new("kids", me.pid, Scope::Descendants);
        assert!(kids.cpu() < 0.05, "{}", kids.cpu());
    }
}
