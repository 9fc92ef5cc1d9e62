//! Reads after a crash of the leader's PostgreSQL on an idle cluster (issue 14): the applier
//! commits with `synchronous_commit = off`, so PostgreSQL can lose its last commits in a crash
//! while openraft still counts them as applied. A LINEARIZABLE or AT_LEAST read must never
//! answer from a PostgreSQL that lacks its index: it waits (or fails) until the node has
//! replayed the lost entries, which it must do without waiting for a new write.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use raftpg_client::local_cluster::metrics_addr_of;
use raftpg_client::v1::{Consistency, QueryRequest};
use testkit::{http_get, metric, start_cluster, values, TestCluster};
use tonic::Code;

/// Acknowledged writes before the crash.
const WRITES: i64 = 5;

/// How long after the crash every node must answer with all of them.
const RECOVERY_MAX: Duration = Duration::from_secs(30);

/// The pid of the WAL writer of node `id`'s PostgreSQL (a child of its postmaster).
fn walwriter_pid(tc: &TestCluster, id: u64) -> Option<i32> {
    let postmaster = tc.cluster.node(id).postgres_pid()?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(postmaster) && cmdline.starts_with("postgres: walwriter") {
            return Some(pid);
        }
    }
    None
}

/// A count of the acknowledged rows at `consistency` on node `id`, bounded to 2 s.
/// Reads node `id` ran directly so far (its metrics).
async fn direct_reads(tc: &TestCluster, id: u64) -> f64 {
    let (_, text) = http_get(&metrics_addr_of(&tc.addr_of(id)), "/metrics")
        .await
        .unwrap();
    metric(&text, "raftpg_read_paths_total{path=\"direct\"}").unwrap_or(0.0)
}

fn count_request(consistency: Consistency, min_index: u64) -> QueryRequest {
    QueryRequest {
        sql: "SELECT count(*) FROM acked".into(),
        consistency: consistency as i32,
        min_index,
        timeout_ms: 2_000,
        ..Default::default()
    }
}

/// Five acknowledged inserts, then the leader's PostgreSQL is SIGKILLed (with its WAL writer
/// held, so that its asynchronous commits of those inserts are surely lost) and restarted by
/// the node's supervisor; no write follows. On every node, LINEARIZABLE and AT_LEAST(last
/// write) reads that answer must count all five rows, never fewer, and within 30 s every node
/// answers them. The copies are identical afterwards.
///
/// Every node also answered these reads before the crash, so their read connections ran them
/// directly (one statement, trusting the applier's incarnation token, see
/// `apply::state_machine::Held`); the idle applier notices the crash only later, so a token
/// that survived the crash would let reads skip the lost commits here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_stay_visible_after_the_leaders_postgres_crashes() {
    let tc = start_cluster("read_after_crash", 92, 3).await.unwrap();
    let c = &tc.client;
    c.execute_one("CREATE TABLE acked (k int PRIMARY KEY)", vec![])
        .await
        .unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    // The table itself is durable on the leader: only the inserts below can be lost.
    tc.pg(leader)
        .await
        .unwrap()
        .batch_execute("CHECKPOINT")
        .await
        .unwrap();
    let walwriter = walwriter_pid(&tc, leader).expect("the leader's WAL writer");
    // SAFETY: kill has no memory-safety preconditions; the pid is the WAL writer's.
    assert_eq!(unsafe { libc::kill(walwriter, libc::SIGSTOP) }, 0);
    let mut last = 0;
    for k in 1..=WRITES {
        let w = c
            .execute_one("INSERT INTO acked VALUES ($1)", vec![values::int(k)])
            .await
            .unwrap();
        last = w.log_index;
    }
    assert_eq!(
        c.wait_for_leader(Duration::from_secs(5)).await.unwrap(),
        leader,
        "leadership moved during the writes"
    );
    // Reads before the crash: the first prepares, the next run directly.
    for id in 1..=3u64 {
        for (level, min_index) in [(Consistency::Linearizable, 0), (Consistency::AtLeast, last)] {
            for _ in 0..3 {
                let r = c
                    .query_node((id - 1) as usize, count_request(level, min_index))
                    .await
                    .unwrap();
                assert_eq!(values::as_i64(&r.rows[0].values[0]), Some(WRITES));
            }
        }
    }
    let direct_before = direct_reads(&tc, leader).await;
    assert!(direct_before >= 2.0, "the leader ran no direct read");
    let old_postmaster = tc.cluster.node(leader).postgres_pid();
    assert!(tc.cluster.signal_postgres(leader, libc::SIGKILL));
    // The held WAL writer may have been reparented before signal_postgres saw it as a child;
    // stopped, it would never notice its postmaster's death and keep the shared memory.
    // SAFETY: as above; SIGKILL also ends a stopped process.
    unsafe { libc::kill(walwriter, libc::SIGKILL) };
    let crashed = Instant::now();
    eprintln!("killed node {leader}'s PostgreSQL after {WRITES} writes through index {last}");

    // Every (node, level) must answer with all rows at least once; no answer may have fewer.
    let levels = [(Consistency::Linearizable, 0), (Consistency::AtLeast, last)];
    let mut order: Vec<u64> = vec![leader];
    order.extend((1..=3).filter(|id| *id != leader));
    let mut pending: BTreeMap<(u64, i32), String> = order
        .iter()
        .flat_map(|id| {
            levels
                .iter()
                .map(move |(l, _)| ((*id, *l as i32), String::new()))
        })
        .collect();
    let mut restart_logged = false;
    while !pending.is_empty() {
        assert!(
            crashed.elapsed() < RECOVERY_MAX,
            "within {RECOVERY_MAX:?} of the crash, these reads never answered (last error): {pending:?}"
        );
        if !restart_logged {
            restart_logged = log_restart(&tc, leader, old_postmaster, last).await;
        }
        for id in &order {
            for (level, min_index) in levels {
                let r = c
                    .query_node((*id - 1) as usize, count_request(level, min_index))
                    .await;
                let key = (*id, level as i32);
                match r {
                    Ok(resp) => {
                        let n = values::as_i64(&resp.rows[0].values[0]);
                        assert_eq!(
                            n,
                            Some(WRITES),
                            "node {id} answered a {level:?} read {:?} after the crash with {n:?} of {WRITES} acknowledged rows (applied_index {})",
                            crashed.elapsed(),
                            resp.applied_index
                        );
                        assert!(resp.applied_index >= last, "node {id}: {resp:?}");
                        pending.remove(&key);
                    }
                    Err(e) => {
                        assert!(
                            matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
                            "node {id}, {level:?}: {e}"
                        );
                        if let Some(slot) = pending.get_mut(&key) {
                            *slot = e.to_string();
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "every node answered all {WRITES} rows {:?} after the crash",
        crashed.elapsed()
    );
    // What makes the direct reads safe here: the token's table is one PostgreSQL empties in
    // crash recovery (the idle applier may notice the crash after the first reads arrive).
    for id in 1..=3u64 {
        let persistence: i8 = tc
            .pg(id)
            .await
            .unwrap()
            .query_one(
                "SELECT relpersistence FROM pg_class WHERE oid = 'raftpg.incarnation'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            persistence as u8, b'u',
            "node {id}: raftpg.incarnation is not unlogged"
        );
    }
    // Once the applier is back with a new token, reads run directly again.
    let again = Instant::now();
    loop {
        let r = c
            .query_node(
                (leader - 1) as usize,
                count_request(Consistency::AtLeast, last),
            )
            .await
            .unwrap();
        assert_eq!(values::as_i64(&r.rows[0].values[0]), Some(WRITES));
        if direct_reads(&tc, leader).await > direct_before {
            break;
        }
        assert!(
            again.elapsed() < RECOVERY_MAX,
            "no direct read on node {leader} after the crash"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tc.assert_identical(&[1, 2, 3])
        .await
        .expect("identical copies after the replay");
}

/// Once node `id`'s PostgreSQL is back (a new postmaster), logs the index it holds; returns
/// whether it did. For the record only: the node may already have replayed what was lost.
async fn log_restart(tc: &TestCluster, id: u64, old: Option<i32>, last: u64) -> bool {
    let now = tc.cluster.node(id).postgres_pid();
    if now.is_none() || now == old {
        return false;
    }
    let Ok(pg) = tc.pg(id).await else {
        return false;
    };
    let Ok(row) = pg
        .query_one("SELECT log_index FROM raftpg.applied", &[])
        .await
    else {
        return false;
    };
    let held: i64 = row.get(0);
    eprintln!("node {id}'s PostgreSQL is back holding log index {held} (last write {last})");
    true
}
