//! [`Refusal`]: why the SQL gate refused a statement, with the SQLSTATE to report.

/// Why a statement was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// SQLSTATE reported with the refusal.
    pub sqlstate: &'static str,
    /// What is wrong and what to do instead.
    pub message: String,
}

/// A refusal with `sqlstate` and `message`.
pub fn refuse(sqlstate: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        sqlstate,
        message: message.into(),
    }
}
