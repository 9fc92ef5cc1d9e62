//! One wire-protocol session after startup: the simple and extended query protocols over the
//! service layer.
//!
//! Owns the session's prepared statements and portals, its settings ([`Settings`]) and the
//! protocol state (an error in an extended-query exchange skips messages until `Sync`).
//!
//! - A **query string** (simple protocol) of queries runs as reads, one after the other; one
//!   with any write runs as **one write** (one log entry, atomic, as PostgreSQL runs a
//!   multi-statement string in one implicit transaction) and answers statement by statement.
//!   `BEGIN` ... `COMMIT` around a whole string is that same write. A session command (`SET`,
//!   `SHOW` of a session setting, transaction control) is answered by the session.
//! - **Extended protocol**: a portal of a query runs as a read when it is described or first
//!   executed (rows stream from the node's read connection, at most `max_rows` per
//!   `Execute`); a portal of a write runs as one write when executed.
//! - **Interactive transactions**: an explicit `BEGIN` (not wrapped with its `COMMIT` around
//!   a whole string of writes) opens one on the leader ([`Txn`], `service::txn`); until
//!   `COMMIT` / `ROLLBACK` every query and write of the session runs in it, one by one, with
//!   its results, and `ReadyForQuery` reports `T` (or `E` after an error, until `ROLLBACK` or
//!   `ROLLBACK TO SAVEPOINT`). Dropping the session rolls it back.
//!
//! Every read waits for the session's own last write (see [`Settings::consistency`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use pgwire::messages::copy::CopyInResponse;
use pgwire::messages::data::{
    DataRow, FieldDescription, NoData, ParameterDescription, RowDescription,
};
use pgwire::messages::extendedquery::{
    Bind, BindComplete, Close, CloseComplete, Describe, Execute, Parse, ParseComplete,
    PortalSuspended, TARGET_TYPE_BYTE_PORTAL, TARGET_TYPE_BYTE_STATEMENT,
};
use pgwire::messages::response::{
    CommandComplete, EmptyQueryResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::{PgWireBackendMessage as B, PgWireFrontendMessage as F};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::auth::authenticator::Principal;
use crate::command::{ColumnInfo, SqlValue, StatementOutcome};
use crate::service::{
    BeginRequest, Description, ErrorKind, Origin, ReadChunk, ReadRequest, Service, ServiceError,
    Txn, TxnStatus, WriteRequest, WriteStatement, SESSION_SETTINGS,
};

use super::cancel::CancelSignal;
use super::copy;
use super::error::{self, Op};
use super::settings::{Settings, LAST_WRITE_INDEX};
use super::statement::{self, Kind, SavepointOp, Statement};
use super::stream::Wire;
use super::values::{self, TextSettings};

/// Most prepared statements (and most portals) one session may hold.
pub const PREPARED_MAX: usize = 10_000;

/// Most `Execute`s of one pipeline (one write: also bounded by the node's statements per
/// write and request size).
pub const PIPELINE_MAX: usize = 1_000;

type Io = std::io::Result<()>;

/// A prepared statement.
struct Prepared {
    /// The statement (`None`: an empty query).
    stmt: Option<Statement>,
    /// Parameter types the client gave in `Parse` (0: unspecified).
    param_types: Vec<u32>,
    /// What PostgreSQL infers for it, once asked.
    described: Option<Description>,
}

/// A bound portal.
struct Portal {
    stmt: Arc<Prepared>,
    params: Vec<SqlValue>,
    /// One format code per result column, as bound (expanded once the columns are known).
    result_formats: Vec<i16>,
    /// A read's rows, once it runs.
    read: Option<RunningRead>,
    /// Rows sent so far (for the command tag).
    sent: u64,
    /// The portal ran to its end.
    done: bool,
}

/// A read running on this node: its columns, and its rows as they arrive.
struct RunningRead {
    columns: Vec<ColumnInfo>,
    rows: VecDeque<Vec<SqlValue>>,
    rx: mpsc::Receiver<ReadChunk>,
    done: Option<oneshot::Receiver<Result<(), ServiceError>>>,
    task: JoinHandle<()>,
}

impl Drop for RunningRead {
    fn drop(&mut self) {
        // A read nobody waits for ends now (its PostgreSQL connection is closed).
        self.task.abort();
    }
}

impl RunningRead {
    /// The next row; `None` at the end.
    async fn next_row(
        &mut self,
        cancel: &CancelSignal,
    ) -> Result<Option<Vec<SqlValue>>, ServiceError> {
        loop {
            if let Some(r) = self.rows.pop_front() {
                return Ok(Some(r));
            }
            let chunk = tokio::select! {
                c = self.rx.recv() => c,
                _ = cancel.cancelled() => {
                    self.task.abort();
                    return Err(cancelled());
                }
            };
            match chunk {
                Some(c) => self.rows.extend(c.rows),
                None => {
                    return match self.done.take() {
                        Some(done) => match done.await {
                            Ok(r) => r.map(|()| None),
                            Err(_) => {
                                Err(ServiceError::internal("the read ended without an outcome"))
                            }
                        },
                        None => Ok(None),
                    };
                }
            }
        }
    }
}

fn cancelled() -> ServiceError {
    ServiceError::refused(
        ErrorKind::Cancelled,
        "57014",
        "canceling statement due to user request",
    )
}

/// A wire session. See the module doc.
pub struct Session {
    svc: Arc<Service>,
    principal: Option<Principal>,
    settings: Settings,
    statements: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Portal>,
    cancel: Arc<CancelSignal>,
    /// An extended-query message failed: skip messages until `Sync`.
    skipping: bool,
    /// `Execute`s waiting for `Sync` to run as one write (see [`Session::execute`]).
    pipeline: Vec<Deferred>,
    /// The error that ended the pipeline, when it failed while its output was held.
    pipeline_error: Option<pgwire::messages::response::ErrorResponse>,
    /// The interactive transaction the session is in (until its `COMMIT` or `ROLLBACK`).
    txn: Option<Txn>,
    /// In a transaction block: the settings at its start (`None`) and at each of its savepoints
    /// (their names), innermost last — what a rollback to there restores, as PostgreSQL undoes
    /// the `SET`s made since.
    saved_settings: Vec<(Option<String>, Settings)>,
}

/// An `Execute` of a pipeline, run with the others at `Sync`.
struct Deferred {
    stmt: Statement,
    params: Vec<SqlValue>,
    /// Result formats as bound.
    formats: Vec<i16>,
}

impl Session {
    /// A session of `principal` (`None`: raftpg itself, on an `--insecure` node).
    pub fn new(
        svc: Arc<Service>,
        principal: Option<Principal>,
        settings: Settings,
        cancel: Arc<CancelSignal>,
    ) -> Self {
        Session {
            svc,
            principal,
            settings,
            statements: HashMap::new(),
            portals: HashMap::new(),
            cancel,
            skipping: false,
            pipeline: Vec::new(),
            pipeline_error: None,
            txn: None,
            saved_settings: Vec::new(),
        }
    }

    /// Whether extended-query messages are being skipped until `Sync`.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    // ------------------------------------------------------------------ simple protocol

    /// Runs a query string (simple protocol) and ends with `ReadyForQuery`.
    pub async fn query(&mut self, out: &mut Wire, sql: &str) -> Io {
        self.cancel.reset();
        // An extended-query pipeline without its Sync ends here (as PostgreSQL's would).
        self.run_pipeline(out).await?;
        self.skipping = false;
        if let Err(e) = self.query_inner(out, sql).await? {
            if let Some(txn) = &self.txn {
                // Any error inside a transaction block fails the transaction (PostgreSQL's
                // rule), a refused session command too.
                txn.mark_failed().await;
            }
            out.feed(B::ErrorResponse(e)).await?;
        }
        self.ready(out).await
    }

    async fn query_inner(
        &mut self,
        out: &mut Wire,
        sql: &str,
    ) -> std::io::Result<Result<(), pgwire::messages::response::ErrorResponse>> {
        let stmts = match statement::split(sql) {
            Ok(s) => s,
            Err(statement::SyntaxError(m)) => return Ok(Err(error::plain("42601", m))),
        };
        if stmts.is_empty() {
            out.feed(B::EmptyQueryResponse(EmptyQueryResponse::new()))
                .await?;
            return Ok(Ok(()));
        }
        if stmts.len() > 1 {
            if let Some(s) = stmts.iter().find(|s| matches!(s.kind, Kind::CopyIn(_))) {
                return Ok(Err(error::response(&copy_not_alone(), Op::Write, s.offset)));
            }
        }
        let body = strip_transaction_block(&stmts);
        let has_write = body.iter().any(|s| matches!(s.kind, Kind::Write { .. }));
        let whole_block = body.len() < stmts.len()
            && has_write
            && !body
                .iter()
                .any(|s| matches!(s.kind, Kind::Savepoint { .. }));
        let interactive = self.txn.is_some()
            || stmts
                .iter()
                .any(|s| matches!(s.kind, Kind::Begin | Kind::Savepoint { .. }));
        if interactive && !(self.txn.is_none() && whole_block) {
            for s in &stmts {
                if let Err(e) = self.interactive_statement(out, s).await? {
                    return Ok(Err(e));
                }
            }
            return Ok(Ok(()));
        }
        if has_write {
            if let Some(s) = body.iter().find(|s| is_session_command(&s.kind)) {
                return Ok(Err(error::response(
                    &mixed_with_writes(s),
                    Op::Write,
                    s.offset,
                )));
            }
            let writes: Vec<(&Statement, Vec<SqlValue>)> =
                body.iter().map(|s| (*s, Vec::new())).collect();
            return match self.write(&writes).await {
                Ok(results) => {
                    for (s, r) in body.iter().zip(results) {
                        self.send_write_result(out, s, &r, None).await?;
                    }
                    if body.len() < stmts.len() {
                        out.feed(B::CommandComplete(CommandComplete::new("COMMIT".into())))
                            .await?;
                    }
                    self.report_last_write(out).await?;
                    Ok(Ok(()))
                }
                Err(e) => {
                    let at = body.get(e.statement_index as usize).map_or(0, |s| s.offset);
                    Ok(Err(error::response(&e, Op::Write, at)))
                }
            };
        }
        for s in &stmts {
            if let Err(e) = self.simple_statement(out, s).await? {
                return Ok(Err(e));
            }
        }
        Ok(Ok(()))
    }

    /// One statement of a query string without writes.
    async fn simple_statement(
        &mut self,
        out: &mut Wire,
        s: &Statement,
    ) -> std::io::Result<Result<(), pgwire::messages::response::ErrorResponse>> {
        match &s.kind {
            Kind::Read { tag } => {
                let mut read = match self.start_read(s, &[], &[], &[]).await {
                    Ok(r) => r,
                    Err(e) if e.sqlstate.as_deref() == Some("25006") => {
                        // A query that writes (nextval, a function that inserts): a write.
                        return self.single_write(out, s).await;
                    }
                    Err(e) => return Ok(Err(error::response(&e, Op::Read, s.offset))),
                };
                let formats = vec![0; read.columns.len()];
                out.feed(B::RowDescription(row_description(&read.columns, &formats)))
                    .await?;
                let text = self.settings.text();
                let mut n = 0u64;
                loop {
                    match read.next_row(&self.cancel).await {
                        Ok(Some(row)) => match data_row(&row, &read.columns, &formats, text) {
                            Ok(d) => {
                                out.feed(B::DataRow(d)).await?;
                                n += 1;
                            }
                            Err(e) => return Ok(Err(error::plain("0A000", e.to_string()))),
                        },
                        Ok(None) => break,
                        Err(e) => return Ok(Err(error::response(&e, Op::Read, s.offset))),
                    }
                }
                out.feed(B::CommandComplete(CommandComplete::new(read_tag(tag, n))))
                    .await?;
                Ok(Ok(()))
            }
            Kind::Write { .. } => unreachable_write(),
            _ => self.session_command(out, s, true).await,
        }
    }

    /// One statement of a query string as a write of its own, and its result.
    async fn single_write(
        &mut self,
        out: &mut Wire,
        s: &Statement,
    ) -> std::io::Result<Result<(), pgwire::messages::response::ErrorResponse>> {
        match self.write(&[(s, Vec::new())]).await {
            Ok(r) => {
                let r = r.into_iter().next().unwrap_or_default();
                self.send_write_result(out, s, &r, None).await?;
                self.report_last_write(out).await?;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(error::response(&e, Op::Write, s.offset))),
        }
    }

    /// A statement the session answers itself. `with_description`: send the
    /// `RowDescription` of a `SHOW` (the simple protocol does; an extended `Execute` does not).
    async fn session_command(
        &mut self,
        out: &mut Wire,
        s: &Statement,
        with_description: bool,
    ) -> std::io::Result<Result<(), pgwire::messages::response::ErrorResponse>> {
        let done = |tag: &str| B::CommandComplete(CommandComplete::new(tag.to_string()));
        match &s.kind {
            Kind::ResetAll { tag } if self.txn.is_some() => {
                match self.reset_all_in_txn(tag).await {
                    Ok(reported) => {
                        for (k, v) in reported {
                            out.feed(B::ParameterStatus(ParameterStatus::new(k, v)))
                                .await?;
                        }
                        out.feed(done(tag)).await?;
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(error::response(&e, Op::Write, s.offset))),
                }
            }
            Kind::Set { name, value } => {
                // Inside a transaction block it is also a statement of the transaction.
                let (set, op) = match self.txn.is_some() {
                    true => (self.set_in_txn(name, value.as_deref()).await, Op::Write),
                    false => (self.set_checked(name, value.as_deref()).await, Op::Read),
                };
                match set {
                    Ok(report) => {
                        out.feed(done("SET")).await?;
                        if let Some((k, v)) = report {
                            out.feed(B::ParameterStatus(ParameterStatus::new(k, v)))
                                .await?;
                        }
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(error::response(&e, op, s.offset))),
                }
            }
            Kind::ResetAll { tag } => {
                if tag == "DISCARD ALL" {
                    self.statements.clear();
                    self.portals.clear();
                }
                for (k, v) in self.settings.reset_all() {
                    out.feed(B::ParameterStatus(ParameterStatus::new(k, v)))
                        .await?;
                }
                out.feed(done(tag)).await?;
                Ok(Ok(()))
            }
            Kind::Show { name } => match self.settings.show(name) {
                Some((shown, value)) => {
                    let columns = [text_column(&shown)];
                    if with_description {
                        out.feed(B::RowDescription(row_description(&columns, &[0])))
                            .await?;
                    }
                    let row = [SqlValue::Text(value)];
                    if let Ok(d) = data_row(&row, &columns, &[0], TextSettings::default()) {
                        out.feed(B::DataRow(d)).await?;
                    }
                    out.feed(done("SHOW")).await?;
                    Ok(Ok(()))
                }
                None => {
                    // A server setting: the node's read connection answers.
                    let read = Statement {
                        kind: Kind::Read { tag: "SHOW".into() },
                        ..s.clone()
                    };
                    Box::pin(self.simple_statement(out, &read)).await
                }
            },
            Kind::Begin if self.txn.is_some() => {
                out.feed(B::NoticeResponse(error::warning(
                    "25001",
                    "there is already a transaction in progress",
                )))
                .await?;
                out.feed(done("BEGIN")).await?;
                Ok(Ok(()))
            }
            Kind::Begin => match self.begin_txn().await {
                Ok(()) => {
                    out.feed(done("BEGIN")).await?;
                    Ok(Ok(()))
                }
                Err(e) => Ok(Err(error::response(&e, Op::Write, s.offset))),
            },
            Kind::End { commit } => match self.txn.take() {
                Some(txn) if *commit => match txn.commit().await {
                    Ok(c) if c.committed => {
                        self.saved_settings.clear();
                        self.settings.wrote(c.log_index);
                        out.feed(done("COMMIT")).await?;
                        self.report_last_write(out).await?;
                        Ok(Ok(()))
                    }
                    Ok(_) => {
                        self.restore_settings(out, 0).await?;
                        out.feed(done("ROLLBACK")).await?;
                        Ok(Ok(()))
                    }
                    Err(e) => {
                        self.restore_settings(out, 0).await?;
                        Ok(Err(error::response(&e, Op::Write, s.offset)))
                    }
                },
                Some(txn) => {
                    txn.rollback().await;
                    self.restore_settings(out, 0).await?;
                    out.feed(done("ROLLBACK")).await?;
                    Ok(Ok(()))
                }
                None => {
                    out.feed(B::NoticeResponse(error::warning(
                        "25P01",
                        "there is no transaction in progress",
                    )))
                    .await?;
                    out.feed(done(if *commit { "COMMIT" } else { "ROLLBACK" }))
                        .await?;
                    Ok(Ok(()))
                }
            },
            Kind::Savepoint { op, name } => {
                let (what, tag) = match op {
                    SavepointOp::Define => ("SAVEPOINT", "SAVEPOINT"),
                    SavepointOp::Release => ("RELEASE SAVEPOINT", "RELEASE"),
                    SavepointOp::RollbackTo => ("ROLLBACK TO SAVEPOINT", "ROLLBACK"),
                };
                let Some(txn) = &self.txn else {
                    return Ok(Err(error::plain(
                        "25P01",
                        format!("{what} can only be used in transaction blocks"),
                    )));
                };
                let done_or = txn.savepoint_op(*op, name).await;
                match done_or {
                    Ok(()) => {
                        let at = self
                            .saved_settings
                            .iter()
                            .rposition(|(n, _)| n.as_deref() == Some(name.as_str()));
                        match (op, at) {
                            (SavepointOp::Define, _) => self
                                .saved_settings
                                .push((Some(name.clone()), self.settings.clone())),
                            (SavepointOp::Release, Some(i)) => self.saved_settings.truncate(i),
                            (SavepointOp::RollbackTo, Some(i)) => {
                                self.restore_settings(out, i).await?;
                            }
                            (_, None) => {}
                        }
                        out.feed(done(tag)).await?;
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(error::response(&e, Op::Write, s.offset))),
                }
            }
            Kind::SetTransaction => {
                if self.txn.is_none() {
                    out.feed(B::NoticeResponse(error::warning(
                        "25P01",
                        "SET TRANSACTION can only be used in transaction blocks",
                    )))
                    .await?;
                }
                // Every raftpg transaction is serializable (it runs alone at its position in
                // the log), which every isolation level allows.
                out.feed(done("SET")).await?;
                Ok(Ok(()))
            }
            Kind::InTransactionOnly { what } => Ok(Err(error::plain(
                "25P01",
                format!("{what} can only be used in transaction blocks"),
            ))),
            Kind::Refused { sqlstate, message } => Ok(Err(error::plain(sqlstate, message.clone()))),
            Kind::CopyIn(c) => self.copy_in(out, c).await,
            Kind::Read { .. } | Kind::Write { .. } => {
                Ok(Err(error::plain("XX000", "not a session command")))
            }
        }
    }

    /// `SET name TO value` (`None`: `RESET`) inside a transaction block: it takes effect at
    /// once, for the transaction's own statements too (a `SET LOCAL` in the transaction for
    /// the settings its statements run with), and a rollback of the block undoes it.
    async fn set_in_txn(
        &mut self,
        name: &str,
        value: Option<&str>,
    ) -> Result<Option<(String, String)>, ServiceError> {
        let before = self.settings.clone();
        let report = self.set_checked(name, value).await?;
        if Settings::checked_by_postgres(name) {
            if let Err(e) = self.set_local_in_txn(&[name]).await {
                self.settings = before;
                return Err(e);
            }
        }
        Ok(report)
    }

    /// `RESET ALL` (or a `DISCARD` other than `ALL`) inside a transaction block; returns the
    /// reported settings that changed.
    async fn reset_all_in_txn(&mut self, tag: &str) -> Result<Vec<(String, String)>, ServiceError> {
        if tag == "DISCARD ALL" {
            return Err(ServiceError::refused(
                ErrorKind::FailedPrecondition,
                "25001",
                "DISCARD ALL cannot run inside a transaction block",
            ));
        }
        let before = self.settings.clone();
        let reported = self.settings.reset_all();
        if let Err(e) = self.set_local_in_txn(SESSION_SETTINGS).await {
            self.settings = before;
            return Err(e);
        }
        Ok(reported)
    }

    /// Makes the open transaction's session run with the session's values of `names` (some of
    /// [`SESSION_SETTINGS`]) from its next statement on.
    async fn set_local_in_txn(&self, names: &[&str]) -> Result<(), ServiceError> {
        let Some(txn) = &self.txn else {
            return Ok(());
        };
        for name in names {
            let value = self.settings.override_of(name);
            txn.set_local(set_local_statement(name, value.as_deref()))
                .await?;
        }
        Ok(())
    }

    /// Puts the settings back as they were at `saved_settings[at]` (0: the transaction block's
    /// start, which also ends the block's saving), and tells the client of the reported ones
    /// that changed.
    async fn restore_settings(&mut self, out: &mut Wire, at: usize) -> std::io::Result<()> {
        let Some((_, saved)) = self.saved_settings.get(at) else {
            return Ok(());
        };
        let saved = saved.clone();
        for (k, v) in self.settings.restore(&saved) {
            out.feed(B::ParameterStatus(ParameterStatus::new(k, v)))
                .await?;
        }
        match at {
            0 => self.saved_settings.clear(),
            _ => self.saved_settings.truncate(at + 1),
        }
        Ok(())
    }

    /// `SET name TO value` (`None`: `RESET`), a setting PostgreSQL must check asked first.
    async fn set_checked(
        &mut self,
        name: &str,
        value: Option<&str>,
    ) -> Result<Option<(String, String)>, ServiceError> {
        let value = match value {
            Some(v) if Settings::checked_by_postgres(name) => {
                Some(self.svc.check_setting(name, v).await?)
            }
            other => other.map(str::to_string),
        };
        self.settings.set(name, value.as_deref())
    }

    async fn ready(&mut self, out: &mut Wire) -> Io {
        let status = match &self.txn {
            None => TransactionStatus::Idle,
            Some(t) => match t.status().await {
                TxnStatus::Active => TransactionStatus::Transaction,
                TxnStatus::Failed | TxnStatus::Ended => TransactionStatus::Error,
            },
        };
        out.feed(B::ReadyForQuery(ReadyForQuery::new(status)))
            .await?;
        out.flush().await
    }

    // ---------------------------------------------------------------- transactions

    /// `BEGIN`: an interactive transaction, opened on the leader at its first statement (see
    /// `service::Txn`); the session's settings are its first steps (as they are a write's).
    /// With `raftpg.transaction_id` set it opens at once: a retry learns at `BEGIN` that an
    /// earlier attempt committed (RP003).
    async fn begin_txn(&mut self) -> Result<(), ServiceError> {
        let request_id = self
            .settings
            .take_transaction_id()
            .map(|id| crate::command::RequestId {
                client_id: format!("wire:{id}"),
                seq: 1,
            });
        let chosen = request_id.is_some();
        let txn = self.svc.begin(
            BeginRequest {
                principal: self.principal.clone(),
                request_id,
                origin: Origin::Client,
            },
            self.settings_prefix(),
        );
        if chosen {
            txn.open().await?;
        }
        self.txn = Some(txn);
        self.saved_settings = vec![(None, self.settings.clone())];
        Ok(())
    }

    /// One statement of a query string that opens, uses or ends an interactive transaction.
    async fn interactive_statement(
        &mut self,
        out: &mut Wire,
        s: &Statement,
    ) -> std::io::Result<Result<(), pgwire::messages::response::ErrorResponse>> {
        if let Some(e) = self.refused_in_failed_txn(&s.kind).await {
            return Ok(Err(e));
        }
        match (&s.kind, &self.txn) {
            (k, Some(txn)) if runs_in_txn(k) => {
                match txn.execute(txn_statement(s, Vec::new())).await {
                    Ok(r) => {
                        self.send_write_result(out, s, &r, None).await?;
                        Ok(Ok(()))
                    }
                    Err(e) => Ok(Err(error::response(&e, Op::Write, s.offset))),
                }
            }
            (Kind::Write { .. }, None) => self.single_write(out, s).await,
            (Kind::Read { .. }, _) => self.simple_statement(out, s).await,
            _ => self.session_command(out, s, true).await,
        }
    }

    /// In a failed transaction, PostgreSQL refuses everything but its end and `ROLLBACK TO`.
    async fn refused_in_failed_txn(
        &self,
        kind: &Kind,
    ) -> Option<pgwire::messages::response::ErrorResponse> {
        let txn = self.txn.as_ref()?;
        match kind {
            Kind::End { .. }
            | Kind::Savepoint {
                op: SavepointOp::RollbackTo,
                ..
            } => None,
            _ => txn
                .refusal()
                .await
                .map(|e| error::response(&e, Op::Write, 0)),
        }
    }

    /// Runs a query of a portal in the open transaction; its rows are then sent as a read's.
    async fn txn_read(
        &self,
        s: &Statement,
        params: Vec<SqlValue>,
    ) -> Result<RunningRead, ServiceError> {
        let Some(txn) = &self.txn else {
            return Err(ServiceError::internal("no transaction is open"));
        };
        let r = txn.execute(txn_statement(s, params)).await?;
        let (_tx, rx) = mpsc::channel(1);
        Ok(RunningRead {
            columns: r.columns,
            rows: r.rows.into(),
            rx,
            done: None,
            task: tokio::spawn(async {}),
        })
    }

    // ---------------------------------------------------------------- extended protocol

    /// `Parse`.
    pub async fn parse(&mut self, out: &mut Wire, m: Parse) -> Io {
        let name = m.name.unwrap_or_default();
        let result = (|| {
            if !name.is_empty() && self.statements.contains_key(&name) {
                return Err(error::plain(
                    "42P05",
                    format!("prepared statement \"{name}\" already exists"),
                ));
            }
            if self.statements.len() >= PREPARED_MAX && !self.statements.contains_key(&name) {
                return Err(error::plain(
                    "53400",
                    format!(
                        "a session may hold at most {PREPARED_MAX} prepared statements; close some"
                    ),
                ));
            }
            let mut stmts = statement::split(&m.query)
                .map_err(|statement::SyntaxError(msg)| error::plain("42601", msg))?;
            if stmts.len() > 1 {
                return Err(error::plain(
                    "42601",
                    "cannot insert multiple commands into a prepared statement",
                ));
            }
            Ok(stmts.pop())
        })();
        match result {
            Ok(stmt) => {
                self.statements.insert(
                    name,
                    Arc::new(Prepared {
                        stmt,
                        param_types: m.type_oids,
                        described: None,
                    }),
                );
                out.feed(B::ParseComplete(ParseComplete::new())).await
            }
            Err(e) => self.fail(out, e).await,
        }
    }

    /// `Bind`.
    pub async fn bind(&mut self, out: &mut Wire, m: Bind) -> Io {
        let stmt_name = m.statement_name.clone().unwrap_or_default();
        let portal_name = m.portal_name.clone().unwrap_or_default();
        let Some(mut prepared) = self.statements.get(&stmt_name).cloned() else {
            let e = error::plain(
                "26000",
                format!("prepared statement \"{stmt_name}\" does not exist"),
            );
            return self.fail(out, e).await;
        };
        if !portal_name.is_empty() && self.portals.contains_key(&portal_name) {
            let e = error::plain("42P03", format!("cursor \"{portal_name}\" already exists"));
            return self.fail(out, e).await;
        }
        if self.portals.len() >= PREPARED_MAX && !self.portals.contains_key(&portal_name) {
            let e = error::plain(
                "53400",
                format!("a session may hold at most {PREPARED_MAX} portals; close some"),
            );
            return self.fail(out, e).await;
        }
        let n = m.parameters.len();
        let formats = values::formats_for(&m.parameter_format_codes, n);
        if formats.len() != n {
            let e = error::plain(
                "08P01",
                format!(
                    "bind message has {} parameter formats but {n} parameters",
                    formats.len()
                ),
            );
            return self.fail(out, e).await;
        }
        // Binary parameters need their types: the client's, or PostgreSQL's inference.
        let needs_types = formats.iter().enumerate().any(|(i, f)| {
            values::is_binary(*f) && prepared.param_types.get(i).copied().unwrap_or(0) == 0
        });
        if needs_types && prepared.described.is_none() {
            match self.describe_prepared(&prepared).await {
                Ok(d) => {
                    prepared = self.remember_description(&stmt_name, &prepared, d);
                }
                Err(e) => return self.fail(out, error::response(&e, Op::Read, 0)).await,
            }
        }
        let mut params = Vec::with_capacity(n);
        for (i, (raw, f)) in m.parameters.iter().zip(&formats).enumerate() {
            let ty = param_type(&prepared, i);
            match values::param_value(raw.as_deref(), values::is_binary(*f), ty, i + 1) {
                Ok(v) => params.push(v),
                Err(e) => {
                    let code = match e {
                        values::WireValueError::BinaryParam(_) => "0A000",
                        values::WireValueError::NotUtf8(_) => "22021",
                        _ => "22P03",
                    };
                    return self.fail(out, error::plain(code, e.to_string())).await;
                }
            }
        }
        self.portals.insert(
            portal_name,
            Portal {
                stmt: prepared,
                params,
                result_formats: m.result_column_format_codes,
                read: None,
                sent: 0,
                done: false,
            },
        );
        out.feed(B::BindComplete(BindComplete::new())).await
    }

    /// `Describe` of a statement or a portal.
    pub async fn describe(&mut self, out: &mut Wire, m: Describe) -> Io {
        let name = m.name.clone().unwrap_or_default();
        match m.target_type {
            TARGET_TYPE_BYTE_STATEMENT => self.describe_statement(out, &name).await,
            TARGET_TYPE_BYTE_PORTAL => self.describe_portal(out, &name).await,
            other => {
                let e = error::plain("08P01", format!("invalid DESCRIBE message subtype {other}"));
                self.fail(out, e).await
            }
        }
    }

    async fn describe_statement(&mut self, out: &mut Wire, name: &str) -> Io {
        let Some(prepared) = self.statements.get(name).cloned() else {
            let e = error::plain(
                "26000",
                format!("prepared statement \"{name}\" does not exist"),
            );
            return self.fail(out, e).await;
        };
        let d = match self.description(name, &prepared).await {
            Ok(d) => d,
            Err(e) => return self.fail(out, error::response(&e, Op::Read, 0)).await,
        };
        out.feed(B::ParameterDescription(ParameterDescription::new(
            d.param_types.clone(),
        )))
        .await?;
        if d.columns.is_empty() {
            out.feed(B::NoData(NoData::new())).await
        } else {
            let formats = vec![0; d.columns.len()];
            out.feed(B::RowDescription(row_description(&d.columns, &formats)))
                .await
        }
    }

    async fn describe_portal(&mut self, out: &mut Wire, name: &str) -> Io {
        let Some(stmt) = self.portals.get(name).map(|p| p.stmt.clone()) else {
            let e = error::plain("34000", format!("portal \"{name}\" does not exist"));
            return self.fail(out, e).await;
        };
        let columns = match stmt.stmt.as_ref().map(|s| &s.kind) {
            None => Vec::new(),
            // After a write of the pipeline, the read runs with it at Sync: described only.
            Some(Kind::Read { .. }) if !self.pipeline.is_empty() => {
                match self.describe_prepared(&stmt).await {
                    Ok(d) => d.columns,
                    Err(e) => return self.fail(out, error::response(&e, Op::Read, 0)).await,
                }
            }
            Some(Kind::Read { .. }) => match self.start_portal_read(name).await {
                Ok(c) => c,
                Err(e) => return self.fail(out, error::response(&e, Op::Read, 0)).await,
            },
            Some(Kind::Show { name: setting }) => match self.settings.show(setting) {
                Some((shown, _)) => vec![text_column(&shown)],
                None => match self.start_portal_read(name).await {
                    Ok(c) => c,
                    Err(e) => return self.fail(out, error::response(&e, Op::Read, 0)).await,
                },
            },
            Some(Kind::Write { .. }) => {
                let stmt_name = self
                    .statements
                    .iter()
                    .find(|(_, p)| Arc::ptr_eq(p, &stmt))
                    .map(|(k, _)| k.clone());
                let d = match stmt_name {
                    Some(n) => self.description(&n, &stmt).await,
                    None => self.describe_prepared(&stmt).await,
                };
                match d {
                    Ok(d) => d.columns,
                    Err(e) => return self.fail(out, error::response(&e, Op::Read, 0)).await,
                }
            }
            Some(_) => Vec::new(),
        };
        if columns.is_empty() {
            return out.feed(B::NoData(NoData::new())).await;
        }
        let formats = match self.portals.get(name) {
            Some(p) => values::formats_for(&p.result_formats, columns.len()),
            None => vec![0; columns.len()],
        };
        out.feed(B::RowDescription(row_description(&columns, &formats)))
            .await
    }

    /// `Execute` of a portal, sending at most `max_rows` rows (0: all).
    pub async fn execute(&mut self, out: &mut Wire, m: Execute) -> Io {
        self.cancel.reset();
        let name = m.name.clone().unwrap_or_default();
        let Some(portal) = self.portals.get(&name) else {
            let e = error::plain("34000", format!("portal \"{name}\" does not exist"));
            return self.fail(out, e).await;
        };
        let Some(stmt) = portal.stmt.stmt.clone() else {
            return out
                .feed(B::EmptyQueryResponse(EmptyQueryResponse::new()))
                .await;
        };
        let max_rows = usize::try_from(m.max_rows).unwrap_or(0);
        // A write waits for Sync, with the Executes after it: PostgreSQL runs the Executes
        // between two Syncs as one implicit transaction, and so does raftpg (one write).
        if self.txn.is_some() {
            return self.execute_in_txn(out, &name, stmt, max_rows).await;
        }
        let deferrable = match &stmt.kind {
            Kind::Write { .. } => true,
            Kind::Read { .. } => !self.pipeline.is_empty() && portal.read.is_none(),
            _ => false,
        };
        if deferrable && self.pipeline.len() >= PIPELINE_MAX {
            let e = error::plain(
                "54000",
                format!("a pipeline may hold at most {PIPELINE_MAX} Executes before its Sync"),
            );
            return self.fail(out, e).await;
        }
        if deferrable {
            let deferred = Deferred {
                stmt: stmt.clone(),
                params: portal.params.clone(),
                formats: portal.result_formats.clone(),
            };
            out.hold();
            out.slot(self.pipeline.len());
            self.pipeline.push(deferred);
            return Ok(());
        }
        if !self.pipeline.is_empty() {
            // A session command or a read already running: the writes before it run first.
            self.run_pipeline(out).await?;
            if self.skipping {
                return Ok(());
            }
        }
        match &stmt.kind {
            Kind::Read { tag } => self.execute_read(out, &name, tag, max_rows).await,
            Kind::Show { name: setting } if self.settings.show(setting).is_none() => {
                self.execute_read(out, &name, "SHOW", max_rows).await
            }
            _ => match self.session_command(out, &stmt, false).await? {
                Ok(()) => Ok(()),
                Err(e) => self.fail(out, e).await,
            },
        }
    }

    /// `Execute` in an interactive transaction: runs at once, in the transaction.
    async fn execute_in_txn(
        &mut self,
        out: &mut Wire,
        name: &str,
        stmt: Statement,
        max_rows: usize,
    ) -> Io {
        if let Some(e) = self.refused_in_failed_txn(&stmt.kind).await {
            return self.fail(out, e).await;
        }
        match &stmt.kind {
            // Its rows are sent as a read's (`max_rows` at a time).
            Kind::Read { tag } if runs_in_txn(&stmt.kind) => {
                self.execute_read(out, name, tag, max_rows).await
            }
            Kind::Write { .. } => {
                let Some(portal) = self.portals.get(name) else {
                    return Ok(());
                };
                let (params, formats) = (portal.params.clone(), portal.result_formats.clone());
                let Some(txn) = &self.txn else {
                    return Ok(());
                };
                match txn.execute(txn_statement(&stmt, params)).await {
                    Ok(r) => {
                        for m in result_messages(&stmt, &r, &formats, self.settings.text()) {
                            out.feed(m).await?;
                        }
                        Ok(())
                    }
                    Err(e) => self.fail(out, error::response(&e, Op::Write, 0)).await,
                }
            }
            Kind::Read { tag } => self.execute_read(out, name, tag, max_rows).await,
            Kind::Show { name: setting } if self.settings.show(setting).is_none() => {
                self.execute_read(out, name, "SHOW", max_rows).await
            }
            _ => match self.session_command(out, &stmt, false).await? {
                Ok(()) => Ok(()),
                Err(e) => self.fail(out, e).await,
            },
        }
    }

    async fn execute_read(&mut self, out: &mut Wire, name: &str, tag: &str, max_rows: usize) -> Io {
        let started = self
            .portals
            .get(name)
            .is_some_and(|p| p.read.is_some() || p.done);
        if !started {
            if let Err(e) = self.start_portal_read(name).await {
                return self.fail(out, error::response(&e, Op::Read, 0)).await;
            }
        }
        let text = self.settings.text();
        let cancel = self.cancel.clone();
        let Some(portal) = self.portals.get_mut(name) else {
            return Ok(());
        };
        let Some(read) = portal.read.as_mut() else {
            // Ran to its end before: nothing more.
            let tag = read_tag(tag, 0);
            return out
                .feed(B::CommandComplete(CommandComplete::new(tag)))
                .await;
        };
        let formats = values::formats_for(&portal.result_formats, read.columns.len());
        let mut n = 0usize;
        loop {
            if max_rows > 0 && n >= max_rows {
                return out.feed(B::PortalSuspended(PortalSuspended::new())).await;
            }
            match read.next_row(&cancel).await {
                Ok(Some(row)) => {
                    let r = data_row(&row, &read.columns, &formats, text);
                    match r {
                        Ok(r) => out.feed(B::DataRow(r)).await?,
                        Err(e) => {
                            portal.read = None;
                            return self.fail(out, error::plain("0A000", e.to_string())).await;
                        }
                    }
                    n += 1;
                    portal.sent += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    portal.read = None;
                    return self.fail(out, error::response(&e, Op::Read, 0)).await;
                }
            }
        }
        let total = portal.sent;
        portal.read = None;
        portal.done = true;
        out.feed(B::CommandComplete(CommandComplete::new(read_tag(
            tag, total,
        ))))
        .await
    }

    /// `Close` of a statement or portal.
    pub async fn close(&mut self, out: &mut Wire, m: Close) -> Io {
        let name = m.name.unwrap_or_default();
        match m.target_type {
            TARGET_TYPE_BYTE_STATEMENT => {
                self.statements.remove(&name);
            }
            TARGET_TYPE_BYTE_PORTAL => {
                self.portals.remove(&name);
            }
            _ => {}
        }
        out.feed(B::CloseComplete(CloseComplete::new())).await
    }

    /// `Sync`: the end of an extended-query exchange; the pipeline's writes run now.
    pub async fn sync(&mut self, out: &mut Wire) -> Io {
        self.run_pipeline(out).await?;
        self.skipping = false;
        self.portals.remove("");
        self.ready(out).await
    }

    /// `Flush`: what is held is sent — a pipeline's writes run now, as one write, and the
    /// `Execute`s after this start another.
    pub async fn flush(&mut self, out: &mut Wire) -> Io {
        self.run_pipeline(out).await?;
        out.flush().await
    }

    /// Runs the deferred `Execute`s as one write and sends the held output with their
    /// results in place. When the pipeline failed (a write's error, or an error of a later
    /// message while the output was held), nothing of it was written and the error takes the
    /// place of its first `Execute`: PostgreSQL's implicit transaction was rolled back.
    async fn run_pipeline(&mut self, out: &mut Wire) -> Io {
        let deferred = std::mem::take(&mut self.pipeline);
        let failed_before = self.pipeline_error.take();
        if deferred.is_empty() {
            return out.release(|_| None).await;
        }
        let n = deferred.len();
        let result = match failed_before {
            Some(e) => Err(e),
            None => {
                let stmts: Vec<(&Statement, Vec<SqlValue>)> = deferred
                    .iter()
                    .map(|d| (&d.stmt, d.params.clone()))
                    .collect();
                self.write(&stmts).await.map_err(|e| {
                    let mut r = error::response(&e, Op::Write, 0);
                    if n > 1 {
                        r.fields.push((
                            b'W',
                            format!(
                                "statement {} of a pipeline of {n}; none of them took effect",
                                e.statement_index + 1
                            ),
                        ));
                    }
                    r
                })
            }
        };
        match result {
            Ok(results) => {
                let text = self.settings.text();
                let mut filled: Vec<Option<Vec<B>>> = deferred
                    .iter()
                    .zip(results)
                    .map(|(d, r)| Some(result_messages(&d.stmt, &r, &d.formats, text)))
                    .collect();
                out.release(|i| filled.get_mut(i).and_then(Option::take))
                    .await?;
                self.report_last_write(out).await
            }
            Err(e) => {
                self.skipping = true;
                let mut first = Some(vec![B::ErrorResponse(e)]);
                out.release(|i| match i {
                    0 => first.take(),
                    _ => None,
                })
                .await
            }
        }
    }

    /// Reports an extended-query error and skips until `Sync`. While a pipeline's output is
    /// held, the error ends the pipeline (see [`Session::run_pipeline`]).
    async fn fail(&mut self, out: &mut Wire, e: pgwire::messages::response::ErrorResponse) -> Io {
        self.skipping = true;
        if let Some(txn) = &self.txn {
            // Any error inside a transaction block fails the transaction (PostgreSQL's rule).
            txn.mark_failed().await;
        }
        if !self.pipeline.is_empty() {
            self.pipeline_error.get_or_insert(e);
            return Ok(());
        }
        out.feed(B::ErrorResponse(e)).await
    }

    // ------------------------------------------------------------------------ COPY

    /// `COPY … FROM STDIN`: asks for the rows, and writes them as `INSERT`s of text-form
    /// values, one write per [`copy::BATCH_BYTES_MAX`] of data. After an error the client's
    /// remaining copy messages are dropped by the message loop, as PostgreSQL does.
    async fn copy_in(
        &mut self,
        out: &mut Wire,
        c: &copy::CopyIn,
    ) -> std::io::Result<Result<(), pgwire::messages::response::ErrorResponse>> {
        let columns = match &c.columns {
            Some(cols) => cols.clone(),
            None => match self.table_columns(c).await {
                Ok(cols) => cols,
                Err(e) => return Ok(Err(error::response(&e, Op::Read, 0))),
            },
        };
        let n = columns.len();
        out.feed(B::CopyInResponse(CopyInResponse::new(
            0,
            n as i16,
            vec![0; n],
        )))
        .await?;
        out.flush().await?;
        let mut parser = copy::Parser::new(c.format.clone());
        let mut batch: Vec<copy::Row> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut written = 0u64;
        // Inside a transaction block the rows are its statements: an error fails the block and
        // nothing stays written, so the errors do not count rows written before.
        let in_txn = self.txn.is_some();
        let counted = |written: u64| if in_txn { 0 } else { written };
        loop {
            let (rows, done) = match out.next().await {
                None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Some(Ok(F::CopyData(d))) => (parser.feed(&d.data), false),
                Some(Ok(F::CopyDone(_))) => (parser.finish(), true),
                Some(Ok(F::CopyFail(f))) => {
                    return Ok(Err(copy_error(
                        "57014",
                        format!("COPY from stdin failed: {}", f.message),
                        counted(written),
                    )))
                }
                Some(Ok(F::Flush(_))) | Some(Ok(F::Sync(_))) => continue,
                Some(Ok(_)) => {
                    return Ok(Err(copy_error(
                        "08P01",
                        "unexpected message type during COPY from stdin".into(),
                        counted(written),
                    )))
                }
                Some(Err(e)) => {
                    return Ok(Err(copy_error("08P01", e.to_string(), counted(written))));
                }
            };
            let rows = match rows {
                Ok(r) => r,
                Err(m) => return Ok(Err(copy_error("22P04", m, counted(written)))),
            };
            for row in rows {
                if row.len() != n {
                    let m = format!(
                        "line {}: {} of {n} columns",
                        parser.line().saturating_sub(1),
                        row.len()
                    );
                    return Ok(Err(copy_error("22P04", m, counted(written))));
                }
                batch_bytes += row
                    .iter()
                    .map(|f| f.as_ref().map_or(0, String::len) + copy::VALUE_OVERHEAD_BYTES)
                    .sum::<usize>();
                batch.push(row);
                if batch_bytes >= copy::BATCH_BYTES_MAX {
                    match self
                        .write_rows(c, &columns, std::mem::take(&mut batch))
                        .await
                    {
                        Ok(k) => written += k,
                        Err(e) => return Ok(Err(copy_failed(&e, counted(written)))),
                    }
                    batch_bytes = 0;
                }
            }
            if done {
                break;
            }
        }
        if !batch.is_empty() {
            match self.write_rows(c, &columns, batch).await {
                Ok(k) => written += k,
                Err(e) => return Ok(Err(copy_failed(&e, counted(written)))),
            }
        }
        out.feed(B::CommandComplete(CommandComplete::new(format!(
            "COPY {written}"
        ))))
        .await?;
        if written > 0 {
            self.report_last_write(out).await?;
        }
        Ok(Ok(()))
    }

    /// The columns a `COPY` without a column list fills: the table's, in order, except
    /// generated ones (as PostgreSQL's COPY does).
    async fn table_columns(&self, c: &copy::CopyIn) -> Result<Vec<String>, ServiceError> {
        let sql = "SELECT pg_catalog.quote_ident(attname) FROM pg_catalog.pg_attribute \
                   WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
                   AND attgenerated = '' ORDER BY attnum";
        if let Some(txn) = &self.txn {
            // The table as the transaction sees it (one it created or altered too). The write
            // gate keeps catalogs out of transactions, so this cannot tell generated columns:
            // inside a transaction block, a COPY into a table with generated columns needs its
            // column list (PostgreSQL's error says so otherwise).
            let d = txn
                .describe(&format!("SELECT * FROM {}", c.table), &[])
                .await?;
            return Ok(d
                .columns
                .iter()
                .map(|col| copy::quote_ident(&col.name))
                .collect());
        }
        let s = Statement {
            sql: sql.into(),
            offset: 0,
            kind: Kind::Read {
                tag: "SELECT".into(),
            },
        };
        let param = SqlValue::PgText {
            type_oid: 0,
            text: c.table_text.clone(),
        };
        let mut read = self.start_read(&s, &[param], &[], &[]).await?;
        let mut columns = Vec::new();
        while let Some(row) = read.next_row(&self.cancel).await? {
            if let Some(SqlValue::Text(name)) = row.into_iter().next() {
                columns.push(name);
            }
        }
        Ok(columns)
    }

    /// Writes COPY rows as one write of `INSERT`s (inside a transaction block, as statements of
    /// the transaction); returns the rows written.
    async fn write_rows(
        &mut self,
        c: &copy::CopyIn,
        columns: &[String],
        rows: Vec<copy::Row>,
    ) -> Result<u64, ServiceError> {
        let n = columns.len().max(1);
        let per_insert = copy::ROWS_PER_INSERT_MAX.min(65_535 / n).max(1);
        let total = rows.len() as u64;
        let mut stmts: Vec<(Statement, Vec<SqlValue>)> = Vec::new();
        for chunk in rows.chunks(per_insert) {
            let sql = copy::insert_sql(&c.table, columns, chunk.len());
            let params = chunk
                .iter()
                .flat_map(|r| r.iter())
                .map(|f| match f {
                    None => SqlValue::Null,
                    Some(t) => SqlValue::PgText {
                        type_oid: 0,
                        text: t.clone(),
                    },
                })
                .collect();
            let stmt = Statement {
                sql,
                offset: 0,
                kind: Kind::Write {
                    tag: "INSERT".into(),
                },
            };
            stmts.push((stmt, params));
        }
        if let Some(txn) = &self.txn {
            // Statements of the transaction (its size limit bounds the COPY).
            for (s, params) in stmts {
                txn.execute(txn_statement(&s, params)).await?;
            }
            return Ok(total);
        }
        let refs: Vec<(&Statement, Vec<SqlValue>)> =
            stmts.iter().map(|(s, p)| (s, p.clone())).collect();
        self.write(&refs).await?;
        Ok(total)
    }

    // ----------------------------------------------------------------- service calls

    /// What PostgreSQL infers for prepared statement `name`, asked once.
    async fn description(
        &mut self,
        name: &str,
        prepared: &Arc<Prepared>,
    ) -> Result<Description, ServiceError> {
        if let Some(d) = &prepared.described {
            return Ok(d.clone());
        }
        let d = self.describe_prepared(prepared).await?;
        self.remember_description(name, prepared, d.clone());
        Ok(d)
    }

    fn remember_description(
        &mut self,
        name: &str,
        prepared: &Arc<Prepared>,
        d: Description,
    ) -> Arc<Prepared> {
        let updated = Arc::new(Prepared {
            stmt: prepared.stmt.clone(),
            param_types: prepared.param_types.clone(),
            described: Some(d),
        });
        if self
            .statements
            .get(name)
            .is_some_and(|p| Arc::ptr_eq(p, prepared))
        {
            self.statements.insert(name.to_string(), updated.clone());
        }
        updated
    }

    async fn describe_prepared(&self, prepared: &Prepared) -> Result<Description, ServiceError> {
        let Some(s) = &prepared.stmt else {
            return Ok(Description::default());
        };
        match &s.kind {
            // Inside a transaction, on its session: it sees what the transaction created.
            Kind::Read { .. } | Kind::Write { .. } => {
                if let Some(txn) = &self.txn {
                    return txn.describe(&s.sql, &prepared.param_types).await;
                }
                self.svc
                    .describe(
                        &s.sql,
                        &prepared.param_types,
                        self.principal.as_ref(),
                        self.settings.last_write_index(),
                        &self.settings.overrides(),
                    )
                    .await
            }
            Kind::Show { name } => match self.settings.show(name) {
                Some((shown, _)) => Ok(Description {
                    param_types: Vec::new(),
                    columns: vec![text_column(&shown)],
                }),
                None => {
                    self.svc
                        .describe(
                            &s.sql,
                            &[],
                            self.principal.as_ref(),
                            0,
                            &self.settings.overrides(),
                        )
                        .await
                }
            },
            _ => Ok(Description::default()),
        }
    }

    /// Starts the read of portal `name` (if not started) and returns its columns.
    async fn start_portal_read(&mut self, name: &str) -> Result<Vec<ColumnInfo>, ServiceError> {
        let Some(portal) = self.portals.get(name) else {
            return Ok(Vec::new());
        };
        if let Some(r) = &portal.read {
            return Ok(r.columns.clone());
        }
        let Some(s) = portal.stmt.stmt.clone() else {
            return Ok(Vec::new());
        };
        let params = portal.params.clone();
        let types = param_types_of(&portal.stmt);
        let formats = portal.result_formats.clone();
        let read = match self.txn.is_some() && runs_in_txn(&s.kind) {
            true => self.txn_read(&s, params).await?,
            false => self.start_read(&s, &params, &types, &formats).await?,
        };
        let columns = read.columns.clone();
        if let Some(p) = self.portals.get_mut(name) {
            p.read = Some(read);
        }
        Ok(columns)
    }

    /// Admits a read of `s` at the session's consistency and starts it; returns once its
    /// columns are known (or it failed).
    async fn start_read(
        &self,
        s: &Statement,
        params: &[SqlValue],
        param_types: &[u32],
        result_formats: &[i16],
    ) -> Result<RunningRead, ServiceError> {
        let req = ReadRequest {
            sql: s.sql.clone(),
            params: Ok(params.to_vec()),
            param_types: param_types.to_vec(),
            result_formats: result_formats.to_vec(),
            settings: self.settings.overrides(),
            consistency: Ok(self.settings.consistency()),
            timeout_ms: self.settings.statement_timeout_ms(),
            max_rows: 0,
            streamed: true,
            encoded_bytes: s.sql.len()
                + params
                    .iter()
                    .map(crate::pg::values::wire_size)
                    .sum::<usize>(),
            principal: self.principal.clone(),
            allow_diverged: self.settings.allow_diverged_reads(),
        };
        let admitted = tokio::select! {
            a = self.svc.admit_read(req) => a?,
            _ = self.cancel.cancelled() => return Err(cancelled()),
        };
        let (tx, mut rx) = mpsc::channel(2);
        let (done_tx, done_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let _ = done_tx.send(admitted.run(tx).await);
        });
        let first = tokio::select! {
            c = rx.recv() => c,
            _ = self.cancel.cancelled() => {
                task.abort();
                return Err(cancelled());
            }
        };
        match first {
            Some(c) => Ok(RunningRead {
                columns: c.columns,
                rows: c.rows.into(),
                rx,
                done: Some(done_rx),
                task,
            }),
            None => match done_rx.await {
                Ok(Err(e)) => Err(e),
                _ => Err(ServiceError::internal("the read ended without a result")),
            },
        }
    }

    /// The session's settings as the first statements of a write or transaction (`SET LOCAL`,
    /// reset when it ends).
    fn settings_prefix(&self) -> Vec<WriteStatement> {
        self.settings
            .overrides()
            .into_iter()
            .map(|(name, value)| set_local_statement(&name, Some(&value)))
            .collect()
    }

    /// Runs `stmts` as one write and returns each statement's result.
    async fn write(
        &mut self,
        stmts: &[(&Statement, Vec<SqlValue>)],
    ) -> Result<Vec<StatementOutcome>, ServiceError> {
        let prefix = self.settings_prefix();
        let skip = prefix.len();
        let encoded_bytes = stmts
            .iter()
            .map(|(s, p)| s.sql.len() + p.iter().map(crate::pg::values::wire_size).sum::<usize>())
            .sum();
        let req = WriteRequest {
            statements: prefix
                .into_iter()
                .chain(stmts.iter().map(|(s, p)| WriteStatement {
                    sql: s.sql.clone(),
                    params: Ok(p.clone()),
                }))
                .collect(),
            request_id: None,
            encoded_bytes,
            origin: Origin::Client,
            principal: self.principal.clone(),
        };
        let outcome = self.svc.write(req).await.map_err(|mut e| {
            e.statement_index = e.statement_index.saturating_sub(skip as u32);
            e
        })?;
        self.settings.wrote(outcome.log_index);
        Ok(outcome.results.into_iter().skip(skip).collect())
    }

    async fn send_write_result(
        &self,
        out: &mut Wire,
        s: &Statement,
        r: &StatementOutcome,
        extended_formats: Option<&[i16]>,
    ) -> Io {
        let tag = match &s.kind {
            Kind::Write { tag } | Kind::Read { tag } => tag.clone(),
            _ => String::new(),
        };
        if !r.columns.is_empty() {
            let formats = match extended_formats {
                Some(f) => values::formats_for(f, r.columns.len()),
                None => vec![0; r.columns.len()],
            };
            if extended_formats.is_none() {
                out.feed(B::RowDescription(row_description(&r.columns, &formats)))
                    .await?;
            }
            for row in &r.rows {
                match data_row(row, &r.columns, &formats, self.settings.text()) {
                    Ok(d) => out.feed(B::DataRow(d)).await?,
                    Err(e) => {
                        return out
                            .feed(B::ErrorResponse(error::plain("0A000", e.to_string())))
                            .await
                    }
                }
            }
        }
        out.feed(B::CommandComplete(CommandComplete::new(write_tag(&tag, r))))
            .await
    }

    /// Tells the client the log index of its last write.
    async fn report_last_write(&self, out: &mut Wire) -> Io {
        out.feed(B::ParameterStatus(ParameterStatus::new(
            LAST_WRITE_INDEX.to_string(),
            self.settings.last_write_index().to_string(),
        )))
        .await
    }
}

/// An error that ends a COPY, saying how many of its rows earlier writes already wrote.
fn copy_error(
    sqlstate: &str,
    message: String,
    written: u64,
) -> pgwire::messages::response::ErrorResponse {
    let mut e = error::plain(sqlstate, message);
    if written > 0 {
        e.fields.push((b'D', written_detail(written)));
    }
    e
}

/// A write of a COPY's rows that failed.
fn copy_failed(e: &ServiceError, written: u64) -> pgwire::messages::response::ErrorResponse {
    let mut r = error::response(e, Op::Write, 0);
    if written > 0 {
        r.fields.push((b'D', written_detail(written)));
    }
    r
}

fn written_detail(written: u64) -> String {
    format!("{written} rows of this COPY were written by earlier writes and stay written")
}

/// The parameter types a prepared statement runs with: the client's, else PostgreSQL's
/// inference when it was described (so binary parameters are read as what they were decoded
/// as).
fn param_types_of(p: &Prepared) -> Vec<u32> {
    let n = p
        .param_types
        .len()
        .max(p.described.as_ref().map_or(0, |d| d.param_types.len()));
    (0..n).map(|i| param_type(p, i)).collect()
}

fn param_type(p: &Prepared, i: usize) -> u32 {
    match p.param_types.get(i).copied().unwrap_or(0) {
        0 => p
            .described
            .as_ref()
            .and_then(|d| d.param_types.get(i).copied())
            .unwrap_or(0),
        t => t,
    }
}

/// The statements of a string wrapped in `BEGIN` ... `COMMIT` (that is what a string is
/// anyway: one transaction), or all of them.
fn strip_transaction_block(stmts: &[Statement]) -> Vec<&Statement> {
    let n = stmts.len();
    if n >= 2
        && stmts[0].kind == Kind::Begin
        && stmts[n - 1].kind == (Kind::End { commit: true })
        && !stmts[1..n - 1]
            .iter()
            .any(|s| matches!(s.kind, Kind::Begin | Kind::End { .. }))
    {
        return stmts[1..n - 1].iter().collect();
    }
    stmts.iter().collect()
}

/// Whether a statement of a session in a transaction runs in the transaction (queries, and
/// writes; `EXPLAIN` and server settings' `SHOW` are answered from the node's read connection).
fn runs_in_txn(k: &Kind) -> bool {
    match k {
        Kind::Read { tag } => tag == "SELECT",
        Kind::Write { .. } => true,
        _ => false,
    }
}

/// `SET LOCAL` of session setting `name` (one of [`SESSION_SETTINGS`]) to `value`, or to
/// raftpg's fixed value (`None`: `TO DEFAULT`, the applier's connection value).
fn set_local_statement(name: &str, value: Option<&str>) -> WriteStatement {
    let sql = match value {
        // A list of schema names, each quoted (never the client's text as SQL).
        Some(v) if name.eq_ignore_ascii_case("search_path") => format!(
            "SET LOCAL search_path TO {}",
            super::settings::search_path_idents(v)
                .unwrap_or_default()
                .join(", ")
        ),
        Some(v) => format!("SET LOCAL {name} TO {}", quote_literal(v)),
        None => format!("SET LOCAL {name} TO DEFAULT"),
    };
    WriteStatement {
        sql,
        params: Ok(Vec::new()),
    }
}

/// A statement of a transaction with its parameters.
fn txn_statement(s: &Statement, params: Vec<SqlValue>) -> WriteStatement {
    WriteStatement {
        sql: s.sql.clone(),
        params: Ok(params),
    }
}

fn is_session_command(k: &Kind) -> bool {
    !matches!(k, Kind::Read { .. } | Kind::Write { .. })
}

fn mixed_with_writes(s: &Statement) -> ServiceError {
    ServiceError {
        hint: "Send SET, SHOW and transaction control in a query string of their own; a string with writes runs as one write through the log.".into(),
        ..ServiceError::refused(
            ErrorKind::Unsupported,
            "0A000",
            format!("\"{}\" cannot run in the same query string as writes", first_line(&s.sql)),
        )
    }
}

fn copy_not_alone() -> ServiceError {
    ServiceError::refused(
        ErrorKind::Unsupported,
        "0A000",
        "send COPY FROM STDIN in a query string of its own",
    )
}

/// `s` as a SQL string literal.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn first_line(sql: &str) -> String {
    let line = sql.lines().next().unwrap_or_default();
    line.chars().take(60).collect()
}

fn unreachable_write() -> std::io::Result<Result<(), pgwire::messages::response::ErrorResponse>> {
    Ok(Err(error::plain("XX000", "a write reached the read path")))
}

fn text_column(name: &str) -> ColumnInfo {
    ColumnInfo {
        name: name.to_string(),
        type_name: "text".into(),
        type_oid: postgres_types::Type::TEXT.oid(),
    }
}

/// The messages of a statement's result in the extended protocol (its rows in `formats`, its
/// command tag), or the error that stops it.
fn result_messages(
    s: &Statement,
    r: &StatementOutcome,
    formats: &[i16],
    text: TextSettings,
) -> Vec<B> {
    let tag = match &s.kind {
        Kind::Write { tag } | Kind::Read { tag } => tag.clone(),
        _ => String::new(),
    };
    let formats = values::formats_for(formats, r.columns.len());
    let mut out = Vec::with_capacity(r.rows.len() + 1);
    for row in &r.rows {
        match data_row(row, &r.columns, &formats, text) {
            Ok(d) => out.push(B::DataRow(d)),
            Err(e) => {
                out.push(B::ErrorResponse(error::plain("0A000", e.to_string())));
                return out;
            }
        }
    }
    out.push(B::CommandComplete(CommandComplete::new(match s.kind {
        Kind::Read { .. } => read_tag(&tag, r.rows.len() as u64),
        _ => write_tag(&tag, r),
    })));
    out
}

/// The tag of a read that returned `n` rows.
fn read_tag(tag: &str, n: u64) -> String {
    match tag {
        "SELECT" => format!("SELECT {n}"),
        other => other.to_string(),
    }
}

/// The tag of a write's statement.
fn write_tag(tag: &str, r: &StatementOutcome) -> String {
    let n = r.rows_affected;
    match tag {
        "INSERT" => format!("INSERT 0 {n}"),
        "UPDATE" | "DELETE" | "MERGE" | "SELECT" | "COPY" | "FETCH" | "MOVE" => {
            format!("{tag} {n}")
        }
        other => other.to_string(),
    }
}

/// A `RowDescription` of `columns` sent in `formats`.
fn row_description(columns: &[ColumnInfo], formats: &[i16]) -> RowDescription {
    RowDescription::new(
        columns
            .iter()
            .zip(formats.iter().chain(std::iter::repeat(&0)))
            .map(|(c, f)| {
                let ty = postgres_types::Type::from_oid(c.type_oid);
                FieldDescription::new(
                    c.name.clone(),
                    0,
                    0,
                    c.type_oid,
                    type_size(ty.as_ref()),
                    -1,
                    *f,
                )
            })
            .collect(),
    )
}

/// `pg_type.typlen` of the common fixed-size types (-1 for the rest).
fn type_size(ty: Option<&postgres_types::Type>) -> i16 {
    use postgres_types::Type as T;
    match ty {
        Some(&T::BOOL) | Some(&T::CHAR) => 1,
        Some(&T::INT2) => 2,
        Some(&T::INT4) | Some(&T::OID) | Some(&T::FLOAT4) | Some(&T::DATE) => 4,
        Some(&T::INT8) | Some(&T::FLOAT8) | Some(&T::TIMESTAMP) | Some(&T::TIMESTAMPTZ) => 8,
        Some(&T::UUID) => 16,
        Some(&T::NAME) => 64,
        _ => -1,
    }
}

/// One `DataRow`.
fn data_row(
    row: &[SqlValue],
    columns: &[ColumnInfo],
    formats: &[i16],
    text: TextSettings,
) -> Result<DataRow, values::WireValueError> {
    let mut data = bytes::BytesMut::new();
    for (i, v) in row.iter().enumerate() {
        let oid = columns.get(i).map_or(0, |c| c.type_oid);
        let binary = formats.get(i).copied().is_some_and(values::is_binary);
        let cell = if binary {
            values::binary_of(v, oid)?
        } else {
            values::text_of(v, oid, text)?
        };
        match cell {
            None => data.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(b) => {
                data.extend_from_slice(&(b.len() as i32).to_be_bytes());
                data.extend_from_slice(&b);
            }
        }
    }
    Ok(DataRow::new(data, row.len() as i16))
}
