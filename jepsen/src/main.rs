//! raftpg-jepsen: runs workloads of concurrent clients against a real local cluster while a
//! nemesis injects faults, records the histories (Jepsen/Elle JSON lines), heals, checks, and
//! prints one table: workload, nemesis, ops ok / fail / info, anomalies. See jepsen/README.md.
//!
//! Modes: one run (`--workload`, `--nemesis`), the CI battery (`--battery`: every workload
//! against every nemesis family on 3 nodes, then `pg-kill-idle` alone, then the self-test),
//! `--long` (the battery on 5 nodes with longer runs), and `--self-test` alone (nodes started
//! in a deliberately broken mode; the run must find anomalies).

mod bank;
mod common;
mod elle;
mod exactly_once;
mod history;
mod idle;
mod linearizable;
mod list_append;
mod nemesis;
mod register;
mod run;
mod set;
mod sql_mix;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use crate::run::{Row, RunSpec, Workload};

#[derive(Parser, Debug)]
#[command(name = "raftpg-jepsen")]
struct Args {
    /// Workloads run concurrently on one cluster, comma-separated: set, register, list-append,
    /// bank, exactly-once, sql-mix, all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    workload: Vec<String>,
    /// Nemeses, comma-separated: kill, pg-kill, pg-kill-idle, pause, pg-pause,
    /// partition-halves, partition-leader, partition-ring, partition-oneway, loss, clock,
    /// membership; families kill, pause, partition; all; none.
    #[arg(long, value_delimiter = ',', default_value = "kill")]
    nemesis: Vec<String>,
    /// Cluster size (`--battery`: 3, `--long`: 5, unless given).
    #[arg(long)]
    nodes: Option<usize>,
    /// Seconds of load per run (`--battery`: 40, `--long`: 120, unless given).
    #[arg(long)]
    time: Option<u64>,
    /// Client processes per workload.
    #[arg(long, default_value_t = 3)]
    clients: u64,
    /// Seconds between faults (each lasts half of it).
    #[arg(long, default_value_t = 8)]
    interval: u64,
    /// Working directory (cluster data, histories, summaries).
    #[arg(long, default_value = "/tmp/raftpg-jepsen")]
    dir: PathBuf,
    /// Port of every node; node i listens on 127.0.0.(10 + i).
    #[arg(long, default_value_t = 7301)]
    port: u16,
    /// Seed (default: from the clock; printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Every workload against every nemesis family, then pg-kill-idle alone, then the
    /// self-test.
    #[arg(long)]
    battery: bool,
    /// The battery on 5 nodes with 120 s runs.
    #[arg(long)]
    long: bool,
    /// Only the self-test: broken nodes (LINEARIZABLE reads served locally), register and
    /// list-append against partitions; passes only if anomalies are found.
    #[arg(long)]
    self_test: bool,
}

/// The nemesis families of the battery.
const FAMILIES: [&str; 5] = ["kill", "pause", "partition", "clock", "membership"];

/// The battery's run of `pg-kill-idle` alone (after the families): seconds (`--long`: twice
/// as many) and seconds between faults.
const IDLE_RUN_SECONDS: u64 = 30;
const IDLE_RUN_INTERVAL: u64 = 6;

fn print_table(rows: &[(Row, bool)]) {
    println!();
    println!("| workload | nemesis | nodes | s | ops ok | fail | info | anomalies | undecided |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (r, selftest) in rows {
        let o = &r.outcome;
        let expected = if *selftest && o.anomaly_count > 0 {
            " (expected: broken nodes)"
        } else {
            ""
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {}{} | {} |",
            r.workload,
            r.nemesis,
            r.nodes,
            r.seconds,
            o.ok,
            o.fail,
            o.info,
            o.anomaly_count,
            expected,
            o.unknown.len()
        );
    }
}

fn spec(
    args: &Args,
    label: &str,
    nemesis: &[String],
    seed: u64,
    nodes: usize,
    time: u64,
) -> anyhow::Result<RunSpec> {
    Ok(RunSpec {
        label: label.to_string(),
        workloads: Workload::parse(&args.workload)?,
        faults: nemesis::parse(nemesis)?,
        nodes,
        time,
        clients: args.clients,
        interval: args.interval,
        // A comma would end up in PostgreSQL socket paths (which libpq cannot name).
        dir: args.dir.join(label.replace(',', "+")),
        port: args.port,
        broken: false,
        seed,
    })
}

fn self_test_spec(args: &Args, seed: u64, nodes: usize) -> anyhow::Result<RunSpec> {
    let mut s = spec(
        args,
        "self-test",
        &["partition".to_string()],
        seed,
        nodes,
        30,
    )?;
    s.workloads = vec![Workload::Register, Workload::ListAppend];
    s.broken = true;
    Ok(s)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Network rules must not outlive us: remove them on Ctrl-C and on panic too.
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            nemesis::Net::cleanup();
            eprintln!("interrupted; network rules removed");
            std::process::exit(130);
        }
    });
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        nemesis::Net::cleanup();
        hook(info);
    }));

    let seed = args.seed.unwrap_or_else(common::time_seed);
    println!("seed {seed}");
    let battery = args.battery || args.long;
    let nodes = args.nodes.unwrap_or(if args.long { 5 } else { 3 });
    let time = args.time.unwrap_or(if args.long {
        120
    } else if battery {
        40
    } else {
        30
    });
    let mut runs: Vec<(RunSpec, bool)> = Vec::new();
    if battery {
        for (i, family) in FAMILIES.iter().enumerate() {
            let s = spec(
                &args,
                family,
                &[family.to_string()],
                seed.wrapping_add(i as u64),
                nodes,
                time,
            )?;
            runs.push((s, false));
        }
        // The kill family draws pg-kill-idle only now and then: a short run of it alone.
        let mut s = spec(
            &args,
            "pg-kill-idle",
            &["pg-kill-idle".to_string()],
            seed.wrapping_add(FAMILIES.len() as u64),
            nodes,
            if args.long {
                2 * IDLE_RUN_SECONDS
            } else {
                IDLE_RUN_SECONDS
            },
        )?;
        s.interval = IDLE_RUN_INTERVAL;
        // The workloads whose acknowledged writes the idle reads check (sql-mix runs in every
        // family run already; its orphan writes could wedge a cluster before the first kill).
        s.workloads = vec![Workload::Set, Workload::ExactlyOnce];
        runs.push((s, false));
        runs.push((self_test_spec(&args, seed, nodes)?, true));
    } else if args.self_test {
        runs.push((self_test_spec(&args, seed, nodes)?, true));
    } else {
        let label = args.nemesis.join(",");
        runs.push((
            spec(&args, &label, &args.nemesis, seed, nodes, time)?,
            false,
        ));
    }

    let mut table: Vec<(Row, bool)> = Vec::new();
    let mut failed = false;
    for (s, selftest) in &runs {
        eprintln!(
            "== run {}: workloads {:?}, faults {:?}, {} nodes, {} s{}",
            s.label,
            s.workloads.iter().map(|w| w.name()).collect::<Vec<_>>(),
            s.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
            s.nodes,
            s.time,
            if s.broken { " (BROKEN nodes)" } else { "" }
        );
        let started = std::time::Instant::now();
        // A run that cannot finish (e.g. a cluster that never recovers) is a finding too: it
        // is reported as an anomaly of the run and the battery goes on.
        let rows = match run::run(s)
            .await
            .with_context(|| format!("run {}", s.label))
        {
            Ok(rows) => rows,
            Err(e) => vec![Row {
                workload: "run".into(),
                nemesis: s.label.clone(),
                nodes: s.nodes,
                seconds: s.time,
                outcome: common::Outcome::of(&[], vec![format!("the run failed: {e:#}")]),
            }],
        };
        eprintln!("== run {} took {} s", s.label, started.elapsed().as_secs());
        for r in &rows {
            // The self-test's anomalies are expected: a few examples are enough.
            let shown = if *selftest { 3 } else { usize::MAX };
            for a in r.outcome.anomalies.iter().take(shown) {
                println!(
                    "{}ANOMALY [{} / {}] {a}",
                    if *selftest { "expected " } else { "" },
                    r.workload,
                    r.nemesis
                );
            }
            for u in &r.outcome.unknown {
                println!("UNDECIDED [{} / {}] {u}", r.workload, r.nemesis);
            }
        }
        if *selftest {
            let caught: usize = rows
                .iter()
                .filter(|r| r.workload != "run")
                .map(|r| r.outcome.anomaly_count)
                .sum();
            if caught == 0 {
                println!("SELF-TEST FAILED: the broken mode was not caught");
                failed = true;
            } else {
                println!(
                    "self-test passed: the checkers caught the broken mode ({caught} anomalies)"
                );
            }
        } else if rows.iter().any(|r| !r.outcome.anomalies.is_empty()) {
            failed = true;
        }
        let run_rows: Vec<(Row, bool)> = rows.into_iter().map(|r| (r, *selftest)).collect();
        print_table(&run_rows);
        table.extend(run_rows);
    }
    if runs.len() > 1 {
        println!("\n== all runs");
        print_table(&table);
    }
    std::fs::write(
        args.dir.join("table.json"),
        serde_json::to_string_pretty(&table.iter().map(|(r, _)| r).collect::<Vec<_>>())?,
    )?;
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
