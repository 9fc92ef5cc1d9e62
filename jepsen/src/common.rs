//! What every workload shares: the client environment of one run, logical processes that are
//! retired after an unknown outcome, outcome classification, final per-node reads and the
//! result row of a workload.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftpg_client::v1::{Consistency, QueryRequest, Row, Value};
use raftpg_client::{Client, ClientConfig, ClientError};
use tonic::Code;

use crate::history::{History, Op};

/// A small deterministic pseudo-random sequence.
pub struct Lcg(u64);

impl Lcg {
    /// A sequence seeded with `seed` (mixed, so that neighbouring seeds differ).
    pub fn new(seed: u64) -> Self {
        let mut l = Lcg(seed ^ 0x9e37_79b9_7f4a_7c15);
        l.next(2);
        l
    }

    /// A number in `0..n`.
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next(100) < percent
    }
}

/// A seed that differs between runs.
pub fn time_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// The environment of a workload's client processes in one run.
#[derive(Clone)]
pub struct Env {
    /// Node addresses; node `i` (1-based) is `addrs[i - 1]`.
    pub addrs: Vec<String>,
    /// Client settings of the cluster (its TLS).
    pub client_config: ClientConfig,
    /// The workload's history.
    pub history: Arc<History>,
    /// Set when the load phase ends.
    pub stop: Arc<AtomicBool>,
    /// Client processes of this workload.
    pub clients: u64,
    /// Seed of this run.
    pub seed: u64,
    /// Lets the nemesis hold every workload of the run still (shared by all workloads).
    pub quiet: Arc<Quiet>,
}

impl Env {
    /// Whether the load phase is over.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Starts one operation (with all its retries): waits while the nemesis holds the run
    /// quiet, then counts the operation as in flight until the guard is dropped.
    pub async fn op(&self) -> OpGuard {
        self.quiet.enter(&self.stop).await
    }

    /// A client whose first choice is node `slot % n` (so that writes enter through every
    /// node and are forwarded), with Jepsen-like timeouts: an operation gives up after a few
    /// seconds and is then recorded as `info`.
    pub fn client(&self, slot: u64) -> Client {
        let n = self.addrs.len();
        let first = slot as usize % n;
        let rotated: Vec<String> = (0..n)
            .map(|i| self.addrs[(first + i) % n].clone())
            .collect();
        let config = ClientConfig {
            tls: self.client_config.tls.clone(),
            credentials: self.client_config.credentials.clone(),
            ..client_config()
        };
        Client::with_config(&rotated, config).expect("valid addresses")
    }
}

/// A gate that lets the nemesis make a whole run idle: while it is held no workload starts an
/// operation, and [`Quiet::hold`] returns once every operation in flight has completed.
#[derive(Default)]
pub struct Quiet {
    held: AtomicBool,
    in_flight: AtomicU64,
}

/// One operation in flight (see [`Env::op`]).
pub struct OpGuard(Arc<Quiet>);

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Quiet {
    async fn enter(self: &Arc<Self>, stop: &AtomicBool) -> OpGuard {
        loop {
            // Announce first, then look at the gate: `hold` sets the gate first, then looks at
            // the count, so one of the two always sees the other (SeqCst).
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if !self.held.load(Ordering::SeqCst) || stop.load(Ordering::Relaxed) {
                return OpGuard(self.clone());
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            while self.held.load(Ordering::SeqCst) && !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Stops new operations and waits (at most `timeout`) until none is in flight. Returns
    /// whether the run is idle.
    pub async fn hold(&self, timeout: Duration) -> bool {
        self.held.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Lets operations start again.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }
}

/// Timeouts of workload clients: each attempt 2 s, at most 8 attempts (same request id).
pub fn client_config() -> ClientConfig {
    ClientConfig {
        attempt_timeout: Duration::from_secs(2),
        attempts_max: 8,
        retry_backoff: Duration::from_millis(50),
        ..ClientConfig::default()
    }
}

/// A logical process: after an operation with an unknown outcome it is retired and replaced
/// by a fresh process id (as in Jepsen), so no process ever has two operations open.
pub struct Process {
    /// Current process id.
    pub id: u64,
    stride: u64,
}

impl Process {
    /// Process `slot` of `clients`.
    pub fn new(slot: u64, clients: u64) -> Self {
        Process {
            id: slot,
            stride: clients.max(1),
        }
    }

    /// Retires the current id.
    pub fn retire(&mut self) {
        self.id += self.stride;
    }
}

/// How a failed call ended for a *write*.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// Definitely not applied (refused, or a SQL error that rolled the entry back).
    Fail,
    /// Unknown: it may have been applied.
    Info,
}

/// Classifies a write error: the codes a node returns only when the entry certainly did not
/// take effect are `fail`, everything else (timeouts, lost connections, leader changes) `info`.
pub fn classify(e: &ClientError) -> Failure {
    match e.code() {
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::ResourceExhausted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::PermissionDenied
        | Code::NotFound => Failure::Fail,
        _ => Failure::Info,
    }
}

/// A read request.
pub fn read_request(sql: &str, params: Vec<Value>, consistency: Consistency) -> QueryRequest {
    QueryRequest {
        sql: sql.to_string(),
        params,
        consistency: consistency as i32,
        timeout_ms: 2_000,
        ..Default::default()
    }
}

/// A consistency level drawn at random.
pub fn random_consistency(rng: &mut Lcg) -> Consistency {
    match rng.next(3) {
        0 => Consistency::Local,
        1 => Consistency::AtLeast,
        _ => Consistency::Linearizable,
    }
}

/// Reads `sql` from every node's own copy once it applied `marker` (streamed, retried for up
/// to two minutes per node). Returns rows by node id (1-based).
pub async fn final_reads(
    admin: &Client,
    nodes: usize,
    sql: &str,
    marker: u64,
) -> anyhow::Result<Vec<(u64, Vec<Row>)>> {
    let mut out = Vec::new();
    for i in 0..nodes {
        let req = QueryRequest {
            sql: sql.into(),
            consistency: Consistency::AtLeast as i32,
            min_index: marker,
            timeout_ms: 10_000,
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
        out.push((i as u64 + 1, rows));
    }
    Ok(out)
}

/// The result of one workload in one run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcome {
    /// Completed `ok`.
    pub ok: usize,
    /// Completed `fail`.
    pub fail: usize,
    /// Unknown outcome (`info`, or no completion).
    pub info: usize,
    /// One line per anomaly (checkers may cap the lines; see `anomaly_count`).
    pub anomalies: Vec<String>,
    /// Anomalies found, including those a checker summarized as "... and N more".
    pub anomaly_count: usize,
    /// Checks that could not decide (search limits); not anomalies.
    pub unknown: Vec<String>,
}

impl Outcome {
    /// Counts the completions of a history and takes the checker's lines (those starting
    /// with `unknown:` are undecided checks, not anomalies).
    pub fn of(history: &[Op], lines: Vec<String>) -> Self {
        let mut o = Outcome::default();
        let mut open = std::collections::HashMap::new();
        for op in history {
            match op.kind.as_str() {
                "invoke" => {
                    open.insert(op.process, ());
                }
                "ok" => o.ok += 1,
                "fail" => o.fail += 1,
                _ => o.info += 1,
            }
            if op.kind != "invoke" {
                open.remove(&op.process);
            }
        }
        o.info += open.len();
        for l in lines {
            if l.starts_with("unknown:") {
                o.unknown.push(l);
                continue;
            }
            let more = l
                .strip_prefix("... and ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<usize>().ok());
            o.anomaly_count += more.unwrap_or(1);
            o.anomalies.push(l);
        }
        o
    }
}

/// Completes an operation: `ok` with `value`, or `fail`/`info` by the error's class (the
/// process is retired on `info`). For writes. Returns whether the process was retired: its
/// caller then continues with a fresh client.
#[must_use]
pub fn complete_write<T>(
    env: &Env,
    p: &mut Process,
    f: &str,
    invoke_value: serde_json::Value,
    result: Result<T, ClientError>,
    ok_value: impl FnOnce(T) -> serde_json::Value,
) -> bool {
    match result {
        Ok(r) => env.history.push("ok", p.id, f, ok_value(r)),
        Err(e) => match classify(&e) {
            Failure::Fail => {
                env.history
                    .push_error("fail", p.id, f, invoke_value, Some(e.to_string()))
            }
            Failure::Info => {
                env.history
                    .push_error("info", p.id, f, invoke_value, Some(e.to_string()));
                p.retire();
                return true;
            }
        },
    }
    false
}
