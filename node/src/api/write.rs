//! `Write.Execute`: validates a write, forwards it to the leader when this node does not lead,
//! and on the leader proposes it to the Raft log and answers with the applied result.
//!
//! Bad input is refused here, before anything enters the log (design.md invariant 5): size and
//! statement limits, parameter values, and the SQL gate (`determinism`). A write is answered
//! only after a majority committed it and this (leader) node applied it.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use raftpg_proto::v1::write_client::WriteClient;
use raftpg_proto::v1::write_server::Write;
use raftpg_proto::v1::{Column, ExecuteRequest, ExecuteResponse, Row, StatementResult};
use raftpg_proto::FORWARDED_METADATA;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, info_span, Instrument};

use crate::api::{not_leader, params_from_proto, refused, sql_status};
use crate::command::{ApplyOutcome, RequestId, SqlStatement};
use crate::node::NodeContext;
use crate::proposer::SubmitError;
use crate::values;

/// The write service.
pub struct WriteService {
    ctx: Arc<NodeContext>,
}

impl WriteService {
    /// Creates the service.
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        WriteService { ctx }
    }

    /// Checks a request and turns it into the statements of a log entry.
    fn validate(&self, req: &ExecuteRequest) -> Result<Vec<SqlStatement>, Status> {
        let limits = &self.ctx.limits;
        let size = req.encoded_len();
        if size > limits.request_bytes_max {
            return Err(refused(
                Code::ResourceExhausted,
                "54000",
                format!(
                    "request of {size} bytes exceeds the limit of {} bytes",
                    limits.request_bytes_max
                ),
            ));
        }
        if req.statements.is_empty() {
            return Err(refused(
                Code::InvalidArgument,
                "42601",
                "a write needs at least one statement",
            ));
        }
        if req.statements.len() > limits.statements_max {
            return Err(refused(
                Code::ResourceExhausted,
                "54000",
                format!(
                    "{} statements exceed the limit of {} per write",
                    req.statements.len(),
                    limits.statements_max
                ),
            ));
        }
        let mut out = Vec::with_capacity(req.statements.len());
        for (i, s) in req.statements.iter().enumerate() {
            let sql = self.ctx.prepared_writes.prepare(&s.sql).map_err(|r| {
                refused(
                    Code::InvalidArgument,
                    r.sqlstate,
                    format!("statement {i}: {}", r.message),
                )
            })?;
            let params = params_from_proto(&s.params, &format!("statement {i}, "))?;
            out.push(SqlStatement { sql, params });
        }
        Ok(out)
    }

    /// Refuses (on the leader, before the log) a `CREATE/ALTER EXTENSION` whose extension or
    /// version this node's PostgreSQL does not have: applied, it would fail on every node
    /// lacking it, which the applier treats as that node's environment (it waits) — so it must
    /// never enter the log when even the leader lacks it.
    async fn check_extensions(&self, statements: &[SqlStatement]) -> Result<(), Status> {
        for (i, s) in statements.iter().enumerate() {
            let Some((name, version)) = crate::determinism::extension_required(&s.sql) else {
                continue;
            };
            let mut pooled = self
                .ctx
                .reads
                .get()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let found = pooled
                .client()
                .query_opt(
                    "SELECT 1 FROM pg_available_extension_versions
                     WHERE name = $1 AND ($2::text IS NULL OR version = $2)",
                    &[&name, &version],
                )
                .await
                .map_err(|e| Status::unavailable(format!("checking extension {name}: {e}")))?;
            pooled.release();
            if found.is_none() {
                return Err(refused(
                    Code::FailedPrecondition,
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

    /// Sends the request to the leader and relays its answer.
    async fn forward(&self, req: ExecuteRequest) -> Result<Response<ExecuteResponse>, Status> {
        let Some((leader_id, addr)) = self
            .ctx
            .wait_for_leader(
                self.ctx
                    .limits
                    .write_timeout
                    .min(std::time::Duration::from_secs(5)),
            )
            .await
        else {
            return Err(not_leader(
                "no leader is known (election in progress or no quorum); retry",
                None,
            ));
        };
        if leader_id == self.ctx.id {
            // Became leader while waiting: serve it here.
            return Err(Status::unavailable("leadership changed; retry"));
        }
        debug!(leader_id, %addr, "forwarding write to the leader");
        let channel = self.ctx.channel_to(&addr)?;
        let mut client = WriteClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut request = Request::new(req);
        request.set_timeout(self.ctx.limits.write_timeout);
        request.metadata_mut().insert(
            FORWARDED_METADATA,
            tonic::metadata::MetadataValue::from(self.ctx.id),
        );
        client.execute(request).await.map_err(|s| {
            if s.code() == Code::Unavailable
                && s.metadata().get(raftpg_proto::LEADER_ID_METADATA).is_none()
            {
                not_leader(
                    format!(
                        "forwarding to leader {leader_id} at {addr} failed: {}",
                        s.message()
                    ),
                    Some((leader_id, addr.clone())),
                )
            } else {
                s
            }
        })
    }

    /// Proposes the write (this node leads; the proposer groups it with others into one entry)
    /// and waits for it to be committed and applied.
    async fn propose(
        &self,
        statements: Vec<SqlStatement>,
        request_id: Option<RequestId>,
        bytes: usize,
    ) -> Result<Response<ExecuteResponse>, Status> {
        let ctx = &self.ctx;
        let answer = ctx
            .proposer
            .submit(statements, request_id, bytes)
            .map_err(|e| match e {
                SubmitError::QueueFull => refused(
                    Code::ResourceExhausted,
                    "53300",
                    format!("{e}; retry with backoff"),
                ),
                SubmitError::Stopped => Status::unavailable(format!("{e}; retry")),
            })?;
        let result = tokio::time::timeout(ctx.limits.write_timeout, answer).await;
        let (log_id, outcome) = match result {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "the write was not confirmed within {:?}; its outcome is unknown (it may still commit)",
                    ctx.limits.write_timeout
                )))
            }
            Ok(Err(_)) => return Err(Status::unavailable("the node is shutting down; retry")),
            Ok(Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))))) => {
                return Err(not_leader("this node is no longer the leader; retry", ctx.leader()));
            }
            Ok(Ok(Err(RaftError::APIError(e)))) => return Err(Status::failed_precondition(e.to_string())),
            Ok(Ok(Err(RaftError::Fatal(e)))) => return Err(Status::unavailable(format!("raft stopped on this node: {e}"))),
            Ok(Ok(Ok(r))) => r,
        };
        let index = log_id.index;
        tracing::Span::current().record("index", index);
        match outcome {
            ApplyOutcome::Applied(results) => Ok(Response::new(ExecuteResponse {
                log_index: index,
                term: log_id.leader_id.term,
                leader_id: ctx.id,
                results: results
                    .into_iter()
                    .map(|r| StatementResult {
                        rows_affected: r.rows_affected,
                        columns: r
                            .columns
                            .into_iter()
                            .map(|c| Column {
                                name: c.name,
                                type_name: c.type_name,
                            })
                            .collect(),
                        rows: r
                            .rows
                            .iter()
                            .map(|row| Row {
                                values: row.iter().map(values::to_proto).collect(),
                            })
                            .collect(),
                    })
                    .collect(),
            })),
            ApplyOutcome::Failed(f) => Err(sql_status(&f, index)),
            ApplyOutcome::AppliedResultLost => {
                let mut s = Status::unknown(format!(
                    "the write was applied at log index {index}, but its result was lost when PostgreSQL failed during commit; read the data to see its effects"
                ));
                s.metadata_mut().insert(
                    raftpg_proto::LOG_INDEX_METADATA,
                    tonic::metadata::MetadataValue::from(index),
                );
                Err(s)
            }
            ApplyOutcome::Internal | ApplyOutcome::Checksums(_) | ApplyOutcome::Batch(_) => {
                Err(Status::internal("unexpected internal outcome for a write"))
            }
        }
    }
}

#[tonic::async_trait]
impl Write for WriteService {
    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        let forwarded = request.metadata().get(FORWARDED_METADATA).is_some();
        let req = request.into_inner();
        let term = self.ctx.raft.metrics().borrow().current_term;
        let span = info_span!(
            "write",
            node = self.ctx.id,
            term,
            index = tracing::field::Empty,
            forwarded
        );
        async move {
            self.ctx.refuse_if_removed()?;
            let statements = self.validate(&req)?;
            let _permit = self
                .ctx
                .write_permits
                .clone()
                .try_acquire_owned()
                .map_err(|_| {
                    refused(
                        Code::ResourceExhausted,
                        "53300",
                        "too many writes in flight on this node; retry with backoff",
                    )
                })?;
            if !self.ctx.is_leader() {
                if forwarded {
                    return Err(not_leader("this node is not the leader", self.ctx.leader()));
                }
                return self.forward(req).await;
            }
            self.check_extensions(&statements).await?;
            let request_id = req.request_id.as_ref().map(|r| RequestId {
                client_id: r.client_id.clone(),
                seq: r.seq,
            });
            match self
                .propose(statements, request_id, req.encoded_len())
                .await
            {
                Err(s)
                    if s.code() == Code::Unavailable
                        && !forwarded
                        && s.metadata().get(raftpg_proto::LEADER_ID_METADATA).is_some() =>
                {
                    // Lost leadership before proposing: hand the write to the new leader.
                    self.forward(req).await
                }
                other => other,
            }
        }
        .instrument(span)
        .await
    }
}
