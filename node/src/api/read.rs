//! `Read.Query`: one query in a `REPEATABLE READ READ ONLY` transaction on the receiving node,
//! after waiting (bounded) for the requested consistency level.
//!
//! Levels: `LOCAL` (now), `AT_LEAST(i)` (this node applied `i`), `LINEARIZABLE` (a read index
//! confirmed by the leader's quorum, then applied here; works on followers). The applied index
//! is read inside the query's own snapshot, so the response says exactly what state it saw.

use std::sync::Arc;
use std::time::Duration;

use crate::read_index::ReadIndexError;
use futures::TryStreamExt;
use postgres_types::ToSql;
use raftpg_proto::v1::raft_client::RaftClient;
use raftpg_proto::v1::read_server::Read;
use raftpg_proto::v1::{
    Column, Consistency, QueryChunk, QueryRequest, QueryResponse, ReadIndexRequest, Row,
};
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status};
use tracing::{info_span, Instrument};

use crate::api::{not_leader, params_from_proto, refused, sql_status};
use crate::applier::is_deterministic;
use crate::command::SqlFailure;
use crate::determinism;
use crate::node::NodeContext;
use crate::values::{self, Cell};

/// The read service.
pub struct ReadService {
    ctx: Arc<NodeContext>,
}

impl ReadService {
    /// Creates the service.
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        ReadService { ctx }
    }

    /// The index a linearizable read must see: from our own quorum check when leading, else from
    /// the leader's.
    async fn read_index(&self, wait: Duration) -> Result<u64, Status> {
        // Bounded: a leader cut off from its quorum cannot confirm and must not answer.
        let confirmed = tokio::time::timeout(wait, self.ctx.read_index.read_index(&self.ctx.raft))
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "leadership not confirmed by a quorum within {wait:?}"
                ))
            })?;
        match confirmed {
            Ok(index) => return Ok(index),
            Err(ReadIndexError::NotLeader) => {}
            Err(ReadIndexError::Unconfirmed(e)) => {
                return Err(Status::unavailable(format!(
                    "cannot confirm a linearizable read: {e}"
                )))
            }
        }
        let Some((leader_id, addr)) = self.ctx.wait_for_leader(wait).await else {
            return Err(not_leader(
                "no leader known; a linearizable read needs a quorum",
                None,
            ));
        };
        let mut client = RaftClient::new(self.ctx.channel_to(&addr)?);
        let mut req = Request::new(ReadIndexRequest {});
        req.set_timeout(wait);
        let resp = tokio::time::timeout(wait, client.read_index(req))
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "leader {leader_id} did not confirm a read index within {wait:?}"
                ))
            })?
            .map_err(|s| {
                Status::unavailable(format!(
                    "leader {leader_id} could not confirm a read index: {}",
                    s.message()
                ))
            })?;
        Ok(resp.into_inner().index)
    }

    async fn wait_applied(&self, index: u64, wait: Duration) -> Result<(), Status> {
        self.ctx
            .raft
            .wait(Some(wait))
            .applied_index_at_least(Some(index), "read")
            .await
            .map(|_| ())
            .map_err(|e| {
                Status::deadline_exceeded(format!(
                    "this node did not apply index {index} within {wait:?} ({e}); retry or read from another node"
                ))
            })
    }
}

/// Largest chunk of a streamed result, in encoded bytes (approximate).
const CHUNK_BYTES_MAX: usize = 1 << 20;

/// Runs the query and sends its result in chunks to `out`: the first chunk carries the columns
/// and the applied index of the snapshot the query read. Stops early if the receiver is gone.
async fn run_query(
    ctx: Arc<NodeContext>,
    req: QueryRequest,
    limit: usize,
    out: mpsc::Sender<Result<QueryChunk, Status>>,
) {
    if let Err(e) = run_query_inner(&ctx, &req, limit, &out).await {
        let _ = out.send(Err(e)).await;
    }
}

async fn run_query_inner(
    ctx: &NodeContext,
    req: &QueryRequest,
    limit: usize,
    out: &mpsc::Sender<Result<QueryChunk, Status>>,
) -> Result<(), Status> {
    let params = params_from_proto(&req.params, "")?;
    let mut pooled = ctx
        .reads
        .get()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let client = pooled.client();
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_status)?;
    let applied: i64 = tx
        .query_one("SELECT log_index FROM raftpg.applied", &[])
        .await
        .map_err(pg_status)?
        .get(0);
    let stmt = tx.prepare(&req.sql).await.map_err(pg_status)?;
    if stmt.params().len() != params.len() {
        return Err(refused(
            Code::InvalidArgument,
            "08P01",
            format!(
                "the query has {} parameter(s) but {} value(s) were bound",
                stmt.params().len(),
                params.len()
            ),
        ));
    }
    for (i, (v, ty)) in params.iter().zip(stmt.params()).enumerate() {
        values::check_bind(v, ty).map_err(|e| {
            refused(
                Code::InvalidArgument,
                "42804",
                format!("parameter ${}: {}", i + 1, e.0),
            )
        })?;
    }
    for c in stmt.columns() {
        values::check_result_type(c.type_()).map_err(|e| {
            refused(
                Code::Unimplemented,
                "0A000",
                format!("column {:?}: {}", c.name(), e.0),
            )
        })?;
    }
    let mut chunk = QueryChunk {
        columns: stmt
            .columns()
            .iter()
            .map(|c| Column {
                name: c.name().to_string(),
                type_name: c.type_().name().to_string(),
            })
            .collect(),
        rows: Vec::new(),
        applied_index: u64::try_from(applied).unwrap_or(0),
        node_id: ctx.id,
    };
    let width = chunk.columns.len();
    let stream = tx
        .query_raw(&stmt, params.iter().map(|v| v as &(dyn ToSql + Sync)))
        .await
        .map_err(pg_status)?;
    futures::pin_mut!(stream);
    let (mut total, mut chunk_bytes) = (0usize, 0usize);
    while let Some(row) = stream.try_next().await.map_err(pg_status)? {
        if total >= limit {
            return Err(refused(
                Code::ResourceExhausted,
                "54000",
                format!("the query returns more than {limit} rows; add LIMIT/OFFSET or a narrower WHERE, or stream it"),
            ));
        }
        let mut values_out = Vec::with_capacity(width);
        for i in 0..width {
            let Cell(v) = row
                .try_get::<_, Cell>(i)
                .map_err(|e| refused(Code::Unimplemented, "0A000", e.to_string()))?;
            values_out.push(values::to_proto(&v));
        }
        let r = Row { values: values_out };
        chunk_bytes += prost::Message::encoded_len(&r);
        chunk.rows.push(r);
        total += 1;
        if chunk_bytes >= CHUNK_BYTES_MAX {
            let next = QueryChunk {
                node_id: ctx.id,
                ..Default::default()
            };
            if out
                .send(Ok(std::mem::replace(&mut chunk, next)))
                .await
                .is_err()
            {
                return Ok(()); // the client went away
            }
            chunk_bytes = 0;
        }
    }
    tx.commit().await.map_err(pg_status)?;
    let _ = out.send(Ok(chunk)).await;
    Ok(())
}

/// A PostgreSQL error of a read as a status: SQL errors with their SQLSTATE, the rest as
/// UNAVAILABLE (the node's PostgreSQL is down or restarting).
fn pg_status(e: tokio_postgres::Error) -> Status {
    match e.as_db_error() {
        Some(db) if is_deterministic(db.code().code()) || db.code().code() == "25006" => {
            let mut f = SqlFailure {
                sqlstate: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().unwrap_or_default().to_string(),
                hint: db.hint().unwrap_or_default().to_string(),
                statement_index: 0,
            };
            if f.sqlstate == "25006" {
                f.hint = "reads run in READ ONLY transactions; send writes to Write.Execute".into();
            }
            sql_status(&f, 0)
        }
        Some(db) => Status::unavailable(format!(
            "PostgreSQL: {} ({})",
            db.message(),
            db.code().code()
        )),
        None => Status::unavailable(format!("PostgreSQL unavailable on this node: {e}")),
    }
}

impl ReadService {
    /// Checks the request and waits for its consistency level.
    async fn admit(&self, req: &QueryRequest) -> Result<(), Status> {
        self.ctx.refuse_if_removed()?;
        let size = prost::Message::encoded_len(req);
        if size > self.ctx.limits.request_bytes_max {
            return Err(refused(
                Code::ResourceExhausted,
                "54000",
                format!(
                    "request of {size} bytes exceeds the limit of {} bytes",
                    self.ctx.limits.request_bytes_max
                ),
            ));
        }
        determinism::check_read(&req.sql)
            .map_err(|r| refused(Code::InvalidArgument, r.sqlstate, r.message))?;
        let wait = match req.timeout_ms {
            0 => self.ctx.limits.read_wait_max,
            ms => Duration::from_millis(ms.into()).min(self.ctx.limits.read_wait_max),
        };
        match Consistency::try_from(req.consistency) {
            Ok(Consistency::Local) => Ok(()),
            Ok(Consistency::AtLeast) => self.wait_applied(req.min_index, wait).await,
            Ok(Consistency::Linearizable) if self.ctx.unsafe_local_linearizable_reads => Ok(()),
            Ok(Consistency::Linearizable) => {
                let index = self.read_index(wait).await?;
                self.wait_applied(index, wait).await
            }
            Err(_) => Err(Status::invalid_argument(format!(
                "unknown consistency level {}",
                req.consistency
            ))),
        }
    }
}

type ChunkStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<QueryChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Read for ReadService {
    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let req = request.into_inner();
        let span = info_span!(
            "read",
            node = self.ctx.id,
            consistency = req.consistency,
            min_index = req.min_index
        );
        async move {
            self.admit(&req).await?;
            let limit = match req.max_rows {
                0 => self.ctx.limits.read_rows_max,
                n => (n as usize).min(self.ctx.limits.read_rows_max),
            };
            let (tx, mut rx) = mpsc::channel(4);
            let run = run_query(self.ctx.clone(), req, limit, tx);
            let collect = async {
                let mut resp = QueryResponse::default();
                let mut first = true;
                while let Some(chunk) = rx.recv().await {
                    let chunk = chunk?;
                    if first {
                        resp.columns = chunk.columns;
                        resp.applied_index = chunk.applied_index;
                        resp.node_id = chunk.node_id;
                        first = false;
                    }
                    resp.rows.extend(chunk.rows);
                }
                Ok::<_, Status>(resp)
            };
            let ((), resp) = tokio::join!(run, collect);
            resp.map(Response::new)
        }
        .instrument(span)
        .await
    }

    type QueryStreamStream = ChunkStream;

    async fn query_stream(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = request.into_inner();
        self.admit(&req).await?;
        let limit = match req.max_rows {
            0 => self.ctx.limits.read_stream_rows_max,
            n => (n as usize).min(self.ctx.limits.read_stream_rows_max),
        };
        // Two chunks in flight at most: the query runs as fast as the client reads.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(run_query(self.ctx.clone(), req, limit, tx));
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }
}
