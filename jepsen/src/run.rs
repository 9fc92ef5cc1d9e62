//! One run: start a cluster of real node processes on loopback addresses, create the
//! workloads' tables, run every workload's clients concurrently while the nemesis injects
//! faults, heal, wait for recovery, check each workload's history (and final per-node state),
//! run `raftpg check` for divergence, and write the histories and a summary.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use raftpg_client::{Client, LocalCluster, LocalClusterSpec};

use crate::common::{Env, Lcg, Outcome};
use crate::history::History;
use crate::nemesis::{self, Clocks, Fault, Nemesis, Net};
use crate::{bank, exactly_once, list_append, register, set};

/// The workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Set,
    Register,
    ListAppend,
    Bank,
    ExactlyOnce,
}

impl Workload {
    /// Every workload.
    pub const ALL: [Workload; 5] = [
        Workload::Set,
        Workload::Register,
        Workload::ListAppend,
        Workload::Bank,
        Workload::ExactlyOnce,
    ];

    /// Its name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Set => "set",
            Workload::Register => "register",
            Workload::ListAppend => "list-append",
            Workload::Bank => "bank",
            Workload::ExactlyOnce => "exactly-once",
        }
    }

    /// Parses names (`all` for every workload).
    pub fn parse(names: &[String]) -> anyhow::Result<Vec<Workload>> {
        let mut out = Vec::new();
        for n in names {
            if n == "all" {
                return Ok(Workload::ALL.to_vec());
            }
            match Workload::ALL.iter().find(|w| w.name() == n) {
                Some(w) if !out.contains(w) => out.push(*w),
                Some(_) => {}
                None => bail!("unknown workload {n:?}"),
            }
        }
        Ok(out)
    }

    fn schema(self) -> Vec<String> {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        match self {
            Workload::Set => s(set::SCHEMA),
            Workload::Register => s(register::SCHEMA),
            Workload::ListAppend => s(list_append::SCHEMA),
            Workload::Bank => bank::schema(),
            Workload::ExactlyOnce => s(exactly_once::SCHEMA),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// Label of the nemesis in the table (e.g. the family name).
    pub label: String,
    pub workloads: Vec<Workload>,
    pub faults: Vec<Fault>,
    pub nodes: usize,
    /// Seconds of load.
    pub time: u64,
    /// Client processes per workload.
    pub clients: u64,
    /// Seconds between faults.
    pub interval: u64,
    pub dir: PathBuf,
    pub port: u16,
    /// Start the nodes in the deliberately broken mode (self-test).
    pub broken: bool,
    pub seed: u64,
}

/// One row of the result table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub workload: String,
    pub nemesis: String,
    pub nodes: usize,
    pub seconds: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Node `i`'s loopback address.
pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 10 + i as u8])
}

/// Runs one battery entry; returns one row per workload plus one for `raftpg check`.
pub async fn run(spec: &RunSpec) -> anyhow::Result<Vec<Row>> {
    let started = Instant::now();
    if spec.dir.exists() {
        std::fs::remove_dir_all(&spec.dir)
            .with_context(|| format!("cleaning {}", spec.dir.display()))?;
    }
    std::fs::create_dir_all(&spec.dir)?;
    let mut cspec = LocalClusterSpec::new(spec.nodes, spec.dir.join("cluster"), spec.port);
    cspec.addrs = (1..=spec.nodes)
        .map(|i| format!("{}:{}", node_ip(i), spec.port))
        .collect();
    cspec.extra_args = [
        "--pg-shared-buffers",
        "32MB",
        // Snapshots and log compaction happen during the run too.
        "--snapshot-every-entries",
        "2000",
        "--snapshot-keep-entries",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if spec.broken {
        cspec
            .extra_args
            .push("--unsafe-local-linearizable-reads".into());
    }
    let net = if nemesis::needs_network(&spec.faults) {
        Some(Net::new((1..=spec.nodes).map(node_ip).collect())?)
    } else {
        None
    };
    let (clocks, clock_envs) = if nemesis::needs_clock(&spec.faults) {
        let (c, envs) = Clocks::new(&spec.dir.join("clocks"), spec.nodes)?;
        (Some(c), envs)
    } else {
        (None, Vec::new())
    };
    cspec.node_env = clock_envs;
    let mut cluster = LocalCluster::start(cspec)?;
    let addrs = cluster.addrs();
    let admin = Client::new(&addrs)?;
    if let Err(e) = admin.wait_for_leader(Duration::from_secs(90)).await {
        cluster.shutdown();
        bail!("no leader: {e}");
    }
    for w in &spec.workloads {
        for sql in w.schema() {
            admin
                .execute_one(&sql, vec![])
                .await
                .with_context(|| format!("schema of {}", w.name()))?;
        }
    }

    // Load and faults.
    let stop = Arc::new(AtomicBool::new(false));
    let mut envs = Vec::new();
    let mut tasks = Vec::new();
    for (wi, w) in spec.workloads.iter().enumerate() {
        let env = Env {
            addrs: addrs.clone(),
            history: Arc::new(History::default()),
            stop: stop.clone(),
            clients: spec.clients,
            seed: spec.seed.wrapping_add(wi as u64 * 1_000_003),
        };
        let shared = Arc::new(AtomicU64::new(0));
        for slot in 0..spec.clients {
            let env = env.clone();
            let shared = shared.clone();
            tasks.push(match w {
                Workload::Set => tokio::spawn(set::client(env, slot)),
                Workload::Register => tokio::spawn(register::client(env, slot, shared)),
                Workload::ListAppend => tokio::spawn(list_append::client(env, slot, shared)),
                Workload::Bank => tokio::spawn(bank::client(env, slot)),
                Workload::ExactlyOnce => tokio::spawn(exactly_once::client(env, slot)),
            });
        }
        envs.push((*w, env));
    }
    let nemesis_history = Arc::new(History::default());
    let nem = Nemesis {
        cluster,
        admin: Client::new(&addrs)?,
        net,
        clocks,
        faults: spec.faults.clone(),
        interval: spec.interval,
        history: nemesis_history.clone(),
        rng: Lcg::new(spec.seed),
    };
    let nem_task = tokio::spawn(nem.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(spec.time)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut nem = nem_task.await.context("nemesis task")??;
    nem.heal_all().await.context("healing")?;
    admin
        .wait_for_leader(Duration::from_secs(120))
        .await
        .context("no leader after healing")?;
    let marker = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match admin.execute_one("SELECT 1", vec![]).await {
                Ok(r) => break r.log_index,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("marker write failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => bail!("cluster did not recover: {e}"),
            }
        }
    };

    // Checks.
    let mut rows = Vec::new();
    for (w, env) in &envs {
        let outcome = match w {
            Workload::Set => set::check_run(env, &admin, marker).await?,
            Workload::Register => register::check_run(env),
            Workload::ListAppend => list_append::check_run(env),
            Workload::Bank => bank::check_run(env, &admin, marker).await?,
            Workload::ExactlyOnce => exactly_once::check_run(env, &admin, marker).await?,
        };
        std::fs::write(
            spec.dir.join(format!("history-{}.jsonl", w.name())),
            env.history.to_jsonl(),
        )?;
        rows.push(Row {
            workload: w.name().into(),
            nemesis: spec.label.clone(),
            nodes: spec.nodes,
            seconds: spec.time,
            outcome,
        });
    }
    std::fs::write(spec.dir.join("nemesis.jsonl"), nemesis_history.to_jsonl())?;
    // A node that has not caught up yet is reported missing, not different, and a check can
    // time out: ask again (three times) before calling that an anomaly. A difference between
    // copies is an anomaly at once.
    let mut check = Outcome::default();
    for attempt in 1..=3 {
        check = match admin.check(Duration::from_secs(120)).await {
            Ok(c) if c.identical => Outcome {
                ok: 1,
                ..Default::default()
            },
            Ok(c) => Outcome::of(
                &[],
                vec![format!(
                    "raftpg check: copies differ: {:?}, missing nodes {:?}",
                    c.differences, c.missing_nodes
                )],
            ),
            Err(e) => Outcome::of(&[], vec![format!("raftpg check failed: {e}")]),
        };
        let differs = check
            .anomalies
            .iter()
            .any(|a| a.contains("copies differ") && !a.contains("differ: []"));
        if check.anomalies.is_empty() || differs || attempt == 3 {
            break;
        }
        eprintln!(
            "raftpg check attempt {attempt}: {:?}; asking again",
            check.anomalies
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    rows.push(Row {
        workload: "raftpg-check".into(),
        nemesis: spec.label.clone(),
        nodes: spec.nodes,
        seconds: spec.time,
        outcome: check,
    });
    nem.cluster.shutdown();
    drop(nem);
    std::fs::write(
        spec.dir.join("summary.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "label": spec.label,
            "faults": spec.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
            "seed": spec.seed,
            "wall_seconds": started.elapsed().as_secs(),
            "rows": rows,
        }))?,
    )?;
    Ok(rows)
}
