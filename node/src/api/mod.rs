//! The gRPC edge: the public `Write`, `Read` and `Cluster` services and the internal `Raft`
//! service. Typed errors of the layers below become precise gRPC statuses here, and only here:
//! SQL errors carry their SQLSTATE (metadata `raftpg-sqlstate` and a `SqlError` in the status
//! details); a node that cannot serve says who leads (`raftpg-leader-id`/`-addr`).

pub mod check;
pub mod cluster;
pub mod membership;
pub mod raft;
pub mod read;
pub mod write;

use prost::Message;
use raftpg_proto::v1::SqlError;
use raftpg_proto::{
    LEADER_ADDR_METADATA, LEADER_ID_METADATA, LOG_INDEX_METADATA, SQLSTATE_METADATA,
};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::command::{NodeId, SqlFailure};

/// The gRPC code for a SQLSTATE.
pub fn code_for_sqlstate(sqlstate: &str) -> Code {
    match sqlstate {
        "23505" => Code::AlreadyExists,
        "0A000" => Code::Unimplemented,
        "42501" => Code::PermissionDenied,
        "25006" => Code::InvalidArgument,
        "57014" => Code::Cancelled,
        "08P01" => Code::InvalidArgument,
        s if s.starts_with("23") || s.starts_with("P0") || s.starts_with("2B") => {
            Code::FailedPrecondition
        }
        s if s.starts_with("54") || s.starts_with("53") => Code::ResourceExhausted,
        s if s.starts_with("08") || s.starts_with("57") => Code::Unavailable,
        s if s.starts_with("22") || s.starts_with("42") || s.starts_with("08P01") => {
            Code::InvalidArgument
        }
        s if s.starts_with("XX") || s.starts_with("58") => Code::Internal,
        _ => Code::FailedPrecondition,
    }
}

/// A status for a SQL error, with the SQLSTATE in metadata and a `SqlError` in the details.
pub fn sql_status(f: &SqlFailure, log_index: u64) -> Status {
    let body = SqlError {
        sqlstate: f.sqlstate.clone(),
        message: f.message.clone(),
        detail: f.detail.clone(),
        hint: f.hint.clone(),
        statement_index: f.statement_index,
        log_index,
    };
    let mut message = format!("SQLSTATE {}: {}", f.sqlstate, f.message);
    if !f.detail.is_empty() {
        message.push_str(&format!(" (detail: {})", f.detail));
    }
    if !f.hint.is_empty() {
        message.push_str(&format!(" (hint: {})", f.hint));
    }
    let mut status = Status::with_details(
        code_for_sqlstate(&f.sqlstate),
        message,
        body.encode_to_vec().into(),
    );
    if let Ok(v) = MetadataValue::try_from(f.sqlstate.as_str()) {
        status.metadata_mut().insert(SQLSTATE_METADATA, v);
    }
    if log_index > 0 {
        status
            .metadata_mut()
            .insert(LOG_INDEX_METADATA, MetadataValue::from(log_index));
    }
    status
}

/// A refusal before anything entered the log.
pub fn refused(code: Code, sqlstate: &str, message: impl Into<String>) -> Status {
    let f = SqlFailure {
        sqlstate: sqlstate.to_string(),
        message: message.into(),
        detail: String::new(),
        hint: String::new(),
        statement_index: 0,
    };
    let mut s = sql_status(&f, 0);
    s = Status::with_details_and_metadata(
        code,
        s.message().to_string(),
        s.details().to_vec().into(),
        s.metadata().clone(),
    );
    s
}

/// Converts wire parameters, refusing a bad one with INVALID_ARGUMENT (`where_` names the
/// statement in the message, e.g. "statement 2, ").
pub fn params_from_proto(
    params: &[raftpg_proto::v1::Value],
    where_: &str,
) -> Result<Vec<crate::command::SqlValue>, Status> {
    params
        .iter()
        .enumerate()
        .map(|(p, v)| {
            crate::values::from_proto(v).map_err(|e| {
                refused(
                    Code::InvalidArgument,
                    "22023",
                    format!("{where_}parameter ${}: {}", p + 1, e.0),
                )
            })
        })
        .collect()
}

/// UNAVAILABLE with a hint naming the leader, when known.
pub fn not_leader(message: impl Into<String>, leader: Option<(NodeId, String)>) -> Status {
    let mut status = Status::unavailable(message);
    if let Some((id, addr)) = leader {
        status
            .metadata_mut()
            .insert(LEADER_ID_METADATA, MetadataValue::from(id));
        if let Ok(v) = MetadataValue::try_from(addr.as_str()) {
            status.metadata_mut().insert(LEADER_ADDR_METADATA, v);
        }
    }
    status
}
