//! The applier connection: the one PostgreSQL session that applies log entries on this node.
//!
//! Owns the connection, its fixed session settings, the prepared statements of raftpg's own
//! bookkeeping, and a cache of prepared user statements. Runs one write entry inside a savepoint
//! with its commands pipelined (design.md invariants 2 and 3):
//!
//! 1. one round trip: the previous entry's end (release its savepoint, record its outcome) or
//!    the batch's BEGIN, this entry's savepoint with its timestamp and seed, the request id
//!    lookup, and every statement that is already prepared;
//! 2. statements that are not prepared yet (first use, or after DDL) are prepared and executed
//!    one by one, so that each sees the effects of the previous ones;
//! 3. the entry's end goes with the next entry's round trip, or with the batch's end (record the
//!    applied position, COMMIT): a batch of n prepared entries costs n + 1 round trips.
//!
//! A duplicate request (its id has a live record) still runs its statements and is then rolled
//! back, like any other entry: nodes with and without a statement prepared must consume the same
//! sequence values.
//!
//! Cache rule: only DML statements are cached, and an entry that contains any other statement
//! (DDL can change what a prepared statement means) empties the cache when it ends, whether it
//! succeeded or not. A "cached plan must not change result type" error is treated as
//! environmental: the connection is dropped (emptying the cache) and the batch retried, so a
//! stale cache can never become a recorded result.

use std::collections::HashMap;

use futures::TryStreamExt;
use postgres_types::ToSql;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};
use tracing::debug;

use crate::command::{
    ApplyOutcome, ColumnInfo, RequestId, SqlFailure, SqlStatement, StatementOutcome, WriteCommand,
};
use crate::request_log;
use crate::state_machine::ApplyLimits;
use crate::values::{self, Cell};

/// Most prepared user statements kept per connection.
const STATEMENT_CACHE_MAX: usize = 512;

/// An error while applying that is not the entry's fault (design.md invariant 3).
#[derive(Debug, thiserror::Error)]
#[error("environmental error: {0}")]
pub struct EnvError(pub String);

impl From<tokio_postgres::Error> for EnvError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => EnvError(format!("{} ({})", db.message(), db.code().code())),
            None => EnvError(e.to_string()),
        }
    }
}

/// Failure of one statement: either the entry's result, or a reason to retry the batch.
enum StmtError {
    Deterministic(SqlFailure),
    Environmental(EnvError),
}

/// Whether a SQLSTATE is raised the same way on every node for the same entry and state.
/// Unknown classes are treated as environmental: retrying is safe, recording is not.
pub fn is_deterministic(code: &str) -> bool {
    const CLASSES: [&str; 15] = [
        "0A", "21", "22", "23", "27", "2B", "2F", "38", "39", "3D", "3F", "42", "44", "54", "P0",
    ];
    const CODES: [&str; 5] = ["55000", "25001", "0B000", "2D000", "3B001"];
    CLASSES.iter().any(|c| code.starts_with(c)) || CODES.contains(&code)
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
        if is_deterministic(code) && !stale_cache {
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

/// Session settings of the applier; the same on every node.
const SESSION_SQL: &str = "
    SET statement_timeout = 0;
    SET lock_timeout = 0;
    SET idle_in_transaction_session_timeout = 0;
    SET synchronous_commit = off;
    SET TimeZone = 'UTC';
    SET DateStyle = 'ISO, MDY';
    SET IntervalStyle = 'postgres';
    SET extra_float_digits = 1;
    SET client_min_messages = warning;
    SET default_transaction_isolation = 'read committed';
    SET default_transaction_read_only = off;
    SET search_path = public;
";

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
    fetch_live: Statement,
    record: Statement,
    record_applied: Statement,
    cache: HashMap<String, Statement>,
}

/// The end of a batch transaction, pipelined with its last entry: record the applied log
/// position (invariant 1) and commit.
pub struct BatchEnd {
    /// Last applied log index.
    pub log_index: i64,
    /// Last applied log id (JSON).
    pub log_id: serde_json::Value,
    /// Last membership (JSON).
    pub membership: serde_json::Value,
}

/// Records the batch's end in the batch's own transaction (invariant 1), with the current
/// position of every sequence that has been used (restored after a PostgreSQL crash, which can
/// make sequences skip values on one node only).
const RECORD_APPLIED_SQL: &str = "
    UPDATE raftpg.applied SET log_index = $1, log_id = $2, membership = $3,
        sequences = (SELECT coalesce(jsonb_object_agg(format('%I.%I', schemaname, sequencename), last_value), '{}'::jsonb)
                     FROM pg_sequences WHERE last_value IS NOT NULL)";

impl Applier {
    /// Connects and sets the session up (bootstrap of raftpg's schema is the caller's).
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Self, EnvError> {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "applier connection closed");
            }
        });
        client.batch_execute(SESSION_SQL).await?;
        Ok(Applier {
            fetch_live: client.prepare("SELECT 1").await?,
            record: client.prepare("SELECT 1").await?,
            record_applied: client.prepare("SELECT 1").await?,
            client,
            cache: HashMap::new(),
        })
    }

    /// Prepares raftpg's bookkeeping statements (after the schema exists).
    pub async fn prepare_bookkeeping(&mut self) -> Result<(), EnvError> {
        self.fetch_live = self.client.prepare(request_log::FETCH_LIVE_SQL).await?;
        self.record = self.client.prepare(request_log::RECORD_SQL).await?;
        self.record_applied = self.client.prepare(RECORD_APPLIED_SQL).await?;
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

    /// The recorded outcome of `id` if it was applied within the retention before `index`.
    pub async fn recorded_outcome(
        &self,
        id: &RequestId,
        index: u64,
        retention: u64,
    ) -> Result<Option<ApplyOutcome>, EnvError> {
        let floor = request_log::retention_floor(index, retention);
        let row = self
            .client
            .query_opt(
                &self.fetch_live,
                &[&id.client_id, &request_log::seq(id), &floor],
            )
            .await?;
        row.map(|r| request_log::decode(r.get(0)).map_err(EnvError))
            .transpose()
    }

    /// Sends the end of the previous entry (if any) and, with `end`, records the batch's applied
    /// position and commits — in one round trip.
    pub async fn flush(
        &self,
        pending: Option<EntryFinish>,
        end: Option<&BatchEnd>,
    ) -> Result<(), EnvError> {
        let commit = async {
            match end {
                Some(end) => {
                    let params: [&(dyn ToSql + Sync); 3] =
                        [&end.log_index, &end.log_id, &end.membership];
                    let (recorded, committed) = tokio::join!(
                        self.client.execute(&self.record_applied, &params),
                        self.client.batch_execute("COMMIT")
                    );
                    recorded?;
                    committed?;
                    Ok(())
                }
                None => Ok(()),
            }
        };
        let (finished, committed) = tokio::join!(self.finish(pending.as_ref()), commit);
        finished?;
        committed
    }

    /// Ends an entry: releases (or rolls back to) its savepoint and records its outcome.
    async fn finish(&self, pending: Option<&EntryFinish>) -> Result<(), EnvError> {
        let Some(f) = pending else {
            return Ok(());
        };
        let record = async {
            match &f.record {
                Some((client_id, seq, index, outcome)) => self
                    .client
                    .execute(&self.record, &[client_id, seq, index, outcome])
                    .await
                    .map(|_| ()),
                None => Ok(()),
            }
        };
        let (ended, recorded) = tokio::join!(self.client.batch_execute(f.sql), record);
        ended?;
        recorded?;
        Ok(())
    }

    /// Applies a write entry: all its statements or none, at most once per request id (a live
    /// duplicate returns the recorded outcome). `begin` opens the batch transaction first;
    /// `pending` (the previous entry's end) is sent in the same round trip. Returns the outcome
    /// and this entry's end, to be sent with the next round trip ([`Self::apply_write`] or
    /// [`Self::flush`]). See the module doc.
    pub async fn apply_write(
        &mut self,
        index: u64,
        cmd: &WriteCommand,
        limits: &ApplyLimits,
        begin: bool,
        pending: Option<EntryFinish>,
    ) -> Result<(ApplyOutcome, EntryFinish), EnvError> {
        let floor = request_log::retention_floor(index, limits.request_retention_entries);
        // The entry's deterministic inputs, read by raftpg.now()/random()/gen_random_uuid(). Set
        // per entry (not per batch), so results do not depend on how entries are batched.
        let setup = format!(
            "{}SAVEPOINT raftpg_entry; SET LOCAL raftpg.ts_us = '{}'; SET LOCAL raftpg.seed = '{}'; SET LOCAL raftpg.rnd_n = '0'",
            if begin { "BEGIN; " } else { "" },
            cmd.leader_ts_micros,
            cmd.seed
        );
        let ddl = cmd.statements.iter().any(|s| !is_dml(&s.sql));
        let cached: Vec<Statement> = if ddl {
            Vec::new()
        } else {
            cmd.statements
                .iter()
                .map_while(|s| self.cache.get(&s.sql).cloned())
                .collect()
        };

        // Round trip 1: the previous entry's end, open, look the request id up, and run every
        // statement already prepared.
        let client = &self.client;
        let lookup = async {
            match &cmd.request_id {
                Some(id) => {
                    client
                        .query_opt(
                            &self.fetch_live,
                            &[&id.client_id, &request_log::seq(id), &floor],
                        )
                        .await
                }
                None => Ok(None),
            }
        };
        let execs = futures::future::join_all(
            cached
                .iter()
                .zip(&cmd.statements)
                .map(|(prepared, s)| execute(client, prepared, s, limits)),
        );
        let (finished, setup_done, recorded, mut results) = tokio::join!(
            self.finish(pending.as_ref()),
            client.batch_execute(&setup),
            lookup,
            execs
        );
        finished?;
        setup_done?;
        let recorded = recorded?;

        let mut failed: Option<SqlFailure> = None;
        let mut outcomes = Vec::with_capacity(cmd.statements.len());
        // The statements run even for a duplicate (and are then rolled back): whether a node had
        // them prepared must not change what they consumed (sequence values are not rolled back),
        // so every node executes exactly the same statements for the same entry.
        for (i, r) in results.iter_mut().enumerate() {
            if let Err(StmtError::Deterministic(f)) = r {
                f.statement_index = u32::try_from(i).unwrap_or(u32::MAX);
                failed = Some(f.clone());
                break;
            }
        }
        if failed.is_none() {
            for r in results {
                match r {
                    Ok(o) => outcomes.push(o),
                    Err(StmtError::Environmental(e)) => return Err(e),
                    Err(StmtError::Deterministic(_)) => {
                        return Err(EnvError("statement result changed".into()))
                    }
                }
            }
            // The rest, one by one (each may depend on the effects of the previous ones).
            for (i, s) in cmd.statements.iter().enumerate().skip(outcomes.len()) {
                match prepare_and_execute(client, s, limits).await {
                    Ok((o, prepared)) => {
                        if !ddl && self.cache.len() < STATEMENT_CACHE_MAX {
                            self.cache.insert(s.sql.clone(), prepared);
                        }
                        outcomes.push(o);
                    }
                    Err(StmtError::Environmental(e)) => return Err(e),
                    Err(StmtError::Deterministic(mut f)) => {
                        f.statement_index = u32::try_from(i).unwrap_or(u32::MAX);
                        failed = Some(f);
                        break;
                    }
                }
            }
        }
        if ddl {
            self.cache.clear();
        }

        // This entry's end travels with the next round trip.
        let (sql, outcome, record) = match (recorded, failed) {
            (Some(row), _) => {
                // A live duplicate: undo this execution, answer with the recorded outcome.
                if let Some(id) = &cmd.request_id {
                    debug!(index, client_id = %id.client_id, seq = id.seq, "duplicate request: returning its recorded outcome");
                }
                let outcome = request_log::decode(row.get(0)).map_err(EnvError)?;
                (ROLLBACK_ENTRY, outcome, false)
            }
            (None, None) => (RELEASE_ENTRY, ApplyOutcome::Applied(outcomes), true),
            (None, Some(f)) => (ROLLBACK_ENTRY, ApplyOutcome::Failed(f), true),
        };
        let record = match (&cmd.request_id, record) {
            (Some(id), true) => Some((
                id.client_id.clone(),
                request_log::seq(id),
                i64::try_from(index).unwrap_or(i64::MAX),
                request_log::encode(&outcome).map_err(EnvError)?,
            )),
            _ => None,
        };
        Ok((outcome, EntryFinish { sql, record }))
    }
}

const RELEASE_ENTRY: &str = "RELEASE SAVEPOINT raftpg_entry";
const ROLLBACK_ENTRY: &str = "ROLLBACK TO SAVEPOINT raftpg_entry; RELEASE SAVEPOINT raftpg_entry";

/// The end of an applied entry, sent with the next round trip: its savepoint's release (or
/// rollback) and the record of its outcome for its request id.
pub struct EntryFinish {
    sql: &'static str,
    record: Option<(String, i64, i64, serde_json::Value)>,
}

/// Checks parameter count and types and result types of a prepared statement.
fn check_statement(prepared: &Statement, stmt: &SqlStatement) -> Result<(), StmtError> {
    let param_types = prepared.params();
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
                format!("parameter ${}: {}", i + 1, e.0),
            ))
        })?;
    }
    for c in prepared.columns() {
        values::check_result_type(c.type_()).map_err(|e| {
            StmtError::Deterministic(failure(
                SqlState::FEATURE_NOT_SUPPORTED.code(),
                format!("column {:?}: {}", c.name(), e.0),
            ))
        })?;
    }
    Ok(())
}

async fn prepare_and_execute(
    client: &Client,
    stmt: &SqlStatement,
    limits: &ApplyLimits,
) -> Result<(StatementOutcome, Statement), StmtError> {
    let prepared = client.prepare(&stmt.sql).await.map_err(classify)?;
    let outcome = execute(client, &prepared, stmt, limits).await?;
    Ok((outcome, prepared))
}

/// Executes one prepared statement and decodes its rows.
async fn execute(
    client: &Client,
    prepared: &Statement,
    stmt: &SqlStatement,
    limits: &ApplyLimits,
) -> Result<StatementOutcome, StmtError> {
    check_statement(prepared, stmt)?;
    let columns: Vec<ColumnInfo> = prepared
        .columns()
        .iter()
        .map(|c| ColumnInfo {
            name: c.name().to_string(),
            type_name: c.type_().name().to_string(),
        })
        .collect();
    let params = stmt.params.iter().map(|v| v as &(dyn ToSql + Sync));
    let stream = client.query_raw(prepared, params).await.map_err(classify)?;
    futures::pin_mut!(stream);
    let mut rows = Vec::new();
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
        let mut cells = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            let Cell(v) = row.try_get::<_, Cell>(i).map_err(|e| {
                StmtError::Deterministic(failure(
                    SqlState::FEATURE_NOT_SUPPORTED.code(),
                    e.to_string(),
                ))
            })?;
            cells.push(v);
        }
        rows.push(cells);
    }
    let rows_affected = stream.rows_affected().unwrap_or(rows.len() as u64);
    Ok(StatementOutcome {
        rows_affected,
        columns,
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
