//! The applier connection: the one PostgreSQL session that applies log entries on this node.
//!
//! Owns the connection, its fixed session settings, the prepared statements of raftpg's own
//! bookkeeping, and a cache of prepared user statements. Every write entry runs inside a
//! savepoint, opened by `raftpg.begin_entry(...)` which sets the entry's deterministic inputs and
//! raises RP001 if its request id has a live record (design.md invariants 2 and 3). Two paths:
//!
//! - **Runs** ([`Applier::apply_run`]): consecutive entries whose statements are all prepared DML
//!   go in one round trip — per entry SAVEPOINT, setup, statements, RELEASE. An entry that fails
//!   in PostgreSQL (SQL error, or RP001 for a duplicate) ends the run: PostgreSQL refuses every
//!   later command with 25P02, so nothing after it ran; its savepoint is rolled back and the rest
//!   is sent again. A failure found on this side after PostgreSQL ran the statement (too many
//!   rows) cannot be undone alone: the batch is abandoned ([`EnvError::PipelineAborted`]) and re-applied
//!   entry by entry.
//! - **One entry** ([`Applier::apply_write`]): what is pending, the savepoint, the setup and
//!   every prepared statement in one round trip; statements not prepared yet (first use, DDL) are
//!   then prepared and executed one by one, so that each sees the effects of the previous ones.
//!
//! What is still to be sent for applied entries ([`Pending`]: the last savepoint's end, the
//! outcomes to record for request ids) goes first in the next round trip, or with the batch's
//! end (applied position, COMMIT). A duplicate never runs any statement, on any node, whichever
//! path it takes: nodes must consume the same sequence values.
//!
//! **Roles** (issue 16): a write with a role ([`WriteCommand::user`]) runs its statements as
//! that role — after the setup (as raftpg), `set_config('session_authorization', role, true)`;
//! after its statements, `SET CONSTRAINTS ALL IMMEDIATE` (its deferred triggers and checks fire
//! as the role) and `RESET SESSION AUTHORIZATION`, then `raftpg.end_write` as raftpg. Both are
//! steps of the write like its statements: a role that no longer exists fails the write on
//! every node alike (22023), and a rollback of the savepoint takes the switch back with the
//! rest. In a fast run the switch rides on the step before it (the group's setup or the
//! previous write's end, [`Switch::Carried`]): a failure there abandons the run, which is then
//! applied the careful way with the switch as a step of its own. The switch back never rides
//! on anything: it is a plain command, never a function a role could call. Session
//! authorization (not `SET ROLE`) makes the role the session user, so `SET ROLE`
//! inside the write reaches only the role's own memberships; the one way back to raftpg,
//! setting `session_authorization` again, is refused by the SQL gate in every form.
//!
//! Cache rule: only DML statements are cached, and an entry that contains any other statement
//! (DDL can change what a prepared statement means) empties the cache when it ends, whether it
//! succeeded or not. A "cached plan must not change result type" error is treated as
//! environmental: the connection is dropped (emptying the cache) and the batch retried, so a
//! stale cache can never become a recorded result.

use std::collections::HashMap;
use std::sync::Arc;

mod txn;
pub use txn::{moved_failure, TxnOpen, TxnOpenHow, TxnStepResult};

use futures::TryStreamExt;
use postgres_types::ToSql;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};
use tracing::debug;

use super::limits::ApplyLimits;
use crate::apply::request_log;
use crate::command::{
    ApplyOutcome, ColumnInfo, RequestId, SqlFailure, SqlStatement, StatementOutcome, WriteCommand,
};
use crate::pg::results::{decode_row, text_forms, text_wrapped, Form};
use crate::pg::sqlstate::{is_deterministic, DUPLICATE_SQLSTATE};
use crate::pg::values::{self, FIRST_NORMAL_OBJECT_ID};
use crate::sql::gate;
use crate::sql::session_rules;

/// Most prepared user statements kept per connection.
const STATEMENT_CACHE_MAX: usize = 512;

/// An error while applying that is not the entry's fault (design.md invariant 3): never an
/// entry's result. The state machine abandons the batch and applies it again — more carefully
/// for [`EnvError::FastRunAbandoned`] and [`EnvError::PipelineAborted`], after reconnecting
/// (with backoff) for every other variant.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// PostgreSQL (or the connection to it) failed in a way that is not the write's.
    #[error("{}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// There is no applier connection.
    #[error("not connected")]
    NotConnected,
    /// A write of a fast run did not succeed: roll the batch back and apply it again with a
    /// savepoint per write (see [`Applier::apply_run_fast`]).
    #[error("a write of a fast run did not succeed; applying the batch again with a savepoint per write")]
    FastRunAbandoned,
    /// A pipelined entry failed on this side after PostgreSQL ran it: roll the batch back and
    /// apply it again entry by entry (see [`Applier::apply_run`]).
    #[error("a pipelined entry failed after it ran; re-applying the batch entry by entry")]
    PipelineAborted,
    /// PostgreSQL's answers did not line up with what was sent, or the applier's own
    /// bookkeeping contradicts itself (e.g. a duplicate whose record vanished).
    #[error("{0}")]
    Inconsistent(&'static str),
    /// raftpg's bookkeeping (`raftpg.applied`, a request record) could not be encoded or
    /// decoded.
    #[error("{what}: {detail}")]
    Bookkeeping {
        /// What was being encoded or decoded.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// Entries PostgreSQL lost in a crash could not be read back from the Raft log.
    #[error("reading entries {from}..{to} to replay: {detail}")]
    ReplayRead {
        /// First index to replay.
        from: u64,
        /// End (exclusive) of the indexes to replay.
        to: u64,
        /// The log store's error.
        detail: String,
    },
    /// PostgreSQL lost entries the Raft log no longer holds.
    #[error("PostgreSQL is behind the log (applied up to {from}) but entries {from}..{to} are no longer in the log")]
    ReplayPurged {
        /// First index to replay.
        from: u64,
        /// End (exclusive) of the indexes to replay.
        to: u64,
    },
}

/// A PostgreSQL error as the applier reports it: the server's message and SQLSTATE, or the
/// client's error.
fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Failure of one statement: either the entry's result, or a reason to retry the batch.
enum StmtError {
    Deterministic(SqlFailure),
    Environmental(EnvError),
}

/// Whether an error was raised by a PL/pgSQL `RAISE` or `ASSERT` — the write's own code,
/// deterministic whatever SQLSTATE it chose (`RAISE ... USING ERRCODE = '57014'` must not
/// look like a cancel and be retried forever).
fn raised_by_plpgsql(db: &tokio_postgres::error::DbError) -> bool {
    matches!(db.routine(), Some("exec_stmt_raise" | "exec_stmt_assert"))
}

/// Whether an error says this node's PostgreSQL lacks an extension's files (`0A000` from
/// `parse_extension_control_file`): the environment of this node, not the write (the leader
/// refused the write if *it* lacked them), so the node waits until it is installed instead of
/// recording a failure the other nodes did not have.
fn extension_missing_here(db: &tokio_postgres::error::DbError) -> bool {
    db.routine() == Some("parse_extension_control_file")
}

fn failure(code: &str, message: impl Into<String>) -> SqlFailure {
    SqlFailure {
        sqlstate: code.to_string(),
        message: message.into(),
        detail: String::new(),
        hint: String::new(),
        statement_index: 0,
    }
}

fn classify(e: tokio_postgres::Error) -> StmtError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let stale_cache = db
            .message()
            .starts_with("cached plan must not change result type");
        if (is_deterministic(code) || raised_by_plpgsql(db))
            && !stale_cache
            && !extension_missing_here(db)
        {
            return StmtError::Deterministic(SqlFailure {
                sqlstate: code.to_string(),
                message: db.message().to_string(),
                detail: db.detail().unwrap_or_default().to_string(),
                hint: db.hint().unwrap_or_default().to_string(),
                statement_index: 0,
            });
        }
    }
    StmtError::Environmental(e.into())
}

/// Whether a statement is plain DML (its prepared form stays valid until the next DDL).
fn is_dml(sql: &str) -> bool {
    let word: String = sql
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(
        word.as_str(),
        "INSERT" | "UPDATE" | "DELETE" | "SELECT" | "WITH" | "VALUES" | "MERGE" | "TABLE"
    )
}

/// The applier's connection and what it keeps prepared.
pub struct Applier {
    client: Client,
    /// `raftpg.session_state()` as read when the session was set up (see session_rules).
    session_state: String,
    /// Ends every write: deferred constraints, the session check (see [`END_WRITE_SQL`]).
    end_write: Statement,
    fetch_live: Statement,
    entry_setup: Statement,
    record_many: Statement,
    /// A fast run's setups ([`fast_setup_sql`]): without and with the switch to the write's
    /// role, and the same with the run's duplicate check in front (its first write's setup).
    fast_setup: Statement,
    fast_setup_as: Statement,
    fast_setup_check: Statement,
    fast_setup_check_as: Statement,
    /// [`END_WRITE_SQL`] that then switches to the next write's role.
    end_write_as: Statement,
    /// [`RECORD_APPLIED_SQL`], and the variants: with the roles (a batch that ran DDL), with
    /// request records (one statement for both, see [`Applier::finish_and_record_end`]).
    record_applied: Statement,
    record_applied_roles: Statement,
    record_all: Statement,
    record_all_roles: Statement,
    /// Makes the rest of a write run as its role (see the module doc, "Roles").
    switch_user: Statement,
    cache: HashMap<String, UserStatement>,
    /// The open transaction ran DDL: statements cached since may refer to objects that a
    /// rollback takes away.
    ddl_in_transaction: bool,
    /// A transaction that ran DDL committed since [`Applier::take_committed_ddl`] last looked.
    committed_ddl: bool,
}

/// Where a write's switch to its role ([`WriteCommand::user`]) is made.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Switch {
    /// A step of its own, before its statements, whose failure is the write's (a role that no
    /// longer exists fails the write on every node alike): the careful paths.
    Own,
    /// Carried by the step before: the fast setup of its group, or the previous write's end.
    /// A failure there abandons the fast run, which is then applied the careful way, where
    /// the switch is `Own` again. Saves a pipelined step per write.
    Carried,
}

/// One write of a run: its write number (see `request_log`), the write, and its statements
/// prepared on the applier connection (see [`Applier::pipelineable`]).
pub type RunWrite<'a> = (u64, &'a WriteCommand, Vec<UserStatement>);

/// The end of a batch transaction, pipelined with its last entry: record the applied log
/// position (invariant 1) and commit.
pub struct BatchEnd {
    /// Last applied log index.
    pub log_index: i64,
    /// Writes applied up to it.
    pub writes: i64,
    /// Last applied log id (JSON).
    pub log_id: serde_json::Value,
    /// Last membership (JSON).
    pub membership: serde_json::Value,
}

/// Records the batch's end in the batch's own transaction (invariant 1), with the exact
/// position `(last_value, is_called)` of every sequence (restored after a PostgreSQL crash or an
/// aborted batch, either of which can make sequences skip values on one node only).
const RECORD_APPLIED_SQL: &str = "
    UPDATE raftpg.applied SET log_index = $1, log_id = $2, membership = $3, writes = $4,
        sequences = raftpg.sequence_positions()";

/// [`RECORD_APPLIED_SQL`] that also records the state of the user roles (see `apply::roles`:
/// it travels with snapshots), for a batch that ran a statement other than DML. Only such a
/// statement can change roles: the gate refuses role statements inside function bodies and
/// their dynamic SQL (`sql::gate`, `check_body`), and [`is_dml`] counts anything it does not
/// recognize as not DML. Recording it with every batch cost a `pg_authid` scan and a JSON
/// document per batch on every node.
const RECORD_APPLIED_ROLES_SQL: &str = "
    UPDATE raftpg.applied SET log_index = $1, log_id = $2, membership = $3, writes = $4,
        sequences = raftpg.sequence_positions(), roles = raftpg.record_roles()";

impl Applier {
    /// Connects and sets the session up (bootstrap of raftpg's schema is the caller's).
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Self, EnvError> {
        // The fixed settings are startup options, so they are also the values `SET LOCAL x TO
        // DEFAULT` restores (see session_rules).
        let mut config = config.clone();
        config.options(session_rules::startup_options());
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "applier connection closed");
            }
        });
        Ok(Applier {
            session_state: String::new(),
            end_write: client.prepare("SELECT 1").await?,
            fetch_live: client.prepare("SELECT 1").await?,
            entry_setup: client.prepare("SELECT 1").await?,
            record_many: client.prepare("SELECT 1").await?,
            fast_setup: client.prepare("SELECT 1").await?,
            fast_setup_as: client.prepare("SELECT 1").await?,
            fast_setup_check: client.prepare("SELECT 1").await?,
            fast_setup_check_as: client.prepare("SELECT 1").await?,
            end_write_as: client.prepare("SELECT 1").await?,
            switch_user: client.prepare("SELECT 1").await?,
            record_applied: client.prepare("SELECT 1").await?,
            record_applied_roles: client.prepare("SELECT 1").await?,
            record_all: client.prepare("SELECT 1").await?,
            record_all_roles: client.prepare("SELECT 1").await?,
            client,
            cache: HashMap::new(),
            ddl_in_transaction: false,
            committed_ddl: false,
        })
    }

    /// Prepares raftpg's bookkeeping statements (after the schema exists) and reads the session
    /// state every write must leave as it found it.
    pub async fn prepare_bookkeeping(&mut self) -> Result<(), EnvError> {
        self.session_state = self
            .client
            .query_one("SELECT raftpg.session_state()", &[])
            .await?
            .get(0);
        self.end_write = self.client.prepare(END_WRITE_SQL).await?;
        self.fetch_live = self.client.prepare(request_log::FETCH_LIVE_SQL).await?;
        self.entry_setup = self.client.prepare(ENTRY_SETUP_SQL).await?;
        self.record_many = self
            .client
            .prepare(&request_log::record_many_sql(1))
            .await?;
        self.fast_setup = self.client.prepare(&fast_setup_sql(false, false)).await?;
        self.fast_setup_as = self.client.prepare(&fast_setup_sql(false, true)).await?;
        self.fast_setup_check = self.client.prepare(&fast_setup_sql(true, false)).await?;
        self.fast_setup_check_as = self.client.prepare(&fast_setup_sql(true, true)).await?;
        self.end_write_as = self.client.prepare(END_WRITE_AS_SQL).await?;
        self.record_applied = self.client.prepare(RECORD_APPLIED_SQL).await?;
        self.record_applied_roles = self.client.prepare(RECORD_APPLIED_ROLES_SQL).await?;
        self.record_all = self
            .client
            .prepare(&with_records(RECORD_APPLIED_SQL))
            .await?;
        self.record_all_roles = self
            .client
            .prepare(&with_records(RECORD_APPLIED_ROLES_SQL))
            .await?;
        self.switch_user = self.client.prepare(SWITCH_USER_SQL).await?;
        Ok(())
    }

    /// The connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The recorded outcome of `id` if it is still live for the write numbered `write_no`.
    pub async fn recorded_outcome(
        &self,
        id: &RequestId,
        write_no: u64,
        retention: u64,
    ) -> Result<Option<ApplyOutcome>, EnvError> {
        let floor = request_log::retention_floor(write_no, retention);
        let row = self
            .client
            .query_opt(
                &self.fetch_live,
                &[&id.client_id, &request_log::seq(id), &floor],
            )
            .await?;
        row.map(|r| {
            request_log::decode(r.get(0)).map_err(|detail| EnvError::Bookkeeping {
                what: "a request record",
                detail,
            })
        })
        .transpose()
    }

    /// The outcome to answer for a write committed to PostgreSQL before: its recorded outcome
    /// if it has a request id (and the record is live), else [`ApplyOutcome::AppliedResultLost`].
    pub async fn outcome_applied_before(
        &self,
        cmd: &WriteCommand,
        write_no: u64,
        retention: u64,
    ) -> Result<ApplyOutcome, EnvError> {
        Ok(match &cmd.request_id {
            Some(id) => self
                .recorded_outcome(id, write_no, retention)
                .await?
                .unwrap_or(ApplyOutcome::AppliedResultLost),
            None => ApplyOutcome::AppliedResultLost,
        })
    }

    /// Sends what is pending for the entries applied so far and, with `end`, records the
    /// batch's applied position and commits — in one round trip.
    pub async fn flush(
        &mut self,
        pending: Pending,
        end: Option<&BatchEnd>,
    ) -> Result<(), EnvError> {
        let this = &*self;
        let commit = async {
            match end {
                Some(_) => this
                    .client
                    .batch_execute("COMMIT")
                    .await
                    .map_err(EnvError::from),
                None => Ok(()),
            }
        };
        let finish = async {
            match end {
                Some(end) => this.finish_and_record_end(pending, end).await,
                None => this.finish(pending).await,
            }
        };
        let (finished, committed) = tokio::join!(finish, commit);
        finished?;
        committed?;
        if end.is_some() {
            self.committed_ddl |= std::mem::take(&mut self.ddl_in_transaction);
        }
        Ok(())
    }

    /// Sends what is pending for the entries applied so far and records the batch's applied
    /// position, in one round trip, leaving the transaction open: a speculation
    /// (`state_machine`, docs/write-path.md) committed by [`Applier::commit`] or rolled back by
    /// [`Applier::abandon_transaction`].
    pub async fn flush_uncommitted(
        &mut self,
        pending: Pending,
        end: &BatchEnd,
    ) -> Result<(), EnvError> {
        self.finish_and_record_end(pending, end).await
    }

    /// Sends the end of the last entry's savepoint (if still open), then records the outcomes
    /// still pending and the batch's applied position in ONE statement ([`RECORD_APPLIED_SQL`],
    /// with the roles when the batch ran DDL, which may have changed them, behind the records'
    /// INSERT as a data-modifying CTE): a statement costs PostgreSQL more than either does.
    async fn finish_and_record_end(
        &self,
        pending: Pending,
        end: &BatchEnd,
    ) -> Result<(), EnvError> {
        let ended = async {
            match pending.end {
                Some(sql) => self.client.batch_execute(sql).await,
                None => Ok(()),
            }
        };
        let recorded = async {
            let mut params: Vec<&(dyn ToSql + Sync)> =
                vec![&end.log_index, &end.log_id, &end.membership, &end.writes];
            let records = RecordArrays::of(&pending.records);
            let statement = match (records.is_empty(), self.ddl_in_transaction) {
                (true, false) => &self.record_applied,
                (true, true) => &self.record_applied_roles,
                (false, roles) => {
                    params.extend(records.params());
                    if roles {
                        &self.record_all_roles
                    } else {
                        &self.record_all
                    }
                }
            };
            self.client.execute(statement, &params).await
        };
        let (ended, recorded) = tokio::join!(ended, recorded);
        ended?;
        recorded?;
        Ok(())
    }

    /// Commits the transaction [`Applier::flush_uncommitted`] left open. (Its last statement
    /// succeeded, so the transaction is not in the failed state, which `COMMIT` would turn into
    /// a rollback without an error.)
    pub async fn commit(&mut self) -> Result<(), EnvError> {
        self.client.batch_execute("COMMIT").await?;
        self.committed_ddl |= std::mem::take(&mut self.ddl_in_transaction);
        Ok(())
    }

    /// Whether a transaction that ran DDL committed since the last call.
    pub fn take_committed_ddl(&mut self) -> bool {
        std::mem::take(&mut self.committed_ddl)
    }

    /// Sends the end of the last entry's savepoint (if still open) and the outcomes to record.
    async fn finish(&self, pending: Pending) -> Result<(), EnvError> {
        let end = async {
            match pending.end {
                Some(sql) => self.client.batch_execute(sql).await,
                None => Ok(()),
            }
        };
        let records = async {
            let records = RecordArrays::of(&pending.records);
            if records.is_empty() {
                return Ok(0);
            }
            self.client
                .execute(&self.record_many, &records.params())
                .await
        };
        let (ended, recorded) = tokio::join!(end, records);
        ended?;
        recorded?;
        Ok(())
    }

    /// The prepared statements of `cmd` if it can run in a pipeline with other entries: plain
    /// DML, every statement prepared already, and its parameters valid for them (so that no
    /// client-side check can stop it half-way).
    pub fn pipelineable(&self, cmd: &WriteCommand) -> Option<Vec<UserStatement>> {
        if cmd.statements.is_empty()
            || cmd.statements.iter().any(|s| !is_dml(&s.sql))
            || reads_session_sequences(cmd)
        {
            return None;
        }
        let prepared: Vec<UserStatement> = cmd
            .statements
            .iter()
            .map(|s| self.cache.get(&s.sql).cloned())
            .collect::<Option<_>>()?;
        prepared
            .iter()
            .zip(&cmd.statements)
            .all(|(p, s)| check_statement(p, s).is_ok())
            .then_some(prepared)
    }

    /// Applies a run of pipelineable entries in one round trip: per entry its savepoint, its
    /// setup (deterministic inputs; a live duplicate request raises [`DUPLICATE_SQLSTATE`]),
    /// its statements and the savepoint's release, all sent at once after `pending`.
    ///
    /// Each write of `run` comes with its write number (see `request_log`) and its prepared
    /// statements. No request id may appear twice in `run`. An entry whose statement fails (or
    /// which is a duplicate) ends the run: PostgreSQL aborted the subtransaction, so nothing
    /// after it ran (every later command failed with 25P02); its savepoint is rolled back with
    /// the next round trip. Returns the outcomes of the entries applied (at least one) and what
    /// is still to be sent. A check that fails on this side after its statement ran (too many
    /// rows) cannot be undone alone: that is returned as [`EnvError::PipelineAborted`] and the
    /// batch is re-applied entry by entry.
    pub async fn apply_run(
        &mut self,
        run: &[RunWrite<'_>],
        limits: &ApplyLimits,
        begin: bool,
        pending: Pending,
    ) -> Result<(Vec<ApplyOutcome>, Pending), EnvError> {
        let inputs = EntryInputs::of_run(run, limits);
        let steps = self.run_steps(run, &inputs, limits, begin);
        let (finished, results) = tokio::join!(self.finish(pending), join_in_order(steps));
        finished?;

        let mut results = results.into_iter();
        let mut outcomes = Vec::with_capacity(run.len());
        let mut next = Pending::default();
        for (write_no, cmd, prepared) in run {
            match run_write_result(&mut results, prepared.len(), cmd.user.is_some(), limits)? {
                RunWriteResult::Applied(stmt_outcomes) => {
                    let outcome = ApplyOutcome::Applied(stmt_outcomes);
                    next.records.extend(record_of(*write_no, cmd, &outcome)?);
                    outcomes.push(outcome);
                }
                RunWriteResult::Failed(f) => {
                    let outcome = ApplyOutcome::Failed(f);
                    next.records.extend(record_of(*write_no, cmd, &outcome)?);
                    next.end = Some(ROLLBACK_ENTRY);
                    outcomes.push(outcome);
                    break;
                }
                RunWriteResult::Duplicate => {
                    // A live duplicate: nothing of it ran; answer with the recorded outcome.
                    let outcome = self
                        .rollback_duplicate(&mut next, *write_no, cmd, limits)
                        .await?;
                    outcomes.push(outcome);
                    break;
                }
            }
        }
        // Whatever followed the entry that ended the run must have been refused by PostgreSQL.
        if results.any(|rest| rest.succeeded()) {
            return Err(EnvError::PipelineAborted);
        }
        Ok((outcomes, next))
    }

    /// The commands of a pipelined run (see [`Applier::apply_run`]), in the order they are
    /// sent: per entry open (with `BEGIN` first when `begin`), setup, statements, the write's
    /// end, release.
    fn run_steps<'s>(
        &'s self,
        run: &'s [RunWrite<'_>],
        inputs: &'s [EntryInputs],
        limits: &'s ApplyLimits,
        begin: bool,
    ) -> Vec<StepFuture<'s>> {
        let client = &self.client;
        let entry_setup = &self.entry_setup;
        let mut steps: Vec<StepFuture<'s>> = Vec::new();
        for (k, ((_, cmd, prepared), input)) in run.iter().zip(inputs).enumerate() {
            let open = if begin && k == 0 {
                "BEGIN; SAVEPOINT raftpg_entry"
            } else {
                "SAVEPOINT raftpg_entry"
            };
            steps.push(Box::pin(async move {
                Step::Sql(client.batch_execute(open).await.map(|_| 0))
            }));
            steps.push(Box::pin(async move {
                Step::Sql(client.execute(entry_setup, &input.params()).await)
            }));
            self.push_write_steps(&mut steps, cmd, prepared, limits, Switch::Own, None);
            steps.push(Box::pin(async move {
                Step::Sql(client.batch_execute(RELEASE_ENTRY).await.map(|_| 0))
            }));
        }
        steps
    }

    /// Ends a live duplicate's savepoint (rolled back: nothing of it ran) with what `next`
    /// still held, and returns its recorded outcome. `next` is left empty.
    async fn rollback_duplicate(
        &self,
        next: &mut Pending,
        write_no: u64,
        cmd: &WriteCommand,
        limits: &ApplyLimits,
    ) -> Result<ApplyOutcome, EnvError> {
        next.end = Some(ROLLBACK_ENTRY);
        self.finish(std::mem::take(next)).await?;
        self.duplicate_outcome(write_no, cmd, limits).await
    }

    /// Applies a run of pipelineable writes the fast way, in one round trip after `pending`: no
    /// savepoint, one check that none of the run's request ids has a live record, then per write
    /// its deterministic inputs and its statements. Anything but success for every write — a SQL
    /// error, a duplicate, a check failing on this side — gives up the whole batch transaction
    /// ([`EnvError::FastRunAbandoned`]: the caller rolls it back and applies the batch again
    /// with a savepoint per write, which finds each write's real outcome). Returns the outcomes
    /// and what is still to be sent (the request records).
    pub async fn apply_run_fast(
        &mut self,
        run: &[RunWrite<'_>],
        limits: &ApplyLimits,
        begin: bool,
        pending: Pending,
    ) -> Result<(Vec<ApplyOutcome>, Pending), EnvError> {
        let inputs = EntryInputs::of_run(run, limits);
        let ids = RunRequestIds::of(&inputs);
        let (steps, setups) = self.fast_run_steps(run, &inputs, &ids, limits, begin);
        let (finished, results) = tokio::join!(self.finish(pending), join_in_order(steps));
        finished?;

        let mut results = results.into_iter();
        if begin {
            results.next().map(Step::sql).transpose()?;
        }
        let mut outcomes = Vec::with_capacity(run.len());
        let mut next = Pending::default();
        for ((write_no, cmd, prepared), setup) in run.iter().zip(setups) {
            let stmt_outcomes = fast_write_result(
                &mut results,
                setup,
                prepared.len(),
                cmd.user.is_some(),
                limits,
            )?;
            let outcome = ApplyOutcome::Applied(stmt_outcomes);
            next.records.extend(record_of(*write_no, cmd, &outcome)?);
            outcomes.push(outcome);
        }
        Ok((outcomes, next))
    }

    /// The commands of a fast run (see [`Applier::apply_run_fast`]), in the order they are
    /// sent: `BEGIN` when `begin`, then per write its setup (only when its inputs differ from
    /// the previous write's; the first write's also checks, when a write of the run has a
    /// request id, that none has a live record), statements and end. Also returns, per write,
    /// whether its setup was sent.
    fn fast_run_steps<'s>(
        &'s self,
        run: &'s [RunWrite<'_>],
        inputs: &'s [EntryInputs],
        ids: &'s RunRequestIds<'s>,
        limits: &'s ApplyLimits,
        begin: bool,
    ) -> (Vec<StepFuture<'s>>, Vec<bool>) {
        let client = &self.client;
        let mut steps: Vec<StepFuture<'s>> = Vec::new();
        if begin {
            steps.push(Box::pin(async move {
                Step::Sql(client.batch_execute("BEGIN").await.map(|_| 0))
            }));
        }
        // The writes of a batch entry share its inputs: set them once for the group (the setup
        // would change nothing for the others).
        let setups: Vec<bool> = run
            .iter()
            .enumerate()
            .map(|(i, (_, cmd, _))| {
                i == 0 || {
                    let prev = run[i - 1].1;
                    (prev.leader_ts_micros, prev.seed) != (cmd.leader_ts_micros, cmd.seed)
                }
            })
            .collect();
        for (i, ((_, cmd, prepared), input)) in run.iter().zip(inputs).enumerate() {
            let user = cmd.user.as_deref();
            if setups[i] {
                // The setup also switches to the write's role (see `Switch::Carried`); the
                // first one makes the run's duplicate check, whose count is its step's result.
                let check = i == 0 && !ids.is_empty();
                let statement = match (check, user.is_some()) {
                    (false, false) => &self.fast_setup,
                    (false, true) => &self.fast_setup_as,
                    (true, false) => &self.fast_setup_check,
                    (true, true) => &self.fast_setup_check_as,
                };
                steps.push(Box::pin(async move {
                    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&input.ts, &input.seed];
                    if check {
                        params.extend([&ids.cids as &(dyn ToSql + Sync), &ids.seqs, &ids.floors]);
                    }
                    if let Some(u) = &user {
                        params.push(u);
                    }
                    let done = if check {
                        client
                            .query_one(statement, &params)
                            .await
                            .map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(u64::MAX))
                    } else {
                        client.execute(statement, &params).await.map(|_| 0)
                    };
                    Step::Sql(done)
                }));
            }
            // The next write's switch rides on this write's end unless its setup carries it.
            let next_user = run
                .get(i + 1)
                .filter(|_| !setups[i + 1])
                .and_then(|(_, next, _)| next.user.as_deref());
            self.push_write_steps(
                &mut steps,
                cmd,
                prepared,
                limits,
                Switch::Carried,
                next_user,
            );
        }
        (steps, setups)
    }

    /// Rolls the batch transaction back and puts every sequence back where the last committed
    /// batch left it (statements of the abandoned transaction may have consumed values).
    pub async fn abandon_transaction(
        &mut self,
        restore_sequences_sql: &str,
    ) -> Result<(), EnvError> {
        if std::mem::take(&mut self.ddl_in_transaction) {
            self.cache.clear();
        }
        self.client.batch_execute("ROLLBACK").await?;
        self.client.query_one(restore_sequences_sql, &[]).await?;
        Ok(())
    }

    /// Rolls the open transaction back through its `levels` innermost `raftpg_chain`
    /// savepoints (what ran on top of a speculation's kept part; `state_machine::txn`), ending
    /// them, then puts the sequences back where the records of what stays say.
    pub async fn rollback_chain(
        &mut self,
        levels: usize,
        restore_sequences_sql: &str,
    ) -> Result<(), EnvError> {
        if levels == 0 {
            return Ok(());
        }
        if self.ddl_in_transaction {
            // What it prepared may name objects the rollback takes away; whether what stays
            // ran DDL too is unknown, so the flag stays.
            self.cache.clear();
        }
        let one = "ROLLBACK TO SAVEPOINT raftpg_chain; RELEASE SAVEPOINT raftpg_chain; ";
        self.client.batch_execute(&one.repeat(levels)).await?;
        self.client.query_one(restore_sequences_sql, &[]).await?;
        Ok(())
    }

    /// Adds a write's statements to `steps` — between its role's switches when it has a role
    /// — and its end (see the module doc). `pipelineable` checked the parameters when it built
    /// the run.
    fn push_write_steps<'s>(
        &'s self,
        steps: &mut Vec<StepFuture<'s>>,
        cmd: &'s WriteCommand,
        prepared: &'s [UserStatement],
        limits: &'s ApplyLimits,
        switch: Switch,
        next_user: Option<&'s str>,
    ) {
        let client = &self.client;
        if let (Some(user), Switch::Own) = (&cmd.user, switch) {
            steps.push(Box::pin(
                async move { Step::Stmt(self.switch_user(user).await) },
            ));
        }
        for (p, st) in prepared.iter().zip(&cmd.statements) {
            steps.push(Box::pin(async move {
                Step::Stmt(execute_checked(client, p, st, limits).await)
            }));
        }
        if cmd.user.is_some() {
            steps.push(Box::pin(
                async move { Step::Stmt(self.unswitch_user().await) },
            ));
        }
        steps.push(Box::pin(async move {
            Step::Stmt(match next_user {
                None => self.end_write().await,
                Some(next) => self.end_write_then_switch(next).await,
            })
        }));
    }

    /// Switches the session to `user` for the write's statements (see the module doc,
    /// "Roles"); its failure is the write's, like a statement's.
    async fn switch_user(&self, user: &str) -> Result<StatementOutcome, StmtError> {
        self.client
            .execute(&self.switch_user, &[&user])
            .await
            .map_err(classify)?;
        Ok(no_rows())
    }

    /// Ends the write's run as its role (see [`UNSWITCH_USER`]); its failure (a deferred
    /// constraint) is the write's.
    async fn unswitch_user(&self) -> Result<StatementOutcome, StmtError> {
        self.client
            .batch_execute(UNSWITCH_USER)
            .await
            .map_err(classify)?;
        Ok(no_rows())
    }

    /// Ends a write (see [`END_WRITE_SQL`]); its failure is the write's, like a statement's.
    async fn end_write(&self) -> Result<StatementOutcome, StmtError> {
        self.client
            .execute(&self.end_write, &[&self.session_state])
            .await
            .map_err(classify)?;
        Ok(StatementOutcome {
            rows_affected: 0,
            columns: Vec::new(),
            rows: Vec::new(),
        })
    }

    /// Ends a write and switches to the next write's role (fast runs only, see
    /// [`Switch::Carried`]).
    async fn end_write_then_switch(&self, next: &str) -> Result<StatementOutcome, StmtError> {
        self.client
            .execute(&self.end_write_as, &[&self.session_state, &next])
            .await
            .map_err(classify)?;
        Ok(no_rows())
    }

    /// The recorded outcome of a live duplicate of `cmd` (its savepoint already rolled back).
    async fn duplicate_outcome(
        &self,
        write_no: u64,
        cmd: &WriteCommand,
        limits: &ApplyLimits,
    ) -> Result<ApplyOutcome, EnvError> {
        let id = cmd
            .request_id
            .as_ref()
            .ok_or_else(|| EnvError::Inconsistent("duplicate without a request id"))?;
        if let Some(id) = &cmd.request_id {
            debug!(write_no, client_id = %id.client_id, seq = id.seq, "duplicate request: returning its recorded outcome");
        }
        self.recorded_outcome(id, write_no, limits.request_retention_writes)
            .await?
            .ok_or_else(|| EnvError::Inconsistent("a duplicate's record vanished"))
    }

    /// Applies one write entry on its own: all its statements or none, at most once per request
    /// id. `begin` opens the batch transaction first; `pending` is sent in the same round trip.
    /// Statements not prepared yet are prepared and run one by one after that round trip, so
    /// that each sees the effects of the previous ones (DDL). Returns the outcome and what is
    /// still to be sent. See the module doc.
    pub async fn apply_write(
        &mut self,
        write_no: u64,
        cmd: &WriteCommand,
        limits: &ApplyLimits,
        begin: bool,
        pending: Pending,
    ) -> Result<(ApplyOutcome, Pending), EnvError> {
        let ddl = cmd.statements.iter().any(|s| !is_dml(&s.sql));
        self.ddl_in_transaction |= ddl;
        let cached: Vec<UserStatement> = if ddl {
            Vec::new()
        } else {
            cmd.statements
                .iter()
                .map_while(|s| self.cache.get(&s.sql).cloned())
                .collect()
        };
        let input = EntryInputs::new(write_no, cmd, limits);
        let first = self
            .open_write(&input, cmd, &cached, limits, begin, pending)
            .await?;
        let Some(results) = first else {
            if ddl {
                self.cache.clear();
            }
            let mut next = Pending::default();
            let outcome = self
                .rollback_duplicate(&mut next, write_no, cmd, limits)
                .await?;
            return Ok((outcome, next));
        };
        let mut result = self.run_write_statements(cmd, results, limits, ddl).await?;
        if let Ok(outcomes) = result {
            result = self.end_applied_write(cmd, outcomes, limits).await?;
        }
        if ddl {
            self.cache.clear();
        }
        let (end, outcome) = match result {
            Ok(outcomes) => (RELEASE_ENTRY, ApplyOutcome::Applied(outcomes)),
            Err(f) => (ROLLBACK_ENTRY, ApplyOutcome::Failed(f)),
        };
        let next = Pending {
            end: Some(end),
            records: record_of(write_no, cmd, &outcome)?.into_iter().collect(),
        };
        Ok((outcome, next))
    }

    /// The first round trip of [`Applier::apply_write`]: what is pending, the savepoint (with
    /// `BEGIN` first when `begin`), the setup (a duplicate raises), and every statement already
    /// prepared (`cached`, a prefix of the write's). Returns the results of the prepared
    /// statements, or `None` for a live duplicate.
    async fn open_write(
        &self,
        input: &EntryInputs,
        cmd: &WriteCommand,
        cached: &[UserStatement],
        limits: &ApplyLimits,
        begin: bool,
        pending: Pending,
    ) -> Result<Option<Vec<Result<StatementOutcome, StmtError>>>, EnvError> {
        // currval()/lastval() read the session's sequence history, which differs between nodes
        // (reconnects, batching): the write starts with none.
        let open = match (begin, reads_session_sequences(cmd)) {
            (true, false) => "BEGIN; SAVEPOINT raftpg_entry",
            (false, false) => "SAVEPOINT raftpg_entry",
            (true, true) => "BEGIN; SAVEPOINT raftpg_entry; DISCARD SEQUENCES",
            (false, true) => "SAVEPOINT raftpg_entry; DISCARD SEQUENCES",
        };
        let client = &self.client;
        let execs = join_in_order(
            cached
                .iter()
                .zip(&cmd.statements)
                .map(|(prepared, s)| execute(client, prepared, s, limits))
                .collect(),
        );
        let params = input.params();
        let switch = async {
            match &cmd.user {
                Some(user) => self.switch_user(user).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let (finished, opened, setup, switched, results) = tokio::join!(
            self.finish(pending),
            client.batch_execute(open),
            client.execute(&self.entry_setup, &params),
            switch,
            execs
        );
        finished?;
        opened?;
        match setup {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        match switched {
            Ok(()) => Ok(Some(results)),
            // The role is gone: the write's failure, on its first statement (the statements
            // sent after the switch were refused, 25P02).
            Err(StmtError::Deterministic(f)) => Ok(Some(vec![Err(StmtError::Deterministic(f))])),
            Err(StmtError::Environmental(e)) => Err(e),
        }
    }

    /// Runs a write's statements after its first round trip: takes the results of the prepared
    /// ones (`results`), then prepares and runs the rest one by one (each may depend on the
    /// effects of the previous ones), caching them unless the write has DDL. Returns their
    /// outcomes, or the write's deterministic failure.
    async fn run_write_statements(
        &mut self,
        cmd: &WriteCommand,
        mut results: Vec<Result<StatementOutcome, StmtError>>,
        limits: &ApplyLimits,
        ddl: bool,
    ) -> Result<WriteResult, EnvError> {
        for (i, r) in results.iter_mut().enumerate() {
            if let Err(StmtError::Deterministic(f)) = r {
                f.statement_index = u32::try_from(i).unwrap_or(u32::MAX);
                return Ok(Err(f.clone()));
            }
        }
        let mut outcomes = Vec::with_capacity(cmd.statements.len());
        for r in results {
            match r {
                Ok(o) => outcomes.push(o),
                Err(StmtError::Environmental(e)) => return Err(e),
                Err(StmtError::Deterministic(_)) => {
                    return Err(EnvError::Inconsistent("statement result changed"))
                }
            }
        }
        for (i, s) in cmd.statements.iter().enumerate().skip(outcomes.len()) {
            match prepare_and_execute(&self.client, s, limits).await {
                Ok((o, prepared)) => {
                    if !ddl && self.cache.len() < STATEMENT_CACHE_MAX {
                        self.cache.insert(s.sql.clone(), prepared);
                    }
                    outcomes.push(o);
                }
                Err(StmtError::Environmental(e)) => return Err(e),
                Err(StmtError::Deterministic(mut f)) => {
                    f.statement_index = u32::try_from(i).unwrap_or(u32::MAX);
                    return Ok(Err(f));
                }
            }
        }
        Ok(Ok(outcomes))
    }

    /// The end of a run of `statements` (a write's, or an interactive transaction's), pipelined:
    /// every setting they named with `SET LOCAL` back to the applier's, the switch back from the
    /// role (`as_role`; its deferred constraints fire as the role), then `raftpg.end_write`.
    async fn end_run<'a>(
        &self,
        statements: impl Iterator<Item = &'a SqlStatement>,
        as_role: bool,
    ) -> Result<(), StmtError> {
        let resets = set_local_resets(statements);
        let reset = async {
            match resets.is_empty() {
                true => Ok(()),
                false => self.client.batch_execute(&resets).await.map_err(classify),
            }
        };
        let unswitch = async {
            match as_role {
                true => self.unswitch_user().await.map(|_| ()),
                false => Ok(()),
            }
        };
        let (reset, unswitched, ended) = tokio::join!(reset, unswitch, self.end_write());
        reset.and(unswitched).and(ended).map(|_| ())
    }

    /// The end of a write whose statements succeeded: the limit on the rows it returns, then
    /// the settings it named with `SET LOCAL` back to the applier's, its deferred constraints
    /// and the session check (see [`END_WRITE_SQL`]). A failure of its end is reported on its
    /// last statement.
    async fn end_applied_write(
        &self,
        cmd: &WriteCommand,
        outcomes: Vec<StatementOutcome>,
        limits: &ApplyLimits,
    ) -> Result<WriteResult, EnvError> {
        if let Some(f) = result_too_large(&outcomes, limits) {
            return Ok(Err(f));
        }
        let ended = self
            .end_run(cmd.statements.iter(), cmd.user.is_some())
            .await;
        match ended {
            Ok(()) => Ok(Ok(outcomes)),
            Err(StmtError::Environmental(e)) => Err(e),
            Err(StmtError::Deterministic(mut f)) => {
                f.statement_index =
                    u32::try_from(cmd.statements.len().saturating_sub(1)).unwrap_or(u32::MAX);
                Ok(Err(f))
            }
        }
    }
}

/// What a write run on its own produced: its statements' outcomes, or its deterministic
/// failure.
type WriteResult = Result<Vec<StatementOutcome>, SqlFailure>;

/// The outcome of a step that returns nothing.
fn no_rows() -> StatementOutcome {
    StatementOutcome {
        rows_affected: 0,
        columns: Vec::new(),
        rows: Vec::new(),
    }
}

/// The deterministic error of a write whose rows, all statements together, exceed
/// `result_bytes_max` (its outcome is stored in `raftpg.requests` and sent in one response).
fn result_too_large(outcomes: &[StatementOutcome], limits: &ApplyLimits) -> Option<SqlFailure> {
    let bytes: usize = outcomes
        .iter()
        .flat_map(|o| o.rows.iter().flatten())
        .map(values::approx_size)
        .fold(0, usize::saturating_add);
    (bytes > limits.result_bytes_max).then(|| {
        let mut f = failure(
            SqlState::PROGRAM_LIMIT_EXCEEDED.code(),
            format!(
                "a write may return at most {} bytes of rows (all its statements together); narrow the RETURNING or use the read API",
                limits.result_bytes_max
            ),
        );
        f.statement_index = u32::try_from(outcomes.len().saturating_sub(1)).unwrap_or(u32::MAX);
        f
    })
}

/// Whether a write calls `currval()`/`lastval()`, which read the session's sequence history
/// (the gate allows them only in queries): such a write starts with `DISCARD SEQUENCES`.
fn reads_session_sequences(cmd: &WriteCommand) -> bool {
    // Checked for every write on the fast path: no allocation.
    cmd.statements.iter().any(|s| {
        s.sql
            .as_bytes()
            .windows(7)
            .any(|w| w.eq_ignore_ascii_case(b"currval") || w.eq_ignore_ascii_case(b"lastval"))
    })
}

/// `SET LOCAL x TO DEFAULT` for every setting the write changed with `SET LOCAL` (the gate
/// allowed only reviewed settings; the applier's values are its reset values, see
/// session_rules), as one string; empty if it changed none.
fn set_local_resets<'a>(statements: impl Iterator<Item = &'a SqlStatement>) -> String {
    let mut names: Vec<String> = statements
        .filter(|s| !is_dml(&s.sql))
        .flat_map(|s| gate::settings_set_by(&s.sql))
        .collect();
    names.sort();
    names.dedup();
    names
        .iter()
        .map(|n| format!("SET LOCAL {n} TO DEFAULT"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The deterministic inputs of an entry as parameters of [`ENTRY_SETUP_SQL`].
struct EntryInputs {
    ts: String,
    seed: String,
    client_id: Option<String>,
    seq: Option<i64>,
    floor: i64,
}

impl EntryInputs {
    fn of_run(run: &[RunWrite<'_>], limits: &ApplyLimits) -> Vec<Self> {
        run.iter()
            .map(|(write_no, cmd, _)| EntryInputs::new(*write_no, cmd, limits))
            .collect()
    }

    fn new(write_no: u64, cmd: &WriteCommand, limits: &ApplyLimits) -> Self {
        EntryInputs {
            ts: cmd.leader_ts_micros.to_string(),
            seed: cmd.seed.to_string(),
            client_id: cmd.request_id.as_ref().map(|id| id.client_id.clone()),
            seq: cmd.request_id.as_ref().map(request_log::seq),
            floor: request_log::retention_floor(write_no, limits.request_retention_writes),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 5] {
        [
            &self.ts,
            &self.seed,
            &self.client_id,
            &self.seq,
            &self.floor,
        ]
    }
}

/// One command of a pipelined run and its result.
enum Step {
    /// Bookkeeping (open, setup, release).
    Sql(Result<u64, tokio_postgres::Error>),
    /// A user statement.
    Stmt(Result<StatementOutcome, StmtError>),
}

impl Step {
    fn sql(self) -> Result<u64, tokio_postgres::Error> {
        match self {
            Step::Sql(r) => r,
            // Never happens: positions are fixed when the run is built.
            Step::Stmt(_) => Ok(0),
        }
    }

    /// Whether PostgreSQL ran the command.
    fn succeeded(&self) -> bool {
        match self {
            Step::Sql(r) => r.is_ok(),
            Step::Stmt(r) => r.is_ok(),
        }
    }
}

type StepFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Step> + Send + 'a>>;

/// What PostgreSQL did with one write of a pipelined run (see [`Applier::apply_run`]).
enum RunWriteResult {
    /// Its statements ran and its savepoint was released.
    Applied(Vec<StatementOutcome>),
    /// A statement failed deterministically; the savepoint is still to be rolled back.
    Failed(SqlFailure),
    /// A live duplicate: the setup refused it before any statement ran.
    Duplicate,
}

/// Reads one write's results from a pipelined run: open, setup, its `statements` statements
/// and the write's end, release. Environmental errors, and failures that PostgreSQL cannot
/// undo alone any more ([`EnvError::PipelineAborted`]), are errors.
fn run_write_result(
    results: &mut impl Iterator<Item = Step>,
    statements: usize,
    as_role: bool,
    limits: &ApplyLimits,
) -> Result<RunWriteResult, EnvError> {
    let opened = results.next().map(Step::sql);
    let setup = results.next().map(Step::sql);
    // The statements (between the role's switch and switch back, if it has one), then the
    // write's end (raftpg.end_write).
    let before = usize::from(as_role);
    let steps = statements + 1 + 2 * usize::from(as_role);
    let stmts: Vec<Step> = results.by_ref().take(steps).collect();
    let released = results.next().map(Step::sql);
    if let Some(Err(e)) = opened {
        return Err(e.into());
    }
    match setup {
        Some(Ok(_)) => {}
        Some(Err(e)) if is_duplicate(&e) => return Ok(RunWriteResult::Duplicate),
        Some(Err(e)) => return Err(e.into()),
        None => return Err(EnvError::Inconsistent("pipeline ended early")),
    }
    let mut stmt_outcomes = Vec::with_capacity(stmts.len());
    for (i, st) in stmts.into_iter().enumerate() {
        match st {
            Step::Stmt(Ok(o)) => stmt_outcomes.push(o),
            Step::Stmt(Err(StmtError::Deterministic(mut f))) => {
                if matches!(released, Some(Ok(_))) {
                    // The failure was found on this side after PostgreSQL ran the statement
                    // and released the savepoint: it cannot be undone alone.
                    return Err(EnvError::PipelineAborted);
                }
                // A failure of the switch is reported on the first statement, one at the
                // write's end on its last.
                f.statement_index =
                    u32::try_from(i.saturating_sub(before).min(statements.saturating_sub(1)))
                        .unwrap_or(u32::MAX);
                return Ok(RunWriteResult::Failed(f));
            }
            Step::Stmt(Err(StmtError::Environmental(e))) => return Err(e),
            Step::Sql(_) => return Err(EnvError::Inconsistent("pipeline out of step")),
        }
    }
    if let Some(Err(e)) = released {
        return Err(e.into());
    }
    // The switches and the write's end return nothing.
    stmt_outcomes.drain(..before);
    stmt_outcomes.truncate(statements);
    if result_too_large(&stmt_outcomes, limits).is_some() {
        // Found on this side after the write was released: redo entry by entry, where the
        // limit becomes the write's error.
        return Err(EnvError::PipelineAborted);
    }
    Ok(RunWriteResult::Applied(stmt_outcomes))
}

/// Reads one write's results from a fast run: its setup (if `setup` was sent; a count of live
/// duplicates other than 0 is a failure), its `statements` statements and the write's end.
/// Anything but success is [`EnvError::FastRunAbandoned`].
fn fast_write_result(
    results: &mut impl Iterator<Item = Step>,
    setup: bool,
    statements: usize,
    as_role: bool,
    limits: &ApplyLimits,
) -> Result<Vec<StatementOutcome>, EnvError> {
    if setup && !matches!(results.next(), Some(Step::Sql(Ok(0)))) {
        return Err(EnvError::FastRunAbandoned);
    }
    // The statements, the switch back when the write has a role (the switch to it rode on the
    // setup or the previous write's end, `Switch::Carried`), then the write's end.
    let steps = statements + 1 + usize::from(as_role);
    let mut stmt_outcomes = Vec::with_capacity(steps);
    for st in results.by_ref().take(steps) {
        match st {
            Step::Stmt(Ok(o)) => stmt_outcomes.push(o),
            _ => return Err(EnvError::FastRunAbandoned),
        }
    }
    stmt_outcomes.truncate(statements);
    if result_too_large(&stmt_outcomes, limits).is_some() {
        return Err(EnvError::FastRunAbandoned);
    }
    Ok(stmt_outcomes)
}

/// The request ids of a fast run's writes, as parameters of `request_log::count_live_sql`.
struct RunRequestIds<'a> {
    cids: Vec<&'a str>,
    seqs: Vec<i64>,
    floors: Vec<i64>,
}

impl<'a> RunRequestIds<'a> {
    fn of(inputs: &'a [EntryInputs]) -> Self {
        let (mut cids, mut seqs, mut floors) = (Vec::new(), Vec::new(), Vec::new());
        for input in inputs {
            if let (Some(c), Some(s)) = (&input.client_id, input.seq) {
                cids.push(c.as_str());
                seqs.push(s);
                floors.push(input.floor);
            }
        }
        RunRequestIds { cids, seqs, floors }
    }

    /// Whether no write of the run has a request id.
    fn is_empty(&self) -> bool {
        self.cids.is_empty()
    }
}

/// Awaits futures, polling them in the given order (tokio-postgres sends a request when its
/// future is first polled, so this is also the order in which PostgreSQL runs them).
async fn join_in_order<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut all: Vec<std::pin::Pin<Box<futures::future::MaybeDone<F>>>> = futures
        .into_iter()
        .map(|f| Box::pin(futures::future::maybe_done(f)))
        .collect();
    use std::future::Future;
    std::future::poll_fn(|cx| {
        let mut done = true;
        for f in all.iter_mut() {
            if f.as_mut().poll(cx).is_pending() {
                done = false;
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    all.iter_mut()
        .filter_map(|f| f.as_mut().take_output())
        .collect()
}

fn is_duplicate(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code().code() == DUPLICATE_SQLSTATE)
}

/// The record of an entry's outcome for its request id, if it has one.
fn record_of(
    write_no: u64,
    cmd: &WriteCommand,
    outcome: &ApplyOutcome,
) -> Result<Option<Record>, EnvError> {
    match &cmd.request_id {
        Some(id) => Ok(Some((
            id.client_id.clone(),
            request_log::seq(id),
            i64::try_from(write_no).unwrap_or(i64::MAX),
            request_log::encode(outcome).map_err(|detail| EnvError::Bookkeeping {
                what: "a request outcome",
                detail,
            })?,
        ))),
        None => Ok(None),
    }
}

/// Ends every write, inside its savepoint (or, on the fast path, right after its statements):
/// checks its deferred constraints now (`SET CONSTRAINTS ALL IMMEDIATE`: a violation becomes
/// this write's error, never the batch's COMMIT's), fails it if it left the session changed,
/// and puts the constraint modes back for the next write. See `raftpg.end_write`.
const END_WRITE_SQL: &str = "SELECT raftpg.end_write($1::text)";

/// Sets a write's deterministic inputs on the fast path (`$1` timestamp, `$2` seed): what
/// `raftpg.begin_entry` sets (the draw counter restarts only with a new seed), without its
/// duplicate check, which the fast path makes once per run. With `check`, the first column is
/// that check: how many of the run's request ids (`$3`–`$5`) have a live record. With `as_role`,
/// the last column switches to the write's role (the last parameter) — PostgreSQL evaluates a
/// projection's expressions in order, so the check and `raftpg.reset_constraints()` run as
/// raftpg before the switch (were it not so, they would fail as the role, and the fast run
/// would be redone the careful way: slower, never wrong). One statement instead of three.
fn fast_setup_sql(check: bool, as_role: bool) -> String {
    let mut columns = Vec::new();
    if check {
        columns.push(format!("({})", request_log::count_live_sql(3)));
    }
    columns.push("set_config('raftpg.ts_us', $1::text, true)".to_string());
    columns.push(
        "CASE WHEN current_setting('raftpg.seed', true) IS DISTINCT FROM $2::text
              THEN set_config('raftpg.seed', $2::text, true) || set_config('raftpg.rnd_n', '0', true) END"
            .to_string(),
    );
    columns.push("raftpg.reset_constraints()".to_string());
    if as_role {
        let role = if check { 6 } else { 3 };
        columns.push(format!(
            "pg_catalog.set_config('session_authorization', ${role}, true)"
        ));
    }
    format!("SELECT {}", columns.join(", "))
}

/// [`END_WRITE_SQL`], then the switch to the next write's role, in the same order argument as
/// [`fast_setup_sql`].
const END_WRITE_AS_SQL: &str =
    "SELECT raftpg.end_write($1::text), pg_catalog.set_config('session_authorization', $2, true)";

/// Sets an entry's deterministic inputs and refuses a live duplicate (`raftpg.begin_entry`,
/// created with `request_log::BOOTSTRAP_SQL`).
const ENTRY_SETUP_SQL: &str =
    "SELECT raftpg.begin_entry($1::text, $2::text, $3::text, $4::bigint, $5::bigint)";

/// Runs the rest of a write as its role (see the module doc, "Roles").
const SWITCH_USER_SQL: &str = "SELECT pg_catalog.set_config('session_authorization', $1, true)";

/// Ends a write's run as its role: its deferred constraints fire as the role, then the session
/// is raftpg's again (see the module doc, "Roles").
const UNSWITCH_USER: &str = "SET CONSTRAINTS ALL IMMEDIATE; RESET SESSION AUTHORIZATION";

const RELEASE_ENTRY: &str = "RELEASE SAVEPOINT raftpg_entry";
const ROLLBACK_ENTRY: &str = "ROLLBACK TO SAVEPOINT raftpg_entry; RELEASE SAVEPOINT raftpg_entry";

/// A request's outcome to record: client id, seq, write number, outcome.
type Record = (String, i64, i64, serde_json::Value);

/// Records as the four array parameters of `request_log::record_many_sql`.
struct RecordArrays<'a> {
    cids: Vec<&'a str>,
    seqs: Vec<i64>,
    write_nos: Vec<i64>,
    outcomes: Vec<&'a serde_json::Value>,
}

impl<'a> RecordArrays<'a> {
    fn of(records: &'a [Record]) -> Self {
        RecordArrays {
            cids: records.iter().map(|r| r.0.as_str()).collect(),
            seqs: records.iter().map(|r| r.1).collect(),
            write_nos: records.iter().map(|r| r.2).collect(),
            outcomes: records.iter().map(|r| &r.3).collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.cids.is_empty()
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.cids, &self.seqs, &self.write_nos, &self.outcomes]
    }
}

/// `record_end` (a statement with parameters `$1`–`$4`) behind the INSERT of request records
/// (`$5`–`$8`) as a data-modifying CTE: PostgreSQL runs the CTE exactly once, whether or not the
/// statement reads it, in the same transaction and snapshot.
fn with_records(record_end: &str) -> String {
    format!(
        "WITH recorded AS ({}) {record_end}",
        request_log::record_many_sql(5)
    )
}

/// What is still to be sent for entries applied so far, at the start of the next round trip:
/// the last entry's savepoint end (unless released in a pipeline) and the outcomes to record
/// for request ids.
#[derive(Default)]
pub struct Pending {
    end: Option<&'static str>,
    records: Vec<Record>,
}

/// A user statement as the applier runs it: the prepared statement (or its rewrite that has
/// PostgreSQL print the columns raftpg has no kind for, see `pg::results`) and the columns its
/// outcome reports.
#[derive(Clone)]
pub struct UserStatement {
    stmt: Statement,
    columns: Arc<[ColumnInfo]>,
    forms: Arc<[Form]>,
}

/// Prepares a user statement (see [`UserStatement`]).
async fn prepare_user(client: &Client, sql: &str) -> Result<UserStatement, StmtError> {
    let stmt = client.prepare(sql).await.map_err(classify)?;
    let columns: Arc<[ColumnInfo]> = stmt
        .columns()
        .iter()
        .map(|c| ColumnInfo {
            name: c.name().to_string(),
            type_name: c.type_().name().to_string(),
            // A type created by SQL may have another OID on another node: outcomes must be
            // the same on every node, so only built-in types' OIDs are recorded.
            type_oid: Some(c.type_().oid())
                .filter(|o| *o < FIRST_NORMAL_OBJECT_ID)
                .unwrap_or(0),
        })
        .collect();
    let types: Vec<_> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
    let forms: Arc<[Form]> = text_forms(&types, &[]).into();
    if !forms.contains(&Form::Text) {
        return Ok(UserStatement {
            stmt,
            columns,
            forms,
        });
    }
    let text: Vec<bool> = forms.iter().map(|f| *f == Form::Text).collect();
    let Some(wrapped) = text_wrapped(sql, &text) else {
        let names: Vec<String> = columns
            .iter()
            .zip(text)
            .filter(|(_, t)| *t)
            .map(|(c, _)| format!("{:?} ({})", c.name, c.type_name))
            .collect();
        return Err(StmtError::Deterministic(failure(
            SqlState::FEATURE_NOT_SUPPORTED.code(),
            format!(
                "column {} cannot be returned by this kind of statement; cast it to text (e.g. col::text)",
                names.join(", ")
            ),
        )));
    };
    let stmt = client
        .prepare_typed(&wrapped, stmt.params())
        .await
        .map_err(classify)?;
    Ok(UserStatement {
        stmt,
        columns,
        forms,
    })
}

/// Checks parameter count and types of a prepared statement.
fn check_statement(prepared: &UserStatement, stmt: &SqlStatement) -> Result<(), StmtError> {
    let param_types = prepared.stmt.params();
    if param_types.len() != stmt.params.len() {
        return Err(StmtError::Deterministic(failure(
            SqlState::PROTOCOL_VIOLATION.code(),
            format!(
                "the statement has {} parameter(s) but {} value(s) were bound",
                param_types.len(),
                stmt.params.len()
            ),
        )));
    }
    for (i, (v, ty)) in stmt.params.iter().zip(param_types).enumerate() {
        values::check_bind(v, ty).map_err(|e| {
            StmtError::Deterministic(failure(
                SqlState::DATATYPE_MISMATCH.code(),
                format!("parameter ${}: {e}", i + 1),
            ))
        })?;
    }
    Ok(())
}

async fn prepare_and_execute(
    client: &Client,
    stmt: &SqlStatement,
    limits: &ApplyLimits,
) -> Result<(StatementOutcome, UserStatement), StmtError> {
    let prepared = prepare_user(client, &stmt.sql).await?;
    let outcome = execute(client, &prepared, stmt, limits).await?;
    Ok((outcome, prepared))
}

/// Executes one prepared statement and decodes its rows.
async fn execute(
    client: &Client,
    prepared: &UserStatement,
    stmt: &SqlStatement,
    limits: &ApplyLimits,
) -> Result<StatementOutcome, StmtError> {
    check_statement(prepared, stmt)?;
    execute_checked(client, prepared, stmt, limits).await
}

/// [`execute`] for a statement whose parameters [`check_statement`] already accepted.
async fn execute_checked(
    client: &Client,
    prepared: &UserStatement,
    stmt: &SqlStatement,
    limits: &ApplyLimits,
) -> Result<StatementOutcome, StmtError> {
    let columns = &prepared.columns;
    let params = stmt.params.iter().map(|v| v as &(dyn ToSql + Sync));
    let stream = client
        .query_raw(&prepared.stmt, params)
        .await
        .map_err(classify)?;
    futures::pin_mut!(stream);
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = stream.try_next().await.map_err(classify)? {
        if rows.len() >= limits.result_rows_max {
            return Err(StmtError::Deterministic(failure(
                SqlState::PROGRAM_LIMIT_EXCEEDED.code(),
                format!(
                    "a write may return at most {} rows per statement; narrow the RETURNING or use the read API",
                    limits.result_rows_max
                ),
            )));
        }
        let cells = decode_row(&row, &prepared.forms, columns).map_err(|e| {
            StmtError::Deterministic(failure(SqlState::FEATURE_NOT_SUPPORTED.code(), e))
        })?;
        for v in &cells {
            bytes = bytes.saturating_add(values::approx_size(v));
        }
        if bytes > limits.result_bytes_max {
            return Err(StmtError::Deterministic(failure(
                SqlState::PROGRAM_LIMIT_EXCEEDED.code(),
                format!(
                    "a write may return at most {} bytes of rows (all its statements together); narrow the RETURNING or use the read API",
                    limits.result_bytes_max
                ),
            )));
        }
        rows.push(cells);
    }
    let rows_affected = stream.rows_affected().unwrap_or(rows.len() as u64);
    Ok(StatementOutcome {
        rows_affected,
        columns: columns.to_vec(),
        rows,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dml_detection() {
        assert!(super::is_dml("  insert into t values (1)"));
        assert!(super::is_dml("WITH x AS (SELECT 1) DELETE FROM t"));
        assert!(!super::is_dml("CREATE TABLE t (a int)"));
        assert!(!super::is_dml("/* comment */ INSERT INTO t VALUES (1)"));
        assert!(!super::is_dml("TRUNCATE t"));
    }
}
