//! Reads: one query in a `REPEATABLE READ READ ONLY` transaction on this node, after waiting
//! (bounded) for the requested consistency level.
//!
//! Levels: `Local` (now), `AtLeast(i)` (this node applied `i`), `Linearizable` (a read index
//! confirmed by the leader's quorum, then applied here; works on followers). The applied index
//! is read inside the query's own snapshot, so the answer says exactly what state it saw, and
//! `AtLeast`/`Linearizable` reads require their index *there* (PostgreSQL may have lost commits
//! openraft counts as applied; see [`read_in_snapshot`]).
//!
//! Every read is bounded in time ([`ReadBounds`]): its transaction ends by the request's
//! `timeout_ms` (at most [`READ_DURATION_MAX`]) even when a streaming client stops reading,
//! so DDL applied through the log never waits without limit behind a read's locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use postgres_types::{ToSql, Type};
use tokio::sync::mpsc;
use tracing::{debug, info_span, Instrument, Span};

use super::error::{ErrorKind, ServiceError};
use super::node::{Route, Service};
use super::types::{Consistency, Description, Origin, ReadChunk, ReadRequest, SESSION_SETTINGS};
use crate::auth::authenticator::Principal;
use crate::command::{ColumnInfo, SqlFailure, SqlValue};
use crate::pg::describe::{columns_of, prepare};
use crate::pg::read_pool::{
    switch_sql, ConnState, SessionState, StatementCache, READ_DURATION_MAX,
};
use crate::pg::results::{decode_row, text_forms, text_wrapped, Form};
use crate::pg::sqlstate::is_deterministic;
use crate::pg::values;
use crate::raft::read_index::{ReadIndexError, RoundFn};
use crate::sql::gate;

/// A read that passed admission: it may now run ([`AdmittedRead::run`]).
pub struct AdmittedRead {
    svc: Arc<Service>,
    req: ReadRequest,
    admission: Admission,
    /// Most rows it may return.
    limit: usize,
    span: Span,
}

impl Service {
    /// Checks a read and waits (within its bounds) until openraft applied the index its
    /// consistency level requires; the read then also requires that index of PostgreSQL,
    /// inside its own snapshot ([`read_in_snapshot`]).
    pub async fn admit_read(
        self: &Arc<Self>,
        req: ReadRequest,
    ) -> Result<AdmittedRead, ServiceError> {
        let span = info_span!(
            "read",
            node = self.id,
            term = self.term(),
            consistency = ?req.consistency,
        );
        let admission = match self.admit(&req).instrument(span.clone()).await {
            Ok(a) => a,
            Err(e) => {
                record_read(&req, std::time::Duration::ZERO, Err(&e));
                return Err(e);
            }
        };
        let (limit_max, asked) = match req.streamed {
            false => (self.limits.read_rows_max, req.max_rows),
            true => (self.limits.read_stream_rows_max, req.max_rows),
        };
        let limit = match asked {
            0 => limit_max,
            n => (n as usize).min(limit_max),
        };
        Ok(AdmittedRead {
            svc: self.clone(),
            req,
            admission,
            limit,
            span,
        })
    }

    /// Admits and runs a read, and answers its whole result as one chunk.
    pub async fn read(self: &Arc<Self>, req: ReadRequest) -> Result<ReadChunk, ServiceError> {
        let read = self.admit_read(req).await?;
        let (tx, mut rx) = mpsc::channel::<ReadChunk>(4);
        let collect = async {
            let mut whole = ReadChunk::default();
            let mut first = true;
            while let Some(chunk) = rx.recv().await {
                if first {
                    whole.columns = chunk.columns;
                    whole.applied_index = chunk.applied_index;
                    whole.node_id = chunk.node_id;
                    first = false;
                }
                whole.rows.extend(chunk.rows);
            }
            whole
        };
        let (outcome, whole) = tokio::join!(read.run(tx), collect);
        outcome.map(|()| whole)
    }

    async fn admit(&self, req: &ReadRequest) -> Result<Admission, ServiceError> {
        let bounds = ReadBounds::new(req.timeout_ms, self.limits.read_wait_max, Instant::now());
        self.refuse_if_removed()?;
        self.refuse_if_diverged(req.allow_diverged)?;
        if req.encoded_bytes > self.limits.request_bytes_max {
            return Err(ServiceError::refused(
                ErrorKind::ResourceExhausted,
                "54000",
                format!(
                    "request of {} bytes exceeds the limit of {} bytes",
                    req.encoded_bytes, self.limits.request_bytes_max
                ),
            ));
        }
        gate::check_read_cached(&req.sql).map_err(|r| {
            ServiceError::refused(ErrorKind::InvalidArgument, r.sqlstate, r.message)
        })?;
        let required_index = match req.consistency.clone()? {
            Consistency::Local => None,
            Consistency::AtLeast(min_index) => {
                self.wait_applied(min_index, bounds.catch_up_left()).await?;
                Some(min_index)
            }
            Consistency::Linearizable if self.unsafe_local_linearizable_reads => None,
            Consistency::Linearizable => {
                let index = self.read_index(bounds.catch_up_left()).await?;
                self.wait_applied(index, bounds.catch_up_left()).await?;
                Some(index)
            }
        };
        Ok(Admission {
            required_index,
            bounds,
        })
    }

    /// The index a linearizable read must see: from our own quorum check when leading, else
    /// from the leader's (also when this node finds it no longer leads).
    pub(crate) async fn read_index(&self, wait: Duration) -> Result<u64, ServiceError> {
        if self.is_leader() {
            match self.local_read_index(wait).await? {
                Err(ReadIndexError::NotLeader) => {}
                confirmed => return confirmed.map_err(|e| self.read_index_error(e)),
            }
        }
        match self.route(Origin::Client, wait).await? {
            Route::Here => self.confirm_read_index(wait).await,
            Route::Leader(leader) => {
                let failed = |message: &str| {
                    ServiceError::unavailable(
                        format!(
                            "leader {} could not confirm a read index within {wait:?}: {message}",
                            leader.id
                        ),
                        None,
                    )
                };
                // Reads on this follower share requests to the leader (raft::read_index).
                let (peers, to) = (self.peers.clone(), leader.clone());
                let round: RoundFn<u64, ServiceError> = Arc::new(move || {
                    let (peers, to) = (peers.clone(), to.clone());
                    Box::pin(async move { peers.read_index(&to, wait).await })
                });
                match tokio::time::timeout(wait, self.leader_read_index.join(round)).await {
                    Ok(Some(Ok(index))) => Ok(index),
                    Ok(Some(Err(e))) => Err(failed(&e.message)),
                    Ok(None) => Err(failed("the request ended without an answer")),
                    Err(_) => Err(failed("no answer in time")),
                }
            }
        }
    }

    /// A read index confirmed by this leader's quorum after this call began (waiting at most
    /// `wait`: a leader cut off from its quorum cannot confirm and must not answer).
    pub async fn confirm_read_index(&self, wait: Duration) -> Result<u64, ServiceError> {
        self.local_read_index(wait)
            .await?
            .map_err(|e| self.read_index_error(e))
    }

    /// One round of [`raft::read_index`](crate::raft::read_index), bounded by `wait`.
    async fn local_read_index(
        &self,
        wait: Duration,
    ) -> Result<Result<u64, ReadIndexError>, ServiceError> {
        tokio::time::timeout(wait, self.read_index.read_index(&self.raft))
            .await
            .map_err(|_| {
                ServiceError::unavailable(
                    format!("leadership not confirmed by a quorum within {wait:?}"),
                    None,
                )
            })
    }

    fn read_index_error(&self, e: ReadIndexError) -> ServiceError {
        match e {
            ReadIndexError::NotLeader => {
                ServiceError::unavailable("this node is not the leader", self.leader())
            }
            e @ (ReadIndexError::Unconfirmed(_) | ReadIndexError::RoundLost) => {
                ServiceError::unavailable(format!("cannot confirm a linearizable read: {e}"), None)
            }
        }
    }

    async fn wait_applied(&self, index: u64, wait: Duration) -> Result<(), ServiceError> {
        self.raft
            .wait(Some(wait))
            .applied_index_at_least(Some(index), "read")
            .await
            .map(|_| ())
            .map_err(|e| {
                ServiceError::deadline(format!(
                    "this node did not apply index {index} within {wait:?} ({e}); retry or read from another node"
                ))
            })
    }
}

impl AdmittedRead {
    /// Runs the read and sends its result in chunks to `out` (the first chunk carries the
    /// columns and the applied index of the snapshot the query read). Ends by the read's time
    /// bound, also when `out` is full because the client stopped reading.
    pub async fn run(self, out: mpsc::Sender<ReadChunk>) -> Result<(), ServiceError> {
        let AdmittedRead {
            svc,
            req,
            admission,
            limit,
            span,
        } = self;
        let started = std::time::Instant::now();
        let outcome = run_read(&svc, &req, admission, limit, out)
            .instrument(span)
            .await;
        record_read(&req, started.elapsed(), outcome.as_ref().map(|_| ()));
        outcome
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
    Failed(ServiceError),
    /// Rows were left unread (the client went away, the row limit was hit) or the connection
    /// failed outside SQL: it must be closed, not reused. The status, if anyone is left to
    /// tell.
    Abandoned(Option<ServiceError>),
}

impl From<ServiceError> for ReadStop {
    fn from(s: ServiceError) -> Self {
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
    svc: &'a Service,
    req: &'a ReadRequest,
    /// The read's parameters.
    params: &'a [SqlValue],
    admission: Admission,
    /// Most rows it may return.
    limit: usize,
    /// All chunks but the last go here as they fill; the caller sends the last one.
    out: &'a mpsc::Sender<ReadChunk>,
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
    svc: &Service,
    req: &ReadRequest,
    admission: Admission,
    limit: usize,
    out: mpsc::Sender<ReadChunk>,
) -> Result<(), ServiceError> {
    let started = Instant::now();
    // A parameter the frontend could not decode fails the read here, after admission.
    let params = req.params.as_ref().map_err(Clone::clone)?;
    let job = ReadJob {
        svc,
        req,
        params,
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
            None => ServiceError::deadline(format!(
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
async fn read_on_connection(job: &ReadJob<'_>) -> Result<(), ServiceError> {
    let mut pooled = job
        .svc
        .reads
        .get()
        .await
        .map_err(|e| ServiceError::unavailable(e.to_string(), None))?;
    let (client, state) = pooled.parts();
    match read_in_snapshot(job, client, state).await {
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
/// A read whose statements this connection prepared before goes [`read_direct`] when it can,
/// else [`read_pipelined`]; a new one is prepared here, step by step.
///
/// Returns the last chunk, to be sent after the connection is released.
async fn read_in_snapshot(
    job: &ReadJob<'_>,
    client: &mut tokio_postgres::Client,
    state: &mut ConnState,
) -> Result<ReadChunk, ReadStop> {
    // Read before preparing: a schema change while it prepares makes the entry stale.
    let epoch = job.svc.applier.schema_epoch();
    let key = statement_key(job.req);
    if let Some(key) = &key {
        if let Some((stmt, run)) = state.statements.get(key, epoch) {
            match read_direct(job, client, state, &stmt, &run).await? {
                Direct::Done(chunk) => {
                    count_path("direct");
                    return Ok(chunk);
                }
                Direct::Again => state.statements.remove(key),
                Direct::NotHere => match read_pipelined(job, client, state, &stmt, &run).await? {
                    Pipelined::Done(chunk) => {
                        count_path("pipelined");
                        return Ok(chunk);
                    }
                    Pipelined::Again => state.statements.remove(key),
                    Pipelined::Behind => {}
                },
            }
        }
    }
    let cache = key.map(|k| (k, epoch));
    let mut pause = SNAPSHOT_RETRY_FIRST;
    loop {
        let role = job.req.principal.as_ref().map(|p| p.user.as_str());
        let (tx, applied) = open_snapshot(client, state, role, &job.req.settings).await?;
        let Some(required) = job.admission.required_index.filter(|r| applied < *r) else {
            job.waiting.clear();
            count_path("prepared");
            return run_in_snapshot(job, tx, applied, &mut state.statements, cache).await;
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

/// Counts a read run by `path` (see `metrics`).
fn count_path(path: &str) {
    crate::metrics::get()
        .read_paths
        .with_label_values(&[path])
        .inc();
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
/// holds (and the incarnation token, into `state`); with `role`, the rest of the transaction
/// runs as that role (raftpg_reader is a member of every role, see apply::roles: the role's
/// privileges and row-level security decide what the query sees; the read gate refuses
/// set_config, so it cannot switch back). Both in one round trip: `raftpg.applied` is read
/// with raftpg_reader's rights, checked before the switch runs.
async fn open_snapshot<'c>(
    client: &'c mut tokio_postgres::Client,
    state: &mut ConnState,
    role: Option<&str>,
    settings: &[(String, String)],
) -> Result<(tokio_postgres::Transaction<'c>, u64), ReadStop> {
    state.to_base(client).await.map_err(pg_stop)?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_stop)?;
    let row = match role {
        None => tx.query_one(APPLIED_SQL, &[]).await,
        Some(role) => tx.query_one(APPLIED_AS_SQL, &[&role]).await,
    };
    let row = row.map_err(pg_stop)?;
    let applied: i64 = row.get(0);
    state.incarnation = row.get(1);
    if !settings.is_empty() {
        let (sql, params) = set_settings_sql(settings)?;
        let params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        tx.query_one(sql.as_str(), &params).await.map_err(pg_stop)?;
    }
    Ok((tx, u64::try_from(applied).unwrap_or(0)))
}

/// `SELECT set_config($1, $2, true), …` for `settings`, which must all be session settings
/// ([`SESSION_SETTINGS`]): anything else (a role, read-only-ness) is refused.
fn set_settings_sql(settings: &[(String, String)]) -> Result<(String, Vec<String>), ServiceError> {
    let mut parts = Vec::new();
    let mut params = Vec::new();
    for (name, value) in settings {
        if !SESSION_SETTINGS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(name))
        {
            return Err(ServiceError::refused(
                ErrorKind::InvalidArgument,
                "0A000",
                format!("a read cannot run with setting {name:?}"),
            ));
        }
        parts.push(format!(
            "pg_catalog.set_config(${}, ${}, true)",
            params.len() + 1,
            params.len() + 2
        ));
        params.push(name.clone());
        params.push(value.clone());
    }
    Ok((format!("SELECT {}", parts.join(", ")), params))
}

/// The status of a read whose consistency wait ended before PostgreSQL held its index.
fn not_held_status(applied: u64, required: u64) -> ServiceError {
    ServiceError::deadline(format!(
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
    statements: &mut StatementCache,
    cache: Option<(String, u64)>,
) -> Result<ReadChunk, ReadStop> {
    let stmt = prepare(&tx, &job.req.sql, &job.req.param_types)
        .await
        .map_err(pg_stop)?;
    check_statement(&stmt, job.params)?;
    let columns = columns_of(&stmt);
    let forms = result_forms(&stmt, &job.req.result_formats, &job.req.settings);
    let run = match forms.contains(&Form::Text) {
        false => stmt.clone(),
        true => {
            let text: Vec<bool> = forms.iter().map(|f| *f == Form::Text).collect();
            let Some(wrapped) = text_wrapped(&job.req.sql, &text) else {
                return Err(ReadStop::Failed(not_printable(&columns, &forms)));
            };
            tx.prepare_typed(&wrapped, stmt.params())
                .await
                .map_err(pg_stop)?
        }
    };
    if let Some((key, epoch)) = cache {
        statements.insert(key, stmt, run.clone(), epoch);
    }
    let params = job.params.iter().map(|v| v as &(dyn ToSql + Sync));
    let stream = tx.query_raw(&run, params).await.map_err(pg_stop)?;
    let chunk = stream_rows(job, stream, columns, &forms, applied).await?;
    tx.commit().await.map_err(pg_stop)?;
    Ok(chunk)
}

/// Sends the rows of `stream` in chunks to the read's receiver, all but the last, which it
/// returns.
async fn stream_rows(
    job: &ReadJob<'_>,
    stream: tokio_postgres::RowStream,
    columns: Vec<ColumnInfo>,
    forms: &[Form],
    applied: u64,
) -> Result<ReadChunk, ReadStop> {
    let mut chunk = ReadChunk {
        columns,
        rows: Vec::new(),
        applied_index: applied,
        node_id: job.svc.id,
    };
    futures::pin_mut!(stream);
    let (mut total, mut chunk_bytes) = (0usize, 0usize);
    // A PostgreSQL error ends the statement (the connection stays clean); anything else that
    // stops this loop leaves rows unread.
    while let Some(row) = stream.try_next().await.map_err(pg_stop)? {
        if total >= job.limit {
            return Err(ReadStop::Abandoned(Some(too_many_rows(job.limit))));
        }
        let r = decode_row(&row, forms, &chunk.columns).map_err(|e| {
            ReadStop::Abandoned(Some(ServiceError::refused(
                ErrorKind::Unsupported,
                "0A000",
                e,
            )))
        })?;
        chunk_bytes += 3 + r.iter().map(values::wire_size).sum::<usize>();
        chunk.rows.push(r);
        total += 1;
        if chunk_bytes >= CHUNK_BYTES_MAX {
            let next = ReadChunk {
                node_id: job.svc.id,
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
    Ok(chunk)
}

/// How a pipelined read ended.
enum Pipelined {
    /// It ran; the last chunk (the others were sent).
    Done(ReadChunk),
    /// Its snapshot did not hold the index the read requires (PostgreSQL lost commits in a
    /// crash): nothing was sent; wait and look again.
    Behind,
    /// The query failed as prepared (its result columns changed, or anything else: a parameter
    /// type PostgreSQL inferred before a schema change): nothing was sent; prepare it again and
    /// run it step by step, which answers the error if it is the query's own.
    Again,
}

/// Longest read text whose statements a connection keeps prepared.
const CACHED_SQL_MAX: usize = 4096;

/// Schema epoch of raftpg's own statements (`raftpg.applied` does not change).
const INTERNAL_EPOCH: u64 = 0;

/// The key of a read's statements in its connection's cache: everything that changes how
/// PostgreSQL parses and describes it (the role resolves `$user` in the search path and needs
/// USAGE on the schemas it names; settings; parameter types; the result formats, which decide
/// the form that runs). `None` for a text too long to keep ([`CACHED_SQL_MAX`]).
fn statement_key(req: &ReadRequest) -> Option<String> {
    if req.sql.len() > CACHED_SQL_MAX {
        return None;
    }
    let role = req
        .principal
        .as_ref()
        .map(|p| p.user.as_str())
        .unwrap_or("");
    Some(format!(
        "{role}\u{0}{:?}\u{0}{:?}\u{0}{:?}\u{0}{}",
        req.settings, req.param_types, req.result_formats, req.sql
    ))
}

/// Reads the applied index and the incarnation token (null unless exactly one) in one
/// snapshot.
const APPLIED_SQL: &str = "SELECT a.log_index, i.token FROM raftpg.applied a \
     CROSS JOIN (SELECT CASE WHEN count(*) = 1 THEN min(token) END AS token \
                 FROM raftpg.incarnation) i";

/// [`APPLIED_SQL`], then switches the transaction to role `$1`. Both tables are read with
/// raftpg_reader's rights: PostgreSQL checks them before the switch runs.
const APPLIED_AS_SQL: &str = "SELECT a.log_index, i.token, \
     pg_catalog.set_config('role', $1, true) FROM raftpg.applied a \
     CROSS JOIN (SELECT CASE WHEN count(*) = 1 THEN min(token) END AS token \
                 FROM raftpg.incarnation) i";

/// The statement that reads the applied index (and, with a role, switches to it), prepared
/// once per connection.
async fn applied_statement(
    client: &tokio_postgres::Client,
    statements: &mut StatementCache,
    role: bool,
) -> Result<tokio_postgres::Statement, ReadStop> {
    let (key, sql) = match role {
        false => ("\u{0}applied", APPLIED_SQL),
        true => ("\u{0}applied-as", APPLIED_AS_SQL),
    };
    if let Some((stmt, _)) = statements.get(key, INTERNAL_EPOCH) {
        return Ok(stmt);
    }
    let stmt = client.prepare(sql).await.map_err(pg_stop)?;
    statements.insert(key.to_string(), stmt.clone(), stmt.clone(), INTERNAL_EPOCH);
    Ok(stmt)
}

/// The statement that applies `n` session settings, prepared once per connection per `n`.
async fn settings_statement(
    client: &tokio_postgres::Client,
    statements: &mut StatementCache,
    sql: &str,
    n: usize,
) -> Result<tokio_postgres::Statement, ReadStop> {
    let key = format!("\u{0}settings-{n}");
    if let Some((stmt, _)) = statements.get(&key, INTERNAL_EPOCH) {
        return Ok(stmt);
    }
    let stmt = client
        .prepare_typed(sql, &vec![Type::TEXT; 2 * n])
        .await
        .map_err(pg_stop)?;
    statements.insert(key, stmt.clone(), stmt.clone(), INTERNAL_EPOCH);
    Ok(stmt)
}

/// How a direct read ended.
enum Direct {
    /// It ran; the last chunk (the others were sent).
    Done(ReadChunk),
    /// It cannot run directly here (see [`read_direct`]): nothing was sent or changed.
    NotHere,
    /// The query failed as prepared: nothing was sent; prepare it again (see
    /// [`Pipelined::Again`]).
    Again,
}

/// A read whose statements are prepared on this connection, run as one statement outside a
/// transaction block: no `BEGIN`, no look at `raftpg.applied`, no `COMMIT`.
///
/// Only when the applier's [`Held`](crate::apply::state_machine::Held) says that this
/// connection's PostgreSQL incarnation (the token it found in `raftpg.incarnation`) holds the
/// index the read requires: a statement that starts after the applier published that index
/// sees it, and a crash that could lose it ends this connection first. The answer's applied
/// index is that index (the snapshot may hold later entries too). The statement runs in a
/// read-only `REPEATABLE READ` transaction of its own (the connection's defaults), as the
/// read's role with its settings, set at session level when they differ from what the session
/// has (pipelined with the query; the read gate refuses anything that could change them from
/// SQL). One round trip, one statement for PostgreSQL.
///
/// `NotHere` when the applier does not know what PostgreSQL holds (reconnecting, a snapshot
/// being installed), the connection has not seen the current token, PostgreSQL may not hold
/// the required index yet, or the role and settings could not be set (the pipelined read then
/// answers why).
async fn read_direct(
    job: &ReadJob<'_>,
    client: &tokio_postgres::Client,
    state: &mut ConnState,
    stmt: &tokio_postgres::Statement,
    run: &tokio_postgres::Statement,
) -> Result<Direct, ReadStop> {
    let Some(held) = job.svc.applier.held() else {
        return Ok(Direct::NotHere);
    };
    if state.incarnation != Some(held.token)
        || job.admission.required_index.is_some_and(|r| held.index < r)
    {
        return Ok(Direct::NotHere);
    }
    let role = job.req.principal.as_ref().map(|p| p.user.as_str());
    let Ok(wanted) = SessionState::wanted(role, &job.req.settings) else {
        return Ok(Direct::NotHere);
    };
    check_statement(stmt, job.params)?;
    let switch = match state.session == wanted {
        true => None,
        false => Some((
            switch_statement(client, &mut state.statements).await?,
            SessionState::switch_params(wanted.as_ref()),
        )),
    };
    let columns = columns_of(stmt);
    let forms = result_forms(stmt, &job.req.result_formats, &job.req.settings);
    let set = run_setting(client, switch.as_ref());
    let params = job.params.iter().map(|v| v as &(dyn ToSql + Sync));
    // One poll sends both, in this order.
    let (set, rows) = futures::join!(set, client.query_raw(run, params));
    match set {
        Ok(()) => state.session = wanted,
        // The switch failed as a whole (the session is as it was) and the query ran as the
        // session was: its rows are dropped unread (the connection discards them).
        Err(e) if e.as_db_error().is_some() => return Ok(Direct::NotHere),
        Err(e) => return Err(pg_stop(e)),
    }
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) if e.as_db_error().is_some() => return Ok(Direct::Again),
        Err(e) => return Err(pg_stop(e)),
    };
    job.waiting.clear();
    stream_rows(job, rows, columns, &forms, held.index)
        .await
        .map(Direct::Done)
}

/// Runs `setting` — a prepared statement that sets session state and its values — if any.
async fn run_setting<V: ToSql + Sync>(
    client: &tokio_postgres::Client,
    setting: Option<&(tokio_postgres::Statement, Vec<V>)>,
) -> Result<(), tokio_postgres::Error> {
    let Some((stmt, values)) = setting else {
        return Ok(());
    };
    let values: Vec<&(dyn ToSql + Sync)> =
        values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    client.query_one(stmt, &values).await.map(|_| ())
}

/// The statement that sets a read connection's role and settings at session level
/// ([`switch_sql`]), prepared once per connection.
async fn switch_statement(
    client: &tokio_postgres::Client,
    statements: &mut StatementCache,
) -> Result<tokio_postgres::Statement, ReadStop> {
    const KEY: &str = "\u{0}switch";
    if let Some((stmt, _)) = statements.get(KEY, INTERNAL_EPOCH) {
        return Ok(stmt);
    }
    let sql = switch_sql();
    let n = crate::pg::read_pool::SESSION_BASE.len() + 1;
    let stmt = client
        .prepare_typed(&sql, &vec![Type::TEXT; n])
        .await
        .map_err(pg_stop)?;
    statements.insert(KEY.to_string(), stmt.clone(), stmt.clone(), INTERNAL_EPOCH);
    Ok(stmt)
}

/// A read whose statements are prepared on this connection, pipelined: `BEGIN`, the
/// applied index (and the role switch), the settings and the query are sent together, and
/// `COMMIT` right after, before the rows are read; the rows are sent only once the snapshot is
/// known to hold the index the read requires. Same transaction, same checks as the step-by-step
/// path ([`open_snapshot`], [`run_in_snapshot`]): two round trips (`COMMIT` goes out once the
/// query is bound) instead of six.
async fn read_pipelined(
    job: &ReadJob<'_>,
    client: &tokio_postgres::Client,
    state: &mut ConnState,
    stmt: &tokio_postgres::Statement,
    run: &tokio_postgres::Statement,
) -> Result<Pipelined, ReadStop> {
    check_statement(stmt, job.params)?;
    state.to_base(client).await.map_err(pg_stop)?;
    let statements = &mut state.statements;
    let role = job.req.principal.as_ref().map(|p| p.user.as_str());
    let applied_stmt = applied_statement(client, statements, role.is_some()).await?;
    let settings = match job.req.settings.is_empty() {
        true => None,
        false => {
            let (sql, values) = set_settings_sql(&job.req.settings)?;
            let stmt = settings_statement(client, statements, &sql, values.len() / 2).await?;
            Some((stmt, values))
        }
    };
    let columns = columns_of(stmt);
    let forms = result_forms(stmt, &job.req.result_formats, &job.req.settings);
    let begin = client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY");
    let applied = async {
        match role {
            Some(role) => client.query_one(&applied_stmt, &[&role]).await,
            None => client.query_one(&applied_stmt, &[]).await,
        }
    };
    let set = run_setting(client, settings.as_ref());
    let params = job.params.iter().map(|v| v as &(dyn ToSql + Sync));
    let rows = client.query_raw(run, params);
    // One poll sends all four, in this order.
    let (begun, applied, set, rows) = futures::join!(begin, applied, set, rows);
    // Polled once so that it is sent now; it may finish then already (a closed connection).
    let commit = futures::future::maybe_done(client.batch_execute("COMMIT"));
    futures::pin_mut!(commit);
    let _ = futures::poll!(commit.as_mut());
    // COMMIT of a transaction a statement failed in rolls it back: the connection is clean
    // once it is answered.
    // An error of raftpg's own statements is answered; an error of the query as prepared is
    // looked at again step by step (`Pipelined::Again`).
    let failed = match (begun, applied, set, rows) {
        (Ok(()), Ok(applied), Ok(()), Ok(rows)) => Ok((applied, rows)),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) => Err(Some(e)),
        (.., Err(e)) if e.as_db_error().is_some() => Err(None),
        (.., Err(e)) => Err(Some(e)),
    };
    let (applied, rows) = match failed {
        Ok(ok) => ok,
        Err(e) => {
            finish(commit).await.map_err(pg_stop)?;
            return match e {
                None => Ok(Pipelined::Again),
                Some(e) => Err(pg_stop(e)),
            };
        }
    };
    state.incarnation = applied.get(1);
    let applied = u64::try_from(applied.get::<_, i64>(0)).unwrap_or(0);
    if job.admission.required_index.is_some_and(|r| applied < r) {
        drop(rows);
        finish(commit).await.map_err(pg_stop)?;
        return Ok(Pipelined::Behind);
    }
    job.waiting.clear();
    let chunk = stream_rows(job, rows, columns, &forms, applied).await?;
    finish(commit).await.map_err(pg_stop)?;
    Ok(Pipelined::Done(chunk))
}

/// The result of a request already sent (and maybe already answered).
async fn finish<F: std::future::Future>(
    mut sent: std::pin::Pin<&mut futures::future::MaybeDone<F>>,
) -> F::Output {
    sent.as_mut().await;
    sent.take_output()
        .expect("a MaybeDone that was awaited holds its output")
}

impl Service {
    /// What PostgreSQL infers for `sql` (parameter and result types) without running it: the
    /// statement is prepared on this node as `principal`, once this node's PostgreSQL holds
    /// `min_index` (a session's own last write, so that what it created is there). A write
    /// is described too (PostgreSQL checks a statement's read-only-ness only when it runs).
    pub async fn describe(
        &self,
        sql: &str,
        param_types: &[u32],
        principal: Option<&Principal>,
        min_index: u64,
        settings: &[(String, String)],
    ) -> Result<Description, ServiceError> {
        self.refuse_if_removed()?;
        let bounds = ReadBounds::new(0, self.limits.read_wait_max, Instant::now());
        if min_index > 0 {
            self.wait_applied(min_index, bounds.catch_up_left()).await?;
        }
        let role = principal.map(|p| p.user.as_str());
        let described = async {
            let mut pooled = self
                .reads
                .get()
                .await
                .map_err(|e| ServiceError::unavailable(e.to_string(), None))?;
            let mut pause = SNAPSHOT_RETRY_FIRST;
            loop {
                let (client, state) = pooled.parts();
                let (tx, applied) = match open_snapshot(client, state, role, settings).await {
                    Ok(t) => t,
                    Err(ReadStop::Failed(e)) | Err(ReadStop::Abandoned(Some(e))) => return Err(e),
                    Err(ReadStop::Abandoned(None)) => {
                        return Err(ServiceError::unavailable("PostgreSQL unavailable", None))
                    }
                };
                if applied < min_index {
                    let _ = tx.rollback().await;
                    if bounds.catch_up_left().is_zero() {
                        return Err(not_held_status(applied, min_index));
                    }
                    tokio::time::sleep(pause.min(bounds.catch_up_left())).await;
                    pause = (pause * 2).min(SNAPSHOT_RETRY_MAX);
                    continue;
                }
                let prepared = prepare(&tx, sql, param_types).await;
                let rolled_back = tx.rollback().await;
                let stmt = prepared.map_err(pg_status)?;
                rolled_back.map_err(pg_status)?;
                pooled.release();
                return Ok(Description {
                    param_types: stmt.params().iter().map(Type::oid).collect(),
                    columns: columns_of(&stmt),
                });
            }
        };
        tokio::time::timeout(READ_DURATION_MAX, described)
            .await
            .map_err(|_| ServiceError::deadline("describing the statement took too long"))?
    }
}

impl Service {
    /// Checks a value of session setting `name` (one of [`SESSION_SETTINGS`]) the way
    /// PostgreSQL does (`SET` in a read-only transaction on this node) and returns it as
    /// PostgreSQL shows it; a bad value gets PostgreSQL's error (22023).
    pub async fn check_setting(&self, name: &str, value: &str) -> Result<String, ServiceError> {
        let (sql, params) = set_settings_sql(&[(name.to_string(), value.to_string())])?;
        let checked = async {
            let mut pooled = self
                .reads
                .get()
                .await
                .map_err(|e| ServiceError::unavailable(e.to_string(), None))?;
            let client = pooled.base_client().await.map_err(pg_status)?;
            let tx = client
                .build_transaction()
                .read_only(true)
                .start()
                .await
                .map_err(pg_status)?;
            let params: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            let row = tx.query_one(sql.as_str(), &params).await;
            let rolled_back = tx.rollback().await;
            let shown: String = row.map_err(pg_status)?.get(0);
            rolled_back.map_err(pg_status)?;
            pooled.release();
            Ok(shown)
        };
        tokio::time::timeout(self.limits.read_wait_max, checked)
            .await
            .map_err(|_| ServiceError::deadline("checking the setting took too long"))?
    }
}

/// The refusal of a read returning more than `limit` rows.
fn too_many_rows(limit: usize) -> ServiceError {
    ServiceError::refused(
        ErrorKind::ResourceExhausted,
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
    params: &[SqlValue],
) -> Result<(), ServiceError> {
    if stmt.params().len() != params.len() {
        return Err(ServiceError::refused(
            ErrorKind::InvalidArgument,
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
            ServiceError::refused(
                ErrorKind::InvalidArgument,
                "42804",
                format!("parameter ${}: {e}", i + 1),
            )
        })?;
    }
    Ok(())
}

/// How each column of `stmt` comes back: decoded when raftpg has a kind for its type, else in
/// binary form where `formats` (PostgreSQL's result format codes: none, one for all, or one
/// per column; 1 is binary) asks for it, else as PostgreSQL's text.
fn result_forms(
    stmt: &tokio_postgres::Statement,
    formats: &[i16],
    settings: &[(String, String)],
) -> Vec<Form> {
    let types: Vec<Type> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
    let names: Vec<&str> = settings.iter().map(|(n, _)| n.as_str()).collect();
    text_forms(&types, &names)
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let binary = match formats.len() {
                0 => false,
                1 => formats[0] == 1,
                _ => formats.get(i) == Some(&1),
            };
            match (f, binary) {
                (Form::Text, true) => Form::Binary,
                (f, _) => f,
            }
        })
        .collect()
}

/// The refusal of a statement whose columns cannot be printed as text (not a query).
fn not_printable(columns: &[ColumnInfo], forms: &[Form]) -> ServiceError {
    let names: Vec<String> = columns
        .iter()
        .zip(forms)
        .filter(|(_, f)| **f == Form::Text)
        .map(|(c, _)| format!("{:?} ({})", c.name, c.type_name))
        .collect();
    ServiceError::refused(
        ErrorKind::Unsupported,
        "0A000",
        format!(
            "column {} cannot be returned by this kind of statement; cast it to text (e.g. col::text)",
            names.join(", ")
        ),
    )
}

/// A PostgreSQL error of a read: SQL errors with their SQLSTATE, the rest as
/// [`ErrorKind::Unavailable`] (the node's PostgreSQL is down or restarting).
fn pg_status(e: tokio_postgres::Error) -> ServiceError {
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
            let position = match db.position() {
                Some(tokio_postgres::error::ErrorPosition::Original(p)) => {
                    u16::try_from(*p).unwrap_or(0)
                }
                _ => 0,
            };
            ServiceError {
                position,
                ..ServiceError::sql(&f, 0)
            }
        }
        Some(db) => ServiceError::unavailable(
            format!("PostgreSQL: {} ({})", db.message(), db.code().code()),
            None,
        ),
        None => {
            ServiceError::unavailable(format!("PostgreSQL unavailable on this node: {e}"), None)
        }
    }
}

/// Records a read in the node's metrics (see `metrics`).
fn record_read(req: &ReadRequest, took: std::time::Duration, outcome: Result<(), &ServiceError>) {
    let consistency = match &req.consistency {
        Ok(Consistency::Local) => "local",
        Ok(Consistency::AtLeast(_)) => "at_least",
        Ok(Consistency::Linearizable) => "linearizable",
        Err(_) => "invalid",
    };
    let m = crate::metrics::get();
    m.read_seconds
        .with_label_values(&[consistency])
        .observe(took.as_secs_f64());
    match outcome {
        Ok(()) => m.reads.with_label_values(&[consistency, "ok"]).inc(),
        Err(e) => {
            m.reads.with_label_values(&[consistency, "error"]).inc();
            m.error(e.sqlstate.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT_MAX: Duration = Duration::from_secs(10);

    #[test]
    fn the_read_pool_knows_every_session_setting() {
        let base: Vec<&str> = crate::pg::read_pool::SESSION_BASE
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(base, SESSION_SETTINGS);
    }

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
}
