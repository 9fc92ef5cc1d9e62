//! A wedge and divergence detector fed with SQL nobody on the project wrote (issue 14).
//!
//! A cluster gets a realistic schema through raftpg writes (tests/sqlsmith/schema.sql: serials,
//! identity columns, deferred and immediate foreign keys, plpgsql triggers, time/random/uuid
//! defaults, enums, arrays, jsonb, a few rows everywhere). sqlsmith then learns that schema from
//! a copy of node 1's (`pg_dump --schema-only`, a read; `--dry-run`, fixed seed) and prints
//! statements; every one is sent through raftpg as a write. Each outcome is counted by class:
//! accepted, refused before the log (the SQL gate) with its SQLSTATE, SQL error after the log
//! with its SQLSTATE, or no answer within the bound. Every [`CANARY_EVERY`] statements a canary insert must commit
//! within [`CANARY_BOUND`]; if it does not, the apply loop is stuck (or a generated statement
//! runs longer than the bound) and the test fails naming the statements sent since the last
//! canary. Periodically and at the end `raftpg check` must find identical copies, every node's
//! PostgreSQL read directly must agree, and every applier must be `applying`.
//!
//! The short run (2,000 statements, a follower frozen for 200 of them) is a normal test; the
//! long one (50,000 statements, followers frozen every 2,000, the leader's PostgreSQL SIGKILLed
//! and a follower node SIGKILLed and restarted) is `#[ignore]`d. See docs/sqlsmith.md (figures,
//! findings, environment variables to change the seed or count, replay one statement, skip
//! known findings).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use raftpg_client::local_cluster::metrics_addr_of;
use raftpg_client::v1::{ExecuteResponse, Statement};
use raftpg_client::{Client, ClientConfig, ClientError};
use testkit::{http_get, metric, start_cluster, values, StandalonePostgres, TestCluster};

/// Schema and data, statements separated by lines holding only `;;`.
const SCHEMA: &str = include_str!("../sqlsmith/schema.sql");
/// A canary write after this many generated statements.
const CANARY_EVERY: usize = 10;
/// How long a canary (and a generated statement) may take before it counts as a wedge.
const CANARY_BOUND: Duration = Duration::from_secs(20);
/// The canary table; created after sqlsmith learned the schema, so no generated statement
/// touches it.
const CANARY_DDL: &str =
    "CREATE TABLE sqlsmith_canary (id bigserial PRIMARY KEY, n bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())";

/// What one run does.
struct RunSpec {
    name: &'static str,
    net: u8,
    seed: u64,
    statements: usize,
    /// `raftpg check` every this many statements (localizes a divergence).
    check_every: usize,
    /// Kill the leader's PostgreSQL (SIGKILL) at 1/3 of the run and SIGKILL + restart a
    /// follower node at 2/3.
    faults: bool,
    /// Every this many statements (0: never), freeze a follower node (SIGSTOP) for
    /// [`PAUSE_LEN`] statements: it then catches up applying many entries per PostgreSQL
    /// transaction, which is where batch-dependent effects show.
    pause_every: usize,
}

/// How many statements a paused follower misses.
const PAUSE_LEN: usize = 200;

/// A follower node frozen with SIGSTOP; resumed (SIGCONT) when dropped, also when the test
/// fails, so that the cluster can be shut down.
struct Paused {
    id: u64,
    pid: i32,
}

impl Paused {
    /// Freezes a follower other than node 1 (sqlsmith and the direct comparisons read node 1).
    async fn follower(tc: &TestCluster) -> Paused {
        let leader = tc.client.wait_for_leader(CANARY_BOUND).await.unwrap();
        let id = (2..=3u64).rev().find(|id| *id != leader).unwrap();
        let pid = tc.cluster.node(id).pid().expect("node running") as i32;
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Paused { id, pid }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

/// Overrides from the environment (see docs/sqlsmith.md).
fn env_override(spec: &mut RunSpec) {
    if let Ok(s) = std::env::var("RAFTPG_SQLSMITH_SEED") {
        spec.seed = s.parse().expect("RAFTPG_SQLSMITH_SEED is a number");
    }
    if let Ok(s) = std::env::var("RAFTPG_SQLSMITH_STATEMENTS") {
        spec.statements = s.parse().expect("RAFTPG_SQLSMITH_STATEMENTS is a number");
    }
    if let Ok(s) = std::env::var("RAFTPG_SQLSMITH_CHECK_EVERY") {
        spec.check_every = s.parse().expect("RAFTPG_SQLSMITH_CHECK_EVERY is a number");
    }
}

/// Statement numbers (1-based, in the generated stream) to leave out: lets an investigation get
/// past a known wedge to the next finding. Comma-separated.
fn skipped() -> Vec<usize> {
    std::env::var("RAFTPG_SQLSMITH_SKIP")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("RAFTPG_SQLSMITH_SKIP: numbers"))
        .collect()
}

/// The statements of schema.sql, or of the file RAFTPG_SQLSMITH_SCHEMA names (same format).
fn schema_statements() -> Vec<String> {
    let text = match std::env::var("RAFTPG_SQLSMITH_SCHEMA") {
        Ok(path) => std::fs::read_to_string(&path).expect("RAFTPG_SQLSMITH_SCHEMA is readable"),
        Err(_) => SCHEMA.to_string(),
    };
    let mut stmts = split_schema(&text);
    if std::env::var("RAFTPG_SQLSMITH_IMMEDIATE").is_ok_and(|v| v == "1") {
        // Workaround mode while deferred constraints are applied at the end of a node's
        // PostgreSQL transaction instead of each write's: every constraint immediate.
        stmts.retain(|s| !s.starts_with("CREATE CONSTRAINT TRIGGER"));
        for s in &mut stmts {
            *s = s.replace(" DEFERRABLE INITIALLY DEFERRED", "");
        }
    }
    stmts
}

fn split_schema(text: &str) -> Vec<String> {
    text.split("\n;;\n")
        .map(|chunk| {
            chunk
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Splits sqlsmith's dry-run output: it prints each statement followed by `;` and a newline.
fn split_statements(out: &str) -> Vec<String> {
    out.split(";\n")
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Runs sqlsmith in dry-run mode (it only reads the catalog of `target`, a libpq connection
/// string) and returns the statements it printed.
async fn sqlsmith(target: &str, seed: u64, count: usize) -> Vec<String> {
    let run = tokio::process::Command::new("sqlsmith")
        .arg(format!("--target={target}"))
        .arg(format!("--seed={seed}"))
        .arg("--dry-run")
        .arg("--exclude-catalog")
        .arg(format!("--max-queries={count}"))
        .kill_on_drop(true)
        .output();
    // sqlsmith loops forever when it finds no table to use.
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("sqlsmith printed its statements within 300 s")
        .unwrap_or_else(|e| {
            panic!("cannot run sqlsmith ({e}): install it with scripts/install-deps.sh or apt-get install sqlsmith")
        });
    assert!(
        out.status.success(),
        "sqlsmith failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stmts = split_statements(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        stmts.len(),
        count,
        "sqlsmith printed {} statements",
        stmts.len()
    );
    stmts
}

/// Generates statements from node `id`'s schema. By default sqlsmith reads a copy of that
/// schema without raftpg's own schema `raftpg` (bookkeeping tables, deterministic functions):
/// the node's schema is dumped (`pg_dump --schema-only`, read only) and restored into a scratch
/// PostgreSQL. Otherwise about three statements in four name a bookkeeping table somewhere and
/// are refused by the gate before the log, which leaves the apply path nearly idle. With
/// RAFTPG_SQLSMITH_DIRECT=1 sqlsmith reads node `id`'s PostgreSQL itself.
async fn generate(tc: &TestCluster, id: u64, seed: u64, count: usize) -> Vec<String> {
    let socket = tc.cluster.node(id).pg_socket_dir();
    if std::env::var("RAFTPG_SQLSMITH_DIRECT").is_ok_and(|v| v == "1") {
        let target = format!(
            "host={} port=5432 user=raftpg dbname=raftpg",
            socket.display()
        );
        return sqlsmith(&target, seed, count).await;
    }
    let bin = raftpg_client::local_cluster::postgres_bin_dir().expect("PostgreSQL binaries");
    let dump = std::process::Command::new(bin.join("pg_dump"))
        .args(["-h", &socket.display().to_string(), "-p", "5432"])
        .args(["-U", "raftpg", "-d", "raftpg"])
        .args(["--schema-only", "--no-owner", "--no-privileges"])
        .args(["--exclude-table", "raftpg.*"])
        .output()
        .expect("pg_dump runs");
    assert!(
        dump.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(
        String::from_utf8_lossy(&dump.stdout).contains("CREATE TABLE public."),
        "node {id}'s schema dump has no table of the schema"
    );
    let dir = tc.cluster.data_dir().join("sqlsmith-schema");
    let scratch = StandalonePostgres::start(&dir, &[]).expect("scratch PostgreSQL");
    let file = tc.cluster.data_dir().join("sqlsmith-schema.sql");
    std::fs::write(&file, &dump.stdout).unwrap();
    let restore = std::process::Command::new(bin.join("psql"))
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-X",
            "-d",
            &scratch.url(),
            "-f",
        ])
        .arg(&file)
        // raftpg's own functions go too: the stream then depends only on the user schema,
        // PostgreSQL and sqlsmith, not on raftpg's version (column defaults calling them are
        // dropped with them; sqlsmith does not read defaults).
        .args(["-c", "DROP SCHEMA raftpg CASCADE"])
        .output()
        .expect("psql runs");
    assert!(
        restore.status.success(),
        "restoring the schema copy failed: {}",
        String::from_utf8_lossy(&restore.stderr)
    );
    let stmts = sqlsmith(&scratch.url(), seed, count).await;
    drop(scratch);
    stmts
}

/// The statements to send: from a file when RAFTPG_SQLSMITH_FILE names one (sqlsmith's format:
/// statements ending with `;` and a newline), else generated.
async fn statements(tc: &TestCluster, spec: &RunSpec) -> Vec<String> {
    if let Ok(path) = std::env::var("RAFTPG_SQLSMITH_FILE") {
        let text = std::fs::read_to_string(&path).expect("RAFTPG_SQLSMITH_FILE is readable");
        return split_statements(&text);
    }
    generate(tc, 1, spec.seed, spec.statements).await
}

/// FNV-1a over the statements: the same seed and schema must give the same stream.
fn fingerprint(stmts: &[String]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for s in stmts {
        for b in s.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Outcome class of one write.
fn classify(r: &Result<ExecuteResponse, ClientError>) -> (String, String) {
    match r {
        Ok(_) => ("accepted".into(), String::new()),
        Err(e) => {
            let logged = e
                .status()
                .map(|s| s.metadata().get(raftpg_proto::LOG_INDEX_METADATA).is_some())
                .unwrap_or(false);
            let msg = e
                .status()
                .map(|s| s.message().to_string())
                .unwrap_or_else(|| e.to_string());
            let class = match e.sqlstate() {
                Some(st) if logged => format!("sql error {st}"),
                Some(st) => format!("refused {st}"),
                None => format!("no answer ({:?})", e.code()),
            };
            (class, msg)
        }
    }
}

/// Counts per outcome class, and per class the most frequent messages.
#[derive(Default)]
struct Tally {
    classes: BTreeMap<String, usize>,
    reasons: BTreeMap<(String, String), usize>,
    /// The first statement number of each class.
    first: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, n: usize, class: &str, msg: &str) {
        *self.classes.entry(class.to_string()).or_default() += 1;
        self.first.entry(class.to_string()).or_insert(n);
        if !msg.is_empty() {
            // Refusal reasons start with "statement 0: "; keep the gist of the message.
            let gist: String = msg
                .trim_start_matches("statement 0: ")
                .chars()
                .take(70)
                .collect();
            *self.reasons.entry((class.to_string(), gist)).or_default() += 1;
        }
    }

    fn report(&self) -> String {
        let mut s = String::new();
        let total: usize = self.classes.values().sum();
        let _ = writeln!(s, "{total} statements by outcome:");
        for (class, n) in &self.classes {
            let _ = writeln!(
                s,
                "  {n:>6}  {class} (first: statement {})",
                self.first[class]
            );
        }
        let mut reasons: Vec<_> = self.reasons.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let _ = writeln!(s, "most frequent messages:");
        for ((class, gist), n) in reasons.iter().take(25) {
            let _ = writeln!(s, "  {n:>6}  [{class}] {gist}");
        }
        s
    }
}

/// One line per node: role, applied/committed index, applier state.
async fn statuses(tc: &TestCluster) -> String {
    let mut s = String::new();
    for (i, st) in tc.client.status_all().await.into_iter().enumerate() {
        match st {
            Ok(st) => {
                let _ = writeln!(
                    s,
                    "  node {}: {} applied {} committed {} postgres_up {} applier: {}",
                    i + 1,
                    st.role,
                    st.applied_index,
                    st.committed_index,
                    st.postgres_up,
                    st.applier_state
                );
            }
            Err(e) => {
                let _ = writeln!(s, "  node {}: no status: {e}", i + 1);
            }
        }
    }
    s
}

/// Every node answers `status` with its applier `applying` (not `retrying ...`).
async fn appliers_applying(tc: &TestCluster) -> bool {
    tc.client
        .status_all()
        .await
        .iter()
        .all(|s| matches!(s, Ok(st) if st.applier_state == "applying"))
}

/// Writes `stmts` (numbered, with their outcome) to `path` for the failure report.
fn dump(path: &Path, stmts: &[(usize, &str, String)]) {
    let mut out = String::new();
    for (n, sql, class) in stmts {
        let _ = writeln!(out, "-- statement {n}: {class}\n{sql};");
    }
    let _ = std::fs::write(path, out);
}

/// Waits up to `bound` for the canary insert number `n` to commit.
async fn canary(client: &Client, n: usize, bound: Duration) -> Result<(), String> {
    match tokio::time::timeout(
        bound,
        client.execute_one(
            "INSERT INTO sqlsmith_canary (n) VALUES ($1)",
            vec![values::int(n as i64)],
        ),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("canary {n} failed: {e}")),
        Err(_) => Err(format!(
            "canary {n} did not commit within {} s",
            bound.as_secs()
        )),
    }
}

/// After a canary failed: does the applier still move (a slow statement) or not (a wedge)?
async fn diagnose(tc: &TestCluster) -> String {
    let applied = |s: &str| -> Vec<u64> {
        s.lines()
            .filter_map(|l| l.split(" applied ").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect()
    };
    let before = statuses(tc).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = statuses(tc).await;
    let moved = applied(&before) != applied(&after);
    format!(
        "status then:\n{before}status 10 s later ({}):\n{after}",
        if moved {
            "applied indexes moved: a slow statement rather than a wedge?"
        } else {
            "applied indexes did not move"
        }
    )
}

/// A `raftpg check` plus the appliers' health; on a difference, names the statements of the
/// window that entered the log (refused ones never did).
async fn check_window(
    tc: &TestCluster,
    at: usize,
    window: &[(usize, &str, String)],
    dir: &Path,
) -> Result<(), String> {
    let r = tc
        .client
        .check(Duration::from_secs(60))
        .await
        .map_err(|e| format!("check after statement {at} failed: {e}"))?;
    if !r.identical {
        let logged: Vec<_> = window
            .iter()
            .filter(|(_, _, c)| !c.starts_with("refused"))
            .cloned()
            .collect();
        let path = dir.join(format!("divergence-window-{at}.sql"));
        dump(&path, &logged);
        return Err(format!(
            "DIVERGENCE found by the check after statement {at}: {:?}\n{} statements of the window entered the log, written to {}",
            r.differences,
            logged.len(),
            path.display()
        ));
    }
    if !appliers_applying(tc).await {
        return Err(format!(
            "after statement {at} an applier is not applying:\n{}",
            statuses(tc).await
        ));
    }
    Ok(())
}

/// A cluster with the schema loaded and the canary table, and the statements to send.
struct Prepared {
    tc: TestCluster,
    stmts: Vec<String>,
    /// Where failure reports go (the cluster's data directory).
    dir: PathBuf,
    t0: Instant,
}

/// Starts the cluster of `spec`, loads the schema (a follower frozen meanwhile), generates the
/// statements and creates the canary table; the copies are identical at the end.
async fn prepare(spec: &RunSpec) -> Prepared {
    let t0 = Instant::now();
    let tc = start_cluster(spec.name, spec.net, 3).await.unwrap();
    // The rows of the schema are written while a follower is frozen: it applies them later,
    // several entries per PostgreSQL transaction, like a node catching up.
    let mut schema_index = 0;
    let mut paused = None;
    for (i, sql) in schema_statements().iter().enumerate() {
        if paused.is_none() && sql.starts_with("INSERT") {
            paused = Some(Paused::follower(&tc).await);
        }
        match tc.client.execute_one(sql, vec![]).await {
            Ok(r) => schema_index = r.log_index,
            Err(e) => panic!("schema statement {i} failed: {e}\n{sql}"),
        }
    }
    drop(paused);
    // sqlsmith learns the schema from node 1, which may not have applied all of it yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    while tc
        .client
        .status_of(0)
        .await
        .map(|s| s.applied_index)
        .unwrap_or(0)
        < schema_index
    {
        assert!(Instant::now() < deadline, "node 1 did not apply the schema");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "cluster up and schema loaded in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let stmts = statements(&tc, spec).await;
    let dir = tc.cluster.data_dir().to_path_buf();
    let numbered: Vec<(usize, &str, String)> = stmts
        .iter()
        .enumerate()
        .map(|(i, s)| (i + 1, s.as_str(), String::new()))
        .collect();
    dump(&dir.join("statements.sql"), &numbered);
    eprintln!(
        "seed {}: {} statements, fingerprint {:016x}, written to {} ({:.1} s to here)",
        spec.seed,
        stmts.len(),
        fingerprint(&stmts),
        dir.join("statements.sql").display(),
        t0.elapsed().as_secs_f64()
    );
    tc.client.execute_one(CANARY_DDL, vec![]).await.unwrap();
    if let Err(e) = check_window(&tc, 0, &[], &dir).await {
        panic!("after the schema load, before any generated statement: {e}");
    }
    Prepared { tc, stmts, dir, t0 }
}

/// The end of a run: a check through raftpg (naming the last window's statements on a
/// difference), every PostgreSQL compared directly with one canary row per canary, every
/// applier healthy.
async fn final_checks(
    tc: &TestCluster,
    total: usize,
    window: &[(usize, &str, String)],
    dir: &Path,
    canaries: usize,
    tally: &Tally,
) {
    let t_end = Instant::now();
    if let Err(e) = check_window(tc, total, window, dir).await {
        panic!("{e}\n{}", tally.report());
    }
    eprintln!("final check in {:.1} s", t_end.elapsed().as_secs_f64());
    let sums = tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let canary_rows = &sums["public.sqlsmith_canary"];
    assert!(
        canary_rows.starts_with(&format!("{canaries} rows")),
        "every canary committed once: {canary_rows}"
    );
    assert!(
        appliers_applying(tc).await,
        "appliers:\n{}",
        statuses(tc).await
    );
}

/// A client whose attempts are short, so that a request sent to a frozen node moves on to
/// another (a retry carries the same request id).
fn short_attempts(tc: &TestCluster) -> Client {
    Client::with_config(
        &tc.cluster.addrs(),
        ClientConfig {
            attempt_timeout: Duration::from_secs(4),
            attempts_max: 30,
            ..tc.client_config()
        },
    )
    .unwrap()
}

async fn run(spec: RunSpec) {
    let mut spec = spec;
    env_override(&mut spec);
    let Prepared {
        mut tc,
        stmts,
        dir,
        t0,
    } = prepare(&spec).await;

    // Generated statements and canaries get no longer than the canary bound in total; a
    // statement still running then is reported by the canary.
    let (sender, canary_client) = (short_attempts(&tc), short_attempts(&tc));
    let skip = skipped();
    let mut tally = Tally::default();
    let mut since_canary: Vec<(usize, &str, String)> = Vec::new();
    let mut since_check: Vec<(usize, &str, String)> = Vec::new();
    let (mut canaries, mut slowest) = (0usize, (Duration::ZERO, 0usize));
    let total = stmts.len();
    let mut killed_follower = None;
    let mut paused: Option<(Paused, usize)> = None;
    let t_run = Instant::now();
    for (i, sql) in stmts.iter().enumerate() {
        let n = i + 1;
        if skip.contains(&n) {
            continue;
        }
        if spec.faults && n == total / 3 {
            let leader = tc.client.wait_for_leader(CANARY_BOUND).await.unwrap();
            eprintln!("statement {n}: SIGKILL of node {leader}'s PostgreSQL (the leader)");
            assert!(tc.cluster.kill_postgres(leader));
        }
        if spec.faults && n == 2 * total / 3 {
            let leader = tc.client.wait_for_leader(CANARY_BOUND).await.unwrap();
            let victim = (1..=3).find(|id| *id != leader).unwrap();
            eprintln!("statement {n}: SIGKILL of node {victim} (a follower)");
            tc.cluster.kill_node(victim);
            killed_follower = Some((victim, n + 300));
        }
        if let Some((victim, at)) = killed_follower {
            if n >= at || n == total {
                eprintln!("statement {n}: restarting node {victim}");
                tc.cluster.start_node(victim).unwrap();
                killed_follower = None;
            }
        }
        if spec.pause_every > 0
            && n % spec.pause_every == 0
            && n + PAUSE_LEN <= total
            && killed_follower.is_none()
        {
            let p = Paused::follower(&tc).await;
            eprintln!("statement {n}: SIGSTOP of node {} (a follower)", p.id);
            paused = Some((p, n + PAUSE_LEN));
        }
        if paused.as_ref().is_some_and(|(_, until)| n >= *until) {
            let (p, _) = paused.take().unwrap();
            eprintln!("statement {n}: SIGCONT of node {}", p.id);
        }
        let started = Instant::now();
        let r = tokio::time::timeout(
            CANARY_BOUND,
            sender.execute(vec![Statement {
                sql: sql.clone(),
                params: vec![],
            }]),
        )
        .await;
        let took = started.elapsed();
        if took > slowest.0 {
            slowest = (took, n);
        }
        let (class, msg) = match &r {
            Ok(r) => classify(r),
            Err(_) => (
                format!("no answer within {} s", CANARY_BOUND.as_secs()),
                String::new(),
            ),
        };
        tally.add(n, &class, &msg);
        since_canary.push((n, sql, class.clone()));
        since_check.push((n, sql, class.clone()));
        if n % CANARY_EVERY == 0 || n == total || r.is_err() {
            canaries += 1;
            if let Err(e) = canary(&canary_client, n, CANARY_BOUND).await {
                let path = dir.join(format!("wedge-before-canary-{n}.sql"));
                dump(&path, &since_canary);
                let diag = diagnose(&tc).await;
                let mut listing = String::new();
                for (k, sql, class) in &since_canary {
                    if class.starts_with("refused") {
                        let _ = writeln!(listing, "--- statement {k} [{class}]: not in the log");
                    } else {
                        let _ = writeln!(listing, "--- statement {k} [{class}]\n{sql}");
                    }
                }
                panic!(
                    "WEDGE: {e}\n{diag}statements since the last canary (also in {}):\n{listing}\n{}",
                    path.display(),
                    tally.report()
                );
            }
            since_canary.clear();
        }
        if n % spec.check_every == 0 && killed_follower.is_none() && paused.is_none() {
            if let Err(e) = check_window(&tc, n, &since_check, &dir).await {
                panic!("{e}\n{}", tally.report());
            }
            since_check.clear();
        }
        if n % 500 == 0 {
            eprintln!(
                "{n}/{total} statements, {:.1} s",
                t_run.elapsed().as_secs_f64()
            );
        }
    }
    drop(paused);
    if let Some((victim, _)) = killed_follower {
        tc.cluster.start_node(victim).unwrap();
    }
    let run_time = t_run.elapsed();
    eprintln!(
        "{}{} canaries; slowest statement {} took {:.2} s; statements ran in {:.1} s",
        tally.report(),
        canaries,
        slowest.1,
        slowest.0.as_secs_f64(),
        run_time.as_secs_f64()
    );

    let t_end = Instant::now();
    final_checks(&tc, total, &since_check, &dir, canaries, &tally).await;
    let replay = std::env::var("RAFTPG_SQLSMITH_FILE").is_ok();
    assert!(
        replay || tally.classes.get("accepted").copied().unwrap_or(0) > 0,
        "some generated statements were applied:\n{}",
        tally.report()
    );
    eprintln!(
        "identical copies on 3 nodes (compared directly after {:.1} s); total {:.1} s",
        t_end.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// How one transaction of generated statements ended.
enum TxnEnd {
    /// `COMMIT` or `ROLLBACK` answered (the class says which, and a `COMMIT`'s error).
    Ended(String),
    /// A statement got no answer within [`CANARY_BOUND`] (a wedge, or a slow statement).
    NoAnswer(usize),
    /// The connection failed (the class says how); the caller connects again.
    Lost(String),
}

/// The SQLSTATE of a wire error, or how the connection failed.
fn wire_class(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(code) => format!("error {}", code.code()),
        None => format!("connection: {e}"),
    }
}

/// Runs `group` as one interactive transaction over the wire protocol, the way an application
/// that recovers from errors does: a savepoint before each statement, `ROLLBACK TO` it after an
/// error, then `COMMIT` (or `ROLLBACK` when `commit` is false). Each statement's outcome goes
/// into `tally` and `window`.
async fn one_transaction<'a>(
    c: &tokio_postgres::Client,
    group: &[(usize, &'a str)],
    commit: bool,
    tally: &mut Tally,
    window: &mut Vec<(usize, &'a str, String)>,
) -> TxnEnd {
    if let Err(e) = c.batch_execute("BEGIN").await {
        return TxnEnd::Lost(wire_class(&e));
    }
    for &(n, sql) in group {
        if let Err(e) = c.batch_execute("SAVEPOINT g").await {
            // Ended by raftpg (a limit, a leadership change): PostgreSQL's failed state.
            let _ = c.batch_execute("ROLLBACK").await;
            return TxnEnd::Ended(format!("ended at a savepoint: {}", wire_class(&e)));
        }
        let ran = match tokio::time::timeout(CANARY_BOUND, c.simple_query(sql)).await {
            Ok(r) => r,
            Err(_) => {
                window.push((n, sql, "no answer".into()));
                return TxnEnd::NoAnswer(n);
            }
        };
        let (class, msg) = match &ran {
            Ok(_) => ("accepted".to_string(), String::new()),
            Err(e) => (
                wire_class(e),
                e.as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_default(),
            ),
        };
        tally.add(n, &class, &msg);
        window.push((n, sql, class));
        if let Err(e) = ran {
            if e.code().is_none() {
                return TxnEnd::Lost(wire_class(&e));
            }
            if let Err(e) = c.batch_execute("ROLLBACK TO SAVEPOINT g").await {
                let _ = c.batch_execute("ROLLBACK").await;
                return TxnEnd::Ended(format!("ended after an error: {}", wire_class(&e)));
            }
        }
    }
    let end = if commit { "COMMIT" } else { "ROLLBACK" };
    match c.batch_execute(end).await {
        Ok(()) if commit => TxnEnd::Ended("committed".into()),
        Ok(()) => TxnEnd::Ended("rolled back".into()),
        Err(e) if e.code().is_some() => TxnEnd::Ended(format!("COMMIT failed: {}", wire_class(&e))),
        Err(e) => TxnEnd::Lost(wire_class(&e)),
    }
}

/// The generated statements in interactive transactions of 1 to 6 statements over the wire
/// protocol (through the leader, and every third one through a follower, which relays it),
/// each statement behind a savepoint, one transaction in five rolled back; a follower frozen
/// for a stretch. Nothing may wedge, the copies must stay identical, and no node's replay of a
/// transaction may differ from what the leader ran (`raftpg_transaction_replay_mismatches_total`).
async fn run_in_transactions(spec: RunSpec) {
    let mut spec = spec;
    env_override(&mut spec);
    let Prepared { tc, stmts, dir, t0 } = prepare(&spec).await;
    let canary_client = short_attempts(&tc);
    let mut wires: Vec<Option<tokio_postgres::Client>> = vec![None, None, None];
    let (mut tally, mut ends) = (Tally::default(), Tally::default());
    let mut since_canary: Vec<(usize, &str, String)> = Vec::new();
    let mut since_check: Vec<(usize, &str, String)> = Vec::new();
    let mut paused: Option<Paused> = None;
    // A fixed pseudo-random stream (the run is repeatable with its seed).
    let mut state = spec.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut draw = move |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let (total, mut next, mut txn_no, mut canaries) = (stmts.len(), 0usize, 0usize, 0usize);
    let mut committed_with_work = 0usize;
    let mut known_leader: Option<u64> = None;
    let t_run = Instant::now();
    while next < total {
        txn_no += 1;
        let len = 1 + draw(6) as usize;
        let group: Vec<(usize, &str)> = stmts[next..(next + len).min(total)]
            .iter()
            .enumerate()
            .map(|(k, sql)| (next + k + 1, sql.as_str()))
            .collect();
        next += group.len();
        let commit = draw(5) != 0;
        if spec.pause_every > 0 && txn_no % spec.pause_every == 0 && paused.is_none() {
            let p = Paused::follower(&tc).await;
            eprintln!(
                "transaction {txn_no}: SIGSTOP of node {} (a follower)",
                p.id
            );
            paused = Some(p);
        } else if spec.pause_every > 0 && txn_no % spec.pause_every == spec.pause_every / 2 {
            if let Some(p) = paused.take() {
                eprintln!("transaction {txn_no}: SIGCONT of node {}", p.id);
            }
        }
        // (Asked only when needed: a node's status call waits out a frozen node.)
        let leader = match known_leader {
            Some(l) => l,
            None => tc.client.wait_for_leader(CANARY_BOUND).await.unwrap(),
        };
        let frozen = paused.as_ref().map(|p| p.id);
        let node = match txn_no % 3 {
            0 => (1..=3u64)
                .find(|id| *id != leader && Some(*id) != frozen)
                .unwrap_or(leader),
            _ => leader,
        };
        let slot = &mut wires[(node - 1) as usize];
        if slot.is_none() {
            *slot = Some(tc.wire(node).await.unwrap_or_else(|e| {
                panic!("transaction {txn_no}: cannot connect to node {node}'s wire port: {e}")
            }));
        }
        let c = slot.as_ref().unwrap();
        let first = group.first().map(|g| g.0).unwrap_or(0);
        let accepted_before = tally.classes.get("accepted").copied().unwrap_or(0);
        match one_transaction(c, &group, commit, &mut tally, &mut since_canary).await {
            TxnEnd::Ended(class) => {
                known_leader = (class == "committed" || class == "rolled back").then_some(leader);
                if class == "committed"
                    && tally.classes.get("accepted").copied().unwrap_or(0) > accepted_before
                {
                    committed_with_work += 1;
                }
                ends.add(first, &class, "");
            }
            TxnEnd::Lost(class) => {
                known_leader = None;
                ends.add(first, &format!("connection lost ({class})"), "");
                wires[(node - 1) as usize] = None;
            }
            TxnEnd::NoAnswer(n) => {
                let diag = diagnose(&tc).await;
                let path = dir.join(format!("no-answer-{n}.sql"));
                dump(&path, &since_canary);
                panic!(
                    "WEDGE: statement {n} (transaction {txn_no}, through node {node}) got no answer within {} s\n{diag}statements since the last canary in {}\n{}",
                    CANARY_BOUND.as_secs(),
                    path.display(),
                    tally.report()
                );
            }
        }
        if txn_no % CANARY_EVERY == 0 || next >= total {
            canaries += 1;
            if let Err(e) = canary(&canary_client, txn_no, CANARY_BOUND).await {
                let path = dir.join(format!("wedge-before-canary-{txn_no}.sql"));
                dump(&path, &since_canary);
                let diag = diagnose(&tc).await;
                panic!(
                    "WEDGE: {e}\n{diag}statements since the last canary in {}\n{}",
                    path.display(),
                    tally.report()
                );
            }
            since_check.append(&mut since_canary);
        }
        if txn_no % (CANARY_EVERY * 5) == 0 && paused.is_none() {
            if let Err(e) = check_window(&tc, next, &since_check, &dir).await {
                panic!("{e}\n{}", tally.report());
            }
            since_check.clear();
        }
    }
    drop(paused);
    eprintln!(
        "{}transactions by end:\n{}{txn_no} transactions ({committed_with_work} committed with applied statements), {canaries} canaries, in {:.1} s",
        tally.report(),
        ends.report(),
        t_run.elapsed().as_secs_f64()
    );
    since_check.append(&mut since_canary);
    final_checks(&tc, total, &since_check, &dir, canaries, &tally).await;
    for id in 1..=3u64 {
        let (_, text) = http_get(&metrics_addr_of(&tc.addr_of(id)), "/metrics")
            .await
            .unwrap();
        let mismatches = metric(&text, "raftpg_transaction_replay_mismatches_total");
        assert_eq!(
            mismatches,
            Some(0.0),
            "node {id} replayed a transaction step with another outcome than the leader's"
        );
    }
    let replay = std::env::var("RAFTPG_SQLSMITH_FILE").is_ok();
    assert!(
        replay || committed_with_work > 0,
        "some transactions with applied statements committed:\n{}",
        ends.report()
    );
    eprintln!(
        "identical copies on 3 nodes; total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// 2,000 generated statements (about 80 reach the log), a follower frozen for 200 (CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlsmith_statements_neither_wedge_nor_diverge() {
    run(RunSpec {
        name: "sqlsmith_short",
        net: 81,
        seed: 1,
        statements: 2000,
        check_every: 100,
        faults: false,
        pause_every: 1000,
    })
    .await;
}

/// 50,000 generated statements (about 2,000 reach the log): a follower frozen for 200 of every
/// 2,000, the leader's PostgreSQL SIGKILLed at 1/3, a follower node SIGKILLed at 2/3 and
/// restarted 300 statements later. Run with `--ignored` (docs/sqlsmith.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long: 50,000 statements with faults; see docs/sqlsmith.md"]
async fn sqlsmith_long_run_with_faults() {
    run(RunSpec {
        name: "sqlsmith_long",
        net: 82,
        seed: 2,
        statements: 50_000,
        check_every: 500,
        faults: true,
        pause_every: 2000,
    })
    .await;
}

/// 4,000 generated statements in interactive transactions over the wire protocol (about 1,300
/// transactions; most statements are refused by the gate, which fails them inside the
/// transaction like any error), a follower frozen for stretches (CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlsmith_transactions_neither_wedge_nor_diverge() {
    run_in_transactions(RunSpec {
        name: "sqlsmith_txn",
        net: 153,
        seed: 3,
        statements: 4000,
        check_every: 0,
        faults: false,
        pause_every: 60,
    })
    .await;
}

#[test]
fn schema_file_splits_into_statements() {
    let s = split_schema(SCHEMA);
    assert!(s.len() > 20, "{}", s.len());
    assert!(s
        .iter()
        .all(|s| !s.starts_with("--") && !s.contains("\n;;")));
    assert!(s
        .iter()
        .any(|s| s.contains("DEFERRABLE INITIALLY DEFERRED")));
}
