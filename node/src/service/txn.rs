//! Interactive transactions (`BEGIN` … `COMMIT` with client round trips), as every frontend
//! drives them: [`Service::begin`] gives a [`Txn`]; its statements, savepoints, `COMMIT` and
//! `ROLLBACK` go through it. Design and failure cases: docs/transactions.md.
//!
//! Owns a transaction's life on the leader: taking the writer (the proposer's gate: nothing
//! else is proposed while it is open), its limits (idle time, total time), the client's
//! savepoints and its failed state, proposing its entry at `COMMIT` and answering with the
//! entry's outcome. What runs on PostgreSQL is the state machine's ([`TxnRunner`]).
//!
//! Invariants:
//! - At most one transaction holds the writer; `BEGIN`s wait for it in arrival order, bounded
//!   by the write timeout.
//! - A transaction that ends in any way (commit, rollback, a limit, a drop of its [`Txn`])
//!   releases the writer and rolls back whatever is still open on the session.
//! - Every statement passes the same gate as a write; savepoint names are checked here, so
//!   PostgreSQL never refuses a savepoint command (which would leave its transaction aborted).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::error::ClientWriteError;
use tokio::sync::Mutex;
use tracing::{debug, info, info_span, Instrument};

use super::error::{ErrorKind, ServiceError};
use super::node::{Service, TxnLimits};
use super::types::{Committed, Description, Origin, WriteStatement};
use crate::apply::applier::TxnStepResult;
use crate::apply::state_machine::{TxnRefusal, TxnRunner};
use crate::auth::authenticator::Principal;
use crate::command::{
    ApplyOutcome, Command, RequestId, SqlStatement, StatementOutcome, TxnCommand, TxnStep,
};
use crate::metrics;
use crate::raft::proposer::Exclusive;

/// How long `BEGIN` waits at most between looks at the applier when it is not at the log's end
/// yet (it looks again as soon as the state machine applied or speculated something).
const BEGIN_RETRY: Duration = Duration::from_millis(5);

/// What `BEGIN` needs.
#[derive(Clone, Debug)]
pub struct BeginRequest {
    /// Who sent it; the transaction runs as this role (`None`: raftpg itself).
    pub principal: Option<Principal>,
    /// The transaction's request id (a client that loses the answer to `COMMIT` learns the
    /// outcome under it); raftpg picks one when `None`.
    pub request_id: Option<RequestId>,
    /// Who sent it.
    pub origin: Origin,
}

/// Where a transaction is, as a client sees it (PostgreSQL's `ReadyForQuery` status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnStatus {
    /// Open: statements run.
    Active,
    /// A statement failed: only `ROLLBACK` or `ROLLBACK TO SAVEPOINT` is accepted.
    Failed,
    /// Ended (committed, rolled back, or ended by a limit or a leadership change).
    Ended,
}

/// An interactive transaction running on this node, the leader (see the module doc).
/// Dropping it rolls it back. Frontends hold it through [`super::txn_route::Txn`].
pub struct LocalTxn {
    inner: Arc<Mutex<Inner>>,
    id: RequestId,
}

struct Inner {
    svc: Arc<Service>,
    runner: TxnRunner,
    id: RequestId,
    /// The writer, held until the transaction ends.
    writer: Option<Exclusive>,
    status: TxnStatus,
    /// The client's savepoints, oldest first.
    savepoints: Vec<String>,
    steps: usize,
    /// Bytes of its steps so far (see [`TxnLimits::bytes_max`]).
    bytes: usize,
    started: Instant,
    last_used: Instant,
    /// Why an ended transaction ended, when a limit or the state machine ended it: the error
    /// its next use gets.
    ended_by: Option<ServiceError>,
}

impl Service {
    /// Opens an interactive transaction on this node, which leads: waits for the writer (at
    /// most the write timeout), then for PostgreSQL to hold the whole log, and starts the
    /// transaction there.
    pub(super) async fn begin_here(
        self: &Arc<Self>,
        req: BeginRequest,
    ) -> Result<LocalTxn, ServiceError> {
        let span = info_span!("begin", node = self.id, term = self.term());
        // In a task of its own: a caller that goes away mid-way leaves nothing behind (the
        // transaction it would have got is dropped, which rolls it back and releases the
        // writer).
        let svc = self.clone();
        tokio::spawn(async move { svc.begin_in_span(req).instrument(span).await })
            .await
            .map_err(|e| ServiceError::internal(format!("BEGIN's task failed: {e}")))?
    }

    async fn begin_in_span(self: &Arc<Self>, req: BeginRequest) -> Result<LocalTxn, ServiceError> {
        self.refuse_if_removed()?;
        let runner = self
            .txns
            .clone()
            .ok_or_else(|| ServiceError::internal("this node runs no transactions"))?;
        let wait = self.limits.write_timeout;
        if !self.is_leader() {
            return Err(ServiceError::unavailable(
                "this node is not the leader",
                self.leader(),
            ));
        }
        let started = tokio::time::Instant::now();
        let deadline = started + wait;
        let id = req.request_id.clone().unwrap_or_else(|| RequestId {
            client_id: format!("txn-{}-{}", self.id, uuid::Uuid::new_v4()),
            seq: 1,
        });
        let mut said_busy = false;
        // Held while BEGIN waits for the applier: what it waits for (entries proposed before,
        // all answered or being committed) needs no writer.
        let writer = tokio::time::timeout_at(deadline, self.proposer.exclusive())
            .await
            .map_err(|_| {
                ServiceError::refused(
                    ErrorKind::ResourceExhausted,
                    "55P03",
                    format!("another transaction held the writer for longer than {wait:?}; retry"),
                )
            })?;
        loop {
            // (Never borrow the metrics twice at once: a waiting writer would deadlock it.)
            let (term, last_index) = {
                let m = self.raft.metrics();
                let m = m.borrow_watched();
                (m.current_term, m.last_log_index)
            };
            if !self.is_leader() {
                return Err(ServiceError::unavailable(
                    "this node is no longer the leader; retry",
                    self.leader(),
                ));
            }
            let (ts, seed) = self.proposer.stamp(&writer, term, last_index).await;
            let cmd = TxnCommand {
                steps: Vec::new(),
                leader_ts_micros: ts,
                seed,
                request_id: id.clone(),
                user: req.principal.as_ref().map(|p| p.user.clone()),
                executed_after: None,
            };
            // Registered before asking, so that a change meanwhile is not missed.
            let changed = runner.changed();
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match runner.begin(cmd).await {
                Ok(()) => break,
                Err(TxnRefusal::Busy(why)) if tokio::time::Instant::now() < deadline => {
                    if !said_busy && started.elapsed() > Duration::from_secs(1) {
                        said_busy = true;
                        info!(why, "BEGIN has waited over 1 s for the applier to reach the log's end");
                    }
                    debug!(why, "BEGIN waits for the applier");
                    let _ = tokio::time::timeout(BEGIN_RETRY, notified).await;
                }
                Err(TxnRefusal::Busy(why)) => {
                    return Err(ServiceError::unavailable(
                        format!("the leader's PostgreSQL did not reach the log's end within {wait:?} ({why}); retry"),
                        None,
                    ))
                }
                Err(e) => return Err(refusal_error(e)),
            }
        }
        let now = Instant::now();
        let inner = Arc::new(Mutex::new(Inner {
            svc: self.clone(),
            runner,
            id: id.clone(),
            writer: Some(writer),
            status: TxnStatus::Active,
            savepoints: Vec::new(),
            steps: 0,
            bytes: 0,
            started: now,
            last_used: now,
            ended_by: None,
        }));
        tokio::spawn(watch_limits(
            Arc::downgrade(&inner),
            self.txn_limits.clone(),
        ));
        Ok(LocalTxn { inner, id })
    }
}

impl LocalTxn {
    /// The transaction's request id.
    pub fn request_id(&self) -> &RequestId {
        &self.id
    }

    /// Where the transaction is.
    pub async fn status(&self) -> TxnStatus {
        self.inner.lock().await.status
    }

    /// Runs `f` on the transaction's state in a task of its own, so that it completes — and
    /// the state stays what PostgreSQL did — even when its caller goes away mid-way (a gRPC
    /// client that hung up, a relaying node's timeout): a statement PostgreSQL ran is always
    /// recorded as a step, and an ended transaction always releases the writer.
    async fn detached<T, F, Fut>(&self, f: F) -> Result<T, ServiceError>
    where
        F: FnOnce(tokio::sync::OwnedMutexGuard<Inner>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::spawn(async move { f(inner.lock_owned().await).await })
            .await
            .map_err(|e| ServiceError::internal(format!("the transaction's task failed: {e}")))
    }

    /// Whether it ended (`false` while a call holds it).
    pub fn is_ended(&self) -> bool {
        self.inner
            .try_lock()
            .is_ok_and(|i| i.status == TxnStatus::Ended)
    }

    /// Runs a statement (checked by the SQL gate as a write's). Its error puts the transaction
    /// in the failed state.
    pub async fn execute(&self, stmt: WriteStatement) -> Result<StatementOutcome, ServiceError> {
        self.detached(move |mut inner| async move {
            inner.usable()?;
            let checked = inner.svc.prepared_writes.prepare(&stmt.sql).map_err(|r| {
                ServiceError::refused(ErrorKind::InvalidArgument, r.sqlstate, r.message)
            });
            let checked = checked.and_then(|sql| {
                Ok(SqlStatement {
                    sql,
                    params: stmt.params?,
                })
            });
            let stmt = match checked {
                Ok(s) => s,
                Err(e) => {
                    inner.status = TxnStatus::Failed;
                    return Err(e);
                }
            };
            // The leader's checks of a write's statements against its own catalog, as for writes.
            let svc = inner.svc.clone();
            let one = std::slice::from_ref(&stmt);
            if let Err(e) = async {
                svc.check_extensions(one).await?;
                svc.check_trigger_functions(one).await
            }
            .await
            {
                inner.status = TxnStatus::Failed;
                return Err(e);
            }
            match inner
                .step(TxnStep::Statement {
                    stmt,
                    failed: false,
                })
                .await?
            {
                TxnStepResult::Done(o) => Ok(o),
                TxnStepResult::Failed(f) => {
                    inner.status = TxnStatus::Failed;
                    Err(ServiceError::sql(&f, 0))
                }
            }
        })
        .await?
    }

    /// What PostgreSQL infers for `sql` on the transaction's session (see
    /// [`Txn::describe`](super::txn_route::Txn::describe)).
    pub async fn describe(
        &self,
        sql: String,
        param_types: Vec<u32>,
    ) -> Result<Description, ServiceError> {
        self.detached(move |mut inner| async move {
            inner.usable()?;
            let described = inner.runner.describe(&inner.id, sql, param_types).await;
            inner.last_used = Instant::now();
            match described {
                Ok(Ok((param_types, columns))) => Ok(Description {
                    param_types,
                    columns,
                }),
                Ok(Err(f)) => {
                    inner.status = TxnStatus::Failed;
                    Err(ServiceError::sql(&f, 0))
                }
                Err(e) => {
                    let e = refusal_error(e);
                    inner.ended_by = Some(e.clone());
                    inner.end("aborted", "").await;
                    Err(e)
                }
            }
        })
        .await?
    }

    /// `SAVEPOINT name`.
    pub async fn savepoint(&self, name: &str) -> Result<(), ServiceError> {
        let name = name.to_string();
        self.detached(move |mut inner| async move {
            inner.usable()?;
            if name.to_ascii_lowercase().starts_with("raftpg_") {
                inner.status = TxnStatus::Failed;
                return Err(ServiceError::refused(
                    ErrorKind::InvalidArgument,
                    "42939",
                    format!("savepoint names starting with raftpg_ are reserved: \"{name}\""),
                ));
            }
            inner.step(TxnStep::Savepoint(name.to_string())).await?;
            inner.savepoints.push(name.to_string());
            Ok(())
        })
        .await?
    }

    /// `RELEASE SAVEPOINT name`.
    pub async fn release(&self, name: &str) -> Result<(), ServiceError> {
        let name = name.to_string();
        self.detached(move |mut inner| async move {
            inner.usable()?;
            let Some(at) = inner.find_savepoint(&name) else {
                inner.status = TxnStatus::Failed;
                return Err(no_savepoint(&name));
            };
            inner.step(TxnStep::Release(name.to_string())).await?;
            inner.savepoints.truncate(at);
            Ok(())
        })
        .await?
    }

    /// `ROLLBACK TO SAVEPOINT name`: also leaves the failed state.
    pub async fn rollback_to(&self, name: &str) -> Result<(), ServiceError> {
        let name = name.to_string();
        self.detached(move |mut inner| async move {
            inner.ended()?;
            let Some(at) = inner.find_savepoint(&name) else {
                inner.status = TxnStatus::Failed;
                return Err(no_savepoint(&name));
            };
            inner.step(TxnStep::RollbackTo(name.to_string())).await?;
            // The savepoint itself stays (PostgreSQL's rule); the later ones are gone.
            inner.savepoints.truncate(at + 1);
            inner.status = TxnStatus::Active;
            Ok(())
        })
        .await?
    }

    /// Why a statement would be refused now: `None` while the transaction is active; in the
    /// failed state 25P02; once a limit or the leader ended it, that reason the first time,
    /// then 25P02.
    pub async fn refusal(&self) -> Option<ServiceError> {
        let mut inner = self.inner.lock().await;
        match inner.status {
            TxnStatus::Active => None,
            TxnStatus::Failed => Some(in_failed_txn()),
            TxnStatus::Ended => inner.ended().err(),
        }
    }

    /// Puts the transaction in the failed state (an error of the client's protocol inside
    /// it, which PostgreSQL treats as any error).
    pub async fn mark_failed(&self) {
        let _ = self
            .detached(move |mut inner| async move {
                if inner.status == TxnStatus::Active {
                    inner.status = TxnStatus::Failed;
                }
            })
            .await;
    }

    /// `COMMIT`: proposes the transaction as one log entry and answers once a majority
    /// committed it and this node applied it. A failed transaction, or one a limit or the
    /// leader ended, is rolled back instead (PostgreSQL answers `ROLLBACK`).
    pub async fn commit(&self) -> Result<Committed, ServiceError> {
        self.detached(move |mut inner| async move {
            if inner.status != TxnStatus::Active {
                inner
                    .end("rolled_back", "the transaction was rolled back")
                    .await;
                return Ok(Committed {
                    log_index: 0,
                    committed: false,
                });
            }
            let answer = inner.commit().await;
            let outcome = if answer.is_ok() {
                "committed"
            } else {
                "failed"
            };
            inner.end(outcome, "the transaction ended").await;
            answer
        })
        .await?
    }

    /// `ROLLBACK`.
    pub async fn rollback(&self) {
        let _ = self
            .detached(move |mut inner| async move {
                if inner.status != TxnStatus::Ended {
                    inner
                        .end("rolled_back", "the transaction was rolled back")
                        .await;
                }
            })
            .await;
    }
}

impl Drop for LocalTxn {
    fn drop(&mut self) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut inner = inner.lock().await;
            if inner.status != TxnStatus::Ended {
                inner
                    .end(
                        "aborted",
                        "the client went away; the transaction was rolled back",
                    )
                    .await;
            }
        });
    }
}

impl Inner {
    /// Refuses use of an ended transaction: the first time with why it ended (a limit, a
    /// leadership change), then as PostgreSQL refuses statements in a failed transaction.
    fn ended(&mut self) -> Result<(), ServiceError> {
        if self.status != TxnStatus::Ended {
            return Ok(());
        }
        Err(self.ended_by.take().unwrap_or_else(in_failed_txn))
    }

    /// Refuses a statement in a failed or ended transaction.
    fn usable(&mut self) -> Result<(), ServiceError> {
        self.ended()?;
        if self.status == TxnStatus::Failed {
            return Err(in_failed_txn());
        }
        self.last_used = Instant::now();
        Ok(())
    }

    fn find_savepoint(&self, name: &str) -> Option<usize> {
        self.savepoints.iter().rposition(|s| s == name)
    }

    /// Runs a step on the state machine; a refusal there ends the transaction.
    async fn step(&mut self, step: TxnStep) -> Result<TxnStepResult, ServiceError> {
        if self.steps >= self.svc.txn_limits.steps_max {
            self.status = TxnStatus::Failed;
            return Err(ServiceError::refused(
                ErrorKind::ResourceExhausted,
                "54000",
                format!(
                    "a transaction may run at most {} statements",
                    self.svc.txn_limits.steps_max
                ),
            ));
        }
        let bytes = step_bytes(&step);
        if self.bytes + bytes > self.svc.txn_limits.bytes_max {
            self.status = TxnStatus::Failed;
            return Err(ServiceError::refused(
                ErrorKind::ResourceExhausted,
                "54000",
                format!(
                    "a transaction's log entry may hold at most {} bytes of statements (--txn-bytes-max); this one would reach {}: commit in smaller transactions",
                    self.svc.txn_limits.bytes_max,
                    self.bytes + bytes
                ),
            ));
        }
        self.steps += 1;
        self.bytes += bytes;
        // A statement may not outlive the transaction's time limit: past it, PostgreSQL is
        // asked to cancel it (the step then fails and the state machine rolls back).
        let left = self
            .svc
            .txn_limits
            .time_max
            .saturating_sub(self.started.elapsed());
        let runner = self.runner.clone();
        let id = self.id.clone();
        let running = async move { runner.step(&id, step).await };
        tokio::pin!(running);
        let timed = tokio::time::timeout(left, &mut running).await;
        let result = match timed {
            Ok(r) => r,
            Err(_) => {
                self.runner.cancel_statement().await;
                let _ = running.await;
                let e = time_limit_error(self.svc.txn_limits.time_max);
                self.ended_by = Some(e.clone());
                self.end(
                    "aborted",
                    "the transaction hit a time limit and was rolled back",
                )
                .await;
                return Err(e);
            }
        };
        self.last_used = Instant::now();
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                let e = refusal_error(e);
                self.ended_by = Some(e.clone());
                self.end("aborted", "").await;
                Err(e)
            }
        }
    }

    /// Proposes the transaction's entry and waits for its outcome.
    async fn commit(&mut self) -> Result<Committed, ServiceError> {
        let svc = self.svc.clone();
        let term = svc.term();
        if !svc.is_leader() {
            return Err(aborted("leadership changed during the transaction"));
        }
        let cmd = self
            .runner
            .prepare_commit(&self.id, term)
            .await
            .map_err(refusal_error)?;
        let (responder, answer) = openraft::impls::ProgressResponder::complete_only();
        if let Err(fatal) = svc
            .raft
            .client_write_ff(Command::Transaction(cmd), Some(responder))
            .await
        {
            return Err(ServiceError::unavailable(
                format!("raft stopped on this node: {fatal}"),
                None,
            ));
        }
        // The entry is queued: writes may be proposed behind it while Raft commits it (the
        // next BEGIN waits until PostgreSQL holds it; see `apply::state_machine::txn`).
        self.writer = None;
        let timeout = svc.limits.write_timeout;
        let unknown = |why: String| {
            ServiceError {
            hint: format!(
                "the transaction's request id is {} (seq {}): begin again with it (over the wire protocol: SET raftpg.transaction_id, without the wire: prefix) to learn whether it committed",
                self.id.client_id, self.id.seq
            ),
            ..ServiceError::new(ErrorKind::OutcomeUnknown, why)
        }
        };
        let resp = match tokio::time::timeout(timeout, answer).await {
            Err(_) => {
                return Err(unknown(format!(
                    "COMMIT was not confirmed within {timeout:?}; the transaction's outcome is unknown (it may still commit)"
                )))
            }
            Ok(Err(_)) => return Err(unknown("the node is shutting down".into())),
            Ok(Ok(Err(ClientWriteError::ForwardToLeader(_)))) => {
                return Err(aborted("leadership changed before the transaction's entry was appended"))
            }
            Ok(Ok(Err(e))) => {
                return Err(unknown(format!(
                    "leadership changed after COMMIT was proposed ({e}); the transaction's outcome is unknown (it may still commit)"
                )))
            }
            Ok(Ok(Ok(r))) => r,
        };
        let index = resp.log_id.index;
        match resp.data {
            ApplyOutcome::Applied(_) => Ok(Committed {
                log_index: index,
                committed: true,
            }),
            ApplyOutcome::Failed(f) => Err(ServiceError::sql(&f, index)),
            other => Err(ServiceError::internal(format!(
                "unexpected outcome of a transaction entry: {other:?}"
            ))),
        }
    }

    /// Ends the transaction: rolls back what is still open on the session, releases the
    /// writer.
    async fn end(&mut self, outcome: &str, why: &str) {
        if self.status == TxnStatus::Ended {
            return;
        }
        self.status = TxnStatus::Ended;
        self.runner.rollback(&self.id, why).await;
        self.writer = None;
        let m = metrics::get();
        m.txns.with_label_values(&[outcome]).inc();
        m.txn_seconds.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Ends a transaction whose client was idle longer than `idle_max`, or that is open longer than
/// `time_max`; stops when the transaction ends or its [`Txn`] is gone.
async fn watch_limits(inner: Weak<Mutex<Inner>>, limits: TxnLimits) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let at = {
            let i = strong.lock().await;
            if i.status == TxnStatus::Ended {
                return;
            }
            (i.last_used + limits.idle_max).min(i.started + limits.time_max)
        };
        drop(strong);
        tokio::time::sleep_until(at.into()).await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let mut i = strong.lock().await;
        if i.status == TxnStatus::Ended {
            return;
        }
        let now = Instant::now();
        let error = if now >= i.started + limits.time_max {
            time_limit_error(limits.time_max)
        } else if now >= i.last_used + limits.idle_max {
            ServiceError::refused(
                ErrorKind::Aborted,
                "25P03",
                format!(
                    "terminating the transaction due to idle-in-transaction timeout ({:?}, --txn-idle-max-ms)",
                    limits.idle_max
                ),
            )
        } else {
            continue;
        };
        i.ended_by = Some(error);
        i.end(
            "aborted",
            "the transaction hit a time limit and was rolled back",
        )
        .await;
        return;
    }
}

/// What a step adds to the transaction's log entry: its size as the entry encodes it (counted,
/// not kept).
fn step_bytes(step: &TxnStep) -> usize {
    /// Counts what is written to it.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counted = Counter(0);
    // (Encoding a step cannot fail; if it did, the step could not be proposed either.)
    match serde_json::to_writer(&mut counted, step) {
        Ok(()) => counted.0,
        Err(_) => usize::MAX / 2,
    }
}

/// The error of a transaction open longer than `time_max`.
fn time_limit_error(time_max: Duration) -> ServiceError {
    ServiceError::refused(
        ErrorKind::Aborted,
        "25P04",
        format!(
            "the transaction was open longer than {time_max:?} and was rolled back (limit: --txn-time-max-ms)"
        ),
    )
}

pub(super) fn in_failed_txn() -> ServiceError {
    ServiceError::refused(
        ErrorKind::FailedPrecondition,
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

fn aborted(why: &str) -> ServiceError {
    ServiceError::refused(
        ErrorKind::Aborted,
        "40001",
        format!("could not serialize the transaction: {why}; retry the transaction"),
    )
}

fn no_savepoint(name: &str) -> ServiceError {
    ServiceError::refused(
        ErrorKind::InvalidArgument,
        "3B001",
        format!("savepoint \"{name}\" does not exist"),
    )
}

/// The error a client gets for a state machine's refusal.
fn refusal_error(e: TxnRefusal) -> ServiceError {
    match e {
        TxnRefusal::Sql(f) => ServiceError::sql(&f, 0),
        TxnRefusal::Duplicate => ServiceError::refused(
            ErrorKind::AlreadyExists,
            "RP003",
            "a transaction with this request id committed before; it is not run again",
        ),
        TxnRefusal::Aborted(why) => ServiceError::refused(ErrorKind::Aborted, "40001", why),
        TxnRefusal::Busy(why) => aborted(why),
        TxnRefusal::Postgres(why) => ServiceError::unavailable(
            format!("the transaction was rolled back: the leader's PostgreSQL failed: {why}; retry the transaction"),
            None,
        ),
    }
}
