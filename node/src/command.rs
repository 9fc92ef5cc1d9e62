//! What a Raft log entry carries and what applying it returns.
//!
//! Owns the on-log format of a write ([`WriteCommand`]) and of its outcome ([`ApplyOutcome`]).
//! Everything here is serialized into the Raft log (RocksDB) and between nodes, so it must be
//! deterministic data only: the leader fixes every non-deterministic input (timestamp, seed)
//! before the entry enters the log (design.md invariant 2).

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// openraft type configuration of raftpg.
    pub TypeConfig:
        D = Command,
        R = ApplyOutcome,
        NodeId = u64,
        Node = NodeAddr,
);

/// Node id type.
pub type NodeId = u64;
/// Log id type.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// Vote type.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// The leader part of a committed log id (term and node).
pub type CommittedLeaderId = openraft::type_config::alias::CommittedLeaderIdOf<TypeConfig>;
/// Raft log entry type.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// Stored membership type.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;

/// How a member is reached: what the membership stores for each node.
///
/// `peer` is the address of the node's peer port (Raft, snapshots, forwarded requests; only
/// for other nodes) and is what Raft replicates to. `client` is the address of its client
/// port (what leader hints send clients to); empty until the node published it (a node
/// publishes its `--advertise` address once it is a member, see `service::publish`).
/// Membership written before the peer port existed (`{"addr": …}`) reads as `peer`, with the
/// client address unknown until published.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddr {
    /// The peer port's address, `host:port`.
    #[serde(alias = "addr")]
    pub peer: String,
    /// The client port's address, `host:port`, or empty while unknown.
    #[serde(default)]
    pub client: String,
}

impl NodeAddr {
    /// A node reached at `peer`, its client address not known yet.
    pub fn peer_only(peer: impl Into<String>) -> Self {
        NodeAddr {
            peer: peer.into(),
            client: String::new(),
        }
    }
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer {} client {}", self.peer, self.client)
    }
}

/// One typed SQL value, as bound into a statement or read from a result.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum SqlValue {
    /// SQL NULL.
    Null,
    /// boolean.
    Bool(bool),
    /// int2/int4/int8/oid.
    Int64(i64),
    /// float4/float8 (NaN and ±Infinity included: see [`float8`]).
    Float64(#[serde(with = "float8")] f64),
    /// numeric, as decimal text.
    Numeric(String),
    /// text/varchar/char/name.
    Text(String),
    /// bytea.
    Bytes(Vec<u8>),
    /// timestamptz, microseconds since the Unix epoch.
    TimestamptzMicros(i64),
    /// timestamp without time zone, microseconds since 1970-01-01 00:00.
    TimestampMicros(i64),
    /// date, days since 1970-01-01.
    DateDays(i32),
    /// uuid.
    Uuid(uuid::Uuid),
    /// json, as text.
    Json(String),
    /// jsonb, as text.
    Jsonb(String),
    /// Any type in PostgreSQL's text form: as a parameter, parsed by PostgreSQL as the type
    /// the statement needs (the same on every node); as a result, a column of a type without a
    /// kind of its own above, as the applier's or read connection's fixed settings print it.
    PgText {
        /// The type's OID (0: not given; built-in types have the same OID on every node).
        type_oid: u32,
        /// The text.
        text: String,
    },
    /// A value in PostgreSQL's binary form: as a parameter, of a built-in type (its binary
    /// form is the same on every node) bound to a parameter of exactly that type; as a read's
    /// result, any type (it stays on the node that read it).
    PgBinary {
        /// The type's OID.
        type_oid: u32,
        /// The bytes.
        bytes: Vec<u8>,
    },
}

/// How a float8 travels in the log's JSON (entries, recorded outcomes): a finite value as a
/// JSON number (exactly, with serde_json's `float_roundtrip`), `NaN`, `Infinity` and
/// `-Infinity` — valid float8 values that JSON numbers cannot carry — as those strings, the
/// way PostgreSQL writes them. (serde_json alone writes them as `null`, which does not decode:
/// one such parameter would make its entry unreadable on every node.)
pub mod float8 {
    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    /// Writes `v` (a number, or one of the three strings).
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        match *v {
            v if v.is_finite() => s.serialize_f64(v),
            v if v.is_nan() => s.serialize_str("NaN"),
            v if v > 0.0 => s.serialize_str("Infinity"),
            _ => s.serialize_str("-Infinity"),
        }
    }

    /// Reads a number, or one of the three strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(Float8)
    }

    struct Float8;

    impl Visitor<'_> for Float8 {
        type Value = f64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            match v {
                "NaN" => Ok(f64::NAN),
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
            }
        }
    }
}

/// One SQL statement with its bound parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SqlStatement {
    /// The SQL text (exactly one statement).
    pub sql: String,
    /// Parameters `$1..$n`, bound (never interpolated).
    pub params: Vec<SqlValue>,
}

/// Identifies a client request for exactly-once retries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId {
    /// Chosen by the client, stable across its retries.
    pub client_id: String,
    /// Increases per request of that client.
    pub seq: u64,
}

/// The application data of one Raft log entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Command {
    /// SQL statements applied as one atomic unit.
    Sql(WriteCommand),
    /// Several writes proposed together (see `raft::proposer`): applied in order, each atomic on its
    /// own, each with its own outcome ([`ApplyOutcome::Batch`]).
    Batch(Vec<WriteCommand>),
    /// Compute per-table checksums of the user database at exactly this log position on every
    /// node (for `raftpg check`).
    Checksum,
    /// An interactive transaction the leader executed on its applier session (see
    /// `docs/transactions.md`): applied only right after the entry it was executed after.
    Transaction(TxnCommand),
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Sql(w) => write!(f, "{w}"),
            Command::Batch(b) => write!(f, "batch({} writes)", b.len()),
            Command::Checksum => write!(f, "checksum"),
            Command::Transaction(t) => write!(f, "transaction({} steps)", t.steps.len()),
        }
    }
}

/// Statements applied as one atomic unit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WriteCommand {
    /// Executed in order inside one savepoint: all or nothing.
    pub statements: Vec<SqlStatement>,
    /// The leader's clock when it proposed the entry, monotonic along the log
    /// (microseconds since the Unix epoch).
    pub leader_ts_micros: i64,
    /// Seed for deterministic randomness of this entry.
    pub seed: u64,
    /// Optional request id for exactly-once retries.
    pub request_id: Option<RequestId>,
    /// The role the write runs as (`SET LOCAL SESSION AUTHORIZATION`, see `apply::applier`);
    /// `None`: raftpg itself (anonymous writes on a node that allows them, entries written
    /// before roles existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl std::fmt::Display for WriteCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "write({} statements)", self.statements.len())
    }
}

/// An interactive transaction as the leader ran it: every step the client sent, in order, with
/// the deterministic inputs it ran with (docs/transactions.md).
///
/// The leader executed it alone on its applier session when PostgreSQL held exactly the log up
/// to [`TxnCommand::executed_after`]; by Raft's log matching property, an entry whose
/// predecessor in the log has that log id sees exactly that state on every node, so every node
/// computes the same effects and results the client saw. An entry that lands anywhere else
/// (another entry slipped in before it) is refused the same way on every node: its outcome is
/// a serialization failure (40001) and none of its steps run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TxnCommand {
    /// The steps, in the order the client sent them (failed statements included: they may
    /// have consumed sequence values, which replay must consume too).
    pub steps: Vec<TxnStep>,
    /// The transaction's timestamp (`now()` for all its statements), taken at `BEGIN`.
    pub leader_ts_micros: i64,
    /// Seed of its random draws (which continue across its statements).
    pub seed: u64,
    /// Its request id: the outcome is recorded under it (a client that lost the answer to
    /// `COMMIT` learns it from there).
    pub request_id: RequestId,
    /// The role it runs as (`None`: raftpg itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The log id of the last entry applied when the leader executed it (`None`: an empty
    /// log).
    pub executed_after: Option<LogId>,
}

/// One step of an interactive transaction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum TxnStep {
    /// A statement (checked and rewritten by the SQL gate), run inside a savepoint of its own;
    /// `failed`: it failed on the leader with a deterministic error (rolled back to that
    /// savepoint; the transaction then went on after a `ROLLBACK TO`).
    Statement {
        /// The statement.
        stmt: SqlStatement,
        /// It failed on the leader.
        failed: bool,
    },
    /// `SAVEPOINT name`.
    Savepoint(String),
    /// `RELEASE SAVEPOINT name`.
    Release(String),
    /// `ROLLBACK TO SAVEPOINT name`.
    RollbackTo(String),
}

/// A result column: name and PostgreSQL type name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// PostgreSQL type name.
    pub type_name: String,
    /// PostgreSQL type OID on the node that ran the statement (0 in outcomes recorded before
    /// raftpg knew it). Built-in types have the same OID on every node.
    #[serde(default)]
    pub type_oid: u32,
}

/// The result of one statement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct StatementOutcome {
    /// Rows inserted/updated/deleted (or returned, for SELECT).
    pub rows_affected: u64,
    /// Result columns (empty for statements without RETURNING).
    pub columns: Vec<ColumnInfo>,
    /// Result rows.
    pub rows: Vec<Vec<SqlValue>>,
}

/// A deterministic SQL error: every node raises it the same way (design.md invariant 3).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SqlFailure {
    /// SQLSTATE, e.g. `23505`.
    pub sqlstate: String,
    /// PostgreSQL's message.
    pub message: String,
    /// PostgreSQL's detail, if any.
    pub detail: String,
    /// PostgreSQL's hint, if any.
    pub hint: String,
    /// Index of the failing statement in the entry.
    pub statement_index: u32,
}

/// What applying one log entry produced. Identical on every node for the same entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum ApplyOutcome {
    /// A membership or blank entry: nothing for a client.
    Internal,
    /// All statements succeeded and were committed.
    Applied(Vec<StatementOutcome>),
    /// A statement failed deterministically; the entry's effects were rolled back.
    Failed(SqlFailure),
    /// The node's checksums of the user database at this entry.
    Checksums(Vec<TableChecksum>),
    /// The entry was applied before this process could record its result (PostgreSQL
    /// committed, then the connection was lost); the effects are in, the rows are not known.
    AppliedResultLost,
    /// The outcomes of a [`Command::Batch`] entry, one per write, in order.
    Batch(Vec<ApplyOutcome>),
}

/// Checksum of one table (or sequence) of the user database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableChecksum {
    /// `schema.table`, or `schema.sequence` for sequences.
    pub name: String,
    /// Row count (0 for sequences).
    pub rows: i64,
    /// Order-independent hash of the rows (for sequences: `last_value/is_called`).
    pub hash: String,
}

#[cfg(test)]
mod tests {
    use super::SqlValue;

    #[test]
    fn every_float8_survives_the_log() {
        for f in [
            0.0,
            -0.0,
            1.5,
            f64::MIN_POSITIVE,
            f64::MAX,
            0.1 + 0.2,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let json = serde_json::to_vec(&SqlValue::Float64(f)).expect("encodes");
            let back: SqlValue = serde_json::from_slice(&json).expect("decodes");
            let SqlValue::Float64(g) = back else {
                panic!("{back:?}")
            };
            assert!(
                g.to_bits() == f.to_bits() || (g.is_nan() && f.is_nan()),
                "{f}: {g}"
            );
        }
        // Finite values are written as before (numbers), so existing logs read the same.
        assert_eq!(
            serde_json::to_string(&SqlValue::Float64(1.5)).unwrap(),
            r#"{"Float64":1.5}"#
        );
        assert_eq!(
            serde_json::to_string(&SqlValue::Float64(f64::NAN)).unwrap(),
            r#"{"Float64":"NaN"}"#
        );
    }
}
