//! Exactly-once writes: the results of requests that carry a request id `(client_id, seq)`.
//!
//! Owns the table `raftpg.requests` and the SQL that reads and writes it (run by the applier,
//! inside the apply transaction). A request id is looked up before its statements run (a live
//! record makes it a duplicate, answered with the recorded outcome) and its outcome is recorded
//! in the same transaction as its effects (design.md "Lost
//! acknowledgements"), so a retry of a committed request — after a leader died before answering,
//! or a connection broke — finds the original outcome and is not applied again. Expiry is by
//! write number, never by a clock: writes are numbered along the log (the count of writes
//! applied before, kept in `raftpg.applied.writes`; the writes of a batch entry each have their
//! own), and a record counts for `retention` writes after the one that wrote it, the same on
//! every node; older rows are deleted as garbage now and then. Counting writes rather than log
//! entries keeps the table's size bounded whatever the number of writes per entry.

use crate::command::{ApplyOutcome, RequestId};

/// Creates the table (idempotent).
pub const BOOTSTRAP_SQL: &str = "
    CREATE TABLE IF NOT EXISTS raftpg.requests (
        client_id text   NOT NULL,
        seq       bigint NOT NULL,
        write_no  bigint NOT NULL,
        outcome   jsonb  NOT NULL,
        PRIMARY KEY (client_id, seq)
    );
    -- Data directories of earlier versions numbered records by log index.
    DO $mig$ BEGIN
        IF EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'raftpg.requests'::regclass
                   AND attname = 'log_index' AND NOT attisdropped) THEN
            ALTER TABLE raftpg.requests RENAME COLUMN log_index TO write_no;
            ALTER INDEX IF EXISTS raftpg.requests_by_log_index RENAME TO requests_by_write_no;
        END IF;
    END $mig$;
    CREATE INDEX IF NOT EXISTS requests_by_write_no ON raftpg.requests (write_no);
    -- Opens a write: sets its deterministic inputs (transaction-local, like SET LOCAL) and
    -- raises RP001 if its request id ($3, $4) has a live record (write number >= $5): the write
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
        -- Every write starts from the declared constraint modes (see session_rules).
        PERFORM raftpg.reset_constraints();
        IF cid IS NOT NULL AND EXISTS (SELECT 1 FROM raftpg.requests r
                WHERE r.client_id = cid AND r.seq = sq AND r.write_no >= floor) THEN
            RAISE EXCEPTION 'duplicate request' USING ERRCODE = 'RP001';
        END IF;
    END $fn$;
";

/// The recorded outcome of `($1, $2)` if not expired before write number `$3`.
pub const FETCH_LIVE_SQL: &str =
    "SELECT outcome FROM raftpg.requests WHERE client_id = $1 AND seq = $2 AND write_no >= $3";

/// Records several outcomes at once: arrays of client ids, seqs, write numbers and outcomes,
/// parameters `$first` to `$first+3` (no request id twice; an expired record of the same id is
/// replaced).
pub fn record_many_sql(first: usize) -> String {
    let (c, s, w, o) = (first, first + 1, first + 2, first + 3);
    format!(
        "INSERT INTO raftpg.requests (client_id, seq, write_no, outcome)
         SELECT * FROM unnest(${c}::text[], ${s}::bigint[], ${w}::bigint[], ${o}::jsonb[])
         ON CONFLICT (client_id, seq) DO UPDATE SET write_no = EXCLUDED.write_no, outcome = EXCLUDED.outcome"
    )
}

/// How many of the request ids `($first[i], $first+1[i])` have a record still live for a write
/// whose retention floor is `$first+2[i]`. One index probe per id: the LIMIT keeps the planner
/// from turning the lookups into a join that reads the whole table, and `generate_subscripts`
/// (unlike `unnest`, whose row estimate follows the array) lets PostgreSQL keep one generic
/// plan instead of planning the statement again at every execution.
pub fn count_live_sql(first: usize) -> String {
    let (c, s, f) = (first, first + 1, first + 2);
    format!(
        "SELECT count(*) FROM generate_subscripts(${c}::text[], 1) AS i
         CROSS JOIN LATERAL (SELECT 1 FROM raftpg.requests r
             WHERE r.client_id = (${c}::text[])[i] AND r.seq = (${s}::bigint[])[i]
               AND r.write_no >= (${f}::bigint[])[i] LIMIT 1) AS live"
    )
}

/// Deletes records expired before write number `$1`.
pub const EXPIRE_SQL: &str = "DELETE FROM raftpg.requests WHERE write_no < $1";

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The request's sequence number as stored.
pub fn seq(id: &RequestId) -> i64 {
    i64_of(id.seq)
}

/// Oldest write number whose records still count for the write numbered `write_no`.
pub fn retention_floor(write_no: u64, retention: u64) -> i64 {
    i64_of(write_no.saturating_sub(retention))
}

/// Whether garbage collection of expired records is due when a batch moves the count of
/// applied writes from `previous` to `writes` (every 4096 writes, to keep the cost off most
/// batches).
pub fn expiry_due(previous: u64, writes: u64) -> bool {
    previous / 4096 != writes / 4096
}

/// An outcome as stored.
pub fn encode(outcome: &ApplyOutcome) -> Result<serde_json::Value, String> {
    serde_json::to_value(outcome).map_err(|e| format!("encoding a request outcome: {e}"))
}

/// A stored outcome.
pub fn decode(v: serde_json::Value) -> Result<ApplyOutcome, String> {
    serde_json::from_value(v).map_err(|e| format!("corrupt request record: {e}"))
}
