//! The one place where a [`ServiceError`] becomes a PostgreSQL `ErrorResponse`: its
//! SQLSTATE (PostgreSQL's own for SQL errors and refusals; the kind's for the rest), message,
//! detail, hint and position.
//!
//! Kinds without a SQLSTATE of their own get the code a PostgreSQL client expects for them:
//! a node that cannot serve now `57P03` (cannot connect now: try another node), a write whose
//! outcome is unknown `08007` (transaction resolution unknown), a write that another leader
//! took over before it entered the log `40001` (serialization failure: retry it).

use pgwire::messages::response::{ErrorResponse, NoticeResponse};

use crate::service::{ErrorKind, ServiceError};

/// Whether the failed request was a write (an unknown outcome then says so).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A read, a describe, a session command.
    Read,
    /// A write.
    Write,
}

/// The SQLSTATE reported for `e`.
pub fn sqlstate(e: &ServiceError, op: Op) -> &str {
    if let Some(s) = e.sqlstate.as_deref() {
        return s;
    }
    match (e.kind, op) {
        (ErrorKind::DeadlineExceeded | ErrorKind::OutcomeUnknown, Op::Write) => "08007",
        (ErrorKind::OutcomeUnknown, Op::Read) => "08007",
        (kind, _) => kind.default_sqlstate(),
    }
}

/// The fields of an `ErrorResponse` for `e`, of a statement that starts `offset` characters
/// into the query string the client sent (for the error's position).
pub fn response(e: &ServiceError, op: Op, offset: usize) -> ErrorResponse {
    ErrorResponse::new(fields(e, op, offset, "ERROR"))
}

/// A `FATAL` error (the connection ends after it).
pub fn fatal(sqlstate: &str, message: impl Into<String>) -> ErrorResponse {
    ErrorResponse::new(basic("FATAL", sqlstate, message.into()))
}

/// A plain `ERROR` with a SQLSTATE and a message.
pub fn plain(sqlstate: &str, message: impl Into<String>) -> ErrorResponse {
    ErrorResponse::new(basic("ERROR", sqlstate, message.into()))
}

/// A `WARNING` notice.
pub fn warning(sqlstate: &str, message: impl Into<String>) -> NoticeResponse {
    NoticeResponse::new(basic("WARNING", sqlstate, message.into()))
}

/// The fields every error and notice has.
fn basic(severity: &str, sqlstate: &str, message: String) -> Vec<(u8, String)> {
    vec![
        (b'S', severity.into()),
        (b'V', severity.into()),
        (b'C', sqlstate.into()),
        (b'M', message),
    ]
}

fn fields(e: &ServiceError, op: Op, offset: usize, severity: &str) -> Vec<(u8, String)> {
    let mut f = basic(severity, sqlstate(e, op), e.message.clone());
    if !e.detail.is_empty() {
        f.push((b'D', e.detail.clone()));
    }
    if !e.hint.is_empty() {
        f.push((b'H', e.hint.clone()));
    }
    if e.position > 0 {
        f.push((b'P', (e.position as usize + offset).to_string()));
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::SqlFailure;

    #[test]
    fn sql_errors_keep_their_fields() {
        let f = SqlFailure {
            sqlstate: "23505".into(),
            message: "duplicate key".into(),
            detail: "Key (id)=(1) already exists.".into(),
            hint: String::new(),
            statement_index: 0,
        };
        let r = response(&ServiceError::sql(&f, 7), Op::Write, 0);
        assert!(r.fields.contains(&(b'C', "23505".into())));
        assert!(r
            .fields
            .contains(&(b'D', "Key (id)=(1) already exists.".into())));
        assert!(!r.fields.iter().any(|(k, _)| *k == b'H'));
    }

    #[test]
    fn kinds_get_the_codes_clients_expect() {
        let late = ServiceError::deadline("not applied in time");
        assert_eq!(sqlstate(&late, Op::Write), "08007");
        assert_eq!(sqlstate(&late, Op::Read), "57014");
        assert_eq!(
            sqlstate(&ServiceError::unavailable("no leader", None), Op::Write),
            "57P03"
        );
        let mut read = ServiceError::refused(ErrorKind::InvalidArgument, "42703", "no column");
        read.position = 8;
        let r = response(&read, Op::Read, 10);
        assert!(r.fields.contains(&(b'P', "18".into())));
    }
}
