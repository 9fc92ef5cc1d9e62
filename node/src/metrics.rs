//! The node's Prometheus metrics.
//!
//! Owns the registry and every collector. The service layer records what happens to requests
//! (writes and reads with their latency, refusals by limit, errors by SQLSTATE class); the HTTP
//! frontend (`http`) sets the state gauges (Raft positions, role, per-peer lag, PostgreSQL
//! health) from the node's status at each scrape and encodes everything in the Prometheus text
//! format ([`encode`]). The proposer, the applier, the snapshot store and the PostgreSQL
//! supervisor record their own events (entries proposed, batches applied, snapshots built and
//! installed, restarts). A leaf module: it depends on nothing else of the node.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Size buckets: 1 to 65,536 (writes or entries per batch).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0, 65536.0,
];

/// Byte buckets: 64 B to 64 MiB.
const BYTE_BUCKETS: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];

/// Duration buckets for long operations (seconds): 10 ms to 1 h.
const LONG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("a valid metric")
}

/// Latency buckets (seconds): 250 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    30.0,
];

/// Every collector of the node.
pub struct Metrics {
    registry: Registry,
    /// The current Raft term.
    pub term: IntGauge,
    /// 1 for the node's current role (`leader`, `follower`, `candidate`, `learner`,
    /// `shutdown`), 0 for the others.
    pub role: IntGaugeVec,
    /// Times this node saw the leader change.
    pub leader_changes: IntCounter,
    /// Last log index, committed index, applied index, snapshot index, purged index.
    pub log_index: IntGaugeVec,
    /// On the leader: each member's matched log index and its lag behind the leader's log.
    pub peer_matched_index: IntGaugeVec,
    /// On the leader: entries each member lags behind the leader's last log index.
    pub peer_lag: IntGaugeVec,
    /// 1 while the node's PostgreSQL is up.
    pub postgres_up: IntGauge,
    /// 1 while a check found this node's copy different from the majority's.
    pub diverged: IntGauge,
    /// Writes answered, by outcome (`ok`, `error`).
    pub writes: IntCounterVec,
    /// Time to answer a write (seconds), as the client sees it at this node.
    pub write_seconds: Histogram,
    /// Reads answered, by consistency and outcome.
    pub reads: IntCounterVec,
    /// Time to answer a read (seconds), by consistency.
    pub read_seconds: HistogramVec,
    /// Reads run, by how (`direct`: one statement; `pipelined`: in a transaction, statements
    /// prepared before; `prepared`: prepared now, step by step). See `service::read`.
    pub read_paths: IntCounterVec,
    /// The leader's speculations (entries executed while they replicate), by how they ended:
    /// `kept`, `dropped` (the committed log differed, or the connection went), `expired`,
    /// `failed` (an error while executing), `skipped` (not started: not ready).
    pub speculations: IntCounterVec,
    /// Time from a speculation's execution to its commit (seconds).
    pub speculation_seconds: Histogram,
    /// Requests refused by a limit, by the limit's SQLSTATE (54000 size, 53300 too many, …).
    pub refused: IntCounterVec,
    /// Errors answered, by SQLSTATE class (the first two characters).
    pub errors: IntCounterVec,
    /// On the leader: log entries proposed, and the writes in each.
    pub proposal_writes: Histogram,
    /// On the leader: encoded size of each proposed entry (bytes).
    pub proposal_bytes: Histogram,
    /// Entries applied per PostgreSQL transaction of the applier.
    pub apply_batch_entries: Histogram,
    /// Time to apply one batch (seconds).
    pub apply_batch_seconds: Histogram,
    /// Times the supervisor restarted this node's PostgreSQL.
    pub postgres_restarts: IntCounter,
    /// Snapshots built, and their build time (seconds).
    pub snapshot_build_seconds: Histogram,
    /// Snapshots installed (received from the leader, a rebuild, a restore), and their install
    /// time (seconds).
    pub snapshot_install_seconds: Histogram,
    /// Size of the current snapshot (bytes).
    pub snapshot_bytes: IntGauge,
    /// Disk used by the Raft log and by the snapshots directory (bytes), by `store`.
    pub disk_bytes: IntGaugeVec,
    /// Runs of writes the applier started in one round trip and abandoned (an error in the
    /// run: its writes were applied one by one).
    pub fast_runs_abandoned: IntGauge,
    /// Interactive transactions on this node (as leader), by how they ended: `committed`,
    /// `rolled_back` (by the client), `failed` (an error at COMMIT), `aborted` (a limit, a
    /// disconnect, a leadership change, another entry first).
    pub txns: IntCounterVec,
    /// Time interactive transactions held the writer, from BEGIN to their end (seconds).
    pub txn_seconds: Histogram,
    /// Steps of replayed transactions whose outcome differed from the leader's (a broken
    /// determinism rule; `raftpg check` shows whether the copies differ).
    pub txn_replay_mismatches: IntCounter,
    /// Interactive transactions begun on this node, by where: `alone` (on what PostgreSQL
    /// committed) or `chained` (on top of the previous entries while Raft committed them).
    pub txn_begins: IntCounterVec,
    /// Chained transactions run again after the entries below them were committed without
    /// them, by how that went: `same`, `different` (ended with 40001), `failed`.
    pub txn_reruns: IntCounterVec,
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("a valid metric")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::new(),
            term: gauge("raftpg_term", "The current Raft term."),
            role: gauge_vec(
                "raftpg_role",
                "1 for the node's current Raft role.",
                &["role"],
            ),
            leader_changes: IntCounter::new(
                "raftpg_leader_changes_total",
                "Times this node saw the leader change.",
            )
            .expect("a valid metric"),
            log_index: gauge_vec(
                "raftpg_log_index",
                "Log positions of this node: last, committed, applied, snapshot, purged.",
                &["position"],
            ),
            peer_matched_index: gauge_vec(
                "raftpg_peer_matched_index",
                "On the leader: the log index each member has matched.",
                &["peer"],
            ),
            peer_lag: gauge_vec(
                "raftpg_peer_lag_entries",
                "On the leader: entries each member lags behind the leader's log.",
                &["peer"],
            ),
            postgres_up: gauge("raftpg_postgres_up", "1 while the node's PostgreSQL is up."),
            diverged: gauge(
                "raftpg_diverged",
                "1 while a check found this node's copy different from the majority's.",
            ),
            writes: counter_vec(
                "raftpg_writes_total",
                "Writes answered by this node, by outcome.",
                &["outcome"],
            ),
            write_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "raftpg_write_seconds",
                    "Time to answer a write at this node.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("a valid metric"),
            reads: counter_vec(
                "raftpg_reads_total",
                "Reads answered by this node, by consistency and outcome.",
                &["consistency", "outcome"],
            ),
            read_seconds: HistogramVec::new(
                HistogramOpts::new("raftpg_read_seconds", "Time to answer a read at this node.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["consistency"],
            )
            .expect("a valid metric"),
            read_paths: counter_vec(
                "raftpg_read_paths_total",
                "Reads run by this node, by how: direct (one statement), pipelined (in a transaction), prepared (statement prepared first).",
                &["path"],
            ),
            speculations: counter_vec(
                "raftpg_speculations_total",
                "The leader's entries executed while they replicate, by how it ended: kept, deferred (committed by Raft while a transaction ran on top), dropped, expired, failed, skipped.",
                &["outcome"],
            ),
            txns: counter_vec(
                "raftpg_transactions_total",
                "Interactive transactions led by this node, by how they ended: committed, rolled_back, failed, aborted.",
                &["outcome"],
            ),
            txn_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "raftpg_transaction_seconds",
                    "Time an interactive transaction held the writer, from BEGIN to its end.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("a valid metric"),
            txn_replay_mismatches: IntCounter::new(
                "raftpg_transaction_replay_mismatches_total",
                "Steps of replayed interactive transactions whose outcome differed from the leader's.",
            )
            .expect("a valid metric"),
            txn_begins: counter_vec(
                "raftpg_transaction_begins_total",
                "Interactive transactions begun here, by where: alone, chained (on top of entries Raft was committing).",
                &["how"],
            ),
            txn_reruns: counter_vec(
                "raftpg_transaction_reruns_total",
                "Chained transactions run again after the entries below them were committed without them, by result: same, different, failed.",
                &["result"],
            ),
            speculation_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "raftpg_speculation_seconds",
                    "Time from executing a speculated entry to committing it.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("a valid metric"),
            refused: counter_vec(
                "raftpg_refused_total",
                "Requests refused by a limit, by SQLSTATE.",
                &["sqlstate"],
            ),
            errors: counter_vec(
                "raftpg_errors_total",
                "Errors answered by this node, by SQLSTATE class.",
                &["class"],
            ),
            proposal_writes: histogram(
                "raftpg_proposal_writes",
                "On the leader: writes per proposed log entry (count = entries proposed).",
                COUNT_BUCKETS,
            ),
            proposal_bytes: histogram(
                "raftpg_proposal_bytes",
                "On the leader: encoded size of each proposed log entry.",
                BYTE_BUCKETS,
            ),
            apply_batch_entries: histogram(
                "raftpg_apply_batch_entries",
                "Log entries applied per applier transaction.",
                COUNT_BUCKETS,
            ),
            apply_batch_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "raftpg_apply_batch_seconds",
                    "Time to apply one batch of log entries.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("a valid metric"),
            postgres_restarts: IntCounter::new(
                "raftpg_postgres_restarts_total",
                "Times the supervisor restarted this node's PostgreSQL.",
            )
            .expect("a valid metric"),
            snapshot_build_seconds: histogram(
                "raftpg_snapshot_build_seconds",
                "Time to build a snapshot (count = snapshots built).",
                LONG_BUCKETS,
            ),
            snapshot_install_seconds: histogram(
                "raftpg_snapshot_install_seconds",
                "Time to install a snapshot (count = snapshots installed).",
                LONG_BUCKETS,
            ),
            snapshot_bytes: gauge(
                "raftpg_snapshot_bytes",
                "Size of this node's current snapshot.",
            ),
            disk_bytes: gauge_vec(
                "raftpg_disk_bytes",
                "Disk used by this node's Raft log (store=log) and snapshots (store=snapshots).",
                &["store"],
            ),
            fast_runs_abandoned: gauge(
                "raftpg_apply_fast_runs_abandoned",
                "Runs of writes applied in one round trip that were abandoned and applied one by one.",
            ),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.term.clone()),
            Box::new(m.role.clone()),
            Box::new(m.leader_changes.clone()),
            Box::new(m.log_index.clone()),
            Box::new(m.peer_matched_index.clone()),
            Box::new(m.peer_lag.clone()),
            Box::new(m.postgres_up.clone()),
            Box::new(m.diverged.clone()),
            Box::new(m.writes.clone()),
            Box::new(m.write_seconds.clone()),
            Box::new(m.reads.clone()),
            Box::new(m.read_seconds.clone()),
            Box::new(m.read_paths.clone()),
            Box::new(m.speculations.clone()),
            Box::new(m.speculation_seconds.clone()),
            Box::new(m.refused.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.proposal_writes.clone()),
            Box::new(m.proposal_bytes.clone()),
            Box::new(m.apply_batch_entries.clone()),
            Box::new(m.apply_batch_seconds.clone()),
            Box::new(m.postgres_restarts.clone()),
            Box::new(m.snapshot_build_seconds.clone()),
            Box::new(m.snapshot_install_seconds.clone()),
            Box::new(m.snapshot_bytes.clone()),
            Box::new(m.disk_bytes.clone()),
            Box::new(m.fast_runs_abandoned.clone()),
            Box::new(m.txns.clone()),
            Box::new(m.txn_seconds.clone()),
            Box::new(m.txn_replay_mismatches.clone()),
            Box::new(m.txn_begins.clone()),
            Box::new(m.txn_reruns.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// Records an answered request's error: its SQLSTATE class, and the limit it hit if it was
    /// refused by one (class 53 insufficient resources, 54 program limit exceeded).
    pub fn error(&self, sqlstate: Option<&str>) {
        let state = sqlstate.unwrap_or("XX000");
        let class = state.get(..2).unwrap_or("XX");
        self.errors.with_label_values(&[class]).inc();
        if matches!(class, "53" | "54") {
            self.refused.with_label_values(&[state]).inc();
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The node's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Every metric in the Prometheus text format.
pub fn encode() -> String {
    let mut buf = Vec::new();
    let families = METRICS.registry.gather();
    if TextEncoder::new().encode(&families, &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}
