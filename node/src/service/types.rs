//! The requests and answers of the service operations, with no protocol in them: frontends
//! build the requests from what they decoded and encode the answers.

use super::error::ServiceError;
use crate::auth::authenticator::Principal;
use crate::command::{ColumnInfo, NodeId, RequestId, SqlValue, StatementOutcome, TableChecksum};

/// Where a request comes from: a client, or another node that forwarded it to this one
/// (believing it leads). A forwarded request is never forwarded again, so a request cannot
/// travel in circles while leadership changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A client's request.
    Client,
    /// Forwarded by another node.
    Forwarded,
}

/// One statement of a write, as the frontend decoded it.
#[derive(Clone, Debug)]
pub struct WriteStatement {
    /// The SQL, as sent.
    pub sql: String,
    /// Its parameters, or why the frontend could not decode one. A decoding failure is
    /// reported in its turn (after the request's limits and the statement's SQL check), so
    /// a request's first problem is reported whatever the frontend.
    pub params: Result<Vec<SqlValue>, ServiceError>,
}

/// A write as the client sent it: statements run in one transaction, in order.
#[derive(Clone, Debug)]
pub struct WriteRequest {
    /// The statements, as sent (the gate checks and rewrites them on every node that sees the
    /// request; a forwarded write carries them as sent).
    pub statements: Vec<WriteStatement>,
    /// Set for exactly-once retries.
    pub request_id: Option<RequestId>,
    /// The request's size as received, in bytes (checked against the limit, and counted in
    /// the proposal batch's size).
    pub encoded_bytes: usize,
    /// Who sent it.
    pub origin: Origin,
    /// The role it runs as (`None`: raftpg itself; see `service::auth`).
    pub principal: Option<Principal>,
}

/// A write's applied result.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOutcome {
    /// The log index of the write's entry.
    pub log_index: u64,
    /// The term it was committed in.
    pub term: u64,
    /// The node that led (and answered).
    pub leader_id: NodeId,
    /// One result per statement.
    pub results: Vec<StatementOutcome>,
}

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Whatever this node holds now.
    Local,
    /// At least this log index applied on this node.
    AtLeast(u64),
    /// Everything committed before the read arrived (read index confirmed by the leader's
    /// quorum).
    Linearizable,
}

/// A read: one query in a `REPEATABLE READ READ ONLY` transaction.
#[derive(Clone, Debug)]
pub struct ReadRequest {
    /// The query.
    pub sql: String,
    /// Its parameters, or why the frontend could not decode one (reported when the read
    /// runs, after admission).
    pub params: Result<Vec<SqlValue>, ServiceError>,
    /// The parameters' types as the client gave them (OIDs on this node; 0 or missing:
    /// PostgreSQL infers the type).
    pub param_types: Vec<u32>,
    /// Which result columns the client wants in binary form, as PostgreSQL's result format
    /// codes (none: all text; one: for all columns; else one per column; 1 is binary). A
    /// column of a type raftpg has no kind for comes back in binary form
    /// ([`SqlValue::PgBinary`]) where asked, else in text form ([`SqlValue::PgText`]).
    pub result_formats: Vec<i16>,
    /// Session settings the read runs with, set in its transaction (only the names in
    /// [`SESSION_SETTINGS`]; others are refused). Columns whose text depends on them
    /// (timestamps and dates on `TimeZone`/`DateStyle`, bytea on `bytea_output`) are printed
    /// by PostgreSQL when asked in text form.
    pub settings: Vec<(String, String)>,
    /// How fresh it must be, or why the frontend could not tell (reported after the
    /// request's limits and SQL check).
    pub consistency: Result<Consistency, ServiceError>,
    /// The client's bound on the whole read, in milliseconds (0: the node's defaults).
    pub timeout_ms: u32,
    /// Most rows the client wants (0: the node's limit).
    pub max_rows: u32,
    /// Whether the rows are streamed (a higher row limit applies).
    pub streamed: bool,
    /// The request's size as received, in bytes.
    pub encoded_bytes: usize,
    /// The role it runs as (`None`: raftpg_reader; see `service::auth`).
    pub principal: Option<Principal>,
    /// Read even if this node's copy is known to differ (see `service::repair`).
    pub allow_diverged: bool,
}

/// Part of a read's result. The first chunk carries the columns and the applied index of the
/// snapshot the query read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadChunk {
    /// The result's columns (first chunk only).
    pub columns: Vec<ColumnInfo>,
    /// Rows.
    pub rows: Vec<Vec<SqlValue>>,
    /// The log index the read's snapshot held (first chunk only).
    pub applied_index: u64,
    /// The node that ran the read.
    pub node_id: NodeId,
}

/// The settings a session may run its reads with ([`ReadRequest::settings`]) and its writes
/// with (as `SET LOCAL` statements of the write, which the SQL gate allows): how values are
/// printed and read, and where names are looked up.
pub const SESSION_SETTINGS: &[&str] = &[
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "search_path",
    "bytea_output",
];

/// What PostgreSQL infers for a statement without running it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Description {
    /// The parameters' types (OIDs on this node).
    pub param_types: Vec<u32>,
    /// The result's columns (none for a statement without a result).
    pub columns: Vec<ColumnInfo>,
}

/// A change of the cluster's membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a running node (started with `--join`) as a learner.
    AddLearner {
        /// Its id.
        node_id: NodeId,
        /// Its peer address (its client address comes from its answer to the probe).
        addr: String,
        /// Answer only once it caught up with the log.
        wait_caught_up: bool,
    },
    /// Make learners voters; unless `force`, only learners that applied the log up to the
    /// commit index.
    Promote {
        /// The learners.
        ids: Vec<NodeId>,
        /// Promote them even when they lag.
        force: bool,
    },
    /// Remove members (they are told to stop serving).
    Remove(Vec<NodeId>),
    /// Hand leadership to a caught-up voter.
    TransferLeader(NodeId),
}

/// A member as the cluster reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its id.
    pub node_id: NodeId,
    /// Its client address (empty until the node published it).
    pub addr: String,
    /// Its peer address.
    pub peer_addr: String,
    /// Voter (or learner).
    pub voter: bool,
    /// The last log index the leader knows it holds (leader only; `None` when unknown).
    pub matched_index: Option<u64>,
}

/// The answer to a membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipOutcome {
    /// Log index of the change (0: nothing had to change).
    pub log_index: u64,
    /// The members after the change.
    pub members: Vec<MemberInfo>,
    /// What was done.
    pub message: String,
}

/// One node's checksums in a check, or why it gave none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeChecksums {
    /// The node.
    pub node_id: NodeId,
    /// Its peer address.
    pub addr: String,
    /// Its table checksums, or the error it answered with.
    pub tables: Result<Vec<TableChecksum>, String>,
}

/// The result of a divergence check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    /// The log index every node hashed at.
    pub log_index: u64,
    /// Every member answered and all agree.
    pub identical: bool,
    /// One line per table that differs, naming the odd nodes.
    pub differences: Vec<String>,
    /// Members that did not answer.
    pub missing_nodes: Vec<NodeId>,
    /// Members whose copy differs from the one a majority of all members hold (told so; see
    /// `service::repair`).
    pub diverged_nodes: Vec<NodeId>,
    /// User views and functions whose definitions the gate would refuse today (see
    /// `service::check`).
    pub unsafe_definitions: Vec<String>,
    /// Every member's answer.
    pub nodes: Vec<NodeChecksums>,
}

/// What a rebuild did (see `service::repair`).
#[derive(Clone, Debug)]
pub struct RebuildReport {
    /// The rebuilt node.
    pub node_id: NodeId,
    /// The member whose snapshot it installed.
    pub donor_id: NodeId,
    /// The log index the snapshot covers.
    pub log_index: u64,
    /// The snapshot's size.
    pub bytes: u64,
    /// How long it took.
    pub duration: std::time::Duration,
}

/// What must match between members' PostgreSQL servers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PgIdentity {
    /// server_version_num.
    pub version: String,
    /// Database encoding.
    pub encoding: String,
    /// Database collation.
    pub collation: String,
}

/// A node's view of the cluster and its own health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node.
    pub node_id: NodeId,
    /// "leader", "follower", "candidate", "learner" or "shutdown".
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader_id: Option<NodeId>,
    /// The leader's client address (empty when unknown).
    pub leader_addr: String,
    /// Last index in its log.
    pub last_log_index: u64,
    /// Last index it knows committed.
    pub committed_index: u64,
    /// Last index it applied.
    pub applied_index: u64,
    /// The members.
    pub members: Vec<MemberInfo>,
    /// Whether its PostgreSQL is up.
    pub postgres_up: bool,
    /// What its applier is doing.
    pub applier_state: String,
    /// Its PostgreSQL's version, encoding and collation.
    pub identity: PgIdentity,
    /// Whether the cluster removed it.
    pub removed: bool,
    /// Entries up to this index were compacted away.
    pub purged_index: u64,
    /// Index covered by its current snapshot.
    pub snapshot_index: u64,
    /// It runs without TLS (`--insecure`).
    pub insecure: bool,
    /// Its advertised client address.
    pub client_addr: String,
    /// Its advertised peer address.
    pub peer_addr: String,
    /// Why a check found its copy different from the majority's (empty: it did not).
    pub diverged: String,
    /// A snapshot being received or restored, and how far along (empty: none).
    pub snapshot_progress: String,
}

/// A node's health for probes (see `Service::health`): each check, or why it fails.
#[derive(Clone, Debug)]
pub struct Health {
    /// The node lives: its PostgreSQL is up and it was not removed.
    pub live: Result<(), String>,
    /// It can serve: also applying the log, a leader known, a member, its copy not known to
    /// differ.
    pub ready: Result<(), String>,
    /// It is ready and leads (writes are served here without forwarding).
    pub leader: Result<(), String>,
}

/// A committed transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The log index of its entry (for read-your-writes).
    pub log_index: u64,
    /// Whether it was committed; `false`: it had failed, and `COMMIT` rolled it back (as
    /// PostgreSQL answers `ROLLBACK` to a `COMMIT` of a failed transaction).
    pub committed: bool,
}

/// What a savepoint command does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavepointOp {
    /// `SAVEPOINT name`.
    Define,
    /// `RELEASE SAVEPOINT name`.
    Release,
    /// `ROLLBACK TO SAVEPOINT name`.
    RollbackTo,
}

/// One call on a transaction named by id.
#[derive(Clone, Debug)]
pub enum TxnCall {
    /// Run a statement.
    Execute(WriteStatement),
    /// What PostgreSQL infers for a statement inside the transaction (`Describe`).
    Describe {
        /// The statement.
        sql: String,
        /// The client's parameter types (0: inferred).
        param_types: Vec<u32>,
    },
    /// A savepoint command.
    Savepoint(SavepointOp, String),
    /// `COMMIT`.
    Commit,
    /// `ROLLBACK`.
    Rollback,
}

/// The answer to a [`TxnCall`].
#[derive(Clone, Debug, PartialEq)]
pub enum TxnAnswer {
    /// A statement's result.
    Rows(StatementOutcome),
    /// A statement's description.
    Described(Description),
    /// A savepoint command or `ROLLBACK` was done.
    Done,
    /// `COMMIT`'s outcome.
    Committed(Committed),
}

/// A transaction that began: its id and request id, and the node running it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begun {
    /// Names it in later calls, on any node.
    pub txn_id: String,
    /// Its request id.
    pub request_id: RequestId,
    /// The node running it.
    pub node: NodeId,
}
