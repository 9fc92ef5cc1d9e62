//! Exactly-once writes: the results of requests that carry a request id `(client_id, seq)`.
//!
//! Owns the table `raftpg.requests` and the SQL that reads and writes it (run by the applier,
//! inside the apply transaction). A request id is looked up before its statements run (a live
//! record makes it a duplicate, answered with the recorded outcome) and its outcome is recorded
//! in the same transaction as its effects (design.md "Lost
//! acknowledgements"), so a retry of a committed request — after a leader died before answering,
//! or a connection broke — finds the original outcome and is not applied again. Expiry is by log
//! index, never by a clock: a record counts for `retention` log entries after the entry that
//! wrote it, the same on every node; older rows are deleted as garbage now and then.

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
    -- Opens a write: sets its deterministic inputs (transaction-local, like SET LOCAL) and
    -- raises RP001 if its request id ($3, $4) has a live record (log index >= $5): the write
    -- then stops before any of its statements runs, on every node alike. The writes of one
    -- batch entry share its seed: the draw counter restarts only when the seed changes, so they
    -- draw different values (a failed write's draws are rolled back with its savepoint).
    CREATE OR REPLACE FUNCTION raftpg.begin_entry(ts text, seed text, cid text, sq bigint, floor bigint)
    RETURNS void LANGUAGE plpgsql AS $fn$
    BEGIN
        PERFORM set_config('raftpg.ts_us', ts, true);
        IF current_setting('raftpg.seed', true) IS DISTINCT FROM seed THEN
            PERFORM set_config('raftpg.seed', seed, true), set_config('raftpg.rnd_n', '0', true);
        END IF;
        IF cid IS NOT NULL AND EXISTS (SELECT 1 FROM raftpg.requests r
                WHERE r.client_id = cid AND r.seq = sq AND r.log_index >= floor) THEN
            RAISE EXCEPTION 'duplicate request' USING ERRCODE = 'RP001';
        END IF;
    END $fn$;
";

/// The recorded outcome of `($1, $2)` if not expired before `$3`.
pub const FETCH_LIVE_SQL: &str =
    "SELECT outcome FROM raftpg.requests WHERE client_id = $1 AND seq = $2 AND log_index >= $3";

/// Records several outcomes at once: arrays of client ids, seqs, log indexes and outcomes (no
/// request id twice).
pub const RECORD_MANY_SQL: &str = "
    INSERT INTO raftpg.requests (client_id, seq, log_index, outcome)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::jsonb[])
    ON CONFLICT (client_id, seq) DO UPDATE SET log_index = EXCLUDED.log_index, outcome = EXCLUDED.outcome";

/// How many of the request ids `($1[i], $2[i])` have a record still live for a write whose
/// retention floor is `$3[i]`. One index probe per id: the LIMIT keeps the planner from turning
/// the lookups into a join that reads the whole table, and `generate_subscripts` (unlike
/// `unnest`, whose row estimate follows the array) lets PostgreSQL keep one generic plan
/// instead of planning the statement again at every execution.
pub const COUNT_LIVE_SQL: &str = "
    SELECT count(*) FROM generate_subscripts($1::text[], 1) AS i
    CROSS JOIN LATERAL (SELECT 1 FROM raftpg.requests r
        WHERE r.client_id = ($1::text[])[i] AND r.seq = ($2::bigint[])[i]
          AND r.log_index >= ($3::bigint[])[i] LIMIT 1) AS live";

/// Deletes records expired before `$1`.
pub const EXPIRE_SQL: &str = "DELETE FROM raftpg.requests WHERE log_index < $1";

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The request's sequence number as stored.
pub fn seq(id: &RequestId) -> i64 {
    i64_of(id.seq)
}

/// Oldest log index whose records still count for an entry at `index`.
pub fn retention_floor(index: u64, retention: u64) -> i64 {
    i64_of(index.saturating_sub(retention))
}

/// Whether garbage collection of expired records is due when a batch moves the applied index
/// from `previous` to `index` (every 1024 entries, to keep the cost off most batches).
pub fn expiry_due(previous: u64, index: u64) -> bool {
    previous / 1024 != index / 1024
}

/// An outcome as stored.
pub fn encode(outcome: &ApplyOutcome) -> Result<serde_json::Value, String> {
    serde_json::to_value(outcome).map_err(|e| format!("encoding a request outcome: {e}"))
}

/// A stored outcome.
pub fn decode(v: serde_json::Value) -> Result<ApplyOutcome, String> {
    serde_json::from_value(v).map_err(|e| format!("corrupt request record: {e}"))
}
