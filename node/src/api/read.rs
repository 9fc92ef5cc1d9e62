//! `Read.Query`: one query in a `REPEATABLE READ READ ONLY` transaction on the receiving node,
//! after waiting (bounded) for the requested consistency level.
//!
//! Levels: `LOCAL` (now), `AT_LEAST(i)` (this node applied `i`), `LINEARIZABLE` (a read index
//! confirmed by the leader's quorum, then applied here; works on followers). The applied index
//! is read inside the query's own snapshot, so the response says exactly what state it saw, and
//! `AT_LEAST`/`LINEARIZABLE` reads require their index *there* (PostgreSQL may have lost commits
//! openraft counts as applied; see [`read_in_snapshot`]).
//!
//! Every read is bounded in time ([`ReadBounds`]): its transaction ends by the request's
//! `timeout_ms` (at most [`READ_DURATION_MAX`]) even when a `QueryStream` client stops reading,
//! so DDL applied through the log never waits without limit behind a read's locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::read_index::ReadIndexError;
use futures::{StreamExt, TryStreamExt};
use postgres_types::ToSql;
use raftpg_proto::v1::raft_client::RaftClient;
use raftpg_proto::v1::read_server::Read;
use raftpg_proto::v1::{
    Column, Consistency, QueryChunk, QueryRequest, QueryResponse, ReadIndexRequest, Row,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Request, Response, Status};
use tracing::{debug, info_span, Instrument};

use crate::api::{not_leader, params_from_proto, refused, sql_status};
use crate::applier::is_deterministic;
use crate::command::SqlFailure;
use crate::determinism;
use crate::node::NodeContext;
use crate::read_pool::READ_DURATION_MAX;
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

/// First pause before looking again whether PostgreSQL holds the index a read needs.
const SNAPSHOT_RETRY_FIRST: Duration = Duration::from_millis(5);

/// Longest pause between two such looks (the pause doubles from [`SNAPSHOT_RETRY_FIRST`]).
const SNAPSHOT_RETRY_MAX: Duration = Duration::from_millis(100);

/// Time bounds of one read, fixed when it arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReadBounds {
    /// Until when the read may wait for its consistency level: the request's `timeout_ms`
    /// (0: the node's `read_wait_max`), capped by `read_wait_max` and by `end_by`.
    catch_up_by: Instant,
    /// Until when the read may run at all, sending of its rows included: the request's
    /// `timeout_ms` (0: [`READ_DURATION_MAX`]), capped by [`READ_DURATION_MAX`]. Its
    /// PostgreSQL transaction ends by then however slowly the client reads, so DDL arriving
    /// through the log never waits longer than this behind a read's locks.
    end_by: Instant,
}

impl ReadBounds {
    /// The bounds of a read arriving at `now` with the request's `timeout_ms`.
    fn new(timeout_ms: u32, read_wait_max: Duration, now: Instant) -> Self {
        let asked = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into()));
        let run = asked.unwrap_or(READ_DURATION_MAX).min(READ_DURATION_MAX);
        let wait = asked.unwrap_or(read_wait_max).min(read_wait_max).min(run);
        ReadBounds {
            catch_up_by: now + wait,
            end_by: now + run,
        }
    }

    /// What is left of the consistency wait.
    fn catch_up_left(&self) -> Duration {
        self.catch_up_by.saturating_duration_since(Instant::now())
    }
}

/// What an admitted read must see and until when it may run.
#[derive(Clone, Copy, Debug)]
struct Admission {
    /// The log index PostgreSQL must hold in the read's own snapshot (`AT_LEAST`,
    /// `LINEARIZABLE`); `None` for `LOCAL`.
    required_index: Option<u64>,
    /// The read's time bounds.
    bounds: ReadBounds,
}

/// Why a read ended before it had sent all of its rows.
enum ReadStop {
    /// Answer this status. The connection is clean: nothing of the read still runs on it (its
    /// transaction was rolled back, or dropped with the `ROLLBACK` already queued).
    Failed(Status),
    /// Rows were left unread (the client went away, the row limit was hit) or the connection
    /// failed outside SQL: it must be closed, not reused. The status, if anyone is left to
    /// tell.
    Abandoned(Option<Status>),
}

impl From<Status> for ReadStop {
    fn from(s: Status) -> Self {
        ReadStop::Failed(s)
    }
}

/// A PostgreSQL error during a read. An error PostgreSQL reported ended its statement (the
/// connection stays in step); any other (I/O, protocol) leaves the connection in doubt.
fn pg_stop(e: tokio_postgres::Error) -> ReadStop {
    let in_step = e.as_db_error().is_some();
    let status = pg_status(e);
    if in_step {
        ReadStop::Failed(status)
    } else {
        ReadStop::Abandoned(Some(status))
    }
}

/// One read being run: what it asks, what it must see, and where its chunks go.
struct ReadJob<'a> {
    ctx: &'a NodeContext,
    req: &'a QueryRequest,
    params: Vec<crate::command::SqlValue>,
    admission: Admission,
    /// Most rows it may return.
    limit: usize,
    /// All chunks but the last go here as they fill; the caller sends the last one.
    out: &'a mpsc::Sender<QueryChunk>,
    /// What it waits for PostgreSQL to hold, for the message of its deadline.
    waiting: Waiting,
}

/// Runs the query within the read's time bound and sends its result in chunks to `out`; the
/// first chunk carries the columns and the applied index of the snapshot the query read.
/// Returns the status that ends the read (`Ok` after the last chunk; nothing is reported if
/// the receiver went away). When the bound hits, the read's PostgreSQL transaction is ended
/// by closing its connection and the read ends with `DEADLINE_EXCEEDED`, whether the query was
/// still running or a full `out` (a client not reading) held it up.
async fn run_read(
    ctx: Arc<NodeContext>,
    req: QueryRequest,
    admission: Admission,
    limit: usize,
    out: mpsc::Sender<QueryChunk>,
) -> Result<(), Status> {
    let started = Instant::now();
    let job = ReadJob {
        ctx: &ctx,
        req: &req,
        params: params_from_proto(&req.params, "")?,
        admission,
        limit,
        out: &out,
        waiting: Waiting::default(),
    };
    let bounded = tokio::time::timeout_at(admission.bounds.end_by.into(), read_on_connection(&job));
    match bounded.await {
        Ok(r) => r,
        Err(_) => Err(match job.waiting.get() {
            Some((applied, required)) => not_held_status(applied, required),
            None => Status::deadline_exceeded(format!(
                "the read did not finish within its time bound ({:?}; the request's timeout_ms, \
                 at most {READ_DURATION_MAX:?}): it was ended and its transaction rolled back; \
                 read a stream as fast as it arrives, or narrow the query",
                admission.bounds.end_by.saturating_duration_since(started)
            )),
        }),
    }
}

/// Borrows a read connection and runs the read on it. The connection goes back to the pool
/// only when the read left it clean; otherwise (and when the caller's deadline drops this
/// future) it is closed, which ends the read's PostgreSQL transaction.
async fn read_on_connection(job: &ReadJob<'_>) -> Result<(), Status> {
    let mut pooled = job
        .ctx
        .reads
        .get()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    match read_in_snapshot(job, pooled.client()).await {
        Ok(last) => {
            pooled.release();
            // The client went away if this fails: nobody to tell.
            let _ = job.out.send(last).await;
            Ok(())
        }
        Err(ReadStop::Failed(status)) => {
            pooled.release();
            Err(status)
        }
        Err(ReadStop::Abandoned(status)) => status.map_or(Ok(()), Err),
    }
}

/// Opens the read's `REPEATABLE READ READ ONLY` snapshot and runs the query in it once
/// PostgreSQL holds the index the read requires, looking again (rolled back, short backoff)
/// until the consistency wait is over.
///
/// The index is checked against `raftpg.applied` *inside the snapshot*, not against openraft's
/// applied index: PostgreSQL commits with `synchronous_commit = off` and can lose its last
/// commits in a crash until the node replays them from the log, so openraft's index can be
/// ahead of what PostgreSQL holds (design.md, "Commits lost with `synchronous_commit = off`").
/// The common case costs nothing extra: the first snapshot already holds the index.
///
/// Returns the last chunk, to be sent after the connection is released.
async fn read_in_snapshot(
    job: &ReadJob<'_>,
    client: &mut tokio_postgres::Client,
) -> Result<QueryChunk, ReadStop> {
    let mut pause = SNAPSHOT_RETRY_FIRST;
    loop {
        let (tx, applied) = open_snapshot(client).await?;
        let Some(required) = job.admission.required_index.filter(|r| applied < *r) else {
            job.waiting.clear();
            return run_in_snapshot(job, tx, applied).await;
        };
        job.waiting.set(applied, required);
        tx.rollback().await.map_err(pg_stop)?;
        let left = job.admission.bounds.catch_up_left();
        if left.is_zero() {
            return Err(ReadStop::Failed(not_held_status(applied, required)));
        }
        debug!(
            applied,
            required, "PostgreSQL does not hold the read's index yet; looking again"
        );
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(SNAPSHOT_RETRY_MAX);
    }
}

/// What a read is waiting for PostgreSQL to hold, visible to the read's deadline so that a read
/// cut off while waiting says why.
#[derive(Debug, Default)]
struct Waiting {
    applied: AtomicU64,
    /// 0 while not waiting (index 0 is held by every snapshot).
    required: AtomicU64,
}

impl Waiting {
    /// Records that the snapshot held `applied` but the read needs `required`.
    fn set(&self, applied: u64, required: u64) {
        self.applied.store(applied, Ordering::Relaxed);
        self.required.store(required, Ordering::Relaxed);
    }

    /// Records that the read no longer waits.
    fn clear(&self) {
        self.required.store(0, Ordering::Relaxed);
    }

    /// `(applied, required)` while the read waits.
    fn get(&self) -> Option<(u64, u64)> {
        let required = self.required.load(Ordering::Relaxed);
        (required > 0).then(|| (self.applied.load(Ordering::Relaxed), required))
    }
}

/// Opens a `REPEATABLE READ READ ONLY` transaction and reads the applied index its snapshot
/// holds.
async fn open_snapshot(
    client: &mut tokio_postgres::Client,
) -> Result<(tokio_postgres::Transaction<'_>, u64), ReadStop> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_stop)?;
    let applied: i64 = tx
        .query_one("SELECT log_index FROM raftpg.applied", &[])
        .await
        .map_err(pg_stop)?
        .get(0);
    Ok((tx, u64::try_from(applied).unwrap_or(0)))
}

/// The status of a read whose consistency wait ended before PostgreSQL held its index.
fn not_held_status(applied: u64, required: u64) -> Status {
    Status::deadline_exceeded(format!(
        "this node's PostgreSQL holds log index {applied} but the read needs {required}, and it \
         did not get there within the read's wait (entries PostgreSQL lost in a crash are \
         replayed from the Raft log); retry or read from another node"
    ))
}

/// Runs the query in the open snapshot `tx` (which read `applied`) and sends all chunks but
/// the last, which it returns after committing.
async fn run_in_snapshot(
    job: &ReadJob<'_>,
    tx: tokio_postgres::Transaction<'_>,
    applied: u64,
) -> Result<QueryChunk, ReadStop> {
    let stmt = tx.prepare(&job.req.sql).await.map_err(pg_stop)?;
    check_statement(&stmt, &job.params)?;
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
        applied_index: applied,
        node_id: job.ctx.id,
    };
    let width = chunk.columns.len();
    let params = job.params.iter().map(|v| v as &(dyn ToSql + Sync));
    let stream = tx.query_raw(&stmt, params).await.map_err(pg_stop)?;
    futures::pin_mut!(stream);
    let (mut total, mut chunk_bytes) = (0usize, 0usize);
    // A PostgreSQL error ends the statement (the connection stays clean); anything else that
    // stops this loop leaves rows unread.
    while let Some(row) = stream.try_next().await.map_err(pg_stop)? {
        if total >= job.limit {
            return Err(ReadStop::Abandoned(Some(too_many_rows(job.limit))));
        }
        let r = encode_row(&row, width).map_err(|s| ReadStop::Abandoned(Some(s)))?;
        chunk_bytes += prost::Message::encoded_len(&r);
        chunk.rows.push(r);
        total += 1;
        if chunk_bytes >= CHUNK_BYTES_MAX {
            let next = QueryChunk {
                node_id: job.ctx.id,
                ..Default::default()
            };
            if job
                .out
                .send(std::mem::replace(&mut chunk, next))
                .await
                .is_err()
            {
                return Err(ReadStop::Abandoned(None)); // the client went away
            }
            chunk_bytes = 0;
        }
    }
    tx.commit().await.map_err(pg_stop)?;
    Ok(chunk)
}

/// The refusal of a read returning more than `limit` rows.
fn too_many_rows(limit: usize) -> Status {
    refused(
        Code::ResourceExhausted,
        "54000",
        format!(
            "the query returns more than {limit} rows; add LIMIT/OFFSET or a narrower WHERE, or \
             stream it"
        ),
    )
}

/// Refuses a prepared query whose parameters do not match the bound values or whose result
/// has a column type the API cannot carry.
fn check_statement(
    stmt: &tokio_postgres::Statement,
    params: &[crate::command::SqlValue],
) -> Result<(), Status> {
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
    Ok(())
}

/// One result row in the API's encoding.
fn encode_row(row: &tokio_postgres::Row, width: usize) -> Result<Row, Status> {
    let mut values_out = Vec::with_capacity(width);
    for i in 0..width {
        let Cell(v) = row
            .try_get::<_, Cell>(i)
            .map_err(|e| refused(Code::Unimplemented, "0A000", e.to_string()))?;
        values_out.push(values::to_proto(&v));
    }
    Ok(Row { values: values_out })
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
    /// Checks the request and waits (within its bounds) until openraft applied the index its
    /// consistency level requires. Returns that index, which the read then also requires of
    /// PostgreSQL inside its own snapshot ([`read_in_snapshot`]).
    async fn admit(&self, req: &QueryRequest) -> Result<Admission, Status> {
        let bounds = ReadBounds::new(
            req.timeout_ms,
            self.ctx.limits.read_wait_max,
            Instant::now(),
        );
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
        let required_index = match Consistency::try_from(req.consistency) {
            Ok(Consistency::Local) => None,
            Ok(Consistency::AtLeast) => {
                self.wait_applied(req.min_index, bounds.catch_up_left())
                    .await?;
                Some(req.min_index)
            }
            Ok(Consistency::Linearizable) if self.ctx.unsafe_local_linearizable_reads => None,
            Ok(Consistency::Linearizable) => {
                let index = self.read_index(bounds.catch_up_left()).await?;
                self.wait_applied(index, bounds.catch_up_left()).await?;
                Some(index)
            }
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown consistency level {}",
                    req.consistency
                )))
            }
        };
        Ok(Admission {
            required_index,
            bounds,
        })
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
            let admission = self.admit(&req).await?;
            let limit = match req.max_rows {
                0 => self.ctx.limits.read_rows_max,
                n => (n as usize).min(self.ctx.limits.read_rows_max),
            };
            let (tx, mut rx) = mpsc::channel(4);
            let run = run_read(self.ctx.clone(), req, admission, limit, tx);
            let collect = async {
                let mut resp = QueryResponse::default();
                let mut first = true;
                while let Some(chunk) = rx.recv().await {
                    if first {
                        resp.columns = chunk.columns;
                        resp.applied_index = chunk.applied_index;
                        resp.node_id = chunk.node_id;
                        first = false;
                    }
                    resp.rows.extend(chunk.rows);
                }
                resp
            };
            let (outcome, resp) = tokio::join!(run, collect);
            outcome.map(|()| Response::new(resp))
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
        let admission = self.admit(&req).await?;
        let limit = match req.max_rows {
            0 => self.ctx.limits.read_stream_rows_max,
            n => (n as usize).min(self.ctx.limits.read_stream_rows_max),
        };
        // Two chunks in flight at most: the query runs as fast as the client reads, and no
        // longer than the read's bound (`run_read`), even when the client stops reading.
        let (tx, rx) = mpsc::channel(2);
        let (done_tx, done_rx) = oneshot::channel();
        let run = run_read(self.ctx.clone(), req, admission, limit, tx);
        tokio::spawn(async move {
            // The receiver is gone only if the client is: nobody to tell.
            let _ = done_tx.send(run.await);
        });
        Ok(Response::new(Box::pin(chunks_then_outcome(rx, done_rx))))
    }
}

/// The response stream of a streamed read: its chunks, then its ending status unless it ended
/// well. The ending travels apart from the chunks, so that it is delivered even when the read
/// ended because the chunk channel was full.
fn chunks_then_outcome(
    rx: mpsc::Receiver<QueryChunk>,
    done: oneshot::Receiver<Result<(), Status>>,
) -> impl futures::Stream<Item = Result<QueryChunk, Status>> + Send {
    let chunks =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) },
        );
    let ending = futures::stream::once(done).filter_map(|outcome| async move {
        match outcome {
            Ok(Ok(())) => None,
            Ok(Err(status)) => Some(Err(status)),
            Err(_) => Some(Err(Status::internal("the read ended without an outcome"))),
        }
    });
    chunks.chain(ending)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT_MAX: Duration = Duration::from_secs(10);

    #[test]
    fn a_read_without_timeout_gets_the_node_defaults() {
        let now = Instant::now();
        let b = ReadBounds::new(0, WAIT_MAX, now);
        assert_eq!(b.catch_up_by, now + WAIT_MAX);
        assert_eq!(b.end_by, now + READ_DURATION_MAX);
    }

    #[test]
    fn the_request_timeout_bounds_the_whole_read() {
        let now = Instant::now();
        let b = ReadBounds::new(3_000, WAIT_MAX, now);
        assert_eq!(b.catch_up_by, now + Duration::from_secs(3));
        assert_eq!(b.end_by, now + Duration::from_secs(3));
    }

    #[test]
    fn no_request_outlives_the_node_maximum() {
        let now = Instant::now();
        let b = ReadBounds::new(u32::MAX, WAIT_MAX, now);
        assert_eq!(b.catch_up_by, now + WAIT_MAX);
        assert_eq!(b.end_by, now + READ_DURATION_MAX);
        // A node configured to wait longer than any read may run still ends reads in time.
        let b = ReadBounds::new(0, Duration::from_secs(3600), now);
        assert_eq!(b.catch_up_by, now + READ_DURATION_MAX);
        assert_eq!(b.end_by, now + READ_DURATION_MAX);
    }

    #[test]
    fn the_ending_follows_the_chunks() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let (tx, rx) = mpsc::channel(2);
            let (done_tx, done_rx) = oneshot::channel();
            tx.send(QueryChunk::default()).await.expect("room");
            drop(tx);
            done_tx
                .send(Err(Status::deadline_exceeded("late")))
                .expect("receiver");
            let items: Vec<_> = chunks_then_outcome(rx, done_rx).collect().await;
            assert_eq!(items.len(), 2);
            assert!(items[0].is_ok());
            assert!(
                matches!(&items[1], Err(s) if s.code() == Code::DeadlineExceeded),
                "{items:?}"
            );
        });
    }
}
