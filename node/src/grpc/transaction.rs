//! The `Transaction` service: interactive transactions named by id (see
//! `service::txn_route`), decoded here and run through [`Service::txn_open`] and
//! [`Service::txn_call`]; on a follower both relay to the node running the transaction.

use std::sync::Arc;

use raftpg_proto::v1 as pb;
use raftpg_proto::v1::transaction_server::Transaction;
use tonic::{Request, Response, Status};

use super::auth;
use super::convert;
use super::status::to_status;
use super::write::origin_of;
use crate::command::RequestId;
use crate::service::{BeginRequest, SavepointOp, Service, TxnAnswer, TxnCall, TxnRegistry};

/// The transaction service.
pub struct TransactionService {
    svc: Arc<Service>,
    /// The transactions this node runs for gRPC clients and relaying nodes, by id.
    registry: Arc<TxnRegistry>,
}

impl TransactionService {
    /// Creates the service.
    pub fn new(svc: Arc<Service>) -> Self {
        TransactionService {
            svc,
            registry: Default::default(),
        }
    }

    async fn call<T>(
        &self,
        request: Request<T>,
        txn_id: impl FnOnce(&T) -> String,
        call: impl FnOnce(T) -> TxnCall,
    ) -> Result<TxnAnswer, Status> {
        let origin = origin_of(&request);
        let principal = auth::principal(&self.svc, &request).await?;
        let req = request.into_inner();
        let id = txn_id(&req);
        self.svc
            .txn_call(&self.registry, &id, principal.as_ref(), origin, call(req))
            .await
            .map_err(to_status)
    }
}

fn unexpected(a: TxnAnswer) -> Status {
    Status::internal(format!("unexpected answer: {a:?}"))
}

#[tonic::async_trait]
impl Transaction for TransactionService {
    async fn begin(
        &self,
        request: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let origin = origin_of(&request);
        let principal = auth::principal(&self.svc, &request).await?;
        let req = request.into_inner();
        let begun = self
            .svc
            .txn_open(
                &self.registry,
                BeginRequest {
                    principal,
                    request_id: req.request_id.map(|r| RequestId {
                        client_id: r.client_id,
                        seq: r.seq,
                    }),
                    origin,
                },
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::begin_response(begun)))
    }

    async fn execute(
        &self,
        request: Request<pb::TxnStatementRequest>,
    ) -> Result<Response<pb::TxnStatementResponse>, Status> {
        let answer = self
            .call(
                request,
                |r| r.txn_id.clone(),
                |r| TxnCall::Execute(convert::txn_statement(r.statement.unwrap_or_default())),
            )
            .await?;
        match answer {
            TxnAnswer::Rows(o) => Ok(Response::new(pb::TxnStatementResponse {
                result: Some(convert::statement_result(o)),
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn savepoint(
        &self,
        request: Request<pb::TxnSavepointRequest>,
    ) -> Result<Response<pb::TxnSavepointResponse>, Status> {
        let op = match pb::SavepointOp::try_from(request.get_ref().op) {
            Ok(pb::SavepointOp::Define) => SavepointOp::Define,
            Ok(pb::SavepointOp::Release) => SavepointOp::Release,
            Ok(pb::SavepointOp::RollbackTo) => SavepointOp::RollbackTo,
            Err(_) => return Err(Status::invalid_argument("unknown savepoint op")),
        };
        self.call(
            request,
            |r| r.txn_id.clone(),
            |r| TxnCall::Savepoint(op, r.name),
        )
        .await?;
        Ok(Response::new(pb::TxnSavepointResponse {}))
    }

    async fn describe(
        &self,
        request: Request<pb::TxnDescribeRequest>,
    ) -> Result<Response<pb::TxnDescribeResponse>, Status> {
        let answer = self
            .call(
                request,
                |r| r.txn_id.clone(),
                |r| TxnCall::Describe {
                    sql: r.sql,
                    param_types: r.param_types,
                },
            )
            .await?;
        match answer {
            TxnAnswer::Described(d) => Ok(Response::new(pb::TxnDescribeResponse {
                param_types: d.param_types,
                columns: convert::columns(d.columns),
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn commit(
        &self,
        request: Request<pb::TxnEndRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        match self
            .call(request, |r| r.txn_id.clone(), |_| TxnCall::Commit)
            .await?
        {
            TxnAnswer::Committed(c) => Ok(Response::new(pb::CommitResponse {
                log_index: c.log_index,
                committed: c.committed,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn rollback(
        &self,
        request: Request<pb::TxnEndRequest>,
    ) -> Result<Response<pb::RollbackResponse>, Status> {
        self.call(request, |r| r.txn_id.clone(), |_| TxnCall::Rollback)
            .await?;
        Ok(Response::new(pb::RollbackResponse {}))
    }
}
