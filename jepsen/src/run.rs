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
use raftpg_client::v1::Statement;
use raftpg_client::{Client, LocalCluster, LocalClusterSpec};

use crate::common::{Env, Lcg, Outcome, Quiet};
use crate::history::History;
use crate::idle::{self, Probe};
use crate::nemesis::{self, Clocks, Fault, Nemesis, Net};
use crate::{bank, exactly_once, list_append, register, set, sql_mix};

/// The workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Set,
    Register,
    ListAppend,
    Bank,
    ExactlyOnce,
    SqlMix,
}

impl Workload {
    /// Every workload.
    pub const ALL: [Workload; 6] = [
        Workload::Set,
        Workload::Register,
        Workload::ListAppend,
        Workload::Bank,
        Workload::ExactlyOnce,
        Workload::SqlMix,
    ];

    /// Its name on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Set => "set",
            Workload::Register => "register",
            Workload::ListAppend => "list-append",
            Workload::Bank => "bank",
            Workload::ExactlyOnce => "exactly-once",
            Workload::SqlMix => "sql-mix",
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
            Workload::SqlMix => s(sql_mix::SCHEMA),
        }
    }

    /// What the `pg-kill-idle` nemesis reads back for this workload: acknowledged writes that
    /// must be visible (workloads whose writes are not simply "present or not" have none).
    fn idle_probe(self, history: &Arc<History>) -> Option<Probe> {
        let (sql, acked): (&'static str, fn(&[crate::history::Op]) -> _) = match self {
            Workload::Set => ("SELECT v FROM set_items", set::acked),
            Workload::ExactlyOnce => ("SELECT rid FROM eo_log", exactly_once::acked),
            Workload::SqlMix => ("SELECT k FROM mix_items", sql_mix::acked),
            Workload::Register | Workload::ListAppend | Workload::Bank => return None,
        };
        Some(Probe {
            workload: self.name(),
            sql,
            history: history.clone(),
            acked,
        })
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
    let cluster_config = cluster.client_config()?;
    let admin = Client::with_config(&addrs, cluster_config.clone())?;
    if let Err(e) = admin.wait_for_leader(Duration::from_secs(90)).await {
        cluster.shutdown();
        bail!("no leader: {e}");
    }
    let mut schema: Vec<(&str, Vec<String>)> = spec
        .workloads
        .iter()
        .map(|w| (w.name(), w.schema()))
        .collect();
    if nemesis::needs_idle(&spec.faults) {
        schema.push((
            "pg-kill-idle",
            idle::SCHEMA.iter().map(|s| s.to_string()).collect(),
        ));
    }
    // Each workload's schema is one write, so that no node ever holds half of it: a node that
    // joins during the run replays the log from its start, and a LOCAL read there sees the
    // prefix it has applied so far — a bank table created but not yet filled reads as
    // 0 accounts, which the checker cannot tell from accounts lost after the setup.
    for (name, statements) in schema {
        let write: Vec<Statement> = statements
            .iter()
            .map(|sql| Statement {
                sql: sql.clone(),
                params: vec![],
            })
            .collect();
        admin
            .execute(write)
            .await
            .with_context(|| format!("schema of {name}: {statements:?}"))?;
    }

    // Load and faults.
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = Arc::new(Quiet::default());
    let mut envs = Vec::new();
    let mut tasks = Vec::new();
    for (wi, w) in spec.workloads.iter().enumerate() {
        let env = Env {
            addrs: addrs.clone(),
            client_config: cluster_config.clone(),
            history: Arc::new(History::default()),
            stop: stop.clone(),
            clients: spec.clients,
            seed: spec.seed.wrapping_add(wi as u64 * 1_000_003),
            quiet: quiet.clone(),
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
                Workload::SqlMix => tokio::spawn(sql_mix::client(env, slot, shared)),
            });
        }
        envs.push((*w, env));
    }
    let nemesis_history = Arc::new(History::default());
    let idle_history = Arc::new(History::default());
    let nem = Nemesis {
        cluster,
        admin: Client::with_config(&addrs, cluster_config.clone())?,
        net,
        clocks,
        faults: spec.faults.clone(),
        interval: spec.interval,
        history: nemesis_history.clone(),
        rng: Lcg::new(spec.seed),
        quiet,
        probes: envs
            .iter()
            .filter_map(|(w, env)| w.idle_probe(&env.history))
            .collect(),
        idle_history: idle_history.clone(),
        idle_rounds: 0,
        idle_acked: Default::default(),
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
    // A write after healing: every final read waits for it. A cluster that takes no write
    // within two minutes did not recover — a finding in itself: the histories are still
    // checked as far as they can be without the final copies.
    // Short calls, so that the loop below looks at the cluster often.
    let marker_client = Client::with_config(
        &addrs,
        raftpg_client::ClientConfig {
            attempts_max: 3,
            tls: cluster_config.tls.clone(),
            credentials: cluster_config.credentials.clone(),
            ..crate::common::client_config()
        },
    )?;
    let marker_started = Instant::now();
    let marker = {
        let deadline = Instant::now() + Duration::from_secs(120);
        // A cluster where no node applies anything for this long is stuck, not recovering
        // (recovery moves some node's applied index: replays, snapshot installs, catch-up).
        let stuck_after = Duration::from_secs(30);
        let mut progress = (0u64, Instant::now());
        loop {
            match marker_client.execute_one("SELECT 1", vec![]).await {
                Ok(r) => break Ok(r.log_index),
                Err(e) => {
                    let applied = admin
                        .status_all()
                        .await
                        .into_iter()
                        .flatten()
                        .map(|s| s.applied_index)
                        .sum::<u64>();
                    if applied != progress.0 {
                        progress = (applied, Instant::now());
                    }
                    if Instant::now() > deadline || progress.1.elapsed() > stuck_after {
                        break Err(e);
                    }
                    eprintln!("marker write failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    };
    let mut rows = Vec::new();
    let row = |workload: &str, outcome: Outcome| Row {
        workload: workload.into(),
        nemesis: spec.label.clone(),
        nodes: spec.nodes,
        seconds: spec.time,
        outcome,
    };
    let marker = match marker {
        Ok(m) => Some(m),
        Err(e) => {
            let mut why = format!(
                "the cluster did not recover after healing: no write succeeded (given up after {} s; no node applied anything for 30 s, or 120 s passed; last error: {e}); node status:",
                marker_started.elapsed().as_secs()
            );
            for (i, st) in admin.status_all().await.into_iter().enumerate() {
                why.push_str(&match st {
                    Ok(s) => format!(
                        " node {}: {} (term {}), committed {}, applied {}, PostgreSQL up {}, applier {:?};",
                        s.node_id,
                        s.role,
                        s.term,
                        s.committed_index,
                        s.applied_index,
                        s.postgres_up,
                        s.applier_state
                    ),
                    Err(e) => format!(" node {}: no status ({e});", i + 1),
                });
            }
            eprintln!("{why}");
            rows.push(row("cluster", Outcome::of(&[], vec![why])));
            None
        }
    };

    // Checks.
    for (w, env) in &envs {
        let outcome = match (w, marker) {
            (Workload::Register, _) => register::check_run(env),
            (Workload::ListAppend, _) => list_append::check_run(env),
            (Workload::Set, Some(m)) => set::check_run(env, &admin, m).await?,
            (Workload::Bank, Some(m)) => bank::check_run(env, &admin, m).await?,
            (Workload::ExactlyOnce, Some(m)) => exactly_once::check_run(env, &admin, m).await?,
            (Workload::SqlMix, Some(m)) => sql_mix::check_run(env, &admin, m).await?,
            // No final copies to read: what the history alone shows.
            (Workload::Bank, None) => {
                let ops = env.history.ops();
                Outcome::of(&ops, bank::check(&ops))
            }
            (Workload::SqlMix, None) => {
                let ops = env.history.ops();
                Outcome::of(&ops, sql_mix::check(&ops, &Default::default()))
            }
            (Workload::Set | Workload::ExactlyOnce, None) => {
                Outcome::of(&env.history.ops(), vec![])
            }
        };
        std::fs::write(
            spec.dir.join(format!("history-{}.jsonl", w.name())),
            env.history.to_jsonl(),
        )?;
        rows.push(row(w.name(), outcome));
    }
    std::fs::write(spec.dir.join("nemesis.jsonl"), nemesis_history.to_jsonl())?;
    if nemesis::needs_idle(&spec.faults) {
        std::fs::write(
            spec.dir.join("history-idle-read.jsonl"),
            idle_history.to_jsonl(),
        )?;
        let ops = idle_history.ops();
        rows.push(row("idle-read", Outcome::of(&ops, idle::check(&ops))));
    }
    // A node that has not caught up yet is reported missing, not different, and a check can
    // time out: ask again (three times) before calling that an anomaly. A difference between
    // copies is an anomaly at once.
    let mut check = Outcome::default();
    for attempt in 1..=3 {
        if marker.is_none() {
            // The check is a log entry too: it would only time out.
            break;
        }
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
    if marker.is_some() {
        rows.push(row("raftpg-check", check));
    }
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
