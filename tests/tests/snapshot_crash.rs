//! A follower killed for real (SIGKILL of the node process, or of its PostgreSQL) at every stage
//! of installing a snapshot comes back, catches up, and ends identical; writes keep working.
//!
//! The stages, as the follower logs them (snapshot.rs, state_machine.rs):
//! - `receiving a snapshot`: chunks are arriving (the file is partial);
//! - `received snapshot`: the file is complete and openraft has handed it to the state machine;
//!   openraft purges its log up to the snapshot at the same moment (issue 14: before the fix, a
//!   crash here left a node that could not start — openraft's state check panicked on a log
//!   purged past both the database and the current snapshot);
//! - `installing snapshot`: the snapshot is published and is being restored (pg_restore) — during
//!   the install, or at restart, when an interrupted install is finished before the node joins;
//! - `swapped the restored database in`: the old database is being dropped.
//!
//! Round 1: the follower is down while the leader writes a ~20 MB table and compacts its log, so
//! on restart it must install a snapshot; it is killed at each stage in turn (`delay` after the
//! stage's line appears), restarted, and left to finish. Round 2: it misses more compacted
//! entries, and its PostgreSQL is killed while the old database is dropped after the swap.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use testkit::{start_cluster_with, values, TestCluster};

/// Compact the log every 50 entries, keeping 10: a follower that missed more needs a snapshot.
const FLAGS: &[&str] = &[
    "--snapshot-every-entries",
    "50",
    "--snapshot-keep-entries",
    "10",
];

/// Install stages in the order they happen, by the line the follower logs when one starts.
const RECEIVING: &str = "receiving a snapshot";
const RECEIVED: &str = "received snapshot";
const RESTORING: &str = "installing snapshot";
const SWAPPED: &str = "swapped the restored database in";
const STAGES: [&str; 4] = [RECEIVING, RECEIVED, RESTORING, SWAPPED];
/// Logged when an install (or a restart's restore) finished.
const INSTALLED: &str = "installed snapshot";
/// Logged when a restarted node joins the cluster.
const JOINED: &str = "raft state found";
/// How long a restarted follower may take to reach the next install stage.
const STAGE_TIMEOUT: Duration = Duration::from_secs(45);

/// What is killed.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// The node process (its PostgreSQL keeps running until the node restarts).
    Node,
    /// The node's PostgreSQL postmaster (the node stays up and retries).
    Postgres,
}

/// One crash: `target` is SIGKILLed `delay_ms` after the follower logs `stage` (or a later
/// stage, if it got there first).
struct Crash {
    stage: &'static str,
    delay_ms: u64,
    target: Target,
}

/// Round 1: a crash at every stage, in order, each on the restarted follower. Delays are 0
/// (right at a stage's line) or short against the stage (pg_restore of ~12 MB takes ~0.5 s).
const ROUND_1: &[Crash] = &[
    // Mid-transfer: the file is partial; nothing is recorded yet.
    Crash {
        stage: RECEIVING,
        delay_ms: 0,
        target: Target::Node,
    },
    // The file is complete; openraft's purge of its log up to the snapshot is pending or done,
    // the snapshot not yet durable (the crash point of issue 14).
    Crash {
        stage: RECEIVED,
        delay_ms: 0,
        target: Target::Node,
    },
    // Published and being restored by the install: PostgreSQL dies during pg_restore, the
    // install retries in the same process.
    Crash {
        stage: RESTORING,
        delay_ms: 250,
        target: Target::Postgres,
    },
    // The retry's restore starts: the node dies; at restart it restores the published
    // snapshot before it joins.
    Crash {
        stage: RESTORING,
        delay_ms: 0,
        target: Target::Node,
    },
    // That restore at restart: PostgreSQL dies during pg_restore; the retry swaps the restored
    // database in, and the node dies while the old one is dropped.
    Crash {
        stage: RESTORING,
        delay_ms: 250,
        target: Target::Postgres,
    },
    Crash {
        stage: SWAPPED,
        delay_ms: 0,
        target: Target::Node,
    },
];

/// Round 2 (another snapshot): the crash of issue 14 again, then PostgreSQL dies while the
/// install drops the replaced database (each retry used to fail renaming the node's database
/// to the leftover `_replaced` one).
const ROUND_2: &[Crash] = &[
    Crash {
        stage: RECEIVED,
        delay_ms: 0,
        target: Target::Node,
    },
    Crash {
        stage: SWAPPED,
        delay_ms: 0,
        target: Target::Postgres,
    },
];

/// What the follower logged about installs, for the test's output.
const REPORTED: &[&str] = &[
    RECEIVING,
    RECEIVED,
    RESTORING,
    SWAPPED,
    INSTALLED,
    "restoring it",
    "already holds the snapshot",
    "failed; retrying",
    "waits for a durable snapshot",
    "panicked",
    JOINED,
];

/// A node's log file, read from an offset on (only what was logged after it).
struct NodeLog {
    path: PathBuf,
    offset: usize,
}

impl NodeLog {
    fn new(path: PathBuf) -> Self {
        NodeLog { path, offset: 0 }
    }

    /// Everything logged since the last [`NodeLog::skip_to_end`].
    fn fresh(&self) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.get(self.offset..).unwrap_or_default().to_string()
    }

    /// Ignores what was logged so far.
    fn skip_to_end(&mut self) {
        self.offset = std::fs::metadata(&self.path)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
    }

    /// The install lines of the whole file (timestamps, without colours), for the output.
    fn install_lines(&self) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let plain = |l: &str| {
            let mut out = String::new();
            let mut chars = l.chars();
            while let Some(c) = chars.next() {
                if c == '\u{1b}' {
                    chars.by_ref().find(|c| *c == 'm');
                } else {
                    out.push(c);
                }
            }
            out
        };
        text.lines()
            .filter(|l| REPORTED.iter().any(|r| l.contains(r)))
            .map(|l| format!("  {}", plain(l).chars().take(160).collect::<String>()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The last `n` lines of the whole file (for failure messages).
    fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Waits until the follower logs `stage` or a later install stage (newly), and returns which;
/// `None` if it finished installing first — it logged the end of an install, or it serves
/// with `target` applied (the kill would come too late: the step is skipped). Fails if it
/// exits or nothing happens within `timeout` (a node that cannot restart ends here).
async fn wait_for_stage(
    tc: &TestCluster,
    id: u64,
    log: &NodeLog,
    stage: &str,
    target: u64,
) -> Option<&'static str> {
    let from = STAGES.iter().position(|s| *s == stage).unwrap_or(0);
    let deadline = Instant::now() + STAGE_TIMEOUT;
    let mut status_checked = Instant::now();
    loop {
        let text = log.fresh();
        if let Some(s) = STAGES[from..].iter().find(|s| text.contains(**s)) {
            return Some(s);
        }
        if text.contains(INSTALLED) {
            return None;
        }
        if status_checked.elapsed() > Duration::from_millis(200) {
            status_checked = Instant::now();
            let applied = tc
                .client
                .member_status(id as usize - 1, id)
                .await
                .map(|st| st.applied_index);
            if applied.is_ok_and(|a| a >= target) {
                return None;
            }
        }
        let pid = tc.cluster.node(id).pid();
        assert!(
            pid.is_some_and(|p| !exited(p)) && Instant::now() < deadline,
            "node {id} never reached install stage '{stage}' after its restart (exited: {}); \
             its log ends with:\n{}",
            pid.is_none_or(exited),
            log.tail(40)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Inserts ~20 MB that does not compress much (md5 hex), so that the snapshot takes a while
/// to transfer, verify and restore.
async fn load_big_table(c: &raftpg_client::Client) {
    c.execute_one(
        "CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL)",
        vec![],
    )
    .await
    .unwrap();
    for part in 0..8 {
        let (from, to) = (part * 5_000 + 1, (part + 1) * 5_000);
        c.execute_one(
            "INSERT INTO big (id, payload)
             SELECT g, (SELECT string_agg(md5(g::text || '-' || i::text), '' ORDER BY i)
                        FROM generate_series(1, 16) i)
             FROM generate_series($1::int, $2::int) g ORDER BY g",
            vec![values::int(from), values::int(to)],
        )
        .await
        .unwrap();
    }
}

/// Small writes until the leader's log is compacted past `behind` (the follower's last index).
/// Returns the leader's snapshot index.
async fn compact_past(tc: &TestCluster, leader: u64, behind: u64) -> u64 {
    let c = &tc.client;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    loop {
        for _ in 0..20 {
            c.execute_one("INSERT INTO items (n) VALUES ($1)", vec![values::int(i)])
                .await
                .unwrap();
            i += 1;
        }
        let st = c.member_status(leader as usize - 1, leader).await.unwrap();
        if st.purged_index > behind {
            eprintln!(
                "leader {leader}: snapshot at {}, log purged to {} (follower at {behind})",
                st.snapshot_index, st.purged_index
            );
            return st.snapshot_index;
        }
        assert!(
            Instant::now() < deadline,
            "the leader never compacted its log"
        );
    }
}

/// Runs one crash of the schedule against follower `id` (started if it is not running).
/// Returns whether the kill happened (false: the install finished before the stage).
async fn crash(
    tc: &mut TestCluster,
    id: u64,
    log: &mut NodeLog,
    crash: &Crash,
    target: u64,
) -> bool {
    if tc.cluster.node(id).pid().is_none() {
        log.skip_to_end();
        tc.cluster.start_node(id).unwrap();
    }
    let started = Instant::now();
    let Some(stage) = wait_for_stage(tc, id, log, crash.stage, target).await else {
        eprintln!(
            "SKIPPED {:?} kill at '{}': node {id} finished installing first",
            crash.target, crash.stage
        );
        return false;
    };
    tokio::time::sleep(Duration::from_millis(crash.delay_ms)).await;
    match crash.target {
        Target::Node => tc.cluster.kill_node(id),
        Target::Postgres => assert!(tc.cluster.kill_postgres(id), "no PostgreSQL to kill"),
    }
    let finished = log.fresh().contains(INSTALLED);
    eprintln!(
        "killed {:?} of node {id} {} ms after '{stage}' ({} ms after the step began; install finished before the kill: {finished})",
        crash.target,
        crash.delay_ms,
        started.elapsed().as_millis()
    );
    // The next stage must be logged after this kill.
    log.skip_to_end();
    true
}

/// Runs `schedule` against the follower, which must install a snapshot up to `target`. A kill
/// that comes after the install finished is skipped (a small snapshot on a busy machine can
/// install in a few hundred milliseconds), but the kill right after the snapshot is received —
/// the crash point of issue 14 — must land, and so must at least half of the schedule.
async fn run_schedule(
    tc: &mut TestCluster,
    id: u64,
    log: &mut NodeLog,
    schedule: &[Crash],
    target: u64,
) {
    let (mut landed, mut received) = (0, 0);
    for step in schedule {
        if crash(tc, id, log, step, target).await {
            landed += 1;
            if step.stage == RECEIVED {
                received += 1;
            }
        }
    }
    assert!(
        received > 0 && 2 * landed >= schedule.len(),
        "kills came too late ({landed} of {} landed, {received} right after the snapshot was received); the install log:\n{}",
        schedule.len(),
        log.install_lines()
    );
}

/// Kills the follower, then writes until the leader's log is compacted past it (so that it
/// needs a snapshot at restart). Returns the leader's snapshot index: what it has to install.
async fn leave_behind(tc: &mut TestCluster, leader: u64, follower: u64, big: bool) -> u64 {
    let behind = tc
        .client
        .member_status(follower as usize - 1, follower)
        .await
        .unwrap()
        .last_log_index;
    tc.cluster.kill_node(follower);
    if big {
        load_big_table(&tc.client).await;
    }
    compact_past(tc, leader, behind).await
}

/// Starts the follower if it is not running and waits until every node holds the same data at
/// the same applied index (after one more write, so that the follower has something to catch
/// up to).
async fn catch_up(tc: &mut TestCluster, follower: u64, log: &mut NodeLog) {
    if tc.cluster.node(follower).pid().is_none() {
        log.skip_to_end();
        tc.cluster.start_node(follower).unwrap();
    }
    let started = Instant::now();
    tc.client
        .execute_one("INSERT INTO items (n) VALUES (-1)", vec![])
        .await
        .unwrap();
    let sums = tc.assert_identical(&[1, 2, 3]).await.unwrap();
    assert!(sums["public.big"].starts_with("40000 rows"), "{sums:?}");
    eprintln!(
        "follower caught up {} ms after its last restart",
        started.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_killed_while_installing_a_snapshot_recovers() {
    let t0 = Instant::now();
    let mut tc = start_cluster_with("snapshot_crash", 111, 3, FLAGS)
        .await
        .unwrap();
    tc.client
        .execute_one(
            "CREATE TABLE items (id serial PRIMARY KEY, n int NOT NULL)",
            vec![],
        )
        .await
        .unwrap();
    let (leader, follower) = tc.leader_and_follower().await;
    let mut log = NodeLog::new(tc.cluster.data_dir().join(format!("node{follower}.log")));

    let target = leave_behind(&mut tc, leader, follower, true).await;
    eprintln!(
        "round 1: loaded and compacted at {} ms",
        t0.elapsed().as_millis()
    );
    run_schedule(&mut tc, follower, &mut log, ROUND_1, target).await;
    catch_up(&mut tc, follower, &mut log).await;

    let target = leave_behind(&mut tc, leader, follower, false).await;
    eprintln!("round 2: compacted at {} ms", t0.elapsed().as_millis());
    run_schedule(&mut tc, follower, &mut log, ROUND_2, target).await;
    catch_up(&mut tc, follower, &mut log).await;
    eprintln!(
        "follower {follower}'s install log:\n{}",
        log.install_lines()
    );

    // Writes keep working through the recovered follower, and every copy stays identical.
    let via_follower = tc.node_client(follower);
    for i in 0..20 {
        via_follower
            .execute_one(
                "INSERT INTO items (n) VALUES ($1)",
                vec![values::int(1000 + i)],
            )
            .await
            .unwrap();
    }
    tc.assert_identical(&[1, 2, 3]).await.unwrap();
    let check = tc.client.check(Duration::from_secs(60)).await.unwrap();
    assert!(check.identical, "{:?}", check.differences);
    eprintln!("total {} ms", t0.elapsed().as_millis());
}
