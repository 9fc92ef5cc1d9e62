//! The limits of the apply path ([`ApplyLimits`]), shared by the state machine and the
//! applier.

use std::time::Duration;

/// Limits of the apply path.
#[derive(Clone, Debug)]
pub struct ApplyLimits {
    /// Most entries applied in one PostgreSQL transaction.
    pub batch_entries_max: usize,
    /// Most rows a single statement may return (RETURNING); more is a deterministic error.
    pub result_rows_max: usize,
    /// Most bytes (approximate) of the rows one write returns, all its statements together
    /// (RETURNING); more is a deterministic error (a write's outcome is stored in
    /// `raftpg.requests`, whose jsonb must never overflow).
    pub result_bytes_max: usize,
    /// Longest pause between retries after an environmental error.
    pub retry_backoff_max: Duration,
    /// For how many later writes a request id's result is kept for retries.
    pub request_retention_writes: u64,
    /// Do not execute the leader's entries before Raft commits them (`state_machine`,
    /// `Speculation`): apply them only when committed, as followers do.
    pub no_speculation: bool,
    /// Longest a speculation stays open waiting for Raft's commit before it is rolled back.
    pub speculation_wait_max: Duration,
}

impl Default for ApplyLimits {
    fn default() -> Self {
        ApplyLimits {
            batch_entries_max: 256,
            result_rows_max: 10_000,
            result_bytes_max: 16 * 1024 * 1024,
            retry_backoff_max: Duration::from_secs(2),
            request_retention_writes: 1_000_000,
            no_speculation: false,
            speculation_wait_max: Duration::from_secs(2),
        }
    }
}
