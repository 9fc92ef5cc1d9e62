//! The one place a [`ServiceError`] becomes a gRPC status, and a peer's status becomes a
//! [`ServiceError`] again (so a follower relays the leader's answer unchanged).
//!
//! A status carries: the code of the error's kind; for errors with a SQLSTATE, the SQLSTATE in
//! metadata (`raftpg-sqlstate`) and a `SqlError` in the details (message, detail, hint,
//! statement index, log index); the log index of a write in metadata (`raftpg-log-index`); the
//! leader in metadata (`raftpg-leader-id`/`-addr`).

use prost::Message;
use raftpg_proto::v1::SqlError;
use raftpg_proto::{
    LEADER_ADDR_METADATA, LEADER_ID_METADATA, LOG_INDEX_METADATA, SQLSTATE_METADATA,
};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::service::{ErrorKind, LeaderHint, ServiceError};

/// The gRPC code of an error kind.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unsupported => Code::Unimplemented,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::OutcomeUnknown => Code::Unknown,
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The error kind of a gRPC code (the inverse of [`code_of`]; codes raftpg never sends are
/// internal errors).
pub fn kind_of(code: Code) -> ErrorKind {
    match code {
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
        Code::ResourceExhausted => ErrorKind::ResourceExhausted,
        Code::Unimplemented => ErrorKind::Unsupported,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::PermissionDenied => ErrorKind::PermissionDenied,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::Cancelled => ErrorKind::Cancelled,
        Code::Unavailable => ErrorKind::Unavailable,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        Code::Unknown => ErrorKind::OutcomeUnknown,
        Code::Aborted => ErrorKind::Aborted,
        Code::Ok | Code::Internal | Code::DataLoss => ErrorKind::Internal,
    }
}

/// The status of an error.
pub fn to_status(e: ServiceError) -> Status {
    let code = code_of(e.kind);
    let mut status = match &e.sqlstate {
        Some(sqlstate) => {
            let body = SqlError {
                sqlstate: sqlstate.clone(),
                message: e.message.clone(),
                detail: e.detail.clone(),
                hint: e.hint.clone(),
                statement_index: e.statement_index,
                log_index: e.log_index,
            };
            let mut s = Status::with_details(code, e.to_string(), body.encode_to_vec().into());
            if let Ok(v) = MetadataValue::try_from(sqlstate.as_str()) {
                s.metadata_mut().insert(SQLSTATE_METADATA, v);
            }
            s
        }
        None => Status::new(code, e.message),
    };
    if e.log_index > 0 {
        status
            .metadata_mut()
            .insert(LOG_INDEX_METADATA, MetadataValue::from(e.log_index));
    }
    if let Some(leader) = e.leader {
        status
            .metadata_mut()
            .insert(LEADER_ID_METADATA, MetadataValue::from(leader.id));
        // Empty while the leader has not published its client address.
        match MetadataValue::try_from(leader.addr.as_str()) {
            Ok(v) if !leader.addr.is_empty() => {
                status.metadata_mut().insert(LEADER_ADDR_METADATA, v);
            }
            _ => {}
        }
    }
    status
}

/// The error a peer answered with (see the module doc for what a status carries).
pub fn from_status(s: &Status) -> ServiceError {
    let meta = s.metadata();
    let mut e = ServiceError::new(kind_of(s.code()), s.message());
    if let Some(sqlstate) = text(meta, SQLSTATE_METADATA) {
        e.sqlstate = Some(sqlstate);
        if let Ok(body) = SqlError::decode(s.details()) {
            e.message = body.message;
            e.detail = body.detail;
            e.hint = body.hint;
            e.statement_index = body.statement_index;
        }
    }
    e.log_index = text(meta, LOG_INDEX_METADATA)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let leader_id = text(meta, LEADER_ID_METADATA).and_then(|v| v.parse().ok());
    e.leader = leader_id.map(|id| {
        Box::new(LeaderHint {
            id,
            addr: text(meta, LEADER_ADDR_METADATA).unwrap_or_default(),
            peer_addr: String::new(),
        })
    });
    e
}

fn text(meta: &MetadataMap, key: &str) -> Option<String> {
    meta.get(key)?.to_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(e: ServiceError) {
        let back = from_status(&to_status(e.clone()));
        assert_eq!(back, e);
    }

    #[test]
    fn a_relayed_error_is_the_error() {
        let mut sql = ServiceError::refused(ErrorKind::FailedPrecondition, "0A000", "no ext");
        sql.detail = "d".into();
        sql.hint = "h".into();
        sql.statement_index = 2;
        sql.log_index = 17;
        round_trip(sql);
        round_trip(ServiceError::unavailable(
            "not the leader",
            Some(LeaderHint {
                id: 3,
                addr: "127.0.0.1:7003".into(),
                peer_addr: String::new(),
            }),
        ));
        round_trip(ServiceError {
            log_index: 9,
            ..ServiceError::new(ErrorKind::OutcomeUnknown, "lost")
        });
        for kind in [
            ErrorKind::InvalidArgument,
            ErrorKind::ResourceExhausted,
            ErrorKind::Unsupported,
            ErrorKind::FailedPrecondition,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::PermissionDenied,
            ErrorKind::Unauthenticated,
            ErrorKind::Cancelled,
            ErrorKind::Unavailable,
            ErrorKind::DeadlineExceeded,
            ErrorKind::OutcomeUnknown,
            ErrorKind::Aborted,
            ErrorKind::Internal,
        ] {
            round_trip(ServiceError::new(kind, "x"));
            assert_eq!(kind_of(code_of(kind)), kind);
        }
    }

    #[test]
    fn a_sql_error_names_its_sqlstate() {
        let s = to_status(ServiceError::refused(
            ErrorKind::InvalidArgument,
            "42601",
            "bad",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "SQLSTATE 42601: bad");
        assert_eq!(
            s.metadata().get(SQLSTATE_METADATA).map(|v| v.to_str().ok()),
            Some(Some("42601"))
        );
    }
}
