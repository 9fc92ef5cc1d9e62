//! The error of every service operation, with no protocol in it.
//!
//! A [`ServiceError`] says what kind of failure it is ([`ErrorKind`]: whether retrying can help,
//! and where), carries PostgreSQL's fields when there is a SQLSTATE (SQL errors of a write or a
//! read, and refusals that name one), the log index of the write it is the outcome of, and the
//! leader when this node cannot serve but knows who can. Frontends turn it into their own
//! errors in one place each (`grpc::status`, and the wire protocol's error response); nothing
//! compares its message.

use std::fmt;

use crate::command::{NodeId, SqlFailure};

/// What kind of failure an error is: decides how a frontend reports it and whether retrying
/// can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or not allowed (bad SQL for the gate, a bad parameter, a SQL
    /// error of class 22 or 42). The same request will fail again.
    InvalidArgument,
    /// A limit was reached (request size, rows, writes in flight, PostgreSQL resources).
    /// Retry later or with a smaller request.
    ResourceExhausted,
    /// raftpg or PostgreSQL does not support this (a result type, a feature).
    Unsupported,
    /// The data or the cluster is not in a state that allows it (a constraint, a raised
    /// exception, a membership rule).
    FailedPrecondition,
    /// What the request names does not exist (a node, checksums at an index).
    NotFound,
    /// What the request creates exists already (a unique violation, a member).
    AlreadyExists,
    /// The role may not do this.
    PermissionDenied,
    /// Who sent the request is not known: no credentials where they are required, an unknown
    /// role, one that may not log in, a wrong password.
    Unauthenticated,
    /// The statement was cancelled.
    Cancelled,
    /// This node cannot serve it now (no leader known, not the leader, PostgreSQL down,
    /// shutting down) and nothing was done. Retry, on [`ServiceError::leader`] when known.
    Unavailable,
    /// Not done within its time bound. For a write, its outcome is unknown.
    DeadlineExceeded,
    /// A write was applied but its result was lost ([`ServiceError::log_index`] says where).
    OutcomeUnknown,
    /// Something else happened first (another node took over); retry.
    Aborted,
    /// A broken invariant or an unexpected answer: a bug.
    Internal,
}

impl ErrorKind {
    /// The kind of a PostgreSQL error with this SQLSTATE.
    pub fn for_sqlstate(sqlstate: &str) -> ErrorKind {
        match sqlstate {
            "23505" => ErrorKind::AlreadyExists,
            "0A000" => ErrorKind::Unsupported,
            "42501" => ErrorKind::PermissionDenied,
            "28000" | "28P01" => ErrorKind::Unauthenticated,
            "25006" | "08P01" => ErrorKind::InvalidArgument,
            "57014" => ErrorKind::Cancelled,
            s if s.starts_with("23") || s.starts_with("P0") || s.starts_with("2B") => {
                ErrorKind::FailedPrecondition
            }
            s if s.starts_with("54") || s.starts_with("53") => ErrorKind::ResourceExhausted,
            s if s.starts_with("08") || s.starts_with("57") => ErrorKind::Unavailable,
            s if s.starts_with("22") || s.starts_with("42") => ErrorKind::InvalidArgument,
            s if s.starts_with("XX") || s.starts_with("58") => ErrorKind::Internal,
            _ => ErrorKind::FailedPrecondition,
        }
    }

    /// The SQLSTATE a frontend that needs one reports for an error of this kind without its
    /// own.
    pub fn default_sqlstate(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "22023",
            ErrorKind::ResourceExhausted => "53000",
            ErrorKind::Unsupported => "0A000",
            ErrorKind::FailedPrecondition => "55000",
            ErrorKind::NotFound => "42704",
            ErrorKind::AlreadyExists => "42710",
            ErrorKind::PermissionDenied => "42501",
            ErrorKind::Unauthenticated => "28000",
            ErrorKind::Cancelled => "57014",
            ErrorKind::Unavailable => "57P03",
            ErrorKind::DeadlineExceeded => "57014",
            ErrorKind::OutcomeUnknown => "40003",
            ErrorKind::Aborted => "40001",
            ErrorKind::Internal => "XX000",
        }
    }
}

/// Where the leader is, for a client (or a node) to retry on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderHint {
    /// The leader's node id.
    pub id: NodeId,
    /// The leader's client address (what clients are sent to; empty while unknown).
    pub addr: String,
    /// The leader's peer address (where other nodes forward to; empty when the hint came
    /// from another node's answer).
    pub peer_addr: String,
}

/// A failed service operation. See the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The SQLSTATE, when PostgreSQL reported the error or the refusal names one.
    pub sqlstate: Option<String>,
    /// What went wrong, for a person.
    pub message: String,
    /// PostgreSQL's detail (empty when none).
    pub detail: String,
    /// PostgreSQL's (or raftpg's) hint (empty when none).
    pub hint: String,
    /// Which statement of a write failed (0-based; 0 when not about a statement).
    pub statement_index: u32,
    /// Where in the statement's text PostgreSQL found the error (1-based, in characters; 0:
    /// not known, or beyond 65,535 — kept small so that errors stay small). Set for reads,
    /// which run here as sent.
    pub position: u16,
    /// The log index of the write this error is the outcome of (0: it never reached the log,
    /// or the index is unknown).
    pub log_index: u64,
    /// The leader, when this node cannot serve but knows who can (boxed: errors travel in
    /// `Result`s and are kept small).
    pub leader: Option<Box<LeaderHint>>,
}

impl ServiceError {
    /// An error of `kind` with only a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ServiceError {
            kind,
            sqlstate: None,
            message: message.into(),
            detail: String::new(),
            hint: String::new(),
            statement_index: 0,
            position: 0,
            log_index: 0,
            leader: None,
        }
    }

    /// A refusal before anything entered the log, naming a SQLSTATE.
    pub fn refused(kind: ErrorKind, sqlstate: &str, message: impl Into<String>) -> Self {
        ServiceError {
            sqlstate: Some(sqlstate.to_string()),
            ..ServiceError::new(kind, message)
        }
    }

    /// PostgreSQL's error `f`, the outcome of the write at `log_index` (0 for a read).
    pub fn sql(f: &SqlFailure, log_index: u64) -> Self {
        ServiceError {
            kind: ErrorKind::for_sqlstate(&f.sqlstate),
            sqlstate: Some(f.sqlstate.clone()),
            message: f.message.clone(),
            detail: f.detail.clone(),
            hint: f.hint.clone(),
            statement_index: f.statement_index,
            position: 0,
            log_index,
            leader: None,
        }
    }

    /// This node cannot serve; `leader` says who can, when known.
    pub fn unavailable(message: impl Into<String>, leader: Option<LeaderHint>) -> Self {
        ServiceError {
            leader: leader.map(Box::new),
            ..ServiceError::new(ErrorKind::Unavailable, message)
        }
    }

    /// An [`ErrorKind::InvalidArgument`] error with only a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        ServiceError::new(ErrorKind::InvalidArgument, message)
    }

    /// An [`ErrorKind::FailedPrecondition`] error with only a message.
    pub fn precondition(message: impl Into<String>) -> Self {
        ServiceError::new(ErrorKind::FailedPrecondition, message)
    }

    /// An [`ErrorKind::DeadlineExceeded`] error with only a message.
    pub fn deadline(message: impl Into<String>) -> Self {
        ServiceError::new(ErrorKind::DeadlineExceeded, message)
    }

    /// An [`ErrorKind::Internal`] error with only a message.
    pub fn internal(message: impl Into<String>) -> Self {
        ServiceError::new(ErrorKind::Internal, message)
    }

    /// The SQLSTATE to report: the error's own, or its kind's default.
    pub fn sqlstate_or_default(&self) -> &str {
        self.sqlstate
            .as_deref()
            .unwrap_or_else(|| self.kind.default_sqlstate())
    }

    /// Whether this node could not serve and a leader is named to retry on.
    pub fn names_leader(&self) -> bool {
        self.kind == ErrorKind::Unavailable && self.leader.is_some()
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sqlstate {
            Some(s) => write!(f, "SQLSTATE {s}: {}", self.message)?,
            None => write!(f, "{}", self.message)?,
        }
        if !self.detail.is_empty() {
            write!(f, " (detail: {})", self.detail)?;
        }
        if !self.hint.is_empty() {
            write!(f, " (hint: {})", self.hint)?;
        }
        Ok(())
    }
}

impl std::error::Error for ServiceError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_errors_are_classified_by_sqlstate() {
        assert_eq!(ErrorKind::for_sqlstate("23505"), ErrorKind::AlreadyExists);
        assert_eq!(
            ErrorKind::for_sqlstate("23503"),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(ErrorKind::for_sqlstate("08P01"), ErrorKind::InvalidArgument);
        assert_eq!(ErrorKind::for_sqlstate("08006"), ErrorKind::Unavailable);
        assert_eq!(ErrorKind::for_sqlstate("42P01"), ErrorKind::InvalidArgument);
        assert_eq!(
            ErrorKind::for_sqlstate("53300"),
            ErrorKind::ResourceExhausted
        );
        assert_eq!(ErrorKind::for_sqlstate("XX000"), ErrorKind::Internal);
        assert_eq!(
            ErrorKind::for_sqlstate("RP001"),
            ErrorKind::FailedPrecondition
        );
    }

    #[test]
    fn the_message_names_sqlstate_detail_and_hint() {
        let mut e = ServiceError::refused(ErrorKind::InvalidArgument, "42601", "bad");
        e.hint = "fix it".into();
        assert_eq!(e.to_string(), "SQLSTATE 42601: bad (hint: fix it)");
        assert_eq!(ServiceError::deadline("late").to_string(), "late");
        assert_eq!(
            ServiceError::deadline("late").sqlstate_or_default(),
            "57014"
        );
    }
}
