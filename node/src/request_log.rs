//! Exactly-once writes: the results of requests that carry a request id `(client_id, seq)`.
//!
//! Owns the table `raftpg.requests`. The result of a request is recorded in the same apply
//! transaction as its effects (design.md "Lost acknowledgements"), so a retry of a committed
//! request — after a leader died before answering, or a connection broke — finds the original
//! result and is not applied again. Expiry is by log index, never by a clock: a record counts
//! for `retention_entries` log entries after the entry that wrote it, the same on every node;
//! rows older than that are deleted as garbage now and then.

use crate::command::{ApplyOutcome, RequestId};

/// Creates the table (idempotent).
pub const BOOTSTRAP_SQL: &str = "
    CREATE TABLE IF NOT EXISTS raftpg.requests (
        client_id text   NOT NULL,
        seq       bigint NOT NULL,
        log_index bigint NOT NULL,
        outcome   jsonb  NOT NULL,
        PRIMARY KEY (client_id, seq)
    );
    CREATE INDEX IF NOT EXISTS requests_by_log_index ON raftpg.requests (log_index);
";

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The stored outcome of `id` if it was applied within `retention_entries` before `index`.
pub async fn lookup(
    client: &tokio_postgres::Client,
    id: &RequestId,
    index: u64,
    retention_entries: u64,
) -> Result<Option<ApplyOutcome>, LookupError> {
    let oldest = i64_of(index.saturating_sub(retention_entries));
    let row = client
        .query_opt(
            "SELECT outcome FROM raftpg.requests WHERE client_id = $1 AND seq = $2 AND log_index >= $3",
            &[&id.client_id, &i64_of(id.seq), &oldest],
        )
        .await?;
    match row {
        None => Ok(None),
        Some(r) => {
            let v: serde_json::Value = r.get(0);
            Ok(Some(
                serde_json::from_value(v).map_err(|e| LookupError::Corrupt(e.to_string()))?,
            ))
        }
    }
}

/// Records the outcome of `id`, applied at `index`.
pub async fn record(
    client: &tokio_postgres::Client,
    id: &RequestId,
    index: u64,
    outcome: &ApplyOutcome,
) -> Result<(), LookupError> {
    let v = serde_json::to_value(outcome).map_err(|e| LookupError::Corrupt(e.to_string()))?;
    client
        .execute(
            "INSERT INTO raftpg.requests (client_id, seq, log_index, outcome) VALUES ($1, $2, $3, $4)
             ON CONFLICT (client_id, seq) DO UPDATE SET log_index = EXCLUDED.log_index, outcome = EXCLUDED.outcome",
            &[&id.client_id, &i64_of(id.seq), &i64_of(index), &v],
        )
        .await?;
    Ok(())
}

/// Deletes records that can no longer match (older than the retention before `index`). Runs
/// when a batch crosses a multiple of 1024 entries, to keep the cost off most batches.
pub async fn expire(
    client: &tokio_postgres::Client,
    previous_index: u64,
    index: u64,
    retention_entries: u64,
) -> Result<(), LookupError> {
    if previous_index / 1024 == index / 1024 {
        return Ok(());
    }
    let oldest = i64_of(index.saturating_sub(retention_entries));
    client
        .execute(
            "DELETE FROM raftpg.requests WHERE log_index < $1",
            &[&oldest],
        )
        .await?;
    Ok(())
}

/// A failure reading or writing request records.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// PostgreSQL failed (environmental).
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    /// A stored record does not decode.
    #[error("corrupt request record: {0}")]
    Corrupt(String),
}
