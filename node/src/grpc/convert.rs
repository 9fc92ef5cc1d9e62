//! Protocol messages to and from the service layer's types, both ways (requests are decoded
//! here when they arrive and encoded here when this node forwards them; answers likewise).

use raftpg_proto::v1 as pb;

use crate::command::{ColumnInfo, RequestId, SqlValue, StatementOutcome, TableChecksum};
use crate::pg::values;
use crate::service::{
    Begun, CheckReport, Consistency, ErrorKind, MemberInfo, MembershipOutcome, NodeChecksums,
    NodeStatus, Origin, PgIdentity, ReadChunk, ReadRequest, ServiceError, WriteOutcome,
    WriteRequest, WriteStatement,
};

/// Converts wire parameters, refusing a bad one (`where_` names the statement in the
/// message, e.g. "statement 2, ").
pub fn params(params: &[pb::Value], where_: &str) -> Result<Vec<SqlValue>, ServiceError> {
    params
        .iter()
        .enumerate()
        .map(|(p, v)| {
            values::from_proto(v).map_err(|e| {
                ServiceError::refused(
                    ErrorKind::InvalidArgument,
                    "22023",
                    format!("{where_}parameter ${}: {e}", p + 1),
                )
            })
        })
        .collect()
}

/// A write request as the service takes it (a parameter that does not decode is reported by
/// the service in its turn, see [`crate::service::WriteStatement`]).
pub fn write_request(
    req: pb::ExecuteRequest,
    encoded_bytes: usize,
    origin: Origin,
) -> WriteRequest {
    let statements = req
        .statements
        .into_iter()
        .enumerate()
        .map(|(i, s)| WriteStatement {
            params: params(&s.params, &format!("statement {i}, ")),
            sql: s.sql,
        })
        .collect();
    WriteRequest {
        statements,
        request_id: req.request_id.map(|r| RequestId {
            client_id: r.client_id,
            seq: r.seq,
        }),
        encoded_bytes,
        origin,
        principal: None,
    }
}

/// A write request as a forwarding node sends it.
pub fn execute_request(req: &WriteRequest) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        statements: req
            .statements
            .iter()
            .map(|s| pb::Statement {
                sql: s.sql.clone(),
                // Only a write whose parameters all decoded is forwarded (the service checks
                // them first).
                params: s.params.iter().flatten().map(values::to_proto).collect(),
            })
            .collect(),
        request_id: req.request_id.as_ref().map(|r| pb::RequestId {
            client_id: r.client_id.clone(),
            seq: r.seq,
        }),
    }
}

/// Result columns as the API sends them.
pub fn columns(columns: Vec<ColumnInfo>) -> Vec<pb::Column> {
    columns
        .into_iter()
        .map(|c| pb::Column {
            name: c.name,
            type_name: c.type_name,
            type_oid: c.type_oid,
        })
        .collect()
}

/// Result columns as the API received them.
pub fn column_infos(columns: Vec<pb::Column>) -> Vec<ColumnInfo> {
    columns
        .into_iter()
        .map(|c| ColumnInfo {
            name: c.name,
            type_name: c.type_name,
            type_oid: c.type_oid,
        })
        .collect()
}

fn rows(rows: &[Vec<SqlValue>]) -> Vec<pb::Row> {
    rows.iter()
        .map(|row| pb::Row {
            values: row.iter().map(values::to_proto).collect(),
        })
        .collect()
}

/// One statement's result.
pub fn statement_result(r: StatementOutcome) -> pb::StatementResult {
    pb::StatementResult {
        rows_affected: r.rows_affected,
        rows: rows(&r.rows),
        columns: columns(r.columns),
    }
}

/// One statement's result as a peer answered it.
pub fn statement_outcome(r: pb::StatementResult) -> Result<StatementOutcome, ServiceError> {
    Ok(StatementOutcome {
        rows_affected: r.rows_affected,
        columns: column_infos(r.columns),
        rows: r
            .rows
            .into_iter()
            .map(|row| {
                row.values
                    .iter()
                    .map(values::result_from_proto)
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<_, _>>()
            .map_err(|e| ServiceError::internal(format!("a peer's result: {e}")))?,
    })
}

/// A statement of a transaction as the service takes it.
pub fn txn_statement(s: pb::Statement) -> WriteStatement {
    WriteStatement {
        params: params(&s.params, ""),
        sql: s.sql,
    }
}

/// A statement of a transaction as a relaying node sends it.
pub fn txn_statement_request(txn_id: &str, s: &WriteStatement) -> pb::TxnStatementRequest {
    pb::TxnStatementRequest {
        txn_id: txn_id.to_string(),
        statement: Some(pb::Statement {
            sql: s.sql.clone(),
            params: s.params.iter().flatten().map(values::to_proto).collect(),
        }),
    }
}

/// A begun transaction as the client gets it.
pub fn begin_response(b: Begun) -> pb::BeginResponse {
    pb::BeginResponse {
        txn_id: b.txn_id,
        request_id: Some(pb::RequestId {
            client_id: b.request_id.client_id,
            seq: b.request_id.seq,
        }),
        leader_id: b.node,
    }
}

/// A begun transaction as the leader answered it.
pub fn begun(r: pb::BeginResponse) -> Begun {
    let id = r.request_id.unwrap_or_default();
    Begun {
        txn_id: r.txn_id,
        request_id: RequestId {
            client_id: id.client_id,
            seq: id.seq,
        },
        node: r.leader_id,
    }
}

/// A write's result as the client gets it.
pub fn execute_response(o: WriteOutcome) -> pb::ExecuteResponse {
    pb::ExecuteResponse {
        log_index: o.log_index,
        term: o.term,
        leader_id: o.leader_id,
        results: o
            .results
            .into_iter()
            .map(|r| pb::StatementResult {
                rows_affected: r.rows_affected,
                rows: rows(&r.rows),
                columns: columns(r.columns),
            })
            .collect(),
    }
}

/// A write's result as the leader answered it to a forwarding node.
pub fn write_outcome(r: pb::ExecuteResponse) -> Result<WriteOutcome, ServiceError> {
    let results = r
        .results
        .into_iter()
        .map(|s| {
            let rows = s
                .rows
                .iter()
                .map(|row| row.values.iter().map(values::result_from_proto).collect())
                .collect::<Result<_, _>>()
                .map_err(|e| ServiceError::internal(format!("the leader's answer: {e}")))?;
            Ok(StatementOutcome {
                rows_affected: s.rows_affected,
                columns: column_infos(s.columns),
                rows,
            })
        })
        .collect::<Result<_, ServiceError>>()?;
    Ok(WriteOutcome {
        log_index: r.log_index,
        term: r.term,
        leader_id: r.leader_id,
        results,
    })
}

/// A read request as the service takes it (what does not decode is reported by the service
/// in its turn).
pub fn read_request(req: pb::QueryRequest, encoded_bytes: usize, streamed: bool) -> ReadRequest {
    let consistency = match pb::Consistency::try_from(req.consistency) {
        Ok(pb::Consistency::Local) => Ok(Consistency::Local),
        Ok(pb::Consistency::AtLeast) => Ok(Consistency::AtLeast(req.min_index)),
        Ok(pb::Consistency::Linearizable) => Ok(Consistency::Linearizable),
        Err(_) => Err(ServiceError::invalid(format!(
            "unknown consistency level {}",
            req.consistency
        ))),
    };
    ReadRequest {
        params: params(&req.params, ""),
        param_types: Vec::new(),
        result_formats: Vec::new(),
        settings: Vec::new(),
        sql: req.sql,
        consistency,
        timeout_ms: req.timeout_ms,
        max_rows: req.max_rows,
        streamed,
        encoded_bytes,
        principal: None,
        allow_diverged: req.allow_diverged,
    }
}

/// A chunk of a read's result.
pub fn query_chunk(c: ReadChunk) -> pb::QueryChunk {
    pb::QueryChunk {
        rows: rows(&c.rows),
        columns: columns(c.columns),
        applied_index: c.applied_index,
        node_id: c.node_id,
    }
}

/// A read's whole result.
pub fn query_response(c: ReadChunk) -> pb::QueryResponse {
    pb::QueryResponse {
        rows: rows(&c.rows),
        columns: columns(c.columns),
        applied_index: c.applied_index,
        node_id: c.node_id,
    }
}

fn member(m: MemberInfo) -> pb::Member {
    pb::Member {
        node_id: m.node_id,
        addr: m.addr,
        voter: m.voter,
        matched_index: m.matched_index.unwrap_or(0),
        has_matched: m.matched_index.is_some(),
        peer_addr: m.peer_addr,
    }
}

fn member_info(m: pb::Member) -> MemberInfo {
    MemberInfo {
        node_id: m.node_id,
        addr: m.addr,
        peer_addr: m.peer_addr,
        voter: m.voter,
        matched_index: m.has_matched.then_some(m.matched_index),
    }
}

/// A membership change's answer.
pub fn membership_response(o: MembershipOutcome) -> pb::MembershipResponse {
    pb::MembershipResponse {
        log_index: o.log_index,
        members: o.members.into_iter().map(member).collect(),
        message: o.message,
    }
}

/// A membership change's answer from the leader.
pub fn membership_outcome(r: pb::MembershipResponse) -> MembershipOutcome {
    MembershipOutcome {
        log_index: r.log_index,
        members: r.members.into_iter().map(member_info).collect(),
        message: r.message,
    }
}

/// A table checksum on the wire.
pub fn table_checksum(t: TableChecksum) -> pb::TableChecksum {
    pb::TableChecksum {
        name: t.name,
        rows: t.rows,
        hash: t.hash,
    }
}

/// A table checksum from the wire.
pub fn table_checksum_from(t: pb::TableChecksum) -> TableChecksum {
    TableChecksum {
        name: t.name,
        rows: t.rows,
        hash: t.hash,
    }
}

/// A check's report on the wire.
pub fn check_response(r: CheckReport) -> pb::CheckResponse {
    pb::CheckResponse {
        log_index: r.log_index,
        identical: r.identical,
        differences: r.differences,
        missing_nodes: r.missing_nodes,
        diverged_nodes: r.diverged_nodes,
        unsafe_definitions: r.unsafe_definitions,
        nodes: r
            .nodes
            .into_iter()
            .map(|n| {
                let (ok, error, tables) = match n.tables {
                    Ok(t) => (
                        true,
                        String::new(),
                        t.into_iter().map(table_checksum).collect(),
                    ),
                    Err(e) => (false, e, Vec::new()),
                };
                pb::NodeChecksums {
                    node_id: n.node_id,
                    addr: n.addr,
                    ok,
                    error,
                    tables,
                }
            })
            .collect(),
    }
}

/// A check's report from the leader.
pub fn check_report(r: pb::CheckResponse) -> CheckReport {
    CheckReport {
        log_index: r.log_index,
        identical: r.identical,
        differences: r.differences,
        missing_nodes: r.missing_nodes,
        diverged_nodes: r.diverged_nodes,
        unsafe_definitions: r.unsafe_definitions,
        nodes: r
            .nodes
            .into_iter()
            .map(|n| NodeChecksums {
                node_id: n.node_id,
                addr: n.addr,
                tables: match n.ok {
                    true => Ok(n.tables.into_iter().map(table_checksum_from).collect()),
                    false => Err(n.error),
                },
            })
            .collect(),
    }
}

/// A node's status on the wire.
pub fn status_response(s: NodeStatus) -> pb::StatusResponse {
    pb::StatusResponse {
        node_id: s.node_id,
        role: s.role,
        term: s.term,
        leader_id: s.leader_id.unwrap_or(0),
        has_leader: s.leader_id.is_some(),
        leader_addr: s.leader_addr,
        last_log_index: s.last_log_index,
        committed_index: s.committed_index,
        applied_index: s.applied_index,
        members: s.members.into_iter().map(member).collect(),
        postgres_up: s.postgres_up,
        applier_state: s.applier_state,
        postgres_version: s.identity.version,
        encoding: s.identity.encoding,
        collation: s.identity.collation,
        removed: s.removed,
        purged_index: s.purged_index,
        snapshot_index: s.snapshot_index,
        insecure: s.insecure,
        client_addr: s.client_addr,
        peer_addr: s.peer_addr,
        diverged: s.diverged,
        snapshot_progress: s.snapshot_progress,
    }
}

/// A node's status from the wire.
pub fn node_status(s: pb::StatusResponse) -> NodeStatus {
    NodeStatus {
        node_id: s.node_id,
        role: s.role,
        term: s.term,
        leader_id: s.has_leader.then_some(s.leader_id),
        leader_addr: s.leader_addr,
        last_log_index: s.last_log_index,
        committed_index: s.committed_index,
        applied_index: s.applied_index,
        members: s.members.into_iter().map(member_info).collect(),
        postgres_up: s.postgres_up,
        applier_state: s.applier_state,
        identity: PgIdentity {
            version: s.postgres_version,
            encoding: s.encoding,
            collation: s.collation,
        },
        removed: s.removed,
        purged_index: s.purged_index,
        snapshot_index: s.snapshot_index,
        insecure: s.insecure,
        client_addr: s.client_addr,
        peer_addr: s.peer_addr,
        diverged: s.diverged,
        snapshot_progress: s.snapshot_progress,
    }
}
