//! Nemeses: the faults injected during a run, and the healing after each one.
//!
//! - `kill` (SIGKILL a node process, restart it), `pg-kill` (SIGKILL a node's postmaster; the
//!   node restarts it), `pg-kill-idle` (the workloads are held still, the nemesis writes a few
//!   rows, SIGKILLs one node's postmaster and at once reads every acknowledged write back at
//!   `LINEARIZABLE` from that node; see [`crate::idle`]);
//! - `pause` / `pg-pause` (SIGSTOP, later SIGCONT, of a node process or of its whole
//!   PostgreSQL);
//! - `partition-halves`, `partition-leader` (the leader alone), `partition-ring` (every node
//!   sees only its neighbours: each has a majority view but no two agree; with 3 nodes a
//!   "bridge": one node sees both others, which do not see each other), `partition-oneway`
//!   (packets from one node to the others are dropped, not the reverse), `loss` (20% of the
//!   packets between nodes dropped) — iptables DROP rules between the nodes' loopback
//!   addresses in a chain of our own ([`Net`]), removed on heal, on exit, on panic and on
//!   Ctrl-C;
//! - `clock`: a node's wall clock jumps by up to ±120 s (libfaketime, preloaded into every
//!   node of the run, reads its offset from a file once a second; the monotonic clock is left
//!   alone);
//! - `membership`: a node is removed from the cluster, wiped, started empty, added back as a
//!   learner (snapshot install) and promoted.
//!
//! Families for `--nemesis`: `kill` = kill + pg-kill + pg-kill-idle, `pause` = pause + pg-pause,
//! `partition` = the four partitions + loss, `clock`, `membership`, `all`, `none`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use raftpg_client::v1::{Consistency, QueryRequest};
use raftpg_client::{values, Client, LocalCluster};

use crate::common::{Lcg, Quiet};
use crate::history::History;
use crate::idle::{self, Probe};

/// Process id of nemesis events in histories.
pub const NEMESIS: u64 = u64::MAX;

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Kill,
    PgKill,
    PgKillIdle,
    Pause,
    PgPause,
    PartitionHalves,
    PartitionLeader,
    PartitionRing,
    PartitionOneWay,
    Loss,
    Clock,
    Membership,
}

impl Fault {
    /// Its name in histories and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::PgKill => "pg-kill",
            Fault::PgKillIdle => "pg-kill-idle",
            Fault::Pause => "pause",
            Fault::PgPause => "pg-pause",
            Fault::PartitionHalves => "partition-halves",
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionRing => "partition-ring",
            Fault::PartitionOneWay => "partition-oneway",
            Fault::Loss => "loss",
            Fault::Clock => "clock",
            Fault::Membership => "membership",
        }
    }

    fn is_network(self) -> bool {
        matches!(
            self,
            Fault::PartitionHalves
                | Fault::PartitionLeader
                | Fault::PartitionRing
                | Fault::PartitionOneWay
                | Fault::Loss
        )
    }
}

const ALL: [Fault; 12] = [
    Fault::Kill,
    Fault::PgKill,
    Fault::PgKillIdle,
    Fault::Pause,
    Fault::PgPause,
    Fault::PartitionHalves,
    Fault::PartitionLeader,
    Fault::PartitionRing,
    Fault::PartitionOneWay,
    Fault::Loss,
    Fault::Clock,
    Fault::Membership,
];

/// Expands nemesis names and families into faults.
pub fn parse(names: &[String]) -> anyhow::Result<Vec<Fault>> {
    let mut out = Vec::new();
    for name in names {
        let add: Vec<Fault> = match name.as_str() {
            "none" | "" => vec![],
            "all" => ALL.to_vec(),
            "kill" => vec![Fault::Kill, Fault::PgKill, Fault::PgKillIdle],
            "pause" => vec![Fault::Pause, Fault::PgPause],
            "partition" => vec![
                Fault::PartitionHalves,
                Fault::PartitionLeader,
                Fault::PartitionRing,
                Fault::PartitionOneWay,
                Fault::Loss,
            ],
            other => match ALL.iter().find(|f| f.name() == other) {
                Some(f) => vec![*f],
                None => bail!("unknown nemesis {other:?}"),
            },
        };
        for f in add {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// Whether any fault needs iptables.
pub fn needs_network(faults: &[Fault]) -> bool {
    faults.iter().any(|f| f.is_network())
}

/// Whether any fault reads back acknowledged writes on an idle cluster (it needs its table).
pub fn needs_idle(faults: &[Fault]) -> bool {
    faults.contains(&Fault::PgKillIdle)
}

/// Whether any fault needs libfaketime.
pub fn needs_clock(faults: &[Fault]) -> bool {
    faults.contains(&Fault::Clock)
}

// ------------------------------------------------------------------------------- network

/// The iptables chain holding our rules; jumped to from INPUT while a [`Net`] lives.
const CHAIN: &str = "RAFTPG_JEPSEN";

fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .context("running iptables (install it: apt-get install iptables)")?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Owns the iptables rules of a run. Rules only ever name the nodes' loopback addresses.
pub struct Net {
    ips: Vec<IpAddr>,
}

impl Net {
    /// Installs the (empty) chain, removing leftovers of an earlier run first.
    pub fn new(ips: Vec<IpAddr>) -> anyhow::Result<Net> {
        if let Some(ip) = ips.iter().find(|ip| !ip.is_loopback()) {
            bail!("refusing to inject network faults on non-loopback address {ip}");
        }
        Net::cleanup();
        iptables(&["-N", CHAIN])?;
        iptables(&["-I", "INPUT", "-j", CHAIN])?;
        Ok(Net { ips })
    }

    /// Removes our chain and the jump to it (idempotent; safe in signal and panic paths).
    pub fn cleanup() {
        while iptables(&["-D", "INPUT", "-j", CHAIN]).is_ok() {}
        let _ = iptables(&["-F", CHAIN]);
        let _ = iptables(&["-X", CHAIN]);
    }

    fn ip(&self, node: u64) -> String {
        self.ips[(node - 1) as usize].to_string()
    }

    /// Drops packets from `a` to `b`.
    fn drop_one_way(&self, a: u64, b: u64) -> anyhow::Result<()> {
        iptables(&[
            "-A",
            CHAIN,
            "-s",
            &self.ip(a),
            "-d",
            &self.ip(b),
            "-j",
            "DROP",
        ])
    }

    /// Cuts `a` and `b` apart.
    fn cut(&self, a: u64, b: u64) -> anyhow::Result<()> {
        self.drop_one_way(a, b)?;
        self.drop_one_way(b, a)
    }

    /// Cuts every node of `side` from every node not in it.
    fn split(&self, side: &[u64]) -> anyhow::Result<()> {
        for a in side {
            for b in 1..=self.ips.len() as u64 {
                if !side.contains(&b) {
                    self.cut(*a, b)?;
                }
            }
        }
        Ok(())
    }

    /// Drops `percent`% of the packets between any two nodes.
    fn loss(&self, percent: u32) -> anyhow::Result<()> {
        let p = format!("{:.2}", percent as f64 / 100.0);
        for a in 1..=self.ips.len() as u64 {
            for b in 1..=self.ips.len() as u64 {
                if a != b {
                    let (sa, sb) = (self.ip(a), self.ip(b));
                    iptables(&[
                        "-A",
                        CHAIN,
                        "-s",
                        &sa,
                        "-d",
                        &sb,
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DROP",
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Removes every rule (the chain stays until drop).
    pub fn heal(&self) -> anyhow::Result<()> {
        iptables(&["-F", CHAIN])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        Net::cleanup();
    }
}

// --------------------------------------------------------------------------------- clock

/// libfaketime as Debian installs it.
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Environment variables of each node (node `i` gets entry `i - 1`).
pub type NodeEnvs = Vec<Vec<(String, String)>>;

/// Per-node clock offsets through libfaketime offset files.
pub struct Clocks {
    dir: PathBuf,
}

impl Clocks {
    /// Creates one offset file per node (offset 0) and returns the environment each node must
    /// start with.
    pub fn new(dir: &Path, nodes: usize) -> anyhow::Result<(Clocks, NodeEnvs)> {
        if !Path::new(FAKETIME_LIB).exists() {
            bail!("{FAKETIME_LIB} is missing (install it: apt-get install faketime)");
        }
        std::fs::create_dir_all(dir)?;
        let clocks = Clocks {
            dir: dir.to_path_buf(),
        };
        let mut envs = Vec::new();
        for n in 1..=nodes as u64 {
            clocks.set(n, 0)?;
            envs.push(vec![
                ("LD_PRELOAD".into(), FAKETIME_LIB.into()),
                (
                    "FAKETIME_TIMESTAMP_FILE".into(),
                    clocks.file(n).display().to_string(),
                ),
                ("FAKETIME_CACHE_DURATION".into(), "1".into()),
                // Faking the monotonic clock hangs tokio; only the wall clock moves.
                ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ]);
        }
        Ok((clocks, envs))
    }

    fn file(&self, node: u64) -> PathBuf {
        self.dir.join(format!("node{node}.offset"))
    }

    /// Sets node `node`'s wall-clock offset in seconds.
    pub fn set(&self, node: u64, seconds: i64) -> anyhow::Result<()> {
        let path = self.file(node);
        std::fs::write(&path, format!("{seconds:+}s\n"))?;
        // PostgreSQL (another OS user, same environment) reads it too.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------- the nemesis

/// What the nemesis acts on.
pub struct Nemesis {
    /// The cluster's processes.
    pub cluster: LocalCluster,
    /// An admin client over every node.
    pub admin: Client,
    /// Network rules, if a network fault is in use.
    pub net: Option<Net>,
    /// Clock offsets, if the clock fault is in use.
    pub clocks: Option<Clocks>,
    /// The faults to draw from.
    pub faults: Vec<Fault>,
    /// Seconds between faults; each lasts half of it.
    pub interval: u64,
    /// Nemesis events go here (process [`NEMESIS`]).
    pub history: Arc<History>,
    /// Draws fault kinds and targets.
    pub rng: Lcg,
    /// Holds every workload of the run still (`pg-kill-idle`).
    pub quiet: Arc<Quiet>,
    /// What `pg-kill-idle` reads back after a kill.
    pub probes: Vec<Probe>,
    /// `pg-kill-idle`'s reads.
    pub idle_history: Arc<History>,
    /// Rows of `jepsen_idle` written so far, and those acknowledged.
    pub idle_rounds: i64,
    pub idle_acked: BTreeSet<String>,
}

/// A fault in force and what healing it needs.
struct Active {
    fault: Fault,
    nodes: Vec<u64>,
}

impl Nemesis {
    fn nodes(&self) -> u64 {
        self.cluster.nodes().len() as u64
    }

    fn random_node(&mut self) -> u64 {
        let n = self.nodes();
        self.rng.next(n) + 1
    }

    async fn leader(&self) -> Option<u64> {
        self.admin
            .wait_for_leader(Duration::from_secs(3))
            .await
            .ok()
    }

    /// Injects faults until `stop`, healing each before the next.
    pub async fn run(mut self, stop: Arc<AtomicBool>) -> anyhow::Result<Self> {
        let half = Duration::from_millis(self.interval.max(2) * 500);
        while !self.faults.is_empty() && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(half).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let fault = self.faults[self.rng.next(self.faults.len() as u64) as usize];
            let active = self.start(fault).await?;
            self.history.push(
                "info",
                NEMESIS,
                &format!("start-{}", fault.name()),
                serde_json::json!(active.nodes),
            );
            tokio::time::sleep(half).await;
            self.stop_fault(&active).await?;
            self.history.push(
                "info",
                NEMESIS,
                &format!("stop-{}", fault.name()),
                serde_json::json!(active.nodes),
            );
        }
        Ok(self)
    }

    async fn start(&mut self, fault: Fault) -> anyhow::Result<Active> {
        let n = self.nodes();
        let mut nodes = Vec::new();
        match fault {
            Fault::Kill => {
                let v = self.random_node();
                self.cluster.kill_node(v);
                nodes.push(v);
            }
            Fault::PgKill => {
                let v = self.random_node();
                self.cluster.kill_postgres(v);
                nodes.push(v);
            }
            Fault::Pause => {
                let v = self.random_node();
                self.cluster.signal_node(v, libc::SIGSTOP);
                nodes.push(v);
            }
            Fault::PgKillIdle => {
                let v = self.random_node();
                let idle = self.quiet.hold(Duration::from_secs(20)).await;
                let r = self.kill_idle(v, idle).await;
                self.quiet.release();
                if r? {
                    nodes.push(v);
                }
            }
            Fault::PgPause => {
                let v = self.random_node();
                self.cluster.signal_postgres(v, libc::SIGSTOP);
                nodes.push(v);
            }
            Fault::PartitionHalves => {
                let mut all: Vec<u64> = (1..=n).collect();
                // Fisher–Yates with our rng.
                for i in (1..all.len()).rev() {
                    let j = self.rng.next(i as u64 + 1) as usize;
                    all.swap(i, j);
                }
                nodes = all[..(n as usize) / 2].to_vec();
                self.net()?.split(&nodes)?;
            }
            Fault::PartitionLeader => {
                let v = match self.leader().await {
                    Some(l) => l,
                    None => self.random_node(),
                };
                nodes.push(v);
                self.net()?.split(&nodes)?;
            }
            Fault::PartitionRing => {
                if n <= 3 {
                    // A bridge: `b` sees both others; they do not see each other.
                    let b = self.random_node();
                    let others: Vec<u64> = (1..=n).filter(|x| *x != b).collect();
                    for (i, a) in others.iter().enumerate() {
                        for c in &others[i + 1..] {
                            self.net()?.cut(*a, *c)?;
                        }
                    }
                    nodes.push(b);
                } else {
                    for a in 1..=n {
                        for c in a + 1..=n {
                            let d = (c - a).min(n - (c - a));
                            if d > 1 {
                                self.net()?.cut(a, c)?;
                            }
                        }
                    }
                    nodes = (1..=n).collect();
                }
            }
            Fault::PartitionOneWay => {
                let v = match self.leader().await {
                    Some(l) if self.rng.chance(50) => l,
                    _ => self.random_node(),
                };
                for b in (1..=n).filter(|b| *b != v) {
                    self.net()?.drop_one_way(v, b)?;
                }
                nodes.push(v);
            }
            Fault::Loss => {
                self.net()?.loss(20)?;
                nodes = (1..=n).collect();
            }
            Fault::Clock => {
                let v = self.random_node();
                let offset = self.rng.next(241) as i64 - 120;
                self.clocks
                    .as_ref()
                    .context("clock fault without clocks")?
                    .set(v, offset)?;
                nodes.push(v);
            }
            Fault::Membership => {
                let v = self.random_node();
                nodes.push(v);
                match tokio::time::timeout(Duration::from_secs(30), self.admin.remove(&[v])).await {
                    Ok(Ok(_)) => {
                        self.cluster.kill_node(v);
                        self.cluster.wipe_node(v)?;
                        let addr = self.cluster.node(v).addr.clone();
                        self.cluster.start_joining_node(v, &addr)?;
                    }
                    other => eprintln!("nemesis: removing node {v} did not finish: {other:?}"),
                }
            }
        }
        Ok(Active { fault, nodes })
    }

    /// `pg-kill-idle` on node `v` while the workloads are held still (`idle`: nothing was in
    /// flight): a few writes of our own, SIGKILL of `v`'s postmaster once `v` applied them, and
    /// at once a LINEARIZABLE read on `v` of our rows and of each workload's acknowledged writes.
    /// Returns whether it killed.
    async fn kill_idle(&mut self, v: u64, idle: bool) -> anyhow::Result<bool> {
        let pos = (v - 1) as usize;
        let mut checks: Vec<(String, String, BTreeSet<String>)> = self
            .probes
            .iter()
            .map(|p| {
                (
                    p.workload.to_string(),
                    p.sql.to_string(),
                    (p.acked)(&p.history.ops()),
                )
            })
            .collect();
        // The last commits before the kill: rows of our own (those PostgreSQL is likeliest to
        // lose, being committed a moment before it dies).
        let mut probe_index = 0;
        for _ in 0..3 {
            self.idle_rounds += 1;
            let round = self.idle_rounds;
            let w = self.admin.execute_one(
                "INSERT INTO jepsen_idle (round) VALUES ($1)",
                vec![values::int(round)],
            );
            match tokio::time::timeout(Duration::from_secs(5), w).await {
                Ok(Ok(r)) => {
                    self.idle_acked.insert(round.to_string());
                    probe_index = r.log_index;
                }
                other => {
                    // A cluster that takes no write now has other trouble (the workloads'
                    // histories show it): no kill this time.
                    eprintln!("nemesis: pg-kill-idle write {round}: {other:?}; no kill this round");
                    return Ok(false);
                }
            }
        }
        checks.insert(
            0,
            (
                "nemesis".into(),
                idle::OWN_SQL.into(),
                self.idle_acked.clone(),
            ),
        );
        // Kill once `v`'s PostgreSQL committed them (asynchronously: it may lose them).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut applied = 0;
        loop {
            if let Ok(s) = self.admin.status_of(pos).await {
                applied = s.applied_index;
            }
            if applied >= probe_index || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let killed = Instant::now();
        if !self.cluster.kill_postgres(v) {
            eprintln!("nemesis: pg-kill-idle: node {v} has no PostgreSQL to kill");
            return Ok(false);
        }
        let mut first = true;
        for (workload, sql, acked) in checks {
            let invoke = serde_json::json!({"node": v, "workload": workload, "acked": acked.len()});
            self.idle_history
                .push("invoke", NEMESIS, "idle-read", invoke.clone());
            let req = QueryRequest {
                sql: sql.clone(),
                consistency: Consistency::Linearizable as i32,
                timeout_ms: 5_000,
                ..Default::default()
            };
            // The node answers once its PostgreSQL is back (the supervisor restarts it).
            let deadline = Instant::now() + Duration::from_secs(if first { 60 } else { 15 });
            first = false;
            let mut failed_attempts = 0u32;
            let r = loop {
                match self.admin.query_node(pos, req.clone()).await {
                    Ok(r) => break Ok(r),
                    Err(e) if Instant::now() < deadline => {
                        failed_attempts += 1;
                        if failed_attempts == 1 || failed_attempts.is_multiple_of(50) {
                            eprintln!("nemesis: idle read on node {v}: {e}; retrying");
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            match r {
                Ok(r) => {
                    let seen = idle::first_column(&r.rows);
                    let value = idle::read_value(
                        v,
                        &workload,
                        &acked,
                        &seen,
                        r.applied_index,
                        probe_index,
                        applied,
                        killed.elapsed().as_millis() as u64,
                        failed_attempts,
                        idle,
                    );
                    self.idle_history.push("ok", NEMESIS, "idle-read", value);
                }
                Err(e) => self.idle_history.push_error(
                    "fail",
                    NEMESIS,
                    "idle-read",
                    invoke,
                    Some(e.to_string()),
                ),
            }
        }
        Ok(true)
    }

    fn net(&self) -> anyhow::Result<&Net> {
        self.net
            .as_ref()
            .context("network fault without iptables rules")
    }

    async fn stop_fault(&mut self, a: &Active) -> anyhow::Result<()> {
        match a.fault {
            Fault::Kill => {
                for v in &a.nodes {
                    self.cluster.start_node(*v)?;
                }
            }
            Fault::PgKill | Fault::PgKillIdle => {}
            Fault::Pause => {
                for v in &a.nodes {
                    self.cluster.signal_node(*v, libc::SIGCONT);
                }
            }
            Fault::PgPause => {
                for v in &a.nodes {
                    self.cluster.signal_postgres(*v, libc::SIGCONT);
                }
            }
            f if f.is_network() => self.net()?.heal()?,
            Fault::Clock => {
                for v in &a.nodes {
                    self.clocks
                        .as_ref()
                        .context("clock fault without clocks")?
                        .set(*v, 0)?;
                }
            }
            Fault::Membership => self.restore_membership().await?,
            _ => {}
        }
        Ok(())
    }

    /// Makes every node a running voter again (after membership faults).
    async fn restore_membership(&mut self) -> anyhow::Result<()> {
        let n = self.nodes();
        for attempt in 0..10 {
            let Some(leader) = self.leader().await else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let status = match self
                .admin
                .member_status((leader - 1) as usize, leader)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("nemesis: leader status: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let voter = |id: u64| status.members.iter().any(|m| m.node_id == id && m.voter);
            let member = |id: u64| status.members.iter().any(|m| m.node_id == id);
            let missing: Vec<u64> = (1..=n).filter(|id| !voter(*id)).collect();
            if missing.is_empty() {
                return Ok(());
            }
            for id in &missing {
                let addr = self.cluster.node(*id).addr.clone();
                if !member(*id) {
                    // Not a member: (re)start it empty unless it already waits to join.
                    let node = self.cluster.node(*id);
                    if node.pid().is_none() || node.data_dir.join("removed").exists() {
                        self.cluster.kill_node(*id);
                        self.cluster.start_joining_node(*id, &addr)?;
                    }
                    let peer = raftpg_client::local_cluster::peer_addr_of(&addr);
                    if let Err(e) = self.admin.add_learner(*id, &peer, true).await {
                        eprintln!("nemesis: add learner {id} (attempt {attempt}): {e}");
                        continue;
                    }
                }
                if let Err(e) = self.admin.promote(&[*id]).await {
                    eprintln!("nemesis: promote {id} (attempt {attempt}): {e}");
                }
            }
        }
        bail!("could not restore every node as a voter")
    }

    /// Ends every fault: network healed, clocks reset, every process running and resumed,
    /// every node a voter.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        self.quiet.release();
        if let Some(net) = &self.net {
            net.heal()?;
        }
        if let Some(c) = &self.clocks {
            for v in 1..=self.nodes() {
                c.set(v, 0)?;
            }
        }
        for v in 1..=self.nodes() {
            self.cluster.signal_node(v, libc::SIGCONT);
            self.cluster.signal_postgres(v, libc::SIGCONT);
            if self.cluster.node(v).pid().is_none() {
                self.cluster.start_node(v)?;
            }
        }
        if self.faults.contains(&Fault::Membership) {
            self.restore_membership().await?;
        }
        Ok(())
    }
}
