//! Submitting a write: checks it, routes it to the leader, and on the leader proposes it to the
//! Raft log and waits for its applied result.
//!
//! Bad input is refused here, before anything enters the log (design.md invariant 5): size and
//! statement limits and the SQL gate ([`crate::sql::gate`]); the leader also refuses an
//! extension its PostgreSQL lacks. A write is answered only after a majority committed it and
//! this (leader) node applied it. A write that finds this node no longer leading before it was
//! proposed is handed to the new leader once.

use openraft::error::{ClientWriteError, RaftError};
use tracing::{debug, info_span, Instrument};

use super::error::{ErrorKind, LeaderHint, ServiceError};
use super::node::{Route, Service};
use super::types::{Origin, WriteOutcome, WriteRequest};
use crate::command::{ApplyOutcome, SqlStatement};
use crate::metrics;
use crate::raft::proposer::SubmitError;
use crate::sql::gate;

/// Longest wait for a leader to be known before a write is forwarded.
const LEADER_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

impl Service {
    /// Runs a write and answers its applied result (on the leader; other nodes forward it).
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, ServiceError> {
        let span = info_span!(
            "write",
            node = self.id,
            term = self.term(),
            index = tracing::field::Empty,
            forwarded = req.origin == Origin::Forwarded
        );
        let started = std::time::Instant::now();
        let answer = self.write_in_span(req).instrument(span).await;
        let m = metrics::get();
        m.write_seconds.observe(started.elapsed().as_secs_f64());
        match &answer {
            Ok(_) => m.writes.with_label_values(&["ok"]).inc(),
            Err(e) => {
                m.writes.with_label_values(&["error"]).inc();
                m.error(e.sqlstate.as_deref());
            }
        }
        answer
    }

    async fn write_in_span(&self, req: WriteRequest) -> Result<WriteOutcome, ServiceError> {
        self.refuse_if_removed()?;
        let statements = self.validate(&req)?;
        let _permit = self
            .write_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                ServiceError::refused(
                    ErrorKind::ResourceExhausted,
                    "53300",
                    "too many writes in flight on this node; retry with backoff",
                )
            })?;
        let wait = self.limits.write_timeout.min(LEADER_WAIT_MAX);
        if let Route::Leader(leader) = self.route(req.origin, wait).await? {
            return self.forward_to(&leader, &req).await;
        }
        self.check_extensions(&statements).await?;
        self.check_trigger_functions(&statements).await?;
        match self.propose(statements, &req).await {
            Err(e) if e.names_leader() && req.origin == Origin::Client => {
                // Lost leadership before proposing: hand the write to the new leader.
                match self.route(Origin::Client, wait).await? {
                    Route::Here => {
                        Err(ServiceError::unavailable("leadership changed; retry", None))
                    }
                    Route::Leader(leader) => self.forward_to(&leader, &req).await,
                }
            }
            other => other,
        }
    }

    /// Checks a request and turns it into the statements of a log entry (checked and
    /// rewritten by the gate).
    fn validate(&self, req: &WriteRequest) -> Result<Vec<SqlStatement>, ServiceError> {
        let limits = &self.limits;
        if req.encoded_bytes > limits.request_bytes_max {
            return Err(ServiceError::refused(
                ErrorKind::ResourceExhausted,
                "54000",
                format!(
                    "request of {} bytes exceeds the limit of {} bytes",
                    req.encoded_bytes, limits.request_bytes_max
                ),
            ));
        }
        if req.statements.is_empty() {
            return Err(ServiceError::refused(
                ErrorKind::InvalidArgument,
                "42601",
                "a write needs at least one statement",
            ));
        }
        if req.statements.len() > limits.statements_max {
            return Err(ServiceError::refused(
                ErrorKind::ResourceExhausted,
                "54000",
                format!(
                    "{} statements exceed the limit of {} per write",
                    req.statements.len(),
                    limits.statements_max
                ),
            ));
        }
        req.statements
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let sql = self.prepared_writes.prepare(&s.sql).map_err(|r| {
                    ServiceError::refused(
                        ErrorKind::InvalidArgument,
                        r.sqlstate,
                        format!("statement {i}: {}", r.message),
                    )
                })?;
                Ok(SqlStatement {
                    sql,
                    params: s.params.clone()?,
                })
            })
            .collect()
    }

    /// Refuses (on the leader, before the log) a `CREATE TRIGGER` whose function's body, as
    /// the catalog holds it now, would not pass the gate: it may have been created before
    /// raftpg's current rules, or by a superuser behind raftpg's back. A function that does not
    /// exist is left to PostgreSQL (the same error on every node).
    pub(super) async fn check_trigger_functions(
        &self,
        statements: &[SqlStatement],
    ) -> Result<(), ServiceError> {
        for (i, s) in statements.iter().enumerate() {
            let Some(parts) = gate::trigger_function(&s.sql) else {
                continue;
            };
            let quoted = parts
                .iter()
                .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
                .collect::<Vec<_>>()
                .join(".");
            let mut pooled = self
                .reads
                .get()
                .await
                .map_err(|e| ServiceError::unavailable(e.to_string(), None))?;
            let found = pooled
                .base_client()
                .await
                .map_err(|e| ServiceError::unavailable(format!("PostgreSQL: {e}"), None))?
                .query_opt(
                    "SELECT n.nspname::text, p.proname::text, l.lanname::text, p.prosrc
                       FROM pg_proc p
                       JOIN pg_namespace n ON n.oid = p.pronamespace
                       JOIN pg_language l ON l.oid = p.prolang
                      WHERE p.oid = to_regprocedure($1 || '()')",
                    &[&quoted],
                )
                .await
                .map_err(|e| {
                    ServiceError::unavailable(format!("checking trigger function: {e}"), None)
                })?;
            pooled.release();
            let Some(row) = found else {
                continue;
            };
            let (schema, name, language, body): (String, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            gate::check_existing_function(&schema, &name, &language, &body).map_err(|r| {
                ServiceError::refused(
                    ErrorKind::InvalidArgument,
                    r.sqlstate,
                    format!("statement {i}: {}", r.message),
                )
            })?;
        }
        Ok(())
    }

    /// Refuses (on the leader, before the log) a `CREATE/ALTER EXTENSION` whose extension or
    /// version this node's PostgreSQL does not have: applied, it would fail on every node
    /// lacking it, which the applier treats as that node's environment (it waits) — so it must
    /// never enter the log when even the leader lacks it.
    pub(super) async fn check_extensions(
        &self,
        statements: &[SqlStatement],
    ) -> Result<(), ServiceError> {
        for (i, s) in statements.iter().enumerate() {
            let Some((name, version)) = gate::extension_required(&s.sql) else {
                continue;
            };
            let mut pooled = self
                .reads
                .get()
                .await
                .map_err(|e| ServiceError::unavailable(e.to_string(), None))?;
            // EXISTS: an extension usually ships several versions (one row each).
            let found: bool = pooled
                .base_client()
                .await
                .map_err(|e| ServiceError::unavailable(format!("PostgreSQL: {e}"), None))?
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_available_extension_versions
                     WHERE name = $1 AND ($2::text IS NULL OR version = $2))",
                    &[&name, &version],
                )
                .await
                .map(|r| r.get(0))
                .map_err(|e| {
                    ServiceError::unavailable(format!("checking extension {name}: {e}"), None)
                })?;
            pooled.release();
            if !found {
                return Err(ServiceError::refused(
                    ErrorKind::FailedPrecondition,
                    "0A000",
                    format!(
                        "statement {i}: extension \"{name}\"{} is not installed on this node's PostgreSQL; install it on every node first",
                        version.map(|v| format!(" version {v}")).unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Sends the write to `leader` and relays its answer.
    async fn forward_to(
        &self,
        leader: &LeaderHint,
        req: &WriteRequest,
    ) -> Result<WriteOutcome, ServiceError> {
        debug!(leader_id = leader.id, addr = %leader.peer_addr, "forwarding write to the leader");
        self.peers
            .execute(leader, req, self.limits.write_timeout)
            .await
            .map_err(|e| {
                // A SQL error is the leader's answer (a write may raise a class 08 or 57
                // SQLSTATE itself), not a failure to reach it.
                if e.kind == ErrorKind::Unavailable && e.leader.is_none() && e.sqlstate.is_none() {
                    ServiceError::unavailable(
                        format!(
                            "forwarding to leader {} at {} failed: {}",
                            leader.id, leader.peer_addr, e.message
                        ),
                        Some(leader.clone()),
                    )
                } else {
                    e
                }
            })
    }

    /// Proposes the write (this node leads; the proposer groups it with others into one entry)
    /// and waits for it to be committed and applied.
    async fn propose(
        &self,
        statements: Vec<SqlStatement>,
        req: &WriteRequest,
    ) -> Result<WriteOutcome, ServiceError> {
        let answer = self
            .proposer
            .submit(
                statements,
                req.request_id.clone(),
                req.principal.as_ref().map(|p| p.user.clone()),
                req.encoded_bytes,
            )
            .map_err(|e| match e {
                SubmitError::QueueFull => ServiceError::refused(
                    ErrorKind::ResourceExhausted,
                    "53300",
                    format!("{e}; retry with backoff"),
                ),
                SubmitError::Stopped => ServiceError::unavailable(format!("{e}; retry"), None),
            })?;
        let timeout = self.limits.write_timeout;
        let (log_id, outcome) = match tokio::time::timeout(timeout, answer).await {
            Err(_) => {
                return Err(ServiceError::deadline(format!(
                    "the write was not confirmed within {timeout:?}; its outcome is unknown (it may still commit)"
                )))
            }
            Ok(Err(_)) => {
                return Err(ServiceError::unavailable(
                    "the node is shutting down; retry",
                    None,
                ))
            }
            Ok(Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))))) => {
                return Err(ServiceError::unavailable(
                    "this node is no longer the leader; retry",
                    self.leader(),
                ));
            }
            Ok(Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_))))) => {
                return Err(ServiceError::new(
                    ErrorKind::OutcomeUnknown,
                    "leadership changed after the write was proposed; its outcome is unknown (it may still commit): retry with the same request id, or read to see its effects",
                ))
            }
            Ok(Ok(Err(RaftError::APIError(e)))) => {
                return Err(ServiceError::precondition(e.to_string()))
            }
            Ok(Ok(Err(RaftError::Fatal(e)))) => {
                return Err(ServiceError::unavailable(
                    format!("raft stopped on this node: {e}"),
                    None,
                ))
            }
            Ok(Ok(Ok(r))) => r,
        };
        let index = log_id.index;
        tracing::Span::current().record("index", index);
        match outcome {
            ApplyOutcome::Applied(results) => Ok(WriteOutcome {
                log_index: index,
                term: log_id.leader_id.term,
                leader_id: self.id,
                results,
            }),
            ApplyOutcome::Failed(f) => Err(ServiceError::sql(&f, index)),
            ApplyOutcome::AppliedResultLost => Err(ServiceError {
                log_index: index,
                ..ServiceError::new(
                    ErrorKind::OutcomeUnknown,
                    format!(
                        "the write was applied at log index {index}, but its result was lost when PostgreSQL failed during commit; read the data to see its effects"
                    ),
                )
            }),
            ApplyOutcome::Internal | ApplyOutcome::Checksums(_) | ApplyOutcome::Batch(_) => Err(
                ServiceError::internal("unexpected internal outcome for a write"),
            ),
        }
    }
}
