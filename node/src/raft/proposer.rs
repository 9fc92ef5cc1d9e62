//! Group commit at the proposal level: the leader's concurrent writes share one Raft entry.
//!
//! Owns the queue of writes waiting to be proposed on this node and the stamping of their
//! deterministic inputs (timestamp, seed). openraft writes each proposed entry to the log on its
//! own (and every node fsyncs it), and the state machine applies what each commit step covers,
//! so one entry per write would cost every node a log write and a PostgreSQL transaction per
//! write. Instead one task takes every write waiting (up to
//! `batch_max` writes and `batch_bytes_max` bytes; always at least one) and proposes them as one
//! entry: a lone write as [`Command::Sql`], several as [`Command::Batch`].
//!
//! Invariants:
//! - Timestamps increase along the log: this task is the only one that stamps writes, and it
//!   hands entries to openraft in the order it stamped them. The writes of one entry share its
//!   timestamp and seed.
//! - At most `in_flight_max` entries are proposed and not yet answered; writes arriving
//!   meanwhile wait in the queue and join the next entry (that is what makes entries grow under
//!   load). The queue is bounded by the node's write permits; a full queue is refused.
//! - A write whose caller gave up (timeout, disconnect) before it was taken is not proposed.
//! - Each write gets the outcome at its own position in the entry's outcomes, or the entry's
//!   error.
//! - While an interactive transaction holds the writer ([`Proposer::exclusive`]) nothing is
//!   proposed: every entry holds the gate's shared side from its proposal until it is answered
//!   (applied here), so taking the exclusive side also waits for those in flight. The gate is
//!   fair: transactions and entries take turns in arrival order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use crate::command::{
    ApplyOutcome, Command, LogId, RequestId, SqlStatement, TypeConfig, WriteCommand,
};
use crate::raft::clock::EntryClock;
use crate::raft::log_store::LogStore;
use openraft::async_runtime::WatchReceiver;
use openraft::storage::{RaftLogReader, RaftStateMachine};
use openraft::EntryPayload;

/// Why a proposed write has no outcome.
pub type ProposeError = RaftError<TypeConfig, ClientWriteError<TypeConfig>>;

/// What a write's caller gets: the entry's log id and the write's own outcome.
pub type ProposeResult = Result<(LogId, ApplyOutcome), ProposeError>;

/// Limits of the proposer.
#[derive(Clone, Debug)]
pub struct ProposerLimits {
    /// Most writes in one entry.
    pub batch_max: usize,
    /// Most bytes of writes in one entry (a larger single write still goes alone).
    pub batch_bytes_max: usize,
    /// Most entries proposed and not yet answered.
    pub in_flight_max: usize,
    /// Most writes waiting to be proposed.
    pub queue_max: usize,
}

/// One write waiting to be proposed.
struct Waiting {
    statements: Vec<SqlStatement>,
    request_id: Option<RequestId>,
    /// The role the write runs as.
    user: Option<String>,
    bytes: usize,
    reply: oneshot::Sender<ProposeResult>,
}

/// Why a write could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// More writes wait than the limit.
    #[error("too many writes waiting to be proposed")]
    QueueFull,
    /// The proposer task is gone (the node is shutting down).
    #[error("the node is shutting down")]
    Stopped,
}

/// Handle to the proposer task.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Waiting>,
    /// Shared by every entry in flight, taken whole by an interactive transaction.
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Stamps timestamps (with the proposer task).
    clock: Arc<EntryClock>,
    log: LogStore,
    /// The term whose log tail the clock has seen (see `observe_log_tail`); `u64::MAX`: none.
    clock_term: Arc<AtomicU64>,
}

/// The writer, held by an interactive transaction: nothing else is proposed meanwhile.
pub struct Exclusive {
    _gate: tokio::sync::OwnedRwLockWriteGuard<()>,
}

impl Proposer {
    /// Starts the proposer task for `raft`.
    pub fn start<SM: RaftStateMachine<TypeConfig>>(
        raft: openraft::Raft<TypeConfig, SM>,
        log: LogStore,
        clock: Arc<EntryClock>,
        limits: ProposerLimits,
    ) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue_max.max(1));
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let clock_term = Arc::new(AtomicU64::new(u64::MAX));
        let task = Task {
            log: log.clone(),
            clock: clock.clone(),
            gate: gate.clone(),
            clock_term: clock_term.clone(),
        };
        tokio::spawn(run(raft, task, limits, rx));
        Proposer {
            tx,
            gate,
            clock,
            log,
            clock_term,
        }
    }

    /// Takes the writer for an interactive transaction: waits until every entry in flight is
    /// answered, and keeps anything else from being proposed until the returned guard is
    /// dropped.
    pub async fn exclusive(&self) -> Exclusive {
        Exclusive {
            _gate: self.gate.clone().write_owned().await,
        }
    }

    /// A timestamp and a seed for an interactive transaction holding the writer, in `term`
    /// whose log ends at `last_index` (timestamps increase along the log, as the task's do).
    pub async fn stamp(
        &self,
        _writer: &Exclusive,
        term: u64,
        last_index: Option<u64>,
    ) -> (i64, u64) {
        if self.clock_term.swap(term, Ordering::AcqRel) != term {
            observe_log_tail(&self.log, &self.clock, last_index).await;
        }
        (self.clock.next(), uuid::Uuid::new_v4().as_u64_pair().0)
    }

    /// Queues a write; the receiver yields its outcome once the entry is applied here.
    /// `bytes` is its size, for the entry size limit.
    pub fn submit(
        &self,
        statements: Vec<SqlStatement>,
        request_id: Option<RequestId>,
        user: Option<String>,
        bytes: usize,
    ) -> Result<oneshot::Receiver<ProposeResult>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Waiting {
                statements,
                request_id,
                user,
                bytes,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
            })?;
        Ok(rx)
    }
}

/// What the proposer task shares with its handle.
struct Task {
    log: LogStore,
    clock: Arc<EntryClock>,
    gate: Arc<tokio::sync::RwLock<()>>,
    clock_term: Arc<AtomicU64>,
}

/// The proposer task: take what waits, propose it as one entry, repeat.
async fn run<SM: RaftStateMachine<TypeConfig>>(
    raft: openraft::Raft<TypeConfig, SM>,
    task: Task,
    limits: ProposerLimits,
    mut rx: mpsc::Receiver<Waiting>,
) {
    let Task {
        log,
        clock,
        gate,
        clock_term,
    } = task;
    let slots = Arc::new(Semaphore::new(limits.in_flight_max.max(1)));
    // A write that did not fit into the previous entry: it opens the next one.
    let mut held: Option<Waiting> = None;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match held.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        // Not while an interactive transaction holds the writer.
        let shared = gate.clone().read_owned().await;
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < limits.batch_max.max(1) {
            match rx.try_recv() {
                Ok(w) if bytes.saturating_add(w.bytes) > limits.batch_bytes_max => {
                    held = Some(w);
                    break;
                }
                Ok(w) => {
                    bytes += w.bytes;
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        let (term, last_index) = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            (m.current_term, m.last_log_index)
        };
        if clock_term.swap(term, Ordering::AcqRel) != term {
            observe_log_tail(&log, &clock, last_index).await;
        }
        propose(&raft, &clock, batch, (slot, shared)).await;
    }
}

/// Most log entries read back to find the newest timestamp (entries without one — blank,
/// membership, checksum — are rare).
const CLOCK_SCAN_ENTRIES_MAX: u64 = 4096;

/// Makes the clock see the newest timestamp in this node's log before it stamps anything in a
/// new term: a new leader (or a restarted one) has applied only part of its log, and under
/// clock skew its own clock may be behind timestamps already in the log (design.md invariant
/// 2: timestamps never go backwards along the log). Timestamps increase along the log, so the
/// newest write entry holds the largest.
async fn observe_log_tail(log: &LogStore, clock: &EntryClock, last_index: Option<u64>) {
    let Some(last) = last_index else {
        return;
    };
    let floor = last.saturating_sub(CLOCK_SCAN_ENTRIES_MAX);
    let mut to = last + 1;
    while to > floor {
        let from = to.saturating_sub(64).max(floor);
        let mut reader = log.clone();
        let entries = match reader.try_get_log_entries(from..to).await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot read the log tail for the entry clock");
                return;
            }
        };
        let newest = entries.iter().rev().find_map(|e| match &e.payload {
            EntryPayload::Normal(Command::Sql(cmd)) => Some(cmd.leader_ts_micros),
            EntryPayload::Normal(Command::Batch(cmds)) => {
                cmds.iter().map(|c| c.leader_ts_micros).max()
            }
            EntryPayload::Normal(Command::Transaction(t)) => Some(t.leader_ts_micros),
            _ => None,
        });
        if let Some(ts) = newest {
            clock.observe(ts);
            return;
        }
        if from == floor || entries.is_empty() {
            return;
        }
        to = from;
    }
}

/// Stamps the writes whose callers still wait, hands them to openraft as one entry (in order),
/// and answers each caller from a task of its own once the entry is applied.
async fn propose<SM: RaftStateMachine<TypeConfig>>(
    raft: &openraft::Raft<TypeConfig, SM>,
    clock: &EntryClock,
    batch: Vec<Waiting>,
    slot: (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedRwLockReadGuard<()>,
    ),
) {
    // The writes of one entry share its timestamp and seed (like statements of one PostgreSQL
    // transaction share now()); they draw different random values (see
    // `raftpg.begin_entry`).
    let leader_ts_micros = clock.next();
    let seed = uuid::Uuid::new_v4().as_u64_pair().0;
    let (mut commands, mut replies) = (Vec::with_capacity(batch.len()), Vec::new());
    let bytes: usize = batch.iter().map(|w| w.bytes).sum();
    for w in batch {
        if w.reply.is_closed() {
            continue;
        }
        commands.push(WriteCommand {
            statements: w.statements,
            leader_ts_micros,
            seed,
            request_id: w.request_id,
            user: w.user,
        });
        replies.push(w.reply);
    }
    let command = if commands.len() > 1 {
        Command::Batch(commands)
    } else {
        match commands.pop() {
            Some(one) => Command::Sql(one),
            None => return,
        }
    };
    let writes = replies.len();
    let m = crate::metrics::get();
    m.proposal_writes.observe(writes as f64);
    m.proposal_bytes.observe(bytes as f64);
    let proposed = std::time::Instant::now();
    let (responder, answer) = openraft::impls::ProgressResponder::complete_only();
    match raft.client_write_ff(command, Some(responder)).await {
        Ok(()) => {}
        Err(fatal) => {
            let e = RaftError::Fatal(fatal);
            for r in replies {
                let _ = r.send(Err(e.clone()));
            }
            return;
        }
    };
    tokio::spawn(async move {
        let _slot = slot;
        let result = match answer.await {
            Ok(r) => r.map_err(RaftError::APIError),
            Err(_) => Err(RaftError::Fatal(openraft::error::Fatal::Stopped)),
        };
        match result {
            Err(e) => {
                for r in replies {
                    let _ = r.send(Err(e.clone()));
                }
            }
            Ok(resp) => {
                let log_id = resp.log_id;
                debug!(
                    index = log_id.index,
                    writes,
                    micros = proposed.elapsed().as_micros() as u64,
                    "entry committed and applied"
                );
                match resp.data {
                    ApplyOutcome::Batch(outcomes) if outcomes.len() == replies.len() => {
                        for (r, o) in replies.into_iter().zip(outcomes) {
                            let _ = r.send(Ok((log_id, o)));
                        }
                    }
                    single if replies.len() == 1 => {
                        if let Some(r) = replies.into_iter().next() {
                            let _ = r.send(Ok((log_id, single)));
                        }
                    }
                    other => {
                        warn!(index = log_id.index, writes, outcome = ?other, "an entry's outcomes do not match its writes");
                        for r in replies {
                            let _ = r.send(Ok((log_id, ApplyOutcome::Internal)));
                        }
                    }
                }
            }
        }
    });
}
