//! The applier's side of interactive transactions (docs/transactions.md): the steps of a
//! transaction run on the applier session, live on the leader and replayed from its log entry
//! everywhere else, the same way.
//!
//! A transaction runs like one write: `SAVEPOINT raftpg_entry`, its setup (timestamp, seed,
//! duplicate check, `DISCARD SEQUENCES`), the switch to its role, its steps, its end (the
//! `SET LOCAL` resets, the switch back, `raftpg.end_write`: deferred constraints fire here, at
//! `COMMIT`), `RELEASE`. Each statement runs inside a savepoint of its own (`raftpg_stmt`,
//! released or rolled back right after it), so a failed statement leaves the transaction usable
//! for `ROLLBACK TO` and for raftpg's bookkeeping; the client's own savepoints are plain
//! `SAVEPOINT` / `RELEASE` / `ROLLBACK TO` commands between them (the service checks their names
//! first, so PostgreSQL never refuses one).
//!
//! Keeps invariant 2 (same entry, same order, same result): the leader and every replay run
//! exactly the same commands for the same steps, in the same order.

use futures::FutureExt;
use tokio_postgres::error::SqlState;
use tracing::error;

use super::*;
use crate::command::{LogId, TxnCommand, TxnStep};

/// What [`Applier::txn_open`] sends first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOpenHow {
    /// `BEGIN`: the batch transaction is not open yet.
    Begin,
    /// Nothing: it runs inside the open batch transaction.
    InTransaction,
    /// `SAVEPOINT raftpg_chain`: on top of a speculation.
    Chained,
}

impl TxnOpenHow {
    /// What opens the transaction's run: its entry's savepoint (with what comes first) and no
    /// session sequence history (currval/lastval differ between nodes).
    fn sql(self) -> &'static str {
        match self {
            TxnOpenHow::Begin => "BEGIN; SAVEPOINT raftpg_entry; DISCARD SEQUENCES",
            TxnOpenHow::InTransaction => "SAVEPOINT raftpg_entry; DISCARD SEQUENCES",
            TxnOpenHow::Chained => {
                "SAVEPOINT raftpg_chain; SAVEPOINT raftpg_entry; DISCARD SEQUENCES"
            }
        }
    }
}

/// The statements among a transaction's steps.
fn statements_of(txn: &TxnCommand) -> impl Iterator<Item = &SqlStatement> {
    txn.steps.iter().filter_map(|s| match s {
        TxnStep::Statement { stmt, .. } => Some(stmt),
        _ => None,
    })
}

/// What one step of a transaction did.
#[derive(Debug)]
pub enum TxnStepResult {
    /// It ran (a savepoint command returns no rows).
    Done(StatementOutcome),
    /// It failed deterministically and was rolled back to its savepoint.
    Failed(SqlFailure),
}

/// How opening a transaction's run went.
#[derive(Debug)]
pub enum TxnOpen {
    /// Open: its steps may run.
    Opened,
    /// Its request id has a live record: it committed before (nothing of it ran; the savepoint
    /// is rolled back).
    Duplicate,
    /// Its setup failed deterministically (its role no longer exists); rolled back.
    Failed(SqlFailure),
}

const STMT_SAVEPOINT: &str = "SAVEPOINT raftpg_stmt";
const STMT_RELEASE: &str = "RELEASE SAVEPOINT raftpg_stmt";
const STMT_ROLLBACK: &str = "ROLLBACK TO SAVEPOINT raftpg_stmt; RELEASE SAVEPOINT raftpg_stmt";

/// A savepoint name as an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The outcome of a transaction entry that landed after another entry than the one it was
/// executed after: refused the same way on every node, nothing of it ran.
pub fn moved_failure() -> SqlFailure {
    failure(
        SqlState::T_R_SERIALIZATION_FAILURE.code(),
        "could not serialize the transaction: another entry reached the log before it; retry the transaction",
    )
}

impl Applier {
    /// Opens a transaction's run (see the module doc) after sending `pending`, in one round
    /// trip: `BEGIN` first when `begin`, else `SAVEPOINT raftpg_chain` first when `chained`
    /// (a transaction on top of a speculation, `state_machine::txn`).
    pub async fn txn_open(
        &mut self,
        write_no: u64,
        txn: &TxnCommand,
        limits: &ApplyLimits,
        open: TxnOpenHow,
        pending: Pending,
    ) -> Result<TxnOpen, EnvError> {
        let input = EntryInputs::of_txn(write_no, txn, limits);
        let open = open.sql();
        let client = &self.client;
        let params = input.params();
        let switch = async {
            match &txn.user {
                Some(user) => Some(self.switch_user(user).await),
                None => None,
            }
        };
        let (finished, opened, setup, switched) = tokio::join!(
            self.finish(pending),
            client.batch_execute(open),
            client.execute(&self.entry_setup, &params),
            switch
        );
        finished?;
        opened?;
        match setup {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => {
                // (The switch was refused: the transaction was aborted.)
                client.batch_execute(ROLLBACK_ENTRY).await?;
                return Ok(TxnOpen::Duplicate);
            }
            Err(e) => return Err(e.into()),
        }
        match switched {
            None | Some(Ok(_)) => Ok(TxnOpen::Opened),
            Some(Err(StmtError::Deterministic(f))) => {
                client.batch_execute(ROLLBACK_ENTRY).await?;
                Ok(TxnOpen::Failed(f))
            }
            Some(Err(StmtError::Environmental(e))) => Err(e),
        }
    }

    /// Runs one step of an open transaction. An environmental error leaves the transaction in
    /// an unknown state: the caller abandons it.
    pub async fn txn_step(
        &mut self,
        step: &TxnStep,
        limits: &ApplyLimits,
    ) -> Result<TxnStepResult, EnvError> {
        let command = match step {
            TxnStep::Statement { stmt, .. } => return self.txn_statement(stmt, limits).await,
            TxnStep::Savepoint(name) => format!("SAVEPOINT {}", ident(name)),
            TxnStep::Release(name) => format!("RELEASE SAVEPOINT {}", ident(name)),
            TxnStep::RollbackTo(name) => {
                // Statements prepared since may name objects the rollback takes away.
                if self.ddl_in_transaction {
                    self.cache.clear();
                }
                format!("ROLLBACK TO SAVEPOINT {}", ident(name))
            }
        };
        // The service checked the name against the transaction's savepoints: PostgreSQL
        // refusing it is not the client's error (and would leave the transaction aborted).
        self.client.batch_execute(&command).await?;
        Ok(TxnStepResult::Done(no_rows()))
    }

    /// A statement of a transaction inside its own savepoint.
    async fn txn_statement(
        &mut self,
        stmt: &SqlStatement,
        limits: &ApplyLimits,
    ) -> Result<TxnStepResult, EnvError> {
        let ddl = !is_dml(&stmt.sql);
        self.ddl_in_transaction |= ddl;
        let cached = match ddl {
            true => None,
            false => self.cache.get(&stmt.sql).cloned(),
        };
        let client = &self.client;
        let ran = match &cached {
            // One round trip: the savepoint, the statement and the savepoint's release — only
            // for a statement that returns no rows and whose parameters fit, so that PostgreSQL
            // is the only one that can fail it: then the release fails too (the transaction is
            // aborted) and the savepoint is still there to roll back to.
            Some(prepared)
                if prepared.columns.is_empty() && check_statement(prepared, stmt).is_ok() =>
            {
                let (saved, ran, released) = tokio::join!(
                    client.batch_execute(STMT_SAVEPOINT),
                    execute_checked(client, prepared, stmt, limits),
                    client.batch_execute(STMT_RELEASE)
                );
                saved?;
                if ran.is_ok() {
                    released?;
                }
                ran.map(|o| (o, None, true))
            }
            Some(prepared) => {
                let (saved, ran) = tokio::join!(
                    client.batch_execute(STMT_SAVEPOINT),
                    execute(client, prepared, stmt, limits)
                );
                saved?;
                ran.map(|o| (o, None, false))
            }
            None => {
                client.batch_execute(STMT_SAVEPOINT).await?;
                prepare_and_execute(client, stmt, limits)
                    .map(|r| r.map(|(o, p)| (o, Some(p), false)))
                    .await
            }
        };
        let result = match ran {
            Ok((outcome, prepared, released)) => {
                if !released {
                    self.client.batch_execute(STMT_RELEASE).await?;
                }
                if let Some(p) = prepared.filter(|_| !ddl) {
                    if self.cache.len() < STATEMENT_CACHE_MAX {
                        self.cache.insert(stmt.sql.clone(), p);
                    }
                }
                TxnStepResult::Done(outcome)
            }
            Err(StmtError::Deterministic(f)) => {
                self.client.batch_execute(STMT_ROLLBACK).await?;
                TxnStepResult::Failed(f)
            }
            Err(StmtError::Environmental(e)) => return Err(e),
        };
        if ddl {
            self.cache.clear();
        }
        Ok(result)
    }

    /// What PostgreSQL infers for `sql` inside the open transaction (the wire protocol's
    /// `Describe`, which must see what the transaction created): its parameter types and
    /// result columns. Prepared in a savepoint of its own, so that a statement PostgreSQL
    /// refuses leaves the transaction usable; nothing of it is a step (it changes nothing).
    pub async fn txn_describe(
        &mut self,
        sql: &str,
        param_types: &[u32],
    ) -> Result<Result<(Vec<u32>, Vec<ColumnInfo>), SqlFailure>, EnvError> {
        let client = &self.client;
        let (saved, prepared) = tokio::join!(
            client.batch_execute(STMT_SAVEPOINT),
            crate::pg::describe::prepare(client, sql, param_types)
        );
        saved?;
        match prepared {
            Ok(stmt) => {
                client.batch_execute(STMT_RELEASE).await?;
                Ok(Ok((
                    stmt.params().iter().map(|t| t.oid()).collect(),
                    crate::pg::describe::columns_of(&stmt),
                )))
            }
            Err(e) => match classify(e) {
                StmtError::Deterministic(f) => {
                    client.batch_execute(STMT_ROLLBACK).await?;
                    Ok(Err(f))
                }
                StmtError::Environmental(e) => Err(e),
            },
        }
    }

    /// The end of a transaction's run: its `SET LOCAL` settings back, the switch back from its
    /// role (its deferred constraints fire), `raftpg.end_write`. A failure there is the
    /// transaction's (its `COMMIT`'s error); the savepoint is still to be ended, with the
    /// `Pending` the caller builds ([`Applier::txn_pending`]).
    pub async fn txn_close(
        &mut self,
        txn: &TxnCommand,
    ) -> Result<Result<(), SqlFailure>, EnvError> {
        let statements = statements_of(txn);
        match self.end_run(statements, txn.user.is_some()).await {
            Ok(()) => Ok(Ok(())),
            Err(StmtError::Environmental(e)) => Err(e),
            Err(StmtError::Deterministic(f)) => Ok(Err(f)),
        }
    }

    /// Ends a transaction's run ([`Applier::txn_close`]) and records it — its savepoint's end,
    /// its request record and the batch's applied position `end`, leaving the batch
    /// transaction open (a speculation) — in one round trip when its end succeeds. When its
    /// end fails (the recording sent behind it was then refused), its savepoint is rolled back
    /// and the failure recorded, in a second round trip. Returns the transaction's outcome.
    pub async fn txn_close_recorded(
        &mut self,
        write_no: u64,
        txn: &TxnCommand,
        end: &BatchEnd,
    ) -> Result<ApplyOutcome, EnvError> {
        let applied = ApplyOutcome::Applied(Vec::new());
        let pending = Self::txn_pending(write_no, txn, &applied)?;
        let statements = statements_of(txn);
        let this = &*self;
        let (closed, recorded) = tokio::join!(
            this.end_run(statements, txn.user.is_some()),
            this.finish_and_record_end(pending, end)
        );
        match closed {
            Ok(()) => {
                recorded?;
                Ok(applied)
            }
            Err(StmtError::Environmental(e)) => Err(e),
            Err(StmtError::Deterministic(f)) => {
                let failed = ApplyOutcome::Failed(f);
                let pending = Self::txn_pending(write_no, txn, &failed)?;
                self.finish_and_record_end(pending, end).await?;
                Ok(failed)
            }
        }
    }

    /// What is still to be sent after a transaction's run: its savepoint's end (released when
    /// it succeeded) and its request record.
    pub fn txn_pending(
        write_no: u64,
        txn: &TxnCommand,
        outcome: &ApplyOutcome,
    ) -> Result<Pending, EnvError> {
        let end = match outcome {
            ApplyOutcome::Applied(_) => RELEASE_ENTRY,
            _ => ROLLBACK_ENTRY,
        };
        Ok(Pending {
            end: Some(end),
            records: txn_record(write_no, txn, outcome)?.into_iter().collect(),
        })
    }

    /// Applies a transaction entry as any node does (see `command::TxnCommand`): when `prev`
    /// (the log id of the entry before it) is the one it was executed after, its steps run as
    /// they ran on the leader; otherwise nothing runs and its outcome is a serialization
    /// failure. `fast` allows [`Applier::replay_fast`] when the entry qualifies. Returns the
    /// outcome and what is still to be sent.
    #[allow(clippy::too_many_arguments)]
    pub async fn apply_transaction(
        &mut self,
        write_no: u64,
        txn: &TxnCommand,
        prev: Option<LogId>,
        limits: &ApplyLimits,
        begin: bool,
        pending: Pending,
        fast: bool,
    ) -> Result<(ApplyOutcome, Pending), EnvError> {
        if txn.executed_after != prev {
            if begin {
                self.client.batch_execute("BEGIN").await?;
            }
            self.finish(pending).await?;
            let outcome = ApplyOutcome::Failed(moved_failure());
            let records = txn_record(write_no, txn, &outcome)?.into_iter().collect();
            return Ok((outcome, Pending { end: None, records }));
        }
        if let Some(plan) = fast.then(|| self.fast_plan(txn)).flatten() {
            return self
                .replay_fast(write_no, txn, &plan, limits, begin, pending)
                .await;
        }
        let how = match begin {
            true => TxnOpenHow::Begin,
            false => TxnOpenHow::InTransaction,
        };
        match self.txn_open(write_no, txn, limits, how, pending).await? {
            TxnOpen::Opened => {}
            TxnOpen::Duplicate => {
                let outcome = self
                    .recorded_outcome(&txn.request_id, write_no, limits.request_retention_writes)
                    .await?
                    .ok_or(EnvError::Inconsistent("a duplicate's record vanished"))?;
                return Ok((outcome, Pending::default()));
            }
            TxnOpen::Failed(f) => {
                let outcome = ApplyOutcome::Failed(f);
                let records = txn_record(write_no, txn, &outcome)?.into_iter().collect();
                return Ok((outcome, Pending { end: None, records }));
            }
        }
        for (i, step) in txn.steps.iter().enumerate() {
            let result = self.txn_step(step, limits).await?;
            let failed_here = matches!(result, TxnStepResult::Failed(_));
            let failed_there = matches!(step, TxnStep::Statement { failed: true, .. });
            if failed_here != failed_there {
                // Determinism is broken (a function the gate let through behaves differently
                // here): the copies may now differ, which `raftpg check` reports.
                error!(
                    write_no,
                    step = i,
                    failed_here,
                    failed_on_leader = failed_there,
                    result = ?result,
                    "a transaction step had another outcome here than on the leader"
                );
                crate::metrics::get().txn_replay_mismatches.inc();
            }
        }
        let outcome = match self.txn_close(txn).await? {
            Ok(()) => ApplyOutcome::Applied(Vec::new()),
            Err(f) => ApplyOutcome::Failed(f),
        };
        let pending = Self::txn_pending(write_no, txn, &outcome)?;
        Ok((outcome, pending))
    }
}

/// How [`Applier::replay_fast`] sends one step: a prepared statement, or a savepoint command.
enum FastStep {
    Statement(UserStatement),
    Command(String),
}

impl Applier {
    /// The steps of `txn` as [`Applier::replay_fast`] sends them, when it can: no statement
    /// failed on the leader, every statement is DML already prepared here, and its parameters
    /// fit (so that only PostgreSQL could still fail it).
    fn fast_plan(&self, txn: &TxnCommand) -> Option<Vec<FastStep>> {
        txn.steps
            .iter()
            .map(|step| match step {
                TxnStep::Statement { stmt, failed } => {
                    if *failed || !is_dml(&stmt.sql) {
                        return None;
                    }
                    let prepared = self.cache.get(&stmt.sql)?;
                    check_statement(prepared, stmt).ok()?;
                    Some(FastStep::Statement(prepared.clone()))
                }
                TxnStep::Savepoint(name) => {
                    Some(FastStep::Command(format!("SAVEPOINT {}", ident(name))))
                }
                TxnStep::Release(name) => Some(FastStep::Command(format!(
                    "RELEASE SAVEPOINT {}",
                    ident(name)
                ))),
                TxnStep::RollbackTo(name) => Some(FastStep::Command(format!(
                    "ROLLBACK TO SAVEPOINT {}",
                    ident(name)
                ))),
            })
            .collect()
    }

    /// Replays a transaction entry whose statements all succeeded on the leader in ONE round
    /// trip after `pending`: its open and setup, its role's switch, its steps without a
    /// savepoint per statement, and its end, pipelined. The same commands as
    /// [`Applier::txn_step`] sends, less the `raftpg_stmt` savepoints that only matter when a
    /// statement fails. Anything but success for every command (a statement failing here, a
    /// live duplicate, a failure at its end) gives up the batch ([`EnvError::FastRunAbandoned`]:
    /// the caller rolls it back, puts the sequences back, and applies it again the careful
    /// way, which finds the entry's real outcome).
    async fn replay_fast(
        &self,
        write_no: u64,
        txn: &TxnCommand,
        plan: &[FastStep],
        limits: &ApplyLimits,
        begin: bool,
        pending: Pending,
    ) -> Result<(ApplyOutcome, Pending), EnvError> {
        let input = EntryInputs::of_txn(write_no, txn, limits);
        let params = input.params();
        let client = &self.client;
        let open = match begin {
            true => TxnOpenHow::Begin,
            false => TxnOpenHow::InTransaction,
        }
        .sql();
        let mut steps: Vec<StepFuture<'_>> = Vec::with_capacity(plan.len() + 4);
        steps.push(Box::pin(async move {
            Step::Sql(client.batch_execute(open).await.map(|_| 0))
        }));
        let params = &params;
        let setup = &self.entry_setup;
        steps.push(Box::pin(async move {
            Step::Sql(client.execute(setup, params).await)
        }));
        if let Some(user) = &txn.user {
            steps.push(Box::pin(
                async move { Step::Stmt(self.switch_user(user).await) },
            ));
        }
        for (fast, step) in plan.iter().zip(&txn.steps) {
            match (fast, step) {
                (FastStep::Statement(prepared), TxnStep::Statement { stmt, .. }) => {
                    steps.push(Box::pin(async move {
                        Step::Stmt(execute_checked(client, prepared, stmt, limits).await)
                    }));
                }
                (FastStep::Command(sql), _) => {
                    steps.push(Box::pin(async move {
                        Step::Sql(client.batch_execute(sql).await.map(|_| 0))
                    }));
                }
                // `fast_plan` builds a statement's plan from a statement.
                (FastStep::Statement(_), _) => return Err(EnvError::FastRunAbandoned),
            }
        }
        let statements = statements_of(txn);
        let as_role = txn.user.is_some();
        steps.push(Box::pin(async move {
            Step::Stmt(self.end_run(statements, as_role).await.map(|_| no_rows()))
        }));
        let (finished, results) = tokio::join!(self.finish(pending), join_in_order(steps));
        finished?;
        if !results.iter().all(Step::succeeded) {
            return Err(EnvError::FastRunAbandoned);
        }
        let outcome = ApplyOutcome::Applied(Vec::new());
        let pending = Self::txn_pending(write_no, txn, &outcome)?;
        Ok((outcome, pending))
    }
}

/// The record of a transaction's outcome under its request id.
fn txn_record(
    write_no: u64,
    txn: &TxnCommand,
    outcome: &ApplyOutcome,
) -> Result<Option<Record>, EnvError> {
    let id = &txn.request_id;
    Ok(Some((
        id.client_id.clone(),
        request_log::seq(id),
        i64::try_from(write_no).unwrap_or(i64::MAX),
        request_log::encode(outcome).map_err(|detail| EnvError::Bookkeeping {
            what: "a transaction's outcome",
            detail,
        })?,
    )))
}

impl EntryInputs {
    fn of_txn(write_no: u64, txn: &TxnCommand, limits: &ApplyLimits) -> Self {
        EntryInputs {
            ts: txn.leader_ts_micros.to_string(),
            seed: txn.seed.to_string(),
            client_id: Some(txn.request_id.client_id.clone()),
            seq: Some(request_log::seq(&txn.request_id)),
            floor: request_log::retention_floor(write_no, limits.request_retention_writes),
        }
    }
}
