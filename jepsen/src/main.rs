//! raftpg-jepsen: runs a workload of concurrent clients against a real local cluster while a
//! nemesis injects faults, records the history (Jepsen/Elle JSON lines), heals, reads the final
//! state of every node and checks it.
//!
//! In progress (issue 6): the *set* workload with the `kill`, `pause` and `pg-kill` nemeses.
//! Partitions (iptables on loopback addresses), clock skew, the register / list-append / bank
//! workloads and their checkers come next; see jepsen/README.md.

mod elle;
mod history;
mod linearizable;
mod set;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use raftpg_client::v1::{Consistency, QueryRequest};
use raftpg_client::{values, Client, ClientConfig, LocalCluster, LocalClusterSpec};
use tonic::Code;

use crate::history::History;

/// Process id used for nemesis events in the history.
const NEMESIS: u64 = u64::MAX;

#[derive(Parser, Debug)]
#[command(name = "raftpg-jepsen")]
struct Args {
    /// Workload: set.
    #[arg(long, default_value = "set")]
    workload: String,
    /// Nemeses, comma-separated: kill, pause, pg-kill, none.
    #[arg(long, value_delimiter = ',', default_value = "kill")]
    nemesis: Vec<String>,
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    time: u64,
    /// Concurrent client processes.
    #[arg(long, default_value_t = 5)]
    clients: u64,
    /// Seconds between faults (each lasts half of it).
    #[arg(long, default_value_t = 6)]
    interval: u64,
    /// Working directory (cluster data, history.jsonl, summary.json).
    #[arg(long, default_value = "/tmp/raftpg-jepsen")]
    dir: PathBuf,
    /// Port of every node; node i listens on 127.0.0.(10 + i).
    #[arg(long, default_value_t = 7301)]
    port: u16,
}

/// A small deterministic pseudo-random sequence (for fault targets).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn definite_failure(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::Unimplemented
    )
}

async fn run_clients(
    addrs: Vec<String>,
    clients: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut tasks = Vec::new();
    for slot in 0..clients {
        let (addrs, history, stop) = (addrs.clone(), history.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut process = slot;
            let mut n: i64 = 0;
            let config = ClientConfig {
                attempt_timeout: Duration::from_secs(5),
                attempts_max: 5,
                ..Default::default()
            };
            let mut client = Client::with_config(&addrs, config.clone()).expect("valid addresses");
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let v = (process as i64) * 1_000_000_000 + n;
                history.push("invoke", process, "add", v.into());
                match client
                    .execute_one(
                        "INSERT INTO set_items (v) VALUES ($1)",
                        vec![values::int(v)],
                    )
                    .await
                {
                    Ok(_) => history.push("ok", process, "add", v.into()),
                    Err(e) if definite_failure(e.code()) => {
                        history.push("fail", process, "add", v.into())
                    }
                    Err(_) => {
                        // Unknown outcome: record it and retire the process, as Jepsen does.
                        history.push("info", process, "add", v.into());
                        process += clients;
                        client =
                            Client::with_config(&addrs, config.clone()).expect("valid addresses");
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Injects faults until `stop`, then heals; returns the cluster.
async fn run_nemesis(
    mut cluster: LocalCluster,
    kinds: Vec<String>,
    interval: u64,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) -> LocalCluster {
    let kinds: Vec<String> = kinds.into_iter().filter(|k| k != "none").collect();
    if kinds.is_empty() {
        return cluster;
    }
    let mut rng = Lcg(Instant::now().elapsed().as_nanos() as u64 ^ 0x9e3779b97f4a7c15);
    let nodes = cluster.nodes().len() as u64;
    let half = Duration::from_secs(interval.max(2) / 2);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(half).await;
        let kind = kinds[rng.next(kinds.len() as u64) as usize].clone();
        let node = rng.next(nodes) + 1;
        history.push("info", NEMESIS, &format!("start-{kind}"), node.into());
        match kind.as_str() {
            "kill" => cluster.kill_node(node),
            "pause" => {
                cluster.signal_node(node, libc::SIGSTOP);
            }
            "pg-kill" => {
                cluster.kill_postgres(node);
            }
            _ => {}
        }
        tokio::time::sleep(half).await;
        match kind.as_str() {
            "kill" => {
                let _ = cluster.start_node(node);
            }
            "pause" => {
                cluster.signal_node(node, libc::SIGCONT);
            }
            _ => {}
        }
        history.push("info", NEMESIS, &format!("stop-{kind}"), node.into());
    }
    cluster
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.workload != "set" {
        bail!("workload {:?} is not built yet (set is)", args.workload);
    }
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("cleaning {}", args.dir.display()))?;
    }
    let mut spec = LocalClusterSpec::new(args.nodes, args.dir.join("cluster"), args.port);
    spec.addrs = (1..=args.nodes)
        .map(|i| format!("127.0.0.{}:{}", 10 + i, args.port))
        .collect();
    spec.extra_args = vec!["--pg-shared-buffers".into(), "32MB".into()];
    let cluster = LocalCluster::start(spec)?;
    let addrs = cluster.addrs();
    let admin = Client::new(&addrs)?;
    admin.wait_for_leader(Duration::from_secs(90)).await?;
    admin
        .execute_one("CREATE TABLE set_items (v bigint PRIMARY KEY)", vec![])
        .await?;

    let history = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = tokio::spawn(run_clients(
        addrs.clone(),
        args.clients,
        history.clone(),
        stop.clone(),
    ));
    let nemesis = tokio::spawn(run_nemesis(
        cluster,
        args.nemesis.clone(),
        args.interval,
        history.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(args.time)).await;
    stop.store(true, Ordering::Relaxed);
    clients.await?;
    let mut cluster = nemesis.await?;

    // Heal: every node running, none paused.
    for n in 1..=args.nodes as u64 {
        cluster.signal_node(n, libc::SIGCONT);
        if cluster.node(n).pid().is_none() {
            cluster.start_node(n)?;
        }
    }
    admin.wait_for_leader(Duration::from_secs(120)).await?;
    let marker = admin.execute_one("SELECT 1", vec![]).await?.log_index;

    // Final reads of every node's own copy.
    let mut finals: BTreeMap<u64, BTreeSet<i64>> = BTreeMap::new();
    for (i, _) in addrs.iter().enumerate() {
        let req = QueryRequest {
            sql: "SELECT v FROM set_items".into(),
            consistency: Consistency::AtLeast as i32,
            min_index: marker,
            timeout_ms: 60_000,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let rows = loop {
            match admin.query_stream_node(i, req.clone()).await {
                Ok((_, rows, _)) => break rows,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("node {}: final read failed ({e}); retrying", i + 1);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        finals.insert(
            i as u64 + 1,
            rows.iter()
                .filter_map(|r| values::as_i64(&r.values[0]))
                .collect(),
        );
    }
    let ops = history.ops();
    let mut result = set::check(&ops, &finals);
    let diverge = admin.check(Duration::from_secs(120)).await?;
    if !diverge.identical {
        result.anomalies.push(format!(
            "raftpg check: {:?} missing {:?}",
            diverge.differences, diverge.missing_nodes
        ));
    }
    std::fs::write(args.dir.join("history.jsonl"), history.to_jsonl())?;
    let summary = serde_json::json!({
        "workload": args.workload,
        "nemesis": args.nemesis.join(","),
        "nodes": args.nodes,
        "seconds": args.time,
        "ok": result.ok,
        "fail": result.fail,
        "info": result.info,
        "anomalies": result.anomalies,
    });
    std::fs::write(
        args.dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!("| workload | nemesis | nodes | ops ok | fail | info | anomalies |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} |",
        args.workload,
        args.nemesis.join(","),
        args.nodes,
        result.ok,
        result.fail,
        result.info,
        result.anomalies.len()
    );
    for a in &result.anomalies {
        println!("ANOMALY {a}");
    }
    drop(cluster);
    if !result.anomalies.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
