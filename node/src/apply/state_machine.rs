//! The state machine: applies committed log entries, in log order, to the node's PostgreSQL.
//!
//! Owns the single applier connection and the bookkeeping table `raftpg.applied`. Invariants
//! (design.md):
//! 1. **Applied index in the same transaction.** Every batch of entries runs in one PostgreSQL
//!    transaction that also stores the last applied log id, the last membership and the sequence
//!    positions. After any crash the node resumes exactly after the last committed batch; entries
//!    at or below the stored index are never applied again.
//! 2. **Same result everywhere.** Entries are applied strictly in log order on one session whose
//!    settings are fixed (UTC, ISO dates, no timeouts).
//! 3. **Deterministic vs environmental errors.** A SQL error of a deterministic class rolls the
//!    entry back to its savepoint and becomes the entry's result. Any other error (connection
//!    lost, disk full, cancel, internal) is never a result: the batch is abandoned, the applier
//!    reconnects with backoff and retries, and never advances past the entry.
//!
//! Never: record an environmental error as a result; advance without committing; write outside
//! the batch transaction.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::SnapshotMetaOf;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use super::limits::ApplyLimits;
use crate::apply::applier::{Applier, BatchEnd, EnvError, Pending, RunWrite};
use crate::apply::checksums;
use crate::apply::request_log;
use crate::apply::roles;
use crate::apply::snapshot::{SnapMeta, Snapshot, SnapshotError, SnapshotFile, SnapshotStore};
use crate::command::{
    ApplyOutcome, Command, Entry, LogId, NodeId, StoredMembership, TxnCommand, TypeConfig,
    WriteCommand,
};
use crate::raft::clock::EntryClock;
use crate::raft::log_store::LogStore;
use crate::sql::session_rules;
use openraft::storage::RaftLogReader;

mod txn;
pub use txn::{TxnRefusal, TxnRunner};

/// What the applier is doing, for `Cluster.Status`, and since when it has been stuck; and the
/// members of the membership it applied last (for peer authorization).
///
/// A stuck applier (PostgreSQL unreachable, an entry failing for an environmental reason) is
/// reported with how long it has been stuck, and logged as one clear error a minute rather
/// than a line per retry.
#[derive(Default)]
pub struct ApplierStatus {
    state: Mutex<StatusState>,
    /// The nodes of the last membership this node applied (see [`ApplierStatus::applied_members`]).
    members: Mutex<std::collections::BTreeSet<NodeId>>,
    /// Fast runs abandoned since start (see [`ApplierStatus::fast_runs_abandoned`]).
    fast_runs_abandoned: std::sync::atomic::AtomicU64,
    /// See [`ApplierStatus::schema_epoch`].
    schema_epoch: std::sync::atomic::AtomicU64,
    /// See [`ApplierStatus::held`].
    held: Mutex<Option<Held>>,
}

/// What this node's PostgreSQL holds, as the applier knows it: every batch up to `index` is
/// committed in the PostgreSQL incarnation whose `raftpg.incarnation` table holds `token`.
///
/// The applier writes a fresh random token into that unlogged table each time it connects
/// (after reading the applied index there), and raises `index` after each commit. PostgreSQL
/// empties unlogged tables in crash recovery, the only way it loses commits (the applier
/// commits with `synchronous_commit = off`), and snapshots and backups carry no token
/// (`pg_dump --exclude-table-data`). So a read connection that found `token` in that table
/// runs in an incarnation that holds `index` for as long as the connection lives (a crash ends
/// the connection): it may read without opening a transaction to look at `raftpg.applied`
/// (`service::read`, direct reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The token in `raftpg.incarnation`.
    pub token: i64,
    /// The last log index committed there.
    pub index: u64,
}

#[derive(Default)]
struct StatusState {
    text: String,
    /// When the applier got stuck (None while it makes progress).
    stuck_since: Option<std::time::Instant>,
    /// When the stuck applier was last logged as an error.
    logged_at: Option<std::time::Instant>,
}

/// How often a stuck applier logs its error.
const STUCK_LOG_EVERY: Duration = Duration::from_secs(60);

impl ApplierStatus {
    /// A number that grows whenever the database's schema may have changed: a batch that ran
    /// DDL committed, or a snapshot was installed. Statements prepared before it grew (the read
    /// pool's) are prepared again.
    pub fn schema_epoch(&self) -> u64 {
        self.schema_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// What PostgreSQL holds, when the applier is connected and knows it (see [`Held`]).
    pub fn held(&self) -> Option<Held> {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_held(&self, held: Option<Held>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = held;
    }

    /// Records that the applier committed up to `index` on the connection it knows the token of.
    fn advance_held(&self, index: u64) {
        if let Some(h) = self.held.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            h.index = h.index.max(index);
        }
    }

    fn schema_changed(&self) {
        self.schema_epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// How many fast runs were abandoned (and applied again the careful way) since the node
    /// started: a write failing in one is expected; a run that failed without one would be
    /// the fast path's own cost.
    pub fn fast_runs_abandoned(&self) -> u64 {
        self.fast_runs_abandoned
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The nodes of the last membership this node applied: a node leaving the cluster is still
    /// in it until its removal is applied here, while Raft's effective membership (the last in
    /// the log) drops it as soon as the removal is appended. Peer authorization accepts both.
    pub fn applied_members(&self) -> std::collections::BTreeSet<NodeId> {
        self.members.lock().map(|g| g.clone()).unwrap_or_default()
    }

    fn set_members(&self, m: &StoredMembership) {
        if let Ok(mut g) = self.members.lock() {
            *g = m.membership().nodes().map(|(id, _)| *id).collect();
        }
    }

    /// The applier makes progress.
    fn set(&self, s: impl Into<String>) {
        if let Ok(mut g) = self.state.lock() {
            g.text = s.into();
            g.stuck_since = None;
            g.logged_at = None;
        }
    }

    /// The applier cannot make progress: `s` says why. Logs an error the first time and then
    /// once every [`STUCK_LOG_EVERY`] (the rest at debug level).
    fn stuck(&self, s: impl Into<String>) {
        let s = s.into();
        let Ok(mut g) = self.state.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        let since = *g.stuck_since.get_or_insert(now);
        let log = g
            .logged_at
            .is_none_or(|t| now.duration_since(t) >= STUCK_LOG_EVERY);
        if log {
            g.logged_at = Some(now);
            let secs = now.duration_since(since).as_secs();
            if secs == 0 {
                warn!("applier stuck: {s}");
            } else {
                tracing::error!(stuck_for_secs = secs, "applier stuck for {secs} s: {s}");
            }
        } else {
            debug!("applier stuck: {s}");
        }
        g.text = s;
    }

    /// Current state text, e.g. `applying` or `waiting for PostgreSQL: ... (stuck for 75 s)`.
    pub fn get(&self) -> String {
        let Ok(g) = self.state.lock() else {
            return String::new();
        };
        match g.stuck_since {
            Some(t) => format!("{} (stuck for {} s)", g.text, t.elapsed().as_secs()),
            None => g.text.clone(),
        }
    }
}

/// A random, non-zero token for [`Held`].
fn new_token() -> i64 {
    loop {
        let t = uuid::Uuid::new_v4().as_u64_pair().0 as i64;
        if t != 0 {
            return t;
        }
    }
}

/// raftpg's bookkeeping schema, created idempotently by the applier.
const BOOTSTRAP_SQL: &str = "
    CREATE SCHEMA IF NOT EXISTS raftpg;
    CREATE TABLE IF NOT EXISTS raftpg.applied (
        singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        log_index  bigint NOT NULL DEFAULT 0,
        log_id     jsonb,
        membership jsonb,
        sequences  jsonb NOT NULL DEFAULT '{}'::jsonb
    );
    -- Writes applied up to log_index (they number the request records, see request_log).
    ALTER TABLE raftpg.applied ADD COLUMN IF NOT EXISTS writes bigint NOT NULL DEFAULT 0;
    INSERT INTO raftpg.applied (singleton) VALUES (true) ON CONFLICT DO NOTHING;
    -- The applier's token for this PostgreSQL incarnation (see state_machine::Held).
    CREATE UNLOGGED TABLE IF NOT EXISTS raftpg.incarnation (token bigint NOT NULL);
    -- The position of every user sequence, recorded with each batch (see
    -- applier::RECORD_APPLIED_SQL): {name: last_value} for a sequence called since its start
    -- (is_called), {name: [last_value, false]} for one not called since its start or a RESTART
    -- (pg_sequence_last_value() is null for it: its last_value, the value nextval() will
    -- return, is read from the sequence itself). Older versions wrote [last_value, true] for
    -- called ones; RESTORE_SEQUENCES_SQL reads every form.
    --
    -- The list of sequences (oids, and their names as JSON keys) is cached in the session
    -- settings raftpg.seq_oids / raftpg.seq_keys: naming every sequence at every batch cost
    -- more than reading them (about 2 µs per sequence per batch). Only DDL creates, drops or
    -- renames a sequence, and raftpg's event triggers clear the cache on any DDL
    -- (session_rules::guard_functions_sql); the cache is a session setting, so a rolled-back
    -- batch also rolls back what it cached, and a new session starts without one.
    CREATE OR REPLACE FUNCTION raftpg.sequence_positions() RETURNS jsonb LANGUAGE plpgsql AS $$
    DECLARE oids oid[]; keys text[]; called jsonb; uncalled text; others jsonb;
    BEGIN
        IF coalesce(current_setting('raftpg.seq_oids', true), '') = '' THEN
            SELECT coalesce(array_agg(s.seqrelid ORDER BY s.seqrelid), '{}'),
                   coalesce(array_agg(to_json(format('%I.%I', n.nspname, c.relname))::text
                                      ORDER BY s.seqrelid), '{}')
            INTO oids, keys
            FROM pg_sequence s
            JOIN pg_class c ON c.oid = s.seqrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname <> 'raftpg' AND has_sequence_privilege(s.seqrelid, 'SELECT');
            PERFORM set_config('raftpg.seq_oids', oids::text, false),
                    set_config('raftpg.seq_keys', keys::text, false);
        ELSE
            oids := current_setting('raftpg.seq_oids')::oid[];
            keys := current_setting('raftpg.seq_keys')::text[];
        END IF;
        -- The called ones as JSON text assembled from the cached keys (one parse instead of
        -- building a jsonb value per sequence).
        SELECT ('{' || coalesce(string_agg(q.k || ':' || q.v::text, ',') FILTER (WHERE q.v IS NOT NULL), '')
                || '}')::jsonb,
               string_agg(format('SELECT %L AS k, last_value, is_called FROM %s',
                                 q.k::json #>> '{}', q.k::json #>> '{}'), ' UNION ALL ')
                   FILTER (WHERE q.v IS NULL)
        INTO called, uncalled
        FROM (SELECT u.k, pg_sequence_last_value(u.o) AS v
              FROM unnest(oids, keys) AS u(o, k)) q;
        IF uncalled IS NOT NULL THEN
            EXECUTE 'SELECT jsonb_object_agg(k, jsonb_build_array(last_value, is_called)) FROM ('
                    || uncalled || ') u' INTO others;
        END IF;
        RETURN called || coalesce(others, '{}');
    END $$;
";

/// raftpg's deterministic replacements for time and randomness (design.md "Time, randomness,
/// identity"). The leader rewrites `now()`, `CURRENT_TIMESTAMP`, `random()`,
/// `gen_random_uuid()`, ... into these, also inside DDL, so column DEFAULTs bind to them. During
/// an entry they read the entry's timestamp (`raftpg.ts_us`) and seed (`raftpg.seed`, with a
/// per-entry call counter `raftpg.rnd_n`), set with SET LOCAL at the start of every entry;
/// outside an entry (e.g. a read through a view) they behave like PostgreSQL's own.
const DETERMINISTIC_FUNCTIONS_SQL: &str = r#"
    CREATE OR REPLACE FUNCTION raftpg.now() RETURNS timestamptz LANGUAGE plpgsql STABLE AS $$
    DECLARE us text := current_setting('raftpg.ts_us', true);
    BEGIN
        IF us IS NULL OR us = '' THEN RETURN pg_catalog.now(); END IF;
        RETURN timestamptz 'epoch' + us::bigint * interval '1 microsecond';
    END $$;
    CREATE OR REPLACE FUNCTION raftpg."current_date"() RETURNS date LANGUAGE sql STABLE
        AS $$ SELECT raftpg.now()::date $$;
    CREATE OR REPLACE FUNCTION raftpg."current_time"() RETURNS timetz LANGUAGE sql STABLE
        AS $$ SELECT raftpg.now()::timetz $$;
    CREATE OR REPLACE FUNCTION raftpg."localtime"() RETURNS time LANGUAGE sql STABLE
        AS $$ SELECT raftpg.now()::time $$;
    CREATE OR REPLACE FUNCTION raftpg."localtimestamp"() RETURNS timestamp LANGUAGE sql STABLE
        AS $$ SELECT raftpg.now()::timestamp $$;
    CREATE OR REPLACE FUNCTION raftpg.next_draw() RETURNS text LANGUAGE plpgsql VOLATILE AS $$
    DECLARE seed text := current_setting('raftpg.seed', true); n bigint;
    BEGIN
        IF seed IS NULL OR seed = '' THEN RETURN NULL; END IF;
        n := coalesce(nullif(current_setting('raftpg.rnd_n', true), ''), '0')::bigint + 1;
        PERFORM pg_catalog.set_config('raftpg.rnd_n', n::text, true);
        RETURN md5(seed || ':' || n::text);
    END $$;
    CREATE OR REPLACE FUNCTION raftpg.random() RETURNS double precision LANGUAGE plpgsql VOLATILE AS $$
    DECLARE h text := raftpg.next_draw();
    BEGIN
        IF h IS NULL THEN RETURN pg_catalog.random(); END IF;
        RETURN ('x' || substr(h, 1, 13))::bit(52)::bigint / 4503599627370496.0;
    END $$;
    CREATE OR REPLACE FUNCTION raftpg.gen_random_uuid() RETURNS uuid LANGUAGE plpgsql VOLATILE AS $$
    DECLARE h text := raftpg.next_draw();
    BEGIN
        IF h IS NULL THEN RETURN pg_catalog.gen_random_uuid(); END IF;
        RETURN (substr(h, 1, 12) || '4' || substr(h, 14, 3)
                || substr('89ab', get_byte(decode(substr(h, 17, 2), 'hex'), 0) % 4 + 1, 1)
                || substr(h, 18, 15))::uuid;
    END $$;
"#;

/// Puts every sequence back to the position recorded with the last applied batch: exactly
/// `(last_value, is_called)` (see `raftpg.sequence_positions`). Records of earlier versions
/// hold a number (called) or null (never called: back to its start).
const RESTORE_SEQUENCES_SQL: &str = "
    SELECT count(setval(q.seqrelid,
        CASE jsonb_typeof(s.value) WHEN 'array' THEN (s.value->>0)::bigint
                                   WHEN 'number' THEN (s.value #>> '{}')::bigint
                                   ELSE q.seqstart END,
        CASE jsonb_typeof(s.value) WHEN 'array' THEN (s.value->>1)::boolean
                                   ELSE jsonb_typeof(s.value) = 'number' END))
    FROM raftpg.applied a, jsonb_each(a.sequences) s
    JOIN pg_sequence q ON q.seqrelid = to_regclass(s.key)";

/// The state machine's state and logic, shared (behind a lock) by openraft's calls
/// ([`PgStateMachine`]) and the task that replays what PostgreSQL lost as soon as it is back.
struct StateMachineCore {
    node_id: NodeId,
    /// Last log index openraft handed to this state machine and was told applied (PostgreSQL
    /// may hold less after a crash: `applied` is what it holds).
    log_applied: Option<u64>,
    /// The Raft log, to replay entries PostgreSQL lost in a crash.
    log: LogStore,
    /// Snapshots (build, receive, install).
    snapshots: SnapshotStore,
    conn_config: tokio_postgres::Config,
    applier: Option<Applier>,
    /// Last applied log id and membership as stored in PostgreSQL (valid while `applier` is).
    applied: Option<LogId>,
    /// Writes applied up to `applied` (numbers the request records; see `request_log`).
    applied_writes: u64,
    membership: StoredMembership,
    limits: ApplyLimits,
    status: Arc<ApplierStatus>,
    clock: Arc<EntryClock>,
    shutdown: watch::Receiver<bool>,
    /// Whether runs of entries are pipelined (off while re-applying a batch whose pipeline
    /// had to be abandoned; see `EnvError::PipelineAborted`).
    pipeline: bool,
    /// Batches still to apply with a savepoint per write before trying fast runs again (see
    /// `EnvError::FastRunAbandoned`): after a fast run fails, the next few batches are likely
    /// to hold failing writes too.
    careful_batches: u32,
    /// Entries executed in the applier's open transaction before Raft committed them (see
    /// [`Speculation`]); at most one.
    speculation: Option<Speculation>,
    /// The interactive transaction open on the applier session (leader only; see `txn`).
    txn: Option<txn::OpenTxn>,
    /// The last transaction rolled back by the state machine, and why (told to its caller).
    txn_aborted: Option<(crate::command::RequestId, String)>,
    /// Woken whenever what a `BEGIN` waits for may have changed (an entry speculated or
    /// applied, a transaction ended).
    changed: Arc<tokio::sync::Notify>,
    /// How to cancel what the applier session runs (while it is connected): a transaction's
    /// statement that outlives the transaction's time limit.
    cancel: Arc<Mutex<Option<tokio_postgres::CancelToken>>>,
}

/// Entries this node appended as leader, executed in the applier's open transaction while
/// Raft replicates them, not committed (docs/write-path.md, "execute now, keep if committed
/// here"). Kept — committed, its outcomes answered — only when openraft applies exactly these
/// log ids; rolled back (sequences restored) when it applies anything else, when the
/// connection drops, or after [`ApplyLimits::speculation_wait_max`]. Nothing of it is visible
/// before it is kept: its transaction is open.
///
/// Interactive transactions chain on it (`txn`): a transaction may begin on top of it, inside a
/// `raftpg_chain` savepoint, and its entry becomes one more level. When Raft commits the levels
/// below while something still runs on top, their PostgreSQL commit is *deferred*: their
/// outcomes are answered at once, and they are committed together with what runs on top (reads
/// wait for PostgreSQL to hold their index, as after a crash). At most
/// [`DEFER_MAX`] later, whatever still runs on top is rolled back and the deferred levels
/// committed alone.
struct Speculation {
    /// Its entries in log order: the first began the applier's open transaction, each later one
    /// ran on top of the ones before it, in a `raftpg_chain` savepoint of its own.
    levels: Vec<Level>,
    /// How many of the first levels Raft committed (their outcomes answered) while something
    /// ran on top: committed in PostgreSQL only with the levels above.
    deferred: usize,
    /// Since when levels are deferred.
    deferred_since: Option<std::time::Instant>,
}

/// One entry of a [`Speculation`].
struct Level {
    log_id: LogId,
    /// Its outcome, answered when Raft commits it.
    outcome: ApplyOutcome,
    /// What PostgreSQL records when it commits up to this level.
    after: Below,
    /// When it was executed.
    since: std::time::Instant,
}

/// What a batch records when it commits (invariant 1), up to some entry.
#[derive(Clone)]
struct Below {
    last: LogId,
    writes: u64,
    membership: StoredMembership,
}

/// The longest PostgreSQL commits of speculated entries are deferred for what runs on top of
/// them (see [`Speculation`]); a chained `BEGIN` waits once half of it has passed.
pub(crate) const DEFER_MAX: Duration = Duration::from_millis(20);

/// Most levels a speculation holds (see [`Speculation`]).
const LEVELS_MAX: usize = 16;

impl Speculation {
    /// A speculation of one entry.
    fn one(log_id: LogId, outcome: ApplyOutcome, after: Below) -> Self {
        Speculation {
            levels: vec![Level {
                log_id,
                outcome,
                after,
                since: std::time::Instant::now(),
            }],
            deferred: 0,
            deferred_since: None,
        }
    }

    /// What PostgreSQL records when it commits every level.
    fn top(&self) -> &Below {
        &self.levels[self.levels.len() - 1].after
    }

    /// Levels Raft has not committed yet.
    fn uncommitted(&self) -> usize {
        self.levels.len() - self.deferred
    }
}

/// Entries executed in the applier's transaction, with what the batch records.
struct Executed {
    last: LogId,
    writes: u64,
    membership: StoredMembership,
    item_outcomes: Vec<ApplyOutcome>,
    pending: Pending,
    end: BatchEnd,
}

/// Batches applied with a savepoint per write after a fast run had to be abandoned.
const CAREFUL_BATCHES_AFTER_ABANDON: u32 = 16;

/// What the state machine is built from.
pub struct StateMachineParts {
    /// This node's id.
    pub node_id: NodeId,
    /// The Raft log (for replays).
    pub log: LogStore,
    /// Snapshot storage.
    pub snapshots: SnapshotStore,
    /// The applier's PostgreSQL connection settings.
    pub conn_config: tokio_postgres::Config,
    /// Limits of the apply path.
    pub limits: ApplyLimits,
    /// Where the applier reports what it does.
    pub status: Arc<ApplierStatus>,
    /// The entry clock, told about every applied entry's timestamp.
    pub clock: Arc<EntryClock>,
    /// Node shutdown signal.
    pub shutdown: watch::Receiver<bool>,
}

impl StateMachineCore {
    /// Creates the state machine; it connects lazily.
    fn new(p: StateMachineParts) -> Self {
        StateMachineCore {
            node_id: p.node_id,
            log_applied: None,
            log: p.log,
            snapshots: p.snapshots,
            conn_config: p.conn_config,
            applier: None,
            applied: None,
            applied_writes: 0,
            membership: StoredMembership::default(),
            limits: p.limits,
            status: p.status,
            clock: p.clock,
            shutdown: p.shutdown,
            pipeline: true,
            careful_batches: 0,
            speculation: None,
            txn: None,
            txn_aborted: None,
            changed: Arc::new(tokio::sync::Notify::new()),
            cancel: Arc::new(Mutex::new(None)),
        }
    }

    /// Connects (if not connected), sets the session up, and reloads the applied state from
    /// PostgreSQL, restoring sequence positions. Called after every connection loss.
    async fn connect(&mut self) -> Result<(), EnvError> {
        if self.applier.as_ref().is_some_and(|a| !a.is_closed()) {
            return Ok(());
        }
        self.disconnect();
        let mut applier = Applier::connect(&self.conn_config).await?;
        let client = applier.client();
        client.batch_execute(BOOTSTRAP_SQL).await?;
        client.batch_execute(DETERMINISTIC_FUNCTIONS_SQL).await?;
        client.batch_execute(request_log::BOOTSTRAP_SQL).await?;
        client.batch_execute(checksums::BOOTSTRAP_SQL).await?;
        client.batch_execute(roles::BOOTSTRAP_SQL).await?;
        // After a snapshot install the roles become the snapshot's (apply::roles).
        client.batch_execute(roles::APPLY_RECORDED_SQL).await?;
        let raftpg_oid: u32 = client
            .query_one("SELECT 'raftpg'::regnamespace::oid", &[])
            .await?
            .get(0);
        client
            .batch_execute(&session_rules::guard_functions_sql(raftpg_oid))
            .await?;
        client.batch_execute(roles::PRIVILEGES_SQL).await?;
        let restored: i64 = client.query_one(RESTORE_SEQUENCES_SQL, &[]).await?.get(0);
        let row = client
            .query_one("SELECT log_id, membership, writes FROM raftpg.applied", &[])
            .await?;
        let log_id: Option<serde_json::Value> = row.get(0);
        let membership: Option<serde_json::Value> = row.get(1);
        self.applied_writes = u64::try_from(row.get::<_, i64>(2)).unwrap_or(0);
        self.applied = match log_id {
            Some(v) => Some(
                serde_json::from_value(v).map_err(|e| EnvError::Bookkeeping {
                    what: "raftpg.applied.log_id",
                    detail: e.to_string(),
                })?,
            ),
            None => None,
        };
        self.membership = match membership {
            Some(v) => serde_json::from_value(v).map_err(|e| EnvError::Bookkeeping {
                what: "raftpg.applied.membership",
                detail: e.to_string(),
            })?,
            None => StoredMembership::default(),
        };
        self.status.set_members(&self.membership);
        let token = new_token();
        client
            .batch_execute(&format!(
                "BEGIN; DELETE FROM raftpg.incarnation; \
                 INSERT INTO raftpg.incarnation (token) VALUES ({token}); COMMIT"
            ))
            .await?;
        info!(node = self.node_id, applied = ?self.applied.map(|l| l.index), restored_sequences = restored,
              "applier connected to PostgreSQL");
        applier.prepare_bookkeeping().await?;
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(applier.client().cancel_token());
        self.applier = Some(applier);
        self.status.set_held(Some(Held {
            token,
            index: self.applied.map(|l| l.index).unwrap_or(0),
        }));
        Ok(())
    }

    /// Drops the applier's connection (aborting its transaction, if any); what PostgreSQL
    /// holds is unknown until it connects again.
    fn disconnect(&mut self) {
        self.status.set_held(None);
        *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(t) = self.txn.take() {
            self.txn_aborted = Some((
                t.request_id().clone(),
                "the transaction was rolled back: the leader's PostgreSQL session was lost".into(),
            ));
        }
        if self.speculation.take().is_some() {
            crate::metrics::get()
                .speculations
                .with_label_values(&["dropped"])
                .inc();
        }
        self.applier = None;
    }

    /// Retries `connect` with backoff until it works or the node shuts down.
    async fn connect_until_done(&mut self) -> std::io::Result<()> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.connect().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.status.stuck(format!("waiting for PostgreSQL: {e}"));
                    self.pause(&mut backoff).await?;
                }
            }
        }
    }

    async fn pause(&mut self, backoff: &mut Duration) -> std::io::Result<()> {
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {}
            _ = self.shutdown.wait_for(|s| *s) => {}
        }
        if *self.shutdown.borrow() {
            return Err(std::io::Error::other("node is shutting down"));
        }
        *backoff = (*backoff * 2).min(self.limits.retry_backoff_max);
        Ok(())
    }

    /// Applies one batch in one transaction. Entries already in PostgreSQL (a commit whose
    /// acknowledgement was lost) are skipped, never applied twice.
    async fn apply_batch(&mut self, batch: &[Entry]) -> Result<Vec<ApplyOutcome>, EnvError> {
        let applied = self.apply_batch_inner(batch).await;
        self.changed.notify_waiters();
        applied
    }

    async fn apply_batch_inner(&mut self, batch: &[Entry]) -> Result<Vec<ApplyOutcome>, EnvError> {
        // (A transaction on top of the speculation is settled with it.)
        if self.txn.as_ref().is_some_and(|t| !t.on_top()) {
            self.settle_txn(batch.first()).await;
        }
        let (mut kept, batch) = self.settle_speculation(batch).await?;
        if batch.is_empty() {
            return Ok(kept);
        }
        kept.extend(self.apply_unspeculated(batch).await?);
        Ok(kept)
    }

    /// [`Self::apply_batch`] of entries no speculation covers.
    async fn apply_unspeculated(&mut self, batch: &[Entry]) -> Result<Vec<ApplyOutcome>, EnvError> {
        self.connect().await?;
        if let Some(first) = batch.first() {
            self.replay_lost(first.log_id.index).await?;
        }
        let started = std::time::Instant::now();
        let fast = self.pipeline && self.careful_batches == 0;
        let outcomes = self.commit_entries(batch).await?;
        debug!(
            node = self.node_id,
            first = batch.first().map(|e| e.log_id.index).unwrap_or(0),
            entries = batch.len(),
            writes = batch.iter().map(item_count).sum::<usize>(),
            fast,
            micros = started.elapsed().as_micros() as u64,
            "batch applied"
        );
        Ok(outcomes)
    }

    /// PostgreSQL may lose its last commits in a crash (the applier commits with
    /// `synchronous_commit = off`; the Raft log is the durable copy). openraft believes those
    /// entries applied and will not send them again, so re-apply them from the log: every entry
    /// after PostgreSQL's applied index and before `next_index`.
    async fn replay_lost(&mut self, next_index: u64) -> Result<(), EnvError> {
        loop {
            let from = self.applied.map(|l| l.index + 1).unwrap_or(0);
            if from >= next_index {
                return Ok(());
            }
            let to = next_index.min(from + self.limits.batch_entries_max.max(1) as u64);
            let entries =
                self.log
                    .try_get_log_entries(from..to)
                    .await
                    .map_err(|e| EnvError::ReplayRead {
                        from,
                        to,
                        detail: e.to_string(),
                    })?;
            if entries.len() as u64 != to - from
                || entries.first().map(|e| e.log_id.index) != Some(from)
            {
                return Err(EnvError::ReplayPurged { from, to });
            }
            warn!(
                node = self.node_id,
                from,
                to,
                "PostgreSQL lost committed batches in a crash; replaying them from the log"
            );
            for batch in transactions(&entries, self.limits.batch_entries_max) {
                self.commit_entries(batch).await?;
            }
        }
    }

    /// Commits `batch` in one transaction together with the new applied index (invariant 1).
    async fn commit_entries(&mut self, batch: &[Entry]) -> Result<Vec<ApplyOutcome>, EnvError> {
        let (mut outcomes, fresh) = self.split_applied_before(batch).await?;
        let Some(x) = self.execute_fresh(&fresh).await? else {
            return Ok(outcomes);
        };
        self.applier
            .as_mut()
            .ok_or(EnvError::NotConnected)?
            .flush(x.pending, Some(&x.end))
            .await?;
        self.committed(x.last, x.writes, x.membership);
        outcomes.extend(entry_outcomes(&fresh, x.item_outcomes)?);
        Ok(outcomes)
    }

    /// Runs `fresh` (entries PostgreSQL does not hold, in order) in the applier's transaction
    /// and computes what the batch records; sends nothing that ends the transaction.
    async fn execute_fresh(&mut self, fresh: &[&Entry]) -> Result<Option<Executed>, EnvError> {
        let Some(last) = fresh.last().map(|e| e.log_id) else {
            return Ok(None);
        };
        let mut items = Vec::with_capacity(fresh.len());
        let mut writes = self.applied_writes;
        let mut prev = self.applied;
        for e in fresh {
            push_items(e, prev, &mut writes, &mut items);
            prev = Some(e.log_id);
        }
        let expired = self.expire_requests(writes).await?;
        let mut membership = self.membership.clone();
        let (item_outcomes, pending) = self.apply_items(&items, !expired, &mut membership).await?;
        let end = batch_end(last, writes, &membership)?;
        Ok(Some(Executed {
            last,
            writes,
            membership,
            item_outcomes,
            pending,
            end,
        }))
    }

    /// Records in memory that the transaction ending at `last` committed.
    fn committed(&mut self, last: LogId, writes: u64, membership: StoredMembership) {
        if self
            .applier
            .as_mut()
            .is_some_and(|a| a.take_committed_ddl())
        {
            self.status.schema_changed();
        }
        self.applied = Some(last);
        self.status.advance_held(last.index);
        self.applied_writes = writes;
        self.status.set_members(&membership);
        self.membership = membership;
    }

    /// Executes `entry`, which this node appended as leader, while Raft replicates it: a
    /// speculation (docs/write-path.md). Only when PostgreSQL holds exactly the entries before
    /// it, nothing else is open, and the fast path is on; otherwise (and on any error) the entry
    /// is simply applied when committed.
    async fn speculate(&mut self, entry: Entry) {
        let index = entry.log_id.index;
        let applied_already = self.log_applied.is_some_and(|a| index <= a)
            || self.applied.is_some_and(|a| index <= a.index);
        if applied_already {
            // Offered after openraft applied it (this task ran late): nothing to execute, and
            // not an entry that reached the log before an open transaction's.
            crate::metrics::get()
                .speculations
                .with_label_values(&["skipped"])
                .inc();
            return;
        }
        if self.txn.is_some() {
            self.settle_txn(Some(&entry)).await;
            if self.speculation.is_some() {
                // The open transaction's own entry: what it did is the speculation.
                return;
            }
        }
        let m = crate::metrics::get();
        let connected = self.applier.as_ref().is_some_and(|a| !a.is_closed());
        let ready = !self.limits.no_speculation
            && self.speculation.is_none()
            && self.pipeline
            && self.careful_batches == 0
            && connected
            && self
                .applied
                .is_some_and(|l| l.index + 1 == entry.log_id.index)
            && self.log_applied == self.applied.map(|l| l.index);
        if !ready {
            m.speculations.with_label_values(&["skipped"]).inc();
            return;
        }
        let batch = [entry];
        let fresh: Vec<&Entry> = batch.iter().collect();
        let since = std::time::Instant::now();
        let executed = async {
            let x = self
                .execute_fresh(&fresh)
                .await?
                .ok_or(EnvError::NotConnected)?;
            self.applier
                .as_mut()
                .ok_or(EnvError::NotConnected)?
                .flush_uncommitted(x.pending, &x.end)
                .await?;
            let mut outcomes = entry_outcomes(&fresh, x.item_outcomes)?;
            let mut spec = Speculation::one(
                batch[0].log_id,
                outcomes
                    .pop()
                    .ok_or(EnvError::Inconsistent("an entry without outcome"))?,
                Below {
                    last: x.last,
                    writes: x.writes,
                    membership: x.membership,
                },
            );
            spec.levels[0].since = since;
            Ok::<_, EnvError>(spec)
        }
        .await;
        match executed {
            Ok(spec) => self.speculation = Some(spec),
            Err(e) => {
                debug!(node = self.node_id, index = batch[0].log_id.index, error = %e,
                       "speculation abandoned; the entry is applied when committed");
                m.speculations.with_label_values(&["failed"]).inc();
                // A write of the entry failed in the fast run (or the pipeline broke): its
                // apply would fail the same way, so apply it (and the next few) the careful
                // way at once, as `apply_batch_until_done` does after such a failure — and
                // speculate again only after those.
                match e {
                    EnvError::FastRunAbandoned => {
                        self.careful_batches = CAREFUL_BATCHES_AFTER_ABANDON;
                    }
                    EnvError::PipelineAborted => self.pipeline = false,
                    _ => {}
                }
                self.abandon_open_transaction().await;
            }
        }
    }

    /// Settles the open speculation with `batch` (committed entries): the levels it starts
    /// with are kept — committed in PostgreSQL, or deferred while something runs on top of them
    /// and the batch holds nothing else — and their outcomes returned with the rest of the
    /// batch. What the log does not hold is rolled back (sequences restored): everything when
    /// the batch starts with something else, else what is above the levels kept.
    async fn settle_speculation<'b>(
        &mut self,
        batch: &'b [Entry],
    ) -> Result<(Vec<ApplyOutcome>, &'b [Entry]), EnvError> {
        let Some(mut spec) = self.speculation.take() else {
            return Ok((Vec::new(), batch));
        };
        let m = crate::metrics::get();
        let matched = batch
            .iter()
            .zip(&spec.levels[spec.deferred..])
            .take_while(|(e, l)| e.log_id == l.log_id)
            .count();
        let covered = spec.deferred + matched;
        let outcomes: Vec<ApplyOutcome> = spec.levels[spec.deferred..covered]
            .iter()
            .map(|l| l.outcome.clone())
            .collect();
        let rest = &batch[matched..];
        let on_top = self.txn.as_ref().is_some_and(|t| t.on_top());
        let above = spec.levels.len() - covered + usize::from(on_top);
        if covered == 0 {
            info!(node = self.node_id, speculated = ?spec.levels.iter().map(|l| l.log_id).collect::<Vec<_>>(),
                  committed = ?batch.first().map(|e| e.log_id),
                  "the committed log differs from the speculated entries; rolling them back");
            m.speculations.with_label_values(&["dropped"]).inc();
            self.abandon_open_transaction().await;
            self.drop_txn_on_top(txn::MOVED);
            return Ok((Vec::new(), batch));
        }
        if rest.is_empty() && above > 0 {
            // Something runs on top of what Raft committed: commit it in PostgreSQL later,
            // together (see `Speculation`).
            spec.deferred = covered;
            spec.deferred_since
                .get_or_insert_with(std::time::Instant::now);
            m.speculations
                .with_label_values(&["deferred"])
                .inc_by(matched as u64);
            self.speculation = Some(spec);
            return Ok((outcomes, rest));
        }
        if above > 0 {
            // The log holds other entries after the levels kept: what ran above them cannot
            // stay (uncommitted levels are applied from the log when committed).
            self.rollback_chain(above).await?;
            self.drop_txn_on_top(txn::MOVED);
            if spec.levels.len() > covered {
                m.speculations.with_label_values(&["dropped"]).inc();
            }
            spec.levels.truncate(covered);
        }
        self.commit_speculation(spec).await?;
        Ok((outcomes, rest))
    }

    /// Commits every level of `spec` in PostgreSQL (nothing runs on top any more).
    async fn commit_speculation(&mut self, spec: Speculation) -> Result<(), EnvError> {
        self.applier
            .as_mut()
            .ok_or(EnvError::NotConnected)?
            .commit()
            .await?;
        let top = spec.top().clone();
        self.committed(top.last, top.writes, top.membership);
        let m = crate::metrics::get();
        m.speculations.with_label_values(&["kept"]).inc();
        m.speculation_seconds
            .observe(spec.levels[0].since.elapsed().as_secs_f64());
        Ok(())
    }

    /// Rolls back `levels` nested `raftpg_chain` savepoints (what ran on top of a speculation's
    /// kept part) and puts the sequences back where what stays left them; drops the connection
    /// (and with it everything open) if that fails.
    async fn rollback_chain(&mut self, levels: usize) -> Result<(), EnvError> {
        let rolled = match self.applier.as_mut() {
            Some(a) => a.rollback_chain(levels, RESTORE_SEQUENCES_SQL).await,
            None => Err(EnvError::NotConnected),
        };
        if let Err(e) = &rolled {
            debug!(error = %e, "rolling back to a chain's savepoint failed; reconnecting");
            self.disconnect();
        }
        rolled
    }

    /// Ends what is open on the session when Raft did not do its part in time: uncommitted
    /// levels older than `wait_max` (this node may be cut off), or levels deferred longer than
    /// [`DEFER_MAX`] (what runs on top is taking long) once every level above them is committed
    /// by Raft too (the cut waits for that up to twice the bound: only a transaction directly
    /// on committed levels can run again). What Raft committed is committed in
    /// PostgreSQL; everything above it is rolled back — a transaction running directly on it
    /// runs again on the committed state (`rerun_txn`), any other ends with 40001.
    async fn expire_speculation(&mut self, wait_max: Duration) {
        let Some(spec) = &self.speculation else {
            return;
        };
        let stale = spec
            .levels
            .get(spec.deferred)
            .is_some_and(|l| l.since.elapsed() >= wait_max);
        let deferred_long = spec
            .deferred_since
            .is_some_and(|t| t.elapsed() >= DEFER_MAX);
        if !stale && !deferred_long {
            return;
        }
        let deferred_too_long = spec
            .deferred_since
            .is_some_and(|t| t.elapsed() >= 2 * DEFER_MAX);
        if !stale && !deferred_too_long && spec.uncommitted() > 0 {
            // Levels above the deferred ones still wait for Raft (at most `UNCOMMITTED_MAX`,
            // about one Raft commit each): cut once they are committed too, so that a
            // transaction running on top runs again rather than ends with 40001 — but not
            // later than twice the bound.
            return;
        }
        let Some(mut spec) = self.speculation.take() else {
            return;
        };
        let m = crate::metrics::get();
        if stale {
            info!(
                node = self.node_id,
                "speculation not committed in time; rolled back"
            );
            m.speculations.with_label_values(&["expired"]).inc();
        }
        if spec.deferred == 0 {
            self.abandon_open_transaction().await;
            self.drop_txn_on_top(
                "the transaction was rolled back: the entry before it was not committed in time; retry the transaction",
            );
            return;
        }
        let on_top = self.txn.as_ref().is_some_and(|t| t.on_top());
        let active_on_top = self
            .txn
            .as_ref()
            .is_some_and(|t| t.on_top() && t.proposed().is_none());
        let above = spec.uncommitted() + usize::from(on_top);
        let rerun = active_on_top && spec.uncommitted() == 0;
        if self.rollback_chain(above).await.is_err() {
            return;
        }
        if !rerun {
            self.drop_txn_on_top(
                "the transaction was rolled back: the entry before it was not committed in time; retry the transaction",
            );
        }
        spec.levels.truncate(spec.deferred);
        if let Err(e) = self.commit_speculation(spec).await {
            debug!(error = %e, "committing deferred entries failed; reconnecting");
            self.disconnect();
            return;
        }
        if rerun {
            self.rerun_txn().await;
        }
    }

    /// Commits the speculation's levels when all are deferred and nothing runs on top of them
    /// any more (the transaction on top ended).
    async fn commit_if_nothing_on_top(&mut self) {
        let alone = self
            .speculation
            .as_ref()
            .is_some_and(|s| s.deferred > 0 && s.uncommitted() == 0)
            && !self.txn.as_ref().is_some_and(|t| t.on_top());
        if !alone {
            return;
        }
        if let Some(spec) = self.speculation.take() {
            if let Err(e) = self.commit_speculation(spec).await {
                debug!(error = %e, "committing deferred entries failed; reconnecting");
                self.disconnect();
            }
        }
    }

    /// Rolls back the applier's open transaction and puts the sequences back where the last
    /// commit left them (they are not transactional); drops the connection if that fails
    /// (which aborts the transaction; `connect` restores the sequences).
    async fn abandon_open_transaction(&mut self) {
        let abandoned = match self.applier.as_mut() {
            Some(a) => a.abandon_transaction(RESTORE_SEQUENCES_SQL).await,
            None => Err(EnvError::NotConnected),
        };
        if let Err(e) = abandoned {
            debug!(error = %e, "rolling back failed; reconnecting");
            self.disconnect();
        }
    }

    /// Splits `batch` into the outcomes of its entries PostgreSQL committed before (a
    /// connection loss hid the answer) and the entries still to apply. Those are never applied
    /// again: their outcome is the recorded one when the request has an id (looked up as if
    /// numbered last: its own number is at most that).
    async fn split_applied_before<'b>(
        &self,
        batch: &'b [Entry],
    ) -> Result<(Vec<ApplyOutcome>, Vec<&'b Entry>), EnvError> {
        let applied_index = self.applied.map(|l| l.index);
        let retention = self.limits.request_retention_writes;
        let applier = self.applier.as_ref().ok_or(EnvError::NotConnected)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut fresh = Vec::with_capacity(batch.len());
        for e in batch {
            if applied_index.is_none_or(|a| e.log_id.index > a) {
                fresh.push(e);
                continue;
            }
            let index = self.applied_writes;
            outcomes.push(match &e.payload {
                EntryPayload::Normal(Command::Sql(cmd)) => {
                    applier
                        .outcome_applied_before(cmd, index, retention)
                        .await?
                }
                EntryPayload::Normal(Command::Batch(cmds)) => {
                    let mut each = Vec::with_capacity(cmds.len());
                    for cmd in cmds {
                        each.push(
                            applier
                                .outcome_applied_before(cmd, index, retention)
                                .await?,
                        );
                    }
                    ApplyOutcome::Batch(each)
                }
                EntryPayload::Normal(Command::Transaction(t)) => applier
                    .recorded_outcome(&t.request_id, index, retention)
                    .await?
                    .unwrap_or(ApplyOutcome::AppliedResultLost),
                _ => ApplyOutcome::Internal,
            });
        }
        Ok((outcomes, fresh))
    }

    /// Garbage-collects expired request records now and then, at a batch's start (the batch
    /// will number writes up to `writes`). Returns whether it did, which opened the batch
    /// transaction.
    async fn expire_requests(&mut self, writes: u64) -> Result<bool, EnvError> {
        if !request_log::expiry_due(self.applied_writes, writes) {
            return Ok(false);
        }
        let floor = request_log::retention_floor(writes, self.limits.request_retention_writes);
        let client = self
            .applier
            .as_ref()
            .ok_or(EnvError::NotConnected)?
            .client();
        client.batch_execute("BEGIN").await?;
        client.execute(request_log::EXPIRE_SQL, &[&floor]).await?;
        Ok(true)
    }

    /// Applies a batch's items in order inside its transaction (opened by the first round trip
    /// when `begin`): runs of writes that can share a round trip together (see
    /// `applier::Applier::apply_run`), every other item on its own. A membership entry updates
    /// `membership`. Returns one outcome per item and what is still to be sent.
    async fn apply_items(
        &mut self,
        items: &[Item<'_>],
        mut begin: bool,
        membership: &mut StoredMembership,
    ) -> Result<(Vec<ApplyOutcome>, Pending), EnvError> {
        let fast = self.pipeline && self.careful_batches == 0;
        let mut pending = Pending::default();
        let mut outcomes: Vec<ApplyOutcome> = Vec::with_capacity(items.len());
        while outcomes.len() < items.len() {
            let rest = &items[outcomes.len()..];
            let run = match (self.pipeline, self.applier.as_ref()) {
                (true, Some(applier)) => next_run(applier, rest),
                _ => Vec::new(),
            };
            let sent = std::mem::take(&mut pending);
            if run.len() > 1 || (fast && !run.is_empty()) {
                let (done, next) = self.apply_run(&run, fast, begin, sent).await?;
                outcomes.extend(done);
                pending = next;
            } else {
                let (outcome, next) = self.apply_item(rest[0], begin, sent, membership).await?;
                outcomes.push(outcome);
                pending = next;
            }
            begin = false;
        }
        Ok((outcomes, pending))
    }

    /// Applies a run of writes in one round trip: the fast way (`fast`), or with a savepoint
    /// per write.
    async fn apply_run(
        &mut self,
        run: &[RunWrite<'_>],
        fast: bool,
        begin: bool,
        pending: Pending,
    ) -> Result<(Vec<ApplyOutcome>, Pending), EnvError> {
        for (_, cmd, _) in run {
            self.clock.observe(cmd.leader_ts_micros);
        }
        let applier = self.applier.as_mut().ok_or(EnvError::NotConnected)?;
        if fast {
            applier
                .apply_run_fast(run, &self.limits, begin, pending)
                .await
        } else {
            applier.apply_run(run, &self.limits, begin, pending).await
        }
    }

    /// Applies one item on its own: a write with its savepoint, or a checksum, membership or
    /// blank entry (after sending what is pending). A membership entry updates `membership`.
    async fn apply_item(
        &mut self,
        item: Item<'_>,
        begin: bool,
        pending: Pending,
        membership: &mut StoredMembership,
    ) -> Result<(ApplyOutcome, Pending), EnvError> {
        let applier = self.applier.as_mut().ok_or(EnvError::NotConnected)?;
        let entry = match item {
            Item::Write(index, cmd) => {
                self.clock.observe(cmd.leader_ts_micros);
                return applier
                    .apply_write(index, cmd, &self.limits, begin, pending)
                    .await;
            }
            Item::Txn(write_no, txn, prev) => {
                self.clock.observe(txn.leader_ts_micros);
                let fast = self.pipeline && self.careful_batches == 0;
                return applier
                    .apply_transaction(write_no, txn, prev, &self.limits, begin, pending, fast)
                    .await;
            }
            Item::Other(entry) => entry,
        };
        if begin {
            applier.client().batch_execute("BEGIN").await?;
        }
        applier.flush(pending, None).await?;
        let outcome = match &entry.payload {
            EntryPayload::Normal(Command::Checksum) => {
                let sums = checksums::compute(applier.client()).await?;
                checksums::store(applier.client(), entry.log_id.index, &sums).await?;
                ApplyOutcome::Checksums(sums)
            }
            EntryPayload::Membership(m) => {
                *membership = StoredMembership::new(Some(entry.log_id), m.clone());
                ApplyOutcome::Internal
            }
            _ => ApplyOutcome::Internal,
        };
        Ok((outcome, Pending::default()))
    }

    /// Applies a batch, retrying environmental errors with backoff until it succeeds or the node
    /// shuts down (invariant 3: never skip, never record an environmental error).
    async fn apply_batch_until_done(
        &mut self,
        batch: &[Entry],
    ) -> std::io::Result<Vec<ApplyOutcome>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.apply_batch(batch).await {
                Ok(outcomes) => {
                    self.status.set("applying");
                    self.log_applied = batch.last().map(|e| e.log_id.index).or(self.log_applied);
                    self.pipeline = true;
                    self.careful_batches = self.careful_batches.saturating_sub(1);
                    return Ok(outcomes);
                }
                Err(e)
                    if matches!(e, EnvError::FastRunAbandoned)
                        || (matches!(e, EnvError::PipelineAborted) && self.pipeline) =>
                {
                    // Roll the whole batch back, put sequences back, and apply it again more
                    // carefully: with a savepoint per write after a fast run, entry by entry
                    // after a pipelined run.
                    let first_index = batch.first().map(|e| e.log_id.index).unwrap_or(0);
                    if matches!(e, EnvError::FastRunAbandoned) {
                        debug!(node = self.node_id, first_index, "{e}");
                        self.status
                            .fast_runs_abandoned
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.careful_batches = CAREFUL_BATCHES_AFTER_ABANDON;
                    } else {
                        info!(node = self.node_id, first_index, "{e}");
                        self.pipeline = false;
                    }
                    self.abandon_open_transaction().await;
                }
                Err(e) => {
                    // Drop the connection: its transaction (if any) is aborted by PostgreSQL, and
                    // the next attempt re-reads what is really applied.
                    self.disconnect();
                    let first = batch.first().map(|e| e.log_id.index).unwrap_or(0);
                    self.status.stuck(format!("retrying entry {first}: {e}"));
                    self.pause(&mut backoff).await?;
                }
            }
        }
    }
}

/// openraft's side of the state machine, delegating to the core (inherent methods of the
/// same names, below).
impl StateMachineCore {
    /// The applied state openraft starts from (it calls this first, before reading or purging
    /// the log): repairs an interrupted install, restores the current snapshot if the database
    /// is behind it, and from now on limits log purges to what the published snapshot covers
    /// (see `snapshot`, "Crash safety of an install").
    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        self.log.limit_purges(self.snapshots.purge_limit());
        let mut backoff = Duration::from_millis(50);
        while let Err(e) = self.snapshots.recover().await {
            self.status.stuck(format!(
                "waiting for PostgreSQL (checking for an interrupted snapshot install): {e}"
            ));
            self.pause(&mut backoff).await?;
        }
        self.connect_until_done().await?;
        loop {
            match self.snapshots.restore_if_ahead(self.applied).await {
                Ok(false) => break,
                Ok(true) => {
                    self.disconnect();
                    self.connect_until_done().await?;
                }
                Err(e) => {
                    self.disconnect();
                    self.status
                        .stuck(format!("restoring the current snapshot: {e}"));
                    self.pause(&mut backoff).await?;
                    self.connect_until_done().await?;
                }
            }
        }
        self.log_applied = self.applied.map(|l| l.index);
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> std::io::Result<Vec<ApplyOutcome>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut outcomes = Vec::with_capacity(entries.len());
        let m = crate::metrics::get();
        for batch in transactions(&entries, self.limits.batch_entries_max) {
            let started = std::time::Instant::now();
            outcomes.extend(self.apply_batch_until_done(batch).await?);
            m.apply_batch_entries.observe(batch.len() as f64);
            m.apply_batch_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(outcomes)
    }

    fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder(self.snapshots.clone())
    }

    async fn begin_receiving_snapshot(&mut self) -> std::io::Result<tokio::fs::File> {
        self.snapshots.begin_receiving().await
    }

    /// Replaces the database with the snapshot's. Environmental failures are retried (the old
    /// database stays in place until the swap); a corrupt snapshot stops the node. Any failure
    /// is reported to the purge limit, so that openraft's purge up to the snapshot (waiting for
    /// it to be published) fails instead of waiting forever.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: SnapshotFile,
    ) -> std::io::Result<()> {
        let meta = SnapMeta::of(meta, &snapshot.id);
        info!(id = %meta.snapshot_id, "received snapshot");
        let installed = self.install_received(&meta, snapshot.file, false).await;
        if installed.is_err() {
            self.snapshots.install_failed(meta.last_log_id);
        }
        installed
    }

    /// [`Self::install_snapshot`] without the failure report. `replace`: restore even if the
    /// database says it is at the snapshot's log id already (a rebuild replaces a copy that
    /// is at that position but differs).
    async fn install_received(
        &mut self,
        meta: &SnapMeta,
        snapshot: tokio::fs::File,
        replace: bool,
    ) -> std::io::Result<()> {
        // The database is replaced: statements prepared on the old one are not to be trusted.
        self.status.schema_changed();
        snapshot.sync_all().await?;
        drop(snapshot);
        // The applier's connection would block the swap; it reconnects to the new database.
        self.disconnect();
        let mut backoff = Duration::from_millis(200);
        loop {
            self.status
                .set(format!("installing snapshot {}", meta.snapshot_id));
            match self.snapshots.install(meta, replace).await {
                Ok(()) => break,
                Err(e @ (SnapshotError::Corrupt { .. } | SnapshotError::Stale { .. })) => {
                    return Err(std::io::Error::other(e.to_string()));
                }
                Err(e) => {
                    warn!(error = %e, id = %meta.snapshot_id, "installing the snapshot failed; retrying");
                    self.pause(&mut backoff).await?;
                }
            }
        }
        self.connect_until_done().await?;
        // Past the snapshot is fine: a rebuild (service::repair) may have installed a newer
        // one while openraft was sending this one; the entries in between are skipped.
        if self.applied < meta.last_log_id {
            return Err(std::io::Error::other(format!(
                "after install the database is at {:?}, not {:?}",
                self.applied, meta.last_log_id
            )));
        }
        self.log_applied = meta.last_log_id.map(|l| l.index);
        self.status.set("applying");
        Ok(())
    }

    /// Replays, right away, committed batches PostgreSQL lost in a crash (see `replay_lost`),
    /// instead of waiting for the next entry to arrive: until then, reads waiting for an index
    /// would find it missing. Does nothing while PostgreSQL holds everything applied.
    async fn replay_if_behind(&mut self) {
        let Some(target) = self.log_applied else {
            return;
        };
        if self.speculation.as_ref().is_some_and(|s| s.deferred > 0) {
            // Behind openraft on purpose: deferred entries are in the open transaction.
            return;
        }
        let connected = self.applier.as_ref().is_some_and(|a| !a.is_closed());
        if connected && self.applied.map(|l| l.index) >= Some(target) {
            return;
        }
        if let Err(e) = self.connect().await {
            self.status.stuck(format!("waiting for PostgreSQL: {e}"));
            return;
        }
        let before = self.applied.map(|l| l.index);
        match self.replay_lost(target + 1).await {
            Ok(()) => {
                if before != self.applied.map(|l| l.index) {
                    info!(node = self.node_id, from = ?before, to = target, "replayed the batches PostgreSQL lost");
                }
                self.status.set("applying");
            }
            Err(e) => {
                self.disconnect();
                self.status
                    .stuck(format!("replaying entries PostgreSQL lost: {e}"));
            }
        }
    }

    async fn get_current_snapshot(&mut self) -> std::io::Result<Option<Snapshot>> {
        self.snapshots.current().await
    }
}

/// The node's Raft handle: openraft driving [`PgStateMachine`]. (The `raft` module's tasks take
/// any state machine, so that they do not depend on this module.)
pub type Raft = openraft::Raft<TypeConfig, PgStateMachine>;

/// The PostgreSQL-backed state machine (one per node, owned by openraft). A background task
/// shares it to replay what PostgreSQL lost in a crash as soon as PostgreSQL is back.
pub struct PgStateMachine {
    core: Arc<tokio::sync::Mutex<StateMachineCore>>,
    /// This node's Raft log: applying waits for its entries to be durable here.
    log: LogStore,
    /// The core's [`StateMachineCore::changed`].
    changed: Arc<tokio::sync::Notify>,
    /// The core's [`StateMachineCore::cancel`].
    cancel: Arc<Mutex<Option<tokio_postgres::CancelToken>>>,
}

/// How often the replay task checks whether PostgreSQL lost applied batches.
const REPLAY_CHECK_EVERY: Duration = Duration::from_millis(200);

impl PgStateMachine {
    /// Creates the state machine (it connects lazily) and starts its replay task.
    pub fn new(p: StateMachineParts) -> Self {
        let shutdown = p.shutdown.clone();
        let (own, appended) = tokio::sync::mpsc::channel(SPECULATION_QUEUE);
        p.log.hand_own_appends(p.node_id, own);
        let wait_max = p.limits.speculation_wait_max;
        let log = p.log.clone();
        let core = StateMachineCore::new(p);
        let changed = core.changed.clone();
        let cancel = core.cancel.clone();
        let core = Arc::new(tokio::sync::Mutex::new(core));
        tokio::spawn(replay_when_postgres_returns(
            Arc::downgrade(&core),
            shutdown.clone(),
        ));
        tokio::spawn(speculate_own_appends(
            Arc::downgrade(&core),
            appended,
            shutdown,
            wait_max,
        ));
        PgStateMachine {
            core,
            log,
            changed,
            cancel,
        }
    }
}

/// A handle on the state machine for the one operation outside openraft: replacing a copy
/// that a check found different from the majority's with a donor's snapshot
/// (`service::repair`).
#[derive(Clone)]
pub struct Rebuilder {
    core: Arc<tokio::sync::Mutex<StateMachineCore>>,
}

impl PgStateMachine {
    /// The handle that runs interactive transactions on the applier session (leader only).
    pub fn txn_runner(&self) -> TxnRunner {
        TxnRunner {
            changed: self.changed.clone(),
            cancel: self.cancel.clone(),
            core: self.core.clone(),
        }
    }

    /// The handle that rebuilds this state machine from another member's snapshot.
    pub fn rebuilder(&self) -> Rebuilder {
        Rebuilder {
            core: self.core.clone(),
        }
    }
}

impl Rebuilder {
    /// Holds the state machine (openraft applies nothing meanwhile), asks `fetch` to write a
    /// snapshot covering at least this node's applied index into the receiving file, then
    /// installs it exactly as a snapshot sent by the leader is installed (verify, publish,
    /// restore into a fresh database, swap). Entries up to the snapshot's index that openraft
    /// hands over afterwards are skipped (they are in the database); later ones apply as usual.
    /// Returns the installed snapshot's metadata.
    pub async fn rebuild<F, Fut>(&self, fetch: F) -> Result<SnapMeta, String>
    where
        F: FnOnce(u64, tokio::fs::File) -> Fut,
        Fut: std::future::Future<Output = Result<(SnapMeta, tokio::fs::File), String>>,
    {
        let mut core = self.core.lock().await;
        core.connect()
            .await
            .map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
        let applied = core.applied.map(|l| l.index).unwrap_or(0);
        let file = core
            .begin_receiving_snapshot()
            .await
            .map_err(|e| e.to_string())?;
        let (meta, file) = fetch(applied, file).await?;
        let covered = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        if covered < applied {
            return Err(format!(
                "the donor's snapshot covers index {covered}, behind this node's {applied}"
            ));
        }
        info!(id = %meta.snapshot_id, applied, "rebuilding from a donor's snapshot");
        core.install_received(&meta, file, true)
            .await
            .map_err(|e| e.to_string())?;
        Ok(meta)
    }
}

/// Most appended entries waiting to be speculated (more are applied when committed).
const SPECULATION_QUEUE: usize = 64;

/// Runs until shutdown: executes the entries this node appends as leader while they replicate
/// ([`StateMachineCore::speculate`]), and rolls back a speculation Raft did not commit within
/// `wait_max`.
async fn speculate_own_appends(
    core: std::sync::Weak<tokio::sync::Mutex<StateMachineCore>>,
    mut appended: tokio::sync::mpsc::Receiver<Entry>,
    mut shutdown: watch::Receiver<bool>,
    wait_max: Duration,
) {
    let mut open_until: Option<tokio::time::Instant> = None;
    loop {
        let expire_at = open_until.unwrap_or_else(|| tokio::time::Instant::now() + wait_max);
        let entry = tokio::select! {
            e = appended.recv() => match e {
                Some(e) => Some(e),
                None => return,
            },
            _ = tokio::time::sleep_until(expire_at), if open_until.is_some() => None,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(core) = core.upgrade() else {
            return;
        };
        let mut core = core.lock().await;
        match entry {
            Some(entry) => core.speculate(entry).await,
            None => core.expire_speculation(wait_max).await,
        }
        core.changed.notify_waiters();
        // Applying may defer levels meanwhile (their bound is not known here yet): look again
        // at least every DEFER_MAX while a speculation is open.
        open_until = core.speculation.as_ref().and_then(|s| {
            let stale = s.levels.get(s.deferred).map(|l| l.since + wait_max);
            // (A cut past due waits for the levels above to commit: look again shortly.)
            let soon = std::time::Instant::now() + Duration::from_millis(1);
            let cut = s.deferred_since.map(|t| (t + DEFER_MAX).max(soon));
            let again = std::time::Instant::now() + DEFER_MAX;
            stale
                .into_iter()
                .chain(cut)
                .chain([again])
                .min()
                .map(tokio::time::Instant::from_std)
        });
    }
}

/// Runs until shutdown: whenever the state machine is idle, replays what PostgreSQL lost (see
/// [`StateMachineCore::replay_if_behind`]). Skips a round while openraft is using the state
/// machine (which replays on its own before applying anything).
async fn replay_when_postgres_returns(
    core: std::sync::Weak<tokio::sync::Mutex<StateMachineCore>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REPLAY_CHECK_EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Some(core) = core.upgrade() else {
            return;
        };
        let Ok(mut core) = core.try_lock() else {
            continue;
        };
        core.replay_if_behind().await;
    }
}

impl PgStateMachine {
    /// Applies committed entries in order once this node's log has them durable (see
    /// [`RaftStateMachine::apply`] below) and returns one outcome per entry.
    pub async fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
    ) -> std::io::Result<Vec<ApplyOutcome>> {
        if let Some(last) = entries.last() {
            self.log.durable(last.log_id.index).await?;
        }
        self.core.lock().await.apply(entries).await
    }
}

impl RaftStateMachine<TypeConfig> for PgStateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        self.core.lock().await.applied_state().await
    }

    /// Applies what openraft hands over, entry by entry answering each waiting proposer. Waits
    /// first until this node's own log has the entries durable: openraft 0.10 applies entries
    /// a majority committed even if they are only submitted to the local log, and PostgreSQL
    /// must never hold an entry this node's log could lose in a crash (after which openraft
    /// would purge its log up to the applied index, a gap nothing fills).
    async fn apply<Strm>(&mut self, mut entries: Strm) -> std::io::Result<()>
    where
        Strm: futures::Stream<Item = std::io::Result<EntryResponder<TypeConfig>>>
            + Unpin
            + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut responders = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            batch.push(entry);
            responders.push(responder);
        }
        let outcomes = self.apply_entries(batch).await?;
        for (outcome, responder) in outcomes.into_iter().zip(responders) {
            if let Some(r) = responder {
                r.send(outcome);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.core.lock().await.get_snapshot_builder()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: SnapshotFile,
    ) -> std::io::Result<()> {
        self.core
            .lock()
            .await
            .install_snapshot(meta, snapshot)
            .await
    }

    async fn get_current_snapshot(&mut self) -> std::io::Result<Option<Snapshot>> {
        self.core.lock().await.get_current_snapshot().await
    }
}

/// One unit of applying inside a batch transaction: a write (of a `Sql` entry, or one of the
/// writes of a `Batch` entry) with its write number (see `request_log`), or a whole entry of
/// another kind (checksum, membership, blank).
#[derive(Clone, Copy)]
enum Item<'a> {
    Write(u64, &'a WriteCommand),
    /// An interactive transaction, with its write number and the log id of the entry before it.
    Txn(u64, &'a TxnCommand, Option<LogId>),
    Other(&'a Entry),
}

/// Appends the items of `e` to `out`, in order, numbering its writes after `writes` (which it
/// advances). `prev` is the log id of the entry before `e`.
fn push_items<'a>(e: &'a Entry, prev: Option<LogId>, writes: &mut u64, out: &mut Vec<Item<'a>>) {
    let mut number = |cmd: &'a WriteCommand| {
        *writes += 1;
        Item::Write(*writes, cmd)
    };
    match &e.payload {
        EntryPayload::Normal(Command::Sql(cmd)) => out.push(number(cmd)),
        EntryPayload::Normal(Command::Batch(cmds)) => out.extend(cmds.iter().map(number)),
        EntryPayload::Normal(Command::Transaction(t)) => {
            *writes += 1;
            out.push(Item::Txn(*writes, t, prev));
        }
        _ => out.push(Item::Other(e)),
    }
}

/// The run of writes at the start of `items` that can share one round trip (see
/// `applier::Applier::apply_run`): consecutive writes, each pipelineable, no request id twice.
/// Empty if the first item is not such a write.
fn next_run<'a>(applier: &Applier, items: &[Item<'a>]) -> Vec<RunWrite<'a>> {
    let mut run: Vec<RunWrite<'a>> = Vec::new();
    for item in items {
        let Item::Write(index, cmd) = *item else {
            break;
        };
        let repeated = cmd.request_id.as_ref().is_some_and(|id| {
            run.iter()
                .any(|(_, c, _)| c.request_id.as_ref() == Some(id))
        });
        if repeated {
            break;
        }
        let Some(prepared) = applier.pipelineable(cmd) else {
            break;
        };
        run.push((index, cmd, prepared));
    }
    run
}

/// The applied position a batch records with its commit (invariant 1): its last log id, the
/// writes numbered up to it and the last membership.
fn batch_end(
    last: LogId,
    writes: u64,
    membership: &StoredMembership,
) -> Result<BatchEnd, EnvError> {
    let bookkeeping = |what: &'static str, detail: String| EnvError::Bookkeeping { what, detail };
    Ok(BatchEnd {
        log_index: i64::try_from(last.index)
            .map_err(|_| bookkeeping("the applied log index", "exceeds i64".into()))?,
        writes: i64::try_from(writes)
            .map_err(|_| bookkeeping("the applied write count", "exceeds i64".into()))?,
        log_id: serde_json::to_value(last)
            .map_err(|e| bookkeeping("the applied log id", e.to_string()))?,
        membership: serde_json::to_value(membership)
            .map_err(|e| bookkeeping("the applied membership", e.to_string()))?,
    })
}

/// One outcome per entry of `fresh` from the outcomes of its items: a batch entry's are its
/// writes', in order.
fn entry_outcomes(
    fresh: &[&Entry],
    item_outcomes: Vec<ApplyOutcome>,
) -> Result<Vec<ApplyOutcome>, EnvError> {
    let mut each = item_outcomes.into_iter();
    let mut outcomes = Vec::with_capacity(fresh.len());
    for e in fresh {
        outcomes.push(match &e.payload {
            EntryPayload::Normal(Command::Batch(cmds)) => {
                ApplyOutcome::Batch(each.by_ref().take(cmds.len()).collect())
            }
            _ => each
                .next()
                .ok_or(EnvError::Inconsistent("fewer outcomes than entries"))?,
        });
    }
    Ok(outcomes)
}

/// How many items an entry has.
fn item_count(e: &Entry) -> usize {
    match &e.payload {
        EntryPayload::Normal(Command::Batch(cmds)) => cmds.len(),
        _ => 1,
    }
}

/// Splits entries into the batches applied in one transaction each: at most `items_max` items
/// per transaction, but always at least one whole entry.
fn transactions(entries: &[Entry], items_max: usize) -> Vec<&[Entry]> {
    let mut out = Vec::new();
    let (mut start, mut items) = (0, 0);
    for (i, e) in entries.iter().enumerate() {
        let n = item_count(e);
        if i > start && items + n > items_max.max(1) {
            out.push(&entries[start..i]);
            (start, items) = (i, 0);
        }
        items += n;
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

/// Builds snapshots in openraft's background task (see `snapshot`).
pub struct SnapshotBuilder(SnapshotStore);

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> std::io::Result<Snapshot> {
        self.0.build().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommittedLeaderId;
    use openraft::vote::RaftLeaderId;
    use openraft::EntryPayload;

    fn entry(index: u64, writes: usize) -> Entry {
        let cmd = WriteCommand {
            statements: Vec::new(),
            leader_ts_micros: 0,
            seed: 0,
            request_id: None,
            user: None,
        };
        let payload = match writes {
            0 => EntryPayload::Blank,
            1 => EntryPayload::Normal(Command::Sql(cmd)),
            n => EntryPayload::Normal(Command::Batch(vec![cmd; n])),
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload,
        }
    }

    fn sizes(entries: &[Entry], max: usize) -> Vec<usize> {
        transactions(entries, max).iter().map(|t| t.len()).collect()
    }

    #[test]
    fn transactions_hold_at_most_max_writes_but_whole_entries() {
        let entries: Vec<Entry> = [1, 3, 0, 4, 2, 10, 1]
            .iter()
            .enumerate()
            .map(|(i, w)| entry(i as u64 + 1, *w))
            .collect();
        // Items: 1, 3, 1 (blank), 4, 2, 10, 1.
        assert_eq!(sizes(&entries, 5), vec![3, 1, 1, 1, 1]);
        assert_eq!(sizes(&entries, 1000), vec![7]);
        // An entry larger than the limit still goes, alone.
        assert_eq!(sizes(&entries[5..6], 4), vec![1]);
        assert_eq!(sizes(&[], 4), Vec::<usize>::new());
        let total: usize = sizes(&entries, 5).iter().sum();
        assert_eq!(total, entries.len());
    }

    #[test]
    fn writes_are_numbered_along_the_log() {
        let (batch, blank, single) = (entry(7, 3), entry(8, 0), entry(9, 1));
        let mut writes = 40;
        let mut items = Vec::new();
        for e in [&batch, &blank, &single] {
            push_items(e, None, &mut writes, &mut items);
        }
        let numbers: Vec<Option<u64>> = items
            .iter()
            .map(|i| match i {
                Item::Write(n, _) | Item::Txn(n, _, _) => Some(*n),
                Item::Other(_) => None,
            })
            .collect();
        assert_eq!(numbers, vec![Some(41), Some(42), Some(43), None, Some(44)]);
        assert_eq!(writes, 44);
    }
}
