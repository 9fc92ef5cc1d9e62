//! The real apply path, driven in-process against a real PostgreSQL: no mocks on the data
//! path.
//!
//! Each test starts a throwaway PostgreSQL with the node's own supervisor
//! (`pg::supervisor::EmbeddedPostgres`, in a temporary directory), opens a real RocksDB
//! `LogStore` next to it, and builds `apply::state_machine::PgStateMachine` exactly as
//! `server::start_raft` does. Entries are `openraft::Entry<TypeConfig>` whose SQL went through
//! the leader's rewrite (`sql::gate::prepare_write`), appended to the log store first (as
//! openraft does before committing; the state machine reads the log when PostgreSQL is behind
//! the first entry it is given) and handed to the state machine through openraft's
//! `RaftStateMachine` trait (`applied_state`, `apply`), as openraft would call it.
//!
//! What it proves (design.md invariants):
//!
//! - `outcomes_are_results` (invariant 3): in one entry of four writes, a unique violation
//!   (23505) and a deferred foreign key violated at the write's end (23503) become `Failed`
//!   outcomes with their SQLSTATE and statement index, the good writes `Applied` with their
//!   RETURNING rows; a deferred foreign key repaired inside its write passes; the table holds
//!   exactly the good writes' effects (a failed write's earlier statements are undone). Two
//!   rounds take different applier paths (seen in the debug log, not asserted): the batch
//!   entry's writes, once their statement is cached, go as a fast run, which the failures make
//!   the state machine abandon and re-apply with a savepoint per write; the same writes again as
//!   four separate entries, all cached, go as one pipelined run with savepoints. Same outcomes.
//! - `resumes_exactly_once` (invariant 1, exactly-once retries): after the state machine, its
//!   connection and the log store are dropped and reopened, `applied_state` reports the last
//!   applied log id and membership; an entry applied again is not applied twice (its recorded
//!   outcome, or `AppliedResultLost` without a request id), a new entry repeating a request id
//!   gets the original outcome (even a failure that would now succeed), and no sequence value
//!   was consumed by any of them.
//! - `same_entries_same_results` (invariant 2): the same entries — `now()`, `random()`,
//!   `gen_random_uuid()`, `CURRENT_TIMESTAMP`, `'now'::timestamptz`, column defaults calling
//!   them, a failing write that drew random values — applied to two state machines on two
//!   PostgreSQL servers, one in a single transaction and the other one entry per transaction,
//!   give identical outcomes, tables and sequences, and the times are the entries' timestamps.
//! - `writes_run_as_their_roles` (issue 16): writes of several roles in one batch entry run as
//!   their role (`DEFAULT current_user`) on the first-use path, as a fast run whose switches
//!   ride on the setup and the previous write's end (not abandoned: `ApplierStatus`), and on
//!   the careful path after a role without the privilege (42501) or a role that does not
//!   exist failed its write alone.
//!
//! Why in-process: a cluster test (`tests/`) sees only what the gRPC API returns, after
//! routing, retries and group commit have shaped it. Here the test chooses the exact entries,
//! their log indexes, timestamps, seeds and request ids, how they are grouped into `apply`
//! calls, and when the state machine is torn down — and checks what PostgreSQL holds directly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{RaftLogStorageExt, RaftStateMachine};
use openraft::vote::RaftLeaderId;
use openraft::{EntryPayload, Membership};
use raftpg_node::apply::snapshot::SnapshotStore;
use raftpg_node::apply::state_machine::{
    ApplierStatus, ApplyLimits, PgStateMachine, StateMachineParts,
};
use raftpg_node::command::CommittedLeaderId;
use raftpg_node::command::NodeAddr;
use raftpg_node::command::{
    ApplyOutcome, Command, Entry, LogId, RequestId, SqlFailure, SqlStatement, SqlValue,
    StatementOutcome, WriteCommand,
};
use raftpg_node::pg::supervisor::{EmbeddedPostgres, EmbeddedSettings, PgEndpoints, PgHealth};
use raftpg_node::raft::clock::EntryClock;
use raftpg_node::raft::log_store::LogStore;
use raftpg_node::sql::gate::prepare_write;
use tokio::sync::watch;

/// Longest wait for one `apply`/`applied_state` call: the state machine retries environmental
/// errors forever, which must end the test instead of hanging it.
const CALL_MAX: Duration = Duration::from_secs(20);

/// A running throwaway PostgreSQL (and the directory of its node). Dropping it stops the
/// server even if the test panicked (see `Drop`).
struct Pg {
    dir: tempfile::TempDir,
    endpoints: PgEndpoints,
    bin_dir: PathBuf,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Pg {
    /// initdb's (as the OS user `postgres`, the test runs as root) and starts PostgreSQL on a
    /// private Unix socket named by `port` (no TCP listener: ports cannot clash).
    async fn start(port: u16) -> Pg {
        let dir = tempfile::Builder::new()
            .prefix("raftpg-apply-")
            .tempdir()
            .expect("temporary directory");
        let pg = EmbeddedPostgres::new(EmbeddedSettings {
            node_data_dir: dir.path().to_path_buf(),
            bin_dir: None,
            os_user: "postgres".into(),
            port,
            shared_buffers: "16MB".into(),
        })
        .expect("PostgreSQL binaries and OS user");
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut me = Pg {
            endpoints: pg.endpoints(),
            bin_dir: pg.bin_dir().to_path_buf(),
            dir,
            shutdown,
            task: None,
        };
        tokio::task::block_in_place(|| pg.init_if_needed()).expect("initdb");
        let (health, _) = watch::channel(PgHealth::Starting);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        me.task = Some(tokio::spawn(pg.run(health, shutdown_rx, started_tx)));
        tokio::time::timeout(Duration::from_secs(60), started_rx)
            .await
            .expect("PostgreSQL start timed out")
            .expect("supervisor ended before starting")
            .expect("starting PostgreSQL");
        me
    }

    fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Opens (again) this node's Raft log, retrying while a previous handle's flusher thread
    /// still holds RocksDB's lock.
    async fn open_log(&self) -> LogStore {
        let path = self.dir.path().join("raft-log");
        for _ in 0..100 {
            if let Ok(log) = LogStore::open(&path) {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        LogStore::open(&path).expect("opening the log store")
    }

    /// A state machine over this PostgreSQL and `log`, built as `server::start_raft` builds it.
    fn state_machine(&self, log: &LogStore, limits: ApplyLimits) -> PgStateMachine {
        self.state_machine_reporting(log, limits, Arc::default())
    }

    /// [`Pg::state_machine`] reporting to `status`.
    fn state_machine_reporting(
        &self,
        log: &LogStore,
        limits: ApplyLimits,
        status: Arc<ApplierStatus>,
    ) -> PgStateMachine {
        let snapshots = SnapshotStore::open(
            self.dir.path().join("snapshots"),
            self.bin_dir.clone(),
            self.endpoints.applier.clone(),
            self.shutdown_rx(),
        )
        .expect("snapshot directory");
        PgStateMachine::new(StateMachineParts {
            node_id: 1,
            log: log.clone(),
            snapshots,
            conn_config: self.endpoints.applier.clone(),
            limits,
            status,
            clock: Arc::new(EntryClock::default()),
            shutdown: self.shutdown_rx(),
        })
    }

    /// The rows of a query, each as JSON text, read as the read-only reader role.
    async fn rows(&self, sql: &str) -> Vec<String> {
        let (client, conn) = self
            .endpoints
            .reader
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connecting as the reader");
        tokio::spawn(conn);
        let wrapped = format!("SELECT row_to_json(q)::text FROM ({sql}) q");
        client
            .query(&wrapped, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Stops PostgreSQL in order (fast shutdown) and waits for it.
    async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(40), task).await;
        }
    }
}

impl Drop for Pg {
    /// After a panic the runtime may be gone before the supervisor task could stop the server
    /// (its child is not killed on drop): stop the postmaster directly, fast then hard.
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        let pid_file = self.dir.path().join("postgres/data/postmaster.pid");
        let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        else {
            return;
        };
        for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGKILL] {
            // SAFETY: kill(2) with a pid read from this test's own postmaster.pid.
            if unsafe { libc::kill(pid, sig) } != 0 {
                return; // already gone
            }
            for _ in 0..100 {
                std::thread::sleep(Duration::from_millis(50));
                if gone(pid) {
                    return;
                }
            }
        }
    }
}

/// Whether the process is gone: reaped here if it is this process's exited child (the
/// supervisor task that would reap it may be gone), else checked with signal 0.
fn gone(pid: i32) -> bool {
    // SAFETY: waitpid with WNOHANG and no status pointer; kill with signal 0 sends nothing.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) == pid || libc::kill(pid, 0) != 0
    }
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// The first entry of a log, as `Raft::initialize` writes it: a one-voter membership.
fn membership_entry() -> Entry {
    let nodes = BTreeMap::from([(1u64, NodeAddr::peer_only("127.0.0.1:1"))]);
    Entry {
        log_id: log_id(0),
        payload: EntryPayload::Membership(
            Membership::new(vec![[1u64].into()], nodes).expect("a membership"),
        ),
    }
}

/// A write as the leader would propose it: every statement rewritten by the gate.
fn write(
    statements: &[(&str, Vec<SqlValue>)],
    ts: i64,
    seed: u64,
    request: Option<(&str, u64)>,
) -> WriteCommand {
    WriteCommand {
        statements: statements
            .iter()
            .map(|(sql, params)| SqlStatement {
                sql: prepare_write(sql).unwrap_or_else(|r| panic!("gate refused {sql}: {r}")),
                params: params.clone(),
            })
            .collect(),
        leader_ts_micros: ts,
        seed,
        request_id: request.map(|(c, s)| RequestId {
            client_id: c.into(),
            seq: s,
        }),
        user: None,
    }
}

fn sql_entry(index: u64, w: WriteCommand) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Sql(w)),
    }
}

fn batch_entry(index: u64, ws: Vec<WriteCommand>) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::Batch(ws)),
    }
}

/// Appends to the log (as openraft does before the entries can commit).
async fn append(log: &mut LogStore, entries: &[Entry]) {
    log.blocking_append(entries.to_vec())
        .await
        .expect("appending to the log store");
}

/// `RaftStateMachine::apply`, bounded in time.
async fn apply(sm: &mut PgStateMachine, entries: &[Entry]) -> Vec<ApplyOutcome> {
    let outcomes = tokio::time::timeout(CALL_MAX, sm.apply_entries(entries.to_vec()))
        .await
        .expect("apply did not finish (stuck retrying an environmental error?)")
        .expect("apply failed");
    assert_eq!(outcomes.len(), entries.len(), "one outcome per entry");
    outcomes
}

/// `RaftStateMachine::applied_state`, bounded in time: the applied log id.
async fn applied(
    sm: &mut PgStateMachine,
) -> (Option<LogId>, raftpg_node::command::StoredMembership) {
    tokio::time::timeout(CALL_MAX, sm.applied_state())
        .await
        .expect("applied_state did not finish")
        .expect("applied_state failed")
}

/// The RETURNING rows of each statement of an applied write (panics on any other outcome).
fn returned(o: &ApplyOutcome) -> Vec<Vec<Vec<SqlValue>>> {
    match o {
        ApplyOutcome::Applied(stmts) => stmts
            .iter()
            .map(|s: &StatementOutcome| s.rows.clone())
            .collect(),
        other => panic!("expected Applied, got {other:?}"),
    }
}

/// The failure of a failed write (panics on any other outcome).
fn failure(o: &ApplyOutcome) -> &SqlFailure {
    match o {
        ApplyOutcome::Failed(f) => f,
        other => panic!("expected Failed, got {other:?}"),
    }
}

fn int(v: i64) -> SqlValue {
    SqlValue::Int64(v)
}

fn text(v: &str) -> SqlValue {
    SqlValue::Text(v.into())
}

const INSERT_ITEM: &str =
    "INSERT INTO item (id, parent_id, note) VALUES ($1, $2, $3) RETURNING id, note";
const INSERT_PARENT: &str = "INSERT INTO parent (id) VALUES ($1)";

/// The four writes of a round (keys offset by `base`): good; unique violation in its second
/// statement; deferred foreign key violated at its end; good, with a deferred foreign key it
/// repairs itself.
fn round(base: i64, ts: i64) -> Vec<WriteCommand> {
    vec![
        write(
            &[(INSERT_ITEM, vec![int(base + 10), int(1), text("a")])],
            ts,
            1,
            None,
        ),
        write(
            &[
                (INSERT_ITEM, vec![int(base + 11), int(1), text("b-first")]),
                (INSERT_ITEM, vec![int(base + 10), int(1), text("b-dup")]),
            ],
            ts,
            1,
            None,
        ),
        write(
            &[
                (
                    INSERT_ITEM,
                    vec![int(base + 12), int(base + 99), text("c-orphan")],
                ),
                (INSERT_ITEM, vec![int(base + 13), int(1), text("c-second")]),
            ],
            ts,
            1,
            None,
        ),
        write(
            &[
                (INSERT_ITEM, vec![int(base + 14), int(base + 2), text("d")]),
                (INSERT_PARENT, vec![int(base + 2)]),
            ],
            ts,
            1,
            None,
        ),
    ]
}

/// Checks the four outcomes of a round (see [`round`]).
fn check_round(base: i64, outcomes: &[ApplyOutcome]) {
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    assert_eq!(
        returned(&outcomes[0]),
        vec![vec![vec![int(base + 10), text("a")]]]
    );
    let dup = failure(&outcomes[1]);
    assert_eq!(
        (dup.sqlstate.as_str(), dup.statement_index),
        ("23505", 1),
        "{dup:?}"
    );
    let fk = failure(&outcomes[2]);
    // Deferred: checked at the write's end, which is reported on its last statement.
    assert_eq!(
        (fk.sqlstate.as_str(), fk.statement_index),
        ("23503", 1),
        "{fk:?}"
    );
    assert_eq!(
        returned(&outcomes[3]),
        vec![vec![vec![int(base + 14), text("d")]], vec![]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_results() {
    let pg = Pg::start(25531).await;
    let mut log = pg.open_log().await;
    let mut sm = pg.state_machine(&log, ApplyLimits::default());
    assert_eq!(
        applied(&mut sm).await.0,
        None,
        "a new database has applied nothing"
    );

    let ts = 1_700_000_000_000_000;
    let ddl = write(
        &[
            ("CREATE TABLE parent (id int PRIMARY KEY)", vec![]),
            (
                "CREATE TABLE item (id int PRIMARY KEY, \
                 parent_id int REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED, note text)",
                vec![],
            ),
            (INSERT_PARENT, vec![int(1)]),
        ],
        ts,
        7,
        None,
    );
    // Round 1: one batch entry; its statements are prepared for the first time.
    let first = vec![
        membership_entry(),
        sql_entry(1, ddl),
        batch_entry(2, round(0, ts + 1)),
    ];
    append(&mut log, &first).await;
    let outcomes = apply(&mut sm, &first).await;
    assert_eq!(outcomes[0], ApplyOutcome::Internal);
    assert!(
        matches!(&outcomes[1], ApplyOutcome::Applied(s) if s.len() == 3),
        "{:?}",
        outcomes[1]
    );
    let ApplyOutcome::Batch(each) = &outcomes[2] else {
        panic!("a batch entry has a batch outcome: {:?}", outcomes[2]);
    };
    check_round(0, each);

    // Round 2: the same statements (now cached) as four separate entries, applied in one
    // transaction.
    let second: Vec<Entry> = round(100, ts + 2)
        .into_iter()
        .zip(3..)
        .map(|(w, i)| sql_entry(i, w))
        .collect();
    append(&mut log, &second).await;
    check_round(100, &apply(&mut sm, &second).await);

    // Exactly the good writes' effects: no statement of a failed write survived.
    assert_eq!(
        pg.rows("SELECT id, parent_id, note FROM item ORDER BY id")
            .await,
        vec![
            r#"{"id":10,"parent_id":1,"note":"a"}"#,
            r#"{"id":14,"parent_id":2,"note":"d"}"#,
            r#"{"id":110,"parent_id":1,"note":"a"}"#,
            r#"{"id":114,"parent_id":102,"note":"d"}"#,
        ]
    );
    assert_eq!(
        pg.rows("SELECT id FROM parent ORDER BY id").await,
        vec![r#"{"id":1}"#, r#"{"id":2}"#, r#"{"id":102}"#]
    );
    // The applied position committed with them.
    assert_eq!(
        pg.rows("SELECT log_index, writes FROM raftpg.applied")
            .await,
        vec![r#"{"log_index":6,"writes":9}"#]
    );
    assert_eq!(applied(&mut sm).await.0, Some(log_id(6)));
    drop(sm);
    pg.stop().await;
}

const INSERT_OP: &str = "INSERT INTO op (note) VALUES ($1) RETURNING k";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_exactly_once() {
    let pg = Pg::start(25532).await;
    let ts = 1_700_000_100_000_000;
    let op = |note: &str, i: i64, request: Option<(&str, u64)>| {
        write(
            &[(INSERT_OP, vec![text(note)])],
            ts + i,
            100 + i as u64,
            request,
        )
    };
    let entries = vec![
        membership_entry(),
        sql_entry(
            1,
            write(
                &[
                    (
                        "CREATE TABLE op (k serial PRIMARY KEY, note text UNIQUE)",
                        vec![],
                    ),
                    ("CREATE TABLE acct (id int PRIMARY KEY)", vec![]),
                    ("INSERT INTO acct VALUES (1)", vec![]),
                ],
                ts,
                1,
                None,
            ),
        ),
        sql_entry(2, op("one", 2, Some(("c1", 1)))),
        sql_entry(3, op("two", 3, Some(("c1", 2)))),
        // Fails (23505) and is recorded so.
        sql_entry(
            4,
            write(
                &[("INSERT INTO acct VALUES (1)", vec![])],
                ts + 4,
                104,
                Some(("c2", 1)),
            ),
        ),
        sql_entry(5, op("three", 5, None)),
    ];
    let before = {
        let mut log = pg.open_log().await;
        let mut sm = pg.state_machine(&log, ApplyLimits::default());
        assert_eq!(applied(&mut sm).await.0, None);
        append(&mut log, &entries).await;
        let outcomes = apply(&mut sm, &entries).await;
        assert_eq!(returned(&outcomes[2]), vec![vec![vec![int(1)]]]);
        assert_eq!(returned(&outcomes[3]), vec![vec![vec![int(2)]]]);
        assert_eq!(failure(&outcomes[4]).sqlstate, "23505");
        assert_eq!(returned(&outcomes[5]), vec![vec![vec![int(3)]]]);
        outcomes
        // The state machine (its connection and replay task) and the log store are dropped.
    };

    // A new state machine, as after a restart of the node, on the reopened log.
    let mut log = pg.open_log().await;
    let mut sm = pg.state_machine(&log, ApplyLimits::default());
    let (last, membership) = applied(&mut sm).await;
    assert_eq!(
        last,
        Some(log_id(5)),
        "resumes exactly after the last applied entry"
    );
    assert_eq!(membership.log_id(), &Some(log_id(0)));
    assert_eq!(
        membership.voter_ids().collect::<Vec<_>>(),
        vec![1],
        "the membership committed with the applied position"
    );

    // Entries already applied, handed over again (a commit whose acknowledgement was lost):
    // never applied twice. With a request id: the recorded outcome; without: effects in,
    // rows unknown.
    let again = apply(&mut sm, &entries[3..]).await;
    assert_eq!(again[0], before[3]);
    assert_eq!(again[1], before[4]);
    assert_eq!(again[2], ApplyOutcome::AppliedResultLost);

    // New entries repeating request ids (a client's retries, proposed again): the original
    // outcomes, even for the failed write, which would now succeed.
    let more = vec![
        sql_entry(6, write(&[("DELETE FROM acct", vec![])], ts + 6, 106, None)),
        sql_entry(7, op("one-retried", 7, Some(("c1", 1)))),
        sql_entry(
            8,
            write(
                &[("INSERT INTO acct VALUES (1)", vec![])],
                ts + 8,
                108,
                Some(("c2", 1)),
            ),
        ),
        sql_entry(9, op("four", 9, Some(("c1", 3)))),
    ];
    append(&mut log, &more).await;
    let outcomes = apply(&mut sm, &more).await;
    assert_eq!(
        outcomes[1], before[2],
        "a duplicate request gets its recorded outcome"
    );
    assert_eq!(
        outcomes[2], before[4],
        "a failed request stays failed when retried"
    );
    // No sequence value went to a duplicate or to an entry applied again.
    assert_eq!(returned(&outcomes[3]), vec![vec![vec![int(4)]]]);
    assert_eq!(
        pg.rows("SELECT k, note FROM op ORDER BY k").await,
        vec![
            r#"{"k":1,"note":"one"}"#,
            r#"{"k":2,"note":"two"}"#,
            r#"{"k":3,"note":"three"}"#,
            r#"{"k":4,"note":"four"}"#,
        ]
    );
    assert!(pg.rows("SELECT id FROM acct").await.is_empty());
    assert_eq!(applied(&mut sm).await.0, Some(log_id(9)));
    drop(sm);
    drop(log);
    pg.stop().await;
}

const INSERT_DEFAULTS: &str = "INSERT INTO ev (id, note) VALUES ($1, $2) RETURNING k, at, r, u, d";
const INSERT_CALLS: &str = "INSERT INTO ev (id, at, r, u, note) \
     VALUES ($1, now(), random(), gen_random_uuid(), 'calls') RETURNING k, at, r, u";
const INSERT_KEYWORDS: &str = "INSERT INTO ev (id, at, d, note) \
     VALUES ($1, CURRENT_TIMESTAMP, CURRENT_DATE, 'keywords') RETURNING k, at, d";
const INSERT_LITERAL: &str =
    "INSERT INTO ev (id, at, note) VALUES ($1, 'now'::timestamptz, 'literal') RETURNING at";
const TOUCH: &str = "UPDATE ev SET at = now() - interval '1 hour', note = note || '+' \
     WHERE id = $1 RETURNING at";

/// The entries of the determinism test (after the membership entry): DDL with defaults calling
/// time and randomness, then writes calling them, one batch entry with a failing write that
/// drew random values between two that draw after it.
fn nondeterministic_entries(ts: i64) -> Vec<Entry> {
    let w = |stmts: &[(&str, Vec<SqlValue>)], i: i64| {
        write(stmts, ts + i * 1000, 9000 + i as u64, None)
    };
    let ddl = w(
        &[(
            "CREATE TABLE ev (id int PRIMARY KEY, k bigserial, \
             at timestamptz NOT NULL DEFAULT now(), r float8 NOT NULL DEFAULT random(), \
             u uuid NOT NULL DEFAULT gen_random_uuid(), d date DEFAULT current_date, note text)",
            vec![],
        )],
        1,
    );
    vec![
        sql_entry(1, ddl),
        sql_entry(
            2,
            w(&[(INSERT_DEFAULTS, vec![int(1), text("defaults")])], 2),
        ),
        sql_entry(3, w(&[(INSERT_CALLS, vec![int(2)])], 3)),
        sql_entry(4, w(&[(INSERT_KEYWORDS, vec![int(3)])], 4)),
        sql_entry(5, w(&[(INSERT_LITERAL, vec![int(4)])], 5)),
        batch_entry(
            6,
            vec![
                w(&[(INSERT_DEFAULTS, vec![int(5), text("batch-1")])], 6),
                // Draws, then fails (id 1 exists): its draws must be undone with it.
                w(&[(INSERT_CALLS, vec![int(1)])], 6),
                w(&[(INSERT_CALLS, vec![int(6)])], 6),
            ],
        ),
        sql_entry(7, w(&[(TOUCH, vec![int(2)])], 7)),
        sql_entry(
            8,
            w(&[(INSERT_DEFAULTS, vec![int(7), text("same-sql")])], 8),
        ),
        sql_entry(9, w(&[(INSERT_CALLS, vec![int(8)])], 9)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_entries_same_results() {
    let (a, b) = tokio::join!(Pg::start(25533), Pg::start(25534));
    let ts = 1_700_000_200_000_000;
    let mut entries = vec![membership_entry()];
    entries.extend(nondeterministic_entries(ts));

    // Node A: everything in one apply call (one transaction).
    let mut log_a = a.open_log().await;
    let mut sm_a = a.state_machine(&log_a, ApplyLimits::default());
    applied(&mut sm_a).await;
    append(&mut log_a, &entries).await;
    let outcomes_a = apply(&mut sm_a, &entries).await;

    // Node B: one entry per transaction, one apply call per entry, a few milliseconds apart.
    let mut log_b = b.open_log().await;
    let one_per_batch = ApplyLimits {
        batch_entries_max: 1,
        ..ApplyLimits::default()
    };
    let mut sm_b = b.state_machine(&log_b, one_per_batch);
    applied(&mut sm_b).await;
    append(&mut log_b, &entries).await;
    let mut outcomes_b = Vec::new();
    for e in &entries {
        tokio::time::sleep(Duration::from_millis(20)).await;
        outcomes_b.extend(apply(&mut sm_b, std::slice::from_ref(e)).await);
    }

    assert_eq!(
        outcomes_a, outcomes_b,
        "the same entries give the same outcomes"
    );
    let dump = "SELECT id, k, at, r, u, d, note FROM ev ORDER BY id";
    let rows_a = a.rows(dump).await;
    assert_eq!(
        rows_a,
        b.rows(dump).await,
        "the same entries give the same tables"
    );
    let seq = "SELECT last_value, is_called FROM ev_k_seq";
    assert_eq!(a.rows(seq).await, b.rows(seq).await);

    // ...and not trivially: times are the entries', draws differ, one write failed.
    let entry_ts = |i: i64| SqlValue::TimestamptzMicros(ts + i * 1000);
    let first = returned(&outcomes_a[2]);
    assert_eq!(
        first[0][0][1],
        entry_ts(2),
        "a DEFAULT now() is the entry's time"
    );
    assert_eq!(returned(&outcomes_a[3])[0][0][1], entry_ts(3));
    assert_eq!(returned(&outcomes_a[4])[0][0][1], entry_ts(4));
    assert_eq!(
        returned(&outcomes_a[5])[0][0][0],
        entry_ts(5),
        "'now' is the entry's time"
    );
    let ApplyOutcome::Batch(batch) = &outcomes_a[6] else {
        panic!("batch outcome expected: {:?}", outcomes_a[6]);
    };
    assert_eq!(failure(&batch[1]).sqlstate, "23505");
    let draws: Vec<SqlValue> = [
        &outcomes_a[2],
        &outcomes_a[3],
        &batch[0],
        &batch[2],
        &outcomes_a[8],
        &outcomes_a[9],
    ]
    .iter()
    .map(|o| returned(o)[0][0][2].clone())
    .collect();
    for (i, x) in draws.iter().enumerate() {
        assert!(
            matches!(x, SqlValue::Float64(f) if (0.0..1.0).contains(f)),
            "{x:?}"
        );
        assert!(
            !draws[..i].contains(x),
            "random() repeated a value: {draws:?}"
        );
    }
    assert_eq!(rows_a.len(), 8, "{rows_a:#?}");
    drop((sm_a, sm_b, log_a, log_b));
    tokio::join!(a.stop(), b.stop());
}

/// A write as the leader proposes it for an authenticated `user`.
fn write_as(user: Option<&str>, id: i64, ts: i64) -> WriteCommand {
    WriteCommand {
        user: user.map(str::to_string),
        ..write(
            &[(
                "INSERT INTO who (id) VALUES ($1) RETURNING id, by",
                vec![int(id)],
            )],
            ts,
            3,
            None,
        )
    }
}

/// The writes of a roles round (keys offset by `base`, all in one batch entry, so that after
/// the first round they go as a fast run in which every write's switch to its role rides on
/// the setup or on the previous write's end): alice, bob, raftpg itself, alice again, then
/// carol (no INSERT privilege: 42501) and dave (no such role: the switch fails) when `failing`.
fn roles_round(base: i64, ts: i64, failing: bool) -> Vec<WriteCommand> {
    let mut ws = vec![
        write_as(Some("alice"), base + 1, ts),
        write_as(Some("bob"), base + 2, ts),
        write_as(None, base + 3, ts),
        write_as(Some("alice"), base + 4, ts),
    ];
    if failing {
        ws.insert(2, write_as(Some("carol"), base + 5, ts));
        ws.push(write_as(Some("dave"), base + 6, ts));
        ws.push(write_as(Some("bob"), base + 7, ts));
    }
    ws
}

/// Writes run as their roles whichever path applies them: the `by` column (DEFAULT
/// current_user) names each write's role; a role without the privilege fails with 42501 and a
/// role that does not exist fails its write alone, on the careful path the fast run falls back
/// to; the session is raftpg's again after every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_run_as_their_roles() {
    let pg = Pg::start(25535).await;
    let mut log = pg.open_log().await;
    let status = Arc::new(ApplierStatus::default());
    let mut sm = pg.state_machine_reporting(&log, ApplyLimits::default(), status.clone());
    let ts = 1_700_000_000_000_000;
    let ddl = write(
        &[
            ("CREATE ROLE alice NOLOGIN", vec![]),
            ("CREATE ROLE bob NOLOGIN", vec![]),
            ("CREATE ROLE carol NOLOGIN", vec![]),
            (
                "CREATE TABLE who (id int PRIMARY KEY, by text NOT NULL DEFAULT current_user)",
                vec![],
            ),
            ("GRANT INSERT, SELECT ON who TO alice, bob", vec![]),
        ],
        ts,
        7,
        None,
    );
    let mut entries = vec![membership_entry(), sql_entry(1, ddl)];
    // Rounds: first use (statements prepared), then cached (fast runs): without failures, then
    // with (a failed fast run makes the next batches careful).
    for (i, (base, failing)) in [(0, false), (100, false), (200, true), (300, true)]
        .into_iter()
        .enumerate()
    {
        let index = 2 + i as u64;
        entries.push(batch_entry(
            index,
            roles_round(base, ts + index as i64, failing),
        ));
    }
    append(&mut log, &entries).await;
    let outcomes = apply(&mut sm, &entries[..2]).await;
    assert!(
        matches!(&outcomes[1], ApplyOutcome::Applied(_)),
        "{outcomes:?}"
    );
    // One apply call per round until the fast run without failures, which must not have
    // been abandoned (its switches to roles rode on the setup and on the writes' ends); then
    // both failing rounds in one call (one transaction).
    let mut each = Vec::new();
    for e in &entries[2..4] {
        each.extend(apply(&mut sm, std::slice::from_ref(e)).await);
    }
    assert_eq!(status.fast_runs_abandoned(), 0);
    each.extend(apply(&mut sm, &entries[4..]).await);
    assert_eq!(
        status.fast_runs_abandoned(),
        1,
        "the failing round was a fast run"
    );
    for (round, o) in each.iter().enumerate() {
        let base = 100 * round as i64;
        let ApplyOutcome::Batch(ws) = o else {
            panic!("round {round}: {o:?}");
        };
        let ran_as = |w: &ApplyOutcome, id: i64, by: &str| {
            assert_eq!(
                returned(w),
                vec![vec![vec![int(base + id), text(by)]]],
                "round {round}"
            );
        };
        if round >= 2 {
            assert_eq!(ws.len(), 7, "round {round}: {ws:?}");
            ran_as(&ws[0], 1, "alice");
            ran_as(&ws[1], 2, "bob");
            assert_eq!(failure(&ws[2]).sqlstate, "42501", "round {round}: {ws:?}");
            ran_as(&ws[3], 3, "raftpg");
            ran_as(&ws[4], 4, "alice");
            let missing = failure(&ws[5]);
            assert!(
                missing.message.contains("dave"),
                "round {round}: {missing:?}"
            );
            ran_as(&ws[6], 7, "bob");
        } else {
            assert_eq!(ws.len(), 4, "round {round}: {ws:?}");
            ran_as(&ws[0], 1, "alice");
            ran_as(&ws[1], 2, "bob");
            ran_as(&ws[2], 3, "raftpg");
            ran_as(&ws[3], 4, "alice");
        }
    }
    assert_eq!(
        pg.rows(
            "SELECT count(*) AS n, count(*) FILTER (WHERE id % 100 IN (5, 6)) AS failed FROM who"
        )
        .await,
        vec![r#"{"n":18,"failed":0}"#]
    );
    drop(sm);
    pg.stop().await;
}
