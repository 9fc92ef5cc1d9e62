//! The interactive transaction open on the leader's applier session (docs/transactions.md):
//! its life inside the state machine, from `BEGIN` to the moment its entry's speculation is kept
//! or it is rolled back.
//!
//! Owns [`OpenTxn`] (at most one) and the [`TxnRunner`] handle the service layer drives it with.
//! Invariants:
//! - It executes at the log's end (`LogStore::last_written`): it is opened only when
//!   PostgreSQL holds exactly the log openraft applied and the log ends there, or — a *chain*
//!   — on top of the open speculation when the log ends with its last level, at most
//!   `UNCOMMITTED_MAX` of its levels are still to be committed by Raft, and its deferred levels are young (see
//!   `Speculation`). A chained transaction runs in a `raftpg_chain` savepoint and is
//!   `executed_after` the speculation's last entry; the next transaction runs while Raft
//!   commits this one. `BEGIN` is only
//!   called by the holder of the proposer's writer, which is held from `BEGIN` until the
//!   transaction's entry is proposed, so a transaction still open and not proposed then has
//!   lost its owner and is rolled back.
//! - Anything else that needs the applier session first rolls it back (sequences restored):
//!   an entry applied or speculated that is not its own, a lost connection, a snapshot install.
//!   Its caller then gets a serialization failure (40001) with the reason.
//! - When the levels below a chained transaction are committed by Raft, their PostgreSQL
//!   commit waits for it (deferred, bounded by `DEFER_MAX`); past the bound the transaction is
//!   rolled back to its savepoint, the levels committed, and its steps run again on the
//!   committed state — the same inputs on the same state, as any node replays it; a step with
//!   another outcome than the first time ends it with 40001.
//! - Its entry becomes (a level of) the open speculation only when it is the entry at exactly
//!   the log id predicted at `COMMIT` (the next index, this leader's term); everything it did
//!   is then committed by the speculation rule (`settle_speculation`). Otherwise every node applies the
//!   entry from the log, where its position check decides (`command::TxnCommand`).

use std::sync::Arc;

use openraft::vote::RaftLeaderId;
use tracing::{debug, info};

use super::{batch_end, Below, Level, Speculation, StateMachineCore, DEFER_MAX, LEVELS_MAX};
use crate::apply::applier::{EnvError, TxnOpen, TxnOpenHow, TxnStepResult};
use crate::command::{
    ApplyOutcome, ColumnInfo, Command, CommittedLeaderId, Entry, LogId, RequestId, SqlFailure,
    TxnCommand, TxnStep,
};
use openraft::EntryPayload;

/// The transaction open on the applier session.
pub(super) struct OpenTxn {
    /// Its steps so far and its inputs (`executed_after` set at `BEGIN`).
    cmd: TxnCommand,
    /// Its write number (see `request_log`).
    write_no: u64,
    /// Set at `COMMIT`, once the end is recorded in the open transaction: the log id its entry
    /// must get, and the outcome it then has.
    proposed: Option<(LogId, ApplyOutcome)>,
    /// Whether it runs on top of the open speculation, in a `raftpg_chain` savepoint.
    on_top: bool,
}

impl OpenTxn {
    pub(super) fn request_id(&self) -> &RequestId {
        &self.cmd.request_id
    }

    pub(super) fn on_top(&self) -> bool {
        self.on_top
    }

    pub(super) fn proposed(&self) -> Option<&(LogId, ApplyOutcome)> {
        self.proposed.as_ref()
    }
}

/// Most levels of the speculation Raft has not committed yet under a chained `BEGIN`: the
/// depth of the pipeline of transactions (each level's Raft commit overlaps the execution of
/// the ones above it).
const UNCOMMITTED_MAX: usize = 3;

/// Asks PostgreSQL to cancel what the applier session runs now, if it is connected.
async fn cancel_running(cancel: &std::sync::Mutex<Option<tokio_postgres::CancelToken>>) {
    let token = cancel.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(token) = token {
        if let Err(e) = token.cancel_query(tokio_postgres::NoTls).await {
            debug!(error = %e, "cancelling the applier's statement failed");
        }
    }
}

/// Why a transaction is rolled back when another entry reached the log first.
pub(super) const MOVED: &str = "could not serialize the transaction: another entry reached the log while it was open; retry the transaction";

/// Why the state machine cannot do what the transaction asked.
#[derive(Debug, thiserror::Error)]
pub enum TxnRefusal {
    /// The session is not at the log's end yet (entries to apply, a speculation open, another
    /// transaction): try again shortly.
    #[error("the applier is busy: {0}")]
    Busy(&'static str),
    /// The transaction is no longer open (rolled back for the reason given).
    #[error("{0}")]
    Aborted(String),
    /// Its request id has a live record: a transaction with this id committed before.
    #[error("a transaction with this request id was committed before")]
    Duplicate,
    /// A deterministic SQL error at `BEGIN` (the role is gone) or at `COMMIT` (a deferred
    /// constraint): the transaction is rolled back.
    #[error("{}", .0.message)]
    Sql(SqlFailure),
    /// PostgreSQL failed (not the transaction's fault); rolled back.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
}

/// The service layer's handle on the open transaction (see the module doc).
///
/// Every call runs in a task of its own: a caller that goes away mid-way (its future dropped)
/// cannot leave the applier session with a command sent and its effect unrecorded — what
/// PostgreSQL ran is always what the open transaction records.
#[derive(Clone)]
pub struct TxnRunner {
    pub(super) core: Arc<tokio::sync::Mutex<StateMachineCore>>,
    pub(super) changed: Arc<tokio::sync::Notify>,
    pub(super) cancel: Arc<std::sync::Mutex<Option<tokio_postgres::CancelToken>>>,
}

impl TxnRunner {
    /// Runs `f` on the state machine in a task of its own (see the type's doc).
    async fn detached<T, F, Fut>(&self, f: F) -> Result<T, TxnRefusal>
    where
        F: FnOnce(tokio::sync::OwnedMutexGuard<StateMachineCore>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, TxnRefusal>> + Send + 'static,
        T: Send + 'static,
    {
        let core = self.core.clone();
        tokio::spawn(async move { f(core.lock_owned().await).await })
            .await
            .unwrap_or_else(|e| {
                Err(TxnRefusal::Postgres(format!(
                    "the applier's task failed: {e}"
                )))
            })
    }

    /// Opens `cmd` (no steps yet) on the applier session if PostgreSQL holds exactly the log,
    /// up to its end, and nothing else is open.
    pub async fn begin(&self, cmd: TxnCommand) -> Result<(), TxnRefusal> {
        self.detached(move |mut core| async move { core.txn_begin(cmd).await })
            .await
    }

    /// Asks PostgreSQL to cancel what the applier session runs now (a transaction's statement
    /// past its time limit; the step then fails and the transaction is rolled back). Anything
    /// else it may hit instead is an environmental failure, retried.
    pub async fn cancel_statement(&self) {
        cancel_running(&self.cancel).await;
    }

    /// Woken whenever a refused `begin` may succeed now.
    pub fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    /// Runs one step of the open transaction `id`.
    pub async fn step(&self, id: &RequestId, step: TxnStep) -> Result<TxnStepResult, TxnRefusal> {
        let id = id.clone();
        self.detached(move |mut core| async move { core.txn_step(&id, step).await })
            .await
    }

    /// What PostgreSQL infers for `sql` inside the open transaction `id` (parameter type OIDs
    /// and result columns), or its error (the transaction stays usable on the session).
    pub async fn describe(
        &self,
        id: &RequestId,
        sql: String,
        param_types: Vec<u32>,
    ) -> Result<Result<(Vec<u32>, Vec<ColumnInfo>), SqlFailure>, TxnRefusal> {
        let id = id.clone();
        self.detached(move |mut core| async move {
            core.active_txn(&id)?;
            let described = match core.applier.as_mut() {
                Some(a) => a.txn_describe(&sql, &param_types).await,
                None => Err(EnvError::NotConnected),
            };
            match described {
                Ok(d) => Ok(d),
                Err(e) => {
                    let why = format!("the transaction was rolled back: PostgreSQL failed: {e}");
                    core.abort_txn(&why).await;
                    Err(TxnRefusal::Postgres(e.to_string()))
                }
            }
        })
        .await
    }

    /// Returns the command to propose for transaction `id` (its entry, predicted at the next
    /// log id of `term`) as soon as it is known; then, still holding the state machine (so
    /// nothing else uses the session meanwhile), ends the transaction's run and records its
    /// end in the open PostgreSQL transaction while the caller proposes and Raft replicates.
    /// That end may fail (a deferred constraint): the entry's outcome is then that failure, on
    /// every node.
    pub async fn prepare_commit(
        &self,
        id: &RequestId,
        term: u64,
    ) -> Result<TxnCommand, TxnRefusal> {
        let id = id.clone();
        let (ready, cmd) = tokio::sync::oneshot::channel();
        let core = self.core.clone();
        tokio::spawn(async move {
            core.lock_owned()
                .await
                .txn_prepare_commit(&id, term, ready)
                .await
        });
        cmd.await.unwrap_or_else(|e| {
            Err(TxnRefusal::Postgres(format!(
                "the applier's task failed: {e}"
            )))
        })
    }

    /// Rolls transaction `id` back if it is still open on the session.
    pub async fn rollback(&self, id: &RequestId, why: &str) {
        let (id, why) = (id.clone(), why.to_string());
        let _ = self
            .detached(move |mut core| async move {
                if core.txn.as_ref().is_some_and(|t| t.cmd.request_id == id) {
                    core.abort_txn(&why).await;
                    core.changed.notify_waiters();
                }
                Ok(())
            })
            .await;
    }
}

impl StateMachineCore {
    async fn txn_begin(&mut self, mut cmd: TxnCommand) -> Result<(), TxnRefusal> {
        if self.txn.as_ref().is_some_and(|t| t.proposed.is_some()) {
            return Err(TxnRefusal::Busy(
                "the previous transaction's entry is being appended",
            ));
        }
        if self.txn.is_some() {
            // BEGIN holds the writer, and a live transaction holds it until it is proposed or
            // its end has rolled back what it left open here: one found here, not proposed, has
            // no owner any more (its end was lost). Without this, it would keep every BEGIN
            // busy, and BEGINs the writer.
            info!(
                node = self.node_id,
                "an open transaction without owner found at BEGIN; rolling it back"
            );
            self.abort_txn("the transaction was rolled back: a newer transaction began after its client had gone")
                .await;
        }
        if let Err(e) = self.connect().await {
            return Err(TxnRefusal::Postgres(e.to_string()));
        }
        let applied = self.applied.map(|l| l.index);
        let log_end = self.log.last_written();
        let (after, write_no) = match &self.speculation {
            None if applied == log_end && self.log_applied == applied => {
                (self.applied, self.applied_writes + 1)
            }
            None => return Err(TxnRefusal::Busy("entries are still being applied")),
            Some(spec) => {
                let top = spec.top();
                // What openraft applied must be what the speculation holds committed.
                let committed = match spec.deferred {
                    0 => applied,
                    n => Some(spec.levels[n - 1].log_id.index),
                };
                let young = spec
                    .deferred_since
                    .is_none_or(|t| t.elapsed() < DEFER_MAX / 2);
                if Some(top.last.index) != log_end
                    || self.log_applied != committed
                    || spec.uncommitted() > UNCOMMITTED_MAX
                    || spec.levels.len() >= LEVELS_MAX
                    || !young
                {
                    return Err(TxnRefusal::Busy("entries are still being committed"));
                }
                (Some(top.last), top.writes + 1)
            }
        };
        let on_top = self.speculation.is_some();
        cmd.executed_after = after;
        cmd.steps.clear();
        let applier = self
            .applier
            .as_mut()
            .ok_or(TxnRefusal::Busy("not connected"))?;
        let how = match on_top {
            true => TxnOpenHow::Chained,
            false => TxnOpenHow::Begin,
        };
        let opened = applier
            .txn_open(write_no, &cmd, &self.limits, how, Default::default())
            .await;
        let env_failed = opened.is_err();
        let refusal = match opened {
            Ok(TxnOpen::Opened) => {
                crate::metrics::get()
                    .txn_begins
                    .with_label_values(&[if on_top { "chained" } else { "alone" }])
                    .inc();
                self.txn = Some(OpenTxn {
                    cmd,
                    write_no,
                    proposed: None,
                    on_top,
                });
                return Ok(());
            }
            Ok(TxnOpen::Duplicate) => TxnRefusal::Duplicate,
            Ok(TxnOpen::Failed(f)) => TxnRefusal::Sql(f),
            Err(e) => TxnRefusal::Postgres(e.to_string()),
        };
        if on_top && env_failed {
            // Whether its savepoint exists is unknown (a failed SAVEPOINT would make the
            // rollback below undo a level of the speculation): drop everything; what Raft
            // committed is replayed from the log.
            self.disconnect();
        } else if on_top {
            // Back to the speculation alone (everything is dropped if that fails).
            if self.rollback_chain(1).await.is_ok() {
                self.commit_if_nothing_on_top().await;
            }
        } else {
            self.abandon_open_transaction().await;
        }
        Err(refusal)
    }

    /// The open transaction if it is `id` and not proposed yet.
    fn active_txn(&self, id: &RequestId) -> Result<(), TxnRefusal> {
        match &self.txn {
            Some(t) if &t.cmd.request_id == id && t.proposed.is_none() => Ok(()),
            Some(t) if &t.cmd.request_id == id => Err(TxnRefusal::Aborted(
                "the transaction is being committed".into(),
            )),
            _ => Err(TxnRefusal::Aborted(self.aborted_reason(id))),
        }
    }

    fn aborted_reason(&self, id: &RequestId) -> String {
        match &self.txn_aborted {
            Some((aborted, why)) if aborted == id => why.clone(),
            _ => "the transaction is no longer open on the leader's PostgreSQL session".into(),
        }
    }

    async fn txn_step(
        &mut self,
        id: &RequestId,
        step: TxnStep,
    ) -> Result<TxnStepResult, TxnRefusal> {
        self.active_txn(id)?;
        // On top of levels deferred past their bound (the speculation task could not cut them:
        // this transaction kept the state machine busy), cut first: the levels are committed
        // and the transaction runs again on them (`expire_speculation`); then the step. A step
        // that starts before the bound may hold them past it by its own duration.
        let past_bound = match (&self.speculation, &self.txn) {
            (Some(spec), Some(t)) if t.on_top => spec
                .deferred_since
                .is_some_and(|since| since.elapsed() >= DEFER_MAX),
            _ => false,
        };
        if past_bound {
            self.expire_speculation(self.limits.speculation_wait_max)
                .await;
            self.active_txn(id)?;
        }
        let ran = match self.applier.as_mut() {
            Some(a) => a.txn_step(&step, &self.limits).await,
            None => Err(EnvError::NotConnected),
        };
        match ran {
            Ok(result) => {
                let step = match step {
                    TxnStep::Statement { stmt, .. } => TxnStep::Statement {
                        stmt,
                        failed: matches!(result, TxnStepResult::Failed(_)),
                    },
                    other => other,
                };
                if let Some(t) = self.txn.as_mut() {
                    t.cmd.steps.push(step);
                }
                Ok(result)
            }
            Err(e) => {
                let why = format!("the transaction was rolled back: PostgreSQL failed: {e}");
                self.abort_txn(&why).await;
                Err(TxnRefusal::Postgres(e.to_string()))
            }
        }
    }

    async fn txn_prepare_commit(
        &mut self,
        id: &RequestId,
        term: u64,
        ready: tokio::sync::oneshot::Sender<Result<TxnCommand, TxnRefusal>>,
    ) {
        if let Err(e) = self.active_txn(id) {
            let _ = ready.send(Err(e));
            return;
        }
        let Some(t) = self.txn.as_mut() else {
            let _ = ready.send(Err(TxnRefusal::Aborted(self.aborted_reason(id))));
            return;
        };
        let (cmd, write_no, on_top) = (t.cmd.clone(), t.write_no, t.on_top);
        // The entry it runs after: the speculation's last when it runs on top of it.
        let (after, membership) = match (&self.speculation, on_top) {
            (Some(spec), true) => (Some(spec.top().last), spec.top().membership.clone()),
            _ => (self.applied, self.membership.clone()),
        };
        let predicted = LogId::new(
            CommittedLeaderId::new(term, self.node_id),
            after.map(|l| l.index + 1).unwrap_or(0),
        );
        // Proposed from here on (the outcome is settled below, before anything else can look).
        t.proposed = Some((predicted, ApplyOutcome::Applied(Vec::new())));
        if ready.send(Ok(cmd.clone())).is_err() {
            // The caller is gone and proposes nothing: roll the transaction back.
            self.abort_txn("the transaction was rolled back: its COMMIT was abandoned")
                .await;
            return;
        }
        // Its end, while Raft replicates its entry: as every node's replay ends it
        // (`Applier::apply_transaction`), a failure there is the entry's outcome.
        let recorded = async {
            let applier = self.applier.as_mut().ok_or(EnvError::NotConnected)?;
            let end = batch_end(predicted, write_no, &membership)?;
            applier.txn_close_recorded(write_no, &cmd, &end).await
        }
        .await;
        match recorded {
            Ok(outcome) => {
                if let Some(t) = self.txn.as_mut() {
                    t.proposed = Some((predicted, outcome));
                }
            }
            Err(e) => {
                // What ran here is rolled back; the entry is applied from the log when it
                // commits, like any entry this node did not execute.
                let why = format!("the transaction was rolled back: PostgreSQL failed: {e}");
                self.abort_txn(&why).await;
            }
        }
    }

    /// Rolls the open transaction back (sequences restored) and remembers why, for its caller.
    pub(super) async fn abort_txn(&mut self, why: &str) {
        let Some(t) = self.txn.take() else {
            return;
        };
        debug!(node = self.node_id, client_id = %t.cmd.request_id.client_id, why, "interactive transaction rolled back");
        self.txn_aborted = Some((t.cmd.request_id, why.to_string()));
        if t.on_top {
            // The speculation below stays (everything is dropped if that fails).
            if self.rollback_chain(1).await.is_ok() {
                self.commit_if_nothing_on_top().await;
            }
        } else {
            self.abandon_open_transaction().await;
        }
    }

    /// Forgets the transaction running on top of the speculation, after what it did was rolled
    /// back (to its savepoint, or whole) for `why`. A proposed one is forgotten silently: its
    /// entry is applied from the log, and its caller gets that outcome.
    pub(super) fn drop_txn_on_top(&mut self, why: &str) {
        if !self.txn.as_ref().is_some_and(|t| t.on_top) {
            return;
        }
        if let Some(t) = self.txn.take() {
            if t.proposed.is_none() {
                self.txn_aborted = Some((t.cmd.request_id, why.to_string()));
            }
        }
    }

    /// Runs the open transaction's steps again in a new PostgreSQL transaction after the
    /// levels it ran on top of were committed without it (see the module doc); ends it with
    /// 40001 when a step does not do what it did the first time.
    pub(super) async fn rerun_txn(&mut self) {
        let Some(t) = self.txn.as_mut() else {
            return;
        };
        t.on_top = false;
        let (cmd, write_no) = (t.cmd.clone(), t.write_no);
        let limits = self.limits.clone();
        let ran = async {
            let applier = self.applier.as_mut().ok_or(EnvError::NotConnected)?;
            let opened = applier
                .txn_open(
                    write_no,
                    &cmd,
                    &limits,
                    TxnOpenHow::Begin,
                    Default::default(),
                )
                .await?;
            if !matches!(opened, TxnOpen::Opened) {
                return Ok(false);
            }
            for step in &cmd.steps {
                let result = applier.txn_step(step, &limits).await?;
                let failed_now = matches!(result, TxnStepResult::Failed(_));
                let failed_before = matches!(step, TxnStep::Statement { failed: true, .. });
                if failed_now != failed_before {
                    return Ok(false);
                }
            }
            Ok::<_, EnvError>(true)
        }
        .await;
        crate::metrics::get()
            .txn_reruns
            .with_label_values(&[match &ran {
                Ok(true) => "same",
                Ok(false) => "different",
                Err(_) => "failed",
            }])
            .inc();
        match ran {
            Ok(true) => {}
            Ok(false) => {
                self.abort_txn("could not serialize the transaction: run again after the entry before it committed, it did not do the same; retry the transaction")
                    .await
            }
            Err(e) => {
                self.abort_txn(&format!(
                    "the transaction was rolled back: PostgreSQL failed: {e}"
                ))
                .await
            }
        }
    }

    /// Called with the entries about to be applied or speculated: makes the open transaction
    /// the open speculation when `first` is its own entry at the predicted log id; rolls it
    /// back when anything else comes first. (Only then: a level always names an entry this
    /// node's log holds. A level made at the proposal would stay behind a proposal Raft
    /// refused — its client told 40001 — and the next entry appended at its log id would
    /// commit it: tried in session 3, and the jepsen membership run found exactly that.)
    pub(super) async fn settle_txn(&mut self, first: Option<&Entry>) {
        let Some(t) = self.txn.as_ref() else {
            return;
        };
        let own = first.is_some_and(|e| match (&e.payload, &t.proposed) {
            (EntryPayload::Normal(Command::Transaction(c)), Some((predicted, _))) => {
                c.request_id == t.cmd.request_id && e.log_id == *predicted
            }
            _ => false,
        });
        if !own {
            info!(node = self.node_id, entry = ?first.map(|e| e.log_id), "another entry reached the log before the open transaction's; rolling it back");
            self.abort_txn(MOVED).await;
            return;
        }
        self.adopt_proposed_txn();
    }

    /// Makes the proposed transaction, whose entry the log now holds at the predicted log id,
    /// the top level of the speculation (its own, when nothing is speculated below it): the
    /// next transaction may begin on top of it.
    fn adopt_proposed_txn(&mut self) {
        if self.txn.as_ref().is_none_or(|t| t.proposed.is_none()) {
            return;
        }
        let Some(OpenTxn {
            write_no,
            proposed: Some((log_id, outcome)),
            on_top,
            ..
        }) = self.txn.take()
        else {
            return;
        };
        if let Some(spec) = self.speculation.as_mut().filter(|_| on_top) {
            // Its entry is one more level.
            let membership = spec.top().membership.clone();
            spec.levels.push(Level {
                log_id,
                outcome,
                after: Below {
                    last: log_id,
                    writes: write_no,
                    membership,
                },
                since: std::time::Instant::now(),
            });
            return;
        }
        self.speculation = Some(Speculation::one(
            log_id,
            outcome,
            Below {
                last: log_id,
                writes: write_no,
                membership: self.membership.clone(),
            },
        ));
    }
}
