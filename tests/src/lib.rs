//! testkit: shared helpers for the integration tests. Starts real clusters of `raftpg-node`
//! processes (each with its own PostgreSQL), drives write loads through the real client, and
//! compares every node's PostgreSQL directly (not through raftpg).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use raftpg_client::{Client, ClientConfig, ClientError, LocalCluster, LocalClusterSpec};

pub use raftpg_client::values;

/// A cluster started for one test. Its data directory is removed when the test passes and
/// kept (with node logs) when it fails.
pub struct TestCluster {
    /// The node processes.
    pub cluster: LocalCluster,
    /// A client knowing every node.
    pub client: Client,
    /// The settings of `client` (TLS included), for clients of single nodes.
    client_config: ClientConfig,
    /// The certificates' directory of a cluster started with TLS.
    certs: Option<PathBuf>,
    dir: PathBuf,
    net: u8,
}

/// Starts `nodes` nodes for test `name`; `net` (1..=250) must be unique per test: node `i`
/// listens on `127.0.<net>.<10+i>:<17000+net>` (loopback only). The nodes run with TLS (the
/// cluster's certificates in `<test dir>/certs`, see `LocalCluster`); the clients verify them
/// and present the client certificate `admin`.
pub async fn start_cluster(name: &str, net: u8, nodes: usize) -> anyhow::Result<TestCluster> {
    start_cluster_with(name, net, nodes, &[]).await
}

/// Like [`start_cluster`], with extra `raftpg-node` flags for every node.
pub async fn start_cluster_with(
    name: &str,
    net: u8,
    nodes: usize,
    extra: &[&str],
) -> anyhow::Result<TestCluster> {
    start_cluster_env(name, net, nodes, extra, Vec::new()).await
}

/// Like [`start_cluster`], but returns as soon as the processes are started: no leader, no
/// first administrator yet (for tests of what a client meets then).
pub async fn launch_cluster(name: &str, net: u8, nodes: usize) -> anyhow::Result<TestCluster> {
    launch(name, net, nodes, &[], Vec::new(), true, None).await
}

/// Like [`start_cluster`], with the nodes in plaintext (`--insecure`).
pub async fn start_cluster_insecure(
    name: &str,
    net: u8,
    nodes: usize,
) -> anyhow::Result<TestCluster> {
    start(name, net, nodes, &[], Vec::new(), false, None).await
}

/// Like [`start_cluster`], every node seeded from the backup file `backup`
/// (`raftpg-node --restore-from`), with the certificates (and admin password) copied from
/// `certs_from`: the backup's roles keep their passwords.
pub async fn start_cluster_restored(
    name: &str,
    net: u8,
    nodes: usize,
    backup: &std::path::Path,
    certs_from: &std::path::Path,
) -> anyhow::Result<TestCluster> {
    start(
        name,
        net,
        nodes,
        &[],
        Vec::new(),
        true,
        Some((backup, certs_from)),
    )
    .await
}

/// Like [`start_cluster_with`], with environment variables per node (node `i` gets
/// `node_env[i - 1]`), e.g. libfaketime for a skewed clock.
pub async fn start_cluster_env(
    name: &str,
    net: u8,
    nodes: usize,
    extra: &[&str],
    node_env: Vec<Vec<(String, String)>>,
) -> anyhow::Result<TestCluster> {
    start(name, net, nodes, extra, node_env, true, None).await
}

async fn start(
    name: &str,
    net: u8,
    nodes: usize,
    extra: &[&str],
    node_env: Vec<Vec<(String, String)>>,
    tls: bool,
    restore: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<TestCluster> {
    let tc = launch(name, net, nodes, extra, node_env, tls, restore).await?;
    tc.client
        .wait_for_leader(Duration::from_secs(90))
        .await
        .context("waiting for a leader")?;
    // Every node serving, not only a majority, and every member's client address published
    // (leader hints name it).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let statuses = tc.client.status_all().await;
        let published = statuses
            .iter()
            .flatten()
            .all(|s| s.members.len() == nodes && s.members.iter().all(|m| !m.addr.is_empty()));
        if statuses.iter().all(|s| s.is_ok()) && published {
            break;
        }
        if Instant::now() > deadline {
            bail!("not every node came up and published its address within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(tc)
}

/// Starts the processes of a test cluster (see [`start`]) without waiting for anything.
async fn launch(
    name: &str,
    net: u8,
    nodes: usize,
    extra: &[&str],
    node_env: Vec<Vec<(String, String)>>,
    tls: bool,
    restore: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<TestCluster> {
    let dir = PathBuf::from(
        std::env::var("RAFTPG_TEST_DIR").unwrap_or_else(|_| "/tmp/raftpg-tests".into()),
    )
    .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let mut spec = LocalClusterSpec::new(nodes, &dir, 0);
    if let Some((backup, certs_from)) = restore {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        for f in std::fs::read_dir(certs_from)?.flatten() {
            std::fs::copy(f.path(), certs.join(f.file_name()))?;
        }
        spec.restore_from = Some(std::path::absolute(backup)?);
    }
    spec.addrs = (1..=nodes)
        .map(|i| format!("127.0.{net}.{}:{}", 10 + i, 17000 + net as u16))
        .collect();
    spec.extra_args = vec!["--pg-shared-buffers".into(), "16MB".into()];
    spec.extra_args.extend(extra.iter().map(|s| s.to_string()));
    spec.node_env = node_env;
    spec.tls = tls;
    let cluster = LocalCluster::start(spec).context("starting cluster")?;
    let client_config = ClientConfig {
        attempt_timeout: Duration::from_secs(15),
        ..cluster.client_config()?
    };
    let certs = cluster.certs();
    let client = Client::with_config(&cluster.addrs(), client_config.clone())?;
    Ok(TestCluster {
        cluster,
        client,
        client_config,
        certs,
        dir,
        net,
    })
}

/// The loopback address of node `id` of the test cluster on `net`.
fn node_addr(net: u8, id: u64) -> String {
    format!("127.0.{net}.{}:{}", 10 + id, 17000 + net as u16)
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.cluster.shutdown();
        if std::thread::panicking() {
            eprintln!(
                "test failed: node logs and data kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Per-table contents of one node's database: row count and md5 of the ordered rows, plus
/// each sequence's position.
pub type Checksums = BTreeMap<String, String>;

impl TestCluster {
    /// The client address node `id` has (or would have) in this cluster.
    pub fn addr_of(&self, id: u64) -> String {
        node_addr(self.net, id)
    }

    /// The peer address node `id` has (or would have) in this cluster (what `add_learner`
    /// takes).
    pub fn peer_addr_of(&self, id: u64) -> String {
        raftpg_client::local_cluster::peer_addr_of(&node_addr(self.net, id))
    }

    /// A client for node `id` only.
    pub fn node_client(&self, id: u64) -> Client {
        Client::with_config(
            &[self.cluster.node(id).addr.clone()],
            self.client_config.clone(),
        )
        .expect("valid address")
    }

    /// The certificates' directory (`None` for [`start_cluster_insecure`]).
    pub fn certs(&self) -> Option<&std::path::Path> {
        self.certs.as_deref()
    }

    /// A channel to node `id` with this cluster's TLS, for raw clients of the generated API.
    pub fn channel(&self, id: u64) -> tonic::transport::Channel {
        raftpg_client::channel(&self.cluster.node(id).addr, self.client_config.tls.as_ref())
            .expect("valid address")
    }

    /// `msg` as a raw gRPC request authenticated as this cluster's client (see
    /// [`TestCluster::client_config`]).
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(c) = &self.client_config.credentials {
            let meta = r.metadata_mut();
            meta.insert(raftpg_proto::USER_METADATA, c.user.parse().expect("ASCII"));
            meta.insert(
                raftpg_proto::PASSWORD_METADATA,
                c.password.parse().expect("ASCII"),
            );
        }
        r
    }

    /// Reads the cluster's client settings again (after its certificates changed) and makes
    /// [`TestCluster::client`] use them.
    pub fn reload_client_config(&mut self) {
        self.client_config = ClientConfig {
            attempt_timeout: self.client_config.attempt_timeout,
            ..self
                .cluster
                .client_config()
                .expect("the cluster's client settings")
        };
        self.client = Client::with_config(&self.cluster.addrs(), self.client_config.clone())
            .expect("valid addresses");
    }

    /// This cluster's client settings (TLS included).
    pub fn client_config(&self) -> ClientConfig {
        self.client_config.clone()
    }

    /// A client of the nodes at `addrs`, with this cluster's settings (TLS included).
    pub fn client_of(&self, addrs: &[String]) -> Client {
        Client::with_config(addrs, self.client_config.clone()).expect("valid addresses")
    }

    /// The administrator's password (made by the cluster; `None` for an `--insecure` one).
    pub fn admin_password(&self) -> Option<String> {
        let certs = self.certs.as_ref()?;
        std::fs::read_to_string(certs.join(raftpg_client::local_cluster::ADMIN_PASSWORD_FILE))
            .ok()
            .map(|p| p.trim().to_string())
    }

    /// A libpq connection string for node `id`'s wire protocol port, as the administrator,
    /// with TLS verified against the cluster CA (the password in `PGPASSWORD`, see
    /// [`TestCluster::libpq_env`]).
    pub fn conninfo(&self, id: u64) -> String {
        let (host, port) = self.cluster.node(id).pg_host_port();
        match &self.certs {
            Some(certs) => format!(
                "host={host} port={port} user={} dbname=raftpg sslmode=verify-full sslrootcert={} connect_timeout=10",
                raftpg_client::local_cluster::ADMIN_USER,
                certs.join("ca.crt").display()
            ),
            None => format!("host={host} port={port} user=raftpg dbname=raftpg connect_timeout=10"),
        }
    }

    /// Environment for libpq programs (psql, pgbench) run against this cluster.
    pub fn libpq_env(&self) -> Vec<(String, String)> {
        let mut env = vec![("PGCONNECT_TIMEOUT".to_string(), "10".to_string())];
        if let Some(p) = self.admin_password() {
            env.push(("PGPASSWORD".into(), p));
        }
        env
    }

    /// A tokio-postgres connection to node `id` through raftpg's wire protocol port, as the
    /// administrator, with TLS verified against the cluster CA.
    pub async fn wire(&self, id: u64) -> anyhow::Result<tokio_postgres::Client> {
        self.wire_as(
            id,
            raftpg_client::local_cluster::ADMIN_USER,
            self.admin_password().as_deref(),
        )
        .await
    }

    /// Like [`TestCluster::wire`], as role `user` with `password`.
    pub async fn wire_as(
        &self,
        id: u64,
        user: &str,
        password: Option<&str>,
    ) -> anyhow::Result<tokio_postgres::Client> {
        let (host, port) = self.cluster.node(id).pg_host_port();
        let ca = self.certs.as_ref().map(|c| c.join("ca.crt"));
        raftpg_client::pg_wire::connect(&host, port, user, password, ca.as_deref()).await
    }

    /// A direct connection to node `id`'s PostgreSQL (as the superuser, bypassing raftpg).
    pub async fn pg(&self, id: u64) -> anyhow::Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.cluster.node(id).pg_socket_dir())
            .port(5432)
            .user("raftpg")
            .dbname("raftpg")
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Checksums of every user table and sequence, read directly from node `id`'s PostgreSQL in
    /// one REPEATABLE READ snapshot, with the applied index of that snapshot.
    pub async fn checksums(&self, id: u64) -> anyhow::Result<(u64, Checksums)> {
        let mut pg = self.pg(id).await?;
        let tx = pg
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let applied: i64 = tx
            .query_one("SELECT log_index FROM raftpg.applied", &[])
            .await?
            .get(0);
        let mut out = Checksums::new();
        let tables = tx
            .query(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
                 WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'raftpg') ORDER BY 1",
                &[],
            )
            .await?;
        for t in tables {
            let name: String = t.get(0);
            let row = tx
                .query_one(
                    &format!("SELECT count(*), coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM {name} x"),
                    &[],
                )
                .await?;
            let (n, sum): (i64, String) = (row.get(0), row.get(1));
            out.insert(name, format!("{n} rows {sum}"));
        }
        let seqs = tx
            .query(
                "SELECT format('%I.%I', schemaname, sequencename), coalesce(last_value, 0) FROM pg_sequences
                 WHERE schemaname <> 'raftpg' ORDER BY 1",
                &[],
            )
            .await?;
        for s in seqs {
            let (name, v): (String, i64) = (s.get(0), s.get(1));
            out.insert(format!("sequence {name}"), v.to_string());
        }
        tx.commit().await?;
        Ok((applied as u64, out))
    }

    /// Waits until the nodes in `ids` have applied the same index, then requires identical
    /// checksums. Returns the checksums.
    pub async fn assert_identical(&self, ids: &[u64]) -> anyhow::Result<Checksums> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut all = Vec::new();
            for id in ids {
                match self.checksums(*id).await {
                    Ok(c) => all.push((*id, c)),
                    Err(e) => {
                        if Instant::now() > deadline {
                            bail!("node {id}: cannot read checksums: {e}");
                        }
                    }
                }
            }
            if all.len() == ids.len() {
                let same_index = all.windows(2).all(|w| w[0].1 .0 == w[1].1 .0);
                let same = all.windows(2).all(|w| w[0].1 .1 == w[1].1 .1);
                if same_index && same {
                    return Ok(all.swap_remove(0).1 .1);
                }
                if same_index && !same {
                    let mut msg = String::from("copies diverge at the same applied index:\n");
                    for (id, (idx, c)) in &all {
                        msg.push_str(&format!("  node {id} (applied {idx}): {c:?}\n"));
                    }
                    bail!(msg);
                }
                if Instant::now() > deadline {
                    let idx: Vec<_> = all.iter().map(|(id, (i, _))| (id, i)).collect();
                    bail!("nodes did not converge to one applied index: {idx:?}");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The current leader (waiting up to 30 s for one) and the lowest-numbered other node.
    pub async fn leader_and_follower(&self) -> (u64, u64) {
        let leader = self
            .client
            .wait_for_leader(Duration::from_secs(30))
            .await
            .expect("a leader within 30 s");
        let nodes = self.cluster.nodes().len() as u64;
        let follower = (1..=nodes)
            .find(|id| *id != leader)
            .expect("a cluster of at least two nodes");
        (leader, follower)
    }

    /// Sorted `k` values of table `table` on node `id`, read directly.
    pub async fn keys(&self, id: u64, table: &str) -> anyhow::Result<Vec<i64>> {
        self.column(id, &format!("SELECT k FROM {table} ORDER BY k"))
            .await
    }

    /// The first column of the rows of `sql`, run directly on node `id`'s PostgreSQL.
    pub async fn column<T>(&self, id: u64, sql: &str) -> anyhow::Result<Vec<T>>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let rows = self.pg(id).await?.query(sql, &[]).await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(Into::into))
            .collect()
    }
}

/// Outcome of a write load.
#[derive(Default, Debug)]
pub struct LoadReport {
    /// Keys whose insert was acknowledged.
    pub acked: Vec<i64>,
    /// Keys whose outcome is unknown (timeout, lost connection).
    pub unknown: Vec<i64>,
    /// Keys refused with a definite error.
    pub failed: Vec<(i64, String)>,
}

/// Runs `workers` concurrent writers inserting unique keys into `table(k bigint primary key,
/// w int, id serial ...)` through clients of `addrs` until `stop` is set.
pub async fn write_load(
    addrs: Vec<String>,
    config: ClientConfig,
    table: &str,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> LoadReport {
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let addrs = addrs.clone();
        let config = config.clone();
        let stop = stop.clone();
        let report = report.clone();
        let sql = format!("INSERT INTO {table} (k, w) VALUES ($1, $2) RETURNING id");
        tasks.push(tokio::spawn(async move {
            let mut rotated = addrs.clone();
            rotated.rotate_left(w % addrs.len());
            let client = Client::with_config(
                &rotated,
                ClientConfig {
                    attempt_timeout: Duration::from_secs(10),
                    attempts_max: 50,
                    ..config
                },
            )
            .expect("valid addresses");
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let k = (w as i64) * 1_000_000 + n;
                n += 1;
                let r = client
                    .execute_one(&sql, vec![values::int(k), values::int(w as i64)])
                    .await;
                let mut rep = report.lock().unwrap();
                match r {
                    Ok(_) => rep.acked.push(k),
                    Err(e) if is_definite(&e) => rep.failed.push((k, e.to_string())),
                    Err(_) => rep.unknown.push(k),
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Arc::try_unwrap(report)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default()
}

/// A write load running in the background (see [`write_load`]).
pub struct LoadRun {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LoadReport>,
    table: String,
}

impl LoadRun {
    /// Starts `workers` writers on `table` through clients of every node of `tc`.
    pub fn start(tc: &TestCluster, table: &str, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (name, flag) = (table.to_string(), stop.clone());
        let (addrs, config) = (tc.cluster.addrs(), tc.client_config());
        let task =
            tokio::spawn(async move { write_load(addrs, config, &name, workers, flag).await });
        LoadRun {
            stop,
            task,
            table: table.to_string(),
        }
    }

    /// Stops the load and requires: progress, identical copies on `nodes` (directly compared),
    /// and every acknowledged write present exactly once on each of them.
    pub async fn finish(self, tc: &TestCluster, nodes: &[u64]) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let report = self.task.await.expect("the load task panicked");
        eprintln!(
            "acked {}, unknown {}, failed {}",
            report.acked.len(),
            report.unknown.len(),
            report.failed.len()
        );
        assert!(
            report.acked.len() > 50,
            "the load made progress: {}",
            report.acked.len()
        );
        tc.assert_identical(nodes).await.expect("identical copies");
        for id in nodes {
            check_load(tc, *id, &self.table, &report)
                .await
                .expect("every acknowledged write present once");
        }
        report
    }
}

/// Whether an error means the write certainly did not happen.
fn is_definite(e: &ClientError) -> bool {
    matches!(
        e.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::ResourceExhausted
    )
}

/// Checks that every acknowledged key is present exactly once on node `id`, and that no key
/// appears that was never attempted.
pub async fn check_load(
    tc: &TestCluster,
    id: u64,
    table: &str,
    report: &LoadReport,
) -> anyhow::Result<()> {
    let keys = tc.keys(id, table).await?;
    let present: std::collections::BTreeSet<i64> = keys.iter().copied().collect();
    if present.len() != keys.len() {
        bail!("node {id}: duplicate keys in {table}");
    }
    let missing: Vec<_> = report
        .acked
        .iter()
        .filter(|k| !present.contains(k))
        .collect();
    if !missing.is_empty() {
        bail!(
            "node {id}: {} acknowledged writes are missing, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
    let attempted: std::collections::BTreeSet<i64> = report
        .acked
        .iter()
        .chain(report.unknown.iter())
        .chain(report.failed.iter().map(|(k, _)| k))
        .copied()
        .collect();
    let phantom: Vec<_> = present.iter().filter(|k| !attempted.contains(k)).collect();
    if !phantom.is_empty() {
        bail!(
            "node {id}: keys that were never written: {:?}",
            &phantom[..phantom.len().min(5)]
        );
    }
    Ok(())
}

/// A standalone PostgreSQL server (not managed by raftpg) in `dir`, listening on a Unix socket
/// only, created with `initdb` options `initdb_args`. Stopped on drop.
pub struct StandalonePostgres {
    dir: PathBuf,
    bin: PathBuf,
}

impl StandalonePostgres {
    /// initdb + start, as the `postgres` OS user when running as root.
    pub fn start(dir: &std::path::Path, initdb_args: &[&str]) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let bin = [
            "/usr/lib/postgresql/15/bin",
            "/usr/lib/postgresql/16/bin",
            "/usr/lib/postgresql/17/bin",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("initdb").is_file())
        .context("no PostgreSQL binaries under /usr/lib/postgresql")?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
        let as_pg = |cmd: &str| -> anyhow::Result<()> {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let status = if root {
                std::process::Command::new("su")
                    .args(["postgres", "-s", "/bin/sh", "-c", cmd])
                    .status()?
            } else {
                std::process::Command::new("sh")
                    .args(["-c", cmd])
                    .status()?
            };
            if !status.success() {
                bail!("{cmd} failed: {status}");
            }
            Ok(())
        };
        let d = dir.display();
        as_pg(&format!(
            "{}/initdb -D {d}/data -U raftpg --auth=trust {} >{d}/initdb.log 2>&1",
            bin.display(),
            initdb_args.join(" ")
        ))?;
        as_pg(&format!(
            "{}/pg_ctl -D {d}/data -l {d}/log -w -o \"-c listen_addresses= -k {d} -c shared_buffers=16MB\" start >/dev/null",
            bin.display()
        ))?;
        as_pg(&format!(
            "{}/psql -h {d} -U raftpg -d postgres -qc 'CREATE DATABASE app' >/dev/null",
            bin.display()
        ))?;
        Ok(StandalonePostgres {
            dir: dir.to_path_buf(),
            bin,
        })
    }

    /// A connection URL for database `app` (socket directory as host).
    pub fn url(&self) -> String {
        format!(
            "postgresql://raftpg@{}/app",
            self.dir.display().to_string().replace('/', "%2F")
        )
    }
}

impl Drop for StandalonePostgres {
    fn drop(&mut self) {
        let d = self.dir.display();
        let cmd = format!(
            "{}/pg_ctl -D {d}/data -m fast stop >/dev/null 2>&1",
            self.bin.display()
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let _ = std::process::Command::new("su")
                .args(["postgres", "-s", "/bin/sh", "-c", &cmd])
                .status();
        } else {
            let _ = std::process::Command::new("sh").args(["-c", &cmd]).status();
        }
    }
}

/// TLS for tokio-postgres verifying servers with the CA in `ca`.
pub fn wire_tls(ca: &std::path::Path) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    raftpg_client::pg_wire::tls(ca)
}

/// The Python 3 interpreter with psycopg 3 (a driver nobody here wrote; `apt install
/// python3-psycopg`, which `scripts/install-deps.sh` does).
pub fn python_with_psycopg() -> &'static str {
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| {
            std::process::Command::new(p)
                .args(["-c", "import psycopg"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("python3 with psycopg 3 (apt install python3-psycopg)")
}

/// A plain HTTP/1.1 GET of `path` at `addr` (the node's operators' port): the status code and
/// the body. Bounded by 5 s.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status line")?;
        anyhow::Ok((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .context("no HTTP answer within 5 s")?
}

/// The value of the Prometheus sample `name` (with its labels as printed, e.g.
/// `raftpg_log_index{position="applied"}`) in a `/metrics` text, if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
